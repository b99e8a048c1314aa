//! Slow tests: a real mmdebstrap base, a real build of the worker role, reproducibility with a
//! fresh cache, the artifacts read back with independent tools, and a UEFI boot under qemu TCG.
//!
//! They need root (mmdebstrap --mode=root and file ownership in the image), mmdebstrap and
//! tar2sqfs; the boot test needs qemu-system-x86_64 and OVMF. Missing capabilities print
//! `SKIP: <reason>`. The base is cached in `target/kiln-test-cache/` (override with
//! KILN_TEST_CACHE) and shared by every test here; one build is shared through a OnceLock.

// Signals to child processes through libc.
#![allow(unsafe_code)]

mod common;
use common::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

struct Built {
    ids: BTreeMap<String, String>,
    project: PathBuf,
    out: PathBuf,
    dir: PathBuf,
    build_id: String,
}

fn run_build(project: &Path, out: &Path, cache: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["--dir"])
        .arg(project)
        .arg("--out")
        .arg(out)
        .args(["build", "--json", "--cache-dir"])
        .arg(cache)
        .args(args)
        .output()
        .expect("run kiln")
}

/// Roles the shared build makes (worker and master share one base; storage has its own).
const ROLES: &[&str] = &["--role", "worker", "--role", "master", "--role", "storage"];

/// A project copy whose k3s pins point at the stand-in served over HTTP by this process.
fn standin_project(root: &Path) -> PathBuf {
    static URL: OnceLock<String> = OnceLock::new();
    let url = URL.get_or_init(|| serve(standin_files()).0);
    let project = root.join("project");
    populate(&project);
    pin_standin(&project, url);
    // One SealedSecret for the masters, sealed once per test process so every copy is identical.
    static SEALED: OnceLock<String> = OnceLock::new();
    let sealed = SEALED.get_or_init(|| {
        let cert = fs::read_to_string(test_keys().join("sealed-secrets.crt")).unwrap();
        kiln::trust::seal::seal(TEST_SECRET, &cert, None).unwrap()
    });
    fs::create_dir_all(project.join("recipes/secrets")).unwrap();
    fs::write(project.join("recipes/secrets/db.yaml"), sealed).unwrap();
    edit(
        &project,
        "recipes/cluster.toml",
        "secrets = []",
        "secrets = [\"secrets/db.yaml\"]",
    );
    // A master-1 that finds no other master founds after 10 s, not the default 2 min (every
    // master boot here is one).
    edit(
        &project,
        "recipes/cluster.toml",
        "founding_wait = 120",
        "founding_wait = 10",
    );
    // The state probe in every image, and a storage node with extra disks (issue 18's test).
    let unit = project.join("overlays/common/etc/systemd/system/kiln-test-state.service");
    fs::create_dir_all(unit.parent().unwrap()).unwrap();
    fs::write(&unit, STATE_PROBE_UNIT).unwrap();
    let script = project.join("overlays/common/usr/local/lib/kiln-test-state");
    fs::create_dir_all(script.parent().unwrap()).unwrap();
    fs::write(&script, STATE_PROBE_SCRIPT).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    edit(
        &project,
        "recipes/base.toml",
        "enable = [\"systemd-networkd.service\", \"systemd-resolved.service\"]",
        "enable = [\"systemd-networkd.service\", \"systemd-resolved.service\", \"kiln-test-state.service\"]",
    );
    let inv = project.join("recipes/cluster.toml");
    let mut c = fs::read_to_string(&inv).unwrap();
    c.push_str(STORAGE_NODE);
    fs::write(&inv, c).unwrap();
    project
}

/// A plain Secret whose value must never appear in any image.
const TEST_SECRET: &str = "apiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: apps\nstringData:\n  password: kiln-test-plaintext-password-4711\n";

/// The shared first build (cached base).
fn built() -> &'static Built {
    static B: OnceLock<Built> = OnceLock::new();
    B.get_or_init(|| {
        // Kept after a failed run for inspection (boot logs, images); replaced by the next run.
        let root = repo_root().join("target/kiln-slow-out");
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        remove_on_success(&root);
        let project = standin_project(&root);
        let out = root.join("out");
        let o = run_build(&project, &out, &shared_cache(), ROLES);
        assert!(o.status.success(), "build failed:\n{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ids: BTreeMap<String, String> = v["roles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["role"].as_str().unwrap().to_string(),
                    r["build_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let build_id = ids["worker"].clone();
        Built {
            dir: out.join("worker").join(&build_id),
            project,
            out,
            build_id,
            ids,
        }
    })
}

impl Built {
    fn role_dir(&self, role: &str) -> PathBuf {
        self.out.join(role).join(&self.ids[role])
    }
}

/// Every file of a role build: the crate's artifact list plus the checksums and signature.
fn artifacts() -> Vec<&'static str> {
    let mut v = kiln::pipeline::build::ARTIFACTS.to_vec();
    v.extend(["SHA256SUMS", "SHA256SUMS.sig"]);
    v
}

#[test]
fn slow_build_layout_and_manifest() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_build_layout_and_manifest", &r);
    }
    let b = built();
    let artifacts = artifacts();
    for a in &artifacts {
        assert!(b.dir.join(a).is_file(), "{a} missing");
    }
    let names: Vec<String> = fs::read_dir(&b.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        artifacts.len(),
        "unexpected files in the build dir: {names:?}"
    );
    // latest points at the build.
    assert_eq!(
        fs::read_link(b.out.join("worker/latest")).unwrap(),
        PathBuf::from(&b.build_id)
    );
    // SHA256SUMS verifies with coreutils.
    let o = Command::new("sha256sum")
        .arg("--check")
        .arg("--strict")
        .arg("SHA256SUMS")
        .current_dir(&b.dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "sha256sum --check: {}", stdout(&o));
    // The manifest lists every other artifact with its digest and size.
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(b.dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["build_id"], b.build_id.as_str());
    assert_eq!(
        m["contains_secrets"], true,
        "the worker carries the k3s token"
    );
    let listed: BTreeMap<String, (String, u64)> = m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_string(),
                (
                    a["sha256"].as_str().unwrap().to_string(),
                    a["size"].as_u64().unwrap(),
                ),
            )
        })
        .collect();
    for a in artifacts
        .iter()
        .filter(|a| !matches!(**a, "SHA256SUMS" | "SHA256SUMS.sig" | "manifest.json"))
    {
        let (sha, size) = &listed[*a];
        assert_eq!(
            *size,
            fs::metadata(b.dir.join(a)).unwrap().len(),
            "{a} size"
        );
        assert_eq!(sha.len(), 64);
    }
    // Same id as `kiln inspect` reports.
    let o = kiln(&b.project, &["inspect", "--role", "worker", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["build_id"], b.build_id.as_str());
    // Package list recorded.
    let pk = fs::read_to_string(b.dir.join("packages.txt")).unwrap();
    assert!(
        pk.lines()
            .any(|l| l.starts_with("linux-image-6.") || l.starts_with("linux-image-amd64 ")),
        "{pk}"
    );
    assert!(pk.lines().any(|l| l.starts_with("systemd ")));
}

