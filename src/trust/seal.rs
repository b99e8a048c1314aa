//! kubeseal-compatible sealing of Kubernetes Secrets into bitnami `SealedSecret`s, offline.
//!
//! The format is the one of bitnami-labs/sealed-secrets (`pkg/crypto/crypto.go` and
//! `pkg/apis/sealedsecrets/v1alpha1`), so the in-cluster controller decrypts what kiln seals.
//!
//! ## One sealed value ([`hybrid_encrypt`])
//!
//! ```text
//! session key  = 32 random bytes
//! rsa_ct       = RSA-OAEP(SHA-256, MGF1-SHA-256, label)(controller public key, session key)
//! gcm_ct‖tag   = AES-256-GCM(session key, nonce = 12 zero bytes, no AAD)(plaintext)
//! output       = u16 big-endian len(rsa_ct) ‖ rsa_ct ‖ gcm_ct‖tag
//! ```
//!
//! The zero nonce is safe because every session key encrypts exactly one value. `len(rsa_ct)` is
//! the modulus size in bytes (512 for RSA-4096), so an output is `2 + 512 + len(plaintext) + 16`
//! bytes; it is stored base64 (standard alphabet, padded) in `spec.encryptedData[key]`.
//!
//! ## Scope and label ([`Scope`])
//!
//! The OAEP label binds a value to where it may be unsealed: strict `"<namespace>/<name>"`,
//! namespace-wide `"<namespace>"`, cluster-wide `""`. The controller derives the label from the
//! SealedSecret's own `metadata` (name, namespace and the annotations
//! `sealedsecrets.bitnami.com/namespace-wide: "true"` / `sealedsecrets.bitnami.com/cluster-wide:
//! "true"`), so a sealed value moved to another name or namespace fails to decrypt.
//!
//! ## Documents ([`seal`], [`unseal`])
//!
//! As kubeseal does: the SealedSecret's `metadata` has the Secret's name, namespace and only the
//! scope annotation; `spec.template.metadata` is the Secret's metadata (name, namespace, labels,
//! annotations, scope annotations included so that the controller's re-encryption keeps the
//! scope) minus the `kubectl`/`kubecfg` last-applied-configuration annotations, which would leak
//! the secret in clear; `spec.template.type`/`immutable` are copied. `data` (base64) and
//! `stringData` (plain) are merged, `stringData` winning, as the API server does.

use crate::project::{limits, names};
use crate::trust::pem::{parse_cert, parse_rsa_private, CertError};
use anyhow::{Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::rngs::OsRng;
use rsa::rand_core::CryptoRngCore;
use rsa::traits::PublicKeyParts;
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use serde::{Deserialize, Serialize};
use serde_yaml::Value;
use sha2::Sha256;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Annotation that makes a Secret/SealedSecret namespace-wide (value `"true"`).
pub const NAMESPACE_WIDE_ANNOTATION: &str = "sealedsecrets.bitnami.com/namespace-wide";
/// Annotation that makes a Secret/SealedSecret cluster-wide (value `"true"`).
pub const CLUSTER_WIDE_ANNOTATION: &str = "sealedsecrets.bitnami.com/cluster-wide";
/// `apiVersion` of the SealedSecret custom resource.
pub const SEALED_SECRET_API_VERSION: &str = "bitnami.com/v1alpha1";
/// Annotations stripped from the template: they hold a full copy of the Secret in clear.
pub const LAST_APPLIED_ANNOTATIONS: [&str; 2] = [
    "kubectl.kubernetes.io/last-applied-configuration",
    "kubecfg.ksonnet.io/last-applied-configuration",
];
/// Session key size: AES-256.
const SESSION_KEY_BYTES: usize = 32;
/// AES-GCM tag size.
const GCM_TAG_BYTES: usize = 16;

/// Where a sealed secret may be unsealed; selects the OAEP label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Scope {
    /// Only as this name in this namespace (label `"<namespace>/<name>"`). The default.
    #[default]
    Strict,
    /// Under any name in this namespace (label `"<namespace>"`).
    NamespaceWide,
    /// Under any name in any namespace (empty label).
    ClusterWide,
}

impl Scope {
    /// The OAEP label for a Secret `name` in `namespace`.
    pub fn label(&self, namespace: &str, name: &str) -> Vec<u8> {
        match self {
            Scope::Strict => format!("{namespace}/{name}").into_bytes(),
            Scope::NamespaceWide => namespace.as_bytes().to_vec(),
            Scope::ClusterWide => Vec::new(),
        }
    }

