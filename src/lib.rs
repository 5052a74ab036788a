//! Helpers shared by the end-to-end tests and benches.
//!
//! - [`MemTarget`]: a RAM-backed target that works in every copy mode;
//! - [`TestDevice`]: adds, starts and serves a device in a background thread,
//!   and stops it (deleting it) on [`TestDevice::stop`] or drop;
//! - [`fio`] / [`spawn_fio`] and [`FioOutput`]: run fio against a device and
//!   check it found no errors;
//! - [`Resources`]: fds, threads and ublk char devices of this process/system,
//!   to check for leaks.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ublk::{
    BasicParams, Control, DevInfo, DeviceBuilder, FileTarget, Params, QueueStats, StartKind, Target,
};

/// The reason every kernel-needing test is ignored on the host.
pub const NEEDS_KERNEL: &str = "needs ublk_drv: run with cargo xtask test";

/// The guest kernel the rig booted (`UBLK_RIG_KERNEL`): `sid`, `trixie`, or
/// `None` on a real host.
pub fn rig_kernel() -> Option<String> {
    std::env::var("UBLK_RIG_KERNEL")
        .ok()
        .filter(|s| !s.is_empty())
}

/// A memfd of `len` bytes, for backing a [`MemTarget`].
pub fn memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: `cname` is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    File::from(fd.try_clone()?).set_len(len)?;
    Ok(fd)
}

/// A RAM disk: [`FileTarget`] over a memfd, each request one SQE on the
/// queue's ring. In the copy modes the request buffer is server memory
/// ([`ublk::IoBuf::Mem`]); in zero copy and auto buffer registration the
/// request pages sit in the ring's buffer table ([`ublk::IoBuf::Fixed`]).
///
/// Clones share the memfd (one per queue); [`FileTarget::file`] is it, e.g.
/// to check the data with `pread`.
pub type MemTarget = FileTarget<Arc<OwnedFd>>;

/// A [`MemTarget`] over a fresh zeroed memfd of `capacity` bytes.
pub fn mem_target(capacity: u64) -> io::Result<MemTarget> {
    Ok(FileTarget::new(Arc::new(memfd("ublk-e2e-mem", capacity)?)))
}

/// A harness failure as a [`ublk::Error`], so [`TestDevice::start`] has
/// one error type.
fn ublk_error(what: &'static str) -> impl FnOnce(io::Error) -> ublk::Error {
    move |source| ublk::Error::Io { what, source }
}

/// How long [`TestDevice::start`] waits for the device to go live.
pub const LIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the serving thread returns: `Device::run`'s result.
pub type RunResult = ublk::Result<Vec<QueueStats>>;

