//! [`FileTarget`]: a loop-style target over one file or block device, and
//! [`file_entry`], the SQE it serves each request with.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types};

use crate::target::{Handled, IoBuf, IoFlags, Op, Request, ShmemMap, Submit, Target};

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
pub fn file_entry(file: types::Fixed, req: &mut Request<'_>) -> Option<io_uring::squeue::Entry> {
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
/// discards and write-zeroes complete with `-EROFS`. With
/// [`FileTarget::shmem`], requests in registered shared memory
/// ([`IoBuf::Shmem`]) are read and written in place.
///
/// `F` is anything holding the fd: a `File`, an `OwnedFd`, or an
/// `Arc<File>` shared by the queues.
#[derive(Debug, Clone)]
pub struct FileTarget<F> {
    file: F,
    read_only: bool,
    shmem: Option<Arc<ShmemMap>>,
}

impl<F: AsFd> FileTarget<F> {
    /// The fixed-file index the file has in each queue ring.
    pub const FIXED: types::Fixed = types::Fixed(1);

    /// Serves requests from `file`.
    pub fn new(file: F) -> Self {
        Self {
            file,
            read_only: false,
            shmem: None,
        }
    }

    /// Serves requests in shared memory (`UBLK_F_SHMEM_ZC`) from the
    /// buffers of `map` (others complete with `-EIO`).
    pub fn shmem(mut self, map: Arc<ShmemMap>) -> Self {
        self.shmem = Some(map);
        self
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

impl<F: AsFd> Target for FileTarget<F> {
    // The one submission outside the queue module: of the request's own
    // buffer, which the queue keeps alive until the request completes.
    #[allow(unsafe_code)]
    fn handle(&mut self, sub: &mut Submit<'_, '_>, mut req: Request<'_>) -> Handled {
        if self.read_only && matches!(req.desc.op, Op::Write | Op::Discard | Op::WriteZeroes) {
            return Handled::Done(-libc::EROFS);
        }
        let entry = match (req.desc.op, &req.buf) {
            (Op::Read | Op::Write, IoBuf::Shmem { index, offset }) => {
                let d = req.desc;
                let len = d.len();
                let Some(p) = self
                    .shmem
                    .as_ref()
                    .and_then(|m| m.resolve(*index, *offset, len))
                else {
                    return Handled::Done(-libc::EIO);
                };
                let len = len as u32;
                if d.op == Op::Read {
                    opcode::Read::new(Self::FIXED, p, len)
                        .offset(d.offset())
                        .build()
                } else {
                    let fua = d.flags.contains(IoFlags::FUA);
                    opcode::Write::new(Self::FIXED, p, len)
                        .offset(d.offset())
                        .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                        .build()
                }
            }
            _ => match file_entry(Self::FIXED, &mut req) {
                Some(e) => e,
                None => return Handled::Done(-libc::EOPNOTSUPP),
            },
        };
        // SAFETY: the entry points at the request's buffer, which stays
        // valid until the request completes, and that happens only after
        // this entry's CQE has reached `complete`; or into a shared buffer
        // of `self.shmem`, which stays mapped as long as the map (held
        // here); or at a registered buffer index, or at nothing.
        match unsafe { sub.push(0, entry) } {
            Ok(()) => Handled::Queued,
            Err(e) => Handled::Done(-e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    // `complete` is the default: the CQE's result (bytes moved, 0, or
    // -errno) is the request's. A short read or write is fine: the driver
    // requeues the rest.

    fn fixed_files(&self) -> Vec<RawFd> {
        vec![self.file.as_fd().as_raw_fd()]
    }
}