    /// `strict`, `namespace-wide` or `cluster-wide` (kubeseal's `--scope` values).
    pub fn as_str(&self) -> &'static str {
        match self {
            Scope::Strict => "strict",
            Scope::NamespaceWide => "namespace-wide",
            Scope::ClusterWide => "cluster-wide",
        }
    }

    /// The scope annotated on an object, as the controller reads it: cluster-wide wins over
    /// namespace-wide; only the exact value `"true"` counts.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Scope {
        let is_true = |k: &str| annotations.get(k).map(String::as_str) == Some("true");
        if is_true(CLUSTER_WIDE_ANNOTATION) {
            Scope::ClusterWide
        } else if is_true(NAMESPACE_WIDE_ANNOTATION) {
            Scope::NamespaceWide
        } else {
            Scope::Strict
        }
    }

    /// Rewrites `annotations` to declare exactly this scope (kubeseal's `UpdateScopeAnnotations`).
    pub fn set_annotations(&self, annotations: &mut BTreeMap<String, String>) {
        annotations.remove(NAMESPACE_WIDE_ANNOTATION);
        annotations.remove(CLUSTER_WIDE_ANNOTATION);
        match self {
            Scope::Strict => {}
            Scope::NamespaceWide => {
                annotations.insert(NAMESPACE_WIDE_ANNOTATION.to_string(), "true".to_string());
            }
            Scope::ClusterWide => {
                annotations.insert(CLUSTER_WIDE_ANNOTATION.to_string(), "true".to_string());
            }
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = SealError;
    fn from_str(s: &str) -> Result<Self, SealError> {
        match s {
            "strict" => Ok(Scope::Strict),
            "namespace-wide" => Ok(Scope::NamespaceWide),
            "cluster-wide" => Ok(Scope::ClusterWide),
            other => Err(SealError::BadScope(other.to_string())),
        }
    }
}

/// Why one sealed value could not be decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecryptError {
    /// Fewer bytes than a length prefix, an RSA block and a GCM tag.
    #[error("sealed value is too short ({len} bytes) to be a sealed secret")]
    TooShort {
        /// Total length of the value.
        len: usize,
    },
    /// The u16 length prefix points past the end of the value.
    #[error(
        "bad length prefix: says {prefix} bytes of RSA ciphertext but only {available} bytes follow"
    )]
    BadLengthPrefix {
        /// The prefix value.
        prefix: usize,
        /// Bytes after the prefix.
        available: usize,
    },
    /// The RSA block does not have the private key's size.
    #[error(
        "the value was sealed for a {sealed_bits}-bit RSA key but the private key is \
         {key_bits}-bit: wrong private key"
    )]
    KeySizeMismatch {
        /// Size implied by the RSA block.
        sealed_bits: usize,
        /// Size of the private key.
        key_bits: usize,
    },
    /// RSA-OAEP rejected the session key block.
    #[error(
        "RSA-OAEP could not unwrap the session key: wrong private key or wrong scope/label \
         (the value was sealed for another key, name, namespace or scope)"
    )]
    WrongKeyOrLabel,
    /// The unwrapped session key is not 32 bytes.
    #[error("the unwrapped session key is {len} bytes, not 32: not a sealed-secrets value")]
    BadSessionKey {
        /// Its length.
        len: usize,
    },
    /// AES-GCM authentication failed.
    #[error("AES-GCM authentication failed: the sealed value was tampered with or corrupted")]
    Tampered,
    /// OAEP labels must be UTF-8 in the RSA implementation kiln uses.
    #[error("the OAEP label is not UTF-8")]
    LabelNotUtf8,
}

