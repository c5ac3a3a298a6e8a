//! The Redis store: every [`StoreCommand`] as a Lua script (or one single-key command), with
//! the semantics of `cim_core::memstore::MemoryStore`. Key layout and atomicity: see the
//! module docs of [`super`].
//!
//! Here: connecting, the scripts, dispatching a command and running its calls. Each
//! command's step is in `commands`, the key names in `keys`, reading replies in `reply`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Pipeline, RedisError, Script, Value};
use bytes::Bytes;
use cim_core::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};
use cim_core::store::{
    Account, AccountSummary, AllFrom, AppendError, Appended, Claim, ClaimState, ConvHead, Deleted,
    LeaseRefresh, LoginFailures, MembersVersion, NameTaken, OnlineEntry, Recipients, RouteRecord,
    SendOrder, StoreCommand, StoreReply, StoreResult, StoreUnavailable, StoredMessage,
};
use prost::Message as _;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

mod circuit;
mod cluster;
mod commands;
mod conn;
mod keys;
mod reply;

pub use self::circuit::CircuitStats;
use self::conn::Backend;
pub(in crate::store) use self::keys::NEXT_USER;
use self::keys::*;
use self::reply::*;
use super::redis_tls::{RedisTls, install_crypto_provider, redact_url};
use super::{Store, StoreFuture};

/// How a [`RedisStore`] behaves. The log bounds must equal the in-memory store's where both
/// are compared (`MemoryStoreConfig`).
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Messages kept per conversation; older ones are trimmed.
    pub max_log_len: usize,
    /// How long an append's idempotency record lives (at least the client outbox's maximum
    /// age plus the tolerated clock skew).
    pub idempotency_ttl: Duration,
    /// Run even if `maxmemory-policy` is not `noeviction` (Redis may then silently drop
    /// claims, logs and idempotency records: only for throwaway deployments).
    pub allow_eviction: bool,
    /// Bound on one command's round trip; beyond it the command is `StoreUnavailable`.
    pub command_timeout: Duration,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Seeds the log epochs; `None` seeds from the OS (production). Two stores sharing one
    /// Redis must not share a seed.
    pub seed: Option<u64>,
    /// The CA and client certificate for a `rediss://` URL (default: the system's roots, no
    /// client certificate). Refused with a `redis://` URL.
    pub tls: RedisTls,
    /// Replicas that must have confirmed an append before it is acknowledged (`WAIT`, sent to
    /// the conversation's master on the append's connection; 0: no `WAIT`). Fewer within
    /// [`Self::wait_timeout`] make the append's outcome unknown (`StoreUnavailable`): it may
    /// be stored, and the sender's resend with the same id settles it.
    pub wait_replicas: u32,
}

impl RedisOptions {
    /// How long an append's `WAIT` may block: half the command timeout, so that its answer
    /// comes back before the round trip counts as failed.
    pub fn wait_timeout(&self) -> Duration {
        self.command_timeout / 2
    }

    /// How long one slot's call of a split step that answers per user (`RefreshLeases`,
    /// `LoadRoutes`, `LoadHeads`) may take before its users are reported unknown: half the
    /// command timeout, so the others' answers reach a caller that waits one command
    /// timeout (see `cluster.rs`), and never more than half the route's push deadline,
    /// which is fixed (`DeliveryConfig::store_timeout`, 2 s) whatever `--redis-timeout` is.
    pub fn slot_call_timeout(&self) -> Duration {
        let push_deadline = cim_core::route::delivery::DeliveryConfig::default().store_timeout;
        (self.command_timeout / 2).min(push_deadline / 2)
    }
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            max_log_len: 10_000,
            idempotency_ttl: Duration::from_secs(600),
            allow_eviction: false,
            command_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            seed: None,
            tls: RedisTls::default(),
            wait_replicas: 0,
        }
    }
}

