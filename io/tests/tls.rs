//! TLS over real sockets: a deployment of two routes and two servers in this process, every
//! connection encrypted (route HTTPS, client gateways, mutual-TLS links), then each way an
//! operator or an attacker can get it wrong: a link certificate from another CA or of the
//! wrong role, certificate reload under live sessions, plaintext on a TLS port and TLS on a
//! plaintext port, expired and wrong-host certificates, a handshake that never completes,
//! a migration that takes both, and a client that will not be downgraded.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use cim_core::accounts::PasswordParams;
use cim_core::client::{ClientConfig, ClientEvent, StopReason};
use cim_core::ids::{ConvId, ServerId, UserId};
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_io::api;
use cim_io::clock::Clock;
use cim_io::http_client::HttpClient;
use cim_io::net;
use cim_io::net::TokioNet;
use cim_io::registry::MemoryRegistry;
use cim_io::route::{self, RouteHandle, RouteOptions};
use cim_io::sdk::{Client, Events, RouteApi, SdkOptions, SdkTls};
use cim_io::server::{self, ServerHandle, ServerOptions};
use cim_io::store::{MemoryBackend, Store};
use cim_io::tls::dev::{DevCa, LeafSpec, PemPair, write_key};
use cim_io::tls::setup::{RouteSide, ServerSide, TlsFlags};
use cim_io::tls::{
    ClientTls, ClientTlsSettings, ConnectError, Role, ServerTls, ServerTlsSettings, TlsError,
    TlsStats, cert_info,
};
use cim_proto::Frame;
use cim_proto::codec::FrameCodec;
use cim_proto::frame::Kind;
use hyper::Method;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const TICKET_SECRET: &[u8] = b"tls-test-ticket-secret";
const LINK_SECRET: &[u8] = b"tls-test-link-secret";
const PASSWORD: &str = "tls-test-password";
const WAIT: Duration = Duration::from_secs(10);
const HOSTS: &[&str] = &["127.0.0.1", "localhost"];

/// A directory of its own under the system's temporary directory, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "cim-tls-{name}-{}-{}",
            std::process::id(),
            cim_io::launch::os_seed()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `pair` as `<name>.pem` and `<name>-key.pem`.
    fn write(&self, name: &str, pair: &PemPair) -> (PathBuf, PathBuf) {
        let cert = self.0.join(format!("{name}.pem"));
        let key = self.0.join(format!("{name}-key.pem"));
        std::fs::write(&cert, &pair.cert).unwrap();
        write_key(&key, &pair.key).unwrap();
        (cert, key)
    }

    fn write_ca(&self, name: &str, ca: &DevCa) -> PathBuf {
        let path = self.0.join(format!("{name}.pem"));
        std::fs::write(&path, ca.cert_pem()).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA and the files of one deployment.
struct Pki {
    dir: Dir,
    ca: DevCa,
    ca_file: PathBuf,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = Dir::new(name);
        let ca = DevCa::new(&format!("cim test CA {name}")).unwrap();
        let ca_file = dir.write_ca("ca", &ca);
        Self { dir, ca, ca_file }
    }

    fn leaf(&self, name: &str, spec: &LeafSpec) -> (PathBuf, PathBuf) {
        self.dir.write(name, &self.ca.issue(spec).unwrap())
    }

    fn flags(&self, name: &str, role: Role) -> TlsFlags {
        let (cert, key) = self.leaf(name, &LeafSpec::new(HOSTS, Some(role)));
        TlsFlags {
            cert: Some(cert),
            key: Some(key),
            ca: Some(self.ca_file.clone()),
            accept_plaintext: false,
        }
    }

    fn client(&self) -> ClientTls {
        ClientTls::load(ClientTlsSettings {
            ca: Some(self.ca_file.clone()),
            ..ClientTlsSettings::default()
        })
        .unwrap()
    }
}

fn keys() -> TicketKeys {
    TicketKeys::new(1, TICKET_SECRET.to_vec())
}

fn server_options(id: &str) -> ServerOptions {
    let mut options = ServerOptions::new(
        ServerConfig::new(ServerId::new(id), keys()),
        LINK_SECRET.to_vec(),
    );
    options.listen_ip = Ipv4Addr::LOCALHOST.into();
    options.client_port = 0;
    options.link_port = 0;
    options.http_port = 0;
    options
}

