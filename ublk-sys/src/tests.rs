//! Unit tests. The literal numbers were printed by a C program compiled with
//! gcc on x86_64 against `include/ublk_cmd.h` (plus `<linux/ioctl.h>` and
//! `<errno.h>`), not computed from the Rust side.

use crate::*;

/// `pin!{ NAME: type = value; ... }` checks both the Rust type (at compile
/// time) and the value of each constant.
macro_rules! pin {
    ($($name:ident: $ty:ty = $value:expr;)*) => {
        $(
            let v: $ty = $name;
            assert_eq!(v, $value, stringify!($name));
        )*
    };
}

/// The ioctl-encoded opcodes. Their value depends on the architecture's
/// `_IOC` layout; these are the asm-generic ones (x86_64, aarch64, ...).
#[test]
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
fn ioctl_encoded_opcodes() {
    pin! {
        UBLK_U_CMD_GET_QUEUE_AFFINITY: u32 = 0x80207501;
        UBLK_U_CMD_GET_DEV_INFO: u32 = 0x80207502;
        UBLK_U_CMD_ADD_DEV: u32 = 0xc0207504;
        UBLK_U_CMD_DEL_DEV: u32 = 0xc0207505;
        UBLK_U_CMD_START_DEV: u32 = 0xc0207506;
        UBLK_U_CMD_STOP_DEV: u32 = 0xc0207507;
        UBLK_U_CMD_SET_PARAMS: u32 = 0xc0207508;
        UBLK_U_CMD_GET_PARAMS: u32 = 0x80207509;
        UBLK_U_CMD_START_USER_RECOVERY: u32 = 0xc0207510;
        UBLK_U_CMD_END_USER_RECOVERY: u32 = 0xc0207511;
        UBLK_U_CMD_GET_DEV_INFO2: u32 = 0x80207512;
        UBLK_U_CMD_GET_FEATURES: u32 = 0x80207513;
        UBLK_U_CMD_DEL_DEV_ASYNC: u32 = 0x80207514;
        UBLK_U_CMD_UPDATE_SIZE: u32 = 0xc0207515;
        UBLK_U_CMD_QUIESCE_DEV: u32 = 0xc0207516;
        UBLK_U_CMD_TRY_STOP_DEV: u32 = 0xc0207517;
        UBLK_U_CMD_REG_BUF: u32 = 0xc0207518;
        UBLK_U_CMD_UNREG_BUF: u32 = 0xc0207519;
        UBLK_U_IO_FETCH_REQ: u32 = 0xc0107520;
        UBLK_U_IO_COMMIT_AND_FETCH_REQ: u32 = 0xc0107521;
        UBLK_U_IO_NEED_GET_DATA: u32 = 0xc0107522;
        UBLK_U_IO_REGISTER_IO_BUF: u32 = 0xc0107523;
        UBLK_U_IO_UNREGISTER_IO_BUF: u32 = 0xc0107524;
        UBLK_U_IO_PREP_IO_CMDS: u32 = 0xc0107525;
        UBLK_U_IO_COMMIT_IO_CMDS: u32 = 0xc0107526;
        UBLK_U_IO_FETCH_IO_CMDS: u32 = 0xc0107527;
    }
}

