//! `kiln serve`: PXE boot for bare metal from the same build — ProxyDHCP (or full DHCP), TFTP
//! for the iPXE binaries, and HTTP for per-MAC iPXE scripts, kernel, initrd, the role's
//! squashfs and NoCloud seeds. Only builds whose signature and files verify are served.

pub mod api;
pub mod catalog;
pub mod dhcp;
pub mod http;
pub mod ipxe;
pub mod metrics;
pub mod tftp;

use crate::project::recipe::Project;
use anyhow::{bail, Context, Result};
use catalog::Catalog;
use metrics::Metrics;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// Debian's `ipxe` package installs its binaries here.
pub const DEFAULT_IPXE_DIR: &str = "/usr/lib/ipxe";

/// How DHCP is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhcpMode {
    /// ProxyDHCP: boot information only, addresses come from the site's DHCP server.
    Proxy,
    /// Full DHCP server with a lease range (isolated networks); needs a range.
    Full,
    /// No DHCP: the site's DHCP server points PXE clients at kiln itself.
    Off,
}

/// Everything `kiln serve` needs, resolved from the command line.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: Ipv4Addr,
    pub advertise: Option<Ipv4Addr>,
    pub interface: Option<String>,
    pub http_port: u16,
    pub tftp_port: u16,
    pub dhcp: DhcpMode,
    pub dhcp_port: u16,
    pub proxy_port: u16,
    pub dhcp_range: Option<(Ipv4Addr, Ipv4Addr)>,
    pub dhcp_netmask: Option<Ipv4Addr>,
    pub dhcp_router: Option<Ipv4Addr>,
    pub dhcp_dns: Vec<Ipv4Addr>,
    /// Full DHCP mode's lease (at least [`MIN_LEASE`]).
    pub lease: Duration,
    pub default_role: Option<String>,
    pub ipxe_dir: PathBuf,
    /// Largest TFTP block size offered (clamped to RFC 2348's 512..=65464).
    pub max_blksize: usize,
    /// TFTP transfers at once: in total, and per client address.
    pub tftp_max_transfers: usize,
    pub tftp_max_per_client: usize,
    /// Longest a TFTP transfer may take.
    pub tftp_max_duration: Duration,
    pub key: PathBuf,
    pub json: bool,
    pub grace: Duration,
    /// Leave role builds with `contains_secrets: true` and seeds with `cluster_secrets: true`
    /// out of what is served.
    pub refuse_secret_builds: bool,
    /// `--kube-api`: where nodes are drained through (default: the cluster's API endpoint).
    pub kube_api: Option<String>,
    /// Budget of the verified-piece cache, bytes.
    pub cache_bytes: u64,
}

impl ServeOptions {
    fn load_options(&self, cache: Arc<catalog::PieceCache>) -> catalog::LoadOptions {
        catalog::LoadOptions {
            default_role: self.default_role.clone(),
            refuse_secrets: self.refuse_secret_builds,
            ipxe_dir: Some(self.ipxe_dir.clone()),
            cache,
        }
    }
}

/// Prints what the operator must know about a freshly loaded catalog: its warnings, and every
/// served build or seed that carries secrets (anyone on the network can fetch those).
fn warn_catalog(c: &Catalog) {
    for w in &c.warnings {
        eprintln!("warning: {w}");
    }
    if !c.secret_bearing.is_empty() {
        eprintln!(
            "warning: serving {} that carry secrets (contains_secrets: true; the k3s token, and \
             on masters the controller keys) to any client that asks: {}; serve them only on a \
             network you trust, or pass --refuse-secret-builds (see docs/guide/pxe.md#secrets)",
            if c.secret_bearing.len() == 1 {
                "one item"
            } else {
                "items"
            },
            c.secret_bearing.join(", ")
        );
        tracing::warn!(target: "kiln::serve", builds = %c.secret_bearing.join(", "), "serving secret-bearing builds");
    }
    if !c.identities.is_empty() {
        eprintln!(
            "note: the seeds of {} carry each node's own identity (its SSH host key and k3s node \
             password, from keys/node-identity.key), served to a client that presents the node's \
             MAC: that is how a PXE node comes back as itself; they reveal nothing about other \
             nodes or the cluster's keys (see docs/guide/pxe.md#secrets)",
            c.identities.join(", ")
        );
    }
}

