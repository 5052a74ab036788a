//! Per-device state files under `/run/ublk/`, so `list` and `recover` know
//! a device's target after its daemon is gone.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::cli::{AddArgs, TargetKind};

/// Where state files live (`UBLK_STATE_DIR` overrides, for tests).
pub fn state_dir() -> PathBuf {
    std::env::var_os("UBLK_STATE_DIR").map_or_else(|| PathBuf::from("/run/ublk"), PathBuf::from)
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
}

/// The state file of device `id`.
pub fn path(id: u32) -> PathBuf {
    state_dir().join(format!("ublk{id}.json"))
}

impl DeviceState {
    /// Writes atomically (temporary file + rename).
    pub fn save(&self) -> anyhow::Result<()> {
        let dir = state_dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
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
