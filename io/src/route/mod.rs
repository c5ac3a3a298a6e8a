//! The route process shell: drives `cim_core::route::login::RouteLogin` and
//! `cim_core::route::delivery::RouteDelivery` over real (or simulated) sockets.
//!
//! ```text
//!  axum handlers ──Input::Api──▶ ┌──────────────┐ ──spawned store calls──▶ Store
//!  link tasks ───Input::Link*──▶ │ driver task  │ ◀──Input::Store────────┘
//!  registry view ──changed()───▶ │ RouteLogin + │ ──frames (bounded mpsc)──▶ link tasks ──▶ servers
//!  machine deadlines ──timer───▶ │ RouteDelivery│ ──oneshot answers──▶ axum handlers
//!                                └──────────────┘
//! ```
//!
//! - [`driver`]: the one task that owns both machines; after every input it drains every
//!   `poll_*` and acts on each output.
//! - [`links`]: one task per live server: dial, authenticate (challenge-response), then
//!   carry frames both ways with a Ping keepalive; redial while the server is live.
//! - [`api`]: the HTTP API (axum), exactly DESIGN.md's list with `crate::api` bodies.
//! - [`openapi`]: the hand-written OpenAPI document served at `/openapi.json`.
//!
//! Calls that need neither machine (groups, history, online users) go from the handler
//! to the store directly; everything that changes claims or appends goes through the driver.

mod admin;
mod api;
mod body_errors;
mod counters;
mod driver;
mod input;
mod latency;
mod limits;
mod link_states;
mod links;
mod openapi;
mod password_queue;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cim_core::route::balance::Strategy;
use cim_core::route::delivery::DeliveryConfig;
use cim_core::route::login::RouteLoginConfig;
use cim_core::route::tickets::TicketKeys;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::http_server::HttpLimits;
use crate::net::{Listener, Network};
use crate::nonces::NonceSource;
use crate::registry::{Registry, RegistryError};
use crate::store::Store;
use crate::tls::{ClientTls, ServerTls};

pub use self::admin::{
    AUDIT_TARGET, AdminOptions, MIN_ADMIN_TOKEN_LEN, admin_options,
    openapi_document as admin_openapi_document,
};
pub use self::limits::{IpNet, RateLimit, SESSION_CACHE_TTL, parse_trusted_proxies};
pub use self::openapi::{openapi_document, openapi_document_for};

/// Everything the route needs to run.
#[derive(Clone)]
pub struct RouteOptions {
    pub route_id: String,
    /// Default 0.0.0.0:8083; port 0 takes any free port.
    pub http_listen: SocketAddr,
    pub login: RouteLoginConfig,
    pub delivery: DeliveryConfig,
    pub ticket_keys: TicketKeys,
    pub bearer_secret: Vec<u8>,
    /// During a rotation, the previous bearer secret: tokens signed with it are still
    /// accepted; new ones are signed with `bearer_secret` (default none).
    pub bearer_secret_previous: Option<Vec<u8>>,
    pub link_secret: Vec<u8>,
    /// During a rotation, the previous link secret: a server that refuses the current one
    /// is dialled again with this one (default none).
    pub link_secret_previous: Option<Vec<u8>>,
    /// Default consistent hash.
    pub strategy: Strategy,
    /// Seeds `RouteLogin` and the balancer; the binaries pass OS entropy.
    pub seed: u64,
    /// 256 bits from the OS for `RouteLogin`'s generator (resume tokens, resumption secrets,
    /// salts) instead of `seed`: the binaries set it, so those credentials carry their full
    /// length of entropy. `None` (tests, the simulation) uses `seed`, which replays.
    pub login_entropy: Option<[u8; 32]>,
    pub max_frame: usize,
    /// Connect, each write, each handshake step.
    pub io_timeout: Duration,
    /// Keepalive Ping on each link; no frame for 3× this and the link is dead.
    pub link_ping_interval: Duration,
    /// Wait before redialling a live server whose link failed.
    pub link_retry_delay: Duration,
    /// Threads that hash and verify passwords at once (argon2, off the driver task);
    /// default one per core. 0 runs them inline on the driver task, which stalls routing
    /// during a burst of logins (kept to measure that). Only read by
    /// [`PasswordRunner::BlockingPool`].
    pub password_workers: usize,
    /// How password jobs run: on a pool of blocking threads (the default), or inline on the
    /// driver task (the simulation, for determinism).
    pub password_runner: PasswordRunner,
    /// The HTTP listener's connection cap and header/idle timeouts. The cap is lowered at
    /// start to what the process's open-file limit allows (and a warning says so).
    pub http: HttpLimits,
    /// Peers whose `X-Forwarded-For` names the client (load balancers); from any other peer
    /// the header is ignored and the peer is the client. Default none.
    pub trusted_proxies: Vec<IpNet>,
    /// `/login` requests per client address (IPv6: per /64); default 5/s, burst 20.
    pub login_per_address: RateLimit,
    /// `/registerAccount` requests per client address; default 1/s, burst 5.
    pub register_per_address: RateLimit,
    /// `/groupRoute` and `/p2pRoute` sends per user, on this route; default 20/s, burst
    /// 50 (the servers' default for TCP sends).
    pub send_per_user: RateLimit,
    /// HTTPS on the API listener (default none: plain HTTP).
    pub https: Option<ServerTls>,
    /// Mutual TLS on the links this route dials: the CA that signs the servers, this
    /// route's certificate of the route role (default none: plaintext links).
    pub link_tls: Option<ClientTls>,
    /// The admin listener (default none: off). Served over HTTPS when `https` is set.
    pub admin: Option<AdminOptions>,
    /// Where the links' handshake nonces come from (default: the OS). The simulation gives
    /// each route a seeded source; a production route leaves the default.
    pub link_nonces: NonceSource,
}

