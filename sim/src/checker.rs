//! The judge of every simulated run: recorded histories in, every invariant violation out.
//!
//! Pure and deterministic: no I/O, no clock, no tokio. The simulation records a [`History`]
//! while it runs (sessions from servers, acknowledged sends and what each client's
//! application saw from clients, membership, faults, the final state of each log) and calls
//! [`check`] once at the end. Unit tests feed it hand-made histories.
//!
//! **Time** is [`SimTime`]: simulated time since the start of the run, as a
//! [`Duration`] (what turmoil's `sim_elapsed` gives). Events of one client are in the order
//! the application saw them; equal times are allowed.
//!
//! # Invariants (DESIGN.md, "Sessions, claims and fencing" and "Messages and delivery")
//!
//! 1. **Sessions**: the sessions of one user, as half-open intervals `[opened, closed)` (an
//!    open session lasts forever), never overlap. [`Violation::OverlappingSessions`]
//! 2. **No duplicate**: a client sees a (conv, log epoch, seq) at most once, and a
//!    (sender, msg id) under at most one seq of a log epoch. [`Violation::DuplicateSeq`],
//!    [`Violation::DuplicateMsgId`]
//! 3. **No reordering**: per (client, conv) the handed-over seqs of one log epoch go up by
//!    exactly one, or jump over a range announced just then by `Unavailable`. A stream's
//!    first seq is free (where the client anchors is judged by the loss check); after a
//!    `LogReset` the new epoch starts at seq 1. [`Violation::OutOfOrder`],
//!    [`Violation::SilentGap`]. A message of another log epoch without a `LogReset` (for
//!    example a message of a replaced log handed over after the reset) is
//!    [`Violation::EpochSwitch`]; a `LogReset` before any lossy store restart is
//!    [`Violation::UnexplainedLogReset`].
//! 4. **No loss**: every client online at the end of the run has, for every conversation in
//!    [`History::final_logs`] its user is a member of, every acknowledged message of that
//!    log's (final) epoch with `seq > floor`, where `floor` is the largest of: the join seq
//!    (for `all`, where the account started reading it),
//!    `first_available_seq - 1` of the final log (trimmed before this client could get
//!    them), and the highest seq another client of the same user had already covered when
//!    this one started the conversation (the user's read cursor may have come from it).
//!    Messages of replaced log epochs are exempt. "Exactly once" is invariant 2.
//!    [`Violation::Lost`]
//! 5. **Re-home**: after a server death or an isolation of a server, every client that was
//!    online on it is online again (or stopped) within the bound, measured from the later
//!    of the fault and the network's heal (the first instant after the fault with no host
//!    isolated). A client online at that instant (its link survived an isolation, or it
//!    re-homed before the heal) counts as re-homed at once; after a death, only an `Online`
//!    later than the death counts. A fault that starts before the client is back and
//!    before its deadline (a crash of the route it logs in through, another partition)
//!    moves the start of the measurement to that fault's heal: the bound is DESIGN.md's for
//!    one fault at a time. [`Violation::SlowRehome`]
//! 6. **Consistency**: everything known about one (conv, log epoch, seq) (acks, messages
//!    clients saw) names the same (sender, msg id), and the same body among clients; one
//!    (sender, msg id) is acked under one seq per log epoch. [`Violation::Conflict`],
//!    [`Violation::AckedTwice`]
//! 7. **Per-sender order** (README: "one sender's messages keep their order"): per (client
//!    instance, conversation, log epoch), the messages the client's application submitted
//!    that are known to be stored (acked to it, or seen by any client) hold seqs that grow
//!    in submission order. Stored includes messages the sender gave up as unknown: the store
//!    never puts one after a message submitted later. [`Violation::SenderOrder`]
//! 8. **Refused means not stored**: a message its sender was told was refused for good
//!    (`Rejected`: not a member, superseded, ...) is in no log: no ack names it and no client
//!    saw it. [`Violation::RejectedButStored`]
//!
//! # Scope
//!
//! - One [`ClientHistory`] per SDK client instance ([`ClientId`]); a user may have several
//!   (concurrent logins, a restarted process): each is judged on its own.
//! - Isolations name hosts ([`Host`]); the healed phase ([`Bounds::healed_at`]) heals all.
//! - Membership is static per run: `all` holds every user, owed from its account's start
//!   (`Membership::all_from`, the `all` head at its registration) on, a private
//!   conversation its two users, a group the users listed with their join seq (in the final
//!   log's terms), visible from `join_seq + 1` on. Leaving is not modelled: leave such
//!   users out of the group.
//! - The trim bound enters through [`FinalLog::first_available_seq`] (read from the store
//!   at the end), which is exact, rather than `head - max_len`, which the checker could only
//!   guess from what it saw (a message may be appended and never acked nor seen).
//! - A re-home whose deadline falls after the end of the run and that did not happen by then
//!   is not judged; it is counted in [`Stats::rehomes_unjudged`].
//! - `Unavailable` carries no log epoch: one seen before the conversation's epoch is known to
//!   this client belongs to the epoch learnt next.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use cim_core::client::{ClientEvent, StopReason};
use cim_core::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UserId};
use cim_core::store::StoredMessage;

