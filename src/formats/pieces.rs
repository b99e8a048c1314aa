//! `root.pieces`: root.squashfs cut where it is stored in independent pieces — the superblock,
//! each data and fragment block, the metadata tables in chunks of at most [`MAX_PIECE`] — each
//! with its offset, length and sha256. A node updating its inactive root slot copies every
//! piece its active slot already holds (found by digest in the active build's `root.pieces`)
//! and fetches only the others with HTTP Range requests; then the whole slot is checked against
//! the signed sha256 of root.squashfs.
//!
//! Text, one piece per line, so the node's updater (a shell script with `awk`) reads it:
//!
//! ```text
//! kiln-pieces/1 <image size> <sha256 of the image>
//! <offset> <length> <sha256>
//! …
//! ```
//!
//! Pieces are contiguous and cover the image exactly; offsets are increasing.

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::Path;

/// First word of the file.
pub const HEADER: &str = "kiln-pieces/1";
/// Largest piece: regions between blocks (the metadata tables) are cut into chunks of this.
pub const MAX_PIECE: u64 = 1 << 20;
/// Largest `root.pieces` read back (a 4 GiB image of 4 KiB pieces would be ~100 MiB; real ones
/// are a few hundred KiB).
pub const MAX_FILE: u64 = 64 << 20;

/// One piece of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    pub sha256: [u8; 32],
}

/// The pieces of one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pieces {
    pub size: u64,
    pub sha256: [u8; 32],
    pub pieces: Vec<Piece>,
}

/// Squashfs 4.0 superblock fields that start a table (inode table at 64, directory table at 72).
const TABLE_STARTS: [usize; 2] = [64, 72];

/// Cuts `image` at the start and end of every stored piece in `spans` (offset, length: the
/// blocks its writer recorded) and at the start of its inode and directory tables, fills the
/// gaps with chunks of at most [`MAX_PIECE`], and hashes each piece.
pub fn of_image(image: &Path, spans: &[(u64, u64)]) -> Result<Pieces> {
    let mut f = fs::File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let size = f.metadata()?.len();
    let mut cuts = vec![0, size];
    let mut head = [0u8; 96];
    if size >= 96 {
        f.read_exact(&mut head)
            .with_context(|| format!("reading {}", image.display()))?;
        for at in TABLE_STARTS {
            let v = u64::from_le_bytes(head[at..at + 8].try_into().expect("8 bytes"));
            if v < size {
                cuts.push(v);
            }
        }
    }
    for &(off, len) in spans {
        if off.checked_add(len).is_none_or(|end| end > size) {
            bail!(
                "{}: a block at {off} (+{len}) is beyond the image's {size} bytes",
                image.display()
            );
        }
        cuts.push(off);
        cuts.push(off + len);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut bounds = Vec::with_capacity(cuts.len());
    for w in cuts.windows(2) {
        let (mut a, b) = (w[0], w[1]);
        let is_block = spans.binary_search_by_key(&a, |s| s.0).is_ok();
        while !is_block && b - a > MAX_PIECE {
            bounds.push((a, MAX_PIECE));
            a += MAX_PIECE;
        }
        bounds.push((a, b - a));
    }
    let mut f = std::io::BufReader::with_capacity(
        1 << 20,
        fs::File::open(image).with_context(|| format!("opening {}", image.display()))?,
    );
    let mut whole = Sha256::new();
    let mut pieces = Vec::with_capacity(bounds.len());
    let mut buf = Vec::new();
    for (offset, len) in bounds {
        buf.resize(len as usize, 0);
        f.read_exact(&mut buf)
            .with_context(|| format!("reading {}", image.display()))?;
        whole.update(&buf);
        pieces.push(Piece {
            offset,
            len,
            sha256: Sha256::digest(&buf).into(),
        });
    }
    Ok(Pieces {
        size,
        sha256: whole.finalize().into(),
        pieces,
    })
}

impl Pieces {
    /// The file's text.
    pub fn to_text(&self) -> String {
        let mut s = format!("{HEADER} {} {}\n", self.size, hex::encode(self.sha256));
        for p in &self.pieces {
            s.push_str(&format!(
                "{} {} {}\n",
                p.offset,
                p.len,
                hex::encode(p.sha256)
            ));
        }
        s
    }

    /// Reads the text back; refuses anything [`of_image`] would not have written (gaps,
    /// overlaps, pieces past the end, malformed lines), naming `what` and the line.
    pub fn parse(text: &str, what: &str) -> Result<Pieces> {
        let mut lines = text.lines().enumerate();
        let (_, first) = lines
            .next()
            .with_context(|| format!("{what}: empty, not a piece index"))?;
        let f: Vec<&str> = first.split(' ').collect();
        let [HEADER, size, sha] = f[..] else {
            bail!("{what}: line 1 is not `{HEADER} <size> <sha256>`");
        };
        let size: u64 = size
            .parse()
            .with_context(|| format!("{what}: line 1: size {size:?}"))?;
        let sha256 = hex32(sha).with_context(|| format!("{what}: line 1"))?;
        let mut pieces = Vec::new();
        let mut next = 0u64;
        for (i, l) in lines {
            let n = i + 1;
            let f: Vec<&str> = l.split(' ').collect();
            let [off, len, sha] = f[..] else {
                bail!("{what}: line {n} is not `<offset> <length> <sha256>`");
            };
            let offset: u64 = off
                .parse()
                .with_context(|| format!("{what}: line {n}: offset {off:?}"))?;
            let len: u64 = len
                .parse()
                .with_context(|| format!("{what}: line {n}: length {len:?}"))?;
            if offset != next || len == 0 || offset.checked_add(len).is_none_or(|e| e > size) {
                bail!("{what}: line {n}: piece {offset}+{len} does not follow the one before (expected offset {next}, within {size} bytes)");
            }
            next = offset + len;
            pieces.push(Piece {
                offset,
                len,
                sha256: hex32(sha).with_context(|| format!("{what}: line {n}"))?,
            });
        }
        if next != size {
            bail!("{what}: the pieces end at {next}, the image has {size} bytes");
        }
        Ok(Pieces {
            size,
            sha256,
            pieces,
        })
    }

    /// What an update from an image with pieces `have` to this one moves: pieces found in
    /// `have` (by digest and length) are copied, the rest fetched.
    pub fn plan_from(&self, have: &Pieces) -> Plan {
        let known: HashMap<([u8; 32], u64), u64> = have
            .pieces
            .iter()
            .map(|p| ((p.sha256, p.len), p.offset))
            .collect();
        let mut plan = Plan::default();
        for p in &self.pieces {
            match known.get(&(p.sha256, p.len)) {
                Some(_) => {
                    plan.copied_pieces += 1;
                    plan.copied_bytes += p.len;
                }
                None => {
                    plan.fetched_pieces += 1;
                    plan.fetched_bytes += p.len;
                }
            }
        }
        plan
    }
}

/// How much of an image an update copies from the active slot and how much it fetches.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub copied_pieces: u64,
    pub copied_bytes: u64,
    pub fetched_pieces: u64,
    pub fetched_bytes: u64,
}

