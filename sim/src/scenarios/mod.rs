//! The scenarios: each builds a cluster, runs a seeded workload and fault plan over it,
//! records the run and checks it. [`Scenario::run`] is one run: a [`RunSpec`] (the seed,
//! and the balancer and canary it was asked for) decides everything it does.
//!
//! Shared pieces: [`Plan`] (what a run does, decided from the seed before it starts),
//! [`chat_client`] (an SDK client that registers, joins a group, chats and records what its
//! application sees), and [`drive`] (steps the simulation, applying the fault plan, then
//! reads the final logs and calls the checker). The store's faults act on every store host,
//! or on one master of a sharded store ([`shard_failover_fault`]).

pub mod broadcast;
pub mod duplicate_login;
pub mod everything;
pub mod failover;
pub mod lost_tail;
pub mod shard_failover;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use cim_core::canary::Canaries;
use cim_core::client::{ClientConfig, ClientEvent};
use cim_core::ids::{ConvId, LogEpoch, ServerId, UnixMillis, UserId};
use cim_core::route::balance::Strategy;
use cim_core::store::{StoreCommand, StoreReply};
use cim_io::sdk::{Client, RouteApi};
use cim_io::store::Store;
use cim_sim_hosts::TurmoilNet;
use tokio::sync::Notify;

use crate::checker::{self, Bounds, ClientId, Fault, FinalLog, Host, Membership, Report};
use crate::cluster::{ClientEnv, Cluster, ClusterSpec, Hooks, REGISTRY_HOST};
use crate::record::{Counters, Recorder, secs, sim_now, trace_hash};

/// The scenarios' turmoil step. Coarser than turmoil's 1 ms default: a run covers about
/// 100 s of simulated time, and stepping every host every millisecond dominates its cost.
/// Network latency (up to 100 ms) still spans many steps.
pub const TICK: Duration = Duration::from_millis(5);

/// A named scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Failover,
    DuplicateLogin,
    Broadcast,
    Everything,
    LostTail,
    ShardFailover,
}

impl Scenario {
    pub const ALL: [Scenario; 6] = [
        Scenario::Failover,
        Scenario::DuplicateLogin,
        Scenario::Broadcast,
        Scenario::Everything,
        Scenario::LostTail,
        Scenario::ShardFailover,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Failover => "failover",
            Self::DuplicateLogin => "duplicate-login",
            Self::Broadcast => "broadcast",
            Self::Everything => "everything",
            Self::LostTail => "lost-tail",
            Self::ShardFailover => "shard-failover",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// One run of this scenario.
    pub fn run(self, run: RunSpec) -> ScenarioOutcome {
        match self {
            Self::Failover => failover::run(run),
            Self::DuplicateLogin => duplicate_login::run(run),
            Self::Broadcast => broadcast::run(run),
            Self::Everything => everything::run(run),
            Self::LostTail => lost_tail::run(run),
            Self::ShardFailover => shard_failover::run(run),
        }
    }

    /// What [`run`](Self::run) will do: decided before the simulation starts.
    pub fn plan(self, run: RunSpec) -> Plan {
        match self {
            Self::Failover => failover::plan(run),
            Self::DuplicateLogin => duplicate_login::plan(run),
            Self::Broadcast => broadcast::plan(run),
            Self::Everything => everything::plan(run),
            Self::LostTail => lost_tail::plan(run),
            Self::ShardFailover => shard_failover::plan(run),
        }
    }

    /// How to replay one run from a shell: every flag that shaped it.
    pub fn replay_command(self, run: RunSpec) -> String {
        let mut command = String::new();
        if run.canaries.off().is_some() {
            command.push_str("CIM_CANARIES=1 ");
        }
        command.push_str(&format!(
            "SIM_SEED={} cargo run -p cim-sim --release -- --scenario {}",
            run.seed,
            self.name()
        ));
        if let Some(strategy) = run.balancer {
            command.push_str(&format!(" --balancer {}", strategy.name()));
        }
        if let Some(canary) = run.canaries.off() {
            command.push_str(&format!(" --canary {canary}"));
        }
        command
    }
}

/// Everything that decides one run besides the scenario: its seed and the sweep's flags.
/// Two runs of a scenario with equal specs, each in a fresh process, are byte-identical.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunSpec {
    pub seed: u64,
    /// How routes pick a server (`None`: the routes' default, consistent hashing).
    pub balancer: Option<Strategy>,
    /// The safety mechanism switched off (canary builds only).
    pub canaries: Canaries,
}

impl RunSpec {
    /// `seed` with the default balancer and no canary.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            ..Self::default()
        }
    }

    /// The cluster of this run: `servers` and `routes` on the scenarios' [`TICK`], with the
    /// run's balancer and canaries.
    pub fn cluster(self, servers: usize, routes: usize) -> ClusterSpec {
        let mut spec = ClusterSpec::new(self.seed, servers, routes);
        spec.tick = TICK;
        spec.strategy = self.balancer;
        spec.canaries = self.canaries;
        spec
    }
}

/// What one run found.
#[derive(Debug, Clone)]
pub struct ScenarioOutcome {
    pub scenario: Scenario,
    pub run: RunSpec,
    /// The checker's verdict.
    pub report: Report,
    /// Scenario-specific findings (beyond the checker's invariants), and a simulation that
    /// stopped with an error.
    pub problems: Vec<String>,
    /// Fingerprint of the recorded history: equal for two runs of one seed.
    pub trace_hash: u64,
    pub counters: Counters,
    /// Simulated time the run covered.
    pub sim_time: Duration,
    /// The fault plan, for the report of a failing run.
    pub faults: Vec<String>,
}

impl ScenarioOutcome {
    pub fn is_clean(&self) -> bool {
        self.report.is_clean() && self.problems.is_empty()
    }

