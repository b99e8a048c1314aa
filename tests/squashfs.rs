//! kiln's squashfs writer read back by three independent readers: squashfs-tools-ng's
//! `sqfs2tar` (every entry and its metadata, data and xattrs compared with the input tar),
//! squashfs-tools' `unsquashfs`, and — where this machine can loop-mount — the Linux kernel
//! (including name lookups in a directory large enough to need the directory index). Then block
//! reuse: an image written with an earlier image's blocks is byte-identical, and a corrupted
//! earlier image is detected and not used.

mod common;

use common::{is_root, skip, which};
use kiln::formats::reuse::Reuse;
use kiln::formats::squashfs::{self, Options};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

const BS: u32 = 4096;

#[derive(Debug, Clone, PartialEq)]
struct Want {
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    data: Vec<u8>,
    link: Vec<u8>,
    dev: (u32, u32),
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

struct Sample {
    tar: Vec<u8>,
    /// Path (no leading "./") → what the image must hold; hard links map to their target.
    want: BTreeMap<String, Want>,
    links: Vec<(String, String)>,
}

/// One tar entry of the sample: kind ('d', 'f', 'l' symlink, 'h' hard link, 'c', 'b', 'p'),
/// mode, owner, data, link target, device numbers, xattrs.
#[derive(Clone, Copy)]
struct E<'a> {
    kind: char,
    mode: u32,
    owner: (u64, u64),
    data: &'a [u8],
    link: &'a str,
    dev: (u32, u32),
    xattrs: &'a [(&'a str, &'a [u8])],
}

impl<'a> E<'a> {
    fn new(kind: char, mode: u32) -> Self {
        E {
            kind,
            mode,
            owner: (0, 0),
            data: b"",
            link: "",
            dev: (0, 0),
            xattrs: &[],
        }
    }
    fn file(mode: u32, data: &'a [u8]) -> Self {
        E {
            data,
            ..E::new('f', mode)
        }
    }
    fn link(kind: char, target: &'a str) -> Self {
        E {
            link: target,
            ..E::new(kind, if kind == 'l' { 0o777 } else { 0 })
        }
    }
    fn dev(kind: char, mode: u32, dev: (u32, u32)) -> Self {
        E {
            dev,
            ..E::new(kind, mode)
        }
    }
}

