//! Shared helpers for the integration tests.
#![allow(dead_code)]
// Test support: euid and atexit through libc.
#![allow(unsafe_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fixed test token (never a real secret).
pub const TEST_TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Copies the repository's recipes/ and overlays/ into a fresh temp project, with a test token.
pub fn project_copy() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    populate(d.path());
    d
}

/// The inventory the tests build and boot: one master (founding at once: nothing else to
/// probe but the VIP) and two workers, so node indices, MACs and golden seeds stay small; the
/// tests that need more masters or nodes append them. The repository's default inventory (the
/// seeds' HA cluster) is checked by `tests/recipes.rs`.
pub const TEST_INVENTORY: &str = r#"[[nodes]]
hostname = "master-1"
mac = "52:54:00:00:00:11"
role = "master"
address = "10.0.0.11/24"
gateway = "10.0.0.1"
dns = ["10.0.0.1"]

[[nodes]]
hostname = "worker-1"
mac = "52:54:00:00:00:21"
role = "worker"

[[nodes]]
hostname = "worker-2"
mac = "52:54:00:00:00:22"
role = "worker"
"#;

/// Fills `dir` with the repository's recipes/ (its inventory replaced by [`TEST_INVENTORY`])
/// and overlays/ and a test k3s token.
pub fn populate(dir: &Path) {
    copy_tree(&repo_root().join("recipes"), &dir.join("recipes"));
    let c = dir.join("recipes/cluster.toml");
    let text = fs::read_to_string(&c).unwrap();
    // The inventory, with the comment block above it, is the end of the file.
    let cut = text
        .find("\n# The inventory")
        .or_else(|| text.find("\n[[nodes]]"))
        .expect("cluster.toml has [[nodes]]");
    let head = text[..cut].trim_end();
    fs::write(&c, format!("{head}\n\n{TEST_INVENTORY}")).unwrap();
    copy_tree(&repo_root().join("overlays"), &dir.join("overlays"));
    copy_tree(test_keys(), &dir.join("keys"));
    let t = dir.join("keys/k3s-token");
    fs::write(&t, format!("{TEST_TOKEN}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&t, fs::Permissions::from_mode(0o600)).unwrap();
}

/// One set of keys made by `kiln::trust::keys` (RSA-2048 to keep tests fast), shared by every project
/// copy. Kept beside the shared base cache and reused by later test runs: the gpu role's base
/// is keyed on the module-signing certificate, so new keys would mean a new DKMS build.
pub fn test_keys() -> &'static Path {
    static K: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    K.get_or_init(|| {
        let cache = shared_cache();
        let keys = cache.join("test-keys-v2");
        if keys.join("module-signing.crt").is_file() {
            // Made before keys/node-identity.key or the k3s CAs existed: add just those (the
            // others, the module-signing pair above all, stay as they are).
            if !keys.join("node-identity.key").is_file()
                || !keys.join("k3s-server-ca.crt").is_file()
            {
                kiln::trust::keys::add_missing(&keys, "homelab", 2048).unwrap();
            }
            return keys;
        }
        fs::create_dir_all(&cache).unwrap();
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-test-keys-")
            .tempdir_in(&cache)
            .unwrap();
        let d = tmp.path().join("keys");
        kiln::trust::keys::init_with_rsa_bits(&d, "homelab", false, 2048).unwrap();
        // Another test process may have won the race: keep theirs.
        if fs::rename(&d, &keys).is_err() {
            assert!(keys.join("module-signing.crt").is_file());
        }
        keys
    })
}

/// The stand-in k3s release files shipped in tests/standin/ (name → bytes).
pub fn standin_files() -> Vec<(String, Vec<u8>)> {
    ["k3s", "k3s-airgap-images-amd64.tar.zst"]
        .iter()
        .map(|n| {
            (
                n.to_string(),
                fs::read(repo_root().join("tests/standin").join(n)).unwrap(),
            )
        })
        .collect()
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// Serves `files` at `http://127.0.0.1:<port>/<name>` from a background thread for the rest
/// of the process; returns the base URL. Each request is logged into the returned counter.
pub fn serve(
    files: Vec<(String, Vec<u8>)>,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut first = String::new();
            let _ = r.read_line(&mut first);
            loop {
                let mut l = String::new();
                if r.read_line(&mut l).unwrap_or(0) == 0 || l == "\r\n" {
                    break;
                }
            }
            let path = first
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .trim_start_matches('/')
                .to_string();
            match files.iter().find(|(n, _)| *n == path) {
                Some((_, b)) => {
                    let _ = write!(
                        c,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        b.len()
                    );
                    let _ = c.write_all(b);
                }
                None => {
                    let _ = write!(
                        c,
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                }
            }
        }
    });
    (format!("http://127.0.0.1:{port}"), hits)
}

