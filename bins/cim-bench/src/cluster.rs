//! The system under test: a running cluster given by `--route`, or one the bench starts.
//!
//! A started cluster runs in **child processes** of the bench (it re-executes itself with the
//! hidden `cluster` / `server` subcommands), so its CPU time and memory can be read from
//! /proc apart from the load generator's, as a broker's would be. Backends: embedded (the
//! route and servers share one process and its in-memory store), `--redis`: a private
//! `redis-server` with AOF `everysec` (and ZooKeeper when servers run in their own processes),
//! or `--redis-cluster`: a private Redis Cluster of six such nodes (three masters, one replica
//! each), optionally acknowledging appends after a replica confirmed them (`WAIT`).
//! With `--tls` the bench makes a throwaway CA and certificates (a private temporary
//! directory, deleted at the end), the cluster serves everything over TLS exactly as
//! `cim-route` / `cim-server` do given `--tls-cert`, `--tls-key` and `--tls-ca`, and the
//! bench's clients trust that CA.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use cim_core::accounts::PasswordParams;
use cim_core::ids::ServerId;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_io::clock::Clock;
use cim_io::launch;
use cim_io::net::TokioNet;
use cim_io::route::{self, RouteOptions};
use cim_io::server::{self, ServerOptions};
use cim_io::store::{RedisOptions, RedisStore, Store};
use cim_io::tls::dev::DevPki;
use cim_io::tls::setup::{RouteSide, ServerSide, TlsFlags};
use cim_testkit::RedisServer;
use cim_testkit::redis_cluster::{ClusterSetup, RedisCluster};

use crate::util::Route;

/// Argon2 cost of a started cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Argon2Cost {
    /// OWASP's argon2id parameters (19 MiB, 2 passes): what production runs.
    Owasp,
    /// 64 KiB, 1 pass: microseconds per hash; never for production.
    Test,
}

impl Argon2Cost {
    pub fn params(self) -> PasswordParams {
        match self {
            Self::Owasp => PasswordParams::default(),
            Self::Test => PasswordParams::for_tests(),
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Self::Owasp => "argon2 OWASP (19 MiB, t=2)",
            Self::Test => "argon2 test (64 KiB, t=1)",
        }
    }
}

/// `cim-bench cluster`: a route and N servers in this process (what `cim up` runs), for the
/// bench to drive from its parent process. Prints `SERVER id client-addr http-addr` per
/// server, then `ROUTE host:port` when ready; stops when its standard input closes (the
/// parent died or is done) or on a signal.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    /// Redis URL; the embedded store without it.
    #[arg(long, conflicts_with = "redis_cluster")]
    pub redis_url: Option<String>,
    /// Redis Cluster node URLs (comma-separated), instead of --redis-url.
    #[arg(long, value_delimiter = ',')]
    pub redis_cluster: Vec<String>,
    /// Acknowledge an append once this many replicas confirmed it (`cim-route
    /// --store-wait-replicas`).
    #[arg(long, default_value_t = 0)]
    pub store_wait_replicas: u32,
    /// ZooKeeper connect string; the embedded registry without it.
    #[arg(long)]
    pub zk: Option<String>,
    #[arg(long, default_value = "/cim-bench/servers")]
    pub zk_root: String,
    /// Servers in this process (0: a route only, for servers in their own processes).
    #[arg(long, default_value_t = 2)]
    pub servers: u16,
    #[arg(long, value_enum, default_value = "test")]
    pub argon2: Argon2Cost,
    /// Route threads that run argon2 (0: inline on the route's driver task, as before).
    #[arg(long)]
    pub password_workers: Option<usize>,
    /// Issue no resumption secrets: every login (re-homes included) checks the password,
    /// as before resumption (`cim-route --resume-secret-ttl 0`).
    #[arg(long)]
    pub no_resumption: bool,
    /// Per-user send rate limit (messages/s) of the servers: raised so one bench sender is
    /// not throttled (production default 20).
    #[arg(long, default_value_t = 1_000_000)]
    pub send_rate: u32,
    /// TLS everywhere: the CA signing the internal links' certificates (with the four
    /// files below, what `cim-route` and `cim-server` take as --tls-ca/--tls-cert/--tls-key).
    #[arg(long, requires_all = ["tls_server_cert", "tls_server_key", "tls_route_cert", "tls_route_key"])]
    pub tls_ca: Option<PathBuf>,
    #[arg(long, requires = "tls_ca")]
    pub tls_server_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_ca")]
    pub tls_server_key: Option<PathBuf>,
    #[arg(long, requires = "tls_ca")]
    pub tls_route_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_ca")]
    pub tls_route_key: Option<PathBuf>,
}

