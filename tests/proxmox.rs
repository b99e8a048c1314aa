//! `kiln proxmox import | list | clone` and `--emit-script`, against the fake PVE API server
//! in `tests/fakepve/` (HTTPS, API tokens, privileges, UPID tasks, failure injection). No live
//! Proxmox is involved anywhere: these tests are what the client is verified against.

mod fakepve;
mod signing;

use fakepve::{FakePve, NODE, TOKEN_ID, TOKEN_SECRET};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

/// A fixed build id and image, so the emitted script is a golden file.
const BUILD_ID: &str = "5f0c2d9e8b7a61f4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0";
const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKiln0000000000000000000000000000000000000000 ops@lab";

struct Fx {
    dir: tempfile::TempDir,
    fake: FakePve,
}

fn image() -> Vec<u8> {
    // Not a real qcow2: the fake stores bytes, it does not run qemu-img.
    let mut v = b"QFI\xfb".to_vec();
    v.extend((0..200_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8));
    v
}

fn manifest(role: &str) -> String {
    serde_json::to_string_pretty(&serde_json::json!({
        "schema": "kiln.manifest/1",
        "build_id": BUILD_ID,
        "role": role,
        "cluster": "homelab",
        "kiln_version": "0.1.0",
        "contains_secrets": false,
        "disk": { "esp_partuuid": "c12a7328-f81f-11d2-ba4b-00a0c93ec93b" },
    }))
    .unwrap()
        + "\n"
}

/// A project dir with keys, a tiny signed worker build in out/worker/<id>/ (+ latest), an
/// inventory, and proxmox.toml pointing at a fresh fake PVE (pinned by fingerprint).
fn fixture() -> Fx {
    let fake = FakePve::start();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = signing::test_key(7);
    signing::write_keys(&d.join("keys"), &key);
    fs::write(d.join("keys/authorized_keys"), format!("{SSH_KEY}\n")).unwrap();
    let build = d.join("out/worker").join(BUILD_ID);
    let m = manifest("worker");
    let img = image();
    signing::make_signed_dir(
        &build,
        &[
            ("disk.qcow2", img.as_slice()),
            ("manifest.json", m.as_bytes()),
        ],
        &key,
    );
    std::os::unix::fs::symlink(BUILD_ID, d.join("out/worker/latest")).unwrap();
    let r = d.join("recipes");
    fs::create_dir_all(&r).unwrap();
    fs::write(
        r.join("cluster.toml"),
        "[cluster]\nname = \"homelab\"\nsource_date_epoch = 1700000000\nsuite = \"bookworm\"\n\
         domain = \"lab.internal\"\n\n\
         [[nodes]]\nhostname = \"worker-1\"\nmac = \"52:54:00:00:00:21\"\nrole = \"worker\"\n\
         address = \"10.0.0.21/24\"\ngateway = \"10.0.0.1\"\ndns = [\"10.0.0.1\", \"1.1.1.1\"]\n\n\
         [[nodes]]\nhostname = \"worker-2\"\nmac = \"52-54-00-00-00-22\"\nrole = \"worker\"\n",
    )
    .unwrap();
    fs::write(r.join("base.toml"), "[debian]\npackages = [\"systemd\"]\n").unwrap();
    fs::write(r.join("worker.toml"), "inherits = \"base\"\n").unwrap();
    fs::write(d.join("pve-token"), format!("{TOKEN_SECRET}\n")).unwrap();
    write_config(
        d,
        &fake,
        &format!("fingerprint = \"{}\"\n", fake.fingerprint),
    );
    Fx { dir, fake }
}

fn write_config(d: &Path, fake: &FakePve, tls: &str) {
    fs::write(
        d.join("proxmox.toml"),
        format!(
            "url = \"{}\"\nnode = \"{NODE}\"\nstorage = \"local-lvm\"\nimport_storage = \"local\"\n\
             token_id = \"{TOKEN_ID}\"\ntoken_secret_file = \"pve-token\"\n{tls}",
            fake.url
        ),
    )
    .unwrap();
}

