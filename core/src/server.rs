//! The server's connection machine: every client connection of one server process.
//!
//! The shell owns the sockets and the frame codec. It tells [`ServerNode`] about connections
//! (by a [`ConnId`] it never reuses) and decoded frames; it executes the node's store
//! requests, carries its route-bound sends over the route link it names, writes its frames and
//! closes the connections it names; it reports which route links are up, and when the store or
//! the registry session is lost and back. The node decides everything else: login (ticket,
//! then a compare-epoch `BindSession`, then LoginOk), heartbeats and idle reaping, send
//! admission (conversation, body size, per-user token bucket), the route link of each send
//! (a user's unanswered sends share one: `route_links`), delivery of pushes, lease refreshes
//! and self-fencing, fencing and refusing clients while out of the registry, slow-consumer
//! kicks and draining.
//!
//! **Session invariant.** A session runs from LoginOk to the connection's close. The node
//! sends LoginOk only after the store bound the session, and keeps a session only while its
//! lease is *proven*: until `sent_at + lease_ttl × (1 − ε)` of the last bind or refresh the
//! store confirmed, where `sent_at` is when that request was emitted. A server cut off from the
//! store therefore kicks its sessions (FENCED) before the store can hand the user to another
//! server, and two sessions of one user never overlap.

mod rate;
mod route_links;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::time::Instant;

use cim_proto::frame::Kind;
use cim_proto::{
    self as proto, ErrorCode, Frame, KickReason, KickUser, KickUserDone, PushBatch, RouteSend,
    RouteSendResult,
};

use crate::canary::{Canaries, Canary};
use crate::ids::{ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};
use crate::route::tickets::{TicketError, TicketKeys};
use crate::store::{
    LeaseRefresh, RequestId, StoreCommand, StoreReply, StoreRequest, StoreResult, StoreUnavailable,
    head_to_proto, message_to_proto,
};

pub use rate::TokenBucket;
pub use route_links::RouteLinkId;
use route_links::RouteLinks;

/// A client connection, named by the shell. Never reused within one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// Limits and timers of one server. [`ServerConfig::new`] fills in the defaults below.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub server_id: ServerId,
    pub ticket_keys: TicketKeys,
    /// How far this server's clock may lag the route's when checking ticket expiry. 2 s.
    pub ticket_skew: Duration,
    /// A connection must have its session bound within this of opening. 10 s.
    pub login_timeout: Duration,
    /// Announced in LoginOk: how often the client pings. 10 s.
    pub heartbeat_interval: Duration,
    /// A connection silent this long is reaped, including one that never pinged. 30 s.
    pub idle_timeout: Duration,
    /// Lease written to the store with every bind and refresh. 30 s.
    pub lease_ttl: Duration,
    /// How often all sessions' leases are refreshed. `lease_ttl / 3` (10 s).
    pub refresh_interval: Duration,
    /// ε: the share of `lease_ttl` given up to store latency and clock drift when deciding how
    /// long a confirmed lease is proven here. 0.2.
    pub fence_margin: f64,
    /// Sessions per `RefreshLeases` request. 500.
    pub refresh_batch: usize,
    /// Frames handed to the shell and not yet reported written, per connection; one more and
    /// the client is kicked as a slow consumer. 1024.
    pub max_outbound_frames: usize,
    /// Per-user sends per second (token bucket refill). 20.
    pub send_rate_per_sec: u32,
    /// Per-user sends allowed at once (token bucket size). 50.
    pub send_burst: u32,
    /// Largest message body, bytes. 4 KiB.
    pub max_body: usize,
    /// Connections held at once, logged in or not. 100 000.
    pub max_connections: usize,
    /// Largest `limit` a FetchRequest is served with (also used when it asks for 0). 100.
    pub fetch_limit_cap: u32,
    /// Encoded size a FetchAnswer's messages may reach; the rest is left for the client's
    /// next fetch (it continues while answers make progress). Keeps answers under the frame
    /// limit: 100 bodies of 4 KiB would not fit in 64 KiB. 56 KiB.
    pub max_answer_bytes: usize,
    /// A store request the node waits on (bind, refresh, sync, fetch) with no reply by then
    /// counts as failed, so a lost reply never leaves a login hanging or an entry behind. 5 s.
    pub store_timeout: Duration,
    /// DeliverAck cursors are held this long, merged per user, then written as one
    /// `AdvanceCursors` per user: clients ack every 200 ms, so with a store across the
    /// network (Redis) most of a large fan-out's store traffic was cursor writes. A session
    /// that ends here flushes its user's at once; a crash of this server loses at most this
    /// much cursor progress (the client is then re-delivered what it had, and dedups it).
    /// Zero: every DeliverAck is written at once. 1 s.
    pub cursor_flush_delay: Duration,
    /// `SelfFencing` off: the simulation's canary (nothing outside canary builds).
    pub canaries: Canaries,
}

impl ServerConfig {
    /// The defaults, for the named server and key ring (secrets have no default).
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
            send_burst: 50,
            max_body: 4 * 1024,
            max_connections: 100_000,
            fetch_limit_cap: 100,
            max_answer_bytes: 56 * 1024,
            store_timeout: Duration::from_secs(5),
            cursor_flush_delay: Duration::from_secs(1),
            canaries: Canaries::NONE,
        }
    }

    /// How long after sending a bind/refresh the store's confirmation keeps a session alive
    /// here: `lease_ttl × (1 − ε)`.
    pub fn proven_window(&self) -> Duration {
        self.lease_ttl.mul_f64(1.0 - self.fence_margin)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..1.0).contains(&self.fence_margin) {
            return Err(ConfigError::FenceMargin);
        }
        // A refresh must be able to land before the previous proof runs out, or every session
        // would be fenced between two refreshes.
        if self.refresh_interval.is_zero() || self.refresh_interval >= self.proven_window() {
            return Err(ConfigError::RefreshInterval);
        }
        if self.heartbeat_interval >= self.idle_timeout {
            return Err(ConfigError::Heartbeat);
        }
        let zero = [
            ("refresh_batch", self.refresh_batch == 0),
            ("max_outbound_frames", self.max_outbound_frames == 0),
            ("send_rate_per_sec", self.send_rate_per_sec == 0),
            ("send_burst", self.send_burst == 0),
            ("max_connections", self.max_connections == 0),
            ("fetch_limit_cap", self.fetch_limit_cap == 0),
            ("max_answer_bytes", self.max_answer_bytes == 0),
            ("store_timeout", self.store_timeout.is_zero()),
        ];
        match zero.into_iter().find(|(_, is_zero)| *is_zero) {
            Some((name, _)) => Err(ConfigError::Zero(name)),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("fence_margin must be in [0, 1)")]
    FenceMargin,
    #[error("refresh_interval must be positive and below lease_ttl × (1 − fence_margin)")]
    RefreshInterval,
    #[error("heartbeat_interval must be below idle_timeout, or idle clients are reaped")]
    Heartbeat,
    #[error("{0} must be positive")]
    Zero(&'static str),
}

