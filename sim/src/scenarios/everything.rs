//! **everything**: a random mix of every fault and every workload: 3 servers, 2 routes,
//! 4 clients chatting in `all` and a group, and one user logged in from 2 clients at once
//! (through different routes), and one user who registers only once the chat is under way
//! (it owes `all` from its registration on, not the backlog). During the fault phase 1–4 faults of any kind (server
//! crashes, bounces and isolations; partitions, one-way partitions, stalls and slow links
//! between any roles; route and store crashes), one run in four also a store restart that
//! loses its last writes (the lost-tail fault) and one in four of the rest a store restart
//! that loses nothing; or, one run in four, the store is a cluster of 3 masters and one of
//! them fails over (`shard-failover`'s fault, with or without loss and `WAIT`) instead.
//! Then the healed phase. Judged by the
//! checker alone: no overlapping sessions, no loss, duplicate or reordering of acknowledged
//! messages, re-homes within the bound.

use std::time::Duration;

use crate::checker::ClientId;
use crate::scenarios::{
    ClientPlan, FaultKind, Plan, Rng, RunSpec, Scenario, ScenarioOutcome, chatters, drive,
    lossless_restart_fault, lost_tail_fault, random_faults, run_end, shard_failover_fault,
};

pub const CHATTERS: usize = 4;
pub const GROUP: &str = "crew";
pub const DUP: &str = "dup";
pub const LATE: &str = "late";

pub fn plan(run: RunSpec) -> Plan {
    let mut spec = run.cluster(3, 2);
    let mut rng = Rng::new(spec.derive_seed("everything plan", 0));
    let chat_from = Duration::from_secs(4);
    let fault_at = rng.duration(Duration::from_secs(6), Duration::from_secs(18));
    let healed_at = fault_at + rng.duration(Duration::from_secs(2), Duration::from_secs(15));
    let count = rng.between(1, 4) as usize;
    let mut actions = random_faults(&mut rng, &spec, &FaultKind::ALL, count, fault_at, healed_at);
    // One run in four also loses the store's tail. Drawn from its own seed, so the plan's
    // other draws, and the runs that do not draw it, stay as they were.
    let mut tail = Rng::new(spec.derive_seed("everything lost tail", 0));
    let mut sharded = Rng::new(spec.derive_seed("everything shard failover", 0));
    if sharded.between(0, 3) == 0 {
        // One run in four: the store is a cluster of 3 masters, one of which fails over
        // (with or without loss, with or without `WAIT`) instead of the whole store.
        spec.store_shards = 3;
        if sharded.between(0, 1) == 0 {
            spec.store_wait_replicas = 1;
        }
        let shard = sharded.between(0, 2) as usize;
        let lossless = sharded.between(0, 2) == 0;
        let (failover, _) =
            shard_failover_fault(&mut sharded, shard, lossless, fault_at, healed_at);
        actions.extend(failover);
    } else if tail.between(0, 3) == 0 {
        actions.extend(lost_tail_fault(&mut tail, fault_at, healed_at));
    } else if tail.between(0, 2) == 0 {
        // One run in four of the rest: a store restart that loses nothing.
        actions.extend(lossless_restart_fault(&mut tail, fault_at, healed_at));
    }
    let end = run_end(&spec, healed_at);
    let mut clients = chatters(&mut rng, CHATTERS, GROUP, (chat_from, healed_at));
    for i in 0..2u32 {
        clients.push(ClientPlan {
            client: ClientId(CHATTERS as u32 + i),
            name: DUP.to_owned(),
            password: "dup-password".to_owned(),
            route: i as usize,
            registers: i == 0,
            start_at: Duration::ZERO,
            login_at: Duration::from_secs(2) + Duration::from_millis(rng.between(0, 300)),
            group: None,
            chat: Some((chat_from, healed_at)),
        });
    }
    // Drawn from its own seed, so the plan's other draws stay as they were.
    let mut late = Rng::new(spec.derive_seed("everything late joiner", 0));
    clients.push(ClientPlan {
        client: ClientId(CHATTERS as u32 + 2),
        name: LATE.to_owned(),
        password: "late-password".to_owned(),
        route: 1,
        registers: true,
        start_at: chat_from + late.duration(Duration::from_secs(1), Duration::from_secs(3)),
        login_at: Duration::ZERO,
        group: None,
        chat: Some((chat_from, healed_at)),
    });
    Plan {
        spec,
        clients,
        actions,
        healed_at,
        end,
        group_members: CHATTERS,
        shard_outage: None,
    }
}

pub fn run(run: RunSpec) -> ScenarioOutcome {
    drive(Scenario::Everything, plan(run), |_, _| {})
}
