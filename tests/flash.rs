//! `kiln flash` through the binary: image files always; a loop device when running as root.

mod signing;

use signing::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const IMAGE_SIZE: u64 = 32 << 20;

/// Non-zero data at a few offsets of the fake image: (offset, bytes).
fn image_data() -> Vec<(u64, Vec<u8>)> {
    vec![
        (0, b"\xeb\x63\x90 fake MBR".to_vec()),
        (512, b"EFI PART".to_vec()),
        (5 << 20, vec![0x5a; 3 * 4096 + 17]),
        (IMAGE_SIZE - 4096, vec![0xee; 4096]),
    ]
}

/// Writes a sparse fake `disk.raw` of `size` bytes with [`image_data`].
fn write_image(path: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for (off, b) in image_data() {
        if off + b.len() as u64 <= size {
            f.write_all_at(&b, off).unwrap();
        }
    }
}

/// A project: keys/ (seed 7) and out/nodes/node1/ with disk.raw, disk.qcow2, seeds, signed.
fn project() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let key = test_key(7);
    write_keys(&d.path().join("keys"), &key);
    make_node(&d.path().join("out/nodes/node1"), &key, IMAGE_SIZE);
    d
}

fn make_node(dir: &Path, key: &ed25519_dalek::SigningKey, size: u64) {
    fs::create_dir_all(dir).unwrap();
    write_image(&dir.join("disk.raw"), size);
    fs::write(dir.join("disk.qcow2"), b"QFI\xfb not really").unwrap();
    fs::write(dir.join("user-data"), b"#cloud-config\nhostname: node1\n").unwrap();
    fs::write(dir.join("meta-data"), b"instance-id: node1\n").unwrap();
    write_sums_and_sign(
        dir,
        &["disk.raw", "disk.qcow2", "user-data", "meta-data"],
        key,
    );
}

fn flash(d: &Path, host: &str, target: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "--dir",
        d.to_str().unwrap(),
        "flash",
        host,
        target.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn image(d: &Path) -> PathBuf {
    d.join("out/nodes/node1/disk.raw")
}

#[test]
fn flash_to_a_new_file_is_identical_and_sparse() {
    let d = project();
    let t = d.path().join("node1.img");
    let (code, stdout, stderr) = flash(d.path(), "node1", &t, &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("read back: sha256 matches"), "{stdout}");
    assert!(stdout.contains("new image file"), "{stdout}");
    assert_eq!(fs::read(&t).unwrap(), fs::read(image(d.path())).unwrap());
    let md = fs::metadata(&t).unwrap();
    assert_eq!(md.len(), IMAGE_SIZE);
    // Only the data blocks are allocated (the file system may round up a little).
    assert!(
        md.blocks() * 512 < 1 << 20,
        "{} bytes allocated",
        md.blocks() * 512
    );
    // No temp files left next to it.
    let names: Vec<_> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(".kiln-flash")),
        "{names:?}"
    );
}

#[test]
fn flash_replaces_a_stale_larger_file_completely() {
    let d = project();
    let t = d.path().join("old.img");
    fs::write(&t, vec![0xaa; (IMAGE_SIZE + (3 << 20)) as usize]).unwrap();
    fs::set_permissions(&t, fs::Permissions::from_mode(0o640)).unwrap();
    let (code, stdout, stderr) = flash(d.path(), "node1", &t, &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("existing file"), "{stdout}");
    assert_eq!(fs::read(&t).unwrap(), fs::read(image(d.path())).unwrap());
    assert_eq!(
        fs::metadata(&t).unwrap().permissions().mode() & 0o777,
        0o640
    );
}

#[test]
fn dry_run_writes_nothing() {
    let d = project();
    let t = d.path().join("node1.img");
    let (code, stdout, stderr) = flash(d.path(), "node1", &t, &["--dry-run"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!t.exists());
    let (sha, _) = kiln::sys::util::sha256_file(&image(d.path())).unwrap();
    for want in [
        "dry run",
        "nothing was written",
        &sha,
        &IMAGE_SIZE.to_string(),
        "node1.img",
    ] {
        assert!(stdout.contains(want), "{want:?} not in {stdout}");
    }
    // Existing targets are untouched too.
    fs::write(&t, b"keep me").unwrap();
    let (code, _, _) = flash(d.path(), "node1", &t, &["--dry-run"]);
    assert_eq!(code, 0);
    assert_eq!(fs::read(&t).unwrap(), b"keep me");
}

#[test]
fn json_summary() {
    let d = project();
    let t = d.path().join("n.img");
    let (code, stdout, stderr) = flash(d.path(), "node1", &t, &["--json"]);
    assert_eq!(code, 0, "{stderr}");
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["hostname"], "node1");
    assert_eq!(j["image_size"], IMAGE_SIZE);
    assert_eq!(j["target"]["kind"], "new_file");
    assert_eq!(j["written"], true);
    assert_eq!(j["verified_after_write"], true);
    assert!(j["bytes_written"].as_u64().unwrap() < 1 << 20);
}