/// The shortest lease full DHCP mode hands out (a shorter `lease` is raised to it).
pub const MIN_LEASE: Duration = Duration::from_secs(60);

/// Shared by the listeners.
pub struct State {
    catalog: RwLock<Arc<Catalog>>,
    pub metrics: Metrics,
    /// `http://<advertised address>:<port>`.
    pub base_url: String,
    pub ipxe_dir: PathBuf,
    ipxe_files: BTreeSet<String>,
    /// Client IP → MAC, learnt from DHCP (ciaddr) and from MAC-bearing HTTP requests.
    clients: Mutex<BTreeMap<IpAddr, String>>,
    /// Verified pieces of the served files (shared by reloads: it is content-addressed).
    pub cache: Arc<catalog::PieceCache>,
    /// The updates API (`[updates]` in cluster.toml), if configured.
    pub updates: Option<Arc<api::Updates>>,
}

impl State {
    pub fn new(catalog: Catalog, base_url: String, ipxe_dir: PathBuf) -> State {
        let ipxe_files = ["undionly.kpxe", "ipxe.efi", "snponly.efi", "snp.efi"]
            .iter()
            .filter(|f| ipxe_dir.join(f).is_file())
            .map(|f| f.to_string())
            .collect();
        let st = State {
            catalog: RwLock::new(Arc::new(catalog)),
            metrics: Metrics::default(),
            base_url,
            ipxe_dir,
            ipxe_files,
            clients: Mutex::new(BTreeMap::new()),
            cache: Arc::new(catalog::PieceCache::new(catalog::DEFAULT_CACHE_MIB << 20)),
            updates: None,
        };
        st.count_catalog();
        st
    }

    pub fn catalog(&self) -> Arc<Catalog> {
        self.catalog
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Serves `c` from now on (a rollout's build added).
    pub fn replace_catalog(&self, c: Catalog) {
        self.set_catalog(c)
    }

    fn set_catalog(&self, c: Catalog) {
        *self.catalog.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(c);
        self.count_catalog();
    }

    fn count_catalog(&self) {
        let c = self.catalog();
        self.metrics
            .set("kiln_served_builds", &[], c.builds.len() as f64);
        self.metrics
            .set("kiln_served_nodes", &[], c.nodes.len() as f64);
    }

    /// Whether the iPXE directory had `name` when the server started.
    pub fn ipxe_available(&self, name: &str) -> bool {
        self.ipxe_files.contains(name)
    }

    pub fn learn(&self, ip: IpAddr, mac: &str) {
        if ip.is_unspecified() {
            return;
        }
        let mut m = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > 65536 {
            m.clear();
        }
        m.insert(ip, mac.to_string());
    }

    pub fn mac_of(&self, ip: IpAddr) -> Option<String> {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&ip)
            .cloned()
    }

    pub fn clients_json(&self) -> BTreeMap<String, String> {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }
}

/// Why a requested file name is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PathRefusal {
    NotFound,
    /// Absolute after normalisation, `..`, or a symlink leading outside the root.
    Outside,
}

/// Resolves a client-supplied file name under `root`: backslashes count as separators, a
/// leading `/` is ignored, `..` is refused, and the final path (symlinks resolved) must be a
/// regular file inside the root.
pub fn safe_path(root: &Path, name: &str) -> Result<PathBuf, PathRefusal> {
    if name.is_empty() || name.contains('\0') {
        return Err(PathRefusal::NotFound);
    }
    let name = name.replace('\\', "/");
    let rel = Path::new(name.trim_start_matches('/'));
    let mut clean = PathBuf::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => clean.push(p),
            Component::CurDir => {}
            _ => return Err(PathRefusal::Outside),
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(PathRefusal::NotFound);
    }
    let root = root.canonicalize().map_err(|_| PathRefusal::NotFound)?;
    let full = root
        .join(&clean)
        .canonicalize()
        .map_err(|_| PathRefusal::NotFound)?;
    if !full.starts_with(&root) {
        return Err(PathRefusal::Outside);
    }
    if !full.is_file() {
        return Err(PathRefusal::NotFound);
    }
    Ok(full)
}

