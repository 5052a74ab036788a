//! Batch I/O (`UBLK_F_BATCH_IO`): instead of one FETCH/COMMIT_AND_FETCH
//! per request, a queue keeps one multishot FETCH_IO_CMDS armed, whose
//! completions carry the tags of new requests in a provided buffer, and
//! commits every request finished in one pass of the run loop with a
//! single COMMIT_IO_CMDS.
//!
//! A batch worker serves one or more whole queues (kublk's `-b --nthreads
//! N` with fewer threads than queues), each with its own fetch, fetch
//! buffer group and commits: a [`Batch`] per queue, in the order of the
//! worker's queues, whose io indexes run from [`Batch::base`] in tag order.

use io_uring::{cqueue, IoUring};

use super::{CopyMode, IoIndex, Kind, Queue, QueueConfig};
use crate::cmd;
use crate::mem::BufRing;
use crate::target::Target;
use crate::{Error, Result};

/// Buffers in a queue's fetch ring.
const FETCH_BUFS: u16 = 8;

/// Batch I/O state of a queue.
#[derive(Debug)]
pub(super) struct Batch {
    q_id: u16,
    /// The worker's io index of this queue's tag 0 (its tags follow).
    base: u16,
    /// The provided-buffer group of this queue's fetch.
    group: u16,
    fetch_ring: BufRing,
    flags: u16,
    elem_bytes: usize,
    /// Elements of finished requests, committed at the next flush.
    pending: Vec<u8>,
    /// Commit buffers in flight, by the id in their user data.
    in_flight: Vec<Vec<u8>>,
    /// Ids of free slots in `in_flight`.
    free: Vec<u32>,
    /// Commits (and the prep) in flight.
    cmds: usize,
    /// Tags of the fetch CQE being handled.
    tags: Vec<u16>,
    /// The device is going away: do not rearm the fetch.
    stopping: bool,
}

impl Batch {
    /// The batch state of queue `q_id` of the device `cfg` describes,
    /// whose tags are the worker's ios from `base`, its fetch buffer ring
    /// registered with `ring` as group `group`. The caller keeps the result
    /// alive until `ring` is closed (the kernel writes the ring's buffers).
    pub(super) fn new(
        cfg: &QueueConfig,
        ring: &IoUring,
        q_id: u16,
        base: u16,
        group: u16,
    ) -> Result<Self> {
        let mut flags = 0u16;
        if matches!(cfg.mode, CopyMode::Copy) {
            flags |= ublk_sys::UBLK_BATCH_F_HAS_BUF_ADDR as u16;
        }
        if matches!(cfg.mode, CopyMode::AutoBufReg { fallback: true }) {
            flags |= ublk_sys::UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK as u16;
        }
        let elem_bytes = usize::from(cmd::batch_elem_bytes(flags));
        let fetch_ring = BufRing::new(FETCH_BUFS, usize::from(cfg.depth) * size_of::<u16>())?;
        // SAFETY: the ring memory lives in the returned `Batch`, which the
        // queue drops only after closing `ring` (`Queue`'s `Drop`), so it
        // outlives the registration.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                fetch_ring.ring_addr(),
                fetch_ring.entries(),
                group,
                0,
            )
        }
        .map_err(Error::io("registering the batch fetch buffer ring"))?;
        let cap = usize::from(cfg.depth) * elem_bytes;
        Ok(Self {
            q_id,
            base,
            group,
            fetch_ring,
            flags,
            elem_bytes,
            pending: Vec::with_capacity(cap),
            in_flight: Vec::new(),
            free: Vec::new(),
            cmds: 0,
            tags: Vec::with_capacity(usize::from(cfg.depth)),
            stopping: false,
        })
    }

    /// Whether commits are in flight or waiting to be sent.
    pub(super) fn busy(&self) -> bool {
        self.cmds > 0 || !self.pending.is_empty()
    }

    fn push_elem(&mut self, tag: u16, result: i32, buf_addr: Option<*mut u8>) {
        let mut hdr = [0u8; 8];
        hdr[0..2].copy_from_slice(&tag.to_ne_bytes());
        hdr[2..4].copy_from_slice(&tag.to_ne_bytes()); // buf_index (auto registration)
        hdr[4..8].copy_from_slice(&result.to_ne_bytes());
        self.pending.extend_from_slice(&hdr);
        if self.flags as u32 & ublk_sys::UBLK_BATCH_F_HAS_BUF_ADDR != 0 {
            self.pending.extend_from_slice(
                &(buf_addr.unwrap_or(std::ptr::null_mut()) as u64).to_ne_bytes(),
            );
        }
    }
}

