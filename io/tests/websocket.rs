//! The servers' WebSocket gateway over real sockets, with tokio-tungstenite as the client: a
//! login through the route and a chat with a TCP (SDK) client, then each bad input the TCP
//! gateway's tests cover (text, oversize and undecodable messages), the browser rules
//! (`Origin`, a slow or oversized upgrade request), the node's own kicks (idle, drain) as
//! close codes, and `wss://` with a test CA.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cim_core::accounts::PasswordParams;
use cim_core::client::{ClientConfig, ClientEvent};
use cim_core::ids::{ConvId, ServerId, UserId};
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_io::api;
use cim_io::clock::Clock;
use cim_io::net::TokioNet;
use cim_io::registry::MemoryRegistry;
use cim_io::route::{self, RouteHandle, RouteOptions};
use cim_io::sdk::{Client, Events, RouteApi, SdkOptions, ServerTransport};
use cim_io::server::ws::OriginPolicy;
use cim_io::server::{self, ServerHandle, ServerOptions};
use cim_io::store::{MemoryBackend, Store};
use cim_io::tls::Role;
use cim_io::tls::dev::{DevCa, LeafSpec, write_key};
use cim_io::tls::setup::{ServerSide, TlsFlags};
use cim_io::tls::{ClientTls, ClientTlsSettings};
use cim_proto::frame::Kind;
use cim_proto::{ErrorCode, Frame, KickReason, Login, Ping};
use futures::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

const TICKET_SECRET: &[u8] = b"ws-test-ticket-secret";
const LINK_SECRET: &[u8] = b"ws-test-link-secret";
const PASSWORD: &str = "ws-test-password";
const WAIT: Duration = Duration::from_secs(10);
const ORIGIN: &str = "https://chat.example";

/// One server with its WebSocket gateway on, one route, a memory store and registry.
struct Env {
    server: Option<ServerHandle>,
    route: RouteHandle,
    _registry: MemoryRegistry,
}

fn keys() -> TicketKeys {
    TicketKeys::new(1, TICKET_SECRET.to_vec())
}

fn server_options() -> ServerOptions {
    let mut options = ServerOptions::new(
        ServerConfig::new(ServerId::new("s1"), keys()),
        LINK_SECRET.to_vec(),
    );
    options.listen_ip = Ipv4Addr::LOCALHOST.into();
    (options.client_port, options.link_port, options.http_port) = (0, 0, 0);
    options.ws_port = Some(0);
    options.ws_origins = OriginPolicy::from_list(&[ORIGIN]).unwrap();
    options
}

async fn start(tweak: impl FnOnce(&mut ServerOptions)) -> Env {
    let store: Arc<dyn Store> = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
    let registry = MemoryRegistry::new();
    let mut options = server_options();
    tweak(&mut options);
    let server = server::start(TokioNet, Clock::System, options, store.clone(), &registry)
        .await
        .expect("server starts");
    let mut route_options = RouteOptions::new(
        "r1",
        keys(),
        b"ws-test-bearer".to_vec(),
        LINK_SECRET.to_vec(),
    );
    route_options.http_listen = "127.0.0.1:0".parse().unwrap();
    route_options.login.password = PasswordParams::for_tests();
    route_options.link_retry_delay = Duration::from_millis(100);
    // The slow-consumer test's large bodies; the server's own `max_body` still bounds sends.
    route_options.delivery.max_body = 60_000;
    let route = route::start(TokioNet, Clock::System, route_options, store, &registry)
        .await
        .expect("route starts");
    Env {
        server: Some(server),
        route,
        _registry: registry,
    }
}

impl Env {
    fn server(&self) -> &ServerHandle {
        self.server.as_ref().expect("server running")
    }

    fn api(&self) -> RouteApi<TokioNet> {
        RouteApi::new(TokioNet, "127.0.0.1", self.route.http_addr().port(), WAIT)
    }

    fn ws_port(&self) -> u16 {
        self.server()
            .ws_addr()
            .expect("WebSocket gateway on")
            .port()
    }

