//! `kiln flash <HOSTNAME> <TARGET>`: write a node's signed disk image to a block device or an
//! image file.
//!
//! The image is `<out>/nodes/<hostname>/disk.raw`. In order:
//!
//! 1. The node directory's `SHA256SUMS.sig` is checked against the trusted public key, and
//!    `disk.raw`'s sha256 against the signed `SHA256SUMS` — before the target is opened for
//!    writing. Any failure is a [`VerifyError`] (exit status 3) and nothing is written.
//! 2. The target is checked (before the image is hashed, so a refusal is quick): a block device must be at least as large as the image and neither
//!    it nor any of its partitions may be mounted (`/proc/self/mountinfo`), used as swap
//!    (`/proc/swaps`) or held by another device (`/sys/class/block/<dev>/holders`: LVM,
//!    dm-crypt, RAID); it is then opened with `O_EXCL`, which the kernel refuses for a device in
//!    use. Directories, character devices and other special files are refused. A missing path
//!    becomes a new image file. A file target may not be, or be inside, what kiln must not lose
//!    (the node's directory, the project's keys/, recipes/, overlays/ and kiln.lock, the
//!    output and cache directories, the trusted key, the kiln binary: [`Protected`]).
//! 3. A block device gets a confirmation prompt unless `--yes` (and is refused when stdin is not
//!    a terminal). Every byte of the image is written (stale data must not survive), and the
//!    last MiB of a larger device is zeroed so an old backup GPT or RAID superblock at its end
//!    cannot confuse tools. An image file is written sparse (all-zero 4 KiB blocks are skipped)
//!    to a temp file next to it, cut to the exact image size, fsynced and renamed into place.
//! 4. The target is fsynced, its page cache dropped (`posix_fadvise(DONTNEED)`), and its first
//!    image-size bytes are read back and compared with the signed sha256.

use crate::project::layout::Out;
use crate::trust::sign::{self, VerifyError, BUF_SIZE};
use anyhow::{Context, Result};
use ed25519_dalek::VerifyingKey;
use indicatif::HumanBytes;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, IsTerminal, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File name of the flashable image in a node directory.
pub const IMAGE: &str = "disk.raw";
/// Granularity of hole detection when writing an image file.
pub const SPARSE_BLOCK: usize = 4096;
/// A block device is flushed after every this many bytes written.
pub const SYNC_EVERY: u64 = 64 << 20;
/// Bytes zeroed at the end of a device larger than the image.
pub const TAIL_WIPE: u64 = 1 << 20;

/// User errors of `kiln flash` (exit status 2): nothing was written when one of these is
/// returned.
#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("{hostname:?} is not a valid host name (letters, digits, '-' and '.', not starting with '.' or '-')")]
    BadHostname { hostname: String },
    #[error(
        "no node {hostname:?}: {} does not exist; {}",
        .nodes_dir.join(.hostname).display(),
        known_nodes_hint(.known)
    )]
    UnknownNode {
        hostname: String,
        nodes_dir: PathBuf,
        known: Vec<String>,
    },
    #[error("{}: missing; the node's outputs are incomplete (rebuild them)", .path.display())]
    MissingImage { path: PathBuf },
    #[error(
        "{} is a directory; give a block device (/dev/sdX, /dev/disk/by-id/…) or an image file \
         path such as {}/{}.raw",
        .path.display(), .path.display(), .hostname
    )]
    TargetIsDirectory { path: PathBuf, hostname: String },
    #[error(
        "{} is a character device, not a disk; give a block device (/dev/sdX, /dev/nvme0n1, \
         /dev/disk/by-id/…) or an image file path",
        .path.display()
    )]
    TargetIsCharDevice { path: PathBuf },
    #[error("{} is a {kind}; give a block device or an image file path", .path.display())]
    TargetUnsupported { path: PathBuf, kind: &'static str },
    #[error("{} is the source image itself; give another target", .path.display())]
    TargetIsImage { path: PathBuf },
    #[error(
        "{} is {what} ({}), which kiln must not lose; give a block device or an image file \
         path outside it",
        .path.display(), .protected.display()
    )]
    TargetProtected {
        path: PathBuf,
        what: String,
        protected: PathBuf,
    },
    #[error(
        "{}: cannot create an image file there: directory {} does not exist",
        .path.display(), .parent.display()
    )]
    NoParentDir { path: PathBuf, parent: PathBuf },
    #[error(
        "{} is too small: {} ({size} bytes), the image needs {} ({image_size} bytes); use a \
         larger device",
        .path.display(), HumanBytes(*.size), HumanBytes(*.image_size)
    )]
    TargetTooSmall {
        path: PathBuf,
        size: u64,
        image_size: u64,
    },
    #[error(
        "{} is in use: {}; unmount it (umount), turn swap off (swapoff) or stop what holds it \
         (vgchange -an, cryptsetup close, mdadm --stop), or pick another device",
        .path.display(), .reasons.join("; ")
    )]
    TargetBusy { path: PathBuf, reasons: Vec<String> },
    #[error(
        "refusing to overwrite block device {} without confirmation: stdin is not a terminal; \
         pass --yes if you are sure (check with --dry-run first)",
        .path.display()
    )]
    NotConfirmed { path: PathBuf },
    #[error("not confirmed; nothing was written to {}", .path.display())]
    Aborted { path: PathBuf },
}

