//! Role recipes, `recipes/<name>.toml`: their schema ([`RecipeFile`] as written, [`Recipe`]
//! merged), and [`load_role`], which follows `inherits` to the root and merges the chain.
//!
//! Every user error is a [`RecipeError`] naming the file, the key and how to fix it; the CLI
//! maps it to exit status 2. Nothing is written before this stage has accepted the input.

use super::confine;
use super::error::Result;
use super::files::{parse_toml, validate_pinned};
use super::inventory::ROLES;
use super::layout::Layout;
use super::names::{is_dns_label, node_path_problem, path_is_within};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

// The inventory's types, where callers outside project/ have always found them.
pub use super::error::RecipeError;
pub use super::files::Pinned;
pub use super::inventory::{
    load_project, normalize_mac, Cluster, K3sCluster, Node, Project, SealedSecretsConfig,
    TokenDelivery,
};

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
    #[serde(default)]
    pub persist: PersistFile,
    #[serde(default)]
    pub health: HealthFile,
}

/// `[health]` of a recipe: what a healthy node of the role is, beyond kiln's own checks (k3s
/// active, the boot marker). A new build's boot entry is blessed only when every check passes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    /// Seconds k3s has to become active (default [`DEFAULT_K3S_HEALTH_TIMEOUT`]).
    pub k3s_timeout: Option<u32>,
    /// Checks, merged along `inherits` (a later check of the same name replaces an earlier).
    #[serde(default)]
    pub checks: Vec<HealthCheck>,
}

/// One `[[health.checks]]`: `command` (run by `sh -c` on the node) must exit 0 within `timeout`
/// seconds; it is run again every few seconds until then.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub name: String,
    pub command: String,
    pub timeout: u32,
}

/// Default of `health.k3s_timeout`: k3s's first start (images imported, etcd) takes minutes.
pub const DEFAULT_K3S_HEALTH_TIMEOUT: u32 = 600;
/// Longest `timeout` of a check (and of `k3s_timeout`).
pub const MAX_HEALTH_TIMEOUT: u32 = 3600;
/// Most `[[health.checks]]` after merging.
pub const MAX_HEALTH_CHECKS: usize = 32;

/// `[persist]` of a recipe: directories that live on the node's data partition.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistFile {
    /// Absolute directories kept on the data partition (merged along `inherits`).
    #[serde(default)]
    pub paths: Vec<String>,
    /// `false` drops kiln's built-in per-role paths ([`default_persist_paths`]); absent =
    /// the parent's choice (true at the root).
    pub defaults: Option<bool>,
}

/// `[k3s]` of a role recipe: how this role runs k3s.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K3sRoleFile {
    /// `server` (control plane), `agent` or `none`; absent = no k3s on this role. Read as a
    /// string and parsed by [`load_role`] ([`K3sMode::parse`]), so that a bad value is
    /// reported with the recipe stage's message.
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
    /// Size of the EFI system partition in MiB (0 or absent = sized to fit twice the content).
    pub esp_size_mib: Option<u64>,
    /// Size of each root slot (kiln-root-a, and kiln-root-b made at first boot) in MiB.
    pub root_slot_mib: Option<u64>,
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

// ---------------------------------------------------------------------------------------------
// Merged, validated values (what the pipeline consumes; serialised canonically for the build id)

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
    pub persist: Persist,
    pub health: Health,
}

/// `[health]`, merged.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub k3s_timeout: u32,
    pub checks: Vec<HealthCheck>,
}

/// `[persist]`, merged: what lives on the node's data partition.
#[derive(Debug, Clone, Serialize)]
pub struct Persist {
    /// kiln's defaults for the role (unless `defaults = false`), then the recipes' paths,
    /// parent first, without duplicates; none is inside another.
    pub paths: Vec<String>,
}

/// Where the merged `[persist] paths` are written in every image, one per line.
pub const PERSIST_LIST: &str = "usr/lib/kiln/persist.list";

/// The most paths `[persist]` may list, defaults included.
pub const MAX_PERSIST_PATHS: usize = 64;