#[cfg(test)]
mod tests;

/// Simulated time since the start of the run.
pub type SimTime = Duration;

/// One server-side session: from LoginOk sent to connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSpan {
    pub user: UserId,
    pub server: ServerId,
    pub epoch: Epoch,
    pub opened_at: SimTime,
    /// `None`: still open at the end of the run.
    pub closed_at: Option<SimTime>,
}

/// A send the sending client saw acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedSend {
    pub sender: UserId,
    pub conv: ConvId,
    pub msg_id: ClientMsgId,
    pub log_epoch: LogEpoch,
    pub seq: u64,
    pub acked_at: SimTime,
}

/// A message a client's application submitted; [`History::submissions`] keeps them in
/// submission order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub client: ClientId,
    pub sender: UserId,
    pub conv: ConvId,
    pub msg_id: ClientMsgId,
    pub at: SimTime,
}

/// A message its sender's client was told was refused for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub client: ClientId,
    pub sender: UserId,
    pub msg_id: ClientMsgId,
    pub at: SimTime,
}

/// One SDK client instance. A user may have several (concurrent logins, restarts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u32);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {}", self.0)
    }
}

/// The [`ClientEvent`]s the checker judges.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Online {
        server: ServerId,
        epoch: Epoch,
    },
    Reconnecting,
    Stopped(StopReason),
    Message(StoredMessage),
    Unavailable {
        conv: ConvId,
        from_seq: u64,
        count: u64,
    },
    LogReset {
        conv: ConvId,
        old_epoch: LogEpoch,
        new_epoch: LogEpoch,
    },
}

impl Seen {
    /// `None` for events the checker does not judge (acks, kicks, login progress: a kick or
    /// a rejected login is followed by `Reconnecting` or `Stopped`).
    pub fn from_event(event: &ClientEvent) -> Option<Self> {
        Some(match event {
            ClientEvent::Online { server, epoch } => Self::Online {
                server: server.clone(),
                epoch: *epoch,
            },
            ClientEvent::Reconnecting { .. } => Self::Reconnecting,
            ClientEvent::Stopped(reason) => Self::Stopped(*reason),
            ClientEvent::Message(m) => Self::Message(m.clone()),
            ClientEvent::Unavailable {
                conv,
                from_seq,
                count,
            } => Self::Unavailable {
                conv: conv.clone(),
                from_seq: *from_seq,
                count: *count,
            },
            ClientEvent::LogReset {
                conv,
                old_epoch,
                new_epoch,
            } => Self::LogReset {
                conv: conv.clone(),
                old_epoch: *old_epoch,
                new_epoch: *new_epoch,
            },
            _ => return None,
        })
    }
}

