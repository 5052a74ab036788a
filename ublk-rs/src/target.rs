//! What a block device implements: the [`Target`] trait and the requests it
//! is handed.

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
}

/// What a target did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Complete now with this result: bytes transferred, or `-errno`.
    Done(i32),
    /// SQEs were queued with [`crate::queue::Submit::push`]; the result comes
    /// through [`Target::complete`].
    Queued,
}

/// A block device's logic, one instance per queue (so it needs no locks).
pub trait Target {
    /// Handles one request. Ranges are already checked against the device
    /// capacity and unknown operations already answered with `-EOPNOTSUPP`.
    fn handle(&mut self, sub: &mut crate::queue::Submit<'_, '_>, req: Request<'_>) -> Handled;

    /// A CQE of an SQE this target queued for `tag` with `data` has arrived.
    /// Return `Done` to complete the request, or `Queued` after queueing more.
    fn complete(
        &mut self,
        _sub: &mut crate::queue::Submit<'_, '_>,
        _tag: u16,
        _data: u32,
        res: i32,
    ) -> Handled {
        Handled::Done(res)
    }

    /// Files to register in the queue ring (from index 1; index 0 is the
    /// char device), so SQEs can use `types::Fixed(1 + i)`.
    fn fixed_files(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }

    /// The most entries [`Target::handle`] pushes for one request. A
    /// buffer registration the queue links ahead of them
    /// ([`crate::queue::Submit::buffer_registered`]) gets this much room
    /// in the same submission.
    fn sqes_per_request(&self) -> usize {
        1
    }

    /// Called before the queue fetches (queue `q_id`, tag `tag`) for the
    /// first time, in tag order, with the earlier fetches queued but
    /// perhaps not submitted ([`crate::queue::Submit::submit`] sends them).
    /// For fault injection; nothing by default.
    fn before_fetch(&mut self, _sub: &mut crate::queue::Submit<'_, '_>, _q_id: u16, _tag: u16) {}
}

/// The io_uring operation that serves `req` from a file or block device
/// registered in the queue ring as fixed file `file` (what a loop-style
/// target does):
///
/// * READ and WRITE at the request's offset, into or from
///   [`IoBuf::Mem`] (`Read`/`Write`) or [`IoBuf::Fixed`]
///   (`ReadFixed`/`WriteFixed`); a FUA write is `RWF_DSYNC`;
/// * FLUSH is `fdatasync`;
/// * DISCARD punches a hole; WRITE_ZEROES zeroes the range, punching a
///   hole unless the request says [`IoFlags::NOUNMAP`].
///
/// `None` for what a file cannot do this way (WRITE_SAME, zone operations,
/// [`IoBuf::Shmem`] or missing buffers): complete those with an error or
/// serve them otherwise. The entry's result is the bytes moved for READ
/// and WRITE and 0 for the others, which the driver takes as success.
///
/// Building the entry is safe; pushing it (`Submit::push`) is not, because
/// a [`IoBuf::Mem`] entry points at the request's buffer.
pub fn file_entry(
    file: io_uring::types::Fixed,
    req: &mut Request<'_>,
) -> Option<io_uring::squeue::Entry> {
    use io_uring::{opcode, types};
    let d = req.desc;
    let len = d.len() as u32;
    let off = d.offset();
    let rw_flags = if d.flags.contains(IoFlags::FUA) {
        libc::RWF_DSYNC
    } else {
        0
    };
    let fallocate = |mode| {
        opcode::Fallocate::new(file, u64::from(len))
            .offset(off)
            .mode(mode)
            .build()
    };
    Some(match (d.op, &mut req.buf) {
        (Op::Read, IoBuf::Mem(b)) => opcode::Read::new(file, b.as_mut_ptr(), len)
            .offset(off)
            .build(),
        (Op::Read, IoBuf::Fixed(i)) => opcode::ReadFixed::new(file, std::ptr::null_mut(), len, *i)
            .offset(off)
            .build(),
        (Op::Write, IoBuf::Mem(b)) => opcode::Write::new(file, b.as_ptr(), len)
            .offset(off)
            .rw_flags(rw_flags)
            .build(),
        (Op::Write, IoBuf::Fixed(i)) => opcode::WriteFixed::new(file, std::ptr::null(), len, *i)
            .offset(off)
            .rw_flags(rw_flags)
            .build(),
        (Op::Flush, _) => opcode::Fsync::new(file)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        (Op::Discard, _) => fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
        (Op::WriteZeroes, _) if d.flags.contains(IoFlags::NOUNMAP) => {
            fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
        }
        (Op::WriteZeroes, _) => fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
        _ => return None,
    })
}

/// A complete loop-style target: every request is served from one file or
/// block device with [`file_entry`], asynchronously on the queue's ring
/// (the file is the queue ring's fixed file 1). Operations a file cannot do
/// complete with `-EOPNOTSUPP`; with [`FileTarget::read_only`], writes,
/// discards and write-zeroes complete with `-EROFS`.
///
/// `F` is anything holding the fd: a `File`, an `OwnedFd`, or an
/// `Arc<File>` shared by the queues.
#[derive(Debug, Clone)]
pub struct FileTarget<F> {
    file: F,
    read_only: bool,
}

impl<F: std::os::fd::AsFd> FileTarget<F> {
    /// The fixed-file index the file has in each queue ring.
    pub const FIXED: io_uring::types::Fixed = io_uring::types::Fixed(1);

    /// Serves requests from `file`.
    pub fn new(file: F) -> Self {
        Self {
            file,
            read_only: false,
        }
    }

    /// Refuses everything that would change the file.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// The file.
    pub fn file(&self) -> &F {
        &self.file
    }
}

impl<F: std::os::fd::AsFd> Target for FileTarget<F> {
    // The one submission outside the queue module: of the request's own
    // buffer, which the queue keeps alive until the request completes.
    #[allow(unsafe_code)]
    fn handle(&mut self, sub: &mut crate::queue::Submit<'_, '_>, mut req: Request<'_>) -> Handled {
        if self.read_only && matches!(req.desc.op, Op::Write | Op::Discard | Op::WriteZeroes) {
            return Handled::Done(-libc::EROFS);
        }
        let Some(entry) = file_entry(Self::FIXED, &mut req) else {
            return Handled::Done(-libc::EOPNOTSUPP);
        };
        // SAFETY: the entry points at the request's buffer, which stays
        // valid until the request completes, and that happens only after
        // this entry's CQE has reached `complete`; or at a registered
        // buffer index, or at nothing.
        match unsafe { sub.push(req.tag, 0, entry) } {
            Ok(()) => Handled::Queued,
            Err(e) => Handled::Done(-e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    // `complete` is the default: the CQE's result (bytes moved, 0, or
    // -errno) is the request's. A short read or write is fine: the driver
    // requeues the rest.

    fn fixed_files(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        vec![self.file.as_fd().as_raw_fd()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
