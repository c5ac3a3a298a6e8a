//! The server shell over real sockets: the test plays the clients and the route (it dials
//! the link port and does the route's side of the handshake), writes claims into the store
//! as the route's login would, and mints tickets with the server's keys.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cim_core::ids::{ClientMsgId, ConvId, Epoch, ServerId, UnixMillis, UserId};
use cim_core::link_auth::{route_answer, route_check};
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::tickets::{Grant, TicketKeys};
use cim_core::server::ServerConfig;
use cim_core::store::{Claim, StoreCommand, StoreReply};
use cim_io::clock::Clock;
use cim_io::http_client::HttpClient;
use cim_io::net::{self, FrameReader, FrameWriter, Network, ReadError, Stream, TokioNet, framed};
use cim_io::registry::{MemoryRegistry, Registry};
use cim_io::server::{ServerHandle, ServerOptions, start};
use cim_io::store::{MemoryBackend, Store};
use cim_proto::codec::FrameCodec;
use cim_proto::frame::Kind;
use cim_proto::{
    ErrorCode, Frame, KickReason, KickUser, Login, Message, Ping, Push, PushBatch, RouteSend,
    RouteSendResult, Send, SendAck, Ticket,
};
use cim_sim_hosts::TurmoilNet;
use hyper::{Method, StatusCode};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(5);
const LINK_SECRET: &[u8] = b"test-link-secret";
const TICKET_SECRET: &[u8] = b"test-ticket-secret";

struct Env {
    id: ServerId,
    keys: TicketKeys,
    store: Arc<MemoryBackend>,
    registry: MemoryRegistry,
    server: ServerHandle,
}

fn wall() -> UnixMillis {
    Clock::System.wall()
}

async fn start_server(id: &str, tweak: impl FnOnce(&mut ServerOptions)) -> Env {
    let keys = TicketKeys::new(1, TICKET_SECRET.to_vec());
    let store = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
    let registry = MemoryRegistry::new();
    let config = ServerConfig::new(ServerId::new(id), keys.clone());
    let mut options = ServerOptions::new(config, LINK_SECRET.to_vec());
    options.listen_ip = Ipv4Addr::LOCALHOST.into();
    options.client_port = 0;
    options.link_port = 0;
    options.http_port = 0;
    tweak(&mut options);
    let dyn_store: Arc<dyn Store> = store.clone();
    let server = start(TokioNet, Clock::System, options, dyn_store, &registry)
        .await
        .expect("server starts");
    Env {
        id: ServerId::new(id),
        keys,
        store,
        registry,
        server,
    }
}

impl Env {
    async fn exec(&self, command: StoreCommand) -> StoreReply {
        self.store
            .execute(wall(), command)
            .await
            .expect("memory store answers")
    }

    async fn register(&self, name: &str) -> UserId {
        let command = StoreCommand::RegisterAccount {
            name: name.into(),
            password_hash: "phc".into(),
        };
        match self.exec(command).await {
            StoreReply::AccountRegistered(Ok(user)) => user,
            other => panic!("register {name}: {other:?}"),
        }
    }

    /// Writes the next claim of `user` for this server, as the route's login does.
    async fn claim(&self, user: UserId) -> Epoch {
        let StoreReply::Claim(state) = self.exec(StoreCommand::LoadClaim { user }).await else {
            panic!("LoadClaim answers Claim");
        };
        let epoch = state.epoch.next();
        let claim = Claim {
            resume_secret: None,
            epoch,
            server: self.id.clone(),
            lease_until: wall().plus(Duration::from_secs(30)),
            resume_token_hash: [0; 32],
        };
        let command = StoreCommand::ReplaceClaim {
            user,
            expected: state.epoch,
            claim,
        };
        match self.exec(command).await {
            StoreReply::ClaimReplaced(Ok(_)) => epoch,
            other => panic!("claim of {user}: {other:?}"),
        }
    }

    fn ticket(&self, user: UserId, epoch: Epoch) -> Ticket {
        self.keys.mint(&Grant {
            user,
            server: self.id.clone(),
            epoch,
            expires_at: wall().plus(Duration::from_secs(30)),
        })
    }

    async fn connect(&self) -> Peer {
        Peer::dial(self.server.client_addr().port()).await
    }

