//! The registry behind a network: a host that models ZooKeeper sessions ([`RegistryHost`],
//! served by [`serve_registry`]) and [`RemoteRegistry`], the [`Registry`] that talks to it.
//!
//! Built for the simulation: the registry is a turmoil host, so a partition between a server
//! and the registry expires the server's session and removes its entry, exactly as
//! ZooKeeper does. Generic over [`Network`], so it also runs over real sockets in tests.
//!
//! # The model
//!
//! - A client opens a **session** over a TCP connection (`Open`); the host answers with the
//!   session id and timeout `T`. Every frame the host receives on that connection counts as
//!   hearing from the session; clients ping every `T/4`. The host **expires** a session it has
//!   not heard from for `T` (checked every `T/20`): its entries are deleted and every watcher
//!   gets the new map. A connection that drops does not end its session: the client may
//!   resume it on a new connection (`Open { resume }`) until it expires. `Close` ends it at
//!   once (a dropped [`Registration`] or `deregister`).
//! - An **entry** is an ephemeral node named by the server id, holding the same JSON as a
//!   ZooKeeper node (`encode_node`). `Put` creates it in the caller's session or updates it if
//!   the session holds it already; a node held by another session is `NodeExists`. `Delete`
//!   removes it only if the caller's session holds it.
//! - **Watch** pushes the full node map on the connection now and after every change. Views
//!   decode it with `decode_node`, so a bad node is skipped as in ZooKeeper.
//!
//! The host's state ([`RegistryHost`]) lives outside the turmoil host closure, so a bounce of
//! the registry host keeps sessions and entries (as a ZooKeeper ensemble does when one member
//! restarts); sessions whose clients do not come back in time expire as usual.
//!
//! # Client side: the same keeper as `ZkRegistry`
//!
//! A registration runs core's `RegistryKeeper`, the machine `ZkRegistry` runs; this file is
//! only its transport (the connection, pings, resuming a session on a new connection).
//! A registration declares its connection lost after `2T/5` without hearing from the host
//! (`Disconnected { since }`), tries to resume the session, and declares it `Expired` by
//! itself at `since + T/2` (about `0.9 T` after the host last heard from it: just before the
//! host expires it and routes drop the entry, so the server fences first). It then opens a new
//! session, closing the lost one on the host (so its stale entry does not block the new one),
//! recreates the entry unless unlisted, and reports `Connected`.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cim_core::ids::ServerId;
use cim_core::registry::LiveServer;
use cim_core::registry_keeper::{
    Backoff, KeeperConfig, OpError as KeeperOpError, Session, SessionId,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use cim_io::net::{self, Listener, Network};
use cim_io::registry::keeper::{Cmd, Effect, Shell, now};
use cim_io::registry::{
    AnyRegistry, Registration, Registry, RegistryError, RegistryView, ServerMap, SessionHealth,
    decode_node, encode_node, validate_server_id,
};

use crate::store::{FrameError, JsonReader, JsonWriter, json_framed};

/// Bound on one frame write, both sides.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------- wire

/// A client's message to the registry host.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToRegistry {
    /// Opens a new session (`resume: None`) or resumes one on a new connection. `close`:
    /// sessions of this client it has given up on, ended first (their entries deleted).
    Open {
        resume: Option<u64>,
        close: Vec<u64>,
    },
    Ping,
    Put {
        id: u64,
        name: String,
        data: Vec<u8>,
    },
    Delete {
        id: u64,
        name: String,
    },
    /// Push the node map now and after every change.
    Watch,
    /// Ends the session (its entries are deleted) and the connection.
    Close,
}

