//! Fetching Debian kernels: a private apt configuration per suite (the host's
//! apt setup is never touched), version resolution, download, extraction and
//! caching under `${XDG_CACHE_HOME:-$HOME/.cache}/ublk-rs-rig/<suite>/`.
//!
//! Layout of a suite's cache directory:
//!
//! ```text
//! <suite>/apt/          private sources.list, package lists and apt cache
//! <suite>/debs/         downloaded .deb files
//! <suite>/kernels/REL/  extracted packages (root/), depmod output, initramfs
//! <suite>/current       "REL VERSION" of the kernel last resolved
//! ```

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::util;

/// The Debian mirror used when the host's apt configuration names none.
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The keyring that signs the Debian archive.
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// A Debian suite whose newest kernel the rig can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    /// Debian unstable: the newest kernel (image and modules in separate
    /// packages).
    Sid,
    /// Debian 13: a long-term kernel (one `linux-image-*` package).
    Trixie,
}

impl Suite {
    /// The suite's name in the archive.
    pub fn name(self) -> &'static str {
        match self {
            Suite::Sid => "sid",
            Suite::Trixie => "trixie",
        }
    }
}

impl fmt::Display for Suite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A kernel extracted into the cache, ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The suite it came from.
    pub suite: Suite,
    /// The kernel release (`uname -r`, name of the modules directory), e.g.
    /// `7.2.13+deb14-amd64`.
    pub release: String,
    /// The Debian package version, e.g. `7.2.13-1`.
    pub package_version: String,
    /// This kernel's cache directory (`<suite>/kernels/<release>`).
    pub dir: PathBuf,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// The module tree (`.../lib/modules/<release>`), with depmod's indexes.
    pub modules: PathBuf,
}

impl Kernel {
    /// The upstream version, e.g. `7.2.13`.
    pub fn version(&self) -> String {
        upstream_version(&self.package_version)
    }
}

/// Strips the epoch and Debian revision from a package version:
/// `1:7.2.13-1` → `7.2.13`.
pub fn upstream_version(package_version: &str) -> String {
    let v = package_version
        .split_once(':')
        .map_or(package_version, |(_, rest)| rest);
    v.rsplit_once('-').map_or(v, |(up, _)| up).to_owned()
}

/// Finds the Debian mirror URI in the host's apt configuration: deb822
/// `*.sources` files and one-line `sources.list` files.  Security and
/// non-Debian repositories are skipped.
pub fn host_mirror() -> String {
    let mut files: Vec<PathBuf> = vec!["/etc/apt/sources.list".into()];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy();
        let found = if name.ends_with(".sources") {
            mirror_from_deb822(&text)
        } else if name.ends_with(".list") {
            mirror_from_one_line(&text)
        } else {
            None
        };
        if let Some(uri) = found {
            return uri;
        }
    }
    DEFAULT_MIRROR.to_owned()
}

/// Whether `uri` looks like a main Debian archive mirror.
fn is_debian_mirror(uri: &str) -> bool {
    let uri = uri.trim_end_matches('/');
    uri.ends_with("/debian") && !uri.contains("security")
}

/// The first Debian mirror URI of a deb822 `.sources` file's `deb` stanzas.
pub fn mirror_from_deb822(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let mut types = "";
        let mut uris = "";
        let mut enabled = true;
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            if let Some((key, value)) = line.split_once(':') {
                match key.trim().to_ascii_lowercase().as_str() {
                    "types" => types = value.trim(),
                    "uris" => uris = value.trim(),
                    "enabled" => enabled = value.trim() != "no",
                    _ => {}
                }
            }
        }
        if !enabled || !types.split_whitespace().any(|t| t == "deb") {
            continue;
        }
        if let Some(uri) = uris.split_whitespace().find(|u| is_debian_mirror(u)) {
            return Some(uri.trim_end_matches('/').to_owned());
        }
    }
    None
}

/// The first Debian mirror URI of a one-line-style `sources.list`.
pub fn mirror_from_one_line(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            return None;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // Options: skip to the word that closes them.
            while !uri.ends_with(']') {
                uri = words.next()?;
            }
            uri = words.next()?;
        }
        is_debian_mirror(uri).then(|| uri.trim_end_matches('/').to_owned())
    })
}

/// The names in the `Depends:` lines of `apt-cache depends` output for one
/// package (alternatives included, virtual `<names>` skipped).
pub fn parse_depends(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .filter(|name| !name.starts_with('<'))
        .map(str::to_owned)
        .collect()
}

/// The value of the first `field:` line of `apt-cache show` output.
pub fn parse_field(text: &str, field: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    })
}

