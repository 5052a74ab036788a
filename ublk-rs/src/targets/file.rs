//! [`FileTarget`]: a loop-style target over one file or block device, and
//! [`file_entry`], the SQE it serves each request with.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, types};

use crate::target::{Handled, IoBuf, IoFlags, Op, Request, ShmemMap, Submit, Target};
use crate::IntegrityParams;

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
/// With [`FileTarget::metadata`], each request's integrity metadata
/// ([`Request::integrity`]) is read from and written to a second file
/// beside the data, and FLUSH syncs both.
///
/// `F` is anything holding the fd: a `File`, an `OwnedFd`, or an
/// `Arc<File>` shared by the queues.
#[derive(Debug, Clone)]
pub struct FileTarget<F> {
    file: F,
    read_only: bool,
    shmem: Option<Arc<ShmemMap>>,
    metadata: Option<Metadata<F>>,
}

/// Where a [`FileTarget`] keeps integrity metadata, and the requests that
/// wait for two completions (data and metadata).
#[derive(Debug, Clone)]
struct Metadata<F> {
    file: F,
    params: IntegrityParams,
    /// By tag: completions still awaited and the result so far.
    pairs: Vec<Pair>,
}

/// A request served by two entries: the data's (user data 0) and the
/// metadata's (1).
#[derive(Debug, Clone, Copy, Default)]
struct Pair {
    waiting: u8,
    /// The smaller of the two results in data bytes, or the first error.
    res: i32,
}

impl Pair {
    fn merge(&mut self, res: i32) {
        if self.res >= 0 && (res < 0 || res < self.res) {
            self.res = res;
        }
    }
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
            metadata: None,
        }
    }

    /// The fixed-file index the metadata file has in each queue ring.
    pub const METADATA_FIXED: types::Fixed = types::Fixed(2);

    /// Keeps integrity metadata (`UBLK_F_INTEGRITY`) in `file`: the
    /// metadata of the data at byte `o` is at byte
    /// [`IntegrityParams::metadata_len`]`(o)`. A request completes when
    /// both its data and its metadata are done, with the smaller of the
    /// two in data bytes; FLUSH syncs both files. Discard and write-zeroes
    /// leave the metadata as it is (offer them only where that is right).
    pub fn metadata(mut self, file: F, params: IntegrityParams) -> Self {
        self.metadata = Some(Metadata {
            file,
            params,
            pairs: Vec::new(),
        });
        self
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
        let meta_entry = match &mut self.metadata {
            Some(m) => metadata_entry(Self::METADATA_FIXED, &m.params, &mut req),
            None => None,
        };
        // SAFETY: the entry points at the request's buffer, which stays
        // valid until the request completes, and that happens only after
        // this entry's CQE has reached `complete`; or into a shared buffer
        // of `self.shmem`, which stays mapped as long as the map (held
        // here); or at a registered buffer index, or at nothing.
        if let Err(e) = unsafe { sub.push(0, entry) } {
            return Handled::Done(-e.raw_os_error().unwrap_or(libc::EIO));
        }
        let (Some(meta_entry), Some(m)) = (meta_entry, self.metadata.as_mut()) else {
            return Handled::Queued;
        };
        let tag = usize::from(req.tag);
        if m.pairs.len() <= tag {
            m.pairs.resize(tag + 1, Pair::default());
        }
        let pair = &mut m.pairs[tag];
        *pair = Pair {
            waiting: 2,
            res: i32::MAX,
        };
        // SAFETY: the entry points at the request's metadata buffer, which
        // stays valid until the request completes, after both CQEs.
        if let Err(e) = unsafe { sub.push(1, meta_entry) } {
            // The data's entry is in flight: the request ends with it.
            pair.waiting = 1;
            pair.merge(-e.raw_os_error().unwrap_or(libc::EIO));
        }
        Handled::Queued
    }

    // Without metadata the CQE's result (bytes moved, 0, or -errno) is the
    // request's. A short read or write is fine: the driver requeues the
    // rest.
    fn complete(&mut self, _: &mut Submit<'_, '_>, tag: u16, data: u32, res: i32) -> Handled {
        let Some(m) = self.metadata.as_mut() else {
            return Handled::Done(res);
        };
        let Some(pair) = m.pairs.get_mut(usize::from(tag)).filter(|p| p.waiting > 0) else {
            return Handled::Done(res);
        };
        let res = match (data, res) {
            // The metadata's bytes, as the data bytes they cover.
            (1, r) if r > 0 => m.params.data_len(r as u64).min(i32::MAX as u64) as i32,
            (_, r) => r,
        };
        pair.merge(res);
        pair.waiting -= 1;
        if pair.waiting > 0 {
            return Handled::Queued;
        }
        Handled::Done(pair.res)
    }

    fn fixed_files(&self) -> Vec<RawFd> {
        let mut files = vec![self.file.as_fd().as_raw_fd()];
        if let Some(m) = &self.metadata {
            files.push(m.file.as_fd().as_raw_fd());
        }
        files
    }

    fn sqes_per_request(&self) -> usize {
        1 + usize::from(self.metadata.is_some())
    }
}

