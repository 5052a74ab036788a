//! The NBD protocol's wire format (NetworkBlockDevice/nbd `doc/proto.md`),
//! as pure encoders and decoders over byte slices: no I/O here, so every
//! rule is unit-tested and the reply parser can be fed random bytes.
//!
//! All integers on the wire are big-endian.

use std::fmt;

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation follows; also the prefix of each option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The oldstyle handshake's second magic (not supported).
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// The magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server does fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes of `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// Bit 31 of a reply type: an error.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`: the option is unknown to the server.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// `NBD_REP_ERR_PLATFORM`.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// `NBD_REP_ERR_TLS_REQD`.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// `NBD_REP_ERR_UNKNOWN`: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// `NBD_REP_ERR_SHUTDOWN`.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags (`NBD_FLAG_*` of the export).
pub mod flags {
    /// The other flags are valid.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export is on rotating media.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Several connections see each other's writes and flushes.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// A transmission command (`NBD_CMD_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Cmd {
    /// `NBD_CMD_READ`.
    Read = 0,
    /// `NBD_CMD_WRITE`.
    Write = 1,
    /// `NBD_CMD_DISC`: the client is going away.
    Disc = 2,
    /// `NBD_CMD_FLUSH`.
    Flush = 3,
    /// `NBD_CMD_TRIM`.
    Trim = 4,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes = 6,
}

/// Command flag `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag `NBD_CMD_FLAG_NO_HOLE` (write zeroes without unmapping).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Structured reply flag: the last chunk of its reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Bit 15 of a chunk type: an error chunk.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_ERROR_BIT | 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_ERROR_BIT | 2;

/// Bytes of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Bytes of an option reply header.
pub const OPT_REPLY_HEADER_LEN: usize = 20;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// A protocol violation by the server: the connection cannot go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// A magic number is wrong.
    BadMagic {
        /// Where.
        what: &'static str,
        /// What arrived.
        got: u64,
    },
    /// A reply names a handle that has no request in flight.
    UnknownHandle(u64),
    /// A reply does not fit its request (too long, wrong type, bad bounds).
    BadReply(String),
}

impl fmt::Display for ProtoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadMagic { what, got } => write!(f, "bad {what} magic {got:#x}"),
            Self::UnknownHandle(h) => write!(f, "reply for unknown handle {h:#x}"),
            Self::BadReply(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for ProtoError {}

/// The server's greeting (the first 18 bytes of fixed newstyle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags (`FLAG_FIXED_NEWSTYLE`, `FLAG_NO_ZEROES`).
    pub flags: u16,
}

impl Greeting {
    /// Bytes of the greeting.
    pub const LEN: usize = 18;

    /// Decodes the greeting; refuses oldstyle and non-fixed newstyle servers.
    pub fn decode(b: &[u8; Self::LEN]) -> Result<Self, ProtoError> {
        let magic = be64(b, 0);
        if magic != NBD_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "greeting",
                got: magic,
            });
        }
        match be64(b, 8) {
            IHAVEOPT => {}
            OLDSTYLE_MAGIC => {
                return Err(ProtoError::BadReply(
                    "the server speaks the oldstyle handshake, which has no export names".into(),
                ))
            }
            got => {
                return Err(ProtoError::BadMagic {
                    what: "newstyle",
                    got,
                })
            }
        }
        let flags = be16(b, 16);
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ProtoError::BadReply(
                "the server does not do fixed newstyle negotiation".into(),
            ));
        }
        Ok(Self { flags })
    }

    /// The client flags to answer with.
    pub fn client_flags(self) -> u32 {
        FLAG_C_FIXED_NEWSTYLE
            | if self.flags & FLAG_NO_ZEROES != 0 {
                FLAG_C_NO_ZEROES
            } else {
                0
            }
    }
}

/// Appends an option request (`IHAVEOPT`, option, length, data) to `out`.
pub fn encode_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The data of `NBD_OPT_GO` for `export`, asking for block sizes.
pub fn go_data(export: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + export.len());
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d
}

/// An option reply's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReply {
    /// The option it answers.
    pub option: u32,
    /// `NBD_REP_*`.
    pub kind: u32,
    /// Bytes of data that follow.
    pub len: u32,
}

impl OptReply {
    /// Largest option reply data accepted (the protocol's own limit for
    /// strings is 4096; info replies are a few bytes).
    pub const MAX_DATA: u32 = 64 << 10;

