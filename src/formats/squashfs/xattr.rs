//! The xattr table: the key/value metadata blocks (each distinct set of a node's xattrs once),
//! then the lookup table of the sets (where each starts, how many, how long), with its header
//! between the lookup blocks and their location list.

use super::meta::{lookup_table, MetaWriter};
use super::superblock::NO_TABLE;
use anyhow::Result;
use std::collections::HashMap;

/// A node's extended attributes, sorted: (full name, value).
pub(super) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Inode field: the node has no xattrs.
pub(super) const NO_XATTR: u32 = 0xFFFF_FFFF;

/// The namespace id (user., trusted., security.) of an xattr name and the rest of the name;
/// `None` for namespaces squashfs cannot store.
pub(super) fn xattr_prefix(key: &[u8]) -> Option<(u16, &[u8])> {
    for (id, p) in [(0u16, &b"user."[..]), (1, b"trusted."), (2, b"security.")] {
        if let Some(rest) = key.strip_prefix(p) {
            return Some((id, rest));
        }
    }
    None
}

pub(super) struct XattrTable {
    kv: MetaWriter,
    /// Lookup entries: (key/value reference, count, size) of every set.
    ids: Vec<u8>,
    sets: HashMap<Xattrs, u32>,
}

impl XattrTable {
    pub(super) fn new(level: i32) -> Self {
        XattrTable {
            kv: MetaWriter::new(level),
            ids: Vec::new(),
            sets: HashMap::new(),
        }
    }

    /// The inode's xattr index of the set `x` (added if new; [`NO_XATTR`] when empty).
    pub(super) fn index_of(&mut self, x: &Xattrs) -> Result<u32> {
        if x.is_empty() {
            return Ok(NO_XATTR);
        }
        if let Some(&i) = self.sets.get(x) {
            return Ok(i);
        }
        let (start, off, _) = self.kv.pos();
        let mut buf = Vec::new();
        for (k, v) in x {
            let (prefix, rest) = xattr_prefix(k).expect("checked when read");
            buf.extend_from_slice(&prefix.to_le_bytes());
            buf.extend_from_slice(&(rest.len() as u16).to_le_bytes());
            buf.extend_from_slice(rest);
            buf.extend_from_slice(&(v.len() as u32).to_le_bytes());
            buf.extend_from_slice(v);
        }
        self.kv.write(&buf)?;
        let i = (self.ids.len() / 16) as u32;
        self.ids
            .extend_from_slice(&((start << 16) | off as u64).to_le_bytes());
        self.ids.extend_from_slice(&(x.len() as u32).to_le_bytes());
        self.ids
            .extend_from_slice(&(buf.len() as u32).to_le_bytes());
        self.sets.insert(x.clone(), i);
        Ok(i)
    }

    /// The table's bytes at `at`, and the location of its header ([`NO_TABLE`] and nothing
    /// when no node has xattrs).
    pub(super) fn table(self, at: u64, level: i32) -> Result<(Vec<u8>, u64)> {
        if self.ids.is_empty() {
            return Ok((Vec::new(), NO_TABLE));
        }
        let (mut out, _) = self.kv.finish()?;
        let kv_start = at;
        let pos = at + out.len() as u64;
        let (bytes, list) = lookup_table(&self.ids, pos, level)?;
        // The lookup table's blocks, then its header, then the block list.
        let blocks_len = (list - pos) as usize;
        out.extend_from_slice(&bytes[..blocks_len]);
        let header_at = pos + blocks_len as u64;
        out.extend_from_slice(&kv_start.to_le_bytes());
        out.extend_from_slice(&((self.ids.len() / 16) as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&bytes[blocks_len..]);
        Ok((out, header_at))
    }
}
