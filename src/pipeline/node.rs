//! Per-node outputs: `out/nodes/<hostname>/` = the node's cloud-init seed, a `CIDATA` volume
//! and a flashable disk (its role disk with the seed in partition 3), signed.
//!
//! Layout: every node build lives in `out/nodes/by-id/<hostname>-<node-id>/`, and
//! `out/nodes/<hostname>` is a symlink to the current one, switched atomically with a rename.
//! The node id covers the role build, the role disk's digest and the rendered seed, so a node is
//! rebuilt exactly when one of them changes.

use crate::formats::disk;
use crate::pipeline::build::{self, BuildOptions, BuildReport};
use crate::pipeline::emit;
use crate::pipeline::resolve::Resolved;
use crate::pipeline::seed::{self, Seed};
use crate::project::layout::Out;
use crate::project::recipe::{Node, Project};
use crate::sys::util;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Files of a node build (besides SHA256SUMS and SHA256SUMS.sig); seed files are added as
/// present.
pub const ARTIFACTS: &[&str] = &[
    "cidata.img",
    "cidata.iso",
    "disk.qcow2",
    "disk.raw",
    "node.json",
];

/// Volume label of the seed volume (cloud-init accepts `cidata` or `CIDATA`; FAT labels are
/// upper case).
pub const CIDATA_LABEL: &str = "CIDATA";

/// What building one node did.
#[derive(Debug, Serialize)]
pub struct NodeReport {
    pub hostname: String,
    pub role: String,
    pub role_build_id: String,
    pub node_id: String,
    pub instance_id: String,
    /// `out/nodes/<hostname>` (a symlink to the build below).
    pub link: PathBuf,
    pub dir: PathBuf,
    pub up_to_date: bool,
    pub artifacts: Vec<crate::trust::sums::Artifact>,
}

/// `out/nodes`.
pub fn nodes_dir(out_dir: &Path) -> PathBuf {
    Out::new(out_dir).nodes()
}

/// One inventory node's seed, rendered before any role is built.
#[derive(Debug)]
pub struct PlannedNode<'a> {
    pub node: &'a Node,
    pub role: &'a str,
    pub build_id: &'a str,
    pub seed: Seed,
}

/// Renders every inventory node's seed for the roles about to be built, before anything is
/// built or written: a bad template fails the whole build up front, naming the file and node.
pub fn plan<'a>(project: &Project, roles: &'a [Resolved]) -> Result<Vec<PlannedNode<'a>>> {
    let keys = seed::authorized_keys(project)?;
    let mut out = Vec::new();
    for r in roles {
        for n in r.cluster.nodes.iter().filter(|n| n.role == r.role) {
            let s = seed::render(project, n, &r.build_id, r.recipe.k3s.mode, &keys)?;
            out.push(PlannedNode {
                node: n,
                role: &r.role,
                build_id: &r.build_id,
                seed: s,
            });
        }
    }
    Ok(out)
}

/// Builds the outputs of the planned nodes from the finished role builds.
pub fn build_nodes(
    project: &Project,
    planned: &[PlannedNode],
    roles: &[BuildReport],
    opts: &BuildOptions,
) -> Result<Vec<NodeReport>> {
    let mut reports = Vec::new();
    for p in planned {
        let rep = roles
            .iter()
            .find(|r| r.role == p.role && r.build_id.as_str() == p.build_id)
            .with_context(|| format!("no build of role {} for node {}", p.role, p.node.hostname))?;
        reports.push(
            build_node(project, p.node, rep, &p.seed, opts)
                .with_context(|| format!("building node {}", p.node.hostname))?,
        );
    }
    prune_departed(project, &opts.out_dir)?;
    Ok(reports)
}