/// Persistent paths of every role: none. Not `/var/lib/cloud`: cloud-init's state records that
/// this instance ran its per-instance modules (users and SSH keys, write_files such as the
/// seed's k3s token, the network configuration), whose results live in `/etc` and `/root`,
/// which come fresh from the image on every boot; kept, it would make cloud-init skip them on
/// the second boot and leave the node without them. The seed is applied again on every boot.
const DEFAULT_PERSIST_ALL: &[&str] = &[];

/// Persistent paths of every k3s role: k3s's data dir (on servers also etcd, in
/// `/var/lib/rancher/k3s/server/db`, and its snapshots), kubelet, the node password, CNI state
/// and pod logs.
const DEFAULT_PERSIST_K3S: &[&str] = &[
    "/var/lib/rancher",
    "/var/lib/kubelet",
    "/etc/rancher/node",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
];

/// kiln's built-in persistent paths for a role running k3s in `mode`.
pub fn default_persist_paths(mode: K3sMode) -> Vec<String> {
    let k3s: &[&str] = if mode.runs_k3s() {
        DEFAULT_PERSIST_K3S
    } else {
        &[]
    };
    DEFAULT_PERSIST_ALL
        .iter()
        .chain(k3s)
        .map(|p| p.to_string())
        .collect()
}

/// The text of [`PERSIST_LIST`]: one path per line, in merge order (empty when there are none).
pub fn persist_list(recipe: &Recipe) -> String {
    recipe
        .persist
        .paths
        .iter()
        .map(|p| format!("{p}\n"))
        .collect()
}

/// How a role runs k3s (`[k3s] mode`); serialised as the recipe spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum K3sMode {
    /// Control plane: `k3s server`.
    Server,
    /// `k3s agent`, joining a server.
    Agent,
    /// No k3s on this role (also when `mode` is absent).
    None,
}

impl K3sMode {
    /// The recipe spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            K3sMode::Server => "server",
            K3sMode::Agent => "agent",
            K3sMode::None => "none",
        }
    }
    /// The mode a recipe spells `s`, if any.
    pub fn parse(s: &str) -> Option<K3sMode> {
        [K3sMode::Server, K3sMode::Agent, K3sMode::None]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
    /// The role runs k3s (server or agent).
    pub fn runs_k3s(self) -> bool {
        self != K3sMode::None
    }
    /// The role is a k3s server (control plane).
    pub fn is_server(self) -> bool {
        self == K3sMode::Server
    }
    /// The role is a k3s agent.
    pub fn is_agent(self) -> bool {
        self == K3sMode::Agent
    }
}

impl fmt::Display for K3sMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct K3sRole {
    pub mode: K3sMode,
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
    /// Size of each root slot in MiB ([`DEFAULT_ROOT_SLOT_MIB`] unless a recipe says).
    pub root_slot_mib: u64,
    /// The recipe that set `root_slot_mib` last (for errors), if any did.
    #[serde(skip)]
    pub root_slot_from: Option<PathBuf>,
}

/// Default size of a root slot: room for a role's squashfs to grow to a few times a worker's
/// (~240 MB today) before the partition layout — and with it `kiln flash --keep-data` — has to
/// change.
pub const DEFAULT_ROOT_SLOT_MIB: u64 = 2048;

