//! The route's login machine: registration, login and logout (see [`RouteLogin`]). The
//! bearer and resume tokens it mints are in [`crate::route::bearer`].
//!
//! A login is a short chain of steps: `LoadAccount` -> argon2 check (a [`PasswordJob`] the
//! shell runs off its driver task) -> `LoadClaim` -> [`decide_login`] against the registry view -> balancer pick ->
//! `ReplaceClaim` (compare-epoch; a lost race re-decides against the winner, bounded) ->
//! ticket, bearer token and a fresh resume token.
//!
//! A takeover of a claim whose server is still live holds the answer until that server
//! confirms the old session is closed (or leaves the registry, or the old lease runs out),
//! so two sessions of one user never overlap in time.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::time::Instant;

use cim_proto::Ticket;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use subtle::ConstantTimeEq;

use crate::accounts::{self, HashError, PasswordParams, RegisterError};
use crate::ids::{Epoch, ServerId, UnixMillis, UserId};
use crate::login_throttle::LoginThrottle;
use crate::registry::LiveServer;
use crate::route::balance::Balancer;
use crate::route::claims::{LoginDecision, decide_login, is_live};
use crate::route::resumption::{self, ResumptionSecret};
use crate::route::tickets::{Grant, TicketKeys};
use crate::store::{
    Claim, ClaimState, LoginFailures, NameTaken, RequestId, ResumeSecret, StoreCommand, StoreReply,
    StoreRequest, StoreResult,
};

mod takeover;
#[cfg(test)]
mod tests;

use self::takeover::take_held;

// The HTTP API's credentials live beside the tickets; their old paths stay.
pub use crate::route::bearer::{
    BearerClaims, BearerKey, ResumeToken, TokenError, resume_token_hash,
};

/// `POST /login`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub user: UserId,
    pub name: String,
    pub password: String,
    pub resume_token: Option<ResumeToken>,
    /// The resumption secret of the claim whose resume token this login presents: then the
    /// login is a **resumption**, checked against the claim instead of the password (which
    /// is not looked at). See [`crate::route::resumption`].
    pub resume_secret: Option<ResumptionSecret>,
}

/// A successful login: where to connect and with what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginAnswer {
    pub user: UserId,
    pub epoch: Epoch,
    pub server: LiveServer,
    pub ticket: Ticket,
    /// Bearer token for the HTTP API, bound to (user, epoch).
    pub token: String,
    pub resume_token: ResumeToken,
    /// The next resumption secret, good with `resume_token` until the configured lifetime
    /// runs out, it is used, or it is revoked. Shown once: the store keeps only its hash.
    /// Always issued by this route; `None` only in an older route's answer (as the SDK
    /// reads it), after which the next login needs the password.
    pub resume_secret: Option<ResumptionSecret>,
}

/// Why a login failed, with CIM's status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// 5000: a live claim exists and the request proved no right to take it over.
    #[error("repeat login: the user is online elsewhere")]
    RepeatLogin,
    /// 9100: unknown user, wrong name for the id, or wrong password (not told apart, so the
    /// API does not reveal which ids exist).
    #[error("account mismatch")]
    AccountMismatch,
    /// 7100: no live server to send the user to.
    #[error("no server available")]
    NoServerAvailable,
    /// 4000: the store did not answer; nothing was changed that a retry cannot fix.
    #[error("login failed: store unavailable")]
    Unavailable,
    /// 4290: too many failed logins at this account lately (the per-account throttle);
    /// no password was checked. Retry after the delay.
    #[error("too many failed logins for this account: retry in {} s", secs_up(*.0))]
    Throttled(Duration),
    /// 4500: the route's password checks are all taken (a burst of logins); nothing was
    /// checked or changed. Retry in a moment.
    #[error("the route is busy checking passwords: retry in a moment")]
    Busy,
    /// 9110: a resumption (resume token and secret) was refused: the secret was used,
    /// revoked, has expired or is not this claim's. Log in with the password. Counted
    /// against the account like a wrong password.
    #[error("resumption refused: log in with the password")]
    ResumeRefused,
}

impl LoginError {
    /// CIM's status code for the HTTP envelope.
    pub fn code(self) -> &'static str {
        match self {
            Self::RepeatLogin => "5000",
            Self::AccountMismatch => "9100",
            Self::NoServerAvailable => "7100",
            Self::Unavailable => "4000",
            Self::Throttled(_) => CODE_THROTTLED,
            Self::Busy => CODE_BUSY,
            Self::ResumeRefused => CODE_RESUME_REFUSED,
        }
    }
}

/// The envelope code of a refused resumption (HTTP 200, like 9100): the client logs in with
/// the password instead (and asks its user for it if it has none).
pub const CODE_RESUME_REFUSED: &str = "9110";

/// The envelope code of a throttled request (HTTP 429 with `Retry-After`).
pub const CODE_THROTTLED: &str = "4290";
/// The envelope code of a request refused because the route is busy (HTTP 503 with
/// `Retry-After`).
pub const CODE_BUSY: &str = "4500";

/// Whole seconds, rounded up (what `Retry-After` says): never 0 for a real wait.
pub fn secs_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

// ---------------------------------------------------------------------------------------
// The machine.
// ---------------------------------------------------------------------------------------

