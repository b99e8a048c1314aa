//! The inode table: one inode per node, numbered and written in post-order (children, sorted by
//! name, before their directory), so a directory's listing — written to the directory table
//! when its inode is — knows where its children's inodes are. Basic inodes where they suffice,
//! extended ones for xattrs, hard links, large files and directories that need an index.

use super::data::{FileData, BLOCK_UNCOMPRESSED};
use super::dir;
use super::fragment::NO_FRAGMENT;
use super::id::IdTable;
use super::meta::MetaWriter;
use super::tree::{Kind, Tree};
use super::xattr::{XattrTable, NO_XATTR};
use anyhow::Result;
use std::collections::BTreeMap;

/// The nodes in inode order, with their inode numbers and link counts.
struct Numbering {
    /// Post-order: children (sorted by name) before their directory; hard-linked nodes once.
    order: Vec<usize>,
    /// Inode number of every node (from 1).
    number: Vec<u32>,
    /// The directory each node was first reached from.
    parent: Vec<usize>,
    /// Hard links: the number of directory entries naming each node.
    links: Vec<u32>,
}

impl Numbering {
    fn of(tree: &Tree) -> Numbering {
        let n = tree.nodes.len();
        let mut number = vec![0u32; n];
        let mut parent = vec![0usize; n];
        let mut order: Vec<usize> = Vec::new();
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
        let mut links = vec![0u32; n];
        for node in &tree.nodes {
            if let Kind::Dir(ch) = &node.kind {
                for &c in ch.values() {
                    links[c] += 1;
                }
            }
        }
        Numbering {
            order,
            number,
            parent,
            links,
        }
    }
}

/// The inode and directory tables, and the tables their inodes refer to.
pub(super) struct Inodes {
    pub(super) count: u32,
    /// Inode reference of the root directory.
    pub(super) root_ref: u64,
    pub(super) inode_table: Vec<u8>,
    pub(super) dir_table: Vec<u8>,
    pub(super) ids: IdTable,
    pub(super) xattrs: XattrTable,
}

/// Writes the inode and directory tables of `tree`, whose files' data blocks are at
/// `data_blocks` (offset, size field, by sequence number).
pub(super) fn write_tables(
    tree: &Tree,
    data_blocks: &[(u64, u32)],
    block_size: u32,
    level: i32,
) -> Result<Inodes> {
    let n = Numbering::of(tree);
    let mut w = InodeWriter {
        tree,
        n: &n,
        data_blocks,
        block_size: block_size as u64,
        inodes: MetaWriter::new(level),
        dirs: MetaWriter::new(level),
        ids: IdTable::default(),
        xattrs: XattrTable::new(level),
        iref: vec![0u64; tree.nodes.len()],
    };
    for &i in &n.order {
        let b = w.inode(i)?;
        let (start, off, _) = w.inodes.pos();
        w.iref[i] = (start << 16) | off as u64;
        w.inodes.write(&b)?;
    }
    let root_ref = w.iref[0];
    let (inode_table, _) = w.inodes.finish()?;
    let (dir_table, _) = w.dirs.finish()?;
    Ok(Inodes {
        count: n.order.len() as u32,
        root_ref,
        inode_table,
        dir_table,
        ids: w.ids,
        xattrs: w.xattrs,
    })
}

struct InodeWriter<'a> {
    tree: &'a Tree,
    n: &'a Numbering,
    data_blocks: &'a [(u64, u32)],
    block_size: u64,
    inodes: MetaWriter,
    dirs: MetaWriter,
    ids: IdTable,
    xattrs: XattrTable,
    /// Inode reference (block start << 16 | offset) of every written node.
    iref: Vec<u64>,
}

/// The fields every inode starts with.
struct Header {
    mode: u16,
    uid: u16,
    gid: u16,
    mtime: u32,
    number: u32,
}

impl Header {
    /// The header of an inode of type `t`, to be followed by the type's fields.
    fn start(&self, t: u16) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.extend_from_slice(&t.to_le_bytes());
        b.extend_from_slice(&self.mode.to_le_bytes());
        b.extend_from_slice(&self.uid.to_le_bytes());
        b.extend_from_slice(&self.gid.to_le_bytes());
        b.extend_from_slice(&self.mtime.to_le_bytes());
        b.extend_from_slice(&self.number.to_le_bytes());
        b
    }
}

