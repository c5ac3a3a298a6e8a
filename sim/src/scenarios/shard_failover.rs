//! **shard-failover**: 3 servers, 2 routes, 6 clients chatting in `all` and a group, on a
//! store sharded like a Redis Cluster of 3 masters (`store-1`..`store-3`), users and
//! conversations spread over them by hash slot. During the fault phase one master — never
//! the one holding `all`, so at least one conversation lives on a master that does not
//! fail, and always the one holding the group — fails over to its replica: without loss, or losing the writes its replica had not
//! yet copied (after clients read some of them). Half the runs acknowledge appends only
//! after the replica confirmed them (`WAIT`, `--store-wait-replicas 1`).
//!
//! Judged by the checker: every invariant of `lost-tail` (no (log epoch, seq) names two
//! messages, acked messages under the current epoch delivered, a loss reported by
//! `LogMoved`, never hidden, no claim epoch reused); with `WAIT`, no acknowledged message
//! lost at all (invariant 10); and users on the masters that did not fail keep chatting: a
//! message of theirs to a conversation on such a master, submitted while the master is
//! down, is acked within [`ACK_BOUND`] (invariant 11). Half the users chat in `all` only;
//! those in the failing master's group are not promised that (see [`plan`]).

use std::time::Duration;

use cim_core::ids::ConvId;
use cim_core::slots::Shards;

use crate::scenarios::{
    Plan, PlannedOutage, Rng, RunSpec, Scenario, ScenarioOutcome, chatters, drive, run_end,
    shard_failover_fault,
};

pub const CLIENTS: usize = 6;
pub const MASTERS: usize = 3;
/// Group names to choose from: the run's group is the first on the failing master, so the
/// failover moves a log clients are reading (with 3 masters these cover each of them).
pub const GROUPS: [&str; 5] = ["ops", "dev", "team", "club", "crew"];

/// How long a message between a user and a conversation on masters that did not fail may
/// wait for its ack while another master is down. A healthy ack takes a few network hops
/// (up to 100 ms each) and one store step; what stretches it without any fault is the tight
/// send limit (half the seeds: 4 a second, bursts of 3, while a chat burst sends up to 5 —
/// a refused message is resent when the limit allows): the slowest seen in 200 seeds was
/// about 4 s. 6 s leaves that margin, and is well below the 8–12 s the failed master is
/// down, so a message that waited for the failed master (a health check of "every master",
/// a lane shared with its commands) is caught if it was sent in the outage's first 2 s.
pub const ACK_BOUND: Duration = Duration::from_secs(6);

pub fn plan(run: RunSpec) -> Plan {
    let mut spec = run.cluster(3, 2);
    spec.store_shards = MASTERS;
    let mut rng = Rng::new(spec.derive_seed("shard-failover plan", 0));
    if rng.between(0, 1) == 0 {
        spec.store_wait_replicas = 1;
    }
    let shards = Shards::new(MASTERS, 0);
    // Never the master of `all`: its chat must go on.
    let all = shards.of_conv(&ConvId::All);
    let candidates: Vec<usize> = (0..MASTERS).filter(|&m| m != all).collect();
    let shard = rng.pick(&candidates);
    let lossless = rng.between(0, 2) == 0;
    let group = GROUPS
        .into_iter()
        .find(|g| ConvId::group(g).is_ok_and(|c| shards.of_conv(&c) == shard))
        .unwrap_or(GROUPS[0]);
    let chat_from = Duration::from_secs(4);
    let fault_at = rng.duration(Duration::from_secs(7), Duration::from_secs(14));
    // Long enough for every action: the failover within 5 s, the promotion 8–12 s later.
    let healed_at = fault_at + Duration::from_secs(18);
    let (actions, (from, until)) =
        shard_failover_fault(&mut rng, shard, lossless, fault_at, healed_at);
    let end = run_end(&spec, healed_at);
    let mut clients = chatters(&mut rng, CLIENTS, group, (chat_from, healed_at));
    // Half the users chat in `all` only: a user who also posts to the failing master's
    // group resends its stuck messages there, which share its send limit with the rest
    // (a tight limit then delays its `all` messages too), so invariant 11 is about them.
    for c in clients.iter_mut().filter(|c| c.client.0 % 2 == 1) {
        c.group = None;
    }
    let group_members = clients.iter().filter(|c| c.group.is_some()).count();
    Plan {
        spec,
        clients,
        actions,
        healed_at,
        end,
        group_members,
        shard_outage: Some(PlannedOutage {
            shard,
            from,
            until,
            ack_bound: ACK_BOUND,
        }),
    }
}

pub fn run(run: RunSpec) -> ScenarioOutcome {
    drive(Scenario::ShardFailover, plan(run), |_, _| {})
}
