//! The null, loop, stripe and fault_inject targets.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use ublk::targets::nbd::NbdTarget;
use ublk::{FaultInject, FileTarget, Handled, Op, Request, StripeTarget, Submit, Target};

use crate::cli::TargetOptions;

/// The null target: every request completes at once with its full length.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullTarget;

impl Target for NullTarget {
    #[inline]
    fn handle(&mut self, _: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
        // Metadata (--metadata_size) read back as 0xff: "no protection
        // information", which the block layer does not check.
        if let (Op::Read, Some(m)) = (req.desc.op, req.integrity) {
            m.fill(0xff);
        }
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
    /// Physical block size to advertise (at least the logical one).
    pub physical_block_size: u32,
    /// Whether discard can be offered: the file punches holes
    /// (`FALLOC_FL_PUNCH_HOLE`), found by [`fallocate_works`].
    pub discard: bool,
    /// Whether WRITE_ZEROES can be offered: the file zeroes ranges in place
    /// (`FALLOC_FL_ZERO_RANGE`, for requests with `NOUNMAP`) and punches
    /// holes (for the others), found by [`fallocate_works`]. tmpfs punches
    /// holes but cannot zero ranges.
    pub write_zeroes: bool,
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

/// The size of a block device: where its end is (`lseek(SEEK_END)`, what
/// `BLKGETSIZE64` returns), without an ioctl.
fn block_device_size(f: &File) -> io::Result<u64> {
    let end = rustix::fs::seek(f, rustix::fs::SeekFrom::End(0))?;
    rustix::fs::seek(f, rustix::fs::SeekFrom::Start(0))?;
    Ok(end)
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
            block_device_size(&file).with_context(|| format!("cannot read the size of {shown}"))?
        } else {
            meta.len()
        };
        let native_lbs = if is_block_device {
            rustix::fs::ioctl_blksszget(&file).unwrap_or(512)
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
        let physical_block_size = if is_block_device {
            rustix::fs::ioctl_blkpbszget(&file).unwrap_or(lbs)
        } else {
            lbs
        }
        .max(lbs);
        // A block device's fallocate works only inside it, where a probe
        // would change data: it gets neither.
        let probe = !is_block_device && !opts.read_only;
        let discard = probe && fallocate_works(&file, file_size, Fallocate::PunchHole);
        let write_zeroes = discard && fallocate_works(&file, file_size, Fallocate::ZeroRange);
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        Ok(Self {
            file,
            path,
            size,
            direct_io,
            logical_block_size: lbs,
            physical_block_size,
            discard,
            write_zeroes,
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

/// The `fallocate` operations a loop device's DISCARD and WRITE_ZEROES
/// requests become ([`ublk::targets::file_entry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallocate {
    /// `FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`: DISCARD, and
    /// WRITE_ZEROES without `NOUNMAP`.
    PunchHole,
    /// `FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`: WRITE_ZEROES with
    /// `NOUNMAP` (what mkfs.xfs sends).
    ZeroRange,
}

/// Bytes the probe of [`fallocate_works`] covers, and its alignment.
const PROBE_LEN: u64 = 64 << 10;

/// Whether `op` works on the regular file `f` of `file_size` bytes, tried
/// for real where it changes nothing the device shows: on a range past the
/// end of the file, with `FALLOC_FL_KEEP_SIZE` (the size stays). A file
/// system without the operation says `EOPNOTSUPP` (tmpfs for zero range);
/// any error counts as "no".
///
/// A zero range there allocates (unwritten) blocks beyond the end, which a
/// punch past the end leaves alone on ext4: if the file holds more blocks
/// than before, it is truncated to its size (read again just before),
/// which frees them.
pub fn fallocate_works(f: &File, file_size: u64, op: Fallocate) -> bool {
    use rustix::fs::{fallocate, fstat, ftruncate, FallocateFlags as F};
    let Some(offset) = file_size
        .div_ceil(PROBE_LEN)
        .checked_add(1)
        .and_then(|n| n.checked_mul(PROBE_LEN))
    else {
        return false;
    };
    let mode = match op {
        Fallocate::PunchHole => F::PUNCH_HOLE | F::KEEP_SIZE,
        Fallocate::ZeroRange => F::ZERO_RANGE | F::KEEP_SIZE,
    };
    let blocks = |f: &File| fstat(f).map(|st| (st.st_blocks, st.st_size));
    let before = blocks(f);
    let works = match fallocate(f, mode, offset, PROBE_LEN) {
        Ok(()) => true,
        Err(e) => {
            log::debug!("fallocate {op:?} probe: {e}");
            false
        }
    };
    if let (Ok((was, _)), Ok((now, size))) = (before, blocks(f)) {
        if now > was {
            if let Err(e) = u64::try_from(size)
                .map_err(|_| rustix::io::Errno::INVAL)
                .and_then(|size| ftruncate(f, size))
            {
                log::warn!("cannot free the blocks of the fallocate probe past the end of the backing file: {e}");
            }
        }
    }
    works
}

/// The loop target: the library's [`FileTarget`] over the backing file
/// (shared by the queues), whose requests become io_uring file operations
/// on each queue's own ring: FUA writes as `RWF_DSYNC`, FLUSH as
/// `fdatasync`, DISCARD and WRITE_ZEROES as `fallocate`.
pub type LoopTarget = FileTarget<Arc<File>>;

/// A loop target over `backing`; `read_only` refuses changes with `EROFS`.
pub fn loop_target(backing: Arc<File>, read_only: bool) -> LoopTarget {
    FileTarget::new(backing).read_only(read_only)
}

/// The target `ublk add -t` picked, so the device is served by one
/// `Device::run` whatever it is. An enum rather than a `Box<dyn Target>`:
/// the match is static dispatch, with no virtual call per request.
#[derive(Debug)]
pub enum AnyTarget {
    /// `-t null`.
    Null(NullTarget),
    /// `-t loop`.
    Loop(LoopTarget),
    /// `-t stripe`.
    Stripe(StripeTarget<Arc<File>>),
    /// `-t fault_inject` without a file: faults around a null target.
    FaultNull(FaultInject<NullTarget>),
    /// `-t fault_inject -f FILE`: faults around a loop target.
    FaultLoop(FaultInject<LoopTarget>),
    /// `-t nbd`.
    Nbd(NbdTarget),
}

/// `$call` on the target inside `$any`, whichever variant it is.
macro_rules! each_target {
    ($any:expr, $t:ident => $call:expr) => {
        match $any {
            AnyTarget::Null($t) => $call,
            AnyTarget::Loop($t) => $call,
            AnyTarget::Stripe($t) => $call,
            AnyTarget::FaultNull($t) => $call,
            AnyTarget::FaultLoop($t) => $call,
            AnyTarget::Nbd($t) => $call,
        }
    };
}

impl Target for AnyTarget {
    #[inline]
    fn handle(&mut self, sub: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
        each_target!(self, t => t.handle(sub, req))
    }

    #[inline]
    fn complete(&mut self, sub: &mut Submit<'_, '_>, tag: u16, data: u32, res: i32) -> Handled {
        each_target!(self, t => t.complete(sub, tag, data, res))
    }

    fn fixed_files(&self) -> Vec<std::os::fd::RawFd> {
        each_target!(self, t => t.fixed_files())
    }

    fn sqes_per_request(&self) -> usize {
        each_target!(self, t => t.sqes_per_request())
    }

    fn before_fetch(&mut self, sub: &mut Submit<'_, '_>, q_id: u16, tag: u16) {
        each_target!(self, t => t.before_fetch(sub, q_id, tag))
    }
}

/// The stripe target over the opened `files`, with `--chunk_size`.
pub fn stripe_target(
    files: &[Arc<File>],
    opts: &TargetOptions,
    depth: u16,
) -> io::Result<StripeTarget<Arc<File>>> {
    let chunk = opts
        .chunk_size
        .unwrap_or(ublk::targets::stripe::DEFAULT_CHUNK_SIZE);
    StripeTarget::new(files.to_vec(), chunk, depth)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

/// The fault_inject target around `inner` with `--delay_us`,
/// `--error_rate`, `--error_range` and `--die_during_fetch`, for the
/// worker of queue `q_id` (which seeds its error generator).
pub fn fault_inject<T: Target>(
    inner: T,
    opts: &TargetOptions,
    q_id: u16,
) -> io::Result<FaultInject<T>> {
    let mut t = FaultInject::new(inner)
        .delay(std::time::Duration::from_micros(opts.delay_us.unwrap_or(0)))
        .die_during_fetch(opts.die_during_fetch == Some(1));
    if let Some(r) = opts.error_range {
        t = t.error_range(r.start >> 9, r.len >> 9);
    }
    if let Some(p) = opts.error_rate {
        t = t
            .error_rate(p / 100.0, 0x5eed_0000 + u64::from(q_id))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    }
    Ok(t)
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

    /// The `f_type` of the file system holding `p`.
    #[allow(clippy::unnecessary_cast)] // its integer type differs between architectures
    fn fs_type(p: &Path) -> i64 {
        rustix::fs::statfs(p).map_or(0, |s| s.f_type as i64)
    }

    const TMPFS: i64 = 0x0102_1994;
    const EXT4: i64 = 0xEF53;
    const XFS: i64 = 0x5846_5342;
    const BTRFS: i64 = 0x9123_683E;

    /// Probes `p` and checks that the probes left it as it was.
    fn probe(p: &Path) -> (bool, bool) {
        use std::os::unix::fs::MetadataExt;
        let before = std::fs::metadata(p).unwrap();
        let f = OpenOptions::new().read(true).write(true).open(p).unwrap();
        let punch = fallocate_works(&f, before.len(), Fallocate::PunchHole);
        let zero = fallocate_works(&f, before.len(), Fallocate::ZeroRange);
        let after = std::fs::metadata(p).unwrap();
        assert_eq!(after.len(), before.len(), "the probe changed the size");
        assert_eq!(
            after.blocks(),
            before.blocks(),
            "the probe left blocks allocated"
        );
        assert!(std::fs::read(p).unwrap().iter().all(|&b| b == 0xa5));
        (punch, zero)
    }

    fn patterned(dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(format!("{name}-{}", std::process::id()));
        std::fs::write(&p, vec![0xa5u8; 1 << 20]).unwrap();
        p
    }

    #[test]
    fn tmpfs_punches_holes_but_cannot_zero_ranges() {
        let dir = Path::new("/dev/shm");
        if fs_type(dir) != TMPFS {
            println!("SKIP: /dev/shm is not a tmpfs here; nothing to probe");
            return;
        }
        let p = patterned(dir, "ublk-tools-probe");
        assert_eq!(probe(&p), (true, false));
        let b = Backing::open(
            &p,
            BackingOptions {
                buffered: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((b.discard, b.write_zeroes), (true, false));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_disk_file_system_punches_holes_and_zeroes_ranges() {
        let dir = std::env::temp_dir();
        if !matches!(fs_type(&dir), EXT4 | XFS | BTRFS) {
            println!("SKIP: {} is not on ext4, xfs or btrfs here", dir.display());
            return;
        }
        let p = patterned(&dir, "ublk-tools-probe");
        assert_eq!(probe(&p), (true, true));
        let opts = BackingOptions {
            buffered: true,
            ..Default::default()
        };
        let b = Backing::open(&p, opts).unwrap();
        assert_eq!((b.discard, b.write_zeroes), (true, true));
        // Read-only: nothing is probed, nothing offered.
        let b = Backing::open(
            &p,
            BackingOptions {
                read_only: true,
                ..opts
            },
        )
        .unwrap();
        assert_eq!((b.discard, b.write_zeroes), (false, false));
        std::fs::remove_file(&p).unwrap();
    }

    /// A block device of this host that opens read-only, with its size,
    /// logical and physical block size from sysfs.
    fn some_block_device() -> Option<(PathBuf, u64, u32, u32)> {
        let read = |p: PathBuf| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
        std::fs::read_dir("/sys/block").ok()?.find_map(|e| {
            let e = e.ok()?;
            let sys = e.path();
            let sectors = read(sys.join("size")).filter(|&n| n > 0)?;
            let lbs = read(sys.join("queue/logical_block_size"))?;
            let pbs = read(sys.join("queue/physical_block_size"))?;
            let dev = Path::new("/dev").join(e.file_name());
            File::open(&dev).ok()?;
            Some((dev, sectors * 512, lbs as u32, pbs as u32))
        })
    }

    #[test]
    fn a_block_device_is_measured_without_unsafe_ioctls() {
        let Some((dev, size, lbs, pbs)) = some_block_device() else {
            println!("SKIP: no readable block device here");
            return;
        };
        let b = Backing::open(
            &dev,
            BackingOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(b.is_block_device);
        assert_eq!(
            (b.size, b.logical_block_size, b.physical_block_size),
            (size, lbs.max(512), pbs.max(lbs).max(512)),
            "{}",
            dev.display()
        );
        assert!(!b.discard, "no discard probe on a block device");
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
