//! One store conformance suite, run against the in-memory reference and against Redis.
//!
//! Each scenario asserts the expected replies itself, and records a transcript of
//! (command, reply) pairs with log epochs renamed by order of first appearance (they are
//! random per backend). The Redis run's transcript must equal the reference's, so every
//! reply is compared, not only the asserted ones.
//!
//! The same scenarios run against `RemoteStore`, the simulation's store host over real
//! sockets (a `MemoryBackend` behind the network): its transcript must equal the reference's
//! too, which proves the wire carries every command and reply unchanged.
//!
//! Every scenario also runs against a Redis Cluster (three masters with a replica each), whose
//! transcript must equal the reference's too: started once for the whole test binary
//! (`cim_testkit::redis_cluster`), emptied before each scenario, which takes its turn with it.
//!
//! The Redis half starts its own `redis-server` per test (see `support`); it is skipped with
//! a message when `redis-server` is not installed, and fails under `CI=true`.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use cim_core::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};
use cim_core::memstore::MemoryStoreConfig;
use cim_core::store::{
    AppendError, Appended, Claim, ClaimState, ConvHead, LeaseRefresh, LoginFailures,
    MembersVersion, NameTaken, OnlineEntry, Recipients, ResumeSecret, RouteRecord, SendOrder,
    StoreCommand, StoreReply, StoredMessage,
};
use cim_io::net::{Network, TokioNet};
use cim_io::store::{ConnectError, MemoryBackend, RedisOptions, RedisStore, Store};
use cim_sim_hosts::store::{RemoteOptions, RemoteStore, serve_store_on};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use cim_io::store::RedisTls;
use cim_testkit::{RedisCluster, RedisServer, redis_cluster, redis_cluster_tls};

const TTL: Duration = Duration::from_secs(60);
const TTL_MS: u64 = 60_000;
const MAX_LOG: usize = 3;
const T0: u64 = 1_700_000_000_000;

fn memory() -> MemoryBackend {
    MemoryBackend::new(MemoryStoreConfig {
        max_log_len: MAX_LOG,
        idempotency_ttl: TTL,
        seed: 7,
        ..MemoryStoreConfig::default()
    })
}

fn redis_options() -> RedisOptions {
    RedisOptions {
        max_log_len: MAX_LOG,
        idempotency_ttl: TTL,
        allow_eviction: false,
        command_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        seed: Some(7),
        ..RedisOptions::default()
    }
}

/// A store host serving a fresh reference backend on a free port, and a client of it.
async fn remote() -> RemoteStore<TokioNet> {
    let listener = TokioNet
        .bind("127.0.0.1:0".parse().expect("address"))
        .await
        .expect("bind store host");
    let port = listener.local_addr().expect("local address").port();
    tokio::spawn(serve_store_on(listener, std::sync::Arc::new(memory())));
    let options = RemoteOptions {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        ..RemoteOptions::default()
    };
    RemoteStore::new(TokioNet, "127.0.0.1", port, options)
}

async fn redis(server: &RedisServer) -> RedisStore {
    RedisStore::connect(&server.url(), redis_options())
        .await
        .expect("connect to the test redis-server")
}

/// A cluster store on `cluster`, through all of its nodes' URLs.
async fn redis_cluster_store(cluster: &RedisCluster) -> RedisStore {
    RedisStore::connect_cluster(&cluster.urls(), redis_options())
        .await
        .expect("connect to the test Redis Cluster")
}

/// One test at a time uses the shared cluster (each empties it first); the others wait.
static CLUSTER_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// --- driver ---------------------------------------------------------------------------

/// Runs commands against one store and keeps the normalised transcript.
struct Driver<'a> {
    store: &'a dyn Store,
    /// Log epochs in order of first appearance; normalised epoch `i + 1` is `epochs[i]`.
    epochs: Vec<LogEpoch>,
    /// Each conversation's log epoch as last seen in a reply (for [`CURRENT`]).
    seen: BTreeMap<ConvId, LogEpoch>,
    transcript: Vec<String>,
}

/// In a generated command: "the conversation's log epoch as this driver last saw it".
const CURRENT: LogEpoch = LogEpoch(u64::MAX);

impl<'a> Driver<'a> {
    fn new(store: &'a dyn Store) -> Self {
        Self {
            store,
            epochs: Vec::new(),
            seen: BTreeMap::new(),
            transcript: Vec::new(),
        }
    }

    async fn run(&mut self, now: u64, command: StoreCommand) -> StoreReply {
        let reply = self
            .store
            .execute(UnixMillis(now), command.clone())
            .await
            .unwrap_or_else(|e| panic!("{command:?}: {e}"));
        // Route records an append read for its push (optional: a cluster cannot read them in
        // the append's step) are what `LoadRoutes` answers at that moment.
        if let StoreReply::Appended(Ok(Appended {
            recipients: Some(Recipients::Routes(routes)),
            ..
        })) = &reply
        {
            let users = routes.iter().map(|(user, _)| *user).collect();
            let loaded = self
                .store
                .execute(UnixMillis(now), StoreCommand::LoadRoutes { users })
                .await
                .unwrap_or_else(|e| panic!("load routes after {command:?}: {e}"));
            assert_eq!(loaded, StoreReply::Routes(routes.clone()), "{command:?}");
        }
        let command = self.norm_command(command);
        let normalised = self.norm_reply(reply.clone());
        self.transcript
            .push(format!("@{now} {command:?} => {normalised:?}"));
        reply
    }

    fn norm(&mut self, epoch: LogEpoch) -> LogEpoch {
        if epoch.0 == 0 {
            return epoch;
        }
        let index = match self.epochs.iter().position(|e| *e == epoch) {
            Some(i) => i,
            None => {
                self.epochs.push(epoch);
                self.epochs.len() - 1
            }
        };
        LogEpoch(index as u64 + 1)
    }

    /// The real epoch behind normalised epoch `n`, or a made-up one nobody has.
    fn denorm(&self, n: LogEpoch) -> LogEpoch {
        match n.0 {
            0 => n,
            i => self
                .epochs
                .get(i as usize - 1)
                .copied()
                .unwrap_or(LogEpoch(u64::MAX - i)),
        }
    }

    fn norm_version(&mut self, version: MembersVersion) -> MembersVersion {
        MembersVersion {
            log_epoch: self.norm(version.log_epoch),
            ..version
        }
    }

    fn norm_head(&mut self, mut head: ConvHead) -> ConvHead {
        self.seen.insert(head.conv.clone(), head.log_epoch);
        head.log_epoch = self.norm(head.log_epoch);
        head.carried_from = self.norm(head.carried_from);
        head
    }

    fn norm_message(&mut self, mut message: StoredMessage) -> StoredMessage {
        self.seen.insert(message.conv.clone(), message.log_epoch);
        message.log_epoch = self.norm(message.log_epoch);
        message
    }

    fn norm_reply(&mut self, reply: StoreReply) -> StoreReply {
        match reply {
            StoreReply::Appended(Ok(mut appended)) => {
                appended.message = self.norm_message(appended.message);
                appended.recipients = match appended.recipients {
                    // Checked in `run`; a cluster leaves them out.
                    Some(Recipients::Routes(_)) => None,
                    Some(Recipients::Members { version, members }) => Some(Recipients::Members {
                        version: self.norm_version(version),
                        members,
                    }),
                    Some(Recipients::MembersUnchanged(version)) => {
                        Some(Recipients::MembersUnchanged(self.norm_version(version)))
                    }
                    None => None,
                };
                StoreReply::Appended(Ok(appended))
            }
            StoreReply::Heads(heads) => {
                StoreReply::Heads(heads.into_iter().map(|h| self.norm_head(h)).collect())
            }
            StoreReply::Fetched { head, messages } => StoreReply::Fetched {
                head: self.norm_head(head),
                messages: messages.into_iter().map(|m| self.norm_message(m)).collect(),
            },
            StoreReply::Account(Some(mut account)) => {
                account.all_from.log_epoch = self.norm(account.all_from.log_epoch);
                StoreReply::Account(Some(account))
            }
            other => other,
        }
    }

    fn norm_command(&mut self, command: StoreCommand) -> StoreCommand {
        self.map_epochs(command, |d, _, e| d.norm(e))
    }

    fn denorm_command(&mut self, command: StoreCommand) -> StoreCommand {
        self.map_epochs(command, |d, conv, e| {
            if e == CURRENT {
                d.seen.get(conv).copied().unwrap_or_default()
            } else {
                d.denorm(e)
            }
        })
    }

    fn map_epochs(
        &mut self,
        command: StoreCommand,
        mut f: impl FnMut(&mut Self, &ConvId, LogEpoch) -> LogEpoch,
    ) -> StoreCommand {
        match command {
            StoreCommand::Fetch {
                user,
                conv,
                log_epoch,
                after_seq,
                limit,
            } => {
                let log_epoch = f(self, &conv, log_epoch);
                StoreCommand::Fetch {
                    user,
                    conv,
                    log_epoch,
                    after_seq,
                    limit,
                }
            }
            StoreCommand::AdvanceCursors { user, cursors } => StoreCommand::AdvanceCursors {
                user,
                cursors: cursors
                    .into_iter()
                    .map(|(c, e, s)| {
                        let e = f(self, &c, e);
                        (c, e, s)
                    })
                    .collect(),
            },
            mut append @ StoreCommand::Append { .. } => {
                if let StoreCommand::Append {
                    conv,
                    members_known: Some(known),
                    ..
                } = &mut append
                {
                    known.log_epoch = f(self, conv, known.log_epoch);
                }
                append
            }
            other => other,
        }
    }

    // Shorthands used by the scenarios.

    async fn register(&mut self, name: &str) -> UserId {
        match self
            .run(
                T0,
                StoreCommand::RegisterAccount {
                    name: name.into(),
                    password_hash: format!("phc-{name}"),
                },
            )
            .await
        {
            StoreReply::AccountRegistered(Ok(user)) => user,
            other => panic!("register {name}: {other:?}"),
        }
    }

    async fn append(
        &mut self,
        now: u64,
        conv: &ConvId,
        sender: UserId,
        id: u128,
        body: &str,
    ) -> Result<(u64, bool, u64), AppendError> {
        match self
            .run(
                now,
                StoreCommand::Append {
                    conv: conv.clone(),
                    sender,
                    msg_id: ClientMsgId(id),
                    body: Bytes::copy_from_slice(body.as_bytes()),
                    now: UnixMillis(now),
                    order: None,
                    members_known: None,
                },
            )
            .await
        {
            StoreReply::Appended(r) => {
                r.map(|a| (a.message.seq, a.duplicate, a.message.appended_at.0))
            }
            other => panic!("{other:?}"),
        }
    }

    /// An append of one stream's message `(stream, order seq, after)`: its conversation seq.
    async fn append_ordered(
        &mut self,
        now: u64,
        conv: &ConvId,
        sender: UserId,
        id: u128,
        (stream, seq, after): (u64, u64, u64),
    ) -> Result<u64, AppendError> {
        let order = Some(SendOrder { stream, seq, after });
        let command = StoreCommand::Append {
            conv: conv.clone(),
            sender,
            msg_id: ClientMsgId(id),
            body: Bytes::from_static(b"m"),
            now: UnixMillis(now),
            order,
            members_known: None,
        };
        match self.run(now, command).await {
            StoreReply::Appended(r) => r.map(|a| a.message.seq),
            other => panic!("{other:?}"),
        }
    }

    async fn heads(&mut self, user: UserId) -> Vec<ConvHead> {
        match self.run(T0, StoreCommand::LoadHeads { user }).await {
            StoreReply::Heads(heads) => heads,
            other => panic!("{other:?}"),
        }
    }

    async fn head_of(&mut self, user: UserId, conv: &ConvId) -> Option<ConvHead> {
        self.heads(user).await.into_iter().find(|h| h.conv == *conv)
    }

    /// Every kind of fetch by `user` of `conv` is answered `NotMember`.
    async fn assert_outsider(&mut self, user: UserId, conv: ConvId, epoch: LogEpoch) {
        for (after, limit) in [(0, 10), (0, 0), (u64::MAX, 0)] {
            assert_eq!(
                self.fetch_reply(user, &conv, epoch, after, limit).await,
                StoreReply::NotMember,
                "{user:?} {conv}"
            );
        }
    }

    async fn fetch_reply(
        &mut self,
        user: UserId,
        conv: &ConvId,
        log_epoch: LogEpoch,
        after_seq: u64,
        limit: u32,
    ) -> StoreReply {
        let command = StoreCommand::Fetch {
            user,
            conv: conv.clone(),
            log_epoch,
            after_seq,
            limit,
        };
        self.run(T0, command).await
    }

    async fn fetch(
        &mut self,
        user: UserId,
        conv: &ConvId,
        log_epoch: LogEpoch,
        after_seq: u64,
        limit: u32,
    ) -> (ConvHead, Vec<u64>) {
        let command = StoreCommand::Fetch {
            user,
            conv: conv.clone(),
            log_epoch,
            after_seq,
            limit,
        };
        match self.run(T0, command).await {
            StoreReply::Fetched { head, messages } => {
                (head, messages.iter().map(|m| m.seq).collect())
            }
            other => panic!("{other:?}"),
        }
    }

    async fn group(&mut self, command: StoreCommand) -> StoreReply {
        self.run(T0, command).await
    }

    /// Message `id` from `sender` to `group`, naming the member list version `known`: its
    /// recipients.
    async fn group_append(
        &mut self,
        group: &ConvId,
        sender: UserId,
        id: u128,
        known: Option<MembersVersion>,
    ) -> Recipients {
        let command = StoreCommand::Append {
            conv: group.clone(),
            sender,
            msg_id: ClientMsgId(id),
            body: Bytes::from_static(b"m"),
            now: UnixMillis(T0),
            order: None,
            members_known: known,
        };
        match self.run(T0, command).await {
            StoreReply::Appended(Ok(appended)) => {
                appended.recipients.expect("a group's recipients")
            }
            other => panic!("{other:?}"),
        }
    }
}

/// Runs a scenario against the reference and against Redis, and compares the transcripts.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let memory = memory();
                let mut reference = Driver::new(&memory);
                scenarios::$name(&mut reference).await;
                assert!(!reference.transcript.is_empty());
                let store = remote().await;
                let mut over_the_wire = Driver::new(&store);
                scenarios::$name(&mut over_the_wire).await;
                assert_transcripts_equal(&reference.transcript, &over_the_wire.transcript);
                let Some(server) = RedisServer::start() else { return };
                let store = redis(&server).await;
                let mut real = Driver::new(&store);
                scenarios::$name(&mut real).await;
                assert_transcripts_equal(&reference.transcript, &real.transcript);
                let Some(cluster) = redis_cluster() else { return };
                let _turn = CLUSTER_TURN.lock().await;
                cluster.flush_all();
                let store = redis_cluster_store(cluster).await;
                let mut sharded = Driver::new(&store);
                scenarios::$name(&mut sharded).await;
                assert_transcripts_equal(&reference.transcript, &sharded.transcript);
            }
        )*
    };
}

fn assert_transcripts_equal(reference: &[String], real: &[String]) {
    for (i, (a, b)) in reference.iter().zip(real).enumerate() {
        assert_eq!(a, b, "step {i}: memory (left) and redis (right) differ");
    }
    assert_eq!(reference.len(), real.len(), "transcript lengths differ");
}

conformance!(
    accounts_register_name_taken_and_load,
    names_are_looked_up_in_order_unknown_ids_none,
    account_names_are_unique_regardless_of_case,
    claims_replace_is_compare_epoch,
    claims_bind_refresh_release,
    claims_takeover_hides_the_old_route,
    routes_only_for_live_matching_claims,
    append_membership_and_unknown_conversations,
    append_idempotency_and_ttl_by_now,
    append_keeps_each_stream_in_order,
    append_trims_and_moves_first_available,
    fetch_windows_and_log_epoch_mismatch,
    fetch_by_an_outsider_tells_nothing,
    heads_with_join_seqs,
    cursors_only_move_forward,
    groups_create_join_leave,
    online_lists_users_with_live_bound_routes,
    login_failures_compare_and_count_and_forget,
    a_new_account_starts_reading_all_at_its_registration,
    accounts_by_name_listed_and_password_reset,
    a_deleted_account_is_a_tombstone,
    a_resumption_secret_is_compared_rotated_and_revoked,
    an_append_reads_its_push_recipients,
    a_member_list_is_confirmed_until_the_membership_changes,
);

