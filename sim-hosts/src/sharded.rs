//! A sharded store, as a Redis Cluster client sees one: [`ShardedStore`] sends each command
//! to the master owning its keys ([`cim_core::slots`], Redis's hash-slot rule) and splits a
//! multi-user command into one call per master ([`cim_io::store::split`], the split the Redis
//! store runs per slot), each master a store host of its own reached by a [`RemoteStore`].
//!
//! # What each master holds
//!
//! Every master host serves the one `MemoryBackend`, which models every master's keys
//! (`MemoryStoreConfig::shards`): a master's keys are those of its slots, its failover is
//! `MemoryBackend::restart_shard_from` (its keys restored from an older copy, in a new
//! incarnation of its own), and its outage is its host being down or cut off. A command
//! goes to the master of its *main* tag — the conversation's for a conversation's step
//! (append, fetch, group changes), the user's for a user's (claims, account, heads,
//! cursors), `{names}`'s for registration, a lookup by name, account listing and
//! `ListOnline` — and sees that master's outage. Its side steps on other tags (an
//! append's account checks and private index entries, the heads of a user's
//! conversations) run in the same atomic step on the one backend, without their masters'
//! availability: the model is more available than a cluster there, never less safe (what
//! a master lost is lost for every command that reads it).
//!
//! # Per-user outcomes, and health
//!
//! `RefreshLeases` and `LoadRoutes` split per master and answer per user, as on a cluster:
//! a dead master's users get `LeaseRefresh::Unknown` (fenced at their own deadline) and no
//! route (not pushed to; they recover by sync); only if every master failed does the
//! command fail. `LoadNames` splits too, and fails if any part does. `health` is "some
//! master answers", so one dead master neither fences nor unlists anyone else.

use cim_core::canary::{Canaries, Canary};
use cim_core::ids::UnixMillis;
use cim_core::slots::{NAMES_TAG, Shards};
use cim_core::store::{LeaseRefresh, StoreCommand, StoreReply, StoreResult, StoreUnavailable};
use cim_io::net::Network;
use cim_io::store::split::{group_by, run_split};
use cim_io::store::{Store, StoreFuture};

use crate::store::{RemoteOptions, RemoteStore};

/// Calls of one split step in flight at once: one per master.
const SPLIT_CONCURRENCY: usize = 64;

/// A [`Store`] over several masters; see the module docs.
#[derive(Debug)]
pub struct ShardedStore<N: Network> {
    masters: Vec<RemoteStore<N>>,
    shards: Shards,
    /// `ShardHealth` off: one master's outage fails health and every split command.
    canaries: Canaries,
}

impl<N: Network> ShardedStore<N> {
    /// One [`RemoteStore`] per master host, in slot order (the first holds the lowest slots).
    pub fn new(net: N, hosts: &[String], port: u16, options: RemoteOptions) -> Self {
        Self {
            masters: hosts
                .iter()
                .map(|host| RemoteStore::new(net.clone(), host.clone(), port, options))
                .collect(),
            shards: Shards::new(hosts.len(), 0),
            canaries: options.canaries,
        }
    }

    /// The master of `command`'s main tag (see the module docs).
    pub fn master_of(&self, command: &StoreCommand) -> usize {
        use StoreCommand as C;
        let s = &self.shards;
        match command {
            C::RegisterAccount { .. }
            | C::LoadAccountByName { .. }
            | C::ListAccounts { .. }
            | C::ListOnline { .. } => s.of_tag(NAMES_TAG),
            C::LoadAccount { user }
            | C::SetPassword { user, .. }
            | C::DeleteAccount { user }
            | C::LoadClaim { user }
            | C::ReplaceClaim { user, .. }
            | C::ResumeClaim { user, .. }
            | C::RevokeResumption { user }
            | C::ExpireClaim { user, .. }
            | C::ReleaseClaim { user, .. }
            | C::BindSession { user, .. }
            | C::LoadHeads { user }
            | C::AdvanceCursors { user, .. }
            | C::CountLoginFailure { user, .. }
            | C::ClearLoginFailures { user } => s.of_user(*user),
            C::LoadMembers { conv }
            | C::Append { conv, .. }
            | C::Fetch { conv, .. }
            | C::CreateGroup { conv, .. }
            | C::JoinGroup { conv, .. }
            | C::LeaveGroup { conv, .. } => s.of_conv(conv),
            // Split per master by `execute`; any master's answer would do for one part.
            C::RefreshLeases { sessions, .. } => sessions.first().map_or(0, |(u, _)| s.of_user(*u)),
            C::LoadRoutes { users } | C::LoadNames { users } => {
                users.first().map_or(0, |u| s.of_user(*u))
            }
        }
    }

