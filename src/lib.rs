//! kiln: a git repo of recipes → reproducible per-role OS images for k3s clusters.
//!
//! Layers, imports pointing down only (docs/design/layers.md gives the reasons):
//!
//! ```text
//! main → cli → {bench, deliver} → pipeline → trust → {project, formats} → sys     testing beside
//! ```
//!
//! - `cli` — clap types, one handler per command, printing (text / `--json`), exit codes.
//! - `bench` — `kiln bench`, one file per part.
//! - `deliver` — putting builds on machines: flash, serve (PXE), proxmox.
//! - `pipeline` — the stages: resolve → fetch → base → compose (+ k3s) → emit, build; seed →
//!   node; cache; reproduce (rebuild and compare).
//! - `trust` — keys, PEM/X.509, SHA256SUMS + SSHSIG signing, sealed secrets.
//! - `project` — the inputs: recipes, inventory, overlays, kiln.lock, and `Layout`, the one
//!   place a project's paths are spelled.
//! - `formats` — byte-exact writers with no kiln policy: squashfs, zstd frames, GPT/FAT, ISO 9660.
//! - `sys` — external tools, file system, locks, parallel map, the fault hook; the only
//!   `unsafe`.
//! - [`testing`] — qemu helpers and fuzz entry points (`cfg(test)` or the `testing` feature).
//!
// The layers are private modules in the product, so the compiler sees every unused item;
// integration tests, benches and fuzz targets see them with the `testing` feature. (Written
// out, not by a macro: rustfmt only formats the modules it can see.)
#[cfg(any(test, feature = "testing"))]
pub mod bench;
#[cfg(not(any(test, feature = "testing")))]
mod bench;
#[cfg(any(test, feature = "testing"))]
pub mod cli;
#[cfg(not(any(test, feature = "testing")))]
mod cli;
#[cfg(any(test, feature = "testing"))]
pub mod deliver;
#[cfg(not(any(test, feature = "testing")))]
mod deliver;
#[cfg(any(test, feature = "testing"))]
pub mod formats;
#[cfg(not(any(test, feature = "testing")))]
mod formats;
#[cfg(any(test, feature = "testing"))]
pub mod pipeline;
#[cfg(not(any(test, feature = "testing")))]
mod pipeline;
#[cfg(any(test, feature = "testing"))]
pub mod project;
#[cfg(not(any(test, feature = "testing")))]
mod project;
#[cfg(any(test, feature = "testing"))]
pub mod sys;
#[cfg(not(any(test, feature = "testing")))]
mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(any(test, feature = "testing"))]
pub mod trust;
#[cfg(not(any(test, feature = "testing")))]
mod trust;

pub use cli::{exit_code, run, Cli};
