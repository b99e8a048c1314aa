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
                  key files, unknown node, unsafe flash target, Proxmox settings or a request Proxmox rejected; \
                  nothing written); 3 verification \
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
    /// Make a kubeconfig for the cluster offline, from keys/: a client certificate signed by
    /// the cluster's client CA (keys/k3s-client-ca.*), trusting its server CA.
    ///
    /// A cluster rebuilt from the same keys/ is reachable with it: the CAs come from keys/, not
    /// from the first master. The server is `https://<api_endpoint>:6443` (or the first
    /// master's static address). The file holds a private key: it is written 0600.
    Kubeconfig(KubeconfigArgs),
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
    /// mksquashfs and zstd -T0 on the same tree), pxe (`kiln serve` on loopback: 32 concurrent
    /// HTTP clients, TFTP with and without windowsize).
    Bench(BenchArgs),
    /// Show what the cache holds and what uses it; remove what the project no longer uses.
    ///
    /// Kept: the bases of the project's roles as their recipes are now, the pinned artifacts
    /// they fetch or that builds still in <out> recorded, the block/frame indexes of its roles.
    /// Removed by `prune`: every other base, artifact and index, and leftovers of killed builds.
    /// A base a running kiln holds is left alone. With a cache shared by several projects
    /// (--cache-dir), prune from each project removes the others' entries: list first.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Write a node's verified disk image to a block device or an image file.
    ///
    /// The image is <out>/nodes/<HOSTNAME>/disk.raw. Its signature and sha256 are checked
    /// before the target is touched (exit status 3 if they fail); a block device must be large
    /// enough and not mounted, swap, or held; the target is read back after writing.
    Flash(FlashArgs),
    /// Boot bare metal over the network: ProxyDHCP, TFTP and HTTP from the signed builds.
    ///
    /// Machines in the inventory get their role build (kernel, initrd, root.squashfs fetched
    /// by live-boot) and their NoCloud seed; only builds whose signature and files verify are
    /// served. SIGHUP re-reads and re-verifies out/; SIGINT/SIGTERM stop after open transfers.
    Serve(ServeArgs),
    /// Import role images into Proxmox VE as VM templates, list them, clone nodes from them.
    ///
    /// Settings come from <dir>/proxmox.toml (url, node, storage, import_storage, bridge,
    /// token_id, token_secret_file, fingerprint, ca_file, memory, cores), overridden by
    /// KILN_PVE_URL, KILN_PVE_TOKEN_ID, KILN_PVE_TOKEN_SECRET_FILE, KILN_PVE_FINGERPRINT and the
    /// flags. See docs/guide/proxmox.md.
    #[command(subcommand)]
    Proxmox(ProxmoxCommand),
    /// Move a role's nodes to a new build in place, one healthy node at a time (A/B slots,
    /// automatic rollback); `kiln serve` carries it out.
    ///
    /// Needs `[updates]` in cluster.toml (the nodes' updater asks kiln serve at that address).
    /// The rollout is kept in <out>/rollouts/<role>.json, which `kiln serve` reads and updates:
    /// a restarted server resumes it. See docs/guide/updates.md.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Print a shell completion script on stdout.
    ///
    /// bash: `kiln completions bash > /etc/bash_completion.d/kiln`; zsh: into a directory on
    /// $fpath as `_kiln`; fish: `~/.config/fish/completions/kiln.fish`.
    Completions(CompletionsArgs),
    /// Write the command reference generated from this help text: one Markdown page per
    /// command (docs/cmd/) and, with --man, man pages.
    #[command(hide = true)]
    Docs(DocsArgs),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct DocsArgs {
    /// Directory for the Markdown pages (made if missing).
    #[arg(long, default_value = "docs/cmd")]
    pub out: PathBuf,
    /// Also write man pages (section 1) into this directory.
    #[arg(long)]
    pub man: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ProxmoxCommand {
    /// Upload a verified role build and make it a VM template (skipped if it exists).
    ///
    /// Checks the build's signature and every file first (exit status 3 if that fails), then:
    /// upload of disk.qcow2 with content=import (PVE 8.4+), VM with the disk imported,
    /// OVMF + EFI disk, cloud-init drive, serial console, converted to a template named
    /// kiln-<role>-<build id 12>. A failed run removes the VM and the upload it made.
    Import(PveImportArgs),
    /// List kiln's templates and node VMs on the Proxmox cluster.
    List(PveListArgs),
    /// Full-clone a node's role template into a VM named after the host, with the node's MAC,
    /// address, DNS and SSH keys as cloud-init settings (skipped if it exists).
    Clone(PveCloneArgs),
}

/// Connection settings shared by the proxmox commands.
#[derive(Debug, Args)]
pub struct PveConnArgs {
    /// Config file [default: <dir>/proxmox.toml].
    #[arg(long, env = "KILN_PVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// PVE node name (overrides `node`).
    #[arg(long)]
    pub node: Option<String>,
    /// Storage for VM disks (overrides `storage`).
    #[arg(long)]
    pub storage: Option<String>,
    /// Pin the server certificate by its SHA-256 fingerprint AA:BB:… (overrides `fingerprint`
    /// and $KILN_PVE_FINGERPRINT).
    #[arg(long)]
    pub fingerprint: Option<String>,
}

#[derive(Debug, Args)]
pub struct PveImportArgs {
    /// Role whose build to import.
    #[arg(long, short = 'r')]
    pub role: String,
    /// Build directory [default: <out>/<role>/latest].
    #[arg(long)]
    pub build: Option<PathBuf>,
    /// VM id for the template [default: the cluster's next free id].
    #[arg(long)]
    pub vmid: Option<u32>,
    /// Destroy an existing template of this build and import again.
    #[arg(long)]
    pub replace: bool,
    /// Let PVE download the image from this http(s) URL (the build's disk.qcow2 served by you)
    /// instead of uploading it; its sha256 is checked by PVE.
    #[arg(long, value_name = "IMAGE_URL")]
    pub url: Option<String>,
    /// Write the equivalent `qm` shell script to FILE instead of using the API (PVE < 8.4, or
    /// no API access). Needs no url or token.
    #[arg(long, value_name = "FILE")]
    pub emit_script: Option<PathBuf>,
    /// Trusted signing key [default: <dir>/keys/signing_ed25519.pub].
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: PveConnArgs,
}

#[derive(Debug, Args)]
pub struct PveListArgs {
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: PveConnArgs,
}

#[derive(Debug, Args)]
pub struct PveCloneArgs {
    /// Inventory host name (recipes/cluster.toml).
    pub hostname: String,
    /// Build id of the role template [default: the build in <out>/<role>/latest].
    #[arg(long)]
    pub build_id: Option<String>,
    /// VM id for the clone [default: the cluster's next free id].
    #[arg(long)]
    pub vmid: Option<u32>,
    /// Destroy an existing kiln VM of this host (another build, or this one) and clone again.
    #[arg(long)]
    pub replace: bool,
    /// PVE `cicustom` value, e.g. user=local:snippets/worker-1.yaml (set as well as the
    /// generated settings).
    #[arg(long)]
    pub cicustom: Option<String>,
    /// Print a JSON report on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: PveConnArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Network interface PXE clients are on: DHCP listens only there, and its IPv4 address is
    /// the one handed out (unless --advertise).
    #[arg(long, short = 'i')]
    pub interface: Option<String>,
    /// Address the HTTP and TFTP listeners bind to.
    #[arg(long, default_value = "0.0.0.0")]
    pub listen: std::net::Ipv4Addr,
    /// Address put in DHCP replies and URLs [default: --listen, else the interface's].
    #[arg(long)]
    pub advertise: Option<std::net::Ipv4Addr>,
    /// HTTP port (scripts, kernel, initrd, squashfs, seeds, /metrics, /status).
    #[arg(long, default_value_t = 8080)]
    pub http_port: u16,
    /// TFTP port (iPXE binaries).
    #[arg(long, default_value_t = 69)]
    pub tftp_port: u16,
    /// DHCP mode.
    #[arg(long, value_enum, default_value = "proxy")]
    pub dhcp: DhcpMode,
    /// DHCP port.
    #[arg(long, default_value_t = 67)]
    pub dhcp_port: u16,
    /// ProxyDHCP (PXE boot server) port.
    #[arg(long, default_value_t = 4011)]
    pub proxy_port: u16,
    /// Full DHCP mode: addresses to lease, `FIRST-LAST` (inventory nodes with a static address
    /// in the subnet always get it).
    #[arg(long, value_parser = parse_range)]
    pub dhcp_range: Option<(std::net::Ipv4Addr, std::net::Ipv4Addr)>,
    /// Full DHCP mode: subnet mask.
    #[arg(long, default_value = "255.255.255.0")]
    pub dhcp_netmask: std::net::Ipv4Addr,
    /// Full DHCP mode: default gateway.
    #[arg(long)]
    pub dhcp_router: Option<std::net::Ipv4Addr>,
    /// Full DHCP mode: DNS server (repeatable).
    #[arg(long)]
    pub dhcp_dns: Vec<std::net::Ipv4Addr>,
    /// Full DHCP mode: lease time in seconds.
    #[arg(long, default_value_t = 3600)]
    pub lease_secs: u64,
    /// Role booted by MACs that are not in the inventory [default: none: they get a
    /// "not provisioned" script].
    #[arg(long)]
    pub default_role: Option<String>,
    /// Directory with iPXE binaries (undionly.kpxe, ipxe.efi, snp.efi).
    #[arg(long, default_value = crate::deliver::serve::DEFAULT_IPXE_DIR)]
    pub ipxe_dir: PathBuf,
    /// Largest TFTP block size offered.
    #[arg(long, default_value_t = crate::deliver::serve::tftp::DEFAULT_MAX_BLKSIZE)]
    pub tftp_max_blksize: usize,
    /// Most TFTP transfers at once; a read request beyond it gets an error ("server busy").
    #[arg(long, default_value_t = crate::deliver::serve::tftp::DEFAULT_MAX_TRANSFERS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub tftp_max_transfers: u32,
    /// Most TFTP transfers at once for one client address.
    #[arg(long, default_value_t = crate::deliver::serve::tftp::DEFAULT_MAX_PER_CLIENT,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub tftp_max_per_client: u32,
    /// Seconds a TFTP transfer may take before it is ended.
    #[arg(long, default_value_t = crate::deliver::serve::tftp::DEFAULT_MAX_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub tftp_max_secs: u64,
    /// Trusted public key [default: <dir>/keys/signing_ed25519.pub].
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Seconds to let open transfers finish on shutdown.
    #[arg(long, default_value_t = 10)]
    pub grace_secs: u64,
    /// Print a JSON status line when listening and a summary when stopped.
    #[arg(long)]
    pub json: bool,
    /// Do not serve role builds or node seeds that carry secrets of the cluster
    /// (`contains_secrets: true` in manifest.json, `cluster_secrets: true` in node.json: the
    /// k3s token, a master's keys); their nodes are listed as not provisioned, with the reason.
    /// A seed's own node identity (SSH host key, k3s node password) is served either way.
    #[arg(long)]
    pub refuse_secret_builds: bool,
    /// The Kubernetes API kiln serve drains nodes through before a rollout reboots them
    /// ([updates] drain) [default: https://<api_endpoint>:6443].
    #[arg(long, value_name = "URL")]
    pub kube_api: Option<String>,
    /// MiB of memory for verified pieces of the served files (each piece is read and checked
    /// against the digest taken at verification once, then sent from memory).
    #[arg(long, default_value_t = crate::deliver::serve::catalog::DEFAULT_CACHE_MIB)]
    pub cache_mib: u64,
}

/// `--dhcp`: how DHCP is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DhcpMode {
    /// ProxyDHCP: boot information only, addresses come from the site's DHCP server.
    Proxy,
    /// Full DHCP server with a lease range (isolated networks); needs --dhcp-range.
    Full,
    /// No DHCP: the site's DHCP server points PXE clients at kiln itself.
    Off,
}

