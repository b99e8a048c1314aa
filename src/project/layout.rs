//! Where everything of a project is: the one place its paths are spelled.
//!
//! ```text
//! <root>/recipes/<name>.toml   recipes, cluster.toml, secrets and manifests they name
//! <root>/overlays/<role>/      file trees copied into images (common/, <role>/, seed/<host>/)
//! <root>/keys/                 the cluster's keys (`kiln keys init`)
//! <root>/kiln.lock             pinned artifacts and bases (`kiln build` writes it)
//! <out>/<role>/<build-id>/     one role build; <out>/<role>/latest → the newest
//! <out>/nodes/<hostname>/      per-node seed, CIDATA volume, flashable disk
//! <out>/cache/                 base/, sha256/, squashfs-blocks/, zstd-frames/
//! ```

use std::path::{Path, PathBuf};

/// Files in `keys/`.
pub mod key {
    /// The k3s join token (secret).
    pub const K3S_TOKEN: &str = "k3s-token";
    /// SSH public keys for every node's default user.
    pub const AUTHORIZED_KEYS: &str = "authorized_keys";
    /// The sealed-secrets controller certificate (public) and key (secret).
    pub const SEALED_SECRETS_CRT: &str = "sealed-secrets.crt";
    pub const SEALED_SECRETS_KEY: &str = "sealed-secrets.key";
    /// The nodes' SSH key pair (the public half is also in [`AUTHORIZED_KEYS`]).
    pub const SSH_PRIVATE: &str = "ssh_ed25519";
    pub const SSH_PUBLIC: &str = "ssh_ed25519.pub";
    /// The image-signing ed25519 key (secret, PKCS#8 PEM) and its public half (OpenSSH).
    pub const SIGNING_KEY: &str = "signing_ed25519.pem";
    pub const VERIFYING_KEY: &str = "signing_ed25519.pub";
    /// The kernel-module signing certificate (public) and key (secret) of DKMS builds.
    pub const MODULE_SIGNING_CRT: &str = "module-signing.crt";
    pub const MODULE_SIGNING_KEY: &str = "module-signing.key";
    /// The cluster's node-identity secret (32 random bytes, hex): every node's machine-id, k3s
    /// node password and SSH host key are derived from it (`trust::identity`).
    pub const NODE_IDENTITY_KEY: &str = "node-identity.key";
    /// Keeps the secret files out of git.
    pub const GITIGNORE: &str = ".gitignore";
}

/// The name of the symlink in a role's output directory that points at its newest build.
pub const LATEST: &str = "latest";
/// The lock file at the project root.
pub const LOCK_FILE: &str = "kiln.lock";

/// A project's input paths (everything under its root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `<root>/keys`.
    pub fn keys(&self) -> PathBuf {
        self.root.join("keys")
    }
    /// `<root>/keys/<name>` (one of [`key`]).
    pub fn key(&self, name: &str) -> PathBuf {
        self.keys().join(name)
    }
    /// `<root>/recipes`.
    pub fn recipes(&self) -> PathBuf {
        self.root.join("recipes")
    }
    /// `<root>/recipes/<rel>` (a recipe file or a file a recipe names).
    pub fn recipe_file(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.recipes().join(rel)
    }
    /// `<root>/recipes/<role>.toml`.
    pub fn role_recipe(&self, role: &str) -> PathBuf {
        self.recipes().join(format!("{role}.toml"))
    }
    /// `<root>/recipes/cluster.toml`.
    pub fn cluster_file(&self) -> PathBuf {
        self.recipes().join("cluster.toml")
    }
    /// `<root>/overlays`.
    pub fn overlays(&self) -> PathBuf {
        self.root.join("overlays")
    }
    /// `<root>/kiln.lock`.
    pub fn lock_file(&self) -> PathBuf {
        self.root.join(LOCK_FILE)
    }
    /// `<root>/out`, the output directory when none is given.
    pub fn default_out(&self) -> PathBuf {
        self.root.join("out")
    }
}

/// An output directory's paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Out {
    dir: PathBuf,
}

