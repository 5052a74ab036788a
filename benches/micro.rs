//! Micro-benchmarks of the server's per-request work that need no ublk
//! device (they run on any host with `cargo bench --bench micro`):
//!
//! - building the FETCH and COMMIT_AND_FETCH SQEs (`ublk::cmd`);
//! - decoding a descriptor (`IoDesc::from_raw`), and reading it from a
//!   `DescArray` mapping (here of a memfd standing in for `/dev/ublkcN`);
//! - one request cycle against a real io_uring with a memfd in place of the
//!   char device: read and decode the descriptor, build the COMMIT_AND_FETCH
//!   SQE, submit it and reap its CQE. The kernel answers the uring_cmd on a
//!   memfd at once with `-EOPNOTSUPP`, so this measures the ring round trip
//!   and our per-request code, not the ublk driver. (`ublk::Queue` itself
//!   cannot be driven without the driver: its constructor maps the real
//!   char device and its fetch needs ublk_drv to accept the commands.)
//!   Skipped if the host refuses io_uring.

use std::hint::black_box;
use std::os::fd::AsRawFd;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ublk::cmd::{AutoBufReg, CommitAndFetchReq, FetchReq};
use ublk::io_uring::{types, IoUring};
use ublk::mem::DescArray;
use ublk::sys::ublksrv_io_desc;
use ublk::IoDesc;

fn raw_desc(tag: u16) -> ublksrv_io_desc {
    ublksrv_io_desc {
        op_flags: ublk::sys::UBLK_IO_OP_READ,
        start_sector: u64::from(tag) * 8,
        addr: 0x7f00_0000_0000 + (u64::from(tag) << 19),
        ..Default::default()
    }
}

fn sqe_building(c: &mut Criterion) {
    let mut g = c.benchmark_group("sqe");
    g.throughput(Throughput::Elements(1));
    let buf = 0x7f00_0000_0000usize as *mut u8;
    // The builder every variant starts from: queue 0, tag 17, 4 KiB done.
    let commit = || {
        CommitAndFetchReq::new(
            types::Fixed(0),
            black_box(0),
            black_box(17),
            black_box(4096),
        )
    };
    g.bench_function("commit_and_fetch", |b| b.iter(|| commit().build()));
    g.bench_function("commit_and_fetch+buf_addr", |b| {
        b.iter(|| commit().buf_addr(black_box(buf)).build());
    });
    g.bench_function("commit_and_fetch+auto_buf_reg", |b| {
        b.iter(|| {
            commit()
                .auto_buf_reg(AutoBufReg {
                    index: black_box(17),
                    flags: 0,
                })
                .build()
        });
    });
    g.bench_function("fetch", |b| {
        b.iter(|| FetchReq::new(types::Fixed(0), black_box(1), black_box(5)).build());
    });
    g.finish();
}

fn desc_decoding(c: &mut Criterion) {
    let mut g = c.benchmark_group("desc");
    g.throughput(Throughput::Elements(1));
    let raw = raw_desc(3);
    g.bench_function("from_raw", |b| b.iter(|| IoDesc::from_raw(black_box(&raw))));

    // A memfd laid out like the char device's descriptor area.
    let fd = ublk_e2e::memfd("bench-descs", 1 << 20).expect("memfd");
    let descs = DescArray::map(&fd, 0, 128).expect("mapping a memfd");
    let mut tag = 0u16;
    g.bench_function("desc_array_get+from_raw", |b| {
        b.iter(|| {
            tag = (tag + 1) & 127;
            descs.get(black_box(tag)).map(|d| IoDesc::from_raw(&d))
        });
    });
    g.finish();
}

fn ring_cycle(c: &mut Criterion) {
    let mut ring = match IoUring::new(64) {
        Ok(r) => r,
        Err(e) => {
            println!("ring cycle bench skipped: io_uring unavailable ({e})");
            return;
        }
    };
    let fd = ublk_e2e::memfd("bench-cdev", 1 << 20).expect("memfd");
    if let Err(e) = ring.submitter().register_files(&[fd.as_raw_fd()]) {
        println!("ring cycle bench skipped: cannot register files ({e})");
        return;
    }
    let descs = DescArray::map(&fd, 0, 128).expect("mapping a memfd");
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    let mut tag = 0u16;
    g.bench_function("commit_cycle_fake_cdev", |b| {
        b.iter(|| {
            tag = (tag + 1) & 127;
            let d = IoDesc::from_raw(&descs.get(tag).unwrap_or_default());
            let e = CommitAndFetchReq::new(types::Fixed(0), 0, tag, d.len() as i32)
                .build()
                .user_data(u64::from(tag));
            // SAFETY: the SQE points at no memory.
            unsafe { ring.submission().push(&e) }.expect("ring has room");
            ring.submit_and_wait(1).expect("submit");
            let cqe = ring.completion().next().expect("a CQE");
            black_box(cqe.result())
        });
    });
    g.finish();
}

criterion_group!(micro, sqe_building, desc_decoding, ring_cycle);
criterion_main!(micro);
