//! Fault tests and the reproducibility check, on real builds of the worker role:
//!
//! - `kiln build` killed with SIGKILL at every stage (a test hook, `KILN_TEST_PAUSE_AT=<stage>`,
//!   makes kiln print `kiln: paused at <stage>` and wait) leaves `out/` consistent: no partial
//!   build under `out/worker/<id>` or `out/nodes`, `latest` on a complete build or absent, and
//!   the next build succeeds and is identical;
//! - corrupted cache entries (a pinned artifact, a base tarball) are detected, removed and
//!   fetched again — or, with `--offline`, a clear error;
//! - a full disk during emit (a small tmpfs as `--out`, root only) is a clear error and leaves
//!   nothing half-written;
//! - `kiln verify --rebuild` rebuilds the worker from its recorded inputs with a fresh cache and
//!   finds every artifact identical; a project that moved on is refused naming the input.
//!
//! Like tests/slow_build.rs they need root, mmdebstrap, tar2sqfs and qemu-img (else `SKIP:`),
//! and share the cached bases in `target/kiln-test-cache/` (KILN_TEST_CACHE).

mod common;
use common::*;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The stand-in k3s served over HTTP by this process (base URL, request counter).
fn server() -> &'static (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    static S: OnceLock<(String, std::sync::Arc<std::sync::atomic::AtomicUsize>)> = OnceLock::new();
    S.get_or_init(|| serve(standin_files()))
}

fn hits() -> usize {
    server().1.load(std::sync::atomic::Ordering::SeqCst)
}

/// A fresh directory under target/ for one test (replaced each run, kept after a failure).
fn test_root(name: &str) -> PathBuf {
    let root = repo_root().join("target/kiln-fault-out").join(name);
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root).unwrap();
    remove_on_success(&root);
    root
}

/// A project copy whose k3s pins point at the stand-in server.
fn project(root: &Path) -> PathBuf {
    let p = root.join("project");
    populate(&p);
    pin_standin(&p, &server().0);
    p
}

fn build_cmd(project: &Path, out: &Path, cache: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.arg("--dir")
        .arg(project)
        .arg("--out")
        .arg(out)
        .args(["build", "--role", "worker", "--cache-dir"])
        .arg(cache)
        .args(args)
        .env_remove("KILN_OUT")
        .env_remove("KILN_CACHE")
        .env_remove("KILN_DIR")
        .env_remove("KILN_TEST_PAUSE_AT");
    c
}

fn build(project: &Path, out: &Path, cache: &Path, args: &[&str]) -> std::process::Output {
    build_cmd(project, out, cache, args).output().unwrap()
}

/// Starts a build that pauses at `stage`, waits for its `kiln: paused at` line and kills it
/// with SIGKILL. Panics if the build ends without reaching the stage.
fn kill_at(project: &Path, out: &Path, cache: &Path, stage: &str, args: &[&str]) -> String {
    let mut child = build_cmd(project, out, cache, args)
        .env("KILN_TEST_PAUSE_AT", stage)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = String::new();
    let r = BufReader::new(child.stderr.take().unwrap());
    let mut paused = false;
    for line in r.lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with(&format!("kiln: paused at {stage} ")) {
            paused = true;
            break;
        }
    }
    // SIGKILL: no destructor, no cleanup — as if the machine lost the process.
    child.kill().unwrap();
    let st = child.wait().unwrap();
    assert!(
        paused,
        "the build never reached stage {stage} ({st}):\n{seen}"
    );
    seen
}

/// Makes sure the shared cache holds the worker's base (cheap when it does: the build is
/// killed as soon as the base stage is done).
fn ensure_shared_base() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let root = test_root("warm-base");
        let p = project(&root);
        kill_at(&p, &root.join("out"), &shared_cache(), "compose", &[]);
    });
}

