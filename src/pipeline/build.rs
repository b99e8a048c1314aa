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
    "root.squashfs",
    "rootfs.tar.zst",
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

/// Adds what to do to an error caused by a full disk under `out_dir` (ENOSPC): the staging
/// directory is removed when the build unwinds, so nothing half-written stays behind.
pub(crate) fn disk_full_hint(e: anyhow::Error, out_dir: &Path) -> anyhow::Error {
    if !util::is_disk_full(&e) {
        return e;
    }
    let free = crate::sys::os::free_bytes(out_dir)
        .map(util::human_bytes)
        .unwrap_or_else(|| "unknown".into());
    e.context(format!(
        "No space left on device in {} ({free} free): \
         free space there, or build with --out on a larger file system (a role build needs \
         about 4 times its root.squashfs while it is made)",
        out_dir.display()
    ))
}

/// Takes the `out/` lock for the duration of a build (concurrent kiln runs wait).
pub(crate) fn lock_out(out_dir: &Path) -> Result<fs::File> {
    crate::sys::util::lock_dir(out_dir, "another kiln is building into this out/")
}

/// Removes staging directories a killed build left behind (we hold the lock, so none is live).
pub(crate) fn clean_stale(dir: &Path) -> Result<()> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd {
        let e = e?;
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            let p = e.path();
            tracing::info!(path = %p.display(), "removing leftovers of an interrupted build");
            if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            }
            .with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// The bases `roles` need that are not in the cache, one entry per distinct base in the order
/// of the roles needing them; roles already built (and not forced) need none.
pub fn missing_bases<'a>(
    roles: &'a [Resolved],
    opts: &BuildOptions,
) -> Vec<(String, Vec<&'a Resolved>)> {
    let mut missing: Vec<(String, Vec<&Resolved>)> = Vec::new();
    for r in roles {
        let built = opts.out_dir.join(&r.role).join(&r.build_id);
        if !opts.force
            && built.join("SHA256SUMS").is_file()
            && built.join("SHA256SUMS.sig").is_file()
        {
            continue; // up to date: its role build needs no base
        }
        // The cache entry is named by the cache key (the spec plus this host's mmdebstrap and
        // apt sources); when that cannot be computed, the base stage will say why.
        let cached = r.base.cache_key().ok().is_some_and(|k| {
            let dir = crate::project::layout::Cache::new(&opts.cache_dir).base(&k);
            dir.join("rootfs.tar").is_file() && dir.join("spec.json").is_file()
        });
        if cached {
            continue;
        }
        match missing.iter_mut().find(|(k, _)| *k == r.base_key) {
            Some((_, rs)) => rs.push(r),
            None => missing.push((r.base_key.clone(), vec![r])),
        }
    }
    missing
}

/// Builds `roles`; the reports are in the order given. Their missing bases are built side by
/// side in the background (up to one per core, DKMS bases first, then in the order the roles
/// need them) while the roles are composed one after the other, each as soon as its base is
/// ready (a role whose base is still building lets the next ready one go first): on two cores,
/// worker+master+storage from an empty cache cost the two bases side by side, with the worker
/// and master composes overlapping the storage base. With a DKMS base (gpu) among them, the
/// other bases run at a lower CPU priority so that the longest one — the critical path — is
/// slowed as little as possible. A role whose base was built in this run
/// reports `base_cached: false`, as if its own base stage had built it; its base stage then
/// does not hash the base again. After a failed role, the bases being built are finished (an
/// mmdebstrap run is not interrupted) and no further one is started.
pub fn build_roles(
    project: &Project,
    roles: &[Resolved],
    opts: &BuildOptions,
    mut each: impl FnMut(&BuildReport),
) -> Result<Vec<BuildReport>> {
    let todo = bases_to_build(roles, opts);
    if todo.is_empty() {
        return build_in_order(project, roles, opts, each);
    }
    let at_once = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .max(2)
        .min(todo.len());
    let bar = bases_bar(&todo, at_once);
    let queue = BaseQueue::new(&todo);
    let (tx, rx) = std::sync::mpsc::channel::<(String, Result<()>)>();
    let result = std::thread::scope(|s| {
        for _ in 0..at_once {
            let (tx, queue) = (tx.clone(), &queue);
            s.spawn(move || queue.build_bases(project, &opts.cache_dir, tx));
        }
        drop(tx);
        let r = build_as_bases_arrive(project, roles, opts, &queue, &rx, &mut each);
        if r.is_err() {
            queue.stop.store(true, Ordering::SeqCst);
        }
        r
    });
    bar.finish_and_clear();
    result
}

