//! The raw bytes of every SQE the `ublk::cmd` builders make, compared with
//! the layout the kernel reads (`struct io_uring_sqe` carrying a
//! `ublksrv_ctrl_cmd` or a `ublksrv_io_cmd` in its command area).
//!
//! The expected images are built here byte by byte from the UAPI offsets,
//! independently of the bindings' struct definitions, and compared whole, so
//! a stray byte anywhere in the SQE is caught too.

use ublk::cmd::{self, AutoBufReg, CtrlCommand, Encoding, FileRef};
use ublk::io_uring::squeue::{Entry, Entry128};

/// `IORING_OP_URING_CMD`.
const OP_URING_CMD: u8 = 46;
/// `IOSQE_FIXED_FILE`.
const IOSQE_FIXED_FILE: u8 = 1;
/// Offsets in `struct io_uring_sqe`.
const OFF_OPCODE: usize = 0;
const OFF_FLAGS: usize = 1;
const OFF_FD: usize = 4;
const OFF_CMD_OP: usize = 8;
const OFF_ADDR: usize = 16;
const OFF_USER_DATA: usize = 32;
const OFF_CMD: usize = 48;

/// The user data every test entry carries, to check its offset.
const USER_DATA: u64 = 0x1122_3344_5566_7788;

/// `_IOC(dir, 'u', nr, size)`.
const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
    dir << 30 | size << 16 | (b'u' as u32) << 8 | nr
}
const IOR: u32 = 2;
const IOWR: u32 = 3;
/// `sizeof(struct ublksrv_ctrl_cmd)` and `sizeof(struct ublksrv_io_cmd)`.
const CTRL_SIZE: u32 = 32;
const IO_SIZE: u32 = 16;

fn entry_bytes(e: &Entry) -> [u8; 64] {
    assert_eq!(size_of::<Entry>(), 64);
    // SAFETY: `Entry` is a `repr(C)` wrapper of `io_uring_sqe`, 64 bytes of
    // integers and unions of integers, all initialised (the builders start
    // from a zeroed SQE); the size was just checked to be 64.
    unsafe { std::mem::transmute_copy(e) }
}

fn entry128_bytes(e: &Entry128) -> [u8; 128] {
    assert_eq!(size_of::<Entry128>(), 128);
    // SAFETY: `Entry128` is a `repr(C)` pair of an `Entry` and `[u8; 64]`,
    // without padding, all bytes initialised; the size was just checked.
    unsafe { std::mem::transmute_copy(e) }
}

fn put(img: &mut [u8], off: usize, bytes: &[u8]) {
    img[off..off + bytes.len()].copy_from_slice(bytes);
}

/// The SQE header the kernel reads for a uring_cmd on `fd` with `cmd_op`.
fn sqe_header(img: &mut [u8], fd: FileRef, cmd_op: u32, sqe_addr: u64) {
    img[OFF_OPCODE] = OP_URING_CMD;
    let (flags, fd) = match fd {
        FileRef::Fd(fd) => (0, fd),
        FileRef::Fixed(i) => (IOSQE_FIXED_FILE, i as i32),
    };
    img[OFF_FLAGS] = flags;
    put(img, OFF_FD, &fd.to_ne_bytes());
    put(img, OFF_CMD_OP, &cmd_op.to_ne_bytes());
    put(img, OFF_ADDR, &sqe_addr.to_ne_bytes());
    // uring_cmd_flags (28) and buf_index (40) stay 0: no builder uses a
    // fixed buffer for the command itself.
    put(img, OFF_USER_DATA, &USER_DATA.to_ne_bytes());
}

/// Shows the first differing byte, with the SQE field it belongs to.
fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = (0..want.len()).find(|&i| got[i] != want[i]) {
        let field = match i {
            0 => "opcode",
            1 => "flags",
            2..=3 => "ioprio",
            4..=7 => "fd",
            8..=11 => "cmd_op",
            12..=15 => "__pad1",
            16..=23 => "addr",
            24..=27 => "len",
            28..=31 => "uring_cmd_flags",
            32..=39 => "user_data",
            40..=41 => "buf_index",
            42..=43 => "personality",
            44..=47 => "file_index",
            _ => "cmd area",
        };
        panic!(
            "{what}: byte {i} ({field}, cmd offset {}) is {:#04x}, the kernel expects {:#04x}\n got: {got:02x?}\nwant: {want:02x?}",
            i as isize - OFF_CMD as isize,
            got[i],
            want[i]
        );
    }
}