#[derive(Debug, Clone, Serialize)]
pub struct Systemd {
    pub enable: Vec<String>,
    pub mask: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Loading and merging

/// mmdebstrap's variants.
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

/// Loads `recipes/<role>.toml`, follows `inherits` to the root and merges:
/// lists concatenate (parent first, duplicates dropped), scalars of the child override.
pub fn load_role(project: &Project, role: &str) -> Result<Recipe> {
    let layout = project.layout();
    let cluster_file = layout.cluster_file();
    if !ROLES.contains(&role) {
        return Err(RecipeError::new(
            &cluster_file,
            "--role",
            format!("unknown role {role:?}"),
            format!("use one of {}", ROLES.join(", ")),
        ));
    }
    let chain = read_chain(&layout, &cluster_file, role)?;
    let mut merged = Merged::default();
    for link in &chain {
        merged.add(&layout, &link.path, &link.file)?;
    }
    let role_path = chain.last().expect("chain has the role").path.clone();
    if merged.components.is_empty() {
        merged.components.push("main".into());
    }
    let variant = merged.variant.take().unwrap_or_else(|| "minbase".into());
    if !VARIANTS.contains(&variant.as_str()) {
        return Err(RecipeError::new(
            &role_path,
            "debian.variant",
            format!("unknown mmdebstrap variant {variant:?}"),
            format!("use one of {}", VARIANTS.join(", ")),
        ));
    }
    let mode = check_k3s_role(project, role, &cluster_file, &role_path, &merged)?;
    let persist = merged.persist_paths(mode, &role_path)?;
    crate::project::inventory::check_disks_for_role(project, role, mode.runs_k3s(), &persist)?;
    let chain = chain.into_iter().map(|l| l.name).collect();
    let mut recipe = merged.into_recipe(role, chain, &project.cluster.section.suite, variant, mode);
    recipe.persist.paths = persist;
    Ok(recipe)
}

/// One recipe of a role's inheritance chain.
struct Link {
    name: String,
    path: PathBuf,
    file: RecipeFile,
}

/// Reads the role's recipe and every recipe it inherits, root first.
fn read_chain(layout: &Layout, cluster_file: &Path, role: &str) -> Result<Vec<Link>> {
    // Walk the chain child → root.
    let mut chain: Vec<Link> = Vec::new();
    let mut name = role.to_string();
    loop {
        let path = layout.role_recipe(&name);
        if chain.iter().any(|l| l.name == name) {
            let from = &chain.last().map(|l| l.path.clone()).unwrap_or_default();
            return Err(RecipeError::new(
                from,
                "inherits",
                format!("inheritance cycle through {name:?}"),
                "make the chain end at a recipe without `inherits` (base)",
            ));
        }
        let (from, key) = match chain.last() {
            Some(l) => (l.path.clone(), "inherits"),
            None => (cluster_file.to_path_buf(), "--role"),
        };
        if !is_recipe_name(&name) {
            return Err(RecipeError::new(
                &from,
                key,
                format!("{name:?} is not a recipe name"),
                "give the name of a file in recipes/ without .toml, e.g. \"base\" (no /, no ..)",
            ));
        }
        let by = confine::NamedBy {
            file: &from,
            key,
            fix: "keep recipes inside the project's recipes/ (a symlink may point only inside the project)",
        };
        if confine::optional_file(layout, &path, by)?.is_none() {
            return Err(RecipeError::new(
                &from,
                key,
                format!("recipe {name:?} not found at {}", path.display()),
                format!("create recipes/{name}.toml or fix the name"),
            ));
        }
        let file: RecipeFile = parse_toml(layout, &path)?;
        let parent = file.inherits.clone();
        chain.push(Link {
            name: name.clone(),
            path,
            file,
        });
        match parent {
            Some(p) => name = p,
            None => break,
        }
    }
    chain.reverse();
    Ok(chain)
}

/// The chain merged so far.
#[derive(Default)]
struct Merged {
    description: String,
    variant: Option<String>,
    mirror: Option<String>,
    components: Vec<String>,
    packages: Vec<String>,
    remove: Vec<String>,
    debs: Vec<Pinned>,
    sign_modules: bool,
    customize: Vec<String>,
    cmdline: Vec<String>,
    esp_size_mib: Option<u64>,
    root_slot_mib: Option<(u64, PathBuf)>,
    enable: Vec<String>,
    mask: Vec<String>,
    /// The last `k3s.mode` and the recipe that set it.
    k3s_mode: Option<(K3sMode, PathBuf)>,
    node_labels: Vec<String>,
    node_taints: Vec<String>,
    manifests: Vec<String>,
    charts: Vec<ChartFile>,
    /// `[persist] paths` with the recipe that listed each.
    persist: Vec<(String, PathBuf)>,
    /// The last `persist.defaults`.
    persist_defaults: Option<bool>,
    k3s_health_timeout: Option<u32>,
    health_checks: Vec<HealthCheck>,
}

impl Merged {
    /// Checks one recipe of the chain (at `path`) and merges it in.
    fn add(&mut self, layout: &Layout, path: &Path, f: &RecipeFile) -> Result<()> {
        self.add_k3s(layout, path, &f.k3s)?;
        if let Some(d) = &f.description {
            self.description = d.clone();
        }
        if let Some(v) = &f.debian.variant {
            self.variant = Some(v.clone());
        }
        if let Some(m) = &f.debian.mirror {
            self.mirror = Some(m.clone());
        }
        check_packages(path, &f.debian.packages)?;
        check_units(path, &f.systemd)?;
        if let Some(s) = f.boot.esp_size_mib {
            if s != 0 && !(64..=4096).contains(&s) {
                return Err(RecipeError::new(
                    path,
                    "boot.esp_size_mib",
                    format!("{s} MiB is out of range"),
                    "use 0 (fit to content) or 64..4096",
                ));
            }
            self.esp_size_mib = Some(s);
        }
        if let Some(s) = f.boot.root_slot_mib {
            if !(256..=65536).contains(&s) {
                return Err(RecipeError::new(
                    path,
                    "boot.root_slot_mib",
                    format!("{s} MiB is out of range"),
                    "use 256..65536 (MiB); each root slot holds one build's root.squashfs",
                ));
            }
            self.root_slot_mib = Some((s, path.to_path_buf()));
        }
        self.add_debian(path, &f.debian)?;
        self.add_persist(path, &f.persist)?;
        self.add_health(path, &f.health)?;
        merge_list(&mut self.cmdline, &f.boot.cmdline);
        merge_list(&mut self.enable, &f.systemd.enable);
        merge_list(&mut self.mask, &f.systemd.mask);
        Ok(())
    }

