//! DHCP for PXE: ProxyDHCP (RFC 4578 / PXE 2.1: UDP 67 and 4011), which never hands out
//! addresses and so coexists with the site's DHCP server, and an optional full DHCP mode with a
//! lease range for isolated networks. Packets are decoded and encoded with `dhcproto`.
//!
//! Boot file by client: PXE firmware (option 60 `PXEClient`) gets an iPXE binary over TFTP by
//! architecture (option 93); UEFI HTTP boot (`HTTPClient`) gets the iPXE EFI binary as an HTTP
//! URL; iPXE itself (option 77 `iPXE`, or option 175) gets the URL of its per-MAC script, which
//! ends the chainload loop.
//!
//! Every packet is untrusted: before decoding, the fixed header is checked (BOOTREQUEST,
//! Ethernet with a 6-byte address, at most 16 relay hops, the magic cookie) and the options
//! walked (none may run past the end, no option overload, no repeated option kiln reads);
//! each listener answers at most a burst of [`Flood::BURST`] packets per MAC, then one a second.
//! Full mode holds an address a client DECLINEd for [`DECLINE_HOLD`] (RFC 2131 4.3.3) and NAKs
//! requests for addresses outside the range or leased to another MAC.

use super::State;
#[cfg(any(test, feature = "testing"))]
use dhcproto::v4::{Architecture, Flags};
use dhcproto::v4::{DhcpOption, DhcpOptions, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::sync::watch;

/// Firmware type from option 93 (IANA "Processor Architecture Types").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientArch {
    /// 0: x86 BIOS.
    Bios,
    /// 6: x86 (32-bit) UEFI.
    UefiIa32,
    /// 7 or 9: x86-64 UEFI.
    UefiX64,
    /// 11: ARM 64-bit UEFI.
    UefiArm64,
    /// 16: x86-64 UEFI HTTP boot.
    HttpX64,
    /// 19: ARM 64-bit UEFI HTTP boot.
    HttpArm64,
    Other(u16),
}

impl ClientArch {
    pub fn from_code(c: u16) -> ClientArch {
        match c {
            0 => ClientArch::Bios,
            6 => ClientArch::UefiIa32,
            7 | 9 => ClientArch::UefiX64,
            11 => ClientArch::UefiArm64,
            16 => ClientArch::HttpX64,
            19 => ClientArch::HttpArm64,
            n => ClientArch::Other(n),
        }
    }

    /// Metrics / log label.
    pub fn label(&self) -> String {
        match self {
            ClientArch::Bios => "bios".into(),
            ClientArch::UefiIa32 => "uefi-ia32".into(),
            ClientArch::UefiX64 => "uefi-x64".into(),
            ClientArch::UefiArm64 => "uefi-arm64".into(),
            ClientArch::HttpX64 => "uefi-http-x64".into(),
            ClientArch::HttpArm64 => "uefi-http-arm64".into(),
            ClientArch::Other(n) => format!("arch-{n}"),
        }
    }

    /// The iPXE binary (Debian's `ipxe` package names) this firmware loads first.
    pub fn ipxe_file(&self) -> Option<&'static str> {
        match self {
            ClientArch::Bios => Some("undionly.kpxe"),
            ClientArch::UefiX64 | ClientArch::HttpX64 => Some("ipxe.efi"),
            ClientArch::UefiArm64 | ClientArch::HttpArm64 => Some("snp.efi"),
            ClientArch::UefiIa32 | ClientArch::Other(_) => None,
        }
    }

    pub fn is_http(&self) -> bool {
        matches!(self, ClientArch::HttpX64 | ClientArch::HttpArm64)
    }
}

/// A PXE client's request, as far as kiln cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeClient {
    /// `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    pub msg_type: MessageType,
    pub arch: ClientArch,
    /// iPXE is asking (option 77 `iPXE` or option 175 present).
    pub ipxe: bool,
    /// Option 60 started with `HTTPClient`.
    pub http_client: bool,
}

/// Why a packet gets no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// Shorter than the fixed header and the magic cookie (240 bytes).
    Short,
    /// Bytes 236..240 are not the magic cookie 99.130.83.99 (RFC 2131 3): BOOTP or noise.
    BadCookie,
    /// An option's length runs past the end of the packet.
    TruncatedOptions,
    /// Option 52: more options in `sname`/`file`, which kiln does not read (PXE clients never
    /// send it), so the packet cannot be understood whole.
    OptionOverload,
    /// An option kiln reads is present twice (which one would count is ambiguous).
    DuplicateOption,
    /// More than 16 relay hops (RFC 1542 4.1.1).
    TooManyHops,
    /// As large as the receive buffer: possibly cut off.
    Oversized,
    /// The MAC sent more than its share of packets ([`Flood`]).
    RateLimited,
    NotBootRequest,
    NoMessageType,
    BadHardwareAddress,
    /// Option 60 does not start with `PXEClient`/`HTTPClient`.
    NotPxe,
    /// No option 93.
    NoArchitecture,
}

impl Ignored {
    pub fn label(&self) -> &'static str {
        match self {
            Ignored::Short => "short",
            Ignored::BadCookie => "bad_cookie",
            Ignored::TruncatedOptions => "truncated_options",
            Ignored::OptionOverload => "option_overload",
            Ignored::DuplicateOption => "duplicate_option",
            Ignored::TooManyHops => "too_many_hops",
            Ignored::Oversized => "oversized",
            Ignored::RateLimited => "rate_limited",
            Ignored::NotBootRequest => "not_bootrequest",
            Ignored::NoMessageType => "no_message_type",
            Ignored::BadHardwareAddress => "bad_chaddr",
            Ignored::NotPxe => "not_pxe",
            Ignored::NoArchitecture => "no_arch",
        }
    }
}

/// Options kiln reads: each may appear once.
const READ_ONCE: &[u8] = &[50, 53, 54, 60, 61, 77, 93, 97, 175];

/// Checks the raw packet before it is decoded: the fixed header a BOOTREQUEST from an Ethernet
/// client has, the magic cookie, and the option area (every option complete, no overload, no
/// repeated option kiln reads). A missing END is tolerated when every option is complete.
pub fn check_frame(b: &[u8]) -> Result<(), Ignored> {
    if b.len() < 240 {
        return Err(Ignored::Short);
    }
    if b[0] != 1 {
        return Err(Ignored::NotBootRequest);
    }
    if b[1] != 1 || b[2] != 6 {
        return Err(Ignored::BadHardwareAddress); // htype Ethernet, hlen 6
    }
    if b[3] > 16 {
        return Err(Ignored::TooManyHops);
    }
    if b[236..240] != dhcproto::v4::MAGIC {
        return Err(Ignored::BadCookie);
    }
    let mut seen = [false; 256];
    let mut i = 240;
    while i < b.len() {
        match b[i] {
            0 => i += 1,
            255 => return Ok(()),
            code => {
                let Some(&len) = b.get(i + 1) else {
                    return Err(Ignored::TruncatedOptions);
                };
                let end = i + 2 + len as usize;
                if end > b.len() {
                    return Err(Ignored::TruncatedOptions);
                }
                if code == 52 {
                    return Err(Ignored::OptionOverload);
                }
                if READ_ONCE.contains(&code) && std::mem::replace(&mut seen[code as usize], true) {
                    return Err(Ignored::DuplicateOption);
                }
                i = end;
            }
        }
    }
    Ok(())
}