    /// Registers `name` and logs in over the route: (user, the login answer).
    async fn login(&self, name: &str) -> (UserId, api::LoginResponse) {
        let api = self.api();
        let registered = api.register(name, PASSWORD).await.expect("register");
        let login = api
            .login(&api::LoginRequest {
                resume_secret: None,
                user_id: registered.user_id,
                user_name: name.into(),
                password: PASSWORD.into(),
                resume_token: None,
            })
            .await
            .expect("login");
        (UserId(registered.user_id), login)
    }

    /// A WebSocket client logged in through the route: dialled at the answer's `wsUrl`.
    async fn ws_user(&self, name: &str) -> (UserId, Ws) {
        let (user, login) = self.login(name).await;
        (user, self.ws_attach(user, &login).await)
    }

    /// Connects at the login answer's `wsUrl` and logs in with its ticket.
    async fn ws_attach(&self, user: UserId, login: &api::LoginResponse) -> Ws {
        let url = login
            .endpoint
            .as_ref()
            .and_then(|e| e.ws_url.clone())
            .expect("the login answer names the WebSocket gateway");
        assert_eq!(url, format!("ws://127.0.0.1:{}/", self.ws_port()));
        let mut ws = ws_connect(&url, Some(ORIGIN)).await.expect("upgrade");
        send(&mut ws, login_frame(&login.ticket)).await;
        match recv(&mut ws).await {
            Kind::LoginOk(ok) => assert_eq!(ok.user_id, user.0),
            other => panic!("expected LoginOk, got {other:?}"),
        }
        ws
    }

    /// An SDK (TCP gateway) client of a fresh user, online.
    async fn tcp_user(&self, name: &str) -> (UserId, Client<TokioNet>, Events) {
        self.sdk_user(name, ServerTransport::Tcp).await
    }

    /// An SDK client of a fresh user, online through the given gateway.
    async fn sdk_user(
        &self,
        name: &str,
        transport: ServerTransport,
    ) -> (UserId, Client<TokioNet>, Events) {
        let registered = self.api().register(name, PASSWORD).await.unwrap();
        let user = UserId(registered.user_id);
        let mut config = ClientConfig::new(user, name, PASSWORD, cim_io::launch::os_seed());
        config.ack_delay = Duration::from_millis(10);
        let mut options = SdkOptions::new("127.0.0.1", self.route.http_addr().port(), config);
        options.server_transport = transport;
        let (client, mut events) = Client::start(TokioNet, Clock::System, options);
        loop {
            match next_event(&mut events).await {
                ClientEvent::Online { .. } => break,
                ClientEvent::Stopped(reason) => panic!("stopped: {reason:?}"),
                _ => {}
            }
        }
        (user, client, events)
    }

    async fn metrics(&self) -> String {
        http_get(self.server().http_addr().port(), "/metrics").await
    }
}

type Ws = WebSocketStream<TcpStream>;

async fn ws_connect(url: &str, origin: Option<&str>) -> Result<Ws, WsError> {
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    let addr = url
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_owned();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    Ok(ws)
}

fn login_frame(ticket: &str) -> Frame {
    Frame {
        kind: Some(Kind::Login(Login {
            ticket: Some(api::decode_ticket(ticket).unwrap()),
        })),
    }
}

async fn send<S>(ws: &mut WebSocketStream<S>, frame: Frame)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::Binary(frame.encode_to_vec().into()))
        .await
        .expect("send");
}

/// The next WebSocket message of any kind (ping/pong included), within `WAIT`.
async fn next_message<S>(ws: &mut WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("a message in time")
        .expect("the connection is open")
        .expect("a message")
}

/// The next frame; every frame is one binary message.
async fn recv<S>(ws: &mut WebSocketStream<S>) -> Kind
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match next_message(ws).await {
            Message::Binary(body) => {
                return Frame::decode(body.as_ref())
                    .expect("a frame")
                    .kind
                    .expect("a kind");
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}

/// The close frame that ends the connection: (code, reason).
async fn closed_with(ws: &mut Ws) -> (CloseCode, String) {
    loop {
        match next_message(ws).await {
            Message::Close(Some(close)) => return (close.code, close.reason.to_string()),
            Message::Close(None) => panic!("closed without a code"),
            Message::Binary(body) => panic!(
                "frame after the last one: {:?}",
                Frame::decode(body.as_ref())
            ),
            _ => continue,
        }
    }
}

async fn next_event(events: &mut Events) -> ClientEvent {
    tokio::time::timeout(WAIT, events.next())
        .await
        .expect("an event in time")
        .expect("the client is running")
}

async fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .unwrap();
    answer
}

