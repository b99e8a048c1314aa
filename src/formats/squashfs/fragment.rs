//! The fragment table: where each fragment block is and its size field.

use super::meta::lookup_table;
use super::superblock::NO_TABLE;
use anyhow::Result;

/// Inode field: the file has no tail end in a fragment.
pub(super) const NO_FRAGMENT: u32 = 0xFFFF_FFFF;

/// The table of `fragments` (offset, size field) at `at`, and the location of its block list
/// ([`NO_TABLE`] and nothing when there are no fragments).
pub(super) fn table(fragments: &[(u64, u32)], at: u64, level: i32) -> Result<(Vec<u8>, u64)> {
    if fragments.is_empty() {
        return Ok((Vec::new(), NO_TABLE));
    }
    let mut e = Vec::with_capacity(fragments.len() * 16);
    for &(off, size) in fragments {
        e.extend_from_slice(&off.to_le_bytes());
        e.extend_from_slice(&size.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
    }
    lookup_table(&e, at, level)
}
