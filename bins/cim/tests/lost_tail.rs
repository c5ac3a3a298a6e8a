//! Issue 12 part 9, for real: a Redis restarted from data that lacks its last writes (what a
//! machine crash does to AOF's last second, or a promoted replica that lagged) must not hand
//! out the lost (log epoch, seq)s again. Two routes and two servers as processes on a
//! private Redis (AOF) and ZooKeeper, SDK clients.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use cim_core::ids::{ClientMsgId, ConvId, LogEpoch};

use support::{Cluster, take_recorder, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_that_lost_writes_moves_the_log_and_delivers_new_messages() {
    let Some(mut cluster) = Cluster::start("lost-tail").await else {
        return;
    };
    let ann = cluster.user("ann", 0).await;
    let mut bob = cluster.user("bob", 1).await;
    let recorder = take_recorder(&mut bob);
    let private = ConvId::private(ann.id, bob.id).unwrap();
    let send = |text: String| {
        let client = ann.client();
        let conv = private.clone();
        async move { client.send(conv, Bytes::from(text)).await.expect("acked") }
    };
    let has = |n: usize| {
        let conv = private.clone();
        move |seen: &support::Seen| seen.messages.get(&conv).is_some_and(|m| m.len() >= n)
    };

    for k in 1..=5 {
        send(format!("kept #{k}")).await;
    }
    recorder
        .wait_for(Duration::from_secs(20), "bob has the first five", has(5))
        .await;
    let copy = cluster.redis().copy_data().expect("copy redis data");
    let mut lost = Vec::new();
    for k in 6..=8 {
        lost.push(send(format!("lost #{k}")).await);
    }
    recorder
        .wait_for(Duration::from_secs(20), "bob has all eight", has(8))
        .await;
    let old_epoch = lost[0].log_epoch;
    assert_eq!(
        lost.iter()
            .map(|a| (a.log_epoch, a.seq))
            .collect::<Vec<_>>(),
        [(old_epoch, 6), (old_epoch, 7), (old_epoch, 8)]
    );

    // SIGKILL, and back from the copy: seqs 6-8 are gone from the store, not from bob.
    cluster
        .redis()
        .restart_from(&copy)
        .expect("redis restarts from the copy");
    let restarted = tokio::time::Instant::now();
    let (route_port, server_port) = (cluster.routes[0].port, cluster.servers[0].http_port);
    wait_until(
        Duration::from_secs(30),
        "route and server healthy",
        || async {
            support::health(route_port).await == Some(200)
                && support::health(server_port).await == Some(200)
        },
    )
    .await;

    let mut new = Vec::new();
    for k in 1..=3 {
        new.push(send(format!("new #{k}")).await);
    }
    let new_ids: Vec<ClientMsgId> = new.iter().map(|a| a.msg_id).collect();
    let conv = private.clone();
    let ids = new_ids.clone();
    recorder
        .wait_for(
            Duration::from_secs(30),
            "bob has the three messages sent after the restart",
            move |seen| {
                seen.messages
                    .get(&conv)
                    .is_some_and(|m| ids.iter().all(|id| m.iter().any(|(_, _, got)| got == id)))
            },
        )
        .await;
    println!(
        "after the restart from the copy: the new messages reached bob within {:?}",
        restarted.elapsed()
    );

    let (resets, messages) = {
        let seen = recorder.seen.lock().unwrap();
        (seen.resets.clone(), seen.messages[&private].clone())
    };
    // Under a new log epoch, which bob was told of.
    let new_epoch = new[0].log_epoch;
    assert_ne!(
        new_epoch, old_epoch,
        "new messages reused the lost log epoch"
    );
    assert!(
        resets
            .iter()
            .any(|(c, old, fresh)| *c == private && *old == old_epoch && *fresh == new_epoch),
        "bob was not told the log moved: {:?}",
        resets
    );
    // No (log epoch, seq) ever named two messages.
    let mut names: BTreeMap<(LogEpoch, u64), ClientMsgId> = BTreeMap::new();
    for (epoch, seq, id) in &messages {
        let first = names.entry((*epoch, *seq)).or_insert(*id);
        assert_eq!(first, id, "({}, {seq}) named two messages", epoch.0);
    }
    // And the new messages are seqs 6-8 of the new epoch, after the survivors.
    let under_new: Vec<(u64, ClientMsgId)> = messages
        .iter()
        .filter(|(epoch, _, _)| *epoch == new_epoch)
        .map(|(_, seq, id)| (*seq, *id))
        .collect();
    assert_eq!(
        under_new.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5, 6, 7, 8]
    );
    assert_eq!(
        under_new[5..].iter().map(|(_, id)| *id).collect::<Vec<_>>(),
        new_ids
    );
    cluster.assert_all_running();
}
