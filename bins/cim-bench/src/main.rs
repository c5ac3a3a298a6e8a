//! `cim-bench`: load generator for CIM-rs, on the SDK (so every message pays for the outbox,
//! acks and dedup a user gets), against a running cluster (`--route`) or one it starts in a
//! child process (embedded store, or `--redis`: a private redis-server with AOF everysec).
//! Each scenario shows a progress bar and ends with a Markdown table; `compare` runs the
//! same fan-out against NATS and Mosquitto and draws a PNG chart.
//!
//! Figures are measured, never asserted: tests run `--quick` scenarios for correctness only
//! (every delivery arrived, nothing acknowledged lost).

mod chart;
mod cluster;
mod compare;
mod connections;
mod failover;
mod fanout;
mod handshakes;
mod login;
mod p2p;
mod procs;
mod stores;
mod util;

use cim_io::sdk::ServerTransport;
use clap::{Parser, Subcommand};

use crate::cluster::{Argon2Cost, Setup};
use crate::util::{Table, f1, f2, int};

#[derive(Parser, Debug)]
#[command(name = "cim-bench", version, about = "Benchmarks for CIM-rs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What every scenario takes.
#[derive(clap::Args, Debug, Clone)]
struct Common {
    /// Drive the cluster whose route listens here (http://host:port, or https://host:port)
    /// instead of starting one.
    #[arg(long)]
    route: Option<String>,
    /// With an https:// --route: the CA file to trust (default the system's roots).
    #[arg(long, value_name = "FILE", requires = "route")]
    ca: Option<std::path::PathBuf>,
    /// Started clusters: everything over TLS (route HTTPS, client gateways, mutual-TLS
    /// links) with a throwaway CA made for the run, which the bench's clients trust.
    #[arg(long, conflicts_with = "route")]
    tls: bool,
    /// Started clusters: Redis (a private redis-server, AOF everysec) instead of the embedded
    /// store.
    #[arg(long, conflicts_with = "redis_cluster")]
    redis: bool,
    /// Started clusters: a private Redis Cluster (six nodes: three masters, one replica
    /// each, AOF everysec) instead of the embedded store.
    #[arg(long)]
    redis_cluster: bool,
    /// Started clusters on Redis: acknowledge an append only once this many replicas have it
    /// (`cim-route --store-wait-replicas`; with --redis-cluster, 1 is each master's replica).
    #[arg(long, default_value_t = 0)]
    store_wait_replicas: u32,
    /// Small sizes, for tests and a first look.
    #[arg(long)]
    quick: bool,
    /// Started clusters: argon2 cost (login measures both).
    #[arg(long, value_enum, default_value = "test")]
    argon2: Argon2Cost,
    /// The servers' gateway the clients use; `both` (fanout only) runs the fan-out over TCP
    /// and then over WebSocket against the same cluster and prints the ratio.
    #[arg(long, value_enum, default_value = "tcp")]
    transport: Transport,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Websocket,
    Both,
}

impl Common {
    fn tcp_only(&self, scenario: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.transport == Transport::Tcp,
            "--transport is for fanout and p2p, not {scenario}"
        );
        Ok(())
    }

    /// The clients' gateway for scenarios that run one (`both` is fan-out's alone).
    fn one_transport(&self) -> anyhow::Result<ServerTransport> {
        match self.transport {
            Transport::Tcp => Ok(ServerTransport::Tcp),
            Transport::Websocket => Ok(ServerTransport::WebSocket),
            Transport::Both => anyhow::bail!("--transport both is for fanout only"),
        }
    }
}

