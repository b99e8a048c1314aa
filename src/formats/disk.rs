//! Deterministic, root-free GPT disk image builder.
//!
//! [`write_disk`] assembles a bootable disk image entirely in user space: no
//! loop devices, no `mkfs`, no mounting. The resulting file contains
//!
//! * a protective MBR at LBA 0,
//! * the primary GPT header at LBA 1 and its 128-entry partition array at LBA 2,
//! * partition 1: an EFI System Partition formatted as FAT32 (via the `fatfs`
//!   crate) holding the caller-supplied files,
//! * partition 2: a Linux root (x86-64) partition whose contents are copied
//!   verbatim from a squashfs image,
//! * optionally partition 3: a small, empty "kiln-seed" slot (Linux data type)
//!   that per-node disks fill with a cloud-init `CIDATA` FAT volume
//!   ([`write_fat_volume`]), so a node disk differs from its role disk only
//!   inside that partition,
//! * the backup partition array and backup GPT header at the end of the disk.
//!
//! Every byte of the output is a pure function of the inputs: GUIDs are
//! supplied by the caller (see [`guid_from_seed`]), FAT timestamps come from a
//! fixed epoch, and files are written in the order given. Regions that are
//! never written stay holes in the (sparse) output file and read back as zeros.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{ensure, Context, Result};
use fatfs::{FatType, FileSystem, FormatVolumeOptions, FsOptions, TimeProvider};
use sha2::{Digest, Sha256};

/// Logical sector size used for the whole image.
pub const SECTOR_SIZE: u64 = 512;

/// One mebibyte; partitions are aligned to (and sized in) multiples of this.
pub const MIB: u64 = 1024 * 1024;

/// Number of entries in the GPT partition array.
const GPT_ENTRY_COUNT: u32 = 128;

/// Size in bytes of one GPT partition entry.
const GPT_ENTRY_SIZE: u32 = 128;

/// Size in bytes of the GPT header proper (the rest of its sector is zero).
const GPT_HEADER_SIZE: u32 = 92;

/// Sectors occupied by the partition entry array (128 * 128 / 512 = 32).
const GPT_ENTRY_SECTORS: u64 = (GPT_ENTRY_COUNT as u64 * GPT_ENTRY_SIZE as u64) / SECTOR_SIZE;

/// Sectors per MiB, the alignment unit for partitions.
const SECTORS_PER_MIB: u64 = MIB / SECTOR_SIZE;

/// Minimum number of clusters for a FAT32 volume (below this it is FAT16).
const FAT32_MIN_CLUSTERS: u64 = 65525;

/// EFI System Partition type GUID `C12A7328-F81F-11D2-BA4B-00A0C93EC93B`, in
/// on-disk (mixed-endian) byte order.
pub const ESP_TYPE_GUID: [u8; 16] = [
    0x28, 0x73, 0x2A, 0xC1, 0x1F, 0xF8, 0xD2, 0x11, 0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B,
];

/// Linux root (x86-64) partition type GUID
/// `4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709`, in on-disk (mixed-endian) byte order.
pub const LINUX_ROOT_X86_64_TYPE_GUID: [u8; 16] = [
    0xE3, 0xBC, 0x68, 0x4F, 0xCD, 0xE8, 0xB1, 0x4D, 0x96, 0xE7, 0xFB, 0xCA, 0xF9, 0x84, 0xB7, 0x09,
];

/// Linux filesystem data partition type GUID
/// `0FC63DAF-8483-4772-8E79-3D69D8477DE4`, in on-disk (mixed-endian) byte order.
pub const LINUX_DATA_TYPE_GUID: [u8; 16] = [
    0xAF, 0x3D, 0xC6, 0x0F, 0x83, 0x84, 0x72, 0x47, 0x8E, 0x79, 0x3D, 0x69, 0xD8, 0x47, 0x7D, 0xE4,
];

/// A file to place on the EFI System Partition.
#[derive(Debug, Clone)]
pub struct EspFile {
    /// Destination path inside the ESP, e.g. `"EFI/BOOT/BOOTX64.EFI"`:
    /// forward slashes, no leading slash, no `.`/`..` components.
    pub path: String,
    /// Where the file's contents come from.
    pub source: EspSource,
}

/// Contents of an [`EspFile`].
#[derive(Debug, Clone)]
pub enum EspSource {
    /// Literal bytes.
    Bytes(Vec<u8>),
}

/// Parameters of the disk image produced by [`write_disk`].
#[derive(Debug, Clone)]
pub struct DiskLayout {
    /// Disk GUID, stored verbatim as the on-disk (mixed-endian) GPT bytes.
    /// Use [`guid_to_string`] for its textual form.
    pub disk_guid: [u8; 16],
    /// Unique partition GUID of the ESP (on-disk byte order).
    pub esp_guid: [u8; 16],
    /// Unique partition GUID of the root partition (on-disk byte order).
    pub root_guid: [u8; 16],
    /// ESP size in MiB; `0` selects an automatic size of
    /// `content * 1.2 + 32 MiB`, rounded up to a MiB and at least 64 MiB.
    pub esp_size_mib: u64,
    /// FAT volume label (at most 11 ASCII characters; upper-cased).
    pub esp_label: String,
    /// FAT volume serial number.
    pub esp_volume_id: u32,
    /// GPT partition name of the root partition (at most 36 UTF-16 units).
    pub root_partition_name: String,
    /// Size in MiB of the root partition (a *slot*: the image at its start, the rest a zero
    /// hole), so that a later, larger build fits the same partition; `0` = the image's size
    /// rounded up to a MiB. An image larger than the slot is an error.
    pub root_slot_mib: u64,
    /// Size in MiB of the (empty) seed partition 3; `0` = no seed partition.
    pub seed_size_mib: u64,
    /// Unique partition GUID of the seed partition (on-disk byte order).
    pub seed_guid: [u8; 16],
}

/// Geometry of an image written by [`write_disk`]. LBAs are in 512-byte
/// sectors and inclusive on both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Total image size in bytes.
    pub size_bytes: u64,
    /// `(first_lba, last_lba)` of the ESP (partition 1).
    pub esp: (u64, u64),
    /// `(first_lba, last_lba)` of the root partition (partition 2).
    pub root: (u64, u64),
    /// `(first_lba, last_lba)` of the seed partition (partition 3), if any.
    pub seed: Option<(u64, u64)>,
}

/// Formats 16 on-disk GPT GUID bytes as the canonical lowercase text that
/// `blkid`/Linux print, e.g. `c12a7328-f81f-11d2-ba4b-00a0c93ec93b`.
///
/// The first three fields are stored little-endian on disk, the last two
/// big-endian.
pub fn guid_to_string(guid: &[u8; 16]) -> String {
    let g = guid;
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}",
        g[3],
        g[2],
        g[1],
        g[0],
        g[5],
        g[4],
        g[7],
        g[6],
        g[8],
        g[9],
        hex::encode(&g[10..16])
    )
}

/// Derives a stable GUID (on-disk byte order) from `seed` and a `purpose`
/// string: the first 16 bytes of `sha256(seed || purpose)`, with the RFC 4122
/// version (4) and variant bits set as they appear in the GPT encoding
/// (version nibble in the high half of byte 7, variant in byte 8).
pub fn guid_from_seed(seed: &[u8], purpose: &str) -> [u8; 16] {
    let mut hasher = Sha256::new();
    hasher.update(seed);
    hasher.update(purpose.as_bytes());
    let digest = hasher.finalize();
    let mut guid = [0u8; 16];
    guid.copy_from_slice(&digest[..16]);
    guid[7] = (guid[7] & 0x0F) | 0x40;
    guid[8] = (guid[8] & 0x3F) | 0x80;
    guid
}

