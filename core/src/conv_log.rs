//! One conversation's log and its append semantics: the pure reference that the Redis Lua
//! script and the in-memory store must match step for step.
//!
//! An append, as one atomic step:
//!
//! 1. drop idempotency records older than the TTL (Redis expires the keys; a script sees
//!    expired keys as absent, so expiry comes before the lookup);
//! 2. look up the record for (sender, client msg id):
//!    - same body hash: answer the **original** message, `duplicate: true`, store nothing;
//!    - other body hash: [`AppendError::ConflictingRetry`], store nothing;
//! 3. if the append carries a [`SendOrder`], look up the last stored `seq` of its (sender,
//!    stream), `last` (0 if none or expired): `order.seq <= last` is
//!    [`AppendError::Superseded`] and `order.after > last` is [`AppendError::OutOfOrder`],
//!    storing nothing;
//! 4. otherwise take `head_seq + 1` (the first message is seq 1), store the message, write the
//!    record (body hash, seq, append time), raise the order record to `order.seq`, and trim
//!    the log to `max_len`, oldest first (`first_available_seq` moves up).
//!
//! A duplicate (step 2) raises the order record too: the message is stored, so what its
//! stream sends after it may follow it (a restarted client renumbers its outbox under a new
//! stream, and its first resend may be of a message stored under the old one).
//!
//! A duplicate whose original has been trimmed still answers with the original seq and
//! append time: the record keeps them, and the body is the retry's, which equals the
//! original's because the SHA-256 hashes match. So a retry's answer never depends on whether
//! the log still holds the message.
//!
//! Membership is not checked here; the store composes that check with the append.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::canary::{Canaries, Canary};
use crate::ids::{ClientMsgId, ConvId, LogEpoch, UnixMillis, UserId};
use crate::store::{AppendError, Appended, SendOrder, StoredMessage};

/// What the log remembers of one appended (sender, msg id).
#[derive(Debug, Clone, PartialEq, Eq)]
struct IdempotencyRecord {
    body_hash: [u8; 32],
    seq: u64,
    appended_at: UnixMillis,
}

#[derive(Debug, Clone)]
pub struct ConversationLog {
    conv: ConvId,
    log_epoch: LogEpoch,
    max_len: usize,
    idempotency_ttl: Duration,
    /// Contiguous seqs, oldest first.
    messages: VecDeque<StoredMessage>,
    head_seq: u64,
    records: BTreeMap<(UserId, ClientMsgId), IdempotencyRecord>,
    /// The same records ordered by write time, so expiry does not scan them all.
    expiry: BTreeSet<(UnixMillis, UserId, ClientMsgId)>,
    /// (sender, stream) -> the stream's last stored order seq, and when it was written.
    orders: BTreeMap<(UserId, u64), (u64, UnixMillis)>,
    /// The same records by write time; they expire with the idempotency TTL.
    order_expiry: BTreeSet<(UnixMillis, UserId, u64)>,
    /// `IdempotentAppend` or `SendOrder` off: the simulation's canaries (nothing outside
    /// canary builds).
    canaries: Canaries,
    /// The store incarnation that last wrote or served this log (0: none recorded). See
    /// [`ConversationLog::settle`].
    incarnation: u64,
    /// The epoch this log last moved from (0: never moved) and the head seq it carried
    /// over: seqs `1..=carried.1` name the same contents under both epochs.
    carried: (LogEpoch, u64),
}

impl ConversationLog {
    /// An empty log. `max_len` is the trim bound (at least 1 is kept: the newest message is
    /// never trimmed by its own append); `idempotency_ttl` must be at least the clients'
    /// outbox maximum age.
    pub fn new(
        conv: ConvId,
        log_epoch: LogEpoch,
        max_len: usize,
        idempotency_ttl: Duration,
    ) -> Self {
        Self {
            conv,
            log_epoch,
            max_len: max_len.max(1),
            idempotency_ttl,
            messages: VecDeque::new(),
            head_seq: 0,
            records: BTreeMap::new(),
            expiry: BTreeSet::new(),
            orders: BTreeMap::new(),
            order_expiry: BTreeSet::new(),
            canaries: Canaries::NONE,
            incarnation: 0,
            carried: (LogEpoch(0), 0),
        }
    }

