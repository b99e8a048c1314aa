//! Emit stage: artifacts, manifest and checksums in a staging directory that is renamed into
//! `out/<role>/<build-id>/` only once complete.

use crate::formats::{reuse, squashfs, zstd_frames};
use crate::sys::tools::{self, QEMU_IMG};
use crate::sys::util;
use anyhow::{Context, Result};
use std::path::Path;

/// zstd level for `rootfs.tar.zst` (the `zstd` CLI default).
pub const ZSTD_LEVEL: i32 = 3;

/// zstd level inside `root.squashfs` (mksquashfs and tar2sqfs default to 15, ~4× slower for ~3% size).
pub const SQUASHFS_ZSTD_LEVEL: u32 = 9;

/// Content-defined chunks of the tar (FastCDC min/average/max), one zstd frame each.
pub const ZST_CHUNKS: (u32, u32, u32) = (1 << 20, 4 << 20, 16 << 20);

/// The settings of every `rootfs.tar.zst`.
pub fn zst_options() -> zstd_frames::Options {
    zstd_frames::Options {
        level: ZSTD_LEVEL,
        chunks: ZST_CHUNKS,
        workers: util::cpu_count(),
    }
}

/// Where the indexes of earlier `rootfs.tar.zst` files are kept, under the cache dir.
pub fn zst_index_dir(cache_dir: &Path) -> std::path::PathBuf {
    crate::project::layout::Cache::new(cache_dir).zstd_frames()
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
        frames = index.piece_count(),
        reused = r.hits(),
        "rootfs.tar.zst written"
    );
    Ok(index)
}

/// Where the block indexes of earlier images are kept, under the cache dir.
pub fn squashfs_index_dir(cache_dir: &Path) -> std::path::PathBuf {
    crate::project::layout::Cache::new(cache_dir).squashfs_blocks()
}

/// The settings of every `root.squashfs`.
pub fn squashfs_options(source_date_epoch: i64) -> squashfs::Options {
    squashfs::Options {
        block_size: 1 << 20,
        level: SQUASHFS_ZSTD_LEVEL as i32,
        mtime: source_date_epoch.clamp(0, u32::MAX as i64) as u32,
        jobs: util::cpu_count(),
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
