//! Confinement: a project reads only inside itself. Every path a project names (a recipe's
//! `inherits`, `[k3s] registries`, manifests, chart values, sealed secrets, overlay roots, seed
//! templates, the files of `keys/`) goes through [`file`] or [`dir`], which resolve it after
//! symlinks and refuse it, with file, key and fix ([`RecipeError`], exit 2), unless it stays
//! inside the project root. A symlink whose target stays inside the project is followed; one
//! that leaves it is refused. Symlinks *inside* overlay trees are not followed at all: they go
//! into the image as symlinks (see `overlays::scan_overlays`).
//!
//! Why: kiln runs as root on build machines that build other people's recipes; a recipe that
//! could name `/etc/shadow` (or a symlink to it) would bake the build host's secrets into an
//! image served to a whole LAN.

use super::error::{RecipeError, Result};
use super::layout::Layout;
use std::fs;
use std::path::{Component, Path, PathBuf};

/// Who names a path: the file and key that hold it, and how to fix a bad one.
#[derive(Debug, Clone, Copy)]
pub struct NamedBy<'a> {
    pub file: &'a Path,
    pub key: &'a str,
    pub fix: &'a str,
}

impl NamedBy<'_> {
    fn refuse(&self, problem: String) -> RecipeError {
        RecipeError::new(self.file, self.key, problem, self.fix)
    }
}

/// Checks the spelling of a relative name a project file gives (`[k3s] registries =
/// "registries.yaml"`): not empty, not absolute, no `..` or `.` segment, no NUL.
pub fn relative_name(name: &str, by: NamedBy) -> Result<()> {
    let p = Path::new(name);
    let clean = !name.is_empty()
        && !name.contains('\0')
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && !name.ends_with('/');
    if !clean {
        return Err(by.refuse(format!(
            "{name:?} is not a plain relative path (no leading /, no . or .. segments)"
        )));
    }
    Ok(())
}

/// The project root after symlinks.
fn root(layout: &Layout, by: NamedBy) -> Result<PathBuf> {
    fs::canonicalize(layout.root()).map_err(|e| {
        by.refuse(format!(
            "cannot resolve the project root {}: {e}",
            layout.root().display()
        ))
    })
}

/// `path` (under the project root) after symlinks, if it exists; refused when it resolves
/// outside the root.
fn resolve(layout: &Layout, path: &Path, by: NamedBy) -> Result<Option<PathBuf>> {
    let root = root(layout, by)?;
    let real = match fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A dangling symlink is not "absent": say where it points.
            if let Ok(t) = fs::read_link(path) {
                return Err(by.refuse(format!(
                    "{} is a symlink to {} which does not exist",
                    path.display(),
                    t.display()
                )));
            }
            return Ok(None);
        }
        Err(e) => {
            return Err(by.refuse(format!("cannot resolve {}: {e}", path.display())));
        }
    };
    if !real.starts_with(&root) {
        return Err(by.refuse(format!(
            "{} resolves to {}, outside the project ({}); a project may only read inside itself",
            path.display(),
            real.display(),
            root.display()
        )));
    }
    Ok(Some(real))
}

/// The regular file at `path` (a path under the project root), after symlinks; refused when
/// it is missing, not a regular file, or outside the project.
pub fn file(layout: &Layout, path: &Path, by: NamedBy) -> Result<PathBuf> {
    optional_file(layout, path, by)?
        .ok_or_else(|| by.refuse(format!("{} does not exist", path.display())))
}

/// [`file`], but a missing file is `None`.
pub fn optional_file(layout: &Layout, path: &Path, by: NamedBy) -> Result<Option<PathBuf>> {
    let Some(real) = resolve(layout, path, by)? else {
        return Ok(None);
    };
    let meta = fs::metadata(&real)
        .map_err(|e| by.refuse(format!("cannot read {}: {e}", real.display())))?;
    if !meta.is_file() {
        return Err(by.refuse(format!(
            "{} is not a regular file (it is a {})",
            path.display(),
            crate::sys::util::file_kind(&meta)
        )));
    }
    Ok(Some(real))
}

/// `recipes/<name>` for a name a project file gives (`registries`, `manifests[i]`, …): the
/// spelling is checked, then the file is confined.
pub fn recipe_file(layout: &Layout, name: &str, by: NamedBy) -> Result<PathBuf> {
    relative_name(name, by)?;
    file(layout, &layout.recipe_file(name), by)
}

/// The directory at `path` (an overlay root: `overlays/<role>`, `overlays/seed/<host>`), after
/// symlinks, if it exists; refused when it is not a directory or resolves outside the project.
pub fn dir(layout: &Layout, path: &Path, by: NamedBy) -> Result<Option<PathBuf>> {
    let Some(real) = resolve(layout, path, by)? else {
        return Ok(None);
    };
    let meta = fs::metadata(&real)
        .map_err(|e| by.refuse(format!("cannot read {}: {e}", real.display())))?;
    if !meta.is_dir() {
        return Err(by.refuse(format!(
            "{} is not a directory (it is a {})",
            path.display(),
            crate::sys::util::file_kind(&meta)
        )));
    }
    Ok(Some(real))
}

/// Reads the confined file `path` (see [`file`]) as text of at most `max` bytes.
pub fn read_text(layout: &Layout, path: &Path, max: u64, by: NamedBy) -> Result<String> {
    let real = file(layout, path, by)?;
    read_real(&real, path, max, by)
}

