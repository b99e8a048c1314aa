//! What `kiln serve` serves: verified role builds and node seeds, indexed by MAC.
//!
//! Every file is opened once, hashed from the open descriptor and compared with the signed
//! `SHA256SUMS` of its directory; the server then reads only from those descriptors. A build
//! replaced or garbage-collected by a later `kiln build` keeps being served as verified until
//! the catalog is reloaded (SIGHUP), and a file changed in place after loading cannot be
//! served under the old digest without being noticed at the next reload.

use crate::project::recipe::{normalize_mac, Project};
use crate::trust::sign::{self, SignedSums, VerifyError};
use anyhow::{Context, Result};
use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The files of a role build that a diskless boot needs.
pub const BOOT_FILES: [&str; 3] = ["vmlinuz", "initrd.img", "root.squashfs"];
/// Seed files a node directory may hold, in the order cloud-init reads them.
pub const SEED_FILES: [&str; 4] = ["meta-data", "user-data", "network-config", "vendor-data"];

/// One verified file, kept open.
#[derive(Debug, Clone)]
pub struct Blob {
    pub file: Arc<File>,
    pub len: u64,
    pub sha256: String,
    pub path: PathBuf,
}

impl Blob {
    /// Opens `dir/name`, hashes it through the open descriptor and checks the signed digest.
    pub fn open_verified(dir: &Path, name: &str, sums: &SignedSums) -> Result<Blob> {
        let path = dir.join(name);
        let expected = sums.sha256_of(name).ok_or_else(|| VerifyError::NotListed {
            sums: dir.join(sign::SUMS),
            name: name.to_string(),
        })?;
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let len = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        while off < len {
            let n = file
                .read_at(&mut buf, off)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            off += n as u64;
        }
        let actual = hex::encode(h.finalize());
        if actual != expected {
            return Err(VerifyError::Mismatch {
                path,
                expected: expected.to_string(),
                actual,
            }
            .into());
        }
        Ok(Blob {
            file: Arc::new(file),
            len: off,
            sha256: actual,
            path,
        })
    }

    /// The whole content (for small files: seeds, manifests).
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.len as usize];
        self.file
            .read_exact_at(&mut v, 0)
            .with_context(|| format!("reading {}", self.path.display()))?;
        Ok(v)
    }
}

/// A verified role build that can be booted diskless.
#[derive(Debug)]
pub struct RoleBuild {
    pub role: String,
    pub build_id: String,
    pub dir: PathBuf,
    /// `vmlinuz`, `initrd.img`, `root.squashfs`.
    pub files: BTreeMap<String, Blob>,
    /// Kernel arguments from the recipe (the disk's command line without its root arguments).
    pub cmdline_args: Vec<String>,
}

/// How one inventory node boots.
#[derive(Debug, Clone)]
pub struct NodeBoot {
    pub hostname: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub role: String,
    /// Build id of the role build it boots.
    pub build_id: String,
    /// The seed's `instance-id`, when the node has signed outputs in `out/nodes/`.
    pub instance_id: Option<String>,
    /// Seed files by name (verified bytes); empty when the node has no outputs.
    pub seed: BTreeMap<String, Vec<u8>>,
}

/// An inventory node that cannot be booted, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Unprovisioned {
    pub hostname: String,
    pub mac: String,
    pub role: String,
    pub reason: String,
}

/// Everything the server answers from.
#[derive(Debug, Default)]
pub struct Catalog {
    /// Role builds by build id.
    pub builds: BTreeMap<String, Arc<RoleBuild>>,
    /// Bootable nodes by normalised MAC.
    pub nodes: BTreeMap<String, NodeBoot>,
    /// Inventory nodes that cannot boot, by normalised MAC.
    pub unprovisioned: BTreeMap<String, Unprovisioned>,
    /// `(role, build id)` booted by MACs not in the inventory (`--default-role`).
    pub default: Option<(String, String)>,
    /// Things the operator should know (printed at start).
    pub warnings: Vec<String>,
}

/// Where a MAC boots to.
pub enum Lookup<'a> {
    Node(&'a NodeBoot, &'a RoleBuild),
    Default(&'a RoleBuild),
    Unprovisioned(String),
}