pub use crate::ids::ApiRequestId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteLoginConfig {
    /// Lease of a new claim: long enough for the client to connect to its server, whose
    /// `BindSession` then extends it. A takeover's claim runs this long past the old
    /// claim's lease, since its answer may be held until then.
    pub claim_ttl: Duration,
    /// How long a minted ticket is valid.
    pub ticket_ttl: Duration,
    /// How long a bearer token is valid.
    pub token_ttl: Duration,
    /// A store request with no reply by then fails its API request with 4000.
    pub store_timeout: Duration,
    /// A [`PasswordJob`] with no outcome by then fails its API request with 4000. Under a
    /// burst of logins the jobs queue for the shell's few hashing threads; past this the
    /// client has given up anyway (its own login timeout is of the same order).
    pub password_timeout: Duration,
    pub password: PasswordParams,
    /// How many lost `ReplaceClaim` races one login re-decides before giving up with 4000.
    pub max_cas_retries: u32,
    /// Shortest password a registration may choose, in characters.
    pub min_password_len: usize,
    /// The per-account failed-login throttle.
    pub throttle: LoginThrottle,
    /// Most password jobs queued or running at once: past it a login or registration is
    /// answered `Busy` at once, so a burst queues at most this many argon2 jobs instead of
    /// timing out behind them.
    pub max_password_jobs: usize,
    /// How long a resumption secret stays good if unused (each login issues a new one, so
    /// this is how long a user may stay away and still come back without the password).
    /// Zero issues no secrets: every login checks the password.
    pub resume_secret_ttl: Duration,
    /// A held takeover answer whose request had waited at least this long when it was
    /// released (from the request's arrival: a wait for the store before the hold counts)
    /// may be given again, after its release, to a resumption retrying with the secret it
    /// was asked with (its first request has timed out on the client: the SDK waits 5 s).
    /// One answered sooner is not: its client had it, so the same secret presented again is
    /// a copy, and refused.
    pub resume_rejoin_after: Duration,
}

impl Default for RouteLoginConfig {
    fn default() -> Self {
        Self {
            claim_ttl: Duration::from_secs(30),
            ticket_ttl: Duration::from_secs(30),
            token_ttl: Duration::from_secs(24 * 3600),
            store_timeout: Duration::from_secs(2),
            password_timeout: Duration::from_secs(5),
            password: PasswordParams::default(),
            max_cas_retries: 3,
            min_password_len: accounts::DEFAULT_MIN_PASSWORD_LEN,
            throttle: LoginThrottle::default(),
            max_password_jobs: 64,
            resume_secret_ttl: DEFAULT_RESUME_SECRET_TTL,
            resume_rejoin_after: Duration::from_secs(4),
        }
    }
}

/// Default of [`RouteLoginConfig::resume_secret_ttl`]: 30 days.
pub const DEFAULT_RESUME_SECRET_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A registration that succeeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub user: UserId,
    pub name: String,
}

/// Why a registration failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterFailure {
    /// 3000: the name or password breaks the rules.
    #[error(transparent)]
    Invalid(#[from] RegisterError),
    /// 3000: the name belongs to another account.
    #[error("this user name is taken")]
    NameTaken,
    /// 4000: the store did not answer (the account may or may not exist now).
    #[error("registration failed: store unavailable")]
    Unavailable,
    /// 4500: the route's password workers are all taken; nothing was stored.
    #[error("the route is busy hashing passwords: retry in a moment")]
    Busy,
}

impl RegisterFailure {
    pub fn code(self) -> &'static str {
        match self {
            Self::Invalid(_) | Self::NameTaken => "3000",
            Self::Unavailable => "4000",
            Self::Busy => CODE_BUSY,
        }
    }
}

/// A logout that reached the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoggedOut {
    pub user: UserId,
    /// False when the token's session was already gone or superseded: nothing was removed.
    pub released: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LogoutError {
    /// HTTP 401.
    #[error("bad bearer token: {0}")]
    BadToken(#[from] TokenError),
    /// 4000.
    #[error("logout failed: store unavailable")]
    Unavailable,
}

/// What the route tells the shell.
// `LoggedIn` carries the whole answer (ticket, tokens, secret): a few events per login,
// moved once to the shell, so not boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteEvent {
    Registered {
        api: ApiRequestId,
        result: Result<Registered, RegisterFailure>,
    },
    LoggedIn {
        api: ApiRequestId,
        result: Result<LoginAnswer, LoginError>,
    },
    LoggedOut {
        api: ApiRequestId,
        result: Result<LoggedOut, LogoutError>,
    },
    /// A takeover happened: tell `server` to close `user`'s sessions with an epoch below
    /// `below_epoch`, and report back with [`RouteLogin::handle_kick_done`]. Emitted before
    /// the `LoggedIn` it belongs to, which is held until that report while `server` is in
    /// the registry view. When it is not, the answer goes at once and the kick is best
    /// effort (the shell may drop it if it has no link): the old session then dies at its
    /// next lease refresh (`Superseded`) or by self-fencing.
    KickOld {
        server: ServerId,
        user: UserId,
        below_epoch: Epoch,
    },
}

/// What the login machine asks of the shell, from [`RouteLogin::poll_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutput {
    /// Run it off the driver task; feed the outcome to [`RouteLogin::handle_password`].
    Password(PasswordJob),
    /// Execute, then feed the result to [`RouteLogin::handle_store_reply`].
    Store(StoreRequest),
    /// An answer for the shell: an API request's result, or a kick to send.
    Event(RouteEvent),
}

/// Argon2 work the machine asks the shell to do: hashing or verifying costs tens of
/// milliseconds with production parameters, too long to run inside a driver loop that also
/// routes messages. The shell runs [`PasswordWork::run`] wherever it likes (a small pool of
/// blocking threads) and feeds the outcome back with [`RouteLogin::handle_password`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswordJob {
    pub id: RequestId,
    /// The API request it is for: the shell may schedule jobs fairly by who asked (the
    /// client address of that request), so one client's burst does not queue another's.
    pub api: ApiRequestId,
    /// When the machine stops waiting for the outcome: a shell whose queue is long may skip
    /// a job it only reaches later (the request has already failed with 4000).
    pub deadline: Instant,
    pub work: PasswordWork,
}

/// One argon2 computation. Everything it needs is in it, the salt included (drawn from
/// the machine's seeded RNG), so where and when it runs cannot change its result.
#[derive(Clone, PartialEq, Eq)]
pub enum PasswordWork {
    /// Does `password` match the PHC string `phc`? For an unknown account `phc` is the
    /// machine's dummy hash, so the answer costs the same time as a wrong password.
    Verify { password: String, phc: String },
    /// Hash a new account's password.
    Hash {
        password: String,
        params: PasswordParams,
        salt: [u8; accounts::SALT_LEN],
    },
}