/// A device served by a background thread, stopped and deleted on
/// [`TestDevice::stop`] or drop.
///
/// The thread first returns from `Device::run` (once every queue has
/// stopped), then drops the `Device` guard, whose `DEL_DEV` waits until
/// nobody has the disk open any more; the two are observed separately
/// ([`TestDevice::wait_run`], [`TestDevice::wait_deleted`]).
#[derive(Debug)]
pub struct TestDevice {
    /// The device id (`N` of `/dev/ublkbN`).
    pub id: u32,
    /// The control device it was added with.
    pub ctrl: Arc<Control>,
    /// The device info once live.
    pub info: DevInfo,
    ran: Option<mpsc::Receiver<RunResult>>,
    deleted: Option<mpsc::Receiver<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestDevice {
    /// Opens the control device, adds a device from `builder`, sets basic
    /// parameters for `capacity` bytes, serves it with `make_target` in a
    /// background thread, and returns once it is live.
    pub fn start<T, F>(builder: DeviceBuilder, capacity: u64, make_target: F) -> ublk::Result<Self>
    where
        T: Target,
        F: Fn(u16) -> io::Result<T> + Send + Sync + 'static,
    {
        let ctrl = Arc::new(Control::open()?);
        Self::start_with(ctrl, builder, capacity, make_target)
    }

    /// [`TestDevice::start`] with a given control device.
    pub fn start_with<T, F>(
        ctrl: Arc<Control>,
        builder: DeviceBuilder,
        capacity: u64,
        make_target: F,
    ) -> ublk::Result<Self>
    where
        T: Target,
        F: Fn(u16) -> io::Result<T> + Send + Sync + 'static,
    {
        let mut dev = builder.add(ctrl.clone())?;
        let max_io = dev.info().max_io_buf_bytes();
        dev.set_params(&Params::basic(BasicParams::new(capacity, max_io)))?;
        let id = dev.id();
        let (live_tx, live_rx) = mpsc::channel();
        let (ran_tx, ran_rx) = mpsc::channel();
        let (deleted_tx, deleted_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("serve-ublk{id}"))
            .spawn(move || {
                let r = dev.run(StartKind::Start, make_target, |info, _| {
                    let _ = live_tx.send(*info);
                });
                let _ = ran_tx.send(r);
                // Stops (again) and deletes the device.
                drop(dev);
                let _ = deleted_tx.send(());
            })
            .map_err(ublk_error("spawning the serving thread"))?;
        let mut td = Self {
            id,
            ctrl,
            info: DevInfo::default(),
            ran: Some(ran_rx),
            deleted: Some(deleted_rx),
            thread: Some(thread),
        };
        match live_rx.recv_timeout(LIVE_TIMEOUT) {
            Ok(info) => {
                td.info = info;
                let disk = td.block_path();
                if !wait_block_device(&disk, LIVE_TIMEOUT) {
                    return Err(ublk_error("starting the test device")(io::Error::other(
                        format!(
                            "{} is not a block device {LIVE_TIMEOUT:?} after START_DEV",
                            disk.display()
                        ),
                    )));
                }
                Ok(td)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // `run` returned without the device going live.
                Err(match td.wait_run(LIVE_TIMEOUT) {
                    Some(Err(e)) => e,
                    _ => ublk_error("starting the test device")(io::Error::other(format!(
                        "device {id} never went live"
                    ))),
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                Err(ublk_error("starting the test device")(io::Error::other(
                    format!("device {id} did not go live within {LIVE_TIMEOUT:?}"),
                )))
            }
        }
    }

    /// The block device path.
    pub fn block_path(&self) -> std::path::PathBuf {
        ublk::ctrl::block_dev_path(self.id)
    }

    /// Waits up to `timeout` for `Device::run` to return; `None` on timeout
    /// (or if it was already collected).
    pub fn wait_run(&mut self, timeout: Duration) -> Option<RunResult> {
        let r = self.ran.as_ref()?.recv_timeout(timeout).ok()?;
        self.ran = None;
        Some(r)
    }

    /// Waits up to `timeout` for the serving thread to have deleted the
    /// device (after `run` returned); false on timeout (the thread is then
    /// left running).
    pub fn wait_deleted(&mut self, timeout: Duration) -> bool {
        let Some(rx) = &self.deleted else {
            return true;
        };
        if rx.recv_timeout(timeout).is_err() && !self.is_finished() {
            return false;
        }
        self.deleted = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        true
    }

    /// Whether the serving thread has already finished.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// `STOP_DEV`, then waits up to `timeout` for `Device::run` to return.
    /// Panics if it does not.
    pub fn stop_run_within(&mut self, timeout: Duration) -> RunResult {
        if let Err(e) = self.ctrl.stop_dev(self.id) {
            eprintln!("STOP_DEV of device {}: {e}", self.id);
        }
        match self.wait_run(timeout) {
            Some(r) => r,
            None => panic!(
                "device {}: Device::run did not return within {timeout:?} of STOP_DEV",
                self.id
            ),
        }
    }

    /// `STOP_DEV`, then waits (up to 60 s each) for `Device::run` to return
    /// and the device to be deleted. Panics on a timeout.
    pub fn stop(mut self) -> RunResult {
        let r = self.stop_run_within(Duration::from_secs(60));
        assert!(
            self.wait_deleted(Duration::from_secs(60)),
            "device {}: not deleted within 60 s of stopping",
            self.id
        );
        r
    }
}

impl Drop for TestDevice {
    fn drop(&mut self) {
        if self.deleted.is_some() {
            let _ = self.ctrl.stop_dev(self.id);
            if !self.wait_deleted(Duration::from_secs(60)) {
                eprintln!(
                    "device {}: serving thread still running after drop",
                    self.id
                );
            }
        }
    }
}

/// Polls until `path` is a block device, for at most `timeout`.
pub fn wait_block_device(path: &Path, timeout: Duration) -> bool {
    let t0 = Instant::now();
    loop {
        if is_block_device(path) {
            if t0.elapsed() > Duration::from_millis(100) {
                eprintln!("{} appeared after {:?}", path.display(), t0.elapsed());
            }
            return true;
        }
        if t0.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `path` is a block device node.
pub fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Polls until `path` does not exist, for at most `timeout`.
pub fn wait_absent(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that neither `/dev/ublkcN` nor `/dev/ublkbN` exists (waiting up
/// to 2 s for udev/devtmpfs).
pub fn assert_device_gone(id: u32) {
    for p in [
        ublk::ctrl::char_dev_path(id),
        ublk::ctrl::block_dev_path(id),
    ] {
        assert!(
            wait_absent(&p, Duration::from_secs(2)),
            "{} still exists",
            p.display()
        );
    }
}

/// Counts of what a leak would grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    /// Open descriptors of this process.
    pub fds: usize,
    /// Threads of this process.
    pub threads: usize,
    /// `/dev/ublkc*` nodes.
    pub char_devs: usize,
    /// `/dev/ublkb*` nodes.
    pub block_devs: usize,
}

fn count_dir(path: &str, prefix: &str) -> usize {
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

impl Resources {
    /// Counts now.
    pub fn now() -> Self {
        Self {
            // read_dir's own descriptor is counted each time alike.
            fds: count_dir("/proc/self/fd", ""),
            threads: count_dir("/proc/self/task", ""),
            char_devs: count_dir("/dev", "ublkc"),
            block_devs: count_dir("/dev", "ublkb"),
        }
    }
}

/// What a fio run produced.
#[derive(Debug)]
pub struct FioOutput {
    /// fio's exit status.
    pub status: ExitStatus,
    /// Its standard output (JSON with `--output-format=json`).
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Words fio prints when verification fails.
const VERIFY_FAILURES: [&str; 4] = ["verify failed", "bad magic", "bad header", "verify: bad"];

impl FioOutput {
    /// The parsed JSON output, if fio ran with `--output-format=json`.
    pub fn json(&self) -> Option<serde_json::Value> {
        // fio may print notes before the JSON object.
        let start = self.stdout.find('{')?;
        serde_json::from_str(&self.stdout[start..]).ok()
    }

    /// The sum of the jobs' `error` fields (JSON output only).
    pub fn job_errors(&self) -> Option<u64> {
        let json = self.json()?;
        Some(
            json["jobs"]
                .as_array()?
                .iter()
                .map(|j| j["error"].as_u64().unwrap_or(0))
                .sum(),
        )
    }

    /// Whether the output mentions a verification failure.
    pub fn verify_failed(&self) -> bool {
        VERIFY_FAILURES
            .iter()
            .any(|w| self.stdout.contains(w) || self.stderr.contains(w))
    }

    /// Panics (showing fio's output) unless fio exited 0 with no job error
    /// and no verification failure.
    pub fn assert_clean(&self, what: &str) {
        let ok =
            self.status.success() && self.job_errors().unwrap_or(0) == 0 && !self.verify_failed();
        assert!(
            ok,
            "{what}: fio failed ({}; job errors {:?}; verify failure {})\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.job_errors(),
            self.verify_failed(),
            tail(&self.stdout, 4000),
            tail(&self.stderr, 4000)
        );
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// fio on `/dev/ublkbN`, refusing to start if that is not a block device
/// (fio would create a regular file there and test nothing).
fn fio_command(dev_id: u32, args: &[&str]) -> io::Result<Command> {
    let disk = ublk::ctrl::block_dev_path(dev_id);
    if !is_block_device(&disk) {
        return Err(io::Error::other(format!(
            "{} is not a block device",
            disk.display()
        )));
    }
    let mut c = Command::new("fio");
    c.arg(format!("--filename={}", disk.display()))
        .arg("--allow_file_create=0")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(c)
}

/// Runs fio with `args` (plus `--filename=/dev/ublkbN`) and waits for it.
pub fn fio(dev_id: u32, args: &[&str]) -> io::Result<FioOutput> {
    let out = fio_command(dev_id, args)?.output()?;
    Ok(FioOutput {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Starts fio with `args` (plus `--filename=/dev/ublkbN`) in the background.
pub fn spawn_fio(dev_id: u32, args: &[&str]) -> io::Result<Child> {
    fio_command(dev_id, args)?.spawn()
}

/// Waits for a [`spawn_fio`] child at most `timeout` and collects its
/// output; kills it (and reports `None`) if it is still running then.
pub fn wait_fio(child: &mut Child, timeout: Duration) -> io::Result<Option<FioOutput>> {
    use std::io::Read;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut stdout)?;
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    Ok(Some(FioOutput {
        status,
        stdout,
        stderr,
    }))
}

/// The names of this process's threads (to show what leaked).
pub fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| {
                    std::fs::read_to_string(e.path().join("comm"))
                        .unwrap_or_default()
                        .trim()
                        .to_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Writes a message to stderr with the elapsed time since `t0` (shown with
/// `--nocapture`).
pub fn note(t0: Instant, msg: impl std::fmt::Display) {
    eprintln!("[{:7.2}s] {msg}", t0.elapsed().as_secs_f64());
}
