//! Where an NBD export is (the NBD URI standard), connecting to it, and
//! the fixed newstyle handshake — blocking std I/O, done at `add` and at
//! reconnect time, never on the data path.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use super::proto::{self, ExportInfo, Greeting, OptReply, ProtoError};

/// The NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// How to reach the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// TCP to `host:port`.
    Tcp {
        /// Host name or address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket.
    Unix(PathBuf),
}

/// An export on a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdAddr {
    /// How to reach the server.
    pub transport: Transport,
    /// The export name (may be empty: the server's default export).
    pub export: String,
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

impl NbdAddr {
    /// Parses `nbd://host[:port][/export]` or
    /// `nbd+unix:///[export]?socket=PATH`. TLS (`nbds://`) is refused.
    pub fn parse_uri(uri: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("NBD URI {uri:?}: {why}");
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
            bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH")
        })?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = percent_decode(path).map_err(|e| bad(&e))?;
        let param = |name: &str| {
            query.into_iter().flat_map(|q| q.split('&')).find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k == name).then_some(v)
            })
        };
        let transport = match scheme {
            "nbd" | "nbd+tcp" => {
                let (host, port) = if let Some(h) = authority.strip_prefix('[') {
                    let (h, p) = h
                        .split_once(']')
                        .ok_or_else(|| bad("unclosed [ in the host"))?;
                    (h, p.strip_prefix(':'))
                } else {
                    match authority.rsplit_once(':') {
                        Some((h, p)) => (h, Some(p)),
                        None => (authority, None),
                    }
                };
                if host.is_empty() {
                    return Err(bad("no host"));
                }
                let port = match port {
                    None => DEFAULT_PORT,
                    Some(p) => p
                        .parse()
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or_else(|| bad(&format!("bad port {p:?}")))?,
                };
                Transport::Tcp {
                    host: host.to_owned(),
                    port,
                }
            }
            "nbd+unix" => {
                if !authority.is_empty() {
                    return Err(bad(
                        "a Unix socket URI has no host (nbd+unix:///EXPORT?socket=PATH)",
                    ));
                }
                let socket = param("socket").ok_or_else(|| bad("no ?socket=PATH"))?;
                Transport::Unix(PathBuf::from(percent_decode(socket).map_err(|e| bad(&e))?))
            }
            "nbds" | "nbds+unix" | "nbds+tcp" => return Err(bad("TLS (nbds) is not supported")),
            s => return Err(bad(&format!("unknown scheme {s:?} (nbd or nbd+unix)"))),
        };
        Ok(Self { transport, export })
    }
}

impl fmt::Display for NbdAddr {
    /// The URI form (what `ublk list` shows and the state file keeps).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let export: String = self
            .export
            .bytes()
            .map(|b| match b {
                b'%' | b'?' | b'#' | b'&' | b' ' => format!("%{b:02X}"),
                b => (b as char).to_string(),
            })
            .collect();
        match &self.transport {
            Transport::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{export}")
            }
            Transport::Tcp { host, port } => write!(f, "nbd://{host}:{port}/{export}"),
            Transport::Unix(p) => write!(f, "nbd+unix:///{export}?socket={}", p.display()),
        }
    }
}

/// Why connecting or the handshake failed: one line for the user.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// The socket could not be opened or broke.
    #[error("NBD server {addr}: {what}: {source}")]
    Io {
        /// The server.
        addr: String,
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The server broke the protocol.
    #[error("NBD server {addr}: protocol error: {source}")]
    Proto {
        /// The server.
        addr: String,
        /// What it did.
        #[source]
        source: ProtoError,
    },
    /// The server refused the export.
    #[error("NBD server {addr}: export {export:?}: {why}")]
    Refused {
        /// The server.
        addr: String,
        /// The export.
        export: String,
        /// The server's reason.
        why: String,
    },
}

/// A connected socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix.
    Unix(UnixStream),
}

