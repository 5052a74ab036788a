//! The command line of `ublk`, `ublk-loop` and `ublk-null` on a host
//! without the driver: every refusal is one exact line with its exit status
//! (2 for usage, 1 for a failure), a closed stdout ends a command quietly,
//! and nothing is left behind. The control device is pointed elsewhere
//! with `UBLK_CONTROL` (a missing path, a regular file, /dev/null), so the
//! tests say the same on a host that has ublk_drv.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const UBLK: &str = env!("CARGO_BIN_EXE_ublk");
const UBLK_NULL: &str = env!("CARGO_BIN_EXE_ublk-null");
const UBLK_LOOP: &str = env!("CARGO_BIN_EXE_ublk-loop");
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A path where no control device is.
const MISSING: &str = "/nonexistent/ublk-control";

/// What a run showed.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A directory of this test's own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ublk-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// The state directory the commands are given: it must stay absent.
    fn state(&self) -> PathBuf {
        self.0.join("state")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn command(bin: &str, args: &[&str], control: &Path, state: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args(args)
        .env("UBLK_CONTROL", control)
        .env("UBLK_STATE_DIR", state)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    c
}

fn run_with(bin: &str, args: &[&str], control: &Path, state: &Path) -> Run {
    let o = command(bin, args, control, state).output().unwrap();
    assert!(
        !state.exists(),
        "{bin} {args:?} left {} behind",
        state.display()
    );
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Runs `bin args` with no driver at the control path.
fn run(bin: &str, args: &[&str]) -> Run {
    let s = Scratch::new("run");
    run_with(bin, args, Path::new(MISSING), &s.state())
}

/// Expects `bin args` to fail with exactly `line` on stderr, nothing on
/// stdout, and exit status `code`.
fn refused(bin: &str, args: &[&str], code: i32, line: &str) {
    assert_eq!(
        run(bin, args),
        Run {
            code,
            stdout: String::new(),
            stderr: format!("{line}\n"),
        },
        "{bin} {args:?}"
    );
}

fn no_driver(prog: &str) -> String {
    format!("{prog}: {MISSING} not found: load the ublk_drv kernel module (modprobe ublk_drv)")
}

/// Runs `bin args` with stdout a pipe whose reader is gone.
fn closed_stdout(bin: &str, args: &[&str]) -> Run {
    let s = Scratch::new("pipe");
    let (reader, writer): (OwnedFd, OwnedFd) = rustix::pipe::pipe().unwrap();
    drop(reader);
    let o = command(bin, args, Path::new(MISSING), &s.state())
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    Run {
        code: o.status.code().unwrap_or(-1),
        stdout: String::new(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let quiet = Run {
        code: 0,
        stdout: String::new(),
        stderr: String::new(),
    };
    for args in [
        &["completions", "bash"][..],
        &["completions", "zsh"],
        &["--help"],
        &["add", "--help"],
        &["--version"],
    ] {
        assert_eq!(closed_stdout(UBLK, args), quiet, "ublk {args:?}");
    }
    assert_eq!(closed_stdout(UBLK_NULL, &["--help"]), quiet);
    assert_eq!(closed_stdout(UBLK_LOOP, &["--version"]), quiet);
}

#[test]
fn a_full_stdout_is_an_error_of_one_line() {
    let s = Scratch::new("full");
    let full = std::fs::File::options()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = command(
        UBLK,
        &["completions", "fish"],
        Path::new(MISSING),
        &s.state(),
    )
    .stdout(full)
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "ublk: cannot write to stdout: No space left on device (os error 28)\n"
    );
}

#[test]
fn no_driver_is_one_line_and_status_1() {
    for args in [
        &["list"][..],
        &["list", "-a"],
        &["list", "--json"],
        &["features"],
        &["del", "-a"],
        &["del", "-n", "0"],
        &["stop", "-n", "0"],
        &["quiesce", "-n", "0"],
        &["update_size", "-n", "0", "-s", "1G"],
        &["recover", "-n", "0"],
        &["user_id", "ublkb0"],
        &["add", "-t", "null"],
    ] {
        refused(UBLK, args, 1, &no_driver("ublk"));
    }
    refused(UBLK_NULL, &[], 1, &no_driver("ublk-null"));
}

#[test]
fn the_control_device_must_be_a_misc_character_device() {
    let s = Scratch::new("control");
    let file = s.0.join("ublk-control");
    std::fs::write(&file, b"").unwrap();
    let not_it = |control: &Path, what: &str| {
        for args in [&["features"][..], &["list"], &["add", "-t", "null"]] {
            assert_eq!(
                run_with(UBLK, args, control, &s.state()),
                Run {
                    code: 1,
                    stdout: String::new(),
                    stderr: format!(
                        "ublk: {} is {what}, not ublk_drv's control device (a misc character device): load the ublk_drv kernel module (modprobe ublk_drv)\n",
                        control.display()
                    ),
                },
                "ublk {args:?} with UBLK_CONTROL={}",
                control.display()
            );
        }
    };
    not_it(&file, "a regular file");
    not_it(Path::new("/dev/null"), "the character device 1:3");
    not_it(&s.0, "a directory");
}

#[test]
fn the_wrappers_are_add_with_the_target_fixed() {
    for (bin, name) in [(UBLK_NULL, "ublk-null"), (UBLK_LOOP, "ublk-loop")] {
        for flag in ["--version", "-v", "-V"] {
            assert_eq!(
                run(bin, &[flag]),
                Run {
                    code: 0,
                    stdout: format!("{name} {VERSION}\n"),
                    stderr: String::new(),
                },
                "{name} {flag}"
            );
        }
        let help = run(bin, &["--help"]);
        assert_eq!(help.code, 0, "{help:?}");
        assert!(
            help.stdout.contains(&format!("Usage: {name} [OPTIONS]")),
            "{}",
            help.stdout
        );
        assert!(!help.stdout.contains("--type"), "{}", help.stdout);
        assert!(!help.stdout.contains("Commands:"), "{}", help.stdout);
        // ublk-loop takes a FILE, so clap adds how to pass "-t" as one.
        let tip = if name == "ublk-loop" {
            " (to pass '-t' as a value, use '-- -t')"
        } else {
            ""
        };
        refused(
            bin,
            &["-t", "loop"],
            2,
            &format!("{name}: unexpected argument '-t' found{tip}"),
        );
        refused(
            bin,
            &["-q", "0"],
            2,
            &format!(
                "{name}: invalid value '0' for '--queues <QUEUES>': number of queues 0 is outside 1..=4096"
            ),
        );
    }
    refused(
        UBLK_NULL,
        &["disk.img"],
        2,
        "ublk-null: unexpected argument 'disk.img' found",
    );
    refused(
        UBLK_LOOP,
        &[],
        2,
        "ublk-loop: the loop target needs a backing file: -f FILE or FILE",
    );
    refused(
        UBLK_LOOP,
        &["/nonexistent.img"],
        1,
        "ublk-loop: backing file /nonexistent.img does not exist",
    );
    refused(
        UBLK_NULL,
        &["-z", "-u"],
        2,
        "ublk-null: choose one of -z, --auto_zc, -u and -g",
    );
}

#[test]
fn ublk_version_and_help() {
    for flag in ["-v", "-V", "--version"] {
        assert_eq!(
            run(UBLK, &[flag]),
            Run {
                code: 0,
                stdout: format!("ublk {VERSION}\n"),
                stderr: String::new(),
            }
        );
    }
    let help = run(UBLK, &["add", "--help"]);
    assert_eq!(help.code, 0);
    for needed in [
        "K, M, G, T (or KiB, MiB, GiB, TiB",
        "powers of 1024",
        "1.5G",
        "Exit status: 0 on success",
        "2 for bad usage",
        "UBLK_CONTROL",
        "--max_io_buf_bytes <SIZE>",
        "Queue depth (1..=4096)",
        "--debug_mask <MASK>",
        "--no_ublk_fixed_fd",
        "--dma_alignment <MASK>",
        "--seg_boundary_mask <MASK>",
        "--max_segment_size <SIZE>",
        "--max_segments <MAX_SEGMENTS>",
        "implies -r 1, as in kublk",
        "-z --auto_zc --auto_zc_fallback",
    ] {
        assert!(
            help.stdout.contains(needed),
            "{needed:?} in {}",
            help.stdout
        );
    }
}

#[test]
fn argument_checks_come_before_the_driver_check() {
    for (args, line) in [
        (
            &["add", "-t", "null", "-z", "-u"][..],
            "ublk: choose one of -z, --auto_zc, -u and -g",
        ),
        (
            &["add", "-t", "null", "-q", "0"],
            "ublk: invalid value '0' for '--queues <QUEUES>': number of queues 0 is outside 1..=4096",
        ),
        (
            &["add", "-t", "null", "-d", "0"],
            "ublk: invalid value '0' for '--depth <DEPTH>': queue depth 0 is outside 1..=4096",
        ),
        (
            &["add", "-t", "null", "-d", "100000"],
            "ublk: invalid value '100000' for '--depth <DEPTH>': queue depth 100000 is outside 1..=4096",
        ),
        (
            &["add", "-t", "null", "--nthreads", "0"],
            "ublk: invalid value '0' for '--nthreads <NTHREADS>': number of threads 0 is outside 1..=65535",
        ),
        (
            &["add", "-t", "null", "--max_io_buf_bytes", "1000"],
            "ublk: invalid value '1000' for '--max_io_buf_bytes <SIZE>': largest request 1000 bytes must be a multiple of 4096 in 4096..=33554432",
        ),
        (
            &["add", "-t", "null", "--size", "garbage"],
            "ublk: invalid value 'garbage' for '--size <SIZE>': invalid size \"garbage\": not a number with an optional unit (K, M, G, T: powers of 1024)",
        ),
        (
            &["add", "-t", "null", "--size", "0.1K"],
            "ublk: invalid value '0.1K' for '--size <SIZE>': invalid size \"0.1K\": not a whole number of bytes",
        ),
        (
            &["add", "-t", "null", "--size", "1000"],
            "ublk: --size 1000 is not a multiple of the logical block size 512",
        ),
        (
            &["add", "-t", "null", "--nthreads", "2"],
            "ublk: --nthreads other than the number of queues needs --per_io_tasks",
        ),
        (
            &["add", "-t", "null", "--metadata_size", "8"],
            "ublk: integrity metadata (--metadata_size) needs user copy (-u)",
        ),
        (
            &["add", "-t", "null", "-u", "--csum_type", "ip"],
            "ublk: --integrity_capable, --integrity_reftag, --pi_offset, --csum_type and --tag_size need --metadata_size",
        ),
        (
            &["add", "-t", "stripe", "-u", "--metadata_size", "8", "a", "b"],
            "ublk: --metadata_size works with -t null and loop",
        ),
        (
            &["add", "-t", "null", "-u", "--metadata_size", "8", "--integrity_reftag"],
            "ublk: a reference tag needs a protection-information checksum",
        ),
        (
            &["add", "-t", "null", "-u", "--metadata_size", "0"],
            "ublk: invalid value '0' for '--metadata_size <METADATA_SIZE>': 0 is not in 1..=255",
        ),
        (
            &["add", "-t", "null", "-b", "-g"],
            "ublk: batch I/O (-b) does not work with NEED_GET_DATA (-g)",
        ),
        (
            &["add", "-t", "null", "-b", "--nthreads", "2", "--per_io_tasks"],
            "ublk: batch I/O (-b) serves whole queues, --per_io_tasks spreads them: choose one",
        ),
        (
            &["add", "-t", "null", "-i", "1", "-e", "1"],
            "ublk: recovery reissue (-i 1) and fail-I/O (-e 1) exclude each other",
        ),
        (
            &["add", "-t", "null", "-z", "--auto_zc"],
            "ublk: choose one of -z, --auto_zc, -u and -g",
        ),
        (
            &["add", "-t", "null", "-z", "--auto_zc_fallback"],
            "ublk: --auto_zc_fallback needs --auto_zc",
        ),
        (
            &["add", "-t", "null", "--dma_alignment", "4096"],
            "ublk: DMA alignment mask 0x1000 is not 2^n - 1",
        ),
        (
            &["add", "-t", "null", "--dma_alignment", "0x1_000"],
            "ublk: invalid value '0x1_000' for '--dma_alignment <MASK>': \"0x1_000\" is not a 32-bit number (decimal or 0x hex)",
        ),
        (
            &["add", "-t", "null", "--max_segment_size", "1K"],
            "ublk: segment limits need max_segment_size >= 4096 and max_segments > 0",
        ),
        (
            &["add", "-t", "loop", "--seg_boundary_mask", "0x7ff", "x.img"],
            "ublk: segment boundary mask 0x7ff + 1 is not a power of two >= 4096",
        ),
        (
            &["add", "-t", "null", "--max_segments", "0"],
            "ublk: invalid value '0' for '--max_segments <MAX_SEGMENTS>': 0 is not in 1..=65535",
        ),
        (
            &["add", "-t", "null", "--unprivileged", "-u"],
            "ublk: unprivileged devices cannot use zero copy, auto buffer registration or user copy (the kernel forbids it)",
        ),
        (
            &["add", "-t", "null", "--auto_zc_fallback"],
            "ublk: --auto_zc_fallback needs --auto_zc",
        ),
        (
            &["add", "-t", "loop"],
            "ublk: the loop target needs a backing file: -f FILE or FILE",
        ),
        (
            &["add", "-t", "null", "-f", "x.img"],
            "ublk: the null target takes no backing file (got x.img)",
        ),
        (
            &["recover", "-n", "0", "-t", "null", "-z", "-g"],
            "ublk: choose one of -z, --auto_zc, -u and -g",
        ),
        (
            &["recover", "-t", "null"],
            "ublk: recover needs the device id: -n ID",
        ),
    ] {
        refused(UBLK, args, 2, line);
    }
}

#[test]
fn shmem_zero_copy_options_are_checked() {
    for (args, line) in [
        (
            &["add", "-t", "null", "--htlb", "/dev/hugepages/buf"][..],
            "ublk: --htlb needs --shmem_zc",
        ),
        (
            &["add", "-t", "null", "--shmem_zc", "--rdonly_shmem_buf"],
            "ublk: --rdonly_shmem_buf needs --htlb PATH",
        ),
        (
            &["add", "-t", "stripe", "--shmem_zc", "a", "b"],
            "ublk: --shmem_zc works with -t null, loop and fault_inject",
        ),
    ] {
        refused(UBLK, args, 2, line);
    }
    // The buffer file is opened before the driver is asked.
    let s = Scratch::new("htlb");
    let missing = s.0.join("missing");
    let empty = s.0.join("empty");
    std::fs::write(&empty, b"").unwrap();
    for (file, why) in [
        (
            &missing,
            "No such file or directory (os error 2)".to_owned(),
        ),
        (
            &empty,
            "the file is empty (give it a size, e.g. fallocate -l 4M)".to_owned(),
        ),
    ] {
        let f = file.to_str().unwrap();
        refused(
            UBLK,
            &["add", "-t", "null", "--shmem_zc", "--htlb", f],
            1,
            &format!("ublk: --htlb {f}: {why}"),
        );
    }
}

#[test]
fn stripe_and_fault_inject_options_are_checked() {
    for (args, line) in [
        (
            &["add", "-t", "stripe"][..],
            "ublk: the stripe target needs backing files: -f FILE [-f FILE]... or FILE...",
        ),
        (
            &["add", "-t", "stripe", "--chunk_size", "3000", "a", "b"],
            "ublk: invalid value '3000' for '--chunk_size <SIZE>': chunk size 3000 must be a power of two in 4096..=524288",
        ),
        (
            &["add", "-t", "stripe", "--chunk_size", "1M", "a", "b"],
            "ublk: invalid value '1M' for '--chunk_size <SIZE>': chunk size 1048576 must be a power of two in 4096..=524288",
        ),
        (
            &["add", "-t", "stripe", "-s", "1M", "a", "b"],
            "ublk: --size is not for the stripe target: its size is its files'",
        ),
        (
            &["add", "-t", "loop", "--chunk_size", "8K", "a"],
            "ublk: --chunk_size is an option of -t stripe",
        ),
        (
            &["add", "-t", "null", "--delay_us", "10"],
            "ublk: --delay_us is an option of -t fault_inject",
        ),
        (
            &["add", "-t", "stripe", "--error_rate", "1", "a"],
            "ublk: --error_rate is an option of -t fault_inject",
        ),
        (
            &["add", "-t", "fault_inject", "a", "b"],
            "ublk: the fault_inject target takes at most one backing file",
        ),
        (
            &["add", "-t", "fault_inject", "--error_rate", "101"],
            "ublk: invalid value '101' for '--error_rate <PERCENT>': error rate \"101\" is not a percentage in 0..=100",
        ),
        (
            &["add", "-t", "fault_inject", "--error_range", "1M"],
            "ublk: invalid value '1M' for '--error_range <START:LENGTH>': error range \"1M\" is not START:LENGTH",
        ),
        (
            &["add", "-t", "fault_inject", "--error_range", "1000:4K"],
            "ublk: invalid value '1000:4K' for '--error_range <START:LENGTH>': error range \"1000:4K\": START and LENGTH must be multiples of 512, LENGTH not 0",
        ),
        (
            &["add", "-t", "fault_inject", "--die_during_fetch", "2"],
            "ublk: invalid value '2' for '--die_during_fetch <0|1>': 2 is not in 0..=1",
        ),
        (
            &["add", "-t", "fault_inject", "--foreground", "--die_during_fetch", "1"],
            "ublk: --die_during_fetch 1 with add --foreground would leave the new device behind: use it with recover, or without --foreground",
        ),
        (
            &["add", "-t", "fault_inject", "-b", "--die_during_fetch", "1"],
            "ublk: --die_during_fetch does not work with batch I/O (-b): one command fetches every tag",
        ),
        (
            &["add", "-t", "fault_inject", "--delay_us", "soon"],
            "ublk: invalid value 'soon' for '--delay_us <US>': invalid digit found in string",
        ),
    ] {
        refused(UBLK, args, 2, line);
    }
    // The files: missing, of different sizes, smaller than a chunk (1).
    let s = Scratch::new("stripe");
    let file = |name: &str, len: u64| {
        let p = s.0.join(name);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (a, b, small) = (
        file("a.img", 1 << 20),
        file("b.img", 2 << 20),
        file("s.img", 8192),
    );
    let missing = s.0.join("missing.img");
    let missing = missing.to_str().unwrap();
    let refused_files = |args: &[&str], line: String| {
        assert_eq!(
            run_with(UBLK, args, Path::new(MISSING), &s.state()),
            Run {
                code: 1,
                stdout: String::new(),
                stderr: format!("{line}\n"),
            },
            "{args:?}"
        );
    };
    refused_files(
        &[
            "add",
            "-t",
            "stripe",
            "--buffered_io",
            "-f",
            &a,
            "-f",
            missing,
        ],
        format!("ublk: backing file {missing} does not exist"),
    );
    refused_files(
        &["add", "-t", "stripe", "--buffered_io", &a, &b],
        format!("ublk: stripe files must be the same size in whole 65536-byte chunks: {a} has 1048576, {b} has 2097152"),
    );
    refused_files(
        &["add", "-t", "stripe", "--buffered_io", &small],
        format!("ublk: stripe file {small} (8192 bytes) is smaller than one 65536-byte chunk"),
    );
    // Good files get as far as the (missing) driver.
    refused_files(
        &[
            "add",
            "-t",
            "stripe",
            "--buffered_io",
            "--chunk_size",
            "8K",
            &small,
            &small,
        ],
        no_driver("ublk"),
    );
    refused_files(
        &[
            "add",
            "-t",
            "fault_inject",
            "--buffered_io",
            "--error_rate",
            "0.5",
            &a,
        ],
        no_driver("ublk"),
    );
}

#[test]
fn add_help_documents_the_target_options() {
    let o = Command::new(UBLK).args(["add", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    for opt in [
        "-t, --type <TARGET>",
        "stripe",
        "fault_inject",
        "Stripe and fault_inject options:",
        "--chunk_size <SIZE>",
        "--delay_us <US>",
        "--die_during_fetch <0|1>",
        "--error_rate <PERCENT>",
        "--error_range <START:LENGTH>",
        "-f, --file <FILE>",
    ] {
        assert!(help.contains(opt), "{opt} missing from:\n{help}");
    }
}

#[test]
fn usage_errors_exit_2_and_failures_exit_1() {
    refused(
        UBLK,
        &["add"],
        2,
        "ublk: the following required arguments were not provided: --type <TARGET>",
    );
    refused(
        UBLK,
        &["add", "-t", "raid"],
        2,
        "ublk: invalid value 'raid' for '--type <TARGET>' [possible values: null, loop, stripe, fault_inject, nbd]",
    );
    // The nbd target's arguments are checked before the driver is asked.
    for (args, line) in [
        (
            &["add", "-t", "nbd"][..],
            "ublk: the nbd target needs a server: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, --host HOST or --unix PATH",
        ),
        (
            &["add", "-t", "nbd", "nbd://h:0/x"],
            "ublk: NBD URI \"nbd://h:0/x\": bad port \"0\"",
        ),
        (
            &["add", "-t", "nbd", "nbd+unix:///x"],
            "ublk: NBD URI \"nbd+unix:///x\": no ?socket=PATH",
        ),
        (
            &["add", "-t", "nbd", "nbd://h/x", "--host", "h"],
            "ublk: give the NBD server either as a URI or with --host/--unix, not both",
        ),
        (
            &["add", "-t", "nbd", "nbd://h/x", "-s", "1G"],
            "ublk: --size: the NBD export decides the size of an nbd device",
        ),
        (
            &["add", "-t", "null", "--export_name", "x"],
            "ublk: --host, --port, --unix, --export_name and --reconnect_timeout are options of the nbd target (-t nbd)",
        ),
    ] {
        refused(UBLK, args, 2, line);
    }
    refused(
        UBLK,
        &["add", "-t", "null", "--queue", "2"],
        2,
        "ublk: unexpected argument '--queue' found (a similar argument exists: '--queues')",
    );
    refused(
        UBLK,
        &["del"],
        2,
        "ublk: the following required arguments were not provided: <--number <ID>|--all>",
    );
    refused(
        UBLK,
        &["list", "-a", "-n", "1"],
        2,
        "ublk: the argument '--all' cannot be used with '--number <ID>'",
    );
    refused(
        UBLK,
        &["user_id", "sda"],
        2,
        "ublk: invalid value 'sda' for '<DEVICE>': \"sda\" is not a ublk device (a number, ublkcN, ublkbN or /dev/ublkbN)",
    );
    refused(
        UBLK,
        &["completions", "tcsh"],
        2,
        "ublk: invalid value 'tcsh' for '<SHELL>' [possible values: bash, elvish, fish, powershell, zsh] (a similar value exists: 'zsh')",
    );
    // A runtime failure: 1.
    refused(
        UBLK,
        &["add", "-t", "loop", "-f", "/nonexistent.img"],
        1,
        "ublk: backing file /nonexistent.img does not exist",
    );
    refused(
        UBLK,
        &[],
        2,
        "ublk: missing command: one of add, del, stop, list, features, recover, quiesce, update_size, completions, user_id (see ublk --help)",
    );
}

#[test]
fn sizes_with_units_and_fractions_are_taken() {
    for size in ["1GiB", "1.5G", "512m", "2 TiB", "1073741824", "4K"] {
        refused(
            UBLK,
            &["add", "-t", "null", "-s", size],
            1,
            &no_driver("ublk"),
        );
    }
    refused(
        UBLK,
        &["update_size", "-n", "0", "-s", "1.5GiB"],
        1,
        &no_driver("ublk"),
    );
}

#[test]
fn every_spelling_of_the_options_is_taken() {
    for args in [
        &["--zerocopy"][..],
        &["--zero-copy"],
        &["--zero_copy"],
        &["--usercopy"],
        &["--user-copy"],
        &["--get_data"],
        &["--need-get-data"],
        &["-g"],
        &["--user_recovery", "1"],
        &["--user_recovery", "1", "--user_recovery_reissue", "1"],
        &["--user_recovery", "1", "--user_recovery_fail_io", "1"],
        &["-r", "1", "--recovery-reissue", "1"],
        &["--debug_mask", "0x1f"],
        &["--debug-mask", "3"],
        &["--read_only"],
        &["--read-only"],
        &["--logical_block_size", "4096", "-s", "1M"],
        &["--logical-block-size", "4K", "-s", "1M"],
        &["--max_io_buf_bytes", "1M"],
        &["--max-io-buf-bytes", "256K"],
        &["--per-io-tasks", "--nthreads", "2"],
        &["--no-auto-part-scan"],
        &["--io-scheduler", "none"],
        &["--auto-zc", "--auto-zc-fallback"],
    ] {
        let mut all = vec!["add", "-t", "null"];
        all.extend_from_slice(args);
        refused(UBLK, &all, 1, &no_driver("ublk"));
    }
}

#[test]
fn completions_for_each_program_and_shell() {
    for (args, needle) in [
        (&["completions", "bash"][..], "complete -F _ublk"),
        (&["completions", "zsh"], "#compdef ublk"),
        (&["completions", "fish"], "complete -c ublk"),
        (&["completions", "bash", "ublk-null"], "ublk-null"),
        (
            &["completions", "fish", "ublk-loop"],
            "complete -c ublk-loop",
        ),
    ] {
        let r = run(UBLK, args);
        assert_eq!((r.code, r.stderr.as_str()), (0, ""), "{args:?}");
        assert!(r.stdout.contains(needle), "{args:?}: {}", r.stdout);
    }
    let bash = run(UBLK, &["completions", "bash"]).stdout;
    for word in ["update_size", "--max_io_buf_bytes", "--debug_mask"] {
        assert!(bash.contains(word), "{word}");
    }
    assert!(!bash.contains("__daemon"));
}

#[test]
fn the_daemon_entry_point_is_in_every_program() {
    // Hidden from help and completions, but there: `add` runs its own
    // executable again as the daemon, ublk-null and ublk-loop included.
    for (bin, name) in [
        (UBLK, "ublk"),
        (UBLK_NULL, "ublk-null"),
        (UBLK_LOOP, "ublk-loop"),
    ] {
        refused(
            bin,
            &["__daemon", "not json"],
            1,
            &format!("{name}: bad daemon arguments: expected ident at line 1 column 2"),
        );
        // The daemon of a valid request gets as far as the driver, and
        // tells `add` why it stopped in its JSON report on stdout.
        let a = <ublk_tools::cli::NullCli as clap::Parser>::try_parse_from(["ublk-null"])
            .unwrap()
            .into_add_args();
        let json = serde_json::to_string(&a).unwrap();
        let s = Scratch::new("daemon");
        let r = run_with(bin, &["__daemon", &json], Path::new(MISSING), &s.state());
        assert_eq!(r.code, 1, "{r:?}");
        let report: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
        assert_eq!(
            report["error"].as_str().map(|e| format!("{name}: {e}")),
            Some(no_driver(name)),
            "{r:?}"
        );
    }
}

#[test]
fn the_udev_rule_asks_ublk_user_id_about_each_device() {
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/udev/99-ublk-unprivileged.rules"
    ))
    .unwrap();
    let rules: Vec<&str> = rules
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        rules,
        [
            r#"KERNEL=="ublk-control", MODE="0666", OPTIONS+="static_node=ublk-control""#,
            r#"ACTION=="add", KERNEL=="ublk[bc][0-9]*", PROGRAM="/usr/local/bin/ublk user_id %k", OWNER="%c{1}", GROUP="%c{2}", MODE="0660""#,
        ]
    );
    // What udev's %k is for a device's nodes: each is taken (and then
    // needs the driver).
    for name in ["ublkc0", "ublkb0", "ublkb12p3"] {
        refused(UBLK, &["user_id", name], 1, &no_driver("ublk"));
    }
}
