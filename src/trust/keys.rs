//! `kiln keys init` / `kiln keys show`: the cluster's key material in `keys/`.
//!
//! `init` creates, in one go:
//!
//! | file | mode | format |
//! |---|---|---|
//! | `ssh_ed25519` | 0600 | OpenSSH private key (`-----BEGIN OPENSSH PRIVATE KEY-----`, unencrypted), Ed25519 |
//! | `ssh_ed25519.pub` | 0644 | one OpenSSH public key line, `ssh-ed25519 AAAA… kiln@<cluster>` |
//! | `authorized_keys` | 0644 | the same line; baked into images for SSH access |
//! | `signing_ed25519.pem` | 0600 | Ed25519 private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`) |
//! | `signing_ed25519.pub` | 0644 | the raw 32-byte Ed25519 public key, standard base64 (padded, 44 chars), one line |
//! | `sealed-secrets.key` | 0600 | RSA-4096 private key, PKCS#1 PEM (`-----BEGIN RSA PRIVATE KEY-----`), as the controller stores `tls.key` |
//! | `sealed-secrets.crt` | 0644 | self-signed X.509 certificate for that key (see [`SEALED_SECRETS_CN`]) |
//! | `k3s-token` | 0600 | 64 lowercase hex characters (32 random bytes) and a newline |
//! | `module-signing.key` | 0600 | RSA-2048 private key, PKCS#8 PEM: DKMS signs the kernel modules it builds with it |
//! | `module-signing.crt` | 0644 | its self-signed X.509 certificate (see [`MODULE_SIGNING_CN`]) (DKMS's `mok.pub` in gpu images) |
//! | `node-identity.key` | 0600 | 64 lowercase hex characters (32 random bytes) and a newline: every node's machine-id, k3s node password and SSH host key are derived from it (see `trust::identity`) |
//! | `.gitignore` | 0644 | written only if missing: ignores everything but public files |
//!
//! Every file is written atomically: a temp file in `keys/` gets its final mode before it is renamed
//! into place, so a private key is never visible with a wider mode, and a crash leaves either the
//! old file or the new one. `init` refuses to replace an existing file unless `force` is set;
//! [`add_missing`] only writes the keys a project made by an older kiln lacks.
//!
//! The sealed-secrets key pair is what the bitnami sealed-secrets controller would generate for
//! itself (RSA 4096, self-signed, 10 years); restoring it as the controller's key Secret before
//! the controller starts lets a rebuilt cluster decrypt the SealedSecrets in git (see `seal`).

use crate::project::layout::key;
use crate::trust::limits;
use crate::trust::pem::{self, cert_fingerprint, parse_rsa_private};
use anyhow::{bail, Context, Result};
use rand::rngs::OsRng;
use rand::RngCore;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use rsa::{RsaPrivateKey, RsaPublicKey};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der::referenced::OwnedToRef as _;
use x509_cert::der::{Decode, Encode, EncodePem};
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages, SubjectKeyIdentifier};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};

/// RSA modulus size of the sealed-secrets key, as the controller generates it.
pub const SEALED_SECRETS_RSA_BITS: usize = 4096;
/// Subject of the sealed-secrets certificate (the controller uses CN `sealed-secret`).
pub const SEALED_SECRETS_CN: &str = "CN=sealed-secret,O=sealed-secret";
/// Certificate lifetime: 10 × 365 days, the controller's default.
pub const CERT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The certificate's notBefore is backdated by this much to tolerate clock skew.
pub const CERT_BACKDATE: Duration = Duration::from_secs(3600);
/// Length of the k3s token in hex characters.
pub const K3S_TOKEN_HEX_LEN: usize = 64;
/// Length of the node-identity secret in hex characters (32 bytes).
pub const NODE_IDENTITY_HEX_LEN: usize = 64;
/// RSA modulus size of the module-signing key (what DKMS itself generates).
pub const MODULE_SIGNING_RSA_BITS: usize = 2048;
/// Subject of the module-signing certificate (`modinfo -F signer` shows the CN).
pub const MODULE_SIGNING_CN: &str = "CN=kiln module signing key,O=kiln";

/// Contents of `keys/.gitignore`: only public material may enter git.
pub const GITIGNORE: &str = "\
# Written by `kiln keys init`: private key material never enters git.
*
!.gitignore
!.gitkeep
!*.pub
!*.crt
!authorized_keys
";

