//! `kiln cache list|prune`: what the cache (`<out>/cache`, or `--cache-dir`) holds, what of it
//! the project still uses, and removing the rest.
//!
//! Kept ("in use"):
//! - `base/<cache key>/` of every role the project's recipes resolve to now (the key includes
//!   this host's mmdebstrap version and apt sources, so a base made before an upgrade of either
//!   is unused);
//! - `sha256/<hex>` pinned by a role's recipe or cluster.toml now, or recorded in the inputs of a
//!   build still in `<out>/<role>/<build id>/` (`kiln verify --rebuild` of that build copies it
//!   from the cache);
//! - `squashfs-blocks/<role>.json`, `zstd-frames/<role>.json` of the project's roles.
//!
//! Removed by `prune`: the other entries of those kinds and the leftovers of killed builds
//! (`base/.tmp-base-*`, `sha256/.partial-*` of pins no longer used). A base whose lock another
//! kiln holds is never touched; the (empty) lock files stay, as removing one could let two
//! kilns hold "the" lock of a base at once. Files kiln did not
//! make are listed as `other` and left alone. The project must resolve (every recipe valid):
//! without that kiln cannot tell what is in use, and removes nothing.

use crate::pipeline::resolve::{self, Resolved};
use crate::project::layout::Cache;
use crate::project::recipe::Project;
use crate::sys::util;
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One cache entry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    /// `base`, `artifact`, `index`, `leftover` or `other`.
    pub kind: &'static str,
    /// Path under the cache directory.
    pub path: String,
    /// Bytes on disk (allocated blocks).
    pub bytes: u64,
    /// What uses it: roles, `build <role>/<id12>`, or empty when unused.
    pub used_by: Vec<String>,
    /// A short description (a base's suite and package count, an artifact's name).
    pub about: String,
    /// `prune` removes it.
    pub removable: bool,
    /// Why it is kept though unused (a running build holds its lock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What the project uses.
#[derive(Debug, Default)]
struct InUse {
    /// Base cache key → roles.
    bases: BTreeMap<String, Vec<String>>,
    /// Artifact sha256 → users (roles, builds) and the artifact's name.
    artifacts: BTreeMap<String, (Vec<String>, String)>,
    roles: BTreeSet<String>,
}

fn in_use(project: &Project, out_dir: &Path) -> Result<InUse> {
    let mut u = InUse::default();
    let roles = project.roles_or_all(&[]);
    for role in &roles {
        let r: Resolved = resolve::resolve(project, role).with_context(|| {
            format!("resolving role {role} (kiln cache needs every recipe to resolve to know what is in use; nothing was removed)")
        })?;
        let key = r.base.cache_key().with_context(|| {
            format!("computing the base cache key of role {role} (needs mmdebstrap)")
        })?;
        u.bases.entry(key).or_default().push(role.clone());
        for (name, sha, _) in crate::pipeline::fetch::pinned_artifacts(&r) {
            let e = u.artifacts.entry(sha).or_insert_with(|| (vec![], name));
            e.0.push(role.clone());
        }
        u.roles.insert(role.clone());
    }
    u.bases.values_mut().for_each(|v| v.sort());
    u.artifacts.values_mut().for_each(|(v, _)| v.sort());
    // Builds still in out/: every sha256 their recorded inputs name.
    for (label, manifest) in builds_in(out_dir) {
        let mut shas = BTreeSet::new();
        collect_sha256(&manifest["inputs"], &mut shas);
        for sha in shas {
            if let Some(e) = u.artifacts.get_mut(&sha) {
                e.0.push(label.clone());
            } else {
                u.artifacts
                    .insert(sha, (vec![label.clone()], String::new()));
            }
        }
    }
    Ok(u)
}

