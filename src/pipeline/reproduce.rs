//! `kiln verify --rebuild <build-dir>`: rebuilds a role build from its recorded inputs with a
//! fresh cache (the base made again by mmdebstrap) in a temporary directory and compares every
//! artifact byte for byte. For a differing root (tar or squashfs) it prints a readable diff of
//! the two file lists (path, type, mode, uid:gid, size, sha256), read from `rootfs.tar.zst`.
//!
//! The project (`--dir`) must resolve the role to the recorded build id; otherwise the inputs
//! that differ are named and nothing is built (exit 2). Differences exit with status 3.

use crate::pipeline::build::{self, BuildOptions};
use crate::pipeline::resolve::{self, Resolved};
use crate::project::recipe::{self, RecipeError};
use crate::sys::util;
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// A rebuild that is not byte-for-byte identical to the original; `kiln` exits with status 3.
#[derive(Debug, thiserror::Error)]
#[error(
    "rebuild of {role} {build_id} is not identical: {} differ{} (see the table above; the \
     rebuild is kept in {})",
    .different.join(", "),
    if .different.len() == 1 { "s" } else { "" },
    .rebuilt.display()
)]
pub struct NotReproduced {
    pub role: String,
    pub build_id: String,
    pub different: Vec<String>,
    pub rebuilt: PathBuf,
}

/// What `kiln verify --rebuild` was asked to do.
#[derive(Debug, Clone)]
pub struct RebuildOptions {
    /// `out/<role>/<build-id>/` (or the `latest` link).
    pub build_dir: PathBuf,
    /// The project (`--dir`).
    pub project_dir: PathBuf,
    /// The existing cache whose artifacts may be copied (after a sha256 check) instead of
    /// downloaded again; its bases are never used.
    pub cache_dir: PathBuf,
    /// Where to rebuild (kept); default: a temp dir under `$TMPDIR`, removed unless different.
    pub work_dir: Option<PathBuf>,
    /// Download nothing: pinned artifacts must be in `cache_dir` (the base is still made by
    /// mmdebstrap, which needs the Debian mirror).
    pub offline: bool,
}

/// One artifact compared.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ArtifactCompare {
    pub name: String,
    /// `same`, `different`, `missing` (only in the original) or `extra` (only in the rebuild).
    pub result: String,
    pub original_size: Option<u64>,
    pub rebuilt_size: Option<u64>,
    pub original_sha256: Option<String>,
    pub rebuilt_sha256: Option<String>,
    /// Offset of the first differing byte.
    pub first_difference: Option<u64>,
}

/// One entry of a root file list.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileEntry {
    /// `file`, `dir`, `symlink`, `hardlink`, `char`, `block`, `fifo`.
    pub kind: String,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    /// sha256 of the content (files), or the link target (links).
    pub content: String,
}

impl FileEntry {
    fn describe(&self) -> String {
        format!(
            "{} {:04o} {}:{} {} {}",
            self.kind, self.mode, self.uid, self.gid, self.size, self.content
        )
    }
}

/// A difference between two file lists.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FileDiff {
    pub path: String,
    /// `only-original`, `only-rebuilt` or `changed`.
    pub change: String,
    pub original: Option<FileEntry>,
    pub rebuilt: Option<FileEntry>,
    /// For `changed`: the fields that differ (`kind`, `mode`, `owner`, `size`, `content`).
    pub fields: Vec<String>,
}

