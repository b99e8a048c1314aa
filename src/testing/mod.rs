//! Test support compiled only for tests and with the `testing` feature: qemu boot helpers and
//! fuzz entry points. Not part of the product.

pub mod fuzz;
pub mod qemu;
