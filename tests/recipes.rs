//! Recipe loading, merging, build ids and the rejection of bad input (fast; no root needed).

mod common;
use common::*;
use std::fs;

/// Runs `kiln build --role worker` on a broken project and checks: exit 2, the message names
/// the file, the key and a fix, and nothing was written to out/.
fn rejects(dir: &std::path::Path, file: &str, key: &str) -> String {
    rejects_role(dir, "worker", file, key)
}

fn rejects_role(dir: &std::path::Path, role: &str, file: &str, key: &str) -> String {
    let o = kiln(dir, &["build", "--role", role]);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit 2, got {:?}; stderr:\n{err}",
        o.status
    );
    assert!(
        err.contains(file),
        "error does not name the file {file}:\n{err}"
    );
    assert!(
        err.contains(key),
        "error does not name the key {key}:\n{err}"
    );
    assert!(err.contains("fix:"), "error gives no fix:\n{err}");
    assert!(!dir.join("out").exists(), "a rejected build wrote out/");
    err
}

#[test]
fn unknown_key_in_role_recipe() {
    let d = project_copy();
    edit(d.path(), "recipes/base.toml", "packages = [", "pakages = [");
    let e = rejects(d.path(), "recipes/base.toml", "pakages");
    assert!(e.contains("unknown field"), "{e}");
    assert!(e.contains("line "), "{e}");
}

#[test]
fn unknown_role_in_inventory() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/cluster.toml",
        "role = \"worker\"",
        "role = \"wroker\"",
    );
    let e = rejects(d.path(), "recipes/cluster.toml", "nodes[1].role");
    assert!(
        e.contains("wroker") && e.contains("master, worker, gpu, storage"),
        "{e}"
    );
}

#[test]
fn unknown_role_on_command_line() {
    let d = project_copy();
    let o = kiln(d.path(), &["build", "--role", "router"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert!(
        e.contains("--role") && e.contains("router") && e.contains("fix:"),
        "{e}"
    );
    assert!(!d.path().join("out").exists());
}

#[test]
fn bad_mac() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/cluster.toml",
        "52:54:00:00:00:21",
        "52:54:00:00:21",
    );
    let e = rejects(d.path(), "recipes/cluster.toml", "nodes[1].mac");
    assert!(e.contains("52:54:00:00:21"), "{e}");
}

#[test]
fn duplicate_mac() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/cluster.toml",
        "52:54:00:00:00:22",
        "52-54-00-00-00-21",
    );
    let e = rejects(d.path(), "recipes/cluster.toml", "nodes[2].mac");
    assert!(e.contains("worker-1"), "{e}");
}

#[test]
fn duplicate_hostname() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/cluster.toml",
        "hostname = \"worker-2\"",
        "hostname = \"worker-1\"",
    );
    rejects(d.path(), "recipes/cluster.toml", "nodes[2].hostname");
}

#[test]
fn missing_role_file() {
    let d = project_copy();
    fs::remove_file(d.path().join("recipes/worker.toml")).unwrap();
    let e = rejects(d.path(), "recipes/cluster.toml", "nodes[1].role");
    assert!(e.contains("worker.toml"), "{e}");
}

#[test]
fn missing_cluster_file() {
    let d = project_copy();
    fs::remove_file(d.path().join("recipes/cluster.toml")).unwrap();
    rejects(d.path(), "recipes/cluster.toml", "(file)");
}

#[test]
fn bad_static_address() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/cluster.toml",
        "10.0.0.11/24",
        "10.0.0.11",
    );
    rejects(d.path(), "recipes/cluster.toml", "nodes[0].address");
}

#[test]
fn wrong_value_type() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/cluster.toml",
        "source_date_epoch = 1700000000",
        "source_date_epoch = \"yesterday\"",
    );
    rejects(d.path(), "recipes/cluster.toml", "line 5");
}

#[test]
fn epoch_before_1980() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/cluster.toml",
        "source_date_epoch = 1700000000",
        "source_date_epoch = 0",
    );
    rejects(
        d.path(),
        "recipes/cluster.toml",
        "cluster.source_date_epoch",
    );
}

#[test]
fn inheritance_cycle() {
    let d = project_copy();
    fs::write(
        d.path().join("recipes/base.toml"),
        "inherits = \"worker\"\n",
    )
    .unwrap();
    let e = rejects(d.path(), "recipes/", "inherits");
    assert!(e.contains("cycle"), "{e}");
}

#[test]
fn inherits_missing_recipe() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/worker.toml",
        "inherits = \"base\"",
        "inherits = \"bsae\"",
    );
    let e = rejects(d.path(), "recipes/worker.toml", "inherits");
    assert!(e.contains("bsae"), "{e}");
}

#[test]
fn bad_package_name() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/base.toml",
        "\"procps\",",
        "\"Procps Ng\",",
    );
    rejects(d.path(), "recipes/base.toml", "debian.packages[12]");
}