const FDS: [FileRef; 2] = [FileRef::Fd(5), FileRef::Fixed(3)];
const ENCODINGS: [Encoding; 2] = [Encoding::Ioctl, Encoding::Legacy];

// ---------------------------------------------------------------- control

/// A fake buffer address: builders only store it.
const BUF: u64 = 0x7f00_dead_b000;
/// The dev_path override: buffer, total length, path length.
const PATH_BUF: u64 = 0x7f00_0000_1000;
const PATH_LEN: u16 = 12; // "/dev/ublkc7\0"
const PATH_TOTAL: u16 = PATH_LEN + 80;

/// A dev_path override: buffer address, total length, path length.
type DevPath = Option<(u64, u16, u16)>;

/// The `ublksrv_ctrl_cmd` fields a control command must carry.
#[derive(Debug, Clone, Copy)]
struct CtrlFields {
    dev_id: u32,
    queue_id: u16,
    len: u16,
    addr: u64,
    data: u64,
}

struct CtrlCase {
    name: &'static str,
    ioctl: u32,
    legacy: Option<u32>,
    fields: CtrlFields,
    build: fn(Encoding, DevPath, FileRef) -> Entry128,
}

fn ctrl_entry<C: CtrlCommand>(c: C, enc: Encoding, path: DevPath) -> Entry128 {
    let c = match path {
        Some((buf, len, plen)) => c.with_dev_path(buf as *mut u8, len, plen),
        None => c,
    };
    c.entry(enc).user_data(USER_DATA)
}

const fn f(dev_id: u32, queue_id: u16, len: u16, addr: u64, data: u64) -> CtrlFields {
    CtrlFields {
        dev_id,
        queue_id,
        len,
        addr,
        data,
    }
}

const NOQ: u16 = 0xffff;

/// [`BUF`] as a pointer.
fn buf<T>() -> *mut T {
    BUF as *mut T
}

