//! Installing the Debian packages the rig needs on the host.
//!
//! Set-up never removes a package the user has: every install runs with
//! `--no-remove`, so apt fails instead of trading an installed package for
//! one of ours. When the host's installed qemu packages come from the
//! backports suite (a `~bpoN` version: `qemu-utils` from bookworm-backports,
//! say) and that suite is not in the host's sources, the matching
//! `qemu-system-x86` is taken from the same suite through a private list
//! (the host's apt configuration is never changed).

use std::path::PathBuf;
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

/// Additional packages needed by the full test run (`cargo xtask test`,
/// and `cargo xtask selftests`): `fdisk` for the kernel selftests' sfdisk
/// (their bpftrace tests skip without it, saying so), `udev` for the test
/// of the shipped udev rule (systemd-udevd in the guest), `nbdkit` and
/// `qemu-utils` (`qemu-nbd`, `qemu-img`) for the NBD servers of the nbd
/// target's tests, which run them in the guest.
pub const TEST_PACKAGES: &[&str] = &[
    "cpio",
    "fdisk",
    "fio",
    "libclang-dev",
    "nbdkit",
    "qemu-utils",
    "udev",
    "xfsprogs",
];

/// Additional packages of `cargo xtask bench`: the kernel's NBD client
/// (`nbd-client`, for `nbd.ko`), the baseline of the nbd rows.
pub const BENCH_PACKAGES: &[&str] = &["nbd-client"];

/// The installed version of `pkg`, according to dpkg.
fn installed_version(pkg: &str) -> Option<String> {
    let o = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev} ${Version}", pkg])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&o.stdout);
    let rest = text.strip_prefix("ii ")?;
    (o.status.success()).then(|| rest.trim().to_string())
}

/// Whether a Debian version string is a backport (`1:10.0.2+ds-2~bpo12+1`).
pub fn is_backport(version: &str) -> bool {
    version.contains("~bpo")
}

/// The host's release code name (`VERSION_CODENAME` of `/etc/os-release`).
fn codename() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
}

/// The backports suite to install `missing` qemu packages from, when an
/// installed qemu package (qemu-utils, qemu-system-*) is a backport.
fn qemu_backports_suite(missing: &[&str]) -> Option<String> {
    if !missing.iter().any(|p| p.starts_with("qemu-")) {
        return None;
    }
    let installed = [
        "qemu-utils",
        "qemu-system-common",
        "qemu-system-x86",
        "qemu-block-extra",
    ];
    let bpo = installed
        .iter()
        .filter_map(|p| installed_version(p).map(|v| (p, v)))
        .find(|(_, v)| is_backport(v))?;
    let suite = format!("{}-backports", codename()?);
    eprintln!(
        "note: {} {} is from {suite}; installing qemu from the same suite",
        bpo.0, bpo.1
    );
    Some(suite)
}

/// A private apt source list naming `suite` (beside the host's own sources,
/// which apt still reads), with its own package lists.
fn private_suite_options(suite: &str) -> Result<Vec<String>> {
    let dir: PathBuf = util::cache_root()?.join("host-apt").join(suite);
    let lists = dir.join("lists");
    util::create_dir_all(&lists.join("partial"))?;
    let list = dir.join("sources.list");
    let mirror = crate::kernel::host_mirror();
    std::fs::write(
        &list,
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main\n"
        ),
    )
    .with_context(|| format!("cannot write {}", list.display()))?;
    Ok(vec![
        "-o".into(),
        format!("Dir::Etc::SourceList={}", list.display()),
        "-o".into(),
        format!("Dir::State::Lists={}", lists.display()),
    ])
}

/// The `apt-get install` arguments for `missing` (after the options).
pub fn install_args(missing: &[&str], target_release: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = ["install", "-y", "--no-install-recommends", "--no-remove"]
        .map(String::from)
        .to_vec();
    if let Some(t) = target_release {
        args.push("-t".into());
        args.push(t.into());
    }
    args.extend(missing.iter().map(|p| p.to_string()));
    args
}

/// Installs those of `pkgs` that are missing: one `apt-get update`, then
/// `apt-get install -y --no-remove`.  Uses `sudo` when not running as root.
/// Does nothing (but says so) on hosts without dpkg.
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
    let missing: Vec<&str> = pkgs
        .iter()
        .copied()
        .filter(|p| installed_version(p).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let suite = qemu_backports_suite(&missing);
    let options = match &suite {
        Some(s) => private_suite_options(s)?,
        None => Vec::new(),
    };
    eprintln!("installing missing Debian packages: {}", missing.join(" "));
    let apt = |args: &[String]| {
        let mut cmd = if util::is_root() {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        cmd.args(&options)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive");
        eprintln!("+ {}", util::describe(&cmd));
        util::run(util::stdout_to_stderr(&mut cmd))
    };
    apt(&["update".to_string()]).context("cannot update the host's package lists")?;
    apt(&install_args(&missing, suite.as_deref())).with_context(|| {
        format!(
            "cannot install {} without removing an installed package (apt-get --no-remove)",
            missing.join(" ")
        )
    })
}

/// Installs what the guest rig and the guest tests need.
pub fn ensure_for_tests() -> Result<()> {
    let mut pkgs = VM_PACKAGES.to_vec();
    pkgs.extend(TEST_PACKAGES);
    ensure(&pkgs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backports_are_recognised() {
        assert!(is_backport("1:10.0.2+ds-2+deb13u1~bpo12+1"));
        assert!(!is_backport("1:7.2+dfsg-7+deb12u18+b2"));
    }

    #[test]
    fn installs_never_remove() {
        let a = install_args(&["qemu-system-x86"], Some("bookworm-backports"));
        assert!(a.contains(&"--no-remove".to_string()));
        assert_eq!(
            &a[a.len() - 3..],
            ["-t", "bookworm-backports", "qemu-system-x86"]
        );
        assert!(!install_args(&["fio"], None).contains(&"-t".to_string()));
    }
}
