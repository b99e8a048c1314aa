//! HTTP: per-MAC iPXE scripts, role build files (Content-Length, Range, ETag = sha256), NoCloud
//! seeds, iPXE binaries for UEFI HTTP boot, `/metrics` and `/status`.

use super::catalog::{Lookup, SEED_FILES};
use super::{ipxe, State};
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

pub type RespBody = BoxBody<Bytes, std::io::Error>;

/// Bytes read per chunk of a file body.
const CHUNK: u64 = 256 * 1024;

/// Accepts connections until `shutdown` flips, then lets open responses finish (up to
/// `grace`) before returning.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
    grace: std::time::Duration,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let (stream, peer) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!("http: accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let st = state.clone();
                let mut sd = shutdown.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(handle(req, peer, &st).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(30))
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    let mut stopping = *sd.borrow();
                    if stopping {
                        conn.as_mut().graceful_shutdown();
                    }
                    loop {
                        tokio::select! {
                            r = conn.as_mut() => {
                                if let Err(e) = r {
                                    tracing::debug!("http {peer}: {e}");
                                }
                                break;
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
    let parse = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
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
    let resp = if req.method() != Method::GET && req.method() != Method::HEAD {
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
            path = %req.uri(),
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
                return script(ipxe::chain_script(&st.base_url));
            };
            let norm = crate::project::recipe::normalize_mac(&m);
            if let Some(n) = &norm {
                st.learn(peer.ip(), n);
                *mac = Some(n.clone());
            }
            match cat.lookup(&m) {
                Lookup::Node(n, b) => {
                    tracing::info!(target: "kiln::serve", mac = %n.mac, host = %n.hostname, role = %b.role, build = %super::catalog::short(&b.build_id), "boot script");
                    script(ipxe::boot_script(&st.base_url, b, Some(n), &n.mac))
                }
                Lookup::Default(b) => {
                    let m = norm.unwrap_or_default();
                    tracing::info!(target: "kiln::serve", mac = %m, role = %b.role, "boot script (default role)");
                    script(ipxe::boot_script(&st.base_url, b, None, &m))
                }
                Lookup::Unprovisioned(reason) => {
                    tracing::warn!(target: "kiln::serve", mac = %m, "not provisioned: {reason}");
                    script(ipxe::not_provisioned(&reason))
                }
            }
        }
        ["roles", role, id, name] => match cat.build(role, id).and_then(|b| b.files.get(*name)) {
            Some(blob) => file_response(
                req,
                st,
                blob.file.clone(),
                blob.len,
                Some(&blob.sha256),
                true,
                mac.clone(),
            ),
            None => text(
                StatusCode::NOT_FOUND,
                format!("no {name} in a served {role} build {id}\n"),
            ),
        },
        ["nocloud", m, name] => {
            if !SEED_FILES.contains(name) {
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
                None => text(StatusCode::NOT_FOUND, format!("no seed for {m}\n")),
            }
        }
        ["ipxe", name] => match super::safe_path(&st.ipxe_dir, name) {
            Ok(p) => match File::open(&p).and_then(|f| f.metadata().map(|m| (f, m.len()))) {
                Ok((f, len)) => file_response(req, st, Arc::new(f), len, None, false, mac.clone()),
                Err(_) => text(StatusCode::NOT_FOUND, format!("no {name}\n")),
            },
            Err(_) => text(StatusCode::NOT_FOUND, format!("no {name}\n")),
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

fn script(s: String) -> Response<RespBody> {
    let mut r = full(StatusCode::OK, "text/plain; charset=utf-8", s);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A file with Content-Length, `Accept-Ranges`, single byte ranges, and — for signed files —
/// `ETag: "<sha256>"` with `If-None-Match` / `If-Range`.
fn file_response(
    req: &Request<Incoming>,
    st: &Arc<State>,
    file: Arc<File>,
    len: u64,
    sha256: Option<&str>,
    immutable: bool,
    mac: Option<String>,
) -> Response<RespBody> {
    let etag = sha256.map(|s| format!("\"{s}\""));
    let hdr = |n: header::HeaderName| req.headers().get(n).and_then(|v| v.to_str().ok());
    if let (Some(tag), Some(inm)) = (&etag, hdr(header::IF_NONE_MATCH)) {
        if inm.split(',').any(|t| t.trim() == tag || t.trim() == "*") {
            let mut r = full(
                StatusCode::NOT_MODIFIED,
                "application/octet-stream",
                Bytes::new(),
            );
            r.headers_mut().remove(header::CONTENT_LENGTH);
            r.headers_mut()
                .insert(header::ETAG, HeaderValue::from_str(tag).unwrap());
            return r;
        }
    }
    let mut range_hdr = hdr(header::RANGE);
    if let Some(ir) = hdr(header::IF_RANGE) {
        if etag.as_deref() != Some(ir.trim()) {
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
        file,
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
    if let Some(tag) = &etag {
        h.insert(header::ETAG, HeaderValue::from_str(tag).unwrap());
    }
    if immutable {
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=31536000, immutable"),
        );
    }
    h.insert("x-kiln-streamed", HeaderValue::from_static("1"));
    r
}

/// A byte range of an open file, read in chunks on the blocking pool with `pread` (so
/// concurrent responses never share a file offset). Logs and counts itself when dropped.
struct FileBody {
    file: Arc<File>,
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
            let (file, pos) = (self.file.clone(), self.pos);
            let n = (self.end - pos).min(CHUNK) as usize;
            self.pending = Some(tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n];
                let mut got = 0;
                while got < n {
                    match file.read_at(&mut buf[got..], pos + got as u64) {
                        Ok(0) => {
                            return Err(std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "file shrank while being served",
                            ))
                        }
                        Ok(k) => got += k,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(Bytes::from(buf))
            }));
        }
        let h = self.pending.as_mut().expect("pending read");
        match Pin::new(h).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.pending = None;
                match r {
                    Ok(Ok(b)) => {
                        self.pos += b.len() as u64;
                        self.sent += b.len() as u64;
                        Poll::Ready(Some(Ok(Frame::data(b))))
                    }
                    Ok(Err(e)) => Poll::Ready(Some(Err(e))),
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
            path = %self.path,
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
