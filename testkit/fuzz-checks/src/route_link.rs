//! What a peer on the route's internal link reaches: the challenge-response handshake
//! (`cim_core::link_auth`), then `RouteSend` frames into the route's `RouteDelivery`, with the
//! store (the reference `MemoryStore`, plus failures, wrong kinds and silence), registry
//! changes and time interleaved.
//!
//! Handshake invariants: a proof verifies only if it is exactly what a holder of the
//! secret computes for that transcript (no forgery, no reflection of the route's own MAC,
//! no replay across nonces); an honest handshake always succeeds; bad nonces are refused.
//!
//! Delivery invariants: every send is answered exactly once (ack xor nack), however the
//! store behaves, once its deadlines have passed; an ack only for an append the store
//! confirmed, with that seq; no append of a body over the limit or of a private
//! conversation by an outsider; requests in flight never pass `max_in_flight`; pushes only
//! to live servers, only of appended messages, only to the conversation's members, with at
//! most `max_recipients_per_push` recipients and batches within `max_batch_bytes` (or one
//! push) and under the link's frame limit.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cim_core::time::Instant;

use arbitrary::{Arbitrary, Unstructured};
use bytes::{Bytes, BytesMut};
use cim_core::ids::{ClientMsgId, ConvId, Epoch, ServerId, UnixMillis, UserId};
use cim_core::link_auth;
use cim_core::memstore::{MemoryStore, MemoryStoreConfig};
use cim_core::registry::LiveServer;
use cim_core::route::delivery::{DeliveryConfig, DeliveryOutput, RouteDelivery, SendOrigin};
use cim_core::store::{
    RouteRecord, StoreCommand, StoreReply, StoreRequest, StoreResult, StoreUnavailable,
};
use cim_proto::codec::{DEFAULT_MAX_FRAME, FrameCodec};
use cim_proto::frame::Kind;
use cim_proto::{self as proto, Frame, LinkAuth, LinkAuthOk, LinkHello};
use prost::Message as _;

use crate::Reached;

const SECRET: &[u8] = b"fuzz-link-secret";
const PREVIOUS: &[u8] = b"fuzz-link-previous";
const ROUTE_ID: &str = "r1";
const WALL0: u64 = 1_700_000_000_000;
const SERVERS: [&str; 4] = ["s0", "s1", "s2", "s3"];
const MAX_OPS: usize = 300;

pub const FEATURES: &[&str] = &[
    "handshake_ok",
    "handshake_refused",
    "acked",
    "nacked",
    "duplicate",
    "overloaded",
    "timed_out",
    "pushed",
    "member_broadcast",
    "batch_split",
];

#[derive(Debug, Arbitrary)]
enum Nonce {
    Fresh(u8),
    Bytes(Vec<u8>),
}

