//! The probes a load balancer and monitoring act on: `/health/live` and `/health/ready` on a
//! route and a server, with status codes and reasons in words (never Rust debug output); a
//! route whose every link fails authentication is unready and says the link secret is the
//! likely cause; a route that goes away in the middle of the link handshake (killed,
//! restarted) is not counted as a link authentication failure.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cim_core::ids::ServerId;
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_io::clock::Clock;
use cim_io::http_client::HttpClient;
use cim_io::net::TokioNet;
use cim_io::registry::MemoryRegistry;
use cim_io::route::{self, RouteHandle, RouteOptions};
use cim_io::server::{self, ServerHandle, ServerOptions};
use cim_io::store::{MemoryBackend, Store};
use hyper::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TICKET_SECRET: &[u8] = b"probe-test-ticket-secret";
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Every wait in these tests is bounded by this.
const LIMIT: Duration = Duration::from_secs(20);

async fn start_server(
    store: Arc<dyn Store>,
    registry: &MemoryRegistry,
    link_secret: &[u8],
) -> ServerHandle {
    start_server_named("s1", store, registry, link_secret).await
}

async fn start_server_named(
    id: &str,
    store: Arc<dyn Store>,
    registry: &MemoryRegistry,
    link_secret: &[u8],
) -> ServerHandle {
    let node = ServerConfig::new(ServerId::new(id), TicketKeys::new(1, TICKET_SECRET));
    let mut options = ServerOptions::new(node, link_secret.to_vec());
    options.listen_ip = LOCALHOST;
    (options.client_port, options.link_port, options.http_port) = (0, 0, 0);
    server::start(TokioNet, Clock::System, options, store, registry)
        .await
        .expect("server starts")
}

async fn start_route(
    store: Arc<dyn Store>,
    registry: &MemoryRegistry,
    link_secret: &[u8],
) -> RouteHandle {
    let mut options = RouteOptions::new(
        "r1",
        TicketKeys::new(1, TICKET_SECRET),
        b"probe-test-bearer-secret".to_vec(),
        link_secret.to_vec(),
    );
    options.http_listen = SocketAddr::new(LOCALHOST, 0);
    options.link_retry_delay = Duration::from_millis(50);
    route::start(TokioNet, Clock::System, options, store, registry)
        .await
        .expect("route starts")
}

async fn get(port: u16, path: &str) -> (StatusCode, String) {
    let http = HttpClient::new(TokioNet, "127.0.0.1", port, Duration::from_secs(5));
    let (status, body) = http
        .request(Method::GET, path, None, None)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (status, String::from_utf8(body.to_vec()).expect("utf-8"))
}

async fn get_json(port: u16, path: &str) -> (StatusCode, Value) {
    let (status, body) = get(port, path).await;
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    (status, value)
}

