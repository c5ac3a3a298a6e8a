//! The route's HTTP listener under a slowloris attack, against a running route over real
//! sockets: slow request heads and idle keep-alive connections are closed after their
//! timeouts while `/health` and registrations keep answering; connections past the cap are
//! answered 503 and closed at once while the ones already open keep working; the cap never
//! exceeds what the open-file limit allows.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cim_core::accounts::PasswordParams;
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::tickets::TicketKeys;
use cim_io::clock::Clock;
use cim_io::http_client::HttpClient;
use cim_io::net::TokioNet;
use cim_io::registry::MemoryRegistry;
use cim_io::route::{self, RouteHandle, RouteOptions};
use cim_io::store::MemoryBackend;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Guards every wait of these tests, so a listener that never closes a connection fails the
/// test instead of hanging it. Far longer than any timeout configured below.
const GUARD: Duration = Duration::from_secs(60);

/// A running route (and the registry it watches, kept alive with it).
async fn start(configure: impl FnOnce(&mut RouteOptions)) -> (RouteHandle, MemoryRegistry) {
    let keys = TicketKeys::new(1, b"ticket-secret-http".to_vec());
    let mut o = RouteOptions::new(
        "r1",
        keys,
        b"bearer-secret-http".to_vec(),
        b"link-secret-http".to_vec(),
    );
    o.http_listen = "127.0.0.1:0".parse().unwrap();
    o.login.password = PasswordParams::for_tests();
    configure(&mut o);
    let store = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
    let registry = MemoryRegistry::new();
    let route = route::start(TokioNet, Clock::System, o, store, &registry)
        .await
        .expect("route starts");
    (route, registry)
}

fn client(route: &RouteHandle) -> HttpClient<TokioNet> {
    HttpClient::new(TokioNet, "127.0.0.1", route.http_addr().port(), GUARD)
}

async fn health(http: &HttpClient<TokioNet>) -> StatusCode {
    http.request(Method::GET, "/health", None, None)
        .await
        .expect("/health answers")
        .0
}

async fn register(http: &HttpClient<TokioNet>, name: &str) -> Value {
    let body = json!({"userName": name, "password": "a-long-password"});
    let (status, body) = http
        .request(
            Method::POST,
            "/registerAccount",
            None,
            Some(Bytes::from(body.to_string())),
        )
        .await
        .expect("/registerAccount answers");
    assert_eq!(status, StatusCode::OK);
    serde_json::from_slice(&body).unwrap()
}

