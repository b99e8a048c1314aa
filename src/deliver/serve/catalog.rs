//! What `kiln serve` serves: verified role builds, node seeds and the pinned iPXE binaries,
//! indexed by MAC.
//!
//! Every file is opened once and hashed from the open descriptor: the whole-file digest is
//! compared with the signed `SHA256SUMS` of its directory (iPXE binaries, which kiln does not
//! sign, are pinned to the digest read at start or SIGHUP), and a digest of every
//! [`PIECE`]-sized piece is kept. No byte leaves the server unchecked: a piece is read from the
//! descriptor, hashed and compared with its recorded digest before it is sent, and once checked
//! it stays in a bounded in-memory cache keyed by that digest ([`PieceCache`]), so a popular
//! file is hashed once and then served from memory. A file written in place after loading (same
//! inode), truncated or grown fails that check: the response is cut, the failure is logged as
//! an error and counted (`kiln_integrity_failures_total`), and the file is answered with 503
//! until a reload verifies a good copy. Seeds and manifests are small and kept in memory.

use crate::project::recipe::{normalize_mac, Project};
use crate::trust::sign::{self, SignedSums, VerifyError};
use anyhow::{Context, Result};
use bytes::Bytes;
use ed25519_dalek::VerifyingKey;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The files of a role build that a diskless boot needs.
pub const BOOT_FILES: [&str; 3] = ["vmlinuz", "initrd.img", "root.squashfs"];
/// What a node's updater fetches besides [`BOOT_FILES`], served when the build's signed
/// `SHA256SUMS` lists them (builds made before in-place updates do not).
pub const UPDATE_FILES: [&str; 2] = ["root.pieces", "update.txt"];
/// Seed files a node directory may hold, in the order cloud-init reads them, then the node's
/// identity files and (a server's seed with `token_delivery = "seed"`) the cluster's CAs, read
/// over HTTP by the initramfs of a PXE boot.
pub fn is_seed_file(name: &str) -> bool {
    seed_files().any(|n| n == name)
}

/// Every name [`is_seed_file`] accepts, in that order.
fn seed_files() -> impl Iterator<Item = &'static str> {
    crate::pipeline::seed::FILES
        .iter()
        .chain(crate::pipeline::seed::IDENTITY_FILES.iter())
        .chain(crate::trust::k3s_ca::SEED_FILES.iter())
        .copied()
}
/// Bytes per verified piece (the unit of checking, caching and of an HTTP body chunk).
pub const PIECE: u64 = 256 * 1024;
/// Default size of the verified-piece cache.
pub const DEFAULT_CACHE_MIB: u64 = 512;

type Digest32 = [u8; 32];

/// Verified pieces by their SHA-256, up to a byte budget (oldest out first). Content-addressed:
/// an entry is the bytes that hash to its key, so it is valid for every file and every reload.
pub struct PieceCache {
    budget: u64,
    inner: Mutex<CacheInner>,
    /// Serialises the filling of one piece, so concurrent clients hash it once.
    fill: Vec<Mutex<()>>,
}

#[derive(Default)]
struct CacheInner {
    map: HashMap<Digest32, Bytes>,
    order: VecDeque<Digest32>,
    bytes: u64,
}

impl std::fmt::Debug for PieceCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PieceCache({} bytes budget)", self.budget)
    }
}

impl PieceCache {
    pub fn new(budget: u64) -> PieceCache {
        PieceCache {
            budget,
            inner: Mutex::new(CacheInner::default()),
            fill: (0..32).map(|_| Mutex::new(())).collect(),
        }
    }

    fn get(&self, d: &Digest32) -> Option<Bytes> {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.map.get(d).cloned()
    }

    fn put(&self, d: Digest32, b: Bytes) {
        let n = b.len() as u64;
        if n > self.budget {
            return;
        }
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if m.map.contains_key(&d) {
            return;
        }
        while m.bytes + n > self.budget {
            let Some(old) = m.order.pop_front() else {
                break;
            };
            if let Some(v) = m.map.remove(&old) {
                m.bytes -= v.len() as u64;
            }
        }
        m.bytes += n;
        m.order.push_back(d);
        m.map.insert(d, b);
    }
}

