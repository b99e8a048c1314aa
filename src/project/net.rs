//! IPv4 subnets and address classes, for the inventory's network checks: what a host address,
//! a gateway or a DNS server may be.

use std::net::{IpAddr, Ipv4Addr};

/// An IPv4 address with its prefix length, e.g. `10.0.0.11/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr4 {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr4 {
    fn mask(&self) -> u32 {
        match self.prefix {
            0 => 0,
            p => u32::MAX << (32 - u32::from(p.min(32))),
        }
    }
    /// The subnet's network address (host bits zero).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    /// The subnet's broadcast address (host bits one).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
    /// `ip` is in this subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
    /// The two subnets share an address.
    pub fn overlaps(&self, other: &Cidr4) -> bool {
        let m = self.mask() & other.mask();
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }
}

impl std::fmt::Display for Cidr4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// `a.b.c.d/len` as a [`Cidr4`] (`None` for IPv6, `dhcp` or anything malformed).
pub fn parse_cidr4(s: &str) -> Option<Cidr4> {
    match parse_cidr(s)? {
        (IpAddr::V4(addr), prefix) => Some(Cidr4 { addr, prefix }),
        _ => None,
    }
}

/// `a.b.c.d/len` or `v6/len` with a length the family allows.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, len) = s.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    (len <= if ip.is_ipv4() { 32 } else { 128 }).then_some((ip, len))
}

/// Why `ip` cannot be a machine's own address (or its gateway): `None` for a unicast address.
pub fn host_address_problem(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_unspecified() || o[0] == 0 {
        Some("is in 0.0.0.0/8 (\"this network\"), not a host address")
    } else if ip.is_broadcast() {
        Some("is the limited broadcast address")
    } else if ip.is_multicast() {
        Some("is a multicast address (224.0.0.0/4)")
    } else if o[0] >= 240 {
        Some("is in the reserved 240.0.0.0/4 block")
    } else if ip.is_loopback() {
        Some("is a loopback address (127.0.0.0/8)")
    } else if ip.is_link_local() {
        Some("is a link-local address (169.254.0.0/16), which hosts pick for themselves")
    } else {
        None
    }
}

/// Why `ip` cannot be a DNS server a node queries: `None` for a unicast address (a loopback
/// resolver included).
pub fn dns_server_problem(ip: Ipv4Addr) -> Option<&'static str> {
    match host_address_problem(ip) {
        Some(_) if ip.is_loopback() => None,
        p => p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let c = Cidr4 {
            addr: "10.0.0.11".parse().unwrap(),
            prefix: 24,
        };
        assert_eq!(c.network(), Ipv4Addr::new(10, 0, 0, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(10, 0, 0, 255));
        assert!(c.contains(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(!c.contains(Ipv4Addr::new(10, 0, 1, 1)));
        let wide = Cidr4 {
            addr: "10.0.0.0".parse().unwrap(),
            prefix: 8,
        };
        assert!(c.overlaps(&wide) && wide.overlaps(&c));
        let other = Cidr4 {
            addr: "10.42.0.0".parse().unwrap(),
            prefix: 16,
        };
        assert!(!c.overlaps(&other));
        assert_eq!(parse_cidr("10.0.0.1/33"), None);
        assert_eq!(parse_cidr("10.0.0.1/+8"), None);
        assert_eq!(parse_cidr("10.0.0.1/"), None);
        assert!(parse_cidr("fd00::1/64").is_some());
        for bad in [
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "240.0.0.1",
            "127.0.0.1",
            "169.254.1.1",
        ] {
            assert!(
                host_address_problem(bad.parse().unwrap()).is_some(),
                "{bad}"
            );
        }
        assert_eq!(host_address_problem(Ipv4Addr::new(192, 168, 1, 10)), None);
        assert_eq!(dns_server_problem(Ipv4Addr::new(127, 0, 0, 53)), None);
        assert!(dns_server_problem(Ipv4Addr::new(224, 0, 0, 251)).is_some());
    }
}
