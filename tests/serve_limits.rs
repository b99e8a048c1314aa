//! `kiln serve` against hostile TFTP and DHCP clients (issue 17), over real sockets on
//! loopback: transfer caps (in total, per client), the `timeout` cap, the time limit, no file
//! descriptor held while waiting, the Sorcerer's Apprentice bug (duplicate ACKs), wrong TIDs,
//! windowsize beyond 16 bits, and DHCP's magic cookie check and per-MAC flood budget.
//! The happy paths are in tests/serve.rs.

mod common;
use common::{ack, rrq};
mod signing;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const BUILD_ID: &str = "2222222222222222222222222222222222222222222222222222222222222222";

struct Server {
    child: Child,
    status: serde_json::Value,
    _project: tempfile::TempDir,
    ipxe: tempfile::TempDir,
}

impl Server {
    fn tftp(&self) -> SocketAddr {
        self.status["tftp"].as_str().unwrap().parse().unwrap()
    }
    fn proxy_dhcp(&self) -> SocketAddr {
        self.status["proxy_dhcp"].as_str().unwrap().parse().unwrap()
    }
    fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.status["http"].as_str().unwrap());
        reqwest::blocking::get(url).unwrap().text().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(seed as u32) as u8)
        .collect()
}

/// `kiln serve` on loopback for a project with one signed stand-in worker build.
fn start(extra: &[&str]) -> Server {
    let project = common::project_copy();
    let out = project.path().join("out");
    let key = kiln::trust::sign::load_signing_key(&project.path().join("keys")).unwrap();
    let manifest = serde_json::json!({
        "kernel": {"version": "6.1.0-test", "cmdline": "boot=live console=ttyS0"}
    });
    signing::make_signed_dir(
        &out.join("worker").join(BUILD_ID),
        &[
            ("vmlinuz", &bytes(1000, 1)),
            ("initrd.img", &bytes(1000, 2)),
            ("root.squashfs", &bytes(1000, 3)),
            (
                "manifest.json",
                serde_json::to_string(&manifest).unwrap().as_bytes(),
            ),
        ],
        &key,
    );
    std::os::unix::fs::symlink(BUILD_ID, out.join("worker/latest")).unwrap();
    let ipxe = tempfile::tempdir().unwrap();
    fs::write(ipxe.path().join("undionly.kpxe"), bytes(70_001, 4)).unwrap();
    fs::write(ipxe.path().join("ipxe.efi"), bytes(300_000, 5)).unwrap();
    let mut child = signing::kiln()
        .arg("--dir")
        .arg(project.path())
        .args(["serve", "--json", "--listen", "127.0.0.1"])
        .args(["--http-port", "0", "--tftp-port", "0", "--dhcp-port", "0"])
        .args(["--proxy-port", "0", "--grace-secs", "1", "--ipxe-dir"])
        .arg(ipxe.path())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = err.read_to_end(&mut sink);
    });
    let status = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    Server {
        child,
        status,
        _project: project,
        ipxe,
    }
}