impl InodeWriter<'_> {
    /// The inode of node `i` (a directory's listing written to the directory table).
    fn inode(&mut self, i: usize) -> Result<Vec<u8>> {
        let (tree, n) = (self.tree, self.n);
        let node = &tree.nodes[i];
        let btype = node.basic_type();
        let xattr = self.xattrs.index_of(&node.meta.xattrs)?;
        let h = Header {
            mode: node.meta.mode,
            uid: self.ids.index_of(node.meta.uid)?,
            gid: self.ids.index_of(node.meta.gid)?,
            mtime: node.meta.mtime,
            number: n.number[i],
        };
        let ext = xattr != NO_XATTR;
        let links = n.links[i];
        let mut b;
        match &node.kind {
            Kind::Dir(children) => b = self.dir_inode(i, children, &h, xattr)?,
            Kind::File(fd) => b = self.file_inode(fd, links, &h, xattr),
            Kind::Symlink(target) => {
                b = h.start(if ext { 10 } else { 3 });
                b.extend_from_slice(&links.to_le_bytes());
                b.extend_from_slice(&(target.len() as u32).to_le_bytes());
                b.extend_from_slice(target);
                if ext {
                    b.extend_from_slice(&xattr.to_le_bytes());
                }
            }
            Kind::Dev { rdev, .. } => {
                b = h.start(if ext { btype + 7 } else { btype });
                b.extend_from_slice(&links.to_le_bytes());
                b.extend_from_slice(&rdev.to_le_bytes());
                if ext {
                    b.extend_from_slice(&xattr.to_le_bytes());
                }
            }
            Kind::Fifo => {
                b = h.start(if ext { btype + 7 } else { btype });
                b.extend_from_slice(&links.to_le_bytes());
                if ext {
                    b.extend_from_slice(&xattr.to_le_bytes());
                }
            }
        }
        Ok(b)
    }

    /// A directory's inode, after writing its listing to the directory table.
    fn dir_inode(
        &mut self,
        i: usize,
        children: &BTreeMap<Vec<u8>, usize>,
        h: &Header,
        xattr: u32,
    ) -> Result<Vec<u8>> {
        let (list_start, list_off, list_pos) = self.dirs.pos();
        let (listing, heads) =
            dir::listing(children, self.tree, &self.n.number, &self.iref, list_pos)?;
        self.dirs.write(&listing)?;
        let size = listing.len() as u64 + 3;
        let subdirs = children
            .values()
            .filter(|&&c| matches!(self.tree.nodes[c].kind, Kind::Dir(_)))
            .count() as u32;
        let nlink = 2 + subdirs;
        let parent_no = if i == 0 {
            0
        } else {
            self.n.number[self.n.parent[i]]
        };
        let mut b;
        if xattr == NO_XATTR && size <= 0xFFFF {
            b = h.start(1);
            b.extend_from_slice(&(list_start as u32).to_le_bytes());
            b.extend_from_slice(&nlink.to_le_bytes());
            b.extend_from_slice(&(size as u16).to_le_bytes());
            b.extend_from_slice(&list_off.to_le_bytes());
            b.extend_from_slice(&parent_no.to_le_bytes());
        } else {
            let (idx, count) = dir::index(&heads, list_pos, &self.dirs.starts);
            b = h.start(8);
            b.extend_from_slice(&nlink.to_le_bytes());
            b.extend_from_slice(&(size as u32).to_le_bytes());
            b.extend_from_slice(&(list_start as u32).to_le_bytes());
            b.extend_from_slice(&parent_no.to_le_bytes());
            b.extend_from_slice(&count.to_le_bytes());
            b.extend_from_slice(&list_off.to_le_bytes());
            b.extend_from_slice(&xattr.to_le_bytes());
            b.extend_from_slice(&idx);
        }
        Ok(b)
    }

    /// A regular file's inode: where its blocks start, their size fields, its tail end.
    fn file_inode(&self, fd: &FileData, nlink: u32, h: &Header, xattr: u32) -> Vec<u8> {
        let blocks =
            &self.data_blocks[fd.first_block as usize..(fd.first_block + fd.nblocks) as usize];
        let start = blocks.first().map(|b| b.0).unwrap_or(0);
        let (frag, frag_off) = fd.frag.unwrap_or((NO_FRAGMENT, 0));
        let mut b;
        if xattr == NO_XATTR && nlink == 1 && start <= u32::MAX as u64 && fd.size <= u32::MAX as u64
        {
            b = h.start(2);
            b.extend_from_slice(&(start as u32).to_le_bytes());
            b.extend_from_slice(&frag.to_le_bytes());
            b.extend_from_slice(&frag_off.to_le_bytes());
            b.extend_from_slice(&(fd.size as u32).to_le_bytes());
        } else {
            b = h.start(9);
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
        debug_assert_eq!(fd.nblocks, fd.size / self.block_size);
        b
    }
}
