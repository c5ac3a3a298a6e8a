//! Inbound delivery: per conversation, hand the application contiguous seqs exactly once.
//!
//! Pushed `Deliver` frames are hints that may arrive late, twice, out of order or not at
//! all. Only a *head* (from a `SyncAnswer` or a `FetchAnswer`, read from the store in one
//! step and answered in order on one connection) is authoritative about a conversation's
//! log epoch and bounds. So:
//!
//! - a push of another log epoch never resets a conversation: it triggers a fetch, whose
//!   head says which epoch is current (a late push from a retired epoch then costs one
//!   fetch, never a flip-flop that would re-deliver the new epoch's messages);
//! - a push for a conversation we have no position in is buffered until a sync answer says
//!   where to start (the server-side read cursor), so a restarted client does not replay
//!   the whole history.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::time::Instant;

use cim_proto as proto;
use proto::frame::Kind;

use super::{ClientEvent, FrameError, Outputs};
use crate::canary::{Canaries, Canary};
use crate::ids::{ClientMsgId, ConvId, LogEpoch, UnixMillis, UserId};
use crate::store::{ConvHead, StoredMessage};

#[derive(Debug, Clone)]
pub(crate) struct InboundConfig {
    pub gap_sync_delay: Duration,
    pub fetch_limit: u32,
    pub max_buffered: usize,
    /// A sync or fetch unanswered this long is forgotten, so another may be sent.
    pub request_timeout: Duration,
    /// How soon a sync whose answer was incomplete (a store shard down) is asked again.
    pub incomplete_sync_retry: Duration,
    pub canaries: Canaries,
}

/// Where the client stands in one conversation.
#[derive(Debug)]
struct Conv {
    /// False until a head said where to start; pushes are only buffered meanwhile.
    anchored: bool,
    log_epoch: LogEpoch,
    /// The last seq handed to the application.
    delivered: u64,
    /// The last seq sent in a DeliverAck (in `log_epoch`).
    acked: u64,
    /// Out-of-order arrivals above `delivered + 1`, bounded by `max_buffered`.
    buffer: BTreeMap<u64, StoredMessage>,
    /// The highest seq of `log_epoch` that arrived here, kept or not: a message dropped
    /// because the buffer was full still proves the log reaches this far, so the gap stays
    /// open until it is fetched (an empty buffer alone does not mean nothing is missing).
    seen: u64,
    gap_deadline: Option<Instant>,
    fetch_sent: Option<Instant>,
    /// When the first push of an unanchored conversation arrived.
    seen_at: Instant,
}

impl Conv {
    fn unanchored(log_epoch: LogEpoch, now: Instant) -> Self {
        Self {
            anchored: false,
            log_epoch,
            delivered: 0,
            acked: 0,
            buffer: BTreeMap::new(),
            seen: 0,
            gap_deadline: None,
            fetch_sent: None,
            seen_at: now,
        }
    }

    /// Buffers `msg` unless it is already delivered or buffered (dedup), or the buffer is
    /// full (the gap sync fetches it again). The caller checked the log epoch.
    fn insert(&mut self, msg: StoredMessage, cfg: &InboundConfig, out: &mut Outputs) {
        let max_buffered = cfg.max_buffered;
        if self.anchored && msg.seq <= self.delivered && cfg.canaries.disabled(Canary::Dedup) {
            out.events.push_back(ClientEvent::Message(msg));
            return;
        }
        self.seen = self.seen.max(msg.seq);
        if msg.seq <= self.delivered || self.buffer.contains_key(&msg.seq) {
            return;
        }
        if msg.seq != self.delivered + 1 && self.buffer.len() >= max_buffered {
            return;
        }
        self.buffer.insert(msg.seq, msg);
    }

    /// Hands off every contiguous buffered message.
    fn drain(&mut self, out: &mut Outputs) {
        while let Some(entry) = self.buffer.first_entry() {
            if *entry.key() != self.delivered + 1 {
                break;
            }
            let msg = entry.remove();
            self.delivered = msg.seq;
            out.events.push_back(ClientEvent::Message(msg));
        }
    }

