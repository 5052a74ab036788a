//! The peer ublk servers the bench compares ours against, built once and
//! cached under `<cache>/peers/` (`cargo xtask peers` builds them and prints
//! their paths and versions):
//!
//! * **kublk**, the kernel selftests' reference server
//!   (`tools/testing/selftests/ublk/`), from Debian sid's newest
//!   `linux-source-X.Y`. The sources are the `.c` prerequisites of kublk's
//!   rule in that directory's Makefile; the host's gcc compiles them against
//!   sid's `linux-libc-dev` headers and `liburing-dev`, whose `liburing.a` is
//!   linked statically, so the binary needs only the host's glibc. Both
//!   packages are extracted (`dpkg-deb -x`) into the cache, never installed.
//!   The suite's standalone helpers (`STANDALONE_UTILS`: `metadata_size`)
//!   are built beside it.
//! * **rublk**, the Rust server on crates.io: `cargo install rublk
//!   --no-default-features --locked` at the pinned [`RUBLK_VERSION`].
//!
//! Layout:
//!
//! ```text
//! peers/sid/apt/          private apt configuration for sid (its own package
//!                         lists: a guest boot's kernel fetch updates
//!                         <cache>/sid/apt at any time)
//! peers/sid/debs/         the downloaded .debs, removed after a build
//! peers/kublk-KEY/        bin/kublk, bin/metadata_size, src/ (the selftests'
//!                         ublk directory), sysroot/ (the extracted .debs),
//!                         BUILD (versions and flags), .complete
//! peers/kublk.json        the current kublk-KEY, its version, and the sid
//!                         kernel it was resolved next to
//! peers/rublk-VERSION/    bin/rublk (cargo install's root), .complete
//! ```
//!
//! KEY holds the versions of linux-source, liburing-dev and linux-libc-dev
//! and [`KUBLK_RECIPE`], so a new package version (or recipe) builds a new
//! directory; a new [`RUBLK_VERSION`] likewise. [`ensure`] does no network
//! or build work once both are cached. It asks sid again for the packages'
//! versions only when the sid kernel that `kernel::fetch` last resolved
//! (`<cache>/sid/current`, read without network) is not the one kublk was
//! resolved next to, i.e. after a new guest kernel; [`update`] asks always.
//! Builds run in `*.partial-PID` directories renamed into place when done,
//! so an interrupted or concurrent build never leaves a half-built peer.
//!
//! Their command lines (checked in a sid 7.2.13 guest; depth 128 is both
//! tools' default, kublk's default is 2 queues, rublk's 1):
//!
//! ```text
//! kublk add -t null -q 1|2 -d 128 [--auto_zc | -z]
//! kublk add -t loop -q 1|2 -d 128 [--auto_zc | -z] FILE      (O_DIRECT)
//! kublk list -n ID;  kublk del -n ID | -a
//! rublk add null -q 1|2 -d 128 [-z]
//! rublk add loop -q 1|2 -d 128 [-z] -f FILE                  (O_DIRECT)
//! rublk list -n ID;  rublk del -n ID | -a
//! ```
//!
//! kublk `--auto_zc` is `UBLK_F_AUTO_BUF_REG`, `-z` `UBLK_F_SUPPORT_ZERO_COPY`;
//! rublk `-z` sets both. Both `add`s daemonize and return once the device
//! is LIVE, printing `dev id N: …` and `\tmax rq size B daemon pid P … state
//! LIVE` (kublk prints no id with `--quiet`); `list -n N` prints the same,
//! and `ublk list --json -n N` gives `daemon_pid` for any server's device
//! (no sysfs file holds the pid). Both `del`s return after the daemon
//! exited. Largest request: kublk 1 MiB, rublk 512 KiB (`-b 1MiB` raises
//! it). Neither changes the I/O scheduler (a 1-queue disk gets
//! `mq-deadline`).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::kernel::{self, Apt, Suite};
use crate::{deps, header, util};

/// rublk's version, pinned: the newest on crates.io (`cargo info rublk`,
/// 2026-12-01). Raising it builds the new version in its own directory on
/// the next [`ensure`].
pub const RUBLK_VERSION: &str = "0.2.15";

/// The revision of the kublk build recipe below (flags, helpers, layout):
/// part of the cache key, so raising it rebuilds kublk.
pub const KUBLK_RECIPE: u32 = 1;

/// gcc's flags for kublk: the selftests' (`-O3 -Wall` of the ublk Makefile,
/// `-D_GNU_SOURCE=` and the warning of tools/testing/selftests/lib.mk that
/// gcc knows). The Makefile's `-I $(top_srcdir)/usr/include` (a kernel
/// tree's installed headers) is sid's linux-libc-dev here.
const KUBLK_CFLAGS: &[&str] = &[
    "-O3",
    "-Wall",
    "-D_GNU_SOURCE=",
    "-Wno-address-of-packed-member",
];

/// The Debian multiarch triplet of the (amd64-only) private apt setup.
const TRIPLET: &str = "x86_64-linux-gnu";

/// The directory of the ublk selftests in a kernel tree.
const SELFTESTS_DIR: &str = "tools/testing/selftests/ublk";

