//! fio benchmarks of the `ublk` server against the kernel's own drivers.
//!
//! Runs only under `cargo bench` (or `cargo xtask bench`, which runs it in a
//! guest) on a machine with `/dev/ublk-control`; anywhere else, and under
//! `cargo test --benches`, it prints a note and does nothing.
//!
//! For each target (`null`, `loop`) and queue count (1, 2) it adds one
//! `ublk` device per copy mode (`target/release/ublk add … --quiet`, the id
//! and daemon pid from `ublk list --json`) and the baseline (kernel
//! `null_blk`, or kernel `loop` with `--direct-io=on` on the same backing
//! file), then runs each fio job (`--ioengine=io_uring --direct=1`) on each
//! of them. Per job and device, one calibration run picks a fixed number of
//! I/Os (`--number_ios`) worth about `UBLK_BENCH_RUN_SECS` of fio time; one
//! criterion iteration is one fio run of that many I/Os, timed by fio's own
//! measured run time (fio's start-up is not counted), and
//! `Throughput::Elements` makes criterion show IOPS. Benchmark ids are
//! `TARGET/JOB/VARIANT`, e.g. `null/randread-4k-qd32-q1/ublk-default` or
//! `null/randread-4k-qd32-q1/null_blk`; pass a regular expression
//! (criterion's filter) to run a subset, `--list` to see them all.
//! Variants whose `ublk add` fails (e.g. a copy mode the kernel lacks, or
//! `-b` where batch I/O is refused) are skipped with a printed note.
//!
//! After criterion's samples of a job, `UBLK_BENCH_ROUNDS` rounds of one run
//! per variant in turn give the table: IOPS, ratio to the baseline (median
//! of the per-round ratios, so a slow-down of the emulated, shared machine
//! hits both sides), fio's p99 completion latency, the daemon's CPU time per
//! I/O (utime+stime from `/proc/PID/stat` around each run) and its RSS. It
//! goes to `target/bench-report.md` and `target/bench-results.json`.
//!
//! Environment: `UBLK_BENCH_SAMPLES` (criterion samples, at least 10;
//! default 10), `UBLK_BENCH_RUN_SECS` (fio time of one run; default 0.5),
//! `UBLK_BENCH_ROUNDS` (table rounds; default 3), `UBLK_BENCH_SCALE`
//! (multiplies the calibration runs' I/Os; default 1), `UBLK_BENCH_LOOP_MB`
//! (backing file size, default 1024), `UBLK_BIN` (the `ublk` binary;
//! default: `ublk` next to the bench's `deps/` directory, i.e.
//! `target/release/ublk`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use serde_json::Value;

/// Where the loop target's (and kernel loop's) backing file lives.
const BACKING: &str = "/tmp/ublk-bench.img";
/// Queue depth of every device (ours and null_blk's `hw_queue_depth`).
const DEVICE_DEPTH: u32 = 128;
/// The Unix socket of the NBD server (`nbdkit memory`) that both our nbd
/// target and the kernel's NBD client (`nbd-client`) connect to.
const NBD_SOCKET: &str = "/tmp/ublk-bench-nbd.sock";

/// Which of our targets (and which baseline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Loop,
    Nbd,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Loop => "loop",
            Kind::Nbd => "nbd",
        }
    }

    /// The baseline's variant name.
    fn baseline(self) -> &'static str {
        match self {
            Kind::Null => "null_blk",
            Kind::Loop => "kernel_loop",
            Kind::Nbd => "kernel_nbd",
        }
    }

    /// The kind of a benchmark group (`null/…`, `loop/…`, `nbd/…`).
    fn of_group(group: &str) -> Kind {
        match group.split('/').next() {
            Some("null") => Kind::Null,
            Some("nbd") => Kind::Nbd,
            _ => Kind::Loop,
        }
    }
}

/// Which ublk server serves a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Server {
    /// This project's `ublk`.
    Ours,
    /// The kernel selftests' reference server (`UBLK_BENCH_KUBLK`).
    Kublk,
    /// rublk, on libublk (`UBLK_BENCH_RUBLK`).
    Rublk,
}

impl Server {
    /// The variant-name prefix.
    fn prefix(self) -> &'static str {
        match self {
            Server::Ours => "ublk",
            Server::Kublk => "kublk",
            Server::Rublk => "rublk",
        }
    }

    /// The server's binary, if it is there.
    fn bin(self) -> Option<PathBuf> {
        match self {
            Server::Ours => Some(ublk_bin()),
            Server::Kublk => std::env::var_os("UBLK_BENCH_KUBLK").map(PathBuf::from),
            Server::Rublk => std::env::var_os("UBLK_BENCH_RUBLK").map(PathBuf::from),
        }
        .filter(|p| p.exists())
    }
}

/// A server with a copy mode: the `add` options selecting it.
#[derive(Debug, Clone, Copy)]
struct Variant {
    server: Server,
    /// `default`, `zero_copy`, `auto_zc`, …
    mode: &'static str,
    opts: &'static [&'static str],
}

impl Variant {
    fn name(&self) -> String {
        format!("{}-{}", self.server.prefix(), self.mode)
    }
}

/// Every ublk variant: our copy modes, then the peers' (each server's
/// default copy mode and its zero-copy ones).
const VARIANTS: [Variant; 10] = [
    Variant {
        server: Server::Ours,
        mode: "default",
        opts: &[],
    },
    Variant {
        server: Server::Ours,
        mode: "user_copy",
        opts: &["-u"],
    },
    Variant {
        server: Server::Ours,
        mode: "zero_copy",
        opts: &["-z"],
    },
    Variant {
        server: Server::Ours,
        mode: "auto_zc",
        opts: &["--auto_zc"],
    },
    Variant {
        server: Server::Ours,
        mode: "batch",
        opts: &["-b"],
    },
    Variant {
        server: Server::Kublk,
        mode: "default",
        opts: &[],
    },
    Variant {
        server: Server::Kublk,
        mode: "zero_copy",
        opts: &["-z"],
    },
    Variant {
        server: Server::Kublk,
        mode: "auto_zc",
        opts: &["--auto_zc"],
    },
    Variant {
        server: Server::Rublk,
        mode: "default",
        opts: &[],
    },
    Variant {
        server: Server::Rublk,
        mode: "zero_copy",
        opts: &["-z"],
    },
];

