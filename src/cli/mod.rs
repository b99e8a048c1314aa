//! The command line: clap types ([`args`]), one handler per command (the files beside this
//! one), printing (text or `--json`) and exit codes. Nothing below this layer knows clap or
//! writes to stdout.

pub mod args;
mod bench;
mod build;
mod cache;
mod docs;
mod doctor;
mod flash;
mod keys;
mod proxmox;
mod rollout;
mod seed;
mod serve;
mod verify;

use crate::project::layout::{Layout, Out};
use anyhow::{Context, Result};
pub use args::Cli;
use args::Command;
use std::path::{Path, PathBuf};

/// Process exit status for user errors in recipes/inventory/overlays, key files, and unsafe or
/// unknown flash targets.
pub const EXIT_USER_ERROR: i32 = 2;
/// Process exit status when a signature or a signed file fails verification, or a rebuild
/// differs.
pub const EXIT_VERIFY_FAILED: i32 = 3;

/// Runs a parsed command line: one arm per command.
pub fn run(cli: Cli) -> Result<()> {
    let cx = Ctx::new(&cli);
    match &cli.command {
        Command::Build(a) => build::build(&cx, a),
        Command::Inspect(a) => build::inspect(&cx, a),
        Command::Doctor(a) => doctor::doctor(&cx, a),
        Command::Keys(k) => keys::keys(&cx, k),
        Command::Seal(a) => keys::seal(&cx, a),
        Command::Unseal(a) => keys::unseal(&cx, a),
        Command::Seed(a) => seed::seed(&cx, a),
        Command::Kubeconfig(a) => keys::kubeconfig(&cx, a),
        Command::Verify(a) => verify::verify(&cx, a),
        Command::Bench(a) => bench::bench(&cx, a),
        Command::Cache(c) => cache::cache(&cx, c),
        Command::Flash(a) => flash::flash_cmd(&cx, a),
        Command::Serve(a) => serve::serve(&cx, a),
        Command::Proxmox(p) => proxmox::proxmox(&cx, p),
        Command::Rollout(c) => rollout::rollout(&cx, c),
        Command::Completions(a) => docs::completions(a),
        Command::Docs(a) => docs::docs(a),
    }
}

/// Maps an error to an exit status: 3 for verification failures (a bad signature or file, a
/// rebuild that differs), 2 for user errors (recipes, inventory, keys, sealing input, flash
/// targets, Proxmox settings and requests Proxmox rejected), 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    use crate::deliver::{flash::FlashError, proxmox::ProxmoxError};
    use crate::pipeline::reproduce::NotReproduced;
    use crate::project::recipe::RecipeError;
    use crate::trust::{keys::KeysError, pem::CertError, seal::SealError, sign::VerifyError};
    if err.chain().any(|e| {
        e.downcast_ref::<VerifyError>().is_some() || e.downcast_ref::<NotReproduced>().is_some()
    }) {
        EXIT_VERIFY_FAILED
    } else if err.chain().any(|e| {
        e.downcast_ref::<RecipeError>().is_some()
            || e.downcast_ref::<KeysError>().is_some()
            || e.downcast_ref::<SealError>().is_some()
            || e.downcast_ref::<CertError>().is_some()
            || e.downcast_ref::<FlashError>().is_some()
            || e.downcast_ref::<crate::deliver::reflash::KeepDataRefused>()
                .is_some()
            || e.downcast_ref::<crate::sys::util::InputFileError>()
                .is_some()
            || e.downcast_ref::<crate::sys::util::OutputFileError>()
                .is_some()
            || e.downcast_ref::<ProxmoxError>()
                .is_some_and(ProxmoxError::is_user_error)
    }) {
        EXIT_USER_ERROR
    } else {
        1
    }
}

/// What every command knows from the global flags: where the project and its outputs are.
pub(crate) struct Ctx {
    pub layout: Layout,
    pub out: Out,
}

impl Ctx {
    fn new(cli: &Cli) -> Ctx {
        let layout = Layout::new(&cli.dir);
        let out = Out::new(cli.out.clone().unwrap_or_else(|| layout.default_out()));
        Ctx { layout, out }
    }
    /// The project's recipes and inventory.
    pub fn project(&self) -> Result<crate::project::recipe::Project> {
        Ok(crate::project::recipe::load_project(self.layout.root())?)
    }
    /// `--cache-dir`, or `<out>/cache`.
    pub fn cache_dir(&self, flag: &Option<PathBuf>) -> PathBuf {
        flag.clone().unwrap_or_else(|| self.out.default_cache())
    }
    /// `--key`, or `keys/<name>`.
    pub fn key(&self, flag: &Option<PathBuf>, name: &str) -> PathBuf {
        flag.clone().unwrap_or_else(|| self.layout.key(name))
    }
}

/// Writes `v` as pretty JSON and a newline on stdout.
pub(crate) fn print_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<()> {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut o, v).context("writing to stdout")?;
    writeln!(o).context("writing to stdout")
}

/// A manifest argument's text, or stdin's for none or `-`; either at most
/// [`crate::trust::limits::MANIFEST`] bytes (a file must be a regular file).
pub(crate) fn read_input(p: Option<&Path>) -> Result<String> {
    use crate::trust::limits::MANIFEST;
    match p {
        Some(p) if p != Path::new("-") => crate::sys::util::read_small_string(p, MANIFEST, "input"),
        _ => {
            let mut s = String::new();
            std::io::Read::read_to_string(
                &mut std::io::Read::take(std::io::stdin().lock(), MANIFEST + 1),
                &mut s,
            )
            .context("reading stdin")?;
            if s.len() as u64 > MANIFEST {
                return Err(crate::sys::util::InputFileError {
                    what: "input".into(),
                    path: "stdin".into(),
                    problem: format!("is more than {MANIFEST} bytes; is it the right input?"),
                }
                .into());
            }
            Ok(s)
        }
    }
}
