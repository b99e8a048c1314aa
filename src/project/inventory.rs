//! The inventory, `recipes/cluster.toml`: its schema (`ClusterFile` as written, [`Cluster`]
//! validated), the loaded [`Project`], and the checks that stop a bad inventory before
//! anything is written.

use super::error::{RecipeError, Result};
use super::files::{parse_toml, validate_pinned, Pinned};
use super::layout::Layout;
use super::names::{self, is_dns_label};
use super::names::{disk_path_problem, domain_problem, MAX_DNS_NAME};
use super::net::{dns_server_problem, host_address_problem, parse_cidr, Cidr4};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// The earliest SOURCE_DATE_EPOCH kiln accepts: FAT (the ESP) cannot store times before 1980.
pub const MIN_SOURCE_DATE_EPOCH: i64 = 315_532_800;
/// The latest SOURCE_DATE_EPOCH kiln accepts, 2106-02-07 06:28:15 UTC: squashfs stores times
/// as unsigned 32-bit seconds (FAT ends later, 2107-12-31; ISO 9660 in 2155).
pub const MAX_SOURCE_DATE_EPOCH: i64 = u32::MAX as i64;

/// What nodes support as addresses: IPv4 only. kiln's PXE (DHCPv4, iPXE over IPv4), the
/// seed's network-config (`dhcp4`), the on-node inventory and Proxmox's `ipconfig0` speak IPv4.
const IPV6_FIX: &str = "IPv6 node addresses are not supported (kiln's PXE, seeds and Proxmox clones configure IPv4): give an IPv4 address, or \"dhcp\"; SLAAC still configures IPv6 on the node";

/// k3s components servers can `--disable`.
const K3S_COMPONENTS: &[&str] = &[
    "coredns",
    "servicelb",
    "traefik",
    "local-storage",
    "metrics-server",
    "runtimes",
];

/// Roles kiln knows how to build; a recipe file for each lives in `recipes/`.
pub const ROLES: &[&str] = &["master", "worker", "gpu", "storage"];

// ---------------------------------------------------------------------------------------------
// File schema (what users write)

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
    updates: Option<Updates>,
    #[serde(default)]
    nodes: Vec<Node>,
}

/// `[updates]` of cluster.toml: in-place A/B updates (docs/guide/updates.md). Without it,
/// nodes never ask for a new build: they change build only when reflashed (or PXE-booted).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Updates {
    /// `http://<address>:<port>` of `kiln serve` as the nodes reach it.
    pub server: String,
    /// Seconds between two questions of a node's updater (default [`DEFAULT_UPDATE_POLL`]).
    #[serde(default = "default_update_poll")]
    pub poll_seconds: u32,
    /// Boots a new build gets to pass its health check before systemd-boot falls back to the
    /// previous one (the `+N` boot counter of its entry; default [`DEFAULT_BOOT_TRIES`]).
    #[serde(default = "default_boot_tries")]
    pub boot_tries: u32,
    /// Roles whose nodes `kiln serve` cordons and drains through the Kubernetes API before
    /// they reboot into a new build (and uncordons once healthy); default `["worker"]`.
    #[serde(default = "default_drain")]
    pub drain: Vec<String>,
    /// Seconds a drain may take before the rollout stops (default [`DEFAULT_DRAIN_TIMEOUT`]).
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: u32,
}

/// Default of `updates.drain_timeout`.
pub const DEFAULT_DRAIN_TIMEOUT: u32 = 300;

fn default_drain() -> Vec<String> {
    vec!["worker".into()]
}

fn default_drain_timeout() -> u32 {
    DEFAULT_DRAIN_TIMEOUT
}

/// Default of `updates.poll_seconds`.
pub const DEFAULT_UPDATE_POLL: u32 = 60;
/// Default of `updates.boot_tries`.
pub const DEFAULT_BOOT_TRIES: u32 = 3;

fn default_update_poll() -> u32 {
    DEFAULT_UPDATE_POLL
}

fn default_boot_tries() -> u32 {
    DEFAULT_BOOT_TRIES
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
    /// An override of the decision masters make at boot (docs/guide/ha.md): `true` means the
    /// cluster exists, so no master ever founds one, not even the first master with an empty
    /// etcd after [`K3sCluster::founding_wait`] (for a rebuild while the network may be split).
    /// Not needed otherwise: a master with etcd data restarts from it, one with an empty etcd
    /// joins a master that answers, and only the first master founds, after the wait.
    #[serde(default)]
    pub bootstrapped: bool,
    /// Seconds the first master, with an empty etcd and no earlier membership on its data
    /// partition, keeps probing the API endpoint and the other masters before it founds the
    /// cluster (default [`DEFAULT_FOUNDING_WAIT`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub founding_wait: Option<u32>,
    /// `[k3s.restore]`: the recovery drill for "all masters lost" (docs/guide/ha.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<Restore>,
    /// Where nodes get the cluster token: `image` (baked into every role image, 0600) or
    /// `seed` (only in each node's cloud-init seed: role images then carry no token and can be
    /// shared; a node booted without its seed cannot join).
    #[serde(default)]
    pub token_delivery: TokenDelivery,
    /// `write-kubeconfig-mode` on servers (default "0600").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_kubeconfig_mode: Option<String>,
    /// etcd snapshots of the servers (`[k3s.etcd_snapshots]`); absent: k3s's defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd_snapshots: Option<EtcdSnapshots>,
}

/// How long the first master probes for a running cluster before it founds one.
pub const DEFAULT_FOUNDING_WAIT: u32 = 120;

/// `[k3s.restore]`: the first master, at its first start with this build, restores etcd from
/// a snapshot (`k3s server --cluster-reset --cluster-reset-restore-path`) before it starts;
/// the other masters, reflashed with an empty etcd, join it.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Restore {
    /// A snapshot file on the first master (e.g. on its kept data partition,
    /// `/var/lib/rancher/k3s/server/db/snapshots/<name>`), or with
    /// `[k3s.etcd_snapshots.s3]` the name of a snapshot in the bucket.
    pub snapshot: String,
}

/// `[k3s.etcd_snapshots]`: when the servers snapshot etcd, how many they keep, and an optional
/// S3 copy off the node. Snapshots stay in k3s's default directory,
/// `/var/lib/rancher/k3s/server/db/snapshots`, on the data partition.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdSnapshots {
    /// `etcd-snapshot-schedule-cron` (k3s default "0 */12 * * *").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// `etcd-snapshot-retention` (k3s default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<u32>,
    /// `etcd-snapshot-compress`.
    #[serde(default)]
    pub compress: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<EtcdS3>,
}

