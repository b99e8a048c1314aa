//! A fake Proxmox VE API server for the `kiln proxmox` tests.
//!
//! Written from the upstream parameter schemas and server code (read, not copied):
//! pve-storage `PVE/API2/Storage/Status.pm` (upload, download-url: parameters, the
//! `content=import` file name rule `[a-zA-Z0-9-.+=_]+\.(ova|qcow2|raw|vmdk)` after
//! normalisation), qemu-server `PVE/API2/Qemu.pm` (create_vm: `import-from` needs
//! `<storage>:0`; template: refused on a running VM; clone), pve-common `JSONSchema.pm`
//! (`pve-tag`, `dns-name`, `urlencoded`), pve-http-server `AnyEvent.pm` (multipart upload:
//! Content-Length required, no chunked bodies, the parts `content`, `checksum-algorithm`,
//! `checksum` first and the file part — field name `filename` — last; errors in the HTTP
//! reason phrase, parameter errors as `{"errors": {...}}` with 400).
//!
//! It speaks HTTPS (a CA and a leaf certificate made with rcgen), checks API tokens and
//! privileges, answers task-starting calls with UPIDs whose tasks stop after a few polls, and
//! can be told to fail a task or to pretend to be an older PVE.
#![allow(dead_code)]

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// The PVE node the fake pretends to be.
pub const NODE: &str = "pve1";
/// The cluster's nodes (`pve2` has the same storages: think shared or identically named).
pub const NODES: &[&str] = &["pve1", "pve2"];
/// A token with every privilege.
pub const TOKEN_ID: &str = "kiln@pve!import";
pub const TOKEN_SECRET: &str = "5b3c2b1e-0000-4000-8000-00000000cafe";

/// Every privilege the fake checks.
pub const ALL_PRIVS: &[&str] = &[
    "Datastore.Allocate",
    "Datastore.AllocateSpace",
    "Datastore.AllocateTemplate",
    "Datastore.Audit",
    "Sys.AccessNetwork",
    "VM.Allocate",
    "VM.Audit",
    "VM.Clone",
    "VM.Config.Cloudinit",
    "VM.Config.Network",
    "VM.PowerMgmt",
];

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    /// Path below `/api2/json`, percent-decoded per segment (`/nodes/pve1/qemu`).
    pub path: String,
    /// Query and form parameters (form values decoded once, as PVE does).
    pub params: BTreeMap<String, String>,
    /// For uploads: part names in order (the file part as `filename`), file name, bytes.
    pub upload: Option<Upload>,
}

#[derive(Debug, Clone)]
pub struct Upload {
    pub parts: Vec<String>,
    pub filename: String,
    pub size: usize,
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub struct Volume {
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub node: String,
    pub config: BTreeMap<String, String>,
    pub template: bool,
    pub running: bool,
}

#[derive(Debug, Clone)]
enum Effect {
    Upload {
        volid: String,
        size: u64,
        sha256: String,
        checksum: Option<String>,
    },
    Download {
        volid: String,
        checksum: Option<String>,
    },
    Create {
        vmid: u32,
        node: String,
        config: BTreeMap<String, String>,
    },
    Template(u32),
    Clone {
        src: u32,
        newid: u32,
        name: String,
        node: String,
    },
    Destroy(u32),
    Stop(u32),
    DeleteVolume(String),
}

#[derive(Debug, Clone)]
struct Task {
    kind: String,
    polls_left: u32,
    effect: Effect,
    done: Option<String>,
    log: Vec<String>,
}

/// The fake's state; tests read and change it through [`FakePve::state`].
#[derive(Debug)]
pub struct State {
    /// `version` of `GET /version`.
    pub version: String,
    /// token id → (secret, privileges).
    pub tokens: BTreeMap<String, (String, BTreeSet<String>)>,
    /// storage id → content types.
    pub storages: BTreeMap<String, BTreeSet<String>>,
    pub volumes: BTreeMap<String, Volume>,
    pub vms: BTreeMap<u32, Vm>,
    pub requests: Vec<Req>,
    /// Fail the next task of this type (`imgcopy`, `qmcreate`, `qmtemplate`, `qmclone`) with
    /// this message; a failing `qmcreate` leaves its VM behind (a create that died midway).
    pub fail_task: Option<(String, String)>,
    /// Tasks of this type end with `WARNINGS: 1` (and a `WARN:` log line) instead of `OK`.
    pub warn_task: Option<String>,
    /// Created VMs are running (someone started them): `template` must refuse.
    pub start_created: bool,
    /// Polls a task answers `running` before it stops.
    pub task_polls: u32,
    /// Answer the next requests matching (method, path) with (status, message), once each,
    /// before authentication: a flaky proxy or a busy pveproxy.
    pub http_failures: Vec<(String, String, u16, String)>,
    pub nextid: u32,
    tasks: BTreeMap<String, Task>,
    seq: u32,
}

impl State {
    /// Requests other than task polling (what kiln asked Proxmox to do or tell).
    pub fn calls(&self) -> Vec<(String, String)> {
        self.requests
            .iter()
            .filter(|r| !r.path.contains("/tasks/"))
            .map(|r| (r.method.clone(), r.path.clone()))
            .collect()
    }
    /// Requests with this method and path.
    pub fn find(&self, method: &str, path: &str) -> Vec<Req> {
        self.requests
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .cloned()
            .collect()
    }
}

/// A running fake server.
pub struct FakePve {
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// SHA-256 fingerprint of the leaf certificate, `AA:BB:…`.
    pub fingerprint: String,
    /// PEM of the CA that signed the leaf (for `ca_file`).
    pub ca_pem: String,
    pub state: Arc<Mutex<State>>,
}

impl FakePve {
    /// Starts a fake PVE 8.4.1 with one node [`NODE`], storages `local` (dir: import, iso,
    /// vztmpl) and `local-lvm` (images), and the token [`TOKEN_ID`] with every privilege.
    pub fn start() -> FakePve {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Fake PVE Cluster CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let mut leaf_params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        leaf_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pve1.lab");
        let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key).unwrap();
        let leaf_der: CertificateDer<'static> = leaf.der().clone();
        let fingerprint = Sha256::digest(leaf_der.as_ref())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf_der],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
        )
        .unwrap();
        let cfg = Arc::new(cfg);

        let privs: BTreeSet<String> = ALL_PRIVS.iter().map(|s| s.to_string()).collect();
        let state = Arc::new(Mutex::new(State {
            version: "8.4.1".into(),
            tokens: BTreeMap::from([(TOKEN_ID.to_string(), (TOKEN_SECRET.to_string(), privs))]),
            storages: BTreeMap::from([
                (
                    "local".to_string(),
                    ["import", "iso", "vztmpl"]
                        .iter()
                        .map(|s| s.to_string())
                        .collect(),
                ),
                (
                    "local-lvm".to_string(),
                    ["images"].iter().map(|s| s.to_string()).collect(),
                ),
            ]),
            volumes: BTreeMap::new(),
            vms: BTreeMap::new(),
            requests: Vec::new(),
            fail_task: None,
            start_created: false,
            task_polls: 2,
            http_failures: Vec::new(),
            warn_task: None,
            nextid: 100,
            tasks: BTreeMap::new(),
            seq: 0,
        }));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let st = state.clone();
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let (cfg, st) = (cfg.clone(), st.clone());
                std::thread::spawn(move || {
                    let _ = serve_conn(s, cfg, st);
                });
            }
        });
        FakePve {
            url: format!("https://127.0.0.1:{port}"),
            fingerprint,
            ca_pem: ca.pem(),
            state,
        }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }
}

