//! The superblock (the first 96 bytes, written last, once every table's location is known) and
//! the zstd options block that follows it.

use super::meta::META_UNCOMPRESSED;
use anyhow::Result;
use std::io::Write;

const MAGIC: u32 = 0x7371_7368;
const SUPERBLOCK_SIZE: u64 = 96;
const ZSTD_ID: u16 = 6;
const FLAG_DUPLICATES: u16 = 0x0040;
const FLAG_NO_XATTRS: u16 = 0x0200;
const FLAG_COMP_OPTS: u16 = 0x0400;
/// Location of a table the image does not have.
pub(super) const NO_TABLE: u64 = 0xFFFF_FFFF_FFFF_FFFF;

/// Room for the superblock, then the zstd options (the level) in one uncompressed metadata
/// block. Returns where the data blocks start.
pub(super) fn write_head(w: &mut impl Write, level: i32) -> Result<u64> {
    w.write_all(&[0u8; SUPERBLOCK_SIZE as usize])?;
    w.write_all(&(4u16 | META_UNCOMPRESSED).to_le_bytes())?;
    w.write_all(&(level as u32).to_le_bytes())?;
    Ok(SUPERBLOCK_SIZE + 6)
}

/// What the superblock records.
pub(super) struct Superblock {
    pub(super) inode_count: u32,
    pub(super) mtime: u32,
    pub(super) block_size: u32,
    pub(super) fragment_count: u32,
    pub(super) id_count: u16,
    /// Inode reference of the root directory.
    pub(super) root_ref: u64,
    pub(super) bytes_used: u64,
    pub(super) id_table: u64,
    pub(super) xattr_table: u64,
    pub(super) inode_table: u64,
    pub(super) dir_table: u64,
    pub(super) frag_table: u64,
}

impl Superblock {
    pub(super) fn bytes(&self) -> Vec<u8> {
        let mut flags = FLAG_COMP_OPTS | FLAG_DUPLICATES;
        if self.xattr_table == NO_TABLE {
            flags |= FLAG_NO_XATTRS;
        }
        let mut sb = Vec::with_capacity(SUPERBLOCK_SIZE as usize);
        sb.extend_from_slice(&MAGIC.to_le_bytes());
        sb.extend_from_slice(&self.inode_count.to_le_bytes());
        sb.extend_from_slice(&self.mtime.to_le_bytes());
        sb.extend_from_slice(&self.block_size.to_le_bytes());
        sb.extend_from_slice(&self.fragment_count.to_le_bytes());
        sb.extend_from_slice(&ZSTD_ID.to_le_bytes());
        sb.extend_from_slice(&(self.block_size.trailing_zeros() as u16).to_le_bytes());
        sb.extend_from_slice(&flags.to_le_bytes());
        sb.extend_from_slice(&self.id_count.to_le_bytes());
        // Version 4.0.
        sb.extend_from_slice(&4u16.to_le_bytes());
        sb.extend_from_slice(&0u16.to_le_bytes());
        sb.extend_from_slice(&self.root_ref.to_le_bytes());
        sb.extend_from_slice(&self.bytes_used.to_le_bytes());
        sb.extend_from_slice(&self.id_table.to_le_bytes());
        sb.extend_from_slice(&self.xattr_table.to_le_bytes());
        sb.extend_from_slice(&self.inode_table.to_le_bytes());
        sb.extend_from_slice(&self.dir_table.to_le_bytes());
        sb.extend_from_slice(&self.frag_table.to_le_bytes());
        // No export table.
        sb.extend_from_slice(&NO_TABLE.to_le_bytes());
        debug_assert_eq!(sb.len() as u64, SUPERBLOCK_SIZE);
        sb
    }
}
