//! cloud-init seeds per inventory node: golden files, template overrides, validation errors,
//! and the CIDATA volume read back with mtools and blkid (fast; no root).

mod common;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

/// A fixed public key, so golden files do not depend on the per-process test keys.
const AUTHORIZED_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBXpi0b6mvdLu1NnmiM7/kWDuL3K4qQo8nJ7AGl8Y6hN admin@homelab";

fn project() -> tempfile::TempDir {
    let d = project_copy();
    fs::write(
        d.path().join("keys/authorized_keys"),
        format!("# cluster admins\n{AUTHORIZED_KEY}\n"),
    )
    .unwrap();
    d
}

/// Renders every node's seed with `kiln seed -o` and reads the files back:
/// hostname → file → text.
fn render(dir: &Path) -> BTreeMap<String, BTreeMap<String, String>> {
    let out = dir.join("seeds-out");
    let o = kiln(dir, &["seed", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "kiln seed failed: {}", stderr(&o));
    let mut m = BTreeMap::new();
    for host in fs::read_dir(&out).unwrap() {
        let host = host.unwrap();
        let mut files = BTreeMap::new();
        for f in fs::read_dir(host.path()).unwrap() {
            let f = f.unwrap();
            files.insert(
                f.file_name().to_string_lossy().into_owned(),
                fs::read_to_string(f.path()).unwrap(),
            );
        }
        m.insert(host.file_name().to_string_lossy().into_owned(), files);
    }
    m
}

/// Replaces build ids and instance ids (they depend on the per-process test keys' fingerprints)
/// with placeholders.
fn normalise(dir: &Path, host: &str, text: &str) -> String {
    let project = kiln::project::recipe::load_project(dir).unwrap();
    let node = project
        .cluster
        .nodes
        .iter()
        .find(|n| n.hostname == host)
        .unwrap();
    let r = kiln::pipeline::resolve::resolve(&project, &node.role).unwrap();
    let iid = kiln::pipeline::seed::instance_id(&r.build_id, host);
    text.replace(&iid, "<instance-id>")
        .replace(r.build_id.as_str(), "<role-build-id>")
}

#[test]
fn seeds_for_the_three_node_inventory_match_golden_files() {
    let d = project();
    let seeds = render(d.path());
    assert_eq!(
        seeds.keys().collect::<Vec<_>>(),
        ["master-1", "worker-1", "worker-2"]
    );
    let golden = repo_root().join("tests/golden/seeds");
    let update = std::env::var_os("KILN_UPDATE_GOLDEN").is_some();
    for (host, files) in &seeds {
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            [
                "kiln-machine-id",
                "kiln-node-password",
                "kiln-ssh-host-ed25519-key",
                "kiln-ssh-host-ed25519-key.pub",
                "meta-data",
                "network-config",
                "user-data"
            ],
            "{host}: no vendor-data without a template; the identity files (every node here runs k3s)"
        );
        // The identity files derive from the test keys (made once per test cache): checked in
        // tests of trust::identity and by the VM test, not pinned here.
        for (name, text) in files.iter().filter(|(n, _)| !n.starts_with("kiln-")) {
            let got = normalise(d.path(), host, text);
            let p = golden.join(host).join(name);
            if update {
                fs::create_dir_all(p.parent().unwrap()).unwrap();
                fs::write(&p, &got).unwrap();
                continue;
            }
            let want = fs::read_to_string(&p).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (run with KILN_UPDATE_GOLDEN=1 to create it)",
                    p.display()
                )
            });
            assert_eq!(
                got,
                want,
                "{host}/{name} differs from {} (KILN_UPDATE_GOLDEN=1 to accept)",
                p.display()
            );
        }
    }
    // Every file is valid YAML, the instance id is derived from build id + hostname, and the
    // network config matches the node by MAC.
    let m1 = &seeds["master-1"];
    let meta: serde_yaml::Value = serde_yaml::from_str(&m1["meta-data"]).unwrap();
    assert!(meta["instance-id"]
        .as_str()
        .unwrap()
        .starts_with("master-1-"));
    let net: serde_yaml::Value = serde_yaml::from_str(&m1["network-config"]).unwrap();
    assert_eq!(net["version"], 2);
    assert_eq!(
        net["ethernets"]["kiln0"]["match"]["macaddress"],
        "52:54:00:00:00:11"
    );
    assert_eq!(net["ethernets"]["kiln0"]["addresses"][0], "10.0.0.11/24");
    let w1: serde_yaml::Value = serde_yaml::from_str(&seeds["worker-1"]["network-config"]).unwrap();
    assert_eq!(w1["ethernets"]["kiln0"]["dhcp4"], true);
    let ud: serde_yaml::Value = serde_yaml::from_str(&m1["user-data"]).unwrap();
    assert_eq!(ud["hostname"], "master-1");
    assert_eq!(ud["users"][0]["name"], "root");
    assert_eq!(ud["users"][0]["ssh_authorized_keys"][0], AUTHORIZED_KEY);
    // Two renders are identical.
    assert_eq!(seeds, render(d.path()));
}

