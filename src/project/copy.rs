//! A copy of a project's inputs (for rebuilds and benchmarks that must not touch the user's
//! repository).

use super::confine;
use super::error::RecipeError;
use crate::project::layout::Layout;
use anyhow::{Context, Result};
use std::fs;
use std::path::Path;

/// Who a copied path is named by, in an error.
fn by(p: &Path) -> confine::NamedBy<'_> {
    confine::NamedBy {
        file: p,
        key: "(project copy)",
        fix: "keep the project's recipes/, overlays/ and keys/ inside it",
    }
}

/// Copies the parts of a project a build reads (recipes/, overlays/, keys/, kiln.lock) into
/// `to`, keeping modes, so the rebuild changes nothing in the user's project. Confined like
/// every read of a project (see [`super::confine`]): a root (`recipes/`, `overlays/`, `keys/`)
/// that resolves outside the project is refused, never copied. Symlinks inside overlays are
/// image content and stay symlinks; a symlink in recipes/ or keys/ to a file inside the
/// project is copied as that file (its target may not be among the copied parts), and any
/// other symlink is kept as it is (the copy's build refuses it where it is named).
pub fn copy_project(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let (src_layout, dst_layout) = (Layout::new(from), Layout::new(to));
    for (src, keep_links) in [
        (src_layout.recipes(), false),
        (src_layout.overlays(), true),
        (src_layout.keys(), false),
    ] {
        let Some(real) = confine::dir(&src_layout, &src, by(&src))? else {
            continue;
        };
        let top = dst_layout
            .root()
            .join(src.strip_prefix(from).expect("under from"));
        for e in walkdir::WalkDir::new(&real)
            .follow_links(false)
            .follow_root_links(false)
            .sort_by_file_name()
        {
            let e = e.with_context(|| format!("walking {}", src.display()))?;
            let rel = e.path().strip_prefix(&real).expect("under the root");
            let dst = top.join(rel);
            let ft = e.file_type();
            if ft.is_dir() {
                fs::create_dir_all(&dst).with_context(|| format!("creating {}", dst.display()))?;
                let mode = e.metadata()?.permissions().mode();
                fs::set_permissions(&dst, fs::Permissions::from_mode(mode))?;
            } else if ft.is_symlink() {
                let inside = if keep_links {
                    None
                } else {
                    confine::optional_file(&src_layout, e.path(), by(e.path()))
                        .ok()
                        .flatten()
                };
                match inside {
                    Some(target) => {
                        fs::copy(&target, &dst).with_context(|| {
                            format!("copying {} to {}", target.display(), dst.display())
                        })?;
                    }
                    None => {
                        let t = fs::read_link(e.path())
                            .with_context(|| format!("reading link {}", e.path().display()))?;
                        std::os::unix::fs::symlink(&t, &dst)
                            .with_context(|| format!("creating {}", dst.display()))?;
                    }
                }
            } else if ft.is_file() {
                fs::copy(e.path(), &dst).with_context(|| {
                    format!("copying {} to {}", e.path().display(), dst.display())
                })?;
            } else {
                return Err(RecipeError::new(
                    e.path(),
                    "(project copy)",
                    "not a regular file, directory or symlink",
                    "remove it from the project",
                )
                .into());
            }
        }
    }
    let lock = src_layout.lock_file();
    let by = confine::NamedBy {
        file: &lock,
        key: "(lock)",
        fix: "keep kiln.lock a regular file inside the project",
    };
    if let Some(real) = confine::optional_file(&src_layout, &lock, by)? {
        fs::copy(&real, dst_layout.lock_file())
            .with_context(|| format!("copying {}", lock.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn copies_without_following_links_out_of_the_project() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("shadow"), "root:secret").unwrap();
        let p = tempfile::tempdir().unwrap();
        fs::create_dir_all(p.path().join("recipes")).unwrap();
        fs::write(p.path().join("recipes/base.toml"), "").unwrap();
        symlink("base.toml", p.path().join("recipes/alias.toml")).unwrap();
        fs::create_dir_all(p.path().join("overlays/common/etc")).unwrap();
        symlink(
            outside.path().join("shadow"),
            p.path().join("overlays/common/etc/link"),
        )
        .unwrap();
        let to = tempfile::tempdir().unwrap();
        copy_project(p.path(), to.path()).unwrap();
        let link = to.path().join("overlays/common/etc/link");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(fs::symlink_metadata(to.path().join("recipes/alias.toml"))
            .unwrap()
            .is_file());
        // A root that leaves the project is refused.
        symlink(outside.path(), p.path().join("keys")).unwrap();
        let to = tempfile::tempdir().unwrap();
        let e = copy_project(p.path(), to.path()).unwrap_err();
        assert!(format!("{e:#}").contains("outside the project"), "{e:#}");
        assert!(!to.path().join("keys/shadow").exists());
    }
}
