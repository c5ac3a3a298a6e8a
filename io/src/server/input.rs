//! What the server's tasks tell its driver: the one message type of the driver's queue,
//! here so that the tasks (gateway, links, registration, the store watch, /metrics) and the
//! driver all depend on it rather than on each other.

use std::net::SocketAddr;

use cim_core::server::{ConnId, ServerStats};
use cim_core::store::{RequestId, StoreResult};
use cim_proto::{ErrorCode, Frame};
use tokio::io::WriteHalf;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::net::FrameWriter;

/// A route link, numbered by the link listener in accept order. Never reused. The node knows
/// it as `RouteLinkId(link)`.
pub(super) type LinkId = u64;

/// An accepted client connection, by how it carries frames. The driver treats both alike
/// except for spawning their tasks and counting them apart.
pub(super) enum ClientConn<S> {
    /// The TCP gateway: varint length-prefixed frames.
    Tcp(S),
    /// The WebSocket gateway, past its upgrade: one binary message per frame. Boxed: the
    /// WebSocket state is some hundreds of bytes, and every input is sized for the largest.
    Ws(Box<super::ws::WsConn<S>>),
}

impl<S> ClientConn<S> {
    pub(super) fn transport(&self) -> &'static str {
        match self {
            Self::Tcp(_) => "tcp",
            Self::Ws(_) => "websocket",
        }
    }
}

/// Everything the driver is told.
pub(super) enum Input<S> {
    /// A client socket was accepted (and, on the WebSocket port, upgraded).
    Accepted {
        stream: ClientConn<S>,
        peer: SocketAddr,
    },
    /// A decoded frame from a client.
    Frame {
        conn: ConnId,
        frame: Frame,
    },
    /// A client's bytes did not decode.
    ProtocolError {
        conn: ConnId,
        code: ErrorCode,
        detail: String,
    },
    /// A client began a TLS handshake on this plaintext gateway: closed without an Error
    /// frame (it could not read one), with a warning that names the misconfiguration.
    TlsOnPlaintext {
        conn: ConnId,
    },
    /// A client's read side ended (EOF, reset, or a read error).
    ConnClosed {
        conn: ConnId,
        reason: String,
    },
    /// The socket took this many of the connection's frames.
    Written {
        conn: ConnId,
        frames: usize,
    },
    /// Writing to a client failed or timed out; the writer has stopped.
    WriteFailed {
        conn: ConnId,
        reason: String,
    },
    /// A connection or link writer task ended (a drain waits for all of them).
    WriterDone,
    StoreReply {
        id: RequestId,
        result: StoreResult,
    },
    /// A route link authenticated; the driver spawns its writer.
    LinkUp {
        link: LinkId,
        route_id: String,
        peer: SocketAddr,
        writer: FrameWriter<WriteHalf<S>>,
        token: CancellationToken,
    },
    /// A frame from an authenticated link (PushBatch, KickUser, RouteSendResult, Ping).
    LinkFrame {
        link: LinkId,
        frame: Frame,
    },
    /// A link failed, timed out, or broke the protocol.
    LinkDown {
        link: LinkId,
        reason: String,
    },
    /// A dialled link did not authenticate (counted for metrics).
    LinkAuthFailed,
    /// The registry session was lost: routes may hand this server's users to others (the
    /// node fences everyone and refuses clients until `RegistryBack`).
    RegistryLost,
    /// Registered again under a new session after a loss.
    RegistryBack,
    /// The store has been unreachable past the grace period: the node fences every
    /// connection and refuses new ones; then this answers, so the server can leave the
    /// registry with no session left that a route could hand to another server.
    StoreLost {
        fenced: oneshot::Sender<()>,
    },
    /// The store answers again (the server lists itself next).
    StoreBack,
    /// What /health and /metrics show.
    Snapshot {
        reply: oneshot::Sender<Snapshot>,
    },
}

/// The node's counters and gauges at one moment, plus the shell's own counters.
#[derive(Debug, Clone)]
pub(super) struct Snapshot {
    pub stats: ServerStats,
    pub connections: usize,
    /// Of `connections`, those open through the WebSocket gateway.
    pub ws_connections: usize,
    pub sessions: usize,
    pub links: usize,
    pub draining: bool,
    /// Out of the registry (or on the way out): the store or the registry session is lost.
    pub withdrawn: bool,
    pub shell: ShellStats,
}

/// What the shell itself counts (the node counts the rest).
#[derive(Debug, Clone, Default)]
pub(super) struct ShellStats {
    pub link_auth_failures: u64,
    pub links_lost: u64,
    pub write_failures: u64,
    /// Clients that began a TLS handshake on this plaintext client port.
    pub tls_on_plaintext: u64,
    pub registry_sessions_lost: u64,
    /// Times the store stayed unreachable past the grace period (each one fenced everyone).
    pub store_losses: u64,
}
