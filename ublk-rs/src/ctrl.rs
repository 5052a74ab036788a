//! The control device, `/dev/ublk-control`, and the commands sent to it.
#![allow(unsafe_code)] // ring submission of entries that carry our buffers

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use io_uring::{cqueue, squeue, IoUring};
use ublk_sys::{ublk_params, ublksrv_ctrl_dev_info};

use rustix::io::Errno;

use crate::cmd::{self, CtrlCommand, Encoding};
use crate::params::Params;
use crate::pod::Pod;
use crate::{Error, Features, Result};

/// The path of the control device.
pub const CONTROL_PATH: &str = "/dev/ublk-control";

/// The major number of Linux misc devices, ublk-control among them.
const MISC_MAJOR: u32 = 10;

/// Refuses a control path that is not a misc character device.
fn check_control_node(path: &Path) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => Error::NoDriver {
            path: path.to_owned(),
        },
        _ => Error::Open {
            path: path.to_owned(),
            source,
        },
    })?;
    let t = meta.file_type();
    let what = if t.is_char_device() {
        let (major, minor) = (
            rustix::fs::major(meta.rdev()),
            rustix::fs::minor(meta.rdev()),
        );
        if major == MISC_MAJOR {
            return Ok(());
        }
        format!("the character device {major}:{minor}")
    } else if t.is_file() {
        "a regular file".to_owned()
    } else if t.is_dir() {
        "a directory".to_owned()
    } else if t.is_block_device() {
        "a block device".to_owned()
    } else if t.is_fifo() {
        "a FIFO".to_owned()
    } else if t.is_socket() {
        "a socket".to_owned()
    } else {
        "not a character device".to_owned()
    };
    Err(Error::NotControlDevice {
        path: path.to_owned(),
        what,
    })
}

/// The path of device `id`'s char device.
pub fn char_dev_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkc{id}"))
}

/// The path of device `id`'s block device.
pub fn block_dev_path(id: u32) -> PathBuf {
    PathBuf::from(format!("/dev/ublkb{id}"))
}

/// A device as control commands address it: its id, and whether it is an
/// unprivileged device (whose commands must carry its char device's path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevRef {
    /// The device id (`N` of `/dev/ublkcN`).
    pub id: u32,
    /// Created with `UBLK_F_UNPRIVILEGED_DEV`.
    pub unprivileged: bool,
}

impl From<u32> for DevRef {
    #[inline]
    fn from(id: u32) -> Self {
        Self {
            id,
            unprivileged: false,
        }
    }
}

/// A device's state (`UBLK_S_DEV_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevState {
    /// Not started, or stopped.
    Dead,
    /// Started and served.
    Live,
    /// Waiting for a new server (user recovery).
    Quiesced,
    /// No server; I/O fails at once (`UBLK_F_USER_RECOVERY_FAIL_IO`).
    FailIo,
    /// A value this crate does not know.
    Unknown(u16),
}

impl DevState {
    /// From the `state` field.
    pub fn from_raw(v: u16) -> Self {
        match u32::from(v) {
            ublk_sys::UBLK_S_DEV_DEAD => Self::Dead,
            ublk_sys::UBLK_S_DEV_LIVE => Self::Live,
            ublk_sys::UBLK_S_DEV_QUIESCED => Self::Quiesced,
            ublk_sys::UBLK_S_DEV_FAIL_IO => Self::FailIo,
            _ => Self::Unknown(v),
        }
    }
}

impl std::fmt::Display for DevState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dead => f.write_str("DEAD"),
            Self::Live => f.write_str("LIVE"),
            Self::Quiesced => f.write_str("QUIESCED"),
            Self::FailIo => f.write_str("FAIL_IO"),
            Self::Unknown(v) => write!(f, "UNKNOWN({v})"),
        }
    }
}

/// A device's `ublksrv_ctrl_dev_info`, as the kernel reported it.
#[derive(Debug, Clone, Copy, Default)]
#[repr(transparent)]
pub struct DevInfo(pub ublksrv_ctrl_dev_info);

