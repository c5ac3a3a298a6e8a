//! Builds a turmoil simulation of one CIM cluster: a store host, a registry host, servers,
//! routes, and the SDK clients a scenario adds.
//!
//! | host | what runs there | reached as |
//! |---|---|---|
//! | `store` | [`serve_store_with_replica`] over the shared [`MemoryBackend`] | `store:6379` |
//! | `store-<k>` | instead of `store` when [`ClusterSpec::store_shards`] is set: one host per master of a Redis Cluster, each serving the one backend (which keeps every master's keys, `MemoryStoreConfig::shards`), reached through a [`ShardedStore`] | `store-<k>:6379` |
//! | `registry` | [`serve_registry`] over the shared [`RegistryHost`] (ZooKeeper sessions) | `registry:2181` |
//! | `server-<i>` | `cim_io::server` with a [`RemoteStore`] and a [`RemoteRegistry`] | client 11211, link 11311, http 8081 |
//! | `route-<i>` | `cim_io::route` with the same backends | HTTP 8083 |
//! | clients | whatever the scenario runs ([`Cluster::add_client`]) | — |
//!
//! The store's and registry's state live outside their host closures, so `sim.bounce("store")`
//! or `sim.bounce("registry")` keeps the data (Redis with its data on disk, a ZooKeeper member
//! restarting); [`Cluster::lossy_restart_store`] is the store losing everything. A master of
//! a sharded store fails over alone: its host goes down and its keys come back from an older
//! copy in a new incarnation (`MemoryBackend::restart_shard_from`; the scenarios' shard
//! faults), while the other masters serve on. Servers and
//! routes keep nothing across a bounce (their state is in the store and the registry).
//!
//! Determinism: one seed drives turmoil's RNG and every seed inside (routes, store, clients,
//! each host's link-handshake nonces); every host's wall clock is `origin` plus the simulated
//! time (never the host OS clock). Everything else that shapes a run (the balancer, a canary)
//! is a field of the [`ClusterSpec`], handed to each node's options: no process-wide state.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cim_core::accounts::PasswordParams;
use cim_core::canary::Canaries;
use cim_core::client::ClientConfig;
use cim_core::ids::{ServerId, UnixMillis, UserId};
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::balance::Strategy;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_io::clock::Clock;
use cim_io::nonces::NonceSource;

use cim_io::route::{self, PasswordRunner, RouteOptions};
use cim_io::sdk::SdkOptions;
use cim_io::server::{self, ServerOptions, SessionObserver};
use cim_io::store::{MemoryBackend, Store};
use cim_sim_hosts::ShardedStore;
use cim_sim_hosts::TurmoilNet;
use cim_sim_hosts::registry::{
    RegistryHost, RegistryHostConfig, RemoteRegistry, RemoteRegistryOptions, serve_registry,
};
use cim_sim_hosts::store::{RemoteOptions, RemoteStore, Replica, serve_store_with_replica};

pub const STORE_HOST: &str = "store";
pub const STORE_PORT: u16 = 6379;
pub const REGISTRY_HOST: &str = "registry";
pub const REGISTRY_PORT: u16 = 2181;
pub const ROUTE_HTTP_PORT: u16 = 8083;

/// How long a supervisor waits before starting a server or route that failed to start.
const RESTART_DELAY: Duration = Duration::from_secs(1);

/// Starts a process, and again after [`RESTART_DELAY`] each time it fails to (the registry
/// unreachable, say): what its supervisor does (systemd's `Restart=on-failure` in deploy/).
async fn start_supervised<H, E, F>(what: &str, mut start: impl FnMut() -> F) -> H
where
    E: std::fmt::Display,
    F: Future<Output = Result<H, E>>,
{
    loop {
        match start().await {
            Ok(handle) => return handle,
            Err(error) => {
                tracing::info!(%error, "{what} did not start; restarting in 1 s");
                tokio::time::sleep(RESTART_DELAY).await;
            }
        }
    }
}

const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
const TICKET_SECRET: &[u8] = b"sim-ticket-secret";
const BEARER_SECRET: &[u8] = b"sim-bearer-secret";
const LINK_SECRET: &[u8] = b"sim-link-secret!";

