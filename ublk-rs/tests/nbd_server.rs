//! The NBD client's handshake and wire format against real servers
//! (`nbdkit`, `qemu-nbd`) on this host: no ublk driver needed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ublk::targets::nbd::proto::{self, flags, Cmd, ReplyReader, RequestHeader, Want};
use ublk::targets::nbd::{connect, ConnError, ConnectOptions, NbdAddr};

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
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{tool} did not create {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(server)
}

fn unix_uri(export: &str, sock: &Path) -> NbdAddr {
    NbdAddr::parse_uri(&format!("nbd+unix:///{export}?socket={}", sock.display())).unwrap()
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

    // A write, a flush and a read back, parsed by the reader the target uses.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let reqs = [
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
        RequestHeader {
            flags: 0,
            cmd: Cmd::Read,
            handle: 2,
            offset: 8192,
            len: 4096,
        },
        RequestHeader {
            flags: 0,
            cmd: Cmd::Read,
            handle: 3,
            offset: 2 << 20,
            len: 512,
        },
    ];
    let mut reader = ReplyReader::new(4, false);
    for (i, r) in reqs.iter().enumerate() {
        assert!(reader.expect(i as u16, r));
        conn.stream.write_all(&r.encode()).unwrap();
        if r.cmd == Cmd::Write {
            conn.stream.write_all(&data).unwrap();
        }
    }
    let mut bufs = vec![vec![0u8; 4096]; 4];
    let mut results = [None; 4];
    while reader.busy() {
        let n = match reader.want() {
            Want::Header | Want::Discard(_) => conn.stream.read(reader.header_buf()).unwrap(),
            Want::Data { tag, at, len } => {
                let b = &mut bufs[usize::from(tag)][at as usize..(at + len) as usize];
                conn.stream.read(b).unwrap()
            }
            Want::Zero { .. } => unreachable!("no structured replies"),
        };
        assert!(n > 0, "the server closed the connection");
        if let Some(rep) = reader.advance(n).unwrap() {
            results[usize::from(rep.tag)] = Some(rep.result);
        }
    }
    assert_eq!(
        results,
        [Some(4096), Some(0), Some(4096), Some(-libc::EINVAL)]
    );
    assert_eq!(bufs[2], data);
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
