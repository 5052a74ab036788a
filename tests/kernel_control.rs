//! Control commands against the real ublk driver (run in a guest by
//! `cargo xtask test`; ignored on the host).

use std::sync::Arc;
use std::time::Duration;

use ublk::{
    Attrs, BasicParams, Control, CopyMode, DevInfo, DevState, DeviceBuilder, DiscardParams, Error,
    Features, Params,
};
use ublk_e2e::{assert_device_gone, mem_target, rig_kernel, wait_absent, Resources, TestDevice};

const CAP: u64 = 16 << 20;

fn control() -> Arc<Control> {
    Arc::new(Control::open().expect("opening /dev/ublk-control"))
}

fn is_sid() -> bool {
    rig_kernel().as_deref() == Some("sid")
}

fn is_trixie() -> bool {
    rig_kernel().as_deref() == Some("trixie")
}

/// A live RAM device of [`CAP`] bytes with `builder`'s shape.
fn live(ctrl: &Arc<Control>, builder: DeviceBuilder) -> TestDevice {
    let t = mem_target(CAP).unwrap();
    TestDevice::start_with(ctrl.clone(), builder, CAP, move |_| Ok(t.clone()))
        .expect("starting a RAM device")
}

/// Asserts `r` is `Error::Unsupported` naming `feature`.
fn assert_unsupported<T: std::fmt::Debug>(r: ublk::Result<T>, feature: Features) {
    match r {
        Err(e @ Error::Unsupported { missing, .. }) => {
            assert!(missing.contains(feature), "{e} does not name {feature}");
            let msg = e.to_string();
            assert!(
                msg.contains(&feature.to_string()),
                "{msg:?} does not name {feature}"
            );
        }
        other => panic!("expected Error::Unsupported({feature}), got {other:?}"),
    }
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn get_features_reports_the_kernel_mask() {
    let ctrl = control();
    let mask = ctrl.kernel_mask();
    eprintln!(
        "kernel {:?}: features {mask:#x} = {}",
        rig_kernel(),
        Features::from_bits_retain(mask)
    );
    match rig_kernel().as_deref() {
        Some("sid") => assert_eq!(mask & 0xfffff, 0xfffff, "Linux 7.2 has bits 0-19"),
        Some("trixie") => assert_eq!(mask, 0x1fe, "Linux 6.12's UBLK_F_ALL"),
        _ => {}
    }
    assert_eq!(ctrl.features().bits(), mask & Features::all().bits());
    let ioctl = ctrl.features().contains(Features::CMD_IOCTL_ENCODE);
    assert_eq!(
        ctrl.encoding() == ublk::cmd::Encoding::Ioctl,
        ioctl,
        "the opcode encoding follows UBLK_F_CMD_IOCTL_ENCODE"
    );
}

/// Raw `ADD_DEV` info: `queues` × `depth`, any id.
fn raw_info(ctrl: &Control, queues: u16, depth: u16) -> DevInfo {
    let mut raw = ublk::sys::ublksrv_ctrl_dev_info {
        nr_hw_queues: queues,
        queue_depth: depth,
        max_io_buf_bytes: 256 << 10,
        dev_id: u32::MAX,
        ublksrv_pid: -1,
        ..Default::default()
    };
    if ctrl.features().contains(Features::CMD_IOCTL_ENCODE) {
        raw.flags = Features::CMD_IOCTL_ENCODE.bits();
    }
    DevInfo(raw)
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn add_info_del_round_trip() {
    let ctrl = control();
    let before = Resources::now();
    let added = ctrl.add_dev(&raw_info(&ctrl, 2, 16)).expect("ADD_DEV");
    let id = added.id();
    assert_ne!(id, u32::MAX, "the kernel picks an id");
    let info = ctrl.dev_info(id).expect("GET_DEV_INFO");
    eprintln!("device {id}: flags {}", info.flags());
    assert_eq!(info.id(), id);
    assert_eq!(info.nr_queues(), 2);
    assert_eq!(info.queue_depth(), 16);
    assert_eq!(info.max_io_buf_bytes(), 256 << 10);
    assert_eq!(info.state(), DevState::Dead);
    assert_eq!(
        info.flags(),
        added.flags(),
        "GET_DEV_INFO agrees with ADD_DEV"
    );
    if ctrl.features().contains(Features::CMD_IOCTL_ENCODE) {
        assert!(info.flags().contains(Features::CMD_IOCTL_ENCODE));
    }
    assert!(
        ublk::ctrl::char_dev_path(id).exists() || {
            std::thread::sleep(Duration::from_secs(1));
            ublk::ctrl::char_dev_path(id).exists()
        }
    );
    ctrl.del_dev(id).expect("DEL_DEV");
    assert_device_gone(id);
    let e = ctrl
        .dev_info(id)
        .expect_err("GET_DEV_INFO of a deleted device");
    assert_eq!(e.errno(), Some(ublk::Errno::NODEV), "{e}");
    assert_eq!(Resources::now().char_devs, before.char_devs);
}

/// `GET_DEV_INFO`, the fallback of kernels without unprivileged devices
/// (where `GET_DEV_INFO2` is refused), forced on this kernel: it reports
/// the device as `GET_DEV_INFO2` does.
#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn get_dev_info_fallback_agrees_with_get_dev_info2() {
    let ctrl = control();
    let legacy = Control::open()
        .expect("opening /dev/ublk-control")
        .without_features(Features::UNPRIVILEGED_DEV);
    assert!(legacy.require(Features::UNPRIVILEGED_DEV).is_err());
    let dev = DeviceBuilder::new()
        .queues(2)
        .depth(16)
        .add(ctrl.clone())
        .expect("adding");
    let id = dev.id();
    let v1 = legacy.dev_info(id).expect("GET_DEV_INFO");
    let newest = ctrl.dev_info(id).expect("the newest GET_DEV_INFO");
    assert_eq!(v1.id(), id);
    assert_eq!(v1.nr_queues(), 2);
    assert_eq!(v1.queue_depth(), 16);
    assert_eq!(v1.state(), DevState::Dead);
    assert_eq!(v1.flags(), newest.flags());
    assert_eq!(v1.owner(), newest.owner());
    assert_eq!(v1.max_io_buf_bytes(), newest.max_io_buf_bytes());
    drop(dev);
    assert_device_gone(id);
    let e = legacy
        .dev_info(id)
        .expect_err("GET_DEV_INFO of a deleted device");
    assert_eq!(e.errno(), Some(ublk::Errno::NODEV), "{e}");
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn device_guard_deletes_on_drop() {
    let ctrl = control();
    let dev = DeviceBuilder::new()
        .queues(1)
        .depth(8)
        .add(ctrl.clone())
        .expect("adding");
    let id = dev.id();
    assert_eq!(ctrl.dev_info(id).unwrap().state(), DevState::Dead);
    drop(dev);
    assert_device_gone(id);
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn del_dev_async_removes_the_device() {
    let ctrl = control();
    let id = ctrl.add_dev(&raw_info(&ctrl, 1, 8)).expect("ADD_DEV").id();
    ctrl.del_dev_async(id).expect("DEL_DEV_ASYNC");
    assert_device_gone(id);
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn set_and_get_params_round_trip() {
    let ctrl = control();
    let mut dev = DeviceBuilder::new()
        .queues(2)
        .depth(8)
        .max_io_bytes(256 << 10)
        .add(ctrl.clone())
        .expect("adding");
    let mut basic = BasicParams::new(1 << 30, 256 << 10);
    basic.logical_block_size = 4096;
    basic.physical_block_size = 4096;
    basic.io_min = 4096;
    basic.io_opt = 65536;
    basic.attrs = Attrs::VOLATILE_CACHE | Attrs::FUA | Attrs::ROTATIONAL;
    basic.chunk_sectors = 0;
    let params = Params {
        discard: Some(DiscardParams {
            alignment: 0,
            granularity: 4096,
            max_discard_sectors: 1 << 16,
            max_write_zeroes_sectors: 1 << 16,
            max_discard_segments: 1,
        }),
        ..Params::basic(basic)
    };
    dev.set_params(&params).expect("SET_PARAMS");
    let back = ctrl.get_params(dev.id()).expect("GET_PARAMS");
    assert_eq!(back.basic, params.basic);
    assert_eq!(back.discard, params.discard);
    let devt = back.devt.expect("the kernel fills in the devt group");
    assert_ne!(devt.char_dev, (0, 0), "char device numbers");

    let affinity: Vec<Vec<usize>> = (0..2)
        .map(|q| {
            ctrl.queue_affinity(dev.id(), q)
                .expect("GET_QUEUE_AFFINITY")
        })
        .collect();
    eprintln!("queue affinity: {affinity:?}");
    assert!(affinity.iter().all(|a| !a.is_empty()));
    let e = ctrl
        .queue_affinity(dev.id(), 2)
        .expect_err("affinity of a queue past nr_hw_queues");
    assert_eq!(e.errno(), Some(ublk::Errno::INVAL), "{e}");
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn update_size_of_a_live_device() {
    let ctrl = control();
    let dev = live(&ctrl, DeviceBuilder::new().depth(16));
    let sectors = (CAP / 2) >> 9;
    let r = ctrl.update_size(dev.id, sectors);
    if !ctrl.features().contains(Features::UPDATE_SIZE) {
        assert!(!is_sid());
        assert_unsupported(r, Features::UPDATE_SIZE);
    } else {
        r.expect("UPDATE_SIZE");
        let sysfs = format!("/sys/block/ublkb{}/size", dev.id);
        let mut size = String::new();
        for _ in 0..100 {
            size = std::fs::read_to_string(&sysfs).unwrap_or_default();
            if size.trim() == sectors.to_string() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(size.trim(), sectors.to_string(), "{sysfs}");
    }
    if is_trixie() {
        assert!(!ctrl.features().contains(Features::UPDATE_SIZE));
    }
    dev.stop().expect("serving");
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn quiesce_needs_kernel_support() {
    let ctrl = control();
    let dev = live(&ctrl, DeviceBuilder::new().depth(8));
    let r = ctrl.quiesce_dev(dev.id, 1000);
    if ctrl.features().contains(Features::QUIESCE) {
        // The device was made without user recovery: the kernel refuses.
        let e = r.expect_err("QUIESCE_DEV of a device without recovery");
        assert!(matches!(e, Error::Command { .. }), "{e}");
        eprintln!("QUIESCE_DEV without recovery: {e}");
    } else {
        assert!(!is_sid());
        assert_unsupported(r, Features::QUIESCE);
    }
    dev.stop().expect("serving");
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn try_stop_dev_stops_an_unopened_device() {
    let ctrl = control();
    let mut dev = live(&ctrl, DeviceBuilder::new().depth(8));
    let r = ctrl.try_stop_dev(dev.id);
    if ctrl.features().contains(Features::SAFE_STOP_DEV) {
        r.expect("TRY_STOP_DEV of an unopened device");
        let served = dev
            .wait_run(Duration::from_secs(20))
            .expect("the queues return");
        served.expect("serving");
        assert!(dev.wait_deleted(Duration::from_secs(20)));
        assert_device_gone(dev.id);
    } else {
        let e = r.expect_err("TRY_STOP_DEV on a kernel without it");
        eprintln!("TRY_STOP_DEV on {:?}: {e}", rig_kernel());
        dev.stop().expect("serving");
    }
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn try_stop_dev_refuses_an_opened_device() {
    let ctrl = control();
    if !ctrl.features().contains(Features::SAFE_STOP_DEV) {
        eprintln!("SKIP: the kernel lacks UBLK_F_SAFE_STOP_DEV");
        return;
    }
    let dev = live(&ctrl, DeviceBuilder::new().depth(8));
    let f = std::fs::File::open(dev.block_path()).expect("opening the disk");
    let e = ctrl
        .try_stop_dev(dev.id)
        .expect_err("TRY_STOP_DEV of an open disk");
    assert_eq!(e.errno(), Some(ublk::Errno::BUSY), "{e}");
    drop(f);
    assert!(!dev.is_finished());
    dev.stop().expect("serving");
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn missing_features_are_refused_by_name() {
    let ctrl = control();
    let missing = Features::all() - ctrl.features();
    let modes = [
        CopyMode::UserCopy,
        CopyMode::ZeroCopy,
        CopyMode::AutoBufReg { fallback: false },
    ];
    let mut tried = 0;
    for mode in modes {
        if !missing.contains(mode.features()) {
            continue;
        }
        tried += 1;
        let before = Resources::now();
        let r = DeviceBuilder::new().copy_mode(mode).add(ctrl.clone());
        assert_unsupported(r, mode.features());
        assert_eq!(Resources::now().char_devs, before.char_devs, "{mode:?}");
    }
    if is_trixie() {
        assert!(
            tried >= 2,
            "6.12 lacks zero copy and auto buffer registration"
        );
    }
    if tried == 0 {
        eprintln!("SKIP: the kernel supports every copy mode (no refusal to check)");
    }
    // Whatever the kernel, an unknown-to-it flag set through `flags` is refused too.
    if !missing.is_empty() {
        let r = DeviceBuilder::new().flags(missing).add(ctrl.clone());
        assert!(
            matches!(r, Err(Error::Unsupported { .. }) | Err(Error::Config(_))),
            "{r:?}"
        );
    }
    assert!(wait_absent(
        &ublk::ctrl::char_dev_path(u32::MAX),
        Duration::ZERO
    ));
}

/// Serves `dev` with RAM targets in a thread; the receiver gets `run`'s
/// result once the device was also deleted, and whether it went live.
fn serve_in_background(
    mut dev: ublk::Device,
    make_target: impl Fn(u16) -> std::io::Result<ublk_e2e::MemTarget> + Send + Sync + 'static,
) -> (
    std::sync::mpsc::Receiver<(ublk_e2e::RunResult, bool)>,
    std::sync::mpsc::Receiver<DevInfo>,
) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (live_tx, live_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut went_live = false;
        let r = dev.run(ublk::StartKind::Start, make_target, |info, _| {
            went_live = true;
            let _ = live_tx.send(*info);
        });
        drop(dev);
        let _ = done_tx.send((r, went_live));
    });
    (done_rx, live_rx)
}

fn new_device(ctrl: &Arc<Control>) -> ublk::Device {
    let mut dev = DeviceBuilder::new()
        .queues(2)
        .depth(16)
        .add(ctrl.clone())
        .expect("adding a device");
    let max_io = dev.info().max_io_buf_bytes();
    dev.set_params(&Params::basic(BasicParams::new(CAP, max_io)))
        .expect("setting parameters");
    dev
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn stop_handle_before_start_dev_keeps_the_device_from_starting() {
    let ctrl = control();
    // Stopped before `run`, and stopped from a queue thread while the
    // queues are still being set up: both before START_DEV.
    for during_setup in [false, true] {
        let dev = new_device(&ctrl);
        let id = dev.id();
        let stop = dev.stop_handle();
        if !during_setup {
            stop.stop().expect("stop before run");
        }
        let mem = mem_target(CAP).unwrap();
        let (done, _live) = serve_in_background(dev, move |q| {
            if during_setup && q == 1 {
                stop.stop().map_err(std::io::Error::other)?;
            }
            Ok(mem.clone())
        });
        let (r, went_live) = done
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!("run hung after a stop before START_DEV (during set-up: {during_setup})")
            });
        let stats = r.expect("a stopped device's run is Ok");
        assert!(!went_live, "the device started although stopped first");
        assert_eq!(stats.iter().map(|s| s.requests).sum::<u64>(), 0);
        assert_device_gone(id);
        let e = ctrl.dev_info(id).expect_err("device still exists");
        assert_eq!(e.errno(), Some(ublk::Errno::NODEV), "{e}");
    }
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn stop_handle_stops_a_live_device_that_served_io() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let ctrl = control();
    let dev = new_device(&ctrl);
    let id = dev.id();
    let stop = dev.stop_handle();
    let mem = mem_target(CAP).unwrap();
    let (done, live) = serve_in_background(dev, move |_| Ok(mem.clone()));
    live.recv_timeout(Duration::from_secs(60))
        .expect("the device did not go live");
    let disk = ublk::ctrl::block_dev_path(id);
    assert!(ublk_e2e::wait_block_device(&disk, Duration::from_secs(60)));
    let pattern: Vec<u8> = (0..64 << 10).map(|i| (i * 7 % 251) as u8).collect();
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
        let mut back = vec![0u8; pattern.len()];
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert!(back == pattern, "read back differs");
    }
    // Stopping twice, and after the device is gone, is harmless.
    stop.stop().expect("stopping a live device");
    let stopper = stop.clone();
    std::thread::spawn(move || stopper.stop())
        .join()
        .unwrap()
        .expect("stopping again from another thread");
    let (r, went_live) = done
        .recv_timeout(Duration::from_secs(60))
        .expect("run did not return after StopHandle::stop");
    assert!(went_live);
    let stats = r.expect("run of a stopped device");
    assert!(
        stats.iter().map(|s| s.requests).sum::<u64>() > 0,
        "no request was served: {stats:?}"
    );
    assert_device_gone(id);
    stop.stop().expect("stopping a deleted device does nothing");
}
