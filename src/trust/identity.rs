//! Per-node identity derived from the cluster's node-identity secret (`keys/node-identity.key`).
//!
//! A node keeps the same identity on every boot, every build and after every reflash because
//! nothing about it is random on the node: kiln derives it from the secret, the cluster name and
//! the hostname, and delivers it in the node's seed (the `kiln-*` files of the NoCloud volume,
//! see `pipeline::seed::IDENTITY_FILES`). Each value is HMAC-SHA256 keyed with the 32-byte secret over a message
//! that names its purpose, the cluster and the host:
//!
//! ```text
//! HMAC-SHA256(secret, "kiln/v1/<purpose>\0<cluster>\0<hostname>")
//! ```
//!
//! | purpose | value |
//! |---|---|
//! | `machine-id` | first 16 bytes with the UUID v4 version and variant bits set, 32 lowercase hex (machine-id(5); what systemd itself generates since v30, never all zeros) |
//! | `k3s-node-password` | first 16 bytes, 32 lowercase hex: what k3s's agent writes to `/etc/rancher/node/password` itself (`ensureNodePassword` in `pkg/agent/config/config.go`: 16 random bytes, `hex.EncodeToString`) |
//! | `ssh-host-ed25519` | the 32-byte Ed25519 seed of the SSH host key |
//! | `update-report` | all 32 bytes, 64 lowercase hex: the key of the HMAC-SHA256 with which the node's updater signs its reports to `kiln serve` (which derives the same key), so nobody else can mark the node healthy |
//! | `data-owner` | (no hostname) all 32 bytes, 64 hex: the tag a node writes on its data partition to recognise its own cluster ([`data_owner`]) |
//! | `vrrp-password` | (no hostname) 6 bytes as 8 base64url characters: the masters' keepalived `auth_pass` ([`vrrp_password`]) |
//!
//! Neither a cluster name (see `keys::validate_cluster_name`: no control characters) nor a
//! hostname (an RFC 1123 label) contains a NUL, so the message is unambiguous. HMAC-SHA256 is a
//! pseudo-random function: without the secret no value can be computed, and one node's values
//! (or the data-owner tag) reveal nothing about the secret or about any other node's values.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

/// Version of the derivation: part of every message, so a future scheme derives new values.
pub const VERSION: &str = "v1";

/// One node's identity. The secret parts are wiped from memory when it is dropped, and
/// `Debug` shows only the public ones.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// `/etc/machine-id` without its newline: 32 lowercase hex digits.
    pub machine_id: String,
    /// The k3s node password (`/etc/rancher/node/password` without its newline): 32 lowercase
    /// hex digits.
    pub node_password: Zeroizing<String>,
    /// `/etc/ssh/ssh_host_ed25519_key`: an unencrypted OpenSSH private key file
    /// (`-----BEGIN OPENSSH PRIVATE KEY-----`, LF line endings, comment `root@<hostname>`);
    /// every byte, the check integers included, is a function of the inputs.
    pub ssh_host_key: Zeroizing<String>,
    /// `/etc/ssh/ssh_host_ed25519_key.pub` without its newline:
    /// `ssh-ed25519 AAAA… root@<hostname>`.
    pub ssh_host_key_pub: String,
    /// The key of the node's update reports: 64 lowercase hex digits.
    pub update_key: Zeroizing<String>,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("machine_id", &self.machine_id)
            .field("node_password", &"<secret>")
            .field("ssh_host_key", &"<secret>")
            .field("ssh_host_key_pub", &self.ssh_host_key_pub)
            .field("update_key", &"<secret>")
            .finish()
    }
}

/// `SHA256:<base64>` of an OpenSSH public key line, as `ssh-keygen -l` prints it (empty if it
/// does not parse).
pub fn ssh_fingerprint(public_line: &str) -> String {
    ssh_key::PublicKey::from_openssh(public_line.trim_end())
        .map(|k| k.fingerprint(ssh_key::HashAlg::Sha256).to_string())
        .unwrap_or_default()
}

