//! A blocking client for the parts of the Proxmox VE API kiln uses.
//!
//! - Auth: `Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET` (tokens need no CSRF token).
//! - TLS: public roots, a CA file, or a pinned leaf certificate (SHA-256 of its DER); with a pin
//!   the handshake is aborted before any request is sent when the certificate differs.
//! - Retries: connection failures are retried for every method (nothing was sent); timeouts and
//!   5xx answers only for GET. A POST that may have taken effect is never repeated.
//! - Errors: PVE puts its message in the HTTP reason phrase and per-parameter messages in the
//!   body's `errors`; both are reported verbatim ([`ProxmoxError::Rejected`]).

use super::config::{format_fingerprint, Settings, Tls};
use super::ProxmoxError;
use anyhow::{anyhow, bail, Context, Result};
use reqwest::blocking::{Body, RequestBuilder, Response};
use reqwest::Method;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Cursor, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Attempts for a retryable request.
const ATTEMPTS: u32 = 4;
/// How long a task may run before kiln gives up waiting (the task keeps running in PVE).
const TASK_TIMEOUT: Duration = Duration::from_secs(4 * 3600);

/// The leaf pin and what the last handshake presented.
#[derive(Debug)]
struct Pin {
    want: [u8; 32],
    seen: Mutex<Option<[u8; 32]>>,
    source: String,
}