#[test]
fn slow_build_image_contents() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_build_image_contents", &r);
    }
    if !which("unsquashfs") {
        return skip(
            "slow_build_image_contents",
            "unsquashfs not installed (apt-get install squashfs-tools)",
        );
    }
    let b = built();
    // Read root.squashfs back with squashfs-tools (an independent implementation from tar2sqfs).
    let o = Command::new("unsquashfs")
        .args(["-lln", "-d", "", "-n"])
        .arg(b.dir.join("root.squashfs"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let listing = stdout(&o);
    let line = |path: &str| -> String {
        listing
            .lines()
            .find(|l| l.split_whitespace().nth(5) == Some(path))
            .unwrap_or_else(|| panic!("{path} not in root.squashfs"))
            .to_string()
    };
    assert!(line("/etc/kiln/build.json").starts_with("-rw-r--r-- 0/0"));
    assert!(line("/etc/systemd/system/kiln-booted.service").starts_with("-rw-r--r-- 0/0"));
    let l = line("/etc/systemd/system/multi-user.target.wants/kiln-booted.service");
    assert!(
        l.starts_with("lrwxrwxrwx 0/0")
            && l.ends_with("-> /etc/systemd/system/kiln-booted.service"),
        "{l}"
    );
    let l = line("/etc/systemd/system/multi-user.target.wants/systemd-networkd.service");
    assert!(
        l.ends_with("-> /usr/lib/systemd/system/systemd-networkd.service"),
        "{l}"
    );
    // Also= of systemd-networkd.service
    line("/etc/systemd/system/sockets.target.wants/systemd-networkd.socket");
    assert!(line("/etc/resolv.conf").ends_with("-> ../run/systemd/resolve/stub-resolv.conf"));
    // Every mtime is SOURCE_DATE_EPOCH (2023-11-14 22:13 UTC) or earlier.
    for l in listing
        .lines()
        .filter(|l| l.contains(" 0/0 ") || l.contains('/'))
    {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() > 4 && f[3].len() == 10 && f[3].as_bytes()[4] == b'-' {
            assert!(f[3] <= "2023-11-14", "mtime after SOURCE_DATE_EPOCH: {l}");
        }
    }
    // Rendered template and build.json content.
    let x = Command::new("unsquashfs")
        .args(["-cat"])
        .arg(b.dir.join("root.squashfs"))
        .arg("/etc/motd")
        .output()
        .unwrap();
    let motd = stdout(&x);
    assert!(
        motd.contains("homelab / worker") && motd.contains(&b.build_id),
        "{motd}"
    );
    let x = Command::new("unsquashfs")
        .args(["-cat"])
        .arg(b.dir.join("root.squashfs"))
        .arg("/etc/kiln/build.json")
        .output()
        .unwrap();
    let bj: serde_json::Value = serde_json::from_slice(&x.stdout).unwrap();
    assert_eq!(bj["build_id"], b.build_id.as_str());
    assert_eq!(bj["role"], "worker");

    // The rootfs tarball holds the same tree (spot checks).
    let f = fs::File::open(b.dir.join("rootfs.tar.zst")).unwrap();
    let mut ar = tar::Archive::new(zstd::Decoder::new(f).unwrap());
    let mut seen = 0;
    let mut roots = 0;
    for e in ar.entries().unwrap() {
        let e = e.unwrap();
        if &e.header().as_old().name[..3] == b"./\0" {
            roots += 1;
            assert_eq!(e.header().mode().unwrap(), 0o755);
            continue;
        }
        let p = e.path().unwrap().to_string_lossy().into_owned();
        if p == "etc/kiln/build.json" || p == "etc/hostname" {
            assert_eq!(e.header().mtime().unwrap(), 1_700_000_000);
            assert_eq!(e.header().uid().unwrap(), 0);
            seen += 1;
        }
    }
    assert_eq!(seen, 2);
    assert_eq!(roots, 1, "exactly one root directory entry");

    // GPT read back by sfdisk: ESP + Linux root, root partition = root.squashfs bytes.
    if which("sfdisk") {
        let o = Command::new("sfdisk")
            .arg("--json")
            .arg(b.dir.join("disk.raw"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let parts = v["partitiontable"]["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), 3, "ESP, root, seed slot");
        assert_eq!(
            parts[0]["type"].as_str().unwrap().to_lowercase(),
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
        );
        assert_eq!(
            parts[1]["type"].as_str().unwrap().to_lowercase(),
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
        );
        let m: serde_json::Value =
            serde_json::from_slice(&fs::read(b.dir.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(
            parts[1]["uuid"].as_str().unwrap().to_lowercase(),
            m["disk"]["root_partuuid"].as_str().unwrap()
        );
        let start = parts[1]["start"].as_u64().unwrap() * 512;
        let sq = fs::read(b.dir.join("root.squashfs")).unwrap();
        let mut disk = fs::File::open(b.dir.join("disk.raw")).unwrap();
        use std::io::{Read, Seek, SeekFrom};
        disk.seek(SeekFrom::Start(start)).unwrap();
        let mut got = vec![0u8; sq.len()];
        disk.read_exact(&mut got).unwrap();
        assert!(got == sq, "root partition differs from root.squashfs");
    } else {
        skip(
            "slow_build_image_contents (GPT part)",
            "sfdisk not installed",
        );
    }
    // The ESP read back by mtools (independent FAT reader).
    if which("mtype") && which("sfdisk") {
        let img = format!("{}@@1048576", b.dir.join("disk.raw").display());
        let o = Command::new("mtype")
            .args(["-i", &img, "::/loader/entries/kiln-1.conf"])
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let entry = stdout(&o);
        assert!(
            entry.contains("linux /kiln/a/vmlinuz\ninitrd /kiln/a/initrd.img\n")
                && entry.contains("boot=live plainroot root=/dev/disk/by-partuuid/"),
            "{entry}"
        );
        // The loader picks the newest good kiln-* entry; slot A's root.pieces is the build's.
        let mtype = |f: &str| {
            let o = Command::new("mtype")
                .args(["-i", &img, f])
                .env("MTOOLS_SKIP_CHECK", "1")
                .output()
                .unwrap();
            assert!(o.status.success(), "{f}: {}", stderr(&o));
            stdout(&o)
        };
        let pieces = fs::read_to_string(b.dir.join("root.pieces")).unwrap();
        // root.pieces describes root.squashfs exactly: every piece's digest is of those bytes.
        let p = kiln::formats::pieces::Pieces::parse(&pieces, "root.pieces").unwrap();
        let sq = fs::read(b.dir.join("root.squashfs")).unwrap();
        assert_eq!(p.size, sq.len() as u64);
        for piece in &p.pieces {
            let bytes = &sq[piece.offset as usize..(piece.offset + piece.len) as usize];
            assert_eq!(<[u8; 32]>::from(Sha256::digest(bytes)), piece.sha256);
        }
        assert!(p.pieces.len() > 20, "{} pieces", p.pieces.len());
        assert_eq!(
            mtype("::/loader/loader.conf"),
            "default kiln-*\ntimeout 0\neditor no\n"
        );
        assert_eq!(mtype("::/kiln/a/root.pieces"), pieces);
        let o = Command::new("mdir")
            .args(["-i", &img, "-b", "::/EFI/BOOT"])
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        assert!(stdout(&o).contains("BOOTX64.EFI"), "{}", stdout(&o));
    }
}

#[test]
fn slow_build_reproducible_with_fresh_cache() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_build_reproducible_with_fresh_cache", &r);
    }
    let b = built();
    // Second build: another project copy, another out dir and an empty cache → mmdebstrap again.
    let root = tempfile::Builder::new()
        .prefix("kiln-repro-")
        .tempdir()
        .unwrap();
    let project = standin_project(root.path());
    let out = root.path().join("out");
    let o = run_build(&project, &out, &root.path().join("fresh-cache"), ROLES);
    assert!(o.status.success(), "second build failed:\n{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for i in 0..3 {
        // Built in this run: by the role's own base stage or side by side before the roles.
        assert_eq!(
            v["roles"][i]["base_cached"], false,
            "the second build must not reuse the cache ({})",
            v["roles"][i]["role"]
        );
    }
    // storage too: open-iscsi's postinst used to leave a random initiator name in the image
    // and its initramfs (found by `kiln verify --rebuild`; now GenerateName=yes, see storage.toml).
    for role in ["worker", "master", "storage"] {
        let dir1 = b.role_dir(role);
        let dir2 = out.join(role).join(&b.ids[role]);
        assert!(
            dir2.is_dir(),
            "same inputs must give the same build id ({role})"
        );
        let sums1 = fs::read_to_string(dir1.join("SHA256SUMS")).unwrap();
        let sums2 = fs::read_to_string(dir2.join("SHA256SUMS")).unwrap();
        let mut differ = Vec::new();
        for a in artifacts() {
            if fs::read(dir1.join(a)).unwrap() != fs::read(dir2.join(a)).unwrap() {
                differ.push(a);
            }
        }
        assert!(
            differ.is_empty(),
            "{role}: artifacts differ between two builds: {differ:?}\n{sums1}\n{sums2}"
        );
        assert_eq!(sums1, sums2);
    }
    // Per-node outputs (seed, CIDATA volume, node disks, signature) are bit-identical too.
    for host in ["master-1", "worker-1", "worker-2"] {
        let n1 = b.out.join("nodes").join(host);
        let n2 = out.join("nodes").join(host);
        assert_eq!(
            fs::read_link(&n1).unwrap(),
            fs::read_link(&n2).unwrap(),
            "{host}: same node id"
        );
        let mut names: Vec<String> = fs::read_dir(&n1)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert!(names.contains(&"disk.raw".to_string()), "{names:?}");
        for n in &names {
            assert!(
                fs::read(n1.join(n)).unwrap() == fs::read(n2.join(n)).unwrap(),
                "{host}/{n} differs between two builds"
            );
        }
    }
}

#[test]
fn slow_boot_uefi_disk_prints_marker() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_boot_uefi_disk_prints_marker", &r);
    }
    if !which("qemu-system-x86_64") || !Path::new(kiln::sys::tools::OVMF_CODE).is_file() {
        return skip(
            "slow_boot_uefi_disk_prints_marker",
            "qemu-system-x86_64 or OVMF not installed (apt-get install qemu-system-x86 ovmf)",
        );
    }
    let b = built();
    let tmp = tempfile::tempdir().unwrap();
    let cmd = kiln::testing::qemu::uefi_disk_command(
        &b.dir.join("disk.qcow2"),
        &tmp.path().join("vars.fd"),
        2048,
        None,
    )
    .unwrap();
    let marker = format!("kiln: booted role=worker build={}", b.build_id);
    let log = b.out.join("boot-uefi.log");
    let booted = kiln::testing::qemu::wait_for_marker(cmd, &marker, Duration::from_secs(900), &log)
        .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "booted in {:.0}s: {}",
        booted.elapsed.as_secs_f64(),
        booted.line
    );
    assert!(
        booted.line.contains("hostname=homelab-worker seed=none"),
        "{}",
        booted.line
    );
}

/// Readable dump of what kiln placed for k3s and identity: mode, owner, size, and the content
/// of the small text files (never of the token).
fn kiln_layer_dump(dir: &Path) -> String {
    let f = fs::File::open(dir.join("rootfs.tar.zst")).unwrap();
    let mut ar = tar::Archive::new(zstd::Decoder::new(f).unwrap());
    let mut out = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let interesting = p.starts_with("etc/rancher")
            || p.starts_with("usr/local/bin")
            || p.starts_with("var/lib/rancher")
            || p.starts_with("var/lib/longhorn")
            || p.starts_with("etc/kiln/k3s-nodes")
            || p == "etc/kiln/inventory.tsv"
            || p == "etc/kiln/role"
            || p.starts_with("usr/lib/kiln")
            || p.starts_with("etc/modules-load.d")
            || p == "etc/multipath.conf"
            || (p.starts_with("etc/systemd/system")
                && (p.contains("k3s") || p.contains("kiln-identify") || p.contains("iscsid")));
        if !interesting {
            continue;
        }
        let h = e.header().clone();
        let mut line = format!(
            "{:o} {}:{} {:?}",
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.entry_type()
        );
        if let Some(t) = e.link_name().unwrap() {
            line.push_str(&format!(" -> {}", t.display()));
        } else if h.entry_type().is_file() {
            let mut data = Vec::new();
            use std::io::Read;
            e.read_to_end(&mut data).unwrap();
            line.push_str(&format!(
                " {} bytes sha256={}",
                data.len(),
                &sha256_hex(&data)[..16]
            ));
            let private = h.mode().unwrap() & 0o077 == 0;
            if private
                || p.contains("/sealed-")
                || p == "usr/lib/kiln/data-owner"
                || p.starts_with("usr/lib/kiln/k3s-ca/")
            {
                // Key material, ciphertext and what derives from the test keys (the data
                // owner tag, the cluster's CA certificates) vary per test cache: placement and
                // mode only.
                out.insert(
                    p,
                    format!(
                        "{:o} {}:{} {:?} (content not shown)",
                        h.mode().unwrap(),
                        h.uid().unwrap(),
                        h.gid().unwrap(),
                        h.entry_type()
                    ),
                );
                continue;
            }
            let textual = p.ends_with(".yaml")
                || p.ends_with(".service")
                || p.ends_with(".conf")
                || p.ends_with(".tsv")
                || p == "etc/kiln/role";
            if textual && !p.ends_with("/token") {
                for l in String::from_utf8_lossy(&data).lines() {
                    line.push_str(&format!("\n    | {l}"));
                }
            }
        }
        out.insert(p, line);
    }
    out.iter().map(|(p, l)| format!("{p}: {l}\n")).collect()
}

