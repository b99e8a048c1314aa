//! Proxmox VE stage: role images become VM templates through the PVE API, and inventory nodes
//! become full clones of them with the node's cloud-init settings.
//!
//! - [`config`]: `proxmox.toml` + `KILN_PVE_*` environment + command-line flags → [`Settings`].
//! - [`client`]: a small blocking API client (API token, pinned TLS, retries, task polling,
//!   streamed multipart upload).
//! - [`import`]: `kiln proxmox import | list | clone`.
//! - [`script`]: `--emit-script`, the same import as a `qm` shell script for sites without API
//!   access or with PVE older than 8.4.
//!
//! Verified against the fake PVE server in `tests/fakepve/`, built from the upstream parameter
//! schemas; not against a live Proxmox.

pub mod client;
pub mod config;
pub mod import;
pub mod script;

pub use config::Settings;

use crate::project::layout::Out;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Why a Proxmox command failed in a way the user can fix (bad config, unknown host, a request
/// Proxmox rejected). `kiln` exits with status 2 ([`crate::cli::EXIT_USER_ERROR`]) for these.
#[derive(Debug, thiserror::Error)]
pub enum ProxmoxError {
    /// A setting is missing or invalid.
    #[error("{source_}: {problem}; {fix}")]
    Config {
        /// Where the setting comes from (`proxmox.toml:key`, `$KILN_PVE_URL`, `--node`).
        source_: String,
        problem: String,
        fix: String,
    },
    /// Proxmox answered a request with an HTTP error (4xx: the request or the token).
    #[error("Proxmox refused {method} {path}: HTTP {status} {message}{}; {fix}", fmt_errors(.errors))]
    Rejected {
        method: String,
        path: String,
        status: u16,
        /// The status line's reason phrase, verbatim (PVE puts its message there).
        message: String,
        /// Per-parameter messages from the response body (`errors`).
        errors: BTreeMap<String, String>,
        fix: String,
    },
    /// The server's certificate is not the pinned one.
    #[error(
        "TLS: the certificate of {url} has SHA-256 fingerprint {seen}, not the pinned {pinned} \
         ({source_}); no request was sent. If the server's certificate was renewed, check the new \
         fingerprint on the PVE host (`pvenode cert info`) and update the setting"
    )]
    Fingerprint {
        url: String,
        seen: String,
        pinned: String,
        source_: String,
    },
    /// The PVE version cannot import disk images through the API.
    #[error(
        "Proxmox VE {version} at {url} cannot take `content=import` uploads (needs 8.4 or later); \
         upgrade the cluster, or run `kiln proxmox import --emit-script FILE` and run the script \
         on a PVE host (it uses `qm importdisk`)"
    )]
    TooOld { version: String, url: String },
    /// Something in the inventory or out/ does not fit the request.
    #[error("{what}; {fix}")]
    Input { what: String, fix: String },
}

fn fmt_errors(e: &BTreeMap<String, String>) -> String {
    e.iter()
        .map(|(k, v)| format!(" [{k}: {}]", v.trim()))
        .collect()
}

/// A PVE tag (`pve-tag`: `[a-z0-9_][a-z0-9_\-+.]*`, case-insensitive); kiln's are lower case.
pub fn is_valid_tag(t: &str) -> bool {
    let mut b = t.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
        && b.all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-' | b'+' | b'.')
        })
}

/// The tag every kiln-made VM carries.
pub const TAG: &str = "kiln";
/// Tag marking a role template.
pub const TAG_TEMPLATE: &str = "kiln-template";
/// Tag marking a node VM cloned from a template.
pub const TAG_NODE: &str = "kiln-node";

/// `kiln-role-<role>`.
pub fn role_tag(role: &str) -> String {
    format!("kiln-role-{role}")
}

/// `kiln-build-<12 hex>`.
pub fn build_tag(build_id: &str) -> String {
    format!("kiln-build-{}", short(build_id))
}

pub use crate::pipeline::resolve::short_id as short;
use crate::pipeline::resolve::BuildId;

/// The template's VM name: `kiln-<role>-<12 hex>` (a valid DNS name, as PVE requires).
pub fn template_name(role: &str, build_id: &str) -> String {
    format!("kiln-{role}-{}", short(build_id))
}

/// Tags of a role template, sorted, `;`-separated as PVE stores them.
pub fn template_tags(role: &str, build_id: &str) -> String {
    join_tags(&[
        TAG.to_string(),
        TAG_TEMPLATE.to_string(),
        role_tag(role),
        build_tag(build_id),
    ])
}

/// Tags of a node VM.
pub fn node_tags(role: &str, build_id: &str) -> String {
    join_tags(&[
        TAG.to_string(),
        TAG_NODE.to_string(),
        role_tag(role),
        build_tag(build_id),
    ])
}

