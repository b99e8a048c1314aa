//! Signatures over build outputs: `SHA256SUMS.sig` next to `SHA256SUMS`.
//!
//! `SHA256SUMS.sig` is an OpenSSH `SSHSIG` signature (see OpenSSH's `PROTOCOL.sshsig`), armored
//! as `-----BEGIN SSH SIGNATURE-----`, namespace [`NAMESPACE`], hash sha512, over the exact bytes
//! of `SHA256SUMS`, made with the Ed25519 key `keys/signing_ed25519.pem`. It is what
//! `ssh-keygen -Y sign -n kiln -f <key> SHA256SUMS` writes for the same key — bit for bit, since
//! Ed25519 signatures are deterministic — so anyone can check a build without kiln:
//!
//! ```text
//! kiln keys show | sed -n 's/^allowed_signers: //p' > allowed_signers   # see allowed_signers_line()
//! ssh-keygen -Y verify -f allowed_signers -I kiln -n kiln -s SHA256SUMS.sig < SHA256SUMS
//! sha256sum -c SHA256SUMS
//! ```
//!
//! [`verify_dir`] does both steps: the signature first (a bad one is a [`VerifyError`] before
//! any file is read), then every listed file's sha256, streamed, plus a scan for files that the
//! signature does not cover.

use anyhow::{Context, Result};
use ed25519_dalek::{SigningKey, VerifyingKey};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use sha2::{Digest, Sha256};
use ssh_key::{HashAlg, SshSig};
use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// The SSHSIG namespace of kiln's signatures (`ssh-keygen -n kiln`).
pub const NAMESPACE: &str = "kiln";
/// The principal in [`allowed_signers_line`] (`ssh-keygen -I kiln`).
pub const PRINCIPAL: &str = "kiln";
/// The signed checksum list of a build directory.
pub const SUMS: &str = "SHA256SUMS";
/// The signature over [`SUMS`].
pub const SIG: &str = "SHA256SUMS.sig";
use crate::project::layout::key::SIGNING_KEY;
use crate::sys::util::is_not_found;
use crate::trust::limits;
/// Read buffer for hashing and flashing.
pub const BUF_SIZE: usize = 4 << 20;

/// Why a signed directory (or one file of it) failed verification. `kiln` exits with status 3
/// ([`crate::EXIT_VERIFY_FAILED`]) when one of these is in the error chain.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// `SHA256SUMS` does not exist.
    #[error(
        "{}: missing; this is not a signed kiln output directory (check the path, or rebuild)",
        .sums.display()
    )]
    MissingSums { sums: PathBuf },
    /// `SHA256SUMS.sig` does not exist.
    #[error(
        "{}: missing, so {} is unsigned and cannot be trusted (rebuild with the signing key in \
         keys/, or copy the .sig along with the files)",
        .sig.display(), .sums.display()
    )]
    MissingSignature { sig: PathBuf, sums: PathBuf },
    /// `SHA256SUMS` or `SHA256SUMS.sig` is not a regular file, or is far too large.
    #[error("{0}; do not use this directory (rebuild, or copy it again from the build host)")]
    Unreadable(crate::sys::util::InputFileError),
    /// `SHA256SUMS.sig` is not an armored SSHSIG signature.
    #[error("{}: not an SSH signature ({reason}); expected -----BEGIN SSH SIGNATURE-----", .sig.display())]
    MalformedSignature { sig: PathBuf, reason: String },
    /// The signature was made for another namespace.
    #[error(
        "{}: signed for namespace {namespace:?}, not {NAMESPACE:?} (sign with `ssh-keygen -Y sign -n {NAMESPACE}`)",
        .sig.display()
    )]
    WrongNamespace { sig: PathBuf, namespace: String },
    /// The signature was made by a key other than the trusted one.
    #[error(
        "{}: signed by key {signer}, but the trusted key is {expected}: either the files come \
         from another cluster's keys, or --key names the wrong public key",
        .sig.display()
    )]
    WrongKey {
        sig: PathBuf,
        signer: String,
        expected: String,
    },
    /// The signature does not match the bytes of `SHA256SUMS`.
    #[error(
        "{}: signature does not match {}: SHA256SUMS or its signature was changed after signing; \
         do not use these files (rebuild, or copy them again from the build host)",
        .sig.display(), .sums.display()
    )]
    BadSignature { sig: PathBuf, sums: PathBuf },
    /// `SHA256SUMS` is signed but not in the expected format.
    #[error("{}:{line}: {reason}; expected `<sha256 hex>  <file name>`", .sums.display())]
    MalformedSums {
        sums: PathBuf,
        line: usize,
        reason: String,
    },
    /// A file that must be listed in `SHA256SUMS` is not.
    #[error(
        "{name} is not listed in {}, so its signature does not cover it (rebuild the node's outputs)",
        .sums.display()
    )]
    NotListed { sums: PathBuf, name: String },
    /// A single file does not match its signed digest.
    #[error(
        "{}: sha256 {actual} does not match {expected} in the signed SHA256SUMS: the file was \
         changed or damaged after signing (rebuild, or copy it again)",
        .path.display()
    )]
    Mismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// The signature is good but files are missing, changed, or not covered by it.
    #[error("{}: {}", .0.dir.display(), .0.problems().join("; "))]
    Files(Box<VerifyReport>),
}