/// HMAC-SHA256 of `kiln/v1/<purpose>` and the NUL-separated `parts`, keyed with `secret`.
fn prf(secret: &[u8; 32], purpose: &str, parts: &[&str]) -> Zeroizing<[u8; 32]> {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(format!("kiln/{VERSION}/{purpose}").as_bytes());
    for p in parts {
        m.update(b"\0");
        m.update(p.as_bytes());
    }
    Zeroizing::new(m.finalize().into_bytes().into())
}

/// The identity of node `hostname` of cluster `cluster`.
pub fn derive(secret: &[u8; 32], cluster: &str, hostname: &str) -> NodeIdentity {
    let at = [cluster, hostname];

    let mut id = [0u8; 16];
    id.copy_from_slice(&prf(secret, "machine-id", &at)[..16]);
    // RFC 4122 version 4, variant 1, as systemd's id128_make_v4_uuid: never all zeros.
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    let machine_id = hex::encode(id);

    let node_password = Zeroizing::new(hex::encode(&prf(secret, "k3s-node-password", &at)[..16]));

    let seed = prf(secret, "ssh-host-ed25519", &at);
    let keypair = ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let key = ssh_key::PrivateKey::new(
        ssh_key::private::KeypairData::Ed25519(keypair),
        format!("root@{hostname}"),
    )
    .expect("an unencrypted Ed25519 key pair is always a valid private key");
    let ssh_host_key = key
        .to_openssh(ssh_key::LineEnding::LF)
        .expect("encoding an Ed25519 key in memory cannot fail");
    let ssh_host_key_pub = key
        .public_key()
        .to_openssh()
        .expect("encoding an Ed25519 public key in memory cannot fail");

    let update_key = Zeroizing::new(hex::encode(*update_key(secret, cluster, hostname)));

    NodeIdentity {
        machine_id,
        node_password,
        ssh_host_key: Zeroizing::new(ssh_host_key.to_string()),
        ssh_host_key_pub,
        update_key,
    }
}

/// The key of node `hostname`'s signed update reports (HMAC-SHA256 over the report body):
/// what its seed carries as `kiln-update-key` (hex) and what `kiln serve` checks with.
pub fn update_key(secret: &[u8; 32], cluster: &str, hostname: &str) -> Zeroizing<[u8; 32]> {
    prf(secret, "update-report", &[cluster, hostname])
}

/// The data-owner tag of cluster `cluster`: 64 lowercase hex digits a node writes on its data
/// partition and compares on the next boot, so a data partition of another cluster (another
/// secret) is recognised and refused. Public: it reveals neither the secret nor any node's values.
pub fn data_owner(secret: &[u8; 32], cluster: &str) -> String {
    hex::encode(*prf(secret, "data-owner", &[cluster]))
}

/// `known_hosts` lines (sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT") for `nodes` of `cluster`: per
/// node its hostname, `<hostname>.<domain>` when the cluster has a domain, and its address
/// when static, then its derived Ed25519 host key, in inventory order.
pub fn known_hosts(
    secret: &[u8; 32],
    cluster: &str,
    domain: Option<&str>,
    nodes: &[&crate::project::inventory::Node],
) -> String {
    let mut out = String::new();
    for n in nodes {
        let mut names = vec![n.hostname.clone()];
        if let Some(d) = domain.filter(|d| !d.is_empty()) {
            names.push(format!("{}.{d}", n.hostname));
        }
        if let Some((ip, _)) = n.address.split_once('/') {
            names.push(ip.to_string());
        }
        let key = derive(secret, cluster, &n.hostname).ssh_host_key_pub;
        // The key type and base64 blob, without the comment.
        let key: Vec<&str> = key.split_whitespace().take(2).collect();
        out.push_str(&format!("{} {}\n", names.join(","), key.join(" ")));
    }
    out
}

