//! Deterministic, root-free ISO 9660 image writer for cloud-init NoCloud seeds.
//!
//! cloud-init finds a NoCloud seed on a volume labelled `cidata` and reads `meta-data`,
//! `user-data`, `network-config` and `vendor-data` from its root directory by those exact
//! lower-case names. [`write_iso`] lays such an image out entirely in user space: no
//! `genisoimage`, no loop devices, no mounting. Its one flat root directory of regular files
//! is visible three ways, as with `genisoimage -V cidata -J -r`:
//!
//! * plain ISO 9660 level 1: unique upper-case 8.3 identifiers such as `USER_DAT.;1`;
//! * Rock Ridge (RRIP 1.09, `RRIP_1991A`): the exact names (`NM`), mode 0444 files in a 0555
//!   root owned by uid/gid 0 (`PX`) and timestamps (`TF`). The root's `.` record starts with
//!   `SP` and continues (`CE`) to the `ER` entry in a sector of its own;
//! * Joliet (UCS-2 level 3 supplementary volume descriptor): the exact names in UCS-2 BE.
//!
//! Sector map (2048-byte sectors):
//!
//! | sector | contents                                                                |
//! |--------|-------------------------------------------------------------------------|
//! | 0–15   | system area (zeros)                                                     |
//! | 16     | primary volume descriptor                                               |
//! | 17     | Joliet supplementary volume descriptor                                  |
//! | 18     | volume descriptor set terminator                                        |
//! | 19, 20 | primary L and M path tables                                             |
//! | 21, 22 | Joliet L and M path tables                                              |
//! | 23     | Rock Ridge continuation area (`ER`)                                     |
//! | 24…    | primary root directory, then the Joliet root directory                  |
//! | …      | file data in name order, each from a sector boundary (empty files: LBA 0) |
//!
//! Every byte is a pure function of the inputs: every date comes from the caller's epoch,
//! the expiration date is unset, there are no host names or random ids, and input order does
//! not matter.

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

use super::disk::civil_from_days;

/// Logical block (sector) size of the image.
pub const SECTOR_SIZE: usize = 2048;

/// Longest file name, in characters (the Joliet limit of 64 UCS-2 characters).
pub const MAX_NAME_LEN: usize = 64;

/// Longest volume id (the ISO 9660 volume identifier field).
pub const MAX_VOLUME_ID_LEN: usize = 32;

/// Most files in one image.
pub const MAX_FILES: usize = 1024;

/// Most bytes of file data in one image (the image is meant for small seeds).
pub const MAX_DATA_BYTES: u64 = 64 * 1024 * 1024;

const PVD_SECTOR: u32 = 16;
const JOLIET_SVD_SECTOR: u32 = 17;
const TERMINATOR_SECTOR: u32 = 18;
const PVD_L_PATH_TABLE_SECTOR: u32 = 19;
const PVD_M_PATH_TABLE_SECTOR: u32 = 20;
const JOLIET_L_PATH_TABLE_SECTOR: u32 = 21;
const JOLIET_M_PATH_TABLE_SECTOR: u32 = 22;
const CONTINUATION_SECTOR: u32 = 23;
const ISO_ROOT_SECTOR: u32 = 24;

/// A path table holding only the root: one 8-byte record plus its 1-byte identifier, padded.
const PATH_TABLE_LEN: u32 = 10;

/// Characters Joliet cannot store in a name (plus `/`, the directory separator).
const JOLIET_FORBIDDEN: [char; 5] = ['\\', '*', ':', ';', '?'];

/// Directory record file flag: this record is a directory.
const FLAG_DIRECTORY: u8 = 0x02;

/// POSIX modes in Rock Ridge `PX`: read-only regular files in a read-only directory.
const FILE_MODE: u32 = 0o100_444;
const DIR_MODE: u32 = 0o040_555;

/// Rock Ridge `RR` flags (RRIP 1.09): which RRIP entries a record carries.
const RR_PX: u8 = 0x01;
const RR_NM: u8 = 0x08;
const RR_TF: u8 = 0x80;

/// `TF` flags: modification, access and attribute-change times, short (7-byte) form.
const TF_MODIFY_ACCESS_ATTRIBUTES: u8 = 0x0E;

/// The `ER` entry of RRIP 1.09, as `genisoimage -r` and `xorriso` record it.
const RRIP_ID: &[u8] = b"RRIP_1991A";
const RRIP_DESCRIPTOR: &[u8] =
    b"THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
const RRIP_SOURCE: &[u8] = b"PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  \
SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.";

/// A regular file in the image's root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoFile {
    /// Exact name as Rock Ridge and Joliet readers see it, e.g. `"user-data"`: 1 to 64
    /// printable ASCII characters without `/ \ * : ; ?`, not `.` or `..`.
    pub name: String,
    /// Contents.
    pub data: Vec<u8>,
}