/// Writes a complete GPT disk image to `out` (created or truncated).
///
/// Layout: protective MBR, primary GPT at LBA 1/2, partition 1 = ESP ("ESP",
/// FAT32 with `esp_files` written in the given order and every timestamp set
/// to `fat_time_epoch`, UTC seconds clamped to the FAT range 1980..=2107),
/// partition 2 = Linux root x86-64 containing `root_image` padded to a MiB
/// multiple, and the backup GPT in the last 33 sectors. Partitions are 1 MiB
/// aligned. The file is created sparse with `set_len` and fsynced at the end.
pub fn write_disk(
    out: &Path,
    layout: &DiskLayout,
    esp_files: &[EspFile],
    root_image: &Path,
    fat_time_epoch: i64,
) -> Result<DiskInfo> {
    let label = fat_volume_label(&layout.esp_label)?;
    let root_name = gpt_partition_name(&layout.root_partition_name)?;
    let esp_name = gpt_partition_name("ESP")?;
    validate_esp_paths(esp_files)?;

    // Sizes.
    let root_len = std::fs::metadata(root_image)
        .with_context(|| format!("stat root image {}", root_image.display()))?
        .len();
    ensure!(root_len > 0, "root image {} is empty", root_image.display());
    let root_bytes = if layout.root_slot_mib == 0 {
        round_up(root_len, MIB)
    } else {
        let slot = layout
            .root_slot_mib
            .checked_mul(MIB)
            .context("root slot size overflows")?;
        ensure!(
            root_len <= slot,
            "root image {} is {} MiB, larger than the root slot of {} MiB",
            root_image.display(),
            root_len.div_ceil(MIB),
            layout.root_slot_mib
        );
        slot
    };

    let esp_bytes = if layout.esp_size_mib == 0 {
        auto_esp_size(esp_files)?
    } else {
        layout
            .esp_size_mib
            .checked_mul(MIB)
            .context("ESP size overflows")?
    };
    ensure!(
        esp_bytes / SECTOR_SIZE <= u64::from(u32::MAX),
        "ESP of {esp_bytes} bytes is too large for FAT32"
    );

    // Geometry: 1 MiB head (MBR + primary GPT), ESP, root, 1 MiB tail (backup GPT).
    let esp_first = SECTORS_PER_MIB;
    let esp_last = esp_first + esp_bytes / SECTOR_SIZE - 1;
    let root_first = esp_last + 1;
    let root_last = root_first + root_bytes / SECTOR_SIZE - 1;
    let seed = (layout.seed_size_mib > 0).then(|| {
        let first = root_last + 1;
        (first, first + layout.seed_size_mib * SECTORS_PER_MIB - 1)
    });
    let last_used = seed.map_or(root_last, |(_, last)| last);
    let total_lbas = last_used + 1 + SECTORS_PER_MIB;
    let size_bytes = total_lbas * SECTOR_SIZE;
    let info = DiskInfo {
        size_bytes,
        esp: (esp_first, esp_last),
        root: (root_first, root_last),
        seed,
    };

    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .with_context(|| format!("create disk image {}", out.display()))?;
    file.set_len(size_bytes)
        .with_context(|| format!("size disk image {} to {size_bytes} bytes", out.display()))?;

    // Partition tables.
    let mut partitions = vec![
        GptPartition {
            type_guid: ESP_TYPE_GUID,
            unique_guid: layout.esp_guid,
            first_lba: esp_first,
            last_lba: esp_last,
            attributes: 0,
            name: esp_name,
        },
        GptPartition {
            type_guid: LINUX_ROOT_X86_64_TYPE_GUID,
            unique_guid: layout.root_guid,
            first_lba: root_first,
            last_lba: root_last,
            attributes: 0,
            name: root_name,
        },
    ];
    if let Some((first_lba, last_lba)) = seed {
        partitions.push(GptPartition {
            type_guid: LINUX_DATA_TYPE_GUID,
            unique_guid: layout.seed_guid,
            first_lba,
            last_lba,
            attributes: 0,
            name: gpt_partition_name(SEED_PARTITION_NAME)?,
        });
    }
    write_partition_tables(&mut file, total_lbas, &layout.disk_guid, &partitions)
        .with_context(|| format!("write partition tables to {}", out.display()))?;

    // ESP.
    {
        let slice = PartitionSlice::new(&mut file, esp_first * SECTOR_SIZE, esp_bytes);
        build_esp(
            slice,
            &label,
            layout.esp_volume_id,
            esp_files,
            fat_time_epoch,
        )
        .with_context(|| format!("build ESP in {}", out.display()))?;
    }

    // Root partition: streaming copy; padding stays a zero hole.
    copy_root_image(&mut file, root_first * SECTOR_SIZE, root_image, root_len).with_context(
        || {
            format!(
                "copy root image {} into {}",
                root_image.display(),
                out.display()
            )
        },
    )?;

    file.sync_all()
        .with_context(|| format!("fsync disk image {}", out.display()))?;
    Ok(info)
}

/// GPT name of the seed partition (partition 3).
pub const SEED_PARTITION_NAME: &str = "kiln-seed";

/// Formats `[offset, offset + len)` of `file` as a FAT volume (FAT12/16 for
/// small sizes, FAT32 when the size allows) labelled `label`, and writes
/// `files` into it in the given order with every timestamp at `epoch`.
/// Used for cloud-init `CIDATA` volumes, both stand-alone images and the seed
/// partition of per-node disks.
pub fn write_fat_volume(
    file: &mut File,
    offset: u64,
    len: u64,
    label: &str,
    volume_id: u32,
    files: &[EspFile],
    epoch: i64,
) -> Result<()> {
    let label = fat_volume_label(label)?;
    validate_esp_paths(files)?;
    ensure!(
        len.is_multiple_of(SECTOR_SIZE) && len >= 64 * 1024,
        "FAT volume of {len} bytes is too small or not a multiple of {SECTOR_SIZE}"
    );
    // Start from zeros so nothing of a previous content survives in the slack.
    file.seek(SeekFrom::Start(offset))?;
    let zeros = vec![0u8; MIB as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB);
        file.write_all(&zeros[..n as usize])
            .context("zero the FAT volume")?;
        left -= n;
    }
    let slice = PartitionSlice::new(file, offset, len);
    build_esp(slice, &label, volume_id, files, epoch)
}

/// Reads the GPT partition entry `index` (0-based) of a disk image written by
/// [`write_disk`] and returns its `(first_lba, last_lba)` and GPT name, or
/// `None` if the slot is empty. Checks the header signature and CRCs.
pub fn read_partition(file: &mut File, index: u32) -> Result<Option<(u64, u64, String)>> {
    let (_, entries) = read_gpt_checked(file)?;
    ensure!(
        (index as usize) < entries.len() / GPT_ENTRY_SIZE as usize,
        "GPT has only {} entries",
        entries.len() / GPT_ENTRY_SIZE as usize
    );
    let e = &entries[(index * GPT_ENTRY_SIZE) as usize..((index + 1) * GPT_ENTRY_SIZE) as usize];
    if e[0..16].iter().all(|b| *b == 0) {
        return Ok(None);
    }
    let p = gpt_partition_at(e);
    Ok(Some((p.first_lba, p.last_lba, p.name_text())))
}

/// Rounds `value` up to a multiple of `unit`.
fn round_up(value: u64, unit: u64) -> u64 {
    value.div_ceil(unit) * unit
}

/// Automatic ESP size: room for the content twice over (a second kernel and initrd, written
/// next to the first by an A/B update) plus 10 % and 32 MiB, rounded up to a multiple of
/// 256 MiB, so that the size — and with it every later partition's offset — stays the same
/// from build to build while the kernel and initrd grow a little.
fn auto_esp_size(esp_files: &[EspFile]) -> Result<u64> {
    let mut content: u64 = 0;
    for f in esp_files {
        let len = match &f.source {
            EspSource::Bytes(b) => b.len() as u64,
        };
        content = content.saturating_add(len);
    }
    let twice = content.saturating_mul(2).saturating_mul(11).div_ceil(10);
    Ok(round_up(twice.saturating_add(32 * MIB), 256 * MIB))
}

/// Encodes a FAT volume label: ASCII, at most 11 characters, upper-cased and
/// space padded.
fn fat_volume_label(label: &str) -> Result<[u8; 11]> {
    ensure!(
        label.len() <= 11,
        "FAT volume label {label:?} is longer than 11 characters"
    );
    let mut out = [b' '; 11];
    for (dst, c) in out.iter_mut().zip(label.bytes()) {
        let ok = c.is_ascii_alphanumeric() || b" !#$%&'()-@^_`{}~".contains(&c);
        ensure!(
            ok,
            "FAT volume label {label:?} contains invalid character {:?}",
            c as char
        );
        *dst = c.to_ascii_uppercase();
    }
    Ok(out)
}

