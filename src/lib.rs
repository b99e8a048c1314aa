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
/// The layers are private modules in the product, so the compiler sees every unused item;
/// integration tests, benches and fuzz targets see them with the `testing` feature.
macro_rules! layers {
    ($($m:ident),* $(,)?) => {$(
        #[cfg(any(test, feature = "testing"))]
        pub mod $m;
        #[cfg(not(any(test, feature = "testing")))]
        mod $m;
    )*};
}
layers!(bench, cli, deliver, formats, pipeline, project, sys, trust);
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use cli::{exit_code, run, Cli};
