//! Issue 12 part 9, for real: a Redis restarted from data that lacks its last writes (what a
//! machine crash does to AOF's last second, or a promoted replica that lagged) must not hand
//! out the lost (log epoch, seq)s again, and a restart that lost nothing must not hand a
//! client what it already has. Two routes and two servers as processes on a private Redis
//! (AOF) and ZooKeeper, SDK clients.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use cim_core::ids::{ClientMsgId, ConvId, LogEpoch};

use support::{Cluster, take_recorder, wait_until};

/// Five messages bob read, then (if `lose`) three more he read too, then Redis restarted
/// from a copy of its data taken after the first five (SIGKILL), then three new messages.
/// Returns what bob's application saw, the epochs, and the new messages' ids.
async fn restart_after_five(name: &str, lose: bool) -> Option<Outcome> {
    let mut cluster = Cluster::start(name).await?;
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

    let mut old_epoch = LogEpoch(0);
    for k in 1..=5 {
        old_epoch = send(format!("kept #{k}")).await.log_epoch;
    }
    recorder
        .wait_for(Duration::from_secs(20), "bob has the first five", has(5))
        .await;
    let copy = cluster.redis().copy_data().expect("copy redis data");
    if lose {
        let mut lost = Vec::new();
        for k in 6..=8 {
            lost.push(send(format!("lost #{k}")).await);
        }
        recorder
            .wait_for(Duration::from_secs(20), "bob has all eight", has(8))
            .await;
        assert_eq!(
            lost.iter()
                .map(|a| (a.log_epoch, a.seq))
                .collect::<Vec<_>>(),
            [(old_epoch, 6), (old_epoch, 7), (old_epoch, 8)]
        );
    }

    // SIGKILL, and back from the copy: seqs 6-8 (if sent) are gone from the store, not from
    // bob.
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
    let seen = recorder.seen.lock().unwrap().clone();
    cluster.assert_all_running();
    Some(Outcome {
        messages: seen.messages[&private].clone(),
        resets: seen.resets.clone(),
        moves: seen.moves.clone(),
        conv: private,
        old_epoch,
        new_epoch: new[0].log_epoch,
        new_ids,
    })
}

struct Outcome {
    conv: ConvId,
    messages: Vec<(LogEpoch, u64, ClientMsgId)>,
    resets: Vec<(ConvId, LogEpoch, LogEpoch)>,
    moves: Vec<(ConvId, LogEpoch, LogEpoch, u64, u64)>,
    old_epoch: LogEpoch,
    new_epoch: LogEpoch,
    new_ids: Vec<ClientMsgId>,
}

impl Outcome {
    /// No (log epoch, seq) named two messages, and no message was handed over twice.
    fn assert_one_name_one_content(&self) {
        let mut names: BTreeMap<(LogEpoch, u64), ClientMsgId> = BTreeMap::new();
        let mut ids = BTreeSet::new();
        for (epoch, seq, id) in &self.messages {
            let first = names.entry((*epoch, *seq)).or_insert(*id);
            assert_eq!(first, id, "({}, {seq}) named two messages", epoch.0);
            assert!(ids.insert(*id), "message {id:?} handed over twice");
        }
    }

    /// (seq, id) of what bob got under the new epoch.
    fn under_new(&self) -> Vec<(u64, ClientMsgId)> {
        self.messages
            .iter()
            .filter(|(epoch, _, _)| *epoch == self.new_epoch)
            .map(|(_, seq, id)| (*seq, *id))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_that_lost_writes_moves_the_log_and_reports_the_loss() {
    let Some(o) = restart_after_five("lost-tail", true).await else {
        return;
    };
    // Under a new log epoch, which bob was told of: it carried 1-5 over, and the 3 messages
    // bob had past them are reported lost.
    assert_ne!(
        o.new_epoch, o.old_epoch,
        "new messages reused the lost log epoch"
    );
    assert_eq!(
        o.moves,
        [(o.conv.clone(), o.old_epoch, o.new_epoch, 5, 3)],
        "bob was not told the log moved and lost 3"
    );
    assert_eq!(o.resets, [], "a move bob could continue reset him");
    o.assert_one_name_one_content();
    // The new messages are seqs 6-8 of the new epoch, after the survivors, which bob is not
    // handed again.
    assert_eq!(
        o.under_new(),
        [6, 7, 8]
            .into_iter()
            .zip(o.new_ids.iter().copied())
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_that_lost_nothing_continues_without_handing_anything_over_again() {
    let Some(o) = restart_after_five("lossless-restart", false).await else {
        return;
    };
    assert_ne!(o.new_epoch, o.old_epoch);
    assert_eq!(
        o.moves,
        [(o.conv.clone(), o.old_epoch, o.new_epoch, 5, 0)],
        "bob did not continue across the move"
    );
    assert_eq!(o.resets, []);
    o.assert_one_name_one_content();
    assert_eq!(
        o.messages
            .iter()
            .map(|(epoch, seq, _)| (*epoch, *seq))
            .collect::<Vec<_>>(),
        (1..=5)
            .map(|seq| (o.old_epoch, seq))
            .chain((6..=8).map(|seq| (o.new_epoch, seq)))
            .collect::<Vec<_>>()
    );
}
