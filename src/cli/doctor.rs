//! `kiln doctor`: the host tools kiln needs, found or missing (with the package to install),
//! and the modes of the project's keys/.

use super::args::DoctorArgs;
use super::{print_json, Ctx};
use crate::sys::tools;
use anyhow::{bail, Result};
use std::io::Write;
use std::path::Path;

pub(crate) fn doctor(cx: &Ctx, a: &DoctorArgs) -> Result<()> {
    let st = tools::status();
    let keys_dir = cx.layout.keys();
    let key_warnings = crate::trust::keys::permission_warnings(&keys_dir);
    if a.json {
        print_json(&st)?;
        for w in &key_warnings {
            eprintln!("warning: {w}");
        }
    } else {
        let mut o = std::io::stdout().lock();
        for s in &st {
            let state = match &s.path {
                Some(p) => format!("found   {}", p.display()),
                None => format!("MISSING apt-get install {}", s.tool.package),
            };
            writeln!(o, "{:<20} {:<48} {}", s.tool.name, state, s.tool.purpose)?;
        }
        let state = if Path::new(tools::OVMF_CODE).is_file() {
            format!("found   {}", tools::OVMF_CODE)
        } else {
            "MISSING apt-get install ovmf".to_string()
        };
        writeln!(o, "{:<20} {state:<48} boot tests (UEFI firmware)", "OVMF")?;
        for (f, purpose) in [
            (
                "undionly.kpxe",
                "kiln serve: iPXE for BIOS PXE clients (TFTP)",
            ),
            (
                "ipxe.efi",
                "kiln serve: iPXE for UEFI x64 clients (TFTP/HTTP)",
            ),
        ] {
            let p = Path::new(crate::deliver::serve::DEFAULT_IPXE_DIR).join(f);
            let state = if p.is_file() {
                format!("found   {}", p.display())
            } else {
                "MISSING apt-get install ipxe".to_string()
            };
            writeln!(o, "{f:<20} {state:<48} {purpose}")?;
        }
        if keys_dir.is_dir() {
            let state = if key_warnings.is_empty() {
                format!("modes ok {}", keys_dir.display())
            } else {
                format!("WARNING  {} problem(s), below", key_warnings.len())
            };
            writeln!(
                o,
                "{:<20} {state:<48} private files 0600, nothing group/world-writable",
                "keys/"
            )?;
            for w in &key_warnings {
                writeln!(o, "  {w}")?;
            }
        }
    }
    let missing: Vec<&str> = st
        .iter()
        .filter(|s| s.path.is_none() && s.tool.required_for_build)
        .map(|s| s.tool.package)
        .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools needed by `kiln build`; install them with: apt-get install {}",
            missing.join(" ")
        );
    }
    Ok(())
}
