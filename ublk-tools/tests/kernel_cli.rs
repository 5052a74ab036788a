//! The `ublk` command against the real driver: the seed's example, file
//! systems, fio verification in every copy mode, bad input, `list` and
//! `features` output. Run in the guest by `cargo xtask test`.

use std::path::Path;
use std::process::Command;

mod common;
use common::*;

fn fio_verify(dev: &str, extra: &str) {
    sh(&format!(
        "fio --name=v --filename={dev} --direct=1 --ioengine=io_uring --rw=randwrite --bsrange=4k-256k \
         --iodepth=32 --size=64M --io_size=16M --verify=crc32c --verify_fatal=1 --do_verify=1 {extra} \
         --output-format=terse --terse-version=3 | awk -F';' '{{ if ($5 != 0) exit 1 }}'"
    ));
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn seed_example_loop_xfs_list_del() {
    let _cleanup = Cleanup;
    let img = image("ublk-loop.img", "512M");
    let out = ok(&["add", "-t", "loop", "-f", img.to_str().unwrap()]);
    let id = first_id(&out);
    let dev = format!("/dev/ublkb{id}");
    sh(&format!(
        "mkfs.xfs -q -f {dev} && mkdir -p /tmp/mnt-seed && mount {dev} /tmp/mnt-seed"
    ));
    sh("cp -a /work/main/ublk-rs /tmp/mnt-seed/ 2>/dev/null || cp -a /usr/share/doc/fio /tmp/mnt-seed/");
    let sums = sh("cd /tmp/mnt-seed && find . -type f -print0 | sort -z | xargs -0 sha256sum");
    sh(&format!(
        "umount /tmp/mnt-seed && mount {dev} /tmp/mnt-seed"
    ));
    assert_eq!(
        sh("cd /tmp/mnt-seed && find . -type f -print0 | sort -z | xargs -0 sha256sum"),
        sums
    );
    sh(&format!("umount /tmp/mnt-seed && xfs_repair -n {dev}"));
    let list = ok(&["list"]);
    assert!(
        list.contains(&format!(
            "dev id {id}: nr_hw_queues 1 queue_depth 128 block size 512 dev_capacity 1048576"
        )),
        "{list}"
    );
    assert!(list.contains("state LIVE"), "{list}");
    assert!(
        list.contains(&format!("\ttarget loop backing_file {}", img.display())),
        "{list}"
    );
    ok(&["del", "-a"]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
    // The data survives `del` and a second `add` of the same file.
    let id = first_id(&ok(&["add", "-t", "loop", img.to_str().unwrap()]));
    sh(&format!("mount /dev/ublkb{id} /tmp/mnt-seed"));
    assert_eq!(
        sh("cd /tmp/mnt-seed && find . -type f -print0 | sort -z | xargs -0 sha256sum"),
        sums
    );
    sh("umount /tmp/mnt-seed");
    ok(&["del", "-n", &id.to_string()]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn ext4_mkfs_fsck_clean() {
    let _cleanup = Cleanup;
    let (_, id) = add_loop("ext4.img", "256M", &["-q", "2"]);
    let dev = format!("/dev/ublkb{id}");
    sh(&format!(
        "mkfs.ext4 -q -F {dev} && mkdir -p /tmp/mnt-e4 && mount {dev} /tmp/mnt-e4"
    ));
    sh("dd if=/dev/urandom of=/tmp/mnt-e4/blob bs=1M count=20 status=none && sync");
    let sum = sh("sha256sum /tmp/mnt-e4/blob");
    sh(&format!("umount /tmp/mnt-e4 && fsck.ext4 -n -f {dev}"));
    sh(&format!("mount {dev} /tmp/mnt-e4"));
    assert_eq!(sh("sha256sum /tmp/mnt-e4/blob"), sum);
    sh("fstrim -v /tmp/mnt-e4 || true; umount /tmp/mnt-e4");
    ok(&["del", "-n", &id.to_string()]);
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn fio_verify_in_every_copy_mode() {
    let _cleanup = Cleanup;
    let img = image("fio.img", "128M");
    let modes: &[(&[&str], &str)] = &[
        (&[], ""),
        (&["-u"], "UBLK_F_USER_COPY"),
        (&["-z"], "UBLK_F_SUPPORT_ZERO_COPY"),
        (&["--auto_zc"], "UBLK_F_AUTO_BUF_REG"),
        (&["-g"], "UBLK_F_NEED_GET_DATA"),
        (&["-q", "2"], ""),
        (&["-b"], "UBLK_F_BATCH_IO"),
        (&["-b", "--auto_zc", "-q", "2"], "UBLK_F_BATCH_IO"),
        (&["-b", "-u"], "UBLK_F_BATCH_IO"),
        (
            &["-q", "2", "--nthreads", "3", "--per_io_tasks"],
            "UBLK_F_PER_IO_DAEMON",
        ),
        (
            &["--nthreads", "2", "--per_io_tasks", "-z"],
            "UBLK_F_PER_IO_DAEMON",
        ),
        // kublk's spelling of auto registration with a manual fallback.
        (
            &["-z", "--auto_zc", "--auto_zc_fallback"],
            "UBLK_F_AUTO_BUF_REG",
        ),
        // The char device not a fixed file of the queue rings.
        (&["--no_ublk_fixed_fd", "-q", "2"], ""),
        (&["--no_ublk_fixed_fd", "-b"], "UBLK_F_BATCH_IO"),
        (&["--no_ublk_fixed_fd", "-z"], "UBLK_F_SUPPORT_ZERO_COPY"),
    ];
    for (opts, feature) in modes {
        if !feature.is_empty() && !has_feature(feature) {
            println!("SKIP: {opts:?}: the kernel lacks {feature}");
            continue;
        }
        let mut args = vec!["add", "-t", "loop", "--quiet"];
        args.extend_from_slice(opts);
        args.push(img.to_str().unwrap());
        ok(&args);
        let id = first_id(&ok(&["list"]));
        println!("fio verify with {opts:?}");
        fio_verify(&format!("/dev/ublkb{id}"), "");
        ok(&["del", "-n", &id.to_string()]);
    }
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn null_queue_limits_are_kublks_unless_given() {
    let _cleanup = Cleanup;
    let limits = |id: u32| {
        ["dma_alignment", "max_segments", "max_segment_size"].map(|f| {
            sh(&format!("cat /sys/block/ublkb{id}/queue/{f}"))
                .trim()
                .to_owned()
        })
    };
    // UBLK_PARAM_TYPE_DMA_ALIGN and _SEGMENT came with Linux 6.14; 6.12
    // ignores them (a null device still works there: the tests of the
    // null target show it).
    if guest_kernel() == "trixie" {
        println!(
            "SKIP: {} has no DMA alignment and segment parameters",
            guest_kernel()
        );
        return;
    }
    let id = first_id(&ok(&["add", "-t", "null"]));
    assert_eq!(limits(id), ["4095", "32", "32768"]);
    let id = first_id(&ok(&[
        "add",
        "-t",
        "null",
        "--dma_alignment",
        "511",
        "--seg_boundary_mask",
        "0xffffffff",
        "--max_segment_size",
        "64K",
        "--max_segments",
        "64",
    ]));
    assert_eq!(limits(id), ["511", "64", "65536"]);
    sh(&format!("fio --name=r --filename=/dev/ublkb{id} --direct=1 --ioengine=io_uring --rw=randread --bs=1M --iodepth=4 --size=1G --io_size=16M --output-format=terse > /dev/null"));
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn recovery_options_imply_user_recovery_as_in_kublk() {
    let _cleanup = Cleanup;
    for (opt, feature) in [
        ("-e", "UBLK_F_USER_RECOVERY_FAIL_IO"),
        ("-i", "UBLK_F_USER_RECOVERY_REISSUE"),
    ] {
        if !has_feature(feature) {
            println!("SKIP: {opt} 1: the kernel lacks {feature}");
            continue;
        }
        let id = first_id(&ok(&["add", "-t", "null", opt, "1"]));
        let flags = json(id)["flags"].as_u64().unwrap();
        assert_ne!(
            flags & ublk_sys::UBLK_F_USER_RECOVERY,
            0,
            "{opt} 1: {flags:#x}"
        );
        ok(&["del", "-n", &id.to_string()]);
    }
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn null_target_and_piped_add_returns() {
    let _cleanup = Cleanup;
    // The daemon must not hold the caller's stdout: this pipeline returns.
    let out = sh(&format!(
        "{} add -t null -q 2 | grep 'dev id'",
        env!("CARGO_BIN_EXE_ublk")
    ));
    let id = first_id(&out);
    sh(&format!("fio --name=r --filename=/dev/ublkb{id} --direct=1 --ioengine=io_uring --rw=randread --bs=4k --iodepth=32 --size=1G --io_size=64M --output-format=terse > /dev/null"));
    let json = ok(&["list", "-n", &id.to_string(), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["dev_id"], id);
    assert_eq!(v[0]["nr_hw_queues"], 2);
    assert_eq!(v[0]["dev_capacity"], 250u64 << 21);
    assert_eq!(v[0]["state"], "LIVE");
    assert_eq!(v[0]["target"], "null");
    ok(&["del", "-n", &id.to_string()]);
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn io_scheduler_is_none_unless_asked_and_requests_time_out_in_1_s() {
    let _cleanup = Cleanup;
    let sched = |id: u32| sh(&format!("cat /sys/block/ublkb{id}/queue/scheduler"));
    let id = first_id(&ok(&["add", "-t", "null"]));
    assert!(sched(id).contains("[none]"), "{}", sched(id));
    // And a 1 s request timeout, to notice a dead server on Linux 6.12.
    assert_eq!(
        sh(&format!("cat /sys/block/ublkb{id}/queue/io_timeout")).trim(),
        "1000"
    );
    // The kernel's own choice for a single-queue disk.
    let kept = first_id(&ok(&["add", "-t", "null", "--io_scheduler", "default"]));
    assert!(sched(kept).contains("[mq-deadline]"), "{}", sched(kept));
    let chosen = first_id(&ok(&[
        "add",
        "-t",
        "null",
        "-q",
        "2",
        "--io_scheduler",
        "mq-deadline",
    ]));
    assert!(sched(chosen).contains("[mq-deadline]"), "{}", sched(chosen));
    ok(&["del", "-a"]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn kill_daemon_without_recovery_removes_device() {
    let _cleanup = Cleanup;
    let id = first_id(&ok(&["add", "-t", "null"]));
    let pid = daemon_pid(id);
    // The daemon leads a session of its own (setsid, as kublk's and
    // rublk's do): no terminal's signals reach it, and the scheduler's
    // autogroup keeps its queue threads apart from the I/O load's group.
    let daemon = rustix::process::Pid::from_raw(pid);
    assert_eq!(
        rustix::process::getsid(daemon).ok(),
        daemon,
        "the daemon's session"
    );
    sh(&format!("kill -9 {pid}"));
    wait_until("/dev/ublkb to go after kill -9", 20, || {
        !Path::new(&format!("/dev/ublkb{id}")).exists()
    });
    ok(&["del", "-n", &id.to_string()]);
    wait_until("/dev/ublkc to go", 10, || {
        !Path::new(&format!("/dev/ublkc{id}")).exists()
    });
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn features_output_names_every_bit() {
    let _cleanup = Cleanup;
    let out = ok(&["features"]);
    let mut lines = out.lines();
    let first = lines.next().unwrap();
    let mask =
        u64::from_str_radix(first.strip_prefix("ublk_drv features: 0x").unwrap(), 16).unwrap();
    let names: Vec<&str> = lines.map(str::trim).collect();
    assert_eq!(names.len(), mask.count_ones() as usize);
    assert!(names.iter().all(|n| n.starts_with("UBLK_F_")), "{names:?}");
    match guest_kernel().as_str() {
        "sid" => assert_eq!(mask & 0xfffff, 0xfffff),
        "trixie" => assert_eq!(mask, 0x1fe),
        _ => {}
    }
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn bad_input_one_line_no_device_left() {
    let _cleanup = Cleanup;
    let dir = image("x", "1M");
    let dir = dir.parent().unwrap();
    let empty = image("empty.img", "0");
    let odd = image("odd.img", "1000");
    let d = dir.to_str().unwrap();
    fails(
        &["add", "-t", "loop", "-f", "/nonexistent.img"],
        "backing file /nonexistent.img does not exist",
    );
    fails(&["add", "-t", "loop", "-f", d], "is a directory");
    fails(
        &["add", "-t", "loop", "-f", empty.to_str().unwrap()],
        "is empty",
    );
    fails(
        &["add", "-t", "loop", "-f", odd.to_str().unwrap()],
        "not a multiple of the logical block size",
    );
    fails(&["add", "-t", "loop"], "needs a backing file");
    fails(&["add", "-t", "null", "-d", "0"], "queue depth 0");
    fails(&["add", "-t", "null", "-d", "5000"], "queue depth 5000");
    fails(&["add", "-t", "null", "-q", "0"], "number of queues 0");
    fails(
        &["add", "-t", "null", "--nthreads", "2"],
        "needs --per_io_tasks",
    );
    fails(
        &["add", "-t", "null", "-b", "-g"],
        "does not work with NEED_GET_DATA",
    );
    fails(&["del", "-n", "977"], "device 977 does not exist");
    fails(
        &["recover", "-n", "977", "-t", "null"],
        "device 977 does not exist",
    );
    let id = first_id(&ok(&["add", "-t", "null"]));
    fails(
        &["add", "-t", "null", "-n", &id.to_string()],
        &format!("device id {id} is already in use"),
    );
    ok(&["del", "-n", &id.to_string()]);
    if guest_kernel() == "trixie" {
        fails(
            &["add", "-t", "null", "--auto_zc"],
            "does not support UBLK_F_AUTO_BUF_REG",
        );
        fails(
            &["add", "-t", "null", "-z"],
            "does not support UBLK_F_SUPPORT_ZERO_COPY",
        );
        fails(
            &["add", "-t", "null", "--nthreads", "2", "--per_io_tasks"],
            "does not support UBLK_F_PER_IO_DAEMON",
        );
        fails(
            &["add", "-t", "null", "-b"],
            "does not support UBLK_F_BATCH_IO",
        );
    }
    let o = Command::new(env!("CARGO_BIN_EXE_ublk"))
        .args(["add", "-t", "raid"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    wait_until("no device left behind", 10, || ublk_nodes().is_empty());
}

/// Runs `ublk args` with stdout a pipe whose reader is gone, as in
/// `ublk list | head -0` once head has exited.
fn with_closed_stdout(args: &[&str]) -> std::process::Output {
    let (reader, writer) = rustix::pipe::pipe().expect("pipe");
    drop(reader);
    Command::new(bin())
        .args(args)
        .stdout(std::process::Stdio::from(writer))
        .output()
        .expect("run ublk")
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn a_closed_stdout_ends_list_features_and_add_quietly() {
    let _cleanup = Cleanup;
    let id = first_id(&ok(&["add", "-t", "null"]));
    for args in [
        &["list"][..],
        &["list", "--json"],
        &["list", "-a"],
        &["features"],
    ] {
        let o = with_closed_stdout(args);
        assert_eq!(o.status.code(), Some(0), "ublk {args:?}: {o:?}");
        assert!(o.stderr.is_empty(), "ublk {args:?}: {o:?}");
    }
    // add prints after the device is made: the device is whole and served.
    let before = ublk_nodes();
    let o = with_closed_stdout(&["add", "-t", "null", "-q", "2"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(o.stderr.is_empty(), "{o:?}");
    let list = ok(&["list"]);
    let new: Vec<u32> = list
        .lines()
        .filter_map(|l| l.strip_prefix("dev id ")?.split(':').next()?.parse().ok())
        .filter(|&n| n != id)
        .collect();
    assert_eq!(new.len(), 1, "{list}");
    assert_eq!(dev_state(new[0]), "LIVE");
    assert_eq!(json(new[0])["nr_hw_queues"], 2);
    assert!(ublk_nodes().len() > before.len());
    // The pipelines of the issue, through a shell (POSIX: no PIPESTATUS).
    let st = scratch().join("pipe-status");
    let out = sh_out(&format!(
        "{{ {0} list --json; echo $? > {1}.a; }} | head -0; {{ {0} features; echo $? > {1}.b; }} | true; cat {1}.a {1}.b",
        bin(),
        st.display()
    ));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0\n0\n");
    assert!(out.stderr.is_empty(), "{out:?}");
    ok(&["del", "-a"]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

/// Lazily unmounts a mount point when dropped (before the devices on it
/// are deleted, so a lazy one).
struct Unmount(String);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", &self.0]).status();
    }
}

/// The kernel log since `marker` was written to /dev/kmsg.
fn dmesg_since(marker: &str) -> String {
    let all = sh("dmesg");
    match all.rfind(marker) {
        Some(i) => all[i + marker.len()..].to_owned(),
        None => all,
    }
}

fn queue_limit(id: u32, name: &str) -> u64 {
    sh(&format!("cat /sys/block/ublkb{id}/queue/{name}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn loop_on_tmpfs_offers_no_write_zeroes_and_mkfs_xfs_logs_no_error() {
    let _cleanup = Cleanup;
    // On the guest's /tmp (ext4) the file zeroes ranges: WRITE_ZEROES is on.
    let (_, id) = add_loop("wz.img", "64M", &[]);
    assert!(queue_limit(id, "write_zeroes_max_bytes") > 0);
    assert!(queue_limit(id, "discard_max_bytes") > 0);
    ok(&["del", "-n", &id.to_string()]);

    let mnt = format!("/tmp/mnt-tmpfs-{}", std::process::id());
    sh(&format!(
        "mkdir -p {mnt} && mount -t tmpfs -o size=600M tmpfs {mnt} && truncate -s 512M {mnt}/disk.img"
    ));
    let _unmount = Unmount(mnt.clone());
    let id = first_id(&ok(&["add", "-t", "loop", &format!("{mnt}/disk.img")]));
    // tmpfs punches holes (discard) but cannot zero ranges.
    assert_eq!(queue_limit(id, "write_zeroes_max_bytes"), 0);
    assert!(queue_limit(id, "discard_max_bytes") > 0);
    let marker = format!("ublk-test-mkfs-xfs-on-tmpfs-{}", std::process::id());
    sh(&format!("echo {marker} > /dev/kmsg"));
    sh(&format!("mkfs.xfs -q -f /dev/ublkb{id}"));
    sh(&format!("xfs_repair -n /dev/ublkb{id}"));
    let log = dmesg_since(&marker);
    assert!(
        !log.contains("operation not supported error"),
        "the kernel logged: {log}"
    );
    ok(&["del", "-n", &id.to_string()]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn ublk_null_and_ublk_loop_add_devices_through_their_daemon() {
    let _cleanup = Cleanup;
    // `add` runs its own executable again as the daemon: here the wrapper.
    let o = Command::new(env!("CARGO_BIN_EXE_ublk-null"))
        .args(["-q", "2"])
        .output()
        .expect("run ublk-null");
    let null = first_id(&succeeded("ublk-null -q 2", o));
    let img = image("wrapper.img", "64M");
    let o = Command::new(env!("CARGO_BIN_EXE_ublk-loop"))
        .arg(&img)
        .output()
        .expect("run ublk-loop");
    let lo = first_id(&succeeded("ublk-loop FILE", o));
    for (id, target) in [(null, "null"), (lo, "loop")] {
        assert_eq!(dev_state(id), "LIVE");
        assert_eq!(json(id)["target"], target);
    }
    assert_eq!(json(null)["nr_hw_queues"], 2);
    sh(&format!(
        "dd if=/dev/zero of=/dev/ublkb{lo} bs=64k count=16 oflag=direct status=none"
    ));
    ok(&["del", "-a"]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}
