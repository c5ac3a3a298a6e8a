//! The client SDK: one user's chat session over the real (or simulated) network, embedding
//! the sans-IO [`ClientSession`](cim_core::client::ClientSession) (login, reconnect with
//! backoff, heartbeat, outbox with resends, in-order exactly-once delivery, sync).
//!
//! ```text
//!  app ──Client::send/submit/snapshot/shutdown──►┐
//!                                                 │ commands (mpsc)
//!  route /login task ──answer──►┐                 ▼
//!  connection task ──frames────►├─ inputs ──► driver task (owns ClientSession)
//!  (connect, reader, writer)    ┘                 │
//!                                                 ├──► Events (ClientEvent stream)
//!                                                 └──► send() futures, by message id
//! ```
//!
//! [`Client::start`] spawns the driver. The driver executes the session's commands: a
//! `Login` becomes a spawned `POST /login` ([`RouteApi`]); a `Connect` a spawned connection
//! task tagged with a generation number, so whatever an abandoned connection still reports
//! is dropped (the session wants to hear nothing more after `Disconnect`; its reader hands
//! on every whole frame one read brought as one input, and the driver takes what is queued
//! in one turn, so a burst of pushes costs one queue hop and one drain); a `Transmit` goes
//! to the connection's bounded writer queue (a full queue means the link cannot keep up and
//! counts as a lost connection). All time comes from the [`Clock`], so the SDK runs
//! unchanged inside a turmoil simulation (over `cim_sim_hosts::TurmoilNet`).
//!
//! **Seeds**: the session's RNG draws message ids, the first login's resume token (which
//! proves a lost login answer was this client's) and backoff jitter. [`SdkOptions::new`]
//! seeds it with 256 bits of the OS's entropy ([`SdkOptions::entropy`]); with `entropy:
//! None` it is seeded from [`SdkOptions::session`]`.seed`, 64 bits, which is for
//! simulations and tests that replay a seed (message ids must never repeat across runs of
//! one user, and 64 bits are too few for a secret).

mod driver;
mod route_addr;
pub mod route_api;
pub mod state_file;
mod ws_conn;

use bytes::Bytes;
use cim_core::client::{ClientConfig, ClientEvent, ClientState, ClientStats, ErrorCode};
use cim_core::ids::{ClientMsgId, ConvId, LogEpoch};
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::Clock;
use crate::net::Network;
use crate::tls::ClientTls;

pub use route_addr::RouteAddr;
pub use route_api::{ApiError, RouteApi};

/// Everything [`Client::start`] needs besides the network and the clock.
#[derive(Debug, Clone)]
pub struct SdkOptions {
    /// The route's HTTP API.
    pub route_host: String,
    pub route_port: u16,
    /// TLS to the route and the servers; `None` is a plaintext-only client (a server that
    /// expects TLS is then unreachable, never spoken to in plaintext).
    pub tls: Option<SdkTls>,
    /// User, name, password, timers and seed. `login_timeout` also bounds each HTTP call of
    /// [`Client::route_api`].
    pub session: ClientConfig,
    /// What an earlier run saved with [`Client::snapshot`] (resume token, outbox, cursors).
    pub state: Option<ClientState>,
    /// Largest frame read or written (the server's limit, 64 KiB by default).
    pub max_frame: usize,
    /// How this client reaches the server the route names: its TCP gateway (the default)
    /// or its WebSocket gateway, as a browser does.
    pub server_transport: ServerTransport,
    /// 256 bits the session's RNG is seeded with ([`crate::launch::os_entropy`] by
    /// [`SdkOptions::new`]); `None` seeds it from `session.seed` instead, for a simulation
    /// that must replay.
    pub entropy: Option<[u8; 32]>,
}

/// Which of a server's gateways the SDK connects to. Both carry the same frames to the same
/// server machine; the WebSocket one is for browsers, and the SDK can use it to test and
/// benchmark that path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ServerTransport {
    /// The server's TCP gateway: length-prefixed frames (`endpoint.host:port`).
    #[default]
    Tcp,
    /// The server's WebSocket gateway (`endpoint.wsUrl`): one binary message per frame. A
    /// server without one is unreachable to this client, never silently reached over TCP.
    WebSocket,
}

impl SdkOptions {
    /// Options with the session's defaults and the default frame limit.
    pub fn new(route_host: impl Into<String>, route_port: u16, session: ClientConfig) -> Self {
        Self {
            route_host: route_host.into(),
            route_port,
            tls: None,
            session,
            state: None,
            max_frame: cim_proto::codec::FrameCodec::default().max_frame(),
            server_transport: ServerTransport::Tcp,
            entropy: Some(crate::launch::os_entropy()),
        }
    }
}

/// How the SDK uses TLS.
#[derive(Debug, Clone)]
pub struct SdkTls {
    /// Trust roots and hostname checks, for the route's HTTPS and for TLS servers.
    pub client: ClientTls,
    /// The route is reached over HTTPS. Then every server must speak TLS too: a login
    /// answer naming a plaintext server is refused rather than followed.
    pub route_https: bool,
}

/// A message stored under `(log_epoch, seq)` in `conv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    pub msg_id: ClientMsgId,
    pub conv: ConvId,
    pub log_epoch: LogEpoch,
    pub seq: u64,
}

