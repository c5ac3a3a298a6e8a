//! The server's connection machine: every client connection of one server process.
//!
//! [`ServerNode`] logs clients in with route-minted tickets, binds their sessions in the store
//! before `LoginOk`, keeps the sessions' leases refreshed and fences itself when it can no
//! longer prove them, relays sends to a route and pushes from routes to clients, and enforces
//! the per-connection limits (login and idle deadlines, outbound queue, send rate, body size).
//!
//! The shell owns the sockets, the frame codec, the store client and the route links. It hands
//! the node connection ids and decoded frames, executes its [`StoreRequest`]s, carries its
//! route-bound frames, and writes its frames.
//!
//! A **session** is the interval from `LoginOk` queued to `Close` queued (or the peer's close
//! reported). Per user, this node never has two: a newer epoch kicks the older session
//! before its own `LoginOk` is queued.

mod rate;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use cim_proto::{self as proto, ErrorCode, Frame, KickReason, frame::Kind};

use crate::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};
use crate::store::{
    ConvHead, LeaseRefresh, RequestId, StoreCommand, StoreReply, StoreRequest, StoreResult,
    StoredMessage,
};
use crate::tickets::{TicketError, TicketKeys};
use rate::TokenBucket;

/// One client connection, named by the shell. Ids must not be reused within a node's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Everything a server node is told at start. [`ServerConfig::new`] fills in the defaults
/// noted on each field.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name this server registers under; tickets must name it.
    pub server_id: ServerId,
    pub ticket_keys: TicketKeys,
    /// How far this server's clock may be behind the route's when checking ticket expiry.
    /// Default 2 s.
    pub ticket_skew: Duration,
    /// A connection must have its `LoginOk` within this of opening. Default 10 s.
    pub login_timeout: Duration,
    /// Announced to the client in `LoginOk`. Default 10 s.
    pub heartbeat_interval: Duration,
    /// A connection silent this long is reaped, logged in or not. Default 30 s.
    pub idle_timeout: Duration,
    /// Lease written with every bind and refresh (wall clock + this). Default 30 s.
    pub lease_ttl: Duration,
    /// How often all sessions' leases are refreshed. Default `lease_ttl / 3` (10 s).
    pub refresh_interval: Duration,
    /// ε: a lease counts as proven only until `sent_at + lease_ttl × (1 − ε)`, which leaves
    /// room for clock rate differences and store latency. Default 0.2.
    pub fence_margin: f64,
    /// Sessions per `RefreshLeases` request. Default 500.
    pub refresh_batch: usize,
    /// Frames queued to a connection but not yet written; one more is a slow consumer.
    /// Default 1024.
    pub max_outbound_frames: usize,
    /// Sends per second per session, sustained. Default 20.
    pub send_rate_per_sec: u32,
    /// Sends a session may make at once after a quiet spell. Default 40.
    pub send_burst: u32,
    /// Largest message body accepted, in bytes. Default 4 KiB.
    pub max_body: usize,
    /// Open connections at most (logged in or not). Default 100 000.
    pub max_connections: usize,
    /// Largest `FetchRequest.limit` honoured; 0 in a request also means this. Default 100.
    pub fetch_limit_cap: u32,
    /// A store request unanswered this long counts as failed. Default 5 s.
    pub store_timeout: Duration,
}

impl ServerConfig {
    pub fn new(server_id: ServerId, ticket_keys: TicketKeys) -> Self {
        let lease_ttl = Duration::from_secs(30);
        Self {
            server_id,
            ticket_keys,
            ticket_skew: Duration::from_secs(2),
            login_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            lease_ttl,
            refresh_interval: lease_ttl / 3,
            fence_margin: 0.2,
            refresh_batch: 500,
            max_outbound_frames: 1024,
            send_rate_per_sec: 20,
            send_burst: 40,
            max_body: 4 * 1024,
            max_connections: 100_000,
            fetch_limit_cap: 100,
            store_timeout: Duration::from_secs(5),
        }
    }

    /// How long after sending a bind or refresh its lease counts as proven.
    fn proven_window(&self) -> Duration {
        self.lease_ttl.mul_f64(1.0 - self.fence_margin)
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("fence_margin must be in [0, 1), got {0}")]
    FenceMargin(f64),
    #[error(
        "refresh_interval ({refresh:?}) must be shorter than lease_ttl × (1 − ε) ({window:?}), \
         or every session fences between refreshes"
    )]
    RefreshTooSlow { refresh: Duration, window: Duration },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
}

/// Why the shell must not accept a new connection. Nothing changed in the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("too many connections")]
    TooManyConnections,
    #[error("the server is draining")]
    Draining,
    #[error("connection id already open")]
    DuplicateId,
}

/// What the node asks the shell to do.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerOutput {
    /// Write this frame to the connection.
    Transmit { conn: ConnId, frame: Frame },
    /// Close the connection after writing what was queued before (a final Kick or Error).
    /// The node has already forgotten it.
    Close { conn: ConnId },
    /// Run this store command and feed the result to [`ServerNode::handle_store_reply`].
    Store(StoreRequest),
    /// Carry this frame (`RouteSend` or `KickUserDone`) over a route link.
    ToRoute(Frame),
}

