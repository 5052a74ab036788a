//! RAID-0 over several files: the device is cut into chunks dealt to the
//! files in turn, as kublk's `stripe` target does.

use std::os::fd::{AsFd, AsRawFd, RawFd};

use io_uring::squeue::Flags as SqeFlags;
use io_uring::{opcode, types};

use super::file::file_entry;
use crate::target::{Handled, IoBuf, IoFlags, Op, Request, Submit, Target};
use crate::{Error, Result};

/// Chunk sizes a stripe accepts (kublk's bounds), in bytes.
pub const CHUNK_SIZES: std::ops::RangeInclusive<u32> = 4096..=512 * 1024;

/// The chunk size when none is given: 64 KiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

/// The most files a stripe spreads over.
pub const MAX_FILES: usize = 16;

/// Checks a chunk size: a power of two in [`CHUNK_SIZES`].
pub fn check_chunk_size(chunk_size: u32) -> Result<()> {
    if chunk_size.is_power_of_two() && CHUNK_SIZES.contains(&chunk_size) {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "chunk size {chunk_size} must be a power of two in {}..={}",
            CHUNK_SIZES.start(),
            CHUNK_SIZES.end()
        )))
    }
}

/// The capacity of a stripe over files of `sizes` bytes: each is cut down
/// to whole chunks, and those must be equal (every chunk row spans all
/// files). `Err` names the first file (by index) that differs, or a file
/// smaller than one chunk.
pub fn stripe_capacity(sizes: &[u64], chunk_size: u32) -> Result<u64> {
    check_chunk_size(chunk_size)?;
    if sizes.is_empty() || sizes.len() > MAX_FILES {
        return Err(Error::Config(format!(
            "a stripe needs 1..={MAX_FILES} files, not {}",
            sizes.len()
        )));
    }
    let usable = |s: u64| s & !(u64::from(chunk_size) - 1);
    let first = usable(sizes[0]);
    if first == 0 {
        return Err(Error::Config(format!(
            "file 1 ({} bytes) is smaller than the chunk size {chunk_size}",
            sizes[0]
        )));
    }
    if let Some(i) = sizes.iter().position(|&s| usable(s) != first) {
        return Err(Error::Config(format!(
            "file {} has {} bytes in whole chunks of {chunk_size}, file 1 has {first}: stripe files must be the same size",
            i + 1,
            usable(sizes[i])
        )));
    }
    Ok(first * sizes.len() as u64)
}

/// What a request in flight has left to do.
#[derive(Debug, Default)]
struct Slot {
    /// Entries in flight.
    pending: u32,
    /// The first error, or 0.
    error: i32,
    /// Bytes moved so far.
    moved: u64,
    /// Bytes the request asked for.
    want: u64,
    /// Each file's pieces of the request buffer (kept between requests so
    /// their memory is reused; the kernel reads them while the entries run).
    iov: Vec<Vec<libc::iovec>>,
}

/// A stripe over 1..=[`MAX_FILES`] files (or block devices) of equal
/// size, registered as the queue ring's fixed files 1, 2, …: chunk `k` of
/// the device is chunk `k / n` of file `k % n`.
///
/// A READ or WRITE becomes one vectored entry per file it touches (its
/// chunks in that file are contiguous there), all on the queue's ring; the
/// request completes when all have, with its full length, or the first
/// error, or `-EIO` after a short transfer. A FLUSH is an `fdatasync` of
/// every file; DISCARD and WRITE_ZEROES complete with `-EOPNOTSUPP` (don't
/// advertise them). Works in every copy mode: with a registered buffer
/// (zero copy, auto registration) the entries are `READV_FIXED` /
/// `WRITEV_FIXED` on it (Linux 6.15, as zero copy itself), hard-linked
/// after a registration the queue made.
#[derive(Debug)]
pub struct StripeTarget<F> {
    files: Vec<F>,
    chunk_shift: u32,
    depth: usize,
    /// By `q_id * depth + tag`; grown on a tag's first request.
    slots: Vec<Slot>,
}

impl<F: AsFd> StripeTarget<F> {
    /// A stripe over `files` with `chunk_size` bytes per chunk, for a
    /// device of `queue_depth` tags per queue. The files' sizes are the
    /// caller's to check ([`stripe_capacity`]).
    pub fn new(files: Vec<F>, chunk_size: u32, queue_depth: u16) -> Result<Self> {
        check_chunk_size(chunk_size)?;
        if files.is_empty() || files.len() > MAX_FILES {
            return Err(Error::Config(format!(
                "a stripe needs 1..={MAX_FILES} files, not {}",
                files.len()
            )));
        }
        Ok(Self {
            files,
            chunk_shift: chunk_size.trailing_zeros(),
            depth: usize::from(queue_depth),
            slots: Vec::new(),
        })
    }

