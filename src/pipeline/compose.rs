//! Compose stage: base tarball + overlays + generated files → one normalised root tarball.
//!
//! The base entries are streamed through unchanged (owners, modes, xattrs kept; mtimes clamped
//! to SOURCE_DATE_EPOCH); overlay and generated entries form an "upper" layer that replaces
//! base entries at the same path and is owned by root with normalised modes and mtimes.

use crate::project::recipe::{Cluster, Node, Project, Recipe, RecipeError};
use crate::sys::util;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use walkdir::WalkDir;

/// One file of an overlay tree, as found in the project.
#[derive(Debug, Clone, Serialize)]
pub struct OverlayFile {
    /// Layer it comes from (`common` or the role).
    pub layer: String,
    /// Path inside the image, without leading `/` and without the `.tera` suffix.
    pub image_path: String,
    /// Path relative to `overlays/`.
    pub source: String,
    /// `file`, `dir` or `symlink`.
    pub kind: String,
    /// Normalised mode (0644/0755 for files, 0755 for dirs, 0777 for symlinks).
    pub mode: u32,
    /// sha256 of the file contents, or of the link target.
    pub sha256: String,
    pub template: bool,
}

/// Lists `overlays/common/` then `overlays/<role>/` in sorted order; later layers win.
pub fn scan_overlays(project: &Project, role: &str) -> Result<Vec<OverlayFile>> {
    let mut out: BTreeMap<String, OverlayFile> = BTreeMap::new();
    for layer in ["common", role] {
        let dir = project.overlays_dir().join(layer);
        if !dir.is_dir() {
            continue;
        }
        for e in WalkDir::new(&dir).sort_by_file_name().min_depth(1) {
            let e = e.with_context(|| format!("walking {}", dir.display()))?;
            let rel = e.path().strip_prefix(&dir).expect("under dir");
            let rel_str = rel
                .to_str()
                .with_context(|| format!("{}: path is not UTF-8", e.path().display()))?
                .to_string();
            if rel_str == ".gitkeep" || rel_str.ends_with("/.gitkeep") {
                continue;
            }
            let source = format!("{layer}/{rel_str}");
            let meta = fs::symlink_metadata(e.path())
                .with_context(|| format!("reading {}", e.path().display()))?;
            let ft = meta.file_type();
            let (kind, mode, sha, template, image_path) = if ft.is_symlink() {
                let t = fs::read_link(e.path())
                    .with_context(|| format!("reading link {}", e.path().display()))?;
                let t = t
                    .to_str()
                    .with_context(|| format!("{}: link target is not UTF-8", e.path().display()))?;
                (
                    "symlink",
                    0o777,
                    util::sha256_hex(t.as_bytes()),
                    false,
                    rel_str.clone(),
                )
            } else if ft.is_dir() {
                ("dir", 0o755, String::new(), false, rel_str.clone())
            } else if ft.is_file() {
                use std::os::unix::fs::PermissionsExt;
                let mode = if meta.permissions().mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                };
                let (sha, _) = util::sha256_file(e.path())?;
                match rel_str.strip_suffix(".tera") {
                    Some(p) => ("file", mode, sha, true, p.to_string()),
                    None => ("file", mode, sha, false, rel_str.clone()),
                }
            } else {
                return Err(RecipeError {
                    file: e.path().to_path_buf(),
                    key: "(overlay)".into(),
                    problem: "not a regular file, directory or symlink".into(),
                    fix: "remove it from the overlay".into(),
                }
                .into());
            };
            out.insert(
                image_path.clone(),
                OverlayFile {
                    layer: layer.to_string(),
                    image_path,
                    source,
                    kind: kind.into(),
                    mode,
                    sha256: sha,
                    template,
                },
            );
        }
    }
    Ok(out.into_values().collect())
}

/// Parses every `*.tera` overlay so that syntax errors stop the build before anything is written.
pub fn check_templates(project: &Project, overlays: &[OverlayFile]) -> Result<()> {
    for o in overlays.iter().filter(|o| o.template) {
        let src = project.overlays_dir().join(&o.source);
        let text = fs::read_to_string(&src).map_err(|e| RecipeError {
            file: src.clone(),
            key: "(template)".into(),
            problem: format!("cannot read as UTF-8 text: {e}"),
            fix: "save it as UTF-8 or drop the .tera suffix".into(),
        })?;
        tera::Tera::default().add_raw_template(&o.source, &text).map_err(|e| RecipeError {
            file: src.clone(),
            key: "(template)".into(),
            problem: format!("template syntax error: {}", tera_error_chain(&e)),
            fix: "fix the tera syntax (https://keats.github.io/tera/docs/), or drop the .tera suffix to copy the file verbatim".into(),
        })?;
    }
    Ok(())
}

