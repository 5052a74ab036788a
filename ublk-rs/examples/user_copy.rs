//! A RAM disk with `UBLK_F_USER_COPY`: the kernel never copies into server
//! memory by itself; the server moves each request's data with `pread`
//! (write data, before the request is handled) and `pwrite` (read data,
//! before it completes) on `/dev/ublkcN` at an offset that encodes the
//! queue and tag ([`ublk::queue::user_copy_offset`]). [`ublk::Queue`] does
//! those copies into its own per-tag buffers, so the target again sees
//! [`ublk::IoBuf::Mem`].
//!
//! ```text
//! sudo target/debug/examples/user_copy 64M   # prints /dev/ublkbN once live
//! ```
//!
//! Stop it with Ctrl-C, `SIGTERM` or `ublk del -n N`.

mod common;

use common::VecDisk;
use ublk::{CopyMode, DeviceBuilder};

fn main() -> common::Result {
    let size = common::size_arg()?;
    let builder = DeviceBuilder::new().queues(1).copy_mode(CopyMode::UserCopy);
    common::serve(builder, size, |_q_id| VecDisk::new(size))
}