/// A metric's value from a `/metrics` text.
fn metric(text: &str, name: &str) -> u64 {
    let prefix = format!("{name}{{route_id=\"r1\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .parse()
        .unwrap()
}

/// A kept-alive HTTP/1.1 connection: every request goes over the same socket.
async fn keep_alive(route: &RouteHandle) -> SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(route.http_addr()).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn get_on(sender: &mut SendRequest<Empty<Bytes>>, path: &str) -> (StatusCode, String) {
    sender
        .ready()
        .await
        .expect("the kept-alive connection is open");
    let request = Request::get(path)
        .header("host", "route")
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.expect("answered");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Reads until the server closes the connection (EOF or reset) and returns what it sent.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends a request head one byte at a time, never finishing it, until the server closes
/// the connection. Returns whether it did (the attacker's view).
async fn slowloris(addr: std::net::SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    let head =
        b"GET /health HTTP/1.1\r\nhost: route\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let (mut read, mut write) = stream.split();
    let dribble = async {
        for byte in head.iter().cycle() {
            if write.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let mut buf = [0u8; 64];
    tokio::select! {
        read = read.read(&mut buf) => matches!(read, Ok(0) | Err(_)),
        () = dribble => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_heads_are_closed_after_the_header_timeout_while_others_are_served() {
    const SLOW: usize = 200;
    let (route, _registry) = start(|o| {
        o.http.header_timeout = Duration::from_secs(1);
        o.http.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let http = client(&route);
    let addr = route.http_addr();
    let mut attackers = JoinSet::new();
    for _ in 0..SLOW {
        attackers.spawn(slowloris(addr));
    }
    // A silent connection (not one byte) is closed by the same header timeout.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // So is half a TLS record header (the listener reads two bytes to tell TLS from HTTP).
    let mut half_hello = TcpStream::connect(addr).await.unwrap();
    half_hello.write_all(&[0x16]).await.unwrap();

    // While they dribble, everyone else is served.
    assert_eq!(health(&http).await, StatusCode::OK);
    let registered = register(&http, "while-slow").await;
    assert_eq!(registered["code"], "9000", "{registered}");

    let closed = tokio::time::timeout(GUARD, async {
        let mut closed = 0;
        while let Some(result) = attackers.join_next().await {
            closed += usize::from(result.unwrap());
        }
        closed
    })
    .await
    .expect("slow connections were held open: no header timeout");
    assert_eq!(
        closed, SLOW,
        "every slow connection was closed by the server"
    );
    let sent = tokio::time::timeout(GUARD, until_closed(&mut silent))
        .await
        .expect("a silent connection was held open");
    assert!(sent.is_empty(), "nothing is answered to an unfinished head");
    let sent = tokio::time::timeout(GUARD, until_closed(&mut half_hello))
        .await
        .expect("half a TLS record header was held open");
    assert!(
        sent.is_empty(),
        "nothing is answered to half a record header"
    );

    // An idle kept-alive connection is closed after the idle timeout.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: route\r\n\r\n")
        .await
        .unwrap();
    let answered = tokio::time::timeout(GUARD, until_closed(&mut idle))
        .await
        .expect("an idle keep-alive connection was held open");
    let answered = String::from_utf8_lossy(&answered);
    assert!(answered.starts_with("HTTP/1.1 200 OK"), "{answered}");
    assert!(
        !answered.contains("connection: close"),
        "kept alive: {answered}"
    );

    let (status, text) = http
        .request(Method::GET, "/metrics", None, None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(text.to_vec()).unwrap();
    assert!(
        // Every slow connection, the silent one and the half header.
        metric(&text, "cim_route_http_header_timeouts_total") > SLOW as u64 + 1,
        "{text}"
    );
    assert!(
        metric(&text, "cim_route_http_idle_timeouts_total") >= 1,
        "{text}"
    );
    route.abort();
}

#[tokio::test]
async fn a_slow_request_body_is_refused_after_the_header_timeout() {
    let (route, _registry) = start(|o| {
        o.http.header_timeout = Duration::from_secs(1);
        o.http.idle_timeout = Duration::from_secs(3600);
    })
    .await;
    let mut stream = TcpStream::connect(route.http_addr()).await.unwrap();
    stream
        .write_all(
            b"POST /registerAccount HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n\
              content-length: 60\r\n\r\n{\"userName\"",
        )
        .await
        .unwrap();
    // The rest of the body never comes: the answer does, and the connection closes.
    let answer = tokio::time::timeout(GUARD, until_closed(&mut stream))
        .await
        .expect("a slow body held the connection");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("the request body did not arrive in time"),
        "{answer}"
    );
    route.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_refused_at_once_while_open_ones_keep_working() {
    const CAP: usize = 20;
    let (route, _registry) = start(|o| {
        o.http.max_connections = CAP;
        // Nothing times out during this test: only the cap can close a connection.
        o.http.header_timeout = Duration::from_secs(3600);
        o.http.idle_timeout = Duration::from_secs(3600);
    })
    .await;
    let addr = route.http_addr();
    let mut operator = keep_alive(&route).await;
    let mut holders = Vec::new();
    for _ in 1..CAP {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET /health HTTP/1.1\r\n").await.unwrap();
        holders.push(stream);
    }
    let open = |text: &str| metric(text, "cim_route_http_connections");
    // The kernel completes connects before the route accepts them: wait for the gauge.
    tokio::time::timeout(GUARD, async {
        while open(&get_on(&mut operator, "/metrics").await.1) < CAP as u64 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the route accepted the connections up to its cap");

    // Past the cap: a 503 and the connection closed, at once (no timeout could close it).
    for _ in 0..5 {
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let _ = extra
            .write_all(b"GET /health HTTP/1.1\r\nhost: r\r\n\r\n")
            .await;
        let answer = tokio::time::timeout(GUARD, until_closed(&mut extra))
            .await
            .expect("a connection past the cap was held open");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 503"),
            "{answer}"
        );
    }
    // The connections already open keep working.
    let (status, text) = get_on(&mut operator, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(open(&text), CAP as u64);
    assert_eq!(metric(&text, "cim_route_http_connections_refused_total"), 5);
    assert_eq!(metric(&text, "cim_route_http_max_connections"), CAP as u64);
    let (status, _) = get_on(&mut operator, "/health").await;
    assert_eq!(status, StatusCode::OK);

    // Closing some frees their places for new clients.
    holders.truncate(CAP - 6);
    tokio::time::timeout(GUARD, async {
        while open(&get_on(&mut operator, "/metrics").await.1) > CAP as u64 - 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("closed connections leave the count");
    assert_eq!(health(&client(&route)).await, StatusCode::OK);
    route.abort();
}

#[tokio::test]
async fn the_cap_is_clamped_to_the_open_file_limit_and_shown_in_metrics() {
    let (route, _registry) = start(|o| o.http.max_connections = usize::MAX).await;
    let limit = cim_io::fd_limit::file_limit().expect("unix has an open-file limit");
    let (status, text) = client(&route)
        .request(Method::GET, "/metrics", None, None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let cap = metric(
        std::str::from_utf8(&text).unwrap(),
        "cim_route_http_max_connections",
    );
    assert_eq!(cap, cim_io::fd_limit::connection_budget(limit) as u64);
    assert!(cap < limit, "{cap} under the limit {limit}");
    route.abort();
}

#[tokio::test]
async fn zero_limits_are_refused_at_start() {
    for configure in [
        (|o: &mut RouteOptions| o.http.max_connections = 0) as fn(&mut RouteOptions),
        |o| o.http.header_timeout = Duration::ZERO,
        |o| o.http.idle_timeout = Duration::ZERO,
    ] {
        let keys = TicketKeys::new(1, b"ticket-secret-http".to_vec());
        let mut o = RouteOptions::new("r1", keys, b"b".repeat(16), b"l".repeat(16));
        o.http_listen = "127.0.0.1:0".parse().unwrap();
        configure(&mut o);
        let store = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
        let error = route::start(TokioNet, Clock::System, o, store, &MemoryRegistry::new())
            .await
            .expect_err("refused");
        assert!(error.to_string().contains("above zero"), "{error}");
    }
}
