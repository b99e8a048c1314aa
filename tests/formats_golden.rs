//! Every format kiln emits, built from one small synthetic input, pinned by sha256 per output-format
//! generation (`kiln::pipeline::resolve::FORMAT_GENERATION`).
//!
//! When this fails, kiln now writes different bytes for the same inputs. If that is intended,
//! raise `FORMAT_GENERATION` and add a row to [`PINS`] with the hashes the failure prints; the
//! rows of earlier generations stay (append only), so an old generation can never silently
//! mean new bytes. The build id hashes the generation, so it changes with the bytes.
//!
//! Fast (no root, no external tools): the tar is made in memory, the writers are kiln's own.

mod common;

use kiln::formats::disk::{self, DiskLayout, EspFile, EspSource};
use kiln::formats::iso9660::{write_iso, IsoFile};
use kiln::pipeline::resolve::FORMAT_GENERATION;
use kiln::pipeline::{emit, node, resolve, seed::Seed};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// (generation, [(output, sha256)]), one row per generation, oldest first.
const PINS: &[(u32, &[(&str, &str)])] = &[
    (
        1,
        &[
            (
                "build-id",
                "31f2f7e2e5544e22570bec260f6dde7f692dd70225fde1480c9f43b70da0bb3f",
            ),
            (
                "cidata.img",
                "59cc50ef64efcc3ec95cccb22e9b170a698d5d972885a9350ccd6314346c14f4",
            ),
            (
                "cidata.iso",
                "a552e2cdab3153f6424841476b589a53763d260b18a0ee65214a10aae371de07",
            ),
            (
                "disk.raw",
                "03be2cc02614b2a1d1d594b0138ffe5b0f436a47456e9ef55f0fa9e393b81abb",
            ),
            (
                "iso9660",
                "9f99e1636af0be1a47e2b3aaf76135cd63475ab242c75850a8c2ff222fe114be",
            ),
            (
                "root.squashfs",
                "a315f42426ea91099bade21633a99ffacca5fdfc6263c1cffa2c66a34acd94e3",
            ),
            (
                "rootfs.tar.zst",
                "abd2e6cccc37c222573ff050523e889eb88bef55e0a14829e931deb696641170",
            ),
        ],
    ),
    // 2: every image carries /usr/lib/kiln/persist.list and the merged recipe gains `persist`
    // (issue 18); the disk layout gains an ESP for two kernels and a fixed root slot
    // (kiln-root-a); the build id (and the disk that embeds it) moved. (Generation 2 never
    // landed before its last change: kiln-data's and the initramfs script's bytes.)
    (
        2,
        &[
            (
                "build-id",
                "90995abe0eda60543ce3a922a78121bf4403d6078ea6a06b6a94bdbd0a2b07e9",
            ),
            (
                "cidata.img",
                "59cc50ef64efcc3ec95cccb22e9b170a698d5d972885a9350ccd6314346c14f4",
            ),
            (
                "cidata.iso",
                "a552e2cdab3153f6424841476b589a53763d260b18a0ee65214a10aae371de07",
            ),
            (
                "disk.raw",
                "11a6463ccb351f0ee8f452930dc9c8654f6828f152caa3209ffac698c81daf0a",
            ),
            (
                "iso9660",
                "9f99e1636af0be1a47e2b3aaf76135cd63475ab242c75850a8c2ff222fe114be",
            ),
            (
                "root.squashfs",
                "a315f42426ea91099bade21633a99ffacca5fdfc6263c1cffa2c66a34acd94e3",
            ),
            (
                "rootfs.tar.zst",
                "abd2e6cccc37c222573ff050523e889eb88bef55e0a14829e931deb696641170",
            ),
        ],
    ),
    (
        3,
        &[
            (
                "build-id",
                "a4b52a6b50e3e8aa8b12b3373bfc96f51f548ac286afbdba1ed39b7d892b3ff2",
            ),
            (
                "cidata.img",
                "59cc50ef64efcc3ec95cccb22e9b170a698d5d972885a9350ccd6314346c14f4",
            ),
            (
                "cidata.iso",
                "a552e2cdab3153f6424841476b589a53763d260b18a0ee65214a10aae371de07",
            ),
            (
                "disk.raw",
                "daad35490137e6c3fe57623387556eba9f2ddb43afc1509fdd1f3b508b7742e7",
            ),
            (
                "iso9660",
                "9f99e1636af0be1a47e2b3aaf76135cd63475ab242c75850a8c2ff222fe114be",
            ),
            (
                "root.pieces",
                "45b6e9c455d268d9240be84794f2f753f1690184bb81e7e218e7fc99c484f861",
            ),
            (
                "root.squashfs",
                "d377f1c7c0ee61806d9ead78135f477ee4cdf4ef14917912bf3f50dc7ae60e1e",
            ),
            (
                "rootfs.tar.zst",
                "13e1928eb29081ca3bf2eaf9ad68c7f342970506d4eaea234f12b646a2d0dec6",
            ),
        ],
    ),
];

