//! The updates API of `kiln serve` (docs/guide/updates.md), for the nodes' `kiln-update`:
//!
//! - `GET /v1/nodes/<host>/target` — `204` (no rollout has reached this node: stay) or `200`
//!   with `kiln-target/1`, `build <id>`, `role <role>`, `rollback 0|1`, `seq <last accepted>`;
//! - `POST /v1/nodes/<host>/report` — a `kiln-report/1` body whose HMAC-SHA256 with the node's
//!   update key (derived from `keys/node-identity.key`, as its seed's `kiln-update-key`) is in
//!   `X-Kiln-Auth`, with a `seq` above the last accepted one: `204`, else `401` (bad or missing
//!   signature), `409` (replayed or out-of-order), `400`/`404`/`413`;
//! - `GET /v1/rollouts` — every role's rollout (JSON), for `kiln rollout status` elsewhere.
//!
//! Rollout state lives in `out/rollouts/` (see [`crate::deliver::rollout`]); every request that
//! changes it holds the file lock, so `kiln rollout` commands and a restarted server see it.

use super::catalog::{Catalog, LoadOptions};
use super::State;
use crate::deliver::rollout::{self, Rollout, Store};
use anyhow::{Context, Result};
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use sha2::Sha256;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use zeroize::Zeroizing;

/// Largest report body.
pub const MAX_REPORT: usize = 4096;

/// What the API needs besides the catalog.
pub struct Updates {
    pub store: Store,
    pub out_dir: PathBuf,
    secret: Zeroizing<[u8; 32]>,
    cluster: String,
    /// Inventory hostname → role.
    roles: BTreeMap<String, String>,
    key: ed25519_dalek::VerifyingKey,
    lo: LoadOptions,
    /// How nodes are drained: the API URL and the cluster's CAs (from keys/), if it has them.
    kube: Option<Kube>,
    drain_timeout: std::time::Duration,
    /// Hosts whose drain or uncordon is running now.
    busy: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

struct Kube {
    url: String,
    server_ca: Vec<u8>,
    client_ca_crt: String,
    client_ca_key: Zeroizing<String>,
}

impl Updates {
    pub fn new(
        project: &crate::project::recipe::Project,
        out_dir: &std::path::Path,
        key: ed25519_dalek::VerifyingKey,
        lo: LoadOptions,
        kube_api: Option<&str>,
    ) -> Result<Updates> {
        let secret = crate::pipeline::resolve::read_node_identity(project)?;
        use crate::trust::k3s_ca;
        let keys = project.layout().keys();
        let read = |n: &str| std::fs::read(keys.join(n));
        let url = kube_api
            .map(str::to_string)
            .or_else(|| project.cluster.server_url());
        let kube = match (
            url,
            read(k3s_ca::SERVER_CA_CRT),
            read(k3s_ca::CLIENT_CA_CRT),
            read(k3s_ca::CLIENT_CA_KEY),
        ) {
            (Some(url), Ok(server_ca), Ok(c), Ok(k)) => Some(Kube {
                url,
                server_ca,
                client_ca_crt: String::from_utf8_lossy(&c).into_owned(),
                client_ca_key: Zeroizing::new(String::from_utf8_lossy(&k).into_owned()),
            }),
            _ => None,
        };
        let u = project.cluster.updates.as_ref();
        let drain_timeout = std::time::Duration::from_secs(
            u.map_or(crate::project::inventory::DEFAULT_DRAIN_TIMEOUT, |u| {
                u.drain_timeout
            }) as u64,
        );
        Ok(Updates {
            store: Store::new(out_dir),
            out_dir: out_dir.to_path_buf(),
            secret,
            cluster: project.cluster.section.name.clone(),
            roles: project
                .cluster
                .nodes
                .iter()
                .map(|n| (n.hostname.clone(), n.role.clone()))
                .collect(),
            key,
            lo,
            kube,
            drain_timeout,
            busy: Default::default(),
        })
    }

    fn api(&self) -> Result<crate::deliver::drain::Api> {
        let k = self.kube.as_ref().context(
            "no Kubernetes API to drain through: cluster.toml has no api_endpoint and no master a static address, or keys/ lacks the k3s CAs (pass --kube-api, run `kiln keys init --add-missing`)",
        )?;
        crate::deliver::drain::Api::new(&k.url, &k.server_ca, &k.client_ca_crt, &k.client_ca_key)
    }

    fn role_of(&self, host: &str) -> Option<&str> {
        self.roles.get(host).map(|s| s.as_str())
    }

    /// Whether `auth` (hex) is the HMAC-SHA256 of `body` with `host`'s update key.
    pub fn authentic(&self, host: &str, body: &[u8], auth: &str) -> bool {
        let key = crate::trust::identity::update_key(&self.secret, &self.cluster, host);
        let Ok(tag) = hex::decode(auth.trim()) else {
            return false;
        };
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&key[..]).expect("any key length");
        m.update(body);
        m.verify_slice(&tag).is_ok()
    }
}