fn claim(epoch: u64, server: &str, lease: u64, token: u8) -> Claim {
    Claim {
        resume_secret: None,
        epoch: Epoch(epoch),
        server: ServerId::new(server),
        lease_until: UnixMillis(lease),
        resume_token_hash: [token; 32],
    }
}

fn state(epoch: u64, claim: Option<Claim>) -> ClaimState {
    ClaimState {
        epoch: Epoch(epoch),
        claim,
        foreign: false,
    }
}

fn s(name: &str) -> ServerId {
    ServerId::new(name)
}

mod scenarios {
    use super::*;

    /// Resumption: the claim keeps only the secret's hash and expiry; `ResumeClaim` writes
    /// only while the stored claim holds the secret presented (so each is used once);
    /// revocation, a password change, a release and a deletion each end it.
    pub async fn a_resumption_secret_is_compared_rotated_and_revoked(d: &mut Driver<'_>) {
        let alice = d.register("alice").await;
        let with_secret = |epoch, hash: u8| Claim {
            resume_secret: Some(ResumeSecret {
                hash: [hash; 32],
                expires_at: UnixMillis(T0 + 60_000),
            }),
            ..claim(epoch, "s1", T0 + 6_000, epoch as u8)
        };
        let replace = |expected, claim| StoreCommand::ReplaceClaim {
            user: alice,
            expected: Epoch(expected),
            claim,
        };
        let resume = |expected, secret: u8, claim| StoreCommand::ResumeClaim {
            user: alice,
            expected: Epoch(expected),
            secret: [secret; 32],
            claim,
        };
        let load = StoreCommand::LoadClaim { user: alice };
        // A password login stores secret A; the store gives back its hash and expiry.
        assert_eq!(
            d.run(T0, replace(0, with_secret(1, 0xA))).await,
            StoreReply::ClaimReplaced(Ok(None))
        );
        assert_eq!(
            d.run(T0, load.clone()).await,
            StoreReply::Claim(state(1, Some(with_secret(1, 0xA))))
        );
        // Presenting B (not the claim's): nothing written, the state as it is.
        assert_eq!(
            d.run(T0, resume(1, 0xB, with_secret(2, 0xB))).await,
            StoreReply::ClaimReplaced(Err(state(1, Some(with_secret(1, 0xA)))))
        );
        // Presenting A: rotated to B.
        assert_eq!(
            d.run(T0, resume(1, 0xA, with_secret(2, 0xB))).await,
            StoreReply::ClaimReplaced(Ok(Some(with_secret(1, 0xA))))
        );
        // A again (used): refused, even with the right counter.
        assert_eq!(
            d.run(T0, resume(2, 0xA, with_secret(3, 0xC))).await,
            StoreReply::ClaimReplaced(Err(state(2, Some(with_secret(2, 0xB)))))
        );
        // An explicit revocation drops B and keeps the claim; a second finds nothing.
        assert_eq!(
            d.run(T0, StoreCommand::RevokeResumption { user: alice })
                .await,
            StoreReply::ResumptionRevoked { revoked: true }
        );
        assert_eq!(
            d.run(T0, StoreCommand::RevokeResumption { user: alice })
                .await,
            StoreReply::ResumptionRevoked { revoked: false }
        );
        let no_secret = Claim {
            resume_secret: None,
            ..with_secret(2, 0xB)
        };
        assert_eq!(
            d.run(T0, load.clone()).await,
            StoreReply::Claim(state(2, Some(no_secret.clone())))
        );
        assert_eq!(
            d.run(T0, resume(2, 0xB, with_secret(3, 0xC))).await,
            StoreReply::ClaimReplaced(Err(state(2, Some(no_secret))))
        );
        // The next password login stores C.
        d.run(T0, replace(2, with_secret(3, 0xC))).await;
        // A password change revokes it.
        assert_eq!(
            d.run(
                T0,
                StoreCommand::SetPassword {
                    user: alice,
                    password_hash: "new".into()
                }
            )
            .await,
            StoreReply::PasswordSet { found: true }
        );
        assert_eq!(
            d.run(T0, resume(3, 0xC, with_secret(4, 0xD))).await,
            StoreReply::ClaimReplaced(Err(state(
                3,
                Some(Claim {
                    resume_secret: None,
                    ..with_secret(3, 0xC)
                })
            )))
        );
        // A server's cleanup of a closed connection only ends the lease: the claim, its
        // token and its secret stay (the client resumes without the password).
        assert_eq!(
            d.run(
                T0,
                StoreCommand::ExpireClaim {
                    user: alice,
                    epoch: Epoch(3)
                }
            )
            .await,
            StoreReply::ClaimReleased { released: true }
        );
        assert_eq!(
            d.run(T0, load.clone()).await,
            StoreReply::Claim(state(
                3,
                Some(Claim {
                    resume_secret: None,
                    lease_until: UnixMillis(0),
                    ..with_secret(3, 0xC)
                })
            ))
        );
        // A release (logout) takes the secret with the claim: a new claim without one has
        // no leftover.
        d.run(T0, replace(3, with_secret(4, 0xD))).await;
        assert_eq!(
            d.run(
                T0,
                StoreCommand::ReleaseClaim {
                    user: alice,
                    epoch: Epoch(4)
                }
            )
            .await,
            StoreReply::ClaimReleased { released: true }
        );
        assert_eq!(
            d.run(T0, resume(4, 0xD, with_secret(5, 0xE))).await,
            StoreReply::ClaimReplaced(Err(state(4, None)))
        );
        d.run(
            T0,
            replace(
                4,
                Claim {
                    resume_secret: None,
                    ..with_secret(5, 0xE)
                },
            ),
        )
        .await;
        assert_eq!(
            d.run(T0, load).await,
            StoreReply::Claim(state(
                5,
                Some(Claim {
                    resume_secret: None,
                    ..with_secret(5, 0xE)
                })
            ))
        );
    }

    /// Item 4: a new account owes nothing of `all` before its registration (its head's
    /// cursor starts at the head it registered at), yet may fetch that history.
    pub async fn a_new_account_starts_reading_all_at_its_registration(d: &mut Driver<'_>) {
        let first = d.register("first").await;
        for id in 1..=2 {
            d.append(T0, &ConvId::All, first, id, "early")
                .await
                .unwrap();
        }
        let late = d.register("late").await;
        d.append(T0, &ConvId::All, first, 3, "after").await.unwrap();
        let head = d.head_of(late, &ConvId::All).await.expect("all has a log");
        assert_eq!((head.head_seq, head.cursor_seq), (3, 2));
        // The first account registered before the log existed: it owes everything.
        let head_first = d.head_of(first, &ConvId::All).await.unwrap();
        assert_eq!(head_first.cursor_seq, 0);
        // Earlier history is still there on request.
        let (fetched_head, seqs) = d.fetch(late, &ConvId::All, head.log_epoch, 0, 10).await;
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(fetched_head.cursor_seq, 2);
        match d.run(T0, StoreCommand::LoadAccount { user: late }).await {
            StoreReply::Account(Some(a)) => {
                assert_eq!(a.all_from.seq, 2);
                assert_eq!(a.all_from.floor(head.log_epoch), 2);
            }
            other => panic!("{other:?}"),
        }
        // A cursor beyond the start wins.
        d.run(
            T0,
            StoreCommand::AdvanceCursors {
                user: late,
                cursors: vec![(ConvId::All, head.log_epoch, 3)],
            },
        )
        .await;
        assert_eq!(d.head_of(late, &ConvId::All).await.unwrap().cursor_seq, 3);
    }