fn serve_conn(
    tcp: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    st: Arc<Mutex<State>>,
) -> std::io::Result<()> {
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    let conn = rustls::ServerConnection::new(cfg).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let (status, reason, body) = {
        let mut r = BufReader::new(&mut tls);
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        if headers
            .get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            // Drain the chunks so the client sees the answer, then refuse as PVE does.
            loop {
                let mut size = String::new();
                r.read_line(&mut size)?;
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0u8; n + 2];
                r.read_exact(&mut chunk)?;
                if n == 0 {
                    break;
                }
            }
            record(&st, &method, &target, &BTreeMap::new(), None);
            (
                501,
                "chunked transfer encoding not supported".to_string(),
                json!({"data": null}),
            )
        } else {
            let len: usize = headers
                .get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; len];
            r.read_exact(&mut body)?;
            handle(&st, &method, &target, &headers, &body)
        }
    };
    let text = body.to_string();
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json;charset=UTF-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    tls.write_all(resp.as_bytes())?;
    tls.flush()?;
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}

type Resp = (u16, String, Value);

fn ok(data: Value) -> Resp {
    (200, "OK".into(), json!({ "data": data }))
}

fn err(status: u16, msg: &str) -> Resp {
    (
        status,
        msg.replace('\n', " ").trim().to_string(),
        json!({ "data": null }),
    )
}

fn param_err(errors: BTreeMap<String, String>) -> Resp {
    (
        400,
        "Parameter verification failed.".into(),
        json!({ "data": null, "errors": errors }),
    )
}

