//! `kiln keys init|show|known-hosts`, `kiln kubeconfig`, `kiln seal`, `kiln unseal`.

use super::args::{KeysCommand, KubeconfigArgs, SealArgs, UnsealArgs};
use super::{print_json, read_input, Ctx};
use crate::project::layout::key;
use crate::sys::util;
use crate::trust::{keys, seal};
use anyhow::{Context, Result};

pub(crate) fn keys(cx: &Ctx, k: &KeysCommand) -> Result<()> {
    let dir = cx.layout.keys();
    match k {
        KeysCommand::Init { force, add_missing } => {
            let name = cx
                .project()
                .map(|p| p.cluster.section.name)
                .unwrap_or_else(|_| "kiln".into());
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
            warn_permissions(&dir);
            Ok(())
        }
        KeysCommand::Show { json } => {
            let info = keys::show(&dir)?;
            warn_permissions(&dir);
            if *json {
                return print_json(&info);
            }
            for k in &info {
                println!("{:<24} {:<34} {}", k.name, k.kind, k.fingerprint);
            }
            if let Some(line) = info.iter().find_map(|k| k.allowed_signers.as_deref()) {
                println!("allowed_signers: {line}");
            }
            Ok(())
        }
        KeysCommand::KnownHosts { hostnames, output } => {
            let project = cx.project()?;
            let nodes = project.nodes(hostnames)?;
            let secret = crate::pipeline::resolve::read_node_identity(&project)?;
            let text = crate::trust::identity::known_hosts(
                &secret,
                &project.cluster.section.name,
                project.cluster.section.domain.as_deref(),
                &nodes,
            );
            match output {
                Some(p) => util::write_output(p, text.as_bytes(), 0o644)?,
                None => print!("{text}"),
            }
            Ok(())
        }
    }
}

pub(crate) fn kubeconfig(cx: &Ctx, a: &KubeconfigArgs) -> Result<()> {
    use crate::pipeline::resolve::read_key_file;
    use crate::trust::k3s_ca;
    let project = cx.project()?;
    let server = match &a.server {
        Some(s) => s.clone(),
        None => project.cluster.server_url().ok_or_else(|| {
            crate::project::recipe::RecipeError::new(
                project.layout().cluster_file(),
                "cluster.api_endpoint",
                "no API endpoint: cluster.toml sets no api_endpoint and no master has a static address",
                "set api_endpoint (the VIP or a master's address), or pass --server https://<host>:6443",
            )
        })?,
    };
    let fix = "run `kiln keys init --add-missing` to make the cluster's k3s CAs";
    let read = |n: &str| read_key_file(&project, n, "(k3s CA)", fix);
    let ca = read(k3s_ca::SERVER_CA_CRT)?;
    let client_crt = String::from_utf8_lossy(&read(k3s_ca::CLIENT_CA_CRT)?).into_owned();
    let client_key = zeroize::Zeroizing::new(
        String::from_utf8_lossy(&read(k3s_ca::CLIENT_CA_KEY)?).into_owned(),
    );
    let (crt, key) = k3s_ca::client_certificate(
        &client_crt,
        &client_key,
        &a.user,
        &a.group,
        std::time::SystemTime::now(),
        a.expires,
    )?;
    let key = zeroize::Zeroizing::new(key);
    let text = zeroize::Zeroizing::new(k3s_ca::kubeconfig(
        &project.cluster.section.name,
        &server,
        &ca,
        &crt,
        &key,
    ));
    match &a.output {
        Some(p) => util::write_output(p, text.as_bytes(), 0o600)?,
        None => print!("{}", text.as_str()),
    }
    Ok(())
}

/// Prints [`keys::permission_warnings`] on stderr (stdout stays the report, also for --json).
fn warn_permissions(dir: &std::path::Path) {
    for w in keys::permission_warnings(dir) {
        eprintln!("warning: {w}");
    }
}

pub(crate) fn seal(cx: &Ctx, a: &SealArgs) -> Result<()> {
    let input = read_input(a.input.as_deref())?;
    let cert_path = cx.key(&a.cert, key::SEALED_SECRETS_CRT);
    let cert = keys::read_key_file(&cert_path).with_context(|| {
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
        Some(p) => util::write_output(p, out.as_bytes(), 0o644)?,
        None => print!("{out}"),
    }
    Ok(())
}

pub(crate) fn unseal(cx: &Ctx, a: &UnsealArgs) -> Result<()> {
    let input = read_input(a.input.as_deref())?;
    let key_path = cx.key(&a.key, key::SEALED_SECRETS_KEY);
    let key = zeroize::Zeroizing::new(
        keys::read_key_file(&key_path)
            .with_context(|| format!("reading the controller key {}", key_path.display()))?,
    );
    print!("{}", seal::unseal(&input, &key)?);
    Ok(())
}