/// `[k3s.etcd_snapshots.s3]`: k3s's `etcd-s3*` settings; the access and secret keys come from
/// a file in keys/ (a secret of the master images, like the token).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdS3 {
    /// `etcd-s3-endpoint`: host[:port], no scheme.
    pub endpoint: String,
    /// `etcd-s3-bucket`.
    pub bucket: String,
    /// `etcd-s3-folder`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<String>,
    /// `etcd-s3-region` (k3s default us-east-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// `etcd-s3-insecure`: plain HTTP.
    #[serde(default)]
    pub insecure: bool,
    /// The credentials file in keys/: `access_key = …` and `secret_key = …` lines.
    pub credentials: String,
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
    /// Extra disks (`[[nodes.disks]]`): the data disk of a diskless node, Longhorn disks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
}

fn dhcp() -> String {
    "dhcp".into()
}

/// What a node's extra disk is for (`use`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskUse {
    /// Holds the node's data partition (the persistent paths), e.g. on a PXE-booted node.
    Data,
    /// Formatted when blank, mounted, and announced to Longhorn as one of the node's disks.
    Longhorn,
}

impl DiskUse {
    /// The inventory spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskUse::Data => "data",
            DiskUse::Longhorn => "longhorn",
        }
    }
}

/// One `[[nodes.disks]]` entry. After validation a Longhorn disk's `mount` is always set
/// (default `/var/lib/longhorn-disks/disk<i>` for the node's i-th Longhorn disk, from 0).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// Stable device path, `/dev/disk/by-id/…` or `/dev/disk/by-path/…`.
    pub device: String,
    #[serde(rename = "use")]
    pub use_: DiskUse,
    /// Mount point (Longhorn disks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<String>,
    /// Longhorn disk tags (Longhorn disks only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The node may format this disk even when it holds a foreign partition table or file
    /// system (default: such a disk is left alone and reported).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub wipe: bool,
}

/// The most `[[nodes.disks]]` a node may have.
pub const MAX_NODE_DISKS: usize = 16;
/// The most tags a Longhorn disk may carry.
pub const MAX_DISK_TAGS: usize = 16;
/// Where a node's Longhorn disks are mounted when the inventory names no `mount`.
pub const LONGHORN_DISKS_DIR: &str = "/var/lib/longhorn-disks";

/// Device path prefixes that name the same disk on every boot.
const STABLE_DISK_PREFIXES: &[&str] = &["/dev/disk/by-id/", "/dev/disk/by-path/"];

/// The mount point of each of the node's disks: the inventory's `mount`, or for the i-th
/// Longhorn disk without one `/var/lib/longhorn-disks/disk<i>`; `None` for data disks.
fn disk_mounts(node: &Node) -> Vec<Option<String>> {
    let mut longhorn = 0;
    node.disks
        .iter()
        .map(|d| match d.use_ {
            DiskUse::Data => None,
            DiskUse::Longhorn => {
                let m = d
                    .mount
                    .clone()
                    .unwrap_or_else(|| format!("{LONGHORN_DISKS_DIR}/disk{longhorn}"));
                longhorn += 1;
                Some(m)
            }
        })
        .collect()
}

/// The node's disk list for the node-side scripts, or `None` when it names no disks: a comment
/// line, then one line per disk, tab-separated: `use`, `device`, `wipe` (`0`/`1`), `mount`
/// (`-` for a data disk), `tags` (comma-separated, or `-`).
pub fn disks_file(node: &Node) -> Option<String> {
    if node.disks.is_empty() {
        return None;
    }
    let mut s = String::from("# use\tdevice\twipe\tmount\ttags (generated by kiln)\n");
    for (d, m) in node.disks.iter().zip(disk_mounts(node)) {
        let tags = if d.tags.is_empty() {
            "-".to_string()
        } else {
            d.tags.join(",")
        };
        s.push_str(&format!(
            "{}\t{}\t{}\t{}\t{}\n",
            d.use_.as_str(),
            d.device,
            u8::from(d.wipe),
            m.as_deref().unwrap_or("-"),
            tags
        ));
    }
    Some(s)
}

/// One disk of Longhorn's `node.longhorn.io/default-disks-config` annotation.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LonghornDisk<'a> {
    path: &'a str,
    allow_scheduling: bool,
    tags: &'a [String],
}

/// The value of Longhorn's `node.longhorn.io/default-disks-config` node annotation for the
/// node's Longhorn disks (a JSON array of `{"path", "allowScheduling", "tags"}`, in inventory
/// order), or `None` when it has none. Longhorn reads it when the node carries the label
/// `node.longhorn.io/create-default-disk=config` (and its setting "Create Default Disk on
/// Labeled Nodes" is on), once, when it first adds the node.
pub fn longhorn_disks_config(node: &Node) -> Option<String> {
    let mounts = disk_mounts(node);
    let disks: Vec<LonghornDisk> = node
        .disks
        .iter()
        .zip(&mounts)
        .filter_map(|(d, m)| {
            Some(LonghornDisk {
                path: m.as_deref()?,
                allow_scheduling: true,
                tags: &d.tags,
            })
        })
        .collect();
    if disks.is_empty() {
        return None;
    }
    Some(serde_json::to_string(&disks).expect("serialisable"))
}

/// Whether the node names a Longhorn disk.
pub fn has_longhorn_disks(node: &Node) -> bool {
    node.disks.iter().any(|d| d.use_ == DiskUse::Longhorn)
}

// ---------------------------------------------------------------------------------------------
// Validated values (what the pipeline consumes; serialised canonically for the build id)