/// Golden snapshot of the k3s/identity layer per role (KILN_UPDATE_GOLDEN=1 rewrites them).
#[test]
fn slow_k3s_layout_golden() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_k3s_layout_golden", &r);
    }
    let b = built();
    let mut failures = Vec::new();
    for role in ["master", "worker", "storage"] {
        let dump = kiln_layer_dump(&b.role_dir(role));
        let golden = repo_root().join(format!("tests/golden/{role}-layer.txt"));
        if std::env::var_os("KILN_UPDATE_GOLDEN").is_some() {
            fs::create_dir_all(golden.parent().unwrap()).unwrap();
            fs::write(&golden, &dump).unwrap();
            continue;
        }
        let want = fs::read_to_string(&golden).unwrap_or_default();
        if want != dump {
            let got = golden.with_extension("got");
            fs::create_dir_all(golden.parent().unwrap()).unwrap();
            fs::write(&got, &dump).unwrap();
            failures.push(format!(
                "{role}: differs from {} (got: {})",
                golden.display(),
                got.display()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\nrerun with KILN_UPDATE_GOLDEN=1 after checking the diff",
        failures.join("\n")
    );
    // Key facts, independent of the snapshot:
    let m = kiln_layer_dump(&b.role_dir("master"));
    assert!(m.contains("usr/local/bin/k3s: 755 0:0 Regular"));
    assert!(m.contains("usr/local/bin/kubectl: 777 0:0 Symlink -> /usr/local/bin/k3s"));
    assert!(m.contains("etc/rancher/k3s/token: 600 0:0 Regular"));
    assert!(m.contains("etc/systemd/system/multi-user.target.wants/k3s.service: 777 0:0 Symlink -> /etc/systemd/system/k3s.service"));
    // Founding or joining is decided at boot: no node config carries cluster-init, the
    // bootstrap runs before k3s.
    assert!(!m.contains("| cluster-init: true"), "founding baked in");
    assert!(m.contains("usr/lib/kiln/kiln-k3s-bootstrap: 755 0:0 Regular"));
    assert!(m.contains("ExecStartPre=/usr/lib/kiln/kiln-k3s-bootstrap"));
    assert!(m.contains("etc/kiln/k3s-nodes/master-1.yaml"));
    assert!(m.contains("var/lib/rancher/k3s/server/manifests/nvidia-runtimeclass.yaml"));
    let w = kiln_layer_dump(&b.role_dir("worker"));
    assert!(w.contains("etc/systemd/system/multi-user.target.wants/k3s-agent.service"));
    assert!(w.contains("| server: \"https://10.0.0.10:6443\""));
    assert!(!w.contains("server/manifests"), "agents carry no manifests");
    assert!(
        w.contains("etc/kiln/k3s-nodes/worker-1.yaml")
            && w.contains("etc/kiln/k3s-nodes/worker-2.yaml")
    );
    let s = kiln_layer_dump(&b.role_dir("storage"));
    assert!(s.contains("node.longhorn.io/create-default-disk=true"));
    assert!(s.contains("etc/modules-load.d/longhorn.conf"));
    assert!(s.contains("iscsid"), "iscsid enabled");
    assert!(s.contains("var/lib/longhorn/: 755 0:0 Directory"));
    // No initiator name baked in: each node's iscsid makes its own (storage.toml customize).
    let iname = Command::new("unsquashfs")
        .args(["-cat"])
        .arg(b.role_dir("storage").join("root.squashfs"))
        .arg("/etc/iscsi/initiatorname.iscsi")
        .output()
        .unwrap();
    assert!(iname.status.success(), "{}", stderr(&iname));
    assert_eq!(stdout(&iname), "GenerateName=yes\n");
    // Sealed secrets: the master has the controller, its restored key (0600) and the SealedSecret.
    assert!(
        m.contains("var/lib/rancher/k3s/server/manifests/kiln-sealed-secrets-controller.yaml: 644")
    );
    assert!(
        m.contains("| kind: HelmChart")
            && m.contains("fullnameOverride: sealed-secrets-controller")
    );
    assert!(m.contains("var/lib/rancher/k3s/server/manifests/kiln-sealed-secrets-key.yaml: 600 0:0 Regular (content not shown)"));
    assert!(m.contains(
        "var/lib/rancher/k3s/server/manifests/sealed-db.yaml: 644 0:0 Regular (content not shown)"
    ));
    for d in [&w, &s] {
        assert!(
            !d.contains("sealed-secrets") && !d.contains("sealed-db"),
            "agents carry no sealed-secrets material"
        );
    }
    // Secrets: images with the token are marked and private.
    for role in ["master", "worker", "storage"] {
        let m: serde_json::Value =
            serde_json::from_slice(&fs::read(b.role_dir(role).join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(m["contains_secrets"], true, "{role}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(b.role_dir(role).join("disk.raw"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }
}

#[test]
fn slow_offline_rebuild_and_locked() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_offline_rebuild_and_locked", &r);
    }
    let b = built();
    // The lock records the artifacts and the base packages.
    let lock = fs::read_to_string(b.project.join("kiln.lock")).unwrap();
    assert!(
        lock.contains("[artifacts.k3s]") && lock.contains("systemd "),
        "{lock}"
    );
    // Offline rebuild from the cache (network is not touched: the pins point at a dead port).
    let root = tempfile::tempdir().unwrap();
    let project = root.path().join("project");
    copy_tree(&b.project, &project);
    pin_standin(&project, "http://127.0.0.1:9");
    let out = root.path().join("out");
    let o = run_build(
        &project,
        &out,
        &shared_cache(),
        &["--role", "worker", "--offline"],
    );
    assert!(
        o.status.success(),
        "offline rebuild failed:\n{}",
        stderr(&o)
    );
    // Same content, different URL → different build id is expected only if URLs enter it; compare bytes of the image tree.
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let dir = out
        .join("worker")
        .join(v["roles"][0]["build_id"].as_str().unwrap());
    assert!(dir.join("SHA256SUMS").is_file());
    // --locked with unchanged inputs passes; a lock that disagrees fails and names the change.
    let o = run_build(
        &b.project,
        &root.path().join("out2"),
        &shared_cache(),
        &["--role", "worker", "--locked"],
    );
    assert!(
        o.status.success(),
        "--locked with the same inputs failed:\n{}",
        stderr(&o)
    );
    let lp = b.project.join("kiln.lock");
    let tampered = root.path().join("kiln.lock");
    fs::copy(&lp, &tampered).unwrap();
    let text = fs::read_to_string(&lp).unwrap();
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("\"systemd "))
        .unwrap()
        .to_string();
    fs::write(&lp, text.replace(&line, "    \"systemd 0.0-old amd64\",")).unwrap();
    let o = run_build(
        &b.project,
        &root.path().join("out3"),
        &shared_cache(),
        &["--role", "worker", "--locked", "--force"],
    );
    fs::copy(&tampered, &lp).unwrap();
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("--locked") && e.contains("systemd 0.0-old"),
        "{e}"
    );
}

#[test]
fn slow_boot_master_starts_k3s() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_boot_master_starts_k3s", &r);
    }
    if !which("qemu-system-x86_64") || !Path::new(kiln::sys::tools::OVMF_CODE).is_file() {
        return skip(
            "slow_boot_master_starts_k3s",
            "qemu-system-x86_64 or OVMF not installed (apt-get install qemu-system-x86 ovmf)",
        );
    }
    let b = built();
    let tmp = tempfile::tempdir().unwrap();
    // master-1's MAC from the inventory: the image takes master-1's identity and founds the cluster.
    let cmd = kiln::testing::qemu::uefi_disk_command(
        &b.role_dir("master").join("disk.qcow2"),
        &tmp.path().join("vars.fd"),
        2048,
        Some("52:54:00:00:00:11"),
    )
    .unwrap();
    let log = b.out.join("boot-master.log");
    let booted = kiln::testing::qemu::wait_for_marker(
        cmd,
        "kiln-k3s-standin: argv=[server]",
        Duration::from_secs(900),
        &log,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "k3s started after {:.0}s: {}",
        booted.elapsed.as_secs_f64(),
        booted.line
    );
    let l = &booted.line;
    assert!(l.contains("token=present"), "{l}");
    assert!(l.contains("images=[k3s-airgap-images-amd64.tar.zst"), "{l}");
    assert!(
        l.contains("cluster-init: true") && l.contains("node-name: \"master-1\""),
        "{l}"
    );
    assert!(l.contains("token-file: \"/etc/rancher/k3s/token\""), "{l}");
    let console = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        console.contains("kiln-identify: this is master-1"),
        "identity not taken"
    );
}

/// Reads every regular file of an image's rootfs and reports which needles occur where.
fn scan_image(dir: &Path, needles: &[(&str, Vec<u8>)]) -> Vec<String> {
    let f = fs::File::open(dir.join("rootfs.tar.zst")).unwrap();
    let mut ar = tar::Archive::new(zstd::Decoder::new(f).unwrap());
    let mut hits = Vec::new();
    let mut buf = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if !e.header().entry_type().is_file() {
            continue;
        }
        buf.clear();
        use std::io::Read;
        e.read_to_end(&mut buf).unwrap();
        for (name, n) in needles {
            if buf.windows(n.len()).any(|w| w == n.as_slice()) {
                hits.push(format!("{name} in {}", e.path().unwrap().display()));
            }
        }
    }
    hits
}

