//! The route's login machine: registration, login and logout (see [`RouteLogin`]), and the
//! HTTP API's bearer tokens ([`BearerKey`]).
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
use std::time::{Duration, Instant};

use cim_proto::Ticket;
use hmac::{Hmac, Mac};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::accounts::{self, HashError, PasswordParams, RegisterError};
use crate::balance::Balancer;
use crate::claims::{LoginDecision, decide_login, is_live};
use crate::ids::{Epoch, ServerId, UnixMillis, UserId};
use crate::login_throttle::LoginThrottle;
use crate::registry::LiveServer;
use crate::store::{
    Claim, ClaimState, LoginFailures, NameTaken, RequestId, StoreCommand, StoreReply, StoreRequest,
    StoreResult,
};
use crate::tickets::{Grant, TicketKeys};

/// 32 random bytes handed to the client with each login; presenting it lets the same client
/// take over its own live claim at once (failover) instead of waiting out the lease.
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeToken(pub [u8; 32]);

impl std::fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeToken(..)")
    }
}

/// `POST /login`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub user: UserId,
    pub name: String,
    pub password: String,
    pub resume_token: Option<ResumeToken>,
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
        }
    }
}

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

type HmacSha256 = Hmac<Sha256>;

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
        }
    }
}

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

// --- bearer tokens ---------------------------------------------------------------------

/// Signs and checks the HTTP API's bearer tokens: `<user>.<epoch>.<expires_at_ms>.<mac>`,
/// decimal numbers and a hex HMAC-SHA256 over them. Bound to (user, epoch), so a token
/// only ever acts for the session it was issued with.
///
/// During a rotation it also holds the previous secret: tokens are minted with the current
/// one and accepted under either, so tokens issued before the switch keep working.
#[derive(Clone)]
pub struct BearerKey {
    secret: Vec<u8>,
    previous: Option<Vec<u8>>,
}

impl std::fmt::Debug for BearerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerKey(..)")
    }
}

/// What a valid bearer token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BearerClaims {
    pub user: UserId,
    pub epoch: Epoch,
    pub expires_at: UnixMillis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not match")]
    BadMac,
    #[error("token expired")]
    Expired,
}

impl BearerKey {
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            secret: secret.into(),
            previous: None,
        }
    }

    /// Also accept tokens signed with `previous` (a rotation's old secret); never mint with it.
    pub fn with_previous(mut self, previous: Option<Vec<u8>>) -> Self {
        self.previous = previous;
        self
    }

    pub fn mint(&self, claims: &BearerClaims) -> String {
        let mac = self.mac(claims).finalize().into_bytes();
        format!(
            "{}.{}.{}.{}",
            claims.user.0,
            claims.epoch.0,
            claims.expires_at.0,
            hex_encode(&mac)
        )
    }

    /// Checks format, signature (constant time) and expiry against the wall clock `now`.
    pub fn verify(&self, token: &str, now: UnixMillis) -> Result<BearerClaims, TokenError> {
        let mut parts = token.split('.');
        let (Some(user), Some(epoch), Some(expires), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let claims = BearerClaims {
            user: UserId(parse_decimal(user)?),
            epoch: Epoch(parse_decimal(epoch)?),
            expires_at: UnixMillis(parse_decimal(expires)?),
        };
        let mac = hex_decode(mac).ok_or(TokenError::Malformed)?;
        let signed_by = |secret: &[u8]| mac_of(secret, &claims).verify_slice(&mac).is_ok();
        if !signed_by(&self.secret) && !self.previous.as_deref().is_some_and(signed_by) {
            return Err(TokenError::BadMac);
        }
        if claims.expires_at <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// The resume token a login presenting `parent` is given with the claim of `epoch`.
    /// Keyed, so only routes can compute it: a route that meets a claim whose token hash is
    /// this derivation of the token presented knows the request is a retry of the login
    /// that made the claim (its answer was lost: a route crashed while holding it), while
    /// a client cannot step from an old token to a newer one by itself.
    pub fn derive_resume(&self, parent: &ResumeToken, user: UserId, epoch: Epoch) -> ResumeToken {
        derive_resume_with(&self.secret, parent, user, epoch)
    }

    /// Whether `hash` is the hash of `parent`'s derivation for `epoch`, under the current
    /// secret or, during a rotation, the previous one (the claim may be another route's).
    pub fn derives_to(
        &self,
        parent: &ResumeToken,
        user: UserId,
        epoch: Epoch,
        hash: &[u8; 32],
    ) -> bool {
        std::iter::once(&self.secret)
            .chain(self.previous.as_ref())
            .any(|secret| {
                let derived = derive_resume_with(secret, parent, user, epoch);
                bool::from(resume_token_hash(&derived).ct_eq(hash))
            })
    }

    fn mac(&self, claims: &BearerClaims) -> HmacSha256 {
        mac_of(&self.secret, claims)
    }
}

fn mac_of(secret: &[u8], claims: &BearerClaims) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(b"cim-bearer-v1");
    mac.update(&claims.user.0.to_be_bytes());
    mac.update(&claims.epoch.0.to_be_bytes());
    mac.update(&claims.expires_at.0.to_be_bytes());
    mac
}

fn derive_resume_with(
    secret: &[u8],
    parent: &ResumeToken,
    user: UserId,
    epoch: Epoch,
) -> ResumeToken {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(b"cim-resume-v1");
    mac.update(&parent.0);
    mac.update(&user.0.to_be_bytes());
    mac.update(&epoch.0.to_be_bytes());
    ResumeToken(mac.finalize().into_bytes().into())
}

/// Canonical decimal only (no sign, no leading zero), so a token has one spelling.
fn parse_decimal(s: &str) -> Result<u64, TokenError> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if !canonical {
        return Err(TokenError::Malformed);
    }
    s.parse().map_err(|_| TokenError::Malformed)
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex of exactly a SHA-256 MAC.
fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    if s.len() != 64 {
        return None;
    }
    s.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// SHA-256 of a resume token, as claims store it.
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

pub fn resume_token_hash(token: &ResumeToken) -> [u8; 32] {
    Sha256::digest(token.0).into()
}

// --- the machine -----------------------------------------------------------------------

/// The route's login machine: registration, login (password, claim, server choice, ticket)
/// and logout, against the store and the registry view.
///
/// Inputs: `handle_registry`, `handle_register`, `handle_login`, `handle_logout`,
/// `handle_store_reply`, `handle_password`, `handle_kick_done`, `handle_timeout`. **After
/// every `handle_*` the caller drains [`Self::poll_store`], [`Self::poll_password`] and
/// [`Self::poll_event`] until each returns `None`**,
/// then re-arms its timer from [`Self::poll_timeout`]. Every API request ends in exactly one
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
}

/// A takeover's answer, claimed in the store but not yet given to the client.
#[derive(Debug)]
struct HeldLogin {
    granted: Granted,
    /// Hash of the resume token the takeover was asked with. A client that gave up waiting
    /// retries with that same token (it never saw the new one); the retry joins this answer
    /// instead of meeting the new claim, which would refuse the old token with 5000.
    presented: Option<[u8; 32]>,
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
}

/// A held takeover's answer after its release, kept for `claim_ttl` so that a retry with
/// the token the takeover was asked with gets it again while the claim is unchanged (the
/// first request may have timed out before the release). Re-answering the same claim starts
/// nothing new: the hold that protected it is already over.
#[derive(Debug)]
struct ReleasedTakeover {
    presented: [u8; 32],
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
    /// The presented token derives to the live claim's: this login made that claim and
    /// never got its answer. Decided with the claim, in `decide_and_claim`.
    retries_lost_answer: bool,
    lost_races: u32,
}