/// Per-MAC packet budget of one listener: a burst of [`Flood::BURST`], then one a second. A
/// PXE boot (firmware, then iPXE, then the OS) sends a handful; a flood from one MAC is not
/// answered. The table is bounded: past [`Flood::MAX_TRACKED`] MACs it starts again.
#[derive(Debug, Default)]
pub struct Flood {
    buckets: BTreeMap<[u8; 6], (f64, Instant)>,
}

impl Flood {
    pub const BURST: f64 = 16.0;
    pub const PER_SEC: f64 = 1.0;
    pub const MAX_TRACKED: usize = 4096;

    /// Whether a packet from `mac` at `now` is within its budget (and takes from it).
    pub fn allow(&mut self, mac: [u8; 6], now: Instant) -> bool {
        if self.buckets.len() >= Self::MAX_TRACKED && !self.buckets.contains_key(&mac) {
            // Forget the MACs whose budget is full again; if that is not enough, everyone.
            let full = Duration::from_secs_f64(Self::BURST / Self::PER_SEC);
            self.buckets
                .retain(|_, (_, t)| now.saturating_duration_since(*t) < full);
            if self.buckets.len() >= Self::MAX_TRACKED {
                self.buckets.clear();
            }
        }
        let (tokens, last) = self.buckets.entry(mac).or_insert((Self::BURST, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * Self::PER_SEC;
        *tokens = (*tokens + refill).min(Self::BURST);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The MAC in a raw packet's chaddr (bytes 28..34), without decoding it.
pub fn raw_mac(b: &[u8]) -> Option<[u8; 6]> {
    b.get(28..34).map(|m| m.try_into().expect("6 bytes"))
}

/// The Ethernet MAC of a request, normalised.
pub fn client_mac(msg: &Message) -> Option<String> {
    if msg.hlen() > 16 {
        return None; // `chaddr()` would panic
    }
    let c = msg.chaddr();
    (msg.htype() == dhcproto::v4::HType::Eth && msg.hlen() == 6 && c.len() >= 6).then(|| {
        c[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    })
}

/// Decides whether `msg` is a PXE client kiln should answer.
pub fn classify(msg: &Message) -> Result<PxeClient, Ignored> {
    if msg.opcode() != Opcode::BootRequest {
        return Err(Ignored::NotBootRequest);
    }
    let msg_type = msg.opts().msg_type().ok_or(Ignored::NoMessageType)?;
    let mac = client_mac(msg).ok_or(Ignored::BadHardwareAddress)?;
    let class = match msg.opts().get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(v)) => v.clone(),
        _ => return Err(Ignored::NotPxe),
    };
    let http_client = class.starts_with(b"HTTPClient");
    if !class.starts_with(b"PXEClient") && !http_client {
        return Err(Ignored::NotPxe);
    }
    let arch = match msg.opts().get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(a)) => ClientArch::from_code(u16::from(*a)),
        _ => return Err(Ignored::NoArchitecture),
    };
    let user_class_ipxe = match msg.opts().get(OptionCode::UserClass) {
        // iPXE sends the bare string; RFC 3004 clients a length-prefixed list.
        Some(DhcpOption::UserClass(v)) => {
            v.as_slice() == b"iPXE" || v.windows(4).any(|w| w == b"iPXE")
        }
        _ => false,
    };
    let ipxe_encap = msg.opts().get(OptionCode::Unknown(175)).is_some();
    Ok(PxeClient {
        mac,
        msg_type,
        arch,
        ipxe: user_class_ipxe || ipxe_encap,
        http_client,
    })
}

/// What the client is told to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootFile {
    /// A TFTP file name or an HTTP URL.
    pub file: String,
    /// Answer as `HTTPClient` (UEFI HTTP boot) rather than `PXEClient`.
    pub http: bool,
}

/// Picks the boot file: the script URL for iPXE, the iPXE binary for firmware (HTTP URL for
/// UEFI HTTP boot, TFTP name otherwise). `available(name)` says whether the TFTP root has it.
pub fn boot_file(
    c: &PxeClient,
    http_base: &str,
    available: impl Fn(&str) -> bool,
) -> Result<BootFile, String> {
    if c.ipxe {
        return Ok(BootFile {
            file: format!("{http_base}/boot.ipxe?mac={}", c.mac.replace(':', "-")),
            http: c.http_client,
        });
    }
    let Some(name) = c.arch.ipxe_file() else {
        return Err(format!(
            "no iPXE binary for client architecture {} (option 93)",
            c.arch.label()
        ));
    };
    if !available(name) {
        return Err(format!(
            "{name} (for {} clients) is not in the iPXE directory",
            c.arch.label()
        ));
    }
    if c.arch.is_http() || c.http_client {
        Ok(BootFile {
            file: format!("{http_base}/ipxe/{name}"),
            http: true,
        })
    } else {
        Ok(BootFile {
            file: name.to_string(),
            http: false,
        })
    }
}

/// Adds the PXE boot options to a reply: vendor class, boot file (in `file` and option 67),
/// option 43 (PXE discovery control: boot the file directly), option 97 echoed.
fn add_boot(reply: &mut Message, req: &Message, server: Ipv4Addr, boot: &BootFile) {
    reply.set_siaddr(server);
    reply.set_fname_str(&boot.file);
    let o = reply.opts_mut();
    o.insert(DhcpOption::ClassIdentifier(if boot.http {
        b"HTTPClient".to_vec()
    } else {
        b"PXEClient".to_vec()
    }));
    o.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
    o.insert(DhcpOption::BootfileName(boot.file.as_bytes().to_vec()));
    if let Some(DhcpOption::ClientMachineIdentifier(g)) =
        req.opts().get(OptionCode::ClientMachineIdentifier)
    {
        o.insert(DhcpOption::ClientMachineIdentifier(g.clone()));
    }
}

fn reply_skeleton(
    req: &Message,
    yiaddr: Ipv4Addr,
    msg_type: MessageType,
    server: Ipv4Addr,
) -> Message {
    let mut r = Message::default();
    r.set_opcode(Opcode::BootReply)
        .set_htype(req.htype())
        .set_xid(req.xid())
        .set_flags(req.flags())
        .set_giaddr(req.giaddr())
        .set_ciaddr(req.ciaddr())
        .set_yiaddr(yiaddr)
        .set_chaddr(req.chaddr());
    let mut o = DhcpOptions::new();
    o.insert(DhcpOption::MessageType(msg_type));
    o.insert(DhcpOption::ServerIdentifier(server));
    r.set_opts(o);
    r
}

/// The ProxyDHCP answer: OFFER to a DISCOVER on port 67, ACK to a REQUEST on port 4011;
/// `yiaddr` is always 0.0.0.0 (addresses come from the site's DHCP server).
pub fn proxy_reply(req: &Message, c: &PxeClient, server: Ipv4Addr, boot: &BootFile) -> Message {
    let t = if c.msg_type == MessageType::Discover {
        MessageType::Offer
    } else {
        MessageType::Ack
    };
    let mut r = reply_skeleton(req, Ipv4Addr::UNSPECIFIED, t, server);
    add_boot(&mut r, req, server, boot);
    r
}

/// Full DHCP mode settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub lease: Duration,
    /// Inventory nodes with a static address inside the subnet always get that address.
    pub fixed: BTreeMap<String, Ipv4Addr>,
}