/// `(label, manifest)` of every build in `<out>/<role>/<build id>/manifest.json`.
fn builds_in(out_dir: &Path) -> Vec<(String, Value)> {
    let mut v = Vec::new();
    let Ok(roles) = fs::read_dir(out_dir) else {
        return v;
    };
    let mut roles: Vec<PathBuf> = roles.filter_map(|e| e.ok().map(|e| e.path())).collect();
    roles.sort();
    for rd in roles {
        let Ok(builds) = fs::read_dir(&rd) else {
            continue;
        };
        let mut builds: Vec<PathBuf> = builds.filter_map(|e| e.ok().map(|e| e.path())).collect();
        builds.sort();
        for b in builds {
            // `latest` is a link to one of these.
            if b.is_symlink() {
                continue;
            }
            let Ok(bytes) = crate::sys::util::read_small(
                &b.join("manifest.json"),
                crate::trust::limits::MANIFEST,
                "manifest",
            ) else {
                continue;
            };
            let Ok(m) = serde_json::from_slice::<Value>(&bytes) else {
                continue;
            };
            let (Some(role), Some(id)) = (m["role"].as_str(), m["build_id"].as_str()) else {
                continue;
            };
            let label = format!("build {role}/{}", &id[..id.len().min(12)]);
            v.push((label, m));
        }
    }
    v
}

/// Every string under a key named `sha256` that is a sha256 in hex.
fn collect_sha256(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("sha256", Value::String(s))
                        if crate::pipeline::fetch::validate_sha256(s).is_ok() =>
                    {
                        out.insert(s.clone());
                    }
                    _ => collect_sha256(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_sha256(x, out)),
        _ => {}
    }
}

/// Bytes allocated on disk under `p` (a file or a tree; links not followed).
fn disk_bytes(p: &Path) -> u64 {
    walkdir::WalkDir::new(p)
        .follow_links(false)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.metadata().ok())
        .filter(|m| !m.is_dir())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn sorted_dir(p: &Path) -> Result<Vec<(String, PathBuf)>> {
    let rd = match fs::read_dir(p) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    let mut v = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("reading {}", p.display()))?;
        v.push((e.file_name().to_string_lossy().into_owned(), e.path()));
    }
    v.sort();
    Ok(v)
}

/// Whether another process holds the lock file `p` now (a missing file is not held).
fn lock_held(p: &Path) -> bool {
    p.is_file() && matches!(util::try_lock_file(p), Ok(None))
}

/// A base's spec summary: "bookworm, 24 packages".
fn base_about(dir: &Path) -> String {
    let Ok(bytes) = crate::sys::util::read_small(
        &dir.join("spec.json"),
        crate::trust::limits::MANIFEST,
        "spec.json",
    ) else {
        return "no spec.json (incomplete)".into();
    };
    let Ok(v) = serde_json::from_slice::<Value>(&bytes) else {
        return "unreadable spec.json".into();
    };
    let suite = v["suite"].as_str().unwrap_or("?");
    let n = v["packages"].as_array().map_or(0, |a| a.len());
    let dkms = if v["module_signing_cert"].is_string() {
        ", DKMS modules signed"
    } else {
        ""
    };
    format!("{suite}, {n} packages{dkms}")
}

