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
    #[serde(default)]
    pub k3s: K3sRoleFile,
}

/// `[k3s]` of a role recipe: how this role runs k3s.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K3sRoleFile {
    /// `server` (control plane) or `agent`; absent = no k3s on this role.
    pub mode: Option<String>,
    /// `--node-label` values applied at first registration.
    #[serde(default)]
    pub node_labels: Vec<String>,
    /// `--node-taint` values applied at first registration.
    #[serde(default)]
    pub node_taints: Vec<String>,
    /// Kubernetes manifests (paths relative to recipes/) auto-deployed by servers.
    #[serde(default)]
    pub manifests: Vec<String>,
    /// Helm charts embedded offline as HelmChart resources (servers only).
    #[serde(default)]
    pub charts: Vec<ChartFile>,
}

/// A pinned helm chart `.tgz`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChartFile {
    pub name: String,
    pub url: String,
    pub sha256: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Values file (path relative to recipes/), rendered into `valuesContent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<String>,
}

fn default_namespace() -> String {
    "kube-system".into()
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
    /// Paths the packages install that must not be in the image (a file, or a directory and
    /// everything under it), e.g. a private key a postinst generated.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Pinned `.deb` files (not in the Debian archive, e.g. NVIDIA's container toolkit)
    /// installed in the base together with `packages`; their dependencies come from the archive.
    #[serde(default)]
    pub debs: Vec<Pinned>,
    /// Sign the kernel modules DKMS builds in the base with `keys/module-signing.key`; without
    /// it DKMS makes a random key per build, left in the image, so the image is not
    /// reproducible (and kiln refuses it).
    pub sign_modules: Option<bool>,
    /// Shell commands run inside the base's chroot after every package is installed (mmdebstrap
    /// customize hooks, `/bin/sh -euc`), in order, parent recipes first — for what a package's
    /// postinst gets wrong for an image (e.g. a per-machine name made once at build time).
    #[serde(default)]
    pub customize: Vec<String>,
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
    k3s: Option<K3sCluster>,
    #[serde(default)]
    sealed_secrets: Option<SealedSecretsConfig>,
    #[serde(default)]
    nodes: Vec<Node>,
}

/// `[sealed_secrets]` of cluster.toml: the controller masters deploy, its restored key
/// (from keys/), and the SealedSecrets they auto-deploy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SealedSecretsConfig {
    /// Pinned chart archive (.tgz), embedded offline; without it the HelmChart names
    /// `chart_repo` + `chart_version` and the cluster downloads the chart at first start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chart: Option<Pinned>,
    #[serde(default = "default_ss_repo")]
    pub chart_repo: String,
    #[serde(default = "default_ss_version")]
    pub chart_version: String,
    /// SealedSecret manifests (paths relative to recipes/), auto-deployed by masters.
    #[serde(default)]
    pub secrets: Vec<String>,
}

fn default_ss_repo() -> String {
    "https://bitnami-labs.github.io/sealed-secrets".into()
}

fn default_ss_version() -> String {
    "2.17.2".into()
}

/// A file kiln downloads, pinned by sha256.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Pinned {
    pub url: String,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// How the k3s token reaches a node (`[k3s] token_delivery`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDelivery {
    /// Baked into the role image at /etc/rancher/k3s/token.
    #[default]
    Image,
    /// Written by cloud-init from the node's seed (`write_files`).
    Seed,
}

/// `[k3s]` of cluster.toml: what must match on every node.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct K3sCluster {
    /// Release, e.g. `v1.34.2+k3s1` (documentation; the pins below are what is used).
    pub version: String,
    /// The `k3s` binary of the release.
    pub binary: Pinned,
    /// `k3s-airgap-images-amd64.tar.zst` (or .tar/.tar.gz) of the same release; optional.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub airgap_images: Option<Pinned>,
    /// Components servers do not deploy (`--disable`), e.g. `["traefik"]`.
    #[serde(default)]
    pub disable: Vec<String>,
    /// Extra SANs on the API server certificate (the API endpoint is always added).
    #[serde(default)]
    pub tls_san: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_domain: Option<String>,
    /// `registries.yaml` (path relative to recipes/), installed as /etc/rancher/k3s/registries.yaml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registries: Option<String>,
    /// The cluster already exists: no server uses `cluster-init`; all join the API endpoint.
    /// Set this once the first master is up, so that reflashing it rejoins instead of founding
    /// a new cluster.
    #[serde(default)]
    pub bootstrapped: bool,
    /// Where nodes get the cluster token: `image` (baked into every role image, 0600) or
    /// `seed` (only in each node's cloud-init seed: role images then carry no token and can be
    /// shared; a node booted without its seed cannot join).
    #[serde(default)]
    pub token_delivery: TokenDelivery,
    /// `write-kubeconfig-mode` on servers (default "0600").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_kubeconfig_mode: Option<String>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k3s: Option<K3sCluster>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealed_secrets: Option<SealedSecretsConfig>,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// `https://host:6443` that agents and joining servers talk to: the API endpoint, or the
    /// first master's static address.
    pub fn server_url(&self) -> Option<String> {
        let host = self.section.api_endpoint.clone().or_else(|| {
            self.nodes
                .iter()
                .find(|n| n.role == "master")
                .and_then(|n| n.address.split_once('/').map(|(ip, _)| ip.to_string()))
        })?;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Some(format!("https://{host}:6443"))
    }
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
    pub k3s: K3sRole,
}