/// The missing bases to build in the background (none offline), longest first.
fn bases_to_build<'a>(
    roles: &'a [Resolved],
    opts: &BuildOptions,
) -> Vec<(String, Vec<&'a Resolved>)> {
    let mut todo = if opts.offline {
        Vec::new()
    } else {
        missing_bases(roles, opts)
    };
    // Longest first: a base whose DKMS compiles kernel modules (sign_modules; the gpu role's
    // NVIDIA driver) takes several times longer than the others, so it starts at once and the
    // other core works through the rest meanwhile (stable: otherwise in role order).
    todo.sort_by_key(|(_, rs)| rs[0].base.module_signing_cert.is_none());
    todo
}

/// Builds the roles one after the other when no base is to be built first.
fn build_in_order(
    project: &Project,
    roles: &[Resolved],
    opts: &BuildOptions,
    mut each: impl FnMut(&BuildReport),
) -> Result<Vec<BuildReport>> {
    let mut reports = Vec::new();
    for r in roles {
        let rep = build_role(project, r, opts)?;
        each(&rep);
        reports.push(rep);
    }
    Ok(reports)
}

/// The progress line of the bases built in the background.
fn bases_bar(todo: &[(String, Vec<&Resolved>)], at_once: usize) -> ProgressBar {
    let bar = progress().add(ProgressBar::new_spinner());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] bases: {msg}")
            .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!(
        "building {} base(s), {} at a time, for {}",
        todo.len(),
        at_once,
        todo.iter()
            .flat_map(|(_, rs)| rs.iter().map(|r| r.role.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    bar
}

/// The bases built in the background, taken in order by the builder threads.
struct BaseQueue<'a> {
    todo: &'a [(String, Vec<&'a Resolved>)],
    next: AtomicUsize,
    /// The first base compiles modules with DKMS and others follow it.
    critical_first: bool,
    /// Set when a role fails: builders take no further base (those running finish).
    stop: AtomicBool,
}

impl<'a> BaseQueue<'a> {
    fn new(todo: &'a [(String, Vec<&'a Resolved>)]) -> Self {
        BaseQueue {
            todo,
            next: AtomicUsize::new(0),
            critical_first: todo.len() > 1 && todo[0].1[0].base.module_signing_cert.is_some(),
            stop: AtomicBool::new(false),
        }
    }

    /// Whether the base `key` is built here (the roles needing it wait for it).
    fn builds(&self, key: &str) -> bool {
        self.todo.iter().any(|(t, _)| t == key)
    }

    /// One builder thread: takes the next base until none is left or a role failed, and sends
    /// each result.
    fn build_bases(
        &self,
        project: &Project,
        cache_dir: &Path,
        tx: std::sync::mpsc::Sender<(String, Result<()>)>,
    ) {
        loop {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let idx = self.next.fetch_add(1, Ordering::SeqCst);
            let Some((key, rs)) = self.todo.get(idx) else {
                break;
            };
            if idx > 0 && self.critical_first {
                // The DKMS base is the critical path of the whole build: the other bases
                // (and their mmdebstrap, dpkg, compilers) yield the CPU to it and use what
                // it leaves idle (its unpacking and linking phases are single-threaded).
                crate::sys::os::lower_thread_priority(10);
            }
            let t = Instant::now();
            let built = base_of(project, rs[0], cache_dir, false)
                .map(|_| ())
                .with_context(|| format!("base stage failed for role {}", rs[0].role));
            tracing::info!(
                roles = %rs.iter().map(|r| r.role.as_str()).collect::<Vec<_>>().join(","),
                seconds = format!("{:.1}", t.elapsed().as_secs_f64()),
                "base built"
            );
            if tx.send((key.clone(), built)).is_err() {
                break;
            }
        }
    }
}

