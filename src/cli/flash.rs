//! `kiln flash`: writes a node's verified disk image and reports what it checked and wrote.

use super::args::FlashArgs;
use super::{print_json, Ctx};
use crate::deliver::flash::{flash, FlashOptions, Protected};
use crate::project::layout::key;
use crate::trust::sign;
use anyhow::{Context, Result};
use indicatif::HumanBytes;
use std::io::{self, Write};

pub(crate) fn flash_cmd(cx: &Ctx, a: &FlashArgs) -> Result<()> {
    let key_path = cx.key(&a.key, key::VERIFYING_KEY);
    let l = &cx.layout;
    let mut protected = vec![
        Protected::new(l.keys(), "inside the project's keys directory"),
        Protected::new(l.recipes(), "inside the project's recipes directory"),
        Protected::new(l.overlays(), "inside the project's overlays directory"),
        Protected::new(l.lock_file(), "the project's kiln.lock"),
        Protected::new(cx.out.dir(), "inside the output directory"),
        Protected::new(cx.cache_dir(&None), "inside the cache directory"),
        Protected::new(&key_path, "the trusted public key"),
    ];
    if let Some(c) = std::env::var_os("KILN_CACHE").filter(|c| !c.is_empty()) {
        protected.push(Protected::new(
            c,
            "inside the cache directory ($KILN_CACHE)",
        ));
    }
    if let Ok(exe) = std::env::current_exe() {
        protected.push(Protected::new(exe, "the running kiln binary"));
    }
    flash_command(cx.out.dir(), a, &key_path, protected)
}

/// `kiln flash`: runs [`flash`] and prints its report in plain words (or JSON) on stdout.
fn flash_command(
    out_dir: &std::path::Path,
    a: &FlashArgs,
    key_path: &std::path::Path,
    protected: Vec<Protected>,
) -> Result<()> {
    let key = sign::load_verifying_key(key_path)?;
    let opts = FlashOptions {
        out_dir: out_dir.to_path_buf(),
        hostname: a.hostname.clone(),
        target: a.target.clone(),
        key,
        dry_run: a.dry_run,
        yes: a.yes,
        keep_data: a.keep_data,
        progress: true,
        protected,
    };
    let r = flash(&opts)?;
    let mut o = io::stdout().lock();
    if a.json {
        return print_json(&r);
    }
    let size = r
        .target
        .size
        .map(|s| format!(", {s} bytes"))
        .unwrap_or_default();
    let lines = [
        format!(
            "signature: good, {} signed by key {}",
            r.node_dir.join(sign::SUMS).display(),
            r.signer
        ),
        format!(
            "image:     {} ({} bytes, {}), sha256 {} matches the signed SHA256SUMS",
            r.image.display(),
            r.image_size,
            HumanBytes(r.image_size),
            r.sha256
        ),
        format!(
            "target:    {}: {}{size}",
            r.target.path.display(),
            r.target.description
        ),
    ];
    for l in lines {
        writeln!(o, "{l}").context("writing to stdout")?;
    }
    if r.dry_run {
        writeln!(
            o,
            "dry run: would write {} bytes of {} to {}; nothing was written",
            r.image_size,
            r.hostname,
            r.target.path.display()
        )
        .context("writing to stdout")?;
    } else {
        writeln!(
            o,
            "wrote {} to {} ({} bytes of data), synced, read back: sha256 matches",
            r.hostname,
            r.target.path.display(),
            r.bytes_written
        )
        .context("writing to stdout")?;
    }
    Ok(())
}
