//! HTTP: per-MAC iPXE scripts, role build files (Content-Length, Range, ETag = sha256), NoCloud
//! seeds, iPXE binaries for UEFI HTTP boot, `/metrics` and `/status`.

use super::catalog::{is_seed_file, Blob, Lookup, PIECE};
use super::{ipxe, State};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::collections::HashMap;
use std::convert::Infallible;
use std::fs::File;
use std::net::IpAddr;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

pub type RespBody = BoxBody<Bytes, std::io::Error>;

/// Slow clients: the whole request head must arrive within this (slowloris).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that moves no byte either way for this long is closed: an idle keep-alive,
/// or a client that stopped reading its response.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Open connections from one client address.
pub const PER_CLIENT_CONNECTIONS: usize = 64;
/// Largest request head (request line and headers); more is answered 431 or 414.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// How many connections the HTTP server holds open: a quarter of the descriptors (TFTP, the
/// served files and the runtime need the rest), between 16 and 4096.
pub fn max_connections(fd_limit: u64) -> usize {
    (fd_limit / 4).clamp(16, 4096) as usize
}

/// Open connections, in total and per client address.
struct Slots {
    max: usize,
    per_client: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One taken slot, given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
}

impl Slots {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, &'static str> {
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 >= self.max {
            return Err("server_cap");
        }
        let n = g.1.entry(ip).or_insert(0);
        if *n >= self.per_client {
            return Err("client_cap");
        }
        *n += 1;
        g.0 += 1;
        Ok(Slot {
            slots: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut g = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        g.0 -= 1;
        if let Some(n) = g.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.ip);
            }
        }
    }
}

/// A log line at most every `every`, with the number of lines held back since.
pub struct RateLimited {
    every: Duration,
    last: Mutex<(Option<Instant>, u64)>,
}

impl RateLimited {
    pub fn new(every: Duration) -> RateLimited {
        RateLimited {
            every,
            last: Mutex::new((None, 0)),
        }
    }

    /// `Some(held back)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let mut g = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if g.0.is_some_and(|t| now.duration_since(t) < self.every) {
            g.1 += 1;
            return None;
        }
        let held = g.1;
        *g = (Some(now), 0);
        Some(held)
    }
}

/// The I/O of one connection, noting when a byte last moved either way.
struct Watched<S> {
    inner: S,
    last: Arc<Mutex<Instant>>,
}