/// Writes the ISO to `out` (created or truncated, atomically is not required). Every byte is a pure
/// function of the inputs: all timestamps (volume creation/modification/effective dates, directory
/// record dates, Rock Ridge TF) come from `epoch` (UTC seconds), expiration date unset, no host
/// names or random ids; files appear in name order regardless of input order.
///
/// `volume_id` (at most 32 of `A-Z a-z 0-9 _`) is recorded verbatim, lower case included, as
/// `genisoimage -V` does: cloud-init and `blkid` look for `cidata`. The Joliet copy of it is cut
/// to 16 characters. `epoch` must lie in the years 1900..=2155 that directory records can hold.
/// The file is fsynced before returning.
pub fn write_iso(out: &Path, volume_id: &str, files: &[IsoFile], epoch: i64) -> Result<()> {
    let image = Image::plan(volume_id, files, epoch)?;
    let file = File::create(out).with_context(|| format!("create ISO image {}", out.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    image
        .write_to(&mut w)
        .with_context(|| format!("write ISO image {}", out.display()))?;
    let file = w
        .into_inner()
        .map_err(io::IntoInnerError::into_error)
        .with_context(|| format!("write ISO image {}", out.display()))?;
    file.sync_all()
        .with_context(|| format!("fsync ISO image {}", out.display()))
}

/// A planned image: every metadata sector, then the file data.
struct Image<'a> {
    /// Sectors 0 up to (not including) the first file data sector.
    head: Vec<u8>,
    /// Files in name order; each one's data follows the previous one's, sector aligned.
    files: Vec<&'a IsoFile>,
}

impl<'a> Image<'a> {
    fn plan(volume_id: &str, files: &'a [IsoFile], epoch: i64) -> Result<Self> {
        check_volume_id(volume_id)?;
        let files = sorted_files(files)?;
        let time = Timestamp::from_epoch(epoch)?;

        let iso_ids = level1_identifiers(files.iter().map(|f| f.name.as_str()));
        let mut entries: Vec<Entry> = files
            .iter()
            .zip(iso_ids)
            .map(|(&file, iso_id)| Entry {
                file,
                iso_id,
                joliet_id: file.name.encode_utf16().collect(),
                extent: 0,
            })
            .collect();

        // Record lengths do not depend on locations, so a pass with placeholder locations gives
        // the directory sizes, and with them every location.
        let placeholder = Extent::default();
        let iso_dir_len = pack_directory(&iso_records(placeholder, &entries, &time)?).len();
        let joliet_dir_len = pack_directory(&joliet_records(placeholder, &entries, &time)?).len();
        let iso_root = Extent {
            sector: ISO_ROOT_SECTOR,
            len: sector_len(iso_dir_len)?,
        };
        let joliet_root = Extent {
            sector: iso_root.end(),
            len: sector_len(joliet_dir_len)?,
        };
        let first_data_sector = joliet_root.end();
        let mut next = first_data_sector;
        for e in &mut entries {
            // Empty files own no sector and point at LBA 0, which no reader ever reads.
            if !e.file.data.is_empty() {
                e.extent = next;
                next += sectors(e.file.data.len());
            }
        }
        let total_sectors = next;

        let iso_dir = pack_directory(&iso_records(iso_root, &entries, &time)?);
        let joliet_dir = pack_directory(&joliet_records(joliet_root, &entries, &time)?);
        ensure!(
            iso_dir.len() == iso_dir_len && joliet_dir.len() == joliet_dir_len,
            "internal error: ISO directory sizes changed between passes"
        );

        let mut head = vec![0u8; first_data_sector as usize * SECTOR_SIZE];
        let mut put = |sector: u32, bytes: &[u8]| {
            let at = sector as usize * SECTOR_SIZE;
            head[at..at + bytes.len()].copy_from_slice(bytes);
        };
        let descriptor = |joliet, root, l_path, m_path| VolumeDescriptor {
            joliet,
            volume_id,
            total_sectors,
            root,
            l_path_table: l_path,
            m_path_table: m_path,
            time: &time,
        };
        put(
            PVD_SECTOR,
            &descriptor(
                false,
                iso_root,
                PVD_L_PATH_TABLE_SECTOR,
                PVD_M_PATH_TABLE_SECTOR,
            )
            .encode()?,
        );
        put(
            JOLIET_SVD_SECTOR,
            &descriptor(
                true,
                joliet_root,
                JOLIET_L_PATH_TABLE_SECTOR,
                JOLIET_M_PATH_TABLE_SECTOR,
            )
            .encode()?,
        );
        put(TERMINATOR_SECTOR, &terminator());
        put(PVD_L_PATH_TABLE_SECTOR, &path_table(iso_root, false));
        put(PVD_M_PATH_TABLE_SECTOR, &path_table(iso_root, true));
        put(JOLIET_L_PATH_TABLE_SECTOR, &path_table(joliet_root, false));
        put(JOLIET_M_PATH_TABLE_SECTOR, &path_table(joliet_root, true));
        put(CONTINUATION_SECTOR, &susp_er());
        put(iso_root.sector, &iso_dir);
        put(joliet_root.sector, &joliet_dir);

        Ok(Image { head, files })
    }

    fn write_to(&self, w: &mut impl Write) -> io::Result<()> {
        const ZEROS: [u8; SECTOR_SIZE] = [0; SECTOR_SIZE];
        w.write_all(&self.head)?;
        for f in &self.files {
            w.write_all(&f.data)?;
            let tail = f.data.len() % SECTOR_SIZE;
            if tail != 0 {
                w.write_all(&ZEROS[tail..])?;
            }
        }
        w.flush()
    }
}

/// One file as it appears in both directory trees.
struct Entry<'a> {
    file: &'a IsoFile,
    /// Level-1 identifier without the `;1` version, e.g. `USER_DAT.`.
    iso_id: Vec<u8>,
    /// Joliet identifier (the exact name) in UCS-2.
    joliet_id: Vec<u16>,
    /// First sector of the data (0 for empty files).
    extent: u32,
}

/// Location and byte length of an extent.
#[derive(Debug, Clone, Copy, Default)]
struct Extent {
    sector: u32,
    len: u32,
}

impl Extent {
    /// First sector after this (sector-sized) extent.
    fn end(self) -> u32 {
        self.sector + sectors(self.len as usize)
    }
}

/// Sectors needed for `len` bytes.
fn sectors(len: usize) -> u32 {
    // Callers bound len by MAX_DATA_BYTES or directory sizes, far below u32::MAX sectors.
    len.div_ceil(SECTOR_SIZE) as u32
}

fn sector_len(len: usize) -> Result<u32> {
    u32::try_from(len).context("ISO directory too large")
}

// ---------------------------------------------------------------------------
// Input validation
// ---------------------------------------------------------------------------

fn check_volume_id(id: &str) -> Result<()> {
    ensure!(
        !id.is_empty(),
        "ISO volume id is empty; cloud-init NoCloud seeds use \"cidata\""
    );
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        bail!(
            "ISO volume id {id:?} contains {c:?}; use A-Z, a-z, 0-9 and _ \
             (cloud-init NoCloud seeds use \"cidata\")"
        );
    }
    ensure!(
        id.len() <= MAX_VOLUME_ID_LEN,
        "ISO volume id {id:?} is {} characters long; at most {MAX_VOLUME_ID_LEN} fit",
        id.len()
    );
    Ok(())
}

