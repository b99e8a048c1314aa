//! `root.squashfs` written in-process from the composed tar: a squashfs 4.0 writer (zstd) that
//! can reuse the compressed blocks of an earlier image.
//!
//! Every data block and fragment block is keyed by the BLAKE3 hash of its uncompressed bytes.
//! After each build an index of the image's blocks (key, hash of the stored bytes, offset, size) is
//! saved in the cache; the next build of any role looks each new block up there and copies the
//! stored bytes from the earlier image instead of compressing again, once their hash matches.
//! A block compresses to the same bytes every time (single-threaded zstd at a fixed level, the
//! library version is part of the index), so a reused block is byte-for-byte what compressing it
//! would have produced: the image does not depend on what the cache held.
//!
//! Layout follows the kernel's reader (`fs/squashfs`): superblock, zstd options, data and
//! fragment blocks in tar order, inode table, directory table, fragment table, id table, xattr
//! table, padded to 4 KiB. Inodes are numbered and written in post-order (children before their
//! directory); directory listings are sorted by name, split into runs of at most 256 entries
//! and at metadata-block boundaries, and large directories carry a lookup index. Identical files
//! are stored once, identical tail ends share a fragment.

use super::reuse::{Index, Reuse, Stored};
use crate::sys::util;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

const MAGIC: u32 = 0x7371_7368;
const SUPERBLOCK_SIZE: u64 = 96;
const META_SIZE: usize = 8192;
const META_UNCOMPRESSED: u16 = 0x8000;
const BLOCK_UNCOMPRESSED: u32 = 1 << 24;
const NO_FRAGMENT: u32 = 0xFFFF_FFFF;
const NO_XATTR: u32 = 0xFFFF_FFFF;
const NO_TABLE: u64 = 0xFFFF_FFFF_FFFF_FFFF;
const ZSTD_ID: u16 = 6;
const FLAG_DUPLICATES: u16 = 0x0040;
const FLAG_NO_XATTRS: u16 = 0x0200;
const FLAG_COMP_OPTS: u16 = 0x0400;
/// Blocks compressed together (in parallel) before they are written in order.
const BATCH_BLOCKS: usize = 32;

/// How the image is written.
#[derive(Debug, Clone)]
pub struct Options {
    /// Data block size: a power of two from 4 KiB to 1 MiB.
    pub block_size: u32,
    /// zstd level for data and metadata.
    pub level: i32,
    /// Superblock time and the mtime of directories the tar implies but does not list.
    pub mtime: u32,
    /// Compression threads (the output does not depend on it).
    pub jobs: usize,
}

/// What writing the image did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub inodes: u32,
    /// Data and fragment blocks in the image.
    pub blocks: u64,
    /// Of those, copied from an earlier image.
    pub reused: u64,
    /// Files stored once for several identical copies.
    pub duplicate_files: u64,
    pub bytes: u64,
}

// ---------------------------------------------------------------------------------------------
// Block reuse

/// Settings that decide a block's stored bytes: indexes written with others are not used.
pub fn reuse_params(opts: &Options) -> String {
    format!(
        "squashfs block_size={} zstd_level={}",
        opts.block_size, opts.level
    )
}

/// The block index of a written image, to be saved with [`Written::save_index`] once the image
/// has its final path.
pub struct Written {
    pub stats: Stats,
    pub index: Index,
}

// ---------------------------------------------------------------------------------------------
// The tree read from the tar

/// Extended attributes, sorted: (full name, value).
type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Where each run of a directory listing starts, and its first name.
type Runs = Vec<(u32, Vec<u8>)>;

#[derive(Debug, Clone)]
struct Meta {
    mode: u16,
    uid: u32,
    gid: u32,
    mtime: u32,
    xattrs: Xattrs,
}

#[derive(Debug, Clone)]
struct FileData {
    size: u64,
    /// First data block (sequence number among data blocks) and number of full blocks.
    first_block: u64,
    nblocks: u64,
    /// Fragment index and offset of the tail end.
    frag: Option<(u32, u32)>,
}

#[derive(Debug)]
enum Kind {
    Dir(BTreeMap<Vec<u8>, usize>),
    File(FileData),
    Symlink(Vec<u8>),
    Dev { block: bool, rdev: u32 },
    Fifo,
}

#[derive(Debug)]
struct Node {
    meta: Meta,
    kind: Kind,
}

