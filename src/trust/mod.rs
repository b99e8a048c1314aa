//! Keys, PEM/X.509, SHA256SUMS + SSHSIG signatures, sealed secrets.

pub mod keys;
pub mod seal;
pub mod sign;