fn ctrl_cases() -> Vec<CtrlCase> {
    use cmd::*;
    vec![
        CtrlCase {
            name: "ADD_DEV",
            ioctl: ioc(IOWR, 0x04, CTRL_SIZE),
            legacy: Some(0x04),
            fields: f(7, NOQ, 64, BUF, 0),
            build: |e, d, fd| ctrl_entry(AddDev::new(fd, 7, buf()), e, d),
        },
        CtrlCase {
            name: "DEL_DEV",
            ioctl: ioc(IOWR, 0x05, CTRL_SIZE),
            legacy: Some(0x05),
            fields: f(7, NOQ, 0, 0, 0),
            build: |e, d, fd| ctrl_entry(DelDev::new(fd, 7), e, d),
        },
        CtrlCase {
            name: "DEL_DEV_ASYNC",
            ioctl: ioc(IOR, 0x14, CTRL_SIZE),
            legacy: None,
            fields: f(7, NOQ, 0, 0, 0),
            build: |e, d, fd| ctrl_entry(DelDevAsync::new(fd, 7), e, d),
        },
        CtrlCase {
            name: "START_DEV",
            ioctl: ioc(IOWR, 0x06, CTRL_SIZE),
            legacy: Some(0x06),
            fields: f(7, NOQ, 0, 0, 4242),
            build: |e, d, fd| ctrl_entry(StartDev::new(fd, 7, 4242), e, d),
        },
        CtrlCase {
            name: "STOP_DEV",
            ioctl: ioc(IOWR, 0x07, CTRL_SIZE),
            legacy: Some(0x07),
            fields: f(7, NOQ, 0, 0, 0),
            build: |e, d, fd| ctrl_entry(StopDev::new(fd, 7), e, d),
        },
        CtrlCase {
            name: "TRY_STOP_DEV",
            ioctl: ioc(IOWR, 0x17, CTRL_SIZE),
            legacy: None,
            fields: f(7, NOQ, 0, 0, 0),
            build: |e, d, fd| ctrl_entry(TryStopDev::new(fd, 7), e, d),
        },
        CtrlCase {
            name: "SET_PARAMS",
            ioctl: ioc(IOWR, 0x08, CTRL_SIZE),
            legacy: Some(0x08),
            fields: f(7, NOQ, size_of::<ublk::sys::ublk_params>() as u16, BUF, 0),
            build: |e, d, fd| ctrl_entry(SetParams::new(fd, 7, buf()), e, d),
        },
        CtrlCase {
            name: "GET_PARAMS",
            ioctl: ioc(IOR, 0x09, CTRL_SIZE),
            legacy: Some(0x09),
            fields: f(7, NOQ, size_of::<ublk::sys::ublk_params>() as u16, BUF, 0),
            build: |e, d, fd| ctrl_entry(GetParams::new(fd, 7, buf()), e, d),
        },
        CtrlCase {
            name: "GET_DEV_INFO",
            ioctl: ioc(IOR, 0x02, CTRL_SIZE),
            legacy: Some(0x02),
            fields: f(7, NOQ, 64, BUF, 0),
            build: |e, d, fd| ctrl_entry(GetDevInfo::new(fd, 7, buf()), e, d),
        },
        CtrlCase {
            name: "GET_DEV_INFO2",
            ioctl: ioc(IOR, 0x12, CTRL_SIZE),
            legacy: Some(0x12),
            fields: f(7, NOQ, 64, BUF, 0),
            build: |e, d, fd| ctrl_entry(GetDevInfo2::new(fd, 7, buf()), e, d),
        },
        CtrlCase {
            name: "GET_QUEUE_AFFINITY",
            ioctl: ioc(IOR, 0x01, CTRL_SIZE),
            legacy: Some(0x01),
            // The kernel reads the queue from data[0] (queue_id is unused):
            // ublk_ctrl_get_queue_affinity(), kublk and ublksrv all agree.
            fields: f(7, NOQ, 128, BUF, 3),
            build: |e, d, fd| ctrl_entry(GetQueueAffinity::new(fd, 7, 3, buf(), 128), e, d),
        },
        CtrlCase {
            name: "GET_FEATURES",
            ioctl: ioc(IOR, 0x13, CTRL_SIZE),
            legacy: None,
            fields: f(u32::MAX, NOQ, 8, BUF, 0),
            build: |e, d, fd| ctrl_entry(GetFeatures::new(fd, buf()), e, d),
        },
        CtrlCase {
            name: "START_USER_RECOVERY",
            ioctl: ioc(IOWR, 0x10, CTRL_SIZE),
            legacy: Some(0x10),
            fields: f(7, NOQ, 0, 0, 0),
            build: |e, d, fd| ctrl_entry(StartUserRecovery::new(fd, 7), e, d),
        },
        CtrlCase {
            name: "END_USER_RECOVERY",
            ioctl: ioc(IOWR, 0x11, CTRL_SIZE),
            legacy: Some(0x11),
            fields: f(7, NOQ, 0, 0, 4242),
            build: |e, d, fd| ctrl_entry(EndUserRecovery::new(fd, 7, 4242), e, d),
        },
        CtrlCase {
            name: "UPDATE_SIZE",
            ioctl: ioc(IOWR, 0x15, CTRL_SIZE),
            legacy: None,
            fields: f(7, NOQ, 0, 0, 1 << 33),
            build: |e, d, fd| ctrl_entry(UpdateSize::new(fd, 7, 1 << 33), e, d),
        },
        CtrlCase {
            name: "QUIESCE_DEV",
            ioctl: ioc(IOWR, 0x16, CTRL_SIZE),
            legacy: None,
            fields: f(7, NOQ, 0, 0, 5000),
            build: |e, d, fd| ctrl_entry(QuiesceDev::new(fd, 7, 5000), e, d),
        },
        CtrlCase {
            name: "REG_BUF",
            ioctl: ioc(IOWR, 0x18, CTRL_SIZE),
            legacy: None,
            fields: f(7, NOQ, 24, BUF, 0),
            build: |e, d, fd| ctrl_entry(RegBuf::new(fd, 7, buf()), e, d),
        },
        CtrlCase {
            name: "UNREG_BUF",
            ioctl: ioc(IOWR, 0x19, CTRL_SIZE),
            legacy: None,
            fields: f(7, NOQ, 0, 0, 9),
            build: |e, d, fd| ctrl_entry(UnregBuf::new(fd, 7, 9), e, d),
        },
    ]
}