    /// Decodes the header of a reply to `option`.
    pub fn decode(b: &[u8; OPT_REPLY_HEADER_LEN], option: u32) -> Result<Self, ProtoError> {
        let magic = be64(b, 0);
        if magic != OPT_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "option reply",
                got: magic,
            });
        }
        let r = Self {
            option: be32(b, 8),
            kind: be32(b, 12),
            len: be32(b, 16),
        };
        if r.option != option {
            return Err(ProtoError::BadReply(format!(
                "reply to option {} while asking option {option}",
                r.option
            )));
        }
        if r.len > Self::MAX_DATA {
            return Err(ProtoError::BadReply(format!(
                "option reply of {} bytes is too long",
                r.len
            )));
        }
        Ok(r)
    }

    /// Whether the reply is an error.
    pub fn is_error(&self) -> bool {
        self.kind & REP_FLAG_ERROR != 0
    }
}

/// What the server said of the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags ([`flags`]).
    pub flags: u16,
    /// `(minimum, preferred, maximum)` block sizes, if sent.
    pub block_size: Option<(u32, u32, u32)>,
}

impl ExportInfo {
    /// Whether `flag` (one of [`flags`]) is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flags::HAS_FLAGS != 0 && self.flags & flag != 0
    }

    /// Applies the data of an `NBD_REP_INFO` reply. Unknown info types are
    /// ignored, as the protocol says.
    pub fn apply_info(&mut self, data: &[u8]) -> Result<(), ProtoError> {
        if data.len() < 2 {
            return Err(ProtoError::BadReply("NBD_REP_INFO without a type".into()));
        }
        match be16(data, 0) {
            INFO_EXPORT if data.len() == 12 => {
                self.size = be64(data, 2);
                self.flags = be16(data, 10);
            }
            INFO_BLOCK_SIZE if data.len() == 14 => {
                let (min, pref, max) = (be32(data, 2), be32(data, 6), be32(data, 10));
                if !min.is_power_of_two() || min > 64 << 10 || pref < min || max < min {
                    return Err(ProtoError::BadReply(format!(
                        "invalid block sizes {min}/{pref}/{max}"
                    )));
                }
                self.block_size = Some((min, pref, max));
            }
            t @ (INFO_EXPORT | INFO_BLOCK_SIZE) => {
                return Err(ProtoError::BadReply(format!(
                    "NBD_REP_INFO type {t} of {} bytes",
                    data.len()
                )))
            }
            _ => {}
        }
        Ok(())
    }

    /// Decodes the answer to `NBD_OPT_EXPORT_NAME` (size, flags, and 124
    /// zero bytes unless no-zeroes was agreed, which the caller skips).
    pub fn from_export_name_reply(b: &[u8; 10]) -> Self {
        Self {
            size: be64(b, 0),
            flags: be16(b, 8),
            block_size: None,
        }
    }
}

/// The text of an option error reply, for a message.
pub fn opt_error_name(kind: u32) -> &'static str {
    match kind {
        REP_ERR_UNSUP => "option not supported",
        REP_ERR_POLICY => "refused by the server's policy",
        REP_ERR_INVALID => "invalid request",
        REP_ERR_PLATFORM => "not supported on the server's platform",
        REP_ERR_TLS_REQD => "the server requires TLS",
        REP_ERR_UNKNOWN => "no such export",
        REP_ERR_SHUTDOWN => "the server is shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "the server requires block size negotiation",
        REP_ERR_TOO_BIG => "request too big",
        _ => "unknown error",
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// The command.
    pub cmd: Cmd,
    /// The handle (cookie) the reply carries back.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

impl RequestHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&(self.cmd as u16).to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// The Linux errno of an NBD error value (the protocol's values are
/// Linux's; anything else is `EIO`).
pub fn errno(nbd_error: u32) -> i32 {
    match nbd_error {
        1 | 5 | 12 | 22 | 28 | 75 | 95 | 108 => nbd_error as i32,
        _ => libc::EIO,
    }
}

/// Where the next bytes from the socket go, as [`ReplyReader::want`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Into [`ReplyReader::header_buf`].
    Header,
    /// Into the buffer of request `tag`, at byte `at`, `len` bytes.
    Data {
        /// The request.
        tag: u16,
        /// Byte offset in its buffer.
        at: u32,
        /// Bytes wanted.
        len: u32,
    },
    /// Zeroes to write into the buffer of request `tag` (a hole in a
    /// structured read reply); then call [`ReplyReader::advance`] with
    /// 0.
    Zero {
        /// The request.
        tag: u16,
        /// Byte offset in its buffer.
        at: u32,
        /// Bytes to clear.
        len: u32,
    },
    /// Bytes to read and throw away (an error message), into
    /// [`ReplyReader::header_buf`] as many as fit.
    Discard(u32),
}

