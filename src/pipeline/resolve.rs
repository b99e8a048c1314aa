//! Resolve stage: the build id = sha256 of the canonical JSON of every input that shapes a
//! role's artifacts — merged recipe, cluster inventory, base spec, overlay contents, kiln's
//! version. No absolute paths and no host state go in, so the same inputs give the same id on
//! any machine. Secrets never go in (later stages keep them out of the hashed recipe).

use crate::pipeline::base::BaseSpec;
use crate::project::confine;
use crate::project::manifests::{validate_manifest, validate_sealed};
use crate::project::overlays::{check_templates, scan_overlays, OverlayFile};
use crate::project::recipe::{self, Cluster, Project, Recipe};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The k3s cluster token, made by `kiln keys init`.
pub fn token_path(project: &Project) -> PathBuf {
    project.layout().key(crate::project::layout::key::K3S_TOKEN)
}

/// Domain-separated sha256 of a high-entropy secret. It identifies the secret's version in the
/// build id and the manifest; it cannot be inverted for a random 256-bit token.
pub fn secret_fingerprint(name: &str, secret: &[u8]) -> String {
    let mut v = format!("kiln-secret-fingerprint/v1\0{name}\0").into_bytes();
    v.extend_from_slice(secret);
    crate::sys::util::sha256_hex(&v)
}

/// Reads a key file of `keys/` (confined to the project, small, regular), or the error
/// `key`/`fix` says when it is absent or unreadable.
pub fn read_key_file(project: &Project, name: &str, key: &str, fix: &str) -> Result<Vec<u8>> {
    let layout = project.layout();
    let p = layout.key(name);
    let real = confine::key_file(&layout, name)?.ok_or_else(|| {
        recipe::RecipeError::new(&p, key, format!("{} does not exist", p.display()), fix)
    })?;
    crate::sys::util::read_small(&real, confine::MAX_SMALL, key)
        .map_err(|e| recipe::RecipeError::new(&p, key, format!("cannot read: {e:#}"), fix).into())
}

/// The k3s token every node of the cluster is given: k3s's secure form
/// `K10<sha256 of keys/k3s-server-ca.crt>::server:<keys/k3s-token>`, so agents and joining
/// servers pin the cluster's server CA (see [`crate::trust::k3s_ca`]).
pub fn read_token(project: &Project) -> Result<String> {
    let secret = read_token_secret(project)?;
    let ca = read_key_file(
        project,
        crate::trust::k3s_ca::SERVER_CA_CRT,
        "(k3s server CA)",
        "run `kiln keys init --add-missing` to make the cluster's k3s CAs (before the cluster's first start: k3s takes custom CAs only then)",
    )?;
    Ok(crate::trust::k3s_ca::secure_token(&ca, &secret))
}

/// The cluster's k3s CA files from `keys/` (see [`crate::trust::k3s_ca::FILES`]), each
/// checked to be PEM of the expected kind.
pub fn read_k3s_ca(project: &Project) -> Result<Vec<(crate::trust::k3s_ca::CaFile, Vec<u8>)>> {
    let mut out = Vec::new();
    for f in crate::trust::k3s_ca::FILES {
        let b = read_key_file(
            project,
            f.key_name,
            "(k3s CA)",
            "run `kiln keys init --add-missing` to make the cluster's k3s CAs, or restore the file from your backup of keys/",
        )?;
        let text = String::from_utf8_lossy(&b);
        let want = if f.private {
            "PRIVATE KEY-----"
        } else {
            "-----BEGIN CERTIFICATE-----"
        };
        if !text.contains(want) {
            return Err(recipe::RecipeError::new(
                project.layout().key(f.key_name),
                "(k3s CA)",
                format!("not a PEM {}", if f.private { "private key" } else { "certificate" }),
                "restore the file from your backup of keys/ (k3s takes its CAs only at the cluster's first start)",
            )
            .into());
        }
        out.push((f, b));
    }
    Ok(out)
}

/// A server of a cluster with more than one master runs kiln-k3s-bootstrap, which probes the
/// others' `/cacerts` and removes a stale member with curl and openssl.
fn check_bootstrap_tools(project: &Project, recipe: &recipe::Recipe) -> Result<()> {
    let masters = project.cluster.masters().count();
    if !recipe.k3s.mode.is_server() || masters < 2 {
        return Ok(());
    }
    let has = |p: &str| recipe.debian.packages.iter().any(|q| q == p);
    for (tool, ok) in [
        ("curl", has("curl")),
        ("openssl", has("openssl") || has("ca-certificates")),
    ] {
        if !ok {
            return Err(recipe::RecipeError::new(
                project.layout().role_recipe(&recipe.role),
                "debian.packages",
                format!("the cluster has {masters} masters: at boot each one looks for the running cluster and removes its own stale etcd member with {tool}, which this role does not install"),
                format!("add \"{tool}\" to [debian] packages of the master role"),
            )
            .into());
        }
    }
    Ok(())
}

