//! `kiln proxmox import | list | clone`: the flows on top of [`Client`].

use super::client::{upid, Client};
use super::{ProxmoxError, Settings};
use crate::project::recipe::Node;
use anyhow::{bail, Context, Result};
use reqwest::Method;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What is imported: a verified role build.
#[derive(Debug, Clone, Serialize)]
pub struct BuildInfo {
    pub dir: PathBuf,
    pub role: String,
    pub build_id: String,
    pub cluster: String,
    pub kiln_version: String,
    pub manifest_sha256: String,
    /// `disk.qcow2` (or `disk.raw` when the build has no qcow2).
    pub image_path: PathBuf,
    /// The name in the storage's `import/` directory ([`super::upload_name`]).
    pub image_name: String,
    pub image_sha256: String,
    pub image_size: u64,
}

/// Verifies the signed build directory `dir` with `key` (like `kiln flash`: the signature, then
/// every file's sha256) and reads what the import needs from its manifest.
pub fn load_build(dir: &Path, key: &ed25519_dalek::VerifyingKey) -> Result<BuildInfo> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no build at {}", dir.display()))?;
    let rep = crate::trust::sign::verify_dir(&dir, key)?;
    let sha_of = |n: &str| {
        rep.files
            .iter()
            .find(|f| f.name == n)
            .map(|f| (f.expected_sha256.clone(), f.size.unwrap_or(0)))
    };
    let mpath = dir.join("manifest.json");
    let (manifest_sha256, _) = sha_of("manifest.json").ok_or_else(|| ProxmoxError::Input {
        what: format!(
            "{} lists no manifest.json",
            dir.join("SHA256SUMS").display()
        ),
        fix: "import a role build directory (out/<role>/<build-id>/), not a node directory".into(),
    })?;
    let m: Value = serde_json::from_slice(&crate::sys::util::read_small(
        &mpath,
        crate::trust::limits::MANIFEST,
        "manifest",
    )?)
    .with_context(|| format!("parsing {}", mpath.display()))?;
    let field = |k: &str| -> Result<String> {
        m[k].as_str()
            .map(String::from)
            .with_context(|| format!("{}: no `{k}`", mpath.display()))
    };
    if m["schema"].as_str() != Some("kiln.manifest/1") {
        bail!(ProxmoxError::Input {
            what: format!(
                "{} is not a kiln role manifest (schema {})",
                mpath.display(),
                m["schema"]
            ),
            fix: "import a role build directory made by `kiln build`".into(),
        });
    }
    // kiln disks boot with systemd-boot from their ESP: UEFI only (bios=ovmf).
    if m["disk"]["esp_partuuid"].as_str().is_none() {
        bail!(ProxmoxError::Input {
            what: format!("{}: no EFI system partition (disk.esp_partuuid); kiln templates boot with OVMF only", mpath.display()),
            fix: "rebuild the role with this kiln (`kiln build --role ROLE --force`)".into(),
        });
    }
    let role = field("role")?;
    let build_id = field("build_id")?;
    if crate::pipeline::resolve::BuildId::parse(&build_id).is_none() {
        bail!("{}: build_id {build_id:?} is not a sha256", mpath.display());
    }
    let (file, ext) = if sha_of("disk.qcow2").is_some() {
        ("disk.qcow2", "qcow2")
    } else {
        ("disk.raw", "raw")
    };
    let (image_sha256, image_size) = sha_of(file).ok_or_else(|| ProxmoxError::Input {
        what: format!("{} has neither disk.qcow2 nor disk.raw", dir.display()),
        fix: "rebuild the role".into(),
    })?;
    Ok(BuildInfo {
        image_name: super::upload_name(&role, &build_id, &image_sha256, ext),
        image_path: dir.join(file),
        role,
        build_id,
        cluster: m["cluster"].as_str().unwrap_or("").to_string(),
        kiln_version: m["kiln_version"].as_str().unwrap_or("").to_string(),
        manifest_sha256,
        image_sha256,
        image_size,
        dir,
    })
}

/// One VM as `/cluster/resources?type=vm` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct VmEntry {
    pub vmid: u32,
    pub name: String,
    pub node: String,
    pub tags: Vec<String>,
    pub template: bool,
    pub status: String,
}

