//! k3s inputs: per-node configs, fetch errors, secret inputs, manifest checks (fast; no root).

mod common;
use common::*;
use std::fs;

fn add_master2(dir: &std::path::Path) {
    let p = dir.join("recipes/cluster.toml");
    let mut s = fs::read_to_string(&p).unwrap();
    s.push_str("\n[[nodes]]\nhostname = \"master-2\"\nmac = \"52:54:00:00:00:12\"\nrole = \"master\"\naddress = \"10.0.0.12/24\"\n");
    fs::write(&p, s).unwrap();
}

#[test]
fn two_masters_one_worker_get_distinct_configs() {
    let d = project_copy();
    add_master2(d.path());
    let project = kiln::project::recipe::load_project(d.path()).unwrap();
    let k = project.cluster.k3s.clone().unwrap();
    let master = kiln::project::recipe::load_role(&project, "master").unwrap();
    let worker = kiln::project::recipe::load_role(&project, "worker").unwrap();
    let m = kiln::pipeline::k3s::node_configs(&project.cluster, &master);
    assert_eq!(m.keys().collect::<Vec<_>>(), ["master-1", "master-2"]);
    // Founding or joining is decided at boot by kiln-k3s-bootstrap, not baked per node.
    for (host, c) in &m {
        assert!(
            !c.contains("cluster-init") && !c.contains("server:"),
            "{host}: {c}"
        );
    }
    assert!(m["master-2"].contains("node-ip: \"10.0.0.12\"\n"));
    let rc = kiln::pipeline::k3s::role_config(&project.cluster, &k, &master);
    for want in [
        "token-file: \"/etc/rancher/k3s/token\"",
        "tls-san:\n  - \"10.0.0.10\"\n  - \"k3s.lab.internal\"",
        "disable:\n  - \"traefik\"",
        "write-kubeconfig-mode: \"0600\"",
        "node-label:\n  - \"kiln.dev/role=master\"",
    ] {
        assert!(rc.contains(want), "master config lacks {want:?}:\n{rc}");
    }
    assert!(
        !rc.contains("server:"),
        "server roles join per node, not in the role config"
    );
    let wc = kiln::pipeline::k3s::role_config(&project.cluster, &k, &worker);
    assert!(wc.contains("server: \"https://10.0.0.10:6443\"\n"), "{wc}");
    assert!(
        !wc.contains("tls-san") && !wc.contains("disable"),
        "server-only keys on an agent:\n{wc}"
    );
    let w = kiln::pipeline::k3s::node_configs(&project.cluster, &worker);
    assert_eq!(w.keys().collect::<Vec<_>>(), ["worker-1", "worker-2"]);
    assert!(
        w["worker-1"].contains("node-name: \"worker-1\"") && !w["worker-1"].contains("node-ip")
    );
    // Every generated file is YAML with the expected keys.
    for text in m.values().chain(w.values()).chain([&rc, &wc]) {
        let v: serde_yaml::Value = serde_yaml::from_str(text).unwrap();
        assert!(v.as_mapping().is_some());
    }

    // What the masters' bootstrap decides from: founder, probed hosts, join URL, wait.
    let b = kiln::pipeline::k3s::bootstrap_script(&project.cluster, &k);
    for want in [
        "founder=\"master-1\"\n",
        "probe=\"10.0.0.10 10.0.0.11 10.0.0.12\"\n",
        "endpoint=\"https://10.0.0.10:6443\"\n",
        "founding_wait=120\n",
        "restore=\"\"\n",
    ] {
        assert!(b.contains(want), "bootstrap lacks {want:?}");
    }
    for p in ["@FOUNDER@", "@PROBE@", "@ENDPOINT@", "@WAIT@", "@RESTORE@"] {
        assert!(!b.contains(p), "{p} not filled in");
    }
    // bootstrapped = true: an explicit override, no master founds.
    let mut k2 = k.clone();
    k2.bootstrapped = true;
    k2.founding_wait = Some(30);
    let b2 = kiln::pipeline::k3s::bootstrap_script(&project.cluster, &k2);
    assert!(b2.contains("founder=\"\"\n") && b2.contains("founding_wait=30\n"));
    let u = kiln::pipeline::k3s::unit_dropin(kiln::project::recipe::K3sMode::Server);
    assert!(
        u.contains("ExecStartPre=/usr/lib/kiln/kiln-k3s-ca\nExecStartPre=/usr/lib/kiln/kiln-k3s-bootstrap\n"),
        "{u}"
    );
}

