//! An NBD client target: the device's data lives on an NBD server
//! (`qemu-nbd`, `nbdkit`, `nbd-server`, `rbd-nbd`, …), reached over TCP
//! or a Unix socket.
//!
//! [`proto`] is the wire format (pure, tested on random bytes), [`conn`]
//! the URI, connecting and the blocking handshake, and [`NbdTarget`] the
//! data path: each queue has its own connection, and its requests go
//! through the queue's own io_uring — request headers and write data are
//! sent, replies and read data received, straight from and into the
//! request's buffer (its memory, or its registered buffer in the zero-copy
//! modes) — never through a blocking thread.
//!
//! One connection carries many requests: sends are serialised (a request's
//! header and data go out whole before the next's), and one receive at a
//! time follows the reply stream ([`proto::ReplyReader`] says where the
//! next bytes go).
//!
//! When the connection breaks, the requests in flight are not lost: with a
//! reconnect timeout ([`NbdOptions::reconnect_timeout`]) the queue
//! reconnects with back-off and sends them again; otherwise, or once the
//! timeout passes, they fail with `EIO`, as every later request does. A
//! server that comes back with another size or read-only flag is refused.

pub mod conn;
pub mod proto;

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types};

use crate::params::{Attrs, BasicParams, DiscardParams, Params};
use crate::target::{Handled, IoBuf, IoFlags, Op, Request, Submit, Target};
pub use conn::{connect, Conn, ConnError, ConnectOptions, NbdAddr, Stream, Transport};
use proto::{flags, Cmd, ExportInfo, ReplyReader, RequestHeader, Want};

/// What `NbdTarget` tells the rest of the server (for `ublk list`):
/// shared by the queues of a device.
#[derive(Debug, Default)]
pub struct NbdStatus {
    /// Connections lost so far (all queues).
    pub disconnects: AtomicU64,
    /// Successful reconnections so far.
    pub reconnects: AtomicU64,
    /// Queues whose connection is down now.
    pub down: AtomicU64,
    /// A queue gave up reconnecting: the device fails every request.
    pub failed: AtomicBool,
}

/// How an [`NbdTarget`] behaves when its connection breaks.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Reconnect for at most this long before failing the requests in
    /// flight (`None`: fail them at once).
    pub reconnect_timeout: Option<Duration>,
    /// Bound on each connect and handshake step.
    pub connect_timeout: Duration,
    /// Shared status counters.
    pub status: Arc<NbdStatus>,
    /// Ask a server that comes back for structured replies, as the first
    /// connection did ([`ConnectOptions::structured`]). Only where
    /// requests come in memory buffers: a hole in a structured read reply
    /// is zeroed by the CPU, which a registered (zero-copy) buffer cannot
    /// be, so such a read fails with EIO there.
    pub structured: bool,
}

impl Default for NbdOptions {
    fn default() -> Self {
        Self {
            reconnect_timeout: None,
            connect_timeout: Duration::from_secs(10),
            status: Arc::default(),
            structured: false,
        }
    }
}

/// The device parameters that fit an export: its size (rounded down to the
/// logical block size), block sizes from `NBD_INFO_BLOCK_SIZE` (minimum →
/// logical, preferred → physical, maximum → request size limit), read-only,
/// rotational, a volatile cache when the server flushes, FUA when it takes
/// FUA writes, and discard / write-zeroes only when it takes TRIM /
/// WRITE_ZEROES.
pub fn params_for(info: &ExportInfo, max_io_bytes: u32) -> Params {
    let (min, pref, max) = info.block_size.unwrap_or((512, 4096, u32::MAX));
    let lbs = min.clamp(512, 4096);
    let pbs = pref.clamp(lbs, 4096).next_power_of_two().min(4096);
    let max_io = max_io_bytes.min(max.max(lbs)) / lbs * lbs;
    let size = info.size / u64::from(lbs) * u64::from(lbs);
    let mut b = BasicParams::new(size, max_io);
    b.logical_block_size = lbs;
    b.physical_block_size = pbs;
    b.io_min = lbs;
    b.io_opt = pbs;
    if info.has(flags::READ_ONLY) {
        b.attrs |= Attrs::READ_ONLY;
    }
    if info.has(flags::ROTATIONAL) {
        b.attrs |= Attrs::ROTATIONAL;
    }
    if info.has(flags::SEND_FLUSH) {
        b.attrs |= Attrs::VOLATILE_CACHE;
        if info.has(flags::SEND_FUA) {
            b.attrs |= Attrs::FUA;
        }
    }
    let trim = info.has(flags::SEND_TRIM) && !info.has(flags::READ_ONLY);
    let zeroes = info.has(flags::SEND_WRITE_ZEROES) && !info.has(flags::READ_ONLY);
    let sectors = max_io / 512;
    let discard = (trim || zeroes).then_some(DiscardParams {
        alignment: 0,
        granularity: lbs,
        max_discard_sectors: if trim { sectors } else { 0 },
        max_write_zeroes_sectors: if zeroes { sectors } else { 0 },
        max_discard_segments: 1,
    });
    Params {
        discard,
        ..Params::basic(b)
    }
}