impl Node {
    /// Basic inode type (1..=6; the mode field holds only the permission bits).
    fn basic_type(&self) -> u16 {
        match self.kind {
            Kind::Dir(_) => 1,
            Kind::File(_) => 2,
            Kind::Symlink(_) => 3,
            Kind::Dev { block: true, .. } => 4,
            Kind::Dev { block: false, .. } => 5,
            Kind::Fifo => 6,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Data and fragment blocks

enum JobKind {
    Data(u64),
    Fragment(u32),
}

struct Job {
    kind: JobKind,
    key: [u8; 32],
    data: Vec<u8>,
}

struct DataWriter<'a> {
    out: BufWriter<fs::File>,
    pos: u64,
    opts: &'a Options,
    reuse: &'a mut Reuse,
    pending: Vec<Job>,
    /// Offset and size field of every data block, by sequence number.
    data_blocks: Vec<(u64, u32)>,
    next_data: u64,
    fragments: Vec<(u64, u32)>,
    frag_buf: Vec<u8>,
    /// Identical files and tail ends, by content.
    files_seen: HashMap<[u8; 32], FileData>,
    tails_seen: HashMap<[u8; 32], (u32, u32)>,
    index: Index,
    stats: Stats,
}

impl<'a> DataWriter<'a> {
    /// Queues a block whose key (BLAKE3 of `data`) the caller already has.
    fn push(&mut self, kind: JobKind, key: [u8; 32], data: Vec<u8>) -> Result<()> {
        self.pending.push(Job { kind, key, data });
        if self.pending.len() >= BATCH_BLOCKS {
            self.flush()?;
        }
        Ok(())
    }

    /// Compresses (or reuses) the pending blocks, in parallel, and writes them in order.
    fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let jobs = std::mem::take(&mut self.pending);
        let mut stored: Vec<Option<Stored>> = jobs.iter().map(|j| self.reuse.get(&j.key)).collect();
        self.stats.reused += stored.iter().filter(|s| s.is_some()).count() as u64;
        let todo: Vec<usize> = (0..jobs.len()).filter(|&i| stored[i].is_none()).collect();
        let level = self.opts.level;
        let results = util::par_map(
            &todo,
            self.opts.jobs,
            || zstd::bulk::Compressor::new(level),
            |c, &i| -> Result<Stored> {
                let c = c
                    .as_mut()
                    .map_err(|e| anyhow::anyhow!("making a zstd compressor: {e}"))?;
                let data = &jobs[i].data;
                let z = c.compress(data)?;
                let (bytes, field) = if z.len() < data.len() {
                    let n = z.len() as u32;
                    (z, n)
                } else {
                    (data.clone(), data.len() as u32 | BLOCK_UNCOMPRESSED)
                };
                // Hashed here, in parallel, for the reuse index.
                Ok(Stored::new(bytes, field))
            },
        );
        for (&i, r) in todo.iter().zip(results) {
            stored[i] = Some(r?);
        }
        for (job, s) in jobs.into_iter().zip(stored) {
            let st = s.expect("every block stored");
            let (bytes, size) = (&st.bytes, st.field);
            let off = self.pos;
            self.out.write_all(bytes).context("writing root.squashfs")?;
            self.pos += bytes.len() as u64;
            self.stats.blocks += 1;
            self.index.push(job.key, &st, off);
            match job.kind {
                JobKind::Data(seq) => {
                    debug_assert_eq!(seq as usize, self.data_blocks.len());
                    self.data_blocks.push((off, size));
                }
                JobKind::Fragment(i) => self.fragments[i as usize] = (off, size),
            }
        }
        Ok(())
    }

    fn flush_fragment(&mut self) -> Result<()> {
        if self.frag_buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.frag_buf);
        let i = self.fragments.len() as u32 - 1;
        let key = *blake3::hash(&data).as_bytes();
        self.push(JobKind::Fragment(i), key, data)
    }

    /// Index and offset of `tail` (whose BLAKE3 is `key`) in a fragment block.
    fn add_tail(&mut self, tail: &[u8], key: [u8; 32]) -> Result<(u32, u32)> {
        if let Some(&at) = self.tails_seen.get(&key) {
            return Ok(at);
        }
        if self.frag_buf.is_empty()
            || self.frag_buf.len() + tail.len() > self.opts.block_size as usize
        {
            self.flush_fragment()?;
            self.fragments.push((0, 0));
        }
        let at = (self.fragments.len() as u32 - 1, self.frag_buf.len() as u32);
        self.frag_buf.extend_from_slice(tail);
        self.tails_seen.insert(key, at);
        Ok(at)
    }