    /// This log, written by store incarnation `incarnation`.
    pub fn written_by(mut self, incarnation: u64) -> Self {
        self.incarnation = incarnation;
        self
    }

    /// The store incarnation that last wrote or served this log (0: none recorded).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The lost-tail rule (docs/design.md, "Never the same name for two contents"): called
    /// before this log is served or appended to by store incarnation `incarnation`. A log
    /// last touched by another incarnation may have lost messages that readers already
    /// received (a restart from older data, a promoted replica), and its next seqs would
    /// name other contents: it moves to `fresh_epoch`, keeping its surviving messages at
    /// their seqs (the same contents under the new epoch) and its idempotency and order
    /// records, and records what it carried over: (old epoch, head seq now), which heads
    /// report ([`ConversationLog::carried`]). Returns whether it moved. A log with no
    /// recorded incarnation (0) is only stamped.
    ///
    /// Conservative: an incarnation change without loss moves the log too. A client at
    /// (old epoch, c) with c at most the carried head continues at c under the new epoch
    /// (nothing re-delivered); one past it reports the seqs it had beyond as lost.
    pub fn settle(&mut self, incarnation: u64, fresh_epoch: LogEpoch) -> bool {
        if self.incarnation == incarnation {
            return false;
        }
        let moved = self.incarnation != 0
            && fresh_epoch != self.log_epoch
            && !self.canaries.disabled(Canary::LostTailDetection);
        self.incarnation = incarnation;
        if moved {
            self.carried = (self.log_epoch, self.head_seq);
            self.log_epoch = fresh_epoch;
            for message in &mut self.messages {
                message.log_epoch = fresh_epoch;
            }
        }
        moved
    }

    /// This log with the run's canaries (see `crate::canary`).
    pub fn with_canaries(mut self, canaries: Canaries) -> Self {
        self.canaries = canaries;
        self
    }

    pub fn conv(&self) -> &ConvId {
        &self.conv
    }

    pub fn log_epoch(&self) -> LogEpoch {
        self.log_epoch
    }

    /// The epoch this log last moved from (0: never) and the head seq it carried over.
    pub fn carried(&self) -> (LogEpoch, u64) {
        self.carried
    }

    /// Seq of the newest message; 0 while nothing was ever appended.
    pub fn head_seq(&self) -> u64 {
        self.head_seq
    }

    /// Oldest seq still stored. For an empty log, `head_seq + 1` (nothing below was trimmed
    /// that a reader could still want: the next append takes this seq).
    pub fn first_available_seq(&self) -> u64 {
        self.messages
            .front()
            .map_or(self.head_seq + 1, |message| message.seq)
    }

    /// Messages stored right now.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Idempotency records still alive (expired ones are dropped on the next append).
    pub fn idempotency_records(&self) -> usize {
        self.records.len()
    }

    pub fn append(
        &mut self,
        sender: UserId,
        msg_id: ClientMsgId,
        body: Bytes,
        now: UnixMillis,
        order: Option<SendOrder>,
    ) -> Result<Appended, AppendError> {
        self.expire_records(now);
        let body_hash: [u8; 32] = Sha256::digest(&body).into();
        let key = (sender, msg_id);

        let records = if self.canaries.disabled(Canary::IdempotentAppend) {
            None
        } else {
            self.records.get(&key)
        };
        if let Some(record) = records {
            if record.body_hash != body_hash {
                return Err(AppendError::ConflictingRetry);
            }
            let message = StoredMessage {
                conv: self.conv.clone(),
                log_epoch: self.log_epoch,
                seq: record.seq,
                sender,
                msg_id,
                body,
                appended_at: record.appended_at,
            };
            if let Some(order) = order {
                self.raise_order(sender, order, now);
            }
            return Ok(Appended {
                message,
                duplicate: true,
                recipients: None,
            });
        }
        if let Some(order) = order
            && !self.canaries.disabled(Canary::SendOrder)
        {
            let last = self.last_order(sender, order.stream);
            if order.seq <= last {
                return Err(AppendError::Superseded);
            }
            if order.after > last {
                return Err(AppendError::OutOfOrder);
            }
        }

        self.head_seq += 1;
        let message = StoredMessage {
            conv: self.conv.clone(),
            log_epoch: self.log_epoch,
            seq: self.head_seq,
            sender,
            msg_id,
            body,
            appended_at: now,
        };
        self.messages.push_back(message.clone());
        self.records.insert(
            key,
            IdempotencyRecord {
                body_hash,
                seq: self.head_seq,
                appended_at: now,
            },
        );
        self.expiry.insert((now, sender, msg_id));
        if let Some(order) = order {
            self.raise_order(sender, order, now);
        }
        while self.messages.len() > self.max_len {
            self.messages.pop_front();
        }
        Ok(Appended {
            message,
            duplicate: false,
            recipients: None,
        })
    }

