//! `kiln build`: runs the stages in order for one role and moves the finished build into place.

use crate::formats::disk;
use crate::pipeline::base;
use crate::pipeline::compose::{self, ComposeInput};
use crate::pipeline::emit;
use crate::pipeline::fetch;
use crate::pipeline::k3s;
use crate::pipeline::resolve::{self, Resolved};
use crate::project::lock;
use crate::project::recipe::Project;
use crate::sys::util;
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod boot_disk;
mod publish;
mod schedule;
mod steps;

pub use self::{boot_disk::*, publish::*, schedule::*};
pub(crate) use steps::*;

/// Where builds go and how.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub out_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// Rebuild even if `out/<role>/<build-id>/` exists.
    pub force: bool,
    /// Use only cached artifacts and bases; never touch the network.
    pub offline: bool,
    /// Fail instead of changing kiln.lock.
    pub locked: bool,
}

/// What a role build did.
#[derive(Debug, Serialize)]
pub struct BuildReport {
    pub role: String,
    pub build_id: crate::pipeline::resolve::BuildId,
    pub dir: PathBuf,
    /// The build already existed and was left as is.
    pub up_to_date: bool,
    pub base_cached: bool,
    /// Seconds per stage.
    pub timings: Vec<(String, f64)>,
    pub artifacts: Vec<crate::trust::sums::Artifact>,
}

/// Names of the artifacts every role build emits (besides SHA256SUMS).
pub const ARTIFACTS: &[&str] = &[
    "disk.qcow2",
    "disk.raw",
    "initrd.img",
    "manifest.json",
    "packages.json",
    "packages.txt",
    "root.pieces",
    "root.squashfs",
    "rootfs.tar.zst",
    "update.txt",
    "vmlinuz",
];

struct Stages {
    bar: ProgressBar,
    timings: Vec<(String, f64)>,
    started: Instant,
    role: String,
    out_dir: PathBuf,
}

impl Stages {
    fn new(role: &str, out_dir: &Path) -> Self {
        let bar = progress().add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix}: {msg}")
                .expect("valid template"),
        );
        bar.set_prefix(role.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        Stages {
            bar,
            timings: Vec::new(),
            started: Instant::now(),
            role: role.into(),
            out_dir: out_dir.to_path_buf(),
        }
    }
    fn stage<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.bar.set_message(name.to_string());
        util::test_pause(name);
        let t = Instant::now();
        let r = f()
            .map_err(|e| disk_full_hint(e, &self.out_dir))
            .with_context(|| format!("{} stage failed for role {}", name, self.role));
        let secs = t.elapsed().as_secs_f64();
        tracing::info!(role = %self.role, stage = name, seconds = format!("{secs:.1}"), "stage done");
        self.timings
            .push((name.to_string(), (secs * 10.0).round() / 10.0));
        r
    }
    fn finish(self, msg: String) -> Vec<(String, f64)> {
        self.bar.finish_and_clear();
        tracing::info!(role = %self.role, seconds = format!("{:.1}", self.started.elapsed().as_secs_f64()), "{msg}");
        self.timings
    }
}

/// Builds one role from its resolved inputs (see [`resolve::resolve`]).
pub fn build_role(
    project: &Project,
    resolved: &Resolved,
    opts: &BuildOptions,
) -> Result<BuildReport> {
    build_role_inner(project, resolved, opts, false)
}