/// Why a new connection was not accepted; the shell closes the socket. Nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("connection limit reached")]
    TooManyConnections,
    #[error("server is draining")]
    Draining,
    /// The store has been unreachable past the grace period: the server is (being) taken out
    /// of the registry, and the fence that protects sessions has already fired.
    #[error("server cannot reach the store (out of the registry)")]
    StoreUnreachable,
    /// The registry session was lost and the server is not registered again: routes may
    /// already treat it as dead and allow takeovers without asking it.
    #[error("server lost its registry session (not registered again yet)")]
    Unregistered,
    #[error("connection id already in use (shell bug)")]
    DuplicateId,
}

/// What the node asks of the shell, in the order it must happen.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerOutput {
    /// Write this frame to the connection; report it with `handle_written` once the socket
    /// took it.
    Transmit { conn: ConnId, frame: Frame },
    /// Write this one frame to each of these connections (a push's Deliver to its
    /// recipients here), reporting each with `handle_written` like a `Transmit`. One output
    /// so the shell encodes the frame once, not once per recipient.
    TransmitToMany { conns: Vec<ConnId>, frame: Frame },
    /// Flush the frames already queued for this connection (a final Kick or Error), then close
    /// it. The node has already forgotten it: no `handle_connection_closed` is needed.
    Close { conn: ConnId },
    /// Execute, then feed the result to `handle_store_reply`.
    Store(StoreRequest),
    /// Carry to the route over `link` (one reported up); feed the answer to
    /// `handle_route_result`. If the link's queue refuses it, `handle_route_failed`; if the
    /// link turns out to be gone, `handle_route_link_gone`.
    ToRoute { link: RouteLinkId, send: RouteSend },
    /// The answer to a route's `KickUser`: send it on `link`, the route link the kick came
    /// on. It follows the kick's own outputs (its Kick frames and closes), so the route
    /// hears the old session is gone only after the node gave it up.
    KickUserDone {
        link: RouteLinkId,
        done: KickUserDone,
    },
}

/// Why `poll_timeout` wants to be woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimerReason {
    /// A connection has not been bound within `login_timeout`.
    LoginDeadline,
    /// A connection has been silent for `idle_timeout`.
    Idle,
    /// A session's lease is no longer proven.
    Fence,
    /// Time to refresh every session's lease.
    LeaseRefresh,
    /// A store request went unanswered for `store_timeout`.
    StoreTimeout,
    /// Time to write the held DeliverAck cursors (`cursor_flush_delay`).
    CursorFlush,
}

/// Counters for metrics: every limit hit is counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub logins_ok: u64,
    pub logins_failed: u64,
    pub kicks: BTreeMap<KickReason, u64>,
    pub slow_consumers: u64,
    pub rate_limited_sends: u64,
    pub fenced: u64,
    pub protocol_errors: u64,
    pub refused_connections: u64,
    /// Route sends failed at once: no route link up, or its queue full.
    pub route_sends_unrouted: u64,
    /// Store requests that got no reply within `store_timeout`.
    pub store_timeouts: u64,
}

impl ServerStats {
    pub fn kicks(&self, reason: KickReason) -> u64 {
        self.kicks.get(&reason).copied().unwrap_or(0)
    }
}

/// All client connections of one server process.
///
/// Drain rule: after every `handle_*` or `begin_drain` call, call [`ServerNode::poll_output`]
/// until it returns `None` and act on the outputs in order; then re-arm the timer from
/// [`ServerNode::poll_timeout`] and call [`ServerNode::handle_timeout`] when it passes.
#[derive(Debug)]
pub struct ServerNode {
    config: ServerConfig,
    conns: BTreeMap<ConnId, Conn>,
    /// Live sessions (LoginOk sent) by user: at most one per user here.
    sessions: BTreeMap<UserId, (ConnId, Epoch)>,
    /// Connections whose `BindSession` is in flight, by user (so a KickUser finds them
    /// without scanning every connection).
    binding: BTreeSet<(UserId, ConnId)>,
    /// Exactly one entry per connection: its earliest deadline.
    timers: BTreeMap<(Instant, ConnId), TimerReason>,
    next_refresh: Option<Instant>,
    /// DeliverAck cursors not yet written, per user, in arrival order (see
    /// [`merge_cursor`]), and when they are due (`cursor_flush_delay` after the first).
    held_cursors: BTreeMap<UserId, Vec<(ConvId, LogEpoch, u64)>>,
    cursor_flush_at: Option<Instant>,
    pending_store: BTreeMap<RequestId, Pending>,
    /// When each request in `pending_store` times out, and the same ordered by time.
    store_deadlines: BTreeMap<RequestId, Instant>,
    store_timers: BTreeSet<(Instant, RequestId)>,
    pending_sends: BTreeMap<u64, PendingSend>,
    next_request: u64,
    next_route_request: u64,
    /// The route links up, and which one each unanswered send is on.
    links: RouteLinks,
    draining: bool,
    /// The store has been unreachable past the grace period (the shell's watchdog says so):
    /// every connection was fenced, new ones are refused until it answers again.
    store_lost: bool,
    /// The registry session was lost and is not back: every connection was fenced, new
    /// ones are refused until the server is registered again.
    registry_lost: bool,
    outputs: VecDeque<ServerOutput>,
    stats: ServerStats,
}

#[derive(Debug)]
struct Conn {
    login_deadline: Instant,
    last_heard: Instant,
    /// Frames transmitted and not yet reported written.
    unwritten: usize,
    state: ConnState,
    /// Route sends awaiting a result, dropped with the connection.
    sends_in_flight: BTreeSet<u64>,
    /// The key of this connection's entry in `timers`.
    scheduled: Option<(Instant, ConnId)>,
}

#[derive(Debug)]
enum ConnState {
    AwaitingLogin,
    /// Ticket verified, `BindSession` in flight.
    Binding {
        user: UserId,
        epoch: Epoch,
    },
    Live(Session),
}

#[derive(Debug)]
struct Session {
    user: UserId,
    epoch: Epoch,
    /// The lease is proven until here; past it the session is fenced.
    proven_until: Instant,
    bucket: TokenBucket,
}

#[derive(Debug)]
enum Pending {
    Bind {
        conn: ConnId,
        user: UserId,
        epoch: Epoch,
        sent_at: Instant,
    },
    Refresh {
        sent_at: Instant,
        /// Sorted by user (taken from `sessions`).
        batch: Vec<(UserId, Epoch)>,
    },
    Sync {
        conn: ConnId,
        user: UserId,
        epoch: Epoch,
    },
    Fetch {
        conn: ConnId,
        user: UserId,
        epoch: Epoch,
    },
}