/// One verified file, kept open: its digest, the digest of each piece, and the cache it reads
/// through. Clones share the descriptor and the "changed on disk" mark.
#[derive(Debug, Clone)]
pub struct Blob {
    /// The verified descriptor; `None` for a file kept whole in memory (`mem`).
    file: Option<Arc<File>>,
    mem: Option<Bytes>,
    pub len: u64,
    pub sha256: String,
    pub path: PathBuf,
    pieces: Arc<[Digest32]>,
    cache: Arc<PieceCache>,
    changed: Arc<AtomicBool>,
}

/// A served file no longer holds the bytes it was verified with.
#[derive(Debug, thiserror::Error)]
#[error(
    "{path} changed on disk since kiln serve verified it (bytes {start}..{end} differ): not \
     served; rebuild it (`kiln build`) and reload (SIGHUP)"
)]
pub struct ChangedOnDisk {
    pub path: PathBuf,
    pub start: u64,
    pub end: u64,
}

impl Blob {
    /// Opens `dir/name`, hashes it through the open descriptor and checks the signed digest.
    pub fn open_verified(
        dir: &Path,
        name: &str,
        sums: &SignedSums,
        cache: &Arc<PieceCache>,
    ) -> Result<Blob> {
        let path = dir.join(name);
        let expected = sums.sha256_of(name).ok_or_else(|| VerifyError::NotListed {
            sums: dir.join(sign::SUMS),
            name: name.to_string(),
        })?;
        let blob = Blob::open_pinned(&path, cache)?;
        Blob::check(blob, expected, path)
    }

    fn check(blob: Blob, expected: &str, path: PathBuf) -> Result<Blob> {
        if blob.sha256 != expected {
            return Err(VerifyError::Mismatch {
                path,
                expected: expected.to_string(),
                actual: blob.sha256,
            }
            .into());
        }
        Ok(blob)
    }

