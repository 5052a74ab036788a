//! Creating a device ([`DeviceBuilder`]), the [`Device`] guard that deletes
//! it unless handed off, and running its queues.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ctrl::{char_dev_path, Control, DevInfo};
use crate::params::Params;
use rustix::io::Errno;

use crate::queue::{CopyMode, Queue, QueueConfig, QueueStats};
use crate::stop::{SignalStop, StopHandle};
use crate::target::Target;
use crate::{Error, Features, Result};

/// Default queue depth (as ublksrv and kublk).
pub const DEFAULT_DEPTH: u16 = 128;
/// Default largest request where the server owns a buffer per tag
/// ([`CopyMode::has_buffers`]): 512 KiB, as ublksrv.
pub const DEFAULT_MAX_IO_BYTES: u32 = 512 << 10;
/// Default largest request in the zero-copy modes: 1 MiB, as kublk. They
/// allocate nothing per tag, so larger requests cost no memory, and a 1 MiB
/// read is one request instead of two.
pub const DEFAULT_MAX_IO_BYTES_ZERO_COPY: u32 = 1 << 20;
/// Largest request the UAPI can address per tag (`UBLK_IO_BUF_BITS`).
pub const MAX_IO_BYTES: u32 = 1 << ublk_sys::UBLK_IO_BUF_BITS;

/// Describes a device to add.
#[derive(Debug, Clone, Copy)]
pub struct DeviceBuilder {
    id: Option<u32>,
    queues: u16,
    depth: u16,
    max_io_bytes: Option<u32>,
    mode: CopyMode,
    flags: Features,
    threads: u16,
}

impl Default for DeviceBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceBuilder {
    /// One queue of depth 128, kernel copies, requests up to 512 KiB (1 MiB
    /// once a zero-copy mode is chosen).
    pub const fn new() -> Self {
        Self {
            id: None,
            queues: 1,
            depth: DEFAULT_DEPTH,
            max_io_bytes: None,
            mode: CopyMode::Copy,
            flags: Features::empty(),
            threads: 0,
        }
    }
    /// A specific device id (default: the next free one).
    pub const fn id(mut self, id: u32) -> Self {
        self.id = Some(id);
        self
    }
    /// Number of queues.
    pub const fn queues(mut self, n: u16) -> Self {
        self.queues = n;
        self
    }
    /// Tags per queue.
    pub const fn depth(mut self, depth: u16) -> Self {
        self.depth = depth;
        self
    }
    /// Largest request in bytes (default [`DEFAULT_MAX_IO_BYTES`], or
    /// [`DEFAULT_MAX_IO_BYTES_ZERO_COPY`] in the modes without buffers).
    pub const fn max_io_bytes(mut self, bytes: u32) -> Self {
        self.max_io_bytes = Some(bytes);
        self
    }

    /// The largest request in bytes: as set, or the copy mode's default.
    pub fn io_bytes(&self) -> u32 {
        self.max_io_bytes.unwrap_or(if self.mode.has_buffers() {
            DEFAULT_MAX_IO_BYTES
        } else {
            DEFAULT_MAX_IO_BYTES_ZERO_COPY
        })
    }
    /// How data moves.
    pub const fn copy_mode(mut self, mode: CopyMode) -> Self {
        self.mode = mode;
        self
    }
    /// Batch I/O (`UBLK_F_BATCH_IO`): one multishot fetch and one commit per
    /// batch of requests instead of one command per request.
    pub const fn batch(mut self, on: bool) -> Self {
        self.flags = if on {
            self.flags.union(Features::BATCH_IO)
        } else {
            self.flags.difference(Features::BATCH_IO)
        };
        self
    }
    /// Serve the device with `n` threads (0: one per queue). Any other
    /// count than the number of queues spreads the (queue, tag) pairs over
    /// the threads round-robin, as kublk's `--per_io_tasks` does, and needs
    /// `UBLK_F_PER_IO_DAEMON` (Linux 6.16+) — except with batch I/O, whose
    /// threads serve whole queues as kublk's `-b --nthreads` does: fewer
    /// threads than queues share the queues out round-robin (thread `i`
    /// serves queues `i`, `i + n`, …), and more are one per queue.
    pub const fn threads(mut self, n: u16) -> Self {
        self.threads = n;
        self
    }
    /// Whether the threads serve (queue, tag) pairs rather than whole queues.
    const fn per_io(&self) -> bool {
        self.threads != 0 && self.threads != self.queues && !self.flags.contains(Features::BATCH_IO)
    }
    /// The threads [`Device::run`] serves with (0: one per queue).
    const fn serving_threads(&self) -> u16 {
        if self.per_io() || self.threads < self.queues {
            self.threads
        } else {
            0
        }
    }
    /// Further `UBLK_F_*` flags (recovery, unprivileged, …).
    pub const fn flags(mut self, flags: Features) -> Self {
        self.flags = flags;
        self
    }

