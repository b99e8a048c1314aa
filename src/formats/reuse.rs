//! Reusing compressed blocks of earlier artifacts.
//!
//! `root.squashfs` and `rootfs.tar.zst` are both made of independently compressed pieces
//! (squashfs data blocks, zstd frames). Each piece is keyed by the BLAKE3 hash of its
//! uncompressed bytes; after a build, an index of the artifact's pieces — key, hash of the
//! stored bytes, offset, length — is saved in the cache. A later build looks every new piece up
//! in the indexes written with the same settings and copies the stored bytes from the earlier
//! artifact once they hash to what was recorded; anything else (a deleted or modified earlier
//! artifact, another zstd version) means compressing again. A piece compresses to the same
//! bytes every time (single-threaded zstd, fixed parameters, the library version is part of
//! the settings), so an artifact does not depend on what the cache held.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SCHEMA: &str = "kiln.reuse-index/1";

/// One stored piece: key (hex), hash of the stored bytes (hex), offset, length, and a format
/// field kept with it (squashfs: the block's size field).
type Entry = (String, String, u64, u64, u32);

/// The pieces of one written artifact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Index {
    schema: String,
    params: String,
    zstd: u32,
    image: PathBuf,
    pub image_size: u64,
    pieces: Vec<Entry>,
}

impl Index {
    pub fn new(params: String) -> Index {
        Index {
            schema: SCHEMA.into(),
            params,
            zstd: zstd::zstd_safe::version_number(),
            image: PathBuf::new(),
            image_size: 0,
            pieces: Vec::new(),
        }
    }

    /// Number of pieces recorded.
    pub fn piece_count(&self) -> usize {
        self.pieces.len()
    }

    /// Offset and length of every piece, in the order written.
    pub fn spans(&self) -> Vec<(u64, u64)> {
        self.pieces.iter().map(|p| (p.2, p.3)).collect()
    }

    /// Records that `stored` (a piece whose uncompressed content has `key`) is at `offset`.
    pub fn push(&mut self, key: [u8; 32], stored: &Stored, offset: u64) {
        self.pieces.push((
            hex::encode(key),
            hex::encode(stored.hash),
            offset,
            stored.bytes.len() as u64,
            stored.field,
        ));
    }
    /// Saves the index of `image` (its final path) as `index` (write to temp, rename).
    pub fn save(&self, image: &Path, index: &Path) -> Result<()> {
        let mut f = self.clone();
        f.image = image.to_path_buf();
        let dir = index.parent().context("index path has no parent")?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer(&mut tmp, &f)?;
        tmp.persist(index)
            .with_context(|| format!("writing {}", index.display()))?;
        Ok(())
    }
}

/// Where a known piece is: source, hash of the stored bytes, offset, length, format field.
type Known = (usize, [u8; 32], u64, u64, u32);

struct Source {
    file: fs::File,
    path: PathBuf,
    bad: bool,
}

/// Pieces of earlier artifacts that a new one may copy.
#[derive(Default)]
pub struct Reuse {
    sources: Vec<Source>,
    map: HashMap<[u8; 32], Known>,
    hits: u64,
}

impl Reuse {
    /// Loads every index in `dir` written with `params` and this zstd version. Indexes whose
    /// artifact is gone or has another size are skipped.
    pub fn load(dir: &Path, params: &str) -> Reuse {
        let mut r = Reuse::default();
        let Ok(rd) = fs::read_dir(dir) else {
            return r;
        };
        let mut paths: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        paths.sort();
        for p in paths {
            if let Err(e) = r.add(&p, params) {
                tracing::debug!(index = %p.display(), "reuse index not used: {e:#}");
            }
        }
        r
    }

    fn add(&mut self, index: &Path, params: &str) -> Result<()> {
        let idx: Index = serde_json::from_slice(&fs::read(index)?)?;
        if idx.schema != SCHEMA
            || idx.params != params
            || idx.zstd != zstd::zstd_safe::version_number()
        {
            bail!("written with other settings");
        }
        let file = fs::File::open(&idx.image)?;
        if file.metadata()?.len() != idx.image_size {
            bail!("{} changed size", idx.image.display());
        }
        let n = self.sources.len();
        self.sources.push(Source {
            file,
            path: idx.image.clone(),
            bad: false,
        });
        for (k, h, off, len, field) in idx.pieces {
            let (Ok(k), Ok(h)) = (hex32(&k), hex32(&h)) else {
                bail!("malformed entry");
            };
            self.map.entry(k).or_insert((n, h, off, len, field));
        }
        Ok(())
    }

    /// How many pieces were copied so far.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// The stored piece with this content, if an earlier artifact has it and its bytes still
    /// hash to what was recorded.
    pub fn get(&mut self, key: &[u8; 32]) -> Option<Stored> {
        let &(src, want, off, len, field) = self.map.get(key)?;
        let s = &mut self.sources[src];
        if s.bad {
            return None;
        }
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        let ok =
            s.file.read_exact_at(&mut buf, off).is_ok() && *blake3::hash(&buf).as_bytes() == want;
        if !ok {
            tracing::warn!(
                artifact = %s.path.display(),
                "a piece of an earlier artifact does not match its index; not reusing that artifact"
            );
            s.bad = true;
            return None;
        }
        self.hits += 1;
        Some(Stored {
            bytes: buf,
            field,
            hash: want,
        })
    }
}

/// A piece as it sits in an artifact: its stored (compressed) bytes, the format's field for it
/// (squashfs: the block size word; zstd frames: 0) and the BLAKE3 hash of the stored bytes,
/// which the index records and checks before reuse.
pub struct Stored {
    pub bytes: Vec<u8>,
    pub field: u32,
    pub hash: [u8; 32],
}

impl Stored {
    /// A freshly made piece (hashed here, on the thread that made it).
    pub fn new(bytes: Vec<u8>, field: u32) -> Stored {
        let hash = *blake3::hash(&bytes).as_bytes();
        Stored { bytes, field, hash }
    }
}

fn hex32(s: &str) -> Result<[u8; 32]> {
    let v = hex::decode(s)?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("not a 32-byte hash: {s}"))
}