/// A request whose reply is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Its tag.
    pub tag: u16,
    /// Bytes (reads and writes), 0, or `-errno`.
    pub result: i32,
}

#[derive(Debug, Clone, Copy, Default)]
struct Pending {
    active: bool,
    read: bool,
    /// A read or a write: the result is the byte count.
    rw: bool,
    offset: u64,
    len: u32,
    /// A structured reply's error, kept until its last chunk.
    error: i32,
    /// Structured data bytes received so far.
    got: u32,
    /// Structured chunks arrived for it.
    chunks: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a header of `need` bytes (16 until the magic says which).
    Header {
        need: usize,
    },
    /// Reading a structured chunk's payload header (offset, error, …).
    ChunkExtra {
        tag: u16,
        kind: u16,
        flags: u16,
        len: u32,
    },
    Data {
        tag: u16,
        at: u32,
        left: u32,
        /// A structured chunk: more chunks may follow unless done.
        chunk_done: Option<bool>,
    },
    Discard {
        tag: u16,
        left: u32,
        done: bool,
    },
    Zero {
        tag: u16,
        at: u32,
        len: u32,
        done: bool,
    },
}

/// The receive side of a connection: tracks the requests in flight (by
/// tag, which is the handle) and parses the reply stream, saying where
/// each next byte goes — headers into its own buffer, read data straight
/// into the request's buffer. Every reply is checked against its request:
/// an unknown handle, a wrong magic, or more data than asked is an error
/// and the connection must be closed.
#[derive(Debug)]
pub struct ReplyReader {
    pending: Vec<Pending>,
    /// How many of `pending` are active: [`ReplyReader::busy`] is asked
    /// after every socket completion, so it must not scan the tags.
    in_flight: usize,
    hdr: [u8; 32],
    have: usize,
    state: State,
    structured: bool,
}

impl ReplyReader {
    /// A reader for tags `0..depth`; `structured` when structured replies
    /// were negotiated.
    pub fn new(depth: u16, structured: bool) -> Self {
        Self {
            pending: vec![Pending::default(); usize::from(depth)],
            in_flight: 0,
            hdr: [0; 32],
            have: 0,
            state: State::Header {
                need: SIMPLE_REPLY_LEN,
            },
            structured,
        }
    }

    /// Whether structured replies are parsed (they were negotiated).
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// Registers the request `tag` sent with `hdr` (whose handle must be
    /// `tag`). Returns false if the tag is out of range or already in flight.
    pub fn expect(&mut self, tag: u16, hdr: &RequestHeader) -> bool {
        match self.pending.get_mut(usize::from(tag)) {
            Some(p) if !p.active => {
                *p = Pending {
                    active: true,
                    read: hdr.cmd == Cmd::Read,
                    rw: matches!(hdr.cmd, Cmd::Read | Cmd::Write),
                    offset: hdr.offset,
                    len: hdr.len,
                    error: 0,
                    got: 0,
                    chunks: false,
                };
                self.in_flight += 1;
                true
            }
            _ => false,
        }
    }

    /// Whether any request waits for its reply.
    pub fn busy(&self) -> bool {
        self.in_flight > 0
    }

