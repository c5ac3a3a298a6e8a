//! `cim up`: a whole cluster (one route, two servers) in one process, on the embedded store
//! and registry unless `--redis` / `--zk` name real ones. Secrets are drawn at random: the
//! three share them in memory. `cim up --tls` also makes a throwaway CA and certificates at
//! start and serves everything over TLS.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::io::{AsyncBufReadExt, BufReader};

use cim_core::ids::ServerId;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_io::clock::Clock;
use cim_io::launch;
use cim_io::net::TokioNet;
use cim_io::registry::AnyRegistry;
use cim_io::route::{self, RouteHandle, RouteOptions};
use cim_io::server::{self, ServerHandle, ServerOptions};
use cim_io::store::{RedisOptions, Store};
use cim_io::tls::dev::DevPki;
use cim_io::tls::setup::{RouteSide, ServerSide, TlsFlags};

mod admin;
mod smoke;

#[derive(Parser, Debug)]
#[command(name = "cim", version, about = "CIM: distributed instant messaging")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start and matched at once: the size of the route's many settings does not
// matter here.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run one route and two servers in this process, then chat with `cim-client`.
    Up(UpArgs),
    /// Run a server of a real deployment (the same as the `cim-server` binary).
    Server(cim_server::Args),
    /// Run a route of a real deployment (the same as the `cim-route` binary).
    Route(cim_route::Args),
    /// Check a running cluster end to end: two new users log in and exchange a group and a
    /// private message. Exits non-zero on any failure (used by CI against `cim up`).
    Smoke(SmokeArgs),
    /// Administer a running deployment through a route's admin listener (list users, show
    /// a session, kick, reset a password, delete an account), or migrate its Redis store.
    Admin(admin::AdminArgs),
}

#[derive(clap::Args, Debug)]
struct SmokeArgs {
    /// The route's HTTP API: host:port, http://host:port, or https://host:port (then every
    /// server must speak TLS too).
    #[arg(long, env = "CIM_ROUTE", default_value = "127.0.0.1:8083")]
    route: String,
    /// PEM file of the CA to trust for the route's and the servers' certificates (e.g. the
    /// `ca.pem` of `cim up --tls`); default the system's roots.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Give up after this long.
    #[arg(long, default_value = "30s", value_parser = launch::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(clap::Args, Debug)]
struct UpArgs {
    /// Address everything binds and advertises.
    #[arg(long, env = "CIM_HOST", default_value = "127.0.0.1")]
    host: IpAddr,
    /// The route's HTTP API port [default: 8083; with --any-ports a free one].
    #[arg(long, env = "CIM_ROUTE_PORT")]
    route_port: Option<u16>,
    /// First server's client port; the second uses the next one [default: 11211; with
    /// --any-ports free ones].
    #[arg(long, env = "CIM_CLIENT_PORT")]
    client_port: Option<u16>,
    /// First server's internal link port (routes dial it); the second uses the next one
    /// [default: 11311; with --any-ports free ones].
    #[arg(long, env = "CIM_LINK_PORT")]
    link_port: Option<u16>,
    /// First server's health and metrics port (`/health`, `/metrics`); the second uses the
    /// next one [default: 8081; with --any-ports free ones].
    #[arg(long, env = "CIM_HEALTH_PORT")]
    health_port: Option<u16>,
    /// First server's WebSocket port (browsers: `ws://`, or `wss://` with --tls); the second
    /// uses the next one [default: 11411; with --any-ports free ones].
    #[arg(long, env = "CIM_WS_PORT")]
    ws_port: Option<u16>,
    /// Browser origins (`scheme://host[:port]`, repeatable or a comma list, `*` for any) the
    /// servers' WebSocket ports accept [default: the route's own origin, where its web
    /// client will be served; none with --any-ports and no --route-port].
    #[arg(long, env = "CIM_WS_ALLOWED_ORIGIN", value_delimiter = ',')]
    ws_allowed_origin: Vec<String>,
    /// The route's admin listener (`cim admin`), with a token drawn at start and written to
    /// a file only you can read [default: 8084; with --any-ports a free one].
    #[arg(long, env = "CIM_ADMIN_PORT")]
    admin_port: Option<u16>,
    /// Pick a free port for every port not set by its own flag (route, clients, links,
    /// health, admin): for running beside another cluster or anything holding the defaults.
    #[arg(long)]
    any_ports: bool,
    /// Use this Redis instead of the embedded store.
    #[arg(long, env = "CIM_REDIS")]
    redis: Option<String>,
    /// With --redis: run even if that Redis may evict keys (maxmemory-policy other than
    /// noeviction).
    #[arg(long, env = "CIM_ALLOW_EVICTION", requires = "redis")]
    allow_eviction: bool,
    /// Use this ZooKeeper ensemble (host:port[,host:port]) instead of the embedded registry.
    #[arg(long, env = "CIM_ZK")]
    zk: Option<String>,
    /// Connections each of the three listeners (the route's HTTP API, each server's client
    /// gateway) holds at once; lowered so that together they stay within the open-file
    /// limit. Default: the route's and the servers' own defaults, lowered the same way.
    #[arg(long, env = "CIM_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Serve everything over TLS: the route's HTTPS, both servers' client gateways, and
    /// mutual TLS on the internal links. A throwaway CA and certificates for 127.0.0.1,
    /// localhost and --host are made at start; the CA's path and the client command that
    /// trusts it are printed.
    #[arg(long)]
    tls: bool,
    /// With --tls: write the CA, certificates and keys (owner-only) into this directory
    /// (created owner-only if missing, kept after the cluster stops) instead of a fresh
    /// temporary one (deleted when the cluster stops).
    #[arg(long, value_name = "DIR", requires = "tls")]
    tls_dir: Option<PathBuf>,
    /// Log lines as text (for people) or json (one object a line, for a log pipeline).
    #[arg(long, env = "CIM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// mimalloc rather than glibc's malloc: the serving path allocates and frees a frame's
/// buffers per message, and glibc's malloc was a third of the cluster's CPU in a fan-out
/// (BENCHMARKS.md, round 9).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => launch::report_failure(error.as_ref()),
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => {
            let format = launch::LogFormat::parse(Some(&args.log_format)).unwrap_or_default();
            launch::init_logging("warn,cim_io=info", format);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let outcome = runtime.block_on(up(args));
            // The control terminal is read by a blocking thread that no signal interrupts:
            // waiting for it (dropping the runtime) would hang after Ctrl-C until Enter.
            runtime.shutdown_background();
            outcome
        }
        Command::Smoke(args) => {
            launch::init_tracing("warn");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    tokio::time::timeout(args.timeout, smoke::run(&args.route, args.ca.as_deref()))
                        .await
                        .map_err(|_| {
                            anyhow::anyhow!("smoke check timed out after {:?}", args.timeout)
                        })?
                })
        }
        Command::Admin(args) => {
            launch::init_tracing("warn");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(admin::run(args))
        }
        Command::Server(args) => cim_server::run_blocking(args),
        Command::Route(args) => cim_route::run_blocking(args),
    }
}