    /// Login by name ignores case; the admin listing pages by id; a password reset.
    pub async fn accounts_by_name_listed_and_password_reset(d: &mut Driver<'_>) {
        let bob = d.register("Bob").await;
        let carol = d.register("carol").await;
        for name in ["bob", "BOB", "Bob"] {
            match d
                .run(T0, StoreCommand::LoadAccountByName { name: name.into() })
                .await
            {
                StoreReply::Account(Some(a)) => assert_eq!((a.user, &*a.name), (bob, "Bob")),
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(
            d.run(
                T0,
                StoreCommand::LoadAccountByName {
                    name: "dave".into()
                }
            )
            .await,
            StoreReply::Account(None)
        );
        let list = |after, limit| StoreCommand::ListAccounts {
            after: UserId(after),
            limit,
        };
        let row = |user: UserId, name: &str| cim_core::store::AccountSummary {
            user,
            name: name.into(),
            deleted: false,
        };
        assert_eq!(
            d.run(T0, list(0, 10)).await,
            StoreReply::Accounts(vec![row(bob, "Bob"), row(carol, "carol")])
        );
        assert_eq!(
            d.run(T0, list(0, 1)).await,
            StoreReply::Accounts(vec![row(bob, "Bob")])
        );
        assert_eq!(
            d.run(T0, list(bob.0, 1)).await,
            StoreReply::Accounts(vec![row(carol, "carol")])
        );
        assert_eq!(
            d.run(T0, list(carol.0, 5)).await,
            StoreReply::Accounts(vec![])
        );
        assert_eq!(d.run(T0, list(0, 0)).await, StoreReply::Accounts(vec![]));
        let reset = |user, hash: &str| StoreCommand::SetPassword {
            user,
            password_hash: hash.into(),
        };
        assert_eq!(
            d.run(T0, reset(carol, "phc-new")).await,
            StoreReply::PasswordSet { found: true }
        );
        assert_eq!(
            d.run(T0, reset(UserId(99), "x")).await,
            StoreReply::PasswordSet { found: false }
        );
        match d.run(T0, StoreCommand::LoadAccount { user: carol }).await {
            StoreReply::Account(Some(a)) => assert_eq!(a.password_hash, "phc-new"),
            other => panic!("{other:?}"),
        }
        // A second registration attempt of the name never undoes the reset.
        let again = StoreCommand::RegisterAccount {
            name: "CAROL".into(),
            password_hash: "phc-again".into(),
        };
        assert_eq!(
            d.run(T0, again).await,
            StoreReply::AccountRegistered(Err(NameTaken))
        );
        match d.run(T0, StoreCommand::LoadAccount { user: carol }).await {
            StoreReply::Account(Some(a)) => assert_eq!(a.password_hash, "phc-new"),
            other => panic!("{other:?}"),
        }
    }

    /// Item 16: deletion is a tombstone. The rules that relied on "accounts are never
    /// deleted" still hold: nothing is appended to, from or for the deleted account, it is
    /// in no group, has no claim, route or presence, its id is never reissued and its name
    /// stays taken in every case; old messages keep their sender's name.
    pub async fn a_deleted_account_is_a_tombstone(d: &mut Driver<'_>) {
        let alice = d.register("alice").await;
        let bob = d.register("Bob").await;
        let private = ConvId::private(alice, bob).unwrap();
        d.append(T0, &private, alice, 1, "hi bob").await.unwrap();
        d.append(T0, &ConvId::All, bob, 2, "hi all").await.unwrap();
        let group = ConvId::group("g").unwrap();
        d.group(StoreCommand::CreateGroup {
            conv: group.clone(),
            owner: alice,
        })
        .await;
        d.group(StoreCommand::JoinGroup {
            conv: group.clone(),
            user: bob,
        })
        .await;
        // bob online on s1.
        d.run(
            T0,
            StoreCommand::ReplaceClaim {
                user: bob,
                expected: Epoch(0),
                claim: claim(1, "s1", T0 + 6_000, 1),
            },
        )
        .await;
        d.run(
            T0,
            StoreCommand::BindSession {
                user: bob,
                epoch: Epoch(1),
                server: s("s1"),
                lease_until: UnixMillis(T0 + 6_000),
            },
        )
        .await;
        d.run(
            T0,
            StoreCommand::CountLoginFailure {
                user: bob,
                expected: 0,
                forget_after: Duration::from_secs(60),
            },
        )
        .await;
        let head_before = d.head_of(alice, &private).await.unwrap();

        match d.run(T0, StoreCommand::DeleteAccount { user: bob }).await {
            StoreReply::AccountDeleted(Some(deleted)) => {
                assert_eq!(deleted.name, "Bob");
                assert!(!deleted.already);
                assert_eq!(deleted.claim, Some(claim(1, "s1", T0 + 6_000, 1)));
            }
            other => panic!("{other:?}"),
        }
        // Idempotent; unknown ids are no account.
        match d.run(T0, StoreCommand::DeleteAccount { user: bob }).await {
            StoreReply::AccountDeleted(Some(deleted)) => {
                assert!(deleted.already);
                assert_eq!(deleted.claim, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            d.run(T0, StoreCommand::DeleteAccount { user: UserId(99) })
                .await,
            StoreReply::AccountDeleted(None)
        );
        // No login: not by id, not by name.
        assert_eq!(
            d.run(T0, StoreCommand::LoadAccount { user: bob }).await,
            StoreReply::Account(None)
        );
        assert_eq!(
            d.run(T0, StoreCommand::LoadAccountByName { name: "bob".into() })
                .await,
            StoreReply::Account(None)
        );
        assert_eq!(
            d.run(
                T0,
                StoreCommand::SetPassword {
                    user: bob,
                    password_hash: "x".into()
                }
            )
            .await,
            StoreReply::PasswordSet { found: false }
        );
        // Its claim and route are gone: no presence, and a refresh of its session fails.
        assert_eq!(
            d.run(T0, StoreCommand::LoadClaim { user: bob }).await,
            StoreReply::Claim(state(1, None))
        );
        assert_eq!(
            d.run(T0, StoreCommand::LoadRoutes { users: vec![bob] })
                .await,
            StoreReply::Routes(vec![(bob, None)])
        );
        assert_eq!(
            d.run(T0, StoreCommand::ListOnline { limit: 10 }).await,
            StoreReply::Online(vec![])
        );
        assert_eq!(
            d.run(
                T0,
                StoreCommand::RefreshLeases {
                    server: s("s1"),
                    lease_until: UnixMillis(T0 + 9_000),
                    sessions: vec![(bob, Epoch(1))],
                }
            )
            .await,
            StoreReply::LeasesRefreshed(vec![(bob, LeaseRefresh::Gone)])
        );
        // A message to it is refused and nothing is stored.
        assert_eq!(
            d.append(T0, &private, alice, 3, "still there?").await,
            Err(AppendError::UnknownConversation)
        );
        assert_eq!(d.head_of(alice, &private).await.unwrap(), head_before);
        // Nothing from it either, anywhere.
        for conv in [&private, &ConvId::All, &group] {
            assert!(d.append(T0, conv, bob, 4, "ghost").await.is_err(), "{conv}");
        }
        assert_eq!(
            d.run(
                T0,
                StoreCommand::LoadMembers {
                    conv: group.clone()
                }
            )
            .await,
            StoreReply::Members(vec![alice])
        );
        assert_eq!(d.heads(bob).await, vec![]);
        d.assert_outsider(bob, ConvId::All, LogEpoch(0)).await;
        // The name stays taken, in any case; the next id is new.
        for name in ["Bob", "bob", "BOB"] {
            let command = StoreCommand::RegisterAccount {
                name: name.into(),
                password_hash: "phc-again".into(),
            };
            assert_eq!(
                d.run(T0, command).await,
                StoreReply::AccountRegistered(Err(NameTaken)),
                "{name}"
            );
        }
        assert_eq!(
            d.run(T0, StoreCommand::LoadAccount { user: bob }).await,
            StoreReply::Account(None),
            "a refused registration does not revive the tombstone"
        );
        assert_eq!(d.register("carol").await, UserId(bob.0 + 1));
        // Old messages keep their sender's name; the listing marks the tombstone.
        assert_eq!(
            d.run(T0, StoreCommand::LoadNames { users: vec![bob] })
                .await,
            StoreReply::Names(vec![(bob, Some("Bob".into()))])
        );
        match d
            .run(
                T0,
                StoreCommand::ListAccounts {
                    after: UserId(0),
                    limit: 10,
                },
            )
            .await
        {
            StoreReply::Accounts(rows) => {
                let rows: Vec<_> = rows.iter().map(|r| (r.user, r.deleted)).collect();
                assert_eq!(rows, vec![(alice, false), (bob, true), (UserId(3), false)]);
            }
            other => panic!("{other:?}"),
        }
        // The surviving user still reads the conversation's history.
        let (_, seqs) = d.fetch(alice, &private, head_before.log_epoch, 0, 10).await;
        assert_eq!(seqs, vec![1]);
    }

    /// The login throttle's record: compare-and-count (a stale `expected` changes nothing
    /// and answers the current record), forgotten `forget_after` past the last failure,
    /// cleared on demand, one record per user.
    pub async fn login_failures_compare_and_count_and_forget(d: &mut Driver<'_>) {
        let forget_after = Duration::from_secs(900);
        let count = |user: u64, expected: u32| StoreCommand::CountLoginFailure {
            user: UserId(user),
            expected,
            forget_after,
        };
        let record = |count: u32, last: u64| LoginFailures {
            count,
            last_at: UnixMillis(last),
        };
        let counted = |r| StoreReply::LoginFailureCounted(Ok(r));
        let refused = |r| StoreReply::LoginFailureCounted(Err(r));
        // (at, command, expected reply)
        let steps: Vec<(u64, StoreCommand, StoreReply)> = vec![
            (T0, count(1, 0), counted(record(1, T0))),
            // A second attempt that read "0" before the first was counted loses.
            (T0, count(1, 0), refused(record(1, T0))),
            (T0 + 5, count(1, 1), counted(record(2, T0 + 5))),
            (T0 + 6, count(1, 3), refused(record(2, T0 + 5))),
            // Another user's record is its own.
            (T0 + 7, count(2, 0), counted(record(1, T0 + 7))),
            (T0 + 8, count(1, 2), counted(record(3, T0 + 8))),
            // Just before forget_after past the last failure it is still there...
            (T0 + 8 + 899_999, count(1, 0), refused(record(3, T0 + 8))),
            // ...at forget_after it counts as empty.
            (T0 + 8 + 900_000, count(1, 3), refused(record(0, 0))),
            (
                T0 + 8 + 900_000,
                count(1, 0),
                counted(record(1, T0 + 900_008)),
            ),
            // Cleared: empty again; clearing nothing is fine.
            (
                T0 + 900_010,
                StoreCommand::ClearLoginFailures { user: UserId(1) },
                StoreReply::LoginFailuresCleared,
            ),
            (
                T0 + 900_010,
                StoreCommand::ClearLoginFailures { user: UserId(9) },
                StoreReply::LoginFailuresCleared,
            ),
            (T0 + 900_011, count(1, 1), refused(record(0, 0))),
            (T0 + 900_012, count(2, 1), refused(record(0, 0))),
        ];
        for (i, (at, command, want)) in steps.into_iter().enumerate() {
            assert_eq!(d.run(at, command).await, want, "step {i}");
        }
    }

    pub async fn accounts_register_name_taken_and_load(d: &mut Driver<'_>) {
        assert_eq!(d.register("alice").await, UserId(1));
        assert_eq!(d.register("bob").await, UserId(2));
        let again = StoreCommand::RegisterAccount {
            name: "alice".into(),
            password_hash: "other".into(),
        };
        assert_eq!(
            d.run(T0, again).await,
            StoreReply::AccountRegistered(Err(NameTaken))
        );
        // A refused name burns no id.
        assert_eq!(d.register("carol").await, UserId(3));
        match d
            .run(T0, StoreCommand::LoadAccount { user: UserId(1) })
            .await
        {
            StoreReply::Account(Some(a)) => {
                assert_eq!(
                    (a.user, &*a.name, &*a.password_hash),
                    (UserId(1), "alice", "phc-alice")
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            d.run(T0, StoreCommand::LoadAccount { user: UserId(99) })
                .await,
            StoreReply::Account(None)
        );
    }

    /// `Bob` and `bob` are one name: the second registration is refused whatever the case,
    /// burns no id, and the account keeps the name as its owner typed it.
    pub async fn account_names_are_unique_regardless_of_case(d: &mut Driver<'_>) {
        let bob = d.register("Bob").await;
        for other in ["bob", "BOB", "bOb"] {
            let command = StoreCommand::RegisterAccount {
                name: other.into(),
                password_hash: format!("phc-{other}"),
            };
            assert_eq!(
                d.run(T0, command).await,
                StoreReply::AccountRegistered(Err(NameTaken)),
                "{other}"
            );
        }
        // Differences other than ASCII case are other names.
        let bobby = d.register("bob_").await;
        assert_eq!(bobby, UserId(bob.0 + 1), "a refused name burns no id");
        assert_eq!(
            d.run(
                T0,
                StoreCommand::LoadNames {
                    users: vec![bob, bobby]
                }
            )
            .await,
            StoreReply::Names(vec![
                (bob, Some("Bob".into())),
                (bobby, Some("bob_".into()))
            ])
        );
        match d.run(T0, StoreCommand::LoadAccount { user: bob }).await {
            StoreReply::Account(Some(a)) => {
                assert_eq!((&*a.name, &*a.password_hash), ("Bob", "phc-Bob"));
            }
            other => panic!("{other:?}"),
        }
    }

    pub async fn names_are_looked_up_in_order_unknown_ids_none(d: &mut Driver<'_>) {
        assert_eq!(
            d.run(T0, StoreCommand::LoadNames { users: vec![] }).await,
            StoreReply::Names(vec![])
        );
        assert_eq!(d.register("alice").await, UserId(1));
        assert_eq!(d.register("bob").await, UserId(2));
        let users = vec![UserId(2), UserId(99), UserId(1), UserId(2)];
        assert_eq!(
            d.run(T0, StoreCommand::LoadNames { users }).await,
            StoreReply::Names(vec![
                (UserId(2), Some("bob".into())),
                (UserId(99), None),
                (UserId(1), Some("alice".into())),
                (UserId(2), Some("bob".into())),
            ])
        );
        // A refused registration changes no name.
        let again = StoreCommand::RegisterAccount {
            name: "bob".into(),
            password_hash: "other".into(),
        };
        d.run(T0, again).await;
        assert_eq!(
            d.run(
                T0,
                StoreCommand::LoadNames {
                    users: vec![UserId(2), UserId(3)]
                }
            )
            .await,
            StoreReply::Names(vec![(UserId(2), Some("bob".into())), (UserId(3), None)])
        );
    }

    pub async fn claims_replace_is_compare_epoch(d: &mut Driver<'_>) {
        let u = UserId(7);
        let replace = |expected, c| StoreCommand::ReplaceClaim {
            user: u,
            expected: Epoch(expected),
            claim: c,
        };
        assert_eq!(
            d.run(T0, replace(0, claim(1, "s1", T0 + 1_000, 1))).await,
            StoreReply::ClaimReplaced(Ok(None))
        );
        let won = state(1, Some(claim(1, "s1", T0 + 1_000, 1)));
        // Stale expectation, and a new epoch not above the expected one: the winner comes back.
        assert_eq!(
            d.run(T0, replace(0, claim(1, "s2", T0 + 1_000, 2))).await,
            StoreReply::ClaimReplaced(Err(won.clone()))
        );
        assert_eq!(
            d.run(T0, replace(1, claim(1, "s2", T0 + 1_000, 2))).await,
            StoreReply::ClaimReplaced(Err(won.clone()))
        );
        assert_eq!(
            d.run(T0, StoreCommand::LoadClaim { user: u }).await,
            StoreReply::Claim(won)
        );
        // The replaced claim comes back as it stood.
        assert_eq!(
            d.run(T0, replace(1, claim(2, "s2", T0 + 2_000, 2))).await,
            StoreReply::ClaimReplaced(Ok(Some(claim(1, "s1", T0 + 1_000, 1))))
        );
        assert_eq!(
            d.run(T0, StoreCommand::LoadClaim { user: u }).await,
            StoreReply::Claim(state(2, Some(claim(2, "s2", T0 + 2_000, 2))))
        );
        assert_eq!(
            d.run(T0, StoreCommand::LoadClaim { user: UserId(99) })
                .await,
            StoreReply::Claim(ClaimState::default())
        );
        // Replacing an expired claim works the same (the caller decided it may).
        assert_eq!(
            d.run(T0 + 5_000, replace(2, claim(5, "s3", T0 + 9_000, 3)))
                .await,
            StoreReply::ClaimReplaced(Ok(Some(claim(2, "s2", T0 + 2_000, 2))))
        );
    }

    pub async fn claims_bind_refresh_release(d: &mut Driver<'_>) {
        let u = UserId(7);
        let now = T0 + 500;
        let bind = |epoch, server: &str, lease| StoreCommand::BindSession {
            user: u,
            epoch: Epoch(epoch),
            server: s(server),
            lease_until: UnixMillis(lease),
        };
        let refresh =
            |server: &str, lease, sessions: Vec<(UserId, Epoch)>| StoreCommand::RefreshLeases {
                server: s(server),
                lease_until: UnixMillis(lease),
                sessions,
            };
        // Bind without any claim: the counter is 0.
        assert_eq!(
            d.run(now, bind(1, "s1", T0 + 5_000)).await,
            StoreReply::SessionBound(Err(Epoch(0)))
        );
        d.run(
            T0,
            StoreCommand::ReplaceClaim {
                user: u,
                expected: Epoch(0),
                claim: claim(1, "s1", T0 + 1_000, 1),
            },
        )
        .await;
        // Wrong epoch, wrong server: refused with the current epoch.
        assert_eq!(
            d.run(now, bind(0, "s1", T0 + 5_000)).await,
            StoreReply::SessionBound(Err(Epoch(1)))
        );
        assert_eq!(
            d.run(now, bind(1, "s2", T0 + 5_000)).await,
            StoreReply::SessionBound(Err(Epoch(1)))
        );
        let routes = StoreCommand::LoadRoutes { users: vec![u] };
        assert_eq!(
            d.run(now, routes.clone()).await,
            StoreReply::Routes(vec![(u, None)])
        );
        assert_eq!(
            d.run(now, bind(1, "s1", T0 + 5_000)).await,
            StoreReply::SessionBound(Ok(()))
        );
        let record = RouteRecord {
            server: s("s1"),
            epoch: Epoch(1),
        };
        assert_eq!(
            d.run(now, routes.clone()).await,
            StoreReply::Routes(vec![(u, Some(record.clone()))])
        );
        // A bind never shortens a lease.
        assert_eq!(
            d.run(now, bind(1, "s1", T0 + 4_000)).await,
            StoreReply::SessionBound(Ok(()))
        );
        let lease = |reply: StoreReply| match reply {
            StoreReply::Claim(st) => st.claim.map(|c| c.lease_until.0),
            other => panic!("{other:?}"),
        };
        let load = StoreCommand::LoadClaim { user: u };
        assert_eq!(lease(d.run(now, load.clone()).await), Some(T0 + 5_000));

        // Refresh: ours, someone's stale epoch, an unknown user, in order.
        assert_eq!(
            d.run(
                T0 + 4_000,
                refresh(
                    "s1",
                    T0 + 8_000,
                    vec![(u, Epoch(1)), (u, Epoch(0)), (UserId(99), Epoch(1))]
                )
            )
            .await,
            StoreReply::LeasesRefreshed(vec![
                (u, LeaseRefresh::Refreshed),
                (u, LeaseRefresh::Superseded { current: Epoch(1) }),
                (UserId(99), LeaseRefresh::Gone),
            ])
        );
        assert_eq!(lease(d.run(now, load.clone()).await), Some(T0 + 8_000));
        // Refresh never shortens either; another server cannot refresh our claim.
        assert_eq!(
            d.run(T0 + 4_000, refresh("s1", T0 + 6_000, vec![(u, Epoch(1))]))
                .await,
            StoreReply::LeasesRefreshed(vec![(u, LeaseRefresh::Refreshed)])
        );
        assert_eq!(
            d.run(T0 + 4_000, refresh("s2", T0 + 9_000, vec![(u, Epoch(1))]))
                .await,
            StoreReply::LeasesRefreshed(vec![(u, LeaseRefresh::Gone)])
        );
        assert_eq!(lease(d.run(now, load.clone()).await), Some(T0 + 8_000));
        assert_eq!(
            d.run(T0, refresh("s1", T0 + 9_000, vec![])).await,
            StoreReply::LeasesRefreshed(vec![])
        );

        // Expiry by `now`: a late refresh is Gone and revives nothing, routes read offline,
        // bind is refused.
        let expired = T0 + 8_000;
        assert_eq!(
            d.run(expired, refresh("s1", T0 + 20_000, vec![(u, Epoch(1))]))
                .await,
            StoreReply::LeasesRefreshed(vec![(u, LeaseRefresh::Gone)])
        );
        assert_eq!(lease(d.run(expired, load.clone()).await), Some(T0 + 8_000));
        assert_eq!(
            d.run(expired - 1, routes.clone()).await,
            StoreReply::Routes(vec![(u, Some(record))])
        );
        assert_eq!(
            d.run(expired, routes.clone()).await,
            StoreReply::Routes(vec![(u, None)])
        );
        assert_eq!(
            d.run(expired, bind(1, "s1", T0 + 20_000)).await,
            StoreReply::SessionBound(Err(Epoch(1)))
        );

        // Release: stale and future epochs do nothing; the exact one deletes claim and route.
        let release = |epoch| StoreCommand::ReleaseClaim {
            user: u,
            epoch: Epoch(epoch),
        };
        for (epoch, released) in [(0, false), (2, false), (1, true), (1, false)] {
            assert_eq!(
                d.run(expired, release(epoch)).await,
                StoreReply::ClaimReleased { released },
                "release {epoch}"
            );
        }
        assert_eq!(
            d.run(expired, load.clone()).await,
            StoreReply::Claim(state(1, None))
        );
        // The counter survives the claim: a released user's stale refresh is Gone, an older
        // one Superseded.
        assert_eq!(
            d.run(
                expired,
                refresh("s1", T0 + 20_000, vec![(u, Epoch(1)), (u, Epoch(0))])
            )
            .await,
            StoreReply::LeasesRefreshed(vec![
                (u, LeaseRefresh::Gone),
                (u, LeaseRefresh::Superseded { current: Epoch(1) }),
            ])
        );
        assert_eq!(
            d.run(expired, release(1)).await,
            StoreReply::ClaimReleased { released: false }
        );
        assert_eq!(
            d.run(
                expired,
                StoreCommand::ReleaseClaim {
                    user: UserId(99),
                    epoch: Epoch(0)
                }
            )
            .await,
            StoreReply::ClaimReleased { released: false }
        );
    }

    pub async fn claims_takeover_hides_the_old_route(d: &mut Driver<'_>) {
        let u = UserId(7);
        let now = T0 + 100;
        let replace = |expected, c| StoreCommand::ReplaceClaim {
            user: u,
            expected: Epoch(expected),
            claim: c,
        };
        let bind = |epoch, server: &str| StoreCommand::BindSession {
            user: u,
            epoch: Epoch(epoch),
            server: s(server),
            lease_until: UnixMillis(T0 + 1_000),
        };
        d.run(now, replace(0, claim(1, "s1", T0 + 1_000, 1))).await;
        assert_eq!(
            d.run(now, bind(1, "s1")).await,
            StoreReply::SessionBound(Ok(()))
        );
        assert_eq!(
            d.run(now, replace(1, claim(2, "s2", T0 + 1_000, 2))).await,
            StoreReply::ClaimReplaced(Ok(Some(claim(1, "s1", T0 + 1_000, 1))))
        );
        let routes = StoreCommand::LoadRoutes { users: vec![u] };
        assert_eq!(
            d.run(now, routes.clone()).await,
            StoreReply::Routes(vec![(u, None)])
        );
        // The old server's cleanup and refresh cannot touch the new claim.
        assert_eq!(
            d.run(
                now,
                StoreCommand::ReleaseClaim {
                    user: u,
                    epoch: Epoch(1)
                }
            )
            .await,
            StoreReply::ClaimReleased { released: false }
        );
        assert_eq!(
            d.run(
                now,
                StoreCommand::RefreshLeases {
                    server: s("s1"),
                    lease_until: UnixMillis(T0 + 9_000),
                    sessions: vec![(u, Epoch(1))],
                }
            )
            .await,
            StoreReply::LeasesRefreshed(vec![(u, LeaseRefresh::Superseded { current: Epoch(2) })])
        );
        assert_eq!(
            d.run(now, bind(1, "s1")).await,
            StoreReply::SessionBound(Err(Epoch(2)))
        );
        assert_eq!(
            d.run(now, StoreCommand::LoadClaim { user: u }).await,
            StoreReply::Claim(state(2, Some(claim(2, "s2", T0 + 1_000, 2))))
        );
        assert_eq!(
            d.run(now, bind(2, "s2")).await,
            StoreReply::SessionBound(Ok(()))
        );
        assert_eq!(
            d.run(now, routes).await,
            StoreReply::Routes(vec![(
                u,
                Some(RouteRecord {
                    server: s("s2"),
                    epoch: Epoch(2)
                })
            )])
        );
    }

    pub async fn online_lists_users_with_live_bound_routes(d: &mut Driver<'_>) {
        for name in ["alice", "bob", "carol", "dave"] {
            d.register(name).await;
        }
        let list = |limit| StoreCommand::ListOnline { limit };
        assert_eq!(d.run(T0, list(10)).await, StoreReply::Online(vec![]));
        // alice on s1 (long lease), bob on s2 (short lease), carol claimed but never bound,
        // dave taken over (his record names the old epoch), user 9 has no account.
        let sessions: &[(u64, &str, u64, bool)] = &[
            (1, "s1", 6_000, true),
            (2, "s2", 2_000, true),
            (3, "s1", 6_000, false),
            (4, "s2", 6_000, true),
            (9, "s1", 6_000, true),
        ];
        for &(user, server, lease, bind) in sessions {
            let u = UserId(user);
            d.run(
                T0,
                StoreCommand::ReplaceClaim {
                    user: u,
                    expected: Epoch(0),
                    claim: claim(1, server, T0 + lease, 1),
                },
            )
            .await;
            if bind {
                d.run(
                    T0,
                    StoreCommand::BindSession {
                        user: u,
                        epoch: Epoch(1),
                        server: s(server),
                        lease_until: UnixMillis(T0),
                    },
                )
                .await;
            }
        }
        d.run(
            T0,
            StoreCommand::ReplaceClaim {
                user: UserId(4),
                expected: Epoch(1),
                claim: claim(2, "s1", T0 + 6_000, 2),
            },
        )
        .await;
        let entry = |user, name: &str, server| OnlineEntry {
            user: UserId(user),
            name: name.into(),
            server: s(server),
        };
        assert_eq!(
            d.run(T0, list(10)).await,
            StoreReply::Online(vec![entry(1, "alice", "s1"), entry(2, "bob", "s2")])
        );
        // bob's lease ran out.
        assert_eq!(
            d.run(T0 + 2_000, list(10)).await,
            StoreReply::Online(vec![entry(1, "alice", "s1")])
        );
        assert_eq!(d.run(T0, list(0)).await, StoreReply::Online(vec![]));
        assert_eq!(
            d.run(T0 + 6_000, list(10)).await,
            StoreReply::Online(vec![])
        );
    }

    pub async fn routes_only_for_live_matching_claims(d: &mut Driver<'_>) {
        // Users 1..=3 with claims of different lease lengths, user 4 released, 5 unknown.
        for (user, lease) in [(1u64, 2_000u64), (2, 4_000), (3, 6_000), (4, 6_000)] {
            let u = UserId(user);
            d.run(
                T0,
                StoreCommand::ReplaceClaim {
                    user: u,
                    expected: Epoch(0),
                    claim: claim(1, "s1", T0 + lease, 1),
                },
            )
            .await;
            d.run(
                T0,
                StoreCommand::BindSession {
                    user: u,
                    epoch: Epoch(1),
                    server: s("s1"),
                    lease_until: UnixMillis(T0),
                },
            )
            .await;
        }
        d.run(
            T0,
            StoreCommand::ReleaseClaim {
                user: UserId(4),
                epoch: Epoch(1),
            },
        )
        .await;
        let users: Vec<UserId> = (1..=5).map(UserId).chain([UserId(1)]).collect();
        let live = |ids: &[u64]| -> StoreReply {
            StoreReply::Routes(
                users
                    .iter()
                    .map(|u| {
                        let record = ids.contains(&u.0).then(|| RouteRecord {
                            server: s("s1"),
                            epoch: Epoch(1),
                        });
                        (*u, record)
                    })
                    .collect(),
            )
        };
        let load = StoreCommand::LoadRoutes {
            users: users.clone(),
        };
        // (now, users still routed)
        let table: &[(u64, &[u64])] = &[
            (T0, &[1, 2, 3]),
            (T0 + 1_999, &[1, 2, 3]),
            (T0 + 2_000, &[2, 3]),
            (T0 + 4_000, &[3]),
            (T0 + 6_000, &[]),
        ];
        for (now, ids) in table {
            assert_eq!(d.run(*now, load.clone()).await, live(ids), "at {now}");
        }
        assert_eq!(
            d.run(T0, StoreCommand::LoadRoutes { users: vec![] }).await,
            StoreReply::Routes(vec![])
        );
    }

    /// An append's reply may carry what its push needs, read in the same step: a group's
    /// members (every backend), a private conversation's route records (not on a cluster:
    /// they live in other slots; where given, `Driver::run` checks them against
    /// `LoadRoutes`). A duplicate carries them too.
    pub async fn an_append_reads_its_push_recipients(d: &mut Driver<'_>) {
        let (a, b, c) = (
            d.register("a").await,
            d.register("b").await,
            d.register("c").await,
        );
        d.run(
            T0,
            StoreCommand::ReplaceClaim {
                user: b,
                expected: Epoch(0),
                claim: claim(1, "s1", T0 + 2_000, 1),
            },
        )
        .await;
        d.run(
            T0,
            StoreCommand::BindSession {
                user: b,
                epoch: Epoch(1),
                server: s("s1"),
                lease_until: UnixMillis(T0),
            },
        )
        .await;
        let bound = Some(RouteRecord {
            server: s("s1"),
            epoch: Epoch(1),
        });
        let private = ConvId::private(a, b).expect("two users");
        let (low, high) = if a < b { (a, b) } else { (b, a) };
        let record = |user| if user == b { bound.clone() } else { None };
        let group = ConvId::group("push").expect("a group name");
        let create = StoreCommand::CreateGroup {
            conv: group.clone(),
            owner: c,
        };
        d.run(T0, create).await;
        let join = StoreCommand::JoinGroup {
            conv: group.clone(),
            user: a,
        };
        d.run(T0, join).await;
        let mut members = vec![a, c];
        members.sort();
        // A group's version after one join (its log epoch is checked apart: drawn at random).
        let group_members = |members| Recipients::Members {
            version: MembersVersion {
                log_epoch: LogEpoch(0),
                changes: 1,
            },
            members,
        };
        // (now, conversation, msg id, recipients when read)
        let cases = [
            (
                T0,
                &private,
                1,
                Recipients::Routes(vec![(low, record(low)), (high, record(high))]),
            ),
            (
                T0 + 1,
                &private,
                1,
                Recipients::Routes(vec![(low, record(low)), (high, record(high))]),
            ),
            (
                T0 + 2_000,
                &private,
                2,
                Recipients::Routes(vec![(low, None), (high, None)]),
            ),
            (T0, &group, 3, group_members(members.clone())),
            (T0 + 1, &group, 3, group_members(members)),
        ];
        for (now, conv, id, want) in cases {
            let command = StoreCommand::Append {
                conv: conv.clone(),
                sender: a,
                msg_id: ClientMsgId(id),
                body: Bytes::from_static(b"m"),
                now: UnixMillis(now),
                order: None,
                members_known: None,
            };
            match d.run(now, command).await {
                StoreReply::Appended(Ok(appended)) => match appended.recipients {
                    None if matches!(conv, ConvId::Private { .. }) => {}
                    Some(Recipients::Members { version, members }) => {
                        assert_eq!(version.log_epoch, appended.message.log_epoch);
                        let version = MembersVersion {
                            log_epoch: LogEpoch(0),
                            ..version
                        };
                        let got = Recipients::Members { version, members };
                        assert_eq!(got, want, "{conv} at {now}");
                    }
                    got => assert_eq!(got, Some(want), "{conv} at {now}"),
                },
                other => panic!("{other:?}"),
            }
        }
    }

    /// An append that names the group's membership version it holds is answered "unchanged"
    /// while no join, leave or account deletion came between; each change gives a new
    /// version (and the members); a join of a member or a leave of a non-member changes
    /// nothing. A version of another log epoch is never confirmed.
    pub async fn a_member_list_is_confirmed_until_the_membership_changes(d: &mut Driver<'_>) {
        let (a, b, c, outsider) = (
            d.register("a").await,
            d.register("b").await,
            d.register("c").await,
            d.register("outsider").await,
        );
        let group = ConvId::group("versions").expect("a group name");
        let create = StoreCommand::CreateGroup {
            conv: group.clone(),
            owner: a,
        };
        d.group(create).await;
        let join = |user| StoreCommand::JoinGroup {
            conv: group.clone(),
            user,
        };
        let leave = |user| StoreCommand::LeaveGroup {
            conv: group.clone(),
            user,
        };
        let mut id = 0;
        let mut append = async |d: &mut Driver<'_>, known| {
            id += 1;
            d.group_append(&group, a, id, known).await
        };
        let listed = |recipients| match recipients {
            Recipients::Members { version, members } => (version, members),
            other => panic!("expected the members, got {other:?}"),
        };
        let (mut known, members) = listed(append(d, None).await);
        assert_eq!(members, [a]);
        let sorted = |users: &[UserId]| {
            let mut users = users.to_vec();
            users.sort();
            users
        };
        let changes = [
            ("join b", join(b), sorted(&[a, b])),
            ("join c", join(c), sorted(&[a, b, c])),
            ("leave b", leave(b), sorted(&[a, c])),
            ("delete c", StoreCommand::DeleteAccount { user: c }, vec![a]),
        ];
        for (name, change, want) in changes {
            assert_eq!(
                append(d, Some(known)).await,
                Recipients::MembersUnchanged(known),
                "before {name}"
            );
            d.group(change.clone()).await;
            let (version, members) = listed(append(d, Some(known)).await);
            assert_ne!(version, known, "{name}");
            assert_eq!(members, want, "{name}");
            // Again (a no-op now), and a leave of a non-member: no change.
            d.group(change).await;
            d.group(leave(outsider)).await;
            known = version;
        }
        assert_eq!(
            append(d, Some(known)).await,
            Recipients::MembersUnchanged(known)
        );
        let elsewhere = MembersVersion {
            log_epoch: LogEpoch(known.log_epoch.0 ^ 1),
            ..known
        };
        assert_eq!(listed(append(d, Some(elsewhere)).await), (known, vec![a]));
    }

    pub async fn append_membership_and_unknown_conversations(d: &mut Driver<'_>) {
        let (a, b, c) = (
            d.register("a").await,
            d.register("b").await,
            d.register("c").await,
        );
        let private = ConvId::private(a, b).unwrap();
        assert_eq!(d.append(T0, &private, a, 1, "x").await, Ok((1, false, T0)));
        assert_eq!(
            d.append(T0, &private, c, 2, "x").await,
            Err(AppendError::NotMember)
        );
        // Unknown peer: unknown conversation, even for a participant.
        let stranger = ConvId::private(a, UserId(99)).unwrap();
        assert_eq!(
            d.append(T0, &stranger, a, 3, "x").await,
            Err(AppendError::UnknownConversation)
        );
        let group = ConvId::group("rust").unwrap();
        assert_eq!(
            d.append(T0, &group, a, 4, "x").await,
            Err(AppendError::UnknownConversation)
        );
        d.group(StoreCommand::CreateGroup {
            conv: group.clone(),
            owner: a,
        })
        .await;
        assert_eq!(
            d.append(T0, &group, b, 5, "x").await,
            Err(AppendError::NotMember)
        );
        assert_eq!(d.append(T0, &group, a, 6, "x").await, Ok((1, false, T0)));
        // Everyone with an account may post to `all`; nobody else.
        assert_eq!(
            d.append(T0, &ConvId::All, c, 7, "x").await,
            Ok((1, false, T0))
        );
        assert_eq!(
            d.append(T0, &ConvId::All, UserId(99), 8, "x").await,
            Err(AppendError::NotMember)
        );
        // A non-member's retry of an id is still refused (membership comes first).
        d.group(StoreCommand::LeaveGroup {
            conv: group.clone(),
            user: a,
        })
        .await;
        assert_eq!(
            d.append(T0, &group, a, 6, "x").await,
            Err(AppendError::NotMember)
        );
        // Heads: the private conversation shows up for its two users only; the failed
        // appends left nothing visible.
        let convs = |heads: Vec<ConvHead>| heads.into_iter().map(|h| h.conv).collect::<Vec<_>>();
        assert_eq!(convs(d.heads(b).await), vec![ConvId::All, private.clone()]);
        assert_eq!(convs(d.heads(c).await), vec![ConvId::All]);
        assert_eq!(convs(d.heads(a).await), vec![ConvId::All, private]);
        assert_eq!(d.heads(UserId(99)).await, vec![]);
        assert_eq!(
            d.run(T0, StoreCommand::LoadMembers { conv: group }).await,
            StoreReply::Members(vec![])
        );
    }

    pub async fn append_idempotency_and_ttl_by_now(d: &mut Driver<'_>) {
        let (a, b) = (d.register("a").await, d.register("b").await);
        let p = ConvId::private(a, b).unwrap();
        // (at ms after T0, sender, id, body) -> (seq, duplicate, appended at) or error
        type Step = (
            u64,
            UserId,
            u128,
            &'static str,
            Result<(u64, bool, u64), AppendError>,
        );
        let steps: Vec<Step> = vec![
            (0, a, 10, "hi", Ok((1, false, T0))),
            (1, b, 10, "yo", Ok((2, false, T0 + 1))), // same id, other sender: new
            (2, a, 11, "hi", Ok((3, false, T0 + 2))), // same body, other id: new
            (3, a, 10, "hi", Ok((1, true, T0))),      // retry: the original
            (4, a, 10, "HI", Err(AppendError::ConflictingRetry)),
        ];
        let late: Vec<Step> = vec![
            (TTL_MS - 1, a, 10, "hi", Ok((1, true, T0))), // just inside the TTL
            (TTL_MS, a, 10, "hi", Ok((4, false, T0 + TTL_MS))), // expired: a new message
            (TTL_MS + 5, a, 10, "hi", Ok((4, true, T0 + TTL_MS))), // with a new record
            (
                TTL_MS + 6,
                a,
                11,
                "changed",
                Ok((5, false, T0 + TTL_MS + 6)),
            ),
        ];
        for (i, (at, sender, id, body, want)) in steps.into_iter().enumerate() {
            assert_eq!(
                d.append(T0 + at, &p, sender, id, body).await,
                want,
                "step {i}"
            );
        }
        // The duplicate answer carries the retry's body, the original's seq and time.
        match d
            .run(
                T0 + 5,
                StoreCommand::Append {
                    conv: p.clone(),
                    sender: b,
                    msg_id: ClientMsgId(10),
                    body: Bytes::from_static(b"yo"),
                    now: UnixMillis(T0 + 5),
                    order: None,
                    members_known: None,
                },
            )
            .await
        {
            StoreReply::Appended(Ok(appended)) => {
                assert!(appended.duplicate);
                assert_eq!(appended.message.conv, p);
                assert_eq!(&appended.message.body[..], b"yo");
                assert_eq!(appended.message.appended_at, UnixMillis(T0 + 1));
            }
            other => panic!("{other:?}"),
        }
        // Time only moves forward from here: the reference expires records by the newest
        // `now` it has seen, Redis by each append's own `now`.
        for (i, (at, sender, id, body, want)) in late.into_iter().enumerate() {
            assert_eq!(
                d.append(T0 + at, &p, sender, id, body).await,
                want,
                "late step {i}"
            );
        }
    }

    pub async fn append_keeps_each_stream_in_order(d: &mut Driver<'_>) {
        let (a, b) = (d.register("a").await, d.register("b").await);
        let p = ConvId::private(a, b).unwrap();
        // (at ms after T0, sender, msg id, (stream, order seq, after)) -> seq or error
        type Step = (u64, UserId, u128, (u64, u64, u64), Result<u64, AppendError>);
        let steps: Vec<Step> = vec![
            (0, a, 2, (7, 2, 1), Err(AppendError::OutOfOrder)), // overtook 1
            (1, a, 1, (7, 1, 0), Ok(1)),
            (2, a, 2, (7, 2, 1), Ok(2)),
            (3, a, 1, (7, 1, 0), Ok(1)), // a resend: the original seq
            (4, b, 9, (7, 5, 4), Err(AppendError::OutOfOrder)), // b's stream 7 is b's own
            (5, a, 4, (7, 4, 3), Err(AppendError::OutOfOrder)),
            (6, a, 4, (7, 4, 0), Ok(3)), // 3 was given up
            (7, a, 3, (7, 3, 2), Err(AppendError::Superseded)), // 3, late
            (8, a, 20, (8, 1, 0), Ok(4)), // another stream of a
            (9, b, 9, (7, 5, 0), Ok(5)),
            // Order records expire with the idempotency TTL after their last write.
            (TTL_MS + 5, a, 6, (7, 6, 4), Ok(6)),
            (TTL_MS + 6, a, 8, (7, 8, 6), Ok(7)),
            (
                2 * TTL_MS + 6,
                a,
                9,
                (7, 9, 8),
                Err(AppendError::OutOfOrder),
            ),
            (2 * TTL_MS + 7, a, 9, (7, 9, 0), Ok(8)),
        ];
        for (i, (at, sender, id, order, want)) in steps.into_iter().enumerate() {
            assert_eq!(
                d.append_ordered(T0 + at, &p, sender, id, order).await,
                want,
                "step {i}"
            );
        }
    }

    pub async fn append_trims_and_moves_first_available(d: &mut Driver<'_>) {
        let a = d.register("a").await;
        for i in 1..=5u64 {
            assert_eq!(
                d.append(T0 + i, &ConvId::All, a, u128::from(i), "m").await,
                Ok((i, false, T0 + i))
            );
        }
        let head = d.head_of(a, &ConvId::All).await.unwrap();
        assert_eq!(
            (head.head_seq, head.first_available_seq, head.cursor_seq),
            (5, 3, 0)
        );
        // fetch table: (after, limit) -> seqs
        let cases: &[(u64, u32, &[u64])] = &[
            (0, 10, &[3, 4, 5]),
            (3, 10, &[4, 5]),
            (4, 1, &[5]),
            (2, 2, &[3, 4]),
            (5, 10, &[]),
            (99, 10, &[]),
            (0, 0, &[]),
            (u64::MAX, 10, &[]),
        ];
        for (after, limit, want) in cases {
            let (_, seqs) = d
                .fetch(a, &ConvId::All, head.log_epoch, *after, *limit)
                .await;
            assert_eq!(seqs, *want, "after {after} limit {limit}");
        }
        // A retry of a trimmed message answers its original seq and time, stores nothing.
        assert_eq!(
            d.append(T0 + 9, &ConvId::All, a, 1, "m").await,
            Ok((1, true, T0 + 1))
        );
        let again = d.head_of(a, &ConvId::All).await.unwrap();
        assert_eq!((again.head_seq, again.first_available_seq), (5, 3));
    }

    pub async fn fetch_windows_and_log_epoch_mismatch(d: &mut Driver<'_>) {
        let (a, b, c) = (
            d.register("a").await,
            d.register("b").await,
            d.register("c").await,
        );
        let p = ConvId::private(a, b).unwrap();
        // No log yet: an empty head, no messages.
        let (head, seqs) = d.fetch(a, &p, LogEpoch(1), 0, 10).await;
        assert_eq!(
            head,
            ConvHead {
                conv: p.clone(),
                log_epoch: LogEpoch(0),
                head_seq: 0,
                first_available_seq: 1,
                cursor_seq: 0,
                carried_from: LogEpoch(0),
                carried_up_to: 0,
            }
        );
        assert!(seqs.is_empty());
        for i in 1..=3 {
            d.append(T0, &p, a, i, "m").await.unwrap();
        }
        let epoch = d.head_of(b, &p).await.unwrap().log_epoch;
        assert_eq!(d.fetch(b, &p, epoch, 0, 10).await.1, vec![1, 2, 3]);
        assert_eq!(d.fetch(b, &p, epoch, 1, 1).await.1, vec![2]);
        // Another log epoch: only the current head comes back.
        let (head, seqs) = d.fetch(b, &p, LogEpoch(epoch.0 ^ 1), 0, 10).await;
        assert!(seqs.is_empty());
        assert_eq!((head.log_epoch, head.head_seq), (epoch, 3));
        // A non-participant learns nothing (`fetch_by_an_outsider_tells_nothing`).
        assert_eq!(
            d.fetch_reply(c, &p, epoch, 0, 10).await,
            StoreReply::NotMember
        );
        // `all`: members are the users with accounts.
        d.append(T0, &ConvId::All, c, 1, "m").await.unwrap();
        let all = d.head_of(c, &ConvId::All).await.unwrap().log_epoch;
        assert_eq!(d.fetch(a, &ConvId::All, all, 0, 10).await.1, vec![1]);
        // A group's non-member reads nothing.
        let g = ConvId::group("g").unwrap();
        d.group(StoreCommand::CreateGroup {
            conv: g.clone(),
            owner: a,
        })
        .await;
        d.append(T0, &g, a, 9, "m").await.unwrap();
        let ge = d.head_of(a, &g).await.unwrap().log_epoch;
        assert_eq!(d.fetch(a, &g, ge, 0, 10).await.1, vec![1]);
        assert_ne!(ge, epoch, "each log has its own epoch");
    }

    /// HTTP `/history` answers 403 to a conversation the user is not in; the store's Fetch
    /// (which the gateway's FetchRequest uses) tells such a user nothing either: not the
    /// messages, and not the head (log epoch, head seq, first available seq).
    pub async fn fetch_by_an_outsider_tells_nothing(d: &mut Driver<'_>) {
        let (a, b, c) = (
            d.register("a").await,
            d.register("b").await,
            d.register("c").await,
        );
        let p = ConvId::private(a, b).unwrap();
        let g = ConvId::group("g").unwrap();
        // Before any log exists.
        d.assert_outsider(c, p.clone(), LogEpoch(0)).await;
        d.assert_outsider(c, g.clone(), LogEpoch(0)).await;
        d.assert_outsider(UserId(99), ConvId::All, LogEpoch(0))
            .await;
        // With logs, guessing the right epoch or not.
        d.append(T0, &p, a, 1, "secret").await.unwrap();
        d.append(T0, &ConvId::All, a, 2, "hello").await.unwrap();
        d.group(StoreCommand::CreateGroup {
            conv: g.clone(),
            owner: a,
        })
        .await;
        d.append(T0, &g, a, 3, "secret").await.unwrap();
        let pe = d.head_of(a, &p).await.unwrap().log_epoch;
        let ge = d.head_of(a, &g).await.unwrap().log_epoch;
        let ae = d.head_of(a, &ConvId::All).await.unwrap().log_epoch;
        for epoch in [LogEpoch(0), pe] {
            d.assert_outsider(c, p.clone(), epoch).await;
        }
        for epoch in [LogEpoch(0), ge] {
            d.assert_outsider(c, g.clone(), epoch).await;
        }
        d.assert_outsider(UserId(99), ConvId::All, ae).await;
        // A member who left is an outsider again.
        d.group(StoreCommand::JoinGroup {
            conv: g.clone(),
            user: b,
        })
        .await;
        assert!(matches!(
            d.fetch_reply(b, &g, ge, 0, 10).await,
            StoreReply::Fetched { .. }
        ));
        d.group(StoreCommand::LeaveGroup {
            conv: g.clone(),
            user: b,
        })
        .await;
        d.assert_outsider(b, g.clone(), ge).await;
        // Members and parties still read.
        assert_eq!(d.fetch(b, &p, pe, 0, 10).await.1, vec![1]);
        assert_eq!(d.fetch(a, &g, ge, 0, 10).await.1, vec![1]);
        assert_eq!(d.fetch(c, &ConvId::All, ae, 0, 10).await.1, vec![1]);
    }

    pub async fn heads_with_join_seqs(d: &mut Driver<'_>) {
        let (a, b) = (d.register("a").await, d.register("b").await);
        let g = ConvId::group("g").unwrap();
        d.group(StoreCommand::CreateGroup {
            conv: g.clone(),
            owner: a,
        })
        .await;
        // An empty group's log is reported to its owner.
        let head = d.head_of(a, &g).await.unwrap();
        assert_eq!(
            (head.head_seq, head.first_available_seq, head.cursor_seq),
            (0, 1, 0)
        );
        for id in 1..=3 {
            d.append(T0, &g, a, id, "m").await.unwrap();
        }
        assert_eq!(
            d.group(StoreCommand::JoinGroup {
                conv: g.clone(),
                user: b
            })
            .await,
            StoreReply::GroupJoined(Some(3))
        );
        d.append(T0, &g, a, 4, "m").await.unwrap();
        let head = d.head_of(b, &g).await.unwrap();
        assert_eq!(
            (head.head_seq, head.first_available_seq, head.cursor_seq),
            (4, 4, 3)
        );
        let (_, seqs) = d.fetch(b, &g, head.log_epoch, 0, 100).await;
        assert_eq!(seqs, vec![4]);
        // The owner sees the trimmed log (MAX_LOG = 3) from its own join seq 0.
        let owner = d.head_of(a, &g).await.unwrap();
        assert_eq!((owner.first_available_seq, owner.cursor_seq), (2, 0));
        // Leaving hides the group from heads and ends posting rights; re-joining starts at
        // the head of that moment.
        assert_eq!(
            d.group(StoreCommand::LeaveGroup {
                conv: g.clone(),
                user: b
            })
            .await,
            StoreReply::GroupLeft { was_member: true }
        );
        assert_eq!(d.head_of(b, &g).await, None);
        assert_eq!(
            d.append(T0, &g, b, 9, "m").await,
            Err(AppendError::NotMember)
        );
        d.append(T0, &g, a, 5, "m").await.unwrap();
        assert_eq!(
            d.group(StoreCommand::JoinGroup {
                conv: g.clone(),
                user: b
            })
            .await,
            StoreReply::GroupJoined(Some(5))
        );
        let head = d.head_of(b, &g).await.unwrap();
        assert_eq!(
            (head.head_seq, head.first_available_seq, head.cursor_seq),
            (5, 6, 5)
        );
    }

    pub async fn cursors_only_move_forward(d: &mut Driver<'_>) {
        let (a, b) = (d.register("a").await, d.register("b").await);
        for id in 1..=5 {
            d.append(T0, &ConvId::All, a, id, "m").await.unwrap();
        }
        let epoch = d.head_of(a, &ConvId::All).await.unwrap().log_epoch;
        let advance = |user, cursors| StoreCommand::AdvanceCursors { user, cursors };
        let all = ConvId::All;
        for cursors in [
            vec![(all.clone(), epoch, 4)],
            vec![(all.clone(), epoch, 2)],
            vec![(all.clone(), LogEpoch(epoch.0 ^ 1), 5)],
            // No log there: ignored.
            vec![(ConvId::private(a, b).unwrap(), epoch, 9)],
            vec![],
        ] {
            assert_eq!(
                d.run(T0, advance(a, cursors)).await,
                StoreReply::CursorsAdvanced
            );
        }
        assert_eq!(d.head_of(a, &all).await.unwrap().cursor_seq, 4);
        // Cursors are per user; in one batch they apply in order.
        assert_eq!(d.head_of(b, &all).await.unwrap().cursor_seq, 0);
        d.run(
            T0,
            advance(b, vec![(all.clone(), epoch, 3), (all.clone(), epoch, 1)]),
        )
        .await;
        assert_eq!(d.head_of(b, &all).await.unwrap().cursor_seq, 3);
        // A cursor past the head is kept as given (the reference does not clamp), even u64::MAX.
        d.run(T0, advance(b, vec![(all.clone(), epoch, u64::MAX)]))
            .await;
        assert_eq!(d.head_of(b, &all).await.unwrap().cursor_seq, u64::MAX);
        let (head, _) = d.fetch(a, &all, epoch, 0, 0).await;
        assert_eq!(head.cursor_seq, 4);
    }

    pub async fn groups_create_join_leave(d: &mut Driver<'_>) {
        let (a, b, c) = (
            d.register("a").await,
            d.register("b").await,
            d.register("c").await,
        );
        let g = ConvId::group("g").unwrap();
        let members = |conv: &ConvId| StoreCommand::LoadMembers { conv: conv.clone() };
        let cases: Vec<(StoreCommand, StoreReply)> = vec![
            (
                StoreCommand::JoinGroup {
                    conv: g.clone(),
                    user: b,
                },
                StoreReply::GroupJoined(None),
            ),
            (
                StoreCommand::CreateGroup {
                    conv: g.clone(),
                    owner: c,
                },
                StoreReply::GroupCreated { created: true },
            ),
            (
                StoreCommand::CreateGroup {
                    conv: g.clone(),
                    owner: a,
                },
                StoreReply::GroupCreated { created: false },
            ),
            (
                StoreCommand::CreateGroup {
                    conv: ConvId::All,
                    owner: a,
                },
                StoreReply::GroupCreated { created: false },
            ),
            (
                StoreCommand::JoinGroup {
                    conv: g.clone(),
                    user: a,
                },
                StoreReply::GroupJoined(Some(0)),
            ),
            (
                StoreCommand::JoinGroup {
                    conv: g.clone(),
                    user: a,
                },
                StoreReply::GroupJoined(Some(0)),
            ),
            (
                StoreCommand::JoinGroup {
                    conv: ConvId::All,
                    user: a,
                },
                StoreReply::GroupJoined(None),
            ),
            (
                StoreCommand::JoinGroup {
                    conv: ConvId::private(a, b).unwrap(),
                    user: a,
                },
                StoreReply::GroupJoined(None),
            ),
            (members(&g), StoreReply::Members(vec![a, c])),
            (members(&ConvId::All), StoreReply::Members(vec![])),
            (
                members(&ConvId::private(c, a).unwrap()),
                StoreReply::Members(vec![a, c]),
            ),
            (
                members(&ConvId::group("none").unwrap()),
                StoreReply::Members(vec![]),
            ),
            (
                StoreCommand::LeaveGroup {
                    conv: g.clone(),
                    user: b,
                },
                StoreReply::GroupLeft { was_member: false },
            ),
            (
                StoreCommand::LeaveGroup {
                    conv: ConvId::All,
                    user: a,
                },
                StoreReply::GroupLeft { was_member: false },
            ),
            (
                StoreCommand::LeaveGroup {
                    conv: g.clone(),
                    user: c,
                },
                StoreReply::GroupLeft { was_member: true },
            ),
            (
                StoreCommand::LeaveGroup {
                    conv: g.clone(),
                    user: a,
                },
                StoreReply::GroupLeft { was_member: true },
            ),
            // An emptied group still exists.
            (members(&g), StoreReply::Members(vec![])),
            (
                StoreCommand::CreateGroup {
                    conv: g.clone(),
                    owner: b,
                },
                StoreReply::GroupCreated { created: false },
            ),
            (
                StoreCommand::JoinGroup {
                    conv: g.clone(),
                    user: b,
                },
                StoreReply::GroupJoined(Some(0)),
            ),
        ];
        for (i, (command, want)) in cases.into_iter().enumerate() {
            assert_eq!(d.group(command).await, want, "case {i}");
        }
    }
}

// --- randomized: the same command sequence on both --------------------------------------

/// Commands from a small space (few users, convs, ids, servers) so they collide often; log
/// epochs in `Fetch`/`AdvanceCursors` are normalised indices the driver maps to its own.
fn random_command(rng: &mut ChaCha8Rng, now: u64) -> StoreCommand {
    let user = |rng: &mut ChaCha8Rng| UserId(rng.random_range(1..=5));
    let conv = |rng: &mut ChaCha8Rng| match rng.random_range(0..6) {
        0 => ConvId::All,
        1 => ConvId::group("a").unwrap(),
        2 => ConvId::group("b").unwrap(),
        3 => ConvId::private(UserId(1), UserId(2)).unwrap(),
        4 => ConvId::private(UserId(2), UserId(3)).unwrap(),
        _ => ConvId::private(UserId(1), UserId(5)).unwrap(),
    };
    let server = |rng: &mut ChaCha8Rng| ServerId(format!("s{}", rng.random_range(0..2)));
    // Claims: two users, few epochs and long leases, so compare-epoch steps often succeed.
    let claimant = |rng: &mut ChaCha8Rng| UserId(rng.random_range(1..=2));
    let epoch = |rng: &mut ChaCha8Rng| Epoch(rng.random_range(0..3));
    let lease = |rng: &mut ChaCha8Rng| UnixMillis(now + rng.random_range(0..300));
    // Mostly the conversation's current epoch as the driver last saw it, else any.
    let log_epoch = |rng: &mut ChaCha8Rng| match rng.random_range(0..5) {
        0 => LogEpoch(rng.random_range(0..5)),
        _ => CURRENT,
    };
    // Names in either case: `n1` and `N1` are one name.
    let name = |rng: &mut ChaCha8Rng| {
        let first = if rng.random_range(0..2) == 0 {
            'n'
        } else {
            'N'
        };
        format!("{first}{}", rng.random_range(0..5))
    };
    // Resumption secrets: a few hashes, so compares often match.
    let secret = |rng: &mut ChaCha8Rng| [rng.random_range(0..3u8) | 0x40; 32];
    let stored_secret = |rng: &mut ChaCha8Rng| {
        (rng.random_range(0..4) > 0).then(|| ResumeSecret {
            hash: secret(rng),
            expires_at: UnixMillis(now + rng.random_range(0..300)),
        })
    };
    match rng.random_range(0..23) {
        21 => {
            let expected = epoch(rng);
            StoreCommand::ResumeClaim {
                user: claimant(rng),
                expected,
                secret: secret(rng),
                claim: Claim {
                    resume_secret: stored_secret(rng),
                    epoch: Epoch(expected.0 + u64::from(rng.random_range(0..5) > 0)),
                    server: server(rng),
                    lease_until: lease(rng),
                    resume_token_hash: [rng.random_range(0..3); 32],
                },
            }
        }
        22 => StoreCommand::RevokeResumption {
            user: claimant(rng),
        },
        0 => StoreCommand::RegisterAccount {
            name: name(rng),
            password_hash: format!("h{}", rng.random_range(0..2)),
        },
        17 => StoreCommand::LoadAccountByName { name: name(rng) },
        18 => StoreCommand::SetPassword {
            user: user(rng),
            password_hash: format!("r{}", rng.random_range(0..2)),
        },
        19 => StoreCommand::ListAccounts {
            after: UserId(rng.random_range(0..4)),
            limit: rng.random_range(0..4),
        },
        // Rare: a deletion on Redis waits out the account cache's second.
        20 if rng.random_range(0..60) == 0 => StoreCommand::DeleteAccount { user: user(rng) },
        20 => StoreCommand::LoadNames {
            users: (0..rng.random_range(0..3)).map(|_| user(rng)).collect(),
        },
        1 => StoreCommand::LoadAccount { user: user(rng) },
        2 => StoreCommand::LoadClaim { user: user(rng) },
        3 => {
            let expected = epoch(rng);
            StoreCommand::ReplaceClaim {
                user: claimant(rng),
                expected,
                claim: Claim {
                    resume_secret: stored_secret(rng),
                    epoch: Epoch(expected.0 + u64::from(rng.random_range(0..5) > 0)),
                    server: server(rng),
                    lease_until: lease(rng),
                    resume_token_hash: [rng.random_range(0..3); 32],
                },
            }
        }
        // A server's cleanup (expire) as often as a logout (release).
        4 if rng.random_range(0..2) == 0 => StoreCommand::ExpireClaim {
            user: claimant(rng),
            epoch: epoch(rng),
        },
        4 => StoreCommand::ReleaseClaim {
            user: claimant(rng),
            epoch: epoch(rng),
        },
        5 => StoreCommand::BindSession {
            user: claimant(rng),
            epoch: epoch(rng),
            server: server(rng),
            lease_until: lease(rng),
        },
        6 => StoreCommand::RefreshLeases {
            server: server(rng),
            lease_until: lease(rng),
            sessions: (0..rng.random_range(0..4))
                .map(|_| (claimant(rng), epoch(rng)))
                .collect(),
        },
        7 => StoreCommand::LoadRoutes {
            users: (0..rng.random_range(0..4)).map(|_| claimant(rng)).collect(),
        },
        8 => StoreCommand::LoadMembers { conv: conv(rng) },
        9 | 10 => StoreCommand::Append {
            conv: conv(rng),
            sender: user(rng),
            msg_id: ClientMsgId(rng.random_range(0..3)),
            body: Bytes::from(vec![rng.random_range(0..2u8); 3]),
            now: UnixMillis(now),
            order: match rng.random_range(0..3) {
                0 => None,
                _ => {
                    let seq = rng.random_range(1..6);
                    Some(SendOrder {
                        stream: rng.random_range(0..2),
                        seq,
                        after: rng.random_range(0..seq),
                    })
                }
            },
            // A group's version: mostly the current log epoch with a small change count.
            members_known: match rng.random_range(0..3) {
                0 => None,
                _ => Some(MembersVersion {
                    log_epoch: log_epoch(rng),
                    changes: rng.random_range(0..4),
                }),
            },
        },
        11 => StoreCommand::LoadHeads { user: user(rng) },
        12 => StoreCommand::Fetch {
            user: user(rng),
            conv: conv(rng),
            log_epoch: log_epoch(rng),
            after_seq: rng.random_range(0..8),
            limit: rng.random_range(0..5),
        },
        13 => StoreCommand::AdvanceCursors {
            user: user(rng),
            cursors: (0..rng.random_range(0..3))
                .map(|_| (conv(rng), log_epoch(rng), rng.random_range(0..8)))
                .collect(),
        },
        14 => StoreCommand::CreateGroup {
            conv: conv(rng),
            owner: user(rng),
        },
        15 => StoreCommand::JoinGroup {
            conv: conv(rng),
            user: user(rng),
        },
        _ => StoreCommand::LeaveGroup {
            conv: conv(rng),
            user: user(rng),
        },
    }
}

#[tokio::test]
async fn random_command_sequences_agree() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let seeds: u64 = std::env::var("STORE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    random_sequences(seeds, || async {
        server.raw("FLUSHALL");
        redis(&server).await
    })
    .await;
}

/// The random sequences on a Redis Cluster: every multi-user command is split per slot there
/// (the sequences' users spread over the three masters), and must still agree with the
/// reference. As many seeds as on one node (`STORE_SEEDS`): fewer do not reach every outcome.
#[tokio::test]
async fn random_command_sequences_agree_on_a_cluster() {
    let Some(cluster) = redis_cluster() else {
        return;
    };
    let _turn = CLUSTER_TURN.lock().await;
    let seeds: u64 = std::env::var("STORE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    random_sequences(seeds, || async {
        cluster.flush_all();
        redis_cluster_store(cluster).await
    })
    .await;
}

/// Runs `seeds` random sequences against the reference and a fresh store from `fresh`, step
/// by step, and checks they reached the interesting outcomes.
async fn random_sequences<F, Fut>(seeds: u64, fresh: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = RedisStore>,
{
    let mut transcripts = Vec::new();
    for seed in 0..seeds {
        eprintln!(
            "random_command_sequences_agree: seed {seed} (replay: STORE_SEEDS={})",
            seed + 1
        );
        let memory = memory();
        let redis = fresh().await;
        let mut reference = Driver::new(&memory);
        let mut real = Driver::new(&redis);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut now = T0;
        for step in 0..500 {
            match rng.random_range(0..10) {
                0 => now += rng.random_range(0..50),
                1 if rng.random_range(0..10) == 0 => now += TTL_MS,
                _ => {}
            }
            let command = random_command(&mut rng, now);
            let a = reference.denorm_command(command.clone());
            let b = real.denorm_command(command);
            reference.run(now, a).await;
            real.run(now, b).await;
            assert_eq!(
                reference.transcript.last(),
                real.transcript.last(),
                "seed {seed} step {step}: memory (left) and redis (right) differ"
            );
        }
        transcripts.extend(reference.transcript);
    }
    // The sequences must reach the interesting outcomes, or agreeing proves little.
    for outcome in [
        "AccountRegistered(Ok",
        "NameTaken",
        "AccountDeleted(Some",
        "PasswordSet { found: true",
        "Accounts([AccountSummary",
        "ClaimReplaced(Ok(Some",
        "ClaimReplaced(Err",
        "released: true",
        "SessionBound(Ok",
        "SessionBound(Err",
        ", Refreshed)",
        ", Superseded",
        ", Gone)",
        "Some(RouteRecord",
        "duplicate: true",
        "duplicate: false",
        "ConflictingRetry",
        "NotMember",
        "UnknownConversation",
        "messages: [StoredMessage",
        "GroupCreated { created: true",
        "GroupJoined(Some",
        "was_member: true",
        "MembersUnchanged",
        "Members { version",
    ] {
        let n = transcripts.iter().filter(|t| t.contains(outcome)).count();
        eprintln!("{outcome}: {n}");
        assert!(n > 0, "no step reached {outcome:?}");
    }
    let advanced = transcripts
        .iter()
        .filter(|t| {
            t.contains("Heads") && t.contains("cursor_seq: ") && !t.contains("cursor_seq: 0")
        })
        .count();
    eprintln!("heads with a cursor: {advanced}");
}

/// Multi-user commands whose users' keys live on different masters (so the cluster store splits
/// them per slot and merges the outcomes) answer exactly as the reference and a single node do:
/// `RefreshLeases` with refreshed, superseded and gone sessions mixed, `LoadRoutes` with live,
/// expired and missing records, `LoadNames`, `ListOnline` across every master.
#[tokio::test]
async fn multi_user_commands_across_masters_answer_as_on_one_node() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let Some(cluster) = redis_cluster() else {
        return;
    };
    let users: Vec<u64> = (1..=12).collect();
    let _turn = CLUSTER_TURN.lock().await;
    // The users must really be spread: at least one per master.
    let masters: std::collections::BTreeSet<u16> = users
        .iter()
        .map(|u| {
            cluster
                .master_of_key(&format!("cim:claim:{{u:{u}}}"))
                .expect("an owner")
        })
        .collect();
    assert_eq!(masters.len(), 3, "users 1..=12 span all three masters");
    cluster.flush_all();
    let sharded = redis_cluster_store(cluster).await;
    let single = redis(&server).await;
    let memory = memory();
    let mut transcripts = Vec::new();
    for store in [&memory as &dyn Store, &single, &sharded] {
        let mut d = Driver::new(store);
        across_masters(&mut d, &users).await;
        transcripts.push(d.transcript);
    }
    assert_transcripts_equal(&transcripts[0], &transcripts[1]);
    assert_transcripts_equal(&transcripts[0], &transcripts[2]);
}

async fn across_masters(d: &mut Driver<'_>, users: &[u64]) {
    for u in users {
        d.register(&format!("user{u}")).await;
    }
    // Every user claims on s1 (lease by user: some run out), all but 11 and 12 bind; users
    // divisible by 4 are then taken over by s2 (their s1 session is superseded).
    for &u in users {
        let user = UserId(u);
        d.run(
            T0,
            StoreCommand::ReplaceClaim {
                user,
                expected: Epoch(0),
                claim: claim(1, "s1", T0 + 1_000 * u, 1),
            },
        )
        .await;
        if u <= 10 {
            d.run(
                T0,
                StoreCommand::BindSession {
                    user,
                    epoch: Epoch(1),
                    server: s("s1"),
                    lease_until: UnixMillis(T0 + 1_000 * u),
                },
            )
            .await;
        }
        if u % 4 == 0 {
            d.run(
                T0,
                StoreCommand::ReplaceClaim {
                    user,
                    expected: Epoch(1),
                    claim: claim(2, "s2", T0 + 20_000, 2),
                },
            )
            .await;
        }
    }
    let all: Vec<UserId> = users
        .iter()
        .copied()
        .map(UserId)
        .chain([UserId(99)])
        .collect();
    let sessions: Vec<(UserId, Epoch)> = all.iter().map(|u| (*u, Epoch(1))).collect();
    let StoreReply::LeasesRefreshed(outcomes) = d
        .run(
            T0 + 500,
            StoreCommand::RefreshLeases {
                server: s("s1"),
                lease_until: UnixMillis(T0 + 5_500),
                sessions: sessions.clone(),
            },
        )
        .await
    else {
        panic!("refresh answered oddly");
    };
    // In the callers' order, one outcome each, all three kinds present.
    assert_eq!(
        outcomes.iter().map(|(u, _)| *u).collect::<Vec<_>>(),
        all,
        "outcomes in the order asked"
    );
    assert!(outcomes.iter().any(|(_, o)| *o == LeaseRefresh::Refreshed));
    assert!(
        outcomes
            .iter()
            .any(|(_, o)| matches!(o, LeaseRefresh::Superseded { .. }))
    );
    assert!(outcomes.iter().any(|(_, o)| *o == LeaseRefresh::Gone));
    for now in [T0 + 1_000, T0 + 7_000, T0 + 30_000] {
        let StoreReply::Routes(routes) = d
            .run(now, StoreCommand::LoadRoutes { users: all.clone() })
            .await
        else {
            panic!("routes answered oddly");
        };
        assert_eq!(routes.iter().map(|(u, _)| *u).collect::<Vec<_>>(), all);
        d.run(now, StoreCommand::ListOnline { limit: 100 }).await;
    }
    let mut reversed = all.clone();
    reversed.reverse();
    d.run(T0, StoreCommand::LoadNames { users: reversed }).await;
    d.run(
        T0,
        StoreCommand::ListAccounts {
            after: UserId(0),
            limit: 100,
        },
    )
    .await;
}

/// A scenario of claims, appends, reads and online listing on a Redis Cluster served over TLS
/// only (clients, bus, replication), with a client certificate: the `--redis-ca` /
/// `--redis-client-cert` settings reach every node the cluster client dials.
#[tokio::test]
async fn a_tls_cluster_runs_a_scenario_as_the_reference_does() {
    let Some(cluster) = redis_cluster_tls() else {
        return;
    };
    let tls = cluster.tls().expect("a TLS cluster");
    let options = RedisOptions {
        tls: RedisTls::default()
            .with_ca_pem(tls.ca.cert_pem.clone())
            .and_then(|t| {
                t.with_client_pem(tls.client.cert_pem.clone(), tls.client.key_pem.clone())
            })
            .expect("PEM files"),
        ..redis_options()
    };
    // Without the client certificate the nodes refuse the handshake.
    let refused = RedisStore::connect_cluster(
        &cluster.urls(),
        RedisOptions {
            tls: RedisTls::default()
                .with_ca_pem(tls.ca.cert_pem.clone())
                .expect("PEM"),
            ..redis_options()
        },
    )
    .await;
    assert!(
        refused.is_err(),
        "a TLS cluster without a client certificate"
    );
    let store = RedisStore::connect_cluster(&cluster.urls(), options)
        .await
        .expect("connect over TLS");
    let memory = memory();
    let mut reference = Driver::new(&memory);
    scenarios::online_lists_users_with_live_bound_routes(&mut reference).await;
    let mut real = Driver::new(&store);
    scenarios::online_lists_users_with_live_bound_routes(&mut real).await;
    assert_transcripts_equal(&reference.transcript, &real.transcript);
}

// --- Redis only ---------------------------------------------------------------------------

#[tokio::test]
async fn redis_refuses_an_evicting_policy_unless_overridden() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    assert_eq!(server.raw("CONFIG SET maxmemory-policy allkeys-lru"), "+OK");
    match RedisStore::connect(&server.url(), redis_options()).await {
        Err(ConnectError::EvictionPolicy { policy, .. }) => assert_eq!(policy, "allkeys-lru"),
        other => panic!("expected an eviction policy error, got {other:?}"),
    }
    let store = RedisStore::connect(
        &server.url(),
        RedisOptions {
            allow_eviction: true,
            ..redis_options()
        },
    )
    .await
    .expect("override accepted");
    store.health().await.expect("healthy");
}

#[tokio::test]
async fn redis_errors_are_store_unavailable() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = redis(&server).await;
    store.health().await.expect("healthy");
    let url = server.url();
    drop(server);
    let reply = store
        .execute(UnixMillis(T0), StoreCommand::LoadClaim { user: UserId(1) })
        .await;
    assert!(reply.is_err(), "a dead server answered: {reply:?}");
    assert!(store.health().await.is_err());
    match RedisStore::connect(&url, redis_options()).await {
        Err(ConnectError::Unreachable { .. }) => {}
        other => panic!("expected unreachable, got {other:?}"),
    }
    assert!(matches!(
        RedisStore::connect("not a url", redis_options()).await,
        Err(ConnectError::Url { .. })
    ));
}

