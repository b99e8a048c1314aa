//! Rollouts: moving a role's nodes to a new build one healthy node at a time
//! (docs/guide/updates.md).
//!
//! A rollout is a file, `out/rollouts/<role>.json`, read and written under
//! `out/rollouts/.kiln.lock` by `kiln rollout` and by `kiln serve` alike, so a restarted server
//! resumes where it was and a command acts on the running server's rollout. `kiln serve` answers
//! a node's question ("which build should I run?", `GET /v1/nodes/<host>/target`) from it and
//! applies the node's signed reports (`POST /v1/nodes/<host>/report`) to it:
//!
//! - nodes are taken in inventory order; at most `max_unavailable` are *in flight* (assigned the
//!   new build and not yet healthy on it) at once;
//! - a node is done when it reports `healthy` on the new build; then the next is assigned;
//! - `canary = N`: after the first N nodes are done the rollout pauses (`kiln rollout resume`);
//!   `pause_after = N`: it pauses again after every N further nodes;
//! - a node that rolls back (its health check failed on every try and systemd-boot booted the
//!   previous build), fails or refuses the build stops the rollout: nothing more is assigned
//!   and `kiln rollout status` says which node and why;
//! - `abort` sends every node that was assigned back to the build it ran before (a rollback
//!   assignment, which the node's updater accepts even though the build is older).
//!
//! Every change is an event in the rollout's log (time, node, what), which the tests read to
//! check that no two nodes were ever rebooting at once.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// Schema of a rollout file.
pub const SCHEMA: &str = "kiln.rollout/1";
/// Events kept per rollout (older ones are dropped).
pub const MAX_EVENTS: usize = 10_000;

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Assigning nodes as they become healthy.
    Running,
    /// Nothing new is assigned; nodes in flight finish.
    Paused,
    /// A node rolled back, failed or refused the build: nothing new is assigned.
    Stopped,
    /// Nodes that were assigned go back to their previous build.
    Aborting,
    /// Every node that was assigned is back on its previous build.
    Aborted,
    /// Every node is healthy on the new build.
    Done,
}

impl State {
    /// Whether the rollout still acts (assigns builds, waits for nodes).
    pub fn is_active(self) -> bool {
        matches!(self, State::Running | State::Paused | State::Aborting)
    }
}

/// Where one node of the rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Not assigned yet.
    Waiting,
    /// Assigned the new build (or, aborting, its previous one); updating.
    InFlight,
    /// Healthy on the new build.
    Done,
    /// Rolled back to its previous build by itself.
    RolledBack,
    /// The update failed or the node refused the build.
    Failed,
    /// Aborting: healthy on its previous build again.
    Reverted,
}

/// One node's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeProgress {
    pub host: String,
    /// The build it ran when the rollout started (from its last report, else its node
    /// outputs), if known: where `abort` sends it back to.
    pub from: Option<String>,
    pub phase: Phase,
    /// The updater's last step (`downloading`, `writing`, `rebooting`, `healthy`, …).
    pub step: String,
    /// The build it last reported running.
    pub running: Option<String>,
    /// Its last health line (`healthy`, `unhealthy <check>: …`).
    pub health: String,
    pub detail: String,
    /// When it was assigned (Unix seconds) and when it last reported.
    pub assigned_at: Option<u64>,
    pub reported_at: Option<u64>,
    /// Before its reboot: `""` (not asked yet), `draining`, `drained`, `skip` (its role is not
    /// drained), `failed`.
    #[serde(default)]
    pub drain: String,
    /// kiln serve cordoned it and has not uncordoned it yet.
    #[serde(default)]
    pub cordoned: bool,
}

/// One line of the event log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub at: u64,
    pub host: String,
    pub what: String,
}

/// A rollout of one role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    pub schema: String,
    pub role: String,
    /// The build the nodes move to.
    pub build: String,
    pub state: State,
    pub max_unavailable: u32,
    /// Nodes are cordoned and drained before they reboot.
    #[serde(default)]
    pub drain: bool,
    pub canary: u32,
    pub pause_after: u32,
    /// Done nodes at which the rollout pauses next (0: no pause pending).
    pub pause_at: u32,
    /// Why the rollout stopped or paused by itself.
    pub reason: String,
    pub started_at: u64,
    /// The nodes, in inventory order.
    pub nodes: Vec<NodeProgress>,
    pub events: Vec<Event>,
}

