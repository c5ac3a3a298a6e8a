//! **failover**: 2 servers, 2 routes, 4 clients chatting in `all` and a group. During the
//! fault phase one server (picked by the seed) crashes (and restarts at the heal), or is
//! partitioned from everyone, or from its clients only, at a seeded time; then the network
//! heals and a quiet healed phase follows. The checker judges sessions, loss, duplicates,
//! order and re-home times against DESIGN.md's bound.

use std::time::Duration;

use crate::scenarios::{
    Action, Plan, Rng, RunSpec, Scenario, ScenarioOutcome, Target, chatters, drive, run_end,
};

pub const CLIENTS: usize = 4;
pub const GROUP: &str = "crew";

/// The plan of one seed.
pub fn plan(run: RunSpec) -> Plan {
    let spec = run.cluster(2, 2);
    let mut rng = Rng::new(spec.derive_seed("failover plan", 0));
    let chat_from = Duration::from_secs(4);
    let fault_at = rng.duration(Duration::from_secs(8), Duration::from_secs(20));
    let fault_for = rng.duration(Duration::from_secs(2), Duration::from_secs(15));
    let healed_at = fault_at + fault_for;
    let target = Target::Server(rng.between(0, 1) as usize);
    let actions = match rng.between(0, 3) {
        0 => vec![
            (fault_at, Action::Crash(target)),
            (healed_at, Action::RestartCrashed),
        ],
        1 => vec![
            // A bounce: the process dies and comes straight back.
            (fault_at, Action::Crash(target)),
            (fault_at, Action::RestartCrashed),
        ],
        2 => vec![
            (
                fault_at,
                Action::Isolate {
                    target,
                    clients_only: false,
                },
            ),
            (healed_at, Action::HealAll),
        ],
        _ => vec![
            (
                fault_at,
                Action::Isolate {
                    target,
                    clients_only: true,
                },
            ),
            (healed_at, Action::HealAll),
        ],
    };
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
    drive(Scenario::Failover, plan(run), |_, _| {})
}