    /// A client that starts by writing raw bytes, bypassing the codec.
    async fn connect_raw(&self, bytes: &[u8]) -> Peer {
        let port = self.server.client_addr().port();
        let mut stream = net::connect(&TokioNet, "127.0.0.1", port, T)
            .await
            .expect("dial");
        stream.write_all(bytes).await.expect("raw write");
        let (reader, writer) = framed(stream, FrameCodec::default());
        Peer { reader, writer }
    }

    /// A registered user with a claim, logged in: (client, user, epoch).
    async fn logged_in(&self, name: &str) -> (Peer, UserId, Epoch) {
        let user = self.register(name).await;
        let epoch = self.claim(user).await;
        let mut client = self.connect().await;
        client
            .send(Kind::Login(Login {
                ticket: Some(self.ticket(user, epoch)),
            }))
            .await;
        match client.recv().await.kind {
            Some(Kind::LoginOk(ok)) => {
                assert_eq!((ok.user_id, ok.epoch), (user.0, epoch.0));
                assert_eq!(ok.server_id, self.id.0);
            }
            other => panic!("expected LoginOk, got {other:?}"),
        }
        (client, user, epoch)
    }

    async fn route(&self) -> Peer {
        dial_route(self.server.link_addr().port(), LINK_SECRET)
            .await
            .expect("route link authenticates")
    }

    async fn http(&self, path: &str) -> (StatusCode, String) {
        let client = HttpClient::new(TokioNet, "127.0.0.1", self.server.http_addr().port(), T);
        let (status, body) = client
            .request(Method::GET, path, None, None)
            .await
            .expect("http answers");
        (
            status,
            String::from_utf8(body.to_vec()).expect("utf-8 body"),
        )
    }

    async fn health(&self) -> (StatusCode, serde_json::Value) {
        let (status, body) = self.http("/health").await;
        (status, serde_json::from_str(&body).expect("health is JSON"))
    }

