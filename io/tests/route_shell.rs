//! The route shell over real sockets: the HTTP API and the internal links, with this test
//! playing the servers (it accepts the route's link and does the server side of the
//! handshake itself).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cim_core::accounts::PasswordParams;
use cim_core::ids::{ClientMsgId, Epoch, ServerId, UserId};
use cim_core::link_auth;
use cim_core::memstore::MemoryStoreConfig;
use cim_core::registry::LiveServer;
use cim_core::route::tickets::TicketKeys;
use cim_core::store::{StoreCommand, StoreReply};
use cim_io::api;
use cim_io::clock::Clock;
use cim_io::http_client::HttpClient;
use cim_io::net::{self, FrameReader, FrameWriter, Listener, Network, ReadError, TokioNet};
use cim_io::registry::{MemoryRegistry, Registration, Registry};
use cim_io::route::{self, RouteHandle, RouteOptions};
use cim_io::store::{MemoryBackend, Store};
use cim_proto::codec::FrameCodec;
use cim_proto::frame::Kind;
use cim_proto::{Frame, KickUserDone, Ping, Pong, RouteSend};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::net::TcpStream;

const LINK_SECRET: &[u8] = b"link-secret";
const WAIT: Duration = Duration::from_secs(5);

type Stream = TcpStream;

struct Fixture {
    route: RouteHandle,
    http: HttpClient<TokioNet>,
    store: Arc<MemoryBackend>,
    keys: TicketKeys,
}

fn options() -> RouteOptions {
    let keys = TicketKeys::new(1, b"ticket-secret".to_vec());
    let mut o = RouteOptions::new("r1", keys, b"bearer-secret".to_vec(), LINK_SECRET.to_vec());
    o.http_listen = "127.0.0.1:0".parse().unwrap();
    o.login.password = PasswordParams::for_tests();
    o.link_retry_delay = Duration::from_millis(100);
    o.io_timeout = Duration::from_secs(2);
    o
}

impl Fixture {
    async fn start() -> Self {
        Self::start_with(MemoryRegistry::new()).await
    }

    async fn start_with(registry: MemoryRegistry) -> Self {
        Self::start_with_options(registry, options()).await
    }

    async fn start_with_options(registry: MemoryRegistry, options: RouteOptions) -> Self {
        let store = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
        Self::start_on(registry, options, store).await
    }

    /// A route on an existing store (a second route of the same deployment).
    async fn start_on(
        registry: MemoryRegistry,
        options: RouteOptions,
        store: Arc<MemoryBackend>,
    ) -> Self {
        let keys = options.ticket_keys.clone();
        let route = route::start(TokioNet, Clock::System, options, store.clone(), &registry)
            .await
            .expect("route starts");
        let http = HttpClient::new(TokioNet, "127.0.0.1", route.http_addr().port(), WAIT);
        Self {
            route,
            http,
            store,
            keys,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Bytes>,
    ) -> (StatusCode, Value) {
        let (status, body) = self
            .http
            .request(method, path, token, body)
            .await
            .expect("http request");
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body:?}"));
        (status, value)
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (StatusCode, Value) {
        let bytes = Bytes::from(serde_json::to_vec(&body).unwrap());
        self.call(Method::POST, path, token, Some(bytes)).await
    }

    async fn post_raw(&self, path: &str, token: Option<&str>, raw: &str) -> (StatusCode, Value) {
        self.call(Method::POST, path, token, Some(Bytes::from(raw.to_owned())))
            .await
    }

    async fn get(&self, path: &str, token: Option<&str>) -> (StatusCode, Value) {
        self.call(Method::GET, path, token, None).await
    }

    async fn register(&self, name: &str) -> u64 {
        let (status, v) = self
            .post(
                "/registerAccount",
                None,
                json!({"userName": name, "password": "pw-123456"}),
            )
            .await;
        assert_eq!((status, code(&v)), (StatusCode::OK, "9000"), "{v}");
        v["dataBody"]["userId"].as_u64().unwrap()
    }

    async fn login_raw(&self, user: u64, name: &str, resume: Option<&str>) -> Value {
        let mut body = json!({"userId": user, "userName": name, "password": "pw-123456"});
        if let Some(token) = resume {
            body["resumeToken"] = json!(token);
        }
        let (status, v) = self.post("/login", None, body).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }

    async fn login(&self, user: u64, name: &str) -> api::LoginResponse {
        let v = self.login_raw(user, name, None).await;
        assert_eq!(code(&v), "9000", "{v}");
        serde_json::from_value(v["dataBody"].clone()).unwrap()
    }

    /// Writes the user's route record as its server does before LoginOk.
    async fn bind(&self, login: &api::LoginResponse) {
        let wall = Clock::System.wall();
        let reply = self
            .store
            .execute(
                wall,
                StoreCommand::BindSession {
                    user: UserId(login.user_id),
                    epoch: Epoch(login.epoch),
                    server: ServerId::new(&login.server_id),
                    lease_until: wall.plus(Duration::from_secs(60)),
                },
            )
            .await
            .unwrap();
        assert_eq!(reply, StoreReply::SessionBound(Ok(())));
    }
}

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or_else(|| panic!("no code: {v}"))
}

fn uuid(n: u128) -> String {
    ClientMsgId(n).to_string()
}

// --- the fake server ------------------------------------------------------------------

/// A server as far as the route can tell: a registry entry and a link listener.
struct FakeServer {
    id: ServerId,
    listener: tokio::net::TcpListener,
    registration: Option<Registration>,
}

