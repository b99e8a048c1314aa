//! In-place updates on this host, with real parts: the node's scripts (`kiln-update`,
//! `kiln-health`, the ESP generator) run by `sh` against scratch node state — slot partitions
//! as image files, the ESP as a directory, efivars as files — and talk to a real `kiln serve`
//! on loopback serving signed stand-in builds whose root.squashfs kiln's writer made. A rogue
//! server (tampered SHA256SUMS, tampered pieces) checks what the node refuses. The qemu boot
//! of the same flow is in tests/slow_build.rs.

// Signals to the kiln serve child.
#![allow(unsafe_code)]

mod common;
mod signing;

use kiln::formats::pieces::{self, Pieces};
use kiln::pipeline::update::{ESP_GENERATOR, HEALTH_SCRIPT, UPDATE_SCRIPT};
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const VAR: &str = "LoaderDevicePartUUID-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

/// Runs the generator with `efivars` as the variable directory; returns its output dir.
fn generate(dir: &Path, efivars: &Path) -> std::path::PathBuf {
    let script = dir.join("gen");
    fs::write(&script, ESP_GENERATOR).unwrap();
    let out = dir.join("out");
    fs::create_dir_all(&out).unwrap();
    let o = Command::new("sh")
        .arg(&script)
        .arg(&out)
        .arg(dir.join("early"))
        .arg(dir.join("late"))
        .env("KILN_EFIVARS", efivars)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", common::combined(&o));
    out
}

/// The variable as efivarfs shows it: 4 attribute bytes, then UTF-16LE text with a NUL.
fn efivar(text: &str) -> Vec<u8> {
    let mut v = vec![6, 0, 0, 0];
    for u in text.encode_utf16().chain([0]) {
        v.extend_from_slice(&u.to_le_bytes());
    }
    v
}

#[test]
fn esp_generator_mounts_the_partition_systemd_boot_started_from() {
    let d = tempfile::tempdir().unwrap();
    let vars = d.path().join("efivars");
    fs::create_dir_all(&vars).unwrap();
    fs::write(
        vars.join(VAR),
        efivar("1F2E3D4C-5B6A-4798-8A7B-6C5D4E3F2A1B"),
    )
    .unwrap();
    let out = generate(d.path(), &vars);
    let unit = fs::read_to_string(out.join("efi.mount")).unwrap();
    assert!(
        unit.contains("What=/dev/disk/by-partuuid/1f2e3d4c-5b6a-4798-8a7b-6c5d4e3f2a1b\nWhere=/efi\nType=vfat\n"),
        "{unit}"
    );
    assert_eq!(
        fs::read_link(out.join("local-fs.target.wants/efi.mount")).unwrap(),
        Path::new("../efi.mount")
    );
}

#[test]
fn esp_generator_does_nothing_without_systemd_boot_or_with_a_bad_value() {
    for value in [
        None,
        Some("not-a-guid"),
        Some("1f2e3d4c-5b6a-4798-8a7b-6c5d4e3f2a1$"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let vars = d.path().join("efivars");
        fs::create_dir_all(&vars).unwrap();
        if let Some(v) = value {
            fs::write(vars.join(VAR), efivar(v)).unwrap();
        }
        let out = generate(d.path(), &vars);
        assert_eq!(fs::read_dir(&out).unwrap().count(), 0, "{value:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// kiln-health

fn health(dir: &Path, tsv: &str, efivars: &Path) -> (bool, String, String) {
    let script = dir.join("kiln-health");
    fs::write(&script, HEALTH_SCRIPT).unwrap();
    let conf = dir.join("health.tsv");
    fs::write(&conf, tsv).unwrap();
    let run = dir.join("run");
    let o = Command::new("sh")
        .arg(&script)
        .env("KILN_HEALTH_CONF", &conf)
        .env("KILN_RUN", &run)
        .env("KILN_EFIVARS", efivars)
        .env("KILN_HEALTH_EVERY", "1")
        .env("KILN_HEALTH_NO_REBOOT", "1")
        .env("KILN_UPDATE", dir.join("no-updater"))
        .output()
        .unwrap();
    (
        o.status.success(),
        common::combined(&o),
        fs::read_to_string(run.join("health")).unwrap_or_default(),
    )
}

#[test]
fn health_passes_retries_until_its_timeout_and_says_what_failed() {
    let d = tempfile::tempdir().unwrap();
    let vars = d.path().join("efivars");
    fs::create_dir_all(&vars).unwrap();
    // A check that passes on its third try (a file appears), and one reading stdin (which must
    // not swallow the following lines).
    let flag = d.path().join("n");
    let tsv = format!(
        "# comment\n10\tcomes up\tn=$(cat {f} 2>/dev/null || echo 0); echo $((n + 1)) > {f}; [ $n -ge 2 ]\n5\treads stdin\tcat >/dev/null; true\n",
        f = flag.display()
    );
    let (ok, out, state) = health(d.path(), &tsv, &vars);
    assert!(ok, "{out}");
    assert!(
        out.contains("ok: comes up") && out.contains("ok: reads stdin"),
        "{out}"
    );
    assert_eq!(state, "healthy\n");
    assert_eq!(fs::read_to_string(&flag).unwrap().trim(), "3");

    // A failing check: given up after its timeout, named with its last output line; not on a
    // counted boot, so no reboot.
    let t = std::time::Instant::now();
    let (ok, out, state) = health(
        d.path(),
        "2\tapi answers\techo first; echo 'connection refused'; false\n60\tnever run\ttrue\n",
        &vars,
    );
    assert!(!ok, "{out}");
    assert!(t.elapsed().as_secs() >= 2, "{out}");
    assert_eq!(state, "unhealthy api answers: connection refused\n");
    assert!(!out.contains("never run"), "{out}");
    assert!(out.contains("no earlier build to fall back to"), "{out}");

    // On a boot systemd-boot counted, a failure reboots (here: says so).
    fs::write(
        vars.join("LoaderBootCountPath-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"),
        efivar("\\loader\\entries\\kiln-2+1-2.conf"),
    )
    .unwrap();
    let (ok, out, _) = health(d.path(), "1\tfails\tfalse\n", &vars);
    assert!(!ok);
    assert!(
        out.contains("on trial (kiln-2+1-2.conf, 1 tries left): rebooting"),
        "{out}"
    );
    let (ok, out, _) = health(d.path(), "1\tfine\ttrue\n", &vars);
    assert!(
        ok && out.contains("kiln-2+1-2.conf is blessed next"),
        "{out}"
    );
}

// ---------------------------------------------------------------------------------------------
// Stand-in builds and kiln serve

const OLD: &str = "aaaa000000000000000000000000000000000000000000000000000000000001";
const NEW: &str = "bbbb000000000000000000000000000000000000000000000000000000000002";
const SDE: i64 = 1_700_000_000;
/// Each slot image's size (bigger than any stand-in root.squashfs).
const SLOT: u64 = 24 << 20;

/// A root tree as a tar: a few thousand small files, some big ones, `/etc/motd` with `motd`.
fn root_tar(motd: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: String, data: Vec<u8>| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(SDE as u64);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        b.append_data(&mut h, path, &data[..]).unwrap();
    };
    add("etc/motd".into(), motd.as_bytes().to_vec());
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut rnd = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b"abcdefghij klmno\n"[(x % 17) as usize]
            })
            .collect()
    };
    for i in 0..2000 {
        add(
            format!("usr/share/doc/f{i:05}"),
            rnd(300 + (i * 7919) % 3000),
        );
    }
    for i in 0..6 {
        add(format!("usr/lib/big{i}"), rnd((1 << 20) + 12345 * i));
    }
    b.into_inner().unwrap()
}

