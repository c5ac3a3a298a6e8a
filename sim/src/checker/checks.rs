//! The invariants, one check each, over a recorded [`History`].

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use cim_core::ids::{ClientMsgId, ConvId, LogEpoch, ServerId, UserId};

use super::{
    AckedSend, ClientHistory, ClientId, Fault, History, Host, Report, Seen, SessionSpan, SimTime,
    Violation, Witness,
};

/// Where each (sender, msg id, conv) is known to be stored, by log epoch: from acks and from
/// what any client saw. A message may be stored under several log epochs (resent after a
/// lossy restart).
pub(super) type Stored = BTreeMap<(UserId, ClientMsgId, ConvId), BTreeMap<LogEpoch, u64>>;

pub(super) fn stored_messages(history: &History) -> Stored {
    let mut stored = Stored::new();
    for a in &history.acks {
        stored
            .entry((a.sender, a.msg_id, a.conv.clone()))
            .or_default()
            .insert(a.log_epoch, a.seq);
    }
    for c in &history.clients {
        for (_, seen) in &c.events {
            if let Seen::Message(m) = seen {
                stored
                    .entry((m.sender, m.msg_id, m.conv.clone()))
                    .or_default()
                    .insert(m.log_epoch, m.seq);
            }
        }
    }
    stored
}

/// Invariant 8.
pub(super) fn check_rejections(history: &History, stored: &Stored, report: &mut Report) {
    for rejection in &history.rejections {
        // Every conversation of this (sender, msg id): `All` is the smallest `ConvId`.
        let places = stored
            .range((rejection.sender, rejection.msg_id, ConvId::All)..)
            .take_while(|((sender, msg_id, _), _)| {
                (*sender, *msg_id) == (rejection.sender, rejection.msg_id)
            });
        for ((_, _, conv), epochs) in places {
            for (&log_epoch, &seq) in epochs {
                report.violations.push(Violation::RejectedButStored {
                    rejection: rejection.clone(),
                    conv: conv.clone(),
                    log_epoch,
                    seq,
                });
            }
        }
    }
}

/// Invariant 7.
pub(super) fn check_sender_order(history: &History, stored: &Stored, report: &mut Report) {
    // Per (client, conv, log epoch): the highest-seq submission so far, in submission order.
    let mut latest: BTreeMap<(ClientId, ConvId, LogEpoch), (ClientMsgId, SimTime, u64)> =
        BTreeMap::new();
    for sub in &history.submissions {
        let Some(places) = stored.get(&(sub.sender, sub.msg_id, sub.conv.clone())) else {
            continue;
        };
        report.stats.ordered_checked += 1;
        for (&log_epoch, &seq) in places {
            let key = (sub.client, sub.conv.clone(), log_epoch);
            let this = (sub.msg_id, sub.at, seq);
            match latest.get(&key) {
                Some(&earlier) if earlier.2 > seq => {
                    report.violations.push(Violation::SenderOrder {
                        client: sub.client,
                        sender: sub.sender,
                        conv: sub.conv.clone(),
                        log_epoch,
                        earlier,
                        later: this,
                    });
                }
                _ => {
                    latest.insert(key, this);
                }
            }
        }
    }
}

