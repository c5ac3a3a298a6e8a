//! The Redis store: every [`StoreCommand`] as a Lua script (or one single-key command), with
//! the semantics of `cim_core::memstore::MemoryStore`. Key layout and atomicity: see the
//! module docs of [`super`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Pipeline, RedisError, Script, Value};
use bytes::Bytes;
use cim_core::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};
use cim_core::store::{
    Account, AccountSummary, AllFrom, AppendError, Appended, Claim, ClaimState, ConvHead, Deleted,
    LeaseRefresh, LoginFailures, NameTaken, OnlineEntry, RouteRecord, SendOrder, StoreCommand,
    StoreReply, StoreResult, StoreUnavailable, StoredMessage,
};
use prost::Message as _;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

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
    claim_replace: Script,
    claim_release: Script,
    claim_bind: Script,
    claim_refresh: Script,
    claim_routes: Script,
    append: Script,
    create_group: Script,
    join_group: Script,
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
            register: Script::new(include_str!("lua/register.lua")),
            claim_replace: Script::new(include_str!("lua/claim_replace.lua")),
            claim_release: Script::new(include_str!("lua/claim_release.lua")),
            claim_bind: Script::new(include_str!("lua/claim_bind.lua")),
            claim_refresh: Script::new(include_str!("lua/claim_refresh.lua")),
            claim_routes: Script::new(include_str!("lua/claim_routes.lua")),
            append: Script::new(include_str!("lua/append.lua")),
            create_group: Script::new(include_str!("lua/create_group.lua")),
            join_group: Script::new(include_str!("lua/join_group.lua")),
            read: Script::new(include_str!("lua/read.lua")),
            advance_cursors: Script::new(include_str!("lua/advance_cursors.lua")),
            login_failure: Script::new(include_str!("lua/login_failure.lua")),
            set_password: Script::new(include_str!("lua/set_password.lua")),
            tombstone: Script::new(include_str!("lua/tombstone.lua")),
            tombstone_name: Script::new(include_str!("lua/tombstone_name.lua")),
        }
    }
}

/// The Redis-backed [`Store`] (single node; see the module docs for Cluster).
pub struct RedisStore {
    conn: ConnectionManager,
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

fn unavailable(e: RedisError) -> StoreUnavailable {
    StoreUnavailable(format!("redis: {e}"))
}

fn bad_reply(what: &str, v: &Value) -> StoreUnavailable {
    StoreUnavailable(format!("redis: unexpected reply to {what}: {v:?}"))
}

impl RedisStore {
    /// Connects (over TLS for a `rediss://` URL, as `options.tls` says), and checks that
    /// Redis will not evict keys (`maxmemory-policy noeviction`) unless
    /// `options.allow_eviction`. A failure names the URL (never its password) and the
    /// reason, within about four connect timeouts.
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Self, ConnectError> {
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
        let client = if tls {
            install_crypto_provider();
            ::redis::Client::build_with_tls(info, options.tls.certificates())
        } else if options.tls.is_configured() {
            return Err(bad_url(
                "a CA or client certificate for Redis is given but the URL is redis://; \
                 use rediss:// for TLS"
                    .into(),
            ));
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
        let rng = match options.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Ok(Self {
            conn,
            options,
            scripts: Scripts::new(),
            rng: Mutex::new(rng),
            known_accounts: Mutex::new(KnownAccounts::default()),
        })
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
            } => self.replace_claim(user, expected, claim).await,
            StoreCommand::ReleaseClaim { user, epoch } => {
                let released: i64 = self
                    .invoke(
                        self.scripts
                            .claim_release
                            .key(claim_key(user))
                            .key(route_key(user))
                            .arg(epoch.0),
                    )
                    .await?;
                Ok(StoreReply::ClaimReleased {
                    released: released == 1,
                })
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
                now,
                order,
            } => self.append(conv, sender, msg_id, body, now, order).await,
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
                    ConvId::Group(_) => {
                        let removed: i64 = self
                            .query(
                                ::redis::cmd("HDEL")
                                    .arg(conv_key(&conv, "members"))
                                    .arg(user.0),
                            )
                            .await?;
                        removed == 1
                    }
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
        let mut conn = self.conn.clone();
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)
    }