/// Directory entries (names) of `dir`, sorted; empty when absent.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// `kiln verify` of a directory.
fn verifies(project: &Path, dir: &Path) -> bool {
    kiln(project, &["verify", dir.to_str().unwrap()])
        .status
        .success()
}

/// The invariant after any kill: every visible build is complete and signed, `latest` and the
/// node links point at complete builds or are absent; staging leftovers are hidden (`.tmp-*`).
fn assert_consistent(project: &Path, out: &Path, when: &str) -> Option<String> {
    let role_dir = out.join("worker");
    for n in names(&role_dir) {
        if n.starts_with(".tmp-") || n == "latest" {
            continue;
        }
        assert!(
            verifies(project, &role_dir.join(&n)),
            "{when}: out/worker/{n} is visible but not a complete, signed build"
        );
    }
    let latest = fs::read_link(role_dir.join("latest")).ok().map(|t| {
        let t = t.to_string_lossy().into_owned();
        assert!(
            verifies(project, &role_dir.join(&t)),
            "{when}: latest points at {t}, which is not a complete build"
        );
        t
    });
    let nodes = out.join("nodes");
    for n in names(&nodes) {
        let p = nodes.join(&n);
        if n == "by-id" || n.starts_with(".tmp-") {
            continue;
        }
        assert!(
            p.join("SHA256SUMS.sig").is_file() && verifies(project, &p),
            "{when}: out/nodes/{n} does not point at a complete node build"
        );
    }
    for n in names(&nodes.join("by-id")) {
        if n.starts_with(".tmp-") {
            continue;
        }
        assert!(
            verifies(project, &nodes.join("by-id").join(&n)),
            "{when}: out/nodes/by-id/{n} is visible but incomplete"
        );
    }
    latest
}

fn no_leftovers(out: &Path) {
    for d in [out.join("worker"), out.join("nodes/by-id")] {
        let tmp: Vec<String> = names(&d)
            .into_iter()
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert!(tmp.is_empty(), "{}: leftovers {tmp:?}", d.display());
    }
}

#[test]
fn slow_fault_kill9_at_every_stage() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_fault_kill9_at_every_stage", &r);
    }
    ensure_shared_base();
    let root = test_root("kill9");
    let p = project(&root);
    let out = root.join("out");
    let cache = shared_cache();

    // No build yet: a kill anywhere leaves nothing visible (or, from `latest` on, the complete
    // build without a link to it).
    for stage in [
        "fetch",
        "base",
        "compose",
        "rootfs.tar.zst",
        "root.squashfs",
        "disk.raw",
        "sign",
        "publish",
    ] {
        kill_at(&p, &out, &cache, stage, &[]);
        let latest = assert_consistent(&p, &out, &format!("killed at {stage}"));
        assert_eq!(latest, None, "killed at {stage}: latest must not exist yet");
        let visible: Vec<String> = names(&out.join("worker"))
            .into_iter()
            .filter(|n| !n.starts_with(".tmp-"))
            .collect();
        assert!(
            visible.is_empty(),
            "killed at {stage}: {visible:?} visible in out/worker"
        );
    }
    // Between publishing and moving `latest`: the build is complete, `latest` not there yet.
    kill_at(&p, &out, &cache, "latest", &[]);
    assert_eq!(assert_consistent(&p, &out, "killed at latest"), None);
    // The next build finds the complete build, links it and dies making node outputs.
    kill_at(&p, &out, &cache, "nodes", &[]);
    let id = assert_consistent(&p, &out, "killed at nodes").expect("latest set");
    // The next build succeeds; it is the reference.
    let o = build(&p, &out, &cache, &[]);
    assert!(o.status.success(), "build after kills:\n{}", stderr(&o));
    no_leftovers(&out);
    let reference = fs::read_to_string(out.join("worker").join(&id).join("SHA256SUMS")).unwrap();
    let nodes_ref = names(&out.join("nodes/by-id"));
    assert_eq!(nodes_ref.len(), 2, "{nodes_ref:?}");

    // A forced rebuild killed anywhere keeps the complete previous build in place.
    for stage in ["compose", "publish", "nodes"] {
        kill_at(&p, &out, &cache, stage, &["--force"]);
        let latest = assert_consistent(&p, &out, &format!("--force killed at {stage}"));
        assert_eq!(latest.as_deref(), Some(id.as_str()));
        assert_eq!(
            fs::read_to_string(out.join("worker").join(&id).join("SHA256SUMS")).unwrap(),
            reference
        );
    }
    let o = build(&p, &out, &cache, &["--force"]);
    assert!(
        o.status.success(),
        "forced build after kills:\n{}",
        stderr(&o)
    );
    no_leftovers(&out);
    assert_eq!(
        fs::read_to_string(out.join("worker").join(&id).join("SHA256SUMS")).unwrap(),
        reference,
        "the build after the kills differs from the reference"
    );
    assert_eq!(names(&out.join("nodes/by-id")), nodes_ref);
    assert!(verifies(&p, &out.join("nodes/worker-1")));
}

