//! Versioned Redis layout and its migration.
//!
//! The layout's version is the string key `cim:{names}:schema` ([`SCHEMA_KEY`]). A store
//! without it was written by CIM before versioning: schema 1. This version,
//! [`SCHEMA_VERSION`] 2, changes:
//!
//! - **Names ignore ASCII case.** Every name reservation lives under its lowercase key
//!   (`cim:{names}:name:<lowercase>`). Schema 1 could still hold reservations keyed as
//!   typed (from before names ignored case) — `cim:{names}:name:Bob` beside a later
//!   `cim:{names}:name:bob` of another account. The migration moves each to its lowercase
//!   key. **Conflicts** (two accounts whose names differ only in case): the older account
//!   (the lower id) keeps the name; the newer keeps its id, password, displayed name and
//!   history and still logs in with its id (login compares names ignoring case), but the
//!   name is no longer reserved for it, so a login by name alone reaches the older one.
//!   The newer ids are listed in the hash `cim:{names}:conflicts` (id -> name) and in the
//!   migration's report; the operator may tell those users or delete the accounts.
//! - **Where a new account starts reading `all`** (`all_epoch`, `all_seq` in the account
//!   and name records). Accounts of schema 1 have neither, which reads as 0: they keep
//!   being owed all of `all`, as before. Nothing to migrate.
//! - **Tombstones** (`deleted` in the account and name records). Schema 1 has none.
//!
//! The route migrates at start ([`RedisStore::ensure_schema`], under a lock so that two
//! routes starting together migrate once); `cim admin migrate --redis URL` does the same
//! by hand and prints what it did. The migration is idempotent: an interrupted one is
//! finished by the next. A store of a newer schema than this build knows is refused.

use std::time::Duration;

use ::redis::Value;
use cim_core::ids::UserId;
use cim_core::store::StoreUnavailable;

use super::redis::RedisStore;

/// The key holding the layout's version.
pub const SCHEMA_KEY: &str = "cim:{names}:schema";
/// The layout this build writes.
pub const SCHEMA_VERSION: u32 = 2;
const LOCK_KEY: &str = "cim:{names}:migration_lock";
const CONFLICTS_KEY: &str = "cim:{names}:conflicts";
/// How long a migration may hold its lock before another process may take over (a
/// migration of a million names takes seconds; a dead migrator's lock lapses).
const LOCK_TTL: Duration = Duration::from_secs(120);
/// How long a starting route waits for another process's migration.
const WAIT_FOR_OTHER: Duration = Duration::from_secs(150);
const SCAN_COUNT: u64 = 500;

/// What a migration did.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct MigrationReport {
    /// The schema found (1: unversioned).
    pub from: u32,
    pub to: u32,
    /// Name records moved to their lowercase key.
    pub moved: u64,
    /// Duplicate records of one account removed.
    pub duplicates: u64,
    /// Names two accounts held in different case: who kept it, who lost the reservation.
    pub conflicts: Vec<NameConflict>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NameConflict {
    pub name: String,
    pub kept: UserId,
    pub unreserved: UserId,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreUnavailable),
    #[error(
        "the store's layout is schema {found}, newer than this build's {SCHEMA_VERSION}: run a \
         newer CIM"
    )]
    Newer { found: u32 },
    #[error(
        "another process holds the migration lock ({LOCK_KEY}); it lapses within {LOCK_TTL:?} \
         if that process died"
    )]
    Locked,
    #[error("bad value in {SCHEMA_KEY}: {0:?}")]
    BadVersion(String),
}

impl RedisStore {
    /// The store's schema: [`SCHEMA_VERSION`] for a store with no data yet (nothing to
    /// migrate), 1 for data written before versioning.
    pub async fn schema_version(&self) -> Result<u32, MigrateError> {
        let (version, users): (Option<String>, Option<u64>) = self
            .query_pipe_pub(::redis::pipe().get(SCHEMA_KEY).get(super::redis::NEXT_USER))
            .await?;
        match version {
            Some(v) => v.parse().map_err(|_| MigrateError::BadVersion(v)),
            None if users.is_none() => Ok(SCHEMA_VERSION),
            None => Ok(1),
        }
    }