/// Why [`RedisStore::connect`] refused. No variant ever holds the URL's password: URLs are
/// shown through [`redact_url`].
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad redis url {url}: {reason}")]
    Url { url: String, reason: String },
    /// `url` is redacted: no password.
    #[error("redis at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error(
        "redis at {url}: maxmemory-policy is {policy:?}, not \"noeviction\": Redis could evict \
         claims and messages; set `maxmemory-policy noeviction` in Redis, or start with \
         --allow-eviction (CIM_ALLOW_EVICTION=true, `allow-eviction = true` in the config file) \
         to run anyway"
    )]
    EvictionPolicy { url: String, policy: String },
    /// `--redis` given a node of a Redis Cluster: every command on a slot it does not own
    /// would come back `MOVED`.
    #[error(
        "redis at {url} is a node of a Redis Cluster (cluster_enabled:1): give the cluster's \
         nodes with --redis-cluster (CIM_REDIS_CLUSTER, `redis-cluster` in the config file) \
         instead of --redis"
    )]
    ClusterNode { url: String },
}

/// Words an operator can act on for a failed connect or first command. The `redis` crate's
/// own text stays in, after them.
fn explain_connect_failure(tls: bool, e: &RedisError) -> String {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    let hint = if lower.contains("wrongpass")
        || lower.contains("invalid username-password")
        || lower.contains("authentication failed")
    {
        "authentication refused (wrong user name or password in the URL, or the ACL user is \
         disabled)"
    } else if lower.contains("noauth") {
        "Redis requires a password: put it in the URL (redis://user:password@host:port)"
    } else if lower.contains("cluster support disabled") {
        "this Redis is not a node of a Redis Cluster: give it with --redis (CIM_REDIS, `redis` \
         in the config file) instead of --redis-cluster"
    } else if lower.contains("noperm") {
        "the ACL user lacks a command or key this process needs (see deploy/README.md for \
         the ACL rules per role)"
    } else if tls && lower.contains("certificaterequired") {
        "TLS: Redis requires a client certificate (tls-auth-clients): give \
         --redis-client-cert and --redis-client-key"
    } else if tls
        && lower.contains("alert")
        && (lower.contains("certificate") || lower.contains("unknownca"))
    {
        "TLS: Redis refused this client certificate (is it signed by Redis's \
         tls-ca-cert-file CA, and still valid?)"
    } else if tls && (lower.contains("certificate") || lower.contains("unknownissuer")) {
        "TLS: the server's certificate did not verify (check --redis-ca and that the URL's \
         host is a name in the certificate)"
    } else if tls
        && (lower.contains("handshake")
            || lower.contains("corrupt message")
            || lower.contains("invaliddata")
            || lower.contains("received corrupt"))
    {
        "TLS handshake failed (is this port serving TLS? does Redis require a client \
         certificate, --redis-client-cert?)"
    } else if tls && lower.contains("timed out") {
        "no TLS handshake within the connect timeout (is this port serving TLS? a plaintext \
         Redis never answers a TLS hello)"
    } else if !tls && (lower.contains("connection reset") || lower.contains("broken pipe")) {
        "connection dropped at once (a TLS-only Redis port? use a rediss:// URL)"
    } else {
        "unreachable"
    };
    format!("{hint}: {text}")
}