#[test]
fn templates_are_overridden_per_node_then_role_then_all() {
    let d = project();
    let seed = d.path().join("overlays/seed");
    fs::create_dir_all(seed.join("worker")).unwrap();
    fs::create_dir_all(seed.join("worker-2")).unwrap();
    fs::write(
        seed.join("vendor-data.tera"),
        "#cloud-config\nruncmd:\n  - [echo, \"vendor {{ node.hostname }}\"]\n",
    )
    .unwrap();
    fs::write(
        seed.join("worker/user-data.tera"),
        "#cloud-config\nhostname: {{ node.hostname }}\n# role override\n",
    )
    .unwrap();
    fs::write(
        seed.join("worker-2/user-data.tera"),
        "#cloud-config\nhostname: {{ node.hostname }}\n# node override\n",
    )
    .unwrap();
    let s = render(d.path());
    assert!(s["worker-1"]["user-data"].contains("# role override"));
    assert!(s["worker-2"]["user-data"].contains("# node override"));
    assert!(s["master-1"]["user-data"].contains("ssh_authorized_keys"));
    for h in ["master-1", "worker-1", "worker-2"] {
        assert_eq!(
            s[h]["vendor-data"],
            format!("#cloud-config\nruncmd:\n  - [echo, \"vendor {h}\"]\n")
        );
    }
}

fn expect_user_error(d: &Path, args: &[&str], wants: &[&str]) {
    let o = kiln(d, args);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    for w in wants {
        assert!(e.contains(w), "stderr lacks {w:?}:\n{e}");
    }
    assert!(e.contains("fix:"), "{e}");
}

#[test]
fn bad_templates_are_refused_with_file_key_and_fix() {
    // Unknown network-config key.
    let d = project();
    let seed = d.path().join("overlays/seed");
    fs::create_dir_all(&seed).unwrap();
    fs::write(
        seed.join("network-config.tera"),
        "version: 2\nethernets:\n  e:\n    match:\n      macaddress: \"{{ node.mac }}\"\n    dhcp: true\n",
    )
    .unwrap();
    expect_user_error(
        d.path(),
        &["seed"],
        &[
            "overlays/seed/network-config.tera",
            "ethernets.e.dhcp",
            "dhcp4",
        ],
    );
    // No device matches the node's MAC.
    fs::write(
        seed.join("network-config.tera"),
        "version: 2\nethernets:\n  e:\n    match:\n      macaddress: \"02:00:00:00:00:01\"\n    dhcp4: true\n",
    )
    .unwrap();
    expect_user_error(
        d.path(),
        &["seed"],
        &["no device matches", "52:54:00:00:00:11"],
    );
    // Wrong version.
    fs::write(seed.join("network-config.tera"), "version: 1\nconfig: []\n").unwrap();
    expect_user_error(d.path(), &["seed"], &["version"]);
    fs::remove_file(seed.join("network-config.tera")).unwrap();
    // user-data that is not YAML.
    fs::write(
        seed.join("user-data.tera"),
        "#cloud-config\nhostname: [unclosed\n",
    )
    .unwrap();
    expect_user_error(
        d.path(),
        &["seed"],
        &["overlays/seed/user-data.tera", "not valid YAML"],
    );
    // user-data without a recognised header.
    fs::write(seed.join("user-data.tera"), "hostname: x\n").unwrap();
    expect_user_error(d.path(), &["seed"], &["#cloud-config"]);
    // meta-data without instance-id.
    fs::remove_file(seed.join("user-data.tera")).unwrap();
    fs::write(seed.join("meta-data.tera"), "local-hostname: x\n").unwrap();
    expect_user_error(d.path(), &["seed"], &["instance-id"]);
    // Template syntax error.
    fs::write(seed.join("meta-data.tera"), "instance-id: {{ oops\n").unwrap();
    expect_user_error(
        d.path(),
        &["seed"],
        &[
            "overlays/seed/meta-data.tera",
            "(template for master-1)",
            "syntax error",
        ],
    );
    // Unknown hostname.
    fs::remove_file(seed.join("meta-data.tera")).unwrap();
    expect_user_error(
        d.path(),
        &["seed", "nope"],
        &["nope", "master-1, worker-1, worker-2"],
    );
}

