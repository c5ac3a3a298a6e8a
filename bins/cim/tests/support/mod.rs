//! The real-deployment harness: a private `redis-server` (AOF on) and ZooKeeper, routes and
//! servers as child processes of the `cim` binary (so one can be SIGKILLed), each server
//! reaching Redis and ZooKeeper through its own fault proxies (to cut it off from either),
//! and SDK clients in this process. [`Cluster::start_on_redis_cluster`] runs the same on a
//! private Redis Cluster instead (`--redis-cluster`; no Redis proxies: the cluster client
//! learns the nodes' own addresses).

#![allow(dead_code)] // each test uses a different part

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cim_core::client::{ClientConfig, ClientEvent, ConnectionLoss, StopReason};
use cim_core::ids::{ClientMsgId, ConvId, LogEpoch, ServerId, UserId};
use cim_io::clock::Clock;
use cim_io::http_client::HttpClient;
use cim_io::net::TokioNet;
use cim_io::sdk::{Client, Events, RouteApi, SdkOptions};
use cim_proto::KickReason;
use cim_testkit::{Proxy, RedisCluster, RedisServer};
use hyper::Method;
use tokio::sync::Notify;
use tokio::time::Instant;

pub const TICKET_SECRET: &str = "test-ticket-secret-0123456789";
pub const LINK_SECRET: &str = "test-link-secret-0123456789ab";
pub const BEARER_SECRET: &str = "test-bearer-secret-0123456789";
/// Short timers, so failover and expiry happen in seconds.
pub const ZK_SESSION_TIMEOUT: &str = "2s";
pub const LEASE_TTL: &str = "6s";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a free port")
        .port()
}

/// A child process killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    fn spawn(name: &str, args: &[String]) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_cim"))
            .args(args)
            .env("CIM_TICKET_SECRET", TICKET_SECRET)
            .env("CIM_LINK_SECRET", LINK_SECRET)
            .env("CIM_BEARER_SECRET", BEARER_SECRET)
            .env(
                "RUST_LOG",
                std::env::var("CIM_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self {
            name: name.to_owned(),
            child: Some(child),
        }
    }

    /// SIGKILL: no drain, no goodbye; peers learn from timeouts and resets.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is still running, or was killed by the test.
    pub fn is_running_or_killed(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => child.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => true,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Debug)]
pub struct ServerProc {
    pub id: String,
    pub client_port: u16,
    pub link_port: u16,
    pub http_port: u16,
    /// This server's path to ZooKeeper (a standalone one; on an ensemble, servers connect
    /// to the members directly).
    pub zk_proxy: Option<Proxy>,
    /// This server's path to Redis (single-node Redis only).
    pub redis_proxy: Option<Proxy>,
    pub proc: Proc,
}

#[derive(Debug)]
pub struct RouteProc {
    pub port: u16,
    pub proc: Proc,
}

#[derive(Debug)]
pub struct Cluster {
    /// The one Redis, unless the cluster runs on [`Self::redis_cluster`].
    pub redis: Option<RedisServer>,
    pub redis_cluster: Option<RedisCluster>,
    pub zk: ZkSetup,
    pub zk_root: String,
    pub routes: Vec<RouteProc>,
    pub servers: Vec<ServerProc>,
    /// Flags every route started from now on gets besides the harness's own.
    pub route_args: Vec<String>,
}

/// Which ZooKeeper the processes use, and with what session timeout.
#[derive(Debug, Clone)]
pub struct ZkSetup {
    /// `host:port[,host:port...]`.
    pub connect: String,
    pub session_timeout: &'static str,
    /// Put a fault proxy between each server and ZooKeeper (one address only).
    pub proxied: bool,
}

impl Cluster {
    /// Two routes and two servers on a fresh Redis (AOF) and a fresh ZooKeeper root, all
    /// healthy. `None` (skip) only outside CI when Redis or ZooKeeper is not installed.
    pub async fn start(tag: &str) -> Option<Self> {
        let zk = Self::standalone_zk()?;
        let redis = RedisServer::start_with_aof()?;
        Self::start_with(tag, zk, 2, Some(redis), None, Vec::new()).await
    }

