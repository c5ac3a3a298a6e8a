//! The route's delivery: append a sent message, answer the sender, push it to the servers
//! that hold its recipients.
//!
//! A send arrives from a server's internal link (`RouteSend`) or from the route's own HTTP API
//! (`groupRoute`/`p2pRoute`); both take the same path:
//!
//! ```text
//! validate ─► Append ─► reply (SendAck: appended = acked) ─► plan pushes
//!                                   all:      one all-sessions Push per live server
//!                                   private:  [LoadRoutes(both)] ─► per-server Pushes
//!                                   group:    [LoadMembers] ─► ≤ threshold: LoadRoutes ─► per-server
//!                                                              > threshold: member-list Push per live server
//! ```
//!
//! The bracketed reads are skipped when the append's reply already carries what they would
//! read ([`Appended::recipients`](crate::store::Appended::recipients): a group's members, a
//! private conversation's route records, read in the append's own atomic step), so a private
//! message or a large group's message costs one store round trip; a backend that cannot read
//! them there (route records on a Redis Cluster live in other slots) leaves them out and the
//! route reads them after the append.
//!
//! A group's member list is 1,000 ids for a large group, the same for message after message:
//! the route keeps the last list each group's appends returned with its version
//! ([`MembersVersion`]), the next append names it, and the store answers "unchanged"
//! ([`Recipients::MembersUnchanged`]) in the same atomic step instead of the list while no
//! membership change came between. A kept list is used only for an append that confirmed it.
//!
//! The route reads route records at or after the append, never from a cache, so a recipient
//! that logged in before the append is found where it is now. The sender is a recipient too:
//! its own client receives the message by seq like everyone else, so every member's view of
//! the log is the same. A duplicate append pushes again (the first push may have been lost).
//!
//! Pushes are best effort once the sender is acked: if a route or member read fails, the
//! message stays in the log and clients recover it by gap detection, head checks and sync.
//! The counters in [`DeliveryStats`] report it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::time::Instant;

use cim_proto::{ErrorCode, Push, PushBatch, RouteSend, RouteSendResult, SendAck, SendNack};

use crate::ids::{ClientMsgId, ConvId, ServerId, UnixMillis, UserId};
use crate::registry::LiveServer;
use crate::store::{
    AppendError, MembersVersion, Recipients, RequestId, RouteRecord, SendOrder, StoreCommand,
    StoreReply, StoreRequest, StoreResult, StoredMessage, message_to_proto,
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
    /// Member ids the route keeps at most over all groups' kept lists (see
    /// [`RouteDelivery`]'s `member_lists`). Past it lists are forgotten (the first groups by
    /// name: a miss costs one full list), and a longer list is not kept, so many or huge
    /// groups cannot grow the route's memory.
    pub max_member_ids_kept: usize,
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
            // 8 MiB of ids: 1,024 groups of 1,000.
            max_member_ids_kept: 1 << 20,
        }
    }
}

/// What the delivery machine asks of the shell, from [`RouteDelivery::poll_output`].
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutput {
    /// Execute, then feed the result to [`RouteDelivery::handle_store_reply`].
    Store(StoreRequest),
    /// The answer to a send: to the server's link (`RouteSendResult` as is) or to the HTTP
    /// caller (`request_id` then carries the [`ApiRequestId`]).
    Reply {
        origin: SendOrigin,
        result: RouteSendResult,
    },
    /// Everything queued for one server since the last drain, as one batch.
    Push { server: ServerId, batch: PushBatch },
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
/// [`handle_send`](Self::handle_send), [`handle_route_send`](Self::handle_route_send),
/// [`handle_store_reply`](Self::handle_store_reply) (the reply to a request it emitted),
/// [`handle_timeout`](Self::handle_timeout).
///
/// **Drain rule:** after every `handle_*`, drain [`poll_output`](Self::poll_output) until it
/// returns `None`, then re-arm the timer from [`poll_timeout`](Self::poll_timeout). It gives
/// store requests first, then replies, then pushes (replies before pushes: a sender hears
/// its ack no later than its recipients see the message). Pushes queued for one server
/// between drains leave as one `PushBatch` (more only past `max_batch_bytes`).
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
    /// The last member list each group's appends returned, with its version: the next
    /// append to the group names it, and the store answers "unchanged" rather than listing
    /// the members again while they are ([`Recipients::MembersUnchanged`]). Never trusted on
    /// its own: a list is used only for an append whose own atomic step confirmed it, so a
    /// member who left never gets a later message from a stale list.
    member_lists: BTreeMap<ConvId, MemberList>,
    /// Member ids in `member_lists`, at most `config.max_member_ids_kept`.
    member_ids_kept: usize,
    stats: DeliveryStats,
}