    /// The flags `ADD_DEV` will ask for on a kernel with `kernel` features.
    pub fn requested_flags(&self, kernel: Features) -> Features {
        let mut f = self.flags | self.mode.features();
        if self.per_io() {
            f |= Features::PER_IO_DAEMON;
        }
        if kernel.contains(Features::CMD_IOCTL_ENCODE) {
            f |= Features::CMD_IOCTL_ENCODE;
        }
        f
    }

    /// Checks the arguments without a kernel.
    pub fn validate(&self) -> Result<()> {
        if self.queues == 0 || u32::from(self.queues) > ublk_sys::UBLK_MAX_NR_QUEUES {
            return Err(Error::config(format!(
                "number of queues {} is outside 1..={}",
                self.queues,
                ublk_sys::UBLK_MAX_NR_QUEUES
            )));
        }
        if self.depth == 0 || u32::from(self.depth) > ublk_sys::UBLK_MAX_QUEUE_DEPTH {
            return Err(Error::config(format!(
                "queue depth {} is outside 1..={}",
                self.depth,
                ublk_sys::UBLK_MAX_QUEUE_DEPTH
            )));
        }
        let max_io_bytes = self.io_bytes();
        if !(4096..=MAX_IO_BYTES).contains(&max_io_bytes) || max_io_bytes % 4096 != 0 {
            return Err(Error::config(format!(
                "largest request {} bytes must be a multiple of 4096 in 4096..={MAX_IO_BYTES}",
                max_io_bytes
            )));
        }
        let f = self.flags | self.mode.features();
        if f.contains(Features::UNPRIVILEGED_DEV)
            && f.intersects(
                Features::USER_COPY | Features::SUPPORT_ZERO_COPY | Features::AUTO_BUF_REG,
            )
        {
            return Err(Error::config(
                "unprivileged devices cannot use zero copy, auto buffer registration or user copy (the kernel forbids it)",
            ));
        }
        if f.intersects(
            Features::USER_RECOVERY_REISSUE | Features::USER_RECOVERY_FAIL_IO | Features::QUIESCE,
        ) && !f.contains(Features::USER_RECOVERY)
        {
            return Err(Error::config(
                "recovery reissue, fail-I/O and quiesce need user recovery",
            ));
        }
        if self.per_io() && u32::from(self.threads) > u32::from(self.queues) * u32::from(self.depth)
        {
            return Err(Error::config(format!(
                "{} threads is more than the {} ios of {} queues of depth {}",
                self.threads,
                u32::from(self.queues) * u32::from(self.depth),
                self.queues,
                self.depth
            )));
        }
        if f.contains(Features::INTEGRITY) && !f.contains(Features::USER_COPY) {
            return Err(Error::config(
                "integrity metadata (UBLK_F_INTEGRITY) needs user copy",
            ));
        }
        if f.contains(Features::BATCH_IO | Features::NEED_GET_DATA) {
            return Err(Error::config("batch I/O does not work with NEED_GET_DATA"));
        }
        if f.contains(Features::USER_RECOVERY_REISSUE | Features::USER_RECOVERY_FAIL_IO) {
            return Err(Error::config(
                "recovery reissue and fail-I/O exclude each other",
            ));
        }
        Ok(())
    }

