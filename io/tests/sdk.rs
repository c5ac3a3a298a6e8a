//! The client SDK against a fake route (axum, `/login` minting real tickets) and a fake
//! server (framed TCP: LoginOk, Pong, SendAck, Deliver, Sync/Fetch answers), over real
//! sockets on port 0.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use bytes::Bytes;
use cim_core::client::{ClientConfig, ClientEvent, ConnectionLoss, LoginFailure, StopReason};
use cim_core::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UserId};
use cim_core::route::login::{LoginError, ResumeToken};
use cim_core::route::resumption::ResumptionSecret;
use cim_core::route::tickets::{Grant, TicketKeys};
use cim_io::api::{self, Envelope};
use cim_io::clock::Clock;
use cim_io::net::{AxumListener, Network, TokioNet, framed};
use cim_io::sdk::{ApiError, Client, Events, RouteApi, SdkOptions, SendError, state_file};
use cim_proto::codec::FrameCodec;
use cim_proto::frame::Kind;
use cim_proto::{self as proto, Frame};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(10);
const USER: UserId = UserId(7);
/// The fake server's `all` log, and the log epoch it acks sends under.
const ALL_EPOCH: u64 = 77;
const SEND_EPOCH: u64 = 55;

fn keys() -> TicketKeys {
    TicketKeys::new(1, b"test-secret".to_vec())
}

// ---------------------------------------------------------------------------------------
// Fake route

#[derive(Debug, Default)]
struct RouteState {
    server_port: u16,
    /// Codes to answer the next logins with, before succeeding again.
    login_failures: VecDeque<&'static str>,
    logins: Vec<api::LoginRequest>,
    /// Resume tokens handed out, in order.
    issued: Vec<String>,
    /// Send clients to the server over TLS.
    server_tls: bool,
}

type Route = Arc<Mutex<RouteState>>;

async fn route_login(
    State(route): State<Route>,
    Json(req): Json<api::LoginRequest>,
) -> Json<Envelope<api::LoginResponse>> {
    let mut r = route.lock().unwrap();
    r.logins.push(req.clone());
    if let Some(code) = r.login_failures.pop_front() {
        return Json(Envelope::error(code, "no"));
    }
    let epoch = r.logins.len() as u64;
    let ticket = keys().mint(&Grant {
        user: UserId(req.user_id),
        server: ServerId::new("s1"),
        epoch: Epoch(epoch),
        expires_at: Clock::System.wall().plus(Duration::from_secs(60)),
    });
    let resume_token = api::encode_resume_token(&ResumeToken([epoch as u8; 32]));
    r.issued.push(resume_token.clone());
    // A secret per answer, as the route issues them: the next login presents it.
    let resume_secret = Some(api::encode_resume_secret(&ResumptionSecret(
        [epoch as u8 ^ 0x5a; 32],
    )));
    Json(Envelope::ok(api::LoginResponse {
        resume_secret,
        user_id: req.user_id,
        epoch,
        server_id: "s1".into(),
        endpoint: r.server_tls.then(|| cim_core::registry::ServerEndpoint {
            host: "127.0.0.1".into(),
            port: r.server_port,
            tls: true,
            ws_url: None,
        }),
        ip: "127.0.0.1".into(),
        cim_server_port: r.server_port,
        http_port: 0,
        ticket: api::encode_ticket(&ticket),
        token: format!("tok-{epoch}"),
        resume_token,
    }))
}

async fn route_create_group(
    Json(req): Json<api::GroupRequest>,
) -> (StatusCode, Json<Envelope<()>>) {
    match ConvId::group(&req.group_name) {
        Ok(_) => (StatusCode::OK, Json(Envelope::ok(()))),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(Envelope::error(api::CODE_VALIDATION, e.to_string())),
        ),
    }
}

async fn route_list_groups() -> Json<Envelope<api::GroupList>> {
    Json(Envelope::ok(api::GroupList {
        groups: vec!["rust".into()],
    }))
}

async fn route_register(
    Json(req): Json<api::RegisterRequest>,
) -> Json<Envelope<api::RegisterResponse>> {
    Json(Envelope::ok(api::RegisterResponse {
        user_id: 42,
        user_name: req.user_name,
    }))
}