impl std::fmt::Debug for PasswordWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a password.
        match self {
            Self::Verify { .. } => f.write_str("Verify(..)"),
            Self::Hash { params, .. } => f.debug_tuple("Hash").field(params).finish(),
        }
    }
}

impl PasswordWork {
    /// Does the work (CPU-bound, blocking: tens of milliseconds with production parameters).
    pub fn run(&self) -> PasswordOutcome {
        match self {
            Self::Verify { password, phc } => {
                PasswordOutcome::Verified(accounts::verify_password(password, phc))
            }
            Self::Hash {
                password,
                params,
                salt,
            } => PasswordOutcome::Hashed(accounts::hash_password_with_salt(password, params, salt)),
        }
    }
}

/// The result of a [`PasswordWork`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordOutcome {
    Verified(bool),
    Hashed(Result<String, HashError>),
}

/// Why the machine wants to be woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerReason {
    /// A store request's or password job's deadline.
    StoreDeadline,
    /// A held takeover answer is released: the old claim's lease ran out.
    TakeoverHold,
}

/// Where logins are placed: the live servers whose link from this route is up, or all of
/// them when none is. Borrowed as is while every link is up (the usual case).
fn placeable<'a>(
    live: &'a BTreeMap<ServerId, LiveServer>,
    linked: &BTreeSet<ServerId>,
) -> Cow<'a, BTreeMap<ServerId, LiveServer>> {
    let with_link = || live.iter().filter(|(id, _)| linked.contains(*id));
    let all_linked = live.keys().all(|id| linked.contains(id));
    if all_linked || with_link().next().is_none() {
        Cow::Borrowed(live)
    } else {
        Cow::Owned(with_link().map(|(id, s)| (id.clone(), s.clone())).collect())
    }
}

// --- the machine -----------------------------------------------------------------------

/// The route's login machine: registration, login (password, claim, server choice, ticket)
/// and logout, against the store and the registry view.
///
/// Inputs: `handle_registry` (and `handle_registry_lost` / `handle_registry_back`),
/// `handle_register`, `handle_login`, `handle_logout`,
/// `handle_store_reply`, `handle_password`, `handle_kick_done`, `handle_timeout`. **After
/// every `handle_*` the caller drains [`Self::poll_output`] until it returns `None`** (password
/// jobs first, then store requests, then events), then re-arms its timer from
/// [`Self::poll_timeout`]. Every API request ends in exactly one
/// event (`Registered`, `LoggedIn` or `LoggedOut`) carrying its [`ApiRequestId`].
///
/// Takeover rule: when a login takes over a live claim whose server is in the registry
/// view, the machine emits [`RouteEvent::KickOld`] and holds the `LoggedIn` until the first
/// of: [`Self::handle_kick_done`] from that server, the server leaving the registry view,
/// or the old claim's lease running out (a [`TimerReason::TakeoverHold`] deadline). The
/// ticket is minted on release, so its expiry counts from then.
///
/// Password hashing and verification never run inside the machine (argon2: tens of
/// milliseconds with production parameters): they are [`PasswordJob`]s the shell runs where
/// they cannot stall routing, answered like store requests (same ids, same deadline rule).
#[derive(Debug)]
pub struct RouteLogin {
    config: RouteLoginConfig,
    tickets: TicketKeys,
    bearer: BearerKey,
    balancer: Balancer,
    rng: ChaCha8Rng,
    live: BTreeMap<ServerId, LiveServer>,
    /// Live servers whose link from this route is up. Placement skips the others while any
    /// server is linked: a crashed server stays listed until its registry session expires
    /// (seconds), and one whose link never authenticates (a wrong link secret or
    /// certificate) stays listed for good; clients placed there could not send through this
    /// route. Placement only: takeovers still wait on every live server.
    linked: BTreeSet<ServerId>,
    /// The route's registry view is lost (its session cut off long enough that every server
    /// cut off with it has fenced itself): `live` is stale, so no login is placed.
    registry_lost: bool,
    /// Verified against when the account does not exist, so an unknown id costs the same
    /// time as a wrong password.
    dummy_hash: String,
    next_request: u64,
    pending: BTreeMap<RequestId, Pending>,
    /// Takeover answers waiting for the old session to end, in the order they were held.
    held: Vec<HeldLogin>,
    released: Vec<ReleasedTakeover>,
    store_out: VecDeque<StoreRequest>,
    password_out: VecDeque<PasswordJob>,
    events: VecDeque<RouteEvent>,
}

/// A successful login's claim, before its ticket and bearer token are minted.
#[derive(Debug, Clone)]
struct Granted {
    api: ApiRequestId,
    user: UserId,
    epoch: Epoch,
    server: LiveServer,
    resume: ResumeToken,
    secret: Option<ResumptionSecret>,
}

/// A takeover's answer, claimed in the store but not yet given to the client.
#[derive(Debug)]
struct HeldLogin {
    granted: Granted,
    /// Hash of the resume token the takeover was asked with. A client that gave up waiting
    /// retries with that same token (it never saw the new one); the retry joins this answer
    /// instead of meeting the new claim, which would refuse the old token with 5000.
    presented: Option<[u8; 32]>,
    /// Hash of the resumption secret the takeover was asked with, if it was a resumption:
    /// a retry by resumption joins only with that same secret (the token alone is not
    /// enough to be given the new secret).
    presented_secret: Option<[u8; 32]>,
    /// Retries waiting for this same answer.
    waiters: Vec<ApiRequestId>,
    /// Servers that may still hold a session of the user below the new epoch: the old
    /// claim's server, or every live server for a retry whose first answer was lost (which
    /// server the older session was on is not known then). Each leaves the set when it
    /// confirms the kick or leaves the registry; the answer goes out when it is empty.
    awaiting: BTreeSet<ServerId>,
    old_epoch: Epoch,
    /// When the old claim's lease runs out, on the monotonic clock.
    deadline: Instant,
    /// Monotonic and wall time when it was held, to tell the wall time at a release by
    /// timer (which brings only the monotonic time).
    held_at: (Instant, UnixMillis),
    /// When its request arrived ([`LoginCtx::asked_at`]).
    asked_at: Instant,
}