/// The scripts, each loaded once per server on first use (`EVALSHA`, `SCRIPT LOAD` on
/// `NOSCRIPT`).
struct Scripts {
    register: Script,
    account_complete: Script,
    claim_replace: Script,
    claim_load: Script,
    claim_expire: Script,
    claim_release: Script,
    claim_bind: Script,
    claim_refresh: Script,
    claim_routes: Script,
    append: Script,
    create_group: Script,
    join_group: Script,
    leave_group: Script,
    read: Script,
    advance_cursors: Script,
    login_failure: Script,
    set_password: Script,
    tombstone: Script,
    tombstone_name: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            register: Script::new(include_str!("../lua/register.lua")),
            account_complete: Script::new(concat!(
                include_str!("../lua/incarnation.lua"),
                include_str!("../lua/account_complete.lua")
            )),
            claim_replace: Script::new(concat!(
                include_str!("../lua/incarnation.lua"),
                include_str!("../lua/claim_replace.lua")
            )),
            claim_load: Script::new(concat!(
                include_str!("../lua/incarnation.lua"),
                include_str!("../lua/claim_load.lua")
            )),
            claim_expire: Script::new(include_str!("../lua/claim_expire.lua")),
            claim_release: Script::new(include_str!("../lua/claim_release.lua")),
            claim_bind: Script::new(include_str!("../lua/claim_bind.lua")),
            claim_refresh: Script::new(include_str!("../lua/claim_refresh.lua")),
            claim_routes: Script::new(include_str!("../lua/claim_routes.lua")),
            append: Script::new(concat!(
                include_str!("../lua/incarnation.lua"),
                include_str!("../lua/append.lua")
            )),
            create_group: Script::new(concat!(
                include_str!("../lua/incarnation.lua"),
                include_str!("../lua/create_group.lua")
            )),
            join_group: Script::new(include_str!("../lua/join_group.lua")),
            leave_group: Script::new(include_str!("../lua/leave_group.lua")),
            read: Script::new(concat!(
                include_str!("../lua/incarnation.lua"),
                include_str!("../lua/read.lua")
            )),
            advance_cursors: Script::new(include_str!("../lua/advance_cursors.lua")),
            login_failure: Script::new(include_str!("../lua/login_failure.lua")),
            set_password: Script::new(include_str!("../lua/set_password.lua")),
            tombstone: Script::new(include_str!("../lua/tombstone.lua")),
            tombstone_name: Script::new(include_str!("../lua/tombstone_name.lua")),
        }
    }
}

/// The Redis-backed [`Store`]: one node ([`RedisStore::connect`]) or a Redis Cluster
/// ([`RedisStore::connect_cluster`]; what differs is in `cluster`, and what is atomic where in
/// the module docs of [`super`]).
pub struct RedisStore {
    backend: Backend,
    options: RedisOptions,
    scripts: Scripts,
    /// Log epochs for new logs. Held only to draw one number.
    rng: Mutex<ChaCha8Rng>,
    /// Users whose account this store has seen exist and not deleted, so an append need
    /// not ask Redis again (two reads per private message, one per message in `all`).
    /// Accounts can be deleted (tombstoned) by any route, so the set is forgotten every
    /// [`ACCOUNT_CACHE_TTL`]: a route that cached an account learns of its deletion within
    /// that time, and `DeleteAccount` answers only after it (see the module docs). Also
    /// emptied when a command fails, which a Redis restart (and whatever AOF `everysec`
    /// lost with it) always causes; bounded by [`KNOWN_ACCOUNTS_MAX`].
    known_accounts: Mutex<KnownAccounts>,
}

/// Past this many remembered accounts the set starts over (8 bytes each, plus the table).
const KNOWN_ACCOUNTS_MAX: usize = 1 << 20;

/// How long a route trusts that an account it saw is still not deleted.
pub const ACCOUNT_CACHE_TTL: Duration = Duration::from_secs(1);

/// The account-existence cache: ids seen alive since `since`.
#[derive(Debug, Default)]
struct KnownAccounts {
    ids: HashSet<u64>,
    since: Option<tokio::time::Instant>,
}

impl KnownAccounts {
    /// The ids, forgotten first if they are older than [`ACCOUNT_CACHE_TTL`].
    fn fresh(&mut self) -> &mut HashSet<u64> {
        let now = tokio::time::Instant::now();
        if self
            .since
            .is_none_or(|since| now.duration_since(since) >= ACCOUNT_CACHE_TTL)
        {
            self.ids.clear();
            self.since = Some(now);
        }
        &mut self.ids
    }

