//! Artifact fetcher: downloads pinned artifacts (k3s binary, air-gap images, charts, iPXE, …) into a
//! content-addressed cache.
//!
//! Every artifact is pinned by its sha256. A verified copy lives at `<cache>/sha256/<hex>`; nothing
//! else is ever stored under that name. Downloads go to `<cache>/sha256/.partial-<hex>` first, are
//! resumed with an HTTP `Range` request after an interruption, are retried with exponential backoff
//! on transient failures (connection errors, timeouts, HTTP 5xx and 429), and are verified before
//! being fsynced and renamed into place. A download whose digest does not match the pin is discarded.
//!
//! Supported URL schemes: `http://`, `https://` and `file://` (a local copy, for air-gapped sites).
//! In offline mode only the cache is used. A mirror (see [`effective_url`]) can stand in for every
//! upstream host; it defaults to the `KILN_ARTIFACT_MIRROR` environment variable.
//!
//! Processes sharing one cache serialize their downloads with an advisory lock (`flock`) on the
//! `<cache>/sha256` directory; cache hits are served without taking it.

use crate::sys::util::{sha256_file, sync_path};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::blocking::{Client, Response};
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable naming a mirror base URL that replaces every artifact's upstream host.
pub const MIRROR_ENV: &str = "KILN_ARTIFACT_MIRROR";

/// Default number of retries after the first attempt.
const DEFAULT_RETRIES: u32 = 5;
/// Default first backoff delay; doubled after every failed attempt.
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Upper bound of one backoff delay.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Default timeout for connecting and for each read (an idle timeout, not a total one).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Copy buffer size.
const BUF_SIZE: usize = 256 * 1024;

/// One pinned artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Human-readable name used in messages (e.g. `k3s`).
    pub name: String,
    /// Upstream URL (`http://`, `https://` or `file://`).
    pub url: String,
    /// Expected sha256 of the content: 64 lowercase hex digits.
    pub sha256: String,
    /// Expected size in bytes, if pinned; checked in addition to the digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// Downloads artifacts into a content-addressed cache (`<cache_dir>/sha256/<hex>`).
///
/// Built with [`Fetcher::new`] and the builder methods, e.g.
/// `Fetcher::new(&cache).offline(args.offline).quiet(args.json)`.
#[derive(Debug, Clone)]
pub struct Fetcher {
    cache_dir: PathBuf,
    offline: bool,
    mirror: Option<String>,
    retries: u32,
    timeout: Duration,
    quiet: bool,
    backoff_base: Duration,
}

/// Outcome of one download attempt that did not succeed.
enum AttemptError {
    /// Transient: worth another attempt after a backoff delay.
    Retry(anyhow::Error),
    /// Permanent: report it right away.
    Fatal(anyhow::Error),
}

/// Result of checking a file against an artifact's pin.
enum Verdict {
    Match,
    Mismatch { got: String, size: u64 },
}

