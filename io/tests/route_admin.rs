//! Item 16: the route's admin listener, end to end over real sockets: one route and one
//! server in this process on the in-memory store and registry, SDK clients.
//!
//! Covers: off by default and refused without a proper token; every request audited
//! (tracing target `cim::audit`); list (and find by name in any case), show a session,
//! kick, reset a password, delete (tombstone: kicked, tokens dead, nothing stored for it,
//! no login, name taken, id not reused); its own OpenAPI document.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cim_core::accounts::PasswordParams;
use cim_core::client::{ClientConfig, ClientEvent, StopReason};
use cim_core::ids::{ConvId, ServerId, UserId};
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_core::store::{StoreCommand, StoreReply};
use cim_io::clock::Clock;
use cim_io::http_client::HttpClient;
use cim_io::net::TokioNet;
use cim_io::registry::MemoryRegistry;
use cim_io::route::{self, AdminOptions, RouteHandle, RouteOptions};
use cim_io::sdk::{Client, Events, SdkOptions};
use cim_io::server::{self, ServerHandle, ServerOptions};
use cim_io::store::{MemoryBackend, Store};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);

/// One test at a time in this binary. The audit test captures events with a thread-local
/// subscriber (`set_default`); tracing caches each call site's interest, and a call site
/// first reached by another test's thread while that subscriber is being registered can
/// stay cached as "never" — the audit test then saw no lines at all (it flaked under load).
/// The other tests make admin requests too, reaching the same call sites.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const TOKEN: &str = "admin-token-for-tests-0123456789";
const PASSWORD: &str = "pw-123456";

struct Cluster {
    route: RouteHandle,
    _server: ServerHandle,
    store: Arc<MemoryBackend>,
    api: HttpClient<TokioNet>,
    admin: HttpClient<TokioNet>,
}

fn route_options(admin: Option<AdminOptions>) -> RouteOptions {
    let mut o = RouteOptions::new(
        "r1",
        TicketKeys::new(1, b"ticket-secret".to_vec()),
        b"bearer-secret".to_vec(),
        b"link-secret".to_vec(),
    );
    o.http_listen = "127.0.0.1:0".parse().unwrap();
    o.login.password = PasswordParams::for_tests();
    o.link_retry_delay = Duration::from_millis(100);
    o.admin = admin;
    o
}

fn admin_on() -> Option<AdminOptions> {
    Some(AdminOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: TOKEN.as_bytes().to_vec(),
    })
}

impl Cluster {
    async fn start() -> Self {
        let store = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
        let registry = MemoryRegistry::new();
        let node = ServerConfig::new(
            ServerId::new("s1"),
            TicketKeys::new(1, b"ticket-secret".to_vec()),
        );
        let mut options = ServerOptions::new(node, b"link-secret".to_vec());
        options.listen_ip = [127, 0, 0, 1].into();
        (options.client_port, options.link_port, options.http_port) = (0, 0, 0);
        let server = server::start(TokioNet, Clock::System, options, store.clone(), &registry)
            .await
            .expect("server starts");
        let route = route::start(
            TokioNet,
            Clock::System,
            route_options(admin_on()),
            store.clone(),
            &registry,
        )
        .await
        .expect("route starts");
        let api = HttpClient::new(TokioNet, "127.0.0.1", route.http_addr().port(), WAIT);
        let admin_port = route.admin_addr().expect("admin listener on").port();
        let admin = HttpClient::new(TokioNet, "127.0.0.1", admin_port, WAIT);
        Self {
            route,
            _server: server,
            store,
            api,
            admin,
        }
    }

    async fn admin(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let body = body.map(|b| Bytes::from(serde_json::to_vec(&b).unwrap()));
        let (status, bytes) = self
            .admin
            .request(method, path, token, body)
            .await
            .expect("admin request");
        let value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {bytes:?}"));
        (status, value)
    }