/// Invariant 1.
pub(super) fn check_sessions(history: &History, report: &mut Report) {
    let mut by_user: BTreeMap<UserId, Vec<&SessionSpan>> = BTreeMap::new();
    for s in &history.sessions {
        by_user.entry(s.user).or_default().push(s);
    }
    for (user, mut spans) in by_user {
        spans.sort_by_key(|s| s.opened_at);
        // A claim epoch names one session: two sessions under one epoch means the store
        // issued it twice (its counter went back with a lost tail).
        let mut by_epoch: BTreeMap<_, &SessionSpan> = BTreeMap::new();
        for s in &spans {
            if let Some(first) = by_epoch.insert(s.epoch, s) {
                report.violations.push(Violation::ReusedClaimEpoch {
                    user,
                    first: first.clone(),
                    second: (*s).clone(),
                });
            }
        }
        // The span reaching furthest so far: any later-opened span starting before its end
        // overlaps it.
        let mut reach: Option<&SessionSpan> = None;
        for s in spans {
            report.stats.sessions_checked += 1;
            if let Some(prev) = reach
                && prev.closed_at.is_none_or(|end| s.opened_at < end)
            {
                report.violations.push(Violation::OverlappingSessions {
                    user,
                    first: prev.clone(),
                    second: s.clone(),
                });
            }
            let further = match (reach, s.closed_at) {
                (None, _) | (_, None) => true,
                (Some(prev), Some(end)) => prev.closed_at.is_some_and(|p| end > p),
            };
            if further {
                reach = Some(s);
            }
        }
    }
}

/// What one client covered of one (conv, log epoch).
#[derive(Debug, Default)]
pub(super) struct Covered {
    /// Seq -> when it was handed over (the first time).
    seqs: BTreeMap<u64, SimTime>,
    /// Announced `Unavailable` ranges, inclusive, with when they were announced.
    unavailable: Vec<(u64, u64, SimTime)>,
    /// When this client first handed over or announced anything of it.
    first_at: Option<SimTime>,
}

impl Covered {
    /// The highest seq handed over or announced unavailable by `t`.
    fn highest_by(&self, t: SimTime) -> u64 {
        let seen = self
            .seqs
            .iter()
            .filter(|(_, at)| **at <= t)
            .map(|(s, _)| *s);
        let announced = self
            .unavailable
            .iter()
            .filter(|(_, _, at)| *at <= t)
            .map(|(_, to, _)| *to);
        seen.chain(announced).max().unwrap_or(0)
    }
}

/// Per client: (conv, log epoch) -> what it covered.
pub(super) type Streams = BTreeMap<ClientId, BTreeMap<(ConvId, LogEpoch), Covered>>;

/// Where one client stands in one conversation while its events are replayed.
#[derive(Debug, Default)]
pub(super) struct Position {
    epoch: Option<LogEpoch>,
    /// The next seq the client may hand over; `None` before its first.
    next: Option<u64>,
    /// `Unavailable` ranges seen before the epoch was known, with their times.
    pending: Vec<(u64, u64, SimTime)>,
    /// (sender, msg id) -> seq, in the current epoch.
    ids: BTreeMap<(UserId, ClientMsgId), u64>,
}

impl Position {
    /// A reset or a move out of `old`: the client's epoch is learned if it had none yet;
    /// `Err` carries the epoch it was in when that is another one.
    fn leave_epoch(
        &mut self,
        old: LogEpoch,
        conv: &ConvId,
        streams: &mut BTreeMap<(ConvId, LogEpoch), Covered>,
    ) -> Result<(), LogEpoch> {
        match self.epoch {
            None => {
                self.learn_epoch(old, conv, streams);
                Ok(())
            }
            Some(current) if current != old => Err(current),
            Some(_) => Ok(()),
        }
    }

    /// Learns the epoch and files the ranges seen before it.
    fn learn_epoch(
        &mut self,
        epoch: LogEpoch,
        conv: &ConvId,
        streams: &mut BTreeMap<(ConvId, LogEpoch), Covered>,
    ) {
        self.epoch = Some(epoch);
        let cov = streams.entry((conv.clone(), epoch)).or_default();
        for (from, to, at) in self.pending.drain(..) {
            cov.unavailable.push((from, to, at));
            cov.first_at = Some(cov.first_at.map_or(at, |f| f.min(at)));
        }
    }
}