/// Removes the outputs of nodes that left the inventory (their link and builds), so
/// `out/nodes/` never offers a disk for a machine the cluster no longer has.
fn prune_departed(project: &Project, out_dir: &Path) -> Result<()> {
    for host in list(out_dir) {
        if project.cluster.nodes.iter().any(|n| n.hostname == host) {
            continue;
        }
        let _lock = build::lock_out(out_dir)?;
        tracing::info!(node = %host, "removing outputs of a node no longer in the inventory");
        let out = Out::new(out_dir);
        fs::remove_file(out.node(&host))
            .with_context(|| format!("removing {}", out.node(&host).display()))?;
        gc(&out.node_builds(), &host, "")?;
    }
    Ok(())
}

/// Content address of a node build.
/// node.json's `schema`; part of the node id, so a new node.json layout makes new node builds.
/// 2: `cluster_secrets`, the identity files in the seed.
const NODE_SCHEMA: &str = "kiln.node/2";

fn node_id(node: &Node, rep: &BuildReport, disk_sha: &str, s: &Seed) -> Result<String> {
    let v = serde_json::json!({
        "schema": NODE_SCHEMA,
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "hostname": node.hostname,
        "role": rep.role,
        "role_build_id": rep.build_id,
        "role_disk_sha256": disk_sha,
        "seed": s.files,
    });
    Ok(util::sha256_hex(serde_json::to_string(&v)?.as_bytes()))
}

fn build_node(
    project: &Project,
    node: &Node,
    rep: &BuildReport,
    s: &Seed,
    opts: &BuildOptions,
) -> Result<NodeReport> {
    let disk_sha = rep
        .artifacts
        .iter()
        .find(|a| a.name == "disk.raw")
        .map(|a| a.sha256.clone())
        .with_context(|| format!("{} lists no disk.raw", rep.dir.join("SHA256SUMS").display()))?;
    let id = node_id(node, rep, &disk_sha, s)?;
    let manifest: serde_json::Value = serde_json::from_slice(&crate::sys::util::read_small(
        &rep.dir.join("manifest.json"),
        crate::trust::limits::MANIFEST,
        "manifest",
    )?)
    .context("parsing the role manifest")?;
    let role_secrets = manifest["contains_secrets"].as_bool().unwrap_or(true);
    let contains_secrets = role_secrets || s.contains_secrets;
    let cluster_secrets = role_secrets || s.cluster_secrets;

    let _lock = build::lock_out(&opts.out_dir)?;
    let nodes = nodes_dir(&opts.out_dir);
    let by_id = Out::new(&opts.out_dir).node_builds();
    fs::create_dir_all(&by_id).with_context(|| format!("creating {}", by_id.display()))?;
    build::clean_stale(&by_id)?;
    let name = format!("{}-{}", node.hostname, &id[..16]);
    let final_dir = by_id.join(&name);
    let link = Out::new(&opts.out_dir).node(&node.hostname);
    let done = final_dir.join("SHA256SUMS").is_file() && final_dir.join("SHA256SUMS.sig").is_file();
    let up_to_date = done && !opts.force;
    if !up_to_date {
        let ident = Identity {
            id: &id,
            disk_sha: &disk_sha,
            contains_secrets,
            cluster_secrets,
        };
        write_node(project, node, rep, s, &ident, &final_dir)?;
    }
    point_link(&nodes, &node.hostname, &name)?;
    gc(&by_id, &node.hostname, &name)?;
    Ok(NodeReport {
        hostname: node.hostname.clone(),
        role: rep.role.clone(),
        role_build_id: rep.build_id.to_string(),
        node_id: id,
        instance_id: s.instance_id.clone(),
        link,
        artifacts: build::read_sums(&final_dir)?,
        dir: final_dir,
        up_to_date,
    })
}

/// What identifies one node build.
struct Identity<'a> {
    id: &'a str,
    disk_sha: &'a str,
    /// The outputs hold secrets (always: the node's identity): they are made private.
    contains_secrets: bool,
    /// The role build or the seed holds a secret of the whole cluster (the k3s token, a
    /// master's keys): `kiln serve --refuse-secret-builds` does not serve them.
    cluster_secrets: bool,
}