/// The registry host's message to a client.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromRegistry {
    Opened {
        session: u64,
        timeout_ms: u64,
    },
    /// The session is gone (expired or closed); the connection is closed after this.
    Expired,
    Pong,
    Done {
        id: u64,
        result: Result<(), OpError>,
    },
    Nodes {
        nodes: Vec<(String, Vec<u8>)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum OpError {
    #[error("the node is held by another session")]
    NodeExists,
    #[error("no session is open on this connection")]
    NoSession,
}

// ---------------------------------------------------------------- host

/// How the registry host behaves.
#[derive(Debug, Clone, Copy)]
pub struct RegistryHostConfig {
    /// A session not heard from for this long expires (ZooKeeper's negotiated timeout).
    pub session_timeout: Duration,
}

impl Default for RegistryHostConfig {
    fn default() -> Self {
        Self {
            session_timeout: Duration::from_secs(6),
        }
    }
}

type Nodes = BTreeMap<String, Vec<u8>>;

/// The registry host's state: sessions and nodes. Keep it outside the turmoil host closure so
/// it survives a bounce; serve it with [`serve_registry`].
#[derive(Debug)]
pub struct RegistryHost {
    config: RegistryHostConfig,
    state: Mutex<HostState>,
    nodes: watch::Sender<Nodes>,
}

#[derive(Debug, Default)]
struct HostState {
    /// Live sessions and when each was last heard from.
    sessions: BTreeMap<u64, Instant>,
    nodes: BTreeMap<String, Node>,
    next_session: u64,
}

#[derive(Debug)]
struct Node {
    /// `None` for a node written around the API (test hook): nobody's session holds it.
    owner: Option<u64>,
    data: Vec<u8>,
}

impl RegistryHost {
    pub fn new(config: RegistryHostConfig) -> Self {
        Self {
            config,
            state: Mutex::new(HostState {
                next_session: 1,
                ..HostState::default()
            }),
            nodes: watch::channel(Nodes::new()).0,
        }
    }

    pub fn config(&self) -> RegistryHostConfig {
        self.config
    }

    /// The servers a view would show now.
    pub fn snapshot(&self) -> ServerMap {
        decode_nodes(&self.nodes.borrow())
    }

    /// Whether a node named `id` exists (listed or not decodable alike).
    pub fn has_node(&self, id: &ServerId) -> bool {
        self.lock().nodes.contains_key(id.as_str())
    }

    /// Live sessions (registrations' and views').
    pub fn live_sessions(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Test hook: writes a node bypassing the API, held by no session (like a persistent
    /// node another tool wrote).
    pub fn insert_raw_node(&self, name: &str, data: &[u8]) {
        let mut state = self.lock();
        state.nodes.insert(
            name.to_owned(),
            Node {
                owner: None,
                data: data.to_vec(),
            },
        );
        self.publish(&state);
    }

    /// Fault: every session expires now (a registry that lost its sessions). Clients see
    /// `Expired` when they next talk to the host and open new sessions.
    pub fn expire_all_sessions(&self) {
        let mut state = self.lock();
        let all: Vec<u64> = state.sessions.keys().copied().collect();
        for session in all {
            end_session(&mut state, session);
        }
        self.publish(&state);
    }

    fn lock(&self) -> MutexGuard<'_, HostState> {
        // Every mutation is a few map operations with no panic path between them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called with the lock held, so watchers see changes in the order they happened.
    fn publish(&self, state: &HostState) {
        let nodes: Nodes = state
            .nodes
            .iter()
            .map(|(name, node)| (name.clone(), node.data.clone()))
            .collect();
        self.nodes.send_if_modified(|current| {
            if *current == nodes {
                false
            } else {
                *current = nodes;
                true
            }
        });
    }

    fn open(&self, resume: Option<u64>, close: &[u64], now: Instant) -> Option<u64> {
        let mut state = self.lock();
        for session in close {
            end_session(&mut state, *session);
        }
        let session = match resume {
            Some(session) => {
                let last_heard = state.sessions.get_mut(&session)?;
                *last_heard = now;
                session
            }
            None => {
                let session = state.next_session;
                state.next_session += 1;
                state.sessions.insert(session, now);
                session
            }
        };
        self.publish(&state);
        Some(session)
    }

    /// Records that `session` was heard from; false if it is gone.
    fn touch(&self, session: u64, now: Instant) -> bool {
        match self.lock().sessions.get_mut(&session) {
            Some(last_heard) => {
                *last_heard = now;
                true
            }
            None => false,
        }
    }

    fn put(&self, session: u64, name: &str, data: Vec<u8>) -> Result<(), OpError> {
        let mut state = self.lock();
        match state.nodes.get_mut(name) {
            Some(node) if node.owner == Some(session) => node.data = data,
            Some(_) => return Err(OpError::NodeExists),
            None => {
                state.nodes.insert(
                    name.to_owned(),
                    Node {
                        owner: Some(session),
                        data,
                    },
                );
            }
        }
        self.publish(&state);
        Ok(())
    }

    fn delete(&self, session: u64, name: &str) {
        let mut state = self.lock();
        if state
            .nodes
            .get(name)
            .is_some_and(|n| n.owner == Some(session))
        {
            state.nodes.remove(name);
            self.publish(&state);
        }
    }

    fn close(&self, session: u64) {
        let mut state = self.lock();
        end_session(&mut state, session);
        self.publish(&state);
    }

    /// Expires every session not heard from within the timeout.
    fn expire_due(&self, now: Instant) {
        let mut state = self.lock();
        let timeout = self.config.session_timeout;
        let due: Vec<u64> = state
            .sessions
            .iter()
            .filter(|(_, heard)| now.saturating_duration_since(**heard) >= timeout)
            .map(|(s, _)| *s)
            .collect();
        if due.is_empty() {
            return;
        }
        for session in due {
            tracing::info!(session, "registry host: session expired");
            end_session(&mut state, session);
        }
        self.publish(&state);
    }
}

fn end_session(state: &mut HostState, session: u64) {
    state.sessions.remove(&session);
    state.nodes.retain(|_, n| n.owner != Some(session));
}

fn decode_nodes(nodes: &Nodes) -> ServerMap {
    nodes
        .iter()
        .filter_map(|(name, data)| decode_node(name, data))
        .map(|s| (s.id.clone(), s))
        .collect()
}

/// Serves `host` on `listen` until the listener fails (in a turmoil host: until it is
/// crashed or bounced), expiring silent sessions meanwhile.
pub async fn serve_registry<N: Network>(
    net: N,
    listen: SocketAddr,
    host: Arc<RegistryHost>,
) -> io::Result<()> {
    let listener = net.bind(listen).await?;
    serve_registry_on(listener, host).await
}

/// [`serve_registry`] on a listener bound already (tests bind port 0 and read the port).
pub async fn serve_registry_on<L: Listener>(
    mut listener: L,
    host: Arc<RegistryHost>,
) -> io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "registry host listening");
    let tick = host.config.session_timeout / 20;
    let reaper = async {
        loop {
            tokio::time::sleep(tick).await;
            host.expire_due(Instant::now());
        }
    };
    let accept = async {
        loop {
            let (stream, peer) = listener.accept().await?;
            let host = host.clone();
            tokio::spawn(async move {
                if let Err(error) = serve_registry_connection(stream, &host).await {
                    tracing::debug!(%peer, %error, "registry connection ended");
                }
            });
        }
    };
    tokio::select! {
        biased;
        () = reaper => unreachable!("the reaper loops forever"),
        result = accept => result,
    }
}

async fn serve_registry_connection<S: net::Stream>(
    stream: S,
    host: &RegistryHost,
) -> Result<(), FrameError> {
    let (mut reader, mut writer) = json_framed(stream);
    let mut session: Option<u64> = None;
    let mut watching: Option<watch::Receiver<Nodes>> = None;
    // Clients ping every T/4; a connection silent for T belongs to an expired session.
    let idle = host.config.session_timeout;
    loop {
        tokio::select! {
            biased;
            message = reader.recv_within::<ToRegistry>(idle) => {
                let message = match message {
                    Err(FrameError::Closed) => return Ok(()),
                    other => other?,
                };
                if let Some(s) = session
                    && !host.touch(s, Instant::now())
                {
                    writer.send(&FromRegistry::Expired, WRITE_TIMEOUT).await?;
                    return Ok(());
                }
                let reply = match message {
                    ToRegistry::Open { resume, close } => {
                        if session.is_some() {
                            // One session per connection: a confused client starts over.
                            return Ok(());
                        }
                        match host.open(resume, &close, Instant::now()) {
                            Some(s) => {
                                session = Some(s);
                                FromRegistry::Opened {
                                    session: s,
                                    timeout_ms: host.config.session_timeout.as_millis() as u64,
                                }
                            }
                            None => {
                                writer.send(&FromRegistry::Expired, WRITE_TIMEOUT).await?;
                                return Ok(());
                            }
                        }
                    }
                    ToRegistry::Ping => FromRegistry::Pong,
                    ToRegistry::Put { id, name, data } => FromRegistry::Done {
                        id,
                        result: match session {
                            Some(s) => host.put(s, &name, data),
                            None => Err(OpError::NoSession),
                        },
                    },
                    ToRegistry::Delete { id, name } => FromRegistry::Done {
                        id,
                        result: match session {
                            Some(s) => {
                                host.delete(s, &name);
                                Ok(())
                            }
                            None => Err(OpError::NoSession),
                        },
                    },
                    ToRegistry::Watch => {
                        let mut rx = host.nodes.subscribe();
                        let nodes = rx.borrow_and_update().clone();
                        watching = Some(rx);
                        FromRegistry::Nodes { nodes: nodes.into_iter().collect() }
                    }
                    ToRegistry::Close => {
                        if let Some(s) = session {
                            host.close(s);
                        }
                        return Ok(());
                    }
                };
                writer.send(&reply, WRITE_TIMEOUT).await?;
            }
            changed = async {
                match watching.as_mut() {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(rx) = watching.as_mut() else { continue };
                if changed.is_err() {
                    return Ok(());
                }
                let nodes = rx.borrow_and_update().clone();
                let push = FromRegistry::Nodes { nodes: nodes.into_iter().collect() };
                writer.send(&push, WRITE_TIMEOUT).await?;
            }
        }
    }
}

// ---------------------------------------------------------------- client

/// Timeouts of a [`RemoteRegistry`]. The session timeout is the host's.
#[derive(Debug, Clone, Copy)]
pub struct RemoteRegistryOptions {
    /// One dial of the host, plus its `Opened` answer.
    pub connect_timeout: Duration,
    /// One operation (put, delete, first map); also bounded by the connection's idle limit.
    pub op_timeout: Duration,
}

impl Default for RemoteRegistryOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            op_timeout: Duration::from_secs(2),
        }
    }
}