impl<S> Watched<S> {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a connection over a cap gets before it is closed.
const BUSY_503: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 5\r\nContent-Length: 0\r\n\r\n";

/// A descriptor held in reserve: when accept() finds none left (EMFILE), it is closed to take
/// the waiting connection off the queue and close it, so clients are refused at once instead
/// of hanging, and accept() does not spin.
fn spare_fd() -> Option<File> {
    File::open("/dev/null").ok()
}

/// Accepts connections until `shutdown` flips, then lets open responses finish (up to
/// `grace`) before returning. At most [`max_connections`] are open at once and
/// [`PER_CLIENT_CONNECTIONS`] per client address; more are closed at once with a 503.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
    grace: std::time::Duration,
) {
    let max = max_connections(crate::sys::os::fd_limit());
    let slots = Arc::new(Slots {
        max,
        per_client: PER_CLIENT_CONNECTIONS.min(max),
        open: Mutex::new((0, HashMap::new())),
    });
    let accept_log = RateLimited::new(Duration::from_secs(10));
    let refuse_log = Arc::new(RateLimited::new(Duration::from_secs(10)));
    let mut spare = spare_fd();
    let mut backoff = Duration::from_millis(10);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (stream, peer) = match r {
                    Ok(x) => {
                        backoff = Duration::from_millis(10);
                        x
                    }
                    Err(e) => {
                        let emfile = matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
                        if emfile && spare.take().is_some() {
                            // Take the waiting clients off the queue and close them (each
                            // close frees the descriptor the next accept needs).
                            for _ in 0..256 {
                                match tokio::time::timeout(Duration::ZERO, listener.accept()).await {
                                    Ok(Ok((s, _))) => {
                                        let _ = s.try_write(BUSY_503);
                                        state.metrics.inc("kiln_http_connections_refused_total", &[("reason", "no_descriptors")]);
                                    }
                                    _ => break,
                                }
                            }
                            spare = spare_fd();
                        }
                        if let Some(held) = accept_log.allow() {
                            tracing::warn!("http: accept: {e} (backing off {backoff:?}; {held} more like it not logged)");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                };
                let slot = match slots.take(peer.ip()) {
                    Ok(s) => s,
                    Err(reason) => {
                        state.metrics.inc("kiln_http_connections_refused_total", &[("reason", reason)]);
                        if let Some(held) = refuse_log.allow() {
                            tracing::warn!(target: "kiln::serve::http", client = %peer.ip(), "http: too many connections ({reason}); closing new ones with 503 ({held} more not logged)");
                        }
                        let _ = stream.try_write(BUSY_503);
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let st = state.clone();
                let mut sd = shutdown.clone();
                conns.spawn(async move {
                    let _slot = slot;
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(req, peer, &st).await) }
                    });
                    let last = Arc::new(Mutex::new(Instant::now()));
                    let io = Watched { inner: stream, last: last.clone() };
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .max_buf_size(MAX_HEAD_BYTES.max(8192))
                        .max_headers(64)
                        .serve_connection(hyper_util::rt::TokioIo::new(io), svc);
                    tokio::pin!(conn);
                    let mut stopping = *sd.borrow();
                    if stopping {
                        conn.as_mut().graceful_shutdown();
                    }
                    let mut tick = tokio::time::interval(Duration::from_secs(1));
                    loop {
                        tokio::select! {
                            r = conn.as_mut() => {
                                if let Err(e) = r {
                                    tracing::debug!("http {peer}: {e}");
                                }
                                break;
                            }
                            _ = tick.tick() => {
                                let quiet = last.lock().unwrap_or_else(|e| e.into_inner()).elapsed();
                                if quiet >= IDLE_TIMEOUT {
                                    tracing::debug!("http {peer}: nothing moved for {quiet:?}; closing");
                                    break;
                                }
                            }
                            _ = sd.changed(), if !stopping => {
                                // Shutdown (or the server gone): finish the response in
                                // flight, then close.
                                stopping = true;
                                conn.as_mut().graceful_shutdown();
                            }
                        }
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            r = conns.join_next() => if r.is_none() { break },
            _ = &mut deadline => {
                tracing::warn!("http: {} connection(s) still open after {grace:?}; closing them", conns.len());
                conns.abort_all();
                break;
            }
        }
    }
}

/// A whole response with a body in memory (for the updates API).
pub fn full_response(
    status: StatusCode,
    ctype: &str,
    body: impl Into<Bytes>,
) -> Response<RespBody> {
    full(status, ctype, body)
}

fn full(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<RespBody> {
    let body: Bytes = body.into();
    let mut r = Response::new(Full::new(body.clone()).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ctype).unwrap());
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<RespBody> {
    full(status, "text/plain; charset=utf-8", body.into())
}

/// Decodes `%XX` escapes (and `+` as space) in a query value; `None` if malformed.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| percent_decode(v))
}

/// One parsed `Range: bytes=` header against a length: `Ok(None)` = whole file,
/// `Ok(Some((start, end_inclusive)))`, `Err(Unsatisfiable)` (416).
/// A `Range` that no byte of the file satisfies (answered with 416).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsatisfiable;

pub fn parse_range(h: Option<&str>, len: u64) -> Result<Option<(u64, u64)>, Unsatisfiable> {
    let Some(h) = h else { return Ok(None) };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Ok(None); // other units: ignore (RFC 9110 14.2)
    };
    if spec.contains(',') {
        return Ok(None); // multiple ranges: answer with the whole file
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (a, b) = (a.trim(), b.trim());
    // Digits beyond u64 mean "past any end" (RFC 9110 14.1.1 positions are unbounded).
    let parse = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().unwrap_or(u64::MAX))
    };
    match (a.is_empty(), b.is_empty()) {
        (true, true) => Ok(None),
        (true, false) => {
            let Some(n) = parse(b) else { return Ok(None) };
            if n == 0 || len == 0 {
                return Err(Unsatisfiable);
            }
            Ok(Some((len.saturating_sub(n), len - 1)))
        }
        (false, _) => {
            let Some(start) = parse(a) else {
                return Ok(None);
            };
            let end = if b.is_empty() {
                len.saturating_sub(1)
            } else {
                match parse(b) {
                    Some(e) if e >= start => e.min(len.saturating_sub(1)),
                    _ => return Ok(None),
                }
            };
            if start >= len {
                return Err(Unsatisfiable);
            }
            Ok(Some((start, end)))
        }
    }
}