fn one_err(k: &str, v: &str) -> Resp {
    param_err(BTreeMap::from([(k.to_string(), v.to_string())]))
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

fn form(s: &str) -> BTreeMap<String, String> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn handle(
    st: &Arc<Mutex<State>>,
    method: &str,
    target: &str,
    headers: &BTreeMap<String, String>,
    body: &[u8],
) -> Resp {
    let (raw_path, query) = target.split_once('?').unwrap_or((target, ""));
    let Some(rest) = raw_path.strip_prefix("/api2/json") else {
        return err(404, "Not Found");
    };
    let segs: Vec<String> = rest
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let path = format!("/{}", segs.join("/"));
    let mut params = form(query);
    let mut upload = None;
    let ctype = headers.get("content-type").cloned().unwrap_or_default();
    let is_upload = method == "POST" && segs.len() == 5 && segs[4] == "upload";
    if is_upload {
        match parse_multipart(&ctype, body) {
            Ok((p, u)) => {
                params.extend(p);
                upload = Some(u);
            }
            Err(resp) => {
                record(st, method, &path, &params, None);
                return resp;
            }
        }
    } else if !body.is_empty() {
        params.extend(form(&String::from_utf8_lossy(body)));
    }
    let mut s = st.lock().unwrap();
    s.requests.push(Req {
        method: method.into(),
        path: path.clone(),
        params: params.clone(),
        upload: upload.clone(),
    });

    if let Some(i) = s
        .http_failures
        .iter()
        .position(|(m, p, _, _)| m == method && *p == path)
    {
        let (_, _, code, msg) = s.http_failures.remove(i);
        return err(code, &msg);
    }

    // Authentication: PVEAPIToken=USER@REALM!TOKENID=SECRET.
    let auth = headers.get("authorization").cloned().unwrap_or_default();
    let Some((tid, secret)) = auth
        .strip_prefix("PVEAPIToken=")
        .and_then(|t| t.split_once('='))
    else {
        return err(401, "No ticket");
    };
    let privs = match s.tokens.get(tid) {
        Some((sec, p)) if sec == secret => p.clone(),
        _ => return err(401, "invalid token value!"),
    };
    let need = |path: &str, p: &str| -> Result<(), Resp> {
        if privs.contains(p) {
            Ok(())
        } else {
            Err(err(403, &format!("Permission check failed ({path}, {p})")))
        }
    };
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match route(&mut s, method, &segs, &params, upload.as_ref(), &need) {
        Ok(r) => r,
        Err(r) => r,
    }
}

fn record(
    st: &Arc<Mutex<State>>,
    method: &str,
    path: &str,
    params: &BTreeMap<String, String>,
    upload: Option<Upload>,
) {
    st.lock().unwrap().requests.push(Req {
        method: method.into(),
        path: path.into(),
        params: params.clone(),
        upload,
    });
}

/// Parses a multipart body the way pve-http-server does, strictly.
fn parse_multipart(ctype: &str, body: &[u8]) -> Result<(BTreeMap<String, String>, Upload), Resp> {
    let boundary = ctype
        .strip_prefix("multipart/form-data")
        .and_then(|r| {
            r.split(';')
                .find_map(|p| p.trim().strip_prefix("boundary="))
        })
        .map(|b| b.trim_matches('"').to_string())
        .ok_or_else(|| {
            err(
                501,
                &format!("upload 'Content-Type '{ctype}' not implemented"),
            )
        })?;
    let delim = format!("--{boundary}\r\n");
    let close = format!("\r\n--{boundary}--");
    let mut rest = body;
    let mut params = BTreeMap::new();
    let mut parts = Vec::new();
    let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).position(|w| w == needle);
    loop {
        if !rest.starts_with(delim.as_bytes()) {
            return Err(err(500, "upload failed"));
        }
        rest = &rest[delim.len()..];
        let hend = find(rest, b"\r\n\r\n").ok_or_else(|| err(500, "upload failed"))?;
        let head = String::from_utf8_lossy(&rest[..hend]).into_owned();
        rest = &rest[hend + 4..];
        let first = head.lines().next().unwrap_or("");
        let disp = first.strip_prefix("Content-Disposition: ").ok_or_else(|| {
            err(
                500,
                "upload failed: part does not start with Content-Disposition",
            )
        })?;
        let mut fields = disp.split("; ");
        let kind = fields.next().unwrap_or("");
        if kind != "form-data" {
            return Err(err(
                500,
                &format!("wrong Content-Disposition '{kind}' in multipart, expected 'form-data'"),
            ));
        }
        let attr = |n: &str| {
            disp.split("; ")
                .find_map(|f| f.strip_prefix(&format!("{n}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
        };
        let name = attr("name").unwrap_or_default();
        if let Some(filename) = attr("filename") {
            if name != "filename" {
                return Err(err(
                    500,
                    &format!("wrong field name '{name}' for file upload, expected 'filename'"),
                ));
            }
            // Everything up to the closing delimiter is the file: a part after it would end
            // up inside the file, so the fake refuses it outright.
            let end = find(rest, close.as_bytes()).ok_or_else(|| err(500, "upload failed"))?;
            let data = &rest[..end];
            if find(data, format!("\r\n--{boundary}\r\n").as_bytes()).is_some() {
                return Err(err(
                    500,
                    "upload failed: form fields after the file part (the file part must be last)",
                ));
            }
            parts.push("filename".to_string());
            let order_ok = matches!(
                parts
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .as_slice(),
                ["content", "filename"] | ["content", "checksum-algorithm", "checksum", "filename"]
            );
            if !order_ok {
                return Err(err(
                    500,
                    &format!("upload failed: parts in order {parts:?}, expected content, [checksum-algorithm, checksum,] file"),
                ));
            }
            params.insert("filename".into(), filename.trim().to_string());
            return Ok((
                params,
                Upload {
                    parts,
                    filename,
                    size: data.len(),
                    sha256: hex::encode(Sha256::digest(data)),
                },
            ));
        }
        let end = find(rest, format!("\r\n--{boundary}").as_bytes())
            .ok_or_else(|| err(500, "upload failed"))?;
        params.insert(
            name.clone(),
            String::from_utf8_lossy(&rest[..end]).trim().to_string(),
        );
        parts.push(name);
        rest = &rest[end + 2..];
    }
}

fn version_at_least(v: &str, major: u32, minor: u32) -> bool {
    let mut it = v.split(['.', '-']).map(|x| x.parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0)) >= (major, minor)
}

fn new_task(s: &mut State, kind: &str, id: &str, effect: Effect) -> Value {
    s.seq += 1;
    let upid = format!(
        "UPID:{NODE}:{:08X}:{:08X}:{:08X}:{kind}:{id}:{TOKEN_ID}:",
        0x1000 + s.seq,
        0x2000 + s.seq,
        0x6560_0000 + s.seq
    );
    let polls = s.task_polls;
    s.tasks.insert(
        upid.clone(),
        Task {
            kind: kind.into(),
            polls_left: polls,
            effect,
            done: None,
            log: vec![format!("starting task {kind} {id}")],
        },
    );
    Value::String(upid)
}

/// Runs a task's effect when it stops; returns its exit status.
fn finish(s: &mut State, upid: &str) -> String {
    let t = s.tasks.get(upid).cloned().unwrap();
    let injected = match &s.fail_task {
        Some((k, m)) if *k == t.kind => {
            let m = m.clone();
            s.fail_task = None;
            Some(m)
        }
        _ => None,
    };
    let mut log = t.log.clone();
    let result: Result<(), String> = (|| {
        match &t.effect {
            Effect::Upload {
                volid,
                size,
                sha256,
                checksum,
            } => {
                if let Some(m) = &injected {
                    return Err(m.clone());
                }
                if let Some(c) = checksum {
                    if !c.eq_ignore_ascii_case(sha256) {
                        return Err(format!("checksum mismatch: got '{sha256}' != expect '{c}'"));
                    }
                    log.push("calculating checksum...OK, checksum verified".into());
                }
                s.volumes.insert(
                    volid.clone(),
                    Volume {
                        size: *size,
                        sha256: sha256.clone(),
                    },
                );
            }
            Effect::Download { volid, checksum } => {
                if let Some(m) = &injected {
                    return Err(m.clone());
                }
                s.volumes.insert(
                    volid.clone(),
                    Volume {
                        size: 0,
                        sha256: checksum.clone().unwrap_or_default(),
                    },
                );
            }
            Effect::Create { vmid, node, config } => {
                let src = config
                    .get("scsi0")
                    .and_then(|d| d.split(',').find_map(|o| o.strip_prefix("import-from=")))
                    .unwrap_or("")
                    .to_string();
                if !src.is_empty() && !s.volumes.contains_key(&src) {
                    return Err(format!("could not get size of {src}"));
                }
                s.vms.insert(
                    *vmid,
                    Vm {
                        node: node.clone(),
                        config: config.clone(),
                        template: false,
                        running: s.start_created,
                    },
                );
                if let Some(m) = &injected {
                    // Died midway: the config exists, the disk import did not finish.
                    return Err(m.clone());
                }
                log.push(format!("transferred 100% of image {src}"));
            }
            Effect::Template(vmid) => {
                if let Some(m) = &injected {
                    return Err(m.clone());
                }
                let vm = s.vms.get_mut(vmid).ok_or("VM vanished")?;
                vm.template = true;
            }
            Effect::Clone {
                src,
                newid,
                name,
                node,
            } => {
                if let Some(m) = &injected {
                    return Err(m.clone());
                }
                let mut cfg = s.vms.get(src).ok_or("source VM vanished")?.config.clone();
                cfg.insert("name".into(), name.clone());
                cfg.remove("vmid");
                s.vms.insert(
                    *newid,
                    Vm {
                        node: node.clone(),
                        config: cfg,
                        template: false,
                        running: false,
                    },
                );
            }
            Effect::Destroy(vmid) => {
                s.vms.remove(vmid);
            }
            Effect::Stop(vmid) => {
                if let Some(vm) = s.vms.get_mut(vmid) {
                    vm.running = false;
                }
            }
            Effect::DeleteVolume(volid) => {
                s.volumes.remove(volid);
            }
        }
        Ok(())
    })();
    let exit = match result {
        Ok(()) => "OK".to_string(),
        Err(m) => {
            log.push(format!("TASK ERROR: {m}"));
            m
        }
    };
    let exit = if exit == "OK" && s.warn_task.as_deref() == Some(t.kind.as_str()) {
        log.push("WARN: 1 warnings".into());
        "WARNINGS: 1".to_string()
    } else {
        exit
    };
    if exit == "OK" {
        log.push("TASK OK".into());
    }
    let t = s.tasks.get_mut(upid).unwrap();
    t.log = log;
    t.done = Some(exit.clone());
    exit
}

const CREATE_KEYS: &[&str] = &[
    "agent",
    "bios",
    "boot",
    "cores",
    "description",
    "efidisk0",
    "ide2",
    "memory",
    "name",
    "net0",
    "node",
    "ostype",
    "scsi0",
    "scsihw",
    "serial0",
    "sockets",
    "tags",
    "vga",
    "vmid",
];
const CONFIG_KEYS: &[&str] = &[
    "cicustom",
    "ciuser",
    "cores",
    "description",
    "ipconfig0",
    "memory",
    "nameserver",
    "net0",
    "node",
    "searchdomain",
    "sshkeys",
    "tags",
    "vmid",
];

fn is_tag(t: &str) -> bool {
    let mut b = t.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphanumeric() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'+' | b'.'))
}