    /// Stores a regular file's data read from `r`.
    fn add_file(&mut self, r: &mut impl Read, size: u64) -> Result<FileData> {
        let bs = self.opts.block_size as u64;
        let nblocks = size / bs;
        let first_block = self.next_data;
        let first_pending = self.pending.len();
        let flushes_before = self.stats.blocks;
        let mut whole = blake3::Hasher::new();
        whole.update(&size.to_le_bytes());
        for _ in 0..nblocks {
            let mut buf = vec![0u8; bs as usize];
            r.read_exact(&mut buf)
                .context("reading file data from the tar")?;
            // Each block is hashed once: its key, and a link of the whole file's key.
            let key = *blake3::hash(&buf).as_bytes();
            whole.update(&key);
            let seq = self.next_data;
            self.next_data += 1;
            self.push(JobKind::Data(seq), key, buf)?;
        }
        let mut tail = vec![0u8; (size % bs) as usize];
        r.read_exact(&mut tail)
            .context("reading file data from the tar")?;
        let tail_key = *blake3::hash(&tail).as_bytes();
        whole.update(&tail_key);
        let key: [u8; 32] = *whole.finalize().as_bytes();
        if let Some(prev) = self.files_seen.get(&key) {
            // Take the blocks back if none was written yet; otherwise keep both copies.
            if self.stats.blocks == flushes_before
                && self.pending.len() == first_pending + nblocks as usize
            {
                self.pending.truncate(first_pending);
                self.next_data = first_block;
                self.stats.duplicate_files += 1;
                return Ok(prev.clone());
            }
        }
        let frag = if tail.is_empty() {
            None
        } else {
            Some(self.add_tail(&tail, tail_key)?)
        };
        let fd = FileData {
            size,
            first_block,
            nblocks,
            frag,
        };
        self.files_seen.insert(key, fd.clone());
        Ok(fd)
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata blocks

struct MetaWriter {
    level: i32,
    out: Vec<u8>,
    cur: Vec<u8>,
    /// On-disk start (relative to the table) of every block begun so far.
    starts: Vec<u64>,
}

impl MetaWriter {
    fn new(level: i32) -> Self {
        MetaWriter {
            level,
            out: Vec::new(),
            cur: Vec::with_capacity(META_SIZE),
            starts: vec![0],
        }
    }

    /// (on-disk start of the current block, offset in it), and the uncompressed position.
    fn pos(&self) -> (u64, u16, u64) {
        (
            *self.starts.last().unwrap(),
            self.cur.len() as u16,
            (self.starts.len() as u64 - 1) * META_SIZE as u64 + self.cur.len() as u64,
        )
    }

    fn write(&mut self, mut b: &[u8]) -> Result<()> {
        while !b.is_empty() {
            let n = (META_SIZE - self.cur.len()).min(b.len());
            self.cur.extend_from_slice(&b[..n]);
            b = &b[n..];
            if self.cur.len() == META_SIZE {
                self.flush_block()?;
                self.starts.push(self.out.len() as u64);
            }
        }
        Ok(())
    }

    fn flush_block(&mut self) -> Result<()> {
        let z = zstd::bulk::compress(&self.cur, self.level)?;
        if z.len() < self.cur.len() {
            self.out.extend_from_slice(&(z.len() as u16).to_le_bytes());
            self.out.extend_from_slice(&z);
        } else {
            let h = self.cur.len() as u16 | META_UNCOMPRESSED;
            self.out.extend_from_slice(&h.to_le_bytes());
            self.out.extend_from_slice(&self.cur);
        }
        self.cur.clear();
        Ok(())
    }

    /// The compressed table, and the start of each block.
    fn finish(mut self) -> Result<(Vec<u8>, Vec<u64>)> {
        if self.cur.is_empty() {
            self.starts.pop();
        } else {
            self.flush_block()?;
        }
        Ok((self.out, self.starts))
    }
}

/// A lookup table (fragments, ids, xattr ids) at `at`: its metadata blocks, then the list of
/// their absolute locations. Returns the bytes and the location of the list.
fn lookup_table(entries: &[u8], at: u64, level: i32) -> Result<(Vec<u8>, u64)> {
    let mut m = MetaWriter::new(level);
    m.write(entries)?;
    let (mut out, starts) = m.finish()?;
    let list_at = at + out.len() as u64;
    for s in starts {
        out.extend_from_slice(&(at + s).to_le_bytes());
    }
    Ok((out, list_at))
}

// ---------------------------------------------------------------------------------------------
// Reading the tar

fn split_path(p: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut v = Vec::new();
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => bail!("path with '..': {}", String::from_utf8_lossy(p)),
            c if c.len() > 256 => bail!(
                "file name longer than 256 bytes (the squashfs limit): {}",
                String::from_utf8_lossy(p)
            ),
            c => v.push(c.to_vec()),
        }
    }
    Ok(v)
}

struct Tree {
    nodes: Vec<Node>,
    default_dir: Meta,
}