#[tokio::test]
async fn memory_backend_is_usable_from_spawned_tasks() {
    let store: std::sync::Arc<dyn Store> = std::sync::Arc::new(memory());
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .execute(
                        UnixMillis(T0),
                        StoreCommand::RegisterAccount {
                            name: format!("u{i}"),
                            password_hash: "h".into(),
                        },
                    )
                    .await
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(StoreReply::AccountRegistered(Ok(user))) => ids.push(user.0),
            other => panic!("{other:?}"),
        }
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=8).collect::<Vec<_>>());
    store.health().await.unwrap();
}

/// What the vocabulary cannot observe but Redis must still do: release deletes the route
/// record (not only hides it), and idempotency records carry a Redis TTL.
#[tokio::test]
async fn redis_collects_route_records_and_idempotency_records() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = redis(&server).await;
    let mut d = Driver::new(&store);
    let u = UserId(7);
    d.run(
        T0,
        StoreCommand::ReplaceClaim {
            user: u,
            expected: Epoch(0),
            claim: claim(1, "s1", T0 + 1_000, 1),
        },
    )
    .await;
    d.run(
        T0,
        StoreCommand::BindSession {
            user: u,
            epoch: Epoch(1),
            server: s("s1"),
            lease_until: UnixMillis(T0 + 1_000),
        },
    )
    .await;
    assert_eq!(server.raw("EXISTS cim:route:{u:7}"), ":1");
    d.run(
        T0,
        StoreCommand::ReleaseClaim {
            user: u,
            epoch: Epoch(1),
        },
    )
    .await;
    assert_eq!(server.raw("EXISTS cim:route:{u:7}"), ":0");
    // The counter survives.
    assert_eq!(server.raw("HGET cim:claim:{u:7} epoch"), "$1");

    let a = d.register("a").await;
    d.append(T0, &ConvId::All, a, 0xab, "m").await.unwrap();
    let pttl = server.raw(&format!(
        "PTTL cim:conv:{{c:all}}:idem:{}:{:032x}",
        a.0, 0xab
    ));
    let pttl: u64 = pttl.trim_start_matches(':').parse().expect(&pttl);
    assert!(pttl > 0 && pttl <= TTL_MS, "idempotency record ttl {pttl}");
}