struct StandIn {
    squashfs: Vec<u8>,
    pieces: Pieces,
}

/// Writes a signed worker build `id` into `out/worker/<id>` whose root has `motd`.
fn standin_build(out: &Path, id: &str, motd: &str, key: &ed25519_dalek::SigningKey) -> StandIn {
    let dir = out.join("worker").join(id);
    fs::create_dir_all(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let tar = tmp.path().join("root.tar");
    fs::write(&tar, root_tar(motd)).unwrap();
    let sq = dir.join("root.squashfs");
    let w = kiln::formats::squashfs::write_from_tar(
        &tar,
        &sq,
        &kiln::pipeline::emit::squashfs_options(SDE),
        &mut kiln::formats::reuse::Reuse::default(),
    )
    .unwrap();
    let p = pieces::of_image(&sq, &w.index.spans()).unwrap();
    fs::write(dir.join("root.pieces"), p.to_text()).unwrap();
    let update = kiln::pipeline::update::update_txt(
        "worker",
        id,
        "homelab",
        SDE,
        &format!("kiln homelab worker ({})", &id[..12]),
        "boot=live plainroot root=/dev/disk/by-partuuid/@PARTUUID@ console=ttyS0,115200n8",
    );
    fs::write(dir.join("update.txt"), update).unwrap();
    // The kernel is the same in both builds, the initrd differs.
    fs::write(dir.join("vmlinuz"), vec![7u8; 300_000]).unwrap();
    fs::write(
        dir.join("initrd.img"),
        format!("initrd of {id}").repeat(1000),
    )
    .unwrap();
    let manifest = serde_json::json!({"kernel": {"cmdline": "boot=live plainroot root=/dev/disk/by-partuuid/x console=ttyS0,115200n8"}, "contains_secrets": false});
    fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let names = [
        "initrd.img",
        "manifest.json",
        "root.pieces",
        "root.squashfs",
        "update.txt",
        "vmlinuz",
    ];
    signing::write_sums_and_sign(&dir, &names, key);
    StandIn {
        squashfs: fs::read(&sq).unwrap(),
        pieces: p,
    }
}

struct Serve {
    child: Child,
    http: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn serve(project: &Path) -> Serve {
    serve_with(project, &[])
}

fn serve_with(project: &Path, extra: &[&str]) -> Serve {
    let ipxe = project.join("ipxe");
    fs::create_dir_all(&ipxe).unwrap();
    fs::write(ipxe.join("ipxe.efi"), b"stand-in").unwrap();
    let mut child = signing::kiln()
        .arg("--dir")
        .arg(project)
        .args([
            "serve",
            "--json",
            "--listen",
            "127.0.0.1",
            "--http-port",
            "0",
            "--tftp-port",
            "0",
            "--dhcp-port",
            "0",
            "--proxy-port",
            "0",
            "--grace-secs",
            "1",
            "--ipxe-dir",
        ])
        .arg(&ipxe)
        .args(extra)
        .env("KILN_LOG", "kiln=info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
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
    if line.is_empty() {
        let st = child.wait().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        panic!("kiln serve exited {st}: {}", stderr.lock().unwrap());
    }
    let status: serde_json::Value = serde_json::from_str(&line).unwrap();
    Serve {
        child,
        http: format!("http://{}", status["http"].as_str().unwrap()),
        stderr,
    }
}

/// A project with `[updates]` and the stand-in builds OLD (latest) and NEW.
fn project() -> (tempfile::TempDir, StandIn, StandIn) {
    let p = common::project_copy();
    let c = p.path().join("recipes/cluster.toml");
    let mut t = fs::read_to_string(&c).unwrap();
    t.push_str(
        "\n[updates]\nserver = \"http://10.0.0.2:8080\"\npoll_seconds = 30\ndrain_timeout = 10\n",
    );
    fs::write(&c, t).unwrap();
    let key = kiln::trust::sign::load_signing_key(&p.path().join("keys")).unwrap();
    let out = p.path().join("out");
    let old = standin_build(&out, OLD, "welcome to build 1\n", &key);
    let new = standin_build(&out, NEW, "welcome to build 2, edited\n", &key);
    std::os::unix::fs::symlink(OLD, out.join("worker/latest")).unwrap();
    (p, old, new)
}

/// One node's scratch state: slot images, ESP directory, efivars, run dir, settings.
struct Node {
    dir: tempfile::TempDir,
    host: String,
}

impl Node {
    /// Flashed with `build` (slot A holds its squashfs; ESP: kiln-1.conf and kiln/a/).
    fn flashed(project: &Path, server: &str, host: &str, build: &str, sq: &StandIn) -> Node {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let bdir = project.join("out/worker").join(build);
        let mut a = sq.squashfs.clone();
        a.resize(SLOT as usize, 0);
        fs::write(root.join("slot-a"), a).unwrap();
        fs::write(root.join("slot-b"), vec![0u8; SLOT as usize]).unwrap();
        let esp = root.join("esp");
        fs::create_dir_all(esp.join("loader/entries")).unwrap();
        fs::create_dir_all(esp.join("kiln/a")).unwrap();
        for f in ["vmlinuz", "initrd.img", "root.pieces"] {
            fs::copy(bdir.join(f), esp.join("kiln/a").join(f)).unwrap();
        }
        fs::write(
            esp.join("loader/entries/kiln-1.conf"),
            "title kiln homelab worker\nlinux /kiln/a/vmlinuz\ninitrd /kiln/a/initrd.img\noptions boot=live plainroot root=/dev/disk/by-partuuid/aaaaaaaa-0000-4000-8000-000000000001\n",
        )
        .unwrap();
        fs::create_dir_all(root.join("efivars")).unwrap();
        fs::create_dir_all(root.join("run/identity")).unwrap();
        let secret = kiln::pipeline::resolve::read_node_identity(
            &kiln::project::recipe::load_project(project).unwrap(),
        )
        .unwrap();
        let key = kiln::trust::identity::update_key(&secret, "homelab", host);
        fs::write(
            root.join("run/identity/update-key"),
            format!("{}\n", hex::encode(&key[..])),
        )
        .unwrap();
        let signing = kiln::trust::sign::load_signing_key(&project.join("keys")).unwrap();
        fs::write(
            root.join("allowed_signers"),
            format!(
                "{}\n",
                kiln::trust::sign::allowed_signers_line(&signing.verifying_key())
            ),
        )
        .unwrap();
        fs::write(root.join("kiln-update"), UPDATE_SCRIPT).unwrap();
        let n = Node {
            dir: d,
            host: host.into(),
        };
        n.set_server(server);
        n.boot(build, 'a', Some("healthy"));
        n
    }

    /// Points the node's updater at another server URL.
    fn set_server(&self, server: &str) {
        fs::write(
            self.path("update.conf"),
            format!("server={server}\nrole=worker\ntries=3\n"),
        )
        .unwrap();
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// A (simulated) boot into `build` from `slot`: the running build's build.json, the
    /// command line, the health result, a fresh /run.
    fn boot(&self, build: &str, slot: char, health: Option<&str>) {
        let _ = fs::remove_file(self.path("run/update-reported"));
        let _ = fs::remove_file(self.path("run/health"));
        if let Some(h) = health {
            fs::write(self.path("run/health"), format!("{h}\n")).unwrap();
        }
        fs::write(
            self.path("build.json"),
            format!("{{\n  \"build_id\": \"{build}\",\n  \"role\": \"worker\",\n  \"source_date_epoch\": {SDE}\n}}\n"),
        )
        .unwrap();
        fs::write(
            self.path("cmdline"),
            format!("boot=live plainroot root=/dev/disk/by-partuuid/{slot} console=ttyS0\n"),
        )
        .unwrap();
        fs::write(self.path("active"), slot.to_string()).unwrap();
    }

    /// Runs `kiln-update <args>`; (success, output).
    fn update(&self, args: &[&str]) -> (bool, String) {
        let o = self.update_cmd(args).output().unwrap();
        (o.status.success(), common::combined(&o))
    }

    /// The `kiln-update <args>` command with this node's state.
    fn update_cmd(&self, args: &[&str]) -> Command {
        let active = fs::read_to_string(self.path("active")).unwrap();
        let mut c = Command::new("sh");
        c.arg(self.path("kiln-update"))
            .args(args)
            .env("KILN_UPDATE_CONF", self.path("update.conf"))
            .env("KILN_ALLOWED_SIGNERS", self.path("allowed_signers"))
            .env("KILN_BUILD_JSON", self.path("build.json"))
            .env("KILN_ESP", self.path("esp"))
            .env("KILN_RUN", self.path("run"))
            .env("KILN_EFIVARS", self.path("efivars"))
            .env("KILN_CMDLINE", self.path("cmdline"))
            .env("KILN_SLOT_A", self.path("slot-a"))
            .env("KILN_SLOT_B", self.path("slot-b"))
            .env("KILN_ACTIVE_SLOT", active.trim())
            .env("KILN_PARTUUID_A", "aaaaaaaa-0000-4000-8000-000000000001")
            .env("KILN_PARTUUID_B", "bbbbbbbb-0000-4000-8000-000000000002")
            .env("KILN_HOST", &self.host)
            .env("KILN_UPDATE_WAIT_EVERY", "1")
            .env("KILN_UPDATE_NO_REBOOT", "1");
        c
    }

    fn esp(&self, p: &str) -> PathBuf {
        self.path("esp").join(p)
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.esp("loader/entries"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// The server side of a k3s cluster (tests/standin/k3s_cluster.py, serve mode) with agent
/// Nodes `workers` and `pods` (`ns/name@node[:ds|:mirror|:pdb]`), TLS from the project's keys.
struct K8s {
    child: Child,
    url: String,
}

impl Drop for K8s {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl K8s {
    fn state(&self) -> serde_json::Value {
        let o = Command::new("curl")
            .args(["-sk", "--max-time", "5"])
            .arg(format!("{}/kiln-standin/state", self.url))
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn events(&self) -> Vec<String> {
        self.state()["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_string())
            .collect()
    }

    /// Waits (up to 20 s) for an event.
    fn wait_event(&self, e: &str) {
        let t = std::time::Instant::now();
        while !self.events().iter().any(|x| x == e) {
            assert!(
                t.elapsed().as_secs() < 20,
                "no {e:?} in {:?}",
                self.events()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

/// `None` (with a SKIP line) when Python's `cryptography` is missing.
fn k8s(project: &Path, workers: &[&str], pods: &[&str], test: &str) -> Option<K8s> {
    let ok = Command::new("python3")
        .args(["-c", "import cryptography, yaml"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        common::skip(
            test,
            "python3 with cryptography and yaml not installed (pip install cryptography pyyaml)",
        );
        return None;
    }
    let tls = project.join("k8s-tls");
    fs::create_dir_all(&tls).unwrap();
    for (f, k) in [
        ("server-ca.crt", "k3s-server-ca.crt"),
        ("server-ca.key", "k3s-server-ca.key"),
        ("client-ca.crt", "k3s-client-ca.crt"),
    ] {
        fs::copy(project.join("keys").join(k), tls.join(f)).unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("python3")
        .arg(common::repo_root().join("tests/standin/k3s_cluster.py"))
        .arg("serve")
        .arg(format!("--tls={}", tls.display()))
        .arg("--addr=127.0.0.1")
        .arg(format!("--port={port}"))
        .arg("--secret=x")
        .arg(format!("--workers={}", workers.join(",")))
        .arg(format!("--pods={}", pods.join(",")))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let k = K8s {
        child,
        url: format!("https://127.0.0.1:{port}"),
    };
    let t = std::time::Instant::now();
    loop {
        let o = Command::new("curl")
            .args(["-sk", "--max-time", "2"])
            .arg(format!("{}/ping", k.url))
            .output()
            .unwrap();
        if o.stdout == b"pong" {
            return Some(k);
        }
        assert!(t.elapsed().as_secs() < 20, "the k3s stand-in did not start");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The efivarfs form of a UTF-16 string variable.
fn efivar_str(s: &str) -> Vec<u8> {
    efivar(s)
}

fn rollout(project: &Path, args: &[&str]) -> (i32, String, String) {
    signing::out(
        signing::kiln()
            .arg("--dir")
            .arg(project)
            .arg("rollout")
            .args(args)
            .output()
            .unwrap(),
    )
}

fn rollout_file(project: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(project.join("out/rollouts/worker.json")).unwrap()).unwrap()
}

fn node_of<'a>(r: &'a serde_json::Value, host: &str) -> &'a serde_json::Value {
    r["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["host"] == host)
        .unwrap()
}

/// The whole node-side flow against the real server: a worker on build 1 is rolled to build
/// 2 (one file of its root edited): it fetches only the changed pieces (the byte count is what
/// root.pieces predicts, a small part of the image), writes slot B and a counted entry while
/// slot A's entry stays, and, booted into it and healthy, is done; the rollout then assigns the
/// next worker. A rolled-back node stops the rollout with its reason and does not retry.
#[test]
fn node_rolls_to_a_new_build_fetching_only_changed_pieces_then_rolls_back() {
    if signing::ssh_keygen("node_rolls_to_a_new_build").is_none() {
        return;
    }
    for t in ["curl", "openssl", "awk", "dd"] {
        if !common::which(t) {
            common::skip("node_rolls_to_a_new_build", &format!("{t} not installed"));
            return;
        }
    }
    let (p, old, new) = project();
    let Some(kube) = k8s(
        p.path(),
        &["worker-1", "worker-2"],
        &[
            "apps/web-1@worker-1",
            "kube-system/svclb-x1@worker-1:ds",
            "apps/web-2@worker-2",
        ],
        "node_rolls_to_a_new_build",
    ) else {
        return;
    };
    let kube_args = ["--kube-api", kube.url.as_str()];
    let s = serve_with(p.path(), &kube_args);
    let w1 = Node::flashed(p.path(), &s.http, "worker-1", OLD, &old);
    let w2 = Node::flashed(p.path(), &s.http, "worker-2", OLD, &old);

    // No rollout: the nodes report in and stay.
    for w in [&w1, &w2] {
        let (ok, out) = w.update(&["check"]);
        assert!(ok, "{out}");
        assert!(out.contains("kiln-update: healthy"), "{out}");
        assert!(!out.contains("not delivered"), "{out}");
    }
    let (code, o, e) = rollout(p.path(), &["start", "--role", "worker", "--build", NEW]);
    assert_eq!(code, 0, "{o}{e}");
    assert!(o.contains("2 node(s), 1 at a time"), "{o}");
    let r = rollout_file(p.path());
    assert_eq!(node_of(&r, "worker-1")["from"], OLD, "{r:#}");

    // worker-2 is not assigned while worker-1 updates.
    let (ok, out) = w2.update(&["check"]);
    assert!(ok && !out.contains("downloading"), "{out}");

    let (ok, out) = w1.update(&["check"]);
    assert!(ok, "{out}");
    let plan = new.pieces.plan_from(&old.pieces);
    assert!(
        out.contains(&format!(
            "{} bytes copied from slot a, {} fetched",
            plan.copied_bytes, plan.fetched_bytes
        )),
        "{plan:?}\n{out}"
    );
    assert!(
        plan.fetched_bytes * 20 < new.squashfs.len() as u64,
        "{plan:?} of {}",
        new.squashfs.len()
    );
    let b = fs::read(w1.path("slot-b")).unwrap();
    assert!(
        b[..new.squashfs.len()] == new.squashfs[..],
        "slot b holds build 2's root.squashfs"
    );
    assert_eq!(w1.entries(), ["kiln-1.conf", "kiln-2+3.conf"]);
    let entry = fs::read_to_string(w1.esp("loader/entries/kiln-2+3.conf")).unwrap();
    assert_eq!(
        entry,
        format!("title kiln homelab worker ({})\nlinux /kiln/b/vmlinuz\ninitrd /kiln/b/initrd.img\noptions boot=live plainroot root=/dev/disk/by-partuuid/bbbbbbbb-0000-4000-8000-000000000002 console=ttyS0,115200n8\n", &NEW[..12])
    );
    let ndir = p.path().join("out/worker").join(NEW);
    for f in ["vmlinuz", "initrd.img", "root.pieces"] {
        assert_eq!(
            fs::read(w1.esp(&format!("kiln/b/{f}"))).unwrap(),
            fs::read(ndir.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        fs::read_to_string(w1.esp("kiln/b/build")).unwrap().trim(),
        NEW
    );
    let r = rollout_file(p.path());
    assert_eq!(node_of(&r, "worker-1")["step"], "rebooting", "{r:#}");
    // Booted over the network instead, worker-1 would get build 2 now; worker-2 still build 1.
    let script = |mac: &str| {
        reqwest::blocking::get(format!("{}/boot.ipxe?mac={mac}", s.http))
            .unwrap()
            .text()
            .unwrap()
    };
    assert!(
        script("52:54:00:00:00:21").contains(&format!("/roles/worker/{NEW}/")),
        "{}",
        script("52:54:00:00:00:21")
    );
    assert!(
        script("52:54:00:00:00:22").contains(&format!("/roles/worker/{OLD}/")),
        "{}",
        script("52:54:00:00:00:22")
    );
    // Only the changed pieces went over HTTP: the server's log has the Range requests.
    let log = s.stderr.lock().unwrap().clone();
    assert!(
        log.contains("/roles/worker/") && log.contains("root.squashfs"),
        "{log}"
    );

    // Before its reboot worker-1 was cordoned and drained: its pod evicted, the DaemonSet's
    // pod left; worker-2 untouched.
    let ev = kube.events();
    assert!(
        ev.contains(&"cordon worker-1".to_string()) && ev.contains(&"evict apps/web-1".to_string()),
        "{ev:?}"
    );
    assert!(
        !ev.iter()
            .any(|e| e.contains("svclb") || e.contains("worker-2") || e.contains("web-2")),
        "{ev:?}"
    );
    assert!(out.contains("kiln-update: ready: slot b written"), "{out}");

    // kiln serve restarts mid-rollout (on another port here): it resumes from out/rollouts/.
    drop(s);
    let s = serve_with(p.path(), &kube_args);
    for w in [&w1, &w2] {
        w.set_server(&s.http);
    }

    // Booted into slot B (systemd-boot counted the entry), healthy: done; worker-2 is next.
    fs::rename(
        w1.esp("loader/entries/kiln-2+3.conf"),
        w1.esp("loader/entries/kiln-2+2-1.conf"),
    )
    .unwrap();
    w1.boot(NEW, 'b', Some("healthy"));
    let (ok, out) = w1.update(&["check"]);
    assert!(ok && out.contains("kiln-update: healthy: slot b"), "{out}");
    // Healthy on the new build: uncordoned.
    kube.wait_event("uncordon worker-1");
    let r = rollout_file(p.path());
    assert_eq!(node_of(&r, "worker-1")["phase"], "done", "{r:#}");
    assert_eq!(node_of(&r, "worker-2")["phase"], "in-flight", "{r:#}");

    // worker-2 updates, but build 2 fails its health check there on every try: systemd-boot
    // falls back to kiln-1 and the updater reports the rollback; the rollout stops.
    let (ok, out) = w2.update(&["check"]);
    assert!(ok && out.contains("rebooting"), "{out}");
    fs::rename(
        w2.esp("loader/entries/kiln-2+3.conf"),
        w2.esp("loader/entries/kiln-2+0-3.conf"),
    )
    .unwrap();
    fs::write(
        w2.path("efivars/LoaderEntrySelected-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"),
        efivar_str("kiln-1.conf"),
    )
    .unwrap();
    w2.boot(OLD, 'a', Some("healthy"));
    let (_, out) = w2.update(&["check"]);
    assert!(out.contains("rolled-back: build bbbb"), "{out}");
    assert!(out.contains("failed its health check 3 times"), "{out}");
    let r = rollout_file(p.path());
    assert_eq!(r["state"], "stopped", "{r:#}");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .contains("worker-2 rolled back"),
        "{r:#}"
    );
    let (code, o, _) = rollout(p.path(), &["status", "--role", "worker"]);
    assert_eq!(code, 0);
    assert!(
        o.contains("stopped") && o.contains("worker-2 rolled back") && o.contains("rolledback"),
        "{o}"
    );
    // The bad entry stays last in systemd-boot's order; the good one stays.
    assert_eq!(w2.entries(), ["kiln-1.conf", "kiln-2+0-3.conf"]);

    // Abort: worker-1 goes back to build 1 (a rollback assignment: slot A is written again,
    // slot B's entry stays as the fallback); worker-2 is on build 1 already.
    let (code, o, e) = rollout(p.path(), &["abort", "--role", "worker"]);
    assert_eq!(code, 0, "{o}{e}");
    let (ok, out) = w1.update(&["check"]);
    assert!(
        ok && out.contains(&format!(
            "rebooting: into build {OLD}, slot a, entry kiln-3+3.conf"
        )),
        "{out}"
    );
    assert_eq!(w1.entries(), ["kiln-2+2-1.conf", "kiln-3+3.conf"]);
    let a = fs::read(w1.path("slot-a")).unwrap();
    assert!(a[..old.squashfs.len()] == old.squashfs[..]);
    fs::rename(
        w1.esp("loader/entries/kiln-3+3.conf"),
        w1.esp("loader/entries/kiln-3+2-1.conf"),
    )
    .unwrap();
    w1.boot(OLD, 'a', Some("healthy"));
    let (ok, out) = w1.update(&["check"]);
    assert!(ok, "{out}");
    assert_eq!(rollout_file(p.path())["state"], "aborted");

    // Build 2 again, both nodes at once: worker-2 does not try a build that failed there.
    let (code, o, e) = rollout(
        p.path(),
        &[
            "start",
            "--role",
            "worker",
            "--build",
            NEW,
            "--max-unavailable",
            "2",
        ],
    );
    assert_eq!(code, 0, "{o}{e}");
    let (ok, out) = w2.update(&["check"]);
    assert!(
        !ok && out.contains("failed its health check on this node before; not trying it again"),
        "{out}"
    );
    assert_eq!(
        w2.entries(),
        ["kiln-1.conf", "kiln-2+0-3.conf"],
        "nothing written"
    );
    let r = rollout_file(p.path());
    assert_eq!(
        (
            r["state"].as_str(),
            node_of(&r, "worker-2")["phase"].as_str()
        ),
        (Some("stopped"), Some("rolled-back")),
        "{r:#}"
    );
}

/// Reports the server refuses: another node's key, a replay, a stranger, a body too large.
#[test]
fn server_refuses_forged_replayed_and_foreign_reports() {
    let (p, _old, _new) = project();
    let s = serve(p.path());
    let secret = kiln::pipeline::resolve::read_node_identity(
        &kiln::project::recipe::load_project(p.path()).unwrap(),
    )
    .unwrap();
    let body = |host: &str, seq: u64| {
        format!("kiln-report/1\nhost {host}\nseq {seq}\nbuild {OLD}\nslot a\nstep healthy\ntarget -\nhealth healthy\ndetail slot a")
    };
    let sign = |host: &str, b: &str| {
        use hmac::Mac;
        let k = kiln::trust::identity::update_key(&secret, "homelab", host);
        let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&k[..]).unwrap();
        m.update(b.as_bytes());
        hex::encode(m.finalize().into_bytes())
    };
    let c = reqwest::blocking::Client::new();
    let post = |host: &str, b: &str, auth: &str| {
        c.post(format!("{}/v1/nodes/{host}/report", s.http))
            .header("X-Kiln-Auth", auth)
            .body(b.to_string())
            .send()
            .unwrap()
    };
    let b1 = body("worker-1", 10);
    assert_eq!(post("worker-1", &b1, &sign("worker-1", &b1)).status(), 204);
    // Replayed, or an older sequence number.
    assert_eq!(post("worker-1", &b1, &sign("worker-1", &b1)).status(), 409);
    let b0 = body("worker-1", 9);
    assert_eq!(post("worker-1", &b0, &sign("worker-1", &b0)).status(), 409);
    // worker-2's key cannot speak for worker-1; no key at all; a tampered body.
    let b2 = body("worker-1", 11);
    assert_eq!(post("worker-1", &b2, &sign("worker-2", &b2)).status(), 401);
    assert_eq!(post("worker-1", &b2, "").status(), 401);
    let tampered = b2.replace("step healthy", "step rolled-back");
    assert_eq!(
        post("worker-1", &tampered, &sign("worker-1", &b2)).status(),
        401
    );
    // A body naming another host than the URL, a stranger, a body too large, bad input.
    let b3 = body("worker-2", 12);
    assert_eq!(post("worker-1", &b3, &sign("worker-1", &b3)).status(), 400);
    assert_eq!(post("stranger", &b1, &sign("stranger", &b1)).status(), 404);
    let big = "x".repeat(5000);
    assert_eq!(
        post("worker-1", &big, &sign("worker-1", &big)).status(),
        413
    );
    let bad = "kiln-report/1\nhost worker-1\n";
    assert_eq!(post("worker-1", bad, &sign("worker-1", bad)).status(), 400);
    // Nothing was assigned: no rollout.
    let t = c
        .get(format!("{}/v1/nodes/worker-1/target", s.http))
        .send()
        .unwrap();
    assert_eq!(t.status(), 204);
    // The accepted report is what the server knows of the node.
    let seen: serde_json::Value =
        serde_json::from_slice(&fs::read(p.path().join("out/rollouts/nodes.json")).unwrap())
            .unwrap();
    assert_eq!(seen["nodes"]["worker-1"]["seq"], 10, "{seen:#}");
}

/// A server that serves what it is given (here: tampered files) with Range support, answers
/// the target question with `target`, and records report bodies.
struct Rogue {
    addr: String,
    reports: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn rogue(files: std::collections::BTreeMap<String, Vec<u8>>, target: String) -> Rogue {
    rogue_slow(files, target, std::time::Duration::ZERO)
}

/// [`rogue`], answering every Range request for root.squashfs after `delay`.
fn rogue_slow(
    files: std::collections::BTreeMap<String, Vec<u8>>,
    target: String,
    delay: std::time::Duration,
) -> Rogue {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let rep = reports.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let mut r = BufReader::new(c.try_clone().unwrap());
            let mut line = String::new();
            if r.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split(' ').nth(1).unwrap_or("").to_string();
            let (mut range, mut len) = (None, 0usize);
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("range: bytes=") {
                    let (a, b) = v.trim().split_once('-').unwrap();
                    range = Some((a.parse::<usize>().unwrap(), b.parse::<usize>().unwrap()));
                }
                if let Some(v) = lower.strip_prefix("content-length: ") {
                    len = v.trim().parse().unwrap();
                }
            }
            if line.starts_with("POST") {
                let mut b = vec![0u8; len];
                r.read_exact(&mut b).unwrap();
                rep.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&b).into_owned());
                let _ = c.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
                continue;
            }
            let body = if path.ends_with("/target") {
                Some(target.clone().into_bytes())
            } else {
                files.get(path.rsplit('/').next().unwrap()).cloned()
            };
            let Some(body) = body else {
                let _ = c.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            };
            let (code, part) = match range {
                Some((a, b)) => {
                    std::thread::sleep(delay);
                    (
                        "206 Partial Content",
                        body[a..=b.min(body.len() - 1)].to_vec(),
                    )
                }
                None => ("200 OK", body),
            };
            let _ = c.write_all(
                format!(
                    "HTTP/1.1 {code}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    part.len()
                )
                .as_bytes(),
            );
            let _ = c.write_all(&part);
        }
    });
    Rogue { addr, reports }
}

/// What the node refuses from a server that is not to be trusted: a SHA256SUMS changed after
/// signing; a build signed by another key; a piece of root.squashfs changed (fetched again,
/// still wrong: the slot is left unbootable, no entry written). Each refusal is reported.
#[test]
fn node_refuses_tampered_sums_foreign_signatures_and_tampered_pieces() {
    if signing::ssh_keygen("node_refuses_tampered").is_none() {
        return;
    }
    let (p, old, new) = project();
    let ndir = p.path().join("out/worker").join(NEW);
    // A piece the node fetches (one the old image does not have): tampered there, it arrives.
    let have: std::collections::BTreeSet<_> = old
        .pieces
        .pieces
        .iter()
        .map(|x| (x.sha256, x.len))
        .collect();
    let fetched_at = new
        .pieces
        .pieces
        .iter()
        .find(|x| !have.contains(&(x.sha256, x.len)))
        .unwrap()
        .offset;
    let files = |f: &dyn Fn(&str, Vec<u8>) -> Vec<u8>| {
        let mut m = std::collections::BTreeMap::new();
        for n in [
            "SHA256SUMS",
            "SHA256SUMS.sig",
            "update.txt",
            "root.pieces",
            "root.squashfs",
            "vmlinuz",
            "initrd.img",
        ] {
            m.insert(n.to_string(), f(n, fs::read(ndir.join(n)).unwrap()));
        }
        m
    };
    let target = format!("kiln-target/1\nbuild {NEW}\nrole worker\nrollback 0\nreboot 1\nseq 0\n");
    type Tamper = Box<dyn Fn(&str, Vec<u8>) -> Vec<u8>>;
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "sums",
            Box::new(|n: &str, mut b: Vec<u8>| {
                if n == "SHA256SUMS" {
                    b[0] = if b[0] == b'0' { b'1' } else { b'0' };
                }
                b
            }),
            "refused: SHA256SUMS of build bbbb",
        ),
        (
            "piece",
            Box::new(move |n: &str, mut b: Vec<u8>| {
                if n == "root.squashfs" {
                    b[fetched_at as usize] ^= 0xff;
                }
                b
            }),
            "still does not match root.squashfs's signed sha256",
        ),
    ];
    for (name, f, want) in cases {
        let r = rogue(files(&*f), target.clone());
        let n = Node::flashed(p.path(), &r.addr, "worker-1", OLD, &old);
        let (ok, out) = n.update(&["check"]);
        assert!(!ok, "{name}: {out}");
        assert!(out.contains(want), "{name}: {out}");
        assert_eq!(
            n.entries(),
            ["kiln-1.conf"],
            "{name}: no entry for a slot that did not verify"
        );
        let reports = r.reports.lock().unwrap().clone();
        assert!(
            reports
                .iter()
                .any(|b| b.contains("step refused") || b.contains("step failed")),
            "{name}: {reports:?}"
        );
    }
    // Signed by another key than the one baked into the image.
    let other = signing::test_key(9);
    let r = {
        let mut m = files(&|_, b| b);
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("SHA256SUMS"), &m["SHA256SUMS"]).unwrap();
        kiln::trust::sign::sign_dir(d.path(), &other).unwrap();
        m.insert(
            "SHA256SUMS.sig".into(),
            fs::read(d.path().join("SHA256SUMS.sig")).unwrap(),
        );
        rogue(m, target.clone())
    };
    let n = Node::flashed(p.path(), &r.addr, "worker-1", OLD, &old);
    let (ok, out) = n.update(&["check"]);
    assert!(
        !ok && out.contains("is not signed by this cluster's key"),
        "{out}"
    );
    // A build of another role, and an older build without a rollback.
    let upd = fs::read_to_string(ndir.join("update.txt")).unwrap();
    for (text, want) in [
        (upd.replace("role worker", "role gpu"), "is of role gpu"),
        (
            upd.replace(
                &format!("source_date_epoch {SDE}"),
                "source_date_epoch 1600000000",
            ),
            "is older",
        ),
    ] {
        let d = tempfile::tempdir().unwrap();
        let key = kiln::trust::sign::load_signing_key(&p.path().join("keys")).unwrap();
        for f in [
            "root.pieces",
            "root.squashfs",
            "vmlinuz",
            "initrd.img",
            "manifest.json",
        ] {
            fs::copy(ndir.join(f), d.path().join(f)).unwrap();
        }
        fs::write(d.path().join("update.txt"), &text).unwrap();
        signing::write_sums_and_sign(
            d.path(),
            &[
                "initrd.img",
                "manifest.json",
                "root.pieces",
                "root.squashfs",
                "update.txt",
                "vmlinuz",
            ],
            &key,
        );
        let mut m = files(&|_, b| b);
        for f in ["SHA256SUMS", "SHA256SUMS.sig", "update.txt"] {
            m.insert(f.into(), fs::read(d.path().join(f)).unwrap());
        }
        let r = rogue(m, target.clone());
        let n = Node::flashed(p.path(), &r.addr, "worker-1", OLD, &old);
        let (ok, out) = n.update(&["check"]);
        assert!(!ok && out.contains(want), "{want}: {out}");
    }
}

/// A power cut (the updater and its children killed) while the slot is written leaves no entry
/// for it: the node boots its running build; the next check starts the update over and
/// finishes it.
#[test]
fn updater_killed_during_the_slot_write_leaves_the_old_build_bootable_and_resumes() {
    if signing::ssh_keygen("updater_killed_during_the_slot_write").is_none() {
        return;
    }
    use std::os::unix::process::CommandExt;
    let (p, old, new) = project();
    let ndir = p.path().join("out/worker").join(NEW);
    let mut files = std::collections::BTreeMap::new();
    for n in [
        "SHA256SUMS",
        "SHA256SUMS.sig",
        "update.txt",
        "root.pieces",
        "root.squashfs",
        "vmlinuz",
        "initrd.img",
    ] {
        files.insert(n.to_string(), fs::read(ndir.join(n)).unwrap());
    }
    let target = format!("kiln-target/1\nbuild {NEW}\nrole worker\nrollback 0\nreboot 1\nseq 0\n");
    let r = rogue_slow(files, target, std::time::Duration::from_millis(1500));
    let n = Node::flashed(p.path(), &r.addr, "worker-1", OLD, &old);
    let mut child = n
        .update_cmd(&["check"])
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        seen.push_str(&l);
        seen.push('\n');
        if l.contains("kiln-update: writing: slot b") {
            break;
        }
    }
    assert!(seen.contains("writing: slot b"), "{seen}");
    // Mid-write (the first fetch waits on the server): the whole process group dies.
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: kill(2) on the child's own process group.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    child.wait().unwrap();
    assert_eq!(
        n.entries(),
        ["kiln-1.conf"],
        "no entry for the half-written slot"
    );
    assert!(!n.esp("kiln/b/build").exists());
    let b = fs::read(n.path("slot-b")).unwrap();
    assert!(
        b[..new.squashfs.len()] != new.squashfs[..],
        "the slot was not complete"
    );
    // Run again: the update is done from the start.
    let (ok, out) = n.update(&["check"]);
    assert!(ok && out.contains("rebooting: into build bbbb"), "{out}");
    assert_eq!(n.entries(), ["kiln-1.conf", "kiln-2+3.conf"]);
    let b = fs::read(n.path("slot-b")).unwrap();
    assert!(b[..new.squashfs.len()] == new.squashfs[..]);
}

/// A pod whose disruption budget allows no eviction: the drain gives up after drain_timeout,
/// the node is uncordoned, the rollout stops naming the pod, and the node writes no entry.
#[test]
fn a_drain_that_cannot_finish_stops_the_rollout() {
    if signing::ssh_keygen("a_drain_that_cannot_finish").is_none() {
        return;
    }
    let (p, old, _new) = project();
    let Some(kube) = k8s(
        p.path(),
        &["worker-1", "worker-2"],
        &["apps/db-0@worker-1:pdb"],
        "a_drain_that_cannot_finish_stops_the_rollout",
    ) else {
        return;
    };
    let s = serve_with(p.path(), &["--kube-api", kube.url.as_str()]);
    let w1 = Node::flashed(p.path(), &s.http, "worker-1", OLD, &old);
    let (code, o, e) = rollout(p.path(), &["start", "--role", "worker", "--build", NEW]);
    assert_eq!(code, 0, "{o}{e}");
    let (ok, out) = w1.update(&["check"]);
    assert!(!ok && out.contains("withdrew build bbbb"), "{out}");
    assert_eq!(
        w1.entries(),
        ["kiln-1.conf"],
        "no entry without the go-ahead"
    );
    let r = rollout_file(p.path());
    assert_eq!(r["state"], "stopped", "{r:#}");
    assert!(r["reason"].as_str().unwrap().contains("apps/db-0"), "{r:#}");
    let ev = kube.events();
    assert!(
        ev.iter()
            .filter(|e| *e == "evict-refused apps/db-0")
            .count()
            >= 2,
        "{ev:?}"
    );
    assert_eq!(
        ev.last().map(String::as_str),
        Some("uncordon worker-1"),
        "{ev:?}"
    );
}

/// A PXE-booted node (no slots) in a rollout of a role that is not drained: it asks for the
/// go-ahead like a disk node, reboots, and its next iPXE boot gets the rollout's build.
#[test]
fn pxe_node_reboots_into_the_rollouts_build() {
    let (p, old, _new) = project();
    let c = p.path().join("recipes/cluster.toml");
    let t = fs::read_to_string(&c)
        .unwrap()
        .replace("drain_timeout = 10\n", "drain_timeout = 10\ndrain = []\n");
    fs::write(&c, t).unwrap();
    let s = serve(p.path());
    let w1 = Node::flashed(p.path(), &s.http, "worker-1", OLD, &old);
    fs::write(
        w1.path("cmdline"),
        format!(
            "boot=live fetch={}/roles/worker/{OLD}/root.squashfs ip=dhcp\n",
            s.http
        ),
    )
    .unwrap();
    let (code, o, e) = rollout(p.path(), &["start", "--role", "worker", "--build", NEW]);
    assert_eq!(code, 0, "{o}{e}");
    let (ok, out) = w1.update(&["check"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("kiln-update: ready: nothing to write (PXE boot)"),
        "{out}"
    );
    assert!(
        out.contains("kiln-update: rebooting: PXE boot: the next boot loads build bbbb"),
        "{out}"
    );
    assert_eq!(
        w1.entries(),
        ["kiln-1.conf"],
        "a PXE node's ESP is not touched"
    );
    let script = reqwest::blocking::get(format!("{}/boot.ipxe?mac=52:54:00:00:00:21", s.http))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        script.contains(&format!("/roles/worker/{NEW}/")),
        "{script}"
    );
    let r = rollout_file(p.path());
    assert_eq!(node_of(&r, "worker-1")["step"], "rebooting", "{r:#}");
    assert_eq!(node_of(&r, "worker-1")["drain"], "skip", "{r:#}");
}