const EPOCH: i64 = 1_700_000_000;

/// A tar with what a root file system has: nested directories, empty/small/multi-block files,
/// a duplicate file, a file whose tail is a fragment, a symlink, a hard link, odd modes and
/// owners, a long name.
fn synthetic_tar(path: &Path) {
    let f = fs::File::create(path).unwrap();
    let mut b = tar::Builder::new(f);
    let mut add =
        |name: &str, kind: tar::EntryType, mode: u32, uid: u64, data: &[u8], link: Option<&str>| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(uid);
            h.set_mtime(EPOCH as u64);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                b.append_link(&mut h, name, l).unwrap();
            } else {
                b.append_data(&mut h, name, data).unwrap();
            }
        };
    // Deterministic "random" bytes that do not compress away.
    let noise = |n: usize, seed: u64| -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    };
    use tar::EntryType as T;
    add("etc/", T::Directory, 0o755, 0, b"", None);
    add("etc/hostname", T::Regular, 0o644, 0, b"kiln\n", None);
    add(
        "etc/shadow",
        T::Regular,
        0o640,
        0,
        b"root:*:19000:0:99999:7:::\n",
        None,
    );
    add("etc/empty", T::Regular, 0o644, 0, b"", None);
    add("usr/", T::Directory, 0o755, 0, b"", None);
    add("usr/bin/", T::Directory, 0o755, 0, b"", None);
    let big = noise(300 * 1024, 1);
    add("usr/bin/tool", T::Regular, 0o755, 0, &big, None);
    add("usr/bin/tool-copy", T::Regular, 0o755, 0, &big, None);
    add(
        "usr/bin/tool-link",
        T::Link,
        0o755,
        0,
        b"",
        Some("usr/bin/tool"),
    );
    add("usr/bin/sh", T::Symlink, 0o777, 0, b"", Some("dash"));
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog\n".repeat(5000);
    add(
        "usr/share/doc/kiln/changelog",
        T::Regular,
        0o644,
        0,
        &text,
        None,
    );
    add(
        &format!("usr/share/{}", "a-long-file-name-".repeat(6)),
        T::Regular,
        0o600,
        1000,
        &noise(5000, 2),
        None,
    );
    // Many small files (tails only): enough fragment data (more than a quarter of a 1 MiB
    // block several times over) for content-defined fragment cuts.
    add("usr/share/many/", T::Directory, 0o755, 0, b"", None);
    for i in 0..600u64 {
        let len = 500 + (i as usize * 7919) % 3000;
        let body: Vec<u8> = noise(len, 100 + i)
            .into_iter()
            .map(|c| b"abcdefgh ijk\n"[c as usize % 13])
            .collect();
        add(
            &format!("usr/share/many/f{i:04}"),
            T::Regular,
            0o644,
            0,
            &body,
            None,
        );
    }
    add("var/lib/app/", T::Directory, 0o700, 1000, b"", None);
    add(
        "var/lib/app/data",
        T::Regular,
        0o600,
        1000,
        &noise(70_000, 3),
        None,
    );
    b.into_inner().unwrap().sync_all().unwrap();
}

/// A minimal project (no k3s, no nodes but one) whose worker role resolves without keys.
fn synthetic_project(root: &Path) {
    fs::create_dir_all(root.join("recipes")).unwrap();
    fs::create_dir_all(root.join("overlays/common/etc")).unwrap();
    fs::write(root.join("overlays/common/etc/motd"), "kiln\n").unwrap();
    fs::write(
        root.join("recipes/base.toml"),
        "description = \"base\"\n[debian]\nvariant = \"minbase\"\ncomponents = [\"main\"]\n\
         packages = [\"systemd\"]\n[boot]\ncmdline = [\"console=ttyS0\"]\n",
    )
    .unwrap();
    fs::write(
        root.join("recipes/worker.toml"),
        "inherits = \"base\"\ndescription = \"worker\"\n",
    )
    .unwrap();
    fs::write(
        root.join("recipes/cluster.toml"),
        "[cluster]\nname = \"golden\"\nsource_date_epoch = 1700000000\nsuite = \"bookworm\"\n\n\
         [[nodes]]\nhostname = \"w-1\"\nmac = \"52:54:00:00:00:21\"\nrole = \"worker\"\n",
    )
    .unwrap();
}

fn sha(p: &Path) -> String {
    common::sha256_hex(&fs::read(p).unwrap())
}

