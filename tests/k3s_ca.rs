//! The cluster's k3s CAs in keys/ (issue 19): what `kiln keys init` makes, checked with
//! openssl; the secure token that pins the server CA; `kiln kubeconfig` verified against the
//! client CA; the master image's CA files and their installer (fast; no root).

mod common;
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn openssl(args: &[&str]) -> (bool, String) {
    let o = Command::new("openssl").args(args).output().unwrap();
    (o.status.success(), stdout(&o) + &stderr(&o))
}

fn have_openssl() -> bool {
    if which("openssl") {
        return true;
    }
    println!("SKIP: openssl is not installed (apt-get install openssl)");
    false
}

/// The k3s layer of `role` (with the stand-in binary and the project's token).
fn k3s_layer(p: &kiln::project::recipe::Project, role: &str) -> kiln::pipeline::k3s::Layer {
    let recipe = kiln::project::recipe::load_role(p, role).unwrap();
    let fetched = kiln::pipeline::k3s::Fetched {
        binary: repo_root().join("tests/standin/k3s"),
        ..Default::default()
    };
    let token = kiln::pipeline::resolve::read_token(p).unwrap();
    kiln::pipeline::k3s::layer(p, &recipe, &fetched, &token).unwrap()
}

#[test]
fn keys_init_makes_the_k3s_ca_set_with_modes_and_valid_cas() {
    let d = tempfile::tempdir().unwrap();
    let keys = d.path().join("keys");
    kiln::trust::keys::init_with_rsa_bits(&keys, "homelab", false, 2048).unwrap();
    for f in kiln::trust::k3s_ca::FILES {
        let p = keys.join(f.key_name);
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode,
            if f.private { 0o600 } else { 0o644 },
            "{}",
            f.key_name
        );
    }
    // keys/.gitignore keeps the private halves out of git, the certificates in.
    let g = fs::read_to_string(keys.join(".gitignore")).unwrap();
    assert!(g.contains("!*.crt") && g.lines().next().is_some());
    if !have_openssl() {
        return;
    }
    for f in kiln::trust::k3s_ca::FILES.iter().filter(|f| !f.private) {
        let p = keys.join(f.key_name);
        let p = p.to_str().unwrap();
        let (ok, text) = openssl(&["x509", "-in", p, "-noout", "-text"]);
        assert!(ok, "{text}");
        assert!(text.contains("CA:TRUE"), "{}: {text}", f.key_name);
        assert!(text.contains("prime256v1"), "{}: {text}", f.key_name);
        assert!(text.contains("Certificate Sign"), "{}: {text}", f.key_name);
        // Self-signed CAs: each verifies against itself.
        let (ok, text) = openssl(&["verify", "-CAfile", p, p]);
        assert!(ok, "{}: {text}", f.key_name);
        // The private key belongs to the certificate.
        let key = keys.join(f.key_name.replace(".crt", ".key"));
        let (_, a) = openssl(&["x509", "-in", p, "-noout", "-pubkey"]);
        let (_, b) = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]);
        assert_eq!(a, b, "{} and its key", f.key_name);
    }
    let (ok, text) = openssl(&[
        "rsa",
        "-in",
        keys.join("k3s-service.key").to_str().unwrap(),
        "-check",
        "-noout",
    ]);
    assert!(ok && text.contains("RSA key ok"), "{text}");
    // `kiln keys show` lists them, never their secrets.
    let infos = kiln::trust::keys::show(&keys).unwrap();
    let ca = infos
        .iter()
        .find(|i| i.name == "k3s-server-ca.crt")
        .unwrap();
    assert!(
        ca.kind.contains("ECDSA") && ca.kind.contains("k3s-server-ca@"),
        "{ca:?}"
    );
    let key = fs::read_to_string(keys.join("k3s-server-ca.key")).unwrap();
    assert!(infos.iter().all(|i| !i.fingerprint.contains(key.trim())));
}