/// The cached peer servers, every path absolute.
#[derive(Debug, Clone)]
pub struct Peers {
    /// The kernel selftests' `kublk`.
    pub kublk: PathBuf,
    /// The source package it was built from, e.g. `linux-source-7.2
    /// 7.2.13-1`.
    pub kublk_version: String,
    /// The selftests' `metadata_size` helper, built beside kublk (`None`
    /// when the kernel's selftests have no such helper).
    pub metadata_size: Option<PathBuf>,
    /// `rublk` from crates.io.
    pub rublk: PathBuf,
    /// Its crate version, e.g. `rublk 0.2.15`.
    pub rublk_version: String,
}

/// Returns the cached peers, building whichever is missing. Once both are
/// cached it does no network or build work, unless the sid kernel resolved
/// last (by `kernel::fetch`, e.g. at a guest boot: call that first) is not
/// the one kublk was resolved next to; then sid's package versions are
/// looked up again and kublk is rebuilt if they changed. If that look-up
/// fails, the cached kublk is used (with a note).
pub fn ensure() -> Result<Peers> {
    get(false)
}

/// Like [`ensure`], but always looks sid's package versions up again
/// (`cargo xtask peers --update`).
pub fn update() -> Result<Peers> {
    get(true)
}

/// Only kublk and the selftests (what `cargo xtask selftests` needs: no
/// rublk, whose first build is minutes of a fresh machine's CI).
pub fn ensure_kublk() -> Result<Kublk> {
    let root = util::cache_root()?.join("peers");
    util::create_dir_all(&root)?;
    ensure_kublk_in(&root, false)
}

/// [`ensure`] or, with `refresh`, [`update`].
fn get(refresh: bool) -> Result<Peers> {
    let root = util::cache_root()?.join("peers");
    util::create_dir_all(&root)?;
    let kublk = ensure_kublk_in(&root, refresh)?;
    let rublk = ensure_rublk(&root)?;
    Ok(Peers {
        kublk: kublk.kublk,
        kublk_version: kublk.version,
        metadata_size: kublk.metadata_size,
        rublk,
        rublk_version: format!("rublk {RUBLK_VERSION}"),
    })
}

// ---------------------------------------------------------------- kublk --

/// A built kublk, and the selftests it came with.
#[derive(Debug)]
pub struct Kublk {
    /// The kublk binary.
    pub kublk: PathBuf,
    /// The suite's `metadata_size` helper, where it built.
    pub metadata_size: Option<PathBuf>,
    /// The selftests directory (`tools/testing/selftests/ublk`).
    pub selftests: PathBuf,
    /// "PACKAGE VERSION" of the linux-source package.
    pub version: String,
}

/// `peers/kublk.json`: which build is current.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    /// The build's directory name under `peers/` (`kublk-KEY`).
    dir: String,
    /// `kublk_version`: "PACKAGE VERSION" of the linux-source package.
    version: String,
    /// The sid kernel package version in `<cache>/sid/current` when this
    /// was resolved (`None`: no kernel was cached).
    kernel: Option<String>,
}

impl Record {
    /// The JSON text of the record.
    fn to_json(&self) -> String {
        serde_json::json!({
            "dir": self.dir,
            "version": self.version,
            "kernel": self.kernel,
        })
        .to_string()
    }

    /// Parses [`Record::to_json`]'s text.
    fn from_json(text: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let dir = s("dir")?;
        // A directory name only: never a path out of the cache.
        if dir.is_empty() || dir.contains('/') || dir.starts_with('.') {
            return None;
        }
        Some(Self {
            dir,
            version: s("version")?,
            kernel: s("kernel"),
        })
    }
}

/// Whether sid must be asked for package versions again: always with
/// `refresh`, else when a kernel has been resolved since `record` and it is
/// not the one `record` was resolved next to.
fn needs_resolve(record: &Record, kernel_now: Option<&str>, refresh: bool) -> bool {
    refresh || kernel_now.is_some_and(|k| record.kernel.as_deref() != Some(k))
}

/// Makes a Debian version usable in a file name (the epoch's `:`).
fn path_safe(version: &str) -> String {
    version.replace(':', "_")
}

/// The cache key (directory name) of a kublk build.
fn kublk_key(source_version: &str, liburing_version: &str, libc_version: &str) -> String {
    format!(
        "kublk-{}-liburing{}-libc{}-r{KUBLK_RECIPE}",
        path_safe(source_version),
        path_safe(liburing_version),
        path_safe(libc_version)
    )
}

/// The kublk build named by `record`, if complete.
fn locate_kublk(root: &Path, record: &Record) -> Option<Kublk> {
    let dir = root.join(&record.dir);
    if !dir.join(".complete").exists() {
        return None;
    }
    let kublk = fs::canonicalize(dir.join("bin/kublk")).ok()?;
    let metadata_size = fs::canonicalize(dir.join("bin/metadata_size")).ok();
    let selftests = fs::canonicalize(dir.join("src")).ok()?;
    Some(Kublk {
        kublk,
        metadata_size,
        selftests,
        version: record.version.clone(),
    })
}

