//! `cargo xtask selftests`: the kernel's own test suite for ublk servers
//! (`tools/testing/selftests/ublk/test_*.sh`, from the linux-source
//! package the peers module builds kublk from) run in a guest, with our
//! `ublk` (release) standing in for `kublk`, or with kublk itself (the
//! baseline).
//!
//! In the guest the suite is copied to the scratch `/tmp` with the server
//! as `kublk` and the `metadata_size` helper beside it, and each script runs
//! under `timeout`. Its output lands in the shared target directory
//! (`target/selftests/SUITE-SERVER/NAME.log`), and its exit status and
//! duration to the `results` file beside it. ksft's exit 4 is a skip; any `[FAIL]` in the
//! output is a failure whatever the exit status (the stress and recover
//! scripts run cases as background jobs whose failure does not reach it).
//!
//! A script that times out, or after which the clean-up `kublk del -a`
//! does not return in two minutes, leaves the kernel's log beside its own
//! (`NAME.dmesg`, with every blocked task's stack). A clean-up that hung
//! means a wedged guest kernel: the tests after it fail as not run rather
//! than each waiting out its timeout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use crate::kernel::{self, Kernel, Suite};
use crate::peers::{self, Kublk};
use crate::util::{self, shell_quote, Workspace};
use crate::vm;

/// The server the suite drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Server {
    /// Our `ublk` (release build), copied over `kublk`.
    Ours,
    /// The selftests' own kublk (the baseline).
    Kublk,
}

impl Server {
    /// The name used in labels and log directories.
    pub fn name(self) -> &'static str {
        match self {
            Server::Ours => "ours",
            Server::Kublk => "kublk",
        }
    }
}

/// Options of `cargo xtask selftests`.
#[derive(Debug)]
pub struct SelftestOptions {
    /// The guest kernel.
    pub suite: Suite,
    /// The server under test.
    pub server: Server,
    /// Tests to run (`generic_03`, `test_generic_03` or
    /// `test_generic_03.sh`); empty: all of them.
    pub tests: Vec<String>,
    /// Seconds one script may run before it is killed (a failure).
    pub per_test_timeout: u64,
    /// Guest timeout.
    pub timeout: Duration,
    /// Guest memory in MiB.
    pub mem_mb: u32,
}

/// ksft's exit status of a skipped test.
const KSFT_SKIP: i32 = 4;
/// `timeout`'s exit status when it killed the script (124), or when the
/// script ignored SIGTERM and `--kill-after` sent SIGKILL (128 + 9).
const TIMED_OUT: [i32; 2] = [124, 137];
/// The file in the log directory the guest appends one line per test to:
/// `STATUS SECONDS NAME`.
const RESULTS_FILE: &str = "results";
/// What `kublk features` (the server under test) printed in the guest.
const FEATURES_FILE: &str = "features";
/// The programs the scripts check for that the guest lacks, one a line.
const MISSING_PROGRAMS_FILE: &str = "missing-programs";
/// The file in the log directory naming the test after which `del -a`
/// did not return: the guest kernel is wedged, and the tests after it are
/// not run.
const WEDGED_FILE: &str = "wedged";
/// Seconds the clean-up `del -a` after each test may take.
const DEL_TIMEOUT: u64 = 120;
/// The reason [`verdict`] gives a skip that printed none.
const NO_REASON: &str = "exit 4, no reason printed";

/// What one script did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Exit 0 and no `[FAIL]` in its output.
    Pass,
    /// Exit 4 (and no `[FAIL]`): the reason from its output.
    Skip(String),
    /// Anything else: why.
    Fail(String),
}

/// One script's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    /// The test's name, e.g. `generic_03`.
    pub name: String,
    /// Its verdict.
    pub verdict: Verdict,
    /// Seconds it ran in the guest.
    pub secs: u64,
}

/// The test name of a script file name: `test_generic_03.sh` →
/// `generic_03`.
fn test_name(file: &str) -> Option<&str> {
    file.strip_prefix("test_")?.strip_suffix(".sh")
}

