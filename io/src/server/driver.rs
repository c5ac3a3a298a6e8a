//! The driver task: the one owner of the [`ServerNode`]. It never awaits I/O: every socket,
//! store call and registry call runs in another task and reaches it as an [`Input`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cim_core::ids::{Epoch, UserId};
use cim_core::server::{ConnId, ServerNode, ServerOutput, ServerStats};
use cim_core::store::{RequestId, StoreRequest, StoreResult, StoreUnavailable};
use cim_proto::codec::FrameCodec;
use cim_proto::frame::Kind;
use cim_proto::{ErrorCode, Frame, Pong};
use tokio::io::WriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{LINK_QUEUE, ServerError, SessionEvent, SessionObserver, gateway, link};
use crate::clock::Clock;
use crate::net::{FrameWriter, Stream};
use crate::store::Store;
use crate::warn_gate::WarnGate;

/// Sessions as (user, epoch, connection), for the observer's comparisons.
type SessionSet = BTreeSet<(UserId, Epoch, ConnId)>;

/// The encoding buffer's allocations, and the room below which it takes a fresh one.
const ENCODE_CHUNK: usize = 4096;
const ENCODE_ROOM: usize = 256;

/// A route link, numbered by the link listener in accept order. Never reused.
pub(super) type LinkId = u64;

/// Everything the driver is told.
pub(super) enum Input<S> {
    /// A client socket was accepted.
    Accepted {
        stream: S,
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
    /// The registry session was lost: routes may hand this server's users to others.
    RegistryLost,
    /// Registered again under a new session after a loss: accept clients again.
    RegistryBack,
    /// The store has been unreachable past the grace period: fence every connection and
    /// refuse new ones, then answer, so the server can leave the registry with no session
    /// left that a route could hand to another server.
    StoreLost {
        fenced: oneshot::Sender<()>,
    },
    /// The store answers again: accept connections again (the server lists itself next).
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
    pub sessions: usize,
    pub links: usize,
    pub draining: bool,
    /// Out of the registry because the store is unreachable.
    pub withdrawn: bool,
    pub shell: ShellStats,
}

/// What the shell itself counts (the node counts the rest).
#[derive(Debug, Clone, Default)]
pub(super) struct ShellStats {
    pub link_auth_failures: u64,
    pub links_lost: u64,
    /// Route sends failed at once: no link up, or the link's queue full.
    pub route_sends_unrouted: u64,
    pub write_failures: u64,
    /// Clients that began a TLS handshake on this plaintext client port.
    pub tls_on_plaintext: u64,
    pub registry_sessions_lost: u64,
    /// Times the store stayed unreachable past the grace period (each one fenced everyone).
    pub store_losses: u64,
}

struct ConnEntry {
    /// Encoded frames for the connection's writer. Dropping it closes the connection once
    /// the writer has flushed what is queued.
    tx: mpsc::Sender<Bytes>,
}

struct LinkEntry {
    tx: mpsc::Sender<Frame>,
    token: CancellationToken,
    /// RouteSends written (or queued) on this link and not yet answered: request id -> user.
    in_flight: BTreeMap<u64, u64>,
}

pub(super) struct Driver<S> {
    node: ServerNode,
    clock: Clock,
    codec: FrameCodec,
    /// Client frames are encoded here, then split off as `Bytes`: frames encoded together
    /// share an allocation, and a push's Deliver is encoded once for all its recipients.
    encoded: BytesMut,
    store: Arc<dyn Store>,
    io_timeout: Duration,
    inputs: mpsc::Sender<Input<S>>,
    cancel: CancellationToken,
    /// Published for the registry task (the connection count it republishes).
    connections_gauge: Arc<AtomicU64>,
    next_conn: u64,
    conns: BTreeMap<ConnId, ConnEntry>,
    links: BTreeMap<LinkId, LinkEntry>,
    /// The link each user's RouteSends go over while any of them is unanswered, with how
    /// many are: a user's sends stay on one link (so they reach the route in order) until
    /// they are all answered or the link dies. With nothing in flight the next send picks a
    /// link afresh, spreading users over every route.
    user_links: BTreeMap<u64, (LinkId, usize)>,
    /// Writer tasks (connections and links) still running.
    live_writers: usize,
    /// The store is unreachable: every connection was fenced, new ones are refused, and the
    /// server is (being) taken out of the registry.
    withdrawn: bool,
    /// The registry session was lost and is not back: routes may already treat this server
    /// as dead and allow takeovers without asking it, so no session may start here.
    registry_lost: bool,
    drain_done: Option<oneshot::Sender<()>>,
    shell: ShellStats,
    /// The server's rate limit on repeated warnings.
    warnings: Arc<WarnGate>,
    /// Told of session changes; with it, the session list as last reported.
    observer: Option<(SessionObserver, SessionSet)>,
}

impl<S: Stream> Driver<S> {
    #[allow(clippy::too_many_arguments)] // one constructor call in `start`
    pub(super) fn new(
        node: ServerNode,
        clock: Clock,
        codec: FrameCodec,
        store: Arc<dyn Store>,
        io_timeout: Duration,
        inputs: mpsc::Sender<Input<S>>,
        cancel: CancellationToken,
        connections_gauge: Arc<AtomicU64>,
        observer: Option<SessionObserver>,
        warnings: Arc<WarnGate>,
    ) -> Self {
        Self {
            node,
            clock,
            codec,
            encoded: BytesMut::new(),
            store,
            io_timeout,
            inputs,
            cancel,
            connections_gauge,
            next_conn: 1,
            conns: BTreeMap::new(),
            links: BTreeMap::new(),
            user_links: BTreeMap::new(),
            live_writers: 0,
            withdrawn: false,
            registry_lost: false,
            drain_done: None,
            shell: ShellStats::default(),
            observer: observer.map(|o| (o, BTreeSet::new())),
            warnings,
        }
    }

