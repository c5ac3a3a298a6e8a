//! The driver task: the one owner of the [`ServerNode`]. It never awaits I/O: every socket,
//! store call and registry call runs in another task and reaches it as an [`Input`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cim_core::ids::{Epoch, UserId};
use cim_core::server::{ConnId, RouteLinkId, ServerNode, ServerOutput};
use cim_core::store::{StoreRequest, StoreUnavailable};
use cim_proto::codec::FrameCodec;
use cim_proto::frame::Kind;
use cim_proto::{Frame, Pong};
use tokio::io::WriteHalf;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::input::{ClientConn, Input, LinkId, ShellStats, Snapshot};
use super::{LINK_QUEUE, ServerError, SessionEvent, SessionObserver, gateway, link, ws};
use crate::clock::Clock;
use crate::net::{FrameWriter, Stream};
use crate::store::Store;
use crate::warn_gate::WarnGate;

/// Sessions as (user, epoch, connection), for the observer's comparisons.
type SessionSet = BTreeSet<(UserId, Epoch, ConnId)>;

/// The encoding buffer's allocations, and the room below which it takes a fresh one.
const ENCODE_CHUNK: usize = 4096;
const ENCODE_ROOM: usize = 256;

struct ConnEntry {
    /// Encoded frames for the connection's writer. Dropping it closes the connection once
    /// the writer has flushed what is queued.
    tx: mpsc::Sender<Bytes>,
    /// Came through the WebSocket gateway (counted apart on /metrics).
    websocket: bool,
}