/// The suite's tests in `dir` (every `test_*.sh` but `test_common.sh`),
/// sorted.
pub fn suite_tests(dir: &Path) -> Result<Vec<String>> {
    let mut tests: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| test_name(&f).map(str::to_owned))
        .filter(|n| n != "common")
        .collect();
    tests.sort();
    Ok(tests)
}

/// Resolves the tests asked for against the suite's; an unknown one is an
/// error naming it.
pub fn select(all: &[String], wanted: &[String]) -> Result<Vec<String>> {
    if wanted.is_empty() {
        return Ok(all.to_vec());
    }
    wanted
        .iter()
        .map(|w| {
            let bare = w.strip_suffix(".sh").unwrap_or(w);
            let bare = bare.strip_prefix("test_").unwrap_or(bare);
            all.iter()
                .find(|t| *t == bare)
                .cloned()
                .with_context(|| format!("the kernel's ublk selftests have no test {w:?}"))
        })
        .collect()
}

/// The verdict of a script from its exit status and output.
pub fn verdict(status: i32, output: &str, per_test_timeout: u64) -> Verdict {
    let failed_line = output.lines().find(|l| l.contains("[FAIL]"));
    if TIMED_OUT.contains(&status) {
        return Verdict::Fail(format!("timed out after {per_test_timeout} s"));
    }
    if let Some(line) = failed_line {
        let why = last_message(output).unwrap_or(line.trim());
        return Verdict::Fail(format!("[FAIL] in its output (exit {status}): {why}"));
    }
    match status {
        0 => Verdict::Pass,
        KSFT_SKIP => Verdict::Skip(last_message(output).unwrap_or(NO_REASON).to_owned()),
        s => Verdict::Fail(match last_message(output) {
            Some(why) => format!("exit {s}: {why}"),
            None => format!("exit {s}"),
        }),
    }
}

/// What the rig's guest adds to a script's output: udevadm's note that
/// it does nothing in the guest's chroot.
const GUEST_NOISE: &str = "Running in chroot, ignoring request.";

/// The last line of a script's output that says something: not its
/// `NAME : [PASS|SKIP|FAIL]` line, the "starting at"/"done at" banners or
/// [`GUEST_NOISE`].
fn last_message(output: &str) -> Option<&str> {
    output.lines().map(str::trim).rev().find(|l| {
        !l.is_empty()
            && !l.ends_with(": [SKIP]")
            && !l.ends_with(": [FAIL]")
            && !l.ends_with(": [PASS]")
            && !l.starts_with("ublk selftest: ")
            && *l != GUEST_NOISE
    })
}