    /// Tags still waiting for their replies; forgets them and restarts
    /// parsing at a header (for a new connection).
    pub fn drain(&mut self) -> impl Iterator<Item = u16> + '_ {
        self.have = 0;
        self.state = State::Header {
            need: SIMPLE_REPLY_LEN,
        };
        let in_flight = &mut self.in_flight;
        self.pending
            .iter_mut()
            .enumerate()
            .filter(|(_, p)| p.active)
            .map(move |(t, p)| {
                p.active = false;
                *in_flight -= 1;
                t as u16
            })
    }

    /// Where the next bytes go.
    pub fn want(&self) -> Want {
        match self.state {
            State::Header { .. } | State::ChunkExtra { .. } => Want::Header,
            State::Data { tag, at, left, .. } => Want::Data { tag, at, len: left },
            State::Discard { left, .. } => Want::Discard(left),
            State::Zero { tag, at, len, .. } => Want::Zero { tag, at, len },
        }
    }

    /// The part of the header buffer still to fill (for [`Want::Header`]
    /// and [`Want::Discard`]).
    pub fn header_buf(&mut self) -> &mut [u8] {
        let need = match self.state {
            State::Header { need } => need,
            State::ChunkExtra { len, .. } => CHUNK_HEADER_LEN + len as usize,
            State::Discard { left, .. } => {
                return &mut self.hdr[..(left as usize).min(32)];
            }
            State::Data { .. } | State::Zero { .. } => self.have,
        };
        &mut self.hdr[self.have..need]
    }

    fn bad<T>(msg: String) -> Result<T, ProtoError> {
        Err(ProtoError::BadReply(msg))
    }

    fn pending(&self, handle: u64) -> Result<(u16, Pending), ProtoError> {
        match u16::try_from(handle)
            .ok()
            .and_then(|t| Some((t, *self.pending.get(usize::from(t))?)))
        {
            Some((t, p)) if p.active => Ok((t, p)),
            _ => Err(ProtoError::UnknownHandle(handle)),
        }
    }

    fn finish(&mut self, tag: u16) -> Reply {
        self.have = 0;
        self.state = State::Header {
            need: SIMPLE_REPLY_LEN,
        };
        let p = &mut self.pending[usize::from(tag)];
        if p.active {
            p.active = false;
            self.in_flight -= 1;
        }
        let result = if p.error != 0 {
            -p.error
        } else if p.read && p.chunks && p.got != p.len {
            // The server must cover the whole range or send an error.
            -libc::EIO
        } else if p.rw {
            p.len as i32
        } else {
            0
        };
        Reply { tag, result }
    }

    fn next_chunk(&mut self) {
        self.have = 0;
        self.state = State::Header {
            need: SIMPLE_REPLY_LEN,
        };
    }

    /// `n` bytes arrived where [`ReplyReader::want`] said. Returns a request
    /// whose reply is complete, if any.
    pub fn advance(&mut self, n: usize) -> Result<Option<Reply>, ProtoError> {
        match self.state {
            State::Header { need } => {
                self.have += n;
                if self.have < need {
                    return Ok(None);
                }
                self.on_header()
            }
            State::ChunkExtra {
                tag,
                kind,
                flags,
                len,
            } => {
                self.have += n;
                if self.have < CHUNK_HEADER_LEN + len as usize {
                    return Ok(None);
                }
                self.on_chunk_extra(tag, kind, flags, len)
            }
            State::Data {
                tag,
                at,
                left,
                chunk_done,
            } => {
                let n = n as u32;
                if n > left {
                    return Self::bad("more data than asked".into());
                }
                if n < left {
                    self.state = State::Data {
                        tag,
                        at: at + n,
                        left: left - n,
                        chunk_done,
                    };
                    return Ok(None);
                }
                match chunk_done {
                    None | Some(true) => Ok(Some(self.finish(tag))),
                    Some(false) => {
                        self.next_chunk();
                        Ok(None)
                    }
                }
            }
            State::Zero { tag, done, .. } => {
                if n != 0 {
                    return Self::bad("bytes received while clearing a hole".into());
                }
                if done {
                    Ok(Some(self.finish(tag)))
                } else {
                    self.next_chunk();
                    Ok(None)
                }
            }
            State::Discard { tag, left, done } => {
                let n = n as u32;
                if n > left {
                    return Self::bad("more data than asked".into());
                }
                if n < left {
                    self.state = State::Discard {
                        tag,
                        left: left - n,
                        done,
                    };
                    return Ok(None);
                }
                if done {
                    Ok(Some(self.finish(tag)))
                } else {
                    self.next_chunk();
                    Ok(None)
                }
            }
        }
    }

    fn on_header(&mut self) -> Result<Option<Reply>, ProtoError> {
        let magic = be32(&self.hdr, 0);
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let error = be32(&self.hdr, 4);
                let (tag, p) = self.pending(be64(&self.hdr, 8))?;
                if p.chunks {
                    return Self::bad("simple reply after structured chunks".into());
                }
                if error != 0 {
                    self.pending[usize::from(tag)].error = errno(error);
                    return Ok(Some(self.finish(tag)));
                }
                if p.read && p.len > 0 {
                    self.state = State::Data {
                        tag,
                        at: 0,
                        left: p.len,
                        chunk_done: None,
                    };
                    return Ok(None);
                }
                Ok(Some(self.finish(tag)))
            }
            STRUCTURED_REPLY_MAGIC if self.structured => {
                if self.have < CHUNK_HEADER_LEN {
                    self.state = State::Header {
                        need: CHUNK_HEADER_LEN,
                    };
                    return Ok(None);
                }
                let flags = be16(&self.hdr, 4);
                let kind = be16(&self.hdr, 6);
                let (tag, p) = self.pending(be64(&self.hdr, 8))?;
                self.pending[usize::from(tag)].chunks = true;
                let len = be32(&self.hdr, 16);
                let done = flags & REPLY_FLAG_DONE != 0;
                match kind {
                    REPLY_TYPE_NONE if len == 0 && done => Ok(Some(self.finish(tag))),
                    REPLY_TYPE_NONE => {
                        Self::bad("NBD_REPLY_TYPE_NONE with data or not last".into())
                    }
                    REPLY_TYPE_OFFSET_DATA if p.read && len > 8 => {
                        self.state = State::ChunkExtra {
                            tag,
                            kind,
                            flags,
                            len: 8,
                        };
                        Ok(None)
                    }
                    REPLY_TYPE_OFFSET_HOLE if p.read && len == 12 => {
                        self.state = State::ChunkExtra {
                            tag,
                            kind,
                            flags,
                            len: 12,
                        };
                        Ok(None)
                    }
                    REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET if len >= 6 => {
                        self.state = State::ChunkExtra {
                            tag,
                            kind,
                            flags,
                            len: 6,
                        };
                        Ok(None)
                    }
                    k if k & REPLY_TYPE_ERROR_BIT != 0 && len >= 4 => {
                        // An error type this client does not know: its
                        // first four bytes are the error, as for the known.
                        self.state = State::ChunkExtra {
                            tag,
                            kind,
                            flags,
                            len: 4,
                        };
                        Ok(None)
                    }
                    k => Self::bad(format!(
                        "structured reply chunk type {k} of {len} bytes for a {} request",
                        if p.read { "read" } else { "non-read" }
                    )),
                }
            }
            m => Err(ProtoError::BadMagic {
                what: "reply",
                got: u64::from(m),
            }),
        }
    }

    fn on_chunk_extra(
        &mut self,
        tag: u16,
        kind: u16,
        flags: u16,
        extra: u32,
    ) -> Result<Option<Reply>, ProtoError> {
        let done = flags & REPLY_FLAG_DONE != 0;
        let chunk_len = be32(&self.hdr, 16);
        let x = CHUNK_HEADER_LEN;
        let p = self.pending[usize::from(tag)];
        let within = |off: u64, len: u32| -> Result<u32, ProtoError> {
            match off.checked_sub(p.offset) {
                Some(at)
                    if at + u64::from(len) <= u64::from(p.len)
                        && u64::from(p.got) + u64::from(len) <= u64::from(p.len) =>
                {
                    Ok(at as u32)
                }
                _ => Self::bad(format!(
                    "reply chunk at {off}+{len} outside the request {}+{}",
                    p.offset, p.len
                )),
            }
        };
        match kind {
            REPLY_TYPE_OFFSET_DATA => {
                let len = chunk_len - extra;
                let at = within(be64(&self.hdr, x), len)?;
                self.pending[usize::from(tag)].got += len;
                self.state = State::Data {
                    tag,
                    at,
                    left: len,
                    chunk_done: Some(done),
                };
                Ok(None)
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let len = be32(&self.hdr, x + 8);
                let at = within(be64(&self.hdr, x), len)?;
                self.pending[usize::from(tag)].got += len;
                self.state = State::Zero { tag, at, len, done };
                Ok(None)
            }
            _ => {
                let error = be32(&self.hdr, x);
                let slot = &mut self.pending[usize::from(tag)];
                slot.error = if error == 0 { libc::EIO } else { errno(error) };
                let left = chunk_len - extra;
                if left == 0 {
                    if done {
                        return Ok(Some(self.finish(tag)));
                    }
                    self.next_chunk();
                    return Ok(None);
                }
                self.state = State::Discard { tag, left, done };
                Ok(None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simple(error: u32, handle: u64) -> Vec<u8> {
        let mut v = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&error.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v
    }

    fn chunk(flags: u16, kind: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn req(cmd: Cmd, tag: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags: 0,
            cmd,
            handle: u64::from(tag),
            offset,
            len,
        }
    }

    /// Feeds `stream` to `r` in pieces of at most `step` bytes, with one
    /// buffer of `buf_len` bytes per tag; returns the replies, or the error.
    fn feed(
        r: &mut ReplyReader,
        bufs: &mut [Vec<u8>],
        mut stream: &[u8],
        step: usize,
    ) -> Result<Vec<Reply>, ProtoError> {
        let mut out = Vec::new();
        loop {
            let n = match r.want() {
                Want::Zero { tag, at, len } => {
                    let b = &mut bufs[usize::from(tag)];
                    b[at as usize..(at + len) as usize].fill(0);
                    0
                }
                _ if stream.is_empty() => return Ok(out),
                Want::Header | Want::Discard(_) => {
                    let dst = r.header_buf();
                    assert!(!dst.is_empty(), "the reader asked for nothing");
                    let n = dst.len().min(step).min(stream.len());
                    dst[..n].copy_from_slice(&stream[..n]);
                    n
                }
                Want::Data { tag, at, len } => {
                    let b = &mut bufs[usize::from(tag)];
                    let n = (len as usize).min(step).min(stream.len());
                    // Panics (fails the test) if the reader points outside
                    // the request's buffer.
                    b[at as usize..at as usize + n].copy_from_slice(&stream[..n]);
                    n
                }
            };
            stream = &stream[n..];
            if let Some(rep) = r.advance(n)? {
                out.push(rep);
            }
        }
    }

    #[test]
    fn request_headers_are_big_endian() {
        let h = RequestHeader {
            flags: CMD_FLAG_FUA,
            cmd: Cmd::Write,
            handle: 0x0102,
            offset: 0x1000,
            len: 512,
        };
        let b = h.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[8..16], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(&b[16..24], &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(&b[24..28], &[0, 0, 2, 0]);
    }

    #[test]
    fn greetings() {
        let mut g = [0u8; Greeting::LEN];
        g[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..18].copy_from_slice(&3u16.to_be_bytes());
        let ok = Greeting::decode(&g).unwrap();
        assert_eq!(ok.client_flags(), FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
        g[17] = 0;
        assert!(Greeting::decode(&g)
            .unwrap_err()
            .to_string()
            .contains("fixed newstyle"));
        g[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert!(Greeting::decode(&g)
            .unwrap_err()
            .to_string()
            .contains("oldstyle"));
        g[0] = b'X';
        assert!(matches!(
            Greeting::decode(&g),
            Err(ProtoError::BadMagic {
                what: "greeting",
                ..
            })
        ));
    }

    #[test]
    fn options_and_infos() {
        let mut out = Vec::new();
        encode_option(&mut out, OPT_GO, &go_data("disk"));
        assert_eq!(&out[0..8], b"IHAVEOPT");
        assert_eq!(&out[8..12], &7u32.to_be_bytes());
        assert_eq!(&out[12..16], &12u32.to_be_bytes());
        assert_eq!(&out[16..20], &4u32.to_be_bytes());
        assert_eq!(&out[20..24], b"disk");
        assert_eq!(&out[24..28], &[0, 1, 0, 3]);

        let mut h = [0u8; OPT_REPLY_HEADER_LEN];
        h[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        h[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        h[12..16].copy_from_slice(&REP_ERR_UNKNOWN.to_be_bytes());
        h[16..20].copy_from_slice(&5u32.to_be_bytes());
        let r = OptReply::decode(&h, OPT_GO).unwrap();
        assert!(r.is_error());
        assert_eq!((r.kind, r.len), (REP_ERR_UNKNOWN, 5));
        assert_eq!(opt_error_name(r.kind), "no such export");
        assert!(OptReply::decode(&h, OPT_EXPORT_NAME).is_err());
        h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(OptReply::decode(&h, OPT_GO).is_err());

        let mut info = ExportInfo::default();
        let mut e = INFO_EXPORT.to_be_bytes().to_vec();
        e.extend_from_slice(&(1u64 << 30).to_be_bytes());
        e.extend_from_slice(&(flags::HAS_FLAGS | flags::READ_ONLY).to_be_bytes());
        info.apply_info(&e).unwrap();
        assert_eq!(info.size, 1 << 30);
        assert!(info.has(flags::READ_ONLY) && !info.has(flags::SEND_FUA));
        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [512u32, 4096, 1 << 25] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        info.apply_info(&b).unwrap();
        assert_eq!(info.block_size, Some((512, 4096, 1 << 25)));
        b[2..6].copy_from_slice(&1000u32.to_be_bytes());
        assert!(info.apply_info(&b).is_err());
        assert!(info.apply_info(&e[..5]).is_err());
        // Unknown info types are skipped.
        info.apply_info(&[0, 2, b'h', b'i']).unwrap();
        let old = ExportInfo::from_export_name_reply(&[0, 0, 0, 0, 0, 0, 2, 0, 0, 1]);
        assert_eq!((old.size, old.flags), (512, 1));
        assert_eq!(errno(5), libc::EIO);
        assert_eq!(errno(95), libc::EOPNOTSUPP);
        assert_eq!(errno(1234), libc::EIO);
    }

    #[test]
    fn simple_replies() {
        let mut r = ReplyReader::new(4, false);
        let mut bufs = vec![vec![0u8; 8]; 4];
        assert!(r.expect(0, &req(Cmd::Write, 0, 0, 512)));
        assert!(r.expect(1, &req(Cmd::Read, 1, 0, 8)));
        assert!(r.expect(2, &req(Cmd::Flush, 2, 0, 0)));
        assert!(!r.expect(2, &req(Cmd::Flush, 2, 0, 0)), "tag 2 is busy");
        assert!(
            !r.expect(9, &req(Cmd::Flush, 9, 0, 0)),
            "tag 9 is past the depth"
        );
        let mut s = simple(0, 1);
        s.extend_from_slice(b"abcdefgh");
        s.extend(simple(0, 0));
        s.extend(simple(28, 2));
        for step in [1, 3, 64] {
            let mut r2 = ReplyReader::new(4, false);
            r2.expect(0, &req(Cmd::Write, 0, 0, 512));
            r2.expect(1, &req(Cmd::Read, 1, 0, 8));
            r2.expect(2, &req(Cmd::Flush, 2, 0, 0));
            let reps = feed(&mut r2, &mut bufs, &s, step).unwrap();
            assert_eq!(
                reps,
                [
                    Reply { tag: 1, result: 8 },
                    Reply {
                        tag: 0,
                        result: 512
                    },
                    Reply {
                        tag: 2,
                        result: -libc::ENOSPC
                    }
                ]
            );
            assert_eq!(&bufs[1], b"abcdefgh");
            assert!(!r2.busy());
        }
        // A reply to a tag not in flight, or twice, closes the connection.
        assert_eq!(
            feed(&mut r, &mut bufs, &simple(0, 3), 64),
            Err(ProtoError::UnknownHandle(3))
        );
        let mut r = ReplyReader::new(4, false);
        r.expect(0, &req(Cmd::Flush, 0, 0, 0));
        let mut twice = simple(0, 0);
        twice.extend(simple(0, 0));
        assert_eq!(
            feed(&mut r, &mut bufs, &twice, 64),
            Err(ProtoError::UnknownHandle(0))
        );
        let mut r = ReplyReader::new(4, false);
        r.expect(0, &req(Cmd::Flush, 0, 0, 0));
        assert!(
            matches!(
                feed(&mut r, &mut bufs, &chunk(1, 0, 0, &[]), 64),
                Err(ProtoError::BadMagic { .. })
            ),
            "structured replies were not negotiated"
        );
        let mut r = ReplyReader::new(4, false);
        r.expect(3, &req(Cmd::Read, 3, 0, 8));
        let drained: Vec<u16> = r.drain().collect();
        assert_eq!(drained, [3]);
        assert!(!r.busy());
    }

    #[test]
    fn busy_counts_the_requests_in_flight() {
        let mut bufs = vec![vec![0u8; 8]; 4];
        let mut r = ReplyReader::new(4, false);
        assert!(!r.busy());
        assert!(r.expect(0, &req(Cmd::Flush, 0, 0, 0)));
        assert!(r.expect(1, &req(Cmd::Flush, 1, 0, 0)));
        // A tag already in flight is refused and not counted twice.
        assert!(!r.expect(1, &req(Cmd::Flush, 1, 0, 0)));
        assert!(r.expect(2, &req(Cmd::Read, 2, 0, 8)));
        assert_eq!(feed(&mut r, &mut bufs, &simple(0, 1), 64).unwrap().len(), 1);
        assert!(r.busy(), "two are still in flight");
        assert_eq!(feed(&mut r, &mut bufs, &simple(0, 0), 64).unwrap().len(), 1);
        assert!(r.busy(), "the read is still in flight");
        // A drain that stops half-way leaves the rest counted.
        assert_eq!(r.drain().next(), Some(2));
        assert!(!r.busy());
        assert!(r.expect(3, &req(Cmd::Read, 3, 0, 8)));
        assert!(r.busy());
        assert_eq!(r.drain().count(), 1);
        assert!(!r.busy());
    }

    #[test]
    fn structured_replies() {
        let mut bufs = vec![vec![0xffu8; 16]; 2];
        let mut r = ReplyReader::new(2, true);
        r.expect(0, &req(Cmd::Read, 0, 4096, 16));
        r.expect(1, &req(Cmd::Write, 1, 0, 512));
        let mut data = (4096u64 + 8).to_be_bytes().to_vec();
        data.extend_from_slice(b"DATADATA");
        let mut hole = 4096u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&8u32.to_be_bytes());
        let mut s = chunk(0, REPLY_TYPE_OFFSET_DATA, 0, &data);
        s.extend(chunk(0, REPLY_TYPE_OFFSET_HOLE, 0, &hole));
        s.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0, &[]));
        let mut err = 5u32.to_be_bytes().to_vec();
        err.extend_from_slice(&3u16.to_be_bytes());
        err.extend_from_slice(b"bad");
        s.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 1, &err));
        for step in [1, 7, 100] {
            let mut r = ReplyReader::new(2, true);
            r.expect(0, &req(Cmd::Read, 0, 4096, 16));
            r.expect(1, &req(Cmd::Write, 1, 0, 512));
            bufs[0].fill(0xff);
            let reps = feed(&mut r, &mut bufs, &s, step).unwrap();
            assert_eq!(
                reps,
                [
                    Reply { tag: 0, result: 16 },
                    Reply {
                        tag: 1,
                        result: -libc::EIO
                    }
                ]
            );
            assert_eq!(&bufs[0][..8], &[0; 8]);
            assert_eq!(&bufs[0][8..], b"DATADATA");
        }
        // A chunk outside the request, or an incomplete read, is refused.
        let mut far = (8192u64).to_be_bytes().to_vec();
        far.extend_from_slice(b"x");
        assert!(feed(
            &mut r,
            &mut bufs,
            &chunk(1, REPLY_TYPE_OFFSET_DATA, 0, &far),
            64
        )
        .is_err());
        let mut r = ReplyReader::new(2, true);
        r.expect(0, &req(Cmd::Read, 0, 4096, 16));
        let mut part = 4096u64.to_be_bytes().to_vec();
        part.extend_from_slice(b"x");
        let s = chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 0, &part);
        assert_eq!(
            feed(&mut r, &mut bufs, &s, 64).unwrap(),
            [Reply {
                tag: 0,
                result: -libc::EIO
            }]
        );
        // Data for a write is refused.
        let mut r = ReplyReader::new(2, true);
        r.expect(1, &req(Cmd::Write, 1, 0, 512));
        assert!(feed(
            &mut r,
            &mut bufs,
            &chunk(1, REPLY_TYPE_OFFSET_DATA, 1, &data),
            64
        )
        .is_err());
    }

    /// xorshift64*: a fixed-seed generator, so a failure repeats.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// The reply parser on random bytes, and on valid streams with random
    /// bytes changed: it errors or replies, never panics, never points
    /// outside a request's buffer (the fake buffers are exactly as long as
    /// the requests), never asks for nothing.
    #[test]
    fn fuzz_the_reply_parser() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let depth = 8u16;
        for round in 0..4000 {
            let structured = round % 2 == 0;
            let mut r = ReplyReader::new(depth, structured);
            let mut bufs = Vec::new();
            let mut valid = Vec::new();
            for tag in 0..depth {
                let len = (rng.next() % 64) as u32;
                let cmd = [Cmd::Read, Cmd::Write, Cmd::Flush, Cmd::Trim][(rng.next() % 4) as usize];
                let off = rng.next() % 1024;
                r.expect(tag, &req(cmd, tag, off, len));
                bufs.push(vec![0u8; len as usize]);
                valid.extend(simple(0, u64::from(tag)));
                if cmd == Cmd::Read {
                    valid.extend((0..len).map(|_| rng.next() as u8));
                }
            }
            let stream: Vec<u8> = if round % 3 == 0 {
                (0..rng.next() % 400).map(|_| rng.next() as u8).collect()
            } else {
                let mut v = valid.clone();
                for _ in 0..=(rng.next() % 4) {
                    let i = (rng.next() as usize) % v.len();
                    v[i] = rng.next() as u8;
                }
                // Sometimes a structured-looking header at a random place.
                if structured && round % 5 == 0 {
                    let i = (rng.next() as usize) % v.len();
                    let c = chunk(
                        rng.next() as u16,
                        rng.next() as u16,
                        rng.next() % u64::from(depth),
                        &[],
                    );
                    v.splice(i..i, c);
                }
                v
            };
            let step = 1 + (rng.next() % 40) as usize;
            let mut r2 = ReplyReader::new(depth, structured);
            for tag in 0..depth {
                let p = r.pending[usize::from(tag)];
                let cmd = if p.read {
                    Cmd::Read
                } else if p.rw {
                    Cmd::Write
                } else {
                    Cmd::Flush
                };
                r2.expect(tag, &req(cmd, tag, p.offset, p.len));
            }
            let _ = feed(&mut r2, &mut bufs, &stream, step);
            // An unchanged valid stream parses completely.
            let mut r3 = ReplyReader::new(depth, structured);
            for tag in 0..depth {
                let p = r.pending[usize::from(tag)];
                let cmd = if p.read {
                    Cmd::Read
                } else if p.rw {
                    Cmd::Write
                } else {
                    Cmd::Flush
                };
                r3.expect(tag, &req(cmd, tag, p.offset, p.len));
            }
            let reps = feed(&mut r3, &mut bufs, &valid, step).unwrap();
            assert_eq!(reps.len(), usize::from(depth));
            assert!(!r3.busy());
        }
    }
}
