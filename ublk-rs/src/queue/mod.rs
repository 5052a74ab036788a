//! The engine that runs a [`Target`]: one queue's io_uring, descriptor
//! array and buffers, and the FETCH → handle → COMMIT_AND_FETCH loop that
//! serves it.
//!
//! - this file: the copy modes, setting a queue up, and the run loop that
//!   waits for CQEs and routes them by their user data;
//! - `dispatch`: what happens to one request, from its descriptor to its
//!   commit (buffer registration, user copy, the target's `handle`);
//! - `batch`: batch I/O (`UBLK_F_BATCH_IO`): the multishot fetch and the
//!   bulk commits.
//!
//! The engine depends on the target contract ([`crate::target`]), never
//! the reverse.
#![allow(unsafe_code)] // ring submission of entries that point at our buffers

mod batch;
mod dispatch;

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use io_uring::squeue::Entry;
use io_uring::{cqueue, squeue, types, IoUring};

use self::batch::Batch;
use crate::cmd::Encoding;
use crate::mem::{DescArray, IoBuffers};
use crate::target::{Handled, IoDesc, Submit, Target};
use crate::{Error, Features, Result};

pub use self::dispatch::user_copy_offset;

/// How request data moves between the kernel and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// The kernel copies to and from a buffer per tag that the server owns.
    #[default]
    Copy,
    /// Like `Copy`, but writes arrive first without data (`UBLK_F_NEED_GET_DATA`).
    NeedGetData,
    /// The server copies with pread/pwrite on the char device (`UBLK_F_USER_COPY`).
    UserCopy,
    /// The server registers the request's pages into its ring
    /// (`UBLK_F_SUPPORT_ZERO_COPY`).
    ZeroCopy,
    /// The kernel registers the request's pages before delivering it
    /// (`UBLK_F_AUTO_BUF_REG`); with `fallback`, a failed registration is
    /// reported and done by the server instead of failing the request.
    AutoBufReg {
        /// Pass `UBLK_AUTO_BUF_REG_FALLBACK`.
        fallback: bool,
    },
}

impl CopyMode {
    /// The device flags this mode needs.
    pub fn features(self) -> Features {
        match self {
            Self::Copy => Features::empty(),
            Self::NeedGetData => Features::NEED_GET_DATA,
            Self::UserCopy => Features::USER_COPY,
            Self::ZeroCopy => Features::SUPPORT_ZERO_COPY,
            Self::AutoBufReg { .. } => Features::AUTO_BUF_REG,
        }
    }

    /// The mode a device with `flags` uses (`fallback` for auto registration).
    pub fn from_flags(flags: Features, fallback: bool) -> Self {
        if flags.contains(Features::AUTO_BUF_REG) {
            Self::AutoBufReg { fallback }
        } else if flags.contains(Features::SUPPORT_ZERO_COPY) {
            Self::ZeroCopy
        } else if flags.contains(Features::USER_COPY) {
            Self::UserCopy
        } else if flags.contains(Features::NEED_GET_DATA) {
            Self::NeedGetData
        } else {
            Self::Copy
        }
    }

    /// Whether the server allocates a buffer per tag.
    pub fn has_buffers(self) -> bool {
        matches!(self, Self::Copy | Self::NeedGetData | Self::UserCopy)
    }

    fn uses_buffer_table(self) -> bool {
        matches!(self, Self::ZeroCopy | Self::AutoBufReg { .. })
    }
}

/// Everything a queue needs to know about its device.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// The device id.
    pub dev_id: u32,
    /// This queue.
    pub q_id: u16,
    /// Tags in the queue.
    pub depth: u16,
    /// Largest request in bytes.
    pub max_io_bytes: u32,
    /// Device capacity in 512-byte sectors (requests past it fail with EIO).
    pub capacity_sectors: u64,
    /// How data moves.
    pub mode: CopyMode,
    /// Opcode encoding.
    pub encoding: Encoding,
    /// Batch I/O (`UBLK_F_BATCH_IO`): one multishot fetch and bulk commits.
    pub batch: bool,
    /// Send the ublk commands to the char device's plain descriptor
    /// instead of registering it as fixed file 0 of the ring (kublk's
    /// `--no_ublk_fixed_fd`; slot 0 stays empty, so a target's files keep
    /// their indices).
    pub no_fixed_cdev: bool,
    /// The device's integrity parameters (`UBLK_F_INTEGRITY`, user copy
    /// only): requests flagged [`crate::IoFlags::INTEGRITY`] get their
    /// metadata in [`crate::target::Request::integrity`].
    pub integrity: Option<crate::IntegrityParams>,
}

