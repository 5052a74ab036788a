//! The target contract: what a block device implements (the [`Target`]
//! trait), the requests it is handed ([`Request`], [`IoDesc`], [`IoBuf`]),
//! what it answers ([`Handled`]) and how it queues its own SQEs
//! ([`Submit`]).
//!
//! This module depends on nothing of the engine that runs targets
//! ([`crate::queue`]): the engine depends on it. Ready-made targets live in
//! [`crate::targets`].
#![allow(unsafe_code)] // `Submit::push` forwards the SQE ring's contract

use std::io;

use io_uring::squeue::Entry;
use io_uring::{SubmissionQueue, Submitter};
use ublk_sys::ublksrv_io_desc;

/// A request's operation (`UBLK_IO_OP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read into the buffer.
    Read,
    /// Write from the buffer.
    Write,
    /// Make earlier writes durable.
    Flush,
    /// Discard the range.
    Discard,
    /// Write the same block over the range.
    WriteSame,
    /// Zero the range.
    WriteZeroes,
    /// Zone management operations and zone append (zoned devices).
    Zone(u8),
    /// Report zones into the buffer (zoned devices).
    ReportZones,
    /// An operation this crate does not know.
    Unknown(u8),
}

impl Op {
    /// From the low byte of `op_flags`.
    #[inline]
    pub fn from_raw(op: u8) -> Self {
        match u32::from(op) {
            ublk_sys::UBLK_IO_OP_READ => Self::Read,
            ublk_sys::UBLK_IO_OP_WRITE => Self::Write,
            ublk_sys::UBLK_IO_OP_FLUSH => Self::Flush,
            ublk_sys::UBLK_IO_OP_DISCARD => Self::Discard,
            ublk_sys::UBLK_IO_OP_WRITE_SAME => Self::WriteSame,
            ublk_sys::UBLK_IO_OP_WRITE_ZEROES => Self::WriteZeroes,
            ublk_sys::UBLK_IO_OP_REPORT_ZONES => Self::ReportZones,
            ublk_sys::UBLK_IO_OP_ZONE_OPEN..=ublk_sys::UBLK_IO_OP_ZONE_RESET => Self::Zone(op),
            _ => Self::Unknown(op),
        }
    }

    /// Whether the request carries data in a buffer.
    #[inline]
    pub fn has_data(self) -> bool {
        matches!(self, Self::Read | Self::Write | Self::ReportZones)
    }
}

bitflags::bitflags! {
    /// `UBLK_IO_F_*` request flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
    pub struct IoFlags: u32 {
        /// Fail fast: device errors.
        const FAILFAST_DEV = ublk_sys::UBLK_IO_F_FAILFAST_DEV;
        /// Fail fast: transport errors.
        const FAILFAST_TRANSPORT = ublk_sys::UBLK_IO_F_FAILFAST_TRANSPORT;
        /// Fail fast: driver errors.
        const FAILFAST_DRIVER = ublk_sys::UBLK_IO_F_FAILFAST_DRIVER;
        /// Metadata I/O.
        const META = ublk_sys::UBLK_IO_F_META;
        /// Force unit access: the write must be durable when it completes.
        const FUA = ublk_sys::UBLK_IO_F_FUA;
        /// Write zeroes without unmapping.
        const NOUNMAP = ublk_sys::UBLK_IO_F_NOUNMAP;
        /// Swap I/O.
        const SWAP = ublk_sys::UBLK_IO_F_SWAP;
        /// Auto buffer registration failed; the buffer was registered by hand.
        const NEED_REG_BUF = ublk_sys::UBLK_IO_F_NEED_REG_BUF;
        /// The request has an integrity buffer.
        const INTEGRITY = ublk_sys::UBLK_IO_F_INTEGRITY;
        /// The buffer is in registered shared memory.
        const SHMEM_ZC = ublk_sys::UBLK_IO_F_SHMEM_ZC;
    }
}

