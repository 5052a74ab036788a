//! Helpers shared by the `ublk` command's kernel tests: running `ublk`
//! and shell commands, waiting, scratch images, device state, cleanup.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `ublk` binary. In the guest, a copy on /tmp: the host's target dir
/// comes over uncached 9p (every exec would read all of it again), and a
/// concurrent rebuild on the host must not change it under a running test.
pub fn bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let orig = env!("CARGO_BIN_EXE_ublk");
        if std::env::var_os("UBLK_RIG_KERNEL").is_none() {
            return orig.to_owned();
        }
        let dir = format!("/tmp/ublk-rel-bin-{}", std::process::id());
        let copy = format!("{dir}/ublk");
        let o = Command::new("sh")
            .args([
                "-c",
                &format!("mkdir -p {dir} && chmod 755 {dir} && cp {orig} {copy}.new && chmod 755 {copy}.new && mv {copy}.new {copy}"),
            ])
            .status()
            .expect("copy ublk");
        assert!(o.success(), "cannot copy {orig} to {copy}");
        copy
    })
}

pub fn ublk(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().expect("run ublk")
}

pub fn ok(args: &[&str]) -> String {
    succeeded(&format!("ublk {args:?}"), ublk(args))
}

/// Expects `o` (of the command `what`) to have succeeded; returns its stdout.
pub fn succeeded(what: &str, o: Output) -> String {
    assert!(
        o.status.success(),
        "{what} failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Expects `o` to have failed with one stderr line containing `needle`.
pub fn expect_fail(what: &str, o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{what} succeeded");
    assert!(
        err.contains(needle),
        "{what}: {err:?} does not mention {needle:?}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
}

pub fn fails(args: &[&str], needle: &str) {
    expect_fail(&format!("ublk {args:?}"), &ublk(args), needle);
}

pub fn sh_out(cmd: &str) -> Output {
    Command::new("sh").args(["-c", cmd]).output().expect("sh")
}

pub fn sh(cmd: &str) -> String {
    let o = sh_out(cmd);
    assert!(
        o.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn spawn_sh(cmd: &str) -> Child {
    Command::new("sh")
        .args(["-c", cmd])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sh")
}

/// What the processes named `name` are blocked on (for hang reports).
pub fn stacks(name: &str) -> String {
    sh_out(&format!(
        "for p in $(pgrep {name}); do echo \"pid $p: $(tr '\\0' ' ' < /proc/$p/cmdline)\"; \
         for t in /proc/$p/task/*; do cat $t/stack; done; done 2>&1; ls /dev/ublk* 2>&1"
    ))
    .stdout
    .iter()
    .map(|&b| b as char)
    .collect()
}

/// Waits at most `secs` for `child`; kills it and panics on a timeout.
/// Returns whether it succeeded, its stdout and its stderr.
pub fn wait_child(what: &str, child: &mut Child, secs: u64) -> (bool, String, String) {
    let end = Instant::now() + Duration::from_secs(secs);
    // Drain the pipes as we go, so a chatty child cannot block on them.
    let drain = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = p {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (
                st.success(),
                out.join().unwrap_or_default(),
                err.join().unwrap_or_default(),
            );
        }
        if Instant::now() > end {
            println!("{what} hangs:\n{}{}", stacks("fio"), stacks("ublk"));
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn ublk_nodes() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/dev")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("ublkb") || n.starts_with("ublkc"))
        .collect();
    v.sort();
    v
}

pub fn state_files() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/run/ublk")
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.ends_with(".json"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Pids of `ublk __daemon` processes.
pub fn daemons() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let zombie = stat.rsplit(')').next()?.trim_start().starts_with('Z');
            (!zombie && cmd.split(|&b| b == 0).any(|a| a == b"__daemon")).then_some(pid)
        })
        .collect()
}

pub fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a Unix socket listens at `path`. A server binds (which makes
/// the file) a moment before it listens; a client in between is refused.
/// `/proc/net/unix` marks a listening socket with `__SO_ACCEPTCON` in its
/// flags column.
pub fn unix_socket_listening(path: &std::path::Path) -> bool {
    const SO_ACCEPTCON: u32 = 1 << 16;
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let cols: Vec<&str> = line.split_whitespace().collect();
        cols.get(7).is_some_and(|p| std::path::Path::new(p) == path)
            && u32::from_str_radix(cols[3], 16).is_ok_and(|f| f & SO_ACCEPTCON != 0)
    })
}

pub fn scratch() -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/ublk-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A scratch file under /tmp (ext4 on a virtio disk in the guest).
pub fn image(name: &str, size: &str) -> PathBuf {
    let p = scratch().join(name);
    sh(&format!("rm -f {0} && truncate -s {size} {0}", p.display()));
    p
}

/// Creates the image `name` of `size` in the scratch directory and adds a
/// loop device on it with `opts`; returns the image and the device id.
pub fn add_loop(name: &str, size: &str, opts: &[&str]) -> (PathBuf, u32) {
    let img = image(name, size);
    let mut args = vec!["add", "-t", "loop"];
    args.extend_from_slice(opts);
    args.push(img.to_str().unwrap());
    let id = first_id(&ok(&args));
    (img, id)
}

pub fn first_id(list_out: &str) -> u32 {
    list_out
        .lines()
        .find_map(|l| l.strip_prefix("dev id ")?.split(':').next()?.parse().ok())
        .expect("dev id line")
}

pub fn json(id: u32) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["list", "-n", &id.to_string(), "--json"])).expect("list --json");
    v[0].clone()
}

