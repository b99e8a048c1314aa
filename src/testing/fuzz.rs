//! Fuzz entry points for fuzz/fuzz_targets/ (and the fixed-seed mutation test in
//! `deliver::serve`): the PXE server's parsers, and the pre-check and name checks of project
//! input, on arbitrary bytes.

use crate::deliver::serve::catalog::Catalog;
use crate::deliver::serve::{dhcp, http, tftp, State};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

/// Fuzz entry (fuzz/fuzz_targets/dhcp.rs): `bytes` as a DHCP packet on either port and in
/// either mode must not panic; every reply encodes.
pub fn fuzz_dhcp(bytes: &[u8]) {
    static ST: std::sync::OnceLock<(tempfile::TempDir, State)> = std::sync::OnceLock::new();
    let (_, st) = ST.get_or_init(|| {
        let d = tempfile::tempdir().expect("tempdir");
        for f in ["undionly.kpxe", "ipxe.efi", "snp.efi"] {
            std::fs::write(d.path().join(f), b"x").expect("write");
        }
        let st = State::new(
            Catalog::default(),
            "http://10.0.0.1:8080".into(),
            d.path().into(),
        );
        (d, st)
    });
    let pool = dhcp::Mode::Full(Mutex::new(dhcp::Pool::new(dhcp::PoolConfig {
        start: Ipv4Addr::new(10, 0, 0, 100),
        end: Ipv4Addr::new(10, 0, 0, 103),
        netmask: Ipv4Addr::new(255, 255, 255, 0),
        router: None,
        dns: vec![],
        lease: Duration::from_secs(60),
        fixed: BTreeMap::new(),
    })));
    let from: SocketAddr = "10.0.0.57:68".parse().expect("addr");
    for mode in [&dhcp::Mode::Proxy, &pool] {
        for proxy_port in [false, true] {
            if let Some((reply, _)) = dhcp::answer(
                bytes,
                from,
                proxy_port,
                mode,
                st,
                Ipv4Addr::new(10, 0, 0, 1),
            ) {
                use dhcproto::Encodable;
                reply.to_vec().expect("a reply always encodes");
            }
        }
    }
}

/// Fuzz entry (fuzz/fuzz_targets/tftp.rs): parsing never panics; what parses round-trips.
pub fn fuzz_tftp(bytes: &[u8]) {
    if let Ok(p) = tftp::parse(bytes) {
        if let tftp::Packet::Rrq { options, .. } = &p {
            let n = tftp::negotiate(options, bytes.len() as u64, tftp::DEFAULT_MAX_BLKSIZE);
            assert!((8..=tftp::DEFAULT_MAX_BLKSIZE).contains(&n.blksize) || n.blksize == 512);
            assert!((1..=tftp::MAX_WINDOWSIZE).contains(&n.windowsize));
        }
        assert_eq!(
            tftp::parse(&tftp::encode(&p)).as_ref(),
            Ok(&p),
            "round trip"
        );
    }
}

/// Fuzz entry (fuzz/fuzz_targets/http_range.rs): the first 8 bytes are the file length, the
/// rest the header; an accepted range lies inside the file.
pub fn fuzz_range(bytes: &[u8]) {
    if bytes.len() < 8 {
        return;
    }
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) >> 20;
    let h = String::from_utf8_lossy(&bytes[8..]);
    if let Ok(Some((a, b))) = http::parse_range(Some(&h), len) {
        assert!(a <= b && b < len, "{h:?} on {len}: {a}-{b}");
    }
}

/// Fuzz entry (fuzz/fuzz_targets/yaml_limits.rs): the YAML/JSON pre-check and the name checks
/// never panic on any text; what the pre-check passes, serde_yaml parses without reaching its
/// own recursion limit (the pre-check does not count too little), aliases aside (they can nest
/// a shallow text deeply, and serde_yaml bounds them itself).
pub fn fuzz_yaml_limits(bytes: &[u8]) {
    use crate::project::{limits, names};
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    for f in [
        names::domain_problem,
        names::k8s_subdomain_problem,
        names::k8s_label_problem,
        names::k8s_any_name_problem,
        names::label_key_problem,
        names::label_value_problem,
        names::disk_path_problem,
    ] {
        let _ = f(text);
    }
    if limits::check_yaml(text, limits::SECRET).is_ok() && !text.contains('*') {
        for doc in serde_yaml::Deserializer::from_str(text) {
            use serde::Deserialize;
            if let Err(e) = serde_yaml::Value::deserialize(doc) {
                assert!(
                    !e.to_string().contains("recursion limit exceeded"),
                    "the pre-check passed a text nested deeper than serde_yaml's limit: {e}"
                );
                break;
            }
        }
    }
}
