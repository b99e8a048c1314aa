//! The end of a build: manifest, SHA256SUMS and signature, the atomic publish into
//! `out/<role>/<build-id>/`, `latest`, the reuse indexes; the output dir lock.

use super::*;

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

/// What manifest.json records of the build's outputs besides the artifacts.
pub(super) struct ManifestFacts<'a> {
    pub(super) kernel_version: &'a str,
    pub(super) cmdline: &'a str,
    pub(super) contains_secrets: bool,
    /// How many packages are installed.
    pub(super) packages: usize,
    pub(super) layout: &'a disk::DiskLayout,
    pub(super) disk: &'a disk::DiskInfo,
}

/// manifest.json: the build's inputs (`resolved`), what it made, and `artifacts` (every
/// artifact but the manifest).
pub(super) fn manifest_json(
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
pub(super) fn write_manifest_and_sums(
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
pub(super) fn sign_and_sync(sd: &Path, keys_dir: &Path) -> Result<()> {
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
pub(super) fn publish_and_point_latest(
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
pub(super) fn save_reuse_indexes(
    role: &str,
    final_dir: &Path,
    pieces: RootImages,
    cache_dir: &Path,
) {
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

pub(super) fn point_latest(role_dir: &Path, build_id: &str) -> Result<()> {
    util::symlink_atomic(build_id, &role_dir.join(crate::project::layout::LATEST))
}

/// Reads `SHA256SUMS` of a finished build back into artifacts (sizes from the files).
pub fn read_sums(dir: &Path) -> Result<Vec<crate::trust::sums::Artifact>> {
    let p = dir.join("SHA256SUMS");
    let text = util::read_small_string(&p, crate::trust::limits::SUMS, "SHA256SUMS")?;
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
