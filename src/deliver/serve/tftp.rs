//! TFTP server, read-only: RFC 1350 (octet mode), option negotiation RFC 2347 with `blksize`
//! (2348), `timeout` and `tsize` (2349) and `windowsize` (7440). Each transfer runs on its own
//! socket (the server's TID) and task; files are the root's, pinned in memory when the catalog
//! loaded ([`super::catalog::Catalog::pinned`]): a transfer holds no descriptor of its own.
//!
//! Every client is untrusted: transfers are capped in number (in total and per client
//! address, [`Limits`]; a request beyond the cap gets an ERROR) and in time, the `timeout`
//! option is capped at [`MAX_TIMEOUT_SECS`], an idle transfer holds no descriptor of its file,
//! duplicate ACKs never make kiln send again (only a timeout does), and packets from another
//! port get ERROR 5 without disturbing the transfer.

use super::catalog::Blob;
use super::State;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::watch;

pub const RRQ: u16 = 1;
pub const WRQ: u16 = 2;
pub const DATA: u16 = 3;
pub const ACK: u16 = 4;
pub const ERROR: u16 = 5;
pub const OACK: u16 = 6;

/// Error codes (RFC 1350, 2347).
pub const ERR_NOT_DEFINED: u16 = 0;
pub const ERR_NOT_FOUND: u16 = 1;
pub const ERR_ACCESS: u16 = 2;
pub const ERR_ILLEGAL_OP: u16 = 4;
pub const ERR_UNKNOWN_TID: u16 = 5;

/// A decoded TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Rrq {
        filename: String,
        mode: String,
        /// Options in request order, names lower-cased.
        options: Vec<(String, String)>,
    },
    Wrq {
        filename: String,
        mode: String,
    },
    Data {
        block: u16,
        data: Vec<u8>,
    },
    Ack {
        block: u16,
    },
    Error {
        code: u16,
        message: String,
    },
    Oack {
        options: Vec<(String, String)>,
    },
}

/// Why a packet could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("packet shorter than 4 bytes")]
    Short,
    #[error("unknown opcode {0}")]
    Opcode(u16),
    #[error("missing NUL terminator")]
    Unterminated,
    #[error("field is not UTF-8")]
    Encoding,
    #[error("option {0:?} has no value")]
    OptionValue(String),
}

fn split_strings(b: &[u8]) -> Result<Vec<String>, ParseError> {
    if b.is_empty() {
        return Ok(vec![]);
    }
    if *b.last().unwrap() != 0 {
        return Err(ParseError::Unterminated);
    }
    b[..b.len() - 1]
        .split(|c| *c == 0)
        .map(|s| {
            std::str::from_utf8(s)
                .map(str::to_string)
                .map_err(|_| ParseError::Encoding)
        })
        .collect()
}

/// Options as (name, value) pairs. One empty string left over at the end is padding (some
/// PXE ROMs pad their requests with NULs), not a nameless option.
fn pairs(v: &[String]) -> Result<Vec<(String, String)>, ParseError> {
    let v = match v.split_last() {
        Some((last, rest)) if last.is_empty() && !v.len().is_multiple_of(2) => rest,
        _ => v,
    };
    if !v.len().is_multiple_of(2) {
        return Err(ParseError::OptionValue(v[v.len() - 1].clone()));
    }
    Ok(v.chunks(2)
        .map(|c| (c[0].to_ascii_lowercase(), c[1].clone()))
        .collect())
}

/// Decodes one packet.
pub fn parse(b: &[u8]) -> Result<Packet, ParseError> {
    if b.len() < 4 {
        // An ERROR or ACK needs 4 bytes; an RRQ at least "x\0octet\0".
        return Err(ParseError::Short);
    }
    let op = u16::from_be_bytes([b[0], b[1]]);
    let rest = &b[2..];
    match op {
        RRQ | WRQ => {
            let f = split_strings(rest)?;
            if f.len() < 2 {
                return Err(ParseError::Unterminated);
            }
            if op == WRQ {
                return Ok(Packet::Wrq {
                    filename: f[0].clone(),
                    mode: f[1].to_ascii_lowercase(),
                });
            }
            Ok(Packet::Rrq {
                filename: f[0].clone(),
                mode: f[1].to_ascii_lowercase(),
                options: pairs(&f[2..])?,
            })
        }
        DATA => Ok(Packet::Data {
            block: u16::from_be_bytes([rest[0], rest[1]]),
            data: rest[2..].to_vec(),
        }),
        ACK => Ok(Packet::Ack {
            block: u16::from_be_bytes([rest[0], rest[1]]),
        }),
        ERROR => {
            let msg = &rest[2..];
            let msg = msg.strip_suffix(&[0]).unwrap_or(msg);
            Ok(Packet::Error {
                code: u16::from_be_bytes([rest[0], rest[1]]),
                message: String::from_utf8_lossy(msg).into_owned(),
            })
        }
        OACK => Ok(Packet::Oack {
            options: pairs(&split_strings(rest)?)?,
        }),
        n => Err(ParseError::Opcode(n)),
    }
}

