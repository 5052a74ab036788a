//! `cargo xtask refresh-header`: takes `include/uapi/linux/ublk_cmd.h` from
//! Debian's newest `linux-source-*` package, commits it unedited to
//! `ublk-sys/include/`, and regenerates the committed bindings.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::kernel::{self, Apt, Suite};
use crate::util::{self, Workspace};

/// The newest `linux-source-X.Y` package of the suite and its version.
pub fn resolve(apt: &Apt, suite: Suite) -> Result<(String, String, u64)> {
    let pkg = apt
        .depends("linux-source")?
        .into_iter()
        .find(|d| d.starts_with("linux-source-"))
        .with_context(|| format!("linux-source in {suite} depends on no linux-source-*"))?;
    let (version, size) = apt.version_and_size(&pkg)?;
    Ok((pkg, version, size))
}

/// Finds the file named `name` under `dir` (depth-first).
fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.filter_map(|e| e.ok()) {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if entry.file_name().to_string_lossy() == name {
            return Some(path);
        }
    }
    None
}

/// Options of `cargo xtask refresh-header`.
#[derive(Debug)]
pub struct RefreshOptions {
    /// The suite whose linux-source package to use.
    pub suite: Suite,
    /// Stop after resolving and printing the package.
    pub resolve_only: bool,
    /// Where to write ublk_cmd.h and KERNEL_VERSION (default:
    /// `ublk-sys/include` of the workspace).
    pub out_dir: Option<PathBuf>,
    /// Do not regenerate the bindings.
    pub no_bindings: bool,
}

/// Runs the whole refresh.
pub fn refresh(opts: &RefreshOptions) -> Result<()> {
    let suite = opts.suite;
    let resolve_only = opts.resolve_only;
    let dir = kernel::suite_dir(suite)?;
    util::create_dir_all(&dir)?;
    let apt = Apt::new(suite, &dir)?;
    apt.update()?;
    let (pkg, version, size) = resolve(&apt, suite)?;
    let upstream = kernel::upstream_version(&version);
    println!(
        "{suite}: {pkg} {version} (kernel {upstream}, {})",
        util::mb(size)
    );
    if resolve_only {
        return Ok(());
    }
    let deb = apt.download(&pkg, &version, size, &dir.join("debs"))?;

    let work = dir.join("source-tmp");
    if work.exists() {
        fs::remove_dir_all(&work).with_context(|| format!("cannot remove {}", work.display()))?;
    }
    util::create_dir_all(&work)?;
    let result = extract_header(&deb, &work);
    let _ = fs::remove_dir_all(&work);
    let header = result?;

    let ws = Workspace::locate()?;
    let include = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| ws.root.join("ublk-sys/include"));
    util::create_dir_all(&include)?;
    let dest = include.join("ublk_cmd.h");
    fs::write(&dest, &header).with_context(|| format!("cannot write {}", dest.display()))?;
    let version_file = include.join("KERNEL_VERSION");
    fs::write(&version_file, format!("{upstream}\n"))
        .with_context(|| format!("cannot write {}", version_file.display()))?;
    println!(
        "wrote {} and {} ({upstream})",
        dest.display(),
        version_file.display()
    );

    if opts.no_bindings {
        return Ok(());
    }
    eprintln!("regenerating the ublk-sys bindings...");
    util::run(
        util::cargo()
            .args(["build", "-p", "ublk-rs-sys", "--features", "bindgen"])
            .env("UBLK_SYS_UPDATE_BINDINGS", "1")
            .current_dir(&ws.root),
    )
    .context("cannot regenerate the bindings")
}

/// Extracts ublk_cmd.h from the linux-source .deb, working in `work`.
fn extract_header(deb: &Path, work: &Path) -> Result<Vec<u8>> {
    eprintln!("extracting {}...", deb.display());
    util::output(Command::new("dpkg").arg("-x").arg(deb).arg(work))
        .with_context(|| format!("cannot extract {}", deb.display()))?;
    let src = work.join("usr/src");
    let tarball = fs::read_dir(&src)
        .with_context(|| format!("{} holds no usr/src", deb.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            let name = p.to_string_lossy();
            name.contains("linux-source-") && name.ends_with(".tar.xz")
        })
        .with_context(|| format!("no linux-source-*.tar.xz in {}", deb.display()))?;
    let out = work.join("tree");
    util::create_dir_all(&out)?;
    util::output(
        Command::new("tar")
            .arg("-xJf")
            .arg(&tarball)
            .arg("-C")
            .arg(&out)
            .args(["--wildcards", "*/include/uapi/linux/ublk_cmd.h"]),
    )
    .with_context(|| format!("cannot extract ublk_cmd.h from {}", tarball.display()))?;
    let header = find_file(&out, "ublk_cmd.h")
        .with_context(|| format!("{} holds no ublk_cmd.h", tarball.display()))?;
    let data = fs::read(&header).with_context(|| format!("cannot read {}", header.display()))?;
    if data.is_empty() {
        bail!("{} is empty", header.display());
    }
    Ok(data)
}