/// A Ping frame answered by a Pong: the connection is served.
async fn still_served(ws: &mut Ws, nonce: u64) {
    send(
        ws,
        Frame {
            kind: Some(Kind::Ping(Ping { nonce })),
        },
    )
    .await;
    loop {
        match recv(ws).await {
            Kind::Pong(pong) if pong.nonce == nonce => return,
            Kind::Pong(_) => continue,
            other => panic!("expected Pong, got {other:?}"),
        }
    }
}

fn send_frame(conv: &ConvId, body: &str, id: u64) -> Frame {
    Frame {
        kind: Some(Kind::Send(cim_proto::Send {
            msg_id_hi: 7,
            msg_id_lo: id,
            conv: conv.to_string(),
            body: Bytes::from(body.to_owned()),
            sent_at_ms: 0,
            order_stream: 0,
            order_seq: 0,
            order_after: 0,
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_and_a_tcp_client_chat_through_one_node() {
    let env = start(|_| {}).await;
    let (web, mut ws) = env.ws_user("web").await;
    let (tcp, client, mut events) = env.tcp_user("tcp").await;
    let private = ConvId::private(web, tcp).unwrap();

    // WebSocket to TCP: acknowledged over the WebSocket, delivered over TCP.
    send(&mut ws, send_frame(&private, "from the browser", 1)).await;
    loop {
        match recv(&mut ws).await {
            Kind::SendAck(ack) => {
                assert_eq!(
                    (ack.msg_id_lo, ack.conv.as_str()),
                    (1, private.to_string().as_str())
                );
                break;
            }
            // Its own message may come back as a Deliver first.
            Kind::Deliver(_) => continue,
            other => panic!("expected SendAck, got {other:?}"),
        }
    }
    loop {
        if let ClientEvent::Message(m) = next_event(&mut events).await
            && m.body.as_ref() == b"from the browser"
        {
            assert_eq!(m.conv, private);
            break;
        }
    }

    // TCP to WebSocket: one Deliver frame in one binary message.
    client
        .send(private.clone(), Bytes::from("from the terminal"))
        .await
        .unwrap();
    loop {
        if let Kind::Deliver(deliver) = recv(&mut ws).await {
            let message = deliver.message.expect("a message");
            if message.body.as_ref() == b"from the terminal" {
                assert_eq!(message.sender, tcp.0);
                break;
            }
        }
    }

    // WebSocket pings are answered by the WebSocket layer; CIM pings by the node.
    ws.send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .unwrap();
    loop {
        match next_message(&mut ws).await {
            Message::Pong(payload) => {
                assert_eq!(payload.as_ref(), b"are you there");
                break;
            }
            Message::Binary(_) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
    still_served(&mut ws, 42).await;

    // An operator tells the two gateways apart.
    let metrics = env.metrics().await;
    assert!(
        metrics.contains(
            "cim_server_connections_by_transport{server_id=\"s1\",transport=\"websocket\"} 1\n"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "cim_server_connections_by_transport{server_id=\"s1\",transport=\"tcp\"} 1\n"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("cim_server_ws_upgrades_total{server_id=\"s1\"} 1\n"),
        "{metrics}"
    );

    // A close from the browser ends the session as an EOF does: the user goes offline.
    ws.close(None).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = env.metrics().await;
        if metrics.contains("transport=\"websocket\"} 0\n") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the WebSocket session never ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.shutdown().await;
}

/// The SDK's own WebSocket transport (what `cim-bench --transport websocket` drives): the
/// same client machine over the browser's gateway, both ways with a TCP client, and back
/// online over the WebSocket after the server cuts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_chats_over_the_websocket_gateway() {
    let env = start(|_| {}).await;
    let (web, web_client, mut web_events) =
        env.sdk_user("sdkweb", ServerTransport::WebSocket).await;
    let (tcp, tcp_client, mut tcp_events) = env.tcp_user("sdktcp").await;
    let metrics = env.metrics().await;
    assert!(
        metrics.contains(
            "cim_server_connections_by_transport{server_id=\"s1\",transport=\"websocket\"} 1\n"
        ),
        "the SDK's WebSocket client is on the WebSocket gateway: {metrics}"
    );
    let private = ConvId::private(web, tcp).unwrap();
    for i in 0..3 {
        let body = format!("web to tcp {i}");
        web_client
            .send(private.clone(), Bytes::from(body.clone()))
            .await
            .expect("acknowledged over the WebSocket");
        loop {
            if let ClientEvent::Message(m) = next_event(&mut tcp_events).await
                && m.body.as_ref() == body.as_bytes()
            {
                assert_eq!(m.sender, web);
                break;
            }
        }
        let body = format!("tcp to web {i}");
        tcp_client
            .send(private.clone(), Bytes::from(body.clone()))
            .await
            .unwrap();
        loop {
            if let ClientEvent::Message(m) = next_event(&mut web_events).await
                && m.body.as_ref() == body.as_bytes()
            {
                assert_eq!(m.sender, tcp);
                break;
            }
        }
    }
    web_client.shutdown().await;
    tcp_client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_the_typed_error_and_a_close_code_while_others_are_served() {
    let env = start(|options| options.max_frame = 1024).await;
    let (_, mut bystander) = env.ws_user("bystander").await;
    let url = format!("ws://127.0.0.1:{}/", env.ws_port());

    // A text message: not part of the protocol.
    let mut ws = ws_connect(&url, None).await.unwrap();
    ws.send(Message::text("{\"login\":{}}")).await.unwrap();
    match recv(&mut ws).await {
        Kind::Error(error) => assert_eq!(error.code(), ErrorCode::MalformedFrame),
        other => panic!("expected Error, got {other:?}"),
    }
    let (code, reason) = closed_with(&mut ws).await;
    assert_eq!(code, CloseCode::Unsupported, "{reason}");
    assert!(reason.contains("binary"), "{reason}");

    // A text message that is not even UTF-8 (the library refuses it before the gateway
    // sees it): the same close code, not a normal close.
    let mut ws = ws_connect(&url, None).await.unwrap();
    let raw = tokio_tungstenite::tungstenite::protocol::frame::Frame::message(
        Bytes::from_static(b"\xff\xfe"),
        tokio_tungstenite::tungstenite::protocol::frame::coding::OpCode::Data(
            tokio_tungstenite::tungstenite::protocol::frame::coding::Data::Text,
        ),
        true,
    );
    ws.send(Message::Frame(raw)).await.unwrap();
    let (code, reason) = closed_with(&mut ws).await;
    assert_eq!(code, CloseCode::Unsupported, "{reason}");

    // A message over the frame limit.
    let mut ws = ws_connect(&url, None).await.unwrap();
    ws.send(Message::Binary(vec![0u8; 1025].into()))
        .await
        .unwrap();
    match recv(&mut ws).await {
        Kind::Error(error) => assert_eq!(error.code(), ErrorCode::FrameTooLarge),
        other => panic!("expected Error, got {other:?}"),
    }
    assert_eq!(closed_with(&mut ws).await.0, CloseCode::Size);

    // A binary message that is no frame.
    let mut ws = ws_connect(&url, None).await.unwrap();
    ws.send(Message::Binary(Bytes::from_static(b"\xff\xff\xff\xff")))
        .await
        .unwrap();
    match recv(&mut ws).await {
        Kind::Error(error) => assert_eq!(error.code(), ErrorCode::MalformedFrame),
        other => panic!("expected Error, got {other:?}"),
    }
    assert_eq!(closed_with(&mut ws).await.0, CloseCode::Invalid);

    // A frame the node refuses (a forged ticket): its Error code, as an application close.
    let mut ws = ws_connect(&url, None).await.unwrap();
    let (_, login) = env.login("forger").await;
    let mut ticket = api::decode_ticket(&login.ticket).unwrap();
    ticket.mac[0] ^= 1;
    send(
        &mut ws,
        Frame {
            kind: Some(Kind::Login(Login {
                ticket: Some(ticket),
            })),
        },
    )
    .await;
    match recv(&mut ws).await {
        Kind::Error(error) => assert_eq!(error.code(), ErrorCode::BadTicket),
        other => panic!("expected Error, got {other:?}"),
    }
    assert_eq!(
        u16::from(closed_with(&mut ws).await.0),
        4100 + ErrorCode::BadTicket as u16
    );

    // The logged-in connection never noticed.
    still_served(&mut bystander, 7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_websocket_client_is_kicked_by_the_heartbeat_timeout() {
    let env = start(|options| {
        options.node.heartbeat_interval = Duration::from_millis(100);
        options.node.idle_timeout = Duration::from_millis(400);
    })
    .await;
    let (_, mut ws) = env.ws_user("quiet").await;
    // WebSocket pings keep the socket alive but are no CIM heartbeat: the node hears nothing.
    let started = tokio::time::Instant::now();
    match recv(&mut ws).await {
        Kind::Kick(kick) => assert_eq!(kick.reason(), KickReason::Idle),
        other => panic!("expected Kick, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        u16::from(closed_with(&mut ws).await.0),
        4000 + KickReason::Idle as u16
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_reaches_websocket_clients_as_going_away() {
    let mut env = start(|_| {}).await;
    let (_, mut ws) = env.ws_user("leaving").await;
    let server = env.server.take().unwrap();
    let drained = tokio::spawn(server.drain());
    match recv(&mut ws).await {
        Kind::Kick(kick) => assert_eq!(kick.reason(), KickReason::Draining),
        other => panic!("expected Kick, got {other:?}"),
    }
    assert_eq!(closed_with(&mut ws).await.0, CloseCode::Away);
    drained.await.unwrap().expect("drained in time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_from_another_login_kicks_the_websocket_session() {
    let env = start(|_| {}).await;
    let (user, first) = env.login("twice").await;
    let mut ws = env.ws_attach(user, &first).await;
    // The same user logs in again with the session's resume token (another tab, or the
    // terminal): the route has the server kick the old session before it answers.
    let again = env
        .api()
        .login(&api::LoginRequest {
            resume_secret: None,
            user_id: user.0,
            user_name: "twice".into(),
            password: PASSWORD.into(),
            resume_token: Some(first.resume_token.clone()),
        })
        .await
        .expect("second login");
    assert!(again.epoch > first.epoch);
    match recv(&mut ws).await {
        Kind::Kick(kick) => assert_eq!(kick.reason(), KickReason::TakenOver),
        other => panic!("expected Kick, got {other:?}"),
    }
    assert_eq!(
        u16::from(closed_with(&mut ws).await.0),
        4000 + KickReason::TakenOver as u16
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_client_that_stops_reading_is_kicked_as_a_slow_consumer() {
    let env = start(|options| {
        options.node.max_outbound_frames = 8;
        options.node.max_body = 60_000;
        options.node.send_rate_per_sec = 10_000;
        options.node.send_burst = 10_000;
        // Long enough that the final Kick is still being flushed when the client reads.
        options.io_timeout = Duration::from_secs(30);
    })
    .await;
    let (_, login) = env.login("reader").await;
    let reader = UserId(login.user_id);
    // A small receive buffer, so the server's writes block soon once nothing is read.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket
        .connect(([127, 0, 0, 1], env.ws_port()).into())
        .await
        .unwrap();
    let url = format!("ws://127.0.0.1:{}/", env.ws_port());
    let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tcp)
        .await
        .unwrap();
    send(&mut ws, login_frame(&login.ticket)).await;
    // (LoginOk is read with the rest, below.)

    let (sender, client, _events) = env.tcp_user("sender").await;
    let conv = ConvId::private(reader, sender).unwrap();
    let body = Bytes::from(vec![b'x'; 50_000]);
    let mut sent = 0;
    loop {
        client.send(conv.clone(), body.clone()).await.unwrap();
        sent += 1;
        if env
            .metrics()
            .await
            .contains("reason=\"slow_consumer\"} 1\n")
        {
            break;
        }
        assert!(
            sent < 1000,
            "never kicked after {sent} messages of 50 kB unread"
        );
    }
    // Reading again: what was queued before the kick, then the Kick and the close.
    let mut delivered = 0;
    loop {
        match next_message(&mut ws).await {
            Message::Binary(body) => match Frame::decode(body.as_ref()).unwrap().kind {
                Some(Kind::Deliver(_)) => delivered += 1,
                Some(Kind::LoginOk(_)) => {}
                Some(Kind::Kick(kick)) => {
                    assert_eq!(kick.reason(), KickReason::SlowConsumer);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        delivered < sent,
        "{delivered} of {sent} delivered before the kick"
    );
    assert_eq!(
        u16::from(closed_with(&mut ws).await.0),
        4000 + KickReason::SlowConsumer as u16
    );
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_past_the_connection_limit_is_closed_before_the_upgrade() {
    let env = start(|options| options.node.max_connections = 1).await;
    let (_, mut first) = env.ws_user("first").await;
    let url = format!("ws://127.0.0.1:{}/", env.ws_port());
    // The node's connections and the upgrades in progress share the cap: with the one place
    // taken, a second socket is closed at the accept, before it can hold a descriptor for a
    // header timeout.
    assert!(
        ws_connect(&url, None).await.is_err(),
        "upgraded past the cap"
    );
    let metrics = env.metrics().await;
    assert!(
        metrics.contains("cim_server_ws_refusals_total{server_id=\"s1\",reason=\"busy\"} 1"),
        "{metrics}"
    );
    still_served(&mut first, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_outside_the_list_are_refused_before_the_upgrade() {
    let env = start(|_| {}).await;
    let url = format!("ws://127.0.0.1:{}/", env.ws_port());
    match ws_connect(&url, Some("https://evil.example")).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 403),
        Err(other) => panic!("expected 403, got {other}"),
        Ok(_) => panic!("a disallowed origin was upgraded"),
    }
    // The allowed origin, and a client sending none (not a browser), are let in.
    ws_connect(&url, Some(ORIGIN))
        .await
        .expect("allowed origin");
    ws_connect(&url, None).await.expect("no origin");
    let metrics = env.metrics().await;
    assert!(
        metrics.contains("cim_server_ws_refusals_total{server_id=\"s1\",reason=\"origin\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_oversized_upgrade_request_is_closed_and_others_are_served() {
    let env = start(|options| options.ws_header_timeout = Duration::from_millis(300)).await;
    let port = env.ws_port();

    // Half a request line, then silence: closed by the header timeout.
    let mut slow = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: s1\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    // Meanwhile a whole upgrade goes through.
    let (_, mut ws) = env.ws_user("patient").await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the slow request was never closed");
    assert!(
        rest.is_empty(),
        "answered: {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    still_served(&mut ws, 1).await;

    // A head past the limit: 431, before the timeout.
    let mut large = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut head = b"GET / HTTP/1.1\r\nhost: s1\r\n".to_vec();
    while head.len() <= cim_io::server::ws::MAX_HEAD {
        head.extend_from_slice(b"x-padding: 0123456789012345678901234567890123456789\r\n");
    }
    let _ = large.write_all(&head).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WAIT, large.read_to_end(&mut answer)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431 "),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );

    // Plain HTTP on this port: 426, naming the version.
    let answer = http_get(port, "/").await;
    assert!(answer.starts_with("HTTP/1.1 426 "), "{answer}");
    assert!(answer.contains("sec-websocket-version: 13"), "{answer}");

    let metrics = env.metrics().await;
    assert!(
        metrics.contains("reason=\"header_timeout\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_the_gateways_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::new("cim ws test CA").unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let pair = ca
        .issue(&LeafSpec::new(
            &["127.0.0.1", "localhost"],
            Some(Role::Server),
        ))
        .unwrap();
    let (cert, key) = (dir.path().join("s1.pem"), dir.path().join("s1-key.pem"));
    std::fs::write(&cert, &pair.cert).unwrap();
    write_key(&key, &pair.key).unwrap();
    let side = ServerSide::load(
        &TlsFlags {
            cert: Some(cert),
            key: Some(key),
            ca: Some(ca_file.clone()),
            accept_plaintext: false,
        },
        "127.0.0.1",
    )
    .unwrap()
    .expect("TLS configured");
    let gateway = side.gateway.clone();
    let env = start(|options| {
        options.gateway_tls = Some(side.gateway);
        options.link_tls = None;
        options.ws_header_timeout = Duration::from_millis(300);
    })
    .await;
    let port = env.ws_port();

    // A TLS hello begun, then silence: the handshake and the request head share the header
    // timeout, so it is closed at 300 ms, long before the TLS handshake's own 10 s.
    let mut stalled = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        cim_io::tls::DEFAULT_HANDSHAKE_TIMEOUT / 2,
        stalled.read_to_end(&mut rest),
    )
    .await;
    assert!(
        closed.is_ok(),
        "a stalled TLS hello outlived the header timeout"
    );
    let metrics = env.metrics().await;
    assert!(
        metrics.contains("reason=\"header_timeout\"} 1\n"),
        "{metrics}"
    );

    // The login answer says wss (the route itself is plain HTTP here).
    let (user, login) = env.login("secure").await;
    let url = login
        .endpoint
        .as_ref()
        .and_then(|e| e.ws_url.clone())
        .unwrap();
    assert_eq!(url, format!("wss://127.0.0.1:{port}/"));

    let trust = ClientTls::load(ClientTlsSettings {
        ca: Some(ca_file),
        ..ClientTlsSettings::default()
    })
    .unwrap();
    let handshakes = gateway
        .stats()
        .handshakes
        .load(std::sync::atomic::Ordering::Relaxed);
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let tls = trust
        .connect(tcp, "127.0.0.1")
        .await
        .expect("TLS handshake");
    let (mut ws, _) = tokio_tungstenite::client_async(url.as_str(), tls)
        .await
        .expect("upgrade over TLS");
    send(&mut ws, login_frame(&login.ticket)).await;
    match recv(&mut ws).await {
        Kind::LoginOk(ok) => assert_eq!(ok.user_id, user.0),
        other => panic!("expected LoginOk, got {other:?}"),
    }
    assert!(
        gateway
            .stats()
            .handshakes
            .load(std::sync::atomic::Ordering::Relaxed)
            > handshakes,
        "the handshake went through the gateway's TLS (its counters and reloads)"
    );

    // Plaintext on the wss port gets no upgrade.
    match ws_connect(&format!("ws://127.0.0.1:{port}/"), None).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 400),
        Err(other) => panic!("expected 400, got {other}"),
        Ok(_) => panic!("a plaintext upgrade on the wss port"),
    }
}

/// Resident memory of this process, in KiB (Linux).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// What an idle connection costs the server, TCP against WebSocket: `N` connections of
/// each kind held open (not logged in), the process's resident memory before and after.
/// The clients are bare sockets (the upgrade written by hand), so the growth is the
/// server's. A measurement, not a check: run with `--ignored --nocapture`, and with
/// `CIM_MEASURE=tcp` or `=websocket` to measure one kind in a fresh process (the second kind
/// measured in one process reuses what the allocator kept from the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; prints numbers"]
async fn measure_idle_connection_memory() {
    const N: usize = 2000;
    cim_io::fd_limit::raise_file_limit();
    let env = start(|options| {
        options.node.login_timeout = Duration::from_secs(120);
        options.node.idle_timeout = Duration::from_secs(120);
    })
    .await;
    let upgrade = b"GET / HTTP/1.1\r\nhost: s1\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let only = std::env::var("CIM_MEASURE").ok();
    for (kind, port) in [
        ("tcp", env.server().client_addr().port()),
        ("websocket", env.ws_port()),
    ] {
        if only.as_deref().is_some_and(|only| only != kind) {
            continue;
        }
        let before = rss_kib();
        let mut held = Vec::with_capacity(N);
        for _ in 0..N {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            if kind == "websocket" {
                stream.write_all(upgrade).await.unwrap();
                let mut answer = [0u8; 512];
                let n = stream.read(&mut answer).await.unwrap();
                assert!(answer[..n].starts_with(b"HTTP/1.1 101"));
            }
            held.push(stream);
        }
        // Every connection has reached the driver (a metrics scrape goes through it after).
        let deadline = tokio::time::Instant::now() + WAIT;
        while !env
            .metrics()
            .await
            .contains(&format!("transport=\"{kind}\"}} {N}\n"))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{kind}: not all held"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let after = rss_kib();
        println!(
            "{kind}: {N} idle connections, RSS {before} KiB -> {after} KiB, {:.1} KiB each",
            (after.saturating_sub(before)) as f64 / N as f64
        );
        drop(held);
        let deadline = tokio::time::Instant::now() + WAIT;
        while !env
            .metrics()
            .await
            .contains(&format!("transport=\"{kind}\"}} 0\n"))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{kind}: not all closed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