    pub fn violations(&self) -> usize {
        self.report.violations.len() + self.problems.len()
    }
}

impl ScenarioOutcome {
    pub fn seed(&self) -> u64 {
        self.run.seed
    }
}

/// A failing run's report starts with how to replay it and what its faults were, then its
/// findings.
impl fmt::Display for ScenarioOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.is_clean() {
            writeln!(f, "replay: {}", self.scenario.replay_command(self.run))?;
            write_fault_plan(f, &self.faults)?;
        }
        writeln!(
            f,
            "{} SIM_SEED={} trace {:016x}, {} simulated: {}",
            self.scenario.name(),
            self.run.seed,
            self.trace_hash,
            secs(self.sim_time),
            self.report
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

fn write_fault_plan(f: &mut impl fmt::Write, faults: &[String]) -> fmt::Result {
    writeln!(f, "fault plan:")?;
    for fault in faults {
        writeln!(f, "  {fault}")?;
    }
    Ok(())
}

/// SplitMix64: the scenarios' own seeded choices (stable, no dependency).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi]`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Uniform in `[lo, hi]`, millisecond steps.
    pub fn duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        Duration::from_millis(self.between(lo.as_millis() as u64, hi.as_millis() as u64))
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next_u64() % items.len() as u64) as usize]
    }
}

/// User ids by name, filled by the client that registers the user, read by its other
/// clients (concurrent logins of one user).
pub type Directory = Arc<Mutex<BTreeMap<String, UserId>>>;

fn lookup(dir: &Directory, name: &str) -> Option<UserId> {
    dir.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .copied()
}

/// A server to fault: by index, or the one holding `user`'s session at that moment.
#[derive(Debug, Clone)]
pub enum Target {
    Server(usize),
    HolderOf(String),
}

/// A role of the cluster, as one side of a link fault.
#[derive(Debug, Clone)]
pub enum Node {
    Server(Target),
    Route(usize),
    Store,
    Registry,
}

/// A fault action of the plan.
#[derive(Debug, Clone)]
pub enum Action {
    /// The process dies (turmoil crash).
    Crash(Target),
    /// A route's process dies.
    CrashRoute(usize),
    /// The store's process dies; its data survives (Redis with its AOF on disk).
    CrashStore,
    /// Every crashed server, route and store starts again (turmoil bounce).
    RestartCrashed,
    /// Partitions the server from every other host, or from the clients only.
    Isolate { target: Target, clients_only: bool },
    /// Cuts every link between the hosts of `a` and of `b`; one way (`a` to `b`) only, if
    /// `one_way`.
    Partition { a: Node, b: Node, one_way: bool },
    /// Holds every message between `a` and `b` until the heal releases them (a stall).
    Hold { a: Node, b: Node },
    /// Sets the latency of the links between `a` and `b` (the heal restores the default).
    Latency { a: Node, b: Node, latency: Duration },
    /// Repairs every partition, releases every hold, restores every latency.
    HealAll,
    /// Keeps a copy of the store's data as it is now: what the next [`Action::StoreLostTail`]
    /// restarts from.
    CopyStore,
    /// The store's process dies and comes back (at the heal) from the last
    /// [`Action::CopyStore`], with a new incarnation: every write since the copy is lost,
    /// after clients already read some of them (Redis restarted from an AOF that lost its
    /// last second, or a replica promoted before it had its master's last writes).
    StoreLostTail,
    /// The store comes back in a new incarnation with everything it had (a restart that
    /// lost nothing, a replica promoted with all its master's writes): every log moves to a
    /// new epoch when next touched, carrying everything over. Instant: connections stay.
    StoreRestartWithoutLoss,
    /// One master of a sharded store: its replica stops following (cut off, or behind), so
    /// what it has now is what the master's failover restores; under `WAIT` appends to the
    /// master are no longer acknowledged (their outcome is unknown).
    ShardReplicaLags(usize),
    /// One master of a sharded store fails: its host goes down, and its keys come back in a
    /// new incarnation of that master — everything (`lossless`: the replica had every write)
    /// or as the replica had them when it started lagging ([`Action::ShardReplicaLags`]),
    /// losing the tail after clients read some of it. The others serve on.
    ShardFailover { shard: usize, lossless: bool },
    /// The failed master's replica serves (its host is back): a new replica follows it.
    ShardPromoted(usize),
}

/// One SDK client of a scenario.
#[derive(Debug, Clone)]
pub struct ClientPlan {
    pub client: ClientId,
    pub name: String,
    pub password: String,
    /// Route index it logs in through.
    pub route: usize,
    /// Registers the user (exactly one client per user does).
    pub registers: bool,
    /// Starts (registers, or waits for the user's id) at this time.
    pub start_at: Duration,
    /// Starts the SDK session (logs in) at this time, or at once when later.
    pub login_at: Duration,
    /// Creates-or-joins this group before chatting.
    pub group: Option<String>,
    /// Chats from `chat.0` to `chat.1`, every 0.3–1.5 s, into `all` (and the group).
    pub chat: Option<(Duration, Duration)>,
}

/// What one run does, decided from the seed before the simulation starts.
#[derive(Debug, Clone)]
pub struct Plan {
    pub spec: ClusterSpec,
    pub clients: Vec<ClientPlan>,
    pub actions: Vec<(Duration, Action)>,
    /// Start of the healed phase: every fault is over.
    pub healed_at: Duration,
    pub end: Duration,
    /// Clients that must have joined the group before anyone posts in it.
    pub group_members: usize,
    /// A master's outage that users on the other masters must chat through (checked only
    /// in runs with no other fault: invariant 11).
    pub shard_outage: Option<PlannedOutage>,
}

