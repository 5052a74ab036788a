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
//! One connection carries many requests: one send at a time carries the
//! bytes of every request waiting, in order (a request's header and data
//! go out whole before the next's), and one receive at a time follows the
//! reply stream ([`proto::ReplyReader`] says where the next bytes go).
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

/// Pieces one gathered send carries at most (headers and write data of
/// the requests waiting, in order).
const SEND_IOVECS: usize = 64;

/// `IORING_RECVSEND_FIXED_BUF` (in the SQE's `ioprio`): a receive into a
/// registered buffer, whose index is in `buf_index`.
const RECVSEND_FIXED_BUF: u16 = 1 << 2;

/// Whether the kernel receives into a registered buffer with a plain
/// `IORING_OP_RECV` (Linux 7.2; before, only zero-copy sends take one).
/// Then read data goes into a registered buffer with `MSG_WAITALL`: one
/// receive for all of it. Without, a `READ_FIXED` on the socket returns
/// what the socket holds (about 200 KiB from a Unix socket), each piece a
/// ring round trip.
///
/// Probed once: a receive into buffer 0 of the fd -1 fails its prep with
/// `EINVAL` where the flag is unknown, and at issue with `EBADF` where it
/// is known. Any other answer, or no ring, counts as unsupported.
pub fn recv_into_registered_buffers() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        let Ok(mut ring) = io_uring::IoUring::new(2) else {
            return false;
        };
        // `buf_group` shares the SQE's `buf_index` field; without
        // IOSQE_BUFFER_SELECT it is the registered buffer's index.
        let e = opcode::Recv::new(types::Fd(-1), std::ptr::null_mut(), 4096)
            .ioprio(RECVSEND_FIXED_BUF)
            .buf_group(0)
            .build();
        // SAFETY: the entry points at no memory (a null buffer that the
        // kernel never reaches: the fd -1 fails first).
        #[allow(unsafe_code)]
        if unsafe { ring.submission().push(&e) }.is_err() || ring.submit_and_wait(1).is_err() {
            return false;
        }
        let res = ring.completion().next().map(|c| c.result());
        log::debug!("receive into a registered buffer, probed: {res:?}");
        res == Some(-libc::EBADF)
    })
}

/// The staging buffer's size: what one receive in the copy modes takes of
/// the reply stream at most.
const STAGING_BYTES: usize = 256 << 10;

/// Read data still to come of at least this many bytes is received
/// straight into the request's buffer rather than through the staging
/// buffer (a copy that size costs more than the receive it saves).
const DIRECT_DATA_BYTES: u32 = 32 << 10;

/// The one gathered send in flight: its message and pieces, which the
/// kernel reads until the send's CQE.
struct SendMsg {
    msg: libc::msghdr,
    iov: [libc::iovec; SEND_IOVECS],
}

impl std::fmt::Debug for SendMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendMsg")
            .field("pieces", &self.msg.msg_iovlen)
            .finish()
    }
}

impl SendMsg {
    fn new() -> Box<Self> {
        // SAFETY: both are plain C structs for which all zeroes is valid
        // (null pointers, zero lengths).
        #[allow(unsafe_code)]
        Box::new(unsafe { std::mem::zeroed() })
    }
}

/// The receive in flight, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Receiving {
    No,
    /// Into the staging buffer: it may take any reply's bytes.
    Staged,
    /// Where the reply reader asked (a header, or a request's data).
    Direct,
}