/// What one client's application saw, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientHistory {
    pub client: ClientId,
    pub user: UserId,
    pub events: Vec<(SimTime, Seen)>,
}

impl ClientHistory {
    pub fn new(client: ClientId, user: UserId) -> Self {
        Self {
            client,
            user,
            events: Vec::new(),
        }
    }

    /// Records `event` if the checker judges it.
    pub fn record(&mut self, at: SimTime, event: &ClientEvent) {
        if let Some(seen) = Seen::from_event(event) {
            self.events.push((at, seen));
        }
    }
}

/// Group membership, and where each user starts in `all`; private conversations need no
/// entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Membership {
    /// Group name -> member -> join seq (history visible after it).
    pub groups: BTreeMap<String, BTreeMap<UserId, u64>>,
    /// User -> the seq of the final `all` log after which it is owed `all` (its account's
    /// start, `AllFrom::floor`, like a group member's join seq: a new account owes nothing
    /// of `all` before its registration). Absent: 0.
    pub all_from: BTreeMap<UserId, u64>,
}

impl Membership {
    /// The seq after which `user` sees `conv`, or `None` if not a member.
    pub fn join_seq(&self, user: UserId, conv: &ConvId) -> Option<u64> {
        match conv {
            ConvId::All => Some(self.all_from.get(&user).copied().unwrap_or(0)),
            ConvId::Private { low, high } => (*low == user || *high == user).then_some(0),
            ConvId::Group(name) => self.groups.get(name)?.get(&user).copied(),
        }
    }
}

/// A conversation's log as the store holds it at the end of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinalLog {
    pub log_epoch: LogEpoch,
    pub head_seq: u64,
    pub first_available_seq: u64,
}

/// A host of the simulated network, for isolations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Host {
    Server(ServerId),
    Client(ClientId),
    /// Routes, the store, the registry: by host name.
    Other(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Server(s) => write!(f, "server {s}"),
            Self::Client(c) => write!(f, "{c}"),
            Self::Other(name) => f.write_str(name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The server process died (crash, or the first half of a bounce).
    ServerDied(ServerId),
    /// A partition (one-way or both) cut this host from some peer.
    Isolated(Host),
    /// Every partition of this host is healed.
    Healed(Host),
    /// Every partition of every host is healed.
    HealAll,
    /// The store restarted and lost data: logs may come back under new log epochs.
    StoreLossyRestart,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ServerDied(s) => write!(f, "server {s} died"),
            Self::Isolated(h) => write!(f, "{h} isolated"),
            Self::Healed(h) => write!(f, "{h} healed"),
            Self::HealAll => f.write_str("network healed"),
            Self::StoreLossyRestart => f.write_str("lossy store restart"),
        }
    }
}

/// The run's time bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Bounds {
    /// The healed phase starts here: every isolation ends (an implicit [`Fault::HealAll`]).
    pub healed_at: SimTime,
    /// End of the run (and of the healed phase): who is online now must have everything.
    pub end: SimTime,
    /// Re-home bound after a server's death (DESIGN.md).
    pub rehome_after_death: Duration,
    /// Re-home bound after a server's isolation (adds the registry session timeout).
    pub rehome_after_isolation: Duration,
}

/// Everything recorded about one run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct History {
    pub sessions: Vec<SessionSpan>,
    pub acks: Vec<AckedSend>,
    /// Every submitted message, in submission order (per client, the order its application
    /// submitted them).
    pub submissions: Vec<Submission>,
    /// Messages refused for good, as their senders were told.
    pub rejections: Vec<Rejection>,
    pub clients: Vec<ClientHistory>,
    pub membership: Membership,
    pub final_logs: BTreeMap<ConvId, FinalLog>,
    /// In time order.
    pub faults: Vec<(SimTime, Fault)>,
    pub bounds: Bounds,
}

/// Where a fact about one (conv, log epoch, seq) came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Witness {
    /// `None`: the sender's ack; `Some`: a client saw it.
    pub client: Option<ClientId>,
    pub at: SimTime,
    pub sender: UserId,
    pub msg_id: ClientMsgId,
    /// Acks carry no body.
    pub body: Option<Bytes>,
}

