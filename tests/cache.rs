//! `kiln cache list|prune` on a cache laid out by hand (fast; needs mmdebstrap installed for
//! the base cache keys, which include its version).

mod common;
use common::*;
use std::fs;
use std::path::Path;

fn touch(p: &Path, bytes: &[u8]) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, bytes).unwrap();
}

fn hex(n: u8) -> String {
    sha256_hex(&[n])
}

#[test]
fn prune_removes_only_what_nothing_uses() {
    if !which("mmdebstrap") {
        skip(
            "prune_removes_only_what_nothing_uses",
            "mmdebstrap not installed",
        );
        return;
    }
    let d = project_copy();
    let dir = d.path();
    // A base two roles use: the master's is the worker's without the VIP's keepalived.
    without_vip(dir);
    let project = kiln::project::recipe::load_project(dir).unwrap();
    let worker = kiln::pipeline::resolve::resolve(&project, "worker").unwrap();
    let gpu = kiln::pipeline::resolve::resolve(&project, "gpu").unwrap();
    let worker_key = worker.base.cache_key().unwrap();
    let k3s_sha = worker.cluster.k3s.as_ref().unwrap().binary.sha256.clone();
    let deb_sha = gpu.recipe.debian.debs[0].sha256.clone();

    let cache = dir.join("out/cache");
    // In use: the worker's (and master's) base, the k3s binary, a gpu .deb, a role's index.
    touch(
        &cache.join("base").join(&worker_key).join("rootfs.tar"),
        b"tar",
    );
    touch(
        &cache.join("base").join(&worker_key).join("spec.json"),
        br#"{"suite":"bookworm","packages":["a","b"]}"#,
    );
    touch(&cache.join("sha256").join(&k3s_sha), b"k3s");
    touch(&cache.join("sha256").join(&deb_sha), b"deb");
    touch(&cache.join("squashfs-blocks/worker.json"), b"{}");
    touch(&cache.join("zstd-frames/gpu.json"), b"{}");
    // Recorded by a build still in out/: kept although no recipe pins it now.
    let old_pin = hex(1);
    let build = dir.join("out/worker").join(hex(2));
    touch(
        &build.join("manifest.json"),
        format!(r#"{{"role":"worker","build_id":"{}","inputs":{{"cluster":{{"k3s":{{"binary":{{"sha256":"{old_pin}"}}}}}}}}}}"#, hex(2)).as_bytes(),
    );
    touch(&cache.join("sha256").join(&old_pin), b"old k3s");
    // Unused: an old base, an unpinned artifact, a killed download and base build, a removed
    // role's index.
    let old_base = hex(3);
    touch(
        &cache.join("base").join(&old_base).join("rootfs.tar"),
        &vec![7u8; 64 << 10],
    );
    touch(&cache.join("base").join(&old_base).join("spec.json"), b"{}");
    touch(&cache.join("sha256").join(hex(4)), b"unused");
    touch(
        &cache.join("sha256").join(format!(".partial-{}", hex(5))),
        b"half",
    );
    touch(
        &cache
            .join("base")
            .join(format!(".tmp-base-{}-abc", hex(6)))
            .join("rootfs.tar"),
        b"x",
    );
    touch(&cache.join("squashfs-blocks/oldrole.json"), b"{}");
    // A base build in progress elsewhere (its lock held): left alone.
    let busy = hex(8);
    touch(
        &cache
            .join("base")
            .join(format!(".tmp-base-{busy}-xyz"))
            .join("rootfs.tar"),
        b"y",
    );
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.join("base").join(format!(".lock-{busy}")))
        .unwrap();
    lock.try_lock().unwrap();
    // Not kiln's.
    touch(&cache.join("NOTES.txt"), b"mine");

    let list = kiln(dir, &["cache", "list", "--json"]);
    assert!(list.status.success(), "{}", stderr(&list));
    let v: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let by_path = |p: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| e["path"] == p)
            .unwrap_or_else(|| panic!("{p} not listed: {v:#}"))
            .clone()
    };
    let e = by_path(&format!("base/{worker_key}"));
    assert_eq!(e["used_by"], serde_json::json!(["master", "worker"]));
    assert_eq!(e["about"], "bookworm, 2 packages");
    assert_eq!(
        by_path(&format!("sha256/{old_pin}"))["used_by"][0],
        format!("build worker/{}", &hex(2)[..12])
    );
    assert_eq!(
        by_path(&format!("sha256/{deb_sha}"))["used_by"],
        serde_json::json!(["gpu"])
    );
    assert_eq!(by_path("NOTES.txt")["kind"], "other");
    assert_eq!(
        by_path(&format!("base/.tmp-base-{busy}-xyz"))["removable"],
        false
    );

    let removable = [
        format!("base/{old_base}"),
        format!("sha256/{}", hex(4)),
        format!("sha256/.partial-{}", hex(5)),
        format!("base/.tmp-base-{}-abc", hex(6)),
        "squashfs-blocks/oldrole.json".to_string(),
    ];
    let kept = [
        format!("base/{worker_key}"),
        format!("sha256/{k3s_sha}"),
        format!("sha256/{deb_sha}"),
        format!("sha256/{old_pin}"),
        "squashfs-blocks/worker.json".to_string(),
        "zstd-frames/gpu.json".to_string(),
        format!("base/.tmp-base-{busy}-xyz"),
        "NOTES.txt".to_string(),
    ];

    // --dry-run names them and removes nothing.
    let dry = kiln(dir, &["cache", "prune", "--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let out = stdout(&dry);
    for p in &removable {
        assert!(out.contains(&format!("would remove {p} (")), "{p}:\n{out}");
        assert!(cache.join(p).exists(), "dry run removed {p}");
    }
    for p in &kept {
        assert!(
            !out.contains(&format!(" {p} (")),
            "{p} would be removed:\n{out}"
        );
    }

    let pr = kiln(dir, &["cache", "prune", "--json"]);
    assert!(pr.status.success(), "{}", stderr(&pr));
    let r: serde_json::Value = serde_json::from_slice(&pr.stdout).unwrap();
    assert_eq!(
        r["removed"].as_array().unwrap().len(),
        removable.len(),
        "{r:#}"
    );
    assert!(r["freed_bytes"].as_u64().unwrap() >= 64 << 10);
    for p in &removable {
        assert!(!cache.join(p).exists(), "{p} not removed");
    }
    for p in &kept {
        assert!(cache.join(p).exists(), "{p} removed");
    }
    // Nothing left to remove.
    let again = kiln(dir, &["cache", "prune"]);
    assert!(
        stdout(&again).contains("removed 0 entries"),
        "{}",
        stdout(&again)
    );
    drop(lock);
}

#[test]
fn prune_refuses_when_a_recipe_is_broken() {
    let d = project_copy();
    let dir = d.path();
    let stray = dir.join("out/cache/sha256").join(hex(9));
    touch(&stray, b"x");
    edit(dir, "recipes/storage.toml", "packages = [", "pakages = [");
    let o = kiln(dir, &["cache", "prune"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("recipes/storage.toml"),
        "{}",
        stderr(&o)
    );
    assert!(
        stray.exists(),
        "removed something although the project does not resolve"
    );
}
