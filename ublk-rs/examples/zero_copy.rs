//! A RAM disk with `UBLK_F_SUPPORT_ZERO_COPY` (Linux 6.15 and later): request
//! data never enters server memory. For each request, [`ublk::Queue`]
//! registers the request's pages as entry `tag` of its ring's buffer table
//! (`UBLK_U_IO_REGISTER_IO_BUF`, hard-linked before the target's SQE) and
//! unregisters them when it completes; the target gets
//! [`ublk::IoBuf::Fixed`]`(index)` and can only reach the data through
//! io_uring fixed-buffer operations on the same ring. Here the disk is a
//! memfd registered as a fixed file ([`ublk::Target::fixed_files`]) and the
//! data moves with `ReadFixed`/`WriteFixed` at buffer address 0 — like a loop
//! device whose backing file happens to be in RAM.
//!
//! ```text
//! sudo target/debug/examples/zero_copy 64M   # prints /dev/ublkbN once live
//! ```
//!
//! Stop it with Ctrl-C, `SIGTERM` or `ublk del -n N`.

mod common;

use common::memfd_disk;
use ublk::{CopyMode, DeviceBuilder};

fn main() -> common::Result {
    let size = common::size_arg()?;
    let disk = memfd_disk(size)?;
    // Queues share the memfd; each has its own ring and buffer table.
    let builder = DeviceBuilder::new().queues(2).copy_mode(CopyMode::ZeroCopy);
    common::serve(builder, size, |_q_id| Ok(disk.clone()))
}
