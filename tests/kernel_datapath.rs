//! The data path against the real ublk driver: fio with verification in
//! every copy mode, add/start/stop/delete cycles without leaks, and stopping
//! a device under load (run in a guest by `cargo xtask test`; ignored on the
//! host).

use std::sync::Arc;
use std::time::{Duration, Instant};

use ublk::{Control, CopyMode, DeviceBuilder};
use ublk_e2e::{
    assert_device_gone, fio, mem_target, note, spawn_fio, thread_names, wait_fio, Resources,
    TestDevice,
};

const MIB: u64 = 1 << 20;

/// Starts a RAM device of `cap` bytes.
fn ram_device(ctrl: &Arc<Control>, builder: DeviceBuilder, cap: u64) -> TestDevice {
    let t = mem_target(cap).expect("memfd");
    TestDevice::start_with(ctrl.clone(), builder, cap, move |_| Ok(t.clone()))
        .unwrap_or_else(|e| panic!("starting a RAM device ({builder:?}): {e}"))
}

/// fio random writes with crc32c verification of `mode` over `queues` queues.
fn verify_mode(mode: CopyMode, queues: u16, batch: bool) {
    let t0 = Instant::now();
    let ctrl = Arc::new(Control::open().expect("opening /dev/ublk-control"));
    let wanted = if batch {
        mode.features() | ublk::Features::BATCH_IO
    } else {
        mode.features()
    };
    if let Err(e) = ctrl.require(wanted) {
        eprintln!("SKIP: {mode:?} (batch: {batch}): {e}");
        return;
    }
    let builder = DeviceBuilder::new()
        .queues(queues)
        .depth(32)
        .copy_mode(mode)
        .batch(batch);
    let dev = ram_device(&ctrl, builder, 64 * MIB);
    let id = dev.id;
    note(t0, format_args!("{mode:?} x{queues}: /dev/ublkb{id} live"));
    let out = fio(
        id,
        &[
            "--name=v",
            "--direct=1",
            "--ioengine=io_uring",
            "--rw=randwrite",
            "--bsrange=4k-256k",
            "--iodepth=32",
            "--size=64M",
            "--io_size=32M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--output-format=json",
        ],
    )
    .expect("running fio");
    note(t0, format_args!("{mode:?} x{queues}: fio done"));
    out.assert_clean(&format!("{mode:?} with {queues} queue(s)"));
    let stats = dev.stop().expect("serving");
    note(t0, format_args!("{mode:?} x{queues}: stopped, {stats:?}"));
    assert_eq!(stats.len(), usize::from(queues));
    assert!(stats.iter().map(|s| s.requests).sum::<u64>() > 0);
    for s in &stats {
        // The run loop entered the kernel and handled completions (a batch
        // fetch CQE brings many requests, so no more can be said).
        assert!(s.completions > 0, "{s:?}");
        assert!(s.enters > 0 && s.submitted > 0, "{s:?}");
    }
    assert_eq!(stats.iter().map(|s| s.errors).sum::<u64>(), 0);
    assert_device_gone(id);
}

macro_rules! verify_tests {
    ($($name:ident: $mode:expr, $queues:expr $(, $batch:ident)?;)*) => {$(
        #[test]
        #[ignore = "needs ublk_drv: run with cargo xtask test"]
        fn $name() {
            verify_mode($mode, $queues, false $(|| stringify!($batch) == "batch")?);
        }
    )*};
}

verify_tests! {
    verify_copy_1q: CopyMode::Copy, 1;
    verify_copy_2q: CopyMode::Copy, 2;
    verify_need_get_data_1q: CopyMode::NeedGetData, 1;
    verify_need_get_data_2q: CopyMode::NeedGetData, 2;
    verify_user_copy_1q: CopyMode::UserCopy, 1;
    verify_user_copy_2q: CopyMode::UserCopy, 2;
    verify_zero_copy_1q: CopyMode::ZeroCopy, 1;
    verify_zero_copy_2q: CopyMode::ZeroCopy, 2;
    verify_auto_buf_reg_1q: CopyMode::AutoBufReg { fallback: false }, 1;
    verify_auto_buf_reg_2q: CopyMode::AutoBufReg { fallback: false }, 2;
    verify_batch_copy_1q: CopyMode::Copy, 1, batch;
    verify_batch_copy_2q: CopyMode::Copy, 2, batch;
    verify_batch_user_copy_1q: CopyMode::UserCopy, 1, batch;
    verify_batch_zero_copy_2q: CopyMode::ZeroCopy, 2, batch;
    verify_batch_auto_buf_reg_1q: CopyMode::AutoBufReg { fallback: true }, 1, batch;
}

