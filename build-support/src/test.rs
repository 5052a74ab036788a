//! `cargo xtask test`: lints, host tests, then every test binary's ignored
//! (kernel-needing) tests in one guest per kernel.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::kernel::{self, Suite};
use crate::selftests;
use crate::util::{self, shell_quote, Workspace};
use crate::vm;

/// A test executable built by cargo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestBinary {
    /// A readable name: the target name and kind, e.g. `e2e (test)`.
    pub name: String,
    /// The executable.
    pub path: PathBuf,
    /// The directory of the package's Cargo.toml (cargo test's working
    /// directory for it).
    pub package_dir: PathBuf,
}

/// Extracts the test executables from `cargo test --no-run
/// --message-format=json` output.
pub fn parse_artifacts(json_lines: &str) -> Vec<TestBinary> {
    json_lines
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["profile"]["test"] == true)
        .filter_map(|v| {
            let path = PathBuf::from(v["executable"].as_str()?);
            let target = v["target"]["name"].as_str()?;
            let kind = v["target"]["kind"]
                .as_array()
                .and_then(|k| k.first())
                .and_then(|k| k.as_str())
                .unwrap_or("test");
            let package_dir = PathBuf::from(v["manifest_path"].as_str()?)
                .parent()?
                .to_owned();
            Some(TestBinary {
                name: format!("{target} ({kind})"),
                path,
                package_dir,
            })
        })
        .collect()
}

/// Options of `cargo xtask test`.
#[derive(Debug)]
pub struct TestOptions {
    /// Kernels to run the guest tests on.
    pub suites: Vec<Suite>,
    /// Only lint and run the host tests.
    pub host_only: bool,
    /// Skip fmt, clippy and doc.
    pub skip_lint: bool,
    /// Run the guest tests with the full cycle counts ([`STRESS_ENV`]): on
    /// the one kernel picked, or on the newest (sid) of several.
    pub stress: bool,
    /// Guest timeout.
    pub timeout: Duration,
    /// Guest memory in MiB.
    pub mem_mb: u32,
}

/// The environment of `--stress`: the cycle counts the reliability issue
/// names (1000 null and, derived from it, 100 loop add/del cycles through
/// the CLI) and as many in-process library cycles. A variable already set
/// in the caller's environment wins.
pub const STRESS_ENV: [(&str, &str); 2] =
    [("UBLK_STRESS_CYCLES", "1000"), ("UBLK_E2E_CYCLES", "1000")];

/// One row of the summary.
#[derive(Debug)]
struct Row {
    kernel: String,
    binary: String,
    result: String,
    /// How long it took, where measured (seconds).
    secs: Option<u64>,
}

/// A test that printed `SKIP: reason` (it did not run, or not all of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    /// Where: `host` or the guest's label.
    pub kernel: String,
    /// The test binary (or cargo step).
    pub binary: String,
    /// The test's name as libtest prints it (`?` when not known).
    pub test: String,
    /// What it printed after `SKIP: `.
    pub reason: String,
}

/// The `SKIP: reason` lines of libtest output run with `--show-output`
/// (which prints a passing test's captured output under `---- NAME stdout
/// ----`): `(test, reason)`, the test `?` for a line outside such a block.
pub fn parse_skips(output: &str) -> Vec<(String, String)> {
    let mut test = "?";
    let mut skips = Vec::new();
    for line in output.lines() {
        let line = line.trim_end_matches('\r');
        if let Some(name) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            test = name;
        } else if line == "successes:" || line == "failures:" {
            test = "?";
        } else if let Some(reason) = line.trim_start().strip_prefix("SKIP: ") {
            skips.push((test.to_owned(), reason.trim().to_owned()));
        }
    }
    skips
}

/// Runs `cmd`, its stdout shown as it comes and returned; whether it
/// succeeded.
fn run_shown(cmd: &mut std::process::Command) -> Result<(bool, String)> {
    use std::io::{BufRead, Write};
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", util::describe(cmd)))?;
    let mut text = String::new();
    let out = child.stdout.take().context("no stdout")?;
    let mut reader = std::io::BufReader::new(out);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(&line).and_then(|()| stdout.flush());
        text.push_str(&String::from_utf8_lossy(&line));
        line.clear();
    }
    let status = child.wait().context("cannot wait for cargo")?;
    Ok((status.success(), text))
}

