//! Overlays, `overlays/common/` and `overlays/<role>/`: the scan that lists what goes into a
//! role image, and the template check that stops a bad `*.tera` file before anything is
//! written.

use super::confine;
use super::error::RecipeError;
use super::inventory::Project;
use crate::sys::util;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
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

/// The directory of the overlay root `overlays/<layer>` (`common`, a role, `seed`, `seed/<host>`)
/// after symlinks, or `None` when there is none. A root must be a directory inside the
/// project: a symlink may point elsewhere in the project, never out of it, and a root that is
/// a regular file is an error rather than silently no overlay.
pub fn overlay_root(project: &Project, layer: &str) -> super::error::Result<Option<PathBuf>> {
    let layout = project.layout();
    let path = layout.overlays().join(layer);
    confine::dir(
        &layout,
        &path,
        confine::NamedBy {
            file: &path,
            key: "(overlay)",
            fix: "make it a directory inside the project (a symlink may point only inside the project), or remove it",
        },
    )
}

/// Lists `overlays/common/` then `overlays/<role>/` in sorted order; later layers win. Symlinks
/// inside a layer are listed as symlinks (never followed): they go into the image as links.
pub fn scan_overlays(project: &Project, role: &str) -> Result<Vec<OverlayFile>> {
    let mut out: BTreeMap<String, OverlayFile> = BTreeMap::new();
    if overlay_root(project, "")?.is_none() {
        return Ok(vec![]);
    }
    for layer in ["common", role] {
        let Some(dir) = overlay_root(project, layer)? else {
            continue;
        };
        for e in WalkDir::new(&dir)
            .follow_links(false)
            .follow_root_links(false)
            .sort_by_file_name()
            .min_depth(1)
        {
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
                let (sha, _) = util::sha256_file(e.path()).map_err(|err| {
                    RecipeError::new(
                        e.path(),
                        "(overlay)",
                        format!("cannot read: {err:#}"),
                        "make the file readable, or remove it from the overlay",
                    )
                })?;
                match rel_str.strip_suffix(".tera") {
                    Some(p) => ("file", mode, sha, true, p.to_string()),
                    None => ("file", mode, sha, false, rel_str.clone()),
                }
            } else {
                return Err(RecipeError::new(
                    e.path(),
                    "(overlay)",
                    format!(
                        "a {}, not a regular file, directory or symlink",
                        util::file_kind(&meta)
                    ),
                    "remove it from the overlay (device nodes, FIFOs and sockets are made at boot, e.g. by udev or systemd-tmpfiles)",
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

/// The path of an overlay file as [`scan_overlays`] listed it, checked again (its layer
/// root confined, the file itself not a symlink) where its bytes are read.
pub fn source_path(project: &Project, o: &OverlayFile) -> Result<PathBuf> {
    let (layer, rel) = o
        .source
        .split_once('/')
        .context("overlay source has a layer")?;
    let root = overlay_root(project, layer)?
        .with_context(|| format!("overlays/{layer} disappeared during the build"))?;
    let p = root.join(rel);
    let meta = fs::symlink_metadata(&p).with_context(|| format!("reading {}", p.display()))?;
    let want = o.kind.as_str();
    let is = if meta.file_type().is_symlink() {
        "symlink"
    } else if meta.is_dir() {
        "dir"
    } else if meta.is_file() {
        "file"
    } else {
        "other"
    };
    if is != want {
        anyhow::bail!(
            "{} changed during the build (was a {want}, is a {is})",
            p.display()
        );
    }
    Ok(p)
}

/// Parses every `*.tera` overlay so that syntax errors, recursive macros and the other
/// refusals of [`super::template`] stop the build before anything is written.
pub fn check_templates(project: &Project, overlays: &[OverlayFile]) -> Result<()> {
    for o in overlays.iter().filter(|o| o.template) {
        let src = source_path(project, o)?;
        let text = read_template(&src)?;
        super::template::check(&project.overlays_dir().join(&o.source), &text)?;
    }
    Ok(())
}

/// Reads the template at `src` (a regular file): UTF-8, at most [`super::template::MAX_TEMPLATE`].
pub fn read_template(src: &Path) -> super::error::Result<String> {
    util::read_small_string(src, super::template::MAX_TEMPLATE, "template").map_err(|e| {
        RecipeError::new(
            src,
            "(template)",
            format!("cannot read as UTF-8 text: {e:#}"),
            "save it as UTF-8 (at most 1 MiB) or drop the .tera suffix",
        )
    })
}