    /// `ADD_DEV`, then opens the new char device. Features the kernel lacks
    /// are refused by name before anything is created; on any later error
    /// the half-made device is deleted again.
    #[allow(clippy::should_implement_trait)] // `add` is the ublk verb (ADD_DEV)
    pub fn add(self, ctrl: Arc<Control>) -> Result<Device> {
        self.validate()?;
        let flags = self.requested_flags(ctrl.features());
        ctrl.require(flags)?;
        let mut raw = ublk_sys::ublksrv_ctrl_dev_info {
            nr_hw_queues: self.queues,
            queue_depth: self.depth,
            max_io_buf_bytes: self.io_bytes(),
            dev_id: self.id.unwrap_or(u32::MAX),
            ublksrv_pid: -1,
            flags: flags.bits(),
            ..Default::default()
        };
        raw.state = ublk_sys::UBLK_S_DEV_DEAD as u16;
        let info = ctrl.add_dev(&DevInfo(raw))?;
        let mut dev = Device {
            stop: StopHandle::new(Arc::clone(&ctrl), info.dev_ref()),
            signals: None,
            ctrl,
            info,
            cdev: None,
            mode: self.mode,
            params: None,
            armed: true,
            threads: self.serving_threads(),
            affinity: QueueAffinity::default(),
            no_fixed_cdev: false,
        };
        dev.cdev = Some(open_char_dev(info.id())?);
        Ok(dev)
    }
}

/// Opens `/dev/ublkcN`, waiting up to 5 s for devtmpfs to create it and,
/// for an unprivileged device, for the udev rule the kernel documentation
/// asks for to hand it to its owner (`EACCES`/`EPERM` until then): up to
/// 30 s where udev runs (its first event after start forks a worker and
/// runs the rule's program, which takes seconds on a slow or emulated
/// machine: 14 s seen under QEMU TCG), 1 s where it does not.
pub fn open_char_dev(id: u32) -> Result<OwnedFd> {
    let path = char_dev_path(id);
    let start = Instant::now();
    let wait_for_owner = if Path::new("/run/udev/control").exists() {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(1)
    };
    loop {
        let waited = start.elapsed();
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f.into()),
            Err(e) if e.kind() == io::ErrorKind::NotFound && waited < Duration::from_secs(5) => {}
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied && waited < wait_for_owner => {}
            Err(source) => return Err(Error::Open { path, source }),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a running queue reports once its device is live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// The queue.
    pub q_id: u16,
    /// The thread serving it (a batch I/O thread may serve several
    /// queues).
    pub tid: i32,
    /// The CPUs it is pinned to.
    pub affinity: Vec<usize>,
}

/// Where each queue's thread runs, given the CPUs the kernel maps to the
/// queue (`UBLK_CMD_GET_QUEUE_AFFINITY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueAffinity {
    /// On the first CPU of the queue's set, as kublk and rublk do: the
    /// thread never migrates, and with one queue over all CPUs the
    /// submitters keep the other CPUs. The default.
    #[default]
    FirstCpu,
    /// Anywhere in the queue's set (the scheduler picks).
    QueueCpus,
    /// Not pinned.
    Unpinned,
}

impl QueueAffinity {
    /// The CPUs a thread of a queue mapped to `cpus` is pinned to (none:
    /// not pinned).
    pub fn pick(self, cpus: &[usize]) -> Vec<usize> {
        match self {
            Self::FirstCpu => cpus.iter().copied().min().into_iter().collect(),
            Self::QueueCpus => cpus.to_vec(),
            Self::Unpinned => Vec::new(),
        }
    }
}

/// An added device. Dropping it stops and deletes the device, unless it was
/// handed off with [`Device::keep`].
#[derive(Debug)]
pub struct Device {
    /// Stops the signal thread first when the guard drops.
    signals: Option<SignalStop>,
    stop: StopHandle,
    ctrl: Arc<Control>,
    info: DevInfo,
    cdev: Option<OwnedFd>,
    mode: CopyMode,
    params: Option<Params>,
    armed: bool,
    /// Serving threads when not one per queue (0: one per queue).
    threads: u16,
    affinity: QueueAffinity,
    /// See [`Device::set_fixed_cdev`].
    no_fixed_cdev: bool,
}

