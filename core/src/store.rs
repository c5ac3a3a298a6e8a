//! The store's vocabulary: what the machines ask of it and what it answers.
//!
//! Machines never talk to Redis or to the in-memory store directly: they emit a
//! [`StoreRequest`] (a correlation id and a [`StoreCommand`]) and are later fed the matching
//! [`StoreReply`]. Each command is **one atomic step** in every implementation (a Lua script on
//! Redis, one critical section in memory); `memstore::MemoryStore` is the pure reference the
//! real implementations must match, command for command.

use bytes::Bytes;

use crate::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};

/// Correlates a [`StoreReply`] with the request that caused it. Unique per machine.
#[derive(
    serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
pub struct RequestId(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreRequest {
    pub id: RequestId,
    pub command: StoreCommand,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub user: UserId,
    /// As first registered (case kept); unique regardless of ASCII case.
    pub name: String,
    /// PHC string (argon2id), see `accounts`.
    pub password_hash: String,
    /// Where the account starts reading `all`: the log's head when it registered.
    pub all_from: AllFrom,
}

/// Where an account starts reading `all`, like a group member's join seq: the `all` log's
/// epoch and head seq when the account was registered. Messages of that log up to `seq`
/// are history the account may fetch (`:his all`), never a backlog it is owed: its head
/// reports `cursor_seq` at least `seq`. A log with another epoch was created after the
/// registration (logs are only ever replaced by newer ones), so all of it is owed.
/// Accounts registered before the store recorded this start at 0 (everything, as before).
#[derive(
    serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, Hash,
)]
pub struct AllFrom {
    /// `LogEpoch(0)`: no `all` log existed at registration.
    pub log_epoch: LogEpoch,
    pub seq: u64,
}

impl AllFrom {
    /// The seq after which the account is owed messages of the `all` log with `log_epoch`.
    pub fn floor(self, log_epoch: LogEpoch) -> u64 {
        if log_epoch == self.log_epoch {
            self.seq
        } else {
            0
        }
    }

    /// [`AllFrom::floor`] in the terms of a log that may have moved from the epoch this
    /// start names (`carried`: see [`position_in`]).
    pub fn floor_in(self, log_epoch: LogEpoch, carried: (LogEpoch, u64)) -> u64 {
        if self.log_epoch == LogEpoch(0) {
            0
        } else {
            position_in((self.log_epoch, self.seq), log_epoch, carried)
        }
    }
}

/// A read position `(epoch, seq)` in the terms of a log now at `log_epoch` that moved from
/// `carried_from` (0: never moved) carrying seqs `1..=carried_up_to` over: the seq itself in
/// the current epoch, at most the carried head in the epoch it moved from (the seqs past it
/// were lost), else 0 (a position in a log this one knows nothing of).
pub fn position_in(
    (epoch, seq): (LogEpoch, u64),
    log_epoch: LogEpoch,
    (carried_from, carried_up_to): (LogEpoch, u64),
) -> u64 {
    if epoch == log_epoch {
        seq
    } else if carried_from != LogEpoch(0) && epoch == carried_from {
        seq.min(carried_up_to)
    } else {
        0
    }
}

/// One row of [`StoreCommand::ListAccounts`] (the admin listing).
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AccountSummary {
    pub user: UserId,
    pub name: String,
    /// Tombstoned by [`StoreCommand::DeleteAccount`].
    pub deleted: bool,
}

/// What [`StoreCommand::DeleteAccount`] did.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Deleted {
    pub name: String,
    /// The claim that was live or lapsed at deletion (now released): the route kicks its
    /// server's session. `None` if the user had none.
    pub claim: Option<Claim>,
    /// Already tombstoned before this command (a retry): nothing changed.
    pub already: bool,
}

/// A user's login claim: which server the user's one session may live on, under which epoch.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub epoch: Epoch,
    pub server: ServerId,
    /// The claim is live while `now < lease_until` (store's wall clock).
    pub lease_until: UnixMillis,
    /// SHA-256 of the resume token handed to the client with this claim.
    pub resume_token_hash: [u8; 32],
    /// The resumption secret handed out with this claim, stored only as its hash: a login
    /// presenting this claim's resume token and the secret needs no password
    /// (`route::resumption`). `None`: revoked, or never issued (a claim written by an
    /// older route). It goes with the claim: a logout or an account deletion that releases
    /// the claim ends it, and so do a password change and [`StoreCommand::RevokeResumption`].
    #[serde(default)]
    pub resume_secret: Option<ResumeSecret>,
}

