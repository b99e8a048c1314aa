//! The PXE part: `kiln serve` on loopback with a signed stand-in build, measured by concurrent
//! HTTP clients and by TFTP at three window sizes (`cargo bench --bench pxe` runs the same).

use super::{cpu_now, median, round2, Row, Timing};
use crate::project::layout::{key, Layout, Out};
use crate::sys::util;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Sizes of the files a PXE client fetches (a worker build's kernel, initrd and root.squashfs).
const PXE_FILES: [(&str, usize); 3] = [
    ("vmlinuz", 8_247_232),
    ("initrd.img", 42_393_027),
    ("root.squashfs", 237_240_320),
];
const PXE_CLIENTS: usize = 32;
const PXE_TFTP_BYTES: usize = 8 << 20;
const PXE_TFTP_BLKSIZE: usize = 1468;
const PXE_BUILD_ID: &str = "2222222222222222222222222222222222222222222222222222222222222222";

/// Reproducible filler (xorshift): incompressible like a squashfs, no RNG state.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// CPU seconds (user + system) a live process has used so far, from /proc/<pid>/stat.
fn process_cpu(pid: u32) -> Option<f64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = crate::sys::os::clock_ticks_per_second();
    Some(ticks / hz.max(1.0))
}

/// `kiln serve` started for the PXE part; stopped (SIGTERM, then SIGKILL) when dropped.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        crate::sys::os::terminate(self.0.id());
        for _ in 0..50 {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Fetches `name` over TFTP (RFC 1350 + blksize 2348 + windowsize 7440); returns the bytes.
fn tftp_fetch(server: std::net::SocketAddr, name: &str, window: u16) -> Result<usize> {
    use std::net::UdpSocket;
    let sock = UdpSocket::bind("127.0.0.1:0").context("TFTP client socket")?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut req = vec![0, 1];
    for s in [
        name,
        "octet",
        "blksize",
        &PXE_TFTP_BLKSIZE.to_string(),
        "windowsize",
        &window.to_string(),
    ] {
        req.extend_from_slice(s.as_bytes());
        req.push(0);
    }
    sock.send_to(&req, server)?;
    let mut buf = vec![0u8; PXE_TFTP_BLKSIZE + 4];
    let mut expected: u16 = 1;
    let mut total = 0;
    loop {
        let (n, from) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("TFTP: no packet from {server} for 10 s"))?;
        anyhow::ensure!(n >= 4, "TFTP: short packet from {from}");
        match buf[1] {
            6 => {
                sock.send_to(&[0, 4, 0, 0], from)?;
            }
            3 => {
                let block = u16::from_be_bytes([buf[2], buf[3]]);
                if block != expected {
                    continue;
                }
                total += n - 4;
                let last = n - 4 < PXE_TFTP_BLKSIZE;
                if last || block.is_multiple_of(window) {
                    let b = block.to_be_bytes();
                    sock.send_to(&[0, 4, b[0], b[1]], from)?;
                }
                expected = expected.wrapping_add(1);
                if last {
                    return Ok(total);
                }
            }
            _ => bail!(
                "TFTP error from kiln serve: {}",
                String::from_utf8_lossy(&buf[4..n])
            ),
        }
    }
}

/// The PXE part: `exe serve` on loopback with a signed build of a worker's real sizes (random
/// bytes: serving does not look inside), 32 concurrent HTTP clients each fetching kernel, initrd
/// and root.squashfs, and an 8 MiB TFTP transfer with windowsize 1, 4 and 16. `scale` divides
/// the file sizes (tests only).
pub fn pxe(
    project_dir: &Path,
    exe: &Path,
    work: &Path,
    role: &str,
    runs: usize,
    scale: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let stand_in = stand_in_build(project_dir, work, role, scale)?;
    let (server, http, tftp) = start_server(exe, &stand_in, role)?;
    let pid = server.0.id();
    rows.push(http_row(&http, role, &stand_in.sizes, runs, pid)?);
    tftp_rows(tftp, stand_in.tftp_bytes, runs, pid, rows)?;
    drop(server);
    Ok(())
}