fn check_file_name(name: &str) -> Result<()> {
    ensure!(!name.is_empty(), "ISO file name is empty");
    ensure!(
        !name.contains('/'),
        "ISO file name {name:?} contains '/'; the image holds one flat root directory, \
         so give a plain file name"
    );
    if let Some(c) = name
        .chars()
        .find(|c| !(' '..='~').contains(c) || JOLIET_FORBIDDEN.contains(c))
    {
        bail!(
            "ISO file name {name:?} contains {c:?}; use printable ASCII without \
             / \\ * : ; ? (Joliet cannot store those)"
        );
    }
    ensure!(
        name.len() <= MAX_NAME_LEN,
        "ISO file name {name:?} is {} characters long; at most {MAX_NAME_LEN} fit (Joliet limit)",
        name.len()
    );
    ensure!(
        name != "." && name != "..",
        "ISO file name {name:?} is reserved for directory entries"
    );
    Ok(())
}

/// Checks every file and returns them sorted by name.
fn sorted_files(files: &[IsoFile]) -> Result<Vec<&IsoFile>> {
    ensure!(
        files.len() <= MAX_FILES,
        "{} files for one ISO image; at most {MAX_FILES} are supported",
        files.len()
    );
    let mut total: u64 = 0;
    for f in files {
        check_file_name(&f.name)?;
        total += f.data.len() as u64;
    }
    ensure!(
        total <= MAX_DATA_BYTES,
        "ISO image files hold {total} bytes; at most {MAX_DATA_BYTES} (64 MiB) are supported"
    );
    let mut sorted: Vec<&IsoFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = sorted.windows(2).find(|w| w[0].name == w[1].name) {
        bail!(
            "ISO file name {:?} is given twice; names must be unique",
            w[0].name
        );
    }
    Ok(sorted)
}

// ---------------------------------------------------------------------------
// Names and ordering
// ---------------------------------------------------------------------------

/// Unique ISO 9660 level-1 identifiers (without `;1`) for names taken in order: the part before
/// the last `.` cut to 8 and the part after it to 3 d-characters (upper case, anything else
/// `_`). A clash replaces the end of the 8-character part with a counter: `USER_DA1.`.
fn level1_identifiers<'n>(names: impl IntoIterator<Item = &'n str>) -> Vec<Vec<u8>> {
    let d_characters = |s: &str, max: usize| -> Vec<u8> {
        s.bytes()
            .take(max)
            .map(|b| {
                if b.is_ascii_alphanumeric() {
                    b.to_ascii_uppercase()
                } else {
                    b'_'
                }
            })
            .collect()
    };
    let mut used = BTreeSet::new();
    names
        .into_iter()
        .map(|name| {
            let (base, ext) = name.rsplit_once('.').unwrap_or((name, ""));
            let (base, ext) = (d_characters(base, 8), d_characters(ext, 3));
            let mut id = [&base[..], b".", &ext].concat();
            let mut n = 0u32;
            while used.contains(&id) {
                n += 1;
                let suffix = n.to_string();
                let keep = base.len().min(8usize.saturating_sub(suffix.len()));
                id = [&base[..keep], suffix.as_bytes(), b".", &ext].concat();
            }
            used.insert(id.clone());
            id
        })
        .collect()
}

/// ECMA-119 9.3 order of file identifiers (all of version 1): by the part before the last
/// `.`, then by the part after it, each compared position by position with the shorter one
/// padded with spaces. Identifiers equal under padding fall back to plain order.
fn cmp_identifiers<T: Ord + Copy>(a: &[T], b: &[T], dot: T, space: T) -> Ordering {
    fn split<T: Copy + PartialEq>(id: &[T], dot: T) -> (&[T], &[T]) {
        match id.iter().rposition(|&c| c == dot) {
            Some(i) => (&id[..i], &id[i + 1..]),
            None => (id, &[]),
        }
    }
    fn padded<T: Ord + Copy>(a: &[T], b: &[T], space: T) -> Ordering {
        (0..a.len().max(b.len()))
            .map(|i| {
                let x = a.get(i).copied().unwrap_or(space);
                let y = b.get(i).copied().unwrap_or(space);
                x.cmp(&y)
            })
            .find(|o| o.is_ne())
            .unwrap_or(Ordering::Equal)
    }
    let (a_name, a_ext) = split(a, dot);
    let (b_name, b_ext) = split(b, dot);
    padded(a_name, b_name, space)
        .then_with(|| padded(a_ext, b_ext, space))
        .then_with(|| a.cmp(b))
}

// ---------------------------------------------------------------------------
// Directories
// ---------------------------------------------------------------------------

/// The primary root directory: `.` (with `SP` … `CE`), `..`, then the files in identifier order,
/// each with Rock Ridge `RR`, `NM`, `PX` and `TF`.
fn iso_records(root: Extent, entries: &[Entry], time: &Timestamp) -> Result<Vec<Vec<u8>>> {
    let date = time.directory_date();
    let tf = susp_tf(&date);
    let dir_px = susp_px(DIR_MODE, 2);
    let er_len = susp_er().len() as u32;
    let dot = [
        susp_sp(),
        susp_rr(RR_PX | RR_TF),
        dir_px.clone(),
        tf.clone(),
        susp_ce(CONTINUATION_SECTOR, 0, er_len),
    ]
    .concat();
    let dotdot = [susp_rr(RR_PX | RR_TF), dir_px, tf.clone()].concat();
    let mut records = vec![
        directory_record(&[0], root, FLAG_DIRECTORY, &date, &dot)?,
        directory_record(&[1], root, FLAG_DIRECTORY, &date, &dotdot)?,
    ];
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| cmp_identifiers(&a.iso_id, &b.iso_id, b'.', b' '));
    for e in sorted {
        let susp = [
            susp_rr(RR_PX | RR_NM | RR_TF),
            susp_nm(e.file.name.as_bytes()),
            susp_px(FILE_MODE, 1),
            tf.clone(),
        ]
        .concat();
        let id = [&e.iso_id[..], b";1"].concat();
        records.push(directory_record(&id, e.data_extent(), 0, &date, &susp)?);
    }
    Ok(records)
}

