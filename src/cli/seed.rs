//! `kiln seed`: render nodes' cloud-init seeds without building.

use super::args::SeedArgs;
use super::Ctx;
use crate::pipeline::seed;
use anyhow::Result;

pub(crate) fn seed(cx: &Ctx, a: &SeedArgs) -> Result<()> {
    let project = cx.project()?;
    let seeds = seed::render_nodes(&project, &a.hostnames)?;
    for (n, s) in &seeds {
        match &a.output {
            Some(dir) => {
                let d = seed::write_node_dir(dir, &n.hostname, s)?;
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