impl DevInfo {
    /// The device id.
    #[inline]
    pub fn id(&self) -> u32 {
        self.0.dev_id
    }
    /// How the control commands address it.
    #[inline]
    pub fn dev_ref(&self) -> DevRef {
        DevRef {
            id: self.0.dev_id,
            unprivileged: self.flags().contains(Features::UNPRIVILEGED_DEV),
        }
    }
    /// Number of hardware queues.
    #[inline]
    pub fn nr_queues(&self) -> u16 {
        self.0.nr_hw_queues
    }
    /// Depth of each queue (tags per queue).
    #[inline]
    pub fn queue_depth(&self) -> u16 {
        self.0.queue_depth
    }
    /// Largest request, in bytes.
    #[inline]
    pub fn max_io_buf_bytes(&self) -> u32 {
        self.0.max_io_buf_bytes
    }
    /// The device's state.
    #[inline]
    pub fn state(&self) -> DevState {
        DevState::from_raw(self.0.state)
    }
    /// The serving process, or -1.
    #[inline]
    pub fn server_pid(&self) -> i32 {
        self.0.ublksrv_pid
    }
    /// The negotiated feature flags.
    #[inline]
    pub fn flags(&self) -> Features {
        Features::from_bits_retain(self.0.flags)
    }
    /// The owning user and group.
    #[inline]
    pub fn owner(&self) -> (u32, u32) {
        (self.0.owner_uid, self.0.owner_gid)
    }
}

/// The control device with its ring of 128-byte SQEs.
///
/// Commands are synchronous: each submits one entry and waits for its
/// completion. The ring is behind a mutex, so a `Control` can be shared
/// between threads (one command at a time).
pub struct Control {
    ring: Mutex<IoUring<squeue::Entry128, cqueue::Entry>>,
    fd: OwnedFd,
    features: Features,
    kernel_mask: u64,
    encoding: Encoding,
}

impl Control {
    /// Opens `/dev/ublk-control` and asks the kernel what it supports.
    pub fn open() -> Result<Self> {
        Self::open_path(CONTROL_PATH)
    }

