//! qemu helpers: boot an image under TCG with a serial console and wait for a marker line.
//!
//! Used by the boot tests and by `kiln` itself wherever a real boot is the check. KVM hangs on
//! the machines kiln is developed on, so the accelerator is TCG unless the caller says otherwise.

use crate::sys::tools::{self, OVMF_CODE, QEMU_SYSTEM};

/// OVMF's variable store template (each boot gets a copy).
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
use anyhow::{bail, Context, Result};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A qemu command that boots `disk` (qcow2 or raw, opened read-only via `snapshot=on`) under
/// UEFI (OVMF) with TCG, the serial console on stdout and user-mode networking.
/// `vars` is a scratch copy of the OVMF variable store.
/// `mac` sets the NIC's MAC (e.g. an inventory node's, so the image takes that node's identity).
pub fn uefi_disk_command(
    disk: &Path,
    vars: &Path,
    memory_mib: u32,
    mac: Option<&str>,
) -> Result<Command> {
    uefi_disk_command_with(disk, vars, memory_mib, mac, false)
}

/// [`uefi_disk_command`] with the disk written for real (`writable`: no `snapshot=on`), as a
/// machine's own disk is: what a boot changes is there for the next boot. Killing qemu is a
/// power cut (the host's page cache keeps what qemu wrote).
pub fn uefi_disk_command_with(
    disk: &Path,
    vars: &Path,
    memory_mib: u32,
    mac: Option<&str>,
    writable: bool,
) -> Result<Command> {
    if !Path::new(OVMF_CODE).is_file() {
        bail!("UEFI firmware {OVMF_CODE} not found; install it with `apt-get install ovmf`");
    }
    std::fs::copy(OVMF_VARS, vars)
        .with_context(|| format!("copying {OVMF_VARS} to {}", vars.display()))?;
    let format = if disk.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    let mut cmd = QEMU_SYSTEM.command()?;
    cmd.args(["-accel", "tcg", "-m", &memory_mib.to_string(), "-smp", "2"])
        .args([
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-monitor",
            "none",
        ])
        .args([
            "-drive",
            &format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
        ])
        .args([
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
        ])
        .args([
            "-drive",
            &format!(
                "file={},if=virtio,format={format}{}",
                disk.display(),
                if writable { "" } else { ",snapshot=on" }
            ),
        ])
        .args(["-netdev", "user,id=n0", "-device"]);
    match mac {
        Some(m) => cmd.arg(format!("virtio-net-pci,netdev=n0,mac={m}")),
        None => cmd.arg("virtio-net-pci,netdev=n0"),
    };
    // Entropy from the host: under TCG on a loaded host a guest waiting in getrandom() for the
    // kernel's jitter entropy was seen stuck for 1000+ s (systemd-random-seed, soft lockup).
    cmd.args([
        "-object",
        "rng-random,filename=/dev/urandom,id=rng0",
        "-device",
        "virtio-rng-pci,rng=rng0",
    ]);
    Ok(cmd)
}

/// Outcome of a boot that printed the marker.
#[derive(Debug)]
pub struct Booted {
    /// Wall time from start to the marker line.
    pub elapsed: Duration,
    /// The full marker line as printed.
    pub line: String,
}

/// How a PXE test machine boots: legacy BIOS (iPXE's `pxe-e1000.rom`) or UEFI (OVMF with
/// `efi-e1000.rom`; `vars` is a scratch copy of the variable store).
pub enum PxeFirmware<'a> {
    Bios,
    Uefi { vars: &'a Path },
}

/// The virtio serial of the PXE guests' disk: `/dev/disk/by-id/virtio-kiln-pxe-disk` in the guest.
pub const PXE_DISK_SERIAL: &str = "kiln-pxe-disk";

/// qemu's arguments (without the program: the caller may run it inside a network namespace)
/// for a diskless PXE boot under TCG: 2 GiB, the serial console on stdout, an empty `disk`
/// (virtio, serial [`PXE_DISK_SERIAL`]), one e1000 NIC with `mac` on the tap device `tap`.
pub fn pxe_args(firmware: PxeFirmware, disk: &Path, tap: &str, mac: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-m",
        "2048",
        "-smp",
        "2",
    ]
    .into_iter()
    .chain([
        "-nographic",
        "-no-reboot",
        "-serial",
        "stdio",
        "-monitor",
        "none",
    ])
    .map(String::from)
    .collect();
    let rom = match firmware {
        PxeFirmware::Bios => {
            a.extend(["-boot".into(), "n".into()]);
            "pxe-e1000.rom"
        }
        PxeFirmware::Uefi { vars } => {
            a.extend([
                "-drive".into(),
                format!("if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}"),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
            ]);
            "efi-e1000.rom,bootindex=1"
        }
    };
    a.extend([
        "-drive".into(),
        format!("file={},if=none,id=d0,format=raw", disk.display()),
        "-device".into(),
        format!("virtio-blk-pci,drive=d0,serial={PXE_DISK_SERIAL}"),
        "-netdev".into(),
        format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
        "-device".into(),
        format!("e1000,netdev=n0,mac={mac},romfile=/usr/lib/ipxe/qemu/{rom}"),
    ]);
    a
}

/// Runs `cmd`, copies its console output to `log`, and returns as soon as a line containing
/// `marker` appears; kills the process then. Fails (with the console tail) if the process exits
/// or `timeout` passes first.
pub fn wait_for_marker(
    cmd: Command,
    marker: &str,
    timeout: Duration,
    log: &Path,
) -> Result<Booted> {
    wait_for_marker_then_kill(cmd, marker, Duration::ZERO, timeout, log)
}