impl Queue<'_> {
    /// The batch state of the queue io `io` belongs to.
    fn batch_of(&mut self, io: IoIndex) -> Option<&mut Batch> {
        let qi = self.slot(io).qi;
        self.batches.get_mut(qi)
    }

    /// PREP_IO_CMDS for every tag of every queue (each waited for: it
    /// completes at once), then one multishot FETCH_IO_CMDS per queue.
    pub(super) fn batch_start(&mut self) -> Result<()> {
        let depth = self.cfg.depth;
        let cdev = self.cdev_ref();
        for qi in 0..self.batches.len() {
            let base = self.batches[qi].base;
            let addrs: Vec<Option<*mut u8>> = (0..depth)
                .map(|t| self.buf_addr(IoIndex(base + t)))
                .collect();
            let b = &mut self.batches[qi];
            for (tag, addr) in (0..depth).zip(addrs) {
                b.push_elem(tag, 0, addr);
            }
            let prep = std::mem::take(&mut b.pending);
            let e = cmd::PrepIoCmds::new(cdev, b.q_id, b.flags, depth, prep.as_ptr()).build();
            // `prep` lives until after the wait below, which returns this
            // command's completion (nothing else is in flight).
            self.push_own(Kind::Prep, IoIndex(base), 0, e)
                .map_err(Error::io("queueing PREP_IO_CMDS"))?;
            self.ring
                .submit_and_wait(1)
                .map_err(Error::io("submitting PREP_IO_CMDS"))?;
            let res = self
                .ring
                .completion()
                .next()
                .map_or(-libc::EPROTO, |c| c.result());
            let b = &mut self.batches[qi];
            b.pending = prep;
            b.pending.clear();
            if res < 0 {
                return Err(self.refused("UBLK_U_IO_PREP_IO_CMDS", res));
            }
        }
        for qi in 0..self.batches.len() {
            self.arm_fetch(qi);
        }
        self.ring
            .submit()
            .map_err(Error::io("submitting FETCH_IO_CMDS"))?;
        // A refused fetch completes at once; a good one stays armed.
        let refused = self.ring.completion().next().map(|c| c.result());
        match refused {
            Some(res) => Err(self.refused("UBLK_U_IO_FETCH_IO_CMDS", res)),
            None => Ok(()),
        }
    }

    /// Arms the multishot fetch of the worker's `qi`-th queue.
    fn arm_fetch(&mut self, qi: usize) {
        let Some(b) = self.batches.get(qi) else {
            return;
        };
        let (base, q_id, group) = (b.base, b.q_id, b.group);
        let e = cmd::FetchIoCmds::new(self.cdev_ref(), q_id, group).build();
        self.push_own_or_log(Kind::Fetch, IoIndex(base), e);
    }

    /// Queues `io`'s result for its queue's next COMMIT_IO_CMDS.
    pub(super) fn batch_finish(&mut self, io: IoIndex, res: i32) {
        let addr = self.buf_addr(io);
        let tag = self.slot(io).tag;
        if let Some(b) = self.batch_of(io) {
            b.push_elem(tag, res, addr);
        }
    }

    /// Commits everything finished since the last flush, one
    /// COMMIT_IO_CMDS per queue.
    pub(super) fn flush_commits(&mut self) {
        for qi in 0..self.batches.len() {
            self.flush_queue_commits(qi);
        }
    }

    fn flush_queue_commits(&mut self, qi: usize) {
        let cdev = self.cdev_ref();
        let Some(b) = self.batches.get_mut(qi) else {
            return;
        };
        if b.pending.is_empty() {
            return;
        }
        let id = match b.free.pop() {
            Some(id) => id,
            None => {
                b.in_flight.push(Vec::with_capacity(b.pending.capacity()));
                (b.in_flight.len() - 1) as u32
            }
        };
        let slot = &mut b.in_flight[id as usize];
        std::mem::swap(slot, &mut b.pending);
        let nr = (slot.len() / b.elem_bytes) as u16;
        let (q_id, base) = (b.q_id, b.base);
        let e = cmd::CommitIoCmds::new(cdev, q_id, b.flags, nr, slot.as_ptr()).build();
        b.cmds += 1;
        // The elements stay in `in_flight[id]` until this command's CQE
        // returns the slot to `free`.
        if let Err(e) = self.push_own(Kind::Commit, IoIndex(base), id, e) {
            log::error!("queue {q_id}: cannot queue COMMIT_IO_CMDS: {e}");
            if let Some(b) = self.batches.get_mut(qi) {
                b.cmds = b.cmds.saturating_sub(1);
                b.in_flight[id as usize].clear();
                b.free.push(id);
            }
        }
    }

    /// A completion of the fetch of the queue whose tag 0 is io `first`.
    pub(super) fn on_fetch_cqe<T: Target + ?Sized>(
        &mut self,
        target: &mut T,
        first: IoIndex,
        res: i32,
        flags: u32,
    ) {
        let qi = self.slot(first).qi;
        let depth = self.cfg.depth;
        let Some(b) = self.batches.get_mut(qi) else {
            return;
        };
        b.tags.clear();
        if let Some(bid) = cqueue::buffer_select(flags) {
            let n = usize::try_from(res).unwrap_or(0) / size_of::<u16>();
            if let Some(buf) = b.fetch_ring.buf(bid, n * size_of::<u16>()) {
                b.tags.extend(
                    buf.chunks_exact(2)
                        .map(|c| u16::from_ne_bytes([c[0], c[1]])),
                );
            }
            b.fetch_ring.provide(bid);
            b.fetch_ring.publish();
        }
        let more = cqueue::more(flags);
        if !more {
            self.cmd_inflight = self.cmd_inflight.saturating_sub(1);
        }
        let (q_id, base) = (b.q_id, b.base);
        let tags = std::mem::take(&mut b.tags);
        for &tag in &tags {
            if tag >= depth {
                log::error!("queue {q_id}: kernel fetched tag {tag} past the depth");
                continue;
            }
            self.dispatch(target, IoIndex(base + tag));
        }
        let Some(b) = self.batches.get_mut(qi) else {
            return;
        };
        b.tags = tags;
        if more {
            return;
        }
        if res >= 0 || res == -libc::ENOBUFS {
            if !b.stopping {
                self.arm_fetch(qi);
            }
        } else {
            b.stopping = true;
            if res != ublk_sys::UBLK_IO_RES_ABORT {
                log::error!(
                    "queue {q_id}: FETCH_IO_CMDS failed: {}",
                    std::io::Error::from_raw_os_error(-res)
                );
            }
        }
    }

    /// A COMMIT_IO_CMDS of the queue whose tag 0 is io `first` completed.
    pub(super) fn on_commit_cqe(&mut self, first: IoIndex, id: u32, res: i32) {
        let qi = self.slot(first).qi;
        let Some(b) = self.batches.get_mut(qi) else {
            return;
        };
        let q_id = b.q_id;
        b.cmds = b.cmds.saturating_sub(1);
        let Some(slot) = b.in_flight.get_mut(id as usize) else {
            return;
        };
        let total = slot.len();
        if res < 0 {
            if res != ublk_sys::UBLK_IO_RES_ABORT && !b.stopping {
                log::error!(
                    "queue {q_id}: COMMIT_IO_CMDS failed: {}",
                    std::io::Error::from_raw_os_error(-res)
                );
            }
        } else if (res as usize) < total {
            // The element at `res` was refused; those after it were not
            // looked at and are committed again.
            // Whole elements only, whatever the kernel returned.
            let bad = res as usize / b.elem_bytes * b.elem_bytes;
            let tag = slot
                .get(bad..bad + 2)
                .map_or(u16::MAX, |b| u16::from_ne_bytes([b[0], b[1]]));
            log::error!("queue {q_id}: kernel refused the commit of tag {tag}");
            let rest = bad + b.elem_bytes;
            if rest < total {
                b.pending.extend_from_slice(&slot[rest..]);
            }
        }
        slot.clear();
        b.free.push(id);
    }
}