    /// Bytes already read and verified (a build's `SHA256SUMS` and its signature), served from
    /// memory under `path`'s name.
    pub fn from_verified_bytes(path: PathBuf, v: Vec<u8>, cache: &Arc<PieceCache>) -> Blob {
        Blob {
            file: None,
            len: v.len() as u64,
            sha256: hex::encode(Sha256::digest(&v)),
            path,
            mem: Some(Bytes::from(v)),
            pieces: Arc::new([]),
            cache: cache.clone(),
            changed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Reads `path` (at most `max` bytes) into memory, where it is served from: no descriptor
    /// stays open (the iPXE binaries: small, and fetched by many TFTP transfers at once).
    pub fn read_pinned(path: &Path, max: u64, cache: &Arc<PieceCache>) -> Result<Blob> {
        let v = crate::sys::util::read_small(path, max, "an iPXE-directory file")?;
        Ok(Blob {
            file: None,
            len: v.len() as u64,
            sha256: hex::encode(Sha256::digest(&v)),
            path: path.to_path_buf(),
            mem: Some(Bytes::from(v)),
            pieces: Arc::new([]),
            cache: cache.clone(),
            changed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Opens `path` and pins it to the bytes it holds now (whole-file and per-piece digests);
    /// the pieces read go into the cache.
    pub fn open_pinned(path: &Path, cache: &Arc<PieceCache>) -> Result<Blob> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        anyhow::ensure!(meta.is_file(), "{} is not a regular file", path.display());
        let len = meta.len();
        let mut h = Sha256::new();
        let mut pieces = Vec::with_capacity(len.div_ceil(PIECE) as usize);
        let mut off = 0u64;
        while off < len {
            let want = (len - off).min(PIECE) as usize;
            let mut buf = vec![0u8; want];
            let got = read_full(&file, &mut buf, off)
                .with_context(|| format!("reading {}", path.display()))?;
            if got == 0 {
                break;
            }
            buf.truncate(got);
            h.update(&buf);
            let d: Digest32 = Sha256::digest(&buf).into();
            pieces.push(d);
            off += got as u64;
            cache.put(d, Bytes::from(buf));
            if got < want {
                break;
            }
        }
        Ok(Blob {
            file: Some(Arc::new(file)),
            mem: None,
            len: off,
            sha256: hex::encode(h.finalize()),
            path: path.to_path_buf(),
            pieces: pieces.into(),
            cache: cache.clone(),
            changed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Whether a read found the file changed since it was verified.
    pub fn changed_on_disk(&self) -> bool {
        self.changed.load(Ordering::Relaxed)
    }

    /// Piece `i`, if it is in the cache (never blocks on I/O).
    pub fn cached_piece(&self, i: u64) -> Option<Bytes> {
        if let Some(m) = &self.mem {
            return self.mem_piece(m, i).ok();
        }
        self.cache.get(self.pieces.get(i as usize)?)
    }

    fn mem_piece(&self, m: &Bytes, i: u64) -> std::io::Result<Bytes> {
        let start = i.saturating_mul(PIECE);
        if start >= self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of a verified file",
            ));
        }
        Ok(m.slice(start as usize..(start + PIECE).min(self.len) as usize))
    }

    /// Piece `i`, verified: from the cache, else read from the descriptor and checked against
    /// its digest (blocking I/O). A mismatch is an `InvalidData` error wrapping
    /// [`ChangedOnDisk`], logged once per file.
    pub fn piece(&self, i: u64) -> std::io::Result<Bytes> {
        let (Some(file), Some(d)) = (&self.file, self.pieces.get(i as usize)) else {
            if let Some(m) = &self.mem {
                return self.mem_piece(m, i);
            }
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of a verified file",
            ));
        };
        if let Some(b) = self.cache.get(d) {
            return Ok(b);
        }
        let _g = self.cache.fill[d[0] as usize % self.cache.fill.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(b) = self.cache.get(d) {
            return Ok(b);
        }
        let start = i * PIECE;
        let want = (self.len - start).min(PIECE) as usize;
        // One byte more than the piece: a file that grew is as changed as one that shrank.
        let mut buf = vec![0u8; want + 1];
        let got = read_full(file, &mut buf, start)?;
        let last = i as usize + 1 == self.pieces.len();
        let ok = (got == want || (!last && got == want + 1))
            && <Digest32>::from(Sha256::digest(&buf[..want])) == *d;
        if !ok {
            let e = ChangedOnDisk {
                path: self.path.clone(),
                start,
                end: start + want as u64,
            };
            if !self.changed.swap(true, Ordering::Relaxed) {
                tracing::error!(target: "kiln::serve", "INTEGRITY: {e}; responses for it are cut");
            }
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        }
        buf.truncate(want);
        let b = Bytes::from(buf);
        self.cache.put(*d, b.clone());
        Ok(b)
    }

    /// Fills `buf` with the verified bytes at `off` (TFTP blocks, small reads).
    pub fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let p = self.piece(pos / PIECE)?;
            let at = (pos % PIECE) as usize;
            let n = (p.len().saturating_sub(at)).min(buf.len() - done);
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "read past the end of a verified file",
                ));
            }
            buf[done..done + n].copy_from_slice(&p[at..at + n]);
            done += n;
        }
        Ok(())
    }

    /// The whole content (for small files: seeds, manifests).
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.len as usize];
        self.read_exact_at(&mut v, 0)
            .with_context(|| format!("reading {}", self.path.display()))?;
        Ok(v)
    }
}

/// `pread` until `buf` is full or the end of the file; the bytes read.
fn read_full(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A verified role build that can be booted diskless.
#[derive(Debug)]
pub struct RoleBuild {
    pub role: String,
    pub build_id: String,
    pub dir: PathBuf,
    /// `vmlinuz`, `initrd.img`, `root.squashfs`.
    pub files: BTreeMap<String, Blob>,
    /// Kernel arguments from the recipe (the disk's command line without its root arguments).
    pub cmdline_args: Vec<String>,
}

/// How one inventory node boots.
#[derive(Debug, Clone)]
pub struct NodeBoot {
    pub hostname: String,
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub role: String,
    /// Build id of the role build it boots.
    pub build_id: String,
    /// The seed's `instance-id`, when the node has signed outputs in `out/nodes/`.
    pub instance_id: Option<String>,
    /// Seed files by name (verified bytes); empty when the node has no outputs.
    pub seed: BTreeMap<String, Vec<u8>>,
}

/// An inventory node that cannot be booted, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Unprovisioned {
    pub hostname: String,
    pub mac: String,
    pub role: String,
    pub reason: String,
}