/// What a request was for (metrics label).
fn route_of(path: &str) -> &'static str {
    match path.split('/').nth(1).unwrap_or("") {
        "boot.ipxe" => "boot_script",
        "roles" => "role_file",
        "nocloud" => "nocloud",
        "ipxe" => "ipxe",
        "metrics" => "metrics",
        "status" => "status",
        "healthz" => "healthz",
        _ => "other",
    }
}

async fn handle(req: Request<Incoming>, peer: SocketAddr, st: &Arc<State>) -> Response<RespBody> {
    let start = Instant::now();
    let path = req.uri().path().to_string();
    let route = route_of(&path);
    let mut mac = st.mac_of(peer.ip());
    let method = req.method().clone();
    let uri = req.uri().to_string();
    let resp = if super::api::is_api(&path) {
        let r = super::api::handle(req, st).await;
        let code = r.status().as_u16().to_string();
        st.metrics.inc(
            "kiln_http_requests_total",
            &[("route", "api"), ("code", &code)],
        );
        tracing::info!(
            target: "kiln::serve::http",
            client = %peer.ip(),
            method = %method,
            path = %log_safe(&uri),
            status = r.status().as_u16(),
            ms = start.elapsed().as_millis() as u64,
            "http"
        );
        return r;
    } else if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        r
    } else {
        route_request(&req, &path, peer, st, &mut mac)
    };

    let code = resp.status().as_u16().to_string();
    st.metrics.inc(
        "kiln_http_requests_total",
        &[("route", route), ("code", &code)],
    );
    let head = req.method() == Method::HEAD;
    let resp = if head {
        let (parts, _) = resp.into_parts();
        Response::from_parts(
            parts,
            Full::new(Bytes::new()).map_err(|n| match n {}).boxed(),
        )
    } else {
        resp
    };
    // File bodies log when they finish; everything else logs now.
    if head || resp.headers().get("x-kiln-streamed").is_none() {
        let len = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0")
            .to_string();
        if !head {
            st.metrics.add(
                "kiln_http_bytes_sent_total",
                &[("route", route)],
                len.parse().unwrap_or(0.0),
            );
        }
        tracing::info!(
            target: "kiln::serve::http",
            client = %peer.ip(),
            mac = mac.as_deref().unwrap_or("-"),
            method = %req.method(),
            path = %log_safe(&req.uri().to_string()),
            status = resp.status().as_u16(),
            bytes = if head { "0" } else { len.as_str() },
            ms = start.elapsed().as_millis() as u64,
            "http"
        );
    }
    let mut resp = resp;
    resp.headers_mut().remove("x-kiln-streamed");
    resp
}