/// Reads `real` (already confined) as UTF-8 text of at most `max` bytes.
pub fn read_real(real: &Path, shown: &Path, max: u64, by: NamedBy) -> Result<String> {
    let bytes = crate::sys::util::read_small(real, max, by.key)
        .map_err(|e| by.refuse(format!("cannot read {}: {e:#}", shown.display())))?;
    String::from_utf8(bytes)
        .map_err(|_| by.refuse(format!("{} is not UTF-8 text", shown.display())))
}

/// Reads `recipes/<name>`, a name the project's recipes gave (checked when they were loaded,
/// confined again here, where the bytes are read), as text of at most [`MAX_TEXT`] bytes.
/// `what` names the file in an error ("(manifest)", "(registries)").
pub fn recipe_text(layout: &Layout, name: &str, what: &str) -> Result<String> {
    let path = layout.recipe_file(name);
    let by = NamedBy {
        file: &path,
        key: what,
        fix: "keep the files recipes name inside the project, as UTF-8 text",
    };
    relative_name(name, by)?;
    read_text(layout, &path, MAX_TEXT, by)
}

/// `keys/<name>` (one of `layout::key`) after symlinks, `None` when absent; refused when it
/// is not a regular file or resolves outside the project (its contents go into images and
/// seeds: a link to a host file would publish that file).
pub fn key_file(layout: &Layout, name: &str) -> Result<Option<PathBuf>> {
    let path = layout.key(name);
    optional_file(
        layout,
        &path,
        NamedBy {
            file: &path,
            key: "(key file)",
            fix: "keep the project's keys in its keys/ directory (`kiln keys init`); a symlink there may point only inside the project",
        },
    )
}

/// Largest recipe-side text file kiln reads whole (manifests, values, sealed secrets).
pub const MAX_TEXT: u64 = 32 << 20;
/// Largest small input (a recipe, registries.yaml, a key file).
pub const MAX_SMALL: u64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn by() -> NamedBy<'static> {
        NamedBy {
            file: Path::new("recipes/cluster.toml"),
            key: "k3s.registries",
            fix: "give a path relative to recipes/",
        }
    }

    fn project() -> (tempfile::TempDir, Layout) {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir_all(d.path().join("recipes/sub")).unwrap();
        fs::write(d.path().join("recipes/sub/a.yaml"), "a: 1\n").unwrap();
        let l = Layout::new(d.path());
        (d, l)
    }

    #[test]
    fn names_must_be_plain_relative_paths() {
        for bad in ["", "/etc/shadow", "../x", "a/../../x", "./a", "a\0b", "a/"] {
            assert!(relative_name(bad, by()).is_err(), "{bad:?} accepted");
        }
        for good in ["a.yaml", "sub/a.yaml", "a..b.yaml"] {
            relative_name(good, by()).unwrap();
        }
    }

    #[test]
    fn symlinks_out_of_the_project_are_refused_and_inside_ones_followed() {
        let (d, l) = project();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "s").unwrap();
        symlink(
            outside.path().join("secret"),
            d.path().join("recipes/out.yaml"),
        )
        .unwrap();
        symlink("sub/a.yaml", d.path().join("recipes/in.yaml")).unwrap();
        symlink(outside.path(), d.path().join("recipes/outdir")).unwrap();
        symlink("nowhere", d.path().join("recipes/dangling.yaml")).unwrap();
        let e = recipe_file(&l, "out.yaml", by()).unwrap_err().to_string();
        assert!(
            e.contains("outside the project") && e.contains("k3s.registries"),
            "{e}"
        );
        let e = recipe_file(&l, "outdir/secret", by())
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the project"), "{e}");
        let e = recipe_file(&l, "dangling.yaml", by())
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        // A symlink loop is an error, not a hang.
        symlink("loop-b", d.path().join("recipes/loop-a")).unwrap();
        symlink("loop-a", d.path().join("recipes/loop-b")).unwrap();
        let e = recipe_file(&l, "loop-a", by()).unwrap_err().to_string();
        assert!(e.contains("cannot resolve"), "{e}");
        let p = recipe_file(&l, "in.yaml", by()).unwrap();
        assert!(p.ends_with("recipes/sub/a.yaml"), "{}", p.display());
        let e = recipe_file(&l, "sub", by()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert_eq!(
            dir(&l, &d.path().join("recipes/missing"), by()).unwrap(),
            None
        );
        assert!(dir(&l, &d.path().join("recipes/outdir"), by()).is_err());
        assert!(dir(&l, &d.path().join("recipes/in.yaml"), by()).is_err());
        assert!(dir(&l, &d.path().join("recipes/sub"), by())
            .unwrap()
            .is_some());
    }

    #[test]
    fn reads_are_bounded_and_regular_files_only() {
        let (d, l) = project();
        symlink("/dev/zero", d.path().join("recipes/zero")).unwrap();
        assert!(read_text(&l, &d.path().join("recipes/zero"), 10, by()).is_err());
        fs::write(d.path().join("recipes/big"), "x".repeat(11)).unwrap();
        let e = read_text(&l, &d.path().join("recipes/big"), 10, by())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bytes"), "{e}");
        assert_eq!(
            read_text(&l, &d.path().join("recipes/sub/a.yaml"), 10, by()).unwrap(),
            "a: 1\n"
        );
    }
}