/// A resumption secret as the store keeps it: never the secret itself.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeSecret {
    /// `route::resumption::secret_hash` of the secret (SHA-256, bound to the user).
    pub hash: [u8; 32],
    /// The secret is refused from then on (the route's wall clock when it issued it, plus
    /// the configured lifetime).
    pub expires_at: UnixMillis,
}

/// Everything the store knows about a user's claims.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct ClaimState {
    /// The highest epoch ever issued to this user (0 = never logged in). Survives the claim.
    pub epoch: Epoch,
    /// The current claim, if any; it may have expired (compare `lease_until` with now).
    pub claim: Option<Claim>,
    /// The claim was last written by another store incarnation (a restarted Redis, or a
    /// replica promoted after its master died), which may have lost later logins: its lease
    /// and tokens can be older than what the user's client holds. A login that proves the
    /// account may take it over (`decide_login`); the replace then raises the counter first.
    /// Reported by `LoadClaim` only (false elsewhere).
    #[serde(default)]
    pub foreign: bool,
}

/// Where a user's session lives, as written by the server that holds it.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RouteRecord {
    pub server: ServerId,
    pub epoch: Epoch,
}

/// One message as stored in a conversation's log.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub conv: ConvId,
    pub log_epoch: LogEpoch,
    pub seq: u64,
    pub sender: UserId,
    pub msg_id: ClientMsgId,
    pub body: Bytes,
    pub appended_at: UnixMillis,
}

/// A conversation's log bounds and a user's read cursor in it.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConvHead {
    pub conv: ConvId,
    pub log_epoch: LogEpoch,
    /// Seq of the newest message (0 = empty).
    pub head_seq: u64,
    /// Oldest seq still stored; below it the log was trimmed.
    pub first_available_seq: u64,
    /// The user's read cursor (0 = nothing read).
    pub cursor_seq: u64,
    /// The log epoch this log moved from (0 = it never moved): a store restart or master
    /// change found it written by another incarnation (the lost-tail rule,
    /// docs/design.md "Never the same name for two contents").
    #[serde(default)]
    pub carried_from: LogEpoch,
    /// The head seq the store still had when the log moved from `carried_from`: seqs
    /// `1..=carried_up_to` name the same contents under both epochs, new messages follow.
    #[serde(default)]
    pub carried_up_to: u64,
}

/// What a successful append tells the sender.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub message: StoredMessage,
    /// True when (sender, msg id) was already appended: the seq is the original one and
    /// nothing new was stored (the route must still push: the first push may have been lost).
    pub duplicate: bool,
    /// Who the push goes to, read in the append's own atomic step where the backend can, so
    /// the route needs no further store round trip before it pushes. `None`: not read (the
    /// conversation is `all`, or the keys live elsewhere, as users' route records do on a
    /// Redis Cluster); the route then reads them with `LoadMembers` / `LoadRoutes`.
    #[serde(default)]
    pub recipients: Option<Recipients>,
}

/// What an append read for its push, in the same atomic step (see [`Appended::recipients`]).
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Recipients {
    /// A group's members, sorted, as `LoadMembers` would answer at the append, and the
    /// version of the membership they are.
    Members {
        version: MembersVersion,
        members: Vec<UserId>,
    },
    /// A group's members are, at the append, still those of the version the append named
    /// ([`StoreCommand::Append`]'s `members_known`, echoed here): the store left them out.
    MembersUnchanged(MembersVersion),
    /// A private conversation's two users' route records (low, then high), as `LoadRoutes`
    /// would answer at the append.
    Routes(Vec<(UserId, Option<RouteRecord>)>),
}

/// Names one state of a group's membership, so a route can keep a group's member list and
/// have an append confirm it rather than send it again (1,000 member ids per message).
///
/// `changes` counts the group's membership changes: every create, join, leave and account
/// deletion that changed the members raises it in the same atomic step as the change. It
/// alone could name two memberships after a store restart that lost writes (the count
/// repeats with other members), so the version also holds the log epoch the append was
/// served under: a restart that may have lost writes moves the log to a fresh epoch before
/// anything is appended (the lost-tail rule), and with it every version named before.
#[derive(
    serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
pub struct MembersVersion {
    pub log_epoch: LogEpoch,
    pub changes: u64,
}