/// A private apt configuration for one suite.
#[derive(Debug)]
pub struct Apt {
    suite: Suite,
    dir: PathBuf,
}

impl Apt {
    /// Sets up (creating directories and the sources list) the private apt
    /// configuration in `<suite dir>/apt`.
    pub fn new(suite: Suite, suite_dir: &Path) -> Result<Self> {
        let dir = suite_dir.join("apt");
        for sub in ["lists/partial", "cache/archives/partial"] {
            util::create_dir_all(&dir.join(sub))?;
        }
        let mirror = host_mirror();
        let list = format!("deb [signed-by={KEYRING}] {mirror} {} main\n", suite.name());
        let path = dir.join("sources.list");
        fs::write(&path, list).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { suite, dir })
    }

    /// The `-o` options that point apt at the private configuration.
    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        [
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".into(),
            "Dir::Etc::Preferences=/dev/null".into(),
            "Dir::Etc::PreferencesParts=/dev/null".into(),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::Cache={d}/cache"),
            "Dir::State::status=/dev/null".into(),
            "Debug::NoLocking=1".into(),
            "APT::Sandbox::User=root".into(),
            "APT::Architecture=amd64".into(),
            "APT::Architectures=amd64".into(),
            "Acquire::Languages=none".into(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_owned(), o])
        .collect()
    }

    /// An apt command (`apt-get`, `apt-cache`) using the private config.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(self.options());
        cmd
    }

    /// `apt-get update`; fails with apt's error lines if any index could
    /// not be fetched.
    pub fn update(&self) -> Result<()> {
        eprintln!("updating the package lists of {}...", self.suite);
        let out = util::capture(self.command("apt-get").arg("update"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let problems: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("E:") || l.starts_with("W:") && l.contains("ailed"))
            .collect();
        if !out.status.success() || !problems.is_empty() {
            let problems = if problems.is_empty() {
                vec![stderr.as_ref()]
            } else {
                problems
            };
            bail!(
                "cannot update the package lists of {}: {}",
                self.suite,
                util::last_lines(&problems.join("\n"), 3)
            );
        }
        Ok(())
    }

    /// `apt-cache depends PKG`, parsed.
    pub fn depends(&self, pkg: &str) -> Result<Vec<String>> {
        let text = util::output(self.command("apt-cache").args(["depends", pkg]))
            .with_context(|| format!("cannot find package {pkg} in {}", self.suite))?;
        Ok(parse_depends(&text))
    }

    /// `apt-cache show --no-all-versions PKG`.
    pub fn show(&self, pkg: &str) -> Result<String> {
        util::output(
            self.command("apt-cache")
                .args(["show", "--no-all-versions", pkg]),
        )
        .with_context(|| format!("cannot find package {pkg} in {}", self.suite))
    }

    /// The candidate version and download size of `pkg`.
    pub fn version_and_size(&self, pkg: &str) -> Result<(String, u64)> {
        let text = self.show(pkg)?;
        let version = parse_field(&text, "Version")
            .with_context(|| format!("apt-cache show {pkg} printed no Version"))?;
        let size = parse_field(&text, "Size")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((version, size))
    }

    /// Downloads `pkg` (at `version`) into `dest` unless already there;
    /// returns the .deb's path.  apt's progress output is shown.
    pub fn download(&self, pkg: &str, version: &str, size: u64, dest: &Path) -> Result<PathBuf> {
        util::create_dir_all(dest)?;
        if let Some(deb) = find_deb(dest, pkg, version) {
            return Ok(deb);
        }
        eprintln!("downloading {pkg} {version} ({})...", util::mb(size));
        let mut cmd = self.command("apt-get");
        cmd.arg("download")
            .arg(format!("{pkg}={version}"))
            .current_dir(dest)
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        let out = util::stdout_to_stderr(&mut cmd)
            .spawn()
            .and_then(|child| child.wait_with_output())
            .context("cannot run apt-get download")?;
        let fail = |why: String| anyhow::anyhow!("cannot download {pkg} for {}: {why}", self.suite);
        if !out.status.success() {
            return Err(fail(util::last_lines(
                &String::from_utf8_lossy(&out.stderr),
                3,
            )));
        }
        find_deb(dest, pkg, version).ok_or_else(|| {
            fail(format!(
                "apt-get download left no .deb in {}",
                dest.display()
            ))
        })
    }
}

/// The `.deb` for `pkg` at `version` in `dir`, if present.
fn find_deb(dir: &Path, pkg: &str, version: &str) -> Option<PathBuf> {
    let prefix = format!("{pkg}_{}_", version.replace(':', "%3a"));
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name.starts_with(&prefix) && name.ends_with(".deb")).then(|| e.path())
        })
}

