//! The cluster's k3s certificate authorities, made once by `kiln keys init` and kept in `keys/`,
//! so the cluster's identity is a function of the repository: a cluster rebuilt from the same
//! keys has the same CAs, every kubeconfig made from them still works, and agents pin the
//! server CA through the secure token.
//!
//! k3s uses CA files found in `<data-dir>/server/tls/` at its first start instead of making
//! its own (k3s `contrib/util/generate-custom-ca-certs.sh`, `pkg/daemons/control/deps`): the
//! server, client and request-header CAs, the etcd peer and server CAs, and the
//! service-account signing key. kiln makes them as k3s does for itself: self-signed ECDSA P-256
//! CAs named `k3s-<kind>-ca@<unix time>`, valid 10 years, and an RSA-2048 `service.key`.
//!
//! The secure token is `K10<sha256 of server-ca.crt>::server:<secret>` (k3s
//! `pkg/clientaccess/token.go`: for a one-certificate bundle the hash is over the file's
//! bytes, exactly what the server serves at `/cacerts`).

use anyhow::{bail, Context, Result};
use rand::RngCore;
use rsa::pkcs1::EncodeRsaPrivateKey;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One CA file: its name in `keys/`, its path under k3s's `server/tls/`, and whether it is
/// private (mode 0600).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaFile {
    pub key_name: &'static str,
    pub tls_path: &'static str,
    pub private: bool,
}

const fn f(key_name: &'static str, tls_path: &'static str, private: bool) -> CaFile {
    CaFile {
        key_name,
        tls_path,
        private,
    }
}

/// Every file, in the order `kiln keys show` lists them.
pub const FILES: [CaFile; 11] = [
    f("k3s-server-ca.crt", "server-ca.crt", false),
    f("k3s-server-ca.key", "server-ca.key", true),
    f("k3s-client-ca.crt", "client-ca.crt", false),
    f("k3s-client-ca.key", "client-ca.key", true),
    f("k3s-request-header-ca.crt", "request-header-ca.crt", false),
    f("k3s-request-header-ca.key", "request-header-ca.key", true),
    f("k3s-etcd-peer-ca.crt", "etcd/peer-ca.crt", false),
    f("k3s-etcd-peer-ca.key", "etcd/peer-ca.key", true),
    f("k3s-etcd-server-ca.crt", "etcd/server-ca.crt", false),
    f("k3s-etcd-server-ca.key", "etcd/server-ca.key", true),
    f("k3s-service.key", "service.key", true),
];

/// The names of [`FILES`] in a server's seed (`token_delivery = "seed"`): `kiln-` + the
/// `keys/` name, flat, as every seed file (FAT, ISO 9660 and kiln serve carry them as they are).
pub const SEED_FILES: [&str; 11] = [
    "kiln-k3s-server-ca.crt",
    "kiln-k3s-server-ca.key",
    "kiln-k3s-client-ca.crt",
    "kiln-k3s-client-ca.key",
    "kiln-k3s-request-header-ca.crt",
    "kiln-k3s-request-header-ca.key",
    "kiln-k3s-etcd-peer-ca.crt",
    "kiln-k3s-etcd-peer-ca.key",
    "kiln-k3s-etcd-server-ca.crt",
    "kiln-k3s-etcd-server-ca.key",
    "kiln-k3s-service.key",
];

/// The server CA certificate in `keys/` (what the secure token pins).
pub const SERVER_CA_CRT: &str = "k3s-server-ca.crt";
/// The client CA pair in `keys/` (what `kiln kubeconfig` signs with).
pub const CLIENT_CA_CRT: &str = "k3s-client-ca.crt";
pub const CLIENT_CA_KEY: &str = "k3s-client-ca.key";

/// How long the CAs are valid (k3s's own CAs: 10 years).
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The RSA size of the service-account key (k3s's own: 2048).
pub const SERVICE_KEY_BITS: usize = 2048;

/// The CA kinds, in [`FILES`] order: (file stem under tls/, CN stem).
const KINDS: [(&str, &str); 5] = [
    ("server-ca", "server"),
    ("client-ca", "client"),
    ("request-header-ca", "request-header"),
    ("etcd/peer-ca", "etcd-peer"),
    ("etcd/server-ca", "etcd-server"),
];

/// Makes the whole set: `keys/` file name → PEM text, in [`FILES`] order.
pub fn generate(now: SystemTime) -> Result<Vec<(&'static str, String)>> {
    let unix = unix_secs(now)?;
    let mut out = Vec::new();
    for (i, (_, cn)) in KINDS.iter().enumerate() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating a CA key")?;
        let params = ca_params(&format!("k3s-{cn}-ca@{unix}"), unix)?;
        let cert = params.self_signed(&key).context("signing a CA")?;
        out.push((FILES[2 * i].key_name, cert.pem()));
        out.push((FILES[2 * i + 1].key_name, key.serialize_pem()));
    }
    let service = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, SERVICE_KEY_BITS)
        .context("generating the service-account key")?;
    let pem = service
        .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
        .context("encoding the service-account key")?;
    out.push((FILES[10].key_name, pem.to_string()));
    Ok(out)
}

fn unix_secs(t: SystemTime) -> Result<u64> {
    Ok(t.duration_since(UNIX_EPOCH)
        .context("system clock is before 1970")?
        .as_secs())
}

/// Sets `p`'s validity: from an hour before `unix` for `valid` (rcgen takes `time` values;
/// the epoch plus a duration spells them without that crate).
fn set_validity(p: &mut rcgen::CertificateParams, unix: u64, valid: Duration) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    p.not_before = epoch + Duration::from_secs(unix.saturating_sub(3600));
    p.not_after = epoch + Duration::from_secs(unix) + valid;
}

