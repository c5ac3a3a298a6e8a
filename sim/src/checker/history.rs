//! What a run recorded, for the checker: sessions, acks, what each client saw, faults.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use cim_core::client::{ClientEvent, StopReason};
use cim_core::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UserId};
use cim_core::store::StoredMessage;

pub use cim_core::memstore::LogMove;

use super::T;

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
    LogMoved {
        conv: ConvId,
        old_epoch: LogEpoch,
        new_epoch: LogEpoch,
        continues_after: u64,
        lost: u64,
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
            ClientEvent::LogMoved {
                conv,
                old_epoch,
                new_epoch,
                continues_after,
                lost,
            } => Self::LogMoved {
                conv: conv.clone(),
                old_epoch: *old_epoch,
                new_epoch: *new_epoch,
                continues_after: *continues_after,
                lost: *lost,
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
    /// The store restarted (or its master changed) without losing anything: logs move to
    /// new log epochs that carry everything over.
    StoreRestart,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ServerDied(s) => write!(f, "server {s} died"),
            Self::Isolated(h) => write!(f, "{h} isolated"),
            Self::Healed(h) => write!(f, "{h} healed"),
            Self::HealAll => f.write_str("network healed"),
            Self::StoreLossyRestart => f.write_str("lossy store restart"),
            Self::StoreRestart => f.write_str("store restart without loss"),
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
    /// Every log move the store made (the lost-tail rule), in order.
    pub moves: Vec<LogMove>,
    /// In time order.
    pub faults: Vec<(SimTime, Fault)>,
    pub bounds: Bounds,
    /// The store acknowledged appends only after replication (`WAIT`): no acked message may
    /// be lost, not even by a failover (invariant 10).
    pub acked_after_replication: bool,
    /// One master's outage that users on the other masters must chat through (invariant 11).
    pub shard_outage: Option<ShardOutage>,
}

/// One master of a sharded store down (from its failover until its replica serves), while
/// the others serve on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShardOutage {
    pub from: SimTime,
    pub until: SimTime,
    /// Users whose keys are on masters that did not fail.
    pub healthy_users: std::collections::BTreeSet<UserId>,
    /// Conversations whose keys are on masters that did not fail.
    pub healthy_convs: std::collections::BTreeSet<ConvId>,
    /// How long such a user's message to such a conversation, submitted in
    /// `[from, until]`, may wait for its ack.
    pub ack_bound: Duration,
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
