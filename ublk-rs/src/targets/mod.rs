//! Ready-made targets, each in its own file, written against the target
//! contract ([`crate::target`]) alone:
//!
//! - [`FileTarget`] ([`mod@file`]): a loop device over a file or block device,
//!   and [`file_entry`], the SQE it serves a request with.
//! - [`nbd::NbdTarget`] ([`mod@nbd`]): a client of an NBD server, over TCP or
//!   a Unix socket.

pub mod file;
pub mod nbd;

pub use file::{file_entry, FileTarget};