impl Tree {
    /// The directory at `comps` (made with default metadata where missing).
    fn dir(&mut self, comps: &[Vec<u8>], whole: &[u8]) -> Result<usize> {
        let mut at = 0usize;
        for c in comps {
            let existing = match &self.nodes[at].kind {
                Kind::Dir(ch) => ch.get(c).copied(),
                _ => bail!(
                    "{} is inside a non-directory",
                    String::from_utf8_lossy(whole)
                ),
            };
            at = match existing {
                Some(i) if matches!(self.nodes[i].kind, Kind::Dir(_)) => i,
                Some(_) => bail!(
                    "{}: a parent is not a directory",
                    String::from_utf8_lossy(whole)
                ),
                None => {
                    let i = self.nodes.len();
                    self.nodes.push(Node {
                        meta: self.default_dir.clone(),
                        kind: Kind::Dir(BTreeMap::new()),
                    });
                    if let Kind::Dir(ch) = &mut self.nodes[at].kind {
                        ch.insert(c.clone(), i);
                    }
                    i
                }
            };
        }
        Ok(at)
    }

    fn lookup(&self, comps: &[Vec<u8>]) -> Option<usize> {
        let mut at = 0usize;
        for c in comps {
            match &self.nodes[at].kind {
                Kind::Dir(ch) => at = *ch.get(c)?,
                _ => return None,
            }
        }
        Some(at)
    }

    /// Places node `n` at `comps` (replacing what was there; a directory replacing a
    /// directory only takes its metadata).
    fn place(&mut self, comps: &[Vec<u8>], node: Node, whole: &[u8]) -> Result<usize> {
        let Some((name, parent)) = comps.split_last() else {
            // The root itself.
            if !matches!(node.kind, Kind::Dir(_)) {
                bail!("the tar's root entry is not a directory");
            }
            self.nodes[0].meta = node.meta;
            return Ok(0);
        };
        let p = self.dir(parent, whole)?;
        let existing = match &self.nodes[p].kind {
            Kind::Dir(ch) => ch.get(name).copied(),
            _ => unreachable!(),
        };
        if let (Some(i), Kind::Dir(_)) = (existing, &node.kind) {
            if matches!(self.nodes[i].kind, Kind::Dir(_)) {
                self.nodes[i].meta = node.meta;
                return Ok(i);
            }
        }
        let i = self.nodes.len();
        self.nodes.push(node);
        if let Kind::Dir(ch) = &mut self.nodes[p].kind {
            ch.insert(name.clone(), i);
        }
        Ok(i)
    }

    fn link(&mut self, comps: &[Vec<u8>], target: usize, whole: &[u8]) -> Result<()> {
        let Some((name, parent)) = comps.split_last() else {
            bail!("a hard link cannot be the root");
        };
        let p = self.dir(parent, whole)?;
        if let Kind::Dir(ch) = &mut self.nodes[p].kind {
            ch.insert(name.clone(), target);
        }
        Ok(())
    }
}