/// The verified content of `SHA256SUMS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedSums {
    /// `SHA256:<base64>` fingerprint of the signing key (as `ssh-keygen -l` prints it).
    pub signer: String,
    /// `sha256` or `sha512`: the hash SSHSIG applied to `SHA256SUMS`.
    pub hash_alg: String,
    /// Listed files in file order: (name, lowercase sha256 hex).
    pub entries: Vec<(String, String)>,
    /// The exact bytes of `SHA256SUMS` and of its signature that were verified (what
    /// `kiln serve` hands to a node's updater, which checks them again itself).
    #[serde(skip)]
    pub raw: (Vec<u8>, Vec<u8>),
}

impl SignedSums {
    /// The signed sha256 of `name`, if listed.
    pub fn sha256_of(&self, name: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, h)| h.as_str())
    }
}

/// State of one listed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    /// Present, sha256 matches.
    Ok,
    /// Listed but absent.
    Missing,
    /// Present, sha256 differs.
    Mismatch,
    /// Listed but a directory or special file.
    NotAFile,
}

/// One listed file as checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileCheck {
    /// Name as listed in `SHA256SUMS` (relative to the directory).
    pub name: String,
    pub status: FileStatus,
    /// Size in bytes, when the file exists.
    pub size: Option<u64>,
    /// sha256 from the signed `SHA256SUMS`.
    pub expected_sha256: String,
    /// sha256 of the file as read, when it was read.
    pub actual_sha256: Option<String>,
}

/// Result of [`verify_dir`]: returned as `Ok` only when everything checks out, and carried by
/// [`VerifyError::Files`] otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub dir: PathBuf,
    /// `SHA256:<base64>` fingerprint of the key that made the (good) signature.
    pub signer: String,
    pub namespace: String,
    /// Hash SSHSIG applied to `SHA256SUMS` (`sha512` for kiln's own signatures).
    pub hash_alg: String,
    /// Every listed file, in `SHA256SUMS` order.
    pub files: Vec<FileCheck>,
    /// Files and symlinks in the directory (recursively) that `SHA256SUMS` does not list, sorted;
    /// `SHA256SUMS`, `SHA256SUMS.sig` and symlinks named `latest` are not counted.
    pub unlisted: Vec<String>,
    /// Total bytes of the files checked.
    pub bytes_checked: u64,
    /// True when every listed file matches and nothing is unlisted.
    pub ok: bool,
}

impl VerifyReport {
    /// One sentence per problem, naming the file; empty when `ok`.
    pub fn problems(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .files
            .iter()
            .filter_map(|f| match f.status {
                FileStatus::Ok => None,
                FileStatus::Missing => {
                    Some(format!("{} is listed in SHA256SUMS but missing", f.name))
                }
                FileStatus::NotAFile => Some(format!(
                    "{} is listed in SHA256SUMS but is not a regular file",
                    f.name
                )),
                FileStatus::Mismatch => Some(format!(
                    "{} was changed after signing (sha256 {}, signed {})",
                    f.name,
                    f.actual_sha256.as_deref().unwrap_or("?"),
                    f.expected_sha256
                )),
            })
            .collect();
        v.extend(self.unlisted.iter().map(|n| {
            format!(
                "{n} is not listed in SHA256SUMS, so the signature does not cover it (remove it)"
            )
        }));
        v
    }
}

