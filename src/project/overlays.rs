//! Overlays, `overlays/common/` and `overlays/<role>/`: the scan that lists what goes into a
//! role image, and the template check that stops a bad `*.tera` file before anything is
//! written.

use super::error::RecipeError;
use super::inventory::Project;
use crate::sys::util;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs;
use walkdir::WalkDir;

/// One file of an overlay tree, as found in the project.
#[derive(Debug, Clone, Serialize)]
pub struct OverlayFile {
    /// Layer it comes from (`common` or the role).
    pub layer: String,
    /// Path inside the image, without leading `/` and without the `.tera` suffix.
    pub image_path: String,
    /// Path relative to `overlays/`.
    pub source: String,
    /// `file`, `dir` or `symlink`.
    pub kind: String,
    /// Normalised mode (0644/0755 for files, 0755 for dirs, 0777 for symlinks).
    pub mode: u32,
    /// sha256 of the file contents, or of the link target.
    pub sha256: String,
    pub template: bool,
}

/// Lists `overlays/common/` then `overlays/<role>/` in sorted order; later layers win.
pub fn scan_overlays(project: &Project, role: &str) -> Result<Vec<OverlayFile>> {
    let overlays = project.layout().overlays();
    let mut out: BTreeMap<String, OverlayFile> = BTreeMap::new();
    for layer in ["common", role] {
        let dir = overlays.join(layer);
        if !dir.is_dir() {
            continue;
        }
        for e in WalkDir::new(&dir).sort_by_file_name().min_depth(1) {
            let e = e.with_context(|| format!("walking {}", dir.display()))?;
            let rel = e.path().strip_prefix(&dir).expect("under dir");
            let rel_str = rel
                .to_str()
                .with_context(|| format!("{}: path is not UTF-8", e.path().display()))?
                .to_string();
            if rel_str == ".gitkeep" || rel_str.ends_with("/.gitkeep") {
                continue;
            }
            let source = format!("{layer}/{rel_str}");
            let meta = fs::symlink_metadata(e.path())
                .with_context(|| format!("reading {}", e.path().display()))?;
            let ft = meta.file_type();
            let (kind, mode, sha, template, image_path) = if ft.is_symlink() {
                let t = fs::read_link(e.path())
                    .with_context(|| format!("reading link {}", e.path().display()))?;
                let t = t
                    .to_str()
                    .with_context(|| format!("{}: link target is not UTF-8", e.path().display()))?;
                (
                    "symlink",
                    0o777,
                    util::sha256_hex(t.as_bytes()),
                    false,
                    rel_str.clone(),
                )
            } else if ft.is_dir() {
                ("dir", 0o755, String::new(), false, rel_str.clone())
            } else if ft.is_file() {
                use std::os::unix::fs::PermissionsExt;
                let mode = if meta.permissions().mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                };
                let (sha, _) = util::sha256_file(e.path())?;
                match rel_str.strip_suffix(".tera") {
                    Some(p) => ("file", mode, sha, true, p.to_string()),
                    None => ("file", mode, sha, false, rel_str.clone()),
                }
            } else {
                return Err(RecipeError::new(
                    e.path(),
                    "(overlay)",
                    "not a regular file, directory or symlink",
                    "remove it from the overlay",
                )
                .into());
            };
            out.insert(
                image_path.clone(),
                OverlayFile {
                    layer: layer.to_string(),
                    image_path,
                    source,
                    kind: kind.into(),
                    mode,
                    sha256: sha,
                    template,
                },
            );
        }
    }
    Ok(out.into_values().collect())
}

/// Parses every `*.tera` overlay so that syntax errors stop the build before anything is written.
pub fn check_templates(project: &Project, overlays: &[OverlayFile]) -> Result<()> {
    let dir = project.layout().overlays();
    for o in overlays.iter().filter(|o| o.template) {
        let src = dir.join(&o.source);
        let text = fs::read_to_string(&src).map_err(|e| {
            RecipeError::new(
                &src,
                "(template)",
                format!("cannot read as UTF-8 text: {e}"),
                "save it as UTF-8 or drop the .tera suffix",
            )
        })?;
        tera::Tera::default().add_raw_template(&o.source, &text).map_err(|e| {
            RecipeError::new(
                &src,
                "(template)",
                format!("template syntax error: {}", tera_error_chain(&e)),
                "fix the tera syntax (https://keats.github.io/tera/docs/), or drop the .tera suffix to copy the file verbatim",
            )
        })?;
    }
    Ok(())
}

/// A tera error and the errors under it, joined with `: `.
pub fn tera_error_chain(e: &tera::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