fn route_request(
    req: &Request<Incoming>,
    path: &str,
    peer: SocketAddr,
    st: &Arc<State>,
    mac: &mut Option<String>,
) -> Response<RespBody> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let cat = st.catalog();
    match segs.as_slice() {
        ["boot.ipxe"] => {
            let Some(m) = query_param(req.uri().query(), "mac") else {
                if req
                    .uri()
                    .query()
                    .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("mac=")))
                {
                    return invalid_mac(peer);
                }
                return script(ipxe::chain_script(&st.base_url));
            };
            // Request input never reaches a script or a log line: only the normalised MAC.
            let Some(norm) = crate::project::recipe::normalize_mac(&m) else {
                return invalid_mac(peer);
            };
            st.learn(peer.ip(), &norm);
            *mac = Some(norm.clone());
            match cat.lookup(&norm) {
                Lookup::Node(n, b) => {
                    // A rollout that reached this node boots it into the rollout's build.
                    let b = super::api::rollout_build(st, &cat, &n.hostname, &n.role).unwrap_or(b);
                    tracing::info!(target: "kiln::serve", mac = %n.mac, host = %n.hostname, role = %b.role, build = %super::catalog::short(&b.build_id), "boot script");
                    script(ipxe::boot_script(&st.base_url, b, Some(n), &n.mac))
                }
                Lookup::Default(b) => {
                    tracing::info!(target: "kiln::serve", mac = %norm, role = %b.role, "boot script (default role)");
                    script(ipxe::boot_script(&st.base_url, b, None, &norm))
                }
                Lookup::Unprovisioned(reason) => {
                    tracing::warn!(target: "kiln::serve", mac = %norm, "not provisioned: {reason}");
                    script(ipxe::not_provisioned(&reason))
                }
            }
        }
        ["roles", role, id, name] => match cat.build(role, id).and_then(|b| b.files.get(*name)) {
            Some(blob) => file_response(req, st, blob, true, mac.clone()),
            None => text(
                StatusCode::NOT_FOUND,
                "no such file in a served role build\n",
            ),
        },
        ["nocloud", m, name] => {
            if !is_seed_file(name) {
                return text(StatusCode::NOT_FOUND, "not a NoCloud seed file\n");
            }
            match cat.seed(m) {
                Some(n) => {
                    st.learn(peer.ip(), &n.mac);
                    *mac = Some(n.mac.clone());
                    match n.seed.get(*name) {
                        Some(b) => full(StatusCode::OK, "text/plain; charset=utf-8", b.clone()),
                        // cloud-init 22.4 retries a missing vendor-data ten times, a second
                        // apiece (measured in the PXE boot test); empty means "none" to it.
                        None if *name == "vendor-data" => {
                            full(StatusCode::OK, "text/plain; charset=utf-8", Bytes::new())
                        }
                        None => text(
                            StatusCode::NOT_FOUND,
                            format!("{} has no {name}\n", n.hostname),
                        ),
                    }
                }
                None => text(StatusCode::NOT_FOUND, "no seed for this MAC\n"),
            }
        }
        ["ipxe", name] => match super::safe_path(&st.ipxe_dir, name)
            .ok()
            .and_then(|p| cat.pinned(&p))
        {
            Some(blob) => file_response(req, st, blob, false, mac.clone()),
            None => text(StatusCode::NOT_FOUND, "no such iPXE file\n"),
        },
        ["metrics"] => full(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            st.metrics.render(),
        ),
        ["status"] => {
            let mut v = cat.status();
            v["clients"] = serde_json::json!(st.clients_json());
            full(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
            )
        }
        ["healthz"] => text(StatusCode::OK, "ok\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `/boot.ipxe?mac=` with something that is not a MAC: a script that says so, without
/// repeating what was sent.
fn invalid_mac(peer: SocketAddr) -> Response<RespBody> {
    tracing::warn!(target: "kiln::serve", client = %peer.ip(), "boot script: invalid MAC in the request");
    script(ipxe::not_provisioned(
        "invalid MAC in the request (expected aa:bb:cc:dd:ee:ff or aa-bb-cc-dd-ee-ff)",
    ))
}

/// Request text for a log line: control characters (and backslashes) escaped, at most 512
/// characters.
pub fn log_safe(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 512 {
            out.push('…');
            break;
        }
        match c {
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
}

/// Whether an `If-None-Match` list matches `tag` (weak comparison, RFC 9110 13.1.2 / 8.8.3.2:
/// `W/` is ignored on either side; `*` matches any current representation).
pub fn if_none_match(list: &str, tag: &str) -> bool {
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let tag = opaque(tag);
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || (!t.is_empty() && opaque(t) == tag))
}

/// Whether an `If-Range` value matches `tag` (strong comparison: a weak tag never matches;
/// a date is not matched, so the whole file is sent).
pub fn if_range_matches(value: &str, tag: &str) -> bool {
    let v = value.trim();
    !v.starts_with("W/") && v == tag
}

fn script(s: String) -> Response<RespBody> {
    let mut r = full(StatusCode::OK, "text/plain; charset=utf-8", s);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A verified file with Content-Length, `Accept-Ranges`, single byte ranges, and
/// `ETag: "<sha256>"` with `If-None-Match` / `If-Range`.
fn file_response(
    req: &Request<Incoming>,
    st: &Arc<State>,
    blob: &Blob,
    immutable: bool,
    mac: Option<String>,
) -> Response<RespBody> {
    if blob.changed_on_disk() {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this file changed on disk since kiln serve verified it; see the server's log\n",
        );
    }
    let len = blob.len;
    let tag = format!("\"{}\"", blob.sha256);
    let hdr = |n: header::HeaderName| req.headers().get(n).and_then(|v| v.to_str().ok());
    if let Some(inm) = hdr(header::IF_NONE_MATCH) {
        if if_none_match(inm, &tag) {
            let mut r = full(
                StatusCode::NOT_MODIFIED,
                "application/octet-stream",
                Bytes::new(),
            );
            r.headers_mut().remove(header::CONTENT_LENGTH);
            r.headers_mut()
                .insert(header::ETAG, HeaderValue::from_str(&tag).unwrap());
            return r;
        }
    }
    let mut range_hdr = hdr(header::RANGE);
    if let Some(ir) = hdr(header::IF_RANGE) {
        if !if_range_matches(ir, &tag) {
            range_hdr = None; // representation changed (or unknowable): send it whole
        }
    }
    let (status, start, end) = match parse_range(range_hdr, len) {
        Ok(None) => (StatusCode::OK, 0, len),
        Ok(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b + 1),
        Err(Unsatisfiable) => {
            let mut r = text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable\n");
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{len}")).unwrap(),
            );
            return r;
        }
    };
    let body = FileBody {
        blob: blob.clone(),
        pos: start,
        end,
        pending: None,
        sent: 0,
        st: st.clone(),
        started: Instant::now(),
        path: req.uri().to_string(),
        mac,
        head: req.method() == Method::HEAD,
    };
    st.metrics.add("kiln_http_in_flight", &[], 1.0);
    let mut r = Response::new(body.boxed());
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1)).unwrap(),
        );
    }
    h.insert(header::ETAG, HeaderValue::from_str(&tag).unwrap());
    if immutable {
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=31536000, immutable"),
        );
    }
    h.insert("x-kiln-streamed", HeaderValue::from_static("1"));
    r
}

