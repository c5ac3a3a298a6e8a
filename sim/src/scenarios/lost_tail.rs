//! **lost-tail**: 3 servers, 2 routes, 5 clients chatting in `all` and a group. During the
//! fault phase the store keeps a copy of its data, and 0.3–2 s later (clients have read the
//! writes in between) restarts from it with a new incarnation: what Redis does after a
//! machine crash with `appendfsync everysec`, or a replica promoted before it had its
//! master's last writes. Sometimes one more random fault joins in. Judged by the checker: no
//! (log epoch, seq) names two messages (consistency), every message acked under the log's
//! current epoch is delivered (loss), a client hands over another epoch's messages only after
//! a `LogReset` (the loss is reported, never hidden), and no claim epoch is issued twice.

use std::time::Duration;

use crate::scenarios::{
    FaultKind, Plan, Rng, RunSpec, Scenario, ScenarioOutcome, chatters, drive, lost_tail_fault,
    random_faults, run_end,
};

pub const CLIENTS: usize = 5;
pub const GROUP: &str = "crew";

pub fn plan(run: RunSpec) -> Plan {
    let spec = run.cluster(3, 2);
    let mut rng = Rng::new(spec.derive_seed("lost-tail plan", 0));
    let chat_from = Duration::from_secs(4);
    let fault_at = rng.duration(Duration::from_secs(7), Duration::from_secs(14));
    let healed_at = fault_at + rng.duration(Duration::from_secs(4), Duration::from_secs(10));
    let mut actions = lost_tail_fault(&mut rng, fault_at, healed_at);
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
    }
}

pub fn run(run: RunSpec) -> ScenarioOutcome {
    drive(Scenario::LostTail, plan(run), |_, _| {})
}
