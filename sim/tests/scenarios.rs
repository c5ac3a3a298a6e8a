//! Each scenario over a few fixed seeds, and the determinism of a seed. `SIM_SEED=n` runs
//! only that seed (a replay); every run prints its seed first and a failure its replay
//! command.

use cim_sim::scenarios::{Scenario, ScenarioOutcome};

fn seeds(default: &[u64]) -> Vec<u64> {
    match std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(seed) => vec![seed],
        None => default.to_vec(),
    }
}

fn run(scenario: Scenario, seed: u64) -> ScenarioOutcome {
    println!("SIM_SEED={seed}");
    let outcome = scenario.run(seed);
    println!("{outcome}");
    outcome
}

fn assert_clean(scenario: Scenario, seeds: &[u64]) {
    let failed: Vec<String> = seeds
        .iter()
        .map(|&seed| run(scenario, seed))
        .filter(|o| !o.is_clean())
        .map(|o| o.to_string())
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn failover_over_fixed_seeds() {
    assert_clean(Scenario::Failover, &seeds(&[1, 2, 3, 4, 5]));
}

#[test]
fn duplicate_login_over_fixed_seeds() {
    assert_clean(Scenario::DuplicateLogin, &seeds(&[1, 2, 3, 4, 5]));
}

#[test]
fn a_seed_replays_identically() {
    let seed = seeds(&[7])[0];
    let first = run(Scenario::DuplicateLogin, seed);
    let again = run(Scenario::DuplicateLogin, seed);
    assert_eq!(
        (first.trace_hash, &first.counters, first.sim_time),
        (again.trace_hash, &again.counters, again.sim_time),
        "SIM_SEED={seed}: two runs of one seed differ"
    );
    assert!(first.counters.get("sessions opened").copied().unwrap_or(0) > 0);
}