/// A byte range of a verified file, sent piece by piece: from the verified-piece cache, else
/// read and checked on the blocking pool. A piece that fails its check ends the body with an
/// error (hyper then cuts the connection). Logs and counts itself when dropped.
struct FileBody {
    blob: Blob,
    pos: u64,
    end: u64,
    pending: Option<JoinHandle<std::io::Result<Bytes>>>,
    sent: u64,
    st: Arc<State>,
    started: Instant,
    path: String,
    mac: Option<String>,
    head: bool,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.pending.is_none() {
            if self.pos >= self.end {
                return Poll::Ready(None);
            }
            let i = self.pos / PIECE;
            if let Some(p) = self.blob.cached_piece(i) {
                let b = self.slice(p);
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            let blob = self.blob.clone();
            self.pending = Some(tokio::task::spawn_blocking(move || blob.piece(i)));
        }
        let h = self.pending.as_mut().expect("pending read");
        match Pin::new(h).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.pending = None;
                match r {
                    Ok(Ok(p)) => {
                        let b = self.slice(p);
                        Poll::Ready(Some(Ok(Frame::data(b))))
                    }
                    Ok(Err(e)) => {
                        if e.kind() == std::io::ErrorKind::InvalidData {
                            self.st.metrics.inc("kiln_integrity_failures_total", &[]);
                        }
                        // Nothing more is sent: the body ends short of its Content-Length.
                        self.pos = self.end;
                        Poll::Ready(Some(Err(e)))
                    }
                    Err(e) => Poll::Ready(Some(Err(std::io::Error::other(e)))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pos >= self.end && self.pending.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.pos)
    }
}

use std::future::Future;

impl FileBody {
    /// The part of piece `p` (the one holding `pos`) that belongs to the body; advances.
    fn slice(&mut self, p: Bytes) -> Bytes {
        let at = (self.pos % PIECE) as usize;
        let n = ((self.end - self.pos) as usize).min(p.len().saturating_sub(at));
        let b = p.slice(at..at + n);
        self.pos += n as u64;
        self.sent += n as u64;
        b
    }
}

impl Drop for FileBody {
    fn drop(&mut self) {
        let st = &self.st;
        st.metrics.add("kiln_http_in_flight", &[], -1.0);
        if self.head {
            return;
        }
        let route = route_of(self.path.split('?').next().unwrap_or(""));
        st.metrics.add(
            "kiln_http_bytes_sent_total",
            &[("route", route)],
            self.sent as f64,
        );
        let complete = self.pos >= self.end;
        let secs = self.started.elapsed().as_secs_f64();
        tracing::info!(
            target: "kiln::serve::http",
            mac = self.mac.as_deref().unwrap_or("-"),
            path = %log_safe(&self.path),
            bytes = self.sent,
            complete,
            ms = (secs * 1000.0) as u64,
            mib_s = format!("{:.1}", self.sent as f64 / 1048576.0 / secs.max(1e-6)),
            "http file"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 100), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Ok(Some((0, 9))));
        assert_eq!(parse_range(Some("bytes=90-"), 100), Ok(Some((90, 99))));
        assert_eq!(parse_range(Some("bytes=-10"), 100), Ok(Some((90, 99))));
        assert_eq!(parse_range(Some("bytes=-1000"), 100), Ok(Some((0, 99))));
        assert_eq!(parse_range(Some("bytes=50-1000"), 100), Ok(Some((50, 99))));
        assert_eq!(parse_range(Some("bytes=100-"), 100), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=-0"), 100), Err(Unsatisfiable));
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Ok(None));
        assert_eq!(parse_range(Some("bytes=9-1"), 100), Ok(None));
        assert_eq!(parse_range(Some("items=0-1"), 100), Ok(None));
        assert_eq!(parse_range(Some("bytes=x-1"), 100), Ok(None));
        assert_eq!(parse_range(Some("bytes=0-"), 0), Err(Unsatisfiable));
        let huge = "99999999999999999999999";
        assert_eq!(
            parse_range(Some(&format!("bytes=0-{huge}")), 100),
            Ok(Some((0, 99)))
        );
        assert_eq!(
            parse_range(Some(&format!("bytes={huge}-")), 100),
            Err(Unsatisfiable)
        );
        assert_eq!(
            parse_range(Some(&format!("bytes=-{huge}")), 100),
            Ok(Some((0, 99)))
        );
    }

