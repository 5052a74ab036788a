//! The NBD client's handshake and wire format against real servers
//! (`nbdkit`, `qemu-nbd`) on this host: no ublk driver needed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ublk::targets::nbd::proto::{self, flags, Cmd, ReplyReader, RequestHeader, Want};
use ublk::targets::nbd::{connect, request_header, Conn, ConnError, ConnectOptions, NbdAddr};
use ublk::{IoDesc, IoFlags, Op};

/// A server process, killed on drop.
struct Server(Child, PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ublk-nbd-{name}-{}.sock", std::process::id()))
}

/// Starts `cmd` (which serves on `sock`) and waits for the socket.
fn serve(tool: &str, args: &[&str], sock: &Path) -> Option<Server> {
    if Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        println!("SKIP: {tool} is not installed");
        return None;
    }
    let _ = std::fs::remove_file(sock);
    let child = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawning the server");
    let server = Server(child, sock.to_owned());
    let t0 = Instant::now();
    while !listening(sock) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{tool} did not listen on {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(server)
}

/// Whether a Unix socket listens at `sock`: the server binds (making the
/// file) a moment before it listens, and a client in between is refused.
/// A listening socket's flags in `/proc/net/unix` have `__SO_ACCEPTCON`.
fn listening(sock: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    table.lines().any(
        |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
            [_, _, _, flags, _, _, _, path] => {
                Path::new(path) == sock
                    && u32::from_str_radix(flags, 16).is_ok_and(|f| f & 1 << 16 != 0)
            }
            _ => false,
        },
    )
}

fn unix_uri(export: &str, sock: &Path) -> NbdAddr {
    NbdAddr::parse_uri(&format!("nbd+unix:///{export}?socket={}", sock.display())).unwrap()
}

/// Holes of structured read replies [`exchange`] has zeroed.
static HOLES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Sends `reqs` (a write's data is `data`) on `conn` and reads every reply
/// with the reader the target uses: the results and the read data, by
/// request.
fn exchange(conn: &mut Conn, reqs: &[RequestHeader], data: &[u8]) -> (Vec<i32>, Vec<Vec<u8>>) {
    let n = reqs.len() as u16;
    let mut reader = ReplyReader::new(n, conn.structured);
    for (i, r) in reqs.iter().enumerate() {
        assert!(reader.expect(i as u16, r));
        conn.stream.write_all(&r.encode()).unwrap();
        if r.cmd == Cmd::Write {
            conn.stream.write_all(&data[..r.len as usize]).unwrap();
        }
    }
    let mut bufs: Vec<Vec<u8>> = reqs.iter().map(|r| vec![0u8; r.len as usize]).collect();
    let mut results = vec![None; reqs.len()];
    while reader.busy() {
        let got = match reader.want() {
            Want::Header | Want::Discard(_) => conn.stream.read(reader.header_buf()).unwrap(),
            Want::Data { tag, at, len } => {
                let b = &mut bufs[usize::from(tag)][at as usize..(at + len) as usize];
                conn.stream.read(b).unwrap()
            }
            Want::Zero { tag, at, len } => {
                HOLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                bufs[usize::from(tag)][at as usize..(at + len) as usize].fill(0);
                if let Some(rep) = reader.advance(0).unwrap() {
                    results[usize::from(rep.tag)] = Some(rep.result);
                }
                continue;
            }
        };
        assert!(got > 0, "the server closed the connection");
        if let Some(rep) = reader.advance(got).unwrap() {
            results[usize::from(rep.tag)] = Some(rep.result);
        }
    }
    let results = results
        .into_iter()
        .map(|r| r.expect("every request has a reply"))
        .collect();
    (results, bufs)
}

#[test]
fn nbdkit_memory_handshake_and_io() {
    let sock = sock_path("nbdkit");
    let Some(_server) = serve(
        "nbdkit",
        &[
            "-f",
            "--exit-with-parent",
            "-U",
            sock.to_str().unwrap(),
            "memory",
            "1M",
        ],
        &sock,
    ) else {
        return;
    };
    let mut conn = connect(&unix_uri("", &sock), ConnectOptions::default()).unwrap();
    assert_eq!(conn.info.size, 1 << 20);
    assert!(conn.info.has(flags::SEND_FLUSH), "{:#x}", conn.info.flags);
    assert!(conn.info.has(flags::SEND_TRIM) && conn.info.has(flags::SEND_WRITE_ZEROES));
    assert!(conn.info.has(flags::CAN_MULTI_CONN));
    assert!(!conn.info.has(flags::READ_ONLY));

    // A write and a flush, then (once they are answered: a server may run
    // requests in flight side by side, so a read sent with the write may
    // be served first) a read back and a read past the end, parsed by the
    // reader the target uses.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let writes = [
        RequestHeader {
            flags: proto::CMD_FLAG_FUA,
            cmd: Cmd::Write,
            handle: 0,
            offset: 8192,
            len: 4096,
        },
        RequestHeader {
            flags: 0,
            cmd: Cmd::Flush,
            handle: 1,
            offset: 0,
            len: 0,
        },
    ];
    let (results, _) = exchange(&mut conn, &writes, &data);
    assert_eq!(results, [4096, 0]);
    let reads = [
        RequestHeader {
            flags: 0,
            cmd: Cmd::Read,
            handle: 0,
            offset: 8192,
            len: 4096,
        },
        RequestHeader {
            flags: 0,
            cmd: Cmd::Read,
            handle: 1,
            offset: 2 << 20,
            len: 512,
        },
    ];
    let (results, bufs) = exchange(&mut conn, &reads, &[]);
    assert_eq!(results, [4096, -libc::EINVAL]);
    assert!(bufs[0] == data, "the read back differs from the write");
}