/// The cached kublk, refreshed as [`ensure`] describes.
fn ensure_kublk_in(root: &Path, refresh: bool) -> Result<Kublk> {
    let record_path = root.join("kublk.json");
    let record = fs::read_to_string(&record_path)
        .ok()
        .and_then(|t| Record::from_json(&t));
    let cached = record.as_ref().and_then(|r| locate_kublk(root, r));
    let kernel_now = kernel::current(Suite::Sid).map(|(_, version)| version);
    let fresh = record
        .as_ref()
        .is_some_and(|r| !needs_resolve(r, kernel_now.as_deref(), refresh));
    let cached = match cached {
        Some(kublk) if fresh => return Ok(kublk),
        cached => cached,
    };
    match resolve_and_build_kublk(root, kernel_now) {
        Ok(kublk) => Ok(kublk),
        Err(err) => match cached {
            Some(kublk) => {
                eprintln!("note: {err:#}");
                eprintln!("note: using the cached kublk ({})", kublk.version);
                Ok(kublk)
            }
            None => Err(err),
        },
    }
}

/// The .debs kublk is built from.
#[derive(Debug)]
struct KublkDebs {
    /// `linux-source-X.Y`'s package name (also the tarball's top directory).
    source_pkg: String,
    source: PathBuf,
    liburing: PathBuf,
    libc: PathBuf,
}

/// Resolves sid's linux-source, liburing-dev and linux-libc-dev; builds
/// kublk unless that build is cached; records it as current.
fn resolve_and_build_kublk(root: &Path, kernel_now: Option<String>) -> Result<Kublk> {
    deps::ensure(&["xz-utils", "debian-archive-keyring"])?;
    let suite = Suite::Sid;
    let suite_dir = root.join(suite.name());
    util::create_dir_all(&suite_dir)?;
    let apt = Apt::new(suite, &suite_dir)?;
    apt.update()?;
    let (source_pkg, source_version, source_size) = header::resolve(&apt, suite)?;
    let (liburing_version, liburing_size) = apt.version_and_size("liburing-dev")?;
    let (libc_version, libc_size) = apt.version_and_size("linux-libc-dev")?;
    let key = kublk_key(&source_version, &liburing_version, &libc_version);
    let dir = root.join(&key);
    if !dir.join(".complete").exists() {
        deps::ensure(&["gcc", "libc6-dev"])?;
        let debs_dir = suite_dir.join("debs");
        let debs = KublkDebs {
            source: apt.download(&source_pkg, &source_version, source_size, &debs_dir)?,
            liburing: apt.download("liburing-dev", &liburing_version, liburing_size, &debs_dir)?,
            libc: apt.download("linux-libc-dev", &libc_version, libc_size, &debs_dir)?,
            source_pkg: source_pkg.clone(),
        };
        let staging = root.join(format!("{key}.partial-{}", std::process::id()));
        let built = build_kublk(&debs, &staging).and_then(|()| {
            let gcc = util::output(Command::new("gcc").arg("--version")).unwrap_or_default();
            let info = format!(
                "{source_pkg} {source_version}\nliburing-dev {liburing_version} (liburing.a)\n\
                 linux-libc-dev {libc_version}\n{}\ngcc flags: {}\n",
                gcc.lines().next().unwrap_or("gcc"),
                KUBLK_CFLAGS.join(" "),
            );
            write(&staging.join("BUILD"), &info)?;
            write(&staging.join(".complete"), "")?;
            move_into_place(&staging, &dir)
        });
        if built.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        built?;
        // The .debs are needed again only for another version.
        let _ = fs::remove_dir_all(&debs_dir);
        prune(root, "kublk-", &key);
    }
    let record = Record {
        dir: key,
        version: format!("{source_pkg} {source_version}"),
        kernel: kernel_now,
    };
    write(&root.join("kublk.json"), &format!("{}\n", record.to_json()))?;
    locate_kublk(root, &record)
        .with_context(|| format!("the kublk build in {} is incomplete", dir.display()))
}

/// Writes `text` to `path`, with the path in the error.
fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Renames the finished build `staging` to `dir`. If another process
/// finished the same build first, keeps that one.
fn move_into_place(staging: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        if dir.join(".complete").exists() {
            let _ = fs::remove_dir_all(staging);
            return Ok(());
        }
        fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    fs::rename(staging, dir)
        .with_context(|| format!("cannot rename {} to {}", staging.display(), dir.display()))
}