/// Values templates (`*.tera`) see.
#[derive(Debug, Serialize)]
pub struct TemplateContext<'a> {
    pub cluster: &'a Cluster,
    pub nodes: &'a [Node],
    pub role: RoleContext<'a>,
    pub build: BuildContext<'a>,
}

#[derive(Debug, Serialize)]
pub struct RoleContext<'a> {
    pub name: &'a str,
    pub description: &'a str,
    /// Inventory nodes with this role.
    pub nodes: Vec<&'a Node>,
}

#[derive(Debug, Serialize)]
pub struct BuildContext<'a> {
    pub id: &'a str,
    pub kiln_version: &'a str,
}

/// What the upper layer holds at a path (owned by root, mtime = SOURCE_DATE_EPOCH).
#[derive(Debug, Clone)]
pub enum Upper {
    Dir,
    File {
        data: Vec<u8>,
        mode: u32,
        origin: String,
    },
    /// A large file streamed from the host (e.g. a cached download).
    HostFile {
        path: std::path::PathBuf,
        mode: u32,
        origin: String,
    },
    Symlink {
        target: String,
        origin: String,
    },
}

impl Upper {
    /// A generated regular file.
    pub fn file(data: impl Into<Vec<u8>>, mode: u32, origin: &str) -> Self {
        Upper::File {
            data: data.into(),
            mode,
            origin: origin.into(),
        }
    }
    /// A generated symlink.
    pub fn symlink(target: &str, origin: &str) -> Self {
        Upper::Symlink {
            target: target.into(),
            origin: origin.into(),
        }
    }
}

/// What the base holds at a path.
#[derive(Debug, Clone, PartialEq)]
enum BaseKind {
    Dir,
    File,
    Symlink(String),
    Other,
}

/// Everything the later stages need from the composed tree.
#[derive(Debug)]
pub struct Composed {
    pub kernel_version: String,
    pub vmlinuz: Vec<u8>,
    pub initrd: Vec<u8>,
    /// systemd-boot's EFI binary from the image.
    pub bootloader_efi: Vec<u8>,
    pub dpkg_status: String,
}

pub const BOOTLOADER_PATH: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";
const UNIT_DIRS: &[&str] = &[
    "etc/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
];

fn norm(p: &Path) -> String {
    let s = p.to_string_lossy();
    s.trim_start_matches("./").trim_end_matches('/').to_string()
}

/// Inputs of [`compose`].
pub struct ComposeInput<'a> {
    pub project: &'a Project,
    pub recipe: &'a Recipe,
    pub build_id: &'a str,
    pub overlays: &'a [OverlayFile],
    pub base_tar: &'a Path,
    /// Entries generated by other stages (k3s layout, secrets), keyed by image path; they
    /// override overlays at the same path.
    pub extra: BTreeMap<String, Upper>,
    /// Units to enable besides the recipe's `systemd.enable`.
    pub extra_enable: Vec<String>,
}

