//! The route's delivery: append a sent message, answer the sender, push it to the servers
//! that hold its recipients.
//!
//! A send arrives from a server's internal link (`RouteSend`) or from the route's own HTTP API
//! (`groupRoute`/`p2pRoute`); both take the same path:
//!
//! ```text
//! validate ─► Append ─► reply (SendAck: appended = acked) ─► plan pushes
//!                                   all:      one all-sessions Push per live server
//!                                   private:  LoadRoutes(both) ─► per-server Pushes
//!                                   group:    LoadMembers ─► ≤ threshold: LoadRoutes ─► per-server
//!                                                            > threshold: member-list Push per live server
//! ```
//!
//! The route reads route records only after the append, never from a cache, so a recipient
//! that logged in before the append is found where it is now. The sender is a recipient too:
//! its own client receives the message by seq like everyone else, so every member's view of
//! the log is the same. A duplicate append pushes again (the first push may have been lost).
//!
//! Pushes are best effort once the sender is acked: if a route or member read fails, the
//! message stays in the log and clients recover it by gap detection, head checks and sync.
//! The counters in [`DeliveryStats`] report it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use cim_proto::{ErrorCode, Push, PushBatch, RouteSend, RouteSendResult, SendAck, SendNack};

use crate::ids::{ClientMsgId, ConvId, ServerId, UnixMillis, UserId};
use crate::registry::LiveServer;
use crate::store::{
    AppendError, RequestId, RouteRecord, SendOrder, StoreCommand, StoreReply, StoreRequest,
    StoreResult, StoredMessage, message_to_proto,
};

/// The largest `order_seq` / `order_after` a send may carry (see `SendOrder`).
pub const MAX_ORDER_SEQ: u64 = (1 << 53) - 1;

pub use crate::ids::ApiRequestId;

