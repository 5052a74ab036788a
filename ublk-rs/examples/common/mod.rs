//! What the examples share: the size argument, the serving loop with its
//! signal handling, and two RAM disks.
//!
//! - [`serve`] adds a device, sets its size, serves it until `SIGINT`/`SIGTERM`
//!   (the library's [`ublk::Device::stop_on_signals`]) or until someone else
//!   stops it (e.g. `ublk del -n N`), then deletes it;
//! - [`VecDisk`] keeps the data in a `Vec<u8>` and copies it synchronously: it
//!   needs the request's bytes in server memory ([`IoBuf::Mem`]) and one queue;
//! - [`MemfdDisk`] keeps the data in a memfd and moves it with io_uring reads
//!   and writes pushed on the queue's ring, like a loop device: the library's
//!   [`FileTarget`], which works in every copy mode (plain `Read`/`Write` for
//!   [`IoBuf::Mem`], `ReadFixed`/`WriteFixed` for [`IoBuf::Fixed`]) and with
//!   any number of queues.
#![allow(dead_code)] // every example uses only part of this module

use std::fmt;
use std::io::{self, Write as _};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use ublk::signal::{SIGINT, SIGTERM};
use ublk::{
    BasicParams, Control, DeviceBuilder, FileTarget, Handled, IoBuf, Op, Params, Request,
    StartKind, Submit, Target,
};

/// The device size when no argument is given: 64 MiB.
pub const DEFAULT_SIZE: u64 = 64 << 20;

/// Any error, shown with its message (`main` prints the `Debug` form).
pub struct Failure(Box<dyn std::error::Error>);

impl<E: Into<Box<dyn std::error::Error>>> From<E> for Failure {
    fn from(e: E) -> Self {
        Self(e.into())
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// What an example's `main` returns.
pub type Result<T = ()> = std::result::Result<T, Failure>;

/// The device size from the first argument, in the `ublk` command's
/// syntax ([`ublk::parse_size`]: bytes, or `K`, `M`, `G`, `T` as powers of
/// 1024, `1.5G` and `1GiB` too); [`DEFAULT_SIZE`] without one.
pub fn size_arg() -> Result<u64> {
    let Some(arg) = std::env::args().nth(1) else {
        return Ok(DEFAULT_SIZE);
    };
    let prog = std::env::args().next().unwrap_or_default();
    let usage = |why: String| {
        format!("usage: {prog} [SIZE]  (e.g. 64M, 1.5G; default 64M; a non-zero multiple of 512 bytes): {why}")
    };
    let size = ublk::parse_size(&arg).map_err(|e| usage(e.to_string()))?;
    if size == 0 || size % 512 != 0 {
        return Err(usage(format!("{arg:?} is {size} bytes")).into());
    }
    Ok(size)
}

/// Adds the device `builder` describes with `size` bytes, serves it with a
/// target per queue from `make_target`, prints `/dev/ublkbN` once it is
/// live, and returns once it stopped (Ctrl-C, `SIGTERM`, `ublk del`) and
/// was deleted.
pub fn serve<T, F>(builder: DeviceBuilder, size: u64, make_target: F) -> Result
where
    T: Target,
    F: Fn(u16) -> io::Result<T> + Sync,
{
    let ctrl = Arc::new(Control::open()?);
    // The guard: dropping `dev` (also on an error below) stops and deletes
    // the device.
    let mut dev = builder.add(ctrl)?;
    // Ctrl-C and SIGTERM stop the device, even before it is live.
    dev.stop_on_signals(&[SIGINT, SIGTERM])?;
    let max_io = dev.info().max_io_buf_bytes();
    dev.set_params(&Params::basic(BasicParams::new(size, max_io)))?;

    let served = dev.run(StartKind::Start, make_target, |info, queues| {
        println!("{}", ublk::ctrl::block_dev_path(info.id()).display());
        let _ = io::stdout().flush();
        eprintln!(
            "serving {size} bytes over {} queue(s) with {:?}; stop with Ctrl-C or `ublk del -n {}`",
            queues.len(),
            info.flags(),
            info.id()
        );
    });
    let stats = served?;
    let requests: u64 = stats.iter().map(|s| s.requests).sum();
    let errors: u64 = stats.iter().map(|s| s.errors).sum();
    eprintln!("stopped after {requests} requests ({errors} failed); deleting the device");
    drop(dev);
    Ok(())
}

/// A RAM disk in a `Vec<u8>` that completes every request at once.
///
/// It owns its data, so a device using it must have a single queue (each
/// queue gets its own target); it needs the request data in server memory.
#[derive(Debug)]
pub struct VecDisk {
    data: Vec<u8>,
}

impl VecDisk {
    /// A zeroed disk of `size` bytes.
    pub fn new(size: u64) -> io::Result<Self> {
        let size = usize::try_from(size).map_err(io::Error::other)?;
        Ok(Self {
            data: vec![0; size],
        })
    }
}

impl Target for VecDisk {
    fn handle(&mut self, _: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
        let off = req.desc.offset() as usize;
        let len = req.desc.len();
        // The queue already failed requests past the capacity.
        let Some(disk) = self.data.get_mut(off..off + len) else {
            return Handled::Done(-libc::EIO);
        };
        match (req.desc.op, req.buf) {
            (Op::Read, IoBuf::Mem(buf)) => buf.copy_from_slice(disk),
            (Op::Write, IoBuf::Mem(buf)) => disk.copy_from_slice(buf),
            (Op::Flush, _) => {}
            (Op::Discard | Op::WriteZeroes, _) => disk.fill(0),
            _ => return Handled::Done(-libc::EOPNOTSUPP),
        }
        Handled::Done(len as i32)
    }
}

/// A RAM disk in a memfd, served like a loop device by the library's
/// [`FileTarget`]: each request becomes one SQE on the queue's ring (plain
/// reads and writes of the request buffer in the copy modes, `ReadFixed` /
/// `WriteFixed` of the registered request pages in the zero-copy modes),
/// and the request completes with its CQE.
///
/// Clones share the memfd, so every queue can have one.
pub type MemfdDisk = FileTarget<Arc<OwnedFd>>;

/// A zeroed [`MemfdDisk`] of `size` bytes.
pub fn memfd_disk(size: u64) -> io::Result<MemfdDisk> {
    let fd = rustix::fs::memfd_create("ublk-example", rustix::fs::MemfdFlags::CLOEXEC)?;
    rustix::fs::ftruncate(&fd, size)?;
    Ok(FileTarget::new(Arc::new(fd)))
}
