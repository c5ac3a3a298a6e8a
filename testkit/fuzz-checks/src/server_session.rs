//! Sequences of client frames (structured and raw bytes through the codec) into one
//! `ServerNode`, interleaved with store and route answers (good, stale, failed, of the wrong
//! kind, never), pushes, kicks from the route, written-frame reports and time.
//!
//! A model beside the node checks every output:
//! - no `BindSession` without a ticket this server would accept (our key, this server, not
//!   expired), and no `LoginOk` on a connection before the store bound *its* ticket's claim;
//! - at most one live session per user; a route kick leaves none older than its epoch;
//! - store reads and writes only for the connection's own session user; no command a server
//!   never issues (an append, a claim change);
//! - route sends only from a live session, under its user and epoch; `SendAck` only for a
//!   message of that connection the route acknowledged; `Deliver` only to live sessions;
//! - only frames a server may send reach a client, each encodes under the frame limit, and
//!   answers are paged within `max_answer_bytes`; nothing after a connection's `Close`;
//! - a connection's unwritten backlog never passes `max_outbound_frames` (+1 for the last
//!   Kick or Error), connections never pass `max_connections`;
//! - the node's own index invariants (`ServerNode::check_invariants`) after every step, and
//!   its timers settle (no deadline that stays in the past).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cim_core::time::Instant;

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use cim_core::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};
use cim_core::route::tickets::{Grant, TicketKeys};
use cim_core::server::{ConnId, RouteLinkId, ServerConfig, ServerNode, ServerOutput};
use cim_core::store::{
    ConvHead, LeaseRefresh, StoreCommand, StoreReply, StoreRequest, StoreUnavailable, StoredMessage,
};
use cim_proto::codec::{DEFAULT_MAX_FRAME, Decoded, FrameCodec};
use cim_proto::frame::Kind;
use cim_proto::{self as proto, Frame};
use prost::Message as _;

use crate::Reached;

const SECRET: &[u8] = b"fuzz-ticket-secret";
const KEY_ID: u32 = 1;
const S1: &str = "s1";
const WALL0: u64 = 1_700_000_000_000;
const SKEW: Duration = Duration::from_secs(2);
/// Connections the operations address; one more than `max_connections` so the limit is hit.
const SLOTS: usize = 4;
const MAX_CONNECTIONS: usize = 3;
const MAX_OUTBOUND: usize = 8;
const MAX_ANSWER_BYTES: usize = 600;
const MAX_OPS: usize = 300;

pub const FEATURES: &[&str] = &[
    "login_ok",
    "login_refused",
    "login_stale",
    "send_acked",
    "send_nacked",
    "rate_limited",
    "deliver",
    "sync_paged",
    "fetch_answer",
    "slow_consumer",
    "kicked_by_route",
    "taken_over",
    "fenced",
    "timed_out",
    "protocol_error",
    "refused_connection",
];

#[derive(Debug, Arbitrary)]
enum Op {
    Open(u8),
    Close(u8),
    Written(u8, u8),
    Frame(u8, ClientFrame),
    /// Bytes through the gateway's codec: a frame if they decode, else a protocol error.
    Raw(u8, Vec<u8>),
    Store(StoreAnswer),
    Route(RouteAnswer),
    Push {
        all_sessions: bool,
        users: Vec<u8>,
        seq: u8,
        body_len: u16,
    },
    KickUser {
        user: u8,
        below_epoch: u8,
        reason: i32,
    },
    Advance(u16),
    RegistryLost,
    Drain,
}

#[derive(Debug, Arbitrary)]
enum ClientFrame {
    /// A ticket minted by `key` for `server`, expiring `ttl_ms` from now (negative: expired).
    Login {
        user: u8,
        epoch: u8,
        ttl_ms: i32,
        server: TicketServer,
        key: TicketKey,
    },
    /// A good ticket with one field changed to `value`.
    LoginMutated {
        user: u8,
        epoch: u8,
        field: u8,
        value: u64,
    },
    LoginForged {
        key_id: u32,
        user_id: u64,
        server_id: String,
        epoch: u64,
        expires_at_ms: u64,
        mac: Vec<u8>,
    },
    LoginWithoutTicket,
    Send {
        conv: Conv,
        body_len: u16,
        msg_id: u64,
    },
    DeliverAck(Vec<(Conv, u64, u64)>),
    Sync,
    Fetch {
        conv: Conv,
        log_epoch: u64,
        after_seq: u64,
        limit: u32,
    },
    Ping(u64),
    Empty,
}

#[derive(Debug, Arbitrary)]
enum TicketServer {
    This,
    Other,
}

#[derive(Debug, Arbitrary)]
enum TicketKey {
    Ours,
    /// Our key id, another secret.
    WrongSecret,
    /// A key id this server does not know.
    UnknownId,
}

