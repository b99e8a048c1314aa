//! Cross-checks kiln's keys and sealed secrets against an independent Python implementation
//! (tests/seal_crosscheck.py, Python `cryptography` + PyYAML). Skipped when those are missing.

use kiln::trust::keys;
use kiln::trust::seal;
use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/seal_crosscheck.py")
}

fn python_ready() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import cryptography, yaml"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: python cryptography not installed (pip install cryptography pyyaml)");
    }
    ok
}

fn run(args: &[&Path]) -> (bool, String, String) {
    let out = Command::new("python3")
        .arg(script())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const SECRET: &str = r#"
apiVersion: v1
kind: Secret
metadata:
  name: db
  namespace: prod
  labels: {app: db}
  annotations:
    note: keep
    kubectl.kubernetes.io/last-applied-configuration: '{"stringData":{"password":"hunter2"}}'
type: Opaque
data:
  password: aHVudGVyMg==
  blob: AAEC/w==
stringData:
  user: admin
  empty: ""
"#;

#[test]
fn python_decrypts_what_kiln_seals_and_kiln_unseals_what_python_seals() {
    if !python_ready() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let kd = d.path().join("keys");
    // Real key size: the format check expects a 512-byte RSA block.
    keys::init(&kd, "lab", false).unwrap();
    let p = keys::KeyPaths::new(&kd);
    let cert = std::fs::read_to_string(&p.sealed_secrets_cert).unwrap();
    let key = std::fs::read_to_string(&p.sealed_secrets_key).unwrap();
    let secret_path = d.path().join("secret.yaml");
    std::fs::write(&secret_path, SECRET).unwrap();

    for scope in ["strict", "namespace-wide", "cluster-wide"] {
        let sealed = seal::seal(SECRET, &cert, Some(scope.parse().unwrap())).unwrap();
        let sealed_path = d.path().join(format!("sealed-{scope}.yaml"));
        std::fs::write(&sealed_path, &sealed).unwrap();
        let (ok, out, err) = Command::new("python3")
            .arg(script())
            .args([&sealed_path, &p.sealed_secrets_key, &secret_path])
            .args(["--scope", scope])
            .output()
            .map(|o| {
                (
                    o.status.success(),
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                )
            })
            .unwrap();
        assert!(ok, "{scope}: {out}{err}\n{sealed}");

        // And the reverse: Python seals, kiln unseals.
        let (ok, py_sealed, err) = Command::new("python3")
            .arg(script())
            .args([Path::new("--seal"), &secret_path, &p.sealed_secrets_cert])
            .args(["--scope", scope])
            .output()
            .map(|o| {
                (
                    o.status.success(),
                    String::from_utf8_lossy(&o.stdout).into_owned(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                )
            })
            .unwrap();
        assert!(ok, "{err}");
        let back = seal::unseal(&py_sealed, &key).unwrap();
        assert!(back.contains("password: aHVudGVyMg=="), "{back}");
        assert!(back.contains("user: YWRtaW4="), "{back}");
        assert!(back.contains("blob: AAEC/w=="), "{back}");
    }

    // A SealedSecret whose values were sealed for another key fails the Python check.
    let d2 = tempfile::tempdir().unwrap();
    keys::init_with_rsa_bits(d2.path(), "other", false, 2048).unwrap();
    let other_cert =
        std::fs::read_to_string(keys::KeyPaths::new(d2.path()).sealed_secrets_cert).unwrap();
    let wrong = d.path().join("wrong.yaml");
    std::fs::write(&wrong, seal::seal(SECRET, &other_cert, None).unwrap()).unwrap();
    let (ok, _, err) = run(&[&wrong, &p.sealed_secrets_key, &secret_path]);
    assert!(!ok && err.contains("cannot decrypt"), "{err}");
}

#[test]
fn python_validates_the_key_files_and_agrees_on_fingerprints() {
    if !python_ready() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    keys::init_with_rsa_bits(d.path(), "lab", false, 2048).unwrap();
    let (ok, out, err) = run(&[Path::new("--check-keys"), d.path()]);
    assert!(ok, "{out}{err}");
    let py: serde_json::Value = serde_json::from_str(&out).unwrap();
    let show = keys::show(d.path()).unwrap();
    let fp = |n: &str| {
        show.iter()
            .find(|i| i.name == n)
            .unwrap()
            .fingerprint
            .clone()
    };
    assert_eq!(py["ssh"], fp("ssh_ed25519.pub"));
    assert_eq!(py["signing"], fp("signing_ed25519.pub"));
    assert_eq!(py["cert"], fp("sealed-secrets.crt"));
    assert_eq!(py["sealed_key"], fp("sealed-secrets.key"));

    // ssh-keygen agrees too, when present.
    if let Ok(o) = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(d.path().join("ssh_ed25519.pub"))
        .output()
    {
        if o.status.success() {
            let line = String::from_utf8_lossy(&o.stdout).into_owned();
            assert!(line.contains(&fp("ssh_ed25519")), "{line}");
            assert!(line.contains("kiln@lab"), "{line}");
        }
    }
}