/// Loads `keys_dir/signing_ed25519.pem` (Ed25519, PKCS#8 PEM, v1 or v2).
pub fn load_signing_key(keys_dir: &Path) -> Result<SigningKey> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    let path = keys_dir.join(SIGNING_KEY);
    let pem = match read_key_text(&path, "signing key") {
        Ok(s) => zeroize::Zeroizing::new(s),
        Err(e) if is_not_found(&e) => anyhow::bail!(
            "signing key {} not found: run `kiln keys init` to create the cluster's keys (or copy \
             the cluster's keys/ directory into the project)",
            path.display()
        ),
        Err(e) => return Err(e),
    };
    SigningKey::from_pkcs8_pem(pem.trim()).map_err(|e| {
        anyhow::anyhow!(
            "{}: not an Ed25519 PKCS#8 PEM private key ({e}); it should start with \
             -----BEGIN PRIVATE KEY----- as `kiln keys init` writes it",
            path.display()
        )
    })
}

/// Loads a trusted public key: the raw 32-byte key in base64 (`signing_ed25519.pub`), an
/// OpenSSH line `ssh-ed25519 AAAA… [comment]`, or an allowed_signers line
/// `kiln ssh-ed25519 AAAA…`. Blank lines and `#` comments are skipped; exactly one key must remain.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey> {
    let text = match read_key_text(path, "public key") {
        Ok(s) => s,
        Err(e) if is_not_found(&e) => anyhow::bail!(
            "public key {} not found: run `kiln keys init`, or pass --key <file> with the \
             cluster's signing_ed25519.pub",
            path.display()
        ),
        Err(e) => return Err(e),
    };
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let line = match lines.as_slice() {
        [one] => *one,
        [] => anyhow::bail!("{}: empty, expected one Ed25519 public key", path.display()),
        _ => anyhow::bail!(
            "{}: {} lines, expected exactly one Ed25519 public key",
            path.display(),
            lines.len()
        ),
    };
    parse_verifying_key(line).with_context(|| {
        format!(
            "{}: expected the base64 raw Ed25519 key of signing_ed25519.pub or an \
             `ssh-ed25519 AAAA…` line",
            path.display()
        )
    })
}

/// A key file's text, bounded ([`limits::KEY_FILE`], regular files only: an
/// [`InputFileError`](crate::sys::util::InputFileError), exit status 2).
fn read_key_text(path: &Path, what: &str) -> Result<String> {
    crate::sys::util::read_small_string(path, limits::KEY_FILE, what)
}

/// Parses one line as in [`load_verifying_key`].
pub fn parse_verifying_key(line: &str) -> Result<VerifyingKey> {
    use base64::Engine as _;
    if let Some(pos) = line.find("ssh-ed25519 ") {
        let k = ssh_key::PublicKey::from_openssh(&line[pos..])
            .context("not a valid OpenSSH public key")?;
        let ed = k.key_data().ed25519().context("not an Ed25519 key")?;
        return VerifyingKey::from_bytes(&ed.0).context("not a valid Ed25519 point");
    }
    if line
        .split_whitespace()
        .any(|w| w.starts_with("ssh-") || w.starts_with("ecdsa-"))
    {
        anyhow::bail!("an SSH key of another type; kiln signs with Ed25519 only");
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(line)
        .context("not base64")?;
    let raw: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected 32 bytes, got {}", raw.len()))?;
    VerifyingKey::from_bytes(&raw).context("not a valid Ed25519 point")
}

fn ssh_public(key: &VerifyingKey) -> ssh_key::PublicKey {
    ssh_key::PublicKey::from(ssh_key::public::KeyData::Ed25519(
        ssh_key::public::Ed25519PublicKey::from(key),
    ))
}

/// `SHA256:<base64>`: the key's fingerprint as `ssh-keygen -l` prints it.
pub fn fingerprint(key: &VerifyingKey) -> String {
    ssh_public(key).fingerprint(HashAlg::Sha256).to_string()
}

/// `kiln ssh-ed25519 AAAA…`: a line for an `allowed_signers` file, so that
/// `ssh-keygen -Y verify -f allowed_signers -I kiln -n kiln -s SHA256SUMS.sig < SHA256SUMS`
/// checks kiln's signatures.
pub fn allowed_signers_line(key: &VerifyingKey) -> String {
    let line = ssh_public(key)
        .to_openssh()
        .expect("encoding an Ed25519 public key cannot fail");
    format!("{PRINCIPAL} {}", line.trim_end())
}

/// The armored SSHSIG signature (namespace [`NAMESPACE`], sha512) of `message`.
/// Deterministic: the same key and message give the same bytes.
pub fn sign_bytes(message: &[u8], key: &SigningKey) -> Result<String> {
    let private = ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from(key));
    let sig = private
        .sign(NAMESPACE, HashAlg::Sha512, message)
        .context("signing SHA256SUMS")?;
    sig.to_pem(ssh_key::LineEnding::LF)
        .context("encoding the SSH signature")
}

