//! The tree read from the tar: every node with its metadata, directories with their entries by
//! name, hard links as further entries naming the same node. Regular files' data goes to the
//! data blocks as it is read; the tree keeps where it went.

use super::data::{DataWriter, FileData};
use super::xattr::{xattr_prefix, Xattrs};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

#[derive(Debug, Clone)]
pub(super) struct Meta {
    /// Permission bits only.
    pub(super) mode: u16,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mtime: u32,
    pub(super) xattrs: Xattrs,
}

#[derive(Debug)]
pub(super) enum Kind {
    Dir(BTreeMap<Vec<u8>, usize>),
    File(FileData),
    Symlink(Vec<u8>),
    Dev { block: bool, rdev: u32 },
    Fifo,
}

#[derive(Debug)]
pub(super) struct Node {
    pub(super) meta: Meta,
    pub(super) kind: Kind,
}

impl Node {
    /// Basic inode type (1..=6; the mode field holds only the permission bits).
    pub(super) fn basic_type(&self) -> u16 {
        match self.kind {
            Kind::Dir(_) => 1,
            Kind::File(_) => 2,
            Kind::Symlink(_) => 3,
            Kind::Dev { block: true, .. } => 4,
            Kind::Dev { block: false, .. } => 5,
            Kind::Fifo => 6,
        }
    }
}

pub(super) struct Tree {
    /// Node 0 is the root.
    pub(super) nodes: Vec<Node>,
    default_dir: Meta,
}

/// Reads the tar `input` (named `tar` in errors) into a tree, the data of its regular files
/// into `data`. Directories the tar implies but does not list get mode 0755, owner 0 and `mtime`.
pub(super) fn read_tar(
    input: fs::File,
    tar: &Path,
    mtime: u32,
    data: &mut DataWriter,
) -> Result<Tree> {
    let mut tree = Tree::new(mtime);
    let mut ar = tar::Archive::new(std::io::BufReader::with_capacity(1 << 20, input));
    for e in ar
        .entries()
        .with_context(|| format!("reading {}", tar.display()))?
    {
        let mut e = e.with_context(|| format!("reading {}", tar.display()))?;
        tree.add_entry(&mut e, tar, data)?;
    }
    Ok(tree)
}

fn split_path(p: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut v = Vec::new();
    for c in p.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => bail!("path with '..': {}", String::from_utf8_lossy(p)),
            c if c.len() > 256 => bail!(
                "file name longer than 256 bytes (the squashfs limit): {}",
                String::from_utf8_lossy(p)
            ),
            c => v.push(c.to_vec()),
        }
    }
    Ok(v)
}

/// The entry's xattrs (pax `SCHILY.xattr.*`), sorted; `at` names the entry in errors.
fn entry_xattrs<R: std::io::Read>(
    e: &mut tar::Entry<R>,
    at: &impl Fn() -> String,
) -> Result<Xattrs> {
    let mut xattrs: Xattrs = Vec::new();
    if let Some(exts) = e.pax_extensions().with_context(at)? {
        for ext in exts {
            let ext = ext.with_context(at)?;
            if let Some(k) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                if xattr_prefix(k).is_none() {
                    bail!(
                        "{}: xattr {} has a namespace squashfs cannot store (user., trusted., security. only)",
                        at(),
                        String::from_utf8_lossy(k)
                    );
                }
                xattrs.push((k.to_vec(), ext.value_bytes().to_vec()));
            }
        }
    }
    xattrs.sort();
    Ok(xattrs)
}

/// The node kind of entry `e` (a regular file's data stored in `data`); `at` names the entry
/// in errors.
fn entry_kind<R: std::io::Read>(
    e: &mut tar::Entry<R>,
    h: &tar::Header,
    data: &mut DataWriter,
    at: &impl Fn() -> String,
) -> Result<Kind> {
    let dev = || -> Result<u32> {
        let major = h.device_major()?.unwrap_or(0);
        let minor = h.device_minor()?.unwrap_or(0);
        Ok((minor & 0xff) | (major << 8) | ((minor & !0xff) << 12))
    };
    Ok(match h.entry_type() {
        tar::EntryType::Directory => Kind::Dir(BTreeMap::new()),
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            let size = e.size();
            Kind::File(data.add_file(e, size).with_context(at)?)
        }
        tar::EntryType::Symlink => {
            let t = e.link_name_bytes().with_context(at)?;
            Kind::Symlink(t.into_owned())
        }
        tar::EntryType::Char => Kind::Dev {
            block: false,
            rdev: dev().with_context(at)?,
        },
        tar::EntryType::Block => Kind::Dev {
            block: true,
            rdev: dev().with_context(at)?,
        },
        tar::EntryType::Fifo => Kind::Fifo,
        t => bail!("{}: tar entry type {:?} is not supported", at(), t),
    })
}

