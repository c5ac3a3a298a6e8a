//! **duplicate-login**: one user ("dup") logs in concurrently from 3 SDK clients through
//! both routes, while another user chats; then the server holding dup's session crashes
//! (restarting at the heal), or is partitioned from everyone, or from its clients only.
//!
//! Beyond the checker (no two sessions of one user overlap), the machine's contract for
//! concurrent logins (DESIGN.md, "Sessions, claims and fencing"): a login without the live
//! claim's resume token gets 5000 and retries; a takeover kicks the older session, whose
//! client stops (`TakenOver`). So at the end exactly one of dup's clients is online, and
//! every one of them was online at some point or was refused with 5000.

use std::time::Duration;

use crate::checker::{ClientId, Seen};
use crate::scenarios::{
    Action, ClientPlan, Plan, Rng, RunSpec, Scenario, ScenarioOutcome, Target, drive, run_end,
};

pub const DUP: &str = "dup";
pub const DUP_CLIENTS: u32 = 3;

pub fn plan(run: RunSpec) -> Plan {
    let spec = run.cluster(2, 2);
    let mut rng = Rng::new(spec.derive_seed("duplicate-login plan", 0));
    let login_at = Duration::from_secs(2);
    let chat_from = Duration::from_secs(4);
    let fault_at = rng.duration(Duration::from_secs(5), Duration::from_secs(15));
    let fault_for = rng.duration(Duration::from_secs(2), Duration::from_secs(15));
    let healed_at = fault_at + fault_for;
    let target = Target::HolderOf(DUP.to_owned());
    let actions = match rng.between(0, 2) {
        0 => vec![
            (fault_at, Action::Crash(target)),
            (healed_at, Action::RestartCrashed),
        ],
        1 => vec![
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
    let mut clients: Vec<ClientPlan> = (0..DUP_CLIENTS)
        .map(|i| ClientPlan {
            client: ClientId(i),
            name: DUP.to_owned(),
            password: "dup-password".to_owned(),
            route: rng.between(0, 1) as usize,
            registers: i == 0,
            start_at: Duration::ZERO,
            // Concurrent: within a few hundred milliseconds of each other.
            login_at: login_at + Duration::from_millis(rng.between(0, 300)),
            group: None,
            chat: Some((chat_from, healed_at)),
        })
        .collect();
    clients.push(ClientPlan {
        client: ClientId(DUP_CLIENTS),
        name: "bob".to_owned(),
        password: "bob-password".to_owned(),
        route: 1,
        registers: true,
        start_at: Duration::ZERO,
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
        group_members: 0,
        shard_outage: None,
    }
}

pub fn run(run: RunSpec) -> ScenarioOutcome {
    drive(Scenario::DuplicateLogin, plan(run), |finished, problems| {
        let mut online_at_end = Vec::new();
        for i in 0..DUP_CLIENTS {
            let id = ClientId(i);
            let Some(history) = finished.rec.client(id) else {
                problems.push(format!("{id} of {DUP} never started"));
                continue;
            };
            let mut ever_online = false;
            let mut online = false;
            for (_, seen) in &history.events {
                match seen {
                    Seen::Online { .. } => {
                        ever_online = true;
                        online = true;
                    }
                    Seen::Reconnecting | Seen::Stopped(_) => online = false,
                    _ => {}
                }
            }
            if online {
                online_at_end.push(id);
            }
            let refused = finished
                .rec
                .client_counters(id)
                .get("login 5000 (repeat)")
                .copied()
                .unwrap_or(0);
            if !ever_online && refused == 0 {
                problems.push(format!(
                    "{id} of {DUP} was never online and never refused with 5000"
                ));
            }
        }
        if online_at_end.len() != 1 {
            problems.push(format!(
                "{} of {DUP}'s clients online at the end ({online_at_end:?}), expected exactly one",
                online_at_end.len()
            ));
        }
    })
}