/// Invariants 2 and 3, and what each client covered (for the loss check).
pub(super) fn check_streams(history: &History, report: &mut Report) -> Streams {
    let first_lossy = history
        .faults
        .iter()
        .find(|(_, f)| matches!(f, Fault::StoreLossyRestart | Fault::StoreRestart))
        .map(|(at, _)| *at);
    let mut streams = Streams::new();
    for c in &history.clients {
        let covered = streams.entry(c.client).or_default();
        let mut positions: BTreeMap<ConvId, Position> = BTreeMap::new();
        let epoch_switch = |conv: &ConvId, current, got, seq, at| Violation::EpochSwitch {
            client: c.client,
            user: c.user,
            conv: conv.clone(),
            current,
            got,
            seq,
            at,
        };
        for (at, seen) in &c.events {
            let at = *at;
            match seen {
                Seen::Message(m) => {
                    report.stats.messages_checked += 1;
                    let pos = positions.entry(m.conv.clone()).or_default();
                    match pos.epoch {
                        None => pos.learn_epoch(m.log_epoch, &m.conv, covered),
                        Some(current) if current != m.log_epoch => {
                            report.violations.push(epoch_switch(
                                &m.conv,
                                current,
                                m.log_epoch,
                                Some(m.seq),
                                at,
                            ));
                            continue;
                        }
                        Some(_) => {}
                    }
                    let cov = covered.entry((m.conv.clone(), m.log_epoch)).or_default();
                    cov.first_at.get_or_insert(at);
                    if let Some(first_at) = cov.seqs.get(&m.seq) {
                        report.violations.push(Violation::DuplicateSeq {
                            client: c.client,
                            user: c.user,
                            conv: m.conv.clone(),
                            log_epoch: m.log_epoch,
                            seq: m.seq,
                            first_at: *first_at,
                            again_at: at,
                        });
                        continue;
                    }
                    cov.seqs.insert(m.seq, at);
                    if let Some(first_seq) = pos.ids.insert((m.sender, m.msg_id), m.seq) {
                        report.violations.push(Violation::DuplicateMsgId {
                            client: c.client,
                            user: c.user,
                            conv: m.conv.clone(),
                            log_epoch: m.log_epoch,
                            sender: m.sender,
                            msg_id: m.msg_id,
                            first_seq,
                            again_seq: m.seq,
                            at,
                        });
                    }
                    if let Some(v) = advance(c, &m.conv, pos, m.seq, m.seq, at) {
                        report.violations.push(v);
                    }
                }
                Seen::Unavailable {
                    conv,
                    from_seq,
                    count,
                } => {
                    if *count == 0 {
                        continue;
                    }
                    let to = from_seq.saturating_add(count - 1);
                    let pos = positions.entry(conv.clone()).or_default();
                    match pos.epoch {
                        Some(epoch) => {
                            let cov = covered.entry((conv.clone(), epoch)).or_default();
                            cov.unavailable.push((*from_seq, to, at));
                            cov.first_at.get_or_insert(at);
                        }
                        None => pos.pending.push((*from_seq, to, at)),
                    }
                    if let Some(v) = advance(c, conv, pos, *from_seq, to, at) {
                        report.violations.push(v);
                    }
                }
                Seen::LogReset {
                    conv,
                    old_epoch,
                    new_epoch,
                } => {
                    if first_lossy.is_none_or(|lossy| lossy > at) {
                        report.violations.push(Violation::UnexplainedLogReset {
                            client: c.client,
                            user: c.user,
                            conv: conv.clone(),
                            old_epoch: *old_epoch,
                            new_epoch: *new_epoch,
                            at,
                        });
                    }
                    let pos = positions.entry(conv.clone()).or_default();
                    if let Err(current) = pos.leave_epoch(*old_epoch, conv, covered) {
                        report
                            .violations
                            .push(epoch_switch(conv, current, *old_epoch, None, at));
                    }
                    // A move straight from the client's epoch says what it carried over: the
                    // client continues across it (`LogMoved`), it does not start again.
                    if let Some(m) = history
                        .moves
                        .iter()
                        .find(|m| m.conv == *conv && m.from == *old_epoch && m.to == *new_epoch)
                    {
                        report.violations.push(Violation::ResetAcrossMove {
                            client: c.client,
                            user: c.user,
                            conv: conv.clone(),
                            old_epoch: *old_epoch,
                            new_epoch: *new_epoch,
                            handed_over: pos.next.map(|n| n - 1),
                            carried_up_to: m.carried_up_to,
                            at,
                        });
                    }
                    // The new log is delivered from its beginning.
                    *pos = Position {
                        epoch: Some(*new_epoch),
                        next: Some(1),
                        ..Position::default()
                    };
                    covered
                        .entry((conv.clone(), *new_epoch))
                        .or_default()
                        .first_at
                        .get_or_insert(at);
                }
                Seen::LogMoved {
                    conv,
                    old_epoch,
                    new_epoch,
                    continues_after,
                    lost,
                } => {
                    let pos = positions.entry(conv.clone()).or_default();
                    if let Err(current) = pos.leave_epoch(*old_epoch, conv, covered) {
                        report
                            .violations
                            .push(epoch_switch(conv, current, *old_epoch, None, at));
                    }
                    let handed_over = pos.next.map(|n| n - 1);
                    let carried_up_to = history
                        .moves
                        .iter()
                        .find(|m| m.conv == *conv && m.from == *old_epoch && m.to == *new_epoch)
                        .map(|m| m.carried_up_to);
                    let right = match (carried_up_to, handed_over) {
                        (None, _) => false,
                        (Some(n), Some(h)) => *continues_after == h.min(n) && *lost == h - h.min(n),
                        // Anchored at the server's cursor without handing anything over: the
                        // checker does not know where.
                        (Some(n), None) => *continues_after <= n,
                    };
                    if !right {
                        report.violations.push(Violation::WrongLogMove {
                            client: c.client,
                            user: c.user,
                            conv: conv.clone(),
                            old_epoch: *old_epoch,
                            new_epoch: *new_epoch,
                            handed_over,
                            carried_up_to,
                            continues_after: *continues_after,
                            lost: *lost,
                            at,
                        });
                    }
                    // What was handed over up to the continuation counts in the new epoch: the
                    // same messages under the same seqs.
                    let upto = *continues_after;
                    let carried = covered.get(&(conv.clone(), *old_epoch)).map(|old| {
                        let seqs: Vec<(u64, SimTime)> =
                            old.seqs.range(..=upto).map(|(s, t)| (*s, *t)).collect();
                        let unavailable: Vec<(u64, u64, SimTime)> = old
                            .unavailable
                            .iter()
                            .filter(|(from, _, _)| *from <= upto)
                            .map(|(from, to, t)| (*from, (*to).min(upto), *t))
                            .collect();
                        (seqs, unavailable, old.first_at)
                    });
                    let cov = covered.entry((conv.clone(), *new_epoch)).or_default();
                    if let Some((seqs, unavailable, first_at)) = carried {
                        cov.seqs.extend(seqs);
                        cov.unavailable.extend(unavailable);
                        if let Some(t) = first_at {
                            cov.first_at = Some(cov.first_at.map_or(t, |f| f.min(t)));
                        }
                    }
                    cov.first_at.get_or_insert(at);
                    pos.epoch = Some(*new_epoch);
                    pos.next = Some(upto + 1);
                    pos.ids.retain(|_, seq| *seq <= upto);
                }
                Seen::Online { .. } | Seen::Reconnecting | Seen::Stopped(_) => {}
            }
        }
    }
    streams
}

