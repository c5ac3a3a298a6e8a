//! One registry contract, two backends: every scenario below runs against `MemoryRegistry`
//! and against `ZkRegistry` on a real ZooKeeper this test binary starts (testkit's `zk`),
//! standalone and as a three-member ensemble (testkit's `zk_ensemble`; every process is given
//! all three members, and a partition cuts a server off from all of them).
//!
//! The same scenarios also run against `RemoteRegistry`, the simulation's registry host over
//! real sockets (servers behind a proxy the test can cut, as for ZooKeeper).
//!
//! For ZooKeeper the servers register through a TCP proxy the test can cut (a partition),
//! and the route's view talks to ZooKeeper directly, as in a deployment where only the
//! server's link is broken.

use std::sync::Arc;
use std::time::Duration;

use cim_core::ids::ServerId;
use cim_core::registry::LiveServer;
use cim_io::net::{Network, TokioNet};
use cim_io::registry::{
    AnyRegistry, MemoryRegistry, Registry, RegistryError, RegistryView, ServerMap, SessionHealth,
    ZkConfig, ZkRegistry,
};
use cim_sim_hosts::registry::{
    RegistryHost, RegistryHostConfig, RemoteRegistry, RemoteRegistryOptions, serve_registry_on,
};
use tokio::sync::watch;
use tokio::time::Instant;
use zookeeper_client as zk;

use cim_testkit::Proxy;

/// The ZooKeeper fixtures' session timeout: the ensemble (tickTime 500 ms) allows 1–10 s.
const SESSION: Duration = Duration::from_secs(2);
/// How long a view may lag a change it can see (the contract says "at once"; the margin is
/// for a loaded CI machine).
const PROMPT: Duration = Duration::from_secs(3);

enum Fixture {
    Memory(MemoryRegistry),
    Zk {
        /// Through the proxies: what servers use.
        proxied: ZkRegistry,
        /// Direct: what routes use.
        direct: ZkRegistry,
        /// One per ensemble member (one for a standalone ZooKeeper): cutting them all is a
        /// partition of the servers from the whole ensemble.
        proxies: Vec<Proxy>,
        config: ZkConfig,
    },
    /// The simulation's registry host, over real sockets, with `SESSION` as its timeout.
    Remote {
        host: Arc<RegistryHost>,
        proxied: RemoteRegistry<TokioNet>,
        direct: RemoteRegistry<TokioNet>,
        proxy: Proxy,
    },
}

impl Fixture {
    fn memory() -> Fixture {
        Fixture::Memory(MemoryRegistry::new())
    }

    /// `None`: no ZooKeeper here (outside CI), skip.
    async fn zk(tag: &str) -> Option<Fixture> {
        let server = cim_testkit::zookeeper()?;
        Some(Self::zk_on(&server.addr, tag).await)
    }

    /// The same on a three-member ensemble (shared by this binary's ensemble scenarios):
    /// every process is given all three members, as in a deployment.
    async fn zk_ensemble(tag: &str) -> Option<Fixture> {
        let ensemble = cim_testkit::zk_ensemble()?;
        Some(Self::zk_on(&ensemble.connect_string(), tag).await)
    }

    async fn zk_on(connect: &str, tag: &str) -> Fixture {
        let mut proxies = Vec::new();
        for member in connect.split(',') {
            proxies.push(Proxy::start(member).await);
        }
        let config = ZkConfig::new(connect)
            .with_root(cim_testkit::unique_root(tag))
            .with_session_timeout(SESSION)
            .with_op_timeout(Duration::from_secs(2));
        let mut through_proxy = config.clone();
        through_proxy.connect = proxies
            .iter()
            .map(|p| p.addr.as_str())
            .collect::<Vec<_>>()
            .join(",");
        Fixture::Zk {
            proxied: ZkRegistry::new(through_proxy).expect("valid config"),
            direct: ZkRegistry::new(config.clone()).expect("valid config"),
            proxies,
            config,
        }
    }

    async fn remote() -> Fixture {
        let host = Arc::new(RegistryHost::new(RegistryHostConfig {
            session_timeout: SESSION,
        }));
        let listener = TokioNet
            .bind("127.0.0.1:0".parse().expect("address"))
            .await
            .expect("bind registry host");
        let port = listener.local_addr().expect("local address").port();
        tokio::spawn(serve_registry_on(listener, host.clone()));
        let proxy = Proxy::start(&format!("127.0.0.1:{port}")).await;
        let options = RemoteRegistryOptions {
            connect_timeout: Duration::from_millis(500),
            op_timeout: Duration::from_secs(1),
        };
        let proxy_port: u16 = proxy
            .addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("proxy port");
        Fixture::Remote {
            proxied: RemoteRegistry::new(TokioNet, "127.0.0.1", proxy_port, options),
            direct: RemoteRegistry::new(TokioNet, "127.0.0.1", port, options),
            host,
            proxy,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Fixture::Memory(_) => "memory",
            Fixture::Zk { .. } => "zookeeper",
            Fixture::Remote { .. } => "remote",
        }
    }

