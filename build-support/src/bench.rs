//! `cargo xtask bench`: builds the release `ublk` binary and the fio bench
//! (`benches/fio.rs`), runs the bench in a guest, and prints the table it
//! wrote (`target/bench-report.md`). criterion's HTML report lands in
//! `target/criterion/report/index.html` (the target directory is shared
//! writable with the guest).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::kernel::Suite;
use crate::util::{self, Workspace};

/// Options of `cargo xtask bench`.
#[derive(Debug)]
pub struct BenchOptions {
    /// The guest kernel.
    pub suite: Suite,
    /// Guest timeout.
    pub timeout: Duration,
    /// Guest memory in MiB.
    pub mem_mb: u32,
    /// Arguments for the bench executable after `--bench` (criterion's
    /// filter and options).
    pub args: Vec<String>,
}

/// The bench executable from `cargo bench --no-run --message-format=json`.
pub fn bench_executable(json_lines: &str, name: &str) -> Option<PathBuf> {
    json_lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == name)
        .filter(|v| {
            v["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bench"))
        })
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
}

/// Builds, runs the bench in a guest, prints the report; returns the
/// guest's exit status.
pub fn run(opts: &BenchOptions) -> Result<u8> {
    let ws = Workspace::locate()?;
    eprintln!("=== building ublk (release) and the fio bench ===");
    util::run(
        util::cargo()
            .args(["build", "--release", "-p", "ublk-tools", "--bins"])
            .current_dir(&ws.root),
    )?;
    let out = util::cargo()
        .args([
            "bench",
            "-p",
            "ublk-e2e",
            "--bench",
            "fio",
            "--no-run",
            "--message-format=json",
        ])
        .current_dir(&ws.root)
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|c| c.wait_with_output())
        .context("cannot run cargo bench --no-run")?;
    if !out.status.success() {
        bail!("cargo bench --no-run failed ({})", out.status);
    }
    let exe = bench_executable(&String::from_utf8_lossy(&out.stdout), "fio")
        .context("cargo bench --no-run reported no fio bench executable")?;
    // The peer servers the report compares with (built once, cached).
    let peers =
        crate::peers::ensure().context("cannot build the peer ublk servers kublk and rublk")?;
    eprintln!(
        "peers: kublk ({}) {}, rublk {} {}",
        peers.kublk_version,
        peers.kublk.display(),
        peers.rublk_version,
        peers.rublk.display()
    );
    let kernel = crate::kernel::fetch(opts.suite)?;
    eprintln!(
        "booting {} kernel {} ({})...",
        kernel.suite, kernel.release, kernel.package_version
    );
    let vm_opts = crate::vm::VmOptions::new(&kernel, &ws, opts.mem_mb, opts.timeout)?;
    let report = ws.target_dir.join("bench-report.md");
    let _ = std::fs::remove_file(&report);
    let mut cmd = vec![
        util::utf8(exe.as_os_str(), "bench executable")?.to_owned(),
        "--bench".to_owned(),
    ];
    cmd.extend(opts.args.iter().cloned());
    let body = format!(
        "export CRITERION_HOME={}\nexport UBLK_BIN={}\nexport UBLK_BENCH_KUBLK={}\nexport UBLK_BENCH_RUBLK={}\nexport UBLK_BENCH_PEERS={}\n{}\n",
        util::shell_quote(util::utf8(
            ws.target_dir.join("criterion").as_os_str(),
            "target directory"
        )?),
        util::shell_quote(util::utf8(
            ws.target_dir.join("release/ublk").as_os_str(),
            "target directory"
        )?),
        util::shell_quote(util::utf8(peers.kublk.as_os_str(), "kublk path")?),
        util::shell_quote(util::utf8(peers.rublk.as_os_str(), "rublk path")?),
        util::shell_quote(&format!(
            "kublk from {}, rublk {}",
            peers.kublk_version, peers.rublk_version
        )),
        util::shell_join(&cmd)
    );
    // A guest oops under TCG (see `cargo xtask test`) ends the run: one
    // more guest runs it again.
    let outcome = match crate::vm::run(&kernel, &vm_opts, &body) {
        Err(e) if e.downcast_ref::<crate::vm::Panicked>().is_some() => {
            eprintln!("error: {e:#}; running the benches again in a new guest");
            crate::vm::run(&kernel, &vm_opts, &body)?
        }
        r => r?,
    };
    match std::fs::read_to_string(&report) {
        Ok(md) => {
            println!("\n=== {} ===\n\n{md}", report.display());
            println!(
                "criterion report: {}",
                ws.target_dir.join("criterion/report/index.html").display()
            );
        }
        Err(e) => eprintln!("no report at {}: {e}", report.display()),
    }
    Ok(u8::try_from(outcome.status).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_bench() {
        let json = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"ublk_e2e"},"executable":null}
{"reason":"compiler-artifact","target":{"kind":["bench"],"name":"micro"},"executable":"/w/target/release/deps/micro-1"}
{"reason":"compiler-artifact","target":{"kind":["bench"],"name":"fio"},"executable":"/w/target/release/deps/fio-2"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            bench_executable(json, "fio"),
            Some(PathBuf::from("/w/target/release/deps/fio-2"))
        );
        assert_eq!(bench_executable(json, "nope"), None);
    }
}
