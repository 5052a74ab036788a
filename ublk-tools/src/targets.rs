//! The null and loop targets.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use ublk::{FileTarget, Handled, Request, Submit, Target};

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
    /// Physical block size to advertise (at least the logical one).
    pub physical_block_size: u32,
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
        let discard = !is_block_device && !opts.read_only && supports_punch_hole(&file);
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
        Ok(Self {
            file,
            path,
            size,
            direct_io,
            logical_block_size: lbs,
            physical_block_size,
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

/// The loop target: the library's [`FileTarget`] over the backing file
/// (shared by the queues), whose requests become io_uring file operations
/// on each queue's own ring: FUA writes as `RWF_DSYNC`, FLUSH as
/// `fdatasync`, DISCARD and WRITE_ZEROES as `fallocate`.
pub type LoopTarget = FileTarget<Arc<File>>;

/// A loop target over `backing`; `read_only` refuses changes with `EROFS`.
pub fn loop_target(backing: Arc<File>, read_only: bool) -> LoopTarget {
    FileTarget::new(backing).read_only(read_only)
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
            println!("note: no readable block device here");
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
