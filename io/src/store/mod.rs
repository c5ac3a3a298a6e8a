//! Store backends: what executes the machines' [`StoreCommand`]s.
//!
//! [`Store`] is the one interface the shell drives; [`MemoryBackend`] wraps the pure reference
//! (`cim_core::memstore::MemoryStore`) and [`RedisStore`] runs the same commands as Lua
//! scripts, on one Redis or on a Redis Cluster. `tests/store_conformance.rs` runs one scenario suite against both and compares
//! their replies.
//!
//! # Time
//!
//! Every command runs at the caller's wall clock `now` (an `Append` at its own `now`),
//! passed to the scripts as an argument; Redis `TIME` is never read. So both backends are
//! deterministic given `now`, and a lease or idempotency record is judged by the clock of the
//! node that asks. Clock skew between nodes is covered by the lease margins: a server
//! self-fences at `lease_ttl × (1 − ε)` of *its* clock, a route treats a claim as live until
//! `lease_until` of *its* clock, and ε is chosen above the skew the deployment tolerates
//! (NTP-synchronised hosts). The only use of Redis's own clock is `PEXPIRE` on idempotency
//! records, as garbage collection: whichever of the logical TTL (`now`-based) and the Redis
//! TTL ends first ends the record, so under skew it may end early by the skew; the TTL is
//! configured above the clients' outbox maximum age by more than that.
//!
//! One difference from the reference shows only when `now` goes backwards across appends
//! of one conversation (two routes with skewed clocks): the reference drops every record
//! older than the TTL at the newest `now` it has seen, Redis judges each record by the
//! asking append's `now`. With monotonic `now` (one clock, or skew far below the TTL at its
//! boundary) they agree; the randomized conformance test keeps `now` monotonic.
//!
//! # Redis key layout
//!
//! Hash tags (`{..}`) keep every key one script touches in one slot, so scripts stay correct
//! on Redis Cluster; every key a script touches is passed in `KEYS`, never built inside.
//!
//! | key | type | contents |
//! |---|---|---|
//! | `cim:{names}:schema` | string | the layout's version, `2` (absent: 1, before versioning; see `migrate`) |
//! | `cim:{names}:next_user` | string | last issued user id (`INCR`); ids are never reused, not even a deleted account's |
//! | `cim:{names}:name:<name>` | hash | `user`, `password_hash`, `name` (as typed), `all_epoch`, `all_seq`, `deleted` (unix ms, tombstones): the name's reservation, keyed by the name in ASCII lowercase so names are unique regardless of case (schema 1 could hold records keyed as typed: the migration moves them; they are still checked) |
//! | `cim:{names}:conflicts` | hash | user id -> name: accounts whose name another, older account held in another case when the store was migrated (they log in by id) |
//! | `cim:{names}:migration_lock` | string, `PX` | the migration's lock (a random token) |
//! | `cim:acct:{u:<id>}` | hash | `name`, `password_hash`, `all_epoch` and `all_seq` (the `all` head at registration: where the account starts reading `all`; absent = 0), `deleted` (unix ms; a tombstone has no `password_hash`) |
//! | `cim:claim:{u:<id>}` | hash | `epoch` (counter, survives the claim); the claim: `c_epoch`, `server`, `lease` (unix ms), `token` (32 bytes) |
//! | `cim:route:{u:<id>}` | hash | `server`, `epoch` |
//! | `cim:fail:{u:<id>}` | hash, `PEXPIRE` forget-after | `count`, `last` (unix ms): the login throttle's failed logins |
//! | `cim:convs:{u:<id>}` | set | canonical conv ids the user may take part in (a superset hint) |
//! | `cim:cursors:{u:<id>}` | hash | conv id -> `<log epoch>:<seq>` |
//! | `cim:conv:{c:<conv>}:meta` | hash | `epoch` (log epoch), `head`, `first` (first available seq) |
//! | `cim:conv:{c:<conv>}:log` | hash | seq -> message (prost `cim.v1.Message`, with conv, log epoch and seq left out: the key and field say them) |
//! | `cim:conv:{c:<conv>}:idem:<sender>:<msg id hex>` | hash, `PEXPIRE` ttl | `hash` (SHA-256 of the body), `seq`, `at` |
//! | `cim:conv:{c:<conv>}:order:<sender>:<stream hex>` | string, `PX` ttl | `<last>:<at>`: the stream's last stored order seq, and when it was written |
//! | `cim:conv:{c:<conv>}:members` | hash | member -> seq joined at (groups) |
//! | `cim:conv:{c:<conv>}:wait` | string, `PX` | written only by a resent append under `WAIT` (`--store-wait-replicas`), so that the `WAIT` after it covers the original append too (a duplicate writes nothing of its own) |
//!
//! `<conv>` is the canonical text form (`all`, `g:<name>`, `p:<low>:<high>`). The names
//! counter and reservations share the `{names}` tag so registration's check-and-take is one
//! script (registration is rare; one slot for it is fine). Numbers go through Lua doubles, so
//! epochs, seqs and times must stay below 2^53 (they are counters and unix milliseconds);
//! log epochs (random u64) and cursor seqs (client-supplied) are kept as strings throughout.
//!
//! # What is atomic
//!
//! One script (or one single-key command) per command, except where a command's keys span
//! hash tags. There the conversation part is one script and the rest is ordered so that an
//! interruption is harmless:
//!
//! - `RegisterAccount`: the `all` head is read first (so a message appended meanwhile is
//!   owed, never skipped), then the name reservation and id are one script (`{names}`); the
//!   account hash (`{u:<id>}`) is written after it, from the reservation's values, field by
//!   field where missing (`HSETNX`: it never undoes a password reset), by
//!   `account_complete.lua`, which also marks the claim hash with this Redis process's run
//!   id when the reservation was new (a lost first login's epoch is never issued again:
//!   docs/design.md, "Never the same name for two contents"). If the writer dies
//!   in between, the account is missing until the next registration attempt of that name,
//!   which gets `NameTaken` and writes the account from the reservation (idempotent: the
//!   reservation never changes), unless the reservation is a tombstone's. Until then nobody
//!   holds the id, so nobody reads it.
//! - `DeleteAccount` (a tombstone): the account hash is marked `deleted` and loses its
//!   `password_hash` (one script: from then on no login passes and no fresh existence check
//!   does), then the name record, then the claim (compare-epoch release, which also drops
//!   the route record), the group memberships in the user's index and the failure record.
//!   Each step is idempotent and a retry finishes an interrupted deletion. It answers only
//!   after [`ACCOUNT_CACHE_TTL`], by when no route trusts a cached "exists" any more.
//! - `Append`: accounts are checked first (`UnknownConversation` / `NotMember` for private
//!   and `all`), from a per-store cache of accounts seen alive that is forgotten every
//!   [`ACCOUNT_CACHE_TTL`] (1 s): accounts can be deleted, so a route trusts what it saw for
//!   at most that long, and a deletion answers only after it. An append whose check passed
//!   before a deletion and whose script runs after it (a request delayed in flight by more
//!   than the TTL, bounded by the command timeout) is stored: linearized before the
//!   deletion, as any append that raced it. For a private
//!   conversation both users' `cim:convs` entries are added *before* the append script. The
//!   index is a superset: `LoadHeads` only reports an indexed conversation whose log exists
//!   (and, for groups, of which the user is a member), so an entry written for an append
//!   that then failed is invisible, and an append that succeeded is never missing from it.
//! - `CreateGroup` / `JoinGroup`: the index entry is added before the script, for the same
//!   reason. `LeaveGroup` leaves it: removing it could race a concurrent re-join and hide
//!   the group; the membership check filters it instead.
//! - `LoadHeads`: the user's index and cursors are read first (one tag), then each
//!   conversation's head is one read script (pipelined). Each head is a snapshot of its
//!   conversation; the set of heads is not one snapshot, as it is not in any sharded store.
//! - `Fetch`: the cursor (and for `all`, whether the account exists) is read, then the log
//!   window and head are one script.
//! - `AdvanceCursors`: the conversations' log epochs are read, then the cursor hash is
//!   updated in one script. A log epoch only changes when a log is lost and recreated; a
//!   cursor written under an epoch that changed in between is ignored by every reader.
//! - `RefreshLeases` and `LoadRoutes` touch several users' keys in one script. That is one
//!   atomic step on a single node; on Redis Cluster the batch is split per slot (one script
//!   call per slot, sent at once; every outcome is per user, so the split changes nothing
//!   but atomicity across users, which no caller relies on). If some calls fail (a dead
//!   master), only their users are affected: `RefreshLeases` answers `LeaseRefresh::Unknown`
//!   for them (the server fences just those sessions at their deadline) and `LoadRoutes`
//!   reports them without a route (not pushed to; they recover by sync). Only if every call
//!   fails does the command fail. Those that ran took effect, and every command is safe to
//!   retry.
//!
//! # Redis Cluster
//!
//! `RedisStore::connect_cluster` runs the same steps on a cluster (`redis/cluster.rs`). Where a
//! key lives is `cim_core::slots` (the tags above, `key_slot`), and a split step is [`split`]:
//! the simulation's sharded store (`cim-sim-hosts`) places and splits commands by the same
//! two. Every script's keys share one hash tag, so each script is one atomic step on its
//! slot's master, exactly as on one node. What a single node does in one round trip over several tags is
//! split per slot there, and is then several steps, each atomic alone:
//!
//! - `RefreshLeases`, `LoadRoutes`: one script per slot (above).
//! - `LoadNames`, `ListAccounts`, the account checks of `Append`, `AdvanceCursors`' epoch
//!   reads, `DeleteAccount`'s membership removals: pipelines of independent single-key reads
//!   or idempotent writes, one per slot. `LoadHeads`: its per-conversation read scripts, one
//!   pipeline per slot. None of them is one snapshot on a single node either (see above).
//! - `Append` to a private conversation: the two users' index entries (`SADD`, their own
//!   slots) are written and answered before the append script runs, rather than in its
//!   pipeline: the same order, so the index stays a superset.
//! - `ListOnline`: `SCAN` on every master, each page judged with `LoadRoutes`.
//! - The layout's version and its migration live in the `{names}` slot: checked, locked and
//!   migrated on that slot's master (its `SCAN` runs there).
//! - The eviction-policy check at connect asks every master (`INFO memory`).
//! - `health` (`PING`) asks every master and is healthy when any answers: one dead master is
//!   one shard's outage, which only the commands on its slots see (the store watchdog of a
//!   server and a route's readiness then stay up for everyone else).
//! - The connection sits behind a circuit breaker (`redis/circuit.rs`) that stops the
//!   cluster client's busy loop while no node at all answers.
//! - `--store-wait-replicas`: `WAIT` rides in the append's pipeline, so it reaches the
//!   conversation's master on the append's connection.
//!
//! The cluster client follows `MOVED`, `ASK` and `TRYAGAIN` itself, for scripts and
//! pipelines alike (a redirected pipeline is sent again whole: each is idempotent up to its
//! script, which is last). A script is loaded on the node that answers `NOSCRIPT` only
//! (`redis/conn.rs`), never on all nodes at once.

