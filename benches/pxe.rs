//! PXE serving benchmark (not a test): `cargo bench --bench pxe`.
//!
//! Starts `kiln serve` on loopback with a signed stand-in worker build of real sizes (kernel
//! 8 MB, initrd 42 MB, root.squashfs 237 MB, random bytes), then measures
//! 1. 32 concurrent HTTP clients each fetching kernel + initrd + squashfs (aggregate MB/s and
//!    per-client completion times), and
//! 2. TFTP throughput of an 8 MiB file with blksize 1468 and windowsize 1, 4, 16 (RFC 7440).
//!
//! Medians of `KILN_BENCH_RUNS` runs (default 3). Prints the machine and a table.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ID: &str = "2222222222222222222222222222222222222222222222222222222222222222";

fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

fn copy_tree(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from) {
        let e = e.unwrap();
        let dst = to.join(e.path().strip_prefix(from).unwrap());
        if e.file_type().is_dir() {
            fs::create_dir_all(&dst).unwrap();
        } else if e.file_type().is_file() {
            fs::copy(e.path(), &dst).unwrap();
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {} GiB RAM, Linux {}",
        mem / 1048576,
        kernel.trim()
    )
}

fn tftp_fetch(server: SocketAddr, name: &str, window: u16) -> usize {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = vec![0, 1];
    for s in [
        name,
        "octet",
        "blksize",
        "1468",
        "windowsize",
        &window.to_string(),
    ] {
        req.extend_from_slice(s.as_bytes());
        req.push(0);
    }
    sock.send_to(&req, server).unwrap();
    let mut buf = vec![0u8; 2000];
    let mut expected: u16 = 1;
    let mut total = 0;
    loop {
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        match buf[1] {
            6 => {
                sock.send_to(&[0, 4, 0, 0], from).unwrap();
            }
            3 => {
                let block = u16::from_be_bytes([buf[2], buf[3]]);
                if block != expected {
                    continue;
                }
                total += n - 4;
                let last = n - 4 < 1468;
                if last || block.is_multiple_of(window) {
                    let b = block.to_be_bytes();
                    sock.send_to(&[0, 4, b[0], b[1]], from).unwrap();
                }
                expected = expected.wrapping_add(1);
                if last {
                    return total;
                }
            }
            _ => panic!("TFTP error: {}", String::from_utf8_lossy(&buf[4..n])),
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("pxe: benchmark");
        return;
    }
    let runs: usize = std::env::var("KILN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    copy_tree(&repo.join("recipes"), &project.join("recipes"));
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let (_, public) = kiln::keys::encode_signing_key(&key).unwrap();
    fs::create_dir_all(project.join("keys")).unwrap();
    fs::write(project.join("keys/signing_ed25519.pub"), public).unwrap();
    let out = project.join("out");
    let dir = out.join("worker").join(ID);
    fs::create_dir_all(&dir).unwrap();
    let files = [
        ("vmlinuz", 8_247_232usize),
        ("initrd.img", 42_393_027),
        ("root.squashfs", 237_240_320),
    ];
    for (i, (n, len)) in files.iter().enumerate() {
        fs::write(dir.join(n), noise(*len, i as u64 + 1)).unwrap();
    }
    fs::write(
        dir.join("manifest.json"),
        br#"{"kernel":{"cmdline":"boot=live console=ttyS0"}}"#,
    )
    .unwrap();
    let names = ["vmlinuz", "initrd.img", "root.squashfs", "manifest.json"];
    let arts = kiln::emit::hash_artifacts(&dir, &names).unwrap();
    fs::write(dir.join("SHA256SUMS"), kiln::emit::sha256sums(&arts)).unwrap();
    kiln::sign::sign_dir(&dir, &key).unwrap();
    std::os::unix::fs::symlink(ID, out.join("worker/latest")).unwrap();
    let ipxe = tmp.path().join("ipxe");
    fs::create_dir_all(&ipxe).unwrap();
    fs::write(ipxe.join("big.bin"), noise(8 << 20, 9)).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--dir")
        .arg(&project)
        .args([
            "serve",
            "--json",
            "--listen",
            "127.0.0.1",
            "--http-port",
            "0",
            "--tftp-port",
            "0",
        ])
        .args(["--dhcp", "off", "--default-role", "worker", "--ipxe-dir"])
        .arg(&ipxe)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let status: serde_json::Value = serde_json::from_str(&line).expect("kiln serve started");
    let http = status["http"].as_str().unwrap().to_string();
    let tftp: SocketAddr = status["tftp"].as_str().unwrap().parse().unwrap();
    let per_client: usize = files.iter().map(|(_, l)| l).sum();

    println!("machine: {}", machine());
    println!("kiln serve on loopback; {runs} run(s) each, medians\n");
    let mut rows = Vec::new();

    // 1. 32 concurrent HTTP clients.
    let (mut agg, mut p50, mut pmax) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        let t0 = Instant::now();
        let threads: Vec<_> = (0..32)
            .map(|_| {
                let http = http.clone();
                std::thread::spawn(move || {
                    let c = reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(600))
                        .build()
                        .unwrap();
                    let t = Instant::now();
                    let mut got = 0;
                    for (n, _) in [("vmlinuz", 0), ("initrd.img", 0), ("root.squashfs", 0)] {
                        let mut r = c
                            .get(format!("http://{http}/roles/worker/{ID}/{n}"))
                            .send()
                            .unwrap();
                        let mut buf = vec![0u8; 1 << 20];
                        loop {
                            let k = r.read(&mut buf).unwrap();
                            if k == 0 {
                                break;
                            }
                            got += k;
                        }
                    }
                    (got, t.elapsed().as_secs_f64())
                })
            })
            .collect();
        let res: Vec<(usize, f64)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let wall = t0.elapsed().as_secs_f64();
        assert!(res.iter().all(|(g, _)| *g == per_client), "short read");
        agg.push((32 * per_client) as f64 / wall / 1e6);
        let mut times: Vec<f64> = res.iter().map(|(_, t)| *t).collect();
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        p50.push(times[16]);
        pmax.push(times[31]);
    }
    rows.push(format!(
        "| HTTP, 32 clients × (kernel+initrd+squashfs = {:.0} MB) | {:.0} MB/s aggregate | per client: median {:.1} s, slowest {:.1} s |",
        per_client as f64 / 1e6,
        median(agg),
        median(p50),
        median(pmax)
    ));

    // 2. TFTP, 8 MiB, blksize 1468, windowsize 1 / 4 / 16.
    let mut base = 0.0;
    for w in [1u16, 4, 16] {
        let mut v = vec![];
        for _ in 0..runs.max(3) {
            let t = Instant::now();
            let n = tftp_fetch(tftp, "big.bin", w);
            assert_eq!(n, 8 << 20);
            v.push(n as f64 / t.elapsed().as_secs_f64() / 1e6);
        }
        let m = median(v);
        if w == 1 {
            base = m;
        }
        rows.push(format!(
            "| TFTP 8 MiB, blksize 1468, windowsize {w} | {m:.1} MB/s | {:.1}× windowsize 1 |",
            m / base
        ));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    println!("| what | throughput | notes |\n|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}