fn bind_error(e: std::io::Error, what: &str, port: u16, hint: &str) -> anyhow::Error {
    let why = match e.kind() {
        std::io::ErrorKind::PermissionDenied => format!(
            "port {port} is privileged: run as root (or give kiln CAP_NET_BIND_SERVICE){hint}"
        ),
        std::io::ErrorKind::AddrInUse => {
            format!("port {port} is already in use by another program{hint}")
        }
        _ => format!("{e}{hint}"),
    };
    anyhow::anyhow!("binding {what}: {why}")
}

fn udp_socket(
    addr: SocketAddr,
    iface: Option<&str>,
    broadcast: bool,
) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    if broadcast {
        s.set_broadcast(true)?;
    }
    if let Some(i) = iface {
        s.bind_device(Some(i.as_bytes()))?;
    }
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Runs `kiln serve` until SIGINT/SIGTERM; SIGHUP reloads (and re-verifies) the builds.
///
/// `out` receives the lines for the operator (what is served, the summary at the end), in
/// order; the caller decides where they go.
pub fn serve_command(
    project: &Project,
    out_dir: &Path,
    o: &ServeOptions,
    out: &dyn Fn(&str),
) -> Result<()> {
    let key = crate::trust::sign::load_verifying_key(&o.key)?;
    let advertise = match (o.advertise, &o.interface) {
        (Some(a), _) => a,
        (None, _) if !o.listen.is_unspecified() => o.listen,
        (None, Some(i)) => crate::sys::os::interface_ipv4(i)?,
        (None, None) => bail!(
            "kiln serve needs the address machines reach it at: pass --interface <nic>, \
             --listen <ip> or --advertise <ip>"
        ),
    };
    if !o.ipxe_dir.is_dir() {
        bail!(
            "iPXE directory {} is missing: apt-get install ipxe (or pass --ipxe-dir)",
            o.ipxe_dir.display()
        );
    }
    if o.dhcp == DhcpMode::Full && o.dhcp_range.is_none() {
        return Err(crate::project::recipe::RecipeError::new(
            PathBuf::from("(command line)"),
            "--dhcp-range",
            "full DHCP mode needs an address range",
            "pass --dhcp-range 10.0.0.100-10.0.0.199 (or use --dhcp proxy)",
        )
        .into());
    }
    match crate::sys::os::raise_fd_limit() {
        Ok((soft, hard)) if soft < 4096 => eprintln!(
            "warning: only {soft} file descriptors (hard limit {hard}): fewer clients at once \
             (raise it with `ulimit -Hn` or LimitNOFILE=)"
        ),
        Ok(_) => {}
        Err(e) => eprintln!("warning: raising the file descriptor limit: {e}"),
    }
    eprintln!("kiln serve: verifying builds in {} …", out_dir.display());
    let cache = Arc::new(catalog::PieceCache::new(o.cache_bytes));
    let cat = Catalog::load(project, out_dir, &key, &o.load_options(cache.clone()))?;
    if cat.nodes.is_empty() && cat.default.is_none() {
        bail!(
            "nothing to serve: no inventory node has a verified build in {} and no \
             --default-role was given (run `kiln build` first)",
            out_dir.display()
        );
    }
    warn_catalog(&cat);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .context("starting the async runtime")?;
    let grace = o.grace;
    let r = rt.block_on(run(project, out_dir, o, cat, advertise, key, out, cache));
    // TFTP transfers run on blocking threads, which dropping the runtime would wait for: they
    // get the time `tftp::serve` gives them after the stop, then the process ends without them.
    rt.shutdown_timeout(grace + Duration::from_secs(35));
    r
}