impl fmt::Display for Witness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.client {
            None => write!(f, "acked to sender {} at {}", self.sender, T(self.at))?,
            Some(c) => write!(f, "{c} saw sender {} at {}", self.sender, T(self.at))?,
        }
        write!(f, " (msg id {}", self.msg_id)?;
        if let Some(body) = &self.body {
            write!(
                f,
                ", body of {} bytes {:02x?}",
                body.len(),
                &body[..body.len().min(8)]
            )?;
        }
        f.write_str(")")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Invariant 1.
    OverlappingSessions {
        user: UserId,
        first: SessionSpan,
        second: SessionSpan,
    },
    /// Invariant 2: one (conv, log epoch, seq) handed over twice.
    DuplicateSeq {
        client: ClientId,
        user: UserId,
        conv: ConvId,
        log_epoch: LogEpoch,
        seq: u64,
        first_at: SimTime,
        again_at: SimTime,
    },
    /// Invariant 2: one (sender, msg id) handed over under two seqs of one log epoch.
    DuplicateMsgId {
        client: ClientId,
        user: UserId,
        conv: ConvId,
        log_epoch: LogEpoch,
        sender: UserId,
        msg_id: ClientMsgId,
        first_seq: u64,
        again_seq: u64,
        at: SimTime,
    },
    /// Invariant 3: a seq (or an `Unavailable` range) at or below what was already handed
    /// over.
    OutOfOrder {
        client: ClientId,
        user: UserId,
        conv: ConvId,
        log_epoch: Option<LogEpoch>,
        expected: u64,
        got: u64,
        at: SimTime,
    },
    /// Invariant 3: seqs skipped without an `Unavailable`.
    SilentGap {
        client: ClientId,
        user: UserId,
        conv: ConvId,
        log_epoch: Option<LogEpoch>,
        missing_from: u64,
        missing_to: u64,
        at: SimTime,
    },
    /// Invariant 3/4: a message of another log epoch than the client's current one, without
    /// a `LogReset` (or a `LogReset` from an epoch the client was not in).
    EpochSwitch {
        client: ClientId,
        user: UserId,
        conv: ConvId,
        current: LogEpoch,
        got: LogEpoch,
        seq: Option<u64>,
        at: SimTime,
    },
    /// A `LogReset` with no lossy store restart before it.
    UnexplainedLogReset {
        client: ClientId,
        user: UserId,
        conv: ConvId,
        old_epoch: LogEpoch,
        new_epoch: LogEpoch,
        at: SimTime,
    },
    /// Invariant 4.
    Lost {
        client: ClientId,
        user: UserId,
        conv: ConvId,
        log_epoch: LogEpoch,
        seq: u64,
        sender: UserId,
        msg_id: ClientMsgId,
        acked_at: SimTime,
        /// The client was told it was trimmed, but the final log still holds it.
        announced_unavailable: bool,
    },
    /// Invariant 5.
    SlowRehome {
        client: ClientId,
        user: UserId,
        server: ServerId,
        fault: Fault,
        fault_at: SimTime,
        measured_from: SimTime,
        /// `None`: not online again before the end of the run.
        online_at: Option<SimTime>,
        bound: Duration,
    },
    /// Invariant 6: two different messages under one (conv, log epoch, seq).
    Conflict {
        conv: ConvId,
        log_epoch: LogEpoch,
        seq: u64,
        first: Witness,
        second: Witness,
    },
    /// Invariant 7: a message submitted later got a lower seq than one submitted before it
    /// to the same conversation by the same client.
    SenderOrder {
        client: ClientId,
        sender: UserId,
        conv: ConvId,
        log_epoch: LogEpoch,
        /// (msg id, submitted at, seq) of the earlier submission.
        earlier: (ClientMsgId, SimTime, u64),
        /// The same of the later one, stored before it.
        later: (ClientMsgId, SimTime, u64),
    },
    /// Invariant 8: a message refused for good is stored after all.
    RejectedButStored {
        rejection: Rejection,
        conv: ConvId,
        log_epoch: LogEpoch,
        seq: u64,
    },
    /// Invariant 6: one (sender, msg id) acked under two seqs of one log epoch.
    AckedTwice {
        sender: UserId,
        conv: ConvId,
        log_epoch: LogEpoch,
        msg_id: ClientMsgId,
        first_seq: u64,
        again_seq: u64,
        at: SimTime,
    },
}

