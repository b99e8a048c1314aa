//! Keys, per-node identity, PEM/X.509, SHA256SUMS + SSHSIG signatures, sealed secrets.

pub mod identity;
pub mod k3s_ca;
pub mod keys;
pub mod pem;
pub mod seal;
pub mod sign;
pub mod sums;

/// Size caps of the small files kiln reads whole (through [`crate::sys::util::read_small`]):
/// a file larger than this is refused before it is read, so `/dev/zero`, a FIFO or a
/// multi-gigabyte file named as a key cannot exhaust memory. Each is far above what a real file
/// needs.
pub mod limits {
    /// A key, certificate (chain) or token file: an RSA-4096 PEM key is ~3.3 KB.
    pub const KEY_FILE: u64 = 1 << 20;
    /// `SHA256SUMS`: ~80 bytes a line, a build lists a dozen files.
    pub const SUMS: u64 = 1 << 20;
    /// `SHA256SUMS.sig`: an armored SSHSIG is ~300 bytes.
    pub const SIGNATURE: u64 = 64 << 10;
    /// A `manifest.json` kiln wrote (it lists the image's packages) or a Kubernetes manifest
    /// to seal or unseal.
    pub const MANIFEST: u64 = 16 << 20;
}