/// A [`Registry`] served by a registry host; see the module docs. Cheap to clone; it opens a
/// session per registration and per view.
#[derive(Debug, Clone)]
pub struct RemoteRegistry<N: Network> {
    net: N,
    host: String,
    port: u16,
    options: RemoteRegistryOptions,
}

/// Tests pick it among the production backends as a boxed one ([`AnyRegistry::other`]).
impl<N: Network> From<RemoteRegistry<N>> for AnyRegistry {
    fn from(r: RemoteRegistry<N>) -> Self {
        AnyRegistry::other(r)
    }
}

impl<N: Network> RemoteRegistry<N> {
    /// Connects only when registering or watching.
    pub fn new(net: N, host: impl Into<String>, port: u16, options: RemoteRegistryOptions) -> Self {
        Self {
            net,
            host: host.into(),
            port,
            options,
        }
    }
}

fn remote_err(op: &'static str, e: impl std::fmt::Display) -> RegistryError {
    RegistryError::Remote {
        op,
        reason: e.to_string(),
    }
}

/// One connection carrying one session.
struct SessionConn<S> {
    reader: JsonReader<S>,
    writer: JsonWriter<S>,
    session: u64,
    timeout: Duration,
    last_heard: Instant,
    last_sent: Instant,
    next_op: u64,
    op_timeout: Duration,
}

