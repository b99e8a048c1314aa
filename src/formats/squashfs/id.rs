//! The id table: every distinct uid and gid once, in the order the inodes first use them; an
//! inode holds indexes into it.

use super::meta::lookup_table;
use anyhow::{bail, Result};
use std::collections::HashMap;

#[derive(Default)]
pub(super) struct IdTable {
    ids: Vec<u32>,
    index: HashMap<u32, u16>,
}

impl IdTable {
    /// The index of the uid or gid `v` (added if new).
    pub(super) fn index_of(&mut self, v: u32) -> Result<u16> {
        if let Some(&i) = self.index.get(&v) {
            return Ok(i);
        }
        if self.ids.len() >= 1 << 16 {
            bail!("more than 65536 distinct owners and groups");
        }
        let i = self.ids.len() as u16;
        self.ids.push(v);
        self.index.insert(v, i);
        Ok(i)
    }

    /// Number of ids, as the superblock counts them.
    pub(super) fn count(&self) -> u16 {
        self.ids.len() as u16
    }

    /// The table's bytes at `at`, and the location of its block list.
    pub(super) fn table(&self, at: u64, level: i32) -> Result<(Vec<u8>, u64)> {
        let bytes: Vec<u8> = self.ids.iter().flat_map(|v| v.to_le_bytes()).collect();
        lookup_table(&bytes, at, level)
    }
}
