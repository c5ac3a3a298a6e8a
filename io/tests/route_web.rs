//! The web client as the route serves it (`io/src/route/api/web.rs`), over a real socket:
//! the embedded files with their content types, and the page's Content-Security-Policy
//! naming the servers' WebSocket origins. (The page itself is tested in a browser by
//! `web/browser-test/chat.mjs`.)

use std::time::Duration;

use cim_core::accounts::PasswordParams;
use cim_core::ids::ServerId;
use cim_core::memstore::MemoryStoreConfig;
use cim_core::registry::LiveServer;
use cim_core::route::tickets::TicketKeys;
use cim_io::clock::Clock;
use cim_io::net::TokioNet;
use cim_io::registry::{MemoryRegistry, Registry};
use cim_io::route::{self, RouteOptions};
use cim_io::store::MemoryBackend;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// One `GET` on a fresh connection: status, headers (lower-case names), body.
async fn get(port: u16, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .unwrap();
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8(answer[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, answer[split + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
}

#[tokio::test]
async fn the_route_serves_the_web_client_with_its_types_and_policy() {
    let registry = MemoryRegistry::new();
    let _s1 = registry
        .register(LiveServer {
            id: ServerId::new("s1"),
            host: "127.0.0.1".into(),
            client_port: 11211,
            link_port: 1,
            http_port: 8081,
            connections: 0,
            client_tls: false,
            ws_port: Some(11411),
        })
        .await
        .unwrap();
    let keys = TicketKeys::new(1, b"ticket-secret".to_vec());
    let mut options = RouteOptions::new("r1", keys, b"bearer".to_vec(), b"link".to_vec());
    options.http_listen = "127.0.0.1:0".parse().unwrap();
    options.login.password = PasswordParams::for_tests();
    let store = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
    let route = route::start(TokioNet, Clock::System, options, store, &registry)
        .await
        .expect("route starts");
    let port = route.http_addr().port();

    let (status, headers, body) = get(port, "/").await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&headers, "x-content-type-options"), "nosniff");
    let csp = header(&headers, "content-security-policy");
    assert!(
        csp.contains("connect-src 'self' ws://127.0.0.1:11411;"),
        "the live server's WebSocket origin is allowed: {csp}"
    );
    assert!(
        csp.contains("script-src 'self' 'wasm-unsafe-eval';"),
        "{csp}"
    );
    assert!(String::from_utf8(body).unwrap().contains("app.js"));

    for (path, content_type, magic) in [
        ("/app.js", "text/javascript; charset=utf-8", &b""[..]),
        ("/style.css", "text/css; charset=utf-8", b""),
        ("/cim_web_bg.wasm", "application/wasm", b"\0asm"),
    ] {
        let (status, headers, body) = get(port, path).await;
        assert_eq!(status, 200, "{path}");
        assert_eq!(header(&headers, "content-type"), content_type, "{path}");
        assert!(body.len() > 100 && body.starts_with(magic), "{path}");
    }
    // Anything else is still the API's 404 envelope.
    let (status, _, body) = get(port, "/nothing.js").await;
    assert_eq!(status, 404);
    assert!(String::from_utf8(body).unwrap().contains("\"code\""));
}