    fn servers(&self) -> AnyRegistry {
        match self {
            Fixture::Memory(r) => r.clone().into(),
            Fixture::Zk { proxied, .. } => proxied.clone().into(),
            Fixture::Remote { proxied, .. } => proxied.clone().into(),
        }
    }

    fn routes(&self) -> AnyRegistry {
        match self {
            Fixture::Memory(r) => r.clone().into(),
            Fixture::Zk { direct, .. } => direct.clone().into(),
            Fixture::Remote { direct, .. } => direct.clone().into(),
        }
    }

    /// Writes a node under the root around the API (another client, or a bug).
    async fn write_raw(&self, name: &str, data: &[u8]) {
        match self {
            Fixture::Memory(r) => r.insert_raw_node(name, data),
            Fixture::Remote { host, .. } => host.insert_raw_node(name, data),
            Fixture::Zk { config, .. } => {
                let client = zk::Client::connect(&config.connect).await.expect("connect");
                let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
                client
                    .mkdir(&config.root, &persistent)
                    .await
                    .expect("mkdir");
                let path = format!("{}/{name}", config.root);
                client
                    .create(&path, data, &persistent)
                    .await
                    .expect("create raw node");
            }
        }
    }

    /// The server `id`'s link to the registry breaks.
    fn partition(&self, id: &ServerId) {
        match self {
            Fixture::Memory(r) => assert!(r.disconnect_session(id)),
            Fixture::Zk { proxies, .. } => proxies.iter().for_each(Proxy::blackhole),
            Fixture::Remote { proxy, .. } => proxy.blackhole(),
        }
    }

    /// Time passes beyond the session timeout: ZooKeeper expires the session by itself.
    fn let_session_expire(&self, id: &ServerId) {
        match self {
            Fixture::Memory(r) => assert!(r.expire_session(id)),
            Fixture::Zk { .. } | Fixture::Remote { .. } => {}
        }
    }

    fn heal(&self, id: &ServerId) {
        match self {
            Fixture::Memory(r) => assert!(r.heal_session(id)),
            Fixture::Zk { proxies, .. } => proxies.iter().for_each(Proxy::heal),
            Fixture::Remote { proxy, .. } => proxy.heal(),
        }
    }

    /// Whether the registry holds an entry for `id` right now, asked directly (not through a
    /// view, which may lag): proves a call did not (re)create an entry.
    async fn entry_exists(&self, id: &ServerId) -> bool {
        match self {
            Fixture::Memory(r) => r.watch().await.expect("watch").snapshot().contains_key(id),
            Fixture::Remote { host, .. } => host.has_node(id),
            Fixture::Zk { config, .. } => {
                let client = zk::Client::connect(&config.connect).await.expect("connect");
                let path = format!("{}/{}", config.root, id.as_str());
                client.check_stat(&path).await.expect("stat").is_some()
            }
        }
    }
}

fn server(id: &str, client_port: u16) -> LiveServer {
    LiveServer {
        id: ServerId::new(id),
        host: format!("10.0.0.{}", client_port % 250),
        client_port,
        link_port: client_port + 100,
        http_port: client_port + 200,
        connections: 0,
        client_tls: false,
        ws_port: None,
    }
}

fn ids(map: &ServerMap) -> Vec<&str> {
    map.keys().map(ServerId::as_str).collect()
}

async fn wait_view(
    view: &RegistryView,
    within: Duration,
    what: &str,
    pred: impl FnMut(&ServerMap) -> bool,
) -> ServerMap {
    match view.wait_until(within, pred).await {
        Ok(map) => map,
        Err(e) => panic!(
            "view never showed {what} within {within:?} ({e}); last: {:?}",
            view.snapshot()
        ),
    }
}

async fn wait_health(
    rx: &mut watch::Receiver<SessionHealth>,
    within: Duration,
    what: &str,
    pred: impl FnMut(&SessionHealth) -> bool,
) {
    let reached = tokio::time::timeout(within, rx.wait_for(pred))
        .await
        .is_ok_and(|r| r.is_ok());
    if !reached {
        panic!(
            "health never became {what} within {within:?}; last: {:?}",
            *rx.borrow()
        );
    }
}

/// Finishes if the view ever shows `id` from now on: catches an entry that comes and goes
/// between two checks.
fn watch_for_appearance(view: &RegistryView, id: &ServerId) -> tokio::task::JoinHandle<()> {
    let mut servers = view.servers();
    let id = id.clone();
    tokio::spawn(async move {
        servers.wait_for(|m| m.contains_key(&id)).await.ok();
    })
}

