//! A RAM disk with `UBLK_F_NEED_GET_DATA`: a write request first arrives
//! without its data (`UBLK_IO_RES_NEED_GET_DATA`), so the server can pick
//! the buffer it wants the data in; the queue answers with
//! `UBLK_IO_NEED_GET_DATA` and the kernel then copies the data and delivers
//! the write again. [`ublk::Queue`] does that round trip itself: the target
//! only ever sees writes with their bytes in [`ublk::IoBuf::Mem`], as in the
//! `copy` example.
//!
//! ```text
//! sudo target/debug/examples/need_get_data 64M   # prints /dev/ublkbN once live
//! ```
//!
//! Stop it with Ctrl-C, `SIGTERM` or `ublk del -n N`.

mod common;

use common::VecDisk;
use ublk::{CopyMode, DeviceBuilder};

fn main() -> common::Result {
    let size = common::size_arg()?;
    let builder = DeviceBuilder::new()
        .queues(1)
        .copy_mode(CopyMode::NeedGetData);
    common::serve(builder, size, |_q_id| VecDisk::new(size))
}