/// One master of a sharded store down from `from` to `until` (its failover to its
/// replica's promotion).
#[derive(Debug, Clone, Copy)]
pub struct PlannedOutage {
    pub shard: usize,
    pub from: Duration,
    pub until: Duration,
    pub ack_bound: Duration,
}

impl Plan {
    /// The fault plan, one action a line with its time.
    pub fn faults(&self) -> Vec<String> {
        self.actions
            .iter()
            .map(|(at, action)| format!("{}: {action:?}", secs(*at)))
            .collect()
    }

    /// What a run prints before it starts: how to replay it and its fault plan.
    pub fn preamble(&self, scenario: Scenario, run: RunSpec) -> String {
        let mut text = format!("replay: {}\n", scenario.replay_command(run));
        let _ = write_fault_plan(&mut text, &self.faults());
        text
    }
}

/// The cluster's session and reconnect settings, as every client uses them.
pub fn client_config_defaults() -> ClientConfig {
    ClientConfig::new(UserId(0), "", "", 0)
}

/// DESIGN.md's re-home bound: heartbeat timeout + backoff cap + login timeout + connect
/// timeout; plus the registry session timeout when the old server was partitioned.
pub fn rehome_bounds(spec: &ClusterSpec) -> (Duration, Duration) {
    let c = client_config_defaults();
    let death = c.heartbeat_timeout + c.backoff_cap + c.login_timeout + c.connect_timeout;
    (death, death + spec.session_timeout)
}

/// `count` users `user0`.. that each register, log in through route `i` (modulo the routes)
/// within the first 0.5 s, join `group` and chat from `chat.0` to `chat.1`.
pub fn chatters(
    rng: &mut Rng,
    count: usize,
    group: &str,
    chat: (Duration, Duration),
) -> Vec<ClientPlan> {
    (0..count)
        .map(|i| ClientPlan {
            client: ClientId(i as u32),
            name: format!("user{i}"),
            password: format!("password-{i}"),
            route: i,
            registers: true,
            start_at: Duration::from_millis(rng.between(0, 500)),
            login_at: Duration::ZERO,
            group: Some(group.to_owned()),
            chat: Some(chat),
        })
        .collect()
}

/// The end of a run whose faults are over at `healed_at`: a re-home within the bound, then
/// a head check (30 s) that recovers a lost last push of a client that never disconnected,
/// and some slack.
pub fn run_end(spec: &ClusterSpec, healed_at: Duration) -> Duration {
    let (_, rehome) = rehome_bounds(spec);
    healed_at + rehome + Duration::from_secs(40)
}

/// Shared between a run's clients: the directory and the group barrier.
#[derive(Debug, Clone, Default)]
struct Shared {
    dir: Directory,
    joined: Arc<AtomicUsize>,
    /// Users who joined the group before anyone could post in it (join seq 0).
    members: Arc<Mutex<BTreeSet<UserId>>>,
}

async fn sleep_until_sim(t: Duration) {
    let now = sim_now();
    if t > now {
        tokio::time::sleep(t - now).await;
    }
}