#[derive(
    serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, thiserror::Error,
)]
pub enum AppendError {
    #[error("the sender is not a member of the conversation")]
    NotMember,
    #[error("this message id was already used with a different body")]
    ConflictingRetry,
    #[error("no such conversation")]
    UnknownConversation,
    /// The message's `after` (an earlier message of its stream to this conversation) is
    /// not stored yet: appending this one now would put it before that one. Retryable.
    #[error("an earlier message of this sender is not stored yet")]
    OutOfOrder,
    /// A later message of the same stream to this conversation is already stored: this one
    /// can no longer be stored in order (its sender gave it up). Final.
    #[error("a later message of this sender is already stored")]
    Superseded,
}

/// Where a message stands in its sender's submission order (the wire `Send`'s `order_*`
/// fields). A conversation log keeps, per (sender, stream), the `seq` of the last message of
/// that stream it stored, `last` (0 if none or forgotten), and appends a new message only if
/// `seq > last` (else [`AppendError::Superseded`]) and `after <= last` (else
/// [`AppendError::OutOfOrder`]): so a stream's messages take conversation seqs in the order
/// of their `seq`, whatever order their appends arrive in. The record lives as long as the
/// idempotency records (at least the clients' outbox maximum age), refreshed by each append.
#[derive(
    serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
pub struct SendOrder {
    /// One run of one client: random, so two devices or two runs never share a counter.
    pub stream: u64,
    /// This message's number in its stream (from 1, across all conversations).
    pub seq: u64,
    /// The stream's previous message to this conversation that the client had not settled
    /// when it sent this one; 0 if none.
    pub after: u64,
}

impl SendOrder {
    /// The order carried by a wire `Send`; `None` for an unordered one (all fields 0, or a
    /// `seq` of 0, which no stream uses).
    pub fn from_send(send: &cim_proto::Send) -> Option<Self> {
        (send.order_seq != 0).then_some(Self {
            stream: send.order_stream,
            seq: send.order_seq,
            after: send.order_after,
        })
    }
}

/// An account's failed logins as the login throttle counts them (`login_throttle`). The
/// default (no record) is zero failures.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoginFailures {
    /// Failed (or not yet judged) logins since the last success, or since the record was
    /// forgotten.
    pub count: u32,
    /// When the last one was counted (the counting node's wall clock).
    pub last_at: UnixMillis,
}