/// Finishes with the first health that is not `Connected`.
fn watch_for_unhealth(
    mut health: watch::Receiver<SessionHealth>,
) -> tokio::task::JoinHandle<Option<SessionHealth>> {
    tokio::spawn(async move {
        health
            .wait_for(|h| !h.is_connected())
            .await
            .ok()
            .map(|h| *h)
    })
}

// ---------------------------------------------------------------- scenarios

async fn two_servers_are_seen_with_their_addresses(f: Fixture) {
    let view = f.routes().watch().await.expect("watch");
    assert!(view.snapshot().is_empty(), "fresh root is empty");
    let a = server("a", 11211);
    let b = server("b", 11212);
    let reg_a = f.servers().register(a.clone()).await.expect("register a");
    let reg_b = f.servers().register(b.clone()).await.expect("register b");
    assert_eq!(reg_a.server_id().as_str(), "a");
    assert_eq!(reg_a.current_health(), SessionHealth::Connected);
    let map = wait_view(&view, PROMPT, "a and b", |m| m.len() == 2).await;
    assert_eq!(map.get(&a.id), Some(&a));
    assert_eq!(map.get(&b.id), Some(&b));
    drop((reg_a, reg_b));
}

async fn deregister_removes_the_server(f: Fixture) {
    let view = f.routes().watch().await.expect("watch");
    let reg_a = f.servers().register(server("a", 1)).await.expect("a");
    let _reg_b = f.servers().register(server("b", 2)).await.expect("b");
    wait_view(&view, PROMPT, "a and b", |m| m.len() == 2).await;
    let started = Instant::now();
    reg_a.deregister().await.expect("deregister");
    let map = wait_view(&view, PROMPT, "only b", |m| m.len() == 1).await;
    eprintln!(
        "[{}] deregister visible after {:?}",
        f.name(),
        started.elapsed()
    );
    assert_eq!(ids(&map), ["b"]);
    // The id is free again at once: deregistering deleted the node.
    let again = f
        .servers()
        .register(server("a", 3))
        .await
        .expect("re-register a");
    let map = wait_view(&view, PROMPT, "a again", |m| m.len() == 2).await;
    assert_eq!(map[&ServerId::new("a")].client_port, 3);
    drop(again);
}

async fn dropped_registration_disappears(f: Fixture) {
    let view = f.routes().watch().await.expect("watch");
    let reg = f.servers().register(server("a", 1)).await.expect("a");
    let _keep = f.servers().register(server("b", 2)).await.expect("b");
    wait_view(&view, PROMPT, "a and b", |m| m.len() == 2).await;
    let started = Instant::now();
    drop(reg);
    let map = wait_view(&view, PROMPT, "a gone", |m| {
        !m.contains_key(&ServerId::new("a"))
    })
    .await;
    eprintln!(
        "[{}] dropped registration gone after {:?}",
        f.name(),
        started.elapsed()
    );
    assert_eq!(ids(&map), ["b"]);
}

async fn update_connections_shows_in_view(f: Fixture) {
    let view = f.routes().watch().await.expect("watch");
    let reg = f.servers().register(server("a", 1)).await.expect("a");
    wait_view(&view, PROMPT, "a", |m| m.len() == 1).await;
    for n in [5, 17, 0] {
        reg.update(n).await.expect("update");
        let map = wait_view(&view, PROMPT, "the new count", |m| {
            m.get(&ServerId::new("a"))
                .is_some_and(|s| s.connections == n)
        })
        .await;
        // Only the count changed.
        let mut expected = server("a", 1);
        expected.connections = n;
        assert_eq!(map[&ServerId::new("a")], expected);
    }
}

async fn late_watcher_sees_earlier_registrations(f: Fixture) {
    let _a = f.servers().register(server("a", 1)).await.expect("a");
    let b = f.servers().register(server("b", 2)).await.expect("b");
    b.update(9).await.expect("update");
    // Current when `watch` returns, no waiting.
    let view = f.routes().watch().await.expect("watch");
    let map = view.snapshot();
    assert_eq!(ids(&map), ["a", "b"]);
    assert_eq!(map[&ServerId::new("b")].connections, 9);
}