/// Selects the I/O scheduler of the block device `/dev/ublkb{id}` by
/// writing `/sys/block/ublkb{id}/queue/scheduler` (root only; the device
/// must be started). The kernel gives a single-queue ublk disk
/// `mq-deadline`, where stacking drivers such as loop get `none`: a server
/// whose backing schedules its own I/O, or that has none, wants `none`.
pub fn set_io_scheduler(id: u32, name: &str) -> Result<()> {
    std::fs::write(format!("/sys/block/ublkb{id}/queue/scheduler"), name)
        .map_err(Error::io("setting the I/O scheduler"))
}

/// Sets the request timeout of the block device `/dev/ublkb{id}` by writing
/// `/sys/block/ublkb{id}/queue/io_timeout` (root only; the device must be
/// started). For a privileged device the driver only re-arms the timer of
/// a request its live server still holds, but Linux 6.12 learns that its
/// server died only from a timed-out request when the server held every
/// tag: a short timeout bounds how long a dead server goes unnoticed
/// (the block layer's default is 30 s).
pub fn set_io_timeout(id: u32, timeout: std::time::Duration) -> Result<()> {
    let ms = timeout.as_millis().max(1);
    std::fs::write(
        format!("/sys/block/ublkb{id}/queue/io_timeout"),
        ms.to_string(),
    )
    .map_err(Error::io("setting the request timeout"))
}

/// How [`Device::run`] brings the device up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartKind {
    /// `START_DEV` (a new device).
    Start,
    /// `END_USER_RECOVERY` (a device being recovered).
    Recover,
}