/// The entry that reads or writes `req`'s metadata in the metadata file
/// `file`, or syncs that file for a FLUSH; `None` when the request has no
/// metadata to move.
fn metadata_entry(
    file: types::Fixed,
    params: &IntegrityParams,
    req: &mut Request<'_>,
) -> Option<io_uring::squeue::Entry> {
    let d = req.desc;
    let off = params.metadata_len(d.offset());
    Some(match (d.op, req.integrity.as_deref_mut()) {
        (Op::Flush, _) => opcode::Fsync::new(file)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        (Op::Read, Some(m)) => opcode::Read::new(file, m.as_mut_ptr(), m.len() as u32)
            .offset(off)
            .build(),
        (Op::Write, Some(m)) => opcode::Write::new(file, m.as_ptr(), m.len() as u32)
            .offset(off)
            .rw_flags(if d.flags.contains(IoFlags::FUA) {
                libc::RWF_DSYNC
            } else {
                0
            })
            .build(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::unix::fs::FileExt;

    use io_uring::IoUring;

    use super::*;
    use crate::target::IoDesc;

    /// A scratch file of `len` bytes of `fill`, removed when dropped.
    struct Scratch(File, std::path::PathBuf);

    impl Scratch {
        fn new(name: &str, len: usize, fill: u8) -> Self {
            let path = std::env::temp_dir()
                .join(format!("ublk-file-target-{}-{name}", std::process::id()));
            let f = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            f.write_all_at(&vec![fill; len], 0).unwrap();
            Self(f, path)
        }

        fn bytes(&self, off: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0; len];
            self.0.read_exact_at(&mut v, off).unwrap();
            v
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.1);
        }
    }

    /// Hands `req` to `t`, then its completions until it is done; the
    /// request's result and how many entries it took.
    fn serve(ring: &mut IoUring, t: &mut FileTarget<&File>, req: Request<'_>) -> (i32, usize) {
        let tag = req.tag;
        let mut inflight = 0;
        let mut completed = Vec::new();
        {
            let (submitter, mut sq, _) = ring.split();
            let mut sub = Submit::new(&mut sq, &submitter, &mut inflight, 0, &mut completed);
            assert_eq!(t.handle(&mut sub, req), Handled::Queued);
        }
        let entries = inflight;
        ring.submit_and_wait(entries).unwrap();
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        assert_eq!(cqes.len(), entries);
        let mut done = None;
        for (ud, res) in cqes {
            let (submitter, mut sq, _) = ring.split();
            let mut sub = Submit::new(&mut sq, &submitter, &mut inflight, 0, &mut completed);
            match t.complete(&mut sub, tag, (ud >> 32) as u32, res) {
                Handled::Done(r) => {
                    assert!(done.is_none(), "completed twice");
                    done = Some(r);
                }
                Handled::Queued => assert!(done.is_none(), "a completion after the end"),
            }
        }
        (done.expect("the request completed"), entries)
    }

    fn desc(op: Op, start_sector: u64, nr_sectors: u32) -> IoDesc {
        IoDesc {
            op,
            flags: IoFlags::empty(),
            start_sector,
            nr_sectors,
            addr: 0,
        }
    }

    fn rw<'a>(op: Op, start: u64, n: u32, buf: &'a mut [u8], md: &'a mut [u8]) -> Request<'a> {
        Request {
            q_id: 0,
            tag: 5,
            desc: desc(op, start, n),
            buf: IoBuf::Mem(buf),
            integrity: Some(md),
        }
    }

    #[test]
    fn metadata_goes_to_its_own_file_beside_the_data() {
        // 64 KiB of data, 8 bytes of metadata per 512: 1 KiB, but the
        // metadata file covers only the first 48 KiB.
        let data = Scratch::new("data", 64 << 10, 0xee);
        let meta = Scratch::new("meta", 96 * 8, 0xff);
        let params = IntegrityParams::new(8);
        let mut t = FileTarget::new(&data.0).metadata(&meta.0, params);
        let mut ring = IoUring::new(8).unwrap();
        let mut files = vec![-1];
        files.extend(t.fixed_files());
        assert_eq!(files.len(), 3);
        ring.submitter().register_files(&files).unwrap();

        // A 4 KiB write at sector 8: its metadata at byte 64.
        let mut buf: Vec<u8> = (0..4096).map(|i| i as u8).collect();
        let mut md: Vec<u8> = (0..64).map(|i| 0x80 | i as u8).collect();
        let (res, entries) = serve(&mut ring, &mut t, rw(Op::Write, 8, 8, &mut buf, &mut md));
        assert_eq!((res, entries), (4096, 2));
        assert_eq!(data.bytes(4096, 4096), buf);
        assert_eq!(meta.bytes(64, 64), md);
        assert_eq!(
            meta.bytes(0, 64),
            vec![0xff; 64],
            "metadata before it untouched"
        );

        // Read both back into cleared buffers.
        let mut rbuf = vec![0u8; 4096];
        let mut rmd = vec![0u8; 64];
        let (res, _) = serve(&mut ring, &mut t, rw(Op::Read, 8, 8, &mut rbuf, &mut rmd));
        assert_eq!(res, 4096);
        assert_eq!((rbuf, rmd), (buf.clone(), md.clone()));

        // A flush syncs both files.
        let flush = Request {
            q_id: 0,
            tag: 5,
            desc: desc(Op::Flush, 0, 0),
            buf: IoBuf::None,
            integrity: None,
        };
        assert_eq!(serve(&mut ring, &mut t, flush), (0, 2));

        // 8 KiB at sector 88: the metadata file holds 8 of its 16 entries,
        // so the request completes with the 4 KiB both have.
        let mut rbuf = vec![0u8; 8192];
        let mut rmd = vec![0u8; 128];
        let (res, _) = serve(&mut ring, &mut t, rw(Op::Read, 88, 16, &mut rbuf, &mut rmd));
        assert_eq!(res, 4096);

        // A request without metadata takes one entry, its result as is.
        let mut rbuf = vec![0u8; 512];
        let plain = Request {
            q_id: 0,
            tag: 6,
            desc: desc(Op::Read, 0, 1),
            buf: IoBuf::Mem(&mut rbuf),
            integrity: None,
        };
        assert_eq!(serve(&mut ring, &mut t, plain), (512, 1));
        assert_eq!(rbuf, vec![0xee; 512]);
    }
}
