//! Name syntax shared by the inventory, recipes, manifests and `kiln seal`: RFC 1123 host and
//! domain names, Kubernetes object names (DNS-1123), label keys and values, and disk paths.
//!
//! Each check returns `None` when the name is fine, or what is wrong with it (a sentence the
//! caller puts into its error, together with the file, key and fix).

/// Longest DNS name (RFC 1035 2.3.4, without the trailing dot) and Kubernetes subdomain name.
pub const MAX_DNS_NAME: usize = 253;
/// Longest DNS label (RFC 1035) and Kubernetes label name.
pub const MAX_DNS_LABEL: usize = 63;

/// Non-empty `a-z 0-9 -`, not starting or ending with `-` (no length bound): the letters-digits-
/// hyphen rule of RFC 1123 labels and Kubernetes DNS-1123 names.
fn is_ldh(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 label of at most 63 characters (host names, cluster and chart names).
pub fn is_dns_label(s: &str) -> bool {
    s.len() <= MAX_DNS_LABEL && is_ldh(s)
}

/// One RFC 1123 label: 1–63 of `a-z 0-9 -`, not starting or ending with `-`.
fn label_problem(l: &str, what: &str) -> Option<String> {
    if l.is_empty() {
        return Some(format!(
            "{what} has an empty label (two dots in a row, or a dot at an end)"
        ));
    }
    if l.len() > MAX_DNS_LABEL {
        return Some(format!(
            "{what} has a label of {} characters (at most {MAX_DNS_LABEL})",
            l.len()
        ));
    }
    if let Some(c) = l
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Some(format!(
            "{what} contains {c:?}; only lower-case letters, digits, '-' and '.' are allowed"
        ));
    }
    if l.starts_with('-') || l.ends_with('-') {
        return Some(format!(
            "{what} has a label {l:?} that starts or ends with '-'"
        ));
    }
    None
}

/// A DNS domain or fully qualified host name (RFC 1123): dot-separated labels, at most 253
/// characters, lower case, no trailing dot, and a last label that is not all digits (it would
/// read as an IPv4 address).
pub fn domain_problem(s: &str) -> Option<String> {
    if s.is_empty() {
        return Some("the name is empty".into());
    }
    if s.len() > MAX_DNS_NAME {
        return Some(format!(
            "the name is {} characters long (at most {MAX_DNS_NAME})",
            s.len()
        ));
    }
    for l in s.split('.') {
        if let Some(p) = label_problem(l, "the name") {
            return Some(p);
        }
    }
    if s.rsplit('.')
        .next()
        .is_some_and(|t| t.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some("its last label is all digits (it reads as an IP address)".into());
    }
    None
}

/// A Kubernetes DNS-1123 subdomain (most object names, e.g. Secrets and SealedSecrets): at most
/// 253 characters of `a-z 0-9 - .`, each dot-separated part starting and ending alphanumeric.
pub fn k8s_subdomain_problem(s: &str) -> Option<String> {
    if s.len() > MAX_DNS_NAME {
        return Some(format!(
            "is {} characters long (a Kubernetes name has at most {MAX_DNS_NAME})",
            s.len()
        ));
    }
    if s.is_empty() {
        return Some("is empty".into());
    }
    for part in s.split('.') {
        if !is_ldh(part) {
            return Some(
                "is not a DNS-1123 subdomain (lower-case letters, digits, '-' and '.', starting and ending with a letter or digit)"
                    .into(),
            );
        }
    }
    None
}

/// A Kubernetes DNS-1123 label (namespaces): at most 63 characters of `a-z 0-9 -`, starting and
/// ending alphanumeric.
pub fn k8s_label_problem(s: &str) -> Option<String> {
    if s.len() > MAX_DNS_LABEL {
        return Some(format!(
            "is {} characters long (a namespace has at most {MAX_DNS_LABEL})",
            s.len()
        ));
    }
    if !is_ldh(s) {
        return Some(
            "is not a DNS-1123 label (lower-case letters, digits and '-', starting and ending with a letter or digit)"
                .into(),
        );
    }
    None
}