/// Everything the server answers from.
#[derive(Debug, Default, Clone)]
pub struct Catalog {
    /// Role builds by build id.
    pub builds: BTreeMap<String, Arc<RoleBuild>>,
    /// Bootable nodes by normalised MAC.
    pub nodes: BTreeMap<String, NodeBoot>,
    /// Inventory nodes that cannot boot, by normalised MAC.
    pub unprovisioned: BTreeMap<String, Unprovisioned>,
    /// `(role, build id)` booted by MACs not in the inventory (`--default-role`).
    pub default: Option<(String, String)>,
    /// Things the operator should know (printed at start).
    pub warnings: Vec<String>,
    /// Role builds and node seeds that carry secrets of the cluster (`contains_secrets` of a
    /// role build, `cluster_secrets` of a seed) and are served.
    pub secret_bearing: Vec<String>,
    /// Nodes whose served seeds carry only their own identity (SSH host key, k3s node
    /// password): served also with `--refuse-secret-builds`, since a PXE node comes back as
    /// itself only with them.
    pub identities: Vec<String>,
    /// The iPXE directory's files, pinned at load, by canonical path.
    pub pinned: BTreeMap<PathBuf, Blob>,
}

/// How [`Catalog::load`] loads.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Role booted by MACs not in the inventory.
    pub default_role: Option<String>,
    /// Leave builds and seeds that carry secrets out (their nodes cannot boot, with a reason).
    pub refuse_secrets: bool,
    /// The iPXE directory to pin (TFTP and `/ipxe/`).
    pub ipxe_dir: Option<PathBuf>,
    pub cache: Arc<PieceCache>,
}

/// Most files and bytes of the iPXE directory that are pinned, in memory (the rest is not
/// served).
const PIN_MAX_FILES: usize = 4096;
const PIN_MAX_BYTES: u64 = 512 << 20;

/// Where a MAC boots to.
pub enum Lookup<'a> {
    Node(&'a NodeBoot, &'a RoleBuild),
    Default(&'a RoleBuild),
    Unprovisioned(String),
}