/// Errors about the documents and keys given to [`seal`]/[`unseal`] (user errors).
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// Not YAML/JSON.
    #[error("input is not valid YAML or JSON: {0}")]
    Parse(String),
    /// Zero or several documents.
    #[error("expected exactly one Kubernetes object, found {0} documents")]
    DocumentCount(usize),
    /// `kind` is not `Secret`.
    #[error("expected a Secret (apiVersion: v1, kind: Secret), found kind: {0}")]
    NotASecret(String),
    /// `kind` is not `SealedSecret`.
    #[error("expected a SealedSecret (apiVersion: bitnami.com/v1alpha1), found kind: {0}")]
    NotASealedSecret(String),
    /// Wrong `apiVersion`.
    #[error("expected apiVersion: {expected} for a {kind}, found {found:?}")]
    WrongApiVersion {
        /// Kind being parsed.
        kind: &'static str,
        /// What it must be.
        expected: &'static str,
        /// What it is.
        found: String,
    },
    /// No `metadata.name`.
    #[error("the {0} has no metadata.name")]
    MissingName(&'static str),
    /// No namespace though the scope needs one.
    #[error(
        "the {kind} {name:?} has no metadata.namespace, which {scope} scope needs (the label is \
         bound to it): add metadata.namespace, or use --scope cluster-wide"
    )]
    MissingNamespace {
        /// Kind being parsed.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Its scope.
        scope: Scope,
    },
    /// A field has the wrong type or content (e.g. corrupt base64 in `data`).
    #[error("{field}: {problem}")]
    InvalidField {
        /// YAML path, e.g. `data.password`.
        field: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// Nothing to seal.
    #[error("the Secret {0:?} has no data or stringData: nothing to seal")]
    Empty(String),
    /// Unknown `--scope`.
    #[error("unknown scope {0:?}: use strict, namespace-wide or cluster-wide")]
    BadScope(String),
    /// The certificate is unusable (not a PEM X.509 certificate, or not RSA).
    #[error(transparent)]
    Cert(#[from] CertError),
    /// A value did not decrypt.
    #[error("cannot decrypt key {key:?} (scope {scope}, label {label:?}): {source}")]
    CannotDecrypt {
        /// `encryptedData` key.
        key: String,
        /// Scope from the SealedSecret's annotations.
        scope: Scope,
        /// The label tried.
        label: String,
        /// Why.
        #[source]
        source: DecryptError,
    },
    /// Unsupported SealedSecret features.
    #[error("{0}")]
    Unsupported(String),
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> SealError {
    SealError::InvalidField {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Seals `plaintext` for `pubkey` under `label` (see the module docs for the byte layout).
pub fn hybrid_encrypt<R: CryptoRngCore>(
    pubkey: &RsaPublicKey,
    plaintext: &[u8],
    label: &[u8],
    rng: &mut R,
) -> Result<Vec<u8>> {
    use aes_gcm::aead::{Aead, KeyInit};
    let label = std::str::from_utf8(label).map_err(|_| DecryptError::LabelNotUtf8)?;
    let mut session_key = [0u8; SESSION_KEY_BYTES];
    rng.fill_bytes(&mut session_key);

    let rsa_ct = pubkey
        .encrypt(rng, Oaep::new_with_label::<Sha256, _>(label), &session_key)
        .context("RSA-OAEP encryption of the session key")?;
    let rsa_len = u16::try_from(rsa_ct.len())
        .with_context(|| format!("RSA ciphertext of {} bytes is too long", rsa_ct.len()))?;

    let cipher =
        aes_gcm::Aes256Gcm::new(aes_gcm::Key::<aes_gcm::Aes256Gcm>::from_slice(&session_key));
    let nonce = aes_gcm::Nonce::default(); // 12 zero bytes: the session key is used once
    let gcm = cipher
        .encrypt(&nonce, plaintext)
        .map_err(|_| anyhow::anyhow!("AES-GCM encryption failed"))?;

    let mut out = Vec::with_capacity(2 + rsa_ct.len() + gcm.len());
    out.extend_from_slice(&rsa_len.to_be_bytes());
    out.extend_from_slice(&rsa_ct);
    out.extend_from_slice(&gcm);
    Ok(out)
}

/// Opens a value made by [`hybrid_encrypt`] (or kubeseal) with the private key and label.
pub fn hybrid_decrypt(
    privkey: &RsaPrivateKey,
    ciphertext: &[u8],
    label: &[u8],
) -> Result<Vec<u8>, DecryptError> {
    use aes_gcm::aead::{Aead, KeyInit};
    let label = std::str::from_utf8(label).map_err(|_| DecryptError::LabelNotUtf8)?;
    if ciphertext.len() < 2 {
        return Err(DecryptError::TooShort {
            len: ciphertext.len(),
        });
    }
    let prefix = usize::from(u16::from_be_bytes([ciphertext[0], ciphertext[1]]));
    let rest = &ciphertext[2..];
    if rest.len() < prefix {
        return Err(DecryptError::BadLengthPrefix {
            prefix,
            available: rest.len(),
        });
    }
    if prefix != privkey.size() {
        return Err(DecryptError::KeySizeMismatch {
            sealed_bits: prefix * 8,
            key_bits: privkey.size() * 8,
        });
    }
    let (rsa_ct, gcm) = rest.split_at(prefix);
    if gcm.len() < GCM_TAG_BYTES {
        return Err(DecryptError::TooShort {
            len: ciphertext.len(),
        });
    }
    let session_key = privkey
        .decrypt_blinded(&mut OsRng, Oaep::new_with_label::<Sha256, _>(label), rsa_ct)
        .map_err(|_| DecryptError::WrongKeyOrLabel)?;
    if session_key.len() != SESSION_KEY_BYTES {
        return Err(DecryptError::BadSessionKey {
            len: session_key.len(),
        });
    }
    let cipher =
        aes_gcm::Aes256Gcm::new(aes_gcm::Key::<aes_gcm::Aes256Gcm>::from_slice(&session_key));
    cipher
        .decrypt(&aes_gcm::Nonce::default(), gcm)
        .map_err(|_| DecryptError::Tampered)
}

/// Object metadata, as far as kiln keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectMeta {
    /// `metadata.name`.
    #[serde(default)]
    pub name: String,
    /// `metadata.namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `metadata.labels`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A `bitnami.com/v1alpha1` `SealedSecret`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SealedSecret {
    /// Always `bitnami.com/v1alpha1`.
    pub api_version: String,
    /// Always `SealedSecret`.
    pub kind: String,
    /// Name, namespace and the scope annotation.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Encrypted values and the template.
    pub spec: SealedSecretSpec,
}

/// `SealedSecret.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SealedSecretSpec {
    /// Key → base64 of [`hybrid_encrypt`] output, sorted by key.
    #[serde(default)]
    pub encrypted_data: BTreeMap<String, String>,
    /// Metadata, type and immutability of the Secret the controller creates.
    #[serde(default)]
    pub template: SecretTemplate,
    /// Deprecated whole-Secret ciphertext (v1 format); only read to reject it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// `SealedSecret.spec.template`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SecretTemplate {
    /// Metadata of the resulting Secret.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Secret `type`, e.g. `Opaque`, `kubernetes.io/tls`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// Secret `immutable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub immutable: Option<bool>,
    /// Templated keys (Go templates); kiln never writes them and refuses to unseal them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// A `v1` `Secret` as [`unseal`] prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct SecretOut {
    api_version: &'static str,
    kind: &'static str,
    metadata: ObjectMeta,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    type_: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    immutable: Option<bool>,
    data: BTreeMap<String, String>,
}

/// A Secret read from YAML/JSON with `data` decoded.
#[derive(Debug, Clone, PartialEq)]
struct SecretIn {
    metadata: ObjectMeta,
    type_: Option<String>,
    immutable: Option<bool>,
    values: BTreeMap<String, Vec<u8>>,
}

/// Parses exactly one YAML (or JSON, a subset) document, refused at once when it is larger
/// or nested deeper than kiln reads.
fn parse_one_document(text: &str, input: limits::YamlInput) -> Result<Value, SealError> {
    limits::check_yaml(text, input).map_err(|e| SealError::Parse(e.to_string()))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).map_err(|e| SealError::Parse(e.to_string()))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    if docs.len() != 1 {
        return Err(SealError::DocumentCount(docs.len()));
    }
    Ok(docs.remove(0))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// A string field: missing or null → `None`; other non-strings are errors.
fn opt_str(map: &serde_yaml::Mapping, key: &str, path: &str) -> Result<Option<String>, SealError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(
            path,
            format!("must be a string, found {}", type_name(other)),
        )),
    }
}