impl Catalog {
    /// Loads and verifies what `project`'s inventory needs from `out_dir`. Any signed file that
    /// fails verification is an error ([`VerifyError`], exit status 3): nothing is served then.
    pub fn load(
        project: &Project,
        out_dir: &Path,
        key: &VerifyingKey,
        default_role: Option<&str>,
    ) -> Result<Catalog> {
        let mut cat = Catalog::default();
        let nodes_dir = crate::pipeline::node::nodes_dir(out_dir);
        for n in &project.cluster.nodes {
            let mac = normalize_mac(&n.mac).unwrap_or_else(|| n.mac.clone());
            let node_dir = nodes_dir.join(&n.hostname);
            if node_dir.join(sign::SUMS).exists() || node_dir.join(sign::SIG).exists() {
                let (build_id, iid, seed) = load_node_dir(&node_dir, key, &n.hostname, &n.role)?;
                let role_dir = out_dir.join(&n.role).join(&build_id);
                if !role_dir.is_dir() {
                    cat.unprovisioned.insert(
                        mac.clone(),
                        Unprovisioned {
                            hostname: n.hostname.clone(),
                            mac: mac.clone(),
                            role: n.role.clone(),
                            reason: format!(
                                "its outputs in {} were made from {} build {}, which is no longer \
                                 in {}: run `kiln build --role {}`",
                                node_dir.display(),
                                n.role,
                                short(&build_id),
                                out_dir.join(&n.role).display(),
                                n.role
                            ),
                        },
                    );
                    continue;
                }
                cat.load_build(&n.role, &build_id, &role_dir, key)?;
                cat.nodes.insert(
                    mac.clone(),
                    NodeBoot {
                        hostname: n.hostname.clone(),
                        mac,
                        role: n.role.clone(),
                        build_id,
                        instance_id: Some(iid),
                        seed,
                    },
                );
            } else if let Some(id) = latest(out_dir, &n.role) {
                cat.warnings.push(format!(
                    "{} has no node outputs in {}: it boots {} build {} without a seed (the image \
                     names it by MAC); run `kiln build --role {}` for its seed",
                    n.hostname,
                    node_dir.display(),
                    n.role,
                    short(&id),
                    n.role
                ));
                cat.load_build(&n.role, &id, &out_dir.join(&n.role).join(&id), key)?;
                cat.nodes.insert(
                    mac.clone(),
                    NodeBoot {
                        hostname: n.hostname.clone(),
                        mac,
                        role: n.role.clone(),
                        build_id: id,
                        instance_id: None,
                        seed: BTreeMap::new(),
                    },
                );
            } else {
                cat.unprovisioned.insert(
                    mac.clone(),
                    Unprovisioned {
                        hostname: n.hostname.clone(),
                        mac,
                        role: n.role.clone(),
                        reason: format!(
                            "no {} build in {}: run `kiln build --role {}`",
                            n.role,
                            out_dir.join(&n.role).display(),
                            n.role
                        ),
                    },
                );
            }
        }
        for u in cat.unprovisioned.values() {
            cat.warnings.push(format!(
                "{} ({}) cannot boot: {}",
                u.hostname, u.mac, u.reason
            ));
        }
        if let Some(role) = default_role {
            let id = latest(out_dir, role).ok_or_else(|| {
                crate::project::recipe::RecipeError::new(
                    crate::project::layout::Out::new(out_dir).latest(role),
                    "--default-role",
                    format!("there is no {role} build to boot unknown machines with"),
                    format!("run `kiln build --role {role}` first, or drop --default-role"),
                )
            })?;
            cat.load_build(role, &id, &out_dir.join(role).join(&id), key)?;
            cat.default = Some((role.to_string(), id));
        }
        Ok(cat)
    }

    fn load_build(&mut self, role: &str, id: &str, dir: &Path, key: &VerifyingKey) -> Result<()> {
        if self.builds.contains_key(id) {
            return Ok(());
        }
        let sums = sign::verify_signature(dir, key)?;
        let mut files = BTreeMap::new();
        for name in BOOT_FILES {
            files.insert(name.to_string(), Blob::open_verified(dir, name, &sums)?);
        }
        let manifest = Blob::open_verified(dir, "manifest.json", &sums)?.read_all()?;
        let manifest: serde_json::Value = serde_json::from_slice(&manifest)
            .with_context(|| format!("parsing {}", dir.join("manifest.json").display()))?;
        let cmdline = manifest
            .pointer("/kernel/cmdline")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        self.builds.insert(
            id.to_string(),
            Arc::new(RoleBuild {
                role: role.to_string(),
                build_id: id.to_string(),
                dir: dir.to_path_buf(),
                files,
                cmdline_args: recipe_args(cmdline),
            }),
        );
        Ok(())
    }