impl Catalog {
    /// Loads and verifies what `project`'s inventory needs from `out_dir`. Any signed file that
    /// fails verification is an error ([`VerifyError`], exit status 3): nothing is served then.
    pub fn load(
        project: &Project,
        out_dir: &Path,
        key: &VerifyingKey,
        lo: &LoadOptions,
    ) -> Result<Catalog> {
        let mut cat = Catalog::default();
        let default_role = lo.default_role.as_deref();
        let cache = &lo.cache;
        let nodes_dir = crate::pipeline::node::nodes_dir(out_dir);
        for n in &project.cluster.nodes {
            let mac = normalize_mac(&n.mac).unwrap_or_else(|| n.mac.clone());
            let node_dir = nodes_dir.join(&n.hostname);
            if node_dir.join(sign::SUMS).exists() || node_dir.join(sign::SIG).exists() {
                let nd = load_node_dir(&node_dir, key, &n.hostname, &n.role, cache)?;
                let (build_id, iid, seed) = (nd.build_id, nd.instance_id, nd.seed);
                let role_dir = out_dir.join(&n.role).join(&build_id);
                if !role_dir.is_dir() {
                    cat.unprovisioned.insert(
                        mac.clone(),
                        Unprovisioned {
                            hostname: n.hostname.clone(),
                            mac: mac.clone(),
                            role: n.role.clone(),
                            reason: format!(
                                "its outputs in {} were made from {} build {}, which is no longer \
                                 in {}: run `kiln build --role {}`",
                                node_dir.display(),
                                n.role,
                                short(&build_id),
                                out_dir.join(&n.role).display(),
                                n.role
                            ),
                        },
                    );
                    continue;
                }
                if cat.load_build(&n.role, &build_id, &role_dir, key, lo)? {
                    cat.refuse_secret(&n.hostname, &mac, &n.role, &role_dir, false);
                    continue;
                }
                if nd.cluster_secrets && lo.refuse_secrets {
                    cat.refuse_secret(&n.hostname, &mac, &n.role, &node_dir, true);
                    continue;
                }
                if nd.cluster_secrets {
                    cat.secret_bearing.push(format!(
                        "the seed of {} ({})",
                        n.hostname,
                        node_dir.display()
                    ));
                } else if nd.contains_secrets {
                    cat.identities.push(n.hostname.clone());
                }
                cat.nodes.insert(
                    mac.clone(),
                    NodeBoot {
                        hostname: n.hostname.clone(),
                        mac,
                        role: n.role.clone(),
                        build_id,
                        instance_id: Some(iid),
                        seed,
                    },
                );
            } else if let Some(id) = latest(out_dir, &n.role) {
                cat.warnings.push(format!(
                    "{} has no node outputs in {}: it boots {} build {} without a seed (the image \
                     names it by MAC); run `kiln build --role {}` for its seed",
                    n.hostname,
                    node_dir.display(),
                    n.role,
                    short(&id),
                    n.role
                ));
                if cat.load_build(&n.role, &id, &out_dir.join(&n.role).join(&id), key, lo)? {
                    let d = out_dir.join(&n.role).join(&id);
                    cat.refuse_secret(&n.hostname, &mac, &n.role, &d, false);
                    continue;
                }
                cat.nodes.insert(
                    mac.clone(),
                    NodeBoot {
                        hostname: n.hostname.clone(),
                        mac,
                        role: n.role.clone(),
                        build_id: id,
                        instance_id: None,
                        seed: BTreeMap::new(),
                    },
                );
            } else {
                cat.unprovisioned.insert(
                    mac.clone(),
                    Unprovisioned {
                        hostname: n.hostname.clone(),
                        mac,
                        role: n.role.clone(),
                        reason: format!(
                            "no {} build in {}: run `kiln build --role {}`",
                            n.role,
                            out_dir.join(&n.role).display(),
                            n.role
                        ),
                    },
                );
            }
        }
        for u in cat.unprovisioned.values() {
            cat.warnings.push(format!(
                "{} ({}) cannot boot: {}",
                u.hostname, u.mac, u.reason
            ));
        }
        if let Some(role) = default_role {
            let id = latest(out_dir, role).ok_or_else(|| {
                crate::project::recipe::RecipeError::new(
                    crate::project::layout::Out::new(out_dir).latest(role),
                    "--default-role",
                    format!("there is no {role} build to boot unknown machines with"),
                    format!("run `kiln build --role {role}` first, or drop --default-role"),
                )
            })?;
            let d = out_dir.join(role).join(&id);
            if cat.load_build(role, &id, &d, key, lo)? {
                cat.warnings.push(format!(
                    "--default-role {role}: build {} carries secrets (contains_secrets in {}) and \
                     --refuse-secret-builds is on: machines not in the inventory get no boot",
                    short(&id),
                    d.join("manifest.json").display()
                ));
            } else {
                cat.default = Some((role.to_string(), id));
            }
        }
        if let Some(dir) = &lo.ipxe_dir {
            cat.pin_dir(dir, cache);
        }
        Ok(cat)
    }

    /// Marks an inventory node unbootable because what it boots carries secrets.
    fn refuse_secret(&mut self, host: &str, mac: &str, role: &str, dir: &Path, seed: bool) {
        let (what, field) = if seed {
            (
                "its seed",
                "cluster_secrets: true in node.json: the k3s token",
            )
        } else {
            ("its role build", "contains_secrets: true in manifest.json")
        };
        let reason = format!(
            "{what} in {} carries secrets of the cluster ({field}) and kiln serve runs with \
             --refuse-secret-builds: deliver the token by seed to a trusted network, or serve \
             without the flag",
            dir.display()
        );
        tracing::warn!(target: "kiln::serve", host, "refused: {reason}");
        self.warnings
            .push(format!("{host} ({mac}) is not served: {reason}"));
        self.unprovisioned.insert(
            mac.to_string(),
            Unprovisioned {
                hostname: host.to_string(),
                mac: mac.to_string(),
                role: role.to_string(),
                reason: format!("{what} carries secrets and kiln serve refuses those"),
            },
        );
    }

