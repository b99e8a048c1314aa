//! Keys, PEM/X.509, SHA256SUMS + SSHSIG signatures, sealed secrets.

pub mod keys;
pub mod pem;
pub mod seal;
pub mod sign;
pub mod sums;
