//! The nbd target of `ublk add -t nbd`: where the export is (a URI, or
//! ublksrv's `--host`/`--port`/`--unix` and `--export_name`), the first
//! connection made before the device exists (so a bad server leaves no
//! device behind), one connection per queue, and the connection state
//! `ublk list` shows.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use serde::{Deserialize, Serialize};
use ublk::targets::nbd::proto::{flags, ExportInfo};
use ublk::targets::nbd::{
    connect, Conn, ConnectOptions, NbdAddr, NbdOptions, NbdStatus, NbdTarget, Transport,
};

use crate::cli::AddArgs;
use crate::state::DeviceState;
use crate::usage;

/// How long a device with user recovery (`-r 1`) tries to reconnect by
/// default.
pub const RECOVERY_RECONNECT_TIMEOUT: u64 = 60;

/// Options of the nbd target (`ublk add -t nbd URI`, or ublksrv's
/// spellings).
#[derive(Debug, Clone, Args, Serialize, Deserialize, Default)]
pub struct NbdArgs {
    /// Nbd: the server's host (instead of a URI; ublksrv style).
    #[arg(long = "host", conflicts_with = "unix")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Nbd: the server's TCP port (default 10809).
    #[arg(long = "port", requires = "host")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Nbd: the server's Unix socket (instead of a URI; also --socket).
    #[arg(long = "unix", alias = "socket", value_name = "PATH")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix: Option<std::path::PathBuf>,
    /// Nbd: the export name (with --host or --unix; also --export).
    #[arg(long = "export_name", aliases = ["export", "export-name"], value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_name: Option<String>,
    /// Nbd: when the connection breaks, reconnect for at most this many
    /// seconds, then fail the requests with EIO (default: 60 with -r 1,
    /// else 0: fail at once).
    #[arg(
        long = "reconnect_timeout",
        alias = "reconnect-timeout",
        value_name = "SECONDS"
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_timeout: Option<u64>,
}

impl NbdArgs {
    /// Whether any nbd option is given (refused for other targets).
    pub fn any(&self) -> bool {
        self.host.is_some()
            || self.port.is_some()
            || self.unix.is_some()
            || self.export_name.is_some()
            || self.reconnect_timeout.is_some()
    }
}

/// The export `a` names: a URI (positional or `-f`), or the ublksrv-style
/// options.
pub fn addr(a: &AddArgs) -> anyhow::Result<NbdAddr> {
    let n = &a.nbd;
    let uri = a.backing_file()?;
    let transport = match (uri, &n.host, &n.unix) {
        (Some(u), None, None) => {
            let mut addr = NbdAddr::parse_uri(&u.to_string_lossy()).map_err(usage)?;
            if let Some(e) = &n.export_name {
                addr.export = e.clone();
            }
            return Ok(addr);
        }
        (Some(_), _, _) => return Err(usage("give the NBD server either as a URI or with --host/--unix, not both")),
        (None, Some(h), None) => Transport::Tcp {
            host: h.clone(),
            port: n.port.unwrap_or(ublk::targets::nbd::conn::DEFAULT_PORT),
        },
        (None, None, Some(p)) => Transport::Unix(p.clone()),
        (None, _, _) => {
            return Err(usage(
                "the nbd target needs a server: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, --host HOST or --unix PATH",
            ))
        }
    };
    Ok(NbdAddr {
        transport,
        export: n.export_name.clone().unwrap_or_default(),
    })
}

/// What the state file and `ublk list` say of an nbd device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdState {
    /// The server, as a URI.
    pub server: String,
    /// `connected`, `reconnecting` or `failed`.
    pub state: String,
    /// Connections lost so far.
    pub disconnects: u64,
    /// Reconnections so far.
    pub reconnects: u64,
}

/// An nbd device's connections: the first (made before the device), the
/// options every queue's target shares, and their status.
#[derive(Debug)]
pub struct NbdServe {
    /// The export.
    pub addr: NbdAddr,
    /// What the server said of it.
    pub info: ExportInfo,
    /// Queue 0's connection, until its queue takes it.
    first: Mutex<Option<Conn>>,
    opts: NbdOptions,
    /// Queues the device gets: 1 unless the server allows several
    /// connections.
    pub queues: u16,
    /// A note for the user (one queue where more were asked).
    pub note: Option<String>,
}

