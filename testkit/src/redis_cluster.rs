//! A private Redis Cluster: six `redis-server --cluster-enabled yes` (three masters with one
//! replica each) on free ports, joined with `redis-cli --cluster create`, optionally over TLS
//! (client, cluster bus and replication all TLS).
//!
//! Lifetime: [`RedisCluster::start`] gives an owned cluster, killed (SIGKILL) and its temp
//! dir removed on drop. [`redis_cluster`] gives one cluster shared by a whole test binary
//! (tests use distinct users and conversations); a `static` is never dropped, so a small shell
//! watchdog started with every cluster kills its nodes and removes its dir once the test
//! process is gone.
//!
//! Everything the tests ask the cluster (state, slots, owners) goes through `redis-cli`, which
//! speaks TLS as well as plaintext.

// Deadlines here are on the real clock: the nodes are processes of their own, which no
// virtual clock moves (the ban on reading the clock is for the deterministic core).
#![allow(clippy::disallowed_methods)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{TestCa, TestCert, in_ci};

/// Nodes: three masters, each with one replica.
const NODES: usize = 6;
/// The cluster bus listens on the client port plus this.
const BUS_OFFSET: u16 = 10_000;
/// Where client ports are probed: above the usual well-known ports, and low enough that the
/// bus port too is below the kernel's ephemeral range ([`port_range`]).
const LOWEST_PORT: u16 = 12_000;

/// Client ports `p` with both `p` and `p + 10000` below the ephemeral range (Linux's
/// `ip_local_port_range`, 32768 by default): a killed node's ports, free until its restart,
/// must not be handed to some outgoing connection meanwhile (the restart then failed with
/// "address in use", a flake under load when the bus port was in that range). Where the
/// range leaves no room, the old span, and the flake's odds, come back.
fn port_range() -> std::ops::Range<u16> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let end = ephemeral_start.saturating_sub(BUS_OFFSET);
    if end >= LOWEST_PORT + 1_000 {
        LOWEST_PORT..end
    } else {
        20_000..45_000
    }
}

/// How to start a [`RedisCluster`] beyond the defaults (plaintext, no persistence).
#[derive(Debug, Clone, Default)]
pub struct ClusterSetup {
    /// Serve TLS only: clients, the cluster bus and replication (`--tls-cluster yes`,
    /// `--tls-replication yes`), with a certificate of this CA; client certificates are
    /// required when `require_client_cert`.
    pub tls: bool,
    pub require_client_cert: bool,
    /// `--cluster-node-timeout` in ms (default 2000: a dead master is failed over in a few
    /// seconds).
    pub node_timeout_ms: Option<u32>,
    /// Every node writes an append-only file fsynced once a second (`appendfsync everysec`,
    /// what `deploy/` recommends): for benchmarks that compare against one such node.
    pub aof_everysec: bool,
}

/// The certificates of a TLS cluster.
#[derive(Debug)]
pub struct ClusterTls {
    pub ca: TestCa,
    /// The nodes' certificate (for 127.0.0.1 and localhost).
    pub server: TestCert,
    /// What nodes present to each other as clients on the bus and in replication (a client
    /// certificate: the server one's key usage is for serving only).
    pub peer: TestCert,
    /// A client certificate the nodes accept.
    pub client: TestCert,
}

/// One node of a [`RedisCluster`].
#[derive(Debug)]
struct Node {
    port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

/// A running Redis Cluster of six nodes this test process started.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<Node>,
    dir: PathBuf,
    setup: ClusterSetup,
    tls: Option<ClusterTls>,
    /// How long starting and joining took.
    pub started_in: Duration,
}

static SHARED: OnceLock<Option<RedisCluster>> = OnceLock::new();
static SHARED_TLS: OnceLock<Option<RedisCluster>> = OnceLock::new();

/// The cluster shared by this test binary, started on first use. `None` means "skip" (message
/// printed); under `CI=true` a missing `redis-server` fails instead.
pub fn redis_cluster() -> Option<&'static RedisCluster> {
    SHARED
        .get_or_init(|| RedisCluster::start_with(ClusterSetup::default()))
        .as_ref()
}

/// A TLS cluster shared by this test binary (client certificates required).
pub fn redis_cluster_tls() -> Option<&'static RedisCluster> {
    SHARED_TLS
        .get_or_init(|| {
            RedisCluster::start_with(ClusterSetup {
                tls: true,
                require_client_cert: true,
                ..ClusterSetup::default()
            })
        })
        .as_ref()
}

fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Client ports this process already chose for a cluster. A probe finds a port free until
/// its node binds it, which is seconds later: two clusters started at once by one test
/// binary (tests run on threads) would otherwise both take it, and the two clusters'
/// nodes would meet.
static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// Six client ports `p` such that `p` and `p + 10000` are free, no chosen port is another
/// one's bus port, and none was handed to another cluster of this process. Probing starts
/// at a point derived from the process id so that test binaries running at once rarely
/// probe the same ports.
fn free_ports(taken_before: &[u16]) -> Vec<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let taken_before: Vec<u16> = taken_before
        .iter()
        .chain(handed_out.iter())
        .copied()
        .collect();
    let range = port_range();
    let span = range.end - range.start;
    let nanos = std::time::SystemTime::UNIX_EPOCH
        .elapsed()
        .map_or(0, |d| d.subsec_nanos());
    let seed = std::process::id().wrapping_mul(7919).wrapping_add(nanos);
    let mut offset = u16::try_from(seed % u32::from(span)).unwrap_or(0);
    let mut ports: Vec<u16> = Vec::new();
    let clashes = |p: u16, ports: &[u16]| {
        ports.iter().chain(taken_before.iter()).any(|&q| {
            q == p || q + BUS_OFFSET == p || p + BUS_OFFSET == q || q + BUS_OFFSET == p + BUS_OFFSET
        })
    };
    for _ in 0..span {
        let p = range.start + offset;
        offset = (offset + 1) % span;
        if clashes(p, &ports) {
            continue;
        }
        let free = |port: u16| TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free(p) && free(p + BUS_OFFSET) {
            ports.push(p);
            if ports.len() == NODES {
                break;
            }
        }
    }
    handed_out.extend(&ports);
    ports
}

impl RedisCluster {
    /// Starts a plaintext cluster, or `None` (with a message) if `redis-server` or
    /// `redis-cli` is not installed (under `CI=true`: fails).
    pub fn start() -> Option<Self> {
        Self::start_with(ClusterSetup::default())
    }

