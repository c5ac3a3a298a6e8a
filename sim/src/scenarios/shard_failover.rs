//! **shard-failover**: 3 servers, 2 routes, 6 clients chatting in `all` and a group, on a
//! store sharded like a Redis Cluster of 3 masters (`store-1`..`store-3`), users and
//! conversations spread over them by hash slot. During the fault phase one master — never
//! the one holding `all`, so at least one conversation lives on a master that does not
//! fail — fails over to its replica: without loss, or losing the writes its replica had not
//! yet copied (after clients read some of them). Half the runs acknowledge appends only
//! after the replica confirmed them (`WAIT`, `--store-wait-replicas 1`).
//!
//! Judged by the checker: every invariant of `lost-tail` (no (log epoch, seq) names two
//! messages, acked messages under the current epoch delivered, a loss reported by
//! `LogMoved`, never hidden, no claim epoch reused); with `WAIT`, no acknowledged message
//! lost at all (invariant 10); and users on the masters that did not fail keep chatting: a
//! message of theirs to a conversation on such a master, submitted while the master is
//! down, is acked within [`ACK_BOUND`] (invariant 11).

use std::time::Duration;

use cim_core::ids::ConvId;
use cim_core::slots::Shards;

use crate::scenarios::{
    Plan, PlannedOutage, Rng, RunSpec, Scenario, ScenarioOutcome, chatters, drive, run_end,
    shard_failover_fault,
};

pub const CLIENTS: usize = 6;
pub const GROUP: &str = "crew";
pub const MASTERS: usize = 3;

/// How long a message between a user and a conversation on masters that did not fail may
/// wait for its ack while another master is down. A healthy ack takes a few network hops
/// (up to 100 ms each) and one store step; what can stretch it without any fault is the
/// tight send limit (half the seeds: 4 a second, bursts of 3, while a reconnect burst sends
/// up to 6 — a refused message is resent when the limit allows, about 1.5 s later) and the
/// outbox's resend after a store request timeout (2 s). 8 s leaves room for two of those
/// back to back, and is still far below what the failure would cost those users if it
/// reached them: a fenced session's re-home alone (heartbeat timeout + backoff cap + login
/// and connect timeouts) is longer than that, and the outage lasts 3–6 s on top.
pub const ACK_BOUND: Duration = Duration::from_secs(8);

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
    let chat_from = Duration::from_secs(4);
    let fault_at = rng.duration(Duration::from_secs(7), Duration::from_secs(14));
    // Long enough for every action: the failover within 5 s, the promotion 3–6 s later.
    let healed_at = fault_at + Duration::from_secs(12);
    let (actions, (from, until)) =
        shard_failover_fault(&mut rng, shard, lossless, fault_at, healed_at);
    let end = run_end(&spec, healed_at);
    let clients = chatters(&mut rng, CLIENTS, GROUP, (chat_from, healed_at));
    Plan {
        spec,
        clients,
        actions,
        healed_at,
        end,
        group_members: CLIENTS,
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