#[derive(Debug, Arbitrary)]
enum Conv {
    All,
    Group(u8),
    Private(u8, u8),
    Text(String),
}

impl Conv {
    fn text(&self) -> String {
        match self {
            Self::All => "all".into(),
            Self::Group(g) => format!("g:g{}", g % 4),
            Self::Private(a, b) => format!("p:{}:{}", a % 8, b % 8),
            Self::Text(t) => t.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum StoreAnswer {
    /// A plausible success for the pending request `which` (mod the number pending).
    Ok(u8),
    /// A superseded epoch, a lost lease.
    Stale(u8),
    Unavailable(u8),
    /// A reply of another command's kind (a shell bug; must not be trusted).
    WrongKind(u8),
    /// A sync answered with many heads with long names, to page.
    ManyHeads {
        which: u8,
        count: u16,
        name_len: u8,
    },
    /// Every pending request, successfully, oldest first.
    AllOk,
    /// A reply to a request id that was never issued.
    Stray(u64),
}

#[derive(Debug, Arbitrary)]
enum RouteAnswer {
    Ack { which: u8, seq: u64 },
    Nack { which: u8, retryable: bool },
    Neither(u8),
    Failed(u8),
    Stray(u64),
}

/// What the model knows of one connection.
#[derive(Debug, Default)]
struct ConnModel {
    awaiting_login: bool,
    /// The (user, epoch) of a ticket this server must accept, presented on this connection.
    presented: Option<(u64, u64)>,
    /// The store answered this connection's `BindSession` with success.
    bound: bool,
    live: Option<(u64, u64)>,
    unwritten: usize,
    /// Message ids the route acknowledged for this connection's sends.
    acked_by_route: BTreeSet<(u64, u64)>,
}

#[derive(Debug)]
struct Harness {
    node: ServerNode,
    keys: TicketKeys,
    t0: Instant,
    now: Instant,
    slots: [Option<ConnId>; SLOTS],
    next_conn: u64,
    conns: BTreeMap<ConnId, ConnModel>,
    closed: BTreeSet<ConnId>,
    draining: bool,
    store: Vec<StoreRequest>,
    /// Which connection's login a `BindSession` request belongs to.
    binds: BTreeMap<u64, ConnId>,
    /// Which connection a sync request belongs to, with the number of heads we answered.
    syncs: BTreeMap<u64, ConnId>,
    route: Vec<(proto::RouteSend, ConnId)>,
    /// The connection whose frame is being handled (route sends may only come from it), and
    /// its session then (the frame may get the connection kicked before its last output).
    current: Option<ConnId>,
    /// The `KickUser` being handled, until its one `KickUserDone` comes out.
    kicking: Option<proto::KickUser>,
    current_live: Option<(u64, u64)>,
    reached: Reached,
}

pub fn check(data: &[u8]) -> Reached {
    let mut u = Unstructured::new(data);
    let mut h = Harness::new();
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        h.apply(op);
    }
    // Let every timer run out: nothing may stay past its deadline, and whatever was pending
    // is answered or expired by the node's own timeouts.
    h.advance(Duration::from_secs(120));
    h.reached
}

fn config() -> ServerConfig {
    let mut config = ServerConfig::new(ServerId::new(S1), TicketKeys::new(KEY_ID, SECRET));
    config.max_connections = MAX_CONNECTIONS;
    config.max_outbound_frames = MAX_OUTBOUND;
    config.send_rate_per_sec = 2;
    config.send_burst = 3;
    config.max_body = 64;
    config.fetch_limit_cap = 5;
    config.max_answer_bytes = MAX_ANSWER_BYTES;
    config.refresh_batch = 2;
    config
}

impl Harness {
    fn new() -> Self {
        let t0 = crate::origin();
        let mut node = ServerNode::new(config()).expect("valid config");
        node.handle_route_link_up(t0, RouteLinkId(1))
            .expect("a new server takes links");
        Self {
            node,
            keys: TicketKeys::new(KEY_ID, SECRET),
            t0,
            now: t0,
            slots: [None; SLOTS],
            next_conn: 1,
            conns: BTreeMap::new(),
            closed: BTreeSet::new(),
            draining: false,
            store: Vec::new(),
            binds: BTreeMap::new(),
            syncs: BTreeMap::new(),
            route: Vec::new(),
            current: None,
            kicking: None,
            current_live: None,
            reached: Reached::new(),
        }
    }

    fn wall(&self) -> UnixMillis {
        UnixMillis(WALL0 + self.now.duration_since(self.t0).as_millis() as u64)
    }

    fn slot(&self, slot: u8) -> Option<ConnId> {
        self.slots[usize::from(slot) % SLOTS]
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Open(slot) => {
                let conn = ConnId(self.next_conn);
                self.next_conn += 1;
                let result = self.node.handle_connection_opened(self.now, conn);
                let full = self.conns.len() >= MAX_CONNECTIONS;
                assert_eq!(
                    result.is_err(),
                    full || self.draining,
                    "open with {} connections, draining {}: {result:?}",
                    self.conns.len(),
                    self.draining
                );
                if result.is_ok() {
                    self.conns.insert(
                        conn,
                        ConnModel {
                            awaiting_login: true,
                            ..ConnModel::default()
                        },
                    );
                    self.slots[usize::from(slot) % SLOTS] = Some(conn);
                } else {
                    self.reached.insert("refused_connection");
                }
            }
            Op::Close(slot) => {
                if let Some(conn) = self.slot(slot) {
                    self.node.handle_connection_closed(self.now, conn);
                    self.conns.remove(&conn);
                    self.closed.insert(conn);
                    // Judged now, outside any frame: a session that ends writes its held
                    // cursors, which must not be taken for a request of the next frame's
                    // session.
                    self.drain();
                }
            }
            Op::Written(slot, n) => {
                if let Some(conn) = self.slot(slot) {
                    self.node.handle_written(conn, usize::from(n));
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.unwritten = c.unwritten.saturating_sub(usize::from(n));
                    }
                    self.drain();
                }
            }
            Op::Frame(slot, frame) => {
                if let Some(conn) = self.slot(slot) {
                    let frame = self.client_frame(conn, frame);
                    self.frame(conn, frame);
                }
            }
            Op::Raw(slot, bytes) => {
                if let Some(conn) = self.slot(slot) {
                    match FrameCodec::default().decode(&bytes) {
                        Ok(Decoded::Frame { frame, .. }) => {
                            // A raw login's ticket counts as presented only if it is one this
                            // server must accept (it can be: the corpus may hold one).
                            if let Some(Kind::Login(login)) = &frame.kind {
                                let accept = login.ticket.as_ref().and_then(|t| self.accepts(t));
                                self.present(conn, accept);
                            }
                            self.frame(conn, frame);
                        }
                        Ok(Decoded::NeedMore) => {}
                        Err(e) => {
                            self.node.handle_protocol_error(
                                self.now,
                                conn,
                                e.code(),
                                &e.to_string(),
                            );
                            if self.conns.contains_key(&conn) {
                                self.reached.insert("protocol_error");
                            }
                            self.drain();
                        }
                    }
                }
            }
            Op::Store(answer) => self.store_answer(answer),
            Op::Route(answer) => self.route_answer(answer),
            Op::Push {
                all_sessions,
                users,
                seq,
                body_len,
            } => {
                let message = proto::Message {
                    conv: "all".into(),
                    log_epoch: 1,
                    seq: u64::from(seq) + 1,
                    sender: 1,
                    msg_id_hi: 0,
                    msg_id_lo: u64::from(seq),
                    body: Bytes::from(vec![b'x'; usize::from(body_len % 256)]),
                    appended_at_ms: WALL0,
                };
                let batch = proto::PushBatch {
                    pushes: vec![proto::Push {
                        message: Some(message),
                        recipients: users.iter().map(|u| u64::from(u % 8)).collect(),
                        all_sessions,
                    }],
                };
                self.node.handle_push(self.now, batch);
                self.drain();
            }
            Op::KickUser {
                user,
                below_epoch,
                reason,
            } => {
                let kick = proto::KickUser {
                    user_id: u64::from(user % 8),
                    below_epoch: u64::from(below_epoch % 8),
                    reason,
                };
                self.kicking = Some(kick);
                self.node.handle_kick_user(self.now, RouteLinkId(1), kick);
                let outputs = self.drain();
                assert!(self.kicking.is_none(), "a kick without its answer");
                assert!(
                    matches!(outputs.last(), Some(ServerOutput::KickUserDone { .. })),
                    "the answer is the kick's last output: {outputs:?}"
                );
                for (conn, c) in &self.conns {
                    if let Some((user, epoch)) = c.live {
                        assert!(
                            user != kick.user_id || epoch >= kick.below_epoch,
                            "{conn:?} still holds {user}@{epoch} after a kick below {}",
                            kick.below_epoch
                        );
                    }
                }
            }
            // Up to 13 s: past the rate limiter's refill and the store timeout, and a few of
            // them past the lease refresh, the fence and the idle timeout.
            Op::Advance(ms) => self.advance(Duration::from_millis(u64::from(ms % 13_000))),
            Op::RegistryLost => {
                self.node.handle_registry_session_lost(self.now);
                self.drain();
                assert!(
                    self.conns.is_empty(),
                    "connections left after the registry session was lost"
                );
                // Refusing clients until registered again; here at once registered again
                // (a loss and its recovery seen together), so later steps can open more.
                assert!(self.node.is_withdrawn());
                self.node.handle_registered(self.now);
                assert!(!self.node.is_withdrawn());
            }
            Op::Drain => {
                self.node.begin_drain(self.now);
                self.draining = true;
                self.drain();
                assert!(self.conns.is_empty(), "connections left after draining");
            }
        }
    }

