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
//!
//! One file per part of the image, in the order [`write_from_tar`] (`writer.rs`) writes them:
//! the tree read from the tar (`tree.rs`), data and fragment blocks written while the tar is
//! read (`data.rs`), then the metadata tables made of metadata blocks (`meta.rs`) — inode
//! (`inode.rs`), directory (`dir.rs`), fragment (`fragment.rs`), id (`id.rs`) and xattr
//! (`xattr.rs`) — and last the superblock at the start (`superblock.rs`).

mod data;
mod dir;
mod fragment;
mod id;
mod inode;
mod meta;
mod superblock;
mod tree;
mod writer;
mod xattr;

use super::reuse::Index;
use serde::Serialize;

pub use writer::write_from_tar;

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

/// Settings that decide a block's stored bytes: indexes written with others are not used.
pub fn reuse_params(opts: &Options) -> String {
    format!(
        "squashfs block_size={} zstd_level={}",
        opts.block_size, opts.level
    )
}

/// The block index of a written image, to be saved with [`Index::save`] once the image has its
/// final path.
pub struct Written {
    pub stats: Stats,
    pub index: Index,
}