fn secret(var: &str) -> anyhow::Result<Vec<u8>> {
    std::env::var(var)
        .map(String::into_bytes)
        .with_context(|| format!("{var} is set by the bench parent"))
}

/// Runs in the child: start, print the route's address, wait for stdin to close.
pub async fn run_cluster(args: ClusterArgs) -> anyhow::Result<()> {
    let options = RedisOptions {
        allow_eviction: args.redis_url.is_none() && args.redis_cluster.is_empty(),
        wait_replicas: args.store_wait_replicas,
        ..RedisOptions::default()
    };
    let store: Arc<dyn Store> = if args.redis_cluster.is_empty() {
        launch::open_store(args.redis_url.as_deref(), options).await?
    } else {
        Arc::new(RedisStore::connect_cluster(&args.redis_cluster, options).await?)
    };
    let registry =
        launch::open_registry(args.zk.as_deref(), &args.zk_root, Duration::from_secs(6))?;
    let ticket_secret = secret("CIM_TICKET_SECRET")?;
    let link_secret = secret("CIM_LINK_SECRET")?;
    let server_tls = ServerSide::load(
        &TlsFlags {
            cert: args.tls_server_cert.clone(),
            key: args.tls_server_key.clone(),
            ca: args.tls_ca.clone(),
            accept_plaintext: false,
        },
        "127.0.0.1",
    )?;
    let route_tls = RouteSide::load(&TlsFlags {
        cert: args.tls_route_cert.clone(),
        key: args.tls_route_key.clone(),
        ca: args.tls_ca.clone(),
        accept_plaintext: false,
    })?;
    let mut servers = Vec::new();
    for i in 1..=args.servers {
        let mut node = ServerConfig::new(
            ServerId::new(format!("s{i}")),
            TicketKeys::new(1, ticket_secret.clone()),
        );
        node.send_rate_per_sec = args.send_rate;
        node.send_burst = args.send_rate;
        let mut options = ServerOptions::new(node, link_secret.clone());
        options.listen_ip = [127, 0, 0, 1].into();
        options.advertise_host = "127.0.0.1".into();
        (options.client_port, options.link_port, options.http_port) = (0, 0, 0);
        // The WebSocket gateway too, for `--transport websocket` (idle otherwise).
        options.ws_port = Some(0);
        if let Some(tls) = &server_tls {
            options.gateway_tls = Some(tls.gateway.clone());
            options.link_tls = Some(tls.link.clone());
        }
        let server =
            server::start(TokioNet, Clock::System, options, store.clone(), &registry).await?;
        println!(
            "SERVER {} {} {}",
            server.server_id(),
            server.client_addr(),
            server.http_addr()
        );
        servers.push(server);
    }
    let mut options = RouteOptions::new(
        "bench-route",
        TicketKeys::new(1, ticket_secret),
        secret("CIM_BEARER_SECRET")?,
        link_secret,
    );
    options.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
    options.seed = launch::os_seed();
    options.login.password = args.argon2.params();
    if args.no_resumption {
        options.login.resume_secret_ttl = Duration::ZERO;
    }
    if let Some(n) = args.password_workers {
        options.password_workers = n;
    }
    // Every benchmark client comes from this one address and logs in as fast as it can
    // (`login --concurrency`, 64 by default, without retries): the per-address limits and
    // the password queue's "busy" answers would measure themselves, not the system.
    options.login_per_address = route::RateLimit::OFF;
    options.register_per_address = route::RateLimit::OFF;
    options.login.max_password_jobs = 4096;
    if let Some(tls) = &route_tls {
        options.https = Some(tls.https.clone());
        options.link_tls = Some(tls.links.clone());
    }
    let route = route::start(TokioNet, Clock::System, options, store, &registry).await?;
    println!("ROUTE {}", route.http_addr());
    // Stop when the parent closes our stdin (or dies).
    tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    })
    .await?;
    for s in servers {
        s.abort();
    }
    route.abort();
    Ok(())
}

/// A child process of the bench, killed on drop.
#[derive(Debug)]
pub struct ChildProc {
    pub child: Child,
}

impl ChildProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The bench itself as a child, with the secrets every child shares.
fn child_command() -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("the bench's own path")?;
    let mut cmd = Command::new(exe);
    child_env(&mut cmd);
    Ok(cmd)
}