async fn bad_node_data_is_skipped(f: Fixture) {
    let _a = f.servers().register(server("a", 1)).await.expect("a");
    f.write_raw("garbage", b"\x00\x01 not json").await;
    f.write_raw("empty", b"").await;
    f.write_raw(
        "liar",
        br#"{"id":"someone-else","host":"h","client_port":1,"link_port":2,"http_port":3}"#,
    )
    .await;
    // A node written by another tool but well-formed is a server like any other.
    f.write_raw(
        "c",
        br#"{"id":"c","host":"h","client_port":1,"link_port":2,"http_port":3}"#,
    )
    .await;
    let view = f.routes().watch().await.expect("watch despite bad nodes");
    let map = wait_view(&view, PROMPT, "a and c", |m| m.len() == 2).await;
    assert_eq!(ids(&map), ["a", "c"]);
    // The view keeps working after skipping them.
    let _b = f.servers().register(server("b", 2)).await.expect("b");
    let map = wait_view(&view, PROMPT, "b too", |m| m.len() == 3).await;
    assert_eq!(ids(&map), ["a", "b", "c"]);
}

async fn a_live_id_cannot_be_taken_and_bad_ids_are_rejected(f: Fixture) {
    let view = f.routes().watch().await.expect("watch");
    let _a = f.servers().register(server("a", 1)).await.expect("a");
    let started = Instant::now();
    match f.servers().register(server("a", 2)).await {
        Err(RegistryError::AlreadyRegistered(id)) => assert_eq!(id.as_str(), "a"),
        other => panic!("expected AlreadyRegistered, got {other:?}"),
    }
    eprintln!(
        "[{}] duplicate refused after {:?}",
        f.name(),
        started.elapsed()
    );
    // The first registration is untouched.
    assert_eq!(view.snapshot()[&ServerId::new("a")].client_port, 1);
    for bad in ["", "a/b", ".."] {
        match f.servers().register(server(bad, 3)).await {
            Err(RegistryError::InvalidServerId(_)) => {}
            other => panic!("{bad:?}: expected InvalidServerId, got {other:?}"),
        }
    }
}

/// The server's session is lost: it leaves the view, its health says so (it must fence),
/// and after the heal its entry comes back by itself, with the data it published meanwhile.
async fn session_expiry_removes_then_recreates(f: Fixture) {
    let view = f.routes().watch().await.expect("watch");
    let a = server("a", 1);
    let reg = f.servers().register(a.clone()).await.expect("a");
    let _b = f
        .routes()
        .register(server("b", 2))
        .await
        .expect("b (unaffected)");
    wait_view(&view, PROMPT, "a and b", |m| m.len() == 2).await;
    let mut health = reg.health();
    // Fencing order: by the time routes drop `a`, `a` must already know its session is lost.
    let health_when_gone = {
        let mut servers = view.servers();
        let health = reg.health();
        let id = a.id.clone();
        tokio::spawn(async move {
            loop {
                servers.changed().await.expect("view alive");
                if !servers.borrow_and_update().contains_key(&id) {
                    return *health.borrow();
                }
            }
        })
    };

    let t0 = Instant::now();
    f.partition(&a.id);
    wait_health(&mut health, SESSION * 3, "Disconnected or Expired", |h| {
        !h.is_connected()
    })
    .await;
    let t_disconnected = t0.elapsed();
    f.let_session_expire(&a.id);
    wait_view(&view, SESSION * 5, "a gone after expiry", |m| {
        !m.contains_key(&a.id)
    })
    .await;
    let t_gone = t0.elapsed();
    assert_eq!(
        health_when_gone.await.expect("observer"),
        SessionHealth::Expired,
        "routes dropped the server before it knew its session was lost"
    );
    wait_health(&mut health, SESSION * 3, "Expired", |h| {
        *h == SessionHealth::Expired
    })
    .await;
    assert_eq!(reg.sessions_lost(), 1);
    assert!(view.snapshot().contains_key(&ServerId::new("b")), "b stays");

    // An update while cut off is kept and published with the recreated entry.
    match reg.update(42).await {
        Err(RegistryError::NotConnected) => {}
        other => panic!("update while expired: expected NotConnected, got {other:?}"),
    }

    let t1 = Instant::now();
    f.heal(&a.id);
    let map = wait_view(&view, SESSION * 5, "a recreated with 42", |m| {
        m.get(&a.id).is_some_and(|s| s.connections == 42)
    })
    .await;
    let t_back = t1.elapsed();
    let mut expected = a.clone();
    expected.connections = 42;
    assert_eq!(map[&a.id], expected);
    wait_health(&mut health, PROMPT, "Connected", |h| h.is_connected()).await;
    assert_eq!(reg.sessions_lost(), 1, "one loss, one recreation");
    eprintln!(
        "[{}] expiry: disconnected after {t_disconnected:?}, gone from view after {t_gone:?} \
         (health already Expired); back {t_back:?} after the heal",
        f.name()
    );

    // The recreated entry is a normal one: updates work and deregistering removes it.
    reg.update(7).await.expect("update after recreation");
    wait_view(&view, PROMPT, "7", |m| {
        m.get(&a.id).is_some_and(|s| s.connections == 7)
    })
    .await;
    reg.deregister().await.expect("deregister");
    wait_view(&view, PROMPT, "a gone", |m| !m.contains_key(&a.id)).await;
}