/// The 128-byte SQE the kernel expects for a control command.
fn ctrl_image(fd: FileRef, cmd_op: u32, c: CtrlFields, dev_path_len: u16) -> [u8; 128] {
    let mut img = [0u8; 128];
    sqe_header(&mut img, fd, cmd_op, 0);
    let cmd = &mut img[OFF_CMD..];
    put(cmd, 0, &c.dev_id.to_ne_bytes());
    put(cmd, 4, &c.queue_id.to_ne_bytes());
    put(cmd, 6, &c.len.to_ne_bytes());
    put(cmd, 8, &c.addr.to_ne_bytes());
    put(cmd, 16, &c.data.to_ne_bytes());
    put(cmd, 24, &dev_path_len.to_ne_bytes());
    img
}

#[test]
fn control_commands_match_the_kernel_layout() {
    let paths = [None, Some((PATH_BUF, PATH_TOTAL, PATH_LEN))];
    for case in ctrl_cases() {
        for enc in ENCODINGS {
            let cmd_op = match enc {
                Encoding::Legacy => case.legacy.unwrap_or(case.ioctl),
                Encoding::Ioctl => case.ioctl,
            };
            for fd in FDS {
                for path in paths {
                    let (fields, path_len) = match path {
                        Some((addr, len, plen)) => (
                            CtrlFields {
                                addr,
                                len,
                                ..case.fields
                            },
                            plen,
                        ),
                        None => (case.fields, 0),
                    };
                    let want = ctrl_image(fd, cmd_op, fields, path_len);
                    let got = entry128_bytes(&(case.build)(enc, path, fd));
                    let what = format!("{} {enc:?} {fd:?} dev_path {path:x?}", case.name);
                    assert_same(&what, &got, &want);
                }
            }
        }
    }
}

#[test]
fn control_opcodes_follow_the_uapi() {
    // Each builder's constants and `opcode()` against the UAPI numbers:
    // the ioctl code is `_IOR`/`_IOWR('u', nr, struct ublksrv_ctrl_cmd)` and
    // the legacy code, where there is one, is its `nr`.
    macro_rules! check {
        ($($ty:ident),*) => {$({
            let case = ctrl_cases().into_iter().find(|c| {
                stringify!($ty).to_uppercase().replace('_', "")
                    == c.name.replace('_', "")
            });
            let case = case.expect(concat!("no case for ", stringify!($ty)));
            assert_eq!(cmd::$ty::CODE, case.ioctl, "{} ioctl code", case.name);
            assert_eq!(cmd::$ty::LEGACY_CODE, case.legacy, "{} legacy code", case.name);
            if let Some(l) = case.legacy {
                assert_eq!(case.ioctl & 0xff, l, "{}: nr of the ioctl code", case.name);
            }
            assert!(
                <cmd::$ty as CtrlCommand>::NAME.ends_with(&format!("_CMD_{}", case.name)),
                "{}: NAME is {}", case.name, <cmd::$ty as CtrlCommand>::NAME
            );
        })*};
    }
    check!(
        AddDev,
        DelDev,
        DelDevAsync,
        StartDev,
        StopDev,
        TryStopDev,
        SetParams,
        GetParams,
        GetDevInfo,
        GetDevInfo2,
        GetQueueAffinity,
        GetFeatures,
        StartUserRecovery,
        EndUserRecovery,
        UpdateSize,
        QuiesceDev,
        RegBuf,
        UnregBuf
    );
    assert_eq!(ctrl_cases().len(), 18);
}

#[test]
fn control_header_accessor_matches_the_entry() {
    let c = cmd::GetQueueAffinity::new(FileRef::Fd(3), 4, 1, BUF as *mut u8, 64);
    let h = c.header();
    assert_eq!(
        (
            h.dev_id,
            h.queue_id,
            h.len,
            h.addr,
            h.data[0],
            h.dev_path_len
        ),
        (4, 0xffff, 64, BUF, 1, 0),
        "GET_QUEUE_AFFINITY carries the queue in data[0]"
    );
    let c = cmd::DelDev::new(FileRef::Fd(3), 9).dev_path(PATH_BUF as *mut u8, PATH_TOTAL, PATH_LEN);
    let h = c.header();
    assert_eq!(
        (h.dev_id, h.queue_id, h.len, h.addr, h.dev_path_len),
        (9, 0xffff, PATH_TOTAL, PATH_BUF, PATH_LEN)
    );
}