/// Why an operation on a session connection failed.
enum Fail {
    /// The connection is broken (or timed out); the session may live on.
    Conn(RegistryError),
    /// The host says the session is gone.
    Expired,
    /// Another session holds the node.
    Exists,
}

enum Opening<S> {
    Open(Box<SessionConn<S>>),
    /// The session to resume is gone.
    Expired,
}

async fn open_session<N: Network>(
    reg: &RemoteRegistry<N>,
    resume: Option<u64>,
    close: Vec<u64>,
) -> Result<Opening<N::Stream>, RegistryError> {
    let within = reg.options.connect_timeout;
    let attempt = async {
        let stream = net::connect(&reg.net, &reg.host, reg.port, within)
            .await
            .map_err(|e| remote_err("connect", e))?;
        let (reader, mut writer) = json_framed(stream);
        let mut reader = reader;
        writer
            .send(&ToRegistry::Open { resume, close }, within)
            .await
            .map_err(|e| remote_err("open session", e))?;
        match reader
            .recv::<FromRegistry>()
            .await
            .map_err(|e| remote_err("open session", e))?
        {
            FromRegistry::Opened {
                session,
                timeout_ms,
            } => {
                let now = Instant::now();
                Ok(Opening::Open(Box::new(SessionConn {
                    reader,
                    writer,
                    session,
                    timeout: Duration::from_millis(timeout_ms.max(1)),
                    last_heard: now,
                    last_sent: now,
                    next_op: 1,
                    op_timeout: reg.options.op_timeout,
                })))
            }
            FromRegistry::Expired => Ok(Opening::Expired),
            other => Err(remote_err(
                "open session",
                format!("unexpected answer {other:?}"),
            )),
        }
    };
    match tokio::time::timeout(within * 2, attempt).await {
        Ok(result) => result,
        Err(_) => Err(RegistryError::Timeout {
            op: "open session",
            after: within * 2,
        }),
    }
}

impl<S: net::Stream> SessionConn<S> {
    /// Silent this long: the connection is lost.
    fn idle_deadline(&self) -> Instant {
        self.last_heard + self.timeout * 2 / 5
    }

    fn ping_deadline(&self) -> Instant {
        self.last_sent + self.timeout / 4
    }