/// Stages a node's outputs next to `final_dir` and publishes them there.
fn write_node(
    project: &Project,
    node: &Node,
    rep: &BuildReport,
    s: &Seed,
    ident: &Identity,
    final_dir: &Path,
) -> Result<()> {
    let Identity {
        id,
        disk_sha,
        contains_secrets,
        cluster_secrets,
    } = *ident;
    let by_id = final_dir.parent().context("node dir has no parent")?;
    let role_disk = rep.dir.join("disk.raw");
    let staging = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(by_id)
        .with_context(|| format!("creating a staging dir in {}", by_id.display()))?;
    let sd = staging.path();
    let sde = project.cluster.section.source_date_epoch;

    // Seed files and the CIDATA volume holding them.
    seed::write_files(s, sd)?;
    let cidata = sd.join("cidata.img");
    write_cidata(&cidata, s, sde)?;
    write_cidata_iso(&sd.join("cidata.iso"), s, sde)?;

    // The flashable disk: the role disk with the CIDATA volume in its seed partition.
    let disk_path = sd.join("disk.raw");
    util::copy_sparse(&role_disk, &disk_path)?;
    embed_seed(&disk_path, &cidata)?;
    emit::qcow2_from_raw(&disk_path, &sd.join("disk.qcow2"))?;

    let mut names: Vec<&str> = ARTIFACTS.to_vec();
    names.extend(s.ordered().iter().map(|(n, _)| *n));
    names.retain(|n| *n != "node.json");
    let artifacts = crate::trust::sums::hash_artifacts(sd, &names)?;
    // The fingerprint a first `ssh` to the node shows, of the host key the seed carries.
    let ssh_host_key = s
        .files
        .get(crate::pipeline::seed::IDENTITY_FILES[3])
        .map(|k| crate::trust::identity::ssh_fingerprint(k))
        .unwrap_or_default();
    let node_json = serde_json::json!({
        "schema": NODE_SCHEMA,
        "hostname": node.hostname,
        "role": rep.role,
        "cluster": project.cluster.section.name,
        "node_id": id,
        "instance_id": s.instance_id,
        "ssh_host_key": ssh_host_key,
        "role_build_id": rep.build_id,
        "role_disk_sha256": disk_sha,
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "contains_secrets": contains_secrets,
        "cluster_secrets": cluster_secrets,
        "inventory": node,
        "seed_templates": s.sources,
        "artifacts": &artifacts,
    });
    fs::write(
        sd.join("node.json"),
        serde_json::to_string_pretty(&node_json)? + "\n",
    )
    .context("writing node.json")?;
    names.push("node.json");
    let mut all = artifacts;
    all.extend(crate::trust::sums::hash_artifacts(sd, &["node.json"])?);
    fs::write(sd.join("SHA256SUMS"), crate::trust::sums::sha256sums(&all))
        .context("writing SHA256SUMS")?;
    crate::trust::sign::sign_dir(
        sd,
        &crate::trust::sign::load_signing_key(&project.layout().keys())?,
    )?;
    for n in names.iter().chain(["SHA256SUMS", "SHA256SUMS.sig"].iter()) {
        util::sync_path(&sd.join(n))?;
    }
    if contains_secrets {
        build::restrict_permissions(sd)?;
    }

    util::test_pause("nodes");
    build::publish(staging, final_dir)
}