/// A decoded `ublksrv_io_desc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoDesc {
    /// The operation.
    pub op: Op,
    /// Its flags (bits 8–31 of `op_flags`, in their `UBLK_IO_F_*` positions).
    pub flags: IoFlags,
    /// First 512-byte sector.
    pub start_sector: u64,
    /// Number of sectors (zones, for `ReportZones`).
    pub nr_sectors: u32,
    /// The kernel's buffer address field (mode-dependent).
    pub addr: u64,
}

impl IoDesc {
    /// Decodes the raw descriptor.
    #[inline]
    pub fn from_raw(d: &ublksrv_io_desc) -> Self {
        Self {
            op: Op::from_raw((d.op_flags & 0xff) as u8),
            flags: IoFlags::from_bits_retain(d.op_flags & !0xff),
            start_sector: d.start_sector,
            // Both union members are u32 at the same offset.
            nr_sectors: crate::pod::union_u32(&d.__bindgen_anon_1),
            addr: d.addr,
        }
    }

    /// Byte offset of the request.
    #[inline]
    pub fn offset(&self) -> u64 {
        self.start_sector << 9
    }

    /// Byte length of the request.
    #[inline]
    pub fn len(&self) -> usize {
        (self.nr_sectors as usize) << 9
    }

    /// Whether the request is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.nr_sectors == 0
    }
}

/// Where a request's data is.
#[derive(Debug)]
pub enum IoBuf<'a> {
    /// In server memory: the request's bytes (write data on entry; fill it
    /// for reads). Its address is stable until the request completes, so a
    /// target may hand it to an SQE.
    Mem(&'a mut [u8]),
    /// In the queue ring's buffer table at this index (zero copy and auto
    /// buffer registration): use `ReadFixed`/`WriteFixed` with address 0.
    Fixed(u16),
    /// In a shared-memory buffer the server registered with
    /// [`crate::Control::reg_buf`] (`UBLK_F_SHMEM_ZC`, flag
    /// [`IoFlags::SHMEM_ZC`]): the data is at `offset` in buffer `index`,
    /// in the server's own mapping; the kernel copies nothing.
    Shmem {
        /// The index `reg_buf` returned.
        index: u16,
        /// Byte offset in that buffer.
        offset: u32,
    },
    /// No data (flush, discard, …).
    None,
}

/// The shared-memory buffers registered for zero copy (`UBLK_F_SHMEM_ZC`),
/// by the index the kernel gave each: where a target finds the bytes of a
/// request that arrives as [`IoBuf::Shmem`]. The server fills it while the
/// device runs ([`crate::shmem::ShmemBuffer::register`], then
/// [`ShmemMap::insert`]); the queue threads read it. Regions are never
/// removed, and each keeps its mapping alive, so an address handed out
/// stays valid as long as the map.
#[derive(Debug, Default)]
pub struct ShmemMap {
    regions: std::sync::RwLock<Vec<ShmemRegion>>,
}

impl ShmemMap {
    /// Adds `region` (a later one with the same index shadows nothing: the
    /// first found is used, and the kernel does not reuse a live index).
    pub fn insert(&self, region: ShmemRegion) {
        if let Ok(mut r) = self.regions.write() {
            r.push(region);
        }
    }

    /// The address of `len` bytes at `offset` in buffer `index`, if the map
    /// has that buffer and the range lies inside it.
    pub fn resolve(&self, index: u16, offset: u32, len: usize) -> Option<*mut u8> {
        let regions = self.regions.read().ok()?;
        let r = regions.iter().find(|r| r.index == index)?;
        let end = (offset as usize).checked_add(len)?;
        // Inside the mapping: the pointer arithmetic stays in bounds.
        (end <= r.len).then(|| r.addr.as_ptr().wrapping_add(offset as usize))
    }
}

/// One registered shared-memory buffer: its index, where it is mapped in
/// this process, and what keeps it mapped.
#[derive(Clone)]
pub struct ShmemRegion {
    index: u16,
    addr: std::ptr::NonNull<u8>,
    len: usize,
    _owner: std::sync::Arc<dyn Send + Sync>,
}