fn join_tags(tags: &[String]) -> String {
    let mut v: Vec<&str> = tags.iter().map(String::as_str).collect();
    v.sort_unstable();
    debug_assert!(v.iter().all(|t| is_valid_tag(t)));
    v.join(";")
}

/// Splits a PVE tag list (`;`, `,` or spaces).
pub fn split_tags(s: &str) -> Vec<String> {
    s.split([';', ',', ' '])
        .filter(|t| !t.is_empty())
        .map(|t| t.to_ascii_lowercase())
        .collect()
}

/// File name of the uploaded image in the storage's `import/` directory. It must match PVE's
/// upload pattern (`[a-zA-Z0-9-.+=_]+\.(ova|qcow2|raw|vmdk)`); it carries the role, the short
/// build id and the image's full sha256, so a volume with this name holds exactly these bytes
/// (PVE checked the sha256 when it was uploaded).
pub fn upload_name(role: &str, build_id: &str, sha256: &str, ext: &str) -> String {
    format!("kiln-{role}-{}-{sha256}.{ext}", short(build_id))
}

/// PVE's upload file name rule (after its normalisation, which kiln's names never need).
#[cfg(test)]
fn is_valid_import_name(name: &str) -> bool {
    let Some((stem, ext)) = name.rsplit_once('.') else {
        return false;
    };
    !stem.is_empty()
        && matches!(ext, "ova" | "qcow2" | "raw" | "vmdk")
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'+' | b'=' | b'_'))
}

/// Encodes a value for PVE's `urlencoded` format (`sshkeys`): every byte except
/// `A-Za-z0-9-_.!~*'()` as `%XX` (space as `%20`, never `+`).
pub fn pve_urlencode(s: &str) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    const KEEP: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'!')
        .remove(b'~')
        .remove(b'*')
        .remove(b'\'')
        .remove(b'(')
        .remove(b')');
    utf8_percent_encode(s, KEEP).to_string()
}

/// The description of a role template: human-readable lines; `kiln-build-id:` carries the full
/// build id kiln matches on.
pub fn template_description(m: &import::BuildInfo) -> String {
    format!(
        "kiln role template\nrole: {}\ncluster: {}\nkiln-build-id: {}\nmanifest-sha256: {}\nimage: {}\nimage-sha256: {}\nkiln-version: {}\n",
        m.role,
        m.cluster,
        m.build_id,
        m.manifest_sha256,
        m.image_name,
        m.image_sha256,
        m.kiln_version
    )
}

/// The full build id in a description written by kiln.
pub fn description_build_id(desc: &str) -> Option<String> {
    desc.lines().find_map(|l| {
        let id = l.trim().strip_prefix("kiln-build-id:")?.trim();
        BuildId::parse(id).map(|b| b.to_string())
    })
}

impl ProxmoxError {
    /// True for errors the user fixes (exit status 2); a Proxmox server error (5xx) is not.
    pub fn is_user_error(&self) -> bool {
        !matches!(self, ProxmoxError::Rejected { status, .. } if *status >= 500)
    }
}

/// `<out>/<role>/latest`, or the explicit build directory.
fn build_dir(out: &Out, role: &str, build: Option<&Path>) -> PathBuf {
    build
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out.latest(role))
}

/// The verified build of `role` to import: `build`, or the role's latest in `out`.
pub fn load_role_build(
    out: &Out,
    role: &str,
    build: Option<&Path>,
    key: &ed25519_dalek::VerifyingKey,
) -> anyhow::Result<import::BuildInfo> {
    let bdir = build_dir(out, role, build);
    if !bdir.exists() {
        anyhow::bail!(ProxmoxError::Input {
            what: format!("no build of role {role} at {}", bdir.display()),
            fix: format!("build it first (`kiln build --role {role}`) or pass --build DIR"),
        });
    }
    let b = import::load_build(&bdir, key)?;
    if b.role != role {
        anyhow::bail!(ProxmoxError::Input {
            what: format!(
                "{} is a build of role {}, not {role}",
                b.dir.display(),
                b.role
            ),
            fix: "pass the matching --role".into(),
        });
    }
    Ok(b)
}

/// `--emit-script`: writes the import of `b` as a `qm` shell script (mode 0755) to `path`.
pub fn write_import_script(
    dir: &Path,
    conn: &config::Overrides,
    b: &import::BuildInfo,
    path: &Path,
) -> anyhow::Result<()> {
    let (file, _) = config::load_file(dir, conn)?;
    let ss = script::ScriptSettings {
        storage: conn
            .storage
            .clone()
            .or(file.storage)
            .unwrap_or_else(|| "local-lvm".into()),
        bridge: file.bridge.unwrap_or_else(|| "vmbr0".into()),
        memory: file.memory.unwrap_or(2048),
        cores: file.cores.unwrap_or(2),
    };
    let text = script::render(b, &ss);
    crate::sys::util::write_output(path, text.as_bytes(), 0o755)
}

