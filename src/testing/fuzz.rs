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
    // The frame check runs first: whatever it refuses is never answered.
    let frame_ok = dhcp::check_frame(bytes).is_ok();
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
                assert!(frame_ok, "answered a packet the frame check refuses");
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
            assert!(n.timeout <= Duration::from_secs(tftp::MAX_TIMEOUT_SECS));
            // The OACK names each option once, only options asked for, with in-range values.
            let mut names: Vec<&str> = n.oack.iter().map(|(k, _)| k.as_str()).collect();
            names.sort_unstable();
            let count = names.len();
            names.dedup();
            assert_eq!(
                names.len(),
                count,
                "repeated option in the OACK: {:?}",
                n.oack
            );
            for (k, v) in &n.oack {
                assert!(options.iter().any(|(o, _)| o == k), "{k} not asked for");
                let x: u64 = v.parse().expect("a decimal value");
                match k.as_str() {
                    "blksize" => assert!((8..=tftp::MAX_BLKSIZE as u64).contains(&x)),
                    "windowsize" => assert!((1..=u64::from(tftp::MAX_WINDOWSIZE)).contains(&x)),
                    "timeout" => assert!((1..=tftp::MAX_TIMEOUT_SECS).contains(&x)),
                    "tsize" => assert_eq!(x, bytes.len() as u64),
                    other => panic!("unknown option {other} acknowledged"),
                }
            }
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
    // The same bytes as validator lists and as request text for a log line.
    let tag = "\"0123abcd\"";
    if http::if_range_matches(&h, tag) {
        assert!(http::if_none_match(&h, tag), "{h:?}");
    }
    let logged = http::log_safe(&h);
    assert!(!logged.chars().any(|c| c.is_control()), "{logged:?}");
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
                // serde_yaml's own message starts so; a key quoted in another error may
                // contain the words.
                assert!(
                    !e.to_string().starts_with("recursion limit exceeded"),
                    "the pre-check passed a text nested deeper than serde_yaml's limit: {e}"
                );
                break;
            }
        }
    }
}

/// Fuzz entry (fuzz/fuzz_targets/template.rs): the template checks (kiln's pre-checks, tera's
/// parser, the AST checks) return Ok or a RecipeError on any text — never a panic or a stack
/// overflow; what they accept is within kiln's bounds.
pub fn fuzz_template(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    let _ = crate::project::template::check(std::path::Path::new("fuzz.tera"), text);
}

#[cfg(test)]
mod tests {
    /// Every committed seed (fuzz/seeds/) goes through its entry point in every `cargo test`.
    #[test]
    fn committed_seeds_pass_their_fuzz_entry() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
        for (dir, f) in [
            ("dhcp", super::fuzz_dhcp as fn(&[u8])),
            ("tftp", super::fuzz_tftp as fn(&[u8])),
            ("http_range", super::fuzz_range as fn(&[u8])),
            ("yaml_limits", super::fuzz_yaml_limits as fn(&[u8])),
            ("template", super::fuzz_template as fn(&[u8])),
        ] {
            let mut n = 0;
            for e in std::fs::read_dir(seeds.join(dir)).expect("seed directory") {
                f(&std::fs::read(e.expect("entry").path()).expect("seed"));
                n += 1;
            }
            assert!(n > 0, "no seeds in {dir}");
        }
    }
}