/// Waits until the disk has completed `n` reads (or `timeout` passed);
/// returns how many it has.
fn wait_reads(id: u32, n: u64, timeout: Duration) -> u64 {
    let stat = format!("/sys/block/ublkb{id}/stat");
    let t0 = Instant::now();
    loop {
        let reads = std::fs::read_to_string(&stat)
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        if reads >= n || t0.elapsed() >= timeout {
            return reads;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many add/start/stop/delete cycles to run (`UBLK_E2E_CYCLES`).
fn cycles() -> usize {
    std::env::var("UBLK_E2E_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn add_start_stop_delete_cycles_leak_nothing() {
    let n = cycles();
    let cycle = |i: usize| {
        // A fresh control device each time: its ring and fd must go too.
        let dev = TestDevice::start(DeviceBuilder::new().queues(2).depth(16), 4 * MIB, |_| {
            mem_target(4 * MIB)
        })
        .unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        let id = dev.id;
        dev.stop().unwrap_or_else(|e| panic!("cycle {i}: {e}"));
        assert_device_gone(id);
    };
    // A warm-up cycle, so lazily created process state is not counted.
    cycle(0);
    let before = Resources::now();
    let t0 = Instant::now();
    let mut rss_after_ten = 0;
    for i in 1..=n {
        cycle(i);
        if i == 10.min(n) {
            rss_after_ten = rss_kib();
        }
    }
    let per = t0.elapsed() / n as u32;
    note(t0, format_args!("{n} cycles, {per:?} each"));
    // Memory does not grow with the cycles (1 MiB of slack for the
    // allocator's own bookkeeping).
    let rss_end = rss_kib();
    assert!(
        rss_end <= rss_after_ten + 1024,
        "RSS grew from {rss_after_ten} KiB after 10 cycles to {rss_end} KiB after {n}"
    );
    // io_uring workers (iou-wrk-*) of closed rings exit asynchronously.
    // An io_uring worker of the warm-up may still have been exiting when
    // `before` was counted: fewer threads than then is no leak.
    let leaked = |now: &Resources| {
        Resources {
            threads: now.threads.max(before.threads),
            ..*now
        } != before
    };
    let settle = Instant::now();
    while leaked(&Resources::now()) && settle.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let names = thread_names();
    let now = Resources::now();
    assert!(
        !leaked(&now),
        "after {n} cycles: {now:?}, before: {before:?} (threads now: {names:?})"
    );
}

/// This process's resident set size, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// fio's run time in [`stop_while_fio_runs`].
const FIO_RUNTIME: u64 = 12;

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn stop_while_fio_runs() {
    let t0 = Instant::now();
    let ctrl = Arc::new(Control::open().expect("opening /dev/ublk-control"));
    let before = Resources::now();
    let mut dev = ram_device(&ctrl, DeviceBuilder::new().queues(2).depth(32), 64 * MIB);
    let id = dev.id;
    let runtime = format!("--runtime={FIO_RUNTIME}");
    let mut child = spawn_fio(
        id,
        &[
            "--name=r",
            "--direct=1",
            "--ioengine=io_uring",
            "--rw=randread",
            "--bs=4k",
            "--iodepth=32",
            "--size=64M",
            "--time_based",
            &runtime,
        ],
    )
    .expect("spawning fio");
    // fio takes seconds to start under emulation: stop once it is busy.
    let busy = wait_reads(id, 1000, Duration::from_secs(30));
    note(t0, format_args!("{busy} reads completed"));
    assert!(
        child.try_wait().expect("fio").is_none(),
        "fio ended before the stop"
    );
    note(t0, "STOP_DEV while fio runs");
    let stopped = Instant::now();
    let served = dev.stop_run_within(Duration::from_secs(20));
    note(
        t0,
        format_args!(
            "Device::run returned after {:?}: {served:?}",
            stopped.elapsed()
        ),
    );
    let stats = served.expect("serving");
    assert_eq!(stats.iter().map(|s| s.errors).sum::<u64>(), 0);
    // The disk is gone but fio still has it open: its reads now end at
    // once (the capacity is 0), and DEL_DEV waits for its close.
    let out = wait_fio(&mut child, Duration::from_secs(FIO_RUNTIME + 30))
        .expect("waiting for fio")
        .expect("fio exits by itself once the device is gone");
    let fio_exit = stopped.elapsed();
    note(
        t0,
        format_args!("fio exited ({}) {fio_exit:?} after the stop", out.status),
    );
    assert!(
        dev.wait_deleted(Duration::from_secs(20)),
        "the device is deleted once fio closed it"
    );
    note(
        t0,
        format_args!(
            "deleted {:?} after fio exited",
            stopped.elapsed() - fio_exit
        ),
    );
    assert_device_gone(id);
    let after = Resources::now();
    assert_eq!(
        (after.char_devs, after.block_devs),
        (before.char_devs, before.block_devs)
    );
}
