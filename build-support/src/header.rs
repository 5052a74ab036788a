//! `cargo xtask refresh-header`: takes `include/uapi/linux/ublk_cmd.h` from
//! Debian's newest `linux-source-*` package, commits it unedited to
//! `ublk-sys/include/` with the kernel's texts of its licence (GPL-2.0 and
//! the Linux syscall note, in `include/LICENSES/`), and regenerates the
//! committed bindings.

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
    let result = extract_files(&deb, &work);
    let _ = fs::remove_dir_all(&work);
    let files = result?;

    let ws = Workspace::locate()?;
    let include = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| ws.root.join("ublk-sys/include"));
    util::create_dir_all(&include)?;
    for (name, data) in &files {
        let dest = include.join(name);
        util::create_dir_all(dest.parent().expect("a file in include/"))?;
        fs::write(&dest, data).with_context(|| format!("cannot write {}", dest.display()))?;
        println!("wrote {}", dest.display());
    }
    let version_file = include.join("KERNEL_VERSION");
    fs::write(&version_file, format!("{upstream}\n"))
        .with_context(|| format!("cannot write {}", version_file.display()))?;
    println!("wrote {} ({upstream})", version_file.display());

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

/// What `refresh-header` takes from the kernel tree: (path in the tree,
/// path under `ublk-sys/include/`).
const FILES: [(&str, &str); 3] = [
    ("include/uapi/linux/ublk_cmd.h", "ublk_cmd.h"),
    ("LICENSES/preferred/GPL-2.0", "LICENSES/GPL-2.0"),
    (
        "LICENSES/exceptions/Linux-syscall-note",
        "LICENSES/Linux-syscall-note",
    ),
];

/// Extracts [`FILES`] from the linux-source .deb, working in `work`:
/// (destination under `include/`, contents).
fn extract_files(deb: &Path, work: &Path) -> Result<Vec<(&'static str, Vec<u8>)>> {
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
            .arg("--wildcards")
            .args(FILES.iter().map(|(path, _)| format!("*/{path}"))),
    )
    .with_context(|| format!("cannot extract {FILES:?} from {}", tarball.display()))?;
    // The tarball's one top directory, linux-source-X.Y.
    let top = fs::read_dir(&out)
        .with_context(|| format!("cannot read {}", out.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .with_context(|| format!("{} extracted nothing", tarball.display()))?;
    FILES
        .iter()
        .map(|&(path, dest)| {
            let file = top.join(path);
            let data =
                fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            if data.is_empty() {
                bail!("{} is empty", file.display());
            }
            Ok((dest, data))
        })
        .collect()
}