impl std::fmt::Debug for RouteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("RouteOptions")
            .field("route_id", &self.route_id)
            .field("http_listen", &self.http_listen)
            .field("login", &self.login)
            .field("delivery", &self.delivery)
            .field("ticket_keys", &self.ticket_keys)
            .field("strategy", &self.strategy)
            .field("seed", &self.seed)
            .field("max_frame", &self.max_frame)
            .field("io_timeout", &self.io_timeout)
            .field("link_ping_interval", &self.link_ping_interval)
            .field("link_retry_delay", &self.link_retry_delay)
            .field("password_workers", &self.password_workers)
            .field("password_runner", &self.password_runner)
            .field("http", &self.http)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("login_per_address", &self.login_per_address)
            .field("register_per_address", &self.register_per_address)
            .field("send_per_user", &self.send_per_user)
            .field("https", &self.https.is_some())
            .field("link_tls", &self.link_tls.is_some())
            .field("admin", &self.admin)
            .field("link_nonces", &self.link_nonces)
            .finish_non_exhaustive()
    }
}

impl RouteOptions {
    pub fn new(
        route_id: impl Into<String>,
        ticket_keys: TicketKeys,
        bearer_secret: Vec<u8>,
        link_secret: Vec<u8>,
    ) -> Self {
        let password_workers = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            route_id: route_id.into(),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 8083)),
            login: RouteLoginConfig {
                max_password_jobs: PASSWORD_JOBS_PER_WORKER * password_workers,
                ..RouteLoginConfig::default()
            },
            delivery: DeliveryConfig::default(),
            ticket_keys,
            bearer_secret,
            bearer_secret_previous: None,
            link_secret,
            link_secret_previous: None,
            strategy: Strategy::ConsistentHash,
            seed: 0,
            login_entropy: None,
            max_frame: cim_proto::codec::DEFAULT_MAX_FRAME,
            io_timeout: Duration::from_secs(5),
            link_ping_interval: Duration::from_secs(5),
            link_retry_delay: Duration::from_millis(500),
            password_workers,
            password_runner: PasswordRunner::BlockingPool,
            http: HttpLimits::default(),
            trusted_proxies: Vec::new(),
            login_per_address: RateLimit::new(5, 20),
            register_per_address: RateLimit::new(1, 5),
            send_per_user: RateLimit::new(20, 50),
            https: None,
            link_tls: None,
            admin: None,
            link_nonces: NonceSource::os(),
        }
    }
}