impl Device {
    /// Takes over the existing device `id` for user recovery:
    /// `START_USER_RECOVERY`, then reopens its char device. Serve it with
    /// [`Device::run`] and [`StartKind::Recover`].
    pub fn recover(ctrl: Arc<Control>, id: u32, mode: CopyMode) -> Result<Self> {
        let info = ctrl.dev_info(id)?;
        if !info.flags().contains(Features::USER_RECOVERY) {
            return Err(Error::config(format!(
                "device {id} was not created with user recovery"
            )));
        }
        // The kernel answers EBUSY until the dead server's char device is
        // released and the device is quiesced (or failing I/O): right
        // after a kill that takes a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ctrl.start_user_recovery(info.dev_ref()) {
                Err(e) if e.errno() == Some(Errno::BUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => break r?,
            }
        }
        let params = ctrl.get_params(info.dev_ref()).ok();
        let cdev = open_char_dev(id)?;
        // A failed recovery must not delete the device the user wants back.
        Ok(Self {
            stop: StopHandle::new(Arc::clone(&ctrl), info.dev_ref()),
            signals: None,
            ctrl,
            info,
            cdev: Some(cdev),
            mode,
            params,
            armed: false,
            threads: 0,
            affinity: QueueAffinity::default(),
            no_fixed_cdev: false,
        })
    }

    /// The device info (as of creation or the last refresh).
    pub fn info(&self) -> &DevInfo {
        &self.info
    }

    /// The device id.
    pub fn id(&self) -> u32 {
        self.info.id()
    }

    /// The control device.
    pub fn control(&self) -> &Arc<Control> {
        &self.ctrl
    }

    /// The block device path.
    pub fn block_path(&self) -> PathBuf {
        crate::ctrl::block_dev_path(self.id())
    }

    /// Validates and sets the parameters.
    pub fn set_params(&mut self, params: &Params) -> Result<()> {
        params.validate()?;
        if params.integrity.is_some() && !self.info.flags().contains(Features::INTEGRITY) {
            return Err(Error::config(
                "integrity parameters need a device made with UBLK_F_INTEGRITY",
            ));
        }
        if let Some(b) = &params.basic {
            if b.max_sectors > self.info.max_io_buf_bytes() >> 9 {
                return Err(Error::config(format!(
                    "largest request of {} sectors exceeds the device's {} bytes",
                    b.max_sectors,
                    self.info.max_io_buf_bytes()
                )));
            }
        }
        self.ctrl.set_params(self.info.dev_ref(), params)?;
        self.params = Some(*params);
        Ok(())
    }

    /// Whether the queue rings on the next [`Device::run`] register the
    /// char device as a fixed file (the default) or send the ublk commands
    /// to its plain descriptor (kublk's `--no_ublk_fixed_fd`).
    pub fn set_fixed_cdev(&mut self, fixed: bool) {
        self.no_fixed_cdev = !fixed;
    }

    /// Where queue threads run on the next [`Device::run`] (default
    /// [`QueueAffinity::FirstCpu`]).
    pub fn set_queue_affinity(&mut self, affinity: QueueAffinity) {
        self.affinity = affinity;
    }

    /// Serve with `n` threads on the next [`Device::run`] (see
    /// [`DeviceBuilder::threads`]); for a device being recovered.
    pub fn set_threads(&mut self, n: u16) -> Result<()> {
        let queues = self.info.nr_queues();
        if self.info.flags().contains(Features::BATCH_IO) {
            self.threads = if n < queues { n } else { 0 };
            return Ok(());
        }
        if n != 0 && n != queues {
            self.ctrl.require(Features::PER_IO_DAEMON)?;
        }
        self.threads = if n == queues { 0 } else { n };
        Ok(())
    }

    /// A handle that stops this device from any thread, at any time: before
    /// [`Device::run`] brought it up (it then never starts, and `run`
    /// returns once its queues are set up), while it is live, and after
    /// it was deleted (nothing happens).
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Stops the device on the first of `signals` (typically `SIGINT` and
    /// `SIGTERM`, e.g. from `signal_hook::consts`), for as long as this
    /// guard lives: the usual way for a server to end on Ctrl-C. Call it
    /// right after [`DeviceBuilder::add`], so that no signal kills the
    /// process while the device exists; see [`StopHandle::stop_on_signals`]
    /// to manage the signal thread yourself.
    pub fn stop_on_signals(&mut self, signals: &[std::os::raw::c_int]) -> Result<()> {
        self.signals = Some(self.stop.stop_on_signals(signals)?);
        Ok(())
    }

    /// Leaves the device in place when this guard drops (for recovery).
    pub fn keep(&mut self) {
        self.armed = false;
    }

    /// Whether dropping this guard deletes the device.
    pub fn is_armed(&self) -> bool {
        self.armed
    }

    /// Serves the device: one thread per queue (pinned to the queue's CPUs),
    /// each with a target from `make_target(q_id)`; brings the device up
    /// with `start`; calls `on_live` once it is; returns when every queue
    /// has stopped (after `STOP_DEV` from anyone, a [`StopHandle::stop`],
    /// or the server's death).
    ///
    /// A stop asked for before the device is live keeps it from starting:
    /// `run` then returns `Ok` as soon as the queues are set up, without
    /// calling `on_live`. If a queue cannot be set up, the device is not
    /// started and the error is that queue's ([`Error::QueueSetup`]).
    pub fn run<T, F, L>(
        &mut self,
        start: StartKind,
        make_target: F,
        on_live: L,
    ) -> Result<Vec<QueueStats>>
    where
        T: Target,
        F: Fn(u16) -> io::Result<T> + Sync,
        L: FnOnce(&DevInfo, &[QueueInfo]),
    {
        let cdev = self
            .cdev
            .as_ref()
            .ok_or_else(|| Error::config("the device has no char device open"))?;
        let capacity_sectors = self
            .params
            .and_then(|p| p.basic)
            .map(|b| b.dev_sectors)
            .ok_or_else(|| Error::config("set the basic parameters before running the device"))?;
        let dev = self.info.dev_ref();
        let nr = self.info.nr_queues();
        let ctrl = &self.ctrl;
        let stop = &self.stop;
        let info = self.info;
        let mode = self.mode;
        let threads = self.threads;
        let policy = self.affinity;
        let make_target = &make_target;
        let result = std::thread::scope(|s| {
            // Each worker reports once: its queue info when set up, `None`
            // when set-up failed (its thread returns the error).
            let (tx, rx) = mpsc::channel::<Option<Vec<QueueInfo>>>();
            let workers = if info.flags().contains(Features::BATCH_IO) {
                assign_queues(nr, info.queue_depth(), threads)
            } else {
                assign_ios(nr, info.queue_depth(), threads)
            };
            let mut handles = Vec::with_capacity(workers.len());
            let nr_workers = workers.len();
            for ios in workers {
                let tx = tx.clone();
                let q_id = ios.first().map_or(0, |&(q, _)| q);
                let whole_queue = threads == 0;
                // The queues it reports: every one it serves whole (batch
                // workers may serve several), else the first it has ios of.
                let mut reported = vec![q_id];
                if info.flags().contains(Features::BATCH_IO) {
                    reported = ios.iter().map(|&(q, _)| q).collect();
                    reported.dedup();
                }
                // A worker of several queues' ios is left to the scheduler.
                let affinity = if whole_queue {
                    policy.pick(&ctrl.queue_affinity(dev, q_id).unwrap_or_default())
                } else {
                    Vec::new()
                };
                let cfg = QueueConfig {
                    dev_id: info.id(),
                    q_id,
                    depth: info.queue_depth(),
                    max_io_bytes: info.max_io_buf_bytes(),
                    capacity_sectors,
                    mode,
                    encoding: ctrl.encoding(),
                    batch: info.flags().contains(Features::BATCH_IO),
                    no_fixed_cdev: self.no_fixed_cdev,
                    integrity: self.params.and_then(|p| p.integrity),
                };
                let cdev = cdev.as_fd();
                let spawned = std::thread::Builder::new()
                    .name(format!("ublk{}q{q_id}", info.id()))
                    .spawn_scoped(s, move || -> Result<QueueStats> {
                        pin_to(&affinity);
                        let setup = (|| -> Result<(T, Queue<'_>)> {
                            let mut target =
                                make_target(q_id).map_err(Error::io("creating the target"))?;
                            let mut q = Queue::with_ios(cfg, &ios, cdev, &target.fixed_files())?;
                            q.fetch_all_with(&mut target)?;
                            Ok((target, q))
                        })();
                        let (mut target, q) = match setup {
                            Ok(ready) => ready,
                            Err(e) => {
                                let _ = tx.send(None);
                                return Err(Error::QueueSetup {
                                    q_id,
                                    source: Box::new(e),
                                });
                            }
                        };
                        let tid = rustix::thread::gettid().as_raw_nonzero().get();
                        let _ = tx.send(Some(
                            reported
                                .into_iter()
                                .map(|q_id| QueueInfo {
                                    q_id,
                                    tid,
                                    affinity: affinity.clone(),
                                })
                                .collect(),
                        ));
                        drop(tx);
                        q.run(&mut target)
                    });
                match spawned {
                    Ok(h) => handles.push((q_id, h)),
                    Err(e) => {
                        // Once the threads already running have fetched (or
                        // failed), STOP_DEV cancels their commands.
                        for _ in rx.iter().take(handles.len()) {}
                        let _ = ctrl.stop_dev(dev);
                        for (_, h) in handles {
                            let _ = h.join();
                        }
                        return Err(Error::io("spawning a queue thread")(e));
                    }
                }
            }
            drop(tx);
            let mut queues = Vec::with_capacity(nr_workers);
            let mut set_up = true;
            for r in rx.iter().take(nr_workers) {
                match r {
                    Some(q) => queues.extend(q),
                    None => set_up = false,
                }
            }
            let started = if set_up {
                stop.start_unless_stopped(|| match start {
                    StartKind::Start => ctrl.start_dev(dev, std::process::id() as i32),
                    StartKind::Recover => ctrl.end_user_recovery(dev, std::process::id() as i32),
                })
            } else {
                Ok(false)
            };
            match started {
                Ok(true) => {
                    queues.sort_by_key(|q| q.q_id);
                    let live = ctrl.dev_info(dev.id).unwrap_or(info);
                    on_live(&live, &queues);
                }
                // Not started (a failed queue, a stop asked for, or a
                // refused start): cancels the commands the queues fetched,
                // so they return.
                Ok(false) | Err(_) => {
                    let _ = ctrl.stop_dev(dev);
                }
            }
            let mut stats = Vec::with_capacity(handles.len());
            for (q_id, h) in handles {
                stats.push(h.join().unwrap_or(Err(Error::QueuePanicked { q_id })));
            }
            started?;
            // A queue's set-up error comes first: it is why nothing ran.
            if let Some(i) = stats
                .iter()
                .position(|r| matches!(r, Err(Error::QueueSetup { .. })))
            {
                stats.swap_remove(i)?;
            }
            stats.into_iter().collect::<Result<Vec<_>>>()
        });
        self.info = self.ctrl.dev_info(self.info.id()).unwrap_or(self.info);
        result
    }
}

