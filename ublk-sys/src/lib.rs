//! Raw bindings to the Linux ublk UAPI, `include/uapi/linux/ublk_cmd.h`.
//!
//! Every item keeps its kernel name. Nothing here is safe-wrapped: see the
//! `ublk` crate for that.
//!
//! # Source of the bindings
//!
//! `include/ublk_cmd.h` in this crate is the unedited
//! `include/uapi/linux/ublk_cmd.h` of Linux [`UBLK_CMD_H_KERNEL_VERSION`]
//! (the version is recorded in `include/KERNEL_VERSION`).
//!
//! The structs and integer macros come from bindgen. By default the committed
//! output, `src/bindings.rs`, is used; with the `bindgen` feature the build
//! script regenerates it from the header (this needs libclang and the
//! kernel's `<linux/types.h>`, e.g. Debian's `libclang-dev` and
//! `linux-libc-dev`), and a test checks that the committed copy is still
//! identical. To refresh the committed copy:
//!
//! ```text
//! UBLK_SYS_UPDATE_BINDINGS=1 cargo build -p ublk-rs-sys --features bindgen
//! ```
//!
//! Integer macros are `u32`, except the `UBLK_F_*` feature bits (and values
//! that do not fit `u32`), which are `u64`.
//!
//! # Hand-written items
//!
//! What bindgen cannot expand is defined in this file, by hand:
//!
//! * the ioctl-encoded command opcodes `UBLK_U_CMD_*` and `UBLK_U_IO_*`
//!   (`_IOR`/`_IOWR` in C), as `u32`, which is what goes into the
//!   `cmd_op` of an `IORING_OP_URING_CMD` submission;
//! * [`UBLK_IO_RES_ABORT`] (`-ENODEV` in C).
//!
//! The `static inline` helpers of the header (`ublksrv_get_op`,
//! `ublk_auto_buf_reg_to_sqe_addr`, ...) are not bound.
//!
//! # Layout
//!
//! The sizes, alignments and field offsets of all structs are checked at
//! compile time against the values a C compiler gives for the header on
//! x86_64. Anonymous unions keep bindgen's generated names:
//! `ublksrv_io_desc::__bindgen_anon_1` is a [`ublksrv_io_desc__bindgen_ty_1`]
//! (`nr_sectors` / `nr_zones`) and `ublksrv_io_cmd::__bindgen_anon_1` is a
//! [`ublksrv_io_cmd__bindgen_ty_1`] (`addr` / `zone_append_lba`).

#![no_std]
#![deny(missing_docs)]
#![deny(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[allow(
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    clippy::all
)]
mod bindings {
    #[cfg(feature = "bindgen")]
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
    #[cfg(not(feature = "bindgen"))]
    include!("bindings.rs");
}

pub use bindings::*;

mod layout;

/// Linux version whose `include/uapi/linux/ublk_cmd.h` is vendored as
/// `include/ublk_cmd.h` (the content of `include/KERNEL_VERSION`).
pub const UBLK_CMD_H_KERNEL_VERSION: &str =
    include_str!("../include/KERNEL_VERSION").trim_ascii_end();

/// `UBLK_IO_RES_ABORT`, `(-ENODEV)` in C: the result of an I/O command whose
/// queue is being torn down; only this result means "do not fetch again".
///
/// `ENODEV` is 19 on every Linux architecture (bindgen cannot expand it, as
/// the header does not include `<errno.h>`).
pub const UBLK_IO_RES_ABORT: i32 = -19;

// ---------------------------------------------------------------------------
// Default for the types holding anonymous unions. bindgen would implement it
// by zeroing with `unsafe`; these are the same all-zero values, built safely.

impl Default for ublksrv_io_desc__bindgen_ty_1 {
    fn default() -> Self {
        Self { nr_sectors: 0 }
    }
}

// Not derivable here: the struct is defined in the generated bindings.
#[allow(clippy::derivable_impls)]
impl Default for ublksrv_io_desc {
    fn default() -> Self {
        Self {
            op_flags: 0,
            __bindgen_anon_1: Default::default(),
            start_sector: 0,
            addr: 0,
        }
    }
}

impl Default for ublksrv_io_cmd__bindgen_ty_1 {
    fn default() -> Self {
        Self { addr: 0 }
    }
}

// Not derivable here: the struct is defined in the generated bindings.
#[allow(clippy::derivable_impls)]
impl Default for ublksrv_io_cmd {
    fn default() -> Self {
        Self {
            q_id: 0,
            tag: 0,
            result: 0,
            __bindgen_anon_1: Default::default(),
        }
    }
}