impl RouteLogin {
    /// `token_secret` keys bearer tokens; `seed` feeds resume tokens and password salts.
    pub fn new(
        config: RouteLoginConfig,
        tickets: TicketKeys,
        token_secret: impl Into<Vec<u8>>,
        balancer: Balancer,
        seed: u64,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
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
        let login = LoginCtx {
            user: request.user,
            presented: request.resume_token.clone(),
            resume_hash: request.resume_token.as_ref().map(resume_token_hash),
            retries_lost_answer: false,
            lost_races: 0,
        };
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
                    self.decide_and_claim(now, wall, api, login, &state);
                }
            }
            (
                Step::ReplaceClaim {
                    api,
                    login,
                    decision,
                    server,
                    resume,
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
                    };
                    self.login_succeeded(now, wall, granted, decision, &login);
                }
                Err(won) => {
                    let mut login = login;
                    login.lost_races += 1;
                    if login.lost_races > self.config.max_cas_retries {
                        self.logged_in(api, Err(LoginError::Unavailable));
                    } else {
                        // The reply carries the winning state: decide against it directly.
                        self.decide_and_claim(now, wall, api, login, &won);
                    }
                }
            },
            (Step::Logout { api, user }, StoreReply::ClaimReleased { released }) => {
                self.events.push_back(RouteEvent::LoggedOut {
                    api,
                    result: Ok(LoggedOut { user, released }),
                });
            }
            (Step::Cleanup, _) => {}
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

    pub fn poll_store(&mut self) -> Option<StoreRequest> {
        self.store_out.pop_front()
    }

    pub fn poll_password(&mut self) -> Option<PasswordJob> {
        self.password_out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<RouteEvent> {
        self.events.pop_front()
    }

    fn decide_and_claim(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        api: ApiRequestId,
        login: LoginCtx,
        state: &ClaimState,
    ) {
        let mut login = login;
        let claim_server_live = state
            .claim
            .as_ref()
            .is_some_and(|c| self.live.contains_key(&c.server));
        // A retry of the login that made the live claim, whose answer was lost (the route
        // holding it crashed): it takes the claim over again, waiting on every server.
        login.retries_lost_answer = match (&login.presented, &state.claim) {
            (Some(presented), Some(claim)) if is_live(claim, wall) => {
                self.bearer
                    .derives_to(presented, login.user, claim.epoch, &claim.resume_token_hash)
            }
            _ => false,
        };
        let decision = match decide_login(state, wall, login.resume_hash, claim_server_live) {
            Ok(decision) => decision,
            Err(_) if login.retries_lost_answer => LoginDecision::Takeover {
                epoch: state.epoch.next(),
                old: state
                    .claim
                    .clone()
                    .expect("a lost answer's retry is only recognized against a live claim"),
            },
            Err(_) => {
                self.logged_in(api, Err(LoginError::RepeatLogin));
                return;
            }
        };
        let placeable = placeable(&self.live, &self.linked);
        let Some(server) = self
            .balancer
            .pick(login.user, &placeable)
            .and_then(|id| placeable.get(&id).cloned())
        else {
            self.logged_in(api, Err(LoginError::NoServerAvailable));
            return;
        };
        // Derived from the token presented, if any, so that a retry of this very login can
        // be recognized by any route should its answer be lost.
        let resume = match &login.presented {
            Some(presented) => self
                .bearer
                .derive_resume(presented, login.user, decision.epoch()),
            None => {
                let mut token = [0u8; 32];
                self.rng.fill_bytes(&mut token);
                ResumeToken(token)
            }
        };
        // A takeover's answer may be held until the old lease ends: the new claim must
        // outlive that by a whole claim_ttl, or it could expire before the client connects.
        let lease_from = match &decision {
            LoginDecision::Fresh { .. } => wall,
            LoginDecision::Takeover { old, .. } => wall.max(old.lease_until),
        };
        let claim = Claim {
            epoch: decision.epoch(),
            server: server.id.clone(),
            lease_until: lease_from.plus(self.config.claim_ttl),
            resume_token_hash: resume_token_hash(&resume),
        };
        self.send(
            now,
            StoreCommand::ReplaceClaim {
                user: login.user,
                expected: state.epoch,
                claim,
            },
            Step::ReplaceClaim {
                api,
                login,
                decision,
                server,
                resume,
            },
        );
    }

    /// The claim is ours: answer, or hold the answer while the old session may be open.
    fn login_succeeded(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        granted: Granted,
        decision: LoginDecision,
        login: &LoginCtx,
    ) {
        if let LoginDecision::Takeover { old, .. } = decision {
            // The old claim's session is on its server. For a retry of a login whose answer
            // was lost, the claim it replaces was never answered: the session that takeover
            // was waiting for may be on any server, so every live one is asked.
            let awaiting: BTreeSet<ServerId> = if login.retries_lost_answer {
                self.live.keys().cloned().collect()
            } else {
                BTreeSet::from([old.server.clone()])
            };
            for server in &awaiting {
                self.events.push_back(RouteEvent::KickOld {
                    server: server.clone(),
                    user: granted.user,
                    below_epoch: granted.epoch,
                });
            }
            // The old session may still be open on a live server: answering now could let
            // the new one start before it ends. Wait, at most until its lease runs out
            // (a server that cannot refresh it fences itself by then). `old` is the claim
            // as ReplaceClaim found it, so a refresh since our read is accounted for.
            // For a lost answer's retry, the replaced claim's lease covers the older one's
            // (a takeover's claim outlives the lease it waited for by a claim_ttl).
            let awaiting: BTreeSet<ServerId> = awaiting
                .into_iter()
                .filter(|s| self.live.contains_key(s))
                .collect();
            if !awaiting.is_empty() && is_live(&old, wall) {
                // `is_live` just held, so lease_until > wall.
                let remaining = Duration::from_millis(old.lease_until.0 - wall.0);
                self.held.push(HeldLogin {
                    granted,
                    presented: login.resume_hash,
                    waiters: Vec::new(),
                    awaiting,
                    old_epoch: old.epoch,
                    deadline: now + remaining,
                    held_at: (now, wall),
                });
                return;
            }
        }
        self.answer(wall, granted);
    }

    /// A login presenting the resume token of a takeover that is held, or was released
    /// within `claim_ttl`, while the claim it made is still the live one: the same client
    /// retrying after its request timed out. It gets that takeover's answer (now, or when
    /// the hold ends) rather than a second takeover, which would not wait for the first
    /// one's old session. `true` if it was taken care of.
    fn rejoin_takeover(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        api: ApiRequestId,
        login: &LoginCtx,
        state: &ClaimState,
    ) -> bool {
        let Some(presented) = login.resume_hash else {
            return false;
        };
        let Some(current) = state.claim.as_ref().filter(|c| is_live(c, wall)) else {
            return false;
        };
        // The same claim, on a server still live: an answer naming a server that has left
        // the registry would only send the client to a dead end; a fresh decision (a
        // takeover, its server being gone) serves it better.
        let same = |granted: &Granted| {
            granted.user == login.user
                && granted.epoch == current.epoch
                && self.live.contains_key(&granted.server.id)
        };
        if let Some(held) = self
            .held
            .iter_mut()
            .find(|h| h.presented == Some(presented) && same(&h.granted))
        {
            held.waiters.push(api);
            return true;
        }
        self.released.retain(|r| r.until > now);
        let Some(released) = self
            .released
            .iter()
            .find(|r| r.presented == presented && same(&r.granted))
        else {
            return false;
        };
        let granted = Granted {
            api,
            ..released.granted.clone()
        };
        self.answer(wall, granted);
        true
    }

    /// A held takeover's hold is over: answer it and every retry that joined it, and keep
    /// the answer for retries still to come.
    fn release(&mut self, now: Instant, wall: UnixMillis, held: HeldLogin) {
        for api in held.waiters {
            let again = Granted {
                api,
                ..held.granted.clone()
            };
            self.answer(wall, again);
        }
        if let Some(presented) = held.presented {
            self.released.push(ReleasedTakeover {
                presented,
                granted: held.granted.clone(),
                until: now + self.config.claim_ttl,
            });
        }
        self.answer(wall, held.granted);
    }

    /// Mints the ticket and bearer token (expiries count from `wall`) and answers.
    fn answer(&mut self, wall: UnixMillis, granted: Granted) {
        let Granted {
            api,
            user,
            epoch,
            server,
            resume,
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
            Step::Cleanup => {}
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

/// Removes and returns the held answers `which` selects, keeping the others in order.
fn take_held(held: &mut Vec<HeldLogin>, which: impl Fn(&HeldLogin) -> bool) -> Vec<HeldLogin> {
    let (taken, kept) = std::mem::take(held).into_iter().partition(which);
    *held = kept;
    taken
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Strategy;
    use crate::claims::ClaimTable;
    use crate::store::{Account, StoreUnavailable};

    const TICKET_SECRET: &[u8] = b"ticket-secret";
    const WALL0: UnixMillis = UnixMillis(1_700_000_000_000);

    #[allow(clippy::disallowed_methods)] // the one clock read: a base for explicit offsets
    fn t0() -> Instant {
        Instant::now()
    }

    fn server(name: &str) -> LiveServer {
        LiveServer {
            id: ServerId::new(name),
            host: "127.0.0.1".into(),
            client_port: 11211,
            link_port: 11311,
            http_port: 8081,
            connections: 0,
            client_tls: false,
        }
    }

    fn registry(names: &[&str]) -> BTreeMap<ServerId, LiveServer> {
        names
            .iter()
            .map(|n| (ServerId::new(*n), server(n)))
            .collect()
    }

    fn config() -> RouteLoginConfig {
        RouteLoginConfig {
            password: PasswordParams::for_tests(),
            // These tables use "pw"; the minimum has its own table in `accounts`.
            min_password_len: 1,
            ..RouteLoginConfig::default()
        }
    }

    /// The store side: accounts in a map, claims in the reference table.
    #[derive(Default, Clone)]
    struct Store {
        claims: ClaimTable,
        accounts: BTreeMap<UserId, Account>,
        /// The throttle's records (forgetting is the conformance suite's business).
        failures: BTreeMap<UserId, LoginFailures>,
    }

    impl Store {
        fn answer(&mut self, wall: UnixMillis, command: &StoreCommand) -> StoreReply {
            if let Some(reply) = self.claims.apply(wall, command) {
                return reply;
            }
            match command {
                StoreCommand::RegisterAccount {
                    name,
                    password_hash,
                } => {
                    if self.accounts.values().any(|a| a.name == *name) {
                        return StoreReply::AccountRegistered(Err(NameTaken));
                    }
                    let user = UserId(self.accounts.len() as u64 + 1);
                    self.accounts.insert(
                        user,
                        Account {
                            user,
                            name: name.clone(),
                            password_hash: password_hash.clone(),
                            all_from: Default::default(),
                        },
                    );
                    StoreReply::AccountRegistered(Ok(user))
                }
                StoreCommand::LoadAccount { user } => {
                    StoreReply::Account(self.accounts.get(user).cloned())
                }
                StoreCommand::LoadAccountByName { name } => StoreReply::Account(
                    self.accounts
                        .values()
                        .find(|a| a.name.eq_ignore_ascii_case(name))
                        .cloned(),
                ),
                StoreCommand::CountLoginFailure { user, expected, .. } => {
                    let current = self.failures.get(user).copied().unwrap_or_default();
                    if current.count != *expected {
                        return StoreReply::LoginFailureCounted(Err(current));
                    }
                    let counted = LoginFailures {
                        count: current.count + 1,
                        last_at: wall,
                    };
                    self.failures.insert(*user, counted);
                    StoreReply::LoginFailureCounted(Ok(counted))
                }
                StoreCommand::ClearLoginFailures { user } => {
                    self.failures.remove(user);
                    StoreReply::LoginFailuresCleared
                }
                other => panic!("route login sent {other:?}"),
            }
        }
    }

    struct Harness {
        m: RouteLogin,
        store: Store,
        t0: Instant,
        next_api: u64,
    }

    impl Harness {
        fn new(live: &[&str]) -> Self {
            Self::with_config(live, config())
        }

        fn with_config(live: &[&str], config: RouteLoginConfig) -> Self {
            let mut m = RouteLogin::new(
                config,
                TicketKeys::new(1, TICKET_SECRET.to_vec()),
                b"token-secret".to_vec(),
                Balancer::new(Strategy::RoundRobin, 0),
                42,
            );
            let t0 = t0();
            m.handle_registry(t0, WALL0, registry(live));
            Self {
                m,
                store: Store::default(),
                t0,
                next_api: 0,
            }
        }

        fn set_registry(&mut self, ms: u64, live: &[&str]) -> Vec<RouteEvent> {
            let (now, wall) = self.at(ms);
            self.m.handle_registry(now, wall, registry(live));
            self.run(ms)
        }

        fn kick_done(&mut self, ms: u64, server: &str, user: u64, below: u64) -> Vec<RouteEvent> {
            let (now, wall) = self.at(ms);
            self.m.handle_kick_done(
                now,
                wall,
                &ServerId::new(server),
                UserId(user),
                Epoch(below),
            );
            self.run(ms)
        }

        fn timeout(&mut self, ms: u64) -> Vec<RouteEvent> {
            self.m.handle_timeout(self.at(ms).0);
            self.run(ms)
        }

        fn at(&self, ms: u64) -> (Instant, UnixMillis) {
            (
                self.t0 + Duration::from_millis(ms),
                UnixMillis(WALL0.0 + ms),
            )
        }

        fn api(&mut self) -> ApiRequestId {
            self.next_api += 1;
            ApiRequestId(self.next_api)
        }

        /// Answers store requests and runs password jobs until there are none, then drains
        /// the events.
        fn run(&mut self, ms: u64) -> Vec<RouteEvent> {
            let (now, wall) = self.at(ms);
            loop {
                if let Some(req) = self.m.poll_store() {
                    let reply = self.store.answer(wall, &req.command);
                    self.m.handle_store_reply(now, wall, req.id, Ok(reply));
                } else if let Some(job) = self.m.poll_password() {
                    self.m.handle_password(now, job.id, job.work.run());
                } else {
                    break;
                }
            }
            std::iter::from_fn(|| self.m.poll_event()).collect()
        }

        /// Answers the store request the machine must have queued next (from the store),
        /// at `ms`, and returns its command.
        fn store_step(&mut self, ms: u64) -> StoreCommand {
            let (now, wall) = self.at(ms);
            let req = self.m.poll_store().expect("a store request");
            let reply = self.store.answer(wall, &req.command);
            self.m.handle_store_reply(now, wall, req.id, Ok(reply));
            req.command
        }

        /// Runs the one password job the machine must have queued, at `ms`.
        fn password(&mut self, ms: u64) {
            let job = self.m.poll_password().expect("a password job");
            assert!(self.m.poll_password().is_none(), "one job at a time here");
            self.m
                .handle_password(self.at(ms).0, job.id, job.work.run());
        }

        fn register(&mut self, ms: u64, name: &str, password: &str) -> Vec<RouteEvent> {
            let api = self.api();
            self.m.handle_register(self.at(ms).0, api, name, password);
            self.run(ms)
        }

        fn login(&mut self, ms: u64, user: u64, resume: Option<&ResumeToken>) -> Vec<RouteEvent> {
            self.start_login(ms, user, "alice", "pw", resume);
            self.run(ms)
        }

        fn start_login(
            &mut self,
            ms: u64,
            user: u64,
            name: &str,
            password: &str,
            resume: Option<&ResumeToken>,
        ) -> ApiRequestId {
            let api = self.api();
            let request = LoginRequest {
                user: UserId(user),
                name: name.into(),
                password: password.into(),
                resume_token: resume.cloned(),
            };
            self.m.handle_login(self.at(ms).0, api, request);
            api
        }

        fn logout(&mut self, ms: u64, token: &str) -> Vec<RouteEvent> {
            let api = self.api();
            let (now, wall) = self.at(ms);
            self.m.handle_logout(now, wall, api, token);
            self.run(ms)
        }

        /// Registers alice (user 1, password "pw").
        fn with_alice(live: &[&str]) -> Self {
            Self::with_alice_and(live, config())
        }

        fn with_alice_and(live: &[&str], config: RouteLoginConfig) -> Self {
            let mut h = Self::with_config(live, config);
            let events = h.register(0, "alice", "pw");
            assert!(matches!(
                events[..],
                [RouteEvent::Registered { result: Ok(_), .. }]
            ));
            h
        }
    }

    fn login_ok(events: &[RouteEvent]) -> &LoginAnswer {
        match events.last() {
            Some(RouteEvent::LoggedIn { result: Ok(a), .. }) => a,
            other => panic!("expected a successful login, got {other:?}"),
        }
    }

    fn login_err(events: &[RouteEvent]) -> LoginError {
        match events {
            [RouteEvent::LoggedIn { result: Err(e), .. }] => *e,
            other => panic!("expected one failed login, got {other:?}"),
        }
    }

    #[test]
    fn register_table() {
        let mut h = Harness::new(&["s1"]);
        assert_eq!(
            h.register(0, "alice", "pw"),
            vec![RouteEvent::Registered {
                api: ApiRequestId(1),
                result: Ok(Registered {
                    user: UserId(1),
                    name: "alice".into()
                })
            }]
        );
        let stored = &h.store.accounts[&UserId(1)];
        assert!(accounts::verify_password("pw", &stored.password_hash));
        assert!(!accounts::verify_password("pw2", &stored.password_hash));

        let cases: &[(&str, &str, RegisterFailure, &str)] = &[
            ("alice", "other", RegisterFailure::NameTaken, "3000"),
            (
                "",
                "pw",
                RegisterFailure::Invalid(RegisterError::EmptyName),
                "3000",
            ),
            (
                "bob",
                "",
                RegisterFailure::Invalid(RegisterError::EmptyPassword),
                "3000",
            ),
            (
                "b b",
                "pw",
                RegisterFailure::Invalid(RegisterError::BadNameCharacter),
                "3000",
            ),
        ];
        for (name, pw, want, code) in cases {
            let events = h.register(0, name, pw);
            match &events[..] {
                [RouteEvent::Registered { result: Err(e), .. }] => {
                    assert_eq!(e, want, "{name:?}");
                    assert_eq!(e.code(), *code);
                }
                other => panic!("{name:?}: {other:?}"),
            }
        }
        assert_eq!(h.store.accounts.len(), 1);
        // Validation failures never reach the store.
        assert!(h.m.poll_store().is_none());
    }

    #[test]
    fn fresh_login_claims_epoch_one_and_mints_credentials() {
        let mut h = Harness::with_alice(&["s1"]);
        let events = h.login(1_000, 1, None);
        assert_eq!(events.len(), 1, "{events:?}");
        let a = login_ok(&events).clone();
        let wall = h.at(1_000).1;
        assert_eq!(
            (a.user, a.epoch, a.server.id.as_str()),
            (UserId(1), Epoch(1), "s1")
        );

        let grant = TicketKeys::new(1, TICKET_SECRET.to_vec())
            .verify(&a.ticket, &ServerId::new("s1"), wall, Duration::ZERO)
            .unwrap();
        assert_eq!(grant.epoch, Epoch(1));
        assert_eq!(grant.expires_at, wall.plus(Duration::from_secs(30)));

        let bearer = h.m.verify_bearer(&a.token, wall).unwrap();
        assert_eq!((bearer.user, bearer.epoch), (UserId(1), Epoch(1)));

        let state = h.store.claims.load(UserId(1));
        let claim = state.claim.unwrap();
        assert_eq!(state.epoch, Epoch(1));
        assert_eq!(claim.server, ServerId::new("s1"));
        assert_eq!(claim.lease_until, wall.plus(Duration::from_secs(30)));
        assert_eq!(claim.resume_token_hash, resume_token_hash(&a.resume_token));
        assert!(h.m.poll_timeout().is_none(), "nothing pending");
    }

    #[test]
    fn account_mismatches_are_9100_and_claim_nothing() {
        let mut h = Harness::with_alice(&["s1"]);
        let cases: &[(&str, u64, &str, &str)] = &[
            ("wrong password", 1, "alice", "nope"),
            ("unknown user", 9, "alice", "pw"),
            ("name of another id", 1, "mallory", "pw"),
            ("overlong password", 1, "alice", &"p".repeat(129)),
        ];
        for (label, user, name, pw) in cases {
            h.start_login(0, *user, name, pw, None);
            let e = login_err(&h.run(0));
            assert_eq!(e, LoginError::AccountMismatch, "{label}");
            assert_eq!(e.code(), "9100");
        }
        assert_eq!(h.store.claims.load(UserId(1)), ClaimState::default());
    }

    #[test]
    fn names_ignore_case_and_id_zero_logs_in_by_name() {
        let cases: &[(&str, u64, &str, &str, Option<u64>)] = &[
            ("as registered", 1, "alice", "pw", Some(1)),
            ("other case", 1, "ALICE", "pw", Some(1)),
            ("mixed case", 1, "aLiCe", "pw", Some(1)),
            ("by name, id 0", 0, "Alice", "pw", Some(1)),
            ("by name, wrong password", 0, "alice", "nope", None),
            ("by unknown name", 0, "mallory", "pw", None),
            ("other case, wrong id", 2, "ALICE", "pw", None),
        ];
        for (label, user, name, pw, want) in cases {
            let mut h = Harness::with_alice(&["s1"]);
            h.start_login(0, *user, name, pw, None);
            let events = h.run(0);
            match want {
                Some(id) => assert_eq!(login_ok(&events).user, UserId(*id), "{label}"),
                None => assert_eq!(login_err(&events), LoginError::AccountMismatch, "{label}"),
            }
        }
    }

    #[test]
    fn duplicate_login_is_5000() {
        let mut h = Harness::with_alice(&["s1"]);
        let first = login_ok(&h.login(0, 1, None)).clone();
        let before = h.store.claims.load(UserId(1));
        let e = login_err(&h.login(29_999, 1, None));
        assert_eq!((e, e.code()), (LoginError::RepeatLogin, "5000"));
        // A wrong resume token is no better than none.
        let wrong = ResumeToken([0x55; 32]);
        assert_eq!(
            login_err(&h.login(1_000, 1, Some(&wrong))),
            LoginError::RepeatLogin
        );
        assert_eq!(h.store.claims.load(UserId(1)), before);
        assert_ne!(first.resume_token, wrong);
    }

    fn kick_old(server: &str, user: u64, below: u64) -> RouteEvent {
        RouteEvent::KickOld {
            server: ServerId::new(server),
            user: UserId(user),
            below_epoch: Epoch(below),
        }
    }

    /// The ticket's expiry, as the server would read it.
    fn ticket_expiry(answer: &LoginAnswer) -> UnixMillis {
        UnixMillis(answer.ticket.expires_at_ms)
    }

    /// Alice logged in at 0 (epoch 1 on s1, lease to 30 s, never bound), and a takeover
    /// with her resume token started at 1 s and got its claim: the answer is held.
    fn held_takeover(live: &[&str]) -> (Harness, LoginAnswer, ApiRequestId) {
        let mut h = Harness::with_alice(live);
        let first = login_ok(&h.login(0, 1, None)).clone();
        assert_eq!(first.server.id.as_str(), "s1");
        let api = h.start_login(1_000, 1, "alice", "pw", Some(&first.resume_token));
        assert_eq!(
            h.run(1_000),
            vec![kick_old("s1", 1, 2)],
            "answer must be held"
        );
        let claim = h.store.claims.load(UserId(1)).claim.unwrap();
        assert_eq!(claim.epoch, Epoch(2), "the claim is taken before the hold");
        // The new claim outlives the old lease (30 s) by a whole claim_ttl.
        assert_eq!(claim.lease_until, UnixMillis(WALL0.0 + 60_000));
        assert_eq!(
            h.m.poll_timeout(),
            Some((h.t0 + Duration::from_secs(30), TimerReason::TakeoverHold))
        );
        (h, first, api)
    }

    #[test]
    fn takeover_is_held_until_the_old_server_confirms_the_kick() {
        let (mut h, first, api) = held_takeover(&["s1"]);
        // Reports that do not cover the old session change nothing.
        for (server, user, below) in [("s2", 1, 2), ("s1", 2, 2), ("s1", 1, 1)] {
            assert_eq!(
                h.kick_done(5_000, server, user, below),
                vec![],
                "{server} {user} {below}"
            );
        }
        let events = h.kick_done(6_000, "s1", 1, 2);
        let second = login_ok(&events).clone();
        assert!(matches!(events[..], [RouteEvent::LoggedIn { api: a, .. }] if a == api));
        assert_eq!((second.epoch, second.server.id.as_str()), (Epoch(2), "s1"));
        // Minted on release, so the ticket's life counts from then.
        assert_eq!(ticket_expiry(&second), UnixMillis(WALL0.0 + 36_000));
        let bearer = h.m.verify_bearer(&second.token, h.at(6_000).1).unwrap();
        assert_eq!((bearer.user, bearer.epoch), (UserId(1), Epoch(2)));
        assert_ne!(second.resume_token, first.resume_token);
        assert_eq!(
            h.store
                .claims
                .load(UserId(1))
                .claim
                .unwrap()
                .resume_token_hash,
            resume_token_hash(&second.resume_token)
        );
        assert_eq!(h.m.poll_timeout(), None);
        // Answered once: a repeated report and the old deadline do nothing.
        assert_eq!(h.kick_done(7_000, "s1", 1, 2), vec![]);
        assert_eq!(h.timeout(30_000), vec![]);
        // A retry with the token the takeover was asked with (its client gave up before
        // the release) gets the same answer again: same claim, no new takeover or kick.
        let events = h.login(8_000, 1, Some(&first.resume_token));
        let again = login_ok(&events);
        assert_eq!(
            (again.epoch, &again.resume_token),
            (Epoch(2), &second.resume_token)
        );
        assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(2));
        // Past claim_ttl after the release, the route has forgotten the answer, but the
        // claim's token is still the first one's derivation: a retry of that login (its
        // answer lost with a crashed route) takes the claim over again, asking every live
        // server, since the session it waited for may be anywhere.
        assert_eq!(
            h.login(36_001, 1, Some(&first.resume_token)),
            vec![kick_old("s1", 1, 3)]
        );
        assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(3));
        // A token the claim does not derive from is refused.
        assert_eq!(
            login_err(&h.login(36_002, 1, Some(&ResumeToken([7; 32])))),
            LoginError::RepeatLogin
        );
    }

    #[test]
    fn a_retry_whose_answer_was_lost_takes_over_waiting_on_every_server() {
        // A takeover is held on s1; the route then crashes: a new route (same secrets, no
        // memory) meets the retry presenting the token the takeover was asked with.
        let (h, first, _) = held_takeover(&["s1", "s2", "s3"]);
        let mut h2 = Harness::new(&["s1", "s2", "s3"]);
        h2.store = h.store.clone();
        let events = h2.login(2_000, 1, Some(&first.resume_token));
        assert_eq!(
            events,
            vec![
                kick_old("s1", 1, 3),
                kick_old("s2", 1, 3),
                kick_old("s3", 1, 3)
            ],
            "every live server is asked"
        );
        assert_eq!(h2.store.claims.load(UserId(1)).epoch, Epoch(3));
        assert_eq!(h2.kick_done(2_100, "s1", 1, 3), vec![]);
        assert_eq!(h2.kick_done(2_200, "s3", 1, 3), vec![]);
        // The last one to confirm releases the answer.
        let events = h2.kick_done(2_300, "s2", 1, 3);
        let answer = login_ok(&events);
        assert_eq!(answer.epoch, Epoch(3));
        assert_eq!(
            h2.store
                .claims
                .load(UserId(1))
                .claim
                .unwrap()
                .resume_token_hash,
            resume_token_hash(&answer.resume_token)
        );
        // Another route (the same secret) derives the same token: the claim is this one's.
        assert_eq!(
            h2.m.bearer
                .derive_resume(&first.resume_token, UserId(1), Epoch(3)),
            answer.resume_token
        );
    }

    /// A client's first login presents a token of its own making. If the answer is lost,
    /// its retry (same token) takes the claim over instead of being refused as a repeat
    /// login until the claim's lease runs out; a login with any other token still is.
    #[test]
    fn a_first_login_retried_with_its_own_token_takes_its_claim_over() {
        let mut h = Harness::with_alice(&["s1", "s2"]);
        let own = ResumeToken([0x5e; 32]);
        // The answer is lost: the client never learns this claim's token.
        let lost = login_ok(&h.login(0, 1, Some(&own))).clone();
        assert_eq!(lost.epoch, Epoch(1));
        assert_eq!(
            login_err(&h.login(100, 1, Some(&ResumeToken([0x77; 32])))),
            LoginError::RepeatLogin,
            "someone else's token is a repeat login"
        );
        assert_eq!(
            login_err(&h.login(100, 1, None)),
            LoginError::RepeatLogin,
            "no token is a repeat login"
        );
        let events = h.login(200, 1, Some(&own));
        assert_eq!(
            events,
            vec![kick_old("s1", 1, 2), kick_old("s2", 1, 2)],
            "the retry takes over, waiting on every live server"
        );
        h.kick_done(300, "s1", 1, 2);
        let answer = login_ok(&h.kick_done(300, "s2", 1, 2)).clone();
        assert_eq!(answer.epoch, Epoch(2));
    }

    #[test]
    fn logins_are_not_placed_on_a_server_whose_link_is_down() {
        let mut h = Harness::with_alice(&["s1", "s2"]);
        for name in ["bob", "carol", "dave"] {
            assert!(matches!(
                h.register(0, name, "pw")[..],
                [RouteEvent::Registered { result: Ok(_), .. }]
            ));
        }
        let server_of = |h: &mut Harness, user: u64, name: &str| {
            h.start_login(100, user, name, "pw", None);
            login_ok(&h.run(100)).server.id.as_str().to_owned()
        };
        // Only s2's link is up; s1's never came up (a wrong link secret, say). Round robin
        // would start with s1; it has no link, so both go to s2.
        h.m.handle_server_reachable(&ServerId::new("s2"));
        assert_eq!(server_of(&mut h, 1, "alice"), "s2");
        assert_eq!(server_of(&mut h, 2, "bob"), "s2");
        // Back up: placement uses it again.
        h.m.handle_server_reachable(&ServerId::new("s1"));
        assert_eq!(server_of(&mut h, 3, "carol"), "s1");
        // With every link down, logins are placed on any live server rather than refused.
        h.m.handle_server_unreachable(&ServerId::new("s1"));
        h.m.handle_server_unreachable(&ServerId::new("s2"));
        assert_eq!(server_of(&mut h, 4, "dave"), "s2");
    }

    #[test]
    fn a_reconnected_old_server_is_asked_again() {
        let (mut h, _, api) = held_takeover(&["s1", "s2"]);
        // The first kick went nowhere (the link was down); a link to s1 comes up again.
        h.m.handle_server_reachable(&ServerId::new("s2"));
        assert_eq!(h.run(2_000), vec![], "only the old server is asked");
        h.m.handle_server_reachable(&ServerId::new("s1"));
        assert_eq!(h.run(2_000), vec![kick_old("s1", 1, 2)]);
        let events = h.kick_done(2_100, "s1", 1, 2);
        assert!(matches!(events[..], [RouteEvent::LoggedIn { api: a, result: Ok(_) }] if a == api));
    }

    #[test]
    fn a_retry_during_the_hold_joins_the_held_answer() {
        let (mut h, first, api) = held_takeover(&["s1"]);
        // The client timed out and retries with the token it has: no second takeover.
        let retry = h.start_login(6_000, 1, "alice", "pw", Some(&first.resume_token));
        assert_eq!(h.run(6_000), vec![], "joins the hold, no new kick");
        assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(2));
        // Without the token a login is still refused.
        assert_eq!(login_err(&h.login(6_500, 1, None)), LoginError::RepeatLogin);
        let events = h.kick_done(7_000, "s1", 1, 2);
        let answered: Vec<ApiRequestId> = events
            .iter()
            .map(|e| match e {
                RouteEvent::LoggedIn { api, result: Ok(a) } => {
                    assert_eq!(a.epoch, Epoch(2));
                    *api
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(answered.len(), 2);
        assert!(answered.contains(&api) && answered.contains(&retry));
    }

    #[test]
    fn held_takeover_is_released_when_the_old_lease_runs_out() {
        let (mut h, _, api) = held_takeover(&["s1"]);
        assert_eq!(h.timeout(29_999), vec![]);
        let events = h.timeout(30_000);
        assert!(matches!(events[..], [RouteEvent::LoggedIn { api: a, result: Ok(_) }] if a == api));
        // The wall clock at release is derived from the monotonic time elapsed since the hold.
        assert_eq!(
            ticket_expiry(login_ok(&events)),
            UnixMillis(WALL0.0 + 60_000)
        );
        assert_eq!(h.m.poll_timeout(), None);
    }

    #[test]
    fn held_takeover_is_released_when_the_old_server_leaves_the_registry() {
        let (mut h, _, api) = held_takeover(&["s1", "s2"]);
        // A change that keeps s1 releases nothing.
        assert_eq!(h.set_registry(2_000, &["s1", "s2", "s3"]), vec![]);
        let events = h.set_registry(3_000, &["s2", "s3"]);
        assert!(matches!(events[..], [RouteEvent::LoggedIn { api: a, result: Ok(_) }] if a == api));
        let a = login_ok(&events);
        assert_eq!((a.epoch, a.server.id.as_str()), (Epoch(2), "s2"));
        assert_eq!(ticket_expiry(a), UnixMillis(WALL0.0 + 33_000));
        assert_eq!(h.m.poll_timeout(), None);
    }

    #[test]
    fn takeover_when_the_old_server_left_the_registry() {
        let mut h = Harness::with_alice(&["s1"]);
        login_ok(&h.login(0, 1, None));
        assert_eq!(h.set_registry(500, &["s2"]), vec![]);
        // Answered at once (no one to wait for); the kick is still sent, best effort.
        let events = h.login(1_000, 1, None);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0], kick_old("s1", 1, 2));
        let a = login_ok(&events);
        assert_eq!((a.epoch, a.server.id.as_str()), (Epoch(2), "s2"));
        assert_eq!(ticket_expiry(a), UnixMillis(WALL0.0 + 31_000));
        assert_eq!(h.m.poll_timeout(), None, "nothing held");
    }

    #[test]
    fn expired_claim_gives_a_fresh_login() {
        let mut h = Harness::with_alice(&["s1"]);
        login_ok(&h.login(0, 1, None));
        // claim_ttl is 30 s: live at 29.999 s, expired at 30 s.
        assert_eq!(
            login_err(&h.login(29_999, 1, None)),
            LoginError::RepeatLogin
        );
        let events = h.login(30_000, 1, None);
        assert_eq!(events.len(), 1, "no kick for an expired claim: {events:?}");
        assert_eq!(login_ok(&events).epoch, Epoch(2));
    }

    #[test]
    fn no_live_server_is_7100() {
        let mut h = Harness::with_alice(&[]);
        let e = login_err(&h.login(0, 1, None));
        assert_eq!((e, e.code()), (LoginError::NoServerAvailable, "7100"));
        assert_eq!(h.store.claims.load(UserId(1)), ClaimState::default());
    }

    #[test]
    fn lost_claim_race_redecides_to_5000() {
        let mut h = Harness::with_alice(&["s1"]);
        let (now, wall) = h.at(0);
        // Login A reads the account and the (empty) claim state...
        h.start_login(0, 1, "alice", "pw", None);
        let load_account = h.m.poll_store().unwrap();
        let reply = h.store.answer(wall, &load_account.command);
        h.m.handle_store_reply(now, wall, load_account.id, Ok(reply));
        h.store_step(0); // counts the attempt
        h.password(0);
        let load_claim = h.m.poll_store().unwrap();
        assert_eq!(
            load_claim.command,
            StoreCommand::LoadClaim { user: UserId(1) }
        );
        let stale = h.store.answer(wall, &load_claim.command);
        // ...then login B wins the claim before A's ReplaceClaim lands.
        let b = h.login(0, 1, None);
        assert_eq!(login_ok(&b).epoch, Epoch(1));
        h.m.handle_store_reply(now, wall, load_claim.id, Ok(stale));
        let replace = h.m.poll_store().unwrap();
        assert!(matches!(
            replace.command,
            StoreCommand::ReplaceClaim {
                expected: Epoch(0),
                ..
            }
        ));
        let lost = h.store.answer(wall, &replace.command);
        assert!(matches!(lost, StoreReply::ClaimReplaced(Err(_))));
        h.m.handle_store_reply(now, wall, replace.id, Ok(lost));
        // A re-decides against the winner's live claim, without another store round trip.
        assert!(h.m.poll_store().is_none());
        assert_eq!(login_err(&h.run(0)), LoginError::RepeatLogin);
        assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(1));
    }

    #[test]
    fn endless_races_give_up_with_4000() {
        let mut h = Harness::with_alice(&["s1"]);
        let (now, wall) = h.at(0);
        h.start_login(0, 1, "alice", "pw", None);
        let req = h.m.poll_store().unwrap();
        let reply = h.store.answer(wall, &req.command);
        h.m.handle_store_reply(now, wall, req.id, Ok(reply));
        h.store_step(0); // counts the attempt
        h.password(0);
        let mut req = h.m.poll_store().unwrap();
        h.m.handle_store_reply(
            now,
            wall,
            req.id,
            Ok(StoreReply::Claim(ClaimState::default())),
        );
        assert_eq!(
            h.store_step(0),
            StoreCommand::ClearLoginFailures { user: UserId(1) }
        );
        // Every ReplaceClaim loses to a released claim with a higher counter: each retry is
        // a fresh decision, until the bound (3 retries) is spent.
        for round in 1..=4u64 {
            req = h.m.poll_store().unwrap();
            let StoreCommand::ReplaceClaim {
                expected, claim, ..
            } = &req.command
            else {
                panic!("{req:?}");
            };
            assert_eq!(*expected, Epoch(round - 1));
            assert_eq!(claim.epoch, Epoch(round));
            let winner = ClaimState {
                epoch: Epoch(round),
                claim: None,
            };
            h.m.handle_store_reply(
                now,
                wall,
                req.id,
                Ok(StoreReply::ClaimReplaced(Err(winner))),
            );
        }
        assert!(h.m.poll_store().is_none());
        assert_eq!(login_err(&h.run(0)), LoginError::Unavailable);
    }

    #[test]
    fn store_timeout_is_4000_and_late_replies_are_ignored() {
        let mut h = Harness::with_alice(&["s1"]);
        let api = h.start_login(0, 1, "alice", "pw", None);
        let req = h.m.poll_store().unwrap();
        assert_eq!(
            h.m.poll_timeout(),
            Some((h.t0 + Duration::from_secs(2), TimerReason::StoreDeadline))
        );
        h.m.handle_timeout(h.t0 + Duration::from_millis(1_999));
        assert_eq!(h.m.poll_event(), None);
        h.m.handle_timeout(h.t0 + Duration::from_secs(2));
        assert_eq!(
            h.m.poll_event(),
            Some(RouteEvent::LoggedIn {
                api,
                result: Err(LoginError::Unavailable)
            })
        );
        assert_eq!(h.m.poll_timeout(), None);
        // The reply arrives after all: nothing happens.
        let (now, wall) = h.at(2_500);
        let reply = h.store.answer(wall, &req.command);
        h.m.handle_store_reply(now, wall, req.id, Ok(reply));
        assert_eq!((h.m.poll_store(), h.m.poll_event()), (None, None));
    }

    #[test]
    fn store_errors_are_4000() {
        let mut h = Harness::new(&["s1"]);
        let api = h.api();
        let (now, wall) = h.at(0);
        h.m.handle_register(now, api, "alice", "pw");
        h.password(0);
        let req = h.m.poll_store().unwrap();
        h.m.handle_store_reply(now, wall, req.id, Err(StoreUnavailable("down".into())));
        assert_eq!(
            h.m.poll_event(),
            Some(RouteEvent::Registered {
                api,
                result: Err(RegisterFailure::Unavailable)
            })
        );
        // A reply of the wrong kind is treated the same, not trusted.
        h.m.handle_register(now, api, "alice", "pw");
        h.password(0);
        let req = h.m.poll_store().unwrap();
        h.m.handle_store_reply(now, wall, req.id, Ok(StoreReply::CursorsAdvanced));
        assert_eq!(
            h.m.poll_event(),
            Some(RouteEvent::Registered {
                api,
                result: Err(RegisterFailure::Unavailable)
            })
        );
    }

    #[test]
    fn login_verifies_the_password_outside_the_machine() {
        let mut h = Harness::with_alice(&["s1"]);
        let (now, wall) = h.at(0);
        h.start_login(0, 1, "alice", "pw", None);
        let load = h.m.poll_store().unwrap();
        let reply = h.store.answer(wall, &load.command);
        h.m.handle_store_reply(now, wall, load.id, Ok(reply));
        // The attempt is counted against the account's throttle first.
        assert_eq!(
            h.store_step(0),
            StoreCommand::CountLoginFailure {
                user: UserId(1),
                expected: 0,
                forget_after: Duration::from_secs(900)
            }
        );
        // Nothing moves until the verification's outcome comes back.
        assert_eq!((h.m.poll_store(), h.m.poll_event()), (None, None));
        let job = h.m.poll_password().unwrap();
        let stored = h.store.accounts[&UserId(1)].password_hash.clone();
        assert_eq!(
            job.work,
            PasswordWork::Verify {
                password: "pw".into(),
                phc: stored
            }
        );
        assert_eq!(job.deadline, h.t0 + Duration::from_secs(5));
        assert_eq!(
            h.m.poll_timeout(),
            Some((job.deadline, TimerReason::StoreDeadline))
        );
        assert_eq!(
            format!("{:?}", job.work),
            "Verify(..)",
            "never prints a password"
        );
        // The outcome comes 40 ms later (argon2 on a worker thread).
        let later = h.at(40).0;
        h.m.handle_password(later, job.id, PasswordOutcome::Verified(true));
        assert_eq!(
            h.m.poll_store().unwrap().command,
            StoreCommand::LoadClaim { user: UserId(1) }
        );
        // ...and a success clears the count.
        assert_eq!(
            h.m.poll_store().unwrap().command,
            StoreCommand::ClearLoginFailures { user: UserId(1) }
        );
        assert_eq!(
            h.m.poll_timeout(),
            Some((later + Duration::from_secs(2), TimerReason::StoreDeadline))
        );
    }

    #[test]
    fn password_outcome_table() {
        // (label, user id, name, outcome fed back, expected result: None = goes on to LoadClaim)
        let cases: Vec<(&str, u64, &str, PasswordOutcome, Option<LoginError>)> = vec![
            (
                "right password",
                1,
                "alice",
                PasswordOutcome::Verified(true),
                None,
            ),
            (
                "wrong password",
                1,
                "alice",
                PasswordOutcome::Verified(false),
                Some(LoginError::AccountMismatch),
            ),
            (
                "wrong name, password matches",
                1,
                "bob",
                PasswordOutcome::Verified(true),
                Some(LoginError::AccountMismatch),
            ),
            (
                "unknown id, even if the dummy matched",
                9,
                "alice",
                PasswordOutcome::Verified(true),
                Some(LoginError::AccountMismatch),
            ),
            (
                "outcome of the wrong kind",
                1,
                "alice",
                PasswordOutcome::Hashed(Ok("x".into())),
                Some(LoginError::Busy),
            ),
        ];
        for (label, user, name, outcome, want) in cases {
            let mut h = Harness::with_alice(&["s1"]);
            let (now, wall) = h.at(0);
            h.start_login(0, user, name, "pw", None);
            let load = h.m.poll_store().unwrap();
            let reply = h.store.answer(wall, &load.command);
            h.m.handle_store_reply(now, wall, load.id, Ok(reply));
            if user == 1 {
                h.store_step(0); // counts the attempt
            }
            let job = h.m.poll_password().unwrap();
            h.m.handle_password(now, job.id, outcome);
            match want {
                None => {
                    let next = h.m.poll_store().map(|r| r.command);
                    assert_eq!(
                        next,
                        Some(StoreCommand::LoadClaim { user: UserId(1) }),
                        "{label}"
                    );
                }
                Some(e) => {
                    assert_eq!(login_err(&[h.m.poll_event().unwrap()]), e, "{label}");
                    assert!(h.m.poll_store().is_none(), "{label}");
                }
            }
        }
    }

    #[test]
    fn unknown_ids_verify_against_the_dummy_hash() {
        let mut h = Harness::with_alice(&["s1"]);
        let (now, wall) = h.at(0);
        let mut dummies = Vec::new();
        for user in [7, 8] {
            h.start_login(0, user, "alice", "pw", None);
            let load = h.m.poll_store().unwrap();
            let reply = h.store.answer(wall, &load.command);
            h.m.handle_store_reply(now, wall, load.id, Ok(reply));
            match h.m.poll_password().unwrap().work {
                PasswordWork::Verify { phc, .. } => dummies.push(phc),
                other => panic!("{other:?}"),
            }
        }
        // A real argon2id hash with the configured parameters (same cost as a real check),
        // the same one for every unknown id, and not alice's.
        assert!(
            dummies[0].starts_with("$argon2id$v=19$m=64,t=1,p=1$"),
            "{}",
            dummies[0]
        );
        assert_eq!(dummies[0], dummies[1]);
        assert_ne!(dummies[0], h.store.accounts[&UserId(1)].password_hash);
    }

    #[test]
    fn registration_hashes_outside_the_machine() {
        let mut h = Harness::new(&["s1"]);
        let now = h.at(0).0;
        let (a, b) = (h.api(), h.api());
        h.m.handle_register(now, a, "alice", "pw");
        h.m.handle_register(now, b, "bob", "pw");
        assert!(h.m.poll_store().is_none(), "nothing stored before the hash");
        let (ja, jb) = (h.m.poll_password().unwrap(), h.m.poll_password().unwrap());
        let salt = |job: &PasswordJob| match &job.work {
            PasswordWork::Hash {
                params,
                salt,
                password,
            } => {
                assert_eq!((params, password.as_str()), (&config().password, "pw"));
                *salt
            }
            other => panic!("{other:?}"),
        };
        assert_ne!(salt(&ja), salt(&jb), "a fresh salt per account");
        // alice's hash fails (only bad parameters can): 4000, nothing stored.
        h.m.handle_password(
            now,
            ja.id,
            PasswordOutcome::Hashed(Err(HashError("bad params".into()))),
        );
        assert_eq!(
            h.m.poll_event(),
            Some(RouteEvent::Registered {
                api: a,
                result: Err(RegisterFailure::Unavailable)
            })
        );
        assert!(h.m.poll_store().is_none());
        // bob's hash is stored as computed.
        let outcome = jb.work.run();
        let PasswordOutcome::Hashed(Ok(phc)) = &outcome else {
            panic!("{outcome:?}");
        };
        let phc = phc.clone();
        h.m.handle_password(now, jb.id, outcome);
        assert_eq!(
            h.m.poll_store().unwrap().command,
            StoreCommand::RegisterAccount {
                name: "bob".into(),
                password_hash: phc
            }
        );
    }

    #[test]
    fn password_job_timeout_is_busy_and_late_outcomes_are_ignored() {
        let mut h = Harness::with_alice(&["s1"]);
        let (now, wall) = h.at(0);
        let api = h.start_login(0, 1, "alice", "pw", None);
        let load = h.m.poll_store().unwrap();
        let reply = h.store.answer(wall, &load.command);
        h.m.handle_store_reply(now, wall, load.id, Ok(reply));
        h.store_step(0); // counts the attempt
        let job = h.m.poll_password().unwrap();
        h.m.handle_timeout(h.at(4_999).0);
        assert_eq!(h.m.poll_event(), None);
        // A password check that did not come back in time is the route's queue, not the
        // store: "busy", never "store unavailable".
        h.m.handle_timeout(h.at(5_000).0);
        assert_eq!(
            h.m.poll_event(),
            Some(RouteEvent::LoggedIn {
                api,
                result: Err(LoginError::Busy)
            })
        );
        assert_eq!(h.m.poll_timeout(), None);
        // The pool got to it after all: nothing happens.
        h.m.handle_password(h.at(6_000).0, job.id, job.work.run());
        assert_eq!((h.m.poll_store(), h.m.poll_event()), (None, None));
        // Registration too: the hash's deadline fails it with "busy".
        let api = h.api();
        h.m.handle_register(h.at(7_000).0, api, "bob", "pw");
        assert!(h.m.poll_password().is_some());
        h.m.handle_timeout(h.at(12_000).0);
        assert_eq!(
            h.m.poll_event(),
            Some(RouteEvent::Registered {
                api,
                result: Err(RegisterFailure::Busy)
            })
        );
    }

    #[test]
    fn timed_out_claim_write_is_released() {
        let mut h = Harness::with_alice(&["s1"]);
        let (now, wall) = h.at(0);
        h.start_login(0, 1, "alice", "pw", None);
        let replace = loop {
            let req = h.m.poll_store().unwrap();
            if matches!(req.command, StoreCommand::ReplaceClaim { .. }) {
                break req;
            }
            let reply = h.store.answer(wall, &req.command);
            h.m.handle_store_reply(now, wall, req.id, Ok(reply));
            // After the attempt is counted: the password check.
            if let Some(job) = h.m.poll_password() {
                h.m.handle_password(now, job.id, job.work.run());
            }
        };
        // The store applies the ReplaceClaim but its reply is lost.
        h.store.answer(wall, &replace.command);
        assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(1));
        h.m.handle_timeout(now + Duration::from_secs(2));
        assert_eq!(
            login_err(&[h.m.poll_event().unwrap()]),
            LoginError::Unavailable
        );
        let cleanup = h.m.poll_store().unwrap();
        assert_eq!(
            cleanup.command,
            StoreCommand::ReleaseClaim {
                user: UserId(1),
                epoch: Epoch(1)
            }
        );
        let reply = h.store.answer(wall, &cleanup.command);
        h.m.handle_store_reply(now, wall, cleanup.id, Ok(reply));
        assert_eq!(h.m.poll_event(), None, "the cleanup answers nobody");
        // So the retry is not locked out by a claim whose resume token nobody has.
        assert_eq!(login_ok(&h.login(3_000, 1, None)).epoch, Epoch(2));
    }

    #[test]
    fn an_old_token_cannot_log_out_a_newer_session() {
        let mut h = Harness::with_alice(&["s1"]);
        let first = login_ok(&h.login(0, 1, None)).clone();
        assert_eq!(
            h.login(1_000, 1, Some(&first.resume_token)),
            vec![kick_old("s1", 1, 2)]
        );
        let second = login_ok(&h.kick_done(1_500, "s1", 1, 2)).clone();
        let events = h.logout(2_000, &first.token);
        assert!(
            matches!(
                events[..],
                [RouteEvent::LoggedOut {
                    result: Ok(LoggedOut {
                        user: UserId(1),
                        released: false
                    }),
                    ..
                }]
            ),
            "{events:?}"
        );
        assert_eq!(
            h.store.claims.load(UserId(1)).claim.unwrap().epoch,
            Epoch(2)
        );
        let events = h.logout(3_000, &second.token);
        assert!(
            matches!(
                events[..],
                [RouteEvent::LoggedOut {
                    result: Ok(LoggedOut {
                        user: UserId(1),
                        released: true
                    }),
                    ..
                }]
            ),
            "{events:?}"
        );
        assert_eq!(
            h.store.claims.load(UserId(1)),
            ClaimState {
                epoch: Epoch(2),
                claim: None
            }
        );
        // A forged token never reaches the store.
        let events = h.logout(3_000, "1.2.99999999999999.00");
        assert!(matches!(
            events[..],
            [RouteEvent::LoggedOut {
                result: Err(LogoutError::BadToken(TokenError::Malformed)),
                ..
            }]
        ));
        assert!(h.m.poll_store().is_none());
    }

    #[test]
    fn bearer_rotation_mints_with_the_current_secret_and_accepts_the_previous() {
        let claims = BearerClaims {
            user: UserId(7),
            epoch: Epoch(3),
            expires_at: UnixMillis(10_000),
        };
        let now = UnixMillis(9_999);
        let old = BearerKey::new(b"old".to_vec());
        let rotating = BearerKey::new(b"new".to_vec()).with_previous(Some(b"old".to_vec()));
        let new_only = BearerKey::new(b"new".to_vec());
        let before = old.mint(&claims);
        let after = rotating.mint(&claims);
        assert_eq!(rotating.verify(&before, now), Ok(claims));
        assert_eq!(
            new_only.verify(&after, now),
            Ok(claims),
            "minted with the new one"
        );
        assert_eq!(old.verify(&after, now), Err(TokenError::BadMac));
        assert_eq!(new_only.verify(&before, now), Err(TokenError::BadMac));
        assert_eq!(
            rotating.verify(&before, UnixMillis(10_000)),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn bearer_token_table() {
        let key = BearerKey::new(b"k".to_vec());
        let claims = BearerClaims {
            user: UserId(7),
            epoch: Epoch(3),
            expires_at: UnixMillis(10_000),
        };
        let good = key.mint(&claims);
        let mac = good.rsplit('.').next().unwrap().to_owned();
        let now = UnixMillis(9_999);
        let cases: Vec<(&str, String, UnixMillis, Result<BearerClaims, TokenError>)> = vec![
            ("valid", good.clone(), now, Ok(claims)),
            (
                "expired",
                good.clone(),
                UnixMillis(10_000),
                Err(TokenError::Expired),
            ),
            (
                "other user",
                format!("8.3.10000.{mac}"),
                now,
                Err(TokenError::BadMac),
            ),
            (
                "newer epoch",
                format!("7.4.10000.{mac}"),
                now,
                Err(TokenError::BadMac),
            ),
            (
                "longer life",
                format!("7.3.20000.{mac}"),
                now,
                Err(TokenError::BadMac),
            ),
            (
                "other key",
                BearerKey::new(b"j".to_vec()).mint(&claims),
                now,
                Err(TokenError::BadMac),
            ),
            (
                "leading zero",
                format!("07.3.10000.{mac}"),
                now,
                Err(TokenError::Malformed),
            ),
            (
                "plus sign",
                format!("+7.3.10000.{mac}"),
                now,
                Err(TokenError::Malformed),
            ),
            (
                "uppercase mac",
                format!("7.3.10000.{}", mac.to_uppercase()),
                now,
                Err(TokenError::Malformed),
            ),
            (
                "short mac",
                format!("7.3.10000.{}", &mac[..62]),
                now,
                Err(TokenError::Malformed),
            ),
            (
                "extra part",
                format!("{good}.x"),
                now,
                Err(TokenError::Malformed),
            ),
            (
                "missing part",
                format!("7.3.{mac}"),
                now,
                Err(TokenError::Malformed),
            ),
            ("empty", String::new(), now, Err(TokenError::Malformed)),
            (
                "overflow",
                format!("99999999999999999999.3.10000.{mac}"),
                now,
                Err(TokenError::Malformed),
            ),
            (
                "non-ascii",
                format!("7.3.10000.{}é", &mac[..62]),
                now,
                Err(TokenError::Malformed),
            ),
        ];
        for (label, token, now, want) in cases {
            assert_eq!(key.verify(&token, now), want, "{label}");
        }
    }

    // --- the per-account throttle and the password phase's bound ----------------------

    fn throttled_config() -> RouteLoginConfig {
        RouteLoginConfig {
            throttle: LoginThrottle {
                free_failures: 3,
                base_delay: Duration::from_secs(1),
                max_delay: Duration::from_secs(4),
            },
            ..config()
        }
    }

    /// One login of alice (user 1) at `ms` with `password`, to its end.
    fn attempt(
        h: &mut Harness,
        ms: u64,
        password: &str,
        resume: Option<&ResumeToken>,
    ) -> Vec<RouteEvent> {
        h.start_login(ms, 1, "alice", password, resume);
        h.run(ms)
    }

    fn failures(h: &Harness) -> LoginFailures {
        h.store
            .failures
            .get(&UserId(1))
            .copied()
            .unwrap_or_default()
    }

    #[test]
    fn failed_logins_grow_a_capped_delay_never_a_lock() {
        let mut h = Harness::with_alice_and(&["s1"], throttled_config());
        let wrong = |h: &mut Harness, ms| login_err(&attempt(h, ms, "guess", None));
        let throttled = |s: u64| LoginError::Throttled(Duration::from_millis(s));
        // (time ms, password, expected result)
        let steps: &[(u64, &str, LoginError)] = &[
            // Three free failures.
            (0, "guess", LoginError::AccountMismatch),
            (0, "guess", LoginError::AccountMismatch),
            (0, "guess", LoginError::AccountMismatch),
            // Then 1 s after the last one: even the right password is not checked.
            (0, "guess", throttled(1_000)),
            (0, "pw", throttled(1_000)),
            (999, "guess", throttled(1)),
            (1_000, "guess", LoginError::AccountMismatch),
            // 2 s, then 4 s, then capped at 4 s.
            (1_000, "guess", throttled(2_000)),
            (3_000, "guess", LoginError::AccountMismatch),
            (3_000, "guess", throttled(4_000)),
            (7_000, "guess", LoginError::AccountMismatch),
            (7_000, "guess", throttled(4_000)),
            (11_000, "guess", LoginError::AccountMismatch),
            (11_000, "guess", throttled(4_000)),
        ];
        for (i, (ms, password, want)) in steps.iter().enumerate() {
            let got = if *password == "guess" {
                wrong(&mut h, *ms)
            } else {
                login_err(&attempt(&mut h, *ms, password, None))
            };
            assert_eq!(got, *want, "step {i} at {ms} ms");
            // A throttled attempt checks no password.
            assert!(h.m.poll_password().is_none());
        }
        assert_eq!(throttled(1_500).code(), "4290");
        assert_eq!(
            throttled(1_500).to_string(),
            "too many failed logins for this account: retry in 2 s"
        );
        // The owner gets in once the delay has passed, which clears the record: the next
        // mistakes are free again.
        let events = attempt(&mut h, 15_000, "pw", None);
        assert_eq!(login_ok(&events).epoch, Epoch(1));
        assert_eq!(failures(&h).count, 0);
        assert_eq!(wrong(&mut h, 15_000), LoginError::AccountMismatch);
    }

    #[test]
    fn concurrent_guesses_cannot_all_pass_on_one_read() {
        let mut h = Harness::with_alice_and(&["s1"], throttled_config());
        // Ten guesses in flight at once: all read "no failures", but each is counted by a
        // compare-and-count before its check, so only the free three are checked.
        for _ in 0..10 {
            h.start_login(0, 1, "alice", "guess", None);
        }
        let events = h.run(0);
        let mut results: BTreeMap<&str, usize> = BTreeMap::new();
        for e in &events {
            let RouteEvent::LoggedIn { result: Err(e), .. } = e else {
                panic!("{e:?}");
            };
            *results.entry(e.code()).or_default() += 1;
        }
        assert_eq!(results, BTreeMap::from([("9100", 3), ("4290", 7)]));
        assert_eq!(failures(&h).count, 3);
    }

    #[test]
    fn a_resume_token_of_the_users_claim_skips_the_throttle() {
        let mut h = Harness::with_alice_and(&["s1"], throttled_config());
        let first = login_ok(&attempt(&mut h, 0, "pw", None)).clone();
        // An attacker spends the free failures and throttles the account.
        for _ in 0..3 {
            attempt(&mut h, 100, "guess", None);
        }
        assert_eq!(
            login_err(&attempt(&mut h, 100, "pw", None)),
            LoginError::Throttled(Duration::from_secs(1))
        );
        // A made-up resume token does not help.
        let forged = ResumeToken([7; 32]);
        assert_eq!(
            login_err(&attempt(&mut h, 100, "pw", Some(&forged))),
            LoginError::Throttled(Duration::from_secs(1))
        );
        // The owner's client, whose server crashed (gone from the registry), re-homes at
        // once with the resume token of its claim: a takeover, not slowed.
        h.set_registry(200, &["s2"]);
        let events = attempt(&mut h, 200, "pw", Some(&first.resume_token));
        let again = login_ok(&events);
        assert_eq!(again.epoch, Epoch(2));
        // Its success leaves the attacker's record alone...
        assert_eq!(failures(&h).count, 3);
        assert_eq!(
            login_err(&attempt(&mut h, 200, "guess", None)),
            LoginError::Throttled(Duration::from_millis(900))
        );
        // ...and a wrong password with a valid token is still counted.
        assert_eq!(
            login_err(&attempt(&mut h, 200, "guess", Some(&again.resume_token))),
            LoginError::AccountMismatch
        );
        assert_eq!(failures(&h).count, 4);
    }

    #[test]
    fn a_full_password_phase_answers_busy_at_once() {
        let mut h = Harness::with_alice_and(
            &["s1"],
            RouteLoginConfig {
                max_password_jobs: 2,
                ..config()
            },
        );
        let (now, wall) = h.at(0);
        // Two logins reach their password checks; the jobs have not come back yet. (Unknown
        // ids: checked against the dummy hash, nothing for the throttle to count.)
        let mut apis = Vec::new();
        for user in 7..10 {
            apis.push(h.start_login(0, user, "alice", "pw", None));
        }
        // Answer the three LoadAccounts (the third finds both places taken).
        for _ in 0..3 {
            let req = h.m.poll_store().unwrap();
            let reply = h.store.answer(wall, &req.command);
            h.m.handle_store_reply(now, wall, req.id, Ok(reply));
        }
        assert_eq!(
            h.m.poll_event(),
            Some(RouteEvent::LoggedIn {
                api: apis[2],
                result: Err(LoginError::Busy)
            })
        );
        assert_eq!(LoginError::Busy.code(), "4500");
        // A registration meanwhile is refused the same way, before any hashing.
        let api = h.api();
        h.m.handle_register(now, api, "bob", "pw-bob");
        assert_eq!(
            h.m.poll_event(),
            Some(RouteEvent::Registered {
                api,
                result: Err(RegisterFailure::Busy)
            })
        );
        assert_eq!(RegisterFailure::Busy.code(), "4500");
        // Once the two are through, there is room again.
        let events = h.run(0);
        let mismatches = events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    RouteEvent::LoggedIn {
                        result: Err(LoginError::AccountMismatch),
                        ..
                    }
                )
            })
            .count();
        assert_eq!(mismatches, 2, "{events:?}");
        let events = h.register(0, "bob", "pw-bob");
        assert!(matches!(
            events[..],
            [RouteEvent::Registered { result: Ok(_), .. }]
        ));
    }
}
