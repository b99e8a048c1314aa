//! `kiln proxmox import|list|clone`.

use super::args::{ProxmoxCommand, PveConnArgs};
use super::{print_json, Ctx};
use crate::deliver::proxmox::{self, config::Overrides, import, short};
use crate::project::layout::key;
use anyhow::Result;

fn conn(c: &PveConnArgs) -> Overrides {
    Overrides {
        config: c.config.clone(),
        node: c.node.clone(),
        storage: c.storage.clone(),
        fingerprint: c.fingerprint.clone(),
    }
}

pub(crate) fn proxmox(cx: &Ctx, cmd: &ProxmoxCommand) -> Result<()> {
    let dir = cx.layout.root();
    match cmd {
        ProxmoxCommand::Import(a) => {
            let key = crate::trust::sign::load_verifying_key(&cx.key(&a.key, key::VERIFYING_KEY))?;
            let b = proxmox::load_role_build(&cx.out, &a.role, a.build.as_deref(), &key)?;
            if let Some(path) = &a.emit_script {
                proxmox::write_import_script(dir, &conn(&a.conn), &b, path)?;
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({ "script": path, "build_id": b.build_id, "image": b.image_name })
                    );
                } else {
                    println!(
                        "wrote {} (copy {} as {} next to it on the PVE host)",
                        path.display(),
                        b.image_path.display(),
                        b.image_name
                    );
                }
                return Ok(());
            }
            let opts = import::ImportOptions {
                vmid: a.vmid,
                replace: a.replace,
                url: a.url.clone(),
            };
            let rep = proxmox::import_template(dir, &conn(&a.conn), &b, &opts)?;
            if a.json {
                print_json(&rep)?;
            } else if rep.state == "exists" {
                println!(
                    "template {} (VM {} on {}) exists for build {}; nothing to do (--replace rebuilds it)",
                    rep.name, rep.vmid, rep.node, b.build_id
                );
            } else {
                println!(
                    "template {} {}: VM {} on {} (image {} {})",
                    rep.name, rep.state, rep.vmid, rep.node, rep.volume, rep.image
                );
            }
            Ok(())
        }
        ProxmoxCommand::List(a) => {
            let l = proxmox::list(dir, &conn(&a.conn))?;
            if a.json {
                return print_json(&l);
            }
            println!(
                "{:<6} {:<10} {:<9} {:<24} {:<8} BUILD",
                "VMID", "NODE", "KIND", "NAME", "ROLE"
            );
            for e in &l {
                println!(
                    "{:<6} {:<10} {:<9} {:<24} {:<8} {}",
                    e.vmid, e.node, e.kind, e.name, e.role, e.build_id
                );
            }
            Ok(())
        }
        ProxmoxCommand::Clone(a) => {
            let req = proxmox::CloneRequest {
                hostname: &a.hostname,
                build_id: a.build_id.clone(),
                vmid: a.vmid,
                replace: a.replace,
                cicustom: a.cicustom.clone(),
            };
            let rep = proxmox::clone_node(dir, &cx.out, &conn(&a.conn), &req)?;
            if a.json {
                print_json(&rep)?;
            } else if rep.state == "exists" {
                println!(
                    "VM {} ({}) exists for build {}; nothing to do",
                    rep.vmid,
                    rep.hostname,
                    short(&rep.build_id)
                );
            } else {
                println!(
                    "VM {} ({}) {} on {} from template {} (build {})",
                    rep.vmid,
                    rep.hostname,
                    rep.state,
                    rep.node,
                    rep.template_vmid,
                    short(&rep.build_id)
                );
            }
            Ok(())
        }
    }
}
