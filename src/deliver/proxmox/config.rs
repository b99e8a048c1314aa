//! Settings for talking to Proxmox: `<dir>/proxmox.toml`, overridden by `KILN_PVE_*`
//! environment variables, overridden by command-line flags. The token secret is only ever read
//! from a file (never a flag, never the config file itself).

use super::ProxmoxError;
use crate::sys::util::{is_not_found, read_small_string};
use crate::trust::limits::KEY_FILE;
use anyhow::{Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default config file name in the project directory.
pub const CONFIG_FILE: &str = "proxmox.toml";

/// `proxmox.toml`. Every key is optional in the file; [`Settings::load`] says which are needed.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `https://pve.example:8006` (the `/api2/json` suffix is added).
    pub url: Option<String>,
    /// Cluster node that runs the imports and owns the templates (e.g. `pve1`).
    pub node: Option<String>,
    /// Storage for VM disks, the EFI disk and the cloud-init drive (e.g. `local-lvm`).
    pub storage: Option<String>,
    /// File-based storage with the `import` content type that receives the upload
    /// [default: `storage`].
    pub import_storage: Option<String>,
    /// Bridge for `net0` [default: `vmbr0`].
    pub bridge: Option<String>,
    /// API token id, `USER@REALM!TOKENID`.
    pub token_id: Option<String>,
    /// File holding the token secret (one line); relative to the config file.
    pub token_secret_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the server's certificate, `AA:BB:…` (32 bytes): pins it.
    pub fingerprint: Option<String>,
    /// PEM file with the CA certificate(s) to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Memory of templates and clones in MiB [default: 2048].
    pub memory: Option<u32>,
    /// CPU cores [default: 2].
    pub cores: Option<u32>,
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tls {
    /// Webpki roots (publicly trusted certificates).
    Public,
    /// CA certificates from a PEM file.
    CaFile(PathBuf),
    /// Only the leaf certificate with this SHA-256 digest; `source` names the setting.
    Pinned { sha256: [u8; 32], source: String },
}

/// Everything the Proxmox commands need, resolved and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Base URL ending in `/api2/json/`.
    pub api: url::Url,
    pub node: String,
    pub storage: String,
    pub import_storage: String,
    pub bridge: String,
    pub token_id: String,
    pub token_secret: String,
    pub tls: Tls,
    pub memory: u32,
    pub cores: u32,
    /// Per-request timeout for API calls (uploads have none).
    pub timeout: Duration,
    /// Task polling interval (`KILN_PVE_POLL_MS`; tests shorten it).
    pub poll: Duration,
}

/// Command-line overrides.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub node: Option<String>,
    pub storage: Option<String>,
    pub fingerprint: Option<String>,
}