#[test]
fn tampered_image_is_refused_and_the_target_untouched() {
    let d = project();
    let img = image(d.path());
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(b"evil", 9 << 20).unwrap();
    }
    let existing = d.path().join("existing.img");
    fs::write(&existing, b"previous contents").unwrap();
    let (code, _, stderr) = flash(d.path(), "node1", &existing, &[]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("disk.raw") && stderr.contains("does not match"),
        "{stderr}"
    );
    assert_eq!(fs::read(&existing).unwrap(), b"previous contents");

    let new = d.path().join("new.img");
    let (code, _, _) = flash(d.path(), "node1", &new, &[]);
    assert_eq!(code, 3);
    assert!(!new.exists());
}

#[test]
fn tampered_sums_and_wrong_key_are_refused() {
    let d = project();
    let sums = d.path().join("out/nodes/node1/SHA256SUMS");
    let orig = fs::read_to_string(&sums).unwrap();
    fs::write(&sums, orig.replace("user-data", "user-dat4")).unwrap();
    let t = d.path().join("t.img");
    let (code, _, stderr) = flash(d.path(), "node1", &t, &[]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("SHA256SUMS.sig"), "{stderr}");
    fs::write(&sums, orig).unwrap();

    let other = d.path().join("other.pub");
    let (_, public) = kiln::trust::keys::encode_signing_key(&test_key(8)).unwrap();
    fs::write(&other, public).unwrap();
    let (code, _, stderr) = flash(d.path(), "node1", &t, &["--key", other.to_str().unwrap()]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("signed by key"), "{stderr}");
    assert!(!t.exists());
}

#[test]
fn image_must_be_listed_in_the_signed_sums() {
    let d = project();
    let dir = d.path().join("out/nodes/node1");
    write_sums_and_sign(
        &dir,
        &["disk.qcow2", "user-data", "meta-data"],
        &test_key(7),
    );
    let (code, _, stderr) = flash(d.path(), "node1", &d.path().join("t.img"), &[]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("disk.raw is not listed"), "{stderr}");
}

#[test]
fn unknown_hostname_lists_the_known_ones() {
    let d = project();
    fs::create_dir_all(d.path().join("out/nodes/node2")).unwrap();
    let (code, _, stderr) = flash(d.path(), "nodeX", &d.path().join("t.img"), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no node \"nodeX\""), "{stderr}");
    assert!(stderr.contains("known nodes: node1, node2"), "{stderr}");

    let empty = tempfile::tempdir().unwrap();
    write_keys(&empty.path().join("keys"), &test_key(7));
    let (code, _, stderr) = flash(empty.path(), "node1", &empty.path().join("t"), &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no node outputs exist"), "{stderr}");

    let (code, _, stderr) = flash(d.path(), "../node1", &d.path().join("t.img"), &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("not a valid host name"), "{stderr}");
}