/// Loads the builds every rollout names (target and previous builds) into `cat`, so their files
/// are served; builds that are gone or fail verification are warned about.
pub fn add_rollout_builds(cat: &mut Catalog, u: &Updates) {
    let Ok(all) = u.store.all() else {
        return;
    };
    for r in all {
        let ids =
            std::iter::once(r.build.clone()).chain(r.nodes.iter().filter_map(|n| n.from.clone()));
        for id in ids {
            if cat.build(&r.role, &id).is_some() {
                continue;
            }
            let dir = crate::project::layout::Out::new(&u.out_dir).build(&r.role, &id);
            if let Err(e) = cat.add_build(&r.role, &id, &dir, &u.key, &u.lo) {
                cat.warnings.push(format!(
                    "rollout of {}: build {}: {e:#}",
                    r.role,
                    rollout::short(&id)
                ));
            }
        }
    }
}

pub fn is_api(path: &str) -> bool {
    path.starts_with("/v1/")
}

type Resp = hyper::Response<super::http::RespBody>;

/// Answers a `/v1/` request.
pub async fn handle(req: Request<Incoming>, st: &Arc<State>) -> Resp {
    let Some(u) = st.updates.clone() else {
        return text(
            StatusCode::NOT_FOUND,
            "updates are not configured on this server ([updates] in cluster.toml)\n",
        );
    };
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method().clone(), segs.as_slice()) {
        (Method::GET | Method::HEAD, ["v1", "nodes", host, "target"]) => {
            let host = host.to_string();
            let st2 = st.clone();
            blocking(move || target(&st2, &u, &host)).await
        }
        (Method::POST, ["v1", "nodes", host, "report"]) => {
            let host = host.to_string();
            let auth = req
                .headers()
                .get("x-kiln-auth")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = match http_body_util::Limited::new(req.into_body(), MAX_REPORT)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => {
                    return text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("a report is at most {MAX_REPORT} bytes\n"),
                    )
                }
            };
            let st2 = st.clone();
            blocking(move || report(&st2, &u, &host, &body, &auth)).await
        }
        (Method::GET | Method::HEAD, ["v1", "rollouts"]) => {
            blocking(move || {
                let all = u.store.all()?;
                Ok(full(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_string_pretty(&all)? + "\n",
                ))
            })
            .await
        }
        (_, ["v1", "nodes", _, "target"] | ["v1", "rollouts"]) => {
            text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n")
        }
        (_, ["v1", "nodes", _, "report"]) => text(StatusCode::METHOD_NOT_ALLOWED, "only POST\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

async fn blocking(f: impl FnOnce() -> Result<Resp> + Send + 'static) -> Resp {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::error!(target: "kiln::serve::updates", "{e:#}");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the server could not read or write its rollout state (see its log)\n",
            )
        }
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `GET /v1/nodes/<host>/target`.
fn target(st: &State, u: &Updates, host: &str) -> Result<Resp> {
    let Some(role) = u.role_of(host) else {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "no such node in the inventory\n",
        ));
    };
    let _l = u.store.lock()?;
    let seen = u.store.seen()?;
    let seq = seen.nodes.get(host).map(|n| n.seq).unwrap_or(0);
    let Some(r) = u.store.load(role)? else {
        return Ok(empty());
    };
    let Some(t) = r.target(host) else {
        return Ok(empty());
    };
    // The build must be served before the node is told to fetch it.
    ensure_build(st, u, role, &t.build)?;
    Ok(text(
        StatusCode::OK,
        format!(
            "kiln-target/1\nbuild {}\nrole {role}\nrollback {}\nreboot {}\nseq {seq}\n",
            t.build,
            u8::from(t.rollback),
            u8::from(t.reboot)
        ),
    ))
}

/// The build a rollout assigns `host` (a PXE boot's build), if it is served already (the node's
/// updater asked for its target, which added it, before it rebooted).
pub fn rollout_build<'a>(
    st: &State,
    cat: &'a Catalog,
    host: &str,
    role: &str,
) -> Option<&'a super::catalog::RoleBuild> {
    let u = st.updates.as_ref()?;
    let r = u.store.load(role).ok()??;
    let t = r.target(host)?;
    cat.build(role, &t.build)
}

/// Adds build `id` of `role` to the served catalog if it is not there yet (verified first).
pub fn ensure_build(st: &State, u: &Updates, role: &str, id: &str) -> Result<()> {
    let cat = st.catalog();
    if cat.build(role, id).is_some() {
        return Ok(());
    }
    let dir = crate::project::layout::Out::new(&u.out_dir).build(role, id);
    let mut next = (*cat).clone();
    next.add_build(role, id, &dir, &u.key, &u.lo)
        .with_context(|| format!("serving {role} build {} for a rollout", rollout::short(id)))?;
    st.replace_catalog(next);
    tracing::info!(target: "kiln::serve::updates", role, build = %rollout::short(id), "serving a rollout's build");
    Ok(())
}

