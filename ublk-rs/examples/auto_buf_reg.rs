//! A RAM disk with `UBLK_F_AUTO_BUF_REG` (Linux 6.16 and later): zero copy
//! without the registration round trip. Each FETCH/COMMIT_AND_FETCH names a
//! slot of the queue ring's buffer table, and the kernel registers the next
//! request's pages there before delivering it (and drops them when the
//! request completes). The target sees [`ublk::IoBuf::Fixed`] and uses
//! `ReadFixed`/`WriteFixed` against a memfd, as in the `zero_copy` example.
//!
//! With `fallback: true` a request whose automatic registration failed
//! still arrives (flagged `UBLK_IO_F_NEED_REG_BUF`) and the queue registers
//! it itself instead of the kernel failing it.
//!
//! ```text
//! sudo target/debug/examples/auto_buf_reg 64M   # prints /dev/ublkbN once live
//! ```
//!
//! Stop it with Ctrl-C, `SIGTERM` or `ublk del -n N`.

mod common;

use common::memfd_disk;
use ublk::{CopyMode, DeviceBuilder};

fn main() -> common::Result {
    let size = common::size_arg()?;
    let disk = memfd_disk(size)?;
    let builder = DeviceBuilder::new()
        .queues(2)
        .copy_mode(CopyMode::AutoBufReg { fallback: true });
    common::serve(builder, size, |_q_id| Ok(disk.clone()))
}