/// The shape of a simulated cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Drives turmoil and every seed derived for the nodes.
    pub seed: u64,
    pub servers: usize,
    pub routes: usize,
    /// The registry host's session timeout (ZooKeeper's).
    pub session_timeout: Duration,
    /// Every store request's deadline, in servers and routes.
    pub store_request_timeout: Duration,
    /// The store's configuration (its seed is replaced by one derived from `seed`).
    pub store: MemoryStoreConfig,
    /// How long the simulation may run (turmoil fails the run past it).
    pub duration: Duration,
    /// Wall-clock time at the start of the simulation.
    pub origin: UnixMillis,
    /// turmoil's step: every host runs this much simulated time per step (1 ms by default;
    /// coarser steps run faster and blur ordering within a step).
    pub tick: Duration,
    /// How routes pick a server (`None`: the routes' default, consistent hashing).
    /// Consistent hashing sends one user's racing logins to one server, which serializes
    /// them; other strategies spread them, exercising the claim table's fences.
    pub strategy: Option<Strategy>,
    /// The safety mechanism this run switches off (canary builds only), in the store's
    /// claim table and logs, the servers and the clients alike.
    pub canaries: Canaries,
    /// The servers' per-user send limit: (tokens a second, burst). Half the seeds run with
    /// [`TIGHT_SEND_RATE`], which the chat bursts exceed: rate-limit nacks and resends
    /// then race later messages of the same sender, the per-sender order's hardest case.
    pub send_rate: (u32, u32),
    /// The store as a Redis Cluster of this many masters (`store-1`..), each its own host
    /// reached through a [`ShardedStore`]; 0: one store host (`store`), as one Redis.
    pub store_shards: usize,
    /// Replicas that must confirm an append before it is acknowledged (`WAIT`, the
    /// `--store-wait-replicas` analogue; see `cim_sim_hosts::store::Replica`); 0: none.
    pub store_wait_replicas: u32,
}

/// The tight send limit some seeds run with (see [`ClusterSpec::send_rate`]).
pub const TIGHT_SEND_RATE: (u32, u32) = (4, 3);

/// The log length a third of the seeds run with: a run's chat overflows it, so a client
/// that was away must be told "N unavailable" (README: each conversation keeps its last
/// `--max-log-len` messages) rather than wait for trimmed seqs.
pub const SHORT_LOG: usize = 25;

impl ClusterSpec {
    pub fn new(seed: u64, servers: usize, routes: usize) -> Self {
        let mut spec = Self {
            seed,
            servers,
            routes,
            session_timeout: Duration::from_secs(6),
            store_request_timeout: Duration::from_secs(2),
            store: MemoryStoreConfig::default(),
            duration: Duration::from_secs(600),
            origin: UnixMillis(1_800_000_000_000),
            tick: Duration::from_millis(1),
            strategy: None,
            canaries: Canaries::NONE,
            send_rate: (0, 0),
            store_shards: 0,
            store_wait_replicas: 0,
        };
        let defaults = ServerConfig::new(ServerId::new("-"), TicketKeys::new(1, TICKET_SECRET));
        spec.send_rate = if spec.derive_seed("send rate", 0).is_multiple_of(2) {
            TIGHT_SEND_RATE
        } else {
            (defaults.send_rate_per_sec, defaults.send_burst)
        };
        if spec.derive_seed("log length", 0).is_multiple_of(3) {
            spec.store.max_log_len = SHORT_LOG;
        }
        spec
    }

    /// A child seed for one purpose, so adding a node does not shift the others' seeds.
    /// The store's hosts: `store`, or one per master (`store-1`..).
    pub fn store_hosts(&self) -> Vec<String> {
        if self.store_shards == 0 {
            vec![STORE_HOST.to_owned()]
        } else {
            (1..=self.store_shards)
                .map(|k| format!("{STORE_HOST}-{k}"))
                .collect()
        }
    }

    pub fn derive_seed(&self, purpose: &str, index: usize) -> u64 {
        // FNV-1a: stable across runs and platforms (unlike `DefaultHasher`).
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ self.seed;
        for b in purpose.bytes().chain((index as u64).to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }
}

/// Makes the session observer of one server (called at every start of its host, so a
/// bounced server keeps reporting).
pub type ObserverFactory = Arc<dyn Fn(&ServerId) -> SessionObserver + Send + Sync>;

/// Optional instrumentation of a cluster, for the recorder.
#[derive(Clone, Default)]
pub struct Hooks {
    /// Gives each server a [`SessionObserver`] (`ServerOptions::observer`).
    pub server_observer: Option<ObserverFactory>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("server_observer", &self.server_observer.is_some())
            .finish()
    }
}

/// What a client host needs to talk to the cluster.
#[derive(Debug, Clone)]
pub struct ClientEnv {
    pub routes: Vec<String>,
    pub route_port: u16,
    pub origin: UnixMillis,
    pub seed: u64,
    /// The run's canaries, for the client's own switches (dedup, gap sync).
    pub canaries: Canaries,
}

impl ClientEnv {
    /// The host's clock: see [`sim_clock`].
    pub fn clock(&self) -> Clock {
        sim_clock(self.origin)
    }