/// A master of a cluster whose API endpoint is a VIP runs keepalived: its role's packages must
/// have it, and every master needs a static address (the VRRP peers are unicast).
fn check_vip(project: &Project, recipe: &recipe::Recipe) -> Result<()> {
    use crate::pipeline::vip;
    if !recipe.k3s.mode.is_server() {
        return Ok(());
    }
    let Some(v) = vip::vip(&project.cluster) else {
        return Ok(());
    };
    let ep = &v.address.addr;
    let cluster_file = project.layout().cluster_file();
    for (i, n) in project.cluster.nodes.iter().enumerate() {
        if n.role == "master" && !v.masters.iter().any(|(h, _)| *h == n.hostname) {
            return Err(recipe::RecipeError::new(
                &cluster_file,
                format!("nodes[{i}].address"),
                format!("api_endpoint {ep} is a VIP the masters hold with keepalived (VRRP between their addresses), but master {} has no static address", n.hostname),
                "give every master a static `address` (e.g. \"10.0.0.12/24\"), or set api_endpoint to a DNS name or to a master's address",
            )
            .into());
        }
    }
    if let Some((h, c)) = v.masters.iter().find(|(_, c)| !c.contains(*ep)) {
        return Err(recipe::RecipeError::new(
            &cluster_file,
            "cluster.api_endpoint",
            format!("the VIP {ep} is not in the subnet of master {h} ({c})"),
            "choose a free address in the masters' subnet",
        )
        .into());
    }
    if !recipe.debian.packages.iter().any(|p| p == vip::PACKAGE) {
        return Err(recipe::RecipeError::new(
            project.layout().role_recipe(&recipe.role),
            "debian.packages",
            format!("api_endpoint {ep} is a VIP: the masters hold it with keepalived, which this role does not install"),
            "add \"keepalived\" to [debian] packages of the master role (Debian's package; kiln writes its configuration)",
        )
        .into());
    }
    Ok(())
}

/// The S3 access and secret keys of `[k3s.etcd_snapshots.s3]` (the `credentials` file in
/// keys/: `access_key = …` and `secret_key = …` lines, `#` comments), or `None` without S3.
pub fn read_s3_credentials(
    project: &Project,
) -> Result<Option<(String, zeroize::Zeroizing<String>)>> {
    let Some(s3) = project
        .cluster
        .k3s
        .as_ref()
        .and_then(|k| k.etcd_snapshots.as_ref())
        .and_then(|e| e.s3.as_ref())
    else {
        return Ok(None);
    };
    let key = "k3s.etcd_snapshots.s3.credentials";
    let fix = "write `access_key = …` and `secret_key = …` lines to that file in keys/ (mode 0600)";
    let b = zeroize::Zeroizing::new(read_key_file(project, &s3.credentials, key, fix)?);
    {
        use std::os::unix::fs::PermissionsExt;
        let p = project.layout().key(&s3.credentials);
        let mode = std::fs::metadata(&p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0);
        if mode & 0o077 != 0 {
            return Err(recipe::RecipeError::new(
                &p,
                key,
                format!(
                    "the S3 credentials are readable by group or others (mode {:04o})",
                    mode & 0o7777
                ),
                format!("chmod 600 {}", p.display()),
            )
            .into());
        }
    }
    let text = String::from_utf8_lossy(&b);
    let (mut access, mut secret) = (None, None);
    for l in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match l.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
            Some(("access_key", v)) => access = Some(v.to_string()),
            Some(("secret_key", v)) => secret = Some(zeroize::Zeroizing::new(v.to_string())),
            _ => {
                return Err(recipe::RecipeError::new(
                    project.layout().key(&s3.credentials),
                    key,
                    "a line that is not `access_key = …` or `secret_key = …`",
                    fix,
                )
                .into())
            }
        }
    }
    let ok = |v: &str| !v.is_empty() && !v.chars().any(|c| c.is_control() || c == '"' || c == '\\');
    match (access, secret) {
        (Some(a), Some(s)) if ok(&a) && ok(&s) => Ok(Some((a, s))),
        _ => Err(recipe::RecipeError::new(
            project.layout().key(&s3.credentials),
            key,
            "no access_key or secret_key (or one is empty or has quotes or control characters)",
            fix,
        )
        .into()),
    }
}