    /// The same on a Redis Cluster of its own (three masters, one replica each).
    pub async fn start_on_redis_cluster(tag: &str) -> Option<Self> {
        Self::start_on_redis_cluster_with(tag, &[]).await
    }

    /// [`Self::start_on_redis_cluster`] with `route_args` added to each route's flags.
    pub async fn start_on_redis_cluster_with(tag: &str, route_args: &[&str]) -> Option<Self> {
        let zk = Self::standalone_zk()?;
        let redis_cluster = RedisCluster::start()?;
        let route_args = route_args.iter().map(|a| a.to_string()).collect();
        Self::start_with(tag, zk, 2, None, Some(redis_cluster), route_args).await
    }

    /// `routes` routes and two servers on a fresh Redis (AOF) and the given ZooKeeper (a
    /// fresh root in it), all healthy. `None` (skip) when Redis is missing outside CI.
    pub async fn start_on(tag: &str, zk: ZkSetup, routes: usize) -> Option<Self> {
        let redis = RedisServer::start_with_aof()?;
        Self::start_with(tag, zk, routes, Some(redis), None, Vec::new()).await
    }

    /// The shared standalone ZooKeeper, each server behind a fault proxy to it.
    fn standalone_zk() -> Option<ZkSetup> {
        let zk = cim_testkit::zookeeper()?;
        Some(ZkSetup {
            connect: zk.addr.clone(),
            session_timeout: ZK_SESSION_TIMEOUT,
            proxied: true,
        })
    }

    async fn start_with(
        tag: &str,
        zk: ZkSetup,
        routes: usize,
        redis: Option<RedisServer>,
        redis_cluster: Option<RedisCluster>,
        route_args: Vec<String>,
    ) -> Option<Self> {
        let mut cluster = Self {
            redis,
            redis_cluster,
            zk,
            zk_root: cim_testkit::unique_root(tag),
            routes: Vec::new(),
            servers: Vec::new(),
            route_args,
        };
        for i in 1..=2 {
            cluster.start_server(&format!("s{i}")).await;
        }
        for _ in 0..routes {
            cluster.start_route().await;
        }
        for i in 0..routes {
            cluster.wait_healthy(cluster.routes[i].port).await;
        }
        Some(cluster)
    }