/// The NBD target of one queue, over its own connection.
///
/// Sends are gathered: one `sendmsg` carries the headers and write data of
/// every request waiting (a registered buffer's data goes by itself, by
/// `WRITE_FIXED`). In the copy modes a receive takes whatever the socket
/// holds into a staging buffer, from which the replies are parsed and read
/// data copied into place (large read data still to come is received in
/// place); so at depth one send and one receive serve many requests. A
/// registered (zero-copy) buffer cannot be filled from the staging buffer:
/// the first request in one turns staging off for good, and is not sent
/// while a staged receive is in flight (that receive could take its reply's
/// data); replies are then received piece by piece where the reader says.
/// Read data for a registered buffer is one `MSG_WAITALL` receive where
/// the kernel has it ([`recv_into_registered_buffers`], Linux 7.2), and
/// `READ_FIXED`s of what the socket holds before.
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
    // Boxed: the send in flight points into it.
    send_msg: Box<SendMsg>,
    sending: bool,
    /// Where staged receives go.
    staging: Box<[u8]>,
    /// Replies are received through `staging` (until the first request
    /// in a registered buffer).
    staging_on: bool,
    receiving: Receiving,
    /// Read data goes into a registered buffer by one `MSG_WAITALL`
    /// receive ([`recv_into_registered_buffers`]), not by `READ_FIXED`s.
    recv_fixed: bool,
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
            send_msg: SendMsg::new(),
            sending: false,
            staging: vec![0; STAGING_BYTES].into_boxed_slice(),
            staging_on: true,
            receiving: Receiving::No,
            recv_fixed: recv_into_registered_buffers(),
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

    /// Sends what waits, from the front of the queue: one gathered
    /// `sendmsg`, or a registered buffer's write data by itself.
    #[allow(unsafe_code)]
    fn kick_send(&mut self, sub: &mut Submit<'_, '_>) {
        if self.sending || self.lost {
            return;
        }
        let hdr_len = proto::REQUEST_LEN as u32;
        let fd = self.fd();
        let mut n = 0;
        let mut fixed_data = None;
        for &tag in &self.send_q {
            let s = &self.slots[usize::from(tag)];
            if let Buf::Fixed(i) = s.buf {
                if self.receiving == Receiving::Staged {
                    // Its reply could land in the staging buffer.
                    break;
                }
                if s.sent >= hdr_len {
                    // Only the data is left: it goes alone, once what is
                    // gathered before it has gone.
                    if n == 0 {
                        fixed_data = Some((i, s.sent - hdr_len, s.total - s.sent));
                    }
                    break;
                }
            }
            if n + 2 > SEND_IOVECS {
                break;
            }
            let iov = &mut self.send_msg.iov;
            if s.sent < hdr_len {
                iov[n] = libc::iovec {
                    iov_base: s.wire[s.sent as usize..].as_ptr() as *mut libc::c_void,
                    iov_len: (hdr_len - s.sent) as usize,
                };
                n += 1;
            }
            match s.buf {
                Buf::Mem(p) if s.total > hdr_len => {
                    let at = s.sent.saturating_sub(hdr_len);
                    iov[n] = libc::iovec {
                        // In the request's buffer: `at < len`.
                        iov_base: p.wrapping_add(at as usize).cast(),
                        iov_len: (s.total - hdr_len - at) as usize,
                    };
                    n += 1;
                }
                // The header goes now, the data by itself after it.
                Buf::Fixed(_) if s.total > hdr_len => break,
                _ => {}
            }
        }
        let e = if let Some((i, at, left)) = fixed_data {
            // A registered buffer is addressed from 0.
            opcode::WriteFixed::new(fd, at as usize as *const u8, left, i).build()
        } else if n == 0 {
            return;
        } else {
            let m = &mut *self.send_msg;
            m.msg.msg_iov = m.iov.as_mut_ptr();
            m.msg.msg_iovlen = n;
            opcode::SendMsg::new(fd, &m.msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
        };
        // SAFETY: the message is boxed in `self` and not touched until this
        // send's CQE (`sending`); it points at headers in `self.slots`
        // (boxed, never resized) and at the requests' buffers, all valid
        // until the requests complete, which waits for this CQE
        // (`finish_if_done`).
        if unsafe { self.push(sub, OP_SEND, e) } {
            self.sending = true;
        }
    }

    /// Arms the next receive, while replies are due: into the staging
    /// buffer, or where the reply reader says.
    #[allow(unsafe_code)]
    fn kick_recv(&mut self, sub: &mut Submit<'_, '_>) {
        if self.receiving != Receiving::No || self.lost || !self.reader.busy() {
            return;
        }
        let fd = self.fd();
        let want = self.reader.want();
        let direct_data = |len: u32| len >= DIRECT_DATA_BYTES;
        let (e, how) = match want {
            Want::Zero { .. } => return self.zero_holes(sub),
            Want::Data { tag, at, len } if !self.staging_on || direct_data(len) => {
                match self.slots[usize::from(tag)].buf {
                    Buf::Mem(p) => (
                        opcode::Recv::new(fd, p.wrapping_add(at as usize), len)
                            .flags(libc::MSG_WAITALL)
                            .build(),
                        Receiving::Direct,
                    ),
                    // A registered buffer is addressed from 0.
                    Buf::Fixed(i) if self.recv_fixed => (
                        opcode::Recv::new(fd, at as usize as *mut u8, len)
                            .ioprio(RECVSEND_FIXED_BUF)
                            .buf_group(i)
                            .flags(libc::MSG_WAITALL)
                            .build(),
                        Receiving::Direct,
                    ),
                    Buf::Fixed(i) => (
                        opcode::ReadFixed::new(fd, at as usize as *mut u8, len, i).build(),
                        Receiving::Direct,
                    ),
                    Buf::None => {
                        log::error!(
                            "NBD {}: read data for a request without a buffer",
                            self.addr
                        );
                        return self.lose();
                    }
                }
            }
            _ if self.staging_on => (
                opcode::Recv::new(fd, self.staging.as_mut_ptr(), self.staging.len() as u32).build(),
                Receiving::Staged,
            ),
            Want::Header | Want::Discard(_) | Want::Data { .. } => {
                let b = self.reader.header_buf();
                (
                    opcode::Recv::new(fd, b.as_mut_ptr(), b.len() as u32)
                        .flags(libc::MSG_WAITALL)
                        .build(),
                    Receiving::Direct,
                )
            }
        };
        // SAFETY: the staging and header buffers are boxed in `self` and
        // kept until this CQE (`receiving`); read data goes to the
        // request's buffer, and the request completes only after its
        // reply, i.e. after this CQE.
        if unsafe { self.push(sub, OP_RECV, e) } {
            self.receiving = how;
        }
    }

    /// Parses `n` staged bytes: reply headers into the reader, read data
    /// copied into the requests' buffers.
    fn take_staged(&mut self, sub: &mut Submit<'_, '_>, n: usize) {
        let staged = std::mem::take(&mut self.staging);
        let mut at_byte = 0;
        let result = loop {
            let want = self.reader.want();
            let left = n - at_byte;
            if left == 0 && !matches!(want, Want::Zero { .. }) {
                break Ok(());
            }
            let bytes = &staged[at_byte..n];
            let took = match want {
                Want::Header | Want::Discard(_) => {
                    let dst = self.reader.header_buf();
                    let k = dst.len().min(left);
                    dst[..k].copy_from_slice(&bytes[..k]);
                    k
                }
                Want::Data { tag, at, len } => match self.slots[usize::from(tag)].buf {
                    Buf::Mem(p) => {
                        let k = (len as usize).min(left);
                        // SAFETY: the reader checked `at + len` against the
                        // request's length, which is its buffer's; the
                        // staging buffer is ours, apart from it.
                        #[allow(unsafe_code)]
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                bytes.as_ptr(),
                                p.wrapping_add(at as usize),
                                k,
                            )
                        };
                        k
                    }
                    _ => {
                        break Err(format!(
                            "staged read data for tag {tag}, whose buffer is not in memory"
                        ))
                    }
                },
                Want::Zero { .. } => {
                    self.zero_one_hole();
                    0
                }
            };
            if took == 0 && !matches!(want, Want::Zero { .. }) {
                // The reader asked for nothing: a bug, not a reply.
                break Err(format!("the reply parser stalled at {want:?}"));
            }
            at_byte += took;
            if let Err(e) = self.advance(sub, took) {
                break Err(e.to_string());
            }
        };
        self.staging = staged;
        if let Err(e) = result {
            self.fail(e);
        }
    }

    /// Clears the hole the reader points at (in a memory buffer: a
    /// registered buffer is the kernel's, and the request fails).
    fn zero_one_hole(&mut self) {
        let Want::Zero { tag, at, len } = self.reader.want() else {
            return;
        };
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
    }

    /// Clears holes of structured read replies, then receives on.
    fn zero_holes(&mut self, sub: &mut Submit<'_, '_>) {
        while let Want::Zero { .. } = self.reader.want() {
            self.zero_one_hole();
            if let Err(e) = self.advance(sub, 0) {
                return self.fail(e);
            }
        }
        self.kick_recv(sub);
    }

    /// `n` bytes arrived where the reply reader asked: completes the
    /// request whose reply they end, if any.
    fn advance(&mut self, sub: &mut Submit<'_, '_>, n: usize) -> Result<(), proto::ProtoError> {
        if let Some(rep) = self.reader.advance(n)? {
            self.replied(sub, rep.tag, rep.result);
        }
        Ok(())
    }

    /// The server broke the protocol: says so and drops the connection.
    fn fail(&mut self, why: impl std::fmt::Display) {
        log::error!("NBD {}: {why}", self.addr);
        self.lose();
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
        self.receiving = Receiving::No;
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

    /// `res` bytes of the queue's front went: they are the next bytes of
    /// the requests in queue order.
    fn on_send(&mut self, sub: &mut Submit<'_, '_>, res: i32) {
        self.sending = false;
        match res {
            r if r > 0 => {
                let mut left = r as u32;
                while left > 0 {
                    let Some(&tag) = self.send_q.front() else {
                        break;
                    };
                    let s = &mut self.slots[usize::from(tag)];
                    let took = left.min(s.total - s.sent);
                    s.sent += took;
                    left -= took;
                    if s.sent == s.total {
                        self.send_q.pop_front();
                        self.finish_if_done(sub, tag);
                    }
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
        let how = std::mem::replace(&mut self.receiving, Receiving::No);
        if self.lost {
            return;
        }
        match res {
            r if r > 0 && how == Receiving::Staged => self.take_staged(sub, r as usize),
            r if r > 0 => {
                if let Err(e) = self.advance(sub, r as usize) {
                    self.fail(e);
                }
            }
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
            (Cmd::Read | Cmd::Write, IoBuf::Fixed(i)) => {
                // Its reply's data must go straight into the buffer.
                self.staging_on = false;
                Buf::Fixed(i)
            }
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
        match data & !0xffff {
            OP_SEND => self.on_send(sub, res),
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

    /// A tiny NBD server on one end of a socket pair, over a memory disk:
    /// each round it reads the requests the client says it sends, serves
    /// them in the order they came, and answers them in reverse order, the
    /// whole reply stream written in `pieces` parts split at random points.
    fn serve_rounds(
        mut sock: std::os::unix::net::UnixStream,
        rounds: std::sync::mpsc::Receiver<(usize, usize)>,
        seed: u64,
    ) {
        use std::io::{Read, Write};
        let mut disk = vec![0u8; 8 << 20];
        let mut rng = seed;
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        while let Ok((count, pieces)) = rounds.recv() {
            let mut replies = Vec::new();
            for _ in 0..count {
                let mut h = [0u8; proto::REQUEST_LEN];
                sock.read_exact(&mut h).unwrap();
                let be = |r: std::ops::Range<usize>| {
                    h[r].iter().fold(0u64, |a, &b| a << 8 | u64::from(b))
                };
                assert_eq!(be(0..4), 0x2560_9513);
                let (cmd, handle, off, len) = (be(6..8), be(8..16), be(16..24), be(24..28));
                let range = off as usize..(off + len) as usize;
                let mut r = 0x6744_6698u32.to_be_bytes().to_vec();
                r.extend_from_slice(&0u32.to_be_bytes());
                r.extend_from_slice(&handle.to_be_bytes());
                match cmd {
                    0 => r.extend_from_slice(&disk[range]),
                    1 => sock.read_exact(&mut disk[range]).unwrap(),
                    _ => {}
                }
                replies.push(r);
            }
            let stream: Vec<u8> = replies.into_iter().rev().flatten().collect();
            let mut cuts: Vec<usize> = (1..pieces).map(|_| next(stream.len())).collect();
            cuts.push(stream.len());
            cuts.sort_unstable();
            let mut from = 0;
            for cut in cuts {
                sock.write_all(&stream[from..cut]).unwrap();
                from = cut;
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    struct Round {
        /// (tag, op, offset, length)
        reqs: Vec<(u16, Op, u64, usize)>,
        pieces: usize,
    }

    /// Runs `NbdTarget` on a real io_uring against [`serve_rounds`]:
    /// every read must return what the model disk holds. Returns the
    /// sends and the receives each round took.
    #[allow(unsafe_code)]
    fn run_rounds(rounds: &[Round]) -> Vec<(usize, usize)> {
        use crate::target::IoDesc;
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let server = std::thread::spawn(move || serve_rounds(theirs, rx, 0x9e37_79b9));
        let info = ExportInfo {
            size: 8 << 20,
            flags: flags::HAS_FLAGS | flags::SEND_FLUSH,
            block_size: None,
        };
        let conn = Conn {
            stream: Stream::Unix(ours),
            info,
            structured: false,
        };
        let addr = NbdAddr::parse_uri("nbd+unix:///t?socket=/test").unwrap();
        let depth = 32u16;
        let mut t = NbdTarget::new(addr, conn, depth, NbdOptions::default());
        let mut ring = io_uring::IoUring::new(64).unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..depth).map(|_| vec![0u8; 128 << 10]).collect();
        let mut model = vec![0u8; 8 << 20];
        let mut fill = 1u8;
        let mut counts = Vec::new();
        let mut completed = Vec::new();
        let mut inflight = 0usize;
        for round in rounds {
            tx.send((round.reqs.len(), round.pieces)).unwrap();
            let mut want = std::collections::HashMap::new();
            for &(tag, op, off, len) in &round.reqs {
                let b = &mut bufs[usize::from(tag)][..len];
                if op == Op::Write {
                    fill = fill.wrapping_add(7) | 1;
                    for (i, x) in b.iter_mut().enumerate() {
                        *x = fill ^ (i as u8);
                    }
                    model[off as usize..off as usize + len].copy_from_slice(b);
                } else {
                    b.fill(0xee);
                }
                let exp = match op {
                    Op::Read | Op::Write => len as i32,
                    _ => 0,
                };
                want.insert(tag, exp);
                let buf = match op {
                    Op::Flush => IoBuf::None,
                    _ => IoBuf::Mem(b),
                };
                let req = Request {
                    q_id: 0,
                    tag,
                    desc: IoDesc {
                        op,
                        flags: IoFlags::empty(),
                        start_sector: off >> 9,
                        nr_sectors: (len >> 9) as u32,
                        addr: 0,
                    },
                    buf,
                    integrity: None,
                };
                let (submitter, mut sq, _) = ring.split();
                let mut sub = Submit::new(&mut sq, &submitter, &mut inflight, 0, &mut completed);
                assert_eq!(t.handle(&mut sub, req), Handled::Queued);
            }
            let (mut sends, mut recvs) = (0, 0);
            let mut done = std::collections::HashMap::new();
            while done.len() < round.reqs.len() {
                ring.submit_and_wait(1).unwrap();
                let cqes: Vec<_> = ring
                    .completion()
                    .map(|c| (c.user_data(), c.result()))
                    .collect();
                for (ud, res) in cqes {
                    let data = (ud >> 32) as u32;
                    match data & !0xffff {
                        OP_SEND => sends += 1,
                        OP_RECV => recvs += 1,
                        _ => {}
                    }
                    let (submitter, mut sq, _) = ring.split();
                    let mut sub =
                        Submit::new(&mut sq, &submitter, &mut inflight, 0, &mut completed);
                    t.complete(&mut sub, 0, data, res);
                }
                for (tag, res) in completed.drain(..) {
                    assert!(done.insert(tag, res).is_none(), "tag {tag} completed twice");
                }
            }
            assert_eq!(done, want);
            for &(tag, op, off, len) in &round.reqs {
                if op == Op::Read {
                    let got = &bufs[usize::from(tag)][..len];
                    assert!(
                        got == &model[off as usize..off as usize + len],
                        "tag {tag}: read {len} bytes at {off} differ"
                    );
                }
            }
            counts.push((sends, recvs));
        }
        drop(tx);
        drop(t);
        server.join().unwrap();
        counts
    }

    #[test]
    fn gathered_sends_and_staged_replies_over_a_socket() {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        // Random rounds: reads, writes and flushes of 512 B to 96 KiB, each
        // request in a region of its own, replies split at random.
        let mut rounds = Vec::new();
        for _ in 0..40 {
            let count = 1 + next(32) as u16;
            let reqs = (0..count)
                .map(|tag| {
                    let op = match next(5) {
                        0 | 1 => Op::Read,
                        2 | 3 => Op::Write,
                        _ => Op::Flush,
                    };
                    let len = if op == Op::Flush {
                        0
                    } else {
                        512 * (1 + next(192) as usize)
                    };
                    let off = u64::from(tag) * (128 << 10) + 512 * next(64);
                    (tag, op, off, len)
                })
                .collect();
            rounds.push(Round {
                reqs,
                pieces: 1 + next(6) as usize,
            });
        }
        run_rounds(&rounds);

        // 32 reads of 4 KiB answered in one write: a few sends and
        // receives serve them all.
        let reads = || Round {
            reqs: (0..32)
                .map(|t| (t, Op::Read, u64::from(t) << 16, 4096))
                .collect(),
            pieces: 1,
        };
        let counts = run_rounds(&[reads(), reads()]);
        for (sends, recvs) in counts {
            assert!(sends <= 4 && recvs <= 8, "{sends} sends, {recvs} receives");
        }
    }

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