/// A worker's io index: the position of one (queue, tag) pair in the list
/// the worker serves. It is what user data and the ring's buffer table are
/// indexed by; it equals the kernel's tag only for a worker that serves
/// one whole queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
struct IoIndex(u16);

impl IoIndex {
    #[inline]
    fn get(self) -> usize {
        usize::from(self.0)
    }
}

/// What a CQE's user data says it is for (bits 16–23).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// FETCH_REQ, COMMIT_AND_FETCH_REQ, NEED_GET_DATA.
    Cmd = 0,
    /// An SQE the target pushed.
    Target = 1,
    Reg = 2,
    Unreg = 3,
    /// Batch: the multishot FETCH_IO_CMDS.
    Fetch = 4,
    /// Batch: a COMMIT_IO_CMDS (data: its buffer's id).
    Commit = 5,
    /// Batch: PREP_IO_CMDS.
    Prep = 6,
}

impl Kind {
    const ALL: [Self; 7] = [
        Self::Cmd,
        Self::Target,
        Self::Reg,
        Self::Unreg,
        Self::Fetch,
        Self::Commit,
        Self::Prep,
    ];
}

// user_data: bits 0–15 the worker's io index, 16–23 the kind, 32–63 data
// (the target's, or a commit buffer's id).
#[inline]
const fn user_data(kind: Kind, io: IoIndex, data: u32) -> u64 {
    io.0 as u64 | (kind as u64) << 16 | (data as u64) << 32
}

#[inline]
fn decode_user_data(ud: u64) -> (Option<Kind>, IoIndex, u32) {
    let kind = Kind::ALL.get(((ud >> 16) & 0xff) as usize).copied();
    (kind, IoIndex(ud as u16), (ud >> 32) as u32)
}

/// The char device is registered file 0 of a queue ring (unless
/// [`QueueConfig::no_fixed_cdev`]: then slot 0 is empty).
pub const CDEV_FIXED: types::Fixed = types::Fixed(0);

/// Counters a queue keeps; returned when it stops.
///
/// `enters`, `submitted` and `completions` say how well the run loop
/// batches: SQEs per `io_uring_enter` is `submitted / enters`, CQEs per
/// wake-up `completions / enters`, and both per request divide by
/// `requests`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests completed.
    pub requests: u64,
    /// Requests completed with an error.
    pub errors: u64,
    /// Requests whose data was in registered shared memory
    /// (`UBLK_IO_F_SHMEM_ZC`): served in place, copied by nobody.
    pub shmem_zc: u64,
    /// `io_uring_enter` calls of the run loop (each submits and waits).
    pub enters: u64,
    /// SQEs those calls submitted.
    pub submitted: u64,
    /// CQEs the run loop handled.
    pub completions: u64,
}

/// What the engine remembers of the request an io is serving.
#[derive(Debug, Clone, Copy, Default)]
struct IoState {
    desc: Option<IoDesc>,
    registered: bool,
}

/// One (queue, tag) a worker serves, at its [`IoIndex`] in `Queue::ios`.
#[derive(Debug, Clone, Copy)]
struct IoSlot {
    q_id: u16,
    /// The kernel's tag.
    tag: u16,
    /// Index into `Queue::queues`.
    qi: usize,
}

/// What a worker keeps per queue it serves.
#[derive(Debug)]
struct QueueMem {
    q_id: u16,
    descs: DescArray,
    bufs: Option<IoBuffers>,
    /// Per-tag metadata buffers (integrity with user copy).
    meta: Option<IoBuffers>,
}