/// Secrets the parent hands to every child it starts, and a quiet log.
pub fn child_env(cmd: &mut Command) {
    for var in ["CIM_TICKET_SECRET", "CIM_LINK_SECRET", "CIM_BEARER_SECRET"] {
        cmd.env(var, shared_secret(var));
    }
    cmd.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()),
    );
}

/// One secret per variable per bench run, the same in every child.
fn shared_secret(var: &str) -> String {
    use std::sync::OnceLock;
    static SEED: OnceLock<u64> = OnceLock::new();
    let seed = *SEED.get_or_init(launch::os_seed);
    format!("bench-{var}-{seed:016x}")
}

/// A server of a started cluster, as its process printed it.
#[derive(Debug, Clone)]
pub struct ServerAddrs {
    pub id: String,
    /// The client gateway.
    pub client: SocketAddr,
    /// Health and metrics (plain HTTP).
    pub http: SocketAddr,
}

/// What the bench runs against.
#[derive(Debug)]
pub struct Target {
    pub route: Route,
    /// The servers of a started cluster (empty for `--route`).
    pub servers: Vec<ServerAddrs>,
    /// The process holding route and servers (None for `--route`).
    pub cluster: Option<ChildProc>,
    /// Kept running for the target's lifetime (with `--redis`).
    pub _redis: Option<RedisServer>,
    /// Kept running for the target's lifetime (with `--redis-cluster`).
    pub redis_cluster: Option<RedisCluster>,
    /// With `--tls`: the throwaway CA and certificates, deleted with the target.
    pub tls: Option<BenchPki>,
    pub label: String,
}

impl Target {
    /// The ports of the Redis servers this target started (every node of a cluster).
    pub fn redis_ports(&self) -> Vec<u16> {
        match (&self._redis, &self.redis_cluster) {
            (Some(redis), _) => vec![redis.port],
            (None, Some(cluster)) => cluster.ports(),
            (None, None) => Vec::new(),
        }
    }
}

/// `--tls`'s certificates in a private temporary directory (deleted on drop).
#[derive(Debug)]
pub struct BenchPki {
    pub pki: DevPki,
    _dir: tempfile::TempDir,
}

impl BenchPki {
    /// A fresh CA, and route and server certificates for 127.0.0.1, in a new directory
    /// readable by this user only.
    pub fn generate() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("cim-bench-tls-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir()
            .context("creating a temporary directory")?;
        let pki = DevPki::generate(dir.path(), &["127.0.0.1", "localhost"])
            .context("making the bench's certificates")?;
        Ok(Self { pki, _dir: dir })
    }

    /// The `cluster` child's flags for these files.
    pub fn cluster_args(&self) -> Vec<std::ffi::OsString> {
        let pki = &self.pki;
        [
            ("--tls-ca", &pki.ca),
            ("--tls-server-cert", &pki.server_cert),
            ("--tls-server-key", &pki.server_key),
            ("--tls-route-cert", &pki.route_cert),
            ("--tls-route-key", &pki.route_key),
        ]
        .into_iter()
        .flat_map(|(flag, path)| [flag.into(), path.into()])
        .collect()
    }
}

/// How to start (or reach) the system under test.
#[derive(Debug, Clone)]
pub struct Setup {
    pub route: Option<String>,
    /// `--route https://…`: the CA to trust (default the system's roots).
    pub ca: Option<PathBuf>,
    pub redis: bool,
    /// A private Redis Cluster instead (`redis` is then false).
    pub redis_cluster: bool,
    /// Replicas an append waits for (`--store-wait-replicas`; cluster or single node).
    pub wait_replicas: u32,
    pub argon2: Argon2Cost,
    pub password_workers: Option<usize>,
    /// Servers in the cluster process.
    pub servers: u16,
    /// Started clusters: everything over TLS, with a throwaway CA.
    pub tls: bool,
}

/// A private redis-server with AOF `everysec` (what deploy/ recommends), or an error.
pub fn start_redis() -> anyhow::Result<RedisServer> {
    let redis = RedisServer::start_with_aof().context("redis-server is not installed")?;
    let answer = redis.raw("CONFIG SET appendfsync everysec");
    if answer != "+OK" {
        bail!("CONFIG SET appendfsync everysec: {answer}");
    }
    Ok(redis)
}