    /// Up to `limit` stored messages with seq > `after_seq`, in seq order. Trimmed seqs are
    /// simply absent: the answer starts at `max(after_seq + 1, first_available_seq())`.
    pub fn fetch(&self, after_seq: u64, limit: usize) -> Vec<StoredMessage> {
        let first = self.first_available_seq();
        // Seqs are contiguous from `first`, so the start is an index, not a search.
        let skip = after_seq.saturating_add(1).saturating_sub(first);
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        self.messages
            .iter()
            .skip(skip)
            .take(limit)
            .cloned()
            .collect()
    }

    /// The last stored order seq of (sender, stream); 0 if none is remembered.
    pub fn last_order(&self, sender: UserId, stream: u64) -> u64 {
        self.orders
            .get(&(sender, stream))
            .map_or(0, |&(last, _)| last)
    }

    /// Raises (never lowers) the order record of `order`'s stream to `order.seq`.
    fn raise_order(&mut self, sender: UserId, order: SendOrder, now: UnixMillis) {
        let key = (sender, order.stream);
        let previous = self.orders.get(&key).copied();
        if previous.is_some_and(|(last, _)| last >= order.seq) {
            return;
        }
        if let Some((_, at)) = previous {
            self.order_expiry.remove(&(at, sender, order.stream));
        }
        self.orders.insert(key, (order.seq, now));
        self.order_expiry.insert((now, sender, order.stream));
    }