/// A group's member list as of one membership version.
type MemberList = (MembersVersion, Arc<[UserId]>);

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
        /// The member list the append named (`members_known`): what the push goes to if
        /// the store confirms it, whatever the cache holds by then.
        members_known: Option<MemberList>,
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
            member_lists: BTreeMap::new(),
            member_ids_kept: 0,
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
                let members_known = self.member_lists.get(&conv).cloned();
                let command = StoreCommand::Append {
                    conv,
                    sender,
                    msg_id,
                    order: SendOrder::from_send(&send),
                    body: send.body,
                    now: wall,
                    members_known: members_known.as_ref().map(|(version, _)| *version),
                };
                let stage = Stage::Append {
                    origin,
                    sender,
                    msg_id,
                    members_known,
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
    pub fn handle_store_reply(&mut self, now: Instant, id: RequestId, result: StoreResult) {
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
                    members_known,
                },
                result,
            ) => self.on_appended(now, origin, (sender, msg_id), members_known, result),
            (Stage::Members { message }, Ok(StoreReply::Members(members))) => {
                self.on_members(now, message, &members)
            }
            (Stage::Routes { message }, Ok(StoreReply::Routes(routes))) => {
                self.on_routes(&message, &routes)
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
                    ..
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

    /// The next output: store requests, then replies, then pushes (see the drain rule).
    pub fn poll_output(&mut self) -> Option<DeliveryOutput> {
        if let Some(request) = self.poll_store() {
            return Some(DeliveryOutput::Store(request));
        }
        if let Some((origin, result)) = self.poll_reply() {
            return Some(DeliveryOutput::Reply { origin, result });
        }
        self.poll_push()
            .map(|(server, batch)| DeliveryOutput::Push { server, batch })
    }

    // The three kinds `poll_output` gives, in its order. Private: the shell drains only
    // `poll_output`; this module's tables read one kind at a time.
    fn poll_store(&mut self) -> Option<StoreRequest> {
        self.store_out.pop_front()
    }

    fn poll_reply(&mut self) -> Option<(SendOrigin, RouteSendResult)> {
        self.replies.pop_front()
    }

    /// Everything queued for one server since the last drain, as one batch (cut only where
    /// it would pass `max_batch_bytes`), servers in id order.
    fn poll_push(&mut self) -> Option<(ServerId, PushBatch)> {
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
        (sender, msg_id): (UserId, ClientMsgId),
        members_known: Option<MemberList>,
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

        match (&message.conv, appended.recipients) {
            (ConvId::All, _) => {
                for (server, push) in plan_broadcast(&message, &self.live) {
                    self.queue_push(server, push);
                }
            }
            (ConvId::Private { .. }, Some(Recipients::Routes(routes))) => {
                self.on_routes(&message, &routes)
            }
            (ConvId::Private { low, high }, _) => {
                let users = vec![*low, *high];
                self.request(
                    now,
                    StoreCommand::LoadRoutes { users },
                    Stage::Routes { message },
                );
            }
            (ConvId::Group(_), Some(Recipients::Members { version, members })) => {
                let conv = message.conv.clone();
                self.on_members(now, message, &members);
                self.keep_member_list(conv, version, members);
            }
            (ConvId::Group(_), Some(Recipients::MembersUnchanged(version)))
                if members_known
                    .as_ref()
                    .is_some_and(|(known, _)| *known == version) =>
            {
                let members = members_known.map(|(_, list)| list).unwrap_or_default();
                self.on_members(now, message, &members)
            }
            (ConvId::Group(_), _) => {
                let conv = message.conv.clone();
                self.request(
                    now,
                    StoreCommand::LoadMembers { conv },
                    Stage::Members { message },
                );
            }
        }
    }

    /// The recipients' route records are known: one push per server that holds any.
    fn on_routes(&mut self, message: &StoredMessage, routes: &[(UserId, Option<RouteRecord>)]) {
        let planned = plan_pushes(message, routes, &self.live);
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

    /// Keeps `conv`'s member list as of `version` for its next appends to name.
    fn keep_member_list(&mut self, conv: ConvId, version: MembersVersion, members: Vec<UserId>) {
        if let Some((_, old)) = self.member_lists.remove(&conv) {
            self.member_ids_kept -= old.len();
        }
        let budget = self.config.max_member_ids_kept;
        if members.len() > budget {
            return;
        }
        while self.member_ids_kept + members.len() > budget {
            let Some((_, (_, forgotten))) = self.member_lists.pop_first() else {
                break;
            };
            self.member_ids_kept -= forgotten.len();
        }
        self.member_ids_kept += members.len();
        self.member_lists.insert(conv, (version, members.into()));
    }

    /// Member ids kept over all groups' lists (see [`DeliveryConfig::max_member_ids_kept`]).
    pub fn member_ids_kept(&self) -> usize {
        self.member_ids_kept
    }

    fn on_members(&mut self, now: Instant, message: StoredMessage, members: &[UserId]) {
        if members.len() > self.config.broadcast_threshold {
            let planned = plan_member_broadcast(
                &message,
                members,
                &self.live,
                self.config.max_recipients_per_push,
            );
            for (server, pushes) in planned {
                for push in pushes {
                    self.queue_push(server.clone(), push);
                }
            }
        } else if !members.is_empty() {
            let command = StoreCommand::LoadRoutes {
                users: members.to_vec(),
            };
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
mod tests;