    #[test]
    fn etag_comparisons() {
        let t = "\"abc\"";
        assert!(if_none_match("W/\"abc\"", t));
        assert!(if_none_match("\"x\", W/\"abc\"", t));
        assert!(if_none_match("*", t));
        assert!(!if_none_match("\"x\", \"y\"", t));
        assert!(!if_none_match("", t));
        assert!(if_range_matches("\"abc\"", t));
        assert!(!if_range_matches("W/\"abc\"", t));
    }

    #[test]
    fn log_safe_escapes_control_characters() {
        assert_eq!(log_safe("a\nb\r\x1b[31m"), "a\\u{a}b\\u{d}\\u{1b}[31m");
        assert_eq!(log_safe(&"x".repeat(600)).chars().count(), 513);
    }

    #[test]
    fn slots_cap_per_client_and_in_total() {
        let s = Arc::new(Slots {
            max: 3,
            per_client: 2,
            open: Mutex::new((0, HashMap::new())),
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let x = s.take(a).unwrap();
        let _y = s.take(a).unwrap();
        assert_eq!(s.take(a).err(), Some("client_cap"));
        let _z = s.take(b).unwrap();
        assert_eq!(s.take(b).err(), Some("server_cap"));
        drop(x);
        assert!(s.take(b).is_ok());
    }

    #[test]
    fn rate_limited_holds_back_and_counts() {
        let r = RateLimited::new(Duration::from_secs(3600));
        assert_eq!(r.allow(), Some(0));
        assert_eq!(r.allow(), None);
        assert_eq!(r.allow(), None);
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            query_param(Some("a=1&mac=52%3A54%3a00%3A00%3A00%3A01"), "mac").as_deref(),
            Some("52:54:00:00:00:01")
        );
        assert_eq!(query_param(Some("mac=%zz"), "mac"), None);
        assert_eq!(query_param(None, "mac"), None);
    }
}