/// The cap of each of `cim up`'s `listeners` connection-capped listeners: `requested`,
/// lowered so that together they stay within the process's open-file limit `file_limit`.
fn up_share(requested: usize, listeners: usize, file_limit: Option<u64>) -> usize {
    match file_limit {
        Some(limit) => {
            requested.min((cim_io::fd_limit::connection_budget(limit) / listeners.max(1)).max(1))
        }
        None => requested,
    }
}

/// The ports `cim up` binds: each from its flag, else its default, else (with `--any-ports`)
/// 0, a free one. The second server takes the port after the first's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UpPorts {
    route: u16,
    admin: u16,
    client: [u16; 2],
    link: [u16; 2],
    health: [u16; 2],
    ws: [u16; 2],
}

impl UpPorts {
    const ROUTE: u16 = 8083;
    const ADMIN: u16 = 8084;
    const CLIENT: u16 = 11211;
    const LINK: u16 = 11311;
    const HEALTH: u16 = 8081;
    const WS: u16 = 11411;

    fn from_args(args: &UpArgs) -> anyhow::Result<Self> {
        let any = args.any_ports;
        let pick = |flag: Option<u16>, default: u16| flag.unwrap_or(if any { 0 } else { default });
        let pair = |first: u16, flag: &str| -> anyhow::Result<[u16; 2]> {
            if first == 0 {
                return Ok([0, 0]);
            }
            let second = first.checked_add(1).with_context(|| {
                format!("{flag} {first}: the second server needs the port after it")
            })?;
            Ok([first, second])
        };
        Ok(Self {
            route: pick(args.route_port, Self::ROUTE),
            admin: pick(args.admin_port, Self::ADMIN),
            client: pair(pick(args.client_port, Self::CLIENT), "--client-port")?,
            link: pair(pick(args.link_port, Self::LINK), "--link-port")?,
            health: pair(pick(args.health_port, Self::HEALTH), "--health-port")?,
            ws: pair(pick(args.ws_port, Self::WS), "--ws-port")?,
        })
    }

