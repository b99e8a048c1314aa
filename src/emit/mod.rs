//! Emit stage: artifacts, manifest and checksums in a staging directory that is renamed into
//! `out/<role>/<build-id>/` only once complete.

pub mod disk;
pub mod iso9660;
pub mod squashfs;

use crate::tools::{self, QEMU_IMG};
use crate::util;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fs;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

/// zstd level for `rootfs.tar.zst` (the `zstd` CLI default).
pub const ZSTD_LEVEL: i32 = 3;

/// zstd level inside `root.squashfs` (mksquashfs and tar2sqfs default to 15, ~4× slower for ~3% size).
pub const SQUASHFS_ZSTD_LEVEL: u32 = 9;

fn jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `rootfs.tar.zst` from the composed tar, compressed by one zstd worker thread per core. zstd's
/// multi-threaded format does not depend on the number of workers (always at least one), so
/// the bytes are the same on any machine.
pub fn compress_tar(tar: &Path, out: &Path) -> Result<()> {
    compress_tar_with(tar, out, jobs())
}

/// [`compress_tar`] with `workers` zstd threads (at least one).
pub fn compress_tar_with(tar: &Path, out: &Path, workers: usize) -> Result<()> {
    let input = fs::File::open(tar).with_context(|| format!("opening {}", tar.display()))?;
    let f = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut enc = zstd::stream::Encoder::new(BufWriter::with_capacity(1 << 20, f), ZSTD_LEVEL)?;
    enc.multithread(workers.max(1) as u32)?;
    enc.include_checksum(true)?;
    enc.set_pledged_src_size(Some(input.metadata()?.len()))?;
    enc.include_contentsize(true)?;
    util::copy_large(&mut BufReader::with_capacity(1 << 20, input), &mut enc)
        .with_context(|| format!("compressing into {}", out.display()))?;
    let mut w = enc
        .finish()
        .with_context(|| format!("compressing into {}", out.display()))?;
    w.flush()
        .with_context(|| format!("writing {}", out.display()))?;
    w.get_ref()
        .sync_all()
        .with_context(|| format!("syncing {}", out.display()))?;
    Ok(())
}

/// Where the block indexes of earlier images are kept, under the cache dir.
pub fn squashfs_index_dir(cache_dir: &Path) -> std::path::PathBuf {
    cache_dir.join("squashfs-blocks")
}

/// The settings of every `root.squashfs`.
pub fn squashfs_options(source_date_epoch: i64) -> squashfs::Options {
    squashfs::Options {
        block_size: 1 << 20,
        level: SQUASHFS_ZSTD_LEVEL as i32,
        mtime: source_date_epoch.clamp(0, u32::MAX as i64) as u32,
        jobs: jobs(),
    }
}

/// `root.squashfs` written from the composed tar by kiln's squashfs writer (zstd, 1 MiB
/// blocks), copying unchanged blocks from the earlier images indexed under `cache_dir` (none
/// when `None`).
pub fn squashfs_from_tar(
    tar: &Path,
    out: &Path,
    source_date_epoch: i64,
    cache_dir: Option<&Path>,
) -> Result<squashfs::Written> {
    let opts = squashfs_options(source_date_epoch);
    let mut reuse = match cache_dir {
        Some(c) => squashfs::Reuse::load(&squashfs_index_dir(c), &opts),
        None => squashfs::Reuse::default(),
    };
    let w = squashfs::write_from_tar(tar, out, &opts, &mut reuse)
        .with_context(|| format!("writing {}", out.display()))?;
    tracing::debug!(stats = ?w.stats, "root.squashfs written");
    Ok(w)
}

/// `disk.qcow2` from `disk.raw`.
pub fn qcow2_from_raw(raw: &Path, out: &Path) -> Result<()> {
    tools::run(
        QEMU_IMG
            .command()?
            .args([
                "convert",
                "-q",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "compat=1.1",
            ])
            .arg(raw)
            .arg(out),
    )?;
    util::sync_path(out)
}

/// One artifact as listed in the manifest and SHA256SUMS.
#[derive(Debug, Clone, Serialize)]
pub struct Artifact {
    pub name: String,
    pub sha256: String,
    pub size: u64,
}

/// Hashes the named files of `dir`, sorted by name.
pub fn hash_artifacts(dir: &Path, names: &[&str]) -> Result<Vec<Artifact>> {
    let mut names: Vec<&str> = names.to_vec();
    names.sort_unstable();
    names
        .into_iter()
        .map(|n| {
            let (sha256, size) = util::sha256_file(&dir.join(n))?;
            Ok(Artifact {
                name: n.to_string(),
                sha256,
                size,
            })
        })
        .collect()
}

/// `SHA256SUMS` in coreutils format, sorted by name.
pub fn sha256sums(artifacts: &[Artifact]) -> String {
    let mut v: Vec<&Artifact> = artifacts.iter().collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v.iter()
        .map(|a| format!("{}  {}\n", a.sha256, a.name))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rootfs.tar.zst must not depend on the machine's core count.
    #[test]
    fn zstd_output_does_not_depend_on_worker_count() {
        let d = tempfile::tempdir().unwrap();
        let input = d.path().join("in.tar");
        // 24 MiB of compressible, non-repeating data: several zstd jobs.
        let mut data = Vec::with_capacity(24 << 20);
        let mut x: u32 = 1;
        while data.len() < 24 << 20 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            data.extend_from_slice(format!("line {} {}\n", x >> 16, x % 97).as_bytes());
        }
        fs::write(&input, &data).unwrap();
        let mut outs = Vec::new();
        for w in [1, 2, 3] {
            let o = d.path().join(format!("{w}.zst"));
            compress_tar_with(&input, &o, w).unwrap();
            outs.push(fs::read(&o).unwrap());
        }
        assert_eq!(outs[0], outs[1]);
        assert_eq!(outs[0], outs[2]);
        assert_eq!(zstd::decode_all(outs[0].as_slice()).unwrap(), data);
    }
}