/// Encodes a GPT partition name as 36 UTF-16LE code units (72 bytes).
fn gpt_partition_name(name: &str) -> Result<[u8; 72]> {
    let units: Vec<u16> = name.encode_utf16().collect();
    ensure!(
        units.len() <= 36,
        "GPT partition name {name:?} is longer than 36 UTF-16 code units"
    );
    let mut out = [0u8; 72];
    for (i, u) in units.iter().enumerate() {
        out[2 * i..2 * i + 2].copy_from_slice(&u.to_le_bytes());
    }
    Ok(out)
}

/// Checks that ESP paths are relative, slash-separated, free of `.`/`..`
/// and unique (case-insensitively, as FAT is).
fn validate_esp_paths(esp_files: &[EspFile]) -> Result<()> {
    let mut seen = HashSet::new();
    for f in esp_files {
        let p = &f.path;
        ensure!(
            !p.is_empty() && !p.starts_with('/') && !p.ends_with('/'),
            "invalid ESP path {p:?}"
        );
        ensure!(!p.contains('\\'), "ESP path {p:?} must use forward slashes");
        for comp in p.split('/') {
            ensure!(
                !comp.is_empty() && comp != "." && comp != "..",
                "invalid component {comp:?} in ESP path {p:?}"
            );
        }
        ensure!(
            seen.insert(p.to_lowercase()),
            "duplicate ESP path {p:?} (FAT is case-insensitive)"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// GPT / MBR
// ---------------------------------------------------------------------------

/// One populated GPT partition entry (LBAs inclusive; `name` as stored: UTF-16LE, zero padded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPartition {
    pub type_guid: [u8; 16],
    pub unique_guid: [u8; 16],
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    pub name: [u8; 72],
}

impl GptPartition {
    /// The partition's name as text.
    pub fn name_text(&self) -> String {
        let units: Vec<u16> = self
            .name
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|u| *u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }
}

/// A disk's GPT as read by [`read_gpt`].
#[derive(Debug, Clone)]
pub struct GptTable {
    pub disk_guid: [u8; 16],
    /// The populated entries from slot 1 on, in slot order; reading stops at the first empty
    /// slot (kiln's disks and systemd-repart fill slots without gaps).
    pub partitions: Vec<GptPartition>,
}

/// Reads and checks (signature, header and entry CRCs) the primary GPT of a disk or image.
pub fn read_gpt(file: &mut File) -> Result<GptTable> {
    let (hdr, entries) = read_gpt_checked(file)?;
    let mut disk_guid = [0u8; 16];
    disk_guid.copy_from_slice(&hdr[56..72]);
    let partitions = entries
        .chunks(GPT_ENTRY_SIZE as usize)
        .take_while(|e| e[0..16].iter().any(|b| *b != 0))
        .map(gpt_partition_at)
        .collect();
    Ok(GptTable {
        disk_guid,
        partitions,
    })
}

/// The primary GPT header sector and its entry array, both checked (signature, header size
/// and CRC, entry size and count, entries CRC): what [`read_gpt`] and [`read_partition`] read.
fn read_gpt_checked(file: &mut File) -> Result<(Vec<u8>, Vec<u8>)> {
    let hdr = read_at(file, SECTOR_SIZE, SECTOR_SIZE as usize).context("read GPT header")?;
    ensure!(&hdr[0..8] == b"EFI PART", "no GPT header at LBA 1");
    let hsize = le32(&hdr, 12) as usize;
    ensure!(
        (GPT_HEADER_SIZE as usize..=SECTOR_SIZE as usize).contains(&hsize),
        "GPT header size {hsize} is out of range"
    );
    let mut check = hdr[..hsize].to_vec();
    check[16..20].fill(0);
    ensure!(
        crc32fast::hash(&check) == le32(&hdr, 16),
        "GPT header CRC mismatch"
    );
    let entries_lba = u64::from_le_bytes(hdr[72..80].try_into().expect("8 bytes"));
    let count = le32(&hdr, 80);
    let esize = le32(&hdr, 84);
    ensure!(
        esize == GPT_ENTRY_SIZE && (1..=1024).contains(&count),
        "GPT with {count} entries of {esize} bytes is not supported"
    );
    let entries = read_at(
        file,
        entries_lba * SECTOR_SIZE,
        (count * GPT_ENTRY_SIZE) as usize,
    )
    .context("read GPT entries")?;
    ensure!(
        crc32fast::hash(&entries) == le32(&hdr, 88),
        "GPT partition entries CRC mismatch"
    );
    Ok((hdr, entries))
}

/// One populated 128-byte GPT entry.
fn gpt_partition_at(e: &[u8]) -> GptPartition {
    let mut p = GptPartition {
        type_guid: e[0..16].try_into().expect("16 bytes"),
        unique_guid: e[16..32].try_into().expect("16 bytes"),
        first_lba: u64::from_le_bytes(e[32..40].try_into().expect("8 bytes")),
        last_lba: u64::from_le_bytes(e[40..48].try_into().expect("8 bytes")),
        attributes: u64::from_le_bytes(e[48..56].try_into().expect("8 bytes")),
        name: [0u8; 72],
    };
    p.name.copy_from_slice(&e[56..128]);
    p
}

/// Writes a protective MBR and primary and backup GPT holding `partitions` (at most 128) for
/// a disk of `total_lbas` sectors.
pub fn write_gpt(
    file: &mut File,
    total_lbas: u64,
    disk_guid: &[u8; 16],
    partitions: &[GptPartition],
) -> Result<()> {
    ensure!(
        partitions.len() <= GPT_ENTRY_COUNT as usize,
        "more than {GPT_ENTRY_COUNT} partitions"
    );
    let last_usable = total_lbas.saturating_sub(GPT_ENTRY_SECTORS + 2);
    for p in partitions {
        ensure!(
            p.first_lba >= 2 + GPT_ENTRY_SECTORS
                && p.first_lba <= p.last_lba
                && p.last_lba <= last_usable,
            "partition {} (LBA {}..{}) does not fit a disk of {total_lbas} sectors",
            p.name_text(),
            p.first_lba,
            p.last_lba
        );
    }
    write_partition_tables(file, total_lbas, disk_guid, partitions)
}

/// Serialises the full 128-entry partition array.
fn gpt_entries(partitions: &[GptPartition]) -> Vec<u8> {
    let mut buf = vec![0u8; (GPT_ENTRY_COUNT * GPT_ENTRY_SIZE) as usize];
    for (i, p) in partitions.iter().enumerate() {
        let e = &mut buf[i * GPT_ENTRY_SIZE as usize..(i + 1) * GPT_ENTRY_SIZE as usize];
        e[0..16].copy_from_slice(&p.type_guid);
        e[16..32].copy_from_slice(&p.unique_guid);
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
        e[56..128].copy_from_slice(&p.name);
    }
    buf
}

/// Serialises one GPT header sector (header CRC filled in).
fn gpt_header(
    my_lba: u64,
    alternate_lba: u64,
    last_usable_lba: u64,
    disk_guid: &[u8; 16],
    entries_lba: u64,
    entries_crc: u32,
) -> [u8; SECTOR_SIZE as usize] {
    let mut h = [0u8; SECTOR_SIZE as usize];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&GPT_HEADER_SIZE.to_le_bytes());
    // 16..20: header CRC (computed below), 20..24: reserved.
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alternate_lba.to_le_bytes());
    h[40..48].copy_from_slice(&(2 + GPT_ENTRY_SECTORS).to_le_bytes());
    h[48..56].copy_from_slice(&last_usable_lba.to_le_bytes());
    h[56..72].copy_from_slice(disk_guid);
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&GPT_ENTRY_COUNT.to_le_bytes());
    h[84..88].copy_from_slice(&GPT_ENTRY_SIZE.to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..GPT_HEADER_SIZE as usize]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Serialises the protective MBR covering the whole disk.
fn protective_mbr(total_lbas: u64) -> [u8; SECTOR_SIZE as usize] {
    let mut m = [0u8; SECTOR_SIZE as usize];
    // 440..444: disk signature (0); 446: first partition record.
    let size = (total_lbas - 1).min(u64::from(u32::MAX)) as u32;
    let rec = &mut m[446..462];
    rec[0] = 0x00; // not bootable
    rec[1..4].copy_from_slice(&[0x00, 0x02, 0x00]); // CHS of LBA 1
    rec[4] = 0xEE; // GPT protective
    rec[5..8].copy_from_slice(&[0xFF, 0xFF, 0xFF]); // CHS end: maximum
    rec[8..12].copy_from_slice(&1u32.to_le_bytes());
    rec[12..16].copy_from_slice(&size.to_le_bytes());
    m[510] = 0x55;
    m[511] = 0xAA;
    m
}