    /// The files, in stripe order.
    pub fn files(&self) -> &[F] {
        &self.files
    }

    /// The chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        1 << self.chunk_shift
    }

    fn fixed(i: usize) -> types::Fixed {
        types::Fixed(1 + i as u32)
    }

    /// Fills `slot.iov` with each file's pieces of a request of `len`
    /// bytes at byte `offset`, `base` being the buffer's address (0 for a
    /// registered buffer, whose entries address it by offset). Returns
    /// each file's byte offset (valid where it has pieces).
    fn split(&self, slot: &mut Slot, offset: u64, len: u64, base: usize) -> [u64; MAX_FILES] {
        let n = self.files.len() as u64;
        let chunk = 1u64 << self.chunk_shift;
        let mut file_off = [0u64; MAX_FILES];
        slot.iov.resize_with(self.files.len(), Vec::new);
        for v in &mut slot.iov {
            v.clear();
        }
        let (mut pos, end, mut done) = (offset, offset + len, 0u64);
        while pos < end {
            let within = pos & (chunk - 1);
            let piece = (chunk - within).min(end - pos);
            let chunk_no = pos >> self.chunk_shift;
            let file = (chunk_no % n) as usize;
            let iov = &mut slot.iov[file];
            if iov.is_empty() {
                file_off[file] = ((chunk_no / n) << self.chunk_shift) + within;
            }
            iov.push(libc::iovec {
                iov_base: (base + done as usize) as *mut libc::c_void,
                iov_len: piece as usize,
            });
            pos += piece;
            done += piece;
        }
        file_off
    }

    fn slot_index(&self, q_id: u16, tag: u16) -> usize {
        usize::from(q_id) * self.depth + usize::from(tag)
    }
}

impl<F: AsFd> Target for StripeTarget<F> {
    // Submissions of the request's own buffer (or its registered index)
    // through iovecs this target keeps until the entries complete.
    #[allow(unsafe_code)]
    fn handle(&mut self, sub: &mut Submit<'_, '_>, mut req: Request<'_>) -> Handled {
        let d = req.desc;
        let idx = self.slot_index(req.q_id, req.tag);
        if idx >= self.slots.len() {
            self.slots.resize_with(idx + 1, Slot::default);
        }
        let mut slot = std::mem::take(&mut self.slots[idx]);
        slot.error = 0;
        slot.moved = 0;
        slot.pending = 0;
        let linked = sub.buffer_registered();
        let mut entries: [Option<io_uring::squeue::Entry>; MAX_FILES] = Default::default();
        match (d.op, &mut req.buf) {
            (Op::Flush, _) => {
                slot.want = 0;
                for (i, e) in entries.iter_mut().take(self.files.len()).enumerate() {
                    *e = file_entry(Self::fixed(i), &mut req);
                }
            }
            (Op::Read | Op::Write, buf @ (IoBuf::Mem(_) | IoBuf::Fixed(_))) => {
                let (base, index) = match buf {
                    IoBuf::Mem(b) => (b.as_mut_ptr() as usize, None),
                    IoBuf::Fixed(i) => (0, Some(*i)),
                    _ => unreachable!("matched above"),
                };
                slot.want = d.len() as u64;
                let offs = self.split(&mut slot, d.offset(), d.len() as u64, base);
                let rw_flags = if d.flags.contains(IoFlags::FUA) {
                    libc::RWF_DSYNC
                } else {
                    0
                };
                for (i, iov) in slot.iov.iter().enumerate() {
                    if iov.is_empty() {
                        continue;
                    }
                    let (f, p, n, off) = (Self::fixed(i), iov.as_ptr(), iov.len() as u32, offs[i]);
                    entries[i] = Some(match (d.op, index) {
                        (Op::Read, None) => opcode::Readv::new(f, p, n).offset(off).build(),
                        (Op::Read, Some(b)) => {
                            opcode::ReadvFixed::new(f, p, n, b).offset(off).build()
                        }
                        (_, None) => opcode::Writev::new(f, p, n)
                            .offset(off)
                            .rw_flags(rw_flags)
                            .build(),
                        (_, Some(b)) => opcode::WritevFixed::new(f, p, n, b)
                            .offset(off)
                            .rw_flags(rw_flags)
                            .build(),
                    });
                }
            }
            _ => {
                self.slots[idx] = slot;
                return Handled::Done(-libc::EOPNOTSUPP);
            }
        }
        let last = entries.iter().rposition(Option::is_some);
        for (i, e) in entries.into_iter().enumerate() {
            let Some(mut e) = e else { continue };
            if linked && Some(i) != last {
                e = e.flags(SqeFlags::IO_HARDLINK);
            }
            // SAFETY: the entry points at the request's buffer (valid until
            // the request completes, which is after this entry's CQE), at
            // a registered buffer index, or at nothing, through iovecs in
            // `self.slots[idx]`, which stay put until the request's last
            // CQE: the slot is only refilled by the tag's next request.
            match unsafe { sub.push(idx as u32, e) } {
                Ok(()) => slot.pending += 1,
                Err(e) => {
                    slot.error = -e.raw_os_error().unwrap_or(libc::EIO);
                    break;
                }
            }
        }
        let (pending, error) = (slot.pending, slot.error);
        self.slots[idx] = slot;
        if pending == 0 {
            Handled::Done(if error < 0 { error } else { -libc::EIO })
        } else {
            Handled::Queued
        }
    }