    pub async fn start_server(&mut self, id: &str) {
        let zk_proxy = match self.zk.proxied {
            true => Some(Proxy::start(&self.zk.connect).await),
            false => None,
        };
        let zk_connect = zk_proxy
            .as_ref()
            .map_or_else(|| self.zk.connect.clone(), |p| p.addr.clone());
        let (redis_flag, redis_url, redis_proxy) = match &self.redis {
            Some(redis) => {
                let proxy = Proxy::start(&format!("127.0.0.1:{}", redis.port)).await;
                let url = format!("redis://{}/", proxy.addr);
                ("--redis", url, Some(proxy))
            }
            None => ("--redis-cluster", self.redis_cluster_urls(), None),
        };
        let (client_port, link_port, http_port) = (free_port(), free_port(), free_port());
        let args: Vec<String> = [
            "server",
            "--server-id",
            id,
            "--listen-ip",
            "127.0.0.1",
            "--advertise-host",
            "127.0.0.1",
            "--client-port",
            &client_port.to_string(),
            "--link-port",
            &link_port.to_string(),
            "--http-port",
            &http_port.to_string(),
            redis_flag,
            &redis_url,
            "--zk",
            &zk_connect,
            "--zk-root",
            &self.zk_root,
            "--zk-session-timeout",
            self.zk.session_timeout,
            "--lease-ttl",
            LEASE_TTL,
            "--heartbeat-interval",
            "1s",
            "--idle-timeout",
            "5s",
            // The load test sends as fast as acks come back.
            "--send-rate",
            "100000",
            "--send-burst",
            "100000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::spawn(id, &args);
        self.wait_healthy(http_port).await;
        self.servers.push(ServerProc {
            id: id.to_owned(),
            client_port,
            link_port,
            http_port,
            zk_proxy,
            redis_proxy,
            proc,
        });
    }

    pub async fn start_route(&mut self) {
        let port = free_port();
        let id = format!("r{}", self.routes.len() + 1);
        let (redis_flag, redis_url) = match &self.redis {
            Some(redis) => ("--redis", redis.url()),
            None => ("--redis-cluster", self.redis_cluster_urls()),
        };
        let args: Vec<String> = [
            "route",
            "--route-id",
            &id,
            "--listen",
            &format!("127.0.0.1:{port}"),
            redis_flag,
            &redis_url,
            "--zk",
            &self.zk.connect,
            "--zk-root",
            &self.zk_root,
            "--zk-session-timeout",
            self.zk.session_timeout,
            "--claim-ttl",
            LEASE_TTL,
            // Every test user comes from 127.0.0.1: the per-address limits (tested in
            // cim-io's route_limits) would only throttle the test itself.
            "--login-rate-per-address",
            "0",
            "--register-rate-per-address",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(self.route_args.iter().cloned())
        .collect();
        let proc = Proc::spawn(&id, &args);
        self.routes.push(RouteProc { port, proc });
    }

    /// The single-node Redis (every test but the Redis Cluster ones runs on one).
    pub fn redis(&mut self) -> &mut RedisServer {
        self.redis.as_mut().expect("this test runs on one Redis")
    }

    /// `--redis-cluster`'s value: every node's URL.
    fn redis_cluster_urls(&self) -> String {
        self.redis_cluster
            .as_ref()
            .expect("a Redis Cluster")
            .urls()
            .join(",")
    }

    /// Polls `/health` on `port` until it answers 200 (30 s at most).
    pub async fn wait_healthy(&self, port: u16) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if health(port).await == Some(200) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "port {port} not healthy within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn api(&self, route: usize) -> RouteApi<TokioNet> {
        RouteApi::new(
            TokioNet,
            "127.0.0.1",
            self.routes[route].port,
            Duration::from_secs(5),
        )
    }

    pub fn http(&self, route: usize) -> HttpClient<TokioNet> {
        HttpClient::new(
            TokioNet,
            "127.0.0.1",
            self.routes[route].port,
            Duration::from_secs(5),
        )
    }

    /// Registers `name` through route 0 and starts an SDK client logging in through
    /// `route`, with short timers; returns once it is online.
    pub async fn user(&self, name: &str, route: usize) -> User {
        let registered = self
            .api(0)
            .register(name, PASSWORD)
            .await
            .unwrap_or_else(|e| panic!("register {name}: {e}"));
        let user = UserId(registered.user_id);
        let mut user = User {
            id: user,
            name: name.to_owned(),
            route_port: self.routes[route].port,
            server: None,
            client: None,
            events: None,
        };
        user.start(None).await;
        user
    }

    /// The registry as the routes see it.
    pub async fn registry_view(&self) -> cim_io::registry::RegistryView {
        use cim_io::registry::{Registry, ZkConfig, ZkRegistry};
        let registry = ZkRegistry::new(ZkConfig::new(&self.zk.connect).with_root(&self.zk_root))
            .expect("registry config");
        registry.watch().await.expect("watch the registry")
    }

    /// Every process the test did not kill is still running: none exits by itself.
    pub fn assert_all_running(&mut self) {
        let procs = self
            .routes
            .iter_mut()
            .map(|r| &mut r.proc)
            .chain(self.servers.iter_mut().map(|s| &mut s.proc));
        for proc in procs {
            assert!(
                proc.is_running_or_killed(),
                "{} exited by itself",
                proc.name
            );
        }
    }

    pub fn server_index(&self, id: &ServerId) -> usize {
        self.servers
            .iter()
            .position(|s| s.id == id.as_str())
            .unwrap_or_else(|| panic!("no server {id}"))
    }
}

pub const PASSWORD: &str = "test-password";

/// `/health`'s status, or `None` if nothing answers.
pub async fn health(port: u16) -> Option<u16> {
    let http = HttpClient::new(TokioNet, "127.0.0.1", port, Duration::from_secs(2));
    match http.request(Method::GET, "/health", None, None).await {
        Ok((status, _)) => Some(status.as_u16()),
        Err(_) => None,
    }
}

/// Client timers for the tests: failure noticed within about two seconds.
pub fn client_config(user: UserId, name: &str, seed: u64) -> ClientConfig {
    let mut config = ClientConfig::new(user, name, PASSWORD, seed);
    config.heartbeat_interval = Duration::from_millis(500);
    config.heartbeat_timeout = Duration::from_secs(1);
    config.backoff_base = Duration::from_millis(50);
    config.backoff_cap = Duration::from_millis(500);
    config.connect_timeout = Duration::from_secs(1);
    config.login_timeout = Duration::from_secs(2);
    config.head_check_interval = Duration::from_secs(2);
    config
}

#[derive(Debug)]
pub struct User {
    pub id: UserId,
    pub name: String,
    pub route_port: u16,
    /// Where the client went online last.
    pub server: Option<ServerId>,
    pub client: Option<Client<TokioNet>>,
    pub events: Option<Events>,
}

impl User {
    /// Starts (or restarts) the SDK client, from saved state if given, and waits until it is
    /// online.
    pub async fn start(&mut self, state: Option<cim_core::client::ClientState>) {
        let options = SdkOptions {
            route_host: "127.0.0.1".into(),
            route_port: self.route_port,
            session: client_config(self.id, &self.name, cim_io::launch::os_seed()),
            state,
            max_frame: cim_proto::codec::DEFAULT_MAX_FRAME,
            server_transport: Default::default(),
            entropy: None,
            tls: None,
        };
        let (client, mut events) = Client::start(TokioNet, Clock::System, options);
        let deadline = Duration::from_secs(20);
        let server = tokio::time::timeout(deadline, async {
            while let Some(event) = events.next().await {
                match event {
                    ClientEvent::Online { server, .. } => return server,
                    ClientEvent::LoginRejected(e) => panic!("{}: login rejected: {e}", self.name),
                    ClientEvent::Stopped(r) => panic!("{}: stopped: {r:?}", self.name),
                    _ => {}
                }
            }
            panic!("{}: events ended", self.name);
        })
        .await
        .unwrap_or_else(|_| panic!("{} not online within {deadline:?}", self.name));
        self.server = Some(server);
        self.client = Some(client);
        self.events = Some(events);
    }