/// Polls `path` until `done` holds of its answer, for at most [`LIMIT`].
async fn wait_for(port: u16, path: &str, done: impl Fn(StatusCode, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let (status, value) = get_json(port, path).await;
        if done(status, &value) {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} still {status} {value} after {LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn memory_store() -> Arc<dyn Store> {
    Arc::new(MemoryBackend::new(MemoryStoreConfig::default()))
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|line| line.starts_with(name) && !line.starts_with('#'))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_whose_links_all_fail_authentication_is_unready_and_names_the_secret() {
    let store = memory_store();
    let registry = MemoryRegistry::new();
    let server = start_server(store.clone(), &registry, b"the-servers-link-secret").await;
    let route = start_route(store, &registry, b"another-link-secret-entirely").await;
    let port = route.http_addr().port();

    let unready = wait_for(port, "/health/ready", |status, _| {
        status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert_eq!(unready["status"], "degraded", "{unready}");
    let reasons = unready["failing"].to_string();
    assert!(
        reasons.contains("no link to any of the 1 live server is up")
            && reasons.contains("CIM_LINK_SECRET"),
        "{unready}"
    );
    // The same verdict on the old path, which load balancers already probe.
    let (status, _) = get(port, "/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Alive all the same: restarting the route would not help.
    let (status, live) = get_json(port, "/health/live").await;
    assert_eq!((status, &live["status"]), (StatusCode::OK, &"live".into()));
    route.abort();

    // The same route with the right secret is ready, and so is the server.
    let store = memory_store();
    let registry = MemoryRegistry::new();
    drop(server);
    let server = start_server(store.clone(), &registry, b"the-servers-link-secret").await;
    let route = start_route(store, &registry, b"the-servers-link-secret").await;
    let ready = wait_for(route.http_addr().port(), "/health/ready", |status, _| {
        status == StatusCode::OK
    })
    .await;
    assert_eq!(ready, serde_json::json!({"status": "ok"}));
    let server_port = server.http_addr().port();
    let (status, ready) = get_json(server_port, "/health/ready").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(
        (&ready["ready"], &ready["status"]),
        (&true.into(), &"ok".into())
    );
    let (status, live) = get_json(server_port, "/health/live").await;
    assert_eq!((status, &live["status"]), (StatusCode::OK, &"live".into()));

    // Told to stop (SIGTERM with --shutdown-delay): unready first, still serving.
    let port = route.http_addr().port();
    route.begin_drain();
    let (status, unready) = get_json(port, "/health/ready").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{unready}");
    assert!(
        unready["failing"].to_string().contains("draining"),
        "{unready}"
    );
    let (status, _) = get(port, "/openapi.json").await;
    assert_eq!(status, StatusCode::OK, "a draining route still serves");
    let (status, _) = get_json(port, "/health/live").await;
    assert_eq!(status, StatusCode::OK);
    route.abort();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_gone_mid_handshake_is_no_link_auth_failure_but_a_wrong_proof_is() {
    let store = memory_store();
    let registry = MemoryRegistry::new();
    let server = start_server(store, &registry, b"the-servers-link-secret").await;
    let link_port = server.link_addr().port();
    let http_port = server.http_addr().port();

    // A route killed (or restarted) while dialling: it connects, reads the hello, and goes.
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", link_port))
            .await
            .expect("dial the link port");
        let mut hello = [0u8; 8];
        let _ = tokio::time::timeout(LIMIT, stream.read(&mut hello)).await;
        drop(stream);
    }
    // And one that never even waits for the hello.
    drop(
        tokio::net::TcpStream::connect(("127.0.0.1", link_port))
            .await
            .expect("dial"),
    );

    // A peer that answers the hello with garbage is refused and counted: wait for that
    // count, which also proves the goodbyes above were handled (the server serves its link
    // port in order of arrival, each on its own task; give them the same bounded wait).
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", link_port))
        .await
        .expect("dial");
    let mut hello = [0u8; 8];
    let _ = tokio::time::timeout(LIMIT, stream.read(&mut hello)).await;
    // A frame that is no LinkAuth: length 2 (a varint), then one protobuf field.
    let _ = stream.write_all(&[0x02, 0x08, 0x01]).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let text = loop {
        let (_, text) = get(http_port, "/metrics").await;
        if metric(&text, "cim_server_link_auth_failures_total") >= 1 {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        metric(&text, "cim_server_link_auth_failures_total"),
        1,
        "only the wrong proof counts:\n{text}"
    );
    server.abort();
}

async fn post_json(port: u16, path: &str, body: Value) -> Value {
    let http = HttpClient::new(TokioNet, "127.0.0.1", port, Duration::from_secs(5));
    let (status, answer) = http
        .request(
            Method::POST,
            path,
            None,
            Some(serde_json::to_vec(&body).expect("json").into()),
        )
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let value: Value = serde_json::from_slice(&answer).expect("a JSON envelope");
    assert_eq!(status, StatusCode::OK, "{path}: {value}");
    value["dataBody"].clone()
}

/// A server whose link never authenticates (a wrong link secret) stays listed in the
/// registry; while another server is linked, no login is placed on it: its users could not
/// send through the route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_skip_a_server_whose_link_never_came_up() {
    let store = memory_store();
    let registry = MemoryRegistry::new();
    let good = start_server_named("good", store.clone(), &registry, b"the-right-link-secret").await;
    let bad = start_server_named("bad", store.clone(), &registry, b"a-wrong-link-secret!!").await;
    let route = start_route(store, &registry, b"the-right-link-secret").await;
    let port = route.http_addr().port();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let (_, text) = get(port, "/metrics").await;
        if metric(&text, "cim_route_servers_live") == 2 && metric(&text, "cim_route_links_up") == 1
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "links never settled:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Four: within the registration burst; round robin would put two on `bad`.
    for i in 0..4 {
        let name = format!("placed{i}");
        let user = post_json(
            port,
            "/registerAccount",
            serde_json::json!({"userName": name, "password": "placement-pw-1"}),
        )
        .await;
        let login = post_json(
            port,
            "/login",
            serde_json::json!({"userId": user["userId"], "userName": name, "password": "placement-pw-1"}),
        )
        .await;
        assert_eq!(login["serverId"], "good", "{name} was placed: {login}");
    }
    route.abort();
    good.abort();
    bad.abort();
}
