//! A RAM disk in the default copy mode: the kernel copies each request's
//! data between the block layer's pages and a buffer per tag that the server
//! owns, so the target sees the bytes as a plain slice ([`ublk::IoBuf::Mem`])
//! and can complete the request at once.
//!
//! ```text
//! cargo build -p ublk-rs --example copy
//! sudo target/debug/examples/copy 64M      # prints /dev/ublkbN once live
//! sudo fio --filename=/dev/ublkbN --name=v --direct=1 --rw=randwrite --verify=crc32c --size=32M
//! # Ctrl-C (or SIGTERM, or `ublk del -n N`) stops and deletes the device
//! ```

mod common;

use common::VecDisk;
use ublk::{CopyMode, DeviceBuilder};

fn main() -> common::Result {
    let size = common::size_arg()?;
    // One queue: the `Vec` the disk lives in belongs to its only target.
    let builder = DeviceBuilder::new().queues(1).copy_mode(CopyMode::Copy);
    common::serve(builder, size, |_q_id| VecDisk::new(size))
}
