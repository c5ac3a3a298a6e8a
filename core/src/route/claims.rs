//! Login claims: the pure decision the route makes at login, and [`ClaimTable`], the
//! reference implementation of the store's claim commands.
//!
//! The fencing rule everything here keeps: a user's epoch counter only grows, and every
//! command that changes a claim or a route record names an epoch and does nothing unless it
//! is the current one. So a late refresh, an old server's cleanup or an old token can never
//! revive, extend or delete a newer session's claim.
//!
//! `ClaimTable` is what the Redis Lua scripts must match, command for command; it is kept
//! deliberately plain.

use std::collections::BTreeMap;

use subtle::ConstantTimeEq;

use crate::canary::{Canaries, Canary};
use crate::ids::{Epoch, ServerId, UnixMillis, UserId};
use crate::slots::Shards;
use crate::store::{Claim, ClaimState, LeaseRefresh, RouteRecord, StoreCommand, StoreReply};

/// What a login may do with the user's claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginDecision {
    /// No live claim: take `epoch`.
    Fresh { epoch: Epoch },
    /// A live claim exists but the request may take it over: take `epoch`, and the old
    /// claim's server must kick the session it holds under `old.epoch` (which may live
    /// until `old.lease_until`).
    Takeover { epoch: Epoch, old: Claim },
}

impl LoginDecision {
    /// The epoch the new claim gets.
    pub fn epoch(&self) -> Epoch {
        match self {
            Self::Fresh { epoch } | Self::Takeover { epoch, .. } => *epoch,
        }
    }
}

/// A live claim exists and the login proved no right to take it over (CIM code 5000).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("repeat login: the user is online elsewhere")]
pub struct RepeatLogin;

/// Whether a claim is live at `now`.
pub fn is_live(claim: &Claim, now: UnixMillis) -> bool {
    now < claim.lease_until
}

/// Decides a login against the user's claim state as last read from the store.
///
/// `presented_resume_hash` is the SHA-256 of the resume token the client sent, if any;
/// `claim_server_live` is whether the current claim's server is in the route's registry
/// view (ignored when there is no live claim).
///
/// A live claim that may predate a login the store lost — written by another store
/// incarnation (`ClaimState::foreign`), or below a counter the replace raised after such
/// a restart — proves nothing against the login: the client may hold the lost login's token,
/// which the restored claim cannot know. It is taken over like a claim on a dead server (the
/// old session is still kicked before the answer), rather than refusing the user with 5000
/// until the restored lease runs out.
pub fn decide_login(
    state: &ClaimState,
    now: UnixMillis,
    presented_resume_hash: Option<[u8; 32]>,
    claim_server_live: bool,
) -> Result<LoginDecision, RepeatLogin> {
    let epoch = state.epoch.next();
    let Some(claim) = state.claim.as_ref().filter(|c| is_live(c, now)) else {
        return Ok(LoginDecision::Fresh { epoch });
    };
    let proved_resume =
        presented_resume_hash.is_some_and(|hash| bool::from(hash.ct_eq(&claim.resume_token_hash)));
    let predates_a_lost_login = state.foreign || claim.epoch < state.epoch;
    if proved_resume || !claim_server_live || predates_a_lost_login {
        Ok(LoginDecision::Takeover {
            epoch,
            old: claim.clone(),
        })
    } else {
        Err(RepeatLogin)
    }
}

/// The claim part of the store, in memory: the reference semantics of `LoadClaim`,
/// `ReplaceClaim`, `ReleaseClaim`, `BindSession`, `RefreshLeases` and `LoadRoutes`.
///
/// Invariants (checked by the property test): a stored claim's epoch equals its user's
/// counter (until a restart raises the counter: [`ClaimTable::replace_at`]); a stored route
/// record's epoch is at most the counter; the counter never decreases.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimTable {
    claims: BTreeMap<UserId, ClaimState>,
    routes: BTreeMap<UserId, RouteRecord>,
    /// The store incarnation serving now, per master of a cluster (see
    /// [`ClaimTable::set_incarnation`], [`ClaimTable::set_shards`]).
    incarnation: Shards,
    /// The incarnation that last wrote each user's claim, or created the account before its
    /// first claim (none: neither, or written before the rule existed).
    written_by: BTreeMap<UserId, u64>,
    /// `EpochFencing` off: the simulation's canary (nothing outside canary builds).
    canaries: Canaries,
}

