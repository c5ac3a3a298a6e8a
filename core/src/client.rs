//! The client session: one user's login, connection, heartbeat, outbox and inbound delivery,
//! as a sans-IO machine. The client SDK, the console client, the simulation and the bench
//! all embed it; their shell does the route's HTTP, the TCP connection and the codec.
//!
//! The life of a session:
//!
//! ```text
//!  start ─► LoggingIn ──answer──► Connecting ──connected──► Authenticating ──LoginOk──► Online
//!               ▲   (route /login)      (TCP)                   (Login{ticket})           │
//!               │                                                                         │
//!               └────────── Backoff (full jitter) ◄── any loss (timeout, failure, kick) ◄─┘
//! ```
//!
//! On `Online` the session sends a `SyncRequest`, then resends every unacknowledged outbox
//! entry in order with its original id. Every re-login carries the resume token of the last
//! login answer, so a failover takes over the old claim at once, and the resumption secret
//! that came with it, so the route checks no password (`route::resumption`): a re-home costs
//! the route a hash, not an argon2 run, and the client need not keep the password. A refused
//! resumption (the secret was used, revoked or expired) falls back to the password when the
//! configuration has one, and otherwise stops with [`StopReason::PasswordNeeded`].
//!
//! Stopping for good: a [`KickReason::TakenOver`] kick means *another* login of this user
//! took the claim (this client's own re-logins only ever replace connections it already
//! gave up, and the shell reports nothing more about those). Logging in again would take it
//! back, and the other client would do the same, forever; so the session stops with
//! [`StopReason::TakenOver`] and lets the user decide (`start` again). Likewise for
//! [`KickReason::LoggedOut`], a login answered with `AccountMismatch`, and a route or server
//! with which TLS cannot work ([`StopReason::TlsFailed`]: an unknown issuer, a wrong host
//! name, an expired certificate, or a peer speaking plaintext where TLS was asked for or the
//! reverse, stays so however often it is tried).

mod backoff;
mod inbound;
mod outbox;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::Duration;

use crate::time::Instant;

use bytes::Bytes;
use cim_proto as proto;
use proto::frame::Kind;
pub use proto::{ErrorCode, KickReason};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub use outbox::OutboxEntry;

use crate::canary::Canaries;
use crate::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};
use crate::registry::ServerEndpoint;
use crate::route::login::{LoginAnswer, LoginError, LoginRequest, ResumeToken};
use crate::route::resumption::ResumptionSecret;
use crate::store::StoredMessage;
use inbound::{Inbound, InboundConfig, head_from_proto, message_from_proto};
use outbox::Outbox;

/// Settings of a [`ClientSession`]. [`ClientConfig::new`] gives the documented defaults.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub user: UserId,
    pub name: String,
    /// Empty when the client has no password: it logs in by resumption only (a state
    /// restored with a resumption secret), and stops with [`StopReason::PasswordNeeded`]
    /// if that is refused.
    pub password: String,
    /// Ping period while online (10 s). The server's `LoginOk` may ask for a shorter one.
    pub heartbeat_interval: Duration,
    /// A ping unanswered this long means the link is dead (5 s).
    pub heartbeat_timeout: Duration,
    /// Reconnect backoff: retry `n` (0-based) waits uniformly in `[0, min(cap, base * 2^n)]`.
    pub backoff_base: Duration,
    /// (200 ms base, 5 s cap.)
    pub backoff_cap: Duration,
    /// TCP connect (5 s).
    pub connect_timeout: Duration,
    /// The route's HTTP answer, and `LoginOk` after connecting, each (5 s). Also how long a
    /// sync or fetch may stay unanswered before another may be sent.
    pub login_timeout: Duration,
    /// How long a gap in a conversation may persist before it is fetched (300 ms).
    pub gap_sync_delay: Duration,
    /// Period of the head check that recovers a lost *last* push (30 s).
    pub head_check_interval: Duration,
    /// An unacknowledged message older than this is reported [`ClientEvent::Unknown`] and
    /// dropped (5 min). The store's idempotency TTL must be at least this, or a late resend
    /// could be appended twice.
    pub outbox_max_age: Duration,
    /// After a retryable `SendNack`, wait this long, then resend from the first unacked (1 s).
    pub send_retry_delay: Duration,
    /// DeliverAcks are batched over this window (200 ms).
    pub ack_delay: Duration,
    /// `limit` of each FetchRequest (100).
    pub fetch_limit: u32,
    /// Out-of-order messages kept per conversation while a gap is fetched (1024); beyond it
    /// pushes are dropped and fetched again.
    pub max_buffered: usize,
    /// Seeds the ChaCha8 RNG for message ids and backoff jitter. **Message ids must never
    /// repeat across runs of the same user** (the store would take a new message for a resend
    /// of an old one), so a real client seeds from the OS's entropy at every process start;
    /// fixed seeds are for tests and simulations.
    pub seed: u64,
    /// `Dedup` or `GapSync` off: the simulation's canaries (nothing outside canary builds).
    pub canaries: Canaries,
}