/// Encodes one packet.
pub fn encode(p: &Packet) -> Vec<u8> {
    let mut v = Vec::new();
    let strs = |v: &mut Vec<u8>, items: &[&str]| {
        for s in items {
            v.extend_from_slice(s.as_bytes());
            v.push(0);
        }
    };
    match p {
        Packet::Rrq {
            filename,
            mode,
            options,
        } => {
            v.extend_from_slice(&RRQ.to_be_bytes());
            strs(&mut v, &[filename, mode]);
            for (k, val) in options {
                strs(&mut v, &[k, val]);
            }
        }
        Packet::Wrq { filename, mode } => {
            v.extend_from_slice(&WRQ.to_be_bytes());
            strs(&mut v, &[filename, mode]);
        }
        Packet::Data { block, data } => {
            v.extend_from_slice(&DATA.to_be_bytes());
            v.extend_from_slice(&block.to_be_bytes());
            v.extend_from_slice(data);
        }
        Packet::Ack { block } => {
            v.extend_from_slice(&ACK.to_be_bytes());
            v.extend_from_slice(&block.to_be_bytes());
        }
        Packet::Error { code, message } => {
            v.extend_from_slice(&ERROR.to_be_bytes());
            v.extend_from_slice(&code.to_be_bytes());
            strs(&mut v, &[message]);
        }
        Packet::Oack { options } => {
            v.extend_from_slice(&OACK.to_be_bytes());
            for (k, val) in options {
                strs(&mut v, &[k, val]);
            }
        }
    }
    v
}

/// Transfer parameters after option negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: usize,
    pub windowsize: u16,
    pub timeout: Duration,
    /// Options acknowledged in the OACK (empty: no OACK, plain RFC 1350 transfer).
    pub oack: Vec<(String, String)>,
}

/// Largest `blksize` kiln offers by default: a 1500-byte MTU minus IP, UDP and TFTP headers.
pub const DEFAULT_MAX_BLKSIZE: usize = 1468;
/// RFC 2348's bounds of the blksize option.
pub const MIN_BLKSIZE: usize = 512;
pub const MAX_BLKSIZE: usize = 65464;
/// Largest window kiln accepts.
pub const MAX_WINDOWSIZE: u16 = 64;
/// Retransmission timeout without (or beyond) a `timeout` option.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest `timeout` option kiln acknowledges. RFC 2349 allows 1–255 s but lets the server
/// answer only the value asked for, so a larger request is left out of the OACK (the client
/// keeps its own default) and kiln retransmits after this many seconds.
pub const MAX_TIMEOUT_SECS: u64 = 10;

/// RFC 2347: acknowledge the options kiln understands, within their ranges; ignore the rest.
/// A repeated option counts once (the first); values that are not decimal numbers, and
/// `blksize` below 8 or `timeout` outside 1–255 (RFC 2348/2349), are ignored. `blksize` and
/// `windowsize` may be answered smaller than asked (RFC 2348, RFC 7440), `timeout` only as
/// asked (RFC 2349), `tsize` with the file's size.
pub fn negotiate(options: &[(String, String)], file_len: u64, max_blksize: usize) -> Negotiated {
    let mut n = Negotiated {
        blksize: 512,
        windowsize: 1,
        timeout: DEFAULT_TIMEOUT,
        oack: vec![],
    };
    let mut seen = std::collections::BTreeSet::new();
    for (k, v) in options {
        if !seen.insert(k.as_str()) {
            continue;
        }
        let Ok(x) = v.parse::<u64>() else { continue };
        match k.as_str() {
            "blksize" if x >= 8 => {
                let b = x.min(MAX_BLKSIZE as u64).min(max_blksize as u64) as usize;
                n.blksize = b;
                n.oack.push((k.clone(), b.to_string()));
            }
            "tsize" => n.oack.push((k.clone(), file_len.to_string())),
            "timeout" if (1..=MAX_TIMEOUT_SECS).contains(&x) => {
                n.timeout = Duration::from_secs(x);
                n.oack.push((k.clone(), x.to_string()));
            }
            "timeout" if (1..=255).contains(&x) => {
                n.timeout = Duration::from_secs(MAX_TIMEOUT_SECS);
            }
            "windowsize" if x >= 1 => {
                let w = x.min(MAX_WINDOWSIZE as u64) as u16;
                n.windowsize = w;
                n.oack.push((k.clone(), w.to_string()));
            }
            _ => {}
        }
    }
    n
}