fn known_nodes_hint(known: &[String]) -> String {
    if known.is_empty() {
        "no node outputs exist there yet (build them first)".to_string()
    } else {
        format!("known nodes: {}", known.join(", "))
    }
}

/// What `flash` is asked to do.
#[derive(Debug, Clone)]
pub struct FlashOptions {
    /// `<out>`: node outputs are in `<out>/nodes/<hostname>/`.
    pub out_dir: PathBuf,
    pub hostname: String,
    /// Block device or image file path.
    pub target: PathBuf,
    /// Trusted public signing key.
    pub key: VerifyingKey,
    /// Check everything, write nothing.
    pub dry_run: bool,
    /// Do not ask before overwriting a block device.
    pub yes: bool,
    /// Rewrite only partitions 1–3 of a disk that already holds this node's kiln disk, keeping
    /// its second root slot and data partition ([`crate::deliver::reflash`]).
    pub keep_data: bool,
    /// Draw progress bars on stderr (when it is a terminal).
    pub progress: bool,
    /// Paths a file target may not be or be inside (the project's keys/, recipes, the output
    /// and cache directories, the trusted key, the kiln binary), each with what it is ("the
    /// project's keys directory"); see [`Protected`]. The node's own directory is always
    /// protected.
    pub protected: Vec<Protected>,
}

/// A path `kiln flash` refuses to write a file target into (or over).
#[derive(Debug, Clone)]
pub struct Protected {
    pub path: PathBuf,
    /// What it is, for the error: "inside the project's keys directory".
    pub what: String,
}

impl Protected {
    pub fn new(path: impl Into<PathBuf>, what: impl Into<String>) -> Protected {
        Protected {
            path: path.into(),
            what: what.into(),
        }
    }
}

/// Refuses a file target (existing or new; symlinks resolved) that is one of `protected` or
/// inside one of them ([`FlashError::TargetProtected`]). Block devices are not checked: a
/// device is never inside a project.
pub fn check_not_protected(target: &Target, protected: &[Protected]) -> Result<()> {
    if target.kind == TargetKind::BlockDevice {
        return Ok(());
    }
    for p in protected {
        // A path that does not exist protects nothing (yet): nothing there can be lost.
        let Ok(real) = fs::canonicalize(&p.path) else {
            continue;
        };
        if target.resolved.starts_with(&real) {
            return Err(FlashError::TargetProtected {
                path: target.path.clone(),
                what: p.what.clone(),
                protected: p.path.clone(),
            }
            .into());
        }
    }
    Ok(())
}

/// What kind of target was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetKind {
    BlockDevice,
    /// An existing regular file (replaced).
    File,
    /// A path that did not exist (created).
    NewFile,
}

/// The inspected target.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// As given.
    pub path: PathBuf,
    /// Symlinks resolved (what is written).
    pub resolved: PathBuf,
    pub kind: TargetKind,
    /// Device size, or the current size of an existing file.
    pub size: Option<u64>,
    /// One line for people, e.g. `block device sdb (Samsung SSD 870, 465.76 GiB)`.
    pub description: String,
}

/// Result of a flash (or of a dry run).
#[derive(Debug, Clone, Serialize)]
pub struct FlashReport {
    pub hostname: String,
    pub node_dir: PathBuf,
    pub image: PathBuf,
    pub image_size: u64,
    /// Signed sha256 of the image (verified before writing).
    pub sha256: String,
    /// `SHA256:<base64>` fingerprint of the key that signed the node's SHA256SUMS.
    pub signer: String,
    pub target: Target,
    pub dry_run: bool,
    /// Whether anything was written.
    pub written: bool,
    /// Bytes actually written (an image file skips all-zero blocks).
    pub bytes_written: u64,
    /// Whether the read-back sha256 of the target matched.
    pub verified_after_write: bool,
    /// With `--keep-data`: the target's partitions that were kept (e.g. kiln-root-b, kiln-data).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<String>,
}