/// The guest script: copies the suite to `/tmp/ublk-selftests` with
/// `server` as `kublk`, runs each test with a timeout, its output to
/// `log_dir/NAME.log`, and appends a line per test to `log_dir/results`.
fn guest_script(
    peers: &Kublk,
    server: &Path,
    tests: &[String],
    log_dir: &Path,
    per_test_timeout: u64,
    del_timeout: u64,
) -> Result<String> {
    let q = |p: &Path, what: &str| util::utf8(p.as_os_str(), what).map(shell_quote);
    let mut s = format!(
        "set -u\nst_dir=/tmp/ublk-selftests\nlogs={logs}\nrm -rf \"$st_dir\" && mkdir -p \"$st_dir/work\" \"$logs\" || exit 125\n\
         cp -R {src}/. \"$st_dir/\" && cp {server} \"$st_dir/kublk\" || exit 125\n",
        logs = q(log_dir, "log directory")?,
        src = q(&peers.selftests, "selftests directory")?,
        server = q(server, "server binary")?,
    );
    if let Some(helper) = &peers.metadata_size {
        s += &format!(
            "cp {} \"$st_dir/metadata_size\" || exit 125\n",
            q(helper, "metadata_size helper")?
        );
    }
    // bash's process substitution (integrity_02) needs /dev/fd, which the
    // guest's devtmpfs lacks.
    s += "[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd\n";
    s += "cd \"$st_dir\" || exit 125\nexport TMPDIR=\"$st_dir/work\"\n";
    s += &format!("./kublk features >\"$logs/{FEATURES_FILE}\" 2>&1\n");
    // The programs the scripts ask for with `_have_program` that the guest
    // lacks (bpftrace, say): why a test skips without a word.
    s += &format!(
        "for p in $(grep -ho '_have_program [a-z_0-9-]*' test_*.sh | sort -u | cut -d' ' -f2); do \
         command -v \"$p\" >/dev/null 2>&1 || echo \"$p\"; done >\"$logs/{MISSING_PROGRAMS_FILE}\"\n"
    );
    // The kernel's log with every blocked task's stack (sysrq w; the
    // console is `quiet`, so the hung-task reports show there without
    // them): what a hang leaves to read.
    s += "kernel_log() { echo w >/proc/sysrq-trigger 2>/dev/null; sleep 1; dmesg >\"$logs/$1.dmesg\" 2>&1; }\n";
    let timed_out = TIMED_OUT.map(|c| c.to_string()).join("|");
    for t in tests {
        let name = shell_quote(t);
        s += &format!(
            "echo {header}\nstart=$(date +%s)\n\
             timeout -k 10 {per_test_timeout} bash ./test_{t}.sh >\"$logs/\"{name}.log 2>&1 </dev/null\n\
             st=$?\nend=$(date +%s)\ncat \"$logs/\"{name}.log\n\
             case $st in {timed_out}) kernel_log {name} ;; esac\n\
             timeout -k 10 {del_timeout} ./kublk del -a >/dev/null 2>&1\n\
             case $? in {timed_out}) kernel_log {name}; echo {name} >\"$logs/{WEDGED_FILE}\" ;; esac\n\
             echo $st $((end - start)) {name} >>\"$logs/{RESULTS_FILE}\"\n\
             [ -e \"$logs/{WEDGED_FILE}\" ] && exit 0\n",
            header = shell_quote(&format!("=== selftest {t} ===")),
        );
    }
    s += "exit 0\n";
    Ok(s)
}

/// The `UBLK_F_*` flags a test `script` checks for (with the suite's
/// `_have_feature NAME`, or `-z` which its `_create_ublk_dev` checks) that
/// `features` (`kublk features` in the guest) does not list: why a test
/// that exited 4 without a word skipped.
fn missing_features(script: &str, features: &str) -> Vec<String> {
    let mut wanted: Vec<&str> = script
        .split("_have_feature \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    if script.contains(" -z") {
        wanted.push("ZERO_COPY");
    }
    let mut missing: Vec<String> = wanted
        .into_iter()
        .filter(|w| !features.contains(w))
        .map(|w| {
            let w = w.strip_prefix("UBLK_F_").unwrap_or(w);
            match w {
                "ZERO_COPY" => "UBLK_F_SUPPORT_ZERO_COPY".to_owned(),
                w => format!("UBLK_F_{w}"),
            }
        })
        .collect();
    missing.sort();
    missing.dedup();
    missing
}

/// The `UBLK_F_*` flags our server's `add` refused in a test's `output`
/// because the kernel lacks them ("the running kernel's ublk driver does
/// not support UBLK_F_A|UBLK_F_B …"): a script that uses a feature without
/// checking for it fails there, on any server.
fn refused_features(output: &str) -> Vec<String> {
    const SAID: &str = "the running kernel's ublk driver does not support ";
    let mut flags: Vec<String> = output
        .lines()
        .filter_map(|l| l.split_once(SAID))
        .filter_map(|(_, rest)| rest.split_whitespace().next())
        .flat_map(|f| f.split('|'))
        .filter(|f| f.starts_with("UBLK_F_"))
        .map(str::to_owned)
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

/// The programs a test `script` checks for (`_have_program NAME`) that
/// are among `missing` (one a line).
fn missing_programs(script: &str, missing: &str) -> Vec<String> {
    let mut names: Vec<String> = script
        .split("_have_program ")
        .skip(1)
        .filter_map(|rest| {
            rest.split(|c: char| !(c.is_ascii_alphanumeric() || "_-".contains(c)))
                .next()
        })
        .filter(|p| !p.is_empty() && missing.lines().any(|m| m.trim() == *p))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Parses the guest's results file: `(name, status, seconds)` per line.
fn parse_results(text: &str) -> Vec<(String, i32, u64)> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let status = w.next()?.parse().ok()?;
            let secs = w.next()?.parse().ok()?;
            Some((w.next()?.to_owned(), status, secs))
        })
        .collect()
}

