//! cidata seed ISOs from `kiln::formats::iso9660` read back by real tools: isoinfo (Rock Ridge,
//! Joliet and plain ISO 9660 trees), blkid (what cloud-init finds the seed by), xorriso and 7z
//! as second and third opinions, genisoimage's own image of the same files as the reference,
//! and — when root and loop mounts work — the kernel's isofs driver.
//!
//! A missing tool prints `SKIP: <tool> not installed`; nothing passes silently.

use kiln::formats::iso9660::{write_iso, IsoFile};
use kiln::sys::tools::{self, Tool, BLKID, GENISOIMAGE, ISOINFO, SEVENZIP, XORRISO};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const EPOCH: i64 = 1_700_000_000;

fn file(name: &str, data: &[u8]) -> IsoFile {
    IsoFile {
        name: name.into(),
        data: data.to_vec(),
    }
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed).rotate_left(seed % 31) as u8)
        .collect()
}

/// What `cloud-localds` puts on a seed, one file spanning several sectors, one empty.
fn seed_files() -> Vec<IsoFile> {
    vec![
        file("user-data", b"#cloud-config\nhostname: node-1\n"),
        file(
            "meta-data",
            b"instance-id: node-1\nlocal-hostname: node-1\n",
        ),
        file("network-config", &pattern(5000, 1)),
        file("vendor-data", b""),
    ]
}

/// Names that clash in 8.3 form, dots, spaces, upper case, and enough files that both root
/// directories span several sectors.
fn tricky_files() -> Vec<IsoFile> {
    let mut files = seed_files();
    files.extend([
        file("user_data", b"clash 1"),
        file("USER-DATA", b"clash 2"),
        file("user.data", b"clash 3"),
        file("archive.tar.gz", &pattern(100_000, 2)),
        file("with space.txt", b"space"),
        file(&"n".repeat(64), b"longest name"),
        file(".hidden", b"dot"),
    ]);
    for i in 0..40 {
        files.push(file(
            &format!("file-with-a-rather-long-name-{i:03}.conf"),
            &pattern(i * 700, i as u32),
        ));
    }
    files
}

/// Writes `files` as `<dir>/<name>.iso` with volume id `cidata`.
fn build(dir: &Path, name: &str, files: &[IsoFile]) -> PathBuf {
    let out = dir.join(format!("{name}.iso"));
    write_iso(&out, "cidata", files, EPOCH).unwrap();
    out
}

/// `true` if `tool` is in PATH; otherwise prints the SKIP line.
fn have(tool: &Tool) -> bool {
    if tool.find().is_some() {
        return true;
    }
    println!(
        "SKIP: {} not installed (apt-get install {})",
        tool.name, tool.package
    );
    false
}

/// Runs `tool` with `args`; fails the test on a non-zero exit. Returns stdout.
fn run(tool: &Tool, args: &[&str]) -> Vec<u8> {
    let out = tools::run(tool.command().unwrap().args(args)).unwrap();
    out.stdout
}

fn run_text(tool: &Tool, args: &[&str]) -> String {
    String::from_utf8(run(tool, args)).unwrap()
}

/// One row of `isoinfo -l`: mode string, uid, gid, size.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    mode: String,
    owner: (String, String),
    size: u64,
}

/// `isoinfo [-R|-J] -l` of the root directory: name → row, without `.` and `..`.
fn isoinfo_list(img: &Path, tree: Option<&str>) -> BTreeMap<String, Row> {
    let mut args: Vec<&str> = tree.into_iter().collect();
    args.extend(["-l", "-i", img.to_str().unwrap()]);
    let text = run_text(&ISOINFO, &args);
    assert_eq!(
        text.matches("Directory listing of").count(),
        1,
        "one flat directory expected:\n{text}"
    );
    let mut rows = BTreeMap::new();
    for line in text.lines().filter(|l| l.contains("]  ")) {
        let (meta, name) = line.split_once("]  ").unwrap();
        // isoinfo ends every name with one space.
        let name = name.strip_suffix(' ').unwrap_or(name).to_string();
        if name == "." || name == ".." {
            continue;
        }
        let f: Vec<&str> = meta.split_whitespace().collect();
        let row = Row {
            mode: f[0].to_string(),
            owner: (f[2].to_string(), f[3].to_string()),
            size: f[4].parse().unwrap(),
        };
        assert!(rows.insert(name.clone(), row).is_none(), "{name} twice");
    }
    rows
}

fn names(files: &[IsoFile]) -> Vec<String> {
    let mut v: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
    v.sort();
    v
}