/// A queue ready to serve — or, with `UBLK_F_PER_IO_DAEMON`, any set of
/// (queue, tag) pairs. Created in the thread that will run it (the kernel
/// binds each tag's commands to the task that fetched it).
pub struct Queue<'fd> {
    cfg: QueueConfig,
    cdev: BorrowedFd<'fd>,
    /// Closed first, in `drop`: the kernel may use the memory below (the
    /// buffer ring, the buffers, the descriptors) until the ring is gone.
    ring: ManuallyDrop<IoUring<squeue::Entry, cqueue::Entry>>,
    /// Batch I/O: one per queue served, in the order of `queues` (empty
    /// without batch I/O).
    batches: Vec<Batch>,
    queues: Vec<QueueMem>,
    ios: Vec<IoSlot>,
    states: Vec<IoState>,
    cmd_inflight: usize,
    target_inflight: usize,
    /// A command came back with `UBLK_IO_RES_ABORT` (STOP_DEV, QUIESCE_DEV).
    aborted: bool,
    /// Requests a target completed with `Submit::complete` during its
    /// current call, finished by `finish_completed` when it returns (room
    /// for every io reserved here, so the hot path does not allocate).
    completed: Vec<(u16, i32)>,
    stats: QueueStats,
}

impl Drop for Queue<'_> {
    fn drop(&mut self) {
        // SAFETY: `ring` is dropped exactly once, here, before the memory
        // registered with it (the other fields, dropped after this).
        unsafe { ManuallyDrop::drop(&mut self.ring) };
    }
}

impl std::fmt::Debug for Queue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("cfg", &self.cfg)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn build_ring(entries: u32, cq_entries: u32) -> io::Result<IoUring> {
    // Newest first: SINGLE_ISSUER + DEFER_TASKRUN (6.1), then COOP_TASKRUN
    // (5.19), then nothing.
    let mut b = IoUring::builder();
    b.setup_cqsize(cq_entries)
        .setup_single_issuer()
        .setup_defer_taskrun();
    match b.build(entries) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        r => return r,
    }
    let mut b = IoUring::builder();
    b.setup_cqsize(cq_entries).setup_coop_taskrun();
    match b.build(entries) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        r => return r,
    }
    IoUring::builder().setup_cqsize(cq_entries).build(entries)
}

impl<'fd> Queue<'fd> {
    /// Where the ublk commands go: fixed file 0, or the plain descriptor
    /// ([`QueueConfig::no_fixed_cdev`]).
    #[inline]
    fn cdev_ref(&self) -> crate::cmd::FileRef {
        if self.cfg.no_fixed_cdev {
            crate::cmd::FileRef::Fd(self.cdev.as_raw_fd())
        } else {
            CDEV_FIXED.into()
        }
    }

    /// Sets up queue `cfg.q_id` on the char device `cdev`, registering
    /// `files` after it in the ring's file table.
    pub fn new(cfg: QueueConfig, cdev: BorrowedFd<'fd>, files: &[RawFd]) -> Result<Self> {
        let ios: Vec<(u16, u16)> = (0..cfg.depth).map(|t| (cfg.q_id, t)).collect();
        Self::with_ios(cfg, &ios, cdev, files)
    }