/// Why [`Client::send`] did not end in an acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The server refused it for good (not a member, too large, ...); it is not resent.
    #[error("message {msg_id} rejected ({code:?}): {reason}")]
    Rejected {
        msg_id: ClientMsgId,
        code: ErrorCode,
        reason: String,
    },
    /// No acknowledgement within the outbox's maximum age: it may or may not be stored, and
    /// it is no longer resent.
    #[error("message {msg_id} unacknowledged for too long: it may or may not be stored")]
    Unknown { msg_id: ClientMsgId },
    /// The session stopped (shutdown, taken over, ...) or the driver is gone before an
    /// answer came. A message the session had queued stays in its outbox: it is part of
    /// [`Client::snapshot`] and a later run resends it.
    #[error("the client session stopped before the message was acknowledged")]
    Stopped,
}

/// The driver is gone (shut down, or its task ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the client has stopped")]
pub struct SdkStopped;

pub(crate) enum AppCommand {
    Send {
        conv: ConvId,
        body: Bytes,
        reply: oneshot::Sender<Result<Acked, SendError>>,
    },
    Submit {
        conv: ConvId,
        body: Bytes,
        reply: oneshot::Sender<Result<ClientMsgId, SendError>>,
    },
    Snapshot {
        reply: oneshot::Sender<ClientState>,
    },
    Stats {
        reply: oneshot::Sender<ClientStats>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// How many application commands may wait for the driver before `send` waits too.
const COMMAND_QUEUE: usize = 1024;

/// A handle to one running client session. Cheap to clone; every clone drives the same
/// session. When the last handle is dropped the driver shuts the session down.
#[derive(Debug, Clone)]
pub struct Client<N> {
    commands: mpsc::Sender<AppCommand>,
    token: watch::Receiver<Option<String>>,
    route: RouteApi<N>,
}

impl std::fmt::Debug for AppCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Send { .. } => "Send",
            Self::Submit { .. } => "Submit",
            Self::Snapshot { .. } => "Snapshot",
            Self::Stats { .. } => "Stats",
            Self::Shutdown { .. } => "Shutdown",
        })
    }
}

/// The application's stream of [`ClientEvent`]s, in the order the session produced them.
/// Unbounded: an application that stops reading only costs memory, never stalls the
/// session's heartbeat. Ends (`None`) once the driver is gone.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::UnboundedReceiver<ClientEvent>,
}

impl Events {
    pub async fn next(&mut self) -> Option<ClientEvent> {
        self.rx.recv().await
    }

    /// The next event if one is waiting.
    pub fn try_next(&mut self) -> Option<ClientEvent> {
        self.rx.try_recv().ok()
    }
}

impl<N: Network> Client<N> {
    /// Spawns the driver on the current tokio runtime and starts logging in.
    pub fn start(net: N, clock: Clock, options: SdkOptions) -> (Client<N>, Events) {
        let mut route = RouteApi::new(
            net.clone(),
            options.route_host.clone(),
            options.route_port,
            options.session.login_timeout,
        );
        if let Some(tls) = options.tls.as_ref().filter(|tls| tls.route_https) {
            route = route.with_tls(tls.client.clone());
        }
        let (commands, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (token_tx, token) = watch::channel(None);
        let driver = driver::Driver::new(
            net,
            clock,
            options,
            route.clone(),
            commands_rx,
            events_tx,
            token_tx,
        );
        tokio::spawn(driver.run());
        (
            Client {
                commands,
                token,
                route,
            },
            Events { rx: events_rx },
        )
    }

    /// Sends a message and waits for its fate: stored (`Ok`), rejected, unknown, or the
    /// session stopped. Survives reconnects: an unacknowledged message is resent with the
    /// same id on the next connection, and this resolves on its acknowledgement.
    pub async fn send(&self, conv: ConvId, body: Bytes) -> Result<Acked, SendError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(AppCommand::Send { conv, body, reply })
            .await
            .map_err(|_| SendError::Stopped)?;
        answer.await.unwrap_or(Err(SendError::Stopped))
    }

    /// Queues a message and returns its id at once; its fate arrives as an `Acked`,
    /// `Rejected` or `Unknown` event.
    pub async fn submit(&self, conv: ConvId, body: Bytes) -> Result<ClientMsgId, SendError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(AppCommand::Submit { conv, body, reply })
            .await
            .map_err(|_| SendError::Stopped)?;
        answer.await.unwrap_or(Err(SendError::Stopped))
    }

    /// What to persist (see [`state_file`]): resume token, outbox, positions.
    pub async fn snapshot(&self) -> Result<ClientState, SdkStopped> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(AppCommand::Snapshot { reply })
            .await
            .map_err(|_| SdkStopped)?;
        answer.await.map_err(|_| SdkStopped)
    }

    /// Counts of what the session recovered from (gaps fetched, ...).
    pub async fn stats(&self) -> Result<ClientStats, SdkStopped> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(AppCommand::Stats { reply })
            .await
            .map_err(|_| SdkStopped)?;
        answer.await.map_err(|_| SdkStopped)
    }

    /// The bearer token of the latest successful login, for [`Client::route_api`] calls.
    pub fn token(&self) -> Option<String> {
        self.token.borrow().clone()
    }

    /// The route's HTTP API at the address this client logs in through.
    pub fn route_api(&self) -> RouteApi<N> {
        self.route.clone()
    }

    /// Stops the session (pending DeliverAcks are flushed), closes the connection and ends
    /// the driver. Pending `send` futures fail with [`SendError::Stopped`]; take a
    /// [`snapshot`](Self::snapshot) first to keep the outbox.
    pub async fn shutdown(self) {
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(AppCommand::Shutdown { reply })
            .await
            .is_ok()
        {
            let _ = answer.await;
        }
    }
}

/// A seed from the OS's entropy, for [`ClientConfig::seed`] in a real client.
pub fn os_seed() -> u64 {
    rand_chacha::ChaCha8Rng::from_os_rng().random()
}