/// Builds our release `ublk`; returns its path.
pub fn build_ours(ws: &Workspace) -> Result<PathBuf> {
    eprintln!("=== building ublk (release) ===");
    util::run(
        util::cargo()
            .args(["build", "--release", "-p", "ublk-tools", "--bin", "ublk"])
            .current_dir(&ws.root),
    )?;
    Ok(ws.target_dir.join("release/ublk"))
}

/// How many times a guest may panic before the tests it had not run yet
/// fail.
const MAX_PANIC_RETRIES: u32 = 2;

/// Runs `tests` with `server` in guests of `kernel`; one result per test
/// (a test whose guest panicked twice, or that never reported, fails).
pub fn run_suite(
    ws: &Workspace,
    kernel: &Kernel,
    peers: &Kublk,
    server: (Server, &Path),
    tests: &[String],
    per_test_timeout: u64,
    vm_opts: &vm::VmOptions,
) -> Result<Vec<TestResult>> {
    let log_dir = ws.target_dir.join("selftests").join(format!(
        "{}-{}",
        kernel.suite.name(),
        server.0.name()
    ));
    let _ = std::fs::remove_dir_all(&log_dir);
    let mut results = Vec::new();
    let mut remaining = tests.to_vec();
    let mut panics = 0;
    while !remaining.is_empty() {
        let script = guest_script(
            peers,
            server.1,
            &remaining,
            &log_dir,
            per_test_timeout,
            DEL_TIMEOUT,
        )?;
        // After a guest kernel oops (see `cargo xtask test`), a new guest
        // runs what had not reported, the test that was running included.
        let end = match vm::run(kernel, vm_opts, &script) {
            Ok(_) => Some("did not report a result".to_owned()),
            Err(e) if e.downcast_ref::<vm::Panicked>().is_some() && panics < MAX_PANIC_RETRIES => {
                panics += 1;
                eprintln!("error: {e:#}; a new guest runs the tests left");
                None
            }
            Err(e) => Some(format!("did not report: {e:#}")),
        };
        // The results file rather than the console's rig lines: it keeps
        // what reported when the guest then timed out or QEMU died.
        let reported = std::fs::read_to_string(log_dir.join(RESULTS_FILE)).unwrap_or_default();
        let wedged = std::fs::read_to_string(log_dir.join(WEDGED_FILE))
            .ok()
            .map(|w| w.trim().to_owned());
        for (name, status, secs) in parse_results(&reported) {
            if !remaining.contains(&name) {
                continue;
            }
            let log =
                std::fs::read_to_string(log_dir.join(format!("{name}.log"))).unwrap_or_default();
            remaining.retain(|t| *t != name);
            let mut verdict = verdict(status, &log, per_test_timeout);
            let refused = refused_features(&log);
            if matches!(verdict, Verdict::Fail(_)) && !refused.is_empty() {
                // Not a failure of the server: the script does not check
                // for a feature the kernel lacks (kublk fails it alike).
                verdict = Verdict::Skip(format!(
                    "the kernel lacks {} (the script does not check; add refused it)",
                    refused.join(", ")
                ));
            }
            if matches!(&verdict, Verdict::Skip(why) if why == NO_REASON) {
                let script =
                    std::fs::read_to_string(peers.selftests.join(format!("test_{name}.sh")))
                        .unwrap_or_default();
                let features =
                    std::fs::read_to_string(log_dir.join(FEATURES_FILE)).unwrap_or_default();
                let missing = missing_features(&script, &features);
                let programs = std::fs::read_to_string(log_dir.join(MISSING_PROGRAMS_FILE))
                    .unwrap_or_default();
                let absent = missing_programs(&script, &programs);
                if !missing.is_empty() {
                    verdict = Verdict::Skip(format!("the kernel lacks {}", missing.join(", ")));
                } else if !absent.is_empty() {
                    verdict = Verdict::Skip(format!("the guest has no {}", absent.join(", ")));
                }
            }
            // Last, so that no skip reasoning above hides a wedged kernel.
            if wedged.as_deref() == Some(name.as_str()) {
                let hung = format!(
                    "`del -a` after it did not return in {DEL_TIMEOUT} s: the guest kernel is wedged"
                );
                verdict = match verdict {
                    Verdict::Fail(why) => Verdict::Fail(format!("{why}; {hung}")),
                    _ => Verdict::Fail(hung),
                };
            }
            let kernel_log = log_dir.join(format!("{name}.dmesg"));
            if let Verdict::Fail(why) = &mut verdict {
                if kernel_log.exists() {
                    why.push_str(&format!(" (kernel log: {})", kernel_log.display()));
                }
            }
            results.push(TestResult {
                verdict,
                name,
                secs,
            });
        }
        // A wedged kernel would hang every test after it: they are not run.
        let end = match &wedged {
            Some(w) => Some(format!("not run: the guest kernel was wedged after {w}")),
            None => end,
        };
        if let Some(why) = end {
            results.extend(remaining.drain(..).map(|name| TestResult {
                name,
                verdict: Verdict::Fail(why.clone()),
                secs: 0,
            }));
        }
    }
    // The suite's order, whatever the reruns did.
    results.sort_by_key(|r| tests.iter().position(|t| *t == r.name));
    Ok(results)
}

