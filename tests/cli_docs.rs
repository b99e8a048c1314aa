//! The command reference in docs/cmd/ is generated from the clap definitions (`kiln docs`); this
//! fails when a page is stale, missing or left over, and checks the shell completions.

mod common;

use common::{kiln, repo_root, stderr, stdout};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

fn pages(dir: &Path) -> BTreeMap<String, String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "md") && p.file_name().unwrap() != "README.md"
        })
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read_to_string(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn command_reference_is_current() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("cmd");
    let man = d.path().join("man");
    let o = kiln(
        d.path(),
        &[
            "docs",
            "--out",
            out.to_str().unwrap(),
            "--man",
            man.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let fresh = pages(&out);
    let committed = pages(&repo_root().join("docs/cmd"));
    assert!(fresh.contains_key("kiln-build.md") && fresh.contains_key("kiln-proxmox-import.md"));
    let stale: Vec<&String> = fresh
        .keys()
        .chain(committed.keys())
        .filter(|k| fresh.get(*k) != committed.get(*k))
        .collect();
    assert!(
        stale.is_empty(),
        "docs/cmd is stale ({stale:?}): run `cargo run -- docs --out docs/cmd` and commit the result"
    );
    // One man page per page, each a roff document naming its command.
    for name in fresh.keys() {
        let m = fs::read_to_string(man.join(name.replace(".md", ".1"))).unwrap();
        assert!(
            m.starts_with(".ie") || m.contains(".TH"),
            "{name}: not a man page"
        );
    }
}

#[test]
fn shell_completions() {
    let d = tempfile::tempdir().unwrap();
    for (shell, marker) in [
        ("bash", "_kiln()"),
        ("zsh", "#compdef kiln"),
        ("fish", "complete -c kiln"),
    ] {
        let o = kiln(d.path(), &["completions", shell]);
        assert!(o.status.success(), "{shell}: {}", stderr(&o));
        let s = stdout(&o);
        assert!(s.contains(marker), "{shell}: no {marker:?} in\n{s}");
        for sub in ["build", "serve", "proxmox", "verify"] {
            assert!(s.contains(sub), "{shell}: {sub} missing");
        }
    }
    let o = kiln(d.path(), &["completions", "tcsh"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}