// -------------------------------------------------------------------- I/O

/// What an I/O command carries beyond its `ublksrv_io_cmd` basics.
#[derive(Debug, Clone, Copy, Default)]
struct IoExtra {
    buf_addr: Option<u64>,
    auto: Option<AutoBufReg>,
}

/// The builders that take a buffer address and auto registration.
trait BufSetters: Sized {
    fn set(self, x: IoExtra) -> Self;
}

macro_rules! buf_setters {
    ($($ty:ident),*) => {$(
        impl BufSetters for cmd::$ty {
            fn set(self, x: IoExtra) -> Self {
                let c = match x.buf_addr {
                    Some(a) => self.buf_addr(a as *mut u8),
                    None => self,
                };
                match x.auto {
                    Some(r) => c.auto_buf_reg(r),
                    None => c,
                }
            }
        }
    )*};
}
buf_setters!(FetchReq, CommitAndFetchReq, NeedGetData);

struct IoCase {
    name: &'static str,
    ioctl: u32,
    legacy: Option<u32>,
    /// q_id, tag, result, addr (of `ublksrv_io_cmd`) before any extra.
    fields: (u16, u16, i32, u64),
    /// Whether the builder takes [`IoExtra`].
    has_buf: bool,
    build: fn(FileRef, Encoding, IoExtra) -> Entry,
}

fn io_cases() -> Vec<IoCase> {
    use cmd::*;
    vec![
        IoCase {
            name: "FETCH_REQ",
            ioctl: ioc(IOWR, 0x20, IO_SIZE),
            legacy: Some(0x20),
            fields: (2, 7, -1, 0),
            has_buf: true,
            build: |fd, e, x| FetchReq::new(fd, 2, 7).set(x).encoding(e).build(),
        },
        IoCase {
            name: "COMMIT_AND_FETCH_REQ",
            ioctl: ioc(IOWR, 0x21, IO_SIZE),
            legacy: Some(0x21),
            fields: (2, 7, 4096, 0),
            has_buf: true,
            build: |fd, e, x| {
                CommitAndFetchReq::new(fd, 2, 7, 4096)
                    .set(x)
                    .encoding(e)
                    .build()
            },
        },
        IoCase {
            name: "COMMIT_AND_FETCH_REQ (error)",
            ioctl: ioc(IOWR, 0x21, IO_SIZE),
            legacy: Some(0x21),
            fields: (0, 4095, -5, 0),
            has_buf: true,
            build: |fd, e, x| {
                CommitAndFetchReq::new(fd, 0, 4095, -5)
                    .set(x)
                    .encoding(e)
                    .build()
            },
        },
        IoCase {
            name: "NEED_GET_DATA",
            ioctl: ioc(IOWR, 0x22, IO_SIZE),
            legacy: Some(0x22),
            fields: (1, 3, 0, 0),
            has_buf: true,
            build: |fd, e, x| NeedGetData::new(fd, 1, 3).set(x).encoding(e).build(),
        },
        IoCase {
            name: "REGISTER_IO_BUF",
            ioctl: ioc(IOWR, 0x23, IO_SIZE),
            legacy: None,
            fields: (1, 3, 0, 17),
            has_buf: false,
            build: |fd, e, _| RegisterIoBuf::new(fd, 1, 3, 17).encoding(e).build(),
        },
        IoCase {
            name: "UNREGISTER_IO_BUF",
            ioctl: ioc(IOWR, 0x24, IO_SIZE),
            legacy: None,
            fields: (1, 3, 0, 17),
            has_buf: false,
            build: |fd, e, _| UnregisterIoBuf::new(fd, 1, 3, 17).encoding(e).build(),
        },
    ]
}