impl Out {
    pub fn new(dir: impl Into<PathBuf>) -> Out {
        Out { dir: dir.into() }
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// `<out>/<role>`: the role's builds and its `latest` link.
    pub fn role(&self, role: &str) -> PathBuf {
        self.dir.join(role)
    }
    /// `<out>/<role>/<build-id>`.
    pub fn build(&self, role: &str, build_id: &str) -> PathBuf {
        self.role(role).join(build_id)
    }
    /// `<out>/<role>/latest`.
    pub fn latest(&self, role: &str) -> PathBuf {
        self.role(role).join(LATEST)
    }
    /// `<out>/nodes`.
    pub fn nodes(&self) -> PathBuf {
        self.dir.join("nodes")
    }
    /// `<out>/nodes/by-id`: one directory per node build (`<hostname>-<16 hex>`).
    pub fn node_builds(&self) -> PathBuf {
        self.nodes().join("by-id")
    }
    /// `<out>/nodes/<hostname>`: the link to the node's current build.
    pub fn node(&self, hostname: &str) -> PathBuf {
        self.nodes().join(hostname)
    }
    /// `<out>/rollouts`: one `<role>.json` per rollout, `nodes.json` (the nodes' last
    /// reports) and the lock both kiln serve and kiln rollout take.
    pub fn rollouts(&self) -> PathBuf {
        self.dir.join("rollouts")
    }
    /// `<out>/cache`, the cache when none is given.
    pub fn default_cache(&self) -> PathBuf {
        self.dir.join("cache")
    }
}

/// A cache directory's paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    dir: PathBuf,
}

impl Cache {
    /// The sub-folders kiln keeps in a cache (anything else there is a leftover).
    pub const ENTRIES: [&'static str; 4] = ["base", "sha256", "squashfs-blocks", "zstd-frames"];

    pub fn new(dir: impl Into<PathBuf>) -> Cache {
        Cache { dir: dir.into() }
    }
    /// `<cache>/base`: one folder per base key.
    pub fn bases(&self) -> PathBuf {
        self.dir.join("base")
    }
    /// `<cache>/base/<key>`.
    pub fn base(&self, key: &str) -> PathBuf {
        self.bases().join(key)
    }
    /// `<cache>/sha256`: pinned artifacts by digest.
    pub fn artifacts(&self) -> PathBuf {
        self.dir.join("sha256")
    }
    /// `<cache>/sha256/<digest>`.
    pub fn artifact(&self, sha256: &str) -> PathBuf {
        self.artifacts().join(sha256)
    }
    /// `<cache>/squashfs-blocks`: block indexes of earlier root.squashfs files.
    pub fn squashfs_blocks(&self) -> PathBuf {
        self.dir.join("squashfs-blocks")
    }
    /// `<cache>/zstd-frames`: frame indexes of earlier rootfs.tar.zst files.
    pub fn zstd_frames(&self) -> PathBuf {
        self.dir.join("zstd-frames")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_spelled_once() {
        let l = Layout::new("/p");
        assert_eq!(l.key(key::K3S_TOKEN), Path::new("/p/keys/k3s-token"));
        assert_eq!(l.role_recipe("worker"), Path::new("/p/recipes/worker.toml"));
        assert_eq!(l.cluster_file(), Path::new("/p/recipes/cluster.toml"));
        let o = Out::new(l.default_out());
        assert_eq!(o.latest("worker"), Path::new("/p/out/worker/latest"));
        assert_eq!(o.node("w-1"), Path::new("/p/out/nodes/w-1"));
        let c = Cache::new(o.default_cache());
        assert_eq!(c.base("k"), Path::new("/p/out/cache/base/k"));
        assert_eq!(c.artifact("ab"), Path::new("/p/out/cache/sha256/ab"));
        assert_eq!(
            c.squashfs_blocks(),
            Path::new("/p/out/cache/squashfs-blocks")
        );
        assert_eq!(c.zstd_frames(), Path::new("/p/out/cache/zstd-frames"));
        assert_eq!(
            Cache::ENTRIES,
            ["base", "sha256", "squashfs-blocks", "zstd-frames"]
        );
    }
}
