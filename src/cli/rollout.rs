//! `kiln rollout start|status|pause|resume|abort`: the rollout files `kiln serve` carries out.

use super::args::RolloutCommand;
use super::{print_json, Ctx};
use crate::deliver::rollout::{self, Phase, Rollout, Start, State, Store};
use crate::project::recipe::RecipeError;
use anyhow::{Context, Result};
use std::io::IsTerminal;

pub(crate) fn rollout(cx: &Ctx, c: &RolloutCommand) -> Result<()> {
    let store = Store::new(cx.out.dir());
    let now = now();
    match c {
        RolloutCommand::Start {
            role,
            build,
            max_unavailable,
            canary,
            pause_after,
        } => {
            let project = cx.project()?;
            if project.cluster.updates.is_none() {
                return Err(RecipeError::new(
                    project.layout().cluster_file(),
                    "updates",
                    "no [updates] section: nodes do not ask kiln serve for builds",
                    "add [updates] server = \"http://<kiln serve's address>:<port>\" to cluster.toml, rebuild and reflash the role's nodes once (docs/guide/updates.md)",
                )
                .into());
            }
            let hosts: Vec<&str> = project
                .cluster
                .nodes
                .iter()
                .filter(|n| n.role == *role)
                .map(|n| n.hostname.as_str())
                .collect();
            if hosts.is_empty() {
                return Err(RecipeError::new(
                    project.layout().cluster_file(),
                    "--role",
                    format!("the inventory has no {role} node"),
                    "pass a role of the [[nodes]] in cluster.toml",
                )
                .into());
            }
            let id = match build {
                Some(b) => b.clone(),
                None => std::fs::read_link(cx.out.latest(role))
                    .with_context(|| {
                        format!(
                            "no {role} build: {} is missing (run `kiln build --role {role}`)",
                            cx.out.latest(role).display()
                        )
                    })?
                    .to_string_lossy()
                    .into_owned(),
            };
            check_build(cx, role, &id)?;
            let _l = store.lock()?;
            if let Some(r) = store.load(role)? {
                if r.state.is_active() {
                    anyhow::bail!(
                        "a rollout of {role} to build {} is {:?}: wait for it, or `kiln rollout abort --role {role}` first",
                        rollout::short(&r.build),
                        r.state
                    );
                }
            }
            let seen = store.seen()?;
            let nodes = hosts
                .iter()
                .map(|h| {
                    let from = seen
                        .nodes
                        .get(*h)
                        .map(|n| n.build.clone())
                        .or_else(|| flashed_build(cx, h));
                    (h.to_string(), from)
                })
                .collect();
            let r = Rollout::start(
                Start {
                    role: role.clone(),
                    build: id.clone(),
                    max_unavailable: *max_unavailable,
                    canary: *canary,
                    pause_after: *pause_after,
                    drain: project
                        .cluster
                        .updates
                        .as_ref()
                        .is_some_and(|u| u.drain.iter().any(|r| r == role)),
                    nodes,
                },
                now,
            )?;
            store.save(&r)?;
            println!(
                "rollout of {role} to build {} started: {} node(s), {} at a time; kiln serve hands it out (`kiln rollout status --watch`)",
                rollout::short(&id),
                r.nodes.len(),
                max_unavailable
            );
            Ok(())
        }
        RolloutCommand::Status { role, json, watch } => loop {
            let all: Vec<Rollout> = store
                .all()?
                .into_iter()
                .filter(|r| role.as_ref().is_none_or(|x| *x == r.role))
                .collect();
            if *json {
                return print_json(&all);
            }
            let tty = std::io::stdout().is_terminal();
            if *watch && tty {
                print!("\x1b[2J\x1b[H");
            }
            if all.is_empty() {
                println!("no rollout (start one with `kiln rollout start --role <role>`)");
            }
            for r in &all {
                print!("{}", table(r, now_secs()));
            }
            if !*watch || !all.iter().any(|r| r.state.is_active()) {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        },
        RolloutCommand::Pause { role } => change(&store, role, |r| r.pause(now), "paused"),
        RolloutCommand::Resume { role } => change(&store, role, |r| r.resume(now), "resumed"),
        RolloutCommand::Abort { role } => change(
            &store,
            role,
            |r| r.abort(now),
            "aborting: kiln serve sends the nodes it reached back to their previous build",
        ),
    }
}

fn now() -> u64 {
    now_secs()
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The build must be a published, signed build of the role made with in-place updates.
fn check_build(cx: &Ctx, role: &str, id: &str) -> Result<()> {
    let dir = cx.out.build(role, id);
    if !dir.is_dir() {
        anyhow::bail!(
            "no {role} build {id} in {}: `ls {}` lists the builds",
            cx.out.role(role).display(),
            cx.out.role(role).display()
        );
    }
    let key = crate::trust::sign::load_verifying_key(
        &cx.layout.key(crate::project::layout::key::VERIFYING_KEY),
    )?;
    let sums = crate::trust::sign::verify_signature(&dir, &key)?;
    if sums.sha256_of("update.txt").is_none() || sums.sha256_of("root.pieces").is_none() {
        anyhow::bail!(
            "{} has no update.txt or root.pieces (made by a kiln without in-place updates): rebuild the role",
            dir.display()
        );
    }
    Ok(())
}

/// The role build a node's outputs were made from (`out/nodes/<host>/node.json`), if any.
fn flashed_build(cx: &Ctx, host: &str) -> Option<String> {
    let b = std::fs::read(cx.out.node(host).join("node.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
    v.get("role_build_id")?.as_str().map(str::to_string)
}

fn change(
    store: &Store,
    role: &str,
    f: impl FnOnce(&mut Rollout) -> Result<()>,
    done: &str,
) -> Result<()> {
    let _l = store.lock()?;
    let mut r = store
        .load(role)?
        .with_context(|| format!("no rollout of {role} (`kiln rollout status` lists them)"))?;
    f(&mut r)?;
    store.save(&r)?;
    println!("rollout of {role}: {done}");
    Ok(())
}

fn elapsed(secs: u64) -> String {
    if secs >= 3600 {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    } else if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

/// One rollout as text: a headline with a progress bar, then a row per node.
pub(crate) fn table(r: &Rollout, now: u64) -> String {
    let total = r.nodes.len();
    let done = r.done();
    let width = 20usize;
    let filled = (done * width).checked_div(total).unwrap_or(0);
    let mut s = format!(
        "{} → build {}  {:?}  [{}{}] {done}/{total} healthy, {} updating, max-unavailable {}, {} ago\n",
        r.role,
        rollout::short(&r.build),
        r.state,
        "#".repeat(filled),
        "-".repeat(width - filled),
        r.in_flight(),
        r.max_unavailable,
        elapsed(now.saturating_sub(r.started_at)),
    )
    .to_lowercase();
    if !r.reason.is_empty() && r.state != State::Running {
        s.push_str(&format!("  {}\n", r.reason));
    }
    s.push_str(&format!(
        "  {:<16} {:<27} {:<12} {:<13} {:<24} {}\n",
        "NODE", "FROM → TO", "PHASE", "STEP", "HEALTH", "ELAPSED"
    ));
    for n in &r.nodes {
        let from = n.from.as_deref().map(rollout::short).unwrap_or("?");
        let to = match (r.state, n.phase) {
            (State::Aborting | State::Aborted, Phase::InFlight | Phase::Reverted) => {
                from.to_string()
            }
            _ => rollout::short(&r.build).to_string(),
        };
        let el = n
            .assigned_at
            .map(|a| elapsed(n.reported_at.unwrap_or(now).max(a) - a))
            .unwrap_or_else(|| "-".into());
        let mut health = n.health.clone();
        health.truncate(24);
        s.push_str(&format!(
            "  {:<16} {:<27} {:<12} {:<13} {:<24} {}\n",
            n.host,
            format!("{from} → {to}"),
            format!("{:?}", n.phase).to_lowercase(),
            if n.step.is_empty() { "-" } else { &n.step },
            if health.is_empty() { "-" } else { &health },
            el
        ));
        if matches!(n.phase, Phase::RolledBack | Phase::Failed) && !n.detail.is_empty() {
            s.push_str(&format!("    {}\n", n.detail));
        }
    }
    s
}