/// Every QEMU VM of the cluster.
pub fn cluster_vms(c: &Client) -> Result<Vec<VmEntry>> {
    let v = c.get(&["cluster", "resources"], &[("type", "vm")])?;
    let mut out: Vec<VmEntry> = v
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|e| e["type"].as_str().unwrap_or("qemu") == "qemu")
        .filter_map(|e| {
            Some(VmEntry {
                vmid: as_u32(&e["vmid"])?,
                name: e["name"].as_str().unwrap_or("").to_string(),
                node: e["node"].as_str()?.to_string(),
                tags: super::split_tags(e["tags"].as_str().unwrap_or("")),
                template: as_u32(&e["template"]).unwrap_or(0) == 1,
                status: e["status"].as_str().unwrap_or("").to_string(),
            })
        })
        .collect();
    out.sort_by_key(|e| e.vmid);
    Ok(out)
}

fn as_u32(v: &Value) -> Option<u32> {
    v.as_u64()
        .map(|x| x as u32)
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

fn vm_config(c: &Client, node: &str, vmid: u32) -> Result<Value> {
    c.get(&["nodes", node, "qemu", &vmid.to_string(), "config"], &[])
}

/// The full build id in a kiln VM's description.
fn vm_build_id(c: &Client, vm: &VmEntry) -> Result<Option<String>> {
    let cfg = vm_config(c, &vm.node, vm.vmid)?;
    Ok(super::description_build_id(
        cfg["description"].as_str().unwrap_or(""),
    ))
}

/// Kiln VMs carrying `kind` ([`super::TAG_TEMPLATE`] or [`super::TAG_NODE`]) for this role and
/// build (tags first, then the full build id in the description).
fn kiln_vms(
    c: &Client,
    vms: &[VmEntry],
    kind: &str,
    role: &str,
    build_id: &str,
) -> Result<Vec<VmEntry>> {
    let (rt, bt) = (super::role_tag(role), super::build_tag(build_id));
    let mut out = Vec::new();
    for vm in vms {
        let t = &vm.tags;
        if t.iter().any(|x| x == super::TAG)
            && t.iter().any(|x| x == kind)
            && t.contains(&rt)
            && t.contains(&bt)
            && vm_build_id(c, vm)?.as_deref() == Some(build_id)
        {
            out.push(vm.clone());
        }
    }
    Ok(out)
}

fn next_vmid(c: &Client) -> Result<u32> {
    let v = c.get(&["cluster", "nextid"], &[])?;
    as_u32(&v).with_context(|| format!("GET /cluster/nextid: unexpected answer {v}"))
}

fn wait(c: &Client, v: Value, shown: &str, what: &str) -> Result<()> {
    let id = upid(v, shown)?;
    c.wait_task(&id, what).map(|_| ())
}

/// Stops (if running) and destroys a VM with its disks.
pub fn destroy_vm(c: &Client, vm: &VmEntry) -> Result<()> {
    let id = vm.vmid.to_string();
    if vm.status == "running" {
        let r = c.post(
            &["nodes", &vm.node, "qemu", &id, "status", "stop"],
            &BTreeMap::new(),
        )?;
        wait(c, r, "status/stop", &format!("stop VM {id}"))?;
    }
    let params = BTreeMap::from([
        ("destroy-unreferenced-disks".to_string(), "1".to_string()),
        ("purge".to_string(), "1".to_string()),
    ]);
    let r = c.call(Method::DELETE, &["nodes", &vm.node, "qemu", &id], &params)?;
    wait(c, r, "qemu/destroy", &format!("destroy VM {id}"))
}

fn delete_volume(c: &Client, node: &str, storage: &str, volid: &str) -> Result<()> {
    let r = c.call(
        Method::DELETE,
        &["nodes", node, "storage", storage, "content", volid],
        &BTreeMap::new(),
    )?;
    if r.as_str().is_some_and(|s| s.starts_with("UPID:")) {
        wait(c, r, "content/delete", &format!("delete {volid}"))?;
    }
    Ok(())
}

/// Removes what a failed run created; returns one line per action for the error message.
/// The VM is only removed if it carries the name this run gave it (never someone else's VM
/// that took the id in between).
fn cleanup(c: &Client, vm: Option<(u32, &str)>, volume: Option<(&str, &str, &str)>) -> Vec<String> {
    let mut notes = Vec::new();
    if let Some((id, name)) = vm {
        match cluster_vms(c).map(|v| v.into_iter().find(|e| e.vmid == id)) {
            Ok(Some(vm)) if vm.name != name => notes.push(format!(
                "VM {id} is {:?}, not the {name:?} this run made: left alone",
                vm.name
            )),
            Ok(Some(vm)) => match destroy_vm(c, &vm) {
                Ok(()) => notes.push(format!("removed VM {id}")),
                Err(e) => notes.push(format!(
                    "could not remove VM {id} ({e:#}); remove it by hand: qm destroy {id} --purge"
                )),
            },
            Ok(None) => notes.push(format!("VM {id} was not created")),
            Err(e) => notes.push(format!("could not check for VM {id}: {e:#}")),
        }
    }
    if let Some((node, storage, volid)) = volume {
        match delete_volume(c, node, storage, volid) {
            Ok(()) => notes.push(format!("removed the uploaded {volid}")),
            Err(e) => notes.push(format!(
                "could not remove {volid} ({e:#}); remove it by hand: pvesm free {volid}"
            )),
        }
    }
    notes
}

/// The parameters of `POST /nodes/{node}/qemu` for a role template.
pub fn create_params(s: &Settings, b: &BuildInfo, vmid: u32) -> BTreeMap<String, String> {
    let st = &s.storage;
    let p = [
        ("agent", "enabled=1".to_string()),
        ("bios", "ovmf".into()),
        ("boot", "order=scsi0".into()),
        ("cores", s.cores.to_string()),
        ("description", super::template_description(b)),
        ("efidisk0", format!("{st}:1,efitype=4m,pre-enrolled-keys=0")),
        ("ide2", format!("{st}:cloudinit")),
        ("memory", s.memory.to_string()),
        ("name", super::template_name(&b.role, &b.build_id)),
        ("net0", format!("virtio,bridge={}", s.bridge)),
        ("ostype", "l26".into()),
        (
            "scsi0",
            format!(
                "{st}:0,import-from={}:import/{}",
                s.import_storage, b.image_name
            ),
        ),
        ("scsihw", "virtio-scsi-pci".into()),
        ("serial0", "socket".into()),
        ("tags", super::template_tags(&b.role, &b.build_id)),
        ("vga", "serial0".into()),
        ("vmid", vmid.to_string()),
    ];
    p.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// Options of `kiln proxmox import`.
#[derive(Debug, Default, Clone)]
pub struct ImportOptions {
    pub vmid: Option<u32>,
    pub replace: bool,
    /// Let PVE download the image from this URL instead of uploading it.
    pub url: Option<String>,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    pub role: String,
    pub build_id: String,
    pub node: String,
    pub vmid: u32,
    pub name: String,
    /// `created`, `replaced` or `exists`.
    pub state: String,
    pub volume: String,
    /// `uploaded`, `downloaded`, `reused` or `none`.
    pub image: String,
}

/// Imports a verified build as a template (see the module docs and docs/guide/proxmox.md).
pub fn import(c: &Client, s: &Settings, b: &BuildInfo, o: &ImportOptions) -> Result<ImportReport> {
    check_version(c, s)?;
    let name = super::template_name(&b.role, &b.build_id);
    let volid = format!("{}:import/{}", s.import_storage, b.image_name);
    let replaced = match clear_previous(c, s, b, o)? {
        Previous::Template(vm) => {
            return Ok(ImportReport {
                role: b.role.clone(),
                build_id: b.build_id.clone(),
                node: vm.node.clone(),
                vmid: vm.vmid,
                name: vm.name.clone(),
                state: "exists".into(),
                volume: volid,
                image: "none".into(),
            });
        }
        Previous::Cleared { replaced } => replaced,
    };
    let image = put_image(c, s, b, o, &volid)?;
    let ours =
        (image != "reused").then_some((s.node.as_str(), s.import_storage.as_str(), volid.as_str()));
    let vmid = create_template(c, s, b, o, &name, ours)?;
    Ok(ImportReport {
        role: b.role.clone(),
        build_id: b.build_id.clone(),
        node: s.node.clone(),
        vmid,
        name,
        state: if replaced { "replaced" } else { "created" }.into(),
        volume: volid,
        image: image.into(),
    })
}

/// Imports need PVE 8.4 or later.
fn check_version(c: &Client, s: &Settings) -> Result<()> {
    let (major, minor, full) = c.version()?;
    if (major, minor) < (8, 4) {
        bail!(ProxmoxError::TooOld {
            version: full,
            url: s.api.to_string(),
        });
    }
    Ok(())
}

/// What earlier imports of the build left on the node.
enum Previous {
    /// Its template (kept: no --replace).
    Template(VmEntry),
    /// Nothing, or VMs that were removed (`replaced`).
    Cleared { replaced: bool },
}

/// Removes the VMs of this build on the node: with --replace its template, and a VM an
/// interrupted import left before it became a template; without --replace a template stops the
/// import.
fn clear_previous(c: &Client, s: &Settings, b: &BuildInfo, o: &ImportOptions) -> Result<Previous> {
    let vms = cluster_vms(c)?;
    let mut replaced = false;
    // Per node: with local storage every node that clones needs its own template.
    let on_node: Vec<VmEntry> = vms.into_iter().filter(|v| v.node == s.node).collect();
    for vm in kiln_vms(c, &on_node, super::TAG_TEMPLATE, &b.role, &b.build_id)? {
        if vm.template && !o.replace {
            return Ok(Previous::Template(vm));
        }
        // --replace, or a VM an interrupted import left before it became a template.
        tracing::info!(
            vmid = vm.vmid,
            "destroying {} ({})",
            vm.name,
            if vm.template {
                "--replace"
            } else {
                "left by an interrupted import"
            }
        );
        destroy_vm(c, &vm).with_context(|| format!("removing VM {} ({})", vm.vmid, vm.name))?;
        replaced = true;
    }
    Ok(Previous::Cleared { replaced })
}

/// The image: reuse a volume with this name (the name carries the sha256 PVE verified at
/// upload), else upload it or let PVE download it. Returns `reused`, `uploaded` or
/// `downloaded`.
fn put_image(
    c: &Client,
    s: &Settings,
    b: &BuildInfo,
    o: &ImportOptions,
    volid: &str,
) -> Result<&'static str> {
    let content = c.get(
        &["nodes", &s.node, "storage", &s.import_storage, "content"],
        &[("content", "import")],
    )?;
    let present = content
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v["volid"].as_str() == Some(volid)));
    if present {
        return Ok("reused");
    }
    let (r, shown) = match &o.url {
        Some(url) => {
            let p = BTreeMap::from([
                ("checksum".to_string(), b.image_sha256.clone()),
                ("checksum-algorithm".to_string(), "sha256".to_string()),
                ("content".to_string(), "import".to_string()),
                ("filename".to_string(), b.image_name.clone()),
                ("url".to_string(), url.clone()),
            ]);
            (
                c.post(
                    &[
                        "nodes",
                        &s.node,
                        "storage",
                        &s.import_storage,
                        "download-url",
                    ],
                    &p,
                ),
                "download-url",
            )
        }
        None => (
            c.upload(
                &s.node,
                &s.import_storage,
                "import",
                &b.image_path,
                &b.image_name,
                &b.image_sha256,
            )
            .map(Value::String),
            "upload",
        ),
    };
    let done = r.and_then(|v| wait(c, v, shown, &format!("{shown} of {}", b.image_name)));
    if let Err(e) = done {
        // The task removes its own partial file; a failed request created nothing.
        return Err(e.context(format!(
            "putting {} into storage {} on node {}",
            b.image_name, s.import_storage, s.node
        )));
    }
    Ok(if o.url.is_some() {
        "downloaded"
    } else {
        "uploaded"
    })
}

