//! Typed builders for every ublk `IORING_OP_URING_CMD`, in the style of
//! `io_uring::opcode`.
//!
//! Control commands (sent to `/dev/ublk-control`) build a 128-byte
//! [`Entry128`]: their payload, a `ublksrv_ctrl_cmd`, lives in the SQE's
//! 80-byte command area. I/O commands (sent to `/dev/ublkcN`, usually as a
//! registered file) build a 64-byte [`Entry`] with a `ublksrv_io_cmd` in the
//! 16-byte command area.
//!
//! Building an entry is safe. Many entries carry the address of a buffer the
//! kernel reads or writes; pushing such an entry onto a ring is `unsafe`
//! (`io_uring::SubmissionQueue::push`), and the caller must keep the buffer
//! alive and unaliased until the command completes.

use std::os::fd::RawFd;

use io_uring::opcode::{UringCmd16, UringCmd80};
use io_uring::squeue::{Entry, Entry128};
use io_uring::types;
use ublk_sys::{
    ublk_params, ublk_shmem_buf_reg, ublksrv_ctrl_cmd, ublksrv_ctrl_dev_info, ublksrv_io_cmd,
};

use crate::pod::Pod;

/// The file a command is sent to: a plain descriptor, or an index into the
/// ring's registered file table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileRef {
    /// A plain file descriptor.
    Fd(RawFd),
    /// An index into the ring's registered files.
    Fixed(u32),
}

impl From<types::Fd> for FileRef {
    #[inline]
    fn from(fd: types::Fd) -> Self {
        Self::Fd(fd.0)
    }
}

impl From<types::Fixed> for FileRef {
    #[inline]
    fn from(fd: types::Fixed) -> Self {
        Self::Fixed(fd.0)
    }
}

/// How a command's opcode is encoded.
///
/// Kernels with `UBLK_F_CMD_IOCTL_ENCODE` (6.2 and later) take the
/// ioctl-encoded `UBLK_U_*` numbers; older ones only the legacy numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// `_IOR`/`_IOWR` encoded opcodes (`UBLK_U_CMD_*`, `UBLK_U_IO_*`).
    #[default]
    Ioctl,
    /// The legacy small numbers (`UBLK_CMD_*`, `UBLK_IO_*`). Commands added
    /// after the ioctl encoding have none and keep their ioctl opcode.
    Legacy,
}

impl Encoding {
    /// The opcode of a command with ioctl opcode `code` and legacy opcode
    /// `legacy` under this encoding (commands without a legacy opcode keep
    /// the ioctl one).
    #[inline]
    pub const fn opcode(self, code: u32, legacy: Option<u32>) -> u32 {
        match (self, legacy) {
            (Self::Legacy, Some(l)) => l,
            _ => code,
        }
    }
}

/// The `queue_id` of a control command that is not about a queue.
const NO_QUEUE: u16 = u16::MAX;

#[inline]
fn ctrl_header(dev_id: u32, addr: u64, len: u16, data: u64) -> ublksrv_ctrl_cmd {
    ublksrv_ctrl_cmd {
        dev_id,
        queue_id: NO_QUEUE,
        len,
        addr,
        data: [data],
        ..Default::default()
    }
}

/// The size of `T` as the `u16` length field of a control command.
#[inline]
const fn len_of<T>() -> u16 {
    // All UAPI payloads are far below 64 KiB (ublk-sys asserts their sizes).
    size_of::<T>() as u16
}

/// `$op::new` for the file `$fd` refers to: io-uring's opcode builders take
/// a `types::Fd` or a `types::Fixed`, two types, hence the one match here.
macro_rules! uring_cmd_new {
    ($op:ident, $fd:expr, $opcode:expr) => {
        match $fd {
            FileRef::Fd(fd) => $op::new(types::Fd(fd), $opcode),
            FileRef::Fixed(i) => $op::new(types::Fixed(i), $opcode),
        }
    };
}

