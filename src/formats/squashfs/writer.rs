//! Writing an image, phase by phase: the tree read from the tar with the data blocks written as
//! it is read, then the metadata tables, then the superblock at the start.

use super::data::{Data, DataWriter};
use super::inode::{self, Inodes};
use super::superblock::{self, Superblock};
use super::{fragment, tree, Options, Written};
use crate::formats::reuse::Reuse;
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

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
    let data_start = superblock::write_head(&mut w, opts.level)?;

    let mut dw = DataWriter::new(w, data_start, opts, reuse);
    let tree = tree::read_tar(input, tar, opts.mtime, &mut dw)?;
    let mut data = dw.finish()?;

    let inodes = inode::write_tables(&tree, &data.data_blocks, opts.block_size, opts.level)?;
    let sb = write_tables(&mut data, inodes, opts)?;

    let pad = (4096 - sb.bytes_used % 4096) % 4096;
    data.out.write_all(&vec![0u8; pad as usize])?;
    let mut f = data
        .out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", out.display()))?;
    f.seek(SeekFrom::Start(0))?;
    f.write_all(&sb.bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", out.display()))?;
    let mut stats = data.stats;
    stats.inodes = sb.inode_count;
    stats.bytes = sb.bytes_used + pad;
    let mut index = data.index;
    index.image_size = sb.bytes_used + pad;
    Ok(Written { stats, index })
}

/// Writes the metadata tables after the data blocks — inode, directory, fragment, id, xattr —
/// and returns the superblock that points at them.
fn write_tables(data: &mut Data, inodes: Inodes, opts: &Options) -> Result<Superblock> {
    let mut t = Tables {
        w: &mut data.out,
        pos: data.end,
    };
    let inode_table = t.put(&inodes.inode_table)?;
    let dir_table = t.put(&inodes.dir_table)?;
    let (bytes, frag_table) = fragment::table(&data.fragments, t.pos, opts.level)?;
    t.put(&bytes)?;
    let (bytes, id_table) = inodes.ids.table(t.pos, opts.level)?;
    t.put(&bytes)?;
    let id_count = inodes.ids.count();
    let (bytes, xattr_table) = inodes.xattrs.table(t.pos, opts.level)?;
    t.put(&bytes)?;
    Ok(Superblock {
        inode_count: inodes.count,
        mtime: opts.mtime,
        block_size: opts.block_size,
        fragment_count: data.fragments.len() as u32,
        id_count,
        root_ref: inodes.root_ref,
        bytes_used: t.pos,
        id_table,
        xattr_table,
        inode_table,
        dir_table,
        frag_table,
    })
}

/// The image after the data blocks, and where the next table goes.
struct Tables<'a> {
    w: &'a mut BufWriter<fs::File>,
    pos: u64,
}

impl Tables<'_> {
    /// Appends `bytes`; returns where they start.
    fn put(&mut self, bytes: &[u8]) -> Result<u64> {
        let at = self.pos;
        self.w.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(at)
    }
}