/// The parameters of a CA named `cn`: basicConstraints CA, keyUsage digitalSignature,
/// keyEncipherment, keyCertSign (as k3s's), valid from an hour before `unix` for
/// [`CA_VALIDITY`].
fn ca_params(cn: &str, unix: u64) -> Result<rcgen::CertificateParams> {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
        rcgen::KeyUsagePurpose::KeyCertSign,
    ];
    set_validity(&mut p, unix, CA_VALIDITY);
    p.serial_number = Some(random_serial());
    Ok(p)
}

fn random_serial() -> rcgen::SerialNumber {
    let mut s = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut s);
    s[0] = (s[0] & 0x7f) | 0x40;
    rcgen::SerialNumber::from_slice(&s)
}

/// k3s's secure token for `secret` pinning the server CA `server_ca_pem` (the file's bytes).
pub fn secure_token(server_ca_pem: &[u8], secret: &str) -> String {
    format!(
        "K10{}::server:{secret}",
        crate::sys::util::sha256_hex(server_ca_pem)
    )
}

/// The subject CN of a PEM certificate.
fn common_name(cert_pem: &str) -> Result<String> {
    use x509_cert::der::DecodePem;
    let c = x509_cert::Certificate::from_pem(cert_pem.as_bytes())
        .context("parsing the CA certificate")?;
    for rdn in c.tbs_certificate.subject.0.iter() {
        for atv in rdn.0.iter() {
            if atv.oid == x509_cert::der::oid::ObjectIdentifier::new_unwrap("2.5.4.3") {
                let v = atv.value.decode_as::<x509_cert::der::asn1::Utf8StringRef>();
                if let Ok(s) = v {
                    return Ok(s.as_str().to_string());
                }
                let v = atv
                    .value
                    .decode_as::<x509_cert::der::asn1::PrintableStringRef>()
                    .context("the CA's common name is not a UTF-8 or printable string")?;
                return Ok(v.as_str().to_string());
            }
        }
    }
    bail!("the CA certificate has no common name")
}

/// A client certificate and its key (PEM) for user `user` in group `group`, signed by the
/// CA (`ca_cert_pem`, `ca_key_pem`), valid from an hour before `now` for `valid`: what the
/// Kubernetes API server takes as user `user` (CN) in group `group` (O). (One group: rcgen
/// writes one attribute of each type.)
pub fn client_certificate(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    user: &str,
    group: &str,
    now: SystemTime,
    valid: Duration,
) -> Result<(String, String)> {
    let unix = unix_secs(now)?;
    let ca_key = rcgen::KeyPair::from_pem(ca_key_pem).context("reading the client CA key")?;
    // The issuer as rcgen needs it: its name and key (the signature and the authority key
    // identifier come from them); the certificate itself is not re-issued.
    let issuer = ca_params(&common_name(ca_cert_pem)?, unix)?
        .self_signed(&ca_key)
        .context("loading the client CA")?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating the client key")?;
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = rcgen::DistinguishedName::new();
    if user.trim().is_empty() || user.chars().any(char::is_control) {
        bail!("the user name {user:?} is empty or has control characters");
    }
    if group.chars().any(char::is_control) {
        bail!("the group {group:?} has control characters");
    }
    if !group.is_empty() {
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, group);
    }
    p.distinguished_name.push(rcgen::DnType::CommonName, user);
    p.is_ca = rcgen::IsCa::ExplicitNoCa;
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.use_authority_key_identifier_extension = true;
    set_validity(&mut p, unix, valid);
    p.serial_number = Some(random_serial());
    let cert = p
        .signed_by(&key, &issuer, &ca_key)
        .context("signing the client certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A kubeconfig (one cluster, user and context, all named `cluster`) for `server`, trusting
/// the server CA and authenticating with the client certificate.
pub fn kubeconfig(
    cluster: &str,
    server: &str,
    server_ca_pem: &[u8],
    client_cert_pem: &str,
    client_key_pem: &str,
) -> String {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    // JSON strings are YAML scalars: names and the URL need no further quoting rules.
    let q = |s: &str| serde_json::to_string(s).expect("a string serialises");
    format!(
        "apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: {c}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
         users:\n\
         - name: {c}\n  user:\n    client-certificate-data: {crt}\n    client-key-data: {key}\n\
         contexts:\n\
         - name: {c}\n  context:\n    cluster: {c}\n    user: {c}\n\
         current-context: {c}\n\
         preferences: {{}}\n",
        c = q(cluster),
        server = q(server),
        ca = b64(server_ca_pem),
        crt = b64(client_cert_pem.as_bytes()),
        key = b64(client_key_pem.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_token_is_k3s_format() {
        let t = secure_token(b"pem", "s3cret");
        assert_eq!(
            t,
            format!("K10{}::server:s3cret", crate::sys::util::sha256_hex(b"pem"))
        );
        assert_eq!(t.len(), 3 + 64 + "::server:s3cret".len());
    }

    #[test]
    fn the_set_has_every_file_and_a_client_cert_names_its_issuer() {
        let set = generate(SystemTime::now()).unwrap();
        let names: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, FILES.map(|f| f.key_name).to_vec());
        let get = |n: &str| set.iter().find(|(k, _)| *k == n).unwrap().1.clone();
        assert!(common_name(&get(SERVER_CA_CRT))
            .unwrap()
            .starts_with("k3s-server-ca@"));
        let (crt, key) = client_certificate(
            &get(CLIENT_CA_CRT),
            &get(CLIENT_CA_KEY),
            "alice",
            "system:masters",
            SystemTime::now(),
            Duration::from_secs(86400),
        )
        .unwrap();
        assert!(crt.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key.contains("PRIVATE KEY"));
        assert_eq!(common_name(&crt).unwrap(), "alice");
        assert!(get("k3s-service.key").starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    }
}
