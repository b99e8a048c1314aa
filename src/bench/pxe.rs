//! The PXE part: `kiln serve` on loopback with a signed stand-in build, measured by concurrent
//! HTTP clients and by TFTP at three window sizes, against nginx and tftpd-hpa serving the same
//! files ([`super::peers`]), runs alternating (`cargo bench --bench pxe` runs the same).

use super::{cpu_now, median, peers, round2, Row, Timing};
use crate::project::layout::{key, Layout, Out};
use crate::sys::util;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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
pub(super) fn process_cpu(pid: u32) -> Option<f64> {
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

/// Fetches `name` over TFTP (RFC 1350, asking for `blksize` (2348) and, above 1,
/// `windowsize` (7440)); uses what the server's OACK grants (a server that ignores windowsize,
/// as tftpd-hpa does, is ACKed every block). Returns the bytes received.
pub(super) fn tftp_fetch(
    server: std::net::SocketAddr,
    name: &str,
    blksize: usize,
    window: u16,
    timeout: std::time::Duration,
) -> Result<usize> {
    use std::net::UdpSocket;
    let sock = UdpSocket::bind("127.0.0.1:0").context("TFTP client socket")?;
    sock.set_read_timeout(Some(timeout))?;
    let mut req = vec![0, 1];
    let (b, w) = (blksize.to_string(), window.to_string());
    let mut fields = vec![name, "octet", "blksize", b.as_str()];
    if window > 1 {
        fields.extend(["windowsize", w.as_str()]);
    }
    for f in fields {
        req.extend_from_slice(f.as_bytes());
        req.push(0);
    }
    sock.send_to(&req, server)?;
    // RFC 2347: without an OACK the transfer uses the defaults.
    let (mut bs, mut win) = (512usize, 1u16);
    let mut buf = vec![0u8; 65536];
    let mut expected: u16 = 1;
    let mut total = 0;
    loop {
        let (n, from) = sock
            .recv_from(&mut buf)
            .with_context(|| format!("TFTP: no packet from {server} for {timeout:?}"))?;
        anyhow::ensure!(n >= 4, "TFTP: short packet from {from}");
        match buf[1] {
            6 => {
                let opts: Vec<&[u8]> = buf[2..n].split(|c| *c == 0).collect();
                for kv in opts.chunks(2) {
                    if let [k, v] = kv {
                        let v: usize = std::str::from_utf8(v)?.parse().unwrap_or(0);
                        match &k.to_ascii_lowercase()[..] {
                            b"blksize" => bs = v,
                            b"windowsize" => win = v.clamp(1, 65535) as u16,
                            _ => {}
                        }
                    }
                }
                sock.send_to(&[0, 4, 0, 0], from)?;
            }
            3 => {
                let block = u16::from_be_bytes([buf[2], buf[3]]);
                if block != expected {
                    continue;
                }
                total += n - 4;
                let last = n - 4 < bs;
                if last || block.is_multiple_of(win) {
                    let b = block.to_be_bytes();
                    sock.send_to(&[0, 4, b[0], b[1]], from)?;
                }
                expected = expected.wrapping_add(1);
                if last {
                    return Ok(total);
                }
            }
            _ => bail!(
                "TFTP error from {server}: {}",
                String::from_utf8_lossy(&buf[4..n])
            ),
        }
    }
}

/// The PXE part: `exe serve` on loopback with a signed build of a worker's real sizes (random
/// bytes: serving does not look inside), 32 concurrent HTTP clients each fetching kernel, initrd
/// and root.squashfs, and an 8 MiB TFTP transfer with windowsize 1, 4 and 16; nginx serves the
/// same files to the same clients and tftpd-hpa the same TFTP file, runs alternating with
/// kiln's, and kiln's ratio to each is a row (a peer not installed is a visible `SKIP` row).
/// `scale` divides the file sizes (tests only).
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
    fs::write(stand_in.ipxe.join(TFTP_READY), b"ready\n")?;
    let (server, http, tftp) = start_server(exe, &stand_in, role)?;
    let pid = server.0.id();
    let nginx = peers::start_nginx(work, &nginx_root(work, &stand_in, role)?)?;
    let tftpd = peers::start_tftpd(work, &stand_in.ipxe, TFTP_READY)?;
    let kiln = Target {
        name: "kiln serve",
        cpu: Box::new(move || cpu_now() + process_cpu(pid).unwrap_or(f64::NAN)),
    };
    let peer = |p: &peers::Peer| {
        let pid = p.pid();
        Target {
            name: p.name,
            cpu: Box::new(move || cpu_now() + peers::tree_cpu(pid)),
        }
    };
    let nginx = nginx.as_ref().map(|(p, a)| (peer(p), a.as_str(), p));
    let tftpd = tftpd.as_ref().map(|(p, a)| (peer(p), *a, p));
    http_rows(
        (&kiln, &http),
        nginx.as_ref().map(|(t, a, _)| (t, *a)),
        role,
        &stand_in.sizes,
        runs,
        rows,
    )?;
    tftp_rows(
        (&kiln, tftp),
        tftpd.as_ref().map(|(t, a, _)| (t, *a)),
        stand_in.tftp_bytes,
        runs,
        rows,
    )?;
    drop(server);
    Ok(())
}