/// Creates the VM (`o.vmid`, else the next free id) and converts it to a template; on failure
/// removes what this run made (the VM, and the image volume when it is `ours`). Returns the
/// VM id.
fn create_template(
    c: &Client,
    s: &Settings,
    b: &BuildInfo,
    o: &ImportOptions,
    name: &str,
    ours: Option<(&str, &str, &str)>,
) -> Result<u32> {
    let vmid = match o.vmid {
        Some(v) => v,
        None => match next_vmid(c) {
            Ok(v) => v,
            Err(e) => return Err(fail(e, cleanup(c, None, ours))),
        },
    };
    let params = create_params(s, b, vmid);
    let created = c
        .post(&["nodes", &s.node, "qemu"], &params)
        .and_then(|r| wait(c, r, "qemu/create", &format!("create VM {vmid} ({name})")));
    if let Err(e) = created {
        // A request PVE rejected (4xx) created nothing; a failed task, a server error or a lost
        // answer may have left the VM.
        let vm = (!rejected_4xx(&e)).then_some((vmid, name));
        return Err(fail(e, cleanup(c, vm, ours)));
    }
    let templ = c
        .post(
            &["nodes", &s.node, "qemu", &vmid.to_string(), "template"],
            &BTreeMap::new(),
        )
        .and_then(|r| {
            wait(
                c,
                r,
                "qemu/template",
                &format!("convert VM {vmid} to a template"),
            )
        });
    if let Err(e) = templ {
        return Err(fail(e, cleanup(c, Some((vmid, name)), ours)));
    }
    Ok(vmid)
}