#[test]
fn every_emitted_format_is_pinned_for_this_generation() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let mut got: BTreeMap<&str, String> = BTreeMap::new();

    // The build id of a fixed project: the resolved inputs, kiln's version and the generation.
    let project_dir = dir.join("project");
    synthetic_project(&project_dir);
    let project = kiln::project::recipe::load_project(&project_dir).unwrap();
    let r = resolve::resolve(&project, "worker").unwrap();
    got.insert("build-id", r.build_id.to_string());

    // rootfs.tar.zst (zstd frames) and root.squashfs from the same tar, with kiln's settings.
    let tar = dir.join("rootfs.tar");
    synthetic_tar(&tar);
    emit::compress_tar(&tar, &dir.join("rootfs.tar.zst"), None).unwrap();
    got.insert("rootfs.tar.zst", sha(&dir.join("rootfs.tar.zst")));
    let w = emit::squashfs_from_tar(&tar, &dir.join("root.squashfs"), EPOCH, None).unwrap();
    got.insert("root.squashfs", sha(&dir.join("root.squashfs")));
    // root.pieces: where root.squashfs's pieces are.
    let pieces =
        kiln::formats::pieces::of_image(&dir.join("root.squashfs"), &w.index.spans()).unwrap();
    assert!(pieces.pieces.len() > 8, "{} pieces", pieces.pieces.len());
    got.insert(
        "root.pieces",
        common::sha256_hex(pieces.to_text().as_bytes()),
    );

    // GPT disk with the FAT ESP, the squashfs root and a seed partition, laid out as builds do.
    let layout: DiskLayout = kiln::pipeline::build::disk_layout(&r);
    let esp = [
        EspFile {
            path: "EFI/BOOT/BOOTX64.EFI".into(),
            source: EspSource::Bytes(b"MZ golden".to_vec()),
        },
        EspFile {
            path: "kiln/a/vmlinuz".into(),
            source: EspSource::Bytes(vec![0x5a; 200_000]),
        },
        EspFile {
            path: "loader/entries/kiln-1.conf".into(),
            source: EspSource::Bytes(b"title kiln\nlinux /kiln/a/vmlinuz\n".to_vec()),
        },
    ];
    disk::write_disk(
        &dir.join("disk.raw"),
        &layout,
        &esp,
        &dir.join("root.squashfs"),
        EPOCH,
    )
    .unwrap();
    got.insert("disk.raw", sha(&dir.join("disk.raw")));

    // A node's seed as a FAT CIDATA volume and as an ISO 9660 image.
    let mut files = BTreeMap::new();
    files.insert(
        "meta-data".to_string(),
        "instance-id: w-1-golden\n".to_string(),
    );
    files.insert(
        "user-data".to_string(),
        "#cloud-config\nhostname: w-1\n".to_string(),
    );
    files.insert(
        "network-config".to_string(),
        "version: 2\nethernets: {}\n".to_string(),
    );
    let s = Seed {
        instance_id: "w-1-golden".into(),
        files,
        sources: BTreeMap::new(),
        contains_secrets: false,
        cluster_secrets: false,
    };
    node::write_cidata(&dir.join("cidata.img"), &s, EPOCH).unwrap();
    got.insert("cidata.img", sha(&dir.join("cidata.img")));
    node::write_cidata_iso(&dir.join("cidata.iso"), &s, EPOCH).unwrap();
    got.insert("cidata.iso", sha(&dir.join("cidata.iso")));
    let iso_files = vec![IsoFile {
        name: "README".into(),
        data: b"kiln\n".to_vec(),
    }];
    write_iso(&dir.join("plain.iso"), "KILN", &iso_files, EPOCH).unwrap();
    got.insert("iso9660", sha(&dir.join("plain.iso")));

    let row = format!(
        "({FORMAT_GENERATION}, &[\n{}])",
        got.iter()
            .map(|(k, v)| format!("    (\"{k}\", \"{v}\"),\n"))
            .collect::<String>()
    );
    // Same inputs, same bytes: a second run of every writer must agree before pins mean anything.
    let again = dir.join("again.squashfs");
    emit::squashfs_from_tar(&tar, &again, EPOCH, None).unwrap();
    assert_eq!(
        sha(&again),
        got["root.squashfs"],
        "root.squashfs is not deterministic"
    );

    let gens: Vec<u32> = PINS.iter().map(|(g, _)| *g).collect();
    assert!(
        gens.windows(2).all(|w| w[0] < w[1]),
        "PINS rows must be in generation order"
    );
    let Some((_, pins)) = PINS.iter().find(|(g, _)| *g == FORMAT_GENERATION) else {
        panic!("no PINS row for FORMAT_GENERATION {FORMAT_GENERATION}; add this one:\n{row}");
    };
    let pinned: BTreeMap<&str, &str> = pins.iter().copied().collect();
    let differ: Vec<&str> = got
        .iter()
        .filter(|(k, v)| pinned.get(*k) != Some(&v.as_str()))
        .map(|(k, _)| *k)
        .collect();
    assert!(
        differ.is_empty() && pinned.len() == got.len(),
        "output bytes changed for generation {FORMAT_GENERATION} ({differ:?}): if intended, raise \
         FORMAT_GENERATION in src/pipeline/resolve.rs and append this row to PINS:\n{row}"
    );
}