    /// A ticket this server must accept, checked independently of `TicketKeys::verify`: our
    /// key id, exactly the ticket we would mint for its fields, this server, not expired.
    fn accepts(&self, ticket: &proto::Ticket) -> Option<(u64, u64)> {
        let grant = Grant {
            user: UserId(ticket.user_id),
            server: ServerId::new(ticket.server_id.clone()),
            epoch: Epoch(ticket.epoch),
            expires_at: UnixMillis(ticket.expires_at_ms),
        };
        let genuine = ticket.key_id == KEY_ID && *ticket == self.keys.mint(&grant);
        let fresh = UnixMillis(ticket.expires_at_ms).plus(SKEW) > self.wall();
        (genuine && ticket.server_id == S1 && fresh).then_some((ticket.user_id, ticket.epoch))
    }

    fn present(&mut self, conn: ConnId, accept: Option<(u64, u64)>) {
        if let Some(c) = self.conns.get_mut(&conn)
            && c.awaiting_login
        {
            c.presented = accept;
        }
    }

    fn client_frame(&mut self, conn: ConnId, frame: ClientFrame) -> Frame {
        let kind = match frame {
            ClientFrame::Login {
                user,
                epoch,
                ttl_ms,
                server,
                key,
            } => {
                let expires = (self.wall().0 as i64 + i64::from(ttl_ms)).max(0) as u64;
                let grant = Grant {
                    user: UserId(u64::from(user % 8)),
                    server: ServerId::new(match server {
                        TicketServer::This => S1,
                        TicketServer::Other => "s2",
                    }),
                    epoch: Epoch(u64::from(epoch % 8)),
                    expires_at: UnixMillis(expires),
                };
                let ticket = match key {
                    TicketKey::Ours => self.keys.mint(&grant),
                    TicketKey::WrongSecret => {
                        TicketKeys::new(KEY_ID, b"another-secret".to_vec()).mint(&grant)
                    }
                    TicketKey::UnknownId => TicketKeys::new(KEY_ID + 1, SECRET).mint(&grant),
                };
                Some(Kind::Login(proto::Login {
                    ticket: Some(ticket),
                }))
            }
            ClientFrame::LoginMutated {
                user,
                epoch,
                field,
                value,
            } => {
                let mut ticket = self.keys.mint(&Grant {
                    user: UserId(u64::from(user % 8)),
                    server: ServerId::new(S1),
                    epoch: Epoch(u64::from(epoch % 8)),
                    expires_at: self.wall().plus(Duration::from_secs(30)),
                });
                match field % 6 {
                    0 => ticket.key_id = value as u32,
                    1 => ticket.user_id = value,
                    2 => ticket.server_id = format!("s{}", value % 4),
                    3 => ticket.epoch = value,
                    4 => ticket.expires_at_ms = value,
                    _ => {
                        let i = (value as usize) % ticket.mac.len().max(1);
                        if let Some(b) = ticket.mac.get_mut(i) {
                            *b ^= (value >> 8) as u8;
                        }
                    }
                }
                Some(Kind::Login(proto::Login {
                    ticket: Some(ticket),
                }))
            }
            ClientFrame::LoginForged {
                key_id,
                user_id,
                server_id,
                epoch,
                expires_at_ms,
                mac,
            } => Some(Kind::Login(proto::Login {
                ticket: Some(proto::Ticket {
                    key_id,
                    user_id,
                    server_id,
                    epoch,
                    expires_at_ms,
                    mac,
                }),
            })),
            ClientFrame::LoginWithoutTicket => Some(Kind::Login(proto::Login { ticket: None })),
            ClientFrame::Send {
                conv,
                body_len,
                msg_id,
            } => Some(Kind::Send(proto::Send {
                msg_id_hi: 0,
                msg_id_lo: msg_id,
                conv: conv.text(),
                body: Bytes::from(vec![b'b'; usize::from(body_len % 100)]),
                sent_at_ms: 0,
                ..Default::default()
            })),
            ClientFrame::DeliverAck(cursors) => Some(Kind::DeliverAck(proto::DeliverAck {
                cursors: cursors
                    .into_iter()
                    .map(|(conv, log_epoch, seq)| proto::Cursor {
                        conv: conv.text(),
                        log_epoch,
                        seq,
                    })
                    .collect(),
            })),
            ClientFrame::Sync => Some(Kind::SyncRequest(proto::SyncRequest {})),
            ClientFrame::Fetch {
                conv,
                log_epoch,
                after_seq,
                limit,
            } => Some(Kind::FetchRequest(proto::FetchRequest {
                conv: conv.text(),
                log_epoch,
                after_seq,
                limit,
            })),
            ClientFrame::Ping(nonce) => Some(Kind::Ping(proto::Ping { nonce })),
            ClientFrame::Empty => None,
        };
        if let Some(Kind::Login(login)) = &kind {
            let accept = login.ticket.as_ref().and_then(|t| self.accepts(t));
            self.present(conn, accept);
        }
        Frame { kind }
    }

