//! Per-device state files, so `list` and `recover` know a device's target
//! after its daemon is gone.
//!
//! They live in `/run/ublk/` for root. A non-root user (who can only have
//! unprivileged devices) cannot write there, so each such user has a
//! directory of their own: `$XDG_RUNTIME_DIR/ublk/`, or `/tmp/ublk-UID/`
//! (mode 0700, refused unless it is theirs) where that is unset.
//! `UBLK_STATE_DIR` overrides both.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::cli::{AddArgs, TargetKind};

/// Where state files live (`UBLK_STATE_DIR` overrides, for tests).
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("UBLK_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/ublk");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(d) if d.is_absolute() => d.join("ublk"),
        _ => PathBuf::from(format!("/tmp/ublk-{}", uid.as_raw())),
    }
}

/// Creates the state directory if needed (0700 for a non-root user's own
/// directory, which must then belong to that user).
pub fn ensure_dir() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = state_dir();
    let uid = rustix::process::geteuid();
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    if !uid.is_root() {
        b.mode(0o700);
    }
    b.create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    if !uid.is_root() {
        let md = std::fs::symlink_metadata(&dir)
            .with_context(|| format!("cannot inspect {}", dir.display()))?;
        if !md.is_dir() || md.uid() != uid.as_raw() {
            anyhow::bail!(
                "state directory {} is not a directory of user {} (set UBLK_STATE_DIR)",
                dir.display(),
                uid.as_raw()
            );
        }
    }
    Ok(dir)
}

/// What the daemon records about its device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceState {
    /// Device id.
    pub dev_id: u32,
    /// Target type.
    pub target: TargetKind,
    /// Exposed size in bytes.
    pub size: u64,
    /// Loop: the backing file.
    pub backing_file: Option<PathBuf>,
    /// Stripe: the backing files.
    #[serde(default)]
    pub backing_files: Vec<PathBuf>,
    /// Loop: whether O_DIRECT is in use.
    pub direct_io: Option<bool>,
    /// The daemon's pid.
    pub pid: i32,
    /// Queue thread ids, by queue.
    pub queue_tids: Vec<i32>,
    /// Queue CPU affinities, by queue.
    pub queue_affinity: Vec<Vec<usize>>,
    /// The options the device was added with.
    pub options: AddArgs,
    /// Nbd: the server and the connection's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<crate::nbd::NbdState>,
}

/// The state file of device `id`.
pub fn path(id: u32) -> PathBuf {
    state_dir().join(format!("ublk{id}.json"))
}

impl DeviceState {
    /// Writes atomically (temporary file + rename).
    pub fn save(&self) -> anyhow::Result<()> {
        let dir = ensure_dir()?;
        let final_path = path(self.dev_id);
        let tmp = dir.join(format!(".ublk{}.json.{}", self.dev_id, std::process::id()));
        let write = |p: &Path| -> std::io::Result<()> {
            let mut f = std::fs::File::create(p)?;
            f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
            f.sync_all()
        };
        write(&tmp)
            .and_then(|()| std::fs::rename(&tmp, &final_path))
            .with_context(|| format!("cannot write {}", final_path.display()))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
    }

    /// Reads device `id`'s state, if there is any.
    pub fn load(id: u32) -> Option<Self> {
        let bytes = std::fs::read(path(id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Removes device `id`'s state file (absent is fine).
    pub fn remove(id: u32) {
        let _ = std::fs::remove_file(path(id));
    }
}