    /// What a server's listener is called, and the flag that sets its port.
    fn server_flag(listener: &str) -> (&'static str, &'static str) {
        match listener {
            "client" => ("client port", "--client-port"),
            "link" => ("link port", "--link-port"),
            "websocket" => ("WebSocket port", "--ws-port"),
            _ => ("health/metrics port", "--health-port"),
        }
    }
}

/// The browser origins `cim up`'s WebSocket ports accept: the flag's, or else the route's
/// own (by its address and by `localhost` when that is loopback), where the web client is
/// served. With a route port picked at start there is no origin to name beforehand.
fn up_ws_origins(
    args: &UpArgs,
    route_port: u16,
    tls: bool,
) -> anyhow::Result<server::ws::OriginPolicy> {
    if !args.ws_allowed_origin.is_empty() {
        return server::ws::OriginPolicy::from_list(&args.ws_allowed_origin)
            .map_err(|e| anyhow::anyhow!("--ws-allowed-origin: {e}"));
    }
    if route_port == 0 {
        return Ok(server::ws::OriginPolicy::NoBrowsers);
    }
    let scheme = if tls { "https" } else { "http" };
    let host = match args.host {
        IpAddr::V6(ip) => format!("[{ip}]"),
        IpAddr::V4(ip) => ip.to_string(),
    };
    let mut origins = vec![format!("{scheme}://{host}:{route_port}")];
    if args.host.is_loopback() {
        origins.push(format!("{scheme}://localhost:{route_port}"));
    }
    server::ws::OriginPolicy::from_list(&origins).map_err(|e| anyhow::anyhow!(e))
}