/// The VRRP password the masters of cluster `cluster` share for the API VIP (keepalived's
/// `auth_pass`; VRRPv2 PASS authentication keeps 8 characters): 8 characters of base64url.
/// Derived like the node identity, so no new key file; it only keeps other VRRP speakers on
/// the LAN out by mistake (the password travels in clear, as VRRPv2 defines).
pub fn vrrp_password(secret: &[u8; 32], cluster: &str) -> String {
    use base64::Engine as _;
    let b = prf(secret, "vrrp-password", &[cluster]);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&b[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [7u8; 32];

    /// Whether ssh-keygen runs here; prints the SKIP line when it does not.
    fn have_ssh_keygen() -> bool {
        let ok = std::process::Command::new("ssh-keygen")
            .arg("-?")
            .output()
            .is_ok();
        if !ok {
            println!("SKIP: ssh-keygen is not installed (apt-get install openssh-client)");
        }
        ok
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        // Guards the primitive: RFC 4231 test case 2 (key "Jefe").
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(b"Jefe").unwrap();
        m.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(m.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn golden_values_are_stable() {
        // Computed once; machine-id, password, data-owner and the public line were checked
        // against Python's hmac and `cryptography` (Ed25519PrivateKey.from_private_bytes).
        let n = derive(&SECRET, "homelab", "worker-1");
        assert_eq!(n.machine_id, "66996b674b794918aa4b96fbb471458a");
        assert_eq!(n.node_password.as_str(), "ed392be7eacf39d5e6e75a950b54c190");
        assert_eq!(n.ssh_host_key_pub, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIn07dCsiLaaSFsXHW6QHGQf9oZKOTfnC0GzflpTx41F root@worker-1");
        assert_eq!(
            crate::sys::util::sha256_hex(n.ssh_host_key.as_bytes()),
            "c34cecd0bda511de37d3b4bf6d8d84c14263354227b18640bb020b3f5580ef4d"
        );
        assert_eq!(
            data_owner(&SECRET, "homelab"),
            "6ab971f21b63ba9336c9a0369e03ed912192d1232c6f68da02cfea220344835f"
        );
        // Same inputs, same bytes.
        assert_eq!(derive(&SECRET, "homelab", "worker-1"), n);
    }

    #[test]
    fn formats_are_what_systemd_k3s_and_openssh_expect() {
        let n = derive(&SECRET, "homelab", "master-1");
        let hex32 = |s: &str| {
            s.len() == 32
                && s.chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        };
        assert!(hex32(&n.machine_id), "{}", n.machine_id);
        assert_ne!(n.machine_id, "0".repeat(32));
        assert_eq!(&n.machine_id[12..13], "4", "UUID v4 version nibble");
        assert!("89ab".contains(&n.machine_id[16..17]), "RFC 4122 variant");
        assert!(
            hex32(&n.node_password),
            "k3s writes 16 bytes as lowercase hex"
        );
        assert!(n
            .ssh_host_key
            .starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(n
            .ssh_host_key
            .ends_with("-----END OPENSSH PRIVATE KEY-----\n"));
        assert!(n.ssh_host_key_pub.starts_with("ssh-ed25519 AAAA"));
        assert!(n.ssh_host_key_pub.ends_with(" root@master-1"));
        let o = data_owner(&SECRET, "homelab");
        assert_eq!(o.len(), 64);
        assert!(o
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        // Debug never shows the secret parts.
        let dbg = format!("{n:?}");
        assert!(!dbg.contains(n.node_password.as_str()), "{dbg}");
        assert!(!dbg.contains("OPENSSH PRIVATE"), "{dbg}");
    }

    #[test]
    fn values_differ_per_node_cluster_secret_and_purpose() {
        let a = derive(&SECRET, "homelab", "worker-1");
        let others = [
            derive(&SECRET, "homelab", "worker-2"),
            derive(&SECRET, "lab", "worker-1"),
            derive(&[8u8; 32], "homelab", "worker-1"),
            // The separator keeps ("a", "bc") and ("ab", "c") apart.
            derive(&SECRET, "homelabw", "orker-1"),
        ];
        for o in &others {
            assert_ne!(a.machine_id, o.machine_id);
            assert_ne!(a.node_password, o.node_password);
            assert_ne!(a.ssh_host_key_pub, o.ssh_host_key_pub);
        }
        // Purposes are separated: no value is another's prefix or equal to it.
        assert_ne!(a.machine_id, *a.node_password);
        assert!(!data_owner(&SECRET, "homelab").starts_with(a.node_password.as_str()));
        assert_ne!(data_owner(&SECRET, "homelab"), data_owner(&SECRET, "lab"));
        assert_ne!(
            data_owner(&SECRET, "homelab"),
            data_owner(&[8u8; 32], "homelab")
        );
    }

    #[test]
    fn ssh_host_key_parses_back_and_matches_its_public_line() {
        let n = derive(&SECRET, "homelab", "storage-1");
        let k = ssh_key::PrivateKey::from_openssh(n.ssh_host_key.as_bytes()).unwrap();
        assert_eq!(k.algorithm(), ssh_key::Algorithm::Ed25519);
        assert!(!k.is_encrypted());
        assert_eq!(k.comment(), "root@storage-1");
        let p = ssh_key::PublicKey::from_openssh(&n.ssh_host_key_pub).unwrap();
        assert_eq!(k.public_key().key_data(), p.key_data());
        assert_eq!(
            k.fingerprint(ssh_key::HashAlg::Sha256).to_string(),
            ssh_fingerprint(&n.ssh_host_key_pub)
        );
        assert!(ssh_fingerprint(&n.ssh_host_key_pub).starts_with("SHA256:"));
        // Re-encoding the parsed key gives the same bytes (check integers included).
        assert_eq!(
            k.to_openssh(ssh_key::LineEnding::LF).unwrap().as_str(),
            n.ssh_host_key.as_str()
        );
    }

    #[test]
    fn ssh_keygen_accepts_the_host_key() {
        if !have_ssh_keygen() {
            return;
        }
        let n = derive(&SECRET, "homelab", "worker-1");
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ssh_host_ed25519_key");
        crate::sys::util::write_atomic_mode(&p, n.ssh_host_key.as_bytes(), 0o600).unwrap();
        let o = std::process::Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let line = String::from_utf8_lossy(&o.stdout);
        // `256 SHA256:… root@worker-1 (ED25519)`
        assert!(
            line.contains(&ssh_fingerprint(&n.ssh_host_key_pub)) && line.contains("(ED25519)"),
            "{line}"
        );
        // ssh-keygen derives the same public line from the private file.
        let o = std::process::Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(&p)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // (Older OpenSSH prints no comment: compare the key type and the key.)
        let out = String::from_utf8_lossy(&o.stdout);
        let key = |l: &str| l.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        assert_eq!(key(&out), key(&n.ssh_host_key_pub));
    }

    #[test]
    fn known_hosts_lines_are_found_by_ssh_keygen() {
        let node = |h: &str, address: &str| crate::project::inventory::Node {
            hostname: h.into(),
            mac: "52:54:00:00:00:01".into(),
            role: "worker".into(),
            address: address.into(),
            gateway: None,
            dns: vec![],
            disk: None,
            disks: vec![],
        };
        let (a, b) = (node("master-1", "10.0.0.11/24"), node("worker-1", "dhcp"));
        let text = known_hosts(&SECRET, "homelab", Some("lab.example"), &[&a, &b]);
        let key = |h: &str| {
            derive(&SECRET, "homelab", h)
                .ssh_host_key_pub
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            text,
            format!(
                "master-1,master-1.lab.example,10.0.0.11 {}\nworker-1,worker-1.lab.example {}\n",
                key("master-1"),
                key("worker-1")
            )
        );
        if !have_ssh_keygen() {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("known_hosts");
        std::fs::write(&p, &text).unwrap();
        for (host, want) in [
            ("master-1", "master-1"),
            ("10.0.0.11", "master-1"),
            ("worker-1.lab.example", "worker-1"),
        ] {
            let o = std::process::Command::new("ssh-keygen")
                .args(["-F", host, "-f"])
                .arg(&p)
                .output()
                .unwrap();
            assert!(o.status.success(), "{host} not found: {text}");
            assert!(
                String::from_utf8_lossy(&o.stdout).contains(&key(want)),
                "{host}"
            );
        }
        let o = std::process::Command::new("ssh-keygen")
            .args(["-F", "worker-2", "-f"])
            .arg(&p)
            .output()
            .unwrap();
        assert!(!o.status.success(), "an unknown host was found");
    }
}