    fn frame(&mut self, conn: ConnId, frame: Frame) {
        let is_login = matches!(frame.kind, Some(Kind::Login(_)));
        let was_awaiting = self.conns.get(&conn).is_some_and(|c| c.awaiting_login);
        self.current = Some(conn);
        self.current_live = self.conns.get(&conn).and_then(|c| c.live);
        self.node.handle_frame(self.now, self.wall(), conn, frame);
        let outputs = self.drain();
        self.current = None;
        self.current_live = None;
        if is_login && was_awaiting {
            let presented = self.conns.get(&conn).and_then(|c| c.presented);
            let binds: Vec<(u64, u64)> = outputs
                .iter()
                .filter_map(|o| match o {
                    ServerOutput::Store(StoreRequest {
                        command: StoreCommand::BindSession { user, epoch, .. },
                        ..
                    }) => Some((user.0, epoch.0)),
                    _ => None,
                })
                .collect();
            match presented {
                Some(grant) => assert_eq!(binds, vec![grant], "a good ticket must bind"),
                None => {
                    assert!(
                        binds.is_empty(),
                        "a ticket we never minted binds: {binds:?}"
                    );
                    self.reached.insert("login_refused");
                }
            }
            if let Some(c) = self.conns.get_mut(&conn) {
                c.awaiting_login = false;
            }
        }
    }