/// Every integer macro of the header (legacy command numbers included).
#[test]
fn integer_macros() {
    pin! {
        UBLK_CMD_GET_QUEUE_AFFINITY: u32 = 0x1;
        UBLK_CMD_GET_DEV_INFO: u32 = 0x2;
        UBLK_CMD_ADD_DEV: u32 = 0x4;
        UBLK_CMD_DEL_DEV: u32 = 0x5;
        UBLK_CMD_START_DEV: u32 = 0x6;
        UBLK_CMD_STOP_DEV: u32 = 0x7;
        UBLK_CMD_SET_PARAMS: u32 = 0x8;
        UBLK_CMD_GET_PARAMS: u32 = 0x9;
        UBLK_CMD_START_USER_RECOVERY: u32 = 0x10;
        UBLK_CMD_END_USER_RECOVERY: u32 = 0x11;
        UBLK_CMD_GET_DEV_INFO2: u32 = 0x12;
        UBLK_SHMEM_BUF_READ_ONLY: u32 = 0x1;
        UBLK_FEATURES_LEN: u32 = 0x8;
        UBLK_IO_FETCH_REQ: u32 = 0x20;
        UBLK_IO_COMMIT_AND_FETCH_REQ: u32 = 0x21;
        UBLK_IO_NEED_GET_DATA: u32 = 0x22;
        UBLK_IO_RES_OK: u32 = 0x0;
        UBLK_IO_RES_NEED_GET_DATA: u32 = 0x1;
        UBLK_IO_RES_ABORT: i32 = -19;
        UBLKSRV_CMD_BUF_OFFSET: u32 = 0x0;
        UBLKSRV_IO_BUF_OFFSET: u32 = 0x80000000;
        UBLK_MAX_QUEUE_DEPTH: u32 = 0x1000;
        UBLK_IO_BUF_OFF: u32 = 0x0;
        UBLK_IO_BUF_BITS: u32 = 0x19;
        UBLK_IO_BUF_BITS_MASK: u32 = 0x1ffffff;
        UBLK_TAG_OFF: u32 = 0x19;
        UBLK_TAG_BITS: u32 = 0x10;
        UBLK_TAG_BITS_MASK: u32 = 0xffff;
        UBLK_QID_OFF: u32 = 0x29;
        UBLK_QID_BITS: u32 = 0xc;
        UBLK_QID_BITS_MASK: u32 = 0xfff;
        UBLK_MAX_NR_QUEUES: u32 = 0x1000;
        UBLKSRV_IO_BUF_TOTAL_BITS: u32 = 0x35;
        UBLKSRV_IO_BUF_TOTAL_SIZE: u64 = 0x20000000000000;
        UBLK_INTEGRITY_FLAG_OFF: u32 = 0x3e;
        UBLKSRV_IO_INTEGRITY_FLAG: u64 = 0x4000000000000000;
        UBLK_F_SUPPORT_ZERO_COPY: u64 = 0x1;
        UBLK_F_URING_CMD_COMP_IN_TASK: u64 = 0x2;
        UBLK_F_NEED_GET_DATA: u64 = 0x4;
        UBLK_F_USER_RECOVERY: u64 = 0x8;
        UBLK_F_USER_RECOVERY_REISSUE: u64 = 0x10;
        UBLK_F_UNPRIVILEGED_DEV: u64 = 0x20;
        UBLK_F_CMD_IOCTL_ENCODE: u64 = 0x40;
        UBLK_F_USER_COPY: u64 = 0x80;
        UBLK_F_ZONED: u64 = 0x100;
        UBLK_F_USER_RECOVERY_FAIL_IO: u64 = 0x200;
        UBLK_F_UPDATE_SIZE: u64 = 0x400;
        UBLK_F_AUTO_BUF_REG: u64 = 0x800;
        UBLK_F_QUIESCE: u64 = 0x1000;
        UBLK_F_PER_IO_DAEMON: u64 = 0x2000;
        UBLK_F_BUF_REG_OFF_DAEMON: u64 = 0x4000;
        UBLK_F_BATCH_IO: u64 = 0x8000;
        UBLK_F_INTEGRITY: u64 = 0x10000;
        UBLK_F_SAFE_STOP_DEV: u64 = 0x20000;
        UBLK_F_NO_AUTO_PART_SCAN: u64 = 0x40000;
        UBLK_F_SHMEM_ZC: u64 = 0x80000;
        UBLK_S_DEV_DEAD: u32 = 0x0;
        UBLK_S_DEV_LIVE: u32 = 0x1;
        UBLK_S_DEV_QUIESCED: u32 = 0x2;
        UBLK_S_DEV_FAIL_IO: u32 = 0x3;
        UBLK_IO_OP_READ: u32 = 0x0;
        UBLK_IO_OP_WRITE: u32 = 0x1;
        UBLK_IO_OP_FLUSH: u32 = 0x2;
        UBLK_IO_OP_DISCARD: u32 = 0x3;
        UBLK_IO_OP_WRITE_SAME: u32 = 0x4;
        UBLK_IO_OP_WRITE_ZEROES: u32 = 0x5;
        UBLK_IO_OP_ZONE_OPEN: u32 = 0xa;
        UBLK_IO_OP_ZONE_CLOSE: u32 = 0xb;
        UBLK_IO_OP_ZONE_FINISH: u32 = 0xc;
        UBLK_IO_OP_ZONE_APPEND: u32 = 0xd;
        UBLK_IO_OP_ZONE_RESET_ALL: u32 = 0xe;
        UBLK_IO_OP_ZONE_RESET: u32 = 0xf;
        UBLK_IO_OP_REPORT_ZONES: u32 = 0x12;
        UBLK_IO_F_FAILFAST_DEV: u32 = 0x100;
        UBLK_IO_F_FAILFAST_TRANSPORT: u32 = 0x200;
        UBLK_IO_F_FAILFAST_DRIVER: u32 = 0x400;
        UBLK_IO_F_META: u32 = 0x800;
        UBLK_IO_F_FUA: u32 = 0x2000;
        UBLK_IO_F_NOUNMAP: u32 = 0x8000;
        UBLK_IO_F_SWAP: u32 = 0x10000;
        UBLK_IO_F_NEED_REG_BUF: u32 = 0x20000;
        UBLK_IO_F_INTEGRITY: u32 = 0x40000;
        UBLK_IO_F_SHMEM_ZC: u32 = 0x80000;
        UBLK_AUTO_BUF_REG_FALLBACK: u32 = 0x1;
        UBLK_AUTO_BUF_REG_F_MASK: u32 = 0x1;
        UBLK_BATCH_F_HAS_ZONE_LBA: u32 = 0x1;
        UBLK_BATCH_F_HAS_BUF_ADDR: u32 = 0x2;
        UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK: u32 = 0x4;
        UBLK_ATTR_READ_ONLY: u32 = 0x1;
        UBLK_ATTR_ROTATIONAL: u32 = 0x2;
        UBLK_ATTR_VOLATILE_CACHE: u32 = 0x4;
        UBLK_ATTR_FUA: u32 = 0x8;
        UBLK_MIN_SEGMENT_SIZE: u32 = 0x1000;
        UBLK_PARAM_TYPE_BASIC: u32 = 0x1;
        UBLK_PARAM_TYPE_DISCARD: u32 = 0x2;
        UBLK_PARAM_TYPE_DEVT: u32 = 0x4;
        UBLK_PARAM_TYPE_ZONED: u32 = 0x8;
        UBLK_PARAM_TYPE_DMA_ALIGN: u32 = 0x10;
        UBLK_PARAM_TYPE_SEGMENT: u32 = 0x20;
        UBLK_PARAM_TYPE_INTEGRITY: u32 = 0x40;
        UBLK_SHMEM_ZC_OFF_MASK: u32 = 0xffffffff;
        UBLK_SHMEM_ZC_IDX_OFF: u32 = 0x20;
        UBLK_SHMEM_ZC_IDX_MASK: u32 = 0xffff;
    }
}