    /// At start: a store of this schema (or an empty one) is used as it is (an empty one is
    /// stamped); an older one is migrated, once, under the lock (waiting for another
    /// process that holds it); a newer one is refused.
    pub async fn ensure_schema(&self) -> Result<Option<MigrationReport>, MigrateError> {
        let deadline = tokio::time::Instant::now() + WAIT_FOR_OTHER;
        loop {
            let found = self.schema_version().await?;
            if found > SCHEMA_VERSION {
                return Err(MigrateError::Newer { found });
            }
            if found == SCHEMA_VERSION {
                let _: () = self
                    .query_pub(
                        ::redis::cmd("SET")
                            .arg(SCHEMA_KEY)
                            .arg(SCHEMA_VERSION)
                            .arg("NX"),
                    )
                    .await
                    .map(|_: Value| ())?;
                return Ok(None);
            }
            match self.migrate().await {
                Err(MigrateError::Locked) if tokio::time::Instant::now() < deadline => {
                    tracing::info!("another process is migrating the store; waiting");
                    // Polling the store: there is nothing to subscribe to (a route's ACL
                    // has no pub/sub), and this runs once, at start.
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                result => return result.map(Some),
            }
        }
    }

    /// Migrates the layout to [`SCHEMA_VERSION`] under the migration lock (see the module
    /// docs). Safe to run again, and while routes serve (each step is one script).
    pub async fn migrate(&self) -> Result<MigrationReport, MigrateError> {
        let token = {
            use rand::{Rng as _, SeedableRng as _};
            // Only needs to differ from another process's: OS entropy, once per migration.
            let mut rng = rand_chacha::ChaCha8Rng::from_os_rng();
            format!("{:032x}", rng.random::<u128>())
        };
        let locked: Option<String> = self
            .query_pub(
                ::redis::cmd("SET")
                    .arg(LOCK_KEY)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(LOCK_TTL.as_millis() as u64),
            )
            .await?;
        if locked.is_none() {
            return Err(MigrateError::Locked);
        }
        let result = self.migrate_locked().await;
        // Only our own lock: it may have lapsed and been taken by another process.
        let unlock = ::redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) \
             end return 0",
        );
        let _: Result<i64, _> = self.invoke_pub(unlock.key(LOCK_KEY).arg(&token)).await;
        result
    }

    async fn migrate_locked(&self) -> Result<MigrationReport, MigrateError> {
        let from = self.schema_version().await?;
        let mut report = MigrationReport {
            from,
            to: SCHEMA_VERSION.max(from),
            ..MigrationReport::default()
        };
        if from > SCHEMA_VERSION {
            return Err(MigrateError::Newer { found: from });
        }
        if from < 2 {
            self.names_to_lowercase(&mut report).await?;
        }
        let _: () = self
            .query_pub(::redis::cmd("SET").arg(SCHEMA_KEY).arg(SCHEMA_VERSION))
            .await
            .map(|_: Value| ())?;
        if from < SCHEMA_VERSION {
            tracing::info!(
                from,
                to = SCHEMA_VERSION,
                moved = report.moved,
                duplicates = report.duplicates,
                conflicts = report.conflicts.len(),
                "store layout migrated"
            );
            for c in &report.conflicts {
                tracing::warn!(
                    name = %c.name,
                    kept_by = c.kept.0,
                    unreserved = c.unreserved.0,
                    "two accounts held this name in different case: the older keeps it; the \
                     newer logs in by its id (listed in cim:{{names}}:conflicts, docs/admin.md)"
                );
            }
        }
        Ok(report)
    }

    /// Schema 1 -> 2: every name record under its lowercase key (see the module docs).
    async fn names_to_lowercase(&self, report: &mut MigrationReport) -> Result<(), MigrateError> {
        let script = ::redis::Script::new(include_str!("lua/migrate_name.lua"));
        let prefix = "cim:{names}:name:";
        let mut cursor: u64 = 0;
        loop {
            // Every name record is in the `{names}` slot: on a cluster, its master's keys.
            let (next, keys) = self
                .scan_names_page(cursor, "cim:{names}:name:*", SCAN_COUNT)
                .await?;
            for key in keys {
                let Some(name) = key.strip_prefix(prefix) else {
                    continue;
                };
                let lower = name.to_ascii_lowercase();
                if lower == name {
                    continue;
                }
                let (outcome, kept, unreserved): (u64, u64, u64) = self
                    .invoke_pub(
                        script
                            .key(&key)
                            .key(format!("{prefix}{lower}"))
                            .key(CONFLICTS_KEY)
                            .arg(name)
                            .arg(&lower),
                    )
                    .await?;
                match outcome {
                    1 => report.moved += 1,
                    2 => report.duplicates += 1,
                    3 => report.conflicts.push(NameConflict {
                        name: lower,
                        kept: UserId(kept),
                        unreserved: UserId(unreserved),
                    }),
                    _ => {}
                }
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        report.conflicts.sort_by_key(|c| c.unreserved);
        Ok(())
    }
}