fn client(ip: &str) -> UdpSocket {
    let s = UdpSocket::bind((ip, 0)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// The first packet that comes back: (opcode, its bytes after the opcode, where from).
fn first_reply(s: &UdpSocket) -> (u16, Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 70000];
    let (n, from) = s.recv_from(&mut buf).expect("an answer");
    (
        u16::from_be_bytes([buf[0], buf[1]]),
        buf[2..n].to_vec(),
        from,
    )
}

fn error_text(rest: &[u8]) -> String {
    String::from_utf8_lossy(&rest[2..rest.len().saturating_sub(1)]).into_owned()
}

fn oack_options(rest: &[u8]) -> Vec<(String, String)> {
    let f: Vec<String> = rest[..rest.len() - 1]
        .split(|c| *c == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    f.chunks(2).map(|c| (c[0].clone(), c[1].clone())).collect()
}

/// Sends a read request that is never acknowledged; returns the socket and the first reply.
fn hold(ip: &str, server: SocketAddr) -> (UdpSocket, (u16, Vec<u8>, SocketAddr)) {
    let s = client(ip);
    s.send_to(
        &rrq("ipxe.efi", &[("timeout", "255"), ("blksize", "1024")]),
        server,
    )
    .unwrap();
    let r = first_reply(&s);
    (s, r)
}

#[test]
fn tftp_transfers_are_capped_per_client_and_in_total() {
    // Issue 17: 300 un-ACKed RRQs with timeout=255 held 2 descriptors each for 6×255 s.
    let s = start(&["--tftp-max-per-client", "2", "--tftp-max-transfers", "3"]);
    let (_a1, r1) = hold("127.0.0.1", s.tftp());
    let (_a2, r2) = hold("127.0.0.1", s.tftp());
    for r in [&r1, &r2] {
        assert_eq!(r.0, 6, "OACK expected");
        // timeout=255 is above the cap and RFC 2349 forbids answering another value: left out.
        assert_eq!(
            oack_options(&r.1),
            vec![("blksize".to_string(), "1024".to_string())]
        );
    }
    let (_a3, r3) = hold("127.0.0.1", s.tftp());
    assert_eq!(r3.0, 5, "a third transfer from one client is refused");
    assert_eq!(u16::from_be_bytes([r3.1[0], r3.1[1]]), 0);
    assert!(
        error_text(&r3.1).contains("too many transfers from 127.0.0.1"),
        "{}",
        error_text(&r3.1)
    );
    let (_b1, r4) = hold("127.0.0.2", s.tftp());
    assert_eq!(r4.0, 6, "another client still gets a transfer");
    let (_c1, r5) = hold("127.0.0.3", s.tftp());
    assert_eq!(r5.0, 5);
    assert!(
        error_text(&r5.1).contains("server busy"),
        "{}",
        error_text(&r5.1)
    );
    // Ending a transfer frees its place (the server ends it asynchronously: ask until it has).
    _a1.send_to(b"\x00\x05\x00\x00stop\x00", r1.2).unwrap();
    let mut got = 0;
    for _ in 0..100 {
        let c = client("127.0.0.3");
        c.send_to(&rrq("ipxe.efi", &[("blksize", "1024")]), s.tftp())
            .unwrap();
        got = first_reply(&c).0;
        if got == 6 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(got, 6, "a freed place is given to the next request");
    let m = s.metrics();
    assert!(
        m.contains("kiln_tftp_transfers_total{result=\"busy\"}"),
        "{m}"
    );
}

#[test]
fn tftp_idle_transfer_holds_no_file_descriptor() {
    // Waiting for the client to acknowledge the options, kiln must not keep the file open.
    let s = start(&[]);
    let (_c, r) = hold("127.0.0.1", s.tftp());
    assert_eq!(r.0, 6);
    let served = s.ipxe.path().join("ipxe.efi").canonicalize().unwrap();
    let fds = Path::new("/proc").join(s.child.id().to_string()).join("fd");
    let open: Vec<_> = fs::read_dir(&fds)
        .unwrap()
        .filter_map(|e| fs::read_link(e.unwrap().path()).ok())
        .filter(|t| *t == served)
        .collect();
    assert!(open.is_empty(), "ipxe.efi is held open: {open:?}");
    // A client that stops acknowledging DATA: after the first retransmission the file is let go
    // until the next one (asked a bounded number of times: the release follows the resend).
    let c = client("127.0.0.1");
    c.send_to(&rrq("ipxe.efi", &[]), s.tftp()).unwrap();
    for _ in 0..2 {
        let (op, rest, _) = first_reply(&c);
        assert_eq!((op, &rest[..2]), (3, &[0u8, 1][..]), "DATA 1, then again");
    }
    let held = || {
        fs::read_dir(&fds)
            .unwrap()
            .filter_map(|e| fs::read_link(e.unwrap().path()).ok())
            .any(|t| t == served)
    };
    let released = (0..200).any(|_| {
        let h = held();
        if h {
            std::thread::sleep(Duration::from_millis(10));
        }
        !h
    });
    assert!(released, "ipxe.efi stays open while the client is silent");
}

#[test]
fn tftp_ends_a_transfer_that_takes_too_long() {
    let s = start(&["--tftp-max-secs", "1"]);
    let c = client("127.0.0.1");
    let started = Instant::now();
    c.send_to(&rrq("ipxe.efi", &[]), s.tftp()).unwrap();
    // Never acknowledge: DATA 1 (and its retransmissions) until the ERROR.
    loop {
        let (op, rest, _) = first_reply(&c);
        if op == 3 {
            assert_eq!(&rest[..2], &[0, 1]);
            continue;
        }
        assert_eq!(op, 5);
        assert!(
            error_text(&rest).contains("longer than 1 s"),
            "{}",
            error_text(&rest)
        );
        break;
    }
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(s
        .metrics()
        .contains("kiln_tftp_transfers_total{result=\"too_slow\"} 1"));
}

/// A lock-step or windowed client that sends each ACK `dups` times, and ACKs every block
/// (`every_block`) or only each window's last. Returns (file, DATA packets received).
fn fetch_acking(
    server: SocketAddr,
    opts: &[(&str, &str)],
    window: u16,
    every_block: bool,
    dups: usize,
) -> (Vec<u8>, usize) {
    let c = client("127.0.0.1");
    c.send_to(&rrq("undionly.kpxe", opts), server).unwrap();
    let mut buf = vec![0u8; 70000];
    let mut data = Vec::new();
    let mut packets = 0;
    let mut expected: u16 = 1;
    let blksize = 512;
    loop {
        let (n, from) = c.recv_from(&mut buf).unwrap();
        match buf[1] {
            6 => {
                for _ in 0..dups {
                    c.send_to(&ack(0), from).unwrap();
                }
            }
            3 => {
                packets += 1;
                let block = u16::from_be_bytes([buf[2], buf[3]]);
                if block != expected {
                    continue;
                }
                data.extend_from_slice(&buf[4..n]);
                expected += 1;
                let last = n - 4 < blksize;
                if last || every_block || block.is_multiple_of(window) {
                    for _ in 0..dups {
                        c.send_to(&ack(block), from).unwrap();
                    }
                }
                if last {
                    return (data, packets);
                }
            }
            op => panic!("opcode {op}: {}", error_text(&buf[2..n])),
        }
    }
}

#[test]
fn tftp_duplicate_acks_do_not_resend_data() {
    // Issue 17, RFC 1123 4.2.3.1: a client ACKing every DATA twice got 10 260 packets for 145
    // blocks. Only a timeout may resend; a long timeout keeps a slow test machine from
    // triggering a legitimate one.
    let s = start(&[]);
    let want = fs::read(s.ipxe.path().join("undionly.kpxe")).unwrap();
    let blocks = want.len() / 512 + 1;
    let t = [("timeout", "10")];
    let (data, packets) = fetch_acking(s.tftp(), &t, 1, false, 2);
    assert_eq!(data, want);
    assert_eq!(packets, blocks, "lock-step, every ACK twice");
    let (data, packets) = fetch_acking(s.tftp(), &t, 1, false, 3);
    assert_eq!(
        (data == want, packets),
        (true, blocks),
        "every ACK three times"
    );
    // Windowed: a client that ACKs every block (twice) must not multiply the traffic either.
    let w = [("timeout", "10"), ("windowsize", "8")];
    let (data, packets) = fetch_acking(s.tftp(), &w, 8, true, 2);
    assert_eq!(
        (data == want, packets),
        (true, blocks),
        "windowsize 8, every block"
    );
    let (data, packets) = fetch_acking(s.tftp(), &w, 8, false, 2);
    assert_eq!((data == want, packets), (true, blocks), "windowsize 8");
    let m = s.metrics();
    assert!(
        !m.lines()
            .any(|l| l.starts_with("kiln_tftp_retransmits_total")),
        "{m}"
    );
}

#[test]
fn tftp_packet_from_another_port_gets_error_5_and_the_transfer_goes_on() {
    // Issue 17, RFC 1350: the stranger gets ERROR 5; the transfer is not disturbed.
    let s = start(&[]);
    let want = fs::read(s.ipxe.path().join("undionly.kpxe")).unwrap();
    let c = client("127.0.0.1");
    c.send_to(&rrq("undionly.kpxe", &[("timeout", "10")]), s.tftp())
        .unwrap();
    let stranger = client("127.0.0.1");
    let mut buf = vec![0u8; 2048];
    let mut data = Vec::new();
    let mut expected: u16 = 1;
    loop {
        let (n, from) = c.recv_from(&mut buf).unwrap();
        match buf[1] {
            6 => {
                c.send_to(&ack(0), from).unwrap();
            }
            3 => {
                let block = u16::from_be_bytes([buf[2], buf[3]]);
                assert_eq!(block, expected, "no duplicate, no gap");
                data.extend_from_slice(&buf[4..n]);
                if block == 3 {
                    // Someone else ACKs (and sends DATA) to the transfer's port.
                    stranger.send_to(&ack(3), from).unwrap();
                    let (op, rest, efrom) = first_reply(&stranger);
                    assert_eq!((op, &rest[..2]), (5, &[0u8, 5][..]), "ERROR 5");
                    assert_eq!(efrom, from, "from the transfer's port");
                    stranger.send_to(b"\x00\x03\x00\x04junk", from).unwrap();
                    let (op, _, _) = first_reply(&stranger);
                    assert_eq!(op, 5);
                    // An ERROR from the stranger is not answered and ends nothing.
                    stranger
                        .send_to(b"\x00\x05\x00\x00go away\x00", from)
                        .unwrap();
                }
                c.send_to(&ack(block), from).unwrap();
                expected += 1;
                if n - 4 < 512 {
                    break;
                }
            }
            op => panic!("opcode {op}"),
        }
    }
    assert_eq!(data, want);
    let m = s.metrics();
    assert!(m.contains("kiln_tftp_unknown_tid_total 3"), "{m}");
    assert!(
        m.contains("kiln_tftp_transfers_total{result=\"ok\"} 1"),
        "{m}"
    );
}

#[test]
fn tftp_windowsize_beyond_16_bits_is_clamped_and_the_transfer_works() {
    // Issue 17: windowsize=65536 was answered with windowsize=0 and a dead transfer.
    let s = start(&[]);
    let want = fs::read(s.ipxe.path().join("undionly.kpxe")).unwrap();
    for w in ["65536", "70000", "99999999999999999999999"] {
        let c = client("127.0.0.1");
        c.send_to(&rrq("undionly.kpxe", &[("windowsize", w)]), s.tftp())
            .unwrap();
        let (op, rest, from) = first_reply(&c);
        if w.len() > 20 {
            // Not a u64: the option is ignored, the transfer is plain lock-step.
            assert_eq!(op, 3, "{w}");
            continue;
        }
        assert_eq!(op, 6, "{w}");
        assert_eq!(
            oack_options(&rest),
            vec![("windowsize".to_string(), "64".to_string())]
        );
        c.send_to(&ack(0), from).unwrap();
        let mut data = Vec::new();
        let mut buf = vec![0u8; 2048];
        loop {
            let (n, _) = c.recv_from(&mut buf).unwrap();
            assert_eq!(buf[1], 3);
            data.extend_from_slice(&buf[4..n]);
            let block = u16::from_be_bytes([buf[2], buf[3]]);
            let last = n - 4 < 512;
            if last || block.is_multiple_of(64) {
                c.send_to(&ack(block), from).unwrap();
            }
            if last {
                break;
            }
        }
        assert_eq!(data, want, "{w}");
    }
}

// --- DHCP -----------------------------------------------------------------------------------

fn pxe_request(mac_last: u8, xid: u32) -> Vec<u8> {
    use dhcproto::Encodable;
    let mut m = kiln::deliver::serve::dhcp::sample_request(
        [0x52, 0x54, 0, 0, 0x17, mac_last],
        dhcproto::v4::MessageType::Request,
        Some(0),
        Some(b"PXEClient:Arch:00000:UNDI:002001"),
        None,
    );
    m.set_xid(xid).set_ciaddr(std::net::Ipv4Addr::LOCALHOST);
    m.to_vec().unwrap()
}

/// Waits for the answer to the probe `xid`; returns the xids answered before it, in order.
/// The listener handles packets one by one, so when the probe's answer is here, every earlier
/// packet has had its answer (or none).
fn answers_until(s: &UdpSocket, probe: u32) -> Vec<u32> {
    let mut buf = [0u8; 1500];
    let mut xids = vec![];
    loop {
        let (n, _) = s.recv_from(&mut buf).expect("the probe's answer");
        assert!(n >= 8);
        let xid = u32::from_be_bytes(buf[4..8].try_into().unwrap());
        if xid == probe {
            return xids;
        }
        xids.push(xid);
    }
}

#[test]
fn dhcp_drops_a_wrong_or_zero_magic_cookie() {
    // Issue 17: these were answered.
    let s = start(&[]);
    let c = client("127.0.0.1");
    for (xid, cookie) in [(1u32, [0u8; 4]), (2, [99, 130, 83, 98]), (3, [1, 2, 3, 4])] {
        let mut p = pxe_request(1, xid);
        p[236..240].copy_from_slice(&cookie);
        c.send_to(&p, s.proxy_dhcp()).unwrap();
    }
    c.send_to(&pxe_request(1, 99), s.proxy_dhcp()).unwrap();
    assert_eq!(answers_until(&c, 99), Vec::<u32>::new());
    let m = s.metrics();
    assert!(
        m.contains("kiln_dhcp_ignored_total{reason=\"bad_cookie\",port=\"4011\"} 3"),
        "{m}"
    );
}

#[test]
fn dhcp_floods_from_one_mac_are_not_all_answered() {
    let s = start(&[]);
    let c = client("127.0.0.1");
    let started = Instant::now();
    let flood = 60u32;
    for xid in 1..=flood {
        c.send_to(&pxe_request(1, xid), s.proxy_dhcp()).unwrap();
    }
    // Another MAC is still answered, after the flood.
    c.send_to(&pxe_request(2, 1000), s.proxy_dhcp()).unwrap();
    let answered = answers_until(&c, 1000).len() as u64;
    // A burst of 16, then one a second (the bound allows for a slow machine).
    let bound = 16 + started.elapsed().as_secs() + 1;
    assert!(answered >= 16, "{answered}");
    assert!(
        answered <= bound,
        "{answered} answers to a flood of {flood}"
    );
    assert!(s.metrics().contains("reason=\"rate_limited\""));
}

#[test]
fn tftp_names_modes_and_writes_that_are_refused() {
    let s = start(&[]);
    let code = |req: &[u8]| {
        let c = client("127.0.0.1");
        c.send_to(req, s.tftp()).unwrap();
        let (op, rest, _) = first_reply(&c);
        assert_eq!(op, 5, "{req:?}");
        u16::from_be_bytes([rest[0], rest[1]])
    };
    // An absolute name is taken inside the root; outside it there is nothing to find.
    assert_eq!(code(&rrq("/etc/passwd", &[])), 1);
    assert_eq!(code(&rrq("C:\\..\\..\\etc\\passwd", &[])), 2);
    assert_eq!(code(&rrq("", &[])), 1);
    let mut wrq = rrq("new.efi", &[]);
    wrq[1] = 2;
    assert_eq!(code(&wrq), 2);
    for mode in ["netascii", "mail", "binary", ""] {
        let mut req = vec![0, 1];
        req.extend_from_slice(format!("ipxe.efi\0{mode}\0").as_bytes());
        assert_eq!(code(&req), 4, "{mode}");
    }
    // An ACK or DATA to the server's own port belongs to no transfer: ERROR 5.
    assert_eq!(code(&ack(1)), 5);
    assert_eq!(code(b"\x00\x03\x00\x01data"), 5);
}