#[derive(Debug)]
struct PendingSend {
    conn: ConnId,
    user: UserId,
    epoch: Epoch,
    msg_id_hi: u64,
    msg_id_lo: u64,
}

impl ServerNode {
    pub fn new(config: ServerConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            config,
            conns: BTreeMap::new(),
            sessions: BTreeMap::new(),
            binding: BTreeSet::new(),
            timers: BTreeMap::new(),
            next_refresh: None,
            held_cursors: BTreeMap::new(),
            cursor_flush_at: None,
            pending_store: BTreeMap::new(),
            store_deadlines: BTreeMap::new(),
            store_timers: BTreeSet::new(),
            pending_sends: BTreeMap::new(),
            next_request: 1,
            next_route_request: 1,
            links: RouteLinks::default(),
            draining: false,
            store_lost: false,
            registry_lost: false,
            outputs: VecDeque::new(),
            stats: ServerStats::default(),
        })
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Connections held, logged in or not.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Live sessions (LoginOk sent).
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Every live session here as (user, epoch, connection), by user.
    pub fn session_list(&self) -> Vec<(UserId, Epoch, ConnId)> {
        self.sessions
            .iter()
            .map(|(&user, &(conn, epoch))| (user, epoch, conn))
            .collect()
    }

    /// The user's live session here, if any.
    pub fn session_of(&self, user: UserId) -> Option<(ConnId, Epoch)> {
        self.sessions.get(&user).copied()
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// Out of the registry, or on the way out: the store or the registry session was lost
    /// and is not back. No client is accepted meanwhile.
    pub fn is_withdrawn(&self) -> bool {
        self.store_lost || self.registry_lost
    }

    /// Route links up.
    pub fn route_links(&self) -> usize {
        self.links.len()
    }

    pub fn poll_output(&mut self) -> Option<ServerOutput> {
        self.outputs.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<(Instant, TimerReason)> {
        let conn = self
            .timers
            .first_key_value()
            .map(|(&(at, _), &reason)| (at, reason));
        let refresh = self.next_refresh.map(|at| (at, TimerReason::LeaseRefresh));
        let store = self
            .store_timers
            .first()
            .map(|&(at, _)| (at, TimerReason::StoreTimeout));
        let cursors = self
            .cursor_flush_at
            .map(|at| (at, TimerReason::CursorFlush));
        [conn, refresh, store, cursors]
            .into_iter()
            .flatten()
            .min_by_key(|&(at, _)| at)
    }

    // ---- connections -------------------------------------------------------------------

    /// A socket was accepted. On `Err` the shell closes it; nothing else happened.
    pub fn handle_connection_opened(&mut self, now: Instant, conn: ConnId) -> Result<(), Refused> {
        let refused = if self.store_lost {
            Some(Refused::StoreUnreachable)
        } else if self.registry_lost {
            Some(Refused::Unregistered)
        } else if self.draining {
            Some(Refused::Draining)
        } else if self.conns.contains_key(&conn) {
            Some(Refused::DuplicateId)
        } else if self.conns.len() >= self.config.max_connections {
            Some(Refused::TooManyConnections)
        } else {
            None
        };
        if let Some(refused) = refused {
            self.stats.refused_connections += 1;
            return Err(refused);
        }
        self.conns.insert(
            conn,
            Conn {
                login_deadline: now + self.config.login_timeout,
                last_heard: now,
                unwritten: 0,
                state: ConnState::AwaitingLogin,
                sends_in_flight: BTreeSet::new(),
                scheduled: None,
            },
        );
        self.reschedule(conn);
        Ok(())
    }

    /// The peer closed the connection or the socket failed.
    pub fn handle_connection_closed(&mut self, _now: Instant, conn: ConnId) {
        self.forget(conn);
    }

    /// The socket took `frames` more of this connection's transmitted frames.
    pub fn handle_written(&mut self, conn: ConnId, frames: usize) {
        if let Some(c) = self.conns.get_mut(&conn) {
            c.unwritten = c.unwritten.saturating_sub(frames);
        }
    }

    /// The shell's codec rejected this connection's input: tell the peer, then close.
    pub fn handle_protocol_error(
        &mut self,
        _now: Instant,
        conn: ConnId,
        code: ErrorCode,
        detail: &str,
    ) {
        if self.conns.contains_key(&conn) {
            self.stats.protocol_errors += 1;
            self.close_with_error(conn, code, detail);
        }
    }

    /// Kicks every connection with DRAINING and refuses new ones: clients reconnect through
    /// the route to another server.
    /// Route links are dropped too (the shell closes them; a draining server takes no new
    /// ones): the sends still in flight belong to connections kicked here.
    pub fn begin_drain(&mut self, _now: Instant) {
        self.draining = true;
        self.next_refresh = None;
        self.links.clear();
        let all: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in all {
            self.kick(conn, KickReason::Draining, "server is shutting down");
        }
    }

    /// The server's registry session expired: routes may now treat this server as dead and
    /// hand its users to others, so no session here may go on. Every connection is kicked
    /// with FENCED (logins still binding too: their LoginOk could follow a takeover), and
    /// new connections are refused until [`ServerNode::handle_registered`]: a session bound
    /// meanwhile could outlive a takeover the routes allow because this server is absent.
    pub fn handle_registry_session_lost(&mut self, _now: Instant) {
        self.registry_lost = true;
        self.fence_everyone("server lost its registry session");
    }

    /// Registered again under a new session after a loss: clients are accepted again
    /// (unless the store is still lost).
    pub fn handle_registered(&mut self, _now: Instant) {
        self.registry_lost = false;
    }

    /// The store has been unreachable past the grace period: nobody here can be bound or
    /// refreshed, and the shell is about to take the server out of the registry, after
    /// which routes let its users log in elsewhere without asking it. So every connection is
    /// kicked with FENCED now (the shell unlists the server only after this call's outputs),
    /// and new connections are refused until [`ServerNode::handle_store_back`].
    pub fn handle_store_lost(&mut self, _now: Instant) {
        self.store_lost = true;
        self.fence_everyone("server lost the store");
    }

    /// The store answers again: clients are accepted again (unless the registry session is
    /// still lost); the shell lists the server again.
    pub fn handle_store_back(&mut self, _now: Instant) {
        self.store_lost = false;
    }

    fn fence_everyone(&mut self, message: &str) {
        if self.config.canaries.disabled(Canary::SelfFencing) {
            return;
        }
        let all: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in all {
            if matches!(
                self.conns.get(&conn).map(|c| &c.state),
                Some(ConnState::Live(_))
            ) {
                self.stats.fenced += 1;
            }
            self.kick(conn, KickReason::Fenced, message);
        }
    }

    // ---- client frames -----------------------------------------------------------------

    /// One decoded frame from a client connection. `wall` is this server's wall clock (ticket
    /// expiry, lease deadline written to the store).
    pub fn handle_frame(&mut self, now: Instant, wall: UnixMillis, conn: ConnId, frame: Frame) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.last_heard = now;
        let live = match &c.state {
            ConnState::Live(s) => Some((s.user, s.epoch)),
            _ => None,
        };
        let awaiting_login = matches!(c.state, ConnState::AwaitingLogin);
        match (frame.kind, live) {
            (None, _) => {
                self.stats.protocol_errors += 1;
                self.close_with_error(conn, ErrorCode::MalformedFrame, "empty frame");
            }
            (Some(Kind::Ping(ping)), _) => {
                self.transmit(conn, Kind::Pong(proto::Pong { nonce: ping.nonce }));
            }
            (Some(Kind::Login(login)), _) if awaiting_login => self.login(now, wall, conn, login),
            (Some(Kind::Login(_)), _) => {
                self.stats.protocol_errors += 1;
                self.close_with_error(conn, ErrorCode::UnexpectedFrame, "already logged in");
            }
            (Some(kind), None) if is_client_request(&kind) => {
                self.stats.protocol_errors += 1;
                self.close_with_error(conn, ErrorCode::NotLoggedIn, "log in first");
            }
            (Some(Kind::Send(send)), Some((user, epoch))) => {
                self.send(now, conn, user, epoch, send)
            }
            (Some(Kind::DeliverAck(ack)), Some((user, _))) => {
                self.deliver_ack(now, conn, user, ack)
            }
            (Some(Kind::SyncRequest(_)), Some((user, epoch))) => {
                self.request_awaited(
                    now,
                    StoreCommand::LoadHeads { user },
                    Pending::Sync { conn, user, epoch },
                );
            }
            (Some(Kind::FetchRequest(fetch)), Some((user, epoch))) => {
                self.fetch(now, conn, user, epoch, fetch);
            }
            (Some(_), _) => {
                self.stats.protocol_errors += 1;
                self.close_with_error(conn, ErrorCode::UnexpectedFrame, "not a client frame");
            }
        }
        self.reschedule(conn);
    }

    fn login(&mut self, now: Instant, wall: UnixMillis, conn: ConnId, login: proto::Login) {
        let verified = match &login.ticket {
            None => Err(TicketError::BadMac),
            Some(ticket) => self.config.ticket_keys.verify(
                ticket,
                &self.config.server_id,
                wall,
                self.config.ticket_skew,
            ),
        };
        let grant = match verified {
            Ok(grant) => grant,
            Err(e) => {
                let code = match e {
                    TicketError::UnknownKey | TicketError::BadMac => ErrorCode::BadTicket,
                    TicketError::Expired => ErrorCode::TicketExpired,
                    TicketError::WrongServer => ErrorCode::WrongServer,
                };
                self.stats.logins_failed += 1;
                self.close_with_error(conn, code, &e.to_string());
                return;
            }
        };
        if let Some(c) = self.conns.get_mut(&conn) {
            c.state = ConnState::Binding {
                user: grant.user,
                epoch: grant.epoch,
            };
            self.binding.insert((grant.user, conn));
        }
        self.request_awaited(
            now,
            StoreCommand::BindSession {
                user: grant.user,
                epoch: grant.epoch,
                server: self.config.server_id.clone(),
                lease_until: wall.plus(self.config.lease_ttl),
            },
            Pending::Bind {
                conn,
                user: grant.user,
                epoch: grant.epoch,
                sent_at: now,
            },
        );
    }

    fn send(&mut self, now: Instant, conn: ConnId, user: UserId, epoch: Epoch, send: proto::Send) {
        let nack = |code: ErrorCode, reason: &str, retryable: bool| {
            Kind::SendNack(proto::SendNack {
                msg_id_hi: send.msg_id_hi,
                msg_id_lo: send.msg_id_lo,
                code: code as i32,
                reason: reason.to_owned(),
                retryable,
            })
        };
        let refusal = if send.conv.parse::<ConvId>().is_err() {
            Some(nack(
                ErrorCode::BadConversation,
                "bad conversation id",
                false,
            ))
        } else if send.body.len() > self.config.max_body {
            Some(nack(
                ErrorCode::BodyTooLarge,
                "message body too large",
                false,
            ))
        } else if !self.take_token(now, conn) {
            self.stats.rate_limited_sends += 1;
            Some(nack(ErrorCode::RateLimited, "sending too fast", true))
        } else {
            None
        };
        if let Some(frame) = refusal {
            self.transmit(conn, frame);
            return;
        }
        let request_id = self.next_route_request;
        self.next_route_request += 1;
        self.pending_sends.insert(
            request_id,
            PendingSend {
                conn,
                user,
                epoch,
                msg_id_hi: send.msg_id_hi,
                msg_id_lo: send.msg_id_lo,
            },
        );
        if let Some(c) = self.conns.get_mut(&conn) {
            c.sends_in_flight.insert(request_id);
        }
        self.route(
            now,
            RouteSend {
                request_id,
                user_id: user.0,
                epoch: epoch.0,
                send: Some(send),
            },
        );
    }

    /// Puts a send on its user's link (see `route_links`), or fails it at once (retryable)
    /// when no link is up.
    fn route(&mut self, now: Instant, send: RouteSend) {
        let user = UserId(send.user_id);
        match self.links.pick(user) {
            Some(link) => {
                self.links.carry(link, send.request_id, user);
                self.outputs.push_back(ServerOutput::ToRoute { link, send });
            }
            None => {
                self.stats.route_sends_unrouted += 1;
                self.fail_route_send(now, send.request_id);
            }
        }
    }

    fn take_token(&mut self, now: Instant, conn: ConnId) -> bool {
        match self.conns.get_mut(&conn).map(|c| &mut c.state) {
            Some(ConnState::Live(s)) => s.bucket.try_take(now),
            _ => false,
        }
    }

    fn deliver_ack(&mut self, now: Instant, conn: ConnId, user: UserId, ack: proto::DeliverAck) {
        let mut cursors = Vec::with_capacity(ack.cursors.len());
        let mut bad = 0usize;
        for cursor in ack.cursors {
            match cursor.conv.parse::<ConvId>() {
                Ok(conv) => cursors.push((conv, LogEpoch(cursor.log_epoch), cursor.seq)),
                Err(_) => bad += 1,
            }
        }
        if bad > 0 {
            // The good cursors still count; a client bug in one conversation must not lose
            // the user's place in the others.
            self.transmit(
                conn,
                error_kind(
                    ErrorCode::BadConversation,
                    &format!("{bad} cursor(s) with a bad conversation id ignored"),
                ),
            );
        }
        if cursors.is_empty() {
            return;
        }
        if self.config.cursor_flush_delay.is_zero() {
            self.request(StoreCommand::AdvanceCursors { user, cursors }, None);
            return;
        }
        for cursor in cursors {
            let held = self.held_cursors.entry(user).or_default();
            merge_cursor(held, cursor);
            // Held cursors stay bounded per user (and so does each merge's scan): past the
            // bound they are written now.
            if held.len() > MAX_HELD_CURSORS {
                self.flush_cursors_of(user);
            }
        }
        if self.held_cursors.contains_key(&user) {
            self.cursor_flush_at
                .get_or_insert(now + self.config.cursor_flush_delay);
        }
    }

    /// Writes the cursors held for `user`, if any: one `AdvanceCursors`.
    fn flush_cursors_of(&mut self, user: UserId) {
        if let Some(cursors) = self.held_cursors.remove(&user) {
            self.request(StoreCommand::AdvanceCursors { user, cursors }, None);
        }
        if self.held_cursors.is_empty() {
            self.cursor_flush_at = None;
        }
    }

    /// Writes every held cursor: one `AdvanceCursors` per user, in user order.
    fn flush_cursors(&mut self) {
        self.cursor_flush_at = None;
        for (user, cursors) in std::mem::take(&mut self.held_cursors) {
            self.request(StoreCommand::AdvanceCursors { user, cursors }, None);
        }
    }

    fn fetch(
        &mut self,
        now: Instant,
        conn: ConnId,
        user: UserId,
        epoch: Epoch,
        fetch: proto::FetchRequest,
    ) {
        let Ok(conv) = fetch.conv.parse::<ConvId>() else {
            self.transmit(
                conn,
                error_kind(ErrorCode::BadConversation, "bad conversation id"),
            );
            return;
        };
        let cap = self.config.fetch_limit_cap;
        let limit = if fetch.limit == 0 {
            cap
        } else {
            fetch.limit.min(cap)
        };
        self.request_awaited(
            now,
            StoreCommand::Fetch {
                user,
                conv,
                log_epoch: LogEpoch(fetch.log_epoch),
                after_seq: fetch.after_seq,
                limit,
            },
            Pending::Fetch { conn, user, epoch },
        );
    }

    // ---- store replies -----------------------------------------------------------------

    /// The result of a `Store` output. Replies to requests the node no longer waits for
    /// (cursor advances, releases, sessions gone) are dropped.
    pub fn handle_store_reply(&mut self, now: Instant, id: RequestId, result: StoreResult) {
        if let Some(deadline) = self.store_deadlines.remove(&id) {
            self.store_timers.remove(&(deadline, id));
        }
        let Some(pending) = self.pending_store.remove(&id) else {
            return;
        };
        match pending {
            Pending::Bind {
                conn,
                user,
                epoch,
                sent_at,
            } => self.bound(now, conn, user, epoch, sent_at, result),
            Pending::Refresh { sent_at, batch } => self.refreshed(sent_at, &batch, result),
            Pending::Sync { conn, user, epoch } => {
                if !self.is_session(conn, user, epoch) {
                    return;
                }
                // A shard down fails only its own conversations: the rest are answered,
                // and the client is told the answer is incomplete.
                let (heads, incomplete) = match result {
                    Ok(StoreReply::Heads(heads)) => (heads, false),
                    Ok(StoreReply::PartialHeads { heads, .. }) => (heads, true),
                    _ => {
                        self.transmit(
                            conn,
                            error_kind(ErrorCode::Unavailable, "sync failed, retry"),
                        );
                        return;
                    }
                };
                // A user in a few thousand conversations would otherwise get an answer
                // over the frame limit, which could never be sent: it goes in pages, back
                // to back, all but the last marked `more`; no heads is one empty page.
                let mut pages: Vec<_> = pages_within(
                    heads.iter().map(head_to_proto),
                    self.config.max_answer_bytes,
                )
                .collect();
                if pages.is_empty() {
                    pages.push(Vec::new());
                }
                let last = pages.len() - 1;
                for (i, heads) in pages.into_iter().enumerate() {
                    let more = i < last;
                    self.transmit(
                        conn,
                        Kind::SyncAnswer(proto::SyncAnswer {
                            heads,
                            more,
                            incomplete: incomplete && !more,
                        }),
                    );
                }
            }
            Pending::Fetch { conn, user, epoch } => {
                if !self.is_session(conn, user, epoch) {
                    return;
                }
                let frame = match result {
                    Ok(StoreReply::Fetched { head, messages }) => {
                        Kind::FetchAnswer(proto::FetchAnswer {
                            head: Some(head_to_proto(&head)),
                            messages: pages_within(
                                messages.iter().map(message_to_proto),
                                self.config.max_answer_bytes,
                            )
                            .next()
                            .unwrap_or_default(),
                        })
                    }
                    // The same rule as HTTP `/history` (403): a conversation the user is
                    // not in tells them nothing, not even its head.
                    Ok(StoreReply::NotMember) => {
                        error_kind(ErrorCode::NotMember, "not a member of this conversation")
                    }
                    _ => error_kind(ErrorCode::Unavailable, "fetch failed, retry"),
                };
                self.transmit(conn, frame);
            }
        }
    }

    fn bound(
        &mut self,
        now: Instant,
        conn: ConnId,
        user: UserId,
        epoch: Epoch,
        sent_at: Instant,
        result: StoreResult,
    ) {
        let still_binding = matches!(
            self.conns.get(&conn).map(|c| &c.state),
            Some(ConnState::Binding { user: u, epoch: e }) if *u == user && *e == epoch
        );
        let outcome = match result {
            Ok(StoreReply::SessionBound(Ok(()))) => Ok(()),
            Ok(StoreReply::SessionBound(Err(current))) => Err(Some(current)),
            // Unavailable, or a reply of the wrong kind: we cannot know whether it bound.
            _ => Err(None),
        };
        if !still_binding {
            // The connection went away while the bind was in flight; if it (maybe) bound,
            // give the claim back rather than leave it leased to nobody.
            if !matches!(outcome, Err(Some(_))) {
                self.release_if_unheld(user, epoch);
            }
            return;
        }
        match outcome {
            Err(Some(current)) => {
                self.stats.logins_failed += 1;
                self.close_with_error(
                    conn,
                    ErrorCode::StaleEpoch,
                    &format!("ticket epoch {} superseded by {}", epoch.0, current.0),
                );
            }
            Err(None) => {
                self.stats.logins_failed += 1;
                self.close_with_error(conn, ErrorCode::Unavailable, "store unavailable, retry");
                self.release_if_unheld(user, epoch);
            }
            Ok(()) => self.go_live(now, conn, user, epoch, sent_at),
        }
    }

    fn go_live(
        &mut self,
        now: Instant,
        conn: ConnId,
        user: UserId,
        epoch: Epoch,
        sent_at: Instant,
    ) {
        let proven_until = sent_at + self.config.proven_window();
        if now >= proven_until {
            // The bind took so long that its lease may already be gone from the store.
            self.stats.logins_failed += 1;
            self.close_with_error(conn, ErrorCode::Unavailable, "store too slow, retry");
            self.release_if_unheld(user, epoch);
            return;
        }
        if let Some(&(old_conn, old_epoch)) = self.sessions.get(&user) {
            if old_epoch >= epoch {
                // Store replies raced: a newer (or the same) ticket is already live here.
                self.stats.logins_failed += 1;
                self.close_with_error(conn, ErrorCode::StaleEpoch, "a newer session is live");
                self.release_if_unheld(user, epoch);
                return;
            }
            // Kicked before LoginOk goes out, so the two sessions never overlap.
            self.kick(old_conn, KickReason::TakenOver, "logged in elsewhere");
        }
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        self.binding.remove(&(user, conn));
        c.state = ConnState::Live(Session {
            user,
            epoch,
            proven_until,
            bucket: TokenBucket::full(now, self.config.send_rate_per_sec, self.config.send_burst),
        });
        self.sessions.insert(user, (conn, epoch));
        self.stats.logins_ok += 1;
        if self.next_refresh.is_none() {
            self.next_refresh = Some(now + self.config.refresh_interval);
        }
        self.transmit(
            conn,
            Kind::LoginOk(proto::LoginOk {
                user_id: user.0,
                epoch: epoch.0,
                server_id: self.config.server_id.0.clone(),
                heartbeat_interval_ms: self.config.heartbeat_interval.as_millis() as u64,
            }),
        );
        self.reschedule(conn);
    }

    fn refreshed(&mut self, sent_at: Instant, batch: &[(UserId, Epoch)], result: StoreResult) {
        // Unavailable: nothing is proven, and the fence deadlines stand.
        let Ok(StoreReply::LeasesRefreshed(entries)) = result else {
            return;
        };
        let proven_until = sent_at + self.config.proven_window();
        for (user, outcome) in entries {
            let Ok(i) = batch.binary_search_by_key(&user, |(u, _)| *u) else {
                continue;
            };
            let epoch = batch[i].1;
            let Some(&(conn, live_epoch)) = self.sessions.get(&user) else {
                continue;
            };
            if live_epoch != epoch {
                continue;
            }
            match outcome {
                LeaseRefresh::Refreshed => {
                    if let Some(ConnState::Live(s)) =
                        self.conns.get_mut(&conn).map(|c| &mut c.state)
                    {
                        s.proven_until = s.proven_until.max(proven_until);
                    }
                    self.reschedule(conn);
                }
                LeaseRefresh::Superseded { .. } => {
                    self.kick(conn, KickReason::TakenOver, "logged in elsewhere");
                }
                LeaseRefresh::Gone => self.kick(conn, KickReason::LoggedOut, "logged out"),
                // Its shard did not answer: nothing is proven, and its fence deadline
                // stands, while the rest of the batch was proven (one dead master fences
                // only its own users).
                LeaseRefresh::Unknown => {}
            }
        }
    }

    // ---- route link --------------------------------------------------------------------

    /// The route's answer to a `ToRoute` send: relayed to the sender if its session is still
    /// the one that sent it (a new session re-sends from its outbox).
    pub fn handle_route_result(&mut self, _now: Instant, result: RouteSendResult) {
        self.links.settle(result.request_id);
        let Some(p) = self.take_pending_send(result.request_id) else {
            return;
        };
        let frame = match (result.ack, result.nack) {
            (Some(ack), _) => Kind::SendAck(ack),
            (None, Some(nack)) => Kind::SendNack(nack),
            (None, None) => unavailable_nack(&p),
        };
        if self.is_session(p.conn, p.user, p.epoch) {
            self.transmit(p.conn, frame);
        }
    }

    /// The queue of the link a `ToRoute` named refused the send (full): it fails at once
    /// (retryable) rather than move to another link, where it could overtake the user's
    /// sends queued on this one.
    pub fn handle_route_failed(&mut self, now: Instant, request_id: u64) {
        if self.links.settle(request_id).is_some() {
            self.stats.route_sends_unrouted += 1;
        }
        self.fail_route_send(now, request_id);
    }

    /// The link a `ToRoute` named was already gone when the shell came to queue the send:
    /// the link goes down (as [`ServerNode::handle_route_link_down`]) and this send, which
    /// never left, is routed afresh.
    pub fn handle_route_link_gone(&mut self, now: Instant, link: RouteLinkId, send: RouteSend) {
        self.links.settle(send.request_id);
        self.handle_route_link_down(now, link);
        self.route(now, send);
    }

    /// A route link authenticated. A draining server takes no new links (the shell closes
    /// it; the route learns from the close).
    pub fn handle_route_link_up(
        &mut self,
        _now: Instant,
        link: RouteLinkId,
    ) -> Result<(), Refused> {
        if self.draining {
            return Err(Refused::Draining);
        }
        self.links.link_up(link);
        Ok(())
    }

    /// A route link failed, timed out or broke the protocol: every send unanswered on it
    /// fails (retryable: the client resends with the same msg id, so one that did append is
    /// not appended twice), and their users pick a live link next time.
    pub fn handle_route_link_down(&mut self, now: Instant, link: RouteLinkId) {
        for request_id in self.links.link_down(link) {
            self.fail_route_send(now, request_id);
        }
    }

    /// Unanswered sends on `link` (for the shell's logs).
    pub fn route_link_in_flight(&self, link: RouteLinkId) -> usize {
        self.links.in_flight(link)
    }

    /// The send will get no answer: the client may retry (same msg id).
    fn fail_route_send(&mut self, _now: Instant, request_id: u64) {
        let Some(p) = self.take_pending_send(request_id) else {
            return;
        };
        if self.is_session(p.conn, p.user, p.epoch) {
            self.transmit(p.conn, unavailable_nack(&p));
        }
    }

    /// Messages for sessions on this server.
    pub fn handle_push(&mut self, _now: Instant, batch: PushBatch) {
        for push in batch.pushes {
            let Some(message) = push.message else {
                continue;
            };
            let targets: BTreeSet<ConnId> = if push.all_sessions {
                self.sessions.values().map(|&(conn, _)| conn).collect()
            } else {
                push.recipients
                    .iter()
                    .filter_map(|u| self.sessions.get(&UserId(*u)).map(|&(conn, _)| conn))
                    .collect()
            };
            let conns: Vec<ConnId> = targets
                .into_iter()
                .filter(|&conn| self.admit_frame(conn))
                .collect();
            if !conns.is_empty() {
                self.outputs.push_back(ServerOutput::TransmitToMany {
                    conns,
                    frame: Frame {
                        kind: Some(Kind::Deliver(proto::Deliver {
                            message: Some(message),
                        })),
                    },
                });
            }
        }
    }

    /// The route took the user over (or logged them out) with a `KickUser` on `link`: close
    /// their session here if it is older than `below_epoch`, and stop any older login still
    /// binding. The answer is the last output, [`ServerOutput::KickUserDone`] for `link`.
    pub fn handle_kick_user(&mut self, _now: Instant, link: RouteLinkId, kick: KickUser) {
        let user = UserId(kick.user_id);
        let below = Epoch(kick.below_epoch);
        let reason = match KickReason::try_from(kick.reason) {
            Ok(KickReason::Unspecified) | Err(_) => KickReason::TakenOver,
            Ok(reason) => reason,
        };
        // A bind in flight may have reached the store before the takeover did; its LoginOk
        // would start a session the route believes is closed, so those go too.
        let candidates = self
            .binding
            .range((user, ConnId(0))..=(user, ConnId(u64::MAX)))
            .map(|&(_, conn)| conn)
            .chain(self.sessions.get(&user).map(|&(conn, _)| conn));
        let doomed: Vec<ConnId> = candidates
            .filter(|conn| match self.conns.get(conn).map(|c| &c.state) {
                Some(ConnState::Live(s)) => s.epoch < below,
                Some(ConnState::Binding { epoch, .. }) => *epoch < below,
                _ => false,
            })
            .collect();
        for conn in doomed {
            self.kick(conn, reason, "logged in elsewhere");
        }
        self.outputs.push_back(ServerOutput::KickUserDone {
            link,
            done: KickUserDone {
                user_id: kick.user_id,
                below_epoch: kick.below_epoch,
            },
        });
    }

    // ---- timers ------------------------------------------------------------------------

    pub fn handle_timeout(&mut self, now: Instant, wall: UnixMillis) {
        // Store timeouts first: a bind that timed out fails as UNAVAILABLE, not as a late
        // login, and a refresh that timed out proves nothing before the fences are checked.
        while let Some(&(at, id)) = self.store_timers.first() {
            if at > now {
                break;
            }
            self.stats.store_timeouts += 1;
            let timed_out = StoreUnavailable("no reply within store_timeout".to_owned());
            // Removes the timer; a reply arriving later finds nothing pending and is dropped.
            self.handle_store_reply(now, id, Err(timed_out));
        }
        while let Some((&(at, conn), _)) = self.timers.first_key_value() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, conn));
            if let Some(c) = self.conns.get_mut(&conn) {
                c.scheduled = None;
            }
            self.expire(now, conn);
        }
        if self.next_refresh.is_some_and(|at| at <= now) {
            self.refresh(now, wall);
        }
        if self.cursor_flush_at.is_some_and(|at| at <= now) {
            self.flush_cursors();
        }
    }

    fn expire(&mut self, now: Instant, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let idle = now >= c.last_heard + self.config.idle_timeout;
        match &c.state {
            ConnState::AwaitingLogin | ConnState::Binding { .. } if now >= c.login_deadline => {
                self.kick(conn, KickReason::LoginTimeout, "no login in time");
            }
            ConnState::Live(s)
                if now >= s.proven_until && !self.config.canaries.disabled(Canary::SelfFencing) =>
            {
                self.stats.fenced += 1;
                self.kick(conn, KickReason::Fenced, "server lost the store");
            }
            _ if idle => self.kick(conn, KickReason::Idle, "silent too long"),
            _ => self.reschedule(conn),
        }
    }

    fn refresh(&mut self, now: Instant, wall: UnixMillis) {
        if self.sessions.is_empty() {
            self.next_refresh = None;
            return;
        }
        self.next_refresh = Some(now + self.config.refresh_interval);
        let all: Vec<(UserId, Epoch)> = self
            .sessions
            .iter()
            .map(|(&user, &(_, epoch))| (user, epoch))
            .collect();
        let lease_until = wall.plus(self.config.lease_ttl);
        for batch in all.chunks(self.config.refresh_batch) {
            self.request_awaited(
                now,
                StoreCommand::RefreshLeases {
                    server: self.config.server_id.clone(),
                    lease_until,
                    sessions: batch.to_vec(),
                },
                Pending::Refresh {
                    sent_at: now,
                    batch: batch.to_vec(),
                },
            );
        }
    }

    // ---- internals ---------------------------------------------------------------------

    fn is_session(&self, conn: ConnId, user: UserId, epoch: Epoch) -> bool {
        self.sessions.get(&user) == Some(&(conn, epoch))
    }

    fn request(&mut self, command: StoreCommand, pending: Option<Pending>) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        if let Some(pending) = pending {
            self.pending_store.insert(id, pending);
        }
        self.outputs
            .push_back(ServerOutput::Store(StoreRequest { id, command }));
        id
    }

    /// A request whose reply the node waits on: without one within `store_timeout` it is
    /// answered as failed (see `handle_timeout`).
    fn request_awaited(&mut self, now: Instant, command: StoreCommand, pending: Pending) {
        let id = self.request(command, Some(pending));
        let deadline = now + self.config.store_timeout;
        self.store_deadlines.insert(id, deadline);
        self.store_timers.insert((deadline, id));
    }

    fn take_pending_send(&mut self, request_id: u64) -> Option<PendingSend> {
        let p = self.pending_sends.remove(&request_id)?;
        if let Some(c) = self.conns.get_mut(&p.conn) {
            c.sends_in_flight.remove(&request_id);
        }
        Some(p)
    }

    /// Queues a frame, or kicks the connection if its unwritten backlog is already full.
    fn transmit(&mut self, conn: ConnId, kind: Kind) {
        if self.admit_frame(conn) {
            self.outputs.push_back(ServerOutput::Transmit {
                conn,
                frame: Frame { kind: Some(kind) },
            });
        }
    }

    /// Counts one more frame into `conn`'s unwritten backlog, or kicks the connection if
    /// the backlog is already full. `false`: do not send it the frame.
    fn admit_frame(&mut self, conn: ConnId) -> bool {
        let max = self.config.max_outbound_frames;
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        if c.unwritten >= max {
            self.stats.slow_consumers += 1;
            self.kick(conn, KickReason::SlowConsumer, "too far behind");
            return false;
        }
        c.unwritten += 1;
        true
    }

    fn kick(&mut self, conn: ConnId, reason: KickReason, message: &str) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        *self.stats.kicks.entry(reason).or_default() += 1;
        let kick = Kind::Kick(proto::Kick {
            reason: reason as i32,
            message: message.to_owned(),
        });
        self.close_with(conn, kick);
    }

    fn close_with_error(&mut self, conn: ConnId, code: ErrorCode, message: &str) {
        self.close_with(conn, error_kind(code, message));
    }

    /// A last frame (exempt from the backlog limit: the connection ends anyway), then Close.
    fn close_with(&mut self, conn: ConnId, last: Kind) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        self.outputs.push_back(ServerOutput::Transmit {
            conn,
            frame: Frame { kind: Some(last) },
        });
        self.outputs.push_back(ServerOutput::Close { conn });
        self.forget(conn);
    }

    /// Drops every trace of the connection; a live session ends here and gives its claim back.
    fn forget(&mut self, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(key) = c.scheduled {
            self.timers.remove(&key);
        }
        for request_id in &c.sends_in_flight {
            self.pending_sends.remove(request_id);
        }
        match c.state {
            ConnState::Live(s) => {
                if self.sessions.get(&s.user) == Some(&(conn, s.epoch)) {
                    self.sessions.remove(&s.user);
                }
                // Before the claim goes: a client that closes after its last DeliverAck
                // finds its place in the store when it comes back.
                self.flush_cursors_of(s.user);
                self.release_if_unheld(s.user, s.epoch);
            }
            // The bind's reply releases the claim if it landed (see `bound`).
            ConnState::Binding { user, .. } => {
                self.binding.remove(&(user, conn));
            }
            ConnState::AwaitingLogin => {}
        }
    }

    /// Compare-epoch cleanup of the claim, unless a live session here holds that very claim.
    /// It is expired, not deleted: its resume token and resumption secret stay, so the
    /// client (a dropped connection, a restart of this server) logs in again without the
    /// password. Only a logout or a deletion deletes a claim.
    fn release_if_unheld(&mut self, user: UserId, epoch: Epoch) {
        if self.sessions.get(&user).is_some_and(|&(_, e)| e == epoch) {
            return;
        }
        self.request(StoreCommand::ExpireClaim { user, epoch }, None);
    }

    /// Puts the connection's earliest deadline in the timer table.
    fn reschedule(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if let Some(key) = c.scheduled.take() {
            self.timers.remove(&key);
        }
        let idle = (c.last_heard + self.config.idle_timeout, TimerReason::Idle);
        let other = match &c.state {
            ConnState::AwaitingLogin | ConnState::Binding { .. } => {
                (c.login_deadline, TimerReason::LoginDeadline)
            }
            ConnState::Live(_) if self.config.canaries.disabled(Canary::SelfFencing) => idle,
            ConnState::Live(s) => (s.proven_until, TimerReason::Fence),
        };
        let (at, reason) = if other.0 <= idle.0 { other } else { idle };
        c.scheduled = Some((at, conn));
        self.timers.insert((at, conn), reason);
    }
}

