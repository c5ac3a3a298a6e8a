//! The server registry: which servers are alive and where to reach them.
//!
//! Two sides use it:
//!
//! - **A server** calls [`Registry::register`] once it listens. The returned [`Registration`]
//!   keeps the server's entry alive for as long as it is held: in ZooKeeper an EPHEMERAL node
//!   named by the server id under a persistent root (default [`DEFAULT_ROOT`]), holding the
//!   [`LiveServer`] fields as JSON. It
//!   - publishes a new session count with [`Registration::update`] (least-connections
//!     balancing reads it);
//!   - reports its own session through [`Registration::health`], a
//!     `watch::Receiver<SessionHealth>`. A server whose registry session is lost has vanished
//!     from every route's view, and another server may take its users over, so it must fence
//!     itself on [`SessionHealth::Expired`]. A partitioned ZooKeeper client cannot hear that
//!     the ensemble expired its session, so the ZooKeeper registration declares `Expired` by
//!     itself after a disconnection long enough that the ensemble is about to expire it
//!     (see `zookeeper.rs`): the server learns it is out before routes drop it;
//!   - **recreates the entry after a session expiry**: it opens a new session and creates the
//!     node again with the latest data (unless unlisted), then reports `Connected`;
//!     [`Registration::sessions_lost`] counts how often that happened;
//!   - [`Registration::set_listed`] takes the entry out of the registry and puts it back
//!     without touching the session (see *Listing* below);
//!   - [`Registration::deregister`] removes the entry first and only then closes the session
//!     (graceful drain: routes stop sending new users before the server goes away). Dropping
//!     a `Registration` closes the session, so the entry disappears too (ZooKeeper deletes an
//!     ephemeral node when its session closes).
//! - **A route** calls [`Registry::watch`]. The [`RegistryView`] holds a
//!   `watch::Receiver<BTreeMap<ServerId, LiveServer>>` that is current when `watch` returns
//!   and is kept current afterwards (ZooKeeper: a child watch on the root plus a data watch
//!   per server node, every watch re-armed when it fires, everything re-listed after a
//!   reconnect or a new session). A removed server leaves the view as soon as ZooKeeper
//!   reports it (milliseconds). While the view's own session is disconnected the map cannot
//!   change; [`RegistryView::health`] says so, and says `Expired` once the ZooKeeper view has
//!   been cut off for half a session timeout (as long as a registration waits before its
//!   server fences): a route stops placing logins then (see `RouteLogin::handle_registry_lost`).
//!
//! **Listing.** A server that cannot serve new users for a while (it lost its store but not
//! the registry) must stop being picked by routes without giving up its registry session:
//! `set_listed(false)` deletes the entry (the server leaves every view within the usual
//! latency) while health stays `Connected` and `sessions_lost` does not move;
//! `set_listed(true)` recreates it with the latest data. The wish ([`Registration::is_listed`])
//! is the registration's, not the session's: it survives reconnects (a reconnect never
//! recreates an unlisted entry, and deletes one it finds), session loss (the new session is
//! opened and reported `Connected`, but holds no entry while unlisted), and updates (a count
//! published while unlisted is stored and shown when listed again). `set_listed` is
//! idempotent; on `Err` the wish is still kept and applied when the session recovers.
//! `deregister` works listed or not.
//!
//! Node data that does not decode, or whose id disagrees with its node name, is skipped with a
//! warning: a bad entry never takes the view down.
//!
//! [`ZkRegistry`] is the production backend; [`MemoryRegistry`] is the in-process one (`cim up`,
//! unit tests), with test hooks to simulate disconnection and session expiry. [`AnyRegistry`]
//! lets the shell pick one at run time. Both pass the same conformance suite
//! (`io/tests/registry_conformance.rs`).

pub mod keeper;
mod memory;
mod zookeeper;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cim_core::ids::ServerId;
use cim_core::registry::LiveServer;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

pub use memory::MemoryRegistry;
pub use zookeeper::{ZkAuth, ZkConfig, ZkRegistry, ZkTls};