/// Accepts exactly one leaf certificate, by SHA-256; handshake signatures are still checked
/// with the provider's algorithms, so the peer must hold that certificate's key.
#[derive(Debug)]
struct PinVerifier {
    pin: Arc<Pin>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.pin.want {
            Ok(ServerCertVerified::assertion())
        } else {
            *self.pin.seen.lock().expect("pin lock") = Some(got);
            Err(rustls::Error::General(format!(
                "certificate fingerprint {} is not the pinned {}",
                format_fingerprint(&got),
                format_fingerprint(&self.pin.want)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The API client.
pub struct Client {
    http: reqwest::blocking::Client,
    api: url::Url,
    auth: String,
    pin: Option<Arc<Pin>>,
    timeout: Duration,
    /// Task polling interval.
    pub poll: Duration,
    /// Pause before the first retry (doubles each time).
    pub backoff: Duration,
    /// Draw progress bars on stderr (when it is a terminal).
    pub progress: bool,
}

/// How a finished task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskOutcome {
    pub upid: String,
    /// `OK` or `WARNINGS: n`.
    pub exitstatus: String,
}

/// A task that stopped with an error.
#[derive(Debug, thiserror::Error)]
#[error("Proxmox task {what} ({upid}) failed: {exitstatus}\n  task log (last lines):\n{log}")]
pub struct TaskFailed {
    pub what: String,
    pub upid: String,
    pub exitstatus: String,
    pub log: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Client {
    /// Builds a client from settings. Reads the CA file now; sends nothing.
    pub fn new(s: &Settings) -> Result<Client> {
        let mut b = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(None::<Duration>)
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .http1_only();
        let mut pin = None;
        match &s.tls {
            Tls::Public => {}
            Tls::CaFile(p) => {
                use rustls::pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                let pem =
                    crate::sys::util::read_small(p, crate::trust::limits::KEY_FILE, "CA file")?;
                let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("parsing the CA file {} (PEM)", p.display()))?;
                if certs.is_empty() {
                    bail!(ProxmoxError::Config {
                        source_: format!("ca_file {}", p.display()),
                        problem: "no PEM certificate in the file".into(),
                        fix: "copy /etc/pve/pve-root-ca.pem from a PVE host".into(),
                    });
                }
                for c in certs {
                    roots
                        .add(c)
                        .with_context(|| format!("adding a CA from {}", p.display()))?;
                }
                let cfg = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .context("TLS protocol versions")?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                b = b.use_preconfigured_tls(cfg);
            }
            Tls::Pinned { sha256, source } => {
                let p = Arc::new(Pin {
                    want: *sha256,
                    seen: Mutex::new(None),
                    source: source.clone(),
                });
                let cfg = rustls::ClientConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .context("TLS protocol versions")?
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(PinVerifier {
                        pin: p.clone(),
                        provider: provider(),
                    }))
                    .with_no_client_auth();
                b = b.use_preconfigured_tls(cfg);
                pin = Some(p);
            }
        }
        let http = b.build().context("building the HTTP client")?;
        Ok(Client {
            http,
            api: s.api.clone(),
            auth: format!("PVEAPIToken={}={}", s.token_id, s.token_secret),
            pin,
            timeout: s.timeout,
            poll: s.poll,
            backoff: Duration::from_millis(500),
            progress: true,
        })
    }

    /// The API URL of `segments` (each one percent-encoded as a path segment).
    pub fn url(&self, segments: &[&str]) -> url::Url {
        let mut u = self.api.clone();
        u.path_segments_mut()
            .expect("https URL")
            .pop_if_empty()
            .extend(segments);
        u
    }

    fn pin_failure(&self) -> Option<ProxmoxError> {
        let p = self.pin.as_ref()?;
        let seen = (*p.seen.lock().expect("pin lock"))?;
        Some(ProxmoxError::Fingerprint {
            url: format!(
                "{}://{}",
                self.api.scheme(),
                self.api.host_str().unwrap_or("?")
            ) + &self.api.port().map(|p| format!(":{p}")).unwrap_or_default(),
            seen: format_fingerprint(&seen),
            pinned: format_fingerprint(&p.want),
            source_: p.source.clone(),
        })
    }

    /// Sends a request built by `make` (called again for each retry) and decodes `data`.
    fn send(
        &self,
        method: &Method,
        shown: &str,
        make: &dyn Fn() -> Result<RequestBuilder>,
    ) -> Result<Value> {
        let idempotent = *method == Method::GET;
        let mut wait = self.backoff;
        let mut attempt = 1;
        loop {
            tracing::debug!(%method, path = shown, attempt, "PVE request");
            match make()?.header("Authorization", &self.auth).send() {
                Err(e) => {
                    if let Some(pe) = self.pin_failure() {
                        return Err(pe.into());
                    }
                    if let Some(tls) = tls_error(&e) {
                        // Deterministic: retrying cannot help.
                        return Err(ProxmoxError::Config {
                            source_: format!("TLS with {}", self.api),
                            problem: format!("the server's certificate was refused ({tls})"),
                            fix: "pin it with `fingerprint` (the `Fingerprint (sha256)` of \
                                  `pvenode cert info`) or trust its CA with `ca_file` \
                                  (/etc/pve/pve-root-ca.pem) in proxmox.toml"
                                .into(),
                        }
                        .into());
                    }
                    let retry = e.is_connect() || (idempotent && e.is_timeout());
                    if retry && attempt < ATTEMPTS {
                        tracing::warn!(%method, path = shown, "{e}; retrying in {wait:?}");
                        std::thread::sleep(wait);
                        wait *= 2;
                        attempt += 1;
                        continue;
                    }
                    return Err(anyhow!(e)).with_context(|| {
                        format!(
                            "{method} {shown} on {}: no answer from Proxmox (check url, network, TLS settings)",
                            self.api
                        )
                    });
                }
                Ok(r) if idempotent && r.status().is_server_error() && attempt < ATTEMPTS => {
                    tracing::warn!(%method, path = shown, status = %r.status(), "retrying in {wait:?}");
                    std::thread::sleep(wait);
                    wait *= 2;
                    attempt += 1;
                }
                Ok(r) => return decode(method, shown, r),
            }
        }
    }

    /// `GET` with query parameters.
    pub fn get(&self, segments: &[&str], query: &[(&str, &str)]) -> Result<Value> {
        let mut u = self.url(segments);
        if !query.is_empty() {
            u.query_pairs_mut().extend_pairs(query);
        }
        let shown = display_path(&u);
        self.send(&Method::GET, &shown, &|| {
            Ok(self.http.get(u.clone()).timeout(self.timeout))
        })
    }

    /// `POST`/`PUT`/`DELETE` with form parameters (sorted: a BTreeMap).
    pub fn call(
        &self,
        method: Method,
        segments: &[&str],
        params: &BTreeMap<String, String>,
    ) -> Result<Value> {
        let mut u = self.url(segments);
        let shown = display_path(&u);
        if method == Method::DELETE {
            if !params.is_empty() {
                u.query_pairs_mut().extend_pairs(params);
            }
            return self.send(&method, &shown, &|| {
                Ok(self.http.delete(u.clone()).timeout(self.timeout))
            });
        }
        self.send(&method, &shown, &|| {
            Ok(self
                .http
                .request(method.clone(), u.clone())
                .timeout(self.timeout)
                .form(params))
        })
    }

    /// `POST` with form parameters.
    pub fn post(&self, segments: &[&str], params: &BTreeMap<String, String>) -> Result<Value> {
        self.call(Method::POST, segments, params)
    }

    /// The PVE version as (major, minor, full string).
    pub fn version(&self) -> Result<(u32, u32, String)> {
        let v = self.get(&["version"], &[])?;
        let full = v["version"]
            .as_str()
            .context("GET /version: no `version` in the answer")?
            .to_string();
        let mut it = full.split(['.', '-']);
        let major = it.next().and_then(|x| x.parse().ok());
        let minor = it.next().and_then(|x| x.parse().ok());
        match (major, minor) {
            (Some(a), Some(b)) => Ok((a, b, full)),
            _ => bail!("GET /version: cannot parse version {full:?}"),
        }
    }

    /// Uploads `file` into `storage` on `node` as `filename` (streamed multipart: `content`,
    /// `checksum-algorithm`, `checksum`, then the file part last, with Content-Length, as
    /// pve-http-server requires). Returns the UPID of the import task.
    pub fn upload(
        &self,
        node: &str,
        storage: &str,
        content: &str,
        file: &Path,
        filename: &str,
        sha256: &str,
    ) -> Result<String> {
        let len = std::fs::metadata(file)
            .with_context(|| format!("reading {}", file.display()))?
            .len();
        let boundary = format!("kiln-{}", &sha256[..32.min(sha256.len())]);
        let mut head = String::new();
        for (k, v) in [
            ("content", content),
            ("checksum-algorithm", "sha256"),
            ("checksum", sha256),
        ] {
            head += &format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
            );
        }
        head += &format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"filename\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        );
        let tail = format!("\r\n--{boundary}--\r\n");
        let total = head.len() as u64 + len + tail.len() as u64;
        let u = self.url(&["nodes", node, "storage", storage, "upload"]);
        let shown = display_path(&u);
        let bar = crate::trust::sign::byte_bar(
            len,
            format!("uploading {filename}"),
            self.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        );
        let r = self.send(&Method::POST, &shown, &|| {
            let f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
            bar.set_position(0);
            let reader = Cursor::new(head.clone().into_bytes())
                .chain(bar.clone().wrap_read(f).take(len))
                .chain(Cursor::new(tail.clone().into_bytes()));
            Ok(self
                .http
                .post(u.clone())
                .header(
                    "Content-Type",
                    format!("multipart/form-data; boundary={boundary}"),
                )
                .body(Body::sized(reader, total)))
        });
        bar.finish_and_clear();
        upid(r?, &shown)
    }

    /// Waits for a task to stop; `OK` and `WARNINGS: n` succeed, anything else is a
    /// [`TaskFailed`] carrying the tail of the task log.
    pub fn wait_task(&self, upid: &str, what: &str) -> Result<TaskOutcome> {
        let node = upid
            .split(':')
            .nth(1)
            .filter(|n| !n.is_empty())
            .with_context(|| format!("{upid:?} is not a UPID"))?;
        let start = Instant::now();
        let spinner = if self.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let s = indicatif::ProgressBar::new_spinner();
            s.set_message(format!("waiting for {what}"));
            s.enable_steady_tick(Duration::from_millis(120));
            s
        } else {
            indicatif::ProgressBar::hidden()
        };
        let r = loop {
            let st = self.get(&["nodes", node, "tasks", upid, "status"], &[])?;
            if st["status"].as_str() == Some("stopped") {
                let exit = st["exitstatus"].as_str().unwrap_or("unknown").to_string();
                if exit == "OK" || exit.starts_with("WARNINGS") {
                    if exit != "OK" {
                        tracing::warn!(task = what, %upid, "{exit}");
                    }
                    break Ok(TaskOutcome {
                        upid: upid.to_string(),
                        exitstatus: exit,
                    });
                }
                let log = self.task_log_tail(node, upid, 15);
                break Err(TaskFailed {
                    what: what.to_string(),
                    upid: upid.to_string(),
                    exitstatus: exit,
                    log,
                }
                .into());
            }
            if start.elapsed() > TASK_TIMEOUT {
                break Err(anyhow!(
                    "Proxmox task {what} ({upid}) still running after {TASK_TIMEOUT:?}; kiln stopped waiting (the task goes on: see the PVE task log)"
                ));
            }
            std::thread::sleep(self.poll);
        };
        spinner.finish_and_clear();
        r
    }

    /// The last `n` lines of a task log, indented; a note if it cannot be read.
    pub fn task_log_tail(&self, node: &str, upid: &str, n: usize) -> String {
        match self.get(
            &["nodes", node, "tasks", upid, "log"],
            &[("start", "0"), ("limit", "100000")],
        ) {
            Ok(Value::Array(lines)) => {
                let texts: Vec<String> = lines
                    .iter()
                    .filter_map(|l| l["t"].as_str().map(|t| format!("    {t}")))
                    .collect();
                texts[texts.len().saturating_sub(n)..].join("\n")
            }
            Ok(_) => "    (no log)".into(),
            Err(e) => format!("    (task log unavailable: {e:#})"),
        }
    }
}

/// The TLS error behind a failed request, if that is what it was.
fn tls_error(e: &reqwest::Error) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if let Some(t) = x.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        // io::Error::source() skips the error it wraps: step into it with get_ref().
        cur = match x.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|i| i as &(dyn std::error::Error + 'static)),
            None => x.source(),
        };
    }
    None
}