/// How long an address a client DECLINEd (RFC 2131 4.3.3: another host answers for it) is not
/// offered again (ISC dhcpd's default).
pub const DECLINE_HOLD: Duration = Duration::from_secs(600);

/// Leases of the full DHCP mode (in memory: a restart forgets them, clients re-request).
#[derive(Debug)]
pub struct Pool {
    pub cfg: PoolConfig,
    leases: BTreeMap<String, (Ipv4Addr, Instant)>,
    /// Addresses declined, and until when they are not offered.
    declined: BTreeMap<Ipv4Addr, Instant>,
}

impl Pool {
    pub fn new(cfg: PoolConfig) -> Pool {
        Pool {
            cfg,
            leases: BTreeMap::new(),
            declined: BTreeMap::new(),
        }
    }

    fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        let m = u32::from(self.cfg.netmask);
        u32::from(ip) & m == u32::from(self.cfg.start) & m
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.cfg.start)..=u32::from(self.cfg.end)).contains(&u32::from(ip))
    }

    /// Whether `ip` may be leased to `mac` now: in the range, not declined recently, not an
    /// inventory node's fixed address, not leased to another MAC.
    fn usable(&self, ip: Ipv4Addr, mac: &str, now: Instant) -> bool {
        self.in_range(ip)
            && self.declined.get(&ip).is_none_or(|until| *until <= now)
            && !self.cfg.fixed.values().any(|f| *f == ip)
            && !self
                .leases
                .iter()
                .any(|(m, (i, exp))| m != mac && *i == ip && *exp > now)
    }

    /// The address for `mac`: its fixed one, its current lease, the one it asks for (when
    /// usable), or the lowest usable one.
    pub fn address_for(
        &mut self,
        mac: &str,
        requested: Option<Ipv4Addr>,
        now: Instant,
    ) -> Option<Ipv4Addr> {
        if let Some(ip) = self.cfg.fixed.get(mac) {
            return Some(*ip);
        }
        self.declined.retain(|_, until| *until > now);
        if let Some((ip, _)) = self.leases.get(mac) {
            if self.usable(*ip, mac, now) {
                return Some(*ip);
            }
        }
        if let Some(ip) = requested.filter(|ip| self.usable(*ip, mac, now)) {
            return Some(ip);
        }
        (u32::from(self.cfg.start)..=u32::from(self.cfg.end))
            .map(Ipv4Addr::from)
            .find(|ip| self.usable(*ip, mac, now))
    }

    fn bind(&mut self, mac: &str, ip: Ipv4Addr, now: Instant) {
        if !self.cfg.fixed.contains_key(mac) {
            // An expired lease of another MAC on the same address goes.
            self.leases.retain(|m, (i, _)| m == mac || *i != ip);
            self.leases
                .insert(mac.to_string(), (ip, now + self.cfg.lease));
        }
    }

    fn release(&mut self, mac: &str) {
        self.leases.remove(mac);
    }

    /// Whether `ip` is `mac`'s (its lease or its fixed address).
    fn holds(&self, mac: &str, ip: Ipv4Addr) -> bool {
        self.leases.get(mac).is_some_and(|(i, _)| *i == ip) || self.cfg.fixed.get(mac) == Some(&ip)
    }

    /// Answers a DHCP request in full mode; PXE clients also get `boot`. Err: why there is no
    /// answer (a `kiln_dhcp_ignored_total` reason).
    pub fn reply(
        &mut self,
        req: &Message,
        server: Ipv4Addr,
        boot: Option<&BootFile>,
        now: Instant,
    ) -> Result<Message, &'static str> {
        if req.opcode() != Opcode::BootRequest {
            return Err("not_bootrequest");
        }
        let mac = client_mac(req).ok_or("bad_chaddr")?;
        if !req.giaddr().is_unspecified() && !self.in_subnet(req.giaddr()) {
            // Relayed from another subnet: this pool's addresses would not work there.
            return Err("relay_other_subnet");
        }
        let requested = match req.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let for_us = match req.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(s)) => *s == server,
            _ => true,
        };
        let t = req.opts().msg_type().ok_or("no_message_type")?;
        let nak = |why: &str| {
            tracing::info!(target: "kiln::serve::dhcp", %mac, requested = %requested.unwrap_or(req.ciaddr()), "NAK: {why}");
            let mut nak = reply_skeleton(req, Ipv4Addr::UNSPECIFIED, MessageType::Nak, server);
            nak.set_ciaddr(Ipv4Addr::UNSPECIFIED);
            Ok(nak)
        };
        let (ip, reply_type) = match t {
            MessageType::Discover => match self.address_for(&mac, requested, now) {
                Some(ip) => (ip, MessageType::Offer),
                None => {
                    tracing::warn!(target: "kiln::serve::dhcp", %mac, "no free address in the range for this MAC");
                    return Err("pool_exhausted");
                }
            },
            MessageType::Request => {
                if !for_us {
                    self.release(&mac); // the client chose another server
                    return Err("other_server");
                }
                let want = requested.unwrap_or(req.ciaddr());
                if want.is_unspecified() {
                    return nak("no address requested");
                }
                self.declined.retain(|_, until| *until > now);
                match self.cfg.fixed.get(&mac) {
                    Some(f) if *f != want => return nak("not this node's inventory address"),
                    Some(_) => {}
                    None if !self.in_range(want) => return nak("outside the range"),
                    None if !self.usable(want, &mac, now) => {
                        return nak("leased to another MAC, reserved or declined")
                    }
                    None => {}
                }
                self.bind(&mac, want, now);
                (want, MessageType::Ack)
            }
            MessageType::Inform => (Ipv4Addr::UNSPECIFIED, MessageType::Ack),
            MessageType::Decline => {
                let ip = requested.unwrap_or(Ipv4Addr::UNSPECIFIED);
                if !for_us || !self.holds(&mac, ip) {
                    return Err("decline_not_ours");
                }
                self.release(&mac);
                if self.cfg.fixed.get(&mac) == Some(&ip) {
                    tracing::warn!(target: "kiln::serve::dhcp", %mac, %ip, "the node declined its inventory address: another host on the network uses it");
                } else {
                    self.declined.insert(ip, now + DECLINE_HOLD);
                    tracing::warn!(target: "kiln::serve::dhcp", %mac, %ip, "address declined (another host uses it?): not offered for {} s", DECLINE_HOLD.as_secs());
                }
                return Err("declined");
            }
            MessageType::Release => {
                if !for_us || !self.holds(&mac, req.ciaddr()) {
                    return Err("release_not_ours");
                }
                self.release(&mac);
                return Err("released");
            }
            _ => return Err("message_type"),
        };
        let mut r = reply_skeleton(req, ip, reply_type, server);
        {
            let o = r.opts_mut();
            o.insert(DhcpOption::SubnetMask(self.cfg.netmask));
            if let Some(gw) = self.cfg.router {
                o.insert(DhcpOption::Router(vec![gw]));
            }
            if !self.cfg.dns.is_empty() {
                o.insert(DhcpOption::DomainNameServer(self.cfg.dns.clone()));
            }
            if t != MessageType::Inform {
                let secs = self.cfg.lease.as_secs() as u32;
                o.insert(DhcpOption::AddressLeaseTime(secs));
                o.insert(DhcpOption::Renewal(secs / 2));
                o.insert(DhcpOption::Rebinding(secs / 8 * 7));
            }
        }
        if let Some(b) = boot {
            add_boot(&mut r, req, server, b);
        }
        Ok(r)
    }
}