/// The cache directory of `suite`.
pub fn suite_dir(suite: Suite) -> Result<PathBuf> {
    Ok(util::cache_root()?.join(suite.name()))
}

/// Returns the newest kernel of `suite`, downloading and extracting it if
/// it is not cached.  The version is resolved over the network once per
/// call; when that fails and a kernel was cached before, that one is used.
pub fn fetch(suite: Suite) -> Result<Kernel> {
    let dir = suite_dir(suite)?;
    util::create_dir_all(&dir)?;
    let apt = Apt::new(suite, &dir)?;
    match resolve_and_fetch(&apt, suite, &dir) {
        Ok(kernel) => Ok(kernel),
        Err(err) => match cached(suite, &dir) {
            Some(kernel) => {
                eprintln!("note: {err:#}");
                eprintln!(
                    "note: using the cached {suite} kernel {} ({})",
                    kernel.release, kernel.package_version
                );
                Ok(kernel)
            }
            None => Err(err),
        },
    }
}

/// The kernel release and package version recorded in `<suite>/current`
/// by the last [`fetch`] (no network), if any.
pub fn current(suite: Suite) -> Option<(String, String)> {
    let text = fs::read_to_string(suite_dir(suite).ok()?.join("current")).ok()?;
    parse_current(&text)
}

/// Parses `<suite>/current`: "RELEASE VERSION".
fn parse_current(text: &str) -> Option<(String, String)> {
    let (release, version) = text.trim().split_once(' ')?;
    Some((release.to_owned(), version.to_owned()))
}

/// The kernel recorded in `<suite>/current`, if it is fully extracted.
fn cached(suite: Suite, dir: &Path) -> Option<Kernel> {
    let text = fs::read_to_string(dir.join("current")).ok()?;
    let (release, version) = parse_current(&text)?;
    let kdir = dir.join("kernels").join(&release);
    kdir.join(".complete")
        .exists()
        .then(|| locate(suite, &release, &version, &kdir).ok())
        .flatten()
}

/// Resolves the newest kernel of the suite, then downloads and extracts it
/// unless that is cached.
fn resolve_and_fetch(apt: &Apt, suite: Suite, dir: &Path) -> Result<Kernel> {
    apt.update()?;
    let image = apt
        .depends("linux-image-amd64")?
        .into_iter()
        .find(|d| d.starts_with("linux-image-") && d != "linux-image-amd64")
        .with_context(|| format!("linux-image-amd64 in {suite} depends on no linux-image-*"))?;
    let release = image["linux-image-".len()..].to_owned();
    let (version, _) = apt.version_and_size(&image)?;
    let kdir = dir.join("kernels").join(&release);
    if !kdir.join(".complete").exists() {
        // sid splits the kernel into linux-binary-* and linux-modules-*;
        // older suites ship both in linux-image-*.
        let deps = apt.depends(&image)?;
        let split: Vec<String> = ["linux-binary-", "linux-modules-"]
            .iter()
            .map(|p| format!("{p}{release}"))
            .collect();
        let packages = if split.iter().all(|p| deps.contains(p)) {
            split
        } else {
            vec![image.clone()]
        };
        let mut debs = Vec::new();
        for pkg in &packages {
            let (v, size) = apt.version_and_size(pkg)?;
            debs.push(apt.download(pkg, &v, size, &dir.join("debs"))?);
        }
        extract(&debs, &release, &kdir)?;
        prune(dir, &release, &debs);
    }
    let current = dir.join("current");
    fs::write(&current, format!("{release} {version}\n"))
        .with_context(|| format!("cannot write {}", current.display()))?;
    locate(suite, &release, &version, &kdir)
}