#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    #[serde(flatten)]
    pub section: ClusterSection,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k3s: Option<K3sCluster>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealed_secrets: Option<SealedSecretsConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updates: Option<Updates>,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// The inventory's masters, in inventory order (the first one founds the cluster).
    pub fn masters(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.role == "master")
    }

    /// `https://host:6443` that agents and joining servers talk to: the API endpoint, or the
    /// first master's static address.
    pub fn server_url(&self) -> Option<String> {
        let host = self.section.api_endpoint.clone().or_else(|| {
            self.masters()
                .next()
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

/// The project as loaded: cluster + every role recipe available.
#[derive(Debug, Clone)]
pub struct Project {
    pub root: PathBuf,
    pub cluster: Cluster,
}

impl Project {
    /// Where the project's input files are.
    pub fn layout(&self) -> Layout {
        Layout::new(&self.root)
    }

    pub fn recipes_dir(&self) -> PathBuf {
        self.layout().recipes()
    }

    /// The inventory node named `hostname`, or an error listing the names there are.
    pub fn node(&self, hostname: &str) -> Result<&Node> {
        self.cluster
            .nodes
            .iter()
            .find(|n| n.hostname == hostname)
            .ok_or_else(|| {
                RecipeError::new(
                    self.layout().cluster_file(),
                    "nodes",
                    format!("no node with hostname {hostname:?} in the inventory"),
                    format!(
                        "use one of: {}",
                        self.cluster
                            .nodes
                            .iter()
                            .map(|n| n.hostname.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    }

    /// The nodes named `hostnames` (in that order), or every node when it is empty.
    pub fn nodes(&self, hostnames: &[String]) -> Result<Vec<&Node>> {
        if hostnames.is_empty() {
            return Ok(self.cluster.nodes.iter().collect());
        }
        hostnames.iter().map(|h| self.node(h)).collect()
    }

    /// `roles`, or when empty every role that has a recipe file.
    pub fn roles_or_all(&self, roles: &[String]) -> Vec<String> {
        if !roles.is_empty() {
            return roles.to_vec();
        }
        ROLES
            .iter()
            .filter(|r| self.layout().role_recipe(r).is_file())
            .map(|r| r.to_string())
            .collect()
    }
    pub fn overlays_dir(&self) -> PathBuf {
        self.layout().overlays()
    }
}

/// Loads and validates `recipes/cluster.toml` and every role it references.
pub fn load_project(root: &Path) -> Result<Project> {
    let layout = Layout::new(root);
    let path = layout.cluster_file();
    let file: ClusterFile = parse_toml(&layout, &path)?;
    let cluster = validate_cluster(&layout, &path, file)?;
    Ok(Project {
        root: root.to_path_buf(),
        cluster,
    })
}

/// Why a normalised MAC cannot be a NIC's own address: all zero, broadcast, or multicast (the
/// low bit of the first byte set).
pub fn mac_problem(mac: &str) -> Option<&'static str> {
    let first = u8::from_str_radix(mac.get(..2)?, 16).ok()?;
    if mac == "00:00:00:00:00:00" {
        Some("is the all-zero MAC, which no NIC has")
    } else if mac == "ff:ff:ff:ff:ff:ff" {
        Some("is the broadcast MAC, not a NIC's address")
    } else if first & 1 == 1 {
        Some("is a multicast MAC (the low bit of its first byte is set), not a NIC's address")
    } else {
        None
    }
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

// ---------------------------------------------------------------------------------------------
// Validation, in the order the checks report: [cluster], the nodes one by one, [k3s],
// [sealed_secrets].

fn validate_cluster(layout: &Layout, path: &Path, file: ClusterFile) -> Result<Cluster> {
    check_section(path, &file.cluster)?;
    let nodes = check_nodes(layout, path, file.nodes)?;
    check_names_and_endpoint(path, &file.cluster, &nodes)?;
    if let Some(k) = &file.k3s {
        check_k3s(layout, path, k, &nodes)?;
    }
    if let Some(ss) = &file.sealed_secrets {
        check_sealed_secrets(layout, path, ss)?;
    }
    if let Some(u) = &file.updates {
        check_updates(path, u)?;
    }
    Ok(Cluster {
        section: file.cluster,
        k3s: file.k3s,
        sealed_secrets: file.sealed_secrets,
        updates: file.updates,
        nodes,
    })
}

/// `[updates]`: an `http://host:port` server URL (the node's updater puts it in a shell
/// variable and a curl command line, so only URL-safe characters) and ranges.
fn check_updates(path: &Path, u: &Updates) -> Result<()> {
    let rest = u.server.strip_prefix("http://");
    let (host, port) = rest
        .map(|r| r.trim_end_matches('/'))
        .and_then(|r| r.rsplit_once(':'))
        .unwrap_or(("", ""));
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ok = !host.is_empty()
        && host_or_ip_problem(host).is_none()
        && port.parse::<u16>().is_ok_and(|p| p > 0)
        && !rest.is_some_and(|r| r.trim_end_matches('/').contains('/'));
    if !ok {
        return Err(RecipeError::new(
            path,
            "updates.server",
            format!("{:?} is not http://<host>:<port>", u.server),
            "give kiln serve's address as the nodes reach it, e.g. server = \"http://10.0.0.2:8080\" (the port of `kiln serve --http`)",
        ));
    }
    if !(5..=86_400).contains(&u.poll_seconds) {
        return Err(RecipeError::new(
            path,
            "updates.poll_seconds",
            format!("{} seconds is out of range", u.poll_seconds),
            "use 5..86400 (default 60)",
        ));
    }
    for (i, r) in u.drain.iter().enumerate() {
        if !ROLES.contains(&r.as_str()) {
            return Err(RecipeError::new(
                path,
                format!("updates.drain[{i}]"),
                format!("{r:?} is not a role"),
                format!("list roles among {}", ROLES.join(", ")),
            ));
        }
    }
    if !(10..=3600).contains(&u.drain_timeout) {
        return Err(RecipeError::new(
            path,
            "updates.drain_timeout",
            format!("{} seconds is out of range", u.drain_timeout),
            "use 10..3600 (default 300)",
        ));
    }
    if !(1..=10).contains(&u.boot_tries) {
        return Err(RecipeError::new(
            path,
            "updates.boot_tries",
            format!("{} is out of range", u.boot_tries),
            "use 1..10 (default 3): the boots a new build gets before the node falls back",
        ));
    }
    Ok(())
}

/// `[cluster]`: name, SOURCE_DATE_EPOCH, suite, API endpoint.
fn check_section(path: &Path, c: &ClusterSection) -> Result<()> {
    if !is_dns_label(&c.name) {
        return Err(RecipeError::new(
            path,
            "cluster.name",
            format!("{:?} is not a valid name", c.name),
            "use lower-case letters, digits and '-', at most 63 characters",
        ));
    }
    if c.source_date_epoch < MIN_SOURCE_DATE_EPOCH {
        return Err(RecipeError::new(path, "cluster.source_date_epoch", format!("{} is before 1980-01-01", c.source_date_epoch), format!("use a Unix time >= {MIN_SOURCE_DATE_EPOCH}, e.g. the date of your last commit: `git log -1 --format=%ct`")));
    }
    if c.source_date_epoch > MAX_SOURCE_DATE_EPOCH {
        return Err(RecipeError::new(path, "cluster.source_date_epoch", format!("{} is after 2106-02-07 06:28:15 UTC, the last time root.squashfs can store (unsigned 32-bit seconds; the FAT ESP ends at 2107-12-31)", c.source_date_epoch), format!("use a Unix time from {MIN_SOURCE_DATE_EPOCH} to {MAX_SOURCE_DATE_EPOCH}, e.g. `git log -1 --format=%ct`")));
    }
    if c.suite.is_empty()
        || !c
            .suite
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(RecipeError::new(
            path,
            "cluster.suite",
            format!("{:?} is not a Debian suite name", c.suite),
            "use a suite such as \"bookworm\"",
        ));
    }
    if let Some(ep) = &c.api_endpoint {
        if let Some(p) = host_or_ip_problem(ep) {
            return Err(RecipeError::new(
                path,
                "cluster.api_endpoint",
                format!("{ep:?} is not a host name or IP address: {p}"),
                "give an IP (\"10.0.0.10\") or a DNS name (\"k3s.lab.internal\"), without scheme or port",
            ));
        }
    }
    if let Some(d) = &c.domain {
        if let Some(p) = domain_problem(d) {
            return Err(RecipeError::new(
                path,
                "cluster.domain",
                format!("{d:?} is not a DNS domain: {p}"),
                "write dot-separated labels of a-z, 0-9 and '-' (each 1-63 characters), e.g. \"lab.internal\"",
            ));
        }
    }
    Ok(())
}

/// Why `s` is neither a usable IP address nor an RFC 1123 host name.
fn host_or_ip_problem(s: &str) -> Option<String> {
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => host_address_problem(ip).map(|p| format!("the address {p}")),
        Ok(IpAddr::V6(ip)) => (ip.is_unspecified() || ip.is_loopback() || ip.is_multicast())
            .then(|| "not a unicast IPv6 address".to_string()),
        Err(_) if s.contains(':') => {
            Some("not an IP address, and a name has no ':' (no port)".into())
        }
        Err(_) => domain_problem(s),
    }
}

/// Across [cluster] and the nodes: every `<hostname>.<domain>` fits in a DNS name, and an API
/// endpoint that is a node's address is a master's.
fn check_names_and_endpoint(path: &Path, c: &ClusterSection, nodes: &[Node]) -> Result<()> {
    for (i, n) in nodes.iter().enumerate() {
        if let Some(d) = &c.domain {
            let len = n.hostname.len() + 1 + d.len();
            if len > MAX_DNS_NAME {
                return Err(RecipeError::new(
                    path,
                    node_key(i, "hostname"),
                    format!(
                        "{}.{d} is {len} characters, longer than a DNS name ({MAX_DNS_NAME})",
                        n.hostname
                    ),
                    "shorten the hostname or cluster.domain",
                ));
            }
        }
        let own = n.address.split_once('/').map(|(ip, _)| ip);
        if c.api_endpoint.is_some() && own == c.api_endpoint.as_deref() && n.role != "master" {
            return Err(RecipeError::new(
                path,
                "cluster.api_endpoint",
                format!(
                    "{} is the address of {} (role {}), which runs no API server",
                    own.unwrap_or_default(),
                    n.hostname,
                    n.role
                ),
                "give a master's address or a VIP the masters hold",
            ));
        }
    }
    Ok(())
}

/// `[[nodes]]`: each node checked in turn, its MAC normalised; host names and MACs unique.
fn check_nodes(layout: &Layout, path: &Path, file_nodes: Vec<Node>) -> Result<Vec<Node>> {
    let mut nodes = Vec::with_capacity(file_nodes.len());
    let mut hostnames = BTreeSet::new();
    let mut macs = BTreeMap::new();
    let mut addresses = BTreeMap::new();
    for (i, mut n) in file_nodes.into_iter().enumerate() {
        check_hostname(path, i, &n, &mut hostnames)?;
        n.mac = check_mac(path, i, &n, &mut macs)?;
        check_node_role(layout, path, i, &n)?;
        if let Some(ip) = check_node_network(path, i, &n)? {
            if let Some(other) = addresses.insert(ip.addr, n.hostname.clone()) {
                return Err(RecipeError::new(
                    path,
                    node_key(i, "address"),
                    format!("{} is already the address of node {other:?}", ip.addr),
                    "give every node its own address",
                ));
            }
        }
        check_disk(path, i, &n)?;
        check_disks(path, i, &mut n)?;
        nodes.push(n);
    }
    Ok(nodes)
}

/// `disk`: an absolute `/dev/…` path with nothing a shell would read (docs/guide/recipes.md
/// recommends `/dev/disk/by-id/…`: `/dev/sdX` may name another disk after a reboot).
fn check_disk(path: &Path, i: usize, n: &Node) -> Result<()> {
    let Some(d) = &n.disk else { return Ok(()) };
    if let Some(p) = disk_path_problem(d) {
        return Err(RecipeError::new(
            path,
            node_key(i, "disk"),
            format!("{d:?} {p}"),
            "give the device path, preferably a stable one: \"/dev/disk/by-id/…\" or \"/dev/disk/by-path/…\" (`ls -l /dev/disk/by-id/`)",
        ));
    }
    Ok(())
}

/// `[[nodes.disks]]`: stable device paths, at most one data disk, no device twice or equal to
/// the node's `disk`; Longhorn disks' mounts (filled in with their defaults) and tags.
fn check_disks(path: &Path, i: usize, n: &mut Node) -> Result<()> {
    let host = n.hostname.clone();
    let err = |k: String, problem: String, fix: &str| {
        Err(RecipeError::new(
            path,
            k,
            format!("node {host:?}: {problem}"),
            fix,
        ))
    };
    if n.disks.len() > MAX_NODE_DISKS {
        return err(
            node_key(i, "disks"),
            format!("{} disks; at most {MAX_NODE_DISKS}", n.disks.len()),
            "list at most 16 disks per node",
        );
    }
    let mounts = disk_mounts(n);
    let mut data: Option<usize> = None;
    for (j, d) in n.disks.iter().enumerate() {
        let key = |f: &str| node_key(i, &format!("disks[{j}].{f}"));
        let dev = &d.device;
        let stable = STABLE_DISK_PREFIXES.iter().any(|p| dev.starts_with(p));
        if let Some(p) = disk_path_problem(dev).or_else(|| {
            (!stable).then(|| "is not a stable path under /dev/disk/by-id/ or /dev/disk/by-path/ (a /dev/sdX name can change between boots)".into())
        }) {
            return err(
                key("device"),
                format!("{dev:?} {p}"),
                "name the disk by a stable path: `ls -l /dev/disk/by-id/` on the node, e.g. \"/dev/disk/by-id/nvme-Samsung_SSD_970_EVO_1TB_S467NX0M123456\"",
            );
        }
        if n.disk.as_deref() == Some(dev.as_str()) {
            return err(
                key("device"),
                format!("{dev:?} is the node's boot disk (`disk`)"),
                "list only other disks under [[nodes.disks]]: the boot disk already holds the data partition",
            );
        }
        if let Some(k) = n.disks[..j].iter().position(|o| o.device == *dev) {
            return err(
                key("device"),
                format!("{dev:?} is also disks[{k}]"),
                "list each disk once",
            );
        }
        match d.use_ {
            DiskUse::Data => {
                if let Some(k) = data {
                    return err(
                        key("use"),
                        format!("a second data disk (disks[{k}] is one)"),
                        "give a node at most one `use = \"data\"` disk; make the others `use = \"longhorn\"`",
                    );
                }
                data = Some(j);
                if d.mount.is_some() {
                    return err(
                        key("mount"),
                        "a data disk has no mount point: it holds the node's data partition, where the recipe's [persist] paths live".into(),
                        "remove `mount`, or make the disk `use = \"longhorn\"`",
                    );
                }
                if !d.tags.is_empty() {
                    return err(
                        key("tags"),
                        "tags are Longhorn disk tags, and this is a data disk".into(),
                        "remove `tags`, or make the disk `use = \"longhorn\"`",
                    );
                }
            }
            DiskUse::Longhorn => {
                let m = mounts[j].as_deref().expect("longhorn disks have a mount");
                if let Some(p) = super::names::node_path_problem(m) {
                    return err(
                        key("mount"),
                        format!("{m:?} {p}"),
                        "give an absolute, normalised directory, e.g. \"/var/lib/longhorn-disks/nvme0\", or leave `mount` out for /var/lib/longhorn-disks/disk<i>",
                    );
                }
                for (k, o) in mounts[..j].iter().enumerate() {
                    let Some(o) = o else { continue };
                    let clash = if o == m {
                        Some("is also the mount of")
                    } else if super::names::path_is_within(m, o) {
                        Some("is inside the mount of")
                    } else if super::names::path_is_within(o, m) {
                        Some("contains the mount of")
                    } else {
                        None
                    };
                    if let Some(c) = clash {
                        return err(
                            key("mount"),
                            format!("{m:?} {c} disks[{k}] ({o:?})"),
                            "give every Longhorn disk its own mount point, not inside another's",
                        );
                    }
                }
                if d.tags.len() > MAX_DISK_TAGS {
                    return err(
                        key("tags"),
                        format!("{} tags; at most {MAX_DISK_TAGS}", d.tags.len()),
                        "keep at most 16 tags per disk",
                    );
                }
                for (t, tag) in d.tags.iter().enumerate() {
                    let ok = (1..=63).contains(&tag.len())
                        && tag
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
                    if !ok {
                        return err(
                            key(&format!("tags[{t}]")),
                            format!("{tag:?} is not a Longhorn disk tag"),
                            "write 1-63 letters, digits, '_', '.' or '-', e.g. \"nvme\"",
                        );
                    }
                    if d.tags[..t].contains(tag) {
                        return err(
                            key(&format!("tags[{t}]")),
                            format!("{tag:?} is listed twice"),
                            "list each tag once",
                        );
                    }
                }
            }
        }
    }
    for (d, m) in n.disks.iter_mut().zip(mounts) {
        d.mount = m;
    }
    Ok(())
}

/// The checks of `[[nodes.disks]]` that need the role's recipe, for every node of `role`:
/// Longhorn disks only on a role that runs k3s (Longhorn runs on k3s nodes), and no Longhorn
/// mount point equal to, inside, or holding one of the role's persistent paths (a bind mount
/// from the data partition and a disk mount on one path would hide one another).
pub fn check_disks_for_role(
    project: &Project,
    role: &str,
    runs_k3s: bool,
    persist: &[String],
) -> Result<()> {
    let path = project.layout().cluster_file();
    for (i, n) in project.cluster.nodes.iter().enumerate() {
        if n.role != role {
            continue;
        }
        for (j, (d, m)) in n.disks.iter().zip(disk_mounts(n)).enumerate() {
            if d.use_ != DiskUse::Longhorn {
                continue;
            }
            let host = &n.hostname;
            if !runs_k3s {
                return Err(RecipeError::new(
                    &path,
                    node_key(i, &format!("disks[{j}].use")),
                    format!("node {host:?}: a Longhorn disk on role {role:?}, which does not run k3s (Longhorn runs on k3s nodes)"),
                    format!("make the disk `use = \"data\"`, give the node a role that runs k3s, or set [k3s] mode in recipes/{role}.toml"),
                ));
            }
            let m = m.as_deref().unwrap_or_default();
            for p in persist {
                let clash = if p == m {
                    "is"
                } else if names::path_is_within(m, p) {
                    "is inside"
                } else if names::path_is_within(p, m) {
                    "holds"
                } else {
                    continue;
                };
                return Err(RecipeError::new(
                    &path,
                    node_key(i, &format!("disks[{j}].mount")),
                    format!("node {host:?}: the Longhorn disk's mount {m:?} {clash} the persistent path {p:?} of role {role:?} ([persist] paths)"),
                    "mount Longhorn disks outside the persistent paths, e.g. under /var/lib/longhorn-disks (the default); Longhorn's own /var/lib/longhorn lives on the data partition",
                ));
            }
        }
    }
    Ok(())
}

/// `nodes[<i>].<k>`.
fn node_key(i: usize, k: &str) -> String {
    format!("nodes[{i}].{k}")
}

fn check_hostname(path: &Path, i: usize, n: &Node, seen: &mut BTreeSet<String>) -> Result<()> {
    if !is_dns_label(&n.hostname) {
        return Err(RecipeError::new(
            path,
            node_key(i, "hostname"),
            format!("{:?} is not a valid host name", n.hostname),
            "use lower-case letters, digits and '-' (not at either end), at most 63 characters",
        ));
    }
    if n.hostname.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RecipeError::new(
            path,
            node_key(i, "hostname"),
            format!(
                "{:?} is all digits (it reads as a number or an address)",
                n.hostname
            ),
            "start it with a letter, e.g. \"node-1\"",
        ));
    }
    if !seen.insert(n.hostname.clone()) {
        return Err(RecipeError::new(
            path,
            node_key(i, "hostname"),
            format!("{:?} appears twice in the inventory", n.hostname),
            "give every node a unique hostname",
        ));
    }
    Ok(())
}

/// The node's MAC, normalised, unless it is malformed or another node's.
fn check_mac(
    path: &Path,
    i: usize,
    n: &Node,
    seen: &mut BTreeMap<String, String>,
) -> Result<String> {
    let mac = normalize_mac(&n.mac).ok_or_else(|| {
        RecipeError::new(
            path,
            node_key(i, "mac"),
            format!("{:?} is not a MAC address", n.mac),
            "write six hex byte pairs separated by ':' like \"52:54:00:12:34:56\"",
        )
    })?;
    if let Some(p) = mac_problem(&mac) {
        return Err(RecipeError::new(
            path,
            node_key(i, "mac"),
            format!("{mac} {p}"),
            "give the boot NIC's own (unicast) address, as `ip link` shows it on the machine",
        ));
    }
    if let Some(other) = seen.insert(mac.clone(), n.hostname.clone()) {
        return Err(RecipeError::new(
            path,
            node_key(i, "mac"),
            format!("{mac} is already used by node {other:?}"),
            "every node needs its own boot NIC MAC",
        ));
    }
    Ok(mac)
}

/// A role kiln knows, with a recipe file.
fn check_node_role(layout: &Layout, path: &Path, i: usize, n: &Node) -> Result<()> {
    if !ROLES.contains(&n.role.as_str()) {
        return Err(RecipeError::new(
            path,
            node_key(i, "role"),
            format!("unknown role {:?}", n.role),
            format!("use one of {}", ROLES.join(", ")),
        ));
    }
    let role_file = layout.role_recipe(&n.role);
    if !role_file.is_file() {
        return Err(RecipeError::new(
            path,
            node_key(i, "role"),
            format!(
                "role {:?} has no recipe file {}",
                n.role,
                role_file.display()
            ),
            format!("create recipes/{}.toml with `inherits = \"base\"`", n.role),
        ));
    }
    Ok(())
}

/// Address (dhcp or an IPv4 host address in CIDR form), gateway (only with a static address,
/// inside its subnet), DNS servers (unicast, at most three, no repeats); the static address.
fn check_node_network(path: &Path, i: usize, n: &Node) -> Result<Option<Cidr4>> {
    let err = |k: &str, problem: String, fix: &str| {
        Err(RecipeError::new(path, node_key(i, k), problem, fix))
    };
    let cidr = if n.address == "dhcp" {
        None
    } else {
        let Some((ip, prefix)) = parse_cidr(&n.address) else {
            return err(
                "address",
                format!(
                    "{:?} is neither \"dhcp\" nor an address in CIDR form",
                    n.address
                ),
                "write \"dhcp\" or e.g. \"10.0.0.11/24\"",
            );
        };
        let IpAddr::V4(addr) = ip else {
            return err(
                "address",
                format!("{:?} is an IPv6 address", n.address),
                IPV6_FIX,
            );
        };
        if !(8..=32).contains(&prefix) {
            return err(
                "address",
                format!("/{prefix} is not the prefix of a LAN subnet"),
                "give the subnet's prefix length, /8 to /32, e.g. \"10.0.0.11/24\"",
            );
        }
        if let Some(p) = host_address_problem(addr) {
            return err(
                "address",
                format!("{addr} {p}"),
                "give the node an address from its LAN",
            );
        }
        let c = Cidr4 { addr, prefix };
        // /31 (RFC 3021) and /32 have no network or broadcast address.
        if prefix <= 30 && (addr == c.network() || addr == c.broadcast()) {
            let which = if addr == c.network() {
                "network"
            } else {
                "broadcast"
            };
            return err(
                "address",
                format!("{addr} is the {which} address of {}/{prefix}", c.network()),
                &format!(
                    "use a host address between {} and {}",
                    Ipv4Addr::from(u32::from(c.network()) + 1),
                    Ipv4Addr::from(u32::from(c.broadcast()) - 1)
                ),
            );
        }
        Some(c)
    };
    if let Some(gw) = &n.gateway {
        let Some(c) = cidr else {
            return err(
                "gateway",
                "a gateway is set but the address is dhcp".into(),
                "remove gateway, or give a static address",
            );
        };
        let g = match gw.parse::<IpAddr>() {
            Ok(IpAddr::V4(g)) => g,
            Ok(IpAddr::V6(_)) => {
                return err("gateway", format!("{gw:?} is an IPv6 address"), IPV6_FIX)
            }
            Err(_) => {
                return err(
                    "gateway",
                    format!("{gw:?} is not an IP address"),
                    "write e.g. \"10.0.0.1\"",
                )
            }
        };
        if let Some(p) = host_address_problem(g) {
            return err(
                "gateway",
                format!("{g} {p}"),
                "give the router's address on the node's subnet",
            );
        }
        if g == c.addr {
            return err(
                "gateway",
                format!("{g} is the node's own address"),
                "give the router's address, not the node's",
            );
        }
        if !c.contains(g) || (c.prefix <= 30 && (g == c.network() || g == c.broadcast())) {
            return err(
                "gateway",
                format!(
                    "{g} is not a host of the node's subnet {}/{}",
                    c.network(),
                    c.prefix
                ),
                "give a router on that subnet, or correct the address's prefix length",
            );
        }
    }
    if n.dns.len() > 3 {
        return err(
            "dns",
            format!(
                "{} DNS servers; the resolver uses only the first 3",
                n.dns.len()
            ),
            "list at most three DNS servers",
        );
    }
    for (j, d) in n.dns.iter().enumerate() {
        let key = format!("dns[{j}]");
        let ip = match d.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => ip,
            Ok(IpAddr::V6(_)) => return err(&key, format!("{d:?} is an IPv6 address"), IPV6_FIX),
            Err(_) => {
                return err(
                    &key,
                    format!("{d:?} is not an IP address"),
                    "list DNS servers as IPs, e.g. [\"10.0.0.1\"]",
                )
            }
        };
        if let Some(p) = dns_server_problem(ip) {
            return err(
                &key,
                format!("{ip} {p}"),
                "list the unicast addresses of DNS servers, e.g. [\"10.0.0.1\"]",
            );
        }
        if n.dns[..j].contains(d) {
            return err(
                &key,
                format!("{d} is listed twice"),
                "list each DNS server once",
            );
        }
    }
    Ok(cidr)
}

/// `[k3s]`: pins, CIDRs, kubeconfig mode, registries file; warns on an even number of masters.
fn check_k3s(layout: &Layout, path: &Path, k: &K3sCluster, nodes: &[Node]) -> Result<()> {
    validate_pinned(path, "k3s.binary", &k.binary)?;
    if let Some(a) = &k.airgap_images {
        validate_pinned(path, "k3s.airgap_images", a)?;
        const EXT: &[&str] = &[
            ".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst", ".tar.lz4", ".tar.bz2",
        ];
        if !EXT.iter().any(|e| a.url.ends_with(e)) {
            return Err(RecipeError::new(
                path,
                "k3s.airgap_images.url",
                format!("{:?} does not end in an extension k3s imports", a.url),
                format!("k3s reads {} from its images directory", EXT.join(" ")),
            ));
        }
    }
    check_k3s_networks(path, k, nodes)?;
    check_k3s_names(path, k)?;
    if let Some(e) = &k.etcd_snapshots {
        check_etcd_snapshots(path, k, e)?;
    }
    if let Some(w) = k.founding_wait {
        if w > 3600 {
            return Err(RecipeError::new(
                path,
                "k3s.founding_wait",
                format!("{w} seconds"),
                "wait at most 3600 seconds (default 120): the first master founds the cluster only after no other master answered for this long",
            ));
        }
    }
    if let Some(r) = &k.restore {
        let s = &r.snapshot;
        let ok = !s.is_empty()
            && s.len() <= 255
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-/:+".contains(&b))
            && !s.split('/').any(|c| c == "..");
        if !ok {
            return Err(RecipeError::new(
                path,
                "k3s.restore.snapshot",
                format!("{s:?} is not a snapshot name or an absolute path on the node"),
                "name the snapshot as `k3s etcd-snapshot ls` lists it (letters, digits, '.', '_', '-', ':', '+'), or give its absolute path on the first master, e.g. \"/var/lib/rancher/k3s/server/db/snapshots/etcd-snapshot-master-1-1733000000\"",
            ));
        }
        if s.contains('/') && !s.starts_with('/') {
            return Err(RecipeError::new(
                path,
                "k3s.restore.snapshot",
                format!("{s:?} is a relative path"),
                "give the snapshot file's absolute path on the first master, or a snapshot name in the S3 bucket of [k3s.etcd_snapshots.s3]",
            ));
        }
        if !s.starts_with('/')
            && k.etcd_snapshots
                .as_ref()
                .and_then(|e| e.s3.as_ref())
                .is_none()
        {
            return Err(RecipeError::new(
                path,
                "k3s.restore.snapshot",
                format!("{s:?} is a snapshot name, but there is no [k3s.etcd_snapshots.s3] to fetch it from"),
                "give the snapshot file's absolute path on the first master, or configure [k3s.etcd_snapshots.s3]",
            ));
        }
        if k.bootstrapped {
            return Err(RecipeError::new(
                path,
                "k3s.restore",
                "a restore makes the first master found the cluster again from the snapshot, but bootstrapped = true forbids founding",
                "remove bootstrapped = true while restoring",
            ));
        }
    }
    if let Some(m) = &k.write_kubeconfig_mode {
        if m.len() != 4 || !m.starts_with('0') || !m.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(RecipeError::new(
                path,
                "k3s.write_kubeconfig_mode",
                format!("{m:?} is not an octal file mode"),
                "write e.g. \"0600\" or \"0644\"",
            ));
        }
    }
    if let Some(r) = &k.registries {
        super::confine::recipe_file(layout, r, registries_named_by(path))?;
    }
    let masters = nodes.iter().filter(|n| n.role == "master").count();
    if masters > 1 && masters % 2 == 0 {
        // The log target this warning has always had (it was in recipe.rs).
        tracing::warn!(target: "kiln::project::recipe", "{}: {masters} masters: embedded etcd wants an odd number of servers to keep quorum", path.display());
    }
    Ok(())
}

/// `[k3s.etcd_snapshots]`: a five-field cron schedule, a retention of 1-1000, an S3 endpoint
/// without scheme or path, an S3 bucket name, a credentials file name in keys/.
fn check_etcd_snapshots(path: &Path, k: &K3sCluster, e: &EtcdSnapshots) -> Result<()> {
    let err = |key: &str, problem: String, fix: &str| {
        Err(RecipeError::new(
            path,
            format!("k3s.etcd_snapshots.{key}"),
            problem,
            fix,
        ))
    };
    if let Some(c) = &e.schedule {
        let fields: Vec<&str> = c.split_whitespace().collect();
        let ok = fields.len() == 5
            && fields.iter().all(|f| {
                f.bytes()
                    .all(|b| b.is_ascii_digit() || b"*/,-".contains(&b))
            });
        if !ok {
            return err(
                "schedule",
                format!("{c:?} is not a five-field cron schedule"),
                "write minute hour day-of-month month day-of-week, e.g. \"0 */6 * * *\" (every 6 hours)",
            );
        }
    }
    if let Some(r) = e.retention {
        if !(1..=1000).contains(&r) {
            return err(
                "retention",
                format!("{r} snapshots"),
                "keep between 1 and 1000",
            );
        }
    }
    if let Some(s3) = &e.s3 {
        let ep = &s3.endpoint;
        let host = ep
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()) && !p.is_empty())
            .map(|(h, _)| h)
            .unwrap_or(ep);
        if ep.contains("://") || ep.contains('/') || host_or_ip_problem(host).is_some() {
            return err(
                "s3.endpoint",
                format!("{ep:?} is not host[:port]"),
                "write the S3 server's host and port without scheme or path, e.g. \"minio.lab.internal:9000\" (plain HTTP: insecure = true)",
            );
        }
        let b = &s3.bucket;
        let bucket_ok = (3..=63).contains(&b.len())
            && b.bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
            && b.as_bytes()[0].is_ascii_alphanumeric()
            && b.as_bytes()[b.len() - 1].is_ascii_alphanumeric();
        if !bucket_ok {
            return err(
                "s3.bucket",
                format!("{b:?} is not an S3 bucket name"),
                "3-63 characters of a-z, 0-9, '.' and '-', starting and ending with a letter or digit",
            );
        }
        for (key, v) in [("s3.folder", &s3.folder), ("s3.region", &s3.region)] {
            if let Some(v) = v {
                if v.is_empty() || v.chars().any(|c| c.is_control() || c == '"' || c == '\\') {
                    return err(
                        key,
                        format!("{v:?} is empty or has control characters or quotes"),
                        "write a plain name, e.g. \"homelab\"",
                    );
                }
            }
        }
        let c = &s3.credentials;
        if c.is_empty() || c.contains('/') || c.starts_with('.') {
            return err(
                "s3.credentials",
                format!("{c:?} is not a file name in keys/"),
                "name a file in keys/ (e.g. \"etcd-s3.credentials\", mode 0600) holding `access_key = …` and `secret_key = …` lines",
            );
        }
        if k.token_delivery == TokenDelivery::Seed {
            return err(
                "s3.credentials",
                "S3 credentials are baked into master images, but token_delivery = \"seed\" keeps images free of secrets".into(),
                "deliver the token by image, or remove [k3s.etcd_snapshots.s3] (snapshots then stay on the masters' data partitions)",
            );
        }
    }
    Ok(())
}