/// A `map[string]string`: null values become `""` (as Go's JSON decoding does); other
/// non-strings are errors with a hint to quote them.
fn string_map(
    map: &serde_yaml::Mapping,
    key: &str,
    path: &str,
) -> Result<BTreeMap<String, String>, SealError> {
    let mut out = BTreeMap::new();
    let m = match map.get(key) {
        None | Some(Value::Null) => return Ok(out),
        Some(Value::Mapping(m)) => m,
        Some(other) => {
            return Err(invalid(
                path,
                format!("must be a mapping, found {}", type_name(other)),
            ))
        }
    };
    for (k, v) in m {
        let k = match k {
            Value::String(s) => s.clone(),
            other => {
                return Err(invalid(
                    path,
                    format!("keys must be strings, found {}", type_name(other)),
                ))
            }
        };
        let v = match v {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            other => {
                return Err(invalid(
                    format!("{path}.{k}"),
                    format!(
                        "must be a string, found {} (quote it, e.g. \"true\")",
                        type_name(other)
                    ),
                ))
            }
        };
        out.insert(k, v);
    }
    Ok(out)
}

fn check_kind(
    root: &serde_yaml::Mapping,
    kind: &'static str,
    api_version: &'static str,
) -> Result<(), SealError> {
    let found_kind = opt_str(root, "kind", "kind")?.unwrap_or_default();
    if found_kind != kind {
        let shown = if found_kind.is_empty() {
            "(none)".to_string()
        } else {
            found_kind
        };
        return Err(if kind == "Secret" {
            SealError::NotASecret(shown)
        } else {
            SealError::NotASealedSecret(shown)
        });
    }
    let found_api = opt_str(root, "apiVersion", "apiVersion")?.unwrap_or_default();
    if found_api != api_version {
        return Err(SealError::WrongApiVersion {
            kind,
            expected: api_version,
            found: found_api,
        });
    }
    Ok(())
}

/// A Secret data key must be `[-._a-zA-Z0-9]+` (the API server rejects others).
fn check_data_key(key: &str, section: &str) -> Result<(), SealError> {
    let ok = !key.is_empty()
        && key != "."
        && key != ".."
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            format!("{section}.{key}"),
            "a Secret key may contain only letters, digits, '-', '_' and '.'",
        ))
    }
}

/// `metadata.name` (a DNS-1123 subdomain) and `metadata.namespace` (a DNS-1123 label) as the
/// API server takes them for Secrets: with a `/` in either, the strict-scope label
/// `"<namespace>/<name>"` would be ambiguous.
fn check_object_names(name: &str, namespace: Option<&str>) -> Result<(), SealError> {
    if let Some(p) = names::k8s_subdomain_problem(name) {
        return Err(invalid(
            "metadata.name",
            format!("{name:?} {p}; use e.g. \"db-credentials\""),
        ));
    }
    if let Some(ns) = namespace {
        if let Some(p) = names::k8s_label_problem(ns) {
            return Err(invalid(
                "metadata.namespace",
                format!("{ns:?} {p}; use e.g. \"default\""),
            ));
        }
    }
    Ok(())
}

fn parse_secret(text: &str) -> Result<SecretIn, SealError> {
    let root = parse_one_document(text, limits::SECRET)?;
    let root = match root {
        Value::Mapping(m) => m,
        other => {
            return Err(SealError::Parse(format!(
                "expected a mapping (a Kubernetes object), found {}",
                type_name(&other)
            )))
        }
    };
    check_kind(&root, "Secret", "v1")?;
    let meta = match root.get("metadata") {
        None | Some(Value::Null) => serde_yaml::Mapping::new(),
        Some(Value::Mapping(m)) => m.clone(),
        Some(other) => {
            return Err(invalid(
                "metadata",
                format!("must be a mapping, found {}", type_name(other)),
            ))
        }
    };
    let name = opt_str(&meta, "name", "metadata.name")?.unwrap_or_default();
    if name.is_empty() {
        return Err(SealError::MissingName("Secret"));
    }
    let namespace = opt_str(&meta, "namespace", "metadata.namespace")?.filter(|s| !s.is_empty());
    check_object_names(&name, namespace.as_deref())?;
    let labels = string_map(&meta, "labels", "metadata.labels")?;
    let annotations = string_map(&meta, "annotations", "metadata.annotations")?;
    let type_ = opt_str(&root, "type", "type")?.filter(|s| !s.is_empty());
    let immutable = match root.get("immutable") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(other) => {
            return Err(invalid(
                "immutable",
                format!("must be true or false, found {}", type_name(other)),
            ))
        }
    };

    let mut values = BTreeMap::new();
    for (k, v) in string_map(&root, "data", "data")? {
        check_data_key(&k, "data")?;
        let compact: String = v.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bytes = B64.decode(compact.as_bytes()).map_err(|e| {
            invalid(
                format!("data.{k}"),
                format!(
                    "is not valid base64 ({e}); put plain text under stringData instead, or \
                     encode it with `base64 -w0`"
                ),
            )
        })?;
        values.insert(k, bytes);
    }
    for (k, v) in string_map(&root, "stringData", "stringData")? {
        check_data_key(&k, "stringData")?;
        values.insert(k, v.into_bytes()); // stringData wins, as in the API server
    }
    Ok(SecretIn {
        metadata: ObjectMeta {
            name,
            namespace,
            labels,
            annotations,
        },
        type_,
        immutable,
        values,
    })
}

