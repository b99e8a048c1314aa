//! Base stage: a Debian rootfs tarball from `mmdebstrap`, cached by its inputs.
//!
//! One base per (suite, variant, components, package set, SOURCE_DATE_EPOCH): roles whose
//! merged recipes ask for the same packages share one cached tarball.

use crate::recipe::Recipe;
use crate::tools::{self, MMDEBSTRAP};
use crate::util;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Inputs that fully determine the base tarball (modulo the apt archive's contents).
#[derive(Debug, Clone, Serialize)]
pub struct BaseSpec {
    pub suite: String,
    pub variant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    pub components: Vec<String>,
    /// Sorted, de-duplicated.
    pub packages: Vec<String>,
    pub source_date_epoch: i64,
}

impl BaseSpec {
    pub fn new(recipe: &Recipe, source_date_epoch: i64) -> Self {
        let packages: BTreeSet<String> = recipe.debian.packages.iter().cloned().collect();
        BaseSpec {
            suite: recipe.debian.suite.clone(),
            variant: recipe.debian.variant.clone(),
            mirror: recipe.debian.mirror.clone(),
            components: recipe.debian.components.clone(),
            packages: packages.into_iter().collect(),
            source_date_epoch,
        }
    }

    /// Machine-independent key of the recipe-level inputs (part of the build id).
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(&("kiln.base/1", self)).expect("serialisable");
        util::sha256_hex(&json)
    }

    /// Cache key: the spec plus what on this host changes mmdebstrap's output (its version and
    /// the apt sources it falls back to when the recipe names no mirror).
    pub fn cache_key(&self) -> Result<String> {
        let mut h = String::new();
        h.push_str(&self.key());
        h.push('\n');
        h.push_str(&mmdebstrap_version()?);
        if self.mirror.is_none() {
            h.push('\n');
            h.push_str(&host_apt_sources());
        }
        Ok(util::sha256_hex(h.as_bytes()))
    }
}