/// No private key and no plaintext secret appears in any file of a worker image; the master
/// holds the controller key (only in its 0600 Secret) and ciphertext, never the plaintext.
#[test]
fn slow_secret_hygiene_scan() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_secret_hygiene_scan", &r);
    }
    let b = built();
    let keys = b.project.join("keys");
    let body = |file: &str| -> Vec<u8> {
        // A line from the middle of the PEM body: present wherever the key is copied verbatim.
        let t = fs::read_to_string(keys.join(file)).unwrap();
        let lines: Vec<&str> = t
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 40)
            .collect();
        lines[lines.len() / 2].as_bytes().to_vec()
    };
    use base64::Engine;
    let key_pem = fs::read(keys.join("sealed-secrets.key")).unwrap();
    let key_b64 = base64::engine::general_purpose::STANDARD
        .encode(&key_pem)
        .as_bytes()[..60]
        .to_vec();
    let needles = vec![
        ("sealed-secrets.key (PEM)", body("sealed-secrets.key")),
        ("sealed-secrets.key (base64)", key_b64),
        ("signing_ed25519.pem", body("signing_ed25519.pem")),
        ("ssh_ed25519", body("ssh_ed25519")),
        (
            "plaintext secret",
            b"kiln-test-plaintext-password-4711".to_vec(),
        ),
        ("k3s-server-ca.key", body("k3s-server-ca.key")),
        ("k3s-service.key", body("k3s-service.key")),
    ];
    let worker = scan_image(&b.role_dir("worker"), &needles);
    assert!(
        worker.is_empty(),
        "secret material in the worker image: {worker:?}"
    );
    let mut master = scan_image(&b.role_dir("master"), &needles);
    master.sort();
    assert_eq!(
        master,
        [
            "k3s-server-ca.key in usr/lib/kiln/k3s-ca/server-ca.key",
            "k3s-service.key in usr/lib/kiln/k3s-ca/service.key",
            "sealed-secrets.key (base64) in var/lib/rancher/k3s/server/manifests/kiln-sealed-secrets-key.yaml",
        ]
        .map(String::from)
        .to_vec(),
        "the master holds the controller key only in its restored Secret, the cluster's CA \
         keys only where kiln-k3s-ca takes them from, never the plaintext"
    );
}

/// Per-node outputs of the shared build: seed files, CIDATA volume, a node disk that differs
/// from its role disk only inside the seed partition, checksums.
#[test]
fn slow_node_outputs() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_node_outputs", &r);
    }
    let b = built();
    for (host, role) in [
        ("master-1", "master"),
        ("worker-1", "worker"),
        ("worker-2", "worker"),
    ] {
        let link = b.out.join("nodes").join(host);
        let target = fs::read_link(&link).unwrap();
        assert!(
            target
                .to_string_lossy()
                .starts_with(&format!("by-id/{host}-")),
            "{target:?}"
        );
        let dir = link.canonicalize().unwrap();
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "SHA256SUMS",
                "SHA256SUMS.sig",
                "cidata.iso",
                "cidata.img",
                "disk.qcow2",
                "disk.raw",
                "meta-data",
                "network-config",
                "node.json",
                "user-data"
            ]
            .map(String::from)
            .into_iter()
            // The node's identity travels in its seed (all of these roles run k3s, so each
            // has a node password; no update key: this project has no [updates]).
            .chain(
                kiln::pipeline::seed::IDENTITY_FILES
                    .iter()
                    .filter(|f| **f != "kiln-update-key")
                    .map(|f| f.to_string()),
            )
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>(),
            "{host}"
        );
        let o = Command::new("sha256sum")
            .args(["--check", "--strict", "SHA256SUMS"])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{host}: {}", stdout(&o));
        // The seed holds the node's private host key and k3s password: owner-only.
        use std::os::unix::fs::PermissionsExt;
        for n in [
            "kiln-ssh-host-ed25519-key",
            "kiln-node-password",
            "cidata.img",
        ] {
            let mode = fs::metadata(dir.join(n)).unwrap().permissions().mode() & 0o077;
            assert_eq!(mode, 0, "{host}/{n} is readable by others");
        }
        let node: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("node.json")).unwrap()).unwrap();
        assert_eq!(node["hostname"], host);
        assert_eq!(node["role"], role);
        assert_eq!(node["role_build_id"], b.ids[role].as_str());
        let iid = node["instance_id"].as_str().unwrap();
        assert_eq!(iid, kiln::pipeline::seed::instance_id(&b.ids[role], host));
        let meta = fs::read_to_string(dir.join("meta-data")).unwrap();
        assert!(meta.contains(&format!("instance-id: {iid}\n")), "{meta}");
        assert!(
            meta.contains(&format!("local-hostname: {host}\n")),
            "{meta}"
        );

        // The node disk = the role disk with the CIDATA volume in partition 3, nothing else.
        let role_disk = fs::read(b.role_dir(role).join("disk.raw")).unwrap();
        let node_disk = fs::read(dir.join("disk.raw")).unwrap();
        assert_eq!(role_disk.len(), node_disk.len());
        let mut f = fs::File::open(dir.join("disk.raw")).unwrap();
        let (first, last, name) = kiln::formats::disk::read_partition(&mut f, 2)
            .unwrap()
            .unwrap();
        assert_eq!(name, "kiln-seed");
        let (lo, hi) = ((first * 512) as usize, ((last + 1) * 512) as usize);
        assert!(
            role_disk[..lo] == node_disk[..lo],
            "{host}: differs before the seed"
        );
        assert!(
            role_disk[hi..] == node_disk[hi..],
            "{host}: differs after the seed"
        );
        assert!(
            role_disk[lo..hi].iter().all(|x| *x == 0),
            "role seed slot is empty"
        );
        let cidata = fs::read(dir.join("cidata.img")).unwrap();
        assert!(
            node_disk[lo..hi] == cidata[..],
            "{host}: partition 3 = cidata.img"
        );
        if which("mtype") {
            let o = Command::new("mtype")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(format!("{}@@{lo}", dir.join("disk.raw").display()))
                .arg("::user-data")
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", stderr(&o));
            assert_eq!(o.stdout, fs::read(dir.join("user-data")).unwrap());
        }
    }
}

/// A node disk booted on a machine whose MAC is NOT in the inventory still becomes that node:
/// the name can only come from cloud-init reading the seed partition (kiln-identify names
/// nodes by MAC).
#[test]
fn slow_boot_node_disk_cloud_init_sets_hostname() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_boot_node_disk_cloud_init_sets_hostname", &r);
    }
    if !which("qemu-system-x86_64") || !Path::new(kiln::sys::tools::OVMF_CODE).is_file() {
        return skip(
            "slow_boot_node_disk_cloud_init_sets_hostname",
            "qemu-system-x86_64 or OVMF not installed (apt-get install qemu-system-x86 ovmf)",
        );
    }
    let b = built();
    let dir = b.out.join("nodes/worker-2").canonicalize().unwrap();
    let node: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("node.json")).unwrap()).unwrap();
    let iid = node["instance_id"].as_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let cmd = kiln::testing::qemu::uefi_disk_command(
        &dir.join("disk.qcow2"),
        &tmp.path().join("vars.fd"),
        2048,
        Some("52:54:00:99:99:99"),
    )
    .unwrap();
    let marker = format!("kiln: booted role=worker build={}", b.ids["worker"]);
    let log = b.out.join("boot-node-worker-2.log");
    let booted =
        kiln::testing::qemu::wait_for_marker(cmd, &marker, Duration::from_secs(1200), &log)
            .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "node disk booted in {:.0}s: {}",
        booted.elapsed.as_secs_f64(),
        booted.line
    );
    assert!(
        booted
            .line
            .contains(&format!("hostname=worker-2 seed={iid}")),
        "cloud-init did not apply the seed: {}\n(console: {})",
        booted.line,
        log.display()
    );
}

/// `kiln verify` accepts the signed role and node builds; `kiln flash` writes a node disk to a
/// file and reads it back; a tampered image is refused before anything is written.
#[test]
fn slow_verify_and_flash_node() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_verify_and_flash_node", &r);
    }
    let b = built();
    let run = |out: &Path, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--dir")
            .arg(&b.project)
            .arg("--out")
            .arg(out)
            .args(args)
            .output()
            .unwrap()
    };
    for dir in [b.role_dir("worker"), b.out.join("nodes/worker-1")] {
        let o = run(&b.out, &["verify", dir.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "verify {}: {}",
            dir.display(),
            stderr(&o)
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("worker-1.img");
    let o = run(&b.out, &["flash", "worker-1", target.to_str().unwrap()]);
    assert!(o.status.success(), "flash: {}", stderr(&o));
    let want = fs::read(b.out.join("nodes/worker-1/disk.raw")).unwrap();
    assert!(fs::read(&target).unwrap() == want, "flashed bytes differ");

    // A copy of the node outputs with one byte of the disk changed: refused, target untouched.
    let fake_out = tmp.path().join("out");
    let src = b.out.join("nodes/worker-1").canonicalize().unwrap();
    let dst = fake_out.join("nodes/by-id").join(src.file_name().unwrap());
    copy_tree(&src, &dst);
    std::os::unix::fs::symlink(
        format!("by-id/{}", src.file_name().unwrap().to_string_lossy()),
        fake_out.join("nodes/worker-1"),
    )
    .unwrap();
    let mut disk = fs::read(dst.join("disk.raw")).unwrap();
    disk[4096] ^= 0xff;
    fs::write(dst.join("disk.raw"), disk).unwrap();
    let target2 = tmp.path().join("tampered.img");
    let o = run(&fake_out, &["flash", "worker-1", target2.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stderr(&o).contains("disk.raw"), "{}", stderr(&o));
    assert!(!target2.exists(), "nothing may be written");
}

/// The seed ISO works as a cloud-init datasource too: the plain role disk plus worker-1's
/// `cidata.iso` as a CD-ROM, on a machine with a foreign MAC, comes up as worker-1.
#[test]
fn slow_boot_role_disk_with_seed_iso() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_boot_role_disk_with_seed_iso", &r);
    }
    if !which("qemu-system-x86_64") || !Path::new(kiln::sys::tools::OVMF_CODE).is_file() {
        return skip(
            "slow_boot_role_disk_with_seed_iso",
            "qemu-system-x86_64 or OVMF not installed (apt-get install qemu-system-x86 ovmf)",
        );
    }
    let b = built();
    let node = b.out.join("nodes/worker-1").canonicalize().unwrap();
    let iid = kiln::pipeline::seed::instance_id(&b.ids["worker"], "worker-1");
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = kiln::testing::qemu::uefi_disk_command(
        &b.role_dir("worker").join("disk.qcow2"),
        &tmp.path().join("vars.fd"),
        2048,
        Some("52:54:00:99:99:98"),
    )
    .unwrap();
    cmd.args([
        "-drive",
        &format!(
            "file={},media=cdrom,readonly=on,if=ide",
            node.join("cidata.iso").display()
        ),
    ]);
    let marker = format!("kiln: booted role=worker build={}", b.ids["worker"]);
    let log = b.out.join("boot-seed-iso.log");
    let booted =
        kiln::testing::qemu::wait_for_marker(cmd, &marker, Duration::from_secs(1200), &log)
            .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "role disk + seed ISO booted in {:.0}s: {}",
        booted.elapsed.as_secs_f64(),
        booted.line
    );
    assert!(
        booted
            .line
            .contains(&format!("hostname=worker-1 seed={iid}")),
        "cloud-init did not apply the ISO seed: {}\n(console: {})",
        booted.line,
        log.display()
    );
}