#[test]
fn node_dir_may_be_a_symlink_and_out_is_global() {
    let d = tempfile::tempdir().unwrap();
    let key = test_key(7);
    write_keys(&d.path().join("keys"), &key);
    let real = d.path().join("builds/node1-abc");
    make_node(&real, &key, IMAGE_SIZE);
    let out = d.path().join("elsewhere");
    fs::create_dir_all(out.join("nodes")).unwrap();
    std::os::unix::fs::symlink(&real, out.join("nodes/node1")).unwrap();
    let t = d.path().join("t.img");
    let (code, stdout, stderr) = run(&[
        "--dir",
        d.path().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "flash",
        "node1",
        t.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(
        fs::read(&t).unwrap(),
        fs::read(real.join("disk.raw")).unwrap()
    );
}

#[test]
fn directory_and_character_device_targets_are_refused() {
    let d = project();
    let (code, _, stderr) = flash(d.path(), "node1", d.path(), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is a directory"), "{stderr}");

    let (code, _, stderr) = flash(d.path(), "node1", Path::new("/dev/null"), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("/dev/null is a character device"),
        "{stderr}"
    );

    let (code, _, stderr) = flash(d.path(), "node1", &d.path().join("no/such/dir/t.img"), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");

    let img = image(d.path());
    let (code, _, stderr) = flash(d.path(), "node1", &img, &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("source image itself"), "{stderr}");
}

#[test]
fn missing_key_says_how_to_fix() {
    let d = project();
    fs::remove_file(d.path().join("keys/signing_ed25519.pub")).unwrap();
    let (code, _, stderr) = flash(d.path(), "node1", &d.path().join("t"), &[]);
    assert_eq!(code, 1);
    assert!(stderr.contains("kiln keys init"), "{stderr}");
}

/// A loop device over a backing file, detached on drop.
struct Loop(String);

impl Loop {
    fn new(backing: &Path) -> Result<Loop, String> {
        let o = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(Loop(String::from_utf8_lossy(&o.stdout).trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn read_dev(dev: &str, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut v = vec![0u8; len];
    fs::File::open(dev).unwrap().read_exact(&mut v).unwrap();
    v
}

/// Root only: a loop device stands in for a disk (size ioctl, O_EXCL, mount check, full write,
/// tail wipe, confirmation).
#[test]
fn privileged_flash_to_a_loop_device() {
    const T: &str = "privileged_flash_to_a_loop_device";
    // SAFETY: geteuid has no preconditions.
    if !std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
    {
        println!("SKIP: {T}: needs root for loop devices");
        return;
    }
    let d = project();
    let backing = d.path().join("disk.backing");
    let dev_size = IMAGE_SIZE + (8 << 20);
    fs::write(&backing, vec![0xaa; dev_size as usize]).unwrap();
    let lo = match Loop::new(&backing) {
        Ok(l) => l,
        Err(e) => {
            println!("SKIP: {T}: {e}");
            return;
        }
    };
    let dev = Path::new(&lo.0);

    // No terminal, no --yes: refused, nothing written.
    let (code, _, stderr) = flash(d.path(), "node1", dev, &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("stdin is not a terminal"), "{stderr}");
    assert!(read_dev(&lo.0, 4096).iter().all(|&b| b == 0xaa));

    let (code, stdout, stderr) = flash(d.path(), "node1", dev, &["--dry-run"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("block device loop"), "{stdout}");
    assert!(stdout.contains(&dev_size.to_string()), "{stdout}");

    // Claimed exclusively by someone else: refused.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _claim = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(dev)
            .unwrap();
        let (code, _, stderr) = flash(d.path(), "node1", dev, &["--yes"]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("is in use"), "{stderr}");
    }

    let (code, stdout, stderr) = flash(d.path(), "node1", dev, &["--yes"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    let all = read_dev(&lo.0, dev_size as usize);
    let img = fs::read(image(d.path())).unwrap();
    // Every byte of the image, zeros included, replaced the stale 0xaa.
    assert!(
        all[..img.len()] == img[..],
        "device does not hold the image"
    );
    let tail = &all[(dev_size - (1 << 20)) as usize..];
    assert!(tail.iter().all(|&b| b == 0), "the last MiB was not wiped");
    assert!(all[img.len()..img.len() + 4096].iter().all(|&b| b == 0xaa));

    // Mounted: refused, naming the mount point.
    let fs_ok = Command::new("mkfs.ext4")
        .args(["-q", "-F", &lo.0])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mounted = fs_ok
        && Command::new("mount")
            .arg(&lo.0)
            .arg(&mnt)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    if mounted {
        let _m = Mounted(mnt.clone());
        let (code, _, stderr) = flash(d.path(), "node1", dev, &["--yes", "--dry-run"]);
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.contains(&format!("is mounted on {}", mnt.display())),
            "{stderr}"
        );
    } else {
        println!("SKIP: {T}: mount check (cannot mkfs.ext4 + mount a loop device here)");
    }

    // Too small.
    let small = d.path().join("small.backing");
    fs::write(&small, vec![0u8; 4 << 20]).unwrap();
    let lo2 = Loop::new(&small).unwrap();
    let (code, _, stderr) = flash(d.path(), "node1", Path::new(&lo2.0), &["--yes"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("too small"), "{stderr}");
}

#[test]
fn targets_kiln_must_not_lose_are_refused() {
    let d = project();
    let root = d.path();
    fs::create_dir_all(root.join("recipes")).unwrap();
    fs::write(root.join("recipes/cluster.toml"), "[cluster]\n").unwrap();
    std::os::unix::fs::symlink(
        root.join("keys/signing_ed25519.pem"),
        root.join("innocent.img"),
    )
    .unwrap();
    let cases: [(PathBuf, &str); 7] = [
        (
            root.join("out/nodes/node1/SHA256SUMS"),
            "node's output directory",
        ),
        (root.join("keys/signing_ed25519.pem"), "keys directory"),
        (root.join("keys/new.img"), "keys directory"),
        (root.join("out/node1.img"), "output directory"),
        (root.join("recipes/cluster.toml"), "recipes directory"),
        (root.join("innocent.img"), "keys directory"),
        (
            PathBuf::from(env!("CARGO_BIN_EXE_kiln")),
            "running kiln binary",
        ),
    ];
    for (t, what) in &cases {
        let before = fs::read(t).ok();
        for extra in [&[][..], &["--dry-run"][..]] {
            let (code, stdout, stderr) = flash(root, "node1", t, extra);
            assert_eq!(code, 2, "{}: {stdout}{stderr}", t.display());
            assert!(stderr.contains(what), "{what:?} not in {stderr}");
            assert!(stderr.contains("must not lose"), "{stderr}");
        }
        assert_eq!(fs::read(t).ok(), before, "{} changed", t.display());
    }
    // The node's signature still verifies, and a file beside the project's dirs is fine.
    let (code, _, stderr) = flash(root, "node1", &root.join("node1.img"), &[]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn an_image_that_is_a_fifo_is_refused_without_blocking() {
    let d = project();
    let img = image(d.path());
    fs::remove_file(&img).unwrap();
    assert!(std::process::Command::new("mkfifo")
        .arg(&img)
        .status()
        .unwrap()
        .success());
    let (code, _, stderr) = flash(d.path(), "node1", &d.path().join("t.img"), &[]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("is not a regular file (it is a FIFO)"),
        "{stderr}"
    );
}