/// Host names allowed in node directory names.
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && !h.starts_with(['.', '-'])
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// Node names under `<out>/nodes/` (directories or symlinks to directories), sorted.
pub fn known_nodes(out_dir: &Path) -> Result<Vec<String>> {
    let dir = Out::new(out_dir).nodes();
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut v = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && e.path().is_dir() {
            v.push(name);
        }
    }
    v.sort();
    Ok(v)
}

/// `<out>/nodes/<hostname>`, which must exist ([`FlashError::UnknownNode`] lists the ones that
/// do).
pub fn node_dir(out_dir: &Path, hostname: &str) -> Result<PathBuf> {
    if !valid_hostname(hostname) {
        return Err(FlashError::BadHostname {
            hostname: hostname.to_string(),
        }
        .into());
    }
    let d = Out::new(out_dir).node(hostname);
    if d.is_dir() {
        return Ok(d);
    }
    Err(FlashError::UnknownNode {
        hostname: hostname.to_string(),
        nodes_dir: Out::new(out_dir).nodes(),
        known: known_nodes(out_dir)?,
    }
    .into())
}

/// Splits a Linux `dev_t` into (major, minor).
pub fn dev_split(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

fn parse_majmin(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Undoes the octal escapes (`\040` for a space…) of /proc/self/mountinfo and /proc/swaps.
pub fn unescape_proc(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The (major, minor) of `path` if it is a block device.
fn block_rdev(path: &Path) -> Option<(u32, u32)> {
    let m = fs::metadata(path).ok()?;
    m.file_type().is_block_device().then(|| dev_split(m.rdev()))
}

/// Mounts of any device in `devs` (major:minor → name), from /proc/self/mountinfo text. A mount
/// matches by its major:minor field or, for file systems that report a virtual one (btrfs), by
/// its source path resolved with `rdev_of`.
pub fn mount_users(
    mountinfo: &str,
    devs: &BTreeMap<(u32, u32), String>,
    rdev_of: &dyn Fn(&Path) -> Option<(u32, u32)>,
) -> Vec<String> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 7 {
            continue;
        }
        let mount_point = unescape_proc(f[4]);
        let source = f
            .iter()
            .position(|x| *x == "-")
            .and_then(|i| f.get(i + 2))
            .map(|s| unescape_proc(s));
        let by_dev = parse_majmin(f[2]).and_then(|d| devs.get(&d));
        let by_source = || {
            source
                .as_deref()
                .filter(|s| s.starts_with('/'))
                .and_then(|s| rdev_of(Path::new(s)))
                .and_then(|d| devs.get(&d))
        };
        if let Some(name) = by_dev.or_else(by_source) {
            let msg = format!("{name} is mounted on {mount_point}");
            if !out.contains(&msg) {
                out.push(msg);
            }
        }
    }
    out
}

/// Swap areas on any device in `devs`, from /proc/swaps text.
pub fn swap_users(
    swaps: &str,
    devs: &BTreeMap<(u32, u32), String>,
    rdev_of: &dyn Fn(&Path) -> Option<(u32, u32)>,
) -> Vec<String> {
    swaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let p = unescape_proc(name);
            rdev_of(Path::new(&p))
                .and_then(|d| devs.get(&d))
                .map(|dev| format!("{dev} is in use as swap ({p})"))
        })
        .collect()
}

/// A block device as seen in /sys.
#[derive(Debug, Clone)]
struct BlockDev {
    dev: (u32, u32),
    name: String,
    /// /sys/dev/block/<maj:min>
    sys: PathBuf,
    /// Partitions: (name, major:minor, sys dir).
    partitions: Vec<(String, (u32, u32), PathBuf)>,
    model: Option<String>,
    is_partition: bool,
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn block_dev(dev: (u32, u32)) -> Result<BlockDev> {
    let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1));
    let real = fs::canonicalize(&sys).with_context(|| {
        format!(
            "reading {} (is /sys mounted? kiln needs it to check the device is not in use)",
            sys.display()
        )
    })?;
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("{}:{}", dev.0, dev.1));
    let mut partitions = Vec::new();
    for e in fs::read_dir(&sys).with_context(|| format!("listing {}", sys.display()))? {
        let e = e.with_context(|| format!("listing {}", sys.display()))?;
        let p = e.path();
        if p.join("partition").is_file() {
            if let Some(d) = read_trim(&p.join("dev")).and_then(|s| parse_majmin(&s)) {
                partitions.push((e.file_name().to_string_lossy().into_owned(), d, p));
            }
        }
    }
    partitions.sort();
    Ok(BlockDev {
        dev,
        name,
        is_partition: sys.join("partition").is_file(),
        model: read_trim(&sys.join("device/model")),
        sys,
        partitions,
    })
}