    async fn query<T: ::redis::FromRedisValue>(&self, cmd: &mut ::redis::Cmd) -> R<T> {
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn).await.map_err(unavailable)
    }

    async fn query_pipe<T: ::redis::FromRedisValue>(&self, pipe: &Pipeline) -> R<T> {
        let mut conn = self.conn.clone();
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
        let mut conn = self.conn.clone();
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
        let mut pipe = ::redis::pipe();
        for user in &unknown {
            pipe.hget(acct_key(*user), "password_hash")
                .hget(acct_key(*user), "deleted");
        }
        let fields: Vec<Option<String>> = self.query_pipe(&pipe).await?;
        let exist: Vec<bool> = fields
            .chunks(2)
            .map(|f| matches!(f, [Some(_), None]))
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
    /// pipelined, so this is `EVALSHA` by hand, loading the script on `NOSCRIPT`).
    async fn read_pipelined(&self, calls: &[(Vec<String>, Vec<String>)]) -> R<Vec<Value>> {
        if calls.is_empty() {
            return Ok(Vec::new());
        }
        let script = &self.scripts.read;
        let mut pipe = ::redis::pipe();
        for (keys, args) in calls {
            pipe.cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(keys.len())
                .arg(keys)
                .arg(args);
        }
        self.query_pipe_with_script(&pipe, script).await
    }

    // --- accounts ---------------------------------------------------------------------

    async fn register(&self, name: String, password_hash: String) -> R<StoreReply> {
        // Where the account starts reading `all`: the head before the reservation, so a
        // message appended meanwhile is owed rather than missed.
        let (all_epoch, all_seq): (Option<String>, Option<String>) = self
            .query(
                ::redis::cmd("HMGET")
                    .arg(conv_key(&ConvId::All, "meta"))
                    .arg("epoch")
                    .arg("head"),
            )
            .await?;
        let (all_epoch, all_seq) = match (all_epoch, all_seq) {
            (Some(epoch), Some(seq)) => (epoch, seq),
            _ => ("0".to_owned(), "0".to_owned()),
        };
        let v: Vec<Value> = self
            .invoke(
                self.scripts
                    .register
                    .key(name_key(&name.to_ascii_lowercase()))
                    .key(NEXT_USER)
                    .key(name_key(&name))
                    .arg(&password_hash)
                    .arg(&name)
                    .arg(&all_epoch)
                    .arg(&all_seq),
            )
            .await?;
        let [
            created,
            user,
            stored_hash,
            stored_name,
            all_epoch,
            all_seq,
            deleted,
        ] = v.as_slice()
        else {
            return Err(bad_reply("register", &Value::Array(v)));
        };
        let user = UserId(num(user)?);
        let stored_hash = string(stored_hash)?.unwrap_or_default();
        // The name as its owner typed it, never as a later look-alike typed it.
        let name = string(stored_name)?.unwrap_or(name);
        let all_epoch = string(all_epoch)?.unwrap_or_else(|| "0".into());
        let all_seq = string(all_seq)?.unwrap_or_else(|| "0".into());
        // Written after the reservation, from the reservation's values, also when the name
        // was taken: that completes a registration whose writer died in between (see the
        // module docs). Field by field and only where missing (`HSETNX`), so it never undoes
        // a password reset; never for a tombstone, which must stay without a password.
        if num(deleted)? == 0 {
            let mut pipe = ::redis::pipe();
            for (field, value) in [
                ("name", name.as_str()),
                ("password_hash", stored_hash.as_str()),
                ("all_epoch", all_epoch.as_str()),
                ("all_seq", all_seq.as_str()),
            ] {
                pipe.cmd("HSETNX")
                    .arg(acct_key(user))
                    .arg(field)
                    .arg(value)
                    .ignore();
            }
            let () = self.query_pipe(&pipe).await?;
        }
        Ok(StoreReply::AccountRegistered(if num(created)? == 1 {
            Ok(user)
        } else {
            Err(NameTaken)
        }))
    }

    async fn load_account(&self, user: UserId) -> R<StoreReply> {
        type Fields = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let (name, password_hash, deleted, all_epoch, all_seq): Fields = self
            .query(
                ::redis::cmd("HMGET")
                    .arg(acct_key(user))
                    .arg("name")
                    .arg("password_hash")
                    .arg("deleted")
                    .arg("all_epoch")
                    .arg("all_seq"),
            )
            .await?;
        Ok(StoreReply::Account(match (name, password_hash, deleted) {
            (Some(name), Some(password_hash), None) => Some(Account {
                user,
                name,
                password_hash,
                all_from: all_from(all_epoch.as_deref(), all_seq.as_deref()),
            }),
            _ => None,
        }))
    }

    /// `LoadAccountByName`: the reservation (lowercase key, then one written as typed
    /// before names ignored case and not migrated yet), then the account.
    async fn load_account_by_name(&self, name: &str) -> R<StoreReply> {
        let (lower, typed): (Option<u64>, Option<u64>) = self
            .query_pipe(
                ::redis::pipe()
                    .hget(name_key(&name.to_ascii_lowercase()), "user")
                    .hget(name_key(name), "user"),
            )
            .await?;
        match lower.or(typed) {
            Some(user) => self.load_account(UserId(user)).await,
            None => Ok(StoreReply::Account(None)),
        }
    }

    /// `ListAccounts`: ids are dense (`INCR`), so a page is a range of ids read in one
    /// pipeline; an id without an account hash (a registration whose writer died before
    /// writing it) is skipped.
    async fn list_accounts(&self, after: UserId, limit: u32) -> R<StoreReply> {
        let last: Option<u64> = self.query(::redis::cmd("GET").arg(NEXT_USER)).await?;
        let last = last.unwrap_or(0);
        let mut rows = Vec::new();
        let mut next = after.0.saturating_add(1);
        while rows.len() < limit as usize && next <= last {
            let chunk_end = last.min(next.saturating_add(u64::from(limit).max(1) - 1));
            let ids: Vec<u64> = (next..=chunk_end).collect();
            let mut pipe = ::redis::pipe();
            for id in &ids {
                pipe.cmd("HMGET")
                    .arg(acct_key(UserId(*id)))
                    .arg("name")
                    .arg("deleted");
            }
            let fields: Vec<(Option<String>, Option<String>)> = self.query_pipe(&pipe).await?;
            for (id, (name, deleted)) in ids.iter().zip(fields) {
                if let Some(name) = name
                    && rows.len() < limit as usize
                {
                    rows.push(AccountSummary {
                        user: UserId(*id),
                        name,
                        deleted: deleted.is_some(),
                    });
                }
            }
            next = chunk_end.saturating_add(1);
        }
        Ok(StoreReply::Accounts(rows))
    }

    async fn set_password(&self, user: UserId, password_hash: String) -> R<StoreReply> {
        let found: i64 = self
            .invoke(
                self.scripts
                    .set_password
                    .key(acct_key(user))
                    .arg(&password_hash),
            )
            .await?;
        Ok(StoreReply::PasswordSet { found: found == 1 })
    }

    /// `DeleteAccount`, in an order an interruption cannot harm (each step idempotent; a
    /// retry finishes the rest): the account's tombstone first (from then on no login
    /// passes and no fresh existence check does), then the name's, the claim and route
    /// record, group memberships, the failure record; last, the answer waits out
    /// [`ACCOUNT_CACHE_TTL`], so every route's cache has forgotten the account by the time
    /// the caller hears "deleted".
    async fn delete_account(&self, now: UnixMillis, user: UserId) -> R<StoreReply> {
        let v: Vec<Value> = self
            .invoke(self.scripts.tombstone.key(acct_key(user)).arg(now.0))
            .await?;
        let [status, name] = v.as_slice() else {
            return Err(bad_reply("delete account", &Value::Array(v)));
        };
        let Some(name) = string(name)? else {
            return Ok(StoreReply::AccountDeleted(None));
        };
        let already = num(status)? == 2;
        // The reservation: only the one that is this account's (after a migration conflict
        // the lowercase name may belong to an older account).
        let _: i64 = self
            .invoke(
                self.scripts
                    .tombstone_name
                    .key(name_key(&name.to_ascii_lowercase()))
                    .key(name_key(&name))
                    .arg(user.0)
                    .arg(now.0),
            )
            .await?;
        let StoreReply::Claim(state) = self.load_claim(user).await? else {
            return Err(StoreUnavailable("redis: claim answered oddly".into()));
        };
        if let Some(claim) = &state.claim {
            let _: i64 = self
                .invoke(
                    self.scripts
                        .claim_release
                        .key(claim_key(user))
                        .key(route_key(user))
                        .arg(claim.epoch.0),
                )
                .await?;
        }
        let indexed: Vec<String> = self
            .query(::redis::cmd("SMEMBERS").arg(convs_key(user)))
            .await?;
        let mut pipe = ::redis::pipe();
        for conv in indexed.iter().filter_map(|c| c.parse::<ConvId>().ok()) {
            if matches!(conv, ConvId::Group(_)) {
                pipe.hdel(conv_key(&conv, "members"), user.0).ignore();
            }
        }
        pipe.del(failures_key(user)).ignore();
        let () = self.query_pipe(&pipe).await?;
        self.known_accounts().clear();
        // Also on a retry: the first attempt may have died before its wait.
        tokio::time::sleep(ACCOUNT_CACHE_TTL).await;
        Ok(StoreReply::AccountDeleted(Some(Deleted {
            name,
            claim: state.claim,
            already,
        })))
    }

    /// `LoadNames`: one `HGET` per account, pipelined (each name is written once and never
    /// changes, so the pipeline need not be one snapshot).
    async fn names(&self, users: Vec<UserId>) -> R<StoreReply> {
        if users.is_empty() {
            return Ok(StoreReply::Names(Vec::new()));
        }
        let mut pipe = ::redis::pipe();
        for user in &users {
            pipe.hget(acct_key(*user), "name");
        }
        let names: Vec<Option<String>> = self.query_pipe(&pipe).await?;
        if names.len() != users.len() {
            return Err(StoreUnavailable("redis: names answered oddly".into()));
        }
        Ok(StoreReply::Names(users.into_iter().zip(names).collect()))
    }

    // --- claims -----------------------------------------------------------------------

    async fn load_claim(&self, user: UserId) -> R<StoreReply> {
        let v: Vec<Value> = self
            .query(
                ::redis::cmd("HMGET")
                    .arg(claim_key(user))
                    .arg("epoch")
                    .arg("c_epoch")
                    .arg("server")
                    .arg("lease")
                    .arg("token"),
            )
            .await?;
        let [epoch, rest @ ..] = v.as_slice() else {
            return Err(bad_reply("load claim", &Value::Array(v)));
        };
        Ok(StoreReply::Claim(ClaimState {
            epoch: Epoch(opt_num(epoch)?.unwrap_or(0)),
            claim: parse_claim(rest)?,
        }))
    }

    async fn replace_claim(&self, user: UserId, expected: Epoch, claim: Claim) -> R<StoreReply> {
        let v: Vec<Value> = self
            .invoke(
                self.scripts
                    .claim_replace
                    .key(claim_key(user))
                    .arg(expected.0)
                    .arg(claim.epoch.0)
                    .arg(claim.server.as_str())
                    .arg(claim.lease_until.0)
                    .arg(&claim.resume_token_hash[..]),
            )
            .await?;
        let [replaced, counter, old @ ..] = v.as_slice() else {
            return Err(bad_reply("replace claim", &Value::Array(v)));
        };
        let old = parse_claim(old)?;
        Ok(StoreReply::ClaimReplaced(if num(replaced)? == 1 {
            Ok(old)
        } else {
            Err(ClaimState {
                epoch: Epoch(num(counter)?),
                claim: old,
            })
        }))
    }

    async fn refresh(
        &self,
        now: UnixMillis,
        server: ServerId,
        lease_until: UnixMillis,
        sessions: Vec<(UserId, Epoch)>,
    ) -> R<StoreReply> {
        if sessions.is_empty() {
            return Ok(StoreReply::LeasesRefreshed(Vec::new()));
        }
        let mut invocation = self.scripts.claim_refresh.prepare_invoke();
        invocation
            .arg(server.as_str())
            .arg(lease_until.0)
            .arg(now.0);
        for (user, epoch) in &sessions {
            invocation.key(claim_key(*user)).arg(epoch.0);
        }
        let v: Vec<Value> = self.invoke(&invocation).await?;
        if v.len() != sessions.len() * 2 {
            return Err(bad_reply("refresh", &Value::Array(v)));
        }
        let outcomes = sessions
            .iter()
            .zip(v.chunks_exact(2))
            .map(|((user, _), pair)| {
                let outcome = match num(&pair[0])? {
                    0 => LeaseRefresh::Refreshed,
                    1 => LeaseRefresh::Superseded {
                        current: Epoch(num(&pair[1])?),
                    },
                    _ => LeaseRefresh::Gone,
                };
                Ok((*user, outcome))
            })
            .collect::<R<Vec<_>>>()?;
        Ok(StoreReply::LeasesRefreshed(outcomes))
    }

    async fn routes(&self, now: UnixMillis, users: Vec<UserId>) -> R<StoreReply> {
        if users.is_empty() {
            return Ok(StoreReply::Routes(Vec::new()));
        }
        let mut invocation = self.scripts.claim_routes.prepare_invoke();
        invocation.arg(now.0);
        for user in &users {
            invocation.key(claim_key(*user)).key(route_key(*user));
        }
        let v: Vec<Value> = self.invoke(&invocation).await?;
        if v.len() != users.len() * 2 {
            return Err(bad_reply("routes", &Value::Array(v)));
        }
        let routes = users
            .iter()
            .zip(v.chunks_exact(2))
            .map(|(user, pair)| {
                let record = match string(&pair[0])? {
                    Some(server) => Some(RouteRecord {
                        server: ServerId(server),
                        epoch: Epoch(num(&pair[1])?),
                    }),
                    None => None,
                };
                Ok((*user, record))
            })
            .collect::<R<Vec<_>>>()?;
        Ok(StoreReply::Routes(routes))
    }

    /// `ListOnline`: SCAN the route records (never KEYS: it blocks Redis), judge each batch
    /// with the `LoadRoutes` script, read the names, stop once `limit` are found. SCAN may
    /// return a key twice; the map dedups.
    async fn online(&self, now: UnixMillis, limit: u32) -> R<StoreReply> {
        let limit = limit as usize;
        let mut found: BTreeMap<UserId, OnlineEntry> = BTreeMap::new();
        let mut cursor: u64 = 0;
        while found.len() < limit {
            let (next, keys): (u64, Vec<String>) = self
                .query(
                    ::redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg("cim:route:*")
                        .arg("COUNT")
                        .arg(SCAN_COUNT),
                )
                .await?;
            let users: Vec<UserId> = keys
                .iter()
                .filter_map(|k| user_of_route_key(k))
                .filter(|u| !found.contains_key(u))
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            if !users.is_empty() {
                let StoreReply::Routes(routes) = self.routes(now, users).await? else {
                    return Err(StoreUnavailable("redis: routes answered oddly".into()));
                };
                let online: Vec<(UserId, ServerId)> = routes
                    .into_iter()
                    .filter_map(|(user, record)| Some((user, record?.server)))
                    .collect();
                let mut pipe = ::redis::pipe();
                for (user, _) in &online {
                    pipe.hget(acct_key(*user), "name");
                }
                let names: Vec<Option<String>> = if online.is_empty() {
                    Vec::new()
                } else {
                    self.query_pipe(&pipe).await?
                };
                for ((user, server), name) in online.into_iter().zip(names) {
                    // A route record without an account is not a user anyone can address.
                    if let Some(name) = name {
                        found.insert(user, OnlineEntry { user, name, server });
                    }
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        Ok(StoreReply::Online(
            found.into_values().take(limit).collect(),
        ))
    }

    // --- conversations ----------------------------------------------------------------

    async fn members(&self, conv: ConvId) -> R<StoreReply> {
        let members = match &conv {
            ConvId::All => Vec::new(),
            ConvId::Private { low, high } => vec![*low, *high],
            ConvId::Group(_) => {
                let ids: Vec<u64> = self
                    .query(::redis::cmd("HKEYS").arg(conv_key(&conv, "members")))
                    .await?;
                let set: BTreeSet<u64> = ids.into_iter().collect();
                set.into_iter().map(UserId).collect()
            }
        };
        Ok(StoreReply::Members(members))
    }

    async fn append(
        &self,
        conv: ConvId,
        sender: UserId,
        msg_id: ClientMsgId,
        body: Bytes,
        now: UnixMillis,
        order: Option<SendOrder>,
    ) -> R<StoreReply> {
        // Membership of private conversations and `all` is about accounts, which live under
        // other tags: checked first, from a cache at most `ACCOUNT_CACHE_TTL` old, which a
        // deletion waits out before it answers (see the module docs).
        let mut pipe = ::redis::pipe();
        match &conv {
            ConvId::Private { low, high } => {
                if !self.accounts_exist(&[*low, *high]).await? {
                    return Ok(StoreReply::Appended(Err(AppendError::UnknownConversation)));
                }
                if sender != *low && sender != *high {
                    return Ok(StoreReply::Appended(Err(AppendError::NotMember)));
                }
                // The index first (see the module docs): a pipeline runs in order, so the
                // entries are in before the script, in the same round trip.
                pipe.sadd(convs_key(*low), conv.to_string())
                    .ignore()
                    .sadd(convs_key(*high), conv.to_string())
                    .ignore();
            }
            ConvId::All => {
                if !self.accounts_exist(&[sender]).await? {
                    return Ok(StoreReply::Appended(Err(AppendError::NotMember)));
                }
            }
            ConvId::Group(_) => {}
        }
        let body_hash: [u8; 32] = Sha256::digest(&body).into();
        let encoded = cim_proto::Message {
            sender: sender.0,
            msg_id_hi: msg_id.hi(),
            msg_id_lo: msg_id.lo(),
            body: body.clone(),
            appended_at_ms: now.0,
            ..Default::default()
        }
        .encode_to_vec();
        let script = &self.scripts.append;
        pipe.cmd("EVALSHA")
            .arg(script.get_hash())
            .arg(5)
            .arg(conv_key(&conv, "meta"))
            .arg(conv_key(&conv, "log"))
            .arg(idem_key(&conv, sender, msg_id))
            .arg(conv_key(&conv, "members"))
            // Unordered appends never touch it; any key of the conversation's slot will do.
            .arg(order_key(&conv, sender, order.map_or(0, |o| o.stream)))
            .arg(if matches!(conv, ConvId::Group(_)) {
                "1"
            } else {
                "0"
            })
            .arg(sender.0)
            .arg(&body_hash[..])
            .arg(encoded)
            .arg(now.0)
            .arg(millis(self.options.idempotency_ttl))
            .arg(self.options.max_log_len as u64)
            .arg(self.new_log_epoch().0)
            .arg(order.map_or(0, |o| o.seq))
            .arg(order.map_or(0, |o| o.after));
        let (v,): (Vec<Value>,) = self.query_pipe_with_script(&pipe, script).await?;
        let status = v.first().map(string).transpose()?.flatten();
        let result = match (status.as_deref(), v.as_slice()) {
            (Some("unknown"), _) => Err(AppendError::UnknownConversation),
            (Some("not_member"), _) => Err(AppendError::NotMember),
            (Some("conflict"), _) => Err(AppendError::ConflictingRetry),
            (Some("out_of_order"), _) => Err(AppendError::OutOfOrder),
            (Some("superseded"), _) => Err(AppendError::Superseded),
            (Some(kind @ ("ok" | "dup")), [_, epoch, seq, at]) => Ok(Appended {
                message: StoredMessage {
                    conv,
                    log_epoch: LogEpoch(num(epoch)?),
                    seq: num(seq)?,
                    sender,
                    msg_id,
                    // A duplicate's body is the retry's, equal to the original's (same hash).
                    body,
                    appended_at: UnixMillis(num(at)?),
                },
                duplicate: kind == "dup",
            }),
            _ => return Err(bad_reply("append", &Value::Array(v))),
        };
        Ok(StoreReply::Appended(result))
    }

    async fn heads(&self, user: UserId) -> R<StoreReply> {
        let (exists, all_from) = self.account_state(user).await?;
        let (indexed, cursors): (Vec<String>, BTreeMap<String, String>) = self
            .query_pipe(
                ::redis::pipe()
                    .smembers(convs_key(user))
                    .hgetall(cursors_key(user)),
            )
            .await?;
        if !exists {
            return Ok(StoreReply::Heads(Vec::new()));
        }
        // Unparseable entries cannot come from this code; skipping them keeps one bad key
        // from hiding every conversation.
        let mut convs: BTreeSet<ConvId> = indexed.iter().filter_map(|c| c.parse().ok()).collect();
        convs.insert(ConvId::All);
        convs.retain(|c| !matches!(c, ConvId::Private { .. }) || c.peer_of(user).is_some());
        let convs: Vec<ConvId> = convs.into_iter().collect();
        let calls: Vec<_> = convs
            .iter()
            .map(|conv| read_call(user, conv, LogEpoch(0), 0, 0, false))
            .collect();
        let values = self.read_pipelined(&calls).await?;
        if values.len() != convs.len() {
            return Err(bad_reply("heads", &Value::Array(values)));
        }
        let mut heads = Vec::new();
        for (conv, value) in convs.into_iter().zip(values) {
            let Some(read) = parse_read(&value)? else {
                continue; // no log (yet): not reported
            };
            if read.joined < 0 {
                continue; // indexed group the user is not (or no longer) a member of
            }
            let mut cursor = cursor_in(cursors.get(&conv.to_string()), read.log_epoch);
            if conv == ConvId::All {
                cursor = cursor.max(all_from.floor(read.log_epoch));
            }
            heads.push(read.head(conv, cursor));
        }
        Ok(StoreReply::Heads(heads))
    }

    async fn fetch(
        &self,
        user: UserId,
        conv: ConvId,
        log_epoch: LogEpoch,
        after_seq: u64,
        limit: u32,
    ) -> R<StoreReply> {
        let (exists, all_from) = self.account_state(user).await?;
        let cursor: Option<String> = self
            .query(
                ::redis::cmd("HGET")
                    .arg(cursors_key(user))
                    .arg(conv.to_string()),
            )
            .await?;
        let may_read = match &conv {
            ConvId::All => exists,
            ConvId::Private { .. } => conv.peer_of(user).is_some(),
            ConvId::Group(_) => false, // the script checks membership
        };
        if !may_read && !matches!(conv, ConvId::Group(_)) {
            return Ok(StoreReply::NotMember);
        }
        let call = read_call(user, &conv, log_epoch, after_seq, limit, may_read);
        let value = self.read_pipelined(&[call]).await?;
        let Some(value) = value.first() else {
            return Err(bad_reply("fetch", &Value::Array(value)));
        };
        let read = parse_read(value)?;
        // A group has a log from its creation: no log, or no membership, is not a member.
        let is_group = matches!(conv, ConvId::Group(_));
        if is_group && read.as_ref().is_none_or(|r| r.joined < 0) {
            return Ok(StoreReply::NotMember);
        }
        let Some(read) = read else {
            return Ok(StoreReply::Fetched {
                head: ConvHead {
                    conv,
                    log_epoch: LogEpoch(0),
                    head_seq: 0,
                    first_available_seq: 1,
                    cursor_seq: 0,
                },
                messages: Vec::new(),
            });
        };
        let mut cursor = cursor_in(cursor.as_ref(), read.log_epoch);
        if conv == ConvId::All {
            cursor = cursor.max(all_from.floor(read.log_epoch));
        }
        let messages = read
            .messages
            .iter()
            .map(|(seq, bytes)| decode_message(&conv, read.log_epoch, *seq, bytes))
            .collect::<R<Vec<_>>>()?;
        Ok(StoreReply::Fetched {
            head: read.head(conv, cursor),
            messages,
        })
    }

    async fn advance_cursors(
        &self,
        user: UserId,
        cursors: Vec<(ConvId, LogEpoch, u64)>,
    ) -> R<StoreReply> {
        if cursors.is_empty() {
            return Ok(StoreReply::CursorsAdvanced);
        }
        let mut pipe = ::redis::pipe();
        for (conv, _, _) in &cursors {
            pipe.hget(conv_key(conv, "meta"), "epoch");
        }
        let current: Vec<Option<u64>> = self.query_pipe(&pipe).await?;
        let mut invocation = self.scripts.advance_cursors.prepare_invoke();
        invocation.key(cursors_key(user));
        let mut any = false;
        for ((conv, log_epoch, seq), current) in cursors.iter().zip(current) {
            // A cursor of a replaced (or absent) log means nothing now.
            if current == Some(log_epoch.0) {
                invocation.arg(conv.to_string()).arg(log_epoch.0).arg(*seq);
                any = true;
            }
        }
        if any {
            let _: i64 = self.invoke(&invocation).await?;
        }
        Ok(StoreReply::CursorsAdvanced)
    }

    async fn create_group(&self, conv: ConvId, owner: UserId) -> R<StoreReply> {
        if !matches!(conv, ConvId::Group(_)) {
            return Ok(StoreReply::GroupCreated { created: false });
        }
        let _: i64 = self
            .query(
                ::redis::cmd("SADD")
                    .arg(convs_key(owner))
                    .arg(conv.to_string()),
            )
            .await?;
        let created: i64 = self
            .invoke(
                self.scripts
                    .create_group
                    .key(conv_key(&conv, "meta"))
                    .key(conv_key(&conv, "members"))
                    .arg(owner.0)
                    .arg(self.new_log_epoch().0),
            )
            .await?;
        Ok(StoreReply::GroupCreated {
            created: created == 1,
        })
    }

    async fn join_group(&self, conv: ConvId, user: UserId) -> R<StoreReply> {
        if !matches!(conv, ConvId::Group(_)) {
            return Ok(StoreReply::GroupJoined(None));
        }
        let _: i64 = self
            .query(
                ::redis::cmd("SADD")
                    .arg(convs_key(user))
                    .arg(conv.to_string()),
            )
            .await?;
        let joined: i64 = self
            .invoke(
                self.scripts
                    .join_group
                    .key(conv_key(&conv, "meta"))
                    .key(conv_key(&conv, "members"))
                    .arg(user.0),
            )
            .await?;
        Ok(StoreReply::GroupJoined(u64::try_from(joined).ok()))
    }
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
            let pong = tokio::time::timeout(
                self.options.command_timeout,
                self.query::<String>(&mut ::redis::cmd("PING")),
            )
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

// --- keys -----------------------------------------------------------------------------

pub(super) const NEXT_USER: &str = "cim:{names}:next_user";

fn name_key(name: &str) -> String {
    format!("cim:{{names}}:name:{name}")
}

fn acct_key(user: UserId) -> String {
    format!("cim:acct:{{u:{}}}", user.0)
}

fn claim_key(user: UserId) -> String {
    format!("cim:claim:{{u:{}}}", user.0)
}

fn failures_key(user: UserId) -> String {
    format!("cim:fail:{{u:{}}}", user.0)
}

fn route_key(user: UserId) -> String {
    format!("cim:route:{{u:{}}}", user.0)
}

/// Keys SCAN asks for per round trip: enough to make progress, small enough not to stall
/// Redis.
const SCAN_COUNT: u64 = 200;

/// The user of a `cim:route:{u:<id>}` key; `None` for anything else the pattern matched.
fn user_of_route_key(key: &str) -> Option<UserId> {
    let id = key.strip_prefix("cim:route:{u:")?.strip_suffix('}')?;
    id.parse().ok().map(UserId)
}

fn convs_key(user: UserId) -> String {
    format!("cim:convs:{{u:{}}}", user.0)
}

fn cursors_key(user: UserId) -> String {
    format!("cim:cursors:{{u:{}}}", user.0)
}

/// `part` is `meta`, `log` or `members`. Group names are restricted by `ConvId::group` to
/// characters that cannot end the hash tag early.
fn conv_key(conv: &ConvId, part: &str) -> String {
    format!("cim:conv:{{c:{conv}}}:{part}")
}

fn idem_key(conv: &ConvId, sender: UserId, msg_id: ClientMsgId) -> String {
    format!("cim:conv:{{c:{conv}}}:idem:{}:{:032x}", sender.0, msg_id.0)
}

fn order_key(conv: &ConvId, sender: UserId, stream: u64) -> String {
    format!("cim:conv:{{c:{conv}}}:order:{}:{stream:016x}", sender.0)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

// --- reply parsing --------------------------------------------------------------------

/// A number sent as an integer or a decimal string (scripts return both).
fn num(v: &Value) -> R<u64> {
    opt_num(v)?.ok_or_else(|| bad_reply("a number", v))
}

fn opt_num(v: &Value) -> R<Option<u64>> {
    match v {
        Value::Nil => Ok(None),
        Value::Int(i) => u64::try_from(*i)
            .map(Some)
            .map_err(|_| bad_reply("a number", v)),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| bad_reply("a number", v)),
        Value::SimpleString(s) => s.parse().map(Some).map_err(|_| bad_reply("a number", v)),
        _ => Err(bad_reply("a number", v)),
    }
}

fn bytes(v: &Value) -> R<Option<Vec<u8>>> {
    match v {
        Value::Nil => Ok(None),
        Value::BulkString(b) => Ok(Some(b.clone())),
        Value::SimpleString(s) => Ok(Some(s.clone().into_bytes())),
        _ => Err(bad_reply("a string", v)),
    }
}

fn string(v: &Value) -> R<Option<String>> {
    bytes(v)?
        .map(|b| String::from_utf8(b).map_err(|_| bad_reply("utf-8", v)))
        .transpose()
}

/// `[c_epoch, server, lease, token]`, all nil when there is no claim.
fn parse_claim(fields: &[Value]) -> R<Option<Claim>> {
    let [epoch, server, lease, token] = fields else {
        return Err(bad_reply("claim", &Value::Array(fields.to_vec())));
    };
    let Some(epoch) = opt_num(epoch)? else {
        return Ok(None);
    };
    let token = bytes(token)?.unwrap_or_default();
    let resume_token_hash: [u8; 32] = token
        .try_into()
        .map_err(|_| bad_reply("claim token", &Value::Array(fields.to_vec())))?;
    Ok(Some(Claim {
        epoch: Epoch(epoch),
        server: ServerId(string(server)?.unwrap_or_default()),
        lease_until: UnixMillis(num(lease)?),
        resume_token_hash,
    }))
}

/// Keys and arguments of one `read.lua` call.
fn read_call(
    user: UserId,
    conv: &ConvId,
    log_epoch: LogEpoch,
    after_seq: u64,
    limit: u32,
    may_read: bool,
) -> (Vec<String>, Vec<String>) {
    let keys = vec![
        conv_key(conv, "meta"),
        conv_key(conv, "members"),
        conv_key(conv, "log"),
    ];
    let is_group = matches!(conv, ConvId::Group(_));
    let args = vec![
        user.0.to_string(),
        if is_group { "1" } else { "0" }.to_string(),
        log_epoch.0.to_string(),
        after_seq.to_string(),
        limit.to_string(),
        if may_read { "1" } else { "0" }.to_string(),
    ];
    (keys, args)
}

struct Read {
    log_epoch: LogEpoch,
    head_seq: u64,
    first: u64,
    /// -1: not a member of the group.
    joined: i64,
    messages: Vec<(u64, Vec<u8>)>,
}

impl Read {
    /// The head as the reference computes it: history starts after the join seq.
    fn head(&self, conv: ConvId, cursor: u64) -> ConvHead {
        let joined = u64::try_from(self.joined).unwrap_or(0);
        ConvHead {
            conv,
            log_epoch: self.log_epoch,
            head_seq: self.head_seq,
            first_available_seq: self.first.max(joined + 1),
            cursor_seq: cursor.max(joined),
        }
    }
}

fn parse_read(v: &Value) -> R<Option<Read>> {
    let Value::Array(items) = v else {
        return Err(bad_reply("read", v));
    };
    match items.as_slice() {
        [Value::Nil] => Ok(None),
        [epoch, head, first, joined, rest @ ..] if rest.len() % 2 == 0 => {
            let joined = match joined {
                Value::Int(i) => *i,
                other => return Err(bad_reply("read joined", other)),
            };
            let messages = rest
                .chunks_exact(2)
                .map(|pair| {
                    let body = bytes(&pair[1])?.ok_or_else(|| bad_reply("read message", v))?;
                    Ok((num(&pair[0])?, body))
                })
                .collect::<R<Vec<_>>>()?;
            Ok(Some(Read {
                log_epoch: LogEpoch(num(epoch)?),
                head_seq: num(head)?,
                first: num(first)?,
                joined,
                messages,
            }))
        }
        _ => Err(bad_reply("read", v)),
    }
}

/// An account's `all` start from its `all_epoch` and `all_seq` fields (absent, as in accounts
/// registered before the start was recorded: 0, everything is owed).
fn all_from(epoch: Option<&str>, seq: Option<&str>) -> AllFrom {
    AllFrom {
        log_epoch: LogEpoch(epoch.and_then(|e| e.parse().ok()).unwrap_or(0)),
        seq: seq.and_then(|s| s.parse().ok()).unwrap_or(0),
    }
}

/// A stored `<log epoch>:<seq>` cursor, if it is of the current log epoch.
fn cursor_in(stored: Option<&String>, log_epoch: LogEpoch) -> u64 {
    stored
        .and_then(|s| s.split_once(':'))
        .filter(|(epoch, _)| epoch.parse() == Ok(log_epoch.0))
        .and_then(|(_, seq)| seq.parse().ok())
        .unwrap_or(0)
}

fn decode_message(conv: &ConvId, log_epoch: LogEpoch, seq: u64, bytes: &[u8]) -> R<StoredMessage> {
    let m = cim_proto::Message::decode(bytes)
        .map_err(|e| StoreUnavailable(format!("redis: corrupt message {conv} {seq}: {e}")))?;
    Ok(StoredMessage {
        conv: conv.clone(),
        log_epoch,
        seq,
        sender: UserId(m.sender),
        msg_id: ClientMsgId::from_halves(m.msg_id_hi, m.msg_id_lo),
        body: m.body,
        appended_at: UnixMillis(m.appended_at_ms),
    })
}