    /// `[k3s]`: mode, manifests, charts, node labels and taints.
    fn add_k3s(&mut self, layout: &Layout, path: &Path, k: &K3sRoleFile) -> Result<()> {
        if let Some(m) = &k.mode {
            let mode = K3sMode::parse(m).ok_or_else(|| {
                RecipeError::new(
                    path,
                    "k3s.mode",
                    format!("unknown k3s mode {m:?}"),
                    "use \"server\", \"agent\" or \"none\"",
                )
            })?;
            self.k3s_mode = Some((mode, path.to_path_buf()));
        }
        for (i, m) in k.manifests.iter().enumerate() {
            let key = format!("k3s.manifests[{i}]");
            confine::recipe_file(
                layout,
                m,
                confine::NamedBy {
                    file: path,
                    key: &key,
                    fix: "give a path relative to recipes/, e.g. \"manifests/metallb.yaml\", of a file inside the project",
                },
            )?;
            if !self.manifests.contains(m) {
                self.manifests.push(m.clone());
            }
        }
        for (i, c) in k.charts.iter().enumerate() {
            self.add_chart(layout, path, i, c)?;
        }
        check_labels_and_taints(path, k)?;
        merge_list(&mut self.node_labels, &k.node_labels);
        merge_list(&mut self.node_taints, &k.node_taints);
        Ok(())
    }

    /// `[health]`: timeouts in range; names and commands one line each (the node reads them
    /// from a tab-separated file), a later check of the same name replaces an earlier one.
    fn add_health(&mut self, path: &Path, h: &HealthFile) -> Result<()> {
        let range = |key: &str, t: u32| {
            if (1..=MAX_HEALTH_TIMEOUT).contains(&t) {
                Ok(())
            } else {
                Err(RecipeError::new(
                    path,
                    key,
                    format!("{t} seconds is out of range"),
                    format!("use 1..{MAX_HEALTH_TIMEOUT} (seconds)"),
                ))
            }
        };
        if let Some(t) = h.k3s_timeout {
            range("health.k3s_timeout", t)?;
            self.k3s_health_timeout = Some(t);
        }
        for (i, c) in h.checks.iter().enumerate() {
            let key = |k: &str| format!("health.checks[{i}].{k}");
            range(&key("timeout"), c.timeout)?;
            for (k, v, max) in [("name", &c.name, 64), ("command", &c.command, 4096)] {
                let bad = v.trim().is_empty() || v.len() > max || v.chars().any(|c| c.is_control());
                if bad {
                    return Err(RecipeError::new(
                        path,
                        key(k),
                        format!("{v:?} is empty, longer than {max} bytes or has a control character (tab, newline)"),
                        "write it on one line, e.g. command = \"curl -fsS http://127.0.0.1:8080/healthz\"",
                    ));
                }
            }
            self.health_checks.retain(|o| o.name != c.name);
            self.health_checks.push(c.clone());
        }
        if self.health_checks.len() > MAX_HEALTH_CHECKS {
            return Err(RecipeError::new(
                path,
                "health.checks",
                format!(
                    "{} checks; at most {MAX_HEALTH_CHECKS}",
                    self.health_checks.len()
                ),
                "combine checks into one script",
            ));
        }
        Ok(())
    }

