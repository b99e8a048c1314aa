//! The host: external tools, file system helpers, locks, the parallel map, the fault hook.
//! The only module where `unsafe` is allowed.

pub mod os;
pub mod tools;
pub mod util;