/// Seals a Secret into a [`SealedSecret`] (see [`seal`]).
pub fn seal_document(
    secret_yaml: &str,
    cert_pem: &str,
    scope_override: Option<Scope>,
) -> Result<SealedSecret> {
    let pubkey = parse_cert(cert_pem).map_err(SealError::from)?;
    let secret = parse_secret(secret_yaml)?;
    let mut template_meta = secret.metadata.clone();
    for k in LAST_APPLIED_ANNOTATIONS {
        template_meta.annotations.remove(k);
    }
    let scope = match scope_override {
        Some(s) => {
            s.set_annotations(&mut template_meta.annotations);
            s
        }
        None => Scope::from_annotations(&template_meta.annotations),
    };
    let name = secret.metadata.name.clone();
    let namespace = secret.metadata.namespace.clone().unwrap_or_default();
    if scope != Scope::ClusterWide && namespace.is_empty() {
        return Err(SealError::MissingNamespace {
            kind: "Secret",
            name,
            scope,
        }
        .into());
    }
    if secret.values.is_empty() {
        return Err(SealError::Empty(name).into());
    }
    let label = scope.label(&namespace, &name);
    let mut encrypted_data = BTreeMap::new();
    for (k, v) in &secret.values {
        let ct = hybrid_encrypt(&pubkey, v, &label, &mut OsRng)
            .with_context(|| format!("sealing key {k:?} of Secret {name:?}"))?;
        encrypted_data.insert(k.clone(), B64.encode(ct));
    }
    let mut annotations = BTreeMap::new();
    scope.set_annotations(&mut annotations);
    Ok(SealedSecret {
        api_version: SEALED_SECRET_API_VERSION.to_string(),
        kind: "SealedSecret".to_string(),
        metadata: ObjectMeta {
            name,
            namespace: secret.metadata.namespace.clone(),
            labels: BTreeMap::new(),
            annotations,
        },
        spec: SealedSecretSpec {
            encrypted_data,
            template: SecretTemplate {
                metadata: template_meta,
                type_: secret.type_,
                immutable: secret.immutable,
                data: None,
            },
            data: None,
        },
    })
}

/// Seals a Kubernetes `Secret` (YAML or JSON) with the controller certificate `cert_pem`,
/// returning the `SealedSecret` as YAML.
///
/// The scope is `scope_override` (kubeseal's `--scope`, which also rewrites the template's scope
/// annotations) or else the Secret's scope annotations, default strict. Strict and
/// namespace-wide need `metadata.namespace`. Keys come out sorted; ciphertexts are random, so
/// sealing twice gives different output.
pub fn seal(secret_yaml: &str, cert_pem: &str, scope_override: Option<Scope>) -> Result<String> {
    let doc = seal_document(secret_yaml, cert_pem, scope_override)?;
    serde_yaml::to_string(&doc).context("serialising the SealedSecret")
}

/// Decrypts a `SealedSecret` (YAML or JSON) with the controller's private key (PKCS#1 or PKCS#8
/// PEM) back into a `v1` `Secret` YAML with base64 `data`, as the controller would create it.
/// For round trips and debugging: the output holds the secrets in clear.
pub fn unseal(sealed_yaml: &str, key_pem: &str) -> Result<String> {
    let privkey = parse_rsa_private(key_pem)?;
    let root = parse_one_document(sealed_yaml, limits::SEALED_SECRET)?;
    let map = root
        .as_mapping()
        .ok_or_else(|| SealError::Parse("expected a mapping (a Kubernetes object)".to_string()))?;
    check_kind(map, "SealedSecret", SEALED_SECRET_API_VERSION)?;
    let ss: SealedSecret =
        serde_yaml::from_value(root.clone()).map_err(|e| SealError::Parse(e.to_string()))?;
    if ss.metadata.name.is_empty() {
        return Err(SealError::MissingName("SealedSecret").into());
    }
    check_object_names(
        &ss.metadata.name,
        ss.metadata.namespace.as_deref().filter(|s| !s.is_empty()),
    )?;
    if ss.spec.data.is_some() {
        return Err(SealError::Unsupported(
            "spec.data (the deprecated whole-Secret format) is not supported: re-seal the Secret"
                .to_string(),
        )
        .into());
    }
    if ss.spec.template.data.is_some() {
        return Err(SealError::Unsupported(
            "spec.template.data (templated keys) is not supported by kiln unseal".to_string(),
        )
        .into());
    }
    // The controller binds the label to the SealedSecret's own metadata.
    let scope = Scope::from_annotations(&ss.metadata.annotations);
    let namespace = ss.metadata.namespace.clone().unwrap_or_default();
    if scope != Scope::ClusterWide && namespace.is_empty() {
        return Err(SealError::MissingNamespace {
            kind: "SealedSecret",
            name: ss.metadata.name.clone(),
            scope,
        }
        .into());
    }
    let label = scope.label(&namespace, &ss.metadata.name);
    let mut data = BTreeMap::new();
    for (k, v) in &ss.spec.encrypted_data {
        let compact: String = v.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        let bytes = B64.decode(compact.as_bytes()).map_err(|e| {
            invalid(
                format!("spec.encryptedData.{k}"),
                format!("is not valid base64: {e}"),
            )
        })?;
        let plain =
            hybrid_decrypt(&privkey, &bytes, &label).map_err(|e| SealError::CannotDecrypt {
                key: k.clone(),
                scope,
                label: String::from_utf8_lossy(&label).into_owned(),
                source: e,
            })?;
        data.insert(k.clone(), B64.encode(plain));
    }
    let mut metadata = ss.spec.template.metadata.clone();
    metadata.name = ss.metadata.name.clone();
    metadata.namespace = ss.metadata.namespace.clone();
    let out = SecretOut {
        api_version: "v1",
        kind: "Secret",
        metadata,
        type_: ss.spec.template.type_.clone(),
        immutable: ss.spec.template.immutable,
        data,
    };
    serde_yaml::to_string(&out).context("serialising the Secret")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;
    use x509_cert::der::Decode;

    /// One 2048-bit key and certificate shared by the tests (key generation is slow).
    fn fixture() -> &'static (RsaPrivateKey, String, String) {
        static F: OnceLock<(RsaPrivateKey, String, String)> = OnceLock::new();
        F.get_or_init(|| {
            let d = tempfile::tempdir().unwrap();
            crate::trust::keys::init_with_rsa_bits(d.path(), "test", false, 2048).unwrap();
            let key_pem = std::fs::read_to_string(d.path().join("sealed-secrets.key")).unwrap();
            let cert = std::fs::read_to_string(d.path().join("sealed-secrets.crt")).unwrap();
            let key = parse_rsa_private(&key_pem).unwrap();
            (key, key_pem, cert)
        })
    }

    fn other_key() -> &'static (RsaPrivateKey, String) {
        static F: OnceLock<(RsaPrivateKey, String)> = OnceLock::new();
        F.get_or_init(|| {
            use rsa::pkcs8::{EncodePrivateKey, LineEnding};
            let k = RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
            let pem = k.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
            (k, pem)
        })
    }

    const SECRET: &str = r#"
