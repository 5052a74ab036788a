//! `ublk::targets::file_entry` against a plain file: each request's entry
//! is run through a real io_uring (no ublk driver needed) and the file's
//! bytes are checked afterwards.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use ublk::io_uring::{types, IoUring};
use ublk::targets::file_entry;
use ublk::{IoBuf, IoDesc, IoFlags, Op, Request};

const FILE_BYTES: usize = 64 << 10;

/// A scratch file of `FILE_BYTES` bytes of 0xee, removed on drop.
struct Scratch {
    file: File,
    path: std::path::PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("ublk-file-entry-{}-{name}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all_at(&[0xee; FILE_BYTES], 0).unwrap();
        Self { file, path }
    }

    fn bytes(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.file.read_exact_at(&mut v, off).unwrap();
        v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn desc(op: Op, flags: IoFlags, start_sector: u64, nr_sectors: u32) -> IoDesc {
    IoDesc {
        op,
        flags,
        start_sector,
        nr_sectors,
        addr: 0,
    }
}

/// Builds `req`'s entry for fixed file 0 (= `f`) and runs it; returns the
/// CQE's result, or `None` when `file_entry` declines the request.
fn run(f: &Scratch, mut req: Request<'_>) -> Option<i32> {
    let entry = file_entry(types::Fixed(0), &mut req)?;
    let mut ring = IoUring::new(4).unwrap();
    ring.submitter()
        .register_files(&[f.file.as_raw_fd()])
        .unwrap();
    // SAFETY: the entry points at `req`'s buffer (alive until this function
    // returns, after the completion is reaped) or at nothing.
    unsafe { ring.submission().push(&entry.user_data(7)).unwrap() };
    ring.submit_and_wait(1).unwrap();
    let cqe = ring.completion().next().unwrap();
    assert_eq!(cqe.user_data(), 7);
    Some(cqe.result())
}

fn req<'a>(d: IoDesc, buf: IoBuf<'a>) -> Request<'a> {
    Request {
        q_id: 0,
        tag: 3,
        desc: d,
        buf,
        integrity: None,
    }
}

#[test]
fn reads_and_writes_move_the_bytes_at_the_offset() {
    let f = Scratch::new("rw");
    let mut data: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    let w = req(desc(Op::Write, IoFlags::FUA, 16, 16), IoBuf::Mem(&mut data));
    assert_eq!(run(&f, w), Some(8192));
    assert_eq!(f.bytes(8192, 8192), data);
    assert_eq!(f.bytes(0, 8192), vec![0xee; 8192], "before the range");
    assert_eq!(f.bytes(16384, 4096), vec![0xee; 4096], "after the range");

    let mut back = vec![0u8; 4096];
    let r = req(
        desc(Op::Read, IoFlags::empty(), 24, 8),
        IoBuf::Mem(&mut back),
    );
    assert_eq!(run(&f, r), Some(4096));
    assert_eq!(back, data[4096..]);
}

#[test]
fn flush_discard_and_write_zeroes() {
    let f = Scratch::new("misc");
    assert_eq!(
        run(
            &f,
            req(desc(Op::Flush, IoFlags::empty(), 0, 0), IoBuf::None)
        ),
        Some(0)
    );
    // Punching a hole or zeroing a range reads back as zeros, if the file
    // system of the temp directory can (tmpfs, ext4, xfs, btrfs can).
    for (name, op, flags, sector) in [
        ("discard", Op::Discard, IoFlags::empty(), 8),
        ("write zeroes", Op::WriteZeroes, IoFlags::empty(), 32),
        (
            "write zeroes, no unmap",
            Op::WriteZeroes,
            IoFlags::NOUNMAP,
            64,
        ),
    ] {
        let res = run(&f, req(desc(op, flags, sector, 8), IoBuf::None)).unwrap();
        if res == -libc::EOPNOTSUPP {
            eprintln!("SKIP: {name}: the temp directory's file system cannot");
            continue;
        }
        assert_eq!(res, 0, "{name}");
        assert_eq!(f.bytes(sector * 512, 4096), vec![0; 4096], "{name}");
        assert_eq!(
            f.bytes(sector * 512 + 4096, 512),
            vec![0xee; 512],
            "{name}: past the range"
        );
    }
}

#[test]
fn what_a_file_cannot_do_is_declined() {
    let f = Scratch::new("none");
    let mut buf = vec![0u8; 4096];
    for (op, buf) in [
        (Op::WriteSame, IoBuf::None),
        (Op::Zone(13), IoBuf::None),
        (Op::Read, IoBuf::None),
        (
            Op::Write,
            IoBuf::Shmem {
                index: 0,
                offset: 0,
            },
        ),
    ] {
        assert_eq!(run(&f, req(desc(op, IoFlags::empty(), 0, 8), buf)), None);
    }
    let r = req(desc(Op::Read, IoFlags::empty(), 0, 8), IoBuf::Mem(&mut buf));
    assert_eq!(run(&f, r), Some(4096));
}
