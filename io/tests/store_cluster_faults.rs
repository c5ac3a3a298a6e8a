//! The Redis Cluster store under faults of the cluster itself, each on a cluster of its own
//! (they kill nodes): what the store does while no node answers, and what acknowledging
//! after replication (`WAIT`) costs and guarantees.
//!
//! Skipped with a message without `redis-server` / `redis-cli`; failed under `CI=true`.

// The nodes are processes of their own: deadlines and CPU windows are on the real clock.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use cim_core::ids::{ClientMsgId, ConvId, Epoch, ServerId, UnixMillis, UserId};
use cim_core::store::{LeaseRefresh, StoreCommand, StoreReply};
use cim_io::store::{RedisOptions, RedisStore, Store};
use cim_testkit::{RedisCluster, RedisServer};

const T0: u64 = 1_700_000_000_000;

/// One test at a time in this binary: each kills and restarts nodes of its own cluster on
/// fixed ports, and another test starting a cluster meanwhile could take a killed node's
/// freed port (its restart then fails); and their timing windows (shorter than the
/// cluster's node timeout) are on the real clock, which six clusters at once on a small
/// machine stretch.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn options() -> RedisOptions {
    RedisOptions {
        command_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        seed: Some(11),
        ..RedisOptions::default()
    }
}