/// What [`stand_in_build`] made.
struct StandIn {
    /// The scratch project with the signed build.
    project: PathBuf,
    /// The TFTP root (`--ipxe-dir`), with `big.bin`.
    ipxe: PathBuf,
    /// The build's files a PXE client fetches, and their sizes.
    sizes: Vec<(&'static str, usize)>,
    /// Size of `big.bin`.
    tftp_bytes: usize,
}

/// A copy of the project with a signed stand-in build of `role` (random bytes of a worker's
/// sizes, divided by `scale`) as its latest, and a TFTP root with a file to fetch.
fn stand_in_build(project_dir: &Path, work: &Path, role: &str, scale: usize) -> Result<StandIn> {
    let project = work.join("pxe-project");
    crate::project::copy::copy_project(project_dir, &project)?;
    // A key of the bench's own signs the stand-in build (the project's keys stay untouched).
    let layout = Layout::new(&project);
    fs::create_dir_all(layout.keys())?;
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let (_, public) = crate::trust::keys::encode_signing_key(&key)?;
    util::write_atomic(&layout.key(key::VERIFYING_KEY), public.as_bytes())?;
    let out = Out::new(layout.default_out());
    let dir = out.build(role, PXE_BUILD_ID);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let scale = scale.max(1);
    let sizes: Vec<(&str, usize)> = PXE_FILES.iter().map(|(n, l)| (*n, l / scale)).collect();
    for (i, (n, len)) in sizes.iter().enumerate() {
        fs::write(dir.join(n), noise(*len, i as u64 + 1))?;
    }
    fs::write(
        dir.join("manifest.json"),
        br#"{"kernel":{"cmdline":"boot=live console=ttyS0"}}"#,
    )?;
    let arts = crate::trust::sums::hash_artifacts(
        &dir,
        &["vmlinuz", "initrd.img", "root.squashfs", "manifest.json"],
    )?;
    fs::write(
        dir.join("SHA256SUMS"),
        crate::trust::sums::sha256sums(&arts),
    )?;
    crate::trust::sign::sign_dir(&dir, &key)?;
    std::os::unix::fs::symlink(PXE_BUILD_ID, out.latest(role))?;
    let ipxe = work.join("pxe-tftp");
    fs::create_dir_all(&ipxe)?;
    let tftp_bytes = PXE_TFTP_BYTES / scale;
    fs::write(ipxe.join("big.bin"), noise(tftp_bytes, 9))?;
    Ok(StandIn {
        project,
        ipxe,
        sizes,
        tftp_bytes,
    })
}

/// Starts `exe serve` on loopback (HTTP and TFTP on free ports, no DHCP) for the stand-in build;
/// returns it with its HTTP address (`host:port`) and TFTP address, read from its status line.
fn start_server(
    exe: &Path,
    stand_in: &StandIn,
    role: &str,
) -> Result<(Server, String, std::net::SocketAddr)> {
    use std::io::BufRead;
    let mut child = Command::new(exe)
        .arg("--dir")
        .arg(&stand_in.project)
        .args([
            "serve",
            "--json",
            "--listen",
            "127.0.0.1",
            "--http-port",
            "0",
            "--tftp-port",
            "0",
            "--dhcp",
            "off",
            "--default-role",
            role,
            "--ipxe-dir",
        ])
        .arg(&stand_in.ipxe)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {} serve", exe.display()))?;
    let stdout = child.stdout.take().context("kiln serve stdout")?;
    let server = Server(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let status: serde_json::Value = serde_json::from_str(&line)
        .with_context(|| format!("kiln serve did not start (said {line:?})"))?;
    let http = status["http"]
        .as_str()
        .context("no http address")?
        .to_string();
    let tftp: std::net::SocketAddr = status["tftp"]
        .as_str()
        .context("no tftp address")?
        .parse()?;
    Ok((server, http, tftp))
}

/// CPU seconds of this process (the clients) and of kiln serve (`pid`).
fn cpu_both(pid: u32) -> f64 {
    cpu_now() + process_cpu(pid).unwrap_or(f64::NAN)
}

/// The HTTP row: [`PXE_CLIENTS`] concurrent clients, `runs` times.
fn http_row(http: &str, role: &str, sizes: &[(&str, usize)], runs: usize, pid: u32) -> Result<Row> {
    let per_client: usize = sizes.iter().map(|(_, l)| l).sum();
    let (mut times, mut agg, mut p50, mut slowest) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let cpu0 = cpu_both(pid);
        let t0 = Instant::now();
        let res = http_clients(http, role, sizes);
        let wall = t0.elapsed().as_secs_f64();
        let cpu = cpu_both(pid) - cpu0;
        let res = res.into_iter().collect::<Result<Vec<_>>>()?;
        anyhow::ensure!(
            res.iter().all(|(g, _)| *g == per_client),
            "a PXE HTTP client got fewer bytes than were served"
        );
        let mut t: Vec<f64> = res.iter().map(|(_, t)| *t).collect();
        t.sort_by(f64::total_cmp);
        agg.push((PXE_CLIENTS * per_client) as f64 / wall / 1e6);
        p50.push(median(&t).unwrap_or(0.0));
        slowest.push(*t.last().unwrap_or(&0.0));
        times.push(Timing { wall, cpu });
    }
    let mut r = Row::timed(
        "pxe",
        format!(
            "HTTP: {PXE_CLIENTS} clients × kernel+initrd+squashfs ({:.0} MB each)",
            per_client as f64 / 1e6
        ),
        times,
    );
    r.detail = format!(
        "{:.0} MB/s aggregate; per client median {:.1} s, slowest {:.1} s (cpu: kiln serve and the clients)",
        median(&agg).unwrap_or(0.0),
        median(&p50).unwrap_or(0.0),
        median(&slowest).unwrap_or(0.0)
    );
    Ok(r)
}

/// [`PXE_CLIENTS`] clients at once, each fetching the build's files once: the bytes each got
/// and its seconds.
fn http_clients(http: &str, role: &str, sizes: &[(&str, usize)]) -> Vec<Result<(usize, f64)>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..PXE_CLIENTS)
            .map(|_| s.spawn(move || http_client(http, role, sizes)))
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
            })
            .collect()
    })
}