pub fn start(setup: &Setup) -> anyhow::Result<Target> {
    if let Some(route) = &setup.route {
        return Ok(Target {
            route: crate::util::parse_route_url(route, setup.ca.as_deref())?,
            servers: Vec::new(),
            cluster: None,
            _redis: None,
            redis_cluster: None,
            tls: None,
            label: format!("running cluster at {route}"),
        });
    }
    let redis = if setup.redis {
        Some(start_redis()?)
    } else {
        None
    };
    let redis_cluster = if setup.redis_cluster {
        let cluster = RedisCluster::start_with(ClusterSetup {
            aof_everysec: true,
            ..ClusterSetup::default()
        })
        .context("redis-server and redis-cli are needed for --redis-cluster")?;
        cluster
            .wait_for_replicas(Duration::from_secs(30))
            .map_err(anyhow::Error::msg)?;
        Some(cluster)
    } else {
        None
    };
    let mut cmd = child_command()?;
    cmd.arg("cluster")
        .args(["--servers", &setup.servers.to_string()])
        .args(["--argon2", argon2_arg(setup.argon2)])
        .args(["--store-wait-replicas", &setup.wait_replicas.to_string()]);
    if let Some(r) = &redis {
        cmd.args(["--redis-url", &r.url()]);
    }
    if let Some(c) = &redis_cluster {
        cmd.args(["--redis-cluster", &c.urls().join(",")]);
    }
    if let Some(n) = setup.password_workers {
        cmd.args(["--password-workers", &n.to_string()]);
    }
    let tls = if setup.tls {
        Some(BenchPki::generate()?)
    } else {
        None
    };
    if let Some(tls) = &tls {
        cmd.args(tls.cluster_args());
    }
    let (mut route, servers, proc_) = spawn_cluster(cmd, "cluster")?;
    if let Some(tls) = &tls {
        route = route.with_ca(&tls.pki.ca)?;
    }
    let label = format!(
        "{} store{}, {} server(s) in one process, {}{}",
        if setup.redis {
            "Redis (AOF everysec)"
        } else if setup.redis_cluster {
            "Redis Cluster (3 masters + 3 replicas, AOF everysec)"
        } else {
            "embedded"
        },
        match setup.wait_replicas {
            0 => String::new(),
            n => format!(" with WAIT {n}"),
        },
        setup.servers,
        setup.argon2.label(),
        if setup.tls {
            ", TLS (route HTTPS, client gateways, mutual-TLS links)"
        } else {
            ""
        }
    );
    Ok(Target {
        route,
        servers,
        cluster: Some(proc_),
        _redis: redis,
        redis_cluster,
        tls,
        label,
    })
}

pub fn argon2_arg(cost: Argon2Cost) -> &'static str {
    match cost {
        Argon2Cost::Owasp => "owasp",
        Argon2Cost::Test => "test",
    }
}

/// Spawns a `cluster` child and waits for its `ROUTE host:port` line (after its servers'
/// `SERVER` lines).
pub fn spawn_cluster(
    mut cmd: Command,
    what: &str,
) -> anyhow::Result<(Route, Vec<ServerAddrs>, ChildProc)> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("spawning the cluster process")?;
    let stdout = child.stdout.take().context("cluster stdout")?;
    let mut proc_ = ChildProc { child };
    let mut lines = BufReader::new(stdout).lines();
    let mut servers = Vec::new();
    let route = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(addr) = line.strip_prefix("ROUTE ") {
                    break crate::util::parse_route_url(addr, None)?;
                }
                if let Some(server) = line.strip_prefix("SERVER ") {
                    let words: Vec<&str> = server.split_whitespace().collect();
                    let [id, client, http] = words[..] else {
                        bail!("the {what} process printed {line:?}");
                    };
                    servers.push(ServerAddrs {
                        id: id.to_owned(),
                        client: client.parse().context("a server's client address")?,
                        http: http.parse().context("a server's http address")?,
                    });
                }
            }
            _ => {
                proc_.kill();
                bail!("the {what} process ended before its route was up");
            }
        }
    };
    // Keep draining its stdout so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((route, servers, proc_))
}

/// Spawns `cim-bench server ...` (the real `cim-server` program) as its own process.
pub fn spawn_server(
    id: &str,
    redis: &str,
    zk: &str,
    zk_root: &str,
    zk_session_timeout: &str,
) -> anyhow::Result<ChildProc> {
    let mut cmd = child_command()?;
    cmd.arg("server")
        .args(["--server-id", id, "--redis", redis, "--zk", zk])
        .args([
            "--zk-root",
            zk_root,
            "--zk-session-timeout",
            zk_session_timeout,
        ])
        .args(["--listen-ip", "127.0.0.1", "--advertise-host", "127.0.0.1"])
        .args(["--client-port", "0", "--link-port", "0", "--http-port", "0"])
        .args(["--send-rate", "1000000", "--send-burst", "1000000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd.spawn().context("spawning a server process")?;
    Ok(ChildProc { child })
}
