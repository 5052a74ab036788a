//! The stripe and fault_inject targets against the real driver: fio
//! verification of a stripe in every copy mode, where its chunks land,
//! a fault_inject device's delay (a lower bound only: guests are slow),
//! its errors as dd and a file system see them, and `--die_during_fetch`;
//! batch I/O with fewer or more threads than queues.
//! Run in the guest by `cargo xtask test`.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::*;

fn fio_verify(dev: &str) {
    sh(&format!(
        "fio --name=v --filename={dev} --direct=1 --ioengine=io_uring --rw=randwrite --bsrange=4k-256k \
         --iodepth=32 --size=48M --io_size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 \
         --output-format=terse --terse-version=3 | awk -F';' '{{ if ($5 != 0) exit 1 }}'"
    ));
}

fn images(prefix: &str, n: usize, size: &str) -> Vec<PathBuf> {
    (0..n)
        .map(|i| image(&format!("{prefix}{i}.img"), size))
        .collect()
}

fn paths(files: &[PathBuf]) -> Vec<&str> {
    files.iter().map(|f| f.to_str().unwrap()).collect()
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn stripe_fio_verify_in_every_copy_mode() {
    let _cleanup = Cleanup;
    type Mode = (&'static [&'static str], &'static str);
    let every: &[Mode] = &[
        (&[], ""),
        (&["-u"], "UBLK_F_USER_COPY"),
        (&["-z"], "UBLK_F_SUPPORT_ZERO_COPY"),
        (&["--auto_zc"], "UBLK_F_AUTO_BUF_REG"),
        (&["-q", "2", "-b"], "UBLK_F_BATCH_IO"),
    ];
    // Two files with small chunks in every mode; three with large ones
    // in the default mode and with zero copy (its entries hard-linked
    // after the registration). The guest is slow: this is the minimum.
    let layouts: &[(usize, &str, &[Mode])] =
        &[(2, "8K", every), (3, "128K", &[every[0], every[2]])];
    let mut ran = 0;
    for &(n, chunk, modes) in layouts {
        let files = images(&format!("stripe{n}-"), n, "24M");
        for (opts, feature) in modes {
            if !feature.is_empty() && !has_feature(feature) {
                println!("SKIP: stripe {opts:?}: the kernel lacks {feature}");
                continue;
            }
            let mut args = vec!["add", "-t", "stripe", "--quiet", "--chunk_size", chunk];
            args.extend_from_slice(opts);
            args.extend(paths(&files));
            ok(&args);
            let id = first_id(&ok(&["list"]));
            let list = ok(&["list", "-n", &id.to_string()]);
            assert!(
                list.contains(&format!(
                    "\ttarget stripe backing_files {} chunk_size {}",
                    paths(&files).join(" "),
                    ublk::parse_size(chunk).unwrap()
                )),
                "{list}"
            );
            assert!(
                list.contains(&format!("dev_capacity {}", n as u64 * 24 * 2048)),
                "{list}"
            );
            println!("fio verify on a stripe of {n} files, chunk {chunk}, {opts:?}");
            fio_verify(&format!("/dev/ublkb{id}"));
            ok(&["del", "-n", &id.to_string()]);
            ran += 1;
        }
    }
    assert!(ran >= 2, "the default copy mode must always run");
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn stripe_chunks_land_in_their_files_and_ext4_checks_clean() {
    let _cleanup = Cleanup;
    let files = images("layout", 3, "16M");
    let mut args = vec!["add", "-t", "stripe", "--chunk_size", "64K"];
    args.extend(paths(&files));
    let id = first_id(&ok(&args));
    let dev = format!("/dev/ublkb{id}");
    // Chunk k (64 KiB) holds the byte k; chunk k is chunk k / 3 of file k % 3.
    for k in 0..7 {
        sh(&format!(
            "head -c 65536 /dev/zero | tr '\\0' '\\{k:03o}' | dd of={dev} bs=64K seek={k} oflag=direct conv=notrunc status=none"
        ));
    }
    sh(&format!("sync; blockdev --flushbufs {dev}"));
    for k in 0..7u64 {
        let file = files[(k % 3) as usize].display();
        let at = k / 3;
        let got = sh(&format!(
            "dd if={file} bs=64K skip={at} count=1 status=none | od -An -tu1 -v | tr -s ' \\n' '\\n' | sort -u | grep -v '^$'"
        ));
        assert_eq!(
            got.trim(),
            k.to_string(),
            "chunk {k} in {file} at chunk {at}"
        );
    }
    // A file system on it, checked after a remount.
    sh(&format!(
        "mkfs.ext4 -q -F {dev} && mkdir -p /tmp/mnt-stripe && mount {dev} /tmp/mnt-stripe && \
         dd if=/dev/urandom of=/tmp/mnt-stripe/blob bs=1M count=12 status=none && sync"
    ));
    let sum = sh("sha256sum /tmp/mnt-stripe/blob");
    sh(&format!("umount /tmp/mnt-stripe && fsck.ext4 -n -f {dev}"));
    sh(&format!("mount {dev} /tmp/mnt-stripe"));
    assert_eq!(sh("sha256sum /tmp/mnt-stripe/blob"), sum);
    sh("umount /tmp/mnt-stripe");
    ok(&["del", "-n", &id.to_string()]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn stripe_bad_files_leave_nothing() {
    let _cleanup = Cleanup;
    let a = image("bad-a.img", "16M");
    let b = image("bad-b.img", "32M");
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    fails(
        &["add", "-t", "stripe", a, b],
        "stripe files must be the same size in whole 65536-byte chunks",
    );
    fails(
        &["add", "-t", "stripe", a, "/nonexistent.img"],
        "backing file /nonexistent.img does not exist",
    );
    assert!(ublk_nodes().is_empty(), "{:?}", ublk_nodes());
    assert!(daemons().is_empty(), "{:?}", daemons());
    assert!(state_files().is_empty(), "{:?}", state_files());
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn fault_inject_delays_each_request() {
    let _cleanup = Cleanup;
    let id = first_id(&ok(&[
        "add",
        "-t",
        "fault_inject",
        "-q",
        "1",
        "-d",
        "1",
        "--delay_us",
        "200000",
    ]));
    // Three queue-depth-1 reads, one after another: at least 3 × 200 ms
    // (a lower bound only: a slow machine takes longer, never shorter).
    let t = Instant::now();
    sh(&format!(
        "dd if=/dev/ublkb{id} of=/dev/null bs=4k count=3 iflag=direct status=none"
    ));
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(600), "{took:?}");
    // The queue serves meanwhile: a delay is a timeout, not a sleep, so
    // it stops at once.
    ok(&["del", "-n", &id.to_string()]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

/// Reads (or writes) 4 KiB at `offset` of `dev` with O_DIRECT; whether it
/// succeeded and what dd said.
fn dd_4k(dev: &str, offset_4k: u64, write: bool) -> (bool, String) {
    let cmd = if write {
        format!("dd if=/dev/zero of={dev} bs=4k seek={offset_4k} count=1 oflag=direct conv=notrunc status=none")
    } else {
        format!("dd if={dev} of=/dev/null bs=4k skip={offset_4k} count=1 iflag=direct status=none")
    };
    let o = sh_out(&cmd);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn fault_inject_fails_a_range_and_a_rate() {
    let _cleanup = Cleanup;
    // Bytes 1 MiB .. 1 MiB + 64 KiB are bad: 4 KiB blocks 256..=271.
    let id = first_id(&ok(&[
        "add",
        "-t",
        "fault_inject",
        "-s",
        "8M",
        "--error_range",
        "1M:64K",
    ]));
    let dev = format!("/dev/ublkb{id}");
    for block in [0, 255, 272, 1000] {
        assert!(dd_4k(&dev, block, false).0, "read of block {block} failed");
        assert!(dd_4k(&dev, block, true).0, "write of block {block} failed");
    }
    for block in [256, 263, 271] {
        let (good, err) = dd_4k(&dev, block, false);
        assert!(!good, "read of bad block {block} succeeded");
        assert!(err.contains("Input/output error"), "{err}");
        assert!(
            !dd_4k(&dev, block, true).0,
            "write of bad block {block} succeeded"
        );
    }
    ok(&["del", "-n", &id.to_string()]);
    // Half of all requests fail: of 20 reads, some do and some don't.
    let id = first_id(&ok(&["add", "-t", "fault_inject", "--error_rate", "50"]));
    let dev = format!("/dev/ublkb{id}");
    let failed = (0..20).filter(|&b| !dd_4k(&dev, b, false).0).count();
    assert!((2..=18).contains(&failed), "{failed} of 20 failed");
    ok(&["del", "-n", &id.to_string()]);
    // None with rate 0, all with 100.
    let id = first_id(&ok(&["add", "-t", "fault_inject", "--error_rate", "100"]));
    assert!(!dd_4k(&format!("/dev/ublkb{id}"), 7, false).0);
    ok(&["del", "-n", &id.to_string()]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn a_file_system_sees_the_bad_range_of_a_fault_inject_disk() {
    let _cleanup = Cleanup;
    let img = image("faulty.img", "64M");
    let img_s = img.to_str().unwrap();
    // A file system with two files, made through a plain loop device.
    let id = first_id(&ok(&["add", "-t", "loop", img_s]));
    let dev = format!("/dev/ublkb{id}");
    sh(&format!(
        "mkfs.ext4 -q -F -b 4096 {dev} && mkdir -p /tmp/mnt-fi && mount {dev} /tmp/mnt-fi && \
         dd if=/dev/urandom of=/tmp/mnt-fi/victim bs=64K count=1 status=none && \
         dd if=/dev/urandom of=/tmp/mnt-fi/bystander bs=64K count=1 status=none && sync"
    ));
    let sum = sh("sha256sum < /tmp/mnt-fi/bystander");
    // Where the victim's data is: its first physical 4 KiB block.
    let extents = sh("filefrag -v -b4096 /tmp/mnt-fi/victim");
    let block: u64 = extents
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"0:"))
                .then(|| f.get(3)?.trim_end_matches(['.', ':']).parse().ok())?
        })
        .unwrap_or_else(|| panic!("no first extent in {extents}"));
    sh("umount /tmp/mnt-fi");
    ok(&["del", "-n", &id.to_string()]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
    // The same image, its victim's blocks now bad.
    let range = format!("{}:64K", block * 4096);
    let id = first_id(&ok(&[
        "add",
        "-t",
        "fault_inject",
        "--error_range",
        &range,
        img_s,
    ]));
    let list = ok(&["list", "-n", &id.to_string()]);
    assert!(
        list.contains(&format!("\ttarget fault_inject backing_file {img_s}")),
        "{list}"
    );
    let dev = format!("/dev/ublkb{id}");
    sh(&format!("mount {dev} /tmp/mnt-fi"));
    let o = sh_out("cat /tmp/mnt-fi/victim > /dev/null");
    assert!(!o.status.success(), "reading the victim succeeded");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(sh("sha256sum < /tmp/mnt-fi/bystander"), sum);
    sh("umount /tmp/mnt-fi");
    ok(&["del", "-n", &id.to_string()]);
    wait_until("the device nodes to go", 10, || ublk_nodes().is_empty());
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn die_during_fetch_exits_and_leaves_nothing() {
    let _cleanup = Cleanup;
    // kublk's test_generic_17: a recoverable device whose server dies,
    // then a recovery whose server dies while fetching.
    let id = first_id(&ok(&["add", "-t", "fault_inject", "-r", "1"]));
    kill9(id);
    wait_state(id, "QUIESCED", 20);
    let o = ublk(&[
        "recover",
        "-n",
        &id.to_string(),
        "--foreground",
        "-t",
        "fault_inject",
        "--die_during_fetch",
        "1",
    ]);
    assert_eq!(o.status.signal(), Some(9), "{:?}", o);
    // Deleting works once the driver has torn the dead server down.
    ok(&["del", "-n", &id.to_string()]);
    wait_until("the device nodes to go", 20, || ublk_nodes().is_empty());
    assert!(daemons().is_empty(), "{:?}", daemons());
    assert!(
        !Path::new(&format!("/run/ublk/ublk{id}.json")).exists(),
        "{:?}",
        state_files()
    );
    // Through a daemon, `add` says the daemon died, and no device is left.
    let o = ublk(&["add", "-t", "fault_inject", "--die_during_fetch", "1"]);
    expect_fail("add --die_during_fetch 1", &o, "the daemon exited");
    wait_until("the device nodes to go", 20, || ublk_nodes().is_empty());
    assert!(daemons().is_empty(), "{:?}", daemons());
    assert!(state_files().is_empty(), "{:?}", state_files());
}

/// Shared-memory zero copy from a hugetlbfs buffer (kublk's `--shmem_zc
/// --htlb FILE`): fio takes its buffers from the same file and verifies
/// what it wrote, on loop, and on null with the buffer registered
/// read-only; the daemon's statistics show requests served in place.
#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn shmem_zero_copy_from_a_hugetlbfs_buffer() {
    if skip("shmem_zero_copy_from_a_hugetlbfs_buffer", "UBLK_F_SHMEM_ZC") {
        return;
    }
    let _cleanup = Cleanup;
    let old_pages = sh("cat /proc/sys/vm/nr_hugepages");
    sh("echo 10 > /proc/sys/vm/nr_hugepages");
    let pages: u32 = sh("cat /proc/sys/vm/nr_hugepages")
        .trim()
        .parse()
        .unwrap_or(0);
    if pages < 2 {
        println!("SKIP: shmem zero copy: no huge pages ({pages} allocated)");
        sh(&format!(
            "echo {} > /proc/sys/vm/nr_hugepages",
            old_pages.trim()
        ));
        return;
    }
    let mnt = scratch().join("htlb");
    std::fs::create_dir_all(&mnt).unwrap();
    sh(&format!("mount -t hugetlbfs none {}", mnt.display()));
    let buf = mnt.join("ublk_buf");
    sh(&format!("fallocate -l 4M {}", buf.display()));
    let img = image("shmem.img", "64M");
    let log = Path::new("/run/ublk/daemon.log");
    let cases: [(&str, Vec<&str>); 2] = [
        ("loop", vec![img.to_str().unwrap()]),
        ("null", vec!["--rdonly_shmem_buf"]),
    ];
    for (target, extra) in cases {
        let before = std::fs::read_to_string(log).map_or(0, |l| l.len());
        let mut args = vec![
            bin().to_owned(),
            "add".into(),
            "-t".into(),
            target.into(),
            "--shmem_zc".into(),
            "--htlb".into(),
            buf.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        // The daemon logs its per-queue statistics at info level.
        let id = first_id(&sh(&format!("RUST_LOG=info {}", args.join(" "))));
        let dev = format!("/dev/ublkb{id}");
        let fio = format!(
            "fio --name=shm --filename={dev} --direct=1 --ioengine=io_uring --rw=randwrite \
             --bs=4k --size=4M --iodepth=32 --mem=mmaphuge:{} --output-format=terse \
             --terse-version=3",
            buf.display()
        );
        if target == "loop" {
            sh(&format!(
                "{fio} --verify=crc32c --verify_fatal=1 --do_verify=1 | awk -F';' '{{ if ($5 != 0) exit 1 }}'"
            ));
        } else {
            sh(&format!("{fio} | awk -F';' '{{ if ($5 != 0) exit 1 }}'"));
        }
        ok(&["del", "-n", &id.to_string()]);
        wait_until("the daemon to log its statistics", 10, || {
            std::fs::read_to_string(log)
                .is_ok_and(|l| l[before.min(l.len())..].contains("in shared memory"))
        });
        let text = std::fs::read_to_string(log).unwrap();
        let in_place: u64 = text[before..]
            .split(" in shared memory")
            .filter_map(|part| part.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert!(
            in_place > 0,
            "{target}: no request was served in shared memory:\n{}",
            &text[before..]
        );
    }
    let _ = std::fs::remove_file(&buf);
    sh(&format!("umount {}", mnt.display()));
    sh(&format!(
        "echo {} > /proc/sys/vm/nr_hugepages",
        old_pages.trim()
    ));
}

/// The names of the daemon `pid`'s queue threads (`ublk{id}q{q}`).
fn queue_threads(pid: i32, id: u32) -> Vec<String> {
    let prefix = format!("ublk{id}q");
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_owned())
        .filter(|c| c.starts_with(&prefix))
        .collect();
    names.sort();
    names
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn batch_threads_serve_whole_queues() {
    if skip("batch_threads_serve_whole_queues", "UBLK_F_BATCH_IO") {
        return;
    }
    let _cleanup = Cleanup;
    // kublk's batch_02 (threads over one queue) and batch_03 (one thread
    // for every queue), and a thread with two queues beside one with one
    // where the kernel gives three queues (it gives no more than CPUs).
    for (queues, threads) in [("4", "1"), ("3", "2"), ("1", "4")] {
        let (_, id) = add_loop(
            &format!("batch-{queues}-{threads}.img"),
            "64M",
            &["-b", "-q", queues, "--nthreads", threads],
        );
        // The kernel may give fewer queues than asked (no more than CPUs).
        let nr = json(id)["nr_hw_queues"].as_u64().unwrap() as usize;
        let want = nr.min(threads.parse().unwrap());
        let names = queue_threads(daemon_pid(id), id);
        assert_eq!(
            names.len(),
            want,
            "-q {queues} --nthreads {threads}: {nr} queues served by {names:?}"
        );
        // `list` names a serving thread for every queue.
        let tids: Vec<i64> = json(id)["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["tid"].as_i64().unwrap())
            .collect();
        assert!(tids.len() == nr && tids.iter().all(|&t| t > 0), "{tids:?}");
        println!(
            "-b -q {queues} --nthreads {threads}: {nr} queues, threads {names:?}, tids {tids:?}"
        );
        // Two jobs, each on its own half, so both CPUs (and so several
        // queues) submit.
        sh(&format!(
            "fio --name=v --filename=/dev/ublkb{id} --direct=1 --ioengine=io_uring --rw=randwrite \
             --bsrange=4k-128k --iodepth=16 --numjobs=2 --size=32M --offset_increment=32M \
             --io_size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 \
             --output-format=terse --terse-version=3 \
             | awk -F';' '/^3;/ {{ n++; if ($5 != 0) bad = 1 }} END {{ exit bad || n != 2 }}'"
        ));
        ok(&["del", "-n", &id.to_string()]);
    }
}

fn sysfs(id: u32, attr: &str) -> String {
    std::fs::read_to_string(format!("/sys/block/ublkb{id}/integrity/{attr}"))
        .unwrap_or_else(|e| panic!("ublkb{id} integrity/{attr}: {e}"))
        .trim()
        .to_owned()
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn integrity_parameters_reach_the_block_layer() {
    if skip(
        "integrity_parameters_reach_the_block_layer",
        "UBLK_F_INTEGRITY",
    ) {
        return;
    }
    let _cleanup = Cleanup;
    // (options, format, device_is_integrity_capable, tag_size)
    let cases: &[(&[&str], &str, &str, &str)] = &[
        (&["--metadata_size", "8"], "nop", "0", "0"),
        (
            &[
                "--metadata_size",
                "64",
                "--pi_offset",
                "56",
                "--csum_type",
                "ip",
                "--integrity_capable",
            ],
            "T10-DIF-TYPE3-IP",
            "1",
            "0",
        ),
        (
            &[
                "--metadata_size",
                "8",
                "--csum_type",
                "t10dif",
                "--integrity_reftag",
            ],
            "T10-DIF-TYPE1-CRC",
            "0",
            "0",
        ),
        (
            &[
                "--metadata_size",
                "16",
                "--csum_type",
                "nvme",
                "--tag_size",
                "8",
            ],
            "EXT-DIF-TYPE3-CRC64",
            "0",
            "8",
        ),
    ];
    for &(opts, format, capable, tag_size) in cases {
        let mut args = vec!["add", "-t", "null", "-u", "--size", "64M"];
        args.extend_from_slice(opts);
        let out = ok(&args);
        let id = first_id(&out);
        assert!(out.contains("\tintegrity metadata_size "), "{out}");
        assert_eq!(
            (
                sysfs(id, "format"),
                sysfs(id, "device_is_integrity_capable"),
                sysfs(id, "tag_size")
            ),
            (format.to_owned(), capable.to_owned(), tag_size.to_owned()),
            "{opts:?}"
        );
        assert_eq!(sysfs(id, "protection_interval_bytes"), "512");
        // The null target's reads carry "no protection information" metadata,
        // which the block layer accepts whatever the format.
        sh(&format!(
            "dd if=/dev/ublkb{id} of=/dev/null bs=64k count=16 iflag=direct status=none"
        ));
        ok(&["del", "-n", &id.to_string()]);
    }
    // Refused by the kernel's rules, before any device exists.
    fails(
        &[
            "add",
            "-t",
            "null",
            "-u",
            "--metadata_size",
            "8",
            "--csum_type",
            "nvme",
        ],
        "the 16-byte protection information at offset 0 does not fit in 8 bytes of metadata",
    );
    assert!(ublk_nodes().is_empty(), "{:?}", ublk_nodes());
}

#[test]
#[ignore = "needs ublk_drv: run with cargo xtask test"]
fn integrity_metadata_round_trips_through_a_loop_device() {
    if skip(
        "integrity_metadata_round_trips_through_a_loop_device",
        "UBLK_F_INTEGRITY",
    ) {
        return;
    }
    let _cleanup = Cleanup;
    // kublk's integrity_03 layout: 64 bytes per block, NVMe PI at 48, the
    // reference tag checked. The block layer makes and checks the PI; we
    // only carry it, so a verify that passes proves the round trip.
    let data = image("integrity-data.img", "64M");
    let meta = image("integrity-meta.img", "8M");
    let (d, m) = (data.to_str().unwrap(), meta.to_str().unwrap());
    let pi = [
        "-u",
        "-r",
        "1",
        "--metadata_size",
        "64",
        "--pi_offset",
        "48",
        "--csum_type",
        "nvme",
        "--integrity_reftag",
    ];
    let mut args = vec!["add", "-t", "loop"];
    args.extend_from_slice(&pi);
    args.extend([d, m]);
    let out = ok(&args);
    let id = first_id(&out);
    assert!(out.contains(&format!(" metadata_file {m}")), "{out}");
    // add starts the metadata at 0xff: unwritten blocks read without errors.
    sh(&format!(
        "dd if=/dev/ublkb{id} of=/dev/null bs=1M iflag=direct status=none"
    ));
    let verify = format!(
        "fio --name=v --filename=/dev/ublkb{id} --direct=1 --ioengine=io_uring --rw=randwrite \
         --bsrange=512-256k --iodepth=16 --size=64M --io_size=16M --verify=crc32c --verify_fatal=1 \
         --do_verify=1 --verify_state_save=0 --output-format=terse --terse-version=3 \
         | awk -F';' '/^3;/ {{ n++; if ($5 != 0) bad = 1 }} END {{ exit bad || n != 1 }}'"
    );
    sh(&verify);
    // Written blocks have their PI in the metadata file: not 0xff any more.
    let pi_bytes = || {
        sh(&format!(
            "od -An -v -tx1 {m} | tr -s ' ' '\\n' | grep -E '^[0-9a-f]{{2}}$' | grep -vc '^ff$' || true"
        ))
        .trim()
        .parse::<u64>()
        .unwrap()
    };
    let written = pi_bytes();
    assert!(written > 0, "the metadata file is all 0xff");

    // The metadata survives a killed daemon: recovery does not reset it,
    // so every block written still reads back through the PI check.
    kill9(id);
    recover(id);
    assert_eq!(pi_bytes(), written, "recovery changed the metadata file");
    sh(&format!(
        "dd if=/dev/ublkb{id} of=/dev/null bs=1M iflag=direct status=none"
    ));

    // Write block 0, then break its reference tag in the metadata file:
    // the read fails with EILSEQ, as kublk's integrity_03 expects.
    sh(&format!(
        "dd if=/dev/urandom of=/dev/ublkb{id} bs=512 count=1 oflag=direct,dsync status=none"
    ));
    sh(&format!("printf '\\001\\002\\003\\004\\005\\006' | dd of={m} bs=1 seek=58 conv=notrunc oflag=dsync status=none"));
    let o = sh_out(&format!(
        "dd if=/dev/ublkb{id} of=/dev/null bs=512 count=1 iflag=direct"
    ));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a read with a broken reference tag succeeded"
    );
    assert!(
        err.contains("Invalid or incomplete multibyte or wide character"),
        "{err}"
    );
    ok(&["del", "-n", &id.to_string()]);

    // Bad input: one clear line, no device.
    fails(
        &["add", "-t", "loop", "-u", "--metadata_size", "64", d],
        "the loop target with --metadata_size takes two files, the data and the metadata file (got 1)",
    );
    let tiny = image("integrity-tiny.img", "32");
    fails(
        &[
            "add",
            "-t",
            "loop",
            "-u",
            "--metadata_size",
            "64",
            d,
            tiny.to_str().unwrap(),
        ],
        "is smaller than one block's 64 bytes of metadata",
    );
    assert!(ublk_nodes().is_empty(), "{:?}", ublk_nodes());
}
