//! The crate's error type.

use std::fmt;
use std::io;
use std::path::PathBuf;

use rustix::io::Errno;

use crate::Features;

/// What went wrong, with enough context to say so in one line.
///
/// `Debug` shows the same line as `Display`, so `fn main() ->
/// ublk::Result<()>` prints `Error: ` and the message, not a struct. Match
/// on the variants (or [`Error::errno`]) for the details.
#[derive(thiserror::Error)]
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
        /// The errno the kernel returned.
        errno: Errno,
    },
    /// A control command could not be handed to the kernel (the control
    /// ring failed; the kernel never answered it).
    #[error("cannot submit {cmd}: {source}")]
    Submit {
        /// The command's kernel name, e.g. `UBLK_U_CMD_ADD_DEV`.
        cmd: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel lacks a requested feature.
    #[error("the running kernel's ublk driver does not support {missing} (kernel features: {kernel:#x})")]
    Unsupported {
        /// The requested features the kernel lacks.
        missing: Features,
        /// The kernel's whole feature mask.
        kernel: u64,
    },
    /// A device's configuration or parameters were refused before they
    /// reached the kernel: the message says which value and why.
    #[error("{0}")]
    Config(String),
    /// Setting queue `q_id` up failed (its target, ring, mappings or first
    /// fetch), so the device was not started.
    #[error("queue {q_id}: {source}")]
    QueueSetup {
        /// The queue (the first queue of a per-io worker).
        q_id: u16,
        /// What failed.
        #[source]
        source: Box<Error>,
    },
    /// The thread serving queue `q_id` panicked (in the target's code).
    #[error("the thread serving queue {q_id} panicked")]
    QueuePanicked {
        /// The queue (the first queue of a per-io worker).
        q_id: u16,
    },
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

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn dev_suffix(dev_id: Option<u32>) -> String {
    dev_id
        .map(|id| format!(" for device {id}"))
        .unwrap_or_default()
}

/// `Operation not supported (errno 95)`: the C library's text once, then
/// the number (std's `Display` would add its own "(os error 95)").
fn errno_text(errno: Errno) -> String {
    let raw = errno.raw_os_error();
    let text = io::Error::from_raw_os_error(raw).to_string();
    let text = text
        .strip_suffix(&format!(" (os error {raw})"))
        .unwrap_or(&text);
    format!("{text} (errno {raw})")
}

impl Error {
    /// The errno behind this error, if there is one: a failed kernel
    /// command's, or that of the system call that failed.
    ///
    /// ```
    /// # fn f(e: ublk::Error) -> bool {
    /// use ublk::Errno;
    /// e.errno() == Some(Errno::BUSY)
    /// # }
    /// ```
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Self::Command { errno, .. } => Some(*errno),
            Self::Open { source, .. } | Self::Io { source, .. } | Self::Submit { source, .. } => {
                source.raw_os_error().map(Errno::from_raw_os_error)
            }
            Self::QueueSetup { source, .. } => source.errno(),
            _ => None,
        }
    }

    pub(crate) fn io(what: &'static str) -> impl FnOnce(io::Error) -> Self {
        move |source| Self::Io { what, source }
    }

    pub(crate) fn config(what: impl Into<String>) -> Self {
        Self::Config(what.into())
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
            errno: Errno::OPNOTSUPP,
        };
        let line = "UBLK_U_CMD_ADD_DEV failed for device 3: Operation not supported (errno 95)";
        assert_eq!(e.to_string(), line);
        // What `fn main() -> ublk::Result<()>` prints.
        assert_eq!(format!("{e:?}"), line);
        assert_eq!(e.errno(), Some(Errno::OPNOTSUPP));
    }

    #[test]
    fn a_queue_error_keeps_its_source() {
        let e = Error::QueueSetup {
            q_id: 1,
            source: Box::new(Error::Command {
                cmd: "UBLK_U_IO_FETCH_REQ",
                dev_id: Some(0),
                errno: Errno::INVAL,
            }),
        };
        assert_eq!(
            e.to_string(),
            "queue 1: UBLK_U_IO_FETCH_REQ failed for device 0: Invalid argument (errno 22)"
        );
        assert_eq!(e.errno(), Some(Errno::INVAL));
        assert!(std::error::Error::source(&e).is_some());
    }
}
