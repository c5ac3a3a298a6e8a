//! The sweep CLI: runs scenarios over seeds and prints a table.
//!
//! ```text
//! cargo run -p cim-sim --release -- --scenario all --seeds 10000           # a sweep
//! SIM_SEED=n cargo run -p cim-sim --release -- --scenario failover         # replay one seed
//! CIM_CANARIES=1 cargo run -p cim-sim --release -- --canary dedup --scenario broadcast \
//!     --seeds 50 --until-violation                                         # a canary
//! ```
//!
//! Every run prints `SIM_SEED=<n>` (to stderr) before it starts, and a replayed seed also
//! its full replay command and fault plan; a failing run's report starts with the replay
//! command (with `--balancer` and `--canary` when set) and the fault plan, then its
//! violations. Exit status 1 if any run found a violation.
//!
//! A sweep runs every seed in a fresh child process of this binary (`--jobs` at once):
//! within one process an earlier simulation can change a later one's timeline (tokio numbers
//! tasks from a process-wide counter, and that number picks the list a crashed host's tasks
//! are dropped from, so the order its sockets close in), while a seed in a fresh process
//! always replays identically. Threads would not help: two seeds running side by side in
//! one process interleave their draws from that counter (measured: 45 of 160 runs of
//! `--first-seed 1 --seeds 40` changed their histories on two threads). Nothing of ours is
//! process-wide any more (the balancer and the canary are fields of the run's spec), and
//! turmoil keeps its world in a thread-local. A single `--seed` runs in this process.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cim_core::canary::{Canaries, Canary};
use cim_core::route::balance::Strategy;
use cim_sim::record::{add_count, secs};
use cim_sim::scenarios::{RunSpec, Scenario, ScenarioOutcome};
use clap::Parser;
use serde::{Deserialize, Serialize};

#[derive(Debug, Parser)]
#[command(about = "Turmoil simulations of whole CIM clusters, checked")]
struct Args {
    /// failover, duplicate-login, broadcast, everything, lost-tail, shard-failover, or all.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// How many seeds per scenario (from --first-seed on).
    #[arg(long, env = "SIM_SEEDS", default_value_t = 1)]
    seeds: u64,
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Replays exactly this seed, in this process.
    #[arg(long, env = "SIM_SEED")]
    seed: Option<u64>,
    /// Seeds run at once, each in its own process (default: the number of CPUs).
    #[arg(long)]
    jobs: Option<usize>,
    /// Switches one safety mechanism off (only in a build made with CIM_CANARIES=1):
    /// idempotent-append, epoch-fencing, self-fencing, gap-sync, dedup, send-order,
    /// lost-tail, move-continuation, wait-replicas or shard-health.
    #[arg(long)]
    canary: Option<String>,
    /// How routes pick servers: round-robin, random, consistent-hash (the default) or
    /// least-connections.
    #[arg(long)]
    balancer: Option<String>,
    /// Stops a scenario's sweep at its first failing seed (how canaries are measured).
    #[arg(long)]
    until_violation: bool,
    /// Prints every run's report, not only failing ones.
    #[arg(long)]
    verbose: bool,
    /// Internal: print the run's summary as one JSON line (used by the sweep's children).
    #[arg(long, hide = true)]
    json: bool,
}

/// What a child process reports about its seed.
#[derive(Debug, Serialize, Deserialize)]
struct Summary {
    seed: u64,
    violations: u64,
    sim_ms: u64,
    counters: Vec<(String, u64)>,
    report: String,
}

impl Summary {
    fn of(outcome: &ScenarioOutcome) -> Self {
        Self {
            seed: outcome.seed(),
            violations: outcome.violations() as u64,
            sim_ms: outcome.sim_time.as_millis() as u64,
            counters: outcome
                .counters
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            report: outcome.to_string(),
        }
    }
}

#[derive(Debug, Default)]
struct Row {
    seeds: u64,
    violations: u64,
    failing_seeds: Vec<u64>,
    counters: std::collections::BTreeMap<String, u64>,
    sim_time: Duration,
    wall: Duration,
}

impl Row {
    fn add(&mut self, s: &Summary) {
        self.seeds += 1;
        self.sim_time += Duration::from_millis(s.sim_ms);
        if s.violations > 0 {
            self.violations += s.violations;
            self.failing_seeds.push(s.seed);
        }
        for (name, n) in &s.counters {
            add_count(&mut self.counters, name.clone(), *n);
        }
    }
}

