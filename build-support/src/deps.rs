//! Installing the Debian packages the rig needs on the host.

use std::process::Command;

use anyhow::{Context, Result};

use crate::util;

/// Packages needed to boot a guest (`cargo xtask vm`).
pub const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "xz-utils",
    "e2fsprogs",
    "kmod",
    "debian-archive-keyring",
];

/// Additional packages needed by the full test run (`cargo xtask test`).
pub const TEST_PACKAGES: &[&str] = &["cpio", "fio", "libclang-dev", "xfsprogs"];

/// Whether `pkg` is installed, according to dpkg.
fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}", pkg])
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).starts_with("ii"))
        .unwrap_or(false)
}

/// Installs those of `pkgs` that are missing: one `apt-get update`, then
/// `apt-get install -y`.  Uses `sudo` when not running as root.  Does
/// nothing (but says so) on hosts without dpkg.
pub fn ensure(pkgs: &[&str]) -> Result<()> {
    if Command::new("dpkg-query")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "note: dpkg-query not found; not checking host packages ({})",
            pkgs.join(" ")
        );
        return Ok(());
    }
    let missing: Vec<&str> = pkgs.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing missing Debian packages: {}", missing.join(" "));
    let apt = |args: &[&str]| {
        let mut cmd = if util::is_root() {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        eprintln!("+ {}", util::describe(&cmd));
        util::run(util::stdout_to_stderr(&mut cmd))
    };
    apt(&["update"]).context("cannot update the host's package lists")?;
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args).with_context(|| format!("cannot install {}", missing.join(" ")))
}

/// Installs what the guest rig and the guest tests need.
pub fn ensure_for_tests() -> Result<()> {
    let mut pkgs = VM_PACKAGES.to_vec();
    pkgs.extend(TEST_PACKAGES);
    ensure(&pkgs)
}