impl Fetcher {
    /// A fetcher using `cache_dir` (artifacts live in `cache_dir/sha256/`), online, with the mirror
    /// taken from `KILN_ARTIFACT_MIRROR` when that is set and non-empty, 5 retries, a 30 s
    /// connect/read timeout, and a progress bar on stderr.
    pub fn new(cache_dir: &Path) -> Self {
        let mirror = std::env::var(MIRROR_ENV)
            .ok()
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty());
        Fetcher {
            cache_dir: cache_dir.to_path_buf(),
            offline: false,
            mirror,
            retries: DEFAULT_RETRIES,
            timeout: DEFAULT_TIMEOUT,
            quiet: false,
            backoff_base: DEFAULT_BACKOFF_BASE,
        }
    }

    /// Offline mode: only the cache is used; a miss is an error.
    pub fn offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Sets (or, with `None`, clears) the mirror base URL; see [`effective_url`].
    #[cfg(any(test, feature = "testing"))]
    pub fn mirror(mut self, mirror: Option<String>) -> Self {
        self.mirror = mirror.filter(|m| !m.trim().is_empty());
        self
    }

    /// Number of retries after the first attempt for transient failures.
    #[cfg(any(test, feature = "testing"))]
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Timeout for connecting and for each read from the server.
    #[cfg(any(test, feature = "testing"))]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Hides the progress bar.
    #[cfg(any(test, feature = "testing"))]
    pub fn quiet(mut self, quiet: bool) -> Self {
        self.quiet = quiet;
        self
    }

    /// First backoff delay between attempts (doubled each time, capped at 30 s). Default 0.5 s.
    #[cfg(any(test, feature = "testing"))]
    pub fn backoff_base(mut self, base: Duration) -> Self {
        self.backoff_base = base;
        self
    }

    /// The directory holding verified artifacts: `<cache_dir>/sha256`.
    pub fn store_dir(&self) -> PathBuf {
        crate::project::layout::Cache::new(&self.cache_dir).artifacts()
    }

    /// Where the artifact with this sha256 lives once fetched: `<cache_dir>/sha256/<hex>`.
    pub fn cached_path(&self, sha256: &str) -> PathBuf {
        self.store_dir().join(sha256)
    }

    /// Where an unfinished download of this sha256 is kept: `<cache_dir>/sha256/.partial-<hex>`.
    pub fn partial_path(&self, sha256: &str) -> PathBuf {
        self.store_dir().join(format!(".partial-{sha256}"))
    }

    /// Returns the path of the verified cached file, downloading it first if needed.
    ///
    /// A cached file is re-verified on every call; a corrupt entry is removed and fetched again
    /// (in offline mode that is an error).
    pub fn fetch(&self, a: &Artifact) -> Result<PathBuf> {
        validate_sha256(&a.sha256).with_context(|| format!("artifact {}", a.name))?;
        let url = effective_url(&a.url, self.mirror.as_deref());
        check_scheme(&url).with_context(|| format!("artifact {}", a.name))?;
        let path = self.cached_path(&a.sha256);

        // Fast path: a verified entry needs no lock.
        if path.is_file() && matches!(verify(&path, a)?, Verdict::Match) {
            return Ok(path);
        }

        let store = self.store_dir();
        fs::create_dir_all(&store)
            .with_context(|| format!("creating the artifact cache {}", store.display()))?;
        let _lock = lock_dir(&store)?;

        // Re-check under the lock: another process may have fetched (or broken) it meanwhile.
        if path.is_file() {
            match verify(&path, a)? {
                Verdict::Match => return Ok(path),
                Verdict::Mismatch { got, size } => {
                    tracing::warn!(
                        "cache entry {} for {} is corrupt (sha256 {got}, {size} bytes); removing it",
                        path.display(),
                        a.name
                    );
                    fs::remove_file(&path)
                        .with_context(|| format!("removing corrupt {}", path.display()))?;
                    if self.offline {
                        bail!(
                            "cache entry for {} is corrupt and --offline forbids refetching it \
                             (expected sha256 {}, found {got}; the entry {} was removed). \
                             Run once without --offline, or copy a good copy of {} to that path",
                            a.name,
                            a.sha256,
                            path.display(),
                            a.url
                        );
                    }
                }
            }
        }

        if self.offline {
            bail!(
                "artifact {} is not in the cache and --offline forbids downloading it\n  \
                 url:    {}\n  sha256: {}\n  cache:  {}\n\
                 To fix: run once without --offline to fill the cache; or copy the file to the \
                 cache path above (its sha256 must match); or, without --offline, set {MIRROR_ENV} \
                 to a reachable mirror (http:// or file://)",
                a.name,
                a.url,
                a.sha256,
                path.display()
            );
        }

        let partial = self.partial_path(&a.sha256);
        if url.starts_with("file:") {
            copy_local(a, &url, &partial)?;
        } else {
            self.download_with_retries(a, &url, &partial)?;
        }

        match verify(&partial, a)? {
            Verdict::Match => {}
            Verdict::Mismatch { got, size } => {
                remove_if_exists(&partial)?;
                bail!(
                    "{}: sha256 mismatch for {url}: expected {}{}, got {got} ({size} bytes); the file \
                     was discarded. If upstream re-published the artifact, update the pin in recipes/ \
                     (sha256 = \"{got}\", size = {size})",
                    a.name,
                    a.sha256,
                    a.size.map(|s| format!(" ({s} bytes)")).unwrap_or_default()
                );
            }
        }
        sync_path(&partial)?;
        fs::rename(&partial, &path).with_context(|| {
            format!(
                "moving {} into place at {}",
                partial.display(),
                path.display()
            )
        })?;
        sync_path(&store)?;
        tracing::info!("fetched {} into {}", a.name, path.display());
        Ok(path)
    }

    /// Downloads `url` into `partial`, retrying transient failures with exponential backoff.
    fn download_with_retries(&self, a: &Artifact, url: &str, partial: &Path) -> Result<()> {
        let client = Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        let attempts = self.retries.saturating_add(1);
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            match self.try_download(&client, a, url, partial) {
                Ok(()) => return Ok(()),
                Err(AttemptError::Fatal(e)) => return Err(e),
                Err(AttemptError::Retry(e)) => {
                    if attempt >= attempts {
                        return Err(e.context(format!(
                            "fetching {} from {url} failed after {attempt} attempt(s); if this machine cannot reach it, \
                             set {MIRROR_ENV}=<base URL of a mirror>, or copy the file (sha256 {}) to {} and build with --offline",
                            a.name,
                            a.sha256,
                            self.cached_path(&a.sha256).display()
                        )));
                    }
                    let delay = backoff_delay(self.backoff_base, attempt - 1);
                    tracing::warn!(
                        "fetching {} (attempt {attempt}/{attempts}) failed: {e:#}; retrying in {delay:?}",
                        a.name
                    );
                    std::thread::sleep(delay);
                }
            }
        }
    }

    /// One HTTP attempt: resumes from an existing partial file when there is one.
    fn try_download(
        &self,
        client: &Client,
        a: &Artifact,
        url: &str,
        partial: &Path,
    ) -> std::result::Result<(), AttemptError> {
        let fatal = AttemptError::Fatal;
        let mut offset = match fs::metadata(partial) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => {
                return Err(fatal(
                    anyhow!(e).context(format!("inspecting {}", partial.display())),
                ))
            }
        };
        if let Some(size) = a.size {
            if offset > size {
                // Longer than the artifact can be: start over.
                offset = 0;
                truncate(partial).map_err(fatal)?;
            }
        }

        let mut req = client.get(url);
        if offset > 0 {
            req = req.header(RANGE, format!("bytes={offset}-"));
        }
        let resp = req.send().map_err(|e| classify_send_error(e, a, url))?;
        let status = resp.status();

        let append = match status {
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                let (start, _) = content_range(&resp).ok_or_else(|| {
                    AttemptError::Retry(anyhow!(
                        "{url} answered 206 without a usable Content-Range header"
                    ))
                })?;
                if start != offset {
                    truncate(partial).map_err(fatal)?;
                    return Err(AttemptError::Retry(anyhow!(
                        "{url} answered a range starting at byte {start} instead of {offset}; \
                         restarting from zero"
                    )));
                }
                true
            }
            StatusCode::OK => false,
            StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
                let total = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes */"))
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if total == Some(offset) {
                    // The partial file already holds everything; verification decides.
                    return Ok(());
                }
                truncate(partial).map_err(fatal)?;
                return Err(AttemptError::Retry(anyhow!(
                    "{url} refused to resume at byte {offset} (HTTP 416); restarting from zero"
                )));
            }
            s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
                return Err(AttemptError::Retry(anyhow!("HTTP {s} from {url}")));
            }
            s => {
                return Err(fatal(anyhow!(
                    "{}: HTTP {s} from {url}{}",
                    a.name,
                    if url != a.url {
                        format!(" (mirror for {})", a.url)
                    } else {
                        String::new()
                    }
                )));
            }
        };
        let start = if append { offset } else { 0 };

        // Total size as announced by the server, checked against the pin before reading the body.
        let announced = if append {
            content_range(&resp).and_then(|(_, total)| total)
        } else {
            resp.headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
        };
        if let (Some(size), Some(total)) = (a.size, announced) {
            if size != total {
                remove_if_exists(partial).map_err(fatal)?;
                return Err(fatal(anyhow!(
                    "{}: size mismatch for {url}: the pin says {size} bytes but the server \
                     announces {total}; nothing was kept. If upstream re-published the artifact, \
                     update the pin in recipes/",
                    a.name
                )));
            }
        }

        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(partial)
            .with_context(|| format!("opening {}", partial.display()))
            .map_err(fatal)?;

        let pb = self.progress_bar(&a.name, announced.or(a.size), start);
        let result = copy_body(resp, &mut file, a, url, partial, start, &pb);
        pb.finish_and_clear();
        result?;
        file.sync_all()
            .with_context(|| format!("syncing {}", partial.display()))
            .map_err(fatal)?;
        Ok(())
    }

    fn progress_bar(&self, name: &str, total: Option<u64>, position: u64) -> ProgressBar {
        let target = if self.quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        let pb = ProgressBar::with_draw_target(total, target);
        let template = if total.is_some() {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "{msg} {spinner} {bytes} {bytes_per_sec}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(format!("fetching {name}"));
        pb.set_position(position);
        pb
    }
}