/// Where the route runs its password jobs (argon2 hashes and checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PasswordRunner {
    /// On up to [`RouteOptions::password_workers`] blocking threads at once, fair by client
    /// address (0 workers: inline).
    #[default]
    BlockingPool,
    /// On the driver task as each job is asked for: a simulation's runs stay deterministic
    /// (no thread outside turmoil's control finishes a job at a time of its own).
    Inline,
}

/// The default bound of the password phase (`RouteLoginConfig::max_password_jobs`) per
/// password worker: with argon2 at 20-40 ms a check, a full queue waits well under a second.
pub const PASSWORD_JOBS_PER_WORKER: usize = 8;

/// Why the route did not start. Nothing is left running after an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("route options: {0}")]
    Config(String),
    #[error("bind HTTP listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("watch the registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("store layout: {0}")]
    Store(String),
}

/// Why a running route stopped by itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("the HTTP server stopped: {0}")]
    Http(String),
    #[error("the driver task stopped: {0}")]
    Driver(String),
}

/// A running route.
#[derive(Debug)]
pub struct RouteHandle {
    http_addr: SocketAddr,
    counters: Arc<counters::Counters>,
    /// The admin listener's address and task, when configured.
    admin: Option<(SocketAddr, JoinHandle<()>)>,
    cancel: CancellationToken,
    http: JoinHandle<()>,
    driver: JoinHandle<()>,
    exit: watch::Receiver<Option<Result<(), RouteError>>>,
    grace: Duration,
}

impl RouteHandle {
    /// Where the HTTP API listens (the real port when configured with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Turns `/health/ready` unready (503, "draining") while the route keeps serving, so a
    /// load balancer stops sending it new requests before [`shutdown`](Self::shutdown).
    pub fn begin_drain(&self) {
        self.counters
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Where the admin listener listens, if it is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(addr, _)| *addr)
    }

    /// Stops accepting HTTP connections, lets in-flight requests finish (bounded by the
    /// I/O timeout), then stops the driver, which closes every link.
    pub async fn shutdown(self) {
        tracing::info!("route shutting down");
        self.cancel.cancel();
        let mut http = self.http;
        if tokio::time::timeout(self.grace, &mut http).await.is_err() {
            http.abort();
        }
        let mut driver = self.driver;
        if tokio::time::timeout(self.grace, &mut driver).await.is_err() {
            driver.abort();
        }
    }

    /// Stops every task at once (links close as their tasks are dropped).
    pub fn abort(self) {
        if let Some((_, admin)) = &self.admin {
            admin.abort();
        }
        self.http.abort();
        self.driver.abort();
    }

    /// Resolves when the route stops by itself (a task ended without being asked to).
    pub async fn stopped(&mut self) -> Result<(), RouteError> {
        match self.exit.wait_for(Option::is_some).await {
            Ok(exit) => exit.clone().unwrap_or(Ok(())),
            // The senders live in the tasks; both gone without a word means they were torn
            // down from outside (a runtime shutting down).
            Err(_) => Err(RouteError::Driver("route tasks dropped".into())),
        }
    }
}