/// Where a send came from, and so where its answer goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOrigin {
    /// A server's `RouteSend` on its internal link.
    Link { server: ServerId, request_id: u64 },
    /// The route's own HTTP `groupRoute`/`p2pRoute`; the shell turns the result into JSON.
    Http(ApiRequestId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Largest message body accepted, in bytes.
    pub max_body: usize,
    /// Groups with more members than this are pushed as one member-list frame per live server
    /// instead of reading every member's route record.
    pub broadcast_threshold: usize,
    /// How long one store request may take before the send (or push) is given up.
    pub store_timeout: Duration,
    /// Store requests in flight at most; a send beyond it is refused as unavailable.
    pub max_in_flight: usize,
    /// A member-list push is split so one push never lists more recipients than this.
    pub max_recipients_per_push: usize,
    /// Upper bound on one `PushBatch`'s encoded size (keep it under the link's frame limit).
    pub max_batch_bytes: usize,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            max_body: 4 * 1024,
            broadcast_threshold: 200,
            store_timeout: Duration::from_secs(2),
            max_in_flight: 10_000,
            // 10 bytes per varint recipient + a 4 KiB body stays under the 60 KiB batch bound.
            max_recipients_per_push: 4096,
            max_batch_bytes: 60 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerReason {
    /// A store request passed its deadline.
    StoreDeadline,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeliveryStats {
    pub acked: u64,
    pub duplicates: u64,
    pub nacked: u64,
    /// Pushes queued (one per server per message; a chunked member list counts each chunk).
    pub pushes: u64,
    /// Recipients skipped: no route record, or their server is not live.
    pub recipients_unreachable: u64,
    /// Appended messages whose push was abandoned (a route/member read failed or timed out).
    pub pushes_abandoned: u64,
}

/// One push per live server that holds at least one of the routed recipients, listing them
/// (sorted, once each). Offline recipients and those on servers not in `live` are skipped.
pub fn plan_pushes(
    message: &StoredMessage,
    routes: &[(UserId, Option<RouteRecord>)],
    live: &BTreeMap<ServerId, LiveServer>,
) -> BTreeMap<ServerId, Push> {
    let mut by_server: BTreeMap<&ServerId, BTreeSet<u64>> = BTreeMap::new();
    for (user, route) in routes {
        if let Some(route) = route
            && live.contains_key(&route.server)
        {
            by_server.entry(&route.server).or_default().insert(user.0);
        }
    }
    let wire = message_to_proto(message);
    by_server
        .into_iter()
        .map(|(server, recipients)| {
            let push = Push {
                message: Some(wire.clone()),
                recipients: recipients.into_iter().collect(),
                all_sessions: false,
            };
            (server.clone(), push)
        })
        .collect()
}

/// One all-sessions push per live server: each server delivers to every session it holds
/// (used for `all`, where every user is a member).
pub fn plan_broadcast(
    message: &StoredMessage,
    live: &BTreeMap<ServerId, LiveServer>,
) -> BTreeMap<ServerId, Push> {
    let wire = message_to_proto(message);
    live.keys()
        .map(|server| {
            let push = Push {
                message: Some(wire.clone()),
                recipients: Vec::new(),
                all_sessions: true,
            };
            (server.clone(), push)
        })
        .collect()
}

/// For a large group: every live server gets the whole member list (split into chunks of at
/// most `max_recipients` so a frame stays bounded) and delivers to its own sessions among
/// them. Chunks are disjoint, so nobody is delivered twice.
pub fn plan_member_broadcast(
    message: &StoredMessage,
    members: &[UserId],
    live: &BTreeMap<ServerId, LiveServer>,
    max_recipients: usize,
) -> BTreeMap<ServerId, Vec<Push>> {
    let members: Vec<u64> = members
        .iter()
        .map(|u| u.0)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if members.is_empty() {
        return BTreeMap::new();
    }
    let wire = message_to_proto(message);
    let pushes: Vec<Push> = members
        .chunks(max_recipients.max(1))
        .map(|chunk| Push {
            message: Some(wire.clone()),
            recipients: chunk.to_vec(),
            all_sessions: false,
        })
        .collect();
    live.keys()
        .map(|server| (server.clone(), pushes.clone()))
        .collect()
}

/// An upper bound on a push's encoded size inside a `PushBatch` (every varint counted at its
/// widest), so batches can be cut without the codec. `Message`: 6 fixed varints/fixed64s with
/// tags (<= 62) plus two length-delimited fields (<= 6 each) = 74 <= 80. `Push` and its slot in
/// the batch: message, recipients and batch-entry headers (<= 6 each) plus `all_sessions` (2)
/// = 20 <= 32, and at most 10 bytes per packed recipient.
fn push_size_bound(push: &Push) -> usize {
    let message = push
        .message
        .as_ref()
        .map_or(0, |m| m.conv.len() + m.body.len() + 80);
    message + 10 * push.recipients.len() + 32
}

/// The route's delivery machine.
///
/// Inputs: [`handle_registry`](Self::handle_registry) (live set changes),
/// [`handle_send`](Self::handle_send), [`handle_store`](Self::handle_store) (the reply to a
/// request it emitted), [`handle_timeout`](Self::handle_timeout).
///
/// **Drain rule:** after every `handle_*`, drain [`poll_store`](Self::poll_store),
/// [`poll_reply`](Self::poll_reply) and then [`poll_push`](Self::poll_push) until each returns
/// `None` (replies before pushes: a sender hears its ack no later than its recipients see the
/// message), then re-arm the timer from [`poll_timeout`](Self::poll_timeout). Pushes queued for
/// one server between drains leave as one `PushBatch` (more only past `max_batch_bytes`).
#[derive(Debug)]
pub struct RouteDelivery {
    config: DeliveryConfig,
    live: BTreeMap<ServerId, LiveServer>,
    next_request: u64,
    pending: BTreeMap<RequestId, Pending>,
    deadlines: BTreeSet<(Instant, RequestId)>,
    store_out: VecDeque<StoreRequest>,
    replies: VecDeque<(SendOrigin, RouteSendResult)>,
    pushes: BTreeMap<ServerId, VecDeque<Push>>,
    stats: DeliveryStats,
}

#[derive(Debug)]
struct Pending {
    deadline: Instant,
    stage: Stage,
}

#[derive(Debug)]
enum Stage {
    Append {
        origin: SendOrigin,
        sender: UserId,
        msg_id: ClientMsgId,
    },
    Members {
        message: StoredMessage,
    },
    Routes {
        message: StoredMessage,
    },
}

impl RouteDelivery {
    pub fn new(config: DeliveryConfig) -> Self {
        Self {
            config,
            live: BTreeMap::new(),
            next_request: 1,
            pending: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            store_out: VecDeque::new(),
            replies: VecDeque::new(),
            pushes: BTreeMap::new(),
            stats: DeliveryStats::default(),
        }
    }

    pub fn config(&self) -> &DeliveryConfig {
        &self.config
    }

    pub fn stats(&self) -> DeliveryStats {
        self.stats
    }

    pub fn live(&self) -> &BTreeMap<ServerId, LiveServer> {
        &self.live
    }

    /// Store requests awaiting their reply.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// The registry's new live set. Pushes still queued for a server that left are dropped:
    /// its link is gone, and its users re-home and sync.
    pub fn handle_registry(&mut self, live: BTreeMap<ServerId, LiveServer>) {
        self.pushes.retain(|server, _| live.contains_key(server));
        self.live = live;
    }

    /// A server's `RouteSend` from its link: its send, to append and push, answered on that
    /// server's link. One that carries no send is answered with a non-retryable
    /// MALFORMED_FRAME nack (not counted in `nacked`: it names no message).
    pub fn handle_route_send(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        server: ServerId,
        route_send: RouteSend,
    ) {
        let origin = SendOrigin::Link {
            server,
            request_id: route_send.request_id,
        };
        let sender = UserId(route_send.user_id);
        match route_send.send {
            Some(send) => self.handle_send(now, wall, origin, sender, send),
            None => {
                let nack = SendNack {
                    msg_id_hi: 0,
                    msg_id_lo: 0,
                    code: ErrorCode::MalformedFrame as i32,
                    reason: "route_send without a send".into(),
                    retryable: false,
                };
                let result = RouteSendResult {
                    request_id: route_send.request_id,
                    user_id: route_send.user_id,
                    ack: None,
                    nack: Some(nack),
                };
                self.replies.push_back((origin, result));
            }
        }
    }

    /// A user's message, to append and push. `wall` stamps the message in the log.
    pub fn handle_send(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        origin: SendOrigin,
        sender: UserId,
        send: cim_proto::Send,
    ) {
        let msg_id = ClientMsgId::from_halves(send.msg_id_hi, send.msg_id_lo);
        let refuse = |code, reason: &str| Some((code, reason.to_owned(), false));
        let refusal = match send.conv.parse::<ConvId>() {
            Err(e) => refuse(ErrorCode::BadConversation, &e.to_string()),
            Ok(_) if send.body.len() > self.config.max_body => refuse(
                ErrorCode::BodyTooLarge,
                &format!("message body over {} bytes", self.config.max_body),
            ),
            Ok(ConvId::Private { low, high }) if sender != low && sender != high => refuse(
                ErrorCode::NotMember,
                "a private conversation of two other users",
            ),
            // The Redis script compares order numbers as Lua doubles: past 2^53 they would
            // compare unlike the reference. No client counts that far.
            Ok(_) if send.order_seq > MAX_ORDER_SEQ || send.order_after > MAX_ORDER_SEQ => refuse(
                ErrorCode::MalformedFrame,
                "order numbers must stay below 2^53",
            ),
            Ok(_) if self.pending.len() >= self.config.max_in_flight => {
                Some((ErrorCode::Unavailable, "route overloaded".to_owned(), true))
            }
            Ok(conv) => {
                let command = StoreCommand::Append {
                    conv,
                    sender,
                    msg_id,
                    order: SendOrder::from_send(&send),
                    body: send.body,
                    now: wall,
                };
                let stage = Stage::Append {
                    origin,
                    sender,
                    msg_id,
                };
                self.request(now, command, stage);
                return;
            }
        };
        if let Some((code, reason, retryable)) = refusal {
            self.nack(origin, sender, msg_id, code, reason, retryable);
        }
    }

    /// The store's answer to request `id`. Answers to requests that already timed out (or
    /// that this machine never made) are ignored.
    pub fn handle_store(&mut self, now: Instant, id: RequestId, result: StoreResult) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        self.deadlines.remove(&(pending.deadline, id));
        match (pending.stage, result) {
            (
                Stage::Append {
                    origin,
                    sender,
                    msg_id,
                },
                result,
            ) => self.on_appended(now, origin, sender, msg_id, result),
            (Stage::Members { message }, Ok(StoreReply::Members(members))) => {
                self.on_members(now, message, members)
            }
            (Stage::Routes { message }, Ok(StoreReply::Routes(routes))) => {
                let planned = plan_pushes(&message, &routes, &self.live);
                let reached: usize = planned.values().map(|p| p.recipients.len()).sum();
                let asked = routes
                    .iter()
                    .map(|(u, _)| *u)
                    .collect::<BTreeSet<_>>()
                    .len();
                self.stats.recipients_unreachable += asked.saturating_sub(reached) as u64;
                for (server, push) in planned {
                    self.queue_push(server, push);
                }
            }
            // A failed read, or a reply of the wrong kind (a shell bug, not worth a panic).
            (Stage::Members { .. } | Stage::Routes { .. }, _) => {
                self.stats.pushes_abandoned += 1;
            }
        }
    }

    /// Fails every request whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(pending) = self.pending.remove(&id) else {
                continue;
            };
            match pending.stage {
                Stage::Append {
                    origin,
                    sender,
                    msg_id,
                } => {
                    // The append may have happened; a retry with the same id is a duplicate
                    // and answers the same seq, so "retryable" is safe.
                    self.nack(
                        origin,
                        sender,
                        msg_id,
                        ErrorCode::Unavailable,
                        "store timed out".to_owned(),
                        true,
                    );
                }
                Stage::Members { .. } | Stage::Routes { .. } => {
                    self.stats.pushes_abandoned += 1;
                }
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<(Instant, TimerReason)> {
        self.deadlines
            .first()
            .map(|(deadline, _)| (*deadline, TimerReason::StoreDeadline))
    }

    pub fn poll_store(&mut self) -> Option<StoreRequest> {
        self.store_out.pop_front()
    }

    /// The answer to a send: to the server's link (`RouteSendResult` as is) or to the HTTP
    /// caller (`request_id` then carries the [`ApiRequestId`]).
    pub fn poll_reply(&mut self) -> Option<(SendOrigin, RouteSendResult)> {
        self.replies.pop_front()
    }

    /// Everything queued for one server since the last drain, as one batch (cut only where
    /// it would pass `max_batch_bytes`), servers in id order.
    pub fn poll_push(&mut self) -> Option<(ServerId, PushBatch)> {
        let (server, mut queue) = self.pushes.pop_first()?;
        let mut size = 0;
        let mut pushes = Vec::new();
        while let Some(push) = queue.front() {
            let bound = push_size_bound(push);
            if !pushes.is_empty() && size + bound > self.config.max_batch_bytes {
                break;
            }
            size += bound;
            pushes.extend(queue.pop_front());
        }
        if !queue.is_empty() {
            self.pushes.insert(server.clone(), queue);
        }
        Some((server, PushBatch { pushes }))
    }

    fn on_appended(
        &mut self,
        now: Instant,
        origin: SendOrigin,
        sender: UserId,
        msg_id: ClientMsgId,
        result: StoreResult,
    ) {
        let appended = match result {
            Ok(StoreReply::Appended(Ok(appended))) => appended,
            Ok(StoreReply::Appended(Err(e))) => {
                let (code, retryable) = match e {
                    AppendError::NotMember => (ErrorCode::NotMember, false),
                    AppendError::ConflictingRetry => (ErrorCode::ConflictingRetry, false),
                    AppendError::UnknownConversation => (ErrorCode::BadConversation, false),
                    // The client resends it once the message it follows is stored.
                    AppendError::OutOfOrder => (ErrorCode::OutOfOrder, true),
                    AppendError::Superseded => (ErrorCode::Superseded, false),
                };
                return self.nack(origin, sender, msg_id, code, e.to_string(), retryable);
            }
            Ok(other) => {
                let reason = format!("store answered an append with {other:?}");
                return self.nack(origin, sender, msg_id, ErrorCode::Unavailable, reason, true);
            }
            Err(e) => {
                return self.nack(origin, sender, msg_id, ErrorCode::Unavailable, e.0, true);
            }
        };
        let message = appended.message;
        self.stats.acked += 1;
        self.stats.duplicates += u64::from(appended.duplicate);
        let ack = SendAck {
            msg_id_hi: message.msg_id.hi(),
            msg_id_lo: message.msg_id.lo(),
            conv: message.conv.to_string(),
            log_epoch: message.log_epoch.0,
            seq: message.seq,
        };
        let result = RouteSendResult {
            request_id: origin_request_id(&origin),
            user_id: sender.0,
            ack: Some(ack),
            nack: None,
        };
        self.replies.push_back((origin, result));

        match &message.conv {
            ConvId::All => {
                for (server, push) in plan_broadcast(&message, &self.live) {
                    self.queue_push(server, push);
                }
            }
            ConvId::Private { low, high } => {
                let users = vec![*low, *high];
                self.request(
                    now,
                    StoreCommand::LoadRoutes { users },
                    Stage::Routes { message },
                );
            }
            ConvId::Group(_) => {
                let conv = message.conv.clone();
                self.request(
                    now,
                    StoreCommand::LoadMembers { conv },
                    Stage::Members { message },
                );
            }
        }
    }

    fn on_members(&mut self, now: Instant, message: StoredMessage, members: Vec<UserId>) {
        if members.len() > self.config.broadcast_threshold {
            let planned = plan_member_broadcast(
                &message,
                &members,
                &self.live,
                self.config.max_recipients_per_push,
            );
            for (server, pushes) in planned {
                for push in pushes {
                    self.queue_push(server.clone(), push);
                }
            }
        } else if !members.is_empty() {
            let command = StoreCommand::LoadRoutes { users: members };
            self.request(now, command, Stage::Routes { message });
        }
    }

    fn request(&mut self, now: Instant, command: StoreCommand, stage: Stage) {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        let deadline = now + self.config.store_timeout;
        self.pending.insert(id, Pending { deadline, stage });
        self.deadlines.insert((deadline, id));
        self.store_out.push_back(StoreRequest { id, command });
    }

    fn queue_push(&mut self, server: ServerId, push: Push) {
        self.stats.pushes += 1;
        self.pushes.entry(server).or_default().push_back(push);
    }

    fn nack(
        &mut self,
        origin: SendOrigin,
        sender: UserId,
        msg_id: ClientMsgId,
        code: ErrorCode,
        reason: String,
        retryable: bool,
    ) {
        self.stats.nacked += 1;
        let nack = SendNack {
            msg_id_hi: msg_id.hi(),
            msg_id_lo: msg_id.lo(),
            code: code as i32,
            reason,
            retryable,
        };
        let result = RouteSendResult {
            request_id: origin_request_id(&origin),
            user_id: sender.0,
            ack: None,
            nack: Some(nack),
        };
        self.replies.push_back((origin, result));
    }
}

fn origin_request_id(origin: &SendOrigin) -> u64 {
    match origin {
        SendOrigin::Link { request_id, .. } => *request_id,
        SendOrigin::Http(id) => id.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Epoch, LogEpoch};
    use crate::store::{Appended, StoreUnavailable};

    #[allow(clippy::disallowed_methods)]
    fn base() -> Instant {
        Instant::now()
    }

    const EPOCH: LogEpoch = LogEpoch(0xE90C);

    fn sid(s: &str) -> ServerId {
        ServerId::new(s)
    }

    fn live(ids: &[&str]) -> BTreeMap<ServerId, LiveServer> {
        ids.iter()
            .map(|id| {
                let server = LiveServer {
                    id: sid(id),
                    host: "10.0.0.1".into(),
                    client_port: 11211,
                    link_port: 11311,
                    http_port: 8081,
                    connections: 0,
                    client_tls: false,
                };
                (sid(id), server)
            })
            .collect()
    }

    fn config() -> DeliveryConfig {
        DeliveryConfig {
            broadcast_threshold: 3,
            ..DeliveryConfig::default()
        }
    }

    fn machine(servers: &[&str]) -> RouteDelivery {
        let mut d = RouteDelivery::new(config());
        d.handle_registry(live(servers));
        d
    }

    fn send(id: u128, conv: &str, body: &str) -> cim_proto::Send {
        let id = ClientMsgId(id);
        cim_proto::Send {
            msg_id_hi: id.hi(),
            msg_id_lo: id.lo(),
            conv: conv.into(),
            body: body.as_bytes().to_vec().into(),
            sent_at_ms: 1,
            ..Default::default()
        }
    }

    fn link(server: &str, request_id: u64) -> SendOrigin {
        SendOrigin::Link {
            server: sid(server),
            request_id,
        }
    }

    fn stored(conv: &str, seq: u64, sender: u64, id: u128, body: &str) -> StoredMessage {
        StoredMessage {
            conv: conv.parse().unwrap(),
            log_epoch: EPOCH,
            seq,
            sender: UserId(sender),
            msg_id: ClientMsgId(id),
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
            appended_at: UnixMillis(1000),
        }
    }

    fn appended(message: StoredMessage, duplicate: bool) -> StoreResult {
        Ok(StoreReply::Appended(Ok(Appended { message, duplicate })))
    }

    fn route(user: u64, server: Option<&str>) -> (UserId, Option<RouteRecord>) {
        let record = server.map(|s| RouteRecord {
            server: sid(s),
            epoch: Epoch(1),
        });
        (UserId(user), record)
    }

    #[derive(Debug, Default)]
    struct Out {
        store: Vec<StoreRequest>,
        replies: Vec<(SendOrigin, RouteSendResult)>,
        pushes: Vec<(ServerId, PushBatch)>,
    }

    fn drain(d: &mut RouteDelivery) -> Out {
        let mut out = Out::default();
        while let Some(r) = d.poll_store() {
            out.store.push(r);
        }
        while let Some(r) = d.poll_reply() {
            out.replies.push(r);
        }
        while let Some(p) = d.poll_push() {
            out.pushes.push(p);
        }
        out
    }

    fn ack_of(result: &RouteSendResult) -> (u64, u64) {
        let ack = result.ack.as_ref().expect("an ack");
        assert!(result.nack.is_none());
        (ack.log_epoch, ack.seq)
    }

    fn nack_of(result: &RouteSendResult) -> (ErrorCode, bool) {
        assert!(result.ack.is_none());
        let nack = result.nack.as_ref().expect("a nack");
        (ErrorCode::try_from(nack.code).unwrap(), nack.retryable)
    }

    /// Server -> (seq, recipients, all_sessions) for every push, batches flattened.
    fn summary(pushes: &[(ServerId, PushBatch)]) -> Vec<(String, u64, Vec<u64>, bool)> {
        pushes
            .iter()
            .flat_map(|(server, batch)| {
                batch.pushes.iter().map(move |p| {
                    let seq = p.message.as_ref().unwrap().seq;
                    (server.0.clone(), seq, p.recipients.clone(), p.all_sessions)
                })
            })
            .collect()
    }

    /// Sends, checks the Append it causes, answers it, and returns what followed.
    fn send_and_append(
        d: &mut RouteDelivery,
        now: Instant,
        origin: SendOrigin,
        sender: u64,
        message: StoredMessage,
        duplicate: bool,
    ) -> Out {
        let conv = message.conv.to_string();
        let body = String::from_utf8(message.body.to_vec()).unwrap();
        d.handle_send(
            now,
            UnixMillis(1000),
            origin,
            UserId(sender),
            send(message.msg_id.0, &conv, &body),
        );
        let out = drain(d);
        assert_eq!(out.store.len(), 1);
        assert!(out.replies.is_empty() && out.pushes.is_empty());
        let StoreCommand::Append {
            conv: c,
            sender: s,
            msg_id,
            body: b,
            now: wall,
            order: None,
        } = &out.store[0].command
        else {
            panic!("expected an append, got {:?}", out.store[0]);
        };
        assert_eq!(
            (c, *s, *msg_id, b, *wall),
            (
                &message.conv,
                UserId(sender),
                message.msg_id,
                &message.body,
                UnixMillis(1000)
            )
        );
        let id = out.store[0].id;
        d.handle_store(now, id, appended(message, duplicate));
        drain(d)
    }

    /// A server's RouteSend: one with a send takes the send's path (an Append, answered on
    /// that server's link); one without is nacked at once, non-retryable, with no store
    /// request and nothing counted as a nacked message.
    #[test]
    fn route_send_from_a_link_table() {
        let t0 = base();
        /// (name, send carried, appends, nack: code and retryable)
        type Case = (
            &'static str,
            Option<cim_proto::Send>,
            usize,
            Option<(ErrorCode, bool)>,
        );
        let cases: Vec<Case> = vec![
            ("with a send", Some(send(9, "all", "hi")), 1, None),
            (
                "without a send",
                None,
                0,
                Some((ErrorCode::MalformedFrame, false)),
            ),
            (
                "with a bad send",
                Some(send(9, "p:2:1", "hi")),
                0,
                Some((ErrorCode::BadConversation, false)),
            ),
        ];
        for (name, message, appends, nack) in cases {
            let mut d = machine(&["a"]);
            let route_send = RouteSend {
                request_id: 7,
                user_id: 1,
                epoch: 3,
                send: message,
            };
            d.handle_route_send(t0, UnixMillis(1000), sid("a"), route_send);
            let out = drain(&mut d);
            assert_eq!(out.store.len(), appends, "{name}");
            assert_eq!(out.replies.len(), usize::from(nack.is_some()), "{name}");
            if let Some(want) = nack {
                let (origin, result) = &out.replies[0];
                assert_eq!(*origin, link("a", 7), "{name}");
                assert_eq!((result.request_id, result.user_id), (7, 1), "{name}");
                assert_eq!(nack_of(result), want, "{name}");
            }
            let counted = u64::from(nack.is_some() && name != "without a send");
            assert_eq!(d.stats().nacked, counted, "{name}");
        }
    }

    #[test]
    fn private_send_acks_then_pushes_to_both_participants_servers() {
        let t0 = base();
        let mut d = machine(&["a", "b"]);
        let msg = stored("p:1:2", 1, 1, 0xAB, "hi");
        let out = send_and_append(&mut d, t0, link("a", 7), 1, msg.clone(), false);

        // Acked (appended) before any route is read; no push yet.
        assert_eq!(out.replies.len(), 1);
        assert_eq!(out.replies[0].0, link("a", 7));
        assert_eq!(out.replies[0].1.request_id, 7);
        assert_eq!(out.replies[0].1.user_id, 1);
        assert_eq!(ack_of(&out.replies[0].1), (EPOCH.0, 1));
        assert!(out.pushes.is_empty());
        assert_eq!(out.store.len(), 1);
        assert_eq!(
            out.store[0].command,
            StoreCommand::LoadRoutes {
                users: vec![UserId(1), UserId(2)]
            }
        );

        let routes = vec![route(1, Some("a")), route(2, Some("b"))];
        d.handle_store(t0, out.store[0].id, Ok(StoreReply::Routes(routes)));
        let out = drain(&mut d);
        assert!(out.store.is_empty() && out.replies.is_empty());
        assert_eq!(
            summary(&out.pushes),
            [
                ("a".into(), 1, vec![1], false),
                ("b".into(), 1, vec![2], false)
            ]
        );
        let wire = out.pushes[0].1.pushes[0].message.clone().unwrap();
        assert_eq!(wire, message_to_proto(&msg));
        assert_eq!(
            (wire.conv.as_str(), wire.msg_id_hi, wire.msg_id_lo),
            ("p:1:2", 0, 0xAB)
        );
        assert_eq!(d.in_flight(), 0);
        assert_eq!(d.poll_timeout(), None);
    }

    #[test]
    fn offline_recipient_is_acked_but_not_pushed() {
        let t0 = base();
        let mut d = machine(&["a", "b"]);
        let origin = SendOrigin::Http(ApiRequestId(42));
        let out = send_and_append(
            &mut d,
            t0,
            origin.clone(),
            2,
            stored("p:1:2", 3, 2, 5, "x"),
            false,
        );
        assert_eq!(out.replies[0].0, origin);
        assert_eq!(out.replies[0].1.request_id, 42);
        assert_eq!(ack_of(&out.replies[0].1), (EPOCH.0, 3));
        let routes = vec![route(1, None), route(2, Some("b"))];
        d.handle_store(t0, out.store[0].id, Ok(StoreReply::Routes(routes)));
        let out = drain(&mut d);
        assert_eq!(summary(&out.pushes), [("b".into(), 3, vec![2], false)]);
        assert_eq!(d.stats().recipients_unreachable, 1);
    }

    #[test]
    fn all_is_one_frame_per_live_server_without_store_reads() {
        let t0 = base();
        let mut d = machine(&["a", "b", "c"]);
        let out = send_and_append(
            &mut d,
            t0,
            link("b", 1),
            9,
            stored("all", 10, 9, 1, "hey"),
            false,
        );
        assert_eq!(ack_of(&out.replies[0].1), (EPOCH.0, 10));
        assert!(out.store.is_empty());
        assert_eq!(
            summary(&out.pushes),
            [
                ("a".into(), 10, vec![], true),
                ("b".into(), 10, vec![], true),
                ("c".into(), 10, vec![], true),
            ]
        );
    }

    #[test]
    fn small_group_goes_through_routes_large_group_through_member_lists() {
        let t0 = base();
        let mut d = machine(&["a", "b", "c"]);

        // 3 members (= threshold): read their routes, push per server.
        let out = send_and_append(
            &mut d,
            t0,
            link("a", 1),
            1,
            stored("g:rust", 1, 1, 1, "s"),
            false,
        );
        assert_eq!(
            out.store[0].command,
            StoreCommand::LoadMembers {
                conv: ConvId::Group("rust".into())
            }
        );
        let members = vec![UserId(1), UserId(2), UserId(3)];
        d.handle_store(
            t0,
            out.store[0].id,
            Ok(StoreReply::Members(members.clone())),
        );
        let out = drain(&mut d);
        assert!(out.pushes.is_empty());
        assert_eq!(
            out.store[0].command,
            StoreCommand::LoadRoutes { users: members }
        );
        let routes = vec![
            route(1, Some("a")),
            route(2, Some("a")),
            route(3, Some("c")),
        ];
        d.handle_store(t0, out.store[0].id, Ok(StoreReply::Routes(routes)));
        assert_eq!(
            summary(&drain(&mut d).pushes),
            [
                ("a".into(), 1, vec![1, 2], false),
                ("c".into(), 1, vec![3], false)
            ]
        );

        // 4 members (> threshold): no route reads, the member list to every live server.
        let out = send_and_append(
            &mut d,
            t0,
            link("a", 2),
            1,
            stored("g:big", 1, 1, 2, "s"),
            false,
        );
        let members = vec![UserId(4), UserId(1), UserId(3), UserId(2)];
        d.handle_store(t0, out.store[0].id, Ok(StoreReply::Members(members)));
        let out = drain(&mut d);
        assert!(out.store.is_empty());
        assert_eq!(
            summary(&out.pushes),
            [
                ("a".into(), 1, vec![1, 2, 3, 4], false),
                ("b".into(), 1, vec![1, 2, 3, 4], false),
                ("c".into(), 1, vec![1, 2, 3, 4], false),
            ]
        );

        // An empty group (everyone left since the append): nothing to read or push.
        let out = send_and_append(
            &mut d,
            t0,
            link("a", 3),
            1,
            stored("g:gone", 1, 1, 3, "s"),
            false,
        );
        d.handle_store(t0, out.store[0].id, Ok(StoreReply::Members(vec![])));
        let out = drain(&mut d);
        assert!(out.store.is_empty() && out.pushes.is_empty());
    }

    #[test]
    fn duplicate_append_acks_the_original_seq_and_pushes_again() {
        let t0 = base();
        let mut d = machine(&["a"]);
        let msg = stored("p:1:2", 4, 1, 77, "again");
        for duplicate in [false, true] {
            let out = send_and_append(&mut d, t0, link("a", 1), 1, msg.clone(), duplicate);
            assert_eq!(ack_of(&out.replies[0].1), (EPOCH.0, 4));
            let routes = vec![route(1, Some("a")), route(2, Some("a"))];
            d.handle_store(t0, out.store[0].id, Ok(StoreReply::Routes(routes)));
            assert_eq!(
                summary(&drain(&mut d).pushes),
                [("a".into(), 4, vec![1, 2], false)]
            );
        }
        assert_eq!((d.stats().acked, d.stats().duplicates), (2, 1));
    }

    #[test]
    fn a_sends_order_reaches_the_append_and_order_numbers_past_2_pow_53_are_refused() {
        let t0 = base();
        let ordered = |seq, after| cim_proto::Send {
            order_stream: 7,
            order_seq: seq,
            order_after: after,
            ..send(9, "g:x", "b")
        };
        let mut d = machine(&["a"]);
        d.handle_send(t0, UnixMillis(1), link("a", 1), UserId(1), ordered(3, 2));
        let out = drain(&mut d);
        let StoreCommand::Append { order, .. } = &out.store[0].command else {
            panic!("expected an append, got {:?}", out.store);
        };
        let want = SendOrder {
            stream: 7,
            seq: 3,
            after: 2,
        };
        assert_eq!(*order, Some(want));
        for (seq, after) in [
            (MAX_ORDER_SEQ + 1, 0),
            (5, MAX_ORDER_SEQ + 1),
            (u64::MAX, 1),
        ] {
            let mut d = machine(&["a"]);
            d.handle_send(
                t0,
                UnixMillis(1),
                link("a", 2),
                UserId(1),
                ordered(seq, after),
            );
            let out = drain(&mut d);
            assert!(out.store.is_empty(), "{seq} after {after}");
            assert_eq!(
                nack_of(&out.replies[0].1),
                (ErrorCode::MalformedFrame, false)
            );
        }
        // The largest allowed still goes to the store.
        let mut d = machine(&["a"]);
        d.handle_send(
            t0,
            UnixMillis(1),
            link("a", 3),
            UserId(1),
            ordered(MAX_ORDER_SEQ, 0),
        );
        assert_eq!(drain(&mut d).store.len(), 1);
    }

    #[test]
    fn refused_sends_are_nacked_with_the_right_code() {
        let t0 = base();
        let long = "x".repeat(config().max_body + 1);
        // (conv, body, sender) -> code; none reaches the store.
        let cases: &[(&str, &str, u64, ErrorCode)] = &[
            ("nope", "b", 1, ErrorCode::BadConversation),
            ("p:2:1", "b", 1, ErrorCode::BadConversation),
            ("g:", "b", 1, ErrorCode::BadConversation),
            ("p:1:2", &long, 1, ErrorCode::BodyTooLarge),
            ("p:2:3", "b", 1, ErrorCode::NotMember),
        ];
        for (conv, body, sender, code) in cases {
            let mut d = machine(&["a"]);
            d.handle_send(
                t0,
                UnixMillis(1),
                link("a", 5),
                UserId(*sender),
                send(9, conv, body),
            );
            let out = drain(&mut d);
            assert!(out.store.is_empty(), "{conv}");
            assert_eq!(out.replies.len(), 1);
            assert_eq!(nack_of(&out.replies[0].1), (*code, false), "{conv}");
            let nack = out.replies[0].1.nack.as_ref().unwrap();
            assert_eq!((nack.msg_id_hi, nack.msg_id_lo), (0, 9));
        }
        // Exactly the limit is fine.
        let mut d = machine(&["a"]);
        let body = "x".repeat(config().max_body);
        d.handle_send(
            t0,
            UnixMillis(1),
            link("a", 5),
            UserId(1),
            send(9, "p:1:2", &body),
        );
        assert_eq!(drain(&mut d).store.len(), 1);
    }

    #[test]
    fn store_answers_map_to_nacks() {
        let t0 = base();
        let cases: Vec<(StoreResult, ErrorCode, bool)> = vec![
            (
                Ok(StoreReply::Appended(Err(AppendError::NotMember))),
                ErrorCode::NotMember,
                false,
            ),
            (
                Ok(StoreReply::Appended(Err(AppendError::ConflictingRetry))),
                ErrorCode::ConflictingRetry,
                false,
            ),
            (
                Ok(StoreReply::Appended(Err(AppendError::UnknownConversation))),
                ErrorCode::BadConversation,
                false,
            ),
            (
                Ok(StoreReply::Appended(Err(AppendError::OutOfOrder))),
                ErrorCode::OutOfOrder,
                true,
            ),
            (
                Ok(StoreReply::Appended(Err(AppendError::Superseded))),
                ErrorCode::Superseded,
                false,
            ),
            (
                Err(StoreUnavailable("connection reset".into())),
                ErrorCode::Unavailable,
                true,
            ),
            (
                Ok(StoreReply::CursorsAdvanced),
                ErrorCode::Unavailable,
                true,
            ),
        ];
        for (result, code, retryable) in cases {
            let mut d = machine(&["a"]);
            d.handle_send(
                t0,
                UnixMillis(1),
                link("a", 3),
                UserId(1),
                send(9, "g:x", "b"),
            );
            let id = drain(&mut d).store[0].id;
            d.handle_store(t0, id, result);
            let out = drain(&mut d);
            assert_eq!(nack_of(&out.replies[0].1), (code, retryable));
            assert!(out.store.is_empty() && out.pushes.is_empty());
        }
    }

    #[test]
    fn store_timeout_nacks_unavailable_and_late_replies_are_ignored() {
        let t0 = base();
        let timeout = config().store_timeout;
        let mut d = machine(&["a"]);
        d.handle_send(
            t0,
            UnixMillis(1),
            link("a", 1),
            UserId(1),
            send(1, "p:1:2", "b"),
        );
        let first = drain(&mut d).store[0].id;
        let t1 = t0 + Duration::from_millis(500);
        d.handle_send(
            t1,
            UnixMillis(2),
            link("a", 2),
            UserId(1),
            send(2, "p:1:2", "b"),
        );
        let second = drain(&mut d).store[0].id;
        assert_eq!(
            d.poll_timeout(),
            Some((t0 + timeout, TimerReason::StoreDeadline))
        );

        // Just before the deadline: nothing.
        d.handle_timeout(t0 + timeout - Duration::from_millis(1));
        assert!(drain(&mut d).replies.is_empty());
        // At it: the first send fails as retryable, the second still waits.
        d.handle_timeout(t0 + timeout);
        let out = drain(&mut d);
        assert_eq!(out.replies.len(), 1);
        assert_eq!(out.replies[0].1.request_id, 1);
        assert_eq!(nack_of(&out.replies[0].1), (ErrorCode::Unavailable, true));
        assert_eq!(
            d.poll_timeout(),
            Some((t1 + timeout, TimerReason::StoreDeadline))
        );

        // The late answer to the first changes nothing; the second's still works.
        let msg = stored("p:1:2", 1, 1, 1, "b");
        d.handle_store(t0 + timeout, first, appended(msg, false));
        let out = drain(&mut d);
        assert!(out.replies.is_empty() && out.store.is_empty());
        d.handle_store(
            t0 + timeout,
            second,
            appended(stored("p:1:2", 2, 1, 2, "b"), false),
        );
        assert_eq!(ack_of(&drain(&mut d).replies[0].1), (EPOCH.0, 2));

        // A route read that times out abandons the push, with no reply to anyone.
        let t2 = t0 + timeout;
        assert_eq!(
            d.poll_timeout(),
            Some((t2 + timeout, TimerReason::StoreDeadline))
        );
        d.handle_timeout(t2 + timeout);
        let out = drain(&mut d);
        assert!(out.replies.is_empty() && out.pushes.is_empty());
        assert_eq!(d.stats().pushes_abandoned, 1);
        assert_eq!(d.poll_timeout(), None);
    }

    #[test]
    fn overload_is_refused_as_retryable() {
        let t0 = base();
        let mut d = RouteDelivery::new(DeliveryConfig {
            max_in_flight: 1,
            ..config()
        });
        d.handle_send(
            t0,
            UnixMillis(1),
            link("a", 1),
            UserId(1),
            send(1, "all", "b"),
        );
        d.handle_send(
            t0,
            UnixMillis(1),
            link("a", 2),
            UserId(1),
            send(2, "all", "b"),
        );
        let out = drain(&mut d);
        assert_eq!(out.store.len(), 1);
        assert_eq!(out.replies[0].1.request_id, 2);
        assert_eq!(nack_of(&out.replies[0].1), (ErrorCode::Unavailable, true));
    }

    #[test]
    fn pushes_to_one_server_coalesce_into_one_batch() {
        let t0 = base();
        let mut d = machine(&["a", "b"]);
        let o1 = send_and_append(
            &mut d,
            t0,
            link("a", 1),
            1,
            stored("p:1:2", 1, 1, 1, "m1"),
            false,
        );
        let o2 = send_and_append(
            &mut d,
            t0,
            link("a", 2),
            3,
            stored("p:3:4", 1, 3, 2, "m2"),
            false,
        );
        d.handle_store(
            t0,
            o1.store[0].id,
            Ok(StoreReply::Routes(vec![
                route(1, Some("a")),
                route(2, Some("a")),
            ])),
        );
        d.handle_store(
            t0,
            o2.store[0].id,
            Ok(StoreReply::Routes(vec![
                route(3, Some("b")),
                route(4, Some("a")),
            ])),
        );
        let out = drain(&mut d);
        assert_eq!(out.pushes.len(), 2, "one batch per server");
        assert_eq!(out.pushes[0].0, sid("a"));
        let bodies: Vec<&[u8]> = out.pushes[0]
            .1
            .pushes
            .iter()
            .map(|p| &p.message.as_ref().unwrap().body[..])
            .collect();
        assert_eq!(bodies, [b"m1" as &[u8], b"m2"]);
        assert_eq!(summary(&out.pushes[1..]), [("b".into(), 1, vec![3], false)]);
    }

    #[test]
    fn batches_and_member_lists_stay_bounded() {
        let t0 = base();
        let mut d = RouteDelivery::new(DeliveryConfig {
            max_recipients_per_push: 2,
            // A 2-recipient push of this message is bounded at 5 + 1 + 80 + 20 + 32 = 138
            // bytes: room for exactly two.
            max_batch_bytes: 2 * 138,
            ..config()
        });
        d.handle_registry(live(&["a"]));
        let out = send_and_append(
            &mut d,
            t0,
            link("a", 1),
            1,
            stored("g:big", 1, 1, 1, "s"),
            false,
        );
        let members = (1..=5).map(UserId).collect();
        d.handle_store(t0, out.store[0].id, Ok(StoreReply::Members(members)));
        let out = drain(&mut d);
        // 5 members in chunks of 2 -> 3 pushes; 2 fit a batch -> 2 batches, in order.
        let sizes: Vec<usize> = out.pushes.iter().map(|(_, b)| b.pushes.len()).collect();
        assert_eq!(sizes, [2, 1]);
        assert_eq!(
            summary(&out.pushes),
            [
                ("a".into(), 1, vec![1, 2], false),
                ("a".into(), 1, vec![3, 4], false),
                ("a".into(), 1, vec![5], false),
            ]
        );
    }

    #[test]
    fn a_server_that_left_gets_no_push() {
        let t0 = base();
        let mut d = machine(&["a", "b"]);
        let out = send_and_append(
            &mut d,
            t0,
            link("a", 1),
            1,
            stored("p:1:2", 1, 1, 1, "m"),
            false,
        );
        // "b" leaves between the append and the route read.
        d.handle_registry(live(&["a"]));
        d.handle_store(
            t0,
            out.store[0].id,
            Ok(StoreReply::Routes(vec![
                route(1, Some("a")),
                route(2, Some("b")),
            ])),
        );
        assert_eq!(
            summary(&drain(&mut d).pushes),
            [("a".into(), 1, vec![1], false)]
        );

        // Pushes already queued (not yet drained) for a leaver are dropped too.
        let mut d = machine(&["a", "b"]);
        let out = send_and_append(
            &mut d,
            t0,
            link("a", 1),
            1,
            stored("all", 1, 1, 1, "m"),
            false,
        );
        assert_eq!(out.pushes.len(), 2);
        d.handle_send(
            t0,
            UnixMillis(1),
            link("a", 2),
            UserId(1),
            send(2, "all", "m"),
        );
        let id = drain(&mut d).store[0].id;
        d.handle_store(t0, id, appended(stored("all", 2, 1, 2, "m"), false));
        d.handle_registry(live(&["b"]));
        assert_eq!(
            summary(&drain(&mut d).pushes),
            [("b".into(), 2, vec![], true)]
        );
    }

    #[test]
    fn planners_are_pure_and_skip_the_unreachable() {
        let msg = stored("g:x", 7, 1, 1, "m");
        let set = live(&["a", "b"]);
        let routes = vec![
            route(3, Some("b")),
            route(1, Some("a")),
            route(3, Some("b")),  // listed twice: pushed once
            route(4, Some("zz")), // not live
            route(5, None),
        ];
        let planned = plan_pushes(&msg, &routes, &set);
        let got: Vec<(String, Vec<u64>)> = planned
            .iter()
            .map(|(s, p)| (s.0.clone(), p.recipients.clone()))
            .collect();
        assert_eq!(got, [("a".into(), vec![1]), ("b".into(), vec![3])]);
        assert!(plan_pushes(&msg, &routes, &BTreeMap::new()).is_empty());
        assert!(plan_broadcast(&msg, &BTreeMap::new()).is_empty());
        let members = plan_member_broadcast(&msg, &[UserId(2), UserId(2), UserId(1)], &set, 10);
        assert_eq!(members[&sid("a")][0].recipients, [1, 2]);
        assert_eq!(members.len(), 2);
    }
}