#[allow(clippy::too_many_arguments)]
async fn run(
    project: &Project,
    out_dir: &Path,
    o: &ServeOptions,
    cat: Catalog,
    advertise: Ipv4Addr,
    key: ed25519_dalek::VerifyingKey,
    out: &dyn Fn(&str),
    cache: Arc<catalog::PieceCache>,
) -> Result<()> {
    // HTTP first: its port is part of every URL handed out.
    let http_listener = bind_http(o).await?;
    let http_bound = http_listener.local_addr()?;
    let base_url = format!("http://{advertise}:{}", http_bound.port());
    let updates = match &project.cluster.updates {
        Some(_) => Some(Arc::new(api::Updates::new(
            project,
            out_dir,
            key,
            o.load_options(cache.clone()),
            o.kube_api.as_deref(),
        )?)),
        None => None,
    };
    let mut cat = cat;
    if let Some(u) = &updates {
        api::add_rollout_builds(&mut cat, u);
    }
    let mut state = State::new(cat, base_url.clone(), o.ipxe_dir.clone());
    state.cache = cache;
    state.updates = updates;
    let state = Arc::new(state);
    warn_missing_ipxe(&state, o);
    let tftp_sock = bind_tftp(o)?;
    let tftp_bound = tftp_sock.local_addr()?;

    let (tx, rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let (dhcp_bound, proxy_bound) = if o.dhcp != DhcpMode::Off {
        spawn_dhcp(project, o, &state, advertise, &rx, &mut tasks)?
    } else {
        (None, None)
    };
    tasks.spawn(tftp::serve(
        tftp_sock,
        o.ipxe_dir.clone(),
        state.clone(),
        tftp::Limits {
            max_blksize: o.max_blksize.clamp(tftp::MIN_BLKSIZE, tftp::MAX_BLKSIZE),
            // A transfer holds one descriptor (its socket): at most a quarter of them, so
            // that a saturated TFTP leaves HTTP (another quarter) and the rest their share.
            max_transfers: o
                .tftp_max_transfers
                .min(tftp_fd_share(crate::sys::os::fd_limit()))
                .max(1),
            max_per_client: o.tftp_max_per_client.max(1),
            max_duration: o.tftp_max_duration.max(Duration::from_secs(1)),
        },
        rx.clone(),
    ));
    tasks.spawn(http::serve(
        http_listener,
        state.clone(),
        rx.clone(),
        o.grace,
    ));

    let bound = Bound {
        http: http_bound,
        tftp: tftp_bound,
        dhcp: dhcp_bound,
        proxy: proxy_bound,
    };
    // Signal handlers before the status line: a SIGHUP right after it must reload, not kill.
    let signals = Signals::new()?;
    print_status(o, &state, &base_url, &bound, out)?;
    serve_until_signalled(project, out_dir, o, key, &state, &mut tasks, signals).await?;
    shut_down(o, &tx, &mut tasks).await;
    print_summary(o, &state.metrics, out)
}

/// How many TFTP transfers the descriptor limit allows (a quarter, at least 4).
fn tftp_fd_share(fd_limit: u64) -> usize {
    (fd_limit / 4).clamp(4, usize::MAX as u64) as usize
}

/// Where the listeners are bound (port 0 picks a free one).
struct Bound {
    http: SocketAddr,
    tftp: SocketAddr,
    dhcp: Option<SocketAddr>,
    proxy: Option<SocketAddr>,
}

async fn bind_http(o: &ServeOptions) -> Result<tokio::net::TcpListener> {
    let http_addr = SocketAddr::new(IpAddr::V4(o.listen), o.http_port);
    tokio::net::TcpListener::bind(http_addr).await.map_err(|e| {
        bind_error(
            e,
            "the HTTP listener",
            o.http_port,
            " (or pass --http-port)",
        )
    })
}

/// Warns about the iPXE binaries the directory lacks (their clients get no answer).
fn warn_missing_ipxe(state: &State, o: &ServeOptions) {
    for f in ["undionly.kpxe", "ipxe.efi", "snp.efi"] {
        if !state.ipxe_available(f) {
            eprintln!(
                "warning: {} has no {f}: clients that need it get no answer",
                o.ipxe_dir.display()
            );
        }
    }
}

fn bind_tftp(o: &ServeOptions) -> Result<tokio::net::UdpSocket> {
    let tftp_sock = udp_socket(
        SocketAddr::new(IpAddr::V4(o.listen), o.tftp_port),
        None,
        false,
    )
    .map_err(|e| {
        bind_error(
            e,
            "the TFTP listener (UDP)",
            o.tftp_port,
            " (or pass --tftp-port)",
        )
    })?;
    Ok(tokio::net::UdpSocket::from_std(tftp_sock)?)
}

/// How DHCP answers: full mode leases from the range (inventory nodes with an address in its
/// subnet get that address), proxy mode hands out boot information only.
fn dhcp_mode(project: &Project, o: &ServeOptions) -> dhcp::Mode {
    match o.dhcp {
        DhcpMode::Full => {
            let (start, end) = o.dhcp_range.expect("checked");
            let netmask = o.dhcp_netmask.unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
            let fixed = project
                .cluster
                .nodes
                .iter()
                .filter_map(|n| {
                    let ip: Ipv4Addr = n.address.split_once('/')?.0.parse().ok()?;
                    let m = u32::from(netmask);
                    (u32::from(ip) & m == u32::from(start) & m).then(|| {
                        (
                            crate::project::recipe::normalize_mac(&n.mac).unwrap_or(n.mac.clone()),
                            ip,
                        )
                    })
                })
                .collect();
            dhcp::Mode::Full(Mutex::new(dhcp::Pool::new(dhcp::PoolConfig {
                start,
                end,
                netmask,
                router: o.dhcp_router,
                dns: o.dhcp_dns.clone(),
                lease: o.lease.max(MIN_LEASE),
                fixed,
            })))
        }
        _ => dhcp::Mode::Proxy,
    }
}

/// Binds the DHCP listener (port 67) and, in proxy mode, the ProxyDHCP one (4011), and spawns a
/// task for each; returns their addresses.
fn spawn_dhcp(
    project: &Project,
    o: &ServeOptions,
    state: &Arc<State>,
    advertise: Ipv4Addr,
    rx: &watch::Receiver<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) -> Result<(Option<SocketAddr>, Option<SocketAddr>)> {
    let iface = o.interface.as_deref();
    let mode = Arc::new(dhcp_mode(project, o));
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let s67 = udp_socket(SocketAddr::new(any, o.dhcp_port), iface, true).map_err(|e| {
        bind_error(
            e,
            "the DHCP listener (UDP)",
            o.dhcp_port,
            " (or pass --dhcp off / --dhcp-port)",
        )
    })?;
    let s67 = Arc::new(tokio::net::UdpSocket::from_std(s67)?);
    let dhcp_bound = Some(s67.local_addr()?);
    tasks.spawn(dhcp::serve(
        s67,
        false,
        mode.clone(),
        state.clone(),
        advertise,
        rx.clone(),
    ));
    let mut proxy_bound = None;
    if o.dhcp == DhcpMode::Proxy {
        let s4011 = udp_socket(SocketAddr::new(any, o.proxy_port), iface, true).map_err(|e| {
            bind_error(
                e,
                "the ProxyDHCP listener (UDP)",
                o.proxy_port,
                " (or pass --proxy-port)",
            )
        })?;
        let s4011 = Arc::new(tokio::net::UdpSocket::from_std(s4011)?);
        proxy_bound = Some(s4011.local_addr()?);
        tasks.spawn(dhcp::serve(
            s4011,
            true,
            mode,
            state.clone(),
            advertise,
            rx.clone(),
        ));
    }
    Ok((dhcp_bound, proxy_bound))
}

/// What is served where: one JSON line (`--json`), else a line per node.
fn print_status(
    o: &ServeOptions,
    state: &State,
    base_url: &str,
    bound: &Bound,
    out: &dyn Fn(&str),
) -> Result<()> {
    let (http_bound, tftp_bound) = (bound.http, bound.tftp);
    let (dhcp_bound, proxy_bound) = (bound.dhcp, bound.proxy);
    let status = serde_json::json!({
        "event": "listening",
        "base_url": base_url,
        "http": http_bound.to_string(),
        "tftp": tftp_bound.to_string(),
        "dhcp": dhcp_bound.map(|a| a.to_string()),
        "proxy_dhcp": proxy_bound.map(|a| a.to_string()),
        "dhcp_mode": format!("{:?}", o.dhcp).to_lowercase(),
        "interface": o.interface,
        "ipxe_dir": o.ipxe_dir,
        "catalog": state.catalog().status(),
    });
    if o.json {
        out(&serde_json::to_string(&status)?);
    } else {
        let cat = state.catalog();
        out(&format!(
            "kiln serve: {base_url} (HTTP {http_bound}, TFTP {tftp_bound}, DHCP {})",
            match (dhcp_bound, proxy_bound) {
                (Some(a), Some(b)) => format!("proxy on {} and {}", a, b.port()),
                (Some(a), None) => format!("full on {a}"),
                _ => "off".into(),
            }
        ));
        for n in cat.nodes.values() {
            out(&format!(
                "  {} {} → {} {} seed={}",
                n.mac,
                n.hostname,
                n.role,
                catalog::short(&n.build_id),
                n.instance_id.as_deref().unwrap_or("none")
            ));
        }
        if let Some((r, id)) = &cat.default {
            out(&format!("  any other MAC → {r} {}", catalog::short(id)));
        }
    }
    Ok(())
}

/// The signals `kiln serve` handles: INT/TERM stop, HUP reloads.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Serves until SIGINT or SIGTERM; SIGHUP reloads the builds. A listener that fails ends it
/// with an error.
async fn serve_until_signalled(
    project: &Project,
    out_dir: &Path,
    o: &ServeOptions,
    key: ed25519_dalek::VerifyingKey,
    state: &State,
    tasks: &mut tokio::task::JoinSet<()>,
    signals: Signals,
) -> Result<()> {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(project, out_dir, o, key, state).await,
            r = tasks.join_next() => {
                if let Some(Err(e)) = r {
                    bail!("a listener stopped: {e}");
                }
            }
        }
    }
    Ok(())
}