/// Streams the response body into the partial file. Read errors are transient (the bytes written
/// so far stay for a resume); write errors and exceeding the pinned size are not.
fn copy_body(
    mut resp: Response,
    file: &mut File,
    a: &Artifact,
    url: &str,
    partial: &Path,
    start: u64,
    pb: &ProgressBar,
) -> std::result::Result<(), AttemptError> {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut pos = start;
    loop {
        let n = match resp.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(AttemptError::Retry(
                    anyhow!(e).context(format!("reading {url} (interrupted after {pos} bytes)")),
                ))
            }
        };
        pos += n as u64;
        if let Some(size) = a.size {
            if pos > size {
                remove_if_exists(partial).map_err(AttemptError::Fatal)?;
                return Err(AttemptError::Fatal(anyhow!(
                    "{}: size mismatch for {url}: the pin says {size} bytes but the server sent \
                     more; the file was discarded. If upstream re-published the artifact, update \
                     the pin in recipes/",
                    a.name
                )));
            }
        }
        file.write_all(&buf[..n])
            .with_context(|| format!("writing {}", partial.display()))
            .map_err(AttemptError::Fatal)?;
        pb.set_position(pos);
    }
}

/// Copies a `file://` URL into the partial file.
fn copy_local(a: &Artifact, url: &str, partial: &Path) -> Result<()> {
    let src = Url::parse(url)
        .ok()
        .and_then(|u| u.to_file_path().ok())
        .with_context(|| format!("{}: {url} is not a valid absolute file:// URL", a.name))?;
    // Checked before open (a FIFO would block it): a device such as /dev/zero would be copied
    // until the disk is full before the digest could refuse it.
    let meta = std::fs::metadata(&src)
        .with_context(|| format!("{}: opening {} (from {url})", a.name, src.display()))?;
    if !meta.is_file() {
        bail!(
            "{}: {} (from {url}) is a {}, not a regular file",
            a.name,
            src.display(),
            crate::sys::util::file_kind(&meta)
        );
    }
    let mut input = File::open(&src)
        .with_context(|| format!("{}: opening {} (from {url})", a.name, src.display()))?;
    let mut out =
        File::create(partial).with_context(|| format!("creating {}", partial.display()))?;
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(anyhow!(e).context(format!("reading {}", src.display()))),
        };
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {}", partial.display()))?;
    }
    out.sync_all()
        .with_context(|| format!("syncing {}", partial.display()))?;
    Ok(())
}

