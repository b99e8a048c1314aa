//! Test support compiled only for tests and with the `testing` feature: qemu boot helpers and
//! fuzz entry points, a model of the k3s server's node-password check. Not part of the product.

pub mod fuzz;
pub mod k3s;
pub mod qemu;