/// Proxmox refused the request itself (4xx): nothing was done.
fn rejected_4xx(e: &anyhow::Error) -> bool {
    e.chain().any(|x| {
        matches!(x.downcast_ref::<ProxmoxError>(), Some(ProxmoxError::Rejected { status, .. }) if *status < 500)
    })
}

fn fail(e: anyhow::Error, notes: Vec<String>) -> anyhow::Error {
    if notes.is_empty() {
        e
    } else {
        e.context(format!("import failed; cleaned up: {}", notes.join("; ")))
    }
}

/// A kiln VM as `kiln proxmox list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub vmid: u32,
    pub node: String,
    pub name: String,
    /// `template` or `node`.
    pub kind: String,
    pub role: String,
    /// The full build id from the description (empty if it is missing).
    pub build_id: String,
    pub status: String,
}

/// Every VM tagged `kiln` (templates first, then node VMs; by vmid).
pub fn list(c: &Client) -> Result<Vec<Listed>> {
    let mut out = Vec::new();
    for vm in cluster_vms(c)? {
        if !vm.tags.iter().any(|t| t == super::TAG) {
            continue;
        }
        let kind = if vm.tags.iter().any(|t| t == super::TAG_TEMPLATE) {
            "template"
        } else if vm.tags.iter().any(|t| t == super::TAG_NODE) {
            "node"
        } else {
            continue;
        };
        let role = vm
            .tags
            .iter()
            .find_map(|t| t.strip_prefix("kiln-role-"))
            .unwrap_or("")
            .to_string();
        out.push(Listed {
            build_id: vm_build_id(c, &vm)?.unwrap_or_default(),
            vmid: vm.vmid,
            node: vm.node,
            name: vm.name,
            kind: kind.into(),
            role,
            status: if vm.template {
                "template".into()
            } else {
                vm.status
            },
        });
    }
    out.sort_by_key(|a| (a.kind != "template", a.vmid));
    Ok(out)
}