    async fn send(&mut self, message: &ToRegistry) -> Result<(), Fail> {
        let result = self.writer.send(message, WRITE_TIMEOUT).await;
        self.last_sent = Instant::now();
        result.map_err(|e| Fail::Conn(remote_err("send", e)))
    }

    /// Handles a frame that is not an operation's answer. `Err` ends the connection.
    fn heard(&mut self, message: &FromRegistry) -> Result<(), Fail> {
        self.last_heard = Instant::now();
        match message {
            FromRegistry::Expired => Err(Fail::Expired),
            _ => Ok(()),
        }
    }

    /// Runs `Put` or `Delete` and waits for its answer (pongs and pushes meanwhile are fine).
    async fn op(&mut self, make: impl FnOnce(u64) -> ToRegistry) -> Result<(), Fail> {
        let id = self.next_op;
        self.next_op += 1;
        self.send(&make(id)).await?;
        let deadline = (Instant::now() + self.op_timeout).min(self.idle_deadline());
        loop {
            let message = tokio::select! {
                biased;
                m = self.reader.recv::<FromRegistry>() => {
                    m.map_err(|e| Fail::Conn(remote_err("registry operation", e)))?
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Err(Fail::Conn(RegistryError::Timeout {
                        op: "registry operation",
                        after: self.op_timeout,
                    }));
                }
            };
            self.heard(&message)?;
            match message {
                FromRegistry::Done { id: done, result } if done == id => {
                    return match result {
                        Ok(()) => Ok(()),
                        Err(OpError::NodeExists) => Err(Fail::Exists),
                        Err(OpError::NoSession) => Err(Fail::Expired),
                    };
                }
                _ => {}
            }
        }
    }

    async fn put(&mut self, server: &LiveServer) -> Result<(), Fail> {
        let data = encode_node(server).map_err(Fail::Conn)?;
        let name = server.id.as_str().to_owned();
        self.op(|id| ToRegistry::Put { id, name, data }).await
    }

    async fn delete(&mut self, id: &ServerId) -> Result<(), Fail> {
        let name = id.as_str().to_owned();
        self.op(|id| ToRegistry::Delete { id, name }).await
    }

    /// Best effort: ends the session on the host now rather than at expiry.
    async fn close(mut self) {
        let _ = self.send(&ToRegistry::Close).await;
    }
}

/// A new session holding the server's entry if `listed` (waiting out a holder that is not one
/// of `previous`, up to a session timeout), holding none otherwise.
async fn establish<N: Network>(
    reg: &RemoteRegistry<N>,
    server: &LiveServer,
    previous: Vec<u64>,
    listed: bool,
) -> Result<SessionConn<N::Stream>, RegistryError> {
    let mut conn = match open_session(reg, None, previous).await? {
        Opening::Open(conn) => *conn,
        Opening::Expired => {
            return Err(remote_err("open session", "a new session was refused"));
        }
    };
    if !listed {
        return Ok(conn);
    }
    // A node left by a crashed predecessor lives until the host expires its session.
    let give_up = Instant::now() + conn.timeout + reg.options.op_timeout;
    loop {
        match conn.put(server).await {
            Ok(()) => return Ok(conn),
            Err(Fail::Exists) if Instant::now() < give_up => {
                tracing::debug!(server = %server.id, "registry node held by another session; waiting");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(Fail::Exists) => return Err(RegistryError::AlreadyRegistered(server.id.clone())),
            Err(Fail::Expired) => return Err(remote_err("create entry", "session expired")),
            Err(Fail::Conn(e)) => return Err(e),
        }
    }
}

impl<N: Network> Registry for RemoteRegistry<N> {
    async fn register(&self, server: LiveServer) -> Result<Registration, RegistryError> {
        validate_server_id(&server.id)?;
        let conn = establish(self, &server, Vec::new(), true).await?;
        let id = server.id.clone();
        tracing::info!(server = %id, session = conn.session, "registered with the registry host");
        let session = Session {
            id: conn.session,
            timeout: conn.timeout,
        };
        let (shell, parts) = Shell::new(keeper_config(), server, session);
        let keeper = Keeper {
            reg: self.clone(),
            shell,
            pending: None,
        };
        tokio::spawn(keeper.run(conn));
        Ok(Registration::from_keeper(id, parts))
    }

    async fn watch(&self) -> Result<RegistryView, RegistryError> {
        let (conn, nodes) = start_watch(self, None).await?;
        let (servers_tx, servers_rx) = watch::channel(decode_nodes(&nodes));
        let (health_tx, health_rx) = watch::channel(SessionHealth::Connected);
        let viewer = Viewer {
            reg: self.clone(),
            servers: servers_tx,
            health: health_tx,
        };
        tokio::spawn(viewer.run(conn));
        Ok(RegistryView::new(servers_rx, health_rx))
    }
}

// ---------------------------------------------------------------- registration

/// The simulated registry's pauses: new sessions are cheap on the host, so retried sooner
/// than ZooKeeper's (capped at 1 s); the repair backoff is the machine's default.
fn keeper_config() -> KeeperConfig {
    let default = KeeperConfig::default();
    KeeperConfig {
        establish: Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_secs(1),
        },
        ..default
    }
}