    fn store_answer(&mut self, answer: StoreAnswer) {
        let pick = |store: &mut Vec<StoreRequest>, which: u8| {
            (!store.is_empty()).then(|| store.remove(usize::from(which) % store.len()))
        };
        match answer {
            StoreAnswer::Ok(which) => {
                if let Some(req) = pick(&mut self.store, which) {
                    let reply = self.good_reply(&req.command, 2, 8);
                    self.reply(req, Ok(reply));
                }
            }
            StoreAnswer::Stale(which) => {
                if let Some(req) = pick(&mut self.store, which) {
                    let reply = match &req.command {
                        StoreCommand::BindSession { epoch, .. } => {
                            StoreReply::SessionBound(Err(Epoch(epoch.0 + 1)))
                        }
                        StoreCommand::RefreshLeases { sessions, .. } => {
                            StoreReply::LeasesRefreshed(
                                sessions
                                    .iter()
                                    .enumerate()
                                    .map(|(i, (user, epoch))| {
                                        // Unknown: a Redis Cluster shard that did
                                        // not answer for this user.
                                        let outcome = match i % 3 {
                                            0 => LeaseRefresh::Superseded {
                                                current: Epoch(epoch.0 + 1),
                                            },
                                            1 => LeaseRefresh::Gone,
                                            _ => LeaseRefresh::Unknown,
                                        };
                                        (*user, outcome)
                                    })
                                    .collect(),
                            )
                        }
                        other => self.good_reply(other, 0, 0),
                    };
                    self.reply(req, Ok(reply));
                }
            }
            StoreAnswer::Unavailable(which) => {
                if let Some(req) = pick(&mut self.store, which) {
                    self.reply(req, Err(StoreUnavailable("fuzz".into())));
                }
            }
            StoreAnswer::WrongKind(which) => {
                if let Some(req) = pick(&mut self.store, which) {
                    let reply = match req.command {
                        StoreCommand::AdvanceCursors { .. } => StoreReply::Members(Vec::new()),
                        _ => StoreReply::CursorsAdvanced,
                    };
                    self.reply(req, Ok(reply));
                }
            }
            StoreAnswer::ManyHeads {
                which,
                count,
                name_len,
            } => {
                if let Some(req) = pick(&mut self.store, which) {
                    let reply =
                        self.good_reply(&req.command, usize::from(count % 300), name_len % 65);
                    self.reply(req, Ok(reply));
                }
            }
            StoreAnswer::AllOk => {
                for req in std::mem::take(&mut self.store) {
                    let reply = self.good_reply(&req.command, 2, 8);
                    self.reply(req, Ok(reply));
                }
            }
            StoreAnswer::Stray(id) => {
                if !self.store.iter().any(|r| r.id.0 == id) {
                    self.node.handle_store_reply(
                        self.now,
                        cim_core::store::RequestId(id),
                        Ok(StoreReply::CursorsAdvanced),
                    );
                    self.drain();
                }
            }
        }
    }

