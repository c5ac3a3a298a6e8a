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
                // The client keeps resending until acknowledged; only a session that stopped
                // for good fails (its reason is printed with the figures).
                let Ok(ack) = client.send(ConvId::All, body).await else {
                    return;
                };
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
        if let Some(reason) = &seen.stopped {
            eprintln!("u{m} ({:?}): its session stopped: {reason:?}", ids[m]);
        }
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
///
/// It was ignored for a while after a run refused a re-login during the failover with 9100
/// (account mismatch) and that session stopped for good; 14 runs in a row (alone, beside
/// the other test, and with two busy loops on the cores) did not refuse again, and a member
/// whose session stopped is now reported with its reason, so a recurrence says which.
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

/// One master dead and its replica held back (`cluster-replica-no-failover`), with
/// `cluster-require-full-coverage no` as `deploy/redis-cluster.conf` sets: users whose
/// records live on other masters keep chatting for longer than a lease, never fenced, and
/// both servers stay listed; a user of the dead shard loses its session (fenced at its lease
/// deadline, or sooner when its client's sync fails) and cannot log in again (the store does
/// not answer for it) until the replica is promoted, then it is back and chats.
///
/// The master picked holds neither `all` nor the live pair's conversation, so the live users
/// are untouched by the outage. (Were `all` on it, their syncs would still succeed, marked
/// incomplete, without `all`'s head: `store_cluster_faults` and the server's and client's
/// table tests cover that case.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_master_fences_only_its_own_users() {
    let Some(mut cluster) = Cluster::start_on_redis_cluster("one-shard").await else {
        return;
    };
    let mut users = Vec::new();
    for i in 0..8 {
        users.push(cluster.user(&format!("v{i}"), i % 2).await);
    }
    let redis = cluster.redis_cluster.as_ref().expect("a Redis Cluster");
    redis
        .wait_for_replicas(Duration::from_secs(30))
        .expect("replicas in sync");
    let master_of = |key: String| redis.master_of_key(&key).expect("an owner");
    let home = |u: &support::User| master_of(format!("cim:claim:{{u:{}}}", u.id.0));
    let conv_home = |c: &ConvId| master_of(format!("cim:conv:{{c:{c}}}:log"));
    let all_home = conv_home(&ConvId::All);
    // A master to kill, a user living on it, and two users living elsewhere whose private
    // conversation lives elsewhere too.
    let (dead, victim, (a, b)) = redis
        .masters()
        .into_iter()
        .filter(|&m| m != all_home)
        .find_map(|m| {
            let victim = users.iter().position(|u| home(u) == m)?;
            let live: Vec<usize> = (0..users.len()).filter(|&i| home(&users[i]) != m).collect();
            let pair = live.iter().enumerate().find_map(|(n, &x)| {
                live[n + 1..].iter().find_map(|&y| {
                    let conv = ConvId::private(users[x].id, users[y].id)?;
                    (conv_home(&conv) != m).then_some((x, y))
                })
            })?;
            Some((m, victim, pair))
        })
        .expect("eight users spread over three masters give such a choice");
    let replica = redis.replicas_of(dead);
    assert_eq!(replica.len(), 1, "one replica of {dead}");
    for port in redis.ports() {
        redis
            .cli(
                port,
                &["CONFIG", "SET", "cluster-require-full-coverage", "no"],
            )
            .expect("let the other shards serve");
    }
    redis
        .cli(
            replica[0],
            &["CONFIG", "SET", "cluster-replica-no-failover", "yes"],
        )
        .expect("hold the replica back");
    let live_seen = [take_recorder(&mut users[a]), take_recorder(&mut users[b])];
    let victim_seen = take_recorder(&mut users[victim]);
    let private = ConvId::private(users[a].id, users[b].id).expect("two users");

    let killed_at = Instant::now();
    redis.kill_node(dead);
    // Chat for longer than a lease (6 s): both live users' sessions must outlast it.
    let mut sent = Vec::new();
    let mut k = 0;
    while killed_at.elapsed() < Duration::from_secs(9) {
        let (from, _) = if k % 2 == 0 { (a, b) } else { (b, a) };
        let ack = tokio::time::timeout(
            Duration::from_secs(5),
            users[from].client().send(
                private.clone(),
                Bytes::from(format!("during the outage #{k}")),
            ),
        )
        .await
        .expect("acknowledged within 5 s while another shard is down")
        .expect("acknowledged");
        sent.push((ack.seq, ack.msg_id));
        k += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its session ends: fenced at its lease deadline, or sooner, when its own client's
    // periodic sync (which reads the user's records, on the dead shard) fails and it
    // reconnects; either way it is not online while its records are unreachable.
    let deadline = Instant::now() + Duration::from_secs(15);
    let ended = |seen: &support::Seen| seen.kicked_fenced || !seen.reconnecting.is_empty();
    while !ended(&victim_seen.seen.lock().unwrap()) {
        assert!(
            Instant::now() < deadline,
            "the dead shard's user's session ends: {:?}",
            victim_seen.seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (how, fenced_after) = {
        let seen = victim_seen.seen.lock().unwrap();
        let kicked = seen
            .kicks
            .first()
            .map(|(at, why)| (format!("kicked: {why:?}"), *at));
        let lost = seen
            .reconnecting
            .first()
            .map(|(at, why)| (format!("{why:?}"), *at));
        let (how, at) = match (kicked, lost) {
            (Some(k), Some(l)) => {
                if k.1 <= l.1 {
                    k
                } else {
                    l
                }
            }
            (Some(first), None) | (None, Some(first)) => first,
            (None, None) => unreachable!("the loop above waited for one of them"),
        };
        (how, at.saturating_duration_since(killed_at))
    };
    for seen in &live_seen {
        let seen = seen.seen.lock().unwrap();
        assert!(
            seen.kicks.is_empty(),
            "a live shard's user was kicked: {seen:?}"
        );
        let got: Vec<(u64, ClientMsgId)> = seen.messages[&private]
            .iter()
            .map(|(_, seq, id)| (*seq, *id))
            .collect();
        assert!(
            sent.iter().all(|m| got.contains(m)),
            "every message of the outage delivered: {got:?} vs {sent:?}"
        );
    }
    let view = cluster.registry_view().await;
    assert!(
        support::listed(&view, "s1") && support::listed(&view, "s2"),
        "both servers stay listed"
    );
    let online_before = victim_seen.seen.lock().unwrap().online_at.len();
    // Not back while its shard has no master: every login attempt is refused by the store.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        victim_seen.seen.lock().unwrap().online_at.len(),
        online_before,
        "the dead shard's user cannot log in"
    );

    let redis = cluster.redis_cluster.as_ref().expect("a Redis Cluster");
    let promoted_at = Instant::now();
    redis
        .cli(replica[0], &["CLUSTER", "FAILOVER", "TAKEOVER"])
        .expect("promote the replica");
    victim_seen
        .wait_for(
            Duration::from_secs(30),
            "the dead shard's user is back once the replica serves",
            move |seen| seen.online_at.len() > online_before,
        )
        .await;
    let back_in = promoted_at.elapsed();
    tokio::time::timeout(
        Duration::from_secs(10),
        users[victim]
            .client()
            .send(ConvId::All, Bytes::from_static(b"back")),
    )
    .await
    .expect("acknowledged in time")
    .expect("acknowledged");
    println!(
        "one master dead: {} private messages acknowledged and delivered during it; its user's \
         session ended ({how}) {fenced_after:?} after the kill; back {back_in:?} after the \
         promotion",
        sent.len()
    );
    cluster.assert_all_running();
}
