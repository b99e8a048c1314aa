//! Helpers for the signing and flashing tests: test keys, signed directories, the binary.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The kiln binary, with the environment's KILN_* settings removed.
pub fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env_remove("KILN_DIR")
        .env_remove("KILN_OUT")
        .env_remove("KILN_LOG")
        .stdin(Stdio::null());
    c
}

/// Runs kiln with `args`, returning (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    out(kiln().args(args).output().expect("running kiln"))
}

pub fn out(o: Output) -> (i32, String, String) {
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A fixed Ed25519 signing key (test material only).
pub fn test_key(seed: u8) -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
}

/// Writes `signing_ed25519.pem` (0600) and `signing_ed25519.pub` for `key` into `keys_dir`, in
/// the formats `kiln keys init` uses.
pub fn write_keys(keys_dir: &Path, key: &ed25519_dalek::SigningKey) {
    fs::create_dir_all(keys_dir).unwrap();
    let (pem, public) = kiln::trust::keys::encode_signing_key(key).unwrap();
    let p = keys_dir.join("signing_ed25519.pem");
    fs::write(&p, pem).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(keys_dir.join("signing_ed25519.pub"), public).unwrap();
}

/// Writes `files` into `dir`, then SHA256SUMS over them (as the build does), then signs.
pub fn make_signed_dir(dir: &Path, files: &[(&str, &[u8])], key: &ed25519_dalek::SigningKey) {
    fs::create_dir_all(dir).unwrap();
    for (n, b) in files {
        fs::write(dir.join(n), b).unwrap();
    }
    write_sums_and_sign(dir, &files.iter().map(|(n, _)| *n).collect::<Vec<_>>(), key);
}

pub fn write_sums_and_sign(dir: &Path, names: &[&str], key: &ed25519_dalek::SigningKey) {
    let arts = kiln::trust::sums::hash_artifacts(dir, names).unwrap();
    fs::write(dir.join("SHA256SUMS"), kiln::trust::sums::sha256sums(&arts)).unwrap();
    kiln::trust::sign::sign_dir(dir, key).unwrap();
}

/// ssh-keygen's path, or None after printing the SKIP line for `test`.
pub fn ssh_keygen(test: &str) -> Option<PathBuf> {
    for p in [
        "/usr/bin/ssh-keygen",
        "/bin/ssh-keygen",
        "/usr/local/bin/ssh-keygen",
    ] {
        if Path::new(p).is_file() {
            return Some(PathBuf::from(p));
        }
    }
    println!("SKIP: {test}: ssh-keygen not installed (apt-get install openssh-client)");
    None
}

/// The key as an unencrypted OpenSSH private key file (0600), as ssh-keygen reads it.
pub fn write_openssh_private(path: &Path, key: &ed25519_dalek::SigningKey) {
    let k = ssh_key::PrivateKey::from(ssh_key::private::Ed25519Keypair::from(key));
    fs::write(
        path,
        k.to_openssh(ssh_key::LineEnding::LF).unwrap().as_bytes(),
    )
    .unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).unwrap();
}