    /// What a healthy store answers; `heads` conversations with names of `name_len`.
    fn good_reply(&self, command: &StoreCommand, heads: usize, name_len: u8) -> StoreReply {
        match command {
            StoreCommand::BindSession { .. } => StoreReply::SessionBound(Ok(())),
            StoreCommand::RefreshLeases { sessions, .. } => StoreReply::LeasesRefreshed(
                sessions
                    .iter()
                    .map(|(user, _)| (*user, LeaseRefresh::Refreshed))
                    .collect(),
            ),
            StoreCommand::LoadHeads { .. } => StoreReply::Heads(
                (0..heads)
                    .map(|i| ConvHead {
                        conv: ConvId::group(&format!("{i}{}", "n".repeat(usize::from(name_len))))
                            .unwrap_or(ConvId::All),
                        log_epoch: LogEpoch(1),
                        head_seq: i as u64,
                        first_available_seq: 1,
                        cursor_seq: 0,
                        carried_from: LogEpoch(0),
                        carried_up_to: 0,
                    })
                    .collect(),
            ),
            StoreCommand::Fetch {
                conv,
                log_epoch,
                after_seq,
                limit,
                ..
            } => {
                let count = u64::from(*limit).min(20);
                StoreReply::Fetched {
                    head: ConvHead {
                        conv: conv.clone(),
                        log_epoch: *log_epoch,
                        head_seq: after_seq.saturating_add(count),
                        first_available_seq: 1,
                        cursor_seq: 0,
                        carried_from: LogEpoch(0),
                        carried_up_to: 0,
                    },
                    messages: (1..=count)
                        .map(|i| StoredMessage {
                            conv: conv.clone(),
                            log_epoch: *log_epoch,
                            seq: after_seq.saturating_add(i),
                            sender: UserId(1),
                            msg_id: ClientMsgId(u128::from(i)),
                            body: Bytes::from(vec![b'm'; 60]),
                            appended_at: UnixMillis(WALL0),
                        })
                        .collect(),
                }
            }
            StoreCommand::ReleaseClaim { .. } | StoreCommand::ExpireClaim { .. } => {
                StoreReply::ClaimReleased { released: true }
            }
            _ => StoreReply::CursorsAdvanced,
        }
    }

    fn reply(&mut self, req: StoreRequest, result: Result<StoreReply, StoreUnavailable>) {
        let bind_ok = matches!(result, Ok(StoreReply::SessionBound(Ok(()))));
        let heads = match &result {
            Ok(StoreReply::Heads(heads)) => Some(heads.len()),
            _ => None,
        };
        if let Some(conn) = self.binds.remove(&req.id.0) {
            if matches!(result, Ok(StoreReply::SessionBound(Err(_)))) {
                self.reached.insert("login_stale");
            }
            if let Some(c) = self.conns.get_mut(&conn)
                && bind_ok
            {
                c.bound = true;
            }
        }
        let sync_conn = self.syncs.remove(&req.id.0);
        self.node.handle_store_reply(self.now, req.id, result);
        let outputs = self.drain();
        // A sync answer goes out in pages, all but the last marked `more`, holding every head.
        if let (Some(conn), Some(heads)) = (sync_conn, heads) {
            let pages: Vec<&proto::SyncAnswer> = outputs
                .iter()
                .filter_map(|o| match o {
                    ServerOutput::Transmit {
                        conn: c,
                        frame:
                            Frame {
                                kind: Some(Kind::SyncAnswer(a)),
                            },
                    } if *c == conn => Some(a),
                    _ => None,
                })
                .collect();
            // A connection whose backlog filled mid-answer is kicked (the rest is never
            // sent, and no page it got says the answer is complete).
            let open = self.conns.contains_key(&conn);
            if !open {
                assert!(
                    pages.iter().all(|p| p.more),
                    "a closed connection got a last page"
                );
            }
            if open && !pages.is_empty() {
                let mores: Vec<bool> = pages.iter().map(|p| p.more).collect();
                let want: Vec<bool> = (0..pages.len()).map(|i| i + 1 < pages.len()).collect();
                assert_eq!(mores, want, "sync pages");
                let total: usize = pages.iter().map(|p| p.heads.len()).sum();
                assert_eq!(total, heads, "sync pages lost heads");
                if pages.len() > 1 {
                    self.reached.insert("sync_paged");
                }
            }
        }
    }

