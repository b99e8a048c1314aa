//! kiln: a git repo of recipes → reproducible per-role OS images for k3s clusters.
//!
//! One module per pipeline stage; data flows one way:
//! [`recipe`] → [`resolve`] → [`base`] → [`compose`] → [`emit`], driven by [`build`].

pub mod base;
pub mod bench;
pub mod build;
pub mod cache;
pub mod cli;
pub mod compose;
pub mod emit;
pub mod fetch;
pub mod flash;
pub mod k3s;
pub mod keys;
pub mod lock;
pub mod node;
pub mod proxmox;
pub mod qemu;
pub mod recipe;
pub mod reproduce;
pub mod resolve;
pub mod seal;
pub mod seed;
pub mod serve;
pub mod sign;
pub mod tools;
pub mod util;

use anyhow::{bail, Context, Result};
use cli::{Cli, Command};
use std::io::Write;
use std::path::PathBuf;

/// Process exit status for user errors in recipes/inventory/overlays, key files, and unsafe or
/// unknown flash targets.
pub const EXIT_USER_ERROR: i32 = 2;
/// Process exit status when a signature or a signed file fails verification
/// ([`sign::VerifyError`]).
pub const EXIT_VERIFY_FAILED: i32 = 3;

/// Maps an error to an exit status: 3 for verification failures ([`sign::VerifyError`]), 2 for
/// recipe/user errors (including Proxmox settings and requests Proxmox rejected), 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.chain().any(|e| {
        e.downcast_ref::<sign::VerifyError>().is_some()
            || e.downcast_ref::<reproduce::NotReproduced>().is_some()
    }) {
        EXIT_VERIFY_FAILED
    } else if err.chain().any(|e| {
        e.downcast_ref::<recipe::RecipeError>().is_some()
            || e.downcast_ref::<keys::KeysError>().is_some()
            || e.downcast_ref::<seal::SealError>().is_some()
            || e.downcast_ref::<flash::FlashError>().is_some()
            || e.downcast_ref::<proxmox::ProxmoxError>()
                .is_some_and(proxmox::ProxmoxError::is_user_error)
    }) {
        EXIT_USER_ERROR
    } else {
        1
    }
}

fn read_input(p: Option<&std::path::Path>) -> Result<String> {
    match p {
        Some(p) if p != std::path::Path::new("-") => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
        }
        _ => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("reading stdin")?;
            Ok(s)
        }
    }
}

pub(crate) fn out_dir(cli: &Cli) -> PathBuf {
    cli.out.clone().unwrap_or_else(|| cli.dir.join("out"))
}

