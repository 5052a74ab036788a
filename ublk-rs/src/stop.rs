//! Stopping a device from anywhere: [`StopHandle`], and stopping on
//! signals ([`StopHandle::stop_on_signals`], [`crate::Device::stop_on_signals`]).
//!
//! `STOP_DEV` makes every queue's pending command complete with
//! `UBLK_IO_RES_ABORT`, so [`crate::Device::run`] returns. But a `STOP_DEV`
//! that reaches the kernel before the queues have fetched cancels nothing,
//! and `START_DEV` would then bring the device up anyway: so a stop asked
//! for before the device is live is only recorded, and `run` checks for it
//! (under the same lock) before it sends `START_DEV`.

use std::os::raw::c_int;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use rustix::io::Errno;

use crate::ctrl::{Control, DevRef};
use crate::{Error, Result};

/// Where a device is in its life, as far as stopping it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Added, not (yet) started by `run`.
    Setup,
    /// `run` brought it up: a stop is a `STOP_DEV`.
    Live,
    /// A stop was asked for: `run` does not start it.
    Stopping,
    /// The guard deleted it (or handed it off): a stop does nothing, so a
    /// later device with the same id is never hit.
    Gone,
}

#[derive(Debug)]
struct StopState {
    ctrl: Arc<Control>,
    dev: DevRef,
    phase: Mutex<Phase>,
}

/// Stops its device: cheap to clone, `Send`, and safe to use at any time —
/// before `START_DEV` (the device then never starts and
/// [`crate::Device::run`] returns once its queues are set up), while it is
/// live (`STOP_DEV`), and after it was deleted (nothing happens).
#[derive(Debug, Clone)]
pub struct StopHandle {
    state: Arc<StopState>,
}

impl StopHandle {
    pub(crate) fn new(ctrl: Arc<Control>, dev: DevRef) -> Self {
        Self {
            state: Arc::new(StopState {
                ctrl,
                dev,
                phase: Mutex::new(Phase::Setup),
            }),
        }
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.state
            .phase
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the device (see the type's documentation); returns without
    /// waiting for [`crate::Device::run`] to return.
    pub fn stop(&self) -> Result<()> {
        let mut phase = self.phase();
        match *phase {
            Phase::Gone => Ok(()),
            Phase::Setup | Phase::Stopping => {
                *phase = Phase::Stopping;
                Ok(())
            }
            Phase::Live => {
                *phase = Phase::Stopping;
                match self.state.ctrl.stop_dev(self.state.dev) {
                    // Deleted meanwhile by someone else (`ublk del`).
                    Err(e) if e.errno() == Some(Errno::NODEV) => Ok(()),
                    r => r,
                }
            }
        }
    }

    /// Whether a stop was asked for.
    pub fn is_stopping(&self) -> bool {
        *self.phase() == Phase::Stopping
    }

    /// The device id.
    pub fn id(&self) -> u32 {
        self.state.dev.id
    }

    /// Runs `start` (START_DEV or END_USER_RECOVERY) unless a stop was
    /// asked for; `Ok(false)` if it was. No stop can slip in between the
    /// check and `start`.
    pub(crate) fn start_unless_stopped(&self, start: impl FnOnce() -> Result<()>) -> Result<bool> {
        let mut phase = self.phase();
        if matches!(*phase, Phase::Stopping | Phase::Gone) {
            return Ok(false);
        }
        start()?;
        *phase = Phase::Live;
        Ok(true)
    }

    /// The device is being deleted or handed off: later stops do nothing.
    pub(crate) fn retire(&self) {
        *self.phase() = Phase::Gone;
    }

    /// Stops the device on the first of `signals` (e.g. `[SIGINT,
    /// SIGTERM]`, from `signal_hook::consts` or `libc`), from a thread of
    /// its own. The handlers replace the signals' default action (which
    /// would kill the process and leave the device behind) until the
    /// returned guard is dropped.
    pub fn stop_on_signals(&self, signals: &[c_int]) -> Result<SignalStop> {
        let mut iter = signal_hook::iterator::Signals::new(signals)
            .map_err(Error::io("installing signal handlers"))?;
        let handle = iter.handle();
        let stopper = self.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ublk{}-signals", self.id()))
            .spawn(move || {
                for sig in iter.forever() {
                    log::info!("signal {sig}: stopping device {}", stopper.id());
                    if let Err(e) = stopper.stop() {
                        log::error!("stopping device {}: {e}", stopper.id());
                    }
                }
            })
            .map_err(Error::io("spawning the signal thread"))?;
        Ok(SignalStop {
            handle,
            thread: Some(thread),
        })
    }
}

/// Stops a device on signals while it lives (see
/// [`StopHandle::stop_on_signals`]); dropping it ends the signal thread.
#[derive(Debug)]
pub struct SignalStop {
    handle: signal_hook::iterator::Handle,
    thread: Option<JoinHandle<()>>,
}

impl Drop for SignalStop {
    fn drop(&mut self) {
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