    fn route_answer(&mut self, answer: RouteAnswer) {
        let pick = |route: &mut Vec<(proto::RouteSend, ConnId)>, which: u8| {
            (!route.is_empty()).then(|| route.remove(usize::from(which) % route.len()))
        };
        let (send, result) = match answer {
            RouteAnswer::Ack { which, seq } => {
                let Some((send, conn)) = pick(&mut self.route, which) else {
                    return;
                };
                let inner = send.send.clone().unwrap_or_default();
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.acked_by_route.insert((inner.msg_id_hi, inner.msg_id_lo));
                }
                let ack = proto::SendAck {
                    msg_id_hi: inner.msg_id_hi,
                    msg_id_lo: inner.msg_id_lo,
                    conv: inner.conv,
                    log_epoch: 1,
                    seq,
                };
                (send, Some((Some(ack), None)))
            }
            RouteAnswer::Nack { which, retryable } => {
                let Some((send, _)) = pick(&mut self.route, which) else {
                    return;
                };
                let inner = send.send.clone().unwrap_or_default();
                let nack = proto::SendNack {
                    msg_id_hi: inner.msg_id_hi,
                    msg_id_lo: inner.msg_id_lo,
                    code: proto::ErrorCode::NotMember as i32,
                    reason: "fuzz".into(),
                    retryable,
                };
                (send, Some((None, Some(nack))))
            }
            RouteAnswer::Neither(which) => {
                let Some((send, _)) = pick(&mut self.route, which) else {
                    return;
                };
                (send, Some((None, None)))
            }
            RouteAnswer::Failed(which) => {
                let Some((send, _)) = pick(&mut self.route, which) else {
                    return;
                };
                (send, None)
            }
            RouteAnswer::Stray(request_id) => {
                if self.route.iter().any(|(s, _)| s.request_id == request_id) {
                    return;
                }
                let send = proto::RouteSend {
                    request_id,
                    ..Default::default()
                };
                (send, Some((None, None)))
            }
        };
        match result {
            Some((ack, nack)) => self.node.handle_route_result(
                self.now,
                proto::RouteSendResult {
                    request_id: send.request_id,
                    user_id: send.user_id,
                    ack,
                    nack,
                },
            ),
            None => self.node.handle_route_failed(self.now, send.request_id),
        }
        self.drain();
    }

    /// Moves time on by `by`, firing every deadline on the way at its own time.
    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        let mut fired = 0;
        while let Some((at, _)) = self.node.poll_timeout() {
            if at > until {
                break;
            }
            fired += 1;
            assert!(fired < 10_000, "timers do not settle");
            self.now = self.now.max(at);
            self.node.handle_timeout(self.now, self.wall());
            self.drain();
        }
        self.now = until;
    }

    /// Takes every output, checks it against the model, and returns them.
    fn drain(&mut self) -> Vec<ServerOutput> {
        self.node.check_invariants();
        let mut outputs = Vec::new();
        while let Some(output) = self.node.poll_output() {
            self.judge(&output);
            outputs.push(output);
        }
        assert_eq!(
            self.node.connections(),
            self.conns.len(),
            "connection count"
        );
        assert!(self.node.connections() <= MAX_CONNECTIONS);
        assert_eq!(
            self.node.sessions(),
            self.conns.values().filter(|c| c.live.is_some()).count(),
            "session count"
        );
        outputs
    }

    fn judge(&mut self, output: &ServerOutput) {
        match output {
            ServerOutput::Transmit { conn, frame } => self.judge_frame(*conn, frame, false),
            ServerOutput::TransmitToMany { conns, frame } => {
                assert!(
                    matches!(frame.kind, Some(Kind::Deliver(_))),
                    "only pushes go to many: {frame:?}"
                );
                let unique: BTreeSet<_> = conns.iter().collect();
                assert_eq!(unique.len(), conns.len(), "a push names a connection twice");
                for conn in conns {
                    self.judge_frame(*conn, frame, true);
                }
            }
            ServerOutput::Close { conn } => {
                assert!(self.conns.remove(conn).is_some(), "close of {conn:?}");
                self.closed.insert(*conn);
            }
            ServerOutput::Store(req) => {
                self.judge_store(req);
                self.store.push(req.clone());
            }
            ServerOutput::KickUserDone { link, done } => {
                assert_eq!(*link, RouteLinkId(1), "the link the kick came on");
                let kick = self.kicking.take().expect("a kick answer without a kick");
                assert_eq!(
                    (done.user_id, done.below_epoch),
                    (kick.user_id, kick.below_epoch)
                );
            }
            ServerOutput::ToRoute { link, send } => {
                assert_eq!(*link, RouteLinkId(1), "the only link up");
                let conn = self
                    .current
                    .expect("route sends only while handling a frame");
                assert_eq!(
                    self.current_live,
                    Some((send.user_id, send.epoch)),
                    "a route send under another session"
                );
                assert!(send.send.is_some());
                self.route.push((send.clone(), conn));
            }
        }
    }

    fn judge_store(&mut self, req: &StoreRequest) {
        let session_user = |h: &Self, user: UserId| {
            assert!(h.current.is_some(), "reads only while handling a frame");
            assert_eq!(
                h.current_live.map(|(u, _)| u),
                Some(user.0),
                "a store request for another user than the session's"
            );
        };
        match &req.command {
            StoreCommand::BindSession {
                user,
                epoch,
                server,
                ..
            } => {
                assert_eq!(server.as_str(), S1);
                let conn = self.current.expect("binds only on a login frame");
                assert_eq!(
                    self.conns.get(&conn).and_then(|c| c.presented),
                    Some((user.0, epoch.0)),
                    "bind without an accepted ticket"
                );
                self.binds.insert(req.id.0, conn);
            }
            StoreCommand::LoadHeads { user } => {
                session_user(self, *user);
                let conn = self.current.expect("checked above");
                self.syncs.insert(req.id.0, conn);
            }
            StoreCommand::Fetch { user, .. } => session_user(self, *user),
            // Acked cursors are held and written later (`cursor_flush_delay`): on the flush
            // timer or when the session ends, not while its frame is handled.
            StoreCommand::AdvanceCursors { user, .. } => {
                if self.current.is_some() && self.current_live.is_some() {
                    session_user(self, *user)
                }
            }
            StoreCommand::RefreshLeases {
                server, sessions, ..
            } => {
                assert_eq!(server.as_str(), S1);
                assert!(!sessions.is_empty() && sessions.len() <= 2, "refresh batch");
            }
            StoreCommand::ReleaseClaim { .. } | StoreCommand::ExpireClaim { .. } => {}
            other => panic!("a server never issues {other:?}"),
        }
    }

    fn judge_frame(&mut self, conn: ConnId, frame: &Frame, push: bool) {
        assert!(
            !self.closed.contains(&conn),
            "a frame after the close of {conn:?}: {frame:?}"
        );
        let kind = frame
            .kind
            .as_ref()
            .expect("the node never sends empty frames");
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(frame, &mut buf)
            .unwrap_or_else(|e| panic!("a frame to a client does not encode: {e}"));
        assert!(buf.len() <= DEFAULT_MAX_FRAME + 10);
        let c = self
            .conns
            .get_mut(&conn)
            .unwrap_or_else(|| panic!("a frame to unknown {conn:?}"));
        let last = matches!(kind, Kind::Kick(_) | Kind::Error(_));
        c.unwritten += 1;
        assert!(
            c.unwritten <= MAX_OUTBOUND + usize::from(last),
            "{conn:?} has {} unwritten frames",
            c.unwritten
        );
        match kind {
            Kind::LoginOk(ok) => {
                assert_eq!(
                    c.presented,
                    Some((ok.user_id, ok.epoch)),
                    "LoginOk without an accepted ticket"
                );
                assert!(c.bound, "LoginOk before the store bound the session");
                assert!(c.live.is_none(), "a second LoginOk");
                c.live = Some((ok.user_id, ok.epoch));
                for (other, o) in &self.conns {
                    if *other != conn {
                        assert!(
                            o.live.is_none_or(|(u, _)| u != ok.user_id),
                            "two live sessions of user {}",
                            ok.user_id
                        );
                    }
                }
                self.reached.insert("login_ok");
            }
            Kind::SendAck(ack) => {
                assert!(
                    c.acked_by_route.contains(&(ack.msg_id_hi, ack.msg_id_lo)),
                    "SendAck for a message the route did not acknowledge"
                );
                self.reached.insert("send_acked");
            }
            Kind::SendNack(nack) => {
                self.reached.insert("send_nacked");
                if nack.code == proto::ErrorCode::RateLimited as i32 {
                    self.reached.insert("rate_limited");
                }
            }
            Kind::Deliver(_) => {
                assert!(push, "a Deliver outside a push");
                assert!(
                    c.live.is_some(),
                    "a Deliver to a connection without a session"
                );
                self.reached.insert("deliver");
            }
            Kind::FetchAnswer(answer) => {
                let used: usize = answer.messages.iter().map(|m| m.encoded_len() + 11).sum();
                assert!(
                    answer.messages.len() <= 1 || used <= MAX_ANSWER_BYTES,
                    "fetch answer of {used} bytes"
                );
                self.reached.insert("fetch_answer");
            }
            Kind::SyncAnswer(answer) => {
                let used: usize = answer.heads.iter().map(|h| h.encoded_len() + 11).sum();
                assert!(
                    answer.heads.len() <= 1 || used <= MAX_ANSWER_BYTES,
                    "sync page of {used} bytes"
                );
            }
            Kind::Kick(kick) => {
                let reason = proto::KickReason::try_from(kick.reason).ok();
                let name = match reason {
                    Some(proto::KickReason::SlowConsumer) => "slow_consumer",
                    Some(proto::KickReason::TakenOver) => "taken_over",
                    Some(proto::KickReason::Fenced) => "fenced",
                    Some(proto::KickReason::Idle | proto::KickReason::LoginTimeout) => "timed_out",
                    _ => "kicked_by_route",
                };
                self.reached.insert(name);
            }
            Kind::Pong(_) | Kind::Error(_) => {}
            other => panic!("a server never sends a client {}", other.name()),
        }
    }
}