/// The 64-byte SQE the kernel expects for an I/O command.
fn io_image(fd: FileRef, cmd_op: u32, f: (u16, u16, i32, u64), sqe_addr: u64) -> [u8; 64] {
    let mut img = [0u8; 64];
    sqe_header(&mut img, fd, cmd_op, sqe_addr);
    let cmd = &mut img[OFF_CMD..];
    put(cmd, 0, &f.0.to_ne_bytes());
    put(cmd, 2, &f.1.to_ne_bytes());
    put(cmd, 4, &f.2.to_ne_bytes());
    put(cmd, 8, &f.3.to_ne_bytes());
    img
}

#[test]
fn io_commands_match_the_kernel_layout() {
    let extras = [
        IoExtra::default(),
        IoExtra {
            buf_addr: Some(BUF),
            auto: None,
        },
        IoExtra {
            buf_addr: None,
            auto: Some(AutoBufReg {
                index: 0x1234,
                flags: ublk::sys::UBLK_AUTO_BUF_REG_FALLBACK as u8,
            }),
        },
        IoExtra {
            buf_addr: Some(BUF),
            auto: Some(AutoBufReg {
                index: 0xffff,
                flags: 0xff,
            }),
        },
    ];
    for case in io_cases() {
        for enc in ENCODINGS {
            let cmd_op = match enc {
                Encoding::Legacy => case.legacy.unwrap_or(case.ioctl),
                Encoding::Ioctl => case.ioctl,
            };
            for fd in FDS {
                for x in extras
                    .iter()
                    .filter(|_| case.has_buf)
                    .chain([&IoExtra::default()])
                {
                    let (q, t, r, addr) = case.fields;
                    let fields = (q, t, r, x.buf_addr.unwrap_or(addr));
                    // ublk_auto_buf_reg_to_sqe_addr(): index | flags << 16.
                    let sqe_addr = x
                        .auto
                        .map_or(0, |a| u64::from(a.index) | u64::from(a.flags) << 16);
                    let want = io_image(fd, cmd_op, fields, sqe_addr);
                    let got = entry_bytes(&(case.build)(fd, enc, *x).user_data(USER_DATA));
                    let what = format!("{} {enc:?} {fd:?} {x:x?}", case.name);
                    assert_same(&what, &got, &want);
                }
            }
        }
    }
}

#[test]
fn io_opcodes_follow_the_uapi() {
    let consts = [
        ("FETCH_REQ", cmd::FetchReq::CODE, cmd::FetchReq::LEGACY_CODE),
        (
            "COMMIT_AND_FETCH_REQ",
            cmd::CommitAndFetchReq::CODE,
            cmd::CommitAndFetchReq::LEGACY_CODE,
        ),
        (
            "NEED_GET_DATA",
            cmd::NeedGetData::CODE,
            cmd::NeedGetData::LEGACY_CODE,
        ),
        (
            "REGISTER_IO_BUF",
            cmd::RegisterIoBuf::CODE,
            cmd::RegisterIoBuf::LEGACY_CODE,
        ),
        (
            "UNREGISTER_IO_BUF",
            cmd::UnregisterIoBuf::CODE,
            cmd::UnregisterIoBuf::LEGACY_CODE,
        ),
    ];
    let cases = io_cases();
    for (name, code, legacy) in consts {
        let case = cases.iter().find(|c| c.name == name).unwrap();
        assert_eq!(code, case.ioctl, "{name} ioctl code");
        assert_eq!(legacy, case.legacy, "{name} legacy code");
    }
    let c = cmd::NeedGetData::new(FileRef::Fd(1), 0, 0).encoding(Encoding::Legacy);
    assert_eq!(c.opcode(), 0x22);
    let c = cmd::RegisterIoBuf::new(FileRef::Fd(1), 0, 0, 0).encoding(Encoding::Legacy);
    assert_eq!(
        c.opcode(),
        cmd::RegisterIoBuf::CODE,
        "no legacy code: keeps the ioctl one"
    );
}

#[test]
fn zone_append_lba_shares_the_addr_field() {
    let e = cmd::CommitAndFetchReq::new(FileRef::Fixed(0), 1, 2, 8192)
        .zone_append_lba(0x0102_0304_0506_0708)
        .build()
        .user_data(USER_DATA);
    let want = io_image(
        FileRef::Fixed(0),
        ioc(IOWR, 0x21, IO_SIZE),
        (1, 2, 8192, 0x0102_0304_0506_0708),
        0,
    );
    assert_same("zone append", &entry_bytes(&e), &want);
}