/// Where a reply to `req` goes (RFC 2131 4.1: a NAK not going through a relay is broadcast,
/// even to a client that has an address).
pub fn reply_destination(
    req: &Message,
    reply: &Message,
    from: SocketAddr,
    proxy_port: bool,
) -> SocketAddr {
    if proxy_port {
        return from; // 4011: the client has an address and talks unicast
    }
    if !req.giaddr().is_unspecified() {
        return SocketAddr::V4(SocketAddrV4::new(req.giaddr(), 67));
    }
    let nak = reply.opts().msg_type() == Some(MessageType::Nak);
    if !req.ciaddr().is_unspecified() && !nak {
        return SocketAddr::V4(SocketAddrV4::new(req.ciaddr(), 68));
    }
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::BROADCAST, 68))
}

/// How the DHCP listener answers.
pub enum Mode {
    Proxy,
    Full(Mutex<Pool>),
}

/// Serves DHCP on `sock` (port 67 when `proxy_port` is false, 4011 when true).
pub async fn serve(
    sock: Arc<UdpSocket>,
    proxy_port: bool,
    mode: Arc<Mode>,
    state: Arc<State>,
    server: Ipv4Addr,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 4096];
    let mut flood = Flood::default();
    let port = if proxy_port { "4011" } else { "67" };
    loop {
        let (n, from) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!("dhcp: recv: {e}");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let why = if n >= buf.len() {
            Some(Ignored::Oversized)
        } else if raw_mac(&buf[..n]).is_some_and(|m| !flood.allow(m, Instant::now())) {
            Some(Ignored::RateLimited)
        } else {
            None
        };
        if let Some(why) = why {
            state.metrics.inc(
                "kiln_dhcp_ignored_total",
                &[("reason", why.label()), ("port", port)],
            );
            continue;
        }
        let Some((reply, dest)) = answer(&buf[..n], from, proxy_port, &mode, &state, server) else {
            continue;
        };
        match reply.to_vec() {
            Ok(bytes) => {
                if let Err(e) = sock.send_to(&bytes, dest).await {
                    tracing::warn!("dhcp: sending to {dest}: {e}");
                }
            }
            Err(e) => tracing::warn!("dhcp: encoding a reply: {e}"),
        }
    }
}

/// One packet in, at most one reply out (with its destination).
pub fn answer(
    bytes: &[u8],
    from: SocketAddr,
    proxy_port: bool,
    mode: &Mode,
    st: &State,
    server: Ipv4Addr,
) -> Option<(Message, SocketAddr)> {
    let port = if proxy_port { "4011" } else { "67" };
    if let Err(why) = check_frame(bytes) {
        st.metrics.inc(
            "kiln_dhcp_ignored_total",
            &[("reason", why.label()), ("port", port)],
        );
        tracing::debug!(target: "kiln::serve::dhcp", %from, "ignored: {}", why.label());
        return None;
    }
    // dhcproto asserts on some malformed option lengths (debug assertions; found by
    // `cargo fuzz run dhcp`): a packet must never take the server down, so decoding is isolated.
    let decoded = std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(bytes)));
    let Ok(decoded) = decoded else {
        st.metrics.inc(
            "kiln_dhcp_ignored_total",
            &[("reason", "malformed"), ("port", port)],
        );
        tracing::debug!(target: "kiln::serve::dhcp", %from, "undecodable packet");
        return None;
    };
    let msg = match decoded {
        // dhcproto decodes any hlen but slices chaddr (16 bytes) by it: refuse > 16 here
        // (found by the mutation test; `Message::chaddr` would panic).
        Ok(m) if m.hlen() <= 16 => m,
        Ok(m) => {
            st.metrics.inc(
                "kiln_dhcp_ignored_total",
                &[("reason", "malformed"), ("port", port)],
            );
            tracing::debug!(target: "kiln::serve::dhcp", %from, "hlen {} > 16", m.hlen());
            return None;
        }
        Err(e) => {
            st.metrics.inc(
                "kiln_dhcp_ignored_total",
                &[("reason", "malformed"), ("port", port)],
            );
            tracing::debug!(target: "kiln::serve::dhcp", %from, "malformed packet: {e}");
            return None;
        }
    };
    let pxe = classify(&msg);
    let boot = match &pxe {
        Ok(c) => {
            st.metrics.inc(
                "kiln_dhcp_requests_total",
                &[
                    ("type", msg_type_label(c.msg_type)),
                    ("arch", &c.arch.label()),
                    ("port", port),
                ],
            );
            match boot_file(c, &st.base_url, |f| st.ipxe_available(f)) {
                Ok(b) => Some(b),
                Err(why) => {
                    st.metrics.inc(
                        "kiln_dhcp_ignored_total",
                        &[("reason", "no_boot_file"), ("port", port)],
                    );
                    tracing::warn!(target: "kiln::serve::dhcp", mac = %c.mac, arch = %c.arch.label(), "not answering: {why}");
                    None
                }
            }
        }
        Err(_) => None,
    };
    // Only a packet that comes from its ciaddr teaches which MAC has that address (a spoofed
    // ciaddr would otherwise mislabel another host's HTTP and TFTP log lines).
    if let (Ok(c), false) = (&pxe, msg.ciaddr().is_unspecified()) {
        if from.ip() == std::net::IpAddr::V4(msg.ciaddr()) {
            st.learn(std::net::IpAddr::V4(msg.ciaddr()), &c.mac);
        }
    }
    let reply = match mode {
        Mode::Full(pool) if !proxy_port => {
            let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
            match pool.reply(&msg, server, boot.as_ref(), Instant::now()) {
                Ok(r) => Some(r),
                Err(why) => {
                    st.metrics.inc(
                        "kiln_dhcp_ignored_total",
                        &[("reason", why), ("port", port)],
                    );
                    None
                }
            }
        }
        _ => {
            let c = match &pxe {
                Ok(c) => c,
                Err(why) => {
                    st.metrics.inc(
                        "kiln_dhcp_ignored_total",
                        &[("reason", why.label()), ("port", port)],
                    );
                    return None;
                }
            };
            // Port 67 answers DISCOVERs (the site's server handles the REQUEST that follows);
            // port 4011 answers the REQUEST (or INFORM) sent to the proxy itself.
            let wanted = if proxy_port {
                matches!(c.msg_type, MessageType::Request | MessageType::Inform)
            } else {
                c.msg_type == MessageType::Discover
            };
            if !wanted {
                st.metrics.inc(
                    "kiln_dhcp_ignored_total",
                    &[("reason", "message_type"), ("port", port)],
                );
                return None;
            }
            Some(proxy_reply(&msg, c, server, boot.as_ref()?))
        }
    };
    let reply = reply?;
    let dest = reply_destination(&msg, &reply, from, proxy_port);
    let t = reply.opts().msg_type().map(msg_type_label).unwrap_or("?");
    let arch = pxe
        .as_ref()
        .map(|c| c.arch.label())
        .unwrap_or_else(|_| "-".into());
    st.metrics.inc(
        "kiln_dhcp_replies_total",
        &[("type", t), ("arch", &arch), ("port", port)],
    );
    tracing::info!(
        target: "kiln::serve::dhcp",
        mac = client_mac(&msg).as_deref().unwrap_or("-"),
        arch = %arch,
        ipxe = pxe.as_ref().map(|c| c.ipxe).unwrap_or(false),
        reply = t,
        yiaddr = %reply.yiaddr(),
        file = reply.fname_str().and_then(|r| r.ok()).unwrap_or(""),
        to = %dest,
        "dhcp"
    );
    Some((reply, dest))
}