    /// Waits until the server has `n` authenticated route links (a link is usable once
    /// the server's driver has it, just after the route read LinkAuthOk).
    async fn wait_links(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let (_, health) = self.health().await;
            if health["links"] == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never got {n} links: {health}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One framed TCP peer: a client of the gateway or a route on the link port.
struct Peer<S: Stream = TcpStream> {
    reader: FrameReader<ReadHalf<S>>,
    writer: FrameWriter<WriteHalf<S>>,
}

impl Peer {
    async fn dial(port: u16) -> Self {
        Self::dial_on(&TokioNet, "127.0.0.1", port).await
    }
}

impl<S: Stream> Peer<S> {
    async fn dial_on<N: Network<Stream = S>>(net: &N, host: &str, port: u16) -> Self {
        let stream = net::connect(net, host, port, T).await.expect("dial");
        let (reader, writer) = framed(stream, FrameCodec::default());
        Self { reader, writer }
    }

    async fn send(&mut self, kind: Kind) {
        let frame = Frame { kind: Some(kind) };
        self.writer.write_frame(&frame, T).await.expect("write");
    }

    async fn recv(&mut self) -> Frame {
        self.reader.read_frame(T).await.expect("a frame")
    }

    /// The next frame is an Error with `code`, and then the server closes the connection.
    async fn expect_error_then_close(&mut self, code: ErrorCode) {
        match self.recv().await.kind {
            Some(Kind::Error(e)) => assert_eq!(e.code, code as i32, "{e:?}"),
            other => panic!("expected Error {code:?}, got {other:?}"),
        }
        self.expect_closed().await;
    }

    async fn expect_kick_then_close(&mut self, reason: KickReason) {
        match self.recv().await.kind {
            Some(Kind::Kick(k)) => assert_eq!(k.reason, reason as i32, "{k:?}"),
            other => panic!("expected Kick {reason:?}, got {other:?}"),
        }
        self.expect_closed().await;
    }

    /// The server closes: no more frames, then EOF (or a reset).
    async fn expect_closed(&mut self) {
        match self.reader.read_frame(T).await {
            Err(ReadError::Closed | ReadError::Truncated | ReadError::Io(_)) => {}
            Err(ReadError::Timeout(_)) => panic!("connection still open after {T:?}"),
            other => panic!("expected the connection to close, got {other:?}"),
        }
    }

    async fn ping_pong(&mut self, nonce: u64) {
        self.send(Kind::Ping(Ping { nonce })).await;
        match self.recv().await.kind {
            Some(Kind::Pong(p)) => assert_eq!(p.nonce, nonce),
            other => panic!("expected Pong, got {other:?}"),
        }
    }

    async fn send_msg(&mut self, lo: u64, body: &str) {
        self.send(Kind::Send(Send {
            msg_id_hi: 7,
            msg_id_lo: lo,
            conv: "all".into(),
            body: body.as_bytes().to_vec().into(),
            sent_at_ms: wall().0,
            ..Default::default()
        }))
        .await;
    }

    async fn recv_route_send(&mut self) -> RouteSend {
        match self.recv().await.kind {
            Some(Kind::RouteSend(send)) => send,
            other => panic!("expected RouteSend, got {other:?}"),
        }
    }
}

/// The route's side of the link handshake; `Err` if the server closes instead.
async fn dial_route(port: u16, secret: &[u8]) -> Result<Peer, String> {
    dial_route_on(&TokioNet, "127.0.0.1", port, secret).await
}

async fn dial_route_on<N: Network>(
    net: &N,
    host: &str,
    port: u16,
    secret: &[u8],
) -> Result<Peer<N::Stream>, String> {
    let mut route = Peer::dial_on(net, host, port).await;
    let hello = match route.recv().await.kind {
        Some(Kind::LinkHello(hello)) => hello,
        other => panic!("expected LinkHello, got {other:?}"),
    };
    assert!(
        hello.nonce.len() >= 16,
        "nonce of {} bytes",
        hello.nonce.len()
    );
    let auth = route_answer(secret, &hello, "r1", &[9; 16]).expect("server nonce is valid");
    route.send(Kind::LinkAuth(auth.clone())).await;
    match route.reader.read_frame(T).await {
        Ok(Frame {
            kind: Some(Kind::LinkAuthOk(ok)),
        }) => {
            route_check(secret, &hello, &auth, &ok).map_err(|e| e.to_string())?;
            Ok(route)
        }
        Ok(other) => panic!("expected LinkAuthOk, got {other:?}"),
        Err(e) => Err(e.to_string()),
    }
}

fn ack_for(send: &RouteSend, seq: u64) -> RouteSendResult {
    let msg = send.send.as_ref().expect("RouteSend carries the Send");
    RouteSendResult {
        request_id: send.request_id,
        user_id: send.user_id,
        ack: Some(SendAck {
            msg_id_hi: msg.msg_id_hi,
            msg_id_lo: msg.msg_id_lo,
            conv: msg.conv.clone(),
            log_epoch: 99,
            seq,
        }),
        nack: None,
    }
}

#[tokio::test]
async fn login_with_a_good_ticket_then_ping_pong() {
    let env = start_server("s1", |_| {}).await;
    let (mut alice, _, _) = env.logged_in("alice").await;
    alice.ping_pong(42).await;
    alice.ping_pong(43).await;
}

#[tokio::test]
async fn bad_tickets_get_an_error_and_are_closed() {
    let env = start_server("s1", |_| {}).await;
    let user = env.register("alice").await;
    let epoch = env.claim(user).await;

    // Signed with another secret.
    let forged = TicketKeys::new(1, b"not-the-secret".to_vec()).mint(&Grant {
        user,
        server: env.id.clone(),
        epoch,
        expires_at: wall().plus(T),
    });
    // Expired beyond the 2 s skew allowance.
    let expired = env.keys.mint(&Grant {
        user,
        server: env.id.clone(),
        epoch,
        expires_at: UnixMillis(wall().0 - 10_000),
    });
    // For another server.
    let elsewhere = env.keys.mint(&Grant {
        user,
        server: ServerId::new("s2"),
        epoch,
        expires_at: wall().plus(T),
    });
    let cases = [
        (forged, ErrorCode::BadTicket),
        (expired, ErrorCode::TicketExpired),
        (elsewhere, ErrorCode::WrongServer),
    ];
    for (ticket, code) in cases {
        let mut client = env.connect().await;
        client
            .send(Kind::Login(Login {
                ticket: Some(ticket),
            }))
            .await;
        client.expect_error_then_close(code).await;
    }

    // A valid ticket whose epoch the store has moved past (a newer login took the claim).
    let newer = env.claim(user).await;
    assert!(newer > epoch);
    let mut client = env.connect().await;
    client
        .send(Kind::Login(Login {
            ticket: Some(env.ticket(user, epoch)),
        }))
        .await;
    client.expect_error_then_close(ErrorCode::StaleEpoch).await;

    // The failures are counted, and the server still logs the newer ticket in.
    let (_, metrics) = env.http("/metrics").await;
    assert!(
        metrics.contains("cim_server_logins_total{server_id=\"s1\",result=\"failed\"} 4\n"),
        "{metrics}"
    );
    let mut client = env.connect().await;
    client
        .send(Kind::Login(Login {
            ticket: Some(env.ticket(user, newer)),
        }))
        .await;
    assert!(matches!(client.recv().await.kind, Some(Kind::LoginOk(_))));
}

#[tokio::test]
async fn a_send_goes_over_the_link_and_its_result_comes_back_as_send_ack() {
    let env = start_server("s1", |_| {}).await;
    let mut route = env.route().await;
    env.wait_links(1).await;
    let (mut alice, user, epoch) = env.logged_in("alice").await;

    alice.send_msg(1, "hello").await;
    let send = route.recv_route_send().await;
    assert_eq!((send.user_id, send.epoch), (user.0, epoch.0));
    let msg = send.send.clone().expect("the Send");
    assert_eq!((msg.msg_id_lo, &msg.body[..]), (1, &b"hello"[..]));

    route.send(Kind::RouteSendResult(ack_for(&send, 1))).await;
    match alice.recv().await.kind {
        Some(Kind::SendAck(ack)) => {
            assert_eq!((ack.msg_id_hi, ack.msg_id_lo, ack.seq), (7, 1, 1));
        }
        other => panic!("expected SendAck, got {other:?}"),
    }
}

#[tokio::test]
async fn a_push_is_delivered_to_the_recipients_connection_only() {
    let env = start_server("s1", |_| {}).await;
    let mut route = env.route().await;
    env.wait_links(1).await;
    let (mut alice, alice_id, _) = env.logged_in("alice").await;
    let (mut bob, bob_id, _) = env.logged_in("bob").await;

    let message = Message {
        conv: format!("p:{}:{}", alice_id.0, bob_id.0),
        log_epoch: 5,
        seq: 1,
        sender: alice_id.0,
        msg_id_hi: 1,
        msg_id_lo: 2,
        body: b"hi bob".to_vec().into(),
        appended_at_ms: wall().0,
    };
    route
        .send(Kind::PushBatch(PushBatch {
            pushes: vec![Push {
                message: Some(message.clone()),
                recipients: vec![bob_id.0],
                all_sessions: false,
            }],
        }))
        .await;
    match bob.recv().await.kind {
        Some(Kind::Deliver(d)) => assert_eq!(d.message, Some(message)),
        other => panic!("expected Deliver, got {other:?}"),
    }
    // Alice got nothing: her next frame is the answer to her ping.
    alice.ping_pong(1).await;

    // The route's link pings are answered with the same nonce.
    route.ping_pong(77).await;
}

#[tokio::test]
async fn kick_user_kicks_the_session_and_answers_on_the_link() {
    let env = start_server("s1", |_| {}).await;
    let mut route = env.route().await;
    env.wait_links(1).await;
    let (mut alice, user, epoch) = env.logged_in("alice").await;
    let (mut bob, _, _) = env.logged_in("bob").await;

    // A kick below the live epoch leaves the session alone (an older takeover, late).
    route
        .send(Kind::KickUser(KickUser {
            user_id: user.0,
            below_epoch: epoch.0,
            reason: KickReason::TakenOver as i32,
        }))
        .await;
    match route.recv().await.kind {
        Some(Kind::KickUserDone(done)) => assert_eq!(done.below_epoch, epoch.0),
        other => panic!("expected KickUserDone, got {other:?}"),
    }
    alice.ping_pong(1).await;

    route
        .send(Kind::KickUser(KickUser {
            user_id: user.0,
            below_epoch: epoch.0 + 1,
            reason: KickReason::TakenOver as i32,
        }))
        .await;
    match route.recv().await.kind {
        Some(Kind::KickUserDone(done)) => {
            assert_eq!((done.user_id, done.below_epoch), (user.0, epoch.0 + 1));
        }
        other => panic!("expected KickUserDone, got {other:?}"),
    }
    alice.expect_kick_then_close(KickReason::TakenOver).await;
    bob.ping_pong(2).await;
}

#[tokio::test]
async fn a_server_rotating_its_link_secret_accepts_routes_on_either() {
    const NEW: &[u8] = b"the-new-link-secret";
    let env = start_server("s1", |o| {
        o.link_secret = NEW.to_vec();
        o.link_secret_previous = Some(LINK_SECRET.to_vec());
    })
    .await;
    let port = env.server.link_addr().port();
    // A route still on the old secret and one already on the new one both link (each
    // checks the server's answer with the secret it used).
    dial_route(port, LINK_SECRET)
        .await
        .expect("old secret accepted");
    dial_route(port, NEW).await.expect("new secret accepted");
    // Anything else is refused.
    assert!(dial_route(port, b"some-other-secret").await.is_err());
}

#[tokio::test]
async fn a_link_with_a_bad_mac_is_closed_and_never_carries_sends() {
    let env = start_server("s1", |_| {}).await;
    let refused = dial_route(env.server.link_addr().port(), b"wrong-secret").await;
    assert!(refused.is_err(), "a route without the secret was accepted");

    // With no authenticated link, a send fails at once as retryable.
    let (mut alice, _, _) = env.logged_in("alice").await;
    alice.send_msg(1, "nobody to route this").await;
    match alice.recv().await.kind {
        Some(Kind::SendNack(nack)) => {
            assert_eq!(nack.code, ErrorCode::Unavailable as i32);
            assert!(nack.retryable);
        }
        other => panic!("expected SendNack, got {other:?}"),
    }
    let (_, metrics) = env.http("/metrics").await;
    assert!(
        metrics.contains("cim_server_link_auth_failures_total{server_id=\"s1\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cim_server_route_links{server_id=\"s1\"} 0\n"),
        "{metrics}"
    );

    // A route that does know the secret gets the resend.
    let mut route = env.route().await;
    env.wait_links(1).await;
    alice.send_msg(1, "nobody to route this").await;
    assert_eq!(route.recv_route_send().await.send.unwrap().msg_id_lo, 1);
}

#[tokio::test]
async fn a_fetch_of_a_conversation_the_user_is_not_in_tells_nothing() {
    let env = start_server("s1", |_| {}).await;
    let (mut alice, alice_id, _) = env.logged_in("alice").await;
    // A private conversation of two others, with messages in it.
    let mut others = Vec::new();
    for name in ["bob", "carol"] {
        let registered = env
            .exec(StoreCommand::RegisterAccount {
                name: name.into(),
                password_hash: "phc".into(),
            })
            .await;
        let StoreReply::AccountRegistered(Ok(user)) = registered else {
            panic!("{registered:?}");
        };
        others.push(user);
    }
    let (low, high) = (others[0], others[1]);
    assert!(alice_id != low && alice_id != high);
    let private = ConvId::private(low, high).unwrap();
    for id in 1..=3 {
        let reply = env
            .exec(StoreCommand::Append {
                conv: private.clone(),
                sender: low,
                msg_id: ClientMsgId(id),
                body: Bytes::from_static(b"not for alice"),
                now: wall(),
                order: None,
                members_known: None,
            })
            .await;
        assert!(matches!(reply, StoreReply::Appended(Ok(_))), "{reply:?}");
    }
    for conv in [private.to_string(), "g:nobody-made-this".to_owned()] {
        alice
            .send(Kind::FetchRequest(cim_proto::FetchRequest {
                conv: conv.clone(),
                log_epoch: 0,
                after_seq: 0,
                limit: 10,
            }))
            .await;
        match alice.recv().await.kind {
            Some(Kind::Error(error)) => {
                assert_eq!(error.code(), ErrorCode::NotMember, "{conv}");
            }
            other => panic!("{conv}: expected Error NOT_MEMBER, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_client_gateway_cap_is_clamped_to_the_open_file_limit() {
    let env = start_server("s1", |o| o.node.max_connections = usize::MAX).await;
    let limit = cim_io::fd_limit::file_limit().expect("unix has an open-file limit");
    let (_, metrics) = env.http("/metrics").await;
    let cap = cim_io::fd_limit::connection_budget(limit);
    assert!(
        metrics.contains(&format!(
            "cim_server_max_connections{{server_id=\"s1\"}} {cap}\n"
        )),
        "{metrics}"
    );
    assert!((cap as u64) < limit);
}

#[tokio::test]
async fn a_flood_of_bad_links_is_counted_and_its_warnings_rate_limited() {
    const FLOOD: u64 = 50;
    let env = start_server("s1", |_| {}).await;
    let port = env.server.link_addr().port();
    for _ in 0..FLOOD {
        assert!(dial_route(port, b"an-attackers-guess").await.is_err());
    }
    let (_, metrics) = env.http("/metrics").await;
    let value = |name: &str| -> u64 {
        let prefix = format!("{name}{{server_id=\"s1\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
            .parse()
            .unwrap()
    };
    assert_eq!(value("cim_server_link_auth_failures_total"), FLOOD);
    // One warning line per 10 s: whatever the pace, most of the flood is left out of the
    // log and counted instead.
    let suppressed = value("cim_server_warnings_suppressed_total");
    assert!(
        (FLOOD / 2..FLOOD).contains(&suppressed),
        "{suppressed} of {FLOOD} warnings suppressed"
    );
}

#[tokio::test]
async fn a_users_sends_stay_on_one_link_and_fail_over_when_it_dies() {
    let env = start_server("s1", |_| {}).await;
    let mut links = [env.route().await, env.route().await];
    env.wait_links(2).await;
    let (mut alice, _, _) = env.logged_in("alice").await;

    alice.send_msg(1, "one").await;
    let (on, first) = recv_either(&mut links).await;
    assert_eq!(first.send.unwrap().msg_id_lo, 1);
    // Send one is unanswered, so send two takes the same link: it cannot overtake.
    alice.send_msg(2, "two").await;
    assert_eq!(links[on].recv_route_send().await.send.unwrap().msg_id_lo, 2);

    // The link dies with both sends unanswered: each is failed back, retryable.
    let [a, b] = links;
    let (dead, mut survivor) = if on == 0 { (a, b) } else { (b, a) };
    drop(dead);
    for _ in 0..2 {
        match alice.recv().await.kind {
            Some(Kind::SendNack(nack)) => {
                assert_eq!(nack.code, ErrorCode::Unavailable as i32);
                assert!(nack.retryable);
            }
            other => panic!("expected SendNack, got {other:?}"),
        }
    }
    env.wait_links(1).await;
    alice.send_msg(1, "one").await;
    let send = survivor.recv_route_send().await;
    assert_eq!(send.send.as_ref().unwrap().msg_id_lo, 1);
    survivor
        .send(Kind::RouteSendResult(ack_for(&send, 1)))
        .await;
    assert!(matches!(alice.recv().await.kind, Some(Kind::SendAck(_))));
}

#[tokio::test]
async fn users_spread_their_sends_over_every_route_link() {
    let env = start_server("s1", |_| {}).await;
    let mut links = [env.route().await, env.route().await];
    env.wait_links(2).await;
    let mut per_link = [0; 2];
    for i in 0..8 {
        let (mut client, _, _) = env.logged_in(&format!("user{i}")).await;
        client.send_msg(1, "hi").await;
        let (on, send) = recv_either(&mut links).await;
        links[on]
            .send(Kind::RouteSendResult(ack_for(&send, 1)))
            .await;
        assert!(matches!(client.recv().await.kind, Some(Kind::SendAck(_))));
        per_link[on] += 1;
    }
    assert!(
        per_link.iter().all(|n| *n > 0),
        "sends per link: {per_link:?}"
    );
}

/// The next RouteSend on either link, and which link carried it.
async fn recv_either(links: &mut [Peer; 2]) -> (usize, RouteSend) {
    let [a, b] = links;
    tokio::select! {
        send = a.recv_route_send() => (0, send),
        send = b.recv_route_send() => (1, send),
    }
}

#[tokio::test]
async fn undecodable_bytes_close_only_that_client() {
    let env = start_server("s1", |_| {}).await;
    let (mut alice, _, _) = env.logged_in("alice").await;

    // A length prefix that is not a varint of at most 10 bytes.
    let mut garbage = env.connect_raw(&[0xff; 12]).await;
    garbage
        .expect_error_then_close(ErrorCode::MalformedFrame)
        .await;

    // A declared length far over the maximum frame: refused before any allocation.
    let mut oversized = env.connect_raw(&[0x80, 0x80, 0x80, 0x08]).await; // 16 MiB
    oversized
        .expect_error_then_close(ErrorCode::FrameTooLarge)
        .await;

    // A well-framed body that is not protobuf.
    let mut malformed = env.connect_raw(&[3, 0xff, 0xff, 0xff]).await;
    malformed
        .expect_error_then_close(ErrorCode::MalformedFrame)
        .await;

    alice.ping_pong(5).await;
    let (_, metrics) = env.http("/metrics").await;
    assert!(
        metrics.contains("cim_server_protocol_errors_total{server_id=\"s1\"} 3\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_connection_limit_refuses_extra_connections() {
    let env = start_server("s1", |o| o.node.max_connections = 1).await;
    let (mut alice, _, _) = env.logged_in("alice").await;
    let mut extra = env.connect().await;
    extra.expect_closed().await;
    alice.ping_pong(1).await;
    let (_, metrics) = env.http("/metrics").await;
    assert!(
        metrics.contains("cim_server_refused_connections_total{server_id=\"s1\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn registered_with_real_ports_while_up_and_gone_after_drain() {
    let env = start_server("s1", |_| {}).await;
    let view = env.registry.watch().await.unwrap();
    let listed = view.snapshot().get(&env.id).cloned().expect("registered");
    assert_eq!(listed.host, "127.0.0.1");
    assert_eq!(listed.client_port, env.server.client_addr().port());
    assert_eq!(listed.link_port, env.server.link_addr().port());
    assert_eq!(listed.http_port, env.server.http_addr().port());
    assert_ne!(listed.client_port, 0);

    let mut route = env.route().await;
    env.wait_links(1).await;
    let (mut alice, _, _) = env.logged_in("alice").await;
    let (mut bob, _, _) = env.logged_in("bob").await;
    let client_port = env.server.client_addr().port();

    let draining = tokio::spawn(env.server.drain());
    match alice.recv().await.kind {
        Some(Kind::Kick(k)) => assert_eq!(k.reason, KickReason::Draining as i32),
        other => panic!("expected Kick, got {other:?}"),
    }
    // The server left the registry before kicking anyone, so no route sends a client back.
    assert!(!view.snapshot().contains_key(&env.id), "still registered");
    alice.expect_closed().await;
    bob.expect_kick_then_close(KickReason::Draining).await;
    draining.await.unwrap().expect("drains in time");
    route.expect_closed().await;
    // The listeners are closed too.
    assert!(
        net::connect(&TokioNet, "127.0.0.1", client_port, T)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_connection_count_is_republished() {
    let env = start_server("s1", |o| {
        o.registry_update_interval = Duration::from_millis(50);
    })
    .await;
    let view = env.registry.watch().await.unwrap();
    let (_alice, _, _) = env.logged_in("alice").await;
    let _idle = env.connect().await;
    let id = env.id.clone();
    view.wait_until(T, |m| m.get(&id).is_some_and(|s| s.connections == 2))
        .await
        .expect("connection count published");
}

#[tokio::test]
async fn health_and_metrics_and_fencing_on_registry_loss() {
    let env = start_server("s1", |_| {}).await;
    let (mut alice, _, _) = env.logged_in("alice").await;

    let (status, health) = env.health().await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["serverId"], "s1");
    assert_eq!(health["sessions"], 1);
    assert_eq!(health["connections"], 1);

    let (status, metrics) = env.http("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains("cim_server_logins_total{server_id=\"s1\",result=\"ok\"} 1\n"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE cim_server_sessions gauge\n"));

    // The registry session expires: routes may hand alice to another server, so this one
    // fences her, and reports itself degraded.
    assert!(env.registry.expire_session(&env.id));
    alice.expect_kick_then_close(KickReason::Fenced).await;
    let (status, health) = env.health().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["registry"], "expired");
    assert_eq!(health["store"], "ok");

    // Healed: healthy again, and new logins work.
    assert!(env.registry.heal_session(&env.id));
    let (status, _) = env.health().await;
    assert_eq!(status, StatusCode::OK);
    let (mut carol, _, _) = env.logged_in("carol").await;
    carol.ping_pong(3).await;
    let (_, metrics) = env.http("/metrics").await;
    assert!(
        metrics.contains("cim_server_kicks_total{server_id=\"s1\",reason=\"fenced\"} 1\n"),
        "{metrics}"
    );
}

#[tokio::test]
async fn abort_drops_every_connection_and_the_registration() {
    let env = start_server("s1", |_| {}).await;
    let view = env.registry.watch().await.unwrap();
    let mut route = env.route().await;
    let (mut alice, _, _) = env.logged_in("alice").await;
    let Env { server, id, .. } = env;
    server.abort();
    alice.expect_closed().await;
    route.expect_closed().await;
    view.wait_until(T, |m| !m.contains_key(&id))
        .await
        .expect("entry removed with the aborted server");
}

/// The same shell runs over turmoil's simulated network (the simulation suites build on this):
/// a login, a ping, a link handshake and a health check, in simulated time.
#[test]
fn serves_over_the_simulated_network() {
    const ORIGIN: UnixMillis = UnixMillis(1_800_000_000_000);
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(60))
        .build();
    let keys = TicketKeys::new(1, TICKET_SECRET.to_vec());
    let store = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
    let registry = MemoryRegistry::new();
    let id = ServerId::new("s1");
    {
        let (keys, store, registry) = (keys.clone(), store.clone(), registry.clone());
        sim.host("server", move || {
            let (keys, store, registry) = (keys.clone(), store.clone(), registry.clone());
            async move {
                let config = ServerConfig::new(ServerId::new("s1"), keys);
                let mut options = ServerOptions::new(config, LINK_SECRET.to_vec());
                options.advertise_host = "server".into();
                let store: Arc<dyn Store> = store;
                let clock = Clock::simulated(ORIGIN);
                let mut server = start(TurmoilNet, clock, options, store, &registry).await?;
                server.stopped().await?;
                Ok(())
            }
        });
    }
    sim.client("test", async move {
        let clock = Clock::simulated(ORIGIN);
        let view = registry.watch().await?;
        let listed = view.wait_until(T, |m| m.contains_key(&id)).await?;
        let ports = &listed[&id];
        assert_eq!((ports.host.as_str(), ports.client_port), ("server", 11211));

        let name = "alice".to_owned();
        let reply = store
            .execute(
                clock.wall(),
                StoreCommand::RegisterAccount {
                    name,
                    password_hash: "phc".into(),
                },
            )
            .await?;
        let StoreReply::AccountRegistered(Ok(user)) = reply else {
            panic!("{reply:?}")
        };
        let claim = Claim {
            resume_secret: None,
            epoch: Epoch(1),
            server: id.clone(),
            lease_until: clock.wall().plus(Duration::from_secs(30)),
            resume_token_hash: [0; 32],
        };
        let command = StoreCommand::ReplaceClaim {
            user,
            expected: Epoch(0),
            claim,
        };
        let reply = store.execute(clock.wall(), command).await?;
        assert!(
            matches!(reply, StoreReply::ClaimReplaced(Ok(_))),
            "{reply:?}"
        );

        let mut client = Peer::dial_on(&TurmoilNet, "server", 11211).await;
        let ticket = keys.mint(&Grant {
            user,
            server: id.clone(),
            epoch: Epoch(1),
            expires_at: clock.wall().plus(Duration::from_secs(30)),
        });
        client
            .send(Kind::Login(Login {
                ticket: Some(ticket),
            }))
            .await;
        assert!(matches!(client.recv().await.kind, Some(Kind::LoginOk(_))));
        client.ping_pong(9).await;

        let mut route = dial_route_on(&TurmoilNet, "server", 11311, LINK_SECRET).await?;
        route.ping_pong(10).await;

        let http = HttpClient::new(TurmoilNet, "server", 8081, T);
        let (status, body) = http.request(Method::GET, "/health", None, None).await?;
        assert_eq!(status, StatusCode::OK, "{body:?}");
        Ok(())
    });
    sim.run().expect("simulation passes");
}

#[test]
fn options_debug_never_prints_secrets() {
    let ticket_secret = b"ticket-secret-in-debug".to_vec();
    let (link, link_previous) = ("link-secret-in-debug", "link-previous-in-debug");
    let keys = TicketKeys::new(1, ticket_secret.clone());
    let mut server = ServerOptions::new(
        ServerConfig::new(ServerId::new("s1"), keys.clone()),
        link.as_bytes().to_vec(),
    );
    server.link_secret_previous = Some(link_previous.as_bytes().to_vec());
    let mut route = cim_io::route::RouteOptions::new(
        "r1",
        keys,
        b"bearer-secret-in-debug".to_vec(),
        link.as_bytes().to_vec(),
    );
    route.bearer_secret_previous = Some(b"bearer-previous-in-debug".to_vec());
    route.link_secret_previous = Some(link_previous.as_bytes().to_vec());
    for text in [format!("{server:?}"), format!("{route:?}")] {
        // Secrets as text, and as the byte list a derived `Debug` of a `Vec<u8>` prints.
        for secret in [
            "ticket-secret-in-debug",
            link,
            link_previous,
            "bearer-secret-in-debug",
            "bearer-previous-in-debug",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
            let bytes = format!("{:?}", secret.as_bytes());
            let inner = bytes.trim_start_matches('[').trim_end_matches(']');
            assert!(!text.contains(inner), "{secret} (as bytes) in {text}");
        }
        assert!(text.contains("s1") || text.contains("r1"), "{text}");
    }
}