impl ShmemRegion {
    /// Buffer `index` at `addr`, `len` bytes.
    ///
    /// # Safety
    /// `addr..addr + len` must be memory of this process that stays mapped
    /// (and is nothing but this buffer) as long as `owner` lives.
    pub unsafe fn new(
        index: u16,
        addr: std::ptr::NonNull<u8>,
        len: usize,
        owner: std::sync::Arc<dyn Send + Sync>,
    ) -> Self {
        Self {
            index,
            addr,
            len,
            _owner: owner,
        }
    }
}

// SAFETY: the address is only handed out as a raw pointer (for SQEs), and
// the owner that keeps the memory mapped is itself Send + Sync.
unsafe impl Send for ShmemRegion {}
// SAFETY: as for Send; nothing is read or written through `&self`.
unsafe impl Sync for ShmemRegion {}

impl std::fmt::Debug for ShmemRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmemRegion")
            .field("index", &self.index)
            .field("addr", &self.addr)
            .field("len", &self.len)
            .finish()
    }
}

/// One request handed to a [`Target`].
#[derive(Debug)]
pub struct Request<'a> {
    /// The queue.
    pub q_id: u16,
    /// The tag: unique in the queue while the request is in flight.
    pub tag: u16,
    /// The decoded descriptor.
    pub desc: IoDesc,
    /// The data.
    pub buf: IoBuf<'a>,
    /// The request's integrity metadata (`UBLK_F_INTEGRITY` with user
    /// copy, requests flagged [`IoFlags::INTEGRITY`]): the metadata of
    /// every interval of the data, in order (its length is
    /// [`crate::IntegrityParams::metadata_len`] of the data's). A write's
    /// metadata on entry; fill it for a read. `None` for requests without.
    pub integrity: Option<&'a mut [u8]>,
}

/// What a target did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Complete now with this result: bytes transferred, or `-errno`.
    Done(i32),
    /// SQEs were queued with [`Submit::push`]; the result comes through
    /// [`Target::complete`].
    Queued,
}

/// Submission access given to a [`Target`] while it handles a request (in
/// [`Target::handle`] or [`Target::complete`]): SQEs pushed here go on the
/// queue's own ring, and their CQEs come back to [`Target::complete`] for
/// the same request.
pub struct Submit<'r, 's> {
    sq: &'r mut SubmissionQueue<'s, Entry>,
    submitter: &'r Submitter<'s>,
    inflight: &'r mut usize,
    /// The user data of the request being handled; a pushed entry's `data`
    /// goes into bits 32–63.
    user_data: u64,
    /// The engine linked a buffer registration ahead of the next entry.
    registered: bool,
    /// Requests the target completed with [`Submit::complete`]: (tag,
    /// result), finished by the queue when the target's call returns.
    completed: &'r mut Vec<(u16, i32)>,
}

impl std::fmt::Debug for Submit<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submit")
            .field("inflight", &self.inflight)
            .field("user_data", &format_args!("{:#x}", self.user_data))
            .field("registered", &self.registered)
            .field("completed", &self.completed.len())
            .finish()
    }
}

impl<'r, 's> Submit<'r, 's> {
    /// Access to `sq` for entries tagged `user_data` (bits 32–63 zero),
    /// counting each pushed entry in `inflight`; what the target completes
    /// with [`Submit::complete`] goes into `completed`.
    #[inline]
    pub(crate) fn new(
        sq: &'r mut SubmissionQueue<'s, Entry>,
        submitter: &'r Submitter<'s>,
        inflight: &'r mut usize,
        user_data: u64,
        completed: &'r mut Vec<(u16, i32)>,
    ) -> Self {
        Self {
            sq,
            submitter,
            inflight,
            user_data,
            completed,
            registered: false,
        }
    }

    /// Says that a buffer registration is queued, hard-linked to the next
    /// entry (see [`Submit::buffer_registered`]).
    #[inline]
    pub(crate) fn after_registration(mut self, registered: bool) -> Self {
        self.registered = registered;
        self
    }

    /// Whether the engine linked a buffer registration (zero copy, or auto
    /// registration's fallback) ahead of the request being handled: the
    /// first entry pushed runs after it. A target that queues several
    /// entries over the [`IoBuf::Fixed`] buffer sets
    /// [`io_uring::squeue::Flags::IO_HARDLINK`] on all but its last so they
    /// all do (the engine keeps [`Target::sqes_per_request`] entries of
    /// room after the registration, so the chain reaches the kernel in one
    /// submission).
    #[inline]
    pub fn buffer_registered(&self) -> bool {
        self.registered
    }