/// Why [`ServerNode::poll_timeout`] wants to be woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerReason {
    /// A connection has not completed login.
    LoginDeadline,
    /// A connection may have been silent too long.
    Idle,
    /// Time to refresh all leases.
    LeaseRefresh,
    /// A session's lease stops being proven.
    Fence,
    /// A store request may have gone unanswered too long.
    StoreTimeout,
}

/// One bound session, as listed by [`ServerNode::sessions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    pub user: UserId,
    pub epoch: Epoch,
    pub conn: ConnId,
}

/// Counters for metrics. Every limit hit is counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub connections_opened: u64,
    pub connections_refused: u64,
    pub logins_ok: u64,
    pub logins_failed: u64,
    /// Kick frames sent, by reason (slow consumers and fencing included).
    pub kicks: BTreeMap<KickReason, u64>,
    pub slow_consumers: u64,
    pub rate_limited_sends: u64,
    pub oversized_bodies: u64,
    /// Bound sessions closed because their lease could not be proven (self-fencing or a
    /// lost registry session).
    pub fenced: u64,
    /// Codec failures reported by the shell, and frames the protocol does not allow.
    pub protocol_errors: u64,
    pub store_timeouts: u64,
}

impl ServerStats {
    pub fn kicks(&self, reason: KickReason) -> u64 {
        self.kicks.get(&reason).copied().unwrap_or(0)
    }
}

/// The machine for all client connections of one server.
///
/// Drain rule: after every `handle_*` call (and [`ServerNode::begin_drain`]), call
/// [`ServerNode::poll_output`] until it returns `None`, performing each output in order
/// (a `Close` follows the frames queued for that connection); then re-arm the timer from
/// [`ServerNode::poll_timeout`] and call [`ServerNode::handle_timeout`] when it passes. An
/// early wake-up is harmless.
#[derive(Debug)]
pub struct ServerNode {
    config: ServerConfig,
    proven_window: Duration,
    conns: BTreeMap<ConnId, Conn>,
    /// Bound sessions by user (at most one per user).
    sessions: BTreeMap<UserId, ConnId>,
    /// Connections whose bind is in flight, so a `KickUser` can reach them too.
    binding: BTreeSet<(UserId, ConnId)>,
    pending_store: BTreeMap<RequestId, PendingStore>,
    pending_sends: BTreeMap<u64, PendingSend>,
    /// Every deadline, earliest first. Idle entries may be early (the deadline moved later
    /// since they were armed); they re-arm when they fire.
    timers: BTreeSet<(Instant, TimerKey)>,
    next_refresh: Option<Instant>,
    next_store_id: u64,
    next_route_id: u64,
    draining: bool,
    outputs: VecDeque<ServerOutput>,
    stats: ServerStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKey {
    LoginDeadline(ConnId),
    Idle(ConnId),
    LeaseRefresh,
    Fence(ConnId),
    StoreTimeout(RequestId),
}

impl TimerKey {
    fn reason(self) -> TimerReason {
        match self {
            Self::LoginDeadline(_) => TimerReason::LoginDeadline,
            Self::Idle(_) => TimerReason::Idle,
            Self::LeaseRefresh => TimerReason::LeaseRefresh,
            Self::Fence(_) => TimerReason::Fence,
            Self::StoreTimeout(_) => TimerReason::StoreTimeout,
        }
    }
}

#[derive(Debug)]
struct Conn {
    state: ConnState,
    /// Armed in the timer table until the session is bound.
    login_deadline: Instant,
    idle_deadline: Instant,
    /// Where this connection's idle entry sits in the timer table.
    idle_armed: Instant,
    /// Frames transmitted but not yet reported written.
    unwritten: usize,
}

#[derive(Debug)]
enum ConnState {
    AwaitingLogin,
    Binding { user: UserId, epoch: Epoch },
    Bound(Session),
}

#[derive(Debug)]
struct Session {
    user: UserId,
    epoch: Epoch,
    /// Until here the store is known to hold this session's lease (armed as a Fence timer).
    proven_until: Instant,
    bucket: TokenBucket,
}

#[derive(Debug)]
struct PendingStore {
    sent_at: Instant,
    deadline: Instant,
    kind: Pending,
}

#[derive(Debug)]
enum Pending {
    Bind {
        conn: ConnId,
        user: UserId,
        epoch: Epoch,
    },
    Refresh {
        sessions: BTreeMap<UserId, Epoch>,
    },
    Sync(SessionRef),
    Fetch(SessionRef),
}

/// A session as it was when a request was made; the answer goes only to that same session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SessionRef {
    conn: ConnId,
    user: UserId,
    epoch: Epoch,
}

#[derive(Debug)]
struct PendingSend {
    session: SessionRef,
    msg_id: ClientMsgId,
}