#[test]
fn add_missing_adds_the_cas_to_an_older_project_and_keeps_the_rest() {
    let d = tempfile::tempdir().unwrap();
    let keys = d.path().join("keys");
    kiln::trust::keys::init_with_rsa_bits(&keys, "homelab", false, 2048).unwrap();
    let token = fs::read(keys.join("k3s-token")).unwrap();
    for f in kiln::trust::k3s_ca::FILES {
        fs::remove_file(keys.join(f.key_name)).unwrap();
    }
    let w = kiln::trust::keys::add_missing(&keys, "homelab", 2048).unwrap();
    assert_eq!(w.len(), kiln::trust::k3s_ca::FILES.len(), "{w:?}");
    assert_eq!(fs::read(keys.join("k3s-token")).unwrap(), token);
    // Half a CA set is refused, not completed with a mismatched half.
    fs::remove_file(keys.join("k3s-client-ca.key")).unwrap();
    let e = kiln::trust::keys::add_missing(&keys, "homelab", 2048).unwrap_err();
    assert!(format!("{e:#}").contains("k3s-client-ca.key"), "{e:#}");
}

/// The token every node gets is k3s's secure form, pinning keys/' server CA.
#[test]
fn the_token_pins_the_server_ca() {
    let d = project_copy();
    let p = kiln::project::recipe::load_project(d.path()).unwrap();
    let t = kiln::pipeline::resolve::read_token(&p).unwrap();
    let ca = fs::read(d.path().join("keys/k3s-server-ca.crt")).unwrap();
    let secret = fs::read_to_string(d.path().join("keys/k3s-token")).unwrap();
    assert_eq!(
        t,
        format!(
            "K10{}::server:{}",
            kiln::sys::util::sha256_hex(&ca),
            secret.trim()
        )
    );
    // The same keys: the same token (and so the same build ids) every time.
    assert_eq!(t, kiln::pipeline::resolve::read_token(&p).unwrap());
    // Without the CA: a user error naming the file and the fix.
    fs::remove_file(d.path().join("keys/k3s-server-ca.crt")).unwrap();
    let o = kiln(d.path(), &["build", "--role", "worker"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("k3s-server-ca.crt") && stderr(&o).contains("--add-missing"),
        "{}",
        stderr(&o)
    );
}

/// The master layer carries the CA files for k3s's server/tls/ and the installer before k3s
/// starts; agents carry none of it.
#[test]
fn masters_carry_the_cas_and_agents_do_not() {
    let d = project_copy();
    let p = kiln::project::recipe::load_project(d.path()).unwrap();
    let master = kiln::project::recipe::load_role(&p, "master").unwrap();
    let token = kiln::pipeline::resolve::read_token(&p).unwrap();
    let m = k3s_layer(&p, "master");
    for f in kiln::trust::k3s_ca::FILES {
        let path = format!("{}/{}", kiln::pipeline::k3s::CA_DIR, f.tls_path);
        let e = m
            .entries
            .get(&path)
            .unwrap_or_else(|| panic!("{path} missing"));
        match e {
            kiln::pipeline::compose::Upper::File { data, mode, .. } => {
                assert_eq!(
                    *data,
                    fs::read(d.path().join("keys").join(f.key_name)).unwrap()
                );
                assert_eq!(*mode, if f.private { 0o600 } else { 0o644 }, "{path}");
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    assert!(m.contains_secrets);
    let dropin = kiln::pipeline::k3s::unit_dropin(master.k3s.mode);
    assert!(
        dropin.contains("ExecStartPre=/usr/lib/kiln/kiln-k3s-ca"),
        "{dropin}"
    );
    let w = k3s_layer(&p, "worker");
    assert!(!w.entries.keys().any(|k| k.contains("k3s-ca")));
    assert_eq!(
        w.entries.get(kiln::pipeline::k3s::TOKEN).map(|e| match e {
            kiln::pipeline::compose::Upper::File { data, .. } =>
                String::from_utf8_lossy(data).into_owned(),
            _ => String::new(),
        }),
        Some(format!("{token}\n")),
        "the agent's token is the secure one"
    );
}

/// The installer, run for real against a scratch root: an empty tls directory gets every file
/// with its mode; a second run leaves them; a tls directory with another CA is left alone and
/// reported.
#[test]
fn the_ca_installer_fills_only_an_empty_tls_directory() {
    let d = project_copy();
    let p = kiln::project::recipe::load_project(d.path()).unwrap();
    let m = k3s_layer(&p, "master");
    let root = tempfile::tempdir().unwrap();
    for (path, e) in &m.entries {
        if let kiln::pipeline::compose::Upper::File { data, mode, .. } = e {
            if path.starts_with("usr/lib/kiln/") {
                let t = root.path().join(path);
                fs::create_dir_all(t.parent().unwrap()).unwrap();
                fs::write(&t, data).unwrap();
                fs::set_permissions(&t, fs::Permissions::from_mode(*mode)).unwrap();
            }
        }
    }
    // The script's absolute paths, moved under the scratch root.
    let script_text = fs::read_to_string(root.path().join(kiln::pipeline::k3s::CA_SCRIPT)).unwrap();
    let script = script_text
        .clone()
        .replace(
            "/usr/lib/kiln/",
            &format!("{}/usr/lib/kiln/", root.path().display()),
        )
        .replace(
            "/var/lib/rancher/",
            &format!("{}/var/lib/rancher/", root.path().display()),
        );
    let run = || {
        let o = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    let out = run();
    assert!(out.contains("CAs from keys/ (by image) are in"), "{out}");
    let tls = root.path().join("var/lib/rancher/k3s/server/tls");
    for f in kiln::trust::k3s_ca::FILES {
        let t = tls.join(f.tls_path);
        assert_eq!(
            fs::read(&t).unwrap(),
            fs::read(d.path().join("keys").join(f.key_name)).unwrap(),
            "{}",
            f.tls_path
        );
        let mode = fs::metadata(&t).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            mode,
            if f.private { 0o600 } else { 0o644 },
            "{}",
            f.tls_path
        );
    }
    assert_eq!(run(), "", "a second start changes nothing");
    // A node whose k3s made its own CA: kept, reported.
    fs::write(tls.join("server-ca.crt"), "another CA\n").unwrap();
    let out = run();
    assert!(out.contains("not the cluster's CA from keys/"), "{out}");
    assert_eq!(
        fs::read_to_string(tls.join("server-ca.crt")).unwrap(),
        "another CA\n"
    );

    // From the seed (token_delivery = "seed"): the initramfs put the seed's kiln-k3s-* files
    // in /run/kiln/identity/k3s-ca without the prefix.
    let root = tempfile::tempdir().unwrap();
    let from = root.path().join("run/kiln/identity/k3s-ca");
    fs::create_dir_all(&from).unwrap();
    for f in kiln::trust::k3s_ca::FILES {
        fs::copy(
            d.path().join("keys").join(f.key_name),
            from.join(f.key_name),
        )
        .unwrap();
    }
    let script = script_text
        .replace(
            "/usr/lib/kiln/",
            &format!("{}/usr/lib/kiln/", root.path().display()),
        )
        .replace(
            "/run/kiln/",
            &format!("{}/run/kiln/", root.path().display()),
        )
        .replace(
            "/var/lib/rancher/",
            &format!("{}/var/lib/rancher/", root.path().display()),
        );
    let o = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("(by seed) are in"), "{}", stdout(&o));
    let tls = root.path().join("var/lib/rancher/k3s/server/tls");
    for f in kiln::trust::k3s_ca::FILES {
        assert_eq!(
            fs::read(tls.join(f.tls_path)).unwrap(),
            fs::read(d.path().join("keys").join(f.key_name)).unwrap(),
            "{}",
            f.tls_path
        );
    }
}

/// `kiln kubeconfig`: a client certificate for the user and groups asked for, signed by the
/// client CA (openssl verifies the chain, and refuses it against the server CA), the server CA
/// as the trusted authority, the API endpoint as server, mode 0600; a bad --expires exits 2.
#[test]
fn kubeconfig_is_made_offline_and_verifies_against_the_client_ca() {
    let d = project_copy();
    let out = d.path().join("admin.kubeconfig");
    let o = kiln(
        d.path(),
        &[
            "kubeconfig",
            "--user",
            "alice",
            "--group",
            "ops",
            "--expires",
            "2d",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let y: serde_yaml::Value = serde_yaml::from_str(&fs::read_to_string(&out).unwrap()).unwrap();
    let p = kiln::project::recipe::load_project(d.path()).unwrap();
    assert_eq!(
        y["clusters"][0]["cluster"]["server"].as_str(),
        p.cluster.server_url().as_deref()
    );
    assert_eq!(
        y["current-context"].as_str(),
        Some(p.cluster.section.name.as_str())
    );
    use base64::Engine as _;
    let dec = |v: &serde_yaml::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    };
    assert_eq!(
        dec(&y["clusters"][0]["cluster"]["certificate-authority-data"]),
        fs::read(d.path().join("keys/k3s-server-ca.crt")).unwrap()
    );
    let crt = d.path().join("client.crt");
    fs::write(&crt, dec(&y["users"][0]["user"]["client-certificate-data"])).unwrap();
    let key = d.path().join("client.key");
    fs::write(&key, dec(&y["users"][0]["user"]["client-key-data"])).unwrap();
    if !have_openssl() {
        return;
    }
    let ca = d.path().join("keys/k3s-client-ca.crt");
    let (ok, text) = openssl(&[
        "verify",
        "-purpose",
        "sslclient",
        "-CAfile",
        ca.to_str().unwrap(),
        crt.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let (ok, _) = openssl(&[
        "verify",
        "-CAfile",
        d.path().join("keys/k3s-server-ca.crt").to_str().unwrap(),
        crt.to_str().unwrap(),
    ]);
    assert!(!ok, "the client certificate verified against the server CA");
    let (_, subject) = openssl(&[
        "x509",
        "-in",
        crt.to_str().unwrap(),
        "-noout",
        "-subject",
        "-enddate",
    ]);
    assert!(subject.contains("subject=O = ops, CN = alice"), "{subject}");
    // Valid for two days (not a year): it ends within 49 hours.
    let (ok, _) = openssl(&[
        "x509",
        "-in",
        crt.to_str().unwrap(),
        "-noout",
        "-checkend",
        &(49 * 3600).to_string(),
    ]);
    assert!(!ok, "the certificate outlives --expires 2d");
    let (ok, _) = openssl(&[
        "x509",
        "-in",
        crt.to_str().unwrap(),
        "-noout",
        "-checkend",
        &(47 * 3600).to_string(),
    ]);
    assert!(ok, "the certificate ends before --expires 2d");
    // The key belongs to the certificate.
    let (_, a) = openssl(&["x509", "-in", crt.to_str().unwrap(), "-noout", "-pubkey"]);
    let (_, b) = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]);
    assert_eq!(a, b);

    for bad in ["0d", "11y", "5w", "x"] {
        let o = kiln(d.path(), &["kubeconfig", "--expires", bad]);
        assert_eq!(o.status.code(), Some(2), "--expires {bad}: {}", stderr(&o));
    }
}

/// With `token_delivery = "seed"` the master image carries no CA (only the installer) and
/// the masters' seeds carry them; agents' seeds do not.
#[test]
fn with_seed_delivery_the_cas_travel_in_the_masters_seeds() {
    let d = project_copy();
    edit(
        d.path(),
        "recipes/cluster.toml",
        "bootstrapped = false",
        "bootstrapped = false\ntoken_delivery = \"seed\"",
    );
    let p = kiln::project::recipe::load_project(d.path()).unwrap();
    let m = k3s_layer(&p, "master");
    assert!(m.entries.contains_key(kiln::pipeline::k3s::CA_SCRIPT));
    assert!(
        !m.entries
            .keys()
            .any(|k| k.starts_with(kiln::pipeline::k3s::CA_DIR)),
        "the image carries a CA"
    );
    let out = d.path().join("seeds");
    let o = kiln(d.path(), &["seed", "-o", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (f, name) in kiln::trust::k3s_ca::FILES
        .iter()
        .zip(kiln::trust::k3s_ca::SEED_FILES)
    {
        let got = fs::read(out.join("master-1").join(name)).unwrap();
        assert_eq!(
            got,
            fs::read(d.path().join("keys").join(f.key_name)).unwrap()
        );
        assert!(
            !out.join("worker-1").join(name).exists(),
            "{name} in an agent's seed"
        );
        if f.private {
            let mode = fs::metadata(out.join("master-1").join(name))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{name}");
        }
    }
}

#[test]
fn seed_names_follow_the_keys_names() {
    for (f, s) in kiln::trust::k3s_ca::FILES
        .iter()
        .zip(kiln::trust::k3s_ca::SEED_FILES)
    {
        assert_eq!(s, format!("kiln-{}", f.key_name));
    }
}