/// Outcome of one lease refresh entry.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseRefresh {
    /// The claim still has this epoch and server; its lease now runs to the new deadline.
    Refreshed,
    /// A newer claim exists: the session must be kicked.
    Superseded { current: Epoch },
    /// No claim (released or expired): the session must be kicked.
    Gone,
    /// Not known: this user's part of the batch did not reach the store (on a Redis Cluster,
    /// the master of the user's slot did not answer while the others did). Nothing is
    /// proven for the session, exactly as if the whole refresh had failed: it is fenced at
    /// its deadline unless a later refresh proves it.
    Unknown,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum StoreCommand {
    /// Create an account with a fresh id. Names are unique.
    RegisterAccount {
        name: String,
        password_hash: String,
    },
    /// The account, `None` if there is none or it was deleted (a tombstone logs in,
    /// receives and sends nothing).
    LoadAccount {
        user: UserId,
    },
    /// The account whose name equals `name` ignoring ASCII case, `None` if there is none
    /// or it was deleted.
    LoadAccountByName {
        name: String,
    },
    /// Accounts with ids above `after`, ascending, at most `limit` (tombstones included,
    /// marked). Ids are never reused, so paging by id sees every account once.
    ListAccounts {
        after: UserId,
        limit: u32,
    },
    /// Replace an account's password hash (admin reset), and revoke its resumption secret
    /// (a stolen secret must not outlive the password change). `found: false` for an
    /// unknown or deleted account.
    SetPassword {
        user: UserId,
        password_hash: String,
    },
    /// Tombstone an account: from now on it cannot log in, no message to or from it is
    /// appended (private conversations with it are `UnknownConversation`, `all` and groups
    /// `NotMember`), it is no longer a member of any group, its claim and route record are
    /// released and its failed-login record forgotten. Its id is never issued again and its
    /// name stays taken (a later registration of it is `NameTaken`); `LoadNames` still
    /// names it, so old messages keep their sender. Idempotent.
    DeleteAccount {
        user: UserId,
    },
    /// The account names of these users, in the order asked (`None` for an id without an
    /// account). For display (`POST /userNames`): nothing secret, and no atomicity across
    /// users is needed (a name never changes once registered).
    LoadNames {
        users: Vec<UserId>,
    },
    LoadClaim {
        user: UserId,
    },
    /// Compare-epoch: only if the user's epoch counter still equals `expected`, set it to
    /// `claim.epoch` (which must be greater) and store `claim`. Login and takeover.
    ReplaceClaim {
        user: UserId,
        expected: Epoch,
        claim: Claim,
    },
    /// [`Self::ReplaceClaim`] for a resumption: also only if the current claim still holds
    /// the resumption secret whose hash is `secret` (so the secret is used once, and a
    /// revocation between the route's check and this write wins). `Err` like `ReplaceClaim`.
    ResumeClaim {
        user: UserId,
        expected: Epoch,
        secret: [u8; 32],
        claim: Claim,
    },
    /// Drop the user's resumption secret, if any (the claim stays: the session goes on, but
    /// its next login needs the password).
    RevokeResumption {
        user: UserId,
    },
    /// Compare-epoch end of a session whose connection closed (a server's cleanup): only if
    /// the stored claim has exactly `epoch`, its lease ends now (it is lapsed: a new login
    /// is fresh, no route reads it) and the route record is deleted; the claim record — its
    /// resume token and resumption secret — stays, so its client re-homes without the
    /// password. Answers [`StoreReply::ClaimReleased`].
    ExpireClaim {
        user: UserId,
        epoch: Epoch,
    },
    /// Compare-epoch delete of the claim and the route record (logout, cleanup). Removes
    /// nothing unless the current claim's epoch is exactly `epoch`.
    ReleaseClaim {
        user: UserId,
        epoch: Epoch,
    },
    /// The server's step before LoginOk: only if the live claim has exactly this epoch and
    /// server, write the route record and extend the lease to `lease_until`.
    BindSession {
        user: UserId,
        epoch: Epoch,
        server: ServerId,
        lease_until: UnixMillis,
    },
    /// Extend the leases of a server's sessions, each compare-epoch.
    RefreshLeases {
        server: ServerId,
        lease_until: UnixMillis,
        sessions: Vec<(UserId, Epoch)>,
    },
    /// The route records of these users (absent ones are offline).
    LoadRoutes {
        users: Vec<UserId>,
    },
    /// Members of a group (all users for `All` is not listable: the route broadcasts).
    LoadMembers {
        conv: ConvId,
    },
    /// Idempotent append, see `conv_log`; ordered within the sender's stream when `order`
    /// is given (see [`SendOrder`]).
    Append {
        conv: ConvId,
        sender: UserId,
        msg_id: ClientMsgId,
        body: Bytes,
        now: UnixMillis,
        order: Option<SendOrder>,
        /// For a group: the membership whose member list the caller holds. If the members
        /// are still those at the append, the reply says [`Recipients::MembersUnchanged`]
        /// instead of listing them.
        #[serde(default)]
        members_known: Option<MembersVersion>,
    },
    /// The user's conversations with their heads and the user's cursors. A sharded store
    /// that could read some of them but not others (a dead master) answers
    /// [`StoreReply::PartialHeads`]; one that could read none fails.
    LoadHeads {
        user: UserId,
    },
    /// Messages after `after_seq` (at most `limit`), if the log still has `log_epoch`.
    Fetch {
        user: UserId,
        conv: ConvId,
        log_epoch: LogEpoch,
        after_seq: u64,
        limit: u32,
    },
    /// Move read cursors forward (never backward; a different log epoch resets).
    AdvanceCursors {
        user: UserId,
        cursors: Vec<(ConvId, LogEpoch, u64)>,
    },
    CreateGroup {
        conv: ConvId,
        owner: UserId,
    },
    JoinGroup {
        conv: ConvId,
        user: UserId,
    },
    LeaveGroup {
        conv: ConvId,
        user: UserId,
    },
    /// Users online now (`GET /onlineUser`): those whose route record belongs to their
    /// current live claim (as `LoadRoutes` judges it) and who have an account. At most
    /// `limit` entries, sorted by user id; when more are online, which ones are listed is
    /// up to the backend (Redis stops scanning once it has enough).
    ListOnline {
        limit: u32,
    },
    /// Compare-and-count one failed login of `user` (the login throttle, shared by every
    /// route): only if the record's count still equals `expected`, add one and set
    /// `last_at` to now. A record whose `last_at + forget_after <= now` counts as empty
    /// (zero failures) and its storage is reclaimed by then.
    CountLoginFailure {
        user: UserId,
        expected: u32,
        forget_after: std::time::Duration,
    },
    /// Forget `user`'s failed logins (a login that passed the throttle succeeded).
    ClearLoginFailures {
        user: UserId,
    },
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum StoreReply {
    AccountRegistered(Result<UserId, NameTaken>),
    Account(Option<Account>),
    Accounts(Vec<AccountSummary>),
    PasswordSet {
        found: bool,
    },
    /// `None`: no such account (never registered).
    AccountDeleted(Option<Deleted>),
    Names(Vec<(UserId, Option<String>)>),
    Claim(ClaimState),
    /// `Ok` carries the claim that was replaced, as it stood at that moment (its lease may
    /// have been refreshed since it was loaded); `Err` carries the state that won the race.
    ClaimReplaced(Result<Option<Claim>, ClaimState>),
    ClaimReleased {
        released: bool,
    },
    /// [`StoreCommand::RevokeResumption`]: whether a secret was there to drop.
    ResumptionRevoked {
        revoked: bool,
    },
    /// `Err` carries the current epoch (the ticket's epoch was superseded or the claim gone).
    SessionBound(Result<(), Epoch>),
    LeasesRefreshed(Vec<(UserId, LeaseRefresh)>),
    Routes(Vec<(UserId, Option<RouteRecord>)>),
    Members(Vec<UserId>),
    Appended(Result<Appended, AppendError>),
    Heads(Vec<ConvHead>),
    /// `LoadHeads` on a sharded store with a shard down: the heads it could read, and the
    /// conversations it could not (whose absence from `heads` means nothing).
    PartialHeads {
        heads: Vec<ConvHead>,
        unavailable: Vec<ConvId>,
    },
    /// `head` describes the log now; `messages` is empty if the log epoch changed.
    Fetched {
        head: ConvHead,
        messages: Vec<StoredMessage>,
    },
    /// `Fetch` by a user who may not read the conversation (not a member of the group, not
    /// one of the two of a private conversation, no account for `all`): nothing about the
    /// conversation is told, not even its head.
    NotMember,
    CursorsAdvanced,
    /// Group created (`true`) or already existed (`false`).
    GroupCreated {
        created: bool,
    },
    /// Joined at this seq (history visible from it); `None` if no such group.
    GroupJoined(Option<u64>),
    GroupLeft {
        was_member: bool,
    },
    Online(Vec<OnlineEntry>),
    /// `Ok` carries the record after counting; `Err` the current record (the count was not
    /// `expected`: another attempt was counted first).
    LoginFailureCounted(Result<LoginFailures, LoginFailures>),
    LoginFailuresCleared,
}

/// One user of [`StoreReply::Online`].
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct OnlineEntry {
    pub user: UserId,
    pub name: String,
    pub server: ServerId,
}

#[derive(
    serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, thiserror::Error,
)]
#[error("this user name is taken")]
pub struct NameTaken;