/// `kiln cache list|prune`.
fn cache_command(cli: &Cli, c: &cli::CacheCommand) -> Result<()> {
    let project = recipe::load_project(&cli.dir)?;
    let out = out_dir(cli);
    let dir = |d: &Option<std::path::PathBuf>| d.clone().unwrap_or_else(|| out.join("cache"));
    let mut o = std::io::stdout().lock();
    match c {
        cli::CacheCommand::List { cache_dir, json } => {
            let entries = cache::list(&project, &out, &dir(cache_dir))?;
            if *json {
                serde_json::to_writer_pretty(&mut o, &entries)?;
                writeln!(o)?;
            } else {
                cache::print_entries(&entries, &mut o)?;
                let total: u64 = entries.iter().map(|e| e.bytes).sum();
                let free: u64 = entries
                    .iter()
                    .filter(|e| e.removable)
                    .map(|e| e.bytes)
                    .sum();
                writeln!(
                    o,
                    "{} entries, {}; `kiln cache prune` would free {}",
                    entries.len(),
                    util::human_bytes(total),
                    util::human_bytes(free)
                )?;
            }
        }
        cli::CacheCommand::Prune {
            cache_dir,
            dry_run,
            json,
        } => {
            let r = cache::prune(&project, &out, &dir(cache_dir), *dry_run)?;
            if *json {
                serde_json::to_writer_pretty(&mut o, &r)?;
                writeln!(o)?;
            } else {
                let verb = if r.dry_run { "would remove" } else { "removed" };
                for e in &r.removed {
                    writeln!(
                        o,
                        "{verb} {} ({}{}{})",
                        e.path,
                        util::human_bytes(e.bytes),
                        if e.about.is_empty() { "" } else { ", " },
                        e.about
                    )?;
                }
                let kept: u64 = r.kept.iter().map(|e| e.bytes).sum();
                writeln!(
                    o,
                    "{verb} {} entries, {}; kept {} entries, {}",
                    r.removed.len(),
                    util::human_bytes(r.freed_bytes),
                    r.kept.len(),
                    util::human_bytes(kept)
                )?;
            }
        }
    }
    Ok(())
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Build(a) => {
            let project = recipe::load_project(&cli.dir)?;
            let out = out_dir(&cli);
            let opts = build::BuildOptions {
                cache_dir: a.cache_dir.clone().unwrap_or_else(|| out.join("cache")),
                out_dir: out,
                force: a.force,
                offline: a.offline,
                locked: a.locked,
            };
            let roles = project.roles_or_all(&a.roles);
            // Every output is signed: fail now, not after the first role, if the key is missing.
            sign::load_signing_key(&cli.dir.join("keys"))?;
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
            if !a.json {
                for n in &nodes {
                    let state = if n.up_to_date { "up to date" } else { "built" };
                    println!(
                        "node {} ({}) {state}: {}",
                        n.hostname,
                        n.role,
                        n.link.display()
                    );
                }
            }
            if a.json {
                let v = serde_json::json!({ "roles": reports, "nodes": nodes });
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            Ok(())
        }
        Command::Inspect(a) => {
            let project = recipe::load_project(&cli.dir)?;
            let r = resolve::resolve(&project, &a.role)?;
            if a.json {
                let v = serde_json::json!({ "build_id": r.build_id, "inputs": r });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
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
            }
            Ok(())
        }
        Command::Keys(cli::KeysCommand::Init { force, add_missing }) => {
            let name = recipe::load_project(&cli.dir)
                .map(|p| p.cluster.section.name)
                .unwrap_or_else(|_| "kiln".into());
            let dir = cli.dir.join("keys");
            let written = if *add_missing {
                let w = keys::add_missing(&dir, &name, keys::SEALED_SECRETS_RSA_BITS)?;
                if w.is_empty() {
                    println!("every key is present in {}", dir.display());
                }
                w
            } else {
                keys::init(&dir, &name, *force)?
            };
            for w in written {
                println!("wrote {}", w.display());
            }
            Ok(())
        }
        Command::Keys(cli::KeysCommand::Show { json }) => {
            let info = keys::show(&cli.dir.join("keys"))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                for k in &info {
                    println!("{:<24} {:<34} {}", k.name, k.kind, k.fingerprint);
                }
                if let Some(line) = info.iter().find_map(|k| k.allowed_signers.as_deref()) {
                    println!("allowed_signers: {line}");
                }
            }
            Ok(())
        }
        Command::Seal(a) => {
            let input = read_input(a.input.as_deref())?;
            let cert_path = a
                .cert
                .clone()
                .unwrap_or_else(|| cli.dir.join("keys/sealed-secrets.crt"));
            let cert = std::fs::read_to_string(&cert_path).with_context(|| {
                format!(
                    "reading the controller certificate {} (run `kiln keys init`, or pass --cert)",
                    cert_path.display()
                )
            })?;
            let scope = a
                .scope
                .as_deref()
                .map(str::parse::<seal::Scope>)
                .transpose()?;
            let out = seal::seal(&input, &cert, scope)?;
            match &a.output {
                Some(p) => util::write_atomic(p, out.as_bytes())?,
                None => print!("{out}"),
            }
            Ok(())
        }
        Command::Unseal(a) => {
            let input = read_input(a.input.as_deref())?;
            let key_path = a
                .key
                .clone()
                .unwrap_or_else(|| cli.dir.join("keys/sealed-secrets.key"));
            let key = std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading the controller key {}", key_path.display()))?;
            print!("{}", seal::unseal(&input, &key)?);
            Ok(())
        }
        Command::Seed(a) => {
            let project = recipe::load_project(&cli.dir)?;
            let nodes: Vec<&recipe::Node> = if a.hostnames.is_empty() {
                project.cluster.nodes.iter().collect()
            } else {
                a.hostnames
                    .iter()
                    .map(|h| project.node(h))
                    .collect::<Result<_, _>>()?
            };
            let keys = seed::authorized_keys(&project)?;
            let mut by_role = std::collections::BTreeMap::new();
            let mut seeds = Vec::new();
            for n in nodes {
                if !by_role.contains_key(&n.role) {
                    by_role.insert(n.role.clone(), resolve::resolve(&project, &n.role)?);
                }
                let r = &by_role[&n.role];
                let s = seed::render(&project, n, &r.build_id, r.recipe.k3s.mode != "none", &keys)?;
                seeds.push((n, s));
            }
            for (n, s) in &seeds {
                match &a.output {
                    Some(dir) => {
                        let d = dir.join(&n.hostname);
                        std::fs::create_dir_all(&d)
                            .with_context(|| format!("creating {}", d.display()))?;
                        let mode = if s.contains_secrets { 0o600 } else { 0o644 };
                        for (name, bytes) in s.ordered() {
                            util::write_atomic_mode(&d.join(name), bytes, mode)?;
                        }
                        println!("wrote {}", d.display());
                    }
                    None => {
                        for (name, bytes) in s.ordered() {
                            println!("### {} {name}", n.hostname);
                            print!("{}", String::from_utf8_lossy(bytes));
                        }
                    }
                }
            }
            Ok(())
        }
        Command::Verify(a) if a.rebuild => {
            let out = out_dir(&cli);
            let opts = reproduce::RebuildOptions {
                build_dir: a.path.clone(),
                project_dir: cli.dir.clone(),
                cache_dir: a.cache_dir.clone().unwrap_or_else(|| out.join("cache")),
                work_dir: a.work_dir.clone(),
                offline: a.offline,
            };
            reproduce::rebuild_command(&opts, a.json)
        }
        Command::Bench(a) => bench::bench_command(&cli, a),
        Command::Cache(c) => cache_command(&cli, c),
        Command::Verify(a) => {
            let key = a
                .key
                .clone()
                .unwrap_or_else(|| cli.dir.join("keys").join(sign::VERIFYING_KEY));
            sign::verify_command(&a.path, &key, a.json)
        }
        Command::Flash(a) => {
            let key = a
                .key
                .clone()
                .unwrap_or_else(|| cli.dir.join("keys").join(sign::VERIFYING_KEY));
            flash::flash_command(&out_dir(&cli), a, &key)
        }
        Command::Serve(a) => {
            let project = recipe::load_project(&cli.dir)?;
            let opts = serve::ServeOptions {
                listen: a.listen,
                advertise: a.advertise,
                interface: a.interface.clone(),
                http_port: a.http_port,
                tftp_port: a.tftp_port,
                dhcp: a.dhcp,
                dhcp_port: a.dhcp_port,
                proxy_port: a.proxy_port,
                dhcp_range: a.dhcp_range,
                dhcp_netmask: Some(a.dhcp_netmask),
                dhcp_router: a.dhcp_router,
                dhcp_dns: a.dhcp_dns.clone(),
                lease: std::time::Duration::from_secs(a.lease_secs.max(60)),
                default_role: a.default_role.clone(),
                ipxe_dir: a.ipxe_dir.clone(),
                max_blksize: a.tftp_max_blksize.clamp(512, 65464),
                key: a
                    .key
                    .clone()
                    .unwrap_or_else(|| cli.dir.join("keys").join(sign::VERIFYING_KEY)),
                json: a.json,
                grace: std::time::Duration::from_secs(a.grace_secs),
            };
            serve::serve_command(&project, &out_dir(&cli), &opts)
        }
        Command::Proxmox(p) => proxmox::run(&cli.dir, &out_dir(&cli), p),
        Command::Doctor(a) => {
            let st = tools::status();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                let mut o = std::io::stdout().lock();
                for s in &st {
                    let state = match &s.path {
                        Some(p) => format!("found   {}", p.display()),
                        None => format!("MISSING apt-get install {}", s.tool.package),
                    };
                    writeln!(o, "{:<20} {:<48} {}", s.tool.name, state, s.tool.purpose)?;
                }
                let state = if std::path::Path::new(tools::OVMF_CODE).is_file() {
                    format!("found   {}", tools::OVMF_CODE)
                } else {
                    "MISSING apt-get install ovmf".to_string()
                };
                writeln!(o, "{:<20} {state:<48} boot tests (UEFI firmware)", "OVMF")?;
                for (f, purpose) in [
                    (
                        "undionly.kpxe",
                        "kiln serve: iPXE for BIOS PXE clients (TFTP)",
                    ),
                    (
                        "ipxe.efi",
                        "kiln serve: iPXE for UEFI x64 clients (TFTP/HTTP)",
                    ),
                ] {
                    let p = std::path::Path::new(serve::DEFAULT_IPXE_DIR).join(f);
                    let state = if p.is_file() {
                        format!("found   {}", p.display())
                    } else {
                        "MISSING apt-get install ipxe".to_string()
                    };
                    writeln!(o, "{f:<20} {state:<48} {purpose}")?;
                }
            }
            let missing: Vec<&str> = st
                .iter()
                .filter(|s| s.path.is_none() && s.tool.required_for_build)
                .map(|s| s.tool.package)
                .collect();
            if !missing.is_empty() {
                bail!(
                    "missing tools needed by `kiln build`; install them with: apt-get install {}",
                    missing.join(" ")
                );
            }
            Ok(())
        }
    }
}