/// Options of `kiln proxmox clone`.
#[derive(Debug, Default, Clone)]
pub struct CloneOptions {
    pub build_id: String,
    pub vmid: Option<u32>,
    pub replace: bool,
    /// `cicustom` value (e.g. `user=local:snippets/worker-1.yaml`), passed verbatim.
    pub cicustom: Option<String>,
}

/// What a clone did.
#[derive(Debug, Clone, Serialize)]
pub struct CloneReport {
    pub hostname: String,
    pub role: String,
    pub build_id: String,
    pub template_vmid: u32,
    pub node: String,
    pub vmid: u32,
    /// `created`, `replaced` or `exists`.
    pub state: String,
}

/// The cloud-init settings of an inventory node (`PUT /nodes/{node}/qemu/{vmid}/config`).
pub fn clone_config(
    s: &Settings,
    n: &Node,
    domain: Option<&str>,
    ssh_keys: &[String],
    build_id: &str,
    cicustom: Option<&str>,
) -> BTreeMap<String, String> {
    let mut p = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        p.insert(k.to_string(), v);
    };
    put("ciuser", "root".into());
    put(
        "description",
        format!(
            "kiln node\nhostname: {}\nrole: {}\nmac: {}\nkiln-build-id: {build_id}\n",
            n.hostname, n.role, n.mac
        ),
    );
    put(
        "net0",
        format!("virtio={},bridge={}", n.mac.to_ascii_uppercase(), s.bridge),
    );
    let ip = if n.address == "dhcp" {
        "ip=dhcp".to_string()
    } else {
        match &n.gateway {
            Some(gw) => format!("ip={},gw={gw}", n.address),
            None => format!("ip={}", n.address),
        }
    };
    put("ipconfig0", ip);
    if !n.dns.is_empty() {
        put("nameserver", n.dns.join(" "));
    }
    if let Some(d) = domain {
        put("searchdomain", d.to_string());
    }
    if !ssh_keys.is_empty() {
        put(
            "sshkeys",
            super::pve_urlencode(&(ssh_keys.join("\n") + "\n")),
        );
    }
    if let Some(c) = cicustom {
        put("cicustom", c.to_string());
    }
    put("tags", super::node_tags(&n.role, build_id));
    p
}