/// User and system CPU time of this process so far (from `/proc/self/stat`, in clock ticks
/// of 10 ms on Linux), or `None` elsewhere.
fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    Some(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// This test's turn ([`ONE_AT_A_TIME`]), a cluster of its own and a store on it with the
/// fast-failure [`options`]; `None` to skip (see [`RedisCluster::start`]).
async fn cluster_and_store() -> Option<(
    tokio::sync::MutexGuard<'static, ()>,
    RedisCluster,
    RedisStore,
)> {
    let turn = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start()?;
    let store = RedisStore::connect_cluster(&cluster.urls(), options())
        .await
        .expect("connect to the cluster");
    Some((turn, cluster, store))
}

/// Polls `store` until a health check passes, within `within`.
async fn healthy_within(store: &RedisStore, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < within {
        match store.health().await {
            Ok(()) => return Ok(started.elapsed()),
            Err(e) => last = e.0,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("no healthy answer within {within:?}: {last}"))
}

/// With every node dead, a process that keeps calling the store (a health check and a
/// command every 20 ms, busier than any server or route) makes only a handful of calls that
/// reach the cluster client and a few reconnects on the backoff; every other call fails at
/// once. When the nodes come back, the store is healthy again without being told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_is_left_alone_and_found_again() {
    let Some((_one, cluster, store)) = cluster_and_store().await else {
        return;
    };
    store.health().await.expect("a healthy cluster");
    let at = UnixMillis(T0);
    store
        .execute(at, StoreCommand::LoadClaim { user: UserId(1) })
        .await
        .expect("a command on a healthy cluster");
    for port in cluster.ports() {
        cluster.kill_node(port);
    }

    let window = Duration::from_secs(3);
    let before = store.circuit_stats();
    let cpu_before = process_cpu();
    let started = Instant::now();
    let mut rounds = 0u64;
    let mut slowest_after_open = Duration::ZERO;
    let mut opened_at = None;
    while started.elapsed() < window {
        let was_open = store.circuit_stats().open;
        if was_open && opened_at.is_none() {
            opened_at = Some((started.elapsed(), process_cpu()));
        }
        let call = Instant::now();
        assert!(store.health().await.is_err(), "no node is alive");
        assert!(
            store
                .execute(at, StoreCommand::LoadClaim { user: UserId(1) })
                .await
                .is_err(),
            "no node is alive"
        );
        if was_open {
            slowest_after_open = slowest_after_open.max(call.elapsed());
        }
        rounds += 1;
        // Pacing the calls, not waiting for anything.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu_now = process_cpu();
    let cpu = cpu_now.zip(cpu_before).map(|(a, b)| a.saturating_sub(b));
    let (open_after, cpu_at_open) = opened_at.unwrap_or((window, None));
    let cpu_while_open = cpu_now.zip(cpu_at_open).map(|(a, b)| a.saturating_sub(b));
    let after = store.circuit_stats();
    let calls = after.calls - before.calls;
    let connects = after.connects - before.connects;
    eprintln!(
        "cluster down for {window:?}: {rounds} rounds of 2 calls; {calls} reached the cluster \
         client, {} refused at once, {connects} reconnects, opened {} time(s); slowest call \
         while open {slowest_after_open:?}; process CPU {cpu:?} in all, {cpu_while_open:?} \
         in the {:?} after it opened (at {open_after:?})",
        after.refused - before.refused,
        after.opened - before.opened,
        window.saturating_sub(open_after),
    );
    assert!(after.open, "the circuit is open while no node answers");
    assert_eq!(
        after.opened - before.opened,
        1,
        "it opened once and stayed open"
    );
    assert!(
        calls <= 10,
        "only the calls before the circuit opened reach the cluster client: {calls} of {}",
        rounds * 2
    );
    assert!(
        after.refused - before.refused >= rounds,
        "the rest fail at once: {after:?}"
    );
    // One check before opening, then the backoff of 250 ms doubling to 2 s: reconnects due
    // at 0.25, 0.75, 1.75, 3.75 s after opening.
    assert!(connects <= 5, "reconnects follow the backoff: {connects}");
    assert!(
        slowest_after_open < Duration::from_millis(600),
        "a refused call or a reconnect to dead ports is quick: {slowest_after_open:?}"
    );

    for port in cluster.ports() {
        cluster.restart_node(port).expect("restart a node");
    }
    cluster
        .wait_until_ok(Duration::from_secs(30))
        .expect("the cluster is whole again");
    let took = healthy_within(&store, Duration::from_secs(10))
        .await
        .expect("the store finds the cluster again by itself");
    eprintln!("healthy again {took:?} after the cluster was ok");
    store
        .execute(at, StoreCommand::LoadClaim { user: UserId(1) })
        .await
        .expect("commands work again");
    let last = store.circuit_stats();
    assert!(!last.open, "closed again: {last:?}");
}

/// One dead master is not an unreachable cluster: with nothing but failing calls to its
/// slots and failing health checks (a `PING` goes to every master), the circuit checks, finds
/// the other nodes, and stays closed; calls to the other masters' slots all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_master_leaves_the_circuit_closed() {
    let Some((_one, cluster, store)) = cluster_and_store().await else {
        return;
    };
    let at = UnixMillis(T0);
    let claim = |user: u64| format!("cim:claim:{{u:{user}}}");
    let dead = cluster.master_of_key(&claim(1)).expect("an owner");
    let live_user = (2..1000)
        .find(|&u| cluster.master_of_key(&claim(u)) != Some(dead))
        .expect("a user on another master");
    cluster.kill_node(dead);
    let started = Instant::now();
    let (mut dead_failed, mut live_ok) = (0u32, 0u32);
    // Shorter than the cluster's node timeout (2 s): no replica takes over meanwhile.
    while started.elapsed() < Duration::from_millis(1500) {
        let dead_call = store
            .execute(at, StoreCommand::LoadClaim { user: UserId(1) })
            .await;
        dead_failed += u32::from(dead_call.is_err());
        let _ = store.health().await;
        // Quiet for longer than the circuit waits before it checks.
        tokio::time::sleep(Duration::from_millis(300)).await;
        store
            .execute(
                at,
                StoreCommand::LoadClaim {
                    user: UserId(live_user),
                },
            )
            .await
            .expect("a live master's slot answers");
        live_ok += 1;
    }
    let stats = store.circuit_stats();
    eprintln!(
        "one master dead: {dead_failed} failed calls to it, {live_ok} to a live one; {stats:?}"
    );
    assert!(dead_failed > 0, "calls to the dead master fail");
    assert_eq!(stats.opened, 0, "the circuit never opened: {stats:?}");
    assert!(
        stats.connects > 1,
        "it checked, and found the cluster: {stats:?}"
    );
}

/// A sync while one master is dead: the heads of the conversations on live masters are
/// read, and the store says which it could not read (`PartialHeads`), rather than failing
/// the whole sync of every user with a conversation there (every user, when it holds
/// `all`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_fails_only_the_heads_on_its_slots() {
    let Some((_one, cluster, store)) = cluster_and_store().await else {
        return;
    };
    let conv_meta = |conv: &ConvId| format!("cim:conv:{{c:{conv}}}:meta");
    let dead = cluster
        .master_of_key(&conv_meta(&ConvId::All))
        .expect("an owner of all");
    // A user, and a group, whose keys live on other masters.
    let mut user = None;
    for n in 0..50 {
        let u = register(&store, &format!("user{n}")).await;
        if cluster.master_of_key(&format!("cim:acct:{{u:{}}}", u.0)) != Some(dead) {
            user = Some(u);
            break;
        }
    }
    let user = user.expect("a user on a live master");
    let group = (0..1000)
        .map(|n| ConvId::group(&format!("g{n}")).expect("a group name"))
        .find(|g| cluster.master_of_key(&conv_meta(g)) != Some(dead))
        .expect("a group on a live master");
    assert_eq!(append(&store, user, 1, "hello all").await, Ok((1, false)));
    let at = UnixMillis(T0 + 2);
    let created = store
        .execute(
            at,
            StoreCommand::CreateGroup {
                conv: group.clone(),
                owner: user,
            },
        )
        .await;
    assert!(
        matches!(created, Ok(StoreReply::GroupCreated { .. })),
        "{created:?}"
    );
    let heads = |reply: &StoreReply| -> Vec<ConvId> {
        match reply {
            StoreReply::Heads(heads) | StoreReply::PartialHeads { heads, .. } => {
                heads.iter().map(|h| h.conv.clone()).collect()
            }
            other => panic!("not heads: {other:?}"),
        }
    };
    let whole = store
        .execute(at, StoreCommand::LoadHeads { user })
        .await
        .expect("heads");
    assert!(matches!(whole, StoreReply::Heads(_)), "{whole:?}");
    assert_eq!(heads(&whole), [ConvId::All, group.clone()]);

    // Read before the cluster's node timeout (2 s): no replica has taken over.
    cluster.kill_node(dead);
    let partial = store
        .execute(at, StoreCommand::LoadHeads { user })
        .await
        .expect("heads without the dead master's");
    assert_eq!(heads(&partial), [group]);
    let StoreReply::PartialHeads { unavailable, .. } = partial else {
        panic!("a partial answer: {partial:?}");
    };
    assert_eq!(unavailable, [ConvId::All]);
}