/// Unlisting takes the server out of every view but keeps its session; a count published
/// meanwhile is stored (not published) and shows once it is listed again. Both directions are
/// idempotent.
async fn unlisting_hides_the_server_and_keeps_its_session(f: Fixture) {
    let view = f.routes().watch().await.expect("watch");
    let a = server("a", 1);
    let reg = f.servers().register(a.clone()).await.expect("a");
    let _b = f.servers().register(server("b", 2)).await.expect("b");
    wait_view(&view, PROMPT, "a and b", |m| m.len() == 2).await;
    assert!(reg.is_listed(), "a registration starts listed");
    let unhealthy = watch_for_unhealth(reg.health());

    let started = Instant::now();
    reg.set_listed(false).await.expect("unlist");
    assert!(!reg.is_listed());
    let map = wait_view(&view, PROMPT, "only b", |m| !m.contains_key(&a.id)).await;
    eprintln!(
        "[{}] unlist visible after {:?}",
        f.name(),
        started.elapsed()
    );
    assert_eq!(ids(&map), ["b"]);
    let reappeared = watch_for_appearance(&view, &a.id);
    reg.set_listed(false)
        .await
        .expect("unlisting twice is a no-op");
    reg.update(12)
        .await
        .expect("an update while unlisted is stored");
    assert!(
        !f.entry_exists(&a.id).await,
        "a second unlist or an update recreated the entry"
    );
    assert!(
        !reappeared.is_finished() && !view.snapshot().contains_key(&a.id),
        "an unlisted server showed up in the view"
    );
    reappeared.abort();
    assert_eq!(reg.current_health(), SessionHealth::Connected);
    assert_eq!(reg.sessions_lost(), 0);

    reg.set_listed(true).await.expect("list");
    assert!(reg.is_listed());
    let map = wait_view(&view, PROMPT, "a back with 12", |m| {
        m.get(&a.id).is_some_and(|s| s.connections == 12)
    })
    .await;
    let mut expected = a.clone();
    expected.connections = 12;
    assert_eq!(map[&a.id], expected);
    reg.set_listed(true)
        .await
        .expect("listing twice is a no-op");
    reg.update(13).await.expect("update once listed");
    wait_view(&view, PROMPT, "13", |m| {
        m.get(&a.id).is_some_and(|s| s.connections == 13)
    })
    .await;
    assert_eq!(reg.sessions_lost(), 0);
    assert!(
        !unhealthy.is_finished(),
        "health left Connected: {:?}",
        unhealthy.await
    );
    unhealthy.abort();
}

/// An unlisted server whose session is lost gets a new session (health back to `Connected`)
/// but no entry in it; listing it then creates the entry with the latest count.
async fn unlisted_server_stays_out_across_a_session_expiry(f: Fixture) {
    let view = f.routes().watch().await.expect("watch");
    let a = server("a", 1);
    let reg = f.servers().register(a.clone()).await.expect("a");
    let _b = f
        .routes()
        .register(server("b", 2))
        .await
        .expect("b (unaffected)");
    wait_view(&view, PROMPT, "a and b", |m| m.len() == 2).await;
    reg.set_listed(false).await.expect("unlist");
    wait_view(&view, PROMPT, "a gone", |m| !m.contains_key(&a.id)).await;
    let reappeared = watch_for_appearance(&view, &a.id);
    let mut health = reg.health();

    f.partition(&a.id);
    wait_health(&mut health, SESSION * 3, "Disconnected or Expired", |h| {
        !h.is_connected()
    })
    .await;
    f.let_session_expire(&a.id);
    wait_health(&mut health, SESSION * 3, "Expired", |h| {
        *h == SessionHealth::Expired
    })
    .await;
    assert_eq!(reg.sessions_lost(), 1);
    match reg.update(8).await {
        Err(RegistryError::NotConnected) => {}
        other => panic!("update while expired: expected NotConnected, got {other:?}"),
    }
    match reg.set_listed(false).await {
        Err(RegistryError::NotConnected) => {}
        other => panic!("set_listed while expired: expected NotConnected, got {other:?}"),
    }

    let t1 = Instant::now();
    f.heal(&a.id);
    wait_health(
        &mut health,
        SESSION * 5,
        "Connected in a new session",
        |h| h.is_connected(),
    )
    .await;
    eprintln!(
        "[{}] unlisted: new session {:?} after the heal",
        f.name(),
        t1.elapsed()
    );
    assert_eq!(reg.sessions_lost(), 1);
    assert!(
        !f.entry_exists(&a.id).await,
        "the new session created the entry of an unlisted server"
    );
    assert!(
        !reappeared.is_finished() && !view.snapshot().contains_key(&a.id),
        "an unlisted server showed up in the view"
    );
    reappeared.abort();

    reg.set_listed(true).await.expect("list in the new session");
    let map = wait_view(&view, PROMPT, "a with 8", |m| {
        m.get(&a.id).is_some_and(|s| s.connections == 8)
    })
    .await;
    let mut expected = a.clone();
    expected.connections = 8;
    assert_eq!(map[&a.id], expected);
    assert!(reg.current_health().is_connected());
    assert_eq!(reg.sessions_lost(), 1);
}