/// The role build, step by step: up to date already, or the stages (fetch, base, compose,
/// compression, kernel, disk.raw, disk.qcow2, manifest and signature) into a staging dir that is
/// then published. `base_checked`: this process built or checked the role's cached base moments
/// ago, so the base stage does not hash its 800 MB again.
fn build_role_inner(
    project: &Project,
    resolved: &Resolved,
    opts: &BuildOptions,
    base_checked: bool,
) -> Result<BuildReport> {
    let role = resolved.role.as_str();
    let keys_dir = check_keys(project)?;
    let _lock = lock_out(&opts.out_dir)?;
    let role_dir = prepare_role_dir(&opts.out_dir, role)?;
    let final_dir = role_dir.join(&resolved.build_id);
    if is_published(&final_dir) && !opts.force {
        return up_to_date(resolved, &role_dir, final_dir);
    }

    let mut st = Stages::new(role, &opts.out_dir);
    let (fetched, debs, locked_artifacts) =
        st.stage("fetch", || fetch_stage(project, resolved, opts))?;
    let token = if resolved.recipe.k3s.mode.runs_k3s() {
        Some(resolve::read_token(project)?)
    } else {
        None
    };
    let base = st.stage("base", || {
        base_stage(project, resolved, debs, opts, base_checked)
    })?;
    let k3s_layer = match &token {
        Some(t) => k3s::layer(project, &resolved.recipe, &fetched, t)?,
        None => k3s::Layer::default(),
    };
    let contains_secrets = k3s_layer.contains_secrets;
    let staging = staging_dir(&role_dir)?;
    let sd = staging.path();
    let tar_path = sd.join(".rootfs.tar");
    let composed = st.stage("compose", || {
        compose_root(project, resolved, &base, k3s_layer, &tar_path)
    })?;
    let packages = base::parse_dpkg_status(&composed.dpkg_status);
    let package_lines = package_lines(&packages);
    record_lock(project, resolved, locked_artifacts, &package_lines, opts)?;
    let sde = project.cluster.section.source_date_epoch;
    let pieces = st.stage("rootfs.tar.zst+root.squashfs", || {
        let images = compress_root(&tar_path, sd, sde, &opts.cache_dir)?;
        let p = write_root_pieces(sd, &images)?;
        if let Some((from, plan)) = update_from_latest(&role_dir, &p) {
            tracing::info!(
                role,
                from = %from,
                fetched = %util::human_bytes(plan.fetched_bytes),
                copied = %util::human_bytes(plan.copied_bytes),
                "an update from the latest build fetches {} of root.squashfs's pieces",
                plan.fetched_pieces
            );
        }
        Ok(images)
    })?;
    fs::remove_file(&tar_path).with_context(|| format!("removing {}", tar_path.display()))?;

    let layout = disk_layout(resolved);
    let cmdline = kernel_cmdline(resolved, &disk::guid_to_string(&layout.root_guid));
    st.stage("kernel", || {
        write_kernel_and_packages(sd, resolved, &composed, &packages, &package_lines)?;
        write_update_txt(project, sd, resolved)
    })?;
    let disk_info = st.stage("disk.raw", || {
        write_disk_raw(sd, resolved, &composed, &layout, &cmdline, sde)
    })?;
    st.stage("disk.qcow2", || {
        emit::qcow2_from_raw(&sd.join("disk.raw"), &sd.join("disk.qcow2"))
    })?;
    let facts = ManifestFacts {
        kernel_version: &composed.kernel_version,
        cmdline: &cmdline,
        contains_secrets,
        packages: packages.len(),
        layout: &layout,
        disk: &disk_info,
    };
    st.stage("manifest", || {
        write_manifest_and_sums(project, resolved, &facts, sd)?;
        sign_and_sync(sd, &keys_dir)
    })?;

    if contains_secrets {
        restrict_permissions(sd)?;
    }
    publish_and_point_latest(staging, &final_dir, &role_dir, &resolved.build_id)?;
    save_reuse_indexes(role, &final_dir, pieces, &opts.cache_dir);
    let artifacts = read_sums(&final_dir)?;
    let timings = st.finish(format!("built {role} {}", resolved.build_id));
    Ok(BuildReport {
        role: role.into(),
        build_id: resolved.build_id.clone(),
        dir: final_dir,
        up_to_date: false,
        base_cached: base.cached,
        timings,
        artifacts,
    })
}

/// Checks that the project's private keys are readable by their owner only (when there are
/// keys); returns the keys directory.
fn check_keys(project: &Project) -> Result<PathBuf> {
    let keys_dir = project.layout().keys();
    if keys_dir.is_dir() {
        crate::trust::keys::check_private_permissions(&keys_dir)?;
    }
    Ok(keys_dir)
}

/// `out/<role>/`, created, without the staging dirs an interrupted build left (the `out/` lock
/// is held).
fn prepare_role_dir(out_dir: &Path, role: &str) -> Result<PathBuf> {
    let role_dir = out_dir.join(role);
    fs::create_dir_all(&role_dir).with_context(|| format!("creating {}", role_dir.display()))?;
    clean_stale(&role_dir)?;
    Ok(role_dir)
}

/// Whether `dir` holds a published build (its sums and their signature are written last).
fn is_published(dir: &Path) -> bool {
    dir.join("SHA256SUMS").is_file() && dir.join("SHA256SUMS.sig").is_file()
}

/// The report of a build that exists already; `latest` points at it again.
fn up_to_date(resolved: &Resolved, role_dir: &Path, final_dir: PathBuf) -> Result<BuildReport> {
    point_latest(role_dir, &resolved.build_id)?;
    Ok(BuildReport {
        role: resolved.role.clone(),
        build_id: resolved.build_id.clone(),
        dir: final_dir.clone(),
        up_to_date: true,
        base_cached: true,
        timings: vec![],
        artifacts: read_sums(&final_dir)?,
    })
}

/// A staging dir (`.tmp-*`) in `role_dir`: removed when dropped, renamed by [`publish`].
fn staging_dir(role_dir: &Path) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(role_dir)
        .with_context(|| format!("creating a staging dir in {}", role_dir.display()))
}

/// What the compression stage made: root.squashfs and the frame index of rootfs.tar.zst.
type RootImages = (
    crate::formats::squashfs::Written,
    crate::formats::reuse::Index,
);

type Fetched = (
    k3s::Fetched,
    Vec<std::path::PathBuf>,
    BTreeMap<String, lock::LockedArtifact>,
);