    /// A record written at `t` lives while `now < t + ttl` (Redis `PX` semantics).
    fn expire_records(&mut self, now: UnixMillis) {
        while let Some(&(at, sender, msg_id)) = self.expiry.first() {
            if now < at.plus(self.idempotency_ttl) {
                break;
            }
            self.expiry.pop_first();
            self.records.remove(&(sender, msg_id));
        }
        while let Some(&(at, sender, stream)) = self.order_expiry.first() {
            if now < at.plus(self.idempotency_ttl) {
                break;
            }
            self.order_expiry.pop_first();
            self.orders.remove(&(sender, stream));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TTL: Duration = Duration::from_secs(60);

    fn log(max_len: usize) -> ConversationLog {
        ConversationLog::new(ConvId::All, LogEpoch(77), max_len, TTL)
    }

    fn t(ms: u64) -> UnixMillis {
        UnixMillis(1_700_000_000_000 + ms)
    }

    fn body(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    /// (sender, msg id, body, at ms) -> expected (seq, duplicate) or error.
    type Step = (
        u64,
        u128,
        &'static str,
        u64,
        Result<(u64, bool), AppendError>,
    );

    fn run(log: &mut ConversationLog, steps: &[Step]) {
        for (i, (sender, id, text, at, want)) in steps.iter().enumerate() {
            let got = log
                .append(UserId(*sender), ClientMsgId(*id), body(text), t(*at), None)
                .map(|a| (a.message.seq, a.duplicate));
            assert_eq!(&got, want, "step {i}");
        }
    }

    #[test]
    fn appends_take_contiguous_seqs_and_retries_answer_the_original() {
        let mut l = log(100);
        assert_eq!((l.head_seq(), l.first_available_seq()), (0, 1));
        assert!(l.is_empty());
        run(
            &mut l,
            &[
                (1, 10, "hi", 0, Ok((1, false))),
                (2, 10, "yo", 1, Ok((2, false))), // same id, another sender: a new message
                (1, 11, "hi", 2, Ok((3, false))), // same body, another id: a new message
                (1, 10, "hi", 3, Ok((1, true))),  // retry
                (1, 10, "HI", 4, Err(AppendError::ConflictingRetry)),
                (2, 12, "x", 5, Ok((4, false))),
            ],
        );
        assert_eq!((l.head_seq(), l.len(), l.is_empty()), (4, 4, false));
        let seqs: Vec<u64> = l.fetch(0, 10).iter().map(|m| m.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        // The duplicate answer is the original message, time included.
        let dup = l
            .append(UserId(1), ClientMsgId(10), body("hi"), t(9), None)
            .unwrap();
        assert_eq!(dup.message, l.fetch(0, 1)[0]);
        assert_eq!(dup.message.appended_at, t(0));
        assert_eq!(dup.message.log_epoch, LogEpoch(77));
        assert_eq!(dup.message.conv, ConvId::All);
    }

    #[test]
    fn trimming_drops_the_oldest_and_moves_first_available() {
        let mut l = log(3);
        for i in 1..=5u64 {
            let a = l
                .append(UserId(1), ClientMsgId(u128::from(i)), body("m"), t(i), None)
                .unwrap();
            assert_eq!(a.message.seq, i);
        }
        assert_eq!((l.head_seq(), l.first_available_seq(), l.len()), (5, 3, 3));
        let seqs = |v: Vec<StoredMessage>| v.iter().map(|m| m.seq).collect::<Vec<_>>();
        // fetch table: (after, limit) -> seqs
        let cases: &[(u64, usize, &[u64])] = &[
            (0, 10, &[3, 4, 5]),
            (3, 10, &[4, 5]),
            (4, 1, &[5]),
            (5, 10, &[]),
            (99, 10, &[]),
            (0, 0, &[]),
            (u64::MAX, 10, &[]),
        ];
        for (after, limit, want) in cases {
            assert_eq!(seqs(l.fetch(*after, *limit)), *want, "after {after}");
        }
        // A retry of a trimmed message still answers its original seq, and stores nothing.
        let dup = l
            .append(UserId(1), ClientMsgId(1), body("m"), t(9), None)
            .unwrap();
        assert_eq!((dup.message.seq, dup.duplicate), (1, true));
        assert_eq!(dup.message.appended_at, t(1));
        assert_eq!((l.head_seq(), l.len()), (5, 3));
        // A zero bound still keeps the newest message.
        let mut tiny = log(0);
        tiny.append(UserId(1), ClientMsgId(1), body("a"), t(0), None)
            .unwrap();
        assert_eq!((tiny.len(), tiny.first_available_seq()), (1, 1));
    }

    #[test]
    fn idempotency_records_expire_after_the_ttl() {
        let ttl_ms = TTL.as_millis() as u64;
        let mut l = log(100);
        run(
            &mut l,
            &[
                (1, 10, "a", 0, Ok((1, false))),
                (1, 11, "b", 10, Ok((2, false))),
                // Just inside the TTL: still a duplicate.
                (1, 10, "a", ttl_ms - 1, Ok((1, true))),
                // At the TTL the first record is gone: the same id is a new message...
                (1, 10, "a", ttl_ms, Ok((3, false))),
                // ...and it made a new record with a new clock.
                (1, 10, "a", ttl_ms + 5, Ok((3, true))),
                // The second one expires at 10 + ttl; a different body is then accepted.
                (1, 11, "changed", ttl_ms + 10, Ok((4, false))),
            ],
        );
        assert_eq!(l.idempotency_records(), 2);
    }

    /// (order seq, after, msg id, at ms) of sender 1, stream 9 -> expected seq or error.
    type OrderStep = (u64, u64, u128, u64, Result<u64, AppendError>);

    fn run_ordered(log: &mut ConversationLog, steps: &[OrderStep]) {
        for (i, (seq, after, id, at, want)) in steps.iter().enumerate() {
            let order = SendOrder {
                stream: 9,
                seq: *seq,
                after: *after,
            };
            let got = log
                .append(UserId(1), ClientMsgId(*id), body("m"), t(*at), Some(order))
                .map(|a| a.message.seq);
            assert_eq!(&got, want, "step {i}");
        }
    }

    #[test]
    fn a_stream_is_appended_in_its_order_whatever_order_the_appends_arrive_in() {
        let mut l = log(100);
        run_ordered(
            &mut l,
            &[
                // 2 arrives before 1, which it follows: refused, nothing stored.
                (2, 1, 102, 0, Err(AppendError::OutOfOrder)),
                (1, 0, 101, 1, Ok(1)),
                (2, 1, 102, 2, Ok(2)),
                // A resend of 1 is a duplicate: its original seq.
                (1, 0, 101, 3, Ok(1)),
                // 4 follows 3, which is not stored yet.
                (4, 3, 104, 4, Err(AppendError::OutOfOrder)),
                // The client gave 3 up as unknown: 4 now follows nothing pending.
                (4, 0, 104, 5, Ok(3)),
                // 3 arrives late (a delayed copy): it can no longer go before 4.
                (3, 2, 103, 6, Err(AppendError::Superseded)),
                // Order seqs skip numbers used in other conversations.
                (9, 4, 109, 7, Ok(4)),
            ],
        );
        assert_eq!(l.last_order(UserId(1), 9), 9);
        // Other senders and other streams of the same sender have records of their own.
        assert_eq!(l.last_order(UserId(2), 9), 0);
        assert_eq!(l.last_order(UserId(1), 8), 0);
        let other_stream = SendOrder {
            stream: 8,
            seq: 1,
            after: 0,
        };
        let a = l
            .append(
                UserId(1),
                ClientMsgId(200),
                body("m"),
                t(8),
                Some(other_stream),
            )
            .unwrap();
        assert_eq!(a.message.seq, 5);
        // Unordered appends (HTTP) neither check nor move the records.
        let a = l
            .append(UserId(1), ClientMsgId(201), body("m"), t(9), None)
            .unwrap();
        assert_eq!((a.message.seq, l.last_order(UserId(1), 9)), (6, 9));
    }

    #[test]
    fn a_duplicate_raises_the_order_record_and_records_expire_with_the_ttl() {
        let ttl_ms = TTL.as_millis() as u64;
        let mut l = log(100);
        // Stored unordered (or under an old stream), then resent as seq 1 of a new stream.
        l.append(UserId(1), ClientMsgId(101), body("m"), t(0), None)
            .unwrap();
        run_ordered(
            &mut l,
            &[
                (2, 1, 102, 1, Err(AppendError::OutOfOrder)),
                (1, 0, 101, 2, Ok(1)),
                (2, 1, 102, 3, Ok(2)),
                // Just inside the TTL the record still says 2.
                (3, 2, 103, ttl_ms + 2, Ok(3)),
                // Forgotten a TTL after its last write: 5 (after 4) waits for 4 again...
                (5, 4, 105, 2 * ttl_ms + 2, Err(AppendError::OutOfOrder)),
                // ...which is stored next (nothing pending before it), then 5.
                (4, 0, 104, 2 * ttl_ms + 3, Ok(4)),
                (5, 4, 105, 2 * ttl_ms + 4, Ok(5)),
            ],
        );
    }

    /// What one step of [`a_stream_gets_seqs_in_its_order`] does.
    #[derive(Debug, Clone, Copy)]
    enum StreamOp {
        /// (Re)send the `n`-th pending message, with its `after` as the client computes it.
        Send(usize),
        /// The client gives up its oldest pending message (unknown).
        GiveUp,
        /// A late copy of the `n`-th given-up message arrives, with no `after`.
        Late(usize),
    }

    fn stream_op() -> impl Strategy<Value = StreamOp> {
        prop_oneof![
            6 => (0usize..8).prop_map(StreamOp::Send),
            1 => Just(StreamOp::GiveUp),
            1 => (0usize..8).prop_map(StreamOp::Late),
        ]
    }

    proptest! {
        /// One stream's messages to one conversation, sent, resent and given up in any order:
        /// the stored ones take seqs in the order of their order seqs, and a message the
        /// client still waits for is never refused for good.
        #[test]
        fn a_stream_gets_seqs_in_its_order(ops in proptest::collection::vec(stream_op(), 0..120)) {
            let mut l = log(usize::MAX);
            // Order seqs 2, 4, ..: the stream's odd ones went to other conversations.
            let mut pending: BTreeSet<u64> = (1..=8).map(|n| 2 * n).collect();
            let mut given_up: Vec<u64> = Vec::new();
            let mut stored: BTreeMap<u64, u64> = BTreeMap::new();
            for (i, op) in ops.into_iter().enumerate() {
                let (seq, after) = match op {
                    StreamOp::Send(n) if !pending.is_empty() => {
                        let seq = *pending.iter().nth(n % pending.len()).unwrap();
                        let after = pending.range(..seq).next_back().copied().unwrap_or(0);
                        (seq, after)
                    }
                    StreamOp::GiveUp => {
                        given_up.extend(pending.pop_first());
                        continue;
                    }
                    StreamOp::Late(n) if !given_up.is_empty() => (given_up[n % given_up.len()], 0),
                    _ => continue,
                };
                let order = SendOrder { stream: 1, seq, after };
                let got = l.append(UserId(1), ClientMsgId(u128::from(seq)), body("m"), t(i as u64), Some(order));
                match got {
                    Ok(a) => {
                        prop_assert_eq!(*stored.entry(seq).or_insert(a.message.seq), a.message.seq);
                        pending.remove(&seq);
                    }
                    Err(AppendError::OutOfOrder) => prop_assert!(after != 0),
                    Err(AppendError::Superseded) => prop_assert!(!pending.contains(&seq)),
                    Err(e) => prop_assert!(false, "unexpected {e:?}"),
                }
            }
            let seqs: Vec<u64> = stored.values().copied().collect();
            prop_assert!(seqs.windows(2).all(|w| w[0] < w[1]), "order seq -> seq {stored:?}");
        }
    }

    #[derive(Debug, Clone)]
    struct Op {
        sender: u64,
        id: u128,
        body: u8,
    }

    fn op() -> impl Strategy<Value = Op> {
        (0u64..3, 0u128..6, 0u8..3).prop_map(|(sender, id, body)| Op { sender, id, body })
    }

    proptest! {
        #[test]
        fn appends_with_retries_are_idempotent_and_contiguous(
            ops in proptest::collection::vec(op(), 0..80),
        ) {
            // No trimming and no expiry: the pure idempotency semantics.
            let mut l = ConversationLog::new(ConvId::All, LogEpoch(1), usize::MAX, TTL);
            let mut model: BTreeMap<(u64, u128), (u8, u64)> = BTreeMap::new();
            for (i, o) in ops.iter().enumerate() {
                let got = l.append(
                    UserId(o.sender),
                    ClientMsgId(o.id),
                    Bytes::from(vec![o.body; 3]),
                    t(i as u64),
                    None,
                );
                match model.get(&(o.sender, o.id)) {
                    None => {
                        let a = got.unwrap();
                        prop_assert!(!a.duplicate);
                        prop_assert_eq!(a.message.seq, model.len() as u64 + 1);
                        model.insert((o.sender, o.id), (o.body, a.message.seq));
                    }
                    Some(&(b, seq)) if b == o.body => {
                        let a = got.unwrap();
                        prop_assert!(a.duplicate);
                        prop_assert_eq!(a.message.seq, seq);
                    }
                    Some(_) => prop_assert_eq!(got, Err(AppendError::ConflictingRetry)),
                }
            }
            let stored = l.fetch(0, usize::MAX);
            let n = model.len() as u64;
            prop_assert_eq!(l.head_seq(), n);
            prop_assert_eq!(
                stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
                (1..=n).collect::<Vec<_>>()
            );
            let keys: BTreeSet<_> = stored.iter().map(|m| (m.sender.0, m.msg_id.0)).collect();
            prop_assert_eq!(keys.len(), stored.len());
            for m in &stored {
                let (b, seq) = model[&(m.sender.0, m.msg_id.0)];
                prop_assert_eq!(m.seq, seq);
                prop_assert_eq!(&m.body[..], &[b; 3][..]);
            }
        }
    }
}