/// Lists the cache's entries and what uses each.
pub fn list(project: &Project, out_dir: &Path, cache_dir: &Path) -> Result<Vec<Entry>> {
    let u = in_use(project, out_dir)?;
    let mut entries = Vec::new();
    let mk = |kind, path: String, bytes, used_by: Vec<String>, about: String| Entry {
        kind,
        removable: used_by.is_empty() && kind != "other",
        path,
        bytes,
        used_by,
        about,
        note: None,
    };

    let cache = Cache::new(cache_dir);
    let base = cache.bases();
    for (name, p) in sorted_dir(&base)? {
        if is_hex64(&name) && p.is_dir() {
            let used = u.bases.get(&name).cloned().unwrap_or_default();
            let mut e = mk(
                "base",
                format!("base/{name}"),
                disk_bytes(&p),
                used,
                base_about(&p),
            );
            if e.removable && lock_held(&base.join(format!(".lock-{name}"))) {
                e.removable = false;
                e.note = Some("a running kiln holds its lock".into());
            }
            entries.push(e);
        } else if let Some(rest) = name.strip_prefix(".tmp-base-") {
            // `.tmp-base-<key>-<random>`: a build in progress (lock held) or killed.
            let key = rest.split('-').next().unwrap_or_default();
            let mut e = mk(
                "leftover",
                format!("base/{name}"),
                disk_bytes(&p),
                vec![],
                "unfinished base build".into(),
            );
            if is_hex64(key) && lock_held(&base.join(format!(".lock-{key}"))) {
                e.removable = false;
                e.note = Some("a running kiln is building this base".into());
            }
            entries.push(e);
        } else if name.starts_with(".lock-") {
            // Empty lock files stay (see the module docs).
        } else {
            entries.push(mk(
                "other",
                format!("base/{name}"),
                disk_bytes(&p),
                vec![],
                String::new(),
            ));
        }
    }

    for (name, p) in sorted_dir(&cache.artifacts())? {
        if is_hex64(&name) {
            let (used, about) = u.artifacts.get(&name).cloned().unwrap_or_default();
            entries.push(mk(
                "artifact",
                format!("sha256/{name}"),
                disk_bytes(&p),
                used,
                about,
            ));
        } else if let Some(sha) = name.strip_prefix(".partial-").filter(|s| is_hex64(s)) {
            let (used, about) = u.artifacts.get(sha).cloned().unwrap_or_default();
            let about = if about.is_empty() {
                "unfinished download".to_string()
            } else {
                format!("unfinished download of {about}")
            };
            entries.push(mk(
                "leftover",
                format!("sha256/{name}"),
                disk_bytes(&p),
                used,
                about,
            ));
        } else {
            entries.push(mk(
                "other",
                format!("sha256/{name}"),
                disk_bytes(&p),
                vec![],
                String::new(),
            ));
        }
    }

    for (sub, dir) in [
        ("squashfs-blocks", cache.squashfs_blocks()),
        ("zstd-frames", cache.zstd_frames()),
    ] {
        for (name, p) in sorted_dir(&dir)? {
            let role = name.strip_suffix(".json");
            let used = match role {
                Some(r) if u.roles.contains(r) => vec![r.to_string()],
                _ => vec![],
            };
            let kind = if role.is_some() || name.starts_with('.') {
                "index"
            } else {
                "other"
            };
            entries.push(mk(
                kind,
                format!("{sub}/{name}"),
                disk_bytes(&p),
                used,
                String::new(),
            ));
        }
    }

    for (name, p) in sorted_dir(cache_dir)? {
        if !Cache::ENTRIES.contains(&name.as_str()) {
            entries.push(mk("other", name, disk_bytes(&p), vec![], String::new()));
        }
    }
    Ok(entries)
}

/// What `prune` did.
#[derive(Debug, Serialize)]
pub struct PruneReport {
    pub removed: Vec<Entry>,
    pub freed_bytes: u64,
    pub kept: Vec<Entry>,
    pub dry_run: bool,
}

/// Removes every removable entry (see the module docs); with `dry_run`, only says what it would.
pub fn prune(
    project: &Project,
    out_dir: &Path,
    cache_dir: &Path,
    dry_run: bool,
) -> Result<PruneReport> {
    let entries = list(project, out_dir, cache_dir)?;
    let (removable, kept): (Vec<Entry>, Vec<Entry>) =
        entries.into_iter().partition(|e| e.removable);
    let mut removed = Vec::new();
    for e in removable {
        let p = cache_dir.join(&e.path);
        if !dry_run {
            remove_entry(cache_dir, &e, &p)?;
        }
        removed.push(e);
    }
    Ok(PruneReport {
        freed_bytes: removed.iter().map(|e| e.bytes).sum(),
        removed,
        kept,
        dry_run,
    })
}

fn remove_entry(cache_dir: &Path, e: &Entry, p: &Path) -> Result<()> {
    let base = Cache::new(cache_dir).bases();
    // A base (or a killed base build's temp dir) is removed holding its lock, so a kiln that
    // starts building or checking it meanwhile waits, then finds it gone and builds it.
    let key = match e.kind {
        "base" => e.path.strip_prefix("base/").map(str::to_string),
        "leftover" if e.path.starts_with("base/.tmp-base-") => e
            .path
            .strip_prefix("base/.tmp-base-")
            .and_then(|r| r.split('-').next())
            .filter(|k| is_hex64(k))
            .map(str::to_string),
        _ => None,
    };
    let lock = match &key {
        Some(k) => {
            let Some(f) = util::try_lock_file(&base.join(format!(".lock-{k}")))? else {
                tracing::warn!("{} is in use by a running kiln; left alone", p.display());
                return Ok(());
            };
            Some(f)
        }
        None => None,
    };
    let r = if p.is_dir() && !p.is_symlink() {
        fs::remove_dir_all(p)
    } else {
        fs::remove_file(p)
    };
    match r {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", p.display())),
    }
    drop(lock);
    util::sync_path(p.parent().unwrap_or(cache_dir)).ok();
    Ok(())
}