impl ClientConfig {
    pub fn new(
        user: UserId,
        name: impl Into<String>,
        password: impl Into<String>,
        seed: u64,
    ) -> Self {
        Self {
            user,
            name: name.into(),
            password: password.into(),
            heartbeat_interval: Duration::from_secs(10),
            heartbeat_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            login_timeout: Duration::from_secs(5),
            gap_sync_delay: Duration::from_millis(300),
            head_check_interval: Duration::from_secs(30),
            outbox_max_age: Duration::from_secs(5 * 60),
            send_retry_delay: Duration::from_secs(1),
            ack_delay: Duration::from_millis(200),
            fetch_limit: 100,
            max_buffered: 1024,
            seed,
            canaries: Canaries::NONE,
        }
    }
}

/// Correlates a [`ClientCommand::Login`] with its answer: an answer to an attempt the
/// session already gave up on (timed out) is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LoginAttempt(pub u64);

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientCommand {
    /// `POST /login` to the route; answer with [`ClientSession::handle_login_answer`].
    Login {
        attempt: LoginAttempt,
        request: LoginRequest,
    },
    /// Open a connection (TLS if the endpoint says so); answer with `handle_connected` or
    /// `handle_connect_failed`.
    Connect { endpoint: ServerEndpoint },
    /// Encode and write a frame on the current connection.
    Transmit(proto::Frame),
    /// Close the current connection (or abandon the connect in progress). The session has
    /// already given it up: report nothing more about it (no `handle_disconnected`, no
    /// frames read after this command).
    Disconnect,
}

/// Everything the session asks of its shell, from [`ClientSession::poll_output`].
#[derive(Debug, Clone, PartialEq)]
pub enum ClientOutput {
    /// Something to do, in order: a `Disconnect` closes the old connection before the next
    /// `Connect` opens a new one.
    Command(ClientCommand),
    /// Something to tell the application.
    Event(ClientEvent),
}

/// Why the session lost (or could not get) its connection to a server, carried by
/// [`ClientEvent::Reconnecting`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionLoss {
    LoginFailed(LoginFailure),
    /// The route did not answer within `login_timeout`.
    LoginTimeout,
    ConnectFailed,
    ConnectTimeout,
    /// Connected, but no `LoginOk` within `login_timeout`.
    LoginOkTimeout,
    Disconnected,
    /// No frame within `heartbeat_timeout` of a ping.
    HeartbeatTimeout,
    Kicked(KickReason),
    /// The server sent an `Error` frame (it closes the connection after one).
    ServerError {
        code: ErrorCode,
        message: String,
    },
}

/// Why the session stopped for good (until `start` is called again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Shutdown,
    /// Another login of this user took over; see the module docs.
    TakenOver,
    LoggedOut,
    AccountMismatch,
    /// TLS with the route or a server cannot work (its certificate did not verify, or one
    /// side speaks TLS and the other does not); see [`ClientEvent::TlsFailed`] for whose and
    /// why.
    TlsFailed,
    /// A resumption was refused (see [`LoginError::ResumeRefused`]) and the session has no
    /// password to fall back on: ask the user, [`ClientSession::set_password`], `start`.
    PasswordNeeded,
}

/// What the application is told.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    LoggingIn,
    Connecting {
        server: ServerId,
    },
    Online {
        server: ServerId,
        epoch: Epoch,
    },
    /// The next login starts after `delay`. `attempt` counts failures since the last
    /// `Online`, from 0; the delay was drawn from `[0, min(cap, base * 2^attempt)]`.
    Reconnecting {
        attempt: u32,
        delay: Duration,
        cause: ConnectionLoss,
    },
    Stopped(StopReason),
    /// The next message of a conversation, in seq order, exactly once.
    Message(StoredMessage),
    /// A sent message is stored under `(log_epoch, seq)`.
    Acked {
        msg_id: ClientMsgId,
        conv: ConvId,
        log_epoch: LogEpoch,
        seq: u64,
    },
    /// A sent message will never be stored (not a member, too large, ...).
    Rejected {
        msg_id: ClientMsgId,
        code: ErrorCode,
        reason: String,
    },
    /// No acknowledgement within `outbox_max_age`: it may or may not have been stored, and it
    /// is no longer resent.
    Unknown {
        msg_id: ClientMsgId,
    },
    /// Seqs `from_seq .. from_seq + count` were trimmed before this client got them.
    Unavailable {
        conv: ConvId,
        from_seq: u64,
        count: u64,
    },
    /// The conversation's log was recreated under a new log epoch that does not continue
    /// the old one (or moved more than once since this client was in it): whatever of the
    /// old epoch this client had not received is lost (a gap of unknown size); delivery
    /// restarts at the new log's beginning.
    LogReset {
        conv: ConvId,
        old_epoch: LogEpoch,
        new_epoch: LogEpoch,
    },
    /// The conversation's log moved to a new log epoch after a store restart or master
    /// change, carrying its messages over under their seqs: delivery continues after
    /// `continues_after` under `new_epoch`, nothing is handed over again. `lost` > 0: this
    /// client had already received the `lost` messages after `continues_after`, and the
    /// store lost them (show "N messages were lost"); new messages take their seqs. With
    /// `lost` = 0 nothing was lost and the application need do nothing.
    LogMoved {
        conv: ConvId,
        old_epoch: LogEpoch,
        new_epoch: LogEpoch,
        continues_after: u64,
        lost: u64,
    },
    Kicked(KickReason),
    /// A login failure that retrying will not fix; the session stops.
    LoginRejected(LoginError),
    /// TLS with `host` cannot work (`reason` in words: its certificate has an unknown
    /// issuer, a wrong name or has expired; or it speaks plaintext to this TLS client, or
    /// HTTPS only to this plaintext one). Retrying will not fix it; the session stops with
    /// [`StopReason::TlsFailed`].
    TlsFailed {
        host: String,
        reason: String,
    },
}