/// Full-clones the role template of `n` into a VM named after the host, with its cloud-init
/// settings (MAC, address, DNS, SSH keys).
pub fn clone_node(
    c: &Client,
    s: &Settings,
    n: &Node,
    domain: Option<&str>,
    ssh_keys: &[String],
    o: &CloneOptions,
) -> Result<CloneReport> {
    let vms = cluster_vms(c)?;
    let mut templates: Vec<VmEntry> = kiln_vms(c, &vms, super::TAG_TEMPLATE, &n.role, &o.build_id)?
        .into_iter()
        .filter(|v| v.template)
        .collect();
    // The template on the target node first (a clone to another node needs shared storage).
    templates.sort_by_key(|v| (v.node != s.node, v.vmid));
    let Some(t) = templates.first() else {
        bail!(ProxmoxError::Input {
            what: format!(
                "no kiln template of role {} build {} on the Proxmox cluster",
                n.role,
                super::short(&o.build_id)
            ),
            fix: format!(
                "import it first: `kiln proxmox import --role {}` (or pass --build-id of an imported build; `kiln proxmox list` shows them)",
                n.role
            ),
        });
    };
    let mut replaced = false;
    for vm in vms.iter().filter(|v| v.name == n.hostname) {
        let kiln_node = vm.tags.iter().any(|t| t == super::TAG_NODE);
        if !kiln_node {
            bail!(ProxmoxError::Input {
                what: format!(
                    "VM {} on {} is already named {} and was not made by kiln",
                    vm.vmid, vm.node, n.hostname
                ),
                fix: "rename or remove it; kiln never touches VMs it did not create".into(),
            });
        }
        let same = vm_build_id(c, vm)?.as_deref() == Some(o.build_id.as_str());
        if same && !o.replace {
            return Ok(CloneReport {
                hostname: n.hostname.clone(),
                role: n.role.clone(),
                build_id: o.build_id.clone(),
                template_vmid: t.vmid,
                node: vm.node.clone(),
                vmid: vm.vmid,
                state: "exists".into(),
            });
        }
        if !o.replace {
            bail!(ProxmoxError::Input {
                what: format!(
                    "VM {} ({}) runs another build of role {}",
                    vm.vmid, n.hostname, n.role
                ),
                fix: "pass --replace to destroy it and clone the new template (the node is recreated from the image, as kiln intends)".into(),
            });
        }
        destroy_vm(c, vm).with_context(|| format!("removing VM {} ({})", vm.vmid, vm.name))?;
        replaced = true;
    }
    let newid = match o.vmid {
        Some(v) => v,
        None => next_vmid(c)?,
    };
    let tid = t.vmid.to_string();
    let mut params = BTreeMap::from([
        ("full".to_string(), "1".to_string()),
        ("name".to_string(), n.hostname.clone()),
        ("newid".to_string(), newid.to_string()),
        ("storage".to_string(), s.storage.clone()),
    ]);
    if t.node != s.node {
        params.insert("target".into(), s.node.clone());
    }
    let r = c
        .post(&["nodes", &t.node, "qemu", &tid, "clone"], &params)
        .and_then(|r| {
            wait(
                c,
                r,
                "qemu/clone",
                &format!("clone template {tid} to VM {newid} ({})", n.hostname),
            )
        });
    if let Err(e) = r {
        let vm = (!rejected_4xx(&e)).then_some((newid, n.hostname.as_str()));
        return Err(fail(e, cleanup(c, vm, None)));
    }
    let cfg = clone_config(s, n, domain, ssh_keys, &o.build_id, o.cicustom.as_deref());
    let r = c.call(
        Method::PUT,
        &["nodes", &s.node, "qemu", &newid.to_string(), "config"],
        &cfg,
    );
    if let Err(e) = r {
        return Err(fail(
            e,
            cleanup(c, Some((newid, n.hostname.as_str())), None),
        ));
    }
    Ok(CloneReport {
        hostname: n.hostname.clone(),
        role: n.role.clone(),
        build_id: o.build_id.clone(),
        template_vmid: t.vmid,
        node: s.node.clone(),
        vmid: newid,
        state: if replaced { "replaced" } else { "created" }.into(),
    })
}