fn is_dns_name(n: &str) -> bool {
    n.split('.').all(|l| {
        !l.is_empty()
            && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    })
}

fn is_mac(m: &str) -> bool {
    let p: Vec<&str> = m.split(':').collect();
    p.len() == 6
        && p.iter()
            .all(|x| x.len() == 2 && u8::from_str_radix(x, 16).is_ok())
}

/// `<storage>:<size>` (qemu-server's NEW_DISK_RE), returning (storage, size).
fn new_disk(file: &str) -> Option<(&str, &str)> {
    let (st, size) = file.split_once(':')?;
    let size_ok = !size.is_empty()
        && size
            .split_once('.')
            .map_or(size.bytes().all(|c| c.is_ascii_digit()), |(a, b)| {
                !a.is_empty()
                    && !b.is_empty()
                    && a.bytes().all(|c| c.is_ascii_digit())
                    && b.bytes().all(|c| c.is_ascii_digit())
            });
    (!st.is_empty() && !st.contains(['/', ' ']) && size_ok).then_some((st, size))
}

/// Checks the create parameters as qemu-server's schema and `check_drive_param` would.
fn check_create(s: &State, p: &BTreeMap<String, String>) -> Result<(), Resp> {
    let mut e = BTreeMap::new();
    for k in p.keys() {
        if !CREATE_KEYS.contains(&k.as_str()) {
            e.insert(
                k.clone(),
                "property is not defined in schema and the schema does not allow additional properties".to_string(),
            );
        }
    }
    if let Some(n) = p.get("name") {
        if !is_dns_name(n) {
            e.insert(
                "name".into(),
                "value does not look like a valid DNS name".into(),
            );
        }
    }
    if let Some(t) = p.get("tags") {
        if !t
            .split([';', ',', ' '])
            .filter(|x| !x.is_empty())
            .all(is_tag)
        {
            e.insert("tags".into(), "invalid characters in tag".into());
        }
    }
    if let Some(sc) = p.get("scsi0") {
        let mut opts = sc.split(',');
        let file = opts.next().unwrap_or("");
        let rest: Vec<&str> = opts.collect();
        if let Some(src) = rest.iter().find_map(|o| o.strip_prefix("import-from=")) {
            match new_disk(file) {
                Some((st, "0")) if s.storages.contains_key(st) => {}
                Some((st, "0")) => {
                    e.insert("scsi0".into(), format!("storage '{st}' does not exist"));
                }
                _ => {
                    e.insert(
                        "scsi0".into(),
                        "'import-from' requires special syntax - use <storage ID>:0,import-from=<source>".into(),
                    );
                }
            }
            let valid_src = src.split_once(":import/").is_some_and(|(st, f)| {
                !st.is_empty()
                    && [".qcow2", ".raw", ".vmdk", ".ova", ".ovf"]
                        .iter()
                        .any(|x| f.ends_with(x))
            });
            if !valid_src && !src.starts_with('/') {
                e.insert("scsi0".into(), format!("unable to parse volume ID '{src}'"));
            }
        } else if new_disk(file).is_none() {
            e.insert("scsi0".into(), "unable to parse drive options".into());
        }
    }
    if let Some(d) = p.get("efidisk0") {
        let mut opts = d.split(',');
        if new_disk(opts.next().unwrap_or("")).is_none()
            || !opts.all(|o| {
                matches!(
                    o,
                    "efitype=2m" | "efitype=4m" | "pre-enrolled-keys=0" | "pre-enrolled-keys=1"
                )
            })
        {
            e.insert("efidisk0".into(), "unable to parse drive options".into());
        }
    }
    if let Some(i) = p.get("ide2") {
        if !i.ends_with(":cloudinit") && !i.contains(",media=cdrom") {
            e.insert("ide2".into(), "unable to parse drive options".into());
        }
    }
    for (k, allowed) in [
        ("bios", &["seabios", "ovmf"][..]),
        (
            "scsihw",
            &["lsi", "virtio-scsi-pci", "virtio-scsi-single"][..],
        ),
        ("ostype", &["l26", "other"][..]),
        ("vga", &["serial0", "std", "virtio"][..]),
        ("serial0", &["socket"][..]),
    ] {
        if let Some(v) = p.get(k) {
            if !allowed.contains(&v.as_str()) {
                e.insert(
                    k.into(),
                    format!(
                        "value '{v}' does not have a value in the enumeration '{}'",
                        allowed.join(", ")
                    ),
                );
            }
        }
    }
    if let Some(n) = p.get("net0") {
        if !n.starts_with("virtio") || !n.contains("bridge=") {
            e.insert("net0".into(), "unable to parse network options".into());
        }
    }
    for k in ["memory", "cores", "vmid"] {
        if let Some(v) = p.get(k) {
            if v.parse::<u32>().is_err() {
                e.insert(
                    k.into(),
                    format!("type check ('integer') failed - got '{v}'"),
                );
            }
        }
    }
    if !p.contains_key("vmid") {
        e.insert(
            "vmid".into(),
            "property is missing and it is not optional".into(),
        );
    }
    if e.is_empty() {
        Ok(())
    } else {
        Err(param_err(e))
    }
}