/// How a connection ends.
enum Ending {
    Kick(KickReason, &'static str),
    Error(ErrorCode, String),
    /// The shell reported it closed; nothing to write.
    PeerClosed,
}

impl ServerNode {
    pub fn new(config: ServerConfig) -> Result<Self, ConfigError> {
        let eps = config.fence_margin;
        if !(0.0..1.0).contains(&eps) {
            return Err(ConfigError::FenceMargin(eps));
        }
        let window = config.proven_window();
        if config.refresh_interval >= window {
            return Err(ConfigError::RefreshTooSlow {
                refresh: config.refresh_interval,
                window,
            });
        }
        for (name, value) in [
            ("refresh_batch", config.refresh_batch),
            ("max_outbound_frames", config.max_outbound_frames),
            ("send_burst", config.send_burst as usize),
            ("max_connections", config.max_connections),
            ("fetch_limit_cap", config.fetch_limit_cap as usize),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        Ok(Self {
            config,
            proven_window: window,
            conns: BTreeMap::new(),
            sessions: BTreeMap::new(),
            binding: BTreeSet::new(),
            pending_store: BTreeMap::new(),
            pending_sends: BTreeMap::new(),
            timers: BTreeSet::new(),
            next_refresh: None,
            next_store_id: 1,
            next_route_id: 1,
            draining: false,
            outputs: VecDeque::new(),
            stats: ServerStats::default(),
        })
    }

    // ---- getters ----

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Bound sessions, by user.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.sessions
            .iter()
            .filter_map(|(user, conn)| match &self.conns.get(conn)?.state {
                ConnState::Bound(s) => Some(SessionInfo {
                    user: *user,
                    epoch: s.epoch,
                    conn: *conn,
                }),
                _ => None,
            })
            .collect()
    }

    /// Open connections, logged in or not.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    // ---- outputs ----

    pub fn poll_output(&mut self) -> Option<ServerOutput> {
        self.outputs.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<(Instant, TimerReason)> {
        self.timers.first().map(|(at, key)| (*at, key.reason()))
    }

    // ---- connection lifecycle ----

    pub fn handle_connection_opened(
        &mut self,
        now: Instant,
        conn: ConnId,
    ) -> Result<(), OpenError> {
        let refused = if self.draining {
            Some(OpenError::Draining)
        } else if self.conns.len() >= self.config.max_connections {
            Some(OpenError::TooManyConnections)
        } else if self.conns.contains_key(&conn) {
            Some(OpenError::DuplicateId)
        } else {
            None
        };
        if let Some(err) = refused {
            self.stats.connections_refused += 1;
            return Err(err);
        }
        let login_deadline = now + self.config.login_timeout;
        let idle_deadline = now + self.config.idle_timeout;
        self.conns.insert(
            conn,
            Conn {
                state: ConnState::AwaitingLogin,
                login_deadline,
                idle_deadline,
                idle_armed: idle_deadline,
                unwritten: 0,
            },
        );
        self.timers
            .insert((login_deadline, TimerKey::LoginDeadline(conn)));
        self.timers.insert((idle_deadline, TimerKey::Idle(conn)));
        self.stats.connections_opened += 1;
        Ok(())
    }

    /// The peer closed, or the socket failed. A bound session ends here.
    pub fn handle_connection_closed(&mut self, _now: Instant, conn: ConnId) {
        self.end_conn(conn, Ending::PeerClosed);
    }

    /// The shell's codec rejected the connection's input: tell the peer why, then close.
    pub fn handle_protocol_error(
        &mut self,
        _now: Instant,
        conn: ConnId,
        code: ErrorCode,
        detail: impl Into<String>,
    ) {
        if self.conns.contains_key(&conn) {
            self.stats.protocol_errors += 1;
        }
        self.end_conn(conn, Ending::Error(code, detail.into()));
    }

    /// The socket took `frames` more of this connection's frames.
    pub fn handle_written(&mut self, conn: ConnId, frames: usize) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.unwritten = c.unwritten.saturating_sub(frames);
        }
    }

    // ---- client frames ----