impl FileDiff {
    /// One readable line: `- path …`, `+ path …`, or `~ path: mode 0644 → 0755, …`.
    pub fn line(&self) -> String {
        match (&self.original, &self.rebuilt) {
            (Some(a), None) => format!("- /{}  {}", self.path, a.describe()),
            (None, Some(b)) => format!("+ /{}  {}", self.path, b.describe()),
            (Some(a), Some(b)) => {
                let parts: Vec<String> = self
                    .fields
                    .iter()
                    .map(|f| match f.as_str() {
                        "kind" => format!("type {} → {}", a.kind, b.kind),
                        "mode" => format!("mode {:04o} → {:04o}", a.mode, b.mode),
                        "owner" => format!("owner {}:{} → {}:{}", a.uid, a.gid, b.uid, b.gid),
                        "size" => format!("size {} → {}", a.size, b.size),
                        _ => format!("{} {} → {}", content_label(a), a.content, b.content),
                    })
                    .collect();
                format!("~ /{}  {}", self.path, parts.join(", "))
            }
            (None, None) => format!("? /{}", self.path),
        }
    }
}

fn content_label(e: &FileEntry) -> &'static str {
    match e.kind.as_str() {
        "symlink" | "hardlink" => "target",
        _ => "sha256",
    }
}

/// Everything `kiln verify --rebuild` found.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildReport {
    pub role: String,
    pub build_id: String,
    pub original: PathBuf,
    pub rebuilt: PathBuf,
    /// Where the pinned artifacts of the rebuild came from (name → how).
    pub artifacts_source: BTreeMap<String, String>,
    /// Seconds per stage of the rebuild.
    pub timings: Vec<(String, f64)>,
    pub seconds: f64,
    pub artifacts: Vec<ArtifactCompare>,
    /// Differences between the root file lists (from `rootfs.tar.zst`), when a root artifact
    /// differs.
    pub file_list_diff: Option<Vec<FileDiff>>,
    /// Lines only in one side of differing small text artifacts (`-` original, `+` rebuild).
    pub text_diffs: BTreeMap<String, Vec<String>>,
    /// True when every artifact is byte-for-byte identical.
    pub identical: bool,
}

/// Compares the recorded inputs (`manifest.json` → `inputs`) with what the project resolves
/// to now; returns `path: recorded → now` lines for every differing JSON leaf.
pub fn input_differences(recorded: &Value, now: &Value) -> Vec<String> {
    let mut out = Vec::new();
    json_diff("", recorded, now, &mut out);
    out
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 100 {
        format!("{}…", s.chars().take(100).collect::<String>())
    } else {
        s
    }
}

fn json_diff(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => json_diff(&join(k), va, vb, out),
                    (Some(va), None) => out.push(format!("{}: {} → (absent)", join(k), short(va))),
                    (None, Some(vb)) => out.push(format!("{}: (absent) → {}", join(k), short(vb))),
                    (None, None) => {}
                }
            }
        }
        // Overlay lists: compare by image path so one added file is one line.
        (Value::Array(x), Value::Array(y))
            if x.iter()
                .chain(y.iter())
                .all(|v| v.get("image_path").is_some()) =>
        {
            let index = |v: &Vec<Value>| -> BTreeMap<String, Value> {
                v.iter()
                    .map(|e| {
                        (
                            e["image_path"].as_str().unwrap_or("").to_string(),
                            e.clone(),
                        )
                    })
                    .collect()
            };
            let (ix, iy) = (index(x), index(y));
            let keys: BTreeSet<&String> = ix.keys().chain(iy.keys()).collect();
            for k in keys {
                let p = format!("{path}[/{k}]");
                match (ix.get(k), iy.get(k)) {
                    (Some(va), Some(vb)) => json_diff(&p, va, vb, out),
                    (Some(_), None) => out.push(format!("{p}: present → (absent)")),
                    (None, Some(_)) => out.push(format!("{p}: (absent) → present")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                json_diff(&format!("{path}[{i}]"), va, vb, out);
            }
        }
        _ if a != b => out.push(format!("{path}: {} → {}", short(a), short(b))),
        _ => {}
    }
}