/// A small file in the TFTP root: fetched to know a TFTP peer answers.
const TFTP_READY: &str = "ready.txt";

/// A server being measured: its name and the CPU seconds (it and the clients) so far.
struct Target {
    name: &'static str,
    cpu: Box<dyn Fn() -> f64>,
}

/// nginx's document root: `roles/<role>/<build id>` links to the stand-in build, so nginx
/// serves the same files under the same URLs as kiln.
fn nginx_root(work: &Path, stand_in: &StandIn, role: &str) -> Result<PathBuf> {
    let root = work.join("nginx-root");
    let dir = root.join("roles").join(role);
    fs::create_dir_all(&dir)?;
    let build = Out::new(Layout::new(&stand_in.project).default_out()).build(role, PXE_BUILD_ID);
    let link = dir.join(PXE_BUILD_ID);
    if link.symlink_metadata().is_err() {
        std::os::unix::fs::symlink(&build, &link)?;
    }
    Ok(root)
}

/// The row of a peer that is not installed.
fn skip_row(what: &str, tool: &crate::sys::tools::Tool) -> Row {
    Row::note("pxe", what, peers::skip_reason(tool))
}

/// kiln's figure over the peer's as a row with a target of ≥ 1.0 (`target: false`: shown
/// without a target).
fn ratio_row(what: String, kiln: f64, peer: f64, detail: String, target: bool) -> Row {
    let mut r = Row::note("pxe", what, detail);
    if peer > 0.0 {
        let x = round2(kiln / peer);
        r.ratio = Some(x);
        if target {
            r.target = Some("≥ 1.0".into());
            r.met = Some(x >= 1.0);
        }
    }
    r
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
        br#"{"contains_secrets":false,"kernel":{"cmdline":"boot=live console=ttyS0"}}"#,
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
    let mut cmd = Command::new(exe);
    // A bench killed mid-run must not leave a server behind.
    crate::sys::tools::die_with_parent(&mut cmd);
    let mut child = cmd
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

/// The HTTP runs of one server.
#[derive(Default)]
struct HttpRuns {
    times: Vec<Timing>,
    agg: Vec<f64>,
    p50: Vec<f64>,
    slowest: Vec<f64>,
}

impl HttpRuns {
    /// One run: [`PXE_CLIENTS`] clients at once against `http`.
    fn measure(
        &mut self,
        t: &Target,
        http: &str,
        role: &str,
        sizes: &[(&str, usize)],
    ) -> Result<()> {
        let per_client: usize = sizes.iter().map(|(_, l)| l).sum();
        let cpu0 = (t.cpu)();
        let t0 = Instant::now();
        let res = http_clients(http, role, sizes);
        let wall = t0.elapsed().as_secs_f64();
        let cpu = (t.cpu)() - cpu0;
        let res = res
            .into_iter()
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("HTTP clients of {}", t.name))?;
        anyhow::ensure!(
            res.iter().all(|(g, _)| *g == per_client),
            "a PXE HTTP client of {} got fewer bytes than were served",
            t.name
        );
        let mut s: Vec<f64> = res.iter().map(|(_, t)| *t).collect();
        s.sort_by(f64::total_cmp);
        self.agg
            .push((PXE_CLIENTS * per_client) as f64 / wall / 1e6);
        self.p50.push(median(&s).unwrap_or(0.0));
        self.slowest.push(*s.last().unwrap_or(&0.0));
        self.times.push(Timing { wall, cpu });
        Ok(())
    }

    fn row(&self, what: String, server: &str) -> Row {
        let mut r = Row::timed("pxe", what, self.times.clone());
        r.detail = format!(
            "{:.0} MB/s aggregate; per client median {:.1} s, slowest {:.1} s (cpu: {server} and the clients)",
            self.mb_s(),
            median(&self.p50).unwrap_or(0.0),
            median(&self.slowest).unwrap_or(0.0)
        );
        r
    }

    fn mb_s(&self) -> f64 {
        median(&self.agg).unwrap_or(0.0)
    }
}