/// Moves `pos` past `from..=to` (one message, or an `Unavailable` range), reporting a
/// reordering or a silent gap.
fn advance(
    c: &ClientHistory,
    conv: &ConvId,
    pos: &mut Position,
    from: u64,
    to: u64,
    at: SimTime,
) -> Option<Violation> {
    let violation = match pos.next {
        Some(next) if from < next => Some(Violation::OutOfOrder {
            client: c.client,
            user: c.user,
            conv: conv.clone(),
            log_epoch: pos.epoch,
            expected: next,
            got: from,
            at,
        }),
        Some(next) if from > next => Some(Violation::SilentGap {
            client: c.client,
            user: c.user,
            conv: conv.clone(),
            log_epoch: pos.epoch,
            missing_from: next,
            missing_to: from - 1,
            at,
        }),
        _ => None,
    };
    // Resynchronise past what was handed over (never back), so one fault is reported once.
    let after = to.saturating_add(1);
    pos.next = Some(pos.next.map_or(after, |next| next.max(after)));
    violation
}

/// Invariant 9, the store's side: every seq a move carried names the same (sender, msg id)
/// under both epochs, as far as acks and clients saw them.
pub(super) fn check_moves(history: &History, report: &mut Report) {
    if history.moves.is_empty() {
        return;
    }
    let mut known: BTreeMap<(ConvId, LogEpoch, u64), (UserId, ClientMsgId)> = BTreeMap::new();
    for a in &history.acks {
        known
            .entry((a.conv.clone(), a.log_epoch, a.seq))
            .or_insert((a.sender, a.msg_id));
    }
    for c in &history.clients {
        for (_, seen) in &c.events {
            if let Seen::Message(m) = seen {
                known
                    .entry((m.conv.clone(), m.log_epoch, m.seq))
                    .or_insert((m.sender, m.msg_id));
            }
        }
    }
    for m in &history.moves {
        let range = (m.conv.clone(), m.from, 1)..=(m.conv.clone(), m.from, m.carried_up_to);
        for ((_, _, seq), old) in known.range(range) {
            if let Some(new) = known.get(&(m.conv.clone(), m.to, *seq))
                && new != old
            {
                report.violations.push(Violation::BadLogMove {
                    conv: m.conv.clone(),
                    from: m.from,
                    to: m.to,
                    seq: *seq,
                    old: *old,
                    new: *new,
                });
            }
        }
    }
}

