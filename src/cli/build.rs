//! `kiln build` and `kiln inspect`.

use super::args::{BuildArgs, InspectArgs};
use super::{print_json, Ctx};
use crate::pipeline::{build, node, resolve};
use crate::trust::sign;
use anyhow::Result;
use std::io::Write;

/// `kiln build`: every requested role (bases first), then the inventory's nodes of those roles.
pub(crate) fn build(cx: &Ctx, a: &BuildArgs) -> Result<()> {
    let project = cx.project()?;
    let opts = build::BuildOptions {
        cache_dir: cx.cache_dir(&a.cache_dir),
        out_dir: cx.out.dir().to_path_buf(),
        force: a.force,
        offline: a.offline,
        locked: a.locked,
    };
    let roles = project.roles_or_all(&a.roles);
    // Every output is signed: fail now, not after the first role, if the key is missing.
    sign::load_signing_key(&cx.layout.keys())?;
    // Validate every requested role before building any.
    let resolved = roles
        .iter()
        .map(|r| resolve::resolve(&project, r))
        .collect::<Result<Vec<_>>>()?;
    // Render and check every node's seed before building anything.
    let planned = node::plan(&project, &resolved)?;
    let reports = build::build_roles(&project, &resolved, &opts, |rep| {
        if !a.json {
            let state = if rep.up_to_date {
                "up to date"
            } else {
                "built"
            };
            println!("{} {state}: {}", rep.role, rep.dir.display());
        }
    })?;
    // Per-node outputs (seed, CIDATA volume, flashable disk) for the roles just built.
    let nodes = node::build_nodes(&project, &planned, &reports, &opts)?;
    if a.json {
        return print_json(&serde_json::json!({ "roles": reports, "nodes": nodes }));
    }
    for n in &nodes {
        let state = if n.up_to_date { "up to date" } else { "built" };
        println!(
            "node {} ({}) {state}: {}",
            n.hostname,
            n.role,
            n.link.display()
        );
    }
    Ok(())
}

/// `kiln inspect`: a role's merged recipe and build id, without building.
pub(crate) fn inspect(cx: &Ctx, a: &InspectArgs) -> Result<()> {
    let project = cx.project()?;
    let r = resolve::resolve(&project, &a.role)?;
    if a.json {
        return print_json(&serde_json::json!({ "build_id": r.build_id, "inputs": r }));
    }
    let mut o = std::io::stdout().lock();
    writeln!(o, "role:      {}", r.role)?;
    writeln!(o, "build id:  {}", r.build_id)?;
    writeln!(o, "base key:  {}", r.base_key)?;
    writeln!(o, "chain:     {}", r.recipe.chain.join(" → "))?;
    writeln!(
        o,
        "suite:     {} ({})",
        r.recipe.debian.suite, r.recipe.debian.variant
    )?;
    writeln!(o, "components: {}", r.recipe.debian.components.join(" "))?;
    writeln!(o, "packages:  {}", r.recipe.debian.packages.join(" "))?;
    writeln!(o, "enable:    {}", r.recipe.systemd.enable.join(" "))?;
    writeln!(o, "cmdline:   {}", r.recipe.boot.cmdline.join(" "))?;
    writeln!(
        o,
        "k3s:       {} {}{}",
        r.recipe.k3s.mode,
        r.recipe.k3s.node_labels.join(" "),
        if r.recipe.k3s.node_taints.is_empty() {
            String::new()
        } else {
            format!(" taints: {}", r.recipe.k3s.node_taints.join(" "))
        }
    )?;
    writeln!(
        o,
        "secrets:   {}",
        r.secrets.keys().cloned().collect::<Vec<_>>().join(" ")
    )?;
    writeln!(o, "overlays:")?;
    for f in &r.overlays {
        writeln!(
            o,
            "  /{} ← overlays/{} ({}, {:o}{})",
            f.image_path,
            f.source,
            f.kind,
            f.mode,
            if f.template { ", template" } else { "" }
        )?;
    }
    writeln!(
        o,
        "recipe (merged):\n{}",
        serde_json::to_string_pretty(&r.recipe)?
    )?;
    Ok(())
}