/// One fio job.
#[derive(Debug, Clone)]
struct Job {
    /// e.g. `randread-4k-qd32-q1`.
    name: String,
    rw: &'static str,
    bs: u64,
    /// `--iodepth` of each fio job.
    qd: u32,
    /// Device queues, and fio jobs (`--numjobs`, one per queue).
    queues: u32,
    /// I/Os of the calibration run (all jobs together).
    ios: u64,
}

/// A positive number from the environment, or `default`.
fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(default)
}

fn scale() -> f64 {
    env_f64("UBLK_BENCH_SCALE", 1.0)
}

fn loop_mb() -> u64 {
    env_f64("UBLK_BENCH_LOOP_MB", 1024.0) as u64
}

impl Job {
    /// Most I/Os of one run: sequential jobs stay inside the device.
    fn max_ios(&self, kind: Kind) -> u64 {
        if self.rw.starts_with("rand") {
            return u64::MAX;
        }
        let size = match kind {
            Kind::Null => 250 << 30,
            Kind::Loop | Kind::Nbd => loop_mb() << 20,
        };
        (size / self.bs).max(1)
    }
}

/// The matrix: 4k random reads and writes at depth 1, 32, 128 on 1 and 2
/// queues; 128k and 1M sequential reads and writes at depth 8 on 1 queue.
fn jobs() -> Vec<Job> {
    let s = scale();
    let n = |base: u64| ((base as f64 * s) as u64).max(16);
    let mut v = Vec::new();
    for queues in [1, 2] {
        for rw in ["randread", "randwrite"] {
            for qd in [1, 32, 128] {
                v.push(Job {
                    name: format!("{rw}-4k-qd{qd}-q{queues}"),
                    rw,
                    bs: 4096,
                    qd,
                    queues,
                    ios: n(if qd == 1 { 1000 } else { 4000 }) / u64::from(queues)
                        * u64::from(queues),
                });
            }
        }
    }
    for (bs, label, base) in [(128 << 10, "128k", 800), (1 << 20, "1m", 200)] {
        for rw in ["read", "write"] {
            v.push(Job {
                name: format!("{rw}-{label}-qd8-q1"),
                rw,
                bs,
                qd: 8,
                queues: 1,
                ios: n(base),
            });
        }
    }
    v
}

/// criterion's filter from the command line (the first positional argument).
#[derive(Debug)]
struct Filter {
    re: Option<regex::Regex>,
    exact: Option<String>,
}

impl Filter {
    fn from_args(args: &[String]) -> Self {
        // criterion options that take a value.
        const WITH_VALUE: &[&str] = &[
            "-c",
            "--color",
            "-s",
            "--save-baseline",
            "-b",
            "--baseline",
            "--load-baseline",
            "--format",
            "--profile-time",
            "--sample-size",
            "--warm-up-time",
            "--measurement-time",
            "--nresamples",
            "--noise-threshold",
            "--confidence-level",
            "--significance-level",
            "--plotting-backend",
            "--output-format",
            "--logfile",
        ];
        let exact = args.iter().any(|a| a == "--exact");
        let mut it = args.iter().skip(1);
        let mut filter = None;
        while let Some(a) = it.next() {
            if WITH_VALUE.contains(&a.as_str()) {
                it.next();
            } else if !a.starts_with('-') {
                filter = Some(a.clone());
                break;
            }
        }
        match filter {
            None => Self {
                re: None,
                exact: None,
            },
            Some(f) if exact => Self {
                re: None,
                exact: Some(f),
            },
            Some(f) => Self {
                re: Some(regex::Regex::new(&f).unwrap_or_else(|e| {
                    eprintln!("bad filter {f:?}: {e}");
                    std::process::exit(2)
                })),
                exact: None,
            },
        }
    }

    fn matches(&self, id: &str) -> bool {
        match (&self.re, &self.exact) {
            (Some(re), _) => re.is_match(id),
            (_, Some(e)) => e == id,
            _ => true,
        }
    }
}

/// A device a job runs on.
#[derive(Debug)]
struct Dev {
    /// `ublk-MODE`, `kublk-MODE`, `rublk-MODE` or the baseline's name.
    variant: String,
    path: PathBuf,
    /// The ublk server's daemon (none for the kernel's drivers).
    daemon_pid: Option<i32>,
    /// The ublk device id and the server that made it.
    ublk: Option<(u32, Server)>,
    /// The kernel loop device (detached on teardown).
    loop_dev: Option<String>,
    /// What the device runs with, read back from the kernel.
    settings: Settings,
}

/// A device's settings as the kernel reports them, so that the report can
/// show that every disk ran alike.
#[derive(Debug, Clone, Default)]
struct Settings {
    /// The `add` command line (without the binary's path).
    command: String,
    scheduler: String,
    /// Queues and depth (`nr_hw_queues`/`queue_depth` of a ublk device,
    /// the block layer's `nr_requests` otherwise).
    queues: u32,
    depth: u32,
    max_io_kib: u32,
    /// The ublk device flags (`UBLK_F_*`).
    flags: Option<u64>,
}
/// What one fio run measured.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    ios: u64,
    secs: f64,
    p99_ns: f64,
    cpu_ns: Option<f64>,
}