    /// Hands the queued entries to the kernel now, without waiting.
    pub fn submit(&mut self) -> io::Result<usize> {
        self.sq.sync();
        self.submitter.submit()
    }

    /// Submits what is queued unless `n` more entries fit, so that a chain
    /// of `n` linked entries is not cut by a full ring.
    pub(crate) fn make_room(&mut self, n: usize) -> io::Result<()> {
        if self.sq.capacity() - self.sq.len() < n {
            match self.submit() {
                Err(e) if e.raw_os_error() != Some(libc::EINTR) => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }

    /// Completes request `tag` of this queue with `res` once the target's
    /// call returns — for a target whose CQEs do not map one-to-one onto
    /// requests (a socket's receive carries whichever reply comes next).
    /// Only for requests the target answered with [`Handled::Queued`] and
    /// has not completed yet, in a worker serving one whole queue (`tag`
    /// names a request of [`Request::q_id`]).
    #[inline]
    pub fn complete(&mut self, tag: u16, res: i32) {
        // The queue reserved room for every io it serves: a target can
        // complete each of its queued requests once, so this never
        // allocates.
        self.completed.push((tag, res));
    }

    /// Queues `entry` for the request being handled; its CQE comes back
    /// through [`Target::complete`] with `data`. The entry's user data is
    /// replaced. When the ring is full, what is queued is submitted first.
    ///
    /// # Safety
    /// Every buffer `entry` points to must stay valid until its CQE arrives
    /// (request buffers handed out in [`IoBuf::Mem`] do).
    #[inline]
    pub unsafe fn push(&mut self, data: u32, entry: Entry) -> io::Result<()> {
        let entry = entry.user_data(self.user_data | u64::from(data) << 32);
        // SAFETY: forwarded to our caller.
        unsafe { self.push_raw(&entry) }?;
        *self.inflight += 1;
        Ok(())
    }

    /// Queues `entry` as it is (user data included), submitting what is
    /// queued when the ring is full; counts nothing.
    ///
    /// # Safety
    /// As for [`Submit::push`].
    #[inline]
    pub(crate) unsafe fn push_raw(&mut self, entry: &Entry) -> io::Result<()> {
        loop {
            // SAFETY: forwarded to our caller.
            if unsafe { self.sq.push(entry) }.is_ok() {
                return Ok(());
            }
            // Full: hand what we have to the kernel and try again.
            self.sq.sync();
            match self.submitter.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    // CQ overflow backpressure: let completions drain first.
                    match self.submitter.submit_and_wait(1) {
                        Err(e) if e.raw_os_error() != Some(libc::EINTR) => return Err(e),
                        _ => {}
                    }
                }
                Err(e) => return Err(e),
            }
            self.sq.sync();
        }
    }
}