    /// The loop: (biased) cancellation, the node's timer, a drain request, one input; then
    /// every output is acted on before waiting again.
    pub(super) async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input<S>>,
        mut begin_drain: mpsc::Receiver<oneshot::Sender<()>>,
        cancel: CancellationToken,
    ) -> Result<(), ServerError> {
        let mut drain_open = true;
        loop {
            let deadline = self.node.poll_timeout().map(|(at, _)| at);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                _ = self.clock.sleep_until(deadline.unwrap_or_else(|| self.clock.now())),
                    if deadline.is_some() =>
                {
                    self.node.handle_timeout(self.clock.now(), self.clock.wall());
                }
                request = begin_drain.recv(), if drain_open => match request {
                    Some(done) => self.begin_drain(done),
                    // The handle is gone; dropping it cancels everything anyway.
                    None => drain_open = false,
                },
                input = inputs.recv() => match input {
                    Some(input) => self.handle(input),
                    // Unreachable while the driver holds a sender itself.
                    None => return Err(ServerError::TaskStopped("driver inputs")),
                },
            }
            self.act();
            self.observe_sessions();
            self.connections_gauge
                .store(self.node.connections() as u64, Ordering::Relaxed);
            self.check_drained();
        }
    }

    fn handle(&mut self, input: Input<S>) {
        let now = self.clock.now();
        match input {
            Input::Accepted { stream, peer } => self.accepted(stream, peer),
            Input::Frame { conn, frame } => {
                if self.conns.contains_key(&conn) {
                    tracing::trace!(conn = conn.0, ?frame, "client frame");
                    self.node.handle_frame(now, self.clock.wall(), conn, frame);
                }
            }
            Input::ProtocolError { conn, code, detail } => {
                if self.conns.contains_key(&conn) {
                    tracing::debug!(conn = conn.0, %detail, "client sent undecodable bytes");
                    self.node.handle_protocol_error(now, conn, code, &detail);
                }
            }
            Input::TlsOnPlaintext { conn } => {
                if self.conns.remove(&conn).is_some() {
                    self.shell.tls_on_plaintext += 1;
                    crate::warn_limited!(
                        self.warnings,
                        "client tls on plaintext",
                        conn = conn.0,
                        "a client began a TLS handshake on this plaintext client port: it \
                         expects TLS (give this server --tls-cert and --tls-key) or was sent \
                         to the wrong port; closing"
                    );
                    self.node.handle_connection_closed(now, conn);
                }
            }
            Input::ConnClosed { conn, reason } => {
                if self.conns.remove(&conn).is_some() {
                    tracing::debug!(conn = conn.0, %reason, "client connection closed");
                    self.node.handle_connection_closed(now, conn);
                }
            }
            Input::Written { conn, frames } => self.node.handle_written(conn, frames),
            Input::WriteFailed { conn, reason } => {
                if self.conns.remove(&conn).is_some() {
                    self.shell.write_failures += 1;
                    tracing::debug!(conn = conn.0, %reason, "client write failed; closing");
                    self.node.handle_connection_closed(now, conn);
                }
            }
            Input::WriterDone => self.live_writers = self.live_writers.saturating_sub(1),
            Input::StoreReply { id, result } => self.node.handle_store_reply(now, id, result),
            Input::LinkUp {
                link,
                route_id,
                peer,
                writer,
                token,
            } => self.link_up(link, route_id, peer, writer, token),
            Input::LinkFrame { link, frame } => self.link_frame(link, frame),
            Input::LinkDown { link, reason } => self.link_down(link, &reason),
            Input::LinkAuthFailed => self.shell.link_auth_failures += 1,
            Input::RegistryLost => {
                self.shell.registry_sessions_lost += 1;
                tracing::warn!(
                    server = %self.node.config().server_id,
                    "registry session lost: fencing every connection"
                );
                self.registry_lost = true;
                self.node.handle_registry_session_lost(now);
            }
            Input::RegistryBack => {
                tracing::info!(
                    server = %self.node.config().server_id,
                    "registered again: accepting clients"
                );
                self.registry_lost = false;
            }
            Input::StoreLost { fenced } => {
                self.shell.store_losses += 1;
                self.withdrawn = true;
                tracing::warn!(
                    server = %self.node.config().server_id,
                    "store unreachable: fencing every connection and leaving the registry"
                );
                self.node.handle_registry_session_lost(now);
                // The kicks are queued by `act` after this input; the answer only has to
                // follow the node's decision, which is already made.
                let _ = fenced.send(());
            }
            Input::StoreBack => {
                if self.withdrawn {
                    tracing::info!(
                        server = %self.node.config().server_id,
                        "store reachable again: accepting clients and rejoining the registry"
                    );
                }
                self.withdrawn = false;
            }
            Input::Snapshot { reply } => {
                let _ = reply.send(Snapshot {
                    stats: self.node.stats().clone(),
                    connections: self.node.connections(),
                    sessions: self.node.sessions(),
                    links: self.links.len(),
                    draining: self.node.is_draining(),
                    withdrawn: self.withdrawn || self.registry_lost,
                    shell: self.shell.clone(),
                });
            }
        }
    }

    /// Carries out every queued output, in order (an output may queue more: a failed route
    /// send answers the client at once).
    fn act(&mut self) {
        while let Some(output) = self.node.poll_output() {
            match output {
                ServerOutput::Transmit { conn, frame } => {
                    if let Some(bytes) = self.encode(&frame, &[conn]) {
                        self.transmit(conn, bytes);
                    }
                }
                ServerOutput::TransmitToMany { conns, frame } => {
                    if let Some(bytes) = self.encode(&frame, &conns) {
                        for conn in conns {
                            self.transmit(conn, bytes.clone());
                        }
                    }
                }
                ServerOutput::Close { conn } => {
                    // Dropping the queue's sender lets the writer flush the final Kick/Error,
                    // then close. The node has already forgotten the connection.
                    if self.conns.remove(&conn).is_some() {
                        tracing::debug!(conn = conn.0, "closing client connection");
                    }
                }
                ServerOutput::Store(request) => self.spawn_store(request),
                ServerOutput::ToRoute(send) => self.route_send(send),
            }
        }
    }

    /// Reports the sessions opened and closed since the last call (only with an observer:
    /// the comparison walks every session).
    fn observe_sessions(&mut self) {
        let Some((observer, reported)) = &mut self.observer else {
            return;
        };
        let now: SessionSet = self.node.session_list().into_iter().collect();
        if now == *reported {
            return;
        }
        for &(user, epoch, conn) in reported.difference(&now) {
            (observer.0)(SessionEvent::Closed { user, epoch, conn });
        }
        for &(user, epoch, conn) in now.difference(reported) {
            (observer.0)(SessionEvent::Opened { user, epoch, conn });
        }
        *reported = now;
    }

    fn accepted(&mut self, stream: S, peer: SocketAddr) {
        if self.withdrawn || self.registry_lost {
            // Out of the registry (or about to be): a session bound now could outlive a
            // takeover the routes allow because this server is absent, and the fence that
            // protects sessions has already fired.
            tracing::debug!(%peer, "refused client connection: store or registry session lost");
            return;
        }
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        if let Err(refused) = self.node.handle_connection_opened(self.clock.now(), conn) {
            // Dropping the stream closes it.
            tracing::debug!(%peer, %refused, "refused client connection");
            return;
        }
        // The node kicks a connection whose unwritten backlog reaches its limit, so the queue
        // never holds more than that plus the final frame; the slack is for safety only.
        let capacity = self.node.config().max_outbound_frames + 8;
        let (tx, rx) = mpsc::channel(capacity);
        gateway::spawn_connection(
            conn,
            stream,
            self.codec,
            rx,
            self.inputs.clone(),
            self.io_timeout,
            self.cancel.clone(),
        );
        self.live_writers += 1;
        self.conns.insert(conn, ConnEntry { tx });
        tracing::debug!(conn = conn.0, %peer, "client connected");
    }

    /// One frame's bytes on the wire. A frame that does not encode (over the maximum frame
    /// size) cannot be sent to `conns`, which then could miss what it carries: they are
    /// closed, as a failed write would close them, and their clients resync on reconnect.
    fn encode(&mut self, frame: &Frame, conns: &[ConnId]) -> Option<Bytes> {
        // Chunks of ENCODE_CHUNK, so small frames share allocations; a chunk is freed once
        // every frame split from it has been written. (A frame larger than the room left
        // gets an allocation of its own from `encode`.)
        if self.encoded.capacity() < ENCODE_ROOM {
            self.encoded.reserve(ENCODE_CHUNK);
        }
        match self.codec.encode(frame, &mut self.encoded) {
            Ok(()) => Some(self.encoded.split().freeze()),
            Err(error) => {
                self.encoded.clear();
                let now = self.clock.now();
                for conn in conns {
                    if self.conns.remove(conn).is_some() {
                        self.shell.write_failures += 1;
                        tracing::warn!(conn = conn.0, %error, "frame to client does not encode; closing");
                        self.node.handle_connection_closed(now, *conn);
                    }
                }
                None
            }
        }
    }

    fn transmit(&mut self, conn: ConnId, frame: Bytes) {
        let Some(entry) = self.conns.get(&conn) else {
            return;
        };
        if let Err(error) = entry.tx.try_send(frame) {
            // Full cannot happen while the node enforces its backlog limit; Closed means the
            // writer already stopped (its WriteFailed may still be queued). Either way the
            // connection cannot carry this frame: close it.
            tracing::debug!(conn = conn.0, %error, "client queue refused a frame; closing");
            self.conns.remove(&conn);
            self.node.handle_connection_closed(self.clock.now(), conn);
        }
    }

    fn spawn_store(&self, request: StoreRequest) {
        let StoreRequest { id, command } = request;
        let store = self.store.clone();
        let inputs = self.inputs.clone();
        let cancel = self.cancel.clone();
        let wall = self.clock.wall();
        // The node times the request out itself; this bound only stops a hung backend call
        // from living forever.
        let bound = self.node.config().store_timeout + self.io_timeout;
        tokio::spawn(async move {
            let call = tokio::time::timeout(bound, store.execute(wall, command));
            let result = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                result = call => result.unwrap_or_else(|_| {
                    Err(StoreUnavailable(format!("no reply within {bound:?}")))
                }),
            };
            let _ = inputs.send(Input::StoreReply { id, result }).await;
        });
    }

    // ---- route links -------------------------------------------------------------------

    fn link_up(
        &mut self,
        link: LinkId,
        route_id: String,
        peer: SocketAddr,
        writer: FrameWriter<WriteHalf<S>>,
        token: CancellationToken,
    ) {
        if self.node.is_draining() {
            // A draining server takes no new links; the route learns from the close.
            token.cancel();
            return;
        }
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        link::spawn_writer(
            link,
            writer,
            rx,
            self.inputs.clone(),
            self.io_timeout,
            token.clone(),
        );
        self.live_writers += 1;
        self.links.insert(
            link,
            LinkEntry {
                tx,
                token,
                in_flight: BTreeMap::new(),
            },
        );
        tracing::info!(link, %route_id, %peer, links = self.links.len(), "route link up");
    }

    fn link_frame(&mut self, link: LinkId, frame: Frame) {
        if !self.links.contains_key(&link) {
            return;
        }
        let now = self.clock.now();
        match frame.kind {
            Some(Kind::PushBatch(batch)) => self.node.handle_push(now, batch),
            Some(Kind::KickUser(kick)) => {
                let done = self.node.handle_kick_user(now, kick);
                // The answer follows the kick's own outputs (its Kick frames and closes).
                self.act();
                self.send_on_link(
                    link,
                    Frame {
                        kind: Some(Kind::KickUserDone(done)),
                    },
                );
            }
            Some(Kind::RouteSendResult(result)) => {
                let user = self
                    .links
                    .get_mut(&link)
                    .and_then(|entry| entry.in_flight.remove(&result.request_id));
                if let Some(user) = user {
                    self.answered(user);
                }
                self.node.handle_route_result(now, result);
            }
            Some(Kind::Ping(ping)) => {
                let pong = Frame {
                    kind: Some(Kind::Pong(Pong { nonce: ping.nonce })),
                };
                self.send_on_link(link, pong);
            }
            // The link task only forwards the kinds above.
            other => {
                tracing::warn!(link, frame = ?other, "unexpected frame on a route link");
                self.link_down(link, "unexpected frame");
            }
        }
    }

    fn send_on_link(&mut self, link: LinkId, frame: Frame) {
        let Some(entry) = self.links.get(&link) else {
            return;
        };
        if let Err(error) = entry.tx.try_send(frame) {
            // A route that does not read its link for LINK_QUEUE frames is as good as gone.
            let reason = format!("link queue refused a frame: {error}");
            self.link_down(link, &reason);
        }
    }

    /// The link for `user`'s next send: the one its unanswered sends are on, or else one
    /// picked by user id among the links up (so users spread over routes).
    fn link_for(&self, user: u64) -> Option<LinkId> {
        if let Some((link, _)) = self.user_links.get(&user) {
            return Some(*link);
        }
        let n = self.links.len() as u64;
        if n == 0 {
            return None;
        }
        // A multiplicative hash: consecutive user ids land on different links.
        let index = user.wrapping_mul(0x9E37_79B9_7F4A_7C15) % n;
        self.links.keys().nth(index as usize).copied()
    }

    /// One of `user`'s sends was answered (or failed).
    fn answered(&mut self, user: u64) {
        if let Some((_, in_flight)) = self.user_links.get_mut(&user) {
            *in_flight = in_flight.saturating_sub(1);
            if *in_flight == 0 {
                self.user_links.remove(&user);
            }
        }
    }

    fn route_send(&mut self, send: cim_proto::RouteSend) {
        let request_id = send.request_id;
        let user = send.user_id;
        let mut frame = Frame {
            kind: Some(Kind::RouteSend(send)),
        };
        loop {
            let Some(link) = self.link_for(user) else {
                self.shell.route_sends_unrouted += 1;
                tracing::debug!(request_id, "no route link up; failing the send");
                self.node.handle_route_failed(self.clock.now(), request_id);
                return;
            };
            let Some(entry) = self.links.get_mut(&link) else {
                return; // just chosen from `links`
            };
            match entry.tx.try_send(frame) {
                Ok(()) => {
                    entry.in_flight.insert(request_id, user);
                    self.user_links.entry(user).or_insert((link, 0)).1 += 1;
                    return;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Failing this one send (retryable) is backpressure; switching links
                    // here would let later sends overtake the ones queued on this link.
                    self.shell.route_sends_unrouted += 1;
                    tracing::warn!(link, request_id, "route link queue full; failing the send");
                    self.node.handle_route_failed(self.clock.now(), request_id);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    // The writer died: the link is down; try the next one.
                    frame = back;
                    self.link_down(link, "link writer stopped");
                }
            }
        }
    }

    fn link_down(&mut self, link: LinkId, reason: &str) {
        let Some(entry) = self.links.remove(&link) else {
            return;
        };
        entry.token.cancel();
        self.shell.links_lost += 1;
        // Every unanswered send on it fails below; its users pick a live link next time.
        self.user_links.retain(|_, (l, _)| *l != link);
        tracing::warn!(
            link, %reason, in_flight = entry.in_flight.len(), links = self.links.len(),
            "route link down"
        );
        let now = self.clock.now();
        for request_id in entry.in_flight.into_keys() {
            self.node.handle_route_failed(now, request_id);
        }
    }

    // ---- drain -------------------------------------------------------------------------

    fn begin_drain(&mut self, done: oneshot::Sender<()>) {
        tracing::info!(
            server = %self.node.config().server_id,
            connections = self.node.connections(),
            "kicking every client (draining)"
        );
        self.node.begin_drain(self.clock.now());
        self.act();
        // Dropping each link's queue lets its writer flush and close. Sends still in flight
        // belong to connections the node has just forgotten.
        self.links.clear();
        self.user_links.clear();
        self.drain_done = Some(done);
    }

    fn check_drained(&mut self) {
        if self.live_writers == 0
            && let Some(done) = self.drain_done.take()
        {
            let _ = done.send(());
        }
    }
}
