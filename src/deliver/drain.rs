//! Cordoning and draining a node through the Kubernetes API before a rollout reboots it, and
//! uncordoning it once it is healthy again (docs/guide/updates.md#drain) — what `kubectl drain`
//! does (k8s.io/kubectl/pkg/drain): patch `spec.unschedulable`, list the node's pods
//! (`fieldSelector=spec.nodeName=<node>`), leave DaemonSet-owned and mirror pods, evict the
//! others through the `policy/v1` Eviction subresource (retrying a `429`: a
//! PodDisruptionBudget allows no disruption now), and wait until they are gone.
//!
//! `kiln serve` does it, not the node: it holds `keys/`, so it mints a short-lived client
//! certificate of the cluster's client CA in `system:masters` (as `kiln kubeconfig` does) and
//! trusts only the cluster's server CA. A kubelet's own credentials cannot evict pods.

use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

/// How the server reaches the API.
#[derive(Clone)]
pub struct Api {
    base: String,
    client: reqwest::blocking::Client,
}

/// A pod on the node being drained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// Owned by a DaemonSet, or a mirror pod of a static pod: not evicted (kubectl drain
    /// `--ignore-daemonsets`; mirror pods cannot be).
    pub stays: bool,
}

/// Every retry of an eviction or of the "are they gone" check waits this long.
pub const POLL: Duration = Duration::from_secs(2);
/// Lifetime of the client certificate minted per drain.
const CERT_LIFETIME: Duration = Duration::from_secs(3600);

impl Api {
    /// An API client for `base` (`https://host:6443`) trusting the cluster's server CA and
    /// presenting a fresh `system:masters` certificate of its client CA.
    pub fn new(
        base: &str,
        server_ca_pem: &[u8],
        client_ca_crt: &str,
        client_ca_key: &str,
    ) -> Result<Api> {
        let (crt, key) = crate::trust::k3s_ca::client_certificate(
            client_ca_crt,
            client_ca_key,
            "kiln-serve",
            "system:masters",
            std::time::SystemTime::now(),
            CERT_LIFETIME,
        )?;
        let identity = reqwest::Identity::from_pem(format!("{crt}{key}").as_bytes())
            .context("loading the minted client certificate")?;
        let ca = reqwest::Certificate::from_pem(server_ca_pem)
            .context("reading the cluster's server CA")?;
        let client = reqwest::blocking::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .identity(identity)
            .timeout(Duration::from_secs(20))
            .build()
            .context("building the API client")?;
        Ok(Api {
            base: base.trim_end_matches('/').to_string(),
            client,
        })
    }

    fn check(r: reqwest::blocking::Response, what: &str) -> Result<reqwest::blocking::Response> {
        let status = r.status();
        if status.is_success() {
            return Ok(r);
        }
        let body = r.text().unwrap_or_default();
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        bail!("{what}: HTTP {status}: {}", msg.trim())
    }

    /// Marks `node` (un)schedulable.
    pub fn cordon(&self, node: &str, on: bool) -> Result<()> {
        let what = format!("{} {node}", if on { "cordoning" } else { "uncordoning" });
        let r = self
            .client
            .patch(format!("{}/api/v1/nodes/{node}", self.base))
            .header("Content-Type", "application/merge-patch+json")
            .body(serde_json::json!({"spec": {"unschedulable": on}}).to_string())
            .send()
            .with_context(|| what.clone())?;
        Self::check(r, &what).map(|_| ())
    }

    /// The pods bound to `node`.
    pub fn pods(&self, node: &str) -> Result<Vec<Pod>> {
        let what = format!("listing the pods on {node}");
        let r = self
            .client
            .get(format!("{}/api/v1/pods", self.base))
            .query(&[("fieldSelector", format!("spec.nodeName={node}"))])
            .send()
            .with_context(|| what.clone())?;
        let body = Self::check(r, &what)?
            .text()
            .with_context(|| what.clone())?;
        let v: serde_json::Value = serde_json::from_str(&body).with_context(|| what.clone())?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        Ok(items
            .iter()
            .map(|p| {
                let m = &p["metadata"];
                let ds = m["ownerReferences"]
                    .as_array()
                    .is_some_and(|o| o.iter().any(|o| o["kind"] == "DaemonSet"));
                let mirror = m["annotations"]["kubernetes.io/config.mirror"].is_string();
                Pod {
                    namespace: m["namespace"].as_str().unwrap_or("default").to_string(),
                    name: m["name"].as_str().unwrap_or_default().to_string(),
                    stays: ds || mirror,
                }
            })
            .collect())
    }

    /// Asks to evict one pod: `Ok(true)` evicted (or already gone), `Ok(false)` refused for now
    /// (429: its disruption budget).
    pub fn evict(&self, p: &Pod) -> Result<bool> {
        let what = format!("evicting {}/{}", p.namespace, p.name);
        let r = self
            .client
            .post(format!(
                "{}/api/v1/namespaces/{}/pods/{}/eviction",
                self.base, p.namespace, p.name
            ))
            .header("Content-Type", "application/json")
            .body(
                serde_json::json!({
                    "apiVersion": "policy/v1",
                    "kind": "Eviction",
                    "metadata": {"name": p.name, "namespace": p.namespace},
                })
                .to_string(),
            )
            .send()
            .with_context(|| what.clone())?;
        match r.status().as_u16() {
            429 => Ok(false),
            404 => Ok(true),
            _ => Self::check(r, &what).map(|_| true),
        }
    }

    /// Cordons `node` and evicts its pods (DaemonSet and mirror pods stay) until none is left,
    /// for at most `timeout`. On failure the node stays cordoned; the error names the pods left.
    pub fn drain(&self, node: &str, timeout: Duration) -> Result<()> {
        self.cordon(node, true)?;
        let t = Instant::now();
        loop {
            let left: Vec<Pod> = self.pods(node)?.into_iter().filter(|p| !p.stays).collect();
            if left.is_empty() {
                return Ok(());
            }
            for p in &left {
                self.evict(p)?;
            }
            if t.elapsed() >= timeout {
                let names: Vec<String> = left
                    .iter()
                    .take(8)
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .collect();
                bail!(
                    "draining {node}: {} pod(s) still there after {} s (a PodDisruptionBudget allows no eviction now?): {}",
                    left.len(),
                    timeout.as_secs(),
                    names.join(", ")
                );
            }
            std::thread::sleep(
                POLL.min(timeout.saturating_sub(t.elapsed()))
                    .max(Duration::from_millis(100)),
            );
        }
    }
}
