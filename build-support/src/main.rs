//! `cargo xtask`: developer commands of the ublk-rs workspace.
//!
//! * `vm` runs a command as root in a QEMU guest booted with a Debian kernel
//!   that has the ublk driver (this rig's reason to exist: the host kernel
//!   may lack ublk, and KVM may be unavailable).
//! * `test` runs lints, host tests, and the kernel-needing (`#[ignore]`d)
//!   tests in guests.
//! * `refresh-header` updates ublk-sys's copy of the kernel's ublk_cmd.h.
//! * `peers` builds and caches the peer ublk servers the bench compares
//!   against (kublk of the kernel selftests, rublk).
//! * `selftests` runs the kernel's ublk selftests (`test_*.sh`) in a guest
//!   with our `ublk` as their `kublk`, or with kublk itself.
//! * `man` writes the commands' man pages into `target/man/`.

mod bench;
mod demo;
mod deps;
mod header;
mod initramfs;
mod kernel;
mod man;
mod peers;
mod selftests;
mod test;
mod util;
mod vm;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use kernel::Suite;

/// Developer commands of the ublk-rs workspace.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a command as root in a guest with the ublk driver.
    Vm {
        /// The Debian suite whose newest kernel to boot.
        #[arg(long, value_enum, default_value = "sid")]
        kernel: Suite,
        /// Seconds before the guest is killed.
        #[arg(long, default_value_t = 2400)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 3072)]
        mem: u32,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// The main job: the kernel documentation's loop-device example, end
    /// to end, in a guest.
    Demo {
        /// The Debian suite whose newest kernel to boot.
        #[arg(long, value_enum, default_value = "sid")]
        kernel: Suite,
        /// Seconds before the guest is killed.
        #[arg(long, default_value_t = 1200)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 3072)]
        mem: u32,
    },
    /// Lint, run the host tests, then the kernel tests in guests.
    Test {
        /// Which kernels to run the guest tests on.
        #[arg(long, value_enum, default_value = "all")]
        kernel: KernelChoice,
        /// Skip the guest tests.
        #[arg(long)]
        host_only: bool,
        /// Skip cargo fmt, clippy and doc.
        #[arg(long)]
        skip_lint: bool,
        /// The full cycle counts of the reliability issue: 1000 add/del
        /// cycles of a null device and 100 of a loop device through the
        /// CLI, 1000 in-process add/start/stop/delete cycles (the default
        /// is 30, 15 and 200), on the kernel picked with --kernel, or on
        /// sid of both. What CI runs.
        #[arg(long)]
        stress: bool,
        /// Seconds before a guest is killed (the sid guest of `--stress` takes
        /// about half an hour on an idle 2-core host, twice that on a loaded one).
        #[arg(long, default_value_t = 4800)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 3072)]
        mem: u32,
    },
    /// Run the fio benches (benches/fio.rs) in a guest; writes
    /// target/bench-report.md and target/criterion.
    Bench {
        /// The Debian suite whose newest kernel to boot.
        #[arg(long, value_enum, default_value = "sid")]
        kernel: Suite,
        /// Seconds before the guest is killed.
        #[arg(long, default_value_t = 10800)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 3072)]
        mem: u32,
        /// criterion's filter (a regex over TARGET/JOB/VARIANT) and options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the kernel's ublk selftests (tools/testing/selftests/ublk of
    /// Debian's linux-source-7.2) in a guest, with our `ublk` (release) as
    /// their `kublk`, or with kublk itself; one line per test and a summary.
    Selftests {
        /// The Debian suite whose newest kernel to boot.
        #[arg(long, value_enum, default_value = "sid")]
        kernel: Suite,
        /// The server the scripts drive.
        #[arg(long, value_enum, default_value = "ours")]
        server: selftests::Server,
        /// Seconds one test script may run before it is killed (and fails).
        #[arg(long, default_value_t = 600)]
        test_timeout: u64,
        /// Seconds before the guest is killed.
        #[arg(long, default_value_t = 10800)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 3072)]
        mem: u32,
        /// Tests to run (e.g. `generic_03` or `test_generic_03.sh`); all of
        /// them by default.
        tests: Vec<String>,
    },
    /// Write the man pages of ublk (one per subcommand too), ublk-loop and
    /// ublk-null, generated from their clap definitions, into target/man/.
    Man {
        /// Write them here instead.
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
    },
    /// Update ublk-sys/include/ublk_cmd.h from Debian's newest kernel source.
    RefreshHeader {
        /// The Debian suite whose linux-source package to use.
        #[arg(long, value_enum, default_value = "sid")]
        suite: Suite,
        /// Only resolve and print the package, download nothing.
        #[arg(long)]
        dry_run: bool,
        /// Write ublk_cmd.h, KERNEL_VERSION and LICENSES/ here instead of
        /// ublk-sys/include.
        #[arg(long)]
        out_dir: Option<std::path::PathBuf>,
        /// Do not regenerate the ublk-sys bindings afterwards.
        #[arg(long)]
        no_bindings: bool,
    },
    /// Build (once) and cache the peer ublk servers the bench compares
    /// against, kublk (the kernel selftests' server, from Debian sid's
    /// linux-source) and rublk (crates.io); print their paths and versions.
    Peers {
        /// Look sid's package versions up again (rebuilding kublk if they
        /// changed) even when the cached build matches the cached kernel.
        #[arg(long)]
        update: bool,
    },
}

/// `--kernel` of `cargo xtask test`.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum KernelChoice {
    /// Debian unstable's kernel.
    Sid,
    /// Debian 13's kernel.
    Trixie,
    /// Both, sid first.
    All,
}