/// Prints one line per test and the counts; returns whether none failed.
pub fn print_results(label: &str, results: &[TestResult]) -> bool {
    println!("\n=== kernel selftests: {label} ===");
    let w = results.iter().map(|r| r.name.len()).max().unwrap_or(4);
    for r in results {
        let (word, why) = match &r.verdict {
            Verdict::Pass => ("PASS", String::new()),
            Verdict::Skip(why) => ("SKIP", format!("  {why}")),
            Verdict::Fail(why) => ("FAIL", format!("  {why}")),
        };
        println!("{:w$}  {word}  {:>4} s{why}", r.name, r.secs);
    }
    let (pass, skip, fail) = counts(results);
    let secs: u64 = results.iter().map(|r| r.secs).sum();
    println!(
        "{} tests: {pass} passed, {fail} failed, {skip} skipped ({secs} s in the guest)",
        results.len()
    );
    fail == 0
}

/// (passed, skipped, failed).
pub fn counts(results: &[TestResult]) -> (usize, usize, usize) {
    let n = |f: fn(&Verdict) -> bool| results.iter().filter(|r| f(&r.verdict)).count();
    (
        n(|v| *v == Verdict::Pass),
        n(|v| matches!(v, Verdict::Skip(_))),
        n(|v| matches!(v, Verdict::Fail(_))),
    )
}

/// The tests `cargo xtask test` runs: those listed in
/// `build-support/selftests-passing.txt` (one name a line, `#` comments).
pub fn ci_list(ws: &Workspace) -> Result<Vec<String>> {
    let path = ws.root.join(CI_LIST);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(parse_list(&text))
}

/// The committed list of tests our server passes (every listed test must
/// pass), relative to the workspace root.
pub const CI_LIST: &str = "build-support/selftests-passing.txt";

