//! **broadcast**: 3 servers, 2 routes, 6 clients all in one group, posting to `all` and the
//! group. During the fault phase 1–3 faults cut servers, routes or the store from each other
//! (partitions, one-way partitions, stalls, slow links), or crash a route or the store;
//! clients on untouched servers never disconnect. At the end of the healed phase every
//! online member must have every acknowledged message exactly once, in seq order (the
//! checker's loss, duplicate and order invariants), and every re-home must be in bound.

use std::time::Duration;

use crate::scenarios::{
    FaultKind, Plan, Rng, RunSpec, Scenario, ScenarioOutcome, chatters, drive, random_faults,
    run_end,
};

pub const CLIENTS: usize = 6;
pub const GROUP: &str = "crew";

/// What the broadcast faults draw from: everything but server deaths and isolations, which
/// are the failover scenario's.
const KINDS: [FaultKind; 9] = [
    FaultKind::ServerRoutePartition,
    FaultKind::ServerRouteOneWay,
    FaultKind::ServerRouteHold,
    FaultKind::ServerRouteLatency,
    FaultKind::ServerStorePartition,
    FaultKind::RouteStorePartition,
    FaultKind::RouteCrash,
    FaultKind::StoreCrash,
    FaultKind::ServerCutFromClients,
];

pub fn plan(run: RunSpec) -> Plan {
    let spec = run.cluster(3, 2);
    let mut rng = Rng::new(spec.derive_seed("broadcast plan", 0));
    let chat_from = Duration::from_secs(4);
    let fault_at = rng.duration(Duration::from_secs(8), Duration::from_secs(16));
    let healed_at = fault_at + rng.duration(Duration::from_secs(3), Duration::from_secs(15));
    let count = rng.between(1, 3) as usize;
    let actions = random_faults(&mut rng, &spec, &KINDS, count, fault_at, healed_at);
    let end = run_end(&spec, healed_at);
    let clients = chatters(&mut rng, CLIENTS, GROUP, (chat_from, healed_at));
    Plan {
        spec,
        clients,
        actions,
        healed_at,
        end,
        group_members: CLIENTS,
        shard_outage: None,
    }
}

pub fn run(run: RunSpec) -> ScenarioOutcome {
    drive(Scenario::Broadcast, plan(run), |_, _| {})
}
