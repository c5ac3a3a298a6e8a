//! The server process shell: drives one [`ServerNode`] over real (or simulated) sockets.
//!
//! ```text
//!  client TCP (client_port) ─ reader task ─┐                 ┌─ writer task (bounded queue) ─ client TCP
//!  WebSocket (ws_port) ───── reader task ───┤                 ├─ writer task ────────────────── WebSocket
//!  route link (link_port) ── link task ────┤                 ├─ link writer task ──────────── route link
//!  store replies (spawned tasks) ──────────┼─▶ driver task ──┼─ store calls (spawned tasks)
//!  registry task (health, conn count) ─────┤   (ServerNode)  │
//!  HTTP /health, /metrics (snapshots) ─────┘                 └─ timers: poll_timeout
//! ```
//!
//! One **driver task** owns the [`ServerNode`]; every other task talks to it through one
//! bounded channel of inputs, and the driver never awaits I/O: it feeds one input, drains
//! every output (frames go into per-connection bounded queues, store calls become spawned
//! tasks whose replies come back as inputs, route sends go into a link's queue), re-arms its
//! one timer and waits again.
//!
//! Route links: routes dial `link_port` and authenticate with `cim_core::link_auth`
//! (challenge-response over the shared secret). Every authenticated link is kept and
//! reported to the node, which picks the link of every `RouteSend` (`ServerOutput::ToRoute`
//! names it): a user's sends stay on one link while any of them is unanswered, so one
//! sender's messages reach the route in the order sent; with nothing in flight the next send
//! picks a link by user id, so users (and the appending work) spread over every route. A
//! link's death fails every send in flight on it (`handle_route_link_down`: the client gets a
//! retryable nack and resends with the same id).
//!
//! Stopping: [`ServerHandle::drain`] leaves the registry first (routes stop sending users
//! here), then kicks every client with DRAINING, flushes every writer and closes the links,
//! all within `drain_timeout`. [`ServerHandle::abort`] (or dropping the handle) stops every
//! task at once, like a crash.
//!
//! Losing the store: a server that cannot reach the store for `store_loss_grace` fences
//! every connection, refuses new ones and unlists itself from the registry until the store
//! answers again (see `store_watch`), so routes send its users to servers that can serve them.
//! Losing the registry session does the same until the server is registered again (see
//! `registration`). The node decides both (`handle_store_lost`, `handle_registry_session_lost`
//! and their returns); the tasks only detect the conditions.

mod driver;
mod gateway;
mod http;
mod input;
mod link;
mod registration;
mod store_watch;
pub mod ws;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use cim_core::ids::{Epoch, ServerId, UserId};
use cim_core::registry::LiveServer;
use cim_core::server::{ConfigError, ConnId, ServerConfig, ServerNode};
use cim_proto::codec::{DEFAULT_MAX_FRAME, FrameCodec};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::http_server::HttpStats;
use crate::net::{Listener, Network};
use crate::nonces::NonceSource;
use crate::registry::{Registry, RegistryError};
use crate::store::Store;
use crate::tls::{MaybeTls, ServerTls};
use crate::warn_gate::WarnGate;

use self::driver::Driver;
use self::input::Input;
use self::registration::RegistryCtl;

/// How long an authenticated route link may stay silent before it is reaped. Routes ping
/// every few seconds, so this only fires on a link whose route is gone without a FIN.
pub const LINK_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Inputs waiting for the driver. Readers wait when it is full, which pushes back on the
/// peers through TCP instead of buffering without bound.
const INPUT_QUEUE: usize = 4096;

// Frames queued for one route link. Full means the route is not reading: the link is taken
// down and its sends failed back to their clients (retryable) rather than blocking the driver.
use crate::net::LINK_QUEUE;