/// Unlisting while the link is down (session still alive) is applied once it is back; the
/// session survives.
async fn unlist_while_disconnected_applies_on_reconnect(f: Fixture) {
    let view = f.routes().watch().await.expect("watch");
    let a = server("a", 1);
    let reg = f.servers().register(a.clone()).await.expect("a");
    wait_view(&view, PROMPT, "a", |m| m.len() == 1).await;
    let mut health = reg.health();
    f.partition(&a.id);
    wait_health(&mut health, SESSION, "Disconnected", |h| {
        matches!(h, SessionHealth::Disconnected { .. })
    })
    .await;
    // ZooKeeper cannot take it now; the in-process registry can.
    match reg.set_listed(false).await {
        Ok(()) | Err(RegistryError::NotConnected) => {}
        other => panic!("unlist while disconnected: got {other:?}"),
    }
    assert!(!reg.is_listed(), "the wish is kept");
    f.heal(&a.id);
    wait_health(&mut health, SESSION, "Connected", |h| h.is_connected()).await;
    wait_view(&view, PROMPT, "a gone after the reconnect", |m| {
        !m.contains_key(&a.id)
    })
    .await;
    assert!(!f.entry_exists(&a.id).await);
    assert_eq!(reg.sessions_lost(), 0, "the session survived");
    reg.set_listed(true).await.expect("list");
    wait_view(&view, PROMPT, "a back", |m| m.contains_key(&a.id)).await;
}

/// Deregistering an unlisted server is fine and leaves nothing behind; the id is free again.
async fn deregister_while_unlisted(f: Fixture) {
    let view = f.routes().watch().await.expect("watch");
    let a = server("a", 1);
    let reg = f.servers().register(a.clone()).await.expect("a");
    let _b = f.servers().register(server("b", 2)).await.expect("b");
    wait_view(&view, PROMPT, "a and b", |m| m.len() == 2).await;
    reg.set_listed(false).await.expect("unlist");
    wait_view(&view, PROMPT, "a gone", |m| !m.contains_key(&a.id)).await;
    let reappeared = watch_for_appearance(&view, &a.id);
    reg.deregister().await.expect("deregister while unlisted");
    assert!(!f.entry_exists(&a.id).await, "deregister created the entry");
    assert!(
        !reappeared.is_finished() && !view.snapshot().contains_key(&a.id),
        "a showed up again"
    );
    reappeared.abort();
    let _again = f
        .servers()
        .register(server("a", 3))
        .await
        .expect("re-register a");
    let map = wait_view(&view, PROMPT, "a again", |m| m.contains_key(&a.id)).await;
    assert_eq!(map[&a.id].client_port, 3);
}

// ---------------------------------------------------------------- ZooKeeper only

/// A cut shorter than the session timeout: the session survives, the node never leaves the
/// view, and the health goes Disconnected and back to Connected without a loss.
#[tokio::test]
async fn zk_short_partition_keeps_the_session() {
    let Some(f) = Fixture::zk("short_partition").await else {
        return;
    };
    let view = f.routes().watch().await.expect("watch");
    let a = server("a", 1);
    let reg = f.servers().register(a.clone()).await.expect("a");
    wait_view(&view, PROMPT, "a", |m| m.len() == 1).await;
    // Record whether `a` ever leaves the view.
    let mut servers = view.servers();
    let id = a.id.clone();
    let left = tokio::spawn(async move {
        loop {
            if servers.changed().await.is_err() {
                return false;
            }
            if !servers.borrow_and_update().contains_key(&id) {
                return true;
            }
        }
    });
    let mut health = reg.health();
    f.partition(&a.id);
    // The client notices after its connection timeout (2/5 of the session timeout).
    wait_health(&mut health, SESSION, "Disconnected", |h| {
        matches!(h, SessionHealth::Disconnected { .. })
    })
    .await;
    f.heal(&a.id);
    wait_health(&mut health, SESSION, "Connected", |h| h.is_connected()).await;
    reg.update(3).await.expect("update after reconnect");
    wait_view(&view, PROMPT, "3", |m| {
        m.get(&a.id).is_some_and(|s| s.connections == 3)
    })
    .await;
    assert_eq!(reg.sessions_lost(), 0);
    left.abort();
    assert!(
        !matches!(left.await, Ok(true)),
        "a left the view during a short partition"
    );
}