/// Formats a [`SimTime`] as seconds with milliseconds.
struct T(SimTime);

impl fmt::Display for T {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:03}s", self.0.as_secs(), self.0.subsec_millis())
    }
}

struct Ep(Option<LogEpoch>);

impl fmt::Display for Ep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(e) => write!(f, "log epoch {}", e.0),
            None => f.write_str("log epoch not yet known"),
        }
    }
}

fn span(s: &SessionSpan) -> String {
    let closed = s.closed_at.map_or("open".to_owned(), |c| T(c).to_string());
    format!(
        "[{} .. {}) on server {} epoch {}",
        T(s.opened_at),
        closed,
        s.server,
        s.epoch.0
    )
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OverlappingSessions {
                user,
                first,
                second,
            } => write!(
                f,
                "overlapping sessions of user {user}: {} and {}",
                span(first),
                span(second)
            ),
            Self::DuplicateSeq {
                client,
                user,
                conv,
                log_epoch,
                seq,
                first_at,
                again_at,
            } => write!(
                f,
                "duplicate: {client} (user {user}) got {conv} seq {seq} (log epoch {}) at {} \
                 and again at {}",
                log_epoch.0,
                T(*first_at),
                T(*again_at)
            ),
            Self::DuplicateMsgId {
                client,
                user,
                conv,
                log_epoch,
                sender,
                msg_id,
                first_seq,
                again_seq,
                at,
            } => write!(
                f,
                "duplicate: {client} (user {user}) got message {msg_id} of sender {sender} in \
                 {conv} (log epoch {}) as seq {first_seq} and again as seq {again_seq} at {}",
                log_epoch.0,
                T(*at)
            ),
            Self::OutOfOrder {
                client,
                user,
                conv,
                log_epoch,
                expected,
                got,
                at,
            } => write!(
                f,
                "reordered: {client} (user {user}) expected {conv} seq {expected} ({}) next \
                 but got seq {got} at {}",
                Ep(*log_epoch),
                T(*at)
            ),
            Self::SilentGap {
                client,
                user,
                conv,
                log_epoch,
                missing_from,
                missing_to,
                at,
            } => write!(
                f,
                "silent gap: {client} (user {user}) skipped {conv} seqs {missing_from}..={missing_to} \
                 ({}) at {} without an Unavailable",
                Ep(*log_epoch),
                T(*at)
            ),
            Self::EpochSwitch {
                client,
                user,
                conv,
                current,
                got,
                seq,
                at,
            } => {
                write!(
                    f,
                    "epoch switch: {client} (user {user}) is in {conv} log epoch {} but at {} got ",
                    current.0,
                    T(*at)
                )?;
                match seq {
                    Some(seq) => write!(f, "seq {seq} of log epoch {} without a LogReset", got.0),
                    None => write!(f, "a LogReset from log epoch {}", got.0),
                }
            }
            Self::UnexplainedLogReset {
                client,
                user,
                conv,
                old_epoch,
                new_epoch,
                at,
            } => write!(
                f,
                "log reset without a lossy store restart: {client} (user {user}) saw {conv} go \
                 from log epoch {} to {} at {}",
                old_epoch.0,
                new_epoch.0,
                T(*at)
            ),
            Self::Lost {
                client,
                user,
                conv,
                log_epoch,
                seq,
                sender,
                msg_id,
                acked_at,
                announced_unavailable,
            } => {
                write!(
                    f,
                    "lost: {client} (user {user}, online at the end) never got {conv} seq {seq} \
                     (log epoch {}), message {msg_id} of sender {sender} acked at {}",
                    log_epoch.0,
                    T(*acked_at)
                )?;
                if *announced_unavailable {
                    f.write_str("; it was announced unavailable but the log still holds it")?;
                }
                Ok(())
            }
            Self::SlowRehome {
                client,
                user,
                server,
                fault,
                fault_at,
                measured_from,
                online_at,
                bound,
            } => {
                write!(
                    f,
                    "slow re-home: {client} (user {user}) was online on server {server} when \
                     \"{fault}\" at {}; measured from {}, ",
                    T(*fault_at),
                    T(*measured_from)
                )?;
                match online_at {
                    Some(at) => write!(
                        f,
                        "online again at {} after {} (bound {})",
                        T(*at),
                        T(at.saturating_sub(*measured_from)),
                        T(*bound)
                    ),
                    None => write!(f, "never online again (bound {})", T(*bound)),
                }
            }
            Self::Conflict {
                conv,
                log_epoch,
                seq,
                first,
                second,
            } => write!(
                f,
                "conflict: two messages under {conv} seq {seq} (log epoch {}): {first}; {second}",
                log_epoch.0
            ),
            Self::SenderOrder {
                client,
                sender,
                conv,
                log_epoch,
                earlier,
                later,
            } => write!(
                f,
                "sender order: {client} (user {sender}) submitted {} to {conv} at {} before {}                  at {}, but they were stored as seqs {} and {} (log epoch {})",
                earlier.0,
                T(earlier.1),
                later.0,
                T(later.1),
                earlier.2,
                later.2,
                log_epoch.0
            ),
            Self::RejectedButStored {
                rejection,
                conv,
                log_epoch,
                seq,
            } => write!(
                f,
                "refused but stored: {} (user {}) was told at {} that {} was refused, but it is \
                 {conv} seq {seq} (log epoch {})",
                rejection.client,
                rejection.sender,
                T(rejection.at),
                rejection.msg_id,
                log_epoch.0
            ),
            Self::AckedTwice {
                sender,
                conv,
                log_epoch,
                msg_id,
                first_seq,
                again_seq,
                at,
            } => write!(
                f,
                "appended twice: message {msg_id} of sender {sender} acked in {conv} (log epoch \
                 {}) as seq {first_seq} and as seq {again_seq} (at {})",
                log_epoch.0,
                T(*at)
            ),
        }
    }
}