impl Common {
    fn setup(&self) -> Setup {
        Setup {
            route: self.route.clone(),
            ca: self.ca.clone(),
            redis: self.redis,
            redis_cluster: self.redis_cluster,
            wait_replicas: self.store_wait_replicas,
            argon2: self.argon2,
            password_workers: None,
            servers: 2,
            tls: self.tls,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Logins per second through the route (embedded store and Redis, both argon2 costs).
    Login {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: login::LoginArgs,
    },
    /// One sender, a group of M members over two servers: deliveries/s and latency.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: fanout::FanoutArgs,
    },
    /// K pairs at stepped offered rates: latency percentiles, highest rate with p99 < 10 ms.
    P2p {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: p2p::P2pArgs,
    },
    /// N clients on two server processes, SIGKILL one: time until all are online again,
    /// acknowledged messages lost (Redis and ZooKeeper started by the bench).
    Failover {
        /// Small sizes.
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        args: failover::FailoverArgs,
    },
    /// N idle clients on one server process: server memory per connection, idle CPU.
    Connections {
        /// Small sizes.
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        args: connections::ConnectionsArgs,
    },
    /// The fan-out against our cluster, nats-server and mosquitto (QoS 0 and 1), with ratios
    /// and a PNG chart.
    Compare {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        args: compare::CompareArgs,
    },
    /// TLS handshakes per second on one server's client gateway, and per CPU-second of the
    /// server (full and resumed handshakes).
    Handshakes {
        /// Small sizes.
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        args: handshakes::HandshakeArgs,
    },
    /// Redis as one node against a Redis Cluster (without and with `WAIT 1`): fan-out,
    /// private messages and logins in one run each, each master's Redis CPU, and what a
    /// cluster of more masters would hold.
    Stores {
        /// Small sizes.
        #[arg(long)]
        quick: bool,
        #[command(flatten)]
        args: stores::StoresArgs,
    },
    /// (internal) A route and servers in this process, for the bench parent to drive.
    #[command(hide = true)]
    Cluster(cluster::ClusterArgs),
    /// (internal) The real cim-server program, for scenarios that kill servers.
    #[command(hide = true)]
    Server(Box<cim_server::Args>),
}

/// The cluster child and the `server` subcommand serve like `cim-server`: the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let command = Cli::parse().command;
    let command = match command {
        Command::Server(args) => return cim_server::run_blocking(*args),
        Command::Cluster(args) => {
            cim_io::launch::init_tracing("error");
            return runtime()?.block_on(cluster::run_cluster(args));
        }
        other => other,
    };
    cim_io::launch::init_tracing("error");
    runtime()?.block_on(async move {
        let tables = match command {
            Command::Login { common, args } => {
                common.tcp_only("login")?;
                let modes: &[bool] = if common.redis || common.redis_cluster {
                    &[true]
                } else {
                    &[false, true]
                };
                vec![login::run(&args, &common.setup(), modes, common.quick).await?]
            }
            Command::Fanout { common, args } => {
                let target = cluster::start(&common.setup())?;
                eprintln!("fanout against {}", target.label);
                let pid = target.cluster.as_ref().map(cluster::ChildProc::pid);
                let transports: &[(ServerTransport, &str)] = match common.transport {
                    Transport::Both => &[
                        (ServerTransport::Tcp, "cim-rs (TCP)"),
                        (ServerTransport::WebSocket, "cim-rs (WebSocket)"),
                    ],
                    Transport::Websocket => &[(ServerTransport::WebSocket, "cim-rs (WebSocket)")],
                    Transport::Tcp => &[(ServerTransport::Tcp, "cim-rs")],
                };
                let mut results = Vec::new();
                for &(transport, name) in transports {
                    let mut route = target.route.clone();
                    route.transport = transport;
                    results.push(fanout::run_ours(&route, &args, common.quick, pid, name).await?);
                }
                let mut tables = vec![fanout_table(&target.label, &results)?];
                if let [tcp, ws] = &results[..] {
                    let mut ratio = Table::new(
                        "WebSocket against TCP (same cluster, one run)",
                        &["deliveries/s ratio", "p99 ratio"],
                    );
                    let p99 = |r: &fanout::FanoutResult| util::percentiles_ms(&r.latency_us)[1];
                    ratio.row(vec![
                        format!("{:.2}x", ws.per_sec() / tcp.per_sec().max(1e-9)),
                        format!("{:.2}x", p99(ws) / p99(tcp).max(1e-9)),
                    ]);
                    tables.push(ratio);
                }
                tables
            }
            Command::P2p { common, args } => {
                let mut target = cluster::start(&common.setup())?;
                target.route.transport = common.one_transport()?;
                eprintln!("p2p against {}", target.label);
                let pid = target.cluster.as_ref().map(cluster::ChildProc::pid);
                vec![
                    p2p::run(
                        &target.route,
                        &args,
                        common.quick,
                        &target.label,
                        pid,
                        &target.redis_ports(),
                    )
                    .await?
                    .0,
                ]
            }
            Command::Compare { common, args } => {
                common.tcp_only("compare")?;
                compare::run(&args, &common.setup(), common.quick).await?
            }
            Command::Failover { quick, args } => vec![failover::run(&args, quick).await?],
            Command::Connections { quick, args } => vec![connections::run(&args, quick).await?],
            Command::Handshakes { quick, args } => vec![handshakes::run(&args, quick).await?],
            Command::Stores { quick, args } => stores::run(&args, quick).await?,
            Command::Cluster(_) | Command::Server(_) => unreachable!("handled above"),
        };
        for t in tables {
            println!("{}", t.render());
        }
        Ok(())
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The fan-out table; fails if a delivery is missing (every scenario checks its own
/// correctness: a fast wrong answer is not a figure).
pub fn fanout_table(label: &str, results: &[fanout::FanoutResult]) -> anyhow::Result<Table> {
    let mut table = Table::new(
        format!("fan-out ({label})"),
        &[
            "system",
            "deliveries",
            "deliveries/s",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "broker CPU s / M deliveries",
        ],
    );
    for r in results {
        let [p50, p99, p999] = util::percentiles_ms(&r.latency_us);
        table.row(vec![
            r.system.clone(),
            format!("{}/{}", int(r.delivered as f64), int(r.expected as f64)),
            int(r.per_sec()),
            f2(p50),
            f2(p99),
            f2(p999),
            r.cpu_per_million().map_or("-".into(), f1),
        ]);
    }
    if let Some(r) = results.iter().find(|r| r.delivered != r.expected) {
        println!("{}", table.render());
        anyhow::bail!(
            "{}: {} of {} deliveries arrived",
            r.system,
            r.delivered,
            r.expected
        );
    }
    Ok(table)
}