fn main() {
    let args = Args::parse();
    let canary = match args.canary.as_deref().map(|n| (n, Canary::from_name(n))) {
        None => None,
        Some((_, Some(c))) => Some(c),
        Some((name, None)) => {
            eprintln!(
                "unknown canary {name:?}: {}",
                Canary::ALL.map(Canary::name).join(", ")
            );
            std::process::exit(2);
        }
    };
    let balancer = match args
        .balancer
        .as_deref()
        .map(|n| (n, Strategy::from_name(n)))
    {
        None => None,
        Some((_, Some(s))) => Some(s),
        Some((name, None)) => {
            eprintln!(
                "unknown balancer {name:?}: {}",
                Strategy::ALL.map(Strategy::name).join(", ")
            );
            std::process::exit(2);
        }
    };
    let canaries = match Canaries::switch_off(canary) {
        Ok(canaries) => canaries,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    // Every run of this invocation, but for its seed.
    let runs = RunSpec {
        seed: 0,
        balancer,
        canaries,
    };
    let scenarios: Vec<Scenario> = if args.scenario == "all" {
        Scenario::ALL.to_vec()
    } else if let Some(s) = Scenario::from_name(&args.scenario) {
        vec![s]
    } else {
        eprintln!(
            "unknown scenario {:?}: {} or all",
            args.scenario,
            Scenario::ALL.map(Scenario::name).join(", ")
        );
        std::process::exit(2);
    };
    if let Some(seed) = args.seed {
        std::process::exit(replay(&scenarios, RunSpec { seed, ..runs }, &args));
    }
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let mut rows = Vec::new();
    for scenario in scenarios {
        let seeds: Vec<u64> = (args.first_seed..args.first_seed + args.seeds).collect();
        let row = sweep(scenario, &seeds, jobs.max(1), runs, &args);
        rows.push((scenario, row));
    }
    print_table(&rows, canaries.off());
    if rows.iter().any(|(_, r)| r.violations > 0) {
        std::process::exit(1);
    }
}

/// Runs one seed of each scenario in this process; the exit status.
fn replay(scenarios: &[Scenario], run: RunSpec, args: &Args) -> i32 {
    let mut failed = false;
    for &scenario in scenarios {
        eprintln!("SIM_SEED={}", run.seed);
        // Before the run, so a run that hangs or crashes has said how to replay it.
        eprint!("{}", scenario.plan(run).preamble(scenario, run));
        let outcome = scenario.run(run);
        failed |= !outcome.is_clean();
        if args.json {
            let line = serde_json::to_string(&Summary::of(&outcome)).expect("a summary encodes");
            println!("{line}");
        } else {
            println!("{outcome}");
        }
    }
    i32::from(failed)
}

/// Runs `seeds` of `scenario` (each with the balancer and canaries of `runs`), `jobs` child
/// processes at a time.
fn sweep(scenario: Scenario, seeds: &[u64], jobs: usize, runs: RunSpec, args: &Args) -> Row {
    let exe = std::env::current_exe().expect("the path of this executable");
    let mut row = Row::default();
    let mut pending: VecDeque<u64> = seeds.iter().copied().collect();
    let mut running: VecDeque<(u64, Child)> = VecDeque::new();
    // The sweep's own wall time, for seeds per second; the simulation never sees it.
    #[allow(clippy::disallowed_methods)]
    let started = std::time::Instant::now();
    let mut stop = false;
    loop {
        while !stop && running.len() < jobs {
            let Some(seed) = pending.pop_front() else {
                break;
            };
            eprintln!("SIM_SEED={seed}");
            let mut cmd = Command::new(&exe);
            cmd.args(["--scenario", scenario.name(), "--json"])
                .args(["--seed", &seed.to_string()])
                .env_remove("SIM_SEED")
                .env_remove("SIM_SEEDS")
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            if let Some(c) = runs.canaries.off() {
                cmd.args(["--canary", c.name()]);
            }
            if let Some(b) = runs.balancer {
                cmd.args(["--balancer", b.name()]);
            }
            let child = cmd.spawn().expect("spawn a child run");
            running.push_back((seed, child));
        }
        // Seeds finish in about the order they started; wait for the oldest.
        let Some((seed, mut child)) = running.pop_front() else {
            break;
        };
        let replay = scenario.replay_command(RunSpec { seed, ..runs });
        let summary = read_summary(seed, &mut child, &replay);
        row.add(&summary);
        if summary.violations > 0 {
            println!("{}", summary.report);
            stop |= args.until_violation;
        } else if args.verbose {
            println!("{}", summary.report);
        }
    }
    row.wall = started.elapsed();
    row
}

/// The summary line of a finished child; a child that crashed counts as a violation.
fn read_summary(seed: u64, child: &mut Child, replay: &str) -> Summary {
    let stdout = child.stdout.take().expect("stdout is piped");
    let line = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with('{'));
    let status = child.wait();
    match line.and_then(|l| serde_json::from_str::<Summary>(&l).ok()) {
        Some(summary) => summary,
        None => Summary {
            seed,
            violations: 1,
            sim_ms: 0,
            counters: Vec::new(),
            report: format!("replay: {replay}\nSIM_SEED={seed}: the run crashed ({status:?})"),
        },
    }
}

fn print_table(rows: &[(Scenario, Row)], canary: Option<Canary>) {
    println!();
    if let Some(c) = canary {
        println!("canary: {c} switched off");
    }
    println!(
        "{:<16} {:>6} {:>10} {:>12} {:>10} {:>9}",
        "scenario", "seeds", "violations", "simulated", "wall", "seeds/s"
    );
    for (scenario, row) in rows {
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
            println!("    {name:<36} {n}");
        }
        if !row.failing_seeds.is_empty() {
            println!("    failing seeds: {:?}", row.failing_seeds);
        }
    }
}