/// A held takeover's answer after its release, kept for `claim_ttl` so that a retry with
/// the token the takeover was asked with gets it again while the claim is unchanged (the
/// first request may have timed out before the release). Re-answering the same claim starts
/// nothing new: the hold that protected it is already over.
#[derive(Debug)]
struct ReleasedTakeover {
    presented: [u8; 32],
    presented_secret: Option<[u8; 32]>,
    /// How long its request had waited when the answer went out (queued, then held): a
    /// resumption may rejoin it only if that was long enough for the first request to have
    /// timed out (`resume_rejoin_after`).
    waited: Duration,
    granted: Granted,
    until: Instant,
}

#[derive(Debug)]
struct Pending {
    deadline: Instant,
    step: Step,
}

/// Where a request is, and what it needs to continue.
#[derive(Debug)]
enum Step {
    /// The password is being hashed (a [`PasswordJob`]).
    HashPassword {
        api: ApiRequestId,
        name: String,
    },
    Register {
        api: ApiRequestId,
        name: String,
    },
    LoadAccount {
        api: ApiRequestId,
        login: LoginCtx,
        name: String,
        password: String,
    },
    /// The attempt is being counted against the account's throttle record before the
    /// password is checked (`CountLoginFailure`, compare-and-count), so concurrent guesses
    /// cannot all pass on one stale read.
    CountFailure {
        api: ApiRequestId,
        login: LoginCtx,
        check: PasswordCheck,
        races: u32,
    },
    /// The account is throttled and the request presented a resume token: the claim says
    /// whether it is the token of the user's current (or lapsed) claim, which skips the
    /// throttle.
    CheckResume {
        api: ApiRequestId,
        login: LoginCtx,
        check: PasswordCheck,
        failures: LoginFailures,
        wait: Duration,
    },
    /// The password is being verified (a [`PasswordJob`]); `account_ok` says whether the
    /// account exists with that name, so both must hold.
    VerifyPassword {
        api: ApiRequestId,
        login: LoginCtx,
        account_ok: bool,
        gate: Gate,
    },
    LoadClaim {
        api: ApiRequestId,
        login: LoginCtx,
    },
    ReplaceClaim {
        api: ApiRequestId,
        login: LoginCtx,
        decision: LoginDecision,
        server: LiveServer,
        resume: ResumeToken,
        secret: Option<ResumptionSecret>,
    },
    /// A refused resumption is being counted against the account's throttle record (best
    /// effort, compare-and-count: `races` lost so far). The client has its answer already.
    CountResumeFailure {
        user: UserId,
        races: u32,
    },
    Logout {
        api: ApiRequestId,
        user: UserId,
    },
    /// Best-effort release of a claim a failed login may have written; nobody waits on it.
    Cleanup,
}

/// What the password check of a login needs once the throttle lets it through.
struct PasswordCheck {
    password: String,
    phc: String,
    account_ok: bool,
}

impl std::fmt::Debug for PasswordCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a password.
        f.debug_struct("PasswordCheck")
            .field("account_ok", &self.account_ok)
            .finish_non_exhaustive()
    }
}

/// How a login passed the per-account throttle, which says what its outcome does to the
/// account's failure record.
#[derive(Debug, Clone, Copy)]
enum Gate {
    /// No account (nothing to throttle or count).
    NoAccount,
    /// Counted before the check: a success clears the record.
    Counted,
    /// Let through by a valid resume token, uncounted: a failure is counted afterwards
    /// (against `failures`, best effort); a success leaves the record alone, so a user's
    /// own re-login does not reset an attacker's delay.
    Resumed { failures: u32 },
}

#[derive(Debug, Clone)]
struct LoginCtx {
    user: UserId,
    /// The resume token presented, if any: the new claim's token derives from it.
    presented: Option<ResumeToken>,
    resume_hash: Option<[u8; 32]>,
    /// A resumption: the hash of the secret presented ([`resumption::secret_hash`]).
    secret_hash: Option<[u8; 32]>,
    /// The presented token derives to the live claim's: this login made that claim and
    /// never got its answer. Decided with the claim, in `decide_and_claim`.
    retries_lost_answer: bool,
    lost_races: u32,
    /// When the request reached this machine: how long its client has been waiting is
    /// counted from here (see [`ReleasedTakeover::waited`]).
    asked_at: Instant,
}

impl RouteLogin {
    /// `token_secret` keys bearer tokens; `seed` feeds resume tokens, resumption secrets and
    /// password salts. A `u64` replays (tests, the simulation); a production route uses
    /// [`RouteLogin::with_entropy`], since 64 bits are too few for 256-bit credentials.
    pub fn new(
        config: RouteLoginConfig,
        tickets: TicketKeys,
        token_secret: impl Into<Vec<u8>>,
        balancer: Balancer,
        seed: u64,
    ) -> Self {
        Self::with_rng(
            config,
            tickets,
            token_secret,
            balancer,
            ChaCha8Rng::seed_from_u64(seed),
        )
    }

    /// As [`RouteLogin::new`], its generator seeded with 256 bits (from the OS): resume
    /// tokens and resumption secrets are then as hard to guess as their length says.
    pub fn with_entropy(
        config: RouteLoginConfig,
        tickets: TicketKeys,
        token_secret: impl Into<Vec<u8>>,
        balancer: Balancer,
        entropy: [u8; 32],
    ) -> Self {
        Self::with_rng(
            config,
            tickets,
            token_secret,
            balancer,
            ChaCha8Rng::from_seed(entropy),
        )
    }