/// The HTTP rows: [`PXE_CLIENTS`] concurrent clients, `runs` times, against kiln and (runs
/// alternating, the first one changing sides each run) nginx, and kiln's ratio.
fn http_rows(
    kiln: (&Target, &str),
    nginx: Option<(&Target, &str)>,
    role: &str,
    sizes: &[(&str, usize)],
    runs: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let (mut k, mut n) = (HttpRuns::default(), HttpRuns::default());
    for run in 0..runs {
        for turn in 0..2 {
            match (turn == run % 2, nginx) {
                (true, _) => k.measure(kiln.0, kiln.1, role, sizes)?,
                (false, Some((t, a))) => n.measure(t, a, role, sizes)?,
                (false, None) => {}
            }
        }
    }
    let mb = sizes.iter().map(|(_, l)| l).sum::<usize>() as f64 / 1e6;
    rows.push(k.row(
        format!("HTTP: {PXE_CLIENTS} clients × kernel+initrd+squashfs ({mb:.0} MB each)"),
        kiln.0.name,
    ));
    let what = format!("HTTP: nginx, the same {PXE_CLIENTS} clients and files");
    match nginx {
        None => rows.push(skip_row(&what, &crate::sys::tools::NGINX)),
        Some((t, _)) => {
            rows.push(n.row(what, t.name));
            rows.push(ratio_row(
                format!("HTTP: kiln / nginx, aggregate MB/s, {PXE_CLIENTS} clients"),
                k.mb_s(),
                n.mb_s(),
                format!("{:.0} MB/s / {:.0} MB/s", k.mb_s(), n.mb_s()),
                true,
            ));
        }
    }
    Ok(())
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

/// The TFTP rows: `big.bin` from kiln with windowsize 1, 4 and 16 and from tftpd-hpa (lock-step:
/// it speaks no windowsize), all at blksize [`PXE_TFTP_BLKSIZE`] (an Ethernet MTU), at least 3
/// runs each, alternating (the order reversed every other run); then kiln's ratio to the peer
/// in lock-step (windowsize 1 on both sides) and best against best.
fn tftp_rows(
    kiln: (&Target, std::net::SocketAddr),
    tftpd: Option<(&Target, std::net::SocketAddr)>,
    tftp_bytes: usize,
    runs: usize,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let mut sides: Vec<(&Target, std::net::SocketAddr, u16)> =
        [1u16, 4, 16].iter().map(|w| (kiln.0, kiln.1, *w)).collect();
    if let Some((t, a)) = tftpd {
        sides.push((t, a, 1));
    }
    let mut times = vec![Vec::new(); sides.len()];
    let mut speeds = vec![Vec::new(); sides.len()];
    for run in 0..runs.max(3) {
        let mut order: Vec<usize> = (0..sides.len()).collect();
        if run % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (t, addr, w) = sides[i];
            let cpu0 = (t.cpu)();
            let t0 = Instant::now();
            let n = tftp_fetch(
                addr,
                "big.bin",
                PXE_TFTP_BLKSIZE,
                w,
                Duration::from_secs(10),
            )
            .with_context(|| format!("TFTP from {}", t.name))?;
            let wall = t0.elapsed().as_secs_f64();
            anyhow::ensure!(
                n == tftp_bytes,
                "TFTP from {}: got {n} bytes of {tftp_bytes}",
                t.name
            );
            times[i].push(Timing {
                wall,
                cpu: (t.cpu)() - cpu0,
            });
            speeds[i].push(n as f64 / wall / 1e6);
        }
    }
    let m: Vec<f64> = speeds.iter().map(|s| median(s).unwrap_or(0.0)).collect();
    let mib = tftp_bytes as f64 / 1048576.0;
    for (i, w) in [1u16, 4, 16].iter().enumerate() {
        let mut r = Row::timed(
            "pxe",
            format!("TFTP: {mib:.1} MiB, blksize {PXE_TFTP_BLKSIZE}, windowsize {w}"),
            times[i].clone(),
        );
        r.detail = format!("{:.1} MB/s", m[i]);
        if *w > 1 && m[0] > 0.0 {
            r.detail.push_str(" (value: speed / windowsize 1)");
            r.ratio = Some(round2(m[i] / m[0]));
        }
        rows.push(r);
    }
    let what = format!("TFTP: tftpd-hpa, {mib:.1} MiB, blksize {PXE_TFTP_BLKSIZE}, windowsize 1");
    if tftpd.is_none() {
        rows.push(skip_row(&what, &crate::sys::tools::TFTPD_HPA));
        return Ok(());
    }
    let mut r = Row::timed("pxe", what, times[3].clone());
    r.detail = format!(
        "{:.1} MB/s (it speaks no windowsize: lock-step is its best)",
        m[3]
    );
    rows.push(r);
    rows.push(ratio_row(
        "TFTP lock-step: kiln / tftpd-hpa, both windowsize 1".into(),
        m[0],
        m[3],
        format!("{:.1} MB/s / {:.1} MB/s", m[0], m[3]),
        true,
    ));
    let (best, w) = (0..3)
        .map(|i| (m[i], [1, 4, 16][i]))
        .fold((0.0, 1), |a, b| if b.0 > a.0 { b } else { a });
    rows.push(ratio_row(
        format!("TFTP best: kiln (windowsize {w}) / tftpd-hpa (windowsize 1)"),
        best,
        m[3],
        format!("{best:.1} MB/s / {:.1} MB/s", m[3]),
        false,
    ));
    Ok(())
}