/// Invariant 6.
pub(super) fn check_consistency(history: &History, report: &mut Report) {
    let mut by_slot: BTreeMap<(ConvId, LogEpoch, u64), Witness> = BTreeMap::new();
    let mut by_id: BTreeMap<(UserId, ClientMsgId, ConvId, LogEpoch), u64> = BTreeMap::new();
    let mut acks: Vec<&AckedSend> = history.acks.iter().collect();
    acks.sort_by_key(|a| a.acked_at);
    let mut witnesses = Vec::new();
    for a in acks {
        report.stats.acks_checked += 1;
        let key = (a.sender, a.msg_id, a.conv.clone(), a.log_epoch);
        match by_id.get(&key) {
            Some(first_seq) if *first_seq != a.seq => {
                report.violations.push(Violation::AckedTwice {
                    sender: a.sender,
                    conv: a.conv.clone(),
                    log_epoch: a.log_epoch,
                    msg_id: a.msg_id,
                    first_seq: *first_seq,
                    again_seq: a.seq,
                    at: a.acked_at,
                });
            }
            Some(_) => {}
            None => {
                by_id.insert(key, a.seq);
            }
        }
        witnesses.push((
            (a.conv.clone(), a.log_epoch, a.seq),
            Witness {
                client: None,
                at: a.acked_at,
                sender: a.sender,
                msg_id: a.msg_id,
                body: None,
            },
        ));
    }
    for c in &history.clients {
        for (at, seen) in &c.events {
            if let Seen::Message(m) = seen {
                witnesses.push((
                    (m.conv.clone(), m.log_epoch, m.seq),
                    Witness {
                        client: Some(c.client),
                        at: *at,
                        sender: m.sender,
                        msg_id: m.msg_id,
                        body: Some(m.body.clone()),
                    },
                ));
            }
        }
    }
    // One report per (slot, distinct second version), so a bad message seen by many clients
    // does not flood the report.
    let mut reported: BTreeSet<(ConvId, LogEpoch, u64, UserId, ClientMsgId, Option<Bytes>)> =
        BTreeSet::new();
    for (slot, w) in witnesses {
        let Some(first) = by_slot.get_mut(&slot) else {
            by_slot.insert(slot, w);
            continue;
        };
        let same_body = match (&first.body, &w.body) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        };
        if first.sender == w.sender && first.msg_id == w.msg_id && same_body {
            if first.body.is_none() {
                // Keep a witness with a body, to compare later ones against it.
                first.body.clone_from(&w.body);
            }
            continue;
        }
        let (conv, log_epoch, seq) = slot;
        if reported.insert((
            conv.clone(),
            log_epoch,
            seq,
            w.sender,
            w.msg_id,
            w.body.clone(),
        )) {
            report.violations.push(Violation::Conflict {
                conv,
                log_epoch,
                seq,
                first: first.clone(),
                second: w,
            });
        }
    }
}

