//! Emit stage: artifacts, manifest and checksums in a staging directory that is renamed into
//! `out/<role>/<build-id>/` only once complete.

use crate::formats::{reuse, squashfs};
use crate::sys::tools::{self, QEMU_IMG};
use crate::sys::util;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
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

/// Content-defined chunks of the tar (FastCDC min/average/max), one zstd frame each.
pub const ZST_CHUNKS: (u32, u32, u32) = (1 << 20, 4 << 20, 16 << 20);

/// Settings that decide the frames' bytes (see [`reuse`]).
pub fn zst_reuse_params() -> String {
    let (min, avg, max) = ZST_CHUNKS;
    format!("tar.zst fastcdc={min}/{avg}/{max} zstd_level={ZSTD_LEVEL} checksum")
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
    let mut r = match cache_dir {
        Some(c) => reuse::Reuse::load(&zst_index_dir(c), &zst_reuse_params()),
        None => reuse::Reuse::default(),
    };
    let index = compress_tar_with(tar, out, jobs(), &mut r)?;
    tracing::debug!(
        frames = index.piece_count(),
        reused = r.hits(),
        "rootfs.tar.zst written"
    );
    Ok(index)
}

/// [`compress_tar`] with `workers` zstd threads (at least one) and the given earlier frames.
pub fn compress_tar_with(
    tar: &Path,
    out: &Path,
    workers: usize,
    reuse: &mut reuse::Reuse,
) -> Result<reuse::Index> {
    let input = fs::File::open(tar).with_context(|| format!("opening {}", tar.display()))?;
    let f = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut index = reuse::Index::new(zst_reuse_params());
    let (min, avg, max) = ZST_CHUNKS;
    let mut chunks =
        fastcdc::v2020::StreamCDC::new(BufReader::with_capacity(1 << 20, input), min, avg, max);
    let workers = workers.max(1);
    // A pipeline: this thread writes frames in order while a reader thread cuts chunks and
    // `workers` threads hash and compress them (or copy earlier frames).
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(4 * workers);
    let job_rx = std::sync::Mutex::new(job_rx);
    let (res_tx, res_rx) =
        std::sync::mpsc::sync_channel::<Result<(usize, [u8; 32], reuse::Stored)>>(4 * workers);
    let reuse = std::sync::Mutex::new(reuse);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let stopped = || stop.load(std::sync::atomic::Ordering::Relaxed);
    let mut pos = 0u64;
    std::thread::scope(|s| -> Result<()> {
        let reader_res = res_tx.clone();
        s.spawn(move || {
            let mut n = 0usize;
            for c in chunks.by_ref() {
                if stopped() {
                    return;
                }
                match c {
                    Ok(c) => {
                        if job_tx.send((n, c.data)).is_err() {
                            return;
                        }
                        n += 1;
                    }
                    Err(e) => {
                        let _ =
                            reader_res.send(Err(anyhow::anyhow!("reading {}: {e}", tar.display())));
                        return;
                    }
                }
            }
            if n == 0 {
                let _ = job_tx.send((0, Vec::new())); // an empty tar is still one (empty) frame
            }
        });
        for _ in 0..workers {
            let res_tx = res_tx.clone();
            let (job_rx, reuse) = (&job_rx, &reuse);
            s.spawn(move || {
                let mut c = match zstd::bulk::Compressor::new(ZSTD_LEVEL).and_then(|mut c| {
                    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
                    c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true))?;
                    Ok(c)
                }) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = res_tx.send(Err(e.into()));
                        return;
                    }
                };
                let mut buf: Vec<u8> = Vec::new();
                loop {
                    let job = job_rx.lock().expect("job queue").recv();
                    let Ok((i, data)) = job else { return };
                    if stopped() {
                        continue; // drain the queue so the reader can finish
                    }
                    let key = *blake3::hash(&data).as_bytes();
                    let earlier = reuse.lock().expect("reuse").get(&key);
                    let frame = match earlier {
                        Some(st) => Ok(st),
                        None => {
                            // One output buffer per worker (no fresh 4 MiB allocation per frame).
                            buf.clear();
                            buf.reserve(zstd::zstd_safe::compress_bound(data.len()));
                            c.compress_to_buffer(&data, &mut buf)
                                .map(|_| reuse::Stored::new(buf.clone(), 0))
                                .map_err(anyhow::Error::from)
                        }
                    };
                    if res_tx.send(frame.map(|f| (i, key, f))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(res_tx);
        let mut ahead: BTreeMap<usize, ([u8; 32], reuse::Stored)> = BTreeMap::new();
        let mut next = 0usize;
        let mut failed: Option<anyhow::Error> = None;
        for r in res_rx.iter() {
            if failed.is_some() {
                continue;
            }
            let step = r.and_then(|(i, k, f)| {
                ahead.insert(i, (k, f));
                while let Some((k, f)) = ahead.remove(&next) {
                    w.write_all(&f.bytes)
                        .with_context(|| format!("writing {}", out.display()))?;
                    index.push(k, &f, pos);
                    pos += f.bytes.len() as u64;
                    next += 1;
                }
                Ok(())
            });
            if let Err(e) = step {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                failed = Some(e);
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })?;
    w.flush()
        .with_context(|| format!("writing {}", out.display()))?;
    w.get_ref()
        .sync_all()
        .with_context(|| format!("syncing {}", out.display()))?;
    index.image_size = pos;
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
            compress_tar_with(&input, &o, w, &mut reuse::Reuse::default()).unwrap();
            outs.push(fs::read(&o).unwrap());
        }
        assert_eq!(outs[0], outs[1]);
        assert_eq!(outs[0], outs[2]);
        assert_eq!(zstd::decode_all(outs[0].as_slice()).unwrap(), data);
    }

    /// Frames of an earlier rootfs.tar.zst are copied, the result is the same bytes, and an
    /// insertion in the middle only costs the frames around it.
    #[test]
    fn zstd_frames_reused_byte_identical() {
        let d = tempfile::tempdir().unwrap();
        let mut data = Vec::with_capacity(48 << 20);
        let mut x: u32 = 7;
        while data.len() < 48 << 20 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            data.extend_from_slice(format!("entry {} {}\n", x >> 12, x % 1009).as_bytes());
        }
        let input = d.path().join("in.tar");
        fs::write(&input, &data).unwrap();
        let idx = d.path().join("idx");
        let a = d.path().join("a.zst");
        let index = compress_tar_with(&input, &a, 2, &mut reuse::Reuse::default()).unwrap();
        let frames = index_len(&index);
        assert!(frames >= 6, "{frames} frames");
        index.save(&a, &idx.join("a.json")).unwrap();

        let b = d.path().join("b.zst");
        let mut r = reuse::Reuse::load(&idx, &zst_reuse_params());
        compress_tar_with(&input, &b, 2, &mut r).unwrap();
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
        assert_eq!(r.hits(), frames as u64);

        let mut edited = data.clone();
        edited.splice(
            20 << 20..20 << 20,
            b"a new file in the middle".iter().copied(),
        );
        fs::write(&input, &edited).unwrap();
        let c = d.path().join("c.zst");
        let mut r = reuse::Reuse::load(&idx, &zst_reuse_params());
        let ci = compress_tar_with(&input, &c, 2, &mut r).unwrap();
        assert!(
            index_len(&ci) as u64 - r.hits() <= 2,
            "{} of {} frames compressed again",
            index_len(&ci) as u64 - r.hits(),
            index_len(&ci)
        );
        let e = d.path().join("e.zst");
        compress_tar_with(&input, &e, 1, &mut reuse::Reuse::default()).unwrap();
        assert_eq!(fs::read(&c).unwrap(), fs::read(&e).unwrap());
        assert_eq!(
            zstd::decode_all(fs::read(&c).unwrap().as_slice()).unwrap(),
            edited
        );
    }

    fn index_len(i: &reuse::Index) -> usize {
        serde_json::to_value(i).unwrap()["pieces"]
            .as_array()
            .unwrap()
            .len()
    }
}