impl ServerNode {
    /// Panics unless the indexes agree with the connections. Checked by the tests and the
    /// fuzz targets (`cim-fuzz-checks`) after every step; not meant for production paths.
    #[doc(hidden)]
    pub fn check_invariants(&self) {
        for (user, &(conn, epoch)) in &self.sessions {
            match self.conns.get(&conn).map(|c| &c.state) {
                Some(ConnState::Live(s)) => assert_eq!((s.user, s.epoch), (*user, epoch)),
                other => panic!("session of {user} points at {other:?}"),
            }
        }
        for (id, c) in &self.conns {
            match &c.state {
                ConnState::Live(s) => assert_eq!(self.sessions.get(&s.user), Some(&(*id, s.epoch))),
                ConnState::Binding { user, .. } => assert!(self.binding.contains(&(*user, *id))),
                ConnState::AwaitingLogin => {}
            }
            let key = c.scheduled.expect("every connection has a deadline");
            assert_eq!(key.1, *id);
            assert!(self.timers.contains_key(&key));
        }
        assert_eq!(self.timers.len(), self.conns.len());
        for (user, conn) in &self.binding {
            assert!(matches!(
                self.conns.get(conn).map(|c| &c.state),
                Some(ConnState::Binding { user: u, .. }) if u == user
            ));
        }
        assert!(self.store_deadlines.keys().eq(self.pending_store.keys()));
        self.links.check_invariants();
        assert_eq!(self.store_timers.len(), self.store_deadlines.len());
        for (request_id, p) in &self.pending_sends {
            let c = self
                .conns
                .get(&p.conn)
                .expect("sends die with their connection");
            assert!(c.sends_in_flight.contains(request_id));
        }
    }
}