#[test]
fn cidata_volume_reads_back_with_mtools_and_blkid() {
    let d = project();
    let project = kiln::project::recipe::load_project(d.path()).unwrap();
    let node = &project.cluster.nodes[0];
    let s = kiln::pipeline::seed::render(
        &project,
        node,
        "0123abcd",
        kiln::project::recipe::K3sMode::Agent,
        &[AUTHORIZED_KEY.into()],
    )
    .unwrap();
    let img = d.path().join("cidata.img");
    kiln::pipeline::node::write_cidata(&img, &s, 1_700_000_000).unwrap();
    let again = d.path().join("cidata2.img");
    kiln::pipeline::node::write_cidata(&again, &s, 1_700_000_000).unwrap();
    assert_eq!(
        fs::read(&img).unwrap(),
        fs::read(&again).unwrap(),
        "not deterministic"
    );
    let mut checked = false;
    if which("mdir") && which("mtype") {
        let o = Command::new("mdir")
            .env("MTOOLS_SKIP_CHECK", "1")
            .args(["-b", "-i"])
            .arg(&img)
            .arg("::")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let listed: Vec<String> = stdout(&o)
            .lines()
            .map(|l| l.trim_start_matches("::/").to_string())
            .collect();
        assert_eq!(
            listed,
            [
                "meta-data",
                "user-data",
                "network-config",
                "kiln-machine-id",
                "kiln-node-password",
                "kiln-ssh-host-ed25519-key",
                "kiln-ssh-host-ed25519-key.pub"
            ]
        );
        for (name, bytes) in s.ordered() {
            let o = Command::new("mtype")
                .env("MTOOLS_SKIP_CHECK", "1")
                .args(["-i"])
                .arg(&img)
                .arg(format!("::{name}"))
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", stderr(&o));
            assert_eq!(o.stdout, bytes, "{name}");
        }
        checked = true;
    }
    if which("blkid") {
        let o = Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(&img)
            .output()
            .unwrap();
        let t = stdout(&o);
        assert!(t.contains("LABEL=CIDATA\n"), "{t}");
        assert!(t.contains("TYPE=vfat\n"), "{t}");
        checked = true;
    }
    if which("fsck.fat") {
        let o = Command::new("fsck.fat")
            .arg("-n")
            .arg(&img)
            .output()
            .unwrap();
        assert!(o.status.success(), "fsck.fat: {}", combined(&o));
    }
    if !checked {
        skip("cidata_volume_reads_back", "mtools and blkid not installed");
    }
}