/// Reads a `rootfs.tar.zst` into a file list keyed by path (without `./` and trailing `/`).
pub fn file_list(tar_zst: &Path) -> Result<BTreeMap<String, FileEntry>> {
    let f = fs::File::open(tar_zst).with_context(|| format!("opening {}", tar_zst.display()))?;
    let dec = zstd::stream::Decoder::new(f)
        .with_context(|| format!("reading {} (zstd)", tar_zst.display()))?;
    let mut ar = tar::Archive::new(dec);
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 1 << 20];
    for e in ar
        .entries()
        .with_context(|| format!("reading {}", tar_zst.display()))?
    {
        let mut e = e.with_context(|| format!("reading {}", tar_zst.display()))?;
        let path = e.path()?.to_string_lossy().into_owned();
        let key = path
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let h = e.header();
        let (mode, uid, gid) = (h.mode()? & 0o7777, h.uid()?, h.gid()?);
        let et = h.entry_type();
        let (kind, content) = match et {
            tar::EntryType::Directory => ("dir", String::new()),
            tar::EntryType::Symlink | tar::EntryType::Link => (
                if et == tar::EntryType::Symlink {
                    "symlink"
                } else {
                    "hardlink"
                },
                e.link_name()?
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            tar::EntryType::Char => ("char", String::new()),
            tar::EntryType::Block => ("block", String::new()),
            tar::EntryType::Fifo => ("fifo", String::new()),
            _ => {
                let mut hasher = Sha256::new();
                loop {
                    let n = e
                        .read(&mut buf)
                        .with_context(|| format!("reading /{key} in {}", tar_zst.display()))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                }
                ("file", hex::encode(hasher.finalize()))
            }
        };
        let size = if kind == "file" { e.size() } else { 0 };
        out.insert(
            key,
            FileEntry {
                kind: kind.into(),
                mode,
                uid,
                gid,
                size,
                content,
            },
        );
    }
    Ok(out)
}

/// Differences between two file lists, sorted by path.
pub fn diff_file_lists(
    a: &BTreeMap<String, FileEntry>,
    b: &BTreeMap<String, FileEntry>,
) -> Vec<FileDiff> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => {
                let mut fields = Vec::new();
                if x.kind != y.kind {
                    fields.push("kind".to_string());
                }
                if x.mode != y.mode {
                    fields.push("mode".into());
                }
                if (x.uid, x.gid) != (y.uid, y.gid) {
                    fields.push("owner".into());
                }
                if x.size != y.size {
                    fields.push("size".into());
                }
                if x.content != y.content {
                    fields.push("content".into());
                }
                out.push(FileDiff {
                    path: k.clone(),
                    change: "changed".into(),
                    original: Some(x.clone()),
                    rebuilt: Some(y.clone()),
                    fields,
                });
            }
            (Some(x), None) => out.push(FileDiff {
                path: k.clone(),
                change: "only-original".into(),
                original: Some(x.clone()),
                rebuilt: None,
                fields: vec![],
            }),
            (None, Some(y)) => out.push(FileDiff {
                path: k.clone(),
                change: "only-rebuilt".into(),
                original: None,
                rebuilt: Some(y.clone()),
                fields: vec![],
            }),
            (None, None) => {}
        }
    }
    out
}