    /// SDK options for `user` through route `route` (modulo the number of routes).
    pub fn sdk_options(
        &self,
        user: UserId,
        name: &str,
        password: &str,
        route: usize,
    ) -> SdkOptions {
        let route_host = self.routes[route % self.routes.len()].clone();
        let mut session = ClientConfig::new(user, name, password, self.seed);
        session.canaries = self.canaries;
        let mut options = SdkOptions::new(route_host, self.route_port, session);
        // Seeded from the run's seed, so that a seed replays the same message ids.
        options.entropy = None;
        options
    }
}

/// A simulated cluster: the turmoil `Sim` with every infrastructure host added, and handles
/// on the state that outlives bounces.
pub struct Cluster {
    pub sim: turmoil::Sim<'static>,
    pub spec: ClusterSpec,
    /// The store's data (every master's keys); survives a bounce of a store host.
    pub store: Arc<MemoryBackend>,
    /// The store's hosts ([`ClusterSpec::store_hosts`]), in slot order.
    pub store_hosts: Vec<String>,
    /// Each store host's replica, as `WAIT` sees it (same order as `store_hosts`).
    pub replicas: Vec<Arc<Replica>>,
    /// The registry host's sessions and entries; survive `sim.bounce(REGISTRY_HOST)`.
    pub registry: Arc<RegistryHost>,
    pub server_hosts: Vec<String>,
    pub route_hosts: Vec<String>,
    lossy_restarts: u64,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("spec", &self.spec)
            .field("server_hosts", &self.server_hosts)
            .field("route_hosts", &self.route_hosts)
            .finish_non_exhaustive()
    }
}

/// A host's clock: wall time is `origin` plus the *simulation's* elapsed time, so a host
/// restarted by a bounce does not jump back to `origin`.
pub fn sim_clock(origin: UnixMillis) -> Clock {
    let elapsed = turmoil::sim_elapsed().unwrap_or_default();
    Clock::simulated(UnixMillis(origin.0 + elapsed.as_millis() as u64))
}

fn remote_store(spec: &ClusterSpec) -> Arc<dyn Store> {
    let options = RemoteOptions {
        request_timeout: spec.store_request_timeout,
        connect_timeout: Duration::from_secs(1),
        wait_replicas: spec.store_wait_replicas,
        canaries: spec.canaries,
    };
    if spec.store_shards == 0 {
        Arc::new(RemoteStore::new(
            TurmoilNet, STORE_HOST, STORE_PORT, options,
        ))
    } else {
        Arc::new(ShardedStore::new(
            TurmoilNet,
            &spec.store_hosts(),
            STORE_PORT,
            options,
        ))
    }
}

fn remote_registry() -> RemoteRegistry<TurmoilNet> {
    RemoteRegistry::new(
        TurmoilNet,
        REGISTRY_HOST,
        REGISTRY_PORT,
        RemoteRegistryOptions::default(),
    )
}

impl Cluster {
    /// Builds the simulation with the store host, the registry host, `spec.servers` servers
    /// (`server-0`..) and `spec.routes` routes (`route-0`..), each a turmoil host running the
    /// real shell over [`TurmoilNet`] with a [`RemoteStore`] and a [`RemoteRegistry`]. Add
    /// clients with [`add_client`](Self::add_client), then drive `sim` (`run`, or `step` with
    /// faults in between).
    pub fn build(spec: ClusterSpec) -> Cluster {
        Self::build_with(spec, Hooks::default())
    }