fn check_config(p: &BTreeMap<String, String>) -> Result<(), Resp> {
    let mut e = BTreeMap::new();
    for (k, v) in p {
        if !CONFIG_KEYS.contains(&k.as_str()) {
            e.insert(
                k.clone(),
                "property is not defined in schema and the schema does not allow additional properties".to_string(),
            );
            continue;
        }
        match k.as_str() {
            "net0" => {
                let mut o = v.split(',');
                let model = o.next().unwrap_or("");
                let mac_ok = model.strip_prefix("virtio=").is_some_and(is_mac);
                if !mac_ok || !o.any(|x| x.starts_with("bridge=")) {
                    e.insert(k.clone(), "unable to parse network options".into());
                }
            }
            "ipconfig0" => {
                let ok = v.split(',').all(|x| {
                    x == "ip=dhcp"
                        || x.strip_prefix("ip=").is_some_and(|c| {
                            c.split_once('/').is_some_and(|(a, m)| {
                                a.parse::<std::net::Ipv4Addr>().is_ok()
                                    && m.parse::<u8>().is_ok_and(|m| m <= 32)
                            })
                        })
                        || x.strip_prefix("gw=")
                            .is_some_and(|g| g.parse::<std::net::Ipv4Addr>().is_ok())
                });
                if !ok {
                    e.insert(k.clone(), format!("invalid format - unable to parse '{v}'"));
                }
            }
            "sshkeys" => {
                let enc_ok = v
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-%_.!~*'()".contains(&c));
                if !enc_ok {
                    e.insert(k.clone(), format!("invalid urlencoded string: {v}"));
                } else {
                    let keys = percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned();
                    if !keys.lines().filter(|l| !l.trim().is_empty()).all(|l| {
                        let mut f = l.split_whitespace();
                        f.next()
                            .is_some_and(|t| t.starts_with("ssh-") || t.starts_with("ecdsa-"))
                            && f.next().is_some()
                    }) {
                        e.insert(k.clone(), "invalid SSH public key".into());
                    }
                }
            }
            "nameserver"
                if !v
                    .split([' ', ',', ';'])
                    .filter(|x| !x.is_empty())
                    .all(|x| x.parse::<std::net::IpAddr>().is_ok()) =>
            {
                e.insert(
                    k.clone(),
                    format!("value '{v}' does not look like a valid address list"),
                );
            }
            "tags"
                if !v
                    .split([';', ',', ' '])
                    .filter(|x| !x.is_empty())
                    .all(is_tag) =>
            {
                e.insert(k.clone(), "invalid characters in tag".into());
            }
            _ => {}
        }
    }
    if e.is_empty() {
        Ok(())
    } else {
        Err(param_err(e))
    }
}