/// A view whose own session expires opens a new one and lists again.
#[tokio::test]
async fn zk_view_recovers_after_its_own_session_expires() {
    let Some(f) = Fixture::zk("view_expiry").await else {
        return;
    };
    let Fixture::Zk { proxied, .. } = &f else {
        unreachable!()
    };
    // Here the route is the one behind the proxy.
    let view = proxied.watch().await.expect("watch");
    let _a = f.routes().register(server("a", 1)).await.expect("a");
    wait_view(&view, PROMPT, "a", |m| m.len() == 1).await;
    let mut health = view.health();
    f.partition(&ServerId::new("a"));
    wait_health(&mut health, SESSION * 2, "Disconnected", |h| {
        !h.is_connected()
    })
    .await;
    // Changes while the view is cut off...
    let _b = f.routes().register(server("b", 2)).await.expect("b");
    // ...and its session expires on the ensemble meanwhile.
    tokio::time::sleep(SESSION * 2).await;
    f.heal(&ServerId::new("a"));
    let map = wait_view(&view, SESSION * 5, "a and b after the view's heal", |m| {
        m.len() == 2
    })
    .await;
    assert_eq!(ids(&map), ["a", "b"]);
    wait_health(&mut health, PROMPT, "Connected", |h| h.is_connected()).await;
}

/// A view cut off for half a session timeout calls its session lost (`Expired`), as the
/// registrations do (their servers fence then), well before the client library gives up on
/// the session (7/5 of it): its route stops placing logins on servers that have fenced.
/// Healed, it is `Connected` again with the current listing.
#[tokio::test]
async fn zk_view_cut_off_for_half_a_session_calls_itself_lost() {
    let Some(f) = Fixture::zk("view_half_session").await else {
        return;
    };
    let Fixture::Zk { proxied, .. } = &f else {
        unreachable!()
    };
    let view = proxied.watch().await.expect("watch");
    let _a = f.routes().register(server("a", 1)).await.expect("a");
    wait_view(&view, PROMPT, "a", |m| m.len() == 1).await;
    let mut health = view.health();
    f.partition(&ServerId::new("a"));
    wait_health(&mut health, SESSION, "Disconnected", |h| {
        matches!(h, SessionHealth::Disconnected { .. })
    })
    .await;
    let disconnected = Instant::now();
    wait_health(&mut health, SESSION, "Expired", |h| {
        *h == SessionHealth::Expired
    })
    .await;
    let lost_after = disconnected.elapsed();
    // Half a session (1 s) after the disconnection; the library would say so 2 s after it.
    assert!(
        lost_after >= SESSION / 2 - Duration::from_millis(100)
            && lost_after < SESSION / 2 + Duration::from_millis(600),
        "called lost {lost_after:?} after the disconnection"
    );
    let _b = f.routes().register(server("b", 2)).await.expect("b");
    f.heal(&ServerId::new("a"));
    wait_health(&mut health, SESSION * 5, "Connected", |h| h.is_connected()).await;
    wait_view(&view, PROMPT, "a and b after the heal", |m| m.len() == 2).await;
}

/// A node deleted and created again at once (what a server does when it replaces its
/// previous session's node after a lost quorum) stays in the view: the deletion's data
/// watch event, handled after a listing that already saw the new node, must not drop it.
#[tokio::test]
async fn zk_a_node_replaced_at_once_stays_in_the_view() {
    let Some(f) = Fixture::zk("node_replaced").await else {
        return;
    };
    let Fixture::Zk { config, .. } = &f else {
        unreachable!()
    };
    let view = f.routes().watch().await.expect("watch");
    let client = zk::Client::connect(&config.connect).await.expect("connect");
    let ephemeral = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
    let path = format!("{}/a", config.root);
    for round in 0..5u16 {
        let data = cim_io::registry::encode_node(&server("a", round + 1)).expect("encode");
        if round == 0 {
            client
                .create(&path, &data, &ephemeral)
                .await
                .expect("create");
        } else {
            // In one transaction, so that every listing after the deletion's events sees
            // the new node: the race a server's replacement can lose, made certain.
            let mut replace = client.new_multi_writer();
            replace.add_delete(&path, None).expect("delete op");
            replace
                .add_create(&path, &data, &ephemeral)
                .expect("create op");
            replace.commit().await.expect("replace");
        }
        wait_view(&view, PROMPT, "the replaced node", |m| {
            m.get(&ServerId::new("a"))
                .is_some_and(|s| s.client_port == round + 1)
        })
        .await;
    }
    // And a deletion that is one still removes it.
    client.delete(&path, None).await.expect("delete");
    wait_view(&view, PROMPT, "a gone", |m| m.is_empty()).await;
}

