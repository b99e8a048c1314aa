//! DHCP for PXE: ProxyDHCP (RFC 4578 / PXE 2.1: UDP 67 and 4011), which never hands out
//! addresses and so coexists with the site's DHCP server, and an optional full DHCP mode with a
//! lease range for isolated networks. Packets are decoded and encoded with `dhcproto`.
//!
//! Boot file by client: PXE firmware (option 60 `PXEClient`) gets an iPXE binary over TFTP by
//! architecture (option 93); UEFI HTTP boot (`HTTPClient`) gets the iPXE EFI binary as an HTTP
//! URL; iPXE itself (option 77 `iPXE`, or option 175) gets the URL of its per-MAC script, which
//! ends the chainload loop.

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
            Ignored::NotBootRequest => "not_bootrequest",
            Ignored::NoMessageType => "no_message_type",
            Ignored::BadHardwareAddress => "bad_chaddr",
            Ignored::NotPxe => "not_pxe",
            Ignored::NoArchitecture => "no_arch",
        }
    }
}

/// The Ethernet MAC of a request, normalised.
pub fn client_mac(msg: &Message) -> Option<String> {
    if msg.hlen() > 16 {
        return None; // `chaddr()` would panic
    }
    let c = msg.chaddr();
    (msg.htype() == dhcproto::v4::HType::Eth && c.len() >= 6).then(|| {
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

/// Leases of the full DHCP mode (in memory: a restart forgets them, clients re-request).
#[derive(Debug)]
pub struct Pool {
    pub cfg: PoolConfig,
    leases: BTreeMap<String, (Ipv4Addr, Instant)>,
}

impl Pool {
    pub fn new(cfg: PoolConfig) -> Pool {
        Pool {
            cfg,
            leases: BTreeMap::new(),
        }
    }

    fn in_subnet(&self, ip: Ipv4Addr) -> bool {
        let m = u32::from(self.cfg.netmask);
        u32::from(ip) & m == u32::from(self.cfg.start) & m
    }

    /// The address for `mac`: its fixed one, its current lease, or the lowest free one.
    pub fn address_for(&mut self, mac: &str, now: Instant) -> Option<Ipv4Addr> {
        if let Some(ip) = self.cfg.fixed.get(mac) {
            return Some(*ip);
        }
        if let Some((ip, _)) = self.leases.get(mac) {
            return Some(*ip);
        }
        let taken: std::collections::BTreeSet<u32> = self
            .leases
            .iter()
            .filter(|(_, (_, exp))| *exp > now)
            .map(|(_, (ip, _))| u32::from(*ip))
            .chain(self.cfg.fixed.values().map(|ip| u32::from(*ip)))
            .collect();
        let free =
            (u32::from(self.cfg.start)..=u32::from(self.cfg.end)).find(|a| !taken.contains(a))?;
        // Reuse an expired lease's slot.
        self.leases
            .retain(|_, (ip, exp)| *exp > now || u32::from(*ip) != free);
        Some(Ipv4Addr::from(free))
    }

    fn bind(&mut self, mac: &str, ip: Ipv4Addr, now: Instant) {
        if !self.cfg.fixed.contains_key(mac) {
            self.leases
                .insert(mac.to_string(), (ip, now + self.cfg.lease));
        }
    }

    fn release(&mut self, mac: &str) {
        self.leases.remove(mac);
    }

    /// Answers a DHCP request in full mode; PXE clients also get `boot`.
    pub fn reply(
        &mut self,
        req: &Message,
        server: Ipv4Addr,
        boot: Option<&BootFile>,
        now: Instant,
    ) -> Option<Message> {
        if req.opcode() != Opcode::BootRequest {
            return None;
        }
        let mac = client_mac(req)?;
        let requested = match req.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let for_us = match req.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(s)) => *s == server,
            _ => true,
        };
        let t = req.opts().msg_type()?;
        let (ip, reply_type) = match t {
            MessageType::Discover => (self.address_for(&mac, now)?, MessageType::Offer),
            MessageType::Request => {
                if !for_us {
                    self.release(&mac); // the client chose another server
                    return None;
                }
                let want = requested.unwrap_or(req.ciaddr());
                let ours = self.address_for(&mac, now)?;
                if want != ours || !self.in_subnet(want) {
                    let mut nak =
                        reply_skeleton(req, Ipv4Addr::UNSPECIFIED, MessageType::Nak, server);
                    nak.set_ciaddr(Ipv4Addr::UNSPECIFIED);
                    return Some(nak);
                }
                self.bind(&mac, ours, now);
                (ours, MessageType::Ack)
            }
            MessageType::Inform => (Ipv4Addr::UNSPECIFIED, MessageType::Ack),
            MessageType::Release | MessageType::Decline => {
                if for_us {
                    self.release(&mac);
                }
                return None;
            }
            _ => return None,
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
        Some(r)
    }
}

/// Where a reply to `req` goes (RFC 2131 4.1).
pub fn reply_destination(req: &Message, from: SocketAddr, proxy_port: bool) -> SocketAddr {
    if proxy_port {
        return from; // 4011: the client has an address and talks unicast
    }
    if !req.giaddr().is_unspecified() {
        return SocketAddr::V4(SocketAddrV4::new(req.giaddr(), 67));
    }
    if !req.ciaddr().is_unspecified() {
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
    if let (Ok(c), false) = (&pxe, msg.ciaddr().is_unspecified()) {
        st.learn(std::net::IpAddr::V4(msg.ciaddr()), &c.mac);
    }
    let reply = match mode {
        Mode::Full(pool) if !proxy_port => {
            let mut pool = pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.reply(&msg, server, boot.as_ref(), Instant::now())
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
    let dest = reply_destination(&msg, from, proxy_port);
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
}