    fn clear(&mut self) {
        self.ids.clear();
        self.since = None;
    }
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Internal failure of one command; all of them reach the caller as `StoreUnavailable`.
type R<T> = Result<T, StoreUnavailable>;

impl RedisStore {
    /// Connects (over TLS for a `rediss://` URL, as `options.tls` says), and checks that
    /// Redis will not evict keys (`maxmemory-policy noeviction`) unless
    /// `options.allow_eviction`. A failure names the URL (never its password) and the
    /// reason, within about four connect timeouts.
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Self, ConnectError> {
        let (info, tls) = parse_url(url, &options)?;
        let bad_url = |reason: String| ConnectError::Url {
            url: redact_url(url),
            reason,
        };
        let client = if tls {
            ::redis::Client::build_with_tls(info, options.tls.certificates())
        } else {
            ::redis::Client::open(info)
        }
        .map_err(|e| bad_url(e.to_string()))?;
        let shown = redact_url(url);
        let unreachable = |reason: String| ConnectError::Unreachable {
            url: shown.clone(),
            reason,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.command_timeout))
            .set_number_of_retries(2);
        let budget = options.connect_timeout.saturating_mul(4);
        let mut conn =
            tokio::time::timeout(budget, ConnectionManager::new_with_config(client, config))
                .await
                .map_err(|_| {
                    unreachable(format!(
                        "no connection within {budget:?}{}",
                        if tls {
                            " (a TLS handshake that never completed: is this a TLS port?)"
                        } else {
                            ""
                        }
                    ))
                })?
                .map_err(|e| unreachable(explain_connect_failure(tls, &e)))?;
        // `INFO memory` rather than `CONFIG GET`: an ACL user for CIM needs no CONFIG
        // rights, which would also reveal `requirepass` and the like.
        let info: String = ::redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await
            .map_err(|e| unreachable(explain_connect_failure(tls, &e)))?;
        let policy = info
            .lines()
            .find_map(|line| line.trim().strip_prefix("maxmemory_policy:"))
            .unwrap_or_default()
            .to_owned();
        if policy != "noeviction" && !options.allow_eviction {
            return Err(ConnectError::EvictionPolicy { url: shown, policy });
        }
        let info: String = ::redis::cmd("INFO")
            .arg("cluster")
            .query_async(&mut conn)
            .await
            .map_err(|e| unreachable(explain_connect_failure(tls, &e)))?;
        if info.lines().any(|line| line.trim() == "cluster_enabled:1") {
            return Err(ConnectError::ClusterNode { url: shown });
        }
        Ok(Self::with_backend(Backend::Single(conn), options))
    }

    /// What the cluster connection's circuit has done (see `circuit`); all zero on one node,
    /// whose connection manager reconnects by itself without spinning.
    pub fn circuit_stats(&self) -> CircuitStats {
        match &self.backend {
            Backend::Single(_) => CircuitStats::default(),
            Backend::Cluster(circuit) => circuit.stats(),
        }
    }

    fn with_backend(backend: Backend, options: RedisOptions) -> Self {
        let rng = match options.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self {
            backend,
            options,
            scripts: Scripts::new(),
            rng: Mutex::new(rng),
            known_accounts: Mutex::new(KnownAccounts::default()),
        }
    }

    fn new_log_epoch(&self) -> LogEpoch {
        // A poisoned lock only means another thread panicked while drawing; the generator
        // itself is still a valid state.
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        // Never 0, so "no epoch known" can be told apart (as in the reference).
        LogEpoch(rng.random_range(1..=u64::MAX))
    }