/// Errors that callers may want to tell apart (both are user errors).
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// `init` without `force` found files it would replace.
    #[error(
        "refusing to overwrite existing key files: {}; pass --force to replace them \
         (the old keys are lost: back them up first)",
        list_paths(.0)
    )]
    AlreadyExists(Vec<PathBuf>),
    /// A private key file is readable by group or others.
    #[error("private key files readable by group/others: {}", describe_insecure(.0))]
    InsecurePermissions(Vec<(PathBuf, u32)>),
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_insecure(files: &[(PathBuf, u32)]) -> String {
    files
        .iter()
        .map(|(p, mode)| {
            format!(
                "{} (mode {:04o}; fix: chmod 600 {})",
                p.display(),
                mode & 0o7777,
                p.display()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every path under a keys directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPaths {
    /// The keys directory itself.
    pub dir: PathBuf,
    /// OpenSSH Ed25519 private key (0600).
    pub ssh_private: PathBuf,
    /// OpenSSH public key line (0644).
    pub ssh_public: PathBuf,
    /// `authorized_keys` with the SSH public key line (0644).
    pub authorized_keys: PathBuf,
    /// Ed25519 signing key, PKCS#8 PEM (0600).
    pub signing_private: PathBuf,
    /// Raw Ed25519 public key, base64 (0644).
    pub signing_public: PathBuf,
    /// Sealed-secrets RSA private key, PKCS#1 PEM (0600).
    pub sealed_secrets_key: PathBuf,
    /// Sealed-secrets self-signed certificate, PEM (0644).
    pub sealed_secrets_cert: PathBuf,
    /// k3s cluster token (0600).
    pub k3s_token: PathBuf,
    /// RSA private key DKMS signs kernel modules with, PKCS#8 PEM (0600).
    pub module_signing_key: PathBuf,
    /// Its self-signed certificate, PEM (0644).
    pub module_signing_cert: PathBuf,
    /// The node-identity secret, hex (0600).
    pub node_identity: PathBuf,
    /// The cluster's k3s CAs and service-account key, in [`crate::trust::k3s_ca::FILES`]
    /// order (keys 0600, certificates 0644).
    pub k3s_ca: Vec<PathBuf>,
    /// `.gitignore` keeping private files out of git.
    pub gitignore: PathBuf,
}

impl KeyPaths {
    /// The paths under `dir`.
    pub fn new(dir: &Path) -> Self {
        KeyPaths {
            dir: dir.to_path_buf(),
            ssh_private: dir.join(key::SSH_PRIVATE),
            ssh_public: dir.join(key::SSH_PUBLIC),
            authorized_keys: dir.join(key::AUTHORIZED_KEYS),
            signing_private: dir.join(key::SIGNING_KEY),
            signing_public: dir.join(key::VERIFYING_KEY),
            sealed_secrets_key: dir.join(key::SEALED_SECRETS_KEY),
            sealed_secrets_cert: dir.join(key::SEALED_SECRETS_CRT),
            k3s_token: dir.join(key::K3S_TOKEN),
            module_signing_key: dir.join(key::MODULE_SIGNING_KEY),
            module_signing_cert: dir.join(key::MODULE_SIGNING_CRT),
            node_identity: dir.join(key::NODE_IDENTITY_KEY),
            k3s_ca: crate::trust::k3s_ca::FILES
                .iter()
                .map(|f| dir.join(f.key_name))
                .collect(),
            gitignore: dir.join(key::GITIGNORE),
        }
    }

    /// The k3s CA files that are private (`private`) or public.
    fn k3s_ca_files(&self, private: bool) -> impl Iterator<Item = &Path> {
        crate::trust::k3s_ca::FILES
            .iter()
            .zip(&self.k3s_ca)
            .filter(move |(f, _)| f.private == private)
            .map(|(_, p)| p.as_path())
    }

    /// Files that must be mode 0600 and never enter git.
    pub fn private_files(&self) -> Vec<&Path> {
        let mut v: Vec<&Path> = vec![
            &self.ssh_private,
            &self.signing_private,
            &self.sealed_secrets_key,
            &self.k3s_token,
            &self.module_signing_key,
            &self.node_identity,
        ];
        v.extend(self.k3s_ca_files(true));
        v
    }

    /// Public files (mode 0644, safe to commit), `.gitignore` excluded.
    pub fn public_files(&self) -> Vec<&Path> {
        let mut v: Vec<&Path> = vec![
            &self.ssh_public,
            &self.authorized_keys,
            &self.signing_public,
            &self.sealed_secrets_cert,
            &self.module_signing_cert,
        ];
        v.extend(self.k3s_ca_files(false));
        v
    }

    /// The generated files by key: each group is written together or not at all (see
    /// [`add_missing`]).
    fn groups(&self) -> [(&'static str, Vec<&Path>); 7] {
        [
            (
                "ssh",
                vec![&self.ssh_private, &self.ssh_public, &self.authorized_keys],
            ),
            ("signing", vec![&self.signing_private, &self.signing_public]),
            (
                "sealed-secrets",
                vec![&self.sealed_secrets_key, &self.sealed_secrets_cert],
            ),
            ("k3s-token", vec![&self.k3s_token]),
            (
                "module-signing",
                vec![&self.module_signing_key, &self.module_signing_cert],
            ),
            ("node-identity", vec![&self.node_identity]),
            ("k3s-ca", self.k3s_ca.iter().map(PathBuf::as_path).collect()),
        ]
    }

    /// Every file `init` generates (`.gitignore` excluded: it is only written when missing).
    pub fn generated_files(&self) -> Vec<&Path> {
        let mut v: Vec<&Path> = self.private_files();
        v.extend(self.public_files());
        v
    }
}

/// One line of `kiln keys show`. Never carries secret material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyInfo {
    /// File name, e.g. `ssh_ed25519.pub`.
    pub name: String,
    /// Full path.
    pub path: PathBuf,
    /// What the file holds, e.g. `ssh-ed25519 public key`.
    pub kind: String,
    /// Whether the file exists.
    pub present: bool,
    /// SSH keys: `SHA256:<base64>` (as `ssh-keygen -l`); signing key: sha256 hex of the raw
    /// public key; sealed-secrets key: `SHA256:<base64>` of its public key in SSH form (what the
    /// controller logs); certificate: SHA-256 of the DER, `AA:BB:…`; token: `present (64 chars)`;
    /// `missing` when the file does not exist.
    pub fingerprint: String,
    /// Signing public key only: the `allowed_signers` line (`kiln ssh-ed25519 AAAA…`) for
    /// checking `SHA256SUMS.sig` with `ssh-keygen -Y verify` (see `sign`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_signers: Option<String>,
}

/// Generated key material, all in memory, before anything is written.
struct Material {
    ssh_private: String,
    ssh_public_line: String,
    signing_private: String,
    signing_public_b64: String,
    rsa_private: String,
    cert_pem: String,
    k3s_token: String,
    module_key: String,
    module_cert_pem: String,
    node_identity: String,
    /// `keys/` name → PEM, in [`crate::trust::k3s_ca::FILES`] order.
    k3s_ca: Vec<(&'static str, String)>,
}

/// Creates every key file in `keys_dir` (created if missing) for cluster `cluster_name`.
///
/// Refuses (with [`KeysError::AlreadyExists`], listing them) if any file would be replaced,
/// unless `force`. Returns the files written, `.gitignore` included when it was missing.
/// Generating the RSA-4096 key takes a few seconds in release builds.
pub fn init(keys_dir: &Path, cluster_name: &str, force: bool) -> Result<Vec<PathBuf>> {
    init_with_rsa_bits(keys_dir, cluster_name, force, SEALED_SECRETS_RSA_BITS)
}

/// [`init`] with a chosen RSA modulus size. Only tests should pass anything but 4096
/// (2048-bit keys generate much faster).
pub fn init_with_rsa_bits(
    keys_dir: &Path,
    cluster_name: &str,
    force: bool,
    rsa_bits: usize,
) -> Result<Vec<PathBuf>> {
    validate_cluster_name(cluster_name)?;
    let paths = KeyPaths::new(keys_dir);
    if !force {
        let existing: Vec<PathBuf> = paths
            .generated_files()
            .into_iter()
            .filter(|p| p.symlink_metadata().is_ok())
            .map(Path::to_path_buf)
            .collect();
        if !existing.is_empty() {
            return Err(KeysError::AlreadyExists(existing).into());
        }
    }
    let m = generate(cluster_name, rsa_bits)?;
    write_material(&paths, &m, |_| true)
}

/// Writes the keys of `keys_dir` that are missing, leaving every existing file alone — how a
/// project made by an older kiln gets a key kind added since (e.g. `module-signing.key`). A key
/// whose files are only partly there is an error (restore the missing half or move the rest away).
pub fn add_missing(keys_dir: &Path, cluster_name: &str, rsa_bits: usize) -> Result<Vec<PathBuf>> {
    validate_cluster_name(cluster_name)?;
    let paths = KeyPaths::new(keys_dir);
    let mut wanted = Vec::new();
    for (name, files) in paths.groups() {
        let present: Vec<&Path> = files
            .iter()
            .copied()
            .filter(|p| p.symlink_metadata().is_ok())
            .collect();
        if present.is_empty() {
            wanted.push(name);
        } else if present.len() != files.len() {
            let missing: Vec<PathBuf> = files
                .iter()
                .filter(|p| p.symlink_metadata().is_err())
                .map(|p| p.to_path_buf())
                .collect();
            bail!(
                "the {name} key is incomplete: {} exist(s) but {} is missing; restore the missing file from your backup, or move the others away to make a new {name} key",
                list_paths(&present.iter().map(|p| p.to_path_buf()).collect::<Vec<_>>()),
                list_paths(&missing)
            );
        }
    }
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let m = generate(cluster_name, rsa_bits)?;
    let groups = paths.groups();
    let write: Vec<PathBuf> = groups
        .iter()
        .filter(|(n, _)| wanted.contains(n))
        .flat_map(|(_, f)| f.iter().map(|p| p.to_path_buf()))
        .collect();
    write_material(&paths, &m, |p| write.iter().any(|w| w == p))
}

fn write_material(
    paths: &KeyPaths,
    m: &Material,
    select: impl Fn(&Path) -> bool,
) -> Result<Vec<PathBuf>> {
    let keys_dir = &paths.dir;
    if !keys_dir.exists() {
        fs::create_dir_all(keys_dir).with_context(|| format!("creating {}", keys_dir.display()))?;
        // Explicit mode: with umask 002 the directory would be group-writable, and anyone in
        // the group could swap the keys.
        fs::set_permissions(keys_dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting mode 755 on {}", keys_dir.display()))?;
    }
    let mut written = Vec::new();
    let files: [(&Path, &str, u32); 11] = [
        (&paths.ssh_private, &m.ssh_private, 0o600),
        (&paths.ssh_public, &m.ssh_public_line, 0o644),
        (&paths.authorized_keys, &m.ssh_public_line, 0o644),
        (&paths.signing_private, &m.signing_private, 0o600),
        (&paths.signing_public, &m.signing_public_b64, 0o644),
        (&paths.sealed_secrets_key, &m.rsa_private, 0o600),
        (&paths.sealed_secrets_cert, &m.cert_pem, 0o644),
        (&paths.k3s_token, &m.k3s_token, 0o600),
        (&paths.module_signing_key, &m.module_key, 0o600),
        (&paths.module_signing_cert, &m.module_cert_pem, 0o644),
        (&paths.node_identity, &m.node_identity, 0o600),
    ];
    let ca = crate::trust::k3s_ca::FILES
        .iter()
        .zip(&paths.k3s_ca)
        .zip(&m.k3s_ca)
        .map(|((f, p), (_, pem))| {
            (
                p.as_path(),
                pem.as_str(),
                if f.private { 0o600 } else { 0o644 },
            )
        });
    for (path, content, mode) in files.into_iter().chain(ca) {
        if !select(path) {
            continue;
        }
        crate::sys::util::write_atomic_mode(path, content.as_bytes(), mode)?;
        written.push(path.to_path_buf());
    }
    if paths.gitignore.symlink_metadata().is_err() {
        crate::sys::util::write_atomic_mode(&paths.gitignore, GITIGNORE.as_bytes(), 0o644)?;
        written.push(paths.gitignore.clone());
    }
    sync_dir(keys_dir)?;
    Ok(written)
}

fn validate_cluster_name(name: &str) -> Result<()> {
    if name.is_empty() {
        bail!("cluster name is empty; set `name` in recipes/cluster.toml");
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!(
            "cluster name {name:?} contains whitespace or control characters; it becomes the \
             SSH key comment kiln@<name>, which must be one word"
        );
    }
    Ok(())
}

fn generate(cluster_name: &str, rsa_bits: usize) -> Result<Material> {
    // SSH: OpenSSH Ed25519 key with comment kiln@<cluster>.
    let mut ssh = ssh_key::PrivateKey::random(&mut OsRng, ssh_key::Algorithm::Ed25519)
        .context("generating the SSH Ed25519 key")?;
    ssh.set_comment(format!("kiln@{cluster_name}"));
    let ssh_private = ssh
        .to_openssh(ssh_key::LineEnding::LF)
        .context("encoding the SSH private key")?;
    let ssh_public_line = ssh
        .public_key()
        .to_openssh()
        .context("encoding the SSH public key")?;

    let signing = ed25519_dalek::SigningKey::generate(&mut OsRng);
    let (signing_private, signing_public_b64) = encode_signing_key(&signing)?;

    // Sealed secrets: RSA key + self-signed certificate.
    let rsa = RsaPrivateKey::new(&mut OsRng, rsa_bits)
        .with_context(|| format!("generating the RSA-{rsa_bits} sealed-secrets key"))?;
    let rsa_private = rsa
        .to_pkcs1_pem(LineEnding::LF)
        .context("encoding the sealed-secrets key as PKCS#1 PEM")?;
    let cert_pem = self_signed_cert(&rsa, SEALED_SECRETS_CN, SystemTime::now())?;

    // Module signing: what DKMS would make for itself (RSA-2048, self-signed), made once per
    // project instead of once per build.
    let module = RsaPrivateKey::new(&mut OsRng, MODULE_SIGNING_RSA_BITS)
        .context("generating the RSA module-signing key")?;
    let module_key = module
        .to_pkcs8_pem(LineEnding::LF)
        .context("encoding the module-signing key as PKCS#8 PEM")?
        .to_string();
    let module_cert_pem = self_signed_cert(&module, MODULE_SIGNING_CN, SystemTime::now())?;

    // k3s token: 32 random bytes as hex.
    let mut token = [0u8; K3S_TOKEN_HEX_LEN / 2];
    OsRng.fill_bytes(&mut token);
    // Node identity: 32 random bytes as hex, the root of every node's derived identity.
    let mut identity = zeroize::Zeroizing::new([0u8; NODE_IDENTITY_HEX_LEN / 2]);
    OsRng.fill_bytes(identity.as_mut());

    Ok(Material {
        ssh_private: ssh_private.to_string(),
        ssh_public_line: format!("{ssh_public_line}\n"),
        signing_private,
        signing_public_b64,
        rsa_private: rsa_private.to_string(),
        cert_pem,
        k3s_token: format!("{}\n", hex::encode(token)),
        module_key,
        module_cert_pem,
        node_identity: format!("{}\n", hex::encode(identity.as_ref())),
        k3s_ca: crate::trust::k3s_ca::generate(SystemTime::now())?,
    })
}

/// The contents of `signing_ed25519.pem` and `signing_ed25519.pub` for `key`: Ed25519 PKCS#8 v1
/// PEM (no embedded public key: the v2 form that ed25519-dalek writes by default is rejected by
/// OpenSSL 3.0 and Python `cryptography`) and the raw public key in base64, each ending in a
/// newline.
pub fn encode_signing_key(key: &ed25519_dalek::SigningKey) -> Result<(String, String)> {
    let pem = ed25519_dalek::pkcs8::EncodePrivateKey::to_pkcs8_pem(
        &ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: key.to_bytes(),
            public_key: None,
        },
        ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF,
    )
    .context("encoding the signing key as PKCS#8")?;
    Ok((
        pem.to_string(),
        format!("{}\n", b64(key.verifying_key().as_bytes())),
    ))
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A self-signed X.509 v3 certificate for `key`, PEM: SHA-256 with RSA (PKCS#1 v1.5), subject
/// and issuer `subject` ([`SEALED_SECRETS_CN`], [`MODULE_SIGNING_CN`]), random positive 127-bit serial, valid from `now` − 1 h for
/// 10 years; basicConstraints CA:TRUE (as the controller's), keyUsage digitalSignature,
/// keyEncipherment, keyCertSign; subjectKeyIdentifier.
fn self_signed_cert(key: &RsaPrivateKey, subject: &str, now: SystemTime) -> Result<String> {
    let secs = |t: SystemTime| -> Result<SystemTime> {
        let s = t
            .duration_since(UNIX_EPOCH)
            .context("system clock is before 1970")?
            .as_secs();
        Ok(UNIX_EPOCH + Duration::from_secs(s))
    };
    let not_before = secs(now - CERT_BACKDATE)?;
    let not_after = secs(now + CERT_VALIDITY)?;
    let validity = Validity {
        not_before: Time::try_from(not_before).context("certificate notBefore")?,
        not_after: Time::try_from(not_after).context("certificate notAfter")?,
    };

    let mut serial = [0u8; 16];
    OsRng.fill_bytes(&mut serial);
    serial[0] = (serial[0] & 0x7f) | 0x40; // positive, minimal DER encoding
    let serial = SerialNumber::new(&serial).context("certificate serial number")?;

    let subject = Name::from_str(subject).context("certificate subject")?;
    let public = RsaPublicKey::from(key);
    let spki_der = public
        .to_public_key_der()
        .context("encoding the RSA public key")?;
    let spki = SubjectPublicKeyInfoOwned::from_der(spki_der.as_bytes())
        .context("decoding the RSA public key info")?;
    let ski = SubjectKeyIdentifier::try_from(spki.owned_to_ref())
        .context("computing the subject key identifier")?;

    let signer = rsa::pkcs1v15::SigningKey::<Sha256>::new(key.clone());
    let mut builder = CertificateBuilder::new(
        Profile::Manual { issuer: None },
        serial,
        validity,
        subject,
        spki,
        &signer,
    )
    .context("preparing the certificate")?;
    builder
        .add_extension(&BasicConstraints {
            ca: true,
            path_len_constraint: None,
        })
        .context("adding basicConstraints")?;
    builder
        .add_extension(&KeyUsage(
            KeyUsages::DigitalSignature | KeyUsages::KeyEncipherment | KeyUsages::KeyCertSign,
        ))
        .context("adding keyUsage")?;
    builder
        .add_extension(&ski)
        .context("adding subjectKeyIdentifier")?;
    let cert = builder
        .build::<rsa::pkcs1v15::Signature>()
        .context("signing the certificate")?;
    cert.to_pem(LineEnding::LF)
        .context("encoding the certificate as PEM")
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Errors ([`KeysError::InsecurePermissions`]) if any existing private key file in `keys_dir` is
/// readable, writable or executable by group or others. Missing files are not an error.
pub fn check_private_permissions(keys_dir: &Path) -> Result<()> {
    let paths = KeyPaths::new(keys_dir);
    let mut bad = Vec::new();
    for p in paths.private_files() {
        match fs::metadata(p) {
            Ok(md) => {
                let mode = md.permissions().mode();
                if mode & 0o077 != 0 {
                    bad.push((p.to_path_buf(), mode & 0o7777));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(KeysError::InsecurePermissions(bad).into())
    }
}

/// What is wrong with the modes of `keys_dir` and its files, one line each with the `chmod`
/// that fixes it: a private file readable (or writable) by group or others leaks the cluster's
/// secrets; a public file or the directory writable by group or others lets someone swap the
/// trusted signing key. Missing files are not reported. `kiln keys show` and `kiln doctor`
/// print these; `kiln build` refuses the first kind ([`check_private_permissions`]).
pub fn permission_warnings(keys_dir: &Path) -> Vec<String> {
    let paths = KeyPaths::new(keys_dir);
    let mode = |p: &Path| {
        fs::metadata(p)
            .ok()
            .map(|m| m.permissions().mode() & 0o7777)
    };
    let mut v = Vec::new();
    if let Some(m) = mode(keys_dir) {
        if m & 0o022 != 0 {
            v.push(format!(
                "{} is writable by group/others (mode {m:04o}): anyone in them can replace the \
                 keys; fix: chmod go-w {}",
                keys_dir.display(),
                keys_dir.display()
            ));
        }
    }
    for p in paths.private_files() {
        match mode(p) {
            Some(m) if m & 0o077 != 0 => v.push(format!(
                "{} is a private key file readable by group/others (mode {m:04o}); fix: chmod 600 {}",
                p.display(),
                p.display()
            )),
            _ => {}
        }
    }
    for p in paths.public_files() {
        match mode(p) {
            Some(m) if m & 0o022 != 0 => v.push(format!(
                "{} is writable by group/others (mode {m:04o}); fix: chmod 644 {}",
                p.display(),
                p.display()
            )),
            _ => {}
        }
    }
    v
}

/// Describes every key file in `keys_dir` (missing ones included, `present: false`) with a
/// fingerprint. Never returns secret material: the token is reported only as present.
pub fn show(keys_dir: &Path) -> Result<Vec<KeyInfo>> {
    let paths = KeyPaths::new(keys_dir);
    let mut out = Vec::new();
    let mut entries: Vec<(&Path, Describe)> = vec![
        (&paths.ssh_private, describe_ssh_private),
        (&paths.ssh_public, describe_ssh_public),
        (&paths.authorized_keys, describe_authorized_keys),
        (&paths.signing_private, describe_signing_private),
        (&paths.signing_public, describe_signing_public),
        (&paths.sealed_secrets_key, describe_rsa_private),
        (&paths.sealed_secrets_cert, describe_cert),
        (&paths.k3s_token, describe_token),
        (&paths.module_signing_key, describe_module_key),
        (&paths.module_signing_cert, describe_cert),
        (&paths.node_identity, describe_node_identity),
    ];
    for (f, p) in crate::trust::k3s_ca::FILES.iter().zip(&paths.k3s_ca) {
        let d: Describe = if !f.private {
            describe_cert
        } else if f.key_name == "k3s-service.key" {
            describe_service_key
        } else {
            describe_ca_key
        };
        entries.push((p.as_path(), d));
    }
    for (path, describe) in entries {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let info = match crate::sys::util::read_small(path, limits::KEY_FILE, "key file") {
            Ok(bytes) => {
                let (kind, fingerprint) =
                    describe(&bytes).with_context(|| format!("reading {}", path.display()))?;
                let allowed_signers = (path == paths.signing_public.as_path())
                    .then(|| {
                        crate::trust::sign::parse_verifying_key(utf8(&bytes).ok()?.trim()).ok()
                    })
                    .flatten()
                    .map(|k| crate::trust::sign::allowed_signers_line(&k));
                KeyInfo {
                    name,
                    path: path.to_path_buf(),
                    kind,
                    present: true,
                    fingerprint,
                    allowed_signers,
                }
            }
            Err(e) if crate::sys::util::is_not_found(&e) => KeyInfo {
                name,
                path: path.to_path_buf(),
                kind: "missing (run `kiln keys init`)".to_string(),
                present: false,
                fingerprint: "missing".to_string(),
                allowed_signers: None,
            },
            Err(e) => return Err(e),
        };
        out.push(info);
    }
    // Cross-checks: the public halves must belong to the private ones.
    flag_mismatch(&mut out, "ssh_ed25519", "ssh_ed25519.pub");
    flag_mismatch(&mut out, "signing_ed25519.pem", "signing_ed25519.pub");
    for (key_p, cert_p) in [
        (&paths.sealed_secrets_key, &paths.sealed_secrets_cert),
        (&paths.module_signing_key, &paths.module_signing_cert),
    ] {
        if let (Ok(key), Ok(cert)) = (read_key_file(key_p), read_key_file(cert_p)) {
            if let (Ok(k), Ok(c)) = (parse_rsa_private(&key), pem::parse_cert(&cert)) {
                if RsaPublicKey::from(&k) != c {
                    let (kn, cn) = (file_name(key_p), file_name(cert_p));
                    for i in out.iter_mut().filter(|i| i.name == cn) {
                        i.kind
                            .push_str(&format!(" — DOES NOT MATCH {kn} (re-run kiln keys init)"));
                    }
                }
            }
        }
    }
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The module-signing key pair as DKMS takes it: the private key PEM and the certificate DER.
pub struct ModuleSigning {
    /// PKCS#8 (or PKCS#1) PEM, as in `keys/module-signing.key`.
    pub key_pem: zeroize::Zeroizing<String>,
    /// The certificate in DER (DKMS's `mok.pub`, what `mokutil --import` takes).
    pub cert_der: Vec<u8>,
}

impl ModuleSigning {
    /// sha256 (hex) of the certificate DER: identifies the key in build ids.
    pub fn cert_sha256(&self) -> String {
        crate::sys::util::sha256_hex(&self.cert_der)
    }
}

/// Reads and cross-checks `keys/module-signing.{key,crt}` (a recipe with
/// `debian.sign_modules = true` needs them). Errors name the file and how to fix it.
pub fn module_signing(keys_dir: &Path) -> Result<ModuleSigning> {
    let paths = KeyPaths::new(keys_dir);
    let user_err = |file: &Path, problem: String, fix: &str| -> anyhow::Error {
        crate::project::recipe::RecipeError::new(file, "(module-signing key)", problem, fix).into()
    };
    let fix_missing = "run `kiln keys init --add-missing` (adds the module-signing key, keeps every other key), or set debian.sign_modules = false";
    let key_pem =
        zeroize::Zeroizing::new(read_key_file(&paths.module_signing_key).map_err(|e| {
            user_err(
                &paths.module_signing_key,
                format!("cannot read: {e:#}"),
                fix_missing,
            )
        })?);
    let cert_pem = read_key_file(&paths.module_signing_cert).map_err(|e| {
        user_err(
            &paths.module_signing_cert,
            format!("cannot read: {e:#}"),
            fix_missing,
        )
    })?;
    let key = parse_rsa_private(&key_pem).map_err(|e| {
        user_err(
            &paths.module_signing_key,
            format!("{e:#}"),
            "restore the key from your backup or make a new pair with `kiln keys init --add-missing` after moving both files away",
        )
    })?;
    let cert_der = pem::first_cert_der(&cert_pem).map_err(|e| {
        user_err(
            &paths.module_signing_cert,
            format!("{e:#}"),
            "restore the certificate from your backup",
        )
    })?;
    let public = pem::parse_cert(&cert_pem).map_err(|e| {
        user_err(
            &paths.module_signing_cert,
            format!("{e:#}"),
            "restore the certificate from your backup",
        )
    })?;
    if RsaPublicKey::from(&key) != public {
        return Err(user_err(
            &paths.module_signing_cert,
            "the certificate is not for module-signing.key".into(),
            "restore the matching pair from your backup (modules signed with the old key need the old certificate enrolled)",
        ));
    }
    Ok(ModuleSigning { key_pem, cert_der })
}

/// A key, certificate or token file's text: a regular file of at most [`limits::KEY_FILE`]
/// bytes ([`crate::sys::util::InputFileError`] otherwise, exit status 2).
pub fn read_key_file(path: &Path) -> Result<String> {
    crate::sys::util::read_small_string(path, limits::KEY_FILE, "key file")
}

fn describe_module_key(bytes: &[u8]) -> Result<(String, String)> {
    let k = parse_rsa_private(utf8(bytes)?)?;
    let public = RsaPublicKey::from(&k);
    Ok((
        format!("RSA-{} module-signing private key (PEM)", public.n().bits()),
        rsa_ssh_fingerprint(&public)?,
    ))
}

type Describe = fn(&[u8]) -> Result<(String, String)>;

fn flag_mismatch(infos: &mut [KeyInfo], private: &str, public: &str) {
    let fp = |n: &str| {
        infos
            .iter()
            .find(|i| i.name == n && i.present)
            .map(|i| i.fingerprint.clone())
    };
    if let (Some(a), Some(b)) = (fp(private), fp(public)) {
        if a != b {
            for i in infos.iter_mut().filter(|i| i.name == public) {
                i.kind.push_str(&format!(" — DOES NOT MATCH {private}"));
            }
        }
    }
}

fn utf8(bytes: &[u8]) -> Result<&str> {
    std::str::from_utf8(bytes).context("not UTF-8 text")
}

fn describe_ssh_private(bytes: &[u8]) -> Result<(String, String)> {
    let k = ssh_key::PrivateKey::from_openssh(bytes).context("not an OpenSSH private key")?;
    let kind = format!(
        "{} private key (OpenSSH{}), comment {:?}",
        k.algorithm(),
        if k.is_encrypted() { ", encrypted" } else { "" },
        k.comment()
    );
    Ok((kind, k.fingerprint(ssh_key::HashAlg::Sha256).to_string()))
}

fn describe_ssh_public(bytes: &[u8]) -> Result<(String, String)> {
    let k = ssh_key::PublicKey::from_openssh(utf8(bytes)?.trim())
        .context("not an OpenSSH public key line")?;
    let kind = format!("{} public key, comment {:?}", k.algorithm(), k.comment());
    Ok((kind, k.fingerprint(ssh_key::HashAlg::Sha256).to_string()))
}

fn describe_authorized_keys(bytes: &[u8]) -> Result<(String, String)> {
    let mut fps = Vec::new();
    for (i, line) in utf8(bytes)?.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let k = ssh_key::PublicKey::from_openssh(line)
            .with_context(|| format!("line {} is not an OpenSSH public key", i + 1))?;
        fps.push(k.fingerprint(ssh_key::HashAlg::Sha256).to_string());
    }
    Ok((
        format!("authorized_keys ({} key(s))", fps.len()),
        fps.join(" "),
    ))
}

fn signing_fingerprint(public: &[u8; 32]) -> String {
    hex::encode(Sha256::digest(public))
}

fn describe_signing_private(bytes: &[u8]) -> Result<(String, String)> {
    let k = <ed25519_dalek::SigningKey as ed25519_dalek::pkcs8::DecodePrivateKey>::from_pkcs8_pem(
        utf8(bytes)?,
    )
    .context("not an Ed25519 PKCS#8 PEM private key")?;
    Ok((
        "ed25519 signing private key (PKCS#8 PEM)".to_string(),
        signing_fingerprint(k.verifying_key().as_bytes()),
    ))
}

fn describe_signing_public(bytes: &[u8]) -> Result<(String, String)> {
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(utf8(bytes)?.trim())
        .context("not base64")?;
    let raw: [u8; 32] = raw
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("expected a 32-byte Ed25519 key, got {} bytes", raw.len()))?;
    Ok((
        "ed25519 signing public key (raw 32 bytes, base64)".to_string(),
        signing_fingerprint(&raw),
    ))
}

/// `SHA256:<base64 unpadded>` of an RSA public key in SSH wire form: what the sealed-secrets
/// controller logs as the key's fingerprint.
pub fn rsa_ssh_fingerprint(key: &RsaPublicKey) -> Result<String> {
    let data = ssh_key::public::RsaPublicKey {
        e: ssh_key::Mpint::from_positive_bytes(&key.e().to_bytes_be())
            .context("encoding the RSA exponent")?,
        n: ssh_key::Mpint::from_positive_bytes(&key.n().to_bytes_be())
            .context("encoding the RSA modulus")?,
    };
    let pk = ssh_key::PublicKey::from(data);
    Ok(pk.fingerprint(ssh_key::HashAlg::Sha256).to_string())
}

fn describe_rsa_private(bytes: &[u8]) -> Result<(String, String)> {
    let k = parse_rsa_private(utf8(bytes)?)?;
    let public = RsaPublicKey::from(&k);
    Ok((
        format!("RSA-{} sealed-secrets private key (PEM)", public.n().bits()),
        rsa_ssh_fingerprint(&public)?,
    ))
}

/// A k3s CA's private key (ECDSA P-256, PKCS#8 PEM): its kind and the sha256 of its public key.
fn describe_ca_key(bytes: &[u8]) -> Result<(String, String)> {
    let k = rcgen::KeyPair::from_pem(utf8(bytes)?).context("not a PEM private key")?;
    Ok((
        "k3s CA private key (PEM)".to_string(),
        format!(
            "SHA256:{}",
            crate::sys::util::sha256_hex(&k.public_key_der())
        ),
    ))
}

/// k3s's service-account signing key (RSA, PKCS#1 PEM).
fn describe_service_key(bytes: &[u8]) -> Result<(String, String)> {
    let k = parse_rsa_private(utf8(bytes)?)?;
    let public = RsaPublicKey::from(&k);
    Ok((
        format!(
            "RSA-{} k3s service-account signing key (PEM)",
            public.n().bits()
        ),
        rsa_ssh_fingerprint(&public)?,
    ))
}

fn describe_cert(bytes: &[u8]) -> Result<(String, String)> {
    let pem = utf8(bytes)?;
    let der = pem::first_cert_der(pem)?;
    let cert = x509_cert::Certificate::from_der(&der).context("invalid X.509 certificate")?;
    let algorithm = match pem::parse_cert(pem) {
        Ok(public) => format!("RSA-{}", public.n().bits()),
        Err(_) => "ECDSA".to_string(),
    };
    let not_after = cert.tbs_certificate.validity.not_after.to_date_time();
    let kind = format!(
        "X.509 certificate {}, subject {}, valid until {:04}-{:02}-{:02}",
        algorithm,
        cert.tbs_certificate.subject,
        not_after.year(),
        not_after.month(),
        not_after.day()
    );
    // Re-encode to be sure the fingerprint is over canonical DER.
    let der = cert.to_der().context("re-encoding the certificate")?;
    Ok((kind, cert_fingerprint(&der)))
}

/// The node-identity secret is reported only as present, with its length and whether it is
/// well formed (a build refuses anything else).
fn describe_node_identity(bytes: &[u8]) -> Result<(String, String)> {
    let t = utf8(bytes)?.trim();
    let n = t.chars().count();
    let kind = if parse_node_identity(t).is_some() {
        "node-identity secret (machine-id, k3s node password, SSH host keys)".to_string()
    } else {
        format!("node-identity secret — MALFORMED (want {NODE_IDENTITY_HEX_LEN} hex characters)")
    };
    Ok((kind, format!("present ({n} chars)")))
}

/// The 32 bytes of a node-identity secret (the file's text, trimmed): exactly
/// [`NODE_IDENTITY_HEX_LEN`] hex digits, or `None`.
pub fn parse_node_identity(text: &str) -> Option<[u8; 32]> {
    if text.len() != NODE_IDENTITY_HEX_LEN {
        return None;
    }
    let v = hex::decode(text).ok()?;
    v.try_into().ok()
}

fn describe_token(bytes: &[u8]) -> Result<(String, String)> {
    let n = utf8(bytes)?.trim().chars().count();
    Ok((
        "k3s cluster token".to_string(),
        format!("present ({n} chars)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BITS: usize = 2048;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn init_writes_every_file_with_the_right_mode() {
        let d = tempfile::tempdir().unwrap();
        let keys = d.path().join("keys");
        let written = init_with_rsa_bits(&keys, "lab", false, BITS).unwrap();
        let p = KeyPaths::new(&keys);
        assert_eq!(written.len(), 12 + crate::trust::k3s_ca::FILES.len());
        for f in p.private_files() {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        for f in p.public_files() {
            assert_eq!(mode(f), 0o644, "{}", f.display());
        }
        assert_eq!(mode(&p.gitignore), 0o644);
        assert_eq!(fs::read_to_string(&p.gitignore).unwrap(), GITIGNORE);
        // No temp files left behind.
        let names: Vec<String> = fs::read_dir(&keys)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with(".tmp-")), "{names:?}");
        check_private_permissions(&keys).unwrap();

        let pub_line = fs::read_to_string(&p.ssh_public).unwrap();
        assert!(pub_line.starts_with("ssh-ed25519 AAAA"), "{pub_line}");
        assert!(pub_line.ends_with(" kiln@lab\n"), "{pub_line}");
        assert_eq!(fs::read_to_string(&p.authorized_keys).unwrap(), pub_line);
        let token = fs::read_to_string(&p.k3s_token).unwrap();
        assert_eq!(token.trim().len(), 64);
        assert!(token.trim().chars().all(|c| c.is_ascii_hexdigit()));
        let ident = fs::read_to_string(&p.node_identity).unwrap();
        assert!(ident.ends_with('\n') && parse_node_identity(ident.trim()).is_some());
        assert_ne!(ident, token, "independent secrets");
        let signing_pub = fs::read_to_string(&p.signing_public).unwrap();
        assert_eq!(signing_pub.trim().len(), 44);
        // PKCS#8 v1 (48 bytes of DER, no embedded public key) for OpenSSL/Python interop.
        let signing_pem = fs::read_to_string(&p.signing_private).unwrap();
        let (label, der) = x509_cert::der::pem::decode_vec(signing_pem.as_bytes()).unwrap();
        assert_eq!((label, der.len()), ("PRIVATE KEY", 48));
        assert!(fs::read_to_string(&p.sealed_secrets_key)
            .unwrap()
            .starts_with("-----BEGIN RSA PRIVATE KEY-----"));
        let key = parse_rsa_private(&fs::read_to_string(&p.sealed_secrets_key).unwrap()).unwrap();
        let cert = pem::parse_cert(&fs::read_to_string(&p.sealed_secrets_cert).unwrap()).unwrap();
        assert_eq!(RsaPublicKey::from(&key), cert);
    }

    #[test]
    fn add_missing_makes_only_whole_missing_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = KeyPaths::new(d.path());
        init_with_rsa_bits(d.path(), "lab", false, BITS).unwrap();
        // A project from before module signing existed.
        fs::remove_file(&p.module_signing_key).unwrap();
        fs::remove_file(&p.module_signing_cert).unwrap();
        let keep: Vec<Vec<u8>> = p
            .generated_files()
            .iter()
            .filter(|f| f.exists())
            .map(|f| fs::read(f).unwrap())
            .collect();
        let w = add_missing(d.path(), "lab", BITS).unwrap();
        assert_eq!(
            w,
            [p.module_signing_key.clone(), p.module_signing_cert.clone()]
        );
        assert_eq!(mode(&p.module_signing_key), 0o600);
        assert_eq!(mode(&p.module_signing_cert), 0o644);
        let now: Vec<Vec<u8>> = p
            .generated_files()
            .iter()
            .filter(|f| **f != p.module_signing_key && **f != p.module_signing_cert)
            .map(|f| fs::read(f).unwrap())
            .collect();
        assert_eq!(keep, now, "existing keys untouched");
        let ms = module_signing(d.path()).unwrap();
        assert_eq!(ms.cert_sha256().len(), 64);
        assert!(ms.key_pem.contains("-----BEGIN PRIVATE KEY-----"));
        // The DER certificate carries the subject DKMS's modinfo shows as the signer.
        let c = x509_cert::Certificate::from_der(&ms.cert_der).unwrap();
        assert!(c
            .tbs_certificate
            .subject
            .to_string()
            .contains("kiln module signing key"));
        // Complete: nothing to do. Half a key: refused, naming both halves.
        assert!(add_missing(d.path(), "lab", BITS).unwrap().is_empty());
        fs::remove_file(&p.signing_public).unwrap();
        let e = format!("{:#}", add_missing(d.path(), "lab", BITS).unwrap_err());
        assert!(
            e.contains("signing key is incomplete") && e.contains("signing_ed25519.pub"),
            "{e}"
        );
        assert!(!p.signing_public.exists());
    }

    #[test]
    fn add_missing_adds_only_the_node_identity_key_to_an_older_project() {
        let d = tempfile::tempdir().unwrap();
        let p = KeyPaths::new(d.path());
        init_with_rsa_bits(d.path(), "lab", false, BITS).unwrap();
        // A project made before node identity existed.
        fs::remove_file(&p.node_identity).unwrap();
        let before: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|f| (f.clone(), fs::read(&f).unwrap()))
            .collect();
        // `init` without --add-missing refuses (the other keys exist)...
        assert!(init_with_rsa_bits(d.path(), "lab", false, BITS).is_err());
        assert!(!p.node_identity.exists());
        // ...--add-missing writes exactly the new key, 0600, and touches nothing else.
        let w = add_missing(d.path(), "lab", BITS).unwrap();
        assert_eq!(w, std::slice::from_ref(&p.node_identity));
        assert_eq!(mode(&p.node_identity), 0o600);
        let text = fs::read_to_string(&p.node_identity).unwrap();
        assert_eq!(text.len(), NODE_IDENTITY_HEX_LEN + 1);
        assert!(parse_node_identity(text.trim()).is_some());
        for (f, bytes) in before {
            assert_eq!(fs::read(&f).unwrap(), bytes, "{} changed", f.display());
        }
        // The .gitignore keeps it out of git (only *.pub, *.crt, authorized_keys pass).
        assert!(!GITIGNORE.lines().any(|l| l == "!node-identity.key"));
        check_private_permissions(d.path()).unwrap();
        fs::set_permissions(&p.node_identity, fs::Permissions::from_mode(0o644)).unwrap();
        let e = check_private_permissions(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("node-identity.key") && e.contains("chmod 600"),
            "{e}"
        );
    }

    #[test]
    fn node_identity_parsing_is_strict() {
        assert!(parse_node_identity(&"ab".repeat(32)).is_some());
        assert!(parse_node_identity(&"ab".repeat(31)).is_none());
        assert!(parse_node_identity(&"zz".repeat(32)).is_none());
        assert!(parse_node_identity("").is_none());
        let (kind, fp) = describe_node_identity(b"short\n").unwrap();
        assert!(kind.contains("MALFORMED"), "{kind}");
        assert_eq!(fp, "present (5 chars)");
    }

    #[test]
    fn init_refuses_to_overwrite_and_force_replaces() {
        let d = tempfile::tempdir().unwrap();
        let keys = d.path();
        init_with_rsa_bits(keys, "lab", false, BITS).unwrap();
        let p = KeyPaths::new(keys);
        let before = fs::read(&p.ssh_private).unwrap();
        let err = init_with_rsa_bits(keys, "lab", false, BITS).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("refusing to overwrite"), "{msg}");
        assert!(msg.contains("ssh_ed25519"), "{msg}");
        assert!(msg.contains("--force"), "{msg}");
        assert!(matches!(
            err.downcast_ref::<KeysError>(),
            Some(KeysError::AlreadyExists(v)) if v.len() == 11 + crate::trust::k3s_ca::FILES.len()
        ));
        assert_eq!(fs::read(&p.ssh_private).unwrap(), before);

        // A single leftover file also blocks.
        let d2 = tempfile::tempdir().unwrap();
        fs::write(d2.path().join("k3s-token"), "x").unwrap();
        let msg = format!(
            "{:#}",
            init_with_rsa_bits(d2.path(), "lab", false, BITS).unwrap_err()
        );
        assert!(msg.contains("k3s-token"), "{msg}");

        // A custom .gitignore is kept, even with --force.
        fs::write(&p.gitignore, "custom\n").unwrap();
        let written = init_with_rsa_bits(keys, "lab", true, BITS).unwrap();
        assert_eq!(written.len(), 11 + crate::trust::k3s_ca::FILES.len());
        assert_ne!(fs::read(&p.ssh_private).unwrap(), before);
        assert_eq!(fs::read_to_string(&p.gitignore).unwrap(), "custom\n");
        assert_eq!(mode(&p.ssh_private), 0o600);
    }

    #[test]
    fn force_fixes_a_loose_mode() {
        let d = tempfile::tempdir().unwrap();
        init_with_rsa_bits(d.path(), "lab", false, BITS).unwrap();
        let p = KeyPaths::new(d.path());
        fs::set_permissions(&p.k3s_token, fs::Permissions::from_mode(0o666)).unwrap();
        init_with_rsa_bits(d.path(), "lab", true, BITS).unwrap();
        assert_eq!(mode(&p.k3s_token), 0o600);
    }

    #[test]
    fn check_private_permissions_names_the_file_and_the_fix() {
        let d = tempfile::tempdir().unwrap();
        init_with_rsa_bits(d.path(), "lab", false, BITS).unwrap();
        let p = KeyPaths::new(d.path());
        fs::set_permissions(&p.sealed_secrets_key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = check_private_permissions(d.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("sealed-secrets.key"), "{msg}");
        assert!(msg.contains("0644"), "{msg}");
        assert!(
            msg.contains(&format!("chmod 600 {}", p.sealed_secrets_key.display())),
            "{msg}"
        );
        assert!(matches!(
            err.downcast_ref::<KeysError>(),
            Some(KeysError::InsecurePermissions(v)) if v.len() == 1
        ));
        // Public files may be world-readable; missing files are fine.
        fs::set_permissions(&p.sealed_secrets_key, fs::Permissions::from_mode(0o600)).unwrap();
        fs::remove_file(&p.k3s_token).unwrap();
        check_private_permissions(d.path()).unwrap();
        check_private_permissions(&d.path().join("nope")).unwrap();
    }

    #[test]
    fn show_reports_fingerprints_and_never_secrets() {
        let d = tempfile::tempdir().unwrap();
        init_with_rsa_bits(d.path(), "lab", false, BITS).unwrap();
        let p = KeyPaths::new(d.path());
        let infos = show(d.path()).unwrap();
        assert_eq!(infos.len(), 11 + crate::trust::k3s_ca::FILES.len());
        assert!(infos.iter().all(|i| i.present));
        let get = |n: &str| infos.iter().find(|i| i.name == n).unwrap().clone();

        let ssh = get("ssh_ed25519");
        assert!(ssh.fingerprint.starts_with("SHA256:"), "{ssh:?}");
        assert_eq!(ssh.fingerprint, get("ssh_ed25519.pub").fingerprint);
        assert_eq!(ssh.fingerprint, get("authorized_keys").fingerprint);
        let sign = get("signing_ed25519.pem");
        assert_eq!(sign.fingerprint.len(), 64);
        assert_eq!(sign.fingerprint, get("signing_ed25519.pub").fingerprint);
        let cert = get("sealed-secrets.crt");
        assert_eq!(cert.fingerprint.len(), 32 * 3 - 1);
        assert!(cert
            .fingerprint
            .chars()
            .all(|c| c == ':' || c.is_ascii_digit() || c.is_ascii_uppercase()));
        assert!(!cert.kind.contains("DOES NOT MATCH"), "{cert:?}");
        assert!(get("sealed-secrets.key").fingerprint.starts_with("SHA256:"));
        assert_eq!(get("k3s-token").fingerprint, "present (64 chars)");
        let ni = get("node-identity.key");
        assert_eq!(ni.fingerprint, "present (64 chars)");
        assert!(ni.kind.starts_with("node-identity secret ("), "{ni:?}");
        let ident = fs::read_to_string(&p.node_identity).unwrap();
        let mk = get("module-signing.key");
        assert!(mk.kind.starts_with("RSA-2048 module-signing"), "{mk:?}");
        let mc = get("module-signing.crt");
        assert!(mc.kind.contains("kiln module signing key"), "{mc:?}");
        assert!(!mc.kind.contains("DOES NOT MATCH"), "{mc:?}");

        // Nothing secret anywhere in the output.
        let json = serde_json::to_string(&infos).unwrap();
        let token = fs::read_to_string(&p.k3s_token).unwrap();
        assert!(!json.contains(token.trim()));
        assert!(!json.contains(ident.trim()));
        for f in p.private_files() {
            let body = fs::read_to_string(f).unwrap();
            for line in body
                .lines()
                .filter(|l| l.len() > 20 && !l.starts_with("-----"))
            {
                assert!(!json.contains(line), "{} leaked", f.display());
            }
        }

        // Missing files are reported, mismatches flagged.
        fs::remove_file(&p.k3s_token).unwrap();
        let d2 = tempfile::tempdir().unwrap();
        init_with_rsa_bits(d2.path(), "lab", false, BITS).unwrap();
        let p2 = KeyPaths::new(d2.path());
        fs::copy(&p2.ssh_public, &p.ssh_public).unwrap();
        fs::copy(&p2.sealed_secrets_cert, &p.sealed_secrets_cert).unwrap();
        let infos = show(d.path()).unwrap();
        let get = |n: &str| infos.iter().find(|i| i.name == n).unwrap().clone();
        assert!(!get("k3s-token").present);
        assert_eq!(get("k3s-token").fingerprint, "missing");
        assert!(get("ssh_ed25519.pub").kind.contains("DOES NOT MATCH"));
        assert!(get("sealed-secrets.crt").kind.contains("DOES NOT MATCH"));
    }

    #[test]
    fn cert_is_self_signed_with_expected_fields() {
        use rsa::signature::Verifier;
        let key = RsaPrivateKey::new(&mut OsRng, BITS).unwrap();
        let now = SystemTime::now();
        let pem = self_signed_cert(&key, SEALED_SECRETS_CN, now).unwrap();
        let der = pem::first_cert_der(&pem).unwrap();
        let cert = x509_cert::Certificate::from_der(&der).unwrap();
        let tbs = &cert.tbs_certificate;
        assert_eq!(tbs.subject.to_string(), tbs.issuer.to_string());
        assert!(tbs.subject.to_string().contains("CN=sealed-secret"));
        let nb = tbs.validity.not_before.to_system_time();
        let na = tbs.validity.not_after.to_system_time();
        let d = na.duration_since(nb).unwrap();
        assert!((d.as_secs() as i64 - (CERT_VALIDITY + CERT_BACKDATE).as_secs() as i64).abs() <= 1);
        assert!(nb < now && now < na);
        // The signature verifies with the key's own public half (SHA-256 with RSA).
        let vk = rsa::pkcs1v15::VerifyingKey::<Sha256>::new(RsaPublicKey::from(&key));
        let tbs_der = tbs.to_der().unwrap();
        let sig = rsa::pkcs1v15::Signature::try_from(cert.signature.raw_bytes()).unwrap();
        vk.verify(&tbs_der, &sig).unwrap();
        assert_eq!(
            cert.signature_algorithm.oid.to_string(),
            "1.2.840.113549.1.1.11"
        );
        let exts = tbs.extensions.as_ref().unwrap();
        assert_eq!(exts.len(), 3);
        assert_eq!(cert_fingerprint(&der).len(), 95);
    }

    #[test]
    fn bad_cluster_names_are_rejected() {
        let d = tempfile::tempdir().unwrap();
        assert!(init_with_rsa_bits(d.path(), "", false, BITS).is_err());
        assert!(init_with_rsa_bits(d.path(), "a b", false, BITS).is_err());
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
