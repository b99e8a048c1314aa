//! Emit stage: artifacts, manifest and checksums in a staging directory that is renamed into
//! `out/<role>/<build-id>/` only once complete.

use crate::formats::{reuse, squashfs, zstd_frames};
use crate::sys::tools::{self, QEMU_IMG};
use crate::sys::util;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fs;
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

/// Content-defined chunks of the tar (FastCDC min/average/max), one zstd frame each.
pub const ZST_CHUNKS: (u32, u32, u32) = (1 << 20, 4 << 20, 16 << 20);

/// The settings of every `rootfs.tar.zst`.
pub fn zst_options() -> zstd_frames::Options {
    zstd_frames::Options {
        level: ZSTD_LEVEL,
        chunks: ZST_CHUNKS,
        workers: jobs(),
    }
}

/// Where the indexes of earlier `rootfs.tar.zst` files are kept, under the cache dir.
pub fn zst_index_dir(cache_dir: &Path) -> std::path::PathBuf {
    cache_dir.join("zstd-frames")
}

/// `rootfs.tar.zst` from the composed tar: the tar is cut into content-defined chunks
/// (FastCDC, ~4 MiB), each compressed into its own zstd frame (level 3, with checksum and
/// size) by one thread per core; the frames are concatenated, which is a valid zstd stream.
/// Chunk boundaries follow the content, so a file added or changed in the tar changes only
/// the frames around it, and frames of earlier builds indexed under `cache_dir` are copied
/// instead of compressed again. The bytes do not depend on the core count or the cache.
pub fn compress_tar(tar: &Path, out: &Path, cache_dir: Option<&Path>) -> Result<reuse::Index> {
    let opts = zst_options();
    let mut r = match cache_dir {
        Some(c) => reuse::Reuse::load(&zst_index_dir(c), &zstd_frames::reuse_params(&opts)),
        None => reuse::Reuse::default(),
    };
    let index = zstd_frames::write(tar, out, &opts, &mut r)?;
    tracing::debug!(
        frames = index.len(),
        reused = r.hits(),
        "rootfs.tar.zst written"
    );
    Ok(index)
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
        Some(c) => reuse::Reuse::load(&squashfs_index_dir(c), &squashfs::reuse_params(&opts)),
        None => reuse::Reuse::default(),
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
    // One file per thread, largest first (a role's four images are ~1.1 GB together); the
    // result is in name order whatever the threads do.
    let mut order: Vec<(u64, usize)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (fs::metadata(dir.join(n)).map(|m| m.len()).unwrap_or(0), i))
        .collect();
    order.sort_unstable_by(|a, b| b.cmp(a));
    let hashed = util::par_map(
        &order,
        jobs(),
        || (),
        |_, &(_, i)| {
            let n = names[i];
            util::sha256_file(&dir.join(n)).map(|(sha256, size)| Artifact {
                name: n.to_string(),
                sha256,
                size,
            })
        },
    );
    let mut done: Vec<(usize, Result<Artifact>)> =
        order.iter().map(|&(_, i)| i).zip(hashed).collect();
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// `SHA256SUMS` in coreutils format, sorted by name.
pub fn sha256sums(artifacts: &[Artifact]) -> String {
    let mut v: Vec<&Artifact> = artifacts.iter().collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v.iter()
        .map(|a| format!("{}  {}\n", a.sha256, a.name))
        .collect()
}