/// The persistent ZooKeeper node the server nodes live under, unless configured otherwise.
pub const DEFAULT_ROOT: &str = "/cim/servers";

/// The live servers, by id.
pub type ServerMap = BTreeMap<ServerId, LiveServer>;

/// Health of one registry session, as its owner sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionHealth {
    /// The session is established and the entry (for a registration) exists, unless the
    /// registration is unlisted.
    Connected,
    /// The connection dropped at `since`; the session may still be alive on the ensemble.
    Disconnected { since: Instant },
    /// The session is gone (expired, closed, or disconnected so long that it counts as
    /// lost: half the session timeout for ZooKeeper): the entry is no longer in the registry,
    /// or will not be by the time anyone could act on it. A registration is busy recreating
    /// it and reports `Connected` when done.
    Expired,
}

impl SessionHealth {
    pub fn is_connected(self) -> bool {
        self == SessionHealth::Connected
    }
}

/// Errors of the registry API. Each says whether the registry changed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Nothing was registered.
    #[error(
        "invalid server id {0:?}: it must be a non-empty node name without '/' or control characters"
    )]
    InvalidServerId(String),
    /// Rejected at construction.
    #[error("invalid registry root {0:?}: it must be an absolute path like /cim/servers")]
    InvalidRoot(String),
    /// Another live session holds this id; nothing was registered.
    #[error("server {0} is already registered by another live session")]
    AlreadyRegistered(ServerId),
    /// The operation did not finish in time; it may or may not have taken effect.
    #[error("registry operation `{op}` timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// ZooKeeper refused or failed the operation.
    #[error("zookeeper `{op}` failed: {source}")]
    ZooKeeper {
        op: &'static str,
        #[source]
        source: zookeeper_client::Error,
    },
    /// A TLS handshake with an endpoint of the ensemble failed (found by probing it after a
    /// connect over TLS did not succeed: the client library only reports a timeout).
    #[error("zookeeper over TLS: {0}")]
    Tls(String),
    /// The registration has no session right now (it is being recreated). For
    /// [`Registration::update`]: the count is kept and published with the recreated entry; for
    /// [`Registration::set_listed`]: the wish is kept and applied on reconnect.
    #[error("the registration's session is not connected; the change is applied on reconnect")]
    NotConnected,
    /// The task serving this registration has stopped (the runtime is shutting down).
    #[error("the registration is no longer served")]
    Closed,
    /// Another backend's host (the simulation's registry host) could not be reached or
    /// answered nonsense.
    #[error("registry host `{op}` failed: {reason}")]
    Remote { op: &'static str, reason: String },
    #[error("encoding node data: {0}")]
    Encode(#[from] serde_json::Error),
}

/// A registry backend. The futures are `Send` so the shell can spawn them.
pub trait Registry: Send + Sync {
    /// Adds `server` to the registry for as long as the returned [`Registration`] lives.
    /// Fails with [`RegistryError::AlreadyRegistered`] when another live session holds the id.
    fn register(
        &self,
        server: LiveServer,
    ) -> impl Future<Output = Result<Registration, RegistryError>> + Send;

    /// A view of the live servers, current when this returns and kept current afterwards.
    fn watch(&self) -> impl Future<Output = Result<RegistryView, RegistryError>> + Send;
}

/// A boxed, sendable future borrowing the registry.
pub type RegistryFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// [`Registry`] as a trait object, for a backend this crate does not name
/// ([`AnyRegistry::Other`]: the simulation's registry host in tests). Every `Registry` is one.
pub trait DynRegistry: Send + Sync + std::fmt::Debug {
    fn register_boxed(
        &self,
        server: LiveServer,
    ) -> RegistryFuture<'_, Result<Registration, RegistryError>>;

    fn watch_boxed(&self) -> RegistryFuture<'_, Result<RegistryView, RegistryError>>;
}

impl<R: Registry + std::fmt::Debug> DynRegistry for R {
    fn register_boxed(
        &self,
        server: LiveServer,
    ) -> RegistryFuture<'_, Result<Registration, RegistryError>> {
        Box::pin(self.register(server))
    }

    fn watch_boxed(&self) -> RegistryFuture<'_, Result<RegistryView, RegistryError>> {
        Box::pin(self.watch())
    }
}