/// A view whose listing fails after a reconnect (here: the root made unreadable to it) keeps
/// showing its last whole listing instead of the half it had: publishing that would tell its
/// route that every server left. Readable again, it lists again by itself.
#[tokio::test]
async fn zk_a_failed_listing_keeps_the_last_whole_view() {
    let Some(f) = Fixture::zk("failed_listing").await else {
        return;
    };
    let Fixture::Zk {
        proxied, config, ..
    } = &f
    else {
        unreachable!()
    };
    let _a = f.routes().register(server("a", 1)).await.expect("a");
    let view = proxied.watch().await.expect("watch");
    wait_view(&view, PROMPT, "a", |m| m.len() == 1).await;
    let mut servers = view.servers();
    let emptied = tokio::spawn(async move {
        loop {
            if servers.changed().await.is_err() {
                return false;
            }
            if servers.borrow_and_update().is_empty() {
                return true;
            }
        }
    });
    let admin = zk::Client::connector()
        .with_auth("digest", b"admin:secret")
        .connect(&config.connect)
        .await
        .expect("connect");
    let admin_only = [zk::Acl::new_const(zk::Permission::ALL, "auth", "")];
    admin
        .set_acl(&config.root, &admin_only, None)
        .await
        .expect("restrict the root");
    let mut health = view.health();
    f.partition(&ServerId::new("a"));
    wait_health(&mut health, SESSION, "Disconnected", |h| {
        matches!(h, SessionHealth::Disconnected { .. })
    })
    .await;
    f.heal(&ServerId::new("a"));
    // Connected once the listing after the reconnect was tried (and refused: NoAuth).
    wait_health(&mut health, SESSION * 2, "Connected", |h| h.is_connected()).await;
    // A few of its retries (100 ms, 200 ms, ...) fail too: an observation window, since
    // what must not happen cannot be awaited.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let anyone = [zk::Acl::new_const(zk::Permission::ALL, "world", "anyone")];
    admin
        .set_acl(&config.root, &anyone, None)
        .await
        .expect("open the root again");
    let _b = f.routes().register(server("b", 2)).await.expect("b");
    wait_view(&view, SESSION * 3, "a and b once readable", |m| {
        m.len() == 2
    })
    .await;
    emptied.abort();
    assert!(
        !matches!(emptied.await, Ok(true)),
        "the view showed no server while its listing failed"
    );
}

#[tokio::test]
async fn zk_rejects_bad_roots() {
    for bad in ["", "/", "cim", "/cim/", "/cim//servers", "/cim/../x"] {
        let config = ZkConfig::new("127.0.0.1:1").with_root(bad);
        assert!(
            matches!(ZkRegistry::new(config), Err(RegistryError::InvalidRoot(_))),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn zk_connect_failure_is_a_timely_error() {
    // Nothing listens on a freshly probed and released port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe")
        .port();
    let config = ZkConfig::new(format!("127.0.0.1:{port}"))
        .with_session_timeout(Duration::from_secs(1))
        .with_op_timeout(Duration::from_secs(1));
    let registry = ZkRegistry::new(config).expect("config");
    let started = Instant::now();
    let result = registry.register(server("a", 1)).await;
    assert!(result.is_err(), "registered against nothing");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------- both backends

macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Fixture::memory()).await;
                }
            )*
        }
        mod remote {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Fixture::remote().await).await;
                }
            )*
        }
        mod zookeeper {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let Some(f) = super::Fixture::zk(stringify!($scenario)).await else {
                        return;
                    };
                    super::$scenario(f).await;
                }
            )*
        }
        mod zookeeper_ensemble {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let Some(f) = super::Fixture::zk_ensemble(stringify!($scenario)).await
                    else {
                        return;
                    };
                    super::$scenario(f).await;
                }
            )*
        }
    };
}

conformance!(
    two_servers_are_seen_with_their_addresses,
    deregister_removes_the_server,
    dropped_registration_disappears,
    update_connections_shows_in_view,
    late_watcher_sees_earlier_registrations,
    bad_node_data_is_skipped,
    a_live_id_cannot_be_taken_and_bad_ids_are_rejected,
    session_expiry_removes_then_recreates,
    unlisting_hides_the_server_and_keeps_its_session,
    unlisted_server_stays_out_across_a_session_expiry,
    unlist_while_disconnected_applies_on_reconnect,
    deregister_while_unlisted,
);