impl Nonce {
    fn bytes(&self, salt: u8) -> Vec<u8> {
        match self {
            Self::Fresh(n) => vec![salt ^ *n; 16 + usize::from(n % 49)],
            Self::Bytes(b) => b.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Secret {
    Current,
    Previous,
    Wrong,
}

impl Secret {
    fn bytes(&self) -> &'static [u8] {
        match self {
            Self::Current => SECRET,
            Self::Previous => PREVIOUS,
            Self::Wrong => b"not-the-secret",
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Handshake {
    server_id: String,
    server_nonce: Nonce,
    route_nonce: Nonce,
    /// What the peer sends for the route's `LinkAuth` (tests the server side).
    auth: PeerAuth,
    /// What the peer answers the route with.
    ok: PeerOk,
}

#[derive(Debug, Arbitrary)]
enum PeerAuth {
    Honest(Secret),
    Forged {
        route_id: String,
        mac: Vec<u8>,
        nonce: Nonce,
    },
    /// An honest proof for another route nonce (a replay).
    Replayed(Nonce),
}

#[derive(Debug, Arbitrary)]
enum PeerOk {
    Honest(Secret),
    Forged(Vec<u8>),
    /// The route's own MAC sent back.
    Reflected,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Send {
        server: u8,
        request_id: u8,
        user: u8,
        conv: Conv,
        body_len: u16,
        msg_id: u8,
        body_byte: u8,
    },
    /// Which servers are live (bit i: `SERVERS[i]`).
    Registry(u8),
    Store(StoreAnswer),
    /// Group setup, straight into the store.
    Join {
        user: u8,
        group: u8,
    },
    Advance(u16),
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
            Self::Group(g) => format!("g:g{}", g % 3),
            Self::Private(a, b) => format!("p:{}:{}", a % 12, b % 12),
            Self::Text(t) => t.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum StoreAnswer {
    Ok(u8),
    Unavailable(u8),
    WrongKind(u8),
    AllOk,
}

pub fn check(data: &[u8]) -> Reached {
    let mut u = Unstructured::new(data);
    let mut reached = Reached::new();
    let Ok(handshake) = Handshake::arbitrary(&mut u) else {
        return reached;
    };
    check_handshake(&handshake, &mut reached);
    let mut h = Harness::new(reached);
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        h.apply(op);
    }
    h.settle();
    h.reached
}

fn check_handshake(hs: &Handshake, reached: &mut Reached) {
    let hello = LinkHello {
        server_id: hs.server_id.clone(),
        nonce: hs.server_nonce.bytes(0x5a),
    };
    let route_nonce = hs.route_nonce.bytes(0xa5);
    let nonce_ok =
        |n: &[u8]| (link_auth::MIN_NONCE_LEN..=link_auth::MAX_NONCE_LEN).contains(&n.len());

    // The route answers any hello whose nonces are acceptable, and only those.
    let answer = link_auth::route_answer(SECRET, &hello, ROUTE_ID, &route_nonce);
    let acceptable = nonce_ok(&hello.nonce) && nonce_ok(&route_nonce) && hello.nonce != route_nonce;
    assert_eq!(answer.is_ok(), acceptable, "route_answer: {answer:?}");

    // The server side: what the peer claims to be a route's proof.
    let auth = match &hs.auth {
        PeerAuth::Honest(secret) => {
            link_auth::route_answer(secret.bytes(), &hello, ROUTE_ID, &route_nonce).ok()
        }
        PeerAuth::Forged {
            route_id,
            mac,
            nonce,
        } => Some(LinkAuth {
            route_id: route_id.clone(),
            mac: mac.clone(),
            nonce: nonce.bytes(0x33),
        }),
        PeerAuth::Replayed(nonce) => {
            let other = nonce.bytes(0x77);
            link_auth::route_answer(SECRET, &hello, ROUTE_ID, &other)
                .ok()
                .map(|a| LinkAuth {
                    nonce: route_nonce.clone(),
                    ..a
                })
                .filter(|a| {
                    // Only a replay if the nonce really differs.
                    other != a.nonce
                })
        }
    };
    if let Some(auth) = &auth {
        let secrets: [&[u8]; 2] = [SECRET, PREVIOUS];
        let checked = link_auth::server_check_any(&secrets, &hello, auth);
        let genuine_under = secrets.iter().find(|secret| {
            link_auth::route_answer(secret, &hello, &auth.route_id, &auth.nonce).as_ref()
                == Ok(auth)
        });
        match (&checked, genuine_under) {
            (Ok(ok), Some(secret)) => {
                // The server's answer is the one the route checks with the same secret.
                assert_eq!(link_auth::route_check(secret, &hello, auth, ok), Ok(()));
                reached.insert("handshake_ok");
            }
            (Ok(_), None) => panic!("the server accepted a forged LinkAuth: {auth:?}"),
            (Err(_), Some(_)) => panic!("the server refused an honest LinkAuth: {auth:?}"),
            (Err(_), None) => {
                reached.insert("handshake_refused");
            }
        }
    }

    // The route side: what the peer answers the route's own proof with.
    let Ok(answer) = answer else {
        return;
    };
    let ok = match &hs.ok {
        PeerOk::Honest(secret) => link_auth::server_check(secret.bytes(), &hello, &answer).ok(),
        PeerOk::Forged(mac) => Some(LinkAuthOk { mac: mac.clone() }),
        PeerOk::Reflected => Some(LinkAuthOk {
            mac: answer.mac.clone(),
        }),
    };
    if let Some(ok) = ok {
        let genuine = link_auth::server_check(SECRET, &hello, &answer).as_ref() == Ok(&ok);
        let checked = link_auth::route_check(SECRET, &hello, &answer, &ok);
        assert_eq!(
            checked.is_ok(),
            genuine,
            "route_check of {ok:?}: {checked:?}"
        );
        if genuine {
            reached.insert("handshake_ok");
        } else {
            reached.insert("handshake_refused");
        }
    }
}

fn delivery_config() -> DeliveryConfig {
    DeliveryConfig {
        max_body: 256,
        broadcast_threshold: 3,
        store_timeout: Duration::from_secs(2),
        max_in_flight: 6,
        max_recipients_per_push: 2,
        max_batch_bytes: 600,
        max_member_ids_kept: 4,
    }
}

fn live_server(id: &str) -> LiveServer {
    LiveServer {
        id: ServerId::new(id),
        host: "127.0.0.1".into(),
        client_port: 11211,
        link_port: 11311,
        http_port: 8081,
        connections: 0,
        client_tls: false,
        ws_port: None,
    }
}

/// What a send became, for the pushes that follow it.
#[derive(Debug)]
struct Appended {
    conv: ConvId,
}

#[derive(Debug)]
struct Harness {
    delivery: RouteDelivery,
    store: MemoryStore,
    t0: Instant,
    now: Instant,
    live: BTreeSet<&'static str>,
    pending: Vec<StoreRequest>,
    /// Sends handed to the machine, and replies seen, per origin.
    sends: BTreeMap<(ServerId, u64), usize>,
    replies: BTreeMap<(ServerId, u64), usize>,
    /// Appends the store confirmed: (sender, msg id, conv) -> seq, and by (conv, seq).
    confirmed: BTreeMap<(u64, ClientMsgId, String), u64>,
    appended: BTreeMap<(String, u64), Appended>,
    /// (origin, sender, msg id) of each send not yet answered, to match acks to senders.
    senders: BTreeMap<(ServerId, u64), Vec<(u64, ClientMsgId)>>,
    reached: Reached,
}

impl Harness {
    fn new(reached: Reached) -> Self {
        let t0 = crate::origin();
        let mut h = Self {
            delivery: RouteDelivery::new(delivery_config()),
            store: MemoryStore::new(MemoryStoreConfig::default()),
            t0,
            now: t0,
            live: BTreeSet::new(),
            pending: Vec::new(),
            sends: BTreeMap::new(),
            replies: BTreeMap::new(),
            confirmed: BTreeMap::new(),
            appended: BTreeMap::new(),
            senders: BTreeMap::new(),
            reached,
        };
        h.registry(0b0111);
        h
    }

    fn wall(&self) -> UnixMillis {
        UnixMillis(WALL0 + self.now.duration_since(self.t0).as_millis() as u64)
    }

    fn registry(&mut self, mask: u8) {
        self.live = SERVERS
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, s)| *s)
            .collect();
        let live = self
            .live
            .iter()
            .map(|s| (ServerId::new(*s), live_server(s)))
            .collect();
        self.delivery.handle_registry(live);
        self.drain();
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Send {
                server,
                request_id,
                user,
                conv,
                body_len,
                msg_id,
                body_byte,
            } => {
                let server = ServerId::new(SERVERS[usize::from(server) % SERVERS.len()]);
                let request_id = u64::from(request_id % 16);
                let sender = u64::from(user % 12);
                let msg_id = ClientMsgId(u128::from(msg_id % 32));
                let send = proto::Send {
                    msg_id_hi: msg_id.hi(),
                    msg_id_lo: msg_id.lo(),
                    conv: conv.text(),
                    body: Bytes::from(vec![body_byte % 2; usize::from(body_len % 300)]),
                    sent_at_ms: 0,
                    ..Default::default()
                };
                let key = (server.clone(), request_id);
                *self.sends.entry(key.clone()).or_default() += 1;
                self.senders.entry(key).or_default().push((sender, msg_id));
                let origin = SendOrigin::Link { server, request_id };
                self.delivery
                    .handle_send(self.now, self.wall(), origin, UserId(sender), send);
                self.drain();
            }
            Op::Registry(mask) => self.registry(mask),
            Op::Store(answer) => {
                let pick = |pending: &mut Vec<StoreRequest>, which: u8| {
                    (!pending.is_empty())
                        .then(|| pending.remove(usize::from(which) % pending.len()))
                };
                match answer {
                    StoreAnswer::Ok(which) => {
                        if let Some(req) = pick(&mut self.pending, which) {
                            let reply = self.execute(&req.command);
                            self.reply(req, Ok(reply));
                        }
                    }
                    StoreAnswer::Unavailable(which) => {
                        if let Some(req) = pick(&mut self.pending, which) {
                            self.reply(req, Err(StoreUnavailable("fuzz".into())));
                        }
                    }
                    StoreAnswer::WrongKind(which) => {
                        if let Some(req) = pick(&mut self.pending, which) {
                            self.reply(req, Ok(StoreReply::CursorsAdvanced));
                        }
                    }
                    StoreAnswer::AllOk => {
                        for req in std::mem::take(&mut self.pending) {
                            let reply = self.execute(&req.command);
                            self.reply(req, Ok(reply));
                        }
                    }
                }
            }
            Op::Join { user, group } => {
                let conv = ConvId::Group(format!("g{}", group % 3));
                let user = UserId(u64::from(user % 12));
                let wall = self.wall();
                self.store.apply(
                    wall,
                    &StoreCommand::CreateGroup {
                        conv: conv.clone(),
                        owner: user,
                    },
                );
                self.store
                    .apply(wall, &StoreCommand::JoinGroup { conv, user });
            }
            Op::Advance(ms) => self.advance(Duration::from_millis(u64::from(ms % 3000))),
        }
    }

    /// The store's answer: the reference store, with route records made up (a fifth of the
    /// users offline, the others spread over the servers, live or not).
    fn execute(&mut self, command: &StoreCommand) -> StoreReply {
        match command {
            StoreCommand::LoadRoutes { users } => StoreReply::Routes(
                users
                    .iter()
                    .map(|u| {
                        let record = (u.0 % 5 != 0).then(|| RouteRecord {
                            server: ServerId::new(SERVERS[(u.0 as usize) % SERVERS.len()]),
                            epoch: Epoch(1),
                        });
                        (*u, record)
                    })
                    .collect(),
            ),
            other => {
                let wall = self.wall();
                self.store.apply(wall, other)
            }
        }
    }

    fn reply(&mut self, req: StoreRequest, result: StoreResult) {
        if let Ok(StoreReply::Appended(Ok(a))) = &result {
            let conv = a.message.conv.to_string();
            if let StoreCommand::Append { sender, msg_id, .. } = &req.command {
                assert_eq!((a.message.sender, a.message.msg_id), (*sender, *msg_id));
            }
            self.confirmed.insert(
                (a.message.sender.0, a.message.msg_id, conv.clone()),
                a.message.seq,
            );
            self.appended.insert(
                (conv, a.message.seq),
                Appended {
                    conv: a.message.conv.clone(),
                },
            );
            if a.duplicate {
                self.reached.insert("duplicate");
            }
        }
        self.delivery.handle_store_reply(self.now, req.id, result);
        self.drain();
    }

    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        let mut fired = 0;
        while let Some((at, _)) = self.delivery.poll_timeout() {
            if at > until {
                break;
            }
            fired += 1;
            assert!(fired < 10_000, "timers do not settle");
            self.now = self.now.max(at);
            self.delivery.handle_timeout(self.now);
            self.drain();
        }
        self.now = until;
    }

    /// Past every deadline, with nothing answered: every send has had its one answer.
    fn settle(&mut self) {
        self.advance(delivery_config().store_timeout * 3);
        assert_eq!(self.delivery.in_flight(), 0, "requests left in flight");
        assert_eq!(self.replies, self.sends, "sends and their answers");
    }

    fn drain(&mut self) {
        let config = delivery_config();
        assert!(self.delivery.in_flight() <= config.max_in_flight);
        let mut batches = BTreeSet::new();
        while let Some(output) = self.delivery.poll_output() {
            match output {
                DeliveryOutput::Store(req) => {
                    assert!(batches.is_empty(), "a store request after a push");
                    self.judge_store(&req);
                    self.pending.push(req);
                }
                DeliveryOutput::Reply { origin, result } => {
                    assert!(batches.is_empty(), "a reply after a push");
                    self.judge_reply(origin, result);
                }
                DeliveryOutput::Push { server, batch } => {
                    self.judge_push(&server, &batch);
                    if !batches.insert(server) {
                        self.reached.insert("batch_split");
                    }
                }
            }
        }
    }

    fn judge_store(&mut self, req: &StoreRequest) {
        match &req.command {
            StoreCommand::Append {
                conv, sender, body, ..
            } => {
                assert!(
                    body.len() <= delivery_config().max_body,
                    "append over max_body"
                );
                if let ConvId::Private { low, high } = conv {
                    assert!(*sender == *low || *sender == *high, "an outsider appends");
                }
            }
            StoreCommand::LoadMembers { conv } => {
                assert!(matches!(conv, ConvId::Group(_)));
            }
            StoreCommand::LoadRoutes { users } => assert!(!users.is_empty()),
            other => panic!("delivery never issues {other:?}"),
        }
    }

    fn judge_reply(&mut self, origin: SendOrigin, result: proto::RouteSendResult) {
        let SendOrigin::Link { server, request_id } = origin else {
            panic!("only link sends here");
        };
        assert_eq!(result.request_id, request_id);
        let key = (server, request_id);
        let count = self.replies.entry(key.clone()).or_default();
        *count += 1;
        assert!(
            *count <= self.sends.get(&key).copied().unwrap_or(0),
            "more answers than sends for {key:?}"
        );
        let candidates = self.senders.get_mut(&key).expect("a send for this origin");
        // Which of the sends under this origin it answers: one with this sender and id.
        let msg = ClientMsgId::from_halves(
            result
                .ack
                .as_ref()
                .map(|a| a.msg_id_hi)
                .or(result.nack.as_ref().map(|n| n.msg_id_hi))
                .unwrap_or_default(),
            result
                .ack
                .as_ref()
                .map(|a| a.msg_id_lo)
                .or(result.nack.as_ref().map(|n| n.msg_id_lo))
                .unwrap_or_default(),
        );
        let i = candidates
            .iter()
            .position(|&(u, m)| u == result.user_id && m == msg)
            .unwrap_or_else(|| panic!("an answer for a message not sent: {result:?}"));
        candidates.remove(i);
        match (&result.ack, &result.nack) {
            (Some(ack), None) => {
                let confirmed = self.confirmed.get(&(result.user_id, msg, ack.conv.clone()));
                assert_eq!(
                    confirmed,
                    Some(&ack.seq),
                    "an ack the store did not confirm"
                );
                self.reached.insert("acked");
            }
            (None, Some(nack)) => {
                self.reached.insert("nacked");
                let code = proto::ErrorCode::try_from(nack.code);
                if code == Ok(proto::ErrorCode::Unavailable) {
                    assert!(nack.retryable);
                    if nack.reason.contains("overloaded") {
                        self.reached.insert("overloaded");
                    } else if nack.reason.contains("timed out") {
                        self.reached.insert("timed_out");
                    }
                }
            }
            other => panic!("an answer must be an ack or a nack: {other:?}"),
        }
    }

    fn judge_push(&mut self, server: &ServerId, batch: &proto::PushBatch) {
        let config = delivery_config();
        assert!(
            self.live.contains(server.as_str()),
            "a push to {server}, which is not live"
        );
        assert!(!batch.pushes.is_empty(), "an empty batch");
        let frame = Frame {
            kind: Some(Kind::PushBatch(batch.clone())),
        };
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(&frame, &mut buf)
            .expect("a push batch encodes");
        assert!(
            buf.len() <= DEFAULT_MAX_FRAME,
            "a batch over the frame limit"
        );
        if batch.pushes.len() > 1 {
            assert!(
                batch.encoded_len() <= config.max_batch_bytes,
                "a batch of {} pushes, {} bytes",
                batch.pushes.len(),
                batch.encoded_len()
            );
        }
        for push in &batch.pushes {
            let message = push.message.as_ref().expect("a push carries its message");
            let appended = self
                .appended
                .get(&(message.conv.clone(), message.seq))
                .unwrap_or_else(|| panic!("a push of a message never appended: {message:?}"));
            // A member-list push is cut at max_recipients_per_push; a routed one lists at
            // most the group's members, and groups past broadcast_threshold are member-list.
            let most = config
                .max_recipients_per_push
                .max(config.broadcast_threshold);
            assert!(
                push.recipients.len() <= most,
                "{} recipients",
                push.recipients.len()
            );
            let unique: BTreeSet<_> = push.recipients.iter().collect();
            assert_eq!(unique.len(), push.recipients.len(), "a recipient twice");
            match &appended.conv {
                ConvId::All => assert!(push.all_sessions && push.recipients.is_empty()),
                ConvId::Private { low, high } => {
                    assert!(!push.all_sessions);
                    assert!(push.recipients.iter().all(|r| *r == low.0 || *r == high.0));
                }
                ConvId::Group(_) => {
                    assert!(!push.all_sessions);
                    // Routed pushes name only users whose record is on this server; a
                    // member-list push (large group) names every member.
                    let elsewhere = push.recipients.iter().any(|r| {
                        r % 5 == 0 || SERVERS[(*r as usize) % SERVERS.len()] != server.as_str()
                    });
                    if elsewhere {
                        self.reached.insert("member_broadcast");
                    }
                }
            }
        }
        self.reached.insert("pushed");
    }
}