/// A tar with every kind of entry the writer handles.
fn sample() -> Sample {
    let mut b = tar::Builder::new(Vec::new());
    let mut want = BTreeMap::new();
    let mut links = Vec::new();
    let mut add = |b: &mut tar::Builder<Vec<u8>>, path: &str, e: E| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(e.owner.0);
        h.set_gid(e.owner.1);
        let mtime = 1_600_000_000 + path.len() as u64;
        h.set_mtime(mtime);
        h.set_entry_type(match e.kind {
            'd' => tar::EntryType::Directory,
            'f' => tar::EntryType::Regular,
            'l' => tar::EntryType::Symlink,
            'h' => tar::EntryType::Link,
            'c' => tar::EntryType::Char,
            'b' => tar::EntryType::Block,
            'p' => tar::EntryType::Fifo,
            _ => unreachable!(),
        });
        if matches!(e.kind, 'c' | 'b') {
            h.set_device_major(e.dev.0).unwrap();
            h.set_device_minor(e.dev.1).unwrap();
        }
        h.set_size(e.data.len() as u64);
        if !e.xattrs.is_empty() {
            let pax: Vec<(String, &[u8])> = e
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                .collect();
            b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
        }
        let p = format!("./{path}");
        match e.kind {
            'l' | 'h' => b.append_link(&mut h, &p, e.link).unwrap(),
            _ => b.append_data(&mut h, &p, e.data).unwrap(),
        }
        if e.kind == 'h' {
            links.push((path.to_string(), e.link.to_string()));
            return;
        }
        want.insert(
            path.to_string(),
            Want {
                kind: e.kind,
                mode: e.mode,
                uid: e.owner.0,
                gid: e.owner.1,
                mtime,
                data: e.data.to_vec(),
                link: e.link.as_bytes().to_vec(),
                dev: e.dev,
                xattrs: e
                    .xattrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_vec()))
                    .collect(),
            },
        );
    };
    let cap: &[u8] = &[
        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    let dir = E::new('d', 0o755);
    let dup = pseudo_random(10_000, 1);
    let ping = pseudo_random(300_000, 2);
    let zeros = vec![0u8; 50_000];
    let exact = vec![7u8; 2 * BS as usize];
    add(&mut b, "", dir);
    let etc_x: &[(&str, &[u8])] = &[("user.comment", b"config")];
    add(
        &mut b,
        "etc",
        E {
            xattrs: etc_x,
            ..dir
        },
    );
    add(&mut b, "etc/a", E::file(0o644, b"hello\n"));
    add(
        &mut b,
        "etc/empty",
        E {
            owner: (1000, 1000),
            ..E::file(0o600, b"")
        },
    );
    add(&mut b, "etc/dup1", E::file(0o644, &dup));
    add(
        &mut b,
        "etc/dup2",
        E {
            owner: (0, 42),
            ..E::file(0o640, &dup)
        },
    );
    add(&mut b, "etc/exact", E::file(0o644, &exact));
    add(&mut b, "etc/hl", E::link('h', "./etc/a"));
    add(&mut b, "usr", dir);
    add(&mut b, "usr/bin", dir);
    let cap_x: &[(&str, &[u8])] = &[("security.capability", cap)];
    add(
        &mut b,
        "usr/bin/ping",
        E {
            xattrs: cap_x,
            ..E::file(0o4755, &ping)
        },
    );
    add(
        &mut b,
        "usr/zeros",
        E {
            owner: (65534, 65534),
            ..E::file(0o644, &zeros)
        },
    );
    add(&mut b, "bin", E::link('l', "usr/bin"));
    let t_x: &[(&str, &[u8])] = &[("trusted.t", b"x")];
    add(
        &mut b,
        "usr/bin/ping6",
        E {
            xattrs: t_x,
            ..E::link('l', "ping")
        },
    );
    add(&mut b, "usr/bin/ping6-hl", E::link('h', "usr/bin/ping6"));
    add(&mut b, "dev", dir);
    add(&mut b, "dev/null", E::dev('c', 0o666, (1, 3)));
    add(
        &mut b,
        "dev/sda",
        E {
            owner: (0, 6),
            ..E::dev('b', 0o660, (8, 0))
        },
    );
    add(&mut b, "dev/big", E::dev('c', 0o600, (259, 70_000)));
    add(&mut b, "run/initctl", E::new('p', 0o600));
    // Directories implied by a path, without their own entries.
    add(&mut b, "opt/x/y/file", E::file(0o644, b"deep"));
    // Larger than a basic directory inode can describe (64 KiB listing): extended inode with
    // an index; more than 256 entries per header run.
    for i in 0..3000 {
        let name = format!("many/a-file-with-a-rather-long-name-{i:05}");
        let data = format!("{i}\n");
        add(&mut b, &name, E::file(0o644, data.as_bytes()));
    }
    // The same path twice: the later entry wins (as when extracting).
    add(&mut b, "etc/twice", E::file(0o644, b"first"));
    add(&mut b, "etc/twice", E::file(0o644, b"second"));
    Sample {
        tar: b.into_inner().unwrap(),
        want,
        links,
    }
}

fn opts() -> Options {
    Options {
        block_size: BS,
        level: 3,
        mtime: 1_700_000_000,
        jobs: 2,
    }
}

fn write(dir: &Path, name: &str, tar: &[u8], reuse: &mut Reuse) -> squashfs::Written {
    let t = dir.join(format!("{name}.tar"));
    fs::write(&t, tar).unwrap();
    squashfs::write_from_tar(&t, &dir.join(name), &opts(), reuse).unwrap()
}

