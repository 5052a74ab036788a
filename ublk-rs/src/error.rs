//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::Features;

/// What went wrong, with enough context to say so in one line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `/dev/ublk-control` does not exist.
    #[error("{path} not found: load the ublk_drv kernel module (modprobe ublk_drv)")]
    NoDriver {
        /// The path that was tried.
        path: PathBuf,
    },
    /// The control path exists but is not ublk_drv's control device (a
    /// regular file left there, or another character device).
    #[error("{path} is {what}, not ublk_drv's control device (a misc character device): load the ublk_drv kernel module (modprobe ublk_drv)")]
    NotControlDevice {
        /// The path that was tried.
        path: PathBuf,
        /// What it is instead, e.g. `a regular file`.
        what: String,
    },
    /// Opening a device node failed.
    #[error("cannot open {path}: {source}")]
    Open {
        /// The node.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A control or I/O command failed in the kernel.
    #[error("{cmd} failed{}: {}", dev_suffix(*.dev_id), errno_text(*.errno))]
    Command {
        /// The command's kernel name, e.g. `UBLK_U_CMD_ADD_DEV`.
        cmd: &'static str,
        /// The device it was about, if any.
        dev_id: Option<u32>,
        /// The positive errno the kernel returned.
        errno: i32,
    },
    /// The kernel lacks a requested feature.
    #[error("the running kernel's ublk driver does not support {missing} (kernel features: {kernel:#x})")]
    Unsupported {
        /// The requested features the kernel lacks.
        missing: Features,
        /// The kernel's whole feature mask.
        kernel: u64,
    },
    /// An argument was rejected before it reached the kernel.
    #[error("{0}")]
    Invalid(String),
    /// Any other I/O error (io_uring set-up, mmap, …).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

fn dev_suffix(dev_id: Option<u32>) -> String {
    dev_id
        .map(|id| format!(" for device {id}"))
        .unwrap_or_default()
}

/// `Operation not supported (errno 95)`: the C library's text once, then
/// the number (std's `Display` would add its own "(os error 95)").
fn errno_text(errno: i32) -> String {
    let text = io::Error::from_raw_os_error(errno).to_string();
    let text = text
        .strip_suffix(&format!(" (os error {errno})"))
        .unwrap_or(&text);
    format!("{text} (errno {errno})")
}

impl Error {
    /// The errno of a failed kernel command, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Command { errno, .. } => Some(*errno),
            Self::Open { source, .. } | Self::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { what, source }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_error_names_its_errno_once() {
        let e = Error::Command {
            cmd: "UBLK_U_CMD_ADD_DEV",
            dev_id: Some(3),
            errno: libc::EOPNOTSUPP,
        };
        assert_eq!(
            e.to_string(),
            "UBLK_U_CMD_ADD_DEV failed for device 3: Operation not supported (errno 95)"
        );
    }
}
