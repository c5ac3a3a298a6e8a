//! Item 9 (presence): `/onlineUser` (the console's `:olu`) must not list users whose server
//! is gone. Before, a crashed server's users stayed "online" until their leases ran out
//! (30 s by default), also while every server was dead.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cim_core::accounts::PasswordParams;
use cim_core::client::{ClientConfig, ClientEvent};
use cim_core::ids::ServerId;
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_io::clock::Clock;
use cim_io::http_client::HttpClient;
use cim_io::net::TokioNet;
use cim_io::registry::{MemoryRegistry, Registry};
use cim_io::route::{self, RouteOptions};
use cim_io::sdk::{Client, SdkOptions};
use cim_io::server::{self, ServerOptions};
use cim_io::store::MemoryBackend;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);
const PASSWORD: &str = "pw-123456";

async fn call(
    http: &HttpClient<TokioNet>,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> Value {
    let body = (method == Method::POST).then(|| Bytes::from(body.to_string()));
    let (status, bytes) = http
        .request(method, path, token, body)
        .await
        .expect("request");
    assert_eq!(status, StatusCode::OK, "{path}: {bytes:?}");
    serde_json::from_slice(&bytes).expect("json")
}

#[tokio::test]
async fn online_users_leave_with_their_server() {
    let store = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
    let registry = MemoryRegistry::new();
    let view = registry.watch().await.unwrap();
    let mut servers = Vec::new();
    for id in ["s1", "s2"] {
        let node = ServerConfig::new(ServerId::new(id), TicketKeys::new(1, b"t".repeat(16)));
        let mut options = ServerOptions::new(node, b"l".repeat(16));
        options.listen_ip = [127, 0, 0, 1].into();
        (options.client_port, options.link_port, options.http_port) = (0, 0, 0);
        servers.push(
            server::start(TokioNet, Clock::System, options, store.clone(), &registry)
                .await
                .expect("server"),
        );
    }
    let mut o = RouteOptions::new(
        "r1",
        TicketKeys::new(1, b"t".repeat(16)),
        b"b".repeat(16),
        b"l".repeat(16),
    );
    o.http_listen = "127.0.0.1:0".parse().unwrap();
    o.login.password = PasswordParams::for_tests();
    let route = route::start(TokioNet, Clock::System, o, store.clone(), &registry)
        .await
        .expect("route");
    let http = HttpClient::new(TokioNet, "127.0.0.1", route.http_addr().port(), WAIT);

    // alice online through the SDK; bob logged in over HTTP only (his token asks).
    let mut ids = Vec::new();
    for name in ["alice", "bob"] {
        let v = call(
            &http,
            Method::POST,
            "/registerAccount",
            None,
            json!({"userName": name, "password": PASSWORD}),
        )
        .await;
        ids.push(v["dataBody"]["userId"].as_u64().unwrap());
    }
    let options = SdkOptions {
        route_host: "127.0.0.1".into(),
        route_port: route.http_addr().port(),
        session: ClientConfig::new(cim_core::ids::UserId(ids[0]), "alice", PASSWORD, 1),
        state: None,
        max_frame: cim_proto::codec::DEFAULT_MAX_FRAME,
        server_transport: Default::default(),
        entropy: None,
        tls: None,
    };
    let (_alice, mut events) = Client::start(TokioNet, Clock::System, options);
    let server_of_alice = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            if let ClientEvent::Online { server, .. } = event {
                return server;
            }
        }
        panic!("no online");
    })
    .await
    .expect("alice online");
    let v = call(
        &http,
        Method::POST,
        "/login",
        None,
        json!({"userId": ids[1], "userName": "bob", "password": PASSWORD}),
    )
    .await;
    let token = v["dataBody"]["token"].as_str().unwrap().to_owned();
    let online = |http| {
        let token = token.clone();
        async move {
            let v = call(http, Method::GET, "/onlineUser", Some(&token), Value::Null).await;
            v["dataBody"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["userName"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(online(&http).await, vec!["alice".to_owned()]);

    // alice's server dies (bob's claim is on a server too; his token keeps working until
    // his own lease lapses).
    let index = servers
        .iter()
        .position(|s| s.server_id() == &server_of_alice)
        .expect("alice's server");
    servers.remove(index).abort();
    view.wait_until(WAIT, |m| !m.contains_key(&server_of_alice))
        .await
        .expect("left the registry");
    assert_eq!(
        online(&http).await,
        Vec::<String>::new(),
        "alice's lease is still running, but her server is gone"
    );
}