/// Writes the `CIDATA` FAT volume (the size of a role disk's seed partition) holding the seed.
pub fn write_cidata(path: &Path, s: &Seed, epoch: i64) -> Result<()> {
    let len = build::SEED_PARTITION_MIB * disk::MIB;
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(len)
        .with_context(|| format!("sizing {}", path.display()))?;
    let files: Vec<disk::EspFile> = s
        .ordered()
        .into_iter()
        .map(|(n, b)| disk::EspFile {
            path: n.into(),
            source: disk::EspSource::Bytes(b.to_vec()),
        })
        .collect();
    let volume_id = u32::from_be_bytes(
        disk::guid_from_seed(s.instance_id.as_bytes(), "cidata-volume-id")[..4]
            .try_into()
            .expect("4 bytes"),
    );
    disk::write_fat_volume(&mut f, 0, len, CIDATA_LABEL, volume_id, &files, epoch)
        .with_context(|| format!("writing the CIDATA volume {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    Ok(())
}

/// Writes the seed as an ISO 9660 volume labelled `cidata` (Rock Ridge + Joliet names), for a
/// virtual CD-ROM or any tool that expects `cloud-localds`/`genisoimage -V cidata` output.
pub fn write_cidata_iso(path: &Path, s: &Seed, epoch: i64) -> Result<()> {
    let files: Vec<crate::formats::iso9660::IsoFile> = s
        .ordered()
        .into_iter()
        .map(|(n, b)| crate::formats::iso9660::IsoFile {
            name: n.into(),
            data: b.to_vec(),
        })
        .collect();
    crate::formats::iso9660::write_iso(path, "cidata", &files, epoch)
        .with_context(|| format!("writing the seed ISO {}", path.display()))
}

/// Copies the CIDATA volume into partition 3 (`kiln-seed`) of a disk image.
pub fn embed_seed(disk_path: &Path, cidata: &Path) -> Result<()> {
    let mut d = OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk_path)
        .with_context(|| format!("opening {}", disk_path.display()))?;
    let Some((first, last, name)) = disk::read_partition(&mut d, 2)? else {
        bail!(
            "{} has no seed partition (partition 3): it was built by an older kiln; rebuild the role with --force",
            disk_path.display()
        );
    };
    ensure!(
        name == disk::SEED_PARTITION_NAME,
        "partition 3 of {} is {name:?}, not {:?}",
        disk_path.display(),
        disk::SEED_PARTITION_NAME
    );
    let part_len = (last - first + 1) * disk::SECTOR_SIZE;
    let vol_len = fs::metadata(cidata)?.len();
    ensure!(
        vol_len == part_len,
        "seed volume is {vol_len} bytes but the seed partition of {} is {part_len}",
        disk_path.display()
    );
    let mut src = File::open(cidata).with_context(|| format!("opening {}", cidata.display()))?;
    d.seek(SeekFrom::Start(first * disk::SECTOR_SIZE))?;
    let mut buf = Vec::with_capacity(vol_len as usize);
    src.read_to_end(&mut buf)?;
    d.write_all(&buf)
        .with_context(|| format!("writing the seed into {}", disk_path.display()))?;
    d.sync_all()
        .with_context(|| format!("fsync {}", disk_path.display()))?;
    Ok(())
}

/// Atomically points `nodes/<hostname>` at `by-id/<name>`.
fn point_link(nodes: &Path, hostname: &str, name: &str) -> Result<()> {
    let link = nodes.join(hostname);
    if let Ok(m) = fs::symlink_metadata(&link) {
        ensure!(
            m.file_type().is_symlink(),
            "{} exists and is not a symlink kiln made; move it away",
            link.display()
        );
    }
    util::symlink_atomic(&format!("by-id/{name}"), &link)
}

/// Removes older builds of `hostname` (only the current one is kept).
fn gc(by_id: &Path, hostname: &str, keep: &str) -> Result<()> {
    let prefix = format!("{hostname}-");
    for e in fs::read_dir(by_id).with_context(|| format!("reading {}", by_id.display()))? {
        let e = e?;
        let n = e.file_name().to_string_lossy().into_owned();
        // `<hostname>-<16 hex>` only: another host's name may start with this one's.
        let ours = n
            .strip_prefix(&prefix)
            .is_some_and(|rest| rest.len() == 16 && rest.chars().all(|c| c.is_ascii_hexdigit()));
        if ours && n != keep {
            fs::remove_dir_all(e.path())
                .with_context(|| format!("removing old node build {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Hostnames that have node outputs in `out/nodes/`, sorted.
pub fn list(out_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(nodes_dir(out_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_symlink()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}