fn route_options(id: &str) -> RouteOptions {
    let mut options = RouteOptions::new(
        id,
        keys(),
        b"tls-test-bearer".to_vec(),
        LINK_SECRET.to_vec(),
    );
    options.http_listen = "127.0.0.1:0".parse().unwrap();
    options.login.password = PasswordParams::for_tests();
    options.link_retry_delay = Duration::from_millis(100);
    options.io_timeout = Duration::from_secs(2);
    options
}

/// Two servers and two routes on one memory store and registry.
struct Deployment {
    store: Arc<MemoryBackend>,
    registry: MemoryRegistry,
    servers: Vec<(ServerHandle, Option<ServerSide>)>,
    routes: Vec<(RouteHandle, Option<RouteSide>)>,
}

impl Deployment {
    fn new() -> Self {
        Self {
            store: Arc::new(MemoryBackend::new(MemoryStoreConfig::default())),
            registry: MemoryRegistry::new(),
            servers: Vec::new(),
            routes: Vec::new(),
        }
    }

    async fn server(&mut self, id: &str, tls: Option<ServerSide>) {
        let mut options = server_options(id);
        options.gateway_tls = tls.as_ref().map(|t| t.gateway.clone());
        options.link_tls = tls.as_ref().map(|t| t.link.clone());
        let store: Arc<dyn Store> = self.store.clone();
        let handle = server::start(TokioNet, Clock::System, options, store, &self.registry)
            .await
            .expect("server starts");
        self.servers.push((handle, tls));
    }

    async fn route(&mut self, id: &str, tls: Option<RouteSide>) {
        let mut options = route_options(id);
        options.https = tls.as_ref().map(|t| t.https.clone());
        options.link_tls = tls.as_ref().map(|t| t.links.clone());
        self.route_with(options, tls).await;
    }

    /// A route with these options; returns its API address.
    async fn route_with(
        &mut self,
        options: RouteOptions,
        tls: Option<RouteSide>,
    ) -> std::net::SocketAddr {
        let store: Arc<dyn Store> = self.store.clone();
        let handle = route::start(TokioNet, Clock::System, options, store, &self.registry)
            .await
            .expect("route starts");
        let addr = handle.http_addr();
        self.routes.push((handle, tls));
        addr
    }

    fn route_port(&self, i: usize) -> u16 {
        self.routes[i].0.http_addr().port()
    }

    fn api(&self, i: usize, tls: Option<&ClientTls>) -> RouteApi<TokioNet> {
        let api = RouteApi::new(TokioNet, "127.0.0.1", self.route_port(i), WAIT);
        match tls {
            Some(tls) => api.with_tls(tls.clone()),
            None => api,
        }
    }

    fn client(
        &self,
        i: usize,
        user: UserId,
        name: &str,
        tls: Option<SdkTls>,
    ) -> (Client<TokioNet>, Events) {
        let mut config = ClientConfig::new(user, name, PASSWORD, cim_io::launch::os_seed());
        config.backoff_base = Duration::from_millis(20);
        config.backoff_cap = Duration::from_millis(200);
        config.ack_delay = Duration::from_millis(10);
        let mut options = SdkOptions::new("127.0.0.1", self.route_port(i), config);
        options.tls = tls;
        Client::start(TokioNet, Clock::System, options)
    }

    fn server_tls(&self, i: usize) -> &ServerSide {
        self.servers[i].1.as_ref().expect("a TLS server")
    }
}

/// A TLS deployment: two servers, two routes, all certificates from `pki`.
async fn tls_deployment(pki: &Pki) -> Deployment {
    let mut d = Deployment::new();
    for id in ["s1", "s2"] {
        let tls = ServerSide::load(&pki.flags(id, Role::Server), "127.0.0.1").unwrap();
        d.server(id, tls).await;
    }
    for id in ["r1", "r2"] {
        let tls = RouteSide::load(&pki.flags(id, Role::Route)).unwrap();
        d.route(id, tls).await;
    }
    d
}

fn sdk_tls(client: &ClientTls) -> Option<SdkTls> {
    Some(SdkTls {
        client: client.clone(),
        route_https: true,
    })
}

async fn next_event(events: &mut Events) -> ClientEvent {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("an event in time")
        .expect("the client is running")
}