/// `POST /v1/nodes/<host>/report`.
fn report(st: &State, u: &Arc<Updates>, host: &str, body: &Bytes, auth: &str) -> Result<Resp> {
    let Some(role) = u.role_of(host) else {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "no such node in the inventory\n",
        ));
    };
    if !u.authentic(host, body, auth) {
        st.metrics
            .inc("kiln_update_reports_refused_total", &[("why", "auth")]);
        tracing::warn!(target: "kiln::serve::updates", host, "report refused: missing or wrong X-Kiln-Auth");
        return Ok(text(
            StatusCode::UNAUTHORIZED,
            "X-Kiln-Auth is not this node's HMAC of the report\n",
        ));
    }
    let parsed = std::str::from_utf8(body)
        .map_err(|_| anyhow::anyhow!("not UTF-8"))
        .and_then(rollout::parse_report);
    let r = match parsed {
        Ok(r) if r.host == host => r,
        Ok(r) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                format!("the report is from {}, not {host}\n", r.host),
            ))
        }
        Err(e) => {
            return Ok(text(
                StatusCode::BAD_REQUEST,
                format!("bad report: {e:#}\n"),
            ))
        }
    };
    let _l = u.store.lock()?;
    let mut seen = u.store.seen()?;
    let last = seen.nodes.get(host).map(|n| n.seq).unwrap_or(0);
    if r.seq <= last {
        st.metrics
            .inc("kiln_update_reports_refused_total", &[("why", "replay")]);
        return Ok(text(
            StatusCode::CONFLICT,
            format!(
                "seq {} is not above the last accepted {last} (replayed or out of order)\n",
                r.seq
            ),
        ));
    }
    let at = now();
    seen.nodes.insert(
        host.to_string(),
        rollout::SeenNode {
            seq: r.seq,
            build: r.build.clone(),
            slot: r.slot.clone(),
            step: r.step.clone(),
            health: r.health.clone(),
            detail: r.detail.clone(),
            at,
        },
    );
    u.store.save_seen(&seen)?;
    st.metrics
        .inc("kiln_update_reports_total", &[("step", &r.step)]);
    tracing::info!(target: "kiln::serve::updates", host, step = %r.step, build = %rollout::short(&r.build), slot = %r.slot, health = %r.health, "{}", r.detail);
    if let Some(mut ro) = u.store.load(role)? {
        let before = ro.state;
        if ro.apply(&r, at) {
            u.store.save(&ro)?;
            if ro.state != before {
                tracing::info!(target: "kiln::serve::updates", role, state = ?ro.state, "rollout: {}", ro.reason);
            }
            log_assignments(&ro);
            if ro.wants_drain(host) {
                spawn_kube_job(u, role, host, true);
            } else if ro.wants_uncordon(host) {
                spawn_kube_job(u, role, host, false);
            }
        }
    }
    Ok(empty())
}

/// Drains (`drain`) or uncordons `host` in a thread; the result goes into the rollout.
fn spawn_kube_job(u: &Arc<Updates>, role: &str, host: &str, drain: bool) {
    {
        let mut busy = u.busy.lock().unwrap_or_else(|e| e.into_inner());
        if !busy.insert(host.to_string()) {
            return;
        }
    }
    let (u, role, host) = (u.clone(), role.to_string(), host.to_string());
    std::thread::spawn(move || {
        let r = u.api().and_then(|api| {
            if drain {
                tracing::info!(target: "kiln::serve::updates", host = %host, "cordoning and draining");
                api.drain(&host, u.drain_timeout).inspect_err(|_| {
                    // The rollout stops; the node goes back to taking pods.
                    let _ = api.cordon(&host, false);
                })
            } else {
                api.cordon(&host, false)
            }
        });
        if let Err(e) = &r {
            tracing::warn!(target: "kiln::serve::updates", host = %host, "{e:#}");
        }
        let saved = (|| -> Result<()> {
            let _l = u.store.lock()?;
            if let Some(mut ro) = u.store.load(&role)? {
                let now = now();
                if drain {
                    ro.drained(&host, r.map_err(|e| format!("{e:#}")), now);
                } else if r.is_ok() {
                    ro.uncordoned(&host, now);
                }
                u.store.save(&ro)?;
            }
            Ok(())
        })();
        if let Err(e) = saved {
            tracing::error!(target: "kiln::serve::updates", host = %host, "recording the drain: {e:#}");
        }
        u.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&host);
    });
}

/// The rollout's latest assignment events, on the server's log.
fn log_assignments(r: &Rollout) {
    if let Some(e) = r.events.last().filter(|e| e.what.starts_with("assigned")) {
        tracing::info!(target: "kiln::serve::updates", host = %e.host, role = %r.role, "rollout: {}", e.what);
    }
}

fn full(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Resp {
    super::http::full_response(status, ctype, body)
}

fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    full(status, "text/plain; charset=utf-8", body.into())
}

fn empty() -> Resp {
    full(
        StatusCode::NO_CONTENT,
        "text/plain; charset=utf-8",
        Bytes::new(),
    )
}