    /// Sets up a worker for the (queue, tag) pairs `ios` of the device
    /// `cfg` describes (`cfg.q_id` is only used in messages). Serving part
    /// of a queue needs `UBLK_F_PER_IO_DAEMON`; batch I/O needs whole
    /// queues (one or more, each in tag order).
    pub fn with_ios(
        cfg: QueueConfig,
        ios: &[(u16, u16)],
        cdev: BorrowedFd<'fd>,
        files: &[RawFd],
    ) -> Result<Self> {
        let invalid = |what: String| Error::Config(what);
        if cfg.depth == 0 || u32::from(cfg.depth) > ublk_sys::UBLK_MAX_QUEUE_DEPTH {
            return Err(invalid(format!(
                "queue depth {} is outside 1..={}",
                cfg.depth,
                ublk_sys::UBLK_MAX_QUEUE_DEPTH
            )));
        }
        if ios.is_empty()
            || ios.len() > usize::from(u16::MAX)
            || ios.iter().any(|&(_, t)| t >= cfg.depth)
        {
            return Err(invalid(format!(
                "a worker needs 1..=65535 ios with tags below the depth {}",
                cfg.depth
            )));
        }
        if cfg.batch && !whole_queues(ios, cfg.depth) {
            return Err(invalid(
                "batch I/O needs each worker to serve whole queues".into(),
            ));
        }
        if cfg.batch && cfg.mode == CopyMode::NeedGetData {
            return Err(invalid("batch I/O does not work with NEED_GET_DATA".into()));
        }
        let mut queues: Vec<QueueMem> = Vec::new();
        let mut slots = Vec::with_capacity(ios.len());
        for &(q_id, tag) in ios {
            let qi = match queues.iter().position(|q| q.q_id == q_id) {
                Some(qi) => qi,
                None => {
                    let bufs = cfg
                        .mode
                        .has_buffers()
                        .then(|| IoBuffers::new(usize::from(cfg.depth), cfg.max_io_bytes as usize))
                        .transpose()?;
                    let meta = match (cfg.integrity, cfg.mode) {
                        (Some(i), CopyMode::UserCopy) => Some(IoBuffers::new(
                            usize::from(cfg.depth),
                            i.metadata_len(u64::from(cfg.max_io_bytes)) as usize,
                        )?),
                        _ => None,
                    };
                    queues.push(QueueMem {
                        q_id,
                        descs: DescArray::map(cdev, q_id, cfg.depth)?,
                        bufs,
                        meta,
                    });
                    queues.len() - 1
                }
            };
            slots.push(IoSlot { q_id, tag, qi });
        }
        let depth = ios.len() as u32;
        let entries = (depth * 2).next_power_of_two().clamp(64, 16384);
        let ring = build_ring(entries, (depth * 8).next_power_of_two().clamp(128, 65536))
            .map_err(Error::io("creating the queue io_uring"))?;
        let mut fds = Vec::with_capacity(1 + files.len());
        fds.push(if cfg.no_fixed_cdev {
            -1
        } else {
            cdev.as_raw_fd()
        });
        fds.extend_from_slice(files);
        ring.submitter()
            .register_files(&fds)
            .map_err(Error::io("registering the char device as a fixed file"))?;
        if cfg.mode.uses_buffer_table() {
            ring.submitter()
                .register_buffers_sparse(depth)
                .map_err(Error::io("registering a sparse buffer table"))?;
        }
        let mut batches = Vec::new();
        if cfg.batch {
            // Whole queues in tag order: queue `qi`'s tag 0 is io qi * depth.
            for (qi, q) in queues.iter().enumerate() {
                let base = u16::try_from(qi * usize::from(cfg.depth))
                    .map_err(|_| invalid("too many ios for one worker".into()))?;
                batches.push(Batch::new(&cfg, &ring, q.q_id, base, qi as u16)?);
            }
        }
        let completed = Vec::with_capacity(slots.len().max(usize::from(cfg.depth)));
        Ok(Self {
            cfg,
            cdev,
            ring: ManuallyDrop::new(ring),
            batches,
            queues,
            states: vec![IoState::default(); slots.len()],
            ios: slots,
            cmd_inflight: 0,
            target_inflight: 0,
            aborted: false,
            completed,
            stats: QueueStats::default(),
        })
    }

    /// The (queue, tag) of io `io`.
    #[inline]
    fn slot(&self, io: IoIndex) -> IoSlot {
        self.ios.get(io.get()).copied().unwrap_or(IoSlot {
            q_id: self.cfg.q_id,
            tag: io.0,
            qi: 0,
        })
    }

    /// Submits FETCH_REQ for every tag. Fails if the kernel refuses any at
    /// once (so the caller never sends START_DEV to a queue that cannot serve).
    pub fn fetch_all(&mut self) -> Result<()> {
        self.fetch_all_with(&mut NoHooks)
    }

    /// [`Queue::fetch_all`], calling [`Target::before_fetch`] of `target`
    /// before each tag's FETCH_REQ is queued (fault injection dies there),
    /// but not in batch mode, whose one command fetches every tag.
    pub fn fetch_all_with<T: Target + ?Sized>(&mut self, target: &mut T) -> Result<()> {
        if !self.batches.is_empty() {
            return self.batch_start();
        }
        for io in 0..self.ios.len() as u16 {
            let io = IoIndex(io);
            let s = self.slot(io);
            self.with_submit(io, |sub| target.before_fetch(sub, s.q_id, s.tag));
            let e = self.fetch_entry(io).user_data(user_data(Kind::Cmd, io, 0));
            // SAFETY: the entry points at this queue's buffer for `io` (or at
            // nothing), which lives as long as the queue; the queue waits for
            // every command before it is dropped (see `run`).
            self.with_submit(io, |sub| unsafe { sub.push_raw(&e) })
                .map_err(Error::io("queueing FETCH_REQ"))?;
            self.cmd_inflight += 1;
        }
        self.ring
            .submit()
            .map_err(Error::io("submitting FETCH_REQ"))?;
        // A refused fetch completes at once; a good one stays pending.
        let mut refused = None;
        for cqe in self.ring.completion() {
            self.cmd_inflight = self.cmd_inflight.saturating_sub(1);
            refused.get_or_insert(cqe.result());
        }
        match refused {
            Some(res) => Err(self.refused("UBLK_U_IO_FETCH_REQ", res)),
            None => Ok(()),
        }
    }