/// A node's report, as the server parsed and authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub host: String,
    pub seq: u64,
    /// The build it runs.
    pub build: String,
    pub slot: String,
    pub step: String,
    /// The build it is moving to, `-` if none.
    pub target: String,
    pub health: String,
    pub detail: String,
}

/// Steps a node's updater reports (`kiln-update report`).
pub const STEPS: &[&str] = &[
    "booted",
    "ready",
    "healthy",
    "unhealthy",
    "downloading",
    "writing",
    "verifying",
    "rebooting",
    "rolled-back",
    "failed",
    "refused",
];

/// What a node should run: `build`, with `rollback` when it is older than what it runs, and
/// `reboot` once it may reboot into it (drained, or its role is not drained).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub build: String,
    pub rollback: bool,
    pub reboot: bool,
}

/// How a rollout is started.
#[derive(Debug, Clone)]
pub struct Start {
    pub role: String,
    pub build: String,
    pub max_unavailable: u32,
    pub canary: u32,
    pub pause_after: u32,
    /// Cordon and drain each node before it reboots.
    pub drain: bool,
    /// The role's nodes in inventory order, each with the build it runs, if known.
    pub nodes: Vec<(String, Option<String>)>,
}

impl Rollout {
    /// A new rollout; the first nodes are assigned at once.
    pub fn start(s: Start, now: u64) -> Result<Rollout> {
        if s.nodes.is_empty() {
            bail!("the inventory has no {} node to roll out to", s.role);
        }
        if s.max_unavailable == 0 {
            bail!("--max-unavailable must be at least 1");
        }
        let nodes = s
            .nodes
            .into_iter()
            .map(|(host, from)| NodeProgress {
                host,
                phase: if from.as_deref() == Some(s.build.as_str()) {
                    Phase::Done
                } else {
                    Phase::Waiting
                },
                step: String::new(),
                running: from.clone(),
                from,
                health: String::new(),
                detail: String::new(),
                assigned_at: None,
                reported_at: None,
                drain: String::new(),
                cordoned: false,
            })
            .collect();
        let mut r = Rollout {
            schema: SCHEMA.into(),
            role: s.role,
            build: s.build,
            state: State::Running,
            max_unavailable: s.max_unavailable,
            drain: s.drain,
            canary: s.canary,
            pause_after: s.pause_after,
            pause_at: if s.canary > 0 {
                s.canary
            } else {
                s.pause_after
            },
            reason: String::new(),
            started_at: now,
            nodes,
            events: Vec::new(),
        };
        r.event(
            now,
            "-",
            format!("started: {} → build {}", r.role, short(&r.build)),
        );
        r.tick(now);
        Ok(r)
    }

    fn event(&mut self, at: u64, host: &str, what: String) {
        self.events.push(Event {
            at,
            host: host.to_string(),
            what,
        });
        if self.events.len() > MAX_EVENTS {
            let drop = self.events.len() - MAX_EVENTS;
            self.events.drain(..drop);
        }
    }