/// The NBD request for ublk request `d` of an export with `info`, carrying
/// `handle`; or the result to complete it with at once: `0` for a flush an
/// export without `NBD_FLAG_SEND_FLUSH` has no use for (its writes are
/// durable as they complete, and no volatile cache was advertised), else a
/// positive errno (`EROFS`, `EOPNOTSUPP`).
///
/// A flush carries offset 0 and length 0, as the NBD protocol requires
/// (nbdkit refuses anything else with `EINVAL`, qemu-nbd a range past the
/// export): the kernel's flush request has no range, and its descriptor's
/// sector is whatever the block layer left in it, not a position.
pub fn request_header(
    info: &ExportInfo,
    d: &crate::target::IoDesc,
    handle: u64,
) -> Result<RequestHeader, i32> {
    let ro = info.has(flags::READ_ONLY);
    let (cmd, cmd_flags) = match d.op {
        Op::Read => (Cmd::Read, 0),
        Op::Write | Op::Discard | Op::WriteZeroes if ro => return Err(libc::EROFS),
        Op::Write => (
            Cmd::Write,
            if d.flags.contains(IoFlags::FUA) && info.has(flags::SEND_FUA) {
                proto::CMD_FLAG_FUA
            } else {
                0
            },
        ),
        Op::Flush if info.has(flags::SEND_FLUSH) => {
            return Ok(RequestHeader {
                flags: 0,
                cmd: Cmd::Flush,
                handle,
                offset: 0,
                len: 0,
            })
        }
        Op::Flush => return Err(0),
        Op::Discard if info.has(flags::SEND_TRIM) => (Cmd::Trim, 0),
        Op::WriteZeroes if info.has(flags::SEND_WRITE_ZEROES) => (
            Cmd::WriteZeroes,
            if d.flags.contains(IoFlags::NOUNMAP) {
                proto::CMD_FLAG_NO_HOLE
            } else {
                0
            },
        ),
        _ => return Err(libc::EOPNOTSUPP),
    };
    Ok(RequestHeader {
        flags: cmd_flags,
        cmd,
        handle,
        offset: d.offset(),
        len: d.len() as u32,
    })
}

/// Where a request's data is, kept from `handle` until it completes.
#[derive(Debug, Clone, Copy, Default)]
enum Buf {
    #[default]
    None,
    /// The request's memory (stable until it completes).
    Mem(*mut u8),
    /// Its registered buffer in the queue ring.
    Fixed(u16),
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    active: bool,
    hdr: RequestHeader,
    wire: [u8; proto::REQUEST_LEN],
    buf: Buf,
    /// Bytes to send: the header, and a write's data.
    total: u32,
    sent: u32,
    /// The reply's result, once it arrived.
    replied: Option<i32>,
}

impl Default for Slot {
    fn default() -> Self {
        Self {
            active: false,
            hdr: RequestHeader {
                flags: 0,
                cmd: Cmd::Flush,
                handle: 0,
                offset: 0,
                len: 0,
            },
            wire: [0; proto::REQUEST_LEN],
            buf: Buf::None,
            total: 0,
            sent: 0,
            replied: None,
        }
    }
}

// The target data of an SQE: what it is, and for which tag.
const OP_SEND: u32 = 1 << 16;
const OP_RECV: u32 = 2 << 16;