fn hex32(s: &str) -> Result<[u8; 32]> {
    let v = hex::decode(s).with_context(|| format!("{s:?} is not hex"))?;
    v.try_into()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a sha256 (64 hex digits)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        fs::write(&p, bytes).unwrap();
        (d, p)
    }

    #[test]
    fn pieces_cover_the_image_and_round_trip() {
        let mut b = vec![7u8; 3 * MAX_PIECE as usize + 500];
        b[0..96].fill(0);
        // inode table at 2 MiB + 10
        b[64..72].copy_from_slice(&(2 * MAX_PIECE + 10).to_le_bytes());
        let (_d, p) = image(&b);
        let ps = of_image(&p, &[(100, 50), (150, 1000)]).unwrap();
        let bounds: Vec<(u64, u64)> = ps.pieces.iter().map(|p| (p.offset, p.len)).collect();
        assert_eq!(
            bounds,
            vec![
                (0, 100),
                (100, 50),
                (150, 1000),
                (1150, MAX_PIECE),
                (1150 + MAX_PIECE, 2 * MAX_PIECE + 10 - 1150 - MAX_PIECE),
                (2 * MAX_PIECE + 10, MAX_PIECE),
                (3 * MAX_PIECE + 10, 490),
            ]
        );
        assert_eq!(ps.sha256, <[u8; 32]>::from(Sha256::digest(&b)));
        let text = ps.to_text();
        assert!(text.starts_with(&format!("kiln-pieces/1 {} ", b.len())));
        assert_eq!(Pieces::parse(&text, "root.pieces").unwrap(), ps);
    }

    #[test]
    fn a_block_past_the_end_is_refused() {
        let (_d, p) = image(&[0u8; 200]);
        let e = of_image(&p, &[(150, 100)]).unwrap_err();
        assert!(
            format!("{e:#}").contains("beyond the image's 200 bytes"),
            "{e:#}"
        );
    }

    #[test]
    fn parse_refuses_gaps_overlaps_and_short_indexes() {
        let z = "0".repeat(64);
        for (text, want) in [
            (String::new(), "empty"),
            (format!("kiln-pieces/2 10 {z}\n"), "line 1 is not"),
            (
                format!("kiln-pieces/1 10 {z}\n0 4 {z}\n5 5 {z}\n"),
                "line 3",
            ),
            (
                format!("kiln-pieces/1 10 {z}\n0 6 {z}\n4 6 {z}\n"),
                "line 3",
            ),
            (format!("kiln-pieces/1 10 {z}\n0 4 {z}\n"), "end at 4"),
            (
                format!("kiln-pieces/1 10 {z}\n0 11 {z}\n"),
                "within 10 bytes",
            ),
            (format!("kiln-pieces/1 10 {z}\n0 10 xyz\n"), "not hex"),
        ] {
            let e = Pieces::parse(&text, "root.pieces").unwrap_err();
            assert!(format!("{e:#}").contains(want), "{text:?}: {e:#}");
        }
    }

    #[test]
    fn plan_copies_what_the_old_image_has_wherever_it_is() {
        let a = Piece {
            offset: 0,
            len: 10,
            sha256: [1; 32],
        };
        let b = Piece {
            offset: 10,
            len: 20,
            sha256: [2; 32],
        };
        let old = Pieces {
            size: 30,
            sha256: [0; 32],
            pieces: vec![a.clone(), b.clone()],
        };
        // New image: b moved to the front, a new piece, a moved back.
        let new = Pieces {
            size: 35,
            sha256: [9; 32],
            pieces: vec![
                Piece { offset: 0, ..b },
                Piece {
                    offset: 20,
                    len: 5,
                    sha256: [3; 32],
                },
                Piece { offset: 25, ..a },
            ],
        };
        assert_eq!(
            new.plan_from(&old),
            Plan {
                copied_pieces: 2,
                copied_bytes: 30,
                fetched_pieces: 1,
                fetched_bytes: 5
            }
        );
    }
}
