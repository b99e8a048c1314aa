//! The servers the PXE part measures kiln against: nginx (HTTP) and tftpd-hpa (TFTP), the
//! peers a user would pick. Each runs as a child of the bench on a loopback high port, with its
//! configuration and every file it writes in a scratch directory (no system config is read or
//! touched), dies with the bench (`PR_SET_PDEATHSIG`) and is stopped when dropped. A peer whose
//! binary is missing is `None`: the bench prints a visible `SKIP` row instead.

use crate::sys::tools::{self, Tool};
use anyhow::{Context, Result};
use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running peer server; SIGTERM, then SIGKILL, when dropped.
pub struct Peer {
    child: Child,
    pub name: &'static str,
}

impl Peer {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        crate::sys::os::terminate(self.child.id());
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Why a peer row is skipped, as the table shows it.
pub fn skip_reason(t: &Tool) -> String {
    format!(
        "SKIP: {} not installed (apt-get install {})",
        t.name, t.package
    )
}

/// A free loopback port (TCP or UDP), for a peer's config file.
fn free_port(udp: bool) -> Result<u16> {
    Ok(if udp {
        UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port()
    } else {
        TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()
    })
}

/// Starts `cmd` as a child that dies with this thread's process, stderr to `log`.
fn spawn(cmd: &mut Command, log: &Path, name: &'static str) -> Result<Peer> {
    let err = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    tools::die_with_parent(cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Peer { child, name })
}

/// Waits (at most 10 s) until `ready` holds; on a timeout, the peer's log tail is the error.
fn wait_ready(peer: &mut Peer, log: &Path, mut ready: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if ready() {
            return Ok(());
        }
        if let Ok(Some(st)) = peer.child.try_wait() {
            anyhow::bail!(
                "{} exited ({st}): {}",
                peer.name,
                tools::tail(&fs::read_to_string(log).unwrap_or_default(), 10)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!(
        "{} did not answer within 10 s: {}",
        peer.name,
        tools::tail(&fs::read_to_string(log).unwrap_or_default(), 10)
    )
}

/// Whether this process runs as root (the peers then run their workers as root too: their
/// default user, nobody, cannot read the bench's 0700 scratch directory).
fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
            .unwrap_or(false)
    })
}

/// nginx serving `root` (`/roles/<role>/<id>/<file>` as kiln serves it) on a loopback port,
/// configured as Debian ships it for static files (worker per core, sendfile, tcp_nopush, no
/// access log). Returns the peer and its `host:port`; `None` when nginx is not installed.
pub fn start_nginx(work: &Path, root: &Path) -> Result<Option<(Peer, String)>> {
    let Some(bin) = tools::NGINX.find() else {
        return Ok(None);
    };
    let dir = work.join("nginx");
    fs::create_dir_all(&dir)?;
    let port = free_port(false)?;
    let d = dir.display();
    let user = if is_root() { "user root root;\n" } else { "" };
    let conf = format!(
        "{user}worker_processes auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         daemon off;\nevents {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n  \
         sendfile on;\n  tcp_nopush on;\n  keepalive_timeout 65;\n  default_type \
         application/octet-stream;\n  client_body_temp_path {d}/body;\n  proxy_temp_path \
         {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
         scgi_temp_path {d}/scgi;\n  server {{\n    listen 127.0.0.1:{port};\n    root {};\n  \
         }}\n}}\n",
        root.display()
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf)?;
    let log = dir.join("stderr.log");
    let mut peer = spawn(
        Command::new(bin)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path),
        &log,
        "nginx",
    )?;
    let addr = format!("127.0.0.1:{port}");
    wait_ready(&mut peer, &log, || TcpStream::connect(&addr).is_ok())?;
    Ok(Some((peer, addr)))
}

/// tftpd-hpa (`in.tftpd -L`, foreground) serving `root` on a loopback port; `ready_file` (in
/// `root`) is fetched to know it answers. `None` when it is not installed.
pub fn start_tftpd(
    work: &Path,
    root: &Path,
    ready_file: &str,
) -> Result<Option<(Peer, SocketAddr)>> {
    let Some(bin) = tools::TFTPD_HPA.find() else {
        return Ok(None);
    };
    let dir = work.join("tftpd");
    fs::create_dir_all(&dir)?;
    let port = free_port(true)?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let log = dir.join("stderr.log");
    let mut cmd = Command::new(bin);
    cmd.arg("-L").arg("-a").arg(addr.to_string());
    if is_root() {
        // chroot into the root, as a PXE server runs it; stay root to read the scratch dir.
        cmd.args(["-u", "root", "-s"]).arg(root);
    } else {
        // No chroot without root: names are looked up under the listed directory.
        cmd.arg(root);
    }
    let mut peer = spawn(&mut cmd, &log, "tftpd-hpa")?;
    wait_ready(&mut peer, &log, || {
        super::pxe::tftp_fetch(addr, ready_file, 512, 1, Duration::from_millis(200)).is_ok()
    })?;
    Ok(Some((peer, addr)))
}

/// CPU seconds (user + system) of `pid`, of its children it has waited for (tftpd-hpa forks one
/// per transfer) and of its live children (nginx's workers).
pub fn tree_cpu(pid: u32) -> f64 {
    let own = || -> Option<f64> {
        let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
        let ticks: f64 = (11..15)
            .map(|i| f.get(i).and_then(|x| x.parse::<f64>().ok()))
            .sum::<Option<f64>>()?;
        Some(ticks / crate::sys::os::clock_ticks_per_second().max(1.0))
    };
    let mut total = own().unwrap_or(f64::NAN);
    let Ok(rd) = fs::read_dir("/proc") else {
        return total;
    };
    for e in rd.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = PathBuf::from(format!("/proc/{child}/stat"));
        let Ok(s) = fs::read_to_string(stat) else {
            continue;
        };
        let ppid = s
            .rfind(')')
            .and_then(|i| s[i + 2..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            total += super::pxe::process_cpu(child).unwrap_or(0.0);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_peer_is_a_visible_skip_with_the_package() {
        assert_eq!(
            skip_reason(&tools::NGINX),
            "SKIP: nginx not installed (apt-get install nginx-light)"
        );
        assert_eq!(
            skip_reason(&tools::TFTPD_HPA),
            "SKIP: in.tftpd not installed (apt-get install tftpd-hpa)"
        );
    }
}