impl Stream {
    /// Shuts both directions down: operations in flight on it end.
    pub fn shutdown(&self) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        }
    }

    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
            Self::Unix(s) => s.set_read_timeout(t).and(s.set_write_timeout(t)),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(b),
            Self::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(b),
            Self::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Tcp(s) => s.as_fd(),
            Self::Unix(s) => s.as_fd(),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// A connection in transmission phase.
#[derive(Debug)]
pub struct Conn {
    /// The socket.
    pub stream: Stream,
    /// What the server said of the export.
    pub info: ExportInfo,
    /// Structured replies were agreed.
    pub structured: bool,
}

/// Options of [`connect`].
#[derive(Debug, Clone, Copy)]
pub struct ConnectOptions {
    /// Bound on connecting and on each handshake read and write.
    pub timeout: Duration,
    /// Ask for structured replies.
    pub structured: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            structured: false,
        }
    }
}

/// Connects to `addr` and negotiates its export.
pub fn connect(addr: &NbdAddr, opts: ConnectOptions) -> Result<Conn, ConnError> {
    let shown = addr.to_string();
    let io_err = |what| {
        let shown = shown.clone();
        move |source| ConnError::Io {
            addr: shown,
            what,
            source,
        }
    };
    let stream = match &addr.transport {
        Transport::Tcp { host, port } => {
            let addrs: Vec<_> = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(io_err("resolving the host"))?
                .collect();
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
            let mut found = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, opts.timeout) {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = found.ok_or(last).map_err(io_err("connecting"))?;
            s.set_nodelay(true).map_err(io_err("setting TCP_NODELAY"))?;
            Stream::Tcp(s)
        }
        Transport::Unix(p) => Stream::Unix(UnixStream::connect(p).map_err(io_err("connecting"))?),
    };
    let mut stream = stream;
    stream
        .set_timeouts(Some(opts.timeout))
        .map_err(io_err("setting socket timeouts"))?;
    let (info, structured) =
        handshake(&mut stream, &addr.export, opts.structured).map_err(|e| match e {
            HandshakeError::Io(source) => ConnError::Io {
                addr: shown.clone(),
                what: "handshake",
                source,
            },
            HandshakeError::Proto(source) => ConnError::Proto {
                addr: shown.clone(),
                source,
            },
            HandshakeError::Refused(why) => ConnError::Refused {
                addr: shown.clone(),
                export: addr.export.clone(),
                why,
            },
        })?;
    // The data path is io_uring's: no socket timeouts there.
    stream
        .set_timeouts(None)
        .map_err(io_err("clearing socket timeouts"))?;
    Ok(Conn {
        stream,
        info,
        structured,
    })
}

/// A failed handshake, before the server's address is added.
#[derive(Debug)]
pub enum HandshakeError {
    /// The socket failed or closed (`UnexpectedEof`).
    Io(io::Error),
    /// The server broke the protocol.
    Proto(ProtoError),
    /// The server said no, with this reason.
    Refused(String),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        if matches!(
            e.kind(),
            io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
        ) {
            return Self::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection during the handshake",
            ));
        }
        Self::Io(e)
    }
}

impl From<ProtoError> for HandshakeError {
    fn from(e: ProtoError) -> Self {
        Self::Proto(e)
    }
}

/// Reads one option reply to `option`: its header and data.
fn read_opt_reply<S: Read>(s: &mut S, option: u32) -> Result<(OptReply, Vec<u8>), HandshakeError> {
    let mut h = [0u8; proto::OPT_REPLY_HEADER_LEN];
    s.read_exact(&mut h)?;
    let r = OptReply::decode(&h, option)?;
    let mut data = vec![0u8; r.len as usize];
    s.read_exact(&mut data)?;
    Ok((r, data))
}

fn refusal(r: &OptReply, data: &[u8]) -> HandshakeError {
    let msg = String::from_utf8_lossy(data);
    let msg = msg.trim();
    let name = proto::opt_error_name(r.kind);
    HandshakeError::Refused(if msg.is_empty() {
        name.to_owned()
    } else {
        format!("{name} ({msg})")
    })
}