/// The connectivity a client's events imply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Link {
    Offline,
    /// Online on this server since this time.
    Online(ServerId, SimTime),
    Stopped,
}

fn links(c: &ClientHistory) -> Vec<(SimTime, Link)> {
    c.events
        .iter()
        .filter_map(|(at, seen)| match seen {
            Seen::Online { server, .. } => Some((*at, Link::Online(server.clone(), *at))),
            Seen::Reconnecting => Some((*at, Link::Offline)),
            Seen::Stopped(_) => Some((*at, Link::Stopped)),
            _ => None,
        })
        .collect()
}

/// The link state at `t` (events at `t` included).
fn link_at(links: &[(SimTime, Link)], t: SimTime) -> Link {
    links
        .iter()
        .take_while(|(at, _)| *at <= t)
        .last()
        .map_or(Link::Offline, |(_, l)| l.clone())
}

/// Invariant 4.
pub(super) fn check_loss(history: &History, streams: &Streams, report: &mut Report) {
    // (conv, epoch) -> seq -> the first ack of it.
    let mut acked: BTreeMap<(ConvId, LogEpoch), BTreeMap<u64, &AckedSend>> = BTreeMap::new();
    for a in &history.acks {
        acked
            .entry((a.conv.clone(), a.log_epoch))
            .or_default()
            .entry(a.seq)
            .and_modify(|first| {
                if a.acked_at < first.acked_at {
                    *first = a;
                }
            })
            .or_insert(a);
    }
    let empty = BTreeMap::new();
    for c in &history.clients {
        if !matches!(link_at(&links(c), history.bounds.end), Link::Online(..)) {
            continue;
        }
        let mine = streams.get(&c.client).unwrap_or(&empty);
        for (conv, log) in &history.final_logs {
            let Some(join) = history.membership.join_seq(c.user, conv) else {
                continue;
            };
            let key = (conv.clone(), log.log_epoch);
            let cov = mine.get(&key);
            // The user's read cursor may come from another client of the same user: whatever
            // that one covered before this one started the conversation.
            let started = cov
                .and_then(|cov| cov.first_at)
                .unwrap_or(history.bounds.end);
            // Also what another client covered in an epoch the log moved from, up to what the
            // move carried (the store counts that cursor in the new epoch).
            let carried_into: Vec<(LogEpoch, u64)> = history
                .moves
                .iter()
                .filter(|m| m.conv == *conv && m.to == log.log_epoch)
                .map(|m| (m.from, m.carried_up_to))
                .collect();
            let cursor = history
                .clients
                .iter()
                .filter(|o| o.user == c.user && o.client != c.client)
                .filter_map(|o| streams.get(&o.client))
                .flat_map(|other| {
                    let here = other.get(&key).map(|o| o.highest_by(started));
                    let before = carried_into.iter().filter_map(|(from, n)| {
                        let o = other.get(&(conv.clone(), *from))?;
                        Some(o.highest_by(started).min(*n))
                    });
                    here.into_iter().chain(before).collect::<Vec<_>>()
                })
                .max()
                .unwrap_or(0);
            let floor = join
                .max(log.first_available_seq.saturating_sub(1))
                .max(cursor);
            let Some(acks) = acked.get(&key) else {
                continue;
            };
            for (seq, a) in acks.range(floor.saturating_add(1)..) {
                report.stats.deliveries_required += 1;
                if cov.is_some_and(|cov| cov.seqs.contains_key(seq)) {
                    continue;
                }
                let announced_unavailable = cov.is_some_and(|cov| {
                    cov.unavailable
                        .iter()
                        .any(|(from, to, _)| (*from..=*to).contains(seq))
                });
                report.violations.push(Violation::Lost {
                    client: c.client,
                    user: c.user,
                    conv: conv.clone(),
                    log_epoch: log.log_epoch,
                    seq: *seq,
                    sender: a.sender,
                    msg_id: a.msg_id,
                    acked_at: a.acked_at,
                    announced_unavailable,
                });
            }
        }
    }
}