/// How many transfers may run and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest block size offered (clamped to RFC 2348's 512..=65464 by the caller).
    pub max_blksize: usize,
    /// Transfers running at once, all clients together.
    pub max_transfers: usize,
    /// Transfers running at once for one client address.
    pub max_per_client: usize,
    /// Longest a transfer may take, from the read request to the last ACK.
    pub max_duration: Duration,
}

pub const DEFAULT_MAX_TRANSFERS: u32 = 64;
pub const DEFAULT_MAX_PER_CLIENT: u32 = 8;
pub const DEFAULT_MAX_SECS: u64 = 120;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_blksize: DEFAULT_MAX_BLKSIZE,
            max_transfers: DEFAULT_MAX_TRANSFERS as usize,
            max_per_client: DEFAULT_MAX_PER_CLIENT as usize,
            max_duration: Duration::from_secs(DEFAULT_MAX_SECS),
        }
    }
}

/// Why a read request is turned away before it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Busy {
    /// `max_transfers` are running.
    Server(usize),
    /// `max_per_client` are running for this address.
    Client(IpAddr, usize),
}

impl Busy {
    /// The ERROR message the client gets.
    pub fn message(&self) -> String {
        match self {
            Busy::Server(n) => format!("server busy ({n} transfers running): try again later"),
            Busy::Client(ip, n) => {
                format!("too many transfers from {ip} ({n} running): try again later")
            }
        }
    }
}

/// The running transfers, counted in total and per client address.
#[derive(Debug, Default)]
pub struct Slots {
    inner: Mutex<(usize, BTreeMap<IpAddr, usize>)>,
}

/// One running transfer's place; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    /// A place for a transfer to `ip`, or why there is none.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, limits: &Limits) -> Result<Slot, Busy> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_ip) = &mut *g;
        let mine = per_ip.get(&ip).copied().unwrap_or(0);
        if mine >= limits.max_per_client {
            return Err(Busy::Client(ip, mine));
        }
        if *total >= limits.max_transfers {
            return Err(Busy::Server(*total));
        }
        *total += 1;
        *per_ip.entry(ip).or_insert(0) += 1;
        Ok(Slot {
            slots: self.clone(),
            ip,
        })
    }

    /// Transfers running now.
    pub fn running(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.slots.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_ip) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Serves `root` read-only on `sock` until `shutdown` flips; waits for running transfers.
pub async fn serve(
    sock: UdpSocket,
    root: PathBuf,
    state: Arc<State>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let local_ip = sock.local_addr().map(|a| a.ip()).ok();
    let mut tasks = tokio::task::JoinSet::new();
    let slots = Arc::new(Slots::default());
    let mut buf = vec![0u8; 65536];
    // One "busy" line per second at most: a flood must not flood the log too.
    let busy_log = super::http::RateLimited::new(Duration::from_secs(1));
    let error = |code, message: &str| {
        encode(&Packet::Error {
            code,
            message: message.into(),
        })
    };
    loop {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (n, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!("tftp: recv: {e}");
                        continue;
                    }
                };
                if peer.port() == 0 {
                    continue; // nowhere to answer
                }
                match parse(&buf[..n]) {
                    Ok(Packet::Rrq { filename, mode, options }) => match slots.acquire(peer.ip(), &limits) {
                        Ok(slot) => {
                            let (root, st) = (root.clone(), state.clone());
                            let bind = SocketAddr::new(local_ip.unwrap_or([0, 0, 0, 0].into()), 0);
                            let running = slots.running();
                            state.metrics.set("kiln_tftp_in_flight", &[], running as f64);
                            let slots = slots.clone();
                            // One blocking thread per transfer (at most `max_transfers`).
                            tasks.spawn_blocking(move || {
                                let req = Request { filename, mode, options };
                                transfer(bind, peer, &root, req, &st, limits);
                                drop(slot);
                                st.metrics.set("kiln_tftp_in_flight", &[], slots.running() as f64);
                            });
                        }
                        Err(busy) => {
                            state.metrics.inc("kiln_tftp_transfers_total", &[("result", "busy")]);
                            if busy_log.allow().is_some() {
                                tracing::warn!(target: "kiln::serve::tftp", client = %peer, file = %super::http::log_safe(&filename), "refused: {}", busy.message());
                            }
                            let _ = sock.send_to(&error(ERR_NOT_DEFINED, &busy.message()), peer).await;
                        }
                    },
                    Ok(Packet::Wrq { filename, .. }) => {
                        state.metrics.inc("kiln_tftp_transfers_total", &[("result", "refused_write")]);
                        tracing::info!(target: "kiln::serve::tftp", client = %peer, file = %super::http::log_safe(&filename), "write refused");
                        let _ = sock.send_to(&error(ERR_ACCESS, "read-only server"), peer).await;
                    }
                    // Never answer an error with an error (two servers would ping-pong).
                    Ok(Packet::Error { .. }) => {}
                    Ok(_) => {
                        // DATA, ACK or OACK belong to a transfer's own port, not this one.
                        state.metrics.inc("kiln_tftp_unknown_tid_total", &[]);
                        let _ = sock.send_to(&error(ERR_UNKNOWN_TID, "unknown transfer ID: send a read request"), peer).await;
                    }
                    Err(e) => {
                        state.metrics.inc("kiln_tftp_transfers_total", &[("result", "malformed")]);
                        tracing::debug!(target: "kiln::serve::tftp", client = %peer, "malformed packet: {e}");
                        let _ = sock.send_to(&error(ERR_ILLEGAL_OP, &format!("malformed request: {e}")), peer).await;
                    }
                }
                while tasks.try_join_next().is_some() {}
            }
            _ = shutdown.changed() => break,
        }
    }
    // Running transfers finish or end by themselves (bounded retries and `max_duration`).
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// Retries of one window before a transfer is abandoned.
const MAX_RETRIES: u32 = 5;

