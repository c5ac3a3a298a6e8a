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
//!    open session lasts forever), never overlap, and no two of them share a claim epoch
//!    (an epoch is never issued twice, not even by a store that lost its last writes).
//!    [`Violation::OverlappingSessions`], [`Violation::ReusedClaimEpoch`]
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
//! 9. **Log moves** (docs/design.md, "Never the same name for two contents"): a move's
//!    carried seqs (`1..=carried_up_to`) name the same (sender, msg id) under the old and
//!    the new epoch, as far as acks and clients saw them ([`Violation::BadLogMove`]). A
//!    client's `LogMoved` names a move the store made, and continues after the smaller of
//!    what it had handed over and the carried head, reporting the rest as lost
//!    ([`Violation::WrongLogMove`]); then it goes on under the new epoch, and what it had
//!    handed over up to there counts as handed over in the new epoch too (a seq handed over
//!    again is a [`Violation::DuplicateSeq`] or [`Violation::OutOfOrder`]). A client that
//!    resets (`LogReset`) across a move straight from its epoch, which it could have
//!    continued, is [`Violation::ResetAcrossMove`]: it hands the carried messages over again.
//! 10. **Acknowledged after replication, never lost** (docs/design.md, "Acknowledge after
//!     replication and one shard's failure"): when the store acknowledged appends only after
//!     a replica confirmed them ([`History::acked_after_replication`]), every acked message
//!     is carried over by every log move that follows its epoch: a failover loses none.
//!     Without it the loss is allowed, but never hidden (invariants 4 and 9: the client's
//!     `LogMoved` reports it). [`Violation::AckedLost`]
//! 11. **One shard's failure leaves the others chatting**: while one master of a sharded
//!     store is down ([`History::shard_outage`]), a message of a user whose keys are on
//!     another master, to a conversation on another master, is acked within a bound.
//!     [`Violation::StalledByOtherShard`]
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

use std::fmt;
use std::time::Duration;

use cim_core::ids::LogEpoch;

#[cfg(test)]
mod tests;

mod checks;
mod history;
mod violations;

pub use self::history::{
    AckedSend, Bounds, ClientHistory, ClientId, Fault, FinalLog, History, Host, LogMove,
    Membership, Rejection, Seen, SessionSpan, ShardOutage, SimTime, Submission, Witness,
};
pub use self::violations::Violation;

use self::checks::{
    check_acked_kept, check_consistency, check_loss, check_moves, check_other_shards_chat,
    check_rehome, check_rejections, check_sender_order, check_sessions, check_streams,
    stored_messages,
};

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
    check_moves(history, &mut report);
    check_loss(history, &streams, &mut report);
    check_rehome(history, &mut report);
    let stored = stored_messages(history);
    check_sender_order(history, &stored, &mut report);
    check_rejections(history, &stored, &mut report);
    check_acked_kept(history, &mut report);
    check_other_shards_chat(history, &mut report);
    report
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