/// Any backend, chosen at run time (`cim up` vs `--zk`; `Other`: a backend from outside this
/// crate, such as the simulation's registry host over real sockets in the conformance suite).
#[derive(Debug, Clone)]
pub enum AnyRegistry {
    Memory(MemoryRegistry),
    Zk(ZkRegistry),
    Other(Arc<dyn DynRegistry>),
}

impl AnyRegistry {
    /// A backend this crate does not name, boxed.
    pub fn other(registry: impl Registry + std::fmt::Debug + 'static) -> Self {
        AnyRegistry::Other(Arc::new(registry))
    }
}

impl From<MemoryRegistry> for AnyRegistry {
    fn from(r: MemoryRegistry) -> Self {
        AnyRegistry::Memory(r)
    }
}

impl From<ZkRegistry> for AnyRegistry {
    fn from(r: ZkRegistry) -> Self {
        AnyRegistry::Zk(r)
    }
}

impl Registry for AnyRegistry {
    async fn register(&self, server: LiveServer) -> Result<Registration, RegistryError> {
        match self {
            AnyRegistry::Memory(r) => r.register(server).await,
            AnyRegistry::Zk(r) => r.register(server).await,
            AnyRegistry::Other(r) => r.register_boxed(server).await,
        }
    }

    async fn watch(&self) -> Result<RegistryView, RegistryError> {
        match self {
            AnyRegistry::Memory(r) => r.watch().await,
            AnyRegistry::Zk(r) => r.watch().await,
            AnyRegistry::Other(r) => r.watch_boxed().await,
        }
    }
}

/// A server's live entry in the registry; see the module docs for its guarantees.
#[derive(Debug)]
pub struct Registration {
    id: ServerId,
    health: watch::Receiver<SessionHealth>,
    sessions_lost: Arc<AtomicU64>,
    /// The latest listing wish; the backend reads it whenever it (re)applies the listing, so
    /// it survives reconnects and new sessions.
    listed: Arc<AtomicBool>,
    backend: RegistrationBackend,
}

#[derive(Debug)]
enum RegistrationBackend {
    Memory(memory::MemoryHandle),
    /// Served by a driver around core's `RegistryKeeper` (ZooKeeper, or a backend from
    /// outside this crate through [`Registration::from_keeper`]).
    Keeper(keeper::KeeperHandle),
}

impl Registration {
    /// The registration a keeper driver serves ([`keeper::Shell::new`] made `parts`).
    pub fn from_keeper(id: ServerId, parts: keeper::Parts) -> Self {
        Self {
            id,
            health: parts.health,
            sessions_lost: parts.sessions_lost,
            listed: parts.listed,
            backend: RegistrationBackend::Keeper(parts.handle),
        }
    }

    pub fn server_id(&self) -> &ServerId {
        &self.id
    }

    /// Session health, for fencing. Clones stay valid after the registration is dropped
    /// (they then keep the last value).
    pub fn health(&self) -> watch::Receiver<SessionHealth> {
        self.health.clone()
    }

    pub fn current_health(&self) -> SessionHealth {
        *self.health.borrow()
    }

    /// How many sessions this registration has lost (and replaced). It only grows.
    pub fn sessions_lost(&self) -> u64 {
        self.sessions_lost.load(Ordering::SeqCst)
    }

    /// Publishes the number of sessions this server holds. `Ok` once the registry has it
    /// (while unlisted: once it is stored; it is published when listed again). On `Err` the
    /// count is still kept and published when the session recovers or the entry is recreated.
    pub async fn update(&self, connections: u32) -> Result<(), RegistryError> {
        match &self.backend {
            RegistrationBackend::Memory(h) => h.update(connections),
            RegistrationBackend::Keeper(h) => h.update(connections).await,
        }
    }