    /// Pins the regular files under the iPXE directory (symlinks only when they stay inside),
    /// up to [`PIN_MAX_FILES`] and [`PIN_MAX_BYTES`].
    fn pin_dir(&mut self, root: &Path, cache: &Arc<PieceCache>) {
        let Ok(croot) = root.canonicalize() else {
            return;
        };
        let mut stack = vec![(croot.clone(), 0usize)];
        let mut bytes = 0u64;
        while let Some((dir, depth)) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut names: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
            names.sort();
            for p in names {
                let Ok(c) = p.canonicalize() else { continue };
                if !c.starts_with(&croot) || self.pinned.contains_key(&c) {
                    continue;
                }
                let Ok(meta) = std::fs::metadata(&c) else {
                    continue;
                };
                if meta.is_dir() {
                    if depth < 4 && p.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                        stack.push((c, depth + 1));
                    }
                    continue;
                }
                if !meta.is_file() {
                    continue;
                }
                if self.pinned.len() >= PIN_MAX_FILES || bytes + meta.len() > PIN_MAX_BYTES {
                    self.warnings.push(format!(
                        "{}: more than {PIN_MAX_FILES} files or {} MiB; {} and the rest are not \
                         served (pass --ipxe-dir with only the iPXE binaries)",
                        root.display(),
                        PIN_MAX_BYTES >> 20,
                        p.display()
                    ));
                    return;
                }
                match Blob::read_pinned(&c, PIN_MAX_BYTES - bytes, cache) {
                    Ok(b) => {
                        bytes += b.len;
                        self.pinned.insert(c, b);
                    }
                    Err(e) => self.warnings.push(format!("{e:#}: not served")),
                }
            }
        }
    }

    /// A pinned iPXE-directory file by its canonical path (from [`super::safe_path`]).
    pub fn pinned(&self, path: &Path) -> Option<&Blob> {
        self.pinned.get(path)
    }

    /// Adds one role build (verified) to what is served: a rollout's build.
    pub fn add_build(
        &mut self,
        role: &str,
        id: &str,
        dir: &Path,
        key: &VerifyingKey,
        lo: &LoadOptions,
    ) -> Result<()> {
        if self.load_build(role, id, dir, key, lo)? {
            anyhow::bail!(
                "{} carries secrets (contains_secrets in its manifest.json) and kiln serve runs with --refuse-secret-builds",
                dir.display()
            );
        }
        Ok(())
    }

    /// Loads a role build once; `Ok(true)` when it carries secrets and `lo` refuses those
    /// (then it is not in the catalog).
    fn load_build(
        &mut self,
        role: &str,
        id: &str,
        dir: &Path,
        key: &VerifyingKey,
        lo: &LoadOptions,
    ) -> Result<bool> {
        if self.builds.contains_key(id) {
            return Ok(false);
        }
        let cache = &lo.cache;
        let sums = sign::verify_signature(dir, key)?;
        let manifest = Blob::open_verified(dir, "manifest.json", &sums, cache)?.read_all()?;
        let manifest: serde_json::Value = serde_json::from_slice(&manifest)
            .with_context(|| format!("parsing {}", dir.join("manifest.json").display()))?;
        // An old manifest without the field may carry secrets: counted as carrying them.
        let secrets = manifest
            .get("contains_secrets")
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        if secrets && lo.refuse_secrets {
            return Ok(true);
        }
        if secrets {
            self.secret_bearing
                .push(format!("{role} build {} ({})", short(id), dir.display()));
        }
        let mut files = BTreeMap::new();
        for name in BOOT_FILES {
            files.insert(
                name.to_string(),
                Blob::open_verified(dir, name, &sums, cache)?,
            );
        }
        for name in UPDATE_FILES {
            if sums.sha256_of(name).is_some() {
                files.insert(
                    name.to_string(),
                    Blob::open_verified(dir, name, &sums, cache)?,
                );
            }
        }
        let (raw_sums, raw_sig) = sums.raw.clone();
        for (name, bytes) in [(sign::SUMS, raw_sums), (sign::SIG, raw_sig)] {
            files.insert(
                name.to_string(),
                Blob::from_verified_bytes(dir.join(name), bytes, cache),
            );
        }
        let cmdline = manifest
            .pointer("/kernel/cmdline")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        self.builds.insert(
            id.to_string(),
            Arc::new(RoleBuild {
                role: role.to_string(),
                build_id: id.to_string(),
                dir: dir.to_path_buf(),
                files,
                cmdline_args: recipe_args(cmdline),
            }),
        );
        Ok(false)
    }

    /// What a MAC (any common notation) boots.
    pub fn lookup(&self, mac: &str) -> Lookup<'_> {
        let Some(mac) = normalize_mac(mac) else {
            return Lookup::Unprovisioned(
                "not a MAC address (expected aa:bb:cc:dd:ee:ff or aa-bb-cc-dd-ee-ff)".into(),
            );
        };
        if let Some(n) = self.nodes.get(&mac) {
            return Lookup::Node(n, &self.builds[&n.build_id]);
        }
        if let Some(u) = self.unprovisioned.get(&mac) {
            return Lookup::Unprovisioned(format!("{} ({mac}): {}", u.hostname, u.reason));
        }
        match &self.default {
            Some((_, id)) => Lookup::Default(&self.builds[id]),
            None => Lookup::Unprovisioned(format!(
                "{mac} is not in the inventory (recipes/cluster.toml [[nodes]]): add it and run \
                 `kiln build`, or start `kiln serve --default-role <role>`"
            )),
        }
    }

    /// The node whose seed is served for `mac`, if it has one.
    pub fn seed(&self, mac: &str) -> Option<&NodeBoot> {
        let mac = normalize_mac(mac)?;
        self.nodes.get(&mac).filter(|n| n.instance_id.is_some())
    }

    /// A role build by role name and build id.
    pub fn build(&self, role: &str, id: &str) -> Option<&RoleBuild> {
        self.builds
            .get(id)
            .map(|b| b.as_ref())
            .filter(|b| b.role == role)
    }

    /// A summary for `--json` and `/status`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "builds": self.builds.values().map(|b| serde_json::json!({
                "role": b.role,
                "build_id": b.build_id,
                "dir": b.dir,
                "files": b.files.iter().map(|(n, f)| (n.clone(), serde_json::json!({
                    "size": f.len, "sha256": f.sha256,
                }))).collect::<BTreeMap<_, _>>(),
            })).collect::<Vec<_>>(),
            "nodes": self.nodes.values().map(|n| serde_json::json!({
                "hostname": n.hostname,
                "mac": n.mac,
                "role": n.role,
                "build_id": n.build_id,
                "instance_id": n.instance_id,
                "seed": n.seed.keys().collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "unprovisioned": self.unprovisioned.values().collect::<Vec<_>>(),
            "default": self.default.as_ref().map(|(r, id)| serde_json::json!({"role": r, "build_id": id})),
            "warnings": self.warnings,
        })
    }
}