/// Removes `peers/PREFIX*` other than `keep`, and `*.partial-PID` build
/// directories whose process is gone (best effort).
fn prune(root: &Path, prefix: &str, keep: &str) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(prefix) || name == keep {
            continue;
        }
        let stale = match name.rsplit_once(".partial-") {
            Some((_, pid)) => !Path::new("/proc").join(pid).exists(),
            None => true,
        };
        if stale {
            eprintln!("removing the old build {}", e.path().display());
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Extracts the .debs into `out` and compiles kublk and the helpers into
/// `out/bin`.
fn build_kublk(debs: &KublkDebs, out: &Path) -> Result<()> {
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("cannot remove {}", out.display()))?;
    }
    let sysroot = out.join("sysroot");
    util::create_dir_all(&sysroot)?;
    for deb in [&debs.liburing, &debs.libc] {
        util::output(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&sysroot))
            .with_context(|| format!("cannot extract {}", deb.display()))?;
    }
    let liburing = sysroot.join("usr/lib").join(TRIPLET).join("liburing.a");
    if !liburing.exists() {
        bail!("{} holds no liburing.a", debs.liburing.display());
    }
    let src = out.join("src");
    extract_selftests(&debs.source, &debs.source_pkg, &src)?;

    let makefile = src.join("Makefile");
    let text = fs::read_to_string(&makefile)
        .with_context(|| format!("cannot read {}", makefile.display()))?;
    let files = c_files(&src)?;
    let sources = kublk_sources(&text, &files)
        .with_context(|| format!("cannot find kublk's sources in {}", makefile.display()))?;
    let helpers = standalone_utils(&text, &files);

    let bin = out.join("bin");
    util::create_dir_all(&bin)?;
    let include = sysroot.join("usr/include");
    let gcc = |output: &Path, sources: &[String]| -> Result<()> {
        let mut cmd = Command::new("gcc");
        cmd.args(KUBLK_CFLAGS)
            .arg("-I")
            .arg(&include)
            .arg("-I")
            .arg(include.join(TRIPLET))
            .arg("-o")
            .arg(output)
            .args(sources)
            .arg(&liburing)
            .args(["-lpthread", "-lm"])
            .current_dir(&src);
        let out = util::capture(&mut cmd)?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            eprintln!("{stderr}");
            bail!(
                "cannot compile {}: `{}` failed ({}): {}",
                output.display(),
                util::describe(&cmd),
                out.status,
                util::last_lines(&stderr, 3)
            );
        }
        Ok(())
    };
    eprintln!("compiling kublk ({})...", sources.join(" "));
    gcc(&bin.join("kublk"), &sources)?;
    for helper in &helpers {
        let name = helper.trim_end_matches(".c");
        eprintln!("compiling {name}...");
        gcc(&bin.join(name), std::slice::from_ref(helper))?;
    }
    Ok(())
}

/// Extracts the ublk selftests directory of the kernel tarball in the
/// linux-source `.deb` into `dest` (streamed: `dpkg-deb --fsys-tarfile |
/// tar -xO TARBALL | tar -xJ DIR`, no 160 MB tarball on disk).
fn extract_selftests(deb: &Path, source_pkg: &str, dest: &Path) -> Result<()> {
    eprintln!("extracting {SELFTESTS_DIR} from {}...", deb.display());
    util::create_dir_all(dest)?;
    let mut fsys = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run dpkg-deb")?;
    let tarball_pattern = format!("./usr/src/{source_pkg}.tar.xz");
    let mut inner = Command::new("tar")
        .args(["-xO", "--wildcards", &tarball_pattern])
        .stdin(fsys.stdout.take().context("dpkg-deb has no stdout")?)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run tar")?;
    let components = SELFTESTS_DIR.split('/').count() + 1;
    let outer = Command::new("tar")
        .arg("-xJ")
        .arg("-C")
        .arg(dest)
        .arg(format!("--strip-components={components}"))
        .arg("--wildcards")
        .arg(format!("{source_pkg}/{SELFTESTS_DIR}/*"))
        .stdin(inner.stdout.take().context("tar has no stdout")?)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("cannot run tar")?;
    let inner = inner.wait_with_output().context("cannot wait for tar")?;
    let fsys = fsys
        .wait_with_output()
        .context("cannot wait for dpkg-deb")?;
    for (what, out) in [
        ("dpkg-deb --fsys-tarfile", &fsys),
        ("tar -xO", &inner),
        ("tar -xJ", &outer),
    ] {
        if !out.status.success() {
            bail!(
                "cannot extract {SELFTESTS_DIR} from {} ({what}: {}): {}",
                deb.display(),
                out.status,
                util::last_lines(&String::from_utf8_lossy(&out.stderr), 3)
            );
        }
    }
    if !dest.join("kublk.c").exists() {
        bail!(
            "{}'s {source_pkg}.tar.xz holds no {source_pkg}/{SELFTESTS_DIR}/kublk.c",
            deb.display()
        );
    }
    Ok(())
}

/// The `*.c` file names in `dir`, sorted.
fn c_files(dir: &Path) -> Result<Vec<String>> {
    let mut files: Vec<String> = fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".c"))
        .collect();
    files.sort();
    Ok(files)
}

// ------------------------------------------------- the Makefile's sources --

/// kublk's sources: the `.c` prerequisites of the Makefile's rule for
/// `kublk` (or `$(OUTPUT)/kublk`), e.g. `$(OUTPUT)/kublk:
/// $(filter-out $(STANDALONE_UTILS),$(wildcard *.c))`, evaluated over
/// `files` (the directory's `.c` names).
pub fn kublk_sources(makefile: &str, files: &[String]) -> Result<Vec<String>> {
    let mf = Makefile::parse(makefile);
    for (targets, prereqs) in &mf.rules {
        let Ok(targets) = mf.expand(targets, files) else {
            continue;
        };
        if !targets
            .split_whitespace()
            .any(|t| t == "kublk" || t.ends_with("/kublk"))
        {
            continue;
        }
        let prereqs = mf
            .expand(prereqs, files)
            .context("cannot evaluate the prerequisites of kublk's rule")?;
        let sources: Vec<String> = prereqs
            .split_whitespace()
            .filter(|w| w.ends_with(".c"))
            .map(str::to_owned)
            .collect();
        if sources.is_empty() {
            continue;
        }
        if let Some(missing) = sources.iter().find(|s| !files.contains(s)) {
            bail!("kublk's rule names {missing}, which is not in the directory");
        }
        if !sources.iter().any(|s| s == "kublk.c") {
            bail!("kublk's rule does not name kublk.c: {}", sources.join(" "));
        }
        return Ok(sources);
    }
    bail!("no rule for kublk with .c prerequisites")
}