    pub fn client(&self) -> &Client<TokioNet> {
        self.client.as_ref().expect("client started")
    }
}

/// Whether `view` lists the server `id`.
pub fn listed(view: &cim_io::registry::RegistryView, id: &str) -> bool {
    view.snapshot().keys().any(|s| s.as_str() == id)
}

/// Per conversation, the (seq, msg id) of every acknowledged send.
pub type AckedByConv = BTreeMap<ConvId, BTreeSet<(u64, ClientMsgId)>>;

/// Every member of each conversation has exactly its acknowledged messages, once each, in
/// seq order: `ids[i]` is recorder `i`'s user (all of them are in `all`), and each waits up
/// to `limit` for its count before the comparison.
pub async fn assert_each_member_has_exactly_the_acked(
    acked: &AckedByConv,
    ids: &[UserId],
    recorders: &[Recorder],
    limit: Duration,
) {
    let members = |conv: &ConvId| -> Vec<usize> {
        match conv {
            ConvId::Private { low, high } => (0..ids.len())
                .filter(|i| ids[*i] == *low || ids[*i] == *high)
                .collect(),
            _ => (0..ids.len()).collect(),
        }
    };
    for (conv, messages) in acked {
        let want: Vec<(u64, ClientMsgId)> = messages.iter().copied().collect();
        for m in members(conv) {
            let (count, conv2) = (want.len(), conv.clone());
            recorders[m]
                .wait_for(limit, &format!("u{m} has all of {conv}"), move |seen| {
                    seen.messages
                        .get(&conv2)
                        .is_some_and(|got| got.len() >= count)
                })
                .await;
            let seen = recorders[m].seen.lock().unwrap();
            let got: Vec<(u64, ClientMsgId)> = seen.messages[conv]
                .iter()
                .map(|(_, seq, id)| (*seq, *id))
                .collect();
            assert_eq!(got, want, "u{m} in {conv}: exactly once, in seq order");
        }
    }
}

/// What one user's application saw, recorded as it happens.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Per conversation, the (log epoch, seq, msg id) handed over, in order.
    pub messages: BTreeMap<ConvId, Vec<(LogEpoch, u64, ClientMsgId)>>,
    /// Times the client came online, and on which server, in order.
    pub online_at: Vec<Instant>,
    pub online_on: Vec<String>,
    /// Why the session stopped for good, if it did.
    pub stopped: Option<StopReason>,
    /// Whether its server ever kicked it for an unproven lease.
    pub kicked_fenced: bool,
    /// Every kick, when it came.
    pub kicks: Vec<(Instant, KickReason)>,
    /// Every failed link or login attempt, when, and why.
    pub reconnecting: Vec<(Instant, ConnectionLoss)>,
    /// Every `LogReset`: (conversation, old log epoch, new log epoch), in order.
    pub resets: Vec<(ConvId, LogEpoch, LogEpoch)>,
    /// Every `LogMoved`: (conversation, old log epoch, new log epoch, continues after,
    /// lost), in order.
    pub moves: Vec<(ConvId, LogEpoch, LogEpoch, u64, u64)>,
}