/// The Joliet root directory: `.`, `..`, then the files in UCS-2 identifier order.
fn joliet_records(root: Extent, entries: &[Entry], time: &Timestamp) -> Result<Vec<Vec<u8>>> {
    let date = time.directory_date();
    let mut records = vec![
        directory_record(&[0], root, FLAG_DIRECTORY, &date, &[])?,
        directory_record(&[1], root, FLAG_DIRECTORY, &date, &[])?,
    ];
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| cmp_identifiers(&a.joliet_id, &b.joliet_id, 0x2E, 0x20));
    for e in sorted {
        let id: Vec<u8> = e.joliet_id.iter().flat_map(|u| u.to_be_bytes()).collect();
        records.push(directory_record(&id, e.data_extent(), 0, &date, &[])?);
    }
    Ok(records)
}

impl Entry<'_> {
    fn data_extent(&self) -> Extent {
        Extent {
            sector: self.extent,
            // Bounded by MAX_DATA_BYTES.
            len: self.file.data.len() as u32,
        }
    }
}

/// One directory record (ECMA-119 9.1) with system use field `susp`.
fn directory_record(
    id: &[u8],
    extent: Extent,
    flags: u8,
    date: &[u8; 7],
    susp: &[u8],
) -> Result<Vec<u8>> {
    let mut r = Vec::with_capacity(256);
    r.push(0); // length of directory record, set below
    r.push(0); // extended attribute record length
    r.extend(both32(extent.sector));
    r.extend(both32(extent.len));
    r.extend(date);
    r.push(flags);
    r.push(0); // file unit size
    r.push(0); // interleave gap size
    r.extend(both16(1)); // volume sequence number
    r.push(id.len() as u8);
    r.extend(id);
    if r.len() % 2 == 1 {
        r.push(0); // padding field after an even-length identifier
    }
    r.extend(susp);
    if r.len() % 2 == 1 {
        r.push(0); // records have even length
    }
    ensure!(
        r.len() <= 255,
        "internal error: ISO directory record of {} bytes",
        r.len()
    );
    r[0] = r.len() as u8;
    Ok(r)
}

/// Directory extent: records in order, none crossing a sector boundary, zero padded to whole
/// sectors.
fn pack_directory(records: &[Vec<u8>]) -> Vec<u8> {
    let mut d = Vec::new();
    for r in records {
        let used = d.len() % SECTOR_SIZE;
        if used + r.len() > SECTOR_SIZE {
            d.resize(d.len() + SECTOR_SIZE - used, 0);
        }
        d.extend(r);
    }
    d.resize(d.len().div_ceil(SECTOR_SIZE) * SECTOR_SIZE, 0);
    d
}

/// A path table holding only the root (directory number 1, its own parent).
fn path_table(root: Extent, big_endian: bool) -> [u8; PATH_TABLE_LEN as usize] {
    let (location, parent) = if big_endian {
        (root.sector.to_be_bytes(), 1u16.to_be_bytes())
    } else {
        (root.sector.to_le_bytes(), 1u16.to_le_bytes())
    };
    let mut t = [0u8; PATH_TABLE_LEN as usize];
    t[0] = 1; // length of directory identifier
    t[2..6].copy_from_slice(&location);
    t[6..8].copy_from_slice(&parent);
    // t[8] = 0x00 (root identifier), t[9] = padding
    t
}

// ---------------------------------------------------------------------------
// System Use Sharing Protocol / Rock Ridge entries
// ---------------------------------------------------------------------------

fn susp_entry(signature: &[u8; 2], body: &[u8]) -> Vec<u8> {
    let mut e = vec![signature[0], signature[1], (4 + body.len()) as u8, 1];
    e.extend(body);
    e
}

/// `SP`: SUSP in use, no bytes skipped.
fn susp_sp() -> Vec<u8> {
    susp_entry(b"SP", &[0xBE, 0xEF, 0])
}

/// `RR` (RRIP 1.09): which Rock Ridge entries follow.
fn susp_rr(flags: u8) -> Vec<u8> {
    susp_entry(b"RR", &[flags])
}

/// `NM`: the whole name, no continuation.
fn susp_nm(name: &[u8]) -> Vec<u8> {
    susp_entry(b"NM", &[&[0u8][..], name].concat())
}

/// `PX` (RRIP 1.09 form, no inode number): mode, links, uid 0, gid 0.
fn susp_px(mode: u32, links: u32) -> Vec<u8> {
    susp_entry(
        b"PX",
        &[both32(mode), both32(links), both32(0), both32(0)].concat(),
    )
}

/// `TF`: modification, access and attribute-change times.
fn susp_tf(date: &[u8; 7]) -> Vec<u8> {
    susp_entry(
        b"TF",
        &[&[TF_MODIFY_ACCESS_ATTRIBUTES][..], date, date, date].concat(),
    )
}

/// `CE`: the System Use field continues at `offset` in `sector` for `len` bytes.
fn susp_ce(sector: u32, offset: u32, len: u32) -> Vec<u8> {
    susp_entry(
        b"CE",
        &[both32(sector), both32(offset), both32(len)].concat(),
    )
}

/// `ER`: the Rock Ridge extension (RRIP 1.09) is in use.
fn susp_er() -> Vec<u8> {
    let lens = [
        RRIP_ID.len() as u8,
        RRIP_DESCRIPTOR.len() as u8,
        RRIP_SOURCE.len() as u8,
        1, // extension version
    ];
    susp_entry(
        b"ER",
        &[&lens[..], RRIP_ID, RRIP_DESCRIPTOR, RRIP_SOURCE].concat(),
    )
}

// ---------------------------------------------------------------------------
// Volume descriptors
// ---------------------------------------------------------------------------

/// The primary (`joliet == false`) or Joliet supplementary volume descriptor.
struct VolumeDescriptor<'a> {
    joliet: bool,
    volume_id: &'a str,
    total_sectors: u32,
    root: Extent,
    l_path_table: u32,
    m_path_table: u32,
    time: &'a Timestamp,
}