async fn start_route(server_port: u16) -> (u16, Route) {
    let route: Route = Arc::new(Mutex::new(RouteState {
        server_port,
        ..RouteState::default()
    }));
    let app = axum::Router::new()
        .route("/login", post(route_login))
        .route("/group/create", post(route_create_group))
        .route("/group/list", get(route_list_groups))
        .route("/registerAccount", post(route_register))
        .with_state(route.clone());
    let listener = TokioNet.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let _ = axum::serve(AxumListener(listener), app).await;
    });
    (port, route)
}

// ---------------------------------------------------------------------------------------
// Fake server

enum Ctl {
    Frame(Frame),
    Drop,
}

#[derive(Default)]
struct ServerState {
    ack_sends: bool,
    /// Reads everything, answers nothing, keeps the connection open.
    mute: bool,
    /// Every Send frame's id, in arrival order (resends included).
    sends: Vec<ClientMsgId>,
    acks: u32,
    /// The `all` log (log epoch `ALL_EPOCH`).
    log: Vec<proto::Message>,
    cursors: Vec<proto::Cursor>,
    logins: u32,
    closed: u32,
    conn: Option<mpsc::UnboundedSender<Ctl>>,
}

type Server = Arc<Mutex<ServerState>>;

fn frame(kind: Kind) -> Frame {
    Frame { kind: Some(kind) }
}

fn all_head(s: &ServerState) -> proto::ConvHead {
    proto::ConvHead {
        conv: "all".into(),
        log_epoch: ALL_EPOCH,
        head_seq: s.log.len() as u64,
        first_available_seq: 1,
        cursor_seq: 0,
        carried_from_epoch: 0,
        carried_up_to: 0,
    }
}

fn answer(server: &Server, kind: Kind) -> Vec<Frame> {
    let mut s = server.lock().unwrap();
    if s.mute {
        return Vec::new();
    }
    match kind {
        Kind::Login(login) => {
            let verified = login.ticket.as_ref().map(|t| {
                keys().verify(
                    t,
                    &ServerId::new("s1"),
                    Clock::System.wall(),
                    Duration::from_secs(2),
                )
            });
            match verified {
                Some(Ok(grant)) => {
                    s.logins += 1;
                    vec![frame(Kind::LoginOk(proto::LoginOk {
                        user_id: grant.user.0,
                        epoch: grant.epoch.0,
                        server_id: "s1".into(),
                        heartbeat_interval_ms: 0,
                    }))]
                }
                _ => vec![frame(Kind::Error(proto::Error {
                    code: proto::ErrorCode::BadTicket as i32,
                    message: "bad ticket".into(),
                }))],
            }
        }
        Kind::Ping(ping) => vec![frame(Kind::Pong(proto::Pong { nonce: ping.nonce }))],
        Kind::Send(send) => {
            s.sends
                .push(ClientMsgId::from_halves(send.msg_id_hi, send.msg_id_lo));
            if !s.ack_sends {
                return Vec::new();
            }
            s.acks += 1;
            vec![frame(Kind::SendAck(proto::SendAck {
                msg_id_hi: send.msg_id_hi,
                msg_id_lo: send.msg_id_lo,
                conv: send.conv,
                log_epoch: SEND_EPOCH,
                seq: u64::from(s.acks),
            }))]
        }
        Kind::SyncRequest(_) => vec![frame(Kind::SyncAnswer(proto::SyncAnswer {
            more: false,
            incomplete: false,
            heads: vec![all_head(&s)],
        }))],
        Kind::FetchRequest(fetch) => {
            let messages = s
                .log
                .iter()
                .filter(|m| fetch.conv == "all" && m.seq > fetch.after_seq)
                .take(fetch.limit as usize)
                .cloned()
                .collect();
            vec![frame(Kind::FetchAnswer(proto::FetchAnswer {
                head: Some(all_head(&s)),
                messages,
            }))]
        }
        Kind::DeliverAck(ack) => {
            s.cursors.extend(ack.cursors);
            Vec::new()
        }
        _ => Vec::new(),
    }
}