/// Who names the registries file: `[k3s] registries` of cluster.toml (at `path`).
pub fn registries_named_by(path: &Path) -> super::confine::NamedBy<'_> {
    super::confine::NamedBy {
        file: path,
        key: "k3s.registries",
        fix: "give a path relative to recipes/ of a file inside the project, e.g. \"registries.yaml\"",
    }
}

/// `cluster_cidr` and `service_cidr`: one subnet or a dual-stack pair (one per family), written
/// as the network (no host bits), not overlapping each other or a node's subnet.
fn check_k3s_networks(path: &Path, k: &K3sCluster, nodes: &[Node]) -> Result<()> {
    let node_nets: Vec<(Cidr4, &str)> = nodes
        .iter()
        .filter_map(|n| match parse_cidr(&n.address)? {
            (IpAddr::V4(addr), prefix) => Some((Cidr4 { addr, prefix }, n.hostname.as_str())),
            _ => None,
        })
        .collect();
    let mut seen: Vec<(Cidr4, &str)> = Vec::new();
    for (key, v) in [
        ("k3s.cluster_cidr", &k.cluster_cidr),
        ("k3s.service_cidr", &k.service_cidr),
    ] {
        let Some(v) = v else { continue };
        let err = |problem: String| {
            Err(RecipeError::new(path, key, problem, "write the network, e.g. \"10.42.0.0/16\" (or a dual-stack pair \"10.42.0.0/16,fd00:42::/56\")"))
        };
        let parts: Vec<&str> = v.split(',').collect();
        let mut families = BTreeSet::new();
        for part in &parts {
            let Some((ip, prefix)) = parse_cidr(part) else {
                return err(format!("{part:?} is not a CIDR"));
            };
            families.insert(ip.is_ipv4());
            match ip {
                IpAddr::V4(addr) => {
                    let c = Cidr4 { addr, prefix };
                    if c.network() != addr || prefix == 0 {
                        return err(format!(
                            "{part:?} is not a network address (its network is {}/{prefix})",
                            c.network()
                        ));
                    }
                    if let Some((o, what)) = node_nets
                        .iter()
                        .map(|(n, h)| (n, format!("node {h}'s subnet")))
                        .chain(seen.iter().map(|(n, k)| (n, k.to_string())))
                        .find(|(o, _)| o.overlaps(&c))
                    {
                        return err(format!("{c} overlaps {what} {}/{}", o.network(), o.prefix));
                    }
                    seen.push((c, key));
                }
                IpAddr::V6(a) => {
                    let bits = u128::from(a);
                    let host = bits & u128::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
                    if prefix == 0 || host != 0 {
                        return err(format!("{part:?} is not an IPv6 network address"));
                    }
                }
            }
        }
        if parts.len() > 2 || families.len() != parts.len() {
            return err(format!("{v:?} is neither one CIDR nor an IPv4,IPv6 pair"));
        }
    }
    Ok(())
}