    async fn run(&self, now: UnixMillis, command: StoreCommand) -> R<StoreReply> {
        match command {
            StoreCommand::RegisterAccount {
                name,
                password_hash,
            } => self.register(name, password_hash).await,
            StoreCommand::LoadAccount { user } => self.load_account(user).await,
            StoreCommand::LoadAccountByName { name } => self.load_account_by_name(&name).await,
            StoreCommand::ListAccounts { after, limit } => self.list_accounts(after, limit).await,
            StoreCommand::SetPassword {
                user,
                password_hash,
            } => self.set_password(user, password_hash).await,
            StoreCommand::DeleteAccount { user } => self.delete_account(now, user).await,
            StoreCommand::LoadNames { users } => self.names(users).await,
            StoreCommand::LoadClaim { user } => self.load_claim(user).await,
            StoreCommand::ReplaceClaim {
                user,
                expected,
                claim,
            } => self.replace_claim(now, user, expected, claim, None).await,
            StoreCommand::ResumeClaim {
                user,
                expected,
                secret,
                claim,
            } => {
                self.replace_claim(now, user, expected, claim, Some(secret))
                    .await
            }
            StoreCommand::ExpireClaim { user, epoch } => {
                self.end_claim(&self.scripts.claim_expire, user, epoch)
                    .await
            }
            StoreCommand::RevokeResumption { user } => {
                // One key: a plain HDEL is atomic.
                let removed: i64 = self
                    .query(
                        ::redis::cmd("HDEL")
                            .arg(claim_key(user))
                            .arg("secret")
                            .arg("secret_exp"),
                    )
                    .await?;
                Ok(StoreReply::ResumptionRevoked {
                    revoked: removed > 0,
                })
            }
            StoreCommand::ReleaseClaim { user, epoch } => {
                self.end_claim(&self.scripts.claim_release, user, epoch)
                    .await
            }
            StoreCommand::BindSession {
                user,
                epoch,
                server,
                lease_until,
            } => {
                let v: Vec<Value> = self
                    .invoke(
                        self.scripts
                            .claim_bind
                            .key(claim_key(user))
                            .key(route_key(user))
                            .arg(epoch.0)
                            .arg(server.as_str())
                            .arg(lease_until.0)
                            .arg(now.0),
                    )
                    .await?;
                let (bound, current) = match v.as_slice() {
                    [b, c] => (num(b)?, num(c)?),
                    _ => return Err(bad_reply("bind", &Value::Array(v))),
                };
                Ok(StoreReply::SessionBound(if bound == 1 {
                    Ok(())
                } else {
                    Err(Epoch(current))
                }))
            }
            StoreCommand::RefreshLeases {
                server,
                lease_until,
                sessions,
            } => self.refresh(now, server, lease_until, sessions).await,
            StoreCommand::LoadRoutes { users } => self.routes(now, users).await,
            StoreCommand::LoadMembers { conv } => self.members(conv).await,
            StoreCommand::Append {
                conv,
                sender,
                msg_id,
                body,
                now: at,
                order,
                members_known,
            } => {
                self.append(now, conv, sender, msg_id, body, at, order, members_known)
                    .await
            }
            StoreCommand::LoadHeads { user } => self.heads(user).await,
            StoreCommand::Fetch {
                user,
                conv,
                log_epoch,
                after_seq,
                limit,
            } => self.fetch(user, conv, log_epoch, after_seq, limit).await,
            StoreCommand::AdvanceCursors { user, cursors } => {
                self.advance_cursors(user, cursors).await
            }
            StoreCommand::CreateGroup { conv, owner } => self.create_group(conv, owner).await,
            StoreCommand::JoinGroup { conv, user } => self.join_group(conv, user).await,
            StoreCommand::LeaveGroup { conv, user } => {
                let was_member = match conv {
                    ConvId::Group(_) => self.leave_group(&conv, user).await?,
                    _ => false,
                };
                Ok(StoreReply::GroupLeft { was_member })
            }
            StoreCommand::ListOnline { limit } => self.online(now, limit).await,
            StoreCommand::CountLoginFailure {
                user,
                expected,
                forget_after,
            } => {
                let v: Vec<Value> = self
                    .invoke(
                        self.scripts
                            .login_failure
                            .key(failures_key(user))
                            .arg(expected)
                            .arg(now.0)
                            .arg(millis(forget_after).max(1)),
                    )
                    .await?;
                let [counted, count, last] = v.as_slice() else {
                    return Err(bad_reply("count login failure", &Value::Array(v)));
                };
                let record = LoginFailures {
                    count: u32::try_from(num(count)?).unwrap_or(u32::MAX),
                    last_at: UnixMillis(num(last)?),
                };
                Ok(StoreReply::LoginFailureCounted(if num(counted)? == 1 {
                    Ok(record)
                } else {
                    Err(record)
                }))
            }
            StoreCommand::ClearLoginFailures { user } => {
                let _: i64 = self
                    .query(::redis::cmd("DEL").arg(failures_key(user)))
                    .await?;
                Ok(StoreReply::LoginFailuresCleared)
            }
        }
    }