#[test]
fn gpu_and_storage_roles_carry_labels_and_taints() {
    let d = project_copy();
    let project = kiln::project::recipe::load_project(d.path()).unwrap();
    let k = project.cluster.k3s.clone().unwrap();
    let gpu = kiln::project::recipe::load_role(&project, "gpu").unwrap();
    let c = kiln::pipeline::k3s::role_config(&project.cluster, &k, &gpu);
    assert!(
        c.contains("  - \"nvidia.com/gpu.present=true\"")
            && c.contains("node-taint:\n  - \"nvidia.com/gpu=present:NoSchedule\""),
        "{c}"
    );
    assert!(gpu.debian.packages.contains(&"nvidia-driver".to_string()));
    assert!(gpu.debian.components.contains(&"non-free".to_string()));
    let st = kiln::project::recipe::load_role(&project, "storage").unwrap();
    let c = kiln::pipeline::k3s::role_config(&project.cluster, &k, &st);
    assert!(c.contains("node.longhorn.io/create-default-disk=true"));
    for p in ["open-iscsi", "nfs-common", "cryptsetup", "dmsetup"] {
        assert!(st.debian.packages.contains(&p.to_string()), "{p}");
    }
    assert!(st.systemd.enable.contains(&"iscsid.service".to_string()));
    use kiln::project::recipe::K3sMode;
    assert_eq!(
        kiln::pipeline::k3s::unit_name(K3sMode::Server),
        "k3s.service"
    );
    assert_eq!(
        kiln::pipeline::k3s::unit_name(K3sMode::Agent),
        "k3s-agent.service"
    );
    let u = kiln::pipeline::k3s::unit(K3sMode::Agent);
    for l in [
        "Type=notify",
        "Delegate=yes",
        "KillMode=process",
        "Restart=always",
        "RestartSec=5s",
        "ExecStartPre=-/sbin/modprobe br_netfilter",
        "ExecStartPre=-/sbin/modprobe overlay",
        "LimitNOFILE=1048576",
        "TasksMax=infinity",
        "After=network-online.target",
        "Wants=network-online.target",
        "WantedBy=multi-user.target",
        "ExecStart=/usr/local/bin/k3s agent",
    ] {
        assert!(u.lines().any(|x| x == l), "unit lacks {l}");
    }
}

#[test]
fn digest_mismatch_is_rejected_and_not_kept() {
    let d = project_copy();
    let mut files = standin_files();
    files[0].1.extend_from_slice(b"# tampered\n");
    let (url, _) = serve(files);
    pin_standin(d.path(), &url); // pins the genuine digest, serves different bytes
    let cache = d.path().join("cache");
    let o = kiln(
        d.path(),
        &[
            "build",
            "--role",
            "worker",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("sha256 mismatch") && e.contains("/k3s"), "{e}");
    let kept: Vec<_> = walkdir::WalkDir::new(cache.join("sha256"))
        .min_depth(1)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .collect();
    assert!(kept.is_empty(), "the bad download was kept: {kept:?}");
    let builds: Vec<_> = fs::read_dir(d.path().join("out/worker"))
        .map(|r| r.count())
        .into_iter()
        .collect();
    assert!(
        builds.iter().all(|n| *n == 0),
        "something was published in out/worker"
    );
}

#[test]
fn offline_cache_miss_is_a_clear_error() {
    let d = project_copy();
    let cache = d.path().join("cache");
    let o = kiln(
        d.path(),
        &[
            "build",
            "--role",
            "worker",
            "--offline",
            "--cache-dir",
            cache.to_str().unwrap(),
        ],
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("offline") && e.contains("k3s") && e.contains("15811d34187e03fe"),
        "{e}"
    );
}

#[test]
fn standin_download_is_cached_and_served_once() {
    let d = project_copy();
    let (url, hits) = serve(standin_files());
    pin_standin(d.path(), &url);
    let cache = d.path().join("cache");
    let p = kiln::project::recipe::load_project(d.path()).unwrap();
    let k = p.cluster.k3s.unwrap();
    let f = kiln::pipeline::fetch::Fetcher::new(&cache).quiet(true);
    let a = kiln::pipeline::fetch::Artifact {
        name: "k3s".into(),
        url: k.binary.url.clone(),
        sha256: k.binary.sha256.clone(),
        size: None,
    };
    let path = f.fetch(&a).unwrap();
    assert_eq!(path, cache.join("sha256").join(&k.binary.sha256));
    assert_eq!(fs::read(&path).unwrap(), standin_files()[0].1);
    let n = hits.load(std::sync::atomic::Ordering::SeqCst);
    f.fetch(&a).unwrap();
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        n,
        "a cache hit must not touch the network"
    );
}