    /// Nodes assigned and not yet healthy on what they were assigned.
    pub fn in_flight(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.phase == Phase::InFlight)
            .count()
    }

    /// Nodes healthy on the new build.
    pub fn done(&self) -> usize {
        self.nodes.iter().filter(|n| n.phase == Phase::Done).count()
    }

    /// Assigns nodes while the rollout runs and fewer than `max_unavailable` are in flight;
    /// pauses at the canary / pause-after marks; finishes when every node is done.
    pub fn tick(&mut self, now: u64) {
        match self.state {
            State::Running => {}
            State::Aborting => {
                if self.in_flight() == 0 {
                    self.state = State::Aborted;
                    self.event(
                        now,
                        "-",
                        "aborted: every assigned node is back on its previous build".into(),
                    );
                }
                return;
            }
            _ => return,
        }
        loop {
            let done = self.done() as u32;
            if self.nodes.iter().all(|n| n.phase == Phase::Done) {
                self.state = State::Done;
                self.event(
                    now,
                    "-",
                    format!("done: every node runs build {}", short(&self.build)),
                );
                return;
            }
            if self.pause_at > 0 && done >= self.pause_at && self.in_flight() == 0 {
                self.state = State::Paused;
                self.reason = format!("paused after {done} healthy node(s): check them, then `kiln rollout resume --role {}`", self.role);
                self.pause_at = if self.pause_after > 0 {
                    done + self.pause_after
                } else {
                    0
                };
                self.event(now, "-", format!("paused after {done} node(s)"));
                return;
            }
            let limit_reached = self.in_flight() as u32 >= self.max_unavailable;
            // Never more in flight than the next pause mark leaves room for.
            let pause_room = self.pause_at > 0 && done + self.in_flight() as u32 >= self.pause_at;
            if limit_reached || pause_room {
                return;
            }
            let Some(i) = self.nodes.iter().position(|n| n.phase == Phase::Waiting) else {
                return;
            };
            self.nodes[i].phase = Phase::InFlight;
            self.nodes[i].assigned_at = Some(now);
            self.nodes[i].step = "assigned".into();
            let host = self.nodes[i].host.clone();
            self.event(now, &host, format!("assigned build {}", short(&self.build)));
        }
    }

    /// What `host` should run now: the new build once assigned (also when done, so it stays),
    /// its previous build with `rollback` while aborting; `None` for a node not reached yet or
    /// not in the rollout.
    pub fn target(&self, host: &str) -> Option<Target> {
        let n = self.nodes.iter().find(|n| n.host == host)?;
        let reboot = matches!(n.drain.as_str(), "drained" | "skip");
        match (self.state, n.phase) {
            (State::Aborting | State::Aborted, Phase::InFlight | Phase::Reverted) => {
                n.from.clone().map(|b| Target {
                    build: b,
                    rollback: true,
                    reboot,
                })
            }
            (State::Aborting | State::Aborted, _) => None,
            (_, Phase::InFlight | Phase::Done) => Some(Target {
                build: self.build.clone(),
                rollback: false,
                reboot,
            }),
            _ => None,
        }
    }

    /// Applies a node's (authenticated) report. Reports from nodes outside the rollout are
    /// ignored (`false`).
    pub fn apply(&mut self, r: &Report, now: u64) -> bool {
        let Some(i) = self.nodes.iter().position(|n| n.host == r.host) else {
            return false;
        };
        let build = self.build.clone();
        let aborting = matches!(self.state, State::Aborting | State::Aborted);
        let n = &mut self.nodes[i];
        n.step = r.step.clone();
        n.running = Some(r.build.clone());
        n.health = r.health.clone();
        n.detail = r.detail.clone();
        n.reported_at = Some(now);
        let before = n.phase;
        let on_new = r.build == build;
        // Its slot is written: it waits for the go-ahead to reboot.
        if r.step == "ready"
            && n.phase == Phase::InFlight
            && !matches!(n.drain.as_str(), "draining" | "drained")
        {
            n.drain = if self.drain { "draining" } else { "skip" }.into();
        }
        // A new update attempt asks again.
        if r.step == "downloading" && n.drain == "skip" {
            n.drain.clear();
        }
        let mut stop: Option<String> = None;
        if aborting {
            if n.phase == Phase::InFlight
                && r.step == "healthy"
                && n.from.as_deref() == Some(r.build.as_str())
            {
                n.phase = Phase::Reverted;
            }
        } else {
            match (n.phase, r.step.as_str()) {
                (Phase::InFlight, "healthy") if on_new => n.phase = Phase::Done,
                (Phase::InFlight, "rolled-back") => {
                    n.phase = Phase::RolledBack;
                    stop = Some(format!(
                        "{} rolled back to build {}: {}",
                        r.host,
                        short(&r.build),
                        r.detail
                    ));
                }
                (Phase::InFlight, "failed" | "refused") => {
                    n.phase = Phase::Failed;
                    stop = Some(format!(
                        "{} {} build {}: {}",
                        r.host,
                        r.step,
                        short(&build),
                        r.detail
                    ));
                }
                // Healthy on the new build without being assigned (reflashed with it).
                (Phase::Waiting, "healthy") if on_new => n.phase = Phase::Done,
                _ => {}
            }
        }
        let phase = n.phase;
        let host = r.host.clone();
        let step = r.step.clone();
        let detail = r.detail.clone();
        self.event(
            now,
            &host,
            format!(
                "{step} on build {}{}",
                short(&r.build),
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            ),
        );
        if phase != before {
            self.event(now, &host, format!("{before:?} → {phase:?}").to_lowercase());
        }
        if let Some(why) = stop {
            if self.state == State::Running || self.state == State::Paused {
                self.state = State::Stopped;
                self.reason = why.clone();
                self.event(now, &host, format!("rollout stopped: {why}"));
            }
        }
        self.tick(now);
        true
    }

    /// The drain of `host` ended: it may reboot, or the rollout stops (the node is failed).
    pub fn drained(&mut self, host: &str, result: std::result::Result<(), String>, now: u64) {
        let Some(n) = self.nodes.iter_mut().find(|n| n.host == host) else {
            return;
        };
        match result {
            Ok(()) => {
                n.drain = "drained".into();
                n.cordoned = true;
                self.event(now, host, "drained".into());
            }
            Err(e) => {
                n.drain = "failed".into();
                n.phase = Phase::Failed;
                n.detail = e.clone();
                self.event(now, host, format!("drain failed: {e}"));
                if matches!(self.state, State::Running | State::Paused) {
                    self.state = State::Stopped;
                    self.reason = format!("{host}: {e}");
                    self.event(now, host, format!("rollout stopped: {host}: {e}"));
                }
            }
        }
        self.tick(now);
    }

    /// `host` was cordoned by a drain and is healthy again (on any build): uncordon it.
    pub fn wants_uncordon(&self, host: &str) -> bool {
        self.nodes
            .iter()
            .any(|n| n.host == host && n.cordoned && n.step == "healthy")
    }

    /// The uncordon of `host` went through.
    pub fn uncordoned(&mut self, host: &str, now: u64) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.host == host) {
            n.cordoned = false;
            n.drain.clear();
        }
        self.event(now, host, "uncordoned".into());
    }

    /// `host` is to be drained now (its updater reported `ready`).
    pub fn wants_drain(&self, host: &str) -> bool {
        self.nodes
            .iter()
            .any(|n| n.host == host && n.drain == "draining" && n.phase == Phase::InFlight)
    }

    /// `kiln rollout pause`.
    pub fn pause(&mut self, now: u64) -> Result<()> {
        if self.state != State::Running {
            bail!("the {} rollout is {:?}, not running", self.role, self.state);
        }
        self.state = State::Paused;
        self.reason = "paused by `kiln rollout pause`".into();
        self.event(now, "-", "paused".into());
        Ok(())
    }

    /// `kiln rollout resume`: a paused or stopped rollout assigns again (a stopped one skips
    /// the nodes that rolled back or failed).
    pub fn resume(&mut self, now: u64) -> Result<()> {
        if !matches!(self.state, State::Paused | State::Stopped) {
            bail!(
                "the {} rollout is {:?}: only a paused or stopped rollout resumes",
                self.role,
                self.state
            );
        }
        self.state = State::Running;
        self.reason.clear();
        self.event(now, "-", "resumed".into());
        self.tick(now);
        Ok(())
    }

    /// `kiln rollout abort`: every node assigned so far (in flight, done, rolled back or
    /// failed) is sent back to the build it ran before.
    pub fn abort(&mut self, now: u64) -> Result<()> {
        if !matches!(
            self.state,
            State::Running | State::Paused | State::Stopped | State::Done
        ) {
            bail!(
                "the {} rollout is {:?}: nothing to abort",
                self.role,
                self.state
            );
        }
        self.state = State::Aborting;
        self.reason = "aborted by `kiln rollout abort`".into();
        for n in &mut self.nodes {
            if matches!(
                n.phase,
                Phase::InFlight | Phase::Done | Phase::Failed | Phase::RolledBack
            ) {
                let back = n.from.is_some() && n.running != n.from;
                n.phase = if back {
                    Phase::InFlight
                } else {
                    Phase::Reverted
                };
            }
        }
        self.event(
            now,
            "-",
            "aborting: assigned nodes go back to their previous build".into(),
        );
        self.tick(now);
        Ok(())
    }
}