impl KernelChoice {
    /// The suites selected.
    fn suites(self) -> Vec<Suite> {
        match self {
            KernelChoice::Sid => vec![Suite::Sid],
            KernelChoice::Trixie => vec![Suite::Trixie],
            KernelChoice::All => vec![Suite::Sid, Suite::Trixie],
        }
    }
}

/// Runs the CLI; returns the process exit code.
fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Cmd::Vm {
            kernel,
            timeout,
            mem,
            command,
        } => {
            deps::ensure(deps::VM_PACKAGES)?;
            let ws = util::Workspace::locate()?;
            let kernel = kernel::fetch(kernel)?;
            eprintln!(
                "booting {} kernel {} ({})...",
                kernel.suite, kernel.release, kernel.package_version
            );
            let opts = vm::VmOptions::new(&kernel, &ws, mem, Duration::from_secs(timeout))?;
            let body = format!("exec {}", util::shell_join(&command));
            let outcome = vm::run(&kernel, &opts, &body)?;
            if std::env::var_os("UBLK_RIG_VERBOSE").is_some() {
                eprintln!("guest boot took {:.1} s", outcome.boot_secs);
            }
            Ok(u8::try_from(outcome.status).unwrap_or(1))
        }
        Cmd::Demo {
            kernel,
            timeout,
            mem,
        } => {
            deps::ensure_for_tests()?;
            demo::run(kernel, mem, Duration::from_secs(timeout))
        }
        Cmd::Test {
            kernel,
            host_only,
            skip_lint,
            stress,
            timeout,
            mem,
        } => {
            deps::ensure_for_tests()?;
            let ok = test::run(&test::TestOptions {
                suites: kernel.suites(),
                host_only,
                skip_lint,
                stress,
                timeout: Duration::from_secs(timeout),
                mem_mb: mem,
            })?;
            Ok(if ok { 0 } else { 1 })
        }
        Cmd::Bench {
            kernel,
            timeout,
            mem,
            args,
        } => {
            deps::ensure_for_tests()?;
            deps::ensure(deps::BENCH_PACKAGES)?;
            bench::run(&bench::BenchOptions {
                suite: kernel,
                timeout: Duration::from_secs(timeout),
                mem_mb: mem,
                args,
            })
        }
        Cmd::Selftests {
            kernel,
            server,
            test_timeout,
            timeout,
            mem,
            tests,
        } => {
            deps::ensure_for_tests()?;
            let ok = selftests::run(&selftests::SelftestOptions {
                suite: kernel,
                server,
                tests,
                per_test_timeout: test_timeout,
                timeout: Duration::from_secs(timeout),
                mem_mb: mem,
            })?;
            Ok(if ok { 0 } else { 1 })
        }
        Cmd::Man { out_dir } => {
            let dir = match out_dir {
                Some(d) => d,
                None => util::Workspace::locate()?.target_dir.join("man"),
            };
            for page in man::generate(&dir)? {
                println!("{}", page.display());
            }
            Ok(0)
        }
        Cmd::RefreshHeader {
            suite,
            dry_run,
            out_dir,
            no_bindings,
        } => {
            deps::ensure(&["xz-utils", "debian-archive-keyring", "libclang-dev"])?;
            header::refresh(&header::RefreshOptions {
                suite,
                resolve_only: dry_run,
                out_dir,
                no_bindings,
            })?;
            Ok(0)
        }
        Cmd::Peers { update } => {
            let peers = if update {
                peers::update()?
            } else {
                peers::ensure()?
            };
            println!(
                "kublk          {}  ({})",
                peers.kublk.display(),
                peers.kublk_version
            );
            if let Some(helper) = &peers.metadata_size {
                println!("metadata_size  {}", helper.display());
            }
            println!(
                "rublk          {}  ({})",
                peers.rublk.display(),
                peers.rublk_version
            );
            Ok(0)
        }
    }
}

/// Entry point: runs the CLI, printing any error as one line.
fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