/// The NBD target of one queue, over its own connection.
#[derive(Debug)]
pub struct NbdTarget {
    addr: NbdAddr,
    stream: Stream,
    info: ExportInfo,
    opts: NbdOptions,
    // Boxed: receives point into its header buffer, which must not move.
    reader: Box<ReplyReader>,
    slots: Box<[Slot]>,
    /// Tags waiting to send (the front may be partly sent).
    send_q: VecDeque<u16>,
    sending: bool,
    receiving: bool,
    /// SQEs on the socket not yet completed.
    sqes: usize,
    /// The connection broke; requests wait for a reconnect or fail.
    lost: bool,
    /// Reconnecting was given up: every request fails.
    dead: bool,
}

impl NbdTarget {
    /// A target for a queue of `depth` tags over `conn`, a connection to
    /// `addr` (whose export's size and read-only flag a reconnection must
    /// keep).
    pub fn new(addr: NbdAddr, conn: Conn, depth: u16, opts: NbdOptions) -> Self {
        Self {
            addr,
            reader: Box::new(ReplyReader::new(depth, conn.structured)),
            stream: conn.stream,
            info: conn.info,
            opts,
            slots: vec![Slot::default(); usize::from(depth)].into_boxed_slice(),
            send_q: VecDeque::with_capacity(usize::from(depth)),
            sending: false,
            receiving: false,
            sqes: 0,
            lost: false,
            dead: false,
        }
    }