/// One HTTP client fetching kernel, initrd and root.squashfs.
fn http_client(http: &str, role: &str, sizes: &[(&str, usize)]) -> Result<(usize, f64)> {
    use std::io::Read;
    let c = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .build()?;
    let t = Instant::now();
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 20];
    for (n, _) in sizes {
        let url = format!("http://{http}/roles/{role}/{PXE_BUILD_ID}/{n}");
        let mut r = c.get(&url).send()?.error_for_status()?;
        loop {
            let k = r.read(&mut buf)?;
            if k == 0 {
                break;
            }
            got += k;
        }
    }
    Ok((got, t.elapsed().as_secs_f64()))
}

/// The TFTP rows: `big.bin` with windowsize 1, 4 and 16 (at least 3 runs each).
fn tftp_rows(
    tftp: std::net::SocketAddr,
    tftp_bytes: usize,
    runs: usize,
    pid: u32,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let mut base = 0.0;
    for w in [1u16, 4, 16] {
        let mut times = vec![];
        let mut speeds = vec![];
        for _ in 0..runs.max(3) {
            let cpu0 = cpu_both(pid);
            let t = Instant::now();
            let n = tftp_fetch(tftp, "big.bin", w)?;
            let wall = t.elapsed().as_secs_f64();
            anyhow::ensure!(n == tftp_bytes, "TFTP: got {n} bytes of {tftp_bytes}");
            let cpu = cpu_both(pid) - cpu0;
            times.push(Timing { wall, cpu });
            speeds.push(n as f64 / wall / 1e6);
        }
        let m = median(&speeds).unwrap_or(0.0);
        if w == 1 {
            base = m;
        }
        let mut r = Row::timed(
            "pxe",
            format!(
                "TFTP: {:.1} MiB, blksize {PXE_TFTP_BLKSIZE}, windowsize {w}",
                tftp_bytes as f64 / 1048576.0
            ),
            times,
        );
        r.detail = format!("{m:.1} MB/s");
        if w > 1 && base > 0.0 {
            r.detail.push_str(" (value: speed / windowsize 1)");
            r.ratio = Some(round2(m / base));
        }
        rows.push(r);
    }
    Ok(())
}
