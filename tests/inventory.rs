//! The inventory and the YAML a project hands kiln, checked like a network engineer and the
//! Kubernetes API server would (issue 17, section 2): every refusal exits 2 and names the file,
//! the key and a fix, before anything is written (fast; no root needed).

mod common;
use common::*;
use std::fs;
use std::path::Path;

/// Applies `edits` (file, from, to) to a fresh project copy, runs `kiln build --role <role>`
/// and checks: exit 2, the message names the file, the key, a fix and `needle`; no out/.
fn refused(edits: &[(&str, &str, &str)], role: &str, file: &str, key: &str, needle: &str) {
    let d = project_copy();
    for (f, from, to) in edits {
        edit(d.path(), f, from, to);
    }
    let o = kiln(d.path(), &["build", "--role", role]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2; stderr:\n{err}");
    for want in [file, key, "fix:", needle] {
        assert!(err.contains(want), "error does not say {want:?}:\n{err}");
    }
    assert!(!d.path().join("out").exists(), "a refused build wrote out/");
}

const CLUSTER: &str = "recipes/cluster.toml";
/// The line after which master-1 (nodes[0]) gets more keys.
const MASTER_DNS: &str = "dns = [\"10.0.0.1\"]";

/// A refused edit of cluster.toml.
fn refused_cluster(from: &str, to: &str, key: &str, needle: &str) {
    refused(&[(CLUSTER, from, to)], "worker", CLUSTER, key, needle);
}

/// master-1 with an extra `line`.
fn refused_master_key(line: &str, key: &str, needle: &str) {
    refused_cluster(MASTER_DNS, &format!("{MASTER_DNS}\n{line}"), key, needle);
}

// --- MACs -------------------------------------------------------------------------------------

#[test]
fn multicast_mac_is_refused() {
    refused_cluster(
        "52:54:00:00:00:21",
        "01:00:5e:00:00:21",
        "nodes[1].mac",
        "multicast",
    );
}

#[test]
fn broadcast_mac_is_refused() {
    refused_cluster(
        "52:54:00:00:00:21",
        "FF-FF-FF-FF-FF-FF",
        "nodes[1].mac",
        "broadcast",
    );
}

#[test]
fn all_zero_mac_is_refused() {
    refused_cluster(
        "52:54:00:00:00:21",
        "00:00:00:00:00:00",
        "nodes[1].mac",
        "all-zero",
    );
}

// --- addresses, gateways, DNS -----------------------------------------------------------------

#[test]
fn network_address_is_refused() {
    refused_cluster(
        "10.0.0.11/24",
        "10.0.0.0/24",
        "nodes[0].address",
        "network address",
    );
}

#[test]
fn broadcast_address_is_refused() {
    refused_cluster(
        "10.0.0.11/24",
        "10.0.0.255/24",
        "nodes[0].address",
        "broadcast address",
    );
}

#[test]
fn prefix_zero_is_refused() {
    refused_cluster("10.0.0.11/24", "10.0.0.11/0", "nodes[0].address", "/0");
}

#[test]
fn loopback_address_is_refused() {
    refused_cluster(
        "10.0.0.11/24",
        "127.0.0.11/8",
        "nodes[0].address",
        "loopback",
    );
}

#[test]
fn gateway_outside_the_subnet_is_refused() {
    refused_cluster(
        "gateway = \"10.0.0.1\"",
        "gateway = \"192.168.1.1\"",
        "nodes[0].gateway",
        "10.0.0.0/24",
    );
}

#[test]
fn gateway_equal_to_the_node_is_refused() {
    refused_cluster(
        "gateway = \"10.0.0.1\"",
        "gateway = \"10.0.0.11\"",
        "nodes[0].gateway",
        "own address",
    );
}

#[test]
fn multicast_dns_server_is_refused() {
    refused_cluster(
        MASTER_DNS,
        "dns = [\"224.0.0.251\"]",
        "nodes[0].dns[0]",
        "multicast",
    );
}

#[test]
fn unspecified_dns_server_is_refused() {
    refused_cluster(
        MASTER_DNS,
        "dns = [\"0.0.0.0\"]",
        "nodes[0].dns[0]",
        "0.0.0.0/8",
    );
}

#[test]
fn more_than_three_dns_servers_are_refused() {
    refused_cluster(
        MASTER_DNS,
        "dns = [\"10.0.0.1\", \"10.0.0.2\", \"10.0.0.3\", \"10.0.0.4\"]",
        "nodes[0].dns",
        "first 3",
    );
}

#[test]
fn duplicate_static_address_is_refused() {
    refused_cluster(
        "mac = \"52:54:00:00:00:21\"",
        "mac = \"52:54:00:00:00:21\"\naddress = \"10.0.0.11/24\"",
        "nodes[1].address",
        "master-1",
    );
}

#[test]
fn api_endpoint_on_a_worker_is_refused() {
    refused(
        &[
            (
                CLUSTER,
                "mac = \"52:54:00:00:00:21\"",
                "mac = \"52:54:00:00:00:21\"\naddress = \"10.0.0.21/24\"",
            ),
            (
                CLUSTER,
                "api_endpoint = \"10.0.0.10\"",
                "api_endpoint = \"10.0.0.21\"",
            ),
        ],
        "worker",
        CLUSTER,
        "cluster.api_endpoint",
        "worker-1",
    );
}

#[test]
fn api_endpoint_that_is_not_a_name_is_refused() {
    refused_cluster(
        "api_endpoint = \"10.0.0.10\"",
        "api_endpoint = \"k3s..lab\"",
        "cluster.api_endpoint",
        "empty label",
    );
}

// --- IPv6: refused clearly, naming what is supported ------------------------------------------

#[test]
fn ipv6_address_is_refused() {
    refused_cluster(
        "10.0.0.11/24",
        "fd00::11/64",
        "nodes[0].address",
        "IPv6 node addresses are not supported",
    );
}

#[test]
fn ipv6_gateway_is_refused() {
    refused_cluster(
        "gateway = \"10.0.0.1\"",
        "gateway = \"fd00::1\"",
        "nodes[0].gateway",
        "give an IPv4 address",
    );
}

#[test]
fn ipv6_dns_server_is_refused() {
    refused_cluster(MASTER_DNS, "dns = [\"fd00::1\"]", "nodes[0].dns[0]", "IPv6");
}

// --- disks ------------------------------------------------------------------------------------

#[test]
fn relative_disk_is_refused() {
    refused_master_key(
        "disk = \"relative/path\"",
        "nodes[0].disk",
        "/dev/disk/by-id",
    );
}

#[test]
fn disk_with_shell_syntax_is_refused() {
    refused_master_key(
        "disk = \"/dev/sda; rm -rf /\"",
        "nodes[0].disk",
        "contains ';'",
    );
}

#[test]
fn disk_with_dot_dot_is_refused() {
    refused_master_key("disk = \"/dev/../etc/shadow\"", "nodes[0].disk", "'..'");
}

#[test]
fn stable_disk_paths_are_accepted() {
    let d = project_copy();
    edit(
        d.path(),
        CLUSTER,
        MASTER_DNS,
        &format!("{MASTER_DNS}\ndisk = \"/dev/disk/by-path/pci-0000:00:1f.2-ata-1\""),
    );
    kiln::project::recipe::load_project(d.path()).unwrap();
}

// --- names ------------------------------------------------------------------------------------

#[test]
fn domain_with_a_space_is_refused() {
    refused_cluster(
        "domain = \"lab.internal\"",
        "domain = \"lab internal\"",
        "cluster.domain",
        "' '",
    );
}

#[test]
fn domain_with_an_empty_label_is_refused() {
    refused_cluster(
        "domain = \"lab.internal\"",
        "domain = \"a..b\"",
        "cluster.domain",
        "empty label",
    );
}

#[test]
fn domain_label_over_63_is_refused() {
    let long = format!("domain = \"{}.internal\"", "a".repeat(64));
    refused_cluster(
        "domain = \"lab.internal\"",
        &long,
        "cluster.domain",
        "at most 63",
    );
}

#[test]
fn fqdn_over_253_is_refused() {
    let domain = vec!["d".repeat(61); 4].join(".");
    refused_cluster(
        "domain = \"lab.internal\"",
        &format!("domain = \"{domain}\""),
        "nodes[0].hostname",
        "253",
    );
}

#[test]
fn all_digit_hostname_is_refused() {
    refused_cluster(
        "hostname = \"worker-2\"",
        "hostname = \"2222\"",
        "nodes[2].hostname",
        "digits",
    );
}

#[test]
fn bad_tls_san_is_refused() {
    refused_cluster(
        "tls_san = [\"k3s.lab.internal\"]",
        "tls_san = [\"k3s.lab.internal\", \"bad name\"]",
        "k3s.tls_san[1]",
        "bad name",
    );
}

#[test]
fn unknown_disable_component_is_refused() {
    refused_cluster(
        "disable = [\"traefik\"]",
        "disable = [\"trafik\"]",
        "k3s.disable[0]",
        "servicelb",
    );
}

#[test]
fn cluster_cidr_overlapping_the_node_subnet_is_refused() {
    refused_cluster(
        "disable = [\"traefik\"]",
        "disable = [\"traefik\"]\ncluster_cidr = \"10.0.0.0/16\"",
        "k3s.cluster_cidr",
        "overlaps node master-1's subnet",
    );
}

#[test]
fn service_cidr_with_host_bits_is_refused() {
    refused_cluster(
        "disable = [\"traefik\"]",
        "disable = [\"traefik\"]\nservice_cidr = \"10.43.0.1/16\"",
        "k3s.service_cidr",
        "10.43.0.0/16",
    );
}

#[test]
fn label_value_with_shell_syntax_is_refused() {
    refused(
        &[(
            "recipes/storage.toml",
            "create-default-disk=true",
            "create-default-disk=$(reboot)",
        )],
        "storage",
        "recipes/storage.toml",
        "k3s.node_labels[0]",
        "value",
    );
}

#[test]
fn taint_with_non_ascii_value_is_refused() {
    refused(
        &[(
            "recipes/gpu.toml",
            "gpu=present:NoSchedule",
            "gpu=présent:NoSchedule",
        )],
        "gpu",
        "recipes/gpu.toml",
        "k3s.node_taints[0]",
        "value",
    );
}

// --- source_date_epoch ------------------------------------------------------------------------

#[test]
fn epoch_past_squashfs_is_refused() {
    refused_cluster(
        "source_date_epoch = 1700000000",
        "source_date_epoch = 4294967296",
        "cluster.source_date_epoch",
        "2106-02-07",
    );
}

#[test]
fn epoch_at_i64_max_is_refused() {
    refused_cluster(
        "source_date_epoch = 1700000000",
        "source_date_epoch = 9223372036854775807",
        "cluster.source_date_epoch",
        "squashfs",
    );
}

#[test]
fn negative_epoch_is_refused() {
    refused_cluster(
        "source_date_epoch = 1700000000",
        "source_date_epoch = -1",
        "cluster.source_date_epoch",
        "before 1980",
    );
}

#[test]
fn last_squashfs_second_is_accepted() {
    let d = project_copy();
    edit(
        d.path(),
        CLUSTER,
        "source_date_epoch = 1700000000",
        "source_date_epoch = 4294967295",
    );
    kiln::project::recipe::load_project(d.path()).unwrap();
}

// --- SealedSecrets: Kubernetes names, in the project and for `kiln seal` ------------------------

/// A SealedSecret document with this metadata (the ciphertext is never opened by the checks).
fn sealed_secret(name: &str, namespace: &str) -> String {
    format!(
        "apiVersion: bitnami.com/v1alpha1\nkind: SealedSecret\nmetadata:\n  name: {name:?}\n  namespace: {namespace:?}\nspec:\n  encryptedData:\n    password: AgBy3i4OJSWK+PiTySYZZA==\n"
    )
}

/// The project lists `recipes/secrets/x.yaml` = `text`; `kiln build --role master` refuses it.
fn refused_sealed_file(text: &str, key: &str, needle: &str) {
    let d = project_copy();
    fs::create_dir_all(d.path().join("recipes/secrets")).unwrap();
    fs::write(d.path().join("recipes/secrets/x.yaml"), text).unwrap();
    edit(
        d.path(),
        CLUSTER,
        "secrets = []",
        "secrets = [\"secrets/x.yaml\"]",
    );
    let o = kiln(d.path(), &["build", "--role", "master"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for want in ["recipes/secrets/x.yaml", key, "fix:", needle] {
        assert!(err.contains(want), "error does not say {want:?}:\n{err}");
    }
    assert!(!d.path().join("out").exists());
}

#[test]
fn sealed_secret_name_with_a_slash_is_refused() {
    refused_sealed_file(
        &sealed_secret("db/creds", "default"),
        "metadata.name",
        "'/'",
    );
}

#[test]
fn sealed_secret_name_of_300_characters_is_refused() {
    refused_sealed_file(
        &sealed_secret(&"a".repeat(300), "default"),
        "metadata.name",
        "300 characters",
    );
}

#[test]
fn sealed_secret_non_ascii_name_is_refused() {
    refused_sealed_file(&sealed_secret("sécret", "default"), "metadata.name", "'é'");
}

#[test]
fn sealed_secret_upper_case_name_is_refused() {
    refused_sealed_file(
        &sealed_secret("DB_Creds", "default"),
        "metadata.name",
        "DNS-1123 subdomain",
    );
}

#[test]
fn sealed_secret_namespace_with_a_slash_is_refused() {
    refused_sealed_file(
        &sealed_secret("creds", "team/a"),
        "metadata.namespace",
        "DNS-1123 label",
    );
}

#[test]
fn deeply_nested_sealed_secret_is_refused_before_parsing() {
    let deep = format!("{}{}\n", "{a: ".repeat(100_000), "}".repeat(100_000));
    refused_sealed_file(&deep, "(sealed secret)", "nested more than 100 levels");
}

/// `kiln seal <file>` with the project's certificate refuses `secret`, exit 2, saying `needle`.
fn seal_refuses(secret: &str, needle: &str) {
    let d = project_copy();
    let p = d.path().join("secret.yaml");
    fs::write(&p, secret).unwrap();
    let o = kiln(d.path(), &["seal", p.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(needle),
        "error does not say {needle:?}:\n{err}"
    );
    assert!(o.stdout.is_empty(), "something was sealed");
}

fn secret(name: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name:?}\n  namespace: {namespace:?}\nstringData:\n  password: hunter2\n"
    )
}

#[test]
fn seal_refuses_a_name_with_a_slash() {
    seal_refuses(&secret("db/creds", "default"), "metadata.name");
}

#[test]
fn seal_refuses_a_300_character_name() {
    seal_refuses(&secret(&"n".repeat(300), "default"), "300 characters");
}

#[test]
fn seal_refuses_a_non_ascii_name() {
    seal_refuses(&secret("sécret", "default"), "DNS-1123");
}

#[test]
fn seal_refuses_a_namespace_with_a_slash() {
    seal_refuses(&secret("creds", "team/a"), "metadata.namespace");
}

/// 100 000 nested mappings (`{a: {a: …`, 400 KB) took minutes in the YAML parser before it
/// refused them; the pre-check refuses them at once.
#[test]
fn seal_refuses_deeply_nested_yaml_before_parsing() {
    seal_refuses(&"{a: ".repeat(100_000), "nested more than 100 levels");
}

#[test]
fn seal_refuses_deeply_nested_json_before_parsing() {
    let json = format!("{}1{}", "{\"a\":".repeat(50_000), "}".repeat(50_000));
    seal_refuses(&json, "nested more than 100 levels");
}

#[test]
fn seal_still_accepts_a_proper_secret() {
    let d = project_copy();
    let p = d.path().join("secret.yaml");
    fs::write(&p, secret("db-creds", "default")).unwrap();
    let o = kiln(d.path(), &["seal", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

// --- manifests and seeds ----------------------------------------------------------------------

#[test]
fn deeply_nested_manifest_is_refused_before_parsing() {
    let d = project_copy();
    fs::write(
        d.path().join("recipes/manifests/deep.yaml"),
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata: {}\n",
            "[".repeat(100_000)
        ),
    )
    .unwrap();
    edit(
        d.path(),
        "recipes/master.toml",
        "manifests = [",
        "manifests = [\"manifests/deep.yaml\", ",
    );
    let o = kiln(d.path(), &["build", "--role", "master"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("deep.yaml") && err.contains("nested more than 100"),
        "{err}"
    );
}

#[test]
fn manifest_name_with_a_slash_is_refused() {
    let d = project_copy();
    fs::write(
        d.path().join("recipes/manifests/bad.yaml"),
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a/b\ndata: {}\n",
    )
    .unwrap();
    edit(
        d.path(),
        "recipes/master.toml",
        "manifests = [",
        "manifests = [\"manifests/bad.yaml\", ",
    );
    let o = kiln(d.path(), &["build", "--role", "master"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.yaml") && err.contains("metadata.name"),
        "{err}"
    );
}

/// A seed template that renders 100 000 nested sequences is refused with the template named.
/// (Its output is checked like any YAML kiln parses.)
#[test]
fn deeply_nested_rendered_seed_is_refused() {
    let d = project_copy();
    let seed = d.path().join("overlays/seed");
    fs::create_dir_all(&seed).unwrap();
    fs::write(
        seed.join("network-config.tera"),
        // A loop, not literal brackets: the template check refuses deep brackets in the
        // template itself, so the nesting must come from rendering.
        "version: 2\nethernets: {% for i in range(end=100000) %}[{% endfor %}\n",
    )
    .unwrap();
    let out = d.path().join("seeds-out");
    let o = kiln(d.path(), &["seed", "-o", out.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("network-config.tera") && err.contains("nested more than 100"),
        "{err}"
    );
    assert!(!Path::new(&out).join("master-1").exists());
}

/// TOML nesting is bounded by the toml crate itself (80 levels): pinned, so a change of its
/// features cannot bring back slow refusals of cluster.toml or recipes.
#[test]
fn deeply_nested_toml_is_refused() {
    refused_cluster(
        "suite = \"bookworm\"",
        &format!(
            "suite = \"bookworm\"\nx = {}{}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        ),
        "line 7",
        "recursion limit",
    );
}

/// A seed template's network-config: `body` under a device matching the node, refused with
/// `needle` (the built-in template's checks apply to overrides too).
fn network_config_refused(body: &str, needle: &str) {
    let d = project_copy();
    let seed = d.path().join("overlays/seed");
    fs::create_dir_all(&seed).unwrap();
    fs::write(
        seed.join("network-config.tera"),
        format!("version: 2\nethernets:\n  e:\n    match:\n      macaddress: \"{{{{ node.mac }}}}\"\n{body}"),
    )
    .unwrap();
    let o = kiln(d.path(), &["seed"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for want in ["overlays/seed/network-config.tera", "fix:", needle] {
        assert!(err.contains(want), "error does not say {want:?}:\n{err}");
    }
}

#[test]
fn network_config_prefix_out_of_range_is_refused() {
    network_config_refused(
        "    addresses: [\"10.0.0.11/200\"]\n",
        "ethernets.e.addresses",
    );
}

#[test]
fn network_config_gateway4_of_the_wrong_family_is_refused() {
    network_config_refused(
        "    addresses: [\"10.0.0.11/24\"]\n    gateway4: \"fd00::1\"\n",
        "not an IPv4 address",
    );
}

#[test]
fn network_config_multicast_mac_match_is_refused() {
    network_config_refused(
        "  f:\n    match:\n      macaddress: \"01:00:5e:00:00:01\"\n",
        "multicast",
    );
}

// --- [[nodes.disks]] (issue 18) -----------------------------------------------------------------

const BY_ID: &str = "/dev/disk/by-id/nvme-Samsung_SSD_970_EVO_1TB_S467NX0M000001";
const BY_ID_2: &str = "/dev/disk/by-id/ata-WDC_WD40EFRX-68N32N0_WD-WCC7K0000002";
const BY_PATH: &str = "/dev/disk/by-path/pci-0000:00:1f.2-ata-3";

/// `[[nodes.disks]]` tables for master-1 (nodes[0]), one per `(device, rest)`: `rest` is the
/// table's other lines.
fn master_disks(disks: &[(&str, &str)]) -> String {
    disks
        .iter()
        .map(|(dev, rest)| format!("\n[[nodes.disks]]\ndevice = \"{dev}\"\n{rest}"))
        .collect()
}

/// master-1 with `disks`, refused with `key` and `needle`; every such error names the node.
fn refused_disks(disks: &[(&str, &str)], key: &str, needle: &str) {
    refused_master_key(&master_disks(disks), key, needle);
    refused_master_key(&master_disks(disks), key, "\"master-1\"");
}

#[test]
fn a_disk_by_an_unstable_name_is_refused() {
    refused_disks(
        &[("/dev/sdb", "use = \"longhorn\"")],
        "nodes[0].disks[0].device",
        "/dev/disk/by-id/",
    );
}

#[test]
fn a_disk_path_with_shell_syntax_is_refused() {
    refused_disks(
        &[("/dev/disk/by-id/x;reboot", "use = \"data\"")],
        "nodes[0].disks[0].device",
        "contains ';'",
    );
    refused_disks(
        &[("/dev/disk/by-id/../../sda", "use = \"data\"")],
        "nodes[0].disks[0].device",
        "'..'",
    );
}

#[test]
fn a_disk_needs_a_known_use() {
    refused_master_key(&master_disks(&[(BY_ID, "")]), "line", "missing field `use`");
    refused_master_key(
        &master_disks(&[(BY_ID, "use = \"swap\"")]),
        "line",
        "unknown variant `swap`",
    );
}

#[test]
fn unknown_disk_fields_are_refused() {
    let o = "use = \"longhorn\"\nsize = \"1T\"";
    refused_master_key(&master_disks(&[(BY_ID, o)]), "line", "unknown field `size`");
}

#[test]
fn two_data_disks_are_refused() {
    refused_disks(
        &[(BY_ID, "use = \"data\""), (BY_ID_2, "use = \"data\"")],
        "nodes[0].disks[1].use",
        "second data disk (disks[0]",
    );
}

#[test]
fn a_disk_listed_twice_is_refused() {
    refused_disks(
        &[(BY_ID, "use = \"data\""), (BY_ID, "use = \"longhorn\"")],
        "nodes[0].disks[1].device",
        "also disks[0]",
    );
}

#[test]
fn the_boot_disk_is_not_an_extra_disk() {
    let line = format!(
        "disk = \"{BY_ID}\"{}",
        master_disks(&[(BY_ID, "use = \"longhorn\"")])
    );
    refused_master_key(&line, "nodes[0].disks[0].device", "boot disk");
}

#[test]
fn a_mount_on_the_data_disk_is_refused() {
    refused_disks(
        &[(BY_ID, "use = \"data\"\nmount = \"/srv/data\"")],
        "nodes[0].disks[0].mount",
        "data partition",
    );
}

#[test]
fn tags_on_the_data_disk_are_refused() {
    refused_disks(
        &[(BY_ID, "use = \"data\"\ntags = [\"nvme\"]")],
        "nodes[0].disks[0].tags",
        "data disk",
    );
}

#[test]
fn bad_longhorn_mounts_are_refused() {
    for (mount, needle) in [
        ("srv/disk", "absolute"),
        ("/srv/disk/", "ends with '/'"),
        ("/srv/../disk", "normalised"),
        ("/tmp/disk", "under /tmp"),
        ("/var", "too broad"),
        ("/srv/disk one", "contains ' '"),
    ] {
        let rest = format!("use = \"longhorn\"\nmount = \"{mount}\"");
        refused_disks(&[(BY_ID, &rest)], "nodes[0].disks[0].mount", needle);
    }
}

#[test]
fn duplicate_and_nested_mounts_are_refused() {
    // disks[1]'s default mount is /var/lib/longhorn-disks/disk1, which disks[0] took.
    refused_disks(
        &[
            (
                BY_ID,
                "use = \"longhorn\"\nmount = \"/var/lib/longhorn-disks/disk1\"",
            ),
            (BY_ID_2, "use = \"longhorn\""),
        ],
        "nodes[0].disks[1].mount",
        "is also the mount of disks[0]",
    );
    refused_disks(
        &[
            (BY_ID, "use = \"longhorn\"\nmount = \"/srv/lh\""),
            (BY_ID_2, "use = \"longhorn\"\nmount = \"/srv/lh/fast\""),
        ],
        "nodes[0].disks[1].mount",
        "inside the mount of disks[0]",
    );
}

#[test]
fn bad_longhorn_tags_are_refused() {
    for (tags, key, needle) in [
        (
            "[\"nvme ssd\"]",
            "nodes[0].disks[0].tags[0]",
            "not a Longhorn disk tag",
        ),
        (
            "[\"\"]",
            "nodes[0].disks[0].tags[0]",
            "not a Longhorn disk tag",
        ),
        ("[\"ok\", \"ok\"]", "nodes[0].disks[0].tags[1]", "twice"),
    ] {
        let rest = format!("use = \"longhorn\"\ntags = {tags}");
        refused_disks(&[(BY_ID, &rest)], key, needle);
    }
    let long = format!("[\"{}\"]", "t".repeat(64));
    let rest = format!("use = \"longhorn\"\ntags = {long}");
    refused_disks(&[(BY_ID, &rest)], "nodes[0].disks[0].tags[0]", "tag");
    let many: Vec<String> = (0..17).map(|i| format!("\"t{i}\"")).collect();
    let rest = format!("use = \"longhorn\"\ntags = [{}]", many.join(", "));
    refused_disks(&[(BY_ID, &rest)], "nodes[0].disks[0].tags", "17 tags");
}

#[test]
fn more_than_sixteen_disks_are_refused() {
    let devs: Vec<String> = (0..17).map(|i| format!("{BY_PATH}{i}")).collect();
    let disks: Vec<(&str, &str)> = devs
        .iter()
        .map(|d| (d.as_str(), "use = \"longhorn\""))
        .collect();
    refused_disks(&disks, "nodes[0].disks", "17 disks");
}

/// A project whose master-1 has a data disk and two Longhorn disks (one with its own mount).
fn project_with_disks() -> (tempfile::TempDir, kiln::project::recipe::Project) {
    let d = project_copy();
    let disks = master_disks(&[
        (BY_ID, "use = \"data\"\nwipe = true"),
        (BY_ID_2, "use = \"longhorn\"\ntags = [\"hdd\", \"big\"]"),
        (
            BY_PATH,
            "use = \"longhorn\"\nmount = \"/srv/fast\"\ntags = [\"nvme\"]",
        ),
    ]);
    edit(
        d.path(),
        CLUSTER,
        MASTER_DNS,
        &format!("{MASTER_DNS}\n{disks}"),
    );
    let p = kiln::project::recipe::load_project(d.path()).unwrap();
    (d, p)
}

#[test]
fn disks_file_lists_every_disk_with_its_mount() {
    use kiln::project::inventory::disks_file;
    let (_d, p) = project_with_disks();
    let want = format!(
        "# use\tdevice\twipe\tmount\ttags (generated by kiln)\n\
         data\t{BY_ID}\t1\t-\t-\n\
         longhorn\t{BY_ID_2}\t0\t/var/lib/longhorn-disks/disk0\thdd,big\n\
         longhorn\t{BY_PATH}\t0\t/srv/fast\tnvme\n"
    );
    assert_eq!(
        disks_file(&p.cluster.nodes[0]).as_deref(),
        Some(want.as_str())
    );
    assert_eq!(
        disks_file(&p.cluster.nodes[1]),
        None,
        "worker-1 names no disks"
    );
}

#[test]
fn longhorn_disks_config_is_longhorns_annotation_value() {
    use kiln::project::inventory::longhorn_disks_config;
    let (_d, p) = project_with_disks();
    let j = longhorn_disks_config(&p.cluster.nodes[0]).unwrap();
    assert_eq!(
        j,
        r#"[{"path":"/var/lib/longhorn-disks/disk0","allowScheduling":true,"tags":["hdd","big"]},{"path":"/srv/fast","allowScheduling":true,"tags":["nvme"]}]"#
    );
    let v: serde_json::Value = serde_json::from_str(&j).unwrap();
    assert_eq!(
        v.as_array().unwrap().len(),
        2,
        "the data disk is not Longhorn's"
    );
    assert_eq!(longhorn_disks_config(&p.cluster.nodes[1]), None);

    // A node with only a data disk announces nothing to Longhorn.
    let d = project_copy();
    let disks = master_disks(&[(BY_ID, "use = \"data\"")]);
    edit(
        d.path(),
        CLUSTER,
        MASTER_DNS,
        &format!("{MASTER_DNS}\n{disks}"),
    );
    let p = kiln::project::recipe::load_project(d.path()).unwrap();
    assert_eq!(longhorn_disks_config(&p.cluster.nodes[0]), None);
    assert!(kiln::project::inventory::disks_file(&p.cluster.nodes[0]).is_some());
}

#[test]
fn a_longhorn_mount_on_a_persistent_path_is_refused() {
    // master's persistent paths include /var/lib/rancher (every k3s role's default).
    for (mount, how) in [
        ("/var/lib/rancher", "is the persistent path"),
        ("/var/lib/rancher/longhorn", "is inside the persistent path"),
        ("/var/lib", "holds the persistent path"),
    ] {
        let line = master_disks(&[(BY_ID, &format!("use = \"longhorn\"\nmount = \"{mount}\""))]);
        refused(
            &[(CLUSTER, MASTER_DNS, &format!("{MASTER_DNS}\n{line}"))],
            "master",
            CLUSTER,
            "nodes[0].disks[0].mount",
            how,
        );
    }
}

#[test]
fn a_longhorn_disk_on_a_role_without_k3s_is_refused() {
    let line = format!(
        "role = \"worker\"\n{}",
        master_disks(&[(BY_ID, "use = \"longhorn\"")])
    );
    refused(
        &[
            ("recipes/worker.toml", "mode = \"agent\"", "mode = \"none\""),
            (
                CLUSTER,
                "mac = \"52:54:00:00:00:21\"\nrole = \"worker\"",
                &format!("mac = \"52:54:00:00:00:21\"\n{line}"),
            ),
        ],
        "worker",
        CLUSTER,
        "nodes[1].disks[0].use",
        "does not run k3s",
    );
}