/// The master-1 node disk on a machine with master-1's MAC: cloud-init (not kiln-identify, which
/// steps aside when a seed is present) applies the seed's static network config — cloud-init's
/// own device table on the console shows 10.0.0.11 on the NIC.
#[test]
fn slow_boot_node_disk_applies_static_network() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_boot_node_disk_applies_static_network", &r);
    }
    if !which("qemu-system-x86_64") || !Path::new(kiln::sys::tools::OVMF_CODE).is_file() {
        return skip(
            "slow_boot_node_disk_applies_static_network",
            "qemu-system-x86_64 or OVMF not installed (apt-get install qemu-system-x86 ovmf)",
        );
    }
    let b = built();
    let dir = b.out.join("nodes/master-1").canonicalize().unwrap();
    let iid = kiln::pipeline::seed::instance_id(&b.ids["master"], "master-1");
    let tmp = tempfile::tempdir().unwrap();
    let cmd = kiln::testing::qemu::uefi_disk_command(
        &dir.join("disk.qcow2"),
        &tmp.path().join("vars.fd"),
        2048,
        Some("52:54:00:00:00:11"),
    )
    .unwrap();
    let marker = format!("kiln: booted role=master build={}", b.ids["master"]);
    let log = b.out.join("boot-node-master-1.log");
    let booted =
        kiln::testing::qemu::wait_for_marker(cmd, &marker, Duration::from_secs(1200), &log)
            .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "master-1 node disk booted in {:.0}s: {}",
        booted.elapsed.as_secs_f64(),
        booted.line
    );
    assert!(
        booted
            .line
            .contains(&format!("hostname=master-1 seed={iid}")),
        "{}",
        booted.line
    );
    let console = String::from_utf8_lossy(&fs::read(&log).unwrap()).into_owned();
    assert!(
        console.contains("hostname and network from the cloud-init seed"),
        "kiln-identify did not step aside (console: {})",
        log.display()
    );
    let table = console.lines().find(|l| {
        l.contains("ci-info:") && l.contains("52:54:00:00:00:11") && l.contains("10.0.0.11")
    });
    assert!(
        table.is_some(),
        "cloud-init's device table does not show 10.0.0.11 on the NIC (console: {})",
        log.display()
    );
}

// --- PXE: `kiln serve` boots machines with empty disks over the network ----------------------