/// Removes the cached kernels and .debs other than `release` and `keep`
/// (best effort: a failure only leaves files behind).
fn prune(dir: &Path, release: &str, keep: &[PathBuf]) {
    if let Ok(entries) = fs::read_dir(dir.join("kernels")) {
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_name() != release {
                eprintln!("removing the old kernel {}", e.path().display());
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(entries) = fs::read_dir(dir.join("debs")) {
        for e in entries.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().into_owned();
            let linux = name.starts_with("linux-image-")
                || name.starts_with("linux-binary-")
                || name.starts_with("linux-modules-");
            if linux && !keep.contains(&e.path()) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Extracts `debs` into `kdir/root` and runs depmod over the module tree.
fn extract(debs: &[PathBuf], release: &str, kdir: &Path) -> Result<()> {
    eprintln!("extracting kernel {release}...");
    if kdir.exists() {
        fs::remove_dir_all(kdir).with_context(|| format!("cannot remove {}", kdir.display()))?;
    }
    let root = kdir.join("root");
    util::create_dir_all(&root)?;
    for deb in debs {
        util::output(Command::new("dpkg").arg("-x").arg(deb).arg(&root))
            .with_context(|| format!("cannot extract {}", deb.display()))?;
    }
    // depmod -b looks in ROOT/lib/modules; merged-/usr packages use
    // usr/lib/modules.
    let lib = root.join("lib");
    if !lib.exists() && root.join("usr/lib/modules").exists() {
        std::os::unix::fs::symlink("usr/lib", &lib)
            .with_context(|| format!("cannot create {}", lib.display()))?;
    }
    let depmod = ["/usr/sbin/depmod", "/sbin/depmod"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("depmod");
    util::output(Command::new(depmod).arg("-b").arg(&root).arg(release))
        .context("cannot index the kernel modules (is kmod installed?)")?;
    let stamp = kdir.join(".complete");
    fs::write(&stamp, "").with_context(|| format!("cannot write {}", stamp.display()))
}

/// Finds the image and module tree of an extracted kernel.
fn locate(suite: Suite, release: &str, version: &str, kdir: &Path) -> Result<Kernel> {
    let root = kdir.join("root");
    let modules = root.join("lib/modules").join(release);
    let vmlinuz = [
        root.join("boot").join(format!("vmlinuz-{release}")),
        modules.join("vmlinuz"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .with_context(|| format!("no kernel image for {release} in {}", root.display()))?;
    let modules = fs::canonicalize(&modules)
        .with_context(|| format!("no module tree at {}", modules.display()))?;
    Ok(Kernel {
        suite,
        release: release.to_owned(),
        package_version: version.to_owned(),
        dir: kdir.to_owned(),
        vmlinuz,
        modules,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_parsing() {
        let text = "linux-image-amd64\n  Depends: linux-base-amd64\n  Depends: linux-image-7.2.13+deb14-amd64\n";
        assert_eq!(
            parse_depends(text),
            ["linux-base-amd64", "linux-image-7.2.13+deb14-amd64"]
        );
        let text = "linux-image-7.2.13+deb14-amd64\n  PreDepends: linux-base\n |Depends: dracut\n |Depends: initramfs-tools\n  Depends: <linux-initramfs-tool>\n    dracut\n  Depends: linux-binary-7.2.13+deb14-amd64\n  Breaks: <fwupdate>\n  Recommends: apparmor\n";
        assert_eq!(
            parse_depends(text),
            [
                "dracut",
                "initramfs-tools",
                "linux-binary-7.2.13+deb14-amd64"
            ]
        );
    }

    #[test]
    fn fields() {
        let text = "Package: linux-source-7.2\nVersion: 7.2.13-1\nSize: 164108840\n";
        assert_eq!(parse_field(text, "Version").as_deref(), Some("7.2.13-1"));
        assert_eq!(parse_field(text, "Size").as_deref(), Some("164108840"));
        assert_eq!(parse_field(text, "Depends"), None);
    }

    #[test]
    fn current_parsing() {
        assert_eq!(
            parse_current("7.2.13+deb14-amd64 7.2.13-1\n"),
            Some(("7.2.13+deb14-amd64".to_owned(), "7.2.13-1".to_owned()))
        );
        assert_eq!(parse_current("garbage"), None);
    }

    #[test]
    fn versions() {
        assert_eq!(upstream_version("7.2.13-1"), "7.2.13");
        assert_eq!(upstream_version("1:6.12.57-1~bpo1"), "6.12.57");
        assert_eq!(upstream_version("7.0~rc3-1~exp1"), "7.0~rc3");
    }

    #[test]
    fn deb822_mirror() {
        let text = "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_from_deb822(text).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let security_only = "Types: deb\nURIs: http://deb.debian.org/debian-security/\n";
        assert_eq!(mirror_from_deb822(security_only), None);
        let disabled = "Types: deb\nURIs: http://x/debian\nEnabled: no\n\nTypes: deb-src deb\nURIs: http://y/debian/\n";
        assert_eq!(
            mirror_from_deb822(disabled).as_deref(),
            Some("http://y/debian")
        );
    }

    #[test]
    fn one_line_mirror() {
        let text = "# deb http://no/debian sid main\ndeb-src http://src/debian sid main\ndeb [arch=amd64 signed-by=/k.gpg] http://ftp.de.debian.org/debian/ bookworm main\n";
        assert_eq!(
            mirror_from_one_line(text).as_deref(),
            Some("http://ftp.de.debian.org/debian")
        );
    }
}