/// A store request that did not complete: the shell's timeout or a backend error. The
/// machine cannot know whether a write took effect, so every command is safe to retry.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct StoreUnavailable(pub String);

pub type StoreResult = Result<StoreReply, StoreUnavailable>;

/// A stored message as the wire carries it (Deliver, FetchAnswer, Push).
pub fn message_to_proto(message: &StoredMessage) -> cim_proto::Message {
    cim_proto::Message {
        conv: message.conv.to_string(),
        log_epoch: message.log_epoch.0,
        seq: message.seq,
        sender: message.sender.0,
        msg_id_hi: message.msg_id.hi(),
        msg_id_lo: message.msg_id.lo(),
        body: message.body.clone(),
        appended_at_ms: message.appended_at.0,
    }
}

/// A conversation head as the wire carries it (SyncAnswer, FetchAnswer).
pub fn head_to_proto(head: &ConvHead) -> cim_proto::ConvHead {
    cim_proto::ConvHead {
        conv: head.conv.to_string(),
        log_epoch: head.log_epoch.0,
        head_seq: head.head_seq,
        first_available_seq: head.first_available_seq,
        cursor_seq: head.cursor_seq,
        carried_from_epoch: head.carried_from.0,
        carried_up_to: head.carried_up_to,
    }
}