impl ClaimTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty table with the run's canaries (see `crate::canary`).
    pub fn with_canaries(canaries: Canaries) -> Self {
        Self {
            canaries,
            ..Self::default()
        }
    }

    /// `LoadClaim`: the user's counter and claim (possibly expired; the reader compares).
    pub fn load(&self, user: UserId) -> ClaimState {
        let mut state = self.claims.get(&user).cloned().unwrap_or_default();
        state.foreign = state.claim.is_some()
            && self
                .written_by
                .get(&user)
                .is_some_and(|&by| by != self.incarnation.incarnation_of_user(user));
        state
    }

    /// `ReplaceClaim`: only if the counter still equals `expected` and the new claim's epoch
    /// is above it, set the counter to the new epoch and store the claim. The route record
    /// is left alone: it names the old epoch, so [`Self::routes`] no longer reports it, and
    /// the new server's bind overwrites it. `Ok` carries the replaced claim as it stood
    /// (a refresh may have extended it since it was loaded); `Err` the state that won.
    // The `Err` is the store's reply (`ClaimReplaced(Err(state))`), returned as it is: one
    // per claim command, not worth a box.
    #[allow(clippy::result_large_err)]
    pub fn replace(
        &mut self,
        user: UserId,
        expected: Epoch,
        claim: Claim,
    ) -> Result<Option<Claim>, ClaimState> {
        self.replace_at(user, expected, claim, UnixMillis(0))
    }

    /// A restart of the store that lost its last writes: claims written before now count as
    /// another incarnation's ([`ClaimTable::replace_at`]).
    pub fn set_incarnation(&mut self, incarnation: u64) {
        self.incarnation.set_all(incarnation);
    }

    /// The masters of a sharded store and their incarnations: a user's claim is judged by
    /// the incarnation of the master holding the user's keys.
    pub fn set_shards(&mut self, shards: Shards) {
        self.incarnation = shards;
    }

    /// One master restarting from older data (`older`, a copy of this table): the claims
    /// and route records of the users it holds go back to `older`'s, the others stay.
    pub fn restore_users(&mut self, older: &ClaimTable, holds: impl Fn(UserId) -> bool) {
        self.claims.retain(|u, _| !holds(*u));
        self.routes.retain(|u, _| !holds(*u));
        self.written_by.retain(|u, _| !holds(*u));
        let pick = |u: &UserId| holds(*u);
        self.claims.extend(
            older
                .claims
                .iter()
                .filter(|(u, _)| pick(u))
                .map(|(u, c)| (*u, c.clone())),
        );
        self.routes.extend(
            older
                .routes
                .iter()
                .filter(|(u, _)| pick(u))
                .map(|(u, r)| (*u, r.clone())),
        );
        self.written_by.extend(
            older
                .written_by
                .iter()
                .filter(|(u, _)| pick(u))
                .map(|(u, i)| (*u, *i)),
        );
    }

    /// [`ClaimTable::replace`] at store time `now`, with the rule that no claim epoch is
    /// issued twice (docs/design.md, "Never the same name for two contents"): a claim
    /// another store incarnation wrote may have lost later logins, whose epochs its counter
    /// no longer shows, so the counter first rises to `max(counter + 1, now)` (in ms: one
    /// login a millisecond per user never gets there) and the answer is a lost race, which
    /// the route retries against the raised counter. `claim_replace.lua` does the same.
    // The `Err` is the store's reply, as for `replace`.
    #[allow(clippy::result_large_err)]
    pub fn replace_at(
        &mut self,
        user: UserId,
        expected: Epoch,
        claim: Claim,
        now: UnixMillis,
    ) -> Result<Option<Claim>, ClaimState> {
        let incarnation = self.incarnation.incarnation_of_user(user);
        let state = self.claims.entry(user).or_default();
        if self
            .written_by
            .get(&user)
            .is_some_and(|&by| by != incarnation)
        {
            state.epoch = Epoch(state.epoch.0.saturating_add(1).max(now.0));
            self.written_by.insert(user, incarnation);
            return Err(state.clone());
        }
        let fencing = !self.canaries.disabled(Canary::EpochFencing);
        if fencing && (state.epoch != expected || claim.epoch <= expected) {
            return Err(state.clone());
        }
        state.epoch = state.epoch.max(claim.epoch);
        self.written_by.insert(user, incarnation);
        Ok(state.claim.replace(claim))
    }

    /// `ResumeClaim`: [`Self::replace`], only if the current claim also holds the
    /// resumption secret hashed to `secret`. A mismatch is a lost race: `Err` carries the
    /// state, against which the route re-checks the secret (and refuses it).
    // The `Err` is the store's reply (`ClaimReplaced(Err(state))`), returned as it is: one
    // per claim command, not worth a box.
    #[allow(clippy::result_large_err)]
    pub fn resume(
        &mut self,
        user: UserId,
        expected: Epoch,
        secret: &[u8; 32],
        claim: Claim,
    ) -> Result<Option<Claim>, ClaimState> {
        self.resume_at(user, expected, secret, claim, UnixMillis(0))
    }

    /// [`ClaimTable::resume`] at store time `now` (see [`ClaimTable::replace_at`]).
    // The `Err` is the store's reply, as for `replace`.
    #[allow(clippy::result_large_err)]
    pub fn resume_at(
        &mut self,
        user: UserId,
        expected: Epoch,
        secret: &[u8; 32],
        claim: Claim,
        now: UnixMillis,
    ) -> Result<Option<Claim>, ClaimState> {
        let state = self.load(user);
        let holds = state
            .claim
            .as_ref()
            .and_then(|c| c.resume_secret.as_ref())
            .is_some_and(|s| bool::from(s.hash.ct_eq(secret)));
        if !holds {
            return Err(state);
        }
        self.replace_at(user, expected, claim, now)
    }

    /// A new account: this incarnation vouches that `user`'s counter is 0, so a first
    /// login a restart loses cannot have its epoch issued again (`replace_at` finds another
    /// incarnation's mark and raises the counter). `account_complete.lua` does the same.
    pub fn account_created(&mut self, user: UserId) {
        let incarnation = self.incarnation.incarnation_of_user(user);
        self.written_by.insert(user, incarnation);
    }

    /// `RevokeResumption` (and the revocation part of `SetPassword`): drops the claim's
    /// resumption secret, keeping the claim. Returns whether there was one.
    pub fn revoke_resumption(&mut self, user: UserId) -> bool {
        self.claims
            .get_mut(&user)
            .and_then(|state| state.claim.as_mut())
            .and_then(|claim| claim.resume_secret.take())
            .is_some()
    }

    /// `ExpireClaim`: ends the lease of the claim with exactly `epoch` (expired or not) and
    /// deletes the route record; the claim stays, lapsed. Returns whether it matched.
    pub fn expire(&mut self, user: UserId, epoch: Epoch) -> bool {
        let Some(claim) = self
            .claims
            .get_mut(&user)
            .and_then(|state| state.claim.as_mut())
            .filter(|c| c.epoch == epoch)
        else {
            return false;
        };
        claim.lease_until = UnixMillis(0);
        // The record's epoch is at most the claim's: never a newer session's.
        self.routes.remove(&user);
        true
    }

    /// `ReleaseClaim`: deletes the claim and the route record, only if the stored claim
    /// has exactly `epoch` (expired or not). Returns whether it deleted.
    pub fn release(&mut self, user: UserId, epoch: Epoch) -> bool {
        let Some(state) = self.claims.get_mut(&user) else {
            return false;
        };
        if state.claim.as_ref().is_none_or(|c| c.epoch != epoch) {
            return false;
        }
        state.claim = None;
        // The record's epoch is at most the claim's (binds need the claim's exact epoch), so
        // this never deletes a newer session's record.
        self.routes.remove(&user);
        true
    }

    /// `BindSession`: only if the live claim has exactly `epoch` and `server`, write the
    /// route record and extend the lease to `lease_until` (never shortening it). `Err`
    /// carries the user's current counter.
    pub fn bind(
        &mut self,
        user: UserId,
        epoch: Epoch,
        server: &ServerId,
        lease_until: UnixMillis,
        now: UnixMillis,
    ) -> Result<(), Epoch> {
        let canaries = self.canaries;
        let Some(state) = self.claims.get_mut(&user) else {
            return Err(Epoch::default());
        };
        let current = state.epoch;
        match state.claim.as_mut() {
            Some(claim) if owns(claim, epoch, server, canaries) && is_live(claim, now) => {
                claim.lease_until = claim.lease_until.max(lease_until);
                self.routes.insert(
                    user,
                    RouteRecord {
                        server: server.clone(),
                        epoch,
                    },
                );
                Ok(())
            }
            _ => Err(current),
        }
    }

    /// `RefreshLeases`: for each `(user, epoch)` of `server`, in order, extend the lease of
    /// the live claim with exactly that epoch and server (never shortening it). An expired
    /// claim is not revived: a refresh that comes too late finds it `Gone`.
    pub fn refresh(
        &mut self,
        server: &ServerId,
        lease_until: UnixMillis,
        sessions: &[(UserId, Epoch)],
        now: UnixMillis,
    ) -> Vec<(UserId, LeaseRefresh)> {
        let canaries = self.canaries;
        sessions
            .iter()
            .map(|&(user, epoch)| {
                let outcome = match self.claims.get_mut(&user) {
                    None => LeaseRefresh::Gone,
                    Some(state) => match state.claim.as_mut() {
                        Some(claim)
                            if owns(claim, epoch, server, canaries) && is_live(claim, now) =>
                        {
                            claim.lease_until = claim.lease_until.max(lease_until);
                            LeaseRefresh::Refreshed
                        }
                        _ if state.epoch > epoch => LeaseRefresh::Superseded {
                            current: state.epoch,
                        },
                        _ => LeaseRefresh::Gone,
                    },
                };
                (user, outcome)
            })
            .collect()
    }

    /// `LoadRoutes`: each user's route record, if it belongs to the user's current live
    /// claim. A record left by an older epoch (after a takeover, before the new bind) or
    /// under an expired claim (its server died) reads as offline, so no reader acts on it.
    pub fn routes(&self, users: &[UserId], now: UnixMillis) -> Vec<(UserId, Option<RouteRecord>)> {
        users
            .iter()
            .map(|&user| (user, self.current_route(user, now)))
            .collect()
    }

    fn current_route(&self, user: UserId, now: UnixMillis) -> Option<RouteRecord> {
        let record = self.routes.get(&user)?;
        let claim = self.claims.get(&user)?.claim.as_ref()?;
        (claim.epoch == record.epoch && claim.server == record.server && is_live(claim, now))
            .then(|| record.clone())
    }

    /// The stored route record, unfiltered (for invariant checks and debugging).
    pub fn route_record(&self, user: UserId) -> Option<&RouteRecord> {
        self.routes.get(&user)
    }

    /// Runs one claim command at store time `now`; `None` for commands that are not about
    /// claims, so a whole store can delegate to this first.
    pub fn apply(&mut self, now: UnixMillis, command: &StoreCommand) -> Option<StoreReply> {
        Some(match command {
            StoreCommand::LoadClaim { user } => StoreReply::Claim(self.load(*user)),
            StoreCommand::ReplaceClaim {
                user,
                expected,
                claim,
            } => StoreReply::ClaimReplaced(self.replace_at(*user, *expected, claim.clone(), now)),
            StoreCommand::ResumeClaim {
                user,
                expected,
                secret,
                claim,
            } => StoreReply::ClaimReplaced(self.resume_at(
                *user,
                *expected,
                secret,
                claim.clone(),
                now,
            )),
            StoreCommand::ExpireClaim { user, epoch } => StoreReply::ClaimReleased {
                released: self.expire(*user, *epoch),
            },
            StoreCommand::RevokeResumption { user } => StoreReply::ResumptionRevoked {
                revoked: self.revoke_resumption(*user),
            },
            StoreCommand::ReleaseClaim { user, epoch } => StoreReply::ClaimReleased {
                released: self.release(*user, *epoch),
            },
            StoreCommand::BindSession {
                user,
                epoch,
                server,
                lease_until,
            } => StoreReply::SessionBound(self.bind(*user, *epoch, server, *lease_until, now)),
            StoreCommand::RefreshLeases {
                server,
                lease_until,
                sessions,
            } => StoreReply::LeasesRefreshed(self.refresh(server, *lease_until, sessions, now)),
            StoreCommand::LoadRoutes { users } => StoreReply::Routes(self.routes(users, now)),
            StoreCommand::RegisterAccount { .. }
            | StoreCommand::LoadAccount { .. }
            | StoreCommand::LoadAccountByName { .. }
            | StoreCommand::ListAccounts { .. }
            | StoreCommand::SetPassword { .. }
            | StoreCommand::DeleteAccount { .. }
            | StoreCommand::LoadNames { .. }
            | StoreCommand::LoadMembers { .. }
            | StoreCommand::Append { .. }
            | StoreCommand::LoadHeads { .. }
            | StoreCommand::Fetch { .. }
            | StoreCommand::AdvanceCursors { .. }
            | StoreCommand::CreateGroup { .. }
            | StoreCommand::JoinGroup { .. }
            | StoreCommand::LeaveGroup { .. }
            | StoreCommand::ListOnline { .. }
            | StoreCommand::CountLoginFailure { .. }
            | StoreCommand::ClearLoginFailures { .. } => return None,
        })
    }
}

