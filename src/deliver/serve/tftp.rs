//! TFTP server, read-only: RFC 1350 (octet mode), option negotiation RFC 2347 with `blksize`
//! (2348), `timeout` and `tsize` (2349) and `windowsize` (7440). Each transfer runs on its own
//! socket and task; files are read with `pread` from under the root only.

use super::catalog::Blob;
use super::State;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

fn pairs(v: &[String]) -> Result<Vec<(String, String)>, ParseError> {
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

/// RFC 2347: acknowledge the options kiln understands, within their ranges; ignore the rest.
pub fn negotiate(options: &[(String, String)], file_len: u64, max_blksize: usize) -> Negotiated {
    let mut n = Negotiated {
        blksize: 512,
        windowsize: 1,
        timeout: Duration::from_secs(1),
        oack: vec![],
    };
    for (k, v) in options {
        let Ok(x) = v.parse::<u64>() else { continue };
        match k.as_str() {
            "blksize" if x >= 8 => {
                let b = (x as usize).min(MAX_BLKSIZE).min(max_blksize);
                n.blksize = b;
                n.oack.push((k.clone(), b.to_string()));
            }
            "tsize" => n.oack.push((k.clone(), file_len.to_string())),
            "timeout" if (1..=255).contains(&x) => {
                n.timeout = Duration::from_secs(x);
                n.oack.push((k.clone(), x.to_string()));
            }
            "windowsize" if x >= 1 => {
                let w = (x as u16).min(MAX_WINDOWSIZE);
                n.windowsize = w;
                n.oack.push((k.clone(), w.to_string()));
            }
            _ => {}
        }
    }
    n
}

/// Serves `root` read-only on `sock` until `shutdown` flips; waits for running transfers.
pub async fn serve(
    sock: UdpSocket,
    root: PathBuf,
    state: Arc<State>,
    max_blksize: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let local_ip = sock.local_addr().map(|a| a.ip()).ok();
    let mut tasks = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 65536];
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
                match parse(&buf[..n]) {
                    Ok(Packet::Rrq { filename, mode, options }) => {
                        let (root, st) = (root.clone(), state.clone());
                        let bind = SocketAddr::new(local_ip.unwrap_or([0, 0, 0, 0].into()), 0);
                        tasks.spawn(async move {
                            transfer(bind, peer, &root, filename, mode, options, &st, max_blksize).await
                        });
                    }
                    Ok(Packet::Wrq { filename, .. }) => {
                        state.metrics.inc("kiln_tftp_transfers_total", &[("result", "refused_write")]);
                        tracing::info!(target: "kiln::serve::tftp", client = %peer, file = %filename, "write refused");
                        let _ = sock.send_to(&encode(&Packet::Error { code: ERR_ACCESS, message: "read-only server".into() }), peer).await;
                    }
                    Ok(Packet::Error { .. }) => {}
                    Ok(_) => {
                        let _ = sock.send_to(&encode(&Packet::Error { code: ERR_ILLEGAL_OP, message: "expected a read request".into() }), peer).await;
                    }
                    Err(e) => {
                        state.metrics.inc("kiln_tftp_transfers_total", &[("result", "malformed")]);
                        tracing::debug!(target: "kiln::serve::tftp", client = %peer, "malformed packet: {e}");
                        let _ = sock.send_to(&encode(&Packet::Error { code: ERR_ILLEGAL_OP, message: format!("malformed request: {e}") }), peer).await;
                    }
                }
                while tasks.try_join_next().is_some() {}
            }
            _ = shutdown.changed() => break,
        }
    }
    // Running transfers finish or time out by themselves (each retries a bounded number of times).
    let _ = tokio::time::timeout(Duration::from_secs(30), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// Retries of one window before a transfer is abandoned.
const MAX_RETRIES: u32 = 5;

#[allow(clippy::too_many_arguments)]
async fn transfer(
    bind: SocketAddr,
    peer: SocketAddr,
    root: &Path,
    filename: String,
    mode: String,
    options: Vec<(String, String)>,
    st: &Arc<State>,
    max_blksize: usize,
) {
    let started = Instant::now();
    let mac = st.mac_of(peer.ip());
    let Some(sock) = connect(bind, peer).await else {
        return;
    };
    let t = Transfer {
        sock,
        peer,
        st,
        mac,
        filename,
    };
    let Some(file) = t.open(root, &mode).await else {
        return;
    };
    let len = file.len;
    let neg = negotiate(&options, len, max_blksize);
    let mut rbuf = vec![0u8; 65536];
    if !neg.oack.is_empty() && !t.acknowledge_options(&neg, len, &mut rbuf).await {
        return;
    }
    let Some(sent_bytes) = t.send_file(&file, len, &neg, &mut rbuf).await else {
        return;
    };
    t.done(started, len, sent_bytes, &neg);
}

/// A socket of the transfer's own (bound on `bind`), connected to the client.
async fn connect(bind: SocketAddr, peer: SocketAddr) -> Option<UdpSocket> {
    let sock = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("tftp: binding a transfer socket on {bind}: {e}");
            return None;
        }
    };
    if sock.connect(peer).await.is_err() {
        return None;
    }
    Some(sock)
}

