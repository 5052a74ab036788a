//! `ublk add -t nbd` against real NBD servers in the guest — `nbdkit
//! memory`, `qemu-nbd` serving a raw file and a qcow2 image — and against
//! fake ones that misbehave: fio verification in every copy mode, a file
//! system, a server killed and restarted under load, bad input. Run in
//! the guest by `cargo xtask test`.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

mod common;
use common::*;

/// A server process, killed (and waited for) on drop.
struct Server {
    child: Child,
    sock: PathBuf,
}

impl Server {
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Whether `tool` runs; prints a SKIP line naming the test if not.
fn have(tool: &str, test: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        println!("SKIP: {test}: {tool} is not installed");
    }
    found
}

/// Starts `tool args` serving on the Unix socket `sock` and waits for it.
fn serve(tool: &str, args: &[&str], sock: &Path) -> Server {
    let _ = std::fs::remove_file(sock);
    let child = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {tool}: {e}"));
    let s = Server {
        child,
        sock: sock.to_owned(),
    };
    wait_until(
        &format!("{tool} to listen on {}", sock.display()),
        60,
        || unix_socket_listening(sock),
    );
    s
}

fn nbdkit_memory(sock: &Path, size: &str) -> Server {
    serve(
        "nbdkit",
        &["-f", "-U", sock.to_str().unwrap(), "memory", size],
        sock,
    )
}

/// qemu-nbd serving `img` (of `format`) as export `disk` to up to 8
/// clients, and staying up when they go.
fn qemu_nbd(sock: &Path, img: &Path, format: &str) -> Server {
    serve(
        "qemu-nbd",
        &[
            "-k",
            sock.to_str().unwrap(),
            "-x",
            "disk",
            "-f",
            format,
            "--cache=writeback",
            "-e",
            "8",
            "--persistent",
            img.to_str().unwrap(),
        ],
        sock,
    )
}

fn uri(export: &str, sock: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn fio_verify(dev: &str, io_size: &str) {
    sh(&format!(
        "fio --name=v --filename={dev} --direct=1 --ioengine=io_uring --rw=randwrite --bsrange=4k-256k \
         --iodepth=32 --size=64M --io_size={io_size} --verify=crc32c --verify_fatal=1 --do_verify=1 \
         --output-format=terse --terse-version=3 | awk -F';' '{{ if ($5 != 0) exit 1 }}'"
    ));
}

/// The copy modes the kernel has, as `add` options.
fn copy_modes() -> Vec<&'static [&'static str]> {
    let all: &[(&[&str], &str)] = &[
        (&[], ""),
        (&["-u"], "UBLK_F_USER_COPY"),
        (&["-z"], "UBLK_F_SUPPORT_ZERO_COPY"),
        (&["--auto_zc"], "UBLK_F_AUTO_BUF_REG"),
        (&["-g"], "UBLK_F_NEED_GET_DATA"),
        (&["-b"], "UBLK_F_BATCH_IO"),
    ];
    all.iter()
        .filter(|(_, f)| {
            let has = f.is_empty() || has_feature(f);
            if !has {
                println!("note: the kernel lacks {f}: that copy mode is not tested");
            }
            has
        })
        .map(|(o, _)| *o)
        .collect()
}

fn add_nbd(target: &str, opts: &[&str]) -> u32 {
    let mut args = vec!["add", "-t", "nbd"];
    args.extend_from_slice(opts);
    args.push(target);
    first_id(&ok(&args))
}

