//! Founding, joining and rejoining decided at boot (issue 19): the `kiln-k3s-bootstrap` kiln
//! bakes into master images, run against scratch node roots and the k3s server stand-in
//! (`tests/standin/k3s_cluster.py`, modelled on k3s's source: /cacerts, /db/info, the
//! duplicate-name refusal of a join, Node deletion -> etcd member removal with a lag). Every
//! address is on loopback. Needs curl, openssl and Python `cryptography` + PyYAML (~1 min).

mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VIP: &str = "127.0.0.10";
const M1: &str = "127.0.0.11";
const M2: &str = "127.0.0.12";
const WAIT: u64 = 4;

fn ready(name: &str) -> bool {
    for t in ["curl", "openssl", "python3", "sha256sum"] {
        if !which(t) {
            skip(name, &format!("{t} not installed"));
            return false;
        }
    }
    let ok = Command::new("python3")
        .args(["-c", "import cryptography, yaml"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip(
            name,
            "python cryptography/PyYAML not installed (pip install cryptography pyyaml)",
        );
    }
    ok
}

fn standin() -> PathBuf {
    repo_root().join("tests/standin/k3s_cluster.py")
}

struct World {
    _dir: tempfile::TempDir,
    base: PathBuf,
    script: PathBuf,
    keys: PathBuf,
    token: String,
    port: u16,
}

/// A node root as the image and the earlier ExecStartPres leave it: the node's drop-in, the
/// token, the cluster's CAs in server/tls (kiln-k3s-ca).
fn node_root(w: &World, name: &str, ip: &str) -> PathBuf {
    let r = w.base.join(format!("root-{name}-{}", rand_suffix()));
    let etc = r.join("etc/rancher/k3s");
    fs::create_dir_all(etc.join("config.yaml.d")).unwrap();
    fs::write(
        etc.join("config.yaml"),
        "token-file: \"/etc/rancher/k3s/token\"\n",
    )
    .unwrap();
    fs::write(
        etc.join("config.yaml.d/50-kiln-node.yaml"),
        format!("node-name: \"{name}\"\nnode-ip: \"{ip}\"\n"),
    )
    .unwrap();
    fs::write(etc.join("token"), format!("{}\n", w.token)).unwrap();
    let tls = r.join("var/lib/rancher/k3s/server/tls");
    fs::create_dir_all(&tls).unwrap();
    for (f, k) in [
        ("server-ca.crt", "k3s-server-ca.crt"),
        ("client-ca.crt", "k3s-client-ca.crt"),
        ("client-ca.key", "k3s-client-ca.key"),
    ] {
        fs::copy(w.keys.join(k), tls.join(f)).unwrap();
    }
    r
}

fn rand_suffix() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        .to_string()
}

struct Run {
    ok: bool,
    log: String,
    decision: String,
    took: Duration,
}

fn bootstrap(w: &World, root: &Path, script: &Path) -> Run {
    let tmp = root.join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let t = Instant::now();
    let o = Command::new("sh")
        .arg(script)
        .env("KILN_ROOT", root)
        .env("KILN_K3S", standin())
        .env("KILN_K3S_PORT", w.port.to_string())
        .env("KILN_BOOTSTRAP_POLL", "1")
        .env("KILN_BOOTSTRAP_FREE_WAIT", "20")
        .env("KILN_TMP", &tmp)
        .output()
        .unwrap();
    let took = t.elapsed();
    let log = combined(&o);
    let decision =
        fs::read_to_string(root.join("etc/rancher/k3s/config.yaml.d/60-kiln-bootstrap.yaml"))
            .unwrap_or_default();
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "the client key was left behind"
    );
    Run {
        ok: o.status.success(),
        log,
        decision,
        took,
    }
}