mod memory;
mod migrate;
mod redis;
mod redis_tls;
pub mod split;

use std::future::Future;
use std::pin::Pin;

use cim_core::ids::UnixMillis;
use cim_core::store::{StoreCommand, StoreResult, StoreUnavailable};

pub use self::memory::MemoryBackend;
pub use self::migrate::{MigrateError, MigrationReport, NameConflict, SCHEMA_KEY, SCHEMA_VERSION};
pub use self::redis::{ACCOUNT_CACHE_TTL, CircuitStats, ConnectError, RedisOptions, RedisStore};
pub use self::redis_tls::{RedisTls, redact_url};

/// A boxed, sendable future borrowing the store (so `Arc<dyn Store>` can be moved into a
/// spawned task that awaits it).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A store backend. Each [`StoreCommand`] is one atomic step (see the module docs for the
/// precise exceptions on Redis) with the semantics of `cim_core::memstore::MemoryStore`.
pub trait Store: Send + Sync + 'static {
    /// Runs `command` at the caller's wall clock `now`. `Err` means the outcome is unknown
    /// (the command may or may not have taken effect); every command is safe to retry.
    fn execute(&self, now: UnixMillis, command: StoreCommand) -> StoreFuture<'_, StoreResult>;

    /// Whether the backend answers (a `PING` on Redis).
    fn health(&self) -> StoreFuture<'_, Result<(), StoreUnavailable>>;

    /// What the backend's circuit breaker has done (a Redis Cluster's: see
    /// `redis/circuit.rs`); all zero for the others.
    fn circuit(&self) -> CircuitStats {
        CircuitStats::default()
    }

    /// Brings the stored layout to this build's version before a route serves: Redis
    /// migrates an older layout once, under a lock, and refuses a newer one (see
    /// `migrate`). Nothing to do for the in-memory backends.
    fn ensure_schema(&self) -> StoreFuture<'_, Result<(), String>> {
        Box::pin(std::future::ready(Ok(())))
    }
}