/// Writes `dir/SHA256SUMS.sig` atomically, signing the exact bytes of `dir/SHA256SUMS`. The
/// signature gets the mode of `SHA256SUMS` (0600 files stay private in 0700 build directories).
pub fn sign_dir(dir: &Path, key: &SigningKey) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let sums = dir.join(SUMS);
    let bytes = crate::sys::util::read_small(&sums, limits::SUMS, SUMS)?;
    let mode = fs::metadata(&sums)
        .with_context(|| format!("reading {}", sums.display()))?
        .permissions()
        .mode()
        & 0o777;
    let pem = sign_bytes(&bytes, key)?;
    crate::sys::util::write_atomic_mode(&dir.join(SIG), pem.as_bytes(), mode)
}

/// Checks `dir/SHA256SUMS.sig` against `dir/SHA256SUMS` and `key`, then parses the list.
/// Every failure is a [`VerifyError`] except I/O errors other than a missing file.
pub fn verify_signature(dir: &Path, key: &VerifyingKey) -> Result<SignedSums> {
    let sums_path = dir.join(SUMS);
    let sig_path = dir.join(SIG);
    let sums = match read_signed_input(&sums_path, limits::SUMS, SUMS) {
        Ok(b) => b,
        Err(e) if is_not_found(&e) => {
            return Err(VerifyError::MissingSums { sums: sums_path }.into())
        }
        Err(e) => return Err(e),
    };
    let sig_text = match read_signed_input(&sig_path, limits::SIGNATURE, SIG) {
        Ok(b) => b,
        Err(e) if is_not_found(&e) => {
            return Err(VerifyError::MissingSignature {
                sig: sig_path,
                sums: sums_path,
            }
            .into())
        }
        Err(e) => return Err(e),
    };
    let hash_alg = check_signature(&sums, &sig_text, key).map_err(|e| match e {
        SigProblem::Malformed(reason) => VerifyError::MalformedSignature {
            sig: sig_path.clone(),
            reason,
        },
        SigProblem::Namespace(namespace) => VerifyError::WrongNamespace {
            sig: sig_path.clone(),
            namespace,
        },
        SigProblem::Key(signer) => VerifyError::WrongKey {
            sig: sig_path.clone(),
            signer,
            expected: fingerprint(key),
        },
        SigProblem::Bad => VerifyError::BadSignature {
            sig: sig_path.clone(),
            sums: sums_path.clone(),
        },
    })?;
    let entries = parse_sums(&sums, &sums_path)?;
    Ok(SignedSums {
        signer: fingerprint(key),
        hash_alg,
        entries,
        raw: (sums, sig_text),
    })
}

/// `SHA256SUMS` or its signature, bounded: one that is not a regular file or is too large (a
/// symlink to `/dev/zero`, a FIFO) is refused before it is read, as a
/// [`VerifyError::Unreadable`] (exit status 3: the directory cannot be trusted).
fn read_signed_input(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    crate::sys::util::read_small(path, max, what).map_err(|e| match e
        .downcast::<crate::sys::util::InputFileError>(
    ) {
        Ok(bad) => VerifyError::Unreadable(bad).into(),
        Err(e) => e,
    })
}