    fn complete(&mut self, _: &mut Submit<'_, '_>, _tag: u16, data: u32, res: i32) -> Handled {
        let Some(slot) = self.slots.get_mut(data as usize) else {
            return Handled::Done(-libc::EIO);
        };
        slot.pending = slot.pending.saturating_sub(1);
        if res < 0 {
            if slot.error == 0 {
                slot.error = res;
            }
        } else {
            slot.moved += res as u64;
        }
        if slot.pending > 0 {
            return Handled::Queued;
        }
        Handled::Done(if slot.error < 0 {
            slot.error
        } else if slot.moved == slot.want {
            slot.want as i32
        } else {
            // A short piece leaves a hole in the middle of the request.
            -libc::EIO
        })
    }

    fn fixed_files(&self) -> Vec<RawFd> {
        self.files.iter().map(|f| f.as_fd().as_raw_fd()).collect()
    }

    fn sqes_per_request(&self) -> usize {
        self.files.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(n: usize, chunk: u32) -> StripeTarget<std::fs::File> {
        let files = (0..n).map(|_| std::fs::File::open("/dev/null").unwrap());
        StripeTarget::new(files.collect(), chunk, 4).unwrap()
    }

    /// (file, file offset, buffer offset, length) of each piece.
    fn pieces(t: &StripeTarget<std::fs::File>, off: u64, len: u64) -> Vec<(usize, u64, u64, u64)> {
        let mut slot = Slot::default();
        let offs = t.split(&mut slot, off, len, 0);
        let mut out = Vec::new();
        for (f, iov) in slot.iov.iter().enumerate() {
            let mut at = offs[f];
            for v in iov {
                out.push((f, at, v.iov_base as u64, v.iov_len as u64));
                at += v.iov_len as u64;
            }
        }
        out.sort_by_key(|p| p.2);
        out
    }

    #[test]
    fn requests_are_dealt_to_the_files_chunk_by_chunk() {
        let t = target(3, 8192);
        // Inside one chunk.
        assert_eq!(pieces(&t, 4096, 4096), vec![(0, 4096, 0, 4096)]);
        // From the middle of chunk 1 (file 1) over chunks 2, 3 (file 0,
        // its second chunk) and into 4.
        assert_eq!(
            pieces(&t, 8192 + 4096, 4096 + 8192 * 2 + 512),
            vec![
                (1, 4096, 0, 4096),
                (2, 0, 4096, 8192),
                (0, 8192, 12288, 8192),
                (1, 8192, 20480, 512),
            ]
        );
        // Two rows: each file gets two contiguous chunks.
        let p = pieces(&t, 0, 6 * 8192);
        assert_eq!(p.len(), 6);
        assert_eq!(p[3], (0, 8192, 3 * 8192, 8192));
    }

    #[test]
    fn bad_stripes_are_refused() {
        let e = |r: Result<u64>| r.unwrap_err().to_string();
        assert_eq!(
            e(stripe_capacity(&[1 << 20], 3000)),
            "chunk size 3000 must be a power of two in 4096..=524288"
        );
        assert_eq!(
            e(stripe_capacity(&[1 << 20], 2048)),
            "chunk size 2048 must be a power of two in 4096..=524288"
        );
        assert!(e(stripe_capacity(&[1 << 20, 2 << 20], 65536)).contains("must be the same size"));
        assert!(e(stripe_capacity(&[4096, 4096], 65536)).contains("smaller than the chunk size"));
        assert_eq!(
            stripe_capacity(&[(1 << 20) + 100, 1 << 20], 65536).unwrap(),
            2 << 20
        );
        assert!(StripeTarget::<std::fs::File>::new(Vec::new(), 65536, 1).is_err());
    }
}
