//! The stages of one role build between fetching and publishing: base, compose, compress,
//! kernel and packages, disk image.

use super::*;
use crate::formats::pieces::{self, Pieces};

/// The base stage: the role's base from the cache, or built (`base_checked`: see
/// [`build_role_inner`]).
pub(super) fn base_stage(
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

/// The compose stage: the role's root tarball at `tar_path`, with the k3s layer.
pub(super) fn compose_root(
    project: &Project,
    resolved: &Resolved,
    base: &base::Base,
    k3s_layer: k3s::Layer,
    tar_path: &Path,
) -> Result<compose::Composed> {
    let mut extra = k3s_layer.entries;
    let owner = crate::pipeline::state::data_owner(project)?;
    let k3s = resolved.recipe.k3s.mode.runs_k3s();
    extra.extend(crate::pipeline::state::image_entries(
        resolved.recipe.boot.root_slot_mib,
        &owner,
        k3s,
    ));
    let (update_files, update_units) =
        crate::pipeline::update::image_entries(project, &resolved.recipe)?;
    extra.extend(update_files);
    let mut extra_enable = k3s_layer.enable;
    extra_enable.extend(update_units);
    extra_enable.push("kiln-data.service".into());
    if k3s {
        extra_enable.push("kiln-longhorn-disks.service".into());
    }
    compose::compose(
        &ComposeInput {
            project,
            recipe: &resolved.recipe,
            build_id: &resolved.build_id,
            overlays: &resolved.overlays,
            base_tar: &base.tar,
            extra,
            extra_enable,
        },
        tar_path,
    )
}

/// `name version architecture` of each installed package (packages.txt, kiln.lock).
pub(super) fn package_lines(packages: &[base::Package]) -> Vec<String> {
    packages
        .iter()
        .map(|p| format!("{} {} {}", p.name, p.version, p.architecture))
        .collect()
}

/// Before any artifact is emitted: records (or, with --locked, checks) artifacts and packages
/// in kiln.lock.
pub(super) fn record_lock(
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

/// rootfs.tar.zst and root.squashfs in `sd` from the composed tar. Both read the tar: they run
/// side by side (both use every core).
pub(super) fn compress_root(
    tar_path: &Path,
    sd: &Path,
    sde: i64,
    cache_dir: &Path,
) -> Result<RootImages> {
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

/// `root.pieces` of the root.squashfs in `sd` (see [`crate::formats::pieces`]): its blocks as
/// the writer recorded them.
pub(super) fn write_root_pieces(sd: &Path, images: &RootImages) -> Result<Pieces> {
    let p = pieces::of_image(&sd.join("root.squashfs"), &images.0.index.spans())?;
    fs::write(sd.join("root.pieces"), p.to_text()).context("writing root.pieces")?;
    Ok(p)
}

/// What a node running the role's `latest` build would move to update to this one (pieces
/// copied from its active slot, pieces fetched), when that build has a `root.pieces`.
pub(super) fn update_from_latest(role_dir: &Path, new: &Pieces) -> Option<(String, pieces::Plan)> {
    let latest = role_dir.join(crate::project::layout::LATEST);
    let id = fs::read_link(&latest).ok()?.to_string_lossy().into_owned();
    let text =
        util::read_small_string(&latest.join("root.pieces"), pieces::MAX_FILE, "root.pieces")
            .ok()?;
    let old = Pieces::parse(&text, "root.pieces").ok()?;
    Some((id, new.plan_from(&old)))
}

/// `update.txt` in `sd` (see [`crate::pipeline::update::update_txt`]).
pub(super) fn write_update_txt(project: &Project, sd: &Path, resolved: &Resolved) -> Result<()> {
    let options = kernel_cmdline(resolved, crate::pipeline::update::PARTUUID_PLACEHOLDER);
    let text = crate::pipeline::update::update_txt(
        &resolved.role,
        &resolved.build_id,
        &project.cluster.section.name,
        project.cluster.section.source_date_epoch,
        &entry_title(resolved),
        &options,
    );
    fs::write(sd.join("update.txt"), text).context("writing update.txt")
}

/// The kernel stage: vmlinuz, initrd.img, packages.txt and packages.json in `sd`.
pub(super) fn write_kernel_and_packages(
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
pub(super) fn write_disk_raw(
    sd: &Path,
    resolved: &Resolved,
    composed: &compose::Composed,
    layout: &disk::DiskLayout,
    cmdline: &str,
    sde: i64,
) -> Result<disk::DiskInfo> {
    let pieces = fs::read(sd.join("root.pieces"))?;
    let files = esp_files(resolved, composed, cmdline, pieces);
    let squashfs = sd.join("root.squashfs");
    check_root_slot(resolved, fs::metadata(&squashfs)?.len())?;
    disk::write_disk(
        &sd.join("disk.raw"),
        layout,
        &files,
        &sd.join("root.squashfs"),
        sde,
    )
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

/// Downloads (or finds in the cache) every pinned artifact the role needs.
pub(super) fn fetch_stage(project: &Project, r: &Resolved, opts: &BuildOptions) -> Result<Fetched> {
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
