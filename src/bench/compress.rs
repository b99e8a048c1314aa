//! The compress part: kiln's root.squashfs and rootfs.tar.zst writers against mksquashfs and
//! `zstd -T0` on the same role tree.

use super::{copy_project, measure, round2, Row, Timing, TARGET_COMPRESS_RATIO};
use crate::pipeline::compose::{self, ComposeInput};
use crate::pipeline::emit;
use crate::pipeline::resolve;
use crate::project::recipe::Project;
use crate::sys::{tools, util};
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn time_it(f: impl FnOnce() -> Result<()>) -> Result<Timing> {
    Ok(measure(f)?.1)
}

fn run_tool(cmd: &mut Command) -> Result<()> {
    tools::run(cmd).map(|_| ())
}

pub(super) fn compress(
    project_dir: &Path,
    work: &Path,
    cache: &Path,
    role: &str,
    runs: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let project = copy_project(project_dir, &work.join("compress-project"))?;
    let sde = project.cluster.section.source_date_epoch;
    let dir = work.join("compress");
    let tar = composed_tar(&project, role, cache, &dir)?;
    let tar_size = fs::metadata(&tar)?.len();
    let tree = extract_tree(&tar, &dir)?;
    rows.extend(squashfs_rows(&tar, &tree, &dir, sde, tar_size, runs)?);
    rows.extend(zstd_rows(&tar, &dir, runs)?);
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    Ok(())
}

/// The role's composed tree as `dir/rootfs.tar`, without the k3s layer (no artifacts or token
/// needed).
fn composed_tar(project: &Project, role: &str, cache: &Path, dir: &Path) -> Result<PathBuf> {
    let r = resolve::resolve(project, role)?;
    let base = crate::pipeline::build::base_of(project, &r, cache, false)?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tar = dir.join("rootfs.tar");
    compose::compose(
        &ComposeInput {
            project,
            recipe: &r.recipe,
            build_id: &r.build_id,
            overlays: &r.overlays,
            base_tar: &base.tar,
            extra: BTreeMap::new(),
            extra_enable: vec![],
        },
        &tar,
    )?;
    Ok(tar)
}

/// The tar extracted to `dir/tree`, for mksquashfs.
fn extract_tree(tar: &Path, dir: &Path) -> Result<PathBuf> {
    let tree = dir.join("tree");
    fs::create_dir_all(&tree)?;
    run_tool(
        Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
            .arg(tar)
            .arg("-C")
            .arg(&tree),
    )
    .context("extracting the tree for mksquashfs (needs root for owners)")?;
    Ok(tree)
}

/// kiln's squashfs writer from the tar against mksquashfs on the extracted tree, same settings:
/// the two timings and their ratio.
fn squashfs_rows(
    tar: &Path,
    tree: &Path,
    dir: &Path,
    sde: i64,
    tar_size: u64,
    runs: usize,
) -> Result<[Row; 3]> {
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .to_string();
    let (k_sq, m_sq) = (dir.join("kiln.squashfs"), dir.join("mksquashfs.squashfs"));
    let (mut ks, mut ms) = (vec![], vec![]);
    for _ in 0..runs {
        ks.push(time_it(|| {
            emit::squashfs_from_tar(tar, &k_sq, sde, None).map(drop)
        })?);
        ms.push(time_it(|| {
            run_tool(
                Command::new("mksquashfs")
                    .arg(tree)
                    .arg(&m_sq)
                    .args(["-noappend", "-quiet", "-no-progress", "-comp", "zstd"])
                    .args([
                        "-Xcompression-level",
                        &emit::SQUASHFS_ZSTD_LEVEL.to_string(),
                    ])
                    .args(["-b", "1M", "-processors", &jobs])
                    .args([
                        "-mkfs-time",
                        &sde.to_string(),
                        "-all-time",
                        &sde.to_string(),
                    ]),
            )?;
            // kiln fsyncs what it writes (artifacts are published durable): so does the reference.
            util::sync_path(&m_sq)
        })?);
    }
    let (ksz, msz) = (fs::metadata(&k_sq)?.len(), fs::metadata(&m_sq)?.len());
    let mut r = Row::timed(
        "compress",
        format!(
            "squashfs: kiln (own writer, zstd {}, 1 MiB blocks, cold) from the {} tar",
            emit::SQUASHFS_ZSTD_LEVEL,
            util::human_bytes(tar_size)
        ),
        ks,
    );
    r.detail = format!("size {}", util::human_bytes(ksz));
    let mut m = Row::timed(
        "compress",
        "squashfs: mksquashfs on the extracted tree, same settings",
        ms,
    );
    m.detail = format!("size {}", util::human_bytes(msz));
    let ratio = speed_ratio(
        "squashfs speed: mksquashfs time / kiln time",
        "mksquashfs",
        (&r, ksz),
        (&m, msz),
    );
    Ok([r, m, ratio])
}

