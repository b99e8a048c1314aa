//! Emit stage: artifacts, manifest and checksums in a staging directory that is renamed into
//! `out/<role>/<build-id>/` only once complete.

pub mod disk;
pub mod iso9660;

use crate::tools::{self, QEMU_IMG, TAR2SQFS};
use crate::util;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fs;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::process::Stdio;

/// zstd level for `rootfs.tar.zst` (the `zstd` CLI default).
pub const ZSTD_LEVEL: i32 = 3;

/// zstd level inside `root.squashfs` (tar2sqfs defaults to 15, which is ~4× slower for ~3% size).
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

/// `root.squashfs` streamed from the composed tar by tar2sqfs (zstd, fixed times).
pub fn squashfs_from_tar(tar: &Path, out: &Path, source_date_epoch: i64) -> Result<()> {
    let input = fs::File::open(tar).with_context(|| format!("opening {}", tar.display()))?;
    let mut cmd = TAR2SQFS.command()?;
    cmd.env("SOURCE_DATE_EPOCH", source_date_epoch.to_string())
        .arg("--quiet")
        .arg("--force")
        .arg("--no-skip")
        .args(["--compressor", "zstd"])
        .args(["--comp-extra", &format!("level={SQUASHFS_ZSTD_LEVEL}")])
        .args(["--num-jobs", &jobs().to_string()])
        .args(["--block-size", "1048576"])
        .args([
            "--defaults",
            &format!("uid=0,gid=0,mode=0755,mtime={source_date_epoch}"),
        ])
        .arg(out)
        .stdin(Stdio::from(input));
    tools::die_with_parent(&mut cmd);
    let line = format!("{cmd:?}");
    tracing::debug!(command = %line, "running");
    let o = cmd.output().with_context(|| format!("starting {line}"))?;
    if !o.status.success() {
        anyhow::bail!(
            "{line} failed ({}):\n{}",
            o.status,
            tools::tail(&String::from_utf8_lossy(&o.stderr), 30)
        );
    }
    util::sync_path(out)
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