/// The (queue, tag) pairs each serving thread handles: whole queues when
/// `threads` is 0, else every `threads`-th pair of the (queue, tag) list in
/// lexicographic order, as kublk's `--per_io_tasks` does (so each queue is
/// spread over as many threads as possible).
pub fn assign_ios(queues: u16, depth: u16, threads: u16) -> Vec<Vec<(u16, u16)>> {
    if threads == 0 {
        return (0..queues)
            .map(|q| (0..depth).map(|t| (q, t)).collect())
            .collect();
    }
    let total = usize::from(queues) * usize::from(depth);
    (0..usize::from(threads))
        .map(|w| {
            (w..total)
                .step_by(usize::from(threads))
                .map(|i| {
                    (
                        (i / usize::from(depth)) as u16,
                        (i % usize::from(depth)) as u16,
                    )
                })
                .collect()
        })
        .collect()
}

/// The (queue, tag) pairs each serving thread handles when threads serve
/// whole queues (batch I/O): one queue each when `threads` is 0 or at
/// least `queues`, else queues `i`, `i + threads`, … for thread `i`, as
/// kublk's batch mode shares them out.
pub fn assign_queues(queues: u16, depth: u16, threads: u16) -> Vec<Vec<(u16, u16)>> {
    let threads = if threads == 0 || threads >= queues {
        queues
    } else {
        threads
    };
    (0..threads)
        .map(|w| {
            (w..queues)
                .step_by(usize::from(threads))
                .flat_map(|q| (0..depth).map(move |t| (q, t)))
                .collect()
        })
        .collect()
}