/// One SDK client: registers (or waits for its user's id), starts the session, records every
/// event until `end`, joins its group, then chats.
async fn chat_client(
    env: ClientEnv,
    plan: ClientPlan,
    shared: Shared,
    rec: Recorder,
    group_members: usize,
    end: Duration,
) -> turmoil::Result {
    sleep_until_sim(plan.start_at).await;
    let api = RouteApi::new(
        TurmoilNet,
        env.routes[plan.route % env.routes.len()].clone(),
        env.route_port,
        Duration::from_secs(5),
    );
    let user = loop {
        if sim_now() >= end {
            return Ok(());
        }
        if plan.registers {
            if let Ok(r) = api.register(&plan.name, &plan.password).await {
                let user = UserId(r.user_id);
                shared
                    .dir
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(plan.name.clone(), user);
                break user;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        } else if let Some(user) = lookup(&shared.dir, &plan.name) {
            break user;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    rec.add_client(plan.client, user);
    sleep_until_sim(plan.login_at).await;
    let options = env.sdk_options(user, &plan.name, &plan.password, plan.route);
    let (client, mut events) = Client::start(TurmoilNet, env.clock(), options);
    let id = plan.client;
    // Between `Reconnecting` and `Online`; a reconnect wakes the chat loop for a burst.
    let offline = AtomicBool::new(false);
    let reconnected = Notify::new();
    let pump = {
        let rec = rec.clone();
        let (offline, reconnected) = (&offline, &reconnected);
        async move {
            while let Some(event) = events.next().await {
                rec.client_event(id, user, sim_now(), &event);
                match event {
                    ClientEvent::Reconnecting { .. } => offline.store(true, Ordering::SeqCst),
                    ClientEvent::Online { .. } if offline.swap(false, Ordering::SeqCst) => {
                        reconnected.notify_one();
                    }
                    _ => {}
                }
            }
        }
    };
    let work = async {
        let mut rng = crate::scenarios::Rng::new(env.seed);
        let mut convs = vec![ConvId::All];
        if let Some(group) = &plan.group {
            let token = loop {
                if let Some(token) = client.token() {
                    break token;
                }
                if sim_now() >= end {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            let _ = api.create_group(&token, user, group).await;
            for _ in 0..20 {
                if api.join_group(&token, user, group).await.is_ok() {
                    if let Ok(conv) = ConvId::group(group) {
                        // Before the barrier opens nobody posts in it: join seq 0.
                        if shared.joined.load(Ordering::SeqCst) < group_members {
                            shared
                                .members
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(user);
                        }
                        convs.push(conv);
                    }
                    shared.joined.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if let Some((from, until)) = plan.chat {
            // The group barrier: everyone joined, or long enough.
            while shared.joined.load(Ordering::SeqCst) < group_members
                && sim_now() < from + Duration::from_secs(10)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            sleep_until_sim(from).await;
            let mut n = 0u64;
            while sim_now() < until {
                let pause = rng.duration(Duration::from_millis(300), Duration::from_millis(1500));
                let woken_by_reconnect = tokio::select! {
                    biased;
                    () = reconnected.notified() => true,
                    () = tokio::time::sleep(pause) => false,
                };
                if sim_now() >= until {
                    break;
                }
                // Bursts while offline (they wait in the outbox and leave together), right
                // after a reconnect (behind the outbox's resend), and now and then anyway:
                // one sender's order is only at stake when its messages overlap in flight.
                let burst = if woken_by_reconnect || offline.load(Ordering::SeqCst) {
                    rng.between(2, 6)
                } else if rng.between(0, 9) == 0 {
                    rng.between(2, 5)
                } else {
                    1
                };
                for _ in 0..burst {
                    n += 1;
                    let conv = convs[(rng.next_u64() % convs.len() as u64) as usize].clone();
                    let body = Bytes::from(format!("{}#{} {n}", plan.name, plan.client.0));
                    if let Ok(msg_id) = client.submit(conv.clone(), body).await {
                        rec.submitted(id, user, conv, msg_id);
                    }
                }
            }
        }
        sleep_until_sim(end).await;
    };
    tokio::select! {
        _ = pump => {}
        _ = work => {}
    }
    if let Ok(stats) = client.stats().await {
        rec.count_n("gaps fetched by the client", stats.gap_fetches);
    }
    Ok(())
}

/// The simulation's elapsed time. Outside any host, so from the `Sim`.
fn elapsed(cluster: &Cluster) -> Duration {
    cluster.sim.elapsed()
}

/// Polls a future that is ready at once (the in-memory store's).
fn ready<T>(future: impl Future<Output = T>) -> Option<T> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(value) => Some(value),
        Poll::Pending => None,
    }
}

/// The final state of `conv`'s log, as `reader` (a member) sees it.
fn final_log(
    cluster: &Cluster,
    now: UnixMillis,
    reader: UserId,
    conv: &ConvId,
) -> Option<FinalLog> {
    let fetch = StoreCommand::Fetch {
        user: reader,
        conv: conv.clone(),
        log_epoch: LogEpoch(0),
        after_seq: u64::MAX,
        limit: 0,
    };
    match ready(cluster.store.execute(now, fetch))? {
        Ok(StoreReply::Fetched { head, .. }) if head.head_seq > 0 => Some(FinalLog {
            log_epoch: head.log_epoch,
            head_seq: head.head_seq,
            first_available_seq: head.first_available_seq,
        }),
        _ => None,
    }
}

/// The hosts of a run, to resolve a fault's [`Node`]s.
struct Hosts<'a> {
    servers: &'a [String],
    routes: &'a [String],
    clients: &'a [String],
    /// The store, the registry and the routes.
    others: &'a [String],
    shared: &'a Shared,
    rec: &'a Recorder,
    /// The store's data (for the lost-tail faults).
    store: &'a cim_io::store::MemoryBackend,
    /// The store's hosts (one, or one per master) and their replicas.
    store_hosts: &'a [String],
    replicas: &'a [Arc<cim_sim_hosts::Replica>],
    spec: &'a ClusterSpec,
}

impl Hosts<'_> {
    fn server(&self, t: &Target) -> String {
        let servers = self.servers;
        let index = match t {
            Target::Server(i) => *i % servers.len(),
            Target::HolderOf(name) => lookup(&self.shared.dir, name)
                .and_then(|u| self.rec.open_session_of(u))
                .and_then(|s| servers.iter().position(|h| h == s.as_str()))
                .unwrap_or(0),
        };
        servers[index].clone()
    }

    fn route(&self, i: usize) -> String {
        let routes = self.routes;
        routes[i % routes.len()].clone()
    }

    fn of(&self, node: &Node) -> Vec<String> {
        match node {
            Node::Server(t) => vec![self.server(t)],
            Node::Route(i) => vec![self.route(*i)],
            Node::Store => self.store_hosts.to_vec(),
            Node::Registry => vec![REGISTRY_HOST.to_owned()],
        }
    }

    fn is_server(&self, host: &str) -> bool {
        self.servers.iter().any(|h| h == host)
    }
}

/// What the fault plan has done so far, to undo it at the heal.
#[derive(Debug, Default)]
struct FaultState {
    /// The store's data as [`Action::CopyStore`] last kept it.
    store_copy: Option<Box<cim_core::memstore::MemoryStore>>,
    /// Lost-tail restarts so far (each draws its own seed).
    lost_tails: usize,
    /// Per master of a sharded store: its keys as its replica had them when it started
    /// lagging ([`Action::ShardReplicaLags`]).
    shard_copies: BTreeMap<usize, Box<cim_core::memstore::MemoryStore>>,
    crashed_servers: Vec<String>,
    /// Routes and the store.
    crashed_others: Vec<String>,
    partitioned: Vec<(String, String)>,
    held: Vec<(String, String)>,
    slowed: Vec<(String, String)>,
}

/// turmoil's default maximum message latency, restored at the heal.
const DEFAULT_MAX_LATENCY: Duration = Duration::from_millis(100);

impl FaultState {
    /// Applies `action` at `now`, records it for the checker; the counter it adds to (a
    /// restart counts its hosts itself).
    fn apply(
        &mut self,
        sim: &mut turmoil::Sim<'static>,
        hosts: &Hosts<'_>,
        rec: &Recorder,
        now: Duration,
        action: Action,
    ) -> Option<&'static str> {
        // A host cut from any peer is "isolated" for the checker: re-homes are measured
        // from the heal, and a server's clients must be back within the isolation bound.
        let isolated = |host: &str| {
            let h = if hosts.is_server(host) {
                Host::Server(ServerId::new(host))
            } else {
                Host::Other(host.to_owned())
            };
            rec.fault(now, Fault::Isolated(h));
        };
        Some(match action {
            Action::Crash(t) => {
                let host = hosts.server(&t);
                sim.crash(host.as_str());
                rec.server_died(&ServerId::new(host.clone()), now);
                self.crashed_servers.push(host);
                "server crashed"
            }
            Action::CrashRoute(i) => {
                let host = hosts.route(i);
                sim.crash(host.as_str());
                // Its clients log in through it only: their re-home counts from its restart.
                isolated(&host);
                self.crashed_others.push(host);
                "route crashed"
            }
            Action::CrashStore => {
                for host in hosts.store_hosts {
                    sim.crash(host.as_str());
                    isolated(host);
                    self.crashed_others.push(host.clone());
                }
                // Every server loses the store: it fences its sessions, and they re-home
                // once the store is back.
                for server in hosts.servers {
                    isolated(server);
                }
                "store crashed"
            }
            Action::RestartCrashed => {
                let n = self.crashed_servers.len() + self.crashed_others.len();
                rec.count_n("hosts restarted", n as u64);
                for host in self.crashed_servers.drain(..) {
                    sim.bounce(host.as_str());
                }
                let others = !self.crashed_others.is_empty();
                for host in self.crashed_others.drain(..) {
                    sim.bounce(host.as_str());
                    rec.fault(now, Fault::Healed(Host::Other(host)));
                }
                if others {
                    for server in hosts.servers {
                        rec.fault(now, Fault::Healed(Host::Server(ServerId::new(server))));
                    }
                }
                return None;
            }
            Action::Isolate {
                target,
                clients_only,
            } => {
                let host = hosts.server(&target);
                let mut peers = hosts.clients.to_vec();
                if !clients_only {
                    peers.extend(hosts.others.iter().cloned());
                    peers.extend(hosts.servers.iter().filter(|h| **h != host).cloned());
                }
                for peer in peers {
                    sim.partition(host.as_str(), peer.as_str());
                    self.partitioned.push((host.clone(), peer));
                }
                rec.fault(now, Fault::Isolated(Host::Server(ServerId::new(host))));
                if clients_only {
                    "server cut from clients"
                } else {
                    "server isolated"
                }
            }
            Action::Partition { a, b, one_way } => {
                for x in hosts.of(&a) {
                    for y in hosts.of(&b) {
                        if x == y {
                            continue;
                        }
                        if one_way {
                            sim.partition_oneway(x.as_str(), y.as_str());
                        } else {
                            sim.partition(x.as_str(), y.as_str());
                        }
                        isolated(&x);
                        isolated(&y);
                        self.partitioned.push((x.clone(), y));
                    }
                }
                if one_way {
                    "one-way partitions"
                } else {
                    "partitions"
                }
            }
            Action::Hold { a, b } => {
                for x in hosts.of(&a) {
                    for y in hosts.of(&b) {
                        if x != y {
                            sim.hold(x.as_str(), y.as_str());
                            isolated(&x);
                            isolated(&y);
                            self.held.push((x.clone(), y));
                        }
                    }
                }
                "holds"
            }
            Action::Latency { a, b, latency } => {
                for x in hosts.of(&a) {
                    for y in hosts.of(&b) {
                        if x != y {
                            sim.set_link_max_message_latency(x.as_str(), y.as_str(), latency);
                            self.slowed.push((x.clone(), y));
                        }
                    }
                }
                "latency spikes"
            }
            Action::HealAll => {
                for (a, b) in self.held.drain(..) {
                    sim.release(a.as_str(), b.as_str());
                }
                for (a, b) in self.partitioned.drain(..) {
                    sim.repair(a.as_str(), b.as_str());
                }
                for (a, b) in self.slowed.drain(..) {
                    sim.set_link_max_message_latency(a.as_str(), b.as_str(), DEFAULT_MAX_LATENCY);
                }
                rec.fault(now, Fault::HealAll);
                "heals"
            }
            Action::CopyStore => {
                self.store_copy = Some(Box::new(hosts.store.snapshot()));
                "store copies"
            }
            Action::StoreLostTail => {
                let copy = self.store_copy.as_ref()?;
                self.lost_tails += 1;
                let seed = hosts.spec.derive_seed("store lost tail", self.lost_tails);
                hosts.store.restart_from(copy, seed);
                rec.fault(now, Fault::StoreLossyRestart);
                for host in hosts.store_hosts {
                    sim.crash(host.as_str());
                    isolated(host);
                    self.crashed_others.push(host.clone());
                }
                for server in hosts.servers {
                    isolated(server);
                }
                "store restarts that lost a tail"
            }
            Action::ShardReplicaLags(shard) => {
                let shard = shard % hosts.store_hosts.len();
                self.shard_copies
                    .insert(shard, Box::new(hosts.store.snapshot()));
                hosts.replicas[shard].lag();
                "shard replicas lagging"
            }
            Action::ShardFailover { shard, lossless } => {
                let shard = shard % hosts.store_hosts.len();
                let host = hosts.store_hosts[shard].clone();
                let copy = match self.shard_copies.remove(&shard) {
                    Some(copy) if !lossless => copy,
                    _ => Box::new(hosts.store.snapshot()),
                };
                self.lost_tails += 1;
                let seed = hosts.spec.derive_seed("store lost tail", self.lost_tails);
                sim.crash(host.as_str());
                hosts.store.restart_shard_from(&copy, shard, seed);
                rec.fault(
                    now,
                    if lossless {
                        Fault::StoreRestart
                    } else {
                        Fault::StoreLossyRestart
                    },
                );
                // Its users' sessions are fenced (their refreshes are unknown) and they
                // re-home once it is back: measured from then, as after the store's crash.
                isolated(&host);
                for server in hosts.servers {
                    isolated(server);
                }
                self.crashed_others.push(host);
                if lossless {
                    "shard failovers without loss"
                } else {
                    "shard failovers that lost a tail"
                }
            }
            Action::ShardPromoted(shard) => {
                let shard = shard % hosts.store_hosts.len();
                let host = hosts.store_hosts[shard].clone();
                hosts.replicas[shard].follow();
                if let Some(i) = self.crashed_others.iter().position(|h| *h == host) {
                    self.crashed_others.remove(i);
                    sim.bounce(host.as_str());
                    rec.fault(now, Fault::Healed(Host::Other(host)));
                }
                return None;
            }
            Action::StoreRestartWithoutLoss => {
                self.lost_tails += 1;
                let seed = hosts.spec.derive_seed("store lost tail", self.lost_tails);
                hosts.store.restart_from(&hosts.store.snapshot(), seed);
                rec.fault(now, Fault::StoreRestart);
                "store restarts without loss"
            }
        })
    }
}

/// Context handed to a scenario's own checks after the run.
#[derive(Debug)]
pub struct Finished {
    pub rec: Recorder,
    pub dir: Directory,
    pub end: Duration,
}

/// Builds the cluster, runs `plan` to its end, checks the recording.
pub fn drive(
    scenario: Scenario,
    plan: Plan,
    extra_check: impl FnOnce(&Finished, &mut Vec<String>),
) -> ScenarioOutcome {
    let rec = Recorder::new();
    rec.set_end(plan.end);
    let hooks = Hooks {
        server_observer: Some({
            let rec = rec.clone();
            Arc::new(move |id: &ServerId| rec.session_observer(id))
        }),
    };
    let run = RunSpec {
        seed: plan.spec.seed,
        balancer: plan.spec.strategy,
        canaries: plan.spec.canaries,
    };
    let fault_plan = plan.faults();
    let mut cluster = Cluster::build_with(plan.spec.clone(), hooks);
    let shared = Shared::default();
    let client_hosts: Vec<String> = plan
        .clients
        .iter()
        .map(|c| format!("client-{}", c.client.0))
        .collect();
    for (c, host) in plan.clients.iter().zip(&client_hosts) {
        let (c, shared, rec) = (c.clone(), shared.clone(), rec.clone());
        let (members, end) = (plan.group_members, plan.end);
        cluster.add_client(host, move |env| {
            chat_client(env, c, shared, rec, members, end)
        });
    }
    let mut others: Vec<String> = cluster.store_hosts.clone();
    others.push(REGISTRY_HOST.to_owned());
    others.extend(cluster.route_hosts.iter().cloned());
    let mut problems = Vec::new();
    let mut actions = plan.actions.clone();
    actions.sort_by_key(|(at, _)| *at);
    let mut actions = actions.into_iter().peekable();
    let mut faults = FaultState::default();
    let mut counters = Counters::new();
    loop {
        let finished = match cluster.sim.step() {
            Ok(finished) => finished,
            Err(error) => {
                problems.push(format!("simulation stopped with an error: {error}"));
                break;
            }
        };
        let now = elapsed(&cluster);
        while actions.peek().is_some_and(|(at, _)| *at <= now) {
            let Some((_, action)) = actions.next() else {
                break;
            };
            let hosts = Hosts {
                servers: &cluster.server_hosts,
                routes: &cluster.route_hosts,
                clients: &client_hosts,
                others: &others,
                shared: &shared,
                rec: &rec,
                store: &cluster.store,
                store_hosts: &cluster.store_hosts,
                replicas: &cluster.replicas,
                spec: &cluster.spec,
            };
            if let Some(counter) = faults.apply(&mut cluster.sim, &hosts, &rec, now, action) {
                *counters.entry(counter).or_default() += 1;
            }
        }
        if finished {
            break;
        }
    }
    let sim_time = elapsed(&cluster);
    let mut history = rec.history();
    let members: BTreeSet<UserId> = shared
        .members
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let groups: BTreeSet<String> = plan
        .clients
        .iter()
        .filter_map(|c| c.group.clone())
        .collect();
    let mut membership = Membership::default();
    for g in &groups {
        membership
            .groups
            .insert(g.clone(), members.iter().map(|u| (*u, 0)).collect());
    }
    let wall = UnixMillis(plan.spec.origin.0 + sim_time.as_millis() as u64);
    let users: BTreeSet<UserId> = history.clients.iter().map(|c| c.user).collect();
    if let Some(&reader) = users.first()
        && let Some(log) = final_log(&cluster, wall, reader, &ConvId::All)
    {
        history.final_logs.insert(ConvId::All, log);
    }
    for g in &groups {
        let (Some(&reader), Ok(conv)) = (members.first(), ConvId::group(g)) else {
            continue;
        };
        if let Some(log) = final_log(&cluster, wall, reader, &conv) {
            history.final_logs.insert(conv, log);
        }
    }
    history.moves = cluster.store.moves();
    // Where each user started reading `all` (its account's start, in the final log's terms).
    if let Some(log) = history.final_logs.get(&ConvId::All) {
        for &user in &users {
            if let Some(Ok(StoreReply::Account(Some(account)))) = ready(
                cluster
                    .store
                    .execute(wall, StoreCommand::LoadAccount { user }),
            ) {
                let carried = history
                    .moves
                    .iter()
                    .rev()
                    .find(|m| m.conv == ConvId::All && m.to == log.log_epoch)
                    .map_or((LogEpoch(0), 0), |m| (m.from, m.carried_up_to));
                let floor = account.all_from.floor_in(log.log_epoch, carried);
                if floor > 0 {
                    membership.all_from.insert(user, floor);
                    rec.count("users owed all only after their registration");
                }
            }
        }
    }
    history.membership = membership;
    let (death, isolation) = rehome_bounds(&plan.spec);
    history.bounds = Bounds {
        healed_at: plan.healed_at,
        end: plan.end,
        rehome_after_death: death,
        rehome_after_isolation: isolation,
    };
    history.acked_after_replication = plan.spec.store_wait_replicas > 0;
    if let Some(outage) = plan.shard_outage {
        let shards = cim_core::slots::Shards::new(plan.spec.store_shards.max(1), 0);
        let on_failed = |conv: &ConvId| shards.of_conv(conv) == outage.shard;
        // Users who also post to the failed master's conversations: their stuck messages'
        // resends share the user's send limit with its other messages, so they are not
        // promised invariant 11.
        let posting_there: BTreeSet<UserId> = plan
            .clients
            .iter()
            .filter(|c| {
                c.group
                    .as_deref()
                    .and_then(|g| ConvId::group(g).ok())
                    .is_some_and(|conv| on_failed(&conv))
            })
            .filter_map(|c| history.clients.iter().find(|h| h.client == c.client))
            .map(|h| h.user)
            .collect();
        let healthy_users: BTreeSet<UserId> = users
            .iter()
            .copied()
            .filter(|u| shards.of_user(*u) != outage.shard && !posting_there.contains(u))
            .collect();
        let mut convs = vec![ConvId::All];
        convs.extend(groups.iter().filter_map(|g| ConvId::group(g).ok()));
        let healthy_convs: BTreeSet<ConvId> = convs.into_iter().filter(|c| !on_failed(c)).collect();
        // How long the healthy chat's acks took (to see the bound's margin in a sweep).
        let acked: BTreeMap<_, _> = history
            .acks
            .iter()
            .map(|a| ((a.sender, a.msg_id), a.acked_at))
            .collect();
        let slowest = history
            .submissions
            .iter()
            .filter(|s| {
                (outage.from..=outage.until).contains(&s.at)
                    && healthy_users.contains(&s.sender)
                    && healthy_convs.contains(&s.conv)
            })
            .filter_map(|s| Some(*acked.get(&(s.sender, s.msg_id))? - s.at))
            .max();
        if let Some(slowest) = slowest {
            rec.count_n(
                "slowest healthy-shard ack during the outage, ms (sum)",
                slowest.as_millis() as u64,
            );
        }
        rec.count_n(
            "healthy users during a shard outage",
            healthy_users.len() as u64,
        );
        history.shard_outage = Some(checker::ShardOutage {
            from: outage.from,
            until: outage.until,
            healthy_users,
            healthy_convs,
            ack_bound: outage.ack_bound,
        });
    }
    let report = checker::check(&history);
    // A debugging aid: what the report leaves out (sessions, faults, every client event
    // but messages).
    if std::env::var_os("CIM_SIM_DUMP").is_some() {
        eprintln!("sessions: {:#?}", history.sessions);
        eprintln!("faults: {:?}", history.faults);
        for c in &history.clients {
            for (at, seen) in &c.events {
                if !matches!(seen, checker::Seen::Message(_)) {
                    eprintln!("{} at {at:?}: {seen:?}", c.client);
                }
            }
        }
    }
    if plan.spec.send_rate == crate::cluster::TIGHT_SEND_RATE {
        rec.count("runs with a tight send rate");
    }
    if plan.spec.store.max_log_len == crate::cluster::SHORT_LOG {
        rec.count("runs with a short log");
    }
    let finished = Finished {
        rec: rec.clone(),
        dir: shared.dir.clone(),
        end: plan.end,
    };
    extra_check(&finished, &mut problems);
    crate::record::add_counters(&mut counters, &rec.counters());
    if let Some(max) = report.stats.max_rehome {
        counters.insert("max re-home ms", max.as_millis() as u64);
    }
    ScenarioOutcome {
        scenario,
        run,
        trace_hash: trace_hash(&history),
        report,
        problems,
        counters,
        sim_time,
        faults: fault_plan,
    }
}

/// The kinds of fault a random fault plan draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// A server dies, and restarts at the heal.
    ServerCrash,
    /// A server dies and comes straight back.
    ServerBounce,
    /// A server is cut from every other host.
    ServerIsolated,
    /// A server is cut from the clients only.
    ServerCutFromClients,
    /// A server and a route cannot talk (pushes and sends on that link are lost).
    ServerRoutePartition,
    /// One direction of a server–route link drops everything.
    ServerRouteOneWay,
    /// A server–route link stalls, then delivers everything at the heal.
    ServerRouteHold,
    /// A server–route link gets slow.
    ServerRouteLatency,
    /// A server cannot reach the store (it fences itself after the grace).
    ServerStorePartition,
    /// A server cannot reach the registry (its session expires).
    ServerRegistryPartition,
    /// A route cannot reach the store.
    RouteStorePartition,
    /// A route dies, and restarts at the heal.
    RouteCrash,
    /// The store dies (keeping its data), and restarts at the heal.
    StoreCrash,
}

impl FaultKind {
    pub const ALL: [FaultKind; 13] = [
        FaultKind::ServerCrash,
        FaultKind::ServerBounce,
        FaultKind::ServerIsolated,
        FaultKind::ServerCutFromClients,
        FaultKind::ServerRoutePartition,
        FaultKind::ServerRouteOneWay,
        FaultKind::ServerRouteHold,
        FaultKind::ServerRouteLatency,
        FaultKind::ServerStorePartition,
        FaultKind::ServerRegistryPartition,
        FaultKind::RouteStorePartition,
        FaultKind::RouteCrash,
        FaultKind::StoreCrash,
    ];
}

/// A store restart that loses nothing, at an instant in `[fault_at, fault_at + 3 s]`.
pub fn lossless_restart_fault(
    rng: &mut Rng,
    fault_at: Duration,
    healed_at: Duration,
) -> Vec<(Duration, Action)> {
    let at = fault_at + rng.duration(Duration::ZERO, Duration::from_secs(3));
    vec![(at.min(healed_at), Action::StoreRestartWithoutLoss)]
}

/// The lost-tail fault: a copy of the store's data at some instant in
/// `[fault_at, fault_at + 3 s]`, and 0.3–2 s later (the writes in between are the tail, which
/// clients read meanwhile) a restart from that copy; the store is back at `healed_at`.
pub fn lost_tail_fault(
    rng: &mut Rng,
    fault_at: Duration,
    healed_at: Duration,
) -> Vec<(Duration, Action)> {
    let copy_at = fault_at + rng.duration(Duration::ZERO, Duration::from_secs(3));
    let lost_at = copy_at + rng.duration(Duration::from_millis(300), Duration::from_secs(2));
    vec![
        (copy_at.min(healed_at), Action::CopyStore),
        (lost_at.min(healed_at), Action::StoreLostTail),
        (healed_at, Action::RestartCrashed),
    ]
}

/// One master's failover (docs/design.md, "Acknowledge after replication and one shard's
/// failure"): lossless (a replica promoted with every write), or its replica starts lagging
/// at an instant in `[fault_at, fault_at + 3 s]` and 0.3–2 s later the master fails (the
/// writes in between are the tail, which clients read meanwhile, and which `WAIT` refuses
/// to acknowledge). Either way the master is down until its replica is promoted 8–12 s later
/// (a cluster's node timeout and election). Returns the actions and the outage.
pub fn shard_failover_fault(
    rng: &mut Rng,
    shard: usize,
    lossless: bool,
    fault_at: Duration,
    healed_at: Duration,
) -> (Vec<(Duration, Action)>, (Duration, Duration)) {
    let lag_at = (fault_at + rng.duration(Duration::ZERO, Duration::from_secs(3))).min(healed_at);
    let mut actions = Vec::new();
    let fail_at = if lossless {
        lag_at
    } else {
        actions.push((lag_at, Action::ShardReplicaLags(shard)));
        lag_at + rng.duration(Duration::from_millis(300), Duration::from_secs(2))
    }
    .min(healed_at);
    let promoted_at =
        (fail_at + rng.duration(Duration::from_secs(8), Duration::from_secs(12))).min(healed_at);
    actions.push((fail_at, Action::ShardFailover { shard, lossless }));
    actions.push((promoted_at, Action::ShardPromoted(shard)));
    (actions, (fail_at, promoted_at))
}

/// `count` faults drawn from `kinds`, each starting in `[fault_at, fault_at + 4 s]` and all
/// over at `healed_at` (restarts and a heal of everything).
pub fn random_faults(
    rng: &mut Rng,
    spec: &ClusterSpec,
    kinds: &[FaultKind],
    count: usize,
    fault_at: Duration,
    healed_at: Duration,
) -> Vec<(Duration, Action)> {
    let mut actions = Vec::new();
    // turmoil does not support a hold and a one-way partition on one link.
    let mut holds = false;
    let mut one_way = false;
    for _ in 0..count {
        let at = fault_at + rng.duration(Duration::ZERO, Duration::from_secs(4));
        let at = at.min(healed_at);
        let server = Target::Server(rng.between(0, spec.servers as u64 - 1) as usize);
        let route = rng.between(0, spec.routes as u64 - 1) as usize;
        let mut kind = rng.pick(kinds);
        if (kind == FaultKind::ServerRouteHold && one_way)
            || (kind == FaultKind::ServerRouteOneWay && holds)
        {
            kind = FaultKind::ServerRoutePartition;
        }
        let action = match kind {
            FaultKind::ServerCrash => Action::Crash(server),
            FaultKind::ServerBounce => {
                actions.push((at, Action::Crash(server)));
                Action::RestartCrashed
            }
            FaultKind::ServerIsolated => Action::Isolate {
                target: server,
                clients_only: false,
            },
            FaultKind::ServerCutFromClients => Action::Isolate {
                target: server,
                clients_only: true,
            },
            FaultKind::ServerRoutePartition => Action::Partition {
                a: Node::Server(server),
                b: Node::Route(route),
                one_way: false,
            },
            FaultKind::ServerRouteOneWay => {
                one_way = true;
                let (a, b) = if rng.between(0, 1) == 0 {
                    (Node::Server(server), Node::Route(route))
                } else {
                    (Node::Route(route), Node::Server(server))
                };
                Action::Partition {
                    a,
                    b,
                    one_way: true,
                }
            }
            FaultKind::ServerRouteHold => {
                holds = true;
                Action::Hold {
                    a: Node::Server(server),
                    b: Node::Route(route),
                }
            }
            FaultKind::ServerRouteLatency => Action::Latency {
                a: Node::Server(server),
                b: Node::Route(route),
                latency: rng.duration(Duration::from_millis(200), Duration::from_millis(800)),
            },
            FaultKind::ServerStorePartition => Action::Partition {
                a: Node::Server(server),
                b: Node::Store,
                one_way: false,
            },
            FaultKind::ServerRegistryPartition => Action::Partition {
                a: Node::Server(server),
                b: Node::Registry,
                one_way: false,
            },
            FaultKind::RouteStorePartition => Action::Partition {
                a: Node::Route(route),
                b: Node::Store,
                one_way: false,
            },
            FaultKind::RouteCrash => Action::CrashRoute(route),
            FaultKind::StoreCrash => Action::CrashStore,
        };
        actions.push((at, action));
    }
    actions.push((healed_at, Action::RestartCrashed));
    actions.push((healed_at, Action::HealAll));
    actions
}