/// Builds the roles while `queue`'s bases arrive on `rx`; the reports are in the order of
/// `roles`.
fn build_as_bases_arrive(
    project: &Project,
    roles: &[Resolved],
    opts: &BuildOptions,
    queue: &BaseQueue,
    rx: &std::sync::mpsc::Receiver<(String, Result<()>)>,
    each: &mut impl FnMut(&BuildReport),
) -> Result<Vec<BuildReport>> {
    // Results of the bases built here, by key, as they arrive.
    let mut ready: BTreeMap<String, Result<()>> = BTreeMap::new();
    let mut done: Vec<Option<BuildReport>> = roles.iter().map(|_| None).collect();
    let mut pending: Vec<usize> = (0..roles.len()).collect();
    while !pending.is_empty() {
        // The first role (in the given order) whose base is ready: a role waiting for a
        // long base (gpu, listed first by name) does not hold up the others.
        let pick = pending.iter().position(|&i| {
            let k = &roles[i].base_key;
            !queue.builds(k) || ready.contains_key(k)
        });
        let Some(pos) = pick else {
            let (k, res) = rx
                .recv()
                .context("internal: the base builders stopped early")?;
            ready.insert(k, res);
            continue;
        };
        let i = pending.remove(pos);
        let r = &roles[i];
        let prepared = ready.contains_key(&r.base_key);
        if let Some(Err(e)) = ready.remove(&r.base_key) {
            return Err(e);
        }
        if prepared {
            ready.insert(r.base_key.clone(), Ok(()));
        }
        let mut rep = build_role_inner(project, r, opts, prepared)?;
        if prepared && !rep.up_to_date {
            rep.base_cached = false;
        }
        each(&rep);
        done[i] = Some(rep);
    }
    Ok(done.into_iter().flatten().collect())
}

/// Where every progress line of a build is drawn (role stages and background bases at once).
fn progress() -> &'static indicatif::MultiProgress {
    static P: std::sync::OnceLock<indicatif::MultiProgress> = std::sync::OnceLock::new();
    P.get_or_init(indicatif::MultiProgress::new)
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
        compress_root(&tar_path, sd, sde, &opts.cache_dir)
    })?;
    fs::remove_file(&tar_path).with_context(|| format!("removing {}", tar_path.display()))?;

    let layout = disk_layout(resolved);
    let cmdline = kernel_cmdline(resolved, &disk::guid_to_string(&layout.root_guid));
    st.stage("kernel", || {
        write_kernel_and_packages(sd, resolved, &composed, &packages, &package_lines)
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

/// The base stage: the role's base from the cache, or built (`base_checked`: see
/// [`build_role_inner`]).
fn base_stage(
    project: &Project,
    resolved: &Resolved,
    debs: Vec<PathBuf>,
    opts: &BuildOptions,
    base_checked: bool,
) -> Result<base::Base> {
    ensure_base(
        project,
        resolved,
        debs,
        &opts.cache_dir,
        opts.offline,
        base_checked,
    )
}

/// A staging dir (`.tmp-*`) in `role_dir`: removed when dropped, renamed by [`publish`].
fn staging_dir(role_dir: &Path) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(role_dir)
        .with_context(|| format!("creating a staging dir in {}", role_dir.display()))
}

/// The compose stage: the role's root tarball at `tar_path`, with the k3s layer.
fn compose_root(
    project: &Project,
    resolved: &Resolved,
    base: &base::Base,
    k3s_layer: k3s::Layer,
    tar_path: &Path,
) -> Result<compose::Composed> {
    compose::compose(
        &ComposeInput {
            project,
            recipe: &resolved.recipe,
            build_id: &resolved.build_id,
            overlays: &resolved.overlays,
            base_tar: &base.tar,
            extra: k3s_layer.entries,
            extra_enable: k3s_layer.enable,
        },
        tar_path,
    )
}

/// `name version architecture` of each installed package (packages.txt, kiln.lock).
fn package_lines(packages: &[base::Package]) -> Vec<String> {
    packages
        .iter()
        .map(|p| format!("{} {} {}", p.name, p.version, p.architecture))
        .collect()
}

/// Before any artifact is emitted: records (or, with --locked, checks) artifacts and packages
/// in kiln.lock.
fn record_lock(
    project: &Project,
    resolved: &Resolved,
    artifacts: BTreeMap<String, lock::LockedArtifact>,
    package_lines: &[String],
    opts: &BuildOptions,
) -> Result<()> {
    lock::apply(
        &project.root,
        &lock::Lock {
            version: 1,
            artifacts,
            bases: [(
                resolved.base_key.clone(),
                lock::LockedBase {
                    suite: resolved.base.suite.clone(),
                    packages: package_lines.to_vec(),
                },
            )]
            .into(),
        },
        opts.locked,
    )
}

/// What the compression stage made: root.squashfs and the frame index of rootfs.tar.zst.
type RootImages = (
    crate::formats::squashfs::Written,
    crate::formats::reuse::Index,
);

/// rootfs.tar.zst and root.squashfs in `sd` from the composed tar. Both read the tar: they run
/// side by side (both use every core).
fn compress_root(tar_path: &Path, sd: &Path, sde: i64, cache_dir: &Path) -> Result<RootImages> {
    std::thread::scope(|s| {
        let zst = s.spawn(|| {
            util::test_pause("rootfs.tar.zst");
            emit::compress_tar(tar_path, &sd.join("rootfs.tar.zst"), Some(cache_dir))
        });
        util::test_pause("root.squashfs");
        let sq = emit::squashfs_from_tar(tar_path, &sd.join("root.squashfs"), sde, Some(cache_dir));
        let zst = zst
            .join()
            .map_err(|_| anyhow::anyhow!("the rootfs.tar.zst thread panicked"))?;
        match (sq, zst) {
            // Both failed (e.g. the disk filled up): report the clearer error.
            (Err(a), Err(b)) if util::is_disk_full(&b) && !util::is_disk_full(&a) => Err(b),
            (sq, zst) => Ok((sq?, zst?)),
        }
    })
}

/// The kernel stage: vmlinuz, initrd.img, packages.txt and packages.json in `sd`.
fn write_kernel_and_packages(
    sd: &Path,
    resolved: &Resolved,
    composed: &compose::Composed,
    packages: &[base::Package],
    package_lines: &[String],
) -> Result<()> {
    fs::write(sd.join("vmlinuz"), &composed.vmlinuz)?;
    fs::write(sd.join("initrd.img"), &composed.initrd)?;
    let txt: String = package_lines.iter().map(|l| format!("{l}\n")).collect();
    fs::write(sd.join("packages.txt"), txt)?;
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "schema": "kiln.packages/1",
        "suite": resolved.recipe.debian.suite,
        "packages": packages,
    }))? + "\n";
    fs::write(sd.join("packages.json"), json)?;
    Ok(())
}