/// kiln's rootfs.tar.zst against `zstd -T0` on the same tar: the two timings and their ratio.
fn zstd_rows(tar: &Path, dir: &Path, runs: usize) -> Result<[Row; 3]> {
    let (k_z, z_z) = (dir.join("kiln.tar.zst"), dir.join("zstd.tar.zst"));
    let (mut kz, mut zz) = (vec![], vec![]);
    for _ in 0..runs {
        kz.push(time_it(|| emit::compress_tar(tar, &k_z, None).map(drop))?);
        zz.push(time_it(|| {
            run_tool(
                Command::new("zstd")
                    .args([
                        &format!("-{}", emit::ZSTD_LEVEL),
                        "-T0",
                        "-q",
                        "-f",
                        "--check",
                    ])
                    .arg(tar)
                    .arg("-o")
                    .arg(&z_z),
            )?;
            util::sync_path(&z_z)
        })?);
    }
    let (kzs, zzs) = (fs::metadata(&k_z)?.len(), fs::metadata(&z_z)?.len());
    let mut r = Row::timed(
        "compress",
        format!(
            "zstd: kiln rootfs.tar.zst (level {}, ~4 MiB frames, cold)",
            emit::ZSTD_LEVEL
        ),
        kz,
    );
    r.detail = format!("size {}", util::human_bytes(kzs));
    let mut z = Row::timed(
        "compress",
        format!("zstd: zstd -{} -T0 on the same tar", emit::ZSTD_LEVEL),
        zz,
    );
    z.detail = format!("size {}", util::human_bytes(zzs));
    let ratio = speed_ratio(
        "zstd speed: zstd -T0 time / kiln time",
        "zstd",
        (&r, kzs),
        (&z, zzs),
    );
    Ok([r, z, ratio])
}

/// The ratio row: the reference `tool`'s median time over kiln's (met at
/// [`TARGET_COMPRESS_RATIO`] or more), with the sizes' and CPU times' ratios; each row comes
/// with the size of what it wrote.
fn speed_ratio(
    what: &str,
    tool: &str,
    (kiln, ksz): (&Row, u64),
    (reference, rsz): (&Row, u64),
) -> Row {
    let km = kiln.median_seconds.unwrap_or(0.0);
    let rm = reference.median_seconds.unwrap_or(0.0);
    let mut ratio = Row::note(
        "compress",
        what,
        format!(
            "size kiln/{tool} {:.3}; cpu {tool}/kiln {:.2}",
            ksz as f64 / rsz.max(1) as f64,
            reference.median_cpu_seconds.unwrap_or(0.0)
                / kiln.median_cpu_seconds.unwrap_or(1.0).max(0.01)
        ),
    );
    ratio.target = Some(format!("≥ {TARGET_COMPRESS_RATIO}"));
    if km > 0.0 {
        ratio.ratio = Some(round2(rm / km));
        ratio.met = Some(rm / km >= TARGET_COMPRESS_RATIO);
    }
    ratio
}
