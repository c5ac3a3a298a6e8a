//! A store failover under load, for real: two routes and two servers (processes) on a Redis
//! Cluster of their own (three masters, one replica each), four senders writing to `all`
//! as fast as their acknowledgements come back, and a SIGKILL of the master that holds the
//! `all` conversation's slot. The cluster promotes the replica by itself.
//!
//! Run twice: with `--store-wait-replicas 1` (an append is acknowledged only once the
//! replica has it) and without. Each prints acknowledged, delivered, lost and the time to
//! recover (run with `--nocapture`); only the `WAIT` run asserts, since without it an
//! acknowledged message that had not reached the replica is lost by design (the durability
//! limit in README).
//!
//! With one replica per master, the promoted replica has none of its own: `WAIT 1` then
//! holds every acknowledgement on that shard until the old master is back as its replica.
//! The test restarts it once the failover is done, as the node's supervisor (systemd's
//! `Restart=always`) would; `deploy/cluster.md` says to run two replicas per master where
//! acknowledgements must not wait for that.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cim_core::ids::{ClientMsgId, ConvId, UserId};
use tokio::time::Instant;

use support::{Cluster, Recorder, take_recorder};

/// Per sender, (seq, msg id, when acknowledged) of each acknowledged message.
type AckLog = Arc<Mutex<Vec<Vec<(u64, ClientMsgId, Instant)>>>>;

const SENDERS: usize = 4;
const PER_SENDER: usize = 120;

/// What one run measured.
#[derive(Debug)]
struct Figures {
    acked: usize,
    /// Acknowledged messages every member received exactly once, under their seq.
    delivered: usize,
    /// Acknowledged messages some member never received under their acknowledged seq.
    lost: usize,
    /// From the SIGKILL until every sender was acknowledged again after its longest pause.
    recovered_in: Option<Duration>,
    /// From the SIGKILL until the replica served the slots.
    failover_in: Duration,
    /// Whether every member saw exactly the acknowledged messages, in seq order.
    exact: bool,
}