#[inline]
fn uring_cmd80(fd: FileRef, opcode: u32, hdr: &ublksrv_ctrl_cmd) -> Entry128 {
    let mut cmd = [0u8; 80];
    cmd[..size_of::<ublksrv_ctrl_cmd>()].copy_from_slice(hdr.as_bytes());
    uring_cmd_new!(UringCmd80, fd, opcode).cmd(cmd).build()
}

#[inline]
fn uring_cmd16(fd: FileRef, opcode: u32, cmd: [u8; 16], sqe_addr: Option<u64>) -> Entry {
    uring_cmd_new!(UringCmd16, fd, opcode)
        .cmd(cmd)
        .addr(sqe_addr)
        .build()
}

/// What [`crate::Control`] needs of a control command to run it: its name
/// for messages, the unprivileged path prefix, and its SQE.
pub trait CtrlCommand: Copy {
    /// The command's kernel name, for messages.
    const NAME: &'static str;
    /// See the builders' `dev_path`.
    fn with_dev_path(self, buf: *mut u8, len: u16, path_len: u16) -> Self;
    /// The 128-byte SQE with the opcode of `encoding`.
    fn entry(self, encoding: Encoding) -> Entry128;
}

macro_rules! ctrl_command {
    ($(#[$doc:meta])* $name:ident = $ioctl:ident, legacy: $legacy:expr;
     new($($arg:ident: $ty:ty),*) => $hdr:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        #[must_use = "a builder does nothing until built and submitted"]
        pub struct $name {
            fd: FileRef,
            hdr: ublksrv_ctrl_cmd,
            encoding: Encoding,
        }

        impl $name {
            /// The ioctl-encoded opcode.
            pub const CODE: u32 = ublk_sys::$ioctl;
            /// The legacy opcode, for commands that have one.
            pub const LEGACY_CODE: Option<u32> = $legacy;
            /// A new command for the control device `fd`, with its
            /// required arguments.
            #[inline]
            #[allow(clippy::too_many_arguments)]
            pub fn new(fd: impl Into<FileRef>, $($arg: $ty),*) -> Self {
                Self { fd: fd.into(), hdr: $hdr, encoding: Encoding::Ioctl }
            }

            /// Selects the opcode encoding (default: [`Encoding::Ioctl`]).
            #[inline]
            pub const fn encoding(mut self, encoding: Encoding) -> Self {
                self.encoding = encoding;
                self
            }

            /// For unprivileged devices (and `GET_DEV_INFO2`): the command's
            /// buffer becomes `buf`, which starts with the NUL-terminated path
            /// of the device's char device (`path_len` bytes, NUL included)
            /// followed by the command's own payload; `len` covers both.
            #[inline]
            pub fn dev_path(mut self, buf: *mut u8, len: u16, path_len: u16) -> Self {
                self.hdr.addr = buf as u64;
                self.hdr.len = len;
                self.hdr.dev_path_len = path_len;
                self
            }

            /// The `ublksrv_ctrl_cmd` this builder carries.
            #[inline]
            pub const fn header(&self) -> &ublksrv_ctrl_cmd {
                &self.hdr
            }

            /// The opcode for the chosen encoding.
            #[inline]
            pub const fn opcode(&self) -> u32 {
                self.encoding.opcode(Self::CODE, Self::LEGACY_CODE)
            }

            /// The 128-byte SQE.
            #[inline]
            pub fn build(self) -> Entry128 {
                uring_cmd80(self.fd, self.opcode(), &self.hdr)
            }
        }

        impl CtrlCommand for $name {
            const NAME: &'static str = stringify!($ioctl);
            #[inline]
            fn with_dev_path(self, buf: *mut u8, len: u16, path_len: u16) -> Self {
                self.dev_path(buf, len, path_len)
            }
            #[inline]
            fn entry(self, encoding: Encoding) -> Entry128 {
                self.encoding(encoding).build()
            }
        }
    };
}

ctrl_command! {
    /// `UBLK_U_CMD_ADD_DEV`: create `/dev/ublkcN` from `info`; the kernel
    /// writes the negotiated info back. `dev_id` is `u32::MAX` for "any".
    AddDev = UBLK_U_CMD_ADD_DEV, legacy: Some(ublk_sys::UBLK_CMD_ADD_DEV);
    new(dev_id: u32, info: *mut ublksrv_ctrl_dev_info) =>
        ctrl_header(dev_id, info as u64, len_of::<ublksrv_ctrl_dev_info>(), 0)
}
ctrl_command! {
    /// `UBLK_U_CMD_DEL_DEV`: remove `/dev/ublkcN`, waiting until it is released.
    DelDev = UBLK_U_CMD_DEL_DEV, legacy: Some(ublk_sys::UBLK_CMD_DEL_DEV);
    new(dev_id: u32) => ctrl_header(dev_id, 0, 0, 0)
}
ctrl_command! {
    /// `UBLK_U_CMD_DEL_DEV_ASYNC`: remove `/dev/ublkcN` without waiting.
    DelDevAsync = UBLK_U_CMD_DEL_DEV_ASYNC, legacy: None;
    new(dev_id: u32) => ctrl_header(dev_id, 0, 0, 0)
}
ctrl_command! {
    /// `UBLK_U_CMD_START_DEV`: expose `/dev/ublkbN`, served by process `pid`.
    StartDev = UBLK_U_CMD_START_DEV, legacy: Some(ublk_sys::UBLK_CMD_START_DEV);
    new(dev_id: u32, pid: i32) => ctrl_header(dev_id, 0, 0, pid as u64)
}
ctrl_command! {
    /// `UBLK_U_CMD_STOP_DEV`: remove `/dev/ublkbN` and abort the server's commands.
    StopDev = UBLK_U_CMD_STOP_DEV, legacy: Some(ublk_sys::UBLK_CMD_STOP_DEV);
    new(dev_id: u32) => ctrl_header(dev_id, 0, 0, 0)
}
ctrl_command! {
    /// `UBLK_U_CMD_TRY_STOP_DEV`: stop only if nobody has the disk open.
    TryStopDev = UBLK_U_CMD_TRY_STOP_DEV, legacy: None;
    new(dev_id: u32) => ctrl_header(dev_id, 0, 0, 0)
}
ctrl_command! {
    /// `UBLK_U_CMD_SET_PARAMS`: set parameters before `START_DEV`.
    SetParams = UBLK_U_CMD_SET_PARAMS, legacy: Some(ublk_sys::UBLK_CMD_SET_PARAMS);
    new(dev_id: u32, params: *const ublk_params) =>
        ctrl_header(dev_id, params as u64, len_of::<ublk_params>(), 0)
}
ctrl_command! {
    /// `UBLK_U_CMD_GET_PARAMS`: read parameters back (set `params.len` first).
    GetParams = UBLK_U_CMD_GET_PARAMS, legacy: Some(ublk_sys::UBLK_CMD_GET_PARAMS);
    new(dev_id: u32, params: *mut ublk_params) =>
        ctrl_header(dev_id, params as u64, len_of::<ublk_params>(), 0)
}
ctrl_command! {
    /// `UBLK_U_CMD_GET_DEV_INFO`: read the device's `ublksrv_ctrl_dev_info`.
    GetDevInfo = UBLK_U_CMD_GET_DEV_INFO, legacy: Some(ublk_sys::UBLK_CMD_GET_DEV_INFO);
    new(dev_id: u32, info: *mut ublksrv_ctrl_dev_info) =>
        ctrl_header(dev_id, info as u64, len_of::<ublksrv_ctrl_dev_info>(), 0)
}
ctrl_command! {
    /// `UBLK_U_CMD_GET_DEV_INFO2`: like `GET_DEV_INFO` with a permission
    /// check on the char device's path (see [`GetDevInfo2::dev_path`]).
    GetDevInfo2 = UBLK_U_CMD_GET_DEV_INFO2, legacy: Some(ublk_sys::UBLK_CMD_GET_DEV_INFO2);
    new(dev_id: u32, info: *mut ublksrv_ctrl_dev_info) =>
        ctrl_header(dev_id, info as u64, len_of::<ublksrv_ctrl_dev_info>(), 0)
}
ctrl_command! {
    /// `UBLK_U_CMD_GET_QUEUE_AFFINITY`: the CPU mask of queue `q_id`, written
    /// to the `len` bytes at `mask`.
    GetQueueAffinity = UBLK_U_CMD_GET_QUEUE_AFFINITY, legacy: Some(ublk_sys::UBLK_CMD_GET_QUEUE_AFFINITY);
    new(dev_id: u32, q_id: u16, mask: *mut u8, len: u16) =>
        // The kernel reads the queue from data[0]; queue_id stays "none".
        ctrl_header(dev_id, mask as u64, len, u64::from(q_id))
}
ctrl_command! {
    /// `UBLK_U_CMD_GET_FEATURES`: the kernel's `UBLK_F_*` mask, written to `out`.
    GetFeatures = UBLK_U_CMD_GET_FEATURES, legacy: None;
    new(out: *mut u64) => ctrl_header(u32::MAX, out as u64, len_of::<u64>(), 0)
}
ctrl_command! {
    /// `UBLK_U_CMD_START_USER_RECOVERY`: prepare a device whose server died
    /// (or that was quiesced) for a new server.
    StartUserRecovery = UBLK_U_CMD_START_USER_RECOVERY, legacy: Some(ublk_sys::UBLK_CMD_START_USER_RECOVERY);
    new(dev_id: u32) => ctrl_header(dev_id, 0, 0, 0)
}
ctrl_command! {
    /// `UBLK_U_CMD_END_USER_RECOVERY`: the new server `pid` is ready.
    EndUserRecovery = UBLK_U_CMD_END_USER_RECOVERY, legacy: Some(ublk_sys::UBLK_CMD_END_USER_RECOVERY);
    new(dev_id: u32, pid: i32) => ctrl_header(dev_id, 0, 0, pid as u64)
}
ctrl_command! {
    /// `UBLK_U_CMD_UPDATE_SIZE`: resize a live device to `sectors`.
    UpdateSize = UBLK_U_CMD_UPDATE_SIZE, legacy: None;
    new(dev_id: u32, sectors: u64) => ctrl_header(dev_id, 0, 0, sectors)
}
ctrl_command! {
    /// `UBLK_U_CMD_QUIESCE_DEV`: quiesce the device for a server hand-over,
    /// waiting at most `timeout_ms` (0: no limit).
    QuiesceDev = UBLK_U_CMD_QUIESCE_DEV, legacy: None;
    new(dev_id: u32, timeout_ms: u64) => ctrl_header(dev_id, 0, 0, timeout_ms)
}
ctrl_command! {
    /// `UBLK_U_CMD_REG_BUF`: register shared memory for `UBLK_F_SHMEM_ZC`.
    RegBuf = UBLK_U_CMD_REG_BUF, legacy: None;
    new(dev_id: u32, reg: *const ublk_shmem_buf_reg) =>
        ctrl_header(dev_id, reg as u64, len_of::<ublk_shmem_buf_reg>(), 0)
}
ctrl_command! {
    /// `UBLK_U_CMD_UNREG_BUF`: unregister the shared buffer `index`.
    UnregBuf = UBLK_U_CMD_UNREG_BUF, legacy: None;
    new(dev_id: u32, index: u32) => ctrl_header(dev_id, 0, 0, u64::from(index))
}

/// The `UBLK_F_AUTO_BUF_REG` data a fetch or commit carries in `sqe->addr`:
/// where the kernel registers the next request's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AutoBufReg {
    /// Index in the ring's sparse buffer table.
    pub index: u16,
    /// `UBLK_AUTO_BUF_REG_*` flags.
    pub flags: u8,
}

