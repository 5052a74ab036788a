//! Small helpers shared by the rig: running commands, shell quoting, cache
//! and workspace locations.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// Quotes `s` for a POSIX shell: the result is one word that expands to
/// exactly `s`, whatever bytes it holds.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Quotes every word of `words` and joins them with spaces.
pub fn shell_join<S: AsRef<str>>(words: &[S]) -> String {
    words
        .iter()
        .map(|w| shell_quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A human-readable rendering of a command line, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut words = vec![cmd.get_program().to_string_lossy().into_owned()];
    words.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    shell_join(&words)
}

/// Makes `cmd`'s stdout go to our stderr (keeping our stdout for the
/// guest's output).
pub fn stdout_to_stderr(cmd: &mut Command) -> &mut Command {
    if let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() {
        cmd.stdout(Stdio::from(fd));
    }
    cmd
}

/// Runs `cmd` with inherited stdio and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let desc = describe(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{desc}`"))?;
    if !status.success() {
        bail!("`{desc}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd`, capturing stdout and stderr; fails with the command's stderr
/// unless it exits successfully.  Returns stdout.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = capture(cmd)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            last_lines(&String::from_utf8_lossy(&out.stderr), 5)
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", describe(cmd)))
}

/// Runs `cmd` with stdin closed and stdout/stderr captured.
pub fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", describe(cmd)))
}

/// The last `n` non-empty lines of `text`, joined by " / " into one line.
pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let start = lines.len().saturating_sub(n);
    let joined = lines[start..].join(" / ");
    if joined.is_empty() {
        "(no error output)".to_owned()
    } else {
        joined
    }
}

/// The cargo executable that runs this xtask (`$CARGO`), or `cargo`.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Locations of the workspace, as reported by `cargo metadata`.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// The workspace root (holds the root Cargo.toml).
    pub root: PathBuf,
    /// The cargo target directory.
    pub target_dir: PathBuf,
}

impl Workspace {
    /// Asks cargo for the workspace root and target directory.
    pub fn locate() -> Result<Self> {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let json = output(
            cargo()
                .args([
                    "metadata",
                    "--format-version",
                    "1",
                    "--no-deps",
                    "--manifest-path",
                ])
                .arg(&manifest),
        )
        .context("cannot read the workspace metadata")?;
        Self::from_metadata(&json)
    }

    /// Parses the output of `cargo metadata --format-version 1`.
    pub fn from_metadata(json: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(json).context("cargo metadata printed invalid JSON")?;
        let get = |key: &str| -> Result<PathBuf> {
            v.get(key)
                .and_then(|x| x.as_str())
                .map(PathBuf::from)
                .with_context(|| format!("cargo metadata has no `{key}`"))
        };
        Ok(Self {
            root: get("workspace_root")?,
            target_dir: get("target_directory")?,
        })
    }
}

/// The root of the rig's cache: `${XDG_CACHE_HOME:-$HOME/.cache}/ublk-rs-rig`.
pub fn cache_root() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .context("neither XDG_CACHE_HOME nor HOME is set")?;
            PathBuf::from(home).join(".cache")
        }
    };
    Ok(base.join("ublk-rs-rig"))
}

/// Creates `dir` and its parents, with the path in the error.
pub fn create_dir_all(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Whether the current user is root (asks `id -u`; assumes not on failure).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Formats a byte count as MB with one decimal.
pub fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Converts an `OsStr` path to `&str`, failing on non-UTF-8 (the guest
/// scripts need text).
pub fn utf8<'a>(p: &'a OsStr, what: &str) -> Result<&'a str> {
    p.to_str()
        .with_context(|| format!("{what} {p:?} is not valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc"), "abc");
        assert_eq!(shell_quote("/a/b-c_d.e"), "/a/b-c_d.e");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME;`x`"), "'$HOME;`x`'");
        assert_eq!(shell_join(&["sh", "-c", "exit 3"]), "sh -c 'exit 3'");
    }

    #[test]
    fn quoting_roundtrip_through_sh() {
        let nasty = "a'b\"c $d `e` \\f\ng*";
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", shell_quote(nasty)))
            .output()
            .expect("sh runs");
        assert_eq!(String::from_utf8_lossy(&out.stdout), nasty);
    }

    #[test]
    fn metadata_parsing() {
        let ws = Workspace::from_metadata(
            r#"{"packages":[],"workspace_root":"/w","target_directory":"/w/target","version":1}"#,
        )
        .expect("parses");
        assert_eq!(ws.root, PathBuf::from("/w"));
        assert_eq!(ws.target_dir, PathBuf::from("/w/target"));
    }

    #[test]
    fn tail() {
        assert_eq!(last_lines("a\n\nb\nc\n", 2), "b / c");
        assert_eq!(last_lines("", 2), "(no error output)");
    }
}