/// [`wait_for_marker`] that lets the machine run on for `after` once the marker appeared
/// (its console still copied to `log`), then kills it: a power cut at a chosen moment.
pub fn wait_for_marker_then_kill(
    mut cmd: Command,
    marker: &str,
    after: Duration,
    timeout: Duration,
    log: &Path,
) -> Result<Booted> {
    let start = Instant::now();
    let line_cmd = format!("{cmd:?}");
    tracing::debug!(command = %line_cmd, "booting");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {line_cmd}"))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel::<Option<String>>();
    let tx2 = tx.clone();
    // Reader threads are detached: a grandchild holding the pipe must not block the caller.
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx
                        .send(Some(String::from_utf8_lossy(&buf).into_owned()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = tx.send(None);
    });
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        let _ = tx2.send(if s.is_empty() {
            None
        } else {
            Some(format!("[stderr] {s}"))
        });
    });
    let mut logf =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut tail: VecDeque<String> = VecDeque::new();
    let mut eof = 0;
    let result = loop {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            break Err(format!(
                "no marker {marker:?} within {}s",
                timeout.as_secs()
            ));
        }
        match rx.recv_timeout(left) {
            Ok(Some(line)) => {
                let _ = logf.write_all(line.as_bytes());
                if line.contains(marker) {
                    let booted = Booted {
                        elapsed: start.elapsed(),
                        line: line.trim().to_string(),
                    };
                    let until = Instant::now() + after;
                    while let Some(left) = until.checked_duration_since(Instant::now()) {
                        match rx.recv_timeout(left) {
                            Ok(Some(l)) => {
                                let _ = logf.write_all(l.as_bytes());
                            }
                            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                            Err(mpsc::RecvTimeoutError::Timeout) => {}
                        }
                    }
                    break Ok(booted);
                }
                tail.push_back(line);
                if tail.len() > 40 {
                    tail.pop_front();
                }
            }
            Ok(None) => {
                eof += 1;
                if eof == 2 {
                    break Err(format!("the machine exited without printing {marker:?}"));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                break Err(format!("the machine exited without printing {marker:?}"));
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    drop(rx);
    match result {
        Ok(b) => Ok(b),
        Err(msg) => {
            let t: String = tail.iter().map(|l| l.as_str()).collect();
            bail!(
                "{msg} (console log: {}); last lines:\n{}",
                log.display(),
                tools::tail(&t, 40)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pxe_command_lines() {
        let bios = pxe_args(
            PxeFirmware::Bios,
            Path::new("/t/d.raw"),
            "tap0",
            "52:54:00:00:00:21",
        );
        assert_eq!(
            bios.join(" "),
            "qemu-system-x86_64 -accel tcg -m 2048 -smp 2 -nographic -no-reboot -serial stdio \
             -monitor none -boot n -drive file=/t/d.raw,if=none,id=d0,format=raw -device \
             virtio-blk-pci,drive=d0,serial=kiln-pxe-disk -netdev \
             tap,id=n0,ifname=tap0,script=no,downscript=no -device \
             e1000,netdev=n0,mac=52:54:00:00:00:21,romfile=/usr/lib/ipxe/qemu/pxe-e1000.rom"
        );
        let vars = Path::new("/t/vars.fd");
        let uefi = pxe_args(
            PxeFirmware::Uefi { vars },
            Path::new("/t/d.raw"),
            "tap0",
            "52:54:00:77:00:01",
        );
        assert_eq!(
            uefi.join(" "),
            format!(
                "qemu-system-x86_64 -accel tcg -m 2048 -smp 2 -nographic -no-reboot -serial stdio \
                 -monitor none -drive if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE} \
                 -drive if=pflash,format=raw,unit=1,file=/t/vars.fd \
                 -drive file=/t/d.raw,if=none,id=d0,format=raw -device \
                 virtio-blk-pci,drive=d0,serial=kiln-pxe-disk -netdev \
                 tap,id=n0,ifname=tap0,script=no,downscript=no -device \
                 e1000,netdev=n0,mac=52:54:00:77:00:01,romfile=/usr/lib/ipxe/qemu/efi-e1000.rom,bootindex=1"
            )
        );
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn marker_found() {
        let d = tempfile::tempdir().unwrap();
        let b = wait_for_marker(
            sh("echo booting; echo 'kiln: booted role=x'; exec sleep 30"),
            "kiln: booted",
            Duration::from_secs(10),
            &d.path().join("log"),
        )
        .unwrap();
        assert_eq!(b.line, "kiln: booted role=x");
        assert!(b.elapsed < Duration::from_secs(10));
    }

    #[test]
    fn marker_missing_on_exit_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let e = wait_for_marker(
            sh("echo booting; echo panic"),
            "kiln: booted",
            Duration::from_secs(10),
            &d.path().join("log"),
        )
        .unwrap_err();
        let s = format!("{e:#}");
        assert!(s.contains("exited without printing"), "{s}");
        assert!(s.contains("panic"), "{s}");
    }

    #[test]
    fn marker_missing_times_out() {
        let d = tempfile::tempdir().unwrap();
        let t = Instant::now();
        let e = wait_for_marker(
            sh("echo booting; exec sleep 60"),
            "kiln: booted",
            Duration::from_secs(2),
            &d.path().join("log"),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("no marker"));
        assert!(t.elapsed() < Duration::from_secs(20));
    }
}