/// What a verified node directory says.
struct NodeDir {
    build_id: String,
    instance_id: String,
    seed: BTreeMap<String, Vec<u8>>,
    contains_secrets: bool,
    /// Secrets of the cluster (the token) in the seed or its role build; node.json before
    /// schema kiln.node/2 does not say: taken as `contains_secrets` then.
    cluster_secrets: bool,
}

/// Reads a verified node directory.
fn load_node_dir(
    dir: &Path,
    key: &VerifyingKey,
    hostname: &str,
    role: &str,
    cache: &Arc<PieceCache>,
) -> Result<NodeDir> {
    let sums = sign::verify_signature(dir, key)?;
    let node_json = Blob::open_verified(dir, "node.json", &sums, cache)?.read_all()?;
    let v: serde_json::Value = serde_json::from_slice(&node_json)
        .with_context(|| format!("parsing {}", dir.join("node.json").display()))?;
    let field = |k: &str| -> Result<String> {
        v.get(k)
            .and_then(|x| x.as_str())
            .map(str::to_string)
            .with_context(|| format!("{}: no {k:?}", dir.join("node.json").display()))
    };
    let (h, r) = (field("hostname")?, field("role")?);
    anyhow::ensure!(
        h == hostname && r == role,
        "{}: made for {h} ({r}), but the inventory says {hostname} ({role}): run `kiln build`",
        dir.display()
    );
    let mut seed = BTreeMap::new();
    for name in seed_files() {
        if sums.sha256_of(name).is_some() {
            seed.insert(
                name.to_string(),
                Blob::open_verified(dir, name, &sums, cache)?.read_all()?,
            );
        }
    }
    let contains_secrets = v
        .get("contains_secrets")
        .and_then(|x| x.as_bool())
        .unwrap_or(true);
    Ok(NodeDir {
        build_id: field("role_build_id")?,
        instance_id: field("instance_id")?,
        seed,
        contains_secrets,
        cluster_secrets: v
            .get("cluster_secrets")
            .and_then(|x| x.as_bool())
            .unwrap_or(contains_secrets),
    })
}