/// Frames a client may send; anything else on a client connection is a protocol error.
fn is_client_request(kind: &Kind) -> bool {
    matches!(
        kind,
        Kind::Send(_) | Kind::DeliverAck(_) | Kind::SyncRequest(_) | Kind::FetchRequest(_)
    )
}

/// Splits `items` into pages of at most `budget` bytes encoded as a repeated field (one
/// item per page at least, however big), lazily: a caller that needs only the first page
/// converts no more items than it holds.
fn pages_within<T: prost::Message>(
    items: impl Iterator<Item = T>,
    budget: usize,
) -> impl Iterator<Item = Vec<T>> {
    // The field tag and length prefix of a repeated message: at most 1 + 10 bytes.
    let entry_len = |item: &T| item.encoded_len() + 11;
    let mut items = items.peekable();
    std::iter::from_fn(move || {
        let mut page = Vec::new();
        let mut used = 0;
        while let Some(item) =
            items.next_if(|item| page.is_empty() || used + entry_len(item) <= budget)
        {
            used += entry_len(&item);
            page.push(item);
        }
        (!page.is_empty()).then_some(page)
    })
}

/// Cursors held for one user at most (see `ServerConfig::cursor_flush_delay`); more are
/// written at once.
const MAX_HELD_CURSORS: usize = 256;

/// Adds one acked cursor to a user's held ones so that writing them in order has the effect
/// of writing every ack in order: within one log epoch only the highest seq counts, so it
/// raises the conversation's last held entry when that has the same epoch; another epoch
/// (which resets the stored cursor) is kept as an entry of its own, after it.
fn merge_cursor(
    held: &mut Vec<(ConvId, LogEpoch, u64)>,
    (conv, epoch, seq): (ConvId, LogEpoch, u64),
) {
    match held.iter_mut().rev().find(|(c, _, _)| *c == conv) {
        Some((_, e, s)) if *e == epoch => *s = (*s).max(seq),
        _ => held.push((conv, epoch, seq)),
    }
}

fn error_kind(code: ErrorCode, message: &str) -> Kind {
    Kind::Error(proto::Error {
        code: code as i32,
        message: message.to_owned(),
    })
}

fn unavailable_nack(p: &PendingSend) -> Kind {
    Kind::SendNack(proto::SendNack {
        msg_id_hi: p.msg_id_hi,
        msg_id_lo: p.msg_id_lo,
        code: ErrorCode::Unavailable as i32,
        reason: "route unavailable, retry".to_owned(),
        retryable: true,
    })
}

#[cfg(test)]
mod tests;