/// Compares two files byte for byte (streamed), returning both sha256s and the offset of the
/// first difference (None when identical).
pub fn compare_files(a: &Path, b: &Path) -> Result<(String, String, Option<u64>)> {
    let mut fa = fs::File::open(a).with_context(|| format!("opening {}", a.display()))?;
    let mut fb = fs::File::open(b).with_context(|| format!("opening {}", b.display()))?;
    let (mut ha, mut hb) = (Sha256::new(), Sha256::new());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut pos = 0u64;
    let mut first = None;
    loop {
        let na = read_full(&mut fa, &mut ba).with_context(|| format!("reading {}", a.display()))?;
        let nb = read_full(&mut fb, &mut bb).with_context(|| format!("reading {}", b.display()))?;
        ha.update(&ba[..na]);
        hb.update(&bb[..nb]);
        if first.is_none() {
            let n = na.min(nb);
            if let Some(i) = (0..n).find(|&i| ba[i] != bb[i]) {
                first = Some(pos + i as u64);
            } else if na != nb {
                first = Some(pos + n as u64);
            }
        }
        if na == 0 && nb == 0 {
            break;
        }
        pos += na.max(nb) as u64;
    }
    Ok((
        hex::encode(ha.finalize()),
        hex::encode(hb.finalize()),
        first,
    ))
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Regular files directly in `dir`, sorted.
fn artifact_names(dir: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for e in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        if e.file_type()?.is_file() {
            out.insert(e.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

/// Compares every artifact of two build directories.
pub fn compare_dirs(original: &Path, rebuilt: &Path) -> Result<Vec<ArtifactCompare>> {
    let (na, nb) = (artifact_names(original)?, artifact_names(rebuilt)?);
    let names: BTreeSet<&String> = na.iter().chain(nb.iter()).collect();
    let mut out = Vec::new();
    for n in names {
        let (pa, pb) = (original.join(n), rebuilt.join(n));
        let size = |p: &Path| fs::metadata(p).ok().map(|m| m.len());
        let mut c = ArtifactCompare {
            name: n.clone(),
            result: String::new(),
            original_size: size(&pa),
            rebuilt_size: size(&pb),
            original_sha256: None,
            rebuilt_sha256: None,
            first_difference: None,
        };
        match (na.contains(n), nb.contains(n)) {
            (true, true) => {
                let (sa, sb, first) = compare_files(&pa, &pb)?;
                c.result = if first.is_none() { "same" } else { "different" }.into();
                c.original_sha256 = Some(sa);
                c.rebuilt_sha256 = Some(sb);
                c.first_difference = first;
            }
            (true, false) => {
                c.result = "missing".into();
                c.original_sha256 = Some(util::sha256_file(&pa)?.0);
            }
            _ => {
                c.result = "extra".into();
                c.rebuilt_sha256 = Some(util::sha256_file(&pb)?.0);
            }
        }
        out.push(c);
    }
    Ok(out)
}

/// Lines only in `a` (`- …`) or only in `b` (`+ …`), in file order.
pub fn line_diff(a: &str, b: &str) -> Vec<String> {
    let (sa, sb): (BTreeSet<&str>, BTreeSet<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out: Vec<String> = a
        .lines()
        .filter(|l| !sb.contains(l))
        .map(|l| format!("- {l}"))
        .collect();
    out.extend(
        b.lines()
            .filter(|l| !sa.contains(l))
            .map(|l| format!("+ {l}")),
    );
    out
}

/// Text artifacts whose line differences are shown.
const TEXT_ARTIFACTS: &[&str] = &["packages.txt", "SHA256SUMS"];

/// Checks that `project_dir` resolves `role` to `build_id`; otherwise a user error naming the
/// inputs that differ and how to get the matching ones.
pub fn check_inputs(
    manifest: &Value,
    manifest_path: &Path,
    project_dir: &Path,
    resolved: &Resolved,
) -> Result<()> {
    let recorded = manifest["build_id"].as_str().unwrap_or_default();
    if resolved.build_id.as_str() == recorded {
        return Ok(());
    }
    let now = serde_json::to_value(resolved)?;
    let mut diffs = input_differences(&manifest["inputs"], &now);
    if diffs.is_empty() {
        diffs.push(
            "(no recorded input differs: the build id schema or kiln version changed)".into(),
        );
    }
    let shown: Vec<String> = diffs.iter().take(20).map(|d| format!("    {d}")).collect();
    let more = if diffs.len() > 20 {
        format!("\n    … and {} more", diffs.len() - 20)
    } else {
        String::new()
    };
    Err(RecipeError::new(
        manifest_path,
        "inputs",
        format!(
            "this build ({recorded}) was made from other inputs than the project in {} resolves \
             role {} to now ({}); recorded → now:\n{}{more}",
            project_dir.display(),
            resolved.role,
            resolved.build_id,
            shown.join("\n")
        ),
        "check out the commit that made this build (e.g. `git log -- recipes overlays`; the \
         manifest's inputs list every file's sha256) with the same keys/ and kiln version, \
         then run `kiln verify --rebuild` again",
    )
    .into())
}

/// Copies a pinned artifact from the old cache into the fresh one if its sha256 matches the pin
/// (hashed while copying); returns whether it did.
fn seed_artifact(old_cache: &Path, new_cache: &Path, sha256: &str) -> Result<bool> {
    let src = crate::project::layout::Cache::new(old_cache).artifact(sha256);
    if crate::pipeline::fetch::validate_sha256(sha256).is_err() || !src.is_file() {
        return Ok(false);
    }
    let dir = crate::project::layout::Cache::new(new_cache).artifacts();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".partial-{sha256}"));
    let mut r = fs::File::open(&src).with_context(|| format!("opening {}", src.display()))?;
    let mut w = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r
            .read(&mut buf)
            .with_context(|| format!("reading {}", src.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        w.write_all(&buf[..n])
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    if hex::encode(h.finalize()) != sha256 {
        fs::remove_file(&tmp).ok();
        tracing::warn!(
            "{} does not match its name; it will be fetched",
            src.display()
        );
        return Ok(false);
    }
    w.sync_all()?;
    fs::rename(&tmp, dir.join(sha256))
        .with_context(|| format!("moving {} into place", tmp.display()))?;
    Ok(true)
}

/// Rebuilds the role build in `opts.build_dir` and compares it with the original. Returns the
/// report; differences are reported in it (the command turns them into [`NotReproduced`]).
pub fn rebuild(opts: &RebuildOptions) -> Result<(RebuildReport, Option<tempfile::TempDir>)> {
    let original = fs::canonicalize(&opts.build_dir)
        .with_context(|| format!("opening the build directory {}", opts.build_dir.display()))?;
    let manifest_path = original.join("manifest.json");
    let manifest: Value = serde_json::from_slice(
        &util::read_small(&manifest_path, crate::trust::limits::MANIFEST, "manifest")
            .with_context(|| {
                format!(
                    "reading {} (is {} a role build directory, out/<role>/<build-id>/?)",
                    manifest_path.display(),
                    opts.build_dir.display()
                )
            })?,
    )
    .with_context(|| format!("parsing {}", manifest_path.display()))?;
    let role = manifest["role"]
        .as_str()
        .with_context(|| format!("{}: no role", manifest_path.display()))?
        .to_string();
    let build_id = manifest["build_id"]
        .as_str()
        .with_context(|| format!("{}: no build_id", manifest_path.display()))?
        .to_string();

    // The project must resolve the role to the recorded build id.
    let project = recipe::load_project(&opts.project_dir)?;
    let resolved = resolve::resolve(&project, &role)?;
    check_inputs(&manifest, &manifest_path, &opts.project_dir, &resolved)?;

    // A private copy of the project and a fresh cache.
    let (tmp, work) = match &opts.work_dir {
        Some(d) => {
            if d.exists() && fs::read_dir(d)?.next().is_some() {
                anyhow::bail!(
                    "--work-dir {} is not empty; give a new or empty directory",
                    d.display()
                );
            }
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            (None, fs::canonicalize(d)?)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("kiln-rebuild-")
                .tempdir()
                .context("creating a temp dir for the rebuild (set TMPDIR or --work-dir)")?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let proj_copy = work.join("project");
    crate::project::copy::copy_project(&opts.project_dir, &proj_copy)?;
    let cache = work.join("cache");
    let out = work.join("out");
    let project2 = recipe::load_project(&proj_copy)?;
    let resolved2 = resolve::resolve(&project2, &role)?;
    anyhow::ensure!(
        resolved2.build_id.as_str() == build_id,
        "the project copy in {} resolves to {}, not {build_id}",
        proj_copy.display(),
        resolved2.build_id
    );
    let mut artifacts_source = BTreeMap::new();
    for (name, sha, url) in crate::pipeline::fetch::pinned_artifacts(&resolved2) {
        let how = if seed_artifact(&opts.cache_dir, &cache, &sha)? {
            format!(
                "copied from {} (sha256 checked)",
                crate::project::layout::Cache::new(&opts.cache_dir)
                    .artifact(&sha)
                    .display()
            )
        } else {
            format!("fetched from {url}")
        };
        artifacts_source.insert(name, how);
    }

    let started = Instant::now();
    let rep = build::build_role(
        &project2,
        &resolved2,
        &BuildOptions {
            out_dir: out.clone(),
            cache_dir: cache,
            force: true,
            offline: opts.offline,
            locked: false,
        },
    )
    .with_context(|| format!("rebuilding {role} {build_id} in {}", work.display()))?;
    let seconds = (started.elapsed().as_secs_f64() * 10.0).round() / 10.0;

    let artifacts = compare_dirs(&original, &rep.dir)?;
    let differs = |n: &str| artifacts.iter().any(|a| a.name == n && a.result != "same");
    let file_list_diff = if differs("rootfs.tar.zst") || differs("root.squashfs") {
        let (a, b) = (
            original.join("rootfs.tar.zst"),
            rep.dir.join("rootfs.tar.zst"),
        );
        if a.is_file() && b.is_file() {
            Some(diff_file_lists(&file_list(&a)?, &file_list(&b)?))
        } else {
            None
        }
    } else {
        None
    };
    let mut text_diffs = BTreeMap::new();
    for n in TEXT_ARTIFACTS {
        if differs(n) {
            let (a, b) = (original.join(n), rep.dir.join(n));
            if let (Ok(x), Ok(y)) = (fs::read_to_string(&a), fs::read_to_string(&b)) {
                text_diffs.insert(n.to_string(), line_diff(&x, &y));
            }
        }
    }
    let identical = artifacts.iter().all(|a| a.result == "same");
    Ok((
        RebuildReport {
            role,
            build_id,
            original,
            rebuilt: rep.dir,
            artifacts_source,
            timings: rep.timings,
            seconds,
            artifacts,
            file_list_diff,
            text_diffs,
            identical,
        },
        tmp,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, mode: u32, size: u64, content: &str) -> FileEntry {
        FileEntry {
            kind: kind.into(),
            mode,
            uid: 0,
            gid: 0,
            size,
            content: content.into(),
        }
    }

    /// Writes a tar.zst with the given (path, mode, uid, data) files plus a symlink.
    fn write_tar_zst(path: &Path, files: &[(&str, u32, u64, &[u8])], link: &str) {
        let f = fs::File::create(path).unwrap();
        let enc = zstd::stream::Encoder::new(f, 3).unwrap().auto_finish();
        let mut b = tar::Builder::new(enc);
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        b.append_data(&mut h, "./etc/", std::io::empty()).unwrap();
        for (p, mode, uid, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(*mode);
            h.set_uid(*uid);
            h.set_gid(*uid);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, p, *data).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        b.append_link(&mut h, "./etc/link", link).unwrap();
        b.into_inner().unwrap();
    }

    #[test]
    fn file_list_diff_names_every_change() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a.tar.zst"), d.path().join("b.tar.zst"));
        write_tar_zst(
            &a,
            &[
                ("./etc/same", 0o644, 0, b"x"),
                ("./etc/content", 0o644, 0, b"one"),
                ("./etc/mode", 0o644, 0, b"m"),
                ("./etc/owner", 0o644, 0, b"o"),
                ("./etc/gone", 0o644, 0, b"g"),
            ],
            "same",
        );
        write_tar_zst(
            &b,
            &[
                ("./etc/same", 0o644, 0, b"x"),
                ("./etc/content", 0o644, 0, b"two!"),
                ("./etc/mode", 0o755, 0, b"m"),
                ("./etc/owner", 0o644, 101, b"o"),
                ("./etc/new", 0o600, 0, b"n"),
            ],
            "other",
        );
        let (la, lb) = (file_list(&a).unwrap(), file_list(&b).unwrap());
        assert_eq!(la["etc"], entry("dir", 0o755, 0, ""));
        assert_eq!(
            la["etc/same"],
            entry("file", 0o644, 1, &util::sha256_hex(b"x"))
        );
        assert_eq!(la["etc/link"], entry("symlink", 0o777, 0, "same"));
        assert!(diff_file_lists(&la, &la).is_empty());
        let d = diff_file_lists(&la, &lb);
        let lines: Vec<String> = d.iter().map(|f| f.line()).collect();
        assert_eq!(
            lines,
            vec![
                format!(
                    "~ /etc/content  size 3 → 4, sha256 {} → {}",
                    util::sha256_hex(b"one"),
                    util::sha256_hex(b"two!")
                ),
                format!("- /etc/gone  file 0644 0:0 1 {}", util::sha256_hex(b"g")),
                "~ /etc/link  target same → other".to_string(),
                "~ /etc/mode  mode 0644 → 0755".to_string(),
                format!("+ /etc/new  file 0600 0:0 1 {}", util::sha256_hex(b"n")),
                "~ /etc/owner  owner 0:0 → 101:101".to_string(),
            ]
        );
        assert_eq!(d[0].fields, vec!["size", "content"]);
        assert_eq!(d[1].change, "only-original");
        assert_eq!(d[4].change, "only-rebuilt");
    }

    #[test]
    fn compare_files_finds_the_first_difference() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
        let mut data = vec![7u8; 3 << 20];
        fs::write(&a, &data).unwrap();
        fs::write(&c, &data[..(2 << 20) + 5]).unwrap();
        data[(1 << 20) + 17] = 8;
        fs::write(&b, &data).unwrap();
        let (sa, sa2, first) = compare_files(&a, &a).unwrap();
        assert_eq!((sa.clone(), first), (sa2, None));
        let (_, _, first) = compare_files(&a, &b).unwrap();
        assert_eq!(first, Some((1 << 20) + 17));
        let (_, sc, first) = compare_files(&a, &c).unwrap();
        assert_eq!(first, Some((2 << 20) + 5));
        assert_eq!(sc, util::sha256_file(&c).unwrap().0);
    }

    #[test]
    fn input_differences_are_named_by_path() {
        let a = serde_json::json!({
            "recipe": {"debian": {"packages": ["a", "b"]}},
            "overlays": [
                {"image_path": "etc/x", "sha256": "11"},
                {"image_path": "etc/y", "sha256": "22"}
            ],
            "kiln_version": "0.1.0"
        });
        let b = serde_json::json!({
            "recipe": {"debian": {"packages": ["a", "c"]}},
            "overlays": [
                {"image_path": "etc/x", "sha256": "33"},
                {"image_path": "etc/z", "sha256": "44"}
            ],
            "kiln_version": "0.1.0"
        });
        assert_eq!(
            input_differences(&a, &b),
            vec![
                "overlays[/etc/x].sha256: \"11\" → \"33\"",
                "overlays[/etc/y]: present → (absent)",
                "overlays[/etc/z]: (absent) → present",
                "recipe.debian.packages[1]: \"b\" → \"c\"",
            ]
        );
        assert!(input_differences(&a, &a).is_empty());
    }

    #[test]
    fn line_diff_shows_moved_package_versions() {
        let a = "libc6 2.36-9 amd64\nsystemd 252.1 amd64\n";
        let b = "libc6 2.36-9 amd64\nsystemd 252.2 amd64\n";
        assert_eq!(
            line_diff(a, b),
            vec!["- systemd 252.1 amd64", "+ systemd 252.2 amd64"]
        );
    }
}
