//! A target that misbehaves on purpose: slow, failing, or dying, around
//! any other target (kublk's `fault_inject`, plus errors).

use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{opcode, types};

use crate::target::{Handled, Op, Request, Submit, Target};
use crate::{Error, Result};

/// Marks the user data of this target's own timeouts; the wrapped target's
/// data must stay below it.
const TIMEOUT: u32 = 1 << 31;

/// A result (bytes, or `-errno`) in the 31 bits below [`TIMEOUT`].
#[inline]
fn encode(res: i32) -> u32 {
    TIMEOUT | (res as u32 & !TIMEOUT)
}

#[inline]
fn decode(data: u32) -> i32 {
    // Sign-extend bit 30.
    ((data << 1) as i32) >> 1
}

/// Wraps a target `T` (a null target for kublk's `fault_inject`, or a
/// file target for a failing disk with real data) and injects:
///
/// * a delay: every request completes [`FaultInject::delay`] after `T`
///   finished it, through an io_uring timeout on the queue's ring (the
///   queue goes on serving meanwhile);
/// * errors: `-EIO` for requests touching a sector range
///   ([`FaultInject::error_range`]) and for a random share of all
///   requests ([`FaultInject::error_rate`], from a seeded generator so a
///   run can be repeated); a failed request never reaches `T`;
/// * death: [`FaultInject::die_during_fetch`] kills the process with
///   `SIGKILL` once each queue has fetched its tag 0 but not tag 1.
///
/// `T`'s own entries must use data below `1 << 31`.
#[derive(Debug)]
pub struct FaultInject<T> {
    inner: T,
    /// Read by the kernel from timeout entries: boxed so it does not move.
    delay: Option<Box<types::Timespec>>,
    /// Errors per 2^32 requests.
    error_threshold: u64,
    rng: u64,
    /// Sectors `[start, end)` whose requests fail.
    error_range: Option<(u64, u64)>,
    die_during_fetch: bool,
}

impl<T: Target> FaultInject<T> {
    /// `inner`, with no fault.
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            delay: None,
            error_threshold: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            error_range: None,
            die_during_fetch: false,
        }
    }

    /// Completes each request `delay` after it is done (none if zero).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = (!delay.is_zero()).then(|| {
            Box::new(
                types::Timespec::new()
                    .sec(delay.as_secs())
                    .nsec(delay.subsec_nanos()),
            )
        });
        self
    }

    /// Fails this share of requests (`0.0..=1.0`) with `-EIO`, drawn from
    /// a generator seeded with `seed`.
    pub fn error_rate(mut self, rate: f64, seed: u64) -> Result<Self> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(Error::Config(format!("error rate {rate} is outside 0..=1")));
        }
        self.error_threshold = (rate * (1u64 << 32) as f64) as u64;
        // xorshift needs a non-zero state.
        self.rng = seed | 1;
        Ok(self)
    }

    /// Fails requests touching `count` sectors from `start` with `-EIO`.
    pub fn error_range(mut self, start: u64, count: u64) -> Self {
        self.error_range = (count > 0).then(|| (start, start.saturating_add(count)));
        self
    }

    /// Kills the process with `SIGKILL` before a queue fetches its tag 1
    /// (its earlier fetches submitted first), leaving a device with some
    /// but not all tags fetched: for testing the driver's teardown.
    pub fn die_during_fetch(mut self, die: bool) -> Self {
        self.die_during_fetch = die;
        self
    }

    /// The wrapped target.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// xorshift64.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    fn fails(&mut self, req: &Request<'_>) -> bool {
        let d = req.desc;
        let in_range = self.error_range.is_some_and(|(start, end)| {
            matches!(d.op, Op::Read | Op::Write | Op::Discard | Op::WriteZeroes)
                && d.start_sector < end
                && d.start_sector + u64::from(d.nr_sectors) > start
        });
        in_range || (self.error_threshold > 0 && self.next_random() >> 32 < self.error_threshold)
    }

    /// Completes with `res` now, or after the delay.
    // The timeout points at `self.delay`, which outlives the queue's run.
    #[allow(unsafe_code)]
    fn finish(&mut self, sub: &mut Submit<'_, '_>, res: i32) -> Handled {
        let Some(ts) = self.delay.as_deref() else {
            return Handled::Done(res);
        };
        let e = opcode::Timeout::new(ts).build();
        // SAFETY: the entry points at the boxed timespec, which lives as
        // long as this target, and a target outlives every entry it
        // queued (the queue returns from `run` only when none is left).
        match unsafe { sub.push(encode(res), e) } {
            Ok(()) => Handled::Queued,
            Err(_) => Handled::Done(res),
        }
    }
}

impl<T: Target> Target for FaultInject<T> {
    fn handle(&mut self, sub: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
        if self.fails(&req) {
            return self.finish(sub, -libc::EIO);
        }
        match self.inner.handle(sub, req) {
            Handled::Done(res) => self.finish(sub, res),
            Handled::Queued => Handled::Queued,
        }
    }

    fn complete(&mut self, sub: &mut Submit<'_, '_>, tag: u16, data: u32, res: i32) -> Handled {
        if data & TIMEOUT != 0 {
            // `res` is -ETIME: the delay is over.
            return Handled::Done(decode(data));
        }
        match self.inner.complete(sub, tag, data, res) {
            Handled::Done(res) => self.finish(sub, res),
            Handled::Queued => Handled::Queued,
        }
    }

    fn fixed_files(&self) -> Vec<RawFd> {
        self.inner.fixed_files()
    }

    fn sqes_per_request(&self) -> usize {
        self.inner.sqes_per_request()
    }

    fn before_fetch(&mut self, sub: &mut Submit<'_, '_>, q_id: u16, tag: u16) {
        if self.die_during_fetch && tag == 1 {
            // The fetches so far must be live in the kernel first.
            let _ = sub.submit();
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
        }
        self.inner.before_fetch(sub, q_id, tag);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_survive_the_user_data() {
        for r in [0, 4096, 512 << 20, -libc::EIO, -libc::EOPNOTSUPP, -1] {
            assert_eq!(decode(encode(r)), r);
            assert_ne!(encode(r) & TIMEOUT, 0);
        }
    }

    struct Nothing;
    impl Target for Nothing {
        fn handle(&mut self, _: &mut Submit<'_, '_>, _: Request<'_>) -> Handled {
            Handled::Done(0)
        }
    }

    #[test]
    fn the_error_rate_is_about_right() {
        let mut t = FaultInject::new(Nothing).error_rate(0.25, 7).unwrap();
        let hits = (0..100_000)
            .filter(|_| t.next_random() >> 32 < t.error_threshold)
            .count();
        assert!((23_000..27_000).contains(&hits), "{hits}");
        assert!(FaultInject::new(Nothing).error_rate(1.5, 1).is_err());
    }
}
