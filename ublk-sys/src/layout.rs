//! Compile-time layout checks of the UAPI structs.
//!
//! Every number below was printed by a C program compiled with gcc on
//! x86_64 (`sizeof`, `_Alignof`, `offsetof` on `include/ublk_cmd.h`), not
//! derived from the Rust definitions. The alignment checks make a target on
//! which `__u64` is only 4-aligned inside structs (i686) fail to build,
//! rather than silently use the x86_64 padding of the committed bindings.

use core::mem::{align_of, offset_of, size_of};

use static_assertions::const_assert_eq;

use crate::*;

/// Size of the field that `project` borrows; `project` is never called.
const fn field_size<T, F>(_project: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// `check!(T, size, align, { field: offset, field_size; ... })` checks the
/// size and alignment of `T` and the offset and size of each listed field.
macro_rules! check {
    ($ty:ty, $size:literal, $align:literal, { $($field:ident: $off:literal, $fsize:literal;)* }) => {
        const_assert_eq!(size_of::<$ty>(), $size);
        const_assert_eq!(align_of::<$ty>(), $align);
        $(
            const_assert_eq!(offset_of!($ty, $field), $off);
            const_assert_eq!(field_size(|s: &$ty| &s.$field), $fsize);
        )*
    };
}

check!(ublksrv_ctrl_cmd, 32, 8, {
    dev_id: 0, 4;
    queue_id: 4, 2;
    len: 6, 2;
    addr: 8, 8;
    data: 16, 8;
    dev_path_len: 24, 2;
    pad: 26, 2;
    reserved: 28, 4;
});

check!(ublksrv_ctrl_dev_info, 64, 8, {
    nr_hw_queues: 0, 2;
    queue_depth: 2, 2;
    state: 4, 2;
    pad0: 6, 2;
    max_io_buf_bytes: 8, 4;
    dev_id: 12, 4;
    ublksrv_pid: 16, 4;
    pad1: 20, 4;
    flags: 24, 8;
    ublksrv_flags: 32, 8;
    owner_uid: 40, 4;
    owner_gid: 44, 4;
    reserved1: 48, 8;
    reserved2: 56, 8;
});

check!(ublksrv_io_desc, 24, 8, {
    op_flags: 0, 4;
    start_sector: 8, 8;
    addr: 16, 8;
});
// The anonymous union of `struct ublksrv_io_desc`.
check!(ublksrv_io_desc__bindgen_ty_1, 4, 4, {});
const_assert_eq!(offset_of!(ublksrv_io_desc, __bindgen_anon_1.nr_sectors), 4);
const_assert_eq!(offset_of!(ublksrv_io_desc__bindgen_ty_1, nr_sectors), 0);
const_assert_eq!(offset_of!(ublksrv_io_desc, __bindgen_anon_1.nr_zones), 4);
const_assert_eq!(offset_of!(ublksrv_io_desc__bindgen_ty_1, nr_zones), 0);

check!(ublksrv_io_cmd, 16, 8, {
    q_id: 0, 2;
    tag: 2, 2;
    result: 4, 4;
});
// The anonymous union of `struct ublksrv_io_cmd`.
check!(ublksrv_io_cmd__bindgen_ty_1, 8, 8, {});
const_assert_eq!(offset_of!(ublksrv_io_cmd, __bindgen_anon_1.addr), 8);
const_assert_eq!(offset_of!(ublksrv_io_cmd__bindgen_ty_1, addr), 0);
const_assert_eq!(
    offset_of!(ublksrv_io_cmd, __bindgen_anon_1.zone_append_lba),
    8
);
const_assert_eq!(offset_of!(ublksrv_io_cmd__bindgen_ty_1, zone_append_lba), 0);

check!(ublk_param_basic, 32, 8, {
    attrs: 0, 4;
    logical_bs_shift: 4, 1;
    physical_bs_shift: 5, 1;
    io_opt_shift: 6, 1;
    io_min_shift: 7, 1;
    max_sectors: 8, 4;
    chunk_sectors: 12, 4;
    dev_sectors: 16, 8;
    virt_boundary_mask: 24, 8;
});

check!(ublk_param_discard, 20, 4, {
    discard_alignment: 0, 4;
    discard_granularity: 4, 4;
    max_discard_sectors: 8, 4;
    max_write_zeroes_sectors: 12, 4;
    max_discard_segments: 16, 2;
    reserved0: 18, 2;
});

check!(ublk_param_devt, 16, 4, {
    char_major: 0, 4;
    char_minor: 4, 4;
    disk_major: 8, 4;
    disk_minor: 12, 4;
});

check!(ublk_param_zoned, 32, 4, {
    max_open_zones: 0, 4;
    max_active_zones: 4, 4;
    max_zone_append_sectors: 8, 4;
    reserved: 12, 20;
});

check!(ublk_param_dma_align, 8, 4, {
    alignment: 0, 4;
    pad: 4, 4;
});

check!(ublk_param_segment, 16, 8, {
    seg_boundary_mask: 0, 8;
    max_segment_size: 8, 4;
    max_segments: 12, 2;
    pad: 14, 2;
});

check!(ublk_param_integrity, 16, 4, {
    flags: 0, 4;
    max_integrity_segments: 4, 2;
    interval_exp: 6, 1;
    metadata_size: 7, 1;
    pi_offset: 8, 1;
    csum_type: 9, 1;
    tag_size: 10, 1;
    pad: 11, 5;
});

check!(ublk_params, 152, 8, {
    len: 0, 4;
    types: 4, 4;
    basic: 8, 32;
    discard: 40, 20;
    devt: 60, 16;
    zoned: 76, 32;
    dma: 108, 8;
    seg: 120, 16;
    integrity: 136, 16;
});

check!(ublk_batch_io, 16, 8, {
    q_id: 0, 2;
    flags: 2, 2;
    nr_elem: 4, 2;
    elem_bytes: 6, 1;
    reserved: 7, 1;
    reserved2: 8, 8;
});

check!(ublk_elem_header, 8, 4, {
    tag: 0, 2;
    buf_index: 2, 2;
    result: 4, 4;
});

check!(ublk_shmem_buf_reg, 24, 8, {
    addr: 0, 8;
    len: 8, 8;
    flags: 16, 4;
    reserved: 20, 4;
});

check!(ublk_auto_buf_reg, 8, 4, {
    index: 0, 2;
    flags: 2, 1;
    reserved0: 3, 1;
    reserved1: 4, 4;
});
