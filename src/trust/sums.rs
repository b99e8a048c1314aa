//! SHA256SUMS: the artifact list every signed output directory carries (and signs).

use anyhow::Result;
use serde::Serialize;
use std::fs;
use std::path::Path;

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
    // One file per thread, largest first (a role's four images are ~1.1 GB together); the
    // result is in name order whatever the threads do.
    let mut order: Vec<(u64, usize)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (fs::metadata(dir.join(n)).map(|m| m.len()).unwrap_or(0), i))
        .collect();
    order.sort_unstable_by(|a, b| b.cmp(a));
    let hashed = crate::sys::util::par_map(
        &order,
        crate::sys::util::cpu_count(),
        || (),
        |_, &(_, i)| {
            let n = names[i];
            crate::sys::util::sha256_file(&dir.join(n)).map(|(sha256, size)| Artifact {
                name: n.to_string(),
                sha256,
                size,
            })
        },
    );
    let mut done: Vec<(usize, Result<Artifact>)> =
        order.iter().map(|&(_, i)| i).zip(hashed).collect();
    done.sort_unstable_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// `SHA256SUMS` in coreutils format, sorted by name.
pub fn sha256sums(artifacts: &[Artifact]) -> String {
    let mut v: Vec<&Artifact> = artifacts.iter().collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v.iter()
        .map(|a| format!("{}  {}\n", a.sha256, a.name))
        .collect()
}
