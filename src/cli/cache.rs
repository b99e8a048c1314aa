//! `kiln cache list|prune`.

use super::args::CacheCommand;
use super::{print_json, Ctx};
use crate::pipeline::cache::{self, Entry};
use crate::sys::util::human_bytes;
use anyhow::Result;
use std::io::Write;

pub(crate) fn cache(cx: &Ctx, c: &CacheCommand) -> Result<()> {
    let project = cx.project()?;
    let out = cx.out.dir();
    let mut o = std::io::stdout().lock();
    match c {
        CacheCommand::List { cache_dir, json } => {
            let entries = cache::list(&project, out, &cx.cache_dir(cache_dir))?;
            if *json {
                return print_json(&entries);
            }
            print_entries(&entries, &mut o)?;
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
                human_bytes(total),
                human_bytes(free)
            )?;
        }
        CacheCommand::Prune {
            cache_dir,
            dry_run,
            json,
        } => {
            let r = cache::prune(&project, out, &cx.cache_dir(cache_dir), *dry_run)?;
            if *json {
                return print_json(&r);
            }
            let verb = if r.dry_run { "would remove" } else { "removed" };
            for e in &r.removed {
                writeln!(
                    o,
                    "{verb} {} ({}{}{})",
                    e.path,
                    human_bytes(e.bytes),
                    if e.about.is_empty() { "" } else { ", " },
                    e.about
                )?;
            }
            let kept: u64 = r.kept.iter().map(|e| e.bytes).sum();
            writeln!(
                o,
                "{verb} {} entries, {}; kept {} entries, {}",
                r.removed.len(),
                human_bytes(r.freed_bytes),
                r.kept.len(),
                human_bytes(kept)
            )?;
        }
    }
    Ok(())
}

/// Prints entries as a table (sizes in MB, one line each).
fn print_entries(entries: &[Entry], o: &mut dyn std::io::Write) -> Result<()> {
    writeln!(
        o,
        "{:<9} {:<40} {:>10}  {:<30} about",
        "kind", "entry", "size", "used by"
    )?;
    for e in entries {
        let path = if e.path.len() > 40 {
            format!("{}…", &e.path[..39])
        } else {
            e.path.clone()
        };
        let used = if e.used_by.is_empty() {
            if e.removable {
                "unused".to_string()
            } else {
                e.note.clone().unwrap_or_else(|| "not kiln's: kept".into())
            }
        } else {
            e.used_by.join(", ")
        };
        writeln!(
            o,
            "{:<9} {:<40} {:>10}  {:<30} {}",
            e.kind,
            path,
            human_bytes(e.bytes),
            used,
            e.about
        )?;
    }
    Ok(())
}