    /// Starts a cluster as `setup` says; `None` to skip as [`Self::start`].
    pub fn start_with(setup: ClusterSetup) -> Option<Self> {
        if !installed("redis-server") || !installed("redis-cli") {
            assert!(
                !in_ci(),
                "redis-server / redis-cli are not installed, and CI=true requires the Redis \
                 Cluster tests"
            );
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPING the Redis Cluster part of this test: redis-server or redis-cli is not \
                 installed"
            );
            return None;
        }
        // A port is free when probed and may be taken a moment later; retry the rare clash.
        let mut last_error = String::new();
        let mut avoid = Vec::new();
        for _ in 0..3 {
            match Self::try_start(&setup, &avoid) {
                Ok(cluster) => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "Redis Cluster started: ports {:?}, started and joined in {:.1} s",
                        cluster.ports(),
                        cluster.started_in.as_secs_f64()
                    );
                    return Some(cluster);
                }
                Err((e, ports)) => {
                    last_error = e;
                    avoid.extend(ports);
                }
            }
        }
        panic!("could not start a Redis Cluster: {last_error}");
    }

    fn try_start(setup: &ClusterSetup, avoid: &[u16]) -> Result<Self, (String, Vec<u16>)> {
        static N: AtomicU32 = AtomicU32::new(0);
        let started = Instant::now();
        let dir = std::env::temp_dir().join(format!(
            "cim-redis-cluster-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let ports = free_ports(avoid);
        if ports.len() < NODES {
            return Err(("not enough free port pairs below 55536".into(), ports));
        }
        std::fs::create_dir_all(&dir).map_err(|e| (e.to_string(), ports.clone()))?;
        let tls = setup.tls.then(|| {
            let ca = TestCa::new("redis-cluster");
            let server = ca.server_cert("redis-cluster-node");
            let peer = ca.client_cert("redis-cluster-peer", "redis-node");
            let client = ca.client_cert("redis-cluster-client", "cim");
            ClusterTls {
                ca,
                server,
                peer,
                client,
            }
        });
        let mut cluster = Self {
            nodes: ports
                .iter()
                .map(|&port| Node {
                    port,
                    dir: dir.join(port.to_string()),
                    child: Mutex::new(None),
                })
                .collect(),
            dir,
            setup: setup.clone(),
            tls,
            started_in: Duration::ZERO,
        };
        cluster.watchdog().map_err(|e| (e, ports.clone()))?;
        for node in &cluster.nodes {
            cluster.spawn(node).map_err(|e| (e, ports.clone()))?;
        }
        let mut create = cluster.cli_command();
        create.args(["--cluster", "create"]);
        for port in &ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = create
            .output()
            .map_err(|e| (e.to_string(), ports.clone()))?;
        if !out.status.success() {
            return Err((
                format!(
                    "redis-cli --cluster create failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                ports,
            ));
        }
        cluster
            .wait_until_ok(Duration::from_secs(30))
            .map_err(|e| (e, ports.clone()))?;
        cluster
            .wait_for_replicas(Duration::from_secs(30))
            .map_err(|e| (e, ports.clone()))?;
        cluster.started_in = started.elapsed();
        Ok(cluster)
    }

    /// Kills every node and removes the dir once this process is gone (a shared cluster is
    /// never dropped). Nodes' process ids are in `<dir>/<port>/pid`; a node killed on purpose
    /// has its file removed first, so a reused id is never hit.
    fn watchdog(&self) -> Result<(), String> {
        let script = r#"while kill -0 "$1" 2>/dev/null && [ -d "$2" ]; do sleep 0.5; done
            for f in "$2"/*/pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null; done
            rm -rf "$2""#;
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(std::process::id().to_string())
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(|_| ())
            .map_err(|e| format!("spawn the watchdog: {e}"))
    }

    fn spawn(&self, node: &Node) -> Result<(), String> {
        std::fs::create_dir_all(&node.dir).map_err(|e| e.to_string())?;
        let port = node.port.to_string();
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => {
                command.args(["--port", &port]);
            }
            Some(tls) => {
                command
                    .args(["--port", "0", "--tls-port", &port])
                    .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                    .arg("--tls-cert-file")
                    .arg(&tls.server.cert_path)
                    .arg("--tls-key-file")
                    .arg(&tls.server.key_path)
                    // What the nodes present to each other as clients (bus, replication).
                    .arg("--tls-client-cert-file")
                    .arg(&tls.peer.cert_path)
                    .arg("--tls-client-key-file")
                    .arg(&tls.peer.key_path)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca.cert_path)
                    .args([
                        "--tls-auth-clients",
                        if self.setup.require_client_cert {
                            "yes"
                        } else {
                            "no"
                        },
                    ]);
            }
        }
        let timeout = self.setup.node_timeout_ms.unwrap_or(2000).to_string();
        command
            .args(["--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", &timeout])
            .args(["--save", ""])
            .args(if self.setup.aof_everysec {
                ["--appendonly", "yes", "--appendfsync", "everysec"].as_slice()
            } else {
                ["--appendonly", "no"].as_slice()
            })
            // Replicas sync at once (the default waits 5 s for more replicas), so a master
            // killed right after the start has a replica able to take over.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(&node.dir)
            .arg("--logfile")
            .arg(node.dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().map_err(|e| e.to_string())?;
        std::fs::write(node.dir.join("pid"), child.id().to_string()).map_err(|e| e.to_string())?;
        *lock(&node.child) = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.cli(node.port, &["PING"]).is_ok_and(|r| r == "PONG") {
                return Ok(());
            }
            if let Some(child) = lock(&node.child).as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!(
                    "redis-server on {port} exited: {status} (log: {})",
                    node.dir.join("redis.log").display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "redis-server on {port} did not answer PING within 10 s"
        ))
    }

    /// `redis-cli` with this cluster's TLS options.
    fn cli_command(&self) -> Command {
        let mut command = Command::new("redis-cli");
        if let Some(tls) = &self.tls {
            command
                .arg("--tls")
                .arg("--cacert")
                .arg(&tls.ca.cert_path)
                .arg("--cert")
                .arg(&tls.client.cert_path)
                .arg("--key")
                .arg(&tls.client.key_path);
        }
        command.stdin(Stdio::null());
        command
    }

    /// Runs one command on the node at `port` and returns its reply as `redis-cli` prints it
    /// without a terminal (raw: no quotes, one line per array element).
    pub fn cli(&self, port: u16, args: &[&str]) -> Result<String, String> {
        let out = self
            .cli_command()
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .map_err(|e| format!("redis-cli: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
        if !out.status.success() || text.starts_with("ERR") || text.starts_with("Could not") {
            return Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)));
        }
        Ok(text)
    }

    /// Waits until every live node says `cluster_state:ok` and agrees on the masters of all
    /// 16384 slots.
    pub fn wait_until_ok(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            let live: Vec<u16> = self.live_ports();
            let states: Vec<Result<String, String>> = live
                .iter()
                .map(|&p| self.cli(p, &["CLUSTER", "INFO"]))
                .collect();
            let all_ok = states
                .iter()
                .all(|s| s.as_ref().is_ok_and(|s| s.contains("cluster_state:ok")));
            let views: Vec<Option<Vec<(u16, u16, u16)>>> =
                live.iter().map(|&p| self.slot_masters_at(p).ok()).collect();
            let agree = views.first().is_some_and(|first| {
                first.as_ref().is_some_and(covers_all_slots) && views.iter().all(|v| v == first)
            });
            if all_ok && agree {
                return Ok(());
            }
            last = format!("{states:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "the cluster did not become ok within {within:?}: {last}"
        ))
    }

    /// Waits until every live replica's link to its master is up (it has synced): a replica
    /// that never synced refuses to take over.
    pub fn wait_for_replicas(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            let infos: Vec<String> = self
                .live_ports()
                .iter()
                .map(|&p| self.cli(p, &["INFO", "replication"]).unwrap_or_default())
                .collect();
            let replicas: Vec<&String> =
                infos.iter().filter(|i| i.contains("role:slave")).collect();
            if replicas.len() * 2 >= infos.len()
                && replicas.iter().all(|i| i.contains("master_link_status:up"))
            {
                return Ok(());
            }
            last = format!("{} replicas of {} nodes", replicas.len(), infos.len());
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("replicas not in sync within {within:?}: {last}"))
    }

    /// Waits until a replica has taken over every slot of the (killed) node at `port`: no
    /// live node names it master of any slot, and the cluster is ok again. Returns how long
    /// that took.
    pub fn wait_for_failover(&self, port: u16, within: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let deadline = started + within;
        while Instant::now() < deadline {
            let taken_over = self.live_ports().iter().all(|&p| {
                self.slot_masters_at(p)
                    .is_ok_and(|r| covers_all_slots(&r) && r.iter().all(|&(_, _, m)| m != port))
            });
            if taken_over {
                self.wait_until_ok(deadline.saturating_duration_since(Instant::now()))?;
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let view = self.cli(self.any_live_port(), &["CLUSTER", "NODES"]);
        Err(format!(
            "no replica took over from {port} within {within:?}; CLUSTER NODES: {view:?}"
        ))
    }

    /// Client ports of every node, masters and replicas.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Ports of the nodes this test has not killed.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| lock(&n.child).is_some())
            .map(|n| n.port)
            .collect()
    }

    /// Every node's URL (`redis://` or `rediss://`), as `--redis-cluster` takes them.
    pub fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        self.nodes
            .iter()
            .map(|n| format!("{scheme}://127.0.0.1:{}/", n.port))
            .collect()
    }

    /// The certificates of a TLS cluster.
    pub fn tls(&self) -> Option<&ClusterTls> {
        self.tls.as_ref()
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`: Redis's own answer, hash tags included).
    pub fn slot_of(&self, key: &str) -> u16 {
        let port = self.any_live_port();
        self.cli(port, &["CLUSTER", "KEYSLOT", key])
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("CLUSTER KEYSLOT answers a number")
    }

    /// `(first slot, last slot, master port)` of every slot range, as the node at `port`
    /// sees them (`CLUSTER SLOTS`), sorted.
    fn slot_masters_at(&self, port: u16) -> Result<Vec<(u16, u16, u16)>, String> {
        // `CLUSTER SLOTS` printed raw: per range, start, end, then per node ip, port, id
        // (and in 7.0 possibly an empty networking-metadata map). `CLUSTER NODES` is one
        // line per node and easier to read.
        let nodes = self.cli(port, &["CLUSTER", "NODES"])?;
        let mut ranges = Vec::new();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Flags are comma-separated; `nofailover` is not `fail`.
            let flags: Vec<&str> = fields.get(2).map_or(Vec::new(), |f| f.split(',').collect());
            if fields.len() < 8
                || !flags.contains(&"master")
                || flags.iter().any(|&f| f == "fail" || f == "fail?")
            {
                continue;
            }
            let Some(node_port) = fields[1]
                .split('@')
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse().ok())
            else {
                continue;
            };
            for range in &fields[8..] {
                if range.starts_with('[') {
                    continue; // a slot being migrated or imported
                }
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                    ranges.push((a, b, node_port));
                }
            }
        }
        ranges.sort_unstable();
        Ok(ranges)
    }

    fn any_live_port(&self) -> u16 {
        *self
            .live_ports()
            .first()
            .expect("a cluster with at least one live node")
    }

    /// The port of the master serving `slot`, as the first live node sees it.
    pub fn master_of_slot(&self, slot: u16) -> Option<u16> {
        self.live_ports().into_iter().find_map(|port| {
            self.slot_masters_at(port)
                .ok()?
                .into_iter()
                .find(|&(a, b, _)| a <= slot && slot <= b)
                .map(|(_, _, p)| p)
        })
    }

    /// The port of the master serving `key`'s slot.
    pub fn master_of_key(&self, key: &str) -> Option<u16> {
        self.master_of_slot(self.slot_of(key))
    }

    /// The masters' ports, ascending.
    pub fn masters(&self) -> Vec<u16> {
        let ranges = self
            .slot_masters_at(self.any_live_port())
            .unwrap_or_default();
        let mut masters: Vec<u16> = ranges.into_iter().map(|(_, _, p)| p).collect();
        masters.sort_unstable();
        masters.dedup();
        masters
    }

    /// Empties every master (`FLUSHALL`, replicated to their replicas), so a test sharing the
    /// cluster starts from nothing.
    pub fn flush_all(&self) {
        for port in self.masters() {
            self.cli(port, &["FLUSHALL"])
                .unwrap_or_else(|e| panic!("FLUSHALL on {port}: {e}"));
        }
    }

    /// Moves `slot`, keys and all, from its master to the master at `to`, as
    /// `redis-cli --cluster reshard` does for one slot: `IMPORTING` / `MIGRATING`, `MIGRATE`
    /// of every key, then `SETSLOT NODE` on every master. A client that cached the old owner
    /// is then answered `MOVED`.
    pub fn move_slot(&self, slot: u16, to: u16) -> Result<(), String> {
        let from = self
            .master_of_slot(slot)
            .ok_or_else(|| format!("no master serves slot {slot}"))?;
        if from == to {
            return Ok(());
        }
        let id = |port: u16| self.cli(port, &["CLUSTER", "MYID"]);
        let (from_id, to_id) = (id(from)?, id(to)?);
        let slot_text = slot.to_string();
        self.cli(
            to,
            &["CLUSTER", "SETSLOT", &slot_text, "IMPORTING", &from_id],
        )?;
        self.cli(
            from,
            &["CLUSTER", "SETSLOT", &slot_text, "MIGRATING", &to_id],
        )?;
        loop {
            let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot_text, "100"])?;
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let to_text = to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_text, "", "0", "5000", "KEYS"];
            args.extend(keys);
            self.cli(from, &args)?;
        }
        for master in self.masters() {
            self.cli(master, &["CLUSTER", "SETSLOT", &slot_text, "NODE", &to_id])?;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.live_ports().iter().all(|&p| {
                self.slot_masters_at(p)
                    .is_ok_and(|r| owner(&r, slot) == Some(to))
            }) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "slot {slot} not seen on {to} by every node within 10 s"
        ))
    }

    /// Ports of the replicas connected to the master at `port`, as it says itself (`INFO
    /// replication`; the cluster's gossip may still show a new replica as a master).
    pub fn replicas_of(&self, master: u16) -> Vec<u16> {
        let Ok(info) = self.cli(master, &["INFO", "replication"]) else {
            return Vec::new();
        };
        // `slave0:ip=127.0.0.1,port=30001,state=online,offset=..,lag=..`
        info.lines()
            .filter(|l| l.starts_with("slave") && l.contains(":ip="))
            .filter_map(|l| {
                l.split(',')
                    .find_map(|field| field.strip_prefix("port="))?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// SIGKILL of the node at `port` (no shutdown, no save); waits until it is gone.
    pub fn kill_node(&self, port: u16) {
        let Some(node) = self.nodes.iter().find(|n| n.port == port) else {
            return;
        };
        // The pid file first, so the watchdog never signals a reused id.
        let _ = std::fs::remove_file(node.dir.join("pid"));
        if let Some(mut child) = lock(&node.child).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGKILL of the master that serves `slot`; returns its port.
    pub fn kill_master_of_slot(&self, slot: u16) -> Option<u16> {
        let port = self.master_of_slot(slot)?;
        self.kill_node(port);
        Some(port)
    }

    /// Starts a killed node again on its port and dir (it rejoins from its `nodes.conf`,
    /// as a replica of whoever took over its slots).
    pub fn restart_node(&self, port: u16) -> Result<(), String> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.port == port)
            .ok_or_else(|| format!("no node on {port}"))?;
        self.kill_node(port);
        self.spawn(node)
    }

    /// The root of the nodes' dirs (each node's `redis.log` is in `<dir>/<port>/`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn owner(ranges: &[(u16, u16, u16)], slot: u16) -> Option<u16> {
    ranges
        .iter()
        .find(|&&(a, b, _)| a <= slot && slot <= b)
        .map(|&(_, _, p)| p)
}

fn covers_all_slots(ranges: &Vec<(u16, u16, u16)>) -> bool {
    let mut next = 0u32;
    for &(a, b, _) in ranges {
        if u32::from(a) != next {
            return false;
        }
        next = u32::from(b) + 1;
    }
    next == 16_384
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            self.kill_node(node.port);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