/// Every copy mode with 2 queues (nbdkit allows several connections),
/// and the default mode with one.
#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn nbdkit_memory_fio_verify_every_copy_mode() {
    if !have("nbdkit", "nbdkit_memory_fio_verify") {
        return;
    }
    let _cleanup = Cleanup;
    let sock = scratch().join("nbdkit.sock");
    let _server = nbdkit_memory(&sock, "256M");
    let runs = copy_modes()
        .into_iter()
        .map(|m| (m, "2"))
        .chain([(&[][..], "1")]);
    for (mode, queues) in runs {
        let mut opts = vec!["-q", queues];
        opts.extend_from_slice(mode);
        let id = add_nbd(&uri("", &sock), &opts);
        let j = json(id);
        assert_eq!(
            j["nr_hw_queues"].as_u64(),
            Some(queues.parse().unwrap()),
            "nbdkit allows multi-conn: {j}"
        );
        assert_eq!(j["nbd"]["state"], "connected", "{j}");
        println!("fio verify on nbdkit memory with {mode:?}, {queues} queue(s)");
        fio_verify(&format!("/dev/ublkb{id}"), "4M");
        ok(&["del", "-n", &id.to_string()]);
    }
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

/// mkfs.xfs, mount, copy, remount, checksums, xfs_repair -n on `dev`.
fn xfs_round_trip(dev: &str, mnt: &str) {
    sh(&format!(
        "mkfs.xfs -q -f {dev} && mkdir -p {mnt} && mount {dev} {mnt}"
    ));
    sh(&format!("cp -a /usr/share/doc/fio {mnt}/ && dd if=/dev/urandom of={mnt}/blob bs=1M count=8 status=none && sync"));
    let sums = format!("cd {mnt} && find . -type f -print0 | sort -z | xargs -0 sha256sum");
    let before = sh(&sums);
    sh(&format!("umount {mnt} && mount {dev} {mnt}"));
    assert_eq!(sh(&sums), before);
    sh(&format!("umount {mnt} && xfs_repair -n {dev}"));
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn qemu_nbd_raw_and_qcow2_fio_verify_and_xfs() {
    if !have("qemu-nbd", "qemu_nbd_raw_and_qcow2") || !have("qemu-img", "qemu_nbd_raw_and_qcow2") {
        return;
    }
    let _cleanup = Cleanup;
    for format in ["raw", "qcow2"] {
        let img = scratch().join(format!("disk.{format}"));
        sh(&format!(
            "rm -f {0} && qemu-img create -q -f {format} {0} 512M",
            img.display()
        ));
        let sock = scratch().join(format!("qemu-{format}.sock"));
        let _server = qemu_nbd(&sock, &img, format);
        // raw: every copy mode, one queue, and two; qcow2: the default
        // and zero copy, two queues.
        let modes = copy_modes();
        let runs: Vec<(&[&str], &str)> = match format {
            "raw" => modes
                .iter()
                .map(|m| (*m, "1"))
                .chain([(&[][..], "2")])
                .collect(),
            _ => modes
                .iter()
                .filter(|m| m.is_empty() || **m == ["-z"])
                .map(|m| (*m, "2"))
                .collect(),
        };
        for (mode, queues) in runs {
            {
                let mut args = vec!["add", "-t", "nbd", "-q", queues];
                args.extend_from_slice(mode);
                let target = uri("disk", &sock);
                args.push(&target);
                let o = ublk(&args);
                let err = String::from_utf8_lossy(&o.stderr).into_owned();
                let id = first_id(&succeeded(&format!("{args:?}"), o));
                let got = json(id)["nr_hw_queues"].as_u64().unwrap();
                // One queue unless the server allows several connections,
                // and then add says so.
                assert!(
                    got == 2 || (got == 1 && (queues == "1" || err.contains("using one queue"))),
                    "{err}"
                );
                println!("fio verify on qemu-nbd {format} with {mode:?}, {queues} queue(s) ({got} served)");
                fio_verify(&format!("/dev/ublkb{id}"), "4M");
                ok(&["del", "-n", &id.to_string()]);
            }
        }
        let id = add_nbd(&uri("disk", &sock), &[]);
        xfs_round_trip(&format!("/dev/ublkb{id}"), "/tmp/mnt-nbd");
        ok(&["del", "-n", &id.to_string()]);
    }
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn tcp_transport_and_list() {
    if !have("nbdkit", "tcp_transport_and_list") {
        return;
    }
    let _cleanup = Cleanup;
    // nbdkit on a loopback port of its choosing, told through a pid file
    // once listening.
    let dir = scratch();
    let pidfile = dir.join("nbdkit-tcp.pid");
    let _ = std::fs::remove_file(&pidfile);
    let port = 10900 + (std::process::id() % 50);
    let child = Command::new("nbdkit")
        .args([
            "-f",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-P",
            pidfile.to_str().unwrap(),
            "memory",
            "64M",
        ])
        .spawn()
        .expect("nbdkit");
    let _server = Server {
        child,
        sock: pidfile.clone(),
    };
    wait_until("nbdkit to listen", 60, || pidfile.exists());
    let port_s = port.to_string();
    let id = first_id(&ok(&[
        "add",
        "-t",
        "nbd",
        "--host",
        "127.0.0.1",
        "--port",
        &port_s,
        "--export_name",
        "x",
    ]));
    let list = ok(&["list", "-n", &id.to_string()]);
    assert!(
        list.contains(&format!("\ttarget nbd server nbd://127.0.0.1:{port}/x size 67108864 state connected disconnects 0 reconnects 0")),
        "{list}"
    );
    let j = json(id);
    assert_eq!(j["nbd"]["server"], format!("nbd://127.0.0.1:{port}/x"));
    fio_verify(&format!("/dev/ublkb{id}"), "4M");
    ok(&["del", "-n", &id.to_string()]);
}

fn nbd_status(id: u32) -> (String, u64, u64) {
    let j = json(id);
    (
        j["nbd"]["state"].as_str().unwrap_or_default().to_owned(),
        j["nbd"]["disconnects"].as_u64().unwrap_or(0),
        j["nbd"]["reconnects"].as_u64().unwrap_or(0),
    )
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn server_killed_and_restarted_under_fio_with_recovery() {
    if !have("qemu-nbd", "server_killed_and_restarted") {
        return;
    }
    let _cleanup = Cleanup;
    let img = image("restart.img", "256M");
    let sock = scratch().join("restart.sock");
    let mut server = qemu_nbd(&sock, &img, "raw");
    let id = add_nbd(
        &uri("disk", &sock),
        &["-r", "1", "--reconnect_timeout", "120"],
    );
    let dev = format!("/dev/ublkb{id}");
    let mut fio = spawn_sh(&fio_verify_cmd(
        &dev,
        "--size=64M --io_size=32M --iodepth=16",
    ));
    wait_busy(id, 50);
    server.kill();
    wait_until("the lost connection to show in list", 60, || {
        nbd_status(id).1 >= 1
    });
    assert_eq!(
        dev_state(id),
        "LIVE",
        "the device stays while the server is away"
    );
    let _server = qemu_nbd(&sock, &img, "raw");
    let (done, out, err) = wait_child("fio", &mut fio, 900);
    assert!(done, "fio did not finish");
    assert_eq!(fio_result(&out).map(|r| r.0), Some(0), "fio: {out}\n{err}");
    let (state, disconnects, reconnects) = nbd_status(id);
    assert_eq!(state, "connected");
    assert!(
        disconnects >= 1 && reconnects >= 1,
        "{disconnects} {reconnects}"
    );
    let list = ok(&["list", "-n", &id.to_string()]);
    assert!(
        list.contains("state connected disconnects") && !list.contains("reconnects 0"),
        "{list}"
    );
    ok(&["del", "-n", &id.to_string()]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn server_killed_without_recovery_fails_io_and_deletes() {
    if !have("nbdkit", "server_killed_without_recovery") {
        return;
    }
    let _cleanup = Cleanup;
    let sock = scratch().join("norecovery.sock");
    let mut server = nbdkit_memory(&sock, "64M");
    let id = add_nbd(&uri("", &sock), &[]);
    let dev = format!("/dev/ublkb{id}");
    sh(&format!(
        "dd if=/dev/urandom of={dev} bs=64k count=16 oflag=direct status=none"
    ));
    server.kill();
    let o = sh_out(&format!(
        "dd if={dev} of=/dev/null bs=64k count=16 iflag=direct status=none"
    ));
    assert!(!o.status.success(), "reads after the server went must fail");
    wait_until("list to say failed", 30, || nbd_status(id).0 == "failed");
    ok(&["del", "-n", &id.to_string()]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

/// A fake NBD server on `sock`, for one connection: sends the greeting
/// (the first 18 bytes of `script`), reads `read_first` bytes, sends the
/// rest, then hangs up as `close` says.
fn fake_server(
    sock: &Path,
    script: Vec<u8>,
    read_first: usize,
    close: Close,
) -> std::thread::JoinHandle<()> {
    let _ = std::fs::remove_file(sock);
    let l = UnixListener::bind(sock).unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut skip = vec![0u8; read_first];
            let _ = s.write_all(&script[..18.min(script.len())]);
            let _ = s.read_exact(&mut skip);
            let _ = s.write_all(&script[18.min(script.len())..]);
            if close == Close::AfterClient {
                let _ = std::io::copy(&mut s, &mut std::io::sink());
            }
        }
    })
}

/// When a [`fake_server`] hangs up once it has sent its script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    /// At once: the client meets the closed connection.
    AtOnce,
    /// Once the client has: closing first while the client still sends
    /// (its option after the flags the server read) could fail that send
    /// (EPIPE) before the client reads the reply under test.
    AfterClient,
}

fn greeting() -> Vec<u8> {
    let mut v = b"NBDMAGIC".to_vec();
    v.extend_from_slice(b"IHAVEOPT");
    v.extend_from_slice(&3u16.to_be_bytes());
    v
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn bad_servers_are_one_line_and_leave_no_device() {
    let _cleanup = Cleanup;
    let check = |args: &[&str], needle: &str| {
        let o = ublk(args);
        expect_fail(&format!("{args:?}"), &o, needle);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            ublk_nodes().is_empty(),
            "{args:?} left a device: {:?}",
            ublk_nodes()
        );
    };
    // Nothing listens there.
    check(
        &["add", "-t", "nbd", "nbd://127.0.0.1:1/x"],
        "NBD server nbd://127.0.0.1:1/x: connecting:",
    );
    let dir = scratch();
    check(
        &["add", "-t", "nbd", &uri("x", &dir.join("nobody.sock"))],
        "connecting",
    );
    // A refused export name.
    if have("qemu-nbd", "refused export") {
        let img = image("refused.img", "16M");
        let sock = dir.join("refused.sock");
        let _server = qemu_nbd(&sock, &img, "raw");
        check(
            &["add", "-t", "nbd", &uri("nope", &sock)],
            "export \"nope\": no such export",
        );
    }
    // A server that closes mid-handshake.
    let sock = dir.join("fake.sock");
    let t = fake_server(&sock, greeting(), 0, Close::AtOnce);
    check(
        &["add", "-t", "nbd", &uri("x", &sock)],
        "closed the connection during the handshake",
    );
    t.join().unwrap();
    // A malformed option reply: the right magic, then a reply to another option.
    let mut script = greeting();
    script.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
    script.extend_from_slice(&99u32.to_be_bytes());
    script.extend_from_slice(&1u32.to_be_bytes());
    script.extend_from_slice(&0u32.to_be_bytes());
    let t = fake_server(&sock, script, 4, Close::AfterClient);
    check(
        &["add", "-t", "nbd", &uri("x", &sock)],
        "protocol error: reply to option 99",
    );
    t.join().unwrap();
    // Not an NBD server at all.
    let t = fake_server(
        &sock,
        b"SSH-2.0-OpenSSH_9.2\r\n\0\0\0\0\0\0\0\0".to_vec(),
        0,
        Close::AtOnce,
    );
    check(
        &["add", "-t", "nbd", &uri("x", &sock)],
        "protocol error: bad greeting magic",
    );
    t.join().unwrap();
}

/// A malformed reply in transmission: the request fails, the daemon logs
/// why, and the device can be deleted.
#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn a_malformed_reply_fails_the_request_not_the_daemon() {
    let _cleanup = Cleanup;
    let sock = scratch().join("garbage.sock");
    let _ = std::fs::remove_file(&sock);
    let l = UnixListener::bind(&sock).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(&greeting()).unwrap();
        let mut buf = [0u8; 4096];
        // Client flags, then options: NBD_OPT_STRUCTURED_REPLY is declined
        // (simple replies, then), NBD_OPT_GO answered with the export
        // (1 MiB, no multi-conn, no partition scan worth doing) and ACK.
        let reply = |opt: u32, kind: u32, data: &[u8]| {
            let mut v = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
            v.extend_from_slice(&opt.to_be_bytes());
            v.extend_from_slice(&kind.to_be_bytes());
            v.extend_from_slice(&(data.len() as u32).to_be_bytes());
            v.extend_from_slice(data);
            v
        };
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        loop {
            let mut opt = [0u8; 16];
            s.read_exact(&mut opt).unwrap();
            let code = u32::from_be_bytes(opt[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(opt[12..16].try_into().unwrap()) as usize;
            s.read_exact(&mut buf[..len]).unwrap();
            if code != 7 {
                // NBD_REP_ERR_UNSUP.
                s.write_all(&reply(code, 0x8000_0001, &[])).unwrap();
                continue;
            }
            let mut info = 0u16.to_be_bytes().to_vec();
            info.extend_from_slice(&(1u64 << 20).to_be_bytes());
            info.extend_from_slice(&1u16.to_be_bytes());
            s.write_all(&reply(7, 3, &info)).unwrap();
            s.write_all(&reply(7, 1, &[])).unwrap();
            break;
        }
        // Every request gets a reply with a bad magic.
        while s.read(&mut buf).is_ok_and(|n| n > 0) {
            let _ = s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        }
    });
    // Without the partition scan where the kernel can skip it; where it
    // cannot (Linux 6.12), the scan's read is the one that meets the
    // malformed reply, and the dd below fails as the device has.
    let opts: &[&str] = if has_feature("UBLK_F_NO_AUTO_PART_SCAN") {
        &["--no_auto_part_scan"]
    } else {
        &[]
    };
    let id = add_nbd(&uri("", &sock), opts);
    let o = sh_out(&format!(
        "dd if=/dev/ublkb{id} of=/dev/null bs=4k count=1 iflag=direct status=none"
    ));
    assert!(
        !o.status.success(),
        "a read with a malformed reply must fail"
    );
    // The state file follows the connection every 250 ms.
    wait_until("the connection to be reported failed", 10, || {
        nbd_status(id).0 == "failed"
    });
    let log = std::fs::read_to_string("/run/ublk/daemon.log").unwrap_or_default();
    assert!(log.contains("bad reply magic 0xdeadbeef"), "{log}");
    ok(&["del", "-n", &id.to_string()]);
    t.join().unwrap();
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

/// From Linux 7.2 a receive goes into a registered buffer (read data in
/// the zero-copy modes: one `MSG_WAITALL` receive); before, the target
/// reads such data piece by piece with `READ_FIXED`. The probe must say
/// which: the fio runs above pass either way.
#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn receive_into_registered_buffers_from_linux_7_2() {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut nums = release.split(|c: char| !c.is_ascii_digit());
    let version: (u32, u32) = (
        nums.next().unwrap().parse().unwrap(),
        nums.next().unwrap().parse().unwrap(),
    );
    assert_eq!(
        ublk::targets::nbd::recv_into_registered_buffers(),
        version >= (7, 2),
        "Linux {}",
        release.trim()
    );
}