/// Starts the route: watches the registry, binds the HTTP listener, spawns the driver (which
/// dials a link to every live server) and the HTTP server.
pub async fn start<N: Network, R: Registry>(
    net: N,
    clock: Clock,
    options: RouteOptions,
    store: Arc<dyn Store>,
    registry: &R,
) -> Result<RouteHandle, StartError> {
    if options.route_id.is_empty() {
        return Err(StartError::Config("route_id is empty".into()));
    }
    if options.bearer_secret.is_empty() || options.link_secret.is_empty() {
        return Err(StartError::Config(
            "the bearer and link secrets must be set".into(),
        ));
    }
    if options.link_ping_interval.is_zero() || options.io_timeout.is_zero() {
        return Err(StartError::Config(
            "io_timeout and link_ping_interval must be above zero".into(),
        ));
    }
    options
        .http
        .validate()
        .map_err(|e| StartError::Config(e.into()))?;
    let mut http_limits = options.http;
    http_limits.max_connections =
        crate::fd_limit::clamp_to_process_limit("route HTTP", http_limits.max_connections);
    // A store written by an older CIM is migrated (once, under a lock) before serving.
    store.ensure_schema().await.map_err(StartError::Store)?;
    if let Some(admin) = &options.admin
        && admin.token.len() < MIN_ADMIN_TOKEN_LEN
    {
        return Err(StartError::Config(format!(
            "the admin token must be at least {MIN_ADMIN_TOKEN_LEN} bytes"
        )));
    }
    let view = registry.watch().await?;
    let listener = net
        .bind(options.http_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: options.http_listen,
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: options.http_listen,
        source,
    })?;

    let counters = Arc::new(counters::Counters {
        tls: [
            ("https", options.https.as_ref().map(|tls| tls.stats())),
            ("link", options.link_tls.as_ref().map(|tls| tls.stats())),
        ]
        .into_iter()
        .filter_map(|(name, stats)| Some((name, stats?.clone())))
        .collect(),
        ..counters::Counters::default()
    });
    let http_stats = counters.http.clone();
    let https = options.https.clone();
    let (to_driver, inputs) = mpsc::channel(driver::INPUT_QUEUE);
    let cancel = CancellationToken::new();
    let (exit_tx, exit) = watch::channel(None);
    let exit_tx = Arc::new(exit_tx);

    let shared = Arc::new(api::ApiShared::new(
        &options,
        to_driver.clone(),
        store.clone(),
        clock,
        view.clone(),
        counters.clone(),
    ));
    let router = api::router(shared);
    let handle_counters = counters.clone();
    let admin = match &options.admin {
        Some(admin) => {
            let listener = net
                .bind(admin.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: admin.listen,
                    source,
                })?;
            let addr = listener.local_addr().map_err(|source| StartError::Bind {
                addr: admin.listen,
                source,
            })?;
            let shared = Arc::new(admin::AdminShared {
                store: store.clone(),
                driver: to_driver.clone(),
                clock,
                live: view.servers(),
                token_digest: {
                    use sha2::Digest as _;
                    sha2::Sha256::digest(&admin.token).into()
                },
                password: options.login.password.clone(),
                min_password_len: options.login.min_password_len,
                store_timeout: options.login.store_timeout,
            });
            let router = admin::router(shared);
            let (https, cancel) = (options.https.clone(), cancel.clone());
            let limits = HttpLimits {
                max_connections: 64,
                ..http_limits
            };
            let task = tokio::spawn(async move {
                let stats = Arc::new(crate::http_server::HttpStats::default());
                crate::http_server::serve(listener, https, router, limits, stats, cancel).await;
            });
            tracing::info!(%addr, "admin listener started (audit log: target cim::audit)");
            Some((addr, task))
        }
        None => None,
    };

    let driver = driver::Driver::new(
        net,
        clock,
        &options,
        store,
        view,
        counters,
        to_driver,
        cancel.clone(),
    );
    let driver = {
        let exit_tx = exit_tx.clone();
        tokio::spawn(async move {
            driver.run(inputs).await;
            exit_tx.send_if_modified(|exit| {
                exit.get_or_insert(Err(RouteError::Driver("the driver loop ended".into())));
                true
            });
        })
    };
    let http = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            crate::http_server::serve(
                listener,
                https,
                router,
                http_limits,
                http_stats,
                cancel.clone(),
            )
            .await;
            let result = if cancel.is_cancelled() {
                Ok(())
            } else {
                Err(RouteError::Http("the HTTP server ended".into()))
            };
            exit_tx.send_if_modified(|exit| {
                exit.get_or_insert(result);
                true
            });
        })
    };
    tracing::info!(
        route_id = %options.route_id,
        %http_addr,
        https = options.https.is_some(),
        link_tls = options.link_tls.is_some(),
        max_connections = http_limits.max_connections,
        header_timeout = ?http_limits.header_timeout,
        idle_timeout = ?http_limits.idle_timeout,
        "route started"
    );
    Ok(RouteHandle {
        http_addr,
        counters: handle_counters,
        admin,
        cancel,
        http,
        driver,
        exit,
        grace: options.io_timeout,
    })
}