/// The disk.raw stage: GPT disk with the ESP (systemd-boot, kernel, initrd), root.squashfs
/// and an empty seed slot.
fn write_disk_raw(
    sd: &Path,
    resolved: &Resolved,
    composed: &compose::Composed,
    layout: &disk::DiskLayout,
    cmdline: &str,
    sde: i64,
) -> Result<disk::DiskInfo> {
    let files = esp_files(resolved, composed, cmdline);
    disk::write_disk(
        &sd.join("disk.raw"),
        layout,
        &files,
        &sd.join("root.squashfs"),
        sde,
    )
}

/// What manifest.json records of the build's outputs besides the artifacts.
struct ManifestFacts<'a> {
    kernel_version: &'a str,
    cmdline: &'a str,
    contains_secrets: bool,
    /// How many packages are installed.
    packages: usize,
    layout: &'a disk::DiskLayout,
    disk: &'a disk::DiskInfo,
}

/// manifest.json: the build's inputs (`resolved`), what it made, and `artifacts` (every
/// artifact but the manifest).
fn manifest_json(
    project: &Project,
    resolved: &Resolved,
    f: &ManifestFacts,
    artifacts: &[crate::trust::sums::Artifact],
) -> serde_json::Value {
    serde_json::json!({
        "schema": "kiln.manifest/1",
        "build_id": resolved.build_id,
        "role": resolved.role,
        "cluster": project.cluster.section.name,
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "source_date_epoch": project.cluster.section.source_date_epoch,
        "contains_secrets": f.contains_secrets,
        "secrets": resolved.secrets,
        "kernel": { "version": f.kernel_version, "cmdline": f.cmdline },
        "base": { "key": resolved.base_key, "spec": resolved.base, "packages": f.packages },
        "disk": {
            "size": f.disk.size_bytes,
            "disk_guid": disk::guid_to_string(&f.layout.disk_guid),
            "esp_partuuid": disk::guid_to_string(&f.layout.esp_guid),
            "root_partuuid": disk::guid_to_string(&f.layout.root_guid),
            "seed_partuuid": disk::guid_to_string(&f.layout.seed_guid),
            "seed_lba": f.disk.seed,
        },
        "inputs": resolved,
        "artifacts": artifacts,
    })
}

