//! The scenarios: each builds a cluster, runs a seeded workload and fault plan over it,
//! records the run and checks it. [`Scenario::run`] is one seed.
//!
//! Shared pieces: [`Plan`] (what a run does, decided from the seed before it starts),
//! [`chat_client`] (an SDK client that registers, joins a group, chats and records what its
//! application sees), and [`drive`] (steps the simulation, applying the fault plan, then
//! reads the final logs and calls the checker).

pub mod duplicate_login;
pub mod failover;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use cim_core::client::ClientConfig;
use cim_core::ids::{ConvId, LogEpoch, ServerId, UnixMillis, UserId};
use cim_core::store::{StoreCommand, StoreReply};
use cim_io::net::TurmoilNet;
use cim_io::sdk::{Client, RouteApi};
use cim_io::store::Store;

use crate::checker::{self, Bounds, ClientId, Fault, FinalLog, Host, Membership, Report};
use crate::cluster::{ClientEnv, Cluster, ClusterSpec, Hooks, REGISTRY_HOST, STORE_HOST};
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
}

impl Scenario {
    pub const ALL: [Scenario; 2] = [Scenario::Failover, Scenario::DuplicateLogin];

    pub fn name(self) -> &'static str {
        match self {
            Self::Failover => "failover",
            Self::DuplicateLogin => "duplicate-login",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.name() == name)
    }

    /// One run of this scenario with `seed`.
    pub fn run(self, seed: u64) -> ScenarioOutcome {
        match self {
            Self::Failover => failover::run(seed),
            Self::DuplicateLogin => duplicate_login::run(seed),
        }
    }

    /// How to replay one seed from a shell.
    pub fn replay_command(self, seed: u64) -> String {
        format!(
            "SIM_SEED={seed} cargo run -p cim-sim --release -- --scenario {}",
            self.name()
        )
    }
}

/// What one run found.
#[derive(Debug, Clone)]
pub struct ScenarioOutcome {
    pub scenario: Scenario,
    pub seed: u64,
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
}

impl ScenarioOutcome {
    pub fn is_clean(&self) -> bool {
        self.report.is_clean() && self.problems.is_empty()
    }

    pub fn violations(&self) -> usize {
        self.report.violations.len() + self.problems.len()
    }
}

impl fmt::Display for ScenarioOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} SIM_SEED={} trace {:016x}, {} simulated: {}",
            self.scenario.name(),
            self.seed,
            self.trace_hash,
            secs(self.sim_time),
            self.report
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        if !self.is_clean() {
            write!(f, "replay: {}", self.scenario.replay_command(self.seed))?;
        }
        Ok(())
    }
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

/// A fault action of the plan.
#[derive(Debug, Clone)]
pub enum Action {
    /// The process dies (turmoil crash).
    Crash(Target),
    /// Every crashed server starts again (turmoil bounce).
    RestartCrashed,
    /// Partitions the server from every other host, or from the clients only.
    Isolate { target: Target, clients_only: bool },
    /// Repairs every partition.
    HealAll,
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
    let pump = {
        let rec = rec.clone();
        async move {
            while let Some(event) = events.next().await {
                rec.client_event(id, user, sim_now(), &event);
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
                tokio::time::sleep(
                    rng.duration(Duration::from_millis(300), Duration::from_millis(1500)),
                )
                .await;
                if sim_now() >= until {
                    break;
                }
                n += 1;
                let conv = convs[(rng.next_u64() % convs.len() as u64) as usize].clone();
                let body = Bytes::from(format!("{}#{} {n}", plan.name, plan.client.0));
                let _ = client.submit(conv, body).await;
            }
        }
        sleep_until_sim(end).await;
    };
    tokio::select! {
        _ = pump => {}
        _ = work => {}
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
    let seed = plan.spec.seed;
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
    let mut others: Vec<String> = vec![STORE_HOST.to_owned(), REGISTRY_HOST.to_owned()];
    others.extend(cluster.route_hosts.iter().cloned());
    let mut problems = Vec::new();
    let mut actions = plan.actions.clone();
    actions.sort_by_key(|(at, _)| *at);
    let mut actions = actions.into_iter().peekable();
    let mut crashed: Vec<String> = Vec::new();
    let mut partitioned: Vec<(String, String)> = Vec::new();
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
            let resolve = |t: &Target| -> usize {
                match t {
                    Target::Server(i) => *i % cluster.server_hosts.len(),
                    Target::HolderOf(name) => lookup(&shared.dir, name)
                        .and_then(|u| rec.open_session_of(u))
                        .and_then(|s| cluster.server_hosts.iter().position(|h| h == s.as_str()))
                        .unwrap_or(0),
                }
            };
            match action {
                Action::Crash(t) => {
                    let host = cluster.server_hosts[resolve(&t)].clone();
                    cluster.sim.crash(host.as_str());
                    rec.server_died(&ServerId::new(host.clone()), now);
                    *counters.entry("server crashed").or_default() += 1;
                    crashed.push(host);
                }
                Action::RestartCrashed => {
                    for host in crashed.drain(..) {
                        cluster.sim.bounce(host.as_str());
                        *counters.entry("server restarted").or_default() += 1;
                    }
                }
                Action::Isolate {
                    target,
                    clients_only,
                } => {
                    let host = cluster.server_hosts[resolve(&target)].clone();
                    let mut peers = client_hosts.clone();
                    if !clients_only {
                        peers.extend(others.iter().cloned());
                        peers.extend(cluster.server_hosts.iter().filter(|h| **h != host).cloned());
                    }
                    for peer in peers {
                        cluster.sim.partition(host.as_str(), peer.as_str());
                        partitioned.push((host.clone(), peer));
                    }
                    rec.fault(now, Fault::Isolated(Host::Server(ServerId::new(host))));
                    *counters
                        .entry(if clients_only {
                            "server cut from clients"
                        } else {
                            "server isolated"
                        })
                        .or_default() += 1;
                }
                Action::HealAll => {
                    for (a, b) in partitioned.drain(..) {
                        cluster.sim.repair(a.as_str(), b.as_str());
                    }
                    rec.fault(now, Fault::HealAll);
                }
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
    history.membership = membership;
    let (death, isolation) = rehome_bounds(&plan.spec);
    history.bounds = Bounds {
        healed_at: plan.healed_at,
        end: plan.end,
        rehome_after_death: death,
        rehome_after_isolation: isolation,
    };
    let report = checker::check(&history);
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
        seed,
        trace_hash: trace_hash(&history),
        report,
        problems,
        counters,
        sim_time,
    }
}