enum SigProblem {
    Malformed(String),
    Namespace(String),
    Key(String),
    Bad,
}

/// Verifies an armored SSHSIG over `message`; returns the hash algorithm name.
fn check_signature(
    message: &[u8],
    armored: &[u8],
    key: &VerifyingKey,
) -> std::result::Result<String, SigProblem> {
    let text =
        std::str::from_utf8(armored).map_err(|_| SigProblem::Malformed("not UTF-8 text".into()))?;
    let sig = SshSig::from_pem(text.trim_end().as_bytes())
        .map_err(|e| SigProblem::Malformed(e.to_string()))?;
    if sig.namespace() != NAMESPACE {
        return Err(SigProblem::Namespace(sig.namespace().to_string()));
    }
    let expected = ssh_public(key);
    if sig.public_key() != expected.key_data() {
        let signer = ssh_key::PublicKey::from(sig.public_key().clone())
            .fingerprint(HashAlg::Sha256)
            .to_string();
        return Err(SigProblem::Key(signer));
    }
    expected
        .verify(NAMESPACE, message, &sig)
        .map_err(|_| SigProblem::Bad)?;
    Ok(sig.hash_alg().as_str().to_string())
}

/// Parses `SHA256SUMS` (coreutils format: `<64 hex>  <name>`, or `<64 hex> *<name>`).
/// Names must be relative paths without `.`/`..` components; duplicates are refused.
pub fn parse_sums(bytes: &[u8], path: &Path) -> Result<Vec<(String, String)>, VerifyError> {
    let bad = |line: usize, reason: String| VerifyError::MalformedSums {
        sums: path.to_path_buf(),
        line,
        reason,
    };
    let text = std::str::from_utf8(bytes).map_err(|_| bad(1, "not UTF-8 text".into()))?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.is_empty() {
            continue;
        }
        let (hash, name) = line
            .split_once("  ")
            .or_else(|| line.split_once(" *"))
            .ok_or_else(|| bad(n, format!("malformed line {line:?}")))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(n, format!("{hash:?} is not a sha256 hex digest")));
        }
        let p = Path::new(name);
        let clean = !name.is_empty()
            && !name.contains('\0')
            && p.components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !clean {
            return Err(bad(
                n,
                format!("{name:?} is not a relative file name inside the directory"),
            ));
        }
        if !seen.insert(name.to_string()) {
            return Err(bad(n, format!("{name} is listed twice")));
        }
        out.push((name.to_string(), hash.to_ascii_lowercase()));
    }
    Ok(out)
}

/// A progress bar for `len` bytes on stderr (drawn only when stderr is a terminal), or a
/// hidden one.
pub fn byte_bar(len: u64, msg: impl Into<String>, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{wide_bar}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {eta}",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    bar.set_message(msg.into());
    bar
}

/// Streams `reader` through sha256 with a [`BUF_SIZE`] buffer, reading at most `limit` bytes
/// when given; returns the hex digest and the byte count. `what` names the source in errors.
pub fn sha256_stream(
    reader: &mut dyn Read,
    limit: Option<u64>,
    bar: &ProgressBar,
    what: &Path,
) -> Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total = 0u64;
    loop {
        let want = match limit {
            Some(l) => (l - total).min(BUF_SIZE as u64) as usize,
            None => BUF_SIZE,
        };
        if want == 0 {
            break;
        }
        let n = match reader.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("reading {}", what.display())),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
        bar.inc(n as u64);
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// [`verify_dir_with_progress`] without a progress bar.
pub fn verify_dir(dir: &Path, key: &VerifyingKey) -> Result<VerifyReport> {
    verify_dir_with_progress(dir, key, false)
}