    /// `[persist]`: each path checked ([`node_path_problem`]), merged without duplicates.
    fn add_persist(&mut self, path: &Path, p: &PersistFile) -> Result<()> {
        for entry in &p.paths {
            if let Some(problem) = node_path_problem(entry) {
                return Err(RecipeError::new(
                    path,
                    "persist.paths",
                    format!("{entry:?} {problem}"),
                    "list absolute, normalised directories of the node, e.g. \"/var/lib/longhorn\" (not /, /etc or /var themselves, nothing under /proc /sys /dev /run /tmp /boot /efi /usr /bin /sbin /lib*)",
                ));
            }
            if !self.persist.iter().any(|(q, _)| q == entry) {
                self.persist.push((entry.clone(), path.to_path_buf()));
            }
        }
        if let Some(d) = p.defaults {
            self.persist_defaults = Some(d);
        }
        Ok(())
    }

    /// The merged persistent paths: the role's defaults (unless turned off), then the recipes'
    /// paths; none inside another, at most [`MAX_PERSIST_PATHS`]. `role_path` is the role's
    /// own recipe, named when the list is too long.
    fn persist_paths(&self, mode: K3sMode, role_path: &Path) -> Result<Vec<String>> {
        let mut all: Vec<(String, Option<&Path>)> = Vec::new();
        if self.persist_defaults != Some(false) {
            all.extend(default_persist_paths(mode).into_iter().map(|p| (p, None)));
        }
        for (p, from) in &self.persist {
            if !all.iter().any(|(q, _)| q == p) {
                all.push((p.clone(), Some(from.as_path())));
            }
        }
        let name = |x: &str, f: Option<&Path>| match f {
            None => format!("kiln's default {x:?}"),
            Some(f) => format!("{x:?} (from {})", f.display()),
        };
        for (i, (p, from)) in all.iter().enumerate() {
            for (q, q_from) in &all[..i] {
                let ((inner, in_from), (outer, out_from)) = if path_is_within(p, q) {
                    ((p, *from), (q, *q_from))
                } else if path_is_within(q, p) {
                    ((q, *q_from), (p, *from))
                } else {
                    continue;
                };
                // The later entry is the one a recipe added (defaults come first).
                let file = from.or(*q_from).unwrap_or(role_path);
                return Err(RecipeError::new(
                    file,
                    "persist.paths",
                    format!(
                        "{} is inside {}: a directory on the data partition keeps everything under it",
                        name(inner, in_from),
                        name(outer, out_from),
                    ),
                    format!("remove {inner:?} (it is kept already), or list subdirectories instead of {outer:?} (`defaults = false` under [persist] drops kiln's defaults)"),
                ));
            }
        }
        if all.len() > MAX_PERSIST_PATHS {
            return Err(RecipeError::new(
                role_path,
                "persist.paths",
                format!(
                    "{} persistent paths (defaults included); at most {MAX_PERSIST_PATHS}",
                    all.len()
                ),
                "keep a parent directory instead of many of its subdirectories",
            ));
        }
        Ok(all.into_iter().map(|(p, _)| p).collect())
    }