impl Fx {
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn kiln(&self, args: &[&str]) -> (i32, String, String) {
        let mut c = signing::kiln();
        for k in [
            "KILN_PVE_URL",
            "KILN_PVE_TOKEN_ID",
            "KILN_PVE_TOKEN_SECRET_FILE",
            "KILN_PVE_FINGERPRINT",
            "KILN_PVE_CONFIG",
        ] {
            c.env_remove(k);
        }
        c.env("KILN_PVE_POLL_MS", "5")
            .arg("--dir")
            .arg(self.path())
            .args(args);
        signing::out(c.output().unwrap())
    }
    fn import(&self, extra: &[&str]) -> (i32, String, String) {
        let mut a = vec!["proxmox", "import", "--role", "worker"];
        a.extend_from_slice(extra);
        self.kiln(&a)
    }
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

fn image_name() -> String {
    format!(
        "kiln-worker-{}-{}.qcow2",
        &BUILD_ID[..12],
        sha256_hex(&image())
    )
}

fn s(v: &[(&str, &str)]) -> BTreeMap<String, String> {
    v.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn expected_create(vmid: u32) -> BTreeMap<String, String> {
    let desc = format!(
        "kiln role template\nrole: worker\ncluster: homelab\nkiln-build-id: {BUILD_ID}\n\
         manifest-sha256: {}\nimage: {}\nimage-sha256: {}\nkiln-version: 0.1.0\n",
        sha256_hex(manifest("worker").as_bytes()),
        image_name(),
        sha256_hex(&image())
    );
    s(&[
        ("agent", "enabled=1"),
        ("bios", "ovmf"),
        ("boot", "order=scsi0"),
        ("cores", "2"),
        ("description", &desc),
        ("efidisk0", "local-lvm:1,efitype=4m,pre-enrolled-keys=0"),
        ("ide2", "local-lvm:cloudinit"),
        ("memory", "2048"),
        ("name", "kiln-worker-5f0c2d9e8b7a"),
        ("net0", "virtio,bridge=vmbr0"),
        ("ostype", "l26"),
        (
            "scsi0",
            &format!("local-lvm:0,import-from=local:import/{}", image_name()),
        ),
        ("scsihw", "virtio-scsi-pci"),
        ("serial0", "socket"),
        (
            "tags",
            "kiln;kiln-build-5f0c2d9e8b7a;kiln-role-worker;kiln-template",
        ),
        ("vga", "serial0"),
        ("vmid", &vmid.to_string()),
    ])
}

fn posts(f: &Fx) -> Vec<(String, String)> {
    f.fake
        .state()
        .calls()
        .into_iter()
        .filter(|(m, _)| m != "GET")
        .collect()
}

fn p(m: &str, path: &str) -> (String, String) {
    (m.to_string(), path.to_string())
}

#[test]
fn import_uploads_creates_and_templates_once_with_exact_params() {
    let f = fixture();
    let (code, out, err) = f.import(&[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("template kiln-worker-5f0c2d9e8b7a created: VM 100"),
        "{out}"
    );
    let st = f.fake.state();
    assert_eq!(
        st.calls(),
        vec![
            p("GET", "/version"),
            p("GET", "/cluster/resources"),
            p("GET", "/nodes/pve1/storage/local/content"),
            p("POST", "/nodes/pve1/storage/local/upload"),
            p("GET", "/cluster/nextid"),
            p("POST", "/nodes/pve1/qemu"),
            p("POST", "/nodes/pve1/qemu/100/template"),
        ]
    );
    let up = &st.find("POST", "/nodes/pve1/storage/local/upload")[0];
    let u = up.upload.as_ref().unwrap();
    assert_eq!(
        u.parts,
        ["content", "checksum-algorithm", "checksum", "filename"]
    );
    assert_eq!(u.filename, image_name());
    assert_eq!(u.sha256, sha256_hex(&image()));
    assert_eq!(u.size, image().len());
    assert_eq!(
        up.params,
        s(&[
            ("checksum", &sha256_hex(&image())),
            ("checksum-algorithm", "sha256"),
            ("content", "import"),
            ("filename", &image_name()),
        ])
    );
    let create = &st.find("POST", "/nodes/pve1/qemu")[0];
    assert_eq!(create.params, expected_create(100));
    assert!(st.find("POST", "/nodes/pve1/qemu/100/template")[0]
        .params
        .is_empty());
    // Tasks were polled until they stopped.
    assert!(
        st.requests
            .iter()
            .filter(|r| r.path.ends_with("/status"))
            .count()
            >= 9
    );
    let vm = &st.vms[&100];
    assert!(vm.template && !vm.running);
    assert_eq!(
        st.volumes.keys().collect::<Vec<_>>(),
        [&format!("local:import/{}", image_name())]
    );
}

#[test]
fn rerun_is_a_noop_and_replace_rebuilds_reusing_the_upload() {
    let f = fixture();
    assert_eq!(f.import(&[]).0, 0);
    let n = posts(&f).len();
    let (code, out, err) = f.import(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("exists") && out.contains("nothing to do"),
        "{out}"
    );
    assert_eq!(posts(&f).len(), n, "a re-run changes nothing");

    let (code, out, err) = f.import(&["--replace", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["state"], "replaced");
    assert_eq!(v["image"], "reused");
    let after: Vec<_> = posts(&f)[n..].to_vec();
    assert_eq!(
        after,
        vec![
            p("DELETE", "/nodes/pve1/qemu/100"),
            p("POST", "/nodes/pve1/qemu"),
            p("POST", "/nodes/pve1/qemu/100/template"),
        ],
        "replace destroys the template and reuses the uploaded volume"
    );
    let st = f.fake.state();
    assert_eq!(
        st.find("DELETE", "/nodes/pve1/qemu/100")[0].params,
        s(&[("destroy-unreferenced-disks", "1"), ("purge", "1")])
    );
    assert_eq!(st.vms.len(), 1);
    assert!(st.vms[&100].template);
}

#[test]
fn failed_create_task_removes_the_vm_and_the_upload() {
    let f = fixture();
    f.fake.state().fail_task = Some((
        "qmcreate".into(),
        "import failed - qemu-img: error while writing at byte 0: No space left on device".into(),
    ));
    let (code, _, err) = f.import(&[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("TASK ERROR"), "task log tail: {err}");
    assert!(err.contains("removed VM 100"), "{err}");
    assert!(err.contains("removed the uploaded local:import/"), "{err}");
    let st = f.fake.state();
    assert!(st.vms.is_empty(), "no VM left: {:?}", st.vms);
    assert!(st.volumes.is_empty(), "no volume left: {:?}", st.volumes);
}

#[test]
fn failed_template_task_and_running_vm_are_cleaned_up() {
    let f = fixture();
    f.fake.state().fail_task = Some(("qmtemplate".into(), "lvrename failed".into()));
    let (code, _, err) = f.import(&[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("lvrename failed") && err.contains("removed VM 100"),
        "{err}"
    );
    {
        let st = f.fake.state();
        assert!(st.vms.is_empty() && st.volumes.is_empty());
    }
    // A VM that is running cannot become a template: PVE's message, then stop + destroy.
    f.fake.state().start_created = true;
    let (code, _, err) = f.import(&[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("you can't convert a VM to template if VM is running"),
        "{err}"
    );
    let st = f.fake.state();
    assert!(st.vms.is_empty() && st.volumes.is_empty());
    assert_eq!(st.find("POST", "/nodes/pve1/qemu/100/status/stop").len(), 1);
}

#[test]
fn wrong_fingerprint_is_refused_before_any_request() {
    let f = fixture();
    let wrong = format!("{}:00", "AB:".repeat(31).trim_end_matches(':'));
    write_config(f.path(), &f.fake, &format!("fingerprint = \"{wrong}\"\n"));
    let (code, _, err) = f.import(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&f.fake.fingerprint),
        "names the fingerprint seen: {err}"
    );
    assert!(err.contains("no request was sent"), "{err}");
    assert!(err.contains("proxmox.toml:fingerprint"), "{err}");
    assert!(f.fake.state().requests.is_empty());

    // Malformed: refused before connecting.
    let (code, _, err) = f.import(&["--fingerprint", "AB:CD"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--fingerprint") && err.contains("not a SHA-256"),
        "{err}"
    );
    assert!(f.fake.state().requests.is_empty());
}

#[test]
fn ca_file_instead_of_a_pin() {
    let f = fixture();
    fs::write(f.path().join("pve-ca.pem"), &f.fake.ca_pem).unwrap();
    write_config(f.path(), &f.fake, "ca_file = \"pve-ca.pem\"\n");
    let (code, out, err) = f.kiln(&["proxmox", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("VMID"), "{out}");
    // Without a pin or CA, the fake's private CA is not trusted.
    write_config(f.path(), &f.fake, "");
    f.fake.state().requests.clear();
    let (code, _, err) = f.kiln(&["proxmox", "list"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("certificate was refused"), "{err}");
    assert!(
        err.contains("fingerprint") && err.contains("ca_file"),
        "{err}"
    );
    assert!(
        !err.contains("retrying"),
        "TLS errors are not retried: {err}"
    );
    assert!(f.fake.state().requests.is_empty());
}

#[test]
fn bad_token_and_missing_privilege_exit_2_with_the_proxmox_message() {
    let f = fixture();
    fs::write(
        f.path().join("pve-token"),
        "5b3c2b1e-0000-4000-8000-0000000000ff\n",
    )
    .unwrap();
    let (code, _, err) = f.import(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("HTTP 401 invalid token value!"), "{err}");
    assert!(err.contains("token_secret_file"), "{err}");

    fs::write(f.path().join("pve-token"), TOKEN_SECRET).unwrap();
    f.fake
        .state()
        .tokens
        .get_mut(TOKEN_ID)
        .unwrap()
        .1
        .remove("Datastore.AllocateTemplate");
    let (code, _, err) = f.import(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "HTTP 403 Permission check failed (/storage/local, Datastore.AllocateTemplate)"
        ),
        "{err}"
    );
    let st = f.fake.state();
    assert!(st.vms.is_empty() && st.volumes.is_empty());
}

#[test]
fn old_pve_is_refused_and_pointed_at_emit_script() {
    let f = fixture();
    f.fake.state().version = "8.3.2".into();
    let (code, _, err) = f.import(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("8.3.2") && err.contains("--emit-script"),
        "{err}"
    );
    assert_eq!(f.fake.state().calls(), vec![p("GET", "/version")]);
}

#[test]
fn download_url_instead_of_upload() {
    let f = fixture();
    let url = "http://files.lab:8080/worker/disk.qcow2";
    let (code, out, err) = f.import(&["--url", url, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["image"], "downloaded");
    let st = f.fake.state();
    assert!(st
        .find("POST", "/nodes/pve1/storage/local/upload")
        .is_empty());
    assert_eq!(
        st.find("POST", "/nodes/pve1/storage/local/download-url")[0].params,
        s(&[
            ("checksum", &sha256_hex(&image())),
            ("checksum-algorithm", "sha256"),
            ("content", "import"),
            ("filename", &image_name()),
            ("url", url),
        ])
    );
}

#[test]
fn unsigned_or_tampered_build_is_not_imported() {
    let f = fixture();
    let img = f
        .path()
        .join("out/worker")
        .join(BUILD_ID)
        .join("disk.qcow2");
    let mut b = fs::read(&img).unwrap();
    b[100] ^= 1;
    fs::write(&img, b).unwrap();
    let (code, _, err) = f.import(&[]);
    assert_eq!(code, 3, "{err}");
    assert!(f.fake.state().requests.is_empty());
}

#[test]
fn list_shows_templates_and_nodes_with_role_and_build_id() {
    let f = fixture();
    assert_eq!(f.import(&[]).0, 0);
    assert_eq!(f.kiln(&["proxmox", "clone", "worker-2"]).0, 0);
    let (code, out, err) = f.kiln(&["proxmox", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows: Vec<(u64, &str, &str, &str, &str)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["vmid"].as_u64().unwrap(),
                e["kind"].as_str().unwrap(),
                e["name"].as_str().unwrap(),
                e["role"].as_str().unwrap(),
                e["build_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (
                100,
                "template",
                "kiln-worker-5f0c2d9e8b7a",
                "worker",
                BUILD_ID
            ),
            (101, "node", "worker-2", "worker", BUILD_ID),
        ]
    );
    let (_, out, _) = f.kiln(&["proxmox", "list"]);
    assert!(
        out.contains(&format!(
            "100    pve1       template  kiln-worker-5f0c2d9e8b7a worker   {BUILD_ID}"
        )),
        "{out}"
    );
}

#[test]
fn clone_gives_the_vm_the_nodes_mac_address_and_keys() {
    let f = fixture();
    assert_eq!(f.import(&[]).0, 0);
    let (code, out, err) = f.kiln(&["proxmox", "clone", "worker-1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("VM 101 (worker-1) created"), "{out}");
    {
        let st = f.fake.state();
        assert_eq!(
            st.find("POST", "/nodes/pve1/qemu/100/clone")[0].params,
            s(&[
                ("full", "1"),
                ("name", "worker-1"),
                ("newid", "101"),
                ("storage", "local-lvm"),
            ])
        );
        let keys = "ssh-ed25519%20AAAAC3NzaC1lZDI1NTE5AAAAIKiln0000000000000000000000000000000000000000%20ops%40lab%0A";
        let desc = format!(
            "kiln node\nhostname: worker-1\nrole: worker\nmac: 52:54:00:00:00:21\nkiln-build-id: {BUILD_ID}\n"
        );
        assert_eq!(
            st.find("PUT", "/nodes/pve1/qemu/101/config")[0].params,
            s(&[
                ("ciuser", "root"),
                ("description", &desc),
                ("ipconfig0", "ip=10.0.0.21/24,gw=10.0.0.1"),
                ("nameserver", "10.0.0.1 1.1.1.1"),
                ("net0", "virtio=52:54:00:00:00:21,bridge=vmbr0"),
                ("searchdomain", "lab.internal"),
                ("sshkeys", keys),
                (
                    "tags",
                    "kiln;kiln-build-5f0c2d9e8b7a;kiln-node;kiln-role-worker"
                ),
            ])
        );
        let vm = &st.vms[&101];
        assert_eq!(vm.config["name"], "worker-1");
        assert!(!vm.template);
    }
    // Idempotent.
    let n = posts(&f).len();
    let (code, out, _) = f.kiln(&["proxmox", "clone", "worker-1"]);
    assert_eq!(code, 0);
    assert!(out.contains("exists"), "{out}");
    assert_eq!(posts(&f).len(), n);

    // DHCP node, normalised MAC, explicit vmid and cicustom.
    let (code, _, err) = f.kiln(&[
        "proxmox",
        "clone",
        "worker-2",
        "--vmid",
        "250",
        "--cicustom",
        "vendor=local:snippets/kiln.yaml",
    ]);
    assert_eq!(code, 0, "{err}");
    let st = f.fake.state();
    let put = &st.find("PUT", "/nodes/pve1/qemu/250/config")[0].params;
    assert_eq!(put["ipconfig0"], "ip=dhcp");
    assert_eq!(put["net0"], "virtio=52:54:00:00:00:22,bridge=vmbr0");
    assert_eq!(put["cicustom"], "vendor=local:snippets/kiln.yaml");
    assert!(!put.contains_key("nameserver"));
}

#[test]
fn clone_errors_name_the_fix() {
    let f = fixture();
    let (code, _, err) = f.kiln(&["proxmox", "clone", "nosuch"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("worker-1, worker-2"), "{err}");
    let (code, _, err) = f.kiln(&["proxmox", "clone", "worker-1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("kiln proxmox import --role worker"), "{err}");
}

#[test]
fn config_errors_name_the_setting() {
    let f = fixture();
    fs::write(
        f.path().join("proxmox.toml"),
        "url = \"https://x:8006\"\nnodes = \"a\"\n",
    )
    .unwrap();
    let (code, _, err) = f.kiln(&["proxmox", "list"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("proxmox.toml") && err.contains("unknown field `nodes`"),
        "{err}"
    );
    fs::write(f.path().join("proxmox.toml"), "url = \"http://x:8006\"\n").unwrap();
    let (code, _, err) = f.kiln(&["proxmox", "list"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("proxmox.toml:url") && err.contains("https://"),
        "{err}"
    );
}

#[test]
fn emit_script_matches_golden_and_parses() {
    let f = fixture();
    let out = f.path().join("import-worker.sh");
    let (code, stdout, err) = f.import(&["--emit-script", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("wrote"), "{stdout}");
    assert!(f.fake.state().requests.is_empty(), "no API access");
    let text = fs::read_to_string(&out).unwrap();
    // Same inputs, same bytes.
    let again = f.path().join("again.sh");
    assert_eq!(f.import(&["--emit-script", again.to_str().unwrap()]).0, 0);
    assert_eq!(text, fs::read_to_string(&again).unwrap());

    let golden =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/proxmox-import-worker.sh");
    if std::env::var_os("KILN_UPDATE_GOLDEN").is_some() {
        fs::write(&golden, &text).unwrap();
    }
    let want = fs::read_to_string(&golden).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (KILN_UPDATE_GOLDEN=1 creates it)",
            golden.display()
        )
    });
    assert_eq!(
        text,
        want,
        "differs from {} (KILN_UPDATE_GOLDEN=1 to accept)",
        golden.display()
    );

    let o = std::process::Command::new("bash")
        .arg("-n")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o755
    );

    // Run it against stand-in `qm` and `pvesh` that log their arguments.
    let bin = f.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    let log = f.path().join("qm.log");
    let stub = |name: &str, body: &str| {
        let p = bin.join(name);
        fs::write(
            &p,
            format!("#!/bin/sh\necho \"{name} $*\" >> \"$STUB_LOG\"\n{body}"),
        )
        .unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    };
    stub(
        "qm",
        "case \"$1\" in\n  list) echo '      VMID NAME                 STATUS'; if [ -f \"$STUB_LOG.tpl\" ]; then echo '       123 kiln-worker-5f0c2d9e8b7a stopped'; fi;;\n  config) if [ -f \"$STUB_LOG.tpl\" ]; then echo 'template: 1'; else echo \"unused0: local-lvm:vm-$2-disk-1\"; fi;;\n  template) touch \"$STUB_LOG.tpl\";;\nesac\n",
    );
    stub("pvesh", "echo 123\n");
    fs::write(f.path().join(image_name()), image()).unwrap();
    let run = || {
        std::process::Command::new("bash")
            .arg(&out)
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            )
            .env("STUB_LOG", &log)
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("template kiln-worker-5f0c2d9e8b7a is VM 123")
    );
    let calls: Vec<String> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.split(" --description").next().unwrap().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        calls[..3],
        [
            "qm list".to_string(),
            "pvesh get /cluster/nextid".to_string(),
            "qm create 123 --name kiln-worker-5f0c2d9e8b7a --memory 2048 --cores 2 --ostype l26 --bios ovmf --efidisk0 local-lvm:1,efitype=4m,pre-enrolled-keys=0 --scsihw virtio-scsi-pci --ide2 local-lvm:cloudinit --net0 virtio,bridge=vmbr0 --serial0 socket --vga serial0 --agent enabled=1 --tags kiln;kiln-build-5f0c2d9e8b7a;kiln-role-worker;kiln-template".to_string(),
        ]
    );
    let tail: Vec<&String> = calls
        .iter()
        .filter(|l| l.starts_with("qm "))
        .skip(2)
        .collect();
    assert_eq!(
        tail,
        [
            &format!(
                "qm importdisk 123 {}/{} local-lvm",
                f.path().display(),
                image_name()
            ),
            &"qm config 123".to_string(),
            &"qm set 123 --scsi0 local-lvm:vm-123-disk-1 --boot order=scsi0".to_string(),
            &"qm template 123".to_string(),
        ]
    );
    // Second run: the template exists, nothing is created.
    let o = run();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing to do"));
    assert_eq!(
        fs::read_to_string(&log)
            .unwrap()
            .matches("qm create")
            .count(),
        1
    );
    // A wrong image is refused before anything is created.
    fs::remove_file(log.with_extension("log.tpl")).unwrap();
    fs::write(f.path().join(image_name()), b"not the image").unwrap();
    let o = run();
    assert!(!o.status.success());
    assert_eq!(
        fs::read_to_string(&log)
            .unwrap()
            .matches("qm create")
            .count(),
        1
    );
}

/// A raw HTTPS client trusting the fake's CA, for requests kiln would never send.
fn raw(f: &Fx) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(f.fake.ca_pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

fn auth() -> String {
    format!("PVEAPIToken={TOKEN_ID}={TOKEN_SECRET}")
}

#[test]
fn fake_is_strict_like_pve() {
    let f = fixture();
    let c = raw(&f);
    let up = format!("{}/api2/json/nodes/pve1/storage/local/upload", f.fake.url);
    let mp = |parts: &[(&str, Option<&str>, &str)]| {
        let mut b = String::new();
        for (name, file, val) in parts {
            match file {
                Some(fname) => b += &format!("--B\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{fname}\"\r\nContent-Type: application/octet-stream\r\n\r\n{val}\r\n"),
                None => b += &format!("--B\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{val}\r\n"),
            }
        }
        b + "--B--\r\n"
    };
    let send = |body: String| {
        let r = c
            .post(&up)
            .header("Authorization", auth())
            .header("Content-Type", "multipart/form-data; boundary=B")
            .body(body)
            .send()
            .unwrap();
        let code = r.status().as_u16();
        (code, r.text().unwrap())
    };
    // File part not last.
    let (code, _) = send(mp(&[
        ("content", None, "import"),
        ("filename", Some("a.qcow2"), "xx"),
        ("checksum", None, "00"),
    ]));
    assert_eq!(code, 500);
    // Wrong extension for import.
    let (code, body) = send(mp(&[
        ("content", None, "import"),
        ("filename", Some("disk.img"), "xx"),
    ]));
    assert_eq!(code, 400);
    assert!(
        body.contains("invalid filename or wrong extension"),
        "{body}"
    );
    // A good one.
    let (code, body) = send(mp(&[
        ("content", None, "import"),
        ("filename", Some("a.qcow2"), "xx"),
    ]));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("UPID:pve1:"), "{body}");
    // Chunked bodies are not supported by pve-http-server.
    let r = c
        .post(&up)
        .header("Authorization", auth())
        .header("Content-Type", "multipart/form-data; boundary=B")
        .body(reqwest::blocking::Body::new(std::io::Cursor::new(
            mp(&[("content", None, "import")]).into_bytes(),
        )))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 501);
    // import-from needs <storage>:0.
    let r = c
        .post(format!("{}/api2/json/nodes/pve1/qemu", f.fake.url))
        .header("Authorization", auth())
        .form(&[
            ("vmid", "300"),
            ("scsi0", "local-lvm:32,import-from=local:import/a.qcow2"),
        ])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r
        .text()
        .unwrap()
        .contains("'import-from' requires special syntax"));
    // Bad tags.
    let r = c
        .post(format!("{}/api2/json/nodes/pve1/qemu", f.fake.url))
        .header("Authorization", auth())
        .form(&[("vmid", "300"), ("tags", "kiln;-bad")])
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

#[test]
fn gets_are_retried_but_a_failed_post_is_not_repeated() {
    let f = fixture();
    {
        let mut st = f.fake.state();
        for _ in 0..2 {
            st.http_failures.push((
                "GET".into(),
                "/cluster/resources".into(),
                503,
                "Service Unavailable".into(),
            ));
        }
        st.http_failures.push((
            "POST".into(),
            "/nodes/pve1/qemu".into(),
            500,
            "got timeout".into(),
        ));
    }
    let (code, _, err) = f.import(&[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("HTTP 500 got timeout"), "{err}");
    let st = f.fake.state();
    assert_eq!(
        st.find("GET", "/cluster/resources").len(),
        2 + 1 + 1,
        "retried, then the clean-up check"
    );
    assert_eq!(
        st.find("POST", "/nodes/pve1/qemu").len(),
        1,
        "a POST is never repeated"
    );
    assert!(st.volumes.is_empty(), "the upload is removed again");
    drop(st);
    // The next run succeeds from scratch.
    assert_eq!(f.import(&[]).0, 0);
}

#[test]
fn clone_that_cannot_be_configured_is_removed() {
    let f = fixture();
    assert_eq!(f.import(&[]).0, 0);
    f.fake
        .state()
        .tokens
        .get_mut(TOKEN_ID)
        .unwrap()
        .1
        .remove("VM.Config.Network");
    let (code, _, err) = f.kiln(&["proxmox", "clone", "worker-1"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("Permission check failed (/vms/101, VM.Config.Network)"),
        "{err}"
    );
    assert!(err.contains("removed VM 101"), "{err}");
    let st = f.fake.state();
    assert_eq!(
        st.vms.keys().collect::<Vec<_>>(),
        [&100],
        "only the template is left"
    );
}

#[test]
fn templates_are_per_node_and_clones_use_the_local_one() {
    let f = fixture();
    assert_eq!(f.import(&[]).0, 0);
    let (code, out, err) = f.import(&["--node", "pve2", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["state"].as_str(), v["node"].as_str(), v["vmid"].as_u64()),
        (Some("created"), Some("pve2"), Some(101))
    );
    // The fake's `local` is cluster-wide (shared), so the image is there already.
    assert_eq!(v["image"], "reused");
    let (code, out, _) = f.import(&["--node", "pve2"]);
    assert_eq!(code, 0);
    assert!(out.contains("(VM 101 on pve2) exists"), "{out}");

    let (code, _, err) = f.kiln(&["proxmox", "clone", "worker-2", "--node", "pve2"]);
    assert_eq!(code, 0, "{err}");
    let st = f.fake.state();
    let clone = &st.find("POST", "/nodes/pve2/qemu/101/clone")[0].params;
    assert!(!clone.contains_key("target"), "{clone:?}");
    assert_eq!(st.vms[&102].node, "pve2");
    assert_eq!(st.find("PUT", "/nodes/pve2/qemu/102/config").len(), 1);
    drop(st);
    // Another node with its own template: that one, never pve1's.
    let (code, _, err) = f.kiln(&[
        "proxmox",
        "clone",
        "worker-1",
        "--node",
        "pve2",
        "--build-id",
        BUILD_ID,
    ]);
    assert_eq!(code, 0, "{err}");
    let st = f.fake.state();
    assert_eq!(
        st.find("POST", "/nodes/pve2/qemu/101/clone").len(),
        2,
        "still the pve2 template"
    );
}

#[test]
fn clone_to_a_node_without_a_template_uses_target() {
    let f = fixture();
    assert_eq!(f.import(&[]).0, 0);
    let (code, _, err) = f.kiln(&["proxmox", "clone", "worker-1", "--node", "pve2"]);
    assert_eq!(code, 0, "{err}");
    let st = f.fake.state();
    assert_eq!(
        st.find("POST", "/nodes/pve1/qemu/100/clone")[0].params["target"],
        "pve2"
    );
    assert_eq!(st.vms[&101].node, "pve2");
    assert_eq!(st.find("PUT", "/nodes/pve2/qemu/101/config").len(), 1);
}

#[test]
fn task_warnings_are_not_failures() {
    let f = fixture();
    f.fake.state().warn_task = Some("qmcreate".into());
    let (code, out, err) = f.import(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("created"), "{out}");
    assert!(err.contains("WARNINGS: 1"), "logged: {err}");
    assert!(f.fake.state().vms[&100].template);
}