/// Every `isoinfo` view of `img` matches `files`.
fn check_with_isoinfo(img: &Path, files: &[IsoFile]) {
    let path = img.to_str().unwrap();
    let d = run_text(&ISOINFO, &["-d", "-i", path]);
    println!("isoinfo -d -i {}:\n{d}", img.display());
    let sectors = fs::metadata(img).unwrap().len() / 2048;
    for want in [
        "Volume id: cidata\n".to_string(),
        "Logical block size is: 2048\n".to_string(),
        format!("Volume size is: {sectors}\n"),
        "Joliet with UCS level 3 found".to_string(),
        "Rock Ridge signatures version 1 found".to_string(),
    ] {
        assert!(d.contains(&want), "isoinfo -d lacks {want:?}:\n{d}");
    }

    let rr = isoinfo_list(img, Some("-R"));
    assert_eq!(rr.keys().cloned().collect::<Vec<_>>(), names(files));
    for f in files {
        let row = &rr[&f.name];
        assert_eq!(row.mode, "-r--r--r--", "{}", f.name);
        assert_eq!(row.owner, ("0".into(), "0".into()), "{}", f.name);
        assert_eq!(row.size, f.data.len() as u64, "{}", f.name);
    }
    let joliet = isoinfo_list(img, Some("-J"));
    assert_eq!(joliet.keys().cloned().collect::<Vec<_>>(), names(files));
    let plain = isoinfo_list(img, None);
    assert_eq!(plain.len(), files.len());
    for id in plain.keys() {
        let (stem, version) = id.split_once(';').unwrap();
        assert_eq!(version, "1", "{id}");
        let (base, ext) = stem.split_once('.').unwrap();
        assert!(base.len() <= 8 && ext.len() <= 3, "{id} is not 8.3");
        assert!(
            stem.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_' || b == b'.'),
            "{id} has non-d-characters"
        );
    }

    for f in files {
        for tree in ["-R", "-J"] {
            let got = run(&ISOINFO, &[tree, "-x", &format!("/{}", f.name), "-i", path]);
            assert!(got == f.data, "isoinfo {tree} -x /{} differs", f.name);
        }
    }
}

#[test]
fn isoinfo_reads_seed_image() {
    if !have(&ISOINFO) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = seed_files();
    let img = build(dir.path(), "seed", &files);
    check_with_isoinfo(&img, &files);
    // The plain ISO 9660 names cloud-init would see without extensions, and their data.
    let plain = isoinfo_list(&img, None);
    assert_eq!(
        plain.keys().cloned().collect::<Vec<_>>(),
        ["META_DAT.;1", "NETWORK_.;1", "USER_DAT.;1", "VENDOR_D.;1"]
    );
    let got = run(
        &ISOINFO,
        &["-x", "/USER_DAT.;1", "-i", img.to_str().unwrap()],
    );
    assert_eq!(got, b"#cloud-config\nhostname: node-1\n");
}

#[test]
fn isoinfo_reads_tricky_image() {
    if !have(&ISOINFO) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = tricky_files();
    let img = build(dir.path(), "tricky", &files);
    check_with_isoinfo(&img, &files);
}

#[test]
fn blkid_reports_cidata_label() {
    if !have(&BLKID) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = build(dir.path(), "seed", &seed_files());
    let text = run_text(&BLKID, &["-p", "-o", "export", img.to_str().unwrap()]);
    println!("blkid -p -o export:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    for want in [
        "LABEL=cidata",
        "TYPE=iso9660",
        "USAGE=filesystem",
        "UUID=2023-11-14-22-13-20-00",
    ] {
        assert!(lines.contains(&want), "blkid lacks {want}:\n{text}");
    }
}

/// Reads back every file extracted to `dir` and compares names, modes and bytes.
fn compare_extracted(dir: &Path, files: &[IsoFile], read_only: bool, what: &str) {
    let mut found: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    found.sort();
    assert_eq!(found, names(files), "{what}: names");
    for f in files {
        let p = dir.join(&f.name);
        assert!(
            fs::read(&p).unwrap() == f.data,
            "{what}: {} differs",
            f.name
        );
        if read_only {
            let mode = fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o7777, 0o444, "{what}: mode of {}", f.name);
        }
    }
}

#[test]
fn xorriso_second_opinion() {
    if !have(&XORRISO) {
        return;
    }
    for (name, files) in [("seed", seed_files()), ("tricky", tricky_files())] {
        let dir = tempfile::tempdir().unwrap();
        let img = build(dir.path(), name, &files);
        let path = img.to_str().unwrap();
        let o = tools::run(
            XORRISO
                .command()
                .unwrap()
                .args(["-indev", path, "-find", "/", "-exec", "lsdl", "--"]),
        )
        .unwrap();
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        if name == "seed" {
            println!("xorriso -indev -find / -exec lsdl:\n{out}{err}");
        }
        for bad in ["WARNING", "SORRY", "FAILURE", "MISHAP"] {
            assert!(!err.contains(bad), "xorriso {bad}:\n{err}");
        }
        assert!(err.contains("Volume id    : 'cidata'"), "{err}");
        for f in &files {
            let quoted = format!("'/{}'", f.name);
            let line = out
                .lines()
                .find(|l| l.ends_with(&quoted))
                .unwrap_or_else(|| panic!("xorriso lacks {quoted}:\n{out}"));
            let fields: Vec<&str> = line.split_whitespace().collect();
            let size = f.data.len().to_string();
            assert_eq!(fields[..5], ["-r--r--r--", "1", "0", "0", &size], "{line}");
        }
        assert!(out
            .lines()
            .any(|l| l.starts_with("dr-xr-xr-x") && l.ends_with(" '/'")));
        let x = dir.path().join("x");
        tools::run(
            XORRISO
                .command()
                .unwrap()
                .args(["-osirrox", "on", "-indev", path, "-extract", "/"])
                .arg(&x),
        )
        .unwrap();
        compare_extracted(&x, &files, true, "xorriso -extract");
    }
}