/// Why the PXE boot tests cannot run here, if they cannot.
fn missing_pxe_capability() -> Option<String> {
    if let Some(r) = missing_build_capability() {
        return Some(r);
    }
    for (t, pkg) in [
        ("ip", "iproute2"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ] {
        if !which(t) {
            return Some(format!("{t} not installed (apt-get install {pkg})"));
        }
    }
    for (f, pkg) in [
        ("/usr/lib/ipxe/undionly.kpxe", "ipxe"),
        ("/usr/lib/ipxe/qemu/pxe-e1000.rom", "ipxe-qemu"),
        ("/usr/lib/ipxe/qemu/efi-e1000.rom", "ipxe-qemu"),
        ("/dev/net/tun", "(kernel tun support)"),
    ] {
        if !Path::new(f).exists() {
            return Some(format!("{f} missing ({pkg})"));
        }
    }
    // One probe per test (they run in parallel in one process).
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let probe = format!("kilnprobe{}x{n}", std::process::id());
    let o = Command::new("ip").args(["netns", "add", &probe]).output();
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    match o {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Some(format!(
                "cannot create network namespaces (`ip netns add`: {})",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Err(e) => return Some(format!("cannot run `ip netns add`: {e}")),
    }
    None
}

/// A private LAN in network namespaces: `<ns>` holds bridge `br0` (10.231.0.1/24, where kiln
/// serves) and the guest's tap; with `site_dhcp`, a veth leads to `<ns>d` where dnsmasq plays
/// the site's DHCP server (10.231.0.2, range .100–.150). Everything is removed on drop.
struct Lan {
    ns: String,
    dhcp_ns: Option<String>,
    children: Vec<std::process::Child>,
    /// Index of `kiln serve` in `children`.
    serve_at: Option<usize>,
}

impl Lan {
    fn new(tag: &str, site_dhcp: bool) -> Lan {
        let ns = format!("kiln{tag}{}", std::process::id());
        let sh = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {}", args.join(" "));
        };
        sh(&["netns", "add", &ns]);
        let mut lan = Lan {
            ns: ns.clone(),
            dhcp_ns: None,
            children: vec![],
            serve_at: None,
        };
        sh(&["-n", &ns, "link", "set", "lo", "up"]);
        sh(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        sh(&["-n", &ns, "addr", "add", "10.231.0.1/24", "dev", "br0"]);
        sh(&["-n", &ns, "link", "set", "br0", "up"]);
        sh(&["-n", &ns, "tuntap", "add", "tap0", "mode", "tap"]);
        sh(&["-n", &ns, "link", "set", "tap0", "master", "br0"]);
        sh(&["-n", &ns, "link", "set", "tap0", "up"]);
        if site_dhcp {
            let d = format!("{ns}d");
            sh(&["netns", "add", &d]);
            lan.dhcp_ns = Some(d.clone());
            sh(&["-n", &d, "link", "set", "lo", "up"]);
            sh(&[
                "link", "add", "kv0", "netns", &ns, "type", "veth", "peer", "name", "kv1", "netns",
                &d,
            ]);
            sh(&["-n", &ns, "link", "set", "kv0", "master", "br0"]);
            sh(&["-n", &ns, "link", "set", "kv0", "up"]);
            sh(&["-n", &d, "addr", "add", "10.231.0.2/24", "dev", "kv1"]);
            sh(&["-n", &d, "link", "set", "kv1", "up"]);
        }
        lan
    }

    fn exec(&self, ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        c
    }

    /// Starts `kiln serve` on br0 with `args`; returns its log path once it listens.
    fn serve(&mut self, b: &Built, args: &[&str], log: &Path) -> serde_json::Value {
        let mut c = self.exec(&self.ns.clone());
        c.arg(env!("CARGO_BIN_EXE_kiln"))
            .arg("--dir")
            .arg(&b.project)
            .arg("--out")
            .arg(&b.out)
            .args(["serve", "--json", "--interface", "br0"])
            .args(args)
            .env("KILN_LOG", "kiln=info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(fs::File::create(log).unwrap());
        let mut child = c.spawn().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        self.serve_at = Some(self.children.len());
        self.children.push(child);
        assert!(
            !line.is_empty(),
            "kiln serve did not start: {}",
            fs::read_to_string(log).unwrap_or_default()
        );
        serde_json::from_str(&line).unwrap()
    }
}

impl Lan {
    /// Stops `kiln serve` (it must exit 0), tears the LAN down and returns the serve log.
    fn finish(mut self, serve_log: &Path) -> String {
        assert_eq!(
            self.stop_serve(),
            0,
            "kiln serve did not stop cleanly: {}",
            serve_log.display()
        );
        drop(self);
        fs::read_to_string(serve_log).unwrap()
    }

    /// SIGTERM to `kiln serve` (the first child started by [`Lan::serve`]); its exit status.
    fn stop_serve(&mut self) -> i32 {
        let Some(i) = self.serve_at else { return -1 };
        let c = &mut self.children[i];
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().map(|s| s.code().unwrap_or(-1)).unwrap_or(-1)
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for c in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
        }
        for c in &mut self.children {
            let _ = c.wait();
        }
        // qemu (started by wait_for_marker) is killed by it; anything left in the namespaces goes too.
        for ns in std::iter::once(&self.ns).chain(self.dhcp_ns.iter()) {
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    if let Ok(p) = pid.parse::<i32>() {
                        unsafe { libc::kill(p, libc::SIGKILL) };
                    }
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// An empty disk for the PXE guests (the point: nothing on it, the network is the only source).
fn empty_disk(dir: &Path) -> PathBuf {
    let p = dir.join("empty.raw");
    fs::File::create(&p).unwrap().set_len(1 << 30).unwrap();
    p
}

/// The Done-when of PXE serving, and a PXE node's state: a BIOS machine with worker-3's MAC
/// and one empty disk, on a LAN whose addresses come from another DHCP server (dnsmasq),
/// boots the worker role diskless from `kiln serve` alone (ProxyDHCP → iPXE script →
/// kernel/initrd → live-boot fetches root.squashfs over HTTP), comes up as worker-3 from its
/// NoCloud seed over HTTP, and makes its `use = "data"` disk (the empty one) its data
/// partition; a second PXE boot mounts it again and the state probe's file is still there.
#[test]
fn privileged_pxe_boot_worker_state_on_data_disk() {
    const T: &str = "privileged_pxe_boot_worker_state_on_data_disk";
    if let Some(r) = missing_pxe_capability() {
        return skip(T, &r);
    }
    if !which("dnsmasq") {
        return skip(
            T,
            "dnsmasq not installed (apt-get install dnsmasq-base): it plays the site's DHCP server",
        );
    }
    let b = built();
    let tmp = tempfile::tempdir().unwrap();
    let mut lan = Lan::new("p", true);
    let d = lan.dhcp_ns.clone().unwrap();
    let dnsmasq = lan
        .exec(&d)
        .args([
            "dnsmasq",
            "--no-daemon",
            "--port=0",
            "--interface=kv1",
            "--bind-interfaces",
        ])
        .args([
            "--dhcp-range=10.231.0.100,10.231.0.150,255.255.255.0,1h",
            "--no-resolv",
            "--no-hosts",
        ])
        .arg(format!(
            "--dhcp-leasefile={}",
            tmp.path().join("leases").display()
        ))
        .arg(format!(
            "--pid-file={}",
            tmp.path().join("dnsmasq.pid").display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(b.out.join("pxe-dnsmasq.log")).unwrap())
        .spawn()
        .unwrap();
    lan.children.push(dnsmasq);
    let serve_log = b.out.join("pxe-serve.log");
    let status = lan.serve(b, &[], &serve_log);
    assert_eq!(status["dhcp_mode"], "proxy");
    assert_eq!(status["base_url"], "http://10.231.0.1:8080");

    const MAC: &str = "52:54:00:00:00:23";
    let disk = empty_disk(tmp.path());
    let iid = kiln::pipeline::seed::instance_id(&b.ids["worker"], "worker-3");
    let marker = format!("kiln: booted role=worker build={}", b.ids["worker"]);
    let boot = |n: u32| {
        let mut qemu = lan.exec(&lan.ns.clone());
        qemu.args(kiln::testing::qemu::pxe_args(
            kiln::testing::qemu::PxeFirmware::Bios,
            &disk,
            "tap0",
            MAC,
        ));
        let log = b.out.join(format!("boot-pxe-worker-3-{n}.log"));
        // The state probe runs after the boot marker (and after kiln-data).
        let probed = kiln::testing::qemu::wait_for_marker(
            qemu,
            "kiln-test-state: written",
            Duration::from_secs(1500),
            &log,
        )
        .unwrap_or_else(|e| panic!("{e:#}\n(serve log: {})", serve_log.display()));
        let console = String::from_utf8_lossy(&fs::read(&log).unwrap()).into_owned();
        let line = console
            .lines()
            .find(|l| l.contains(&marker))
            .unwrap_or_else(|| panic!("no boot marker in {}", log.display()))
            .to_string();
        println!(
            "PXE boot {n} to the state probe in {:.0}s: {line}",
            probed.elapsed.as_secs_f64()
        );
        (line, console, state_line(&log))
    };

    let (line, console, s1) = boot(1);
    assert!(
        line.contains(&format!("hostname=worker-3 seed={iid}")),
        "the seed over HTTP was not applied: {line}"
    );
    assert!(
        console.contains("Filename: http://10.231.0.1:8080/boot.ipxe?mac=52-54-00-00-00-23"),
        "iPXE did not take the ProxyDHCP offer"
    );
    assert!(
        console.contains("root.squashfs' saved"),
        "live-boot did not fetch the squashfs"
    );
    println!("PXE boot 1 state: {s1:?}");
    assert!(s1["data"].starts_with("new(/dev/vda"), "{s1:?}");
    // PXE: no systemd-boot, so no LoaderDevicePartUUID and no /efi.
    assert_eq!(s1["efi"], "none", "{s1:?}");
    assert_eq!(s1["count"], "0");
    assert_eq!(
        s1["mounts"], "rancher",
        "/var/lib/rancher is not on the data disk"
    );
    let seed_dir = b.out.join("nodes/worker-3").canonicalize().unwrap();
    let seed = |f: &str| fs::read_to_string(seed_dir.join(format!("kiln-{f}"))).unwrap();
    assert_eq!(s1["mid"], seed("machine-id").trim());
    assert_eq!(s1["pw"], seed("node-password").trim());
    let table = stdout(
        &Command::new("sfdisk")
            .arg("--dump")
            .arg(&disk)
            .output()
            .unwrap(),
    );
    assert!(table.contains("name=\"kiln-data\""), "{table}");

    let (_, _, s2) = boot(2);
    println!("PXE boot 2 state: {s2:?}");
    assert!(s2["data"].starts_with("kept(/dev/vda"), "{s2:?}");
    assert_eq!(
        s2["count"], "1",
        "the persistent file survived the PXE reboot"
    );
    assert_eq!(s2["eph"], "none", "the ephemeral file did not");
    for k in ["mid", "ssh", "pw"] {
        assert_eq!(s1[k], s2[k], "{k} changed across a PXE reboot");
    }
    let slog = lan.finish(&serve_log);
    for needle in [
        "reply=\"offer\"",
        "/nocloud/52-54-00-00-00-23/meta-data",
        "/nocloud/52-54-00-00-00-23/user-data",
        "root.squashfs",
        "complete=true",
    ] {
        assert!(
            slog.contains(needle),
            "serve log lacks {needle:?}: {}",
            serve_log.display()
        );
    }
    // Addresses came from dnsmasq, never from kiln (yiaddr 0.0.0.0 in every kiln reply).
    assert!(
        !slog.contains("yiaddr=10."),
        "kiln handed out an address in proxy mode"
    );
}

/// Full DHCP mode on an isolated LAN, UEFI (OVMF with iPXE's EFI e1000 driver), a MAC that is
/// not in the inventory and `--default-role worker`: kiln leases the address, iPXE gets the
/// script and starts the worker kernel through the EFI stub with its initrd. The test stops
/// once the kernel prints its command line (the diskless boot itself is the test above).
#[test]
fn privileged_pxe_full_dhcp_uefi_default_role() {
    const T: &str = "privileged_pxe_full_dhcp_uefi_default_role";
    if let Some(r) = missing_pxe_capability() {
        return skip(T, &r);
    }
    if !Path::new(kiln::sys::tools::OVMF_CODE).is_file() {
        return skip(T, "OVMF not installed (apt-get install ovmf)");
    }
    let b = built();
    let tmp = tempfile::tempdir().unwrap();
    let mut lan = Lan::new("f", false);
    let serve_log = b.out.join("pxe-full-serve.log");
    let status = lan.serve(
        b,
        &[
            "--dhcp",
            "full",
            "--dhcp-range",
            "10.231.0.50-10.231.0.60",
            "--default-role",
            "worker",
            "--http-port",
            "8081",
        ],
        &serve_log,
    );
    assert_eq!(status["dhcp_mode"], "full");
    let vars = tmp.path().join("vars.fd");
    fs::copy(kiln::testing::qemu::OVMF_VARS, &vars).unwrap();
    let mut qemu = lan.exec(&lan.ns.clone());
    qemu.args(kiln::testing::qemu::pxe_args(
        kiln::testing::qemu::PxeFirmware::Uefi { vars: &vars },
        &empty_disk(tmp.path()),
        "tap0",
        "52:54:00:77:00:01",
    ));
    let worker = &b.ids["worker"];
    let marker = format!("fetch=http://10.231.0.1:8081/roles/worker/{worker}/root.squashfs");
    let log = b.out.join("boot-pxe-uefi-default.log");
    let booted =
        kiln::testing::qemu::wait_for_marker(qemu, &marker, Duration::from_secs(900), &log)
            .unwrap_or_else(|e| panic!("{e:#}\n(serve log: {})", serve_log.display()));
    println!(
        "UEFI PXE kernel started in {:.0}s",
        booted.elapsed.as_secs_f64()
    );
    assert!(booted.line.contains("initrd=initrd.img"), "{}", booted.line);
    assert!(
        !booted.line.contains("ds=nocloud"),
        "an unknown MAC must not get a seed: {}",
        booted.line
    );
    let slog = lan.finish(&serve_log);
    assert!(
        slog.contains("yiaddr=10.231.0.50"),
        "no lease from kiln in full mode: {}",
        serve_log.display()
    );
    assert!(
        slog.contains("arch=uefi-x64"),
        "the client did not identify as UEFI x64: {}",
        serve_log.display()
    );
    assert!(
        slog.contains("boot script (default role)"),
        "{}",
        serve_log.display()
    );
}

// ---------------------------------------------------------------------------------------
// Node state and identity (issue 18): one storage node, three boots of one writable disk.
// ---------------------------------------------------------------------------------------

/// The test unit baked into every image of the stand-in project: once kiln-data has run, it
/// prints what survived (a counter in a persistent path, a file in an ephemeral one, the
/// identity) and then bumps the counter — one line to read per boot.
pub const STATE_PROBE_UNIT: &str = "[Unit]
Description=kiln test: state probe
After=kiln-data.service kiln-booted.service

[Service]
Type=oneshot
StandardOutput=journal+console
ExecStart=/usr/local/lib/kiln-test-state

[Install]
WantedBy=multi-user.target
";

pub const STATE_PROBE_SCRIPT: &str = r#"#!/bin/sh
n=$(cat /var/lib/rancher/kiln-test-count 2>/dev/null || echo 0)
eph=$(cat /var/tmp/kiln-test 2>/dev/null || echo none)
ssh=$(cut -d ' ' -f 2 /etc/ssh/ssh_host_ed25519_key.pub 2>/dev/null || echo none)
pw=$(cat /etc/rancher/node/password 2>/dev/null || echo none)
lh=$(tr -d '\n ' </run/kiln/longhorn-disks.json 2>/dev/null || echo none)
# Masters: the cluster CA kiln-k3s-ca put in k3s's tls directory before k3s started, and the
# interface kiln-keepalived found for the VIP (each waited for up to 60 s: they run beside
# this probe).
ca=none
vrrp=none
if [ -e /etc/systemd/system/k3s.service ]; then
  i=0
  while [ ! -f /var/lib/rancher/k3s/server/tls/server-ca.crt ] && [ "$i" -lt 60 ]; do sleep 1; i=$((i + 1)); done
  ca=$(sha256sum /var/lib/rancher/k3s/server/tls/server-ca.crt 2>/dev/null | cut -c 1-16)
  [ -n "$ca" ] || ca=none
fi
# Masters: what kiln-k3s-bootstrap decided before k3s started (found, join, restart, ...).
k3s=none
if [ -e /usr/lib/kiln/kiln-k3s-bootstrap ]; then
  i=0
  while [ ! -f /run/kiln/k3s-bootstrap ] && [ "$i" -lt 90 ]; do sleep 1; i=$((i + 1)); done
  k3s=$(cut -d ' ' -f 1 /run/kiln/k3s-bootstrap 2>/dev/null)
  [ -n "$k3s" ] || k3s=none
  # The (stand-in) k3s that starts after the decision leaves etcd data: wait for it, so the
  # test's power-off does not come before it.
  i=0
  while [ ! -d /var/lib/rancher/k3s/server/db/etcd/member/wal ] && [ "$i" -lt 60 ]; do sleep 1; i=$((i + 1)); done
  sync
fi
if [ -d /etc/kiln/keepalived ]; then
  i=0
  while [ ! -f /run/kiln/keepalived.conf ] && [ "$i" -lt 60 ]; do sleep 1; i=$((i + 1)); done
  vrrp=$(sed -n 's/^ *interface //p' /run/kiln/keepalived.conf 2>/dev/null | head -n 1)
  [ -n "$vrrp" ] || vrrp=none
fi
echo "kiln-test-state: host=$(cat /proc/sys/kernel/hostname) count=$n eph=$eph mid=$(cat /etc/machine-id) ssh=$ssh pw=$pw $(cat /run/kiln/data.state 2>/dev/null || echo data=unknown) longhorn=$lh mounts=$(findmnt -n -o TARGET /var/lib/rancher >/dev/null && echo rancher) ca=$ca vrrp=$vrrp k3s=$k3s efi=$(findmnt -n -o FSTYPE /efi 2>/dev/null || echo none) efigen=$([ -f /run/systemd/generator/efi.mount ] && echo yes || echo no) ldp=$(ls /sys/firmware/efi/efivars/ 2>/dev/null | grep -c LoaderDevicePartUUID)"
echo $((n + 1)) >/var/lib/rancher/kiln-test-count
echo here >/var/tmp/kiln-test
sync
echo "kiln-test-state: written"
"#;

/// The inventory entries the stand-in project gains for the state tests: a storage node with
/// three extra disks named by virtio serial (`/dev/disk/by-id/virtio-<serial>`), two blank, one
/// with a foreign file system; a worker that PXE-boots and keeps its state on a data disk
/// (the PXE guests' disk, serial `kiln-pxe-disk`).
pub const STORAGE_NODE: &str = r#"
[[nodes]]
hostname = "storage-1"
mac = "52:54:00:00:00:31"
role = "storage"

[[nodes.disks]]
device = "/dev/disk/by-id/virtio-lh-nvme"
use = "longhorn"
tags = ["nvme", "fast"]

[[nodes.disks]]
device = "/dev/disk/by-id/virtio-lh-sas"
use = "longhorn"
tags = ["sas-ssd"]

[[nodes.disks]]
device = "/dev/disk/by-id/virtio-foreign"
use = "longhorn"

[[nodes]]
hostname = "worker-3"
mac = "52:54:00:00:00:23"
role = "worker"

[[nodes.disks]]
device = "/dev/disk/by-id/virtio-kiln-pxe-disk"
use = "data"
"#;

/// One `kiln-test-state:` line, as key → value.
fn state_line(log: &Path) -> BTreeMap<String, String> {
    let console = fs::read_to_string(log).unwrap();
    let line = console
        .lines()
        .find(|l| l.contains("kiln-test-state: host="))
        .unwrap_or_else(|| panic!("no state line in {}", log.display()));
    line[line.find("host=").unwrap()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Boots `disk` (written for real) as storage-1 with its three extra disks; returns the state
/// line.
fn boot_storage(disk: &Path, extra: &[(&Path, &str)], log: &Path) -> BTreeMap<String, String> {
    boot_state(disk, "52:54:00:00:00:31", extra, log)
}

/// A UEFI machine with `mac`, its writable boot `disk` and `extra` disks (image, virtio serial).
fn state_machine(disk: &Path, mac: &str, extra: &[(&Path, &str)], vars: &Path) -> Command {
    let mut cmd =
        kiln::testing::qemu::uefi_disk_command_with(disk, vars, 2048, Some(mac), true).unwrap();
    for (i, (img, serial)) in extra.iter().enumerate() {
        cmd.args([
            "-drive",
            &format!("file={},if=none,id=x{i},format=raw", img.display()),
            "-device",
            &format!("virtio-blk-pci,drive=x{i},serial={serial}"),
        ]);
    }
    cmd
}

/// Boots [`state_machine`] until the state probe has written; returns its state line.
fn boot_state(
    disk: &Path,
    mac: &str,
    extra: &[(&Path, &str)],
    log: &Path,
) -> BTreeMap<String, String> {
    let tmp = tempfile::tempdir().unwrap();
    let cmd = state_machine(disk, mac, extra, &tmp.path().join("vars.fd"));
    let booted = kiln::testing::qemu::wait_for_marker(
        cmd,
        "kiln-test-state: written",
        Duration::from_secs(1500),
        log,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "{mac} booted in {:.0}s ({})",
        booted.elapsed.as_secs_f64(),
        log.display()
    );
    state_line(log)
}

fn sha256_file(p: &Path) -> String {
    kiln::sys::util::sha256_hex(&fs::read(p).unwrap())
}

/// storage-1's node disk, flashed to a larger disk file: the first boot makes kiln-root-b and
/// kiln-data, formats and mounts the two blank Longhorn disks (listed for Longhorn with their
/// tags) and leaves the foreign one alone; a reboot keeps the persistent file and drops the
/// ephemeral one; a `--keep-data` reflash of a *new* build keeps the data, a plain reflash
/// does not; machine-id, SSH host key and k3s node password never change, match what kiln
/// derived, differ from another node's, and the node password passes the k3s server model.
#[test]
fn slow_state_storage_node_reboot_and_reflash() {
    let name = "slow_state_storage_node_reboot_and_reflash";
    if let Some(r) = missing_build_capability() {
        return skip(name, &r);
    }
    if !which("qemu-system-x86_64") || !Path::new(kiln::sys::tools::OVMF_CODE).is_file() {
        return skip(
            name,
            "qemu-system-x86_64 or OVMF not installed (apt-get install qemu-system-x86 ovmf)",
        );
    }
    let b = built();
    // Outside out/: kiln flash refuses targets inside the output directory.
    let work = b.out.parent().unwrap().join("state-test");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let flash = |out: &Path, args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("--dir")
            .arg(&b.project)
            .arg("--out")
            .arg(out)
            .arg("flash")
            .args(args)
            .output()
            .unwrap();
        (o.status.code(), stdout(&o), stderr(&o))
    };
    let disk = work.join("storage-1.img");
    let (rc, _, e) = flash(&b.out, &["storage-1", disk.to_str().unwrap()]);
    assert_eq!(rc, Some(0), "{e}");
    // The machine's disk is larger than the image: the rest becomes kiln-root-b and kiln-data.
    let grow = |p: &Path| {
        let f = fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(f.metadata().unwrap().len() + 4 * 1024 * 1024 * 1024)
            .unwrap();
    };
    grow(&disk);
    // --keep-data on a disk that has no data partition yet: refused, untouched.
    let before = sha256_file(&disk);
    let (rc, _, e) = flash(
        &b.out,
        &["--keep-data", "storage-1", disk.to_str().unwrap()],
    );
    assert_eq!(rc, Some(2), "{e}");
    assert!(e.contains("no kiln-data partition"), "{e}");
    assert_eq!(sha256_file(&disk), before);

    let blank = |n: &str| {
        let p = work.join(n);
        let f = fs::File::create(&p).unwrap();
        f.set_len(512 * 1024 * 1024).unwrap();
        p
    };
    let nvme = blank("lh-nvme.img");
    let sas = blank("lh-sas.img");
    let foreign = blank("foreign.img");
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "someone-else"])
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let foreign_sha = sha256_file(&foreign);
    let extra: [(&Path, &str); 3] = [(&nvme, "lh-nvme"), (&sas, "lh-sas"), (&foreign, "foreign")];

    // Identity as kiln derived it (the seed's files).
    let seed_dir = b.out.join("nodes/storage-1").canonicalize().unwrap();
    let seed_file = |f: &str| fs::read_to_string(seed_dir.join(format!("kiln-{f}"))).ok();

    // Boot 1: first boot.
    let s1 = boot_storage(&disk, &extra, &work.join("boot-1.log"));
    println!("boot 1: {s1:?}");
    assert_eq!(s1["host"], "storage-1");
    assert_eq!(s1["count"], "0");
    assert!(s1["data"].starts_with("new("), "{s1:?}");
    // The ESP systemd-boot started from is at /efi (kiln-esp-generator).
    assert_eq!(s1["efi"], "vfat", "{s1:?}");
    let want_mid = seed_file("machine-id").expect("the seed carries kiln/machine-id");
    assert_eq!(s1["mid"], want_mid.trim(), "machine-id is the derived one");
    assert_ne!(s1["ssh"], "none");
    assert_ne!(s1["pw"], "none");
    let lh = &s1["longhorn"];
    assert!(
        lh.contains(r#""path":"/var/lib/longhorn-disks/disk0","allowScheduling":true,"tags":["nvme","fast"]"#)
            && lh.contains(r#""path":"/var/lib/longhorn-disks/disk1","allowScheduling":true,"tags":["sas-ssd"]"#),
        "{lh}"
    );
    assert!(
        !lh.contains("disk2"),
        "the foreign disk is not offered to Longhorn: {lh}"
    );
    let disks = s1.get("disks").cloned().unwrap_or_default();
    assert!(
        disks.contains("foreign(/dev/disk/by-id/virtio-foreign)"),
        "{s1:?}"
    );
    assert_eq!(
        sha256_file(&foreign),
        foreign_sha,
        "the foreign disk was written to"
    );
    let o = Command::new("sfdisk")
        .arg("--dump")
        .arg(&disk)
        .output()
        .unwrap();
    let table = stdout(&o);
    for n in ["kiln-root-a", "kiln-seed", "kiln-root-b", "kiln-data"] {
        assert!(
            table.contains(&format!("name=\"{n}\"")),
            "{n} missing:\n{table}"
        );
    }
    let mut model = kiln::testing::k3s::NodePasswords::new();
    model.verify("storage-1", &s1["pw"]).unwrap();

    // Boot 2: a reboot of the same disk.
    let s2 = boot_storage(&disk, &extra, &work.join("boot-2.log"));
    println!("boot 2: {s2:?}");
    assert_eq!(s2["count"], "1", "the persistent file survived the reboot");
    assert_eq!(s2["eph"], "none", "the ephemeral file did not");
    assert!(s2["data"].starts_with("kept("), "{s2:?}");
    for k in ["mid", "ssh", "pw", "longhorn"] {
        assert_eq!(s1[k], s2[k], "{k} changed across a reboot");
    }

    // A new build of the storage role (another overlay byte) from a copy of the project.
    let p2 = work.join("project2");
    copy_tree(&b.project, &p2);
    edit(&p2, "overlays/common/etc/motd.tera", "\n", "\n\n");
    let out2 = work.join("out2");
    let o = run_build(&p2, &out2, &shared_cache(), &["--role", "storage"]);
    assert!(o.status.success(), "rebuild failed:\n{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id2 = v["roles"][0]["build_id"].as_str().unwrap().to_string();
    assert_ne!(id2, b.ids["storage"]);
    let (rc, out, e) = flash(
        &out2,
        &["--keep-data", "--json", "storage-1", disk.to_str().unwrap()],
    );
    assert_eq!(rc, Some(0), "{e}");
    assert!(out.contains("kiln-data"), "{out}");
    let s3 = boot_storage(&disk, &extra, &work.join("boot-3.log"));
    println!("boot 3: {s3:?}");
    let console = fs::read_to_string(work.join("boot-3.log")).unwrap();
    assert!(
        console.contains(&format!("build={id2}")),
        "boot 3 is not the new build"
    );
    assert_eq!(s3["count"], "2", "--keep-data kept the data");
    assert!(s3["data"].starts_with("kept("), "{s3:?}");
    for k in ["mid", "ssh", "pw", "longhorn"] {
        assert_eq!(s1[k], s3[k], "{k} changed across a --keep-data reflash");
    }
    model.verify("storage-1", &s3["pw"]).unwrap();

    // A plain reflash makes a disk with no data partition (the next boot makes a new, empty
    // one, as boot 1 did) and the same identity in its seed.
    let (rc, _, e) = flash(&out2, &["storage-1", disk.to_str().unwrap()]);
    assert_eq!(rc, Some(0), "{e}");
    let o = Command::new("sfdisk")
        .arg("--dump")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(!stdout(&o).contains("kiln-data"), "{}", stdout(&o));
    let seed2 = out2.join("nodes/storage-1").canonicalize().unwrap();
    for f in ["machine-id", "node-password", "ssh-host-ed25519-key.pub"] {
        assert_eq!(
            fs::read(seed2.join(format!("kiln-{f}"))).unwrap(),
            fs::read(seed_dir.join(format!("kiln-{f}"))).unwrap(),
            "{f} differs between two builds"
        );
    }
    // Another node has another identity.
    let other = b.out.join("nodes/worker-1");
    for f in ["machine-id", "node-password", "ssh-host-ed25519-key.pub"] {
        assert_ne!(
            fs::read(other.join(format!("kiln-{f}"))).unwrap(),
            fs::read(seed_dir.join(format!("kiln-{f}"))).unwrap(),
            "{f} is the same on two nodes"
        );
    }
    // A password another node would present for storage-1 is refused by the server model.
    let wrong = fs::read_to_string(other.join("kiln-node-password")).unwrap();
    assert!(model.verify("storage-1", wrong.trim()).is_err());
}

/// A disk file's GPT partition named `name`: (first byte, length).
fn gpt_partition(disk: &Path, name: &str) -> Option<(u64, u64)> {
    let mut f = fs::File::open(disk).unwrap();
    let t = kiln::formats::disk::read_gpt(&mut f).unwrap();
    t.partitions
        .iter()
        .find(|p| p.name_text() == name)
        .map(|p| (p.first_lba * 512, (p.last_lba + 1 - p.first_lba) * 512))
}

/// `e2fsck -fn` of the ext4 file system at `part` of `disk` (copied out sparsely): its exit
/// status and output. 0 = clean.
fn fsck_partition(disk: &Path, part: (u64, u64), scratch: &Path) -> (i32, String) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut src = fs::File::open(disk).unwrap();
    src.seek(SeekFrom::Start(part.0)).unwrap();
    let mut dst = fs::File::create(scratch).unwrap();
    dst.set_len(part.1).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < part.1 {
        let n = buf.len().min((part.1 - done) as usize);
        src.read_exact(&mut buf[..n]).unwrap();
        if buf[..n].iter().any(|b| *b != 0) {
            dst.seek(SeekFrom::Start(done)).unwrap();
            dst.write_all(&buf[..n]).unwrap();
        }
        done += n as u64;
    }
    drop(dst);
    let o = Command::new("e2fsck")
        .arg("-fn")
        .arg(scratch)
        .output()
        .unwrap();
    let _ = fs::remove_file(scratch);
    (o.status.code().unwrap_or(-1), stdout(&o) + &stderr(&o))
}

/// master-1's node disk on a larger disk file: the first boot is killed (a power cut) while
/// systemd-repart adds kiln-root-b and kiln-data, the second just after repart finished; the
/// next boot finishes the job (a new, clean data partition, the probe's file written) and a
/// reboot keeps the file, the etcd directory on the data partition, and machine-id, SSH host
/// key and k3s node password, which are the ones kiln derived for master-1 and not storage-1's.
#[test]
fn slow_state_master_power_cut_during_first_boot() {
    let name = "slow_state_master_power_cut_during_first_boot";
    if let Some(r) = missing_build_capability() {
        return skip(name, &r);
    }
    if !which("qemu-system-x86_64") || !Path::new(kiln::sys::tools::OVMF_CODE).is_file() {
        return skip(
            name,
            "qemu-system-x86_64 or OVMF not installed (apt-get install qemu-system-x86 ovmf)",
        );
    }
    if !which("e2fsck") {
        return skip(name, "e2fsck not installed (apt-get install e2fsprogs)");
    }
    let b = built();
    let work = b.out.parent().unwrap().join("state-master");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();
    let disk = work.join("master-1.img");
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--dir")
        .arg(&b.project)
        .arg("--out")
        .arg(&b.out)
        .args(["flash", "master-1"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    {
        let f = fs::OpenOptions::new().write(true).open(&disk).unwrap();
        f.set_len(f.metadata().unwrap().len() + 4 * 1024 * 1024 * 1024)
            .unwrap();
    }
    const MAC: &str = "52:54:00:00:00:11";

    // Boot 1: power cut one second after kiln-data starts systemd-repart.
    let tmp = tempfile::tempdir().unwrap();
    let log1 = work.join("boot-1.log");
    let cut = kiln::testing::qemu::wait_for_marker_then_kill(
        state_machine(&disk, MAC, &[], &tmp.path().join("vars.fd")),
        "kiln-data: making kiln-root-b and kiln-data",
        Duration::from_secs(1),
        Duration::from_secs(1500),
        &log1,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let after_cut = gpt_partition(&disk, "kiln-data");
    println!(
        "boot 1 cut {:.0}s in, 1 s after repart started; kiln-data afterwards: {after_cut:?}",
        cut.elapsed.as_secs_f64()
    );
    assert!(
        !fs::read_to_string(&log1)
            .unwrap()
            .contains("kiln-test-state: written"),
        "the cut came too late: the boot had finished ({})",
        log1.display()
    );
    // Boot 1b: repart finishes this time (or finds its partitions made); power cut one second
    // after, while kiln-data checks, mounts and fills the new file system.
    let log1b = work.join("boot-1b.log");
    let cut = kiln::testing::qemu::wait_for_marker_then_kill(
        state_machine(&disk, MAC, &[], &tmp.path().join("vars.fd")),
        "kiln-data: systemd-repart took",
        Duration::from_secs(1),
        Duration::from_secs(1500),
        &log1b,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "boot 1b cut {:.0}s in, 1 s after repart finished ({})",
        cut.elapsed.as_secs_f64(),
        cut.line
    );
    assert!(
        gpt_partition(&disk, "kiln-data").is_some(),
        "repart finished but the table has no kiln-data"
    );

    // Boot 2 finishes the job.
    let s2 = boot_state(&disk, MAC, &[], &work.join("boot-2.log"));
    println!("boot 2: {s2:?}");
    assert_eq!(s2["host"], "master-1");
    // "new" when the cut came before the owner tag was written, else "kept": either way the
    // node's own, mounted data partition.
    assert!(
        s2["data"].starts_with("new(") || s2["data"].starts_with("kept("),
        "{s2:?}"
    );
    assert_eq!(s2["count"], "0");
    assert_eq!(
        s2["mounts"], "rancher",
        "/var/lib/rancher is not on kiln-data"
    );
    let part = gpt_partition(&disk, "kiln-data").expect("kiln-data after boot 2");
    assert!(gpt_partition(&disk, "kiln-root-b").is_some());

    // Boot 3: a reboot keeps the state and the identity.
    let s3 = boot_state(&disk, MAC, &[], &work.join("boot-3.log"));
    println!("boot 3: {s3:?}");
    assert!(s3["data"].starts_with("kept("), "{s3:?}");
    assert_eq!(s3["count"], "1", "the persistent file survived the reboot");
    assert_eq!(s3["eph"], "none", "the ephemeral file did not");
    for k in ["mid", "ssh", "pw"] {
        assert_eq!(s2[k], s3[k], "{k} changed across a reboot");
    }
    assert_eq!(
        gpt_partition(&disk, "kiln-data"),
        Some(part),
        "kiln-data moved"
    );
    // kiln-k3s-ca gave k3s the cluster's server CA from keys/ (kept on kiln-data), and
    // kiln-keepalived found the interface with master-1's address for the VIP.
    let ca = fs::read(b.project.join("keys/k3s-server-ca.crt")).unwrap();
    let want = &kiln::sys::util::sha256_hex(&ca)[..16];
    // kiln-k3s-bootstrap: boot 2 (empty etcd, no other master answers) founds after the
    // founding wait; boot 3 restarts from the etcd data the stand-in k3s left on kiln-data.
    assert_eq!(s2["k3s"], "found", "{s2:?}");
    assert_eq!(s3["k3s"], "restart", "{s3:?}");
    for s in [&s2, &s3] {
        assert_eq!(s["ca"], want, "k3s's server CA is not keys/': {s:?}");
        assert_ne!(s["vrrp"], "none", "keepalived got no configuration: {s:?}");
    }
    let (rc, out) = fsck_partition(&disk, part, &work.join("data.ext4"));
    assert_eq!(
        rc, 0,
        "kiln-data is not clean after the cut and two boots:\n{out}"
    );

    // master-1's identity is the one kiln derived for it, not another node's.
    let seed = |host: &str, f: &str| {
        let d = b.out.join("nodes").join(host).canonicalize().unwrap();
        fs::read_to_string(d.join(format!("kiln-{f}"))).unwrap()
    };
    assert_eq!(s3["mid"], seed("master-1", "machine-id").trim());
    assert_eq!(s3["pw"], seed("master-1", "node-password").trim());
    let pubkey = seed("master-1", "ssh-host-ed25519-key.pub");
    assert_eq!(s3["ssh"], pubkey.split_whitespace().nth(1).unwrap());
    for f in ["machine-id", "node-password", "ssh-host-ed25519-key.pub"] {
        assert_ne!(seed("master-1", f), seed("storage-1", f), "{f}");
    }
}