/// Serves one registration across connections and sessions: the transport for a
/// [`cim_core::registry_keeper::RegistryKeeper`] (in [`Shell`]), which decides everything
/// else. The transport's part is what ZooKeeper's client library does by itself: noticing a
/// silent connection (`2T/5`), pinging, and resuming the session on new connections while
/// the machine waits for it.
struct Keeper<N: Network> {
    reg: RemoteRegistry<N>,
    shell: Shell,
    /// An effect taken from the machine while waiting, for the run loop to carry out.
    pending: Option<Effect>,
}

fn op_result(result: Result<(), Fail>, id: &ServerId) -> Result<(), KeeperOpError<RegistryError>> {
    result.map_err(|fail| match fail {
        Fail::Conn(e) => {
            tracing::debug!(server = %id, error = %e, "registry connection failed");
            KeeperOpError::Disconnected(e)
        }
        Fail::Expired => KeeperOpError::Expired,
        Fail::Exists => {
            tracing::warn!(server = %id, "registry entry held by another session; retrying");
            KeeperOpError::Failed(RegistryError::AlreadyRegistered(id.clone()))
        }
    })
}

impl Fail {
    fn into_error(self, id: &ServerId) -> RegistryError {
        match self {
            Fail::Conn(e) => e,
            Fail::Expired => RegistryError::NotConnected,
            Fail::Exists => RegistryError::AlreadyRegistered(id.clone()),
        }
    }
}

impl<N: Network> Keeper<N> {
    /// `conn` is the current connection, or the last one: it is kept until a new one
    /// replaces it (or serving ends).
    async fn run(mut self, mut conn: SessionConn<N::Stream>) {
        loop {
            let mut establish = None;
            while let Some(effect) = self.pending.take().or_else(|| self.shell.next_effect()) {
                let id = self.shell.machine.server().id.clone();
                let result = match effect {
                    Effect::Reconcile { server, listed, .. } => {
                        // A put creates the entry or overwrites it, so stale or not is the same.
                        if listed {
                            conn.put(&server).await
                        } else {
                            conn.delete(&server.id).await
                        }
                    }
                    Effect::Publish { server } => conn.put(&server).await,
                    Effect::Leave => {
                        let result = conn.delete(&id).await;
                        conn_close(&mut conn).await;
                        result
                    }
                    Effect::Establish {
                        server,
                        listed,
                        previous,
                    } => {
                        establish = Some((server, listed, previous));
                        continue;
                    }
                    // The connection goes when a new one replaces it.
                    Effect::SessionLost { .. } => continue,
                    Effect::Stop { close_session } => {
                        if close_session {
                            conn_close(&mut conn).await;
                        }
                        return;
                    }
                };
                let result = op_result(result, &id);
                self.shell.machine.handle_op_done(now(), result);
            }
            if self.shell.machine.is_connected() {
                self.serve(&mut conn).await;
            } else if let Some(session) = self.shell.machine.session() {
                self.resume(&mut conn, session.id).await;
            } else if let Some(attempt) = establish {
                self.reestablish(&mut conn, attempt).await;
            } else {
                debug_assert!(false, "a registry keeper with nothing to do");
                return;
            }
        }
    }

    /// Feeds a command; `true` if the machine now wants something of the transport (the run
    /// loop carries it out).
    fn command(&mut self, cmd: Option<Cmd>) -> bool {
        self.shell.feed(cmd);
        self.pending = self.shell.next_effect();
        self.pending.is_some()
    }