/// The loosest name the API server takes for any kind (a path segment, e.g. RBAC's
/// `system:aggregate-to-edit`): 1–253 printable ASCII characters without `/` or `%`, not `.`
/// or `..`.
pub fn k8s_any_name_problem(s: &str) -> Option<String> {
    if s.len() > MAX_DNS_NAME {
        return Some(format!(
            "is {} characters long (a Kubernetes name has at most {MAX_DNS_NAME})",
            s.len()
        ));
    }
    if s.is_empty() || s == "." || s == ".." {
        return Some("is not a usable name".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !c.is_ascii_graphic() || *c == '/' || *c == '%')
    {
        return Some(format!(
            "contains {c:?}; a Kubernetes name has no '/', '%', spaces or non-ASCII characters"
        ));
    }
    None
}

/// `[a-zA-Z0-9]([-_.a-zA-Z0-9]*[a-zA-Z0-9])?`, at most 63 characters: a label name, a label
/// value (which may also be empty) and a taint value.
fn qualified_part_problem(s: &str, what: &str) -> Option<String> {
    if s.len() > MAX_DNS_LABEL {
        return Some(format!(
            "its {what} is {} characters long (at most {MAX_DNS_LABEL})",
            s.len()
        ));
    }
    let ok = s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric());
    (!ok).then(|| {
        format!(
            "its {what} {s:?} must be letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
        )
    })
}

/// A Kubernetes label (or taint) key: `[prefix/]name`, the prefix a DNS-1123 subdomain.
pub fn label_key_problem(k: &str) -> Option<String> {
    let (prefix, name) = match k.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        if let Some(e) = k8s_subdomain_problem(p) {
            return Some(format!("its key prefix {p:?} {e}"));
        }
    }
    if name.is_empty() {
        return Some("its key has no name".into());
    }
    qualified_part_problem(name, "key name")
}

/// A Kubernetes label value: empty, or like a label name.
pub fn label_value_problem(v: &str) -> Option<String> {
    if v.is_empty() {
        return None;
    }
    qualified_part_problem(v, "value")
}

/// Characters a disk path may hold: what udev's `/dev/disk/by-*` names use, nothing a shell
/// or a kernel command line would read as syntax.
fn is_disk_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b':' | b'+' | b'@')
}

/// A flash target: an absolute path under `/dev/` with plain components (no `..`, no empty
/// component) and no shell metacharacters or spaces.
pub fn disk_path_problem(d: &str) -> Option<String> {
    let Some(rest) = d.strip_prefix("/dev/") else {
        return Some("is not an absolute path under /dev/".into());
    };
    if let Some(c) = d
        .chars()
        .find(|c| !c.is_ascii() || !is_disk_path_byte(*c as u8))
    {
        return Some(format!(
            "contains {c:?}; a device path has only letters, digits and / - _ . : + @"
        ));
    }
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Some("has an empty, '.' or '..' component".into());
    }
    None
}

/// Longest path a `[persist] paths` entry or a disk `mount` may be.
pub const MAX_NODE_PATH: usize = 200;

/// Directories no persistent path or data-disk mount may be, or be under: kernel and runtime
/// file systems (`/proc`, `/sys`, `/dev`, `/run`, `/tmp`), what boots the node (`/boot`, `/efi`)
/// and the read-only image's programs and libraries.
pub const FORBIDDEN_NODE_ROOTS: &[&str] = &[
    "/proc", "/sys", "/dev", "/run", "/tmp", "/boot", "/usr", "/bin", "/sbin", "/lib", "/lib32",
    "/lib64", "/libx32", "/efi",
];

/// Directories too broad to keep whole on the data partition: a subdirectory must be named.
pub const TOO_BROAD_NODE_PATHS: &[&str] = &["/etc", "/var"];

/// Whether `p` is `root` or a path under it (both normalised, no trailing `/`).
pub fn path_is_within(p: &str, root: &str) -> bool {
    p == root || (p.starts_with(root) && p.as_bytes().get(root.len()) == Some(&b'/'))
}