/// The fixed newstyle handshake on `s`: `NBD_OPT_STRUCTURED_REPLY` if
/// `structured`, then `NBD_OPT_GO` with a block-size request, falling back
/// to `NBD_OPT_EXPORT_NAME` on servers that do not know GO. Returns the
/// export's information and whether structured replies were agreed.
pub fn handshake<S: Read + Write>(
    s: &mut S,
    export: &str,
    structured: bool,
) -> Result<(ExportInfo, bool), HandshakeError> {
    if export.len() > 4096 {
        return Err(HandshakeError::Refused(
            "export names are at most 4096 bytes".into(),
        ));
    }
    let mut g = [0u8; Greeting::LEN];
    s.read_exact(&mut g)?;
    let greeting = Greeting::decode(&g)?;
    s.write_all(&greeting.client_flags().to_be_bytes())?;
    let mut out = Vec::with_capacity(64 + export.len());
    let mut agreed = false;
    if structured {
        proto::encode_option(&mut out, proto::OPT_STRUCTURED_REPLY, &[]);
        s.write_all(&out)?;
        let (r, data) = read_opt_reply(s, proto::OPT_STRUCTURED_REPLY)?;
        agreed = match r.kind {
            proto::REP_ACK => true,
            _ if r.is_error() => false,
            k => {
                return Err(ProtoError::BadReply(format!(
                    "reply type {k:#x} to NBD_OPT_STRUCTURED_REPLY ({} bytes)",
                    data.len()
                ))
                .into())
            }
        };
    }
    out.clear();
    proto::encode_option(&mut out, proto::OPT_GO, &proto::go_data(export));
    s.write_all(&out)?;
    let mut info = ExportInfo::default();
    let mut have_export = false;
    loop {
        let (r, data) = read_opt_reply(s, proto::OPT_GO)?;
        match r.kind {
            proto::REP_INFO => {
                info.apply_info(&data)?;
                have_export |= data.get(..2) == Some(&proto::INFO_EXPORT.to_be_bytes());
            }
            proto::REP_ACK if have_export => return Ok((info, agreed)),
            proto::REP_ACK => {
                return Err(ProtoError::BadReply(
                    "NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into(),
                )
                .into())
            }
            proto::REP_ERR_UNSUP => break,
            _ if r.is_error() => return Err(refusal(&r, &data)),
            // Other replies (e.g. NBD_REP_SERVER) are not part of GO's answer.
            k => {
                return Err(ProtoError::BadReply(format!("reply type {k:#x} to NBD_OPT_GO")).into())
            }
        }
    }
    // An old server: NBD_OPT_EXPORT_NAME, which has no error reply (the
    // server just closes the connection for an unknown export).
    out.clear();
    proto::encode_option(&mut out, proto::OPT_EXPORT_NAME, export.as_bytes());
    s.write_all(&out)?;
    let mut b = [0u8; 10];
    s.read_exact(&mut b).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeError::Refused("the server closed the connection (no such export?)".into())
        } else {
            e.into()
        }
    })?;
    if greeting.client_flags() & proto::FLAG_C_NO_ZEROES == 0 {
        let mut zeroes = [0u8; 124];
        s.read_exact(&mut zeroes)?;
    }
    Ok((ExportInfo::from_export_name_reply(&b), false))
}