    async fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.admin(method, path, Some(TOKEN), body).await;
        assert_eq!(status, StatusCode::OK, "{path}: {v}");
        v
    }

    async fn api(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        let body = Bytes::from(serde_json::to_vec(&body).unwrap());
        let body = (method == Method::POST).then_some(body);
        let (status, bytes) = self
            .api
            .request(method, path, token, body)
            .await
            .expect("api request");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn register(&self, name: &str) -> UserId {
        let (status, v) = self
            .api(
                Method::POST,
                "/registerAccount",
                None,
                json!({"userName": name, "password": PASSWORD}),
            )
            .await;
        assert_eq!(
            (status, v["code"].as_str()),
            (StatusCode::OK, Some("9000")),
            "{v}"
        );
        UserId(v["dataBody"]["userId"].as_u64().unwrap())
    }

    async fn login_code(&self, user: UserId, name: &str, password: &str) -> String {
        let (_, v) = self
            .api(
                Method::POST,
                "/login",
                None,
                json!({"userId": user.0, "userName": name, "password": password}),
            )
            .await;
        v["code"].as_str().unwrap_or_default().to_owned()
    }

    /// An SDK client of `user`, online.
    async fn online(&self, user: UserId, name: &str) -> (Client<TokioNet>, Events) {
        self.online_with(user, name, PASSWORD).await
    }

    async fn online_with(
        &self,
        user: UserId,
        name: &str,
        password: &str,
    ) -> (Client<TokioNet>, Events) {
        let options = SdkOptions {
            route_host: "127.0.0.1".into(),
            route_port: self.route.http_addr().port(),
            session: ClientConfig::new(user, name, password, user.0 + 100),
            state: None,
            max_frame: cim_proto::codec::DEFAULT_MAX_FRAME,
            server_transport: Default::default(),
            entropy: None,
            tls: None,
        };
        let (client, mut events) = Client::start(TokioNet, Clock::System, options);
        tokio::time::timeout(WAIT, async {
            while let Some(event) = events.next().await {
                match event {
                    ClientEvent::Online { .. } => return,
                    ClientEvent::Stopped(reason) => panic!("{name} stopped: {reason:?}"),
                    _ => {}
                }
            }
            panic!("{name}: events ended");
        })
        .await
        .expect("online in time");
        (client, events)
    }
}

/// Waits for the client to stop and says why.
async fn stopped(events: &mut Events) -> StopReason {
    tokio::time::timeout(WAIT, async {
        while let Some(event) = events.next().await {
            if let ClientEvent::Stopped(reason) = event {
                return reason;
            }
        }
        panic!("events ended without a stop");
    })
    .await
    .expect("stopped in time")
}

