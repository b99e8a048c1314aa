//! The cold part: every role from empty caches against one base built alone (the shared base,
//! and the DKMS one when a role has it: the critical path).

use super::{
    build_roles, copy_project, measure, median, reference_role, round2, Row, Timing,
    TARGET_COLD_RATIO,
};
use crate::pipeline::resolve::{self, Resolved};
use crate::project::layout::Cache;
use crate::project::recipe::Project;
use anyhow::{Context, Result};
use std::fs;
use std::path::Path;

/// The references of the cold part, each a base built alone: the shared one (see
/// [`reference_role`]) and, when a role's base compiles modules with DKMS (gpu) and is another
/// base, that one too — the longest base is the critical path no build of these roles can beat.
fn cold_references(project: &Project, roles: &[String]) -> Result<Vec<(String, Resolved)>> {
    let shared = reference_role(roles);
    let mut refs = vec![(shared.to_string(), resolve::resolve(project, shared)?)];
    for role in roles {
        let r = resolve::resolve(project, role)?;
        if r.base.module_signing_cert.is_some() && r.base_key != refs[0].1.base_key {
            refs.push((role.clone(), r));
            break;
        }
    }
    Ok(refs)
}

pub(super) fn cold(
    project_dir: &Path,
    work: &Path,
    roles: &[String],
    runs: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let project = copy_project(project_dir, &work.join("cold-project"))?;
    let refs = cold_references(&project, roles)?;
    let mut base_s: Vec<Vec<Timing>> = refs.iter().map(|_| vec![]).collect();
    let mut total_s = vec![];
    let mut bases = 0;
    for i in 0..runs {
        // Each reference base alone, from an empty cache.
        for (j, (_, r)) in refs.iter().enumerate() {
            let cache = work.join(format!("cold-one-cache-{i}-{j}"));
            let (_, t) = measure(|| crate::pipeline::build::base_of(&project, r, &cache, false))?;
            base_s[j].push(t);
            fs::remove_dir_all(&cache).with_context(|| format!("removing {}", cache.display()))?;
        }

        // Every role, from another empty cache.
        let cache = work.join(format!("cold-cache-{i}"));
        let out = work.join(format!("cold-out-{i}"));
        let (_, roles_s, _, _) = build_roles(&project, roles, &out, &cache)?;
        bases = {
            fs::read_dir(Cache::new(&cache).bases())
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                        .count()
                })
                .unwrap_or(0)
        };
        total_s.push(roles_s);
        for d in [&cache, &out] {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
    }
    let mut base_median = vec![];
    for ((role, r), ts) in refs.iter().zip(base_s) {
        base_median.push(median(&ts.iter().map(|t| t.wall).collect::<Vec<_>>()).unwrap_or(0.0));
        let dkms = if r.base.module_signing_cert.is_some() {
            ", DKMS"
        } else {
            ""
        };
        rows.push(Row::timed(
            "cold",
            format!("one base build alone (mmdebstrap, role {role}{dkms}), empty cache"),
            ts,
        ));
    }
    let mut r = Row::timed(
        "cold",
        format!("roles {} from an empty cache", roles.join("+")),
        total_s,
    );
    let t = r.median_seconds.unwrap_or(0.0);
    r.detail = format!(
        "{bases} distinct base(s) built side by side in the background; each role composed once its base was ready"
    );
    let ratio_row = |r: &mut Row, b: f64| {
        r.target = Some(format!("≤ {TARGET_COLD_RATIO}× one base"));
        if b > 0.0 {
            r.ratio = Some(round2(t / b));
            r.met = Some(t / b <= TARGET_COLD_RATIO);
        }
    };
    ratio_row(&mut r, base_median[0]);
    rows.push(r);
    if let (Some((role, _)), Some(&b)) = (refs.get(1), base_median.get(1)) {
        let mut r = Row::note(
            "cold",
            format!("the same against the longest base alone (role {role}: the critical path)"),
            "",
        );
        ratio_row(&mut r, b);
        rows.push(r);
    }
    Ok(())
}