/// Rewrites `url` to go through `mirror`, if one is given.
///
/// The scheme and authority (host, port, user info) of `url` are replaced by the mirror base URL;
/// the path and query are kept verbatim (percent-encoding included). A trailing `/` on the mirror
/// is ignored. For example, mirror `http://10.0.0.5:8080/mirror` turns
/// `https://github.com/k3s-io/k3s/releases/download/v1.31.4%2Bk3s1/k3s` into
/// `http://10.0.0.5:8080/mirror/k3s-io/k3s/releases/download/v1.31.4%2Bk3s1/k3s`.
///
/// The mirror may itself be a `file://` URL (a directory tree laid out by upstream path).
/// `file://` artifact URLs are already local and are never rewritten; neither is a string that is
/// not an absolute URL. `None` or an empty mirror returns `url` unchanged.
pub fn effective_url(url: &str, mirror: Option<&str>) -> String {
    let mirror = match mirror.map(str::trim) {
        Some(m) if !m.is_empty() => m.trim_end_matches('/'),
        _ => return url.to_string(),
    };
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    if url[..scheme_end].eq_ignore_ascii_case("file") {
        return url.to_string();
    }
    let after = &url[scheme_end + 3..];
    let rest = match after.find(['/', '?', '#']) {
        Some(i) => &after[i..],
        None => "",
    };
    // Fragments are never sent to a server.
    let rest = rest.split('#').next().unwrap_or_default();
    if rest.starts_with('/') {
        format!("{mirror}{rest}")
    } else {
        format!("{mirror}/{rest}")
    }
}

/// Checks that `s` is 64 lowercase hex digits.
pub fn validate_sha256(s: &str) -> Result<()> {
    if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Ok(());
    }
    let hint = if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        " (use lowercase hex digits)"
    } else if s.starts_with("sha256:") {
        " (drop the \"sha256:\" prefix)"
    } else {
        ""
    };
    bail!(
        "invalid sha256 {s:?}: expected 64 lowercase hex digits, got {} characters{hint}",
        s.chars().count()
    )
}

/// Rejects URL schemes the fetcher cannot handle.
fn check_scheme(url: &str) -> Result<()> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http" | "https" | "file") => Ok(()),
        _ => bail!("unsupported URL {url:?}: expected http://, https:// or file://"),
    }
}

/// Hashes `path` and compares it with the artifact's pin.
fn verify(path: &Path, a: &Artifact) -> Result<Verdict> {
    let (got, size) = sha256_file(path)?;
    if got != a.sha256 {
        return Ok(Verdict::Mismatch { got, size });
    }
    if let Some(want) = a.size {
        if want != size {
            bail!(
                "{}: the pin says {want} bytes but the file with sha256 {got} has {size} bytes; \
                 fix the size in recipes/",
                a.name
            );
        }
    }
    Ok(Verdict::Match)
}

/// Takes an exclusive advisory lock on a directory; released when the handle is dropped.
fn lock_dir(dir: &Path) -> Result<File> {
    let f = File::open(dir).with_context(|| format!("opening {} to lock it", dir.display()))?;
    f.lock()
        .with_context(|| format!("locking the artifact cache {}", dir.display()))?;
    Ok(f)
}

/// Parses `Content-Range: bytes <start>-<end>/<total or *>` into (start, total).
fn content_range(resp: &Response) -> Option<(u64, Option<u64>)> {
    let v = resp.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let v = v.trim().strip_prefix("bytes ")?;
    let (range, total) = v.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let total = total.trim().parse().ok();
    Some((start, total))
}

/// Send errors are transient unless the request itself could not be built or redirects looped.
fn classify_send_error(e: reqwest::Error, a: &Artifact, url: &str) -> AttemptError {
    let fatal = e.is_builder() || e.is_redirect();
    let err = anyhow!(e).context(format!("requesting {url} for {}", a.name));
    if fatal {
        AttemptError::Fatal(err)
    } else {
        AttemptError::Retry(err)
    }
}

/// `base * 2^n`, capped at [`MAX_BACKOFF`].
fn backoff_delay(base: Duration, n: u32) -> Duration {
    base.saturating_mul(2u32.saturating_pow(n.min(31)))
        .min(MAX_BACKOFF)
}

fn truncate(path: &Path) -> Result<()> {
    File::create(path)
        .map(drop)
        .with_context(|| format!("truncating {}", path.display()))
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow!(e).context(format!("removing {}", path.display()))),
    }
}