/// The first 12 characters of a build id.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Parses a report body (`kiln-report/1`, then `key value` lines).
pub fn parse_report(body: &str) -> Result<Report> {
    let mut lines = body.lines();
    if lines.next() != Some("kiln-report/1") {
        bail!("not a kiln-report/1");
    }
    let mut m: BTreeMap<&str, &str> = BTreeMap::new();
    for l in lines {
        let (k, v) = l.split_once(' ').unwrap_or((l, ""));
        if m.insert(k, v).is_some() {
            bail!("{k} twice");
        }
    }
    let get = |k: &str| -> Result<String> {
        m.get(k)
            .map(|v| v.to_string())
            .with_context(|| format!("no {k} line"))
    };
    let r = Report {
        host: get("host")?,
        seq: get("seq")?.parse().context("seq is not a number")?,
        build: get("build")?,
        slot: get("slot")?,
        step: get("step")?,
        target: get("target")?,
        health: get("health")?,
        detail: get("detail")?,
    };
    if !STEPS.contains(&r.step.as_str()) {
        bail!("unknown step {:?}", r.step);
    }
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !is_id(&r.build) {
        bail!("build is not a build id");
    }
    if r.target != "-" && !is_id(&r.target) {
        bail!("target is not a build id");
    }
    if !matches!(r.slot.as_str(), "a" | "b" | "pxe" | "none") {
        bail!("unknown slot {:?}", r.slot);
    }
    Ok(r)
}