    /// Waits for one event on the connected session and feeds it to the machine.
    async fn serve(&mut self, conn: &mut SessionConn<N::Stream>) {
        let idle = conn.idle_deadline();
        let ping = conn.ping_deadline();
        let reason = self.shell.machine.poll_timeout().map(|(_, why)| why);
        let repair_at = self.shell.machine.poll_timeout().map(|(at, _)| at);
        let repair = async move {
            match repair_at {
                Some(at) => sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let failed: Option<Fail> = tokio::select! {
            biased;
            cmd = self.shell.cmds.recv() => {
                self.shell.feed(cmd);
                None
            }
            message = conn.reader.recv::<FromRegistry>() => match message {
                Ok(message) => conn.heard(&message).err(),
                Err(e) => Some(Fail::Conn(remote_err("read", e))),
            },
            () = tokio::time::sleep_until(idle) => {
                Some(Fail::Conn(RegistryError::Timeout { op: "hear from the registry host", after: conn.timeout * 2 / 5 }))
            }
            () = tokio::time::sleep_until(ping) => conn.send(&ToRegistry::Ping).await.err(),
            () = repair => {
                tracing::trace!(server = %self.shell.machine.server().id, ?reason, "registry timer");
                self.shell.machine.handle_timeout(now());
                None
            }
        };
        match failed {
            None => {}
            Some(Fail::Expired) => self.shell.machine.handle_session_expired(now()),
            Some(fail) => {
                let error = fail.into_error(&self.shell.machine.server().id);
                tracing::debug!(server = %self.shell.machine.server().id, %error, "registry connection failed");
                self.shell.machine.handle_disconnected(now());
            }
        }
    }

    /// Tries to resume `session` on new connections until it is back, gone, or the machine
    /// calls it lost.
    async fn resume(&mut self, conn: &mut SessionConn<N::Stream>, session: SessionId) {
        let Some((lost_at, _)) = self.shell.machine.poll_timeout() else {
            debug_assert!(false, "a disconnected session without a deadline");
            return;
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            let reg = self.reg.clone();
            let attempt = open_session(&reg, Some(session), Vec::new());
            tokio::pin!(attempt);
            let outcome = loop {
                tokio::select! {
                    biased;
                    cmd = self.shell.cmds.recv() => {
                        if self.command(cmd) {
                            return;
                        }
                    }
                    () = sleep_until(lost_at) => {
                        self.shell.machine.handle_timeout(now());
                        return;
                    }
                    result = &mut attempt => break result,
                }
            };
            match outcome {
                Ok(Opening::Open(c)) => {
                    *conn = *c;
                    self.shell.machine.handle_reconnected(now());
                    return;
                }
                Ok(Opening::Expired) => {
                    self.shell.machine.handle_session_expired(now());
                    return;
                }
                Err(error) => {
                    tracing::debug!(server = %self.shell.machine.server().id, %error, "cannot resume the registry session yet");
                }
            }
            let pause = tokio::time::sleep(backoff);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    biased;
                    cmd = self.shell.cmds.recv() => {
                        if self.command(cmd) {
                            return;
                        }
                    }
                    () = sleep_until(lost_at) => {
                        self.shell.machine.handle_timeout(now());
                        return;
                    }
                    () = &mut pause => break,
                }
            }
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// Runs the machine's attempts at a new session until one is up or serving ends.
    async fn reestablish(
        &mut self,
        conn: &mut SessionConn<N::Stream>,
        (mut server, mut listed, mut previous): (LiveServer, bool, Vec<SessionId>),
    ) {
        loop {
            let outcome = {
                let reg = self.reg.clone();
                let attempt = establish(&reg, &server, previous, listed);
                tokio::pin!(attempt);
                loop {
                    tokio::select! {
                        biased;
                        cmd = self.shell.cmds.recv() => {
                            if self.command(cmd) {
                                return;
                            }
                        }
                        result = &mut attempt => break result,
                    }
                }
            };
            let Some((retry_at, _)) = (match outcome {
                Ok(c) => {
                    let session = Session {
                        id: c.session,
                        timeout: c.timeout,
                    };
                    *conn = c;
                    self.shell.machine.handle_established(now(), Ok(session));
                    tracing::info!(server = %server.id, session = session.id,
                        listed = self.shell.machine.is_listed(), "registry session re-established");
                    return;
                }
                Err(error) => {
                    self.shell.machine.handle_established(now(), Err(error));
                    let retry = self.shell.machine.poll_timeout();
                    tracing::warn!(server = %server.id, retry_at = ?retry.map(|(at, _)| at),
                        "could not set up a new registry session");
                    retry
                }
            }) else {
                debug_assert!(false, "a failed attempt without a retry");
                return;
            };
            let pause = sleep_until(retry_at);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    biased;
                    cmd = self.shell.cmds.recv() => {
                        if self.command(cmd) {
                            return;
                        }
                    }
                    () = &mut pause => break,
                }
            }
            self.shell.machine.handle_timeout(now());
            match self.shell.next_effect() {
                Some(Effect::Establish {
                    server: s,
                    listed: l,
                    previous: p,
                }) => (server, listed, previous) = (s, l, p),
                other => {
                    self.pending = other;
                    return;
                }
            }
        }
    }
}