pub fn dev_state(id: u32) -> String {
    json(id)["state"].as_str().unwrap_or_default().to_owned()
}

pub fn daemon_pid(id: u32) -> i32 {
    json(id)["daemon_pid"].as_i64().unwrap() as i32
}

pub fn wait_state(id: u32, want: &str, secs: u64) {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let last = dev_state(id);
        if last == want {
            return;
        }
        assert!(
            Instant::now() < end,
            "device {id}: state {last}, wanted {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until fio (or anyone) has completed `n` more requests on device
/// `id` and has some in flight: the load is really on.
pub fn wait_busy(id: u32, n: u64) {
    let read = |f: &str| -> Vec<u64> {
        std::fs::read_to_string(format!("/sys/block/ublkb{id}/{f}"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect()
    };
    let done = || {
        let s = read("stat");
        s.first().copied().unwrap_or(0) + s.get(4).copied().unwrap_or(0)
    };
    let start = done();
    wait_until("the load to start", 60, || {
        done() >= start + n && read("inflight").iter().sum::<u64>() > 0
    });
}

pub fn kill(pid: i32, sig: &str) {
    sh(&format!("kill -{sig} {pid}"));
}

/// Kills the device's daemon with SIGKILL and waits until it is gone.
pub fn kill9(id: u32) {
    let pid = daemon_pid(id);
    assert!(pid > 0, "device {id} has no daemon");
    kill(pid, "KILL");
    wait_until("the killed daemon to go", 20, || !daemons().contains(&pid));
}

pub fn recover(id: u32) -> Duration {
    let t = Instant::now();
    ok(&["recover", "-n", &id.to_string(), "--quiet"]);
    let d = t.elapsed();
    assert_eq!(dev_state(id), "LIVE");
    d
}

/// A small pseudo-random number (no dependency): from the clock.
pub fn jitter_ms(lo: u64, hi: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    lo + (n.wrapping_mul(6364136223846793005) >> 33) % (hi - lo + 1)
}

/// fio's JSON output: (jobs that ended with an error, KiB read + written).
pub fn fio_result(out: &str) -> Option<(u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{')?..]).ok()?;
    let mut errors = 0;
    let mut kb = 0;
    for j in v["jobs"].as_array()? {
        errors += u64::from(j["error"].as_u64().unwrap_or(1) != 0);
        kb += j["read"]["io_kbytes"].as_u64().unwrap_or(0)
            + j["write"]["io_kbytes"].as_u64().unwrap_or(0);
    }
    Some((errors, kb))
}

/// Deletes every ublk device when a test ends, passed or failed.
pub struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .args(["-c", "umount /tmp/mnt-* 2>/dev/null; true"])
            .status();
        let _ = ublk(&["del", "-a"]);
        // A program that opens a vanished /dev/ublkbN with O_CREAT makes
        // a regular file there, which would shadow the next device's node.
        let _ = Command::new("sh")
            .args([
                "-c",
                "find /dev -maxdepth 1 -name 'ublk[bc]*' -type f -delete",
            ])
            .status();
    }
}

pub fn guest_kernel() -> String {
    std::env::var("UBLK_RIG_KERNEL").unwrap_or_default()
}

pub fn has_feature(name: &str) -> bool {
    ok(&["features"]).lines().any(|l| l.trim() == name)
}

pub fn skip(test: &str, feature: &str) -> bool {
    if has_feature(feature) {
        return false;
    }
    println!(
        "SKIP: {test} on {}: the kernel lacks {feature}",
        guest_kernel()
    );
    true
}

/// fio random 8k writes, then a verify pass over them; `extra` gives the
/// size, depth and rate.
pub fn fio_verify_cmd(dev: &str, extra: &str) -> String {
    format!(
        "fio --allow_file_create=0 --name=v --filename={dev} --direct=1 --ioengine=io_uring \
         --rw=randwrite --bs=8k --verify=crc32c --do_verify=1 --verify_fatal=1 {extra} \
         --output-format=json"
    )
}