#[test]
fn missing_token_is_a_user_error() {
    let d = project_copy();
    fs::remove_file(d.path().join("keys/k3s-token")).unwrap();
    let o = kiln(d.path(), &["build", "--role", "master"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("keys/k3s-token") && e.contains("kiln keys init"),
        "{e}"
    );
    assert!(!d.path().join("out").exists());
}

#[test]
fn token_changes_build_id_but_is_not_in_inputs() {
    let d = project_copy();
    let id = |d: &std::path::Path| -> (String, String) {
        let o = kiln(d, &["inspect", "--role", "worker", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        (
            serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["build_id"]
                .as_str()
                .unwrap()
                .to_string(),
            stdout(&o),
        )
    };
    let (a, json) = id(d.path());
    assert!(
        !json.contains(TEST_TOKEN),
        "the token leaked into the inputs"
    );
    fs::write(
        d.path().join("keys/k3s-token"),
        "ffffffffffffffffffffffffffffffff\n",
    )
    .unwrap();
    let (b, _) = id(d.path());
    assert_ne!(a, b);
}

#[test]
fn manifests_only_on_servers_and_validated() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/worker.toml",
        "mode = \"agent\"",
        "mode = \"agent\"\nmanifests = [\"manifests/nvidia-runtimeclass.yaml\"]",
    );
    let o = kiln(d.path(), &["build", "--role", "worker"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("recipes/worker.toml")
            && e.contains("k3s.manifests")
            && e.contains("master.toml"),
        "{e}"
    );

    let d = project_copy();
    fs::write(
        d.path().join("recipes/manifests/nvidia-runtimeclass.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  labels: {}\n",
    )
    .unwrap();
    let o = kiln(d.path(), &["build", "--role", "master"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("nvidia-runtimeclass.yaml") && e.contains("metadata.name"),
        "{e}"
    );
    assert!(!d.path().join("out").exists());

    let d = project_copy();
    edit(
        d.path(),
        "recipes/cluster.toml",
        "sha256 = \"15811d34",
        "sha256 = \"XX811d34",
    );
    let o = kiln(d.path(), &["inspect", "--role", "worker"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(e.contains("k3s.binary.sha256"), "{e}");
}

#[test]
fn helm_chart_embeds_archive() {
    let y = kiln::pipeline::k3s::helm_chart(
        "metallb",
        "metallb-system",
        b"\x1f\x8bfake-tgz",
        Some("speaker:\n  enabled: true"),
    );
    let v: serde_yaml::Value = serde_yaml::from_str(&y).unwrap();
    assert_eq!(v["apiVersion"], "helm.cattle.io/v1");
    assert_eq!(v["kind"], "HelmChart");
    assert_eq!(v["spec"]["targetNamespace"], "metallb-system");
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v["spec"]["chartContent"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, b"\x1f\x8bfake-tgz");
    assert_eq!(v["spec"]["valuesContent"], "speaker:\n  enabled: true");
}

/// The `node-label` list of a k3s config file (the key without `+` replaces earlier files').
fn node_labels(yaml: &str) -> Option<Vec<String>> {
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    let l = v.get("node-label")?;
    Some(
        l.as_sequence()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect(),
    )
}

#[test]
fn a_node_with_longhorn_disks_asks_longhorn_for_its_config_once() {
    let d = project_copy();
    let p = d.path().join("recipes/cluster.toml");
    let mut s = fs::read_to_string(&p).unwrap();
    s.push_str(concat!(
        "\n[[nodes]]\nhostname = \"storage-1\"\nmac = \"52:54:00:00:00:31\"\nrole = \"storage\"\n",
        "[[nodes.disks]]\ndevice = \"/dev/disk/by-id/nvme-a\"\nuse = \"longhorn\"\ntags = [\"nvme\"]\n",
        "\n[[nodes]]\nhostname = \"storage-2\"\nmac = \"52:54:00:00:00:32\"\nrole = \"storage\"\n",
        "[[nodes.disks]]\ndevice = \"/dev/disk/by-id/ata-b\"\nuse = \"data\"\n",
        "\n[[nodes]]\nhostname = \"worker-3\"\nmac = \"52:54:00:00:00:23\"\nrole = \"worker\"\n",
        "[[nodes.disks]]\ndevice = \"/dev/disk/by-id/ata-c\"\nuse = \"longhorn\"\n",
    ));
    fs::write(&p, s).unwrap();
    let project = kiln::project::recipe::load_project(d.path()).unwrap();
    let k = project.cluster.k3s.clone().unwrap();
    let st = kiln::project::recipe::load_role(&project, "storage").unwrap();
    let role = kiln::pipeline::k3s::role_config(&project.cluster, &k, &st);
    assert_eq!(
        node_labels(&role).unwrap(),
        [
            "kiln.dev/role=storage",
            "node.longhorn.io/create-default-disk=true"
        ],
        "the role's nodes without Longhorn disks get Longhorn's default disk"
    );
    let nodes = kiln::pipeline::k3s::node_configs(&project.cluster, &st);
    // storage-1 names a Longhorn disk: its drop-in replaces the list, with one value of the key.
    assert_eq!(
        node_labels(&nodes["storage-1"]).unwrap(),
        [
            "kiln.dev/role=storage",
            "node.longhorn.io/create-default-disk=config"
        ],
        "{}",
        nodes["storage-1"]
    );
    assert!(!nodes["storage-1"].contains("node-label+"), "no append");
    // storage-2's only extra disk is its data disk: the role's labels stand.
    assert_eq!(node_labels(&nodes["storage-2"]), None);
    // Any k3s role's node with Longhorn disks gets the label; the role's own labels stay.
    let w = kiln::project::recipe::load_role(&project, "worker").unwrap();
    let wn = kiln::pipeline::k3s::node_configs(&project.cluster, &w);
    assert_eq!(
        node_labels(&wn["worker-3"]).unwrap(),
        [
            "kiln.dev/role=worker",
            "node.longhorn.io/create-default-disk=config"
        ]
    );
    assert_eq!(node_labels(&wn["worker-1"]), None);
}

// --- the API VIP (issue 19) ---------------------------------------------------------------------

fn master_layer(d: &std::path::Path) -> kiln::pipeline::k3s::Layer {
    let p = kiln::project::recipe::load_project(d).unwrap();
    let master = kiln::project::recipe::load_role(&p, "master").unwrap();
    let fetched = kiln::pipeline::k3s::Fetched {
        binary: repo_root().join("tests/standin/k3s"),
        ..Default::default()
    };
    let token = kiln::pipeline::resolve::read_token(&p).unwrap();
    kiln::pipeline::k3s::layer(&p, &master, &fetched, &token).unwrap()
}

fn file_text(l: &kiln::pipeline::k3s::Layer, path: &str) -> String {
    match l.entries.get(path) {
        Some(kiln::pipeline::compose::Upper::File { data, .. }) => {
            String::from_utf8_lossy(data).into_owned()
        }
        other => panic!("{path}: {other:?}"),
    }
}

/// The default inventory's api_endpoint (10.0.0.10) is no node's address: a VIP. Masters carry
/// keepalived's configuration for each master (unicast to the others, the VIP in the masters'
/// subnet, the track script), the renderer, and a drop-in; every master of the inventory has
/// the same VRRP router id and password.
#[test]
fn a_vip_endpoint_gives_masters_keepalived_configs() {
    let d = project_copy();
    add_master2(d.path());
    let l = master_layer(d.path());
    let c1 = file_text(&l, "etc/kiln/keepalived/master-1.conf");
    let c2 = file_text(&l, "etc/kiln/keepalived/master-2.conf");
    for (c, own, peer, prio) in [
        (&c1, "10.0.0.11", "10.0.0.12", "priority 200"),
        (&c2, "10.0.0.12", "10.0.0.11", "priority 190"),
    ] {
        assert!(c.contains(&format!("unicast_src_ip {own}\n")), "{c}");
        assert!(
            c.contains(&format!("unicast_peer {{\n    {peer}\n  }}")),
            "{c}"
        );
        assert!(c.contains(prio), "{c}");
        assert!(c.contains("10.0.0.10/24 dev @INTERFACE@"), "{c}");
        assert!(c.contains("nopreempt") && c.contains("state BACKUP"), "{c}");
        assert!(
            c.contains("script \"/usr/lib/kiln/kiln-apiserver-check\""),
            "{c}"
        );
    }
    let line = |c: &str, k: &str| {
        c.lines()
            .find(|l| l.trim_start().starts_with(k))
            .unwrap()
            .to_string()
    };
    assert_eq!(
        line(&c1, "virtual_router_id"),
        line(&c2, "virtual_router_id")
    );
    assert_eq!(line(&c1, "auth_pass"), line(&c2, "auth_pass"));
    assert_eq!(
        line(&c1, "auth_pass")
            .split_whitespace()
            .nth(1)
            .unwrap()
            .len(),
        8
    );
    let dropin = file_text(&l, kiln::pipeline::vip::DROPIN);
    assert!(
        dropin.contains("ExecStartPre=/usr/lib/kiln/kiln-keepalived\n"),
        "{dropin}"
    );
    assert!(
        dropin.contains("--use-file=/run/kiln/keepalived.conf"),
        "{dropin}"
    );
    // Debian's unit runs only with /etc/keepalived/keepalived.conf: that condition is reset.
    assert!(
        dropin.contains("[Unit]\nConditionFileNotEmpty=\n"),
        "{dropin}"
    );
    assert!(l.enable.iter().any(|u| u == "keepalived.service"));
}

#[test]
fn an_endpoint_that_is_a_node_or_a_name_is_not_a_vip() {
    for ep in ["10.0.0.11", "k3s.lab.internal"] {
        let d = project_copy();
        edit(
            d.path(),
            "recipes/cluster.toml",
            "api_endpoint = \"10.0.0.10\"",
            &format!("api_endpoint = \"{ep}\""),
        );
        let l = master_layer(d.path());
        assert!(
            !l.entries.keys().any(|k| k.contains("keepalived")),
            "{ep}: keepalived files"
        );
    }
}

/// A VIP needs keepalived in the master role and a static address on every master.
#[test]
fn a_vip_without_keepalived_or_static_masters_is_refused() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/master.toml",
        "packages = [\"keepalived\", \"openssl\"]",
        "packages = []",
    );
    let o = kiln(d.path(), &["build", "--role", "master"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("master.toml") && e.contains("debian.packages") && e.contains("keepalived"),
        "{e}"
    );

    let d = project_copy();
    let p = d.path().join("recipes/cluster.toml");
    let mut s = fs::read_to_string(&p).unwrap();
    s.push_str(
        "\n[[nodes]]\nhostname = \"master-2\"\nmac = \"52:54:00:00:00:12\"\nrole = \"master\"\n",
    );
    fs::write(&p, s).unwrap();
    let o = kiln(d.path(), &["build", "--role", "master"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("nodes[3].address") && e.contains("master-2") && e.contains("static"),
        "{e}"
    );

    let d = project_copy();
    edit(
        d.path(),
        "recipes/cluster.toml",
        "api_endpoint = \"10.0.0.10\"",
        "api_endpoint = \"10.9.0.10\"",
    );
    let o = kiln(d.path(), &["build", "--role", "master"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("cluster.api_endpoint") && e.contains("not in the subnet"),
        "{e}"
    );
}

// --- etcd snapshots (issue 19) ----------------------------------------------------------------

const SNAPSHOTS: &str = "\n[k3s.etcd_snapshots]\nschedule = \"0 */6 * * *\"\nretention = 12\ncompress = true\n\n[k3s.etcd_snapshots.s3]\nendpoint = \"minio.lab.internal:9000\"\nbucket = \"k3s-etcd\"\nfolder = \"homelab\"\nregion = \"eu-west-1\"\ninsecure = true\ncredentials = \"etcd-s3.credentials\"\n";

/// cluster.toml with `[k3s.etcd_snapshots]` (`extra` replacing the S3 table's lines when given)
/// and the credentials file.
fn with_snapshots(d: &std::path::Path, snapshots: &str) {
    use std::os::unix::fs::PermissionsExt;
    // The [k3s] table ends where [sealed_secrets] begins.
    edit(
        d,
        "recipes/cluster.toml",
        "\n[sealed_secrets]",
        &format!("{snapshots}\n[sealed_secrets]"),
    );
    let c = d.join("keys/etcd-s3.credentials");
    fs::write(
        &c,
        "# minio\naccess_key = AKIAKILNTEST\nsecret_key = s3cr3t-kiln-test\n",
    )
    .unwrap();
    fs::set_permissions(&c, fs::Permissions::from_mode(0o600)).unwrap();
}

/// Every key kiln writes is one of k3s's server flags (`pkg/cli/cmds/server.go`), with the
/// values the recipe gave; the credentials are in their own 0600 file, only on servers.
#[test]
fn etcd_snapshot_settings_use_k3s_flag_names() {
    let d = project_copy();
    assert!(fs::read_to_string(d.path().join("recipes/cluster.toml"))
        .unwrap()
        .contains("\n[sealed_secrets]"));
    with_snapshots(d.path(), SNAPSHOTS);
    let p = kiln::project::recipe::load_project(d.path()).unwrap();
    let master = kiln::project::recipe::load_role(&p, "master").unwrap();
    let k = p.cluster.k3s.clone().unwrap();
    let cfg = kiln::pipeline::k3s::role_config(&p.cluster, &k, &master);
    let want = "etcd-snapshot-schedule-cron: \"0 */6 * * *\"\n\
                etcd-snapshot-retention: 12\n\
                etcd-snapshot-compress: true\n\
                etcd-s3: true\n\
                etcd-s3-endpoint: \"minio.lab.internal:9000\"\n\
                etcd-s3-bucket: \"k3s-etcd\"\n\
                etcd-s3-folder: \"homelab\"\n\
                etcd-s3-region: \"eu-west-1\"\n\
                etcd-s3-insecure: true\n";
    assert!(cfg.contains(want), "{cfg}");
    // k3s v1.34's server flags for snapshots (golden: the names as k3s spells them).
    const K3S_FLAGS: &[&str] = &[
        "etcd-snapshot-schedule-cron",
        "etcd-snapshot-retention",
        "etcd-snapshot-dir",
        "etcd-snapshot-compress",
        "etcd-s3",
        "etcd-s3-endpoint",
        "etcd-s3-endpoint-ca",
        "etcd-s3-skip-ssl-verify",
        "etcd-s3-access-key",
        "etcd-s3-secret-key",
        "etcd-s3-bucket",
        "etcd-s3-region",
        "etcd-s3-folder",
        "etcd-s3-insecure",
        "etcd-s3-timeout",
    ];
    let l = master_layer(d.path());
    let creds = file_text(&l, kiln::pipeline::k3s::ETCD_S3_CREDENTIALS);
    assert_eq!(
        creds
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>(),
        [
            "etcd-s3-access-key: \"AKIAKILNTEST\"",
            "etcd-s3-secret-key: \"s3cr3t-kiln-test\""
        ]
    );
    for line in want
        .lines()
        .chain(creds.lines().filter(|l| !l.starts_with('#')))
    {
        let key = line.split(':').next().unwrap();
        assert!(K3S_FLAGS.contains(&key), "{key} is not a k3s server flag");
    }
    match l.entries.get(kiln::pipeline::k3s::ETCD_S3_CREDENTIALS) {
        Some(kiln::pipeline::compose::Upper::File { mode, .. }) => assert_eq!(*mode, 0o600),
        other => panic!("{other:?}"),
    }
    assert!(!cfg.contains("AKIAKILNTEST"), "credentials in config.yaml");
    // Agents get none of it.
    let worker = kiln::project::recipe::load_role(&p, "worker").unwrap();
    assert!(!kiln::pipeline::k3s::role_config(&p.cluster, &k, &worker).contains("etcd-"));
    // The credentials are a secret input: another key, another master build.
    let id = |d: &std::path::Path| {
        let p = kiln::project::recipe::load_project(d).unwrap();
        kiln::pipeline::resolve::resolve(&p, "master")
            .unwrap()
            .build_id
    };
    let before = id(d.path());
    fs::write(
        d.path().join("keys/etcd-s3.credentials"),
        "access_key = AKIAOTHER\nsecret_key = x\n",
    )
    .unwrap();
    assert_ne!(before, id(d.path()));
}

#[test]
fn bad_etcd_snapshot_settings_are_refused() {
    for (from, to, key, needle) in [
        (
            "schedule = \"0 */6 * * *\"",
            "schedule = \"every day\"",
            "k3s.etcd_snapshots.schedule",
            "cron",
        ),
        (
            "retention = 12",
            "retention = 0",
            "k3s.etcd_snapshots.retention",
            "between 1 and 1000",
        ),
        (
            "endpoint = \"minio.lab.internal:9000\"",
            "endpoint = \"https://minio:9000\"",
            "k3s.etcd_snapshots.s3.endpoint",
            "host[:port]",
        ),
        (
            "bucket = \"k3s-etcd\"",
            "bucket = \"Bad_Bucket\"",
            "k3s.etcd_snapshots.s3.bucket",
            "bucket name",
        ),
        (
            "credentials = \"etcd-s3.credentials\"",
            "credentials = \"../etc/shadow\"",
            "k3s.etcd_snapshots.s3.credentials",
            "keys/",
        ),
        (
            "compress = true",
            "compress = true\nlocation = \"x\"",
            "",
            "unknown field",
        ),
    ] {
        let d = project_copy();
        with_snapshots(d.path(), &SNAPSHOTS.replace(from, to));
        let o = kiln(d.path(), &["build", "--role", "master"]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{to}: {e}");
        assert!(e.contains(key) && e.contains(needle), "{to}: {e}");
    }
    // The credentials file: missing, loose, or malformed.
    use std::os::unix::fs::PermissionsExt;
    let d = project_copy();
    with_snapshots(d.path(), SNAPSHOTS);
    let c = d.path().join("keys/etcd-s3.credentials");
    fs::set_permissions(&c, fs::Permissions::from_mode(0o644)).unwrap();
    let o = kiln(d.path(), &["build", "--role", "master"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    fs::set_permissions(&c, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&c, "user = x\n").unwrap();
    let o = kiln(d.path(), &["build", "--role", "master"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    fs::remove_file(&c).unwrap();
    let o = kiln(d.path(), &["build", "--role", "master"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("etcd-s3.credentials"), "{}", stderr(&o));
    // S3 credentials with token_delivery = "seed": refused (images stay secret-free).
    let d = project_copy();
    with_snapshots(d.path(), SNAPSHOTS);
    edit(
        d.path(),
        "recipes/cluster.toml",
        "bootstrapped = false",
        "bootstrapped = false\ntoken_delivery = \"seed\"",
    );
    let o = kiln(d.path(), &["build", "--role", "master"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("token_delivery"), "{}", stderr(&o));
}

#[test]
fn masters_need_the_bootstrap_tools_and_sane_founding_settings() {
    // Several masters: kiln-k3s-bootstrap needs curl in the master role (base.toml has it).
    let d = project_copy();
    add_master2(d.path());
    edit(
        d.path(),
        "recipes/base.toml",
        "  \"curl\",               # kiln-update fetches a new build's pieces from kiln serve\n",
        "",
    );
    let o = kiln(d.path(), &["build", "--role", "master"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("master.toml") && e.contains("debian.packages") && e.contains("add \"curl\""),
        "{e}"
    );
    for (from, to, key, fix) in [
        (
            "founding_wait = 120",
            "founding_wait = 7200",
            "k3s.founding_wait",
            "at most 3600",
        ),
        (
            "bootstrapped = false",
            "bootstrapped = false\n[k3s.restore]\nsnapshot = \"../../etc/shadow\"",
            "k3s.restore.snapshot",
            "absolute path",
        ),
        (
            "bootstrapped = false",
            "bootstrapped = false\n[k3s.restore]\nsnapshot = \"etcd-snapshot-master-1-1733000000\"",
            "k3s.restore.snapshot",
            "[k3s.etcd_snapshots.s3]",
        ),
        (
            "bootstrapped = false",
            "bootstrapped = true\n[k3s.restore]\nsnapshot = \"/var/lib/rancher/k3s/server/db/snapshots/x\"",
            "k3s.restore",
            "remove bootstrapped = true",
        ),
    ] {
        let d = project_copy();
        edit(d.path(), "recipes/cluster.toml", from, to);
        let o = kiln(d.path(), &["build", "--role", "master"]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{to}: {e}");
        assert!(e.contains("cluster.toml") && e.contains(key) && e.contains(fix), "{to}: {e}");
    }
}