/// Reads the image back with sqfs2tar and compares every entry with the input.
#[test]
fn squashfs_read_back_by_sqfs2tar_matches_the_tar() {
    if !which("sqfs2tar") {
        skip(
            "squashfs_read_back_by_sqfs2tar_matches_the_tar",
            "sqfs2tar not installed (apt-get install squashfs-tools-ng)",
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let s = sample();
    let w = write(d.path(), "img", &s.tar, &mut Reuse::default());
    assert_eq!(
        w.stats.duplicate_files, 1,
        "etc/dup2 stored once: {:?}",
        w.stats
    );
    let o = Command::new("sqfs2tar")
        .arg(d.path().join("img"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "sqfs2tar: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut ar = tar::Archive::new(o.stdout.as_slice());
    let mut got: BTreeMap<String, Want> = BTreeMap::new();
    let mut got_links: BTreeMap<String, String> = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = String::from_utf8(e.path_bytes().to_vec()).unwrap();
        let path = path
            .trim_start_matches("./")
            .trim_end_matches('/')
            .to_string();
        let mut xattrs = BTreeMap::new();
        if let Some(x) = e.pax_extensions().unwrap() {
            for x in x {
                let x = x.unwrap();
                if let Some(k) = x.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.insert(k.to_string(), x.value_bytes().to_vec());
                }
            }
        }
        let h = e.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Regular => 'f',
            tar::EntryType::Symlink => 'l',
            tar::EntryType::Char => 'c',
            tar::EntryType::Block => 'b',
            tar::EntryType::Fifo => 'p',
            tar::EntryType::Link => {
                let t = String::from_utf8(e.link_name_bytes().unwrap().to_vec()).unwrap();
                got_links.insert(path, t.trim_start_matches("./").to_string());
                continue;
            }
            t => panic!("{path}: unexpected {t:?}"),
        };
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        let dev = if matches!(kind, 'c' | 'b') {
            (
                h.device_major().unwrap().unwrap(),
                h.device_minor().unwrap().unwrap(),
            )
        } else {
            (0, 0)
        };
        got.insert(
            path,
            Want {
                kind,
                mode: h.mode().unwrap() & 0o7777,
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                mtime: h.mtime().unwrap(),
                data,
                link: e.link_name_bytes().map(|l| l.to_vec()).unwrap_or_default(),
                dev,
                xattrs,
            },
        );
    }
    // Implied directories: root-owned 0755 with the image's time.
    let mut want = s.want.clone();
    for p in ["run", "opt", "opt/x", "opt/x/y", "many"] {
        want.insert(
            p.into(),
            Want {
                kind: 'd',
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 1_700_000_000,
                data: vec![],
                link: vec![],
                dev: (0, 0),
                xattrs: BTreeMap::new(),
            },
        );
    }
    want.get_mut("etc/twice").unwrap().data = b"second".to_vec();
    // sqfs2tar has no entry for the root (it was checked by the kernel test).
    got.remove("");
    want.remove("");
    let names = |m: &BTreeMap<String, Want>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&got), names(&want), "the same paths");
    for (p, w) in &want {
        assert_eq!(&got[p], w, "{p}");
    }
    // Hard links: sqfs2tar writes the second name as a link to the first (either order).
    for (name, target) in &s.links {
        let t = target.trim_start_matches("./");
        let ok = got_links.get(name).map(String::as_str) == Some(t)
            || got_links.get(t).map(String::as_str) == Some(name.as_str());
        assert!(ok, "{name} is a hard link to {t}: {got_links:?}");
    }
}

