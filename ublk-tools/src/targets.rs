//! The null and loop targets.
#![allow(unsafe_code)] // pushing file I/O SQEs that point at request buffers

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use ublk::io_uring::{opcode, types};
use ublk::{Handled, IoBuf, IoFlags, Op, Request, Submit, Target};

/// The null target: every request completes at once with its full length.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullTarget;

impl Target for NullTarget {
    #[inline]
    fn handle(&mut self, _: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
        Handled::Done(req.desc.len() as i32)
    }
}

/// A backing file (or block device) opened for the loop target.
#[derive(Debug)]
pub struct Backing {
    /// The opened file.
    pub file: File,
    /// Its path, canonicalised.
    pub path: PathBuf,
    /// Size in bytes that the device exposes.
    pub size: u64,
    /// Opened with `O_DIRECT`.
    pub direct_io: bool,
    /// Logical block size to advertise.
    pub logical_block_size: u32,
    /// Whether discard (punch hole) is supported.
    pub discard: bool,
    /// A block device rather than a regular file.
    pub is_block_device: bool,
}

/// How to open a backing file.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackingOptions {
    /// Open read-only.
    pub read_only: bool,
    /// Don't use `O_DIRECT`.
    pub buffered: bool,
    /// Exposed size (default: the file's).
    pub size: Option<u64>,
    /// Logical block size (default: from the backing).
    pub logical_block_size: Option<u32>,
}

const BLKGETSIZE64: u64 = 0x8008_1272;
const BLKSSZGET: u64 = 0x1268;

fn blk_ioctl_u64(f: &File, req: u64) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live local.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, &mut v as *mut u64) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v)
    }
}

fn blk_ioctl_int(f: &File, req: u64) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at
    // a live local.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), req as _, &mut v as *mut libc::c_int) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(v as u32)
    }
}

impl Backing {
    /// Opens and checks `path`: it must exist, be a regular file or a block
    /// device, be non-empty, writable unless `read_only`, and a multiple of
    /// the logical block size. Each failure is one sentence naming the file.
    pub fn open(path: &Path, opts: BackingOptions) -> anyhow::Result<Self> {
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => anyhow::anyhow!("backing file {shown} does not exist"),
            _ => anyhow::anyhow!("cannot access backing file {shown}: {e}"),
        })?;
        let is_block_device = meta.file_type().is_block_device();
        if meta.is_dir() {
            bail!("backing file {shown} is a directory");
        }
        if !meta.is_file() && !is_block_device {
            bail!("backing file {shown} is neither a regular file nor a block device");
        }
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!opts.read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct_io) = match open(!opts.buffered) {
            Ok(f) => (f, !opts.buffered),
            // The file system refuses O_DIRECT (tmpfs, some FUSE): fall back.
            Err(e) if !opts.buffered && e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!("{shown}: O_DIRECT refused, using buffered I/O");
                (
                    open(false).with_context(|| format!("cannot open backing file {shown}"))?,
                    false,
                )
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EACCES | libc::EROFS | libc::EPERM)
                ) && !opts.read_only =>
            {
                bail!("backing file {shown} is not writable ({e}): pass --read-only to export it read-only")
            }
            Err(e) => bail!("cannot open backing file {shown}: {e}"),
        };
        let file_size = if is_block_device {
            blk_ioctl_u64(&file, BLKGETSIZE64)
                .with_context(|| format!("cannot read the size of {shown}"))?
        } else {
            meta.len()
        };
        let native_lbs = if is_block_device {
            blk_ioctl_int(&file, BLKSSZGET).unwrap_or(512)
        } else if direct_io {
            dio_alignment(&file).unwrap_or(512)
        } else {
            512
        };
        let lbs = opts.logical_block_size.unwrap_or(native_lbs.max(512));
        if !lbs.is_power_of_two() || !(512..=4096).contains(&lbs) {
            bail!("logical block size {lbs} must be a power of two in 512..=4096");
        }
        if direct_io && lbs < native_lbs {
            bail!("logical block size {lbs} is below what O_DIRECT on {shown} needs ({native_lbs}); use --buffered_io");
        }
        let size = opts.size.unwrap_or(file_size);
        if size == 0 {
            bail!("backing file {shown} is empty (size 0): create it with e.g. truncate -s 1G {shown}");
        }
        if size > file_size && is_block_device {
            bail!("--size {size} is larger than the block device {shown} ({file_size} bytes)");
        }
        if size % u64::from(lbs) != 0 {
            bail!("backing file {shown} is {size} bytes, not a multiple of the logical block size {lbs}");
        }
        let discard = !is_block_device && !opts.read_only && supports_punch_hole(&file);
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        Ok(Self {
            file,
            path,
            size,
            direct_io,
            logical_block_size: lbs,
            discard,
            is_block_device,
        })
    }
}

/// The O_DIRECT offset alignment of `f` (statx `STATX_DIOALIGN`, Linux 6.1+).
fn dio_alignment(f: &File) -> Option<u32> {
    let st = rustix::fs::statx(
        f,
        "",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::DIOALIGN,
    )
    .ok()?;
    (st.stx_dio_offset_align > 0).then_some(st.stx_dio_offset_align)
}