#[test]
fn sevenzip_third_opinion() {
    if !have(&SEVENZIP) {
        return;
    }
    for (name, files) in [("seed", seed_files()), ("tricky", tricky_files())] {
        let dir = tempfile::tempdir().unwrap();
        let img = build(dir.path(), name, &files);
        let list = run_text(&SEVENZIP, &["l", img.to_str().unwrap()]);
        assert!(list.contains("Type = Iso"), "{list}");
        assert!(
            list.contains(&format!("{} files", files.len())),
            "7z l:\n{list}"
        );
        let x = dir.path().join("x");
        run(
            &SEVENZIP,
            &["x", &format!("-o{}", x.display()), img.to_str().unwrap()],
        );
        compare_extracted(&x, &files, false, "7z x");
    }
}

#[test]
fn matches_genisoimage_structurally() {
    if !have(&GENISOIMAGE) || !have(&ISOINFO) {
        return;
    }
    for (name, files) in [("seed", seed_files()), ("tricky", tricky_files())] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        fs::create_dir(&src).unwrap();
        for f in &files {
            fs::write(src.join(&f.name), &f.data).unwrap();
        }
        let reference = dir.path().join("genisoimage.iso");
        tools::run(
            GENISOIMAGE
                .command()
                .unwrap()
                .args(["-quiet", "-V", "cidata", "-J", "-r", "-o"])
                .arg(&reference)
                .arg(&src),
        )
        .unwrap();
        let ours = build(dir.path(), name, &files);

        let summary = |img: &Path| -> Vec<String> {
            run_text(&ISOINFO, &["-d", "-i", img.to_str().unwrap()])
                .lines()
                .filter(|l| {
                    l.starts_with("Volume id:")
                        || l.starts_with("Logical block size")
                        || l.starts_with("Joliet")
                        || l.starts_with("Rock Ridge")
                })
                .map(str::to_string)
                .collect()
        };
        assert_eq!(summary(&ours), summary(&reference), "{name}: isoinfo -d");
        assert_eq!(
            isoinfo_list(&ours, Some("-R")),
            isoinfo_list(&reference, Some("-R")),
            "{name}: Rock Ridge names, modes, owners, sizes"
        );
        let joliet_names = |img: &Path| {
            isoinfo_list(img, Some("-J"))
                .into_keys()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            joliet_names(&ours),
            joliet_names(&reference),
            "{name}: Joliet names"
        );
        if name == "seed" {
            // Without clashes both writers derive the same 8.3 identifiers.
            let plain = |img: &Path| isoinfo_list(img, None).into_keys().collect::<Vec<_>>();
            assert_eq!(plain(&ours), plain(&reference), "plain ISO 9660 names");
        }
        for f in &files {
            for img in [&ours, &reference] {
                let got = run(
                    &ISOINFO,
                    &[
                        "-R",
                        "-x",
                        &format!("/{}", f.name),
                        "-i",
                        img.to_str().unwrap(),
                    ],
                );
                assert!(got == f.data, "{}: /{} differs", img.display(), f.name);
            }
        }
        if BLKID.find().is_some() {
            let tags = |img: &Path| -> Vec<String> {
                run_text(&BLKID, &["-p", "-o", "export", img.to_str().unwrap()])
                    .lines()
                    .filter(|l| l.starts_with("LABEL=") || l.starts_with("TYPE="))
                    .map(str::to_string)
                    .collect()
            };
            assert_eq!(tags(&ours), tags(&reference), "{name}: blkid");
        } else {
            println!("SKIP: blkid not installed (apt-get install util-linux)");
        }
    }
}

/// The kernel's isofs driver mounts the image (root and a working loop device needed).
#[test]
fn privileged_mount_reads_files() {
    // Effective uid from /proc (no libc dependency).
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        println!("SKIP: mount needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let files = tricky_files();
    let img = build(dir.path(), "tricky", &files);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let o = Command::new("mount")
        .args(["-t", "iso9660", "-o", "loop,ro"])
        .arg(&img)
        .arg(&mnt)
        .output();
    match o {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            println!(
                "SKIP: cannot mount here: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .next()
                    .unwrap_or("")
            );
            return;
        }
        Err(e) => {
            println!("SKIP: mount not installed: {e}");
            return;
        }
    }
    let result = std::panic::catch_unwind(|| {
        compare_extracted(&mnt, &files, true, "kernel isofs");
        let mode = fs::metadata(&mnt).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o555, "root directory mode");
    });
    let u = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(u.success(), "umount {}", mnt.display());
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