/// Verifies a signed directory: the signature over `SHA256SUMS` first ([`VerifyError`] if it
/// is missing, bad, or by another key), then every listed file's sha256 (streamed), then looks
/// for files the list does not cover. Returns the report when everything checks out, else
/// [`VerifyError::Files`] carrying it. `progress` draws a byte bar on stderr when it is a
/// terminal.
pub fn verify_dir_with_progress(
    dir: &Path,
    key: &VerifyingKey,
    progress: bool,
) -> Result<VerifyReport> {
    let md = fs::metadata(dir).with_context(|| format!("reading directory {}", dir.display()))?;
    if !md.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    let signed = verify_signature(dir, key)?;

    // Stat every listed file first, for one progress bar over all of them.
    let mut states = Vec::with_capacity(signed.entries.len());
    for (name, _) in &signed.entries {
        let p = dir.join(name);
        states.push(match fs::metadata(&p) {
            Ok(m) if m.is_file() => Ok(m.len()),
            Ok(_) => Err(FileStatus::NotAFile),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(FileStatus::Missing),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        });
    }
    let total = states.iter().filter_map(|s| s.as_ref().ok()).sum();
    let bar = byte_bar(total, "verifying", progress);
    let mut files = Vec::new();
    let mut bytes_checked = 0;
    for ((name, expected), state) in signed.entries.iter().zip(states) {
        let mut check = FileCheck {
            name: name.clone(),
            status: FileStatus::Ok,
            size: None,
            expected_sha256: expected.clone(),
            actual_sha256: None,
        };
        match state {
            Err(status) => check.status = status,
            Ok(_) => {
                let p = dir.join(name);
                bar.set_message(name.clone());
                let mut f =
                    fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
                let (actual, n) = sha256_stream(&mut f, None, &bar, &p)?;
                bytes_checked += n;
                if &actual != expected {
                    check.status = FileStatus::Mismatch;
                }
                check.size = Some(n);
                check.actual_sha256 = Some(actual);
            }
        }
        files.push(check);
    }
    bar.finish_and_clear();

    let listed: BTreeSet<&str> = signed.entries.iter().map(|(n, _)| n.as_str()).collect();
    let mut unlisted = Vec::new();
    scan_unlisted(dir, "", &listed, &mut unlisted)?;
    unlisted.sort();

    let ok = files.iter().all(|f| f.status == FileStatus::Ok) && unlisted.is_empty();
    let report = VerifyReport {
        dir: dir.to_path_buf(),
        signer: signed.signer,
        namespace: NAMESPACE.to_string(),
        hash_alg: signed.hash_alg,
        files,
        unlisted,
        bytes_checked,
        ok,
    };
    if report.ok {
        Ok(report)
    } else {
        Err(VerifyError::Files(Box::new(report)).into())
    }
}