/// A read request, as the client sent it.
struct Request {
    filename: String,
    mode: String,
    options: Vec<(String, String)>,
}

fn transfer(
    bind: SocketAddr,
    peer: SocketAddr,
    root: &Path,
    req: Request,
    st: &Arc<State>,
    limits: Limits,
) {
    let started = Instant::now();
    let mac = st.mac_of(peer.ip());
    // Not connected: a packet from another address must reach us to get its ERROR 5.
    let sock = match std::net::UdpSocket::bind(bind) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("tftp: binding a transfer socket on {bind}: {e}");
            return;
        }
    };
    let t = Transfer {
        sock,
        read_timeout: std::cell::Cell::new(Duration::ZERO),
        peer,
        st,
        mac,
        filename: req.filename,
        deadline: started + limits.max_duration,
        max_duration: limits.max_duration,
    };
    let Some(src) = t.open(root, &req.mode) else {
        return;
    };
    let neg = negotiate(&req.options, src.len, limits.max_blksize);
    let mut rbuf = vec![0u8; 2048];
    if !neg.oack.is_empty() && !t.acknowledge_options(&neg, src.len, &mut rbuf) {
        return;
    }
    let Some(sent_bytes) = t.send_file(&src, &neg, &mut rbuf) else {
        return;
    };
    t.done(started, src.len, sent_bytes, &neg);
}

/// What waiting for the client's next packet gave.
enum Got {
    Packet(Packet),
    /// Nothing from the client before the retransmission timeout.
    Timeout,
    /// The transfer's time (`max_duration`) is up.
    Expired,
    Failed,
}

/// One read transfer: its socket (the server's TID) and what its log lines name.
struct Transfer<'a> {
    sock: std::net::UdpSocket,
    /// The socket's read timeout as last set.
    read_timeout: std::cell::Cell<Duration>,
    peer: SocketAddr,
    st: &'a Arc<State>,
    mac: Option<String>,
    filename: String,
    deadline: Instant,
    max_duration: Duration,
}

