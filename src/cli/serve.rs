//! `kiln serve`: PXE for bare metal from the signed builds.

use super::args::{DhcpMode, ServeArgs};
use super::Ctx;
use crate::deliver::serve::{self, ServeOptions};
use crate::project::layout::key;
use anyhow::Result;
use std::time::Duration;

pub(crate) fn serve(cx: &Ctx, a: &ServeArgs) -> Result<()> {
    let project = cx.project()?;
    let opts = ServeOptions {
        listen: a.listen,
        advertise: a.advertise,
        interface: a.interface.clone(),
        http_port: a.http_port,
        tftp_port: a.tftp_port,
        dhcp: match a.dhcp {
            DhcpMode::Proxy => serve::DhcpMode::Proxy,
            DhcpMode::Full => serve::DhcpMode::Full,
            DhcpMode::Off => serve::DhcpMode::Off,
        },
        dhcp_port: a.dhcp_port,
        proxy_port: a.proxy_port,
        dhcp_range: a.dhcp_range,
        dhcp_netmask: Some(a.dhcp_netmask),
        dhcp_router: a.dhcp_router,
        dhcp_dns: a.dhcp_dns.clone(),
        lease: Duration::from_secs(a.lease_secs),
        default_role: a.default_role.clone(),
        ipxe_dir: a.ipxe_dir.clone(),
        max_blksize: a.tftp_max_blksize,
        tftp_max_transfers: a.tftp_max_transfers as usize,
        tftp_max_per_client: a.tftp_max_per_client as usize,
        tftp_max_duration: Duration::from_secs(a.tftp_max_secs),
        key: cx.key(&a.key, key::VERIFYING_KEY),
        json: a.json,
        grace: Duration::from_secs(a.grace_secs),
        refuse_secret_builds: a.refuse_secret_builds,
        kube_api: a.kube_api.clone(),
        cache_bytes: a.cache_mib.saturating_mul(1 << 20),
    };
    serve::serve_command(&project, cx.out.dir(), &opts, &line)
}

/// A line on stdout; a closed stdout (the reader went away) is not an error for a server.
fn line(s: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{s}").and_then(|_| o.flush());
}