/// Hashes the artifacts in `sd`, writes manifest.json, then SHA256SUMS of all of them.
fn write_manifest_and_sums(
    project: &Project,
    resolved: &Resolved,
    facts: &ManifestFacts,
    sd: &Path,
) -> Result<()> {
    let names: Vec<&str> = ARTIFACTS
        .iter()
        .copied()
        .filter(|n| *n != "manifest.json")
        .collect();
    let artifacts = crate::trust::sums::hash_artifacts(sd, &names)?;
    let manifest = manifest_json(project, resolved, facts, &artifacts);
    fs::write(
        sd.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    // Every artifact is hashed once: the manifest's list plus the manifest itself.
    let mut all = artifacts;
    all.extend(crate::trust::sums::hash_artifacts(sd, &["manifest.json"])?);
    fs::write(sd.join("SHA256SUMS"), crate::trust::sums::sha256sums(&all))?;
    Ok(())
}

/// Signs SHA256SUMS with the project's key and syncs every file of the build to disk.
fn sign_and_sync(sd: &Path, keys_dir: &Path) -> Result<()> {
    util::test_pause("sign");
    crate::trust::sign::sign_dir(sd, &crate::trust::sign::load_signing_key(keys_dir)?)?;
    for n in ARTIFACTS
        .iter()
        .chain(["SHA256SUMS", "SHA256SUMS.sig"].iter())
    {
        util::sync_path(&sd.join(n))?;
    }
    Ok(())
}

/// Publish: renames the complete staging dir into place, then moves `latest`.
fn publish_and_point_latest(
    staging: tempfile::TempDir,
    final_dir: &Path,
    role_dir: &Path,
    build_id: &str,
) -> Result<()> {
    util::test_pause("publish");
    publish(staging, final_dir)?;
    util::test_pause("latest");
    point_latest(role_dir, build_id)
}

/// The next build (of any role) copies this image's unchanged blocks instead of compressing
/// them again. Only an optimisation: a failure here does not fail the build.
fn save_reuse_indexes(role: &str, final_dir: &Path, pieces: RootImages, cache_dir: &Path) {
    let (squashfs, zst) = pieces;
    for (name, index, dir) in [
        (
            "root.squashfs",
            &squashfs.index,
            emit::squashfs_index_dir(cache_dir),
        ),
        ("rootfs.tar.zst", &zst, emit::zst_index_dir(cache_dir)),
    ] {
        let path = dir.join(format!("{role}.json"));
        let saved = fs::canonicalize(final_dir.join(name))
            .and_then(|image| index.save(&image, &path).map_err(std::io::Error::other));
        if let Err(e) = saved {
            tracing::warn!("not saving {}: {e:#}", path.display());
        }
    }
}

/// Renames a complete staging dir (made in `final_dir`'s parent) to `final_dir`. A forced
/// rebuild swaps the new build with the old one in one `renameat2(RENAME_EXCHANGE)` and then
/// removes the old one (now at the staging name, `.tmp-*`, cleaned by [`clean_stale`] if we die
/// in between), so readers — and `latest` — see either the old or the new build, never a mix or
/// nothing. File systems without the exchange fall back to moving the old build aside first.
pub(crate) fn publish(staging: tempfile::TempDir, final_dir: &Path) -> Result<()> {
    let parent = final_dir.parent().context("publish target has no parent")?;
    let staged = staging.keep();
    if final_dir.exists() {
        match crate::sys::os::rename_exchange(&staged, final_dir) {
            Ok(()) => {
                fs::remove_dir_all(&staged)
                    .with_context(|| format!("removing the old build, now {}", staged.display()))?;
            }
            Err(e) => {
                tracing::debug!("renameat2(RENAME_EXCHANGE) unavailable ({e}); moving aside");
                let name = final_dir
                    .file_name()
                    .context("publish target has no name")?;
                let old = parent.join(format!(".tmp-old-{}", name.to_string_lossy()));
                fs::rename(final_dir, &old)
                    .with_context(|| format!("moving aside {}", final_dir.display()))?;
                fs::rename(&staged, final_dir)
                    .with_context(|| format!("publishing {}", final_dir.display()))?;
                fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
            }
        }
    } else if let Err(e) = fs::rename(&staged, final_dir) {
        fs::remove_dir_all(&staged).ok();
        return Err(e).with_context(|| format!("publishing {}", final_dir.display()));
    }
    util::sync_path(parent)
}

/// Images that carry key material are readable by their owner only (dir 0700, files 0600).
pub(crate) fn restrict_permissions(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", p.display()))?;
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", dir.display()))
}

/// The role's base from the cache, or built: the pinned `.deb` files (`debs`, fetched, in
/// recipe order) and, with `debian.sign_modules`, the module-signing key go in.
pub(crate) fn ensure_base(
    project: &Project,
    r: &Resolved,
    debs: Vec<std::path::PathBuf>,
    cache_dir: &Path,
    offline: bool,
    checked: bool,
) -> Result<base::Base> {
    let module_signing = if r.recipe.debian.sign_modules {
        Some(crate::trust::keys::module_signing(
            &project.layout().keys(),
        )?)
    } else {
        None
    };
    base::ensure_with(
        &r.base,
        &base::BaseInputs {
            debs,
            module_signing,
        },
        cache_dir,
        offline,
        checked,
    )
}

/// The role's base from the cache, or built after fetching its pinned `.deb` files — the base
/// stage on its own, outside a role build (nothing is recorded in kiln.lock).
pub(crate) fn base_of(
    project: &Project,
    r: &Resolved,
    cache_dir: &Path,
    offline: bool,
) -> Result<base::Base> {
    let fetcher = fetch::Fetcher::new(cache_dir).offline(offline);
    let debs = fetch_debs(&r.recipe, &fetcher, &mut BTreeMap::new())?;
    ensure_base(project, r, debs, cache_dir, offline, false)
}

/// Fetches the recipe's pinned `.deb` files (artifacts `deb/<file name>` in kiln.lock).
pub(crate) fn fetch_debs(
    recipe: &crate::project::recipe::Recipe,
    fetcher: &fetch::Fetcher,
    locked: &mut BTreeMap<String, lock::LockedArtifact>,
) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for d in &recipe.debian.debs {
        let name = format!(
            "deb/{}",
            crate::project::recipe::Debian::deb_file_name(&d.url)
        );
        let p = fetcher.fetch(&fetch::Artifact {
            name: name.clone(),
            url: d.url.clone(),
            sha256: d.sha256.clone(),
            size: d.size,
        })?;
        let size = fs::metadata(&p)?.len();
        locked.insert(
            name,
            lock::LockedArtifact {
                url: d.url.clone(),
                sha256: d.sha256.clone(),
                size,
            },
        );
        out.push(p);
    }
    Ok(out)
}