/// Configuration of one server process. [`ServerOptions::new`] fills in the defaults.
/// Its `Debug` leaves the link secrets out.
#[derive(Clone)]
pub struct ServerOptions {
    /// Server id, ticket keys, limits and timers of the connection machine.
    pub node: ServerConfig,
    /// Bind address of all three listeners (default 0.0.0.0).
    pub listen_ip: IpAddr,
    /// Host put in the registry for clients and routes to dial (default "127.0.0.1").
    pub advertise_host: String,
    /// Client TCP gateway (default 11211; 0 = any free port).
    pub client_port: u16,
    /// Internal route links (default 11311; 0 = any free port).
    pub link_port: u16,
    /// Health and metrics (default 8081; 0 = any free port).
    pub http_port: u16,
    /// The WebSocket gateway (default none: off; `Some(0)` = any free port). Same node,
    /// same frames, one binary message each; TLS as `gateway_tls` (`wss://`).
    pub ws_port: Option<u16>,
    /// The browser origins the WebSocket gateway accepts (default: none; clients that send
    /// no `Origin` are always accepted). See [`ws`].
    pub ws_origins: ws::OriginPolicy,
    /// Time for a WebSocket upgrade request's head to arrive complete (default 10 s, the
    /// HTTP listeners' header timeout).
    pub ws_header_timeout: Duration,
    /// Shared secret of the route links (no default).
    pub link_secret: Vec<u8>,
    /// During a rotation, the previous link secret, still accepted from routes that have
    /// not switched yet (default none).
    pub link_secret_previous: Option<Vec<u8>>,
    /// Largest frame body read or written (default 64 KiB).
    pub max_frame: usize,
    /// Bound on each socket write and each link-handshake step (default 5 s).
    pub io_timeout: Duration,
    /// How often the connection count is republished in the registry (default 5 s).
    pub registry_update_interval: Duration,
    /// Bound on a graceful drain (default 5 s).
    pub drain_timeout: Duration,
    /// How long the store may stay unreachable before the server fences every connection
    /// and leaves the registry until it is back (default 3 s). Shorter than the lease's
    /// proven window, so its users re-home before their leases would fence them anyway.
    pub store_loss_grace: Duration,
    /// TLS on the client gateway (default none: plaintext). Its certificate must be valid
    /// for `advertise_host`; the registry tells routes (and so clients) to use TLS.
    pub gateway_tls: Option<ServerTls>,
    /// TLS on the link port (default none): routes must present a certificate of the route
    /// role, signed by the configured CA (mutual TLS).
    pub link_tls: Option<ServerTls>,
    /// Told of every session opened or closed here (default none). For the simulation's
    /// recorder and for tests; a production server leaves it unset.
    pub observer: Option<SessionObserver>,
    /// Where the route links' handshake nonces come from (default: the OS). The simulation
    /// gives each server a seeded source; a production server leaves the default.
    pub link_nonces: NonceSource,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets (the node's ticket keys print their ids only).
        f.debug_struct("ServerOptions")
            .field("node", &self.node)
            .field("listen_ip", &self.listen_ip)
            .field("advertise_host", &self.advertise_host)
            .field("client_port", &self.client_port)
            .field("link_port", &self.link_port)
            .field("http_port", &self.http_port)
            .field("ws_port", &self.ws_port)
            .field("ws_origins", &self.ws_origins)
            .field("ws_header_timeout", &self.ws_header_timeout)
            .field("max_frame", &self.max_frame)
            .field("io_timeout", &self.io_timeout)
            .field("registry_update_interval", &self.registry_update_interval)
            .field("drain_timeout", &self.drain_timeout)
            .field("store_loss_grace", &self.store_loss_grace)
            .field("gateway_tls", &self.gateway_tls.is_some())
            .field("link_tls", &self.link_tls.is_some())
            .field("observer", &self.observer)
            .field("link_nonces", &self.link_nonces)
            .finish_non_exhaustive()
    }
}

/// A change of the node's session list, as [`SessionObserver`] sees it. A session runs from
/// LoginOk sent (queued for the socket) to its connection being closed or forgotten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Opened {
        user: UserId,
        epoch: Epoch,
        conn: ConnId,
    },
    Closed {
        user: UserId,
        epoch: Epoch,
        conn: ConnId,
    },
}

/// Called by the driver task after each input, for each session that opened or closed
/// (closes first, so a replacement on one server never appears to overlap). Must be cheap
/// and must not block: it runs on the driver. An aborted server reports no closes.
#[derive(Clone)]
pub struct SessionObserver(pub Arc<dyn Fn(SessionEvent) + Send + Sync>);

impl std::fmt::Debug for SessionObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionObserver")
    }
}

impl ServerOptions {
    /// The defaults, for this machine configuration and link secret.
    pub fn new(node: ServerConfig, link_secret: Vec<u8>) -> Self {
        Self {
            node,
            listen_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            advertise_host: "127.0.0.1".to_owned(),
            client_port: 11211,
            link_port: 11311,
            http_port: 8081,
            ws_port: None,
            ws_origins: ws::OriginPolicy::default(),
            ws_header_timeout: crate::http_server::HttpLimits::default().header_timeout,
            link_secret,
            link_secret_previous: None,
            max_frame: DEFAULT_MAX_FRAME,
            io_timeout: Duration::from_secs(5),
            registry_update_interval: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(5),
            store_loss_grace: Duration::from_secs(3),
            gateway_tls: None,
            link_tls: None,
            observer: None,
            link_nonces: NonceSource::os(),
        }
    }