#[test]
fn auto_buf_reg_encodes_like_the_kernel_helper() {
    for (index, flags, want) in [
        (0u16, 0u8, 0u64),
        (5, 0, 5),
        (5, 1, 0x1_0005),
        (0xffff, 0xff, 0xff_ffff),
        (0x8000, 0x80, 0x80_8000),
    ] {
        assert_eq!(
            AutoBufReg { index, flags }.to_sqe_addr(),
            want,
            "{index:#x} {flags:#x}"
        );
    }
}

#[test]
fn from_io_uring_file_types() {
    use ublk::io_uring::types;
    assert_eq!(FileRef::from(types::Fd(9)), FileRef::Fd(9));
    assert_eq!(FileRef::from(types::Fixed(2)), FileRef::Fixed(2));
}

/// Batch commands: `ublk_batch_io` (q_id 0, flags 2, nr_elem 4, elem_bytes 6)
/// in the command area, the element buffer in `addr`/`len`; the multishot
/// fetch also sets `IOSQE_BUFFER_SELECT`, `uring_cmd_flags` =
/// `IORING_URING_CMD_MULTISHOT` and `buf_group` (offset 40).
#[test]
fn batch_commands_match_the_kernel_layout() {
    use ublk::cmd::{batch_elem_bytes, CommitIoCmds, FetchIoCmds, PrepIoCmds};
    const OFF_LEN: usize = 24;
    const OFF_URING_CMD_FLAGS: usize = 28;
    const OFF_BUF_GROUP: usize = 40;
    const IOSQE_BUFFER_SELECT: u8 = 1 << 5;
    let has_addr = ublk::sys::UBLK_BATCH_F_HAS_BUF_ADDR as u16;
    assert_eq!((batch_elem_bytes(0), batch_elem_bytes(has_addr)), (8, 16));
    assert_eq!(
        batch_elem_bytes(has_addr | ublk::sys::UBLK_BATCH_F_HAS_ZONE_LBA as u16),
        24
    );
    let batch_io = |q_id: u16, flags: u16, nr: u16, elem: u8| {
        let mut c = [0u8; 16];
        put(&mut c, 0, &q_id.to_ne_bytes());
        put(&mut c, 2, &flags.to_ne_bytes());
        put(&mut c, 4, &nr.to_ne_bytes());
        c[6] = elem;
        c
    };
    for fd in FDS {
        for (nr, code, e) in [
            (
                0x25,
                PrepIoCmds::CODE,
                PrepIoCmds::new(fd, 3, has_addr, 5, BUF as *const u8).build(),
            ),
            (
                0x26,
                CommitIoCmds::CODE,
                CommitIoCmds::new(fd, 3, has_addr, 5, BUF as *const u8).build(),
            ),
        ] {
            assert_eq!(code, ioc(IOWR, nr, 16));
            let mut want = [0u8; 64];
            sqe_header(&mut want, fd, code, BUF);
            put(&mut want, OFF_LEN, &(5u32 * 16).to_ne_bytes());
            put(&mut want, OFF_CMD, &batch_io(3, has_addr, 5, 16));
            assert_same(
                &format!("batch {nr:#x} on {fd:?}"),
                &entry_bytes(&e.user_data(USER_DATA)),
                &want,
            );
        }
        let e = FetchIoCmds::new(fd, 2, 7).build().user_data(USER_DATA);
        assert_eq!(FetchIoCmds::CODE, ioc(IOWR, 0x27, 16));
        let mut want = [0u8; 64];
        sqe_header(&mut want, fd, FetchIoCmds::CODE, 0);
        want[OFF_FLAGS] |= IOSQE_BUFFER_SELECT;
        put(&mut want, OFF_URING_CMD_FLAGS, &2u32.to_ne_bytes());
        put(&mut want, OFF_BUF_GROUP, &7u16.to_ne_bytes());
        put(&mut want, OFF_CMD, &batch_io(2, 0, 0, 2));
        assert_same(&format!("FETCH_IO_CMDS on {fd:?}"), &entry_bytes(&e), &want);
    }
}