/// Waits for `Online`; reconnecting for longer than `WAIT` fails the test.
async fn online(events: &mut Events) -> ServerId {
    let wait = async {
        loop {
            match next_event(events).await {
                ClientEvent::Online { server, .. } => return server,
                ClientEvent::Stopped(reason) => panic!("stopped: {reason:?}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .expect("online in time")
}

async fn message(events: &mut Events, conv: &ConvId, text: &str) {
    let wait = async {
        loop {
            if let ClientEvent::Message(m) = next_event(events).await
                && &m.conv == conv
                && m.body.as_ref() == text.as_bytes()
            {
                return;
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .expect("the message in time");
}

/// Waits (bounded) for a condition on counters that other tasks move.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn load(stat: &std::sync::atomic::AtomicU64) -> u64 {
    stat.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_over_tls_through_two_routes_and_two_servers() {
    let pki = Pki::new("e2e");
    let d = tls_deployment(&pki).await;
    let trust = pki.client();

    // Users until two sit on different servers, each through its own route.
    let mut seated: Vec<(UserId, String, Client<TokioNet>, Events, ServerId)> = Vec::new();
    for n in 0..12 {
        let via = seated.len();
        let name = format!("tls{n}");
        let registered = d
            .api(via, Some(&trust))
            .register(&name, PASSWORD)
            .await
            .unwrap();
        let user = UserId(registered.user_id);
        let (client, mut events) = d.client(via, user, &name, sdk_tls(&trust));
        let server = online(&mut events).await;
        if seated.first().is_some_and(|first| first.4 == server) {
            client.shutdown().await;
            continue;
        }
        seated.push((user, name, client, events, server));
        if seated.len() == 2 {
            break;
        }
    }
    assert_eq!(seated.len(), 2, "12 users never spread over both servers");
    let private = ConvId::private(seated[0].0, seated[1].0).unwrap();
    for (from, conv, text) in [
        (0, private.clone(), "over TLS, a to b"),
        (1, private.clone(), "over TLS, b to a"),
        (0, ConvId::All, "over TLS, to everyone"),
    ] {
        seated[from]
            .2
            .send(conv.clone(), Bytes::from(text))
            .await
            .unwrap();
        message(&mut seated[1 - from].3, &conv, text).await;
    }

    // Every hop was TLS: both gateways took a handshake, every link port one per route.
    for (i, (_, tls)) in d.servers.iter().enumerate() {
        let tls = tls.as_ref().unwrap();
        assert!(
            load(&tls.gateway.stats().handshakes) >= 1,
            "gateway of s{}",
            i + 1
        );
        assert!(
            load(&tls.link.stats().handshakes) >= 2,
            "link port of s{}",
            i + 1
        );
        assert_eq!(load(&tls.link.stats().plaintext_accepted), 0);
    }
    for (_, tls) in &d.routes {
        assert!(load(&tls.as_ref().unwrap().https.stats().handshakes) >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_refuse_a_certificate_of_another_ca_or_of_the_wrong_role() {
    let pki = Pki::new("links");
    let other = Pki::new("links-other");
    let mut d = Deployment::new();
    d.server(
        "s1",
        ServerSide::load(&pki.flags("s1", Role::Server), "127.0.0.1").unwrap(),
    )
    .await;
    let link = d.server_tls(0).link.stats().clone();

    // A route certificate signed by a CA the server does not trust.
    let mut stranger = other.flags("stranger", Role::Route);
    // It trusts the real CA for the server's certificate, so only its own is wrong.
    stranger.ca = Some(pki.ca_file.clone());
    d.route("stranger", RouteSide::load(&stranger).unwrap())
        .await;
    eventually("the stranger's links are refused", || {
        load(&link.handshake_failures) >= 2
    })
    .await;
    assert_eq!(load(&link.handshakes), 0);

    // A certificate of the server role, from the right CA, presented as a route's: a
    // compromised server cannot pose as a route.
    let (cert, key) = pki.leaf("posing", &LeafSpec::new(HOSTS, Some(Role::Server)));
    let posing = ClientTls::load(ClientTlsSettings {
        ca: Some(pki.ca_file.clone()),
        identity: Some((cert, key)),
        own_role: None,
        server_role: Some(Role::Server),
    })
    .unwrap();
    let before = load(&link.handshake_failures);
    let stream = TcpStream::connect(d.servers[0].0.link_addr())
        .await
        .unwrap();
    let tls = posing.connect(stream, "127.0.0.1").await;
    // TLS 1.3 finishes the client's side before the server checks the role: the server
    // then closes at once.
    if let Ok(mut tls) = tls {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(WAIT, tls.read(&mut byte))
            .await
            .expect("closed in time");
        assert!(matches!(read, Ok(0) | Err(_)), "the posing link was served");
    }
    eventually("the posing route is refused", || {
        load(&link.handshake_failures) > before
    })
    .await;

    // A route with a route-role certificate from the right CA gets through.
    d.route(
        "r1",
        RouteSide::load(&pki.flags("r1", Role::Route)).unwrap(),
    )
    .await;
    eventually("the real route links", || load(&link.handshakes) >= 1).await;

    // And a route refuses a server whose certificate carries no server role.
    let (cert, key) = pki.leaf("roleless", &LeafSpec::new(HOSTS, None));
    let roleless = ServerTlsSettings::new("link", cert, key);
    assert!(matches!(
        ServerTls::load(ServerTlsSettings {
            own_role: Some(Role::Server),
            ..roleless
        }),
        Err(TlsError::MissingRole {
            role: Role::Server,
            ..
        })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_under_live_sessions() {
    let pki = Pki::new("reload");
    let d = tls_deployment(&pki).await;
    let trust = pki.client();
    let registered = d
        .api(0, Some(&trust))
        .register("ren", PASSWORD)
        .await
        .unwrap();
    let user = UserId(registered.user_id);
    let (client, mut events) = d.client(0, user, "ren", sdk_tls(&trust));
    let server = online(&mut events).await;
    let index = usize::from(server.as_str() == "s2");
    let gateway = d.server_tls(index).gateway.clone();
    let gateway_addr = d.servers[index].0.client_addr();
    let expiry_before = load_i64(&gateway.stats().cert_not_after);

    // The watcher notices the new files; nothing is reconnected for it.
    cim_io::tls::reload::spawn_reloader(
        d.server_tls(index).reloadables(),
        Duration::from_millis(50),
        tokio_util::sync::CancellationToken::new(),
    );
    let mut renewed = LeafSpec::new(HOSTS, Some(Role::Server));
    renewed.days_from_now = (-1, 90);
    let fresh = pki.ca.issue(&renewed).unwrap();
    let settings = gateway.settings().clone();
    replace(&settings.key, &fresh.key);
    replace(&settings.cert, &fresh.cert);
    eventually("the renewed certificate is in use", || {
        load_i64(&gateway.stats().cert_not_after) > expiry_before
    })
    .await;

    // The session that was open goes on without a reconnect.
    client
        .send(ConvId::All, Bytes::from("still here"))
        .await
        .unwrap();
    loop {
        match next_event(&mut events).await {
            ClientEvent::Message(m) if m.body.as_ref() == b"still here" => break,
            event @ (ClientEvent::Reconnecting { .. } | ClientEvent::Online { .. }) => {
                panic!("the session reconnected: {event:?}")
            }
            _ => {}
        }
    }

    // A new handshake gets the renewed certificate.
    let stream = TcpStream::connect(gateway_addr).await.unwrap();
    let tls = trust.connect(stream, "127.0.0.1").await.unwrap();
    assert_eq!(
        peer_not_after(&tls),
        load_i64(&gateway.stats().cert_not_after)
    );

    // A broken file is refused; the renewed certificate stays in use.
    let failures = load(&gateway.stats().reload_failures);
    std::fs::write(&settings.cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
    assert!(gateway.reload().is_err());
    assert_eq!(load(&gateway.stats().reload_failures), failures + 1);
    let stream = TcpStream::connect(gateway_addr).await.unwrap();
    let tls = trust.connect(stream, "127.0.0.1").await.unwrap();
    assert_eq!(
        peer_not_after(&tls),
        load_i64(&gateway.stats().cert_not_after)
    );
    client.shutdown().await;
}

fn load_i64(stat: &std::sync::atomic::AtomicI64) -> i64 {
    stat.load(Ordering::Relaxed)
}

/// Writes a file the way a certificate tool does: a new file moved into place.
fn replace(path: &Path, text: &str) {
    let partial = path.with_extension("new");
    std::fs::write(&partial, text).unwrap();
    std::fs::rename(partial, path).unwrap();
}

fn peer_not_after(tls: &cim_io::tls::MaybeTls<TcpStream>) -> i64 {
    let cim_io::tls::MaybeTls::Client(tls) = tls else {
        panic!("not a TLS client stream")
    };
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    cert_info(leaf).unwrap().not_after
}

/// A lone TLS gateway with a short handshake timeout, for the bad-input cases.
async fn lone_server(
    pki: &Pki,
    tweak: impl FnOnce(&mut ServerTlsSettings),
) -> (Deployment, Arc<TlsStats>) {
    let (cert, key) = pki.leaf("lone", &LeafSpec::new(HOSTS, Some(Role::Server)));
    let mut gateway = ServerTlsSettings::new("gateway", cert, key);
    gateway.handshake_timeout = Duration::from_millis(300);
    tweak(&mut gateway);
    let gateway = ServerTls::load(gateway).unwrap();
    let stats = gateway.stats().clone();
    let mut d = Deployment::new();
    let side = ServerSide {
        link: gateway.clone(),
        gateway,
    };
    d.server("lone", Some(side)).await;
    (d, stats)
}

/// Reads until the peer closes; panics if it does not within `WAIT`.
async fn closed_promptly(stream: &mut TcpStream) {
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was left open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_on_a_tls_port_is_closed_and_counted() {
    let pki = Pki::new("plain-on-tls");
    let (d, stats) = lone_server(&pki, |_| {}).await;
    let mut stream = TcpStream::connect(d.servers[0].0.client_addr())
        .await
        .unwrap();
    // A plaintext frame: a length prefix and a protobuf Login.
    stream
        .write_all(&[0x05, 0x0a, 0x03, 0x08, 0x01, 0x10])
        .await
        .unwrap();
    closed_promptly(&mut stream).await;
    eventually("the refusal is counted", || {
        load(&stats.plaintext_refused) == 1
    })
    .await;
    // And the port still serves TLS clients.
    let stream = TcpStream::connect(d.servers[0].0.client_addr())
        .await
        .unwrap();
    pki.client().connect(stream, "127.0.0.1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_on_a_plaintext_port_fails_promptly() {
    let pki = Pki::new("tls-on-plain");
    let mut d = Deployment::new();
    d.server("plain", None).await;
    let stream = TcpStream::connect(d.servers[0].0.client_addr())
        .await
        .unwrap();
    let error = tokio::time::timeout(WAIT, pki.client().connect(stream, "127.0.0.1"))
        .await
        .expect("the handshake fails in time, not hangs")
        .expect_err("a plaintext port cannot complete a TLS handshake");
    assert!(error.to_string().contains("127.0.0.1"), "{error}");
    // Counted (and warned about, by the same branch), not taken for garbage.
    let http = d.servers[0].0.http_addr();
    let metrics = HttpClient::new(TokioNet, "127.0.0.1", http.port(), WAIT);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = metrics
            .request(Method::GET, "/metrics", None, None)
            .await
            .expect("GET /metrics");
        let body = String::from_utf8_lossy(&body).into_owned();
        if body.contains("cim_server_client_tls_on_plaintext_total{server_id=\"plain\"} 1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the TLS client was not counted:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_completes_times_out_and_others_are_served() {
    let pki = Pki::new("stall");
    let (d, stats) = lone_server(&pki, |_| {}).await;
    let addr = d.servers[0].0.client_addr();
    // The start of a TLS record, then nothing.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Meanwhile an honest client completes its handshake.
    let stream = TcpStream::connect(addr).await.unwrap();
    pki.client().connect(stream, "127.0.0.1").await.unwrap();
    closed_promptly(&mut stalled).await;
    closed_promptly(&mut silent).await;
    eventually("both timeouts are counted", || {
        load(&stats.handshake_timeouts) == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_wrong_host_and_unknown_ca_certificates_are_refused_by_name() {
    let pki = Pki::new("bad-certs");

    // An expired certificate is refused at load, naming the file.
    let mut expired = LeafSpec::new(HOSTS, Some(Role::Server));
    expired.days_from_now = (-30, -1);
    let (cert, key) = pki.leaf("expired", &expired);
    let error = ServerTls::load(ServerTlsSettings::new("gateway", cert.clone(), key.clone()))
        .expect_err("an expired certificate does not load");
    assert!(matches!(error, TlsError::Expired { .. }), "{error}");
    assert!(error.to_string().contains("expired.pem"), "{error}");
    // A server that presents one anyway (not ours: rustls directly) is refused by the client.
    let addr = raw_tls_server(&cert, &key).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let error = pki.client().connect(stream, "127.0.0.1").await.unwrap_err();
    // A certificate problem, told apart from a cut handshake: retrying will not fix it.
    assert!(matches!(error, ConnectError::Certificate { .. }), "{error}");
    assert!(
        error.to_string().contains("127.0.0.1") && error.to_string().contains("xpired"),
        "{error}"
    );

    // A certificate for another host.
    let (cert, key) = pki.leaf("elsewhere", &LeafSpec::new(&["chat.example"], None));
    let addr = raw_tls_server(&cert, &key).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let error = pki.client().connect(stream, "127.0.0.1").await.unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("127.0.0.1") && text.contains("not valid for name"),
        "{text}"
    );

    // A client without the CA (the system's roots do not know it).
    let (cert, key) = pki.leaf("good", &LeafSpec::new(HOSTS, None));
    let addr = raw_tls_server(&cert, &key).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let other = Pki::new("bad-certs-other").client();
    let error = other.connect(stream, "127.0.0.1").await.unwrap_err();
    assert!(error.to_string().contains("UnknownIssuer"), "{error}");
}

/// A TLS server that presents any certificate (even expired), for the client-side checks.
async fn raw_tls_server(cert: &Path, key: &Path) -> std::net::SocketAddr {
    let certs = cim_io::tls::load_certs(cert).unwrap();
    let key = cim_io::tls::load_key(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(stream).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_takes_tls_and_plaintext_on_the_same_ports() {
    let pki = Pki::new("migration");
    let mut d = Deployment::new();
    let mut flags = pki.flags("s1", Role::Server);
    flags.accept_plaintext = true;
    d.server("s1", ServerSide::load(&flags, "127.0.0.1").unwrap())
        .await;
    // One route not yet switched (plaintext links, plain HTTP), one switched.
    d.route("old", None).await;
    d.route(
        "new",
        RouteSide::load(&pki.flags("new", Role::Route)).unwrap(),
    )
    .await;
    let link = d.server_tls(0).link.stats().clone();
    eventually("both routes linked", || {
        load(&link.plaintext_accepted) >= 1 && load(&link.handshakes) >= 1
    })
    .await;

    // A client of the release before TLS: plain HTTP to the old route, then a plaintext
    // Login frame to `ip:cimServerPort` (it knows nothing of the endpoint's TLS flag).
    let old = d.api(0, None).register("olduser", PASSWORD).await.unwrap();
    let (status, body) = HttpClient::new(TokioNet, "127.0.0.1", d.route_port(0), WAIT)
        .request(
            Method::POST,
            "/login",
            None,
            Some(Bytes::from(
                serde_json::to_vec(&api::LoginRequest {
                    resume_secret: None,
                    user_id: old.user_id,
                    user_name: "olduser".into(),
                    password: PASSWORD.into(),
                    resume_token: None,
                })
                .unwrap(),
            )),
        )
        .await
        .unwrap();
    assert!(status.is_success(), "{status}: {body:?}");
    let answer: api::Envelope<api::LoginResponse> = serde_json::from_slice(&body).unwrap();
    let answer = answer.data_body.unwrap();
    assert_eq!(answer.endpoint.as_ref().map(|e| e.tls), Some(true));
    let stream = TcpStream::connect(("127.0.0.1", answer.cim_server_port))
        .await
        .unwrap();
    let (mut reader, mut writer) = net::framed(stream, FrameCodec::default());
    let login = Frame {
        kind: Some(Kind::Login(cim_proto::Login {
            ticket: Some(api::decode_ticket(&answer.ticket).unwrap()),
        })),
    };
    writer.write_frame(&login, WAIT).await.unwrap();
    let reply = reader.read_frame(WAIT).await.unwrap();
    assert!(matches!(reply.kind, Some(Kind::LoginOk(_))), "{reply:?}");
    let gateway = d.server_tls(0).gateway.stats().clone();
    assert_eq!(load(&gateway.plaintext_accepted), 1);

    // A switched client over the switched route: TLS all the way.
    let trust = pki.client();
    let new = d
        .api(1, Some(&trust))
        .register("newuser", PASSWORD)
        .await
        .unwrap();
    let (new_client, mut new_events) = d.client(1, UserId(new.user_id), "newuser", sdk_tls(&trust));
    online(&mut new_events).await;
    assert!(load(&gateway.handshakes) >= 1);
    new_client
        .send(ConvId::All, Bytes::from("from TLS"))
        .await
        .unwrap();
    // The plaintext session receives it.
    loop {
        let frame = reader.read_frame(WAIT).await.unwrap();
        if let Some(Kind::Deliver(deliver)) = frame.kind
            && deliver
                .message
                .is_some_and(|m| m.body.as_ref() == b"from TLS")
        {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reached_the_route_over_tls_never_chats_in_plaintext() {
    let pki = Pki::new("downgrade");
    let mut d = Deployment::new();
    d.server("plain", None).await;
    // A route that answers over HTTPS but names a plaintext server (a misconfiguration, or
    // an attacker who holds a route certificate): HTTPS only, plaintext links.
    let https = RouteSide::load(&pki.flags("r1", Role::Route))
        .unwrap()
        .unwrap()
        .https;
    let mut options = route_options("r1");
    options.https = Some(https);
    d.route_with(options, None).await;
    let trust = pki.client();
    let registered = d
        .api(0, Some(&trust))
        .register("dora", PASSWORD)
        .await
        .unwrap();
    let (client, mut events) = d.client(0, UserId(registered.user_id), "dora", sdk_tls(&trust));
    // No plaintext chat, and no silent retry loop either: the session stops and says why.
    loop {
        match next_event(&mut events).await {
            ClientEvent::Online { .. } => panic!("went online with a plaintext server"),
            ClientEvent::Reconnecting { cause, .. } => panic!("retried: {cause:?}"),
            ClientEvent::TlsFailed { host, reason } => {
                assert_eq!(host, "127.0.0.1");
                assert!(reason.contains("without TLS"), "{reason}");
                break;
            }
            _ => {}
        }
    }
    assert_eq!(
        next_event(&mut events).await,
        ClientEvent::Stopped(StopReason::TlsFailed)
    );
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificates() {
    let pki = Pki::new("sighup");
    let (cert, key) = pki.leaf("gateway", &LeafSpec::new(HOSTS, Some(Role::Server)));
    let gateway =
        ServerTls::load(ServerTlsSettings::new("gateway", cert.clone(), key.clone())).unwrap();
    // The file watcher would take an hour: only the signal can explain a reload.
    cim_io::tls::reload::spawn_reloader(
        vec![cim_io::tls::reload::Reloadable::Server(gateway.clone())],
        Duration::from_secs(3600),
        tokio_util::sync::CancellationToken::new(),
    );
    let before = load_i64(&gateway.stats().cert_not_after);
    let mut renewed = LeafSpec::new(HOSTS, Some(Role::Server));
    renewed.days_from_now = (-1, 120);
    let fresh = pki.ca.issue(&renewed).unwrap();
    replace(&key, &fresh.key);
    replace(&cert, &fresh.cert);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    eventually("SIGHUP reloaded the certificate", || {
        load(&gateway.stats().reloads) == 1 && load_i64(&gateway.stats().cert_not_after) > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_no_peer_would_accept_is_refused_by_both_listeners_alike() {
    let pki = Pki::new("consistent");
    let flags = pki.flags("s1", Role::Server);
    // Not valid for the advertised host: refused at start, naming the host.
    let error = ServerSide::load(&flags, "chat.example").unwrap_err();
    assert!(error.to_string().contains("chat.example"), "{error}");

    let side = ServerSide::load(&flags, "127.0.0.1").unwrap().unwrap();
    let (gateway, link) = (side.gateway.stats().clone(), side.link.stats().clone());
    // A route's certificate written over the server's: the link would refuse it, so the
    // gateway must too (no half-applied reload).
    let wrong_role = pki
        .ca
        .issue(&LeafSpec::new(HOSTS, Some(Role::Route)))
        .unwrap();
    replace(flags.key.as_ref().unwrap(), &wrong_role.key);
    replace(flags.cert.as_ref().unwrap(), &wrong_role.cert);
    assert!(side.gateway.reload().is_err());
    assert!(side.link.reload().is_err());
    // A certificate for another host: refused by both.
    let elsewhere = pki
        .ca
        .issue(&LeafSpec::new(&["chat.example"], Some(Role::Server)))
        .unwrap();
    replace(flags.key.as_ref().unwrap(), &elsewhere.key);
    replace(flags.cert.as_ref().unwrap(), &elsewhere.cert);
    assert!(side.gateway.reload().is_err());
    assert!(side.link.reload().is_err());
    assert_eq!((load(&gateway.reloads), load(&link.reloads)), (0, 0));
    assert_eq!(
        (load(&gateway.reload_failures), load(&link.reload_failures)),
        (2, 2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_listener_at_its_cap_closes_without_plaintext() {
    let pki = Pki::new("https-cap");
    let mut d = Deployment::new();
    let https = RouteSide::load(&pki.flags("r1", Role::Route))
        .unwrap()
        .unwrap()
        .https;
    let mut options = route_options("r1");
    options.https = Some(https);
    options.http.max_connections = 1;
    let addr = d.route_with(options, None).await;
    // The one place, held by a client that has not even started its handshake. The route
    // accepts in order and counts it before it accepts the next.
    let _held = TcpStream::connect(addr).await.unwrap();
    let mut refused = TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, refused.read_to_end(&mut buf))
        .await
        .expect("closed in time");
    assert!(
        read.is_err() || buf.is_empty(),
        "plaintext on an HTTPS port: {buf:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_https_client_is_closed_and_counted_as_a_handshake_timeout() {
    let pki = Pki::new("https-silent");
    let mut d = Deployment::new();
    let https = RouteSide::load(&pki.flags("r1", Role::Route))
        .unwrap()
        .unwrap()
        .https;
    let stats = https.stats().clone();
    let mut options = route_options("r1");
    options.https = Some(https);
    // The HTTP server's own deadline runs out before the handshake's.
    options.http.header_timeout = Duration::from_millis(200);
    let addr = d.route_with(options, None).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    closed_promptly(&mut silent).await;
    eventually("the silent client counts as a handshake timeout", || {
        load(&stats.handshake_timeouts) == 1
    })
    .await;
    assert_eq!(load(&stats.handshake_failures), 0);
}

/// A scheme mistake stops the client at once, naming the host and the reason, in either
/// direction: `https://` to a plaintext route (which names and counts the TLS client) and
/// `http://` to an HTTPS-only one (which answers 400 / 4260 in plaintext). Neither loops
/// on reconnects, and both routes keep serving everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheme_mistake_stops_the_client_and_the_route_names_it() {
    let pki = Pki::new("scheme");
    let mut d = Deployment::new();
    d.server("plain", None).await;
    d.route("plain-route", None).await;
    let https = RouteSide::load(&pki.flags("r1", Role::Route))
        .unwrap()
        .unwrap()
        .https;
    let mut options = route_options("https-route");
    options.https = Some(https.clone());
    d.route_with(options, None).await;
    let trust = pki.client();

    let stops_with = |mut events: Events, says: &'static str| async move {
        loop {
            match next_event(&mut events).await {
                ClientEvent::TlsFailed { host, reason } => {
                    assert_eq!(host, "127.0.0.1");
                    assert!(reason.contains(says), "{reason}");
                    break;
                }
                ClientEvent::Reconnecting { cause, .. } => panic!("retried: {cause:?}"),
                _ => {}
            }
        }
        assert_eq!(
            next_event(&mut events).await,
            ClientEvent::Stopped(StopReason::TlsFailed)
        );
    };

    // https:// to the plaintext route.
    let (client, events) = d.client(0, UserId(1), "nobody", sdk_tls(&trust));
    stops_with(events, "http://").await;
    client.shutdown().await;
    let plain_api = HttpClient::new(TokioNet, "127.0.0.1", d.route_port(0), WAIT);
    let (status, metrics) = plain_api
        .request(Method::GET, "/metrics", None, None)
        .await
        .expect("the plaintext route still serves");
    assert_eq!(status, 200);
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("cim_route_http_tls_on_plaintext_total{route_id=\"plain-route\"} 1"),
        "{metrics}"
    );

    // http:// to the HTTPS-only route.
    let (client, events) = d.client(1, UserId(1), "nobody", None);
    stops_with(events, "https://").await;
    client.shutdown().await;
    let refused = https.stats().plaintext_refused.load(Ordering::Relaxed);
    assert_eq!(refused, 1);
    let (status, body) = HttpClient::new(TokioNet, "127.0.0.1", d.route_port(1), WAIT)
        .request(Method::GET, "/openapi.json", None, None)
        .await
        .expect("a plain request is answered, not cut");
    assert_eq!(status, 400);
    let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(envelope["code"], api::CODE_HTTPS_REQUIRED, "{envelope}");
    let (status, _) = HttpClient::new(TokioNet, "127.0.0.1", d.route_port(1), WAIT)
        .with_tls(trust.clone())
        .request(Method::GET, "/openapi.json", None, None)
        .await
        .expect("the HTTPS route still serves");
    assert_eq!(status, 200);
}