    /// The error of an I/O command the kernel answered `res` at set-up.
    fn refused(&self, cmd: &'static str, res: i32) -> Error {
        Error::Command {
            cmd,
            dev_id: Some(self.cfg.dev_id),
            errno: rustix::io::Errno::from_raw_os_error(if res < 0 { -res } else { libc::EPROTO }),
        }
    }

    /// Serves requests with `target` until the device stops (every command
    /// is answered with `UBLK_IO_RES_ABORT`) or the kernel refuses them all.
    pub fn run<T: Target + ?Sized>(mut self, target: &mut T) -> Result<QueueStats> {
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(usize::from(self.cfg.depth) * 8);
        loop {
            self.flush_commits();
            let batch_busy = self.batches.iter().any(Batch::busy);
            if self.cmd_inflight + self.target_inflight == 0 && !batch_busy {
                break;
            }
            // QUIESCE_DEV aborts only the idle commands: those re-armed by
            // later commits are cancelled when the ring closes. So once
            // aborted, stop when our own work is done and committed.
            if self.aborted && self.target_inflight == 0 && self.batches.is_empty() {
                let _ = self.ring.submit();
                break;
            }
            self.stats.enters += 1;
            match self.ring.submit_and_wait(1) {
                Ok(n) => self.stats.submitted += n as u64,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => return Err(Error::io("waiting for queue completions")(e)),
            }
            cqes.clear();
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            self.stats.completions += cqes.len() as u64;
            for &(ud, res, flags) in &cqes {
                self.on_cqe(target, ud, res, flags);
            }
        }
        Ok(self.stats)
    }

    fn on_cqe<T: Target + ?Sized>(&mut self, target: &mut T, ud: u64, res: i32, flags: u32) {
        let (kind, io, data) = decode_user_data(ud);
        match kind {
            Some(Kind::Cmd) => {
                self.cmd_inflight = self.cmd_inflight.saturating_sub(1);
                self.on_cmd_cqe(target, io, res);
            }
            Some(Kind::Target) => {
                self.target_inflight = self.target_inflight.saturating_sub(1);
                let tag = self.slot(io).tag;
                let handled = self.with_submit(io, |sub| target.complete(sub, tag, data, res));
                if let Handled::Done(r) = handled {
                    self.finish(io, r);
                }
                self.finish_completed();
            }
            Some(Kind::Fetch) => self.on_fetch_cqe(target, io, res, flags),
            Some(Kind::Commit) => self.on_commit_cqe(io, data, res),
            Some(Kind::Reg | Kind::Unreg) => {
                self.target_inflight = self.target_inflight.saturating_sub(1);
                if res < 0 {
                    log::warn!(
                        "queue {} tag {}: buffer (un)registration failed: {}",
                        self.cfg.q_id,
                        self.slot(io).tag,
                        io::Error::from_raw_os_error(-res)
                    );
                }
            }
            Some(Kind::Prep) | None => log::error!(
                "queue {}: completion with unknown user data {ud:#x}",
                self.cfg.q_id
            ),
        }
    }

    /// Runs `f` with submission access whose target entries belong to `io`.
    #[inline]
    fn with_submit<R>(&mut self, io: IoIndex, f: impl FnOnce(&mut Submit<'_, '_>) -> R) -> R {
        let (submitter, mut sq, _) = self.ring.split();
        let mut sub = Submit::new(
            &mut sq,
            &submitter,
            &mut self.target_inflight,
            user_data(Kind::Target, io, 0),
            &mut self.completed,
        );
        f(&mut sub)
    }