/// Everything measured of one benchmark.
#[derive(Debug, Default)]
struct Stats {
    runs: Vec<Run>,
    settings: Settings,
    rss_kib: Option<u64>,
    hwm_kib: Option<u64>,
}

impl Stats {
    fn iops(&self) -> f64 {
        let ios: u64 = self.runs.iter().map(|r| r.ios).sum();
        let secs: f64 = self.runs.iter().map(|r| r.secs).sum();
        if secs > 0.0 {
            ios as f64 / secs
        } else {
            0.0
        }
    }

    /// Median of the runs' p99 completion latencies, in µs.
    fn p99_us(&self) -> f64 {
        let mut v: Vec<f64> = self.runs.iter().map(|r| r.p99_ns).collect();
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(f64::total_cmp);
        v[v.len() / 2] / 1e3
    }

    /// Median over rounds of this run's IOPS / `base`'s in the same round.
    fn ratio_to(&self, base: &Stats) -> Option<f64> {
        median(
            self.runs
                .iter()
                .zip(&base.runs)
                .map(|(a, b)| (a.ios as f64 / a.secs) / (b.ios as f64 / b.secs))
                .collect(),
        )
    }

    fn cpu_us_per_io(&self) -> Option<f64> {
        let cpu: Option<f64> = self.runs.iter().map(|r| r.cpu_ns).sum();
        let ios: u64 = self.runs.iter().map(|r| r.ios).sum();
        cpu.filter(|_| ios > 0).map(|c| c / ios as f64 / 1e3)
    }
}

fn target_dir() -> PathBuf {
    // target/release/deps/fio-HASH → target
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .nth(3)
        .map_or_else(|| PathBuf::from("target"), Path::to_path_buf)
}

fn ublk_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("UBLK_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .nth(2)
        .map_or_else(|| PathBuf::from("ublk"), |d| d.join("ublk"))
}

/// Runs a command, returning stdout, or stderr as the error.
fn sh(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The ids of the ublk block devices there are.
fn ublk_ids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        e.ok()?
            .file_name()
            .to_str()?
            .strip_prefix("ublkb")?
            .parse()
            .ok()
    })
    .collect()
}

/// `ublk list --json -n ID` (any server's device: the kernel's own info).
fn ublk_info(id: u32) -> Option<Value> {
    let out = sh(Command::new(ublk_bin()).args(["list", "--json", "-n", &id.to_string()])).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    match v {
        Value::Array(mut a) if !a.is_empty() => Some(a.swap_remove(0)),
        Value::Object(_) => Some(v),
        _ => None,
    }
}