    /// `k3s.charts[i]`: a later chart of the same name replaces an earlier one.
    fn add_chart(&mut self, layout: &Layout, path: &Path, i: usize, c: &ChartFile) -> Result<()> {
        let key = format!("k3s.charts[{i}]");
        if !is_dns_label(&c.name) || !is_dns_label(&c.namespace) {
            return Err(RecipeError::new(
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
            confine::recipe_file(
                layout,
                v,
                confine::NamedBy {
                    file: path,
                    key: &format!("{key}.values"),
                    fix: "give a path relative to recipes/ of a file inside the project",
                },
            )?;
        }
        self.charts.retain(|x| x.name != c.name);
        self.charts.push(c.clone());
        Ok(())
    }

    /// `[debian]` lists: components, packages, remove, debs, sign_modules, customize.
    fn add_debian(&mut self, path: &Path, d: &DebianFile) -> Result<()> {
        merge_list(&mut self.components, &d.components);
        merge_list(&mut self.packages, &d.packages);
        for (i, r) in d.remove.iter().enumerate() {
            let n = r.trim_start_matches('/').trim_end_matches('/').to_string();
            if n.is_empty() || n.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
                return Err(RecipeError::new(
                    path,
                    format!("debian.remove[{i}]"),
                    format!("{r:?} is not a clean absolute path"),
                    "write e.g. \"/var/lib/dkms/mok.key\"",
                ));
            }
            merge_list(&mut self.remove, &[n]);
        }
        for (i, deb) in d.debs.iter().enumerate() {
            self.add_deb(path, i, deb)?;
        }
        if let Some(b) = d.sign_modules {
            self.sign_modules = b;
        }
        for (i, c) in d.customize.iter().enumerate() {
            if c.trim().is_empty() || c.contains('\0') {
                return Err(RecipeError::new(
                    path,
                    format!("debian.customize[{i}]"),
                    "an empty command".to_string(),
                    "give a shell command, e.g. \"printf 'GenerateName=yes\\n' > /etc/iscsi/initiatorname.iscsi\", or remove the entry",
                ));
            }
            self.customize.push(c.clone());
        }
        Ok(())
    }

    /// `debian.debs[i]`: a plain `.deb` file name, pinned once (merged by URL).
    fn add_deb(&mut self, path: &Path, i: usize, d: &Pinned) -> Result<()> {
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
            return Err(RecipeError::new(
                path,
                format!("{key}.url"),
                format!("{:?} does not end in a plain .deb file name", d.url),
                "give the package's own URL, ending in name_version_arch.deb",
            ));
        }
        if let Some(o) = self
            .debs
            .iter()
            .find(|o| o.url != d.url && Debian::deb_file_name(&o.url) == name)
        {
            return Err(RecipeError::new(
                path,
                format!("{key}.url"),
                format!("{name} is also pinned from {}", o.url),
                "pin each .deb file once (an inheriting recipe may repeat the same URL)",
            ));
        }
        self.debs.retain(|o| o.url != d.url);
        self.debs.push(d.clone());
        Ok(())
    }