/// The private append sends the conversation index and the append script in one pipeline,
/// by `EVALSHA`: after `SCRIPT FLUSH` (what a restarted Redis has) it loads the script and
/// sends the pipeline again, and both users' index entries are there either way.
#[tokio::test]
async fn redis_append_pipeline_survives_a_flushed_script_cache() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = redis(&server).await;
    let mut d = Driver::new(&store);
    let a = d.register("a").await;
    let b = d.register("b").await;
    let conv = ConvId::private(a, b).unwrap();
    assert_eq!(d.append(T0, &conv, a, 1, "one").await.unwrap().0, 1);
    assert_eq!(server.raw("SCRIPT FLUSH"), "+OK");
    assert_eq!(d.append(T0, &conv, b, 2, "two").await.unwrap().0, 2);
    // A retry after the reload is still recognized (the idempotency record was written once).
    assert_eq!(
        d.append(T0, &conv, b, 2, "two").await.unwrap(),
        (2, true, T0)
    );
    for user in [a, b] {
        assert_eq!(
            server.raw(&format!("SISMEMBER cim:convs:{{u:{}}} {conv}", user.0)),
            ":1"
        );
        let heads = d.heads(user).await;
        assert!(
            heads.iter().any(|h| h.conv == conv && h.head_seq == 2),
            "{heads:?}"
        );
    }
    // An unknown account is still refused once the others are remembered.
    let stranger = UserId(a.0 + b.0 + 100);
    assert_eq!(
        d.append(T0, &ConvId::private(a, stranger).unwrap(), a, 3, "x")
            .await,
        Err(AppendError::UnknownConversation)
    );
}