apiVersion: v1
kind: Secret
metadata:
  name: db
  namespace: prod
  labels:
    app: db
  annotations:
    note: "keep"
    kubectl.kubernetes.io/last-applied-configuration: '{"data":{"password":"c2VjcmV0"}}'
type: Opaque
data:
  password: c2VjcmV0
  user: YWRtaW4=
stringData:
  user: root
  config.yaml: "a: 1\n"
"#;

    fn unsealed_data(yaml: &str) -> BTreeMap<String, Vec<u8>> {
        let v: Value = serde_yaml::from_str(yaml).unwrap();
        v["data"]
            .as_mapping()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().unwrap().to_string(),
                    B64.decode(v.as_str().unwrap()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn labels_per_scope() {
        assert_eq!(Scope::Strict.label("ns", "n"), b"ns/n");
        assert_eq!(Scope::NamespaceWide.label("ns", "n"), b"ns");
        assert_eq!(Scope::ClusterWide.label("ns", "n"), b"");
        for s in [Scope::Strict, Scope::NamespaceWide, Scope::ClusterWide] {
            assert_eq!(s.as_str().parse::<Scope>().unwrap(), s);
        }
        assert!("global".parse::<Scope>().is_err());
        let mut a = BTreeMap::new();
        assert_eq!(Scope::from_annotations(&a), Scope::Strict);
        a.insert(NAMESPACE_WIDE_ANNOTATION.into(), "true".into());
        assert_eq!(Scope::from_annotations(&a), Scope::NamespaceWide);
        a.insert(CLUSTER_WIDE_ANNOTATION.into(), "true".into());
        assert_eq!(Scope::from_annotations(&a), Scope::ClusterWide);
        a.insert(CLUSTER_WIDE_ANNOTATION.into(), "yes".into());
        assert_eq!(Scope::from_annotations(&a), Scope::NamespaceWide);
    }

    #[test]
    fn hybrid_format_and_round_trip() {
        let (key, _, _) = fixture();
        let public = RsaPublicKey::from(key);
        for plain in [&b""[..], b"x", b"hello world", &[0u8; 1000][..]] {
            let ct = hybrid_encrypt(&public, plain, b"ns/name", &mut OsRng).unwrap();
            assert_eq!(u16::from_be_bytes([ct[0], ct[1]]), 256);
            assert_eq!(ct.len(), 2 + 256 + plain.len() + 16);
            assert_eq!(hybrid_decrypt(key, &ct, b"ns/name").unwrap(), plain);
        }
        // Random session keys: two seals differ.
        let a = hybrid_encrypt(&public, b"v", b"", &mut OsRng).unwrap();
        let b = hybrid_encrypt(&public, b"v", b"", &mut OsRng).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn wrong_label_key_and_tampering_are_detected() {
        let (key, _, _) = fixture();
        let public = RsaPublicKey::from(key);
        let ct = hybrid_encrypt(&public, b"secret", b"prod/db", &mut OsRng).unwrap();
        assert_eq!(
            hybrid_decrypt(key, &ct, b"prod"),
            Err(DecryptError::WrongKeyOrLabel)
        );
        assert_eq!(
            hybrid_decrypt(key, &ct, b""),
            Err(DecryptError::WrongKeyOrLabel)
        );
        assert_eq!(
            hybrid_decrypt(&other_key().0, &ct, b"prod/db"),
            Err(DecryptError::WrongKeyOrLabel)
        );
        let mut t = ct.clone();
        let last = t.len() - 1;
        t[last] ^= 1; // tag
        assert_eq!(
            hybrid_decrypt(key, &t, b"prod/db"),
            Err(DecryptError::Tampered)
        );
        let mut t = ct.clone();
        t[2 + 256] ^= 0x80; // first GCM ciphertext byte
        assert_eq!(
            hybrid_decrypt(key, &t, b"prod/db"),
            Err(DecryptError::Tampered)
        );
        let mut t = ct.clone();
        t[10] ^= 1; // RSA block
        assert_eq!(
            hybrid_decrypt(key, &t, b"prod/db"),
            Err(DecryptError::WrongKeyOrLabel)
        );
        assert!(matches!(
            hybrid_decrypt(key, &ct[..1], b""),
            Err(DecryptError::TooShort { len: 1 })
        ));
        assert!(matches!(
            hybrid_decrypt(key, &ct[..100], b""),
            Err(DecryptError::BadLengthPrefix {
                prefix: 256,
                available: 98
            })
        ));
        assert!(matches!(
            hybrid_decrypt(key, &ct[..2 + 256 + 5], b""),
            Err(DecryptError::TooShort { .. })
        ));
        let mut t = ct.clone();
        t[0] = 0;
        t[1] = 128;
        assert!(matches!(
            hybrid_decrypt(key, &t, b""),
            Err(DecryptError::KeySizeMismatch {
                sealed_bits: 1024,
                key_bits: 2048
            })
        ));
    }

    #[test]
    fn seal_unseal_round_trip_all_scopes() {
        let (_, key_pem, cert) = fixture();
        for (scope, label) in [
            (Scope::Strict, "prod/db"),
            (Scope::NamespaceWide, "prod"),
            (Scope::ClusterWide, ""),
        ] {
            let yaml = seal(SECRET, cert, Some(scope)).unwrap();
            let ss: SealedSecret = serde_yaml::from_str(&yaml).unwrap();
            assert_eq!(ss.api_version, "bitnami.com/v1alpha1");
            assert_eq!(ss.kind, "SealedSecret");
            assert_eq!(ss.metadata.name, "db");
            assert_eq!(ss.metadata.namespace.as_deref(), Some("prod"));
            assert_eq!(Scope::from_annotations(&ss.metadata.annotations), scope);
            assert_eq!(
                Scope::from_annotations(&ss.spec.template.metadata.annotations),
                scope
            );
            assert_eq!(
                ss.metadata.annotations.len(),
                usize::from(scope != Scope::Strict)
            );
            let keys: Vec<&str> = ss.spec.encrypted_data.keys().map(String::as_str).collect();
            assert_eq!(keys, ["config.yaml", "password", "user"]);
            let t = &ss.spec.template;
            assert_eq!(t.type_.as_deref(), Some("Opaque"));
            assert_eq!(t.metadata.name, "db");
            assert_eq!(t.metadata.labels["app"], "db");
            assert_eq!(t.metadata.annotations["note"], "keep");
            assert!(!yaml.contains("last-applied"), "{yaml}");
            assert!(!yaml.contains("c2VjcmV0"), "{yaml}");

            // Each value decrypts with the scope's label, and only with it.
            let (key, _, _) = fixture();
            let raw = B64.decode(&ss.spec.encrypted_data["password"]).unwrap();
            assert_eq!(raw.len(), 2 + 256 + 6 + 16);
            assert_eq!(
                hybrid_decrypt(key, &raw, label.as_bytes()).unwrap(),
                b"secret"
            );
            for wrong in ["prod/db", "prod", ""].iter().filter(|w| **w != label) {
                assert!(hybrid_decrypt(key, &raw, wrong.as_bytes()).is_err());
            }

            let back = unseal(&yaml, key_pem).unwrap();
            let data = unsealed_data(&back);
            assert_eq!(data["password"], b"secret");
            assert_eq!(data["user"], b"root"); // stringData wins
            assert_eq!(data["config.yaml"], b"a: 1\n");
            let v: Value = serde_yaml::from_str(&back).unwrap();
            assert_eq!(v["kind"], "Secret");
            assert_eq!(v["metadata"]["namespace"], "prod");
            assert_eq!(v["type"], "Opaque");
        }
    }

    #[test]
    fn scope_from_annotations_and_cluster_wide_without_namespace() {
        let (_, key_pem, cert) = fixture();
        let s = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: a\n  namespace: n\n  \
                 annotations:\n    sealedsecrets.bitnami.com/namespace-wide: \"true\"\n\
                 stringData:\n  k: v\n";
        let ss = seal_document(s, cert, None).unwrap();
        assert_eq!(
            ss.metadata.annotations[NAMESPACE_WIDE_ANNOTATION].as_str(),
            "true"
        );
        // The override replaces the annotation.
        let ss = seal_document(s, cert, Some(Scope::Strict)).unwrap();
        assert!(ss.metadata.annotations.is_empty());
        assert!(ss.spec.template.metadata.annotations.is_empty());

        let s = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: a\n  annotations:\n    \
                 sealedsecrets.bitnami.com/cluster-wide: \"true\"\nstringData:\n  k: v\n";
        let yaml = seal(s, cert, None).unwrap();
        let ss: SealedSecret = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(ss.metadata.namespace, None);
        assert!(!yaml.contains("namespace:"), "{yaml}");
        let back = unseal(&yaml, key_pem).unwrap();
        assert_eq!(unsealed_data(&back)["k"], b"v");
    }

    #[test]
    fn json_input_is_accepted() {
        let (_, key_pem, cert) = fixture();
        let s = r#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"j","namespace":"x"},
                   "type":"kubernetes.io/basic-auth","data":{"password":"cHc="}}"#;
        let yaml = seal(s, cert, None).unwrap();
        let back = unseal(&yaml, key_pem).unwrap();
        assert_eq!(unsealed_data(&back)["password"], b"pw");
        // The SealedSecret itself may also be given as JSON.
        let ss: SealedSecret = serde_yaml::from_str(&yaml).unwrap();
        let json = serde_json::to_string(&ss).unwrap();
        assert_eq!(
            unsealed_data(&unseal(&json, key_pem).unwrap())["password"],
            b"pw"
        );
    }

    fn seal_err(secret: &str) -> String {
        let (_, _, cert) = fixture();
        format!("{:#}", seal(secret, cert, None).unwrap_err())
    }

    #[test]
    fn bad_inputs_have_clear_errors() {
        let m = seal_err("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a, namespace: b}\n");
        assert!(
            m.contains("expected a Secret") && m.contains("ConfigMap"),
            "{m}"
        );
        let m = seal_err("apiVersion: v1\nkind: Secret\nmetadata: {namespace: b}\ndata: {a: YQ==}");
        assert!(m.contains("no metadata.name"), "{m}");
        let m = seal_err("apiVersion: v1\nkind: Secret\nmetadata: {name: a}\ndata: {a: YQ==}");
        assert!(
            m.contains("no metadata.namespace") && m.contains("strict"),
            "{m}"
        );
        let m = seal_err(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: a, namespace: b}\ndata: {pw: 'not base64!'}",
        );
        assert!(m.contains("data.pw") && m.contains("base64"), "{m}");
        let m = seal_err("apiVersion: v1\nkind: Secret\nmetadata: {name: a, namespace: b}\n");
        assert!(m.contains("nothing to seal"), "{m}");
        let m = seal_err(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: a, namespace: b}\nstringData: {port: 5432}",
        );
        assert!(m.contains("stringData.port") && m.contains("quote"), "{m}");
        let m = seal_err(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: a\n  namespace: b\n  annotations:\n    \
             sealedsecrets.bitnami.com/cluster-wide: true\nstringData: {a: b}",
        );
        assert!(m.contains("annotations") && m.contains("quote"), "{m}");
        let m = seal_err("apiVersion: v2\nkind: Secret\nmetadata: {name: a, namespace: b}\n");
        assert!(m.contains("apiVersion"), "{m}");
        let m = seal_err("a: [unclosed");
        assert!(m.contains("not valid YAML"), "{m}");
        let m = seal_err("---\napiVersion: v1\nkind: Secret\n---\napiVersion: v1\nkind: Secret\n");
        assert!(m.contains("found 2 documents"), "{m}");
        let m = seal_err("apiVersion: v1\nkind: Secret\nmetadata: {name: a, namespace: b}\nstringData: {'a/b': x}");
        assert!(m.contains("stringData.a/b"), "{m}");

        let e = seal("", "", None).unwrap_err();
        assert!(matches!(
            e.downcast_ref::<SealError>(),
            Some(SealError::Cert(CertError::NotACertificate(_)))
        ));
        let (_, key_pem, _) = fixture();
        let m = format!("{:#}", seal(SECRET, key_pem, None).unwrap_err());
        assert!(
            m.contains("private key") && m.contains("certificate"),
            "{m}"
        );
    }

    #[test]
    fn parse_cert_rejects_non_rsa_and_garbage() {
        let (key, _, cert) = fixture();
        assert_eq!(parse_cert(cert).unwrap(), RsaPublicKey::from(key));
        // A certificate preceded by text and followed by another block still parses.
        let noisy = format!("subject=...\n{cert}{cert}");
        assert!(parse_cert(&noisy).is_ok());
        assert!(matches!(
            parse_cert("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            Err(CertError::NotACertificate(_))
        ));
        // An Ed25519 certificate (made with the same builder) is "not RSA".
        let ed = ed25519_cert();
        match parse_cert(&ed) {
            Err(CertError::NotRsa(n)) => assert_eq!(n, "Ed25519"),
            other => panic!("{other:?}"),
        }
    }

    /// A certificate whose subject key is Ed25519 (signed with the RSA fixture key), to test
    /// the "not RSA" path.
    fn ed25519_cert() -> String {
        use x509_cert::builder::{Builder, CertificateBuilder, Profile};
        use x509_cert::der::EncodePem;
        let sk = ed25519_dalek::SigningKey::generate(&mut OsRng);
        let spki_der =
            ed25519_dalek::pkcs8::EncodePublicKey::to_public_key_der(&sk.verifying_key()).unwrap();
        let spki =
            x509_cert::spki::SubjectPublicKeyInfoOwned::from_der(spki_der.as_bytes()).unwrap();
        let signer = rsa::pkcs1v15::SigningKey::<Sha256>::new(fixture().0.clone());
        let builder = CertificateBuilder::new(
            Profile::Manual { issuer: None },
            x509_cert::serial_number::SerialNumber::new(&[1]).unwrap(),
            x509_cert::time::Validity::from_now(std::time::Duration::from_secs(60)).unwrap(),
            "CN=x".parse().unwrap(),
            spki,
            &signer,
        )
        .unwrap();
        let cert = builder.build::<rsa::pkcs1v15::Signature>().unwrap();
        cert.to_pem(x509_cert::der::pem::LineEnding::LF).unwrap()
    }

    #[test]
    fn unseal_with_the_wrong_key_names_the_value() {
        let (_, _, cert) = fixture();
        let yaml = seal(SECRET, cert, None).unwrap();
        let e = unseal(&yaml, &other_key().1).unwrap_err();
        let m = format!("{e:#}");
        assert!(m.contains("cannot decrypt key \"config.yaml\""), "{m}");
        assert!(m.contains("wrong private key or wrong scope"), "{m}");
        assert!(m.contains("prod/db"), "{m}");
        // Moving the SealedSecret to another name breaks a strict seal.
        let (_, key_pem, _) = fixture();
        let moved = yaml.replacen("name: db", "name: db2", 1);
        let m = format!("{:#}", unseal(&moved, key_pem).unwrap_err());
        assert!(
            m.contains("cannot decrypt") && m.contains("prod/db2"),
            "{m}"
        );
        // Tampering with a value.
        let ss: SealedSecret = serde_yaml::from_str(&yaml).unwrap();
        let mut raw = B64.decode(&ss.spec.encrypted_data["password"]).unwrap();
        let n = raw.len();
        raw[n - 3] ^= 4;
        let mut ss2 = ss.clone();
        ss2.spec
            .encrypted_data
            .insert("password".into(), B64.encode(raw));
        let m = format!(
            "{:#}",
            unseal(&serde_yaml::to_string(&ss2).unwrap(), key_pem).unwrap_err()
        );
        assert!(m.contains("password") && m.contains("tampered"), "{m}");
        // Not a SealedSecret; corrupt base64; not a key.
        assert!(format!("{:#}", unseal(SECRET, key_pem).unwrap_err()).contains("SealedSecret"));
        let mut ss3 = ss.clone();
        ss3.spec.encrypted_data.insert("x".into(), "%%%".into());
        let m = format!(
            "{:#}",
            unseal(&serde_yaml::to_string(&ss3).unwrap(), key_pem).unwrap_err()
        );
        assert!(m.contains("encryptedData.x") && m.contains("base64"), "{m}");
        assert!(unseal(&yaml, cert).is_err());
    }
}