/// The UPID a task-starting call returns.
pub fn upid(v: Value, shown: &str) -> Result<String> {
    match v.as_str() {
        Some(s) if s.starts_with("UPID:") => Ok(s.to_string()),
        _ => bail!("{shown}: expected a task id (UPID) from Proxmox, got {v}"),
    }
}

fn display_path(u: &url::Url) -> String {
    u.path()
        .strip_prefix("/api2/json")
        .unwrap_or(u.path())
        .to_string()
}

fn decode(method: &Method, shown: &str, r: Response) -> Result<Value> {
    let status = r.status();
    let reason = r
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned())
        .or_else(|| status.canonical_reason().map(String::from))
        .unwrap_or_default();
    let body = r
        .bytes()
        .with_context(|| format!("{method} {shown}: reading the answer"))?;
    if status.is_success() {
        let v: Value = serde_json::from_slice(&body)
            .with_context(|| format!("{method} {shown}: the answer is not JSON"))?;
        return Ok(v.get("data").cloned().unwrap_or(Value::Null));
    }
    let errors: BTreeMap<String, String> = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("errors").and_then(Value::as_object).cloned())
        .map(|o| {
            o.into_iter()
                .map(|(k, v)| (k, v.as_str().map(String::from).unwrap_or(v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let fix = match status.as_u16() {
        401 => "check token_id and the secret in token_secret_file (`pveum user token list USER`); the token may have expired or been removed".to_string(),
        403 => "grant the token the privilege named above on that path, e.g. `pveum acl modify /storage/STORAGE --tokens 'USER@REALM!TOKENID' --roles PVEDatastoreAdmin` (a privilege-separated token needs its own ACL), see docs/guide/proxmox.md".to_string(),
        400 => "the named parameter was rejected; it comes from proxmox.toml, the flags or the inventory".to_string(),
        404 => "check node and storage names (`pvesh get /nodes`, `pvesm status`)".to_string(),
        _ => "see the Proxmox message above (and the PVE host's journal)".to_string(),
    };
    Err(ProxmoxError::Rejected {
        method: method.to_string(),
        path: shown.to_string(),
        status: status.as_u16(),
        message: reason.trim().to_string(),
        errors,
        fix,
    }
    .into())
}