/// Whether the file system holding `f` can punch holes (statfs type).
fn supports_punch_hole(f: &File) -> bool {
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;
    const TMPFS: i64 = 0x0102_1994;
    match rustix::fs::fstatfs(f) {
        // `f_type`'s integer type differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        Ok(s) => matches!(s.f_type as i64, EXT4 | XFS | BTRFS | TMPFS),
        Err(_) => false,
    }
}

/// The loop target: requests become io_uring file operations on the queue's
/// own ring (the backing file is registered as fixed file 1).
#[derive(Debug)]
pub struct LoopTarget {
    backing: Arc<File>,
    read_only: bool,
}

/// The fixed-file index of the backing file in every queue ring.
const BACKING: types::Fixed = types::Fixed(1);

impl LoopTarget {
    /// A loop target over `backing`, shared by all queues.
    pub fn new(backing: Arc<File>, read_only: bool) -> Self {
        Self { backing, read_only }
    }

    /// Reports whether a request can be handled (`Err` = result to complete with).
    fn reject(&self, op: Op) -> Option<i32> {
        (self.read_only && matches!(op, Op::Write | Op::Discard | Op::WriteZeroes))
            .then_some(-libc::EROFS)
    }
}

impl Target for LoopTarget {
    fn handle(&mut self, sub: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
        let d = req.desc;
        if let Some(res) = self.reject(d.op) {
            return Handled::Done(res);
        }
        let len = d.len() as u32;
        let off = d.offset();
        let entry = match (d.op, &req.buf) {
            (Op::Read, IoBuf::Mem(b)) => opcode::Read::new(BACKING, b.as_ptr().cast_mut(), len)
                .offset(off)
                .build(),
            (Op::Read, IoBuf::Fixed(i)) => {
                opcode::ReadFixed::new(BACKING, std::ptr::null_mut(), len, *i)
                    .offset(off)
                    .build()
            }
            (Op::Write, IoBuf::Mem(b)) => opcode::Write::new(BACKING, b.as_ptr(), len)
                .offset(off)
                .rw_flags(if d.flags.contains(IoFlags::FUA) {
                    libc::RWF_DSYNC
                } else {
                    0
                })
                .build(),
            (Op::Write, IoBuf::Fixed(i)) => {
                opcode::WriteFixed::new(BACKING, std::ptr::null(), len, *i)
                    .offset(off)
                    .rw_flags(if d.flags.contains(IoFlags::FUA) {
                        libc::RWF_DSYNC
                    } else {
                        0
                    })
                    .build()
            }
            (Op::Flush, _) => opcode::Fsync::new(BACKING)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (Op::Discard, _) => opcode::Fallocate::new(BACKING, u64::from(len))
                .offset(off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            (Op::WriteZeroes, _) => {
                let mode = if d.flags.contains(IoFlags::NOUNMAP) {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(BACKING, u64::from(len))
                    .offset(off)
                    .mode(mode)
                    .build()
            }
            _ => return Handled::Done(-libc::EOPNOTSUPP),
        };
        // For fsync/fallocate the result is 0; report the request's length.
        let data = if matches!(d.op, Op::Read | Op::Write) {
            0
        } else {
            len
        };
        // SAFETY: the entry points at this request's buffer (or at a
        // registered buffer index), which stays valid until the request is
        // completed, and that happens only after this entry's CQE.
        match unsafe { sub.push(req.tag, data, entry) } {
            Ok(()) => Handled::Queued,
            Err(e) => Handled::Done(-e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    fn complete(&mut self, _: &mut Submit<'_, '_>, _tag: u16, data: u32, res: i32) -> Handled {
        // A short read or write is fine: the driver requeues the remainder.
        Handled::Done(if res >= 0 && data != 0 {
            data as i32
        } else {
            res
        })
    }

    fn fixed_files(&self) -> Vec<RawFd> {
        vec![self.backing.as_raw_fd()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn tmpfile(name: &str, len: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ublk-tools-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let mut f = File::create(&p).unwrap();
        f.write_all(&vec![0u8; len as usize]).unwrap();
        p
    }

    fn err(p: &Path, o: BackingOptions) -> String {
        Backing::open(p, o).unwrap_err().to_string()
    }

    #[test]
    fn bad_backing_files_are_named() {
        let missing = Path::new("/nonexistent/disk.img");
        assert_eq!(
            err(missing, Default::default()),
            "backing file /nonexistent/disk.img does not exist"
        );
        let dir = std::env::temp_dir();
        assert!(err(&dir, Default::default()).ends_with("is a directory"));
        let empty = tmpfile("empty.img", 0);
        assert!(err(
            &empty,
            BackingOptions {
                buffered: true,
                ..Default::default()
            }
        )
        .contains("is empty (size 0)"));
        let odd = tmpfile("odd.img", 1000);
        assert!(err(
            &odd,
            BackingOptions {
                buffered: true,
                ..Default::default()
            }
        )
        .contains("not a multiple of the logical block size 512"));
        let ok = tmpfile("ok.img", 1 << 20);
        let b = Backing::open(
            &ok,
            BackingOptions {
                buffered: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (b.size, b.logical_block_size, b.direct_io),
            (1 << 20, 512, false)
        );
        let b = Backing::open(
            &ok,
            BackingOptions {
                buffered: true,
                logical_block_size: Some(4096),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(b.logical_block_size, 4096);
        assert!(err(
            &ok,
            BackingOptions {
                buffered: true,
                logical_block_size: Some(1000),
                ..Default::default()
            }
        )
        .contains("power of two"));
    }
}