/// The rollout files of an `out/` directory.
pub struct Store {
    dir: PathBuf,
}

/// What the server knows of each node outside any rollout: its last accepted report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Seen {
    pub nodes: BTreeMap<String, SeenNode>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeenNode {
    pub seq: u64,
    pub build: String,
    pub slot: String,
    pub step: String,
    pub health: String,
    pub detail: String,
    pub at: u64,
}

impl Store {
    pub fn new(out_dir: &Path) -> Store {
        Store {
            dir: crate::project::layout::Out::new(out_dir).rollouts(),
        }
    }

    /// Takes the lock every read-modify-write holds (kiln serve and kiln rollout alike).
    pub fn lock(&self) -> Result<fs::File> {
        crate::sys::util::lock_dir(&self.dir, "another kiln is changing a rollout")
    }

    fn path(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{role}.json"))
    }

    /// The role's rollout, if one was started.
    pub fn load(&self, role: &str) -> Result<Option<Rollout>> {
        let p = self.path(role);
        match fs::read(&p) {
            Ok(b) => {
                let r: Rollout = serde_json::from_slice(&b)
                    .with_context(|| format!("parsing {}", p.display()))?;
                if r.schema != SCHEMA {
                    bail!(
                        "{}: schema {:?}, this kiln reads {SCHEMA}",
                        p.display(),
                        r.schema
                    );
                }
                Ok(Some(r))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Writes the role's rollout (temp file, fsync, rename).
    pub fn save(&self, r: &Rollout) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(r)?;
        crate::sys::util::write_atomic(&self.path(&r.role), &bytes)
    }

    /// Every role's rollout.
    pub fn all(&self) -> Result<Vec<Rollout>> {
        let mut v = Vec::new();
        for role in crate::project::inventory::ROLES {
            if let Some(r) = self.load(role)? {
                v.push(r);
            }
        }
        Ok(v)
    }

    pub fn seen(&self) -> Result<Seen> {
        let p = self.dir.join("nodes.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Seen::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    pub fn save_seen(&self, s: &Seen) -> Result<()> {
        crate::sys::util::write_atomic(&self.dir.join("nodes.json"), &serde_json::to_vec_pretty(s)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const NEW: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn start(nodes: &[&str], max: u32, canary: u32, pause_after: u32) -> Rollout {
        Rollout::start(
            Start {
                role: "worker".into(),
                build: NEW.into(),
                max_unavailable: max,
                canary,
                pause_after,
                drain: false,
                nodes: nodes
                    .iter()
                    .map(|h| (h.to_string(), Some(OLD.to_string())))
                    .collect(),
            },
            100,
        )
        .unwrap()
    }

    fn rep(host: &str, build: &str, step: &str) -> Report {
        Report {
            host: host.into(),
            seq: 1,
            build: build.into(),
            slot: "a".into(),
            step: step.into(),
            target: NEW.into(),
            health: "healthy".into(),
            detail: String::new(),
        }
    }

    fn phases(r: &Rollout) -> Vec<Phase> {
        r.nodes.iter().map(|n| n.phase).collect()
    }

    #[test]
    fn one_node_at_a_time_until_done() {
        let mut r = start(&["w1", "w2", "w3"], 1, 0, 0);
        assert_eq!(
            phases(&r),
            [Phase::InFlight, Phase::Waiting, Phase::Waiting]
        );
        assert_eq!(
            r.target("w1"),
            Some(Target {
                build: NEW.into(),
                rollback: false,
                reboot: false
            })
        );
        assert_eq!(r.target("w2"), None);
        // Progress reports and a healthy report on the old build change nothing.
        for step in ["downloading", "writing", "verifying", "rebooting"] {
            assert!(r.apply(&rep("w1", OLD, step), 110));
        }
        assert!(r.apply(&rep("w1", OLD, "healthy"), 111));
        assert_eq!(
            phases(&r),
            [Phase::InFlight, Phase::Waiting, Phase::Waiting]
        );
        r.apply(&rep("w1", NEW, "healthy"), 120);
        assert_eq!(phases(&r), [Phase::Done, Phase::InFlight, Phase::Waiting]);
        // A node keeps its target once done.
        assert_eq!(r.target("w1").unwrap().build, NEW);
        r.apply(&rep("w2", NEW, "healthy"), 130);
        r.apply(&rep("w3", NEW, "healthy"), 140);
        assert_eq!(r.state, State::Done);
        assert!(r.events.iter().any(|e| e.what.starts_with("done")));
        // Never two in flight: the assignment events alternate with done events.
        let mut in_flight = 0i32;
        for e in &r.events {
            if e.what.starts_with("assigned") {
                in_flight += 1;
            }
            if e.what == "inflight → done" {
                in_flight -= 1;
            }
            assert!(in_flight <= 1, "{:?}", r.events);
        }
    }

    #[test]
    fn max_unavailable_two_and_nodes_already_on_the_build() {
        let mut r = Rollout::start(
            Start {
                role: "worker".into(),
                build: NEW.into(),
                max_unavailable: 2,
                canary: 0,
                pause_after: 0,
                drain: false,
                nodes: vec![
                    ("w1".into(), Some(NEW.into())),
                    ("w2".into(), None),
                    ("w3".into(), Some(OLD.into())),
                    ("w4".into(), Some(OLD.into())),
                ],
            },
            1,
        )
        .unwrap();
        assert_eq!(
            phases(&r),
            [
                Phase::Done,
                Phase::InFlight,
                Phase::InFlight,
                Phase::Waiting
            ]
        );
        r.apply(&rep("w3", NEW, "healthy"), 2);
        assert_eq!(phases(&r)[3], Phase::InFlight);
    }

    #[test]
    fn a_rollback_stops_the_rollout_and_says_who_and_why() {
        let mut r = start(&["w1", "w2"], 1, 0, 0);
        let mut b = rep("w1", OLD, "rolled-back");
        b.detail = "build 2222 in slot b failed its health check 3 times".into();
        r.apply(&b, 200);
        assert_eq!(r.state, State::Stopped);
        assert!(
            r.reason.contains("w1 rolled back") && r.reason.contains("health check 3 times"),
            "{}",
            r.reason
        );
        assert_eq!(phases(&r), [Phase::RolledBack, Phase::Waiting]);
        assert_eq!(r.target("w2"), None, "nothing more is assigned");
        // Failed and refused stop it too.
        for step in ["failed", "refused"] {
            let mut r = start(&["w1", "w2"], 1, 0, 0);
            r.apply(&rep("w1", OLD, step), 5);
            assert_eq!(
                (r.state, phases(&r)[0]),
                (State::Stopped, Phase::Failed),
                "{step}"
            );
        }
        // Resume skips the node that rolled back.
        r.resume(300).unwrap();
        assert_eq!(phases(&r), [Phase::RolledBack, Phase::InFlight]);
    }

    #[test]
    fn canary_then_pause_after() {
        let mut r = start(&["w1", "w2", "w3", "w4", "w5"], 2, 1, 2);
        // The canary goes alone even with max-unavailable 2.
        assert_eq!(r.in_flight(), 1);
        r.apply(&rep("w1", NEW, "healthy"), 2);
        assert_eq!(r.state, State::Paused);
        assert!(r.reason.contains("kiln rollout resume --role worker"));
        assert!(r.target("w2").is_none());
        r.resume(3).unwrap();
        assert_eq!(phases(&r)[1..3], [Phase::InFlight, Phase::InFlight]);
        r.apply(&rep("w2", NEW, "healthy"), 4);
        assert_eq!(r.state, State::Running);
        assert_eq!(
            r.in_flight(),
            1,
            "the pause mark (3 done) leaves room for one"
        );
        r.apply(&rep("w3", NEW, "healthy"), 5);
        assert_eq!(r.state, State::Paused);
        assert_eq!(r.pause_at, 5);
        r.resume(6).unwrap();
        r.apply(&rep("w4", NEW, "healthy"), 7);
        r.apply(&rep("w5", NEW, "healthy"), 8);
        assert_eq!(r.state, State::Done);
    }

    #[test]
    fn a_drained_role_reboots_only_after_the_drain() {
        let mut r = start(&["w1", "w2"], 1, 0, 0);
        r.drain = true;
        assert!(
            !r.target("w1").unwrap().reboot,
            "not before its slot is written"
        );
        r.apply(&rep("w1", OLD, "ready"), 1);
        assert!(r.wants_drain("w1"));
        assert!(!r.target("w1").unwrap().reboot);
        r.drained("w1", Ok(()), 2);
        assert!(r.target("w1").unwrap().reboot && !r.wants_drain("w1"));
        r.apply(&rep("w1", NEW, "healthy"), 3);
        assert!(r.wants_uncordon("w1"));
        r.uncordoned("w1", 4);
        assert!(!r.wants_uncordon("w1"));
        // A drain that fails stops the rollout; the node gets no target any more.
        r.apply(&rep("w2", OLD, "ready"), 5);
        r.drained("w2", Err("apps/db-0 still there".into()), 6);
        assert_eq!(r.state, State::Stopped);
        assert!(r.reason.contains("w2: apps/db-0"), "{}", r.reason);
        assert_eq!(r.target("w2"), None);
        // Without drain: the go-ahead comes with the ready report.
        let mut r = start(&["w1"], 1, 0, 0);
        r.apply(&rep("w1", OLD, "ready"), 1);
        assert!(r.target("w1").unwrap().reboot && !r.wants_drain("w1"));
    }

    #[test]
    fn pause_after_without_a_canary() {
        let mut r = start(&["w1", "w2", "w3"], 1, 0, 2);
        r.apply(&rep("w1", NEW, "healthy"), 1);
        assert_eq!(r.state, State::Running);
        r.apply(&rep("w2", NEW, "healthy"), 2);
        assert_eq!((r.state, r.pause_at), (State::Paused, 4));
        r.resume(3).unwrap();
        r.apply(&rep("w3", NEW, "healthy"), 4);
        assert_eq!(r.state, State::Done);
    }

    #[test]
    fn pause_resume_and_their_refusals() {
        let mut r = start(&["w1", "w2"], 1, 0, 0);
        r.pause(1).unwrap();
        assert!(r.pause(2).is_err());
        r.apply(&rep("w1", NEW, "healthy"), 3);
        assert_eq!(
            phases(&r),
            [Phase::Done, Phase::Waiting],
            "paused: nothing new"
        );
        r.resume(4).unwrap();
        assert!(r.resume(5).is_err());
        assert_eq!(phases(&r), [Phase::Done, Phase::InFlight]);
    }

    #[test]
    fn abort_sends_assigned_nodes_back() {
        let mut r = start(&["w1", "w2", "w3"], 1, 0, 0);
        r.apply(&rep("w1", NEW, "healthy"), 1);
        r.apply(&rep("w2", OLD, "downloading"), 2);
        r.abort(3).unwrap();
        assert_eq!(r.state, State::Aborting);
        // w1 runs the new build: back to OLD as a rollback; w2 never left OLD.
        assert_eq!(
            r.target("w1"),
            Some(Target {
                build: OLD.into(),
                rollback: true,
                reboot: false
            })
        );
        assert_eq!(
            phases(&r),
            [Phase::InFlight, Phase::Reverted, Phase::Waiting]
        );
        assert_eq!(
            r.target("w2"),
            Some(Target {
                build: OLD.into(),
                rollback: true,
                reboot: false
            })
        );
        assert_eq!(r.target("w3"), None);
        r.apply(&rep("w1", OLD, "healthy"), 4);
        assert_eq!(r.state, State::Aborted);
        assert!(r.abort(5).is_err());
        assert!(r.resume(5).is_err());
    }

    #[test]
    fn start_refusals_and_reports_from_strangers() {
        let e = Rollout::start(
            Start {
                role: "gpu".into(),
                build: NEW.into(),
                max_unavailable: 1,
                canary: 0,
                pause_after: 0,
                drain: false,
                nodes: vec![],
            },
            1,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no gpu node"));
        let mut r = start(&["w1"], 1, 0, 0);
        assert!(!r.apply(&rep("stranger", NEW, "healthy"), 2));
        assert_eq!(r.state, State::Running);
    }

    #[test]
    fn report_parsing_refuses_bad_reports() {
        let good = format!("kiln-report/1\nhost w1\nseq 5\nbuild {OLD}\nslot a\nstep writing\ntarget {NEW}\nhealth healthy\ndetail 10 bytes");
        let r = parse_report(&good).unwrap();
        assert_eq!(
            (r.seq, r.step.as_str(), r.detail.as_str()),
            (5, "writing", "10 bytes")
        );
        for (bad, why) in [
            (
                good.replace("kiln-report/1", "kiln-report/2"),
                "not a kiln-report",
            ),
            (good.replace("step writing", "step dancing"), "unknown step"),
            (good.replace("seq 5", "seq x"), "seq"),
            (
                good.replace(&format!("build {OLD}"), "build 123"),
                "build id",
            ),
            (good.replace(&format!("target {NEW}"), "target x"), "target"),
            (good.replace("slot a", "slot c"), "slot"),
            (good.replace("\nhealth healthy", ""), "no health"),
            (format!("{good}\nhost w2"), "twice"),
        ] {
            let e = parse_report(&bad).unwrap_err();
            assert!(format!("{e:#}").contains(why), "{why}: {e:#}");
        }
    }

    #[test]
    fn store_round_trips_under_its_lock() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::new(d.path());
        assert!(s.load("worker").unwrap().is_none());
        let r = start(&["w1"], 1, 0, 0);
        let _l = s.lock().unwrap();
        s.save(&r).unwrap();
        assert_eq!(s.load("worker").unwrap().unwrap(), r);
        assert_eq!(s.all().unwrap().len(), 1);
        fs::write(d.path().join("rollouts/worker.json"), b"{").unwrap();
        assert!(format!("{:#}", s.load("worker").unwrap_err()).contains("parsing"));
    }
}