impl AutoBufReg {
    /// Encodes as `ublk_auto_buf_reg_to_sqe_addr()` does: bits 0–15 index,
    /// 16–23 flags, the reserved bits zero.
    #[inline]
    pub const fn to_sqe_addr(self) -> u64 {
        self.index as u64 | (self.flags as u64) << 16
    }
}

macro_rules! io_command {
    ($(#[$doc:meta])* $name:ident = $ioctl:ident, legacy: $legacy:expr;
     new($($arg:ident: $ty:ty),*) => $cmd:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        #[must_use = "a builder does nothing until built and submitted"]
        pub struct $name {
            fd: FileRef,
            cmd: ublksrv_io_cmd,
            sqe_addr: Option<u64>,
            encoding: Encoding,
        }

        impl $name {
            /// The ioctl-encoded opcode.
            pub const CODE: u32 = ublk_sys::$ioctl;
            /// The legacy opcode, for commands that have one.
            pub const LEGACY_CODE: Option<u32> = $legacy;

            /// A new command for the char device `fd`.
            #[inline]
            pub fn new(fd: impl Into<FileRef>, $($arg: $ty),*) -> Self {
                Self { fd: fd.into(), cmd: $cmd, sqe_addr: None, encoding: Encoding::Ioctl }
            }

            /// Selects the opcode encoding (default: [`Encoding::Ioctl`]).
            #[inline]
            pub const fn encoding(mut self, encoding: Encoding) -> Self {
                self.encoding = encoding;
                self
            }

            /// The `ublksrv_io_cmd` this builder carries.
            #[inline]
            pub const fn io_cmd(&self) -> &ublksrv_io_cmd {
                &self.cmd
            }

            /// The opcode for the chosen encoding.
            #[inline]
            pub const fn opcode(&self) -> u32 {
                self.encoding.opcode(Self::CODE, Self::LEGACY_CODE)
            }

            /// The 64-byte SQE.
            #[inline]
            pub fn build(self) -> Entry {
                let mut cmd = [0u8; 16];
                cmd.copy_from_slice(self.cmd.as_bytes());
                uring_cmd16(self.fd, self.opcode(), cmd, self.sqe_addr)
            }
        }
    };
}

#[inline]
fn io_cmd(q_id: u16, tag: u16, result: i32) -> ublksrv_io_cmd {
    ublksrv_io_cmd {
        q_id,
        tag,
        result,
        ..Default::default()
    }
}

macro_rules! buf_addr_setters {
    ($($name:ident),*) => {$(
        impl $name {
            /// The server buffer of this tag (copy modes that use one).
            #[inline]
            pub fn buf_addr(mut self, addr: *mut u8) -> Self {
                self.cmd.__bindgen_anon_1.addr = addr as u64;
                self
            }

            /// With `UBLK_F_AUTO_BUF_REG`: where the kernel registers the
            /// next request's buffer (carried in `sqe->addr`).
            #[inline]
            pub const fn auto_buf_reg(mut self, reg: AutoBufReg) -> Self {
                self.sqe_addr = Some(reg.to_sqe_addr());
                self
            }
        }
    )*};
}

io_command! {
    /// `UBLK_U_IO_FETCH_REQ`: hand tag `tag` of queue `q_id` to the kernel
    /// for its first request.
    FetchReq = UBLK_U_IO_FETCH_REQ, legacy: Some(ublk_sys::UBLK_IO_FETCH_REQ);
    new(q_id: u16, tag: u16) => io_cmd(q_id, tag, -1)
}
io_command! {
    /// `UBLK_U_IO_COMMIT_AND_FETCH_REQ`: complete the tag's request with
    /// `result` (bytes or `-errno`) and fetch its next one.
    CommitAndFetchReq = UBLK_U_IO_COMMIT_AND_FETCH_REQ, legacy: Some(ublk_sys::UBLK_IO_COMMIT_AND_FETCH_REQ);
    new(q_id: u16, tag: u16, result: i32) => io_cmd(q_id, tag, result)
}
io_command! {
    /// `UBLK_U_IO_NEED_GET_DATA`: ask for a write's data to be copied into
    /// the buffer given with [`NeedGetData::buf_addr`].
    NeedGetData = UBLK_U_IO_NEED_GET_DATA, legacy: Some(ublk_sys::UBLK_IO_NEED_GET_DATA);
    new(q_id: u16, tag: u16) => io_cmd(q_id, tag, 0)
}
io_command! {
    /// `UBLK_U_IO_REGISTER_IO_BUF`: register the request buffer of `tag` at
    /// `index` of the ring's sparse buffer table.
    RegisterIoBuf = UBLK_U_IO_REGISTER_IO_BUF, legacy: None;
    new(q_id: u16, tag: u16, index: u16) =>
        ublksrv_io_cmd { __bindgen_anon_1: ublk_sys::ublksrv_io_cmd__bindgen_ty_1 { addr: u64::from(index) }, ..io_cmd(q_id, tag, 0) }
}
io_command! {
    /// `UBLK_U_IO_UNREGISTER_IO_BUF`: drop the registration at `index`.
    UnregisterIoBuf = UBLK_U_IO_UNREGISTER_IO_BUF, legacy: None;
    new(q_id: u16, tag: u16, index: u16) =>
        ublksrv_io_cmd { __bindgen_anon_1: ublk_sys::ublksrv_io_cmd__bindgen_ty_1 { addr: u64::from(index) }, ..io_cmd(q_id, tag, 0) }
}

buf_addr_setters!(FetchReq, CommitAndFetchReq, NeedGetData);

impl CommitAndFetchReq {
    /// With `UBLK_F_ZONED`: the LBA a zone append was written at.
    #[inline]
    pub const fn zone_append_lba(mut self, lba: u64) -> Self {
        self.cmd.__bindgen_anon_1.zone_append_lba = lba;
        self
    }
}

/// The byte size of one batch element for `flags` (`UBLK_BATCH_F_*`):
/// the 8-byte `ublk_elem_header`, plus 8 for a buffer address, plus 8 for a
/// zone-append LBA.
#[inline]
pub const fn batch_elem_bytes(flags: u16) -> u8 {
    let mut n = 8;
    if flags as u32 & ublk_sys::UBLK_BATCH_F_HAS_BUF_ADDR != 0 {
        n += 8;
    }
    if flags as u32 & ublk_sys::UBLK_BATCH_F_HAS_ZONE_LBA != 0 {
        n += 8;
    }
    n
}

/// Offsets in `struct io_uring_sqe` that `io_uring::opcode::UringCmd16`
/// leaves alone and batch commands need.
const SQE_LEN: usize = 24;
const SQE_URING_CMD_FLAGS: usize = 28;
const SQE_BUF_GROUP: usize = 40;
/// `IORING_URING_CMD_MULTISHOT`.
pub const IORING_URING_CMD_MULTISHOT: u32 = 1 << 1;

fn batch_entry(
    fd: FileRef,
    opcode: u32,
    hdr: &ublk_sys::ublk_batch_io,
    addr: u64,
    len: u32,
) -> Entry {
    let mut cmd = [0u8; 16];
    cmd.copy_from_slice(hdr.as_bytes());
    let e = uring_cmd16(fd, opcode, cmd, Some(addr));
    crate::pod::patch_sqe(e, |b| {
        b[SQE_LEN..SQE_LEN + 4].copy_from_slice(&len.to_ne_bytes())
    })
}

macro_rules! batch_buf_command {
    ($(#[$doc:meta])* $name:ident = $ioctl:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        #[must_use = "a builder does nothing until built and submitted"]
        pub struct $name {
            fd: FileRef,
            hdr: ublk_sys::ublk_batch_io,
            buf: *const u8,
        }

        impl $name {
            /// The ioctl-encoded opcode (batch commands have no legacy one).
            pub const CODE: u32 = ublk_sys::$ioctl;

            /// `nr_elem` elements of [`batch_elem_bytes`]`(flags)` bytes each
            /// at `buf`, for queue `q_id`.
            #[inline]
            pub fn new(fd: impl Into<FileRef>, q_id: u16, flags: u16, nr_elem: u16, buf: *const u8) -> Self {
                let hdr = ublk_sys::ublk_batch_io {
                    q_id,
                    flags,
                    nr_elem,
                    elem_bytes: batch_elem_bytes(flags),
                    ..Default::default()
                };
                Self { fd: fd.into(), hdr, buf }
            }

            /// The `ublk_batch_io` this builder carries.
            #[inline]
            pub const fn batch_io(&self) -> &ublk_sys::ublk_batch_io {
                &self.hdr
            }

            /// The 64-byte SQE (`sqe->addr`/`len` describe the elements).
            #[inline]
            pub fn build(self) -> Entry {
                let len = u32::from(self.hdr.nr_elem) * u32::from(self.hdr.elem_bytes);
                batch_entry(self.fd, Self::CODE, &self.hdr, self.buf as u64, len)
            }
        }
    };
}

batch_buf_command! {
    /// `UBLK_U_IO_PREP_IO_CMDS`: hand tags (with their buffers) to the kernel.
    PrepIoCmds = UBLK_U_IO_PREP_IO_CMDS
}
batch_buf_command! {
    /// `UBLK_U_IO_COMMIT_IO_CMDS`: complete requests in bulk; the result is
    /// how many bytes of elements the kernel took (the rest is not committed).
    CommitIoCmds = UBLK_U_IO_COMMIT_IO_CMDS
}

/// `UBLK_U_IO_FETCH_IO_CMDS`: a multishot command that fills buffers from
/// provided-buffer group `buf_group` with the `u16` tags of new requests.
#[derive(Debug, Clone, Copy)]
#[must_use = "a builder does nothing until built and submitted"]
pub struct FetchIoCmds {
    fd: FileRef,
    hdr: ublk_sys::ublk_batch_io,
    buf_group: u16,
}

impl FetchIoCmds {
    /// The ioctl-encoded opcode.
    pub const CODE: u32 = ublk_sys::UBLK_U_IO_FETCH_IO_CMDS;

    /// Fetches for queue `q_id` into buffers of group `buf_group`.
    #[inline]
    pub fn new(fd: impl Into<FileRef>, q_id: u16, buf_group: u16) -> Self {
        let hdr = ublk_sys::ublk_batch_io {
            q_id,
            elem_bytes: size_of::<u16>() as u8,
            ..Default::default()
        };
        Self {
            fd: fd.into(),
            hdr,
            buf_group,
        }
    }

    /// The 64-byte SQE: multishot, with buffer select from the group.
    #[inline]
    pub fn build(self) -> Entry {
        let e = batch_entry(self.fd, Self::CODE, &self.hdr, 0, 0)
            .flags(io_uring::squeue::Flags::BUFFER_SELECT);
        crate::pod::patch_sqe(e, |b| {
            b[SQE_URING_CMD_FLAGS..SQE_URING_CMD_FLAGS + 4]
                .copy_from_slice(&IORING_URING_CMD_MULTISHOT.to_ne_bytes());
            b[SQE_BUF_GROUP..SQE_BUF_GROUP + 2].copy_from_slice(&self.buf_group.to_ne_bytes());
        })
    }
}