#[derive(Debug, Clone, Serialize)]
pub struct K3sRole {
    /// `server`, `agent` or `none`.
    pub mode: String,
    pub node_labels: Vec<String>,
    pub node_taints: Vec<String>,
    pub manifests: Vec<String>,
    pub charts: Vec<ChartFile>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Debian {
    pub suite: String,
    pub variant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    pub components: Vec<String>,
    pub packages: Vec<String>,
    /// Normalised (no leading `/`) paths dropped from the base.
    pub remove: Vec<String>,
    /// Pinned `.deb` files installed in the base (merged by URL, in recipe order).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub debs: Vec<Pinned>,
    /// DKMS signs modules with the project's module-signing key (see [`DebianFile::sign_modules`]).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub sign_modules: bool,
    /// Commands run in the chroot after the packages (merged along the chain, parent first).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub customize: Vec<String>,
}

impl Debian {
    /// File name a pinned `.deb` is installed under: the last segment of its URL (validated
    /// by the recipe stage to be a plain `*.deb` name).
    pub fn deb_file_name(url: &str) -> &str {
        url.rsplit('/').next().unwrap_or(url)
    }
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

    /// The inventory node named `hostname`, or an error listing the names there are.
    pub fn node(&self, hostname: &str) -> std::result::Result<&Node, RecipeError> {
        self.cluster
            .nodes
            .iter()
            .find(|n| n.hostname == hostname)
            .ok_or_else(|| RecipeError {
                file: self.recipes_dir().join("cluster.toml"),
                key: "nodes".into(),
                problem: format!("no node with hostname {hostname:?} in the inventory"),
                fix: format!(
                    "use one of: {}",
                    self.cluster
                        .nodes
                        .iter()
                        .map(|n| n.hostname.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }

    /// `roles`, or when empty every role that has a recipe file.
    pub fn roles_or_all(&self, roles: &[String]) -> Vec<String> {
        if !roles.is_empty() {
            return roles.to_vec();
        }
        ROLES
            .iter()
            .filter(|r| self.recipes_dir().join(format!("{r}.toml")).is_file())
            .map(|r| r.to_string())
            .collect()
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
    if let Some(k) = &file.k3s {
        validate_pinned(path, "k3s.binary", &k.binary)?;
        if let Some(a) = &k.airgap_images {
            validate_pinned(path, "k3s.airgap_images", a)?;
            const EXT: &[&str] = &[
                ".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst", ".tar.lz4", ".tar.bz2",
            ];
            if !EXT.iter().any(|e| a.url.ends_with(e)) {
                return Err(err(
                    path,
                    "k3s.airgap_images.url",
                    format!("{:?} does not end in an extension k3s imports", a.url),
                    format!("k3s reads {} from its images directory", EXT.join(" ")),
                ));
            }
        }
        for (key, v) in [
            ("k3s.cluster_cidr", &k.cluster_cidr),
            ("k3s.service_cidr", &k.service_cidr),
        ] {
            if let Some(v) = v {
                let ok = v.split(',').all(|c| {
                    c.split_once('/').is_some_and(|(ip, l)| {
                        ip.parse::<IpAddr>().is_ok() && l.parse::<u8>().is_ok()
                    })
                });
                if !ok {
                    return Err(err(
                        path,
                        key,
                        format!("{v:?} is not a CIDR (or comma-separated dual-stack pair)"),
                        "write e.g. \"10.42.0.0/16\"",
                    ));
                }
            }
        }
        if let Some(m) = &k.write_kubeconfig_mode {
            if m.len() != 4 || !m.starts_with('0') || !m.bytes().all(|b| (b'0'..=b'7').contains(&b))
            {
                return Err(err(
                    path,
                    "k3s.write_kubeconfig_mode",
                    format!("{m:?} is not an octal file mode"),
                    "write e.g. \"0600\" or \"0644\"",
                ));
            }
        }
        if let Some(r) = &k.registries {
            let rp = root.join("recipes").join(r);
            if !rp.is_file() {
                return Err(err(
                    path,
                    "k3s.registries",
                    format!("{} does not exist", rp.display()),
                    "give a path relative to recipes/, e.g. \"registries.yaml\"",
                ));
            }
        }
        let masters = nodes.iter().filter(|n| n.role == "master").count();
        if masters > 1 && masters % 2 == 0 {
            tracing::warn!("{}: {masters} masters: embedded etcd wants an odd number of servers to keep quorum", path.display());
        }
    }
    if let Some(ss) = &file.sealed_secrets {
        if let Some(c) = &ss.chart {
            validate_pinned(path, "sealed_secrets.chart", c)?;
        }
        for (i, f) in ss.secrets.iter().enumerate() {
            if f.starts_with('/') || f.contains("..") || !root.join("recipes").join(f).is_file() {
                return Err(err(path, format!("sealed_secrets.secrets[{i}]"), format!("{f:?} is not a file under recipes/"), "give a path relative to recipes/, e.g. \"secrets/db.yaml\" (made with `kiln seal`)"));
            }
        }
    }
    Ok(Cluster {
        section: c,
        k3s: file.k3s,
        sealed_secrets: file.sealed_secrets,
        nodes,
    })
}

fn validate_pinned(path: &Path, key: &str, p: &Pinned) -> Result<()> {
    if !(p.url.starts_with("https://")
        || p.url.starts_with("http://")
        || p.url.starts_with("file://"))
    {
        return Err(err(
            path,
            format!("{key}.url"),
            format!("{:?} is not an http(s):// or file:// URL", p.url),
            "give the full download URL of the release asset",
        ));
    }
    if p.sha256.len() != 64
        || !p
            .sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(err(
            path,
            format!("{key}.sha256"),
            format!("{:?} is not a sha256 (64 lower-case hex digits)", p.sha256),
            "copy the digest from the release's sha256sum file",
        ));
    }
    Ok(())
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
    let mut remove: Vec<String> = Vec::new();
    let mut debs: Vec<Pinned> = Vec::new();
    let mut sign_modules = false;
    let mut customize: Vec<String> = Vec::new();
    let mut cmdline = Vec::new();
    let mut esp_size_mib = None;
    let mut enable = Vec::new();
    let mut mask = Vec::new();
    let mut k3s_mode: Option<(String, PathBuf)> = None;
    let mut node_labels = Vec::new();
    let mut node_taints = Vec::new();
    let mut manifests: Vec<String> = Vec::new();
    let mut charts: Vec<ChartFile> = Vec::new();
    for (_, path, f) in &chain {
        if let Some(m) = &f.k3s.mode {
            if !matches!(m.as_str(), "server" | "agent" | "none") {
                return Err(err(
                    path,
                    "k3s.mode",
                    format!("unknown k3s mode {m:?}"),
                    "use \"server\", \"agent\" or \"none\"",
                ));
            }
            k3s_mode = Some((m.clone(), path.clone()));
        }
        for (i, m) in f.k3s.manifests.iter().enumerate() {
            let mp = project.recipes_dir().join(m);
            if m.starts_with('/') || m.contains("..") || !mp.is_file() {
                return Err(err(
                    path,
                    format!("k3s.manifests[{i}]"),
                    format!("{m:?} is not a file under recipes/"),
                    "give a path relative to recipes/, e.g. \"manifests/metallb.yaml\"",
                ));
            }
            if !manifests.contains(m) {
                manifests.push(m.clone());
            }
        }
        for (i, c) in f.k3s.charts.iter().enumerate() {
            let key = format!("k3s.charts[{i}]");
            if !is_dns_label(&c.name) || !is_dns_label(&c.namespace) {
                return Err(err(
                    path,
                    key,
                    format!(
                        "chart name {:?} / namespace {:?} must be DNS labels",
                        c.name, c.namespace
                    ),
                    "use lower-case letters, digits and '-'",
                ));
            }
            validate_pinned(
                path,
                &key,
                &Pinned {
                    url: c.url.clone(),
                    sha256: c.sha256.clone(),
                    size: None,
                },
            )?;
            if let Some(v) = &c.values {
                if !project.recipes_dir().join(v).is_file() {
                    return Err(err(
                        path,
                        format!("{key}.values"),
                        format!("{v:?} is not a file under recipes/"),
                        "give a path relative to recipes/",
                    ));
                }
            }
            charts.retain(|x| x.name != c.name);
            charts.push(c.clone());
        }
        for (i, l) in f.k3s.node_labels.iter().enumerate() {
            if !l.contains('=') || l.contains(char::is_whitespace) {
                return Err(err(
                    path,
                    format!("k3s.node_labels[{i}]"),
                    format!("{l:?} is not key=value"),
                    "write e.g. \"node.longhorn.io/create-default-disk=true\"",
                ));
            }
        }
        for (i, t) in f.k3s.node_taints.iter().enumerate() {
            let ok = t.split_once(':').is_some_and(|(_, eff)| {
                matches!(eff, "NoSchedule" | "PreferNoSchedule" | "NoExecute")
            });
            if !ok || t.contains(char::is_whitespace) {
                return Err(err(
                    path,
                    format!("k3s.node_taints[{i}]"),
                    format!("{t:?} is not key[=value]:Effect"),
                    "write e.g. \"nvidia.com/gpu=present:NoSchedule\"",
                ));
            }
        }
        merge_list(&mut node_labels, &f.k3s.node_labels);
        merge_list(&mut node_taints, &f.k3s.node_taints);
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
        for (i, r) in f.debian.remove.iter().enumerate() {
            let n = r.trim_start_matches('/').trim_end_matches('/').to_string();
            if n.is_empty() || n.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                return Err(err(
                    path,
                    format!("debian.remove[{i}]"),
                    format!("{r:?} is not a clean absolute path"),
                    "write e.g. \"/var/lib/dkms/mok.key\"",
                ));
            }
            merge_list(&mut remove, &[n]);
        }
        for (i, d) in f.debian.debs.iter().enumerate() {
            let key = format!("debian.debs[{i}]");
            validate_pinned(path, &key, d)?;
            let name = Debian::deb_file_name(&d.url);
            let plain = name.len() > 4
                && name.ends_with(".deb")
                && !name.starts_with('.')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-._~".contains(&b));
            if !plain {
                return Err(err(
                    path,
                    format!("{key}.url"),
                    format!("{:?} does not end in a plain .deb file name", d.url),
                    "give the package's own URL, ending in name_version_arch.deb",
                ));
            }
            if let Some(o) = debs
                .iter()
                .find(|o| o.url != d.url && Debian::deb_file_name(&o.url) == name)
            {
                return Err(err(
                    path,
                    format!("{key}.url"),
                    format!("{name} is also pinned from {}", o.url),
                    "pin each .deb file once (an inheriting recipe may repeat the same URL)",
                ));
            }
            debs.retain(|o| o.url != d.url);
            debs.push(d.clone());
        }
        if let Some(b) = f.debian.sign_modules {
            sign_modules = b;
        }
        for (i, c) in f.debian.customize.iter().enumerate() {
            if c.trim().is_empty() || c.contains('\0') {
                return Err(err(
                    path,
                    format!("debian.customize[{i}]"),
                    "an empty command".to_string(),
                    "give a shell command, e.g. \"printf 'GenerateName=yes\\n' > /etc/iscsi/initiatorname.iscsi\", or remove the entry",
                ));
            }
            customize.push(c.clone());
        }
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
    let mode = k3s_mode
        .as_ref()
        .map(|m| m.0.clone())
        .unwrap_or_else(|| "none".into());
    let role_path = chain.last().expect("chain has the role").1.clone();
    if mode != "none" {
        let from = k3s_mode
            .as_ref()
            .map(|m| m.1.clone())
            .unwrap_or(role_path.clone());
        if project.cluster.k3s.is_none() {
            return Err(err(
                &cluster_file,
                "k3s",
                format!(
                    "role {role:?} runs k3s ({}) but cluster.toml has no [k3s] section",
                    from.display()
                ),
                "add [k3s] with version and the pinned binary (see docs/recipes.md)",
            ));
        }
        let masters = project
            .cluster
            .nodes
            .iter()
            .filter(|n| n.role == "master")
            .count();
        let needs_url = mode == "agent"
            || masters > 1
            || project.cluster.k3s.as_ref().is_some_and(|k| k.bootstrapped);
        if needs_url && project.cluster.server_url().is_none() {
            return Err(err(&cluster_file, "cluster.api_endpoint", format!("role {role:?} must join a server, but there is no API endpoint: no cluster.api_endpoint and the first master has no static address"), "set cluster.api_endpoint (a VIP or the first master's IP)"));
        }
    }
    if mode != "server" && (!manifests.is_empty() || !charts.is_empty()) {
        return Err(err(&role_path, "k3s.manifests", format!("role {role:?} is not a k3s server, and only servers auto-deploy manifests and charts"), "move the manifests/charts to recipes/master.toml"));
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
            remove,
            debs,
            sign_modules,
            customize,
        },
        boot: Boot {
            cmdline,
            esp_size_mib: esp_size_mib.unwrap_or(0),
        },
        systemd: Systemd { enable, mask },
        k3s: K3sRole {
            mode,
            node_labels,
            node_taints,
            manifests,
            charts,
        },
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

/// File name suffixes of systemd unit types.
pub const UNIT_SUFFIXES: &[&str] = &[
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

fn is_unit_name(u: &str) -> bool {
    UNIT_SUFFIXES
        .iter()
        .any(|s| u.ends_with(s) && u.len() > s.len())
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.@:\\".contains(&b))
}