/// `cargo test --workspace` on the host, every test's output shown
/// (`--show-output`) so that its `SKIP:` lines are seen; records them.
fn host_tests(ws: &Workspace, rows: &mut Vec<Row>, skips: &mut Vec<Skip>) {
    let label = "cargo test (host)";
    eprintln!("\n=== {label} ===");
    let mut cmd = util::cargo();
    cmd.args(["test", "--workspace", "--", "--show-output"])
        .current_dir(&ws.root);
    eprintln!("+ {}", util::describe(&cmd));
    let started = Instant::now();
    let result = match run_shown(&mut cmd) {
        Ok((ok, text)) => {
            skips.extend(parse_skips(&text).into_iter().map(|(test, reason)| Skip {
                kernel: "host".into(),
                binary: label.into(),
                test,
                reason,
            }));
            if ok {
                "ok"
            } else {
                "FAILED"
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            "FAILED"
        }
    };
    rows.push(Row {
        kernel: "host".into(),
        binary: label.into(),
        result: result.into(),
        secs: Some(started.elapsed().as_secs()),
    });
}

/// Runs a cargo step in the workspace root; records failure in `rows`.
fn cargo_step(
    ws: &Workspace,
    label: &str,
    args: &[&str],
    env: &[(&str, &str)],
    rows: &mut Vec<Row>,
) {
    eprintln!("\n=== {label} ===");
    let mut cmd = util::cargo();
    cmd.args(args).current_dir(&ws.root);
    for (k, v) in env {
        cmd.env(k, v);
    }
    eprintln!("+ {}", util::describe(&cmd));
    let started = Instant::now();
    let result = match util::run(&mut cmd) {
        Ok(()) => "ok".to_owned(),
        Err(e) => {
            eprintln!("error: {e:#}");
            "FAILED".to_owned()
        }
    };
    rows.push(Row {
        kernel: "host".into(),
        binary: label.into(),
        result,
        secs: Some(started.elapsed().as_secs()),
    });
}

/// The arguments of the packaging check: every publishable crate packaged
/// and built from its package as crates.io would, the not yet published
/// path dependencies served from a local registry (`--workspace`, Cargo
/// 1.90+). `--allow-dirty`: it checks the work tree, committed or not.
pub const PUBLISH_DRY_RUN: [&str; 4] = ["publish", "--workspace", "--dry-run", "--allow-dirty"];

/// Whether `cargo publish --help` (its text) offers `--workspace`.
pub fn publish_has_workspace(help: &str) -> bool {
    help.lines()
        .any(|l| l.trim_start().split([' ', ',']).any(|w| w == "--workspace"))
}

/// `cargo publish --workspace --dry-run`, or a printed reason to skip it
/// where this cargo has no `publish --workspace`.
fn publish_dry_run(ws: &Workspace, rows: &mut Vec<Row>) {
    let help = util::output(
        util::cargo()
            .args(["publish", "--help"])
            .current_dir(&ws.root),
    )
    .unwrap_or_default();
    if !publish_has_workspace(&help) {
        let version = util::output(util::cargo().arg("--version")).unwrap_or_default();
        eprintln!(
            "\n=== cargo publish --dry-run ===\nskipped: {} has no `cargo publish --workspace` (Cargo 1.90 or newer has), which the dry run of crates whose path dependencies are not published yet needs",
            version.trim()
        );
        rows.push(Row {
            kernel: "host".into(),
            binary: "cargo publish --dry-run (skipped: cargo < 1.90)".into(),
            result: "ok".into(),
            secs: None,
        });
        return;
    }
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")));
    if let Some(home) = cargo_home {
        forget_unpacked_own_packages(&home.join("registry/src"), &OWN_PACKAGES);
    }
    // And what it built of them: cargo takes a registry crate of one
    // version to be unchanged and would link the dependents against the
    // old build, so the dry run builds in a target directory of its own,
    // fresh each time.
    let dir = ws.target_dir.join("publish-dry-run");
    let _ = std::fs::remove_dir_all(&dir);
    match dir.to_str() {
        Some(d) => cargo_step(
            ws,
            "cargo publish --dry-run",
            &PUBLISH_DRY_RUN,
            &[("CARGO_TARGET_DIR", d)],
            rows,
        ),
        None => cargo_step(ws, "cargo publish --dry-run", &PUBLISH_DRY_RUN, &[], rows),
    }
}

/// The workspace's publishable packages.
const OWN_PACKAGES: [&str; 3] = ["ublk-rs-sys", "ublk-rs", "ublk-tools"];

/// Removes what an earlier dry run unpacked of our own `packages` from the
/// local registry cargo serves them from. That registry's unpacked sources
/// live in `src_dir` under a name made of its path (`-<hash>`: a file URL
/// has no host), so the same checkout path gets the same folder, and
/// cargo does not unpack a crate whose folder exists: the dry run would
/// build the dependent crates against the library as it was then (a CI
/// run on the same path failed so). crates.io's folders are
/// `<host>-<hash>` and are left alone.
pub fn forget_unpacked_own_packages(src_dir: &Path, packages: &[&str]) {
    let Ok(registries) = std::fs::read_dir(src_dir) else {
        return;
    };
    for reg in registries.flatten() {
        if !reg.file_name().to_string_lossy().starts_with('-') {
            continue;
        }
        let Ok(crates) = std::fs::read_dir(reg.path()) else {
            continue;
        };
        for krate in crates.flatten() {
            let name = krate.file_name().to_string_lossy().into_owned();
            let ours = name.rsplit_once('-').is_some_and(|(pkg, version)| {
                packages.contains(&pkg) && version.starts_with(|c: char| c.is_ascii_digit())
            });
            if ours {
                if let Err(e) = std::fs::remove_dir_all(krate.path()) {
                    eprintln!("cannot remove {}: {e}", krate.path().display());
                }
            }
        }
    }
}

/// Builds the test binaries (and the workspace's binaries) and lists them.
fn build_test_binaries(ws: &Workspace) -> Result<Vec<TestBinary>> {
    eprintln!("\n=== building test binaries ===");
    util::run(
        util::cargo()
            .args(["build", "--workspace", "--bins"])
            .current_dir(&ws.root),
    )?;
    let mut cmd = util::cargo();
    cmd.args(["test", "--workspace", "--no-run", "--message-format=json"])
        .current_dir(&ws.root)
        .stdout(Stdio::piped());
    let out = cmd
        .spawn()
        .and_then(|c| c.wait_with_output())
        .context("cannot run cargo test --no-run")?;
    if !out.status.success() {
        anyhow::bail!("cargo test --no-run failed ({})", out.status);
    }
    Ok(parse_artifacts(&String::from_utf8_lossy(&out.stdout)))
}

/// The guest script running every binary's ignored tests, each one's
/// output (with `--show-output`, so that a passing test's `SKIP:` lines
/// are there too) also written to `log_dir/INDEX.log`, INDEX its place in
/// `binaries`.
fn guest_script(label: &str, binaries: &[TestBinary], log_dir: &Path) -> Result<String> {
    let logs = util::utf8(log_dir.as_os_str(), "log directory")?;
    let mut s = format!("failed=0\nlogs={}\nmkdir -p \"$logs\"\n", shell_quote(logs));
    for (i, b) in binaries.iter().enumerate() {
        let path = util::utf8(b.path.as_os_str(), "test binary path")?;
        let dir = util::utf8(b.package_dir.as_os_str(), "package directory")?;
        let header = format!("=== [{label}] {} ===", b.name);
        s += &format!(
            "echo {header}\nt0=$(date +%s)\n{{ (cd {dir} && {path} --ignored --test-threads=1 --show-output) 2>&1; \
             echo $? >\"$logs/{i}.status\"; }} | tee \"$logs/{i}.log\"\nst=$(cat \"$logs/{i}.status\")\n\
             [ \"$st\" -eq 0 ] || failed=1\necho\necho {marker} $st $(($(date +%s) - t0)) {name}\n",
            header = shell_quote(&header),
            dir = shell_quote(dir),
            path = shell_quote(path),
            marker = RESULT_MARKER,
            name = shell_quote(&b.name),
        );
    }
    s += "exit $failed\n";
    Ok(s)
}

/// Marker of one binary's result: `MARKER STATUS SECONDS NAME`.
const RESULT_MARKER: &str = "@@UBLK-RIG-RESULT@@";

/// Runs `cargo xtask test`; returns whether everything passed.
pub fn run(opts: &TestOptions) -> Result<bool> {
    let ws = Workspace::locate()?;
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut skips = Vec::new();
    if !opts.skip_lint {
        cargo_step(
            &ws,
            "cargo fmt",
            &["fmt", "--all", "--", "--check"],
            &[],
            &mut rows,
        );
        cargo_step(
            &ws,
            "cargo clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
            &[],
            &mut rows,
        );
        cargo_step(
            &ws,
            "cargo doc",
            &["doc", "--workspace", "--no-deps"],
            &[("RUSTDOCFLAGS", "-D warnings")],
            &mut rows,
        );
    }
    host_tests(&ws, &mut rows, &mut skips);
    publish_dry_run(&ws, &mut rows);

    if !opts.host_only {
        match build_test_binaries(&ws) {
            Err(e) => {
                eprintln!("error: {e:#}");
                rows.push(Row {
                    kernel: "host".into(),
                    binary: "build test binaries".into(),
                    result: "FAILED".into(),
                    secs: None,
                });
            }
            Ok(binaries) => {
                eprintln!("{} test binaries", binaries.len());
                for &suite in &opts.suites {
                    guest_run(&ws, suite, &binaries, opts, &mut rows, &mut skips);
                }
            }
        }
    }

    if !opts.host_only && opts.suites.contains(&Suite::Sid) {
        kernel_selftests(&ws, opts, &mut rows, &mut skips);
    }

    let all_ok = rows.iter().all(|r| r.result == "ok");
    print_summary(&rows, &skips);
    println!(
        "\n`cargo xtask test` took {} s (guest rows: the binary's own run; boots and builds are the rest)",
        started.elapsed().as_secs()
    );
    Ok(all_ok)
}

/// Boots one guest of `suite` running all binaries; adds rows.
fn guest_run(
    ws: &Workspace,
    suite: Suite,
    binaries: &[TestBinary],
    opts: &TestOptions,
    rows: &mut Vec<Row>,
    skips: &mut Vec<Skip>,
) {
    let failed_row = |rows: &mut Vec<Row>, kernel: String, e: anyhow::Error| {
        eprintln!("error: {e:#}");
        rows.push(Row {
            kernel,
            binary: "(guest)".into(),
            result: format!("FAILED: {e:#}"),
            secs: None,
        });
    };
    let kernel = match kernel::fetch(suite) {
        Ok(k) => k,
        Err(e) => return failed_row(rows, suite.to_string(), e),
    };
    // The full counts add about 20 minutes to a guest (0.5 to 1.3 s per
    // CLI cycle under TCG): with both kernels they run on the newest, so
    // that CI stays well inside its 90 minutes, and 6.12 runs the default
    // counts.
    let stress = opts.stress && (suite == Suite::Sid || opts.suites.len() == 1);
    let label = format!(
        "{suite} {}{}",
        kernel.version(),
        if stress { " (stress)" } else { "" }
    );
    eprintln!("\n=== guest tests on {label} ({}) ===", kernel.release);
    let log_dir = ws.target_dir.join("guest-tests").join(suite.name());
    let attempt = |binaries: &[TestBinary]| {
        guest_script(&label, binaries, &log_dir).and_then(|script| {
            let mut vm_opts = vm::VmOptions::new(&kernel, ws, opts.mem_mb, opts.timeout)?;
            if stress {
                for (k, v) in STRESS_ENV {
                    if !vm_opts.env.iter().any(|(set, _)| set == k) {
                        vm_opts.env.push((k.into(), v.into()));
                    }
                }
            }
            vm::run(&kernel, &vm_opts, &script)
        })
    };
    // A guest kernel oops (a stale int3 of the kernel's text patching
    // under multi-threaded TCG) was seen now and then with no test at
    // fault: it is shown in full above, and a new guest runs the binaries
    // that had not reported yet (the one running included, so a panic it
    // causes every time still fails).
    let mut remaining = binaries.to_vec();
    let mut panics = 0;
    loop {
        match attempt(&remaining) {
            Ok(outcome) => {
                let reported = record_results(rows, &label, &outcome.rig_lines);
                skips.extend(logged_skips(&label, &log_dir, &remaining, &reported));
                if reported.len() < remaining.len() || (outcome.status != 0 && reported.is_empty())
                {
                    rows.push(Row {
                        kernel: label,
                        binary: "(guest)".into(),
                        result: format!(
                            "FAILED: {} of {} binaries reported",
                            reported.len(),
                            remaining.len()
                        ),
                        secs: None,
                    });
                }
                return;
            }
            Err(e) => match e.downcast_ref::<vm::Panicked>() {
                Some(p) if panics < MAX_PANIC_RETRIES => {
                    panics += 1;
                    let reported = record_results(rows, &label, &p.rig_lines);
                    skips.extend(logged_skips(&label, &log_dir, &remaining, &reported));
                    remaining.retain(|b| !reported.contains(&b.name));
                    let running = remaining.first().map_or("?", |b| b.name.as_str());
                    eprintln!(
                        "error: {e:#} while {running} ran; a new {label} guest runs the {} binaries left",
                        remaining.len()
                    );
                    rows.push(Row {
                        kernel: label.clone(),
                        binary: format!("(guest panicked in {running}; rerun)"),
                        result: "ok".into(),
                        secs: None,
                    });
                }
                _ => return failed_row(rows, label, e),
            },
        }
    }
}

/// The `SKIP:` lines in the logs of the binaries of one guest run
/// (`ran`, in the order the script ran them) that reported.
fn logged_skips(label: &str, log_dir: &Path, ran: &[TestBinary], reported: &[String]) -> Vec<Skip> {
    ran.iter()
        .enumerate()
        .filter(|(_, b)| reported.contains(&b.name))
        .flat_map(|(i, b)| {
            let log = std::fs::read_to_string(log_dir.join(format!("{i}.log"))).unwrap_or_default();
            parse_skips(&log).into_iter().map(|(test, reason)| Skip {
                kernel: label.to_owned(),
                binary: b.name.clone(),
                test,
                reason,
            })
        })
        .collect()
}

/// The kernel's ublk selftests our server passes (those listed in
/// [`selftests::CI_LIST`]) on sid: one row, a failing test fails it; the
/// suite's other tests are counted as not yet run by CI.
fn kernel_selftests(
    ws: &Workspace,
    opts: &TestOptions,
    rows: &mut Vec<Row>,
    skips: &mut Vec<Skip>,
) {
    eprintln!("\n=== kernel selftests on sid ===");
    let started = Instant::now();
    let outcome = (|| {
        let kernel = kernel::fetch(Suite::Sid)?;
        let (peers, bin) = selftests::prepare(ws, selftests::Server::Ours)?;
        let all = selftests::suite_tests(&peers.selftests)?;
        let listed = selftests::select(&all, &selftests::ci_list(ws)?)
            .with_context(|| format!("in {}", selftests::CI_LIST))?;
        let vm_opts = vm::VmOptions::new(&kernel, ws, opts.mem_mb, opts.timeout)?;
        let results = selftests::run_suite(
            ws,
            &kernel,
            &peers,
            (selftests::Server::Ours, &bin),
            &listed,
            SELFTEST_TIMEOUT,
            &vm_opts,
        )?;
        let label = format!("sid {}", kernel.version());
        selftests::print_results(
            &format!("{label}, server ours ({})", selftests::CI_LIST),
            &results,
        );
        Ok::<_, anyhow::Error>((label, all.len(), results))
    })();
    match outcome {
        Err(e) => {
            eprintln!("error: {e:#}");
            rows.push(Row {
                kernel: "sid".into(),
                binary: "kernel selftests".into(),
                result: format!("FAILED: {e:#}"),
                secs: None,
            });
        }
        Ok((label, total, results)) => {
            let failed: Vec<&str> = results
                .iter()
                .filter(|r| matches!(r.verdict, selftests::Verdict::Fail(_)))
                .map(|r| r.name.as_str())
                .collect();
            for r in &results {
                if let selftests::Verdict::Skip(reason) = &r.verdict {
                    skips.push(Skip {
                        kernel: label.clone(),
                        binary: "kernel selftests".into(),
                        test: r.name.clone(),
                        reason: reason.clone(),
                    });
                }
            }
            rows.push(Row {
                kernel: label,
                binary: format!(
                    "kernel selftests: {} listed, {} not yet run by CI",
                    results.len(),
                    total - results.len()
                ),
                result: if failed.is_empty() {
                    "ok".into()
                } else {
                    format!("FAILED: {}", failed.join(" "))
                },
                secs: Some(started.elapsed().as_secs()),
            });
        }
    }
}

/// Seconds one kernel selftest may run in `cargo xtask test`.
const SELFTEST_TIMEOUT: u64 = 600;

/// How many times one kernel's guest may panic before its tests fail.
const MAX_PANIC_RETRIES: u32 = 2;

/// Adds a row per result marker in `rig_lines`; returns the names of the
/// binaries that reported.
fn record_results(rows: &mut Vec<Row>, label: &str, rig_lines: &[String]) -> Vec<String> {
    let mut reported = Vec::new();
    for line in rig_lines {
        let Some(rest) = line.strip_prefix(RESULT_MARKER) else {
            continue;
        };
        let (status, rest) = rest.trim().split_once(' ').unwrap_or((rest.trim(), "?"));
        let (secs, name) = match rest.split_once(' ') {
            Some((secs, name)) if secs.parse::<u64>().is_ok() => (secs.parse().ok(), name),
            _ => (None, rest),
        };
        rows.push(Row {
            kernel: label.to_owned(),
            binary: name.to_owned(),
            result: if status == "0" {
                "ok".into()
            } else {
                format!("FAILED (exit {status})")
            },
            secs,
        });
        reported.push(name.to_owned());
    }
    reported
}

/// Prints the summary table, then the tests that skipped.
fn print_summary(rows: &[Row], skips: &[Skip]) {
    let w0 = rows
        .iter()
        .map(|r| r.kernel.len())
        .chain([6])
        .max()
        .unwrap_or(6);
    let w1 = rows
        .iter()
        .map(|r| r.binary.len())
        .chain([6])
        .max()
        .unwrap_or(6);
    println!("\n=== summary ===");
    println!("{:w0$}  {:w1$}  {:>6}  result", "kernel", "binary", "secs");
    for r in rows {
        let secs = r.secs.map_or(String::new(), |s| s.to_string());
        println!(
            "{:w0$}  {:w1$}  {secs:>6}  {}",
            r.kernel, r.binary, r.result
        );
    }
    println!(
        "\n{} skipped (they did not run, or not all of them did):",
        skips.len()
    );
    for s in skips {
        println!(
            "  SKIP  {}  {}  {}: {}",
            s.kernel, s.binary, s.test, s.reason
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_are_recorded_per_binary() {
        let mut rows = Vec::new();
        let lines = [
            format!("{RESULT_MARKER} 0 12 ublk (lib)"),
            "@@UBLK-RIG-OTHER@@ x".to_owned(),
            format!("{RESULT_MARKER} 101 345 kernel_cli (test)"),
            format!("{RESULT_MARKER} 0 kernel_x (test)"),
        ];
        let reported = record_results(&mut rows, "sid 7.2.13", &lines);
        assert_eq!(
            reported,
            ["ublk (lib)", "kernel_cli (test)", "kernel_x (test)"]
        );
        let results: Vec<_> = rows.iter().map(|r| r.result.as_str()).collect();
        assert_eq!(results, ["ok", "FAILED (exit 101)", "ok"]);
        let secs: Vec<_> = rows.iter().map(|r| r.secs).collect();
        assert_eq!(secs, [Some(12), Some(345), None]);
        assert!(rows.iter().all(|r| r.kernel == "sid 7.2.13"));
    }

    #[test]
    fn skips_are_attributed_to_their_test() {
        let out = "running 3 tests\ntest a ... ok\ntest b ... ok\n\nsuccesses:\n\n---- a stdout ----\nnoise\nSKIP: the kernel lacks UBLK_F_QUIESCE\n\n---- b stdout ----\n  SKIP: [\"-z\"]: no zero copy\n\nsuccesses:\n    a\n    b\nSKIP: stray\n";
        assert_eq!(
            parse_skips(out),
            [
                ("a".into(), "the kernel lacks UBLK_F_QUIESCE".into()),
                ("b".into(), "[\"-z\"]: no zero copy".into()),
                ("?".into(), "stray".into()),
            ]
        );
    }

    #[test]
    fn artifacts() {
        let json = r#"{"reason":"compiler-artifact","package_id":"path+file:///w/ublk-rs#ublk@0.1.0","manifest_path":"/w/ublk-rs/Cargo.toml","target":{"kind":["lib"],"crate_types":["lib"],"name":"ublk","src_path":"/w/ublk-rs/src/lib.rs"},"profile":{"opt_level":"0","test":true},"features":[],"filenames":["/w/target/debug/deps/ublk-abc"],"executable":"/w/target/debug/deps/ublk-abc","fresh":true}
{"reason":"compiler-artifact","manifest_path":"/w/ublk-rs/Cargo.toml","target":{"kind":["lib"],"name":"ublk"},"profile":{"test":false},"executable":null}
{"reason":"compiler-artifact","manifest_path":"/w/Cargo.toml","target":{"kind":["test"],"name":"e2e"},"profile":{"test":true},"executable":"/w/target/debug/deps/e2e-1"}
{"reason":"build-script-executed","package_id":"x"}
{"reason":"build-finished","success":true}
not json"#;
        let bins = parse_artifacts(json);
        assert_eq!(
            bins,
            [
                TestBinary {
                    name: "ublk (lib)".into(),
                    path: "/w/target/debug/deps/ublk-abc".into(),
                    package_dir: "/w/ublk-rs".into(),
                },
                TestBinary {
                    name: "e2e (test)".into(),
                    path: "/w/target/debug/deps/e2e-1".into(),
                    package_dir: "/w".into(),
                },
            ]
        );
    }

    #[test]
    fn stale_unpacked_packages_are_removed_from_local_registries_only() {
        let root = std::env::temp_dir().join(format!("unpacked-{}", std::process::id()));
        let dirs = [
            "-14cd1cce6819ff87/ublk-rs-0.1.0",
            "-14cd1cce6819ff87/ublk-rs-sys-0.1.0",
            "-14cd1cce6819ff87/serde-1.0.0",
            "-14cd1cce6819ff87/ublk-rs-extra-0.1.0",
            "index.crates.io-1949cf8c6b5b557f/ublk-rs-0.1.0",
        ];
        for d in dirs {
            std::fs::create_dir_all(root.join(d).join("src")).unwrap();
        }
        forget_unpacked_own_packages(&root, &OWN_PACKAGES);
        let left: Vec<bool> = dirs.iter().map(|d| root.join(d).exists()).collect();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(left, [false, false, true, true, true]);
    }

    #[test]
    fn publish_workspace_flag_is_recognised() {
        let new = "Options:\n      --dry-run  Perform all checks without uploading\n      --workspace  Package all packages in the workspace\n";
        let old = "Options:\n      --dry-run  Perform all checks without uploading\n  -p, --package [<SPEC>]  Package to publish\n";
        assert!(publish_has_workspace(new));
        assert!(!publish_has_workspace(old));
        assert_eq!(PUBLISH_DRY_RUN[..2], ["publish", "--workspace"]);
    }

    #[test]
    fn script() {
        let bins = [TestBinary {
            name: "e2e (test)".into(),
            path: "/w/t/e2e-1".into(),
            package_dir: "/w".into(),
        }];
        let s = guest_script("sid 7.2.13", &bins, Path::new("/w/t/logs")).expect("script");
        assert!(s.contains("echo '=== [sid 7.2.13] e2e (test) ==='\n"));
        assert!(s.contains(
            "{ (cd /w && /w/t/e2e-1 --ignored --test-threads=1 --show-output) 2>&1; echo $? >\"$logs/0.status\"; } | tee \"$logs/0.log\"\n"
        ));
        assert!(s.contains("echo @@UBLK-RIG-RESULT@@ $st $(($(date +%s) - t0)) 'e2e (test)'\n"));
        assert!(s.ends_with("exit $failed\n"));
    }
}