/// Writes the composed root tarball to `out` and returns what emit needs.
pub fn compose(input: &ComposeInput, out: &Path) -> Result<Composed> {
    let sde = input.project.cluster.section.source_date_epoch;
    let scan = scan_base(input.base_tar)?;
    let upper = build_upper(input, &scan)?;

    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, file));
    builder.follow_symlinks(false);

    // 1. Base entries, minus the ones the upper layer replaces.
    let f = fs::File::open(input.base_tar)
        .with_context(|| format!("opening {}", input.base_tar.display()))?;
    let mut ar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, f));
    for e in ar
        .entries()
        .with_context(|| format!("reading {}", input.base_tar.display()))?
    {
        let mut e = e.with_context(|| format!("reading {}", input.base_tar.display()))?;
        let path = e.path()?.into_owned();
        let key = norm(&path);
        if upper.get(&key).is_some_and(|u| !matches!(u, Upper::Dir)) {
            continue; // replaced by the upper layer
        }
        if removed(&input.recipe.debian.remove, &key) {
            continue; // debian.remove
        }
        if key == crate::pipeline::base::DKMS_MOK_KEY {
            // DKMS made itself a random signing key while the base was built: a private key in
            // every image, and a different one (so different modules) on every build.
            let role_toml = input
                .project
                .recipes_dir()
                .join(format!("{}.toml", input.recipe.role));
            return Err(crate::project::recipe::RecipeError {
                file: role_toml,
                key: "debian.sign_modules".into(),
                problem: format!(
                    "the base has a DKMS module-signing private key (/{key}) that DKMS generated for this build"
                ),
                fix: "set `sign_modules = true` under [debian] so DKMS signs with keys/module-signing.key (made by `kiln keys init --add-missing`) and the private key is dropped".into(),
            }
            .into());
        }
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if let Some(exts) = e.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                let k = ext
                    .key()
                    .map_err(|_| anyhow::anyhow!("non-UTF-8 PAX key in {}", path.display()))?;
                if !keep_pax_key(k) {
                    continue;
                }
                pax.push((k.to_string(), ext.value_bytes().to_vec()));
            }
        }
        let mut header = e.header().clone();
        let mtime = header.mtime()?.min(sde as u64);
        header.set_mtime(mtime);
        if key.is_empty() {
            // The root directory: the tar writer drops "." components from paths, so the
            // entry is written with its name set by hand (tar2sqfs takes it as the root inode).
            header.as_old_mut().name = [0; 100];
            header.as_old_mut().name[..2].copy_from_slice(b"./");
            header.set_cksum();
            builder.append(&header, std::io::empty())?;
            continue;
        }
        let link = e.link_name()?.map(|l| l.into_owned());
        if !pax.is_empty() {
            builder.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        match link {
            Some(target) => builder.append_link(&mut header, &path, &target)?,
            None => builder.append_data(&mut header, &path, &mut e)?,
        }
    }

    // 2. Upper layer in path order (parents before children); dirs already in the base are kept as they were.
    for (path, u) in &upper {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(sde as u64);
        let p = format!("./{path}");
        match u {
            Upper::Dir => {
                if scan.index.get(path) == Some(&BaseKind::Dir) {
                    continue;
                }
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                builder.append_data(&mut h, format!("{p}/"), std::io::empty())?;
            }
            Upper::File { data, mode, .. } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                builder.append_data(&mut h, &p, data.as_slice())?;
            }
            Upper::HostFile {
                path: src, mode, ..
            } => {
                let f =
                    fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(f.metadata()?.len());
                builder.append_data(&mut h, &p, std::io::BufReader::with_capacity(1 << 20, f))?;
            }
            Upper::Symlink { target, .. } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                builder.append_link(&mut h, &p, target)?;
            }
        }
    }
    let mut w = builder.into_inner().context("finishing the root tarball")?;
    // Not fsynced: the tar is a scratch file of the staging dir, read back at once and removed.
    w.flush()
        .with_context(|| format!("writing {}", out.display()))?;

    Ok(Composed {
        kernel_version: scan.kernel_version,
        vmlinuz: scan.vmlinuz,
        initrd: scan.initrd,
        bootloader_efi: scan.bootloader,
        dpkg_status: scan.dpkg_status,
    })
}

struct BaseScan {
    index: BTreeMap<String, BaseKind>,
    units: BTreeMap<String, (String, String)>, // unit name -> (dir, content)
    kernel_version: String,
    vmlinuz: Vec<u8>,
    initrd: Vec<u8>,
    bootloader: Vec<u8>,
    dpkg_status: String,
}