type Fetched = (
    k3s::Fetched,
    Vec<std::path::PathBuf>,
    BTreeMap<String, lock::LockedArtifact>,
);

/// Downloads (or finds in the cache) every pinned artifact the role needs.
fn fetch_stage(project: &Project, r: &Resolved, opts: &BuildOptions) -> Result<Fetched> {
    let mut out = k3s::Fetched::default();
    let mut locked = BTreeMap::new();
    let fetcher = fetch::Fetcher::new(&opts.cache_dir).offline(opts.offline);
    let debs = fetch_debs(&r.recipe, &fetcher, &mut locked)?;
    if !r.recipe.k3s.mode.runs_k3s() {
        return Ok((out, debs, locked));
    }
    let k = project
        .cluster
        .k3s
        .as_ref()
        .context("[k3s] missing in cluster.toml")?;
    let mut get =
        |name: &str, url: &str, sha256: &str, size: Option<u64>| -> Result<std::path::PathBuf> {
            let a = fetch::Artifact {
                name: name.into(),
                url: url.into(),
                sha256: sha256.into(),
                size,
            };
            let p = fetcher.fetch(&a)?;
            let len = fs::metadata(&p)?.len();
            locked.insert(
                name.to_string(),
                lock::LockedArtifact {
                    url: url.into(),
                    sha256: sha256.into(),
                    size: len,
                },
            );
            Ok(p)
        };
    out.binary = get("k3s", &k.binary.url, &k.binary.sha256, k.binary.size)?;
    if let Some(a) = &k.airgap_images {
        let p = get("k3s-airgap-images", &a.url, &a.sha256, a.size)?;
        let name = a
            .url
            .rsplit('/')
            .next()
            .unwrap_or("k3s-airgap-images.tar")
            .to_string();
        out.airgap = Some((name, p));
    }
    let sealed = project
        .cluster
        .sealed_secrets
        .as_ref()
        .filter(|_| r.recipe.k3s.mode.is_server());
    if let Some(ss) = sealed {
        if let Some(c) = &ss.chart {
            out.sealed_secrets_chart =
                Some(get("sealed-secrets-chart", &c.url, &c.sha256, c.size)?);
        }
    }
    for c in &r.recipe.k3s.charts {
        let p = get(&format!("chart-{}", c.name), &c.url, &c.sha256, None)?;
        out.charts.insert(c.name.clone(), p);
    }
    Ok((out, debs, locked))
}

