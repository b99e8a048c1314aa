//! Seed stage: per-node cloud-init NoCloud files (`meta-data`, `user-data`, `network-config`,
//! optional `vendor-data`), rendered with tera and validated before anything is written.
//!
//! Templates come from the most specific place that has one:
//! `overlays/seed/<hostname>/<file>.tera`, then `overlays/seed/<role>/<file>.tera`, then
//! `overlays/seed/<file>.tera`, then kiln's built-in default (`vendor-data` has no default: it is
//! only written when the user provides a template).

use crate::project::confine;
use crate::project::overlays;
use crate::project::recipe::{Cluster, Node, Project, RecipeError};
use crate::project::template;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// The most bytes one seed file may render (a NoCloud seed is a few KiB).
pub const MAX_SEED_FILE: usize = 1 << 20;

/// The NoCloud file names, in the order they are written.
pub const FILES: [&str; 4] = ["meta-data", "user-data", "network-config", "vendor-data"];

/// The node's identity beside the NoCloud files (cloud-init ignores them; kiln's initramfs
/// script reads them, see pipeline::state): derived from keys/node-identity.key by
/// [`crate::trust::identity::derive`]. Flat names, so the FAT volume, the ISO and `kiln serve`
/// carry them as they carry user-data.
pub const IDENTITY_FILES: [&str; 5] = [
    "kiln-machine-id",
    "kiln-node-password",
    "kiln-ssh-host-ed25519-key",
    "kiln-ssh-host-ed25519-key.pub",
    "kiln-update-key",
];

const DEFAULT_META_DATA: &str = include_str!("assets/seed/meta-data.tera");
const DEFAULT_USER_DATA: &str = include_str!("assets/seed/user-data.tera");
const DEFAULT_NETWORK_CONFIG: &str = include_str!("assets/seed/network-config.tera");

/// One node's rendered seed: file name → contents, in [`FILES`] order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Seed {
    pub instance_id: String,
    pub files: BTreeMap<String, String>,
    /// Where each file's template came from (`overlays/…` or `built-in`).
    pub sources: BTreeMap<String, String>,
    /// The seed carries secrets: always, since every seed holds its node's identity (SSH host
    /// key, k3s node password); its files are private (0600).
    pub contains_secrets: bool,
    /// The seed also carries a secret of the whole cluster: the k3s token
    /// (`token_delivery = "seed"`). `kiln serve --refuse-secret-builds` refuses such seeds.
    pub cluster_secrets: bool,
}

impl Seed {
    /// Files in NoCloud order (meta-data first), as (name, bytes).
    pub fn ordered(&self) -> Vec<(&str, &[u8])> {
        FILES
            .iter()
            .chain(IDENTITY_FILES.iter())
            .chain(crate::trust::k3s_ca::SEED_FILES.iter())
            .filter_map(|n| self.files.get(*n).map(|c| (*n, c.as_bytes())))
            .collect()
    }
}

/// `<hostname>-<12 hex>`: changes with the role build, so cloud-init sees a new instance
/// whenever the node is reflashed with a different image.
pub fn instance_id(build_id: &str, hostname: &str) -> String {
    let h =
        crate::sys::util::sha256_hex(format!("kiln-instance\0{build_id}\0{hostname}").as_bytes());
    format!("{hostname}-{}", &h[..12])
}

#[derive(Serialize)]
struct Ctx<'a> {
    cluster: &'a Cluster,
    node: NodeCtx<'a>,
    nodes: &'a [Node],
    instance_id: &'a str,
    build: BuildCtx<'a>,
    /// Lines of `keys/authorized_keys` (empty if the file is absent).
    ssh_authorized_keys: Vec<String>,
    /// Whether the role runs k3s (the seed links the node's k3s drop-in).
    k3s: bool,
    /// The cluster token, only with `[k3s] token_delivery = "seed"` (written by cloud-init).
    k3s_token: Option<&'a str>,
}

/// The node as templates see it: every field present (`gateway`/`disk` may be null, `dns`
/// empty), plus `fqdn` when the cluster has a domain.
#[derive(Serialize)]
struct NodeCtx<'a> {
    hostname: &'a str,
    mac: &'a str,
    role: &'a str,
    address: &'a str,
    gateway: Option<&'a str>,
    dns: &'a [String],
    disk: Option<&'a str>,
    fqdn: Option<String>,
}

#[derive(Serialize)]
struct BuildCtx<'a> {
    id: &'a str,
    kiln_version: &'a str,
}

