//! The directory table: each directory's listing, sorted by name, in runs of entries that share
//! a header (inode block, base inode number); and the index a large directory's inode carries,
//! of the runs that start in a later metadata block.

use super::meta::META_SIZE;
use super::tree::Tree;
use anyhow::Result;
use std::collections::BTreeMap;

/// Where each run of a directory listing starts, and its first name.
pub(super) type Runs = Vec<(u32, Vec<u8>)>;

/// A directory's listing: runs of entries, each after a header, a new run at most every 256
/// entries, when the inode block changes, when the inode number is out of reach of the run's
/// base, or when the listing crosses into the next metadata block (`pos` = the uncompressed
/// position where the listing starts). Returns the bytes and each run's (offset, first name).
pub(super) fn listing(
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

/// The directory index of a listing that starts at uncompressed position `list_pos` of the
/// directory table (whose blocks start at `starts`), from its runs `heads`: each run that
/// starts in a later metadata block than the one before. Returns the bytes and the count.
pub(super) fn index(heads: &Runs, list_pos: u64, starts: &[u64]) -> (Vec<u8>, u16) {
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
        idx.extend_from_slice(&(starts[blk as usize] as u32).to_le_bytes());
        idx.extend_from_slice(&(name.len() as u32 - 1).to_le_bytes());
        idx.extend_from_slice(name);
        count += 1;
    }
    (idx, count)
}
