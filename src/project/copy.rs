//! A copy of a project's inputs (for rebuilds and benchmarks that must not touch the user's
//! repository).

use crate::project::layout::Layout;
use anyhow::{Context, Result};
use std::fs;
use std::path::Path;

/// Copies the parts of a project a build reads (recipes/, overlays/, keys/, kiln.lock) into
/// `to`, keeping modes and symlinks, so the rebuild changes nothing in the user's project.
pub fn copy_project(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (src_layout, dst_layout) = (Layout::new(from), Layout::new(to));
    for src in [
        src_layout.recipes(),
        src_layout.overlays(),
        src_layout.keys(),
    ] {
        if !src.is_dir() {
            continue;
        }
        for e in walkdir::WalkDir::new(&src).sort_by_file_name() {
            let e = e.with_context(|| format!("walking {}", src.display()))?;
            let rel = e.path().strip_prefix(from).expect("under from");
            let dst = to.join(rel);
            let ft = e.file_type();
            if ft.is_dir() {
                fs::create_dir_all(&dst).with_context(|| format!("creating {}", dst.display()))?;
                let mode = e.metadata()?.permissions().mode();
                fs::set_permissions(&dst, fs::Permissions::from_mode(mode))?;
            } else if ft.is_symlink() {
                let t = fs::read_link(e.path())
                    .with_context(|| format!("reading link {}", e.path().display()))?;
                std::os::unix::fs::symlink(&t, &dst)
                    .with_context(|| format!("creating {}", dst.display()))?;
            } else {
                fs::copy(e.path(), &dst).with_context(|| {
                    format!("copying {} to {}", e.path().display(), dst.display())
                })?;
            }
        }
    }
    let lock = src_layout.lock_file();
    if lock.is_file() {
        fs::copy(&lock, dst_layout.lock_file())
            .with_context(|| format!("copying {}", lock.display()))?;
    }
    Ok(())
}