/// `disable` (k3s's components), `tls_san` (names and addresses), `cluster_domain`.
fn check_k3s_names(path: &Path, k: &K3sCluster) -> Result<()> {
    for (i, d) in k.disable.iter().enumerate() {
        if !K3S_COMPONENTS.contains(&d.as_str()) {
            return Err(RecipeError::new(
                path,
                format!("k3s.disable[{i}]"),
                format!("{d:?} is not a component k3s can disable"),
                format!("use one of {}", K3S_COMPONENTS.join(", ")),
            ));
        }
    }
    for (i, san) in k.tls_san.iter().enumerate() {
        let name = san.strip_prefix("*.").unwrap_or(san);
        if let Some(p) = host_or_ip_problem(name) {
            return Err(RecipeError::new(
                path,
                format!("k3s.tls_san[{i}]"),
                format!("{san:?} is not a DNS name or IP address: {p}"),
                "give a name (\"k3s.lab.internal\", \"*.lab.internal\") or an IP address",
            ));
        }
    }
    if let Some(d) = &k.cluster_domain {
        if let Some(p) = domain_problem(d) {
            return Err(RecipeError::new(
                path,
                "k3s.cluster_domain",
                format!("{d:?} is not a DNS domain: {p}"),
                "write e.g. \"cluster.local\"",
            ));
        }
    }
    Ok(())
}