async fn serve_conn(stream: tokio::net::TcpStream, server: Server) {
    let (mut reader, mut writer) = framed(stream, FrameCodec::default());
    let (ctl, mut ctl_rx) = mpsc::unbounded_channel();
    server.lock().unwrap().conn = Some(ctl);
    loop {
        tokio::select! {
            read = reader.next_frame() => {
                let Ok(Frame { kind: Some(kind) }) = read else { break };
                for reply in answer(&server, kind) {
                    if writer.write_frame(&reply, T).await.is_err() {
                        break;
                    }
                }
            }
            ctl = ctl_rx.recv() => match ctl {
                Some(Ctl::Frame(f)) => {
                    if writer.write_frame(&f, T).await.is_err() {
                        break;
                    }
                }
                Some(Ctl::Drop) | None => break,
            },
        }
    }
    server.lock().unwrap().closed += 1;
}

async fn start_server() -> (u16, Server) {
    let server: Server = Arc::new(Mutex::new(ServerState {
        ack_sends: true,
        ..ServerState::default()
    }));
    let listener = TokioNet.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let s = server.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_conn(stream, s.clone()));
        }
    });
    (port, server)
}

/// Appends to the `all` log and pushes it to the current connection.
fn push(server: &Server, text: &str) {
    let mut s = server.lock().unwrap();
    let seq = s.log.len() as u64 + 1;
    let message = proto::Message {
        conv: "all".into(),
        log_epoch: ALL_EPOCH,
        seq,
        sender: 99,
        msg_id_hi: 0,
        msg_id_lo: seq,
        body: text.as_bytes().to_vec().into(),
        appended_at_ms: 0,
    };
    s.log.push(message.clone());
    if let Some(conn) = &s.conn {
        let _ = conn.send(Ctl::Frame(frame(Kind::Deliver(proto::Deliver {
            message: Some(message),
        }))));
    }
}

fn drop_connection(server: &Server) {
    if let Some(conn) = server.lock().unwrap().conn.take() {
        let _ = conn.send(Ctl::Drop);
    }
}