fn scan_base(tar_path: &Path) -> Result<BaseScan> {
    let f = fs::File::open(tar_path).with_context(|| format!("opening {}", tar_path.display()))?;
    let mut ar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, f));
    let mut index = BTreeMap::new();
    let mut units = BTreeMap::new();
    let mut kernels: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut initrds: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut bootloader = None;
    let mut dpkg_status = None;
    for e in ar
        .entries()
        .with_context(|| format!("reading {}", tar_path.display()))?
    {
        let mut e = e?;
        let key = norm(&e.path()?);
        let kind = match e.header().entry_type() {
            tar::EntryType::Directory => BaseKind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous => BaseKind::File,
            tar::EntryType::Link => BaseKind::File,
            tar::EntryType::Symlink => BaseKind::Symlink(
                e.link_name()?
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            _ => BaseKind::Other,
        };
        let is_file = e.header().entry_type() == tar::EntryType::Regular;
        if is_file {
            let mut grab = || -> Result<Vec<u8>> {
                let mut v = Vec::new();
                e.read_to_end(&mut v)?;
                Ok(v)
            };
            if let Some(v) = key.strip_prefix("boot/vmlinuz-") {
                kernels.insert(v.to_string(), grab()?);
            } else if let Some(v) = key.strip_prefix("boot/initrd.img-") {
                initrds.insert(v.to_string(), grab()?);
            } else if key == BOOTLOADER_PATH {
                bootloader = Some(grab()?);
            } else if key == "var/lib/dpkg/status" {
                dpkg_status = Some(String::from_utf8_lossy(&grab()?).into_owned());
            } else if let Some((dir, name)) = key.rsplit_once('/') {
                if UNIT_DIRS.contains(&dir) && is_unit_file(name) {
                    let text = String::from_utf8_lossy(&grab()?).into_owned();
                    units
                        .entry(name.to_string())
                        .or_insert((dir.to_string(), text));
                }
            }
        }
        index.insert(key, kind);
    }
    let base_toml = "recipes/base.toml";
    let Some((kernel_version, vmlinuz)) = kernels.into_iter().next_back() else {
        bail!("the base has no kernel in /boot: add \"linux-image-amd64\" to debian.packages in {base_toml}");
    };
    let Some(initrd) = initrds.remove(&kernel_version) else {
        bail!("the base has no /boot/initrd.img-{kernel_version}: add \"live-boot\" (which pulls initramfs-tools) to debian.packages in {base_toml}");
    };
    let Some(bootloader) = bootloader else {
        bail!("the base has no /{BOOTLOADER_PATH}: add \"systemd-boot-efi\" to debian.packages in {base_toml}");
    };
    if !index.contains_key("usr/lib/live/boot/9990-main.sh")
        && !index.contains_key("lib/live/boot/9990-main.sh")
    {
        bail!("the base has no live-boot (needed to boot the squashfs root from disk and over PXE): add \"live-boot\" to debian.packages in {base_toml}");
    }
    Ok(BaseScan {
        index,
        units,
        kernel_version,
        vmlinuz,
        initrd,
        bootloader,
        dpkg_status: dpkg_status.unwrap_or_default(),
    })
}

/// Whether `key` is one of the `debian.remove` paths or under one of them.
fn removed(remove: &[String], key: &str) -> bool {
    remove.iter().any(|r| {
        key == r || (key.starts_with(r.as_str()) && key.as_bytes().get(r.len()) == Some(&b'/'))
    })
}

/// PAX records carried from the base into the composed tar. Path, link, size and times are
/// re-derived by the writer; POSIX ACLs (`system.posix_acl_*`, `SCHILY.acl.*`) are dropped
/// because squashfs cannot store them (systemd-tmpfiles re-applies the journal's ACLs at boot);
/// file capabilities (`security.capability`) and other `security.`/`user.`/`trusted.` xattrs stay.
fn keep_pax_key(k: &str) -> bool {
    match k.strip_prefix("SCHILY.xattr.") {
        Some(x) => {
            x.starts_with("security.") || x.starts_with("user.") || x.starts_with("trusted.")
        }
        None => {
            !matches!(
                k,
                "path" | "linkpath" | "mtime" | "atime" | "ctime" | "size"
            ) && !k.starts_with("SCHILY.acl.")
        }
    }
}

fn is_unit_file(name: &str) -> bool {
    crate::project::recipe::UNIT_SUFFIXES
        .iter()
        .any(|s| name.ends_with(s))
}

/// `/etc/kiln/inventory.tsv`: one line per node, tab-separated:
/// mac, hostname, role, address (`dhcp` or CIDR), gateway (`-`), DNS servers (comma list or `-`).
pub fn inventory_tsv(cluster: &Cluster) -> String {
    let mut s = String::from("# mac\thostname\trole\taddress\tgateway\tdns (generated by kiln)\n");
    for n in &cluster.nodes {
        let dns = if n.dns.is_empty() {
            "-".to_string()
        } else {
            n.dns.join(",")
        };
        s.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\t{}\n",
            n.mac,
            n.hostname,
            n.role,
            n.address,
            n.gateway.as_deref().unwrap_or("-"),
            dns
        ));
    }
    s
}

/// Finds this machine in the baked inventory by the MAC of any Ethernet NIC; sets the hostname,
/// writes a static systemd-networkd config when the node has one, and links the node's k3s
/// drop-in. Runs before the network and k3s.
pub const IDENTIFY_SCRIPT: &str = include_str!("assets/kiln-identify.sh");