struct FakeLink {
    reader: FrameReader<tokio::io::ReadHalf<Stream>>,
    writer: FrameWriter<tokio::io::WriteHalf<Stream>>,
}

impl FakeServer {
    async fn start(registry: &MemoryRegistry, id: &str) -> Self {
        let listener = TokioNet.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let port = Listener::local_addr(&listener).unwrap().port();
        let registration = registry
            .register(LiveServer {
                id: ServerId::new(id),
                host: "127.0.0.1".into(),
                client_port: 11211,
                link_port: port,
                http_port: 8081,
                connections: 0,
                client_tls: false,
                ws_port: None,
            })
            .await
            .unwrap();
        Self {
            id: ServerId::new(id),
            listener,
            registration: Some(registration),
        }
    }

    /// Accepts the route's next link and runs the server side of the handshake with
    /// `secret`. `None` if the route's proof did not verify (the connection is dropped).
    async fn accept_with(&mut self, secret: &[u8]) -> Option<FakeLink> {
        let (stream, _) = tokio::time::timeout(WAIT, Listener::accept(&mut self.listener))
            .await
            .expect("the route dials")
            .unwrap();
        let (mut reader, mut writer) = net::framed(stream, FrameCodec::new(64 * 1024));
        let hello = link_auth::server_hello(&self.id, &rand_nonce());
        let frame = Frame {
            kind: Some(Kind::LinkHello(hello.clone())),
        };
        writer.write_frame(&frame, WAIT).await.unwrap();
        let auth = match reader.read_frame(WAIT).await.unwrap().kind {
            Some(Kind::LinkAuth(auth)) => auth,
            other => panic!("expected link_auth, got {other:?}"),
        };
        assert_eq!(auth.route_id, "r1");
        let ok = link_auth::server_check(secret, &hello, &auth).ok()?;
        let frame = Frame {
            kind: Some(Kind::LinkAuthOk(ok)),
        };
        writer.write_frame(&frame, WAIT).await.unwrap();
        Some(FakeLink { reader, writer })
    }

    async fn accept(&mut self) -> FakeLink {
        self.accept_with(LINK_SECRET)
            .await
            .expect("the route authenticates")
    }
}

fn rand_nonce() -> [u8; 16] {
    use rand::{RngCore, SeedableRng};
    let mut nonce = [0u8; 16];
    rand_chacha::ChaCha8Rng::from_os_rng().fill_bytes(&mut nonce);
    nonce
}

impl FakeLink {
    /// The next frame that is not a keepalive (Pings are answered).
    async fn recv(&mut self) -> Result<Frame, ReadError> {
        loop {
            let frame = self.reader.read_frame(WAIT).await?;
            if let Some(Kind::Ping(ping)) = &frame.kind {
                let pong = Frame {
                    kind: Some(Kind::Pong(Pong { nonce: ping.nonce })),
                };
                self.send(pong).await;
                continue;
            }
            return Ok(frame);
        }
    }

    /// Frames until one `pick` accepts (others are skipped).
    async fn expect<T>(&mut self, mut pick: impl FnMut(Kind) -> Option<T>) -> T {
        loop {
            let frame = self.recv().await.expect("a frame from the route");
            if let Some(t) = frame.kind.and_then(&mut pick) {
                return t;
            }
        }
    }

    async fn send(&mut self, frame: Frame) {
        self.writer.write_frame(&frame, WAIT).await.unwrap();
    }
}

// --- tests -----------------------------------------------------------------------------

#[tokio::test]
async fn register_login_repeat_and_ticket() {
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let f = Fixture::start_with(registry).await;
    let _link = s1.accept().await;

    let alice = f.register("alice").await;
    let (status, v) = f
        .post(
            "/registerAccount",
            None,
            json!({"userName": "alice", "password": "other-pw-1"}),
        )
        .await;
    assert_eq!((status, code(&v)), (StatusCode::CONFLICT, "3000"), "{v}");

    let v = f
        .post(
            "/login",
            None,
            json!({"userId": alice, "userName": "alice", "password": "wrong-pw-1"}),
        )
        .await
        .1;
    assert_eq!(code(&v), "9100", "{v}");

    let answer = f.login(alice, "alice").await;
    assert_eq!(
        (answer.user_id, answer.epoch, answer.server_id.as_str()),
        (alice, 1, "s1")
    );
    assert_eq!(
        (answer.ip.as_str(), answer.cim_server_port),
        ("127.0.0.1", 11211)
    );
    let ticket = api::decode_ticket(&answer.ticket).unwrap();
    let grant = f
        .keys
        .verify(&ticket, &s1.id, Clock::System.wall(), Duration::ZERO)
        .expect("the ticket verifies with the route's keys");
    assert_eq!((grant.user, grant.epoch), (UserId(alice), Epoch(1)));
    api::decode_resume_token(&answer.resume_token).unwrap();

    // Online elsewhere, no proof: 5000.
    assert_eq!(code(&f.login_raw(alice, "alice", None).await), "5000");
    // A resume token that is not one: invalid.
    let body = json!({"userId": alice, "userName": "alice", "password": "pw-123456",
                      "resumeToken": "not base64!"});
    let (status, v) = f.post("/login", None, body).await;
    assert_eq!((status, code(&v)), (StatusCode::BAD_REQUEST, "3000"), "{v}");
}

