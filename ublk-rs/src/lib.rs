//! Safe, zero-overhead building blocks for Linux **ublk** servers.
//!
//! A ublk server creates a block device `/dev/ublkbN` whose requests the
//! kernel forwards to userspace over io_uring passthrough commands. This crate
//! wraps each kernel object in an owning type — [`Control`] for
//! `/dev/ublk-control` and its 128-byte-SQE ring, [`Device`] for an added
//! device (deleted on drop unless handed off; [`StopHandle`] stops it from
//! anywhere), [`mem::DescArray`] for a queue's mmapped descriptors,
//! [`queue::Queue`] for a queue's ring and loop —
//! and offers typed builders for every uring_cmd in [`cmd`].
//!
//! A complete null device (every request succeeds, reads return zeroes),
//! stopped by Ctrl-C, `SIGTERM` or `ublk del`, and deleted on the way out:
//!
//! ```no_run
//! use std::sync::Arc;
//! use ublk::signal::{SIGINT, SIGTERM};
//! use ublk::{BasicParams, Control, DeviceBuilder, Handled, Params, Request, StartKind, Submit, Target};
//!
//! struct Null;
//!
//! impl Target for Null {
//!     fn handle(&mut self, _: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
//!         Handled::Done(req.desc.len() as i32)
//!     }
//! }
//!
//! // An error prints as its one-line message (`Error`'s `Debug` is its
//! // `Display`), e.g. `Error: /dev/ublk-control not found: load the
//! // ublk_drv kernel module (modprobe ublk_drv)`.
//! fn main() -> ublk::Result<()> {
//!     let ctrl = Arc::new(Control::open()?);
//!     // The guard: dropping `dev`, on success or error, deletes the device.
//!     let mut dev = DeviceBuilder::new().queues(2).depth(64).add(ctrl)?;
//!     // Stops the device on Ctrl-C or SIGTERM, even before it is live.
//!     dev.stop_on_signals(&[SIGINT, SIGTERM])?;
//!     let max_io = dev.info().max_io_buf_bytes();
//!     dev.set_params(&Params::basic(BasicParams::new(1 << 30, max_io)))?;
//!     // Blocks until the device is stopped: a signal, `ublk del -n N`, or a
//!     // `dev.stop_handle()` used from another thread.
//!     dev.run(StartKind::Start, |_q| Ok(Null), |info, _| {
//!         println!("/dev/ublkb{} is live", info.id());
//!     })?;
//!     Ok(())
//! }
//! ```
//!
//! The crate is layered one way: the target contract ([`target`]) depends
//! on nothing else here; ready-made targets ([`targets`]) are written
//! against it alone; the engine ([`queue`], [`device`]) runs targets.
//!
//! `unsafe` lives in a few small modules: `pod` (byte views of UAPI
//! structs), [`mem`] (mmaps), [`shmem`] (registering shared memory), [`ctrl`] and [`queue`] (pushing SQEs that
//! point at buffers), [`target`] (`Submit::push`, whose contract is the
//! ring's) and the ready-made [`targets`] (pushing SQEs that point at the
//! request's buffer, and socket SQEs into request buffers).
//! Everything else is safe code.
#![deny(unsafe_code, missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod cmd;
pub mod ctrl;
pub mod device;
mod error;
pub mod features;
pub mod mem;
pub mod params;
mod pod;
pub mod queue;
pub mod shmem;
pub mod size;
mod stop;
pub mod target;
pub mod targets;

pub use ctrl::{Control, DevInfo, DevRef, DevState};
pub use device::{
    set_io_scheduler, set_io_timeout, Device, DeviceBuilder, QueueAffinity, QueueInfo, StartKind,
};
pub use error::{Error, Result};
pub use features::Features;
pub use params::{Attrs, BasicParams, Checksum, DiscardParams, IntegrityParams, Params, PiCaps};
pub use queue::{CopyMode, Queue, QueueStats};
/// The errno type of [`Error::errno`]: `e.errno() == Some(Errno::BUSY)`.
pub use rustix::io::Errno;
pub use size::{parse_size, SizeError};
pub use stop::{SignalStop, StopHandle};
pub use target::{
    Handled, IoBuf, IoDesc, IoFlags, Op, Request, ShmemMap, ShmemRegion, Submit, Target,
};
pub use targets::{file_entry, FaultInject, FileTarget, StripeTarget};

/// Signal numbers for [`Device::stop_on_signals`] (`signal::SIGINT`, …).
pub use signal_hook::consts::signal;

/// Re-exported so targets can build SQEs with the same io-uring version.
pub use io_uring;
/// Re-exported raw bindings.
pub use ublk_sys as sys;