/// The first instant at or after `t` when no host is isolated (the healed phase heals all).
fn network_healed(history: &History, t: SimTime) -> SimTime {
    let healed_at = history.bounds.healed_at;
    if t >= healed_at {
        return t;
    }
    let mut isolated: BTreeSet<&Host> = BTreeSet::new();
    for (at, fault) in &history.faults {
        if *at >= healed_at {
            break;
        }
        if *at > t && isolated.is_empty() {
            return t;
        }
        match fault {
            Fault::Isolated(h) => {
                isolated.insert(h);
            }
            Fault::Healed(h) => {
                isolated.remove(h);
            }
            Fault::HealAll => isolated.clear(),
            Fault::ServerDied(_) | Fault::StoreLossyRestart | Fault::StoreRestart => {}
        }
        if *at > t && isolated.is_empty() {
            return *at;
        }
    }
    if isolated.is_empty() { t } else { healed_at }
}

/// Invariant 5.
pub(super) fn check_rehome(history: &History, report: &mut Report) {
    let all_links: Vec<(&ClientHistory, Vec<(SimTime, Link)>)> =
        history.clients.iter().map(|c| (c, links(c))).collect();
    for (fault_at, fault) in &history.faults {
        let (server, bound, died) = match fault {
            Fault::ServerDied(s) => (s, history.bounds.rehome_after_death, true),
            Fault::Isolated(Host::Server(s)) => (s, history.bounds.rehome_after_isolation, false),
            _ => continue,
        };
        for (c, links) in &all_links {
            if !matches!(link_at(links, *fault_at), Link::Online(ref s, _) if s == server) {
                continue;
            }
            let mut from = network_healed(history, *fault_at);
            // Online again: any session opened after a death; after an isolation, also the
            // one that survived it.
            let rehomed = |l: &Link| match l {
                Link::Online(_, since) => !died || *since > *fault_at,
                _ => false,
            };
            // When this client (or a sibling) is online again, measured from `from`;
            // `Err(())`: it stopped instead (not judged).
            let online_after = |from: SimTime| -> Result<Option<SimTime>, ()> {
                let state = link_at(links, from);
                let own = if state == Link::Stopped {
                    return Err(());
                } else if rehomed(&state) {
                    Some(from)
                } else {
                    match links
                        .iter()
                        .find(|(at, l)| *at > from && (rehomed(l) || *l == Link::Stopped))
                    {
                        Some((_, Link::Stopped)) => return Err(()),
                        Some((at, _)) => Some(*at),
                        None => None,
                    }
                };
                // Another client of the same user online after the fault re-homes the user
                // too: a user's clients compete for one claim, and the one that wins it is
                // the user's session, while the others are rightly refused (5000).
                let by_sibling = all_links
                    .iter()
                    .filter(|(o, _)| o.user == c.user && o.client != c.client)
                    .flat_map(|(_, links)| links.iter())
                    .filter_map(|(at, l)| match l {
                        Link::Online(_, since) if *since > *fault_at => Some((*at).max(from)),
                        _ => None,
                    })
                    .min();
                Ok(match (own, by_sibling) {
                    (Some(own), Some(sibling)) => Some(own.min(sibling)),
                    (own, sibling) => own.or(sibling),
                })
            };
            let Ok(mut online_at) = online_after(from) else {
                continue;
            };
            // A fault that starts before this client is back and before its deadline (a
            // crash of the route it logs in through, another partition) moves the start of
            // the measurement to that fault's heal: the bound is for one fault at a time.
            let mut stopped = false;
            while let Some(next) = history.faults.iter().find_map(|(at, f)| {
                let before = online_at.is_none_or(|o| *at < o) && *at <= from.saturating_add(bound);
                (matches!(f, Fault::Isolated(_)) && *at > from && before).then_some(*at)
            }) {
                let healed = network_healed(history, next);
                if healed <= from {
                    break;
                }
                from = healed;
                match online_after(from) {
                    Ok(o) => online_at = o,
                    Err(()) => {
                        stopped = true;
                        break;
                    }
                }
            }
            if stopped {
                continue;
            }
            let deadline = from.saturating_add(bound);
            if online_at.is_none() && deadline > history.bounds.end {
                report.stats.rehomes_unjudged += 1;
                continue;
            }
            report.stats.rehomes_checked += 1;
            if let Some(at) = online_at {
                let took = at - from;
                report.stats.max_rehome =
                    Some(report.stats.max_rehome.map_or(took, |m| m.max(took)));
                if took <= bound {
                    continue;
                }
            }
            report.violations.push(Violation::SlowRehome {
                client: c.client,
                user: c.user,
                server: server.clone(),
                fault: fault.clone(),
                fault_at: *fault_at,
                measured_from: from,
                online_at,
                bound,
            });
        }
    }
}

