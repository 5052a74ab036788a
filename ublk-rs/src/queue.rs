//! One queue of a device: its io_uring, descriptor array and buffers, and the
//! FETCH → handle → COMMIT_AND_FETCH loop that serves it.
#![allow(unsafe_code)] // ring submission of entries that point at our buffers

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use io_uring::squeue::{Entry, Flags as SqeFlags};
use io_uring::{cqueue, squeue, types, IoUring, SubmissionQueue, Submitter};

use crate::cmd::{self, AutoBufReg, Encoding};
use crate::mem::{BufRing, DescArray, IoBuffers};
use crate::target::{Handled, IoBuf, IoDesc, IoFlags, Op, Request, Target};
use crate::{Error, Features, Result};

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

/// The offset in `/dev/ublkcN` of a request's data, for `UBLK_F_USER_COPY`.
#[inline]
pub const fn user_copy_offset(q_id: u16, tag: u16, byte_offset: u64) -> u64 {
    ublk_sys::UBLKSRV_IO_BUF_OFFSET as u64
        + ((q_id as u64) << ublk_sys::UBLK_QID_OFF)
        + ((tag as u64) << ublk_sys::UBLK_TAG_OFF)
        + byte_offset
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
}

// user_data: bits 0–15 the worker's io index (the tag, for a worker that
// serves one whole queue), 16–23 kind, 32–63 target data.
const KIND_CMD: u64 = 0;
const KIND_TARGET: u64 = 1;
const KIND_REG: u64 = 2;
const KIND_UNREG: u64 = 3;
const KIND_FETCH: u64 = 4;
const KIND_COMMIT: u64 = 5;
const KIND_PREP: u64 = 6;

/// The provided-buffer group of a queue's batch fetch.
const FETCH_BUF_GROUP: u16 = 0;
/// Buffers in a queue's fetch ring.
const FETCH_BUFS: u16 = 8;

#[inline]
const fn user_data(kind: u64, tag: u16, data: u32) -> u64 {
    tag as u64 | kind << 16 | (data as u64) << 32
}

/// The char device is always registered file 0 of a queue ring.
pub const CDEV_FIXED: types::Fixed = types::Fixed(0);

/// Submission access given to a [`Target`] while it handles requests.
pub struct Submit<'r, 's> {
    sq: &'r mut SubmissionQueue<'s, Entry>,
    submitter: &'r Submitter<'s>,
    target_inflight: &'r mut usize,
    /// The worker io index of the request being handled.
    current: u16,
    /// Requests a target completed with [`Submit::complete`]: (tag,
    /// result), finished by the queue when the target returns.
    completed: &'r mut Vec<(u16, i32)>,
}

impl std::fmt::Debug for Submit<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submit")
            .field("target_inflight", &self.target_inflight)
            .finish()
    }
}

impl Submit<'_, '_> {
    /// Queues `entry` for the request being handled (tag `_tag`, from
    /// [`Target::handle`] or [`Target::complete`]); its CQE comes back
    /// through [`Target::complete`] with `data`. The entry's user data is
    /// replaced.
    ///
    /// # Safety
    /// Every buffer `entry` points to must stay valid until its CQE arrives
    /// (request buffers handed out in [`IoBuf::Mem`] do).
    #[inline]
    pub unsafe fn push(&mut self, _tag: u16, data: u32, entry: Entry) -> io::Result<()> {
        // SAFETY: forwarded to our caller.
        unsafe { self.push_kind(KIND_TARGET, self.current, data, entry) }?;
        *self.target_inflight += 1;
        Ok(())
    }

    /// Completes request `tag` of this queue with `res` once the target's
    /// call returns — for a target whose CQEs do not map one-to-one onto
    /// requests (a socket's receive carries whichever reply comes next).
    /// Only for requests the target answered with [`Handled::Queued`] and
    /// has not completed yet; in a worker serving a whole queue.
    #[inline]
    pub fn complete(&mut self, tag: u16, res: i32) {
        // Capacity is the depth, reserved up front: no allocation here.
        self.completed.push((tag, res));
    }