/// The secret part of the k3s token (`keys/k3s-token`).
fn read_token_secret(project: &Project) -> Result<String> {
    let p = token_path(project);
    let t = read_key_file(
        project,
        crate::project::layout::key::K3S_TOKEN,
        "(k3s token)",
        "run `kiln keys init` (or put a random secret in keys/k3s-token, mode 0600)",
    )?;
    let t = String::from_utf8_lossy(&t);
    let t = t.trim().to_string();
    if t.len() < 16 || t.contains(char::is_whitespace) {
        return Err(recipe::RecipeError::new(
            p,
            "(k3s token)",
            "the token is shorter than 16 characters or contains whitespace",
            "run `kiln keys init --force` to make a new one",
        )
        .into());
    }
    Ok(t)
}

/// Reads the cluster's node-identity secret (`keys/node-identity.key`), the root of every
/// node's derived identity (see [`crate::trust::identity`]). Errors name the file and the fix.
pub fn read_node_identity(project: &Project) -> Result<zeroize::Zeroizing<[u8; 32]>> {
    let name = crate::project::layout::key::NODE_IDENTITY_KEY;
    let key = "(node-identity key)";
    let b = zeroize::Zeroizing::new(read_key_file(
        project,
        name,
        key,
        "run `kiln keys init --add-missing` (adds this key and keeps every other key)",
    )?);
    let text = std::str::from_utf8(&b).unwrap_or_default().trim();
    crate::trust::keys::parse_node_identity(text)
        .map(zeroize::Zeroizing::new)
        .ok_or_else(|| {
            recipe::RecipeError::new(
                project.layout().key(name),
                key,
                format!(
                    "it must hold {} hex characters (32 bytes) and a newline",
                    crate::trust::keys::NODE_IDENTITY_HEX_LEN
                ),
                "restore it from your backup; a new key (`kiln keys init --add-missing` after \
                 moving it away) gives every node a new identity: new SSH host keys, and k3s \
                 refuses the new node passwords until each <node>.node-password.k3s secret in \
                 kube-system is deleted",
            )
            .into()
        })
}

/// Version of the build-id schema; bump when the meaning of the inputs changes.
pub const SCHEMA: &str = "kiln.build-id/1";

/// kiln's output-format generation: raise it whenever kiln writes different bytes for the same
/// inputs (a format writer, a compression setting, the composed tree, a manifest's layout), so
/// the build id changes with the bytes — the version string alone does not (two kiln binaries
/// of one version may differ). tests/formats_golden.rs pins every emitted format's sha256 per
/// generation and fails until this is raised and a new row is added there.
pub const FORMAT_GENERATION: u32 = 3;

/// A build id: the sha256 (64 lowercase hex digits) of a role build's canonical inputs
/// ([`Resolved::canonical_json`]). It names the build's directory in full; names and tags that
/// must be short carry [`BuildId::short`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct BuildId(String);

impl BuildId {
    /// Hex digits of [`BuildId::short`].
    pub const SHORT: usize = 12;

    /// The id of these canonical inputs.
    pub fn of(canonical: &[u8]) -> BuildId {
        BuildId(crate::sys::util::sha256_hex(canonical))
    }