    /// Whether routes should see this server. `false` deletes the entry but keeps the
    /// session (health stays `Connected`, `sessions_lost` does not move); `true` recreates it
    /// with the latest data. Idempotent. `Ok` once the registry has it; on `Err` (not
    /// connected, timeout) the wish is kept and applied when the session recovers or is
    /// re-established. A call cancelled midway also keeps its wish, applied by the next
    /// reconnect or `set_listed`.
    pub async fn set_listed(&self, listed: bool) -> Result<(), RegistryError> {
        match &self.backend {
            RegistrationBackend::Memory(h) => h.set_listed(&self.listed, listed),
            RegistrationBackend::Keeper(h) => {
                self.listed.store(listed, Ordering::SeqCst);
                h.set_listed().await
            }
        }
    }

    /// The latest wish given to [`set_listed`](Self::set_listed) (`true` at registration).
    pub fn is_listed(&self) -> bool {
        self.listed.load(Ordering::SeqCst)
    }

    /// Leaves the registry (the entry is deleted first, if this registration holds one), then closes the session. After an
    /// `Err` the session is closed anyway, which removes the entry once the ensemble notices.
    pub async fn deregister(self) -> Result<(), RegistryError> {
        match self.backend {
            RegistrationBackend::Memory(h) => {
                h.deregister();
                Ok(())
            }
            RegistrationBackend::Keeper(h) => h.deregister().await,
        }
    }
}

/// A route's view of the live servers.
#[derive(Debug, Clone)]
pub struct RegistryView {
    servers: watch::Receiver<ServerMap>,
    health: watch::Receiver<SessionHealth>,
}

impl RegistryView {
    /// A view fed by a backend's task: `servers` kept current, `health` its session's.
    pub fn new(
        servers: watch::Receiver<ServerMap>,
        health: watch::Receiver<SessionHealth>,
    ) -> Self {
        Self { servers, health }
    }

    /// The live servers; `changed()` wakes on every change. The ZooKeeper view stops updating
    /// once every receiver of it (views and clones) has been dropped.
    pub fn servers(&self) -> watch::Receiver<ServerMap> {
        self.servers.clone()
    }

    pub fn snapshot(&self) -> ServerMap {
        self.servers.borrow().clone()
    }

    /// Health of the view's own session: while not `Connected` the map may be stale.
    pub fn health(&self) -> watch::Receiver<SessionHealth> {
        self.health.clone()
    }

    /// Waits until the view satisfies `pred` and returns that map, or `Timeout` after
    /// `within`.
    pub async fn wait_until(
        &self,
        within: Duration,
        mut pred: impl FnMut(&ServerMap) -> bool,
    ) -> Result<ServerMap, RegistryError> {
        let mut rx = self.servers.clone();
        let waited = tokio::time::timeout(within, async {
            rx.wait_for(|m| pred(m)).await.map(|m| m.clone()).ok()
        })
        .await;
        match waited {
            Ok(Some(map)) => Ok(map),
            // The sender is gone, so the view can no longer change.
            Ok(None) => Err(RegistryError::Closed),
            Err(_) => Err(RegistryError::Timeout {
                op: "wait for view",
                after: within,
            }),
        }
    }
}

/// A server id becomes a ZooKeeper node name, so it must be one.
pub fn validate_server_id(id: &ServerId) -> Result<(), RegistryError> {
    let s = id.as_str();
    let bad = s.is_empty()
        || s == "."
        || s == ".."
        || s.len() > 255
        || s.chars().any(|c| c == '/' || c.is_control());
    if bad {
        Err(RegistryError::InvalidServerId(s.to_owned()))
    } else {
        Ok(())
    }
}

/// What a server node holds. Unknown fields are ignored, so a newer server may add some.
#[derive(Debug, Serialize, Deserialize)]
struct NodeData {
    id: String,
    host: String,
    client_port: u16,
    link_port: u16,
    http_port: u16,
    #[serde(default)]
    connections: u32,
    /// Absent in entries of servers older than TLS support: plaintext.
    #[serde(default)]
    client_tls: bool,
    /// Absent in entries of servers older than the WebSocket gateway, or with it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ws_port: Option<u16>,
}