/// On a cluster, a flushed script cache is reloaded on the node that answers `NOSCRIPT` only:
/// while another master is dead and not yet replaced (so a `SCRIPT LOAD` sent to every master,
/// as the crate's `Script` would, fails), scripts called alone (`ReplaceClaim`, `RefreshLeases`) and in pipelines (`Append`,
/// `LoadHeads`) still run after every master's cache was flushed. A cluster of its own: the
/// test kills a node.
#[tokio::test]
async fn a_cluster_reloads_flushed_scripts_on_the_node_that_lost_them() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let store = redis_cluster_store(&cluster).await;
    let mut d = Driver::new(&store);
    let a = d.register("a").await;
    let b = d.register("b").await;
    let conv = ConvId::private(a, b).unwrap();
    assert_eq!(d.append(T0, &conv, a, 1, "one").await.unwrap().0, 1);
    // A master that holds none of this test's keys dies; until its replica takes over
    // (`cluster-node-timeout` 2 s and then some), a `SCRIPT LOAD` to every master fails.
    let used: Vec<u16> = [a, b]
        .iter()
        .flat_map(|u| {
            [
                cluster.master_of_key(&format!("cim:claim:{{u:{}}}", u.0)),
                cluster.master_of_key(&format!("cim:conv:{{c:{conv}}}:meta")),
            ]
        })
        .flatten()
        .collect();
    let idle = cluster
        .masters()
        .into_iter()
        .find(|m| !used.contains(m))
        .expect("a master none of the keys is on");
    let live: Vec<u16> = cluster
        .masters()
        .into_iter()
        .filter(|m| *m != idle)
        .collect();
    cluster.kill_node(idle);
    for master in &live {
        assert_eq!(
            cluster.cli(*master, &["SCRIPT", "FLUSH"]).as_deref(),
            Ok("OK")
        );
    }
    assert_eq!(d.append(T0, &conv, b, 2, "two").await.unwrap().0, 2);
    let replaced = d
        .run(
            T0,
            StoreCommand::ReplaceClaim {
                user: a,
                expected: Epoch(0),
                claim: claim(1, "s1", T0 + 5_000, 1),
            },
        )
        .await;
    assert!(
        matches!(replaced, StoreReply::ClaimReplaced(Ok(None))),
        "{replaced:?}"
    );
    let refreshed = d
        .run(
            T0,
            StoreCommand::RefreshLeases {
                server: s("s1"),
                lease_until: UnixMillis(T0 + 5_000),
                sessions: vec![(a, Epoch(1)), (b, Epoch(1))],
            },
        )
        .await;
    assert!(
        matches!(refreshed, StoreReply::LeasesRefreshed(_)),
        "{refreshed:?}"
    );
    for user in [a, b] {
        let heads = d.heads(user).await;
        assert!(
            heads.iter().any(|h| h.conv == conv && h.head_seq == 2),
            "{heads:?}"
        );
    }
    // The append script was reloaded where the conversation lives (so `NOSCRIPT` was met).
    let append = redis::Script::new(concat!(
        include_str!("../src/store/lua/incarnation.lua"),
        include_str!("../src/store/lua/append.lua")
    ));
    let home = cluster
        .master_of_key(&format!("cim:conv:{{c:{conv}}}:meta"))
        .expect("the conversation's master");
    assert_eq!(
        cluster
            .cli(home, &["SCRIPT", "EXISTS", append.get_hash()])
            .as_deref(),
        Ok("1")
    );
}

