//! The Redis Cluster store under faults of the cluster itself, each on a cluster of its own
//! (they kill nodes): what the store does while no node answers, and what acknowledging
//! after replication (`WAIT`) costs and guarantees.
//!
//! Skipped with a message without `redis-server` / `redis-cli`; failed under `CI=true`.

// The nodes are processes of their own: deadlines and CPU windows are on the real clock.
#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant};

use cim_core::ids::{UnixMillis, UserId};
use cim_core::store::StoreCommand;
use cim_io::store::{RedisOptions, RedisStore, Store};
use cim_testkit::RedisCluster;

const T0: u64 = 1_700_000_000_000;

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
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let store = RedisStore::connect_cluster(&cluster.urls(), options())
        .await
        .expect("connect to the cluster");
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
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let store = RedisStore::connect_cluster(&cluster.urls(), options())
        .await
        .expect("connect to the cluster");
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