/// squashfs-tools (another implementation) lists every path.
#[test]
fn squashfs_listed_by_unsquashfs() {
    if !which("unsquashfs") {
        skip(
            "squashfs_listed_by_unsquashfs",
            "unsquashfs not installed (apt-get install squashfs-tools)",
        );
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let s = sample();
    write(d.path(), "img", &s.tar, &mut Reuse::default());
    let o = Command::new("unsquashfs")
        .args(["-lln", "-d", ""])
        .arg(d.path().join("img"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "unsquashfs: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    for p in s.want.keys().filter(|p| !p.is_empty()) {
        assert!(
            lines
                .iter()
                .any(|l| l.ends_with(&format!(" /{p}")) || l.contains(&format!(" /{p} -> "))),
            "{p} missing in\n{}",
            &out[..2000.min(out.len())]
        );
    }
    let fields = |p: &str| -> Vec<String> {
        let l = lines.iter().find(|l| l.ends_with(p)).unwrap();
        l.split_whitespace().take(3).map(String::from).collect()
    };
    assert_eq!(fields(" /usr/bin/ping"), ["-rwsr-xr-x", "0/0", "300000"]);
    assert_eq!(fields(" /etc/empty"), ["-rw-------", "1000/1000", "0"]);
    assert_eq!(fields(" /dev/null")[..2], ["crw-rw-rw-", "0/0"]);
    assert!(lines
        .iter()
        .any(|l| l.starts_with("hrw") || l.contains(" /etc/hl")));
}

/// The kernel mounts the image and finds every name, the big directory's through its index.
#[test]
fn squashfs_mounted_by_the_kernel() {
    let t = "squashfs_mounted_by_the_kernel";
    if !is_root() {
        skip(t, "needs root to loop-mount");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let s = sample();
    write(d.path(), "img", &s.tar, &mut Reuse::default());
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let o = Command::new("mount")
        .args(["-t", "squashfs", "-o", "loop,ro"])
        .arg(d.path().join("img"))
        .arg(&mnt)
        .output()
        .unwrap();
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        let probe = tempfile::tempdir().unwrap();
        let can = Command::new("mount")
            .args(["-t", "tmpfs", "none"])
            .arg(probe.path())
            .status()
            .is_ok_and(|s| s.success());
        if can {
            let _ = Command::new("umount").arg(probe.path()).status();
        }
        let fs_known = fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .contains("squashfs");
        if !can || !fs_known || err.contains("loop device") || err.contains("permission denied") {
            skip(
                t,
                &format!("cannot loop-mount squashfs here: {}", err.trim()),
            );
            return;
        }
        panic!("the kernel refused the image: {err}");
    }
    let check = || {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        for (p, w) in &s.want {
            let path = mnt.join(p);
            let m = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{p}: {e}"));
            assert_eq!(m.permissions().mode() & 0o7777, w.mode, "{p}");
            assert_eq!((m.uid() as u64, m.gid() as u64), (w.uid, w.gid), "{p}");
            match w.kind {
                'f' if p != "etc/twice" => assert_eq!(fs::read(&path).unwrap(), w.data, "{p}"),
                'l' => assert_eq!(
                    fs::read_link(&path).unwrap().as_os_str().len(),
                    w.link.len(),
                    "{p}"
                ),
                'c' => {
                    assert!(m.file_type().is_char_device());
                    let rdev = m.rdev();
                    assert_eq!((libc::major(rdev), libc::minor(rdev)), w.dev, "{p}");
                }
                'b' => assert!(m.file_type().is_block_device()),
                'p' => assert!(m.file_type().is_fifo()),
                _ => {}
            }
        }
        assert_eq!(fs::read(mnt.join("etc/twice")).unwrap(), b"second");
        let a = fs::metadata(mnt.join("etc/a")).unwrap();
        let hl = fs::metadata(mnt.join("etc/hl")).unwrap();
        assert_eq!(
            (a.ino(), a.nlink()),
            (hl.ino(), 2),
            "etc/hl is a hard link of etc/a"
        );
        assert_eq!(fs::read_dir(mnt.join("many")).unwrap().count(), 3000);
        assert_eq!(fs::read_dir(mnt.join("opt/x/y")).unwrap().count(), 1);
    };
    let r = std::panic::catch_unwind(check);
    let _ = Command::new("umount").arg(&mnt).status();
    if let Err(e) = r {
        std::panic::resume_unwind(e);
    }
}

/// Two writes are identical; a write that copies every block from the first is identical too;
/// a corrupted first image is noticed and its blocks compressed again, with the same result.
#[test]
fn squashfs_reuse_is_byte_identical_and_checked() {
    let d = tempfile::tempdir().unwrap();
    let s = sample();
    let idx = d.path().join("index");
    let w1 = write(d.path(), "one", &s.tar, &mut Reuse::default());
    assert!(w1.stats.blocks > 10, "{:?}", w1.stats);
    w1.index
        .save(&d.path().join("one"), &idx.join("one.json"))
        .unwrap();
    let one = fs::read(d.path().join("one")).unwrap();

    let w2 = write(
        d.path(),
        "two",
        &s.tar,
        &mut Reuse::load(&idx, &squashfs::reuse_params(&opts())),
    );
    assert_eq!(fs::read(d.path().join("two")).unwrap(), one);
    assert_eq!(
        w2.stats.reused, w2.stats.blocks,
        "every block copied: {:?}",
        w2.stats
    );

    // Another level: the index does not apply.
    let other = Options { level: 4, ..opts() };
    let t = d.path().join("two.tar");
    let w = squashfs::write_from_tar(
        &t,
        &d.path().join("lvl"),
        &other,
        &mut Reuse::load(&idx, &squashfs::reuse_params(&other)),
    )
    .unwrap();
    assert_eq!(w.stats.reused, 0);

    // Flip a byte of the first image's first data block (right after superblock + options).
    let mut bad = one.clone();
    bad[102] ^= 0xff;
    fs::write(d.path().join("one"), &bad).unwrap();
    let w3 = write(
        d.path(),
        "three",
        &s.tar,
        &mut Reuse::load(&idx, &squashfs::reuse_params(&opts())),
    );
    assert_eq!(
        fs::read(d.path().join("three")).unwrap(),
        one,
        "same bytes without the cache"
    );
    assert!(w3.stats.reused < w3.stats.blocks, "{:?}", w3.stats);

    // A one-file edit: only the edited file's fragment block is compressed again.
    fs::write(d.path().join("one"), &one).unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut ar = tar::Archive::new(s.tar.as_slice());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut h = e.header().clone();
        let p = e.path_bytes().to_vec();
        if p.ends_with(b"many/a-file-with-a-rather-long-name-02999") {
            h.set_size(7);
            b.append_data(&mut h, String::from_utf8(p).unwrap(), &b"edited\n"[..])
                .unwrap();
        } else if h.entry_type().is_file() {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            b.append_data(&mut h, String::from_utf8(p).unwrap(), data.as_slice())
                .unwrap();
        } else {
            let link = e.link_name_bytes().map(|l| l.to_vec());
            match link {
                Some(l) => b
                    .append_link(
                        &mut h,
                        String::from_utf8(p).unwrap(),
                        String::from_utf8(l).unwrap(),
                    )
                    .unwrap(),
                None => b
                    .append_data(&mut h, String::from_utf8(p).unwrap(), std::io::empty())
                    .unwrap(),
            }
        }
    }
    let edited = b.into_inner().unwrap();
    let w4 = write(
        d.path(),
        "four",
        &edited,
        &mut Reuse::load(&idx, &squashfs::reuse_params(&opts())),
    );
    assert_eq!(w4.stats.blocks - w4.stats.reused, 1, "{:?}", w4.stats);
    let w5 = write(d.path(), "five", &edited, &mut Reuse::default());
    assert_eq!(
        fs::read(d.path().join("four")).unwrap(),
        fs::read(d.path().join("five")).unwrap()
    );
    assert_eq!(w5.stats.reused, 0);
}

/// Input the format cannot hold is refused with the path in the message.
#[test]
fn squashfs_bad_input_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            {
                let mut b = tar::Builder::new(Vec::new());
                let mut h = tar::Header::new_gnu();
                h.set_size(0);
                h.set_entry_type(tar::EntryType::Regular);
                h.as_old_mut().name[..12].copy_from_slice(b"a/../../evil");
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
                b.into_inner().unwrap()
            },
            "'..'",
        ),
        (
            {
                let mut b = tar::Builder::new(Vec::new());
                let mut h = tar::Header::new_gnu();
                h.set_size(0);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Link);
                b.append_link(&mut h, "x", "missing").unwrap();
                b.into_inner().unwrap()
            },
            "not earlier in the tar",
        ),
        (
            {
                let mut b = tar::Builder::new(Vec::new());
                b.append_pax_extensions([("SCHILY.xattr.system.posix_acl_access", &b"x"[..])])
                    .unwrap();
                let mut h = tar::Header::new_gnu();
                h.set_size(0);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Regular);
                b.append_data(&mut h, "f", std::io::empty()).unwrap();
                b.into_inner().unwrap()
            },
            "system.posix_acl_access",
        ),
    ];
    for (i, (tar, want)) in cases.into_iter().enumerate() {
        let t = d.path().join(format!("{i}.tar"));
        fs::write(&t, tar).unwrap();
        let out = d.path().join(format!("{i}.img"));
        let e = squashfs::write_from_tar(&t, &out, &opts(), &mut Reuse::default())
            .err()
            .unwrap_or_else(|| panic!("case {i} accepted"));
        let msg = format!("{e:#}");
        assert!(msg.contains(want), "case {i}: {msg}");
    }
}