fn mmdebstrap_version() -> Result<String> {
    let out = tools::run(MMDEBSTRAP.command()?.arg("--version"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The host's apt source definitions, concatenated in a fixed order.
fn host_apt_sources() -> String {
    let mut files: Vec<PathBuf> = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A built (or cached) base.
#[derive(Debug, Clone)]
pub struct Base {
    pub spec: BaseSpec,
    pub cache_key: String,
    pub dir: PathBuf,
    /// `rootfs.tar` as written by mmdebstrap.
    pub tar: PathBuf,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// File beside a cached `rootfs.tar` holding its sha256 (hex), written when the base is made and
/// checked every time it is used.
pub const DIGEST_FILE: &str = "rootfs.tar.sha256";

/// State of a cached base's `rootfs.tar` against its recorded digest.
#[derive(Debug, PartialEq, Eq)]
pub enum CacheCheck {
    Good,
    /// The tarball's sha256 is not the recorded one (damaged or truncated).
    Corrupt {
        recorded: String,
        actual: String,
    },
    /// Made by a kiln that did not record digests yet.
    Unrecorded {
        actual: String,
    },
}

/// Hashes `<dir>/rootfs.tar` and compares it with `<dir>/rootfs.tar.sha256`.
pub fn check_cached(dir: &Path) -> Result<CacheCheck> {
    let (actual, _) = util::sha256_file(&dir.join("rootfs.tar"))?;
    let p = dir.join(DIGEST_FILE);
    match fs::read_to_string(&p) {
        Ok(r) if r.trim() == actual => Ok(CacheCheck::Good),
        Ok(r) => Ok(CacheCheck::Corrupt {
            recorded: r.trim().to_string(),
            actual,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(CacheCheck::Unrecorded { actual }),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Takes the lock of `<cache>/base/` (every base build and cache check holds it), waiting, with
/// a message, while another kiln holds it.
fn lock_base_cache(parent: &Path) -> Result<fs::File> {
    crate::util::lock_dir(parent, "another kiln is building a base in this cache")
}

/// Returns the cached base for `spec`, building it with mmdebstrap if absent. A cached base is
/// checked against its recorded sha256 first; a damaged one is removed and built again (with
/// `offline`, that is an error).
pub fn ensure(spec: &BaseSpec, cache_dir: &Path, offline: bool) -> Result<Base> {
    let cache_key = spec.cache_key()?;
    let parent = cache_dir.join("base");
    let dir = parent.join(&cache_key);
    let tar = dir.join("rootfs.tar");
    let _lock = lock_base_cache(&parent)?;
    // Leftovers of a killed base build (we hold the lock, so none is live).
    crate::build::clean_stale(&parent)?;
    if tar.is_file() && dir.join("spec.json").is_file() {
        match check_cached(&dir)? {
            CacheCheck::Good => {
                return Ok(Base {
                    spec: spec.clone(),
                    cache_key,
                    dir,
                    tar,
                    cached: true,
                })
            }
            CacheCheck::Unrecorded { actual } => {
                tracing::info!("recording the digest of the cached base {}", dir.display());
                util::write_atomic(&dir.join(DIGEST_FILE), format!("{actual}\n").as_bytes())?;
                return Ok(Base {
                    spec: spec.clone(),
                    cache_key,
                    dir,
                    tar,
                    cached: true,
                });
            }
            CacheCheck::Corrupt { recorded, actual } => {
                tracing::warn!(
                    "cached base {} is corrupt (rootfs.tar sha256 {actual}, recorded {recorded}); removing it",
                    dir.display()
                );
                fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing corrupt base {}", dir.display()))?;
                if offline {
                    bail!(
                        "the cached base {} was corrupt (rootfs.tar sha256 {actual}, recorded {recorded}) and has been removed; --offline cannot make it again: run once without --offline (or copy a good out/cache/base/ from another machine)",
                        dir.display()
                    );
                }
            }
        }
    }
    if offline {
        bail!(
            "--offline: the base for suite {} ({} packages) is not in the cache {}; run one build online first (or copy out/cache/ from a machine that did)",
            spec.suite,
            spec.packages.len(),
            dir.display()
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix(".tmp-base-")
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temp dir in {}", parent.display()))?;
    let tmp_tar = tmp.path().join("rootfs.tar");
    let mut cmd = MMDEBSTRAP.command()?;
    cmd.env("SOURCE_DATE_EPOCH", spec.source_date_epoch.to_string())
        .env("LC_ALL", "C.UTF-8")
        .arg(format!("--variant={}", spec.variant))
        .arg("--format=tar")
        .arg(format!("--components={}", spec.components.join(",")));
    if !spec.packages.is_empty() {
        cmd.arg(format!("--include={}", spec.packages.join(",")));
    }
    cmd.arg(&spec.suite).arg(&tmp_tar);
    if let Some(m) = &spec.mirror {
        cmd.arg(m);
    }
    tools::run(&mut cmd).context("base stage: mmdebstrap failed (check the package names and that `apt-get update` works on this host)")?;
    util::sync_path(&tmp_tar)?;
    let (digest, _) = util::sha256_file(&tmp_tar)?;
    util::write_atomic(
        &tmp.path().join(DIGEST_FILE),
        format!("{digest}\n").as_bytes(),
    )?;
    let spec_json = serde_json::to_vec_pretty(spec)?;
    util::write_atomic(&tmp.path().join("spec.json"), &spec_json)?;
    let tmp_path = tmp.keep();
    if dir.exists() {
        // A concurrent build won the race; keep theirs.
        fs::remove_dir_all(&tmp_path).ok();
    } else {
        fs::rename(&tmp_path, &dir)
            .with_context(|| format!("moving base into {}", dir.display()))?;
        util::sync_path(&parent)?;
    }
    Ok(Base {
        spec: spec.clone(),
        cache_key,
        dir,
        tar,
        cached: false,
    })
}

/// An installed Debian package as recorded in `/var/lib/dpkg/status`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Parses dpkg's status file, keeping installed packages, sorted by name.
pub fn parse_dpkg_status(text: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let field = |name: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.trim().to_string())
        };
        let (Some(name), Some(version), Some(status)) =
            (field("Package"), field("Version"), field("Status"))
        else {
            continue;
        };
        if !status.ends_with(" installed") {
            continue;
        }
        out.push(Package {
            name,
            version,
            architecture: field("Architecture").unwrap_or_default(),
            source: field("Source"),
        });
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_base_digest_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let tar = d.path().join("rootfs.tar");
        fs::write(&tar, b"a base tarball").unwrap();
        let sha = util::sha256_hex(b"a base tarball");
        assert_eq!(
            check_cached(d.path()).unwrap(),
            CacheCheck::Unrecorded {
                actual: sha.clone()
            }
        );
        fs::write(d.path().join(DIGEST_FILE), format!("{sha}\n")).unwrap();
        assert_eq!(check_cached(d.path()).unwrap(), CacheCheck::Good);
        fs::write(&tar, b"a base tarbalL").unwrap();
        assert_eq!(
            check_cached(d.path()).unwrap(),
            CacheCheck::Corrupt {
                recorded: sha,
                actual: util::sha256_hex(b"a base tarbalL")
            }
        );
    }
}