fn cfg_err(
    source: impl Into<String>,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> anyhow::Error {
    ProxmoxError::Config {
        source_: source.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
    .into()
}

/// Parses `AA:BB:…` (32 bytes, colons optional, any case).
pub fn parse_fingerprint(s: &str, source: &str) -> Result<[u8; 32]> {
    let hexs: String = s.trim().chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&hexs).ok().filter(|b| b.len() == 32);
    match bytes {
        Some(b) => Ok(b.try_into().expect("32 bytes")),
        None => Err(cfg_err(
            source,
            format!("{s:?} is not a SHA-256 certificate fingerprint"),
            "give 32 hex bytes separated by colons, e.g. the `Fingerprint (sha256)` line of \
             `pvenode cert info` on the PVE host",
        )),
    }
}

/// Formats a digest as `AA:BB:…`.
pub fn format_fingerprint(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Reads the config file (`over.config`, `$KILN_PVE_CONFIG`, else `<dir>/proxmox.toml` if it
/// exists); returns it and its path.
pub fn load_file(dir: &Path, over: &Overrides) -> Result<(ConfigFile, PathBuf)> {
    load_file_with_env(dir, over, &|k| {
        std::env::var(k).ok().filter(|v| !v.is_empty())
    })
}

fn load_file_with_env(
    dir: &Path,
    over: &Overrides,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(ConfigFile, PathBuf)> {
    let path = over
        .config
        .clone()
        .or_else(|| env("KILN_PVE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| dir.join(CONFIG_FILE));
    let explicit = over.config.is_some() || env("KILN_PVE_CONFIG").is_some();
    let pname = path.display().to_string();
    let file: ConfigFile = match read_small_string(&path, KEY_FILE, "Proxmox config") {
        Ok(text) => toml::from_str(&text).map_err(|e| {
            cfg_err(
                pname.clone(),
                e.message().to_string(),
                "the keys are url, node, storage, import_storage, bridge, token_id, \
                 token_secret_file, fingerprint, ca_file, memory, cores (see docs/guide/proxmox.md)",
            )
        })?,
        Err(e) if is_not_found(&e) && !explicit => ConfigFile::default(),
        Err(e) => return Err(e).with_context(|| format!("reading the Proxmox config {pname}")),
    };
    Ok((file, path))
}

impl Settings {
    /// Loads the config file (`over.config`, else `<dir>/proxmox.toml` if it exists), applies
    /// `KILN_PVE_URL`, `KILN_PVE_TOKEN_ID`, `KILN_PVE_TOKEN_SECRET_FILE`, `KILN_PVE_FINGERPRINT`,
    /// then the flags, and checks the result.
    pub fn load(dir: &Path, over: &Overrides) -> Result<Settings> {
        Self::load_with_env(dir, over, &|k| {
            std::env::var(k).ok().filter(|v| !v.is_empty())
        })
    }

    /// [`Settings::load`] with an explicit environment (tests).
    pub fn load_with_env(
        dir: &Path,
        over: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Settings> {
        let (file, path) = load_file_with_env(dir, over, env)?;
        let src = Sources {
            pname: path.display().to_string(),
            base: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            file,
            env,
        };
        let api = src.api_url()?;
        let (node, storage) = src.node_and_storage(over)?;
        let import_storage = src.import_storage(&storage)?;
        let bridge = src.bridge()?;
        let token_id = src.token_id()?;
        let token_secret = src.token_secret()?;
        let tls = src.tls(over)?;
        let (memory, cores) = src.memory_and_cores()?;
        let poll = env("KILN_PVE_POLL_MS")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .unwrap_or(Duration::from_secs(1));
        Ok(Settings {
            api,
            node,
            storage,
            import_storage,
            bridge,
            token_id,
            token_secret,
            tls,
            memory,
            cores,
            timeout: Duration::from_secs(60),
            poll,
        })
    }
}

/// Where the settings come from: flags, the environment, the config file.
struct Sources<'a> {
    file: ConfigFile,
    /// The config file's path, as shown in messages.
    pname: String,
    /// The config file's folder: paths in the file are relative to it.
    base: PathBuf,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Sources<'_> {
    /// A key of the config file, as shown in messages (`<file>:<key>`).
    fn key(&self, k: &str) -> String {
        format!("{}:{k}", self.pname)
    }

    /// The value of a setting and where it came from: the flag, else the environment variable,
    /// else the file's value (`filev`, key `k`).
    fn pick(
        &self,
        flag: Option<(&Option<String>, &str)>,
        envk: Option<&str>,
        filev: &Option<String>,
        k: &str,
    ) -> Option<(String, String)> {
        if let Some((Some(v), f)) = flag {
            return Some((v.clone(), f.to_string()));
        }
        if let Some(e) = envk {
            if let Some(v) = (self.env)(e) {
                return Some((v, format!("${e}")));
            }
        }
        filev.clone().map(|v| (v, self.key(k)))
    }

    /// A required setting: `how` says where else it can be given.
    fn need(&self, v: Option<(String, String)>, k: &str, how: &str) -> Result<(String, String)> {
        let pname = &self.pname;
        v.ok_or_else(|| {
            cfg_err(
                pname.clone(),
                format!("no `{k}` setting"),
                format!("set `{k}` in {pname}{how}"),
            )
        })
    }

    /// The API's base URL (`https://HOST:PORT/api2/json/`).
    fn api_url(&self) -> Result<url::Url> {
        let (url_s, url_src) = self.need(
            self.pick(None, Some("KILN_PVE_URL"), &self.file.url, "url"),
            "url",
            " or $KILN_PVE_URL (e.g. https://pve1.lab:8006)",
        )?;
        let mut api = url::Url::parse(&url_s).map_err(|e| {
            cfg_err(
                &url_src,
                format!("{url_s:?} is not a URL ({e})"),
                "use https://HOST:8006",
            )
        })?;
        if api.scheme() != "https" || api.host_str().is_none() {
            return Err(cfg_err(
                &url_src,
                format!("{url_s:?} is not an https:// URL with a host"),
                "PVE's API listens on https://HOST:8006",
            ));
        }
        let p = api
            .path()
            .trim_end_matches('/')
            .trim_end_matches("/api2/json")
            .to_string();
        api.set_path(&format!("{}/api2/json/", p.trim_end_matches('/')));
        api.set_query(None);
        Ok(api)
    }

    /// The PVE node and the storage for VM disks.
    fn node_and_storage(&self, over: &Overrides) -> Result<(String, String)> {
        let file = &self.file;
        let (node, node_src) = self.need(
            self.pick(Some((&over.node, "--node")), None, &file.node, "node"),
            "node",
            " or pass --node (the PVE node name, as in `pvecm nodes`)",
        )?;
        check_id(&node, &node_src, "a PVE node name")?;
        let (storage, st_src) = self.need(
            self.pick(
                Some((&over.storage, "--storage")),
                None,
                &file.storage,
                "storage",
            ),
            "storage",
            " or pass --storage (e.g. local-lvm)",
        )?;
        check_id(&storage, &st_src, "a PVE storage id")?;
        Ok((node, storage))
    }

    /// The storage receiving uploads [default: `storage`].
    fn import_storage(&self, storage: &str) -> Result<String> {
        Ok(match &self.file.import_storage {
            Some(s) => {
                check_id(s, &self.key("import_storage"), "a PVE storage id")?;
                s.clone()
            }
            None => storage.to_string(),
        })
    }

    /// The bridge of `net0` [default: `vmbr0`].
    fn bridge(&self) -> Result<String> {
        let bridge = self.file.bridge.clone().unwrap_or_else(|| "vmbr0".into());
        check_id(&bridge, &self.key("bridge"), "a bridge name")?;
        Ok(bridge)
    }

    /// The API token id, `USER@REALM!TOKENID`.
    fn token_id(&self) -> Result<String> {
        let (token_id, tid_src) = self.need(
            self.pick(
                None,
                Some("KILN_PVE_TOKEN_ID"),
                &self.file.token_id,
                "token_id",
            ),
            "token_id",
            " or $KILN_PVE_TOKEN_ID (USER@REALM!TOKENID, from `pveum user token add`)",
        )?;
        let valid_tid = token_id
            .split_once('!')
            .is_some_and(|(u, t)| u.contains('@') && !t.is_empty() && !t.contains(['=', ' ']));
        if !valid_tid {
            return Err(cfg_err(
                tid_src,
                format!("{token_id:?} is not an API token id"),
                "use USER@REALM!TOKENID, e.g. kiln@pve!import",
            ));
        }
        Ok(token_id)
    }

    /// The token secret, read from its file (`$KILN_PVE_TOKEN_SECRET_FILE`, else
    /// `token_secret_file`).
    fn token_secret(&self) -> Result<String> {
        let pname = &self.pname;
        let (secret_path, sec_src) = match (self.env)("KILN_PVE_TOKEN_SECRET_FILE") {
            Some(p) => (PathBuf::from(p), "$KILN_PVE_TOKEN_SECRET_FILE".to_string()),
            None => match &self.file.token_secret_file {
                Some(p) => (self.base.join(p), self.key("token_secret_file")),
                None => {
                    return Err(cfg_err(
                        pname.clone(),
                        "no `token_secret_file` setting",
                        format!(
                            "put the token secret in a file readable only by you and set \
                             `token_secret_file` in {pname} or $KILN_PVE_TOKEN_SECRET_FILE"
                        ),
                    ))
                }
            },
        };
        let token_secret = read_small_string(&secret_path, KEY_FILE, "token secret file")
            .map_err(|e| {
                cfg_err(
                    &sec_src,
                    format!("cannot read {}: {e:#}", secret_path.display()),
                    "create the file with the token secret (the UUID `pveum user token add` printed)",
                )
            })?
            .trim()
            .to_string();
        // PVE's API token secrets are UUIDs. Anything else is refused without being echoed or
        // sent: a `token_secret_file` naming some other host file (a recipe repo's proxmox.toml
        // is input too) must not carry that file's contents to the configured API URL.
        if !is_uuid(&token_secret) {
            return Err(cfg_err(
                sec_src,
                format!(
                    "{} does not hold a Proxmox API token secret (a UUID such as \
                     xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx on one line); its contents were not sent",
                    secret_path.display()
                ),
                "write only the secret `pveum user token add` printed into the file",
            ));
        }
        Ok(token_secret)
    }

    /// How the server's certificate is checked: a pinned fingerprint, else a CA file, else the
    /// public roots.
    fn tls(&self, over: &Overrides) -> Result<Tls> {
        let tls = match self.pick(
            Some((&over.fingerprint, "--fingerprint")),
            Some("KILN_PVE_FINGERPRINT"),
            &self.file.fingerprint,
            "fingerprint",
        ) {
            Some((fp, src)) => Tls::Pinned {
                sha256: parse_fingerprint(&fp, &src)?,
                source: src,
            },
            None => match &self.file.ca_file {
                Some(p) => {
                    let p = self.base.join(p);
                    if !p.is_file() {
                        return Err(cfg_err(
                            self.key("ca_file"),
                            format!("{} does not exist", p.display()),
                            "point it at the PVE cluster CA (/etc/pve/pve-root-ca.pem on a PVE host)",
                        ));
                    }
                    Tls::CaFile(p)
                }
                None => Tls::Public,
            },
        };
        Ok(tls)
    }

    /// Memory (MiB) and cores of templates and clones [default: 2048, 2].
    fn memory_and_cores(&self) -> Result<(u32, u32)> {
        let memory = self.file.memory.unwrap_or(2048);
        let cores = self.file.cores.unwrap_or(2);
        if memory < 256 || cores == 0 {
            return Err(cfg_err(
                self.key(if cores == 0 { "cores" } else { "memory" }),
                "too small",
                "memory is in MiB (at least 256), cores at least 1",
            ));
        }
        Ok((memory, cores))
    }
}

/// PVE ids (node, storage, bridge): `[A-Za-z][A-Za-z0-9\-_.]*`.
fn check_id(v: &str, source: &str, what: &str) -> Result<()> {
    let ok = v.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(cfg_err(
            source,
            format!("{v:?} is not {what}"),
            "use the name as Proxmox shows it (letters, digits, - _ .)",
        ))
    }
}

/// `8-4-4-4-12` hex digits, the shape of the token secrets PVE generates.
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        let fp = "ab:".repeat(31) + "ab";
        assert_eq!(parse_fingerprint(&fp, "x").unwrap(), [0xab; 32]);
        assert_eq!(format_fingerprint(&[0xab; 2]), "AB:AB");
        assert!(parse_fingerprint("AB:CD", "x").is_err());
        assert!(parse_fingerprint("zz", "x").is_err());
    }

    #[test]
    fn settings_from_file_env_and_flags() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("secret"),
            "5b3c2b1e-0000-4000-8000-00000000cafe\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join(CONFIG_FILE),
            "url = \"https://pve:8006/\"\nnode = \"pve1\"\nstorage = \"local-lvm\"\n\
             import_storage = \"local\"\ntoken_id = \"kiln@pve!import\"\n\
             token_secret_file = \"secret\"\n",
        )
        .unwrap();
        let env = |k: &str| (k == "KILN_PVE_URL").then(|| "https://other:8006".to_string());
        let s = Settings::load_with_env(
            d.path(),
            &Overrides {
                node: Some("pve2".into()),
                ..Default::default()
            },
            &env,
        )
        .unwrap();
        assert_eq!(s.api.as_str(), "https://other:8006/api2/json/");
        assert_eq!(s.node, "pve2");
        assert_eq!(s.import_storage, "local");
        assert_eq!(s.token_secret, "5b3c2b1e-0000-4000-8000-00000000cafe");
        assert_eq!(s.tls, Tls::Public);

        std::fs::write(d.path().join(CONFIG_FILE), "nope = 1\n").unwrap();
        let e = Settings::load_with_env(d.path(), &Overrides::default(), &|_| None).unwrap_err();
        assert!(format!("{e:#}").contains("unknown field"), "{e:#}");
    }

    #[test]
    fn config_and_token_secret_that_are_devices_are_refused_unread() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join(CONFIG_FILE);
        std::os::unix::fs::symlink("/dev/zero", &conf).unwrap();
        let e = Settings::load_with_env(d.path(), &Overrides::default(), &|_| None).unwrap_err();
        assert!(
            format!("{e:#}").contains("is not a regular file (it is a character device)"),
            "{e:#}"
        );
        std::fs::remove_file(&conf).unwrap();
        std::fs::write(
            &conf,
            "url = \"https://pve:8006/\"\nnode = \"pve1\"\nstorage = \"local-lvm\"\n\
             import_storage = \"local\"\ntoken_id = \"kiln@pve!import\"\n\
             token_secret_file = \"/dev/zero\"\n",
        )
        .unwrap();
        let e = Settings::load_with_env(d.path(), &Overrides::default(), &|_| None).unwrap_err();
        assert!(format!("{e:#}").contains("is not a regular file"), "{e:#}");
        assert!(e
            .downcast_ref::<ProxmoxError>()
            .is_some_and(ProxmoxError::is_user_error));
    }

    #[test]
    fn a_token_secret_file_naming_another_host_file_is_refused_unsent_and_unechoed() {
        let d = tempfile::tempdir().unwrap();
        // A one-line host file (like /etc/hostname) that a hostile proxmox.toml could name.
        std::fs::write(d.path().join("hostname"), "build-host-7\n").unwrap();
        std::fs::write(
            d.path().join(CONFIG_FILE),
            "url = \"https://pve:8006/\"\nnode = \"pve1\"\nstorage = \"local-lvm\"\n\
             import_storage = \"local\"\ntoken_id = \"kiln@pve!import\"\n\
             token_secret_file = \"hostname\"\n",
        )
        .unwrap();
        let e = Settings::load_with_env(d.path(), &Overrides::default(), &|_| None).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("does not hold a Proxmox API token secret"),
            "{msg}"
        );
        assert!(!msg.contains("build-host-7"), "{msg}");
        assert!(e
            .downcast_ref::<ProxmoxError>()
            .is_some_and(ProxmoxError::is_user_error));
        assert!(is_uuid("5B3C2B1E-0000-4000-8000-00000000CAFE"));
        assert!(!is_uuid("5b3c2b1e-0000-4000-8000-00000000caf"));
        assert!(!is_uuid("5b3c2b1e00004000800000000000cafe"));
    }
}
