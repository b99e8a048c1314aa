//! Base stage: a Debian rootfs tarball from `mmdebstrap`, cached by its inputs.
//!
//! One base per (suite, variant, components, package set, SOURCE_DATE_EPOCH): roles whose
//! merged recipes ask for the same packages share one cached tarball.

use crate::project::recipe::Recipe;
use crate::sys::tools::{self, MMDEBSTRAP};
use crate::sys::util;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Inputs that fully determine the base tarball (modulo the apt archive's contents).
#[derive(Debug, Clone, Serialize)]
pub struct BaseSpec {
    pub suite: String,
    pub variant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    pub components: Vec<String>,
    /// Sorted, de-duplicated.
    pub packages: Vec<String>,
    pub source_date_epoch: i64,
    /// Pinned `.deb` files installed with `packages` (recipe order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub debs: Vec<BaseDeb>,
    /// sha256 of the module-signing certificate DKMS signs with (`debian.sign_modules`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module_signing_cert: Option<String>,
    /// `debian.customize`: commands run in the chroot after the packages, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub customize: Vec<String>,
}

/// A pinned `.deb` of a base: its file name (from the URL) and digest.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BaseDeb {
    pub file: String,
    pub sha256: String,
}

/// What a base build needs besides its spec: the fetched `.deb` files (in `spec.debs` order)
/// and the module-signing key pair.
#[derive(Default)]
pub struct BaseInputs {
    pub debs: Vec<PathBuf>,
    pub module_signing: Option<crate::trust::keys::ModuleSigning>,
}

/// Where DKMS looks for its signing key pair (Debian's dkms 3.0: `mok_signing_key`,
/// `mok_certificate` defaults); when both exist it uses them instead of generating a key.
pub const DKMS_MOK_KEY: &str = "var/lib/dkms/mok.key";
pub const DKMS_MOK_CERT: &str = "var/lib/dkms/mok.pub";

impl BaseSpec {
    /// `module_signing_cert`: sha256 of the module-signing certificate when the recipe sets
    /// `debian.sign_modules` (see [`crate::trust::keys::module_signing`]).
    pub fn new(
        recipe: &Recipe,
        source_date_epoch: i64,
        module_signing_cert: Option<String>,
    ) -> Self {
        let packages: BTreeSet<String> = recipe.debian.packages.iter().cloned().collect();
        BaseSpec {
            debs: recipe
                .debian
                .debs
                .iter()
                .map(|d| BaseDeb {
                    file: crate::project::recipe::Debian::deb_file_name(&d.url).to_string(),
                    sha256: d.sha256.clone(),
                })
                .collect(),
            module_signing_cert,
            customize: recipe.debian.customize.clone(),
            suite: recipe.debian.suite.clone(),
            variant: recipe.debian.variant.clone(),
            mirror: recipe.debian.mirror.clone(),
            components: recipe.debian.components.clone(),
            packages: packages.into_iter().collect(),
            source_date_epoch,
        }
    }

    /// Machine-independent key of the recipe-level inputs (part of the build id).
    pub fn key(&self) -> String {
        // Bumped when kiln makes a base differently from the same spec (2: one initramfs,
        // made after the recipe's commands; 3: kiln's initramfs script, whose text is hashed
        // in too).
        let hook = util::sha256_hex(crate::pipeline::state::initramfs_customize_hook().as_bytes());
        let json = serde_json::to_vec(&("kiln.base/3", self, hook)).expect("serialisable");
        util::sha256_hex(&json)
    }

    /// Cache key: the spec plus what on this host changes mmdebstrap's output (its version and
    /// the apt sources it falls back to when the recipe names no mirror).
    pub fn cache_key(&self) -> Result<String> {
        let mut h = String::new();
        h.push_str(&self.key());
        h.push('\n');
        h.push_str(&mmdebstrap_version()?);
        if self.mirror.is_none() {
            h.push('\n');
            h.push_str(&host_apt_sources());
        }
        Ok(util::sha256_hex(h.as_bytes()))
    }
}

/// `mmdebstrap --version`, asked once per process (every role's cache key needs it).
fn mmdebstrap_version() -> Result<String> {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(v) = V.get() {
        return Ok(v.clone());
    }
    let out = tools::run(MMDEBSTRAP.command()?.arg("--version"))?;
    let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(V.get_or_init(|| v).clone())
}

/// The host's apt source definitions, concatenated in a fixed order.
fn host_apt_sources() -> String {
    let mut files: Vec<PathBuf> = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .collect::<Vec<_>>()
        .join("\n")
}

