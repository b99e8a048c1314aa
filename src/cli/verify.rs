//! `kiln verify`: a signed output directory's signature and files, or (`--rebuild`) a role
//! build rebuilt from its recorded inputs and compared byte for byte.

use super::args::VerifyArgs;
use super::Ctx;
use crate::pipeline::reproduce::{self, NotReproduced, RebuildOptions, RebuildReport};
use crate::project::layout::key;
use crate::sys::util;
use crate::trust::sign::{
    load_verifying_key, verify_dir_with_progress, FileStatus, VerifyError, SIG,
};
use anyhow::{Context, Result};
use std::io::{self, Write};
use std::path::Path;

pub(crate) fn verify(cx: &Ctx, a: &VerifyArgs) -> Result<()> {
    if a.rebuild {
        let opts = RebuildOptions {
            build_dir: a.path.clone(),
            project_dir: cx.layout.root().to_path_buf(),
            cache_dir: cx.cache_dir(&a.cache_dir),
            work_dir: a.work_dir.clone(),
            offline: a.offline,
        };
        return rebuild_command(&opts, a.json);
    }
    verify_command(&a.path, &cx.key(&a.key, key::VERIFYING_KEY), a.json)
}

/// `kiln verify <DIR> [--key <PUB>] [--json]`: prints one line per file (or the JSON report)
/// on stdout and fails with a [`VerifyError`] (exit status 3) on any problem.
fn verify_command(dir: &Path, key_path: &Path, json: bool) -> Result<()> {
    let key = load_verifying_key(key_path)?;
    let result = verify_dir_with_progress(dir, &key, !json);
    let report = match &result {
        Ok(r) => r,
        Err(e) => match e.downcast_ref::<VerifyError>() {
            Some(VerifyError::Files(r)) => r.as_ref(),
            _ => return result.map(|_| ()),
        },
    };
    let mut o = io::stdout().lock();
    if json {
        writeln!(o, "{}", serde_json::to_string_pretty(report)?).context("writing to stdout")?;
    } else {
        writeln!(
            o,
            "signature {}: good, key {} (namespace {}, {})",
            dir.join(SIG).display(),
            report.signer,
            report.namespace,
            report.hash_alg
        )
        .context("writing to stdout")?;
        for f in &report.files {
            let line = match f.status {
                FileStatus::Ok => format!("OK        {} ({} bytes)", f.name, f.size.unwrap_or(0)),
                FileStatus::Missing => format!("MISSING   {}", f.name),
                FileStatus::NotAFile => format!("NOT FILE  {}", f.name),
                FileStatus::Mismatch => format!(
                    "CHANGED   {} (sha256 {}, signed {})",
                    f.name,
                    f.actual_sha256.as_deref().unwrap_or("?"),
                    f.expected_sha256
                ),
            };
            writeln!(o, "{line}").context("writing to stdout")?;
        }
        for n in &report.unlisted {
            writeln!(o, "UNLISTED  {n} (not covered by the signature)")
                .context("writing to stdout")?;
        }
        if report.ok {
            writeln!(
                o,
                "all {} files match the signed SHA256SUMS ({} bytes checked)",
                report.files.len(),
                report.bytes_checked
            )
            .context("writing to stdout")?;
        }
    }
    result.map(|_| ())
}

/// Prints the report as a table (or JSON) on stdout.
fn print_report(r: &RebuildReport, json: bool) -> Result<()> {
    let mut o = std::io::stdout().lock();
    if json {
        writeln!(o, "{}", serde_json::to_string_pretty(r)?).context("writing to stdout")?;
        return Ok(());
    }
    writeln!(
        o,
        "rebuilt {} {} from its recorded inputs with a fresh cache in {:.0} s",
        r.role, r.build_id, r.seconds
    )?;
    for (n, how) in &r.artifacts_source {
        writeln!(o, "  {n}: {how}")?;
    }
    writeln!(o, "  base: made again by mmdebstrap")?;
    writeln!(
        o,
        "{:<16} {:>10} {:<17} {:<17} result",
        "artifact", "size", "original sha256", "rebuilt sha256"
    )?;
    for a in &r.artifacts {
        let size = a
            .original_size
            .or(a.rebuilt_size)
            .map(util::human_bytes)
            .unwrap_or_default();
        let result = match a.result.as_str() {
            "same" => "same".to_string(),
            "different" => format!(
                "DIFFERENT (first at byte {})",
                a.first_difference.unwrap_or(0)
            ),
            "missing" => "MISSING in the rebuild".into(),
            _ => "EXTRA in the rebuild".into(),
        };
        writeln!(
            o,
            "{:<16} {:>10} {:<17} {:<17} {result}",
            a.name,
            size,
            short_sha(&a.original_sha256),
            short_sha(&a.rebuilt_sha256)
        )?;
    }
    if let Some(d) = &r.file_list_diff {
        if d.is_empty() {
            writeln!(
                o,
                "root file lists (path, type, mode, uid:gid, size, sha256) are identical: the \
                 difference is in the encoding of the archives, not in the files"
            )?;
        } else {
            writeln!(
                o,
                "root file list differences ({}; - original, + rebuilt, ~ changed):",
                d.len()
            )?;
            for f in d.iter().take(200) {
                writeln!(o, "  {}", f.line())?;
            }
            if d.len() > 200 {
                writeln!(o, "  … and {} more (--json lists all)", d.len() - 200)?;
            }
        }
    }
    for (n, lines) in &r.text_diffs {
        writeln!(o, "{n}:")?;
        for l in lines.iter().take(50) {
            writeln!(o, "  {l}")?;
        }
    }
    if r.identical {
        writeln!(
            o,
            "all {} artifacts are byte-for-byte identical",
            r.artifacts.len()
        )?;
    }
    Ok(())
}

fn short_sha(s: &Option<String>) -> String {
    s.as_deref()
        .map(|s| s[..16].to_string())
        .unwrap_or_else(|| "-".into())
}

/// `kiln verify --rebuild`: rebuild, print, and fail with [`NotReproduced`] (exit 3) on any
/// difference. An identical rebuild in a temp dir is removed; a different one is kept.
fn rebuild_command(opts: &RebuildOptions, json: bool) -> Result<()> {
    let (report, tmp) = reproduce::rebuild(opts)?;
    print_report(&report, json)?;
    if report.identical {
        return Ok(());
    }
    let kept = match tmp {
        Some(t) => t.keep(),
        None => report.rebuilt.clone(),
    };
    Err(NotReproduced {
        role: report.role.clone(),
        build_id: report.build_id.clone(),
        different: report
            .artifacts
            .iter()
            .filter(|a| a.result != "same")
            .map(|a| a.name.clone())
            .collect(),
        rebuilt: kept,
    }
    .into())
}