impl VolumeDescriptor<'_> {
    fn encode(&self) -> Result<Vec<u8>> {
        let mut d = vec![0u8; SECTOR_SIZE];
        d[0] = if self.joliet { 2 } else { 1 };
        d[1..6].copy_from_slice(b"CD001");
        d[6] = 1; // version
        let text = |field: &mut [u8], s: &str| {
            if self.joliet {
                fill_ucs2(field, s);
            } else {
                fill_ascii(field, s);
            }
        };
        text(&mut d[8..40], ""); // system identifier
        text(&mut d[40..72], self.volume_id);
        d[80..88].copy_from_slice(&both32(self.total_sectors));
        if self.joliet {
            d[88..91].copy_from_slice(b"%/E"); // UCS-2 level 3
        }
        d[120..124].copy_from_slice(&both16(1)); // volume set size
        d[124..128].copy_from_slice(&both16(1)); // volume sequence number
        d[128..132].copy_from_slice(&both16(SECTOR_SIZE as u16));
        d[132..140].copy_from_slice(&both32(PATH_TABLE_LEN));
        d[140..144].copy_from_slice(&self.l_path_table.to_le_bytes());
        d[148..152].copy_from_slice(&self.m_path_table.to_be_bytes());
        let root = self.time.directory_date();
        let root = directory_record(&[0], self.root, FLAG_DIRECTORY, &root, &[])?;
        d[156..190].copy_from_slice(&root);
        // Volume set, publisher, data preparer, application; copyright, abstract and
        // bibliographic file identifiers: all blank.
        for (start, end) in [
            (190, 318),
            (318, 446),
            (446, 574),
            (574, 702),
            (702, 739),
            (739, 776),
            (776, 813),
        ] {
            text(&mut d[start..end], "");
        }
        let date = self.time.volume_date();
        d[813..830].copy_from_slice(&date); // creation
        d[830..847].copy_from_slice(&date); // modification
        d[847..864].copy_from_slice(b"0000000000000000\0"); // expiration: not specified
        d[864..881].copy_from_slice(&date); // effective
        d[881] = 1; // file structure version
        Ok(d)
    }
}

fn terminator() -> Vec<u8> {
    let mut d = vec![0u8; SECTOR_SIZE];
    d[0] = 255;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d
}

/// `s` space padded.
fn fill_ascii(field: &mut [u8], s: &str) {
    field.fill(b' ');
    field[..s.len()].copy_from_slice(s.as_bytes());
}

/// `s` as UCS-2 BE, cut to whole characters, padded with UCS-2 spaces (a trailing odd byte
/// stays 0).
fn fill_ucs2(field: &mut [u8], s: &str) {
    for (i, b) in field.iter_mut().enumerate() {
        *b = if i % 2 == 1 { b' ' } else { 0 };
    }
    let units = s.encode_utf16().take(field.len() / 2);
    for (pair, u) in field.chunks_exact_mut(2).zip(units) {
        pair.copy_from_slice(&u.to_be_bytes());
    }
}

/// ISO 9660 both-byte orders (7.2.3): little endian, then big endian.
fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

/// ISO 9660 both-byte orders (7.3.3): little endian, then big endian.
fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

// ---------------------------------------------------------------------------
// Dates
// ---------------------------------------------------------------------------