    pub fn handle_frame(&mut self, now: Instant, wall: UnixMillis, conn: ConnId, frame: Frame) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.idle_deadline = now + self.config.idle_timeout;
        let (awaiting, session) = match &c.state {
            ConnState::AwaitingLogin => (true, None),
            ConnState::Binding { .. } => (false, None),
            ConnState::Bound(s) => (
                false,
                Some(SessionRef {
                    conn,
                    user: s.user,
                    epoch: s.epoch,
                }),
            ),
        };
        match (frame.kind, session) {
            (Some(Kind::Ping(ping)), _) => {
                self.transmit(conn, Kind::Pong(proto::Pong { nonce: ping.nonce }));
            }
            (Some(Kind::Login(login)), _) if awaiting => self.on_login(now, wall, conn, login),
            (Some(Kind::Login(_)), _) => {
                self.stats.protocol_errors += 1;
                self.transmit(
                    conn,
                    error_kind(ErrorCode::UnexpectedFrame, "already logged in"),
                );
            }
            (_, None) => {
                self.stats.protocol_errors += 1;
                self.end_conn(
                    conn,
                    Ending::Error(ErrorCode::NotLoggedIn, "log in first".into()),
                );
            }
            (Some(Kind::Send(send)), Some(s)) => self.on_send(now, s, send),
            (Some(Kind::DeliverAck(ack)), Some(s)) => self.on_deliver_ack(s, ack),
            (Some(Kind::SyncRequest(_)), Some(s)) => {
                self.store(
                    now,
                    StoreCommand::LoadHeads { user: s.user },
                    Pending::Sync(s),
                );
            }
            (Some(Kind::FetchRequest(req)), Some(s)) => self.on_fetch(now, s, req),
            (_, Some(s)) => {
                self.stats.protocol_errors += 1;
                self.transmit(
                    s.conn,
                    error_kind(ErrorCode::UnexpectedFrame, "not a client frame"),
                );
            }
        }
    }

    fn on_login(&mut self, now: Instant, wall: UnixMillis, conn: ConnId, login: proto::Login) {
        let Some(ticket) = login.ticket else {
            return self.login_failed(conn, ErrorCode::BadTicket, "no ticket");
        };
        let grant = match self.config.ticket_keys.verify(
            &ticket,
            &self.config.server_id,
            wall,
            self.config.ticket_skew,
        ) {
            Ok(grant) => grant,
            Err(err) => {
                let code = match err {
                    TicketError::UnknownKey | TicketError::BadMac => ErrorCode::BadTicket,
                    TicketError::Expired => ErrorCode::TicketExpired,
                    TicketError::WrongServer => ErrorCode::WrongServer,
                };
                return self.login_failed(conn, code, &err.to_string());
            }
        };
        let (user, epoch) = (grant.user, grant.epoch);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = ConnState::Binding { user, epoch };
        }
        self.binding.insert((user, conn));
        self.store(
            now,
            StoreCommand::BindSession {
                user,
                epoch,
                server: self.config.server_id.clone(),
                lease_until: wall.plus(self.config.lease_ttl),
            },
            Pending::Bind { conn, user, epoch },
        );
    }

    fn login_failed(&mut self, conn: ConnId, code: ErrorCode, why: &str) {
        self.stats.logins_failed += 1;
        self.end_conn(conn, Ending::Error(code, why.to_owned()));
    }

    fn on_send(&mut self, now: Instant, s: SessionRef, send: proto::Send) {
        let msg_id = ClientMsgId::from_halves(send.msg_id_hi, send.msg_id_lo);
        if send.conv.parse::<ConvId>().is_err() {
            return self.nack(
                s.conn,
                msg_id,
                ErrorCode::BadConversation,
                "bad conversation",
                false,
            );
        }
        if send.body.len() > self.config.max_body {
            self.stats.oversized_bodies += 1;
            return self.nack(
                s.conn,
                msg_id,
                ErrorCode::BodyTooLarge,
                "body too large",
                false,
            );
        }
        let allowed = match self.conns.get_mut(&s.conn).map(|c| &mut c.state) {
            Some(ConnState::Bound(session)) => session.bucket.try_take(now),
            _ => false,
        };
        if !allowed {
            self.stats.rate_limited_sends += 1;
            return self.nack(
                s.conn,
                msg_id,
                ErrorCode::RateLimited,
                "sending too fast",
                true,
            );
        }
        let request_id = self.next_route_id;
        self.next_route_id += 1;
        self.pending_sends
            .insert(request_id, PendingSend { session: s, msg_id });
        self.outputs
            .push_back(ServerOutput::ToRoute(frame(Kind::RouteSend(
                proto::RouteSend {
                    request_id,
                    user_id: s.user.0,
                    epoch: s.epoch.0,
                    send: Some(send),
                },
            ))));
    }

    fn nack(&mut self, conn: ConnId, msg_id: ClientMsgId, code: ErrorCode, why: &str, retry: bool) {
        self.transmit(
            conn,
            Kind::SendNack(proto::SendNack {
                msg_id_hi: msg_id.hi(),
                msg_id_lo: msg_id.lo(),
                code: code as i32,
                reason: why.to_owned(),
                retryable: retry,
            }),
        );
    }

    fn on_deliver_ack(&mut self, s: SessionRef, ack: proto::DeliverAck) {
        let mut cursors = Vec::with_capacity(ack.cursors.len());
        let mut bad = Vec::new();
        for cursor in ack.cursors {
            match cursor.conv.parse::<ConvId>() {
                Ok(conv) => cursors.push((conv, LogEpoch(cursor.log_epoch), cursor.seq)),
                Err(_) => bad.push(cursor.conv),
            }
        }
        if !bad.is_empty() {
            // A bad cursor is the client's bug, not a reason to drop its session.
            let text = format!("ignored cursors for bad conversations: {bad:?}");
            self.transmit(s.conn, error_kind(ErrorCode::BadConversation, &text));
        }
        if !cursors.is_empty() {
            // Fire and forget: a lost advance is repaired by the client's next ack.
            let id = self.request_id();
            self.outputs.push_back(ServerOutput::Store(StoreRequest {
                id,
                command: StoreCommand::AdvanceCursors {
                    user: s.user,
                    cursors,
                },
            }));
        }
    }

    fn on_fetch(&mut self, now: Instant, s: SessionRef, req: proto::FetchRequest) {
        let Ok(conv) = req.conv.parse::<ConvId>() else {
            return self.transmit(
                s.conn,
                error_kind(ErrorCode::BadConversation, "bad conversation"),
            );
        };
        let cap = self.config.fetch_limit_cap;
        let limit = if req.limit == 0 {
            cap
        } else {
            req.limit.min(cap)
        };
        self.store(
            now,
            StoreCommand::Fetch {
                user: s.user,
                conv,
                log_epoch: LogEpoch(req.log_epoch),
                after_seq: req.after_seq,
                limit,
            },
            Pending::Fetch(s),
        );
    }

    // ---- store ----

    pub fn handle_store_reply(
        &mut self,
        now: Instant,
        _wall: UnixMillis,
        id: RequestId,
        result: StoreResult,
    ) {
        // Unknown ids are fire-and-forget requests, or answers after their timeout.
        let Some(pending) = self.pending_store.remove(&id) else {
            return;
        };
        self.timers
            .remove(&(pending.deadline, TimerKey::StoreTimeout(id)));
        self.on_store_result(now, pending, result.ok());
    }

    /// `reply` is `None` when the request failed or timed out.
    fn on_store_result(&mut self, now: Instant, pending: PendingStore, reply: Option<StoreReply>) {
        let sent_at = pending.sent_at;
        match (pending.kind, reply) {
            (Pending::Bind { conn, user, epoch }, Some(StoreReply::SessionBound(Ok(())))) => {
                self.on_bound(now, sent_at, conn, user, epoch);
            }
            (Pending::Bind { conn, user, epoch }, Some(StoreReply::SessionBound(Err(current)))) => {
                if self.binding.remove(&(user, conn)) {
                    let why = format!("epoch {} superseded by {}", epoch.0, current.0);
                    self.login_failed(conn, ErrorCode::StaleEpoch, &why);
                }
            }
            (Pending::Bind { conn, user, epoch }, _) => {
                if self.binding.remove(&(user, conn)) {
                    self.login_failed(conn, ErrorCode::Unavailable, "store unavailable");
                }
                // The bind may have taken effect; undo it (compare-epoch, so harmless).
                self.release(user, epoch);
            }
            (Pending::Refresh { sessions }, Some(StoreReply::LeasesRefreshed(results))) => {
                self.on_refreshed(sent_at, &sessions, results);
            }
            // A failed refresh proves nothing; the Fence timers do the rest.
            (Pending::Refresh { .. }, _) => {}
            (Pending::Sync(s), Some(StoreReply::Heads(heads))) => {
                let heads = heads.iter().map(head_to_proto).collect();
                self.transmit_to(s, Kind::SyncAnswer(proto::SyncAnswer { heads }));
            }
            (Pending::Fetch(s), Some(StoreReply::Fetched { head, messages })) => {
                let answer = proto::FetchAnswer {
                    head: Some(head_to_proto(&head)),
                    messages: messages.iter().map(message_to_proto).collect(),
                };
                self.transmit_to(s, Kind::FetchAnswer(answer));
            }
            (Pending::Sync(s) | Pending::Fetch(s), _) => {
                self.transmit_to(s, error_kind(ErrorCode::Unavailable, "store unavailable"));
            }
        }
    }

    fn on_bound(
        &mut self,
        now: Instant,
        sent_at: Instant,
        conn: ConnId,
        user: UserId,
        epoch: Epoch,
    ) {
        if !self.binding.remove(&(user, conn)) {
            // The connection went away (or was kicked) while binding: nobody will hold this
            // session, so give the claim back.
            return self.release(user, epoch);
        }
        if let Some(&old) = self.sessions.get(&user) {
            let old_epoch = match self.conns.get(&old).map(|c| &c.state) {
                Some(ConnState::Bound(s)) => s.epoch,
                _ => Epoch(0),
            };
            if old_epoch > epoch {
                // The store just bound an older epoch than one we hold: refuse the newcomer.
                let why = format!("epoch {} superseded by {}", epoch.0, old_epoch.0);
                return self.login_failed(conn, ErrorCode::StaleEpoch, &why);
            }
            // Same or newer epoch: the old session ends before the new one starts.
            self.end_conn(
                old,
                Ending::Kick(KickReason::TakenOver, "logged in elsewhere"),
            );
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            // `binding` held this connection, so it is open.
            return;
        };
        let proven_until = sent_at + self.proven_window;
        c.state = ConnState::Bound(Session {
            user,
            epoch,
            proven_until,
            bucket: TokenBucket::full(now, self.config.send_rate_per_sec, self.config.send_burst),
        });
        self.timers
            .remove(&(c.login_deadline, TimerKey::LoginDeadline(conn)));
        self.timers.insert((proven_until, TimerKey::Fence(conn)));
        self.sessions.insert(user, conn);
        if self.next_refresh.is_none() {
            let at = now + self.config.refresh_interval;
            self.next_refresh = Some(at);
            self.timers.insert((at, TimerKey::LeaseRefresh));
        }
        self.stats.logins_ok += 1;
        let heartbeat_interval_ms = self.config.heartbeat_interval.as_millis() as u64;
        self.transmit(
            conn,
            Kind::LoginOk(proto::LoginOk {
                user_id: user.0,
                epoch: epoch.0,
                server_id: self.config.server_id.0.clone(),
                heartbeat_interval_ms,
            }),
        );
    }

    fn on_refreshed(
        &mut self,
        sent_at: Instant,
        asked: &BTreeMap<UserId, Epoch>,
        results: Vec<(UserId, LeaseRefresh)>,
    ) {
        let proven = sent_at + self.proven_window;
        for (user, outcome) in results {
            // Only the session the refresh was about, not a newer one of the same user.
            let Some(&epoch) = asked.get(&user) else {
                continue;
            };
            let Some(&conn) = self.sessions.get(&user) else {
                continue;
            };
            let Some(Conn {
                state: ConnState::Bound(s),
                ..
            }) = self.conns.get_mut(&conn)
            else {
                continue;
            };
            if s.epoch != epoch {
                continue;
            }
            match outcome {
                LeaseRefresh::Refreshed if proven > s.proven_until => {
                    self.timers.remove(&(s.proven_until, TimerKey::Fence(conn)));
                    s.proven_until = proven;
                    self.timers.insert((proven, TimerKey::Fence(conn)));
                }
                LeaseRefresh::Refreshed => {}
                LeaseRefresh::Superseded { .. } => {
                    self.end_conn(
                        conn,
                        Ending::Kick(KickReason::TakenOver, "logged in elsewhere"),
                    );
                }
                LeaseRefresh::Gone => {
                    self.end_conn(conn, Ending::Kick(KickReason::LoggedOut, "logged out"));
                }
            }
        }
    }

    // ---- route link ----

    /// A route's answer to one of our `RouteSend`s.
    pub fn handle_route_result(&mut self, _now: Instant, result: proto::RouteSendResult) {
        let Some(pending) = self.pending_sends.remove(&result.request_id) else {
            return;
        };
        if result.user_id != pending.session.user.0 {
            // Not an answer to this request; a confused route. Treat the send as lost.
            return self.nack_pending(pending, ErrorCode::Unavailable, "route answered wrongly");
        }
        let kind = match (result.ack, result.nack) {
            (Some(ack), _) => Kind::SendAck(ack),
            (None, Some(nack)) => Kind::SendNack(nack),
            (None, None) => {
                return self.nack_pending(pending, ErrorCode::Unavailable, "empty route answer");
            }
        };
        self.transmit_to(pending.session, kind);
    }

    /// The link that carried this `RouteSend` died before it was answered.
    pub fn handle_route_failed(&mut self, _now: Instant, request_id: u64) {
        if let Some(pending) = self.pending_sends.remove(&request_id) {
            self.nack_pending(pending, ErrorCode::Unavailable, "route unavailable");
        }
    }

    /// Every route link is gone: all unanswered sends fail (retryable).
    pub fn handle_route_link_lost(&mut self, _now: Instant) {
        for (_, pending) in std::mem::take(&mut self.pending_sends) {
            self.nack_pending(pending, ErrorCode::Unavailable, "route unavailable");
        }
    }

    fn nack_pending(&mut self, pending: PendingSend, code: ErrorCode, why: &str) {
        let kind = Kind::SendNack(proto::SendNack {
            msg_id_hi: pending.msg_id.hi(),
            msg_id_lo: pending.msg_id.lo(),
            code: code as i32,
            reason: why.to_owned(),
            retryable: true,
        });
        self.transmit_to(pending.session, kind);
    }

    /// Messages for sessions here.
    pub fn handle_push(&mut self, _now: Instant, batch: proto::PushBatch) {
        for push in batch.pushes {
            let Some(message) = push.message else {
                continue;
            };
            let targets: Vec<ConnId> = if push.all_sessions {
                self.sessions.values().copied().collect()
            } else {
                let users: BTreeSet<u64> = push.recipients.into_iter().collect();
                users
                    .into_iter()
                    .filter_map(|u| self.sessions.get(&UserId(u)).copied())
                    .collect()
            };
            for conn in targets {
                let deliver = proto::Deliver {
                    message: Some(message.clone()),
                };
                self.transmit(conn, Kind::Deliver(deliver));
            }
        }
    }

    /// A route took the user over (or logged them out): close the session below that epoch,
    /// then confirm, whether or not one was here.
    pub fn handle_kick_user(&mut self, _now: Instant, kick: proto::KickUser) {
        let user = UserId(kick.user_id);
        let below = Epoch(kick.below_epoch);
        let reason = match KickReason::try_from(kick.reason) {
            Ok(KickReason::Unspecified) | Err(_) => KickReason::TakenOver,
            Ok(reason) => reason,
        };
        let mut doomed = Vec::new();
        if let Some(&conn) = self.sessions.get(&user)
            && let Some(ConnState::Bound(s)) = self.conns.get(&conn).map(|c| &c.state)
            && s.epoch < below
        {
            doomed.push(conn);
        }
        // A bind in flight may already have succeeded in the store before the takeover; its
        // LoginOk must not follow our confirmation, so such connections go too.
        for &(_, conn) in self
            .binding
            .range((user, ConnId(0))..=(user, ConnId(u64::MAX)))
        {
            if let Some(ConnState::Binding { epoch, .. }) = self.conns.get(&conn).map(|c| &c.state)
                && *epoch < below
            {
                doomed.push(conn);
            }
        }
        for conn in doomed {
            self.end_conn(conn, Ending::Kick(reason, "session closed by the route"));
        }
        self.outputs
            .push_back(ServerOutput::ToRoute(frame(Kind::KickUserDone(
                proto::KickUserDone {
                    user_id: user.0,
                    below_epoch: below.0,
                },
            ))));
    }

    /// The server's registry session expired: routes may now treat it as dead and take its
    /// users over, so no session here may continue.
    pub fn handle_registry_session_lost(&mut self, _now: Instant) {
        self.close_all(KickReason::Fenced, "server lost its registry session");
    }

    /// Shutting down: every client goes elsewhere; new connections are refused.
    pub fn begin_drain(&mut self, _now: Instant) {
        self.draining = true;
        self.close_all(KickReason::Draining, "server shutting down, reconnect");
    }

    fn close_all(&mut self, reason: KickReason, why: &'static str) {
        let all: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in all {
            if reason == KickReason::Fenced && self.is_bound(conn) {
                self.stats.fenced += 1;
            }
            self.end_conn(conn, Ending::Kick(reason, why));
        }
    }

    // ---- timers ----

    pub fn handle_timeout(&mut self, now: Instant, wall: UnixMillis) {
        while let Some(&(at, key)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            self.on_timer(now, wall, at, key);
        }
    }

    fn on_timer(&mut self, now: Instant, wall: UnixMillis, at: Instant, key: TimerKey) {
        match key {
            TimerKey::LoginDeadline(conn) => {
                if self.conns.contains_key(&conn) && !self.is_bound(conn) {
                    self.stats.logins_failed += 1;
                    self.end_conn(
                        conn,
                        Ending::Kick(KickReason::LoginTimeout, "login timeout"),
                    );
                }
            }
            TimerKey::Idle(conn) => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                if c.idle_deadline <= now {
                    self.end_conn(conn, Ending::Kick(KickReason::Idle, "idle timeout"));
                } else if c.idle_armed == at {
                    c.idle_armed = c.idle_deadline;
                    self.timers.insert((c.idle_deadline, TimerKey::Idle(conn)));
                }
            }
            TimerKey::Fence(conn) => {
                if let Some(ConnState::Bound(s)) = self.conns.get(&conn).map(|c| &c.state)
                    && s.proven_until <= now
                {
                    self.stats.fenced += 1;
                    self.end_conn(
                        conn,
                        Ending::Kick(
                            KickReason::Fenced,
                            "server cannot prove the session's lease",
                        ),
                    );
                }
            }
            TimerKey::LeaseRefresh => self.refresh_leases(now, wall),
            TimerKey::StoreTimeout(id) => {
                if let Some(pending) = self.pending_store.remove(&id) {
                    self.stats.store_timeouts += 1;
                    self.on_store_result(now, pending, None);
                }
            }
        }
    }

    fn refresh_leases(&mut self, now: Instant, wall: UnixMillis) {
        self.next_refresh = None;
        if self.sessions.is_empty() {
            // Re-armed by the next bind.
            return;
        }
        let all: Vec<(UserId, Epoch)> = self.sessions().iter().map(|s| (s.user, s.epoch)).collect();
        let lease_until = wall.plus(self.config.lease_ttl);
        for batch in all.chunks(self.config.refresh_batch) {
            self.store(
                now,
                StoreCommand::RefreshLeases {
                    server: self.config.server_id.clone(),
                    lease_until,
                    sessions: batch.to_vec(),
                },
                Pending::Refresh {
                    sessions: batch.iter().copied().collect(),
                },
            );
        }
        let at = now + self.config.refresh_interval;
        self.next_refresh = Some(at);
        self.timers.insert((at, TimerKey::LeaseRefresh));
    }

    // ---- helpers ----

    fn is_bound(&self, conn: ConnId) -> bool {
        matches!(
            self.conns.get(&conn).map(|c| &c.state),
            Some(ConnState::Bound(_))
        )
    }

    fn request_id(&mut self) -> RequestId {
        let id = RequestId(self.next_store_id);
        self.next_store_id += 1;
        id
    }

    /// Issues a store request whose answer matters, with a timeout.
    fn store(&mut self, now: Instant, command: StoreCommand, kind: Pending) {
        let id = self.request_id();
        let deadline = now + self.config.store_timeout;
        self.pending_store.insert(
            id,
            PendingStore {
                sent_at: now,
                deadline,
                kind,
            },
        );
        self.timers.insert((deadline, TimerKey::StoreTimeout(id)));
        self.outputs
            .push_back(ServerOutput::Store(StoreRequest { id, command }));
    }

    /// Gives back a claim nobody here holds any more (compare-epoch in the store, so it never
    /// touches a newer claim). Fire and forget: an unreleased claim just expires.
    fn release(&mut self, user: UserId, epoch: Epoch) {
        let held = self
            .sessions
            .get(&user)
            .and_then(|conn| self.conns.get(conn))
            .is_some_and(|c| matches!(&c.state, ConnState::Bound(s) if s.epoch == epoch));
        if held {
            return;
        }
        let id = self.request_id();
        self.outputs.push_back(ServerOutput::Store(StoreRequest {
            id,
            command: StoreCommand::ReleaseClaim { user, epoch },
        }));
    }

    /// Queues a frame, counting it against the connection's outbound limit.
    fn transmit(&mut self, conn: ConnId, kind: Kind) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.unwritten >= self.config.max_outbound_frames {
            self.stats.slow_consumers += 1;
            return self.end_conn(
                conn,
                Ending::Kick(KickReason::SlowConsumer, "outbound queue full"),
            );
        }
        c.unwritten += 1;
        self.outputs.push_back(ServerOutput::Transmit {
            conn,
            frame: frame(kind),
        });
    }

    /// Queues a frame for a session only if that very session is still here.
    fn transmit_to(&mut self, s: SessionRef, kind: Kind) {
        let same = matches!(
            self.conns.get(&s.conn).map(|c| &c.state),
            Some(ConnState::Bound(b)) if b.user == s.user && b.epoch == s.epoch
        );
        if same {
            self.transmit(s.conn, kind);
        }
    }

    /// Forgets a connection, queuing its final frame and `Close`, and ends its session.
    fn end_conn(&mut self, conn: ConnId, ending: Ending) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.timers.remove(&(c.idle_armed, TimerKey::Idle(conn)));
        // A session superseded or logged out in the store has nothing left to release.
        let mut release = true;
        let last = match ending {
            Ending::Kick(reason, why) => {
                *self.stats.kicks.entry(reason).or_default() += 1;
                release = !matches!(reason, KickReason::TakenOver | KickReason::LoggedOut);
                Some(Kind::Kick(proto::Kick {
                    reason: reason as i32,
                    message: why.to_owned(),
                }))
            }
            Ending::Error(code, why) => Some(error_kind(code, &why)),
            Ending::PeerClosed => None,
        };
        if let Some(kind) = last {
            // The final frame bypasses the outbound limit: it explains the close.
            self.outputs.push_back(ServerOutput::Transmit {
                conn,
                frame: frame(kind),
            });
            self.outputs.push_back(ServerOutput::Close { conn });
        }
        match c.state {
            ConnState::AwaitingLogin => {
                self.timers
                    .remove(&(c.login_deadline, TimerKey::LoginDeadline(conn)));
            }
            ConnState::Binding { user, .. } => {
                self.timers
                    .remove(&(c.login_deadline, TimerKey::LoginDeadline(conn)));
                // The bind's answer finds the connection gone and releases the claim then,
                // so the release cannot overtake the bind in the store.
                self.binding.remove(&(user, conn));
            }
            ConnState::Bound(s) => {
                self.timers.remove(&(s.proven_until, TimerKey::Fence(conn)));
                if self.sessions.get(&s.user) == Some(&conn) {
                    self.sessions.remove(&s.user);
                }
                self.pending_sends.retain(|_, p| p.session.conn != conn);
                if release {
                    self.release(s.user, s.epoch);
                }
            }
        }
    }
}

fn frame(kind: Kind) -> Frame {
    Frame { kind: Some(kind) }
}

fn error_kind(code: ErrorCode, why: &str) -> Kind {
    Kind::Error(proto::Error {
        code: code as i32,
        message: why.to_owned(),
    })
}

/// A stored message as the wire carries it.
pub fn message_to_proto(m: &StoredMessage) -> proto::Message {
    proto::Message {
        conv: m.conv.to_string(),
        log_epoch: m.log_epoch.0,
        seq: m.seq,
        sender: m.sender.0,
        msg_id_hi: m.msg_id.hi(),
        msg_id_lo: m.msg_id.lo(),
        body: m.body.to_vec(),
        appended_at_ms: m.appended_at.0,
    }
}

/// A conversation head (with the user's cursor) as the wire carries it.
pub fn head_to_proto(h: &ConvHead) -> proto::ConvHead {
    proto::ConvHead {
        conv: h.conv.to_string(),
        log_epoch: h.log_epoch.0,
        head_seq: h.head_seq,
        first_available_seq: h.first_available_seq,
        cursor_seq: h.cursor_seq,
    }
}
