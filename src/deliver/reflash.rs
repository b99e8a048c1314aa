//! `kiln flash --keep-data`: rewrites a disk that already holds a kiln disk of the same node —
//! its ESP, root slot a and seed (partitions 1–3) — and keeps everything after them: the
//! second root slot and the data partition, with their partition entries.
//!
//! Refused (nothing written) unless the target's GPT has kiln's three partitions at the new
//! image's places (same starts, each at least as large: same ESP and root slot sizes), a
//! `kiln-data` partition, and a seed
//! whose `local-hostname` is this node. The new bytes are written in place (a file target is
//! not replaced, so its data survives), then the GPT — the image's entries 1–3 with the
//! target's entries from 4 on — primary and backup, then fsync, then the written range is read
//! back and compared with the image's. A crash before the GPT is rewritten leaves the old
//! table with the new ESP and root: the node may not boot until it is flashed again, but its
//! data partition is untouched either way.

use crate::formats::disk::{self, GptPartition, GptTable, SECTOR_SIZE};
use crate::pipeline::build::{DATA_PARTITION_NAME, ROOT_A_PARTITION_NAME};
use anyhow::{Context, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Why a `--keep-data` flash is refused (exit status 2; nothing was written).
#[derive(Debug, thiserror::Error)]
#[error("{}: cannot keep its data: {reason}; {fix}", .path.display())]
pub struct KeepDataRefused {
    pub path: PathBuf,
    pub reason: String,
    pub fix: String,
}

/// What a `--keep-data` flash writes and keeps.
#[derive(Debug, Clone)]
pub struct KeepPlan {
    /// Bytes `[0, write_end)` of the image are written (everything up to the seed's end; the
    /// GPT sectors are then written over with the merged table).
    pub write_end: u64,
    /// The merged partition table.
    pub partitions: Vec<GptPartition>,
    pub disk_guid: [u8; 16],
    /// The target's size in sectors.
    pub total_lbas: u64,
    /// Names of the target's partitions that are kept, e.g. `["kiln-root-b", "kiln-data"]`.
    pub kept: Vec<String>,
}

const KIND: [&str; 3] = ["ESP", ROOT_A_PARTITION_NAME, disk::SEED_PARTITION_NAME];

fn refuse(path: &Path, reason: impl Into<String>, fix: impl Into<String>) -> anyhow::Error {
    KeepDataRefused {
        path: path.to_path_buf(),
        reason: reason.into(),
        fix: fix.into(),
    }
    .into()
}

/// The `local-hostname` in the meta-data of the cidata volume at `[offset, offset+len)`.
fn seed_hostname(f: &mut File, offset: u64, len: u64) -> Option<String> {
    let slice = disk::PartitionSlice::new(f, offset, len);
    let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new()).ok()?;
    let mut text = String::new();
    fs.root_dir()
        .open_file("meta-data")
        .ok()?
        .take(64 * 1024)
        .read_to_string(&mut text)
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("local-hostname:"))
        .map(|v| v.trim().trim_matches(['"', '\'']).to_string())
}

/// Checks `target` (size `target_size` bytes) against `image` for node `hostname`.
pub fn plan(
    image: &mut File,
    target: &mut File,
    target_path: &Path,
    target_size: u64,
    hostname: &str,
) -> Result<KeepPlan> {
    let fresh =
        "flash without --keep-data (the node starts with empty state and keeps its identity)";
    let img: GptTable = disk::read_gpt(image).context("reading the image's partition table")?;
    let Ok(old) = disk::read_gpt(target) else {
        return Err(refuse(
            target_path,
            "it holds no (valid) GPT partition table, so no kiln disk",
            fresh,
        ));
    };
    let names: Vec<String> = old.partitions.iter().map(|p| p.name_text()).collect();
    if names.len() < 3 || names[..3] != KIND {
        return Err(refuse(
            target_path,
            format!(
                "it is not a kiln disk (partitions {:?}, kiln's are {:?} first)",
                names, KIND
            ),
            fresh,
        ));
    }
    let Some(data_at) = names.iter().position(|n| n == DATA_PARTITION_NAME) else {
        return Err(refuse(
            target_path,
            "it has no kiln-data partition (a node makes it at its first boot): there is no data to keep",
            fresh,
        ));
    };
    debug_assert!(data_at >= 3);
    anyhow::ensure!(
        img.partitions.len() == 3,
        "internal: the node image has {} partitions, not 3",
        img.partitions.len()
    );
    for (i, (a, b)) in img.partitions.iter().zip(&old.partitions).enumerate() {
        // Same start, and the new partition fits the old one (a node's systemd-repart may
        // have grown its seed partition into a gap): the new one is written at the start.
        if a.first_lba != b.first_lba || a.last_lba > b.last_lba {
            let mib = |p: &GptPartition| (p.last_lba - p.first_lba + 1) * SECTOR_SIZE / disk::MIB;
            return Err(refuse(
                target_path,
                format!(
                    "partition {} ({}) is at sectors {}..{} ({} MiB) there but at {}..{} ({} MiB) in the new image: the ESP or root slot size changed",
                    i + 1,
                    KIND[i],
                    b.first_lba,
                    b.last_lba,
                    mib(b),
                    a.first_lba,
                    a.last_lba,
                    mib(a)
                ),
                format!("keep [boot] esp_size_mib and root_slot_mib as they were when the disk was flashed, or {fresh}"),
            ));
        }
    }
    let seed = &old.partitions[2];
    let on_disk = seed_hostname(
        target,
        seed.first_lba * SECTOR_SIZE,
        (seed.last_lba - seed.first_lba + 1) * SECTOR_SIZE,
    );
    match on_disk.as_deref() {
        Some(h) if h == hostname => {}
        Some(h) => {
            return Err(refuse(
                target_path,
                format!("it is the disk of node {h}, not {hostname}"),
                format!("flash {h}'s outputs to it, or {fresh}"),
            ))
        }
        None => {
            return Err(refuse(
                target_path,
                "its seed partition holds no node's meta-data (a role disk, or a damaged seed): kiln cannot tell whose data it is",
                fresh,
            ))
        }
    }
    let total_lbas = target_size / SECTOR_SIZE;
    let mut partitions = img.partitions.clone();
    partitions.extend(old.partitions[3..].iter().cloned());
    Ok(KeepPlan {
        write_end: (img.partitions[2].last_lba + 1) * SECTOR_SIZE,
        partitions,
        disk_guid: img.disk_guid,
        total_lbas,
        kept: names[3..].to_vec(),
    })
}