    /// Moves `delivered` forward to `seq` without handing anything off (trimmed or already
    /// read), dropping what the buffer holds at or below it.
    fn jump_to(&mut self, seq: u64) {
        if seq > self.delivered {
            self.delivered = seq;
            self.buffer = self.buffer.split_off(&(seq + 1));
        }
    }

    /// Takes a position from a head: the server-side cursor (what an earlier run of this
    /// client acknowledged) or, if the log was trimmed past it, the oldest available seq.
    /// Assumes the store reports `cursor_seq` in `head.log_epoch`'s terms (0 when the stored
    /// cursor belongs to another epoch).
    fn anchor(&mut self, conv: &ConvId, head: &ConvHead, out: &mut Outputs) {
        if self.log_epoch != head.log_epoch {
            self.buffer.clear();
            self.seen = 0;
            self.log_epoch = head.log_epoch;
        }
        self.anchored = true;
        let cursor = head.cursor_seq.min(head.head_seq);
        let start = cursor
            .max(head.first_available_seq.saturating_sub(1))
            .min(head.head_seq);
        // A user with a place in this log whose unread messages were trimmed sees a marker;
        // one with no place yet (cursor 0) just starts at the oldest kept message.
        if cursor > 0 && start > cursor {
            out.events.push_back(ClientEvent::Unavailable {
                conv: conv.clone(),
                from_seq: cursor + 1,
                count: start - cursor,
            });
        }
        self.delivered = 0;
        self.jump_to(start);
        self.acked = cursor.min(start);
        self.drain(out);
    }

    /// The log now has another epoch that does not continue ours (lost and recreated, or
    /// moved twice since we were in it): start it from scratch. What we
    /// had not yet received of the old epoch is a gap of unknown size, reported as
    /// [`ClientEvent::LogReset`]. The cursor is not trusted here: a cursor in an epoch this
    /// client never saw cannot be one it acknowledged.
    fn reset(&mut self, conv: &ConvId, head: &ConvHead, out: &mut Outputs) {
        out.events.push_back(ClientEvent::LogReset {
            conv: conv.clone(),
            old_epoch: self.log_epoch,
            new_epoch: head.log_epoch,
        });
        self.log_epoch = head.log_epoch;
        self.buffer.clear();
        self.seen = 0;
        self.delivered = 0;
        self.acked = 0;
        self.gap_deadline = None;
        let start = head
            .first_available_seq
            .saturating_sub(1)
            .min(head.head_seq);
        if start > 0 {
            out.events.push_back(ClientEvent::Unavailable {
                conv: conv.clone(),
                from_seq: 1,
                count: start,
            });
        }
        self.jump_to(start);
    }

    /// The log now has another epoch: continue if the head says it moved from ours
    /// ([`Conv::carry`]), else start it from scratch ([`Conv::reset`]).
    fn switch(&mut self, conv: &ConvId, head: &ConvHead, cfg: &InboundConfig, out: &mut Outputs) {
        if head.carried_from != LogEpoch(0)
            && head.carried_from == self.log_epoch
            && !cfg.canaries.disabled(Canary::MoveContinuation)
        {
            self.carry(conv, head, out);
        } else {
            self.reset(conv, head, out);
        }
    }

    /// The log moved from our epoch to `head.log_epoch`, carrying seqs up to
    /// `head.carried_up_to` over under the same seqs: continue from where we are (reported
    /// as [`ClientEvent::LogMoved`] with `lost` 0), or, if we had received seqs the move did
    /// not carry (the store lost them), from the carried head, reporting those as lost. What
    /// arrived of the old epoch and was not handed over is dropped (it is fetched again
    /// under the new one, or was lost).
    fn carry(&mut self, conv: &ConvId, head: &ConvHead, out: &mut Outputs) {
        let continues_after = self.delivered.min(head.carried_up_to);
        out.events.push_back(ClientEvent::LogMoved {
            conv: conv.clone(),
            old_epoch: self.log_epoch,
            new_epoch: head.log_epoch,
            continues_after,
            lost: self.delivered - continues_after,
        });
        self.log_epoch = head.log_epoch;
        self.buffer.clear();
        self.seen = 0;
        self.delivered = continues_after;
        // The server's cursor is in the old epoch: acknowledge the position again in the new.
        self.acked = 0;
        self.gap_deadline = None;
    }

