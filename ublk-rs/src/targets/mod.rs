//! Ready-made targets, each in its own file, written against the target
//! contract ([`crate::target`]) alone:
//!
//! - [`FileTarget`] ([`mod@file`]): a loop device over a file or block device,
//!   and [`file_entry`], the SQE it serves a request with;
//! - [`StripeTarget`] ([`mod@stripe`]): RAID-0 over several files, in
//!   chunks;
//! - [`FaultInject`] ([`mod@fault_inject`]): wraps another target (or none)
//!   to delay requests, fail some of them, or die while fetching;
//! - [`nbd::NbdTarget`] ([`mod@nbd`]): a client of an NBD server, over TCP or
//!   a Unix socket.

pub mod fault_inject;
pub mod file;
pub mod nbd;
pub mod stripe;

pub use fault_inject::FaultInject;
pub use file::{file_entry, FileTarget};
pub use stripe::StripeTarget;