/// The standalone helpers of the suite (`STANDALONE_UTILS`, e.g.
/// `metadata_size.c`), those present in `files`.
pub fn standalone_utils(makefile: &str, files: &[String]) -> Vec<String> {
    let mf = Makefile::parse(makefile);
    mf.expand("$(STANDALONE_UTILS)", files)
        .unwrap_or_default()
        .split_whitespace()
        .filter(|w| w.ends_with(".c") && files.iter().any(|f| f == w))
        .map(str::to_owned)
        .collect()
}

/// The little of a Makefile that finding kublk's sources needs: variables
/// (unexpanded, `+=` appended) and rule lines (`targets: prerequisites`),
/// with continuation lines joined and comments, recipes, conditionals'
/// lines and `define` blocks skipped.
#[derive(Debug, Default)]
struct Makefile {
    vars: HashMap<String, String>,
    rules: Vec<(String, String)>,
}

/// How deep variable references may nest before expansion gives up.
const MAX_EXPANSION_DEPTH: usize = 32;

impl Makefile {
    /// Parses `text`.
    fn parse(text: &str) -> Self {
        let mut mf = Self::default();
        let joined = text.replace("\\\r\n", " ").replace("\\\n", " ");
        let mut in_define = false;
        for line in joined.lines() {
            if line.starts_with('\t') {
                continue; // a recipe (or an indented line of a conditional)
            }
            let line = line.split_once('#').map_or(line, |(code, _)| code).trim();
            if in_define {
                in_define = line != "endef";
                continue;
            }
            if line.starts_with("define ") {
                in_define = true;
                continue;
            }
            if line.is_empty() {
                continue;
            }
            match split_line(line) {
                Line::Assign(name, op, value) => {
                    let value = value.trim().to_owned();
                    match op {
                        "+=" => {
                            let v = mf.vars.entry(name.to_owned()).or_default();
                            if !v.is_empty() {
                                v.push(' ');
                            }
                            v.push_str(&value);
                        }
                        "?=" => {
                            mf.vars.entry(name.to_owned()).or_insert(value);
                        }
                        _ => {
                            mf.vars.insert(name.to_owned(), value);
                        }
                    }
                }
                Line::Rule(targets, prereqs) => {
                    let prereqs = prereqs.split_once(';').map_or(prereqs, |(p, _)| p);
                    mf.rules.push((targets.to_owned(), prereqs.to_owned()));
                }
                Line::Other => {}
            }
        }
        mf
    }

    /// Expands variable references and the functions `wildcard`, `filter`
    /// and `filter-out` in `text`; `files` are what `wildcard` sees.
    /// Undefined variables expand to nothing; other functions are errors.
    fn expand(&self, text: &str, files: &[String]) -> Result<String> {
        self.expand_at(text, files, 0)
    }

    /// [`Makefile::expand`] at nesting `depth`.
    fn expand_at(&self, text: &str, files: &[String], depth: usize) -> Result<String> {
        if depth > MAX_EXPANSION_DEPTH {
            bail!("variable references nest too deep (a recursive variable?)");
        }
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            let Some(c) = after.chars().next() else {
                break;
            };
            if c == '$' {
                out.push('$');
                rest = &after[1..];
                continue;
            }
            let (reference, len) = match c {
                '(' | '{' => {
                    let end = matching_close(after)
                        .with_context(|| format!("unbalanced `$(` in `{text}`"))?;
                    (&after[1..end], end + 1)
                }
                _ => (&after[..c.len_utf8()], c.len_utf8()),
            };
            out.push_str(&self.reference(reference, files, depth)?);
            rest = &after[len..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The value of `$(REFERENCE)`.
    fn reference(&self, reference: &str, files: &[String], depth: usize) -> Result<String> {
        let (name, args) = match reference.find(|c: char| c.is_whitespace()) {
            Some(i) => (&reference[..i], reference[i..].trim_start()),
            None => {
                let name = self.expand_at(reference, files, depth + 1)?;
                return match self.vars.get(name.trim()) {
                    Some(value) => self.expand_at(value, files, depth + 1),
                    None => Ok(String::new()),
                };
            }
        };
        let args = split_args(args)
            .iter()
            .map(|a| self.expand_at(a, files, depth + 1))
            .collect::<Result<Vec<_>>>()?;
        let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        let result: Vec<String> = match (name, args.as_slice()) {
            ("wildcard", [patterns]) => {
                let mut found = Vec::new();
                for p in patterns.split_whitespace() {
                    let mut m: Vec<String> = files.iter().filter(|f| glob(p, f)).cloned().collect();
                    m.sort();
                    found.extend(m);
                }
                found
            }
            ("filter", [patterns, text]) | ("filter-out", [patterns, text]) => {
                let keep = name == "filter";
                words(text)
                    .into_iter()
                    .filter(|w| patterns.split_whitespace().any(|p| percent_match(p, w)) == keep)
                    .collect()
            }
            _ => bail!("unsupported make function `$({name} ...)`"),
        };
        Ok(result.join(" "))
    }
}

/// What a (joined, comment-free) Makefile line is.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    /// `NAME OP VALUE` with OP one of `=`, `:=`, `::=`, `?=`, `+=`.
    Assign(&'a str, &'a str, &'a str),
    /// `TARGETS: PREREQUISITES`.
    Rule(&'a str, &'a str),
    /// Anything else (`include`, `ifneq (…)`, `export X`, `$(eval …)`).
    Other,
}

/// Classifies `line` by its first `=` or `:` outside `$(…)`.
fn split_line(line: &str) -> Line<'_> {
    let bytes = line.as_bytes();
    let mut depth = 0usize;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'(' | b'{' => depth += 1,
            b')' | b'}' => depth = depth.saturating_sub(1),
            _ if depth > 0 => {}
            b'=' => {
                let (name_end, op) = match i.checked_sub(1).map(|j| bytes[j]) {
                    Some(b'+') => (i - 1, "+="),
                    Some(b'?') => (i - 1, "?="),
                    _ => (i, "="),
                };
                return assign(line, name_end, op, i + 1);
            }
            b':' => {
                if line[i..].starts_with("::=") {
                    return assign(line, i, "::=", i + 3);
                }
                if line[i..].starts_with(":=") {
                    return assign(line, i, ":=", i + 2);
                }
                let prereqs = line[i + 1..].strip_prefix(':').unwrap_or(&line[i + 1..]);
                return Line::Rule(line[..i].trim(), prereqs.trim());
            }
            _ => {}
        }
    }
    Line::Other
}