async fn run(wait: bool) -> Option<Figures> {
    let route_args: &[&str] = if wait {
        &["--store-wait-replicas", "1"]
    } else {
        &[]
    };
    let tag = if wait { "failover-wait" } else { "failover" };
    let mut cluster = Cluster::start_on_redis_cluster_with(tag, route_args).await?;
    let redis = cluster.redis_cluster.as_ref().expect("a Redis Cluster");
    redis
        .wait_for_replicas(Duration::from_secs(30))
        .expect("replicas in sync");
    let mut users = Vec::new();
    for i in 0..SENDERS {
        users.push(cluster.user(&format!("u{i}"), i % 2).await);
    }
    let recorders: Vec<Recorder> = users.iter_mut().map(take_recorder).collect();
    let ids: Vec<UserId> = users.iter().map(|u| u.id).collect();

    let acked: AckLog = Arc::new(Mutex::new(vec![Vec::new(); SENDERS]));
    let mut senders = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let client = user.client().clone();
        let acked = acked.clone();
        senders.push(tokio::spawn(async move {
            for k in 0..PER_SENDER {
                let body = Bytes::from(format!("u{i} #{k}"));
                let ack = client
                    .send(ConvId::All, body)
                    .await
                    .expect("the client keeps resending until acknowledged");
                acked.lock().unwrap()[i].push((ack.seq, ack.msg_id, Instant::now()));
            }
        }));
    }
    let count = |acked: &AckLog| -> usize { acked.lock().unwrap().iter().map(Vec::len).sum() };
    let total = SENDERS * PER_SENDER;
    support::wait_until(Duration::from_secs(60), "a fifth of the traffic", || {
        let n = count(&acked);
        async move { n >= total / 5 }
    })
    .await;

    let slot = redis.slot_of("cim:conv:{c:all}:log");
    let killed_at = Instant::now();
    let master = redis.kill_master_of_slot(slot).expect("the master of all");
    let failover_in =
        tokio::task::block_in_place(|| redis.wait_for_failover(master, Duration::from_secs(30)))
            .expect("the replica takes over");
    // The supervisor brings the dead node back; it rejoins as the new master's replica.
    tokio::task::block_in_place(|| {
        redis.restart_node(master).expect("restart the old master");
        redis.wait_for_replicas(Duration::from_secs(30))
    })
    .expect("the old master syncs as a replica");

    let finished = tokio::time::timeout(Duration::from_secs(90), async {
        for s in senders {
            s.await.expect("sender");
        }
    })
    .await;
    // Per sender, the end of its longest pause between two acknowledgements around the kill
    // (acknowledgements already on their way when it came land just after it); the
    // slowest sender's is when every sender was acknowledged again.
    let recovered_in = {
        let acked = acked.lock().unwrap();
        acked
            .iter()
            .map(|mine| {
                let times: Vec<Instant> = mine
                    .iter()
                    .map(|(_, _, at)| *at)
                    .filter(|at| *at + Duration::from_secs(1) > killed_at)
                    .collect();
                times
                    .windows(2)
                    .max_by_key(|w| w[1].duration_since(w[0]))
                    .map(|w| w[1].saturating_duration_since(killed_at))
            })
            .collect::<Option<Vec<_>>>()
            .and_then(|each| each.into_iter().max())
    };
    let acked: Vec<(u64, ClientMsgId)> = acked
        .lock()
        .unwrap()
        .iter()
        .flatten()
        .map(|(seq, id, _)| (*seq, *id))
        .collect();
    let mut want: Vec<(u64, ClientMsgId)> = acked.clone();
    want.sort_unstable();

    // Give every member a bounded time to catch up, then judge what each has.
    let deadline = Instant::now() + Duration::from_secs(30);
    let has_all = |r: &Recorder| {
        let seen = r.seen.lock().unwrap();
        let got: BTreeMap<(u64, ClientMsgId), usize> =
            seen.messages.get(&ConvId::All).into_iter().flatten().fold(
                BTreeMap::new(),
                |mut m, (_, seq, id)| {
                    *m.entry((*seq, *id)).or_default() += 1;
                    m
                },
            );
        want.iter().all(|k| got.contains_key(k))
    };
    while Instant::now() < deadline && !recorders.iter().all(has_all) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut lost = 0;
    let mut exact = finished.is_ok() && acked.len() == total;
    for (m, r) in recorders.iter().enumerate() {
        let seen = r.seen.lock().unwrap();
        let got: Vec<(u64, ClientMsgId)> = seen
            .messages
            .get(&ConvId::All)
            .into_iter()
            .flatten()
            .map(|(_, seq, id)| (*seq, *id))
            .collect();
        let missing = want.iter().filter(|k| !got.contains(k)).count();
        lost = lost.max(missing);
        if got != want {
            exact = false;
            eprintln!(
                "u{m} ({:?}): {} received, {missing} acknowledged ones missing",
                ids[m],
                got.len()
            );
        }
    }
    cluster.assert_all_running();
    Some(Figures {
        acked: acked.len(),
        delivered: acked.len() - lost,
        lost,
        recovered_in,
        failover_in,
        exact,
    })
}

/// With `--store-wait-replicas 1` every acknowledged message survives the master's SIGKILL
/// and reaches every member exactly once, in order, and every client recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_all_masters_sigkill_loses_no_acknowledged_message_with_wait() {
    let Some(with_wait) = run(true).await else {
        return;
    };
    let Some(without) = run(false).await else {
        return;
    };
    println!("| run | acknowledged | delivered | lost | failover | every sender acked again |");
    println!("|---|---|---|---|---|---|");
    for (name, f) in [("WAIT 1", &with_wait), ("no WAIT", &without)] {
        println!(
            "| {name} | {} | {} | {} | {:.1} s | {} |",
            f.acked,
            f.delivered,
            f.lost,
            f.failover_in.as_secs_f64(),
            f.recovered_in
                .map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
        );
    }
    assert_eq!(with_wait.acked, SENDERS * PER_SENDER, "{with_wait:?}");
    assert_eq!(with_wait.lost, 0, "{with_wait:?}");
    assert!(with_wait.exact, "exactly once, in seq order: {with_wait:?}");
    assert!(with_wait.recovered_in.is_some(), "{with_wait:?}");
}