    /// # Safety
    /// As for [`Submit::push`].
    #[inline]
    unsafe fn push_kind(&mut self, kind: u64, tag: u16, data: u32, entry: Entry) -> io::Result<()> {
        let entry = entry.user_data(user_data(kind, tag, data));
        loop {
            // SAFETY: forwarded to our caller.
            if unsafe { self.sq.push(&entry) }.is_ok() {
                return Ok(());
            }
            // Full: hand what we have to the kernel and try again.
            self.sq.sync();
            match self.submitter.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // CQ overflow backpressure: let completions drain first.
                    self.submitter.submit_and_wait(1).or_else(ignore_eintr)?;
                }
                Err(e) => return Err(e),
            }
            self.sq.sync();
        }
    }
}

fn ignore_eintr(e: io::Error) -> io::Result<usize> {
    if e.raw_os_error() == Some(libc::EINTR) {
        Ok(0)
    } else {
        Err(e)
    }
}

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
    /// `io_uring_enter` calls of the run loop (each submits and waits).
    pub enters: u64,
    /// SQEs those calls submitted.
    pub submitted: u64,
    /// CQEs the run loop handled.
    pub completions: u64,
}

/// Batch I/O state of a queue.
#[derive(Debug)]
struct Batch {
    fetch_ring: BufRing,
    flags: u16,
    elem_bytes: usize,
    /// Elements of finished requests, committed at the next flush.
    pending: Vec<u8>,
    /// Commit buffers in flight, by the id in their user data.
    in_flight: Vec<Vec<u8>>,
    /// Ids of free slots in `in_flight`.
    free: Vec<u32>,
    /// Commits (and the prep) in flight.
    cmds: usize,
    /// Tags of the fetch CQE being handled.
    tags: Vec<u16>,
    /// The device is going away: do not rearm the fetch.
    stopping: bool,
}