#[derive(Debug, Clone, Default)]
pub struct Recorder {
    pub seen: Arc<Mutex<Seen>>,
    changed: Arc<Notify>,
}

impl Recorder {
    /// Consumes `events` in a background task.
    pub fn spawn(events: Events) -> Self {
        let recorder = Self::default();
        let r = recorder.clone();
        let mut events = events;
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                {
                    // A test that failed holding the lock has said why; no second panic.
                    let mut seen = r.seen.lock().unwrap_or_else(|e| e.into_inner());
                    match event {
                        ClientEvent::Message(m) => seen
                            .messages
                            .entry(m.conv.clone())
                            .or_default()
                            .push((m.log_epoch, m.seq, m.msg_id)),
                        ClientEvent::Online { server, .. } => {
                            seen.online_at.push(Instant::now());
                            seen.online_on.push(server.as_str().to_owned());
                        }
                        ClientEvent::Stopped(reason) => seen.stopped = Some(reason),
                        ClientEvent::LogReset {
                            conv,
                            old_epoch,
                            new_epoch,
                        } => seen.resets.push((conv, old_epoch, new_epoch)),
                        ClientEvent::LogMoved {
                            conv,
                            old_epoch,
                            new_epoch,
                            continues_after,
                            lost,
                        } => seen
                            .moves
                            .push((conv, old_epoch, new_epoch, continues_after, lost)),
                        ClientEvent::Kicked(reason) => {
                            seen.kicked_fenced |= reason == KickReason::Fenced;
                            seen.kicks.push((Instant::now(), reason));
                        }
                        ClientEvent::Reconnecting { cause, .. } => {
                            seen.reconnecting.push((Instant::now(), cause));
                        }
                        _ => {}
                    }
                }
                r.changed.notify_waiters();
            }
        });
        recorder
    }

    /// Waits (at most `limit`) until `done` holds for what was seen.
    pub async fn wait_for(&self, limit: Duration, what: &str, done: impl Fn(&Seen) -> bool) {
        let result = tokio::time::timeout(limit, async {
            loop {
                let notified = self.changed.notified();
                if done(&self.seen.lock().unwrap()) {
                    return;
                }
                notified.await;
            }
        })
        .await;
        assert!(result.is_ok(), "not within {limit:?}: {what}");
    }
}

pub fn take_recorder(user: &mut User) -> Recorder {
    Recorder::spawn(user.events.take().expect("events not taken yet"))
}

/// Polls `condition` (every 50 ms) until it holds or `limit` passes. For conditions of other
/// processes (health, registry state) that nothing here can await.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
