//! The in-memory store: every [`StoreCommand`] as one atomic step over plain maps.
//!
//! This is the reference the Redis implementation must match command for command (one
//! conformance suite runs against both), the embedded default of `cim up`, and the store of
//! the multi-node test harness. Claims delegate to [`ClaimTable`], conversation logs to
//! [`ConversationLog`]; this module adds accounts, group membership, the per-user
//! conversation index and read cursors.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::canary::Canaries;
use crate::conv_log::ConversationLog;
use crate::ids::{ConvId, LogEpoch, UnixMillis, UserId};
use crate::route::claims::ClaimTable;
use crate::slots::Shards;
use crate::store::{
    Account, AccountSummary, AllFrom, AppendError, ConvHead, Deleted, LoginFailures, NameTaken,
    OnlineEntry, StoreCommand, StoreReply, position_in,
};

#[derive(Debug, Clone)]
pub struct MemoryStoreConfig {
    /// Messages kept per conversation; older ones are trimmed.
    pub max_log_len: usize,
    /// How long an append's idempotency record lives. Must be at least the client outbox's
    /// maximum age, or a late resend could be appended twice.
    pub idempotency_ttl: Duration,
    /// Seeds the log epochs.
    pub seed: u64,
    /// The simulation's canaries for the claim table and the logs (`crate::canary`).
    pub canaries: Canaries,
    /// Masters of the cluster this store models (1: a single node). Each holds the keys of
    /// its slots ([`Shards`]) and has an incarnation of its own, so one master can restart
    /// from older data alone ([`MemoryStore::restart_shard_from`]).
    pub shards: usize,
}

impl Default for MemoryStoreConfig {
    fn default() -> Self {
        Self {
            max_log_len: 10_000,
            idempotency_ttl: Duration::from_secs(600),
            seed: 0,
            canaries: Canaries::NONE,
            shards: 1,
        }
    }
}

#[derive(Debug, Clone)]
struct Group {
    /// Member -> the head seq when they joined (history is visible after it).
    members: BTreeMap<UserId, u64>,
    /// Membership changes so far ([`crate::store::MembersVersion::changes`]): raised by every
    /// join, leave and account deletion that changed `members`.
    changes: u64,
}

impl Group {
    /// Removes `user`, counting the change; true if it was a member.
    fn remove(&mut self, user: UserId) -> bool {
        let removed = self.members.remove(&user).is_some();
        self.changes += u64::from(removed);
        removed
    }
}

/// One log move of the lost-tail rule: `conv`'s log went from epoch `from` to `to`, carrying
/// seqs `1..=carried_up_to` over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogMove {
    pub conv: ConvId,
    pub from: LogEpoch,
    pub to: LogEpoch,
    pub carried_up_to: u64,
}

#[derive(Debug, Clone)]
pub struct MemoryStore {
    config: MemoryStoreConfig,
    rng: ChaCha8Rng,
    /// Which life of this store's data is serving, per master: 1 from `new`, another on
    /// every [`MemoryStore::restart_from`] (every master) or
    /// [`MemoryStore::restart_shard_from`] (one). Logs remember the incarnation that last
    /// touched them (the lost-tail rule, [`ConversationLog::settle`]).
    incarnation: Shards,
    /// Every log move so far ([`MemoryStore::moves`]); survives `restart_from`.
    moves: Vec<LogMove>,
    /// Every account ever registered, tombstones included (see `deleted`).
    accounts: BTreeMap<UserId, Account>,
    /// The last id issued: ids are never reused, not even a deleted account's.
    last_user: u64,
    /// Tombstoned accounts (`DeleteAccount`): they keep their id, name and record.
    deleted: BTreeSet<UserId>,
    /// Account names in ASCII lowercase: one account per name whatever its case. A
    /// tombstone keeps its name.
    names: BTreeMap<String, UserId>,
    claims: ClaimTable,
    logs: BTreeMap<ConvId, ConversationLog>,
    groups: BTreeMap<String, Group>,
    /// Private conversations each user takes part in (groups come from membership).
    private_convs: BTreeMap<UserId, BTreeSet<ConvId>>,
    /// (user, conversation) -> (log epoch, last seq read).
    cursors: BTreeMap<(UserId, ConvId), (LogEpoch, u64)>,
    /// The login throttle's failure records.
    login_failures: BTreeMap<UserId, LoginFailures>,
}

impl MemoryStore {
    pub fn new(config: MemoryStoreConfig) -> Self {
        let mut claims = ClaimTable::with_canaries(config.canaries);
        claims.set_shards(Shards::new(config.shards, 0));
        Self {
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            incarnation: Shards::new(config.shards, 1),
            moves: Vec::new(),
            claims,
            config,
            accounts: BTreeMap::new(),
            last_user: 0,
            deleted: BTreeSet::new(),
            names: BTreeMap::new(),
            logs: BTreeMap::new(),
            groups: BTreeMap::new(),
            private_convs: BTreeMap::new(),
            cursors: BTreeMap::new(),
            login_failures: BTreeMap::new(),
        }
    }

    /// This store's state as it is now: what a restart from older data (a copy of Redis's
    /// data dir, an AOF that lost its last second, a replica that lagged) comes back with.
    pub fn snapshot(&self) -> Self {
        self.clone()
    }

    /// The store restarting from `older` (a [`MemoryStore::snapshot`] taken earlier): every
    /// write since is lost, and a new incarnation serves. New log epochs come from `seed`
    /// from now on (the snapshot's generator would draw the lost logs' epochs again).
    pub fn restart_from(&mut self, older: &MemoryStore, seed: u64) {
        let previous = self.incarnation.clone();
        // Not data: the record of what this store did, kept across its lives.
        let moves = std::mem::take(&mut self.moves);
        *self = older.clone();
        self.moves = moves;
        self.rng = ChaCha8Rng::seed_from_u64(seed);
        for shard in 0..self.incarnation.count() {
            let fresh = self.fresh_incarnation(
                previous.incarnation(shard),
                older.incarnation.incarnation(shard),
            );
            self.incarnation.set_incarnation(shard, fresh);
        }
        self.claims.set_shards(self.incarnation.clone());
    }