/// Says goodbye on a connection with no request in flight
/// (`NBD_CMD_DISC`); errors are ignored, the socket closes anyway.
pub fn disconnect(stream: &mut Stream) {
    let h = proto::RequestHeader {
        flags: 0,
        cmd: proto::Cmd::Disc,
        handle: u64::MAX,
        offset: 0,
        len: 0,
    };
    let _ = stream.write_all(&h.encode());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let a = NbdAddr::parse_uri("nbd://localhost/disk").unwrap();
        assert_eq!(
            a.transport,
            Transport::Tcp {
                host: "localhost".into(),
                port: DEFAULT_PORT
            }
        );
        assert_eq!(a.export, "disk");
        assert_eq!(a.to_string(), "nbd://localhost:10809/disk");
        let a = NbdAddr::parse_uri("nbd://[::1]:1234/my%20disk").unwrap();
        assert_eq!(
            a.transport,
            Transport::Tcp {
                host: "::1".into(),
                port: 1234
            }
        );
        assert_eq!(a.export, "my disk");
        assert_eq!(a.to_string(), "nbd://[::1]:1234/my%20disk");
        let a = NbdAddr::parse_uri("nbd://127.0.0.1:10810").unwrap();
        assert_eq!(a.export, "");
        let a = NbdAddr::parse_uri("nbd+unix:///exp?socket=/run/nbd.sock").unwrap();
        assert_eq!(a.transport, Transport::Unix("/run/nbd.sock".into()));
        assert_eq!(a.export, "exp");
        assert_eq!(a.to_string(), "nbd+unix:///exp?socket=/run/nbd.sock");
        assert_eq!(NbdAddr::parse_uri(&a.to_string()).unwrap(), a);
        for (bad, why) in [
            ("localhost/disk", "expected nbd://"),
            ("nbd:///disk", "no host"),
            ("nbd://h:0/x", "bad port"),
            ("nbd://h:99999/x", "bad port"),
            ("nbd+unix:///x", "no ?socket"),
            ("nbd+unix://h/x?socket=/s", "no host"),
            ("nbds://h/x", "TLS"),
            ("http://h/x", "unknown scheme"),
            ("nbd://h/%zz", "percent"),
        ] {
            let e = NbdAddr::parse_uri(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    /// A scripted server: what it sends, and what the client wrote.
    struct Script {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn greeting(flags: u16) -> Vec<u8> {
        let mut v = proto::NBD_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }

    fn opt_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn run(input: Vec<u8>) -> Result<(ExportInfo, bool), HandshakeError> {
        let mut s = Script {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        handshake(&mut s, "disk", false)
    }

    #[test]
    fn handshakes() {
        let mut export = proto::INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 20).to_be_bytes());
        export
            .extend_from_slice(&(proto::flags::HAS_FLAGS | proto::flags::SEND_FLUSH).to_be_bytes());
        let mut s = greeting(3);
        s.extend(opt_reply(proto::OPT_GO, proto::REP_INFO, &export));
        s.extend(opt_reply(proto::OPT_GO, proto::REP_ACK, &[]));
        let (info, structured) = run(s).unwrap();
        assert_eq!((info.size, structured), (1 << 20, false));
        assert!(info.has(proto::flags::SEND_FLUSH));

        // GO unknown: EXPORT_NAME, with the 124 zeroes (no NO_ZEROES).
        let mut s = greeting(1);
        s.extend(opt_reply(proto::OPT_GO, proto::REP_ERR_UNSUP, &[]));
        s.extend_from_slice(&4096u64.to_be_bytes());
        s.extend_from_slice(&1u16.to_be_bytes());
        s.extend_from_slice(&[0; 124]);
        assert_eq!(run(s).unwrap().0.size, 4096);

        let mut s = greeting(3);
        s.extend(opt_reply(
            proto::OPT_GO,
            proto::REP_ERR_UNKNOWN,
            b"no disk here",
        ));
        match run(s) {
            Err(HandshakeError::Refused(why)) => {
                assert_eq!(why, "no such export (no disk here)")
            }
            r => panic!("{r:?}"),
        }
        // Closed mid-handshake.
        let mut s = greeting(3);
        s.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes()[..5]);
        match run(s) {
            Err(HandshakeError::Io(e)) => assert!(e.to_string().contains("closed")),
            r => panic!("{r:?}"),
        }
        // Not an NBD server.
        assert!(matches!(
            run(b"SSH-2.0-OpenSSH_9.2\r\n".to_vec()),
            Err(HandshakeError::Proto(_))
        ));
        // ACK without the export's size.
        let mut s = greeting(3);
        s.extend(opt_reply(proto::OPT_GO, proto::REP_ACK, &[]));
        assert!(matches!(run(s), Err(HandshakeError::Proto(_))));
    }
}