#[tokio::test]
async fn takeover_waits_for_the_old_server_to_kick() {
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let f = Arc::new(Fixture::start_with(registry).await);
    let mut link = s1.accept().await;
    let alice = f.register("alice").await;
    let first = f.login(alice, "alice").await;

    let takeover = {
        let f = f.clone();
        let token = first.resume_token.clone();
        tokio::spawn(async move { f.login_raw(alice, "alice", Some(&token)).await })
    };
    let kick = link
        .expect(|k| match k {
            Kind::KickUser(kick) => Some(kick),
            _ => None,
        })
        .await;
    assert_eq!((kick.user_id, kick.below_epoch), (alice, 2));
    // Held until the old server confirms: the answer must not be out yet.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!takeover.is_finished(), "answered before KickUserDone");
    link.send(Frame {
        kind: Some(Kind::KickUserDone(KickUserDone {
            user_id: alice,
            below_epoch: 2,
        })),
    })
    .await;
    let v = tokio::time::timeout(WAIT, takeover).await.unwrap().unwrap();
    assert_eq!(code(&v), "9000", "{v}");
    assert_eq!(v["dataBody"]["epoch"], json!(2));
    assert_ne!(v["dataBody"]["resumeToken"], json!(first.resume_token));
}

#[tokio::test]
async fn no_live_server_is_7100() {
    let f = Fixture::start().await;
    let alice = f.register("alice").await;
    assert_eq!(code(&f.login_raw(alice, "alice", None).await), "7100");
}

#[tokio::test]
async fn route_send_on_the_link_is_acked_and_pushed() {
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let f = Fixture::start_with(registry).await;
    let mut link = s1.accept().await;
    let alice = f.register("alice").await;
    let bob = f.register("bob").await;
    let a = f.login(alice, "alice").await;
    let b = f.login(bob, "bob").await;
    f.bind(&b).await;

    let msg_id = ClientMsgId(0xabc);
    link.send(Frame {
        kind: Some(Kind::RouteSend(RouteSend {
            request_id: 77,
            user_id: alice,
            epoch: a.epoch,
            send: Some(cim_proto::Send {
                msg_id_hi: msg_id.hi(),
                msg_id_lo: msg_id.lo(),
                conv: format!("p:{alice}:{bob}"),
                body: b"hi bob".to_vec().into(),
                sent_at_ms: 0,
                ..Default::default()
            }),
        })),
    })
    .await;
    let result = link
        .expect(|k| match k {
            Kind::RouteSendResult(r) => Some(r),
            _ => None,
        })
        .await;
    assert_eq!((result.request_id, result.user_id), (77, alice));
    let ack = result.ack.expect("acked");
    assert_eq!((ack.seq, ack.msg_id_lo), (1, 0xabc));
    let batch = link
        .expect(|k| match k {
            Kind::PushBatch(b) => Some(b),
            _ => None,
        })
        .await;
    let push = &batch.pushes[0];
    assert_eq!(push.recipients, vec![bob], "only bound users are pushed to");
    assert_eq!(push.message.as_ref().unwrap().body, &b"hi bob"[..]);
}

#[tokio::test]
async fn http_sends_with_a_token() {
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let f = Fixture::start_with(registry).await;
    let mut link = s1.accept().await;
    let alice = f.register("alice").await;
    let bob = f.register("bob").await;
    let carol = f.register("carol").await;
    let a = f.login(alice, "alice").await;
    let token = Some(a.token.as_str());

    // `all`: acked, and broadcast to the live server.
    let (status, v) = f
        .post(
            "/groupRoute",
            token,
            json!({"userId": alice, "msg": "hello all", "clientMsgId": uuid(1)}),
        )
        .await;
    assert_eq!((status, code(&v)), (StatusCode::OK, "9000"), "{v}");
    assert_eq!(
        (
            v["dataBody"]["conv"].as_str(),
            v["dataBody"]["seq"].as_u64()
        ),
        (Some("all"), Some(1))
    );
    let batch = link
        .expect(|k| match k {
            Kind::PushBatch(b) => Some(b),
            _ => None,
        })
        .await;
    assert!(batch.pushes[0].all_sessions);

    // Registered but offline: stored, online false.
    let p2p = |to: u64, id: u128| json!({"userId": alice, "receiveUserId": to, "msg": "psst", "clientMsgId": uuid(id)});
    let v = f.post("/p2pRoute", token, p2p(bob, 2)).await.1;
    assert_eq!(code(&v), "9000", "{v}");
    assert_eq!(v["dataBody"]["online"], json!(false));
    assert_eq!(v["dataBody"]["conv"], json!(format!("p:{alice}:{bob}")));
    // Online once its server bound the session.
    let c = f.login(carol, "carol").await;
    f.bind(&c).await;
    let v = f.post("/p2pRoute", token, p2p(carol, 3)).await.1;
    assert_eq!(
        (code(&v), &v["dataBody"]["online"]),
        ("9000", &json!(true)),
        "{v}"
    );
    // Unknown receiver: an error, nothing stored.
    let v = f.post("/p2pRoute", token, p2p(999, 4)).await.1;
    assert_eq!(code(&v), "4000", "{v}");
    // Acting as someone else: refused.
    let (status, v) = f
        .post(
            "/groupRoute",
            token,
            json!({"userId": bob, "msg": "spoof", "clientMsgId": uuid(5)}),
        )
        .await;
    assert_eq!((status, code(&v)), (StatusCode::FORBIDDEN, "3000"), "{v}");
    // A client message id that is not a UUID.
    let v = f
        .post(
            "/groupRoute",
            token,
            json!({"userId": alice, "msg": "x", "clientMsgId": "nope"}),
        )
        .await
        .1;
    assert_eq!(code(&v), "3000", "{v}");

    // The online list has carol (bound), not alice (logged in, never bound).
    let (status, v) = f.get("/onlineUser", token).await;
    assert_eq!((status, code(&v)), (StatusCode::OK, "9000"), "{v}");
    assert_eq!(
        v["dataBody"],
        json!([{"userId": carol, "userName": "carol", "serverId": "s1"}])
    );

    // Logout ends the session: a fresh login is no longer a repeat.
    let v = f.post("/offLine", token, json!({"userId": alice})).await.1;
    assert_eq!(code(&v), "9000", "{v}");
    assert_eq!(f.login(alice, "alice").await.epoch, 2);
}