/// `[sealed_secrets]`: the chart pin, and the SealedSecret files under recipes/.
fn check_sealed_secrets(layout: &Layout, path: &Path, ss: &SealedSecretsConfig) -> Result<()> {
    if let Some(c) = &ss.chart {
        validate_pinned(path, "sealed_secrets.chart", c)?;
    }
    // Both go into the HelmChart manifest masters deploy.
    let url_ok = ss.chart_repo.starts_with("https://") || ss.chart_repo.starts_with("http://");
    if !url_ok || ss.chart_repo.len() > 2048 || !ss.chart_repo.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(RecipeError::new(path, "sealed_secrets.chart_repo", format!("{:?} is not an http(s) URL", ss.chart_repo), "give the chart repository's URL, e.g. \"https://bitnami-labs.github.io/sealed-secrets\""));
    }
    let v = &ss.chart_version;
    if v.is_empty()
        || v.len() > 64
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return Err(RecipeError::new(
            path,
            "sealed_secrets.chart_version",
            format!("{v:?} is not a chart version"),
            "write a version like \"2.17.2\"",
        ));
    }
    for (i, f) in ss.secrets.iter().enumerate() {
        super::confine::recipe_file(
            layout,
            f,
            super::confine::NamedBy {
                file: path,
                key: &format!("sealed_secrets.secrets[{i}]"),
                fix: "give a path relative to recipes/ of a file inside the project, e.g. \"secrets/db.yaml\" (made with `kiln seal`)",
            },
        )?;
    }
    Ok(())
}