// --- acknowledging after replication (`--store-wait-replicas`) ---------------------------

/// A store whose appends wait for `replicas`. Its command timeout (and so its `WAIT`
/// timeout, half of it) is generous: a replica's acknowledgement on a loaded machine can
/// take more than the fast-failure tests' 500 ms.
fn waiting(replicas: u32) -> RedisOptions {
    RedisOptions {
        wait_replicas: replicas,
        command_timeout: Duration::from_secs(4),
        ..options()
    }
}

async fn register(store: &RedisStore, name: &str) -> UserId {
    match store
        .execute(
            UnixMillis(T0),
            StoreCommand::RegisterAccount {
                name: name.into(),
                password_hash: "phc".into(),
            },
        )
        .await
    {
        Ok(StoreReply::AccountRegistered(Ok(user))) => user,
        other => panic!("register {name}: {other:?}"),
    }
}

/// Appends `text` to `all` as `sender` with message id `id`: the stored message's seq and
/// whether it was a duplicate, or the store's error.
async fn append(
    store: &RedisStore,
    sender: UserId,
    id: u128,
    text: &str,
) -> Result<(u64, bool), String> {
    let now = UnixMillis(T0 + 1);
    match store
        .execute(
            now,
            StoreCommand::Append {
                conv: ConvId::All,
                sender,
                msg_id: ClientMsgId(id),
                body: Bytes::from(text.to_owned()),
                now,
                order: None,
                members_known: None,
            },
        )
        .await
    {
        Ok(StoreReply::Appended(Ok(a))) => Ok((a.message.seq, a.duplicate)),
        Ok(other) => panic!("append {text}: {other:?}"),
        Err(e) => Err(e.0),
    }
}