    /// Queues one of our own commands, counting it.
    fn push_own(&mut self, kind: Kind, io: IoIndex, data: u32, e: Entry) -> io::Result<()> {
        let e = e.user_data(user_data(kind, io, data));
        // SAFETY: our entries point at this queue's buffers (or batch
        // buffers kept until their CQE), which outlive every command (`run`
        // returns only when none is in flight).
        self.with_submit(io, |sub| unsafe { sub.push_raw(&e) })?;
        match kind {
            Kind::Cmd | Kind::Fetch => self.cmd_inflight += 1,
            Kind::Reg | Kind::Unreg => self.target_inflight += 1,
            Kind::Commit | Kind::Prep | Kind::Target => {}
        }
        Ok(())
    }

    /// [`Queue::push_own`] where a failure can only be logged: only a dead
    /// ring fails, and the loop then ends with the commands still counted.
    fn push_own_or_log(&mut self, kind: Kind, io: IoIndex, e: Entry) {
        if let Err(e) = self.push_own(kind, io, 0, e) {
            log::error!(
                "queue {} tag {}: cannot queue a command: {e}",
                self.cfg.q_id,
                self.slot(io).tag
            );
        }
    }
}

/// Whether `ios` are whole queues of `depth` tags, each in tag order, no
/// queue twice.
fn whole_queues(ios: &[(u16, u16)], depth: u16) -> bool {
    let depth = usize::from(depth);
    if ios.is_empty() || ios.len() % depth != 0 {
        return false;
    }
    let mut seen = Vec::new();
    ios.chunks_exact(depth).all(|chunk| {
        let q = chunk[0].0;
        let whole = chunk
            .iter()
            .enumerate()
            .all(|(i, &(cq, t))| cq == q && usize::from(t) == i);
        let first = !seen.contains(&q);
        seen.push(q);
        whole && first
    })
}

/// The target of [`Queue::fetch_all`]: nothing to do before a fetch (it
/// serves no request).
struct NoHooks;

impl Target for NoHooks {
    fn handle(&mut self, _: &mut Submit<'_, '_>, _: crate::target::Request<'_>) -> Handled {
        Handled::Done(-libc::EIO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        let ud = user_data(Kind::Target, IoIndex(0xabcd), 0x1234_5678);
        assert_eq!(
            decode_user_data(ud),
            (Some(Kind::Target), IoIndex(0xabcd), 0x1234_5678)
        );
        for k in Kind::ALL {
            assert_eq!(decode_user_data(user_data(k, IoIndex(1), 0)).0, Some(k));
        }
        assert_eq!(decode_user_data(7 << 16).0, None);
    }

    #[test]
    fn batch_workers_take_whole_queues_only() {
        let q = |q: u16, tags: std::ops::Range<u16>| tags.map(move |t| (q, t));
        let two: Vec<_> = q(0, 0..4).chain(q(2, 0..4)).collect();
        assert!(whole_queues(&two, 4));
        assert!(whole_queues(&q(1, 0..4).collect::<Vec<_>>(), 4));
        let part: Vec<_> = q(0, 0..3).collect();
        assert!(!whole_queues(&part, 4));
        let twice: Vec<_> = q(0, 0..4).chain(q(0, 0..4)).collect();
        assert!(!whole_queues(&twice, 4));
        let shuffled = [(0, 1), (0, 0)];
        assert!(!whole_queues(&shuffled, 2));
        let mixed = [(0, 0), (1, 1)];
        assert!(!whole_queues(&mixed, 2));
        assert!(!whole_queues(&[], 2));
    }

    #[test]
    fn copy_mode_follows_device_flags() {
        assert_eq!(
            CopyMode::from_flags(Features::empty(), false),
            CopyMode::Copy
        );
        assert_eq!(
            CopyMode::from_flags(Features::USER_COPY, false),
            CopyMode::UserCopy
        );
        assert_eq!(
            CopyMode::from_flags(Features::AUTO_BUF_REG | Features::SUPPORT_ZERO_COPY, true),
            CopyMode::AutoBufReg { fallback: true }
        );
        for m in [
            CopyMode::Copy,
            CopyMode::NeedGetData,
            CopyMode::UserCopy,
            CopyMode::ZeroCopy,
        ] {
            assert_eq!(CopyMode::from_flags(m.features(), false), m);
        }
    }
}