    /// A new incarnation, unlike `previous` and `older`. Random, so it differs from every
    /// incarnation the lost writes may have recorded.
    fn fresh_incarnation(&mut self, previous: u64, older: u64) -> u64 {
        loop {
            let candidate = self.rng.random_range(2..=u64::MAX);
            if candidate != previous && candidate != older {
                break candidate;
            }
        }
    }

    /// One master of a cluster restarting from `older` (a [`MemoryStore::snapshot`] taken
    /// earlier) in a new incarnation, the others going on: every write since to the keys of
    /// `shard`'s slots is lost (accounts, claims, cursors, indexes of its users; logs and
    /// memberships of its conversations; the names table if it holds `{names}`), the rest
    /// stays. Redis Cluster's failover of one master to a replica that lagged (or a master
    /// restarted from an AOF that lost its last second). New log epochs come from `seed`.
    pub fn restart_shard_from(&mut self, older: &MemoryStore, shard: usize, seed: u64) {
        let shards = self.incarnation.clone();
        let of_user = |u: UserId| shards.of_user(u) == shard;
        let of_conv = |c: &ConvId| shards.of_conv(c) == shard;
        fn restore<K: Ord + Clone, V: Clone>(
            now: &mut BTreeMap<K, V>,
            older: &BTreeMap<K, V>,
            held: impl Fn(&K) -> bool,
        ) {
            now.retain(|k, _| !held(k));
            now.extend(
                older
                    .iter()
                    .filter(|(k, _)| held(k))
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        restore(&mut self.accounts, &older.accounts, |u| of_user(*u));
        self.deleted.retain(|u| !of_user(*u));
        self.deleted
            .extend(older.deleted.iter().copied().filter(|u| of_user(*u)));
        restore(&mut self.private_convs, &older.private_convs, |u| {
            of_user(*u)
        });
        restore(&mut self.cursors, &older.cursors, |(u, _)| of_user(*u));
        restore(&mut self.login_failures, &older.login_failures, |u| {
            of_user(*u)
        });
        if shards.of_names() == shard {
            self.names = older.names.clone();
            self.last_user = older.last_user;
        }
        restore(&mut self.logs, &older.logs, of_conv);
        restore(&mut self.groups, &older.groups, |g| {
            of_conv(&ConvId::Group(g.clone()))
        });
        self.claims.restore_users(&older.claims, of_user);
        self.rng = ChaCha8Rng::seed_from_u64(seed);
        let fresh = self.fresh_incarnation(
            shards.incarnation(shard),
            older.incarnation.incarnation(shard),
        );
        self.incarnation.set_incarnation(shard, fresh);
        self.claims.set_shards(self.incarnation.clone());
    }

    /// The incarnation serving now (the first master's, on a cluster).
    pub fn incarnation(&self) -> u64 {
        self.incarnation.incarnation(0)
    }

    /// The masters this store models, with their incarnations.
    pub fn shards(&self) -> &Shards {
        &self.incarnation
    }

    /// Every log move this store made, in order, across all its restarts (what the
    /// simulation's checker judges clients' `LogMoved` and `LogReset` events against).
    pub fn moves(&self) -> &[LogMove] {
        &self.moves
    }

    /// Applies one command atomically. `now` is the store's wall clock (lease expiry).
    pub fn apply(&mut self, now: UnixMillis, command: &StoreCommand) -> StoreReply {
        // A tombstoned account resumes nothing, even in the moment between its tombstone
        // and its claim's release: answered as a claim that holds no secret, which the route
        // refuses.
        if let StoreCommand::ResumeClaim { user, .. } = command
            && self.deleted.contains(user)
        {
            let mut state = self.claims.load(*user);
            if let Some(claim) = state.claim.as_mut() {
                claim.resume_secret = None;
            }
            return StoreReply::ClaimReplaced(Err(state));
        }
        self.settle_logs(command);
        if let Some(reply) = self.claims.apply(now, command) {
            return reply;
        }
        match command {
            StoreCommand::RegisterAccount {
                name,
                password_hash,
            } => {
                // Names are unique regardless of case (`Bob` is `bob`), shown as typed.
                let key = name.to_ascii_lowercase();
                if self.names.contains_key(&key) {
                    return StoreReply::AccountRegistered(Err(NameTaken));
                }
                self.last_user += 1;
                let user = UserId(self.last_user);
                self.names.insert(key, user);
                // A new account starts reading `all` here, like a group member at its join.
                let all_from = self
                    .logs
                    .get(&ConvId::All)
                    .map_or(AllFrom::default(), |log| AllFrom {
                        log_epoch: log.log_epoch(),
                        seq: log.head_seq(),
                    });
                let account = Account {
                    user,
                    name: name.clone(),
                    password_hash: password_hash.clone(),
                    all_from,
                };
                self.accounts.insert(user, account);
                self.claims.account_created(user);
                StoreReply::AccountRegistered(Ok(user))
            }
            StoreCommand::LoadAccount { user } => {
                StoreReply::Account(self.live_account(*user).cloned())
            }
            StoreCommand::LoadAccountByName { name } => StoreReply::Account(
                self.names
                    .get(&name.to_ascii_lowercase())
                    .and_then(|user| self.live_account(*user))
                    .cloned(),
            ),
            StoreCommand::ListAccounts { after, limit } => StoreReply::Accounts(
                self.accounts
                    .range(UserId(after.0.saturating_add(1))..)
                    .take(*limit as usize)
                    .map(|(user, account)| AccountSummary {
                        user: *user,
                        name: account.name.clone(),
                        deleted: self.deleted.contains(user),
                    })
                    .collect(),
            ),
            StoreCommand::SetPassword {
                user,
                password_hash,
            } => {
                let found = !self.deleted.contains(user);
                match self.accounts.get_mut(user) {
                    Some(account) if found => {
                        account.password_hash = password_hash.clone();
                        self.claims.revoke_resumption(*user);
                        StoreReply::PasswordSet { found: true }
                    }
                    _ => StoreReply::PasswordSet { found: false },
                }
            }
            StoreCommand::DeleteAccount { user } => {
                StoreReply::AccountDeleted(self.delete_account(*user))
            }
            StoreCommand::LoadNames { users } => StoreReply::Names(
                users
                    .iter()
                    .map(|user| (*user, self.accounts.get(user).map(|a| a.name.clone())))
                    .collect(),
            ),
            StoreCommand::LoadMembers { conv } => StoreReply::Members(self.members(conv)),
            StoreCommand::Append {
                conv,
                sender,
                msg_id,
                body,
                now: at,
                order,
                members_known,
            } => StoreReply::Appended(
                self.append(conv, *sender, *msg_id, body.clone(), *at, *order)
                    .map(|appended| self.with_recipients(now, appended, *members_known)),
            ),
            StoreCommand::LoadHeads { user } => StoreReply::Heads(self.heads(*user)),
            StoreCommand::Fetch {
                user,
                conv,
                log_epoch,
                after_seq,
                limit,
            } => {
                if !self.may_read(*user, conv) {
                    return StoreReply::NotMember;
                }
                let head = self.head(*user, conv);
                let visible_from = head.first_available_seq;
                let messages = match self.logs.get(conv) {
                    Some(log) if log.log_epoch() == *log_epoch => log.fetch(
                        (*after_seq).max(visible_from.saturating_sub(1)),
                        *limit as usize,
                    ),
                    _ => Vec::new(),
                };
                StoreReply::Fetched { head, messages }
            }
            StoreCommand::AdvanceCursors { user, cursors } => {
                for (conv, log_epoch, seq) in cursors {
                    let current = self.logs.get(conv).map(ConversationLog::log_epoch);
                    if current != Some(*log_epoch) {
                        continue; // a cursor of a replaced log means nothing now
                    }
                    let entry = self
                        .cursors
                        .entry((*user, conv.clone()))
                        .or_insert((*log_epoch, 0));
                    if entry.0 != *log_epoch {
                        *entry = (*log_epoch, 0);
                    }
                    entry.1 = entry.1.max(*seq);
                }
                StoreReply::CursorsAdvanced
            }
            StoreCommand::CreateGroup { conv, owner } => {
                let ConvId::Group(name) = conv else {
                    return StoreReply::GroupCreated { created: false };
                };
                if self.groups.contains_key(name) {
                    return StoreReply::GroupCreated { created: false };
                }
                self.ensure_log(conv);
                self.groups.insert(
                    name.clone(),
                    Group {
                        members: BTreeMap::from([(*owner, 0)]),
                        changes: 0,
                    },
                );
                StoreReply::GroupCreated { created: true }
            }
            StoreCommand::JoinGroup { conv, user } => {
                let head = self.logs.get(conv).map_or(0, ConversationLog::head_seq);
                match conv {
                    ConvId::Group(name) => match self.groups.get_mut(name) {
                        Some(group) => {
                            let seq = *group.members.entry(*user).or_insert_with(|| {
                                group.changes += 1;
                                head
                            });
                            StoreReply::GroupJoined(Some(seq))
                        }
                        None => StoreReply::GroupJoined(None),
                    },
                    _ => StoreReply::GroupJoined(None),
                }
            }
            StoreCommand::LeaveGroup { conv, user } => {
                let was_member = match conv {
                    ConvId::Group(name) => {
                        self.groups.get_mut(name).is_some_and(|g| g.remove(*user))
                    }
                    _ => false,
                };
                StoreReply::GroupLeft { was_member }
            }
            StoreCommand::ListOnline { limit } => StoreReply::Online(
                self.accounts
                    .values()
                    .filter(|account| !self.deleted.contains(&account.user))
                    .filter_map(|account| {
                        let (_, route) = self.claims.routes(&[account.user], now).pop()?;
                        Some(OnlineEntry {
                            user: account.user,
                            name: account.name.clone(),
                            server: route?.server,
                        })
                    })
                    .take(*limit as usize)
                    .collect(),
            ),
            StoreCommand::CountLoginFailure {
                user,
                expected,
                forget_after,
            } => {
                let current = self.login_failures(*user, now, *forget_after);
                if current.count != *expected {
                    return StoreReply::LoginFailureCounted(Err(current));
                }
                let counted = LoginFailures {
                    count: current.count.saturating_add(1),
                    last_at: now,
                };
                self.login_failures.insert(*user, counted);
                StoreReply::LoginFailureCounted(Ok(counted))
            }
            StoreCommand::ClearLoginFailures { user } => {
                self.login_failures.remove(user);
                StoreReply::LoginFailuresCleared
            }
            // Claim commands were answered by the claim table above.
            StoreCommand::LoadClaim { .. }
            | StoreCommand::ReplaceClaim { .. }
            | StoreCommand::ResumeClaim { .. }
            | StoreCommand::RevokeResumption { .. }
            | StoreCommand::ExpireClaim { .. }
            | StoreCommand::ReleaseClaim { .. }
            | StoreCommand::BindSession { .. }
            | StoreCommand::RefreshLeases { .. }
            | StoreCommand::LoadRoutes { .. } => {
                unreachable!("ClaimTable::apply answers every claim command")
            }
        }
    }

    /// `user`'s failure record as of `now`: empty once `forget_after` has passed since the
    /// last failure (and then dropped, so records of quiet accounts do not pile up).
    fn login_failures(
        &mut self,
        user: UserId,
        now: UnixMillis,
        forget_after: Duration,
    ) -> LoginFailures {
        match self.login_failures.get(&user) {
            Some(f) if f.last_at.plus(forget_after) > now => *f,
            Some(_) => {
                self.login_failures.remove(&user);
                LoginFailures::default()
            }
            None => LoginFailures::default(),
        }
    }

    /// The account if it exists and is not a tombstone.
    fn live_account(&self, user: UserId) -> Option<&Account> {
        self.accounts
            .get(&user)
            .filter(|_| !self.deleted.contains(&user))
    }

    fn delete_account(&mut self, user: UserId) -> Option<Deleted> {
        let name = self.accounts.get(&user)?.name.clone();
        if !self.deleted.insert(user) {
            return Some(Deleted {
                name,
                claim: None,
                already: true,
            });
        }
        let claim = self.claims.load(user).claim;
        if let Some(claim) = &claim {
            self.claims.release(user, claim.epoch);
        }
        for group in self.groups.values_mut() {
            group.remove(user);
        }
        self.login_failures.remove(&user);
        Some(Deleted {
            name,
            claim,
            already: false,
        })
    }

    /// An append's [`crate::store::Recipients`], read in its step like Redis's script reads
    /// them: a group's members (or that they are still those of `members_known`), a private
    /// conversation's route records (judged at the store's `now`, as `LoadRoutes` is); none
    /// for `all`.
    fn with_recipients(
        &self,
        now: UnixMillis,
        mut appended: crate::store::Appended,
        members_known: Option<crate::store::MembersVersion>,
    ) -> crate::store::Appended {
        use crate::store::{MembersVersion, Recipients};
        appended.recipients = match &appended.message.conv {
            ConvId::All => None,
            conv @ ConvId::Group(name) => {
                // The log was settled before the append (`settle_logs`): its epoch is this
                // incarnation's.
                let version = MembersVersion {
                    log_epoch: appended.message.log_epoch,
                    changes: self.groups.get(name).map_or(0, |g| g.changes),
                };
                Some(if members_known == Some(version) {
                    Recipients::MembersUnchanged(version)
                } else {
                    Recipients::Members {
                        version,
                        members: self.members(conv),
                    }
                })
            }
            ConvId::Private { low, high } => {
                Some(Recipients::Routes(self.claims.routes(&[*low, *high], now)))
            }
        };
        appended
    }

    fn members(&self, conv: &ConvId) -> Vec<UserId> {
        match conv {
            ConvId::All => Vec::new(),
            ConvId::Group(name) => self
                .groups
                .get(name)
                .map(|g| g.members.keys().copied().collect())
                .unwrap_or_default(),
            ConvId::Private { low, high } => vec![*low, *high],
        }
    }

    fn may_read(&self, user: UserId, conv: &ConvId) -> bool {
        match conv {
            ConvId::All => self.live_account(user).is_some(),
            ConvId::Group(name) => self
                .groups
                .get(name)
                .is_some_and(|g| g.members.contains_key(&user)),
            ConvId::Private { low, high } => user == *low || user == *high,
        }
    }

    /// Applies the lost-tail rule ([`ConversationLog::settle`]) to every log `command`
    /// serves or writes, before it does: the Redis scripts do the same check in the same
    /// atomic step.
    fn settle_logs(&mut self, command: &StoreCommand) {
        let convs: Vec<ConvId> = match command {
            StoreCommand::Append { conv, .. } | StoreCommand::Fetch { conv, .. } => {
                vec![conv.clone()]
            }
            StoreCommand::LoadHeads { user } => {
                let mut convs = vec![ConvId::All];
                convs.extend(
                    self.groups
                        .iter()
                        .filter(|(_, g)| g.members.contains_key(user))
                        .map(|(name, _)| ConvId::Group(name.clone())),
                );
                convs.extend(self.private_convs.get(user).into_iter().flatten().cloned());
                convs
            }
            _ => return,
        };
        for conv in convs {
            let Some(log) = self.logs.get_mut(&conv) else {
                continue;
            };
            // Only a log that needs it draws an epoch, so runs without a restart draw the
            // same epochs as before the rule existed.
            let incarnation = self.incarnation.incarnation_of_conv(&conv);
            if log.incarnation() != incarnation {
                let from = log.log_epoch();
                let fresh = LogEpoch(self.rng.random_range(1..=u64::MAX));
                if log.settle(incarnation, fresh) {
                    self.moves.push(LogMove {
                        conv: conv.clone(),
                        from,
                        to: fresh,
                        carried_up_to: log.carried().1,
                    });
                }
            }
        }
    }

    fn ensure_log(&mut self, conv: &ConvId) -> &mut ConversationLog {
        let incarnation = self.incarnation.incarnation_of_conv(conv);
        let (rng, config) = (&mut self.rng, &self.config);
        self.logs.entry(conv.clone()).or_insert_with(|| {
            // Never 0, so "no epoch known" can be told apart.
            let log_epoch = LogEpoch(rng.random_range(1..=u64::MAX));
            ConversationLog::new(
                conv.clone(),
                log_epoch,
                config.max_log_len,
                config.idempotency_ttl,
            )
            .with_canaries(config.canaries)
            .written_by(incarnation)
        })
    }

    fn append(
        &mut self,
        conv: &ConvId,
        sender: UserId,
        msg_id: crate::ids::ClientMsgId,
        body: bytes::Bytes,
        now: UnixMillis,
        order: Option<crate::store::SendOrder>,
    ) -> Result<crate::store::Appended, AppendError> {
        match conv {
            ConvId::Group(name) if !self.groups.contains_key(name) => {
                return Err(AppendError::UnknownConversation);
            }
            ConvId::Private { low, high }
                if self.live_account(*low).is_none() || self.live_account(*high).is_none() =>
            {
                return Err(AppendError::UnknownConversation);
            }
            _ => {}
        }
        if !self.may_read(sender, conv) {
            return Err(AppendError::NotMember);
        }
        let existed = self.logs.contains_key(conv);
        let appended = self
            .ensure_log(conv)
            .append(sender, msg_id, body, now, order);
        let appended = match appended {
            Ok(appended) => appended,
            Err(e) => {
                // A refused first append leaves no log behind (Redis creates the log's
                // metadata only once the checks passed).
                if !existed {
                    self.logs.remove(conv);
                }
                return Err(e);
            }
        };
        if let ConvId::Private { low, high } = conv {
            for user in [*low, *high] {
                self.private_convs
                    .entry(user)
                    .or_default()
                    .insert(conv.clone());
            }
        }
        Ok(appended)
    }

    /// The user's conversations that have a log, with heads and cursors.
    fn heads(&self, user: UserId) -> Vec<ConvHead> {
        if self.live_account(user).is_none() {
            return Vec::new();
        }
        let mut convs: BTreeSet<ConvId> = BTreeSet::from([ConvId::All]);
        for (name, group) in &self.groups {
            if group.members.contains_key(&user) {
                convs.insert(ConvId::Group(name.clone()));
            }
        }
        convs.extend(self.private_convs.get(&user).into_iter().flatten().cloned());
        convs
            .into_iter()
            .filter(|conv| self.logs.contains_key(conv))
            .map(|conv| self.head(user, &conv))
            .collect()
    }

    /// One conversation's head as `user` sees it: history starts after their join seq.
    fn head(&self, user: UserId, conv: &ConvId) -> ConvHead {
        let Some(log) = self.logs.get(conv) else {
            return ConvHead {
                conv: conv.clone(),
                log_epoch: LogEpoch(0),
                head_seq: 0,
                first_available_seq: 1,
                cursor_seq: 0,
                carried_from: LogEpoch(0),
                carried_up_to: 0,
            };
        };
        let joined_at = match conv {
            ConvId::Group(name) => self
                .groups
                .get(name)
                .and_then(|g| g.members.get(&user).copied())
                .unwrap_or(0),
            _ => 0,
        };
        let carried = log.carried();
        let cursor = self
            .cursors
            .get(&(user, conv.clone()))
            .map_or(0, |&at| position_in(at, log.log_epoch(), carried));
        // `all` before the account's start stays fetchable history; only the cursor (what
        // the account is owed) starts there.
        let all_floor = match conv {
            ConvId::All => self.accounts.get(&user).map_or(0, |a| {
                let from = a.all_from;
                if from.log_epoch == LogEpoch(0) {
                    0
                } else {
                    position_in((from.log_epoch, from.seq), log.log_epoch(), carried)
                }
            }),
            _ => 0,
        };
        ConvHead {
            conv: conv.clone(),
            log_epoch: log.log_epoch(),
            head_seq: log.head_seq(),
            first_available_seq: log.first_available_seq().max(joined_at + 1),
            cursor_seq: cursor.max(joined_at).max(all_floor),
            carried_from: carried.0,
            carried_up_to: carried.1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ClientMsgId;
    use bytes::Bytes;

    const NOW: UnixMillis = UnixMillis(1_000);

    fn store_with_users(names: &[&str]) -> (MemoryStore, Vec<UserId>) {
        let mut store = MemoryStore::new(MemoryStoreConfig::default());
        let users = names
            .iter()
            .map(|name| {
                let command = StoreCommand::RegisterAccount {
                    name: (*name).into(),
                    password_hash: "phc".into(),
                };
                match store.apply(NOW, &command) {
                    StoreReply::AccountRegistered(Ok(user)) => user,
                    other => panic!("register {name}: {other:?}"),
                }
            })
            .collect();
        (store, users)
    }

    fn append(store: &mut MemoryStore, conv: &ConvId, sender: UserId, id: u128) -> StoreReply {
        store.apply(
            NOW,
            &StoreCommand::Append {
                conv: conv.clone(),
                sender,
                msg_id: ClientMsgId(id),
                body: Bytes::from_static(b"x"),
                now: NOW,
                order: None,
                members_known: None,
            },
        )
    }

    fn seq_of(reply: StoreReply) -> u64 {
        match reply {
            StoreReply::Appended(Ok(appended)) => appended.message.seq,
            other => panic!("not appended: {other:?}"),
        }
    }

    fn heads(store: &mut MemoryStore, user: UserId) -> Vec<ConvHead> {
        match store.apply(NOW, &StoreCommand::LoadHeads { user }) {
            StoreReply::Heads(heads) => heads,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_are_unique_and_ids_fresh() {
        let (mut store, users) = store_with_users(&["alice", "bob"]);
        assert_eq!(users, vec![UserId(1), UserId(2)]);
        let again = StoreCommand::RegisterAccount {
            name: "alice".into(),
            password_hash: "x".into(),
        };
        assert_eq!(
            store.apply(NOW, &again),
            StoreReply::AccountRegistered(Err(NameTaken))
        );
        match store.apply(NOW, &StoreCommand::LoadAccount { user: UserId(2) }) {
            StoreReply::Account(Some(account)) => assert_eq!(account.name, "bob"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn append_checks_membership_and_conversation() {
        let (mut store, u) = store_with_users(&["a", "b", "c"]);
        let private = ConvId::private(u[0], u[1]).unwrap();
        assert_eq!(seq_of(append(&mut store, &private, u[0], 1)), 1);
        assert_eq!(
            append(&mut store, &private, u[2], 2),
            StoreReply::Appended(Err(AppendError::NotMember))
        );
        let stranger = ConvId::private(u[0], UserId(99)).unwrap();
        assert_eq!(
            append(&mut store, &stranger, u[0], 3),
            StoreReply::Appended(Err(AppendError::UnknownConversation))
        );
        let group = ConvId::group("rust").unwrap();
        assert_eq!(
            append(&mut store, &group, u[0], 4),
            StoreReply::Appended(Err(AppendError::UnknownConversation))
        );
        store.apply(
            NOW,
            &StoreCommand::CreateGroup {
                conv: group.clone(),
                owner: u[0],
            },
        );
        assert_eq!(
            append(&mut store, &group, u[1], 5),
            StoreReply::Appended(Err(AppendError::NotMember))
        );
        assert_eq!(seq_of(append(&mut store, &group, u[0], 6)), 1);
        // Everyone may post to `all`; the private conversation shows up for both users only.
        assert_eq!(seq_of(append(&mut store, &ConvId::All, u[2], 7)), 1);
        let convs = |store: &mut MemoryStore, user| -> Vec<ConvId> {
            heads(store, user).into_iter().map(|h| h.conv).collect()
        };
        assert_eq!(convs(&mut store, u[1]), vec![ConvId::All, private.clone()]);
        assert_eq!(convs(&mut store, u[2]), vec![ConvId::All]);
        assert_eq!(convs(&mut store, u[0]), vec![ConvId::All, group, private]);
    }

    /// An append reads its push's recipients in the same step, as Redis's script does: a
    /// group's members (sorted), a private conversation's route records as `LoadRoutes`
    /// judges them at the store's `now` (a record past its claim's lease reads as offline);
    /// nothing for `all`. A duplicate carries them too (its push is sent again).
    #[test]
    fn an_append_carries_its_recipients() {
        use crate::ids::Epoch;
        use crate::store::{Claim, MembersVersion, Recipients, RouteRecord};
        let (mut store, u) = store_with_users(&["a", "b", "c"]);
        let private = ConvId::private(u[0], u[1]).unwrap();
        let group = ConvId::group("rust").unwrap();
        store.apply(
            NOW,
            &StoreCommand::CreateGroup {
                conv: group.clone(),
                owner: u[2],
            },
        );
        store.apply(
            NOW,
            &StoreCommand::JoinGroup {
                conv: group.clone(),
                user: u[0],
            },
        );
        let server = crate::ids::ServerId::new("s1");
        let claim = Claim {
            epoch: Epoch(1),
            server: server.clone(),
            lease_until: UnixMillis(2_000),
            resume_token_hash: [0; 32],
            resume_secret: None,
        };
        store.apply(
            NOW,
            &StoreCommand::ReplaceClaim {
                user: u[1],
                expected: Epoch(0),
                claim,
            },
        );
        store.apply(
            NOW,
            &StoreCommand::BindSession {
                user: u[1],
                epoch: Epoch(1),
                server: server.clone(),
                lease_until: UnixMillis(2_000),
            },
        );
        let bound = Some(RouteRecord {
            server,
            epoch: Epoch(1),
        });
        // A group's version names the log epoch the append was served under (drawn at
        // random): checked here, then left out of the comparison.
        let recipients_of = |reply: StoreReply| match reply {
            StoreReply::Appended(Ok(appended)) => match appended.recipients {
                Some(Recipients::Members { version, members }) => {
                    assert_eq!(version.log_epoch, appended.message.log_epoch);
                    let version = MembersVersion {
                        log_epoch: LogEpoch(0),
                        ..version
                    };
                    Some(Recipients::Members { version, members })
                }
                other => other,
            },
            other => panic!("not appended: {other:?}"),
        };
        let at = |store: &mut MemoryStore, now: UnixMillis, conv: &ConvId, id: u128| {
            let command = StoreCommand::Append {
                conv: conv.clone(),
                sender: u[0],
                msg_id: ClientMsgId(id),
                body: Bytes::from_static(b"x"),
                now: NOW,
                order: None,
                members_known: None,
            };
            recipients_of(store.apply(now, &command))
        };
        // (name, store's now, conversation, msg id, recipients)
        let cases: Vec<(&str, UnixMillis, &ConvId, u128, Option<Recipients>)> = vec![
            (
                "private: both records, one online",
                NOW,
                &private,
                1,
                Some(Recipients::Routes(vec![
                    (u[0], None),
                    (u[1], bound.clone()),
                ])),
            ),
            (
                "private duplicate",
                NOW,
                &private,
                1,
                Some(Recipients::Routes(vec![(u[0], None), (u[1], bound)])),
            ),
            (
                "private past the lease",
                UnixMillis(2_000),
                &private,
                2,
                Some(Recipients::Routes(vec![(u[0], None), (u[1], None)])),
            ),
            (
                "group: members sorted",
                NOW,
                &group,
                3,
                Some(Recipients::Members {
                    version: MembersVersion {
                        log_epoch: LogEpoch(0),
                        changes: 1,
                    },
                    members: vec![u[0], u[2]],
                }),
            ),
            ("all: none", NOW, &ConvId::All, 4, None),
        ];
        for (name, now, conv, id, want) in cases {
            assert_eq!(at(&mut store, now, conv, id), want, "{name}");
        }
    }

    #[test]
    fn a_joiner_sees_history_from_its_join_seq() {
        let (mut store, u) = store_with_users(&["a", "b"]);
        let group = ConvId::group("g").unwrap();
        store.apply(
            NOW,
            &StoreCommand::CreateGroup {
                conv: group.clone(),
                owner: u[0],
            },
        );
        for id in 1..=3 {
            append(&mut store, &group, u[0], id);
        }
        assert_eq!(
            store.apply(
                NOW,
                &StoreCommand::JoinGroup {
                    conv: group.clone(),
                    user: u[1]
                }
            ),
            StoreReply::GroupJoined(Some(3))
        );
        assert_eq!(
            store.apply(
                NOW,
                &StoreCommand::LoadMembers {
                    conv: group.clone()
                }
            ),
            StoreReply::Members(vec![u[0], u[1]])
        );
        append(&mut store, &group, u[0], 4);
        let head = heads(&mut store, u[1])
            .into_iter()
            .find(|h| h.conv == group)
            .unwrap();
        assert_eq!(
            (head.head_seq, head.first_available_seq, head.cursor_seq),
            (4, 4, 3)
        );
        let fetch = StoreCommand::Fetch {
            user: u[1],
            conv: group.clone(),
            log_epoch: head.log_epoch,
            after_seq: 0,
            limit: 100,
        };
        match store.apply(NOW, &fetch) {
            StoreReply::Fetched { messages, .. } => {
                assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![4]);
            }
            other => panic!("{other:?}"),
        }
        // Leaving ends posting rights.
        assert_eq!(
            store.apply(
                NOW,
                &StoreCommand::LeaveGroup {
                    conv: group.clone(),
                    user: u[1]
                }
            ),
            StoreReply::GroupLeft { was_member: true }
        );
        assert_eq!(
            store.apply(
                NOW,
                &StoreCommand::LoadMembers {
                    conv: group.clone()
                }
            ),
            StoreReply::Members(vec![u[0]])
        );
        assert_eq!(
            append(&mut store, &group, u[1], 9),
            StoreReply::Appended(Err(AppendError::NotMember))
        );
    }

    #[test]
    fn a_new_account_starts_reading_all_at_its_registration() {
        let (mut store, u) = store_with_users(&["a"]);
        for id in 1..=3 {
            append(&mut store, &ConvId::All, u[0], id);
        }
        let (_, late) = {
            let command = StoreCommand::RegisterAccount {
                name: "late".into(),
                password_hash: "phc".into(),
            };
            match store.apply(NOW, &command) {
                StoreReply::AccountRegistered(Ok(user)) => ((), user),
                other => panic!("{other:?}"),
            }
        };
        append(&mut store, &ConvId::All, u[0], 4);
        let head = heads(&mut store, late)[0].clone();
        // Owed from seq 4 on; 1..=3 are history it may still fetch.
        assert_eq!(
            (head.head_seq, head.first_available_seq, head.cursor_seq),
            (4, 1, 3)
        );
        let fetch = StoreCommand::Fetch {
            user: late,
            conv: ConvId::All,
            log_epoch: head.log_epoch,
            after_seq: 0,
            limit: 100,
        };
        match store.apply(NOW, &fetch) {
            StoreReply::Fetched { messages, .. } => assert_eq!(messages.len(), 4),
            other => panic!("{other:?}"),
        }
        // The first account, registered before any message, owes everything.
        assert_eq!(heads(&mut store, u[0])[0].cursor_seq, 0);
        match store.apply(NOW, &StoreCommand::LoadAccount { user: late }) {
            StoreReply::Account(Some(account)) => {
                assert_eq!(account.all_from.seq, 3);
                assert_eq!(account.all_from.floor(head.log_epoch), 3);
                assert_eq!(account.all_from.floor(LogEpoch(head.log_epoch.0 ^ 1)), 0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn names_ignore_case_and_a_tombstone_keeps_its_id_and_name() {
        let (mut store, u) = store_with_users(&["Bob", "carol"]);
        let register = |name: &str| StoreCommand::RegisterAccount {
            name: name.into(),
            password_hash: "x".into(),
        };
        assert_eq!(
            store.apply(NOW, &register("bob")),
            StoreReply::AccountRegistered(Err(NameTaken))
        );
        match store.apply(NOW, &StoreCommand::LoadAccountByName { name: "BOB".into() }) {
            StoreReply::Account(Some(a)) => assert_eq!((a.user, a.name.as_str()), (u[0], "Bob")),
            other => panic!("{other:?}"),
        }
        let private = ConvId::private(u[0], u[1]).unwrap();
        assert_eq!(seq_of(append(&mut store, &private, u[1], 1)), 1);
        let group = ConvId::group("g").unwrap();
        store.apply(
            NOW,
            &StoreCommand::CreateGroup {
                conv: group.clone(),
                owner: u[0],
            },
        );
        match store.apply(NOW, &StoreCommand::DeleteAccount { user: u[0] }) {
            StoreReply::AccountDeleted(Some(d)) => {
                assert_eq!((d.name.as_str(), d.already), ("Bob", false));
            }
            other => panic!("{other:?}"),
        }
        // Gone for login, messages and membership; named still for old messages.
        assert_eq!(
            store.apply(NOW, &StoreCommand::LoadAccount { user: u[0] }),
            StoreReply::Account(None)
        );
        assert_eq!(
            store.apply(NOW, &StoreCommand::LoadAccountByName { name: "bob".into() }),
            StoreReply::Account(None)
        );
        assert_eq!(
            append(&mut store, &private, u[1], 2),
            StoreReply::Appended(Err(AppendError::UnknownConversation))
        );
        assert_eq!(
            append(&mut store, &ConvId::All, u[0], 3),
            StoreReply::Appended(Err(AppendError::NotMember))
        );
        assert_eq!(
            store.apply(NOW, &StoreCommand::LoadMembers { conv: group }),
            StoreReply::Members(vec![])
        );
        assert_eq!(
            store.apply(NOW, &StoreCommand::LoadNames { users: vec![u[0]] }),
            StoreReply::Names(vec![(u[0], Some("Bob".into()))])
        );
        // The name stays taken, in any case; the next id is new.
        assert_eq!(
            store.apply(NOW, &register("BOB")),
            StoreReply::AccountRegistered(Err(NameTaken))
        );
        assert_eq!(
            store.apply(NOW, &register("dave")),
            StoreReply::AccountRegistered(Ok(UserId(3)))
        );
        match store.apply(NOW, &StoreCommand::DeleteAccount { user: u[0] }) {
            StoreReply::AccountDeleted(Some(d)) => assert!(d.already),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            store.apply(NOW, &StoreCommand::DeleteAccount { user: UserId(99) }),
            StoreReply::AccountDeleted(None)
        );
        match store.apply(
            NOW,
            &StoreCommand::ListAccounts {
                after: UserId(0),
                limit: 2,
            },
        ) {
            StoreReply::Accounts(list) => {
                let rows: Vec<_> = list.iter().map(|a| (a.user.0, a.deleted)).collect();
                assert_eq!(rows, vec![(1, true), (2, false)]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cursors_only_move_forward_and_only_in_the_current_log_epoch() {
        let (mut store, u) = store_with_users(&["a"]);
        for id in 1..=5 {
            append(&mut store, &ConvId::All, u[0], id);
        }
        let epoch = heads(&mut store, u[0])[0].log_epoch;
        let advance = |store: &mut MemoryStore, log_epoch, seq| {
            store.apply(
                NOW,
                &StoreCommand::AdvanceCursors {
                    user: u[0],
                    cursors: vec![(ConvId::All, log_epoch, seq)],
                },
            );
        };
        advance(&mut store, epoch, 4);
        advance(&mut store, epoch, 2);
        advance(&mut store, LogEpoch(epoch.0.wrapping_add(1)), 5);
        assert_eq!(heads(&mut store, u[0])[0].cursor_seq, 4);
        // A fetch naming another log epoch returns no messages, only the current head.
        let stale = StoreCommand::Fetch {
            user: u[0],
            conv: ConvId::All,
            log_epoch: LogEpoch(epoch.0.wrapping_add(1)),
            after_seq: 0,
            limit: 10,
        };
        match store.apply(NOW, &stale) {
            StoreReply::Fetched { head, messages } => {
                assert!(messages.is_empty());
                assert_eq!((head.log_epoch, head.head_seq), (epoch, 5));
            }
            other => panic!("{other:?}"),
        }
    }

    /// The lost-tail rule: a store restarted from older data moves the logs that lost writes
    /// to new epochs before serving them, keeps the survivors' seqs, and never numbers a new
    /// message with a (log epoch, seq) it served before.
    #[test]
    fn a_restart_from_older_data_moves_logs_to_new_epochs() {
        let (mut store, u) = store_with_users(&["a", "b"]);
        let conv = ConvId::private(u[0], u[1]).expect("two users");
        for id in 1..=5 {
            append(&mut store, &conv, u[0], id);
        }
        let copy = store.snapshot();
        let served: Vec<(LogEpoch, u64)> = (6..=8)
            .map(|id| match append(&mut store, &conv, u[0], id) {
                StoreReply::Appended(Ok(a)) => (a.message.log_epoch, a.message.seq),
                other => panic!("{other:?}"),
            })
            .collect();
        let old = served[0].0;
        store.restart_from(&copy, 42);
        assert_ne!(store.incarnation(), copy.incarnation());
        let head = heads(&mut store, u[1])
            .into_iter()
            .find(|h| h.conv == conv)
            .expect("head");
        assert_ne!(head.log_epoch, old);
        assert_eq!((head.head_seq, head.first_available_seq), (5, 1));
        // The move says what it carried over: 1..=5 of the old epoch.
        assert_eq!((head.carried_from, head.carried_up_to), (old, 5));
        assert_eq!(
            store.moves(),
            [LogMove {
                conv: conv.clone(),
                from: old,
                to: head.log_epoch,
                carried_up_to: 5
            }]
        );
        for id in 106..=108 {
            match append(&mut store, &conv, u[0], id) {
                StoreReply::Appended(Ok(a)) => {
                    assert_eq!(a.message.log_epoch, head.log_epoch);
                    assert!(!served.contains(&(a.message.log_epoch, a.message.seq)));
                }
                other => panic!("{other:?}"),
            }
        }
        // Once moved, the log stays in its new epoch.
        let again = heads(&mut store, u[1]);
        assert_eq!(again[again.len() - 1].log_epoch, head.log_epoch);
    }

    /// An append that names the membership version it holds is answered "unchanged" until a
    /// join, leave or account deletion changes the members; and a restart that lost the
    /// change (the count repeats with other members) does not confirm the old version either:
    /// the log moved to a new epoch, and the version holds it.
    #[test]
    fn a_member_list_is_confirmed_until_the_membership_changes() {
        use crate::store::{MembersVersion, Recipients};
        let (mut store, u) = store_with_users(&["a", "b", "c", "d"]);
        let group = ConvId::group("g").unwrap();
        let create = StoreCommand::CreateGroup {
            conv: group.clone(),
            owner: u[0],
        };
        store.apply(NOW, &create);
        let mut id = 0;
        let mut append_knowing = |store: &mut MemoryStore, known: Option<MembersVersion>| {
            id += 1;
            let command = StoreCommand::Append {
                conv: group.clone(),
                sender: u[0],
                msg_id: ClientMsgId(id),
                body: Bytes::from_static(b"x"),
                now: NOW,
                order: None,
                members_known: known,
            };
            match store.apply(NOW, &command) {
                StoreReply::Appended(Ok(a)) => a.recipients.expect("a group's recipients"),
                other => panic!("not appended: {other:?}"),
            }
        };
        let listed = |recipients: Recipients| match recipients {
            Recipients::Members { version, members } => (version, members),
            other => panic!("expected the members, got {other:?}"),
        };
        let join = |user| StoreCommand::JoinGroup {
            conv: group.clone(),
            user,
        };
        let leave = |user| StoreCommand::LeaveGroup {
            conv: group.clone(),
            user,
        };

        let (v0, members) = listed(append_knowing(&mut store, None));
        assert_eq!(members, [u[0]]);
        assert_eq!(
            append_knowing(&mut store, Some(v0)),
            Recipients::MembersUnchanged(v0)
        );
        // Each change gives a new version with the new members; a repeated join or a leave
        // of a non-member changes nothing.
        let changes: Vec<(&str, StoreCommand, Vec<UserId>)> = vec![
            ("join b", join(u[1]), vec![u[0], u[1]]),
            ("join c", join(u[2]), vec![u[0], u[1], u[2]]),
            ("leave b", leave(u[1]), vec![u[0], u[2]]),
            (
                "delete c",
                StoreCommand::DeleteAccount { user: u[2] },
                vec![u[0]],
            ),
        ];
        let mut known = v0;
        for (name, change, want) in changes {
            store.apply(NOW, &change);
            let (version, members) = listed(append_knowing(&mut store, Some(known)));
            assert_ne!(version, known, "{name}");
            assert_eq!(members, want, "{name}");
            store.apply(NOW, &change);
            store.apply(NOW, &leave(u[3]));
            assert_eq!(
                append_knowing(&mut store, Some(version)),
                Recipients::MembersUnchanged(version),
                "{name} again"
            );
            known = version;
        }

        // d joins, a route learns that version; the store restarts from before the join, and
        // b joins instead: the same number of changes, other members.
        let copy = store.snapshot();
        store.apply(NOW, &join(u[3]));
        let (with_d, _) = listed(append_knowing(&mut store, Some(known)));
        store.restart_from(&copy, 9);
        store.apply(NOW, &join(u[1]));
        let (after, members) = listed(append_knowing(&mut store, Some(with_d)));
        assert_eq!(after.changes, with_d.changes);
        assert_ne!(after, with_d);
        assert_eq!(members, [u[0], u[1]]);
    }

    /// A restart that lost nothing moves the log too, carrying everything over, and a read
    /// cursor of the old epoch counts in the new one (up to what was carried).
    #[test]
    fn a_restart_without_loss_carries_every_message_and_the_cursors_over() {
        let (mut store, u) = store_with_users(&["a", "b"]);
        let conv = ConvId::private(u[0], u[1]).expect("two users");
        let mut old = LogEpoch(0);
        for id in 1..=4 {
            if let StoreReply::Appended(Ok(a)) = append(&mut store, &conv, u[0], id) {
                old = a.message.log_epoch;
            }
        }
        store.apply(
            UnixMillis(0),
            &StoreCommand::AdvanceCursors {
                user: u[1],
                cursors: vec![(conv.clone(), old, 3)],
            },
        );
        let copy = store.snapshot();
        store.restart_from(&copy, 7);
        let head = heads(&mut store, u[1])
            .into_iter()
            .find(|h| h.conv == conv)
            .expect("head");
        assert_ne!(head.log_epoch, old);
        assert_eq!(
            (
                head.head_seq,
                head.carried_from,
                head.carried_up_to,
                head.cursor_seq
            ),
            (4, old, 4, 3)
        );
    }
}
