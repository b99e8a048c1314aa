//! `kiln.lock`: what a build resolved — every downloaded artifact (URL, sha256, size) and the
//! Debian package versions of every base. `kiln build` updates it; `kiln build --locked` fails
//! instead of changing it, so CI can prove a build used exactly the recorded inputs.

use super::error::RecipeError;
use super::layout::{Layout, LOCK_FILE};
use crate::sys::util;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub version: u32,
    /// Artifact name → pin.
    #[serde(default)]
    pub artifacts: BTreeMap<String, LockedArtifact>,
    /// Base key → packages.
    #[serde(default)]
    pub bases: BTreeMap<String, LockedBase>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedArtifact {
    pub url: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedBase {
    pub suite: String,
    /// `name version arch`, sorted.
    pub packages: Vec<String>,
}

/// Reads kiln.lock (an absent file is an empty lock).
pub fn read(project_root: &Path) -> Result<Lock> {
    let layout = Layout::new(project_root);
    let p = layout.lock_file();
    let by = super::confine::NamedBy {
        file: &p,
        key: "(lock)",
        fix: "keep kiln.lock a regular file inside the project (delete it and run `kiln build` to regenerate it)",
    };
    let Some(real) = super::confine::optional_file(&layout, &p, by)? else {
        return Ok(Lock {
            version: 1,
            ..Lock::default()
        });
    };
    match super::confine::read_real(&real, &p, super::confine::MAX_TEXT, by) {
        Ok(t) => {
            let l: Lock = toml::from_str(&t).map_err(|e| {
                RecipeError::new(
                    &p,
                    "(lock)",
                    format!("cannot parse: {}", e.message()),
                    "delete kiln.lock and run `kiln build` to regenerate it",
                )
            })?;
            Ok(l)
        }
        Err(e) => Err(e.into()),
    }
}

/// Human-readable differences `old → new` (empty when equal).
pub fn diff(old: &Lock, new: &Lock) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in &new.artifacts {
        match old.artifacts.get(k) {
            None => d.push(format!("artifact {k}: new ({} {})", v.url, v.sha256)),
            Some(o) if o != v => d.push(format!(
                "artifact {k}: {} {} → {} {}",
                o.url, o.sha256, v.url, v.sha256
            )),
            _ => {}
        }
    }
    for (k, v) in &new.bases {
        match old.bases.get(k) {
            None => d.push(format!(
                "base {}: new ({} packages)",
                &k[..12.min(k.len())],
                v.packages.len()
            )),
            Some(o) if o != v => {
                let old: std::collections::BTreeSet<&String> = o.packages.iter().collect();
                let new: std::collections::BTreeSet<&String> = v.packages.iter().collect();
                for p in new.difference(&old) {
                    d.push(format!("base {}: + {p}", &k[..12]));
                }
                for p in old.difference(&new) {
                    d.push(format!("base {}: - {p}", &k[..12]));
                }
            }
            _ => {}
        }
    }
    d
}

/// Merges `update` into the lock on disk. With `locked`, any change is an error listing it.
pub fn apply(project_root: &Path, update: &Lock, locked: bool) -> Result<()> {
    let old = read(project_root)?;
    let mut merged = old.clone();
    merged.version = 1;
    for (k, v) in &update.artifacts {
        merged.artifacts.insert(k.clone(), v.clone());
    }
    for (k, v) in &update.bases {
        merged.bases.insert(k.clone(), v.clone());
    }
    let changes = diff(&old, &merged);
    if changes.is_empty() {
        return Ok(());
    }
    if locked {
        bail!(
            "--locked: the build would change {}:\n  {}\nfix: run `kiln build` without --locked and commit the new kiln.lock, or restore the inputs that changed",
            LOCK_FILE,
            changes.join("\n  ")
        );
    }
    let text = format!(
        "# kiln.lock — written by `kiln build`; commit it. `kiln build --locked` refuses to change it.\n{}",
        toml::to_string_pretty(&merged).context("serialising kiln.lock")?
    );
    util::write_atomic(&Layout::new(project_root).lock_file(), text.as_bytes())
}