/// A UTC date and time, within the range of directory record dates (1900..=2155).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Timestamp {
    year: u16,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl Timestamp {
    fn from_epoch(epoch: i64) -> Result<Self> {
        let (year, month, day) = civil_from_days(epoch.div_euclid(86_400));
        let secs = epoch.rem_euclid(86_400);
        ensure!(
            (1900..=2155).contains(&year),
            "timestamp {epoch} (year {year}) is outside 1900..=2155, the dates an ISO 9660 \
             directory record can hold; check SOURCE_DATE_EPOCH"
        );
        // Range-checked above; month, day and time of day are in range by construction.
        Ok(Timestamp {
            year: year as u16,
            month: month as u8,
            day: day as u8,
            hour: (secs / 3600) as u8,
            minute: (secs / 60 % 60) as u8,
            second: (secs % 60) as u8,
        })
    }

    /// ECMA-119 9.1.5: years since 1900, month, day, hour, minute, second, UTC offset 0.
    fn directory_date(&self) -> [u8; 7] {
        [
            (self.year - 1900) as u8,
            self.month,
            self.day,
            self.hour,
            self.minute,
            self.second,
            0,
        ]
    }

    /// ECMA-119 8.4.26.1: `YYYYMMDDHHMMSScc` in ASCII digits, then UTC offset 0.
    fn volume_date(&self) -> [u8; 17] {
        let text = format!(
            "{:04}{:02}{:02}{:02}{:02}{:02}00",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        );
        let mut d = [0u8; 17];
        d[..16].copy_from_slice(text.as_bytes());
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EPOCH: i64 = 1_700_000_000; // 2023-11-14 22:13:20 UTC

    fn file(name: &str, data: &[u8]) -> IsoFile {
        IsoFile {
            name: name.into(),
            data: data.to_vec(),
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| {
                (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .rotate_left(seed.into()) as u8
            })
            .collect()
    }

    fn seed_files() -> Vec<IsoFile> {
        vec![
            file("user-data", b"#cloud-config\nhostname: node-1\n"),
            file(
                "meta-data",
                b"instance-id: node-1\nlocal-hostname: node-1\n",
            ),
            file("network-config", &pattern(5000, 3)),
            file("vendor-data", b""),
        ]
    }

    fn image(volume_id: &str, files: &[IsoFile], epoch: i64) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("seed.iso");
        write_iso(&out, volume_id, files, epoch).unwrap();
        std::fs::read(out).unwrap()
    }

    fn sector(img: &[u8], n: u32) -> &[u8] {
        &img[n as usize * SECTOR_SIZE..(n as usize + 1) * SECTOR_SIZE]
    }

    fn le32(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    /// Checks a both-endian 32-bit field and returns its value.
    fn both32_at(b: &[u8], off: usize) -> u32 {
        let le = le32(b, off);
        assert_eq!(
            le,
            u32::from_be_bytes(b[off + 4..off + 8].try_into().unwrap()),
            "both-endian field at {off}"
        );
        le
    }

    /// A parsed directory record.
    #[derive(Debug)]
    struct Record {
        id: Vec<u8>,
        extent: u32,
        len: u32,
        flags: u8,
        date: [u8; 7],
        susp: Vec<u8>,
    }

    fn parse_record(r: &[u8]) -> Record {
        assert_eq!(r[0] as usize, r.len());
        assert_eq!(r.len() % 2, 0, "odd record length");
        let id_len = r[32] as usize;
        let susp_start = 33 + id_len + (1 - id_len % 2);
        assert_eq!(&r[28..32], &both16(1));
        Record {
            id: r[33..33 + id_len].to_vec(),
            extent: both32_at(r, 2),
            len: both32_at(r, 10),
            flags: r[25],
            date: r[18..25].try_into().unwrap(),
            susp: r[susp_start..].to_vec(),
        }
    }

    /// Reads a directory extent record by record, asserting no record crosses a sector.
    fn read_dir(img: &[u8], extent: u32, len: u32) -> Vec<Record> {
        assert_eq!(
            len as usize % SECTOR_SIZE,
            0,
            "directory size not whole sectors"
        );
        let d = &img[extent as usize * SECTOR_SIZE..][..len as usize];
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < d.len() {
            let n = d[pos] as usize;
            if n == 0 {
                pos = (pos / SECTOR_SIZE + 1) * SECTOR_SIZE;
                continue;
            }
            assert_eq!(
                pos / SECTOR_SIZE,
                (pos + n - 1) / SECTOR_SIZE,
                "record crosses a sector"
            );
            out.push(parse_record(&d[pos..pos + n]));
            pos += n;
        }
        out
    }

    /// SUSP entries of a system use field: (signature, whole entry).
    fn susp_entries(mut s: &[u8]) -> Vec<([u8; 2], Vec<u8>)> {
        let mut out = Vec::new();
        while s.len() >= 4 {
            let n = s[2] as usize;
            assert!((4..=s.len()).contains(&n), "bad SUSP entry length {n}");
            assert_eq!(s[3], 1, "SUSP entry version");
            out.push(([s[0], s[1]], s[..n].to_vec()));
            s = &s[n..];
        }
        assert!(s.iter().all(|&b| b == 0), "trailing SUSP bytes {s:?}");
        out
    }

    fn entry<'a>(entries: &'a [([u8; 2], Vec<u8>)], sig: &[u8; 2]) -> &'a [u8] {
        &entries
            .iter()
            .find(|(s, _)| s == sig)
            .unwrap_or_else(|| panic!("no {} entry", String::from_utf8_lossy(sig)))
            .1
    }

    #[test]
    fn identical_inputs_give_identical_images() {
        let files = seed_files();
        let a = image("cidata", &files, EPOCH);
        let b = image("cidata", &files, EPOCH);
        assert!(a == b, "images differ");
        let mut reversed = files.clone();
        reversed.reverse();
        assert!(
            a == image("cidata", &reversed, EPOCH),
            "input order matters"
        );
        let rotated: Vec<IsoFile> = files[1..].iter().chain(&files[..1]).cloned().collect();
        assert!(a == image("cidata", &rotated, EPOCH), "input order matters");
        assert!(a != image("cidata", &files, EPOCH + 1), "epoch ignored");
        assert!(a != image("CIDATA", &files, EPOCH), "volume id ignored");
    }

    #[test]
    fn volume_descriptors_and_path_tables() {
        let img = image("cidata", &seed_files(), EPOCH);
        assert_eq!(img.len() % SECTOR_SIZE, 0);
        let total = (img.len() / SECTOR_SIZE) as u32;
        assert!(img[..16 * SECTOR_SIZE].iter().all(|&b| b == 0));
        let mut roots = Vec::new();
        for (n, kind) in [(PVD_SECTOR, 1u8), (JOLIET_SVD_SECTOR, 2)] {
            let d = sector(&img, n);
            assert_eq!(d[0], kind);
            assert_eq!(&d[1..7], b"CD001\x01");
            assert_eq!(both32_at(d, 80), total, "volume space size");
            assert_eq!(&d[120..132], &[1, 0, 0, 1, 1, 0, 0, 1, 0, 8, 8, 0]);
            assert_eq!(both32_at(d, 132), PATH_TABLE_LEN);
            let root = parse_record(&d[156..190]);
            assert_eq!(
                (root.id.as_slice(), root.flags),
                (&[0u8][..], FLAG_DIRECTORY)
            );
            assert_eq!(root.date, [123, 11, 14, 22, 13, 20, 0]);
            assert_eq!(&d[813..830], b"2023111422132000\0");
            assert_eq!(&d[830..847], b"2023111422132000\0");
            assert_eq!(&d[847..864], b"0000000000000000\0");
            assert_eq!(&d[864..881], b"2023111422132000\0");
            assert_eq!(d[881], 1);
            assert!(d[882..].iter().all(|&b| b == 0));
            // Path tables: the root alone, at the root record's extent.
            let l = sector(&img, le32(d, 140));
            let m = sector(&img, u32::from_be_bytes(d[148..152].try_into().unwrap()));
            assert_eq!(le32(d, 144), 0);
            assert_eq!(le32(d, 152), 0);
            let mut want_l = vec![1, 0];
            want_l.extend(root.extent.to_le_bytes());
            want_l.extend([1, 0, 0, 0]);
            let mut want_m = vec![1, 0];
            want_m.extend(root.extent.to_be_bytes());
            want_m.extend([0, 1, 0, 0]);
            assert_eq!(&l[..10], &want_l[..]);
            assert_eq!(&m[..10], &want_m[..]);
            assert!(l[10..].iter().all(|&b| b == 0) && m[10..].iter().all(|&b| b == 0));
            roots.push(root);
        }
        let pvd = sector(&img, PVD_SECTOR);
        assert_eq!(&pvd[8..40], &[b' '; 32]);
        assert_eq!(&pvd[40..72], format!("{:32}", "cidata").as_bytes());
        assert_eq!(&pvd[88..120], &[0; 32]);
        let svd = sector(&img, JOLIET_SVD_SECTOR);
        assert_eq!(&svd[88..91], b"%/E");
        let label: Vec<u8> = "cidata          "
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        assert_eq!(&svd[40..72], &label[..]);
        let term = sector(&img, TERMINATOR_SECTOR);
        assert_eq!(&term[..7], b"\xffCD001\x01");
        assert!(term[7..].iter().all(|&b| b == 0));
        // The two trees are distinct extents.
        assert_ne!(roots[0].extent, roots[1].extent);
    }

    #[test]
    fn primary_tree_has_rock_ridge() {
        let files = seed_files();
        let img = image("cidata", &files, EPOCH);
        let pvd = sector(&img, PVD_SECTOR);
        let root = parse_record(&pvd[156..190]);
        let records = read_dir(&img, root.extent, root.len);
        assert_eq!(records.len(), 2 + files.len());

        // `.`: SP first, then RR/PX/TF and a CE to the ER entry.
        let dot = &records[0];
        assert_eq!(
            (dot.id.as_slice(), dot.extent, dot.len),
            (&[0u8][..], root.extent, root.len)
        );
        assert_eq!(&dot.susp[..7], &[b'S', b'P', 7, 1, 0xBE, 0xEF, 0]);
        let e = susp_entries(&dot.susp);
        let px = entry(&e, b"PX");
        assert_eq!(
            (px.len(), both32_at(px, 4), both32_at(px, 12)),
            (36, 0o040555, 2)
        );
        assert_eq!((both32_at(px, 20), both32_at(px, 28)), (0, 0));
        let ce = entry(&e, b"CE");
        let (ce_sector, ce_off, ce_len) = (both32_at(ce, 4), both32_at(ce, 12), both32_at(ce, 20));
        let area = &sector(&img, ce_sector)[ce_off as usize..][..ce_len as usize];
        let er = susp_entries(area);
        let er = entry(&er, b"ER");
        assert_eq!(&er[4..8], &[10, 84, 135, 1]);
        assert_eq!(&er[8..18], b"RRIP_1991A");
        assert_eq!(er.len(), 8 + 10 + 84 + 135);
        assert_eq!(records[1].id, [1]);
        assert_eq!(records[1].extent, root.extent);

        // Files: sorted identifiers, exact names in NM, mode 0444, dates from the epoch.
        let ids: Vec<&[u8]> = records[2..].iter().map(|r| r.id.as_slice()).collect();
        assert_eq!(
            ids,
            [
                &b"META_DAT.;1"[..],
                b"NETWORK_.;1",
                b"USER_DAT.;1",
                b"VENDOR_D.;1"
            ]
        );
        let mut names = Vec::new();
        for r in &records[2..] {
            assert_eq!(r.flags, 0);
            assert_eq!(r.date, [123, 11, 14, 22, 13, 20, 0]);
            let e = susp_entries(&r.susp);
            assert_eq!(entry(&e, b"RR"), &[b'R', b'R', 5, 1, RR_PX | RR_NM | RR_TF]);
            let name = String::from_utf8(entry(&e, b"NM")[5..].to_vec()).unwrap();
            let px = entry(&e, b"PX");
            assert_eq!((both32_at(px, 4), both32_at(px, 12)), (0o100444, 1));
            let tf = entry(&e, b"TF");
            assert_eq!(tf[4], 0x0E);
            assert_eq!(&tf[5..], [123, 11, 14, 22, 13, 20, 0].repeat(3));
            let want = files.iter().find(|f| f.name == name).unwrap();
            let data = &img[r.extent as usize * SECTOR_SIZE..][..r.len as usize];
            assert!(data == want.data, "{name} data differs");
            if want.data.is_empty() {
                assert_eq!(r.extent, 0);
            }
            names.push(name);
        }
        assert_eq!(
            names,
            ["meta-data", "network-config", "user-data", "vendor-data"]
        );
    }

    #[test]
    fn joliet_tree_has_exact_names_and_shares_data() {
        let files = seed_files();
        let img = image("cidata", &files, EPOCH);
        let primary = parse_record(&sector(&img, PVD_SECTOR)[156..190]);
        let joliet = parse_record(&sector(&img, JOLIET_SVD_SECTOR)[156..190]);
        let p = read_dir(&img, primary.extent, primary.len);
        let j = read_dir(&img, joliet.extent, joliet.len);
        assert_eq!(
            (j[0].id.as_slice(), j[1].id.as_slice()),
            (&[0u8][..], &[1u8][..])
        );
        assert!(j.iter().all(|r| r.susp.is_empty()));
        let names: Vec<String> = j[2..]
            .iter()
            .map(|r| {
                let units: Vec<u16> =
                    r.id.chunks(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect();
                String::from_utf16(&units).unwrap()
            })
            .collect();
        assert_eq!(
            names,
            ["meta-data", "network-config", "user-data", "vendor-data"]
        );
        for (jr, pr) in j[2..].iter().zip(&p[2..]) {
            assert_eq!((jr.extent, jr.len), (pr.extent, pr.len));
        }
        // Data in name order, back to back from the sector after the Joliet directory.
        let first = joliet.extent + joliet.len / SECTOR_SIZE as u32;
        assert_eq!(j[2].extent, first);
        assert_eq!(j[3].extent, first + 1);
        assert_eq!(j[4].extent, first + 1 + 3);
        assert_eq!(img.len(), (first + 1 + 3 + 1) as usize * SECTOR_SIZE);
    }

    #[test]
    fn many_files_span_several_directory_sectors() {
        let files: Vec<IsoFile> = (0..60)
            .map(|i| {
                file(
                    &format!("file-with-a-rather-long-name-{i:03}.conf"),
                    &[i as u8; 3],
                )
            })
            .collect();
        let img = image("cidata", &files, EPOCH);
        for vd in [PVD_SECTOR, JOLIET_SVD_SECTOR] {
            let root = parse_record(&sector(&img, vd)[156..190]);
            assert!(
                root.len as usize > SECTOR_SIZE,
                "expected a multi-sector directory"
            );
            let records = read_dir(&img, root.extent, root.len);
            assert_eq!(records.len(), 62);
            let mut seen: Vec<u8> = records[2..]
                .iter()
                .map(|r| {
                    assert_eq!(r.len, 3);
                    let data = &img[r.extent as usize * SECTOR_SIZE..][..3];
                    assert_eq!(data, [data[0]; 3]);
                    data[0]
                })
                .collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..60).collect::<Vec<u8>>());
            let (dot, dot_dot) = (&records[0], &records[1]);
            assert_eq!((dot.len, dot_dot.len), (root.len, root.len));
        }
        // Level-1 identifiers stay unique.
        let root = parse_record(&sector(&img, PVD_SECTOR)[156..190]);
        let ids: BTreeSet<Vec<u8>> = read_dir(&img, root.extent, root.len)
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids.len(), 62);
    }

    #[test]
    fn level1_identifiers_are_unique_d_characters() {
        let ids = level1_identifiers([
            "meta-data",
            "network-config",
            "user-data",
            "user_data",
            "user.data",
            "USER-DATA",
            "archive.tar.gz",
            ".hidden",
            "trailing.",
        ]);
        let ids: Vec<String> = ids
            .into_iter()
            .map(|i| String::from_utf8(i).unwrap())
            .collect();
        assert_eq!(
            ids,
            [
                "META_DAT.",
                "NETWORK_.",
                "USER_DAT.",
                "USER_DA1.",
                "USER.DAT",
                "USER_DA2.",
                "ARCHIVE_.GZ",
                ".HID",
                "TRAILING."
            ]
        );
        let many = level1_identifiers((0..MAX_FILES).map(|_| "x").collect::<Vec<_>>());
        assert_eq!(many.iter().collect::<BTreeSet<_>>().len(), MAX_FILES);
        assert!(many.iter().all(|i| i.len() <= 12));
    }

    #[test]
    fn identifier_order_follows_ecma_119() {
        let cmp = |a: &str, b: &str| cmp_identifiers(a.as_bytes(), b.as_bytes(), b'.', b' ');
        // Names compare before extensions, the shorter padded with spaces.
        assert_eq!(cmp("A.B", "A_C"), Ordering::Less);
        assert_eq!(cmp("AB.", "A.Z"), Ordering::Greater);
        assert_eq!(cmp("A.", "A.B"), Ordering::Less);
        assert_eq!(cmp("A.B", "A.B"), Ordering::Equal);
        // Joliet: last dot separates the extension.
        let u = |s: &str| s.encode_utf16().collect::<Vec<u16>>();
        assert_eq!(
            cmp_identifiers(&u("a.b"), &u("a-c"), 0x2E, 0x20),
            Ordering::Less
        );
        assert_eq!(
            cmp_identifiers(&u("a b"), &u("a"), 0x2E, 0x20),
            Ordering::Greater
        );
    }

    #[test]
    fn timestamps() {
        let t = Timestamp::from_epoch(EPOCH).unwrap();
        assert_eq!(t.directory_date(), [123, 11, 14, 22, 13, 20, 0]);
        assert_eq!(&t.volume_date(), b"2023111422132000\0");
        let t = Timestamp::from_epoch(0).unwrap();
        assert_eq!(t.directory_date(), [70, 1, 1, 0, 0, 0, 0]);
        let t = Timestamp::from_epoch(-2_208_988_800).unwrap(); // 1900-01-01
        assert_eq!(&t.volume_date(), b"1900010100000000\0");
        assert!(Timestamp::from_epoch(-2_208_988_801).is_err());
        let last = 5_900_659_199; // 2156-12-31 23:59:59
        assert!(Timestamp::from_epoch(last - 366 * 86_400).is_ok());
        assert!(Timestamp::from_epoch(last).is_err());
        assert!(Timestamp::from_epoch(i64::MAX).is_err());
        assert!(Timestamp::from_epoch(i64::MIN).is_err());
    }

    #[test]
    fn rejects_bad_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bad.iso");
        let err = |volume_id: &str, files: &[IsoFile], epoch: i64| {
            let e = write_iso(&out, volume_id, files, epoch).unwrap_err();
            format!("{e:#}")
        };
        let ok = seed_files();
        assert!(err("", &ok, EPOCH).contains("empty"));
        assert!(err("ci-data", &ok, EPOCH).contains("'-'"));
        assert!(err("é", &ok, EPOCH).contains("'é'"));
        assert!(err(&"a".repeat(33), &ok, EPOCH).contains("at most 32"));
        assert!(write_iso(&out, &"A".repeat(32), &ok, EPOCH).is_ok());
        assert!(err("cidata", &ok, i64::MAX).contains("SOURCE_DATE_EPOCH"));

        let one = |name: &str| err("cidata", &[file(name, b"x")], EPOCH);
        assert!(one("").contains("empty"));
        assert!(one("dir/user-data").contains("flat root directory"));
        assert!(one("a:b").contains("':'"));
        assert!(one("tab\t").contains("'\\t'"));
        assert!(one("naïve").contains("'ï'"));
        assert!(one(".").contains("reserved"));
        assert!(one("..").contains("reserved"));
        assert!(one(&"n".repeat(65)).contains("at most 64"));
        assert!(write_iso(&out, "cidata", &[file(&"n".repeat(64), b"x")], EPOCH).is_ok());
        let good = std::fs::read(&out).unwrap();

        let dup = [
            file("user-data", b"a"),
            file("meta-data", b""),
            file("user-data", b"b"),
        ];
        assert!(err("cidata", &dup, EPOCH).contains("given twice"));
        let many: Vec<IsoFile> = (0..=MAX_FILES).map(|i| file(&i.to_string(), b"")).collect();
        assert!(err("cidata", &many, EPOCH).contains("at most 1024"));
        let big = [IsoFile {
            name: "user-data".into(),
            data: vec![0; MAX_DATA_BYTES as usize + 1],
        }];
        assert!(err("cidata", &big, EPOCH).contains("64 MiB"));
        // Inputs are checked before the output is created: the last good image is untouched.
        assert!(std::fs::read(&out).unwrap() == good);
    }

    #[test]
    fn empty_file_list_is_a_valid_empty_volume() {
        let img = image("cidata", &[], EPOCH);
        let root = parse_record(&sector(&img, PVD_SECTOR)[156..190]);
        assert_eq!(read_dir(&img, root.extent, root.len).len(), 2);
        assert_eq!(img.len() / SECTOR_SIZE, ISO_ROOT_SECTOR as usize + 2);
    }

    #[test]
    fn long_volume_id_is_cut_to_16_joliet_characters() {
        let img = image("ABCDEFGHIJKLMNOPQRSTUVWXYZ012345", &seed_files(), EPOCH);
        assert_eq!(
            &sector(&img, PVD_SECTOR)[40..72],
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
        );
        let label: Vec<u8> = "ABCDEFGHIJKLMNOP"
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        assert_eq!(&sector(&img, JOLIET_SVD_SECTOR)[40..72], &label[..]);
    }
}