type Need<'a> = &'a dyn Fn(&str, &str) -> Result<(), Resp>;

fn route(
    s: &mut State,
    method: &str,
    segs: &[&str],
    p: &BTreeMap<String, String>,
    upload: Option<&Upload>,
    need: Need,
) -> Result<Resp, Resp> {
    let node = if segs.first() == Some(&"nodes") {
        let n = segs.get(1).copied().unwrap_or("");
        if !NODES.contains(&n) {
            return Err(err(
                500,
                &format!("hostname lookup '{n}' failed - no such node"),
            ));
        }
        n
    } else {
        NODE
    };
    // A VM is only found through the node that holds it.
    if let ["nodes", n, "qemu", id, ..] = segs {
        if let Some(vm) = id.parse::<u32>().ok().and_then(|i| s.vms.get(&i)) {
            if vm.node != *n {
                return Err(err(
                    500,
                    &format!("Configuration file 'nodes/{n}/qemu-server/{id}.conf' does not exist"),
                ));
            }
        }
    }
    let vmid_of = |x: &str| {
        x.parse::<u32>()
            .map_err(|_| one_err("vmid", "type check ('integer') failed"))
    };
    match (method, segs) {
        ("GET", ["version"]) => Ok(ok(json!({
            "version": s.version,
            "release": s.version.rsplit_once('.').map(|x| x.0).unwrap_or(&s.version),
            "repoid": "fakefake",
        }))),
        ("GET", ["cluster", "nextid"]) => {
            let mut id = s.nextid;
            while s.vms.contains_key(&id) {
                id += 1;
            }
            Ok(ok(json!(id.to_string())))
        }
        ("GET", ["cluster", "resources"]) => {
            let list: Vec<Value> = s
                .vms
                .iter()
                .map(|(id, vm)| {
                    json!({
                        "id": format!("qemu/{id}"),
                        "type": "qemu",
                        "vmid": id,
                        "name": vm.config.get("name").cloned().unwrap_or_default(),
                        "node": vm.node,
                        "status": if vm.running { "running" } else { "stopped" },
                        "template": if vm.template { 1 } else { 0 },
                        "tags": vm.config.get("tags").cloned().unwrap_or_default(),
                    })
                })
                .collect();
            Ok(ok(Value::Array(list)))
        }
        ("GET", ["nodes", _, "tasks", upid, "status"]) => {
            let t = s
                .tasks
                .get_mut(*upid)
                .ok_or_else(|| err(500, &format!("no such task '{upid}'")))?;
            if t.done.is_none() && t.polls_left > 0 {
                t.polls_left -= 1;
                return Ok(ok(json!({ "status": "running", "upid": upid })));
            }
            let exit = match t.done.clone() {
                Some(x) => x,
                None => finish(s, upid),
            };
            Ok(ok(
                json!({ "status": "stopped", "exitstatus": exit, "upid": upid }),
            ))
        }
        ("GET", ["nodes", _, "tasks", upid, "log"]) => {
            let t = s
                .tasks
                .get(*upid)
                .ok_or_else(|| err(500, &format!("no such task '{upid}'")))?;
            let lines: Vec<Value> = t
                .log
                .iter()
                .enumerate()
                .map(|(i, l)| json!({ "n": i + 1, "t": l }))
                .collect();
            Ok(ok(Value::Array(lines)))
        }
        ("GET", ["nodes", _, "storage", st, "content"]) => {
            need(&format!("/storage/{st}"), "Datastore.Audit")?;
            let list: Vec<Value> = s
                .volumes
                .iter()
                .filter(|(v, _)| v.starts_with(&format!("{st}:")))
                .filter(|(v, _)| p.get("content").is_none_or(|c| v.contains(&format!(":{c}/"))))
                .map(|(v, info)| {
                    json!({ "volid": v, "content": "import", "format": v.rsplit('.').next(), "size": info.size })
                })
                .collect();
            Ok(ok(Value::Array(list)))
        }
        ("POST", ["nodes", _, "storage", st, action @ ("upload" | "download-url")]) => {
            need(&format!("/storage/{st}"), "Datastore.AllocateTemplate")?;
            if *action == "download-url" {
                need(&format!("/nodes/{node}"), "Sys.AccessNetwork")?;
            }
            let content = p.get("content").cloned().unwrap_or_default();
            let allowed: &[&str] = if version_at_least(&s.version, 8, 4) {
                &["iso", "vztmpl", "import"]
            } else {
                &["iso", "vztmpl"]
            };
            if !allowed.contains(&content.as_str()) {
                return Err(one_err(
                    "content",
                    &format!(
                        "value '{content}' does not have a value in the enumeration '{}'",
                        allowed.join(", ")
                    ),
                ));
            }
            let filename = p.get("filename").cloned().unwrap_or_default();
            let norm: String = filename
                .rsplit(['/', '\\'])
                .next()
                .unwrap_or("")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            let valid = norm.rsplit_once('.').is_some_and(|(stem, ext)| {
                !stem.is_empty() && ["ova", "qcow2", "raw", "vmdk"].contains(&ext)
            });
            if content == "import" && !valid {
                return Err(one_err("filename", "invalid filename or wrong extension"));
            }
            if !s.storages.get(*st).is_some_and(|c| c.contains(&content)) {
                return Err(err(
                    500,
                    &format!("storage '{st}' does not support '{content}' content"),
                ));
            }
            if p.contains_key("checksum") != p.contains_key("checksum-algorithm") {
                return Err(one_err(
                    "checksum",
                    "checksum and checksum-algorithm go together",
                ));
            }
            let volid = format!("{st}:{content}/{norm}");
            let checksum = p.get("checksum").cloned();
            let effect = match upload {
                Some(u) => Effect::Upload {
                    volid,
                    size: u.size as u64,
                    sha256: u.sha256.clone(),
                    checksum,
                },
                None => {
                    if !p
                        .get("url")
                        .is_some_and(|u| u.starts_with("http://") || u.starts_with("https://"))
                    {
                        return Err(one_err("url", "value does not match the regex pattern"));
                    }
                    Effect::Download { volid, checksum }
                }
            };
            let kind = if *action == "upload" {
                "imgcopy"
            } else {
                "download"
            };
            Ok(ok(new_task(s, kind, "", effect)))
        }
        ("DELETE", ["nodes", _, "storage", st, "content", volid]) => {
            need(&format!("/storage/{st}"), "Datastore.Allocate")?;
            if !s.volumes.contains_key(*volid) {
                return Err(err(500, &format!("volume '{volid}' does not exist")));
            }
            Ok(ok(new_task(
                s,
                "imgdel",
                "",
                Effect::DeleteVolume(volid.to_string()),
            )))
        }
        ("POST", ["nodes", _, "qemu"]) => {
            let vmid = p.get("vmid").cloned().unwrap_or_default();
            need(&format!("/vms/{vmid}"), "VM.Allocate")?;
            check_create(s, p)?;
            let id = vmid_of(&vmid)?;
            if s.vms.contains_key(&id) {
                return Err(err(
                    500,
                    &format!("unable to create VM {id} - VM {id} already exists on node '{node}'"),
                ));
            }
            let mut config = p.clone();
            config.remove("node");
            Ok(ok(new_task(
                s,
                "qmcreate",
                &vmid,
                Effect::Create {
                    vmid: id,
                    node: node.to_string(),
                    config,
                },
            )))
        }
        ("GET", ["nodes", _, "qemu", vmid, "config"]) => {
            need(&format!("/vms/{vmid}"), "VM.Audit")?;
            let id = vmid_of(vmid)?;
            let vm = s.vms.get(&id).ok_or_else(|| {
                err(
                    500,
                    &format!(
                        "Configuration file 'nodes/{node}/qemu-server/{id}.conf' does not exist"
                    ),
                )
            })?;
            let mut c: serde_json::Map<String, Value> = vm
                .config
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            if vm.template {
                c.insert("template".into(), json!(1));
            }
            Ok(ok(Value::Object(c)))
        }
        ("PUT", ["nodes", _, "qemu", vmid, "config"]) => {
            need(&format!("/vms/{vmid}"), "VM.Config.Cloudinit")?;
            if p.contains_key("net0") {
                need(&format!("/vms/{vmid}"), "VM.Config.Network")?;
            }
            let id = vmid_of(vmid)?;
            check_config(p)?;
            let vm = s.vms.get_mut(&id).ok_or_else(|| {
                err(
                    500,
                    &format!(
                        "Configuration file 'nodes/{node}/qemu-server/{id}.conf' does not exist"
                    ),
                )
            })?;
            for (k, v) in p {
                if k != "node" && k != "vmid" {
                    vm.config.insert(k.clone(), v.clone());
                }
            }
            Ok(ok(Value::Null))
        }
        ("POST", ["nodes", _, "qemu", vmid, "template"]) => {
            need(&format!("/vms/{vmid}"), "VM.Allocate")?;
            let id = vmid_of(vmid)?;
            let vm = s.vms.get(&id).ok_or_else(|| {
                err(
                    500,
                    &format!(
                        "Configuration file 'nodes/{node}/qemu-server/{id}.conf' does not exist"
                    ),
                )
            })?;
            if vm.template {
                return Err(err(500, "you can't convert a template to a template"));
            }
            if vm.running {
                return Err(err(
                    500,
                    "you can't convert a VM to template if VM is running",
                ));
            }
            Ok(ok(new_task(s, "qmtemplate", vmid, Effect::Template(id))))
        }
        ("POST", ["nodes", _, "qemu", vmid, "clone"]) => {
            need(&format!("/vms/{vmid}"), "VM.Clone")?;
            let id = vmid_of(vmid)?;
            for k in p.keys() {
                if ![
                    "description",
                    "format",
                    "full",
                    "name",
                    "newid",
                    "node",
                    "pool",
                    "snapname",
                    "storage",
                    "target",
                    "vmid",
                ]
                .contains(&k.as_str())
                {
                    return Err(one_err(k, "property is not defined in schema and the schema does not allow additional properties"));
                }
            }
            let newid = vmid_of(p.get("newid").map(String::as_str).unwrap_or(""))?;
            need(&format!("/vms/{newid}"), "VM.Allocate")?;
            if !s.vms.contains_key(&id) {
                return Err(err(
                    500,
                    &format!(
                        "Configuration file 'nodes/{node}/qemu-server/{id}.conf' does not exist"
                    ),
                ));
            }
            if s.vms.contains_key(&newid) {
                return Err(err(
                    500,
                    &format!("unable to create VM {newid}: config file already exists"),
                ));
            }
            let name = p
                .get("name")
                .cloned()
                .unwrap_or_else(|| format!("Copy-of-VM-{id}"));
            if !is_dns_name(&name) {
                return Err(one_err("name", "value does not look like a valid DNS name"));
            }
            let node = p.get("target").cloned().unwrap_or_else(|| node.to_string());
            Ok(ok(new_task(
                s,
                "qmclone",
                vmid,
                Effect::Clone {
                    src: id,
                    newid,
                    name,
                    node,
                },
            )))
        }
        ("POST", ["nodes", _, "qemu", vmid, "status", "stop"]) => {
            need(&format!("/vms/{vmid}"), "VM.PowerMgmt")?;
            let id = vmid_of(vmid)?;
            Ok(ok(new_task(s, "qmstop", vmid, Effect::Stop(id))))
        }
        ("DELETE", ["nodes", _, "qemu", vmid]) => {
            need(&format!("/vms/{vmid}"), "VM.Allocate")?;
            let id = vmid_of(vmid)?;
            let vm = s.vms.get(&id).ok_or_else(|| {
                err(
                    500,
                    &format!(
                        "Configuration file 'nodes/{node}/qemu-server/{id}.conf' does not exist"
                    ),
                )
            })?;
            if vm.running {
                return Err(err(500, &format!("VM {id} is running - destroy failed")));
            }
            Ok(ok(new_task(s, "qmdestroy", vmid, Effect::Destroy(id))))
        }
        _ => Err(err(
            501,
            &format!("Method '{method} /{}' not implemented", segs.join("/")),
        )),
    }
}