/// Audit events captured from the `cim::audit` target.
#[derive(Clone, Default)]
struct Audit(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Audit {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Audit {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

#[tokio::test]
async fn the_admin_listener_is_off_by_default_and_needs_a_real_token() {
    let _one = ONE_AT_A_TIME.lock().await;
    let store = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
    let registry = MemoryRegistry::new();
    let route = route::start(
        TokioNet,
        Clock::System,
        route_options(None),
        store.clone(),
        &registry,
    )
    .await
    .expect("route starts");
    assert_eq!(route.admin_addr(), None);
    route.abort();
    let short = Some(AdminOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: b"short".to_vec(),
    });
    let err = route::start(
        TokioNet,
        Clock::System,
        route_options(short),
        store,
        &registry,
    )
    .await
    .expect_err("a short token is refused");
    assert!(err.to_string().contains("admin token"), "{err}");
}

#[tokio::test]
async fn admins_list_kick_reset_and_delete_and_every_request_is_audited() {
    let _one = ONE_AT_A_TIME.lock().await;
    let audit = Audit::default();
    let writer = audit.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_env_filter("cim::audit=info")
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let c = Cluster::start().await;
    let alice = c.register("Alice").await;
    let bob = c.register("bob").await;

    // Without the token, or with another: 401, and audited.
    for token in [None, Some("admin-token-for-tests-0123456780")] {
        let (status, v) = c.admin(Method::GET, "/users", token, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    }
    // The document needs no token.
    let (status, doc) = c.admin(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["paths"]["/users/{user}/kick"]["post"].is_object(),
        "{doc}"
    );

    // List, page, find by name in any case.
    let list = c.ok(Method::GET, "/users", None).await;
    assert_eq!(
        list["users"],
        json!([
            {"userId": alice.0, "userName": "Alice", "deleted": false},
            {"userId": bob.0, "userName": "bob", "deleted": false}
        ])
    );
    let page = c.ok(Method::GET, "/users?limit=1", None).await;
    assert_eq!(
        (page["users"].as_array().unwrap().len(), &page["next"]),
        (1, &json!(alice.0))
    );
    let found = c.ok(Method::GET, "/users?name=ALICE", None).await;
    assert_eq!(found["users"][0]["userId"], json!(alice.0));
    let (status, _) = c
        .admin(Method::GET, "/users?limit=0", Some(TOKEN), None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = c.admin(Method::GET, "/users/abc", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = c.admin(Method::GET, "/users/99", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A session shows; a kick ends it and its bearer token.
    let (_alice_client, mut alice_events) = c.online(alice, "Alice").await;
    let shown = c
        .ok(Method::GET, &format!("/users/{}", alice.0), None)
        .await;
    assert_eq!(shown["sessions"][0]["serverId"], json!("s1"));
    assert_eq!(shown["sessions"][0]["connected"], json!(true), "{shown}");
    let (bob_client, mut bob_events) = c.online(bob, "bob").await;
    let kicked = c
        .ok(Method::POST, &format!("/users/{}/kick", alice.0), None)
        .await;
    assert_eq!(kicked["kicked"], json!(true), "{kicked}");
    assert_eq!(stopped(&mut alice_events).await, StopReason::LoggedOut);
    let shown = c
        .ok(Method::GET, &format!("/users/{}", alice.0), None)
        .await;
    assert_eq!(shown["sessions"], json!([]), "{shown}");

    // A password reset: the old one no longer logs in, the new one does.
    let (status, v) = c
        .admin(
            Method::POST,
            &format!("/users/{}/password", alice.0),
            Some(TOKEN),
            Some(json!({"password": "short"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    c.ok(
        Method::POST,
        &format!("/users/{}/password", alice.0),
        Some(json!({"password": "a-new-password"})),
    )
    .await;
    assert_eq!(c.login_code(alice, "Alice", PASSWORD).await, "9100");

    // Delete bob while online: kicked, his token dead, nothing stored for him, no login,
    // the name stays taken, the id is not reused.
    let deleted = c
        .ok(Method::DELETE, &format!("/users/{}", bob.0), None)
        .await;
    assert_eq!(
        (&deleted["deleted"], &deleted["kickedFrom"]),
        (&json!(true), &json!("s1")),
        "{deleted}"
    );
    assert_eq!(stopped(&mut bob_events).await, StopReason::LoggedOut);
    drop(bob_client);
    let private = ConvId::private(alice, bob).unwrap();
    let heads_before = c
        .store
        .execute(
            Clock::System.wall(),
            StoreCommand::LoadHeads { user: alice },
        )
        .await
        .unwrap();
    // alice logs in again with her new password (by name in another case).
    let (alice_client, _alice_events) = c.online_with(alice, "alice", "a-new-password").await;
    let refused = tokio::time::timeout(
        WAIT,
        alice_client.send(private.clone(), Bytes::from_static(b"still there?")),
    )
    .await
    .expect("answered in time");
    assert!(
        refused.is_err(),
        "a message to a deleted user was accepted: {refused:?}"
    );
    let heads_after = c
        .store
        .execute(
            Clock::System.wall(),
            StoreCommand::LoadHeads { user: alice },
        )
        .await
        .unwrap();
    assert_eq!(heads_before, heads_after, "nothing was stored");
    if let StoreReply::Heads(heads) = &heads_after {
        assert!(heads.iter().all(|h| h.conv != private));
    }
    assert_eq!(c.login_code(bob, "bob", PASSWORD).await, "9100");
    let (_, v) = c
        .api(
            Method::POST,
            "/registerAccount",
            None,
            json!({"userName": "BOB", "password": PASSWORD}),
        )
        .await;
    assert_eq!(v["code"], json!("3000"), "the name stays taken: {v}");
    let carol = c.register("carol").await;
    assert_eq!(carol, UserId(bob.0 + 1), "ids are never reused");
    let list = c.ok(Method::GET, "/users", None).await;
    assert_eq!(
        list["users"][1],
        json!({"userId": bob.0, "userName": "bob", "deleted": true})
    );
    // Deleting again is harmless.
    let again = c
        .ok(Method::DELETE, &format!("/users/{}", bob.0), None)
        .await;
    assert_eq!(again["already"], json!(true));

    // Every request went to the audit log, refused ones too.
    let lines = audit.lines();
    let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert!(lines.iter().all(|l| l.contains("cim::audit")), "{lines:#?}");
    assert_eq!(count("status=401"), 2, "{lines:#?}");
    assert_eq!(count("action=\"kick_user\""), 1, "{lines:#?}");
    assert_eq!(count("action=\"delete_user\""), 2, "{lines:#?}");
    assert_eq!(count("action=\"reset_password\""), 2, "{lines:#?}");
    assert!(count("peer=127.0.0.1") >= 10, "{lines:#?}");
}

/// Resumption over the real HTTP API: a login answers a `resumeSecret`; the next login
/// presents it with the `resumeToken` and no password (9000, a new secret); the used one is
/// refused (9110); the admin's revocation ends the current one, and the password still
/// works.
#[tokio::test]
async fn a_resumption_needs_no_password_until_used_or_revoked() {
    let _one = ONE_AT_A_TIME.lock().await;
    let c = Cluster::start().await;
    let alice = c.register("alice").await;
    let c = &c;
    let login = |body: Value| async move {
        let (_, v) = c.api(Method::POST, "/login", None, body).await;
        v
    };
    let first = login(json!({"userId": alice.0, "userName": "alice", "password": PASSWORD})).await;
    assert_eq!(first["code"], json!("9000"), "{first}");
    let pair = |v: &Value| {
        (
            v["dataBody"]["resumeToken"].clone(),
            v["dataBody"]["resumeSecret"].clone(),
        )
    };
    let (token1, secret1) = pair(&first);
    assert!(secret1.is_string(), "{first}");
    let resume = |token: &Value, secret: &Value| json!({"userId": alice.0, "userName": "alice", "resumeToken": token, "resumeSecret": secret});
    let second = login(resume(&token1, &secret1)).await;
    assert_eq!(second["code"], json!("9000"), "{second}");
    let (token2, secret2) = pair(&second);
    assert_ne!(secret2, secret1);
    // The first pair was used: refused, and so is the used secret with the new token.
    for (token, secret) in [(&token1, &secret1), (&token2, &secret1)] {
        let refused = login(resume(token, secret)).await;
        assert_eq!(refused["code"], json!("9110"), "{refused}");
    }
    // A malformed secret is a 400 like any bad field.
    let (status, bad) = c
        .api(
            Method::POST,
            "/login",
            None,
            resume(&token2, &json!("AAAA")),
        )
        .await;
    assert_eq!(
        (status, &bad["code"]),
        (StatusCode::BAD_REQUEST, &json!("3000")),
        "{bad}"
    );
    // The admin revokes: the current pair stops working, the password does not.
    let revoked = c
        .ok(
            Method::POST,
            &format!("/users/{}/revoke-resumption", alice.0),
            None,
        )
        .await;
    assert_eq!(revoked, json!({"revoked": true}));
    let refused = login(resume(&token2, &secret2)).await;
    assert_eq!(refused["code"], json!("9110"), "{refused}");
    let by_password = login(json!({"userId": alice.0, "userName": "alice", "password": PASSWORD, "resumeToken": token2})).await;
    assert_eq!(by_password["code"], json!("9000"), "{by_password}");
    // Three logins were answered ok, one of them by its secret; three secrets were refused
    // (the malformed one is a 400 before the login machine).
    let (_, metrics) = c
        .api
        .request(Method::GET, "/metrics", None, None)
        .await
        .expect("metrics");
    let metrics = String::from_utf8_lossy(&metrics);
    for line in [
        "cim_route_logins_total{route_id=\"r1\",result=\"ok\"} 3\n",
        "cim_route_logins_total{route_id=\"r1\",result=\"9110\"} 3\n",
        "cim_route_logins_resumed_total{route_id=\"r1\"} 1\n",
    ] {
        assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
    }
}