/// Devices holding `sys_dir`'s device (its `holders/` entries).
fn holders(sys_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(sys_dir.join("holders"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every reason `bd` (or one of its partitions) is in use: mounts, swap, holders.
fn block_users(bd: &BlockDev) -> Result<Vec<String>> {
    let mut devs = BTreeMap::new();
    devs.insert(bd.dev, bd.name.clone());
    for (name, d, _) in &bd.partitions {
        devs.insert(*d, name.clone());
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .context("reading /proc/self/mountinfo (is /proc mounted?)")?;
    let mut reasons = mount_users(&mountinfo, &devs, &block_rdev);
    match fs::read_to_string("/proc/swaps") {
        Ok(s) => reasons.extend(swap_users(&s, &devs, &block_rdev)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("reading /proc/swaps"),
    }
    let mut sys_dirs = vec![(bd.name.clone(), bd.sys.clone())];
    sys_dirs.extend(bd.partitions.iter().map(|(n, _, p)| (n.clone(), p.clone())));
    for (name, dir) in sys_dirs {
        let h = holders(&dir);
        if !h.is_empty() {
            reasons.push(format!(
                "{name} is held by {} (LVM, dm-crypt, RAID or multipath)",
                h.join(", ")
            ));
        }
    }
    Ok(reasons)
}

/// Size in bytes of an open block device (BLKGETSIZE64).
fn block_size(f: &File, path: &Path) -> Result<u64> {
    let size = crate::sys::os::block_device_size(f)
        .with_context(|| format!("reading the size of {} (BLKGETSIZE64)", path.display()))?;
    Ok(size)
}

/// Opens a block device with `O_EXCL`, which the kernel refuses (EBUSY) while the device is
/// mounted, used as swap, or claimed by another device or program.
fn open_exclusive(dev: &Path, write: bool, given: &Path) -> Result<File> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_EXCL)
        .open(dev)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                anyhow::Error::from(FlashError::TargetBusy {
                    path: given.to_path_buf(),
                    reasons: vec![
                        "the kernel refuses exclusive access (mounted, swap, or claimed by \
                         another device or program)"
                            .to_string(),
                    ],
                })
            } else {
                anyhow::Error::from(e).context(format!(
                    "opening {} {} (are you root, or in the disk group?)",
                    dev.display(),
                    if write {
                        "for writing"
                    } else {
                        "to read its size"
                    }
                ))
            }
        })
}

/// Looks at `path` without writing: what it is, how large, and whether it may be written.
/// `image` is the source image's metadata (a target that is the image itself is refused).
pub fn inspect_target(path: &Path, image: &fs::Metadata, hostname: &str) -> Result<Target> {
    let md = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if path.symlink_metadata().is_ok() {
                anyhow::bail!(
                    "{} is a symlink to a path that does not exist; give the device or file itself",
                    path.display()
                );
            }
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !parent.is_dir() {
                return Err(FlashError::NoParentDir {
                    path: path.to_path_buf(),
                    parent,
                }
                .into());
            }
            let parent = fs::canonicalize(&parent)
                .with_context(|| format!("resolving {}", parent.display()))?;
            let name = path
                .file_name()
                .with_context(|| format!("{} has no file name", path.display()))?;
            return Ok(Target {
                path: path.to_path_buf(),
                resolved: parent.join(name),
                kind: TargetKind::NewFile,
                size: None,
                description: "new image file".to_string(),
            });
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let resolved =
        fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let ft = md.file_type();
    if ft.is_dir() {
        return Err(FlashError::TargetIsDirectory {
            path: path.to_path_buf(),
            hostname: hostname.to_string(),
        }
        .into());
    }
    if ft.is_char_device() {
        return Err(FlashError::TargetIsCharDevice {
            path: path.to_path_buf(),
        }
        .into());
    }
    if ft.is_file() {
        if md.dev() == image.dev() && md.ino() == image.ino() {
            return Err(FlashError::TargetIsImage {
                path: path.to_path_buf(),
            }
            .into());
        }
        return Ok(Target {
            path: path.to_path_buf(),
            resolved,
            kind: TargetKind::File,
            size: Some(md.len()),
            description: format!("existing file, {} (replaced)", HumanBytes(md.len())),
        });
    }
    if !ft.is_block_device() {
        let kind = if ft.is_fifo() {
            "named pipe"
        } else if ft.is_socket() {
            "socket"
        } else {
            "special file"
        };
        return Err(FlashError::TargetUnsupported {
            path: path.to_path_buf(),
            kind,
        }
        .into());
    }

    let bd = block_dev(dev_split(md.rdev()))?;
    let reasons = block_users(&bd)?;
    if !reasons.is_empty() {
        return Err(FlashError::TargetBusy {
            path: path.to_path_buf(),
            reasons,
        }
        .into());
    }
    // An exclusive open fails while the kernel has the device claimed (what the checks above
    // may miss, e.g. another program flashing it), so a dry run sees what the write will see.
    let f = open_exclusive(&resolved, false, path)?;
    let size = block_size(&f, &resolved)?;
    drop(f);
    if size < image.len() {
        return Err(FlashError::TargetTooSmall {
            path: path.to_path_buf(),
            size,
            image_size: image.len(),
        }
        .into());
    }
    let mut what = vec![bd.name.clone()];
    if let Some(m) = &bd.model {
        what.push(m.clone());
    }
    what.push(format!("{}", HumanBytes(size)));
    if !bd.partitions.is_empty() {
        let parts: Vec<&str> = bd.partitions.iter().map(|(n, _, _)| n.as_str()).collect();
        what.push(format!("partitions {} not in use", parts.join(" ")));
    }
    Ok(Target {
        path: path.to_path_buf(),
        resolved,
        kind: TargetKind::BlockDevice,
        size: Some(size),
        description: format!(
            "block {}{} ({})",
            if bd.is_partition {
                "partition "
            } else {
                "device "
            },
            what[0],
            what[1..].join(", ")
        ),
    })
}

