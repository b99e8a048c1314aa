//! The module graph follows the layers of docs/design/layers.md: every `crate::<layer>` path in
//! a file of src/<layer>/ names the same layer or one below it. Test code (`mod tests`) is
//! checked too: it lives in the product's files.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// Each layer and the layers it may use (besides itself).
const ALLOWED: &[(&str, &[&str])] = &[
    (
        "cli",
        &[
            "bench", "deliver", "pipeline", "trust", "project", "formats", "sys",
        ],
    ),
    (
        "bench",
        &["deliver", "pipeline", "trust", "project", "formats", "sys"],
    ),
    (
        "deliver",
        &["pipeline", "trust", "project", "formats", "sys"],
    ),
    ("pipeline", &["trust", "project", "formats", "sys"]),
    ("trust", &["project", "formats", "sys"]),
    ("project", &["sys"]),
    ("formats", &["sys"]),
    ("sys", &[]),
    // Test support may use anything; nothing in the product uses it outside cfg(test).
    (
        "testing",
        &[
            "cli", "bench", "deliver", "pipeline", "trust", "project", "formats", "sys",
        ],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn imports_point_down_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    let mut seen_layers = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let Some(layer) = rel.components().next().and_then(|c| c.as_os_str().to_str()) else {
            continue;
        };
        let Some(ok) = allowed.get(layer) else {
            // lib.rs and main.rs sit above every layer.
            assert!(
                ["lib.rs", "main.rs"].contains(&layer),
                "{}: a file outside the layers; add its folder to ALLOWED and docs/design/layers.md",
                rel.display()
            );
            continue;
        };
        seen_layers += 1;
        let text = fs::read_to_string(f).unwrap();
        // Test support is only reachable under cfg(test) from the product's files.
        let product = match text.find("#[cfg(test)]\nmod tests") {
            Some(i) => &text[..i],
            None => &text[..],
        };
        for (n, line) in product.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                rest = &rest[i + "crate::".len()..];
                let used: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if used.is_empty() || used == layer || !allowed.contains_key(used.as_str()) {
                    continue;
                }
                if !ok.contains(&used.as_str()) {
                    bad.push(format!(
                        "{}:{}: {layer} uses {used}: {}",
                        rel.display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        seen_layers > 50,
        "found only {seen_layers} files under src/<layer>/"
    );
    assert!(
        bad.is_empty(),
        "imports against the layers:\n{}",
        bad.join("\n")
    );
}