/// Whether `(epoch, server)` is the claim's own: the compare-epoch fence of bind and refresh.
fn owns(claim: &Claim, epoch: Epoch, server: &ServerId, canaries: Canaries) -> bool {
    (claim.epoch == epoch && claim.server == *server) || canaries.disabled(Canary::EpochFencing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const U: UserId = UserId(7);

    fn s(name: &str) -> ServerId {
        ServerId::new(name)
    }

    fn claim(epoch: u64, server: &str, lease_until: u64, token: u8) -> Claim {
        Claim {
            epoch: Epoch(epoch),
            server: s(server),
            lease_until: UnixMillis(lease_until),
            resume_token_hash: [token; 32],
            resume_secret: None,
        }
    }

    fn state(epoch: u64, claim: Option<Claim>) -> ClaimState {
        ClaimState {
            epoch: Epoch(epoch),
            claim,
            foreign: false,
        }
    }

    #[test]
    fn decide_login_table() {
        let live = claim(3, "s1", 10_000, 0xAA);
        let takeover = |epoch| LoginDecision::Takeover {
            epoch: Epoch(epoch),
            old: live.clone(),
        };
        // (name, state, now, presented hash, server live, want)
        type Case = (
            &'static str,
            ClaimState,
            u64,
            Option<[u8; 32]>,
            bool,
            Result<LoginDecision, RepeatLogin>,
        );
        let cases: Vec<Case> = vec![
            (
                "never logged in",
                state(0, None),
                5_000,
                None,
                true,
                Ok(LoginDecision::Fresh { epoch: Epoch(1) }),
            ),
            (
                "released: counter survives",
                state(3, None),
                5_000,
                None,
                true,
                Ok(LoginDecision::Fresh { epoch: Epoch(4) }),
            ),
            (
                "expired at lease_until",
                state(3, Some(live.clone())),
                10_000,
                None,
                true,
                Ok(LoginDecision::Fresh { epoch: Epoch(4) }),
            ),
            (
                "expired long ago",
                state(3, Some(live.clone())),
                99_000,
                Some([0xBB; 32]),
                true,
                Ok(LoginDecision::Fresh { epoch: Epoch(4) }),
            ),
            (
                "live, no token",
                state(3, Some(live.clone())),
                9_999,
                None,
                true,
                Err(RepeatLogin),
            ),
            (
                "live, wrong token",
                state(3, Some(live.clone())),
                5_000,
                Some([0xBB; 32]),
                true,
                Err(RepeatLogin),
            ),
            (
                "live, right token",
                state(3, Some(live.clone())),
                5_000,
                Some([0xAA; 32]),
                true,
                Ok(takeover(4)),
            ),
            (
                "live, server gone",
                state(3, Some(live.clone())),
                5_000,
                None,
                false,
                Ok(takeover(4)),
            ),
            (
                "live, server gone, wrong token",
                state(3, Some(live.clone())),
                5_000,
                Some([0xBB; 32]),
                false,
                Ok(takeover(4)),
            ),
            // A claim that may predate a login the store lost proves nothing against the
            // client, which may hold that login's token: taken over, never a 5000.
            (
                "live, written by another store incarnation, wrong token",
                ClaimState {
                    foreign: true,
                    ..state(3, Some(live.clone()))
                },
                5_000,
                Some([0xBB; 32]),
                true,
                Ok(takeover(4)),
            ),
            (
                "live, below a counter raised after a restart, no token",
                state(1_700_000_000_000, Some(live.clone())),
                5_000,
                None,
                true,
                Ok(takeover(1_700_000_000_001)),
            ),
        ];
        for (name, st, now, hash, server_live, want) in cases {
            assert_eq!(
                decide_login(&st, UnixMillis(now), hash, server_live),
                want,
                "{name}"
            );
        }
    }

    #[test]
    fn replace_is_compare_epoch() {
        let mut t = ClaimTable::new();
        assert_eq!(t.replace(U, Epoch(0), claim(1, "s1", 1_000, 1)), Ok(None));
        // Stale expectation: the state that won comes back, nothing changes.
        let won = state(1, Some(claim(1, "s1", 1_000, 1)));
        assert_eq!(
            t.replace(U, Epoch(0), claim(1, "s2", 1_000, 2)),
            Err(won.clone())
        );
        // The new epoch must be above the expected one.
        assert_eq!(
            t.replace(U, Epoch(1), claim(1, "s2", 1_000, 2)),
            Err(won.clone())
        );
        assert_eq!(t.load(U), won);
        // The replaced claim comes back, as it stood.
        assert_eq!(
            t.replace(U, Epoch(1), claim(2, "s2", 2_000, 2)),
            Ok(Some(claim(1, "s1", 1_000, 1)))
        );
        assert_eq!(t.load(U), state(2, Some(claim(2, "s2", 2_000, 2))));
        assert_eq!(t.load(UserId(99)), ClaimState::default());
    }

    #[test]
    fn bind_refresh_release_table() {
        let mut t = ClaimTable::new();
        t.replace(U, Epoch(0), claim(1, "s1", 1_000, 1)).unwrap();
        let now = UnixMillis(500);
        // Wrong epoch, wrong server: refused with the current epoch, nothing written.
        assert_eq!(
            t.bind(U, Epoch(0), &s("s1"), UnixMillis(5_000), now),
            Err(Epoch(1))
        );
        assert_eq!(
            t.bind(U, Epoch(1), &s("s2"), UnixMillis(5_000), now),
            Err(Epoch(1))
        );
        assert_eq!(t.route_record(U), None);
        assert_eq!(t.routes(&[U], now), vec![(U, None)]);
        // The right one writes the route and extends the lease.
        assert_eq!(
            t.bind(U, Epoch(1), &s("s1"), UnixMillis(5_000), now),
            Ok(())
        );
        let rec = RouteRecord {
            server: s("s1"),
            epoch: Epoch(1),
        };
        assert_eq!(t.routes(&[U], now), vec![(U, Some(rec.clone()))]);
        assert_eq!(t.load(U).claim.unwrap().lease_until, UnixMillis(5_000));
        // A bind never shortens a lease.
        assert_eq!(
            t.bind(U, Epoch(1), &s("s1"), UnixMillis(4_000), now),
            Ok(())
        );
        assert_eq!(t.load(U).claim.unwrap().lease_until, UnixMillis(5_000));

        // Refresh: ours, someone else's, unknown.
        let out = t.refresh(
            &s("s1"),
            UnixMillis(8_000),
            &[(U, Epoch(1)), (U, Epoch(0)), (UserId(99), Epoch(1))],
            UnixMillis(4_000),
        );
        assert_eq!(
            out,
            vec![
                (U, LeaseRefresh::Refreshed),
                (U, LeaseRefresh::Superseded { current: Epoch(1) }),
                (UserId(99), LeaseRefresh::Gone),
            ]
        );
        assert_eq!(t.load(U).claim.unwrap().lease_until, UnixMillis(8_000));
        // Another server cannot refresh our claim.
        assert_eq!(
            t.refresh(
                &s("s2"),
                UnixMillis(9_000),
                &[(U, Epoch(1))],
                UnixMillis(4_000)
            ),
            vec![(U, LeaseRefresh::Gone)]
        );
        assert_eq!(t.load(U).claim.unwrap().lease_until, UnixMillis(8_000));

        // A late refresh never revives an expired claim, and the route reads offline.
        assert_eq!(
            t.refresh(
                &s("s1"),
                UnixMillis(20_000),
                &[(U, Epoch(1))],
                UnixMillis(8_000)
            ),
            vec![(U, LeaseRefresh::Gone)]
        );
        assert_eq!(t.load(U).claim.unwrap().lease_until, UnixMillis(8_000));
        assert_eq!(t.routes(&[U], UnixMillis(8_000)), vec![(U, None)]);
        assert_eq!(
            t.bind(U, Epoch(1), &s("s1"), UnixMillis(20_000), UnixMillis(8_000)),
            Err(Epoch(1))
        );

        // Release: wrong epoch does nothing; the exact one deletes claim and route.
        assert!(!t.release(U, Epoch(0)));
        assert!(!t.release(U, Epoch(2)));
        assert_eq!(t.route_record(U), Some(&rec));
        assert!(t.release(U, Epoch(1)));
        assert_eq!(t.load(U), state(1, None));
        assert_eq!(t.route_record(U), None);
        assert!(!t.release(U, Epoch(1)), "second release");
    }

    #[test]
    fn takeover_hides_the_old_route_until_the_new_bind() {
        let mut t = ClaimTable::new();
        let now = UnixMillis(100);
        t.replace(U, Epoch(0), claim(1, "s1", 1_000, 1)).unwrap();
        t.bind(U, Epoch(1), &s("s1"), UnixMillis(1_000), now)
            .unwrap();
        t.replace(U, Epoch(1), claim(2, "s2", 1_000, 2)).unwrap();
        assert_eq!(t.routes(&[U], now), vec![(U, None)]);
        // The old server's cleanup and refresh cannot touch the new claim.
        assert!(!t.release(U, Epoch(1)));
        assert_eq!(
            t.refresh(&s("s1"), UnixMillis(9_000), &[(U, Epoch(1))], now),
            vec![(U, LeaseRefresh::Superseded { current: Epoch(2) })]
        );
        assert_eq!(t.load(U), state(2, Some(claim(2, "s2", 1_000, 2))));
        t.bind(U, Epoch(2), &s("s2"), UnixMillis(1_000), now)
            .unwrap();
        assert_eq!(
            t.routes(&[U], now),
            vec![(
                U,
                Some(RouteRecord {
                    server: s("s2"),
                    epoch: Epoch(2)
                })
            )]
        );
    }

    #[test]
    fn apply_delegates_claim_commands_only() {
        let mut t = ClaimTable::new();
        let now = UnixMillis(0);
        assert_eq!(
            t.apply(
                now,
                &StoreCommand::ReplaceClaim {
                    user: U,
                    expected: Epoch(0),
                    claim: claim(1, "s1", 1_000, 1)
                }
            ),
            Some(StoreReply::ClaimReplaced(Ok(None)))
        );
        assert_eq!(
            t.apply(
                now,
                &StoreCommand::BindSession {
                    user: U,
                    epoch: Epoch(1),
                    server: s("s1"),
                    lease_until: UnixMillis(2_000)
                }
            ),
            Some(StoreReply::SessionBound(Ok(())))
        );
        assert_eq!(
            t.apply(now, &StoreCommand::LoadRoutes { users: vec![U] }),
            Some(StoreReply::Routes(vec![(
                U,
                Some(RouteRecord {
                    server: s("s1"),
                    epoch: Epoch(1)
                })
            )]))
        );
        assert_eq!(
            t.apply(
                now,
                &StoreCommand::ReleaseClaim {
                    user: U,
                    epoch: Epoch(1)
                }
            ),
            Some(StoreReply::ClaimReleased { released: true })
        );
        assert_eq!(
            t.apply(now, &StoreCommand::LoadClaim { user: U }),
            Some(StoreReply::Claim(state(1, None)))
        );
        assert_eq!(t.apply(now, &StoreCommand::LoadAccount { user: U }), None);
    }

    // --- property: fencing -------------------------------------------------------------

    #[derive(Debug, Clone)]
    enum Op {
        Replace {
            user: u64,
            expected: u64,
            bump: u64,
            server: u8,
            ttl: u64,
        },
        Release {
            user: u64,
            epoch: u64,
        },
        Bind {
            user: u64,
            epoch: u64,
            server: u8,
            ttl: u64,
        },
        Refresh {
            server: u8,
            ttl: u64,
            sessions: Vec<(u64, u64)>,
        },
        Tick {
            ms: u64,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few users, servers and epochs, so operations collide often.
        prop_oneof![
            (0..2u64, 0..6u64, 0..3u64, 0..2u8, 0..50u64).prop_map(
                |(user, expected, bump, server, ttl)| Op::Replace {
                    user,
                    expected,
                    bump,
                    server,
                    ttl
                }
            ),
            (0..2u64, 0..6u64).prop_map(|(user, epoch)| Op::Release { user, epoch }),
            (0..2u64, 0..6u64, 0..2u8, 0..50u64).prop_map(|(user, epoch, server, ttl)| Op::Bind {
                user,
                epoch,
                server,
                ttl
            }),
            (
                0..2u8,
                0..50u64,
                prop::collection::vec((0..2u64, 0..6u64), 0..4)
            )
                .prop_map(|(server, ttl, sessions)| Op::Refresh {
                    server,
                    ttl,
                    sessions
                }),
            (0..30u64).prop_map(|ms| Op::Tick { ms }),
        ]
    }

    /// The epoch an operation acts under, per user it touches.
    fn fenced_epochs(op: &Op) -> Vec<(UserId, Epoch)> {
        match op {
            Op::Replace { user, expected, .. } => vec![(UserId(*user), Epoch(*expected))],
            Op::Release { user, epoch } | Op::Bind { user, epoch, .. } => {
                vec![(UserId(*user), Epoch(*epoch))]
            }
            Op::Refresh { sessions, .. } => sessions
                .iter()
                .map(|&(u, e)| (UserId(u), Epoch(e)))
                .collect(),
            Op::Tick { .. } => vec![],
        }
    }

    fn check_invariants(t: &ClaimTable) {
        for (user, st) in &t.claims {
            if let Some(c) = &st.claim {
                assert_eq!(c.epoch, st.epoch, "claim epoch != counter for {user}");
            }
        }
        for (user, rec) in &t.routes {
            assert!(
                rec.epoch <= t.load(*user).epoch,
                "route record ahead of counter for {user}"
            );
        }
    }

    proptest! {
        #[test]
        fn stale_epochs_never_change_the_current_claim(ops in prop::collection::vec(op(), 1..60)) {
            let mut t = ClaimTable::new();
            let mut now = 0u64;
            let users = [UserId(0), UserId(1)];
            for op in &ops {
                let before = t.clone();
                let wall = UnixMillis(now);
                match op {
                    Op::Replace { user, expected, bump, server, ttl } => {
                        let c = Claim {
                            epoch: Epoch(expected + bump),
                            server: ServerId(format!("s{server}")),
                            lease_until: UnixMillis(now + ttl),
                            resume_token_hash: [*server; 32],
                            resume_secret: None,
                        };
                        let _ = t.apply(wall, &StoreCommand::ReplaceClaim { user: UserId(*user), expected: Epoch(*expected), claim: c });
                    }
                    Op::Release { user, epoch } => {
                        let _ = t.apply(wall, &StoreCommand::ReleaseClaim { user: UserId(*user), epoch: Epoch(*epoch) });
                    }
                    Op::Bind { user, epoch, server, ttl } => {
                        let _ = t.apply(wall, &StoreCommand::BindSession {
                            user: UserId(*user), epoch: Epoch(*epoch),
                            server: ServerId(format!("s{server}")), lease_until: UnixMillis(now + ttl),
                        });
                    }
                    Op::Refresh { server, ttl, sessions } => {
                        let _ = t.apply(wall, &StoreCommand::RefreshLeases {
                            server: ServerId(format!("s{server}")), lease_until: UnixMillis(now + ttl),
                            sessions: sessions.iter().map(|&(u, e)| (UserId(u), Epoch(e))).collect(),
                        });
                    }
                    Op::Tick { ms } => now += ms,
                }
                check_invariants(&t);
                for user in users {
                    let (old, new) = (before.load(user), t.load(user));
                    prop_assert!(new.epoch >= old.epoch, "counter went back for {user}: {op:?}");
                    let touches = fenced_epochs(op).into_iter().filter(|(u, _)| *u == user).collect::<Vec<_>>();
                    // Only operations that carry a stale epoch for this user (none current).
                    if !touches.is_empty() && touches.iter().all(|(_, e)| *e < old.epoch) {
                        prop_assert_eq!(&new, &old, "stale {:?} changed the claim of {}", op, user);
                        prop_assert_eq!(t.route_record(user), before.route_record(user), "stale {:?} changed the route of {}", op, user);
                    }
                }
                // Expired claims stay expired: no operation makes a dead claim live again
                // without a new epoch.
                for user in users {
                    if let (Some(old), Some(new)) = (before.load(user).claim, t.load(user).claim)
                        && old.epoch == new.epoch
                        && !is_live(&old, wall)
                    {
                        prop_assert!(!is_live(&new, wall), "expired claim revived for {user}: {op:?}");
                    }
                }
            }
        }
    }
}