/// Points the project's k3s pins at the stand-in files served at `base_url`.
pub fn pin_standin(dir: &Path, base_url: &str) {
    let p = dir.join("recipes/cluster.toml");
    let s = fs::read_to_string(&p).unwrap();
    let files = standin_files();
    let mut out = String::new();
    for line in s.lines() {
        if line.starts_with("binary = ") {
            out.push_str(&format!(
                "binary = {{ url = \"{base_url}/k3s\", sha256 = \"{}\" }}\n",
                sha256_hex(&files[0].1)
            ));
        } else if line.starts_with("airgap_images = ") {
            out.push_str(&format!(
                "airgap_images = {{ url = \"{base_url}/k3s-airgap-images-amd64.tar.zst\", sha256 = \"{}\" }}\n",
                sha256_hex(&files[1].1)
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    fs::write(&p, out).unwrap();
}

pub fn copy_tree(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from).sort_by_file_name() {
        let e = e.expect("walk");
        let rel = e.path().strip_prefix(from).unwrap();
        let dst = to.join(rel);
        let ft = e.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&dst).unwrap();
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(e.path()).unwrap(), &dst).unwrap();
        } else {
            fs::copy(e.path(), &dst).unwrap(); // copies the permission bits too
        }
    }
}

/// Runs the kiln binary in `dir`.
pub fn kiln(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .env_remove("KILN_OUT")
        .env_remove("KILN_CACHE")
        .env_remove("KILN_DIR")
        .output()
        .expect("run kiln")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stdout, then stderr.
pub fn combined(o: &Output) -> String {
    format!("{}{}", stdout(o), stderr(o))
}

/// Replaces `from` with `to` in a project file (panics if `from` is absent).
pub fn edit(dir: &Path, file: &str, from: &str, to: &str) {
    let p = dir.join(file);
    let s = fs::read_to_string(&p).unwrap();
    assert!(s.contains(from), "{file} does not contain {from:?}");
    fs::write(&p, s.replacen(from, to, 1)).unwrap();
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Prints a visible skip line (captured output is shown with --nocapture / by ./test.sh).
pub fn skip(test: &str, reason: &str) {
    println!("SKIP: {test}: {reason}");
    eprintln!("SKIP: {test}: {reason}");
}

pub fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// The base cache shared by the slow tests: `target/kiln-test-cache/` or `KILN_TEST_CACHE`.
pub fn shared_cache() -> PathBuf {
    std::env::var_os("KILN_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/kiln-test-cache"))
}

/// Why a real build cannot run here, if it cannot (the slow tests print it as `SKIP:`).
pub fn missing_build_capability() -> Option<String> {
    if !is_root() {
        return Some("not root (mmdebstrap and image ownership need root)".into());
    }
    for t in ["mmdebstrap", "tar2sqfs", "qemu-img"] {
        if !which(t) {
            return Some(format!("{t} not installed (see `kiln doctor`)"));
        }
    }
    None
}

/// Marks `dir` (a test's output directory under target/) for removal when this test process
/// exits with no test having panicked. After a failure it stays, for inspection (boot logs,
/// images); after a clean run it would only hold gigabytes of images the next run replaces,
/// and the slow suites together would not fit on a small CI disk.
pub fn remove_on_success(dir: &Path) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, Once};
    static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static PANICKED: AtomicBool = AtomicBool::new(false);
    static INIT: Once = Once::new();
    extern "C" fn at_exit() {
        if PANICKED.load(Ordering::SeqCst) {
            return;
        }
        if let Ok(dirs) = DIRS.lock() {
            for d in dirs.iter() {
                let _ = fs::remove_dir_all(d);
            }
        }
    }
    INIT.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED.store(true, Ordering::SeqCst);
            prev(info)
        }));
        // SAFETY: registers a plain function with no captured state; it runs once, at exit.
        unsafe { libc::atexit(at_exit) };
    });
    DIRS.lock().unwrap().push(dir.to_path_buf());
}

/// A TFTP read request (RFC 1350, octet mode) for `name` with options (RFC 2347).
pub fn rrq(name: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    let mut v = vec![0, 1];
    for s in [name, "octet"]
        .iter()
        .chain(opts.iter().flat_map(|(a, b)| [a, b]))
    {
        v.extend_from_slice(s.as_bytes());
        v.push(0);
    }
    v
}

/// A TFTP ACK of block `b`.
pub fn ack(b: u16) -> [u8; 4] {
    let x = b.to_be_bytes();
    [0, 4, x[0], x[1]]
}

/// The project at `dir` without the API VIP: `api_endpoint` is master-1's own address, so the
/// master role needs no keepalived and shares the worker's base again (what the tests of shared
/// bases build on).
#[allow(dead_code)]
pub fn without_vip(dir: &Path) {
    edit(
        dir,
        "recipes/cluster.toml",
        "api_endpoint = \"10.0.0.10\"",
        "api_endpoint = \"10.0.0.11\"",
    );
    edit(
        dir,
        "recipes/master.toml",
        "packages = [\"keepalived\", \"openssl\"]",
        "packages = []",
    );
}