#[tokio::test]
async fn malformed_requests_are_400_3000_and_missing_tokens_401() {
    let f = Fixture::start().await;
    let cases: &[(&str, &str)] = &[
        ("garbage", "{not json"),
        ("wrong type", r#"{"userName": 5, "password": "pw-123456"}"#),
        ("missing field", r#"{"userName": "ann"}"#),
        (
            "unknown field",
            r#"{"userName": "ann", "password": "pw-123456", "admin": true}"#,
        ),
        ("not an object", "[]"),
    ];
    for (label, raw) in cases {
        let (status, v) = f.post_raw("/registerAccount", None, raw).await;
        assert_eq!(
            (status, code(&v)),
            (StatusCode::BAD_REQUEST, "3000"),
            "{label}: {v}"
        );
    }
    let (status, v) = f
        .post_raw(
            "/login",
            None,
            r#"{"userId": "one", "userName": "a", "password": "b"}"#,
        )
        .await;
    assert_eq!((status, code(&v)), (StatusCode::BAD_REQUEST, "3000"), "{v}");

    let send = json!({"userId": 1, "msg": "x", "clientMsgId": uuid(1)});
    let (status, v) = f.post("/groupRoute", None, send.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    code(&v);
    let (status, _) = f.post("/groupRoute", Some("1.1.1.00"), send).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = f.get("/group/list", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let huge = format!(
        r#"{{"userName": "{}", "password": "pw"}}"#,
        "a".repeat(100 * 1024)
    );
    let (status, v) = f.post_raw("/registerAccount", None, &huge).await;
    assert_eq!(
        (status, code(&v)),
        (StatusCode::PAYLOAD_TOO_LARGE, "3000"),
        "{v}"
    );

    let (status, v) = f.get("/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    code(&v);
}

#[tokio::test]
async fn history_is_bounded_and_for_members_only() {
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let f = Fixture::start_with(registry).await;
    let _link = s1.accept().await;
    let alice = f.register("alice").await;
    let bob = f.register("bob").await;
    let a = f.login(alice, "alice").await;
    let b = f.login(bob, "bob").await;
    let (ta, tb) = (Some(a.token.as_str()), Some(b.token.as_str()));

    let group = json!({"userId": alice, "groupName": "rust"});
    assert_eq!(
        code(&f.post("/group/create", ta, group.clone()).await.1),
        "9000"
    );
    assert_eq!(code(&f.post("/group/create", ta, group).await.1), "4000");
    for i in 1..=3u128 {
        let body = json!({"userId": alice, "msg": format!("m{i}"), "clientMsgId": uuid(i), "groupName": "rust"});
        let v = f.post("/groupRoute", ta, body).await.1;
        assert_eq!(v["dataBody"]["seq"].as_u64(), Some(i as u64), "{v}");
    }
    let (_, v) = f.get("/group/list", ta).await;
    assert_eq!(v["dataBody"]["groups"], json!(["rust"]));

    let (status, v) = f.get("/history?conv=g:rust&limit=101", ta).await;
    assert_eq!((status, code(&v)), (StatusCode::BAD_REQUEST, "3000"), "{v}");
    let (status, v) = f.get("/history?conv=g:rust&limit=10", tb).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_ne!(code(&v), "9000");
    let (status, v) = f.get("/history?conv=g:rust&limit=abc", ta).await;
    assert_eq!((status, code(&v)), (StatusCode::BAD_REQUEST, "3000"), "{v}");

    let seqs = |v: &Value| -> Vec<u64> {
        v["dataBody"]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    };
    let (_, v) = f.get("/history?conv=g:rust&limit=2", ta).await;
    assert_eq!((code(&v), seqs(&v)), ("9000", vec![2, 3]), "{v}");
    assert_eq!(v["dataBody"]["messages"][1]["msg"], json!("m3"));
    let (_, v) = f.get("/history?conv=g:rust&beforeSeq=3&limit=5", ta).await;
    assert_eq!(seqs(&v), vec![1, 2]);

    // Bob joins: history from his join on, and he may post.
    let join = json!({"userId": bob, "groupName": "rust"});
    assert_eq!(code(&f.post("/group/join", tb, join).await.1), "9000");
    let (status, v) = f.get("/history?conv=g:rust", tb).await;
    assert_eq!((status, seqs(&v)), (StatusCode::OK, vec![]), "{v}");
}

#[tokio::test]
async fn user_names_by_id_for_any_logged_in_user() {
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let f = Fixture::start_with(registry).await;
    let _link = s1.accept().await;
    let alice = f.register("alice").await;
    let bob = f.register("bob").await;
    let a = f.login(alice, "alice").await;
    let ta = Some(a.token.as_str());

    // Bob never logged in: his name is still there; unknown ids are left out, repeats once.
    let (status, v) = f
        .post("/userNames", ta, json!({"userIds": [bob, 999, alice, bob]}))
        .await;
    assert_eq!((status, code(&v)), (StatusCode::OK, "9000"), "{v}");
    assert_eq!(
        v["dataBody"],
        json!({"users": [{"userId": bob, "userName": "bob"},
                         {"userId": alice, "userName": "alice"}]})
    );
    let (_, v) = f.post("/userNames", ta, json!({"userIds": []})).await;
    assert_eq!(v["dataBody"], json!({"users": []}), "{v}");

    let (status, v) = f
        .post("/userNames", None, json!({"userIds": [alice]}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    let (status, v) = f.post("/userNames", ta, json!({"userIds": "alice"})).await;
    assert_eq!((status, code(&v)), (StatusCode::BAD_REQUEST, "3000"), "{v}");
    let too_many: Vec<u64> = (1..=api::MAX_USER_NAMES as u64 + 1).collect();
    let (status, v) = f.post("/userNames", ta, json!({"userIds": too_many})).await;
    assert_eq!((status, code(&v)), (StatusCode::BAD_REQUEST, "3000"), "{v}");

    // The SDK splits a long list into requests the route takes.
    let sdk = cim_io::sdk::RouteApi::new(TokioNet, "127.0.0.1", f.route.http_addr().port(), WAIT);
    let mut ids: Vec<UserId> = (0..250).map(|i| UserId(1000 + i)).collect();
    ids.push(UserId(bob));
    let names = sdk.user_names(&a.token, &ids).await.unwrap();
    assert_eq!(
        names,
        vec![api::UserName {
            user_id: bob,
            user_name: "bob".into()
        }]
    );
}

#[tokio::test]
async fn a_token_of_the_previous_bearer_secret_works_until_the_secret_is_dropped() {
    // A token from a route still on the old secret.
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let old = Fixture::start_with(registry).await;
    let _link = s1.accept().await;
    let alice = old.register("alice").await;
    let token = old.login(alice, "alice").await.token;
    let (status, v) = old.get("/group/list", Some(&token)).await;
    assert_eq!((status, code(&v)), (StatusCode::OK, "9000"), "{v}");

    // A route switched to the new secret, holding the old one as previous, takes it. (On
    // the same store: a token works only while its session is the user's current one.)
    let mut rotating = options();
    rotating.bearer_secret = b"bearer-secret-new".to_vec();
    rotating.bearer_secret_previous = Some(b"bearer-secret".to_vec());
    let rotating = Fixture::start_on(MemoryRegistry::new(), rotating, old.store.clone()).await;
    let (status, v) = rotating.get("/group/list", Some(&token)).await;
    assert_eq!((status, code(&v)), (StatusCode::OK, "9000"), "{v}");
    let (status, _) = rotating.get("/group/list", Some("1.1.1.00")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Logout checks the token in the login machine: it takes the previous secret too.
    let (status, v) = rotating
        .post("/offLine", Some(&token), json!({"userId": alice}))
        .await;
    assert_eq!((status, code(&v)), (StatusCode::OK, "9000"), "{v}");

    // Once the previous secret is dropped, the old token is refused.
    let mut done = options();
    done.bearer_secret = b"bearer-secret-new".to_vec();
    let done = Fixture::start_on(MemoryRegistry::new(), done, old.store.clone()).await;
    let (status, v) = done.get("/group/list", Some(&token)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    let (status, v) = done
        .post("/offLine", Some(&token), json!({"userId": alice}))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
}

#[tokio::test]
async fn openapi_health_and_metrics() {
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let f = Fixture::start_with(registry).await;
    let _link = s1.accept().await;

    let (status, doc) = f.get("/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/login",
        "/registerAccount",
        "/p2pRoute",
        "/history",
        "/group/join",
        "/userNames",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    let (status, v) = f.get("/health", None).await;
    assert_eq!((status, &v), (StatusCode::OK, &json!({"status": "ok"})));

    // The link is up once the route has processed LinkUp: poll the gauge.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, text) = f
            .http
            .request(Method::GET, "/metrics", None, None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(text.to_vec()).unwrap();
        assert!(text.contains("# TYPE cim_route_messages_acked_total counter"));
        if text.contains("cim_route_links_up{route_id=\"r1\"} 1") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_link_with_a_bad_secret_is_refused_and_redialled() {
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let f = Fixture::start_with(registry).await;
    // The server has another secret: the route's proof fails; it keeps serving HTTP and
    // tries again after the retry delay.
    assert!(s1.accept_with(b"another-secret").await.is_none());
    f.register("alice").await;
    assert!(s1.accept_with(b"another-secret").await.is_none());
    // A server that proves a different secret is refused by the route (no link up).
    let (status, text) = f
        .http
        .request(Method::GET, "/metrics", None, None)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(text.to_vec()).unwrap();
    assert!(
        text.contains("cim_route_links_up{route_id=\"r1\"} 0"),
        "{text}"
    );
    // With the right secret the next attempt succeeds.
    let _link = s1.accept().await;
}

#[tokio::test]
async fn a_route_rotating_its_link_secret_still_links_to_a_server_on_the_old_one() {
    const NEW: &[u8] = b"the-new-link-secret";
    let registry = MemoryRegistry::new();
    let mut old = FakeServer::start(&registry, "s1").await;
    let mut new = FakeServer::start(&registry, "s2").await;
    let mut options = options();
    options.link_secret = NEW.to_vec();
    options.link_secret_previous = Some(LINK_SECRET.to_vec());
    let _f = Fixture::start_with_options(registry, options).await;
    // A server on the new secret links at the first dial.
    let _new_link = new
        .accept_with(NEW)
        .await
        .expect("linked on the new secret");
    // One still on the old secret refuses the new proof; the route's next dial proves the
    // old one and checks the server's answer with it.
    assert!(old.accept_with(LINK_SECRET).await.is_none());
    let mut link = old
        .accept_with(LINK_SECRET)
        .await
        .expect("linked on the old secret");
    link.send(Frame {
        kind: Some(Kind::Ping(Ping { nonce: 7 })),
    })
    .await;
    link.expect(|k| matches!(k, Kind::Pong(Pong { nonce: 7 })).then_some(()))
        .await;
}

#[tokio::test]
async fn a_server_that_proves_the_wrong_secret_gets_no_link() {
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let f = Fixture::start_with(registry).await;
    // Accept with the right check, but answer with a MAC under another secret.
    let (stream, _) = tokio::time::timeout(WAIT, Listener::accept(&mut s1.listener))
        .await
        .unwrap()
        .unwrap();
    let (mut reader, mut writer) = net::framed(stream, FrameCodec::new(64 * 1024));
    let hello = link_auth::server_hello(&s1.id, &rand_nonce());
    writer
        .write_frame(
            &Frame {
                kind: Some(Kind::LinkHello(hello.clone())),
            },
            WAIT,
        )
        .await
        .unwrap();
    let Some(Kind::LinkAuth(auth)) = reader.read_frame(WAIT).await.unwrap().kind else {
        panic!("expected link_auth");
    };
    let forged = link_auth::server_check(
        b"another-secret",
        &hello,
        &link_auth::route_answer(b"another-secret", &hello, &auth.route_id, &auth.nonce).unwrap(),
    )
    .unwrap();
    writer
        .write_frame(
            &Frame {
                kind: Some(Kind::LinkAuthOk(forged)),
            },
            WAIT,
        )
        .await
        .unwrap();
    // The route drops the connection instead of using it.
    assert!(matches!(
        reader.read_frame(WAIT).await,
        Err(ReadError::Closed | ReadError::Io(_))
    ));
    // Nobody can be sent there; HTTP still works.
    let alice = f.register("alice").await;
    let v = f.login_raw(alice, "alice", None).await;
    assert_eq!(code(&v), "9000", "the server is live in the registry: {v}");
}

#[tokio::test]
async fn a_server_leaving_the_registry_loses_its_link() {
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let f = Fixture::start_with(registry).await;
    let mut link = s1.accept().await;
    s1.registration.take().unwrap().deregister().await.unwrap();
    match link.recv().await {
        Err(ReadError::Closed | ReadError::Io(_)) => {}
        other => panic!("expected the link to close, got {other:?}"),
    }
    let alice = f.register("alice").await;
    assert_eq!(code(&f.login_raw(alice, "alice", None).await), "7100");
}

#[tokio::test]
async fn shutdown_stops_serving() {
    let f = Fixture::start().await;
    f.register("alice").await;
    let port = f.route.http_addr().port();
    tokio::time::timeout(WAIT, f.route.shutdown())
        .await
        .unwrap();
    let http = HttpClient::new(TokioNet, "127.0.0.1", port, Duration::from_secs(1));
    assert!(
        http.request(Method::GET, "/health", None, None)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_hello_naming_another_server_is_refused() {
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let _f = Fixture::start_with(registry).await;
    // Right secret, wrong name: the route must not answer the challenge.
    s1.id = ServerId::new("s2");
    let (stream, _) = tokio::time::timeout(WAIT, Listener::accept(&mut s1.listener))
        .await
        .unwrap()
        .unwrap();
    let (mut reader, mut writer) = net::framed(stream, FrameCodec::new(64 * 1024));
    let hello = link_auth::server_hello(&s1.id, &rand_nonce());
    writer
        .write_frame(
            &Frame {
                kind: Some(Kind::LinkHello(hello)),
            },
            WAIT,
        )
        .await
        .unwrap();
    assert!(matches!(
        reader.read_frame(WAIT).await,
        Err(ReadError::Closed | ReadError::Io(_))
    ));
    // With the right name the redial authenticates.
    s1.id = ServerId::new("s1");
    let _link = s1.accept().await;
}

// --- the API contract: what the OpenAPI document forbids is 400 + 3000 ---------------------

/// 2^63: one above the largest id the document allows (`int64`).
const TOO_BIG_ID: &str = "9223372036854775808";

/// `(status, code)` of a request: `body` raw JSON for a POST, `None` for a GET.
async fn answer(f: &Fixture, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let (status, v) = match body {
        Some(raw) => f.post_raw(path, token, raw).await,
        None => f.get(path, token).await,
    };
    (status.as_u16(), v)
}

/// The envelope of a refusal: code and a message, no data.
fn assert_refusal(label: &str, v: &Value, want_code: &str) {
    assert_eq!(code(v), want_code, "{label}: {v}");
    assert!(
        v["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{label}: {v}"
    );
    assert!(v.get("dataBody").is_none(), "{label}: {v}");
}

#[tokio::test]
async fn every_request_the_document_forbids_is_400_with_the_envelope() {
    let registry = MemoryRegistry::new();
    let mut s1 = FakeServer::start(&registry, "s1").await;
    let f = Fixture::start_with(registry).await;
    let _link = s1.accept().await;
    let alice = f.register("alice").await;
    let bob = f.register("bob").await;
    let a = f.login(alice, "alice").await;
    let t = Some(a.token.as_str());
    let id = uuid(1);
    // Over HTTP a message has at most a quarter of --max-body (4096) characters.
    let long_msg = "x".repeat(1024 + 1);
    let too_many: Vec<u64> = (1..=api::MAX_USER_NAMES as u64 + 1).collect();
    let too_many = serde_json::to_string(&too_many).unwrap();
    let bad_last = format!("{}B", "A".repeat(42));
    // (what, path, token, body): each breaks the document in one place.
    let cases: Vec<(&str, &str, Option<&str>, Option<String>)> = vec![
        // ids above int64 (schemathesis' find: these were accepted).
        (
            "login userId 2^63",
            "/login",
            None,
            Some(format!(
                r#"{{"userId": {TOO_BIG_ID}, "userName": "alice", "password": "pw-123456"}}"#
            )),
        ),
        (
            "login userId 2^64-1",
            "/login",
            None,
            Some(
                r#"{"userId": 18446744073709551615, "userName": "alice", "password": "pw-123456"}"#
                    .into(),
            ),
        ),
        (
            "p2p receiveUserId 2^63",
            "/p2pRoute",
            t,
            Some(format!(
                r#"{{"userId": {alice}, "receiveUserId": {TOO_BIG_ID}, "msg": "x", "clientMsgId": "{id}"}}"#
            )),
        ),
        (
            "p2p userId 2^63",
            "/p2pRoute",
            t,
            Some(format!(
                r#"{{"userId": {TOO_BIG_ID}, "receiveUserId": {bob}, "msg": "x", "clientMsgId": "{id}"}}"#
            )),
        ),
        (
            "userNames item 2^63",
            "/userNames",
            t,
            Some(format!(r#"{{"userIds": [{bob}, {TOO_BIG_ID}]}}"#)),
        ),
        (
            "offLine userId 2^63",
            "/offLine",
            t,
            Some(format!(r#"{{"userId": {TOO_BIG_ID}}}"#)),
        ),
        (
            "group/create userId 2^63",
            "/group/create",
            t,
            Some(format!(r#"{{"userId": {TOO_BIG_ID}, "groupName": "g"}}"#)),
        ),
        // null where the document does not say nullable.
        (
            "groupRoute msg null",
            "/groupRoute",
            t,
            Some(format!(
                r#"{{"userId": {alice}, "msg": null, "clientMsgId": "{id}"}}"#
            )),
        ),
        (
            "group/join groupName null",
            "/group/join",
            t,
            Some(format!(r#"{{"userId": {alice}, "groupName": null}}"#)),
        ),
        // bounds and patterns the document states (these were 200 + 3000).
        (
            "history limit 32822",
            "/history?conv=all&limit=32822",
            t,
            None,
        ),
        ("history limit 0", "/history?conv=all&limit=0", t, None),
        ("history limit 101", "/history?conv=all&limit=101", t, None),
        (
            "history limit past u32",
            "/history?conv=all&limit=5000000000",
            t,
            None,
        ),
        (
            "history beforeSeq 2^63",
            "/history?conv=all&beforeSeq=9223372036854775808",
            t,
            None,
        ),
        ("history conv g:all", "/history?conv=g:all", t, None),
        ("history conv nonsense", "/history?conv=everyone", t, None),
        ("history conv leading zero", "/history?conv=p:01:2", t, None),
        ("history conv newline", "/history?conv=all%0A", t, None),
        ("history conv missing", "/history?limit=5", t, None),
        (
            "userNames 101 ids",
            "/userNames",
            t,
            Some(format!(r#"{{"userIds": {too_many}}}"#)),
        ),
        (
            "resumeToken too short",
            "/login",
            None,
            Some(format!(
                r#"{{"userId": {alice}, "userName": "alice", "password": "pw-123456", "resumeToken": "AAAA"}}"#
            )),
        ),
        (
            "resumeToken spare bits set",
            "/login",
            None,
            Some(format!(
                r#"{{"userId": {alice}, "userName": "alice", "password": "pw-123456", "resumeToken": "{bad_last}"}}"#
            )),
        ),
        (
            "clientMsgId not a uuid",
            "/groupRoute",
            t,
            Some(format!(
                r#"{{"userId": {alice}, "msg": "x", "clientMsgId": "nope"}}"#
            )),
        ),
        (
            "msg over max body",
            "/p2pRoute",
            t,
            Some(format!(
                r#"{{"userId": {alice}, "receiveUserId": {bob}, "msg": "{long_msg}", "clientMsgId": "{id}"}}"#
            )),
        ),
        (
            "groupRoute groupName all",
            "/groupRoute",
            t,
            Some(format!(
                r#"{{"userId": {alice}, "msg": "x", "clientMsgId": "{id}", "groupName": "all"}}"#
            )),
        ),
        (
            "group/create groupName all",
            "/group/create",
            t,
            Some(format!(r#"{{"userId": {alice}, "groupName": "all"}}"#)),
        ),
        (
            "group/join groupName empty",
            "/group/join",
            t,
            Some(format!(r#"{{"userId": {alice}, "groupName": ""}}"#)),
        ),
        (
            "group/leave groupName 65 chars",
            "/group/leave",
            t,
            Some(format!(
                r#"{{"userId": {alice}, "groupName": "{}"}}"#,
                "g".repeat(65)
            )),
        ),
        (
            "register name all",
            "/registerAccount",
            None,
            Some(r#"{"userName": "ALL", "password": "pw-123456"}"#.into()),
        ),
        (
            "register name with a space",
            "/registerAccount",
            None,
            Some(r#"{"userName": "a b", "password": "pw-123456"}"#.into()),
        ),
        (
            "register password short",
            "/registerAccount",
            None,
            Some(r#"{"userName": "carol", "password": "short"}"#.into()),
        ),
    ];
    let mut wrong = Vec::new();
    for (label, path, token, body) in &cases {
        let (status, v) = answer(&f, path, *token, body.as_deref()).await;
        if status != 400 || v["code"] != "3000" {
            wrong.push(format!("{label}: {status} {v}"));
        } else {
            assert_refusal(label, &v, "3000");
        }
    }
    assert!(wrong.is_empty(), "not 400 + 3000:\n{}", wrong.join("\n"));

    // At the edges the document allows, nothing is refused as invalid.
    let max = api::MAX_ID;
    let (status, v) = answer(
        &f,
        &format!("/history?conv=all&limit=100&beforeSeq={max}"),
        t,
        None,
    )
    .await;
    assert_eq!((status, code(&v)), (200, "9000"), "{v}");
    let (status, v) = answer(&f, "/history?conv=g:All&limit=1", t, None).await;
    assert_eq!(status, 403, "a group one is not in: {v}");
    let (status, v) = answer(&f, &format!("/history?conv=p:0:{max}"), t, None).await;
    assert_eq!(status, 403, "a conversation of two others: {v}");
    let (status, v) = answer(
        &f,
        "/userNames",
        t,
        Some(&format!(r#"{{"userIds": [{max}, 0]}}"#)),
    )
    .await;
    assert_eq!(
        (status, &v["dataBody"]),
        (200, &json!({"users": []})),
        "{v}"
    );
    let login = format!(r#"{{"userId": {max}, "userName": "alice", "password": "pw-123456"}}"#);
    let (status, v) = answer(&f, "/login", None, Some(&login)).await;
    assert_eq!((status, code(&v)), (200, "9100"), "no such account: {v}");
    // 1024 characters of 4 bytes each: the longest text, and exactly --max-body.
    let send = format!(
        r#"{{"userId": {alice}, "msg": "{}", "clientMsgId": "{}"}}"#,
        "😀".repeat(1024),
        uuid(2)
    );
    let (status, v) = answer(&f, "/groupRoute", t, Some(&send)).await;
    assert_eq!(
        (status, code(&v)),
        (200, "9000"),
        "a body of exactly --max-body: {v}"
    );
    let send = format!(
        r#"{{"userId": {alice}, "msg": "", "clientMsgId": "{}", "groupName": "rust"}}"#,
        uuid(3).to_uppercase()
    );
    let (status, v) = answer(&f, "/groupRoute", t, Some(&send)).await;
    assert_eq!((status, code(&v)), (200, "4000"), "no such group yet: {v}");

    // null where the document says nullable: as if left out (older SDKs sent it so).
    let to_all = format!(
        r#"{{"userId": {alice}, "msg": "x", "clientMsgId": "{}", "groupName": null}}"#,
        uuid(4)
    );
    let (status, v) = answer(&f, "/groupRoute", t, Some(&to_all)).await;
    assert_eq!((status, code(&v)), (200, "9000"), "{v}");
    assert_eq!(v["dataBody"]["conv"], "all", "{v}");
    let login = format!(
        r#"{{"userId": {alice}, "userName": "alice", "password": "pw-123456", "resumeToken": null}}"#
    );
    let (status, v) = answer(&f, "/login", None, Some(&login)).await;
    assert_eq!(
        (status, code(&v)),
        (200, "5000"),
        "online elsewhere, no proof: {v}"
    );

    // Well-formed but not so: a pair in the wrong order names no conversation (404), a
    // taken name conflicts (409); neither is 200 with 3000.
    let (status, v) = answer(&f, &format!("/history?conv=p:{bob}:{alice}"), t, None).await;
    assert_eq!(status, 404, "{v}");
    assert_refusal("p:<high>:<low>", &v, "4000");
    let to_self = format!(
        r#"{{"userId": {alice}, "receiveUserId": {alice}, "msg": "x", "clientMsgId": "{id}"}}"#
    );
    let (status, v) = answer(&f, "/p2pRoute", t, Some(&to_self)).await;
    assert_eq!(status, 404, "{v}");
    assert_refusal("a private message to oneself", &v, "4000");
    let (status, v) = answer(
        &f,
        "/registerAccount",
        None,
        Some(r#"{"userName": "Alice", "password": "pw-123456"}"#),
    )
    .await;
    assert_eq!(status, 409, "{v}");
    assert_refusal("a taken name", &v, "3000");
}

#[tokio::test]
async fn the_served_document_states_this_routes_limits() {
    let mut o = options();
    o.login.min_password_len = 12;
    o.delivery.max_body = 100;
    let f = Fixture::start_with_options(MemoryRegistry::new(), o.clone()).await;
    let (status, doc) = f.get("/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc, route::openapi_document_for(&o));
    let password = &doc["paths"]["/registerAccount"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"]["properties"]["password"];
    assert_eq!(password["minLength"], json!(12), "{password}");
    let msg = &doc["paths"]["/p2pRoute"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        ["properties"]["msg"];
    assert_eq!(
        msg["maxLength"],
        json!(25),
        "a quarter of --max-body: {msg}"
    );
    // And the route holds to them: 11 characters are a 400, 12 are not.
    let (status, v) = f
        .post_raw(
            "/registerAccount",
            None,
            r#"{"userName": "ann", "password": "12345678901"}"#,
        )
        .await;
    assert_eq!((status.as_u16(), code(&v)), (400, "3000"), "{v}");
    let (status, v) = f
        .post_raw(
            "/registerAccount",
            None,
            r#"{"userName": "ann", "password": "123456789012"}"#,
        )
        .await;
    assert_eq!((status.as_u16(), code(&v)), (200, "9000"), "{v}");
}