/// Writes the protective MBR plus primary and backup GPT.
fn write_partition_tables(
    file: &mut File,
    total_lbas: u64,
    disk_guid: &[u8; 16],
    partitions: &[GptPartition],
) -> Result<()> {
    let last_lba = total_lbas - 1;
    let backup_entries_lba = last_lba - GPT_ENTRY_SECTORS;
    let last_usable_lba = backup_entries_lba - 1;
    let entries = gpt_entries(partitions);
    let entries_crc = crc32fast::hash(&entries);
    let primary = gpt_header(1, last_lba, last_usable_lba, disk_guid, 2, entries_crc);
    let backup = gpt_header(
        last_lba,
        1,
        last_usable_lba,
        disk_guid,
        backup_entries_lba,
        entries_crc,
    );

    let writes: [(u64, &[u8], &str); 5] = [
        (0, &protective_mbr(total_lbas), "protective MBR"),
        (1, &primary, "primary GPT header"),
        (2, &entries, "primary GPT entries"),
        (backup_entries_lba, &entries, "backup GPT entries"),
        (last_lba, &backup, "backup GPT header"),
    ];
    for (lba, data, what) in writes {
        file.seek(SeekFrom::Start(lba * SECTOR_SIZE))
            .and_then(|_| file.write_all(data))
            .with_context(|| format!("write {what} at LBA {lba}"))?;
    }
    Ok(())
}

/// Streams `len` bytes of `root_image` into `file` at byte `offset`.
fn copy_root_image(file: &mut File, offset: u64, root_image: &Path, len: u64) -> Result<()> {
    let src = File::open(root_image)
        .with_context(|| format!("open root image {}", root_image.display()))?;
    file.seek(SeekFrom::Start(offset))
        .context("seek to root partition")?;
    let copied = io::copy(&mut src.take(len), file).context("copy root image data")?;
    ensure!(
        copied == len,
        "root image {} shrank while copying ({copied} of {len} bytes)",
        root_image.display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// ESP / FAT
// ---------------------------------------------------------------------------

/// A `Read + Write + Seek` window onto `[start, start + len)` of a file, so
/// `fatfs` can operate on a partition inside the disk image.
pub struct PartitionSlice<'a> {
    file: &'a mut File,
    start: u64,
    len: u64,
    /// Position relative to `start`.
    pos: u64,
    /// Known absolute position of the underlying file, to skip redundant seeks.
    file_pos: Option<u64>,
}

impl<'a> PartitionSlice<'a> {
    /// Creates a window of `len` bytes starting at byte `start` of `file`.
    pub fn new(file: &'a mut File, start: u64, len: u64) -> Self {
        PartitionSlice {
            file,
            start,
            len,
            pos: 0,
            file_pos: None,
        }
    }

    /// Seeks the underlying file to the current window position if needed.
    fn sync_pos(&mut self) -> io::Result<()> {
        let want = self.start + self.pos;
        if self.file_pos != Some(want) {
            self.file_pos = None;
            self.file.seek(SeekFrom::Start(want))?;
            self.file_pos = Some(want);
        }
        Ok(())
    }

    /// Records that `n` bytes were transferred at the current position.
    fn advance(&mut self, n: usize) {
        self.pos += n as u64;
        self.file_pos = self.file_pos.map(|p| p + n as u64);
    }
}

impl Read for PartitionSlice<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(remaining) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.sync_pos()?;
        match self.file.read(&mut buf[..n]) {
            Ok(read) => {
                self.advance(read);
                Ok(read)
            }
            Err(e) => {
                self.file_pos = None;
                Err(e)
            }
        }
    }
}

impl Write for PartitionSlice<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let remaining = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(remaining) as usize;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past end of partition",
            ));
        }
        self.sync_pos()?;
        match self.file.write(&buf[..n]) {
            Ok(written) => {
                self.advance(written);
                Ok(written)
            }
            Err(e) => {
                self.file_pos = None;
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for PartitionSlice<'_> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) if p <= self.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek outside partition",
            )),
        }
    }
}

/// A FAT `TimeProvider` returning one fixed date/time.
#[derive(Debug)]
struct FixedTimeProvider {
    date_time: fatfs::DateTime,
}

impl TimeProvider for FixedTimeProvider {
    fn get_current_date(&self) -> fatfs::Date {
        self.date_time.date
    }

    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.date_time
    }
}

/// Key identifying a FAT date/time: (year, month, day, hour, minute, second).
type FatTimeKey = (u16, u16, u16, u16, u16, u16);

/// Interned providers: `fatfs` 0.3 wants a `&'static dyn TimeProvider`, so each
/// distinct FAT time is leaked exactly once and reused afterwards.
static TIME_PROVIDERS: Mutex<BTreeMap<FatTimeKey, &'static FixedTimeProvider>> =
    Mutex::new(BTreeMap::new());

/// Returns the (interned) provider for the FAT time corresponding to `epoch`.
fn time_provider(epoch: i64) -> &'static FixedTimeProvider {
    let date_time = fat_date_time(epoch);
    let (d, t) = (date_time.date, date_time.time);
    let key = (d.year, d.month, d.day, t.hour, t.min, t.sec);
    let mut map = TIME_PROVIDERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    map.entry(key)
        .or_insert_with(|| Box::leak(Box::new(FixedTimeProvider { date_time })))
}

/// Converts UTC seconds since 1970 to a FAT date/time, clamped to
/// 1980-01-01 00:00:00 ..= 2107-12-31 23:59:58.
fn fat_date_time(epoch: i64) -> fatfs::DateTime {
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (year, month, day, secs) = if year < 1980 {
        (1980, 1, 1, 0)
    } else if year > 2107 {
        (2107, 12, 31, 86_398)
    } else {
        (year, month, day, secs)
    };
    // All values are range-checked above, so the narrowing casts are lossless.
    fatfs::DateTime {
        date: fatfs::Date {
            year: year as u16,
            month: month as u16,
            day: day as u16,
        },
        time: fatfs::Time {
            hour: (secs / 3600) as u16,
            min: (secs / 60 % 60) as u16,
            sec: (secs % 60) as u16,
            millis: 0,
        },
    }
}

/// Proleptic Gregorian (year, month, day) for a day count relative to
/// 1970-01-01 (Howard Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11]
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Picks the largest FAT32 cluster size (512 B ..= 4 KiB) that still yields at
/// least 65525 clusters, or `None` if the volume is too small for FAT32.
fn fat32_cluster_size(volume_bytes: u64) -> Option<u32> {
    let total_sectors = volume_bytes / SECTOR_SIZE;
    [4096u64, 2048, 1024, 512].into_iter().find_map(|cluster| {
        let spc = cluster / SECTOR_SIZE;
        // 32 reserved sectors, two FATs of 4-byte entries (slightly overestimated).
        let fat_sectors = (total_sectors / spc + 2)
            .saturating_mul(4)
            .div_ceil(SECTOR_SIZE);
        let data_sectors = total_sectors.checked_sub(32 + 2 * fat_sectors)?;
        // Keep a small margin so fatfs' own rounding cannot drop us to FAT16.
        (data_sectors / spc >= FAT32_MIN_CLUSTERS + 64).then_some(cluster as u32)
    })
}

