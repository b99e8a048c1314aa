//! Data and fragment blocks, written in tar order while the tar is read: each full block of a
//! file compressed on its own (or stored raw when zstd does not make it smaller), tail ends
//! packed into shared fragment blocks, identical files and tail ends stored once, and every
//! block copied from an earlier image instead of compressed again when the reuse index has it.

use super::{reuse_params, Options, Stats};
use crate::formats::reuse::{Index, Reuse, Stored};
use crate::sys::util;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs;
use std::io::{BufWriter, Read, Write};

/// Size field bit: the block is stored uncompressed.
pub(super) const BLOCK_UNCOMPRESSED: u32 = 1 << 24;
/// Blocks compressed together (in parallel) before they are written in order.
const BATCH_BLOCKS: usize = 32;
/// A fragment block is cut after a tail whose key has this many low zero bits (one tail in 32)
/// once it holds a quarter of a block, not only when the next tail does not fit: where blocks
/// end depends on the tails themselves, so an edit to one small file changes its own fragment
/// block and the blocks after it come out byte-identical (what `root.pieces` lets an update
/// skip) instead of every later tail moving by the size difference.
const FRAGMENT_CUT_MASK: u8 = 0x1f;

/// Where a regular file's data is.
#[derive(Debug, Clone)]
pub(super) struct FileData {
    pub(super) size: u64,
    /// First data block (sequence number among data blocks) and number of full blocks.
    pub(super) first_block: u64,
    pub(super) nblocks: u64,
    /// Fragment index and offset of the tail end.
    pub(super) frag: Option<(u32, u32)>,
}

enum JobKind {
    Data(u64),
    Fragment(u32),
}

struct Job {
    kind: JobKind,
    key: [u8; 32],
    data: Vec<u8>,
}

pub(super) struct DataWriter<'a> {
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

/// What the data blocks left for the tables after them.
pub(super) struct Data {
    /// The image, positioned after the last block.
    pub(super) out: BufWriter<fs::File>,
    /// Where the last block ends.
    pub(super) end: u64,
    /// Offset and size field of every data block, by sequence number.
    pub(super) data_blocks: Vec<(u64, u32)>,
    /// Offset and size field of every fragment block.
    pub(super) fragments: Vec<(u64, u32)>,
    pub(super) index: Index,
    pub(super) stats: Stats,
}

impl<'a> DataWriter<'a> {
    /// Blocks written to `out` from `pos` on.
    pub(super) fn new(
        out: BufWriter<fs::File>,
        pos: u64,
        opts: &'a Options,
        reuse: &'a mut Reuse,
    ) -> Self {
        DataWriter {
            out,
            pos,
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
        }
    }

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
        if self.frag_buf.len() >= self.opts.block_size as usize / 4
            && key[0] & FRAGMENT_CUT_MASK == 0
        {
            self.flush_fragment()?;
        }
        Ok(at)
    }

    /// Stores a regular file's data read from `r`.
    pub(super) fn add_file(&mut self, r: &mut impl Read, size: u64) -> Result<FileData> {
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

    /// Writes the last fragment and the blocks still pending.
    pub(super) fn finish(mut self) -> Result<Data> {
        self.flush_fragment()?;
        self.flush()?;
        Ok(Data {
            out: self.out,
            end: self.pos,
            data_blocks: self.data_blocks,
            fragments: self.fragments,
            index: self.index,
            stats: self.stats,
        })
    }
}