/// Verifies, checks and writes; see the module documentation for every step.
pub fn flash(opts: &FlashOptions) -> Result<FlashReport> {
    let node_dir = node_dir(&opts.out_dir, &opts.hostname)?;

    // 1. Signature and image digest, before the target is opened.
    let signed = sign::verify_signature(&node_dir, &opts.key)?;
    let expected = signed
        .sha256_of(IMAGE)
        .ok_or_else(|| VerifyError::NotListed {
            sums: node_dir.join(sign::SUMS),
            name: IMAGE.to_string(),
        })?
        .to_string();
    let image_path = node_dir.join(IMAGE);
    // Checked before open: opening a FIFO put in its place would block for ever.
    if let Ok(m) = fs::metadata(&image_path) {
        if !m.is_file() {
            return Err(VerifyError::Unreadable(crate::sys::util::InputFileError {
                what: "image".into(),
                path: image_path,
                problem: format!(
                    "is not a regular file (it is a {})",
                    crate::sys::util::file_kind(&m)
                ),
            })
            .into());
        }
    }
    let mut image = match File::open(&image_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(FlashError::MissingImage { path: image_path }.into())
        }
        Err(e) => return Err(e).with_context(|| format!("opening {}", image_path.display())),
    };
    let image_md = image
        .metadata()
        .with_context(|| format!("reading {}", image_path.display()))?;
    if !image_md.is_file() {
        anyhow::bail!("{} is not a regular file", image_path.display());
    }
    let image_size = image_md.len();

    // 2. The target (looked at, not opened for writing), before the long hash: a target kiln
    // must not lose is refused at once.
    let target = inspect_target(&opts.target, &image_md, &opts.hostname)?;
    let mut protected = vec![Protected::new(
        &node_dir,
        "inside the node's output directory",
    )];
    protected.extend(opts.protected.iter().cloned());
    check_not_protected(&target, &protected)?;

    let bar = sign::byte_bar(image_size, format!("verifying {IMAGE}"), opts.progress);
    let (actual, _) = sign::sha256_stream(&mut image, None, &bar, &image_path)?;
    bar.finish_and_clear();
    if actual != expected {
        return Err(VerifyError::Mismatch {
            path: image_path,
            expected,
            actual,
        }
        .into());
    }

    let mut report = FlashReport {
        hostname: opts.hostname.clone(),
        node_dir: node_dir.clone(),
        image: image_path.clone(),
        image_size,
        sha256: expected.clone(),
        signer: signed.signer.clone(),
        target: target.clone(),
        dry_run: opts.dry_run,
        written: false,
        bytes_written: 0,
        verified_after_write: false,
        kept: vec![],
    };
    if opts.keep_data {
        return flash_keep_data(opts, &mut image, target, report);
    }
    if opts.dry_run {
        return Ok(report);
    }

    // 3. Confirmation and write.
    if target.kind == TargetKind::BlockDevice && !opts.yes {
        confirm(&report)?;
    }
    image
        .seek(SeekFrom::Start(0))
        .with_context(|| format!("rewinding {}", image_path.display()))?;
    let written = match target.kind {
        TargetKind::BlockDevice => {
            write_device(&mut image, &image_path, image_size, &target, opts)?
        }
        TargetKind::File | TargetKind::NewFile => write_file(
            &mut image,
            &image_path,
            image_size,
            &image_md,
            &target,
            opts,
        )?,
    };
    report.written = true;
    report.bytes_written = written;

    // 4. Read back.
    read_back(&target.resolved, image_size, &expected, opts.progress)?;
    report.verified_after_write = true;
    Ok(report)
}