/// One read transfer: its socket (connected to the client) and what its log lines name.
struct Transfer<'a> {
    sock: UdpSocket,
    peer: SocketAddr,
    st: &'a Arc<State>,
    mac: Option<String>,
    filename: String,
}

impl Transfer<'_> {
    /// Sends an ERROR packet to the client.
    async fn fail(&self, code: u16, message: String) {
        let _ = self
            .sock
            .send(&encode(&Packet::Error { code, message }))
            .await;
    }

    /// The requested file, opened; the client gets an ERROR (and the refusal is counted) when the
    /// mode is not octet or the file cannot be served.
    async fn open(&self, root: &Path, mode: &str) -> Option<Blob> {
        let (st, peer, mac, filename) = (self.st, self.peer, &self.mac, &self.filename);
        if mode != "octet" {
            st.metrics
                .inc("kiln_tftp_transfers_total", &[("result", "bad_mode")]);
            self.fail(
                ERR_ILLEGAL_OP,
                format!("mode {mode:?} not supported: use octet"),
            )
            .await;
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
                tracing::info!(target: "kiln::serve::tftp", client = %peer, mac = mac.as_deref().unwrap_or("-"), file = %filename, "{result}");
                let msg = if code == ERR_NOT_FOUND {
                    "File not found"
                } else {
                    "Access violation"
                };
                self.fail(code, msg.into()).await;
                return None;
            }
        };
        // Only the bytes pinned (and checked piece by piece) when the catalog was loaded.
        match st.catalog().pinned(&path).cloned() {
            Some(f) => Some(f),
            None => {
                st.metrics
                    .inc("kiln_tftp_transfers_total", &[("result", "not_found")]);
                self.fail(ERR_NOT_FOUND, "File not found".into()).await;
                None
            }
        }
    }

    /// Option acknowledgement: the client answers ACK 0 (go) or ERROR 8 (e.g. UEFI asking only
    /// for tsize, then starting again). Whether the transfer goes on.
    async fn acknowledge_options(&self, neg: &Negotiated, len: u64, rbuf: &mut [u8]) -> bool {
        let (st, peer, mac, filename) = (self.st, self.peer, &self.mac, &self.filename);
        let sock = &self.sock;
        let oack = encode(&Packet::Oack {
            options: neg.oack.clone(),
        });
        let mut tries = 0;
        loop {
            let _ = sock.send(&oack).await;
            match tokio::time::timeout(neg.timeout, sock.recv(rbuf)).await {
                Ok(Ok(n)) => match parse(&rbuf[..n]) {
                    Ok(Packet::Ack { block: 0 }) => break,
                    Ok(Packet::Error { code, message }) => {
                        st.metrics
                            .inc("kiln_tftp_transfers_total", &[("result", "declined")]);
                        tracing::info!(target: "kiln::serve::tftp", client = %peer, mac = mac.as_deref().unwrap_or("-"), file = %filename, tsize = len, "client ended after OACK (error {code}: {message})");
                        return false;
                    }
                    _ => continue,
                },
                Ok(Err(_)) => return false,
                Err(_) => {
                    tries += 1;
                    if tries > MAX_RETRIES {
                        st.metrics
                            .inc("kiln_tftp_transfers_total", &[("result", "timeout")]);
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Sends the file (`len` bytes) in windows of `neg.windowsize` blocks until the client has
    /// acknowledged the last, short block, going back to the first block it lacks after a loss
    /// or a timeout. Returns the bytes sent (resent blocks included), or None when the transfer
    /// ended early.
    async fn send_file(
        &self,
        file: &Blob,
        len: u64,
        neg: &Negotiated,
        rbuf: &mut [u8],
    ) -> Option<u64> {
        let (st, peer, filename) = (self.st, self.peer, &self.filename);
        let bs = neg.blksize as u64;
        let total_blocks = len / bs + 1; // the last block is short (possibly empty)
        let mut next: u64 = 1; // first block not yet acknowledged (1-based)
        let mut retries = 0u32;
        let mut sent_bytes = 0u64;
        let mut block_buf = vec![0u8; neg.blksize + 4];
        let mut resend = false;
        loop {
            // Send the window starting at `next`.
            let last = (next + neg.windowsize as u64 - 1).min(total_blocks);
            sent_bytes += self
                .send_window(file, len, bs, (next, last), &mut block_buf, resend)
                .await?;
            match self.wait_ack(neg, rbuf, next, last).await? {
                Some(a) if a == total_blocks => break,
                Some(a) => {
                    // A full window acknowledged, or a lost block: go on from the first block the
                    // client does not have (RFC 7440 section 4).
                    resend = a < last;
                    if a >= next {
                        retries = 0;
                    }
                    next = a + 1;
                }
                None => {
                    retries += 1;
                    resend = true;
                    if retries > MAX_RETRIES {
                        st.metrics
                            .inc("kiln_tftp_transfers_total", &[("result", "timeout")]);
                        tracing::warn!(target: "kiln::serve::tftp", client = %peer, file = %filename, "timed out at block {next}");
                        return None;
                    }
                }
            }
        }
        Some(sent_bytes)
    }

    /// Sends blocks `first..=last` (`bs` bytes each, of `len`); returns the bytes sent, or None
    /// when reading or sending failed (a read error is reported to the client).
    async fn send_window(
        &self,
        file: &Blob,
        len: u64,
        bs: u64,
        (first, last): (u64, u64),
        block_buf: &mut [u8],
        resend: bool,
    ) -> Option<u64> {
        let st = self.st;
        let mut sent_bytes = 0u64;
        for b in first..=last {
            let off = (b - 1) * bs;
            let n = (len.saturating_sub(off)).min(bs) as usize;
            block_buf[0..2].copy_from_slice(&DATA.to_be_bytes());
            block_buf[2..4].copy_from_slice(&(b as u16).to_be_bytes());
            if n > 0 && file.read_exact_at(&mut block_buf[4..4 + n], off).is_err() {
                self.fail(ERR_NOT_DEFINED, "read error".into()).await;
                st.metrics
                    .inc("kiln_tftp_transfers_total", &[("result", "read_error")]);
                return None;
            }
            if self.sock.send(&block_buf[..4 + n]).await.is_err() {
                return None;
            }
            sent_bytes += n as u64;
            st.metrics.add("kiln_tftp_bytes_sent_total", &[], n as f64);
            if resend {
                st.metrics.inc("kiln_tftp_retransmits_total", &[]);
            }
        }
        Some(sent_bytes)
    }

    /// Waits for an ACK inside [next-1, last]: Some(Some(block)) for the highest block it
    /// acknowledges, Some(None) after a timeout, None when the transfer ended (the client
    /// aborted, or the socket failed).
    async fn wait_ack(
        &self,
        neg: &Negotiated,
        rbuf: &mut [u8],
        next: u64,
        last: u64,
    ) -> Option<Option<u64>> {
        let (st, peer, filename) = (self.st, self.peer, &self.filename);
        loop {
            match tokio::time::timeout(neg.timeout, self.sock.recv(rbuf)).await {
                Ok(Ok(n)) => match parse(&rbuf[..n]) {
                    Ok(Packet::Ack { block }) => {
                        // Map the 16-bit block number (it wraps) into the window.
                        let base = next - 1;
                        let delta = block.wrapping_sub(base as u16) as u64;
                        if delta <= last - base {
                            return Some(Some(base + delta));
                        }
                    }
                    Ok(Packet::Error { code, message }) => {
                        st.metrics
                            .inc("kiln_tftp_transfers_total", &[("result", "aborted")]);
                        tracing::info!(target: "kiln::serve::tftp", client = %peer, file = %filename, "client aborted (error {code}: {message})");
                        return None;
                    }
                    _ => {}
                },
                Ok(Err(_)) => return None,
                Err(_) => return Some(None),
            }
        }
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
            file = %filename,
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
}