fn xattr_prefix(key: &[u8]) -> Option<(u16, &[u8])> {
    for (id, p) in [(0u16, &b"user."[..]), (1, b"trusted."), (2, b"security.")] {
        if let Some(rest) = key.strip_prefix(p) {
            return Some((id, rest));
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Writing

/// Writes `out` (a squashfs image) from the tar at `tar`, reusing blocks from `reuse`.
pub fn write_from_tar(
    tar: &Path,
    out: &Path,
    opts: &Options,
    reuse: &mut Reuse,
) -> Result<Written> {
    if !opts.block_size.is_power_of_two() || !(4096..=1 << 20).contains(&opts.block_size) {
        bail!(
            "squashfs block size {} is not a power of two from 4 KiB to 1 MiB",
            opts.block_size
        );
    }
    let input = fs::File::open(tar).with_context(|| format!("opening {}", tar.display()))?;
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    // Superblock (written last), then the zstd options: one uncompressed metadata block.
    w.write_all(&[0u8; SUPERBLOCK_SIZE as usize])?;
    w.write_all(&(4u16 | META_UNCOMPRESSED).to_le_bytes())?;
    w.write_all(&(opts.level as u32).to_le_bytes())?;
    let default_dir = Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: opts.mtime,
        xattrs: Vec::new(),
    };
    let mut tree = Tree {
        nodes: vec![Node {
            meta: default_dir.clone(),
            kind: Kind::Dir(BTreeMap::new()),
        }],
        default_dir,
    };
    let mut dw = DataWriter {
        out: w,
        pos: SUPERBLOCK_SIZE + 6,
        opts,
        reuse,
        pending: Vec::new(),
        data_blocks: Vec::new(),
        next_data: 0,
        fragments: Vec::new(),
        frag_buf: Vec::new(),
        files_seen: HashMap::new(),
        tails_seen: HashMap::new(),
        index: Index::new(reuse_params(opts)),
        stats: Stats::default(),
    };

    let mut ar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, input));
    for e in ar
        .entries()
        .with_context(|| format!("reading {}", tar.display()))?
    {
        let mut e = e.with_context(|| format!("reading {}", tar.display()))?;
        let path = e.path_bytes().into_owned();
        let at = || format!("{} in {}", String::from_utf8_lossy(&path), tar.display());
        let comps = split_path(&path).with_context(at)?;
        let mut xattrs: Xattrs = Vec::new();
        if let Some(exts) = e.pax_extensions().with_context(at)? {
            for ext in exts {
                let ext = ext.with_context(at)?;
                if let Some(k) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    if xattr_prefix(k).is_none() {
                        bail!(
                            "{}: xattr {} has a namespace squashfs cannot store (user., trusted., security. only)",
                            at(),
                            String::from_utf8_lossy(k)
                        );
                    }
                    xattrs.push((k.to_vec(), ext.value_bytes().to_vec()));
                }
            }
        }
        xattrs.sort();
        let h = e.header().clone();
        if h.entry_type() == tar::EntryType::Link {
            // A hard link carries no metadata of its own: it names an earlier node.
            let t = e.link_name_bytes().with_context(at)?;
            let tc = split_path(&t).with_context(at)?;
            let target = tree.lookup(&tc).with_context(|| {
                format!(
                    "{}: hard link to {}, which is not earlier in the tar",
                    at(),
                    String::from_utf8_lossy(&t)
                )
            })?;
            if matches!(tree.nodes[target].kind, Kind::Dir(_)) {
                bail!("{}: hard link to a directory", at());
            }
            tree.link(&comps, target, &path).with_context(at)?;
            continue;
        }
        let meta = Meta {
            mode: (h.mode().with_context(at)? & 0o7777) as u16,
            uid: h.uid().with_context(at)? as u32,
            gid: h.gid().with_context(at)? as u32,
            mtime: h.mtime().with_context(at)?.min(u32::MAX as u64) as u32,
            xattrs,
        };
        let dev = || -> Result<u32> {
            let major = h.device_major()?.unwrap_or(0);
            let minor = h.device_minor()?.unwrap_or(0);
            Ok((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
        };
        let kind = match h.entry_type() {
            tar::EntryType::Directory => Kind::Dir(BTreeMap::new()),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = e.size();
                Kind::File(dw.add_file(&mut e, size).with_context(at)?)
            }
            tar::EntryType::Symlink => {
                let t = e.link_name_bytes().with_context(at)?;
                Kind::Symlink(t.into_owned())
            }
            tar::EntryType::Char => Kind::Dev {
                block: false,
                rdev: dev().with_context(at)?,
            },
            tar::EntryType::Block => Kind::Dev {
                block: true,
                rdev: dev().with_context(at)?,
            },
            tar::EntryType::Fifo => Kind::Fifo,
            t => bail!("{}: tar entry type {:?} is not supported", at(), t),
        };
        tree.place(&comps, Node { meta, kind }, &path)
            .with_context(at)?;
    }
    dw.flush_fragment()?;
    dw.flush()?;
    let fragments = std::mem::take(&mut dw.fragments);
    let data_blocks = std::mem::take(&mut dw.data_blocks);
    let mut stats = std::mem::take(&mut dw.stats);
    let index = std::mem::replace(&mut dw.index, Index::new(String::new()));
    let mut w = dw.out;
    let data_end = dw.pos;

    // Post-order: children (sorted by name) before their directory; hard-linked nodes once.
    let n = tree.nodes.len();
    let mut number = vec![0u32; n];
    let mut parent = vec![0usize; n];
    let mut order: Vec<usize> = Vec::new();
    {
        let mut stack: Vec<(usize, bool)> = vec![(0, false)];
        let mut seen = vec![false; n];
        seen[0] = true;
        while let Some((i, expanded)) = stack.pop() {
            if expanded {
                order.push(i);
                number[i] = order.len() as u32;
                continue;
            }
            stack.push((i, true));
            if let Kind::Dir(ch) = &tree.nodes[i].kind {
                for &c in ch.values().rev() {
                    if !seen[c] {
                        seen[c] = true;
                        parent[c] = i;
                        stack.push((c, false));
                    }
                }
            }
        }
    }
    let inode_count = order.len() as u32;
    // Hard links: the number of directory entries naming each node.
    let mut links = vec![0u32; n];
    for node in &tree.nodes {
        if let Kind::Dir(ch) = &node.kind {
            for &c in ch.values() {
                links[c] += 1;
            }
        }
    }

    let mut inodes = MetaWriter::new(opts.level);
    let mut dirs = MetaWriter::new(opts.level);
    let mut ids: Vec<u32> = Vec::new();
    let mut id_index: HashMap<u32, u16> = HashMap::new();
    let mut id_of = |v: u32| -> Result<u16> {
        if let Some(&i) = id_index.get(&v) {
            return Ok(i);
        }
        if ids.len() >= 1 << 16 {
            bail!("more than 65536 distinct owners and groups");
        }
        let i = ids.len() as u16;
        ids.push(v);
        id_index.insert(v, i);
        Ok(i)
    };
    let mut xattr_kv = MetaWriter::new(opts.level);
    let mut xattr_ids: Vec<u8> = Vec::new();
    let mut xattr_sets: HashMap<Xattrs, u32> = HashMap::new();
    let mut xattr_of = |x: &Xattrs| -> Result<u32> {
        if x.is_empty() {
            return Ok(NO_XATTR);
        }
        if let Some(&i) = xattr_sets.get(x) {
            return Ok(i);
        }
        let (start, off, _) = xattr_kv.pos();
        let mut buf = Vec::new();
        for (k, v) in x {
            let (prefix, rest) = xattr_prefix(k).expect("checked when read");
            buf.extend_from_slice(&prefix.to_le_bytes());
            buf.extend_from_slice(&(rest.len() as u16).to_le_bytes());
            buf.extend_from_slice(rest);
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v);
        }
        xattr_kv.write(&buf)?;
        let i = (xattr_ids.len() / 16) as u32;
        xattr_ids.extend_from_slice(&((start << 16) | off as u64).to_le_bytes());
        xattr_ids.extend_from_slice(&(x.len() as u32).to_le_bytes());
        xattr_ids.extend_from_slice(&(buf.len() as u32).to_le_bytes());
        xattr_sets.insert(x.clone(), i);
        Ok(i)
    };
    // Inode reference (block start << 16 | offset) of every written node.
    let mut iref = vec![0u64; n];
    let bs = opts.block_size as u64;
    for &i in &order {
        let node = &tree.nodes[i];
        let btype = node.basic_type();
        let xattr = xattr_of(&node.meta.xattrs)?;
        let uid = id_of(node.meta.uid)?;
        let gid = id_of(node.meta.gid)?;
        let header = |t: u16| -> Vec<u8> {
            let mut b = Vec::with_capacity(64);
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&node.meta.mode.to_le_bytes());
            b.extend_from_slice(&uid.to_le_bytes());
            b.extend_from_slice(&gid.to_le_bytes());
            b.extend_from_slice(&node.meta.mtime.to_le_bytes());
            b.extend_from_slice(&number[i].to_le_bytes());
            b
        };
        let ext = xattr != NO_XATTR;
        let mut b;
        match &node.kind {
            Kind::Dir(children) => {
                let (list_start, list_off, list_pos) = dirs.pos();
                let (listing, heads) = dir_listing(children, &tree, &number, &iref, list_pos)?;
                dirs.write(&listing)?;
                let size = listing.len() as u64 + 3;
                let subdirs = children
                    .values()
                    .filter(|&&c| matches!(tree.nodes[c].kind, Kind::Dir(_)))
                    .count() as u32;
                let nlink = 2 + subdirs;
                let parent_no = if i == 0 { 0 } else { number[parent[i]] };
                if !ext && size <= 0xFFFF {
                    b = header(1);
                    b.extend_from_slice(&(list_start as u32).to_le_bytes());
                    b.extend_from_slice(&nlink.to_le_bytes());
                    b.extend_from_slice(&(size as u16).to_le_bytes());
                    b.extend_from_slice(&list_off.to_le_bytes());
                    b.extend_from_slice(&parent_no.to_le_bytes());
                } else {
                    // Index: each run that starts in a later metadata block than the one before.
                    let mut idx = Vec::new();
                    let mut count = 0u16;
                    let mut last_block = list_pos / META_SIZE as u64;
                    for (rel, name) in heads.iter().skip(1) {
                        let blk = (list_pos + *rel as u64) / META_SIZE as u64;
                        if blk == last_block {
                            continue;
                        }
                        last_block = blk;
                        idx.extend_from_slice(&rel.to_le_bytes());
                        idx.extend_from_slice(&(dirs.starts[blk as usize] as u32).to_le_bytes());
                        idx.extend_from_slice(&(name.len() as u32 - 1).to_le_bytes());
                        idx.extend_from_slice(name);
                        count += 1;
                    }
                    b = header(8);
                    b.extend_from_slice(&nlink.to_le_bytes());
                    b.extend_from_slice(&(size as u32).to_le_bytes());
                    b.extend_from_slice(&(list_start as u32).to_le_bytes());
                    b.extend_from_slice(&parent_no.to_le_bytes());
                    b.extend_from_slice(&count.to_le_bytes());
                    b.extend_from_slice(&list_off.to_le_bytes());
                    b.extend_from_slice(&xattr.to_le_bytes());
                    b.extend_from_slice(&idx);
                }
            }
            Kind::File(fd) => {
                let blocks =
                    &data_blocks[fd.first_block as usize..(fd.first_block + fd.nblocks) as usize];
                let start = blocks.first().map(|b| b.0).unwrap_or(0);
                let (frag, frag_off) = fd.frag.unwrap_or((NO_FRAGMENT, 0));
                let nlink = links[i];
                if !ext && nlink == 1 && start <= u32::MAX as u64 && fd.size <= u32::MAX as u64 {
                    b = header(2);
                    b.extend_from_slice(&(start as u32).to_le_bytes());
                    b.extend_from_slice(&frag.to_le_bytes());
                    b.extend_from_slice(&frag_off.to_le_bytes());
                    b.extend_from_slice(&(fd.size as u32).to_le_bytes());
                } else {
                    b = header(9);
                    b.extend_from_slice(&start.to_le_bytes());
                    b.extend_from_slice(&fd.size.to_le_bytes());
                    b.extend_from_slice(&0u64.to_le_bytes());
                    b.extend_from_slice(&nlink.to_le_bytes());
                    b.extend_from_slice(&frag.to_le_bytes());
                    b.extend_from_slice(&frag_off.to_le_bytes());
                    b.extend_from_slice(&xattr.to_le_bytes());
                }
                let mut expect = start;
                for &(off, size) in blocks {
                    debug_assert_eq!(off, expect, "a file's blocks are contiguous");
                    expect = off + (size & !BLOCK_UNCOMPRESSED) as u64;
                    b.extend_from_slice(&size.to_le_bytes());
                }
                debug_assert_eq!(fd.nblocks, fd.size / bs);
            }
            Kind::Symlink(target) => {
                b = header(if ext { 10 } else { 3 });
                b.extend_from_slice(&links[i].to_le_bytes());
                b.extend_from_slice(&(target.len() as u32).to_le_bytes());
                b.extend_from_slice(target);
                if ext {
                    b.extend_from_slice(&xattr.to_le_bytes());
                }
            }
            Kind::Dev { rdev, .. } => {
                b = header(if ext { btype + 7 } else { btype });
                b.extend_from_slice(&links[i].to_le_bytes());
                b.extend_from_slice(&rdev.to_le_bytes());
                if ext {
                    b.extend_from_slice(&xattr.to_le_bytes());
                }
            }
            Kind::Fifo => {
                b = header(if ext { btype + 7 } else { btype });
                b.extend_from_slice(&links[i].to_le_bytes());
                if ext {
                    b.extend_from_slice(&xattr.to_le_bytes());
                }
            }
        }
        let (start, off, _) = inodes.pos();
        iref[i] = (start << 16) | off as u64;
        inodes.write(&b)?;
    }
    let root_ref = iref[0];
    let (inode_bytes, _) = inodes.finish()?;
    let (dir_bytes, _) = dirs.finish()?;

    let mut pos = data_end;
    let inode_table = pos;
    w.write_all(&inode_bytes)?;
    pos += inode_bytes.len() as u64;
    let dir_table = pos;
    w.write_all(&dir_bytes)?;
    pos += dir_bytes.len() as u64;

    let frag_table = if fragments.is_empty() {
        NO_TABLE
    } else {
        let mut e = Vec::with_capacity(fragments.len() * 16);
        for &(off, size) in &fragments {
            e.extend_from_slice(&off.to_le_bytes());
            e.extend_from_slice(&size.to_le_bytes());
            e.extend_from_slice(&0u32.to_le_bytes());
        }
        let (bytes, list) = lookup_table(&e, pos, opts.level)?;
        w.write_all(&bytes)?;
        pos += bytes.len() as u64;
        list
    };

    let id_bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (bytes, id_table) = lookup_table(&id_bytes, pos, opts.level)?;
    w.write_all(&bytes)?;
    pos += bytes.len() as u64;

    let xattr_table = if xattr_ids.is_empty() {
        NO_TABLE
    } else {
        let (kv, _) = xattr_kv.finish()?;
        let kv_start = pos;
        w.write_all(&kv)?;
        pos += kv.len() as u64;
        let (bytes, list) = lookup_table(&xattr_ids, pos, opts.level)?;
        // The lookup table's blocks, then its header, then the block list.
        let blocks_len = (list - pos) as usize;
        w.write_all(&bytes[..blocks_len])?;
        pos += blocks_len as u64;
        let header_at = pos;
        w.write_all(&kv_start.to_le_bytes())?;
        w.write_all(&((xattr_ids.len() / 16) as u32).to_le_bytes())?;
        w.write_all(&0u32.to_le_bytes())?;
        w.write_all(&bytes[blocks_len..])?;
        pos += 16 + (bytes.len() - blocks_len) as u64;
        header_at
    };
    let bytes_used = pos;
    let pad = (4096 - bytes_used % 4096) % 4096;
    w.write_all(&vec![0u8; pad as usize])?;

    let mut flags = FLAG_COMP_OPTS | FLAG_DUPLICATES;
    if xattr_table == NO_TABLE {
        flags |= FLAG_NO_XATTRS;
    }
    let mut sb = Vec::with_capacity(SUPERBLOCK_SIZE as usize);
    sb.extend_from_slice(&MAGIC.to_le_bytes());
    sb.extend_from_slice(&inode_count.to_le_bytes());
    sb.extend_from_slice(&opts.mtime.to_le_bytes());
    sb.extend_from_slice(&opts.block_size.to_le_bytes());
    sb.extend_from_slice(&(fragments.len() as u32).to_le_bytes());
    sb.extend_from_slice(&ZSTD_ID.to_le_bytes());
    sb.extend_from_slice(&(opts.block_size.trailing_zeros() as u16).to_le_bytes());
    sb.extend_from_slice(&flags.to_le_bytes());
    sb.extend_from_slice(&(ids.len() as u16).to_le_bytes());
    sb.extend_from_slice(&4u16.to_le_bytes());
    sb.extend_from_slice(&0u16.to_le_bytes());
    sb.extend_from_slice(&root_ref.to_le_bytes());
    sb.extend_from_slice(&bytes_used.to_le_bytes());
    sb.extend_from_slice(&id_table.to_le_bytes());
    sb.extend_from_slice(&xattr_table.to_le_bytes());
    sb.extend_from_slice(&inode_table.to_le_bytes());
    sb.extend_from_slice(&dir_table.to_le_bytes());
    sb.extend_from_slice(&frag_table.to_le_bytes());
    sb.extend_from_slice(&NO_TABLE.to_le_bytes());
    debug_assert_eq!(sb.len() as u64, SUPERBLOCK_SIZE);
    let mut f = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", out.display()))?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&sb)
        .with_context(|| format!("writing {}", out.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", out.display()))?;
    stats.inodes = inode_count;
    stats.bytes = bytes_used + pad;
    let mut index = index;
    index.image_size = bytes_used + pad;
    Ok(Written { stats, index })
}

/// A directory's listing: runs of entries, each after a header, a new run at most every 256
/// entries, when the inode block changes, when the inode number is out of reach of the run's
/// base, or when the listing crosses into the next metadata block (`pos` = the uncompressed
/// position where the listing starts). Returns the bytes and each run's (offset, first name).
fn dir_listing(
    children: &BTreeMap<Vec<u8>, usize>,
    tree: &Tree,
    number: &[u32],
    iref: &[u64],
    pos: u64,
) -> Result<(Vec<u8>, Runs)> {
    let mut out = Vec::new();
    let mut heads = Vec::new();
    let mut run: Option<(usize, u32, u64, u32, u64)> = None; // (header at, count, block, base, meta block)
    for (name, &c) in children {
        let block = iref[c] >> 16;
        let offset = (iref[c] & 0xFFFF) as u16;
        let no = number[c];
        let here_block = (pos + out.len() as u64) / META_SIZE as u64;
        let new_run = match run {
            None => true,
            Some((_, count, blk, base, mblk)) => {
                count == 256
                    || blk != block
                    || (no as i64 - base as i64).abs() > i16::MAX as i64
                    || mblk != here_block
            }
        };
        if new_run {
            if let Some((at, count, ..)) = run {
                out[at..at + 4].copy_from_slice(&(count - 1).to_le_bytes());
            }
            let at = out.len();
            heads.push((at as u32, name.clone()));
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(block as u32).to_le_bytes());
            out.extend_from_slice(&no.to_le_bytes());
            run = Some((at, 0, block, no, here_block));
        }
        let r = run.as_mut().expect("a run is open");
        r.1 += 1;
        let btype = tree.nodes[c].basic_type();
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&((no as i64 - r.3 as i64) as i16).to_le_bytes());
        out.extend_from_slice(&btype.to_le_bytes());
        out.extend_from_slice(&(name.len() as u16 - 1).to_le_bytes());
        out.extend_from_slice(name);
    }
    if let Some((at, count, ..)) = run {
        out[at..at + 4].copy_from_slice(&(count - 1).to_le_bytes());
    }
    Ok((out, heads))
}