#[test]
fn qemu_nbd_refuses_an_unknown_export_and_serves_read_only() {
    let dir = std::env::temp_dir();
    let img = dir.join(format!("ublk-nbd-qemu-{}.img", std::process::id()));
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = sock_path("qemu");
    let Some(_server) = serve(
        "qemu-nbd",
        &[
            "-k",
            sock.to_str().unwrap(),
            "-x",
            "disk",
            "-f",
            "raw",
            "-r",
            "--persistent",
            "-t",
            img.to_str().unwrap(),
        ],
        &sock,
    ) else {
        let _ = std::fs::remove_file(&img);
        return;
    };
    let e = connect(&unix_uri("nope", &sock), ConnectOptions::default()).unwrap_err();
    assert!(matches!(e, ConnError::Refused { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("export \"nope\"") && msg.contains("no such export"),
        "{msg}"
    );
    let c = connect(&unix_uri("disk", &sock), ConnectOptions::default()).unwrap();
    assert_eq!(c.info.size, 1 << 20);
    assert!(c.info.has(flags::READ_ONLY));
    let _ = std::fs::remove_file(&img);
}

#[test]
fn unreachable_servers_are_one_line() {
    // Nothing listens on port 1 of loopback.
    let a = NbdAddr::parse_uri("nbd://127.0.0.1:1/x").unwrap();
    let e = connect(&a, ConnectOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("NBD server nbd://127.0.0.1:1/x: connecting:"),
        "{e}"
    );
    let a = unix_uri("x", Path::new("/nonexistent/nbd.sock"));
    let e = connect(&a, ConnectOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("connecting") && !e.contains('\n'), "{e}");
}

/// A server that accepts and closes mid-handshake, and one that is not
/// an NBD server at all.
#[test]
fn servers_that_break_the_handshake() {
    use std::os::unix::net::UnixListener;
    for (name, greeting) in [
        ("close", &b"NBDMAGIC"[..]),
        ("ssh", &b"SSH-2.0-OpenSSH_9.2\r\n"[..]),
    ] {
        let sock = sock_path(name);
        let _ = std::fs::remove_file(&sock);
        let l = UnixListener::bind(&sock).unwrap();
        let g = greeting.to_vec();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let _ = s.write_all(&g);
        });
        let e = connect(&unix_uri("x", &sock), ConnectOptions::default())
            .unwrap_err()
            .to_string();
        t.join().unwrap();
        let _ = std::fs::remove_file(&sock);
        match name {
            "close" => assert!(
                e.contains("closed the connection during the handshake"),
                "{e}"
            ),
            _ => assert!(e.contains("protocol error") && e.contains("magic"), "{e}"),
        }
    }
}