    /// Reports and skips what `head` (of our epoch) says was trimmed before we got it.
    fn skip_trimmed(&mut self, head: &ConvHead, out: &mut Outputs) {
        let first_kept = head
            .first_available_seq
            .saturating_sub(1)
            .min(head.head_seq);
        if first_kept > self.delivered {
            out.events.push_back(ClientEvent::Unavailable {
                conv: head.conv.clone(),
                from_seq: self.delivered + 1,
                count: first_kept - self.delivered,
            });
            self.jump_to(first_kept);
        }
    }

    fn fetch(&mut self, conv: &ConvId, now: Instant, cfg: &InboundConfig, out: &mut Outputs) {
        if self
            .fetch_sent
            .is_some_and(|sent| now < sent + cfg.request_timeout)
        {
            return;
        }
        self.fetch_sent = Some(now);
        out.transmit(Kind::FetchRequest(proto::FetchRequest {
            conv: conv.to_string(),
            log_epoch: self.log_epoch.0,
            after_seq: self.delivered,
            limit: cfg.fetch_limit,
        }));
    }

    /// Whether something above `delivered` is known to exist: buffered, or seen and dropped.
    fn has_gap(&self) -> bool {
        !self.buffer.is_empty() || self.seen > self.delivered
    }

    /// A gap is anything buffered after a drain, or seen and not yet delivered: start its
    /// timer if none runs.
    fn settle_gap(&mut self, now: Instant, cfg: &InboundConfig) {
        if !self.has_gap() {
            self.gap_deadline = None;
        } else if self.gap_deadline.is_none() {
            self.gap_deadline = Some(now + cfg.gap_sync_delay);
        }
    }
}

/// Counts of the recoveries inbound delivery made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct InboundStats {
    /// Gaps whose timer fired and sent a fetch for the missing seqs.
    pub gap_fetches: u64,
}

#[derive(Debug)]
pub(crate) struct Inbound {
    cfg: InboundConfig,
    /// What inbound delivery did, for [`super::ClientStats`].
    pub(crate) stats: InboundStats,
    convs: BTreeMap<ConvId, Conv>,
    /// Send times of unanswered SyncRequests, oldest first (answers come back in order).
    syncs: VecDeque<Instant>,
    /// The pages so far of a SyncAnswer too big for one frame (`more` set on all but the
    /// last). The answer is only complete with its last page: it lists *every* conversation,
    /// and conversations it does not list are judged by that.
    pub(super) sync_pages: Vec<ConvHead>,
    /// When to ask again after an incomplete sync answer.
    resync_at: Option<Instant>,
}

impl Inbound {
    pub(crate) fn new(cfg: InboundConfig) -> Self {
        Self {
            stats: InboundStats::default(),
            cfg,
            convs: BTreeMap::new(),
            syncs: VecDeque::new(),
            sync_pages: Vec::new(),
            resync_at: None,
        }
    }

    /// A position persisted by an earlier run.
    pub(crate) fn restore(
        &mut self,
        now: Instant,
        conv: ConvId,
        log_epoch: LogEpoch,
        delivered: u64,
    ) {
        let mut c = Conv::unanchored(log_epoch, now);
        c.anchored = true;
        c.delivered = delivered;
        // Unknown whether the server's cursor got there; acknowledging again is harmless.
        c.acked = 0;
        self.convs.insert(conv, c);
    }

    /// `(conv, log_epoch, delivered)` of every conversation with a known position.
    pub(crate) fn positions(&self) -> impl Iterator<Item = (&ConvId, LogEpoch, u64)> {
        self.convs
            .iter()
            .filter(|(_, c)| c.anchored)
            .map(|(conv, c)| (conv, c.log_epoch, c.delivered))
    }

    pub(crate) fn request_sync(&mut self, now: Instant, out: &mut Outputs) {
        if self
            .syncs
            .back()
            .is_some_and(|sent| now < *sent + self.cfg.request_timeout)
        {
            return;
        }
        self.syncs.push_back(now);
        out.transmit(Kind::SyncRequest(proto::SyncRequest {}));
    }