#[test]
fn bad_unit_name() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/base.toml",
        "\"systemd-resolved.service\"]",
        "\"systemd-resolved\"]",
    );
    rejects(d.path(), "recipes/base.toml", "systemd.enable");
}

#[test]
fn template_syntax_error() {
    let d = project_copy();
    fs::write(
        d.path().join("overlays/worker/broken.conf.tera"),
        "{{ role.name ",
    )
    .unwrap();
    let e = rejects(d.path(), "overlays/worker/broken.conf.tera", "(template)");
    assert!(e.contains("syntax"), "{e}");
}

#[test]
fn valid_project_inspects() {
    let d = project_copy();
    let o = kiln(d.path(), &["inspect", "--role", "gpu", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = v["build_id"].as_str().unwrap();
    assert_eq!(id.len(), 64);
    let r = &v["inputs"]["recipe"];
    assert_eq!(r["chain"], serde_json::json!(["base", "gpu"]));
    // Lists merge: base's component first, the role's appended.
    assert_eq!(
        r["debian"]["components"],
        serde_json::json!(["main", "contrib", "non-free", "non-free-firmware"])
    );
    // Scalars inherit/override.
    assert_eq!(r["debian"]["variant"], "minbase");
    assert_eq!(r["description"], "k3s agent with NVIDIA GPUs");
    assert!(r["debian"]["packages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == "linux-image-amd64"));
    // The pinned NVIDIA container toolkit .debs (in dependency order) and DKMS signing.
    let debs: Vec<&str> = r["debian"]["debs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["url"].as_str().unwrap().rsplit('/').next().unwrap())
        .collect();
    assert_eq!(
        debs,
        [
            "libnvidia-container1_1.17.8-1_amd64.deb",
            "libnvidia-container-tools_1.17.8-1_amd64.deb",
            "nvidia-container-toolkit-base_1.17.8-1_amd64.deb",
            "nvidia-container-toolkit_1.17.8-1_amd64.deb"
        ]
    );
    assert_eq!(r["debian"]["sign_modules"], true);
    let base = &v["inputs"]["base"];
    assert_eq!(base["debs"].as_array().unwrap().len(), 4);
    assert_eq!(base["module_signing_cert"].as_str().unwrap().len(), 64);
    // Roles without either keep the fields out of their ids (and their cached bases valid).
    let o = kiln(d.path(), &["inspect", "--role", "worker", "--json"]);
    let w: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(w["inputs"]["recipe"]["debian"].get("debs").is_none());
    assert!(w["inputs"]["recipe"]["debian"]
        .get("sign_modules")
        .is_none());
    assert!(w["inputs"]["base"].get("module_signing_cert").is_none());
}

#[test]
fn pinned_deb_must_be_a_plain_deb_url_with_a_sha256() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/gpu.toml",
        "amd64/libnvidia-container1_1.17.8-1_amd64.deb",
        "amd64/libnvidia-container1",
    );
    let e = rejects_role(d.path(), "gpu", "recipes/gpu.toml", "debian.debs[0].url");
    assert!(e.contains(".deb"), "{e}");
    let d = project_copy();
    edit(
        d.path(),
        "recipes/gpu.toml",
        "0c04cfaff55e2416d5e93396b54ff01262ed4192797c5b09988d89af34456e8d",
        "0c04cfaff55e",
    );
    rejects_role(d.path(), "gpu", "recipes/gpu.toml", "debian.debs[1].sha256");
    // One file name pinned from two URLs.
    let d = project_copy();
    edit(
        d.path(),
        "recipes/gpu.toml",
        "https://nvidia.github.io/libnvidia-container/stable/deb/amd64/libnvidia-container-tools_",
        "https://mirror.invalid/x/libnvidia-container-tools_",
    );
    edit(
        d.path(),
        "recipes/gpu.toml",
        "amd64/nvidia-container-toolkit_1.17.8-1_amd64.deb",
        "amd64/libnvidia-container-tools_1.17.8-1_amd64.deb",
    );
    let e = rejects_role(d.path(), "gpu", "recipes/gpu.toml", "debian.debs[3].url");
    assert!(e.contains("also pinned"), "{e}");
}

#[test]
fn customize_commands_merge_in_order_and_empty_ones_are_refused() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/base.toml",
        "[debian]\n",
        "[debian]\ncustomize = [\"echo base\"]\n",
    );
    let o = kiln(d.path(), &["inspect", "--role", "storage", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = v["inputs"]["base"]["customize"].as_array().unwrap();
    assert_eq!(c.len(), 3, "{c:?}");
    assert_eq!(c[0], "echo base", "parent first");
    assert!(c[1].as_str().unwrap().contains("GenerateName=yes"));
    edit(
        d.path(),
        "recipes/base.toml",
        "customize = [\"echo base\"]",
        "customize = [\" \"]",
    );
    rejects(d.path(), "recipes/base.toml", "debian.customize[0]");
}

#[test]
fn sign_modules_needs_the_module_signing_key() {
    let d = project_copy();
    fs::remove_file(d.path().join("keys/module-signing.key")).unwrap();
    let e = rejects_role(d.path(), "gpu", "keys/module-signing.key", "module-signing");
    assert!(e.contains("kiln keys init --add-missing"), "{e}");
    // --add-missing refuses to pair a new key with the old certificate...
    let o = kiln(d.path(), &["keys", "init", "--add-missing"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("module-signing"), "{}", stderr(&o));
    // ...and with both gone makes exactly that pair, touching nothing else.
    fs::remove_file(d.path().join("keys/module-signing.crt")).unwrap();
    let before = fs::read(d.path().join("keys/sealed-secrets.key")).unwrap();
    let o = kiln(d.path(), &["keys", "init", "--add-missing"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let wrote: Vec<&str> = out.lines().collect();
    assert_eq!(wrote.len(), 2, "{wrote:?}");
    assert!(
        wrote.iter().all(|l| l.contains("module-signing.")),
        "{wrote:?}"
    );
    assert_eq!(
        fs::read(d.path().join("keys/sealed-secrets.key")).unwrap(),
        before
    );
    let o = kiln(d.path(), &["inspect", "--role", "gpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = kiln(d.path(), &["keys", "init", "--add-missing"]);
    assert!(
        stdout(&o).contains("every key is present"),
        "{}",
        stdout(&o)
    );
    // A certificate of another key is refused.
    let other = tempfile::tempdir().unwrap();
    kiln::trust::keys::init_with_rsa_bits(other.path(), "x", false, 2048).unwrap();
    fs::copy(
        other.path().join("module-signing.crt"),
        d.path().join("keys/module-signing.crt"),
    )
    .unwrap();
    let e = rejects_role(d.path(), "gpu", "keys/module-signing.crt", "module-signing");
    assert!(e.contains("not for module-signing.key"), "{e}");
}

#[test]
fn scalar_override_and_list_merge() {
    let d = project_copy();
    fs::write(
        d.path().join("recipes/storage.toml"),
        "inherits = \"base\"\ndescription = \"s\"\n[debian]\nvariant = \"important\"\npackages = [\"open-iscsi\", \"systemd\"]\n[boot]\ncmdline = [\"quiet\"]\n",
    )
    .unwrap();
    let o = kiln(d.path(), &["inspect", "--role", "storage", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &v["inputs"]["recipe"];
    assert_eq!(r["debian"]["variant"], "important");
    let pk: Vec<&str> = r["debian"]["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert_eq!(pk.last(), Some(&"open-iscsi"));
    assert_eq!(
        pk.iter().filter(|p| **p == "systemd").count(),
        1,
        "duplicates dropped"
    );
    assert_eq!(
        r["boot"]["cmdline"],
        serde_json::json!(["console=tty0", "console=ttyS0,115200n8", "quiet"])
    );
}

fn build_id(dir: &std::path::Path, role: &str) -> String {
    let o = kiln(dir, &["inspect", "--role", role, "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["build_id"].as_str().unwrap().to_string()
}

#[test]
fn build_id_is_location_independent_and_input_sensitive() {
    let a = project_copy();
    let b = project_copy();
    let id = build_id(a.path(), "worker");
    assert_eq!(
        id,
        build_id(b.path(), "worker"),
        "same inputs in another directory → same id"
    );
    assert_ne!(id, build_id(a.path(), "master"), "roles differ");

    // An overlay edit changes the id of the roles it reaches.
    fs::write(b.path().join("overlays/worker/extra.txt"), "x").unwrap();
    assert_ne!(id, build_id(b.path(), "worker"));
    assert_eq!(
        build_id(a.path(), "master"),
        build_id(b.path(), "master"),
        "worker overlay does not touch master"
    );

    // A mode change (exec bit) changes it too.
    let c = project_copy();
    use std::os::unix::fs::PermissionsExt;
    let f = c.path().join("overlays/common/etc/motd.tera");
    fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
    assert_ne!(id, build_id(c.path(), "worker"));

    // Comments and key order in TOML do not change it (the canonical merged recipe is hashed).
    let e = project_copy();
    let p = e.path().join("recipes/worker.toml");
    let s = fs::read_to_string(&p).unwrap();
    let (first, rest) = s.split_once('\n').unwrap();
    let (second, rest) = rest.split_once('\n').unwrap();
    assert!(first.starts_with("inherits") && second.starts_with("description"));
    fs::write(
        &p,
        format!("# a comment\n{second}\n\n{first}   # trailing comment\n{rest}"),
    )
    .unwrap();
    assert_eq!(id, build_id(e.path(), "worker"));
}

/// A fixed project has a fixed id: catches accidental host state, paths or map order in the hash.
#[test]
fn build_id_golden() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path().join("recipes");
    fs::create_dir_all(&r).unwrap();
    fs::write(r.join("cluster.toml"), "[cluster]\nname = \"golden\"\nsource_date_epoch = 1700000000\nsuite = \"bookworm\"\n\n[[nodes]]\nhostname = \"w1\"\nmac = \"AA-BB-CC-00-11-22\"\nrole = \"worker\"\n").unwrap();
    fs::write(r.join("base.toml"), "[debian]\npackages = [\"systemd\"]\n").unwrap();
    fs::write(r.join("worker.toml"), "inherits = \"base\"\n").unwrap();
    fs::create_dir_all(d.path().join("overlays/common/etc")).unwrap();
    fs::write(d.path().join("overlays/common/etc/issue"), "golden\n").unwrap();
    let o = kiln(d.path(), &["inspect", "--role", "worker", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["inputs"]["cluster"]["nodes"][0]["mac"], "aa:bb:cc:00:11:22",
        "MAC normalised"
    );
    // Update deliberately (and note it in the changelog) when the build-id schema changes.
    assert_eq!(
        v["build_id"].as_str().unwrap(),
        GOLDEN_ID,
        "build id of the golden project changed"
    );
}

// 2026-12-02: the inputs gained `format_generation` (FORMAT_GENERATION 1); then the merged
// recipe gained `persist` (issue 18: the role's persistent paths) and
// FORMAT_GENERATION became 2 (every image carries /usr/lib/kiln/persist.list).
const GOLDEN_ID: &str = "20798c8eadf0ebc8bf0ed7027ecc2acd155eb025ca7f472a0c79cfea47feb491";

#[test]
fn doctor_lists_tools() {
    let d = project_copy();
    let o = kiln(d.path(), &["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for t in ["mmdebstrap", "tar2sqfs", "qemu-img", "qemu-system-x86_64"] {
        assert!(names.contains(&t), "{t} missing from doctor");
    }
    for t in v.as_array().unwrap() {
        assert!(!t["package"].as_str().unwrap().is_empty());
    }
}

/// Roles whose builds are already complete in out/ need no base: `build_roles` builds none
/// for them (with an empty cache it would otherwise start two mmdebstrap runs).
#[test]
fn missing_bases_skip_up_to_date_roles() {
    let d = project_copy();
    // Master and worker share a base (without the VIP, the master needs no keepalived).
    without_vip(d.path());
    let project = kiln::project::recipe::load_project(d.path()).unwrap();
    let roles: Vec<_> = ["worker", "master", "storage"]
        .iter()
        .map(|r| kiln::pipeline::resolve::resolve(&project, r).unwrap())
        .collect();
    let out = d.path().join("out");
    for r in &roles {
        let dir = out.join(&r.role).join(&r.build_id);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("SHA256SUMS"), "").unwrap();
        fs::write(dir.join("SHA256SUMS.sig"), "").unwrap();
    }
    let mut opts = kiln::pipeline::build::BuildOptions {
        out_dir: out.clone(),
        cache_dir: d.path().join("empty-cache"),
        force: false,
        offline: false,
        locked: false,
    };
    assert!(kiln::pipeline::build::missing_bases(&roles, &opts).is_empty());
    // The master's build gone: only its base (shared with the worker, which is built) is due.
    fs::remove_dir_all(out.join("master").join(&roles[1].build_id)).unwrap();
    let m = kiln::pipeline::build::missing_bases(&roles, &opts);
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].0, roles[1].base_key);
    assert_eq!(
        m[0].1.iter().map(|r| r.role.as_str()).collect::<Vec<_>>(),
        ["master"]
    );
    // --force: every role's base, distinct bases once each, in role order.
    opts.force = true;
    let m = kiln::pipeline::build::missing_bases(&roles, &opts);
    assert_eq!(m.len(), 2);
    assert_eq!(roles[0].base_key, roles[1].base_key);
    assert_eq!(
        m[0].1.iter().map(|r| r.role.as_str()).collect::<Vec<_>>(),
        ["worker", "master"]
    );
    assert_eq!(
        m[1].1.iter().map(|r| r.role.as_str()).collect::<Vec<_>>(),
        ["storage"]
    );
    assert!(
        !d.path().join("empty-cache/base").exists(),
        "no base build started"
    );
    // A base in the cache (named by its cache key, which adds this host's mmdebstrap version
    // and apt sources to the base key) is not missing.
    let Ok(key) = roles[2].base.cache_key() else {
        println!("SKIP: cached-base part of missing_bases_skip_up_to_date_roles: mmdebstrap not installed");
        return;
    };
    assert_ne!(key, roles[2].base_key);
    let entry = d.path().join("empty-cache/base").join(&key);
    fs::create_dir_all(&entry).unwrap();
    fs::write(entry.join("rootfs.tar"), "").unwrap();
    fs::write(entry.join("spec.json"), "{}").unwrap();
    let m = kiln::pipeline::build::missing_bases(&roles, &opts);
    assert_eq!(
        m.iter()
            .flat_map(|(_, rs)| rs.iter().map(|r| r.role.as_str()))
            .collect::<Vec<_>>(),
        ["worker", "master"]
    );
}

// ---------------------------------------------------------------------------------------------
// Confinement: a project reads only inside itself (issue 17, section 1).

/// `kiln inspect --role <role> --json` on a project that names something outside itself:
/// exit 2, the message names the file and key, says it is outside the project, gives a fix.
fn inspect_rejects(dir: &std::path::Path, role: &str, file: &str, key: &str) -> String {
    let o = kiln(dir, &["inspect", "--role", role, "--json"]);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit 2, got {:?}; stdout:\n{}\nstderr:\n{err}",
        o.status,
        String::from_utf8_lossy(&o.stdout)
    );
    for w in [file, key, "fix:"] {
        assert!(err.contains(w), "error does not name {w:?}:\n{err}");
    }
    err
}

/// A directory outside the project with a file `name` holding `text`.
fn outside(name: &str, text: &str) -> tempfile::TempDir {
    let o = tempfile::tempdir().unwrap();
    fs::write(o.path().join(name), text).unwrap();
    o
}

/// `../` enough times to climb from `<project>/recipes/` to `/`, then `abs` (without its `/`).
fn climb_to(abs: &std::path::Path) -> String {
    format!(
        "{}{}",
        "../".repeat(12),
        abs.to_str().unwrap().trim_start_matches('/')
    )
}

#[test]
fn inherits_may_not_leave_recipes() {
    let evil = outside("evil.toml", "description = \"EVIL\"\n");
    let evil_abs = evil.path().join("evil");
    for name in [climb_to(&evil_abs), evil_abs.to_str().unwrap().to_string()] {
        let d = project_copy();
        edit(
            d.path(),
            "recipes/worker.toml",
            "inherits = \"base\"",
            &format!("inherits = {name:?}"),
        );
        let e = inspect_rejects(d.path(), "worker", "recipes/worker.toml", "inherits");
        assert!(e.contains("not a recipe name"), "{e}");
    }
    // A recipe that is a symlink out of the project.
    let d = project_copy();
    fs::remove_file(d.path().join("recipes/base.toml")).unwrap();
    std::os::unix::fs::symlink(
        evil.path().join("evil.toml"),
        d.path().join("recipes/base.toml"),
    )
    .unwrap();
    let e = inspect_rejects(d.path(), "worker", "recipes/worker.toml", "inherits");
    assert!(e.contains("outside the project"), "{e}");
}

#[test]
fn registries_must_be_a_file_inside_the_project() {
    let host = outside("registries.yaml", "mirrors: {}\n");
    let abs = host.path().join("registries.yaml");
    let d = project_copy();
    std::os::unix::fs::symlink(&abs, d.path().join("recipes/registries.yaml")).unwrap();
    for name in [
        abs.to_str().unwrap().to_string(),
        climb_to(&abs),
        "registries.yaml".to_string(),
    ] {
        edit(
            d.path(),
            "recipes/cluster.toml",
            "bootstrapped = false",
            &format!("bootstrapped = false\nregistries = {name:?}"),
        );
        let e = inspect_rejects(d.path(), "master", "recipes/cluster.toml", "k3s.registries");
        assert!(
            e.contains("outside the project") || e.contains("not a plain relative path"),
            "{name}: {e}"
        );
        edit(
            d.path(),
            "recipes/cluster.toml",
            &format!("bootstrapped = false\nregistries = {name:?}"),
            "bootstrapped = false",
        );
    }
    // /dev/zero is outside too (and never read).
    fs::remove_file(d.path().join("recipes/registries.yaml")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", d.path().join("recipes/registries.yaml")).unwrap();
    edit(
        d.path(),
        "recipes/cluster.toml",
        "bootstrapped = false",
        "bootstrapped = false\nregistries = \"registries.yaml\"",
    );
    inspect_rejects(d.path(), "master", "recipes/cluster.toml", "k3s.registries");
}

#[test]
fn a_manifest_symlinked_out_of_the_project_is_refused() {
    let host = outside(
        "m.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: host\n",
    );
    let d = project_copy();
    let m = d.path().join("recipes/manifests/nvidia-runtimeclass.yaml");
    fs::remove_file(&m).unwrap();
    std::os::unix::fs::symlink(host.path().join("m.yaml"), &m).unwrap();
    let e = inspect_rejects(
        d.path(),
        "master",
        "recipes/master.toml",
        "k3s.manifests[0]",
    );
    assert!(e.contains("outside the project"), "{e}");
    // A symlink that stays inside the project is followed.
    fs::remove_file(&m).unwrap();
    fs::write(
        d.path().join("recipes/rc.yaml"),
        "apiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: nvidia\nhandler: nvidia\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("../rc.yaml", &m).unwrap();
    let o = kiln(d.path(), &["inspect", "--role", "master", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn overlay_roots_are_real_directories_inside_the_project() {
    let host = outside("passwd", "root:x:0:0::/root:/bin/sh\n");
    let d = project_copy();
    fs::remove_dir_all(d.path().join("overlays/worker")).unwrap();
    std::os::unix::fs::symlink(host.path(), d.path().join("overlays/worker")).unwrap();
    let e = inspect_rejects(d.path(), "worker", "overlays/worker", "(overlay)");
    assert!(e.contains("outside the project"), "{e}");
    // Inside the project: followed (overlays/worker shares overlays/master).
    fs::remove_file(d.path().join("overlays/worker")).unwrap();
    std::os::unix::fs::symlink("master", d.path().join("overlays/worker")).unwrap();
    let o = kiln(d.path(), &["inspect", "--role", "worker", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // overlays/common as a regular file is an error, not "no overlay".
    let d = project_copy();
    fs::remove_dir_all(d.path().join("overlays/common")).unwrap();
    fs::write(d.path().join("overlays/common"), "not a dir\n").unwrap();
    let e = inspect_rejects(d.path(), "worker", "overlays/common", "(overlay)");
    assert!(e.contains("not a directory"), "{e}");
    // overlays/ itself symlinked out of the project.
    let d = project_copy();
    fs::remove_dir_all(d.path().join("overlays")).unwrap();
    std::os::unix::fs::symlink(host.path(), d.path().join("overlays")).unwrap();
    inspect_rejects(d.path(), "worker", "overlays", "(overlay)");
}

#[test]
fn symlinks_inside_overlays_stay_symlinks() {
    let d = project_copy();
    std::os::unix::fs::symlink("/etc/shadow", d.path().join("overlays/worker/shadow-link"))
        .unwrap();
    let o = kiln(d.path(), &["inspect", "--role", "worker", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let e = v["inputs"]["overlays"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["image_path"] == "shadow-link")
        .expect("listed");
    assert_eq!(e["kind"], "symlink");
    assert_eq!(e["sha256"], sha256_hex(b"/etc/shadow"));
}

#[test]
fn overlay_special_files_and_key_links_out_are_refused() {
    // A FIFO in an overlay (would block a reader; cannot go into the image as data).
    let d = project_copy();
    let fifo = d.path().join("overlays/worker/fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let e = inspect_rejects(d.path(), "worker", "overlays/worker/fifo", "(overlay)");
    assert!(e.contains("FIFO"), "{e}");
    // keys/k3s-token symlinked to a host file: it would be baked into the image.
    let host = outside("token", "0123456789abcdef0123456789abcdef\n");
    let d = project_copy();
    fs::remove_file(d.path().join("keys/k3s-token")).unwrap();
    std::os::unix::fs::symlink(host.path().join("token"), d.path().join("keys/k3s-token")).unwrap();
    let e = inspect_rejects(d.path(), "worker", "keys/k3s-token", "(key file)");
    assert!(e.contains("outside the project"), "{e}");
}

#[test]
fn overlay_templates_cannot_read_the_environment_or_recurse() {
    let d = project_copy();
    let t = d.path().join("overlays/worker/env.tera");
    fs::write(&t, "PATH={{ get_env(name=\"PATH\") }}\n").unwrap();
    let e = rejects(d.path(), "overlays/worker/env.tera", "(template)");
    assert!(e.contains("get_env"), "{e}");
    fs::write(
        &t,
        "{% macro r() %}{{ self::r() }}{% endmacro r %}{{ self::r() }}\n",
    )
    .unwrap();
    let e = rejects(d.path(), "overlays/worker/env.tera", "(template)");
    assert!(e.contains("recursive macro"), "{e}");
}

// --- [persist] (issue 18) -------------------------------------------------------------------------

/// kiln's defaults for every k3s role, in order.
const K3S_PERSIST: &[&str] = &[
    "/var/lib/rancher",
    "/var/lib/kubelet",
    "/etc/rancher/node",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
];

fn persist_of(dir: &std::path::Path, role: &str) -> Vec<String> {
    let project = kiln::project::recipe::load_project(dir).unwrap();
    kiln::project::recipe::load_role(&project, role)
        .unwrap()
        .persist
        .paths
}

/// Appends `text` to recipes/<name>.toml.
fn append(dir: &std::path::Path, name: &str, text: &str) {
    let p = dir.join(format!("recipes/{name}.toml"));
    let s = fs::read_to_string(&p).unwrap();
    fs::write(&p, format!("{s}\n{text}")).unwrap();
}

#[test]
fn persist_defaults_per_role() {
    let d = project_copy();
    assert_eq!(persist_of(d.path(), "worker"), K3S_PERSIST);
    assert_eq!(
        persist_of(d.path(), "master"),
        K3S_PERSIST,
        "etcd (/var/lib/rancher/k3s/server/db) is inside /var/lib/rancher"
    );
    let mut storage: Vec<&str> = K3S_PERSIST.to_vec();
    storage.push("/var/lib/longhorn");
    assert_eq!(persist_of(d.path(), "storage"), storage);
    // A role without k3s keeps nothing by default (cloud-init's state is not kept: see
    // DEFAULT_PERSIST_ALL).
    fs::write(
        d.path().join("recipes/gpu.toml"),
        "inherits = \"base\"\n[k3s]\nmode = \"none\"\n",
    )
    .unwrap();
    assert!(persist_of(d.path(), "gpu").is_empty());
}

#[test]
fn persist_paths_merge_along_inherits() {
    let d = project_copy();
    append(
        d.path(),
        "base",
        "[persist]\npaths = [\"/srv/base\", \"/srv/shared\", \"/var/lib/rancher\"]\n",
    );
    append(
        d.path(),
        "worker",
        "[persist]\npaths = [\"/srv/shared\", \"/srv/worker\"]\n",
    );
    let mut want: Vec<&str> = K3S_PERSIST.to_vec();
    want.extend(["/srv/base", "/srv/shared", "/srv/worker"]);
    assert_eq!(
        persist_of(d.path(), "worker"),
        want,
        "defaults, then parent first; a repeated path (also a default's) once"
    );
    // inspect shows the merged list (it is part of the hashed recipe).
    let o = kiln(d.path(), &["inspect", "--role", "worker", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["inputs"]["recipe"]["persist"]["paths"],
        serde_json::json!(want)
    );
}

#[test]
fn persist_defaults_false_drops_kilns_defaults() {
    let d = project_copy();
    append(
        d.path(),
        "worker",
        "[persist]\ndefaults = false\npaths = [\"/var/lib/rancher/k3s\"]\n",
    );
    assert_eq!(persist_of(d.path(), "worker"), ["/var/lib/rancher/k3s"]);
    // The child's choice wins over the parent's, like every scalar.
    let e = project_copy();
    append(e.path(), "base", "[persist]\ndefaults = false\n");
    assert!(persist_of(e.path(), "worker").is_empty());
    append(e.path(), "worker", "[persist]\ndefaults = true\n");
    assert_eq!(persist_of(e.path(), "worker"), K3S_PERSIST);
}

/// A worker recipe listing `paths` (TOML array items) is refused with `needle`.
fn persist_rejected(paths: &str, needle: &str) -> String {
    let d = project_copy();
    append(
        d.path(),
        "worker",
        &format!("[persist]\npaths = [{paths}]\n"),
    );
    let e = rejects(d.path(), "recipes/worker.toml", "persist.paths");
    assert!(e.contains(needle), "error does not say {needle:?}:\n{e}");
    e
}

#[test]
fn persist_paths_must_be_absolute_and_normalised() {
    persist_rejected("\"var/lib/x\"", "\"var/lib/x\" is not an absolute path");
    persist_rejected("\"/var/lib/x/\"", "ends with '/'");
    persist_rejected("\"/var//lib/x\"", "not normalised");
    persist_rejected("\"/var/lib/./x\"", "not normalised");
    persist_rejected("\"/var/lib/../x\"", "not normalised");
    persist_rejected("\"/\"", "root directory");
}

#[test]
fn persist_paths_are_plain_and_short() {
    persist_rejected("\"/srv/my data\"", "contains ' '");
    persist_rejected("\"/srv/$(reboot)\"", "contains '$'");
    persist_rejected("\"/srv/x;y\"", "contains ';'");
    persist_rejected("\"/srv/é\"", "contains 'é'");
    let long = format!("\"/srv/{}\"", "a".repeat(196));
    persist_rejected(&long, "201 bytes long");
    // 200 bytes is fine.
    let d = project_copy();
    let ok = format!("/srv/{}", "a".repeat(195));
    append(
        d.path(),
        "worker",
        &format!("[persist]\npaths = [\"{ok}\"]\n"),
    );
    assert!(persist_of(d.path(), "worker").contains(&ok));
}

#[test]
fn persist_paths_keep_out_of_the_system_and_the_image() {
    for (p, needle) in [
        ("/proc/x", "under /proc"),
        ("/sys", "is /sys"),
        ("/dev/shm", "under /dev"),
        ("/run/k3s", "under /run"),
        ("/tmp", "is /tmp"),
        ("/boot/efi", "under /boot"),
        ("/usr/local/bin", "under /usr"),
        ("/bin", "is /bin"),
        ("/sbin/x", "under /sbin"),
        ("/lib/modules", "under /lib"),
        ("/lib64", "is /lib64"),
        ("/efi", "is /efi"),
        ("/etc", "too broad"),
        ("/var", "too broad"),
    ] {
        persist_rejected(&format!("\"{p}\""), needle);
    }
}

#[test]
fn persist_paths_inside_another_are_refused() {
    let e = persist_rejected("\"/var/lib/rancher/k3s\"", "\"/var/lib/rancher/k3s\" (from");
    assert!(
        e.contains("inside kiln's default \"/var/lib/rancher\""),
        "{e}"
    );
    assert!(
        e.contains("defaults = false"),
        "the fix names the way out:\n{e}"
    );
    // A path that contains a default is reported the other way round.
    let e = persist_rejected(
        "\"/var/lib\"",
        "kiln's default \"/var/lib/rancher\" is inside \"/var/lib\"",
    );
    assert!(e.contains("recipes/worker.toml"), "{e}");
    // Between a recipe's own paths, both are named.
    let e = persist_rejected("\"/srv/a\", \"/srv/a/b\"", "\"/srv/a/b\" (from");
    assert!(e.contains("inside \"/srv/a\" (from"), "{e}");
    // A sibling with a common prefix is not inside.
    let d = project_copy();
    append(
        d.path(),
        "worker",
        "[persist]\npaths = [\"/var/lib/rancher2\"]\n",
    );
    assert!(persist_of(d.path(), "worker").contains(&"/var/lib/rancher2".to_string()));
}

#[test]
fn at_most_64_persist_paths() {
    // 6 defaults + 58 = 64 is fine; one more is refused.
    let list = |n: usize| {
        (0..n)
            .map(|i| format!("\"/srv/p{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let d = project_copy();
    append(
        d.path(),
        "worker",
        &format!("[persist]\npaths = [{}]\n", list(58)),
    );
    assert_eq!(persist_of(d.path(), "worker").len(), 64);
    persist_rejected(&list(59), "65 persistent paths");
}

#[test]
fn the_persist_list_changes_the_build_id() {
    let a = project_copy();
    let id = build_id(a.path(), "worker");
    let b = project_copy();
    append(b.path(), "worker", "[persist]\npaths = [\"/srv/worker\"]\n");
    let with_path = build_id(b.path(), "worker");
    assert_ne!(id, with_path, "a new persistent path is a new build");
    let c = project_copy();
    append(c.path(), "worker", "[persist]\ndefaults = false\n");
    assert_ne!(
        id,
        build_id(c.path(), "worker"),
        "dropping the defaults too"
    );
    // Listing a default again changes nothing: the merged list is what is hashed.
    let e = project_copy();
    append(
        e.path(),
        "worker",
        "[persist]\npaths = [\"/var/lib/kubelet\"]\n",
    );
    assert_eq!(id, build_id(e.path(), "worker"));
    // At the resolve level: the canonical inputs carry the list.
    let project = kiln::project::recipe::load_project(b.path()).unwrap();
    let r = kiln::pipeline::resolve::resolve(&project, "worker").unwrap();
    assert_eq!(r.build_id.as_str(), with_path);
    assert!(r
        .canonical_json()
        .contains("\"persist\":{\"paths\":[\"/var/lib/rancher\""));
}

/// The repository's own inventory (what `kiln build` builds out of the box) is the seeds'
/// cluster: three masters behind the VIP, workers, a storage and a gpu node; it validates,
/// every master gets a keepalived configuration and the same bootstrap (master-1 founds), and
/// every node's seed renders.
#[test]
fn default_inventory_is_the_seeds_ha_cluster() {
    let d = project_copy();
    fs::copy(
        repo_root().join("recipes/cluster.toml"),
        d.path().join("recipes/cluster.toml"),
    )
    .unwrap();
    let project = kiln::project::recipe::load_project(d.path()).unwrap();
    let roles = |r: &str| -> Vec<String> {
        project
            .cluster
            .nodes
            .iter()
            .filter(|n| n.role == r)
            .map(|n| n.hostname.clone())
            .collect()
    };
    assert_eq!(roles("master"), ["master-1", "master-2", "master-3"]);
    assert!(roles("worker").len() >= 2, "{:?}", roles("worker"));
    assert_eq!(roles("storage").len(), 1);
    assert_eq!(roles("gpu").len(), 1);
    let vip = kiln::pipeline::vip::vip(&project.cluster).expect("api_endpoint is a VIP");
    assert_eq!(vip.masters.len(), 3);
    let k = project.cluster.k3s.clone().unwrap();
    assert!(!k.bootstrapped, "the default must found the cluster once");
    let b = kiln::pipeline::k3s::bootstrap_script(&project.cluster, &k);
    assert!(b.contains("founder=\"master-1\"\n"));
    assert!(b.contains("probe=\"10.0.0.10 10.0.0.11 10.0.0.12 10.0.0.13\"\n"));
    for role in ["master", "worker", "storage", "gpu"] {
        kiln::project::recipe::load_role(&project, role)
            .unwrap_or_else(|e| panic!("{role}: {e:#}"));
    }
    let o = kiln(d.path(), &["seed"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for n in project.cluster.nodes.iter() {
        assert!(
            out.contains(&format!("### {} user-data", n.hostname)),
            "no seed for {}",
            n.hostname
        );
    }
    let o = kiln(d.path(), &["doctor"]);
    let e = stderr(&o);
    assert!(!e.contains("error"), "{e}");
}
