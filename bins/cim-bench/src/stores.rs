//! `stores`: the same work against Redis as one node and as a Redis Cluster (three masters,
//! one replica each, every node AOF everysec), the cluster without and with `WAIT 1`: a
//! group fan-out, private messages at stepped rates, and logins, one run each. Besides the
//! system's figures it reads each Redis master's CPU (`INFO cpu`) around every phase, which
//! says how the load spread over the shards and what a cluster of more masters would hold.
//!
//! Everything runs on this one machine: the six Redis nodes share its cores with the route,
//! the servers and the load generator, so the cluster's own figures measure the client-side
//! cost of a cluster (routing, more connections, `WAIT`), and the per-master CPU is what
//! projects to more machines.

use anyhow::Context as _;

use crate::cluster::{self, Argon2Cost, ChildProc, Setup, Target};
use crate::fanout::{self, FanoutArgs};
use crate::p2p::{self, P2pArgs};
use crate::util::{self, Table, f1, f2, int};

#[derive(clap::Args, Debug, Clone)]
pub struct StoresArgs {
    /// Fan-out: members of the group [default: 1000; --quick 20].
    #[arg(long)]
    pub members: Option<usize>,
    /// Fan-out: messages [default: 200; --quick 5].
    #[arg(long)]
    pub messages: Option<usize>,
    /// Fan-out: messages in flight (closed loop).
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Private messages: sender/receiver pairs [default: 100; --quick 5].
    #[arg(long)]
    pub pairs: Option<usize>,
    /// Private messages: offered rates, messages/s in total [default: 2000,5000,10000;
    /// --quick 100].
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<u64>,
    /// Private messages: seconds per rate [default: 5; --quick 1].
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Logins: users registered, then logged in (argon2 test parameters) [default: 2000;
    /// --quick 50].
    #[arg(long)]
    pub users: Option<usize>,
}

/// One store layout the run compares.
struct Mode {
    name: &'static str,
    cluster: bool,
    wait_replicas: u32,
}

const MODES: [Mode; 3] = [
    Mode {
        name: "one node",
        cluster: false,
        wait_replicas: 0,
    },
    Mode {
        name: "cluster",
        cluster: true,
        wait_replicas: 0,
    },
    Mode {
        name: "cluster, WAIT 1",
        cluster: true,
        wait_replicas: 1,
    },
];

/// CPU seconds (user + system) of each Redis master, by port, read with `INFO cpu`.
type MasterCpu = Vec<(u16, f64)>;

/// One phase's work and the masters' CPU it cost.
struct Phase {
    /// Messages (fan-out: messages sent, not deliveries), private messages or logins.
    ops: f64,
    /// Each master's CPU seconds over the phase.
    cpu: MasterCpu,
}

impl Phase {
    fn total_cpu(&self) -> f64 {
        self.cpu.iter().map(|(_, s)| s).sum()
    }
    fn busiest_cpu(&self) -> f64 {
        self.cpu.iter().map(|(_, s)| *s).fold(0.0, f64::max)
    }
    /// Redis CPU microseconds per operation, all masters together.
    fn us_per_op(&self) -> f64 {
        1e6 * self.total_cpu() / self.ops.max(1.0)
    }
    /// Operations per second one master would serve at 100% of a core, by the busiest
    /// master's cost (where the work is one slot, that master is the ceiling).
    fn per_master_ceiling(&self) -> f64 {
        self.ops / self.busiest_cpu().max(1e-9)
    }
    /// Operations per second `masters` would serve when the work spreads over slots as it
    /// did here: each master's mean share shrinks with their number, and the busiest stays
    /// as far above the mean as it was (`imbalance`); the busiest saturates first.
    fn ceiling_with(&self, masters: usize) -> f64 {
        let measured = self.cpu.len().max(1) as f64;
        // One master takes everything, however it spread here.
        let imbalance = if masters == 1 {
            1.0
        } else {
            self.busiest_cpu() * measured / self.total_cpu().max(1e-9)
        };
        masters as f64 * self.ops / self.total_cpu().max(1e-9) / imbalance.max(1.0)
    }
}

struct ModeResult {
    mode: &'static Mode,
    fanout: fanout::FanoutResult,
    fanout_phase: Phase,
    p2p_best: Option<u64>,
    /// Private messages delivered within the wait, of those sent (the phase's `ops`).
    p2p_delivered: u64,
    p2p_phase: Phase,
    logins_per_sec: f64,
    login_failures: usize,
    login_phase: Phase,
}

pub async fn run(args: &StoresArgs, quick: bool) -> anyhow::Result<Vec<Table>> {
    let fanout_args = FanoutArgs {
        members: Some(args.members.unwrap_or(if quick { 20 } else { 1_000 })),
        messages: Some(args.messages.unwrap_or(if quick { 5 } else { 200 })),
        window: args.window,
        payload: 64,
    };
    let p2p_args = P2pArgs {
        pairs: Some(args.pairs.unwrap_or(if quick { 5 } else { 100 })),
        rates: if !args.rates.is_empty() {
            args.rates.clone()
        } else if quick {
            vec![100]
        } else {
            vec![2_000, 5_000, 10_000]
        },
        seconds: Some(args.seconds.unwrap_or(if quick { 1 } else { 5 })),
        payload: 64,
    };
    let users = args.users.unwrap_or(if quick { 50 } else { 2_000 });

    let mut results = Vec::new();
    for mode in &MODES {
        let setup = Setup {
            route: None,
            ca: None,
            redis: !mode.cluster,
            redis_cluster: mode.cluster,
            wait_replicas: mode.wait_replicas,
            argon2: Argon2Cost::Test,
            password_workers: None,
            servers: 2,
            tls: false,
        };
        let target = cluster::start(&setup)?;
        eprintln!("stores: {}", target.label);
        let pid = target.cluster.as_ref().map(ChildProc::pid);
        let masters = master_ports(&target)?;

        let before = master_cpu(&masters)?;
        let fanout = fanout::run_ours(&target.route, &fanout_args, quick, pid, mode.name).await?;
        let after_fanout = master_cpu(&masters)?;
        let (_, steps) = p2p::run(&target.route, &p2p_args, quick, mode.name, pid, &[]).await?;
        let after_p2p = master_cpu(&masters)?;
        let login = crate::login::measure(&target.route, users, 64).await?;
        let after_login = master_cpu(&masters)?;

        if fanout.delivered != fanout.expected {
            anyhow::bail!(
                "{}: {} of {} fan-out deliveries arrived",
                mode.name,
                fanout.delivered,
                fanout.expected
            );
        }
        // A rate the system cannot keep up with leaves a tail still queued when p2p stops
        // waiting (5 s): reported, and such a rate is never the "highest" one.
        let p2p_sent: u64 = steps.iter().map(|s| s.sent).sum();
        let p2p_delivered: u64 = steps.iter().map(|s| s.delivered).sum();
        let p2p_best = steps
            .iter()
            .filter(|s| s.delivered == s.sent && util::percentiles_ms(&s.from_due_us)[1] < 10.0)
            .map(|s| s.offered)
            .max();
        results.push(ModeResult {
            mode,
            fanout_phase: Phase {
                ops: fanout_args.messages(quick) as f64,
                cpu: delta(&before, &after_fanout),
            },
            fanout,
            p2p_best,
            p2p_delivered,
            p2p_phase: Phase {
                ops: p2p_sent as f64,
                cpu: delta(&after_fanout, &after_p2p),
            },
            logins_per_sec: login.logins_per_sec,
            login_failures: login.failures,
            login_phase: Phase {
                ops: users as f64,
                cpu: delta(&after_p2p, &after_login),
            },
        });
        drop(target);
    }
    Ok(tables(&results, &fanout_args, &p2p_args, users, quick))
}

fn tables(
    results: &[ModeResult],
    fanout_args: &FanoutArgs,
    p2p_args: &P2pArgs,
    users: usize,
    quick: bool,
) -> Vec<Table> {
    let mut figures = Table::new(
        format!(
            "Redis as one node and as a cluster (one run each; fan-out: {} members, {} messages, \
             window {}; p2p: {} pairs at {:?} msg/s; logins: {users} users, argon2 test)",
            fanout_args.members(quick),
            fanout_args.messages(quick),
            fanout_args.window,
            p2p_args.pairs.unwrap_or_default(),
            p2p_args.rates,
        ),
        &[
            "store",
            "fan-out deliveries/s",
            "fan-out p99 ms",
            "p2p: highest rate with p99 (from due) < 10 ms",
            "p2p delivered in time",
            "logins/s (failed)",
            "Redis CPU µs / fan-out message",
            "Redis CPU µs / private message",
            "Redis CPU µs / login",
        ],
    );
    for r in results {
        figures.row(vec![
            r.mode.name.to_owned(),
            int(r.fanout.per_sec()),
            f2(util::percentiles_ms(&r.fanout.latency_us)[1]),
            r.p2p_best
                .map_or("none of those tried".into(), |b| int(b as f64)),
            format!("{}/{}", r.p2p_delivered, r.p2p_phase.ops),
            format!("{} ({})", int(r.logins_per_sec), r.login_failures),
            f1(r.fanout_phase.us_per_op()),
            f1(r.p2p_phase.us_per_op()),
            f1(r.login_phase.us_per_op()),
        ]);
    }

    let mut ratios = Table::new(
        "against one node (same run): throughput ratio (fan-out deliveries/s, logins/s) and p99 ratio",
        &["store", "fan-out deliveries/s", "fan-out p99", "logins/s"],
    );
    if let Some(one) = results.iter().find(|r| !r.mode.cluster) {
        let p99 = |r: &ModeResult| util::percentiles_ms(&r.fanout.latency_us)[1];
        for r in results.iter().filter(|r| r.mode.cluster) {
            ratios.row(vec![
                r.mode.name.to_owned(),
                format!(
                    "{:.2}x",
                    r.fanout.per_sec() / one.fanout.per_sec().max(1e-9)
                ),
                format!("{:.2}x", p99(r) / p99(one).max(1e-9)),
                format!("{:.2}x", r.logins_per_sec / one.logins_per_sec.max(1e-9)),
            ]);
        }
    }

    let mut spread = Table::new(
        "how the work spread over the masters (CPU seconds of each master, busiest first)",
        &["store", "fan-out", "p2p", "logins"],
    );
    let split = |p: &Phase| {
        let mut cpu = p.cpu.clone();
        cpu.sort_by(|a, b| b.1.total_cmp(&a.1));
        cpu.iter()
            .map(|(_, s)| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    for r in results {
        spread.row(vec![
            r.mode.name.to_owned(),
            split(&r.fanout_phase),
            split(&r.p2p_phase),
            split(&r.login_phase),
        ]);
    }

    let mut projection = Table::new(
        "what Redis alone would hold (operations per second at 100% of the busiest master's \
         core, from the cluster run without WAIT; routes and servers scale out separately)",
        &[
            "masters",
            "group messages/s (one slot)",
            "private messages/s",
            "logins/s",
        ],
    );
    if let Some(c) = results
        .iter()
        .find(|r| r.mode.cluster && r.mode.wait_replicas == 0)
    {
        for masters in [1, 3, 6, 12] {
            projection.row(vec![
                masters.to_string(),
                int(c.fanout_phase.per_master_ceiling()),
                int(c.p2p_phase.ceiling_with(masters)),
                int(c.login_phase.ceiling_with(masters)),
            ]);
        }
    }
    vec![figures, ratios, spread, projection]
}

/// The ports of the target's Redis masters: the one node, or the cluster's masters.
fn master_ports(target: &Target) -> anyhow::Result<Vec<u16>> {
    if let Some(cluster) = &target.redis_cluster {
        let masters = cluster.masters();
        anyhow::ensure!(!masters.is_empty(), "the cluster names no masters");
        return Ok(masters);
    }
    let redis = target
        ._redis
        .as_ref()
        .context("stores runs on Redis only")?;
    Ok(vec![redis.port])
}

fn master_cpu(ports: &[u16]) -> anyhow::Result<MasterCpu> {
    ports
        .iter()
        .map(|&port| Ok((port, util::redis_cpu_seconds(port)?)))
        .collect()
}

fn delta(before: &MasterCpu, after: &MasterCpu) -> MasterCpu {
    before
        .iter()
        .zip(after)
        .map(|((port, a), (_, b))| (*port, (b - a).max(0.0)))
        .collect()
}
