//! The one wrapper for external tools, and the one list of host tools kiln needs.
//!
//! Every external command goes through [`Tool::command`] + [`run`]: the full command is
//! logged at debug level, stderr is captured and its tail lands in the error, and a missing
//! binary gives the apt package to install.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// A host tool kiln calls.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tool {
    /// Binary name looked up in `PATH`.
    pub name: &'static str,
    /// Debian package that provides it.
    pub package: &'static str,
    /// What kiln uses it for.
    pub purpose: &'static str,
    /// Whether `kiln build` cannot run without it.
    pub required_for_build: bool,
}

pub const MMDEBSTRAP: Tool = Tool {
    name: "mmdebstrap",
    package: "mmdebstrap",
    purpose: "base stage: Debian rootfs from the host's apt sources",
    required_for_build: true,
};
pub const TAR2SQFS: Tool = Tool {
    name: "tar2sqfs",
    package: "squashfs-tools-ng",
    purpose:
        "tests: sqfs2tar/sqfsdiff read back kiln's root.squashfs (an independent implementation)",
    required_for_build: false,
};
pub const QEMU_IMG: Tool = Tool {
    name: "qemu-img",
    package: "qemu-utils",
    purpose: "emit: disk.qcow2 from disk.raw",
    required_for_build: true,
};
pub const UNSQUASHFS: Tool = Tool {
    name: "unsquashfs",
    package: "squashfs-tools",
    purpose: "tests and `kiln inspect`: read back root.squashfs",
    required_for_build: false,
};
pub const QEMU_SYSTEM: Tool = Tool {
    name: "qemu-system-x86_64",
    package: "qemu-system-x86",
    purpose: "boot tests (TCG)",
    required_for_build: false,
};
pub const SFDISK: Tool = Tool {
    name: "sfdisk",
    package: "fdisk",
    purpose: "tests: read back the GPT of disk.raw",
    required_for_build: false,
};
pub const MTOOLS: Tool = Tool {
    name: "mdir",
    package: "mtools",
    purpose: "tests: read back the FAT ESP without loop devices",
    required_for_build: false,
};
pub const ISOINFO: Tool = Tool {
    name: "isoinfo",
    package: "genisoimage",
    purpose: "tests: read back the cidata seed ISO (Rock Ridge, Joliet, data)",
    required_for_build: false,
};
pub const GENISOIMAGE: Tool = Tool {
    name: "genisoimage",
    package: "genisoimage",
    purpose: "tests: reference writer the seed ISO is compared with",
    required_for_build: false,
};
pub const XORRISO: Tool = Tool {
    name: "xorriso",
    package: "xorriso",
    purpose: "tests: second reader of the seed ISO",
    required_for_build: false,
};
pub const SEVENZIP: Tool = Tool {
    name: "7z",
    package: "p7zip-full",
    purpose: "tests: third reader of the seed ISO (Joliet)",
    required_for_build: false,
};
pub const BLKID: Tool = Tool {
    name: "blkid",
    package: "util-linux",
    purpose: "tests: the label and type cloud-init finds the seed ISO by",
    required_for_build: false,
};

pub const MKSQUASHFS: Tool = Tool {
    name: "mksquashfs",
    package: "squashfs-tools",
    purpose: "`kiln bench`: reference squashfs writer",
    required_for_build: false,
};
pub const ZSTD: Tool = Tool {
    name: "zstd",
    package: "zstd",
    purpose: "`kiln bench`: reference zstd (-T0)",
    required_for_build: false,
};

pub const NGINX: Tool = Tool {
    name: "nginx",
    package: "nginx-light",
    purpose: "`kiln bench`: reference HTTP server for the pxe part",
    required_for_build: false,
};
pub const TFTPD_HPA: Tool = Tool {
    name: "in.tftpd",
    package: "tftpd-hpa",
    purpose: "`kiln bench`: reference TFTP server for the pxe part",
    required_for_build: false,
};

/// Every host tool kiln knows about, in the order `kiln doctor` prints them.
pub const ALL: &[Tool] = &[
    MMDEBSTRAP,
    TAR2SQFS,
    QEMU_IMG,
    UNSQUASHFS,
    QEMU_SYSTEM,
    SFDISK,
    MTOOLS,
    ISOINFO,
    GENISOIMAGE,
    XORRISO,
    SEVENZIP,
    BLKID,
    MKSQUASHFS,
    ZSTD,
    NGINX,
    TFTPD_HPA,
];

/// UEFI firmware used by boot tests (file, not a binary in PATH).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

impl Tool {
    /// Full path of the binary, if present in `PATH` (or in /usr/sbin and /sbin, which a
    /// user's `PATH` often lacks: nginx and in.tftpd live there).
    pub fn find(&self) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .map(|d| d.join(self.name))
            .find(|p| p.is_file())
    }

    /// A `Command` for this tool, or an error telling how to install it.
    pub fn command(&self) -> Result<Command> {
        match self.find() {
            Some(p) => Ok(Command::new(p)),
            None => bail!(
                "{} not found in PATH (needed for {}); install it with `apt-get install {}` or run `kiln doctor`",
                self.name,
                self.purpose,
                self.package
            ),
        }
    }
}

/// Makes the child get SIGTERM when kiln dies (even by SIGKILL), so a killed build leaves no
/// mmdebstrap running on (SIGTERM lets mmdebstrap clean up its chroot).
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// Runs a command to completion, capturing stdout/stderr; a non-zero exit is an error that
/// carries the command line and the tail of stderr. The child dies with kiln.
pub fn run(cmd: &mut Command) -> Result<Output> {
    die_with_parent(cmd);
    let line = format!("{cmd:?}");
    tracing::debug!(command = %line, "running");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}):\n{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stderr), 30)
        );
    }
    Ok(out)
}

/// Last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One row of `kiln doctor`.
#[derive(Debug, Serialize)]
pub struct ToolStatus {
    #[serde(flatten)]
    pub tool: Tool,
    pub path: Option<PathBuf>,
}

pub fn status() -> Vec<ToolStatus> {
    ALL.iter()
        .map(|t| ToolStatus {
            tool: *t,
            path: t.find(),
        })
        .collect()
}