impl Batch {
    fn push_elem(&mut self, tag: u16, result: i32, buf_addr: Option<*mut u8>) {
        let mut hdr = [0u8; 8];
        hdr[0..2].copy_from_slice(&tag.to_ne_bytes());
        hdr[2..4].copy_from_slice(&tag.to_ne_bytes()); // buf_index (auto registration)
        hdr[4..8].copy_from_slice(&result.to_ne_bytes());
        self.pending.extend_from_slice(&hdr);
        if self.flags as u32 & ublk_sys::UBLK_BATCH_F_HAS_BUF_ADDR != 0 {
            self.pending.extend_from_slice(
                &(buf_addr.unwrap_or(std::ptr::null_mut()) as u64).to_ne_bytes(),
            );
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct TagState {
    desc: Option<IoDesc>,
    registered: bool,
}

/// One (queue, tag) a worker serves; its index in `Queue::ios` is the io
/// index used in user data and as the buffer-table index.
#[derive(Debug, Clone, Copy)]
struct IoSlot {
    q_id: u16,
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
}

/// A queue ready to serve — or, with `UBLK_F_PER_IO_DAEMON`, any set of
/// (queue, tag) pairs. Created in the thread that will run it (the kernel
/// binds each tag's commands to the task that fetched it).
pub struct Queue<'fd> {
    cfg: QueueConfig,
    cdev: BorrowedFd<'fd>,
    // Declared before the memory it uses (buffer ring, buffers), so the
    // ring is closed first.
    ring: IoUring<squeue::Entry, cqueue::Entry>,
    batch: Option<Batch>,
    queues: Vec<QueueMem>,
    ios: Vec<IoSlot>,
    tags: Vec<TagState>,
    cmd_inflight: usize,
    target_inflight: usize,
    /// A command came back with `UBLK_IO_RES_ABORT` (STOP_DEV, QUIESCE_DEV).
    aborted: bool,
    /// Completions a target asked for with `Submit::complete`.
    completed: Vec<(u16, i32)>,
    stats: QueueStats,
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
    /// Sets up queue `cfg.q_id` on the char device `cdev`, registering
    /// `files` after it in the ring's file table.
    pub fn new(cfg: QueueConfig, cdev: BorrowedFd<'fd>, files: &[RawFd]) -> Result<Self> {
        let ios: Vec<(u16, u16)> = (0..cfg.depth).map(|t| (cfg.q_id, t)).collect();
        Self::with_ios(cfg, &ios, cdev, files)
    }

    /// Sets up a worker for the (queue, tag) pairs `ios` of the device
    /// `cfg` describes (`cfg.q_id` is only used in messages). Serving part
    /// of a queue needs `UBLK_F_PER_IO_DAEMON`; batch I/O needs one whole
    /// queue.
    pub fn with_ios(
        cfg: QueueConfig,
        ios: &[(u16, u16)],
        cdev: BorrowedFd<'fd>,
        files: &[RawFd],
    ) -> Result<Self> {
        if cfg.depth == 0 || u32::from(cfg.depth) > ublk_sys::UBLK_MAX_QUEUE_DEPTH {
            return Err(Error::Invalid(format!(
                "queue depth {} is outside 1..=4096",
                cfg.depth
            )));
        }
        if ios.is_empty()
            || ios.len() > usize::from(u16::MAX)
            || ios.iter().any(|&(_, t)| t >= cfg.depth)
        {
            return Err(Error::Invalid(format!(
                "a worker needs 1..=65535 ios with tags below the depth {}",
                cfg.depth
            )));
        }
        let whole_queue = ios.len() == usize::from(cfg.depth)
            && ios
                .iter()
                .enumerate()
                .all(|(i, &(q, t))| q == ios[0].0 && usize::from(t) == i);
        if cfg.batch && !whole_queue {
            return Err(Error::Invalid(
                "batch I/O needs each worker to serve one whole queue".into(),
            ));
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
                    queues.push(QueueMem {
                        q_id,
                        descs: DescArray::map(cdev, q_id, cfg.depth)?,
                        bufs,
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
        fds.push(cdev.as_raw_fd());
        fds.extend_from_slice(files);
        ring.submitter()
            .register_files(&fds)
            .map_err(Error::io("registering the char device as a fixed file"))?;
        if cfg.mode.uses_buffer_table() {
            ring.submitter()
                .register_buffers_sparse(depth)
                .map_err(Error::io("registering a sparse buffer table"))?;
        }
        let batch = if cfg.batch {
            if cfg.mode == CopyMode::NeedGetData {
                return Err(Error::Invalid(
                    "batch I/O does not support NEED_GET_DATA".into(),
                ));
            }
            let mut flags = 0u16;
            if matches!(cfg.mode, CopyMode::Copy) {
                flags |= ublk_sys::UBLK_BATCH_F_HAS_BUF_ADDR as u16;
            }
            if matches!(cfg.mode, CopyMode::AutoBufReg { fallback: true }) {
                flags |= ublk_sys::UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK as u16;
            }
            let elem_bytes = usize::from(cmd::batch_elem_bytes(flags));
            let fetch_ring = BufRing::new(FETCH_BUFS, usize::from(cfg.depth) * size_of::<u16>())?;
            // SAFETY: the ring memory lives in the queue's `batch`, dropped
            // after `ring` (field order), so it outlives the registration.
            unsafe {
                ring.submitter().register_buf_ring_with_flags(
                    fetch_ring.ring_addr(),
                    fetch_ring.entries(),
                    FETCH_BUF_GROUP,
                    0,
                )
            }
            .map_err(Error::io("registering the batch fetch buffer ring"))?;
            let cap = usize::from(cfg.depth) * elem_bytes;
            Some(Batch {
                fetch_ring,
                flags,
                elem_bytes,
                pending: Vec::with_capacity(cap),
                in_flight: Vec::new(),
                free: Vec::new(),
                cmds: 0,
                tags: Vec::with_capacity(usize::from(cfg.depth)),
                stopping: false,
            })
        } else {
            None
        };
        Ok(Self {
            cfg,
            cdev,
            ring,
            batch,
            queues,
            tags: vec![TagState::default(); slots.len()],
            ios: slots,
            cmd_inflight: 0,
            target_inflight: 0,
            aborted: false,
            completed: Vec::with_capacity(usize::from(cfg.depth)),
            stats: QueueStats::default(),
        })
    }

    /// The (queue, tag) of io index `io`.
    #[inline]
    fn slot(&self, io: u16) -> IoSlot {
        self.ios.get(usize::from(io)).copied().unwrap_or(IoSlot {
            q_id: self.cfg.q_id,
            tag: io,
            qi: 0,
        })
    }

    /// The buffer address of io `io` for FETCH/COMMIT in the copy modes.
    #[inline]
    fn buf_addr(&self, io: u16) -> Option<*mut u8> {
        let s = self.slot(io);
        match self.cfg.mode {
            CopyMode::Copy | CopyMode::NeedGetData => self
                .queues
                .get(s.qi)?
                .bufs
                .as_ref()
                .and_then(|b| b.addr(usize::from(s.tag))),
            _ => None,
        }
    }

    #[inline]
    fn auto_reg(&self, tag: u16) -> Option<AutoBufReg> {
        match self.cfg.mode {
            CopyMode::AutoBufReg { fallback } => Some(AutoBufReg {
                index: tag,
                flags: if fallback {
                    ublk_sys::UBLK_AUTO_BUF_REG_FALLBACK as u8
                } else {
                    0
                },
            }),
            _ => None,
        }
    }

    fn fetch_entry(&self, tag: u16) -> Entry {
        let s = self.slot(tag);
        let mut c = cmd::FetchReq::new(CDEV_FIXED, s.q_id, s.tag).encoding(self.cfg.encoding);
        if let Some(a) = self.buf_addr(tag) {
            c = c.buf_addr(a);
        }
        if let Some(r) = self.auto_reg(tag) {
            c = c.auto_buf_reg(r);
        }
        c.build()
    }

    fn commit_entry(&self, tag: u16, res: i32) -> Entry {
        let s = self.slot(tag);
        let mut c =
            cmd::CommitAndFetchReq::new(CDEV_FIXED, s.q_id, s.tag, res).encoding(self.cfg.encoding);
        if let Some(a) = self.buf_addr(tag) {
            c = c.buf_addr(a);
        }
        if let Some(r) = self.auto_reg(tag) {
            c = c.auto_buf_reg(r);
        }
        c.build()
    }

    /// Submits FETCH_REQ for every tag. Fails if the kernel refuses any at
    /// once (so the caller never sends START_DEV to a queue that cannot serve).
    pub fn fetch_all(&mut self) -> Result<()> {
        if self.batch.is_some() {
            return self.batch_start();
        }
        for tag in 0..self.ios.len() as u16 {
            let e = self.fetch_entry(tag);
            // SAFETY: the entry points at this queue's buffer for `tag` (or at
            // nothing), which lives as long as the queue; the queue waits for
            // every command before it is dropped (see `run`).
            self.with_submit(|sub| unsafe { sub.push_kind(KIND_CMD, tag, 0, e) })
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
            Some(res) => Err(Error::Command {
                cmd: "UBLK_U_IO_FETCH_REQ",
                dev_id: Some(self.cfg.dev_id),
                errno: if res < 0 { -res } else { libc::EPROTO },
            }),
            None => Ok(()),
        }
    }

    /// Batch mode: PREP_IO_CMDS for every tag (waited for: it completes at
    /// once), then one multishot FETCH_IO_CMDS.
    fn batch_start(&mut self) -> Result<()> {
        let depth = self.cfg.depth;
        let addrs: Vec<Option<*mut u8>> = (0..depth).map(|t| self.buf_addr(t)).collect();
        let Some(b) = self.batch.as_mut() else {
            return Ok(());
        };
        for (tag, addr) in (0..depth).zip(addrs) {
            b.push_elem(tag, 0, addr);
        }
        let prep = std::mem::take(&mut b.pending);
        let e =
            cmd::PrepIoCmds::new(CDEV_FIXED, self.cfg.q_id, b.flags, depth, prep.as_ptr()).build();
        // SAFETY: `prep` lives until after the wait below, which returns
        // this command's completion (nothing else is in flight).
        unsafe { self.with_submit(|sub| sub.push_kind(KIND_PREP, 0, 0, e)) }
            .map_err(Error::io("queueing PREP_IO_CMDS"))?;
        self.ring
            .submit_and_wait(1)
            .map_err(Error::io("submitting PREP_IO_CMDS"))?;
        let res = self
            .ring
            .completion()
            .next()
            .map_or(-libc::EPROTO, |c| c.result());
        if let Some(b) = self.batch.as_mut() {
            b.pending = prep;
            b.pending.clear();
        }
        if res < 0 {
            return Err(Error::Command {
                cmd: "UBLK_U_IO_PREP_IO_CMDS",
                dev_id: Some(self.cfg.dev_id),
                errno: -res,
            });
        }
        self.arm_fetch();
        self.ring
            .submit()
            .map_err(Error::io("submitting FETCH_IO_CMDS"))?;
        match self.ring.completion().next() {
            Some(c) => Err(Error::Command {
                cmd: "UBLK_U_IO_FETCH_IO_CMDS",
                dev_id: Some(self.cfg.dev_id),
                errno: if c.result() < 0 {
                    -c.result()
                } else {
                    libc::EPROTO
                },
            }),
            None => Ok(()),
        }
    }

    fn arm_fetch(&mut self) {
        let e = cmd::FetchIoCmds::new(CDEV_FIXED, self.cfg.q_id, FETCH_BUF_GROUP).build();
        self.push_own(KIND_FETCH, 0, e);
    }

    /// Batch mode: commits everything finished since the last flush in one
    /// COMMIT_IO_CMDS.
    fn flush_commits(&mut self) {
        let Some(b) = self.batch.as_mut() else { return };
        if b.pending.is_empty() {
            return;
        }
        let id = match b.free.pop() {
            Some(id) => id,
            None => {
                b.in_flight.push(Vec::with_capacity(b.pending.capacity()));
                (b.in_flight.len() - 1) as u32
            }
        };
        let slot = &mut b.in_flight[id as usize];
        std::mem::swap(slot, &mut b.pending);
        let nr = (slot.len() / b.elem_bytes) as u16;
        let e =
            cmd::CommitIoCmds::new(CDEV_FIXED, self.cfg.q_id, b.flags, nr, slot.as_ptr()).build();
        b.cmds += 1;
        // SAFETY: the elements stay in `in_flight[id]` until this command's
        // CQE returns the slot to `free`.
        let r = self.with_submit(|sub| unsafe { sub.push_kind(KIND_COMMIT, 0, id, e) });
        if let Err(e) = r {
            log::error!("queue {}: cannot queue COMMIT_IO_CMDS: {e}", self.cfg.q_id);
            if let Some(b) = self.batch.as_mut() {
                b.cmds = b.cmds.saturating_sub(1);
                b.in_flight[id as usize].clear();
                b.free.push(id);
            }
        }
    }

    fn on_fetch_cqe<T: Target + ?Sized>(&mut self, target: &mut T, res: i32, flags: u32) {
        let Some(b) = self.batch.as_mut() else { return };
        b.tags.clear();
        if let Some(bid) = cqueue::buffer_select(flags) {
            let n = usize::try_from(res).unwrap_or(0) / size_of::<u16>();
            if let Some(buf) = b.fetch_ring.buf(bid, n * size_of::<u16>()) {
                b.tags.extend(
                    buf.chunks_exact(2)
                        .map(|c| u16::from_ne_bytes([c[0], c[1]])),
                );
            }
            b.fetch_ring.provide(bid);
            b.fetch_ring.publish();
        }
        let more = cqueue::more(flags);
        if !more {
            self.cmd_inflight = self.cmd_inflight.saturating_sub(1);
        }
        let tags = self
            .batch
            .as_mut()
            .map(|b| std::mem::take(&mut b.tags))
            .unwrap_or_default();
        for &tag in &tags {
            self.dispatch(target, tag);
        }
        if let Some(b) = self.batch.as_mut() {
            b.tags = tags;
            if !more {
                if res >= 0 || res == -libc::ENOBUFS {
                    if !b.stopping {
                        self.arm_fetch();
                    }
                } else {
                    b.stopping = true;
                    if res != ublk_sys::UBLK_IO_RES_ABORT {
                        log::error!(
                            "queue {}: FETCH_IO_CMDS failed: {}",
                            self.cfg.q_id,
                            io::Error::from_raw_os_error(-res)
                        );
                    }
                }
            }
        }
    }

    fn on_commit_cqe(&mut self, id: u32, res: i32) {
        let q_id = self.cfg.q_id;
        let Some(b) = self.batch.as_mut() else { return };
        b.cmds = b.cmds.saturating_sub(1);
        let Some(slot) = b.in_flight.get_mut(id as usize) else {
            return;
        };
        let total = slot.len();
        if res < 0 {
            if res != ublk_sys::UBLK_IO_RES_ABORT && !b.stopping {
                log::error!(
                    "queue {q_id}: COMMIT_IO_CMDS failed: {}",
                    io::Error::from_raw_os_error(-res)
                );
            }
        } else if (res as usize) < total {
            // The element at `res` was refused; those after it were not
            // looked at and are committed again.
            // Whole elements only, whatever the kernel returned.
            let bad = res as usize / b.elem_bytes * b.elem_bytes;
            let tag = slot
                .get(bad..bad + 2)
                .map_or(u16::MAX, |b| u16::from_ne_bytes([b[0], b[1]]));
            log::error!("queue {q_id}: kernel refused the commit of tag {tag}");
            let rest = bad + b.elem_bytes;
            if rest < total {
                b.pending.extend_from_slice(&slot[rest..]);
            }
        }
        slot.clear();
        b.free.push(id);
    }

    /// Serves requests with `target` until the device stops (every command
    /// is answered with `UBLK_IO_RES_ABORT`) or the kernel refuses them all.
    pub fn run<T: Target + ?Sized>(mut self, target: &mut T) -> Result<QueueStats> {
        let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(usize::from(self.cfg.depth) * 8);
        loop {
            self.flush_commits();
            let batch_busy = self
                .batch
                .as_ref()
                .is_some_and(|b| b.cmds > 0 || !b.pending.is_empty());
            if self.cmd_inflight + self.target_inflight == 0 && !batch_busy {
                break;
            }
            // QUIESCE_DEV aborts only the idle commands: those re-armed by
            // later commits are cancelled when the ring closes. So once
            // aborted, stop when our own work is done and committed.
            if self.aborted && self.target_inflight == 0 && self.batch.is_none() {
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
        let tag = ud as u16;
        let data = (ud >> 32) as u32;
        match (ud >> 16) & 0xff {
            KIND_CMD => {
                self.cmd_inflight = self.cmd_inflight.saturating_sub(1);
                match res {
                    r if r == ublk_sys::UBLK_IO_RES_OK as i32 => self.dispatch(target, tag),
                    r if r == ublk_sys::UBLK_IO_RES_NEED_GET_DATA as i32 => self.need_get_data(tag),
                    ublk_sys::UBLK_IO_RES_ABORT => self.aborted = true,
                    r => log::error!(
                        "queue {} tag {tag}: io command failed: {}",
                        self.cfg.q_id,
                        io::Error::from_raw_os_error(-r)
                    ),
                }
            }
            KIND_TARGET => {
                self.target_inflight = self.target_inflight.saturating_sub(1);
                let ktag = self.slot(tag).tag;
                let handled = self.with_submit(|sub| {
                    sub.current = tag;
                    target.complete(sub, ktag, data, res)
                });
                if let Handled::Done(r) = handled {
                    self.finish(tag, r);
                }
                self.finish_completed();
            }
            KIND_FETCH => self.on_fetch_cqe(target, res, flags),
            KIND_COMMIT => self.on_commit_cqe(data, res),
            KIND_REG | KIND_UNREG => {
                self.target_inflight = self.target_inflight.saturating_sub(1);
                if res < 0 {
                    log::warn!(
                        "queue {} tag {tag}: buffer (un)registration failed: {}",
                        self.cfg.q_id,
                        io::Error::from_raw_os_error(-res)
                    );
                }
            }
            _ => log::error!(
                "queue {}: completion with unknown user data {ud:#x}",
                self.cfg.q_id
            ),
        }
    }

    fn with_submit<R>(&mut self, f: impl FnOnce(&mut Submit<'_, '_>) -> R) -> R {
        let (submitter, mut sq, _) = self.ring.split();
        let mut sub = Submit {
            sq: &mut sq,
            submitter: &submitter,
            target_inflight: &mut self.target_inflight,
            current: 0,
            completed: &mut self.completed,
        };
        f(&mut sub)
    }

    /// Finishes what the target completed with `Submit::complete`. Its
    /// tags are the kernel's; in a worker serving a whole queue they are
    /// the io indexes.
    fn finish_completed(&mut self) {
        let mut done = std::mem::take(&mut self.completed);
        for &(tag, res) in &done {
            let io = if self.slot(tag).tag == tag {
                Some(tag)
            } else {
                self.ios.iter().position(|s| s.tag == tag).map(|i| i as u16)
            };
            match io {
                Some(io) => self.finish(io, res),
                None => log::error!(
                    "queue {}: target completed unknown tag {tag}",
                    self.cfg.q_id
                ),
            }
        }
        done.clear();
        self.completed = done;
    }

    /// Queues one of our own commands, counting it.
    fn push_own(&mut self, kind: u64, tag: u16, e: Entry) {
        // SAFETY: our entries point at this queue's buffers, which outlive
        // every command (`run` returns only when none is in flight).
        let r = self.with_submit(|sub| unsafe { sub.push_kind(kind, tag, 0, e) });
        match r {
            Ok(()) if kind == KIND_CMD || kind == KIND_FETCH => self.cmd_inflight += 1,
            Ok(()) => self.target_inflight += 1,
            // Only a dead ring fails here; the loop then ends with the
            // commands that are still counted.
            Err(e) => log::error!(
                "queue {} tag {tag}: cannot queue a command: {e}",
                self.cfg.q_id
            ),
        }
    }

    fn need_get_data(&mut self, tag: u16) {
        let s = self.slot(tag);
        let mut c = cmd::NeedGetData::new(CDEV_FIXED, s.q_id, s.tag).encoding(self.cfg.encoding);
        if let Some(a) = self.buf_addr(tag) {
            c = c.buf_addr(a);
        }
        self.push_own(KIND_CMD, tag, c.build());
    }

    fn register(&mut self, tag: u16) {
        let s = self.slot(tag);
        let e = cmd::RegisterIoBuf::new(CDEV_FIXED, s.q_id, s.tag, tag)
            .encoding(self.cfg.encoding)
            .build();
        // Linked so the target's first SQE runs only after the registration.
        self.push_own(KIND_REG, tag, e.flags(SqeFlags::IO_HARDLINK));
        if let Some(t) = self.tags.get_mut(usize::from(tag)) {
            t.registered = true;
        }
    }

    /// Checks a request the kernel delivered; `Err` is the result to complete it with.
    fn check(&self, d: &IoDesc) -> std::result::Result<(), i32> {
        match d.op {
            Op::Unknown(_) | Op::Zone(_) | Op::ReportZones | Op::WriteSame => {
                return Err(-libc::EOPNOTSUPP)
            }
            Op::Flush => return Ok(()),
            Op::Read | Op::Write | Op::Discard | Op::WriteZeroes => {}
        }
        let end = d.start_sector.checked_add(u64::from(d.nr_sectors));
        if end.is_none_or(|e| e > self.cfg.capacity_sectors) {
            return Err(-libc::EIO);
        }
        if d.op.has_data() && d.len() > self.cfg.max_io_bytes as usize {
            return Err(-libc::EIO);
        }
        Ok(())
    }

    fn dispatch<T: Target + ?Sized>(&mut self, target: &mut T, tag: u16) {
        let s = self.slot(tag);
        let Some(raw) = self.queues.get(s.qi).and_then(|q| q.descs.get(s.tag)) else {
            log::error!(
                "queue {}: kernel delivered tag {} past the depth",
                s.q_id,
                s.tag
            );
            return;
        };
        let d = IoDesc::from_raw(&raw);
        if let Some(t) = self.tags.get_mut(usize::from(tag)) {
            *t = TagState {
                desc: Some(d),
                registered: false,
            };
        }
        if let Err(res) = self.check(&d) {
            return self.finish(tag, res);
        }
        let q_id = s.q_id;
        let buf_kind = match self.cfg.mode {
            _ if !d.op.has_data() => BufKind::None,
            CopyMode::ZeroCopy => {
                self.register(tag);
                BufKind::Fixed
            }
            CopyMode::AutoBufReg { .. } => {
                if d.flags.contains(IoFlags::NEED_REG_BUF) {
                    self.register(tag);
                }
                BufKind::Fixed
            }
            _ => BufKind::Mem,
        };
        if buf_kind == BufKind::Mem
            && self.cfg.mode == CopyMode::UserCopy
            && d.op == Op::Write
            && !d.flags.contains(IoFlags::SHMEM_ZC)
        {
            if let Err(res) = self.user_copy(tag, d.len(), false) {
                return self.finish(tag, res);
            }
        }
        let handled = {
            let (submitter, mut sq, _) = self.ring.split();
            let mut sub = Submit {
                sq: &mut sq,
                submitter: &submitter,
                target_inflight: &mut self.target_inflight,
                current: tag,
                completed: &mut self.completed,
            };
            let buf = match buf_kind {
                _ if d.flags.contains(IoFlags::SHMEM_ZC) => IoBuf::Shmem {
                    index: (d.addr >> ublk_sys::UBLK_SHMEM_ZC_IDX_OFF) as u16,
                    offset: d.addr as u32,
                },
                BufKind::None => IoBuf::None,
                BufKind::Fixed => IoBuf::Fixed(tag),
                BufKind::Mem => match self
                    .queues
                    .get_mut(s.qi)
                    .and_then(|q| q.bufs.as_mut())
                    .and_then(|b| b.slice_mut(usize::from(s.tag), d.len()))
                {
                    Some(s) => IoBuf::Mem(s),
                    None => IoBuf::None,
                },
            };
            target.handle(
                &mut sub,
                Request {
                    q_id,
                    tag: s.tag,
                    desc: d,
                    buf,
                },
            )
        };
        if let Handled::Done(res) = handled {
            self.finish(tag, res);
        }
        self.finish_completed();
    }

    /// pread (`to_server`) or pwrite the request's data through the char device.
    fn user_copy(&mut self, tag: u16, len: usize, to_kernel: bool) -> std::result::Result<(), i32> {
        let s = self.slot(tag);
        let off = user_copy_offset(s.q_id, s.tag, 0);
        let Some(buf) = self
            .queues
            .get_mut(s.qi)
            .and_then(|q| q.bufs.as_mut())
            .and_then(|b| b.slice_mut(usize::from(s.tag), len))
        else {
            return Err(-libc::EIO);
        };
        let r = if to_kernel {
            rustix::io::pwrite(self.cdev, buf, off)
        } else {
            rustix::io::pread(self.cdev, buf, off)
        };
        match r {
            Ok(n) if n == len => Ok(()),
            Ok(_) => Err(-libc::EIO),
            Err(e) => Err(-e.raw_os_error()),
        }
    }

    /// Completes `tag` with `res`: copies read data out (user copy), drops a
    /// buffer registration, and commits (which also fetches the next request).
    fn finish(&mut self, tag: u16, mut res: i32) {
        let state = self.tags.get(usize::from(tag)).copied().unwrap_or_default();
        if let (CopyMode::UserCopy, Some(d)) = (self.cfg.mode, state.desc) {
            if d.op == Op::Read && res > 0 && !d.flags.contains(IoFlags::SHMEM_ZC) {
                if let Err(e) = self.user_copy(tag, (res as usize).min(d.len()), true) {
                    res = e;
                }
            }
        }
        if state.registered {
            let s = self.slot(tag);
            let e = cmd::UnregisterIoBuf::new(CDEV_FIXED, s.q_id, s.tag, tag)
                .encoding(self.cfg.encoding)
                .build();
            self.push_own(KIND_UNREG, tag, e);
        }
        self.stats.requests += 1;
        self.stats.errors += u64::from(res < 0);
        if self.batch.is_some() {
            let addr = self.buf_addr(tag);
            if let Some(b) = self.batch.as_mut() {
                b.push_elem(tag, res, addr);
            }
            return;
        }
        let e = self.commit_entry(tag, res);
        self.push_own(KIND_CMD, tag, e);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BufKind {
    None,
    Fixed,
    Mem,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_copy_offsets_follow_the_uapi_encoding() {
        assert_eq!(user_copy_offset(0, 0, 0), 0x8000_0000);
        assert_eq!(user_copy_offset(0, 1, 0), 0x8000_0000 + (1 << 25));
        assert_eq!(user_copy_offset(1, 0, 512), 0x8000_0000 + (1 << 41) + 512);
    }

    #[test]
    fn user_data_round_trips() {
        let ud = user_data(KIND_TARGET, 0xabcd, 0x1234_5678);
        assert_eq!(ud as u16, 0xabcd);
        assert_eq!((ud >> 16) & 0xff, KIND_TARGET);
        assert_eq!((ud >> 32) as u32, 0x1234_5678);
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