fn msg_type_label(t: MessageType) -> &'static str {
    match t {
        MessageType::Discover => "discover",
        MessageType::Offer => "offer",
        MessageType::Request => "request",
        MessageType::Decline => "decline",
        MessageType::Ack => "ack",
        MessageType::Nak => "nak",
        MessageType::Release => "release",
        MessageType::Inform => "inform",
        _ => "other",
    }
}

/// A request as a PXE client sends it (for tests and fuzz seeds).
#[cfg(any(test, feature = "testing"))]
pub fn sample_request(
    mac: [u8; 6],
    msg_type: MessageType,
    arch: Option<u16>,
    class: Option<&[u8]>,
    user_class: Option<&[u8]>,
) -> Message {
    let mut m = Message::new_with_id(
        0x1234_5678,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    m.set_flags(Flags::default().set_broadcast());
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(msg_type));
    if let Some(c) = class {
        o.insert(DhcpOption::ClassIdentifier(c.to_vec()));
    }
    if let Some(a) = arch {
        o.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(a)));
        o.insert(DhcpOption::ClientNetworkInterface(1, 2, 1));
        let mut guid = vec![0u8];
        guid.extend_from_slice(&[0x11; 16]);
        o.insert(DhcpOption::ClientMachineIdentifier(guid));
    }
    if let Some(u) = user_class {
        o.insert(DhcpOption::UserClass(u.to_vec()));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::serve::catalog::Catalog;

    const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01];

    /// A DHCP packet laid out byte by byte as PXE firmware sends it (independent of dhcproto's
    /// encoder): BOOTREQUEST, broadcast flag, the magic cookie, then `options` and END.
    fn raw(msg_type: u8, options: &[(u8, &[u8])]) -> Vec<u8> {
        let mut p = vec![1u8, 1, 6, 0]; // op, htype Ethernet, hlen, hops
        p.extend_from_slice(&0xdead_beefu32.to_be_bytes()); // xid
        p.extend_from_slice(&4u16.to_be_bytes()); // secs
        p.extend_from_slice(&0x8000u16.to_be_bytes()); // flags: broadcast
        p.extend_from_slice(&[0; 16]); // ciaddr yiaddr siaddr giaddr
        p.extend_from_slice(&MAC);
        p.extend_from_slice(&[0; 10]); // chaddr padding
        p.extend_from_slice(&[0; 64 + 128]); // sname, file
        p.extend_from_slice(&[99, 130, 83, 99]);
        p.extend_from_slice(&[53, 1, msg_type]);
        for (code, data) in options {
            p.push(*code);
            p.push(data.len() as u8);
            p.extend_from_slice(data);
        }
        p.push(255);
        p
    }

    const GUID: &[u8] = &[
        0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
        0xff, 0x00,
    ];

    fn bios_discover() -> Vec<u8> {
        raw(
            1,
            &[
                (57, &[0x04, 0xec]),
                (93, &[0, 0]),
                (94, &[1, 2, 1]),
                (97, GUID),
                (60, b"PXEClient:Arch:00000:UNDI:002001"),
                (
                    55,
                    &[
                        1, 2, 3, 5, 6, 11, 12, 13, 15, 16, 17, 18, 43, 54, 60, 66, 67, 128, 129,
                    ],
                ),
            ],
        )
    }

    fn uefi_discover(arch: u8) -> Vec<u8> {
        raw(
            1,
            &[
                (93, &[0, arch]),
                (94, &[1, 3, 0]),
                (97, GUID),
                (
                    60,
                    format!("PXEClient:Arch:{:05}:UNDI:003000", arch).as_bytes(),
                ),
            ],
        )
    }

    fn ipxe_discover() -> Vec<u8> {
        raw(
            1,
            &[
                (93, &[0, 0]),
                (60, b"PXEClient:Arch:00000:UNDI:002001"),
                (77, b"iPXE"),
                (
                    175,
                    &[0xb1, 0x05, 0x01, 0x80, 0x86, 0x10, 0x0e, 0x13, 0x01, 0x01],
                ),
            ],
        )
    }

    fn state(files: &[&str]) -> (tempfile::TempDir, State) {
        let d = tempfile::tempdir().unwrap();
        for f in files {
            std::fs::write(d.path().join(f), b"ipxe").unwrap();
        }
        let st = State::new(
            Catalog::default(),
            "http://10.0.0.1:8080".into(),
            d.path().to_path_buf(),
        );
        (d, st)
    }

    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    fn from68() -> SocketAddr {
        "0.0.0.0:68".parse().unwrap()
    }

    fn file(m: &Message) -> String {
        m.fname_str().unwrap().unwrap().to_string()
    }

    #[test]
    fn bios_pxe_discover_gets_undionly_by_proxy_offer() {
        let (_d, st) = state(&["undionly.kpxe", "ipxe.efi"]);
        let (r, dest) =
            answer(&bios_discover(), from68(), false, &Mode::Proxy, &st, SERVER).unwrap();
        assert_eq!(dest, "255.255.255.255:68".parse().unwrap());
        assert_eq!(r.opcode(), Opcode::BootReply);
        assert_eq!(r.xid(), 0xdead_beef);
        assert_eq!(
            r.yiaddr(),
            Ipv4Addr::UNSPECIFIED,
            "a proxy never assigns addresses"
        );
        assert_eq!(r.siaddr(), SERVER);
        assert_eq!(&r.chaddr()[..6], &MAC);
        assert_eq!(file(&r), "undionly.kpxe");
        assert_eq!(r.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(
            r.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(SERVER))
        );
        assert_eq!(
            r.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
        );
        assert_eq!(
            r.opts().get(OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
        );
        assert_eq!(
            r.opts().get(OptionCode::ClientMachineIdentifier),
            Some(&DhcpOption::ClientMachineIdentifier(GUID.to_vec()))
        );
        assert!(
            r.opts().get(OptionCode::SubnetMask).is_none(),
            "no address options from a proxy"
        );
        // The encoded reply decodes again and keeps the magic cookie and END.
        let bytes = r.to_vec().unwrap();
        assert_eq!(&bytes[236..240], &[99, 130, 83, 99]);
        assert_eq!(*bytes.last().unwrap(), 255);
        let back = Message::decode(&mut Decoder::new(&bytes)).unwrap();
        assert_eq!(back.opts(), r.opts());
        assert_eq!(
            back.fname_str().unwrap().unwrap().trim_end_matches('\0'),
            "undionly.kpxe"
        );
    }

    #[test]
    fn uefi_clients_get_the_efi_binary() {
        let (_d, st) = state(&["undionly.kpxe", "ipxe.efi"]);
        for arch in [7u8, 9] {
            let (r, _) = answer(
                &uefi_discover(arch),
                from68(),
                false,
                &Mode::Proxy,
                &st,
                SERVER,
            )
            .unwrap();
            assert_eq!(file(&r), "ipxe.efi", "arch {arch}");
        }
        // arm64 needs snp.efi, which this directory lacks: no answer rather than a wrong binary.
        assert!(answer(
            &uefi_discover(11),
            from68(),
            false,
            &Mode::Proxy,
            &st,
            SERVER
        )
        .is_none());
        let (_d2, st2) = state(&["snp.efi"]);
        let (r, _) = answer(
            &uefi_discover(11),
            from68(),
            false,
            &Mode::Proxy,
            &st2,
            SERVER,
        )
        .unwrap();
        assert_eq!(file(&r), "snp.efi");
        // 32-bit UEFI has no binary at all.
        assert!(answer(
            &uefi_discover(6),
            from68(),
            false,
            &Mode::Proxy,
            &st,
            SERVER
        )
        .is_none());
    }

    #[test]
    fn ipxe_gets_its_script_url_not_the_binary_again() {
        let (_d, st) = state(&["undionly.kpxe"]);
        let (r, _) = answer(&ipxe_discover(), from68(), false, &Mode::Proxy, &st, SERVER).unwrap();
        assert_eq!(
            file(&r),
            "http://10.0.0.1:8080/boot.ipxe?mac=52-54-00-aa-bb-01"
        );
        assert_eq!(
            r.opts().get(OptionCode::BootfileName),
            Some(&DhcpOption::BootfileName(
                b"http://10.0.0.1:8080/boot.ipxe?mac=52-54-00-aa-bb-01".to_vec()
            ))
        );
        // Option 175 alone (no user class) also marks iPXE.
        let p = raw(
            1,
            &[
                (93, &[0, 7]),
                (60, b"PXEClient:Arch:00007:UNDI:003016"),
                (175, &[0x13, 1, 1]),
            ],
        );
        let (r, _) = answer(&p, from68(), false, &Mode::Proxy, &st, SERVER).unwrap();
        assert!(file(&r).starts_with("http://"));
    }

    #[test]
    fn uefi_http_boot_gets_an_http_url_as_httpclient() {
        let (_d, st) = state(&["ipxe.efi"]);
        let p = raw(
            1,
            &[(93, &[0, 16]), (60, b"HTTPClient:Arch:00016:UNDI:003001")],
        );
        let (r, _) = answer(&p, from68(), false, &Mode::Proxy, &st, SERVER).unwrap();
        assert_eq!(file(&r), "http://10.0.0.1:8080/ipxe/ipxe.efi");
        assert_eq!(
            r.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()))
        );
    }

    #[test]
    fn non_pxe_and_malformed_packets_are_ignored() {
        let (_d, st) = state(&["undionly.kpxe"]);
        let plain = raw(1, &[(60, b"MSFT 5.0"), (55, &[1, 3, 6])]);
        assert!(answer(&plain, from68(), false, &Mode::Proxy, &st, SERVER).is_none());
        let no_class = raw(1, &[(93, &[0, 0])]);
        assert!(answer(&no_class, from68(), false, &Mode::Proxy, &st, SERVER).is_none());
        let no_arch = raw(1, &[(60, b"PXEClient")]);
        assert!(answer(&no_arch, from68(), false, &Mode::Proxy, &st, SERVER).is_none());
        for bad in [
            &[][..],
            &[1, 1, 6][..],
            &bios_discover()[..250],
            &[0xff; 400][..],
        ] {
            assert!(answer(bad, from68(), false, &Mode::Proxy, &st, SERVER).is_none());
        }
        // hlen beyond chaddr's 16 bytes (dhcproto would panic slicing it).
        let mut long = bios_discover();
        long[2] = 200;
        assert!(answer(&long, from68(), false, &Mode::Proxy, &st, SERVER).is_none());
        // A BOOTREPLY (another server's offer) is never answered.
        let mut reply = bios_discover();
        reply[0] = 2;
        assert!(answer(&reply, from68(), false, &Mode::Proxy, &st, SERVER).is_none());
        assert!(st.metrics.total("kiln_dhcp_ignored_total") >= 8.0);
    }

    #[test]
    fn proxy_port_4011_acks_requests_unicast() {
        let (_d, st) = state(&["undionly.kpxe"]);
        // On 67, the REQUEST that follows an offer belongs to the site's server.
        let req = raw(
            3,
            &[
                (93, &[0, 0]),
                (60, b"PXEClient:Arch:00000:UNDI:002001"),
                (54, &[10, 0, 0, 254]),
            ],
        );
        assert!(answer(&req, from68(), false, &Mode::Proxy, &st, SERVER).is_none());
        let mut req = raw(
            3,
            &[
                (93, &[0, 0]),
                (60, b"PXEClient:Arch:00000:UNDI:002001"),
                (97, GUID),
            ],
        );
        req[12..16].copy_from_slice(&[10, 0, 0, 57]); // ciaddr: the client has its address now
        let from: SocketAddr = "10.0.0.57:4011".parse().unwrap();
        let (r, dest) = answer(&req, from, true, &Mode::Proxy, &st, SERVER).unwrap();
        assert_eq!(dest, from);
        assert_eq!(r.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(file(&r), "undionly.kpxe");
        assert_eq!(r.yiaddr(), Ipv4Addr::UNSPECIFIED);
        // The client's IP is now known to belong to its MAC (for HTTP/TFTP logs).
        assert_eq!(
            st.mac_of("10.0.0.57".parse().unwrap()).as_deref(),
            Some("52:54:00:aa:bb:01")
        );
        // A DISCOVER on 4011 is not answered there.
        assert!(answer(&bios_discover(), from, true, &Mode::Proxy, &st, SERVER).is_none());
    }

    fn pool(fixed: &[(&str, Ipv4Addr)]) -> Mode {
        Mode::Full(Mutex::new(Pool::new(PoolConfig {
            start: Ipv4Addr::new(10, 0, 0, 100),
            end: Ipv4Addr::new(10, 0, 0, 101),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: Some(Ipv4Addr::new(10, 0, 0, 254)),
            dns: vec![Ipv4Addr::new(10, 0, 0, 53)],
            lease: Duration::from_secs(600),
            fixed: fixed.iter().map(|(m, ip)| (m.to_string(), *ip)).collect(),
        })))
    }

    fn with_mac(mut p: Vec<u8>, last: u8) -> Vec<u8> {
        p[28 + 5] = last;
        p
    }

    #[test]
    fn full_mode_leases_addresses_and_boots_pxe_clients() {
        let (_d, st) = state(&["undionly.kpxe"]);
        let mode = pool(&[]);
        let (offer, dest) = answer(&bios_discover(), from68(), false, &mode, &st, SERVER).unwrap();
        assert_eq!(dest, "255.255.255.255:68".parse().unwrap());
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 0, 0, 100));
        assert_eq!(file(&offer), "undionly.kpxe");
        assert_eq!(
            offer.opts().get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)))
        );
        assert_eq!(
            offer.opts().get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![Ipv4Addr::new(10, 0, 0, 254)]))
        );
        assert_eq!(
            offer.opts().get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(600))
        );
        // REQUEST for the offered address → ACK; for another → NAK.
        let req = raw(
            3,
            &[
                (93, &[0, 0]),
                (60, b"PXEClient:Arch:00000:UNDI:002001"),
                (50, &[10, 0, 0, 100]),
                (54, &[10, 0, 0, 1]),
            ],
        );
        let (ack, _) = answer(&req, from68(), false, &mode, &st, SERVER).unwrap();
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), Ipv4Addr::new(10, 0, 0, 100));
        let wrong = raw(3, &[(50, &[10, 0, 0, 7]), (54, &[10, 0, 0, 1])]);
        let (nak, _) = answer(&wrong, from68(), false, &mode, &st, SERVER).unwrap();
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        // A REQUEST naming another server is that server's business.
        let other = with_mac(
            raw(3, &[(50, &[10, 0, 0, 100]), (54, &[10, 0, 0, 9])]),
            0x09,
        );
        assert!(answer(&other, from68(), false, &mode, &st, SERVER).is_none());
        // A non-PXE client gets an address and no boot file.
        let plain = with_mac(raw(1, &[(55, &[1, 3, 6])]), 0x02);
        let (o2, _) = answer(&plain, from68(), false, &mode, &st, SERVER).unwrap();
        assert_eq!(o2.yiaddr(), Ipv4Addr::new(10, 0, 0, 101));
        assert!(o2
            .fname()
            .map(|f| f.iter().all(|b| *b == 0))
            .unwrap_or(true));
        assert!(o2.opts().get(OptionCode::ClassIdentifier).is_none());
        // The range (two addresses) is exhausted for a third client.
        let req2 = with_mac(raw(3, &[(50, &[10, 0, 0, 101])]), 0x02);
        let (ack2, _) = answer(&req2, from68(), false, &mode, &st, SERVER).unwrap();
        assert_eq!(ack2.opts().msg_type(), Some(MessageType::Ack));
        let third = with_mac(raw(1, &[]), 0x03);
        assert!(answer(&third, from68(), false, &mode, &st, SERVER).is_none());
        // The first client keeps its address when it asks again.
        let (again, _) = answer(&bios_discover(), from68(), false, &mode, &st, SERVER).unwrap();
        assert_eq!(again.yiaddr(), Ipv4Addr::new(10, 0, 0, 100));
    }

    #[test]
    fn full_mode_gives_inventory_nodes_their_static_address() {
        let (_d, st) = state(&["undionly.kpxe"]);
        let mode = pool(&[("52:54:00:aa:bb:01", Ipv4Addr::new(10, 0, 0, 11))]);
        let (offer, _) = answer(&bios_discover(), from68(), false, &mode, &st, SERVER).unwrap();
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 0, 0, 11));
    }

    #[test]
    fn relayed_requests_go_back_to_the_relay() {
        let (_d, st) = state(&["undionly.kpxe"]);
        let mut p = bios_discover();
        p[24..28].copy_from_slice(&[10, 9, 0, 1]); // giaddr
        let (_, dest) = answer(
            &p,
            "10.9.0.1:67".parse().unwrap(),
            false,
            &Mode::Proxy,
            &st,
            SERVER,
        )
        .unwrap();
        assert_eq!(dest, "10.9.0.1:67".parse().unwrap());
    }
    fn ignored(st: &State, reason: &str) -> f64 {
        let m = st.metrics.render();
        m.lines()
            .filter(|l| {
                l.starts_with("kiln_dhcp_ignored_total{")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    }

    #[test]
    fn wrong_or_zero_magic_cookie_is_dropped() {
        // Issue 17: these were answered.
        let (_d, st) = state(&["undionly.kpxe"]);
        for cookie in [[0u8; 4], [99, 130, 83, 98], [1, 2, 3, 4]] {
            let mut p = bios_discover();
            p[236..240].copy_from_slice(&cookie);
            for mode in [&Mode::Proxy, &pool(&[])] {
                assert!(answer(&p, from68(), false, mode, &st, SERVER).is_none());
            }
        }
        assert_eq!(ignored(&st, "bad_cookie"), 6.0);
        assert!(answer(&bios_discover(), from68(), false, &Mode::Proxy, &st, SERVER).is_some());
    }

    #[test]
    fn malformed_headers_and_options_are_dropped() {
        let (_d, st) = state(&["undionly.kpxe"]);
        let good = bios_discover();
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut p = good.clone();
            f(&mut p);
            p
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (with(&|p| p[0] = 2), "not_bootrequest"),
            (with(&|p| p[0] = 3), "not_bootrequest"),
            (with(&|p| p[1] = 6), "bad_chaddr"), // IEEE 802 with an Ethernet-sized address
            (with(&|p| p[2] = 16), "bad_chaddr"), // Ethernet with a 16-byte address
            (with(&|p| p[2] = 0), "bad_chaddr"),
            (with(&|p| p[2] = 200), "bad_chaddr"),
            (with(&|p| p[3] = 17), "too_many_hops"),
            (good[..239].to_vec(), "short"),
            // The last option claims more bytes than there are.
            (
                with(&|p| {
                    p.pop();
                    p.extend_from_slice(&[12, 40, b'h']);
                }),
                "truncated_options",
            ),
            // A lone option code at the very end.
            (
                with(&|p| {
                    p.pop();
                    p.push(12);
                }),
                "truncated_options",
            ),
            (
                with(&|p| {
                    p.pop();
                    p.extend_from_slice(&[52, 1, 3, 255]);
                }),
                "option_overload",
            ),
            (
                with(&|p| {
                    p.pop();
                    p.extend_from_slice(&[53, 1, 3, 255]);
                }),
                "duplicate_option",
            ),
            (
                with(&|p| {
                    p.pop();
                    p.extend_from_slice(&[93, 2, 0, 7, 255]);
                }),
                "duplicate_option",
            ),
        ];
        for (p, reason) in &cases {
            let before = ignored(&st, reason);
            for mode in [&Mode::Proxy, &pool(&[])] {
                assert!(
                    answer(p, from68(), false, mode, &st, SERVER).is_none(),
                    "{reason}"
                );
            }
            assert_eq!(ignored(&st, reason), before + 2.0, "{reason}");
        }
        // Padding, a repeated option kiln does not read and a missing END are fine.
        let ok = with(&|p| {
            p.pop();
            p.extend_from_slice(&[0, 0, 12, 1, b'a', 12, 1, b'b']);
        });
        assert!(answer(&ok, from68(), false, &Mode::Proxy, &st, SERVER).is_some());
    }

    fn decode(b: &[u8]) -> Message {
        Message::decode(&mut Decoder::new(b)).unwrap()
    }

    fn full_pool() -> Pool {
        Pool::new(PoolConfig {
            start: Ipv4Addr::new(10, 0, 0, 100),
            end: Ipv4Addr::new(10, 0, 0, 101),
            netmask: Ipv4Addr::new(255, 255, 255, 0),
            router: None,
            dns: vec![],
            lease: Duration::from_secs(600),
            fixed: BTreeMap::new(),
        })
    }

    fn with_ciaddr(mut p: Vec<u8>, ip: [u8; 4]) -> Vec<u8> {
        p[12..16].copy_from_slice(&ip);
        p
    }

    const SRV: (u8, &[u8]) = (54, &[10, 0, 0, 1]);

    fn offered(pool: &mut Pool, mac: u8, now: Instant) -> Option<Ipv4Addr> {
        let d = with_mac(raw(1, &[]), mac);
        pool.reply(&decode(&d), SERVER, None, now)
            .ok()
            .map(|m| m.yiaddr())
    }

    fn request(pool: &mut Pool, mac: u8, ip: [u8; 4], now: Instant) -> MessageType {
        let r = with_mac(raw(3, &[(50, &ip), SRV]), mac);
        let m = pool.reply(&decode(&r), SERVER, None, now).unwrap();
        m.opts().msg_type().unwrap()
    }

    #[test]
    fn a_declined_address_is_not_offered_for_ten_minutes() {
        // Issue 17: RFC 2131 4.3.3; it was offered again at once.
        let mut pool = full_pool();
        let t0 = Instant::now();
        assert_eq!(
            offered(&mut pool, 1, t0),
            Some(Ipv4Addr::new(10, 0, 0, 100))
        );
        assert_eq!(request(&mut pool, 1, [10, 0, 0, 100], t0), MessageType::Ack);
        let decline = with_mac(raw(4, &[(50, &[10, 0, 0, 100]), SRV]), 1);
        assert_eq!(
            pool.reply(&decode(&decline), SERVER, None, t0).unwrap_err(),
            "declined"
        );
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            offered(&mut pool, 1, later),
            Some(Ipv4Addr::new(10, 0, 0, 101))
        );
        assert_eq!(
            offered(&mut pool, 2, later),
            Some(Ipv4Addr::new(10, 0, 0, 101))
        );
        assert_eq!(
            request(&mut pool, 2, [10, 0, 0, 100], later),
            MessageType::Nak
        );
        let after = t0 + DECLINE_HOLD + Duration::from_secs(1);
        assert_eq!(
            offered(&mut pool, 3, after),
            Some(Ipv4Addr::new(10, 0, 0, 100))
        );
    }

    #[test]
    fn decline_and_release_only_for_the_mac_holding_the_address() {
        let mut pool = full_pool();
        let t0 = Instant::now();
        assert_eq!(request(&mut pool, 1, [10, 0, 0, 100], t0), MessageType::Ack);
        // Another MAC declining or releasing 10.0.0.100 changes nothing.
        let decline = with_mac(raw(4, &[(50, &[10, 0, 0, 100]), SRV]), 2);
        assert_eq!(
            pool.reply(&decode(&decline), SERVER, None, t0).unwrap_err(),
            "decline_not_ours"
        );
        let release = with_ciaddr(with_mac(raw(7, &[SRV]), 2), [10, 0, 0, 100]);
        assert_eq!(
            pool.reply(&decode(&release), SERVER, None, t0).unwrap_err(),
            "release_not_ours"
        );
        // The holder releasing an address it does not hold changes nothing either.
        let release = with_ciaddr(with_mac(raw(7, &[SRV]), 1), [10, 0, 0, 101]);
        assert_eq!(
            pool.reply(&decode(&release), SERVER, None, t0).unwrap_err(),
            "release_not_ours"
        );
        assert_eq!(request(&mut pool, 2, [10, 0, 0, 100], t0), MessageType::Nak);
        assert_eq!(
            offered(&mut pool, 1, t0),
            Some(Ipv4Addr::new(10, 0, 0, 100))
        );
        // Its own RELEASE frees it.
        let release = with_ciaddr(with_mac(raw(7, &[SRV]), 1), [10, 0, 0, 100]);
        assert_eq!(
            pool.reply(&decode(&release), SERVER, None, t0).unwrap_err(),
            "released"
        );
        assert_eq!(request(&mut pool, 2, [10, 0, 0, 100], t0), MessageType::Ack);
    }

    #[test]
    fn requests_outside_the_range_or_for_another_macs_address_are_naked() {
        let (_d, st) = state(&["undionly.kpxe"]);
        let mut pool = full_pool();
        let t0 = Instant::now();
        // A free address in the range is granted as asked (INIT-REBOOT after a restart).
        assert_eq!(request(&mut pool, 1, [10, 0, 0, 101], t0), MessageType::Ack);
        assert_eq!(request(&mut pool, 2, [10, 0, 0, 101], t0), MessageType::Nak);
        assert_eq!(request(&mut pool, 2, [10, 0, 0, 7], t0), MessageType::Nak);
        assert_eq!(request(&mut pool, 2, [10, 0, 0, 102], t0), MessageType::Nak);
        assert_eq!(request(&mut pool, 2, [10, 9, 0, 100], t0), MessageType::Nak);
        let none = with_mac(raw(3, &[SRV]), 2);
        let m = pool.reply(&decode(&none), SERVER, None, t0).unwrap();
        assert_eq!(m.opts().msg_type(), Some(MessageType::Nak));
        // A renewing client (ciaddr set) is NAKed by broadcast, not unicast (RFC 2131 4.1).
        let mode = Mode::Full(Mutex::new(full_pool()));
        let renew = with_ciaddr(with_mac(raw(3, &[(50, &[10, 0, 0, 7])]), 3), [10, 0, 0, 7]);
        let from: SocketAddr = "10.0.0.7:68".parse().unwrap();
        let (nak, dest) = answer(&renew, from, false, &mode, &st, SERVER).unwrap();
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(dest, "255.255.255.255:68".parse().unwrap());
    }

    #[test]
    fn full_mode_ignores_relays_from_other_subnets() {
        let (_d, st) = state(&["undionly.kpxe"]);
        let mode = pool(&[]);
        let mut p = bios_discover();
        p[24..28].copy_from_slice(&[10, 9, 0, 1]);
        assert!(answer(
            &p,
            "10.9.0.1:67".parse().unwrap(),
            false,
            &mode,
            &st,
            SERVER
        )
        .is_none());
        assert_eq!(ignored(&st, "relay_other_subnet"), 1.0);
        // A relay on the pool's subnet is answered through it.
        p[24..28].copy_from_slice(&[10, 0, 0, 2]);
        let (_, dest) = answer(
            &p,
            "10.0.0.2:67".parse().unwrap(),
            false,
            &mode,
            &st,
            SERVER,
        )
        .unwrap();
        assert_eq!(dest, "10.0.0.2:67".parse().unwrap());
    }

    #[test]
    fn only_a_packet_from_its_ciaddr_teaches_the_ip_to_mac_map() {
        let (_d, st) = state(&["undionly.kpxe"]);
        let req = with_ciaddr(
            raw(
                3,
                &[(93, &[0, 0]), (60, b"PXEClient:Arch:00000:UNDI:002001")],
            ),
            [10, 0, 0, 57],
        );
        let spoofed: SocketAddr = "10.0.0.99:4011".parse().unwrap();
        assert!(answer(&req, spoofed, true, &Mode::Proxy, &st, SERVER).is_some());
        assert_eq!(st.mac_of("10.0.0.57".parse().unwrap()), None);
    }

    #[test]
    fn flood_budget_per_mac() {
        let mut f = Flood::default();
        let t0 = Instant::now();
        let a = [2, 0, 0, 0, 0, 1];
        let allowed = (0..40).filter(|_| f.allow(a, t0)).count();
        assert_eq!(allowed, Flood::BURST as usize);
        assert!(
            f.allow([2, 0, 0, 0, 0, 2], t0),
            "another MAC has its own budget"
        );
        assert!(
            f.allow(a, t0 + Duration::from_secs(1)),
            "refilled after a second"
        );
        assert!(!f.allow(a, t0 + Duration::from_secs(1)));
        // Random MACs cannot grow the table without bound.
        for i in 0..(Flood::MAX_TRACKED as u32 * 2) {
            let b = i.to_be_bytes();
            f.allow([2, 1, b[0], b[1], b[2], b[3]], t0);
        }
        assert!(f.buckets.len() <= Flood::MAX_TRACKED);
        assert_eq!(raw_mac(&bios_discover()), Some(MAC));
        assert_eq!(raw_mac(&[1, 2, 3]), None);
    }
}
