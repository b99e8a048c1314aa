//! A model of the k3s server's node-password check, for tests that read
//! `/etc/rancher/node/password` from a rebooted or reflashed node and must know whether a real
//! server would let it rejoin.
//!
//! What it models (k3s `pkg/nodepassword` and `pkg/agent/config`):
//!
//! * The agent (`ensureNodePassword`, `pkg/agent/config/config.go`) reads
//!   `/etc/rancher/node/password` and sends `strings.TrimSpace` of it in the `K3s-Node-Password`
//!   header, with its node name in `K3s-Node-Name`, when it asks for its kubelet certificates.
//!   Only when the file does not exist does it make one: 16 random bytes, `hex.EncodeToString`,
//!   written with a trailing newline, mode 0600.
//! * The server (`getNodeInfo`, `validate.go`) lower-cases the node name and refuses a request
//!   without name or password (HTTP 400, "node name not set" / "node password not set").
//! * `ensure` (`nodepassword.go`) looks up the Secret `<node>.node-password.k3s` (lower case) in
//!   `kube-system`. Found: its `hash` (scrypt, `$1:<salt>:15:8:1:<key>`) must verify the
//!   password, otherwise the error is `unable to verify password for node <node>: hash does not
//!   match` and the request gets HTTP 403 — the agent then logs [`AGENT_REJECTED`]. Not found:
//!   the Secret is created (immutable, type `k3s.cattle.io/node-password`) and the node is in.
//! * The Secret goes away only with its Node (an owner reference added once the Node exists, so
//!   `kubectl delete node` garbage-collects it) or, for a node that never joined, after
//!   10 minutes (`MinOrphanSecretAge`): [`NodePasswords::delete_node`].
//!
//! Not modelled: a server checking its *own* agent before its apiserver is up
//! (`verifyLocalPassword` compares with its local password file and ensures the Secret later,
//! only raising a `NodePasswordValidationFailed` event on a mismatch), etcd-only servers
//! (verification deferred), and fail-open when the Secret cannot be created.
//! The stored hash here is a salted SHA-256, not scrypt: the check it answers — same password
//! or not — is the same.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// What the agent prints when the server answers 403 (k3s `getNodeNamedCrt`).
pub const AGENT_REJECTED: &str = "Node password rejected, duplicate hostname or contents of \
'/etc/rancher/node/password' may not match server node-passwd entry, try enabling a unique node \
name with the --with-node-id flag";

/// Where the agent keeps its password.
pub const PASSWORD_FILE: &str = "/etc/rancher/node/password";

/// The name of the Secret holding a node's password hash (`getSecretName`).
pub fn secret_name(node: &str) -> String {
    format!("{node}.node-password.k3s").to_lowercase()
}

/// What the agent sends for a password file's contents (`strings.TrimSpace`).
pub fn agent_password(file: &str) -> &str {
    file.trim()
}

/// Whether `password` is what k3s's agent itself would have written: 32 lowercase hex digits
/// (16 random bytes, `hex.EncodeToString`).
pub fn is_agent_format(password: &str) -> bool {
    password.len() == 32
        && password
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A stored hash: salt and SHA-256 of salt and password.
#[derive(Debug, Clone)]
struct Hash {
    salt: [u8; 8],
    digest: [u8; 32],
}

impl Hash {
    fn new(password: &str, salt: [u8; 8]) -> Self {
        Hash {
            salt,
            digest: Self::digest(&salt, password),
        }
    }
    fn digest(salt: &[u8; 8], password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(salt);
        h.update(password.as_bytes());
        h.finalize().into()
    }
    fn verify(&self, password: &str) -> bool {
        Self::digest(&self.salt, password) == self.digest
    }
}

/// The `kube-system` node-password Secrets of one cluster.
#[derive(Debug, Clone, Default)]
pub struct NodePasswords {
    secrets: BTreeMap<String, Hash>,
    created: u64,
}

/// Why the server refused a request, with the HTTP status k3s answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.message)
    }
}

impl NodePasswords {
    pub fn new() -> Self {
        Self::default()
    }

    /// The server's check of node `node` presenting `password` (the header value: the agent
    /// trims its file first, see [`agent_password`]): stores the password on first registration,
    /// accepts it again, refuses any other with k3s's exact message.
    pub fn verify(&mut self, node: &str, password: &str) -> Result<(), String> {
        self.check(node, password).map_err(|r| r.message)
    }