    fn with_rng(
        config: RouteLoginConfig,
        tickets: TicketKeys,
        token_secret: impl Into<Vec<u8>>,
        balancer: Balancer,
        mut rng: ChaCha8Rng,
    ) -> Self {
        // An empty string (never verifies) if the parameters were rejected: the timing
        // cover is lost but nothing breaks.
        let dummy_hash = accounts::hash_password("cim-dummy-password", &config.password, &mut rng)
            .unwrap_or_default();
        Self {
            config,
            tickets,
            bearer: BearerKey::new(token_secret),
            balancer,
            rng,
            live: BTreeMap::new(),
            linked: BTreeSet::new(),
            registry_lost: false,
            dummy_hash,
            next_request: 0,
            pending: BTreeMap::new(),
            held: Vec::new(),
            released: Vec::new(),
            store_out: VecDeque::new(),
            password_out: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// During a bearer secret rotation, also accept tokens signed with `previous`.
    pub fn accept_previous_bearer_secret(&mut self, previous: Option<Vec<u8>>) {
        self.bearer = self.bearer.clone().with_previous(previous);
    }

    /// Checks a bearer token (for the HTTP API's authenticated calls).
    pub fn verify_bearer(&self, token: &str, now: UnixMillis) -> Result<BearerClaims, TokenError> {
        self.bearer.verify(token, now)
    }

    /// The registry's current view of live servers (replaces the previous one). Held
    /// takeover answers whose old server left the view are released: a server out of the
    /// registry has lost its ZooKeeper session and fences itself.
    pub fn handle_registry(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        live: BTreeMap<ServerId, LiveServer>,
    ) {
        self.live = live;
        self.linked.retain(|s| self.live.contains_key(s));
        for h in &mut self.held {
            h.awaiting.retain(|s| self.live.contains_key(s));
        }
        for held in take_held(&mut self.held, |h| h.awaiting.is_empty()) {
            self.release(now, wall, held);
        }
    }

    /// The route's registry view is lost: its session has been cut off from the ensemble so
    /// long that the servers cut off with it (a lost quorum cuts off everyone) have fenced
    /// themselves, and the view cannot say which servers are live. Until
    /// [`Self::handle_registry_back`], every login is answered 7100 (no server available)
    /// before its password is checked (a client retries 7100 with backoff; checking
    /// passwords for logins that cannot be placed would only load the route), instead of
    /// sending clients to servers that refuse them. Registration, logout and held takeovers
    /// are unaffected.
    pub fn handle_registry_lost(&mut self, _now: Instant) {
        self.registry_lost = true;
    }

    /// The registry view is current again (after [`Self::handle_registry_lost`]): logins are
    /// placed on its live servers again.
    pub fn handle_registry_back(&mut self, _now: Instant) {
        self.registry_lost = false;
    }

    /// Whether logins are refused because the registry view is lost.
    pub fn is_registry_lost(&self) -> bool {
        self.registry_lost
    }

    /// `server` reports it closed `user`'s sessions with an epoch below `below_epoch` (the
    /// answer to a [`RouteEvent::KickOld`]). Releases the held takeover answers waiting on
    /// that; a report nobody waits for is ignored.
    pub fn handle_kick_done(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        server: &ServerId,
        user: UserId,
        below_epoch: Epoch,
    ) {
        for h in &mut self.held {
            if h.granted.user == user && h.old_epoch < below_epoch {
                h.awaiting.remove(server);
            }
        }
        let done = take_held(&mut self.held, |h| h.awaiting.is_empty());
        for held in done {
            self.release(now, wall, held);
        }
    }

    /// A link to `server` is up (again). Every held takeover whose old session was there
    /// repeats its kick: one sent while the link was down was lost, and a server that
    /// restarted answers at once (it holds no session), which releases the answer long
    /// before the old lease would.
    pub fn handle_server_reachable(&mut self, server: &ServerId) {
        self.linked.insert(server.clone());
        for held in self.held.iter().filter(|h| h.awaiting.contains(server)) {
            self.events.push_back(RouteEvent::KickOld {
                server: server.clone(),
                user: held.granted.user,
                below_epoch: held.granted.epoch,
            });
        }
    }

    /// The link to `server` went down: no new logins are placed there until it is back,
    /// unless no linked server is left.
    pub fn handle_server_unreachable(&mut self, server: &ServerId) {
        self.linked.remove(server);
    }

    pub fn handle_register(&mut self, now: Instant, api: ApiRequestId, name: &str, password: &str) {
        if let Err(e) =
            accounts::validate_registration(name, password, self.config.min_password_len)
        {
            self.registered(api, Err(e.into()));
            return;
        }
        if self.password_busy() {
            self.registered(api, Err(RegisterFailure::Busy));
            return;
        }
        let mut salt = [0u8; accounts::SALT_LEN];
        self.rng.fill_bytes(&mut salt);
        let work = PasswordWork::Hash {
            password: password.to_owned(),
            params: self.config.password.clone(),
            salt,
        };
        let step = Step::HashPassword {
            api,
            name: name.to_owned(),
        };
        self.send_password(now, api, work, step);
    }

    /// The outcome of a [`PasswordJob`]. Outcomes for unknown ids (late, after their
    /// deadline) are ignored.
    pub fn handle_password(&mut self, now: Instant, id: RequestId, outcome: PasswordOutcome) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        match (pending.step, outcome) {
            (Step::HashPassword { api, name }, PasswordOutcome::Hashed(Ok(password_hash))) => {
                self.send(
                    now,
                    StoreCommand::RegisterAccount {
                        name: name.clone(),
                        password_hash,
                    },
                    Step::Register { api, name },
                );
            }
            // Only parameters argon2 rejects fail to hash: nothing was stored.
            (Step::HashPassword { api, .. }, PasswordOutcome::Hashed(Err(_))) => {
                self.registered(api, Err(RegisterFailure::Unavailable));
            }
            (
                Step::VerifyPassword {
                    api,
                    login,
                    account_ok,
                    gate,
                },
                PasswordOutcome::Verified(password_ok),
            ) => {
                let ok = account_ok && password_ok;
                if ok {
                    self.send(
                        now,
                        StoreCommand::LoadClaim { user: login.user },
                        Step::LoadClaim {
                            api,
                            login: login.clone(),
                        },
                    );
                } else {
                    self.logged_in(api, Err(LoginError::AccountMismatch));
                }
                match gate {
                    Gate::Counted if ok => self.send(
                        now,
                        StoreCommand::ClearLoginFailures { user: login.user },
                        Step::Cleanup,
                    ),
                    Gate::Resumed { failures } if !ok => self.send(
                        now,
                        StoreCommand::CountLoginFailure {
                            user: login.user,
                            expected: failures,
                            forget_after: self.config.throttle.forget_after(),
                        },
                        Step::Cleanup,
                    ),
                    _ => {}
                }
            }
            // An outcome of the wrong kind is a shell bug; fail the request rather than guess.
            (step, _) => self.fail(now, step),
        }
    }

    /// Starts a login. Wall-clock time is first needed when the claim is decided, so it
    /// comes with the store replies, not here.
    pub fn handle_login(&mut self, now: Instant, api: ApiRequestId, request: LoginRequest) {
        // Bytes first: counting the characters of a huge body is work too.
        if request.password.len() > 4 * accounts::MAX_PASSWORD_LEN
            || request.password.chars().count() > accounts::MAX_PASSWORD_LEN
        {
            // No account has such a password; refuse before hashing megabytes.
            self.logged_in(api, Err(LoginError::AccountMismatch));
            return;
        }
        if self.registry_lost {
            self.logged_in(api, Err(LoginError::NoServerAvailable));
            return;
        }
        let mut login = LoginCtx {
            user: request.user,
            presented: request.resume_token.clone(),
            resume_hash: request.resume_token.as_ref().map(resume_token_hash),
            secret_hash: None,
            retries_lost_answer: false,
            lost_races: 0,
            asked_at: now,
        };
        if let Some(secret) = &request.resume_secret {
            // A resumption is checked against the claim alone: no account read, no argon2.
            // It needs the token the secret goes with and the user's id (the claim is
            // found by id; a login by name alone has neither).
            if request.resume_token.is_none() || request.user == UserId(0) {
                self.logged_in(api, Err(LoginError::ResumeRefused));
                return;
            }
            login.secret_hash = Some(resumption::secret_hash(request.user, secret));
            let user = login.user;
            self.send(
                now,
                StoreCommand::LoadClaim { user },
                Step::LoadClaim { api, login },
            );
            return;
        }
        // Id 0 is no account: the login names its account by name alone (a client that
        // lost its state, or "the name is taken: log in as that user").
        let command = if request.user == UserId(0) {
            StoreCommand::LoadAccountByName {
                name: request.name.clone(),
            }
        } else {
            StoreCommand::LoadAccount { user: request.user }
        };
        self.send(
            now,
            command,
            Step::LoadAccount {
                api,
                login,
                name: request.name,
                password: request.password,
            },
        );
    }

    /// Logout releases exactly the token's (user, epoch) claim, so an old token can never
    /// end a newer session.
    pub fn handle_logout(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        api: ApiRequestId,
        token: &str,
    ) {
        match self.bearer.verify(token, wall) {
            Err(e) => self.events.push_back(RouteEvent::LoggedOut {
                api,
                result: Err(e.into()),
            }),
            Ok(claims) => self.send(
                now,
                StoreCommand::ReleaseClaim {
                    user: claims.user,
                    epoch: claims.epoch,
                },
                Step::Logout {
                    api,
                    user: claims.user,
                },
            ),
        }
    }

    /// A store reply. Replies to unknown ids (late, after their deadline) are ignored.
    pub fn handle_store_reply(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        id: RequestId,
        result: StoreResult,
    ) {
        let Some(pending) = self.pending.remove(&id) else {
            return;
        };
        let reply = match result {
            Ok(reply) => reply,
            Err(_) => {
                self.fail(now, pending.step);
                return;
            }
        };
        match (pending.step, reply) {
            (Step::Register { api, name }, StoreReply::AccountRegistered(result)) => {
                let result = result
                    .map(|user| Registered { user, name })
                    .map_err(|NameTaken| RegisterFailure::NameTaken);
                self.registered(api, result);
            }
            (
                Step::LoadAccount {
                    api,
                    login,
                    name,
                    password,
                },
                StoreReply::Account(account),
            ) => {
                // Always run one argon2 verification, so the answer's timing does not tell
                // an unknown id from a wrong password.
                match account {
                    Some(a) => {
                        let check = PasswordCheck {
                            // Names are one account regardless of ASCII case (`Bob` is
                            // `bob`); an id of 0 asked by name, so any id is this one.
                            account_ok: (a.user == login.user || login.user == UserId(0))
                                && a.name.eq_ignore_ascii_case(&name),
                            phc: a.password_hash,
                            password,
                        };
                        let mut login = login;
                        login.user = a.user;
                        // Counted before it is checked, starting from the usual case (no
                        // failures on record); the reply corrects the guess.
                        self.count_failure(now, api, login, check, LoginFailures::default(), 0);
                    }
                    None => {
                        let check = PasswordCheck {
                            password,
                            phc: self.dummy_hash.clone(),
                            account_ok: false,
                        };
                        self.verify(now, api, login, check, Gate::NoAccount);
                    }
                }
            }
            (
                Step::CountFailure {
                    api,
                    login,
                    check,
                    races,
                },
                StoreReply::LoginFailureCounted(counted),
            ) => match counted {
                Ok(_) => self.verify(now, api, login, check, Gate::Counted),
                Err(current) => self.gate(now, wall, api, login, check, current, races + 1),
            },
            (
                Step::CheckResume {
                    api,
                    login,
                    check,
                    failures,
                    wait,
                },
                StoreReply::Claim(state),
            ) => {
                if self.presents_claim_token(&login, &state) {
                    let gate = Gate::Resumed {
                        failures: failures.count,
                    };
                    self.verify(now, api, login, check, gate);
                } else {
                    self.logged_in(api, Err(LoginError::Throttled(wait)));
                }
            }
            (Step::LoadClaim { api, login }, StoreReply::Claim(state)) => {
                if !self.rejoin_takeover(now, wall, api, &login, &state) {
                    self.decide_checked(now, wall, api, login, &state);
                }
            }
            (
                Step::ReplaceClaim {
                    api,
                    login,
                    decision,
                    server,
                    resume,
                    secret,
                },
                StoreReply::ClaimReplaced(result),
            ) => match result {
                Ok(replaced) => {
                    // Hold a takeover against the old claim as it was when replaced: a
                    // refresh between our read and the replace extended its lease.
                    let decision = match (decision, replaced) {
                        (LoginDecision::Takeover { epoch, old }, Some(now_old))
                            if now_old.epoch == old.epoch =>
                        {
                            LoginDecision::Takeover {
                                epoch,
                                old: now_old,
                            }
                        }
                        (decision, _) => decision,
                    };
                    let granted = Granted {
                        api,
                        user: login.user,
                        epoch: decision.epoch(),
                        server,
                        resume,
                        secret,
                    };
                    self.login_succeeded(now, wall, granted, decision, &login);
                }
                Err(won) => {
                    let mut login = login;
                    login.lost_races += 1;
                    if login.lost_races > self.config.max_cas_retries {
                        self.logged_in(api, Err(LoginError::Unavailable));
                    } else {
                        // The reply carries the winning state: decide against it directly
                        // (a resumption checks its secret again: the winner used it, or
                        // it was revoked meanwhile).
                        self.decide_checked(now, wall, api, login, &won);
                    }
                }
            },
            (Step::Logout { api, user }, StoreReply::ClaimReleased { released }) => {
                self.events.push_back(RouteEvent::LoggedOut {
                    api,
                    result: Ok(LoggedOut { user, released }),
                });
            }
            (
                Step::CountResumeFailure { user, races },
                StoreReply::LoginFailureCounted(Err(current)),
            ) if races < self.config.max_cas_retries => {
                self.count_resume_failure(now, user, current.count, races + 1);
            }
            (Step::Cleanup | Step::CountResumeFailure { .. }, _) => {}
            // A reply of the wrong kind is a store bug; fail the request rather than guess.
            (step, _) => self.fail(now, step),
        }
    }

    /// Fails every request whose store deadline has passed (4000) and releases every held
    /// takeover answer whose old lease has run out.
    pub fn handle_timeout(&mut self, now: Instant) {
        for held in take_held(&mut self.held, |h| h.deadline <= now) {
            let (held_now, held_wall) = held.held_at;
            let wall = held_wall.plus(now.saturating_duration_since(held_now));
            self.release(now, wall, held);
        }
        self.released.retain(|r| r.until > now);
        let expired: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(pending) = self.pending.remove(&id) {
                self.fail(now, pending.step);
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<(Instant, TimerReason)> {
        let store = self
            .pending
            .values()
            .map(|p| (p.deadline, TimerReason::StoreDeadline));
        let held = self
            .held
            .iter()
            .map(|h| (h.deadline, TimerReason::TakeoverHold));
        store.chain(held).min_by_key(|(deadline, _)| *deadline)
    }

    /// The next output: password jobs, then store requests, then events. The order is the
    /// one the route's shell has always drained in (the simulation's recorded histories pin
    /// it): a password job run inline queues its next store request before the drain reaches
    /// the store requests.
    pub fn poll_output(&mut self) -> Option<LoginOutput> {
        if let Some(job) = self.poll_password() {
            return Some(LoginOutput::Password(job));
        }
        if let Some(request) = self.poll_store() {
            return Some(LoginOutput::Store(request));
        }
        self.poll_event().map(LoginOutput::Event)
    }

    // The three kinds `poll_output` gives, in its order. Private: the shell drains only
    // `poll_output`; this module's tables read one kind at a time.
    fn poll_password(&mut self) -> Option<PasswordJob> {
        self.password_out.pop_front()
    }

    fn poll_store(&mut self) -> Option<StoreRequest> {
        self.store_out.pop_front()
    }

    fn poll_event(&mut self) -> Option<RouteEvent> {
        self.events.pop_front()
    }
    /// Mints the ticket and bearer token (expiries count from `wall`) and answers.
    fn answer(&mut self, wall: UnixMillis, granted: Granted) {
        let Granted {
            api,
            user,
            epoch,
            server,
            resume,
            secret,
        } = granted;
        let ticket = self.tickets.mint(&Grant {
            user,
            server: server.id.clone(),
            epoch,
            expires_at: wall.plus(self.config.ticket_ttl),
        });
        let token = self.bearer.mint(&BearerClaims {
            user,
            epoch,
            expires_at: wall.plus(self.config.token_ttl),
        });
        self.logged_in(
            api,
            Ok(LoginAnswer {
                user,
                epoch,
                server,
                ticket,
                token,
                resume_token: resume,
                resume_secret: secret,
            }),
        );
    }

    /// The store failed `step` (error reply, timeout or nonsense): answer 4000.
    fn fail(&mut self, now: Instant, step: Step) {
        match step {
            Step::Register { api, .. } => {
                self.registered(api, Err(RegisterFailure::Unavailable));
            }
            Step::HashPassword { api, .. } => self.registered(api, Err(RegisterFailure::Busy)),
            Step::LoadAccount { api, .. }
            | Step::CountFailure { api, .. }
            | Step::CheckResume { api, .. }
            | Step::LoadClaim { api, .. } => {
                self.logged_in(api, Err(LoginError::Unavailable));
            }
            // Only the password deadline ends a check: the jobs queued behind others (a
            // burst), not the store.
            Step::VerifyPassword { api, .. } => self.logged_in(api, Err(LoginError::Busy)),
            Step::ReplaceClaim {
                api,
                login,
                decision,
                ..
            } => {
                self.logged_in(api, Err(LoginError::Unavailable));
                // The claim may have been written; its resume token is lost with this
                // answer, so the user would get 5000 until it expired. Release it
                // (compare-epoch: a no-op if it was not written or was superseded).
                self.send(
                    now,
                    StoreCommand::ReleaseClaim {
                        user: login.user,
                        epoch: decision.epoch(),
                    },
                    Step::Cleanup,
                );
            }
            Step::Logout { api, .. } => self.events.push_back(RouteEvent::LoggedOut {
                api,
                result: Err(LogoutError::Unavailable),
            }),
            Step::Cleanup | Step::CountResumeFailure { .. } => {}
        }
    }

    /// Whether `max_password_jobs` password jobs are queued or running already. Checked
    /// right before a job is queued, so the bound is exact; a throttled attempt never takes
    /// a place (it is refused before its check).
    fn password_busy(&self) -> bool {
        let jobs = self
            .pending
            .values()
            .filter(|p| {
                matches!(
                    p.step,
                    Step::HashPassword { .. } | Step::VerifyPassword { .. }
                )
            })
            .count();
        jobs >= self.config.max_password_jobs
    }

    /// Counts the attempt (compare-and-count against `expected`), then checks it.
    fn count_failure(
        &mut self,
        now: Instant,
        api: ApiRequestId,
        login: LoginCtx,
        check: PasswordCheck,
        expected: LoginFailures,
        races: u32,
    ) {
        let user = login.user;
        self.send(
            now,
            StoreCommand::CountLoginFailure {
                user,
                expected: expected.count,
                forget_after: self.config.throttle.forget_after(),
            },
            Step::CountFailure {
                api,
                login,
                check,
                races,
            },
        );
    }

    /// The account has `failures` on record (read by a lost compare-and-count): go ahead
    /// and count this attempt, or answer 4290 unless a resume token lets it through.
    #[allow(clippy::too_many_arguments)]
    fn gate(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        api: ApiRequestId,
        login: LoginCtx,
        check: PasswordCheck,
        failures: LoginFailures,
        races: u32,
    ) {
        let throttle = self.config.throttle;
        let wait = match throttle.wait(&failures, wall) {
            // Each lost race is another attempt counted first: under a burst at one
            // account the throttle closes within `free_failures` of them anyway.
            None if races <= self.config.max_cas_retries => {
                self.count_failure(now, api, login, check, failures, races);
                return;
            }
            None => throttle.base_delay.max(Duration::from_millis(1)),
            Some(wait) => wait,
        };
        if login.presented.is_some() {
            let user = login.user;
            self.send(
                now,
                StoreCommand::LoadClaim { user },
                Step::CheckResume {
                    api,
                    login,
                    check,
                    failures,
                    wait,
                },
            );
        } else {
            self.logged_in(api, Err(LoginError::Throttled(wait)));
        }
    }

    /// Decides against `state`, after checking a resumption's token and secret against its
    /// claim. A refused resumption is answered at once and counted against the account's
    /// throttle record like a wrong password (a copy of a secret that was used already is
    /// what an attacker would present).
    fn decide_checked(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        api: ApiRequestId,
        login: LoginCtx,
        state: &ClaimState,
    ) {
        if let (Some(secret_hash), Some(token_hash)) = (login.secret_hash, login.resume_hash)
            && resumption::check(state.claim.as_ref(), &token_hash, &secret_hash, wall).is_err()
        {
            self.logged_in(api, Err(LoginError::ResumeRefused));
            self.count_resume_failure(now, login.user, 0, 0);
            return;
        }
        self.decide_and_claim(now, wall, api, login, state);
    }

    /// Counts one refused resumption against `user`'s throttle record, compare-and-count
    /// from `expected` (a lost race retries from the count it read, a few times).
    fn count_resume_failure(&mut self, now: Instant, user: UserId, expected: u32, races: u32) {
        self.send(
            now,
            StoreCommand::CountLoginFailure {
                user,
                expected,
                forget_after: self.config.throttle.forget_after(),
            },
            Step::CountResumeFailure { user, races },
        );
    }

    /// Whether the login presented the resume token of the user's claim (live or lapsed),
    /// or the token a lost answer for it derived from: a client that logged in before.
    fn presents_claim_token(&self, login: &LoginCtx, state: &ClaimState) -> bool {
        let (Some(presented), Some(hash), Some(claim)) =
            (&login.presented, login.resume_hash, &state.claim)
        else {
            return false;
        };
        bool::from(hash.ct_eq(&claim.resume_token_hash))
            || self
                .bearer
                .derives_to(presented, login.user, claim.epoch, &claim.resume_token_hash)
    }

    fn verify(
        &mut self,
        now: Instant,
        api: ApiRequestId,
        login: LoginCtx,
        check: PasswordCheck,
        gate: Gate,
    ) {
        // Refused before it queues behind a full pool. An attempt counted by the throttle
        // stays counted: under overload a login costs one of the free failures.
        if self.password_busy() {
            self.logged_in(api, Err(LoginError::Busy));
            return;
        }
        let PasswordCheck {
            password,
            phc,
            account_ok,
        } = check;
        self.send_password(
            now,
            api,
            PasswordWork::Verify { password, phc },
            Step::VerifyPassword {
                api,
                login,
                account_ok,
                gate,
            },
        );
    }

    fn send(&mut self, now: Instant, command: StoreCommand, step: Step) {
        let id = self.wait_for(now + self.config.store_timeout, step);
        self.store_out.push_back(StoreRequest { id, command });
    }

    fn send_password(&mut self, now: Instant, api: ApiRequestId, work: PasswordWork, step: Step) {
        let deadline = now + self.config.password_timeout;
        let id = self.wait_for(deadline, step);
        self.password_out.push_back(PasswordJob {
            id,
            api,
            deadline,
            work,
        });
    }

    /// Records `step` as waiting for the answer to a new request id until `deadline`.
    fn wait_for(&mut self, deadline: Instant, step: Step) -> RequestId {
        self.next_request += 1;
        let id = RequestId(self.next_request);
        self.pending.insert(id, Pending { deadline, step });
        id
    }

    fn registered(&mut self, api: ApiRequestId, result: Result<Registered, RegisterFailure>) {
        self.events
            .push_back(RouteEvent::Registered { api, result });
    }

    fn logged_in(&mut self, api: ApiRequestId, result: Result<LoginAnswer, LoginError>) {
        self.events.push_back(RouteEvent::LoggedIn { api, result });
    }
}