impl Transfer<'_> {
    /// Sends an ERROR packet to the client.
    fn fail(&self, code: u16, message: String) {
        let _ = self
            .sock
            .send_to(&encode(&Packet::Error { code, message }), self.peer);
    }

    /// The next packet from the client before `until` (or the transfer's deadline). A packet
    /// from any other address or port is not the client's (wrong TID, RFC 1350): it gets
    /// ERROR 5 and changes nothing; undecodable packets from the client are ignored.
    fn recv(&self, rbuf: &mut [u8], until: Instant) -> Got {
        loop {
            let stop = until.min(self.deadline);
            let left = stop.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return if stop == self.deadline {
                    Got::Expired
                } else {
                    Got::Timeout
                };
            }
            // A blocking wait in the kernel: in lock-step (windowsize 1) each block waits for
            // its ACK, and a thread woken straight by the socket answers sooner than a task
            // woken through the runtime's reactor.
            // Set again only when it moved by more than a millisecond (one syscall less per
            // packet; the wait then ends at most that much later).
            let set = self.read_timeout.get();
            if set.abs_diff(left) > Duration::from_millis(1) {
                if let Err(e) = self.sock.set_read_timeout(Some(left)) {
                    tracing::debug!(target: "kiln::serve::tftp", client = %self.peer, "set_read_timeout: {e}");
                    return Got::Failed;
                }
                self.read_timeout.set(left);
            }
            let (n, from) = match self.sock.recv_from(rbuf) {
                Ok(x) => x,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    continue; // the top of the loop tells a timeout from the deadline
                }
                Err(e) => {
                    tracing::debug!(target: "kiln::serve::tftp", client = %self.peer, "recv: {e}");
                    return Got::Failed;
                }
            };
            if from != self.peer {
                self.unknown_tid(from, &rbuf[..n]);
                continue;
            }
            if let Ok(p) = parse(&rbuf[..n]) {
                return Got::Packet(p);
            }
        }
    }

    /// ERROR 5 to a packet that came from someone other than the client (none to an ERROR).
    fn unknown_tid(&self, from: SocketAddr, packet: &[u8]) {
        self.st.metrics.inc("kiln_tftp_unknown_tid_total", &[]);
        tracing::debug!(target: "kiln::serve::tftp", client = %self.peer, stranger = %from, "packet from an unknown TID");
        if from.port() == 0 || matches!(parse(packet), Ok(Packet::Error { .. })) {
            return;
        }
        let e = encode(&Packet::Error {
            code: ERR_UNKNOWN_TID,
            message: "unknown transfer ID".into(),
        });
        let _ = self.sock.send_to(&e, from);
    }

    /// The transfer ran out of time: the client is told, the end is counted and logged.
    fn expired(&self, block: u64) {
        let secs = self.max_duration.as_secs();
        self.st
            .metrics
            .inc("kiln_tftp_transfers_total", &[("result", "too_slow")]);
        tracing::warn!(target: "kiln::serve::tftp", client = %self.peer, file = %super::http::log_safe(&self.filename), "ended at block {block}: longer than the {secs} s a transfer may take (--tftp-max-secs)");
        self.fail(
            ERR_NOT_DEFINED,
            format!("transfer took longer than {secs} s: ended"),
        );
    }

    /// The requested file, resolved and checked (not held open); the client gets an ERROR (and
    /// the refusal is counted) when the mode is not octet or the file cannot be served.
    fn open(&self, root: &Path, mode: &str) -> Option<Blob> {
        let (st, peer, mac, filename) = (self.st, self.peer, &self.mac, &self.filename);
        if mode != "octet" {
            st.metrics
                .inc("kiln_tftp_transfers_total", &[("result", "bad_mode")]);
            self.fail(
                ERR_ILLEGAL_OP,
                format!("mode {mode:?} not supported: use octet"),
            );
            return None;
        }
        let path = match super::safe_path(root, filename) {
            Ok(p) => p,
            Err(why) => {
                let (code, result) = match why {
                    super::PathRefusal::NotFound => (ERR_NOT_FOUND, "not_found"),
                    super::PathRefusal::Outside => (ERR_ACCESS, "refused"),
                };
                st.metrics
                    .inc("kiln_tftp_transfers_total", &[("result", result)]);
                tracing::info!(target: "kiln::serve::tftp", client = %peer, mac = mac.as_deref().unwrap_or("-"), file = %super::http::log_safe(filename), "{result}");
                let msg = if code == ERR_NOT_FOUND {
                    "File not found"
                } else {
                    "Access violation"
                };
                self.fail(code, msg.into());
                return None;
            }
        };
        // Only the bytes pinned when the catalog was loaded.
        match st.catalog().pinned(&path).cloned() {
            Some(s) => Some(s),
            None => {
                st.metrics
                    .inc("kiln_tftp_transfers_total", &[("result", "not_found")]);
                self.fail(ERR_NOT_FOUND, "File not found".into());
                None
            }
        }
    }

    /// Option acknowledgement: the client answers ACK 0 (go) or ERROR 8 (e.g. UEFI asking only
    /// for tsize, then starting again). Whether the transfer goes on.
    fn acknowledge_options(&self, neg: &Negotiated, len: u64, rbuf: &mut [u8]) -> bool {
        let (st, peer, mac, filename) = (self.st, self.peer, &self.mac, &self.filename);
        let oack = encode(&Packet::Oack {
            options: neg.oack.clone(),
        });
        let mut tries = 0;
        loop {
            let _ = self.sock.send_to(&oack, peer);
            let until = Instant::now() + neg.timeout;
            loop {
                match self.recv(rbuf, until) {
                    Got::Packet(Packet::Ack { block: 0 }) => return true,
                    Got::Packet(Packet::Error { code, message }) => {
                        st.metrics
                            .inc("kiln_tftp_transfers_total", &[("result", "declined")]);
                        tracing::info!(target: "kiln::serve::tftp", client = %peer, mac = mac.as_deref().unwrap_or("-"), file = %super::http::log_safe(filename), tsize = len, "client ended after OACK (error {code}: {message})");
                        return false;
                    }
                    Got::Packet(_) => continue,
                    Got::Timeout => break,
                    Got::Expired => {
                        self.expired(0);
                        return false;
                    }
                    Got::Failed => return false,
                }
            }
            tries += 1;
            if tries > MAX_RETRIES {
                st.metrics
                    .inc("kiln_tftp_transfers_total", &[("result", "timeout")]);
                return false;
            }
        }
    }

    /// Sends the file with a sliding window of `neg.windowsize` blocks until the client has
    /// acknowledged the last, short block. An ACK that acknowledges new blocks moves the window
    /// on; any other ACK (a duplicate, an old one) is ignored — only a timeout sends blocks
    /// again, from the first one not acknowledged (RFC 1123 4.2.3.1, the Sorcerer's Apprentice
    /// bug). Returns the bytes sent (resent blocks included), or None when the transfer ended
    /// early.
    fn send_file(&self, src: &Blob, neg: &Negotiated, rbuf: &mut [u8]) -> Option<u64> {
        let (st, peer, filename) = (self.st, self.peer, &self.filename);
        let bs = neg.blksize as u64;
        let total_blocks = src.len / bs + 1; // the last block is short (possibly empty)
        let mut acked: u64 = 0; // every block up to here is acknowledged
        let mut sent: u64 = 0; // blocks up to here are in flight
        let mut highest: u64 = 0; // blocks up to here were sent at least once
        let mut retries = 0u32;
        let mut sent_bytes = 0u64;
        let mut block_buf = vec![0u8; neg.blksize + 4];
        let mut until = Instant::now();
        loop {
            let upto = (acked + neg.windowsize as u64).min(total_blocks);
            if sent < upto {
                sent_bytes +=
                    self.send_blocks(src, bs, (sent + 1, upto), highest, &mut block_buf)?;
                highest = highest.max(upto);
                sent = upto;
                until = Instant::now() + neg.timeout;
            }
            match self.recv(rbuf, until) {
                Got::Packet(Packet::Ack { block }) => {
                    // Map the 16-bit block number (it wraps) onto the blocks in flight.
                    let delta = block.wrapping_sub(acked as u16) as u64;
                    if delta == 0 || delta > sent - acked {
                        continue; // a duplicate or a stale ACK: ignored
                    }
                    acked += delta;
                    retries = 0;
                    if acked == total_blocks {
                        return Some(sent_bytes);
                    }
                    until = Instant::now() + neg.timeout;
                }
                Got::Packet(Packet::Error { code, message }) => {
                    st.metrics
                        .inc("kiln_tftp_transfers_total", &[("result", "aborted")]);
                    tracing::info!(target: "kiln::serve::tftp", client = %peer, file = %super::http::log_safe(filename), "client aborted (error {code}: {message})");
                    return None;
                }
                Got::Packet(_) => {}
                Got::Timeout => {
                    retries += 1;
                    if retries > MAX_RETRIES {
                        st.metrics
                            .inc("kiln_tftp_transfers_total", &[("result", "timeout")]);
                        tracing::warn!(target: "kiln::serve::tftp", client = %peer, file = %super::http::log_safe(filename), "timed out at block {}", acked + 1);
                        return None;
                    }
                    sent = acked; // go back to the first block the client lacks
                }
                Got::Expired => {
                    self.expired(acked + 1);
                    return None;
                }
                Got::Failed => return None,
            }
        }
    }

    /// Sends blocks `first..=last` (`bs` bytes each); blocks up to `highest` count as
    /// retransmissions. Returns the bytes sent, or None when reading or sending failed (a read
    /// error is reported to the client).
    fn send_blocks(
        &self,
        src: &Blob,
        bs: u64,
        (first, last): (u64, u64),
        highest: u64,
        block_buf: &mut [u8],
    ) -> Option<u64> {
        let st = self.st;
        let (len, file) = (src.len, src);
        let mut sent_bytes = 0u64;
        for b in first..=last {
            let off = (b - 1) * bs;
            let n = (len.saturating_sub(off)).min(bs) as usize;
            block_buf[0..2].copy_from_slice(&DATA.to_be_bytes());
            block_buf[2..4].copy_from_slice(&(b as u16).to_be_bytes());
            if n > 0 && file.read_exact_at(&mut block_buf[4..4 + n], off).is_err() {
                self.fail(ERR_NOT_DEFINED, "read error".into());
                st.metrics
                    .inc("kiln_tftp_transfers_total", &[("result", "read_error")]);
                return None;
            }
            if self.sock.send_to(&block_buf[..4 + n], self.peer).is_err() {
                return None;
            }
            sent_bytes += n as u64;
        }
        // Counted once per window, not per block (a metrics update takes a lock).
        st.metrics
            .add("kiln_tftp_bytes_sent_total", &[], sent_bytes as f64);
        let resent = highest.min(last).saturating_sub(first - 1);
        if resent > 0 {
            st.metrics
                .add("kiln_tftp_retransmits_total", &[], resent as f64);
        }
        Some(sent_bytes)
    }

    /// Counts the completed transfer and logs it.
    fn done(&self, started: Instant, len: u64, sent_bytes: u64, neg: &Negotiated) {
        let (st, peer, mac, filename) = (self.st, self.peer, &self.mac, &self.filename);
        st.metrics
            .inc("kiln_tftp_transfers_total", &[("result", "ok")]);
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            target: "kiln::serve::tftp",
            client = %peer,
            mac = mac.as_deref().unwrap_or("-"),
            file = %super::http::log_safe(filename),
            bytes = len,
            sent = sent_bytes,
            blksize = neg.blksize,
            windowsize = neg.windowsize,
            ms = (secs * 1000.0) as u64,
            "tftp"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn rrq_with_options_round_trips() {
        let p = Packet::Rrq {
            filename: "undionly.kpxe".into(),
            mode: "octet".into(),
            options: opts(&[("blksize", "1468"), ("tsize", "0"), ("windowsize", "8")]),
        };
        let b = encode(&p);
        assert_eq!(&b[..2], &[0, 1]);
        assert_eq!(parse(&b).unwrap(), p);
        // Option names are case-insensitive.
        let mut raw = vec![0, 1];
        raw.extend_from_slice(b"f\0OCTET\0BLKSIZE\x001024\0");
        assert_eq!(
            parse(&raw).unwrap(),
            Packet::Rrq {
                filename: "f".into(),
                mode: "octet".into(),
                options: opts(&[("blksize", "1024")])
            }
        );
    }

    #[test]
    fn malformed_packets_are_errors() {
        assert_eq!(parse(&[0, 1]), Err(ParseError::Short));
        assert_eq!(parse(&[0, 9, 0, 0]), Err(ParseError::Opcode(9)));
        assert_eq!(parse(b"\0\x01file\0oct"), Err(ParseError::Unterminated));
        assert_eq!(parse(b"\0\x01file\0"), Err(ParseError::Unterminated));
        assert!(matches!(
            parse(b"\0\x01f\0octet\0blksize\0"),
            Err(ParseError::OptionValue(_))
        ));
        assert_eq!(parse(b"\0\x01\xff\xfe\0octet\0"), Err(ParseError::Encoding));
        assert_eq!(parse(&[0, 4, 0, 7]).unwrap(), Packet::Ack { block: 7 });
        assert_eq!(
            parse(b"\0\x05\0\x08no\0").unwrap(),
            Packet::Error {
                code: 8,
                message: "no".into()
            }
        );
    }

    #[test]
    fn negotiation_clamps_and_ignores() {
        let n = negotiate(
            &opts(&[
                ("blksize", "65464"),
                ("tsize", "0"),
                ("windowsize", "1000"),
                ("timeout", "3"),
                ("multicast", ""),
            ]),
            12345,
            DEFAULT_MAX_BLKSIZE,
        );
        assert_eq!(n.blksize, 1468);
        assert_eq!(n.windowsize, MAX_WINDOWSIZE);
        assert_eq!(n.timeout, Duration::from_secs(3));
        assert_eq!(
            n.oack,
            opts(&[
                ("blksize", "1468"),
                ("tsize", "12345"),
                ("windowsize", "64"),
                ("timeout", "3")
            ])
        );
        let n = negotiate(
            &opts(&[("blksize", "4"), ("timeout", "0"), ("windowsize", "x")]),
            1,
            1468,
        );
        assert_eq!(n.blksize, 512);
        assert!(n.oack.is_empty());
    }
    #[test]
    fn windowsize_beyond_u16_is_clamped_not_wrapped() {
        // Issue 17: 65536 became `windowsize=0` in the OACK and a dead transfer.
        for w in ["65536", "131072", "4294967296", "18446744073709551615"] {
            let n = negotiate(&opts(&[("windowsize", w)]), 10, DEFAULT_MAX_BLKSIZE);
            assert_eq!(n.windowsize, MAX_WINDOWSIZE, "{w}");
            assert_eq!(n.oack, opts(&[("windowsize", "64")]), "{w}");
        }
        let n = negotiate(&opts(&[("windowsize", "0")]), 10, DEFAULT_MAX_BLKSIZE);
        assert_eq!((n.windowsize, n.oack.len()), (1, 0));
    }

    #[test]
    fn blksize_stays_in_rfc_2348_range() {
        for (asked, got) in [
            ("8", Some("8")),
            ("65464", Some("1468")),
            ("99999999999", Some("1468")),
        ] {
            let n = negotiate(&opts(&[("blksize", asked)]), 10, DEFAULT_MAX_BLKSIZE);
            assert_eq!(n.oack.first().map(|(_, v)| v.as_str()), got, "{asked}");
        }
        for bad in ["7", "0", "-1", "", "1e3", " 512"] {
            let n = negotiate(&opts(&[("blksize", bad)]), 10, DEFAULT_MAX_BLKSIZE);
            assert_eq!((n.blksize, n.oack.len()), (512, 0), "{bad:?}");
        }
        // A server with a larger cap still stops at the RFC's maximum.
        let n = negotiate(&opts(&[("blksize", "70000")]), 10, 100_000);
        assert_eq!(n.blksize, MAX_BLKSIZE);
    }

    #[test]
    fn timeout_is_capped_by_leaving_it_out_of_the_oack() {
        // RFC 2349: the OACK's timeout must equal the request's, so a value above the cap is
        // not acknowledged; kiln then waits MAX_TIMEOUT_SECS, not 255 s.
        let n = negotiate(
            &opts(&[("timeout", "255"), ("blksize", "1024")]),
            10,
            DEFAULT_MAX_BLKSIZE,
        );
        assert_eq!(n.timeout, Duration::from_secs(MAX_TIMEOUT_SECS));
        assert_eq!(n.oack, opts(&[("blksize", "1024")]));
        let n = negotiate(&opts(&[("timeout", "10")]), 10, DEFAULT_MAX_BLKSIZE);
        assert_eq!(n.oack, opts(&[("timeout", "10")]));
        for bad in ["0", "256", "", "x"] {
            let n = negotiate(&opts(&[("timeout", bad)]), 10, DEFAULT_MAX_BLKSIZE);
            assert_eq!((n.timeout, n.oack.len()), (DEFAULT_TIMEOUT, 0), "{bad:?}");
        }
    }

    #[test]
    fn repeated_unknown_and_empty_options() {
        let n = negotiate(
            &opts(&[
                ("blksize", "1024"),
                ("blksize", "512"),
                ("tsize", "0"),
                ("tsize", "0"),
                ("multicast", ""),
                ("", ""),
                ("windowsize", ""),
            ]),
            77,
            DEFAULT_MAX_BLKSIZE,
        );
        assert_eq!(n.blksize, 1024, "the first of a repeated option counts");
        assert_eq!(n.oack, opts(&[("blksize", "1024"), ("tsize", "77")]));
    }

    #[test]
    fn trailing_nul_padding_is_not_an_option() {
        let mut raw = vec![0, 1];
        raw.extend_from_slice(b"f\0octet\0blksize\x001024\0\0");
        assert_eq!(
            parse(&raw).unwrap(),
            Packet::Rrq {
                filename: "f".into(),
                mode: "octet".into(),
                options: opts(&[("blksize", "1024")])
            }
        );
        // An option with an empty value is a pair, not padding.
        let mut raw = vec![0, 1];
        raw.extend_from_slice(b"f\0octet\0blksize\0\0");
        assert!(
            matches!(parse(&raw), Ok(Packet::Rrq { options, .. }) if options == opts(&[("blksize", "")]))
        );
        // A name without a value is still an error.
        assert!(parse(b"\0\x01f\0octet\0blksize\x001024\0tsize\0").is_err());
    }

    #[test]
    fn slots_cap_in_total_and_per_client() {
        let limits = Limits {
            max_transfers: 3,
            max_per_client: 2,
            ..Limits::default()
        };
        let slots = Arc::new(Slots::default());
        let a: IpAddr = "10.0.0.5".parse().unwrap();
        let b: IpAddr = "10.0.0.6".parse().unwrap();
        let c: IpAddr = "10.0.0.7".parse().unwrap();
        let a1 = slots.acquire(a, &limits).unwrap();
        let _a2 = slots.acquire(a, &limits).unwrap();
        assert_eq!(slots.acquire(a, &limits).unwrap_err(), Busy::Client(a, 2));
        let _b1 = slots.acquire(b, &limits).unwrap();
        assert_eq!(slots.acquire(c, &limits).unwrap_err(), Busy::Server(3));
        assert!(Busy::Server(3).message().contains("busy"));
        drop(a1);
        assert_eq!(slots.running(), 2);
        let _c1 = slots.acquire(c, &limits).unwrap();
        assert_eq!(slots.acquire(a, &limits).unwrap_err(), Busy::Server(3));
    }
}
