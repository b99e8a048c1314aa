//! `kiln bench`: measure builds, compression and PXE serving; print a table (or JSON).

use super::args::BenchArgs;
use super::{print_json, Ctx};
use crate::bench;
use anyhow::{Context, Result};
use std::fs;

/// `kiln bench`.
pub(crate) fn bench(cx: &Ctx, a: &BenchArgs) -> Result<()> {
    let cache = cx.cache_dir(&a.cache_dir);
    let project = cx.project()?;
    let roles = project.roles_or_all(&a.roles);
    // Validate the roles (and the signing key every build needs) before measuring anything.
    crate::trust::sign::load_signing_key(&cx.layout.keys())?;
    for r in &roles {
        crate::pipeline::resolve::resolve(&project, r)?;
    }
    anyhow::ensure!(!roles.is_empty(), "no role to measure");
    let parts: Vec<String> = if a.parts.is_empty() {
        vec![
            "cold".into(),
            "warm".into(),
            "compress".into(),
            "pxe".into(),
        ]
    } else {
        a.parts.clone()
    };
    let (_tmp, work) = match &a.work_dir {
        Some(d) => {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (None, fs::canonicalize(d)?)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("kiln-bench-")
                .tempdir()
                .context("creating a scratch dir (set TMPDIR or --work-dir)")?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let report = bench::run_bench(cx.layout.root(), &cache, &work, &roles, &parts, a.runs)?;
    if a.json {
        return print_json(&report);
    }
    bench::print_table(&report, &mut std::io::stdout().lock())
}