/// SIGHUP: loads (and verifies) the builds again; when that fails the previous ones stay served.
async fn reload(
    project: &Project,
    out_dir: &Path,
    o: &ServeOptions,
    key: ed25519_dalek::VerifyingKey,
    state: &State,
) {
    let (p, out, k, lo) = (
        project.clone(),
        out_dir.to_path_buf(),
        key,
        o.load_options(state.cache.clone()),
    );
    let u = state.updates.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let mut c = Catalog::load(&p, &out, &k, &lo)?;
        if let Some(u) = &u {
            api::add_rollout_builds(&mut c, u);
        }
        Ok::<_, anyhow::Error>(c)
    });
    match loaded.await {
        Ok(Ok(c)) => {
            warn_catalog(&c);
            eprintln!(
                "kiln serve: reloaded: {} build(s), {} node(s)",
                c.builds.len(),
                c.nodes.len()
            );
            state.set_catalog(c);
        }
        Ok(Err(e)) => eprintln!("error: reload failed, still serving the previous builds: {e:#}"),
        Err(e) => eprintln!("error: reload failed: {e}"),
    }
}

/// Tells the listeners to stop and waits for them (open transfers finish within the grace
/// period).
async fn shut_down(
    o: &ServeOptions,
    tx: &watch::Sender<bool>,
    tasks: &mut tokio::task::JoinSet<()>,
) {
    eprintln!(
        "kiln serve: stopping (finishing open transfers, at most {:?}) …",
        o.grace
    );
    let _ = tx.send(true);
    let _ = tokio::time::timeout(o.grace + Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
}

/// What was served: one JSON line (`--json`), else a line on stderr.
fn print_summary(o: &ServeOptions, m: &Metrics, out: &dyn Fn(&str)) -> Result<()> {
    let summary = serde_json::json!({
        "event": "stopped",
        "http_requests": m.count("kiln_http_requests_total"),
        "http_bytes": m.count("kiln_http_bytes_sent_total"),
        "tftp_transfers": m.count("kiln_tftp_transfers_total"),
        "tftp_bytes": m.count("kiln_tftp_bytes_sent_total"),
        "dhcp_replies": m.count("kiln_dhcp_replies_total"),
        "integrity_failures": m.count("kiln_integrity_failures_total"),
    });
    if o.json {
        out(&serde_json::to_string(&summary)?);
    } else {
        eprintln!("kiln serve: stopped: {summary}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Not coverage-guided (that is `cargo fuzz`, see fuzz/): a fixed-seed mutation run over
    /// captured-style packets so every `cargo test` exercises the fuzz entry points.
    #[test]
    fn mutated_packets_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b696c6e);
        let dhcp_seed = {
            use dhcproto::Encodable;
            dhcp::sample_request(
                [0x52, 0x54, 0, 1, 2, 3],
                dhcproto::v4::MessageType::Discover,
                Some(7),
                Some(b"PXEClient:Arch:00007:UNDI:003016"),
                Some(b"iPXE"),
            )
            .to_vec()
            .unwrap()
        };
        let tftp_seed = tftp::encode(&tftp::Packet::Rrq {
            filename: "ipxe.efi".into(),
            mode: "octet".into(),
            options: vec![
                ("blksize".into(), "1468".into()),
                ("tsize".into(), "0".into()),
            ],
        });
        for i in 0..20_000 {
            for (seed, f) in [
                (&dhcp_seed, crate::testing::fuzz::fuzz_dhcp as fn(&[u8])),
                (&tftp_seed, crate::testing::fuzz::fuzz_tftp as fn(&[u8])),
            ] {
                let mut b = seed.clone();
                for _ in 0..rng.gen_range(1..8) {
                    match rng.gen_range(0..4) {
                        0 if !b.is_empty() => {
                            let j = rng.gen_range(0..b.len());
                            b[j] = rng.gen();
                        }
                        1 => b.truncate(rng.gen_range(0..=b.len())),
                        2 => b.push(rng.gen()),
                        _ if !b.is_empty() => {
                            let j = rng.gen_range(0..b.len());
                            b.insert(j, 0);
                        }
                        _ => {}
                    }
                }
                f(&b);
            }
            if i % 7 == 0 {
                let mut r = (rng.gen::<u64>()).to_le_bytes().to_vec();
                r.extend_from_slice(
                    format!(
                        "bytes={}-{}",
                        rng.gen_range(0..100u32),
                        rng.gen_range(0..100u32)
                    )
                    .as_bytes(),
                );
                crate::testing::fuzz::fuzz_range(&r);
            }
        }
    }

    #[test]
    fn safe_path_confines_to_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.efi"), b"x").unwrap();
        std::fs::write(root.join("sub/b"), b"y").unwrap();
        std::fs::write(d.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink("../secret", root.join("link")).unwrap();
        assert!(safe_path(&root, "a.efi").is_ok());
        assert!(safe_path(&root, "/a.efi").is_ok());
        assert!(safe_path(&root, "sub\\b").is_ok());
        assert!(safe_path(&root, "./sub/b").is_ok());
        assert_eq!(safe_path(&root, "../secret"), Err(PathRefusal::Outside));
        assert_eq!(
            safe_path(&root, "sub/../../secret"),
            Err(PathRefusal::Outside)
        );
        assert_eq!(safe_path(&root, "..\\secret"), Err(PathRefusal::Outside));
        assert_eq!(safe_path(&root, "link"), Err(PathRefusal::Outside));
        assert_eq!(safe_path(&root, "sub"), Err(PathRefusal::NotFound));
        assert_eq!(safe_path(&root, "nope"), Err(PathRefusal::NotFound));
        assert_eq!(safe_path(&root, ""), Err(PathRefusal::NotFound));
        assert_eq!(safe_path(&root, "a\0b"), Err(PathRefusal::NotFound));
    }
}
