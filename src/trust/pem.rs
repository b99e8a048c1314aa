//! PEM and X.509: the certificate and RSA key parsing that keys (`kiln keys show`, the
//! module-signing key) and sealing (`kiln seal`) share.

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
use rsa::{RsaPrivateKey, RsaPublicKey};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use x509_cert::der::{Decode, Encode};

const RSA_ENCRYPTION_OID: &str = "1.2.840.113549.1.1.1";

/// Why a certificate cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The certificate PEM is not a certificate.
    #[error("not a PEM X.509 certificate: {0}")]
    NotACertificate(String),
    /// The certificate's key is not RSA.
    #[error(
        "the certificate's public key is {0}, not RSA: sealed secrets need the sealed-secrets \
         controller's RSA certificate (keys/sealed-secrets.crt)"
    )]
    NotRsa(String),
}

/// Extracts the DER of the first `CERTIFICATE` block of a PEM text.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, CertError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let Some(start) = pem.find(BEGIN) else {
        let hint = if pem.contains("PRIVATE KEY-----") {
            "this is a private key; pass the certificate (keys/sealed-secrets.crt)"
        } else if pem.contains("-----BEGIN PUBLIC KEY-----") {
            "this is a bare public key; pass the certificate (keys/sealed-secrets.crt)"
        } else {
            "no -----BEGIN CERTIFICATE----- block found"
        };
        return Err(CertError::NotACertificate(hint.to_string()));
    };
    let body_start = start + BEGIN.len();
    let Some(len) = pem[body_start..].find(END) else {
        return Err(CertError::NotACertificate(
            "-----END CERTIFICATE----- missing".to_string(),
        ));
    };
    let body: String = pem[body_start..body_start + len]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    B64.decode(body.as_bytes())
        .map_err(|e| CertError::NotACertificate(format!("bad base64 in the PEM block: {e}")))
}

/// The RSA public key of the first certificate in an X.509 PEM (e.g. `keys/sealed-secrets.crt`
/// or the controller's `/v1/cert.pem`). Validity dates are not checked, as kubeseal does not.
pub fn parse_cert(pem: &str) -> Result<RsaPublicKey, CertError> {
    let der = first_cert_der(pem)?;
    let cert = x509_cert::Certificate::from_der(&der)
        .map_err(|e| CertError::NotACertificate(format!("invalid X.509 DER: {e}")))?;
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let oid = spki.algorithm.oid.to_string();
    if oid != RSA_ENCRYPTION_OID {
        let name = match oid.as_str() {
            "1.2.840.10045.2.1" => "EC".to_string(),
            "1.3.101.112" => "Ed25519".to_string(),
            "1.3.101.113" => "Ed448".to_string(),
            _ => format!("algorithm {oid}"),
        };
        return Err(CertError::NotRsa(name));
    }
    let spki_der = spki.to_der().map_err(|e| {
        CertError::NotACertificate(format!("cannot re-encode the public key info: {e}"))
    })?;
    RsaPublicKey::from_public_key_der(&spki_der)
        .map_err(|e| CertError::NotACertificate(format!("invalid RSA public key: {e}")))
}

/// Parses an RSA private key from PKCS#1 (`RSA PRIVATE KEY`) or PKCS#8 (`PRIVATE KEY`) PEM.
pub fn parse_rsa_private(pem: &str) -> Result<RsaPrivateKey> {
    if pem.contains("-----BEGIN RSA PRIVATE KEY-----") {
        RsaPrivateKey::from_pkcs1_pem(pem.trim()).context("invalid PKCS#1 RSA private key PEM")
    } else if pem.contains("-----BEGIN PRIVATE KEY-----") {
        RsaPrivateKey::from_pkcs8_pem(pem.trim())
            .context("invalid PKCS#8 private key PEM, or not an RSA key")
    } else if pem.contains("-----BEGIN CERTIFICATE-----") {
        bail!("this is a certificate, not a private key: pass sealed-secrets.key")
    } else {
        bail!(
            "not a PEM RSA private key (expected -----BEGIN RSA PRIVATE KEY----- or \
             -----BEGIN PRIVATE KEY-----)"
        )
    }
}

/// SHA-256 of a certificate's DER, uppercase hex pairs joined by `:`.
pub fn cert_fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let mut s = String::with_capacity(digest.len() * 3);
    for (i, b) in digest.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        let _ = write!(s, "{b:02X}");
    }
    s
}