impl NbdServe {
    /// Connects to the export of `a` (one line naming the server if that
    /// fails) and decides the queue count.
    pub fn open(a: &AddArgs) -> anyhow::Result<Self> {
        let addr = addr(a)?;
        // Structured replies where requests come in memory buffers (the
        // copy modes): a hole in a read reply is zeroed there, which a
        // zero-copy request's registered buffer cannot be.
        let structured = !(a.dev.zero_copy || a.dev.auto_zc);
        let copts = ConnectOptions {
            structured,
            ..ConnectOptions::default()
        };
        let conn = connect(&addr, copts).map_err(|e| anyhow!("{e}"))?;
        let info = conn.info;
        if info.size < 512 {
            return Err(anyhow!(
                "NBD server {addr}: export {:?} is {} bytes, smaller than one block",
                addr.export,
                info.size
            ));
        }
        let mut queues = a.dev.queues;
        let mut note = None;
        if queues > 1 && !info.has(flags::CAN_MULTI_CONN) {
            note = Some(format!(
                "NBD server {addr} does not allow several connections (no NBD_FLAG_CAN_MULTI_CONN): using one queue instead of {queues}"
            ));
            queues = 1;
        }
        let timeout = a.nbd.reconnect_timeout.unwrap_or(if a.dev.recovery == 1 {
            RECOVERY_RECONNECT_TIMEOUT
        } else {
            0
        });
        Ok(Self {
            addr,
            info,
            first: Mutex::new(Some(conn)),
            opts: NbdOptions {
                reconnect_timeout: (timeout > 0).then(|| Duration::from_secs(timeout)),
                connect_timeout: copts.timeout,
                status: Arc::default(),
                structured,
            },
            queues,
            note,
        })
    }

    /// Queue `q`'s target: the first connection for the first queue to
    /// ask, a new one (which must show the same export) for the others.
    pub fn target(&self, depth: u16) -> std::io::Result<NbdTarget> {
        let first = self.first.lock().ok().and_then(|mut c| c.take());
        let conn = match first {
            Some(c) => c,
            None => {
                let copts = ConnectOptions {
                    structured: self.opts.structured,
                    ..ConnectOptions::default()
                };
                let c = connect(&self.addr, copts).map_err(std::io::Error::other)?;
                if c.info.size != self.info.size || c.info.flags != self.info.flags {
                    return Err(std::io::Error::other(format!(
                        "NBD server {}: a second connection shows another export",
                        self.addr
                    )));
                }
                c
            }
        };
        Ok(NbdTarget::new(
            self.addr.clone(),
            conn,
            depth,
            self.opts.clone(),
        ))
    }

    /// The status now.
    pub fn state(&self) -> NbdState {
        let s: &NbdStatus = &self.opts.status;
        NbdState {
            server: self.addr.to_string(),
            state: if s.failed.load(Ordering::Relaxed) {
                "failed"
            } else if s.down.load(Ordering::Relaxed) > 0 {
                "reconnecting"
            } else {
                "connected"
            }
            .into(),
            disconnects: s.disconnects.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
        }
    }

    /// Keeps the state file's connection status current while the device
    /// runs (a detached thread: it ends with the daemon).
    pub fn watch(self: &Arc<Self>, st: DeviceState) {
        // Weak: the thread stops when the device's server lets go of it.
        let me = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("nbd-status".into())
            .spawn(move || {
                let mut st = st;
                loop {
                    std::thread::sleep(Duration::from_millis(250));
                    let Some(me) = me.upgrade() else { return };
                    let now = me.state();
                    if st.nbd.as_ref() != Some(&now) {
                        st.nbd = Some(now);
                        if let Err(e) = st.save() {
                            log::warn!("{e:#}");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::warn!("cannot start the NBD status thread: {e}");
        }
    }
}