    pub(crate) fn on_deliver(&mut self, now: Instant, msg: StoredMessage, out: &mut Outputs) {
        let conv_id = msg.conv.clone();
        let c = self
            .convs
            .entry(conv_id.clone())
            .or_insert_with(|| Conv::unanchored(msg.log_epoch, now));
        if !c.anchored {
            // Which epoch is current is the sync answer's to say; keep the first one seen.
            if c.log_epoch == msg.log_epoch {
                c.insert(msg, &self.cfg, out);
            }
            self.request_sync(now, out);
        } else if c.log_epoch != msg.log_epoch {
            c.fetch(&conv_id, now, &self.cfg, out);
        } else {
            c.insert(msg, &self.cfg, out);
            c.drain(out);
            c.settle_gap(now, &self.cfg);
        }
    }

    pub(crate) fn on_fetch_answer(
        &mut self,
        now: Instant,
        head: ConvHead,
        messages: Vec<StoredMessage>,
        out: &mut Outputs,
    ) {
        // An answer for a conversation we never asked about has nothing to attach to.
        let Some(c) = self.convs.get_mut(&head.conv) else {
            return;
        };
        c.fetch_sent = None;
        let before = (c.log_epoch, c.delivered);
        if !c.anchored {
            c.anchor(&head.conv, &head, out);
        } else {
            if c.log_epoch != head.log_epoch {
                c.switch(&head.conv, &head, &self.cfg, out);
            }
            c.skip_trimmed(&head, out);
        }
        for msg in messages {
            if msg.conv == head.conv && msg.log_epoch == c.log_epoch {
                c.insert(msg, &self.cfg, out);
            }
        }
        c.drain(out);
        // Continue while answers make progress (the limit cut this one short, or the head
        // moved on); a server whose answers do not advance is left to the timers.
        // The head may be older than a push that arrived meanwhile (the store read came
        // before that append) and was dropped from a full buffer: `seen` covers it.
        let progressed = (c.log_epoch, c.delivered) != before;
        if progressed && head.head_seq.max(c.seen) > c.delivered {
            c.fetch(&head.conv, now, &self.cfg, out);
        }
        c.settle_gap(now, &self.cfg);
    }

    /// One SyncAnswer frame: kept while more of the same answer follows, else the whole
    /// answer is taken.
    pub(crate) fn on_sync_page(
        &mut self,
        now: Instant,
        heads: Vec<ConvHead>,
        more: bool,
        incomplete: bool,
        out: &mut Outputs,
    ) {
        self.sync_pages.extend(heads);
        if !more {
            let heads = std::mem::take(&mut self.sync_pages);
            self.on_sync_answer(now, heads, incomplete, out);
        }
    }

    /// A whole sync answer. An `incomplete` one (the store could not read some
    /// conversations) is taken for what it lists, but an unlisted conversation is not
    /// judged by its absence, and the sync is asked again after `incomplete_sync_retry`.
    fn on_sync_answer(
        &mut self,
        now: Instant,
        heads: Vec<ConvHead>,
        incomplete: bool,
        out: &mut Outputs,
    ) {
        let asked_at = self.syncs.pop_front();
        self.resync_at = incomplete.then(|| now + self.cfg.incomplete_sync_retry);
        let mut listed = BTreeSet::new();
        for head in heads {
            let c = self
                .convs
                .entry(head.conv.clone())
                .or_insert_with(|| Conv::unanchored(head.log_epoch, now));
            if !c.anchored {
                c.anchor(&head.conv, &head, out);
            } else if c.log_epoch != head.log_epoch {
                c.switch(&head.conv, &head, &self.cfg, out);
                c.skip_trimmed(&head, out);
            }
            if head.head_seq > c.delivered {
                c.fetch(&head.conv, now, &self.cfg, out);
            }
            c.settle_gap(now, &self.cfg);
            listed.insert(head.conv);
        }
        // Pushed conversations the answer does not list. If the request left after the push
        // arrived, the store read followed the append, so the server simply does not list
        // this conversation for us: deliver it from its start. Otherwise the read may have
        // preceded the append: ask again.
        let mut ask_again = false;
        for (conv, c) in self.convs.iter_mut() {
            if c.anchored || listed.contains(conv) || incomplete {
                continue;
            }
            if asked_at.is_some_and(|at| at >= c.seen_at) {
                c.anchored = true;
                c.drain(out);
                if c.has_gap() {
                    c.fetch(conv, now, &self.cfg, out);
                }
                c.settle_gap(now, &self.cfg);
            } else {
                ask_again = true;
            }
        }
        if ask_again {
            self.request_sync(now, out);
        }
    }