    fn validate(&self) -> Result<(), StartError> {
        self.node.validate().map_err(StartError::Config)?;
        let bad = [
            ("max_frame", self.max_frame == 0),
            ("io_timeout", self.io_timeout.is_zero()),
            ("ws_header_timeout", self.ws_header_timeout.is_zero()),
            (
                "registry_update_interval",
                self.registry_update_interval.is_zero(),
            ),
            ("link_secret", self.link_secret.is_empty()),
            ("advertise_host", self.advertise_host.is_empty()),
        ];
        match bad.into_iter().find(|(_, bad)| *bad) {
            Some((name, _)) => Err(StartError::InvalidOption(name)),
            None => Ok(()),
        }
    }
}

/// Why the server did not start. Nothing is left running or registered.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid server configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("invalid option {0}: it must be non-zero / non-empty")]
    InvalidOption(&'static str),
    #[error("cannot bind the {listener} listener on {addr}: {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot register in the registry: {0}")]
    Registry(#[from] RegistryError),
}

/// Why a running server stopped, or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("the HTTP listener failed: {0}")]
    Http(#[source] std::io::Error),
    #[error("server task `{0}` stopped unexpectedly")]
    TaskStopped(&'static str),
    #[error("a server task panicked: {0}")]
    Panicked(String),
    /// Everything was stopped anyway; some clients may not have had their final frames.
    #[error("drain did not finish within {0:?}")]
    DrainTimeout(Duration),
}

/// A running server. Dropping it stops every task at once, like [`ServerHandle::abort`].
#[derive(Debug)]
pub struct ServerHandle {
    server_id: ServerId,
    client_addr: SocketAddr,
    link_addr: SocketAddr,
    http_addr: SocketAddr,
    ws_addr: Option<SocketAddr>,
    clock: Clock,
    drain_timeout: Duration,
    io_timeout: Duration,
    cancel: CancellationToken,
    tasks: JoinSet<(&'static str, Result<(), ServerError>)>,
    /// Asks the driver to begin draining (type-erased so the handle is not generic).
    begin_drain: mpsc::Sender<oneshot::Sender<()>>,
    registry_ctl: mpsc::Sender<RegistryCtl>,
}

impl ServerHandle {
    pub fn server_id(&self) -> &ServerId {
        &self.server_id
    }

    /// The client gateway's bound address (its IP is `listen_ip`, which may be 0.0.0.0).
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }

    pub fn link_addr(&self) -> SocketAddr {
        self.link_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The WebSocket gateway's bound address, when it is on.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// Graceful stop: leave the registry, kick every client with DRAINING (they reconnect
    /// elsewhere through the route), flush every writer, close the links and listeners. All
    /// within `drain_timeout`; past it everything is stopped anyway and `DrainTimeout` returned.
    pub async fn drain(mut self) -> Result<(), ServerError> {
        let deadline = self.clock.now() + self.drain_timeout;
        let until = crate::clock::tokio_instant(deadline);
        tracing::info!(server = %self.server_id, "draining");

        // Leave the registry first, so routes stop handing users to a server that is going.
        let (ack, acked) = oneshot::channel();
        let left = async {
            self.registry_ctl
                .send(RegistryCtl::Deregister { ack })
                .await
                .ok()?;
            acked.await.ok()
        };
        // At most half the budget, so a hung registry still leaves time to kick and flush.
        let leave_until = crate::clock::tokio_instant(self.clock.now() + self.drain_timeout / 2);
        match tokio::time::timeout_at(leave_until, left).await {
            Ok(Some(Ok(()))) => tracing::info!(server = %self.server_id, "left the registry"),
            Ok(Some(Err(error))) => {
                tracing::warn!(server = %self.server_id, %error, "leaving the registry failed; its session is closed anyway")
            }
            Ok(None) => {
                tracing::warn!(server = %self.server_id, "registry task already gone")
            }
            Err(_) => tracing::warn!(server = %self.server_id, "leaving the registry timed out"),
        }

        // Kick everyone, flush, close links; the driver answers once every writer is done.
        let (done_tx, done_rx) = oneshot::channel();
        let drained = async {
            self.begin_drain.send(done_tx).await.ok()?;
            done_rx.await.ok()
        };
        let result = match tokio::time::timeout_at(until, drained).await {
            Ok(_) => Ok(()),
            Err(_) => Err(ServerError::DrainTimeout(self.drain_timeout)),
        };
        self.shutdown_tasks().await;
        tracing::info!(server = %self.server_id, ok = result.is_ok(), "stopped");
        result
    }

    /// Stops every task at once: sockets are dropped mid-stream, nothing is flushed, the
    /// registry entry goes with the dropped registration (an in-process crash, for tests).
    pub fn abort(mut self) {
        self.cancel.cancel();
        self.tasks.abort_all();
    }

    /// Resolves when the server stops by itself (a task failed or panicked); every other
    /// task is stopped then too. Cancel-safe.
    pub async fn stopped(&mut self) -> Result<(), ServerError> {
        let Some(joined) = self.tasks.join_next().await else {
            return Ok(());
        };
        let result = match joined {
            Ok((_, Err(error))) => Err(error),
            Ok((name, Ok(()))) => Err(ServerError::TaskStopped(name)),
            Err(join) => Err(ServerError::Panicked(join.to_string())),
        };
        if let Err(error) = &result {
            tracing::error!(server = %self.server_id, %error, "server stopped");
        }
        self.cancel.cancel();
        self.tasks.abort_all();
        result
    }

    /// Cancels every task and waits (briefly) for them to end.
    async fn shutdown_tasks(&mut self) {
        self.cancel.cancel();
        let joined = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.io_timeout, joined).await.is_err() {
            self.tasks.abort_all();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        // The JoinSet aborts its tasks on drop; the token reaches the per-connection ones.
        self.cancel.cancel();
    }
}

/// Binds the three listeners, registers with the real ports, and starts serving.
pub async fn start<N: Network, R: Registry>(
    net: N,
    clock: Clock,
    options: ServerOptions,
    store: Arc<dyn Store>,
    registry: &R,
) -> Result<ServerHandle, StartError> {
    options.validate()?;
    let mut node_config = options.node.clone();
    // Each client connection is a descriptor: a cap above the open-file limit would turn
    // the excess into failed accepts (and starve the store and links) instead of refusals.
    node_config.max_connections = crate::fd_limit::clamp_to_process_limit(
        "server client gateway",
        node_config.max_connections,
    );
    let max_connections = node_config.max_connections;
    let node = ServerNode::new(node_config)?;
    let warnings = Arc::new(WarnGate::default());
    let http_stats = Arc::new(HttpStats::default());
    let server_id = options.node.server_id.clone();

    // Bind first, so port 0 resolves before anything is registered.
    let client_listener = bind(&net, "client", options.listen_ip, options.client_port).await?;
    let link_listener = bind(&net, "link", options.listen_ip, options.link_port).await?;
    let http_listener = bind(&net, "http", options.listen_ip, options.http_port).await?;
    let client_addr = local_addr("client", &client_listener, options.client_port, &options)?;
    let link_addr = local_addr("link", &link_listener, options.link_port, &options)?;
    let http_addr = local_addr("http", &http_listener, options.http_port, &options)?;
    let ws_listener = match options.ws_port {
        Some(port) => {
            let listener = bind(&net, "websocket", options.listen_ip, port).await?;
            let addr = local_addr("websocket", &listener, port, &options)?;
            Some((listener, addr))
        }
        None => None,
    };
    let ws_addr = ws_listener.as_ref().map(|(_, addr)| *addr);

    let registration = registry
        .register(LiveServer {
            id: server_id.clone(),
            host: options.advertise_host.clone(),
            client_port: client_addr.port(),
            link_port: link_addr.port(),
            http_port: http_addr.port(),
            connections: 0,
            client_tls: options.gateway_tls.is_some(),
            ws_port: ws_addr.map(|addr| addr.port()),
        })
        .await?;
    tracing::info!(
        server = %server_id, %client_addr, %link_addr, %http_addr, ws_addr = ?ws_addr,
        host = %options.advertise_host, max_connections,
        gateway_tls = options.gateway_tls.is_some(), link_tls = options.link_tls.is_some(),
        "server registered and serving"
    );

    let cancel = CancellationToken::new();
    let codec = FrameCodec::new(options.max_frame);
    let (inputs, inputs_rx) = mpsc::channel::<Input<MaybeTls<N::Stream>>>(INPUT_QUEUE);
    let (begin_drain, begin_drain_rx) = mpsc::channel(1);
    let (registry_ctl, registry_ctl_rx) = mpsc::channel(1);
    let connections = Arc::new(AtomicU64::new(0));
    let registry_health = registration.health();

    let admission = gateway::Admission::new(max_connections, connections.clone());
    let mut tasks = JoinSet::new();
    let driver = Driver::new(
        node,
        clock,
        codec,
        store.clone(),
        options.io_timeout,
        inputs.clone(),
        cancel.clone(),
        connections.clone(),
        options.observer.clone(),
        warnings.clone(),
    );
    tasks.spawn(named(
        "driver",
        driver.run(inputs_rx, begin_drain_rx, cancel.clone()),
    ));
    tasks.spawn(named(
        "client listener",
        gateway::accept_loop(
            client_listener,
            options.gateway_tls.clone(),
            admission.clone(),
            inputs.clone(),
            warnings.clone(),
            cancel.clone(),
        ),
    ));
    let ws_stats = ws_listener
        .as_ref()
        .map(|_| Arc::new(ws::WsStats::default()));
    if let (Some((listener, _)), Some(stats)) = (ws_listener, &ws_stats) {
        tasks.spawn(named(
            "websocket listener",
            ws::accept_loop(
                listener,
                ws::WsSettings {
                    origins: options.ws_origins.clone(),
                    header_timeout: options.ws_header_timeout,
                    io_timeout: options.io_timeout,
                    codec,
                    tls: options.gateway_tls.clone(),
                    admission: admission.clone(),
                    stats: stats.clone(),
                    warnings: warnings.clone(),
                },
                inputs.clone(),
                cancel.clone(),
            ),
        ));
    }
    tasks.spawn(named(
        "link listener",
        link::accept_loop(
            link_listener,
            link::LinkSettings {
                server_id: server_id.clone(),
                secret: Arc::from(options.link_secret.as_slice()),
                previous_secret: options
                    .link_secret_previous
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .map(Arc::from),
                codec,
                io_timeout: options.io_timeout,
                warnings: warnings.clone(),
                tls: options.link_tls.clone(),
                nonces: options.link_nonces.clone(),
            },
            inputs.clone(),
            cancel.clone(),
        ),
    ));
    tasks.spawn(named(
        "store watch",
        store_watch::run(
            store.clone(),
            clock,
            options.store_loss_grace,
            inputs.clone(),
            registry_ctl.clone(),
            cancel.clone(),
        ),
    ));
    tasks.spawn(named(
        "http",
        http::serve(
            http_listener,
            http::HttpState {
                server_id: server_id.clone(),
                inputs: inputs.clone(),
                store,
                registry_health,
                warnings,
                max_connections,
                http: http_stats,
                tls: [
                    ("gateway", &options.gateway_tls),
                    ("link", &options.link_tls),
                ]
                .into_iter()
                .filter_map(|(name, tls)| Some((name, tls.as_ref()?.stats().clone())))
                .collect(),
                ws: ws_stats,
            },
            cancel.clone(),
        ),
    ));
    tasks.spawn(named(
        "registry",
        registration::run(
            registration,
            registration::Settings {
                update_interval: options.registry_update_interval,
                io_timeout: options.io_timeout,
            },
            inputs,
            registry_ctl_rx,
            connections,
            cancel.clone(),
        ),
    ));

    Ok(ServerHandle {
        server_id,
        client_addr,
        link_addr,
        http_addr,
        ws_addr,
        clock,
        drain_timeout: options.drain_timeout,
        io_timeout: options.io_timeout,
        cancel,
        tasks,
        begin_drain,
        registry_ctl,
    })
}

/// Starts a writer's next batch with `first` and whatever else is already queued, up to
/// `max` frames, so one write carries a burst instead of one syscall per frame.
fn fill_batch<T>(batch: &mut Vec<T>, first: T, queue: &mut mpsc::Receiver<T>, max: usize) {
    batch.clear();
    batch.push(first);
    while batch.len() < max {
        match queue.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
}

async fn named(
    name: &'static str,
    task: impl Future<Output = Result<(), ServerError>>,
) -> (&'static str, Result<(), ServerError>) {
    (name, task.await)
}

async fn bind<N: Network>(
    net: &N,
    listener: &'static str,
    ip: IpAddr,
    port: u16,
) -> Result<N::Listener, StartError> {
    let addr = SocketAddr::new(ip, port);
    net.bind(addr).await.map_err(|source| StartError::Bind {
        listener,
        addr,
        source,
    })
}

fn local_addr<L: Listener>(
    listener: &'static str,
    bound: &L,
    port: u16,
    options: &ServerOptions,
) -> Result<SocketAddr, StartError> {
    bound.local_addr().map_err(|source| StartError::Bind {
        listener,
        addr: SocketAddr::new(options.listen_ip, port),
        source,
    })
}