/// `--keep-data`: checks the target holds this node's kiln disk, then rewrites partitions 1–3
/// in place (see [`crate::deliver::reflash`]).
fn flash_keep_data(
    opts: &FlashOptions,
    image: &mut File,
    target: Target,
    mut report: FlashReport,
) -> Result<FlashReport> {
    use crate::deliver::reflash;
    if target.kind == TargetKind::NewFile {
        return Err(reflash::KeepDataRefused {
            path: target.path.clone(),
            reason: "it does not exist, so it holds no data".into(),
            fix: "flash without --keep-data to create it".into(),
        }
        .into());
    }
    let size = target.size.unwrap_or(0);
    let mut t = if target.kind == TargetKind::BlockDevice {
        open_exclusive(&target.resolved, !opts.dry_run, &target.path)?
    } else {
        OpenOptions::new()
            .read(true)
            .write(!opts.dry_run)
            .open(&target.resolved)
            .with_context(|| format!("opening {}", target.path.display()))?
    };
    let plan = reflash::plan(image, &mut t, &target.path, size, &opts.hostname)?;
    report.kept = plan.kept.clone();
    if opts.dry_run {
        return Ok(report);
    }
    if target.kind == TargetKind::BlockDevice && !opts.yes {
        confirm(&report)?;
    }
    report.bytes_written = reflash::write(image, &mut t, &plan, &target.path)?;
    report.written = true;
    drop(t);
    reflash::read_back(image, &target.resolved, &plan)?;
    report.verified_after_write = true;
    Ok(report)
}

fn confirm(r: &FlashReport) -> Result<()> {
    if !io::stdin().is_terminal() {
        return Err(FlashError::NotConfirmed {
            path: r.target.path.clone(),
        }
        .into());
    }
    let mut err = io::stderr().lock();
    let lost = if r.kept.is_empty() {
        format!("EVERYTHING on {} will be lost.", r.target.path.display())
    } else {
        format!(
            "Its partitions 1-3 (ESP, root slot a, seed) are rewritten; kept: {}.",
            r.kept.join(", ")
        )
    };
    writeln!(
        err,
        "About to write {} ({}, {}) to {}: {}.\n{lost}",
        r.image.display(),
        r.hostname,
        HumanBytes(r.image_size),
        r.target.path.display(),
        r.target.description,
    )
    .context("writing to stderr")?;
    write!(err, "Type yes to continue: ").context("writing to stderr")?;
    err.flush().context("writing to stderr")?;
    let mut line = String::new();
    io::stdin()
        .read_line(&mut line)
        .context("reading the confirmation from stdin")?;
    if line.trim() == "yes" {
        Ok(())
    } else {
        Err(FlashError::Aborted {
            path: r.target.path.clone(),
        }
        .into())
    }
}

/// Reads into `buf` until it is full or EOF; returns the byte count.
fn read_full(r: &mut dyn Read, buf: &mut [u8], what: &Path) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", what.display())),
        }
    }
    Ok(n)
}

fn write_device(
    image: &mut File,
    image_path: &Path,
    image_size: u64,
    target: &Target,
    opts: &FlashOptions,
) -> Result<u64> {
    let dev = &target.resolved;
    let mut out = open_exclusive(dev, true, &target.path)?;
    let bar = sign::byte_bar(
        image_size,
        format!("writing {}", target.path.display()),
        opts.progress,
    );
    let mut buf = vec![0u8; BUF_SIZE];
    let mut total = 0u64;
    loop {
        let n = read_full(image, &mut buf, image_path)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .with_context(|| format!("writing {} at byte {total}", dev.display()))?;
        total += n as u64;
        bar.inc(n as u64);
        // Flush as we go: the bar then shows the device's speed, not the page cache's, and
        // the final fsync does not stall for minutes on a slow stick.
        if total.is_multiple_of(SYNC_EVERY) {
            out.sync_data()
                .with_context(|| format!("flushing {} (fdatasync)", dev.display()))?;
        }
    }
    bar.finish_and_clear();
    if total != image_size {
        anyhow::bail!(
            "{} changed while it was written ({total} bytes read, {image_size} expected); \
             the device holds a partial image: flash again",
            image_path.display()
        );
    }
    // Zero the end of a larger device: an old backup GPT or md superblock must not survive.
    let size = target.size.unwrap_or(image_size);
    if size > image_size {
        let len = TAIL_WIPE.min(size - image_size);
        let zeros = vec![0u8; len as usize];
        out.write_all_at(&zeros, size - len)
            .with_context(|| format!("zeroing the last {len} bytes of {}", dev.display()))?;
    }
    out.sync_all()
        .with_context(|| format!("flushing {} (fsync)", dev.display()))?;
    Ok(total)
}

