//! PXE serving benchmark (not a test): `cargo bench --bench pxe`, the same as
//! `kiln bench --part pxe` (see `kiln::bench::pxe`).
//!
//! Starts `kiln serve` on loopback with a signed stand-in worker build of real sizes (kernel
//! 8 MB, initrd 42 MB, root.squashfs 237 MB, random bytes), then measures
//! 1. 32 concurrent HTTP clients each fetching kernel + initrd + squashfs (aggregate MB/s and
//!    per-client completion times), and
//! 2. TFTP throughput of an 8 MiB file with blksize 1468 and windowsize 1, 4, 16 (RFC 7440),
//!
//! and the same against nginx (HTTP) and tftpd-hpa (TFTP, lock-step), runs alternating, with
//! kiln's ratio to each (a peer that is not installed is a `SKIP` row).
//!
//! Medians of `KILN_BENCH_RUNS` runs (default 3). Prints the machine and a table.

use std::path::Path;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("pxe: benchmark");
        return;
    }
    let runs: usize = std::env::var("KILN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    kiln::bench::pxe(
        repo,
        Path::new(env!("CARGO_BIN_EXE_kiln")),
        work.path(),
        "worker",
        runs,
        1,
        &mut rows,
    )
    .unwrap();
    let report = kiln::bench::BenchReport {
        schema: "kiln.bench/1",
        machine: kiln::bench::describe_machine(work.path()),
        roles: vec!["worker".into()],
        rows,
    };
    kiln::bench::print_table(&report, &mut std::io::stdout()).unwrap();
}