fn parse_range(s: &str) -> Result<(std::net::Ipv4Addr, std::net::Ipv4Addr), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected FIRST-LAST, e.g. 10.0.0.100-10.0.0.199"))?;
    let a: std::net::Ipv4Addr = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: std::net::Ipv4Addr = b.trim().parse().map_err(|e| format!("{b:?}: {e}"))?;
    if u32::from(a) > u32::from(b) {
        return Err(format!("{s:?}: the first address is after the last"));
    }
    Ok((a, b))
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

/// `<n>h`, `<n>d` or `<n>y` (365 days) as a duration, 1 hour to 10 years.
fn parse_validity(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s.split_at(s.len().saturating_sub(1));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not <number><h|d|y>, e.g. 365d"))?;
    let hours = match unit {
        "h" => n,
        "d" => n.saturating_mul(24),
        "y" => n.saturating_mul(365 * 24),
        _ => return Err(format!("{s:?}: the unit is h, d or y, e.g. 365d")),
    };
    if !(1..=10 * 365 * 24).contains(&hours) {
        return Err(format!("{s:?}: between 1h and 10y"));
    }
    Ok(std::time::Duration::from_secs(hours * 3600))
}

#[derive(Debug, Args)]
pub struct KubeconfigArgs {
    /// The user (the certificate's CN, what RBAC sees as the user name).
    #[arg(long, default_value = "kiln-admin")]
    pub user: String,
    /// The group (the certificate's O, what RBAC sees as the user's group); `system:masters`
    /// is cluster-admin. Bind other groups with a (Cluster)RoleBinding.
    #[arg(long, default_value = "system:masters")]
    pub group: String,
    /// How long the certificate is valid: `<n>h`, `<n>d` or `<n>y` (at most 10y).
    #[arg(long, default_value = "365d", value_parser = parse_validity)]
    pub expires: std::time::Duration,
    /// The API server URL [default: https://<api_endpoint>:6443].
    #[arg(long)]
    pub server: Option<String>,
    /// Write this file (replaced atomically, mode 0600) instead of printing.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start moving the role's nodes to a build (its `latest` unless --build).
    Start {
        #[arg(long)]
        role: String,
        /// Build id (a directory of <out>/<role>/); default: <out>/<role>/latest.
        #[arg(long)]
        build: Option<String>,
        /// Nodes updating at once.
        #[arg(long, default_value_t = 1)]
        max_unavailable: u32,
        /// Pause after the first N nodes are healthy on the new build (resume to go on).
        #[arg(long, default_value_t = 0)]
        canary: u32,
        /// Pause again after every N further healthy nodes.
        #[arg(long, default_value_t = 0)]
        pause_after: u32,
    },
    /// Show each rollout: node, from → to, step, health, elapsed.
    Status {
        /// Only this role's rollout.
        #[arg(long)]
        role: Option<String>,
        /// JSON output (the rollout files, events included).
        #[arg(long)]
        json: bool,
        /// Redraw every second until the rollouts are no longer active.
        #[arg(long)]
        watch: bool,
    },
    /// Stop assigning new nodes; nodes updating now finish.
    Pause {
        #[arg(long)]
        role: String,
    },
    /// Go on with a paused rollout, or with a stopped one (skipping the nodes that rolled
    /// back or failed).
    Resume {
        #[arg(long)]
        role: String,
    },
    /// Send every node the rollout reached back to the build it ran before.
    Abort {
        #[arg(long)]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate SSH, image-signing and sealed-secrets keys and the k3s token.
    Init {
        /// Replace existing key files.
        #[arg(long, conflicts_with = "add_missing")]
        force: bool,
        /// Only make the keys that are missing (e.g. the module-signing key a project made by
        /// an older kiln lacks); never touches an existing file.
        #[arg(long)]
        add_missing: bool,
    },
    /// Print fingerprints (never secrets).
    Show {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Print known_hosts lines for the inventory's nodes: the SSH host keys kiln derives from
    /// keys/node-identity.key, the same on every boot, build and reflash of a node.
    ///
    /// One line per node: its hostname, its FQDN when the cluster has a `domain`, and its
    /// address when it is static. Append them to ~/.ssh/known_hosts once; reflashing a node
    /// never changes them.
    KnownHosts {
        /// Hostnames from the inventory [default: every node].
        hostnames: Vec<String>,
        /// Write this file (replaced atomically) instead of printing.
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List every cache entry with its size and what uses it.
    List {
        /// Cache directory [default: <out>/cache].
        #[arg(long, env = "KILN_CACHE")]
        cache_dir: Option<PathBuf>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove the entries nothing in the project uses; print what was removed and the space freed.
    Prune {
        /// Cache directory [default: <out>/cache].
        #[arg(long, env = "KILN_CACHE")]
        cache_dir: Option<PathBuf>,
        /// Print what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
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
    /// Write here instead of stdout: a file is replaced atomically; a character device or a
    /// pipe (/dev/stdout, >(…)) is written in place; a directory or block device is refused.
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
    /// base alone takes ~5 min here, DKMS compiling the NVIDIA module].
    #[arg(long = "role", short = 'r')]
    pub roles: Vec<String>,
    /// Part to run (repeatable): cold, warm, compress, pxe [default: all four].
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
    /// Keep the node's state: rewrite only the ESP, root slot a and seed of a target that
    /// already holds this node's kiln disk, and keep its kiln-root-b and kiln-data partitions
    /// (refused, with the reason, for any other target). Without it the node comes back with
    /// empty state and the same identity.
    #[arg(long)]
    pub keep_data: bool,
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