    pub(crate) fn on_timeout(&mut self, now: Instant, out: &mut Outputs) {
        if self.resync_at.is_some_and(|at| at <= now) {
            self.resync_at = None;
            self.request_sync(now, out);
        }
        for (conv, c) in self.convs.iter_mut() {
            if c.gap_deadline.is_none_or(|at| at > now) {
                continue;
            }
            c.gap_deadline = None;
            if c.anchored && self.cfg.canaries.disabled(Canary::GapSync) {
                // What a client without gap sync does: go on from what arrived.
                if let Some(&first) = c.buffer.keys().next() {
                    c.delivered = first - 1;
                    c.drain(out);
                }
                continue;
            }
            if c.anchored && c.has_gap() {
                self.stats.gap_fetches += 1;
                c.fetch(conv, now, &self.cfg, out);
                // Re-armed so a lost answer is retried once the fetch goes stale.
                c.gap_deadline = Some(now + self.cfg.gap_sync_delay);
            }
        }
    }

    pub(crate) fn next_timeout(&self) -> Option<Instant> {
        self.convs
            .values()
            .filter_map(|c| c.gap_deadline)
            .chain(self.resync_at)
            .min()
    }

    /// Nothing in flight survives the connection; buffered messages and positions do.
    pub(crate) fn on_link_lost(&mut self) {
        self.syncs.clear();
        self.sync_pages.clear();
        // The next connection syncs anyway.
        self.resync_at = None;
        for c in self.convs.values_mut() {
            c.gap_deadline = None;
            c.fetch_sent = None;
        }
    }

    pub(crate) fn has_unacked(&self) -> bool {
        self.convs
            .values()
            .any(|c| c.anchored && c.delivered > c.acked)
    }

    /// Cumulative cursors for every conversation that advanced since the last call.
    pub(crate) fn take_cursors(&mut self) -> Vec<proto::Cursor> {
        let mut cursors = Vec::new();
        for (conv, c) in self.convs.iter_mut() {
            if c.anchored && c.delivered > c.acked {
                c.acked = c.delivered;
                cursors.push(proto::Cursor {
                    conv: conv.to_string(),
                    log_epoch: c.log_epoch.0,
                    seq: c.delivered,
                });
            }
        }
        cursors
    }
}

pub(crate) fn message_from_proto(m: proto::Message) -> Result<StoredMessage, FrameError> {
    let conv = m
        .conv
        .parse()
        .map_err(|_| FrameError::BadConversation(m.conv.clone()))?;
    if m.seq == 0 {
        return Err(FrameError::ZeroSeq);
    }
    Ok(StoredMessage {
        conv,
        log_epoch: LogEpoch(m.log_epoch),
        seq: m.seq,
        sender: UserId(m.sender),
        msg_id: ClientMsgId::from_halves(m.msg_id_hi, m.msg_id_lo),
        body: m.body,
        appended_at: UnixMillis(m.appended_at_ms),
    })
}

pub(crate) fn head_from_proto(h: proto::ConvHead) -> Result<ConvHead, FrameError> {
    let conv = h
        .conv
        .parse()
        .map_err(|_| FrameError::BadConversation(h.conv.clone()))?;
    Ok(ConvHead {
        conv,
        log_epoch: LogEpoch(h.log_epoch),
        head_seq: h.head_seq,
        first_available_seq: h.first_available_seq,
        cursor_seq: h.cursor_seq,
        carried_from: LogEpoch(h.carried_from_epoch),
        carried_up_to: h.carried_up_to,
    })
}