impl Tree {
    /// Just the root, with default metadata.
    fn new(mtime: u32) -> Tree {
        let default_dir = Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime,
            xattrs: Vec::new(),
        };
        Tree {
            nodes: vec![Node {
                meta: default_dir.clone(),
                kind: Kind::Dir(BTreeMap::new()),
            }],
            default_dir,
        }
    }

    /// Adds the tar entry `e` of `tar` (its data to `data`).
    fn add_entry<R: std::io::Read>(
        &mut self,
        e: &mut tar::Entry<R>,
        tar: &Path,
        data: &mut DataWriter,
    ) -> Result<()> {
        let path = e.path_bytes().into_owned();
        let at = || format!("{} in {}", String::from_utf8_lossy(&path), tar.display());
        let comps = split_path(&path).with_context(at)?;
        let xattrs = entry_xattrs(e, &at)?;
        let h = e.header().clone();
        if h.entry_type() == tar::EntryType::Link {
            // A hard link carries no metadata of its own: it names an earlier node.
            let t = e.link_name_bytes().with_context(at)?;
            let tc = split_path(&t).with_context(at)?;
            let target = self.lookup(&tc).with_context(|| {
                format!(
                    "{}: hard link to {}, which is not earlier in the tar",
                    at(),
                    String::from_utf8_lossy(&t)
                )
            })?;
            if matches!(self.nodes[target].kind, Kind::Dir(_)) {
                bail!("{}: hard link to a directory", at());
            }
            return self.link(&comps, target, &path).with_context(at);
        }
        let meta = Meta {
            mode: (h.mode().with_context(at)? & 0o7777) as u16,
            uid: h.uid().with_context(at)? as u32,
            gid: h.gid().with_context(at)? as u32,
            mtime: h.mtime().with_context(at)?.min(u32::MAX as u64) as u32,
            xattrs,
        };
        let kind = entry_kind(e, &h, data, &at)?;
        self.place(&comps, Node { meta, kind }, &path)
            .with_context(at)?;
        Ok(())
    }
    /// The directory at `comps` (made with default metadata where missing).
    fn dir(&mut self, comps: &[Vec<u8>], whole: &[u8]) -> Result<usize> {
        let mut at = 0usize;
        for c in comps {
            let existing = match &self.nodes[at].kind {
                Kind::Dir(ch) => ch.get(c).copied(),
                _ => bail!(
                    "{} is inside a non-directory",
                    String::from_utf8_lossy(whole)
                ),
            };
            at = match existing {
                Some(i) if matches!(self.nodes[i].kind, Kind::Dir(_)) => i,
                Some(_) => bail!(
                    "{}: a parent is not a directory",
                    String::from_utf8_lossy(whole)
                ),
                None => {
                    let i = self.nodes.len();
                    self.nodes.push(Node {
                        meta: self.default_dir.clone(),
                        kind: Kind::Dir(BTreeMap::new()),
                    });
                    if let Kind::Dir(ch) = &mut self.nodes[at].kind {
                        ch.insert(c.clone(), i);
                    }
                    i
                }
            };
        }
        Ok(at)
    }

    fn lookup(&self, comps: &[Vec<u8>]) -> Option<usize> {
        let mut at = 0usize;
        for c in comps {
            match &self.nodes[at].kind {
                Kind::Dir(ch) => at = *ch.get(c)?,
                _ => return None,
            }
        }
        Some(at)
    }

    /// Places node `n` at `comps` (replacing what was there; a directory replacing a
    /// directory only takes its metadata).
    fn place(&mut self, comps: &[Vec<u8>], node: Node, whole: &[u8]) -> Result<usize> {
        let Some((name, parent)) = comps.split_last() else {
            // The root itself.
            if !matches!(node.kind, Kind::Dir(_)) {
                bail!("the tar's root entry is not a directory");
            }
            self.nodes[0].meta = node.meta;
            return Ok(0);
        };
        let p = self.dir(parent, whole)?;
        let existing = match &self.nodes[p].kind {
            Kind::Dir(ch) => ch.get(name).copied(),
            _ => unreachable!(),
        };
        if let (Some(i), Kind::Dir(_)) = (existing, &node.kind) {
            if matches!(self.nodes[i].kind, Kind::Dir(_)) {
                self.nodes[i].meta = node.meta;
                return Ok(i);
            }
        }
        let i = self.nodes.len();
        self.nodes.push(node);
        if let Kind::Dir(ch) = &mut self.nodes[p].kind {
            ch.insert(name.clone(), i);
        }
        Ok(i)
    }

    fn link(&mut self, comps: &[Vec<u8>], target: usize, whole: &[u8]) -> Result<()> {
        let Some((name, parent)) = comps.split_last() else {
            bail!("a hard link cannot be the root");
        };
        let p = self.dir(parent, whole)?;
        if let Kind::Dir(ch) = &mut self.nodes[p].kind {
            ch.insert(name.clone(), target);
        }
        Ok(())
    }
}