/// Reads `keys/authorized_keys` (public: it is in git), one key per non-comment line.
pub fn authorized_keys(project: &Project) -> Result<Vec<String>> {
    let name = crate::project::layout::key::AUTHORIZED_KEYS;
    if confine::key_file(&project.layout(), name)?.is_none() {
        return Ok(vec![]);
    }
    let b = crate::pipeline::resolve::read_key_file(
        project,
        name,
        "(authorized keys)",
        "put one SSH public key per line in keys/authorized_keys",
    )?;
    Ok(String::from_utf8_lossy(&b)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

/// Finds the template for `file`: (path for messages, text).
/// The seed template directories and files are confined to the project (see
/// `project::confine`): a `user-data.tera` or an `overlays/seed/<host>/` that is a symlink
/// out of the project is refused, never rendered.
fn template_for(project: &Project, node: &Node, file: &str) -> Result<Option<(String, String)>> {
    let layout = project.layout();
    for sub in [node.hostname.as_str(), node.role.as_str(), ""] {
        let layer = if sub.is_empty() {
            "seed".to_string()
        } else {
            format!("seed/{sub}")
        };
        let Some(dir) = overlays::overlay_root(project, &layer)? else {
            continue;
        };
        let p = layout.overlays().join(&layer).join(format!("{file}.tera"));
        let by = confine::NamedBy {
            file: &p,
            key: "(template)",
            fix: "make it a regular file inside the project (a symlink may point only inside the project)",
        };
        if let Some(real) = confine::optional_file(&layout, &dir.join(format!("{file}.tera")), by)?
        {
            let text = overlays::read_template(&real)?;
            let rel = p
                .strip_prefix(&project.root)
                .unwrap_or(&p)
                .display()
                .to_string();
            return Ok(Some((rel, text)));
        }
    }
    Ok(match file {
        "meta-data" => Some(("built-in".into(), DEFAULT_META_DATA.into())),
        "user-data" => Some(("built-in".into(), DEFAULT_USER_DATA.into())),
        "network-config" => Some(("built-in".into(), DEFAULT_NETWORK_CONFIG.into())),
        _ => None,
    })
}

/// Renders and validates the seed of `node`, whose role image has build id `build_id`.
pub fn render(
    project: &Project,
    node: &Node,
    build_id: &str,
    mode: crate::project::recipe::K3sMode,
    authorized_keys: &[String],
) -> Result<Seed> {
    let k3s = mode.runs_k3s();
    let iid = instance_id(build_id, &node.hostname);
    let token = match &project.cluster.k3s {
        Some(kc) if k3s && kc.token_delivery == crate::project::recipe::TokenDelivery::Seed => {
            Some(crate::pipeline::resolve::read_token(project)?)
        }
        _ => None,
    };
    let ctx = Ctx {
        cluster: &project.cluster,
        node: NodeCtx {
            hostname: &node.hostname,
            mac: &node.mac,
            role: &node.role,
            address: &node.address,
            gateway: node.gateway.as_deref(),
            dns: &node.dns,
            disk: node.disk.as_deref(),
            fqdn: project
                .cluster
                .section
                .domain
                .as_ref()
                .map(|d| format!("{}.{d}", node.hostname)),
        },
        nodes: &project.cluster.nodes,
        instance_id: &iid,
        build: BuildCtx {
            id: build_id,
            kiln_version: env!("CARGO_PKG_VERSION"),
        },
        ssh_authorized_keys: authorized_keys.to_vec(),
        k3s,
        k3s_token: token.as_deref(),
    };
    let tctx = tera::Context::from_serialize(&ctx).context("building the seed template context")?;
    let mut files = BTreeMap::new();
    let mut sources = BTreeMap::new();
    for file in FILES {
        let Some((source, text)) = template_for(project, node, file)? else {
            continue;
        };
        let where_ = if source == "built-in" {
            PathBuf::from(format!("(built-in {file} template)"))
        } else {
            project.root.join(&source)
        };
        let rendered = template::render(
            &where_,
            &format!("(template for {})", node.hostname),
            &text,
            &tctx,
            MAX_SEED_FILE,
            "fix the template; it sees cluster, node, nodes, instance_id, build.id, ssh_authorized_keys, k3s",
        )?;
        let rendered = if rendered.ends_with('\n') {
            rendered
        } else {
            rendered + "\n"
        };
        validate(file, &rendered, node, &iid).map_err(|(key, problem, fix)| {
            RecipeError::new(
                &where_,
                format!("{} ({})", key, node.hostname),
                problem,
                fix,
            )
        })?;
        files.insert(file.to_string(), rendered);
        sources.insert(file.to_string(), source);
    }
    if let Some(t) = &token {
        if !files.values().any(|f| f.contains(t.as_str())) {
            return Err(RecipeError::new(
                project.layout().cluster_file(),
                "k3s.token_delivery",
                format!(
                    "token_delivery = \"seed\" but the seed of {} does not contain the token (an overridden user-data template dropped it)",
                    node.hostname
                ),
                "write it in user-data with write_files from {{ k3s_token }} (see the built-in template), or set token_delivery = \"image\"",
            )
            .into());
        }
    }
    // The node's identity: the same on every build and reflash, another on every node.
    let secret = crate::pipeline::resolve::read_node_identity(project)?;
    let id = crate::trust::identity::derive(&secret, &project.cluster.section.name, &node.hostname);
    let mut identity = vec![
        (IDENTITY_FILES[0], format!("{}\n", id.machine_id)),
        (
            IDENTITY_FILES[2],
            format!("{}\n", id.ssh_host_key.trim_end()),
        ),
        (IDENTITY_FILES[3], format!("{}\n", id.ssh_host_key_pub)),
    ];
    if k3s {
        identity.push((
            IDENTITY_FILES[1],
            format!("{}\n", id.node_password.as_str()),
        ));
    }
    // With [updates]: the key of the node's signed reports to kiln serve.
    if project.cluster.updates.is_some() {
        identity.push((IDENTITY_FILES[4], format!("{}\n", id.update_key.as_str())));
    }
    for (name, text) in identity {
        files.insert(name.to_string(), text);
        sources.insert(
            name.to_string(),
            "kiln (derived from keys/node-identity.key)".to_string(),
        );
    }
    // A server whose token comes by seed gets the cluster's CAs the same way (its image
    // carries none), for kiln-k3s-ca to hand to k3s before the first start.
    if token.is_some() && mode.is_server() {
        for ((f, bytes), name) in crate::pipeline::resolve::read_k3s_ca(project)?
            .into_iter()
            .zip(crate::trust::k3s_ca::SEED_FILES)
        {
            files.insert(
                name.to_string(),
                String::from_utf8_lossy(&bytes).into_owned(),
            );
            sources.insert(name.to_string(), format!("keys/{}", f.key_name));
        }
    }
    Ok(Seed {
        instance_id: iid,
        files,
        sources,
        // The node password and the SSH host key are secrets of this node; the token, when
        // the seed carries it, is one of the cluster.
        contains_secrets: true,
        cluster_secrets: token.is_some(),
    })
}

type Invalid = (String, String, String);

fn invalid(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> Invalid {
    (key.to_string(), problem.into(), fix.into())
}

/// Checks one rendered file: YAML parses, required keys, network-config v2 keys.
pub fn validate(file: &str, text: &str, node: &Node, iid: &str) -> Result<(), Invalid> {
    let parse = |t: &str| -> Result<serde_yaml::Value, Invalid> {
        crate::project::limits::check_yaml(t, crate::project::limits::SEED_FILE).map_err(|e| {
            invalid(
                "(yaml)",
                format!("rendered {file} is refused: {e}"),
                "make the template render a smaller, flatter document",
            )
        })?;
        serde_yaml::from_str(t).map_err(|e| {
            invalid(
                "(yaml)",
                format!("rendered {file} is not valid YAML: {e}"),
                "fix the template so that it renders valid YAML (check indentation and quoting)",
            )
        })
    };
    match file {
        "meta-data" => {
            let v = parse(text)?;
            let m = v.as_mapping().ok_or_else(|| {
                invalid(
                    "(yaml)",
                    "meta-data must be a YAML mapping",
                    "write `key: value` lines",
                )
            })?;
            match m.get("instance-id") {
                Some(serde_yaml::Value::String(s)) if !s.is_empty() => {
                    if s != iid {
                        tracing::debug!(node = %node.hostname, "meta-data uses its own instance-id {s}");
                    }
                }
                _ => {
                    return Err(invalid(
                        "instance-id",
                        "meta-data has no instance-id (cloud-init requires one)",
                        "add `instance-id: {{ instance_id }}`",
                    ))
                }
            }
        }
        "user-data" | "vendor-data" => {
            let first = text.lines().next().unwrap_or("");
            if first.trim_end() == "#cloud-config" {
                let v = parse(text)?;
                if !(v.is_mapping() || v.is_null()) {
                    return Err(invalid(
                        "(yaml)",
                        format!("{file} is #cloud-config but not a YAML mapping"),
                        "write cloud-config keys (`hostname: …`)",
                    ));
                }
            } else if !(first.starts_with("#!")
                || first.starts_with("#include")
                || first.starts_with("Content-Type:")
                || first.starts_with("#cloud-boothook"))
            {
                return Err(invalid(
                    "(first line)",
                    format!("{file} starts with {first:?}, which cloud-init does not recognise"),
                    "start it with `#cloud-config` (or `#!` for a script)",
                ));
            }
        }
        "network-config" => validate_network(&parse(text)?, node)?,
        _ => {}
    }
    Ok(())
}

const V2_TOP: &[&str] = &[
    "version",
    "renderer",
    "ethernets",
    "bonds",
    "bridges",
    "vlans",
];
const V2_DEVICE: &[&str] = &[
    "match",
    "set-name",
    "wakeonlan",
    "dhcp4",
    "dhcp6",
    "dhcp4-overrides",
    "dhcp6-overrides",
    "accept-ra",
    "addresses",
    "gateway4",
    "gateway6",
    "nameservers",
    "routes",
    "mtu",
    "optional",
    "critical",
    "link-local",
    "macaddress",
    "interfaces",
    "parameters",
    "id",
    "link",
];
const V2_MATCH: &[&str] = &["macaddress", "name", "driver"];
const V2_NAMESERVERS: &[&str] = &["addresses", "search"];
const V2_ROUTE: &[&str] = &[
    "to", "via", "metric", "on-link", "table", "type", "scope", "from",
];

fn str_key(k: &serde_yaml::Value) -> String {
    k.as_str()
        .map(String::from)
        .unwrap_or_else(|| format!("{k:?}"))
}

fn check_keys(m: &serde_yaml::Mapping, allowed: &[&str], at: &str) -> Result<(), Invalid> {
    for k in m.keys() {
        let k = str_key(k);
        if !allowed.contains(&k.as_str()) {
            return Err(invalid(
                &format!("{at}{k}"),
                format!("unknown network-config v2 key {k:?}"),
                format!("use one of: {}", allowed.join(", ")),
            ));
        }
    }
    Ok(())
}

fn validate_network(v: &serde_yaml::Value, node: &Node) -> Result<(), Invalid> {
    let m = v.as_mapping().ok_or_else(|| {
        invalid(
            "(yaml)",
            "network-config must be a YAML mapping",
            "start with `version: 2`",
        )
    })?;
    // Some tools wrap the config in a top-level `network:` key; cloud-init accepts both.
    let m = match m.get("network").and_then(|n| n.as_mapping()) {
        Some(inner) if m.len() == 1 => inner,
        _ => m,
    };
    check_keys(m, V2_TOP, "")?;
    match m.get("version").and_then(|v| v.as_u64()) {
        Some(2) => {}
        _ => {
            return Err(invalid(
                "version",
                "network-config must say `version: 2`",
                "kiln writes network-config v2; add `version: 2`",
            ))
        }
    }
    let mut mac_matched = false;
    for kind in ["ethernets", "bonds", "bridges", "vlans"] {
        let Some(devs) = m.get(kind) else { continue };
        let devs = devs.as_mapping().ok_or_else(|| {
            invalid(
                kind,
                format!("{kind} must be a mapping of id → settings"),
                "indent device ids under it",
            )
        })?;
        for (id, d) in devs {
            let at = format!("{kind}.{}.", str_key(id));
            let d = d.as_mapping().ok_or_else(|| {
                invalid(
                    at.trim_end_matches('.'),
                    "device settings must be a mapping",
                    "indent its keys under the id",
                )
            })?;
            check_keys(d, V2_DEVICE, &at)?;
            if let Some(mt) = d.get("match") {
                let mt = mt.as_mapping().ok_or_else(|| {
                    invalid(
                        &format!("{at}match"),
                        "match must be a mapping",
                        "e.g. `match: {macaddress: \"aa:bb:…\"}`",
                    )
                })?;
                check_keys(mt, V2_MATCH, &format!("{at}match."))?;
                if let Some(mac) = mt.get("macaddress") {
                    let mac = mac.as_str().unwrap_or_default().to_ascii_lowercase();
                    let ok = mac.len() == 17
                        && mac.split(':').count() == 6
                        && mac
                            .split(':')
                            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
                    if !ok {
                        return Err(invalid(
                            &format!("{at}match.macaddress"),
                            format!("{mac:?} is not a MAC address"),
                            "quote it: macaddress: \"aa:bb:cc:dd:ee:ff\"",
                        ));
                    }
                    if let Some(p) = crate::project::inventory::mac_problem(&mac) {
                        return Err(invalid(
                            &format!("{at}match.macaddress"),
                            format!("{mac} {p}"),
                            "match a NIC's own address, e.g. \"{{ node.mac }}\"",
                        ));
                    }
                    mac_matched |= mac == node.mac;
                }
            }
            if let Some(a) = d.get("addresses") {
                let list = a.as_sequence().ok_or_else(|| {
                    invalid(
                        &format!("{at}addresses"),
                        "addresses must be a list",
                        "write addresses: [\"10.0.0.11/24\"]",
                    )
                })?;
                for x in list {
                    let s = x.as_str().unwrap_or_default();
                    // The prefix length within the family's bounds (/33 or /200 are not).
                    if crate::project::net::parse_cidr(s).is_none() {
                        return Err(invalid(
                            &format!("{at}addresses"),
                            format!("{s:?} is not an address in CIDR form"),
                            "write e.g. \"10.0.0.11/24\"",
                        ));
                    }
                }
            }
            for (g, v4) in [("gateway4", true), ("gateway6", false)] {
                if let Some(x) = d.get(g) {
                    let family_ok = x
                        .as_str()
                        .and_then(|s| s.parse::<std::net::IpAddr>().ok())
                        .is_some_and(|ip| ip.is_ipv4() == v4);
                    if !family_ok {
                        let want = if v4 { "an IPv4" } else { "an IPv6" };
                        return Err(invalid(
                            &format!("{at}{g}"),
                            format!("{x:?} is not {want} address"),
                            if v4 {
                                "write e.g. \"10.0.0.1\""
                            } else {
                                "write e.g. \"fd00::1\", or use gateway4 for IPv4"
                            },
                        ));
                    }
                }
            }
            if let Some(ns) = d.get("nameservers") {
                let ns = ns.as_mapping().ok_or_else(|| {
                    invalid(
                        &format!("{at}nameservers"),
                        "nameservers must be a mapping",
                        "use nameservers: {addresses: [...], search: [...]}",
                    )
                })?;
                check_keys(ns, V2_NAMESERVERS, &format!("{at}nameservers."))?;
            }
            if let Some(routes) = d.get("routes") {
                for (i, r) in routes.as_sequence().into_iter().flatten().enumerate() {
                    let r = r.as_mapping().ok_or_else(|| {
                        invalid(
                            &format!("{at}routes[{i}]"),
                            "a route must be a mapping",
                            "write {to: …, via: …}",
                        )
                    })?;
                    check_keys(r, V2_ROUTE, &format!("{at}routes[{i}]."))?;
                }
            }
        }
    }
    if !mac_matched && !node.mac.is_empty() {
        return Err(invalid(
            "ethernets",
            format!("no device matches this node's MAC {}", node.mac),
            "match the boot NIC with `match: {macaddress: \"{{ node.mac }}\"}`",
        ));
    }
    Ok(())
}

/// The seeds of the named inventory nodes (every node for none), in the order asked, each for
/// its role's current build id; nothing is written.
pub fn render_nodes<'p>(
    project: &'p Project,
    hostnames: &[String],
) -> Result<Vec<(&'p Node, Seed)>> {
    let nodes = project.nodes(hostnames)?;
    let keys = authorized_keys(project)?;
    let mut by_role = BTreeMap::new();
    let mut seeds = Vec::new();
    for n in nodes {
        if !by_role.contains_key(&n.role) {
            by_role.insert(
                n.role.clone(),
                crate::pipeline::resolve::resolve(project, &n.role)?,
            );
        }
        let r = &by_role[&n.role];
        let s = render(project, n, &r.build_id, r.recipe.k3s.mode, &keys)?;
        seeds.push((n, s));
    }
    Ok(seeds)
}

/// Writes a seed into `dir/<hostname>/` (made if missing), each file atomically, private
/// (0600) when it carries a secret; returns that directory.
pub fn write_node_dir(dir: &Path, hostname: &str, seed: &Seed) -> Result<std::path::PathBuf> {
    let d = dir.join(hostname);
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    let mode = if seed.contains_secrets { 0o600 } else { 0o644 };
    for (name, bytes) in seed.ordered() {
        crate::sys::util::write_atomic_mode(&d.join(name), bytes, mode)?;
    }
    Ok(d)
}

/// Writes the seed files into `dir` (which must exist).
pub fn write_files(seed: &Seed, dir: &Path) -> Result<()> {
    for (name, bytes) in seed.ordered() {
        let p = dir.join(name);
        fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
