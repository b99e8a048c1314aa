//! Metadata blocks: the 8 KiB units (each compressed on its own, after a 2-byte header) that
//! every table is made of, and the lookup tables (fragments, ids, xattr ids) that list where
//! their blocks are.

use anyhow::Result;

/// Uncompressed size of a full metadata block.
pub(super) const META_SIZE: usize = 8192;
/// Header bit: the block is stored uncompressed.
pub(super) const META_UNCOMPRESSED: u16 = 0x8000;

pub(super) struct MetaWriter {
    level: i32,
    out: Vec<u8>,
    cur: Vec<u8>,
    /// On-disk start (relative to the table) of every block begun so far.
    pub(super) starts: Vec<u64>,
}

impl MetaWriter {
    pub(super) fn new(level: i32) -> Self {
        MetaWriter {
            level,
            out: Vec::new(),
            cur: Vec::with_capacity(META_SIZE),
            starts: vec![0],
        }
    }

    /// (on-disk start of the current block, offset in it), and the uncompressed position.
    pub(super) fn pos(&self) -> (u64, u16, u64) {
        (
            *self.starts.last().unwrap(),
            self.cur.len() as u16,
            (self.starts.len() as u64 - 1) * META_SIZE as u64 + self.cur.len() as u64,
        )
    }

    pub(super) fn write(&mut self, mut b: &[u8]) -> Result<()> {
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
    pub(super) fn finish(mut self) -> Result<(Vec<u8>, Vec<u64>)> {
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
pub(super) fn lookup_table(entries: &[u8], at: u64, level: i32) -> Result<(Vec<u8>, u64)> {
    let mut m = MetaWriter::new(level);
    m.write(entries)?;
    let (mut out, starts) = m.finish()?;
    let list_at = at + out.len() as u64;
    for s in starts {
        out.extend_from_slice(&(at + s).to_le_bytes());
    }
    Ok((out, list_at))
}
