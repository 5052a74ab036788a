//! Ready-made targets, each in its own file, written against the target
//! contract ([`crate::target`]) alone:
//!
//! - [`FileTarget`] ([`mod@file`]): a loop device over a file or block device,
//!   and [`file_entry`], the SQE it serves a request with.

pub mod file;

pub use file::{file_entry, FileTarget};
