//! Safe, zero-overhead building blocks for Linux **ublk** servers.
//!
//! A ublk server creates a block device `/dev/ublkbN` whose requests the
//! kernel forwards to userspace over io_uring passthrough commands. This crate
//! wraps each kernel object in an owning type — [`Control`] for
//! `/dev/ublk-control` and its 128-byte-SQE ring, [`Device`] for an added
//! device (deleted on drop unless handed off), [`mem::DescArray`] for a
//! queue's mmapped descriptors, [`queue::Queue`] for a queue's ring and loop —
//! and offers typed builders for every uring_cmd in [`cmd`].
//!
//! A complete null device (every request succeeds, reads return zeroes):
//!
//! ```no_run
//! use std::sync::Arc;
//! use ublk::{Control, DeviceBuilder, Handled, Params, BasicParams, Request, StartKind, Submit, Target};
//!
//! struct Null;
//!
//! impl Target for Null {
//!     fn handle(&mut self, _: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
//!         Handled::Done(req.desc.len() as i32)
//!     }
//! }
//!
//! fn main() -> ublk::Result<()> {
//!     let ctrl = Arc::new(Control::open()?);
//!     let mut dev = DeviceBuilder::new().queues(2).depth(64).add(ctrl)?;
//!     let max_io = dev.info().max_io_buf_bytes();
//!     dev.set_params(&Params::basic(BasicParams::new(1 << 30, max_io)))?;
//!     // Blocks until someone stops the device (e.g. `ublk del -n 0`); the
//!     // guard then deletes it.
//!     dev.run(StartKind::Start, |_q| Ok(Null), |info, _| {
//!         println!("/dev/ublkb{} is live", info.id());
//!     })?;
//!     Ok(())
//! }
//! ```
//!
//! `unsafe` lives in four small modules: `pod` (byte views of UAPI structs),
//! [`mem`] (mmaps), [`ctrl`] and [`queue`] (pushing SQEs that point at
//! buffers). Everything else is safe code.
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
pub mod size;
pub mod target;
pub mod targets;

pub use ctrl::{Control, DevInfo, DevRef, DevState};
pub use device::{
    set_io_scheduler, set_io_timeout, Device, DeviceBuilder, QueueAffinity, QueueInfo, StartKind,
};
pub use error::{Error, Result};
pub use features::Features;
pub use params::{Attrs, BasicParams, DiscardParams, Params};
pub use queue::{CopyMode, Queue, QueueStats, Submit};
pub use size::{parse_size, SizeError};
pub use target::{FileTarget, Handled, IoBuf, IoDesc, IoFlags, Op, Request, Target};

/// Re-exported so targets can build SQEs with the same io-uring version.
pub use io_uring;
/// Re-exported raw bindings.
pub use ublk_sys as sys;