// ---------------------------------------------------------------------------
// ioctl encoding, as include/uapi/asm-generic/ioctl.h and its per-arch
// overrides (arch/{mips,powerpc,sparc}/include/uapi/asm/ioctl.h).

#[cfg(any(
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
mod ioc_arch {
    pub(crate) const IOC_SIZEBITS: u32 = 13;
    pub(crate) const IOC_WRITE: u32 = 4;
    pub(crate) const IOC_READ: u32 = 2;
}

#[cfg(not(any(
    target_arch = "mips",
    target_arch = "mips32r6",
    target_arch = "mips64",
    target_arch = "mips64r6",
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
mod ioc_arch {
    pub(crate) const IOC_SIZEBITS: u32 = 14;
    pub(crate) const IOC_WRITE: u32 = 1;
    pub(crate) const IOC_READ: u32 = 2;
}

use ioc_arch::{IOC_READ, IOC_SIZEBITS, IOC_WRITE};

const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = 8;
const IOC_SIZESHIFT: u32 = 16;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;

/// `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u32, ty: u8, nr: u32, size: usize) -> u32 {
    assert!(nr <= 0xff, "ioctl nr does not fit _IOC_NRBITS");
    assert!(
        size < (1 << IOC_SIZEBITS),
        "ioctl size does not fit _IOC_SIZEBITS"
    );
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

/// `_IOR(type, nr, T)`.
const fn ior<T>(ty: u8, nr: u32) -> u32 {
    ioc(IOC_READ, ty, nr, core::mem::size_of::<T>())
}

/// `_IOWR(type, nr, T)`.
const fn iowr<T>(ty: u8, nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, core::mem::size_of::<T>())
}

// ---------------------------------------------------------------------------
// Control commands (sent to /dev/ublk-control), ioctl-encoded.

/// `UBLK_U_CMD_GET_QUEUE_AFFINITY`: `_IOR('u', UBLK_CMD_GET_QUEUE_AFFINITY, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_GET_QUEUE_AFFINITY: u32 =
    ior::<ublksrv_ctrl_cmd>(b'u', UBLK_CMD_GET_QUEUE_AFFINITY);
/// `UBLK_U_CMD_GET_DEV_INFO`: `_IOR('u', UBLK_CMD_GET_DEV_INFO, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_GET_DEV_INFO: u32 = ior::<ublksrv_ctrl_cmd>(b'u', UBLK_CMD_GET_DEV_INFO);
/// `UBLK_U_CMD_ADD_DEV`: `_IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_ADD_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(b'u', UBLK_CMD_ADD_DEV);
/// `UBLK_U_CMD_DEL_DEV`: `_IOWR('u', UBLK_CMD_DEL_DEV, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_DEL_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(b'u', UBLK_CMD_DEL_DEV);
/// `UBLK_U_CMD_START_DEV`: `_IOWR('u', UBLK_CMD_START_DEV, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_START_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(b'u', UBLK_CMD_START_DEV);
/// `UBLK_U_CMD_STOP_DEV`: `_IOWR('u', UBLK_CMD_STOP_DEV, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_STOP_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(b'u', UBLK_CMD_STOP_DEV);
/// `UBLK_U_CMD_SET_PARAMS`: `_IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_SET_PARAMS: u32 = iowr::<ublksrv_ctrl_cmd>(b'u', UBLK_CMD_SET_PARAMS);
/// `UBLK_U_CMD_GET_PARAMS`: `_IOR('u', UBLK_CMD_GET_PARAMS, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_GET_PARAMS: u32 = ior::<ublksrv_ctrl_cmd>(b'u', UBLK_CMD_GET_PARAMS);
/// `UBLK_U_CMD_START_USER_RECOVERY`: `_IOWR('u', UBLK_CMD_START_USER_RECOVERY, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_START_USER_RECOVERY: u32 =
    iowr::<ublksrv_ctrl_cmd>(b'u', UBLK_CMD_START_USER_RECOVERY);
/// `UBLK_U_CMD_END_USER_RECOVERY`: `_IOWR('u', UBLK_CMD_END_USER_RECOVERY, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_END_USER_RECOVERY: u32 =
    iowr::<ublksrv_ctrl_cmd>(b'u', UBLK_CMD_END_USER_RECOVERY);