/// On a cluster, `WAIT` goes to the master of the conversation's slot, on the append's
/// connection: a dead replica of *another* master changes nothing (a `WAIT` sent to every
/// master, as the cluster client sends a bare one, would count 0 there and refuse), and a
/// dead replica of the conversation's own master makes the append's outcome unknown, though
/// it is stored: the resend is answered once the replica is back, with the same seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_counts_the_replicas_of_the_conversations_master_only() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    cluster
        .wait_for_replicas(Duration::from_secs(30))
        .expect("replicas in sync");
    let store = RedisStore::connect_cluster(&cluster.urls(), waiting(1))
        .await
        .expect("connect to the cluster");
    let plain = RedisStore::connect_cluster(&cluster.urls(), waiting(0))
        .await
        .expect("connect to the cluster");
    let alice = register(&store, "alice").await;
    let timed = Instant::now();
    assert_eq!(append(&store, alice, 1, "one").await, Ok((1, false)));
    let with_wait = timed.elapsed();
    let timed = Instant::now();
    assert_eq!(append(&plain, alice, 2, "two").await, Ok((2, false)));
    eprintln!(
        "an append with WAIT 1: {with_wait:?}; without: {:?}",
        timed.elapsed()
    );

    let log = "cim:conv:{c:all}:log";
    let master = cluster.master_of_key(log).expect("the log's master");
    let other = cluster
        .masters()
        .into_iter()
        .find(|&m| m != master)
        .expect("another master");
    let others = cluster.replicas_of(other);
    assert_eq!(
        others.len(),
        1,
        "one replica of the other master {other} (masters {:?}): {:?}",
        cluster.masters(),
        cluster.cli(master, &["CLUSTER", "NODES"])
    );
    cluster.kill_node(others[0]);
    assert_eq!(
        append(&store, alice, 3, "three").await,
        Ok((3, false)),
        "another master's replica does not count"
    );

    let own = cluster.replicas_of(master);
    assert_eq!(
        own.len(),
        1,
        "one replica of the log's master {master}: {:?}",
        cluster.cli(master, &["CLUSTER", "NODES"])
    );
    cluster.kill_node(own[0]);
    let timed = Instant::now();
    let unknown = append(&store, alice, 4, "four").await;
    let refused_in = timed.elapsed();
    let error = unknown.expect_err("no replica confirms: the outcome is unknown");
    assert!(error.contains("0 of 1 replicas"), "{error}");
    // It gave up after its `WAIT` timeout (the error names the replicas, not a timeout).
    assert!(
        refused_in >= store_wait_timeout(),
        "WAIT waits its timeout, then gives up: {refused_in:?}"
    );
    // It is stored all the same, so the replica-less store acknowledges the resend.
    assert_eq!(append(&plain, alice, 4, "four").await, Ok((4, true)));
    // The resend under WAIT is still unknown while the replica is away.
    assert!(append(&store, alice, 4, "four").await.is_err());

    for replica in [own[0], others[0]] {
        cluster.restart_node(replica).expect("restart a replica");
    }
    cluster
        .wait_for_replicas(Duration::from_secs(30))
        .expect("the replica syncs again");
    assert_eq!(
        append(&store, alice, 4, "four").await,
        Ok((4, true)),
        "the resend is acknowledged once the replica has it, under its first seq"
    );
}

fn store_wait_timeout() -> Duration {
    waiting(1).wait_timeout()
}