/// An assignment whose name ends at `name_end` and value starts at
/// `value_start`; `Other` unless the name is one word (so `override X = 1`
/// and the like are skipped).
fn assign<'a>(line: &'a str, name_end: usize, op: &'a str, value_start: usize) -> Line<'a> {
    let name = line[..name_end].trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Line::Other;
    }
    Line::Assign(name, op, &line[value_start..])
}

/// The index in `s` (which starts with `(` or `{`) of its matching close.
fn matching_close(s: &str) -> Option<usize> {
    let open = s.as_bytes()[0];
    let close = if open == b'(' { b')' } else { b'}' };
    let mut depth = 0usize;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        if b == open {
            depth += 1;
        } else if b == close {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
    }
    None
}

/// A function's arguments: `args` split at the commas outside `$(…)`.
fn split_args(args: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, b) in args.bytes().enumerate() {
        match b {
            b'(' | b'{' => depth += 1,
            b')' | b'}' => depth = depth.saturating_sub(1),
            b',' if depth == 0 => {
                out.push(&args[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&args[start..]);
    out
}

/// make's `filter` pattern: one `%` matches any run of characters; without
/// one, the word must equal the pattern.
fn percent_match(pattern: &str, word: &str) -> bool {
    match pattern.split_once('%') {
        Some((prefix, suffix)) => {
            word.len() >= prefix.len() + suffix.len()
                && word.starts_with(prefix)
                && word.ends_with(suffix)
        }
        None => pattern == word,
    }
}

/// A shell glob with `*` and `?` (no brackets) over one file name.
fn glob(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((b'?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    // A leading dot is matched only explicitly, as in the shell.
    if name.starts_with('.') && !pattern.starts_with('.') {
        return false;
    }
    go(pattern.as_bytes(), name.as_bytes())
}

// ---------------------------------------------------------------- rublk --

/// The cached rublk, installed with `cargo install` if missing.
fn ensure_rublk(root: &Path) -> Result<PathBuf> {
    let name = format!("rublk-{RUBLK_VERSION}");
    let dir = root.join(&name);
    let bin = dir.join("bin/rublk");
    if dir.join(".complete").exists() && bin.exists() {
        return fs::canonicalize(&bin).with_context(|| format!("cannot resolve {}", bin.display()));
    }
    // libublk generates its bindings with bindgen.
    deps::ensure(&["libclang-dev", "gcc", "libc6-dev"])?;
    let staging = root.join(format!("{name}.partial-{}", std::process::id()));
    // Named so that prune() sees whose it is.
    let build_dir = root.join(format!("rublk-target.partial-{}", std::process::id()));
    eprintln!("building rublk {RUBLK_VERSION} (cargo install; a few minutes)...");
    let built = install_rublk(&staging, &build_dir).and_then(|()| {
        write(&staging.join(".complete"), "")?;
        move_into_place(&staging, &dir)
    });
    let _ = fs::remove_dir_all(&build_dir);
    if built.is_err() {
        let _ = fs::remove_dir_all(&staging);
    }
    built?;
    prune(root, "rublk-", &name);
    fs::canonicalize(&bin).with_context(|| format!("cannot resolve {}", bin.display()))
}

/// The `cargo install` arguments that put rublk into `root`, building in
/// `target_dir`.
fn rublk_install_args(root: &Path, target_dir: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "install",
        "rublk",
        "--no-default-features",
        "--version",
        RUBLK_VERSION,
        "--locked",
        "--root",
    ]
    .map(String::from)
    .to_vec();
    args.push(root.display().to_string());
    args.push("--target-dir".into());
    args.push(target_dir.display().to_string());
    args
}

/// Runs `cargo install` into `root` and checks the binary runs.
fn install_rublk(root: &Path, target_dir: &Path) -> Result<()> {
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("cannot remove {}", root.display()))?;
    }
    util::create_dir_all(root)?;
    let mut cmd = util::cargo();
    // Outside the workspace, so its .cargo/config.toml and toolchain file
    // do not apply.
    cmd.args(rublk_install_args(root, target_dir))
        .current_dir(root)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .stdin(Stdio::null());
    util::run(util::stdout_to_stderr(&mut cmd))
        .with_context(|| format!("cannot build rublk {RUBLK_VERSION} from crates.io"))?;
    let bin = root.join("bin/rublk");
    let version = util::output(Command::new(&bin).arg("--version"))
        .with_context(|| format!("{} does not run", bin.display()))?;
    if !version.contains(RUBLK_VERSION) {
        bail!(
            "{} --version printed `{}`, not {RUBLK_VERSION}",
            bin.display(),
            version.trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ublk selftests' Makefile of Linux 7.2 (trimmed).
    const MAKEFILE_7_2: &str = "# SPDX-License-Identifier: GPL-2.0

CFLAGS += -O3 -Wl,-no-as-needed -Wall -I $(top_srcdir)/usr/include
ifneq ($(WERROR),0)
\tCFLAGS += -Werror
endif

LDLIBS += -lpthread -lm -luring

TEST_PROGS := test_generic_02.sh
TEST_PROGS += test_generic_03.sh

TEST_FILES := settings
TEST_FILES += test_common.sh
TEST_FILES += trace

TEST_GEN_PROGS_EXTENDED = kublk metadata_size
STANDALONE_UTILS := metadata_size.c

LOCAL_HDRS += $(wildcard *.h)
include ../lib.mk

$(OUTPUT)/kublk: $(filter-out $(STANDALONE_UTILS),$(wildcard *.c))

check:
\tshellcheck -x -f gcc *.sh

JOBS ?= 1
export JOBS

TEST_GROUPS := $(shell echo \"$(TEST_PROGS)\" | tr ' ' '\\n' | \\
\tsed 's/test_\\([^_]*\\)_.*/\\1/' | sort -u)

define RUN_GROUP
run_$(1): all
\t@echo $$(filter test_$(1)_%.sh,$$(TEST_PROGS))
.PHONY: run_$(1)
endef

$(foreach group,$(TEST_GROUPS),$(eval $(call RUN_GROUP,$(group))))

run_all: all
\t@echo $(TEST_PROGS)
.PHONY: run_all
";

    /// An older form (Linux 6.14): the sources listed.
    const MAKEFILE_OLD: &str = "CFLAGS += -O3 -Wl,-no-as-needed -Wall -I $(top_srcdir)
LDLIBS += -lpthread -lm -luring

TEST_GEN_PROGS_EXTENDED = kublk

include ../lib.mk

$(TEST_GEN_PROGS_EXTENDED): kublk.c null.c file_backed.c common.c stripe.c \\
\tfault_inject.c
";

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const FILES_7_2: &[&str] = &[
        "batch.c",
        "common.c",
        "fault_inject.c",
        "file_backed.c",
        "kublk.c",
        "metadata_size.c",
        "null.c",
        "stripe.c",
    ];

    #[test]
    fn sources_of_7_2() {
        let files = names(FILES_7_2);
        assert_eq!(
            kublk_sources(MAKEFILE_7_2, &files).unwrap(),
            [
                "batch.c",
                "common.c",
                "fault_inject.c",
                "file_backed.c",
                "kublk.c",
                "null.c",
                "stripe.c"
            ]
        );
        assert_eq!(standalone_utils(MAKEFILE_7_2, &files), ["metadata_size.c"]);
    }

    #[test]
    fn sources_listed_explicitly() {
        let files = names(&FILES_7_2[..FILES_7_2.len() - 1]);
        let mut files = files;
        files.push("stripe.c".into());
        assert_eq!(
            kublk_sources(MAKEFILE_OLD, &files).unwrap(),
            [
                "kublk.c",
                "null.c",
                "file_backed.c",
                "common.c",
                "stripe.c",
                "fault_inject.c"
            ]
        );
        assert!(standalone_utils(MAKEFILE_OLD, &files).is_empty());
    }

    #[test]
    fn sources_missing_or_absent() {
        let files = names(&["kublk.c", "null.c"]);
        let err = kublk_sources(MAKEFILE_OLD, &files).unwrap_err();
        assert!(format!("{err:#}").contains("file_backed.c"), "{err:#}");
        let err = kublk_sources("all:\n\techo\n", &files).unwrap_err();
        assert!(format!("{err:#}").contains("no rule for kublk"), "{err:#}");
        // A helper named in STANDALONE_UTILS but absent is not built.
        assert!(standalone_utils(MAKEFILE_7_2, &files).is_empty());
    }

    #[test]
    fn line_kinds() {
        assert_eq!(split_line("A := b c"), Line::Assign("A", ":=", " b c"));
        assert_eq!(split_line("A::=b"), Line::Assign("A", "::=", "b"));
        assert_eq!(split_line("A += b"), Line::Assign("A", "+=", " b"));
        assert_eq!(split_line("A ?= 1"), Line::Assign("A", "?=", " 1"));
        assert_eq!(split_line("A = x=y"), Line::Assign("A", "=", " x=y"));
        assert_eq!(
            split_line("$(OUTPUT)/kublk: $(wildcard *.c)"),
            Line::Rule("$(OUTPUT)/kublk", "$(wildcard *.c)")
        );
        assert_eq!(split_line("a:: b"), Line::Rule("a", "b"));
        assert_eq!(split_line("ifneq ($(WERROR),0)"), Line::Other);
        assert_eq!(split_line("include ../lib.mk"), Line::Other);
        assert_eq!(split_line("override X = 1"), Line::Other);
        assert_eq!(
            split_line("$(foreach g,$(G),$(eval $(call R,$(g))))"),
            Line::Other
        );
    }

    #[test]
    fn expansion() {
        let mf = Makefile::parse("A = x $(B)\nB := y\nB += z\nC ?= c\nC ?= d\nR = $(R)\n");
        let files = names(&["a.c", "b.c", ".hidden.c", "x.h"]);
        let e = |t: &str| mf.expand(t, &files);
        assert_eq!(e("$(A)").unwrap(), "x y z");
        assert_eq!(e("${C}").unwrap(), "c");
        assert_eq!(e("$(UNDEFINED)/k $$x").unwrap(), "/k $x");
        assert_eq!(e("$(wildcard *.c)").unwrap(), "a.c b.c");
        assert_eq!(e("$(wildcard ?.h *.c)").unwrap(), "x.h a.c b.c");
        assert_eq!(e("$(filter-out b.c,$(wildcard *.c))").unwrap(), "a.c");
        assert_eq!(e("$(filter %.c,a.c x.h b.c)").unwrap(), "a.c b.c");
        assert!(e("$(shell ls)").is_err());
        assert!(e("$(R)").is_err());
        assert!(e("$(A").is_err());
    }

    #[test]
    fn patterns() {
        assert!(glob("*.c", "kublk.c"));
        assert!(!glob("*.c", "kublk.h"));
        assert!(!glob("*.c", ".x.c"));
        assert!(glob("k?ublk*", "kxublk.c"));
        assert!(percent_match("test_%.sh", "test_null_01.sh"));
        assert!(!percent_match("test_%.sh", "test_.s"));
        assert!(percent_match("metadata_size.c", "metadata_size.c"));
    }

    #[test]
    fn cache_keys() {
        assert_eq!(
            kublk_key("7.2.13-1", "2.15-1", "7.2.13-1"),
            format!("kublk-7.2.13-1-liburing2.15-1-libc7.2.13-1-r{KUBLK_RECIPE}")
        );
        assert!(!kublk_key("1:7.2-1", "2", "3").contains(':'));
        assert_ne!(
            kublk_key("7.2.13-1", "2.15-1", "7.2.13-1"),
            kublk_key("7.2.14-1", "2.15-1", "7.2.13-1")
        );
        let args = rublk_install_args(Path::new("/c/rublk-x"), Path::new("/c/t"));
        assert_eq!(
            args,
            [
                "install",
                "rublk",
                "--no-default-features",
                "--version",
                RUBLK_VERSION,
                "--locked",
                "--root",
                "/c/rublk-x",
                "--target-dir",
                "/c/t"
            ]
        );
    }

    #[test]
    fn records() {
        let r = Record {
            dir: "kublk-7.2.13-1-liburing2.15-1-libc7.2.13-1-r1".into(),
            version: "linux-source-7.2 7.2.13-1".into(),
            kernel: Some("7.2.13-1".into()),
        };
        assert_eq!(Record::from_json(&r.to_json()), Some(r.clone()));
        let none = Record {
            kernel: None,
            ..r.clone()
        };
        assert_eq!(Record::from_json(&none.to_json()), Some(none.clone()));
        assert_eq!(
            Record::from_json("{\"dir\":\"../x\",\"version\":\"v\"}"),
            None
        );
        assert_eq!(Record::from_json("not json"), None);

        // Cached and current: nothing to resolve.
        assert!(!needs_resolve(&r, Some("7.2.13-1"), false));
        // No kernel cached (yet, or any more): keep what is there.
        assert!(!needs_resolve(&r, None, false));
        // A new guest kernel: look sid up again.
        assert!(needs_resolve(&r, Some("7.2.14-1"), false));
        assert!(needs_resolve(&none, Some("7.2.13-1"), false));
        assert!(needs_resolve(&r, Some("7.2.13-1"), true));
    }

    #[test]
    fn prune_keeps_current_and_live_partials() {
        let root = std::env::temp_dir().join(format!("peers-prune-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let me = std::process::id();
        for d in [
            "kublk-new".to_owned(),
            "kublk-old".to_owned(),
            format!("kublk-new.partial-{me}"),
            "kublk-new.partial-4294967295".to_owned(),
            "rublk-0.1".to_owned(),
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        prune(&root, "kublk-", "kublk-new");
        let mut left: Vec<String> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "kublk-new".to_owned(),
                format!("kublk-new.partial-{me}"),
                "rublk-0.1".to_owned()
            ]
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