/// Writes the plan: image bytes, then the merged GPT, then fsync.
pub fn write(
    image: &mut File,
    target: &mut File,
    plan: &KeepPlan,
    target_path: &Path,
) -> Result<u64> {
    image.seek(SeekFrom::Start(0))?;
    let mut buf = vec![0u8; crate::trust::sign::BUF_SIZE];
    let mut at = 0u64;
    while at < plan.write_end {
        let n = (plan.write_end - at).min(buf.len() as u64) as usize;
        image
            .read_exact(&mut buf[..n])
            .context("reading the node image")?;
        target
            .write_all_at(&buf[..n], at)
            .with_context(|| format!("writing {} at byte {at}", target_path.display()))?;
        at += n as u64;
    }
    target
        .sync_data()
        .with_context(|| format!("flushing {}", target_path.display()))?;
    disk::write_gpt(target, plan.total_lbas, &plan.disk_guid, &plan.partitions)
        .with_context(|| format!("writing the partition table of {}", target_path.display()))?;
    target
        .sync_all()
        .with_context(|| format!("flushing {} (fsync)", target_path.display()))?;
    Ok(at)
}

/// sha256 of bytes `[start, end)` of a file (short reads are an error).
fn range_sha256(f: &mut File, start: u64, end: u64, what: &Path) -> Result<String> {
    f.seek(SeekFrom::Start(start))
        .with_context(|| format!("seeking in {}", what.display()))?;
    let bar = indicatif::ProgressBar::hidden();
    let (sha, n) = crate::trust::sign::sha256_stream(f, Some(end - start), &bar, what)?;
    anyhow::ensure!(
        n == end - start,
        "{} ends before byte {end}",
        what.display()
    );
    Ok(sha)
}