/// `redis-cli INFO replication` of the node at `port`.
fn replication(port: u16) -> String {
    std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "replication"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn replica_in_sync(replica: &RedisServer, within: Duration) {
    let started = Instant::now();
    while started.elapsed() < within {
        if replication(replica.port).contains("master_link_status:up") {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the replica did not sync within {within:?}");
}

/// One Redis with one replica (`REPLICAOF`): `WAIT` is pipelined after the append on the
/// same connection, so an append is acknowledged once the replica has it, and not while the
/// replica is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_acknowledges_after_its_replica_confirms() {
    let _one = ONE_AT_A_TIME.lock().await;
    let (Some(primary), Some(mut replica)) = (RedisServer::start(), RedisServer::start()) else {
        return;
    };
    let follow = format!("REPLICAOF 127.0.0.1 {}", primary.port);
    assert_eq!(replica.raw(&follow), "+OK");
    replica_in_sync(&replica, Duration::from_secs(10));
    let store = RedisStore::connect(&primary.url(), waiting(1))
        .await
        .expect("connect");
    let alice = register(&store, "alice").await;
    assert_eq!(append(&store, alice, 1, "one").await, Ok((1, false)));
    replica.kill();
    let error = append(&store, alice, 2, "two")
        .await
        .expect_err("no replica: unknown");
    assert!(error.contains("0 of 1 replicas"), "{error}");
    replica.restart().expect("restart the replica");
    assert_eq!(replica.raw(&follow), "+OK");
    replica_in_sync(&replica, Duration::from_secs(10));
    assert_eq!(
        append(&store, alice, 2, "two").await,
        Ok((2, true)),
        "the resend is acknowledged with the seq the first try took"
    );
    // Asking for more replicas than there are never acknowledges.
    let greedy = RedisStore::connect(&primary.url(), waiting(2))
        .await
        .expect("connect");
    assert!(append(&greedy, alice, 3, "three").await.is_err());
}

// --- one shard down ----------------------------------------------------------------------

/// One master dead (and marked failed by the cluster) and its replica told not to take over:
/// the store stays healthy (a server
/// stays listed, a route ready), a lease refresh answers per user — unknown for the users of
/// the dead shard only — and route reads leave out only those users, both before their
/// caller's deadline; once the replica is promoted, every user is answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_shard_fails_only_its_own_users() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    cluster
        .wait_for_replicas(Duration::from_secs(30))
        .expect("replicas in sync");
    let store = RedisStore::connect_cluster(&cluster.urls(), options())
        .await
        .expect("connect to the cluster");
    let claim = |user: u64| format!("cim:claim:{{u:{user}}}");
    let users: Vec<UserId> = (1..=30).map(UserId).collect();
    let dead = cluster.master_of_key(&claim(1)).expect("an owner");
    let replica = cluster.replicas_of(dead);
    assert_eq!(replica.len(), 1, "one replica of {dead}");
    cluster
        .cli(
            replica[0],
            &["CONFIG", "SET", "cluster-replica-no-failover", "yes"],
        )
        .expect("hold the replica back");
    let on_dead: Vec<bool> = users
        .iter()
        .map(|u| cluster.master_of_key(&claim(u.0)) == Some(dead))
        .collect();
    assert!(on_dead.iter().any(|d| *d) && on_dead.iter().any(|d| !*d));
    // A master-less shard must not stop the others (`deploy/redis-cluster.conf`).
    for port in cluster.ports() {
        cluster
            .cli(
                port,
                &["CONFIG", "SET", "cluster-require-full-coverage", "no"],
            )
            .expect("let the other shards serve");
    }
    cluster.kill_node(dead);
    // Past the node timeout: the cluster has marked the master failed (and, with full
    // coverage required, would now refuse every slot).
    let started = Instant::now();
    let failed = |flags: &str| flags.split(',').any(|f| f == "fail");
    while !cluster
        .cli(replica[0], &["CLUSTER", "NODES"])
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1].starts_with(&format!("127.0.0.1:{dead}@")) && failed(f[2])
        })
    {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the dead master is marked failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A caller waits one command timeout (a route's push gives `LoadRoutes` its
    // `--redis-timeout`), and the dead master's calls run into exactly that (the cluster
    // client's response timeout): the store must answer the others before then. Without
    // the per-slot bound the answers below took 502 ms of a 500 ms timeout, and a route's
    // push to a group with one member on the dead shard was dropped for every member.
    let answered_in_time = |asked: Instant| {
        let took = asked.elapsed();
        assert!(
            took < options().command_timeout,
            "answered in {took:?}, after its caller's deadline"
        );
    };
    let at = UnixMillis(T0);
    let refresh = StoreCommand::RefreshLeases {
        server: ServerId::new("s1"),
        lease_until: UnixMillis(T0 + 30_000),
        sessions: users.iter().map(|&u| (u, Epoch(1))).collect(),
    };
    store
        .health()
        .await
        .expect("healthy with two masters of three");
    let asked = Instant::now();
    let refreshed = store.execute(at, refresh.clone()).await;
    answered_in_time(asked);
    match refreshed {
        Ok(StoreReply::LeasesRefreshed(outcomes)) => {
            assert_eq!(outcomes.len(), users.len());
            for ((user, outcome), dead) in outcomes.iter().zip(&on_dead) {
                let want = if *dead {
                    LeaseRefresh::Unknown
                } else {
                    // No claim was ever made for them.
                    LeaseRefresh::Gone
                };
                assert_eq!(*outcome, want, "user {user:?}");
            }
        }
        other => panic!("a per-user answer: {other:?}"),
    }
    let asked = Instant::now();
    let routes = store
        .execute(
            at,
            StoreCommand::LoadRoutes {
                users: users.clone(),
            },
        )
        .await;
    answered_in_time(asked);
    match routes {
        Ok(StoreReply::Routes(routes)) => assert_eq!(routes.len(), users.len()),
        other => panic!("routes of the live shards: {other:?}"),
    }
    assert!(
        !store.circuit_stats().open,
        "one shard down is not an outage"
    );

    cluster
        .cli(replica[0], &["CLUSTER", "FAILOVER", "TAKEOVER"])
        .expect("promote the replica");
    cluster
        .wait_for_failover(dead, Duration::from_secs(30))
        .expect("the replica serves the slots");
    let started = Instant::now();
    loop {
        match store.execute(at, refresh.clone()).await {
            Ok(StoreReply::LeasesRefreshed(outcomes))
                if outcomes.iter().all(|(_, o)| *o == LeaseRefresh::Gone) =>
            {
                break;
            }
            other => assert!(
                started.elapsed() < Duration::from_secs(10),
                "every user answered again after the promotion: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