/// Makes `b` a VM template on the cluster `dir`'s settings and `conn` name (skipped if it
/// exists, unless `replace`).
pub fn import_template(
    dir: &Path,
    conn: &config::Overrides,
    b: &import::BuildInfo,
    opts: &import::ImportOptions,
) -> anyhow::Result<import::ImportReport> {
    let s = Settings::load(dir, conn)?;
    let c = client::Client::new(&s)?;
    import::import(&c, &s, b, opts)
}

/// kiln's templates and node VMs on the cluster.
pub fn list(dir: &Path, conn: &config::Overrides) -> anyhow::Result<Vec<import::Listed>> {
    let s = Settings::load(dir, conn)?;
    let c = client::Client::new(&s)?;
    import::list(&c)
}

/// What `clone_node` needs beyond the connection.
pub struct CloneRequest<'a> {
    pub hostname: &'a str,
    /// The full build id of the template; none: the role's latest build in `out`.
    pub build_id: Option<String>,
    pub vmid: Option<u32>,
    pub replace: bool,
    pub cicustom: Option<String>,
}

/// Full-clones an inventory node's role template into a VM named after the host.
pub fn clone_node(
    dir: &Path,
    out: &Out,
    conn: &config::Overrides,
    req: &CloneRequest,
) -> anyhow::Result<import::CloneReport> {
    use anyhow::Context;
    let project = crate::project::recipe::load_project(dir)?;
    let node = project.node(req.hostname)?;
    let build_id = match &req.build_id {
        Some(id) => id.clone(),
        None => {
            let m = out.latest(&node.role).join("manifest.json");
            let v: serde_json::Value = serde_json::from_slice(&crate::sys::util::read_small(&m, crate::trust::limits::MANIFEST, "manifest").map_err(|e| ProxmoxError::Input {
                what: format!("no build of role {} ({}: {e:#})", node.role, m.display()),
                fix: format!("build and import it (`kiln build --role {r}`, `kiln proxmox import --role {r}`) or pass --build-id", r = node.role),
            })?)
            .with_context(|| format!("parsing {}", m.display()))?;
            v["build_id"]
                .as_str()
                .with_context(|| format!("{}: no build_id", m.display()))?
                .to_string()
        }
    };
    if BuildId::parse(&build_id).is_none() {
        anyhow::bail!(ProxmoxError::Input {
            what: format!("{build_id:?} is not a build id"),
            fix: "give the full 64-hex build id (`kiln proxmox list` shows them)".into(),
        });
    }
    let keys = crate::pipeline::seed::authorized_keys(&project)?;
    let s = Settings::load(dir, conn)?;
    let c = client::Client::new(&s)?;
    import::clone_node(
        &c,
        &s,
        node,
        project.cluster.section.domain.as_deref(),
        &keys,
        &import::CloneOptions {
            build_id,
            vmid: req.vmid,
            replace: req.replace,
            cicustom: req.cicustom.clone(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_pve_rules() {
        let id = "0123456789abcdef".repeat(4);
        let t = template_tags("worker", &id);
        assert_eq!(
            t,
            "kiln;kiln-build-0123456789ab;kiln-role-worker;kiln-template"
        );
        assert!(split_tags(&t).iter().all(|t| is_valid_tag(t)));
        assert!(!is_valid_tag("-x"));
        assert!(!is_valid_tag("a b"));
        assert!(!is_valid_tag(""));
    }

    #[test]
    fn import_names() {
        let n = upload_name("worker", &"ab".repeat(32), &"cd".repeat(32), "qcow2");
        assert!(is_valid_import_name(&n), "{n}");
        assert!(!is_valid_import_name("disk.img"));
        assert!(!is_valid_import_name(".qcow2"));
        assert!(!is_valid_import_name("a b.qcow2"));
        assert!(!is_valid_import_name("x.ovf"));
    }

    #[test]
    fn urlencode_like_pve() {
        assert_eq!(
            pve_urlencode("ssh-ed25519 AAAA+/= me@host\n"),
            "ssh-ed25519%20AAAA%2B%2F%3D%20me%40host%0A"
        );
    }

    #[test]
    fn build_id_from_description() {
        let id = "a".repeat(64);
        assert_eq!(
            description_build_id(&format!("x\nkiln-build-id: {id}\n")),
            Some(id)
        );
        assert_eq!(description_build_id("kiln-build-id: abc"), None);
    }
}
