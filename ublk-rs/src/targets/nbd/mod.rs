//! An NBD client target: the device's data lives on an NBD server
//! (`qemu-nbd`, `nbdkit`, `nbd-server`, `rbd-nbd`, …).

pub mod proto;