/// The stand-in k3s server starting on the node (exits once it has founded, joined, restarted
/// or refused).
fn k3s(w: &World, root: &Path) -> (bool, String) {
    let o = Command::new("python3")
        .arg(standin())
        .arg("server")
        .env("KILN_ROOT", root)
        .env("KILN_K3S_PORT", w.port.to_string())
        .output()
        .unwrap();
    (o.status.success(), combined(&o))
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(w: &World, addr: &str, members: &[(String, &str)], foreign: bool) -> Server {
    let m: Vec<String> = members.iter().map(|(n, a)| format!("{n}@{a}")).collect();
    let tls = w.base.join("cluster-tls");
    fs::create_dir_all(&tls).unwrap();
    for (f, k) in [
        ("server-ca.crt", "k3s-server-ca.crt"),
        ("server-ca.key", "k3s-server-ca.key"),
        ("client-ca.crt", "k3s-client-ca.crt"),
    ] {
        fs::copy(w.keys.join(k), tls.join(f)).unwrap();
    }
    let child = Command::new("python3")
        .arg(standin())
        .arg("serve")
        .arg(format!("--tls={}", tls.display()))
        .arg(format!("--addr={addr}"))
        .arg(format!("--port={}", w.port))
        .arg(format!("--secret={TEST_TOKEN}"))
        .arg(format!("--members={}", m.join(",")))
        .arg("--remove-lag=2")
        .arg(format!("--foreign={}", u8::from(foreign)))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let s = Server(child);
    let t = Instant::now();
    loop {
        let o = Command::new("curl")
            .args(["-sk", "--max-time", "2"])
            .arg(format!("https://{addr}:{}/ping", w.port))
            .output()
            .unwrap();
        if o.stdout == b"pong" {
            return s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "stand-in did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn state(w: &World, addr: &str) -> serde_json::Value {
    let o = Command::new("curl")
        .args(["-sk", "--max-time", "5"])
        .arg(format!("https://{addr}:{}/kiln-standin/state", w.port))
        .output()
        .unwrap();
    serde_json::from_slice(&o.stdout).unwrap()
}

fn member_name(root: &Path) -> String {
    fs::read_to_string(root.join("var/lib/rancher/k3s/server/db/etcd/name")).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// kiln's script for a three-master inventory, with the inventory's addresses moved to
/// loopback (the generator itself is tested in tests/k3s.rs).
fn world(restore: Option<&str>, bootstrapped: bool) -> World {
    let d = project_copy();
    let p = d.path().join("recipes/cluster.toml");
    let mut s = fs::read_to_string(&p).unwrap();
    for (n, ip) in [("2", "12"), ("3", "13")] {
        s.push_str(&format!("\n[[nodes]]\nhostname = \"master-{n}\"\nmac = \"52:54:00:00:00:1{n}\"\nrole = \"master\"\naddress = \"10.0.0.{ip}/24\"\n"));
    }
    fs::write(&p, s).unwrap();
    let project = kiln::project::recipe::load_project(d.path()).unwrap();
    let mut k = project.cluster.k3s.clone().unwrap();
    k.founding_wait = Some(WAIT as u32);
    k.bootstrapped = bootstrapped;
    k.restore = restore.map(|s| kiln::project::inventory::Restore {
        snapshot: s.to_string(),
    });
    let port = free_port();
    let script = kiln::pipeline::k3s::bootstrap_script(&project.cluster, &k)
        .replace(
            "probe=\"10.0.0.10 10.0.0.11 10.0.0.12 10.0.0.13\"",
            &format!("probe=\"{VIP} {M1} {M2} 127.0.0.13\""),
        )
        .replace(
            "endpoint=\"https://10.0.0.10:6443\"",
            &format!("endpoint=\"https://{VIP}:{port}\""),
        );
    assert!(
        script.contains(&format!("probe=\"{VIP} ")),
        "probe line moved"
    );
    let base = d.path().join("nodes");
    fs::create_dir_all(&base).unwrap();
    let sp = base.join("kiln-k3s-bootstrap");
    fs::write(&sp, script).unwrap();
    let token = kiln::pipeline::resolve::read_token(&project).unwrap();
    World {
        base,
        script: sp,
        keys: d.path().join("keys"),
        token,
        port,
        _dir: d,
    }
}

#[test]
fn found_join_and_rejoin_after_reflash() {
    let name = "found_join_and_rejoin_after_reflash";
    if !ready(name) {
        return;
    }
    let w = world(None, false);

    // 1. A fresh cluster: master-1, empty etcd, nobody answers -> founds after the wait.
    let m1 = node_root(&w, "master-1", M1);
    let r = bootstrap(&w, &m1, &w.script);
    println!("{}", r.log);
    assert!(r.ok, "{}", r.log);
    assert!(
        r.decision.contains("\ncluster-init: true\n"),
        "{}",
        r.decision
    );
    assert!(r.log.contains("founding the cluster"), "{}", r.log);
    assert!(
        r.took >= Duration::from_secs(WAIT),
        "founded before the bounded wait: {:?}",
        r.took
    );
    let (ok, out) = k3s(&w, &m1);
    assert!(ok && out.contains("founded"), "{out}");
    let m1_member = member_name(&m1);
    // The founded cluster is reachable through the VIP (held by master-1).
    let cluster = serve(&w, VIP, &[(m1_member.clone(), M1)], false);

    // 2. master-2 joins: no stale node, the join goes through.
    let m2 = node_root(&w, "master-2", M2);
    let r = bootstrap(&w, &m2, &w.script);
    println!("{}", r.log);
    assert!(r.ok, "{}", r.log);
    let url = format!("server: \"https://{VIP}:{}\"", w.port);
    assert!(r.decision.contains(&url), "{}", r.decision);
    assert!(
        r.log.contains("has no node master-2: the name is free"),
        "{}",
        r.log
    );
    assert!(r.took < Duration::from_secs(WAIT), "a joiner waited");
    let (ok, out) = k3s(&w, &m2);
    assert!(ok, "{out}");
    let first_m2 = member_name(&m2);

    // 3. master-2 reflashed (an empty root): k3s alone would be refused (duplicate name) ...
    let m2b = node_root(&w, "master-2", M2);
    fs::write(
        m2b.join("etc/rancher/k3s/config.yaml.d/60-kiln-bootstrap.yaml"),
        format!("{url}\n"),
    )
    .unwrap();
    let (ok, out) = k3s(&w, &m2b);
    assert!(!ok, "the stand-in let a duplicate name join: {out}");
    assert!(
        out.contains(
            "etcd cluster join failed: duplicate node name found, please use a unique name for this node"
        ),
        "{out}"
    );
    // ... but the bootstrap deletes the stale Node first, waits until k3s removed the etcd
    // member (the Node goes only then), and the join goes through.
    let r = bootstrap(&w, &m2b, &w.script);
    println!("{}", r.log);
    assert!(r.ok, "{}", r.log);
    assert!(r.log.contains("deleting it"), "{}", r.log);
    assert!(
        r.log.contains("node master-2 and its etcd member are gone"),
        "{}",
        r.log
    );
    let (ok, out) = k3s(&w, &m2b);
    assert!(ok, "{out}");
    let st = state(&w, VIP);
    let members = st["members"].as_object().unwrap();
    assert!(!members.contains_key(&first_m2), "stale member kept: {st}");
    assert!(members.contains_key(&member_name(&m2b)), "{st}");
    assert_eq!(members.len(), 2, "{st}");
    let ev: Vec<&str> = st["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    let pos = |p: &str| ev.iter().position(|e| e.starts_with(p)).unwrap();
    assert!(
        pos(&format!("member-remove {first_m2}")) < pos("node-gone master-2"),
        "{ev:?}"
    );

    // 4. master-1 (the founder) reflashed while the others run: joins, never founds.
    let m1b = node_root(&w, "master-1", M1);
    let r = bootstrap(&w, &m1b, &w.script);
    println!("{}", r.log);
    assert!(
        r.ok && r.decision.contains(&url),
        "{}\n{}",
        r.log,
        r.decision
    );
    assert!(!r.decision.contains("cluster-init"));
    assert!(r.log.contains("deleting it"), "{}", r.log);
    let (ok, out) = k3s(&w, &m1b);
    assert!(ok, "{out}");
    assert!(!state(&w, VIP)["members"]
        .as_object()
        .unwrap()
        .contains_key(&m1_member));

    // 5. A restart with etcd data: restart from it, no probing needed, and the data partition
    // now shows membership.
    let r = bootstrap(&w, &m1b, &w.script);
    assert!(
        r.ok && r.log.contains("restarting from the etcd data"),
        "{}",
        r.log
    );
    assert!(r.decision.contains("cluster-init: true"), "{}", r.decision);
    assert!(m1b.join("var/lib/rancher/kiln/etcd-member").is_file());
    let (ok, out) = k3s(&w, &m1b);
    assert!(ok && out.contains("existing cluster member"), "{out}");
    let r = bootstrap(&w, &m2b, &w.script);
    assert!(r.ok && r.decision.contains(&url), "{}", r.decision);
    drop(cluster);

    // 6. All masters lost, master-1's etcd gone but its data partition remembers: it does not
    // found a second cluster; it waits for one to join.
    fs::remove_dir_all(m1b.join("var/lib/rancher/k3s/server/db")).unwrap();
    let r = bootstrap(&w, &m1b, &w.script);
    println!("{}", r.log);
    assert!(r.ok, "{}", r.log);
    assert!(
        !r.decision.contains("cluster-init") && r.decision.contains(&url),
        "{}",
        r.decision
    );
    assert!(r.log.contains("not founding a second cluster"), "{}", r.log);

    // 7. A non-founder with nothing answering joins the endpoint without waiting (k3s retries).
    let m3 = node_root(&w, "master-3", "127.0.0.13");
    let r = bootstrap(&w, &m3, &w.script);
    assert!(r.ok && r.decision.contains(&url), "{}", r.decision);
    assert!(r.log.contains("master-1 founds it"), "{}", r.log);
    assert!(r.took < Duration::from_secs(WAIT));

    // 8. A server with another cluster's CA answers: not joined; master-1 founds after the wait.
    let foreign = serve(&w, M2, &[], true);
    let m1c = node_root(&w, "master-1", M1);
    let r = bootstrap(&w, &m1c, &w.script);
    println!("{}", r.log);
    assert!(
        r.ok && r.decision.contains("cluster-init: true"),
        "{}",
        r.log
    );
    assert!(r.log.contains("another cluster's CA"), "{}", r.log);
    drop(foreign);
}

#[test]
fn bootstrapped_override_and_restore() {
    let name = "bootstrapped_override_and_restore";
    if !ready(name) {
        return;
    }
    // bootstrapped = true: the founder never founds, and does not wait.
    let w = world(None, true);
    let m1 = node_root(&w, "master-1", M1);
    let r = bootstrap(&w, &m1, &w.script);
    assert!(r.ok, "{}", r.log);
    assert!(!r.decision.contains("cluster-init"), "{}", r.decision);
    assert!(r.log.contains("bootstrapped = true"), "{}", r.log);
    assert!(r.took < Duration::from_secs(WAIT));

    // [k3s.restore]: the founder resets etcd from the snapshot once (k3s --cluster-reset
    // with the restore path, not while a server URL is configured), then restarts from it.
    let snap = "/var/lib/rancher/k3s/server/db/snapshots/etcd-snapshot-master-1-1733000000";
    let w = world(Some(snap), false);
    let m1 = node_root(&w, "master-1", M1);
    let r = bootstrap(&w, &m1, &w.script);
    assert!(
        !r.ok,
        "restored from a snapshot that is not there: {}",
        r.log
    );
    assert!(r.log.contains("snapshot path does not exist"), "{}", r.log);
    let sp = m1.join(snap.trim_start_matches('/'));
    fs::create_dir_all(sp.parent().unwrap()).unwrap();
    fs::write(&sp, "etcd snapshot").unwrap();
    let r = bootstrap(&w, &m1, &w.script);
    println!("{}", r.log);
    assert!(r.ok, "{}", r.log);
    assert!(r.log.contains("membership has been reset"), "{}", r.log);
    assert!(r.log.contains("restarting from the etcd data"), "{}", r.log);
    assert!(m1
        .join("var/lib/rancher/k3s/server/db/reset-flag")
        .is_file());
    let member = member_name(&m1);
    // The next start does not reset again.
    let r = bootstrap(&w, &m1, &w.script);
    assert!(r.ok && !r.log.contains("reset"), "{}", r.log);
    assert_eq!(member_name(&m1), member);
    // Never over a running cluster.
    let _c = serve(&w, VIP, &[(member.clone(), M1)], false);
    let m1b = node_root(&w, "master-1", M1);
    let r = bootstrap(&w, &m1b, &w.script);
    assert!(!r.ok, "{}", r.log);
    assert!(
        r.log.contains("refusing to reset a running cluster"),
        "{}",
        r.log
    );
    // The other masters, reflashed, join the restored cluster.
    let m2 = node_root(&w, "master-2", M2);
    let r = bootstrap(&w, &m2, &w.script);
    assert!(r.ok && r.decision.contains("server:"), "{}", r.log);
    let (ok, out) = k3s(&w, &m2);
    assert!(ok, "{out}");
}