/// Formats `slice` as FAT (FAT32 whenever the size allows) and writes `files`.
fn build_esp(
    mut slice: PartitionSlice<'_>,
    label: &[u8; 11],
    volume_id: u32,
    files: &[EspFile],
    fat_time_epoch: i64,
) -> Result<()> {
    let mut opts = FormatVolumeOptions::new()
        .volume_label(*label)
        .volume_id(volume_id);
    // Too small for FAT32: let fatfs pick FAT16/FAT12 and a cluster size.
    let esp_len = slice.len;
    let fat32_cluster = fat32_cluster_size(esp_len);
    if let Some(cluster) = fat32_cluster {
        opts = opts.fat_type(FatType::Fat32).bytes_per_cluster(cluster);
    }
    fatfs::format_volume(&mut slice, opts).context("format FAT volume")?;
    slice.seek(SeekFrom::Start(0)).context("rewind ESP")?;

    let provider: &'static dyn TimeProvider = time_provider(fat_time_epoch);
    let fs = FileSystem::new(
        &mut slice,
        FsOptions::new()
            .time_provider(provider)
            .update_accessed_date(false),
    )
    .context("mount freshly formatted FAT volume")?;
    ensure!(
        fat32_cluster.is_none() || fs.fat_type() == FatType::Fat32,
        "ESP of {esp_len} bytes was not formatted as FAT32"
    );
    // Count free clusters now so the FSInfo sector ends up with a valid free
    // cluster count (fatfs only maintains it once it is known).
    fs.stats().context("compute FAT free cluster count")?;
    {
        let root = fs.root_dir();
        for f in files {
            if let Some((parent, _)) = f.path.rsplit_once('/') {
                let mut dir_path = String::new();
                for comp in parent.split('/') {
                    if !dir_path.is_empty() {
                        dir_path.push('/');
                    }
                    dir_path.push_str(comp);
                    root.create_dir(&dir_path)
                        .with_context(|| format!("create ESP directory {dir_path}"))?;
                }
            }
            let mut dst = root
                .create_file(&f.path)
                .with_context(|| format!("create ESP file {}", f.path))?;
            match &f.source {
                EspSource::Bytes(bytes) => dst
                    .write_all(bytes)
                    .with_context(|| format!("write ESP file {}", f.path))?,
            }
            dst.flush()
                .with_context(|| format!("flush ESP file {}", f.path))?;
        }
    }
    fs.unmount().context("unmount FAT volume")?;
    fix_fat_directories(&mut slice).context("normalise FAT directory entries")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Post-processing of fatfs 0.3 directories
// ---------------------------------------------------------------------------
//
// fatfs 0.3.6 has two bugs in `Dir::create_dir` (fixed upstream after 0.3,
// rafalh/rust-fatfs#99 and #100):
//
// * it writes long-file-name (LFN) entries in front of the `.` and `..`
//   entries, so they are not the first two slots of the directory;
// * on FAT32 the `..` entry of a first-level directory points at the root
//   directory's cluster instead of 0.
//
// `fsck.fat` reports (and would "repair") both. Since the volume is fully
// built before we touch it, we walk the directory tree with a tiny raw FAT
// reader and rewrite each subdirectory in place: drop the LFN entries of `.`
// and `..`, compact the remaining entries and fix `..`. Cluster allocation is
// unchanged, so the FAT and FSInfo stay valid.

/// Size of one FAT directory entry.
const DIR_ENTRY: usize = 32;

/// Geometry of a FAT volume, parsed from its boot sector.
struct FatGeometry {
    /// FAT entry width: 12, 16 or 32.
    bits: u32,
    bytes_per_cluster: u64,
    /// Byte offset of the first FAT.
    fat_offset: u64,
    /// Byte offset and length of the fixed root directory (FAT12/16).
    root_dir_offset: u64,
    root_dir_len: u64,
    /// Byte offset of cluster 2.
    data_offset: u64,
    /// First cluster of the root directory (FAT32).
    root_cluster: u32,
    total_clusters: u32,
}

/// Little-endian u16 at `off`.
fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// Little-endian u32 at `off`.
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Reads `len` bytes at `offset`.
fn read_at<D: Read + Seek>(dev: &mut D, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    dev.seek(SeekFrom::Start(offset))?;
    dev.read_exact(&mut buf)?;
    Ok(buf)
}

/// Writes `data` at `offset`.
fn write_at<D: Write + Seek>(dev: &mut D, offset: u64, data: &[u8]) -> io::Result<()> {
    dev.seek(SeekFrom::Start(offset))?;
    dev.write_all(data)
}

impl FatGeometry {
    /// Parses the BIOS parameter block.
    fn read<D: Read + Seek>(dev: &mut D) -> Result<Self> {
        let bs = read_at(dev, 0, 512).context("read FAT boot sector")?;
        let bytes_per_sector = u64::from(le16(&bs, 11));
        let sectors_per_cluster = u64::from(bs[13]);
        let reserved = u64::from(le16(&bs, 14));
        let fats = u64::from(bs[16]);
        let root_entries = u64::from(le16(&bs, 17));
        let total_sectors = match le16(&bs, 19) {
            0 => u64::from(le32(&bs, 32)),
            n => u64::from(n),
        };
        let fat_sectors = match le16(&bs, 22) {
            0 => u64::from(le32(&bs, 36)),
            n => u64::from(n),
        };
        ensure!(
            bytes_per_sector.is_power_of_two() && bytes_per_sector >= 512,
            "bad FAT sector size {bytes_per_sector}"
        );
        ensure!(sectors_per_cluster > 0 && fats > 0, "bad FAT boot sector");
        let root_dir_sectors = (root_entries * DIR_ENTRY as u64).div_ceil(bytes_per_sector);
        let first_data_sector = reserved + fats * fat_sectors + root_dir_sectors;
        let data_sectors = total_sectors
            .checked_sub(first_data_sector)
            .context("FAT metadata larger than volume")?;
        let total_clusters =
            u32::try_from(data_sectors / sectors_per_cluster).context("too many FAT clusters")?;
        let bits = if total_clusters < 4085 {
            12
        } else if u64::from(total_clusters) < FAT32_MIN_CLUSTERS {
            16
        } else {
            32
        };
        Ok(FatGeometry {
            bits,
            bytes_per_cluster: bytes_per_sector * sectors_per_cluster,
            fat_offset: reserved * bytes_per_sector,
            root_dir_offset: (reserved + fats * fat_sectors) * bytes_per_sector,
            root_dir_len: root_dir_sectors * bytes_per_sector,
            data_offset: first_data_sector * bytes_per_sector,
            root_cluster: le32(&bs, 44),
            total_clusters,
        })
    }

    /// Byte offset of data cluster `cluster` (>= 2).
    fn cluster_offset(&self, cluster: u32) -> u64 {
        self.data_offset + u64::from(cluster - 2) * self.bytes_per_cluster
    }

    /// Reads the FAT entry of `cluster` from the first FAT.
    fn next_cluster<D: Read + Seek>(&self, dev: &mut D, cluster: u32) -> io::Result<u32> {
        let c = u64::from(cluster);
        Ok(match self.bits {
            32 => le32(&read_at(dev, self.fat_offset + 4 * c, 4)?, 0) & 0x0FFF_FFFF,
            16 => u32::from(le16(&read_at(dev, self.fat_offset + 2 * c, 2)?, 0)),
            _ => {
                let v = le16(&read_at(dev, self.fat_offset + c + c / 2, 2)?, 0);
                u32::from(if cluster % 2 == 1 { v >> 4 } else { v & 0x0FFF })
            }
        })
    }

    /// Returns the cluster chain starting at `start`.
    fn chain<D: Read + Seek>(&self, dev: &mut D, start: u32) -> Result<Vec<u32>> {
        let end_of_chain = match self.bits {
            32 => 0x0FFF_FFF8,
            16 => 0xFFF8,
            _ => 0xFF8,
        };
        let mut chain = Vec::new();
        let mut cluster = start;
        loop {
            ensure!(
                cluster >= 2 && cluster - 2 < self.total_clusters,
                "invalid cluster {cluster} in chain starting at {start}"
            );
            ensure!(
                chain.len() <= self.total_clusters as usize,
                "cluster chain starting at {start} loops"
            );
            chain.push(cluster);
            cluster = self
                .next_cluster(dev, cluster)
                .with_context(|| format!("read FAT entry {cluster}"))?;
            if cluster >= end_of_chain {
                return Ok(chain);
            }
        }
    }
}

/// Whether a raw directory entry is an LFN fragment.
fn is_lfn_entry(e: &[u8]) -> bool {
    e[0] != 0xE5 && e[11] & 0x3F == 0x0F
}

/// Whether a raw directory entry is the `.` or `..` entry.
fn is_dot_entry(e: &[u8]) -> bool {
    &e[..11] == b".          " || &e[..11] == b"..         "
}

/// First clusters of the live subdirectories listed in raw directory data.
fn subdirectories(dir: &[u8]) -> Vec<u32> {
    dir.chunks_exact(DIR_ENTRY)
        .take_while(|e| e[0] != 0)
        .filter(|e| e[0] != 0xE5 && !is_lfn_entry(e) && !is_dot_entry(e))
        .filter(|e| e[11] & 0x10 != 0 && e[11] & 0x08 == 0)
        .map(|e| u32::from(le16(e, 20)) << 16 | u32::from(le16(e, 26)))
        .filter(|&c| c >= 2)
        .collect()
}

/// Removes the LFN entries attached to `.`/`..`, compacts the directory and,
/// if `root_cluster` is given, makes a `..` pointing at it point at 0.
fn compact_directory(dir: &mut [u8], root_cluster: Option<u32>) {
    let mut out: Vec<u8> = Vec::with_capacity(dir.len());
    let mut lfn_run: Vec<u8> = Vec::new();
    for e in dir.chunks_exact(DIR_ENTRY).take_while(|e| e[0] != 0) {
        if is_lfn_entry(e) {
            lfn_run.extend_from_slice(e);
            continue;
        }
        if is_dot_entry(e) {
            let mut e = e.to_vec();
            let cluster = u32::from(le16(&e, 20)) << 16 | u32::from(le16(&e, 26));
            if e[1] == b'.' && root_cluster == Some(cluster) {
                e[20..22].fill(0);
                e[26..28].fill(0);
            }
            out.extend_from_slice(&e);
        } else {
            out.extend_from_slice(&lfn_run);
            out.extend_from_slice(e);
        }
        lfn_run.clear();
    }
    out.extend_from_slice(&lfn_run);
    dir[..out.len()].copy_from_slice(&out);
    dir[out.len()..].fill(0);
}

/// Normalises every subdirectory of the FAT volume on `dev` (see above).
fn fix_fat_directories<D: Read + Write + Seek>(dev: &mut D) -> Result<()> {
    let g = FatGeometry::read(dev)?;
    let root_dir = if g.bits == 32 {
        let mut data = Vec::new();
        for c in g.chain(dev, g.root_cluster)? {
            data.extend(read_at(
                dev,
                g.cluster_offset(c),
                g.bytes_per_cluster as usize,
            )?);
        }
        data
    } else {
        read_at(dev, g.root_dir_offset, g.root_dir_len as usize)?
    };
    // (directory cluster, parent is the root directory)
    let mut pending: Vec<(u32, bool)> = subdirectories(&root_dir)
        .into_iter()
        .map(|c| (c, true))
        .collect();
    let mut seen = HashSet::new();
    while let Some((start, parent_is_root)) = pending.pop() {
        ensure!(
            seen.insert(start),
            "directory cluster {start} is linked twice"
        );
        let chain = g.chain(dev, start)?;
        let cluster_len = g.bytes_per_cluster as usize;
        let mut data = Vec::with_capacity(chain.len() * cluster_len);
        for &c in &chain {
            data.extend(
                read_at(dev, g.cluster_offset(c), cluster_len)
                    .with_context(|| format!("read directory cluster {c}"))?,
            );
        }
        let root_cluster = (parent_is_root && g.bits == 32).then_some(g.root_cluster);
        let before = data.clone();
        compact_directory(&mut data, root_cluster);
        if data != before {
            for (&c, chunk) in chain.iter().zip(data.chunks_exact(cluster_len)) {
                write_at(dev, g.cluster_offset(c), chunk)
                    .with_context(|| format!("write directory cluster {c}"))?;
            }
        }
        pending.extend(subdirectories(&data).into_iter().map(|c| (c, false)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    const EPOCH: i64 = 1_700_000_000; // 2023-11-14 22:13:20 UTC

    fn layout() -> DiskLayout {
        DiskLayout {
            disk_guid: guid_from_seed(b"build-1234", "disk"),
            esp_guid: guid_from_seed(b"build-1234", "esp"),
            root_guid: guid_from_seed(b"build-1234", "root"),
            esp_size_mib: 0,
            esp_label: "kiln-esp".to_string(),
            esp_volume_id: 0xDEAD_BEEF,
            root_partition_name: "kiln-root-a".to_string(),
            root_slot_mib: 0,
            seed_size_mib: 0,
            seed_guid: guid_from_seed(b"build-1234", "seed"),
        }
    }

    /// Deterministic pseudo-random bytes.
    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8
            })
            .collect()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        root: PathBuf,
        files: Vec<EspFile>,
        kernel: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root.squashfs");
        std::fs::write(&root, pattern(3 * MIB as usize, 7)).unwrap();
        let kernel = pattern(1_500_000, 3);
        let kernel_path = dir.path().join("vmlinuz");
        std::fs::write(&kernel_path, &kernel).unwrap();
        let files = vec![
            EspFile {
                path: "EFI/BOOT/BOOTX64.EFI".into(),
                source: EspSource::Bytes(b"MZ fake efi binary".to_vec()),
            },
            EspFile {
                path: "EFI/Linux/kiln-1.0.efi".into(),
                source: EspSource::Bytes(std::fs::read(&kernel_path).unwrap()),
            },
            EspFile {
                path: "loader/loader.conf".into(),
                source: EspSource::Bytes(b"timeout 0\n".to_vec()),
            },
        ];
        Fixture {
            dir,
            root,
            files,
            kernel,
        }
    }

    fn build(fx: &Fixture, name: &str) -> (PathBuf, DiskInfo) {
        let out = fx.dir.path().join(name);
        let info = write_disk(&out, &layout(), &fx.files, &fx.root, EPOCH).unwrap();
        (out, info)
    }

    /// Mounts the ESP of an image written by `write_disk`.
    fn open_esp<'a>(file: &'a mut File, info: &DiskInfo) -> FileSystem<PartitionSlice<'a>> {
        let (first, last) = info.esp;
        let len = (last - first + 1) * SECTOR_SIZE;
        let slice = PartitionSlice::new(file, first * SECTOR_SIZE, len);
        FileSystem::new(slice, FsOptions::new()).unwrap()
    }

    fn read_lba(file: &mut File, lba: u64, count: u64) -> Vec<u8> {
        let mut buf = vec![0u8; (count * SECTOR_SIZE) as usize];
        file.seek(SeekFrom::Start(lba * SECTOR_SIZE)).unwrap();
        file.read_exact(&mut buf).unwrap();
        buf
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn identical_inputs_give_identical_images() {
        let fx = fixture();
        let (a, info_a) = build(&fx, "a.img");
        let (b, info_b) = build(&fx, "b.img");
        assert_eq!(info_a, info_b);
        let a = std::fs::read(a).unwrap();
        let b = std::fs::read(b).unwrap();
        assert_eq!(a.len() as u64, info_a.size_bytes);
        assert!(a == b, "images differ");
        // 1 MiB head + 256 MiB ESP (auto: room for two kernel/initrd pairs, in 256 MiB
        // steps) + 3 MiB root + 1 MiB tail.
        assert_eq!(info_a.size_bytes, (1 + 256 + 3 + 1) * MIB);
    }

    #[test]
    fn gpt_is_valid() {
        let fx = fixture();
        let (img, info) = build(&fx, "disk.img");
        let mut f = File::open(&img).unwrap();
        let total_lbas = info.size_bytes / SECTOR_SIZE;

        let mbr = read_lba(&mut f, 0, 1);
        assert_eq!(&mbr[510..512], &[0x55, 0xAA]);
        assert_eq!(mbr[446 + 4], 0xEE);
        assert_eq!(u32_at(&mbr, 446 + 8), 1);
        assert_eq!(u64::from(u32_at(&mbr, 446 + 12)), total_lbas - 1);
        assert_eq!(u32_at(&mbr, 440), 0);

        let check_header = |f: &mut File, lba: u64, alt: u64, entries_lba: u64| {
            let mut h = read_lba(f, lba, 1);
            assert_eq!(&h[0..8], b"EFI PART");
            assert_eq!(u32_at(&h, 12), 92);
            let crc = u32_at(&h, 16);
            h[16..20].fill(0);
            assert_eq!(crc32fast::hash(&h[..92]), crc, "header CRC at LBA {lba}");
            assert_eq!(u64_at(&h, 24), lba);
            assert_eq!(u64_at(&h, 32), alt);
            assert_eq!(u64_at(&h, 40), 34);
            assert_eq!(u64_at(&h, 48), total_lbas - 34);
            assert_eq!(&h[56..72], &layout().disk_guid);
            assert_eq!(u64_at(&h, 72), entries_lba);
            assert_eq!(u32_at(&h, 80), 128);
            assert_eq!(u32_at(&h, 84), 128);
            let entries = read_lba(f, entries_lba, 32);
            assert_eq!(crc32fast::hash(&entries), u32_at(&h, 88), "entries CRC");
            entries
        };
        let primary = check_header(&mut f, 1, total_lbas - 1, 2);
        let backup = check_header(&mut f, total_lbas - 1, 1, total_lbas - 33);
        assert_eq!(primary, backup);

        let e1 = &primary[0..128];
        assert_eq!(&e1[0..16], &ESP_TYPE_GUID);
        assert_eq!(&e1[16..32], &layout().esp_guid);
        assert_eq!((u64_at(e1, 32), u64_at(e1, 40)), info.esp);
        assert_eq!(info.esp, (2048, 2048 + 256 * 2048 - 1));
        assert_eq!(&e1[56..62], &[b'E', 0, b'S', 0, b'P', 0]);

        let e2 = &primary[128..256];
        assert_eq!(&e2[0..16], &LINUX_ROOT_X86_64_TYPE_GUID);
        assert_eq!(&e2[16..32], &layout().root_guid);
        assert_eq!((u64_at(e2, 32), u64_at(e2, 40)), info.root);
        assert_eq!(info.root, (info.esp.1 + 1, info.esp.1 + 3 * 2048));
        let name: Vec<u16> = e2[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        assert_eq!(String::from_utf16(&name).unwrap(), "kiln-root-a");
        assert!(primary[256..].iter().all(|&b| b == 0));

        // Root contents copied verbatim.
        let root = read_lba(&mut f, info.root.0, 3 * 2048);
        assert!(root == pattern(3 * MIB as usize, 7), "root contents differ");
    }

    #[test]
    fn esp_contents_read_back() {
        let fx = fixture();
        let (img, info) = build(&fx, "disk.img");
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let fs = open_esp(&mut f, &info);
        assert_eq!(fs.fat_type(), FatType::Fat32);
        assert_eq!(fs.volume_id(), 0xDEAD_BEEF);
        assert_eq!(fs.volume_label(), "KILN-ESP");
        let root = fs.root_dir();

        let read = |path: &str| {
            let mut buf = Vec::new();
            root.open_file(path).unwrap().read_to_end(&mut buf).unwrap();
            buf
        };
        assert_eq!(read("EFI/BOOT/BOOTX64.EFI"), b"MZ fake efi binary");
        assert!(read("EFI/Linux/kiln-1.0.efi") == fx.kernel);
        assert_eq!(read("loader/loader.conf"), b"timeout 0\n");

        let expected = fat_date_time(EPOCH);
        assert_eq!(
            expected.date,
            fatfs::Date {
                year: 2023,
                month: 11,
                day: 14
            }
        );
        let linux = root.open_dir("EFI/Linux").unwrap();
        let entry = linux
            .iter()
            .map(|e| e.unwrap())
            .find(|e| e.file_name() == "kiln-1.0.efi")
            .expect("nested file exists");
        assert!(entry.is_file());
        assert_eq!(entry.len(), fx.kernel.len() as u64);
        assert_eq!(entry.modified().date, expected.date);
        assert_eq!(
            (entry.modified().time.hour, entry.modified().time.min),
            (22, 13)
        );
        assert_eq!(entry.created(), expected);
        let efi = root
            .iter()
            .map(|e| e.unwrap())
            .find(|e| e.file_name() == "EFI")
            .unwrap();
        assert!(efi.is_dir());
        assert_eq!(efi.created(), expected);
    }

    #[test]
    fn esp_directories_start_with_dot_entries() {
        let fx = fixture();
        let (img, info) = build(&fx, "disk.img");
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .unwrap();
        let (first, last) = info.esp;
        let len = (last - first + 1) * SECTOR_SIZE;
        let mut slice = PartitionSlice::new(&mut f, first * SECTOR_SIZE, len);
        let g = FatGeometry::read(&mut slice).unwrap();
        assert_eq!(g.bits, 32);
        let root = read_at(&mut slice, g.cluster_offset(g.root_cluster), 512).unwrap();
        // (cluster, parent cluster as stored in `..`)
        let mut pending: Vec<(u32, u32)> =
            subdirectories(&root).into_iter().map(|c| (c, 0)).collect();
        let mut dirs = 0;
        while let Some((c, parent)) = pending.pop() {
            dirs += 1;
            let d = read_at(&mut slice, g.cluster_offset(c), 512).unwrap();
            assert_eq!(&d[0..11], b".          ");
            assert_eq!(&d[32..43], b"..         ");
            let cluster_of = |e: &[u8]| u32::from(le16(e, 20)) << 16 | u32::from(le16(e, 26));
            assert_eq!(cluster_of(&d[0..32]), c);
            assert_eq!(cluster_of(&d[32..64]), parent);
            pending.extend(subdirectories(&d).into_iter().map(|s| (s, c)));
        }
        // EFI, EFI/BOOT, EFI/Linux, loader
        assert_eq!(dirs, 4);
        // Normalisation is idempotent.
        let before = std::fs::read(&img).unwrap();
        fix_fat_directories(&mut slice).unwrap();
        assert!(before == std::fs::read(&img).unwrap());
    }

    #[test]
    fn read_gpt_and_write_gpt_round_trip_on_a_larger_disk() {
        let fx = fixture();
        let out = fx.dir.path().join("rt.img");
        let lay = DiskLayout {
            seed_size_mib: 4,
            ..layout()
        };
        write_disk(&out, &lay, &fx.files, &fx.root, EPOCH).unwrap();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&out)
            .unwrap();
        let t = read_gpt(&mut f).unwrap();
        let names: Vec<String> = t.partitions.iter().map(|p| p.name_text()).collect();
        assert_eq!(names, ["ESP", "kiln-root-a", "kiln-seed"]);
        // Grow the disk and add a fourth partition after the seed, as a node's first boot does.
        let total = f.metadata().unwrap().len() / SECTOR_SIZE + 64 * 2048;
        f.set_len(total * SECTOR_SIZE).unwrap();
        let mut parts = t.partitions.clone();
        parts.push(GptPartition {
            type_guid: LINUX_DATA_TYPE_GUID,
            unique_guid: guid_from_seed(b"x", "data"),
            first_lba: t.partitions[2].last_lba + 1,
            last_lba: total - 34,
            attributes: 1 << 63,
            name: gpt_partition_name("kiln-data").unwrap(),
        });
        write_gpt(&mut f, total, &t.disk_guid, &parts).unwrap();
        let back = read_gpt(&mut f).unwrap();
        assert_eq!(back.partitions, parts);
        assert_eq!(back.disk_guid, t.disk_guid);
        // sfdisk agrees, when it is installed.
        if let Ok(o) = Command::new("sfdisk").arg("--dump").arg(&out).output() {
            if o.status.success() {
                let d = String::from_utf8_lossy(&o.stdout);
                assert!(d.contains("name=\"kiln-data\""), "{d}");
                assert!(
                    !String::from_utf8_lossy(&o.stderr).contains("GPT"),
                    "{}",
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        // A partition past the last usable sector is refused.
        parts[3].last_lba = total - 1;
        assert!(write_gpt(&mut f, total, &t.disk_guid, &parts).is_err());
    }

    #[test]
    fn root_slot_pads_the_root_partition_and_refuses_a_larger_image() {
        let fx = fixture();
        let out = fx.dir.path().join("slot.img");
        let lay = DiskLayout {
            root_slot_mib: 8,
            ..layout()
        };
        let info = write_disk(&out, &lay, &fx.files, &fx.root, EPOCH).unwrap();
        assert_eq!((info.root.1 - info.root.0 + 1) * SECTOR_SIZE, 8 * MIB);
        assert_eq!(info.size_bytes, (1 + 256 + 8 + 1) * MIB);
        // The image at the slot's start; the rest reads as zeros.
        let disk = std::fs::read(&out).unwrap();
        let root = std::fs::read(&fx.root).unwrap();
        let at = (info.root.0 * SECTOR_SIZE) as usize;
        assert!(disk[at..at + root.len()] == root[..]);
        assert!(disk[at + root.len()..at + (8 * MIB) as usize]
            .iter()
            .all(|&b| b == 0));
        let small = DiskLayout {
            root_slot_mib: 1,
            ..layout()
        };
        let e = write_disk(
            &fx.dir.path().join("small.img"),
            &small,
            &fx.files,
            &fx.root,
            EPOCH,
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("larger than the root slot of 1 MiB"),
            "{e:#}"
        );
    }

    #[test]
    fn seed_partition_holds_a_cidata_volume() {
        let fx = fixture();
        let out = fx.dir.path().join("seeded.img");
        let lay = DiskLayout {
            seed_size_mib: 4,
            ..layout()
        };
        let info = write_disk(&out, &lay, &fx.files, &fx.root, EPOCH).unwrap();
        let (first, last) = info.seed.expect("seed partition");
        assert_eq!(first, info.root.1 + 1);
        assert_eq!((last - first + 1) * SECTOR_SIZE, 4 * MIB);
        assert_eq!(info.size_bytes, (1 + 256 + 3 + 4 + 1) * MIB);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&out)
            .unwrap();
        assert_eq!(
            read_partition(&mut f, 2).unwrap(),
            Some((first, last, SEED_PARTITION_NAME.to_string()))
        );
        assert_eq!(read_partition(&mut f, 3).unwrap(), None);
        // The empty slot reads as zeros.
        assert!(read_lba(&mut f, first, 8).iter().all(|b| *b == 0));
        let files = [
            EspFile {
                path: "meta-data".into(),
                source: EspSource::Bytes(b"instance-id: x\n".to_vec()),
            },
            EspFile {
                path: "user-data".into(),
                source: EspSource::Bytes(b"#cloud-config\n".to_vec()),
            },
        ];
        let off = first * SECTOR_SIZE;
        let len = 4 * MIB;
        write_fat_volume(&mut f, off, len, "CIDATA", 7, &files, EPOCH).unwrap();
        {
            let fs =
                FileSystem::new(PartitionSlice::new(&mut f, off, len), FsOptions::new()).unwrap();
            assert_eq!(fs.volume_label().trim_end(), "CIDATA");
            let mut s = String::new();
            fs.root_dir()
                .open_file("user-data")
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            assert_eq!(s, "#cloud-config\n");
        }
        // The partition table is untouched and nothing outside the slot changed.
        let again = fx.dir.path().join("again.img");
        write_disk(&again, &lay, &fx.files, &fx.root, EPOCH).unwrap();
        let a = std::fs::read(&out).unwrap();
        let b = std::fs::read(&again).unwrap();
        let (lo, hi) = (off as usize, (off + len) as usize);
        assert_eq!(a[..lo], b[..lo]);
        assert_eq!(a[hi..], b[hi..]);
        if Command::new("blkid").arg("--version").output().is_ok() {
            let vol = fx.dir.path().join("cidata.img");
            std::fs::write(&vol, &a[lo..hi]).unwrap();
            let o = Command::new("blkid")
                .args(["-p", "-o", "export"])
                .arg(&vol)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(text.contains("LABEL=CIDATA"), "blkid: {text}");
            assert!(text.contains("TYPE=vfat"), "blkid: {text}");
        } else {
            println!("SKIP: blkid not installed");
        }
    }

    #[test]
    fn external_tools_accept_image() {
        let fx = fixture();
        let (img, info) = build(&fx, "disk.img");
        // A tool is "installed" if it can be spawned at all.
        let have = |tool: &str| Command::new(tool).arg("--version").output().is_ok();
        let mut checked = false;

        if have("sfdisk") {
            let o = Command::new("sfdisk")
                .arg("--json")
                .arg(&img)
                .output()
                .unwrap();
            assert!(o.status.success(), "sfdisk failed: {o:?}");
            let json = String::from_utf8(o.stdout).unwrap();
            let compact: String = json.chars().filter(|c| !c.is_whitespace()).collect();
            assert!(compact.contains("\"label\":\"gpt\""), "{json}");
            assert_eq!(compact.matches("\"node\":").count(), 2, "{json}");
            assert!(
                compact.contains(&format!("\"start\":{},", info.esp.0)),
                "{json}"
            );
            assert!(
                compact.contains(&format!("\"start\":{},", info.root.0)),
                "{json}"
            );
            let disk_id = guid_to_string(&layout().disk_guid).to_uppercase();
            assert!(compact.contains(&format!("\"id\":\"{disk_id}\"")), "{json}");
            assert!(
                compact.contains("\"type\":\"C12A7328-F81F-11D2-BA4B-00A0C93EC93B\""),
                "{json}"
            );
            assert!(
                compact.contains("\"type\":\"4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709\""),
                "{json}"
            );
            assert!(
                o.stderr.is_empty(),
                "sfdisk warnings: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            checked = true;
        }

        if have("sgdisk") {
            let o = Command::new("sgdisk").arg("-v").arg(&img).output().unwrap();
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success(), "sgdisk -v failed: {text}");
            assert!(text.contains("No problems found"), "sgdisk -v: {text}");
            checked = true;
        }

        if have("mdir") {
            let target = format!("{}@@{}", img.display(), info.esp.0 * SECTOR_SIZE);
            let o = Command::new("mdir")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-i", &target, "::/EFI/Linux"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(o.status.success(), "mdir failed: {o:?}");
            assert!(text.contains("kiln-1.0.efi"), "mdir: {text}");
        }

        if have("fsck.fat") {
            // fsck.fat has no offset option: check an extracted copy of the ESP.
            let mut f = File::open(&img).unwrap();
            let (first, last) = info.esp;
            let esp = read_lba(&mut f, first, last - first + 1);
            let esp_path = fx.dir.path().join("esp.img");
            std::fs::write(&esp_path, esp).unwrap();
            let o = Command::new("fsck.fat")
                .arg("-n")
                .arg(&esp_path)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "fsck.fat: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }

        if !checked {
            println!("SKIP: sfdisk not installed");
        }
    }

    #[test]
    fn guid_text_form() {
        assert_eq!(
            guid_to_string(&ESP_TYPE_GUID),
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
        );
        assert_eq!(
            guid_to_string(&LINUX_ROOT_X86_64_TYPE_GUID),
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"
        );
        let g = guid_from_seed(b"seed", "disk");
        let text = guid_to_string(&g);
        assert_eq!(text.as_bytes()[14], b'4', "version nibble in {text}");
        assert!(
            matches!(text.as_bytes()[19], b'8' | b'9' | b'a' | b'b'),
            "{text}"
        );
        assert_eq!(g, guid_from_seed(b"seed", "disk"));
        assert_ne!(g, guid_from_seed(b"seed", "esp"));
    }

    #[test]
    fn fat_time_is_clamped() {
        let min = fat_date_time(0);
        assert_eq!((min.date.year, min.date.month, min.date.day), (1980, 1, 1));
        assert_eq!((min.time.hour, min.time.min, min.time.sec), (0, 0, 0));
        let max = fat_date_time(i64::MAX / 2);
        assert_eq!(
            (max.date.year, max.date.month, max.date.day),
            (2107, 12, 31)
        );
        assert_eq!((max.time.hour, max.time.min, max.time.sec), (23, 59, 58));
        let t = fat_date_time(951_782_400 + 3661); // 2000-02-29 01:01:01
        assert_eq!((t.date.year, t.date.month, t.date.day), (2000, 2, 29));
        assert_eq!((t.time.hour, t.time.min, t.time.sec), (1, 1, 1));
        assert!(std::ptr::eq(time_provider(EPOCH), time_provider(EPOCH)));
    }

    #[test]
    fn rejects_bad_inputs() {
        let fx = fixture();
        let out = fx.dir.path().join("bad.img");
        let mut l = layout();
        l.esp_label = "WAY-TOO-LONG-LABEL".into();
        assert!(write_disk(&out, &l, &fx.files, &fx.root, EPOCH).is_err());
        let bad = [EspFile {
            path: "/EFI/../x".into(),
            source: EspSource::Bytes(vec![]),
        }];
        assert!(write_disk(&out, &layout(), &bad, &fx.root, EPOCH).is_err());
        let dup = [fx.files[0].clone(), fx.files[0].clone()];
        assert!(write_disk(&out, &layout(), &dup, &fx.root, EPOCH).is_err());
    }

    #[test]
    fn cluster_size_choice() {
        assert_eq!(fat32_cluster_size(64 * MIB), Some(512));
        assert_eq!(fat32_cluster_size(512 * MIB), Some(4096));
        assert_eq!(fat32_cluster_size(16 * MIB), None);
    }
}