struct LinkEntry {
    tx: mpsc::Sender<Frame>,
    token: CancellationToken,
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
    /// The links up, as the node knows them too (it picks the link of every send).
    links: BTreeMap<LinkId, LinkEntry>,
    /// Writer tasks (connections and links) still running.
    live_writers: usize,
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
            live_writers: 0,
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
            let timer = self.node.poll_timeout();
            let deadline = timer.map(|(at, _)| at);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(()),
                _ = self.clock.sleep_until(deadline.unwrap_or_else(|| self.clock.now())),
                    if deadline.is_some() =>
                {
                    // Which timer woke the node, for tracing a stall or a busy loop.
                    if let Some((_, reason)) = timer {
                        tracing::trace!(?reason, "server timer");
                    }
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
                self.node.handle_registry_session_lost(now);
            }
            Input::RegistryBack => {
                tracing::info!(
                    server = %self.node.config().server_id,
                    "registered again: accepting clients"
                );
                self.node.handle_registered(now);
            }
            Input::StoreLost { fenced } => {
                self.shell.store_losses += 1;
                tracing::warn!(
                    server = %self.node.config().server_id,
                    "store unreachable: fencing every connection and leaving the registry"
                );
                self.node.handle_store_lost(now);
                // The kicks are queued by `act` after this input; the answer only has to
                // follow the node's decision, which is already made.
                let _ = fenced.send(());
            }
            Input::StoreBack => {
                // Sent only after a StoreLost.
                tracing::info!(
                    server = %self.node.config().server_id,
                    "store reachable again: accepting clients and rejoining the registry"
                );
                self.node.handle_store_back(now);
            }
            Input::Snapshot { reply } => {
                let _ = reply.send(Snapshot {
                    stats: self.node.stats().clone(),
                    connections: self.node.connections(),
                    // A walk over the connections, once per scrape.
                    ws_connections: self.conns.values().filter(|c| c.websocket).count(),
                    sessions: self.node.sessions(),
                    links: self.links.len(),
                    draining: self.node.is_draining(),
                    withdrawn: self.node.is_withdrawn(),
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
                ServerOutput::ToRoute { link, send } => self.route_send(link, send),
                ServerOutput::KickUserDone { link, done } => {
                    let frame = Frame {
                        kind: Some(Kind::KickUserDone(done)),
                    };
                    self.send_on_link(link.0, frame);
                }
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

    fn accepted(&mut self, stream: ClientConn<S>, peer: SocketAddr) {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let transport = stream.transport();
        if let Err(refused) = self.node.handle_connection_opened(self.clock.now(), conn) {
            tracing::debug!(%peer, transport, %refused, "refused client connection");
            match stream {
                // A browser reports a WebSocket dropped without a close as 1006, which says
                // nothing: it is told to try again (elsewhere, through the route) instead.
                ClientConn::Ws(stream) => {
                    tokio::spawn(ws::close_refused(
                        *stream,
                        refused.to_string(),
                        self.io_timeout,
                    ));
                }
                // Dropping the stream closes it.
                ClientConn::Tcp(_) => {}
            }
            return;
        }
        // The node kicks a connection whose unwritten backlog reaches its limit, so the queue
        // never holds more than that plus the final frame; the slack is for safety only.
        let capacity = self.node.config().max_outbound_frames + 8;
        let (tx, rx) = mpsc::channel(capacity);
        let websocket = matches!(stream, ClientConn::Ws(_));
        match stream {
            ClientConn::Tcp(stream) => gateway::spawn_connection(
                conn,
                stream,
                self.codec,
                rx,
                self.inputs.clone(),
                self.io_timeout,
                self.cancel.clone(),
            ),
            ClientConn::Ws(stream) => {
                let (reader, writer) = ws::split(*stream, self.codec);
                gateway::spawn_framed(
                    conn,
                    reader,
                    writer,
                    rx,
                    self.inputs.clone(),
                    self.io_timeout,
                    self.cancel.clone(),
                );
            }
        }
        self.live_writers += 1;
        self.conns.insert(conn, ConnEntry { tx, websocket });
        tracing::debug!(conn = conn.0, %peer, transport, "client connected");
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
        if let Err(refused) = self
            .node
            .handle_route_link_up(self.clock.now(), RouteLinkId(link))
        {
            // A draining server takes no new links; the route learns from the close.
            tracing::debug!(link, %route_id, %refused, "refused route link");
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
        self.links.insert(link, LinkEntry { tx, token });
        tracing::info!(link, %route_id, %peer, links = self.links.len(), "route link up");
    }

    fn link_frame(&mut self, link: LinkId, frame: Frame) {
        if !self.links.contains_key(&link) {
            return;
        }
        let now = self.clock.now();
        match frame.kind {
            Some(Kind::PushBatch(batch)) => self.node.handle_push(now, batch),
            // The answer is the node's last output for this kick (`KickUserDone`).
            Some(Kind::KickUser(kick)) => self.node.handle_kick_user(now, RouteLinkId(link), kick),
            Some(Kind::RouteSendResult(result)) => self.node.handle_route_result(now, result),
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

    /// Queues a send on the link the node picked for it.
    fn route_send(&mut self, link: RouteLinkId, send: cim_proto::RouteSend) {
        let now = self.clock.now();
        let Some(entry) = self.links.get(&link.0) else {
            // The node learns of every link going down; this cannot happen, but if it did
            // the send would be routed afresh.
            self.node.handle_route_link_gone(now, link, send);
            return;
        };
        let request_id = send.request_id;
        let frame = Frame {
            kind: Some(Kind::RouteSend(send)),
        };
        match entry.tx.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                // Failing this one send (retryable) is backpressure (the node's decision:
                // switching links here would let later sends overtake the ones queued).
                tracing::warn!(
                    link = link.0,
                    request_id,
                    "route link queue full; failing the send"
                );
                self.node.handle_route_failed(now, request_id);
            }
            Err(mpsc::error::TrySendError::Closed(back)) => {
                // The writer died: the link is down, and this send, which never left, goes
                // over another link (the node picks it).
                let in_flight = self.node.route_link_in_flight(link).saturating_sub(1);
                self.forget_link(link.0, "link writer stopped", in_flight);
                match back.kind {
                    Some(Kind::RouteSend(send)) => {
                        self.node.handle_route_link_gone(now, link, send)
                    }
                    _ => self.node.handle_route_link_down(now, link),
                }
            }
        }
    }

    fn link_down(&mut self, link: LinkId, reason: &str) {
        let in_flight = self.node.route_link_in_flight(RouteLinkId(link));
        if self.forget_link(link, reason, in_flight) {
            // Every unanswered send on it fails; its users pick a live link next time.
            self.node
                .handle_route_link_down(self.clock.now(), RouteLinkId(link));
        }
    }

    /// Closes the link's tasks and drops it; false if it was already gone.
    fn forget_link(&mut self, link: LinkId, reason: &str, in_flight: usize) -> bool {
        let Some(entry) = self.links.remove(&link) else {
            return false;
        };
        entry.token.cancel();
        self.shell.links_lost += 1;
        tracing::warn!(
            link, %reason, in_flight, links = self.links.len(),
            "route link down"
        );
        true
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
        // Dropping each link's queue lets its writer flush and close (the node has dropped
        // them too). Sends still in flight belong to connections the node has just forgotten.
        self.links.clear();
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
