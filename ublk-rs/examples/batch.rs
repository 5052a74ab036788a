//! A RAM disk with batch I/O, `UBLK_F_BATCH_IO` (recent kernels; `ublk
//! features` lists it): instead of one FETCH/COMMIT_AND_FETCH command per
//! request, each queue keeps one multishot `UBLK_U_IO_FETCH_IO_CMDS` armed,
//! whose completions carry the tags of several new requests in a provided
//! buffer, and commits every request finished in one pass of its loop with a
//! single `UBLK_U_IO_COMMIT_IO_CMDS`. None of that shows in the target: it is
//! the same memfd-backed, SQE-pushing target as in `zero_copy`, here in the
//! default copy mode ([`ublk::IoBuf::Mem`]). Batch I/O combines with every
//! copy mode except `NEED_GET_DATA`.
//!
//! ```text
//! sudo target/debug/examples/batch 64M   # prints /dev/ublkbN once live
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
        .copy_mode(CopyMode::Copy)
        .batch(true);
    common::serve(builder, size, |_q_id| Ok(disk.clone()))
}