#[test]
fn token_delivery_seed_moves_the_token_from_the_image_to_the_seed() {
    let d = project();
    let id = |d: &Path| {
        let p = kiln::project::recipe::load_project(d).unwrap();
        kiln::pipeline::resolve::resolve(&p, "worker")
            .unwrap()
            .build_id
    };
    let token2 = "f".repeat(64);
    // Baked (default): the token is an input of the role image.
    let baked = id(d.path());
    let tok = d.path().join("keys/k3s-token");
    let old = fs::read_to_string(&tok).unwrap();
    fs::write(&tok, format!("{token2}\n")).unwrap();
    assert_ne!(baked, id(d.path()), "baked token must change the build id");
    fs::write(&tok, &old).unwrap();

    edit(
        d.path(),
        "recipes/cluster.toml",
        "bootstrapped = false",
        "bootstrapped = false\ntoken_delivery = \"seed\"",
    );
    let seeded = id(d.path());
    fs::write(&tok, format!("{token2}\n")).unwrap();
    assert_eq!(
        seeded,
        id(d.path()),
        "a token in the seed is not an image input"
    );

    let project = kiln::project::recipe::load_project(d.path()).unwrap();
    let worker = kiln::project::recipe::load_role(&project, "worker").unwrap();
    let fetched = kiln::pipeline::k3s::Fetched {
        binary: repo_root().join("tests/standin/k3s"),
        ..Default::default()
    };
    let layer = kiln::pipeline::k3s::layer(&project, &worker, &fetched, &token2).unwrap();
    assert!(
        !layer.entries.contains_key(kiln::pipeline::k3s::TOKEN),
        "token baked"
    );
    assert!(!layer.contains_secrets);

    let out = d.path().join("seeds");
    let o = kiln(d.path(), &["seed", "worker-1", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let p = out.join("worker-1/user-data");
    let ud: serde_yaml::Value = serde_yaml::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
    let wf = &ud["write_files"][0];
    assert_eq!(wf["path"], "/etc/rancher/k3s/token");
    assert_eq!(wf["permissions"], "0600");
    // k3s's secure form, pinning the cluster's server CA.
    let ca = fs::read(d.path().join("keys/k3s-server-ca.crt")).unwrap();
    assert_eq!(
        wf["content"],
        format!("K10{}::server:{token2}", kiln::sys::util::sha256_hex(&ca)).as_str()
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // A user-data override that drops the token is refused.
    fs::create_dir_all(d.path().join("overlays/seed")).unwrap();
    fs::write(
        d.path().join("overlays/seed/user-data.tera"),
        "#cloud-config\nhostname: {{ node.hostname }}\n",
    )
    .unwrap();
    let o = kiln(d.path(), &["seed", "worker-1"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("k3s.token_delivery"), "{}", stderr(&o));
}

#[test]
fn build_checks_seeds_before_building_anything() {
    let d = project();
    fs::create_dir_all(d.path().join("overlays/seed")).unwrap();
    fs::write(
        d.path().join("overlays/seed/network-config.tera"),
        "version: 2\nethernets: [oops]\n",
    )
    .unwrap();
    let o = kiln(d.path(), &["build", "--role", "worker", "--offline"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("overlays/seed/network-config.tera"),
        "{}",
        stderr(&o)
    );
    assert!(!d.path().join("out").exists(), "nothing may be written");
}

#[test]
fn seed_templates_stay_inside_the_project_and_see_no_host_state() {
    let host = tempfile::tempdir().unwrap();
    fs::write(
        host.path().join("user-data.tera"),
        "#cloud-config\n# HOST FILE\nhostname: {{ node.hostname }}\n",
    )
    .unwrap();
    // A user-data.tera that is a symlink out of the project.
    let d = project();
    let seed = d.path().join("overlays/seed");
    fs::create_dir_all(&seed).unwrap();
    std::os::unix::fs::symlink(
        host.path().join("user-data.tera"),
        seed.join("user-data.tera"),
    )
    .unwrap();
    expect_user_error(
        d.path(),
        &["seed"],
        &["overlays/seed/user-data.tera", "outside the project"],
    );
    // overlays/seed/<host> symlinked out of the project.
    fs::remove_file(seed.join("user-data.tera")).unwrap();
    std::os::unix::fs::symlink(host.path(), seed.join("worker-1")).unwrap();
    expect_user_error(
        d.path(),
        &["seed"],
        &["overlays/seed/worker-1", "outside the project"],
    );
    fs::remove_file(seed.join("worker-1")).unwrap();
    // The build host's environment.
    fs::write(
        seed.join("user-data.tera"),
        "#cloud-config\nhostname: {{ node.hostname }}\n# {{ get_env(name=\"PATH\") }}\n",
    )
    .unwrap();
    expect_user_error(
        d.path(),
        &["seed"],
        &["overlays/seed/user-data.tera", "get_env() is not available"],
    );
    // A recursive macro: an error, not a stack overflow (signal 6).
    fs::write(
        seed.join("user-data.tera"),
        "{% macro r(n) %}{{ self::r(n=n) }}{% endmacro r %}#cloud-config\nhostname: {{ self::r(n=1) }}\n",
    )
    .unwrap();
    expect_user_error(
        d.path(),
        &["seed"],
        &["overlays/seed/user-data.tera", "recursive macro"],
    );
    // Output past the bound.
    fs::write(
        seed.join("user-data.tera"),
        "#cloud-config\n{% for i in range(end=10000) %}{% for j in range(end=10000) %}# {{ i }} {{ j }}\n{% endfor %}{% endfor %}",
    )
    .unwrap();
    expect_user_error(
        d.path(),
        &["seed"],
        &["overlays/seed/user-data.tera", "renders more than"],
    );
}

/// `kiln keys known-hosts` prints, per node, the public half of the host key its seed carries
/// (what the node's sshd presents on every boot), and refuses a host that is not in the
/// inventory.
#[test]
fn known_hosts_carry_the_host_keys_of_the_seeds() {
    let d = project();
    let seeds = render(d.path());
    let o = kiln(d.path(), &["keys", "known-hosts"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert_eq!(text.lines().count(), seeds.len(), "{text}");
    for (host, files) in &seeds {
        let public = &files["kiln-ssh-host-ed25519-key.pub"];
        let key: Vec<&str> = public.split_whitespace().take(2).collect();
        let line = text
            .lines()
            .find(|l| l.split(' ').next().unwrap().split(',').any(|n| n == host))
            .unwrap_or_else(|| panic!("no line for {host}: {text}"));
        assert!(line.ends_with(&key.join(" ")), "{line} vs {public}");
    }
    // One node, into a file.
    let out = d.path().join("kh");
    let o = kiln(
        d.path(),
        &[
            "keys",
            "known-hosts",
            "worker-1",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let one = fs::read_to_string(&out).unwrap();
    assert!(
        one.starts_with("worker-1") && one.lines().count() == 1,
        "{one}"
    );
    expect_user_error(
        d.path(),
        &["keys", "known-hosts", "nosuch-9"],
        &["nosuch-9", "cluster.toml"],
    );
}

/// With `[updates]`, every seed carries the node's report key — the same key `kiln serve`
/// derives to check its reports, another on every node; without it, none.
#[test]
fn seeds_carry_the_update_key_only_with_updates() {
    let d = project();
    let seeds = render(d.path());
    assert!(seeds.values().all(|f| !f.contains_key("kiln-update-key")));
    let c = d.path().join("recipes/cluster.toml");
    let mut t = fs::read_to_string(&c).unwrap();
    t.push_str("\n[updates]\nserver = \"http://10.0.0.2:8080\"\n");
    fs::write(&c, t).unwrap();
    let _ = fs::remove_dir_all(d.path().join("seeds-out"));
    let seeds = render(d.path());
    let project = kiln::project::recipe::load_project(d.path()).unwrap();
    let secret = kiln::pipeline::resolve::read_node_identity(&project).unwrap();
    let mut keys = std::collections::BTreeSet::new();
    for (host, files) in &seeds {
        let got = files
            .get("kiln-update-key")
            .unwrap_or_else(|| panic!("{host}: no kiln-update-key"));
        let want = kiln::trust::identity::update_key(&secret, "homelab", host);
        assert_eq!(got.trim(), hex::encode(&want[..]), "{host}");
        assert!(
            keys.insert(got.clone()),
            "{host}: the same key as another node"
        );
    }
}