/// Flips one byte in the middle of `path`, replacing the file (a hard link to it elsewhere
/// keeps the good content).
fn corrupt(path: &Path) {
    let mut b = fs::read(path).unwrap();
    let i = b.len() / 2;
    b[i] ^= 0x55;
    let tmp = path.with_extension("corrupting");
    fs::write(&tmp, &b).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Links the shared cache's bases into `cache/base/` (hard links: no copy, and [`corrupt`]
/// replaces files instead of writing through the link).
fn link_bases(cache: &Path) {
    let from = shared_cache().join("base");
    for n in names(&from) {
        let src = from.join(&n);
        if n.starts_with('.') || !src.join("rootfs.tar.sha256").is_file() {
            continue;
        }
        let dst = cache.join("base").join(&n);
        fs::create_dir_all(&dst).unwrap();
        for f in names(&src) {
            fs::hard_link(src.join(&f), dst.join(&f)).unwrap();
        }
    }
}

/// The base of `cache` built for project `p`'s worker: the one whose spec.json is the worker's
/// base spec (a cache holds a base per package set).
fn worker_base(p: &Path, cache: &Path) -> Option<PathBuf> {
    let o = kiln(p, &["inspect", "--role", "worker", "--json"]);
    let spec =
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["inputs"]["base"].clone();
    names(&cache.join("base"))
        .into_iter()
        .map(|n| cache.join("base").join(n))
        .find(|d| {
            fs::read(d.join("spec.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|v| v == spec)
                && d.join("rootfs.tar").is_file()
        })
}

#[test]
fn slow_fault_corrupt_cache_entries() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_fault_corrupt_cache_entries", &r);
    }
    ensure_shared_base();
    let root = test_root("corrupt");
    let p = project(&root);
    let out = root.join("out");
    let cache = root.join("cache");
    link_bases(&cache);
    let k3s = cache.join("sha256").join(sha256_hex(&standin_files()[0].1));

    // Fill the artifact cache from the server (stop once the fetch stage is done).
    let before = hits();
    kill_at(&p, &out, &cache, "base", &[]);
    assert!(hits() >= before + 2, "the stand-ins were downloaded");
    assert!(k3s.is_file());

    // A flipped byte in a cached artifact: detected, removed and downloaded again.
    corrupt(&k3s);
    let before = hits();
    let log = kill_at(&p, &out, &cache, "base", &["-v"]);
    assert!(log.contains("corrupt"), "no corruption warning:\n{log}");
    assert!(hits() > before, "the corrupt entry is fetched again");
    assert_eq!(
        sha256_hex(&fs::read(&k3s).unwrap()),
        sha256_hex(&standin_files()[0].1)
    );

    // Offline, the same corruption is a clear error and the bad entry is gone.
    corrupt(&k3s);
    let o = build(&p, &out, &cache, &["--offline"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("corrupt") && e.contains("--offline") && e.contains(&*k3s.to_string_lossy()),
        "{e}"
    );
    assert!(!k3s.exists(), "the corrupt entry must be removed");

    // A damaged base tarball: detected by its recorded sha256 before use.
    let o = build(&p, &out, &cache, &[]); // refetch k3s; full build with the linked base
    assert!(o.status.success(), "{}", stderr(&o));
    // The worker's base (the cache also holds the storage and gpu bases).
    let base = worker_base(&p, &cache).expect("the worker's base in the cache");
    corrupt(&base.join("rootfs.tar"));
    let o = build(&p, &out, &cache, &["--offline", "--force"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("corrupt") && e.contains("--offline") && e.contains(&*base.to_string_lossy()),
        "{e}"
    );
    assert!(!base.exists(), "the corrupt base must be removed");
    // The published build was not touched by the failed one.
    let latest = fs::read_link(out.join("worker/latest")).unwrap();
    assert!(verifies(&p, &out.join("worker").join(latest)));
}

/// Unmounts a tmpfs when dropped.
struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn privileged_disk_full_during_emit() {
    if let Some(r) = missing_build_capability() {
        return skip("privileged_disk_full_during_emit", &r);
    }
    ensure_shared_base();
    let root = test_root("disk-full");
    let p = project(&root);
    let mnt = root.join("small");
    fs::create_dir_all(&mnt).unwrap();
    // Room for the composed tar (the worker's base plus a few MB) but not for the artifacts
    // after it.
    let base_tar = worker_base(&p, &shared_cache())
        .map(|d| fs::metadata(d.join("rootfs.tar")).unwrap().len())
        .expect("the worker's base in the shared cache");
    let size = base_tar / (1 << 20) + 80;
    let st = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}m"),
            "kiln-test-full",
        ])
        .arg(&mnt)
        .status();
    if !matches!(st, Ok(s) if s.success()) {
        return skip(
            "privileged_disk_full_during_emit",
            "cannot mount a tmpfs (needs CAP_SYS_ADMIN)",
        );
    }
    let _m = Mount(mnt.clone());
    let o = build(&p, &mnt, &shared_cache(), &[]);
    assert!(!o.status.success(), "the build cannot fit in {size} MiB");
    let e = stderr(&o);
    assert!(e.contains("No space left on device"), "{e}");
    assert!(
        e.contains(&*mnt.to_string_lossy()),
        "the error names the out dir: {e}"
    );
    assert!(
        e.contains("rootfs.tar.zst") || e.contains("root.squashfs") || e.contains("disk."),
        "ran out during emit: {e}"
    );
    // Nothing half-written: no build, no staging dir, no link.
    let left: Vec<String> = names(&mnt.join("worker"));
    assert!(left.is_empty(), "left behind in out/worker: {left:?}");
    let o = Command::new("du").args(["-sk"]).arg(&mnt).output().unwrap();
    let kib: u64 = stdout(&o)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(kib < 1024, "{kib} KiB still used on the full file system");
}

#[test]
fn slow_verify_rebuild_refuses_a_moved_project() {
    // The happy path (a fresh-cache rebuild, every artifact identical) runs on the gpu role in
    // tests/slow_gpu.rs; the worker's fresh-cache rebuild in tests/slow_build.rs.
    if let Some(r) = missing_build_capability() {
        return skip("slow_verify_rebuild_refuses_a_moved_project", &r);
    }
    ensure_shared_base();
    let root = test_root("verify-rebuild");
    let p = project(&root);
    let out = root.join("out");
    let o = build(&p, &out, &shared_cache(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = out.join("worker/latest");

    // A project that moved on is refused before anything is built, naming the input.
    fs::write(p.join("overlays/common/etc/motd-moved"), "moved on\n").unwrap();
    let o = kiln(&p, &["verify", "--rebuild", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("overlays[/etc/motd-moved]"), "{e}");
    assert!(e.contains("check out the commit"), "{e}");
}