pub fn encode_node(server: &LiveServer) -> Result<Vec<u8>, RegistryError> {
    let data = NodeData {
        id: server.id.as_str().to_owned(),
        host: server.host.clone(),
        client_port: server.client_port,
        link_port: server.link_port,
        http_port: server.http_port,
        connections: server.connections,
        client_tls: server.client_tls,
        ws_port: server.ws_port,
    };
    Ok(serde_json::to_vec(&data)?)
}

/// Decodes one node; a node that does not decode is logged and skipped, never fatal.
pub fn decode_node(name: &str, bytes: &[u8]) -> Option<LiveServer> {
    let data: NodeData = match serde_json::from_slice(bytes) {
        Ok(d) => d,
        Err(error) => {
            tracing::warn!(node = name, %error, "skipping registry node with undecodable data");
            return None;
        }
    };
    if data.id != name {
        tracing::warn!(node = name, id = %data.id, "skipping registry node whose id is not its name");
        return None;
    }
    if data.host.is_empty() {
        tracing::warn!(node = name, "skipping registry node without a host");
        return None;
    }
    Some(LiveServer {
        id: ServerId::new(data.id),
        host: data.host,
        client_port: data.client_port,
        link_port: data.link_port,
        http_port: data.http_port,
        connections: data.connections,
        client_tls: data.client_tls,
        ws_port: data.ws_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(id: &str) -> LiveServer {
        LiveServer {
            id: ServerId::new(id),
            host: "10.0.0.1".into(),
            client_port: 11211,
            link_port: 11311,
            http_port: 8081,
            connections: 7,
            client_tls: false,
            ws_port: Some(11411),
        }
    }

    #[test]
    fn node_data_round_trips() {
        let s = server("s1");
        let bytes = encode_node(&s).unwrap();
        assert_eq!(decode_node("s1", &bytes), Some(s));
    }

    #[test]
    fn an_entry_without_a_websocket_port_reads_and_writes_as_before() {
        // A server older than the WebSocket gateway, or one with it off.
        let old = br#"{"id":"s1","host":"h","client_port":1,"link_port":2,"http_port":3}"#;
        let server = decode_node("s1", old).expect("decodes");
        assert_eq!(server.ws_port, None);
        let written = String::from_utf8(encode_node(&server).unwrap()).unwrap();
        assert!(!written.contains("ws_port"), "{written}");
        let endpoint = serde_json::to_string(&server.client_endpoint()).unwrap();
        assert!(!endpoint.contains("wsUrl"), "{endpoint}");
    }

    #[test]
    fn bad_node_data_is_skipped() {
        let good = encode_node(&server("s1")).unwrap();
        let cases: &[(&str, &[u8])] = &[
            ("s1", b""),
            ("s1", b"\xff\xfe garbage"),
            ("s1", b"{\"id\":\"s1\"}"),
            ("s1", b"{\"id\":\"s1\",\"host\":\"h\",\"client_port\":70000,\"link_port\":1,\"http_port\":1}"),
            ("s1", b"{\"id\":\"s1\",\"host\":\"\",\"client_port\":1,\"link_port\":1,\"http_port\":1}"),
            ("s2", &good),
        ];
        for (name, bytes) in cases {
            assert_eq!(decode_node(name, bytes), None, "{name} {bytes:?}");
        }
    }

    #[test]
    fn unknown_fields_and_missing_connections_are_accepted() {
        let bytes = b"{\"id\":\"s1\",\"host\":\"h\",\"client_port\":1,\"link_port\":2,\"http_port\":3,\"zone\":\"a\"}";
        let s = decode_node("s1", bytes).unwrap();
        assert_eq!(
            (s.client_port, s.link_port, s.http_port, s.connections),
            (1, 2, 3, 0)
        );
    }

    #[test]
    fn server_ids_must_be_node_names() {
        for bad in ["", ".", "..", "a/b", "a\nb", &"x".repeat(256)] {
            assert!(validate_server_id(&ServerId::new(bad)).is_err(), "{bad:?}");
        }
        for good in ["s1", "server-01.example", "10.0.0.1:11211"] {
            assert!(validate_server_id(&ServerId::new(good)).is_ok(), "{good:?}");
        }
    }
}