fn write_file(
    image: &mut File,
    image_path: &Path,
    image_size: u64,
    image_md: &fs::Metadata,
    target: &Target,
    opts: &FlashOptions,
) -> Result<u64> {
    let dest = &target.resolved;
    let dir = dest
        .parent()
        .with_context(|| format!("{} has no parent directory", dest.display()))?;
    // An existing file keeps its mode; a new one gets the image's (0600 when it holds secrets).
    let mode = match target.kind {
        TargetKind::File => fs::metadata(dest)
            .with_context(|| format!("reading {}", dest.display()))?
            .permissions()
            .mode(),
        _ => image_md.permissions().mode(),
    } & 0o777;
    let tmp = tempfile::Builder::new()
        .prefix(".kiln-flash-")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temp file in {}", dir.display()))?;
    let bar = sign::byte_bar(
        image_size,
        format!("writing {}", target.path.display()),
        opts.progress,
    );
    let mut buf = vec![0u8; BUF_SIZE];
    let mut offset = 0u64;
    let mut written = 0u64;
    loop {
        let n = read_full(image, &mut buf, image_path)?;
        if n == 0 {
            break;
        }
        written += write_sparse(tmp.as_file(), &buf[..n], offset)
            .with_context(|| format!("writing {} (disk full?)", dest.display()))?;
        offset += n as u64;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    if offset != image_size {
        anyhow::bail!(
            "{} changed while it was written ({offset} bytes read, {image_size} expected); \
             nothing was replaced: flash again",
            image_path.display()
        );
    }
    let f = tmp.as_file();
    f.set_len(image_size)
        .with_context(|| format!("setting the size of {}", dest.display()))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", dest.display()))?;
    f.sync_all()
        .with_context(|| format!("flushing {} (fsync)", dest.display()))?;
    tmp.persist(dest)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming the temp file to {}", dest.display()))?;
    crate::sys::util::sync_path(dir)?;
    Ok(written)
}

/// Writes the non-zero [`SPARSE_BLOCK`]-sized blocks of `buf` at `offset` (plus `buf`'s index),
/// coalescing neighbours; returns the bytes written. All-zero blocks are left as holes.
pub fn write_sparse(f: &File, buf: &[u8], offset: u64) -> io::Result<u64> {
    let is_zero = |b: &[u8]| b.iter().fold(0u8, |a, x| a | x) == 0;
    let mut written = 0u64;
    let mut run: Option<usize> = None;
    let mut i = 0;
    while i < buf.len() {
        let end = (i + SPARSE_BLOCK).min(buf.len());
        let zero = is_zero(&buf[i..end]);
        match (zero, run) {
            (false, None) => run = Some(i),
            (true, Some(s)) => {
                f.write_all_at(&buf[s..i], offset + s as u64)?;
                written += (i - s) as u64;
                run = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run {
        f.write_all_at(&buf[s..], offset + s as u64)?;
        written += (buf.len() - s) as u64;
    }
    Ok(written)
}

/// Reads the first `len` bytes of `path` back (page cache dropped first) and compares their
/// sha256 with `expected`.
fn read_back(path: &Path, len: u64, expected: &str, progress: bool) -> Result<()> {
    let mut f =
        File::open(path).with_context(|| format!("opening {} to read it back", path.display()))?;
    // The data was fsynced, so its cached pages are clean and DONTNEED drops them: the read
    // below comes from the device, not from memory.
    if let Err(rc) = crate::sys::os::drop_cached_pages(&f) {
        tracing::debug!("posix_fadvise(DONTNEED) on {}: error {rc}", path.display());
    }
    let bar = sign::byte_bar(len, format!("reading back {}", path.display()), progress);
    let (actual, n) = sign::sha256_stream(&mut f, Some(len), &bar, path)?;
    bar.finish_and_clear();
    if n != len {
        anyhow::bail!(
            "reading {} back returned {n} bytes, {len} expected: the target is shorter than \
             the image; do not boot from it",
            path.display()
        );
    }
    if actual != expected {
        anyhow::bail!(
            "read-back of {} does not match: sha256 {actual}, the signed image has {expected}; \
             the device may be failing or something else wrote to it — do not boot from it, \
             flash again or use another device",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devs() -> BTreeMap<(u32, u32), String> {
        [((8, 16), "sdb"), ((8, 17), "sdb1"), ((8, 18), "sdb2")]
            .into_iter()
            .map(|(d, n)| (d, n.to_string()))
            .collect()
    }

    fn rdev(p: &Path) -> Option<(u32, u32)> {
        match p.to_str()? {
            "/dev/sdb2" => Some((8, 18)),
            "/dev/sda1" => Some((8, 1)),
            "/dev/mapper/swap me" => Some((8, 17)),
            _ => None,
        }
    }

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
40 22 8:17 / /media/usb\\040stick rw,relatime shared:30 - vfat /dev/sdb1 rw,fmask=0022
41 22 8:17 / /media/usb\\040stick rw,relatime shared:30 - vfat /dev/sdb1 rw,fmask=0022
50 22 0:45 /@home /home rw,relatime shared:40 - btrfs /dev/sdb2 rw,space_cache=v2
";

    #[test]
    fn mountinfo_finds_partitions_by_dev_and_by_source() {
        let users = mount_users(MOUNTINFO, &devs(), &rdev);
        assert_eq!(
            users,
            [
                "sdb1 is mounted on /media/usb stick",
                "sdb2 is mounted on /home"
            ]
        );
        let other: BTreeMap<_, _> = [((8, 32), "sdc".to_string())].into_iter().collect();
        assert!(mount_users(MOUNTINFO, &other, &rdev).is_empty());
    }

    #[test]
    fn swaps_are_found() {
        let swaps = "\
Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
/dev/mapper/swap\\040me                   partition\t8388604\t\t0\t\t-2
/swapfile                               file\t\t1048572\t\t0\t\t-3
";
        assert_eq!(
            swap_users(swaps, &devs(), &rdev),
            ["sdb1 is in use as swap (/dev/mapper/swap me)"]
        );
    }

    #[test]
    fn dev_t_split_matches_glibc() {
        assert_eq!(dev_split(0x0811), (8, 17));
        // glibc's makedev, with the large-number encoding.
        let makedev = |ma: u64, mi: u64| {
            ((ma & 0xfff) << 8) | ((ma & !0xfff) << 32) | (mi & 0xff) | ((mi & !0xff) << 12)
        };
        assert_eq!(dev_split(makedev(259, 65536)), (259, 65536));
        assert_eq!(dev_split(makedev(4096, 3)), (4096, 3));
    }

    #[test]
    fn hostnames() {
        for ok in ["node1", "master-1.lab", "w_2"] {
            assert!(valid_hostname(ok), "{ok}");
        }
        for bad in ["", "..", ".hidden", "a/b", "-x", "a b"] {
            assert!(!valid_hostname(bad), "{bad}");
        }
    }

    #[test]
    fn sparse_writer_skips_zero_blocks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        let f = File::create(&p).unwrap();
        let mut buf = vec![0u8; 64 * SPARSE_BLOCK + 100];
        buf[5 * SPARSE_BLOCK + 7] = 1;
        buf[6 * SPARSE_BLOCK] = 2;
        buf[64 * SPARSE_BLOCK + 99] = 3;
        let n = write_sparse(&f, &buf, 1 << 20).unwrap();
        assert_eq!(n, 2 * SPARSE_BLOCK as u64 + 100);
        f.set_len((1 << 20) + buf.len() as u64).unwrap();
        let back = fs::read(&p).unwrap();
        assert!(back[..1 << 20].iter().all(|&b| b == 0));
        assert_eq!(&back[1 << 20..], &buf[..]);
    }

    #[test]
    fn holders_are_listed_from_sysfs() {
        let d = tempfile::tempdir().unwrap();
        assert!(holders(d.path()).is_empty());
        fs::create_dir_all(d.path().join("holders")).unwrap();
        assert!(holders(d.path()).is_empty());
        for h in ["dm-1", "dm-0"] {
            std::os::unix::fs::symlink("/nonexistent", d.path().join("holders").join(h)).unwrap();
        }
        assert_eq!(holders(d.path()), ["dm-0", "dm-1"]);
    }

    #[test]
    fn unescape() {
        assert_eq!(unescape_proc("a\\040b\\134c\\01"), "a b\\c\\01");
    }
}