/// Pinned artifacts (name, sha256, url) the role's build fetches.
pub(crate) fn pinned_artifacts(
    r: &crate::pipeline::resolve::Resolved,
) -> Vec<(String, String, String)> {
    let mut v: Vec<(String, String, String)> = r
        .recipe
        .debian
        .debs
        .iter()
        .map(|d| {
            (
                format!(
                    "deb/{}",
                    crate::project::recipe::Debian::deb_file_name(&d.url)
                ),
                d.sha256.clone(),
                d.url.clone(),
            )
        })
        .collect();
    if !r.recipe.k3s.mode.runs_k3s() {
        return v;
    }
    if let Some(k) = &r.cluster.k3s {
        v.push(("k3s".into(), k.binary.sha256.clone(), k.binary.url.clone()));
        if let Some(a) = &k.airgap_images {
            v.push(("k3s-airgap-images".into(), a.sha256.clone(), a.url.clone()));
        }
    }
    let sealed = r
        .cluster
        .sealed_secrets
        .as_ref()
        .filter(|_| r.recipe.k3s.mode.is_server());
    if let Some(ss) = sealed {
        if let Some(c) = &ss.chart {
            v.push((
                "sealed-secrets-chart".into(),
                c.sha256.clone(),
                c.url.clone(),
            ));
        }
    }
    for c in &r.recipe.k3s.charts {
        v.push((format!("chart-{}", c.name), c.sha256.clone(), c.url.clone()));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::util::sha256_hex;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    /// One request as seen by the test server.
    #[derive(Debug, Clone)]
    struct Seen {
        path: String,
        range: Option<String>,
    }

    /// Faults and content of the test server.
    #[derive(Default)]
    struct State {
        files: HashMap<String, Vec<u8>>,
        seen: Vec<Seen>,
        /// Answer the first N requests with 503.
        fail_503: usize,
        /// For the first N requests, close the connection after K body bytes: (N, K).
        cut: Option<(usize, usize)>,
        /// Ignore Range headers (always answer 200 with the full body).
        ignore_range: bool,
    }

    /// A tiny HTTP/1.1 server on 127.0.0.1 serving `State::files`, one connection per request.
    struct Server {
        base: String,
        state: Arc<Mutex<State>>,
    }

    impl Server {
        fn start(files: &[(&str, &[u8])]) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let state = Arc::new(Mutex::new(State {
                files: files
                    .iter()
                    .map(|(p, b)| (p.to_string(), b.to_vec()))
                    .collect(),
                ..State::default()
            }));
            let st = state.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    std::thread::spawn(move || handle(conn, &st));
                }
            });
            Server { base, state }
        }

        fn url(&self, path: &str) -> String {
            format!("{}{path}", self.base)
        }

        fn seen(&self) -> Vec<Seen> {
            self.state.lock().unwrap().seen.clone()
        }

        fn set(&self, f: impl FnOnce(&mut State)) {
            f(&mut self.state.lock().unwrap());
        }
    }

    fn handle(mut conn: TcpStream, st: &Mutex<State>) {
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
            }
        }
        let (body, fail, cut, ignore_range) = {
            let mut s = st.lock().unwrap();
            s.seen.push(Seen {
                path: path.clone(),
                range: range.clone(),
            });
            let n = s.seen.len();
            (
                s.files.get(&path).cloned(),
                n <= s.fail_503,
                s.cut.filter(|(count, _)| n <= *count).map(|(_, k)| k),
                s.ignore_range,
            )
        };
        let respond = |conn: &mut TcpStream, status: &str, extra: &str, body: &[u8]| {
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(body);
        };
        if fail {
            respond(&mut conn, "503 Service Unavailable", "", b"busy");
        } else if let Some(body) = body {
            let len = body.len();
            let start = range
                .as_deref()
                .filter(|_| !ignore_range)
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<usize>().ok());
            match start {
                Some(s) if s >= len => respond(
                    &mut conn,
                    "416 Range Not Satisfiable",
                    &format!("Content-Range: bytes */{len}\r\n"),
                    b"",
                ),
                Some(s) => respond(
                    &mut conn,
                    "206 Partial Content",
                    &format!("Content-Range: bytes {s}-{}/{len}\r\n", len - 1),
                    &body[s..],
                ),
                None => match cut {
                    Some(k) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                        );
                        let _ = conn.write_all(head.as_bytes());
                        let _ = conn.write_all(&body[..k]);
                    }
                    None => respond(&mut conn, "200 OK", "", &body),
                },
            }
        } else {
            respond(&mut conn, "404 Not Found", "", b"not found");
        }
        let _ = conn.flush();
        let _ = conn.shutdown(Shutdown::Both);
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn artifact(name: &str, url: &str, content: &[u8]) -> Artifact {
        Artifact {
            name: name.to_string(),
            url: url.to_string(),
            sha256: sha256_hex(content),
            size: Some(content.len() as u64),
        }
    }

    fn fetcher(cache: &Path) -> Fetcher {
        Fetcher::new(cache)
            .mirror(None)
            .quiet(true)
            .retries(3)
            .timeout(Duration::from_secs(10))
            .backoff_base(Duration::from_millis(10))
    }

    /// Files in `<cache>/sha256/`, sorted.
    fn store_files(f: &Fetcher) -> Vec<String> {
        let mut v: Vec<String> = match fs::read_dir(f.store_dir()) {
            Ok(rd) => rd
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    #[test]
    fn download_and_verify() {
        let body = payload(300_000);
        let srv = Server::start(&[("/k3s", &body)]);
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path());
        let a = artifact("k3s", &srv.url("/k3s"), &body);
        let p = f.fetch(&a).unwrap();
        assert_eq!(p, tmp.path().join("sha256").join(&a.sha256));
        assert_eq!(p, f.cached_path(&a.sha256));
        assert_eq!(fs::read(&p).unwrap(), body);
        assert_eq!(store_files(&f), vec![a.sha256.clone()]);
        assert_eq!(srv.seen().len(), 1);
        assert_eq!(srv.seen()[0].range, None);
    }

    #[test]
    fn download_without_pinned_size() {
        let body = payload(1000);
        let srv = Server::start(&[("/x", &body)]);
        let tmp = tempfile::tempdir().unwrap();
        let mut a = artifact("x", &srv.url("/x"), &body);
        a.size = None;
        let p = fetcher(tmp.path()).fetch(&a).unwrap();
        assert_eq!(fs::read(p).unwrap(), body);
    }

    #[test]
    fn cache_hit_makes_no_request() {
        let body = payload(5000);
        let srv = Server::start(&[("/a", &body)]);
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path());
        let a = artifact("a", &srv.url("/a"), &body);
        let p1 = f.fetch(&a).unwrap();
        assert_eq!(srv.seen().len(), 1);
        let p2 = f.fetch(&a).unwrap();
        assert_eq!(p1, p2);
        assert_eq!(srv.seen().len(), 1, "a cache hit must not hit the network");
    }

    #[test]
    fn digest_mismatch_discards_the_file() {
        let good = payload(4000);
        let bad = payload(4001);
        let srv = Server::start(&[("/k3s", &bad)]);
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path());
        let mut a = artifact("k3s", &srv.url("/k3s"), &good);
        a.size = None;
        let err = format!("{:#}", f.fetch(&a).unwrap_err());
        assert!(err.contains("sha256 mismatch"), "{err}");
        assert!(err.contains(&a.sha256), "{err}");
        assert!(err.contains(&sha256_hex(&bad)), "{err}");
        assert!(err.contains(&a.url), "{err}");
        assert!(err.contains("4001 bytes"), "{err}");
        assert!(err.contains("discarded"), "{err}");
        assert!(!f.cached_path(&a.sha256).exists());
        assert!(!f.partial_path(&a.sha256).exists());
        assert!(store_files(&f).is_empty(), "{:?}", store_files(&f));
        assert_eq!(srv.seen().len(), 1, "a digest mismatch is not retried");
    }

    #[test]
    fn size_mismatch_fails_fast_and_keeps_nothing() {
        let good = payload(4000);
        let bad = payload(5000);
        let srv = Server::start(&[("/k3s", &bad)]);
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path());
        let a = artifact("k3s", &srv.url("/k3s"), &good);
        let err = format!("{:#}", f.fetch(&a).unwrap_err());
        assert!(err.contains("size mismatch"), "{err}");
        assert!(store_files(&f).is_empty(), "{:?}", store_files(&f));
        assert_eq!(srv.seen().len(), 1);
    }

    #[test]
    fn offline_miss_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path()).offline(true);
        let a = artifact("k3s", "https://example.invalid/k3s", b"content");
        let err = format!("{:#}", f.fetch(&a).unwrap_err());
        assert!(err.contains("k3s"), "{err}");
        assert!(err.contains("https://example.invalid/k3s"), "{err}");
        assert!(err.contains(&a.sha256), "{err}");
        assert!(err.contains("--offline"), "{err}");
        assert!(err.contains(MIRROR_ENV), "{err}");
        assert!(
            err.contains(&f.cached_path(&a.sha256).display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn offline_hit_works() {
        let body = payload(2000);
        let srv = Server::start(&[("/a", &body)]);
        let tmp = tempfile::tempdir().unwrap();
        let a = artifact("a", &srv.url("/a"), &body);
        fetcher(tmp.path()).fetch(&a).unwrap();
        let p = fetcher(tmp.path()).offline(true).fetch(&a).unwrap();
        assert_eq!(fs::read(p).unwrap(), body);
        assert_eq!(srv.seen().len(), 1);
    }

    #[test]
    fn offline_hit_from_a_hand_copied_file() {
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path()).offline(true);
        let body = b"copied by hand".to_vec();
        let a = artifact("a", "https://example.invalid/a", &body);
        fs::create_dir_all(f.store_dir()).unwrap();
        fs::write(f.cached_path(&a.sha256), &body).unwrap();
        assert_eq!(f.fetch(&a).unwrap(), f.cached_path(&a.sha256));
    }

    #[test]
    fn resume_after_disconnect_uses_range() {
        let body = payload(300_000);
        let srv = Server::start(&[("/big", &body)]);
        srv.set(|s| s.cut = Some((1, 100_000)));
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path());
        let a = artifact("big", &srv.url("/big"), &body);
        let p = f.fetch(&a).unwrap();
        assert_eq!(fs::read(&p).unwrap(), body);
        let seen = srv.seen();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].range, None);
        assert_eq!(seen[1].range.as_deref(), Some("bytes=100000-"), "{seen:?}");
        assert_eq!(store_files(&f), vec![a.sha256.clone()]);
    }

    #[test]
    fn existing_partial_is_resumed() {
        let body = payload(50_000);
        let srv = Server::start(&[("/p", &body)]);
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path());
        let a = artifact("p", &srv.url("/p"), &body);
        fs::create_dir_all(f.store_dir()).unwrap();
        fs::write(f.partial_path(&a.sha256), &body[..12_345]).unwrap();
        let p = f.fetch(&a).unwrap();
        assert_eq!(fs::read(p).unwrap(), body);
        let seen = srv.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].range.as_deref(), Some("bytes=12345-"));
    }

    #[test]
    fn server_ignoring_range_restarts_from_zero() {
        let body = payload(50_000);
        let srv = Server::start(&[("/p", &body)]);
        srv.set(|s| s.ignore_range = true);
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path());
        let a = artifact("p", &srv.url("/p"), &body);
        fs::create_dir_all(f.store_dir()).unwrap();
        fs::write(f.partial_path(&a.sha256), b"garbage that must be dropped").unwrap();
        let p = f.fetch(&a).unwrap();
        assert_eq!(fs::read(p).unwrap(), body);
        assert_eq!(srv.seen().len(), 1);
    }

    #[test]
    fn complete_partial_answered_with_416_is_verified() {
        let body = payload(1234);
        let srv = Server::start(&[("/p", &body)]);
        let tmp = tempfile::tempdir().unwrap();
        let mut a = artifact("p", &srv.url("/p"), &body);
        a.size = None;
        let f = fetcher(tmp.path());
        fs::create_dir_all(f.store_dir()).unwrap();
        fs::write(f.partial_path(&a.sha256), &body).unwrap();
        assert_eq!(fs::read(f.fetch(&a).unwrap()).unwrap(), body);
        assert_eq!(srv.seen()[0].range.as_deref(), Some("bytes=1234-"));
    }

    #[test]
    fn http_503_is_retried_then_succeeds() {
        let body = payload(3000);
        let srv = Server::start(&[("/a", &body)]);
        srv.set(|s| s.fail_503 = 2);
        let tmp = tempfile::tempdir().unwrap();
        let a = artifact("a", &srv.url("/a"), &body);
        let p = fetcher(tmp.path()).fetch(&a).unwrap();
        assert_eq!(fs::read(p).unwrap(), body);
        assert_eq!(srv.seen().len(), 3);
    }

    #[test]
    fn http_503_gives_up_after_retries() {
        let body = payload(3000);
        let srv = Server::start(&[("/a", &body)]);
        srv.set(|s| s.fail_503 = 100);
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path()).retries(2);
        let a = artifact("a", &srv.url("/a"), &body);
        let err = format!("{:#}", f.fetch(&a).unwrap_err());
        assert!(err.contains("503"), "{err}");
        assert!(err.contains("3 attempt"), "{err}");
        assert_eq!(srv.seen().len(), 3);
        assert!(!f.cached_path(&a.sha256).exists());
    }

    #[test]
    fn http_404_fails_fast() {
        let srv = Server::start(&[]);
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path())
            .retries(5)
            .backoff_base(Duration::from_secs(5));
        let a = artifact("k3s", &srv.url("/missing"), b"x");
        let t = std::time::Instant::now();
        let err = format!("{:#}", f.fetch(&a).unwrap_err());
        assert!(err.contains("404"), "{err}");
        assert!(err.contains(&a.url), "{err}");
        assert_eq!(srv.seen().len(), 1, "4xx must not be retried");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn connection_refused_is_retried() {
        // Bind then drop to get a port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path()).retries(2);
        let a = artifact("a", &format!("http://127.0.0.1:{port}/a"), b"x");
        let err = format!("{:#}", f.fetch(&a).unwrap_err());
        assert!(err.contains("3 attempt"), "{err}");
    }

    #[test]
    fn corrupt_cache_entry_is_refetched() {
        let body = payload(8000);
        let srv = Server::start(&[("/a", &body)]);
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path());
        let a = artifact("a", &srv.url("/a"), &body);
        let p = f.fetch(&a).unwrap();
        fs::write(&p, b"bit rot").unwrap();
        let p2 = f.fetch(&a).unwrap();
        assert_eq!(p, p2);
        assert_eq!(fs::read(&p2).unwrap(), body);
        assert_eq!(srv.seen().len(), 2);
    }

    #[test]
    fn corrupt_cache_entry_offline_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path()).offline(true);
        let a = artifact("k3s", "https://example.invalid/k3s", b"good");
        fs::create_dir_all(f.store_dir()).unwrap();
        fs::write(f.cached_path(&a.sha256), b"bad!").unwrap();
        let err = format!("{:#}", f.fetch(&a).unwrap_err());
        assert!(
            err.contains("cache entry for k3s is corrupt and --offline forbids refetching"),
            "{err}"
        );
    }

    #[test]
    fn invalid_sha256_is_rejected_up_front() {
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path());
        for bad in [
            "abc",
            &"A".repeat(64),
            &format!("sha256:{}", "a".repeat(64)),
            &"g".repeat(64),
        ] {
            let a = Artifact {
                name: "k3s".into(),
                url: "http://127.0.0.1:1/k3s".into(),
                sha256: bad.to_string(),
                size: None,
            };
            let err = format!("{:#}", f.fetch(&a).unwrap_err());
            assert!(err.contains("invalid sha256"), "{err}");
            assert!(err.contains("k3s"), "{err}");
        }
        assert!(validate_sha256(&"0123456789abcdef".repeat(4)).is_ok());
    }

    #[test]
    fn unsupported_scheme_is_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let a = artifact("a", "ftp://example.invalid/a", b"x");
        let err = format!("{:#}", fetcher(tmp.path()).fetch(&a).unwrap_err());
        assert!(err.contains("unsupported URL"), "{err}");
    }

    #[test]
    fn mirror_url_rewriting() {
        let k3s = "https://github.com/k3s-io/k3s/releases/download/v1.31.4%2Bk3s1/k3s";
        assert_eq!(
            effective_url(k3s, Some("http://10.0.0.5:8080/mirror")),
            "http://10.0.0.5:8080/mirror/k3s-io/k3s/releases/download/v1.31.4%2Bk3s1/k3s"
        );
        assert_eq!(
            effective_url(k3s, Some("http://10.0.0.5:8080/mirror/")),
            "http://10.0.0.5:8080/mirror/k3s-io/k3s/releases/download/v1.31.4%2Bk3s1/k3s"
        );
        assert_eq!(
            effective_url("https://user@host:8443/a/b?x=1#frag", Some("http://m")),
            "http://m/a/b?x=1"
        );
        assert_eq!(effective_url("https://host", Some("http://m")), "http://m/");
        assert_eq!(
            effective_url(k3s, Some("file:///srv/mirror")),
            "file:///srv/mirror/k3s-io/k3s/releases/download/v1.31.4%2Bk3s1/k3s"
        );
        assert_eq!(effective_url(k3s, None), k3s);
        assert_eq!(effective_url(k3s, Some("  ")), k3s);
        assert_eq!(
            effective_url("file:///opt/k3s", Some("http://m")),
            "file:///opt/k3s"
        );
    }

    #[test]
    fn mirror_is_used_for_downloads() {
        let body = payload(777);
        let srv = Server::start(&[("/mirror/k3s-io/k3s/releases/download/v1%2Bk3s1/k3s", &body)]);
        let tmp = tempfile::tempdir().unwrap();
        let f = fetcher(tmp.path()).mirror(Some(srv.url("/mirror")));
        let a = artifact(
            "k3s",
            "https://github.com/k3s-io/k3s/releases/download/v1%2Bk3s1/k3s",
            &body,
        );
        assert_eq!(fs::read(f.fetch(&a).unwrap()).unwrap(), body);
        assert_eq!(
            srv.seen()[0].path,
            "/mirror/k3s-io/k3s/releases/download/v1%2Bk3s1/k3s"
        );
    }

    #[test]
    fn file_urls_work() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("dir with space").join("k3s");
        fs::create_dir_all(src.parent().unwrap()).unwrap();
        let body = payload(70_000);
        fs::write(&src, &body).unwrap();
        let url = Url::from_file_path(&src).unwrap().to_string();
        assert!(url.contains("%20"), "{url}");
        let cache = tmp.path().join("cache");
        let f = fetcher(&cache);
        let a = artifact("k3s", &url, &body);
        let p = f.fetch(&a).unwrap();
        assert_eq!(fs::read(&p).unwrap(), body);
        assert_eq!(store_files(&f), vec![a.sha256.clone()]);

        // Wrong content through file:// is discarded too.
        let mut wrong = a.clone();
        wrong.sha256 = sha256_hex(b"other");
        wrong.size = None;
        let err = format!("{:#}", f.fetch(&wrong).unwrap_err());
        assert!(err.contains("sha256 mismatch"), "{err}");
        assert_eq!(store_files(&f), vec![a.sha256.clone()]);

        // A missing file is a clear error.
        let missing = artifact("gone", "file:///nonexistent/kiln/gone", b"x");
        let err = format!("{:#}", f.fetch(&missing).unwrap_err());
        assert!(err.contains("/nonexistent/kiln/gone"), "{err}");

        // A device is refused before a byte is copied (it would fill the disk).
        let mut zero = artifact("zero", "file:///dev/zero", b"x");
        zero.size = None;
        let err = format!("{:#}", f.fetch(&zero).unwrap_err());
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let b = Duration::from_millis(500);
        assert_eq!(backoff_delay(b, 0), Duration::from_millis(500));
        assert_eq!(backoff_delay(b, 1), Duration::from_secs(1));
        assert_eq!(backoff_delay(b, 2), Duration::from_secs(2));
        assert_eq!(backoff_delay(b, 20), MAX_BACKOFF);
        assert_eq!(backoff_delay(b, u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn artifact_serde_round_trip() {
        let a = artifact("k3s", "https://example.invalid/k3s", b"x");
        let j = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<Artifact>(&j).unwrap(), a);
    }
}
