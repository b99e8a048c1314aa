//! Command-line interface (clap derive). Doc comments are the help text.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// kiln — reproducible per-role OS images for k3s clusters.
#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about,
    long_about = None,
    after_help = "Exit status: 0 ok; 1 failure; 2 user error (bad recipe, inventory or overlay, \
                  key files, unknown node, unsafe flash target; nothing written); 3 verification \
                  failed (bad or missing signature, wrong key, a file changed, missing or not \
                  covered by SHA256SUMS; `verify --rebuild` found a differing artifact)."
)]
pub struct Cli {
    /// Project directory (holds recipes/, overlays/, keys/, out/).
    #[arg(long, global = true, default_value = ".", env = "KILN_DIR")]
    pub dir: PathBuf,
    /// Output directory [default: <dir>/out].
    #[arg(long, global = true, env = "KILN_OUT")]
    pub out: Option<PathBuf>,
    /// More logging (-v info, -vv debug: every external command).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build role images into out/<role>/<build-id>/.
    Build(BuildArgs),
    /// Print a role's merged recipe and build id without building.
    Inspect(InspectArgs),
    /// Check the host tools kiln needs.
    Doctor(DoctorArgs),
    /// Create or show the cluster's keys in keys/.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Seal a Kubernetes Secret into a SealedSecret (kubeseal-compatible).
    Seal(SealArgs),
    /// Decrypt a SealedSecret with the controller's private key (round trips, debugging).
    Unseal(UnsealArgs),
    /// Render inventory nodes' cloud-init seeds (what `build` puts in out/nodes/) without building.
    Seed(SeedArgs),
    /// Check a signed output directory: SHA256SUMS.sig, then every file's sha256; or, with
    /// --rebuild, rebuild a role build from its recorded inputs and compare it byte for byte.
    ///
    /// Prints one line per file. Exit status 3 when the signature is missing, bad or made by
    /// another key, or when a file is changed, missing or not listed in SHA256SUMS; with
    /// --rebuild, when any artifact of the rebuild differs (2 when the project's inputs are not
    /// the recorded ones).
    Verify(VerifyArgs),
    /// Measure builds and compression against targets and reference tools; print a table.
    ///
    /// Works on a temporary copy of the project (the one-file overlay edit never touches the
    /// repo). Parts: cold (every role from an empty cache vs one base build), warm (rebuild
    /// after a one-file overlay edit, per stage), compress (kiln's squashfs and zstd stages vs
    /// mksquashfs and zstd -T0 on the same tree), pxe (not available yet).
    Bench(BenchArgs),
    /// Write a node's verified disk image to a block device or an image file.
    ///
    /// The image is <out>/nodes/<HOSTNAME>/disk.raw. Its signature and sha256 are checked
    /// before the target is touched (exit status 3 if they fail); a block device must be large
    /// enough and not mounted, swap, or held; the target is read back after writing.
    Flash(FlashArgs),
}