/// A block device's logic, one instance per queue (so it needs no locks).
pub trait Target {
    /// Handles one request. Ranges are already checked against the device
    /// capacity and unknown operations already answered with `-EOPNOTSUPP`.
    fn handle(&mut self, sub: &mut Submit<'_, '_>, req: Request<'_>) -> Handled;

    /// A CQE of an SQE this target queued for `tag` with `data` has arrived.
    /// Return `Done` to complete the request, or `Queued` after queueing more.
    fn complete(&mut self, _sub: &mut Submit<'_, '_>, _tag: u16, _data: u32, res: i32) -> Handled {
        Handled::Done(res)
    }

    /// Files to register in the queue ring (from index 1; index 0 is the
    /// char device), so SQEs can use `types::Fixed(1 + i)`.
    fn fixed_files(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }

    /// The most entries [`Target::handle`] pushes for one request. A
    /// buffer registration the engine links ahead of them
    /// ([`Submit::buffer_registered`]) gets this much room in the same
    /// submission.
    fn sqes_per_request(&self) -> usize {
        1
    }

    /// Called before the queue fetches (queue `q_id`, tag `tag`) for the
    /// first time, in tag order, with the earlier fetches queued but
    /// perhaps not submitted ([`Submit::submit`] sends them). For fault
    /// injection; nothing by default.
    fn before_fetch(&mut self, _sub: &mut Submit<'_, '_>, _q_id: u16, _tag: u16) {}
}

/// Implements [`Target`] for a pointer to a target by forwarding to it.
macro_rules! forward_target {
    ($($(#[$doc:meta])* $ptr:ty;)*) => {$(
        $(#[$doc])*
        impl<T: Target + ?Sized> Target for $ptr {
            #[inline]
            fn handle(&mut self, sub: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
                (**self).handle(sub, req)
            }
            #[inline]
            fn complete(&mut self, sub: &mut Submit<'_, '_>, tag: u16, data: u32, res: i32) -> Handled {
                (**self).complete(sub, tag, data, res)
            }
            fn fixed_files(&self) -> Vec<std::os::fd::RawFd> {
                (**self).fixed_files()
            }
            fn sqes_per_request(&self) -> usize {
                (**self).sqes_per_request()
            }
            fn before_fetch(&mut self, sub: &mut Submit<'_, '_>, q_id: u16, tag: u16) {
                (**self).before_fetch(sub, q_id, tag)
            }
        }
    )*};
}

forward_target! {
    /// A target chosen at run time: `Box<dyn Target>` (one virtual call per
    /// request and completion; an enum of the candidates avoids it).
    Box<T>;
    /// A target borrowed for the run (e.g. one made before `Device::run`).
    &mut T;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every request with its length and counts the calls.
    struct Count(u32);

    impl Target for Count {
        fn handle(&mut self, _: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
            self.0 += 1;
            Handled::Done(req.desc.len() as i32)
        }
        fn fixed_files(&self) -> Vec<std::os::fd::RawFd> {
            vec![7]
        }
    }

    #[test]
    fn boxed_and_borrowed_targets_forward_every_method() {
        let mut ring = io_uring::IoUring::new(4).unwrap();
        let (submitter, mut sq, _) = ring.split();
        let mut inflight = 0;
        let mut completed = Vec::new();
        let mut sub = Submit::new(&mut sq, &submitter, &mut inflight, 0, &mut completed);
        let req = || Request {
            q_id: 0,
            tag: 3,
            desc: IoDesc::from_raw(&ublksrv_io_desc {
                op_flags: ublk_sys::UBLK_IO_OP_FLUSH,
                __bindgen_anon_1: ublk_sys::ublksrv_io_desc__bindgen_ty_1 { nr_sectors: 1 },
                ..Default::default()
            }),
            buf: IoBuf::None,
            integrity: None,
        };
        // Through a generic parameter, as `Device::run` takes targets.
        fn serve<T: Target>(mut t: T, sub: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
            assert_eq!(t.fixed_files(), vec![7]);
            assert_eq!(t.complete(sub, 3, 0, -5), Handled::Done(-5));
            t.handle(sub, req)
        }
        let picked: Box<dyn Target> = Box::new(Count(0));
        assert_eq!(serve(picked, &mut sub, req()), Handled::Done(512));
        let mut owned = Count(0);
        assert_eq!(serve(&mut owned, &mut sub, req()), Handled::Done(512));
        assert_eq!(owned.0, 1);
    }

    #[test]
    fn decodes_op_flags_and_union() {
        let raw = ublksrv_io_desc {
            op_flags: ublk_sys::UBLK_IO_OP_WRITE | ublk_sys::UBLK_IO_F_FUA,
            __bindgen_anon_1: ublk_sys::ublksrv_io_desc__bindgen_ty_1 { nr_sectors: 8 },
            start_sector: 16,
            addr: 0xdead000,
        };
        let d = IoDesc::from_raw(&raw);
        assert_eq!(d.op, Op::Write);
        assert_eq!(d.flags, IoFlags::FUA);
        assert_eq!((d.offset(), d.len()), (8192, 4096));
        assert_eq!(Op::from_raw(13), Op::Zone(13));
        assert_eq!(Op::from_raw(18), Op::ReportZones);
        assert_eq!(Op::from_raw(99), Op::Unknown(99));
    }
}