/// The cluster client follows `MOVED` for scripts and pipelines: after a user's slot and a
/// conversation's slot are moved to other masters (keys and all) behind the store's back, its
/// next appends (a script in a pipeline), lease refreshes (a script alone), heads and fetches
/// (read pipelines) go where the keys now are, without an error. A cluster of its own: the
/// test moves slots.
#[tokio::test]
async fn scripts_and_pipelines_follow_slots_moved_to_another_master() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let store = redis_cluster_store(&cluster).await;
    let mut d = Driver::new(&store);
    let a = d.register("a").await;
    let b = d.register("b").await;
    let conv = ConvId::private(a, b).unwrap();
    assert_eq!(d.append(T0, &conv, a, 1, "one").await.unwrap().0, 1);
    let claimed = d
        .run(
            T0,
            StoreCommand::ReplaceClaim {
                user: a,
                expected: Epoch(0),
                claim: claim(1, "s1", T0 + 5_000, 1),
            },
        )
        .await;
    assert!(
        matches!(claimed, StoreReply::ClaimReplaced(Ok(None))),
        "{claimed:?}"
    );
    for key in [
        format!("cim:conv:{{c:{conv}}}:meta"),
        format!("cim:claim:{{u:{}}}", a.0),
    ] {
        let slot = cluster.slot_of(&key);
        let from = cluster.master_of_slot(slot).expect("an owner");
        let to = cluster
            .masters()
            .into_iter()
            .find(|m| *m != from)
            .expect("another master");
        cluster.move_slot(slot, to).expect("the slot moves");
        assert_eq!(cluster.master_of_key(&key), Some(to));
        assert_eq!(cluster.cli(to, &["EXISTS", &key]).as_deref(), Ok("1"));
    }
    assert_eq!(d.append(T0, &conv, b, 2, "two").await.unwrap().0, 2);
    let refreshed = d
        .run(
            T0,
            StoreCommand::RefreshLeases {
                server: s("s1"),
                lease_until: UnixMillis(T0 + 5_000),
                sessions: vec![(a, Epoch(1)), (b, Epoch(1))],
            },
        )
        .await;
    assert_eq!(
        refreshed,
        StoreReply::LeasesRefreshed(vec![(a, LeaseRefresh::Refreshed), (b, LeaseRefresh::Gone)])
    );
    let heads = d.heads(a).await;
    assert!(
        heads.iter().any(|h| h.conv == conv && h.head_seq == 2),
        "{heads:?}"
    );
    let epoch = heads
        .iter()
        .find(|h| h.conv == conv)
        .map(|h| h.log_epoch)
        .expect("the conversation's head");
    let (_, seqs) = d.fetch(b, &conv, epoch, 0, 10).await;
    assert_eq!(seqs, vec![1, 2]);
}

/// The eviction-policy check asks every master: one evicting master among three refuses the
/// connect, naming that node, unless eviction is allowed.
#[tokio::test]
async fn a_cluster_with_one_evicting_master_is_refused() {
    let Some(cluster) = redis_cluster() else {
        return;
    };
    let _turn = CLUSTER_TURN.lock().await;
    let evicting = *cluster.masters().last().expect("a master");
    let set = |policy: &str| {
        cluster
            .cli(evicting, &["CONFIG", "SET", "maxmemory-policy", policy])
            .expect("CONFIG SET")
    };
    set("allkeys-lru");
    let refused = RedisStore::connect_cluster(&cluster.urls(), redis_options()).await;
    let allowed = RedisStore::connect_cluster(
        &cluster.urls(),
        RedisOptions {
            allow_eviction: true,
            ..redis_options()
        },
    )
    .await;
    set("noeviction");
    match refused {
        Err(ConnectError::EvictionPolicy { url, policy }) => {
            assert_eq!(policy, "allkeys-lru");
            assert!(
                url.ends_with(&format!("(node 127.0.0.1:{evicting})")),
                "the evicting master is named: {url}"
            );
        }
        other => panic!("expected an eviction-policy refusal, got {other:?}"),
    }
    assert!(allowed.is_ok(), "{allowed:?}");
}

/// The two store flags mixed up: `--redis` given a cluster node is refused at connect with
/// words that name the other flag (it used to fail later, on the layout check, with the
/// cluster's raw `MOVED` replies), and `--redis-cluster` given a lone Redis is refused too.
#[tokio::test]
async fn a_store_flag_given_the_other_kind_of_redis_says_which_to_use() {
    let Some(cluster) = redis_cluster() else {
        return;
    };
    let Some(server) = RedisServer::start() else {
        return;
    };
    let _turn = CLUSTER_TURN.lock().await;
    let one_node = cluster.urls().remove(0);
    match RedisStore::connect(&one_node, redis_options()).await {
        Err(e @ ConnectError::ClusterNode { .. }) => {
            assert!(e.to_string().contains("--redis-cluster"), "{e}");
        }
        other => panic!("a cluster node refused as --redis: {other:?}"),
    }
    let refused = RedisStore::connect_cluster(&[server.url()], redis_options()).await;
    let text = refused.as_ref().map(|_| ()).unwrap_err().to_string();
    assert!(
        text.contains("not a node of a Redis Cluster") && text.contains("--redis "),
        "{text}"
    );
}

// --- A restart that lost its last writes (the lost-tail rule) ------------------------------

/// Before the copy: two users and five private messages.
async fn lost_tail_before_copy(d: &mut Driver<'_>) -> (UserId, UserId, ConvId) {
    let a = d.register("ann").await;
    let b = d.register("bob").await;
    let conv = ConvId::private(a, b).expect("two users");
    for i in 1..=5u64 {
        let appended = d
            .append(T0 + i, &conv, a, u128::from(i), &format!("kept {i}"))
            .await;
        assert_eq!(appended, Ok((i, false, T0 + i)));
    }
    // Bob has read up to 4: a cursor of the old epoch, which counts in the new one.
    let epoch = d.head_of(b, &conv).await.expect("head").log_epoch;
    let cursors = vec![(conv.clone(), epoch, 4)];
    assert_eq!(
        d.run(T0 + 5, StoreCommand::AdvanceCursors { user: b, cursors })
            .await,
        StoreReply::CursorsAdvanced
    );
    (a, b, conv)
}

/// After the copy, three more, which the recipient reads: the writes the restart loses.
async fn lost_tail_after_copy(
    d: &mut Driver<'_>,
    (a, b, conv): (UserId, UserId, ConvId),
) -> LogEpoch {
    for i in 6..=8u64 {
        let appended = d
            .append(T0 + i, &conv, a, u128::from(i), &format!("lost {i}"))
            .await;
        assert_eq!(appended, Ok((i, false, T0 + i)));
    }
    let epoch = d.head_of(b, &conv).await.expect("head").log_epoch;
    let (head, seqs) = d.fetch(b, &conv, epoch, 5, 10).await;
    assert_eq!((head.head_seq, seqs), (8, vec![6, 7, 8]));
    epoch
}