/// What the target sends for the kernel's requests, as the kernel shapes
/// them: a write, then flushes whose descriptors carry a sector (the block
/// layer's flush request keeps a stale one, or -1) — to qemu-nbd, which
/// fails a flush range past the export with EINVAL (`mkfs.xfs`: "Flushing
/// the data device failed, err=22"), and to nbdkit, which fails any flush
/// with a range.
#[test]
fn flushes_as_the_kernel_sends_them_reach_qemu_nbd_and_nbdkit() {
    let img = std::env::temp_dir().join(format!("ublk-nbd-flush-{}.img", std::process::id()));
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let qemu_sock = sock_path("flush-qemu");
    let kit_sock = sock_path("flush-nbdkit");
    let servers = [
        (
            "qemu-nbd",
            vec![
                "-k",
                qemu_sock.to_str().unwrap(),
                "-x",
                "disk",
                "-f",
                "raw",
                // As the guest tests serve it.
                "--cache=writeback",
                "--persistent",
                img.to_str().unwrap(),
            ],
            &qemu_sock,
            "disk",
        ),
        (
            "nbdkit",
            vec![
                "-f",
                "--exit-with-parent",
                "-U",
                kit_sock.to_str().unwrap(),
                "memory",
                "1M",
            ],
            &kit_sock,
            "",
        ),
    ];
    let desc = |op, flags, start_sector, nr_sectors| IoDesc {
        op,
        flags,
        start_sector,
        nr_sectors,
        addr: 0,
    };
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 13) as u8).collect();
    for (tool, args, sock, export) in servers {
        let Some(_server) = serve(tool, &args, sock) else {
            continue;
        };
        let mut conn = connect(&unix_uri(export, sock), ConnectOptions::default()).unwrap();
        assert!(
            conn.info.has(flags::SEND_FLUSH),
            "{tool}: {:#x}",
            conn.info.flags
        );
        let headers = |conn: &Conn, descs: &[IoDesc]| -> Vec<RequestHeader> {
            descs
                .iter()
                .enumerate()
                .map(|(i, d)| request_header(&conn.info, d, i as u64).unwrap())
                .collect()
        };
        let writes = headers(
            &conn,
            &[
                desc(Op::Write, IoFlags::FUA, 16, 8),
                desc(Op::Flush, IoFlags::empty(), 0, 0),
                desc(Op::Flush, IoFlags::empty(), 16, 0),
                desc(Op::Flush, IoFlags::empty(), u64::MAX >> 9, 0),
            ],
        );
        let (results, _) = exchange(&mut conn, &writes, &data);
        assert_eq!(results, [4096, 0, 0, 0], "{tool}");
        // The read goes once the write is answered: a server may serve the
        // requests in flight in any order.
        let read = headers(&conn, &[desc(Op::Read, IoFlags::empty(), 16, 8)]);
        let (results, bufs) = exchange(&mut conn, &read, &data);
        assert_eq!(results, [4096], "{tool}");
        assert!(
            bufs[0] == data,
            "{tool}: the read back differs from the write"
        );
    }
    let _ = std::fs::remove_file(&img);
}

/// Structured replies where the server offers them: agreed with qemu-nbd
/// and nbdkit, and the reader the target uses puts a read reply's data
/// and holes (qemu-nbd sends a sparse image's unwritten parts as
/// `NBD_REPLY_TYPE_OFFSET_HOLE`) where they belong; an error chunk is the
/// request's error.
#[test]
fn structured_replies_with_data_and_holes() {
    let dir = std::env::temp_dir();
    let img = dir.join(format!("ublk-nbd-sparse-{}.img", std::process::id()));
    // Sparse: every block is a hole until written.
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let qsock = sock_path("qemu-structured");
    let nsock = sock_path("nbdkit-structured");
    let servers = [
        serve(
            "qemu-nbd",
            &[
                "-k",
                qsock.to_str().unwrap(),
                "-f",
                "raw",
                "--persistent",
                "-t",
                img.to_str().unwrap(),
            ],
            &qsock,
        )
        .map(|s| (s, &qsock)),
        serve(
            "nbdkit",
            &[
                "-f",
                "--exit-with-parent",
                "-U",
                nsock.to_str().unwrap(),
                "memory",
                "1M",
            ],
            &nsock,
        )
        .map(|s| (s, &nsock)),
    ];
    let asked = ConnectOptions {
        structured: true,
        ..ConnectOptions::default()
    };
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 1) as u8).collect();
    for (_server, sock) in servers.iter().flatten() {
        let mut conn = connect(&unix_uri("", sock), asked).unwrap();
        assert!(
            conn.structured,
            "{} agreed to no structured replies",
            sock.display()
        );
        let req = |cmd, handle, offset, len| RequestHeader {
            flags: 0,
            cmd,
            handle,
            offset,
            len,
        };
        // 8 KiB written at 64 KiB; a read from 56 KiB to 80 KiB spans a
        // hole, the data and a hole; a read past the end fails.
        // The reads go once the write is answered: a server may serve the
        // requests in flight in any order (qemu-nbd does).
        let (results, _) = exchange(&mut conn, &[req(Cmd::Write, 0, 64 << 10, 8192)], &data);
        assert_eq!(results, [8192], "{}", sock.display());
        let reqs = [
            req(Cmd::Read, 0, 56 << 10, 24 << 10),
            req(Cmd::Read, 1, 2 << 20, 512),
        ];
        let holes = HOLES.load(std::sync::atomic::Ordering::Relaxed);
        let (results, bufs) = exchange(&mut conn, &reqs, &data);
        let holes = HOLES.load(std::sync::atomic::Ordering::Relaxed) - holes;
        if *sock == &qsock {
            assert!(holes >= 1, "qemu-nbd sent no hole");
        }
        assert_eq!(results[0], 24 << 10, "{}", sock.display());
        assert!(results[1] < 0, "a read past the end: {}", results[1]);
        let mut want = vec![0u8; 24 << 10];
        want[8 << 10..16 << 10].copy_from_slice(&data);
        let differ: Vec<usize> = (0..want.len()).filter(|&i| bufs[0][i] != want[i]).collect();
        assert!(
            differ.is_empty(),
            "{}: {} read bytes differ, from byte {:?} to {:?}",
            sock.display(),
            differ.len(),
            differ.first(),
            differ.last()
        );
    }
    let _ = std::fs::remove_file(&img);
}