/// Invariant 10: with acknowledgement after replication, every acked message survives every
/// move of its log (its seq at most the move's carried head), through chained moves.
pub(super) fn check_acked_kept(history: &History, report: &mut Report) {
    if !history.acked_after_replication {
        return;
    }
    for ack in &history.acks {
        let mut epoch = ack.log_epoch;
        // Moves are in order; each epoch moves at most once.
        for m in &history.moves {
            if m.conv != ack.conv || m.from != epoch {
                continue;
            }
            if ack.seq > m.carried_up_to {
                report.violations.push(Violation::AckedLost {
                    sender: ack.sender,
                    conv: ack.conv.clone(),
                    log_epoch: ack.log_epoch,
                    seq: ack.seq,
                    msg_id: ack.msg_id,
                    acked_at: ack.acked_at,
                    moved_to: m.to,
                    carried_up_to: m.carried_up_to,
                });
                break;
            }
            epoch = m.to;
        }
    }
}

/// Invariant 11: while one master is down, messages between users and conversations on the
/// other masters are acked within the outage's bound.
pub(super) fn check_other_shards_chat(history: &History, report: &mut Report) {
    let Some(outage) = &history.shard_outage else {
        return;
    };
    let acked: BTreeMap<(UserId, ClientMsgId), SimTime> = history
        .acks
        .iter()
        .map(|a| ((a.sender, a.msg_id), a.acked_at))
        .collect();
    for s in &history.submissions {
        if s.at < outage.from
            || s.at > outage.until
            || !outage.healthy_users.contains(&s.sender)
            || !outage.healthy_convs.contains(&s.conv)
        {
            continue;
        }
        let acked_at = acked.get(&(s.sender, s.msg_id)).copied();
        if acked_at.is_none_or(|a| a > s.at + outage.ack_bound) {
            report.violations.push(Violation::StalledByOtherShard {
                client: s.client,
                sender: s.sender,
                conv: s.conv.clone(),
                msg_id: s.msg_id,
                submitted_at: s.at,
                acked_at,
                bound: outage.ack_bound,
            });
        }
    }
}