    /// Opens the control device at `path`: it must be a misc character
    /// device (major 10), as ublk_drv's is; anything else, a regular file
    /// left at `/dev/ublk-control` for instance, is refused with
    /// [`Error::NotControlDevice`] before it is opened.
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        check_control_node(path)?;
        let fd: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => Error::NoDriver {
                    path: path.to_owned(),
                },
                _ => Error::Open {
                    path: path.to_owned(),
                    source,
                },
            })?
            .into();
        let ring = IoUring::builder()
            .build(4)
            .map_err(Error::io("creating the control io_uring (128-byte SQEs)"))?;
        let mut ctrl = Self {
            ring: Mutex::new(ring),
            fd,
            features: Features::LINUX_6_1,
            kernel_mask: Features::LINUX_6_1.bits(),
            encoding: Encoding::Legacy,
        };
        let mut mask = 0u64;
        // GET_FEATURES exists from 6.5 on, always ioctl-encoded; before it,
        // the kernel is taken to have the 6.1 set and the legacy opcodes.
        match ctrl.run(cmd::GetFeatures::new(ctrl.fd(), &mut mask), None, None) {
            Ok(_) => {
                ctrl.kernel_mask = mask;
                ctrl.features = Features::from_bits_truncate(mask);
                if ctrl.features.contains(Features::CMD_IOCTL_ENCODE) {
                    ctrl.encoding = Encoding::Ioctl;
                }
            }
            Err(e)
                if matches!(
                    e.errno(),
                    Some(Errno::INVAL | Errno::OPNOTSUPP | Errno::NOTTY)
                ) =>
            {
                log::debug!("GET_FEATURES unsupported ({e}); assuming the Linux 6.1 feature set");
            }
            Err(e) => return Err(e),
        }
        Ok(ctrl)
    }

    /// The features the kernel supports (that this crate knows).
    #[inline]
    pub fn features(&self) -> Features {
        self.features
    }

    /// This handle, acting as if the kernel lacked `features`: it then
    /// takes the paths it takes on such a kernel (`GET_DEV_INFO` where
    /// `UNPRIVILEGED_DEV` is missing, say), and [`require`](Self::require)
    /// refuses them. For trying a server against an older kernel's feature
    /// set; the opcode encoding and [`kernel_mask`](Self::kernel_mask) stay
    /// the kernel's.
    pub fn without_features(mut self, features: Features) -> Self {
        self.features -= features;
        self
    }

    /// The kernel's raw feature mask, including bits this crate does not know.
    #[inline]
    pub fn kernel_mask(&self) -> u64 {
        self.kernel_mask
    }

    /// The opcode encoding this kernel takes.
    #[inline]
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// Fails with [`Error::Unsupported`] unless the kernel has all of `wanted`.
    pub fn require(&self, wanted: Features) -> Result<()> {
        let missing = wanted - self.features;
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::Unsupported {
                missing,
                kernel: self.kernel_mask,
            })
        }
    }

    /// Submits a control command and waits for its completion.
    ///
    /// # Safety
    /// Every buffer `entry` points to must stay valid (and, where the kernel
    /// writes it, unaliased) until this call returns.
    pub unsafe fn submit(&self, entry: squeue::Entry128) -> io::Result<i32> {
        let mut ring = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
        // SAFETY: the caller keeps the entry's buffers alive until we return,
        // and we return only after the entry's completion (or before it was
        // consumed, when the push or the first enter fails).
        unsafe { ring.submission().push(&entry.user_data(0x75626c6b)) }
            .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
        let mut submitted = false;
        loop {
            let r = if submitted {
                ring.submitter().submit_and_wait(1)
            } else {
                ring.submit_and_wait(1)
            };
            match r {
                Ok(n) => submitted |= n > 0 || ring.submission().is_empty(),
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) =>
                {
                    submitted |= ring.submission().is_empty();
                    continue;
                }
                Err(e) if !submitted => return Err(e),
                // The entry is in flight: we must not return before it completes.
                Err(e) => log::warn!("waiting for a control command: {e}; retrying"),
            }
            if let Some(cqe) = ring.completion().next() {
                return Ok(cqe.result());
            }
        }
    }

    /// Runs `cmd` (whose payload, if any, is `payload`), adding the char
    /// device path for unprivileged devices.
    fn run<C: CtrlCommand>(
        &self,
        cmd: C,
        dev: Option<DevRef>,
        payload: Option<&mut [u8]>,
    ) -> Result<i32> {
        let res = match dev.filter(|d| d.unprivileged) {
            Some(d) => {
                let mut buf = path_prefixed(d.id, payload.as_deref());
                let path_len = buf.len() - payload.as_deref().map_or(0, <[u8]>::len);
                // Paths and payloads are a few hundred bytes at most.
                let len = u16::try_from(buf.len()).unwrap_or(u16::MAX);
                let entry = cmd
                    .with_dev_path(buf.as_mut_ptr(), len, path_len as u16)
                    .entry(self.encoding);
                // SAFETY: `buf` lives until after `submit` returns.
                let res = unsafe { self.submit(entry) };
                if let (Ok(r), Some(p)) = (&res, payload) {
                    if *r >= 0 {
                        p.copy_from_slice(&buf[path_len..]);
                    }
                }
                res
            }
            // SAFETY: the builder's buffer is `payload` (or none), borrowed
            // mutably for the whole call.
            None => unsafe { self.submit(cmd.entry(self.encoding)) },
        }
        .map_err(|source| Error::Submit {
            cmd: C::NAME,
            source,
        })?;
        if res < 0 {
            Err(Error::Command {
                cmd: C::NAME,
                dev_id: dev.map(|d| d.id),
                errno: Errno::from_raw_os_error(-res),
            })
        } else {
            Ok(res)
        }
    }

    /// `ADD_DEV`: creates a device from `info` (its `dev_id` may be
    /// `u32::MAX` for the next free id) and returns what the kernel made of it.
    pub fn add_dev(&self, info: &DevInfo) -> Result<DevInfo> {
        let mut out = *info;
        let id = out.0.dev_id;
        self.run(
            cmd::AddDev::new(self.fd(), id, &mut out.0),
            (id != u32::MAX)
                .then_some(id.into())
                .map(|d: DevRef| DevRef {
                    unprivileged: false,
                    ..d
                }),
            None,
        )?;
        Ok(out)
    }

    /// `DEL_DEV`: removes the device; waits until its char device is released
    /// (and so until every opener of `/dev/ublkbN` has closed it).
    pub fn del_dev(&self, dev: impl Into<DevRef>) -> Result<()> {
        let dev = dev.into();
        self.run(cmd::DelDev::new(self.fd(), dev.id), Some(dev), None)
            .map(drop)
    }

    /// `DEL_DEV_ASYNC`: removes the device without waiting.
    pub fn del_dev_async(&self, dev: impl Into<DevRef>) -> Result<()> {
        let dev = dev.into();
        self.run(cmd::DelDevAsync::new(self.fd(), dev.id), Some(dev), None)
            .map(drop)
    }

    /// `START_DEV`: exposes `/dev/ublkbN`; every queue must have fetched.
    pub fn start_dev(&self, dev: impl Into<DevRef>, pid: i32) -> Result<()> {
        let dev = dev.into();
        self.run(cmd::StartDev::new(self.fd(), dev.id, pid), Some(dev), None)
            .map(drop)
    }

    /// `STOP_DEV`: removes `/dev/ublkbN`; the queues see `UBLK_IO_RES_ABORT`.
    pub fn stop_dev(&self, dev: impl Into<DevRef>) -> Result<()> {
        let dev = dev.into();
        self.run(cmd::StopDev::new(self.fd(), dev.id), Some(dev), None)
            .map(drop)
    }

    /// `TRY_STOP_DEV`: stops the device only if nobody has it open (`EBUSY` otherwise).
    pub fn try_stop_dev(&self, dev: impl Into<DevRef>) -> Result<()> {
        let dev = dev.into();
        self.require(Features::SAFE_STOP_DEV)?;
        self.run(cmd::TryStopDev::new(self.fd(), dev.id), Some(dev), None)
            .map(drop)
    }

    /// `SET_PARAMS`.
    pub fn set_params(&self, dev: impl Into<DevRef>, params: &Params) -> Result<()> {
        let dev = dev.into();
        let mut raw = params.to_raw();
        self.run(
            cmd::SetParams::new(self.fd(), dev.id, &raw),
            Some(dev),
            Some(raw.as_bytes_mut()),
        )
        .map(drop)
    }

    /// `GET_PARAMS`.
    pub fn get_params(&self, dev: impl Into<DevRef>) -> Result<Params> {
        let dev = dev.into();
        let mut raw = ublk_params {
            len: size_of::<ublk_params>() as u32,
            ..Default::default()
        };
        let ptr: *mut ublk_params = &mut raw;
        self.run(
            cmd::GetParams::new(self.fd(), dev.id, ptr),
            Some(dev),
            Some(raw.as_bytes_mut()),
        )?;
        Ok(Params::from_raw(&raw))
    }

    /// The device's info: `GET_DEV_INFO2` (with the char device's path) where
    /// the kernel has unprivileged devices, else `GET_DEV_INFO`, as the kernel
    /// documentation describes.
    pub fn dev_info(&self, id: u32) -> Result<DevInfo> {
        let mut info = DevInfo::default();
        let ptr: *mut ublksrv_ctrl_dev_info = &mut info.0;
        if self.features.contains(Features::UNPRIVILEGED_DEV) {
            let dev = DevRef {
                id,
                unprivileged: true,
            };
            match self.run(
                cmd::GetDevInfo2::new(self.fd(), id, ptr),
                Some(dev),
                Some(info.0.as_bytes_mut()),
            ) {
                Ok(_) => return Ok(info),
                Err(e) if matches!(e.errno(), Some(Errno::INVAL | Errno::OPNOTSUPP)) => {}
                Err(e) => return Err(e),
            }
        }
        self.run(
            cmd::GetDevInfo::new(self.fd(), id, ptr),
            Some(id.into()),
            None,
        )?;
        Ok(info)
    }

    /// The CPUs queue `q_id` is affine to.
    pub fn queue_affinity(&self, dev: impl Into<DevRef>, q_id: u16) -> Result<Vec<usize>> {
        let dev = dev.into();
        let mut mask = [0u8; 512];
        let len = mask.len() as u16;
        self.run(
            cmd::GetQueueAffinity::new(self.fd(), dev.id, q_id, mask.as_mut_ptr(), len),
            Some(dev),
            Some(&mut mask),
        )?;
        Ok((0..mask.len() * 8)
            .filter(|cpu| mask[cpu / 8] & (1 << (cpu % 8)) != 0)
            .collect())
    }

    /// `START_USER_RECOVERY`.
    pub fn start_user_recovery(&self, dev: impl Into<DevRef>) -> Result<()> {
        let dev = dev.into();
        self.run(
            cmd::StartUserRecovery::new(self.fd(), dev.id),
            Some(dev),
            None,
        )
        .map(drop)
    }

    /// `END_USER_RECOVERY` for the new server `pid`.
    pub fn end_user_recovery(&self, dev: impl Into<DevRef>, pid: i32) -> Result<()> {
        let dev = dev.into();
        self.run(
            cmd::EndUserRecovery::new(self.fd(), dev.id, pid),
            Some(dev),
            None,
        )
        .map(drop)
    }

    /// `UPDATE_SIZE` to `sectors` (512-byte units).
    pub fn update_size(&self, dev: impl Into<DevRef>, sectors: u64) -> Result<()> {
        let dev = dev.into();
        self.require(Features::UPDATE_SIZE)?;
        self.run(
            cmd::UpdateSize::new(self.fd(), dev.id, sectors),
            Some(dev),
            None,
        )
        .map(drop)
    }

    /// `QUIESCE_DEV`, waiting at most `timeout_ms` (0: no limit).
    pub fn quiesce_dev(&self, dev: impl Into<DevRef>, timeout_ms: u64) -> Result<()> {
        let dev = dev.into();
        self.require(Features::QUIESCE)?;
        self.run(
            cmd::QuiesceDev::new(self.fd(), dev.id, timeout_ms),
            Some(dev),
            None,
        )
        .map(drop)
    }

    /// `REG_BUF`: registers `len` bytes of shared memory at `addr` for
    /// shared-memory zero copy (`UBLK_F_SHMEM_ZC`); returns the buffer index
    /// the kernel assigned. With `read_only` the pages are pinned without
    /// write access (`UBLK_SHMEM_BUF_READ_ONLY`, e.g. for a write-sealed memfd).
    ///
    /// Requests whose pages lie in a registered buffer then arrive with
    /// [`crate::IoFlags::SHMEM_ZC`] and the buffer index and offset in their
    /// `addr`. Undo with [`Control::unreg_buf`].
    ///
    /// # Safety
    /// `addr..addr + len` must be a page-aligned shared mapping (memfd,
    /// hugetlbfs, a `MAP_SHARED` file) of this process that stays mapped
    /// until the buffer is unregistered or the device deleted: the kernel
    /// pins its pages and may read or write them for any request on the
    /// device.
    pub unsafe fn reg_buf(
        &self,
        dev: impl Into<DevRef>,
        addr: *mut u8,
        len: u64,
        read_only: bool,
    ) -> Result<u32> {
        let dev = dev.into();
        self.require(Features::SHMEM_ZC)?;
        let mut reg = ublk_sys::ublk_shmem_buf_reg {
            addr: addr as u64,
            len,
            flags: if read_only {
                ublk_sys::UBLK_SHMEM_BUF_READ_ONLY
            } else {
                0
            },
            reserved: 0,
        };
        let ptr: *const ublk_sys::ublk_shmem_buf_reg = &reg;
        let index = self.run(
            cmd::RegBuf::new(self.fd(), dev.id, ptr),
            Some(dev),
            Some(reg.as_bytes_mut()),
        )?;
        // `run` maps negative results to errors.
        Ok(index as u32)
    }

    /// `UNREG_BUF` of shared buffer `index`.
    pub fn unreg_buf(&self, dev: impl Into<DevRef>, index: u32) -> Result<()> {
        let dev = dev.into();
        self.run(
            cmd::UnregBuf::new(self.fd(), dev.id, index),
            Some(dev),
            None,
        )
        .map(drop)
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("fd", &self.fd)
            .field("features", &self.features)
            .field("encoding", &self.encoding)
            .finish_non_exhaustive()
    }
}