/// Pins the calling thread to `cpus` (no-op if empty or refused).
fn pin_to(cpus: &[usize]) {
    if cpus.is_empty() {
        return;
    }
    let mut set = rustix::thread::CpuSet::new();
    for &c in cpus {
        if c < rustix::thread::CpuSet::MAX_CPU {
            set.set(c);
        }
    }
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        log::debug!("cannot pin queue thread to {cpus:?}: {e}");
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // The signal thread first (it may be stopping us right now), then
        // no stop handle may touch the id again (it may be reused).
        drop(self.signals.take());
        self.stop.retire();
        // Kernel order: stop (aborts the queues' commands), release the
        // char device (DEL_DEV waits for its last close), then delete.
        if !self.armed {
            return;
        }
        let dev = self.info.dev_ref();
        if let Err(e) = self.ctrl.stop_dev(dev) {
            log::debug!("stopping device {}: {e}", dev.id);
        }
        drop(self.cdev.take());
        match self.ctrl.del_dev(dev) {
            Ok(()) => {}
            // Someone else's DEL_DEV (`ublk del`) got there first.
            Err(e) if e.errno() == Some(Errno::NODEV) => {
                log::debug!("device {} was already deleted", dev.id);
            }
            Err(e) => log::warn!("deleting device {}: {e}", dev.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_affinity_picks_like_kublk() {
        assert_eq!(QueueAffinity::FirstCpu.pick(&[3, 1, 2]), vec![1]);
        assert_eq!(QueueAffinity::FirstCpu.pick(&[]), Vec::<usize>::new());
        assert_eq!(QueueAffinity::QueueCpus.pick(&[0, 1]), vec![0, 1]);
        assert_eq!(QueueAffinity::Unpinned.pick(&[0, 1]), Vec::<usize>::new());
    }

    #[test]
    fn ios_are_spread_like_kublk_per_io_tasks() {
        assert_eq!(
            assign_ios(2, 2, 0),
            vec![vec![(0, 0), (0, 1)], vec![(1, 0), (1, 1)]]
        );
        assert_eq!(
            assign_ios(2, 3, 4),
            vec![
                vec![(0, 0), (1, 1)],
                vec![(0, 1), (1, 2)],
                vec![(0, 2)],
                vec![(1, 0)]
            ]
        );
        let all: usize = assign_ios(3, 128, 5).iter().map(Vec::len).sum();
        assert_eq!(all, 3 * 128);
    }

    #[test]
    fn batch_threads_share_whole_queues_like_kublk() {
        let q = |q: u16| (0..2).map(move |t| (q, t));
        assert_eq!(
            assign_queues(2, 2, 0),
            vec![q(0).collect::<Vec<_>>(), q(1).collect()]
        );
        assert_eq!(assign_queues(1, 2, 4), vec![q(0).collect::<Vec<_>>()]);
        assert_eq!(
            assign_queues(4, 2, 1),
            vec![q(0).chain(q(1)).chain(q(2)).chain(q(3)).collect::<Vec<_>>()]
        );
        assert_eq!(
            assign_queues(3, 2, 2),
            vec![q(0).chain(q(2)).collect::<Vec<_>>(), q(1).collect()]
        );
    }

    #[test]
    fn largest_request_defaults_follow_the_copy_mode() {
        assert_eq!(DeviceBuilder::new().io_bytes(), 512 << 10);
        for mode in [CopyMode::NeedGetData, CopyMode::UserCopy] {
            assert_eq!(DeviceBuilder::new().copy_mode(mode).io_bytes(), 512 << 10);
        }
        for mode in [
            CopyMode::ZeroCopy,
            CopyMode::AutoBufReg { fallback: false },
            CopyMode::AutoBufReg { fallback: true },
        ] {
            assert_eq!(DeviceBuilder::new().copy_mode(mode).io_bytes(), 1 << 20);
            // An explicit size wins, set before or after the mode.
            let b = DeviceBuilder::new().max_io_bytes(64 << 10).copy_mode(mode);
            assert_eq!(b.io_bytes(), 64 << 10);
        }
        assert!(DeviceBuilder::new().max_io_bytes(4095).validate().is_err());
    }

    #[test]
    fn thread_counts_are_checked() {
        assert!(DeviceBuilder::new().queues(2).threads(3).validate().is_ok());
        assert!(DeviceBuilder::new()
            .queues(1)
            .depth(2)
            .threads(3)
            .validate()
            .is_err());
        // Batch threads serve whole queues: more threads than queues are
        // one per queue, without UBLK_F_PER_IO_DAEMON.
        let batch = DeviceBuilder::new().queues(1).threads(4).batch(true);
        assert!(batch.validate().is_ok());
        assert_eq!(batch.serving_threads(), 0);
        assert!(!batch
            .requested_flags(Features::empty())
            .contains(Features::PER_IO_DAEMON));
        let shared = DeviceBuilder::new().queues(4).threads(1).batch(true);
        assert!(shared.validate().is_ok());
        assert_eq!(shared.serving_threads(), 1);
        assert!(!shared
            .requested_flags(Features::empty())
            .contains(Features::PER_IO_DAEMON));
        let f = DeviceBuilder::new()
            .queues(1)
            .threads(2)
            .requested_flags(Features::empty());
        assert!(f.contains(Features::PER_IO_DAEMON));
        assert!(!DeviceBuilder::new()
            .queues(2)
            .threads(2)
            .requested_flags(Features::empty())
            .contains(Features::PER_IO_DAEMON));
    }
}
