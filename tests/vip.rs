//! The API VIP, for real (issue 19): three network namespaces on one bridge play master-1/2/3,
//! each running Debian's keepalived with the configuration kiln generates (rendered on the
//! "node" by kiln's own kiln-keepalived script) and a stand-in API server answering `/readyz`.
//! The VIP is on exactly one master; stopping its keepalived moves it; failing its `/readyz`
//! moves it; a master coming back does not take it back (no flapping); a holder that loses
//! power (no goodbye advert) loses it within VRRP's master-down interval. Every address is inside
//! the namespaces this test makes (needs root, `ip netns`, keepalived, python3, curl).

mod common;
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VIP: &str = "10.233.0.10";
/// The bound the test holds keepalived to for moving the VIP (VRRP's master-down interval is
/// ~3.6 s with advert_int 1; the track script needs two failures 2 s apart first).
const MOVE_BOUND: Duration = Duration::from_secs(15);

fn missing() -> Option<String> {
    if !is_root() {
        return Some("needs root (network namespaces)".into());
    }
    for (t, pkg) in [
        ("ip", "iproute2"),
        ("keepalived", "keepalived"),
        ("python3", "python3"),
        ("curl", "curl"),
    ] {
        if !which(t) {
            return Some(format!("{t} not installed (apt-get install {pkg})"));
        }
    }
    let probe = format!("kvprobe{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .status()
        .is_ok_and(|s| s.success());
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    (!ok).then(|| "cannot create network namespaces (`ip netns add`)".into())
}

struct Lab {
    ns: Vec<String>,
    bridge: String,
    dir: PathBuf,
    keepalived: Vec<Option<Child>>,
    apis: Vec<Child>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self
            .keepalived
            .iter_mut()
            .flatten()
            .chain(self.apis.iter_mut())
        {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.ns.iter().chain(std::iter::once(&self.bridge)) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {}", args.join(" "));
}

impl Lab {
    fn new() -> Lab {
        let pid = std::process::id();
        // Under target/: keepalived's script security refuses scripts below a directory others
        // may write to (/tmp).
        let dir = repo_root().join(format!("target/vip-test-{pid}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let bridge = format!("kvb{pid}");
        let lab = Lab {
            ns: (1..=3).map(|i| format!("kvm{i}x{pid}")).collect(),
            bridge: bridge.clone(),
            dir,
            keepalived: vec![None, None, None],
            apis: vec![],
        };
        ip(&["netns", "add", &bridge]);
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &bridge, "link", "set", "br0", "up"]);
        for (i, ns) in lab.ns.clone().iter().enumerate() {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            let (v, b) = (format!("eth{i}"), format!("b{i}"));
            ip(&[
                "link", "add", &v, "netns", ns, "type", "veth", "peer", "name", &b, "netns",
                &bridge,
            ]);
            ip(&["-n", &bridge, "link", "set", &b, "master", "br0"]);
            ip(&["-n", &bridge, "link", "set", &b, "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.233.0.1{}/24", i + 1),
                "dev",
                &v,
            ]);
            ip(&["-n", ns, "link", "set", &v, "up"]);
        }
        lab
    }

    fn exec(&self, i: usize) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i]]);
        c
    }

    fn readyz(&self, i: usize) -> PathBuf {
        self.dir.join(format!("api{i}/readyz"))
    }

    /// The stand-in API server of master i: 127.0.0.1:16443/readyz in its namespace, 200
    /// while the file exists, 404 when it does not.
    fn start_api(&mut self, i: usize) {
        fs::create_dir_all(self.readyz(i).parent().unwrap()).unwrap();
        fs::write(self.readyz(i), "ok").unwrap();
        let c = self
            .exec(i)
            .args([
                "python3",
                "-m",
                "http.server",
                "16443",
                "--bind",
                "127.0.0.1",
            ])
            .arg("--directory")
            .arg(self.readyz(i).parent().unwrap())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.apis.push(c);
    }

    fn start_keepalived(&mut self, i: usize) {
        let d = &self.dir;
        let conf = d.join(format!("m{i}.run.conf"));
        let log = fs::File::create(d.join(format!("keepalived-m{i}.log"))).unwrap();
        let c = self
            .exec(i)
            .args([
                "keepalived",
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--vrrp",
            ])
            .arg(format!("--use-file={}", conf.display()))
            .arg(format!("--pid={}", d.join(format!("m{i}.pid")).display()))
            .arg(format!(
                "--vrrp_pid={}",
                d.join(format!("m{i}.vrrp.pid")).display()
            ))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.keepalived[i] = Some(c);
    }

    fn stop_keepalived(&mut self, i: usize) {
        if let Some(mut c) = self.keepalived[i].take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Which masters have the VIP now.
    fn holders(&self) -> Vec<usize> {
        (0..3)
            .filter(|i| {
                let o = Command::new("ip")
                    .args(["-n", &self.ns[*i], "-4", "-o", "addr", "show"])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&o.stdout).contains(&format!("inet {VIP}/24"))
            })
            .collect()
    }

    /// Waits until exactly one master holds the VIP and `ok` accepts it; returns it and the time.
    fn wait_holder(&self, ok: impl Fn(usize) -> bool, what: &str) -> (usize, Duration) {
        let t = Instant::now();
        loop {
            let h = self.holders();
            if h.len() == 1 && ok(h[0]) {
                return (h[0], t.elapsed());
            }
            assert!(
                t.elapsed() < MOVE_BOUND,
                "{what}: after {:?} the VIP is on {h:?} (logs in {})",
                MOVE_BOUND,
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// For `d`, the VIP stays on `on` alone (sampled every 200 ms).
    fn stays(&self, on: usize, d: Duration, what: &str) {
        let t = Instant::now();
        while t.elapsed() < d {
            let h = self.holders();
            assert_eq!(
                h,
                vec![on],
                "{what}: the VIP moved (logs in {})",
                self.dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn privileged_vip_moves_once_per_failure_and_never_flaps() {
    if let Some(r) = missing() {
        return skip("privileged_vip_moves_once_per_failure_and_never_flaps", &r);
    }
    use kiln::pipeline::vip;
    use kiln::project::net::parse_cidr4;
    let v = vip::Vip {
        address: parse_cidr4(&format!("{VIP}/24")).unwrap(),
        masters: (1..=3)
            .map(|i| {
                (
                    format!("master-{i}"),
                    parse_cidr4(&format!("10.233.0.1{i}/24")).unwrap(),
                )
            })
            .collect(),
    };
    let auth = kiln::trust::identity::vrrp_password(&[7u8; 32], "homelab");
    assert_eq!(auth.len(), 8);
    let mut lab = Lab::new();
    // The track script: the stand-in API of this namespace.
    let check = lab.dir.join("check");
    fs::write(
        &check,
        "#!/bin/sh\nexec curl -sf --max-time 1 http://127.0.0.1:16443/readyz >/dev/null\n",
    )
    .unwrap();
    fs::set_permissions(&check, fs::Permissions::from_mode(0o755)).unwrap();
    let confs = lab.dir.join("conf");
    fs::create_dir_all(&confs).unwrap();
    let render = lab.dir.join("kiln-keepalived");
    fs::write(&render, vip::RENDER).unwrap();
    fs::set_permissions(&render, fs::Permissions::from_mode(0o755)).unwrap();
    for i in 0..3 {
        let host = format!("master-{}", i + 1);
        let c = vip::config(&v, "homelab", &host, &auth, check.to_str().unwrap()).unwrap();
        assert!(c.contains("nopreempt") && c.contains("unicast_peer"), "{c}");
        fs::write(confs.join(format!("{host}.conf")), c).unwrap();
        // kiln's renderer, run on the "node": finds eth<i> by the master's address.
        let o = lab
            .exec(i)
            .arg(&render)
            .arg(&host)
            .env("KILN_KEEPALIVED_DIR", &confs)
            .env(
                "KILN_KEEPALIVED_OUT",
                lab.dir.join(format!("m{i}.run.conf")),
            )
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", combined(&o));
        let run = fs::read_to_string(lab.dir.join(format!("m{i}.run.conf"))).unwrap();
        assert!(run.contains(&format!("interface eth{i}\n")), "{run}");
        assert!(!run.contains("@INTERFACE@"));
        lab.start_api(i);
    }
    // A machine that is not a master: refused with the reason.
    let o = Command::new("sh")
        .arg(&render)
        .arg("worker-1")
        .env("KILN_KEEPALIVED_DIR", &confs)
        .output()
        .unwrap();
    assert!(!o.status.success() && stdout(&o).contains("not one of the inventory's masters"));

    for i in 0..3 {
        lab.start_keepalived(i);
    }
    // One holder: the first master whose track script passes and whose master-down timer runs
    // out (priority breaks ties; nopreempt keeps it there afterwards).
    let (first, t) = lab.wait_holder(|_| true, "start");
    println!("the VIP is on master-{} after {t:?}", first + 1);
    lab.stays(first, Duration::from_secs(4), "settled");

    // keepalived of the holder stops: the VIP moves.
    lab.stop_keepalived(first);
    let (h, t) = lab.wait_holder(|h| h != first, "the holder's keepalived stopped");
    println!(
        "keepalived stopped on master-{}: the VIP moved to master-{} in {t:?}",
        first + 1,
        h + 1
    );
    // The stopped one comes back: it does not take the VIP back.
    lab.start_keepalived(first);
    lab.stays(h, Duration::from_secs(8), "the stopped master came back");

    // The holder's API server stops answering /readyz: the VIP moves to another master.
    let failing = h;
    fs::remove_file(lab.readyz(failing)).unwrap();
    let (h, t) = lab.wait_holder(|h| h != failing, "the holder's /readyz failed");
    println!(
        "/readyz failed on master-{}: the VIP moved to master-{} in {t:?}",
        failing + 1,
        h + 1
    );
    // It recovers: the VIP stays where it went.
    fs::write(lab.readyz(failing), "ok").unwrap();
    lab.stays(h, Duration::from_secs(8), "the failed API server recovered");

    // The holder loses power: its link goes first (no goodbye advert), then every process of
    // the "machine"; the others notice the missing adverts and one takes the VIP.
    let dead = h;
    ip(&[
        "-n",
        &lab.ns[dead],
        "link",
        "set",
        &format!("eth{dead}"),
        "down",
    ]);
    let o = Command::new("ip")
        .args(["netns", "pids", &lab.ns[dead]])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    if let Some(mut c) = lab.keepalived[dead].take() {
        let _ = c.wait();
    }
    ip(&[
        "-n",
        &lab.ns[dead],
        "addr",
        "flush",
        "dev",
        &format!("eth{dead}"),
    ]);
    let (h, t) = lab.wait_holder(|h| h != dead, "the holder lost power");
    println!(
        "master-{} lost power: the VIP moved to master-{} in {t:?}",
        dead + 1,
        h + 1
    );
    assert!(
        t >= Duration::from_millis(1500),
        "the VIP moved in {t:?}: faster than VRRP's master-down interval, so not by missed adverts"
    );
    let dir = lab.dir.clone();
    drop(lab);
    let _ = fs::remove_dir_all(Path::new(&dir));
}