/// A built (or cached) base.
#[derive(Debug, Clone)]
pub struct Base {
    /// `rootfs.tar` as written by mmdebstrap.
    pub tar: PathBuf,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// File beside a cached `rootfs.tar` holding its sha256 (hex), written when the base is made and
/// checked every time it is used.
pub const DIGEST_FILE: &str = "rootfs.tar.sha256";

/// State of a cached base's `rootfs.tar` against its recorded digest.
#[derive(Debug, PartialEq, Eq)]
pub enum CacheCheck {
    Good,
    /// The tarball's sha256 is not the recorded one (damaged or truncated).
    Corrupt {
        recorded: String,
        actual: String,
    },
    /// Made by a kiln that did not record digests yet.
    Unrecorded {
        actual: String,
    },
}

/// Hashes `<dir>/rootfs.tar` and compares it with `<dir>/rootfs.tar.sha256`.
pub fn check_cached(dir: &Path) -> Result<CacheCheck> {
    let (actual, _) = util::sha256_file(&dir.join("rootfs.tar"))?;
    let p = dir.join(DIGEST_FILE);
    match util::read_small_string(&p, 4096, DIGEST_FILE) {
        Ok(r) if r.trim() == actual => Ok(CacheCheck::Good),
        Ok(r) => Ok(CacheCheck::Corrupt {
            recorded: r.trim().to_string(),
            actual,
        }),
        Err(e) if util::is_not_found(&e) => Ok(CacheCheck::Unrecorded { actual }),
        Err(e) => Err(e),
    }
}

/// Takes the lock of one base in `<cache>/base/` (its build and its cache check hold it),
/// waiting, with a message, while another kiln holds it. Different bases build side by side.
fn lock_base(parent: &Path, key: &str) -> Result<fs::File> {
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    crate::sys::util::lock_file(
        &parent.join(format!(".lock-{key}")),
        "another kiln is building this base",
    )
}

/// Removes leftovers of killed builds of the base `key` (we hold its lock, so none is live),
/// and of temp dirs named without a key (kiln before per-base locks).
fn clean_stale_base(parent: &Path, key: &str) -> Result<()> {
    let Ok(rd) = fs::read_dir(parent) else {
        return Ok(());
    };
    let ours = format!(".tmp-base-{key}-");
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(".tmp-base-") else {
            continue;
        };
        let keyed = rest.len() > 65 && rest.as_bytes()[64] == b'-';
        if name.starts_with(&ours) || !keyed {
            let p = e.path();
            tracing::info!(path = %p.display(), "removing leftovers of an interrupted base build");
            fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// Returns the cached base for `spec`, building it with mmdebstrap if absent. A cached base is
/// checked against its recorded sha256 first; a damaged one is removed and built again (with
/// `offline`, that is an error).
/// The base of `spec` from the cache, or made by mmdebstrap and cached; `checked`: the caller built or checked this cache entry moments ago in this
/// process, so a present entry is used without hashing its `rootfs.tar` again.
pub fn ensure_with(
    spec: &BaseSpec,
    inputs: &BaseInputs,
    cache_dir: &Path,
    offline: bool,
    checked: bool,
) -> Result<Base> {
    let cache_key = spec.cache_key()?;
    let parent = crate::project::layout::Cache::new(cache_dir).bases();
    let dir = parent.join(&cache_key);
    let tar = dir.join("rootfs.tar");
    let _lock = lock_base(&parent, &cache_key)?;
    clean_stale_base(&parent, &cache_key)?;
    if tar.is_file() && dir.join("spec.json").is_file() {
        let state = if checked && dir.join(DIGEST_FILE).is_file() {
            CacheCheck::Good
        } else {
            check_cached(&dir)?
        };
        match state {
            CacheCheck::Good => return Ok(Base { tar, cached: true }),
            CacheCheck::Unrecorded { actual } => {
                tracing::info!("recording the digest of the cached base {}", dir.display());
                util::write_atomic(&dir.join(DIGEST_FILE), format!("{actual}\n").as_bytes())?;
                return Ok(Base { tar, cached: true });
            }
            CacheCheck::Corrupt { recorded, actual } => {
                tracing::warn!(
                    "cached base {} is corrupt (rootfs.tar sha256 {actual}, recorded {recorded}); removing it",
                    dir.display()
                );
                fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing corrupt base {}", dir.display()))?;
                if offline {
                    bail!(
                        "the cached base {} was corrupt (rootfs.tar sha256 {actual}, recorded {recorded}) and has been removed; --offline cannot make it again: run once without --offline (or copy a good out/cache/base/ from another machine)",
                        dir.display()
                    );
                }
            }
        }
    }
    if offline {
        bail!(
            "--offline: the base for suite {} ({} packages) is not in the cache {}; run one build online first (or copy out/cache/ from a machine that did)",
            spec.suite,
            spec.packages.len(),
            dir.display()
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-base-{cache_key}-"))
        .tempdir_in(&parent)
        .with_context(|| format!("creating a temp dir in {}", parent.display()))?;
    let tmp_tar = tmp.path().join("rootfs.tar");
    // The signing pair sits in the base's temp dir (removed on failure, and by the next
    // build's stale-dir clean-up after a kill), never in the finished cache entry.
    let signing_dir = tmp.path().join("signing");
    let staged = stage_inputs(spec, inputs, &signing_dir)?;
    let mut cmd = MMDEBSTRAP.command()?;
    cmd.env("SOURCE_DATE_EPOCH", spec.source_date_epoch.to_string())
        .env("LC_ALL", "C.UTF-8")
        // The kernel's postinst makes no initramfs; INITRAMFS_HOOK makes it once at the end.
        .env("INITRD", "No")
        .args(mmdebstrap_args(
            spec,
            staged.debs.as_ref().map(|s| s.path()),
            staged.signing.as_deref(),
            &tmp_tar,
        ));
    let run = tools::run(&mut cmd);
    if let Some(d) = &staged.signing {
        fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
    }
    run.context("base stage: mmdebstrap failed (check the package names, the pinned .deb files' dependencies and that `apt-get update` works on this host)")?;
    drop(staged);
    util::sync_path(&tmp_tar)?;
    let (digest, _) = util::sha256_file(&tmp_tar)?;
    util::write_atomic(
        &tmp.path().join(DIGEST_FILE),
        format!("{digest}\n").as_bytes(),
    )?;
    let spec_json = serde_json::to_vec_pretty(spec)?;
    util::write_atomic(&tmp.path().join("spec.json"), &spec_json)?;
    let tmp_path = tmp.keep();
    if dir.exists() {
        // A concurrent build won the race; keep theirs.
        fs::remove_dir_all(&tmp_path).ok();
    } else {
        fs::rename(&tmp_path, &dir)
            .with_context(|| format!("moving base into {}", dir.display()))?;
        util::sync_path(&parent)?;
    }
    Ok(Base { tar, cached: false })
}

/// The base's extra inputs, staged for mmdebstrap's hooks.
struct Staged {
    /// `/tmp/kiln-debs-*/`: the pinned `.deb` files, copied to the same path inside the chroot
    /// (apt outside the chroot and dpkg inside must see one path; mmdebstrap empties the
    /// chroot's `/tmp` at the end). Removed when dropped.
    debs: Option<tempfile::TempDir>,
    /// `mok.key` + `mok.pub`, the module-signing pair, installed where DKMS looks.
    signing: Option<PathBuf>,
}

fn stage_inputs(spec: &BaseSpec, inputs: &BaseInputs, signing_dir: &Path) -> Result<Staged> {
    let mut staged = Staged {
        debs: None,
        signing: None,
    };
    if !spec.debs.is_empty() {
        if inputs.debs.len() != spec.debs.len() {
            bail!(
                "internal: {} .deb files fetched for {} pinned",
                inputs.debs.len(),
                spec.debs.len()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("kiln-debs-")
            .tempdir_in("/tmp")
            .context("creating a staging dir in /tmp for mmdebstrap")?;
        for (d, src) in spec.debs.iter().zip(&inputs.debs) {
            fs::copy(src, dir.path().join(&d.file))
                .with_context(|| format!("staging {} for mmdebstrap", src.display()))?;
        }
        staged.debs = Some(dir);
    }
    if let Some(want) = &spec.module_signing_cert {
        let ms = inputs
            .module_signing
            .as_ref()
            .context("internal: the module-signing key was not loaded")?;
        if &ms.cert_sha256() != want {
            bail!("keys/module-signing.crt changed while kiln ran; run the build again");
        }
        fs::create_dir(signing_dir)
            .and_then(|_| {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(signing_dir, fs::Permissions::from_mode(0o700))
            })
            .with_context(|| format!("creating {}", signing_dir.display()))?;
        util::write_atomic_mode(&signing_dir.join("mok.key"), ms.key_pem.as_bytes(), 0o600)?;
        util::write_atomic_mode(&signing_dir.join("mok.pub"), &ms.cert_der, 0o644)?;
        staged.signing = Some(signing_dir.to_path_buf());
    }
    Ok(staged)
}

/// Makes each kernel's initramfs once, at the end of the base build.
///
/// mmdebstrap runs with `INITRD=No`, which Debian's kernel hooks (initramfs-tools', dracut's)
/// honour, so the kernel's postinst does not make an initramfs that a later package
/// (live-boot, cryptsetup, …) then triggers again: each generation of Debian's default
/// `MODULES=most` image takes ~20 s, a quarter of a worker base. With no initramfs present
/// the deferred `update-initramfs -u` triggers find nothing to do; this hook then makes it
/// as the kernel's hook would have, after the recipe's own commands (so it also sees what
/// they changed), and sets the `/initrd.img` links the kernel's postinst could not.
/// The initramfs is byte-identical to the one made the usual way (checked on the worker base).
pub const INITRAMFS_HOOK: &str = r#"for k in "$1"/boot/vmlinuz-*; do [ -e "$k" ] || continue; v="${k##*/vmlinuz-}"; if [ -x "$1/usr/sbin/update-initramfs" ]; then if [ -e "$1/boot/initrd.img-$v" ]; then m=-u; else m=-c; fi; chroot "$1" env -u INITRD update-initramfs "$m" -k "$v"; elif [ -x "$1/etc/kernel/postinst.d/dracut" ]; then chroot "$1" env -u INITRD /etc/kernel/postinst.d/dracut "$v" "/boot/vmlinuz-$v"; fi; if [ -x "$1/usr/bin/linux-update-symlinks" ]; then chroot "$1" env -u INITRD linux-update-symlinks install "$v" "/boot/vmlinuz-$v"; fi; done"#;

/// mmdebstrap's arguments for `spec`, writing `out`; `debs` and `signing` are the
/// [`Staged`] dirs.
fn mmdebstrap_args(
    spec: &BaseSpec,
    debs: Option<&Path>,
    signing: Option<&Path>,
    out: &Path,
) -> Vec<std::ffi::OsString> {
    let q = |p: &Path| util::shell_quote(&p.to_string_lossy());
    let mut a: Vec<std::ffi::OsString> = vec![
        format!("--variant={}", spec.variant).into(),
        "--format=tar".into(),
        format!("--components={}", spec.components.join(",")).into(),
    ];
    if !spec.packages.is_empty() {
        a.push(format!("--include={}", spec.packages.join(",")).into());
    }
    if let Some(debs) = debs {
        a.push(
            format!(
                "--setup-hook=mkdir -p \"$1\"{d} && cp {d}/*.deb \"$1\"{d}/",
                d = q(debs)
            )
            .into(),
        );
        for d in &spec.debs {
            // A path argument: mmdebstrap hands it to apt as a local package file.
            a.push(format!("--include={}", debs.join(&d.file).display()).into());
        }
    }
    if let Some(dir) = signing {
        // Before any package is installed: DKMS finds the pair and signs with it.
        a.push(
                format!(
                    "--setup-hook=install -d -m 0755 \"$1/var/lib/dkms\" && install -m 0600 {k} \"$1/{DKMS_MOK_KEY}\" && install -m 0644 {c} \"$1/{DKMS_MOK_CERT}\"",
                    k = q(&dir.join("mok.key")),
                    c = q(&dir.join("mok.pub")),
                )
                .into(),
            );
    }
    for c in &spec.customize {
        a.push(
            format!(
                "--customize-hook=chroot \"$1\" /bin/sh -euc {}",
                util::shell_quote(c)
            )
            .into(),
        );
    }
    // kiln's initramfs script (the node's identity from its seed, before systemd starts),
    // then the initramfs, once, after every package and recipe command (see INITRAMFS_HOOK).
    a.push(
        format!(
            "--customize-hook={}",
            crate::pipeline::state::initramfs_customize_hook()
        )
        .into(),
    );
    a.push(format!("--customize-hook={INITRAMFS_HOOK}").into());
    if signing.is_some() {
        // The private half leaves the base (and so every image); DKMS's build logs carry
        // the build's date and time. Last, so no recipe command undoes it.
        a.push(
            format!(
                "--customize-hook=rm -f \"$1/{DKMS_MOK_KEY}\" && find \"$1/var/lib/dkms\" -path '*/log/make.log' -type f -delete"
            )
            .into(),
        );
    }
    a.push(spec.suite.clone().into());
    a.push(out.into());
    if let Some(m) = &spec.mirror {
        a.push(m.into());
    }
    a
}

/// An installed Debian package as recorded in `/var/lib/dpkg/status`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// Parses dpkg's status file, keeping installed packages, sorted by name.
pub fn parse_dpkg_status(text: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let field = |name: &str| {
            para.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                .map(|v| v.trim().to_string())
        };
        let (Some(name), Some(version), Some(status)) =
            (field("Package"), field("Version"), field("Status"))
        else {
            continue;
        };
        if !status.ends_with(" installed") {
            continue;
        }
        out.push(Package {
            name,
            version,
            architecture: field("Architecture").unwrap_or_default(),
            source: field("Source"),
        });
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A base build cleans only its own leftovers (and unkeyed ones of older kilns): another
    /// base may be building next to it.
    #[test]
    fn stale_base_dirs_of_other_bases_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let (ours, theirs) = ("a".repeat(64), "b".repeat(64));
        for n in [
            format!(".tmp-base-{ours}-x1y2z3"),
            format!(".tmp-base-{theirs}-q1w2e3"),
            ".tmp-base-r4t5y6".to_string(),
            ours.clone(),
        ] {
            fs::create_dir_all(d.path().join(n).join("sub")).unwrap();
        }
        clean_stale_base(d.path(), &ours).unwrap();
        let mut left: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [format!(".tmp-base-{theirs}-q1w2e3"), ours]);
    }

    fn spec() -> BaseSpec {
        BaseSpec {
            suite: "bookworm".into(),
            variant: "minbase".into(),
            mirror: None,
            components: vec!["main".into(), "non-free".into()],
            packages: vec!["nvidia-driver".into(), "systemd".into()],
            source_date_epoch: 1_700_000_000,
            debs: vec![],
            module_signing_cert: None,
            customize: vec![],
        }
    }

    fn args(spec: &BaseSpec, debs: Option<&Path>, signing: Option<&Path>) -> Vec<String> {
        mmdebstrap_args(spec, debs, signing, Path::new("/o/rootfs.tar"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect()
    }

    #[test]
    fn plain_base_has_only_the_initramfs_hooks_and_an_unchanged_key() {
        let s = spec();
        assert_eq!(
            args(&s, None, None),
            [
                "--variant=minbase",
                "--format=tar",
                "--components=main,non-free",
                "--include=nvidia-driver,systemd",
                &format!(
                    "--customize-hook={}",
                    crate::pipeline::state::initramfs_customize_hook()
                ),
                &format!("--customize-hook={INITRAMFS_HOOK}"),
                "bookworm",
                "/o/rootfs.tar"
            ]
        );
        // The fields added for .debs and module signing stay out of a plain spec's key, so
        // bases cached before them remain valid.
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            !json.contains("debs") && !json.contains("module_signing"),
            "{json}"
        );
        let mut d = s.clone();
        d.module_signing_cert = Some("ab".repeat(32));
        assert_ne!(d.key(), s.key());
        let mut e = s.clone();
        e.debs.push(BaseDeb {
            file: "x_1_amd64.deb".into(),
            sha256: "cd".repeat(32),
        });
        assert_ne!(e.key(), s.key());
        assert_ne!(e.key(), d.key());
    }

    #[test]
    fn debs_and_signing_key_go_in_through_hooks() {
        let mut s = spec();
        s.debs = vec![
            BaseDeb {
                file: "b_1_amd64.deb".into(),
                sha256: "00".repeat(32),
            },
            BaseDeb {
                file: "a_1_amd64.deb".into(),
                sha256: "11".repeat(32),
            },
        ];
        s.module_signing_cert = Some("22".repeat(32));
        s.customize = vec!["echo 'a b' > /etc/x".into()];
        let a = args(
            &s,
            Some(Path::new("/tmp/kiln-debs-X")),
            Some(Path::new("/c/.tmp-base-Y/signing")),
        );
        // Each .deb is its own --include path argument, in recipe order, after the packages.
        let inc: Vec<&String> = a.iter().filter(|x| x.starts_with("--include=")).collect();
        assert_eq!(
            inc,
            [
                "--include=nvidia-driver,systemd",
                "--include=/tmp/kiln-debs-X/b_1_amd64.deb",
                "--include=/tmp/kiln-debs-X/a_1_amd64.deb"
            ]
        );
        let setup: Vec<&String> = a
            .iter()
            .filter(|x| x.starts_with("--setup-hook="))
            .collect();
        assert_eq!(setup.len(), 2);
        assert!(setup[0].contains("cp /tmp/kiln-debs-X/*.deb \"$1\"/tmp/kiln-debs-X/"));
        assert!(setup[1].contains(
            "install -m 0600 /c/.tmp-base-Y/signing/mok.key \"$1/var/lib/dkms/mok.key\""
        ));
        assert!(setup[1].contains(
            "install -m 0644 /c/.tmp-base-Y/signing/mok.pub \"$1/var/lib/dkms/mok.pub\""
        ));
        let cust: Vec<&String> = a
            .iter()
            .filter(|x| x.starts_with("--customize-hook="))
            .collect();
        assert_eq!(cust.len(), 4);
        // The recipe's commands run in the chroot, quoted for sh; then kiln's initramfs
        // script and the initramfs, after them; kiln's clean-up comes last.
        assert_eq!(
            cust[0],
            "--customize-hook=chroot \"$1\" /bin/sh -euc 'echo '\\''a b'\\'' > /etc/x'"
        );
        assert!(cust[1].contains("scripts/init-bottom/kiln-identity"));
        assert!(cust[2].contains("update-initramfs \"$m\" -k \"$v\""));
        assert!(cust[3].contains("rm -f \"$1/var/lib/dkms/mok.key\""));
        assert!(cust[3].contains("make.log"));
        assert_eq!(&a[a.len() - 2..], ["bookworm", "/o/rootfs.tar"]);
    }

    #[test]
    fn staged_inputs_hold_the_debs_and_the_key_pair() {
        let d = tempfile::tempdir().unwrap();
        let deb = d.path().join("cached-blob");
        fs::write(&deb, b"!<arch>\n").unwrap();
        let keys = d.path().join("keys");
        crate::trust::keys::init_with_rsa_bits(&keys, "t", false, 1024).unwrap();
        let ms = crate::trust::keys::module_signing(&keys).unwrap();
        let mut s = spec();
        s.debs = vec![BaseDeb {
            file: "x_1_amd64.deb".into(),
            sha256: "00".repeat(32),
        }];
        s.module_signing_cert = Some(ms.cert_sha256());
        let cert = ms.cert_der.clone();
        let inputs = BaseInputs {
            debs: vec![deb],
            module_signing: Some(ms),
        };
        let signing = d.path().join("base-tmp/signing");
        fs::create_dir_all(signing.parent().unwrap()).unwrap();
        let st = stage_inputs(&s, &inputs, &signing).unwrap();
        let p = st.debs.as_ref().unwrap().path().to_path_buf();
        assert!(p.parent() == Some(Path::new("/tmp")), "{}", p.display());
        assert_eq!(fs::read(p.join("x_1_amd64.deb")).unwrap(), b"!<arch>\n");
        assert_eq!(st.signing.as_deref(), Some(signing.as_path()));
        assert_eq!(fs::read(signing.join("mok.pub")).unwrap(), cert);
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&signing.join("mok.key")), 0o600);
        assert_eq!(mode(&signing), 0o700);
        drop(st);
        assert!(!p.exists(), "the .deb staging dir is removed");
        // A changed certificate between resolve and build is refused.
        s.module_signing_cert = Some("ff".repeat(32));
        assert!(stage_inputs(&s, &inputs, &d.path().join("other")).is_err());
        // Nothing to stage: no dirs at all.
        let none = stage_inputs(&spec(), &BaseInputs::default(), &d.path().join("x")).unwrap();
        assert!(none.debs.is_none() && none.signing.is_none());
        assert!(!d.path().join("x").exists());
    }

    #[test]
    fn cached_base_digest_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let tar = d.path().join("rootfs.tar");
        fs::write(&tar, b"a base tarball").unwrap();
        let sha = util::sha256_hex(b"a base tarball");
        assert_eq!(
            check_cached(d.path()).unwrap(),
            CacheCheck::Unrecorded {
                actual: sha.clone()
            }
        );
        fs::write(d.path().join(DIGEST_FILE), format!("{sha}\n")).unwrap();
        assert_eq!(check_cached(d.path()).unwrap(), CacheCheck::Good);
        fs::write(&tar, b"a base tarbalL").unwrap();
        assert_eq!(
            check_cached(d.path()).unwrap(),
            CacheCheck::Corrupt {
                recorded: sha,
                actual: util::sha256_hex(b"a base tarbalL")
            }
        );
    }
}