#[derive(Debug, Args)]
pub struct SeedArgs {
    /// Hostnames from the inventory [default: every node].
    pub hostnames: Vec<String>,
    /// Write <dir>/<hostname>/{meta-data,user-data,network-config[,vendor-data]} instead of
    /// printing them.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate SSH, image-signing and sealed-secrets keys and the k3s token.
    Init {
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
    /// Print fingerprints (never secrets).
    Show {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub struct SealArgs {
    /// Secret manifest (YAML or JSON); `-` or absent reads stdin.
    pub input: Option<PathBuf>,
    /// Controller certificate to seal against [default: keys/sealed-secrets.crt].
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// strict | namespace-wide | cluster-wide [default: from the Secret's annotations, else strict].
    #[arg(long)]
    pub scope: Option<String>,
    /// Write here (atomically) instead of stdout.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UnsealArgs {
    /// SealedSecret manifest; `-` or absent reads stdin.
    pub input: Option<PathBuf>,
    /// Controller private key [default: keys/sealed-secrets.key].
    #[arg(long)]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Directory holding SHA256SUMS and SHA256SUMS.sig (a build or node output directory).
    #[arg(value_name = "DIR")]
    pub path: PathBuf,
    /// Trusted public key: signing_ed25519.pub (base64) or an `ssh-ed25519 AAAA…` line
    /// [default: <dir>/keys/signing_ed25519.pub, with the global --dir].
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// DIR is a role build (out/<role>/<build-id>/): rebuild it from the recorded inputs with
    /// the project in --dir, a fresh cache (the base made again by mmdebstrap) and a temporary
    /// out dir, then compare every artifact byte for byte; differing roots get a file-list diff.
    #[arg(long)]
    pub rebuild: bool,
    /// With --rebuild: rebuild here and keep it [default: a temp dir, removed when identical].
    #[arg(long, requires = "rebuild")]
    pub work_dir: Option<PathBuf>,
    /// With --rebuild: cache whose pinned artifacts (k3s…) are copied after a sha256 check
    /// instead of downloaded; its bases are never used [default: <out>/cache].
    #[arg(long, requires = "rebuild")]
    pub cache_dir: Option<PathBuf>,
    /// With --rebuild: download nothing (artifacts must be in the cache; mmdebstrap still
    /// needs the Debian mirror).
    #[arg(long, requires = "rebuild")]
    pub offline: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Role to measure (repeatable) [default: every role that has a recipe; the gpu role's cold
    /// build takes ~13 min here].
    #[arg(long = "role", short = 'r')]
    pub roles: Vec<String>,
    /// Part to run (repeatable): cold, warm, compress, pxe [default: cold, warm, compress].
    #[arg(long = "part", short = 'p', value_parser = ["cold", "warm", "compress", "pxe"])]
    pub parts: Vec<String>,
    /// Runs per measurement; the table shows medians [default: 1 for cold, 3 for the rest].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Cache for the warm and compress parts (its bases are reused) [default: <out>/cache].
    #[arg(long, env = "KILN_CACHE")]
    pub cache_dir: Option<PathBuf>,
    /// Scratch directory (kept) [default: a temp dir under $TMPDIR, removed afterwards].
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FlashArgs {
    /// Node host name: its image is <out>/nodes/<HOSTNAME>/disk.raw.
    pub hostname: String,
    /// Block device (/dev/sdX, /dev/nvme0n1, /dev/disk/by-id/…) or image file (created if
    /// missing, written sparse).
    pub target: PathBuf,
    /// Check the signature, the image and the target; print what would be written; write
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Trusted public key [default: <dir>/keys/signing_ed25519.pub].
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Do not ask before overwriting a block device (required when stdin is not a terminal).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Role to build (repeatable) [default: every role that has a recipe].
    #[arg(long = "role", short = 'r')]
    pub roles: Vec<String>,
    /// Cache directory [default: <out>/cache].
    #[arg(long, env = "KILN_CACHE")]
    pub cache_dir: Option<PathBuf>,
    /// Rebuild even if the build id already exists in out/.
    #[arg(long)]
    pub force: bool,
    /// Never use the network: artifacts and bases must be in the cache.
    #[arg(long)]
    pub offline: bool,
    /// Fail if kiln.lock would change (CI: prove the recorded inputs were used).
    #[arg(long)]
    pub locked: bool,
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Role to inspect.
    #[arg(long, short = 'r')]
    pub role: String,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn positional_args_do_not_shadow_global_dir() {
        let c = Cli::try_parse_from(["kiln", "--dir", "/p", "verify", "/d"]).unwrap();
        assert_eq!(c.dir, PathBuf::from("/p"));
        let Command::Verify(v) = c.command else {
            panic!()
        };
        assert_eq!(v.path, PathBuf::from("/d"));
        assert!(!v.rebuild);
    }

    #[test]
    fn verify_rebuild_options() {
        let c = Cli::try_parse_from(["kiln", "verify", "--rebuild", "out/worker/latest", "--json"])
            .unwrap();
        let Command::Verify(v) = c.command else {
            panic!()
        };
        assert!(v.rebuild && v.json);
        assert_eq!(v.path, PathBuf::from("out/worker/latest"));
        // The rebuild-only options need --rebuild.
        assert!(Cli::try_parse_from(["kiln", "verify", "--work-dir", "/w", "/d"]).is_err());
        let c =
            Cli::try_parse_from(["kiln", "bench", "--role", "worker", "--part", "pxe"]).unwrap();
        let Command::Bench(b) = c.command else {
            panic!()
        };
        assert_eq!(b.roles, vec!["worker".to_string()]);
        assert_eq!(b.parts, vec!["pxe".to_string()]);
        assert!(Cli::try_parse_from(["kiln", "bench", "--part", "nope"]).is_err());
    }
}