/// [`launch::bind_failure`] plus `cim up`'s own way out.
fn up_bind_failure(
    listener: &str,
    addr: SocketAddr,
    flag: &str,
    source: &std::io::Error,
) -> String {
    let mut text = launch::bind_failure(listener, addr, flag, source);
    if source.kind() == std::io::ErrorKind::AddrInUse {
        text.push_str(
            ", or pass --any-ports to pick free ports for every port not set by its flag",
        );
    }
    text
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let ports = UpPorts::from_args(&args)?;
    // One route and two servers share this process's descriptors.
    let file_limit = cim_io::fd_limit::raise_file_limit();
    let route_max = up_share(
        args.max_connections
            .unwrap_or(cim_io::http_server::HttpLimits::default().max_connections),
        3,
        file_limit,
    );
    if let Some(asked) = args.max_connections.filter(|n| *n > route_max) {
        tracing::warn!(
            asked,
            max_connections = route_max,
            open_file_limit = file_limit,
            "--max-connections lowered: the route and both servers share the open-file limit"
        );
    }
    let store: Arc<dyn Store> = launch::open_store(
        args.redis.as_deref(),
        RedisOptions {
            allow_eviction: args.redis.is_none() || args.allow_eviction,
            ..RedisOptions::default()
        },
    )
    .await?;
    let registry: AnyRegistry = launch::open_registry(
        args.zk.as_deref(),
        "/cim/servers",
        std::time::Duration::from_secs(6),
    )?;
    let ticket_secret = launch::random_secret();
    let link_secret = launch::random_secret();
    let tls = UpTls::make(&args).context("making the TLS certificates (--tls)")?;

    let ws_origins = up_ws_origins(&args, ports.route, tls.is_some())?;
    let mut servers = Vec::new();
    let mut server_options = Vec::new();
    for i in 0..2u16 {
        let id = ServerId::new(format!("s{}", i + 1));
        let mut node = ServerConfig::new(id, TicketKeys::new(1, ticket_secret.clone()));
        node.max_connections = up_share(
            args.max_connections.unwrap_or(node.max_connections),
            3,
            file_limit,
        );
        let mut options = ServerOptions::new(node, link_secret.clone());
        options.listen_ip = args.host;
        options.advertise_host = args.host.to_string();
        // Kept in `server_options`, so a server the terminal restarts speaks TLS again.
        if let Some(tls) = &tls {
            let side = tls.server()?;
            options.gateway_tls = Some(side.gateway);
            options.link_tls = Some(side.link);
        }
        let at = usize::from(i);
        options.client_port = ports.client[at];
        options.link_port = ports.link[at];
        options.http_port = ports.health[at];
        options.ws_port = Some(ports.ws[at]);
        options.ws_origins = ws_origins.clone();
        let handle = server::start(
            TokioNet,
            Clock::System,
            options.clone(),
            store.clone(),
            &registry,
        )
        .await
        .map_err(|error| match error {
            server::StartError::Bind {
                listener,
                addr,
                source,
            } => {
                let (what, flag) = UpPorts::server_flag(listener);
                anyhow::anyhow!(
                    "{}",
                    up_bind_failure(&format!("server s{} {what}", i + 1), addr, flag, &source)
                )
            }
            server::StartError::Registry(error) if args.zk.is_some() => anyhow::anyhow!(
                "starting server s{}: {}",
                i + 1,
                launch::zk_failure(args.zk.as_deref().unwrap_or_default(), &error)
            ),
            other => anyhow::Error::new(other).context(format!("starting server s{}", i + 1)),
        })?;
        // A restart binds the same ports again (also with --any-ports).
        options.client_port = handle.client_addr().port();
        options.link_port = handle.link_addr().port();
        options.http_port = handle.http_addr().port();
        options.ws_port = handle.ws_addr().map(|addr| addr.port());
        server_options.push(options);
        servers.push(handle);
    }

    let mut options = RouteOptions::new(
        "route-1",
        TicketKeys::new(1, ticket_secret),
        launch::random_secret(),
        link_secret,
    );
    options.http_listen = SocketAddr::new(args.host, ports.route);
    options.seed = launch::os_seed();
    options.login_entropy = Some(launch::os_entropy());
    options.http.max_connections = route_max;
    // The admin listener, so `cim admin` can be tried here too: its token is drawn now and
    // written owner-only into a directory deleted when this stops.
    let admin_token = UpAdminToken::write()?;
    options.admin = Some(route::AdminOptions {
        listen: SocketAddr::new(args.host, ports.admin),
        token: admin_token.token.clone().into_bytes(),
    });
    if let Some(tls) = &tls {
        options.https = Some(tls.route.https.clone());
        options.link_tls = Some(tls.route.links.clone());
    }
    let route = route::start(TokioNet, Clock::System, options, store.clone(), &registry)
        .await
        .map_err(|error| match error {
            route::StartError::Bind { addr, source }
                if ports.admin != 0 && addr.port() == ports.admin =>
            {
                anyhow::anyhow!(
                    "{}",
                    up_bind_failure("the route's admin listener", addr, "--admin-port", &source)
                )
            }
            route::StartError::Bind { addr, source } => anyhow::anyhow!(
                "{}",
                up_bind_failure("the route's HTTP API", addr, "--route-port", &source)
            ),
            route::StartError::Registry(error) if args.zk.is_some() => anyhow::anyhow!(
                "starting the route: {}",
                launch::zk_failure(args.zk.as_deref().unwrap_or_default(), &error)
            ),
            other => anyhow::Error::new(other).context("starting the route"),
        })?;

    print_welcome(
        &route,
        &servers,
        args.redis.is_some(),
        args.zk.is_some(),
        tls.as_ref(),
        &admin_token,
    );
    let mut servers: Vec<Option<ServerHandle>> = servers.into_iter().map(Some).collect();
    // Made before the loop: a Ctrl-C during a command's answer is kept, not lost.
    let mut stop = launch::StopSignals::listen();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut reading = true;
    loop {
        tokio::select! {
            () = stop.recv() => break,
            line = stdin.next_line(), if reading => match line {
                Ok(Some(line)) => {
                    let answer = control(&line, &mut servers, &server_options, &store, &registry).await;
                    println!("{answer}");
                }
                // No terminal (a background job, CI): only signals stop it.
                Ok(None) | Err(_) => reading = false,
            },
        }
    }
    println!("\nstopping: servers drain (clients are told to reconnect elsewhere), then the route");
    for server in servers.into_iter().flatten() {
        if let Err(error) = server.drain().await {
            tracing::warn!(%error, "drain failed");
        }
    }
    route.shutdown().await;
    if let Some(UpTls {
        temp: Some(temp), ..
    }) = tls
    {
        let dir = temp.path().to_owned();
        match temp.close() {
            Ok(()) => println!("deleted the TLS directory {}", dir.display()),
            Err(error) => {
                tracing::warn!(%error, dir = %dir.display(), "could not delete the TLS directory")
            }
        }
    }
    Ok(())
}

/// `cim up --tls`: a throwaway CA, a route and a server certificate signed by it, and the
/// listeners' and dialers' TLS made from them exactly as `cim-route` and `cim-server` make
/// theirs from `--tls-cert`, `--tls-key` and `--tls-ca`.
/// `cim up`'s admin token and the owner-only temporary file `cim admin --token-file` reads.
struct UpAdminToken {
    token: String,
    dir: tempfile::TempDir,
}

