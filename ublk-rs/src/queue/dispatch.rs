//! One request's way through the engine: its descriptor is read and
//! checked, its buffer prepared (registration, user copy), the target's
//! `handle` called, and its result committed, which also fetches the tag's
//! next request.

use io_uring::squeue::{Entry, Flags as SqeFlags};

use super::{CopyMode, IoIndex, IoState, Kind, Queue};
use crate::cmd::{self, AutoBufReg};
use crate::target::{Handled, IoBuf, IoDesc, IoFlags, Op, Request, Submit, Target};

/// The offset in `/dev/ublkcN` of a request's data, for `UBLK_F_USER_COPY`.
#[inline]
pub const fn user_copy_offset(q_id: u16, tag: u16, byte_offset: u64) -> u64 {
    ublk_sys::UBLKSRV_IO_BUF_OFFSET as u64
        + ((q_id as u64) << ublk_sys::UBLK_QID_OFF)
        + ((tag as u64) << ublk_sys::UBLK_TAG_OFF)
        + byte_offset
}

/// Where the target finds a request's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BufKind {
    None,
    Fixed,
    Mem,
}

impl Queue<'_> {
    /// A FETCH_REQ, COMMIT_AND_FETCH_REQ or NEED_GET_DATA came back.
    pub(super) fn on_cmd_cqe<T: Target + ?Sized>(&mut self, target: &mut T, io: IoIndex, res: i32) {
        match res {
            r if r == ublk_sys::UBLK_IO_RES_OK as i32 => self.dispatch(target, io),
            r if r == ublk_sys::UBLK_IO_RES_NEED_GET_DATA as i32 => self.need_get_data(io),
            ublk_sys::UBLK_IO_RES_ABORT => self.aborted = true,
            r => log::error!(
                "queue {} tag {}: io command failed: {}",
                self.cfg.q_id,
                self.slot(io).tag,
                std::io::Error::from_raw_os_error(-r)
            ),
        }
    }

    /// The buffer address of io `io` for FETCH/COMMIT in the copy modes.
    #[inline]
    pub(super) fn buf_addr(&self, io: IoIndex) -> Option<*mut u8> {
        let s = self.slot(io);
        match self.cfg.mode {
            CopyMode::Copy | CopyMode::NeedGetData => self
                .queues
                .get(s.qi)?
                .bufs
                .as_ref()
                .and_then(|b| b.addr(usize::from(s.tag))),
            _ => None,
        }
    }

    #[inline]
    fn auto_reg(&self, io: IoIndex) -> Option<AutoBufReg> {
        match self.cfg.mode {
            CopyMode::AutoBufReg { fallback } => Some(AutoBufReg {
                index: io.0,
                flags: if fallback {
                    ublk_sys::UBLK_AUTO_BUF_REG_FALLBACK as u8
                } else {
                    0
                },
            }),
            _ => None,
        }
    }

    pub(super) fn fetch_entry(&self, io: IoIndex) -> Entry {
        let s = self.slot(io);
        let mut c = cmd::FetchReq::new(self.cdev_ref(), s.q_id, s.tag).encoding(self.cfg.encoding);
        if let Some(a) = self.buf_addr(io) {
            c = c.buf_addr(a);
        }
        if let Some(r) = self.auto_reg(io) {
            c = c.auto_buf_reg(r);
        }
        c.build()
    }

    fn commit_entry(&self, io: IoIndex, res: i32) -> Entry {
        let s = self.slot(io);
        let mut c = cmd::CommitAndFetchReq::new(self.cdev_ref(), s.q_id, s.tag, res)
            .encoding(self.cfg.encoding);
        if let Some(a) = self.buf_addr(io) {
            c = c.buf_addr(a);
        }
        if let Some(r) = self.auto_reg(io) {
            c = c.auto_buf_reg(r);
        }
        c.build()
    }

    fn need_get_data(&mut self, io: IoIndex) {
        let s = self.slot(io);
        let mut c =
            cmd::NeedGetData::new(self.cdev_ref(), s.q_id, s.tag).encoding(self.cfg.encoding);
        if let Some(a) = self.buf_addr(io) {
            c = c.buf_addr(a);
        }
        self.push_own_or_log(Kind::Cmd, io, c.build());
    }

    /// Links a buffer registration ahead of the target's next `then`
    /// entries, with room for them all in the submission queue: a chain
    /// cut by a full ring would let them run before the registration.
    fn register(&mut self, io: IoIndex, then: usize) {
        if let Err(e) = self.with_submit(io, |sub| sub.make_room(then.saturating_add(1))) {
            log::warn!("queue {}: cannot submit: {e}", self.cfg.q_id);
        }
        let s = self.slot(io);
        let e = cmd::RegisterIoBuf::new(self.cdev_ref(), s.q_id, s.tag, io.0)
            .encoding(self.cfg.encoding)
            .build();
        // Linked so the target's first SQE runs only after the registration.
        self.push_own_or_log(Kind::Reg, io, e.flags(SqeFlags::IO_HARDLINK));
        if let Some(t) = self.states.get_mut(io.get()) {
            t.registered = true;
        }
    }

    /// Checks a request the kernel delivered; `Err` is the result to complete it with.
    fn check(&self, d: &IoDesc) -> Result<(), i32> {
        match d.op {
            Op::Unknown(_) | Op::Zone(_) | Op::ReportZones | Op::WriteSame => {
                return Err(-libc::EOPNOTSUPP)
            }
            Op::Flush => return Ok(()),
            Op::Read | Op::Write | Op::Discard | Op::WriteZeroes => {}
        }
        let end = d.start_sector.checked_add(u64::from(d.nr_sectors));
        if end.is_none_or(|e| e > self.cfg.capacity_sectors) {
            return Err(-libc::EIO);
        }
        if d.op.has_data() && d.len() > self.cfg.max_io_bytes as usize {
            return Err(-libc::EIO);
        }
        Ok(())
    }

    /// Serves the request the kernel delivered to `io`.
    pub(super) fn dispatch<T: Target + ?Sized>(&mut self, target: &mut T, io: IoIndex) {
        let s = self.slot(io);
        let Some(raw) = self.queues.get(s.qi).and_then(|q| q.descs.get(s.tag)) else {
            log::error!(
                "queue {}: kernel delivered tag {} past the depth",
                s.q_id,
                s.tag
            );
            return;
        };
        let d = IoDesc::from_raw(&raw);
        if let Some(t) = self.states.get_mut(io.get()) {
            *t = IoState {
                desc: Some(d),
                registered: false,
            };
        }
        if let Err(res) = self.check(&d) {
            return self.finish(io, res);
        }
        let buf_kind = match self.cfg.mode {
            _ if !d.op.has_data() => BufKind::None,
            CopyMode::ZeroCopy => {
                self.register(io, target.sqes_per_request());
                BufKind::Fixed
            }
            CopyMode::AutoBufReg { .. } => {
                if d.flags.contains(IoFlags::NEED_REG_BUF) {
                    self.register(io, target.sqes_per_request());
                }
                BufKind::Fixed
            }
            _ => BufKind::Mem,
        };
        if buf_kind == BufKind::Mem
            && self.cfg.mode == CopyMode::UserCopy
            && d.op == Op::Write
            && !d.flags.contains(IoFlags::SHMEM_ZC)
        {
            if let Err(res) = self.user_copy(io, d.len(), false) {
                return self.finish(io, res);
            }
            if d.flags.contains(IoFlags::INTEGRITY) {
                if let Err(res) = self.user_copy_metadata(io, d.len(), false) {
                    return self.finish(io, res);
                }
            }
        }
        let registered = self.states.get(io.get()).is_some_and(|t| t.registered);
        let target_entries = self.target_inflight;
        let handled = {
            // Split borrows: the ring for `Submit`, the buffers for `IoBuf`.
            let (submitter, mut sq, _) = self.ring.split();
            let mut sub = Submit::new(
                &mut sq,
                &submitter,
                &mut self.target_inflight,
                super::user_data(Kind::Target, io, 0),
                &mut self.completed,
            )
            .after_registration(registered);
            let (bufs, meta) = match self.queues.get_mut(s.qi) {
                Some(q) => (q.bufs.as_mut(), q.meta.as_mut()),
                None => (None, None),
            };
            let buf = match buf_kind {
                _ if d.flags.contains(IoFlags::SHMEM_ZC) => IoBuf::Shmem {
                    index: (d.addr >> ublk_sys::UBLK_SHMEM_ZC_IDX_OFF) as u16,
                    offset: d.addr as u32,
                },
                BufKind::None => IoBuf::None,
                BufKind::Fixed => IoBuf::Fixed(io.0),
                BufKind::Mem => match bufs.and_then(|b| b.slice_mut(usize::from(s.tag), d.len())) {
                    Some(s) => IoBuf::Mem(s),
                    None => IoBuf::None,
                },
            };
            let integrity = match (self.cfg.integrity, meta) {
                (Some(i), Some(m)) if d.flags.contains(IoFlags::INTEGRITY) => {
                    m.slice_mut(usize::from(s.tag), i.metadata_len(d.len() as u64) as usize)
                }
                _ => None,
            };
            target.handle(
                &mut sub,
                Request {
                    q_id: s.q_id,
                    tag: s.tag,
                    desc: d,
                    buf,
                    integrity,
                },
            )
        };
        if registered && self.target_inflight == target_entries {
            // The registration is hard-linked to the next entry, and the
            // target queued none (an nbd request waiting for its
            // connection): a NOP ends the chain here. Otherwise the
            // registration would link to whatever is queued next and, no
            // longer the head of its chain, be issued later from deferred
            // task work, after entries queued since that already use its
            // buffer (they fail with EFAULT).
            self.push_own_or_log(Kind::Reg, io, io_uring::opcode::Nop::new().build());
        }
        if let Handled::Done(res) = handled {
            self.finish(io, res);
        }
        self.finish_completed();
    }

    /// Finishes the requests the target completed with `Submit::complete`
    /// in the call that just returned. Here rather than in `Submit`: a
    /// finish pushes our own commands, which needs the whole queue. Their
    /// tags are the kernel's; in a worker serving one whole queue those
    /// are the io indexes, else the io is looked up by its tag.
    pub(super) fn finish_completed(&mut self) {
        if self.completed.is_empty() {
            return;
        }
        // Taken (not cloned) and given back: its capacity stays reserved.
        let mut done = std::mem::take(&mut self.completed);
        for &(tag, res) in &done {
            let io = if self.slot(IoIndex(tag)).tag == tag {
                Some(IoIndex(tag))
            } else {
                self.ios
                    .iter()
                    .position(|s| s.q_id == self.cfg.q_id && s.tag == tag)
                    .and_then(|i| u16::try_from(i).ok())
                    .map(IoIndex)
            };
            match io {
                Some(io) => self.finish(io, res),
                None => log::error!(
                    "queue {}: target completed unknown tag {tag}",
                    self.cfg.q_id
                ),
            }
        }
        done.clear();
        self.completed = done;
    }

    /// pread (`to_kernel` false) or pwrite the request's data through the
    /// char device.
    fn user_copy(&mut self, io: IoIndex, len: usize, to_kernel: bool) -> Result<(), i32> {
        let s = self.slot(io);
        let off = user_copy_offset(s.q_id, s.tag, 0);
        let Some(buf) = self
            .queues
            .get_mut(s.qi)
            .and_then(|q| q.bufs.as_mut())
            .and_then(|b| b.slice_mut(usize::from(s.tag), len))
        else {
            return Err(-libc::EIO);
        };
        let r = if to_kernel {
            rustix::io::pwrite(self.cdev, buf, off)
        } else {
            rustix::io::pread(self.cdev, buf, off)
        };
        match r {
            Ok(n) if n == len => Ok(()),
            Ok(_) => Err(-libc::EIO),
            Err(e) => Err(-e.raw_os_error()),
        }
    }

    /// pread (`to_kernel` false) or pwrite the metadata of `data_len`
    /// bytes of the request's data through the char device (integrity).
    fn user_copy_metadata(
        &mut self,
        io: IoIndex,
        data_len: usize,
        to_kernel: bool,
    ) -> Result<(), i32> {
        let s = self.slot(io);
        let Some(i) = self.cfg.integrity else {
            return Err(-libc::EIO);
        };
        let len = i.metadata_len(data_len as u64) as usize;
        let off = user_copy_offset(s.q_id, s.tag, 0) | ublk_sys::UBLKSRV_IO_INTEGRITY_FLAG;
        let Some(buf) = self
            .queues
            .get_mut(s.qi)
            .and_then(|q| q.meta.as_mut())
            .and_then(|b| b.slice_mut(usize::from(s.tag), len))
        else {
            return Err(-libc::EIO);
        };
        let r = if to_kernel {
            rustix::io::pwrite(self.cdev, buf, off)
        } else {
            rustix::io::pread(self.cdev, buf, off)
        };
        match r {
            Ok(n) if n == len => Ok(()),
            Ok(_) => Err(-libc::EIO),
            Err(e) => Err(-e.raw_os_error()),
        }
    }

    /// Completes `io` with `res`: copies read data out (user copy), drops a
    /// buffer registration, and commits (which also fetches the next request).
    pub(super) fn finish(&mut self, io: IoIndex, mut res: i32) {
        let state = self.states.get(io.get()).copied().unwrap_or_default();
        if let (CopyMode::UserCopy, Some(d)) = (self.cfg.mode, state.desc) {
            if d.op == Op::Read && res > 0 && !d.flags.contains(IoFlags::SHMEM_ZC) {
                let done = (res as usize).min(d.len());
                if let Err(e) = self.user_copy(io, done, true) {
                    res = e;
                } else if d.flags.contains(IoFlags::INTEGRITY) {
                    if let Err(e) = self.user_copy_metadata(io, done, true) {
                        res = e;
                    }
                }
            }
        }
        if state.registered {
            let s = self.slot(io);
            let e = cmd::UnregisterIoBuf::new(self.cdev_ref(), s.q_id, s.tag, io.0)
                .encoding(self.cfg.encoding)
                .build();
            self.push_own_or_log(Kind::Unreg, io, e);
        }
        self.stats.requests += 1;
        self.stats.errors += u64::from(res < 0);
        self.stats.shmem_zc += u64::from(
            state
                .desc
                .is_some_and(|d| d.flags.contains(IoFlags::SHMEM_ZC)),
        );
        if !self.batches.is_empty() {
            self.batch_finish(io, res);
            return;
        }
        let e = self.commit_entry(io, res);
        self.push_own_or_log(Kind::Cmd, io, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_copy_offsets_follow_the_uapi_encoding() {
        assert_eq!(user_copy_offset(0, 0, 0), 0x8000_0000);
        assert_eq!(user_copy_offset(0, 1, 0), 0x8000_0000 + (1 << 25));
        assert_eq!(user_copy_offset(1, 0, 512), 0x8000_0000 + (1 << 41) + 512);
    }
}