    // --- plumbing ---------------------------------------------------------------------

    pub(super) async fn query_pub<T: ::redis::FromRedisValue>(
        &self,
        cmd: &mut ::redis::Cmd,
    ) -> R<T> {
        self.query(cmd).await
    }

    pub(super) async fn query_pipe_pub<T: ::redis::FromRedisValue>(&self, pipe: &Pipeline) -> R<T> {
        self.query_pipe(pipe).await
    }

    /// Ends a user's claim at `epoch` by `script` (release: deleted; expire: lease 0, the
    /// resumption secret kept); both take the claim and route keys and answer 1 if it did.
    async fn end_claim(&self, script: &Script, user: UserId, epoch: Epoch) -> R<StoreReply> {
        let released: i64 = self
            .invoke(
                script
                    .key(claim_key(user))
                    .key(route_key(user))
                    .arg(epoch.0),
            )
            .await?;
        Ok(StoreReply::ClaimReleased {
            released: released == 1,
        })
    }

    pub(super) async fn invoke_pub<T: ::redis::FromRedisValue>(
        &self,
        invocation: &::redis::ScriptInvocation<'_>,
    ) -> R<T> {
        self.invoke(invocation).await
    }

    async fn invoke<T: ::redis::FromRedisValue>(
        &self,
        invocation: &::redis::ScriptInvocation<'_>,
    ) -> R<T> {
        let mut conn = self.backend.conn().await?;
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn query<T: ::redis::FromRedisValue>(&self, cmd: &mut ::redis::Cmd) -> R<T> {
        let mut conn = self.backend.conn().await?;
        cmd.query_async(&mut conn).await.map_err(unavailable)
    }

    async fn query_pipe<T: ::redis::FromRedisValue>(&self, pipe: &Pipeline) -> R<T> {
        let mut conn = self.backend.conn().await?;
        pipe.query_async(&mut conn).await.map_err(unavailable)
    }

    /// `pipe`, whose scripts are called by `EVALSHA` (the `Script` type cannot be pipelined):
    /// on `NOSCRIPT` (a Redis that restarted or was flushed) `script` is loaded and the whole
    /// pipeline sent again, so what precedes the script in it must be idempotent.
    async fn query_pipe_with_script<T: ::redis::FromRedisValue>(
        &self,
        pipe: &Pipeline,
        script: &Script,
    ) -> R<T> {
        let mut conn = self.backend.conn().await?;
        match pipe.query_async(&mut conn).await {
            Ok(values) => Ok(values),
            Err(e)
                if e.kind() == ::redis::ErrorKind::Server(::redis::ServerErrorKind::NoScript) =>
            {
                script
                    .prepare_invoke()
                    .load_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                pipe.query_async(&mut conn).await.map_err(unavailable)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// `PING`: on one node, that node; on a cluster, every master, healthy when any answers.
    /// One dead master is one shard's outage, which its users see in their own commands; the
    /// process stays healthy (ready, listed) for the users of the others.
    async fn ping(&self) -> R<String> {
        match self.backend.conn().await? {
            conn::Conn::Cluster(mut conn) => {
                use ::redis::cluster_routing::{
                    MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo,
                };
                let value = conn
                    .route_command(
                        ::redis::cmd("PING"),
                        RoutingInfo::MultiNode((
                            MultipleNodeRoutingInfo::AllMasters,
                            Some(ResponsePolicy::OneSucceeded),
                        )),
                    )
                    .await
                    .map_err(unavailable)?;
                ::redis::from_redis_value(value)
                    .map_err(|e| StoreUnavailable(format!("redis: unexpected reply to PING: {e}")))
            }
            conn::Conn::Single(_) => self.query::<String>(&mut ::redis::cmd("PING")).await,
        }
    }

    fn known_accounts(&self) -> std::sync::MutexGuard<'_, KnownAccounts> {
        // A poisoned lock only means another thread panicked while inserting: the set is
        // still a set of accounts seen to exist.
        self.known_accounts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether all of `users` have live (not deleted) accounts: from memory for those seen
    /// within [`ACCOUNT_CACHE_TTL`], else one round trip.
    async fn accounts_exist(&self, users: &[UserId]) -> R<bool> {
        let unknown: Vec<UserId> = {
            let mut known = self.known_accounts();
            let known = known.fresh();
            users
                .iter()
                .filter(|u| !known.contains(&u.0))
                .copied()
                .collect()
        };
        if unknown.is_empty() {
            return Ok(true);
        }
        let started = tokio::time::Instant::now();
        let reads = unknown
            .iter()
            .map(|user| {
                let key = acct_key(*user);
                let mut cmd = ::redis::cmd("HMGET");
                cmd.arg(&key).arg("password_hash").arg("deleted");
                (key, cmd)
            })
            .collect();
        let fields: Vec<(Option<String>, Option<String>)> = self.query_each(reads).await?;
        let exist: Vec<bool> = fields
            .iter()
            .map(|f| matches!(f, (Some(_), None)))
            .collect();
        let mut known = self.known_accounts();
        // What was read before the set last started over must not live on in the new one
        // (it could outlast the TTL counted from the read).
        if known.since.is_some_and(|since| since <= started) {
            let known = known.fresh();
            if known.len() + unknown.len() > KNOWN_ACCOUNTS_MAX {
                known.clear();
            }
            for (user, exists) in unknown.iter().zip(&exist) {
                if *exists {
                    known.insert(user.0);
                }
            }
        }
        Ok(exist.len() == unknown.len() && exist.iter().all(|e| *e))
    }

    /// The account's `all` start and whether it is live (exists, not deleted): what
    /// `LoadHeads` and `Fetch` need.
    async fn account_state(&self, user: UserId) -> R<(bool, AllFrom)> {
        let (hash, deleted, epoch, seq): (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        ) = self
            .query(
                ::redis::cmd("HMGET")
                    .arg(acct_key(user))
                    .arg("password_hash")
                    .arg("deleted")
                    .arg("all_epoch")
                    .arg("all_seq"),
            )
            .await?;
        Ok((
            hash.is_some() && deleted.is_none(),
            all_from(epoch.as_deref(), seq.as_deref()),
        ))
    }

    /// Runs `read.lua` once per conversation in one pipeline (the `Script` type cannot be
    /// pipelined, so this is `EVALSHA` by hand, loading the script on `NOSCRIPT`). On a
    /// cluster, one pipeline per conversation slot; the reads of a slot whose master did not
    /// answer come back `None` (a dead shard fails only its own conversations), and the
    /// whole read fails only if no slot answered.
    async fn read_pipelined(&self, calls: &[(Vec<String>, Vec<String>)]) -> R<Vec<Option<Value>>> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let slot_keys = calls
            .iter()
            .map(|(keys, _)| keys.first().cloned().unwrap_or_default())
            .collect();
        self.per_slot_or(
            calls,
            slot_keys,
            |part| async move {
                let script = &self.scripts.read;
                let mut pipe = ::redis::pipe();
                for (keys, args) in part {
                    pipe.cmd("EVALSHA")
                        .arg(script.get_hash())
                        .arg(keys.len())
                        .arg(keys)
                        .arg(args);
                }
                let values: Vec<Value> = self.query_pipe_with_script(&pipe, script).await?;
                Ok(values.into_iter().map(Some).collect())
            },
            |_| None,
        )
        .await
    }
}

/// A Redis URL's connection info and whether it asks for TLS (`rediss://`), checked as both
/// connects need: a scheme, and TLS settings only with a TLS URL. Installs the TLS crypto
/// provider when needed.
fn parse_url(
    url: &str,
    options: &RedisOptions,
) -> Result<(::redis::ConnectionInfo, bool), ConnectError> {
    let bad_url = |reason: String| ConnectError::Url {
        url: redact_url(url),
        reason,
    };
    if !url.contains("://") {
        return Err(ConnectError::Url {
            url: if url.contains('@') {
                "(not shown: it may hold a password)".into()
            } else {
                format!("{url:?}")
            },
            reason: "a Redis URL starts with redis:// (or rediss:// for TLS), e.g. \
             redis://127.0.0.1:6379 or redis://user:password@host:6379/0"
                .into(),
        });
    }
    let info = ::redis::IntoConnectionInfo::into_connection_info(url)
        .map_err(|e| bad_url(e.to_string()))?;
    let tls = matches!(info.addr(), ::redis::ConnectionAddr::TcpTls { .. });
    if tls {
        install_crypto_provider();
    } else if options.tls.is_configured() {
        return Err(bad_url(
            "a CA or client certificate for Redis is given but the URL is redis://; use \
             rediss:// for TLS"
                .into(),
        ));
    }
    Ok((info, tls))
}

/// A duration as a script argument: whole milliseconds.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Store for RedisStore {
    fn execute(&self, now: UnixMillis, command: StoreCommand) -> StoreFuture<'_, StoreResult> {
        Box::pin(async move {
            // The connection manager also bounds each round trip; this bounds the whole
            // command (some take two or three).
            let budget = self.options.command_timeout.saturating_mul(3);
            let result = match tokio::time::timeout(budget, self.run(now, command)).await {
                Ok(result) => result,
                Err(_) => Err(StoreUnavailable("redis: command timed out".into())),
            };
            if result.is_err() {
                // Redis may have restarted and lost recent writes, accounts among them.
                self.known_accounts().clear();
            }
            result
        })
    }

    fn circuit(&self) -> CircuitStats {
        self.circuit_stats()
    }

    fn ensure_schema(&self) -> StoreFuture<'_, Result<(), String>> {
        Box::pin(async move {
            RedisStore::ensure_schema(self)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn health(&self) -> StoreFuture<'_, Result<(), StoreUnavailable>> {
        Box::pin(async move {
            let pong = tokio::time::timeout(self.options.command_timeout, self.ping())
                .await
                .map_err(|_| StoreUnavailable("redis: ping timed out".into()))??;
            if pong == "PONG" {
                Ok(())
            } else {
                Err(StoreUnavailable(format!("redis: ping answered {pong:?}")))
            }
        })
    }
}

#[cfg(test)]
mod slot_call_tests {
    use super::*;

    #[test]
    fn a_slot_call_ends_before_the_routes_push_deadline_whatever_the_command_timeout() {
        let push = cim_core::route::delivery::DeliveryConfig::default().store_timeout;
        for secs in [1, 2, 10] {
            let options = RedisOptions {
                command_timeout: Duration::from_secs(secs),
                ..RedisOptions::default()
            };
            let bound = options.slot_call_timeout();
            assert!(
                bound < push && bound < options.command_timeout,
                "{secs} s: {bound:?}"
            );
        }
    }
}