/// A sysfs attribute of a block device, trimmed.
fn sysfs(dev: &Path, attr: &str) -> String {
    let name = dev.file_name().and_then(|n| n.to_str()).unwrap_or("");
    std::fs::read_to_string(format!("/sys/block/{name}/{attr}"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The block layer's view of `dev`: the selected scheduler, largest I/O.
fn block_settings(dev: &Path, command: String) -> Settings {
    let sched = sysfs(dev, "queue/scheduler");
    // "[none] mq-deadline" → "none"
    let scheduler = sched
        .split_whitespace()
        .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
        .unwrap_or(&sched)
        .to_owned();
    Settings {
        command,
        scheduler,
        queues: std::fs::read_dir(format!(
            "/sys/block/{}/mq",
            dev.file_name().and_then(|n| n.to_str()).unwrap_or("")
        ))
        .map_or(0, |d| d.count() as u32),
        depth: sysfs(dev, "queue/nr_requests").parse().unwrap_or(0),
        max_io_kib: sysfs(dev, "queue/max_sectors_kb").parse().unwrap_or(0),
        flags: None,
    }
}

/// Adds a ublk device served by `v.server`: `add`, null or loop on the
/// bench's backing file, `-q QUEUES -d 128` and the variant's options;
/// then the I/O scheduler `none`, as on every disk of the bench.
fn add_ublk(kind: Kind, queues: u32, v: &Variant) -> Result<Dev, String> {
    let bin = v.server.bin().ok_or_else(|| {
        format!(
            "no {} binary (set UBLK_BENCH_{})",
            v.server.prefix(),
            v.server.prefix().to_uppercase()
        )
    })?;
    let before = ublk_ids();
    let (q, d) = (queues.to_string(), DEVICE_DEPTH.to_string());
    let mut args: Vec<&str> = vec!["add"];
    let nbd_uri = format!("nbd+unix:///?socket={NBD_SOCKET}");
    if kind == Kind::Nbd && v.server != Server::Ours {
        return Err(format!("{} has no nbd target", v.server.prefix()));
    }
    match v.server {
        Server::Ours => {
            args.extend(["-t", kind.name(), "-q", &q, "-d", &d]);
            args.extend(v.opts);
            args.push("--quiet");
            match kind {
                Kind::Loop => args.extend(["-f", BACKING]),
                Kind::Nbd => args.push(&nbd_uri),
                Kind::Null => {}
            }
        }
        // kublk takes backing files as operands after the options.
        Server::Kublk => {
            args.extend(["-t", kind.name(), "-q", &q, "-d", &d]);
            args.extend(v.opts);
            if kind == Kind::Loop {
                args.push(BACKING);
            }
        }
        // rublk: a subcommand per target.
        Server::Rublk => {
            args.extend([kind.name(), "-q", &q, "-d", &d]);
            args.extend(v.opts);
            if kind == Kind::Loop {
                args.extend(["-f", BACKING]);
            }
        }
    }
    let mut cmd = Command::new(&bin);
    cmd.args(&args);
    // kublk and rublk leave a daemon behind whose stdout must not hold
    // our pipe open.
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .status()
        .map_err(|e| format!("{}: {e}", bin.display()))?;
    if !out.success() {
        return Err(format!(
            "{} {} failed ({out})",
            v.server.prefix(),
            args.join(" ")
        ));
    }
    let t0 = Instant::now();
    let id = loop {
        if let Some(id) = ublk_ids().into_iter().find(|i| !before.contains(i)) {
            break id;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "{} add made no /sys/block/ublkbN",
                v.server.prefix()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let path = PathBuf::from(format!("/dev/ublkb{id}"));
    // Until the device is live its pid is 0 and its disk may be missing.
    let mut info = None;
    while t0.elapsed() < Duration::from_secs(30) {
        info = ublk_info(id);
        let live = info
            .as_ref()
            .is_some_and(|i| i["state"] == "LIVE" && i["daemon_pid"].as_i64().unwrap_or(0) > 0);
        if live && path.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let info = info.unwrap_or(Value::Null);
    let name = format!("ublkb{id}");
    if let Err(e) = std::fs::write(format!("/sys/block/{name}/queue/scheduler"), "none") {
        eprintln!("note: cannot set the scheduler of {name} to none: {e}");
    }
    let mut settings = block_settings(&path, format!("{} {}", v.server.prefix(), args.join(" ")));
    settings.queues = info["nr_hw_queues"].as_u64().unwrap_or(0) as u32;
    settings.depth = info["queue_depth"].as_u64().unwrap_or(0) as u32;
    settings.flags = info["flags"].as_u64();
    Ok(Dev {
        variant: v.name(),
        path,
        daemon_pid: info["daemon_pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok()),
        ublk: Some((id, v.server)),
        loop_dev: None,
        settings,
    })
}

/// Kernel null_blk with `queues` submit queues (reloads the module).
fn add_null_blk(queues: u32) -> Result<Dev, String> {
    let _ = sh(Command::new("rmmod").arg("null_blk"));
    sh(Command::new("modprobe").args([
        "null_blk",
        "queue_mode=2",
        "irqmode=0",
        "nr_devices=1",
        &format!("submit_queues={queues}"),
        &format!("hw_queue_depth={DEVICE_DEPTH}"),
        "gb=250",
    ]))?;
    let path = PathBuf::from("/dev/nullb0");
    let t0 = Instant::now();
    while !path.exists() && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let cmd = format!("modprobe null_blk queue_mode=2 irqmode=0 submit_queues={queues} hw_queue_depth={DEVICE_DEPTH}");
    Ok(Dev {
        variant: Kind::Null.baseline().into(),
        settings: block_settings(&path, cmd),
        path,
        daemon_pid: None,
        ublk: None,
        loop_dev: None,
    })
}

/// The NBD server both NBD clients use: `nbdkit memory` of the loop
/// file's size on [`NBD_SOCKET`], killed when dropped.
struct NbdServer(std::process::Child);

impl NbdServer {
    fn start() -> Result<Self, String> {
        let _ = std::fs::remove_file(NBD_SOCKET);
        let child = Command::new("nbdkit")
            .args(["--foreground", "--exit-with-parent", "-U", NBD_SOCKET])
            .args(["memory", &format!("size={}M", loop_mb())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("nbdkit: {e}"))?;
        let server = NbdServer(child);
        let t0 = Instant::now();
        while !Path::new(NBD_SOCKET).exists() {
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(format!("nbdkit made no socket {NBD_SOCKET}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(NBD_SOCKET);
    }
}

/// The kernel's NBD client (`nbd.ko` through `nbd-client`) on the bench's
/// NBD server: one connection per queue, 512-byte blocks like ours on
/// `nbdkit memory`, the scheduler `none` like every ublk disk.
fn add_kernel_nbd(queues: u32) -> Result<Dev, String> {
    sh(Command::new("modprobe").args(["nbd", "nbds_max=4"]))?;
    let path = PathBuf::from("/dev/nbd0");
    let c = queues.to_string();
    let args = ["-unix", NBD_SOCKET, "/dev/nbd0", "-b", "512", "-C", &c];
    sh(Command::new("nbd-client").args(args))?;
    let t0 = Instant::now();
    while sysfs(&path, "size").trim() == "0" && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Err(e) = std::fs::write("/sys/block/nbd0/queue/scheduler", "none") {
        eprintln!("note: cannot set the scheduler of nbd0 to none: {e}");
    }
    let mut settings = block_settings(&path, format!("nbd-client {}", args.join(" ")));
    settings.queues = std::fs::read_dir("/sys/block/nbd0/mq").map_or(0, |d| d.count() as u32);
    Ok(Dev {
        variant: Kind::Nbd.baseline().into(),
        settings,
        path,
        daemon_pid: None,
        ublk: None,
        loop_dev: None,
    })
}

/// Kernel loop with direct I/O on the backing file.
fn add_kernel_loop() -> Result<Dev, String> {
    let out = sh(Command::new("losetup").args(["--direct-io=on", "--find", "--show", BACKING]))?;
    let dev = out.trim().to_owned();
    let name = dev.trim_start_matches("/dev/");
    let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap_or_default();
    if dio.trim() != "1" {
        eprintln!("note: {dev} is not using direct I/O (sysfs dio = {dio:?})");
    }
    let path = PathBuf::from(&dev);
    Ok(Dev {
        variant: Kind::Loop.baseline().into(),
        settings: block_settings(&path, format!("losetup --direct-io=on {BACKING}")),
        path,
        daemon_pid: None,
        ublk: None,
        loop_dev: Some(dev),
    })
}

fn remove(dev: &Dev) {
    if let Some((id, server)) = dev.ublk {
        // Each server deletes its own device; ours can delete any.
        let bin = server.bin().unwrap_or_else(ublk_bin);
        if let Err(e) = sh(Command::new(&bin).args(["del", "-n", &id.to_string()])) {
            eprintln!("note: {e}");
            let _ = sh(Command::new(ublk_bin()).args(["del", "-n", &id.to_string()]));
        }
    }
    if let Some(l) = &dev.loop_dev {
        let _ = sh(Command::new("losetup").args(["-d", l]));
    }
    if dev.variant == Kind::Null.baseline() {
        let _ = sh(Command::new("rmmod").arg("null_blk"));
    }
    if dev.variant == Kind::Nbd.baseline() {
        let _ = sh(Command::new("nbd-client").args(["-d", "/dev/nbd0"]));
    }
}

/// utime+stime of `pid` in ns.
fn cpu_ns(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 * 1e9 / hz.max(1) as f64)
}

/// A `/proc/PID/status` field in KiB.
fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs `job` for `ios` I/Os on `dev`.
fn fio(dev: &Dev, job: &Job, ios: u64) -> Result<Run, String> {
    let per_job = (ios / u64::from(job.queues)).max(1);
    let mut cmd = Command::new("fio");
    cmd.arg("--name=bench")
        .arg(format!("--filename={}", dev.path.display()))
        .args(["--ioengine=io_uring", "--direct=1", "--allow_file_create=0"])
        .arg(format!("--rw={}", job.rw))
        .arg(format!("--bs={}", job.bs))
        .arg(format!("--iodepth={}", job.qd))
        .arg(format!("--numjobs={}", job.queues))
        .arg(format!("--number_ios={per_job}"))
        .args([
            "--group_reporting",
            "--norandommap",
            "--randrepeat=0",
            "--output-format=json",
        ]);
    let cpu0 = dev.daemon_pid.and_then(cpu_ns);
    let out = sh(&mut cmd)?;
    let cpu1 = dev.daemon_pid.and_then(cpu_ns);
    let json: Value = serde_json::from_str(&out[out.find('{').unwrap_or(0)..])
        .map_err(|e| format!("fio printed no JSON ({e}): {out}"))?;
    let j = &json["jobs"][0];
    if j["error"].as_u64().unwrap_or(0) != 0 {
        return Err(format!("fio job error {}", j["error"]));
    }
    let dir = if job.rw.contains("read") {
        &j["read"]
    } else {
        &j["write"]
    };
    let done = dir["total_ios"].as_u64().unwrap_or(0);
    let runtime_ms = dir["runtime"].as_f64().unwrap_or(0.0);
    if done == 0 || runtime_ms <= 0.0 {
        return Err(format!(
            "fio did no I/O (total_ios {done}, runtime {runtime_ms} ms)"
        ));
    }
    Ok(Run {
        ios: done,
        secs: runtime_ms / 1e3,
        p99_ns: dir["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0),
        cpu_ns: cpu0.zip(cpu1).map(|(a, b)| b - a),
    })
}

/// Writes the backing file (real blocks, so reads reach the disk).
fn make_backing() -> std::io::Result<()> {
    let mb = loop_mb();
    if std::fs::metadata(BACKING).is_ok_and(|m| m.len() == mb << 20) {
        return Ok(());
    }
    eprintln!("writing the {mb} MiB backing file {BACKING}...");
    let mut f = std::fs::File::create(BACKING)?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    for _ in 0..mb {
        f.write_all(&chunk)?;
    }
    f.sync_all()
}

fn bench_id(kind: Kind, job: &Job, variant: &str) -> String {
    format!("{}/{}/{variant}", kind.name(), job.name)
}

/// Benchmarks every selected job of `kind` on `queues` queues.
fn bench_kind(
    c: &mut Criterion,
    filter: &Filter,
    kind: Kind,
    queues: u32,
    results: &mut BTreeMap<String, Stats>,
    notes: &mut Vec<String>,
) {
    let jobs: Vec<Job> = jobs().into_iter().filter(|j| j.queues == queues).collect();
    let wanted = |variant: &str| {
        jobs.iter()
            .any(|j| filter.matches(&bench_id(kind, j, variant)))
    };
    let any_wanted = wanted(kind.baseline()) || VARIANTS.iter().any(|v| wanted(&v.name()));
    // Both NBD clients talk to one server, which lives as long as they do
    // (declared before `devs`: dropped after them).
    let _nbd_server = match kind {
        Kind::Nbd if any_wanted => match NbdServer::start() {
            Ok(s) => Some(s),
            Err(e) => {
                notes.push(format!("nbd skipped: {e}"));
                return;
            }
        },
        _ => None,
    };
    let mut devs = Vec::new();
    if wanted(kind.baseline()) {
        match match kind {
            Kind::Null => add_null_blk(queues),
            Kind::Loop => add_kernel_loop(),
            Kind::Nbd => add_kernel_nbd(queues),
        } {
            Ok(d) => devs.push(d),
            Err(e) => notes.push(format!("{} baseline unavailable: {e}", kind.name())),
        }
    }
    for v in &VARIANTS {
        if !wanted(&v.name()) {
            continue;
        }
        match add_ublk(kind, queues, v) {
            Ok(d) => devs.push(d),
            Err(e) => {
                let msg = format!(
                    "skipped {} {} on {queues} queue(s): {e}",
                    kind.name(),
                    v.name(),
                );
                eprintln!("note: {msg}");
                notes.push(msg);
            }
        }
    }
    // Smoke-test each device once (also a warm-up); drop those that fail.
    devs.retain(|d| {
        let probe = Job {
            name: "probe".into(),
            rw: "randread",
            bs: 4096,
            qd: 4,
            queues: 1,
            ios: 64,
        };
        match fio(d, &probe, 64) {
            Ok(_) => true,
            Err(e) => {
                let msg = format!("skipped {} {}: fio failed: {e}", kind.name(), d.variant);
                eprintln!("note: {msg}");
                notes.push(msg);
                remove(d);
                false
            }
        }
    });

    let run_secs = env_f64("UBLK_BENCH_RUN_SECS", 0.5);
    let rounds = env_f64("UBLK_BENCH_ROUNDS", 3.0) as usize;
    for job in &jobs {
        let selected: Vec<&Dev> = devs
            .iter()
            .filter(|d| filter.matches(&bench_id(kind, job, &d.variant)))
            .collect();
        if selected.is_empty() {
            continue;
        }
        // Calibrate: a fixed number of I/Os per device, about `run_secs`
        // of fio time each.
        let mut ios = Vec::new();
        for dev in &selected {
            let n = match fio(dev, job, job.ios) {
                Ok(r) => {
                    let q = u64::from(job.queues);
                    let n = (r.ios as f64 / r.secs * run_secs) as u64;
                    (n.clamp(q * 16, job.max_ios(kind)) / q * q).max(q)
                }
                Err(e) => {
                    eprintln!("note: {} calibration failed: {e}", dev.variant);
                    job.ios
                }
            };
            ios.push(n);
        }
        let mut g = c.benchmark_group(format!("{}/{}", kind.name(), job.name));
        g.sampling_mode(SamplingMode::Flat);
        for (dev, &n) in selected.iter().zip(&ios) {
            let id = bench_id(kind, job, &dev.variant);
            g.throughput(Throughput::Elements(n));
            g.bench_function(BenchmarkId::from_parameter(&dev.variant), |b| {
                b.iter_custom(|iters| {
                    let mut t = Duration::ZERO;
                    for _ in 0..iters {
                        let run = fio(dev, job, n).unwrap_or_else(|e| panic!("{id}: {e}"));
                        // Scale to exactly `n` I/Os per iteration.
                        t += Duration::from_secs_f64(run.secs * n as f64 / run.ios as f64);
                    }
                    t
                });
            });
        }
        g.finish();
        // The table: rounds of one run per device in turn, so that a
        // slow-down of the (emulated, shared) machine hits every variant.
        let mut stats: Vec<Stats> = selected.iter().map(|_| Stats::default()).collect();
        for _ in 0..rounds.max(1) {
            for ((dev, &n), st) in selected.iter().zip(&ios).zip(stats.iter_mut()) {
                match fio(dev, job, n) {
                    Ok(r) => st.runs.push(r),
                    Err(e) => eprintln!("note: {}: {e}", bench_id(kind, job, &dev.variant)),
                }
            }
        }
        for (dev, mut st) in selected.iter().zip(stats) {
            st.settings = dev.settings.clone();
            if let Some(pid) = dev.daemon_pid {
                st.rss_kib = status_kib(pid, "VmRSS:");
                st.hwm_kib = status_kib(pid, "VmHWM:");
            }
            results.insert(bench_id(kind, job, &dev.variant), st);
        }
    }
    for d in &devs {
        remove(d);
    }
}

/// The markdown table: one row per (target, job, copy mode).
fn report(results: &BTreeMap<String, Stats>, notes: &[String]) -> String {
    let mut s = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let _ = writeln!(
        s,
        "Kernel {}, {} CPUs, {} table runs (rounds of one fio run per variant in turn, after criterion's samples). IOPS = I/Os / fio run time over the rounds; ratio = median over rounds of our IOPS / the baseline's in the same round (kernel null_blk for null, kernel loop with direct I/O on the same file for loop, the kernel NBD client nbd.ko on the same nbdkit server for nbd); p99 = median over the rounds of fio's p99 completion latency; CPU/IO = daemon utime+stime (/proc/PID/stat, 10 ms ticks) per I/O; RSS = daemon VmRSS (and VmHWM) after the rounds.\n",
        kernel.trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        results.values().map(|r| r.runs.len()).sum::<usize>()
    );
    s += "| config | IOPS (ublk) | IOPS (baseline) | ratio | p99 µs (ublk) | p99 µs (baseline) | CPU µs/IO | RSS MiB (peak) |\n";
    s += "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for (id, st) in results {
        let mut parts = id.rsplitn(2, '/');
        let variant = parts.next().unwrap_or("");
        let group = parts.next().unwrap_or("");
        let Some(mode) = variant.strip_prefix("ublk-") else {
            continue;
        };
        let base_name = Kind::of_group(group).baseline();
        let base = results.get(&format!("{group}/{base_name}"));
        let fmt_opt = |v: Option<f64>, prec: usize| {
            v.map_or_else(|| "–".to_owned(), |x| format!("{x:.prec$}"))
        };
        let _ = writeln!(
            s,
            "| {group} {mode} | {:.0} | {} | {} | {:.0} | {} | {} | {} |",
            st.iops(),
            fmt_opt(base.map(Stats::iops), 0),
            fmt_opt(base.and_then(|b| st.ratio_to(b)), 3),
            st.p99_us(),
            fmt_opt(base.map(Stats::p99_us), 0),
            fmt_opt(st.cpu_us_per_io(), 1),
            match (st.rss_kib, st.hwm_kib) {
                (Some(r), Some(h)) =>
                    format!("{:.1} ({:.1})", r as f64 / 1024.0, h as f64 / 1024.0),
                _ => "–".into(),
            }
        );
    }
    s += &peers(results);
    s += &settings(results);
    s += &targets(results);
    for n in notes {
        let _ = writeln!(s, "\nNote: {n}");
    }
    s
}

/// The peer comparisons: rows of a job and a copy-mode class, each
/// server's variant of that class side by side.
const PEER_CLASSES: [(&str, [&str; 3]); 3] = [
    (
        "default",
        ["ublk-default", "kublk-default", "rublk-default"],
    ),
    (
        "zero copy (--auto_zc; rublk -z)",
        ["ublk-auto_zc", "kublk-auto_zc", "rublk-zero_copy"],
    ),
    (
        "zero copy (-z)",
        ["ublk-zero_copy", "kublk-zero_copy", "rublk-zero_copy"],
    ),
];

/// Median over rounds of `ours`' IOPS / the best peer's in the same round.
fn ratio_to_best(ours: &Stats, peers: &[&Stats]) -> Option<f64> {
    let v: Vec<f64> = (0..ours.runs.len())
        .filter_map(|i| {
            let best = peers
                .iter()
                .filter_map(|p| p.runs.get(i))
                .map(|r| r.ios as f64 / r.secs)
                .max_by(f64::total_cmp)?;
            let r = ours.runs[i];
            Some(r.ios as f64 / r.secs / best)
        })
        .collect();
    median(v)
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    })
}

/// The table of our server beside kublk and rublk (and the kernel's
/// driver), every disk with the scheduler `none` and depth 128.
fn peers(results: &BTreeMap<String, Stats>) -> String {
    let mut groups: Vec<&str> = results
        .keys()
        .filter_map(|id| id.rsplit_once('/').map(|(g, _)| g))
        .collect();
    groups.dedup();
    let fmt =
        |v: Option<f64>, prec: usize| v.map_or_else(|| "–".to_owned(), |x| format!("{x:.prec$}"));
    let mut s = format!(
        "\n### Beside the other ublk servers\n\n{}. Every ublk disk with the I/O scheduler `none` (set after `add`) and depth 128; IOPS over the rounds; ours / best peer = median over rounds of our IOPS / the faster peer's in the same round; CPU = daemon µs per I/O.\n\n| row | kernel | ours | kublk | rublk | ours / best peer | CPU ours | CPU kublk | CPU rublk |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        std::env::var("UBLK_BENCH_PEERS").unwrap_or_else(|_| "Peers: not given".into())
    );
    for g in groups {
        let base = Kind::of_group(g).baseline();
        let kernel = results.get(&format!("{g}/{base}"));
        for (class, [ours, kublk, rublk]) in PEER_CLASSES {
            let get = |v: &str| results.get(&format!("{g}/{v}"));
            let (o, k, r) = (get(ours), get(kublk), get(rublk));
            if o.is_none() || (k.is_none() && r.is_none()) {
                continue;
            }
            let peers: Vec<&Stats> = [k, r].into_iter().flatten().collect();
            let _ = writeln!(
                s,
                "| {g} {class} | {} | {} | {} | {} | {} | {} | {} | {} |",
                fmt(kernel.map(Stats::iops), 0),
                fmt(o.map(Stats::iops), 0),
                fmt(k.map(Stats::iops), 0),
                fmt(r.map(Stats::iops), 0),
                fmt(o.and_then(|o| ratio_to_best(o, &peers)), 2),
                fmt(o.and_then(Stats::cpu_us_per_io), 1),
                fmt(k.and_then(Stats::cpu_us_per_io), 1),
                fmt(r.and_then(Stats::cpu_us_per_io), 1),
            );
        }
    }
    s
}

/// Every device's settings as the kernel reported them.
fn settings(results: &BTreeMap<String, Stats>) -> String {
    let mut s = String::from(
        "\n### Settings of every disk\n\n| target/queues | variant | command | scheduler | queues × depth | max I/O KiB | ublk flags |\n|---|---|---|---|---|---:|---|\n",
    );
    let mut seen = std::collections::BTreeSet::new();
    for (id, st) in results {
        let mut parts = id.split('/');
        let (kind, job, variant) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let q = job.rsplit('-').next().unwrap_or("");
        if !seen.insert(format!("{kind}/{q}/{variant}")) {
            continue;
        }
        let t = &st.settings;
        let _ = writeln!(
            s,
            "| {kind}/{q} | {variant} | `{}` | {} | {} × {} | {} | {} |",
            t.command,
            t.scheduler,
            t.queues,
            t.depth,
            t.max_io_kib,
            t.flags
                .map_or_else(|| "–".to_owned(), |f| format!("{f:#x}")),
        );
    }
    s
}

/// A measured value and which variant gave it.
type Measured = Option<(f64, String)>;

/// The performance issue's targets, each checked against this run's rows
/// (a target whose rows were not run says so).
fn targets(results: &BTreeMap<String, Stats>) -> String {
    let ratio = |a: &str, b: &str| results.get(a)?.ratio_to(results.get(b)?);
    let rss_mib = |id: &str| Some(results.get(id)?.rss_kib? as f64 / 1024.0);
    // The best of `ids` relative to `b`, with its copy mode.
    let mode = |id: &str| id.rsplit("ublk-").next().unwrap_or(id).to_owned();
    let best = |ids: &[&str], b: &str| -> Measured {
        ids.iter()
            .filter_map(|id| Some((ratio(id, b)?, mode(id))))
            .max_by(|x, y| x.0.total_cmp(&y.0))
    };
    // One queue of depth 128 with 512 KiB buffers (the copy modes' default).
    let buffers_mib = 128.0 * 0.5;
    // (target, measured value and how, requirement, met)
    let mut rows: Vec<(String, Measured, String, bool)> = Vec::new();
    let mut at_least = |what: &str, got: Measured, want: f64| {
        let met = got.as_ref().is_some_and(|(v, _)| *v >= want);
        rows.push((what.to_owned(), got, format!("≥ {want}"), met));
    };
    let plain = |v: Option<f64>, how: &str| v.map(|v| (v, how.to_owned()));
    at_least(
        "null 4k randread qd32 q1 / null_blk",
        plain(
            ratio(
                "null/randread-4k-qd32-q1/ublk-default",
                "null/randread-4k-qd32-q1/null_blk",
            ),
            "default",
        ),
        0.20,
    );
    at_least(
        "null 4k randwrite qd32 q1 / null_blk",
        plain(
            ratio(
                "null/randwrite-4k-qd32-q1/ublk-default",
                "null/randwrite-4k-qd32-q1/null_blk",
            ),
            "default",
        ),
        0.18,
    );
    at_least(
        "loop 4k randread qd32 q1 / kernel loop",
        plain(
            ratio(
                "loop/randread-4k-qd32-q1/ublk-default",
                "loop/randread-4k-qd32-q1/kernel_loop",
            ),
            "default",
        ),
        0.45,
    );
    let zc = [
        "loop/read-1m-qd8-q1/ublk-auto_zc",
        "loop/read-1m-qd8-q1/ublk-zero_copy",
    ];
    at_least(
        "loop 1M seq read / kernel loop (within 10%), zero copy",
        best(&zc, "loop/read-1m-qd8-q1/kernel_loop"),
        0.90,
    );
    at_least(
        "loop 1M seq read, zero copy / copy mode",
        best(&zc, "loop/read-1m-qd8-q1/ublk-default"),
        1.5,
    );
    // The nbd target's targets: the kernel's NBD client on the same server.
    for job in ["randread-4k-qd32-q1", "read-1m-qd8-q1"] {
        let ids: Vec<String> = VARIANTS
            .iter()
            .filter(|v| v.server == Server::Ours)
            .map(|v| format!("nbd/{job}/{}", v.name()))
            .collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        at_least(
            &format!("nbd {job} / kernel nbd"),
            best(&ids, &format!("nbd/{job}/kernel_nbd")),
            1.0,
        );
    }
    let mut at_most = |what: &str, got: Measured, want: f64| {
        let met = got.as_ref().is_some_and(|(v, _)| *v <= want);
        rows.push((what.to_owned(), got, format!("≤ {want} MiB"), met));
    };
    at_most(
        "RSS, 1 queue × 128, copy mode (MiB)",
        plain(rss_mib("loop/read-1m-qd8-q1/ublk-default"), "loop default"),
        buffers_mib + 8.0,
    );
    for id in zc {
        at_most(
            "RSS, 1 queue × 128, zero copy (MiB)",
            plain(rss_mib(id), &mode(id)),
            8.0,
        );
    }
    let mut s = String::from("\n| target | measured | required | met |\n|---|---:|---:|---|\n");
    for (what, got, want, met) in rows {
        let got = got.map_or_else(
            || "not run".to_owned(),
            |(v, how)| format!("{v:.3} ({how})"),
        );
        let _ = writeln!(
            s,
            "| {what} | {got} | {want} | {} |",
            if met { "yes" } else { "NO" }
        );
    }
    s
}

fn results_json(results: &BTreeMap<String, Stats>) -> Value {
    let rows: serde_json::Map<String, Value> = results
        .iter()
        .map(|(id, st)| {
            (
                id.clone(),
                serde_json::json!({
                    "iops": st.iops(),
                    "p99_us": st.p99_us(),
                    "cpu_us_per_io": st.cpu_us_per_io(),
                    "rss_kib": st.rss_kib,
                    "hwm_kib": st.hwm_kib,
                    "runs": st.runs.len(),
                }),
            )
        })
        .collect();
    Value::Object(rows)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bench_mode = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    if !bench_mode {
        println!("fio benches: not run outside `cargo bench` (they need ublk_drv; use cargo xtask bench)");
        return;
    }
    if !Path::new("/dev/ublk-control").exists() {
        println!(
            "fio benches skipped: no /dev/ublk-control (run them in a guest: cargo xtask bench)"
        );
        return;
    }
    if std::env::var_os("CRITERION_HOME").is_none()
        && std::env::var_os("CARGO_TARGET_DIR").is_none()
    {
        std::env::set_var("CRITERION_HOME", target_dir().join("criterion"));
    }
    let samples = std::env::var("UBLK_BENCH_SAMPLES")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(10)
        .max(10);
    let mut c = Criterion::default()
        .sample_size(samples)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1))
        .nresamples(10_000)
        .configure_from_args();
    let filter = Filter::from_args(&args);
    let list_only = args.iter().any(|a| a == "--list");
    if list_only {
        for kind in [Kind::Null, Kind::Loop, Kind::Nbd] {
            for job in jobs() {
                for v in VARIANTS
                    .iter()
                    .map(Variant::name)
                    .chain([kind.baseline().to_owned()])
                {
                    let id = bench_id(kind, &job, &v);
                    if filter.matches(&id) {
                        println!("{id}: benchmark");
                    }
                }
            }
        }
        return;
    }
    let ublk = ublk_bin();
    if !ublk.exists() {
        eprintln!(
            "{} does not exist: build it first (cargo build --release -p ublk-tools)",
            ublk.display()
        );
        std::process::exit(1);
    }
    let t0 = Instant::now();
    let mut results = BTreeMap::new();
    let mut notes = Vec::new();
    let loop_wanted = jobs().iter().any(|j| {
        VARIANTS
            .iter()
            .map(Variant::name)
            .chain([Kind::Loop.baseline().to_owned()])
            .any(|v| filter.matches(&bench_id(Kind::Loop, j, &v)))
    });
    for kind in [Kind::Null, Kind::Loop, Kind::Nbd] {
        if kind == Kind::Loop && loop_wanted {
            if let Err(e) = make_backing() {
                eprintln!("cannot write {BACKING}: {e}");
                std::process::exit(1);
            }
        }
        for queues in [1, 2] {
            bench_kind(&mut c, &filter, kind, queues, &mut results, &mut notes);
        }
    }
    c.final_summary();
    let md = report(&results, &notes);
    let dir = target_dir();
    let _ = std::fs::write(dir.join("bench-report.md"), &md);
    let _ = std::fs::write(
        dir.join("bench-results.json"),
        serde_json::to_string_pretty(&results_json(&results)).unwrap_or_default(),
    );
    println!(
        "\n## ublk fio benchmarks ({:.0} s)\n\n{md}",
        t0.elapsed().as_secs_f64()
    );
}
