//! Recipe stage: parse `recipes/*.toml`, merge role inheritance, validate the inventory.
//!
//! Every user error is a [`RecipeError`] naming the file, the key and how to fix it; the CLI
//! maps it to exit status 2. Nothing is written before this stage has accepted the input.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// A user-facing recipe/inventory error: what, where (file and key), how to fix.
#[derive(Debug, thiserror::Error)]
#[error("{}: {key}: {problem}\n  fix: {fix}", file.display())]
pub struct RecipeError {
    pub file: PathBuf,
    pub key: String,
    pub problem: String,
    pub fix: String,
}

fn err(
    file: &Path,
    key: impl Into<String>,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> RecipeError {
    RecipeError {
        file: file.to_path_buf(),
        key: key.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

type Result<T> = std::result::Result<T, RecipeError>;

/// The earliest SOURCE_DATE_EPOCH kiln accepts: FAT (the ESP) cannot store times before 1980.
pub const MIN_SOURCE_DATE_EPOCH: i64 = 315_532_800;

// ---------------------------------------------------------------------------------------------
// File schemas (what users write)

/// `recipes/<name>.toml`: the base or a role.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    /// Recipe this one extends (file name without `.toml`), usually `"base"`.
    pub inherits: Option<String>,
    pub description: Option<String>,
    #[serde(default)]
    pub debian: DebianFile,
    #[serde(default)]
    pub boot: BootFile,
    #[serde(default)]
    pub systemd: SystemdFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebianFile {
    /// mmdebstrap variant (`minbase`, `important`, `standard`, ...).
    pub variant: Option<String>,
    /// Optional mirror URL; by default mmdebstrap uses the host's apt sources.
    pub mirror: Option<String>,
    #[serde(default)]
    pub components: Vec<String>,
    #[serde(default)]
    pub packages: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootFile {
    /// Extra kernel command-line arguments.
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// Size of the EFI system partition in MiB (0 or absent = sized to fit).
    pub esp_size_mib: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemdFile {
    /// Units to enable (symlinks made from their `[Install]` section, like `systemctl enable`).
    #[serde(default)]
    pub enable: Vec<String>,
    /// Units to mask (symlinked to /dev/null).
    #[serde(default)]
    pub mask: Vec<String>,
}

/// `recipes/cluster.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    cluster: ClusterSection,
    #[serde(default)]
    nodes: Vec<Node>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Cluster name (DNS label).
    pub name: String,
    /// Fixed time for every timestamp in every artifact.
    pub source_date_epoch: i64,
    /// Debian suite for every role (e.g. `bookworm`).
    pub suite: String,
    /// Address clients use to reach the API servers (VIP or first master), optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_endpoint: Option<String>,
    /// DNS domain of the nodes, optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// One machine of the inventory.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub hostname: String,
    /// MAC address of the boot NIC, normalised to lower-case `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub role: String,
    /// `dhcp` or a static address in CIDR form (`10.0.0.11/24`).
    #[serde(default = "dhcp")]
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<String>,
    /// Target disk for flashing (e.g. `/dev/sda`), optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
}

fn dhcp() -> String {
    "dhcp".into()
}

// ---------------------------------------------------------------------------------------------
// Merged, validated values (what the pipeline consumes; serialised canonically for the build id)

#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    #[serde(flatten)]
    pub section: ClusterSection,
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Recipe {
    pub role: String,
    /// Inheritance chain, root first (e.g. `["base", "worker"]`).
    pub chain: Vec<String>,
    pub description: String,
    pub debian: Debian,
    pub boot: Boot,
    pub systemd: Systemd,
}

#[derive(Debug, Clone, Serialize)]
pub struct Debian {
    pub suite: String,
    pub variant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    pub components: Vec<String>,
    pub packages: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Boot {
    pub cmdline: Vec<String>,
    pub esp_size_mib: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Systemd {
    pub enable: Vec<String>,
    pub mask: Vec<String>,
}

/// The project as loaded: cluster + every role recipe available.
#[derive(Debug, Clone)]
pub struct Project {
    pub root: PathBuf,
    pub cluster: Cluster,
}

impl Project {
    pub fn recipes_dir(&self) -> PathBuf {
        self.root.join("recipes")
    }
    pub fn overlays_dir(&self) -> PathBuf {
        self.root.join("overlays")
    }
}

/// Roles kiln knows how to build; a recipe file for each lives in `recipes/`.
pub const ROLES: &[&str] = &["master", "worker", "gpu", "storage"];

/// Loads and validates `recipes/cluster.toml` and every role it references.
pub fn load_project(root: &Path) -> Result<Project> {
    let path = root.join("recipes").join("cluster.toml");
    let file: ClusterFile = parse_toml(&path)?;
    let cluster = validate_cluster(root, &path, file)?;
    Ok(Project {
        root: root.to_path_buf(),
        cluster,
    })
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| {
        err(
            path,
            "(file)",
            format!("cannot read: {e}"),
            "create the file (see README: Recipes) or run kiln from the project directory (--dir)",
        )
    })
}

fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read(path)?;
    toml::from_str(&text).map_err(|e| {
        let (line, col, snippet) = match e.span() {
            Some(span) => {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = span.start - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
                let snippet = text[span.start.min(text.len())..span.end.min(text.len())].trim().to_string();
                (line, col, snippet)
            }
            None => (0, 0, String::new()),
        };
        let msg = e.message().to_string();
        let key = if snippet.is_empty() || snippet.len() > 60 {
            format!("line {line}, column {col}")
        } else {
            format!("`{snippet}` (line {line}, column {col})")
        };
        let fix = if msg.contains("unknown field") {
            "remove or rename the key; the accepted keys are listed in the message and in docs/recipes.md"
        } else if msg.contains("missing field") {
            "add the missing key (see docs/recipes.md)"
        } else {
            "correct the TOML syntax or value type at that position (see docs/recipes.md)"
        };
        err(path, key, msg, fix)
    })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Normalises a MAC (`AA-BB-CC-DD-EE-FF`, `aa:bb:...`) to `aa:bb:cc:dd:ee:ff`.
pub fn normalize_mac(mac: &str) -> Option<String> {
    let parts: Vec<&str> = mac.split([':', '-']).collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return None;
    }
    Some(parts.join(":").to_ascii_lowercase())
}

fn validate_cluster(root: &Path, path: &Path, file: ClusterFile) -> Result<Cluster> {
    let c = file.cluster;
    if !is_dns_label(&c.name) {
        return Err(err(
            path,
            "cluster.name",
            format!("{:?} is not a valid name", c.name),
            "use lower-case letters, digits and '-', at most 63 characters",
        ));
    }
    if c.source_date_epoch < MIN_SOURCE_DATE_EPOCH {
        return Err(err(path, "cluster.source_date_epoch", format!("{} is before 1980-01-01", c.source_date_epoch), format!("use a Unix time >= {MIN_SOURCE_DATE_EPOCH}, e.g. the date of your last commit: `git log -1 --format=%ct`")));
    }
    if c.suite.is_empty()
        || !c
            .suite
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(err(
            path,
            "cluster.suite",
            format!("{:?} is not a Debian suite name", c.suite),
            "use a suite such as \"bookworm\"",
        ));
    }
    if let Some(ep) = &c.api_endpoint {
        let bad = ep.is_empty()
            || ep.contains(['/', ' '])
            || (ep.contains(':') && ep.parse::<IpAddr>().is_err());
        if bad {
            return Err(err(
                path,
                "cluster.api_endpoint",
                format!("{ep:?} is not a host name or IP address"),
                "give an IP (\"10.0.0.10\") or a DNS name, without scheme or port",
            ));
        }
    }
    let mut nodes = Vec::with_capacity(file.nodes.len());
    let mut hostnames = BTreeSet::new();
    let mut macs = BTreeMap::new();
    for (i, mut n) in file.nodes.into_iter().enumerate() {
        let key = |k: &str| format!("nodes[{i}].{k}");
        if !is_dns_label(&n.hostname) {
            return Err(err(
                path,
                key("hostname"),
                format!("{:?} is not a valid host name", n.hostname),
                "use lower-case letters, digits and '-', at most 63 characters",
            ));
        }
        if !hostnames.insert(n.hostname.clone()) {
            return Err(err(
                path,
                key("hostname"),
                format!("{:?} appears twice in the inventory", n.hostname),
                "give every node a unique hostname",
            ));
        }
        let mac = normalize_mac(&n.mac).ok_or_else(|| {
            err(
                path,
                key("mac"),
                format!("{:?} is not a MAC address", n.mac),
                "write six hex byte pairs separated by ':' like \"52:54:00:12:34:56\"",
            )
        })?;
        if let Some(other) = macs.insert(mac.clone(), n.hostname.clone()) {
            return Err(err(
                path,
                key("mac"),
                format!("{mac} is already used by node {other:?}"),
                "every node needs its own boot NIC MAC",
            ));
        }
        n.mac = mac;
        if !ROLES.contains(&n.role.as_str()) {
            return Err(err(
                path,
                key("role"),
                format!("unknown role {:?}", n.role),
                format!("use one of {}", ROLES.join(", ")),
            ));
        }
        let role_file = root.join("recipes").join(format!("{}.toml", n.role));
        if !role_file.is_file() {
            return Err(err(
                path,
                key("role"),
                format!(
                    "role {:?} has no recipe file {}",
                    n.role,
                    role_file.display()
                ),
                format!("create recipes/{}.toml with `inherits = \"base\"`", n.role),
            ));
        }
        if n.address != "dhcp" {
            let ok = n
                .address
                .split_once('/')
                .and_then(|(ip, len)| Some((ip.parse::<IpAddr>().ok()?, len.parse::<u8>().ok()?)))
                .is_some_and(|(ip, len)| len <= if ip.is_ipv4() { 32 } else { 128 });
            if !ok {
                return Err(err(
                    path,
                    key("address"),
                    format!(
                        "{:?} is neither \"dhcp\" nor an address in CIDR form",
                        n.address
                    ),
                    "write \"dhcp\" or e.g. \"10.0.0.11/24\"",
                ));
            }
        }
        if let Some(gw) = &n.gateway {
            if gw.parse::<IpAddr>().is_err() {
                return Err(err(
                    path,
                    key("gateway"),
                    format!("{gw:?} is not an IP address"),
                    "write e.g. \"10.0.0.1\"",
                ));
            }
            if n.address == "dhcp" {
                return Err(err(
                    path,
                    key("gateway"),
                    "a gateway is set but the address is dhcp",
                    "remove gateway, or give a static address",
                ));
            }
        }
        for (j, d) in n.dns.iter().enumerate() {
            if d.parse::<IpAddr>().is_err() {
                return Err(err(
                    path,
                    format!("nodes[{i}].dns[{j}]"),
                    format!("{d:?} is not an IP address"),
                    "list DNS servers as IPs, e.g. [\"10.0.0.1\"]",
                ));
            }
        }
        nodes.push(n);
    }
    Ok(Cluster { section: c, nodes })
}

/// Loads `recipes/<role>.toml`, follows `inherits` to the root and merges:
/// lists concatenate (parent first, duplicates dropped), scalars of the child override.
pub fn load_role(project: &Project, role: &str) -> Result<Recipe> {
    let cluster_file = project.recipes_dir().join("cluster.toml");
    if !ROLES.contains(&role) {
        return Err(err(
            &cluster_file,
            "--role",
            format!("unknown role {role:?}"),
            format!("use one of {}", ROLES.join(", ")),
        ));
    }
    // Walk the chain child → root.
    let mut chain: Vec<(String, PathBuf, RecipeFile)> = Vec::new();
    let mut name = role.to_string();
    loop {
        let path = project.recipes_dir().join(format!("{name}.toml"));
        if chain.iter().any(|(n, _, _)| *n == name) {
            let from = &chain.last().map(|c| c.1.clone()).unwrap_or_default();
            return Err(err(
                from,
                "inherits",
                format!("inheritance cycle through {name:?}"),
                "make the chain end at a recipe without `inherits` (base)",
            ));
        }
        if !path.is_file() {
            let (file, key) = match chain.last() {
                Some((_, p, _)) => (p.clone(), "inherits"),
                None => (cluster_file.clone(), "--role"),
            };
            return Err(err(
                &file,
                key,
                format!("recipe {name:?} not found at {}", path.display()),
                format!("create recipes/{name}.toml or fix the name"),
            ));
        }
        let file: RecipeFile = parse_toml(&path)?;
        let parent = file.inherits.clone();
        chain.push((name.clone(), path, file));
        match parent {
            Some(p) => name = p,
            None => break,
        }
    }
    chain.reverse();

    let mut description = String::new();
    let mut variant = None;
    let mut mirror = None;
    let mut components = Vec::new();
    let mut packages = Vec::new();
    let mut cmdline = Vec::new();
    let mut esp_size_mib = None;
    let mut enable = Vec::new();
    let mut mask = Vec::new();
    for (_, path, f) in &chain {
        if let Some(d) = &f.description {
            description = d.clone();
        }
        if let Some(v) = &f.debian.variant {
            variant = Some(v.clone());
        }
        if let Some(m) = &f.debian.mirror {
            mirror = Some(m.clone());
        }
        for (i, p) in f.debian.packages.iter().enumerate() {
            if !is_package_name(p) {
                return Err(err(
                    path,
                    format!("debian.packages[{i}]"),
                    format!("{p:?} is not a Debian package name"),
                    "use a package name like \"openssh-server\" (optionally \"name=version\")",
                ));
            }
        }
        for (i, u) in f.systemd.enable.iter().chain(&f.systemd.mask).enumerate() {
            if !is_unit_name(u) {
                return Err(err(
                    path,
                    format!("systemd.enable/mask[{i}]"),
                    format!("{u:?} is not a systemd unit name"),
                    "write the full unit name, e.g. \"systemd-networkd.service\"",
                ));
            }
        }
        if let Some(s) = f.boot.esp_size_mib {
            if s != 0 && !(64..=4096).contains(&s) {
                return Err(err(
                    path,
                    "boot.esp_size_mib",
                    format!("{s} MiB is out of range"),
                    "use 0 (fit to content) or 64..4096",
                ));
            }
            esp_size_mib = Some(s);
        }
        merge_list(&mut components, &f.debian.components);
        merge_list(&mut packages, &f.debian.packages);
        merge_list(&mut cmdline, &f.boot.cmdline);
        merge_list(&mut enable, &f.systemd.enable);
        merge_list(&mut mask, &f.systemd.mask);
    }
    if components.is_empty() {
        components.push("main".into());
    }
    let variant = variant.unwrap_or_else(|| "minbase".into());
    const VARIANTS: &[&str] = &[
        "extract",
        "custom",
        "essential",
        "apt",
        "required",
        "minbase",
        "buildd",
        "important",
        "debootstrap",
        "standard",
    ];
    if !VARIANTS.contains(&variant.as_str()) {
        let path = &chain.last().expect("chain has the role").1;
        return Err(err(
            path,
            "debian.variant",
            format!("unknown mmdebstrap variant {variant:?}"),
            format!("use one of {}", VARIANTS.join(", ")),
        ));
    }
    Ok(Recipe {
        role: role.to_string(),
        chain: chain.iter().map(|c| c.0.clone()).collect(),
        description,
        debian: Debian {
            suite: project.cluster.section.suite.clone(),
            variant,
            mirror,
            components,
            packages,
        },
        boot: Boot {
            cmdline,
            esp_size_mib: esp_size_mib.unwrap_or(0),
        },
        systemd: Systemd { enable, mask },
    })
}

fn merge_list(into: &mut Vec<String>, add: &[String]) {
    for a in add {
        if !into.contains(a) {
            into.push(a.clone());
        }
    }
}

fn is_package_name(p: &str) -> bool {
    let name = p.split_once('=').map(|(n, _)| n).unwrap_or(p);
    name.len() >= 2
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.:".contains(&b))
}

fn is_unit_name(u: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        ".service",
        ".socket",
        ".target",
        ".timer",
        ".path",
        ".mount",
        ".automount",
        ".swap",
        ".slice",
    ];
    SUFFIXES.iter().any(|s| u.ends_with(s) && u.len() > s.len())
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@:\\".contains(&b))
}
