//! **lost-tail**: 3 servers, 2 routes, 5 clients chatting in `all` and a group. During the
//! fault phase the store comes back in a new incarnation, in one of three ways: without
//! losing anything (a clean restart, a replica promoted with all its master's writes); from
//! a copy of its data kept 0.3–2 s earlier, after clients read the writes in between (what
//! Redis does after a machine crash with `appendfsync everysec`, or a replica promoted
//! before it had its master's last writes); or first the one, then the other. Sometimes one
//! more random fault joins in. Judged by the checker: no (log epoch, seq) names two messages
//! (consistency), a move carries the same messages under the new epoch (log moves), every
//! message acked under the log's current epoch is delivered (loss), a client continues
//! across a move from its epoch without handing anything over again and reports what the
//! store lost of what it had (`LogMoved`: never hidden, never a reset), and no claim epoch
//! is issued twice.

use std::time::Duration;

use crate::scenarios::{
    FaultKind, Plan, Rng, RunSpec, Scenario, ScenarioOutcome, chatters, drive,
    lossless_restart_fault, lost_tail_fault, random_faults, run_end,
};

pub const CLIENTS: usize = 5;
pub const GROUP: &str = "crew";

pub fn plan(run: RunSpec) -> Plan {
    let spec = run.cluster(3, 2);
    let mut rng = Rng::new(spec.derive_seed("lost-tail plan", 0));
    let chat_from = Duration::from_secs(4);
    let fault_at = rng.duration(Duration::from_secs(7), Duration::from_secs(14));
    let healed_at = fault_at + rng.duration(Duration::from_secs(4), Duration::from_secs(10));
    // 0: a restart that loses nothing; 1: one that loses a tail; 2: the first, then the second.
    let mode = rng.between(0, 2);
    let mut actions = Vec::new();
    if mode != 1 {
        actions.extend(lossless_restart_fault(&mut rng, fault_at, healed_at));
    }
    if mode != 0 {
        let from = if mode == 2 {
            fault_at + Duration::from_secs(3)
        } else {
            fault_at
        };
        actions.extend(lost_tail_fault(&mut rng, from.min(healed_at), healed_at));
    }
    if rng.between(0, 2) == 0 {
        actions.extend(random_faults(
            &mut rng,
            &spec,
            &FaultKind::ALL,
            1,
            fault_at,
            healed_at,
        ));
    }
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
    drive(Scenario::LostTail, plan(run), |_, _| {})
}