/// Unit running [`IDENTIFY_SCRIPT`] early in boot.
pub const IDENTIFY_UNIT: &str = "# Generated by kiln: take this node's identity from the inventory (by MAC).
[Unit]
Description=kiln: node identity from the inventory
DefaultDependencies=no
After=local-fs.target systemd-udev-trigger.service
Before=network-pre.target systemd-networkd.service k3s.service k3s-agent.service kiln-booted.service shutdown.target
Wants=network-pre.target
Conflicts=shutdown.target

[Service]
Type=oneshot
RemainAfterExit=yes
StandardOutput=journal+console
ExecStart=/usr/lib/kiln/kiln-identify

[Install]
WantedBy=sysinit.target
";

/// The unit kiln bakes into every image: it prints the boot marker on the console.
pub fn marker_unit(role: &str, build_id: &str) -> String {
    format!(
        "# Generated by kiln: prints the boot marker on the console once multi-user is reached.\n\
         [Unit]\n\
         Description=kiln boot marker\n\
         After=basic.target network.target cloud-init.service\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         StandardOutput=journal+console\n\
         ExecStart=/bin/sh -c 'echo \"kiln: booted role={role} build={build_id} hostname=$(cat /proc/sys/kernel/hostname) seed=$(cat /var/lib/cloud/data/instance-id 2>/dev/null || echo none)\"'\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// The upper layer: the overlays, then what kiln generates, then the unit links of
/// `systemd.enable`/`systemd.mask`, then the parent directories all of them need.
fn build_upper(input: &ComposeInput, scan: &BaseScan) -> Result<BTreeMap<String, Upper>> {
    let mut upper = overlay_layer(input)?;
    add_generated(input, &mut upper)?;
    enable_units(input, scan, &mut upper)?;
    mask_units(input.recipe, &mut upper);
    with_parent_dirs(scan, upper)
}

/// Overlays (already merged common → role), templates rendered.
fn overlay_layer(input: &ComposeInput) -> Result<BTreeMap<String, Upper>> {
    let mut upper: BTreeMap<String, Upper> = BTreeMap::new();
    let tctx = template_context(input)?;
    for o in input.overlays {
        let u = overlay_entry(input.project, o, &tctx)?;
        upper.insert(o.image_path.clone(), u);
    }
    Ok(upper)
}

/// The variables templates see: cluster, nodes, role.{name,description,nodes},
/// build.{id,kiln_version}.
fn template_context(input: &ComposeInput) -> Result<tera::Context> {
    let project = input.project;
    let recipe = input.recipe;
    let ctx = TemplateContext {
        cluster: &project.cluster,
        nodes: &project.cluster.nodes,
        role: RoleContext {
            name: &recipe.role,
            description: &recipe.description,
            nodes: project
                .cluster
                .nodes
                .iter()
                .filter(|n| n.role == recipe.role)
                .collect(),
        },
        build: BuildContext {
            id: input.build_id,
            kiln_version: env!("CARGO_PKG_VERSION"),
        },
    };
    tera::Context::from_serialize(&ctx).context("building the template context")
}

/// One overlay file as an upper entry: a directory, a symlink, or the file's bytes (rendered
/// when it is a template).
fn overlay_entry(project: &Project, o: &OverlayFile, tctx: &tera::Context) -> Result<Upper> {
    let src = project.overlays_dir().join(&o.source);
    let origin = format!("overlays/{}", o.source);
    let u = match o.kind.as_str() {
        "dir" => Upper::Dir,
        "symlink" => Upper::Symlink {
            target: fs::read_link(&src)?.to_string_lossy().into_owned(),
            origin,
        },
        _ => {
            let raw = fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
            let data = if o.template {
                render_template(&src, raw, tctx)?
            } else {
                raw
            };
            Upper::File {
                data,
                mode: o.mode,
                origin,
            }
        }
    };
    Ok(u)
}

/// Renders the template `src` (its bytes `raw`) with `tctx`.
fn render_template(src: &Path, raw: Vec<u8>, tctx: &tera::Context) -> Result<Vec<u8>> {
    let text = String::from_utf8(raw).map_err(|_| RecipeError {
        file: src.to_path_buf(),
        key: "(template)".into(),
        problem: "template is not UTF-8".into(),
        fix: "save it as UTF-8 or drop the .tera suffix".into(),
    })?;
    Ok(tera::Tera::one_off(&text, tctx, false)
        .map_err(|e| RecipeError {
            file: src.to_path_buf(),
            key: "(template)".into(),
            problem: format!("cannot render: {}", tera_error_chain(&e)),
            fix: "fix the template; available variables: cluster, nodes, role.{name,description,nodes}, build.{id,kiln_version}".into(),
        })?
        .into_bytes())
}

/// Generated files (win over overlays: kiln owns them), then the entries of other stages.
fn add_generated(input: &ComposeInput, upper: &mut BTreeMap<String, Upper>) -> Result<()> {
    let project = input.project;
    let recipe = input.recipe;
    let gen = |data: String| Upper::File {
        data: data.into_bytes(),
        mode: 0o644,
        origin: "kiln (generated)".into(),
    };
    let c = &project.cluster.section;
    upper.insert(
        "etc/hostname".into(),
        gen(format!("{}-{}\n", c.name, recipe.role)),
    );
    upper.insert("etc/machine-id".into(), gen(String::new()));
    let build_json = serde_json::to_string_pretty(&serde_json::json!({
        "build_id": input.build_id,
        "role": recipe.role,
        "cluster": c.name,
        "suite": c.suite,
        "source_date_epoch": c.source_date_epoch,
        "kiln_version": env!("CARGO_PKG_VERSION"),
    }))? + "\n";
    upper.insert("etc/kiln/build.json".into(), gen(build_json));
    upper.insert(
        "etc/systemd/system/kiln-booted.service".into(),
        gen(marker_unit(&recipe.role, input.build_id)),
    );
    upper.insert("etc/kiln/role".into(), gen(format!("{}\n", recipe.role)));
    upper.insert(
        "etc/kiln/inventory.tsv".into(),
        gen(inventory_tsv(&project.cluster)),
    );
    upper.insert(
        "usr/lib/kiln/kiln-identify".into(),
        Upper::file(IDENTIFY_SCRIPT, 0o755, "kiln (generated)"),
    );
    upper.insert(
        "etc/systemd/system/kiln-identify.service".into(),
        gen(IDENTIFY_UNIT.to_string()),
    );
    for (p, e) in &input.extra {
        upper.insert(p.clone(), e.clone());
    }
    Ok(())
}

/// systemd enable, resolved against the upper layer first, then the base: the links of each
/// unit's `[Install]` section (and of the units it names in `Also=`).
fn enable_units(
    input: &ComposeInput,
    scan: &BaseScan,
    upper: &mut BTreeMap<String, Upper>,
) -> Result<()> {
    let project = input.project;
    let recipe = input.recipe;
    let mut to_enable: Vec<String> = recipe.systemd.enable.clone();
    to_enable.push("kiln-booted.service".into());
    to_enable.push("kiln-identify.service".into());
    to_enable.extend(input.extra_enable.iter().cloned());
    let mut done = BTreeSet::new();
    while let Some(unit) = to_enable.pop() {
        if !done.insert(unit.clone()) {
            continue;
        }
        let (template, _instance) = match unit.split_once('@') {
            Some((pre, rest)) => {
                let suffix = rest.rsplit_once('.').map(|(_, s)| s).unwrap_or("");
                (format!("{pre}@.{suffix}"), Some(rest))
            }
            None => (unit.clone(), None),
        };
        let Some((unit_path, text)) = find_unit(&template, upper, scan) else {
            return Err(RecipeError {
                file: project.recipes_dir().join(format!("{}.toml", recipe.chain.last().expect("chain"))),
                key: "systemd.enable".into(),
                problem: format!("unit {unit:?} is not in the image (looked in {} of the base and the overlays)", UNIT_DIRS.join(", ")),
                fix: "add the package that ships it to debian.packages, or put the unit file in overlays/<layer>/etc/systemd/system/".into(),
            }
            .into());
        };
        let unit_path = unit_path.replacen(
            "/lib/systemd/system/",
            "/usr/lib/systemd/system/",
            usize::from(unit_path.starts_with("/lib/")),
        );
        let install = parse_install(&text);
        if install.wanted_by.is_empty()
            && install.required_by.is_empty()
            && install.alias.is_empty()
            && install.also.is_empty()
        {
            return Err(RecipeError {
                file: project.recipes_dir().join(format!("{}.toml", recipe.chain.last().expect("chain"))),
                key: "systemd.enable".into(),
                problem: format!("unit {unit:?} has no [Install] section, so it cannot be enabled"),
                fix: "remove it from systemd.enable (it is started by its dependencies) or add an [Install] section".into(),
            }
            .into());
        }
        link_unit(upper, &unit, &unit_path, &install);
        to_enable.extend(install.also.iter().cloned());
    }
    Ok(())
}

/// The unit file `template` (a unit name, `foo@.service` for instances): its path in the image
/// and its text, from the upper layer's unit dirs, else from the base's.
fn find_unit(
    template: &str,
    upper: &BTreeMap<String, Upper>,
    scan: &BaseScan,
) -> Option<(String, String)> {
    let found = UNIT_DIRS.iter().find_map(|dir| {
        let p = format!("{dir}/{template}");
        match upper.get(&p) {
            Some(Upper::File { data, .. }) => Some((
                format!("/{dir}/{template}"),
                String::from_utf8_lossy(data).into_owned(),
            )),
            _ => None,
        }
    });
    found.or_else(|| {
        scan.units
            .get(template)
            .map(|(dir, text)| (format!("/{dir}/{template}"), text.clone()))
    })
}

/// The symlinks enabling `unit` (at `unit_path`): `WantedBy=`, `RequiredBy=` and `Alias=`.
fn link_unit(upper: &mut BTreeMap<String, Upper>, unit: &str, unit_path: &str, install: &Install) {
    for t in &install.wanted_by {
        upper.insert(
            format!("etc/systemd/system/{t}.wants/{unit}"),
            Upper::Symlink {
                target: unit_path.to_string(),
                origin: "systemd.enable".into(),
            },
        );
    }
    for t in &install.required_by {
        upper.insert(
            format!("etc/systemd/system/{t}.requires/{unit}"),
            Upper::Symlink {
                target: unit_path.to_string(),
                origin: "systemd.enable".into(),
            },
        );
    }
    for a in &install.alias {
        upper.insert(
            format!("etc/systemd/system/{a}"),
            Upper::Symlink {
                target: unit_path.to_string(),
                origin: "systemd.enable".into(),
            },
        );
    }
}

/// systemd mask: a link to /dev/null per unit.
fn mask_units(recipe: &Recipe, upper: &mut BTreeMap<String, Upper>) {
    for m in &recipe.systemd.mask {
        upper.insert(
            format!("etc/systemd/system/{m}"),
            Upper::Symlink {
                target: "/dev/null".into(),
                origin: "systemd.mask".into(),
            },
        );
    }
}

/// The upper layer with the parent directories its entries need; fails where they conflict
/// with the base's file types.
fn with_parent_dirs(
    scan: &BaseScan,
    mut upper: BTreeMap<String, Upper>,
) -> Result<BTreeMap<String, Upper>> {
    // Parent directories, and conflicts with the base's file types.
    let paths: Vec<String> = upper.keys().cloned().collect();
    for p in &paths {
        let origin = match &upper[p] {
            Upper::Dir => format!("overlay directory {p}"),
            Upper::File { origin, .. }
            | Upper::HostFile { origin, .. }
            | Upper::Symlink { origin, .. } => origin.clone(),
        };
        let mut parent = Path::new(p).parent();
        while let Some(dir) = parent {
            let d = dir.to_string_lossy().into_owned();
            if d.is_empty() {
                break;
            }
            match scan.index.get(&d) {
                Some(BaseKind::Symlink(t)) => bail!(
                    "{origin}: /{p} goes through /{d}, which is a symlink to {t} in the base image; place the file under the symlink's target instead (e.g. usr/{})",
                    p
                ),
                Some(BaseKind::File) | Some(BaseKind::Other) => {
                    bail!("{origin}: /{p} needs /{d} to be a directory, but the base image has a file there")
                }
                Some(BaseKind::Dir) => {}
                None => {
                    if let Some(u) = upper.get(&d) {
                        if !matches!(u, Upper::Dir) {
                            bail!("{origin}: /{p} needs /{d} to be a directory, but the overlay makes it a file or symlink");
                        }
                    } else {
                        upper.insert(d.clone(), Upper::Dir);
                    }
                }
            }
            parent = dir.parent();
        }
        if let Some(BaseKind::Dir) = scan.index.get(p) {
            if !matches!(upper[p], Upper::Dir) {
                bail!("{origin}: /{p} is a directory in the base image and cannot be replaced by a file or symlink");
            }
        }
    }
    Ok(upper)
}

pub(crate) fn tera_error_chain(e: &tera::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[derive(Debug, Default, PartialEq)]
pub struct Install {
    pub wanted_by: Vec<String>,
    pub required_by: Vec<String>,
    pub alias: Vec<String>,
    pub also: Vec<String>,
}

/// Reads the `[Install]` section of a unit file.
pub fn parse_install(text: &str) -> Install {
    let mut inst = Install::default();
    let mut in_install = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_install = line == "[Install]";
            continue;
        }
        if !in_install || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let list = match k.trim() {
            "WantedBy" => &mut inst.wanted_by,
            "RequiredBy" => &mut inst.required_by,
            "Alias" => &mut inst.alias,
            "Also" => &mut inst.also,
            _ => continue,
        };
        list.extend(v.split_whitespace().map(str::to_string));
    }
    inst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_paths_match_files_and_subtrees_only() {
        let r = vec![
            "var/lib/dkms/mok.key".to_string(),
            "usr/share/doc".to_string(),
        ];
        assert!(removed(&r, "var/lib/dkms/mok.key"));
        assert!(!removed(&r, "var/lib/dkms/mok.key.pub"));
        assert!(!removed(&r, "var/lib/dkms"));
        assert!(removed(&r, "usr/share/doc"));
        assert!(removed(&r, "usr/share/doc/systemd/copyright"));
        assert!(!removed(&r, "usr/share/doc-base/x"));
    }

    #[test]
    fn a_dkms_generated_private_key_is_refused_unless_removed() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("recipes");
        fs::create_dir_all(&r).unwrap();
        fs::write(
            r.join("cluster.toml"),
            "[cluster]\nname = \"t\"\nsource_date_epoch = 1700000000\nsuite = \"bookworm\"\n",
        )
        .unwrap();
        fs::write(r.join("base.toml"), "[debian]\npackages = [\"systemd\"]\n").unwrap();
        fs::write(r.join("gpu.toml"), "inherits = \"base\"\n").unwrap();
        let project = crate::project::recipe::load_project(d.path()).unwrap();
        let mut recipe = crate::project::recipe::load_role(&project, "gpu").unwrap();
        let base = d.path().join("base.tar");
        {
            let mut b = tar::Builder::new(fs::File::create(&base).unwrap());
            for (path, data) in [
                ("boot/vmlinuz-6.1.0-1-amd64", &b"kernel"[..]),
                ("boot/initrd.img-6.1.0-1-amd64", b"initrd"),
                (BOOTLOADER_PATH, b"MZ"),
                ("usr/lib/live/boot/9990-main.sh", b"#!/bin/sh\n"),
                ("var/lib/dkms/mok.pub", b"0\x82"),
                ("var/lib/dkms/mok.key", b"-----BEGIN PRIVATE KEY-----\n"),
            ] {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o600);
                h.set_mtime(0);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                b.append_data(&mut h, path, data).unwrap();
            }
            b.finish().unwrap();
        }
        let out = d.path().join("composed.tar");
        let run = |recipe: &Recipe| {
            compose(
                &ComposeInput {
                    project: &project,
                    recipe,
                    build_id: "test",
                    overlays: &[],
                    base_tar: &base,
                    extra: BTreeMap::new(),
                    extra_enable: vec![],
                },
                &out,
            )
        };
        let e = run(&recipe).unwrap_err();
        let re = e
            .downcast_ref::<crate::project::recipe::RecipeError>()
            .expect("a user error");
        assert_eq!(re.key, "debian.sign_modules");
        assert!(
            re.file.ends_with("recipes/gpu.toml"),
            "{}",
            re.file.display()
        );
        assert!(re.fix.contains("sign_modules = true"), "{}", re.fix);
        // Dropped on purpose (debian.remove), the image is made, without it.
        recipe.debian.remove.push("var/lib/dkms/mok.key".into());
        run(&recipe).unwrap();
        let mut ar = tar::Archive::new(fs::File::open(&out).unwrap());
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| norm(&e.unwrap().path().unwrap()))
            .collect();
        assert!(names.iter().any(|n| n == "var/lib/dkms/mok.pub"));
        assert!(!names.iter().any(|n| n == "var/lib/dkms/mok.key"));
    }

    #[test]
    fn install_section_parsed() {
        let t = "[Unit]\nDescription=x\nWantedBy=nope\n[Install]\nWantedBy=multi-user.target\nAlso=a.socket b.service\nAlias=dbus-x.service\n";
        let i = parse_install(t);
        assert_eq!(i.wanted_by, vec!["multi-user.target"]);
        assert_eq!(i.also, vec!["a.socket", "b.service"]);
        assert_eq!(i.alias, vec!["dbus-x.service"]);
    }
}