/// Counts of what a session recovered from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Gaps in a conversation (a push lost or late) that waited out `gap_sync_delay` and
    /// were fetched from the store.
    pub gap_fetches: u64,
}

/// A failed `POST /login`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginFailure {
    #[error(transparent)]
    Rejected(#[from] LoginError),
    /// No usable HTTP answer (connection refused, bad body, ...).
    #[error("login request failed: {0}")]
    Transport(String),
    /// TLS with the route cannot work (its certificate did not verify, or the scheme is
    /// the wrong one): permanent, the session stops.
    #[error("TLS with {host} cannot work: {reason}")]
    Tls { host: String, reason: String },
}

/// A frame the session ignored. Its state did not change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame without content")]
    Empty,
    #[error("no connection is up to receive frames")]
    NotConnected,
    #[error("{0} frame not expected from a server in this state")]
    Unexpected(&'static str),
    #[error("bad conversation id {0:?}")]
    BadConversation(String),
    #[error("message with seq 0")]
    ZeroSeq,
    #[error("frame without its message or head")]
    MissingField,
}

/// Deadlines, see [`ClientSession::poll_timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TimerReason {
    LoginTimeout,
    ConnectTimeout,
    LoginOkTimeout,
    Backoff,
    Ping,
    PongTimeout,
    HeadCheck,
    DeliverAck,
    SendRetry,
    /// A gap's fetch, or asking again after an incomplete sync answer.
    GapSync,
    OutboxExpiry,
}

/// What the console client persists between runs. Plain data; the shell picks the format.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientState {
    pub resume_token: Option<ResumeToken>,
    /// The resumption secret that goes with `resume_token`: a credential (keep it private).
    pub resume_secret: Option<ResumptionSecret>,
    /// In send order.
    pub outbox: Vec<SavedMessage>,
    pub convs: Vec<SavedConv>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedMessage {
    pub id: ClientMsgId,
    pub conv: ConvId,
    pub body: Bytes,
    /// Wall clock, so time spent not running counts towards `outbox_max_age`.
    pub created_at: UnixMillis,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedConv {
    pub conv: ConvId,
    pub log_epoch: LogEpoch,
    /// The last seq handed to the application.
    pub delivered: u64,
}

#[derive(Debug, Default)]
struct Outputs {
    commands: VecDeque<ClientCommand>,
    events: VecDeque<ClientEvent>,
}

impl Outputs {
    fn transmit(&mut self, kind: Kind) {
        self.commands
            .push_back(ClientCommand::Transmit(proto::Frame { kind: Some(kind) }));
    }
}

#[derive(Debug)]
enum Link {
    Idle,
    LoggingIn {
        attempt: LoginAttempt,
        deadline: Instant,
    },
    Connecting {
        ticket: proto::Ticket,
        deadline: Instant,
    },
    Authenticating {
        deadline: Instant,
    },
    Online {
        next_ping: Instant,
        /// Set by a ping, cleared by any frame from the server.
        pong_deadline: Option<Instant>,
        next_head_check: Instant,
        interval: Duration,
    },
    Backoff {
        until: Instant,
    },
    Stopped,
}

/// One user's client session, sans I/O.
///
/// Inputs: [`start`](Self::start), [`send`](Self::send), [`shutdown`](Self::shutdown),
/// `handle_login_answer`, `handle_connected` / `handle_connect_failed` /
/// `handle_disconnected`, [`handle_frame`](Self::handle_frame),
/// [`handle_timeout`](Self::handle_timeout). **After each input, drain
/// [`poll_output`](Self::poll_output) until it returns `None`, executing commands in
/// order**, then arm a timer for [`poll_timeout`](Self::poll_timeout). Commands must run in
/// order: a `Disconnect` closes the old connection before the next `Connect` opens a new
/// one. Commands come before events (see `poll_output`).
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    rng: ChaCha8Rng,
    link: Link,
    /// Failures since the last `Online`.
    attempt: u32,
    next_login_attempt: u64,
    next_nonce: u64,
    resume_token: Option<ResumeToken>,
    /// The secret of the last login answer; `None` before one, or once refused.
    resume_secret: Option<ResumptionSecret>,
    outbox: Outbox,
    /// Set by a retryable nack: sends wait, then everything is resent in order.
    send_retry_at: Option<Instant>,
    inbound: Inbound,
    ack_at: Option<Instant>,
    out: Outputs,
}