fn sleep_until(at: cim_core::time::Instant) -> tokio::time::Sleep {
    tokio::time::sleep_until(cim_io::clock::tokio_instant(at))
}

async fn conn_close<S: net::Stream>(conn: &mut SessionConn<S>) {
    let _ = conn.send(&ToRegistry::Close).await;
}

// ---------------------------------------------------------------- view

/// A session (resumed if given and still alive, new otherwise) watching the node map, and
/// the map as it is now.
async fn start_watch<N: Network>(
    reg: &RemoteRegistry<N>,
    resume: Option<u64>,
) -> Result<(SessionConn<N::Stream>, Nodes), RegistryError> {
    let mut conn = match open_session(reg, resume, Vec::new()).await? {
        Opening::Open(conn) => *conn,
        Opening::Expired => match open_session(reg, None, Vec::new()).await? {
            Opening::Open(conn) => *conn,
            Opening::Expired => return Err(remote_err("watch", "a new session was refused")),
        },
    };
    conn.send(&ToRegistry::Watch)
        .await
        .map_err(|f| f.into_error(&ServerId::new("view")))?;
    let deadline = Instant::now() + reg.options.op_timeout;
    loop {
        let message = match tokio::time::timeout_at(deadline, conn.reader.recv()).await {
            Ok(m) => m.map_err(|e| remote_err("watch", e))?,
            Err(_) => {
                return Err(RegistryError::Timeout {
                    op: "watch",
                    after: reg.options.op_timeout,
                });
            }
        };
        if let FromRegistry::Nodes { nodes } = message {
            conn.last_heard = Instant::now();
            return Ok((conn, nodes.into_iter().collect()));
        }
    }
}

/// Keeps one view current across connections and sessions.
struct Viewer<N: Network> {
    reg: RemoteRegistry<N>,
    servers: watch::Sender<ServerMap>,
    health: watch::Sender<SessionHealth>,
}

impl<N: Network> Viewer<N> {
    fn publish(&self, nodes: Vec<(String, Vec<u8>)>) {
        let map = decode_nodes(&nodes.into_iter().collect());
        self.servers.send_if_modified(|current| {
            if *current == map {
                false
            } else {
                *current = map;
                true
            }
        });
    }

    async fn run(self, mut conn: SessionConn<N::Stream>) {
        loop {
            // Serve the connection until it fails.
            let end = loop {
                let idle = conn.idle_deadline();
                let ping = conn.ping_deadline();
                let step: Result<(), Fail> = tokio::select! {
                    biased;
                    () = self.servers.closed() => {
                        conn.close().await;
                        return;
                    }
                    message = conn.reader.recv::<FromRegistry>() => match message {
                        Ok(message) => match conn.heard(&message) {
                            Ok(()) => {
                                if let FromRegistry::Nodes { nodes } = message {
                                    self.publish(nodes);
                                }
                                Ok(())
                            }
                            Err(f) => Err(f),
                        },
                        Err(e) => Err(Fail::Conn(remote_err("read", e))),
                    },
                    () = tokio::time::sleep_until(idle) => Err(Fail::Conn(RegistryError::Timeout {
                        op: "hear from the registry host", after: conn.timeout * 2 / 5,
                    })),
                    () = tokio::time::sleep_until(ping) => conn.send(&ToRegistry::Ping).await,
                };
                if let Err(fail) = step {
                    break fail;
                }
            };
            let mut resume = Some(conn.session);
            match end {
                Fail::Expired => {
                    self.health.send_replace(SessionHealth::Expired);
                    resume = None;
                }
                _ => {
                    self.health.send_replace(SessionHealth::Disconnected {
                        since: Instant::now(),
                    });
                }
            }
            // Reconnect (resuming the session if it lives), then list everything again.
            let mut backoff = Duration::from_millis(50);
            conn = loop {
                let attempt = start_watch(&self.reg, resume);
                let outcome = tokio::select! {
                    biased;
                    () = self.servers.closed() => return,
                    outcome = attempt => outcome,
                };
                match outcome {
                    Ok((conn, nodes)) => {
                        self.publish(nodes.into_iter().collect());
                        self.health.send_replace(SessionHealth::Connected);
                        break conn;
                    }
                    Err(error) => {
                        tracing::debug!(%error, retry_in = ?backoff, "registry view cannot reconnect yet");
                    }
                }
                tokio::select! {
                    biased;
                    () = self.servers.closed() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_millis(500));
            };
        }
    }
}