/// A directory on the node that lives on the data partition (`[persist] paths`) or a disk's
/// mount point: absolute and normalised (no `.`/`..` components, no `//`, no trailing `/`), at
/// most [`MAX_NODE_PATH`] bytes of `A-Z a-z 0-9 . _ @ + - /` (node-side shell scripts read the
/// list), not `/`, not in [`FORBIDDEN_NODE_ROOTS`] and not one of [`TOO_BROAD_NODE_PATHS`].
pub fn node_path_problem(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return Some("is not an absolute path (it must start with '/')".into());
    }
    if p.len() > MAX_NODE_PATH {
        return Some(format!(
            "is {} bytes long (at most {MAX_NODE_PATH})",
            p.len()
        ));
    }
    if let Some(c) = p
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '@' | '+' | '-' | '/')))
    {
        return Some(format!(
            "contains {c:?}; a node path has only letters, digits and . _ @ + - /"
        ));
    }
    if p == "/" {
        return Some(
            "is the root directory: the whole file system cannot live on the data partition".into(),
        );
    }
    if p.ends_with('/') {
        return Some("ends with '/'".into());
    }
    if p[1..]
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Some("is not normalised (it has an empty, '.' or '..' component)".into());
    }
    if let Some(r) = FORBIDDEN_NODE_ROOTS.iter().find(|r| path_is_within(p, r)) {
        let at = if p == *r { "" } else { "under " };
        return Some(format!(
            "is {at}{r}, which belongs to the kernel, the boot or the read-only image"
        ));
    }
    if TOO_BROAD_NODE_PATHS.contains(&p) {
        return Some("is too broad to keep whole: name a subdirectory".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains() {
        for ok in ["lab.internal", "a", "x-1.example.com", "k3s.lab.internal"] {
            assert_eq!(domain_problem(ok), None, "{ok}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = ["abcdefghi"; 30].join(".");
        for bad in [
            "lab internal",
            "a..b",
            ".lab",
            "lab.",
            "Lab.internal",
            "-a.b",
            "a-.b",
            "10.0.0.1",
            "ex$mple.com",
            "läb.internal",
            "",
            &long_label,
            &long_name,
        ] {
            assert!(domain_problem(bad).is_some(), "{bad:?} accepted");
        }
    }

    #[test]
    fn kubernetes_names() {
        assert_eq!(k8s_subdomain_problem("db-creds.v2"), None);
        for bad in [
            "ns/name",
            "Name",
            "a..b",
            "-a",
            "",
            "sécret",
            &"a".repeat(254),
        ] {
            assert!(k8s_subdomain_problem(bad).is_some(), "{bad:?}");
        }
        assert!(k8s_subdomain_problem(&"a".repeat(253)).is_none());
        assert_eq!(k8s_label_problem("kube-system"), None);
        for bad in ["kube.system", "a/b", &"a".repeat(64), "", "X"] {
            assert!(k8s_label_problem(bad).is_some(), "{bad:?}");
        }
        assert_eq!(k8s_any_name_problem("system:aggregate-to-edit"), None);
        for bad in ["a/b", "a b", "%2f", "..", "ü"] {
            assert!(k8s_any_name_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn labels() {
        assert_eq!(
            label_key_problem("node.longhorn.io/create-default-disk"),
            None
        );
        assert_eq!(label_key_problem("gpu"), None);
        assert_eq!(label_value_problem(""), None);
        assert_eq!(label_value_problem("true"), None);
        for bad in ["a/b/c", "/x", "x/", "Ex.com/x", "-x", &"a".repeat(64)] {
            assert!(label_key_problem(bad).is_some(), "{bad:?}");
        }
        for bad in ["a b", "-x", "x$", &"v".repeat(64)] {
            assert!(label_value_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn node_paths() {
        for ok in [
            "/var/lib/rancher",
            "/etc/rancher/node",
            "/srv/data@2+x_y.z-w",
            "/usrlocal",
            "/var/lib/longhorn-disks/disk0",
        ] {
            assert_eq!(node_path_problem(ok), None, "{ok}");
        }
        let long = format!("/srv/{}", "a".repeat(200));
        for (bad, why) in [
            ("var/lib/x", "absolute"),
            ("/", "root directory"),
            ("/var/lib/x/", "ends with"),
            ("/var//lib", "normalised"),
            ("/var/./lib", "normalised"),
            ("/var/lib/../x", "normalised"),
            ("/var/lib/a b", "contains ' '"),
            ("/var/lib/$(x)", "contains '$'"),
            ("/var/lib/ü", "contains"),
            ("/proc", "is /proc"),
            ("/usr/local/x", "under /usr"),
            ("/run/k3s", "under /run"),
            ("/efi/x", "under /efi"),
            ("/etc", "too broad"),
            ("/var", "too broad"),
            (&long, "bytes long"),
        ] {
            let p = node_path_problem(bad).unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(p.contains(why), "{bad:?}: {p}");
        }
        assert!(path_is_within("/var/lib/rancher/k3s", "/var/lib/rancher"));
        assert!(path_is_within("/var/lib/rancher", "/var/lib/rancher"));
        assert!(!path_is_within("/var/lib/rancher2", "/var/lib/rancher"));
    }

    #[test]
    fn disks() {
        for ok in [
            "/dev/sda",
            "/dev/nvme0n1",
            "/dev/disk/by-id/nvme-Samsung_SSD_970_EVO_1TB_S467NX0M123456",
            "/dev/disk/by-path/pci-0000:00:1f.2-ata-1",
        ] {
            assert_eq!(disk_path_problem(ok), None, "{ok}");
        }
        for bad in [
            "relative/path",
            "sda",
            "/dev/sda; rm -rf /",
            "/dev/../etc/shadow",
            "/dev/",
            "/dev//sda",
            "/dev/sd a",
            "/dev/$(reboot)",
            "/tmp/x",
            "/dev/sda`x`",
        ] {
            assert!(disk_path_problem(bad).is_some(), "{bad:?} accepted");
        }
    }
}