impl Control {
    /// The control device, as the command builders take it.
    #[inline]
    fn fd(&self) -> io_uring::types::Fd {
        io_uring::types::Fd(self.fd.as_raw_fd())
    }
}

impl AsFd for Control {
    #[inline]
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `/dev/ublkcN\0` followed by `payload`.
fn path_prefixed(id: u32, payload: Option<&[u8]>) -> Vec<u8> {
    let mut buf = char_dev_path(id).into_os_string().into_encoded_bytes();
    buf.push(0);
    buf.extend_from_slice(payload.unwrap_or_default());
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(path: &str) -> String {
        match Control::open_path(path) {
            Ok(_) => panic!("{path} was taken for the control device"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn only_a_misc_character_device_is_taken_for_the_driver() {
        let file = std::env::temp_dir().join(format!("ublk-control-{}", std::process::id()));
        std::fs::write(&file, b"").unwrap();
        let shown = file.display().to_string();
        assert_eq!(
            refused(&shown),
            format!("{shown} is a regular file, not ublk_drv's control device (a misc character device): load the ublk_drv kernel module (modprobe ublk_drv)")
        );
        std::fs::remove_file(&file).unwrap();
        assert_eq!(
            refused(&shown),
            format!("{shown} not found: load the ublk_drv kernel module (modprobe ublk_drv)")
        );
        assert!(refused("/dev/null")
            .starts_with("/dev/null is the character device 1:3, not ublk_drv's control device"));
        assert!(refused("/").starts_with("/ is a directory, not"));
    }
}