    /// What a MAC (any common notation) boots.
    pub fn lookup(&self, mac: &str) -> Lookup<'_> {
        let Some(mac) = normalize_mac(mac) else {
            return Lookup::Unprovisioned(format!(
                "{mac:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff or aa-bb-cc-dd-ee-ff)"
            ));
        };
        if let Some(n) = self.nodes.get(&mac) {
            return Lookup::Node(n, &self.builds[&n.build_id]);
        }
        if let Some(u) = self.unprovisioned.get(&mac) {
            return Lookup::Unprovisioned(format!("{} ({mac}): {}", u.hostname, u.reason));
        }
        match &self.default {
            Some((_, id)) => Lookup::Default(&self.builds[id]),
            None => Lookup::Unprovisioned(format!(
                "{mac} is not in the inventory (recipes/cluster.toml [[nodes]]): add it and run \
                 `kiln build`, or start `kiln serve --default-role <role>`"
            )),
        }
    }

    /// The node whose seed is served for `mac`, if it has one.
    pub fn seed(&self, mac: &str) -> Option<&NodeBoot> {
        let mac = normalize_mac(mac)?;
        self.nodes.get(&mac).filter(|n| n.instance_id.is_some())
    }

    /// A role build by role name and build id.
    pub fn build(&self, role: &str, id: &str) -> Option<&RoleBuild> {
        self.builds
            .get(id)
            .map(|b| b.as_ref())
            .filter(|b| b.role == role)
    }

    /// A summary for `--json` and `/status`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "builds": self.builds.values().map(|b| serde_json::json!({
                "role": b.role,
                "build_id": b.build_id,
                "dir": b.dir,
                "files": b.files.iter().map(|(n, f)| (n.clone(), serde_json::json!({
                    "size": f.len, "sha256": f.sha256,
                }))).collect::<BTreeMap<_, _>>(),
            })).collect::<Vec<_>>(),
            "nodes": self.nodes.values().map(|n| serde_json::json!({
                "hostname": n.hostname,
                "mac": n.mac,
                "role": n.role,
                "build_id": n.build_id,
                "instance_id": n.instance_id,
                "seed": n.seed.keys().collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "unprovisioned": self.unprovisioned.values().collect::<Vec<_>>(),
            "default": self.default.as_ref().map(|(r, id)| serde_json::json!({"role": r, "build_id": id})),
            "warnings": self.warnings,
        })
    }
}

/// Reads a verified node directory: (role build id, instance id, seed files).
fn load_node_dir(
    dir: &Path,
    key: &VerifyingKey,
    hostname: &str,
    role: &str,
) -> Result<(String, String, BTreeMap<String, Vec<u8>>)> {
    let sums = sign::verify_signature(dir, key)?;
    let node_json = Blob::open_verified(dir, "node.json", &sums)?.read_all()?;
    let v: serde_json::Value = serde_json::from_slice(&node_json)
        .with_context(|| format!("parsing {}", dir.join("node.json").display()))?;
    let field = |k: &str| -> Result<String> {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .with_context(|| format!("{}: no {k:?}", dir.join("node.json").display()))
    };
    let (h, r) = (field("hostname")?, field("role")?);
    anyhow::ensure!(
        h == hostname && r == role,
        "{}: made for {h} ({r}), but the inventory says {hostname} ({role}): run `kiln build`",
        dir.display()
    );
    let mut seed = BTreeMap::new();
    for name in SEED_FILES {
        if sums.sha256_of(name).is_some() {
            seed.insert(
                name.to_string(),
                Blob::open_verified(dir, name, &sums)?.read_all()?,
            );
        }
    }
    Ok((field("role_build_id")?, field("instance_id")?, seed))
}

/// The build id `out/<role>/latest` points at, if that build is complete.
fn latest(out_dir: &Path, role: &str) -> Option<String> {
    let link = crate::project::layout::Out::new(out_dir).latest(role);
    let target = std::fs::read_link(&link).ok()?;
    let id = target.file_name()?.to_str()?.to_string();
    out_dir
        .join(role)
        .join(&id)
        .join(sign::SUMS)
        .is_file()
        .then_some(id)
}

/// The recipe's kernel arguments: the disk command line without live-boot's root selection.
pub fn recipe_args(cmdline: &str) -> Vec<String> {
    cmdline
        .split_whitespace()
        .filter(|a| *a != "boot=live" && *a != "plainroot" && !a.starts_with("root="))
        .map(str::to_string)
        .collect()
}

pub use crate::pipeline::resolve::short_id as short;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_args_drop_root_selection() {
        assert_eq!(
            recipe_args(
                "boot=live plainroot root=/dev/disk/by-partuuid/x console=tty0 console=ttyS0,115200n8"
            ),
            vec!["console=tty0", "console=ttyS0,115200n8"]
        );
    }
}