    /// [`build`](Self::build), with instrumentation.
    pub fn build_with(spec: ClusterSpec, hooks: Hooks) -> Cluster {
        let mut sim = turmoil::Builder::new()
            .simulation_duration(spec.duration)
            .rng_seed(spec.seed)
            .tick_duration(spec.tick)
            .build();
        let store = Arc::new(MemoryBackend::new(MemoryStoreConfig {
            seed: spec.derive_seed("store", 0),
            canaries: spec.canaries,
            shards: spec.store_shards.max(1),
            ..spec.store.clone()
        }));
        let registry = Arc::new(RegistryHost::new(RegistryHostConfig {
            session_timeout: spec.session_timeout,
        }));
        let store_hosts = spec.store_hosts();
        let mut replicas = Vec::new();
        for host in &store_hosts {
            let (store, replica) = (store.clone(), Arc::new(Replica::default()));
            replicas.push(replica.clone());
            sim.host(host.as_str(), move || {
                let (store, replica) = (store.clone(), replica.clone());
                async move {
                    let listen = SocketAddr::new(ANY, STORE_PORT);
                    serve_store_with_replica(TurmoilNet, listen, store, replica).await?;
                    Ok(())
                }
            });
        }
        {
            let registry = registry.clone();
            sim.host(REGISTRY_HOST, move || {
                let registry = registry.clone();
                async move {
                    let listen = SocketAddr::new(ANY, REGISTRY_PORT);
                    serve_registry(TurmoilNet, listen, registry).await?;
                    Ok(())
                }
            });
        }
        let mut server_hosts = Vec::new();
        for i in 0..spec.servers {
            let name = format!("server-{i}");
            let spec2 = spec.clone();
            let host = name.clone();
            let observer = hooks.server_observer.clone();
            // Outside the host closure: a restarted server continues its stream rather than
            // repeating its nonces.
            let nonces = NonceSource::seeded(spec.derive_seed("server link nonces", i));
            sim.host(name.as_str(), move || {
                let (spec, host) = (spec2.clone(), host.clone());
                let (observer, nonces) = (observer.clone(), nonces.clone());
                async move {
                    let keys = TicketKeys::new(1, TICKET_SECRET);
                    let id = ServerId::new(host.clone());
                    let mut node = ServerConfig::new(id.clone(), keys);
                    (node.send_rate_per_sec, node.send_burst) = spec.send_rate;
                    node.canaries = spec.canaries;
                    let mut options = ServerOptions::new(node, LINK_SECRET.to_vec());
                    options.link_nonces = nonces;
                    options.listen_ip = ANY;
                    options.advertise_host = host;
                    options.observer = observer.map(|make| make(&id));
                    let mut handle = start_supervised("server", || {
                        let (spec, options) = (&spec, &options);
                        async move {
                            server::start(
                                TurmoilNet,
                                sim_clock(spec.origin),
                                options.clone(),
                                remote_store(spec),
                                &remote_registry(),
                            )
                            .await
                        }
                    })
                    .await;
                    handle.stopped().await?;
                    Ok(())
                }
            });
            server_hosts.push(name);
        }
        let mut route_hosts = Vec::new();
        for i in 0..spec.routes {
            let name = format!("route-{i}");
            let spec2 = spec.clone();
            let host = name.clone();
            let nonces = NonceSource::seeded(spec.derive_seed("route link nonces", i));
            sim.host(name.as_str(), move || {
                let (spec, host, nonces) = (spec2.clone(), host.clone(), nonces.clone());
                async move {
                    let mut options = RouteOptions::new(
                        host,
                        TicketKeys::new(1, TICKET_SECRET),
                        BEARER_SECRET.to_vec(),
                        LINK_SECRET.to_vec(),
                    );
                    options.http_listen = SocketAddr::new(ANY, ROUTE_HTTP_PORT);
                    options.seed = spec.derive_seed("route", i);
                    if let Some(strategy) = spec.strategy {
                        options.strategy = strategy;
                    }
                    options.link_nonces = nonces;
                    // The simulation judges logins, not hashing: OWASP's argon2 costs tens of
                    // milliseconds of real CPU per login and dominated a run's wall time.
                    options.login.password = PasswordParams::for_tests();
                    // No thread outside turmoil's control may finish a password job.
                    options.password_runner = PasswordRunner::Inline;
                    let mut handle = start_supervised("route", || {
                        let (spec, options) = (&spec, &options);
                        async move {
                            route::start(
                                TurmoilNet,
                                sim_clock(spec.origin),
                                options.clone(),
                                remote_store(spec),
                                &remote_registry(),
                            )
                            .await
                        }
                    })
                    .await;
                    handle.stopped().await?;
                    Ok(())
                }
            });
            route_hosts.push(name);
        }
        Cluster {
            sim,
            spec,
            store,
            store_hosts,
            replicas,
            registry,
            server_hosts,
            route_hosts,
            lossy_restarts: 0,
        }
    }

    /// Adds a client host running `workload`. Its env names the routes and carries a seed
    /// derived from the cluster's seed and the client's name.
    pub fn add_client<F, Fut>(&mut self, name: &str, workload: F)
    where
        F: FnOnce(ClientEnv) -> Fut,
        Fut: Future<Output = turmoil::Result> + 'static,
    {
        let env = ClientEnv {
            routes: self.route_hosts.clone(),
            route_port: ROUTE_HTTP_PORT,
            origin: self.spec.origin,
            seed: self.spec.derive_seed(&format!("client:{name}"), 0),
            canaries: self.spec.canaries,
        };
        self.sim.client(name, workload(env));
    }

    /// The "lossy restart" fault: the store loses everything (new log epochs from a fresh
    /// derived seed) and its host restarts, cutting every connection.
    pub fn lossy_restart_store(&mut self) {
        self.lossy_restarts += 1;
        let seed = self.spec.derive_seed("store", self.lossy_restarts as usize);
        self.store.reset(MemoryStoreConfig {
            seed,
            canaries: self.spec.canaries,
            shards: self.spec.store_shards.max(1),
            ..self.spec.store.clone()
        });
        for host in &self.store_hosts {
            self.sim.bounce(host.as_str());
        }
    }
}