/// Reads the written partitions back (after the GPT sectors: from the ESP's start) and
/// compares them with the image.
pub fn read_back(image: &mut File, target_path: &Path, plan: &KeepPlan) -> Result<()> {
    let start = plan.partitions[0].first_lba * SECTOR_SIZE;
    let mut t = File::open(target_path)
        .with_context(|| format!("opening {} to read it back", target_path.display()))?;
    let _ = crate::sys::os::drop_cached_pages(&t);
    let want = range_sha256(image, start, plan.write_end, Path::new("the node image"))?;
    let got = range_sha256(&mut t, start, plan.write_end, target_path)?;
    anyhow::ensure!(
        want == got,
        "read-back of {} does not match the image (partitions 1-3): the device may be failing or something else wrote to it — flash again",
        target_path.display()
    );
    let back = disk::read_gpt(&mut t).context("reading the partition table back")?;
    anyhow::ensure!(
        back.partitions == plan.partitions,
        "the partition table read back from {} is not the one written — flash again",
        target_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::disk::{DiskLayout, EspFile, EspSource, MIB};
    use std::fs::OpenOptions;

    /// A node disk (ESP, root slot, seed with `meta-data` for `host`) with root bytes `fill`.
    fn node_disk(path: &Path, host: &str, fill: u8, slot_mib: u64) {
        let dir = path.parent().unwrap();
        let root = dir.join(format!("root-{fill}.sqfs"));
        std::fs::write(&root, vec![fill; 2 * MIB as usize]).unwrap();
        let layout = DiskLayout {
            disk_guid: disk::guid_from_seed(&[fill], "disk"),
            esp_guid: disk::guid_from_seed(&[fill], "esp"),
            root_guid: disk::guid_from_seed(&[fill], "root"),
            esp_size_mib: 64,
            esp_label: "KILN-ESP".into(),
            esp_volume_id: 1,
            root_partition_name: ROOT_A_PARTITION_NAME.into(),
            root_slot_mib: slot_mib,
            seed_size_mib: 4,
            seed_guid: disk::guid_from_seed(&[fill], "seed"),
        };
        let esp = [EspFile {
            path: "loader/loader.conf".into(),
            source: EspSource::Bytes(b"timeout 0\n".to_vec()),
        }];
        let info = disk::write_disk(path, &layout, &esp, &root, 1_700_000_000).unwrap();
        let (first, last) = info.seed.unwrap();
        let meta = [EspFile {
            path: "meta-data".into(),
            source: EspSource::Bytes(
                format!("instance-id: x\nlocal-hostname: {host}\n").into_bytes(),
            ),
        }];
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        disk::write_fat_volume(
            &mut f,
            first * SECTOR_SIZE,
            (last - first + 1) * SECTOR_SIZE,
            "CIDATA",
            2,
            &meta,
            1_700_000_000,
        )
        .unwrap();
    }

    /// `target` grown by 64 MiB with a kiln-data partition after the seed holding `marker`.
    fn add_data(target: &Path, marker: &[u8]) -> u64 {
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(target)
            .unwrap();
        let t = disk::read_gpt(&mut f).unwrap();
        let total = f.metadata().unwrap().len() / SECTOR_SIZE + 64 * 2048;
        f.set_len(total * SECTOR_SIZE).unwrap();
        let first = t.partitions[2].last_lba + 1;
        let mut parts = t.partitions.clone();
        let mut name = [0u8; 72];
        for (i, u) in DATA_PARTITION_NAME.encode_utf16().enumerate() {
            name[2 * i..2 * i + 2].copy_from_slice(&u.to_le_bytes());
        }
        parts.push(GptPartition {
            type_guid: disk::LINUX_DATA_TYPE_GUID,
            unique_guid: disk::guid_from_seed(b"data", "data"),
            first_lba: first,
            last_lba: total - 34,
            attributes: 0,
            name,
        });
        disk::write_gpt(&mut f, total, &t.disk_guid, &parts).unwrap();
        f.write_all_at(marker, first * SECTOR_SIZE).unwrap();
        first * SECTOR_SIZE
    }

    fn open_rw(p: &Path) -> File {
        OpenOptions::new().read(true).write(true).open(p).unwrap()
    }

    #[test]
    fn keep_data_rewrites_partitions_1_to_3_and_keeps_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let old = d.path().join("old.img");
        let new = d.path().join("new.img");
        node_disk(&old, "node-1", 1, 8);
        node_disk(&new, "node-1", 2, 8);
        // No data partition yet: refused.
        let len = std::fs::metadata(&old).unwrap().len();
        let e = plan(&mut open_rw(&new), &mut open_rw(&old), &old, len, "node-1").unwrap_err();
        assert!(format!("{e:#}").contains("no kiln-data partition"), "{e:#}");
        let at = add_data(&old, b"node state");
        let len = std::fs::metadata(&old).unwrap().len();
        // Another node's disk: refused.
        let e = plan(&mut open_rw(&new), &mut open_rw(&old), &old, len, "node-2").unwrap_err();
        assert!(format!("{e:#}").contains("disk of node node-1"), "{e:#}");
        // Another root slot size: refused.
        let other = d.path().join("other.img");
        node_disk(&other, "node-1", 3, 16);
        let e = plan(
            &mut open_rw(&other),
            &mut open_rw(&old),
            &old,
            len,
            "node-1",
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("root slot size changed"), "{e:#}");
        // This node's disk: partitions 1-3 from the new image, kiln-data and its bytes kept.
        let (mut img, mut t) = (open_rw(&new), open_rw(&old));
        let p = plan(&mut img, &mut t, &old, len, "node-1").unwrap();
        assert_eq!(p.kept, [DATA_PARTITION_NAME]);
        write(&mut img, &mut t, &p, &old).unwrap();
        drop(t);
        read_back(&mut img, &old, &p).unwrap();
        let bytes = std::fs::read(&old).unwrap();
        let newb = std::fs::read(&new).unwrap();
        let start = (p.partitions[0].first_lba * SECTOR_SIZE) as usize;
        assert!(bytes[start..p.write_end as usize] == newb[start..p.write_end as usize]);
        assert_eq!(&bytes[at as usize..at as usize + 10], b"node state");
        let back = disk::read_gpt(&mut open_rw(&old)).unwrap();
        assert_eq!(back.partitions.len(), 4);
        assert_eq!(back.partitions[3].name_text(), DATA_PARTITION_NAME);
    }
}
