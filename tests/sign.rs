//! `kiln verify` through the binary, and SSHSIG interoperability with the real `ssh-keygen`.

mod signing;

use signing::*;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};

/// A project dir with keys/ (seed 1) and a signed output dir `out` with three files.
fn fixture() -> (tempfile::TempDir, ed25519_dalek::SigningKey) {
    let d = tempfile::tempdir().unwrap();
    let key = test_key(1);
    write_keys(&d.path().join("keys"), &key);
    let big: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 251) as u8).collect();
    make_signed_dir(
        &d.path().join("out"),
        &[
            ("disk.raw", &big),
            ("manifest.json", b"{}\n"),
            ("user-data", b"#cloud-config\n"),
        ],
        &key,
    );
    (d, key)
}

fn verify(d: &Path, extra: &[&str]) -> (i32, String, String) {
    let dir = d.to_str().unwrap();
    let out = d.join("out");
    let mut args = vec!["--dir", dir, "verify", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn verify_accepts_a_signed_dir_and_lists_files() {
    let (d, _) = fixture();
    let (code, stdout, stderr) = verify(d.path(), &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    for l in [
        "OK        disk.raw (5242880 bytes)",
        "OK        manifest.json (3 bytes)",
        "OK        user-data (14 bytes)",
    ] {
        assert!(stdout.contains(l), "{stdout}");
    }
    assert!(stdout.contains("namespace kiln, sha512"), "{stdout}");

    let (code, stdout, _) = verify(d.path(), &["--json"]);
    assert_eq!(code, 0);
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(j["ok"], true);
    assert_eq!(j["files"][0]["name"], "disk.raw");
    assert_eq!(j["files"][0]["size"], 5 << 20);
    assert_eq!(j["unlisted"].as_array().unwrap().len(), 0);
}

#[test]
fn signature_is_bit_identical_across_runs() {
    let (a, key) = fixture();
    let (b, _) = fixture();
    let sig_a = fs::read(a.path().join("out/SHA256SUMS.sig")).unwrap();
    assert_eq!(
        sig_a,
        fs::read(b.path().join("out/SHA256SUMS.sig")).unwrap()
    );
    kiln::trust::sign::sign_dir(&a.path().join("out"), &key).unwrap();
    assert_eq!(
        sig_a,
        fs::read(a.path().join("out/SHA256SUMS.sig")).unwrap()
    );
}

fn assert_fails(d: &Path, extra: &[&str], needles: &[&str]) {
    let (code, stdout, stderr) = verify(d, extra);
    assert_eq!(code, 3, "stdout:\n{stdout}\nstderr:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in:\n{stderr}");
    }
}

#[test]
fn tampered_sums_is_refused() {
    let (d, _) = fixture();
    let sums = d.path().join("out/SHA256SUMS");
    let text = fs::read_to_string(&sums).unwrap();
    // Point the list at a different digest for user-data: the signature must catch it.
    let (first, rest) = text.split_at(1);
    let c = if first == "0" { "1" } else { "0" };
    fs::write(&sums, format!("{c}{rest}")).unwrap();
    assert_fails(
        d.path(),
        &[],
        &["SHA256SUMS.sig", "signature does not match", "SHA256SUMS"],
    );
}

#[test]
fn tampered_file_is_refused_by_name() {
    let (d, _) = fixture();
    let p = d.path().join("out/disk.raw");
    let mut b = fs::read(&p).unwrap();
    b[4096] ^= 1;
    fs::write(&p, b).unwrap();
    let (code, stdout, stderr) = verify(d.path(), &[]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stdout.contains("CHANGED   disk.raw"), "{stdout}");
    assert!(stdout.contains("OK        user-data"), "{stdout}");
    assert!(
        stderr.contains("disk.raw was changed after signing"),
        "{stderr}"
    );
}

#[test]
fn extra_file_is_refused_by_name() {
    let (d, _) = fixture();
    fs::write(d.path().join("out/backdoor.sh"), "#!/bin/sh\n").unwrap();
    // A `latest` symlink is allowed.
    std::os::unix::fs::symlink(".", d.path().join("out/latest")).unwrap();
    assert_fails(d.path(), &[], &["backdoor.sh is not listed in SHA256SUMS"]);
}

#[test]
fn missing_file_is_refused_by_name() {
    let (d, _) = fixture();
    fs::remove_file(d.path().join("out/manifest.json")).unwrap();
    assert_fails(
        d.path(),
        &[],
        &["manifest.json is listed in SHA256SUMS but missing"],
    );
}

#[test]
fn wrong_key_is_refused() {
    let (d, _) = fixture();
    let other = d.path().join("other.pub");
    let (_, public) = kiln::trust::keys::encode_signing_key(&test_key(2)).unwrap();
    fs::write(&other, public).unwrap();
    let fp = kiln::trust::sign::fingerprint(&test_key(1).verifying_key());
    assert_fails(
        d.path(),
        &["--key", other.to_str().unwrap()],
        &["SHA256SUMS.sig", "signed by key", &fp],
    );
}

#[test]
fn missing_signature_is_refused() {
    let (d, _) = fixture();
    fs::remove_file(d.path().join("out/SHA256SUMS.sig")).unwrap();
    assert_fails(d.path(), &[], &["SHA256SUMS.sig: missing"]);
}

#[test]
fn missing_public_key_says_how_to_fix() {
    let (d, _) = fixture();
    fs::remove_file(d.path().join("keys/signing_ed25519.pub")).unwrap();
    let (code, _, stderr) = verify(d.path(), &[]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("signing_ed25519.pub") && stderr.contains("kiln keys init"),
        "{stderr}"
    );
}

#[test]
fn keys_show_prints_the_allowed_signers_line() {
    let (d, key) = fixture();
    let (code, stdout, stderr) = run(&["--dir", d.path().to_str().unwrap(), "keys", "show"]);
    assert_eq!(code, 0, "{stderr}");
    let want = kiln::trust::sign::allowed_signers_line(&key.verifying_key());
    assert!(
        stdout.contains(&format!("allowed_signers: {want}\n")),
        "{stdout}"
    );
    let (_, stdout, _) = run(&[
        "--dir",
        d.path().to_str().unwrap(),
        "keys",
        "show",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let entry = j
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "signing_ed25519.pub")
        .unwrap();
    assert_eq!(entry["allowed_signers"], want.as_str());
}

/// Runs ssh-keygen with `args`, SHA256SUMS on stdin; returns (success, combined output).
fn ssh_keygen_stdin(bin: &Path, args: &[&str], stdin_file: &Path) -> (bool, String) {
    let o = Command::new(bin)
        .args(args)
        .stdin(Stdio::from(fs::File::open(stdin_file).unwrap()))
        .output()
        .unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn ssh_keygen_accepts_kiln_signatures() {
    let Some(bin) = ssh_keygen("ssh_keygen_accepts_kiln_signatures") else {
        return;
    };
    let (d, key) = fixture();
    let out = d.path().join("out");
    let sums = out.join("SHA256SUMS");
    let sig = out.join("SHA256SUMS.sig");
    let sig_s = sig.to_str().unwrap();

    let (ok, msg) = ssh_keygen_stdin(
        &bin,
        &["-Y", "check-novalidate", "-n", "kiln", "-s", sig_s],
        &sums,
    );
    assert!(ok, "check-novalidate: {msg}");

    let allowed = d.path().join("allowed_signers");
    fs::write(
        &allowed,
        format!(
            "{}\n",
            kiln::trust::sign::allowed_signers_line(&key.verifying_key())
        ),
    )
    .unwrap();
    let verify_args = [
        "-Y",
        "verify",
        "-f",
        allowed.to_str().unwrap(),
        "-I",
        "kiln",
        "-n",
        "kiln",
        "-s",
        sig_s,
    ];
    let (ok, msg) = ssh_keygen_stdin(&bin, &verify_args, &sums);
    assert!(ok, "verify: {msg}");
    assert!(msg.contains("Good \"kiln\" signature for kiln"), "{msg}");

    // The check is meaningful: ssh-keygen rejects a changed SHA256SUMS and another namespace.
    let tampered = d.path().join("tampered");
    fs::write(&tampered, fs::read_to_string(&sums).unwrap() + "\n").unwrap();
    let (ok, _) = ssh_keygen_stdin(&bin, &verify_args, &tampered);
    assert!(!ok, "ssh-keygen accepted a tampered SHA256SUMS");
    let (ok, _) = ssh_keygen_stdin(
        &bin,
        &["-Y", "check-novalidate", "-n", "file", "-s", sig_s],
        &sums,
    );
    assert!(!ok, "ssh-keygen accepted namespace file");
}

#[test]
fn kiln_accepts_ssh_keygen_signatures_bit_for_bit() {
    let Some(bin) = ssh_keygen("kiln_accepts_ssh_keygen_signatures_bit_for_bit") else {
        return;
    };
    let (d, key) = fixture();
    let out = d.path().join("out");
    let kiln_sig = fs::read(out.join("SHA256SUMS.sig")).unwrap();
    fs::remove_file(out.join("SHA256SUMS.sig")).unwrap();

    // The same key as an OpenSSH private key; ssh-keygen writes SHA256SUMS.sig.
    let priv_path = d.path().join("id_ed25519");
    write_openssh_private(&priv_path, &key);
    let o = Command::new(&bin)
        .args(["-Y", "sign", "-n", "kiln", "-f"])
        .arg(&priv_path)
        .arg(out.join("SHA256SUMS"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ssh_sig = fs::read(out.join("SHA256SUMS.sig")).unwrap();

    let (code, stdout, stderr) = verify(d.path(), &[]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    // Ed25519 is deterministic and both hash with sha512: the same bytes.
    assert_eq!(
        String::from_utf8_lossy(&ssh_sig),
        String::from_utf8_lossy(&kiln_sig)
    );
}

#[test]
fn ssh_keygen_made_key_signs_and_verifies_both_ways() {
    let Some(bin) = ssh_keygen("ssh_keygen_made_key_signs_and_verifies_both_ways") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let k = d.path().join("id");
    let o = Command::new(&bin)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ops@example", "-f"])
        .arg(&k)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Derive kiln's signing key from the OpenSSH private key.
    let ssh = ssh_key::PrivateKey::read_openssh_file(&k).unwrap();
    let seed = ssh.key_data().ed25519().unwrap().private.to_bytes();
    let key = ed25519_dalek::SigningKey::from_bytes(&seed);
    write_keys(&d.path().join("keys"), &key);
    make_signed_dir(&d.path().join("out"), &[("a", b"a\n")], &key);

    // kiln verifies with the OpenSSH public key line as --key.
    let pub_line = d.path().join("id.pub");
    let (code, _, stderr) = verify(d.path(), &["--key", pub_line.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");

    // ssh-keygen verifies kiln's signature with that key as the allowed signer.
    let allowed = d.path().join("allowed_signers");
    let line = fs::read_to_string(&pub_line).unwrap();
    fs::write(&allowed, format!("kiln {line}")).unwrap();
    let out = d.path().join("out");
    let (ok, msg) = ssh_keygen_stdin(
        &bin,
        &[
            "-Y",
            "verify",
            "-f",
            allowed.to_str().unwrap(),
            "-I",
            "kiln",
            "-n",
            "kiln",
            "-s",
            out.join("SHA256SUMS.sig").to_str().unwrap(),
        ],
        &out.join("SHA256SUMS"),
    );
    assert!(ok, "{msg}");

    // And kiln accepts ssh-keygen's signature made with the original file.
    fs::remove_file(out.join("SHA256SUMS.sig")).unwrap();
    let o = Command::new(&bin)
        .args(["-Y", "sign", "-n", "kiln", "-f"])
        .arg(&k)
        .arg(out.join("SHA256SUMS"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, _, stderr) = verify(d.path(), &[]);
    assert_eq!(code, 0, "{stderr}");
}

/// Replaces `p` with a symlink to `/dev/zero` (reading it whole would never end).
fn point_at_dev_zero(p: &Path) {
    let _ = fs::remove_file(p);
    std::os::unix::fs::symlink("/dev/zero", p).unwrap();
}

#[test]
fn sums_or_signature_that_is_not_a_regular_file_is_refused_at_once() {
    for name in ["SHA256SUMS", "SHA256SUMS.sig"] {
        let (d, _) = fixture();
        point_at_dev_zero(&d.path().join("out").join(name));
        assert_fails(
            d.path(),
            &[],
            &[name, "is not a regular file (it is a character device)"],
        );
    }
    // Too large: refused by its size, not read.
    let (d, _) = fixture();
    let f = fs::File::create(d.path().join("out/SHA256SUMS")).unwrap();
    f.set_len(1 << 30).unwrap();
    assert_fails(d.path(), &[], &["1073741824 bytes, more than"]);
}

#[test]
fn key_that_is_not_a_regular_file_is_a_user_error() {
    let (d, _) = fixture();
    let (code, _, stderr) = verify(d.path(), &["--key", "/dev/zero"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("public key /dev/zero: is not a regular file"),
        "{stderr}"
    );
    let fifo = d.path().join("key.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let (code, _, stderr) = verify(d.path(), &["--key", fifo.to_str().unwrap()]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("it is a FIFO"), "{stderr}");
}

#[test]
fn seal_and_unseal_refuse_unbounded_inputs() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    let secret = d.path().join("s.yaml");
    fs::write(
        &secret,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: a, namespace: b}\ndata: {k: dg==}\n",
    )
    .unwrap();
    let s = secret.to_str().unwrap();
    for args in [
        vec!["--dir", dir, "seal", s, "--cert", "/dev/zero"],
        vec!["--dir", dir, "unseal", s, "--key", "/dev/zero"],
        vec!["--dir", dir, "seal", "/dev/zero", "--cert", "/dev/zero"],
    ] {
        let (code, _, stderr) = run(&args);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(
            stderr.contains("/dev/zero: is not a regular file"),
            "{stderr}"
        );
    }
    // A manifest on stdin is bounded too.
    let mut c = kiln()
        .args(["--dir", dir, "seal", "--cert", "/dev/null"])
        .stdin(fs::File::open("/dev/zero").unwrap())
        .output()
        .unwrap();
    c.stderr.truncate(4000);
    let (code, _, stderr) = out(c);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("input stdin: is more than"), "{stderr}");
}

#[test]
fn keys_show_warns_about_readable_private_keys_and_writable_dirs() {
    use std::os::unix::fs::PermissionsExt;
    let (d, _) = fixture();
    let keys = d.path().join("keys");
    let dir = d.path().to_str().unwrap();
    let (code, _, stderr) = run(&["--dir", dir, "keys", "show"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");

    let pem = keys.join("signing_ed25519.pem");
    fs::set_permissions(&pem, fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(&keys, fs::Permissions::from_mode(0o777)).unwrap();
    for args in [
        &["keys", "show"][..],
        &["keys", "show", "--json"][..],
        &["doctor"][..],
    ] {
        let mut a = vec!["--dir", dir];
        a.extend_from_slice(args);
        let (_, stdout, stderr) = run(&a);
        let all = format!("{stdout}{stderr}");
        assert!(
            all.contains(&format!(
                "{} is a private key file readable by group/others (mode 0644); fix: chmod 600 {}",
                pem.display(),
                pem.display()
            )),
            "{args:?}: {all}"
        );
        assert!(
            all.contains(&format!("fix: chmod go-w {}", keys.display())),
            "{args:?}: {all}"
        );
    }
    fs::set_permissions(&pem, fs::Permissions::from_mode(0o640)).unwrap();
    let (_, _, stderr) = run(&["--dir", dir, "keys", "show"]);
    assert!(stderr.contains("(mode 0640)"), "{stderr}");
}

#[test]
fn keys_show_refuses_a_key_file_that_is_a_device() {
    let (d, _) = fixture();
    point_at_dev_zero(&d.path().join("keys/signing_ed25519.pub"));
    let (code, _, stderr) = run(&["--dir", d.path().to_str().unwrap(), "keys", "show"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is not a regular file"), "{stderr}");
}

#[test]
fn seal_output_onto_a_pipe_or_device_writes_into_it() {
    use std::os::unix::fs::FileTypeExt;
    let d = tempfile::tempdir().unwrap();
    let keys = d.path().join("keys");
    kiln::trust::keys::init_with_rsa_bits(&keys, "t", false, 2048).unwrap();
    let secret = d.path().join("s.yaml");
    fs::write(
        &secret,
        "apiVersion: v1\nkind: Secret\nmetadata: {name: a, namespace: b}\ndata: {k: dg==}\n",
    )
    .unwrap();
    let dir = d.path().to_str().unwrap();
    let seal_to = |o: &Path| {
        run(&[
            "--dir",
            dir,
            "seal",
            secret.to_str().unwrap(),
            "-o",
            o.to_str().unwrap(),
        ])
    };
    // A named pipe: the output goes to its reader, and it stays a pipe.
    let fifo = d.path().join("out.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || fs::read_to_string(fifo).unwrap())
    };
    let (code, _, stderr) = seal_to(&fifo);
    assert_eq!(code, 0, "{stderr}");
    assert!(reader.join().unwrap().contains("kind: SealedSecret"));
    assert!(fs::metadata(&fifo).unwrap().file_type().is_fifo());
    // A directory or a socket is refused, and left alone.
    let (code, _, stderr) = seal_to(d.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is a directory"), "{stderr}");
    let sock = d.path().join("s.sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (code, _, stderr) = seal_to(&sock);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is a socket"), "{stderr}");
    assert!(fs::metadata(&sock).unwrap().file_type().is_socket());
    // A character device (a private copy of /dev/null; making one needs root).
    let null = d.path().join("null");
    let made = Command::new("mknod")
        .args([null.to_str().unwrap(), "c", "1", "3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !made {
        eprintln!("SKIP seal_output_onto_a_pipe_or_device_writes_into_it (char device part): mknod needs root");
        return;
    }
    let (code, _, stderr) = seal_to(&null);
    assert_eq!(code, 0, "{stderr}");
    assert!(fs::metadata(&null).unwrap().file_type().is_char_device());
}