#[test]
fn io_res_abort_is_minus_enodev() {
    assert_eq!(UBLK_IO_RES_ABORT, -libc::ENODEV);
}

#[test]
fn kernel_version() {
    assert_eq!(UBLK_CMD_H_KERNEL_VERSION, "7.2.13");
}

/// `ublk_auto_buf_reg_to_sqe_addr()` of the header, done with the bit layout
/// its comment documents: bits 0-15 index, 16-23 flags, 24-31 reserved0,
/// 32-63 reserved1.
fn auto_buf_reg_to_sqe_addr(reg: &ublk_auto_buf_reg) -> u64 {
    u64::from(reg.index)
        | u64::from(reg.flags) << 16
        | u64::from(reg.reserved0) << 24
        | u64::from(reg.reserved1) << 32
}

#[test]
fn auto_buf_reg_sqe_addr_layout() {
    let reg = ublk_auto_buf_reg {
        index: 0x1234,
        flags: UBLK_AUTO_BUF_REG_FALLBACK as u8,
        reserved0: 0,
        reserved1: 0,
    };
    assert_eq!(auto_buf_reg_to_sqe_addr(&reg), 0x11234);

    let reg = ublk_auto_buf_reg {
        index: 0xbeef,
        flags: 0xa5,
        reserved0: 0x5a,
        reserved1: 0xdead_c0de,
    };
    assert_eq!(auto_buf_reg_to_sqe_addr(&reg), 0xdead_c0de_5aa5_beef);

    // On little-endian targets the sqe->addr value is exactly the struct's
    // bytes: the field order of the Rust struct matches the bit layout.
    if cfg!(target_endian = "little") {
        let mut bytes = [0u8; 8];
        bytes[0..2].copy_from_slice(&reg.index.to_ne_bytes());
        bytes[2] = reg.flags;
        bytes[3] = reg.reserved0;
        bytes[4..8].copy_from_slice(&reg.reserved1.to_ne_bytes());
        assert_eq!(u64::from_ne_bytes(bytes), 0xdead_c0de_5aa5_beef);
    }
}

#[test]
fn union_defaults_are_zero() {
    let desc = ublksrv_io_desc::default();
    assert_eq!(desc.op_flags, 0);
    assert_eq!(desc.start_sector, 0);
    assert_eq!(desc.addr, 0);
    let cmd = ublksrv_io_cmd::default();
    assert_eq!((cmd.q_id, cmd.tag, cmd.result), (0, 0, 0));
    // The unions themselves cannot be read without `unsafe` (denied here);
    // their `Default` impls in lib.rs are plain zero literals.
    let _ = (desc.__bindgen_anon_1, cmd.__bindgen_anon_1);
}

/// The committed `src/bindings.rs` must be what bindgen produces now from
/// `include/ublk_cmd.h`.
#[test]
#[cfg(feature = "bindgen")]
fn committed_bindings_are_fresh() {
    let generated = include_str!(concat!(env!("OUT_DIR"), "/bindings.rs"));
    let committed = include_str!("bindings.rs");
    if generated != committed {
        let (line, (g, c)) = generated
            .lines()
            .chain(core::iter::repeat("<end of file>"))
            .zip(committed.lines().chain(core::iter::repeat("<end of file>")))
            .enumerate()
            .find(|(_, (g, c))| g != c)
            .unwrap_or((0, ("<same lines>", "<same lines>")));
        panic!(
            "ublk-sys/src/bindings.rs is stale (first difference at line {}:\n  \
             bindgen:   {}\n  committed: {}).\n\
             Refresh it with: UBLK_SYS_UPDATE_BINDINGS=1 cargo build -p ublk-rs-sys --features bindgen",
            line + 1,
            g,
            c
        );
    }
}