    fn into_recipe(
        self,
        role: &str,
        chain: Vec<String>,
        suite: &str,
        variant: String,
        mode: K3sMode,
    ) -> Recipe {
        Recipe {
            role: role.to_string(),
            chain,
            description: self.description,
            debian: Debian {
                suite: suite.to_string(),
                variant,
                mirror: self.mirror,
                components: self.components,
                packages: self.packages,
                remove: self.remove,
                debs: self.debs,
                sign_modules: self.sign_modules,
                customize: self.customize,
            },
            boot: Boot {
                cmdline: self.cmdline,
                esp_size_mib: self.esp_size_mib.unwrap_or(0),
                root_slot_mib: self
                    .root_slot_mib
                    .as_ref()
                    .map_or(DEFAULT_ROOT_SLOT_MIB, |(s, _)| *s),
                root_slot_from: self.root_slot_mib.as_ref().map(|(_, p)| p.clone()),
            },
            systemd: Systemd {
                enable: self.enable,
                mask: self.mask,
            },
            k3s: K3sRole {
                mode,
                node_labels: self.node_labels,
                node_taints: self.node_taints,
                manifests: self.manifests,
                charts: self.charts,
            },
            persist: Persist { paths: Vec::new() },
            health: Health {
                k3s_timeout: self
                    .k3s_health_timeout
                    .unwrap_or(DEFAULT_K3S_HEALTH_TIMEOUT),
                checks: self.health_checks,
            },
        }
    }
}

/// The role's k3s mode, checked against the inventory: a k3s role needs `[k3s]` in
/// cluster.toml and, when it joins a server, an API endpoint; only servers deploy manifests.
fn check_k3s_role(
    project: &Project,
    role: &str,
    cluster_file: &Path,
    role_path: &Path,
    merged: &Merged,
) -> Result<K3sMode> {
    let mode = merged
        .k3s_mode
        .as_ref()
        .map(|m| m.0)
        .unwrap_or(K3sMode::None);
    if mode.runs_k3s() {
        let from = merged
            .k3s_mode
            .as_ref()
            .map(|m| m.1.clone())
            .unwrap_or(role_path.to_path_buf());
        if project.cluster.k3s.is_none() {
            return Err(RecipeError::new(
                cluster_file,
                "k3s",
                format!(
                    "role {role:?} runs k3s ({}) but cluster.toml has no [k3s] section",
                    from.display()
                ),
                "add [k3s] with version and the pinned binary (see docs/guide/recipes.md)",
            ));
        }
        let masters = project.cluster.masters().count();
        let needs_url = mode.is_agent()
            || masters > 1
            || project.cluster.k3s.as_ref().is_some_and(|k| k.bootstrapped);
        if needs_url && project.cluster.server_url().is_none() {
            return Err(RecipeError::new(cluster_file, "cluster.api_endpoint", format!("role {role:?} must join a server, but there is no API endpoint: no cluster.api_endpoint and the first master has no static address"), "set cluster.api_endpoint (a VIP or the first master's IP)"));
        }
    }
    if !mode.is_server() && (!merged.manifests.is_empty() || !merged.charts.is_empty()) {
        return Err(RecipeError::new(role_path, "k3s.manifests", format!("role {role:?} is not a k3s server, and only servers auto-deploy manifests and charts"), "move the manifests/charts to recipes/master.toml"));
    }
    Ok(mode)
}

/// `k3s.node_labels` are `key=value`, `k3s.node_taints` `key[=value]:Effect`, with keys and
/// values as Kubernetes takes them (`[prefix/]name`, the prefix a DNS subdomain; names and
/// values at most 63 characters of letters, digits, '-', '_', '.').
fn check_labels_and_taints(path: &Path, k: &K3sRoleFile) -> Result<()> {
    use super::names::{label_key_problem, label_value_problem};
    let kv_problem = |kv: &str| -> Option<String> {
        let (key, value) = kv.split_once('=')?;
        label_key_problem(key).or_else(|| label_value_problem(value))
    };
    for (i, l) in k.node_labels.iter().enumerate() {
        let p = if l.contains('=') {
            kv_problem(l)
        } else {
            Some("it has no '='".into())
        };
        if let Some(p) = p {
            return Err(RecipeError::new(
                path,
                format!("k3s.node_labels[{i}]"),
                format!("{l:?} is not a Kubernetes label key=value: {p}"),
                "write e.g. \"node.longhorn.io/create-default-disk=true\"",
            ));
        }
    }
    for (i, t) in k.node_taints.iter().enumerate() {
        let p = match t.rsplit_once(':') {
            Some((kv, "NoSchedule" | "PreferNoSchedule" | "NoExecute")) => {
                if kv.contains('=') {
                    kv_problem(kv)
                } else {
                    label_key_problem(kv)
                }
            }
            _ => Some("the effect must be NoSchedule, PreferNoSchedule or NoExecute".into()),
        };
        if let Some(p) = p {
            return Err(RecipeError::new(
                path,
                format!("k3s.node_taints[{i}]"),
                format!("{t:?} is not key[=value]:Effect: {p}"),
                "write e.g. \"nvidia.com/gpu=present:NoSchedule\"",
            ));
        }
    }
    Ok(())
}

fn check_packages(path: &Path, packages: &[String]) -> Result<()> {
    for (i, p) in packages.iter().enumerate() {
        if !is_package_name(p) {
            return Err(RecipeError::new(
                path,
                format!("debian.packages[{i}]"),
                format!("{p:?} is not a Debian package name"),
                "use a package name like \"openssh-server\" (optionally \"name=version\")",
            ));
        }
    }
    Ok(())
}

fn check_units(path: &Path, s: &SystemdFile) -> Result<()> {
    for (i, u) in s.enable.iter().chain(&s.mask).enumerate() {
        if !is_unit_name(u) {
            return Err(RecipeError::new(
                path,
                format!("systemd.enable/mask[{i}]"),
                format!("{u:?} is not a systemd unit name"),
                "write the full unit name, e.g. \"systemd-networkd.service\"",
            ));
        }
    }
    Ok(())
}

/// A recipe name `inherits` may give: a file name in recipes/ without `.toml`.
fn is_recipe_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
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