impl UpAdminToken {
    fn write() -> anyhow::Result<Self> {
        let token: String = launch::random_secret()
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        // tempfile makes the directory 0700; the file is 0600 as well.
        let dir = tempfile::Builder::new()
            .prefix("cim-up-admin-")
            .tempdir()
            .context("a temporary directory for the admin token")?;
        let file = dir.path().join("admin-token");
        cim_io::tls::dev::write_key(&file, &token)
            .with_context(|| format!("writing {}", file.display()))?;
        Ok(Self { token, dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("admin-token")
    }
}

struct UpTls {
    pki: DevPki,
    /// The directory the files are in, when it is a fresh temporary one: deleted at the end.
    temp: Option<tempfile::TempDir>,
    /// The name the servers advertise (their certificates must be valid for it).
    host: String,
    route: RouteSide,
}

impl UpTls {
    fn make(args: &UpArgs) -> anyhow::Result<Option<Self>> {
        if !args.tls {
            return Ok(None);
        }
        let (dir, temp) = match &args.tls_dir {
            Some(dir) => {
                private_dir(dir)?;
                (std::path::absolute(dir)?, None)
            }
            None => {
                // A fresh random name under $TMPDIR, readable by this user only.
                let temp = tempfile::Builder::new()
                    .prefix("cim-up-tls-")
                    .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .tempdir()
                    .context("creating a temporary directory")?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        let host = args.host.to_string();
        let mut hosts = vec!["127.0.0.1", "localhost"];
        if !hosts.contains(&host.as_str()) {
            hosts.push(&host);
        }
        let pki = DevPki::generate(&dir, &hosts)
            .with_context(|| format!("writing certificates into {}", dir.display()))?;
        let route = RouteSide::load(&TlsFlags {
            cert: Some(pki.route_cert.clone()),
            key: Some(pki.route_key.clone()),
            ca: Some(pki.ca.clone()),
            accept_plaintext: false,
        })?
        .context("the route's TLS is on when given files")?;
        let up = Self {
            pki,
            temp,
            host: host.clone(),
            route,
        };
        up.server()?; // refuse bad files before anything starts
        Ok(Some(up))
    }

    /// One server's TLS, loaded for it alone, so each server counts its own handshakes.
    fn server(&self) -> anyhow::Result<ServerSide> {
        let flags = TlsFlags {
            cert: Some(self.pki.server_cert.clone()),
            key: Some(self.pki.server_key.clone()),
            ca: Some(self.pki.ca.clone()),
            accept_plaintext: false,
        };
        ServerSide::load(&flags, &self.host)?.context("the servers' TLS is on when given files")
    }

    fn dir(&self) -> &Path {
        self.pki.ca.parent().unwrap_or(Path::new("."))
    }
}

/// Creates `dir` (and its parents) readable by its owner only, unless it exists.
/// Makes `dir` owner-only if missing. An existing one must not be writable by others: the
/// CA and keys written there are what every process trusts, and anyone who may write the
/// directory may swap them (a shared `/tmp` is the trap).
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if dir.is_dir() {
        let mode = std::fs::metadata(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .permissions()
            .mode();
        anyhow::ensure!(
            mode & 0o022 == 0,
            "--tls-dir {} is writable by other users (mode {:o}): anyone who can write it \
             could swap the CA and keys; use a directory only you can write (chmod go-w), \
             or a new path (created owner-only)",
            dir.display(),
            mode & 0o777
        );
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

const CONTROL_HELP: &str = "commands: restart <s1|s2> (stop gracefully, start again), \
stop <s>, kill <s> (as a crash would), start <s>, status";

/// One line typed into `cim up`'s terminal: stop, kill, start or restart a server, to watch
/// the clients move and recover.
async fn control(
    line: &str,
    servers: &mut [Option<ServerHandle>],
    options: &[ServerOptions],
    store: &Arc<dyn Store>,
    registry: &AnyRegistry,
) -> String {
    let mut words = line.split_whitespace();
    let (verb, name) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    if verb.is_empty() {
        return String::new();
    }
    if verb == "status" {
        return options
            .iter()
            .zip(servers.iter())
            .map(|(o, s)| {
                let state = if s.is_some() { "running" } else { "stopped" };
                let ws = o
                    .ws_port
                    .map(|p| format!(", websocket :{p}"))
                    .unwrap_or_default();
                format!(
                    "{} {state} (clients :{}{ws})",
                    o.node.server_id, o.client_port
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
    }
    let Some(i) = options
        .iter()
        .position(|o| o.node.server_id.as_str() == name)
    else {
        return format!("no server {name:?}; {CONTROL_HELP}");
    };
    let mut out = Vec::new();
    if matches!(verb, "stop" | "restart" | "kill") {
        match servers[i].take() {
            None => out.push(format!("{name} is not running")),
            Some(server) if verb == "kill" => {
                server.abort();
                out.push(format!("{name} killed: its clients reconnect on their own"));
            }
            Some(server) => {
                if let Err(error) = server.drain().await {
                    out.push(format!("{name}: {error}"));
                }
                out.push(format!(
                    "{name} stopped (drained: its clients were sent elsewhere)"
                ));
            }
        }
    }
    if matches!(verb, "start" | "restart") {
        if servers[i].is_some() {
            out.push(format!("{name} is already running"));
        } else {
            match server::start(
                TokioNet,
                Clock::System,
                options[i].clone(),
                store.clone(),
                registry,
            )
            .await
            {
                Ok(server) => {
                    servers[i] = Some(server);
                    out.push(format!(
                        "{name} started again on :{}",
                        options[i].client_port
                    ));
                }
                Err(error) => out.push(format!("{name} did not start: {error}")),
            }
        }
    }
    if out.is_empty() {
        return format!("unknown command {verb:?}; {CONTROL_HELP}");
    }
    out.join("\n")
}

/// How to start the console client, as the README says: the `cim-client` binary built next
/// to this one (`target/release/cim-client` after the quick start's build), named relative to
/// the current directory when it is below it. `false` when no such binary exists yet (then the
/// README's path, to be built first).
fn client_command() -> (String, bool) {
    let name = format!("cim-client{}", std::env::consts::EXE_SUFFIX);
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(&name)))
        .filter(|path| path.is_file());
    match sibling {
        Some(path) => {
            let shown = std::env::current_dir()
                .ok()
                .and_then(|cwd| path.strip_prefix(cwd).ok().map(|p| p.to_path_buf()))
                .unwrap_or(path);
            // `cim-client` alone would be looked up in PATH.
            let shown = if shown.components().count() == 1 {
                std::path::Path::new(".").join(shown)
            } else {
                shown
            };
            (shown.display().to_string(), true)
        }
        None => (format!("target/release/{name}"), false),
    }
}

fn print_welcome(
    route: &RouteHandle,
    servers: &[ServerHandle],
    redis: bool,
    zk: bool,
    tls: Option<&UpTls>,
    admin_token: &UpAdminToken,
) {
    let http = route.http_addr();
    let scheme = if tls.is_some() { "https" } else { "http" };
    if tls.is_some() {
        println!("cim up: a route and two servers are running in this process, all over TLS");
    } else {
        println!("cim up: a route and two servers are running in this process");
    }
    println!("  route     {scheme}://{http}  (API: {scheme}://{http}/openapi.json)");
    for s in servers {
        let ws = s
            .ws_addr()
            .map(|addr| {
                let scheme = if tls.is_some() { "wss" } else { "ws" };
                format!("  websocket {scheme}://{addr}/")
            })
            .unwrap_or_default();
        println!(
            "  server {}  clients {}{}{ws}  ready http://{}/health/ready",
            s.server_id(),
            s.client_addr(),
            if tls.is_some() { " (TLS)" } else { "" },
            s.http_addr()
        );
    }
    println!(
        "  store: {}; registry: {}",
        if redis {
            "Redis"
        } else {
            "embedded, in memory (gone when this stops)"
        },
        if zk { "ZooKeeper" } else { "embedded" }
    );
    let mut trust = String::new();
    if let Some(tls) = tls {
        println!(
            "  TLS: a throwaway CA made at start signed the route's and the servers' certificates \
             (127.0.0.1, localhost); the internal links are mutual TLS."
        );
        println!(
            "  Files (keys readable by you only) in {}{}",
            tls.dir().display(),
            if tls.temp.is_some() {
                ", a temporary directory deleted when this stops"
            } else {
                ""
            }
        );
        println!("  CA certificate: {}", tls.pki.ca.display());
        trust = format!(" --ca {}", tls.pki.ca.display());
    }
    println!();
    let (client, built) = client_command();
    if !built {
        println!("Build the console client once: cargo build --release -p cim-client");
    }
    if tls.is_some() {
        println!("Chat from two other terminals (--ca makes the client trust this run's CA):");
    } else {
        println!("Chat from two other terminals:");
    }
    for name in ["alice", "bob"] {
        println!("  {client} --route {scheme}://{http}{trust} --user {name}");
    }
    println!(
        "(the first run registers the name and asks for a password, at least 8 characters); then type a line to talk to \
         everyone, `@bob text` to whisper, `:help` for more."
    );
    // Served by the route itself (web/, embedded); the servers' WebSocket ports let it in.
    println!("Or chat in a browser: open {scheme}://{http}/");
    if let Some(admin) = route.admin_addr() {
        println!(
            "Administer (list users, kick, delete; see docs/admin.md):\n  \
             {} admin --url {scheme}://{admin}{trust} --token-file {} users",
            // As this was started (`target/release/cim`, `cim`, ...).
            std::env::args().next().unwrap_or_else(|| "cim".into()),
            admin_token.path().display()
        );
    }
    println!(
        "Type `restart s1` here to restart a server (also `stop`, `kill`, `start`, `status`) \
         and watch the clients recover. Ctrl-C stops the cluster."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tls_dir_others_may_write_is_refused_and_a_new_one_is_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let base = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let fresh = base.path().join("new/tls");
        private_dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), 0o700);
        private_dir(&fresh).expect("an owner-only directory is reused");
        for shared in [0o777, 0o1777, 0o775] {
            std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(shared)).unwrap();
            let error = private_dir(&fresh)
                .expect_err("writable by others")
                .to_string();
            assert!(error.contains("writable by other users"), "{error}");
        }
        std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&fresh).expect("readable by others is fine: the keys are owner-only");
    }

    #[test]
    fn up_splits_the_file_limit_between_its_three_listeners() {
        // 1024 descriptors: 896 for connections, a third each.
        assert_eq!(up_share(100_000, 3, Some(1024)), 298);
        assert_eq!(up_share(100, 3, Some(1024)), 100);
        assert!(3 * up_share(usize::MAX, 3, Some(4096)) <= 4096);
        assert_eq!(up_share(100_000, 3, None), 100_000);
        assert_eq!(up_share(100_000, 3, Some(2)), 1);
    }
    use cim_core::memstore::MemoryStoreConfig;
    use cim_io::registry::{MemoryRegistry, Registry};
    use cim_io::store::MemoryBackend;
    use std::time::Duration;

    fn up_args(flags: &[&str]) -> UpArgs {
        let mut argv = vec!["cim", "up"];
        argv.extend_from_slice(flags);
        match Cli::try_parse_from(argv).expect("flags parse").command {
            Command::Up(args) => args,
            other => panic!("not up: {other:?}"),
        }
    }

    #[test]
    fn every_port_has_its_flag_and_any_ports_moves_the_rest() {
        // Only the CIM_* variables of these flags could change the answer: none are set in
        // tests, and clap reads them only for flags left out.
        let defaults = UpPorts::from_args(&up_args(&[])).unwrap();
        assert_eq!(
            defaults,
            UpPorts {
                route: 8083,
                admin: 8084,
                client: [11211, 11212],
                link: [11311, 11312],
                health: [8081, 8082],
                ws: [11411, 11412],
            }
        );
        // --client-port alone moves the client ports only: the others keep their defaults
        // (and a taken one is named with its own flag).
        let clients = UpPorts::from_args(&up_args(&["--client-port", "22211"])).unwrap();
        assert_eq!(clients.client, [22211, 22212]);
        assert_eq!((clients.route, clients.health), (8083, [8081, 8082]));
        // --any-ports moves every port not set by its flag, the route's included.
        let any = UpPorts::from_args(&up_args(&["--any-ports", "--route-port", "22083"])).unwrap();
        assert_eq!(
            any,
            UpPorts {
                route: 22083,
                admin: 0,
                client: [0, 0],
                link: [0, 0],
                health: [0, 0],
                ws: [0, 0],
            }
        );
        assert_eq!(
            UpPorts::from_args(&up_args(&["--any-ports"]))
                .unwrap()
                .route,
            0
        );
        let error = UpPorts::from_args(&up_args(&["--ws-port", "65535"])).unwrap_err();
        assert!(error.to_string().contains("--ws-port 65535"), "{error}");
        let error = UpPorts::from_args(&up_args(&["--health-port", "65535"])).unwrap_err();
        assert!(error.to_string().contains("--health-port 65535"), "{error}");
    }

    #[test]
    fn up_lets_the_routes_own_origin_open_websockets() {
        use server::ws::OriginPolicy;
        let policy = up_ws_origins(&up_args(&[]), 8083, false).unwrap();
        assert!(policy.allows(Some("http://127.0.0.1:8083")));
        assert!(policy.allows(Some("http://localhost:8083")));
        assert!(!policy.allows(Some("http://evil.example")));
        let tls = up_ws_origins(&up_args(&[]), 8083, true).unwrap();
        assert!(tls.allows(Some("https://127.0.0.1:8083")));
        assert!(!tls.allows(Some("http://127.0.0.1:8083")));
        assert_eq!(
            up_ws_origins(&up_args(&["--any-ports"]), 0, false).unwrap(),
            OriginPolicy::NoBrowsers
        );
        let named = up_args(&["--ws-allowed-origin", "https://a.example,https://b.example"]);
        let named = up_ws_origins(&named, 8083, false).unwrap();
        assert!(named.allows(Some("https://b.example")));
        assert!(!named.allows(Some("http://127.0.0.1:8083")));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smoke_posts_nothing_to_all_and_leaves_its_group() {
        let store: Arc<dyn Store> = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
        let registry: AnyRegistry = MemoryRegistry::new().into();
        let (ticket, link) = (
            b"smoke-test-ticket-secret".to_vec(),
            b"smoke-test-link-secret".to_vec(),
        );
        let mut servers = Vec::new();
        for id in ["s1", "s2"] {
            let node = ServerConfig::new(ServerId::new(id), TicketKeys::new(1, ticket.clone()));
            let mut options = ServerOptions::new(node, link.clone());
            options.listen_ip = IpAddr::from([127, 0, 0, 1]);
            (options.client_port, options.link_port, options.http_port) = (0, 0, 0);
            // The smoke's third user connects over WebSocket, as in `cim up`.
            options.ws_port = Some(0);
            let server = server::start(TokioNet, Clock::System, options, store.clone(), &registry)
                .await
                .unwrap();
            servers.push(server);
        }
        let mut options = RouteOptions::new(
            "r1",
            TicketKeys::new(1, ticket),
            b"smoke-test-bearer-secret".to_vec(),
            link,
        );
        options.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
        let route = route::start(TokioNet, Clock::System, options, store.clone(), &registry)
            .await
            .unwrap();
        let addr = route.http_addr().to_string();

        // Someone who was there before.
        let api = cim_io::sdk::RouteApi::new(
            TokioNet,
            "127.0.0.1",
            route.http_addr().port(),
            Duration::from_secs(5),
        );
        let observer = api.register("observer", "observer-password").await.unwrap();

        tokio::time::timeout(Duration::from_secs(60), smoke::run(&addr, None))
            .await
            .expect("smoke within 60 s")
            .expect("smoke passes");

        let login = api
            .login(&cim_io::api::LoginRequest {
                resume_secret: None,
                user_id: observer.user_id,
                user_name: "observer".into(),
                password: "observer-password".into(),
                resume_token: None,
            })
            .await
            .unwrap();
        let all = api
            .history(&login.token, &cim_core::ids::ConvId::All, None, 10)
            .await
            .unwrap();
        assert_eq!(all.head_seq, 0, "smoke posted to all: {all:?}");
        route.abort();
        for server in servers {
            server.abort();
        }
    }

    #[tokio::test]
    async fn the_up_terminal_restarts_kills_and_starts_servers() {
        let store: Arc<dyn Store> = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
        let registry: AnyRegistry = MemoryRegistry::new().into();
        let node = ServerConfig::new(
            ServerId::new("s1"),
            TicketKeys::new(1, b"up-test-ticket-secret".to_vec()),
        );
        let mut options = ServerOptions::new(node, b"up-test-link-secret".to_vec());
        options.listen_ip = IpAddr::from([127, 0, 0, 1]);
        (options.client_port, options.link_port, options.http_port) = (0, 0, 0);
        let server = server::start(
            TokioNet,
            Clock::System,
            options.clone(),
            store.clone(),
            &registry,
        )
        .await
        .unwrap();
        options.client_port = server.client_addr().port();
        options.link_port = server.link_addr().port();
        options.http_port = server.http_addr().port();
        let options = [options];
        let mut servers = [Some(server)];
        let view = registry.watch().await.unwrap();

        let out = control("restart s1", &mut servers, &options, &store, &registry).await;
        assert!(out.contains("s1 started again"), "{out}");
        let port = servers[0].as_ref().map(|s| s.client_addr().port());
        assert_eq!(
            port,
            Some(options[0].client_port),
            "same port after a restart"
        );
        view.wait_until(Duration::from_secs(5), |m| m.len() == 1)
            .await
            .expect("listed again");

        let out = control("kill s1", &mut servers, &options, &store, &registry).await;
        assert!(out.contains("killed") && servers[0].is_none(), "{out}");
        view.wait_until(Duration::from_secs(5), |m| m.is_empty())
            .await
            .expect("a killed server leaves the registry");
        let out = control("stop s1", &mut servers, &options, &store, &registry).await;
        assert!(out.contains("not running"), "{out}");
        let out = control("start s1", &mut servers, &options, &store, &registry).await;
        assert!(
            out.contains("started again") && servers[0].is_some(),
            "{out}"
        );
        let out = control("status", &mut servers, &options, &store, &registry).await;
        assert!(out.contains("s1 running"), "{out}");

        for bad in ["restart s9", "frobnicate s1"] {
            let out = control(bad, &mut servers, &options, &store, &registry).await;
            assert!(out.contains("restart <s1|s2>"), "{bad}: {out}");
        }
    }
}
