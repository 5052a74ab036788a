//! Byte views of the plain-old-data UAPI structs.
//!
//! The ublk UAPI structs are `repr(C)`, made only of integers, and generated
//! with explicit padding fields, so every byte pattern is a valid value and
//! every byte of a value is initialised. That is what makes the two views
//! below sound; this module is the only place that relies on it.
#![allow(unsafe_code)]

use ublk_sys::{
    ublk_auto_buf_reg, ublk_batch_io, ublk_elem_header, ublk_params, ublk_shmem_buf_reg,
    ublksrv_ctrl_cmd, ublksrv_ctrl_dev_info, ublksrv_io_cmd, ublksrv_io_desc,
};

/// A `repr(C)` struct of integers without implicit padding.
///
/// # Safety
/// Implementors must have no implicit padding, no pointers, no references and
/// no invariants: any byte pattern of `size_of::<Self>()` bytes is a valid value.
pub(crate) unsafe trait Pod: Copy + Default + 'static {
    /// The bytes of `self`.
    #[inline]
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: Pod guarantees every byte of `Self` is initialised (no
        // implicit padding); the slice covers exactly `self` and borrows it.
        unsafe {
            core::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>())
        }
    }

    /// The bytes of `self`, writable.
    #[inline]
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: Pod guarantees any byte pattern is a valid `Self`, so writes
        // through the slice cannot create an invalid value; the slice covers
        // exactly `self` and borrows it mutably.
        unsafe {
            core::slice::from_raw_parts_mut((self as *mut Self).cast::<u8>(), size_of::<Self>())
        }
    }
}

// SAFETY: all of these are bindgen-generated repr(C) structs of integer
// fields (and unions of integers) with `explicit_padding`; ublk-sys asserts
// their sizes and offsets against the kernel's.
unsafe impl Pod for ublksrv_ctrl_cmd {}
// SAFETY: see above.
unsafe impl Pod for ublksrv_ctrl_dev_info {}
// SAFETY: see above.
unsafe impl Pod for ublksrv_io_desc {}
// SAFETY: see above.
unsafe impl Pod for ublksrv_io_cmd {}
// SAFETY: see above.
unsafe impl Pod for ublk_params {}
// SAFETY: see above.
unsafe impl Pod for ublk_batch_io {}
// SAFETY: see above.
unsafe impl Pod for ublk_elem_header {}
// SAFETY: see above.
unsafe impl Pod for ublk_shmem_buf_reg {}
// SAFETY: see above.
unsafe impl Pod for ublk_auto_buf_reg {}
// SAFETY: u64 is plain old data.
unsafe impl Pod for u64 {}

/// Reads the `u32` a two-member `u32` union holds.
#[inline]
pub(crate) fn union_u32(u: &ublk_sys::ublksrv_io_desc__bindgen_ty_1) -> u32 {
    // SAFETY: both members of this union are `u32` at offset 0, so either
    // read is of an initialised `u32`.
    unsafe { u.nr_sectors }
}

/// An SQE's 64 bytes, as the kernel reads `struct io_uring_sqe`.
pub(crate) type SqeBytes = [u8; 64];

static_assertions::assert_eq_size!(io_uring::squeue::Entry, SqeBytes);

/// Rewrites fields of `entry` that `io_uring::opcode` cannot set (a
/// uring_cmd's `len`, `uring_cmd_flags` and `buf_group`).
#[inline]
pub(crate) fn patch_sqe(
    entry: io_uring::squeue::Entry,
    f: impl FnOnce(&mut SqeBytes),
) -> io_uring::squeue::Entry {
    // SAFETY: `Entry` is a `repr(C)` wrapper of `struct io_uring_sqe`, 64
    // bytes (asserted above) of integers and unions of integers: every byte
    // is initialised and every byte pattern is a valid value.
    let mut bytes: SqeBytes = unsafe { core::mem::transmute(entry) };
    f(&mut bytes);
    // SAFETY: as above, any 64 bytes are a valid `Entry`.
    unsafe { core::mem::transmute::<SqeBytes, io_uring::squeue::Entry>(bytes) }
}