/// `UBLK_U_CMD_GET_DEV_INFO2`: `_IOR('u', UBLK_CMD_GET_DEV_INFO2, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_GET_DEV_INFO2: u32 = ior::<ublksrv_ctrl_cmd>(b'u', UBLK_CMD_GET_DEV_INFO2);
/// `UBLK_U_CMD_GET_FEATURES`: `_IOR('u', 0x13, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_GET_FEATURES: u32 = ior::<ublksrv_ctrl_cmd>(b'u', 0x13);
/// `UBLK_U_CMD_DEL_DEV_ASYNC`: `_IOR('u', 0x14, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_DEL_DEV_ASYNC: u32 = ior::<ublksrv_ctrl_cmd>(b'u', 0x14);
/// `UBLK_U_CMD_UPDATE_SIZE`: `_IOWR('u', 0x15, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_UPDATE_SIZE: u32 = iowr::<ublksrv_ctrl_cmd>(b'u', 0x15);
/// `UBLK_U_CMD_QUIESCE_DEV`: `_IOWR('u', 0x16, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_QUIESCE_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(b'u', 0x16);
/// `UBLK_U_CMD_TRY_STOP_DEV`: `_IOWR('u', 0x17, struct ublksrv_ctrl_cmd)`.
pub const UBLK_U_CMD_TRY_STOP_DEV: u32 = iowr::<ublksrv_ctrl_cmd>(b'u', 0x17);
/// `UBLK_U_CMD_REG_BUF`: `_IOWR('u', 0x18, struct ublksrv_ctrl_cmd)`.
///
/// `ctrl_cmd.addr` points to a [`ublk_shmem_buf_reg`], `ctrl_cmd.len` is its
/// size; a non-negative result is the assigned buffer index.
pub const UBLK_U_CMD_REG_BUF: u32 = iowr::<ublksrv_ctrl_cmd>(b'u', 0x18);
/// `UBLK_U_CMD_UNREG_BUF`: `_IOWR('u', 0x19, struct ublksrv_ctrl_cmd)`.
///
/// `ctrl_cmd.data[0]` is the buffer index.
pub const UBLK_U_CMD_UNREG_BUF: u32 = iowr::<ublksrv_ctrl_cmd>(b'u', 0x19);

// ---------------------------------------------------------------------------
// I/O commands (sent to /dev/ublkcN), ioctl-encoded.

/// `UBLK_U_IO_FETCH_REQ`: `_IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd)`.
pub const UBLK_U_IO_FETCH_REQ: u32 = iowr::<ublksrv_io_cmd>(b'u', UBLK_IO_FETCH_REQ);
/// `UBLK_U_IO_COMMIT_AND_FETCH_REQ`: `_IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd)`.
pub const UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 =
    iowr::<ublksrv_io_cmd>(b'u', UBLK_IO_COMMIT_AND_FETCH_REQ);
/// `UBLK_U_IO_NEED_GET_DATA`: `_IOWR('u', UBLK_IO_NEED_GET_DATA, struct ublksrv_io_cmd)`.
pub const UBLK_U_IO_NEED_GET_DATA: u32 = iowr::<ublksrv_io_cmd>(b'u', UBLK_IO_NEED_GET_DATA);
/// `UBLK_U_IO_REGISTER_IO_BUF`: `_IOWR('u', 0x23, struct ublksrv_io_cmd)`.
pub const UBLK_U_IO_REGISTER_IO_BUF: u32 = iowr::<ublksrv_io_cmd>(b'u', 0x23);
/// `UBLK_U_IO_UNREGISTER_IO_BUF`: `_IOWR('u', 0x24, struct ublksrv_io_cmd)`.
pub const UBLK_U_IO_UNREGISTER_IO_BUF: u32 = iowr::<ublksrv_io_cmd>(b'u', 0x24);
/// `UBLK_U_IO_PREP_IO_CMDS`: `_IOWR('u', 0x25, struct ublk_batch_io)`.
pub const UBLK_U_IO_PREP_IO_CMDS: u32 = iowr::<ublk_batch_io>(b'u', 0x25);
/// `UBLK_U_IO_COMMIT_IO_CMDS`: `_IOWR('u', 0x26, struct ublk_batch_io)`.
pub const UBLK_U_IO_COMMIT_IO_CMDS: u32 = iowr::<ublk_batch_io>(b'u', 0x26);
/// `UBLK_U_IO_FETCH_IO_CMDS`: `_IOWR('u', 0x27, struct ublk_batch_io)`.
///
/// Multishot: needs `IORING_URING_CMD_MULTISHOT`.
pub const UBLK_U_IO_FETCH_IO_CMDS: u32 = iowr::<ublk_batch_io>(b'u', 0x27);

#[cfg(test)]
mod tests;