/// What the check covered, for the sweep table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub sessions_checked: u64,
    pub acks_checked: u64,
    /// Messages handed to applications.
    pub messages_checked: u64,
    /// (client, acked message) pairs the loss check required.
    pub deliveries_required: u64,
    pub rehomes_checked: u64,
    pub rehomes_unjudged: u64,
    pub max_rehome: Option<Duration>,
    /// Submitted messages known to be stored, whose order the sender-order check judged.
    pub ordered_checked: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Report {
    pub violations: Vec<Violation>,
    pub stats: Stats,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        write!(
            f,
            "{} violation(s); checked {} sessions, {} acks, {} messages, {} required \
             deliveries, {} sender-ordered, {} re-homes ({} unjudged), max re-home ",
            self.violations.len(),
            s.sessions_checked,
            s.acks_checked,
            s.messages_checked,
            s.deliveries_required,
            s.ordered_checked,
            s.rehomes_checked,
            s.rehomes_unjudged
        )?;
        match s.max_rehome {
            Some(d) => write!(f, "{}", T(d))?,
            None => f.write_str("-")?,
        }
        for v in &self.violations {
            write!(f, "\n  {v}")?;
        }
        Ok(())
    }
}

/// Checks every invariant of a run.
pub fn check(history: &History) -> Report {
    let mut report = Report::default();
    check_sessions(history, &mut report);
    let streams = check_streams(history, &mut report);
    check_consistency(history, &mut report);
    check_loss(history, &streams, &mut report);
    check_rehome(history, &mut report);
    let stored = stored_messages(history);
    check_sender_order(history, &stored, &mut report);
    check_rejections(history, &stored, &mut report);
    report
}