/// The build id `out/<role>/latest` points at, if that build is complete.
fn latest(out_dir: &Path, role: &str) -> Option<String> {
    let link = crate::project::layout::Out::new(out_dir).latest(role);
    let target = std::fs::read_link(&link).ok()?;
    let id = target.file_name()?.to_str()?.to_string();
    out_dir
        .join(role)
        .join(&id)
        .join(sign::SUMS)
        .is_file()
        .then_some(id)
}

/// The recipe's kernel arguments: the disk command line without live-boot's root selection.
pub fn recipe_args(cmdline: &str) -> Vec<String> {
    cmdline
        .split_whitespace()
        .filter(|a| *a != "boot=live" && *a != "plainroot" && !a.starts_with("root="))
        .map(str::to_string)
        .collect()
}

pub use crate::pipeline::resolve::short_id as short;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_checked_before_they_are_read() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let data: Vec<u8> = (0..(PIECE * 2 + 100)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let no_cache = Arc::new(PieceCache::new(0));
        let b = Blob::open_pinned(&p, &no_cache).unwrap();
        assert_eq!(b.len, data.len() as u64);
        assert_eq!(b.read_all().unwrap(), data);
        let mut buf = vec![0u8; 300];
        b.read_exact_at(&mut buf, PIECE - 150).unwrap();
        assert_eq!(buf, &data[(PIECE - 150) as usize..(PIECE + 150) as usize]);
        // Same inode, changed in the second piece: that piece fails, the others still read.
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(b"X", PIECE + 10).unwrap();
        let e = b.piece(1).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("changed on disk"), "{e}");
        assert!(b.changed_on_disk());
        assert!(b.piece(0).is_ok());
        // Grown: the last piece no longer ends where it did.
        f.write_all_at(&data[(PIECE + 10) as usize..][..1], PIECE + 10)
            .unwrap();
        f.write_all_at(b"more", data.len() as u64).unwrap();
        assert!(b.piece(1).is_ok());
        assert!(b.piece(2).is_err());
        // With a cache, the verified bytes are what is read.
        let cache = Arc::new(PieceCache::new(1 << 20));
        std::fs::write(&p, &data).unwrap();
        let b = Blob::open_pinned(&p, &cache).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(b"X", 5)
            .unwrap();
        assert_eq!(b.read_all().unwrap(), data);
    }

    #[test]
    fn piece_cache_keeps_to_its_budget() {
        let c = PieceCache::new(10);
        c.put([1; 32], Bytes::from_static(b"12345"));
        c.put([2; 32], Bytes::from_static(b"12345"));
        c.put([3; 32], Bytes::from_static(b"123"));
        assert!(c.get(&[1; 32]).is_none());
        assert!(c.get(&[2; 32]).is_some() && c.get(&[3; 32]).is_some());
        c.put([4; 32], Bytes::from(vec![0u8; 11]));
        assert!(c.get(&[4; 32]).is_none());
    }

    #[test]
    fn recipe_args_drop_root_selection() {
        assert_eq!(
            recipe_args(
                "boot=live plainroot root=/dev/disk/by-partuuid/x console=tty0 console=ttyS0,115200n8"
            ),
            vec!["console=tty0", "console=ttyS0,115200n8"]
        );
    }
}