/// A tar of `n` small files (a root's /etc and /usr/share: tails only) and one big file, with
/// file `edit` (if any) grown by more than the largest tail (so that greedy packing would move
/// a tail out of every later fragment block).
fn small_files_tar(n: usize, edit: Option<usize>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: String, data: Vec<u8>| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append_data(&mut h, path, &data[..]).unwrap();
    };
    add("big".into(), pseudo_random(64 * 1024 + 100, 1));
    for i in 0..n {
        // Compressible text-like tails of 200..2200 bytes.
        let len = 200 + (i * 7919) % 2000;
        let mut data: Vec<u8> = pseudo_random(len, i as u64 + 10)
            .into_iter()
            .map(|c| b"abcdefgh ijk\n"[c as usize % 13])
            .collect();
        if edit == Some(i) {
            data.extend(std::iter::repeat_n(b'#', 3000));
        }
        add(format!("f/{i:05}"), data);
    }
    b.into_inner().unwrap()
}

/// Editing one small file changes its own fragment block and the metadata tables, not every
/// later fragment block: `root.pieces` of the edited image shares all but a few pieces with the
/// original (what lets an update fetch only the changed pieces), and the image still reads back.
#[test]
fn squashfs_small_edit_changes_few_pieces() {
    use kiln::formats::pieces;
    let d = tempfile::tempdir().unwrap();
    let o = Options {
        block_size: 64 * 1024,
        ..opts()
    };
    let mut images = Vec::new();
    for (name, edit) in [("a", None), ("b", Some(40))] {
        let t = d.path().join(format!("{name}.tar"));
        fs::write(&t, small_files_tar(3000, edit)).unwrap();
        let img = d.path().join(name);
        let w = squashfs::write_from_tar(&t, &img, &o, &mut Reuse::default()).unwrap();
        images.push(pieces::of_image(&img, &w.index.spans()).unwrap());
    }
    let (a, b) = (&images[0], &images[1]);
    let fragments = b.pieces.len();
    assert!(fragments > 40, "{fragments} pieces");
    let plan = b.plan_from(a);
    // The edited fragment block, the superblock, and the tables after the blocks.
    assert!(
        plan.fetched_pieces <= 6,
        "{plan:?} of {fragments} pieces (sizes {} → {})",
        a.size,
        b.size
    );
    assert!(
        plan.fetched_bytes * 10 < b.size,
        "{plan:?}, image {}",
        b.size
    );
    if which("unsquashfs") {
        let out = Command::new("unsquashfs")
            .args(["-lc", "-n"])
            .arg(d.path().join("b"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("f/00040"));
    }
}