    /// [`NodePasswords::verify`] with the HTTP status k3s answers (400 or 403).
    pub fn check(&mut self, node: &str, password: &str) -> Result<(), Refused> {
        let refuse = |status, message: &str| {
            Err(Refused {
                status,
                message: message.to_string(),
            })
        };
        if node.is_empty() {
            return refuse(400, "node name not set");
        }
        if password.is_empty() {
            return refuse(400, "node password not set");
        }
        let node = node.to_lowercase();
        let name = secret_name(&node);
        match self.secrets.get(&name) {
            Some(h) if h.verify(password) => Ok(()),
            Some(_) => refuse(
                403,
                &format!("unable to verify password for node {node}: hash does not match"),
            ),
            None => {
                // A salt per Secret, as scrypt's CreateHash draws one; deterministic here.
                self.created += 1;
                let salt = Sha256::digest(format!("salt\0{}\0{name}", self.created));
                let salt: [u8; 8] = salt[..8].try_into().expect("8 bytes");
                self.secrets.insert(name, Hash::new(password, salt));
                Ok(())
            }
        }
    }

    /// `kubectl delete node <node>`: the garbage collector removes its Secret; the next
    /// registration stores a new password.
    pub fn delete_node(&mut self, node: &str) {
        self.secrets.remove(&secret_name(node));
    }

    /// The Secrets that exist, sorted.
    pub fn secret_names(&self) -> Vec<String> {
        self.secrets.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_registration_stores_and_a_mismatch_is_refused_with_k3s_message() {
        let mut s = NodePasswords::new();
        let pw = "0123456789abcdef0123456789abcdef";
        s.verify("worker-1", pw).unwrap();
        assert_eq!(s.secret_names(), ["worker-1.node-password.k3s"]);
        // The same node again (a reboot, or a reflash that kept its identity).
        s.verify("worker-1", pw).unwrap();
        // A reflash with a fresh random password.
        let e = s
            .check("worker-1", "fedcba9876543210fedcba9876543210")
            .unwrap_err();
        assert_eq!(e.status, 403);
        assert_eq!(
            e.message,
            "unable to verify password for node worker-1: hash does not match"
        );
        // Another node is independent.
        s.verify("worker-2", "fedcba9876543210fedcba9876543210")
            .unwrap();
        // Only deleting the Node lets a new password in.
        s.delete_node("worker-1");
        s.verify("worker-1", "fedcba9876543210fedcba9876543210")
            .unwrap();
        assert!(s.verify("worker-1", pw).is_err());
    }

    #[test]
    fn names_are_lower_cased_and_empty_headers_refused() {
        let mut s = NodePasswords::new();
        s.verify("Worker-1", "secret").unwrap();
        assert_eq!(s.secret_names(), ["worker-1.node-password.k3s"]);
        s.verify("worker-1", "secret").unwrap();
        let e = s.check("WORKER-1", "other").unwrap_err();
        assert!(e.message.contains("node worker-1:"), "{e}");
        assert_eq!(s.check("", "x").unwrap_err().status, 400);
        assert_eq!(
            s.verify("worker-1", "").unwrap_err(),
            "node password not set"
        );
    }

    #[test]
    fn the_agent_sends_its_file_trimmed() {
        let mut s = NodePasswords::new();
        let file = "0123456789abcdef0123456789abcdef\n";
        s.verify("w", agent_password(file)).unwrap();
        s.verify("w", agent_password("  0123456789abcdef0123456789abcdef \n"))
            .unwrap();
        assert!(
            s.verify("w", file).is_err(),
            "untrimmed is another password"
        );
        assert!(is_agent_format(agent_password(file)));
        assert!(!is_agent_format("0123456789ABCDEF0123456789ABCDEF"));
        assert!(!is_agent_format("0123"));
        assert!(AGENT_REJECTED.contains(PASSWORD_FILE));
    }

    #[test]
    fn derived_passwords_let_a_reflashed_node_rejoin() {
        let secret = [3u8; 32];
        let mut s = NodePasswords::new();
        let first = crate::trust::identity::derive(&secret, "homelab", "worker-1");
        assert!(is_agent_format(&first.node_password));
        s.verify("worker-1", &first.node_password).unwrap();
        // Reflash: the same node derives the same password.
        let again = crate::trust::identity::derive(&secret, "homelab", "worker-1");
        s.verify("worker-1", &again.node_password).unwrap();
        // Another cluster secret would not be let in.
        let other = crate::trust::identity::derive(&[4u8; 32], "homelab", "worker-1");
        assert!(s.verify("worker-1", &other.node_password).is_err());
    }
}
