//! The sweep CLI: runs scenarios over seeds and prints a table.
//!
//! ```text
//! cargo run -p cim-sim --release -- --scenario <failover|duplicate-login|all> --seeds N
//! SIM_SEED=n cargo run -p cim-sim --release -- --scenario failover    # replay one seed
//! ```
//!
//! Every run prints `SIM_SEED=<n>` (to stderr) before it starts; a failing run prints its
//! violations and the replay command. Exit status 1 if any run found a violation.

use std::time::Duration;

use cim_sim::record::{Counters, add_counters, secs};
use cim_sim::scenarios::Scenario;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Turmoil simulations of whole CIM clusters, checked")]
struct Args {
    /// failover, duplicate-login or all.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// How many seeds per scenario (from --first-seed on).
    #[arg(long, env = "SIM_SEEDS", default_value_t = 1)]
    seeds: u64,
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Replays exactly this seed.
    #[arg(long, env = "SIM_SEED")]
    seed: Option<u64>,
    /// Prints every run's report, not only failing ones.
    #[arg(long)]
    verbose: bool,
}

#[derive(Debug, Default)]
struct Row {
    seeds: u64,
    violations: u64,
    failing_seeds: Vec<u64>,
    counters: Counters,
    sim_time: Duration,
    wall: Duration,
}

fn main() {
    let args = Args::parse();
    let scenarios: Vec<Scenario> = if args.scenario == "all" {
        Scenario::ALL.to_vec()
    } else if let Some(s) = Scenario::from_name(&args.scenario) {
        vec![s]
    } else {
        eprintln!(
            "unknown scenario {:?}: failover, duplicate-login or all",
            args.scenario
        );
        std::process::exit(2);
    };
    let seeds: Vec<u64> = match args.seed {
        Some(seed) => vec![seed],
        None => (args.first_seed..args.first_seed + args.seeds).collect(),
    };
    let mut rows = Vec::new();
    for scenario in scenarios {
        let mut row = Row::default();
        for &seed in &seeds {
            eprintln!("SIM_SEED={seed}");
            // The sweep's own wall time, for seeds per second; the simulation never sees it.
            #[allow(clippy::disallowed_methods)]
            let started = std::time::Instant::now();
            let outcome = scenario.run(seed);
            row.wall += started.elapsed();
            row.seeds += 1;
            row.sim_time += outcome.sim_time;
            add_counters(&mut row.counters, &outcome.counters);
            if !outcome.is_clean() {
                row.violations += outcome.violations() as u64;
                row.failing_seeds.push(seed);
                println!("{outcome}");
            } else if args.verbose || args.seed.is_some() {
                println!("{outcome}");
            }
        }
        rows.push((scenario, row));
    }
    println!();
    println!(
        "{:<16} {:>6} {:>10} {:>12} {:>10} {:>9}",
        "scenario", "seeds", "violations", "simulated", "wall", "seeds/s"
    );
    for (scenario, row) in &rows {
        let per_sec = row.seeds as f64 / row.wall.as_secs_f64().max(1e-9);
        println!(
            "{:<16} {:>6} {:>10} {:>12} {:>10} {:>9.2}",
            scenario.name(),
            row.seeds,
            row.violations,
            secs(row.sim_time),
            secs(row.wall),
            per_sec
        );
        for (name, n) in &row.counters {
            println!("    {name:<28} {n}");
        }
        if !row.failing_seeds.is_empty() {
            println!("    failing seeds: {:?}", row.failing_seeds);
        }
    }
    if rows.iter().any(|(_, r)| r.violations > 0) {
        std::process::exit(1);
    }
}