/// The names in a list file.
fn parse_list(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The peers (kublk and the suite) and the server binary.
pub fn prepare(ws: &Workspace, server: Server) -> Result<(Kublk, PathBuf)> {
    let peers = peers::ensure_kublk().context("cannot build kublk and extract the selftests")?;
    let bin = match server {
        Server::Ours => build_ours(ws)?,
        Server::Kublk => peers.kublk.clone(),
    };
    Ok((peers, bin))
}

/// Runs `cargo xtask selftests`; returns whether no test failed.
pub fn run(opts: &SelftestOptions) -> Result<bool> {
    let ws = Workspace::locate()?;
    // The kernel first: peers::ensure compares kublk's build with it.
    let kernel = kernel::fetch(opts.suite)?;
    let (peers, bin) = prepare(&ws, opts.server)?;
    let tests = select(&suite_tests(&peers.selftests)?, &opts.tests)?;
    if tests.is_empty() {
        bail!("no tests in {}", peers.selftests.display());
    }
    eprintln!(
        "booting {} kernel {} ({}): {} selftests of {} with {}",
        kernel.suite,
        kernel.release,
        kernel.package_version,
        tests.len(),
        peers.version,
        opts.server.name()
    );
    let vm_opts = vm::VmOptions::new(&kernel, &ws, opts.mem_mb, opts.timeout)?;
    let results = run_suite(
        &ws,
        &kernel,
        &peers,
        (opts.server, &bin),
        &tests,
        opts.per_test_timeout,
        &vm_opts,
    )?;
    let label = format!(
        "{} {}, server {}",
        kernel.suite,
        kernel.version(),
        opts.server.name()
    );
    Ok(print_results(&label, &results))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The guest script run by the host's bash against a fake suite whose
    /// server's `del` never returns: the first test's clean-up times out,
    /// the kernel log is kept, the test is named wedged, and the tests
    /// after it are not run.
    #[test]
    fn a_hung_clean_up_stops_the_suite_and_keeps_the_kernel_log() {
        let root = std::env::temp_dir().join(format!("selftests-wedged-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (src, logs, st) = (root.join("src"), root.join("logs"), root.join("st"));
        std::fs::create_dir_all(&src).unwrap();
        for t in ["a", "b"] {
            std::fs::write(src.join(format!("test_{t}.sh")), "echo ran\nexit 0\n").unwrap();
        }
        let server = root.join("server");
        std::fs::write(
            &server,
            "#!/bin/sh\n[ \"$1\" = del ] && exec sleep 30\nexit 0\n",
        )
        .unwrap();
        let peers = Kublk {
            kublk: server.clone(),
            metadata_size: None,
            selftests: src,
            version: String::new(),
        };
        let tests = ["a".to_owned(), "b".to_owned()];
        let script = guest_script(&peers, &server, &tests, &logs, 10, 1)
            .unwrap()
            // The host's own sysrq and scratch directory stay untouched.
            .replace("/proc/sysrq-trigger", root.join("sysrq").to_str().unwrap())
            .replace("/tmp/ublk-selftests", st.to_str().unwrap());
        let status = std::process::Command::new("bash")
            .args(["-c", &format!("chmod +x {}; {script}", server.display())])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let results = std::fs::read_to_string(logs.join(RESULTS_FILE)).unwrap();
        assert_eq!(
            parse_results(&results)
                .iter()
                .map(|r| (r.0.as_str(), r.1))
                .collect::<Vec<_>>(),
            [("a", 0)]
        );
        assert_eq!(
            std::fs::read_to_string(logs.join(WEDGED_FILE))
                .unwrap()
                .trim(),
            "a"
        );
        assert!(logs.join("a.dmesg").exists());
        assert!(!logs.join("b.log").exists());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_missing_program_is_named() {
        let script = "if ! _have_program bpftrace; then\n exit 4\nfi\n_have_program fio\n";
        assert_eq!(missing_programs(script, "bpftrace\nsfdisk\n"), ["bpftrace"]);
        assert!(missing_programs(script, "").is_empty());
    }

    #[test]
    fn a_refused_feature_is_named() {
        let log = "ublk selftest: integrity_01 starting\nublk: the running kernel's ublk driver does not support UBLK_F_INTEGRITY|UBLK_F_NO_AUTO_PART_SCAN (kernel features: 0x1fe)\nintegrity_01 : [FAIL]\n";
        assert_eq!(
            refused_features(log),
            ["UBLK_F_INTEGRITY", "UBLK_F_NO_AUTO_PART_SCAN"]
        );
        assert!(refused_features("dd took 7 seconds\n").is_empty());
    }

    #[test]
    fn a_silent_skip_is_put_down_to_the_features_the_kernel_lacks() {
        let script = "if ! _have_feature \"BATCH_IO\"; then exit 4; fi\n\
                      _have_feature \"UBLK_F_NO_AUTO_PART_SCAN\"\n_add_ublk_dev -t loop -z f\n";
        let sid = "UBLK_F_SUPPORT_ZERO_COPY\nUBLK_F_BATCH_IO\nUBLK_F_NO_AUTO_PART_SCAN\n";
        assert!(missing_features(script, sid).is_empty());
        assert_eq!(
            missing_features(script, "UBLK_F_USER_COPY\n"),
            [
                "UBLK_F_BATCH_IO",
                "UBLK_F_NO_AUTO_PART_SCAN",
                "UBLK_F_SUPPORT_ZERO_COPY"
            ]
        );
        assert!(missing_features("_add_ublk_dev -t null\n", "").is_empty());
    }

    #[test]
    fn verdicts() {
        assert_eq!(
            verdict(0, "ublk selftest: x starting\nnull_01 : [PASS]\n", 9),
            Verdict::Pass
        );
        assert_eq!(
            verdict(
                4,
                "ublk selftest: x starting\nneeds bpftrace\ngeneric_02 : [SKIP]\n",
                9
            ),
            Verdict::Skip("needs bpftrace".into())
        );
        assert_eq!(
            verdict(4, "", 9),
            Verdict::Skip("exit 4, no reason printed".into())
        );
        // A background job's failure counts whatever the exit status.
        assert_eq!(
            verdict(0, "stress_05 failure: -t null -z\nstress_05 : [FAIL]\n", 9),
            Verdict::Fail("[FAIL] in its output (exit 0): stress_05 failure: -t null -z".into())
        );
        assert_eq!(verdict(1, "", 9), Verdict::Fail("exit 1".into()));
        assert_eq!(
            verdict(
                1,
                "ublk: invalid value 'stripe' for '--type <TARGET>'\nRunning in chroot, ignoring request.\nbatch_01 : [FAIL]\n",
                9
            ),
            Verdict::Fail(
                "[FAIL] in its output (exit 1): ublk: invalid value 'stripe' for '--type <TARGET>'"
                    .into()
            )
        );
        assert_eq!(
            verdict(124, "x : [PASS]", 150),
            Verdict::Fail("timed out after 150 s".into())
        );
    }

    #[test]
    fn names_and_selection() {
        assert_eq!(test_name("test_generic_03.sh"), Some("generic_03"));
        assert_eq!(test_name("test_common.sh"), Some("common"));
        assert_eq!(test_name("kublk.c"), None);
        let all: Vec<String> = ["generic_03", "null_01"].map(String::from).to_vec();
        assert_eq!(select(&all, &[]).unwrap(), all);
        let picked = select(&all, &["test_null_01.sh".into(), "generic_03".into()]).unwrap();
        assert_eq!(picked, ["null_01", "generic_03"]);
        let e = select(&all, &["nope".into()]).unwrap_err().to_string();
        assert!(e.contains("no test \"nope\""), "{e}");
        assert_eq!(
            parse_list("# c\nnull_01\n\n loop_01 # x\n"),
            ["null_01", "loop_01"]
        );
    }

    #[test]
    fn results_file() {
        assert_eq!(
            parse_results("4 12 generic_02\ngarbage\n0 3 null_01\n"),
            [("generic_02".into(), 4, 12), ("null_01".into(), 0, 3)]
        );
    }
}