/// Where each (sender, msg id, conv) is known to be stored, by log epoch: from acks and from
/// what any client saw. A message may be stored under several log epochs (resent after a
/// lossy restart).
type Stored = BTreeMap<(UserId, ClientMsgId, ConvId), BTreeMap<LogEpoch, u64>>;

fn stored_messages(history: &History) -> Stored {
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
fn check_rejections(history: &History, stored: &Stored, report: &mut Report) {
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
fn check_sender_order(history: &History, stored: &Stored, report: &mut Report) {
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
fn check_sessions(history: &History, report: &mut Report) {
    let mut by_user: BTreeMap<UserId, Vec<&SessionSpan>> = BTreeMap::new();
    for s in &history.sessions {
        by_user.entry(s.user).or_default().push(s);
    }
    for (user, mut spans) in by_user {
        spans.sort_by_key(|s| s.opened_at);
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
struct Covered {
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
type Streams = BTreeMap<ClientId, BTreeMap<(ConvId, LogEpoch), Covered>>;

/// Where one client stands in one conversation while its events are replayed.
#[derive(Debug, Default)]
struct Position {
    epoch: Option<LogEpoch>,
    /// The next seq the client may hand over; `None` before its first.
    next: Option<u64>,
    /// `Unavailable` ranges seen before the epoch was known, with their times.
    pending: Vec<(u64, u64, SimTime)>,
    /// (sender, msg id) -> seq, in the current epoch.
    ids: BTreeMap<(UserId, ClientMsgId), u64>,
}

impl Position {
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
fn check_streams(history: &History, report: &mut Report) -> Streams {
    let first_lossy = history
        .faults
        .iter()
        .find(|(_, f)| *f == Fault::StoreLossyRestart)
        .map(|(at, _)| *at);
    let mut streams = Streams::new();
    for c in &history.clients {
        let covered = streams.entry(c.client).or_default();
        let mut positions: BTreeMap<ConvId, Position> = BTreeMap::new();
        for (at, seen) in &c.events {
            let at = *at;
            match seen {
                Seen::Message(m) => {
                    report.stats.messages_checked += 1;
                    let pos = positions.entry(m.conv.clone()).or_default();
                    match pos.epoch {
                        None => pos.learn_epoch(m.log_epoch, &m.conv, covered),
                        Some(current) if current != m.log_epoch => {
                            report.violations.push(Violation::EpochSwitch {
                                client: c.client,
                                user: c.user,
                                conv: m.conv.clone(),
                                current,
                                got: m.log_epoch,
                                seq: Some(m.seq),
                                at,
                            });
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
                    match pos.epoch {
                        None => pos.learn_epoch(*old_epoch, conv, covered),
                        Some(current) if current != *old_epoch => {
                            report.violations.push(Violation::EpochSwitch {
                                client: c.client,
                                user: c.user,
                                conv: conv.clone(),
                                current,
                                got: *old_epoch,
                                seq: None,
                                at,
                            });
                        }
                        Some(_) => {}
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

/// Invariant 6.
fn check_consistency(history: &History, report: &mut Report) {
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
fn check_loss(history: &History, streams: &Streams, report: &mut Report) {
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
            let cursor = history
                .clients
                .iter()
                .filter(|o| o.user == c.user && o.client != c.client)
                .filter_map(|o| streams.get(&o.client)?.get(&key))
                .map(|o| o.highest_by(started))
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
            Fault::ServerDied(_) | Fault::StoreLossyRestart => {}
        }
        if *at > t && isolated.is_empty() {
            return *at;
        }
    }
    if isolated.is_empty() { t } else { healed_at }
}

/// Invariant 5.
fn check_rehome(history: &History, report: &mut Report) {
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