    /// `s` if it has the shape of a build id (64 hex digits), e.g. one read from a manifest
    /// or given on the command line.
    pub fn parse(s: &str) -> Option<BuildId> {
        (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| BuildId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first [`BuildId::SHORT`] hex digits (template names, tags, boot entries, logs).
    pub fn short(&self) -> &str {
        short_id(&self.0)
    }
}

/// The first [`BuildId::SHORT`] characters of a build id given as text (all of a shorter one).
pub fn short_id(id: &str) -> &str {
    &id[..id.len().min(BuildId::SHORT)]
}

impl std::ops::Deref for BuildId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for BuildId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<std::path::Path> for BuildId {
    fn as_ref(&self) -> &std::path::Path {
        self.0.as_ref()
    }
}

impl std::fmt::Display for BuildId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Everything that determines a role build.
#[derive(Debug, Clone, Serialize)]
pub struct Resolved {
    pub schema: &'static str,
    pub kiln_version: &'static str,
    /// [`FORMAT_GENERATION`].
    pub format_generation: u32,
    pub role: String,
    pub recipe: Recipe,
    pub cluster: Cluster,
    pub base: BaseSpec,
    pub base_key: String,
    pub overlays: Vec<OverlayFile>,
    /// Files the recipe references (manifests, chart values, registries): path under recipes/ → sha256.
    pub files: BTreeMap<String, String>,
    /// Secrets baked into the image, by fingerprint only (see [`secret_fingerprint`]): a new
    /// token gives a new build id without the token itself entering the hashed inputs.
    pub secrets: BTreeMap<String, String>,
    /// sha256 of `canonical_json()` — the build id.
    #[serde(skip)]
    pub build_id: BuildId,
}

impl Resolved {
    /// Canonical JSON of the inputs (struct field order is fixed; maps are BTreeMaps).
    pub fn canonical_json(&self) -> String {
        serde_json::to_string(self).expect("serialisable")
    }
}

/// Loads the role's recipe and computes its build id.
pub fn resolve(project: &Project, role: &str) -> Result<Resolved> {
    let recipe = recipe::load_role(project, role)?;
    check_vip(project, &recipe)?;
    check_bootstrap_tools(project, &recipe)?;
    let overlays = scan_overlays(project, role)?;
    check_templates(project, &overlays)?;
    // Both halves of the module-signing pair are read and cross-checked here (a bad pair is a
    // user error before anything is built); only the certificate's digest enters the spec.
    let module_cert = if recipe.debian.sign_modules {
        // The pair is read from keys/ by trust::keys and, later, by the base build: both
        // files must be inside the project.
        for k in [
            crate::project::layout::key::MODULE_SIGNING_CRT,
            crate::project::layout::key::MODULE_SIGNING_KEY,
        ] {
            confine::key_file(&project.layout(), k)?;
        }
        Some(crate::trust::keys::module_signing(&project.layout().keys())?.cert_sha256())
    } else {
        None
    };
    let base = BaseSpec::new(
        &recipe,
        project.cluster.section.source_date_epoch,
        module_cert,
    );
    let mut files = BTreeMap::new();
    let mut referenced: Vec<String> = recipe.k3s.manifests.clone();
    referenced.extend(recipe.k3s.charts.iter().filter_map(|c| c.values.clone()));
    let mut secrets = BTreeMap::new();
    if recipe.k3s.mode.runs_k3s() {
        if let Some(r) = project
            .cluster
            .k3s
            .as_ref()
            .and_then(|k| k.registries.clone())
        {
            referenced.push(r);
        }
        let token = read_token(project)?;
        let sealed = project
            .cluster
            .sealed_secrets
            .as_ref()
            .filter(|_| recipe.k3s.mode.is_server());
        if let Some(ss) = sealed {
            let key = read_key_file(
                project,
                crate::project::layout::key::SEALED_SECRETS_KEY,
                "(sealed-secrets key)",
                "run `kiln keys init`, or remove [sealed_secrets] from cluster.toml",
            )?;
            secrets.insert(
                "sealed-secrets-key".to_string(),
                secret_fingerprint("sealed-secrets-key", &key),
            );
            for f in &ss.secrets {
                let p = project.recipes_dir().join(f);
                let text = confine::recipe_text(&project.layout(), f, "(sealed secret)")?;
                validate_sealed(&p, &text)?;
                referenced.push(f.clone());
            }
        }
        // The token is part of the image only when it is baked (else it is in the node seeds).
        if project
            .cluster
            .k3s
            .as_ref()
            .is_some_and(|k| k.token_delivery == recipe::TokenDelivery::Image)
        {
            secrets.insert(
                "k3s-token".to_string(),
                secret_fingerprint("k3s-token", token.as_bytes()),
            );
            if let Some((a, s)) =
                read_s3_credentials(project)?.filter(|_| recipe.k3s.mode.is_server())
            {
                secrets.insert(
                    "etcd-s3".to_string(),
                    secret_fingerprint("etcd-s3", format!("{a}\0{}", s.as_str()).as_bytes()),
                );
            }
            if recipe.k3s.mode.is_server() {
                let mut all = Vec::new();
                for (f, bytes) in read_k3s_ca(project)? {
                    all.extend_from_slice(f.key_name.as_bytes());
                    all.push(0);
                    all.extend_from_slice(&bytes);
                }
                secrets.insert("k3s-ca".to_string(), secret_fingerprint("k3s-ca", &all));
            }
        }
    }
    for m in &recipe.k3s.manifests {
        let p = project.recipes_dir().join(m);
        let text = confine::recipe_text(&project.layout(), m, "(manifest)")?;
        validate_manifest(&p, &text)?;
    }
    for f in referenced {
        let text = confine::recipe_text(&project.layout(), &f, "(referenced file)")?;
        files.insert(f, crate::sys::util::sha256_hex(text.as_bytes()));
    }
    let mut r = Resolved {
        schema: SCHEMA,
        kiln_version: env!("CARGO_PKG_VERSION"),
        format_generation: FORMAT_GENERATION,
        role: role.to_string(),
        base_key: base.key(),
        recipe,
        cluster: project.cluster.clone(),
        base,
        overlays,
        files,
        secrets,
        build_id: BuildId(String::new()),
    };
    r.build_id = BuildId::of(r.canonical_json().as_bytes());
    Ok(r)
}