/// The session's order stream (see `outbox`): random per session, so a restarted client or
/// another device of the same user never continues a counter the store remembers. Drawn
/// from a stream of its own, so it does not shift the session's other draws.
pub(crate) fn order_stream(seed: u64) -> u64 {
    ChaCha8Rng::seed_from_u64(seed ^ 0x0bde_5eed_0bde_5eed).random::<u64>()
}

impl ClientSession {
    pub fn new(config: ClientConfig) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        let order = order_stream(config.seed);
        Self::with_rng(config, rng, order)
    }

    /// A session whose RNG is seeded with 256 bits of entropy instead of
    /// [`ClientConfig::seed`] (which it ignores): the browser shell's seed from
    /// `crypto.getRandomValues`. The order stream is the RNG's first draw, so it too is new
    /// in every run.
    pub fn with_entropy(config: ClientConfig, seed: [u8; 32]) -> Self {
        let mut rng = ChaCha8Rng::from_seed(seed);
        let order = rng.random::<u64>();
        Self::with_rng(config, rng, order)
    }

    fn with_rng(config: ClientConfig, rng: ChaCha8Rng, order: u64) -> Self {
        let inbound = Inbound::new(InboundConfig {
            gap_sync_delay: config.gap_sync_delay,
            fetch_limit: config.fetch_limit,
            max_buffered: config.max_buffered,
            request_timeout: config.login_timeout,
            incomplete_sync_retry: config.send_retry_delay,
            canaries: config.canaries,
        });
        Self {
            rng,
            outbox: Outbox::new(order),
            config,
            link: Link::Idle,
            attempt: 0,
            next_login_attempt: 0,
            next_nonce: 0,
            resume_token: None,
            resume_secret: None,
            send_retry_at: None,
            inbound,
            ack_at: None,
            out: Outputs::default(),
        }
    }

    /// A session resuming what an earlier run persisted with [`snapshot`](Self::snapshot).
    /// Outbox entries already past `outbox_max_age` (by the wall clock) are reported
    /// `Unknown` at once. Not started: call `start`.
    pub fn restore(
        config: ClientConfig,
        state: ClientState,
        now: Instant,
        wall: UnixMillis,
    ) -> Self {
        Self::new(config).restored(state, now, wall)
    }

    /// [`restore`](Self::restore) for a session made with [`with_entropy`](Self::with_entropy).
    pub fn restore_with_entropy(
        config: ClientConfig,
        seed: [u8; 32],
        state: ClientState,
        now: Instant,
        wall: UnixMillis,
    ) -> Self {
        Self::with_entropy(config, seed).restored(state, now, wall)
    }

    fn restored(self, state: ClientState, now: Instant, wall: UnixMillis) -> Self {
        let mut session = self;
        session.resume_token = state.resume_token;
        // A secret without its token proves nothing; keep neither half alone.
        if session.resume_token.is_some() {
            session.resume_secret = state.resume_secret;
        }
        for saved in state.outbox {
            let age = Duration::from_millis(wall.0.saturating_sub(saved.created_at.0));
            if age >= session.config.outbox_max_age {
                session
                    .out
                    .events
                    .push_back(ClientEvent::Unknown { msg_id: saved.id });
                continue;
            }
            // Renumbered in this session's stream, in the saved order. One the store already
            // holds under the old stream answers as a duplicate, which moves the new
            // stream's record past it.
            session.outbox.push(
                saved.id,
                saved.conv,
                saved.body,
                // Early in a process `now` may be closer to the platform's epoch than `age`;
                // then the entry just counts as new.
                now.checked_sub(age).unwrap_or(now),
            );
        }
        for saved in state.convs {
            session
                .inbound
                .restore(now, saved.conv, saved.log_epoch, saved.delivered);
        }
        session
    }

    /// Counts of what the session recovered from, for metrics and the simulation.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            gap_fetches: self.inbound.stats.gap_fetches,
        }
    }

    /// What to persist: the resume token, the outbox, and each conversation's position.
    pub fn snapshot(&self, now: Instant, wall: UnixMillis) -> ClientState {
        ClientState {
            resume_token: self.resume_token.clone(),
            resume_secret: self.resume_secret.clone(),
            outbox: self
                .outbox
                .iter()
                .map(|e| SavedMessage {
                    id: e.id,
                    conv: e.conv.clone(),
                    body: e.body.clone(),
                    created_at: UnixMillis(wall.0.saturating_sub(
                        now.saturating_duration_since(e.created_at).as_millis() as u64,
                    )),
                })
                .collect(),
            convs: self
                .inbound
                .positions()
                .map(|(conv, log_epoch, delivered)| SavedConv {
                    conv: conv.clone(),
                    log_epoch,
                    delivered,
                })
                .collect(),
        }
    }

    pub fn is_online(&self) -> bool {
        matches!(self.link, Link::Online { .. })
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self.link, Link::Stopped)
    }

    /// Messages sent and not yet acknowledged, rejected or expired.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// Begins logging in. No effect unless idle or stopped.
    /// The password to log in with when resumption is refused (after
    /// [`StopReason::PasswordNeeded`], before `start` again).
    pub fn set_password(&mut self, password: impl Into<String>) {
        self.config.password = password.into();
    }

    /// Whether the session holds a resumption secret (its next login needs no password).
    pub fn has_resume_secret(&self) -> bool {
        self.resume_secret.is_some()
    }

    pub fn start(&mut self, now: Instant) {
        if matches!(self.link, Link::Idle | Link::Stopped) {
            self.attempt = 0;
            self.begin_login(now);
        }
    }

    /// Closes the session: flushes pending DeliverAcks if online, then disconnects. The
    /// outbox is kept (see `snapshot`).
    pub fn shutdown(&mut self, now: Instant) {
        let _ = now;
        match self.link {
            Link::Idle | Link::Stopped => return,
            Link::Online { .. } => {
                self.flush_acks();
                self.out.commands.push_back(ClientCommand::Disconnect);
            }
            Link::Connecting { .. } | Link::Authenticating { .. } => {
                self.out.commands.push_back(ClientCommand::Disconnect);
            }
            Link::LoggingIn { .. } | Link::Backoff { .. } => {}
        }
        self.stop(StopReason::Shutdown);
    }

    /// Queues a message; it is sent at once if online, otherwise on the next `Online`.
    pub fn send(&mut self, now: Instant, conv: ConvId, body: Bytes) -> ClientMsgId {
        let id = ClientMsgId(self.rng.random::<u128>());
        let go = self.outbox.push(id, conv, body, now);
        if go && self.may_transmit() {
            self.transmit_entry(id);
        }
        id
    }

    pub fn handle_login_answer(
        &mut self,
        now: Instant,
        attempt: LoginAttempt,
        answer: Result<LoginAnswer, LoginFailure>,
    ) {
        match self.link {
            Link::LoggingIn {
                attempt: current, ..
            } if current == attempt => {}
            _ => return,
        }
        match answer {
            Ok(answer) => {
                // The claim now holds this token's hash; the previous one proves nothing.
                // Likewise the secret: the one presented (if any) was used up.
                self.resume_token = Some(answer.resume_token);
                self.resume_secret = answer.resume_secret;
                self.out.commands.push_back(ClientCommand::Connect {
                    endpoint: answer.server.client_endpoint(),
                });
                self.out.events.push_back(ClientEvent::Connecting {
                    server: answer.server.id,
                });
                self.link = Link::Connecting {
                    ticket: answer.ticket,
                    deadline: now + self.config.connect_timeout,
                };
            }
            Err(LoginFailure::Rejected(LoginError::AccountMismatch)) => {
                self.out
                    .events
                    .push_back(ClientEvent::LoginRejected(LoginError::AccountMismatch));
                self.stop(StopReason::AccountMismatch);
            }
            Err(LoginFailure::Tls { host, reason }) => {
                self.out
                    .events
                    .push_back(ClientEvent::TlsFailed { host, reason });
                self.stop(StopReason::TlsFailed);
            }
            Err(LoginFailure::Rejected(LoginError::ResumeRefused)) => {
                // Retrying the secret can only be refused again (and counted against the
                // account): drop it, and log in with the password at once if there is one.
                self.resume_secret = None;
                if self.config.password.is_empty() {
                    self.out
                        .events
                        .push_back(ClientEvent::LoginRejected(LoginError::ResumeRefused));
                    self.stop(StopReason::PasswordNeeded);
                } else {
                    self.begin_login(now);
                }
            }
            // Repeat login (the old claim's lease has yet to run out), no server, store
            // trouble, transport: all may pass.
            Err(failure) => self.lose(now, ConnectionLoss::LoginFailed(failure), false),
        }
    }

    pub fn handle_connected(&mut self, now: Instant) {
        let Link::Connecting { ticket, .. } = &self.link else {
            return;
        };
        let login = proto::Login {
            ticket: Some(ticket.clone()),
        };
        self.out.transmit(Kind::Login(login));
        self.link = Link::Authenticating {
            deadline: now + self.config.login_timeout,
        };
    }

    pub fn handle_connect_failed(&mut self, now: Instant) {
        if matches!(self.link, Link::Connecting { .. }) {
            self.lose(now, ConnectionLoss::ConnectFailed, false);
        }
    }

    /// The connection attempt failed for good: TLS with the server cannot work (its
    /// certificate did not verify, or it does not speak TLS).
    /// Unlike [`handle_connect_failed`](Self::handle_connect_failed) this stops the session
    /// (see [`StopReason::TlsFailed`]). Ignored unless connecting.
    pub fn handle_tls_failed(&mut self, now: Instant, host: String, reason: String) {
        let _ = now;
        if matches!(self.link, Link::Connecting { .. }) {
            self.out
                .events
                .push_back(ClientEvent::TlsFailed { host, reason });
            self.stop(StopReason::TlsFailed);
        }
    }

    pub fn handle_disconnected(&mut self, now: Instant) {
        if matches!(
            self.link,
            Link::Connecting { .. } | Link::Authenticating { .. } | Link::Online { .. }
        ) {
            self.lose(now, ConnectionLoss::Disconnected, false);
        }
    }

    /// One frame from the server. Frames that make no sense are ignored with an error; the
    /// server is trusted to close the connection after an `Error` frame, and so does this
    /// session.
    pub fn handle_frame(&mut self, now: Instant, frame: proto::Frame) -> Result<(), FrameError> {
        let kind = frame.kind.ok_or(FrameError::Empty)?;
        match &mut self.link {
            Link::Online { pong_deadline, .. } => {
                // Any frame proves the link alive: a pong queued behind a burst of
                // deliveries is late, not lost.
                *pong_deadline = None;
            }
            Link::Authenticating { .. } => return self.handle_frame_authenticating(now, kind),
            _ => return Err(FrameError::NotConnected),
        }
        match kind {
            Kind::Pong(_) => {}
            Kind::SendAck(ack) => {
                let id = ClientMsgId::from_halves(ack.msg_id_hi, ack.msg_id_lo);
                if let Some((entry, released)) = self.outbox.remove(id) {
                    self.out.events.push_back(ClientEvent::Acked {
                        msg_id: id,
                        conv: entry.conv,
                        log_epoch: LogEpoch(ack.log_epoch),
                        seq: ack.seq,
                    });
                    self.transmit_released(released);
                }
            }
            Kind::SendNack(nack) => {
                let id = ClientMsgId::from_halves(nack.msg_id_hi, nack.msg_id_lo);
                if nack.retryable && nack.code() == ErrorCode::OutOfOrder {
                    // Overtaken an earlier message of its conversation at the store: wait
                    // for that one's answer (or send again now if it came already).
                    let again = self.outbox.refused_out_of_order(id);
                    self.transmit_released(again);
                } else if nack.retryable {
                    if self.outbox.contains(id) && self.send_retry_at.is_none() {
                        self.send_retry_at = Some(now + self.config.send_retry_delay);
                    }
                } else if let Some((_, released)) = self.outbox.remove(id) {
                    self.out.events.push_back(ClientEvent::Rejected {
                        msg_id: id,
                        code: nack.code(),
                        reason: nack.reason,
                    });
                    self.transmit_released(released);
                }
            }
            Kind::Deliver(deliver) => {
                let msg = deliver.message.ok_or(FrameError::MissingField)?;
                let msg = message_from_proto(msg)?;
                self.inbound.on_deliver(now, msg, &mut self.out);
            }
            Kind::SyncAnswer(answer) => {
                // A head the session cannot parse is a server bug; the others still count.
                let heads = answer
                    .heads
                    .into_iter()
                    .filter_map(|h| head_from_proto(h).ok())
                    .collect();
                self.inbound.on_sync_page(
                    now,
                    heads,
                    answer.more,
                    answer.incomplete,
                    &mut self.out,
                );
            }
            Kind::FetchAnswer(answer) => {
                let head = answer.head.ok_or(FrameError::MissingField)?;
                let head = head_from_proto(head)?;
                let messages = answer
                    .messages
                    .into_iter()
                    .filter_map(|m| message_from_proto(m).ok())
                    .collect();
                self.inbound
                    .on_fetch_answer(now, head, messages, &mut self.out);
            }
            Kind::Kick(kick) => self.kicked(now, kick.reason()),
            Kind::Error(error) => {
                let loss = ConnectionLoss::ServerError {
                    code: error.code(),
                    message: error.message,
                };
                self.lose(now, loss, true);
            }
            other => return Err(FrameError::Unexpected(Kind::name(&other))),
        }
        self.arm_ack(now);
        Ok(())
    }

    fn handle_frame_authenticating(&mut self, now: Instant, kind: Kind) -> Result<(), FrameError> {
        match kind {
            Kind::LoginOk(ok) => {
                self.go_online(now, ok);
                Ok(())
            }
            Kind::Kick(kick) => {
                self.kicked(now, kick.reason());
                Ok(())
            }
            Kind::Error(error) => {
                let loss = ConnectionLoss::ServerError {
                    code: error.code(),
                    message: error.message,
                };
                self.lose(now, loss, true);
                Ok(())
            }
            other => Err(FrameError::Unexpected(Kind::name(&other))),
        }
    }

    fn go_online(&mut self, now: Instant, ok: proto::LoginOk) {
        let server = ServerId::new(ok.server_id);
        // Ping at least as often as the server's idle reaper expects.
        let asked = Duration::from_millis(ok.heartbeat_interval_ms);
        let interval = if asked.is_zero() {
            self.config.heartbeat_interval
        } else {
            asked.min(self.config.heartbeat_interval)
        };
        self.attempt = 0;
        self.link = Link::Online {
            next_ping: now + interval,
            pong_deadline: None,
            next_head_check: now + self.config.head_check_interval,
            interval,
        };
        self.out.events.push_back(ClientEvent::Online {
            server,
            epoch: Epoch(ok.epoch),
        });
        self.inbound.request_sync(now, &mut self.out);
        self.resend_outbox();
        self.arm_ack(now);
    }

    fn kicked(&mut self, now: Instant, reason: KickReason) {
        self.out.events.push_back(ClientEvent::Kicked(reason));
        match reason {
            KickReason::TakenOver => {
                self.out.commands.push_back(ClientCommand::Disconnect);
                self.stop(StopReason::TakenOver);
            }
            KickReason::LoggedOut => {
                self.out.commands.push_back(ClientCommand::Disconnect);
                self.stop(StopReason::LoggedOut);
            }
            _ => self.lose(now, ConnectionLoss::Kicked(reason), true),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let (expired, released) = self.outbox.expire(now, self.config.outbox_max_age);
        for msg_id in expired {
            self.out.events.push_back(ClientEvent::Unknown { msg_id });
        }
        self.transmit_released(released);
        match &mut self.link {
            Link::Idle | Link::Stopped => {}
            Link::LoggingIn { deadline, .. } => {
                if *deadline <= now {
                    self.lose(now, ConnectionLoss::LoginTimeout, false);
                }
            }
            Link::Connecting { deadline, .. } => {
                if *deadline <= now {
                    self.lose(now, ConnectionLoss::ConnectTimeout, true);
                }
            }
            Link::Authenticating { deadline } => {
                if *deadline <= now {
                    self.lose(now, ConnectionLoss::LoginOkTimeout, true);
                }
            }
            Link::Backoff { until } => {
                if *until <= now {
                    self.begin_login(now);
                }
            }
            Link::Online {
                next_ping,
                pong_deadline,
                next_head_check,
                interval,
            } => {
                if pong_deadline.is_some_and(|at| at <= now) {
                    self.lose(now, ConnectionLoss::HeartbeatTimeout, true);
                    return;
                }
                let mut sync = false;
                if *next_ping <= now {
                    // A fixed schedule; after a long stall (a suspended laptop) skip the
                    // missed pings rather than burst them.
                    *next_ping += *interval;
                    if *next_ping <= now {
                        *next_ping = now + *interval;
                    }
                    if pong_deadline.is_none() {
                        *pong_deadline = Some(now + self.config.heartbeat_timeout);
                    }
                    self.next_nonce += 1;
                    let nonce = self.next_nonce;
                    self.out.transmit(Kind::Ping(proto::Ping { nonce }));
                }
                if *next_head_check <= now {
                    *next_head_check = now + self.config.head_check_interval;
                    sync = true;
                }
                if sync {
                    self.inbound.request_sync(now, &mut self.out);
                }
                if self.ack_at.is_some_and(|at| at <= now) {
                    self.ack_at = None;
                    self.flush_acks();
                }
                if self.send_retry_at.is_some_and(|at| at <= now) {
                    self.send_retry_at = None;
                    self.resend_outbox();
                }
                self.inbound.on_timeout(now, &mut self.out);
                self.arm_ack(now);
            }
        }
    }

    /// The next deadline and why.
    pub fn poll_timeout(&self) -> Option<(Instant, TimerReason)> {
        let mut timers: Vec<(Instant, TimerReason)> = Vec::new();
        if let Some(at) = self.outbox.next_expiry(self.config.outbox_max_age) {
            timers.push((at, TimerReason::OutboxExpiry));
        }
        match &self.link {
            Link::Idle | Link::Stopped => {}
            Link::LoggingIn { deadline, .. } => timers.push((*deadline, TimerReason::LoginTimeout)),
            Link::Connecting { deadline, .. } => {
                timers.push((*deadline, TimerReason::ConnectTimeout));
            }
            Link::Authenticating { deadline } => {
                timers.push((*deadline, TimerReason::LoginOkTimeout));
            }
            Link::Backoff { until } => timers.push((*until, TimerReason::Backoff)),
            Link::Online {
                next_ping,
                pong_deadline,
                next_head_check,
                ..
            } => {
                timers.push((*next_ping, TimerReason::Ping));
                if let Some(at) = pong_deadline {
                    timers.push((*at, TimerReason::PongTimeout));
                }
                timers.push((*next_head_check, TimerReason::HeadCheck));
                if let Some(at) = self.ack_at {
                    timers.push((at, TimerReason::DeliverAck));
                }
                if let Some(at) = self.send_retry_at {
                    timers.push((at, TimerReason::SendRetry));
                }
                if let Some(at) = self.inbound.next_timeout() {
                    timers.push((at, TimerReason::GapSync));
                }
            }
        }
        timers.into_iter().min()
    }

    /// The next output: every queued command, then the events. The shells have always
    /// drained in this order (the simulation's recorded histories pin it): frames and
    /// connection changes go out before the application hears what caused them, and a
    /// command whose execution feeds the session an input (a full write queue is a lost
    /// connection) has that input's commands come out before the older events too.
    pub fn poll_output(&mut self) -> Option<ClientOutput> {
        if let Some(command) = self.poll_command() {
            return Some(ClientOutput::Command(command));
        }
        self.poll_event().map(ClientOutput::Event)
    }

    // The two kinds `poll_output` gives, in its order. Private: shells drain only
    // `poll_output`; this module's tables read one kind at a time.
    fn poll_command(&mut self) -> Option<ClientCommand> {
        self.out.commands.pop_front()
    }

    fn poll_event(&mut self) -> Option<ClientEvent> {
        self.out.events.pop_front()
    }

    fn begin_login(&mut self, now: Instant) {
        self.next_login_attempt += 1;
        let attempt = LoginAttempt(self.next_login_attempt);
        // A first login presents a token of the client's own making. Should its answer be
        // lost, the retry presents the same one, and any route recognizes the claim that
        // login made as this client's (its token derives from the one presented) instead
        // of refusing a repeat login until the claim's lease runs out.
        let rng = &mut self.rng;
        let resume_token = self
            .resume_token
            .get_or_insert_with(|| ResumeToken(rng.random()))
            .clone();
        self.out.commands.push_back(ClientCommand::Login {
            attempt,
            request: LoginRequest {
                user: self.config.user,
                name: self.config.name.clone(),
                // Not sent alongside a secret: the route would not look at it.
                password: if self.resume_secret.is_some() {
                    String::new()
                } else {
                    self.config.password.clone()
                },
                resume_token: Some(resume_token),
                resume_secret: self.resume_secret.clone(),
            },
        });
        self.out.events.push_back(ClientEvent::LoggingIn);
        self.link = Link::LoggingIn {
            attempt,
            deadline: now + self.config.login_timeout,
        };
    }

    /// Gives up the current attempt or connection and schedules the next login.
    fn lose(&mut self, now: Instant, cause: ConnectionLoss, disconnect: bool) {
        if disconnect {
            self.out.commands.push_back(ClientCommand::Disconnect);
        }
        self.drop_link_state();
        let attempt = self.attempt;
        let delay = backoff::delay(
            &mut self.rng,
            self.config.backoff_base,
            self.config.backoff_cap,
            attempt,
        );
        self.attempt = self.attempt.saturating_add(1);
        self.out.events.push_back(ClientEvent::Reconnecting {
            attempt,
            delay,
            cause,
        });
        self.link = Link::Backoff { until: now + delay };
    }

    fn stop(&mut self, reason: StopReason) {
        self.drop_link_state();
        self.link = Link::Stopped;
        self.out.events.push_back(ClientEvent::Stopped(reason));
    }

    /// What only makes sense on one connection: in-flight syncs and fetches, the retry hold
    /// (the next `Online` resends everything anyway), the ack batch (re-armed when online).
    fn drop_link_state(&mut self) {
        self.inbound.on_link_lost();
        self.send_retry_at = None;
        self.ack_at = None;
    }

    fn resend_outbox(&mut self) {
        for frame in self.outbox.resend_all() {
            self.out.commands.push_back(ClientCommand::Transmit(frame));
        }
    }

    /// Whether a send may go out now: online, and no retry hold (the retry resends
    /// everything in order anyway).
    fn may_transmit(&self) -> bool {
        self.is_online() && self.send_retry_at.is_none()
    }

    fn transmit_entry(&mut self, id: ClientMsgId) {
        if let Some(frame) = self.outbox.frame(id) {
            self.out.commands.push_back(ClientCommand::Transmit(frame));
        }
    }

    /// Sends the entries the outbox released from their hold, in order, if sends may go out
    /// now; otherwise the next `Online` or retry resends them with the rest.
    fn transmit_released(&mut self, frames: impl IntoIterator<Item = proto::Frame>) {
        if self.may_transmit() {
            for frame in frames {
                self.out.commands.push_back(ClientCommand::Transmit(frame));
            }
        }
    }

    fn arm_ack(&mut self, now: Instant) {
        if self.is_online() && self.ack_at.is_none() && self.inbound.has_unacked() {
            self.ack_at = Some(now + self.config.ack_delay);
        }
    }

    fn flush_acks(&mut self) {
        let cursors = self.inbound.take_cursors();
        if !cursors.is_empty() {
            self.out
                .transmit(Kind::DeliverAck(proto::DeliverAck { cursors }));
        }
    }
}