/// Polls shared fake state until `cond` holds (at most `T`).
async fn until<S>(state: &Arc<Mutex<S>>, what: &str, cond: impl Fn(&S) -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    while !cond(&state.lock().unwrap()) {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Client side

struct Setup {
    route_port: u16,
    route: Route,
    server: Server,
}

async fn setup() -> Setup {
    let (server_port, server) = start_server().await;
    let (route_port, route) = start_route(server_port).await;
    Setup {
        route_port,
        route,
        server,
    }
}

fn options(setup: &Setup) -> SdkOptions {
    let mut config = ClientConfig::new(USER, "ann", "pw", 1);
    config.backoff_base = Duration::from_millis(10);
    config.backoff_cap = Duration::from_millis(50);
    config.ack_delay = Duration::from_millis(10);
    SdkOptions::new("127.0.0.1", setup.route_port, config)
}

/// Reads events until one matches; the skipped ones are in the panic message.
async fn expect(
    events: &mut Events,
    what: &str,
    pred: impl Fn(&ClientEvent) -> bool,
) -> ClientEvent {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(T, events.next()).await {
            Ok(Some(event)) if pred(&event) => return event,
            Ok(Some(event)) => seen.push(event),
            Ok(None) => panic!("events ended waiting for {what}; saw {seen:#?}"),
            Err(_) => panic!("timed out waiting for {what}; saw {seen:#?}"),
        }
    }
}

fn is_online(e: &ClientEvent) -> bool {
    matches!(e, ClientEvent::Online { .. })
}

#[tokio::test]
async fn comes_online_sends_with_ack_and_receives_pushes() {
    let setup = setup().await;
    let (client, mut events) = Client::start(TokioNet, Clock::System, options(&setup));
    let online = expect(&mut events, "Online", is_online).await;
    assert_eq!(
        online,
        ClientEvent::Online {
            server: ServerId::new("s1"),
            epoch: Epoch(1)
        }
    );
    assert_eq!(client.token().as_deref(), Some("tok-1"));

    let acked = client
        .send(ConvId::All, Bytes::from_static(b"hi"))
        .await
        .unwrap();
    assert_eq!(acked.conv, ConvId::All);
    assert_eq!(acked.log_epoch, LogEpoch(SEND_EPOCH));
    assert_eq!(acked.seq, 1);
    assert_eq!(setup.server.lock().unwrap().sends, vec![acked.msg_id]);
    let second = client
        .send(ConvId::All, Bytes::from_static(b"again"))
        .await
        .unwrap();
    assert_eq!(second.seq, 2);
    assert_ne!(second.msg_id, acked.msg_id);

    push(&setup.server, "hello");
    let ClientEvent::Message(message) = expect(&mut events, "Message", |e| {
        matches!(e, ClientEvent::Message(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(message.conv, ConvId::All);
    assert_eq!(message.seq, 1);
    assert_eq!(message.sender, UserId(99));
    assert_eq!(&message.body[..], b"hello");
    // The SDK acknowledges delivery so the server-side cursor moves.
    until(&setup.server, "DeliverAck for all:1", |s| {
        s.cursors
            .iter()
            .any(|c| c.conv == "all" && c.log_epoch == ALL_EPOCH && c.seq == 1)
    })
    .await;
    client.shutdown().await;
}

#[tokio::test]
async fn a_dropped_connection_reconnects_and_resends_with_the_same_id() {
    let setup = setup().await;
    setup.server.lock().unwrap().ack_sends = false;
    let (client, mut events) = Client::start(TokioNet, Clock::System, options(&setup));
    expect(&mut events, "Online", is_online).await;

    let sender = client.clone();
    let send =
        tokio::spawn(async move { sender.send(ConvId::All, Bytes::from_static(b"x")).await });
    until(&setup.server, "the first send", |s| s.sends.len() == 1).await;
    setup.server.lock().unwrap().ack_sends = true;
    drop_connection(&setup.server);

    let reconnecting = expect(&mut events, "Reconnecting", |e| {
        matches!(e, ClientEvent::Reconnecting { .. })
    })
    .await;
    assert!(
        matches!(
            reconnecting,
            ClientEvent::Reconnecting {
                attempt: 0,
                cause: ConnectionLoss::Disconnected,
                ..
            }
        ),
        "{reconnecting:?}"
    );
    let online = expect(&mut events, "Online again", is_online).await;
    assert!(matches!(
        online,
        ClientEvent::Online {
            epoch: Epoch(2),
            ..
        }
    ));

    let acked = tokio::time::timeout(T, send)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    {
        let s = setup.server.lock().unwrap();
        assert_eq!(s.sends, vec![acked.msg_id, acked.msg_id]);
        assert_eq!(s.acks, 1);
    }
    assert_eq!(acked.seq, 1);
    // The re-login proved the right to the old claim with the token the first login gave.
    {
        let r = setup.route.lock().unwrap();
        assert_eq!(r.logins.len(), 2);
        // The first login presents a token of the client's own making (not one issued).
        let own = r.logins[0]
            .resume_token
            .as_ref()
            .expect("a self-made token");
        assert!(!r.issued.contains(own));
        assert_eq!(r.logins[1].resume_token.as_ref(), Some(&r.issued[0]));
    }
    assert_eq!(client.token().as_deref(), Some("tok-2"));
    // Exactly one Acked event for the message.
    client.shutdown().await;
    let mut acks = 0;
    while let Some(event) = events.next().await {
        if matches!(event, ClientEvent::Acked { msg_id, .. } if msg_id == acked.msg_id) {
            acks += 1;
        }
    }
    assert_eq!(acks, 1);
}

#[tokio::test]
async fn a_silent_server_is_noticed_by_the_heartbeat() {
    let setup = setup().await;
    let mut opts = options(&setup);
    opts.session.heartbeat_interval = Duration::from_millis(50);
    opts.session.heartbeat_timeout = Duration::from_millis(100);
    let (client, mut events) = Client::start(TokioNet, Clock::System, opts);
    expect(&mut events, "Online", is_online).await;
    setup.server.lock().unwrap().mute = true;
    let lost = expect(&mut events, "Reconnecting", |e| {
        matches!(e, ClientEvent::Reconnecting { .. })
    })
    .await;
    assert!(
        matches!(
            lost,
            ClientEvent::Reconnecting {
                cause: ConnectionLoss::HeartbeatTimeout,
                ..
            }
        ),
        "{lost:?}"
    );
    setup.server.lock().unwrap().mute = false;
    expect(&mut events, "Online again", is_online).await;
    // The abandoned connection was closed by the client, not left open.
    until(&setup.server, "the old connection closed", |s| {
        s.closed >= 1
    })
    .await;
    client.shutdown().await;
}

#[tokio::test]
async fn repeat_login_backs_off_and_retries() {
    let setup = setup().await;
    setup
        .route
        .lock()
        .unwrap()
        .login_failures
        .push_back(api::CODE_REPEAT_LOGIN);
    let (client, mut events) = Client::start(TokioNet, Clock::System, options(&setup));
    let mut seen = Vec::new();
    loop {
        let event = expect(&mut events, "any event", |_| true).await;
        let online = is_online(&event);
        seen.push(event);
        if online {
            break;
        }
    }
    assert!(
        matches!(
            seen.as_slice(),
            [
                ClientEvent::LoggingIn,
                ClientEvent::Reconnecting {
                    attempt: 0,
                    cause: ConnectionLoss::LoginFailed(LoginFailure::Rejected(
                        LoginError::RepeatLogin
                    )),
                    ..
                },
                ClientEvent::LoggingIn,
                ClientEvent::Connecting { .. },
                ClientEvent::Online { .. },
            ]
        ),
        "{seen:#?}"
    );
    assert_eq!(setup.route.lock().unwrap().logins.len(), 2);
    // A failed login hands out no token.
    assert_eq!(client.token().as_deref(), Some("tok-2"));
    client.shutdown().await;
}

/// A re-login presents the last answer's resumption secret and no password; a refused one
/// (9110) is dropped and the same attempt goes on with the password, at once.
#[tokio::test]
async fn relogins_resume_and_a_refused_resumption_falls_back_to_the_password() {
    let setup = setup().await;
    let (client, mut events) = Client::start(TokioNet, Clock::System, options(&setup));
    expect(&mut events, "Online", is_online).await;
    setup
        .route
        .lock()
        .unwrap()
        .login_failures
        .push_back(api::CODE_RESUME_REFUSED);
    drop_connection(&setup.server);
    expect(&mut events, "LoggingIn", |e| {
        matches!(e, ClientEvent::LoggingIn)
    })
    .await;
    expect(&mut events, "Online", is_online).await;
    let logins = setup.route.lock().unwrap().logins.clone();
    assert_eq!(logins.len(), 3, "{logins:#?}");
    // First: the password. Second: the first answer's secret, no password (refused).
    // Third: the password again, no secret.
    assert_eq!(
        (logins[0].password.as_str(), &logins[0].resume_secret),
        ("pw", &None)
    );
    let first_secret = api::encode_resume_secret(&ResumptionSecret([1 ^ 0x5a; 32]));
    assert_eq!(logins[1].password, "");
    assert_eq!(
        logins[1].resume_secret.as_deref(),
        Some(first_secret.as_str())
    );
    assert_eq!(logins[1].resume_token, logins[2].resume_token);
    assert_eq!(
        (logins[2].password.as_str(), &logins[2].resume_secret),
        ("pw", &None)
    );
    // The secret of the answer that went through is kept for the next re-home.
    let state = client.snapshot().await.unwrap();
    assert_eq!(state.resume_secret, Some(ResumptionSecret([3 ^ 0x5a; 32])));
    client.shutdown().await;
}

#[tokio::test]
async fn account_mismatch_stops_the_session() {
    let setup = setup().await;
    setup
        .route
        .lock()
        .unwrap()
        .login_failures
        .push_back(api::CODE_ACCOUNT_MISMATCH);
    let (client, mut events) = Client::start(TokioNet, Clock::System, options(&setup));
    let rejected = expect(&mut events, "LoginRejected", |e| {
        matches!(e, ClientEvent::LoginRejected(_))
    })
    .await;
    assert_eq!(
        rejected,
        ClientEvent::LoginRejected(LoginError::AccountMismatch)
    );
    let stopped = expect(&mut events, "Stopped", |_| true).await;
    assert_eq!(stopped, ClientEvent::Stopped(StopReason::AccountMismatch));
    assert_eq!(client.token(), None);
    // A stopped session takes no more messages.
    assert_eq!(
        client.send(ConvId::All, Bytes::from_static(b"x")).await,
        Err(SendError::Stopped)
    );
    assert_eq!(setup.server.lock().unwrap().logins, 0);
    client.shutdown().await;
}

#[tokio::test]
async fn snapshot_saves_loads_and_resumes_the_outbox() {
    let setup = setup().await;
    setup.server.lock().unwrap().ack_sends = false;
    let (client, mut events) = Client::start(TokioNet, Clock::System, options(&setup));
    expect(&mut events, "Online", is_online).await;
    push(&setup.server, "one");
    expect(&mut events, "Message", |e| {
        matches!(e, ClientEvent::Message(_))
    })
    .await;
    let id = client
        .submit(ConvId::All, Bytes::from_static(b"pending"))
        .await
        .unwrap();
    until(&setup.server, "the send", |s| s.sends == vec![id]).await;

    let state = client.snapshot().await.unwrap();
    assert_eq!(state.outbox.len(), 1);
    assert_eq!(state.outbox[0].id, id);
    assert_eq!(&state.outbox[0].body[..], b"pending");
    assert_eq!(state.convs.len(), 1);
    assert_eq!(state.convs[0].conv, ConvId::All);
    assert_eq!(state.convs[0].log_epoch, LogEpoch(ALL_EPOCH));
    assert_eq!(state.convs[0].delivered, 1);
    let issued = setup.route.lock().unwrap().issued[0].clone();
    assert_eq!(
        state.resume_token.as_ref().map(api::encode_resume_token),
        Some(issued.clone())
    );

    let path = std::env::temp_dir().join(format!("cim-sdk-test-{}.json", std::process::id()));
    assert_eq!(state_file::load(&path).unwrap(), None);
    state_file::save(&path, &state).unwrap();
    let loaded = state_file::load(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(loaded.as_ref(), Some(&state));
    client.shutdown().await;

    // A new run from the saved state logs in with the saved resume token, resends the
    // message under its original id, and does not replay the delivered message.
    setup.server.lock().unwrap().ack_sends = true;
    let mut opts = options(&setup);
    opts.state = loaded;
    let (client, mut events) = Client::start(TokioNet, Clock::System, opts);
    let acked = expect(&mut events, "Acked", |e| {
        matches!(e, ClientEvent::Acked { .. })
    })
    .await;
    assert!(matches!(acked, ClientEvent::Acked { msg_id, .. } if msg_id == id));
    assert_eq!(setup.server.lock().unwrap().sends, vec![id, id]);
    assert_eq!(
        setup.route.lock().unwrap().logins[1].resume_token,
        Some(issued)
    );
    push(&setup.server, "two");
    let ClientEvent::Message(message) = expect(&mut events, "Message", |e| {
        matches!(e, ClientEvent::Message(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(message.seq, 2);
    client.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_the_connection_and_fails_pending_sends() {
    let setup = setup().await;
    setup.server.lock().unwrap().ack_sends = false;
    let (client, mut events) = Client::start(TokioNet, Clock::System, options(&setup));
    expect(&mut events, "Online", is_online).await;
    let sender = client.clone();
    let send =
        tokio::spawn(async move { sender.send(ConvId::All, Bytes::from_static(b"x")).await });
    until(&setup.server, "the send", |s| s.sends.len() == 1).await;

    let handle = client.clone();
    client.shutdown().await;
    assert_eq!(
        tokio::time::timeout(T, send).await.unwrap().unwrap(),
        Err(SendError::Stopped)
    );
    expect(&mut events, "Stopped", |e| {
        *e == ClientEvent::Stopped(StopReason::Shutdown)
    })
    .await;
    assert_eq!(tokio::time::timeout(T, events.next()).await.unwrap(), None);
    until(&setup.server, "the connection closed", |s| s.closed == 1).await;
    // The remaining handle reports the driver gone.
    assert!(handle.snapshot().await.is_err());
    assert_eq!(
        handle.submit(ConvId::All, Bytes::new()).await,
        Err(SendError::Stopped)
    );
}

#[tokio::test]
async fn route_api_unwraps_envelopes_and_keeps_error_codes() {
    let setup = setup().await;
    let api = RouteApi::new(TokioNet, "127.0.0.1", setup.route_port, T);
    let err = api
        .create_group("tok", USER, "no spaces allowed")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ApiError::Status { http: 400, code, .. } if code == "3000"),
        "{err:?}"
    );
    assert_eq!(err.code(), Some("3000"));
    api.create_group("tok", USER, "rust").await.unwrap();
    assert_eq!(
        api.list_groups("tok").await.unwrap(),
        vec!["rust".to_owned()]
    );
    let registered = api.register("bob", "pw").await.unwrap();
    assert_eq!(registered.user_id, 42);
    assert_eq!(registered.user_name, "bob");

    // An unknown path answers axum's plain 404: not an envelope.
    assert!(matches!(
        api.online_users("tok").await,
        Err(ApiError::BadBody(_))
    ));
    // Nothing listening.
    let listener = TokioNet.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let dead_port = listener.local_addr().unwrap().port();
    drop(listener);
    let dead = RouteApi::new(TokioNet, "127.0.0.1", dead_port, T);
    assert!(matches!(
        dead.list_groups("tok").await,
        Err(ApiError::Transport(_))
    ));
}

/// A server whose certificate does not verify (signed by a CA the client does not trust)
/// stops the session with the host and the reason: no reconnect loop.
#[tokio::test]
async fn a_server_certificate_that_does_not_verify_stops_the_session() {
    use cim_io::sdk::SdkTls;
    use cim_io::tls::{ClientTls, ClientTlsSettings, ServerTls, ServerTlsSettings};
    let ca = cim_testkit::certs::TestCa::new("sdk-server");
    let other = cim_testkit::certs::TestCa::new("sdk-other");
    let cert = ca.server_cert("s1");
    let gateway = ServerTls::load(ServerTlsSettings::new(
        "gateway",
        cert.cert_path.clone(),
        cert.key_path.clone(),
    ))
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tls_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let gateway = gateway.clone();
            tokio::spawn(async move {
                let _ = gateway.accept(stream).await;
            });
        }
    });
    let (route_port, route) = start_route(tls_port).await;
    route.lock().unwrap().server_tls = true;
    let client_tls = ClientTls::load(ClientTlsSettings {
        ca: Some(other.cert_path.clone()),
        ..ClientTlsSettings::default()
    })
    .unwrap();
    let mut config = ClientConfig::new(USER, "ann", "pw", 1);
    config.backoff_base = Duration::from_millis(10);
    config.backoff_cap = Duration::from_millis(50);
    let mut options = SdkOptions::new("127.0.0.1", route_port, config);
    options.tls = Some(SdkTls {
        client: client_tls,
        route_https: false,
    });
    let (client, mut events) = Client::start(TokioNet, Clock::System, options);
    let rejected = expect(&mut events, "TlsFailed", |e| {
        matches!(e, ClientEvent::TlsFailed { .. })
    })
    .await;
    let ClientEvent::TlsFailed { host, reason } = rejected else {
        unreachable!()
    };
    assert_eq!(host, "127.0.0.1");
    assert!(reason.contains("not signed by a trusted CA"), "{reason}");
    let stopped = expect(&mut events, "Stopped", |_| true).await;
    assert_eq!(stopped, ClientEvent::Stopped(StopReason::TlsFailed));
    assert_eq!(route.lock().unwrap().logins.len(), 1, "no second login");
    assert_eq!(
        client.send(ConvId::All, Bytes::from_static(b"x")).await,
        Err(SendError::Stopped)
    );
    client.shutdown().await;
}

/// A login answer naming a TLS server, for a client with no TLS configuration, stops the
/// session saying so: retrying would ask the same route for the same kind of server.
#[tokio::test]
async fn a_tls_server_for_a_client_without_tls_stops_the_session() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (route_port, route) = start_route(port).await;
    route.lock().unwrap().server_tls = true;
    let mut config = ClientConfig::new(USER, "ann", "pw", 1);
    config.backoff_base = Duration::from_millis(10);
    config.backoff_cap = Duration::from_millis(50);
    let options = SdkOptions::new("127.0.0.1", route_port, config);
    let (client, mut events) = Client::start(TokioNet, Clock::System, options);
    let stopped = expect(&mut events, "TlsFailed", |e| {
        matches!(e, ClientEvent::TlsFailed { .. })
    })
    .await;
    let ClientEvent::TlsFailed { host, reason } = stopped else {
        unreachable!()
    };
    assert_eq!(host, "127.0.0.1");
    assert!(reason.contains("no trusted certificates"), "{reason}");
    assert_eq!(
        expect(&mut events, "Stopped", |_| true).await,
        ClientEvent::Stopped(StopReason::TlsFailed)
    );
    assert_eq!(route.lock().unwrap().logins.len(), 1, "no second login");
    drop(listener);
    client.shutdown().await;
}