    /// The export's information as the server gave it.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.stream.as_raw_fd())
    }

    /// Queues an SQE on the socket.
    ///
    /// # Safety
    /// Every buffer `e` points to must stay valid until its CQE arrives.
    #[allow(unsafe_code)]
    unsafe fn push(
        &mut self,
        sub: &mut Submit<'_, '_>,
        data: u32,
        e: io_uring::squeue::Entry,
    ) -> bool {
        // SAFETY: forwarded to our caller.
        match unsafe { sub.push(data, e) } {
            Ok(()) => {
                self.sqes += 1;
                true
            }
            Err(err) => {
                log::error!("NBD {}: cannot queue a socket operation: {err}", self.addr);
                self.lose();
                false
            }
        }
    }

    /// Sends the next piece of the request at the front of the queue.
    #[allow(unsafe_code)]
    fn kick_send(&mut self, sub: &mut Submit<'_, '_>) {
        if self.sending || self.lost {
            return;
        }
        let Some(&tag) = self.send_q.front() else {
            return;
        };
        let s = &self.slots[usize::from(tag)];
        let hdr_len = proto::REQUEST_LEN as u32;
        let fd = self.fd();
        let e = if s.sent < hdr_len {
            let at = s.sent as usize;
            opcode::Send::new(fd, s.wire[at..].as_ptr(), hdr_len - s.sent)
                .flags(libc::MSG_NOSIGNAL | if s.total > hdr_len { libc::MSG_MORE } else { 0 })
                .build()
        } else {
            let at = s.sent - hdr_len;
            let left = s.total - s.sent;
            match s.buf {
                // SAFETY (of the pointer arithmetic): `at < len`, inside
                // the request's buffer.
                Buf::Mem(p) => opcode::Send::new(fd, p.wrapping_add(at as usize), left)
                    .flags(libc::MSG_NOSIGNAL)
                    .build(),
                // A registered buffer is addressed from 0.
                Buf::Fixed(i) => {
                    opcode::WriteFixed::new(fd, at as usize as *const u8, left, i).build()
                }
                Buf::None => {
                    // Unreachable: only writes have data to send.
                    self.send_q.pop_front();
                    return;
                }
            }
        };
        // SAFETY: the header lives in `self.slots` (boxed, never resized)
        // and the data in the request's buffer, both valid until the
        // request completes, which waits for this CQE (`finish_if_done`).
        if unsafe { self.push(sub, OP_SEND | u32::from(tag), e) } {
            self.sending = true;
        }
    }

    /// Arms the receive of the next reply bytes, while replies are due.
    #[allow(unsafe_code)]
    fn kick_recv(&mut self, sub: &mut Submit<'_, '_>) {
        if self.receiving || self.lost || !self.reader.busy() {
            return;
        }
        let fd = self.fd();
        let e = match self.reader.want() {
            Want::Header | Want::Discard(_) => {
                let b = self.reader.header_buf();
                opcode::Recv::new(fd, b.as_mut_ptr(), b.len() as u32)
                    .flags(libc::MSG_WAITALL)
                    .build()
            }
            Want::Data { tag, at, len } => match self.slots[usize::from(tag)].buf {
                Buf::Mem(p) => opcode::Recv::new(fd, p.wrapping_add(at as usize), len)
                    .flags(libc::MSG_WAITALL)
                    .build(),
                Buf::Fixed(i) => opcode::ReadFixed::new(fd, at as usize as *mut u8, len, i).build(),
                Buf::None => {
                    log::error!(
                        "NBD {}: read data for a request without a buffer",
                        self.addr
                    );
                    return self.lose();
                }
            },
            Want::Zero { .. } => return self.zero_holes(sub),
        };
        // SAFETY: the header buffer is in the boxed reader, the data in the
        // request's buffer; the request completes only after its reply,
        // i.e. after this CQE.
        if unsafe { self.push(sub, OP_RECV, e) } {
            self.receiving = true;
        }
    }

    /// Clears holes of structured read replies (in memory buffers only: a
    /// registered buffer is the kernel's).
    fn zero_holes(&mut self, sub: &mut Submit<'_, '_>) {
        while let Want::Zero { tag, at, len } = self.reader.want() {
            match self.slots[usize::from(tag)].buf {
                Buf::Mem(p) => {
                    // SAFETY: the reader checked `at + len` against the
                    // request's length, which is its buffer's.
                    #[allow(unsafe_code)]
                    unsafe {
                        std::ptr::write_bytes(p.wrapping_add(at as usize), 0, len as usize)
                    };
                }
                _ => {
                    if let Some(r) = self.slots[usize::from(tag)].replied.as_mut() {
                        *r = -libc::EIO;
                    }
                }
            }
            match self.reader.advance(0) {
                Ok(Some(rep)) => self.replied(sub, rep.tag, rep.result),
                Ok(None) => {}
                Err(e) => {
                    log::error!("NBD {}: {e}", self.addr);
                    return self.lose();
                }
            }
        }
        self.kick_recv(sub);
    }

    fn replied(&mut self, sub: &mut Submit<'_, '_>, tag: u16, result: i32) {
        self.slots[usize::from(tag)].replied = Some(result);
        self.finish_if_done(sub, tag);
    }

    /// Completes `tag` once its reply arrived and its send is done.
    fn finish_if_done(&mut self, sub: &mut Submit<'_, '_>, tag: u16) {
        let s = &mut self.slots[usize::from(tag)];
        if let (true, Some(res), true) = (s.active, s.replied, s.sent == s.total) {
            s.active = false;
            sub.complete(tag, res);
        }
    }

    fn lose(&mut self) {
        if self.lost {
            return;
        }
        self.lost = true;
        self.opts.status.disconnects.fetch_add(1, Ordering::Relaxed);
        self.opts.status.down.fetch_add(1, Ordering::Relaxed);
        log::warn!("NBD {}: connection lost", self.addr);
        // Ends the SQEs in flight on it; the fd closes with the next stream.
        let _ = self.stream.shutdown();
    }

    /// After a loss, once no SQE uses the old socket: reconnect and send
    /// the unanswered requests again, or fail them.
    fn recover(&mut self, sub: &mut Submit<'_, '_>) {
        if !self.lost || self.sqes > 0 || self.dead {
            return;
        }
        self.send_q.clear();
        self.sending = false;
        self.receiving = false;
        let _ = self.reader.drain().count();
        // Replies that came before the loss still count.
        for tag in 0..self.slots.len() as u16 {
            let s = &mut self.slots[usize::from(tag)];
            if s.active && s.replied.is_some() {
                s.sent = s.total;
                self.finish_if_done(sub, tag);
            }
        }
        match self.reconnect() {
            Ok(()) => {
                for tag in 0..self.slots.len() as u16 {
                    let s = &mut self.slots[usize::from(tag)];
                    if s.active {
                        s.sent = 0;
                        let hdr = s.hdr;
                        self.reader.expect(tag, &hdr);
                        self.send_q.push_back(tag);
                    }
                }
            }
            Err(why) => {
                log::error!("NBD {}: {why}: failing its requests", self.addr);
                self.dead = true;
                self.opts.status.failed.store(true, Ordering::Relaxed);
                for tag in 0..self.slots.len() as u16 {
                    let s = &mut self.slots[usize::from(tag)];
                    if s.active {
                        s.active = false;
                        sub.complete(tag, -libc::EIO);
                    }
                }
            }
        }
    }

    /// Reconnects with back-off until the reconnect timeout.
    fn reconnect(&mut self) -> Result<(), String> {
        let Some(timeout) = self.opts.reconnect_timeout else {
            return Err("connection lost and no reconnect timeout".into());
        };
        let deadline = Instant::now() + timeout;
        let mut delay = Duration::from_millis(100);
        let copts = ConnectOptions {
            timeout: self
                .opts
                .connect_timeout
                .min(timeout.max(Duration::from_secs(1))),
            structured: self.opts.structured,
        };
        loop {
            match connect(&self.addr, copts) {
                Ok(c) => {
                    let ro = |i: &ExportInfo| i.has(flags::READ_ONLY);
                    if c.info.size != self.info.size || ro(&c.info) != ro(&self.info) {
                        return Err(format!(
                            "the server came back with size {} read-only {} (was {} {}): refused",
                            c.info.size,
                            ro(&c.info),
                            self.info.size,
                            ro(&self.info)
                        ));
                    }
                    log::warn!("NBD {}: reconnected", self.addr);
                    if c.structured != self.reader.structured() {
                        // The server changed its mind (an upgrade, say): a
                        // reader for the replies it will send. Drained, so
                        // nothing is lost; the requests are expected again.
                        *self.reader = ReplyReader::new(self.slots.len() as u16, c.structured);
                    }
                    self.stream = c.stream;
                    self.info = c.info;
                    self.lost = false;
                    self.opts.status.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.opts.status.down.fetch_sub(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) if Instant::now() + delay < deadline => {
                    log::info!("NBD {}: reconnecting: {e}", self.addr);
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(format!("no reconnection within {timeout:?}: {e}")),
            }
        }
    }

    fn pump(&mut self, sub: &mut Submit<'_, '_>) {
        self.recover(sub);
        self.kick_send(sub);
        self.kick_recv(sub);
    }

    fn on_send(&mut self, sub: &mut Submit<'_, '_>, tag: u16, res: i32) {
        self.sending = false;
        if self.send_q.front() != Some(&tag) {
            return;
        }
        match res {
            r if r > 0 => {
                let s = &mut self.slots[usize::from(tag)];
                s.sent = (s.sent + r as u32).min(s.total);
                if s.sent == s.total {
                    self.send_q.pop_front();
                    self.finish_if_done(sub, tag);
                }
            }
            r if r == -libc::EINTR || r == -libc::EAGAIN => {}
            r => {
                if !self.lost {
                    log::error!(
                        "NBD {}: send: {}",
                        self.addr,
                        std::io::Error::from_raw_os_error(-r)
                    );
                }
                self.lose();
            }
        }
    }

    fn on_recv(&mut self, sub: &mut Submit<'_, '_>, res: i32) {
        self.receiving = false;
        if self.lost {
            return;
        }
        match res {
            r if r > 0 => match self.reader.advance(r as usize) {
                Ok(Some(rep)) => self.replied(sub, rep.tag, rep.result),
                Ok(None) => {}
                Err(e) => {
                    log::error!("NBD {}: {e}", self.addr);
                    self.lose();
                }
            },
            0 => {
                log::error!("NBD {}: the server closed the connection", self.addr);
                self.lose();
            }
            r if r == -libc::EINTR || r == -libc::EAGAIN || r == -libc::ENOBUFS => {}
            r => {
                log::error!(
                    "NBD {}: receive: {}",
                    self.addr,
                    std::io::Error::from_raw_os_error(-r)
                );
                self.lose();
            }
        }
    }
}

impl Target for NbdTarget {
    fn handle(&mut self, sub: &mut Submit<'_, '_>, req: Request<'_>) -> Handled {
        let d = req.desc;
        if self.dead {
            return Handled::Done(-libc::EIO);
        }
        let hdr = match request_header(&self.info, &d, u64::from(req.tag)) {
            Ok(h) => h,
            Err(e) => return Handled::Done(-e),
        };
        let cmd = hdr.cmd;
        let buf = match (cmd, req.buf) {
            (Cmd::Read | Cmd::Write, IoBuf::Mem(b)) => Buf::Mem(b.as_mut_ptr()),
            (Cmd::Read | Cmd::Write, IoBuf::Fixed(i)) => Buf::Fixed(i),
            (Cmd::Read | Cmd::Write, _) => return Handled::Done(-libc::EOPNOTSUPP),
            _ => Buf::None,
        };
        let Some(slot) = self.slots.get_mut(usize::from(req.tag)) else {
            return Handled::Done(-libc::EIO);
        };
        if slot.active {
            return Handled::Done(-libc::EIO);
        }
        *slot = Slot {
            active: true,
            hdr,
            wire: hdr.encode(),
            buf,
            total: proto::REQUEST_LEN as u32 + if cmd == Cmd::Write { hdr.len } else { 0 },
            sent: 0,
            replied: None,
        };
        // While the connection is down the request waits: `recover` sends
        // it on the new connection (or fails it).
        if !self.lost {
            self.reader.expect(req.tag, &hdr);
            self.send_q.push_back(req.tag);
        }
        self.pump(sub);
        Handled::Queued
    }

    fn complete(&mut self, sub: &mut Submit<'_, '_>, _tag: u16, data: u32, res: i32) -> Handled {
        self.sqes = self.sqes.saturating_sub(1);
        let tag = data as u16;
        match data & !0xffff {
            OP_SEND => self.on_send(sub, tag, res),
            OP_RECV => self.on_recv(sub, res),
            _ => {}
        }
        self.pump(sub);
        // Requests complete through `Submit::complete`, by their replies.
        Handled::Queued
    }
}

impl Drop for NbdTarget {
    fn drop(&mut self) {
        if !self.lost && !self.reader.busy() {
            conn::disconnect(&mut self.stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::IoDesc;

    fn desc(op: Op, f: IoFlags, start_sector: u64, nr_sectors: u32) -> IoDesc {
        IoDesc {
            op,
            flags: f,
            start_sector,
            nr_sectors,
            addr: 0,
        }
    }

    fn export(f: u16) -> ExportInfo {
        ExportInfo {
            size: 1 << 20,
            flags: flags::HAS_FLAGS | f,
            block_size: None,
        }
    }

    #[test]
    fn a_flush_has_no_range_whatever_the_descriptor_says() {
        let info = export(flags::SEND_FLUSH);
        // The block layer's flush request keeps a stale (or -1) sector.
        for (sector, n) in [(0, 0), (4096, 0), (u64::MAX >> 9, 0), (8, 8)] {
            let h = request_header(&info, &desc(Op::Flush, IoFlags::empty(), sector, n), 7);
            assert_eq!(
                h,
                Ok(RequestHeader {
                    flags: 0,
                    cmd: Cmd::Flush,
                    handle: 7,
                    offset: 0,
                    len: 0,
                })
            );
        }
    }

    #[test]
    fn commands_follow_the_export_flags() {
        let d = |op, f| desc(op, f, 16, 8);
        let plain = export(0);
        // No flush command: nothing to do; no TRIM / WRITE_ZEROES: refused.
        assert_eq!(
            request_header(&plain, &d(Op::Flush, IoFlags::empty()), 0),
            Err(0)
        );
        for op in [Op::Discard, Op::WriteZeroes] {
            assert_eq!(
                request_header(&plain, &d(op, IoFlags::empty()), 0),
                Err(libc::EOPNOTSUPP)
            );
        }
        // FUA only where the export takes it.
        let w = request_header(&plain, &d(Op::Write, IoFlags::FUA), 3).unwrap();
        assert_eq!((w.flags, w.offset, w.len, w.handle), (0, 8192, 4096, 3));
        let fua = export(flags::SEND_FLUSH | flags::SEND_FUA);
        let w = request_header(&fua, &d(Op::Write, IoFlags::FUA), 3).unwrap();
        assert_eq!(w.flags, proto::CMD_FLAG_FUA);
        let z = export(flags::SEND_WRITE_ZEROES);
        let h = request_header(&z, &d(Op::WriteZeroes, IoFlags::NOUNMAP), 0).unwrap();
        assert_eq!(
            (h.cmd, h.flags),
            (Cmd::WriteZeroes, proto::CMD_FLAG_NO_HOLE)
        );
        let ro = export(flags::READ_ONLY | flags::SEND_TRIM);
        for op in [Op::Write, Op::Discard, Op::WriteZeroes] {
            assert_eq!(
                request_header(&ro, &d(op, IoFlags::empty()), 0),
                Err(libc::EROFS)
            );
        }
        assert_eq!(
            request_header(&ro, &d(Op::Read, IoFlags::empty()), 0).map(|h| h.cmd),
            Ok(Cmd::Read)
        );
    }
}
