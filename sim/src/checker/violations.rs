//! What the checker finds, each with the evidence an engineer needs to replay it.

use std::fmt;
use std::time::Duration;

use cim_core::ids::{ClientMsgId, ConvId, LogEpoch, ServerId, UserId};

use super::{ClientId, Ep, Fault, Rejection, SessionSpan, SimTime, T, Witness};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Invariant 1.
    OverlappingSessions {
        user: UserId,
        first: SessionSpan,
        second: SessionSpan,
    },
    /// Invariant 1: two sessions of one user under one claim epoch.
    ReusedClaimEpoch {
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
    /// Invariant 9: a move's carried seq names other contents under the new epoch.
    BadLogMove {
        conv: ConvId,
        from: LogEpoch,
        to: LogEpoch,
        seq: u64,
        old: (UserId, ClientMsgId),
        new: (UserId, ClientMsgId),
    },
    /// Invariant 9: a `LogMoved` that names no move of the store, or whose continuation or
    /// loss count does not follow from the move and what the client had handed over.
    WrongLogMove {
        client: ClientId,
        user: UserId,
        conv: ConvId,
        old_epoch: LogEpoch,
        new_epoch: LogEpoch,
        /// The last seq the client had handed over (or announced unavailable), if any.
        handed_over: Option<u64>,
        /// The store's move's carried head, if the store made that move.
        carried_up_to: Option<u64>,
        continues_after: u64,
        lost: u64,
        at: SimTime,
    },
    /// Invariant 9: a `LogReset` across a move straight from the client's epoch, which the
    /// client could have continued: it hands the carried messages over again.
    ResetAcrossMove {
        client: ClientId,
        user: UserId,
        conv: ConvId,
        old_epoch: LogEpoch,
        new_epoch: LogEpoch,
        handed_over: Option<u64>,
        carried_up_to: u64,
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
    /// Invariant 10: with acknowledgement after replication, an acked message that a log
    /// move did not carry over (its seq above the move's carried head).
    AckedLost {
        sender: UserId,
        conv: ConvId,
        log_epoch: LogEpoch,
        seq: u64,
        msg_id: ClientMsgId,
        acked_at: SimTime,
        moved_to: LogEpoch,
        carried_up_to: u64,
    },
    /// Invariant 11: a message of a user and a conversation on masters that did not fail,
    /// submitted while another master was down, not acknowledged within the bound.
    StalledByOtherShard {
        client: ClientId,
        sender: UserId,
        conv: ConvId,
        msg_id: ClientMsgId,
        submitted_at: SimTime,
        acked_at: Option<SimTime>,
        bound: Duration,
    },
}

pub(super) fn span(s: &SessionSpan) -> String {
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
            Self::ReusedClaimEpoch {
                user,
                first,
                second,
            } => write!(
                f,
                "claim epoch issued twice for user {user}: {} and {}",
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
            Self::BadLogMove {
                conv,
                from,
                to,
                seq,
                old,
                new,
            } => write!(
                f,
                "bad log move: {conv} moved from log epoch {} to {} carrying seq {seq}, which \
                 names sender {} msg id {} in the old epoch and sender {} msg id {} in the new",
                from.0, to.0, old.0, old.1, new.0, new.1
            ),
            Self::WrongLogMove {
                client,
                user,
                conv,
                old_epoch,
                new_epoch,
                handed_over,
                carried_up_to,
                continues_after,
                lost,
                at,
            } => write!(
                f,
                "wrong log move: {client} (user {user}) at {} saw {conv} move from log epoch {} \
                 to {}, continuing after {continues_after} with {lost} lost; it had handed \
                 over up to {handed_over:?}, the store's move carried up to {carried_up_to:?}",
                T(*at),
                old_epoch.0,
                new_epoch.0
            ),
            Self::ResetAcrossMove {
                client,
                user,
                conv,
                old_epoch,
                new_epoch,
                handed_over,
                carried_up_to,
                at,
            } => write!(
                f,
                "reset across a move: {client} (user {user}) at {} reset {conv} from log epoch \
                 {} to {}, which carried up to {carried_up_to} over (it had handed over up to \
                 {handed_over:?})",
                T(*at),
                old_epoch.0,
                new_epoch.0
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
            Self::AckedLost {
                sender,
                conv,
                log_epoch,
                seq,
                msg_id,
                acked_at,
                moved_to,
                carried_up_to,
            } => write!(
                f,
                "acked message lost although acknowledged after replication: {msg_id} of \
                 sender {sender}, acked at {} as {conv} seq {seq} (log epoch {}), was not \
                 carried to log epoch {} (carried up to seq {carried_up_to})",
                T(*acked_at),
                log_epoch.0,
                moved_to.0
            ),
            Self::StalledByOtherShard {
                client,
                sender,
                conv,
                msg_id,
                submitted_at,
                acked_at,
                bound,
            } => write!(
                f,
                "stalled by another shard's failure: {client} (user {sender}, on a master that \
                 did not fail) submitted {msg_id} to {conv} (on a master that did not fail) at \
                 {} while another master was down, acked {} (bound {bound:?})",
                T(*submitted_at),
                acked_at.map_or("never".to_owned(), |a| format!("at {}", T(a)))
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
