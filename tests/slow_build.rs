//! Slow tests: a real mmdebstrap base, a real build of the worker role, reproducibility with a
//! fresh cache, the artifacts read back with independent tools, and a UEFI boot under qemu TCG.
//!
//! They need root (mmdebstrap --mode=root and file ownership in the image), mmdebstrap and
//! tar2sqfs; the boot test needs qemu-system-x86_64 and OVMF. Missing capabilities print
//! `SKIP: <reason>`. The base is cached in `target/kiln-test-cache/` (override with
//! KILN_TEST_CACHE) and shared by every test here; one build is shared through a OnceLock.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

struct Built {
    project: PathBuf,
    out: PathBuf,
    dir: PathBuf,
    build_id: String,
}

fn cache_dir() -> PathBuf {
    std::env::var_os("KILN_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/kiln-test-cache"))
}

fn missing_build_capability() -> Option<String> {
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

fn run_build(project: &Path, out: &Path, cache: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["--dir"])
        .arg(project)
        .arg("--out")
        .arg(out)
        .args(["build", "--role", "worker", "--json", "--cache-dir"])
        .arg(cache)
        .output()
        .expect("run kiln")
}

/// The shared first build (cached base).
fn built() -> &'static Built {
    static B: OnceLock<Built> = OnceLock::new();
    B.get_or_init(|| {
        let root = tempfile::Builder::new()
            .prefix("kiln-slow-")
            .tempdir()
            .unwrap()
            .keep();
        let project = root.join("project");
        copy_tree(&repo_root().join("recipes"), &project.join("recipes"));
        copy_tree(&repo_root().join("overlays"), &project.join("overlays"));
        let out = root.join("out");
        let o = run_build(&project, &out, &cache_dir());
        assert!(o.status.success(), "build failed:\n{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let build_id = v[0]["build_id"].as_str().unwrap().to_string();
        Built {
            dir: out.join("worker").join(&build_id),
            project,
            out,
            build_id,
        }
    })
}

const ARTIFACTS: &[&str] = &[
    "SHA256SUMS",
    "disk.qcow2",
    "disk.raw",
    "initrd.img",
    "manifest.json",
    "packages.json",
    "packages.txt",
    "root.squashfs",
    "rootfs.tar.zst",
    "vmlinuz",
];

#[test]
fn slow_build_layout_and_manifest() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_build_layout_and_manifest", &r);
    }
    let b = built();
    for a in ARTIFACTS {
        assert!(b.dir.join(a).is_file(), "{a} missing");
    }
    let names: Vec<String> = fs::read_dir(&b.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names.len(),
        ARTIFACTS.len(),
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
    assert_eq!(m["contains_secrets"], false);
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
    for a in ARTIFACTS
        .iter()
        .filter(|a| !matches!(**a, "SHA256SUMS" | "manifest.json"))
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
    let mut first = true;
    for e in ar.entries().unwrap() {
        if first {
            let e = e.unwrap();
            assert_eq!(
                &e.header().as_old().name[..3],
                b"./\0",
                "the root directory entry comes first"
            );
            first = false;
            continue;
        }
        let e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().into_owned();
        if p == "etc/kiln/build.json" || p == "etc/hostname" {
            assert_eq!(e.header().mtime().unwrap(), 1_700_000_000);
            assert_eq!(e.header().uid().unwrap(), 0);
            seen += 1;
        }
    }
    assert_eq!(seen, 2);

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
        assert_eq!(parts.len(), 2);
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
            .args(["-i", &img, "::/loader/entries/kiln.conf"])
            .env("MTOOLS_SKIP_CHECK", "1")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let entry = stdout(&o);
        assert!(
            entry.contains("linux /kiln/vmlinuz")
                && entry.contains("boot=live plainroot root=/dev/disk/by-partuuid/"),
            "{entry}"
        );
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
    let project = root.path().join("project");
    copy_tree(&b.project.join("recipes"), &project.join("recipes"));
    copy_tree(&b.project.join("overlays"), &project.join("overlays"));
    let out = root.path().join("out");
    let o = run_build(&project, &out, &root.path().join("fresh-cache"));
    assert!(o.status.success(), "second build failed:\n{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v[0]["base_cached"], false,
        "the second build must not reuse the cache"
    );
    let dir2 = out.join("worker").join(&b.build_id);
    assert!(dir2.is_dir(), "same inputs must give the same build id");
    let sums1 = fs::read_to_string(b.dir.join("SHA256SUMS")).unwrap();
    let sums2 = fs::read_to_string(dir2.join("SHA256SUMS")).unwrap();
    let mut differ = Vec::new();
    for a in ARTIFACTS {
        if fs::read(b.dir.join(a)).unwrap() != fs::read(dir2.join(a)).unwrap() {
            differ.push(*a);
        }
    }
    assert!(
        differ.is_empty(),
        "artifacts differ between two builds: {differ:?}\n{sums1}\n{sums2}"
    );
    assert_eq!(sums1, sums2);
}

#[test]
fn slow_boot_uefi_disk_prints_marker() {
    if let Some(r) = missing_build_capability() {
        return skip("slow_boot_uefi_disk_prints_marker", &r);
    }
    if !which("qemu-system-x86_64") || !Path::new(kiln::tools::OVMF_CODE).is_file() {
        return skip(
            "slow_boot_uefi_disk_prints_marker",
            "qemu-system-x86_64 or OVMF not installed (apt-get install qemu-system-x86 ovmf)",
        );
    }
    let b = built();
    let tmp = tempfile::tempdir().unwrap();
    let cmd =
        kiln::qemu::uefi_disk_command(&b.dir.join("disk.qcow2"), &tmp.path().join("vars.fd"), 2048)
            .unwrap();
    let marker = format!("kiln: booted role=worker build={}", b.build_id);
    let log = b.out.join("boot-uefi.log");
    let booted = kiln::qemu::wait_for_marker(cmd, &marker, Duration::from_secs(900), &log)
        .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "booted in {:.0}s: {}",
        booted.elapsed.as_secs_f64(),
        booted.line
    );
    assert!(
        booted.line.contains("hostname=homelab-worker"),
        "{}",
        booted.line
    );
}