/// After the restart from the copy: the log has moved to a new epoch before anything is
/// served, keeps its surviving messages at their seqs, and numbers new ones under the new
/// epoch only, so no (log epoch, seq) names two contents.
async fn lost_tail_after_restart(
    d: &mut Driver<'_>,
    (a, b, conv): (UserId, UserId, ConvId),
    old: LogEpoch,
) {
    let head = d.head_of(b, &conv).await.expect("head");
    assert_ne!(
        head.log_epoch, old,
        "the log kept its epoch after losing writes"
    );
    // Trimmed to the last `MAX_LOG` (3) as before the restart. The move says it carried
    // 1..=5 over from the old epoch, and bob's cursor (4, old epoch) counts in the new one.
    assert_eq!((head.head_seq, head.first_available_seq), (5, 3));
    assert_eq!(
        (head.carried_from, head.carried_up_to, head.cursor_seq),
        (old, 5, 4)
    );
    let new = head.log_epoch;
    // Once moved, it stays: the next read serves the same epoch.
    assert_eq!(d.head_of(a, &conv).await.expect("head").log_epoch, new);
    // A reader still in the old epoch is told the new one and given nothing.
    let (head, seqs) = d.fetch(b, &conv, old, 5, 10).await;
    assert_eq!((head.log_epoch, seqs), (new, vec![]));
    // The survivors keep their seqs under the new epoch.
    let (_, seqs) = d.fetch(b, &conv, new, 0, 10).await;
    assert_eq!(seqs, [3, 4, 5]);
    // A retry of a surviving message answers its seq; new messages take 6.. of the new epoch.
    assert_eq!(
        d.append(T0 + 20, &conv, a, 3, "kept 3").await,
        Ok((3, true, T0 + 3))
    );
    for i in 6..=8u64 {
        let appended = d
            .append(T0 + 20 + i, &conv, a, 100 + u128::from(i), "new")
            .await;
        assert_eq!(appended, Ok((i, false, T0 + 20 + i)));
    }
    let (head, seqs) = d.fetch(b, &conv, new, 5, 10).await;
    assert_eq!(
        (head.log_epoch, head.head_seq, seqs),
        (new, 8, vec![6, 7, 8])
    );
    // The record of the move stays as long as the epoch does.
    assert_eq!((head.carried_from, head.carried_up_to), (old, 5));
}

fn replace_claim_cmd(user: UserId, expected: u64, epoch: u64, server: &str) -> StoreCommand {
    StoreCommand::ReplaceClaim {
        user,
        expected: Epoch(expected),
        claim: claim(
            epoch,
            server,
            T0 + 60_000,
            if server == "s1" { 1 } else { 9 },
        ),
    }
}

/// Claim epochs across a restart that lost a login: one login before the copy (epoch 1).
async fn login_before_copy(d: &mut Driver<'_>) -> UserId {
    let user = d.register("cid").await;
    assert_eq!(
        d.run(T0 + 1, replace_claim_cmd(user, 0, 1, "s1")).await,
        StoreReply::ClaimReplaced(Ok(None))
    );
    user
}

/// ... and one after it (epoch 2), which the restart loses.
async fn login_after_copy(d: &mut Driver<'_>, user: UserId) {
    assert!(matches!(
        d.run(T0 + 2, replace_claim_cmd(user, 1, 2, "s2")).await,
        StoreReply::ClaimReplaced(Ok(Some(_)))
    ));
}

/// After the restart the counter is back at 1, and epoch 2 was issued: the next login must
/// not get it. The claim reads as another incarnation's (the route may take it over: the
/// client can hold the lost login's token). The first try is answered as a lost race with
/// the counter raised to the caller's now; the retry against it succeeds, and later logins
/// count up from there.
async fn no_claim_epoch_again_after_restart(d: &mut Driver<'_>, user: UserId) {
    let now = T0 + 30;
    let first = claim(1, "s1", T0 + 60_000, 1);
    assert_eq!(
        d.run(now, StoreCommand::LoadClaim { user }).await,
        StoreReply::Claim(ClaimState {
            foreign: true,
            ..state(1, Some(first.clone()))
        })
    );
    assert_eq!(
        d.run(now, replace_claim_cmd(user, 1, 2, "s2")).await,
        StoreReply::ClaimReplaced(Err(state(now, Some(first.clone()))))
    );
    // Raised and stamped: this incarnation's claim now (the counter above it says it
    // predates the restart until it is replaced).
    assert_eq!(
        d.run(now, StoreCommand::LoadClaim { user }).await,
        StoreReply::Claim(state(now, Some(first.clone())))
    );
    assert_eq!(
        d.run(now, replace_claim_cmd(user, now, now + 1, "s2"))
            .await,
        StoreReply::ClaimReplaced(Ok(Some(first)))
    );
    assert!(matches!(
        d.run(now + 1, replace_claim_cmd(user, now + 1, now + 2, "s2"))
            .await,
        StoreReply::ClaimReplaced(Ok(Some(_)))
    ));
}

#[tokio::test]
async fn a_restart_that_lost_a_login_never_issues_its_claim_epoch_again() {
    let memory = memory();
    let mut reference = Driver::new(&memory);
    let user = login_before_copy(&mut reference).await;
    let copy = memory.snapshot();
    login_after_copy(&mut reference, user).await;
    memory.restart_from(&copy, 99);
    no_claim_epoch_again_after_restart(&mut reference, user).await;

    let Some(mut server) = RedisServer::start_with_aof() else {
        return;
    };
    let store = redis(&server).await;
    let mut real = Driver::new(&store);
    let user = login_before_copy(&mut real).await;
    let copy = server.copy_data().expect("copy redis data");
    login_after_copy(&mut real, user).await;
    server
        .restart_from(&copy)
        .expect("restart redis from the copy");
    until_healthy(&store).await;
    no_claim_epoch_again_after_restart(&mut real, user).await;
    assert_transcripts_equal(&reference.transcript, &real.transcript);
}

/// A first login that the restart lost (the account survived, its only claim did not): with
/// no claim left the counter reads 0, and epoch 1 was issued. The account's creation vouched
/// for the counter, so the next login is answered as a lost race with the counter raised to
/// the caller's now, and the retry gets an epoch above every one issued.
async fn no_first_claim_epoch_again_after_restart(d: &mut Driver<'_>, user: UserId) {
    let now = T0 + 30;
    assert_eq!(
        d.run(now, StoreCommand::LoadClaim { user }).await,
        StoreReply::Claim(state(0, None))
    );
    assert_eq!(
        d.run(now, replace_claim_cmd(user, 0, 1, "s2")).await,
        StoreReply::ClaimReplaced(Err(state(now, None)))
    );
    assert_eq!(
        d.run(now, replace_claim_cmd(user, now, now + 1, "s2"))
            .await,
        StoreReply::ClaimReplaced(Ok(None))
    );
}

/// Within one incarnation the account's mark changes nothing: the first login gets epoch 1.
async fn first_login_in_the_same_incarnation(d: &mut Driver<'_>) {
    let user = d.register("cid-same").await;
    assert_eq!(
        d.run(T0 + 1, replace_claim_cmd(user, 0, 1, "s1")).await,
        StoreReply::ClaimReplaced(Ok(None))
    );
}

#[tokio::test]
async fn a_restart_that_lost_a_first_login_never_issues_its_claim_epoch_again() {
    let memory = memory();
    let mut reference = Driver::new(&memory);
    first_login_in_the_same_incarnation(&mut reference).await;
    let user = reference.register("cid").await;
    let copy = memory.snapshot();
    assert_eq!(
        reference
            .run(T0 + 1, replace_claim_cmd(user, 0, 1, "s1"))
            .await,
        StoreReply::ClaimReplaced(Ok(None))
    );
    memory.restart_from(&copy, 99);
    no_first_claim_epoch_again_after_restart(&mut reference, user).await;

    let Some(mut server) = RedisServer::start_with_aof() else {
        return;
    };
    let store = redis(&server).await;
    let mut real = Driver::new(&store);
    first_login_in_the_same_incarnation(&mut real).await;
    let user = real.register("cid").await;
    let copy = server.copy_data().expect("copy redis data");
    assert_eq!(
        real.run(T0 + 1, replace_claim_cmd(user, 0, 1, "s1")).await,
        StoreReply::ClaimReplaced(Ok(None))
    );
    server
        .restart_from(&copy)
        .expect("restart redis from the copy");
    until_healthy(&store).await;
    no_first_claim_epoch_again_after_restart(&mut real, user).await;
    assert_transcripts_equal(&reference.transcript, &real.transcript);
}

/// Waits until a restarted Redis answers through `store` (its connection reconnects by
/// itself; the first command after a restart may fail once).
async fn until_healthy(store: &dyn Store) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.health().await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "redis did not come back"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_restart_that_lost_writes_moves_the_log_to_a_new_epoch() {
    let memory = memory();
    let mut reference = Driver::new(&memory);
    let users = lost_tail_before_copy(&mut reference).await;
    let copy = memory.snapshot();
    let old = lost_tail_after_copy(&mut reference, users.clone()).await;
    memory.restart_from(&copy, 99);
    lost_tail_after_restart(&mut reference, users, old).await;

    // Redis with AOF: a copy of its data dir, then SIGKILL and a restart from the copy.
    let Some(mut server) = RedisServer::start_with_aof() else {
        return;
    };
    let store = redis(&server).await;
    let mut real = Driver::new(&store);
    let users = lost_tail_before_copy(&mut real).await;
    let copy = server.copy_data().expect("copy redis data");
    let old = lost_tail_after_copy(&mut real, users.clone()).await;
    server
        .restart_from(&copy)
        .expect("restart redis from the copy");
    until_healthy(&store).await;
    lost_tail_after_restart(&mut real, users, old).await;
    assert_transcripts_equal(&reference.transcript, &real.transcript);
}

/// A group append's members as (version, members), asserting they were listed.
async fn members_after(
    d: &mut Driver<'_>,
    group: &ConvId,
    sender: UserId,
    id: u128,
    known: Option<MembersVersion>,
) -> (MembersVersion, Vec<UserId>) {
    match d.group_append(group, sender, id, known).await {
        Recipients::Members { version, members } => (version, members),
        other => panic!("expected the members: {other:?}"),
    }
}

/// Before the copy: a group of one. After it, b joins and a route learns that version: the
/// write the restart loses.
async fn lost_join_before_copy(d: &mut Driver<'_>) -> (ConvId, [UserId; 3]) {
    let users = [
        d.register("ann").await,
        d.register("bob").await,
        d.register("cid").await,
    ];
    let group = ConvId::group("lost").expect("a group name");
    let create = StoreCommand::CreateGroup {
        conv: group.clone(),
        owner: users[0],
    };
    d.group(create).await;
    members_after(d, &group, users[0], 1, None).await;
    (group, users)
}

async fn lost_join_after_copy(
    d: &mut Driver<'_>,
    (group, u): &(ConvId, [UserId; 3]),
) -> MembersVersion {
    let join = StoreCommand::JoinGroup {
        conv: group.clone(),
        user: u[1],
    };
    d.group(join).await;
    let (version, members) = members_after(d, group, u[0], 2, None).await;
    assert_eq!(members, [u[0], u[1]]);
    version
}

/// After the restart, c joins instead: as many changes as the lost version counted, other
/// members. The lost version is not confirmed: the log moved to a new epoch.
async fn lost_join_after_restart(
    d: &mut Driver<'_>,
    (group, u): &(ConvId, [UserId; 3]),
    lost: MembersVersion,
) {
    let join = StoreCommand::JoinGroup {
        conv: group.clone(),
        user: u[2],
    };
    d.group(join).await;
    let (version, members) = members_after(d, group, u[0], 3, Some(lost)).await;
    assert_eq!(version.changes, lost.changes);
    assert_ne!(version, lost, "a lost membership's version was confirmed");
    assert_eq!(members, [u[0], u[2]]);
}

/// A restart that lost a membership change must not confirm the version a route learnt
/// before it: the change count repeats with other members, the log epoch does not.
#[tokio::test]
async fn a_restart_that_lost_a_membership_change_confirms_no_version_from_before() {
    let memory = memory();
    let mut reference = Driver::new(&memory);
    let group = lost_join_before_copy(&mut reference).await;
    let copy = memory.snapshot();
    let lost = lost_join_after_copy(&mut reference, &group).await;
    memory.restart_from(&copy, 99);
    lost_join_after_restart(&mut reference, &group, lost).await;

    let Some(mut server) = RedisServer::start_with_aof() else {
        return;
    };
    let store = redis(&server).await;
    let mut real = Driver::new(&store);
    let group = lost_join_before_copy(&mut real).await;
    let copy = server.copy_data().expect("copy redis data");
    let lost = lost_join_after_copy(&mut real, &group).await;
    server
        .restart_from(&copy)
        .expect("restart redis from the copy");
    until_healthy(&store).await;
    lost_join_after_restart(&mut real, &group, lost).await;
    assert_transcripts_equal(&reference.transcript, &real.transcript);
}

/// The master change of "never the same name for two contents": a Redis Cluster master dies
/// after its replica acknowledged every append (`WAIT 1`); the promoted replica has another
/// run id, so the conversation's log moves before it is served, carrying everything over
/// (the head says from which epoch and up to which seq), and new messages follow the
/// carried ones under the new epoch.
#[tokio::test]
async fn a_promoted_replica_moves_the_log_carrying_everything_over() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    cluster
        .wait_for_replicas(Duration::from_secs(20))
        .expect("replicas in sync");
    // A replica on a loaded machine can take longer than the usual 250 ms WAIT (half the
    // tests' command timeout) to confirm: give it 2 s, as store_cluster_faults does.
    let options = RedisOptions {
        wait_replicas: 1,
        command_timeout: Duration::from_secs(4),
        ..redis_options()
    };
    let store = RedisStore::connect_cluster(&cluster.urls(), options)
        .await
        .expect("connect to the cluster");
    let mut d = Driver::new(&store);
    let a = d.register("ann").await;
    let b = d.register("bob").await;
    let conv = ConvId::private(a, b).expect("two users");
    for i in 1..=3u64 {
        let appended = d.append(T0 + i, &conv, a, u128::from(i), "kept").await;
        assert_eq!(appended, Ok((i, false, T0 + i)));
    }
    let old = d.head_of(b, &conv).await.expect("head").log_epoch;
    let master = cluster
        .master_of_key(&format!("cim:conv:{{c:{conv}}}:meta"))
        .expect("the conversation's master");
    cluster.kill_node(master);
    cluster
        .wait_for_failover(master, Duration::from_secs(30))
        .expect("a replica takes over");
    // The client finds the new master by itself; until then the slot's reads fail.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let head = loop {
        let fetch = StoreCommand::Fetch {
            user: b,
            conv: conv.clone(),
            log_epoch: old,
            after_seq: 0,
            limit: 10,
        };
        match store.execute(UnixMillis(T0 + 10), fetch).await {
            Ok(StoreReply::Fetched { head, messages }) => {
                // Asked in the old epoch: told the new one, given nothing.
                assert!(messages.is_empty(), "{messages:?}");
                break head;
            }
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the promoted replica serves the conversation: {other:?}"
            ),
        }
        tokio::task::yield_now().await;
    };
    assert_ne!(head.log_epoch, old, "the promoted replica kept the epoch");
    assert_eq!(
        (head.head_seq, head.carried_from, head.carried_up_to),
        (3, old, 3)
    );
    // The promoted master has no replica left to WAIT for: go on without.
    let plain = RedisStore::connect_cluster(&cluster.urls(), redis_options())
        .await
        .expect("connect to the cluster");
    let mut d = Driver::new(&plain);
    let (_, seqs) = d.fetch(b, &conv, head.log_epoch, 0, 10).await;
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(
        d.append(T0 + 20, &conv, a, 4, "new").await,
        Ok((4, false, T0 + 20))
    );
    let now = d.head_of(b, &conv).await.expect("head");
    assert_eq!(
        (now.log_epoch, now.head_seq, now.carried_from),
        (head.log_epoch, 4, old)
    );
}