/// Size of the seed slot (partition 3) of every role disk; per-node disks put their cloud-init
/// `CIDATA` volume there.
pub const SEED_PARTITION_MIB: u64 = 4;

/// Partition GUIDs derived from the build id: stable across rebuilds, distinct per build.
pub fn disk_layout(r: &Resolved) -> disk::DiskLayout {
    let seed = r.build_id.as_bytes();
    disk::DiskLayout {
        disk_guid: disk::guid_from_seed(seed, "disk"),
        esp_guid: disk::guid_from_seed(seed, "esp"),
        root_guid: disk::guid_from_seed(seed, "root"),
        esp_size_mib: r.recipe.boot.esp_size_mib,
        esp_label: "KILN-ESP".into(),
        esp_volume_id: u32::from_be_bytes(
            disk::guid_from_seed(seed, "esp-volume-id")[..4]
                .try_into()
                .expect("4 bytes"),
        ),
        root_partition_name: "kiln-root".into(),
        seed_size_mib: SEED_PARTITION_MIB,
        seed_guid: disk::guid_from_seed(seed, "seed"),
    }
}

/// Kernel command line for booting the disk: live-boot mounts the squashfs partition as the
/// read-only lower layer with a tmpfs overlay (`plainroot`). live-boot takes `root=` verbatim
/// (no `PARTUUID=` resolution), so the udev by-partuuid path is given.
pub fn kernel_cmdline(r: &Resolved, root_partuuid: &str) -> String {
    let mut args = vec![
        "boot=live".to_string(),
        "plainroot".into(),
        format!("root=/dev/disk/by-partuuid/{root_partuuid}"),
    ];
    args.extend(r.recipe.boot.cmdline.iter().cloned());
    args.join(" ")
}

fn esp_files(r: &Resolved, c: &compose::Composed, cmdline: &str) -> Vec<disk::EspFile> {
    let b = |path: &str, data: Vec<u8>| disk::EspFile {
        path: path.into(),
        source: disk::EspSource::Bytes(data),
    };
    let entry = format!(
        "title kiln {} {} ({})\nlinux /kiln/vmlinuz\ninitrd /kiln/initrd.img\noptions {}\n",
        r.cluster.section.name,
        r.role,
        r.build_id.short(),
        cmdline
    );
    vec![
        b("EFI/BOOT/BOOTX64.EFI", c.bootloader_efi.clone()),
        b("kiln/initrd.img", c.initrd.clone()),
        b("kiln/vmlinuz", c.vmlinuz.clone()),
        b("loader/entries/kiln.conf", entry.into_bytes()),
        b(
            "loader/loader.conf",
            b"default kiln.conf\ntimeout 0\neditor no\n".to_vec(),
        ),
    ]
}

fn point_latest(role_dir: &Path, build_id: &str) -> Result<()> {
    util::symlink_atomic(build_id, &role_dir.join(crate::project::layout::LATEST))
}

/// Reads `SHA256SUMS` of a finished build back into artifacts (sizes from the files).
pub fn read_sums(dir: &Path) -> Result<Vec<crate::trust::sums::Artifact>> {
    let p = dir.join("SHA256SUMS");
    let text = fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    text.lines()
        .map(|l| {
            let (sha, name) = l
                .split_once("  ")
                .with_context(|| format!("{}: malformed line {l:?}", p.display()))?;
            let size = fs::metadata(dir.join(name)).map(|m| m.len()).unwrap_or(0);
            Ok(crate::trust::sums::Artifact {
                name: name.to_string(),
                sha256: sha.to_string(),
                size,
            })
        })
        .collect()
}