    /// Whether a split command answers "unknown" for a failed master's users rather than
    /// failing whole (off only under the `shard-health` canary).
    fn per_master_outcomes(&self) -> bool {
        !self.canaries.disabled(Canary::ShardHealth)
    }

    async fn on_master(
        &self,
        master: usize,
        now: UnixMillis,
        command: StoreCommand,
    ) -> StoreResult {
        self.masters[master % self.masters.len()]
            .execute(now, command)
            .await
    }
}

fn unexpected(reply: &StoreReply) -> StoreUnavailable {
    StoreUnavailable(format!("sharded store: unexpected reply {reply:?}"))
}

impl<N: Network> Store for ShardedStore<N> {
    fn execute(&self, now: UnixMillis, command: StoreCommand) -> StoreFuture<'_, StoreResult> {
        Box::pin(async move {
            let s = &self.shards;
            match command {
                StoreCommand::RefreshLeases {
                    server,
                    lease_until,
                    sessions,
                } => {
                    let groups = group_by(&sessions, |(u, _)| s.of_user(*u));
                    let step = |part: Vec<&(cim_core::ids::UserId, cim_core::ids::Epoch)>| {
                        let master = part.first().map_or(0, |(u, _)| s.of_user(*u));
                        let command = StoreCommand::RefreshLeases {
                            server: server.clone(),
                            lease_until,
                            sessions: part.into_iter().copied().collect(),
                        };
                        async move {
                            match self.on_master(master, now, command).await? {
                                StoreReply::LeasesRefreshed(outcomes) => Ok(outcomes),
                                other => Err(unexpected(&other)),
                            }
                        }
                    };
                    let unknown = |(u, _): &(cim_core::ids::UserId, cim_core::ids::Epoch)| {
                        (*u, LeaseRefresh::Unknown)
                    };
                    let unknown = self.per_master_outcomes().then_some(unknown);
                    let outcomes =
                        run_split(&sessions, groups, step, unknown, SPLIT_CONCURRENCY).await?;
                    Ok(StoreReply::LeasesRefreshed(outcomes))
                }
                StoreCommand::LoadRoutes { users } => {
                    let groups = group_by(&users, |u| s.of_user(*u));
                    let step = |part: Vec<&cim_core::ids::UserId>| {
                        let master = part.first().map_or(0, |u| s.of_user(**u));
                        let command = StoreCommand::LoadRoutes {
                            users: part.into_iter().copied().collect(),
                        };
                        async move {
                            match self.on_master(master, now, command).await? {
                                StoreReply::Routes(routes) => Ok(routes),
                                other => Err(unexpected(&other)),
                            }
                        }
                    };
                    let unknown = |u: &cim_core::ids::UserId| (*u, None);
                    let unknown = self.per_master_outcomes().then_some(unknown);
                    let routes =
                        run_split(&users, groups, step, unknown, SPLIT_CONCURRENCY).await?;
                    Ok(StoreReply::Routes(routes))
                }
                StoreCommand::LoadNames { users } => {
                    let groups = group_by(&users, |u| s.of_user(*u));
                    let step = |part: Vec<&cim_core::ids::UserId>| {
                        let master = part.first().map_or(0, |u| s.of_user(**u));
                        let command = StoreCommand::LoadNames {
                            users: part.into_iter().copied().collect(),
                        };
                        async move {
                            match self.on_master(master, now, command).await? {
                                StoreReply::Names(names) => Ok(names),
                                other => Err(unexpected(&other)),
                            }
                        }
                    };
                    let none: Option<fn(&cim_core::ids::UserId) -> _> = None;
                    let names = run_split(&users, groups, step, none, SPLIT_CONCURRENCY).await?;
                    Ok(StoreReply::Names(names))
                }
                command => {
                    let master = self.master_of(&command);
                    self.on_master(master, now, command).await
                }
            }
        })
    }

    /// Healthy when some master answers (a cluster's "some master answers").
    fn health(&self) -> StoreFuture<'_, Result<(), StoreUnavailable>> {
        Box::pin(async move {
            let answers = futures::future::join_all(self.masters.iter().map(|m| m.health())).await;
            if !self.per_master_outcomes() {
                return answers.into_iter().collect();
            }
            let mut first_error = None;
            for answer in answers {
                match answer {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            Err(first_error.unwrap_or_else(|| StoreUnavailable("no master".into())))
        })
    }
}
