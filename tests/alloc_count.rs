//! No heap allocation per I/O in the serving hot path.
//!
//! A counting `#[global_allocator]` (wrapping `System`) counts every
//! allocation this process makes, on any thread. Each test serves a device
//! in-process with the library API, runs fio (a child process, whose
//! allocations are not ours) for a few I/Os to warm up, then for `SHORT` and
//! for `LONG` I/Os, counting this process's allocations during each run. If
//! the server allocated per request, the long run would allocate about
//! `LONG - SHORT` more times than the short one; what the process allocates
//! around fio itself (spawning it, reading its report) is the same for both.
//!
//! Run in a guest by `cargo xtask test` (ignored on the host).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ublk::{Control, CopyMode, DeviceBuilder, Handled, Request, Submit, Target};
use ublk_e2e::{fio, mem_target, note, TestDevice};

/// Allocations (including reallocations) since the process started.
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// `System`, counting allocations.
struct Counting;

// SAFETY: every method forwards to `System` with the caller's arguments, so
// `System`'s guarantees are ours; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: our caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: our caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: our caller upholds `GlobalAlloc::realloc`'s contract, and
        // `ptr` came from `System` (through us).
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` (through us) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MIB: u64 = 1 << 20;
const CAPACITY: u64 = 64 * MIB;
/// I/Os of the warm-up run (lazily grown state reaches its size).
const WARM_UP: u64 = 2_000;
/// I/Os of the short measured run.
const SHORT: u64 = 10_000;
/// I/Os of the long measured run.
const LONG: u64 = 40_000;
/// How many more allocations the long run may make than the short one:
/// noise (fio's report differs in length, the test harness may print a
/// "running for over 60 seconds" note), far below one per extra I/O.
const SLACK: u64 = 100;

/// Completes every request at once without touching data.
#[derive(Debug)]
struct Null;

impl Target for Null {
    fn handle(&mut self, _: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
        Handled::Done(req.desc.len() as i32)
    }
}

/// [`Null`] that allocates once per request: the control showing that the
/// measurement sees allocations made on the queue threads.
#[derive(Debug)]
struct Allocating;

impl Target for Allocating {
    fn handle(&mut self, _: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
        let len = std::hint::black_box(Box::new(req.desc.len() as i32));
        Handled::Done(*len)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// [`Null`]: requests complete in `handle`.
    Null,
    /// [`MemTarget`]: each request pushes an SQE, completing on its CQE.
    Mem,
    /// [`Allocating`].
    Allocating,
}

/// Reads plus writes the disk has completed (`/sys/block/ublkbN/stat`).
fn disk_ios(id: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/sys/block/ublkb{id}/stat")).unwrap_or_default();
    let f: Vec<u64> = stat
        .split_whitespace()
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    f.first().copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0)
}

/// Runs fio for `ios` 4 KiB random reads and writes at queue depth 32;
/// returns the allocations this process made meanwhile and the I/Os the
/// disk completed.
fn measured_fio(id: u32, ios: u64) -> (u64, u64) {
    // Everything fio needs is built before the window opens.
    let io_size = format!("--io_size={}", ios * 4096);
    let args = [
        "--name=a",
        "--direct=1",
        "--ioengine=io_uring",
        "--rw=randrw",
        "--bs=4k",
        "--iodepth=32",
        "--size=64M",
        io_size.as_str(),
        "--norandommap",
        "--randrepeat=0",
        "--output-format=json",
    ];
    let ios_before = disk_ios(id);
    let allocs_before = ALLOCATIONS.load(Ordering::SeqCst);
    let out = fio(id, &args);
    let allocs = ALLOCATIONS.load(Ordering::SeqCst) - allocs_before;
    let ios_done = disk_ios(id) - ios_before;
    out.expect("running fio")
        .assert_clean(&format!("fio of {ios} I/Os"));
    (allocs, ios_done)
}

/// Allocations and disk I/Os of the short and the long run.
#[derive(Debug)]
struct Measured {
    what: String,
    short_allocs: u64,
    short_ios: u64,
    long_allocs: u64,
    long_ios: u64,
}

/// Serves a device with `kind` in `mode` and measures the fio runs; `None`
/// if the kernel lacks a feature this needs.
fn measure(kind: Kind, mode: CopyMode, batch: bool) -> Option<Measured> {
    let t0 = Instant::now();
    let ctrl = Arc::new(Control::open().expect("opening /dev/ublk-control"));
    let builder = DeviceBuilder::new()
        .queues(2)
        .depth(32)
        .copy_mode(mode)
        .batch(batch);
    if let Err(e) = ctrl.require(builder.requested_flags(ctrl.features())) {
        eprintln!("SKIP: {kind:?} {mode:?} (batch: {batch}): {e}");
        return None;
    }
    let dev = match kind {
        Kind::Null => TestDevice::start_with(ctrl, builder, CAPACITY, |_| Ok(Null)),
        Kind::Allocating => TestDevice::start_with(ctrl, builder, CAPACITY, |_| Ok(Allocating)),
        Kind::Mem => {
            let t = mem_target(CAPACITY).expect("memfd");
            TestDevice::start_with(ctrl, builder, CAPACITY, move |_| Ok(t.clone()))
        }
    }
    .unwrap_or_else(|e| panic!("starting the device ({kind:?}, {builder:?}): {e}"));
    let id = dev.id;
    let what = format!("{kind:?} target, {mode:?}, batch {batch}");
    measured_fio(id, WARM_UP);
    let (short_allocs, short_ios) = measured_fio(id, SHORT);
    let (long_allocs, long_ios) = measured_fio(id, LONG);
    note(
        t0,
        format_args!(
            "{what}: {short_ios} I/Os: {short_allocs} allocations; \
             {long_ios} I/Os: {long_allocs} allocations"
        ),
    );
    let stats = dev.stop().expect("serving");
    assert_eq!(stats.iter().map(|s| s.errors).sum::<u64>(), 0, "{what}");
    assert!(
        long_ios >= short_ios + (LONG - SHORT) * 9 / 10,
        "{what}: the disk completed {short_ios} and {long_ios} I/Os, not about {SHORT} and {LONG}"
    );
    Some(Measured {
        what,
        short_allocs,
        short_ios,
        long_allocs,
        long_ios,
    })
}

fn no_allocation_per_io(kind: Kind, mode: CopyMode, batch: bool) {
    let Some(m) = measure(kind, mode, batch) else {
        return;
    };
    assert!(
        m.long_allocs <= m.short_allocs + SLACK,
        "{}: {} I/Os took {} allocations, {} took {}: that grows with the I/O count",
        m.what,
        m.long_ios,
        m.long_allocs,
        m.short_ios,
        m.short_allocs
    );
}

/// The measurement sees a target that allocates once per request.
#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn an_allocation_per_io_is_seen() {
    let m = measure(Kind::Allocating, CopyMode::Copy, false).expect("the default copy mode");
    let extra_ios = m.long_ios - m.short_ios;
    assert!(
        m.long_allocs >= m.short_allocs + extra_ios * 9 / 10,
        "{}: {extra_ios} more I/Os but only {} more allocations",
        m.what,
        m.long_allocs.saturating_sub(m.short_allocs)
    );
}

macro_rules! alloc_tests {
    ($($name:ident: $kind:expr, $mode:expr, $batch:expr;)*) => {$(
        #[test]
        #[ignore = "needs ublk_drv: run with cargo xtask test"]
        fn $name() {
            no_allocation_per_io($kind, $mode, $batch);
        }
    )*};
}

alloc_tests! {
    null_copy: Kind::Null, CopyMode::Copy, false;
    mem_copy: Kind::Mem, CopyMode::Copy, false;
    mem_need_get_data: Kind::Mem, CopyMode::NeedGetData, false;
    mem_user_copy: Kind::Mem, CopyMode::UserCopy, false;
    mem_zero_copy: Kind::Mem, CopyMode::ZeroCopy, false;
    mem_auto_buf_reg: Kind::Mem, CopyMode::AutoBufReg { fallback: false }, false;
    null_batch_copy: Kind::Null, CopyMode::Copy, true;
    mem_batch_copy: Kind::Mem, CopyMode::Copy, true;
    mem_batch_zero_copy: Kind::Mem, CopyMode::ZeroCopy, true;
}

/// The counter counts: a control for the measurement itself.
#[test]
fn the_allocator_counts() {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    let v: Vec<Box<u64>> = (0..1000).map(Box::new).collect();
    let n = ALLOCATIONS.load(Ordering::SeqCst) - before;
    assert_eq!(v.len(), 1000);
    assert!(n >= 1000, "{n} allocations counted for 1000 boxes");
}