/// Collects entries under `dir` (relative prefix `prefix`) that `listed` does not cover:
/// regular files, symlinks (except those named `latest`) and special files. Directories are
/// descended into (not through symlinks).
fn scan_unlisted(
    dir: &Path,
    prefix: &str,
    listed: &BTreeSet<&str>,
    out: &mut Vec<String>,
) -> Result<()> {
    let rd = fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
    for entry in rd {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let ft = entry
            .file_type()
            .with_context(|| format!("reading {}", entry.path().display()))?;
        if prefix.is_empty() && (name == SUMS || name == SIG) {
            continue;
        }
        if ft.is_symlink() && name == crate::project::layout::LATEST {
            continue;
        }
        if ft.is_dir() {
            scan_unlisted(&entry.path(), &rel, listed, out)?;
        } else if !listed.contains(rel.as_str()) {
            out.push(rel);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn test_key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn signed_dir(key: &SigningKey) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("a.txt"), b"alpha\n").unwrap();
        fs::write(d.path().join("b.bin"), vec![7u8; 3 << 20]).unwrap();
        let arts = crate::trust::sums::hash_artifacts(d.path(), &["b.bin", "a.txt"]).unwrap();
        fs::write(d.path().join(SUMS), crate::trust::sums::sha256sums(&arts)).unwrap();
        sign_dir(d.path(), key).unwrap();
        d
    }

    fn verify_err(dir: &Path, key: &VerifyingKey) -> VerifyError {
        let e = verify_dir(dir, key).unwrap_err();
        match e.downcast::<VerifyError>() {
            Ok(v) => v,
            Err(e) => panic!("not a VerifyError: {e:#}"),
        }
    }

    #[test]
    fn round_trip_and_report() {
        let k = test_key(1);
        let d = signed_dir(&k);
        let r = verify_dir(d.path(), &k.verifying_key()).unwrap();
        assert!(r.ok);
        assert_eq!(r.hash_alg, "sha512");
        let names: Vec<_> = r.files.iter().map(|f| (f.name.as_str(), f.size)).collect();
        assert_eq!(names, [("a.txt", Some(6)), ("b.bin", Some(3 << 20))]);
        assert_eq!(r.bytes_checked, 6 + (3 << 20));
        let sig = fs::read_to_string(d.path().join(SIG)).unwrap();
        assert!(sig.starts_with("-----BEGIN SSH SIGNATURE-----\n"), "{sig}");
        assert!(sig.ends_with("-----END SSH SIGNATURE-----\n"), "{sig}");
    }

    #[test]
    fn signature_is_deterministic() {
        let k = test_key(2);
        let a = signed_dir(&k);
        let b = signed_dir(&k);
        let sa = fs::read(a.path().join(SIG)).unwrap();
        assert_eq!(sa, fs::read(b.path().join(SIG)).unwrap());
        sign_dir(a.path(), &k).unwrap();
        assert_eq!(sa, fs::read(a.path().join(SIG)).unwrap());
    }

    #[test]
    fn sig_takes_the_mode_of_sums() {
        use std::os::unix::fs::PermissionsExt;
        let k = test_key(3);
        let d = signed_dir(&k);
        fs::set_permissions(d.path().join(SUMS), fs::Permissions::from_mode(0o600)).unwrap();
        sign_dir(d.path(), &k).unwrap();
        let m = fs::metadata(d.path().join(SIG))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o777, 0o600);
    }

    #[test]
    fn wrong_key_tampered_sums_missing_sig() {
        let k = test_key(4);
        let d = signed_dir(&k);
        let other = test_key(5).verifying_key();
        match verify_err(d.path(), &other) {
            VerifyError::WrongKey {
                signer, expected, ..
            } => {
                assert_eq!(signer, fingerprint(&k.verifying_key()));
                assert_eq!(expected, fingerprint(&other));
            }
            e => panic!("{e}"),
        }

        let sums = d.path().join(SUMS);
        let orig = fs::read_to_string(&sums).unwrap();
        fs::write(&sums, orig.replacen('a', "b", 1)).unwrap();
        let e = verify_err(d.path(), &k.verifying_key());
        assert!(matches!(e, VerifyError::BadSignature { .. }), "{e}");
        assert!(e.to_string().contains("SHA256SUMS.sig"), "{e}");
        fs::write(&sums, orig).unwrap();

        fs::remove_file(d.path().join(SIG)).unwrap();
        let e = verify_err(d.path(), &k.verifying_key());
        assert!(matches!(e, VerifyError::MissingSignature { .. }), "{e}");

        fs::write(d.path().join(SIG), "garbage\n").unwrap();
        let e = verify_err(d.path(), &k.verifying_key());
        assert!(matches!(e, VerifyError::MalformedSignature { .. }), "{e}");
    }

    #[test]
    fn other_namespace_is_refused() {
        let k = test_key(6);
        let d = signed_dir(&k);
        let msg = fs::read(d.path().join(SUMS)).unwrap();
        let private = ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from(&k));
        let sig = private.sign("file", HashAlg::Sha512, &msg).unwrap();
        fs::write(
            d.path().join(SIG),
            sig.to_pem(ssh_key::LineEnding::LF).unwrap(),
        )
        .unwrap();
        let e = verify_err(d.path(), &k.verifying_key());
        assert!(matches!(e, VerifyError::WrongNamespace { .. }), "{e}");
    }

    #[test]
    fn sha256_hashed_signature_is_accepted() {
        let k = test_key(7);
        let d = signed_dir(&k);
        let msg = fs::read(d.path().join(SUMS)).unwrap();
        let private = ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from(&k));
        let sig = private.sign(NAMESPACE, HashAlg::Sha256, &msg).unwrap();
        fs::write(
            d.path().join(SIG),
            sig.to_pem(ssh_key::LineEnding::LF).unwrap(),
        )
        .unwrap();
        let r = verify_dir(d.path(), &k.verifying_key()).unwrap();
        assert_eq!(r.hash_alg, "sha256");
    }

    #[test]
    fn file_problems_are_reported_by_name() {
        let k = test_key(8);
        let vk = k.verifying_key();
        let d = signed_dir(&k);
        fs::write(d.path().join("a.txt"), b"alphA\n").unwrap();
        fs::remove_file(d.path().join("b.bin")).unwrap();
        fs::write(d.path().join("extra"), b"x").unwrap();
        fs::create_dir(d.path().join("sub")).unwrap();
        fs::write(d.path().join("sub/deep"), b"y").unwrap();
        std::os::unix::fs::symlink(".", d.path().join("latest")).unwrap();
        std::os::unix::fs::symlink("a.txt", d.path().join("link")).unwrap();
        let VerifyError::Files(r) = verify_err(d.path(), &vk) else {
            panic!()
        };
        assert!(!r.ok);
        assert_eq!(r.files[0].status, FileStatus::Mismatch);
        assert_eq!(r.files[1].status, FileStatus::Missing);
        assert_eq!(r.unlisted, ["extra", "link", "sub/deep"]);
        let text = r.problems().join("\n");
        for n in ["a.txt", "b.bin", "extra", "sub/deep"] {
            assert!(text.contains(n), "{text}");
        }
        // The report serialises for --json.
        let j = serde_json::to_value(&*r).unwrap();
        assert_eq!(j["files"][1]["status"], "missing");
    }

    #[test]
    fn sums_parser_refuses_escapes_and_duplicates() {
        let p = Path::new("SHA256SUMS");
        let h = "0".repeat(64);
        assert_eq!(
            parse_sums(format!("{h}  a\n{h} *b/c\n").as_bytes(), p).unwrap(),
            [("a".to_string(), h.clone()), ("b/c".to_string(), h.clone())]
        );
        for bad in [
            format!("{h}  ../x\n"),
            format!("{h}  /etc/passwd\n"),
            format!("{h}  a\n{h}  a\n"),
            "abc  a\n".to_string(),
            format!("{h} a\n"),
        ] {
            assert!(parse_sums(bad.as_bytes(), p).is_err(), "{bad}");
        }
    }

    #[test]
    fn verifying_key_formats() {
        let d = tempfile::tempdir().unwrap();
        let k = test_key(9);
        let vk = k.verifying_key();
        let (_, raw) = crate::trust::keys::encode_signing_key(&k).unwrap();
        let p = d.path().join("k.pub");
        fs::write(&p, &raw).unwrap();
        assert_eq!(load_verifying_key(&p).unwrap(), vk);
        let ssh = ssh_public(&vk).to_openssh().unwrap();
        fs::write(&p, format!("{ssh} someone@host\n")).unwrap();
        assert_eq!(load_verifying_key(&p).unwrap(), vk);
        fs::write(&p, format!("# trusted\n{}\n", allowed_signers_line(&vk))).unwrap();
        assert_eq!(load_verifying_key(&p).unwrap(), vk);
        fs::write(&p, "not a key\n").unwrap();
        let e = format!("{:#}", load_verifying_key(&p).unwrap_err());
        assert!(e.contains("k.pub"), "{e}");
        let e = format!(
            "{:#}",
            load_verifying_key(&d.path().join("nope")).unwrap_err()
        );
        assert!(e.contains("kiln keys init"), "{e}");
    }

    #[test]
    fn signing_key_loads_and_missing_key_says_how_to_fix() {
        let d = tempfile::tempdir().unwrap();
        let e = format!("{:#}", load_signing_key(d.path()).unwrap_err());
        assert!(
            e.contains("signing_ed25519.pem") && e.contains("run `kiln keys init`"),
            "{e}"
        );
        let k = test_key(10);
        let (pem, _) = crate::trust::keys::encode_signing_key(&k).unwrap();
        fs::write(d.path().join(SIGNING_KEY), pem).unwrap();
        assert_eq!(load_signing_key(d.path()).unwrap().to_bytes(), k.to_bytes());
    }

    #[test]
    fn allowed_signers_line_format() {
        let l = allowed_signers_line(&test_key(11).verifying_key());
        assert!(
            l.starts_with("kiln ssh-ed25519 AAAAC3NzaC1lZDI1NTE5"),
            "{l}"
        );
        assert_eq!(l.split(' ').count(), 3, "{l}");
    }
}
