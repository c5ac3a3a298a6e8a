//! Input -> expected-output tables with explicit time, and the delivery property.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;

use super::*;
use crate::registry::LiveServer;

const USER: UserId = UserId(7);
const E1: LogEpoch = LogEpoch(111);
const E2: LogEpoch = LogEpoch(222);

#[allow(clippy::disallowed_methods)] // the one clock read: a base every test time is offset from
fn base() -> Instant {
    Instant::now()
}

/// Zero backoff so tables can name every output; tests of the jitter itself use the defaults.
fn config() -> ClientConfig {
    let mut c = ClientConfig::new(USER, "alice", "pw", 42);
    c.backoff_base = Duration::ZERO;
    c.backoff_cap = Duration::ZERO;
    c
}

/// No heartbeat or head check getting in the way of a test about something else.
fn quiet_config() -> ClientConfig {
    let mut c = config();
    c.heartbeat_interval = Duration::from_secs(3600);
    c.head_check_interval = Duration::from_secs(3600);
    c
}

fn token(b: u8) -> ResumeToken {
    ResumeToken([b; 32])
}

fn ticket(epoch: u64) -> proto::Ticket {
    proto::Ticket {
        key_id: 1,
        user_id: USER.0,
        server_id: "s1".into(),
        epoch,
        expires_at_ms: 99,
        mac: vec![1, 2, 3],
    }
}

fn answer(epoch: u64, tok: u8) -> LoginAnswer {
    LoginAnswer {
        user: USER,
        epoch: Epoch(epoch),
        server: LiveServer {
            id: ServerId::new("s1"),
            host: "10.0.0.1".into(),
            client_port: 11211,
            link_port: 11311,
            http_port: 8081,
            connections: 0,
            client_tls: false,
        },
        ticket: ticket(epoch),
        token: "bearer".into(),
        resume_token: token(tok),
    }
}

/// The token a session seeded 42 makes for its first login (its RNG's first draw: no
/// message was submitted before).
fn own_token() -> ResumeToken {
    use rand::Rng as _;
    ResumeToken(ChaCha8Rng::seed_from_u64(42).random())
}

/// A login request presenting `tok`, or with `None` the session's own first token.
fn request(tok: Option<u8>) -> LoginRequest {
    LoginRequest {
        user: USER,
        name: "alice".into(),
        password: "pw".into(),
        resume_token: Some(tok.map_or_else(own_token, token)),
    }
}

fn login_cmd(attempt: u64, tok: Option<u8>) -> ClientCommand {
    ClientCommand::Login {
        attempt: LoginAttempt(attempt),
        request: request(tok),
    }
}

fn tx(kind: Kind) -> ClientCommand {
    ClientCommand::Transmit(proto::Frame { kind: Some(kind) })
}

fn conv(s: &str) -> ConvId {
    s.parse().expect("test conversation ids are valid")
}

fn pmsg(c: &str, epoch: LogEpoch, seq: u64) -> proto::Message {
    proto::Message {
        conv: c.into(),
        log_epoch: epoch.0,
        seq,
        sender: 9,
        msg_id_hi: epoch.0,
        msg_id_lo: seq,
        body: format!("{c}#{seq}@{}", epoch.0).into_bytes().into(),
        appended_at_ms: 1000 + seq,
    }
}

fn smsg(c: &str, epoch: LogEpoch, seq: u64) -> StoredMessage {
    message_from_proto(pmsg(c, epoch, seq)).expect("test messages are valid")
}

fn msg_ev(c: &str, epoch: LogEpoch, seq: u64) -> ClientEvent {
    ClientEvent::Message(smsg(c, epoch, seq))
}

fn deliver(c: &str, epoch: LogEpoch, seq: u64) -> Kind {
    Kind::Deliver(proto::Deliver {
        message: Some(pmsg(c, epoch, seq)),
    })
}

fn phead(c: &str, epoch: LogEpoch, head: u64, first: u64, cursor: u64) -> proto::ConvHead {
    proto::ConvHead {
        conv: c.into(),
        log_epoch: epoch.0,
        head_seq: head,
        first_available_seq: first,
        cursor_seq: cursor,
    }
}

fn sync_answer(heads: Vec<proto::ConvHead>) -> Kind {
    Kind::SyncAnswer(proto::SyncAnswer { heads, more: false })
}

fn fetch_answer(head: proto::ConvHead, msgs: &[u64]) -> Kind {
    let epoch = LogEpoch(head.log_epoch);
    let messages = msgs.iter().map(|s| pmsg(&head.conv, epoch, *s)).collect();
    Kind::FetchAnswer(proto::FetchAnswer {
        head: Some(head),
        messages,
    })
}

fn fetch_req(c: &str, epoch: LogEpoch, after: u64) -> ClientCommand {
    tx(Kind::FetchRequest(proto::FetchRequest {
        conv: c.into(),
        log_epoch: epoch.0,
        after_seq: after,
        limit: 100,
    }))
}

fn sync_req() -> ClientCommand {
    tx(Kind::SyncRequest(proto::SyncRequest {}))
}

fn login_ok(epoch: u64) -> Kind {
    Kind::LoginOk(proto::LoginOk {
        user_id: USER.0,
        epoch,
        server_id: "s1".into(),
        heartbeat_interval_ms: 0,
    })
}

/// The order stream of a session made from `config()` (the first draw of its RNG).
fn stream() -> u64 {
    order_stream(config().seed)
}

/// A `Send` of the session's stream: its order seq and the one it follows (0: none).
fn send_frame(id: ClientMsgId, c: &str, body: &str, (seq, after): (u64, u64)) -> ClientCommand {
    tx(Kind::Send(proto::Send {
        msg_id_hi: id.hi(),
        msg_id_lo: id.lo(),
        conv: c.into(),
        body: body.as_bytes().to_vec().into(),
        sent_at_ms: 0,
        order_stream: stream(),
        order_seq: seq,
        order_after: after,
    }))
}

fn send_ack(id: ClientMsgId, c: &str, seq: u64) -> Kind {
    Kind::SendAck(proto::SendAck {
        msg_id_hi: id.hi(),
        msg_id_lo: id.lo(),
        conv: c.into(),
        log_epoch: E1.0,
        seq,
    })
}

fn send_nack(id: ClientMsgId, code: ErrorCode, retryable: bool) -> Kind {
    Kind::SendNack(proto::SendNack {
        msg_id_hi: id.hi(),
        msg_id_lo: id.lo(),
        code: code as i32,
        reason: "because".into(),
        retryable,
    })
}

fn kick(reason: KickReason) -> Kind {
    Kind::Kick(proto::Kick {
        reason: reason as i32,
        message: String::new(),
    })
}

fn reconnecting(attempt: u32, cause: LinkLoss) -> ClientEvent {
    ClientEvent::Reconnecting {
        attempt,
        delay: Duration::ZERO,
        cause,
    }
}

fn online_ev(epoch: u64) -> ClientEvent {
    ClientEvent::Online {
        server: ServerId::new("s1"),
        epoch: Epoch(epoch),
    }
}

#[derive(Debug)]
enum In {
    Start,
    Answer(u64, Result<LoginAnswer, LoginFailure>),
    Connected,
    ConnectFailed,
    TlsFailed,
    Disconnected,
    Frame(Kind),
    Timeout,
}

struct Harness {
    s: ClientSession,
    t0: Instant,
}

impl Harness {
    fn new(config: ClientConfig) -> Self {
        Self {
            s: ClientSession::new(config),
            t0: base(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn drain(&mut self) -> (Vec<ClientCommand>, Vec<ClientEvent>) {
        let cmds = std::iter::from_fn(|| self.s.poll_command()).collect();
        let evs = std::iter::from_fn(|| self.s.poll_event()).collect();
        (cmds, evs)
    }

    fn step(&mut self, ms: u64, input: In) -> (Vec<ClientCommand>, Vec<ClientEvent>) {
        let now = self.at(ms);
        match input {
            In::Start => self.s.start(now),
            In::Answer(n, a) => self.s.handle_login_answer(now, LoginAttempt(n), a),
            In::Connected => self.s.handle_connected(now),
            In::ConnectFailed => self.s.handle_connect_failed(now),
            In::TlsFailed => {
                self.s
                    .handle_tls_failed(now, "s1.example".into(), "unknown issuer".into());
            }
            In::Disconnected => self.s.handle_disconnected(now),
            In::Frame(kind) => {
                let _ = self.s.handle_frame(now, proto::Frame { kind: Some(kind) });
            }
            In::Timeout => self.s.handle_timeout(now),
        }
        self.drain()
    }

    /// Runs a table: at each time, one input and exactly these outputs.
    fn table(&mut self, rows: Vec<(u64, In, Vec<ClientCommand>, Vec<ClientEvent>)>) {
        for (ms, input, cmds, evs) in rows {
            let label = format!("t={ms}ms {input:?}");
            let (got_cmds, got_evs) = self.step(ms, input);
            assert_eq!(got_cmds, cmds, "commands at {label}");
            assert_eq!(got_evs, evs, "events at {label}");
        }
    }

    /// Start -> route answer (epoch 5, token 0xA) -> connected -> LoginOk, at t = 0..30 ms.
    fn online(&mut self) {
        self.online_resuming(None);
    }

    fn online_resuming(&mut self, tok: Option<u8>) {
        self.table(vec![
            (
                0,
                In::Start,
                vec![login_cmd(1, tok)],
                vec![ClientEvent::LoggingIn],
            ),
            (
                10,
                In::Answer(1, Ok(answer(5, 0xA))),
                vec![ClientCommand::Connect {
                    endpoint: ServerEndpoint {
                        host: "10.0.0.1".into(),
                        port: 11211,
                        tls: false,
                    },
                }],
                vec![ClientEvent::Connecting {
                    server: ServerId::new("s1"),
                }],
            ),
            (
                20,
                In::Connected,
                vec![tx(Kind::Login(proto::Login {
                    ticket: Some(ticket(5)),
                }))],
                vec![],
            ),
            (
                30,
                In::Frame(login_ok(5)),
                vec![sync_req()],
                vec![online_ev(5)],
            ),
        ]);
    }

    /// Online, and the initial sync answered with these heads (at t = 40 ms).
    fn online_with(&mut self, heads: Vec<proto::ConvHead>) -> Vec<ClientCommand> {
        self.online();
        let (cmds, evs) = self.step(40, In::Frame(sync_answer(heads)));
        assert_eq!(evs, vec![]);
        cmds
    }
}

#[test]
fn login_connect_login_ok_goes_online_and_syncs() {
    let mut h = Harness::new(config());
    h.online();
    assert_eq!(
        h.s.poll_timeout(),
        Some((h.at(30 + 10_000), TimerReason::Ping))
    );
    assert!(h.s.is_online());
}

#[test]
fn heartbeat_pings_on_schedule_and_a_missing_pong_reconnects() {
    let mut h = Harness::new(config());
    h.online();
    let ping = |n| tx(Kind::Ping(proto::Ping { nonce: n }));
    let pong = |n| In::Frame(Kind::Pong(proto::Pong { nonce: n }));
    h.table(vec![
        (10_029, In::Timeout, vec![], vec![]),
        (10_030, In::Timeout, vec![ping(1)], vec![]),
        (10_040, pong(1), vec![], vec![]),
        (20_030, In::Timeout, vec![ping(2)], vec![]),
        // Any frame counts as an answer, not only the pong.
        (20_100, In::Frame(sync_answer(vec![])), vec![], vec![]),
        (25_030, In::Timeout, vec![], vec![]),
        (30_030, In::Timeout, vec![ping(3), sync_req()], vec![]),
        (35_029, In::Timeout, vec![], vec![]),
        (
            35_030,
            In::Timeout,
            vec![ClientCommand::Disconnect],
            vec![reconnecting(0, LinkLoss::HeartbeatTimeout)],
        ),
        (
            35_030,
            In::Timeout,
            vec![login_cmd(2, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
    ]);
}

#[test]
fn relogin_carries_the_latest_resume_token_and_ignores_stale_answers() {
    let mut h = Harness::new(config());
    h.online();
    h.table(vec![
        (
            100,
            In::Disconnected,
            vec![],
            vec![reconnecting(0, LinkLoss::Disconnected)],
        ),
        (
            100,
            In::Timeout,
            vec![login_cmd(2, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            110,
            In::Answer(2, Ok(answer(6, 0xB))),
            vec![ClientCommand::Connect {
                endpoint: ServerEndpoint {
                    host: "10.0.0.1".into(),
                    port: 11211,
                    tls: false,
                },
            }],
            vec![ClientEvent::Connecting {
                server: ServerId::new("s1"),
            }],
        ),
        (
            120,
            In::ConnectFailed,
            vec![],
            vec![reconnecting(1, LinkLoss::ConnectFailed)],
        ),
        (
            120,
            In::Timeout,
            vec![login_cmd(3, Some(0xB))],
            vec![ClientEvent::LoggingIn],
        ),
        // The answer to attempt 2 again (late duplicate): not this attempt's.
        (130, In::Answer(2, Ok(answer(7, 0xC))), vec![], vec![]),
        (5_119, In::Timeout, vec![], vec![]),
        (
            5_120,
            In::Timeout,
            vec![],
            vec![reconnecting(2, LinkLoss::LoginTimeout)],
        ),
        (
            5_120,
            In::Timeout,
            vec![login_cmd(4, Some(0xB))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            5_130,
            In::Answer(4, Err(LoginFailure::Rejected(LoginError::RepeatLogin))),
            vec![],
            vec![reconnecting(
                3,
                LinkLoss::LoginFailed(LoginFailure::Rejected(LoginError::RepeatLogin)),
            )],
        ),
        (
            5_130,
            In::Timeout,
            vec![login_cmd(5, Some(0xB))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            5_140,
            In::Answer(5, Err(LoginFailure::Rejected(LoginError::AccountMismatch))),
            vec![],
            vec![
                ClientEvent::LoginRejected(LoginError::AccountMismatch),
                ClientEvent::Stopped(StopReason::AccountMismatch),
            ],
        ),
    ]);
    assert_eq!(h.s.poll_timeout(), None);
}

/// A certificate that does not verify stops the session (no backoff, no retry), whether it
/// is the route's (the login answer) or the server's (the connect); a plain connect failure
/// still retries.
#[test]
fn a_certificate_that_does_not_verify_stops_instead_of_retrying() {
    let rejected = |host: &str| {
        vec![
            ClientEvent::TlsFailed {
                host: host.into(),
                reason: "unknown issuer".into(),
            },
            ClientEvent::Stopped(StopReason::TlsFailed),
        ]
    };
    let mut h = Harness::new(quiet_config());
    h.table(vec![
        (
            0,
            In::Start,
            vec![login_cmd(1, None)],
            vec![ClientEvent::LoggingIn],
        ),
        (
            10,
            In::Answer(
                1,
                Err(LoginFailure::Tls {
                    host: "route.example".into(),
                    reason: "unknown issuer".into(),
                }),
            ),
            vec![],
            rejected("route.example"),
        ),
    ]);
    assert_eq!(h.s.poll_timeout(), None);
    assert!(h.s.is_stopped());

    let mut h = Harness::new(quiet_config());
    h.step(0, In::Start);
    h.step(10, In::Answer(1, Ok(answer(5, 0xA))));
    let (cmds, evs) = h.step(20, In::TlsFailed);
    assert_eq!(cmds, vec![]);
    assert_eq!(evs, rejected("s1.example"));
    assert_eq!(h.s.poll_timeout(), None);
    // Not connecting (stopped already): nothing more happens.
    assert_eq!(h.step(30, In::TlsFailed), (vec![], vec![]));

    let mut h = Harness::new(quiet_config());
    h.step(0, In::Start);
    h.step(10, In::Answer(1, Ok(answer(5, 0xA))));
    let (_, evs) = h.step(20, In::ConnectFailed);
    assert!(
        matches!(
            evs.as_slice(),
            [ClientEvent::Reconnecting {
                cause: LinkLoss::ConnectFailed,
                ..
            }]
        ),
        "{evs:?}"
    );
}

#[test]
fn connect_and_login_ok_timeouts_disconnect_and_retry() {
    let mut h = Harness::new(config());
    h.table(vec![
        (
            0,
            In::Start,
            vec![login_cmd(1, None)],
            vec![ClientEvent::LoggingIn],
        ),
        (
            10,
            In::Answer(1, Ok(answer(5, 0xA))),
            vec![ClientCommand::Connect {
                endpoint: ServerEndpoint {
                    host: "10.0.0.1".into(),
                    port: 11211,
                    tls: false,
                },
            }],
            vec![ClientEvent::Connecting {
                server: ServerId::new("s1"),
            }],
        ),
        (
            5_010,
            In::Timeout,
            vec![ClientCommand::Disconnect],
            vec![reconnecting(0, LinkLoss::ConnectTimeout)],
        ),
        (
            5_010,
            In::Timeout,
            vec![login_cmd(2, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            5_020,
            In::Answer(2, Ok(answer(6, 0xB))),
            vec![ClientCommand::Connect {
                endpoint: ServerEndpoint {
                    host: "10.0.0.1".into(),
                    port: 11211,
                    tls: false,
                },
            }],
            vec![ClientEvent::Connecting {
                server: ServerId::new("s1"),
            }],
        ),
        (
            5_030,
            In::Connected,
            vec![tx(Kind::Login(proto::Login {
                ticket: Some(ticket(6)),
            }))],
            vec![],
        ),
        (
            10_030,
            In::Timeout,
            vec![ClientCommand::Disconnect],
            vec![reconnecting(1, LinkLoss::LoginOkTimeout)],
        ),
    ]);
}

#[test]
fn kicks_reconnect_except_taken_over_which_stops() {
    let mut h = Harness::new(config());
    h.online();
    h.table(vec![
        (
            100,
            In::Frame(kick(KickReason::Draining)),
            vec![ClientCommand::Disconnect],
            vec![
                ClientEvent::Kicked(KickReason::Draining),
                reconnecting(0, LinkLoss::Kicked(KickReason::Draining)),
            ],
        ),
        (
            100,
            In::Timeout,
            vec![login_cmd(2, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            110,
            In::Answer(2, Ok(answer(6, 0xB))),
            vec![ClientCommand::Connect {
                endpoint: ServerEndpoint {
                    host: "10.0.0.1".into(),
                    port: 11211,
                    tls: false,
                },
            }],
            vec![ClientEvent::Connecting {
                server: ServerId::new("s1"),
            }],
        ),
        (
            120,
            In::Connected,
            vec![tx(Kind::Login(proto::Login {
                ticket: Some(ticket(6)),
            }))],
            vec![],
        ),
        (
            130,
            In::Frame(login_ok(6)),
            vec![sync_req()],
            vec![online_ev(6)],
        ),
        (
            200,
            In::Frame(kick(KickReason::TakenOver)),
            vec![ClientCommand::Disconnect],
            vec![
                ClientEvent::Kicked(KickReason::TakenOver),
                ClientEvent::Stopped(StopReason::TakenOver),
            ],
        ),
        (60_000, In::Timeout, vec![], vec![]),
        // A late report about the connection it gave up changes nothing.
        (60_000, In::Disconnected, vec![], vec![]),
    ]);
    assert_eq!(h.s.poll_timeout(), None);
    assert!(h.s.is_stopped());
    // The user may decide to take the session back.
    assert_eq!(
        h.step(70_000, In::Start),
        (vec![login_cmd(3, Some(0xB))], vec![ClientEvent::LoggingIn])
    );
}

#[test]
fn backoff_jitter_covers_the_window() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (base, cap) = (Duration::from_millis(200), Duration::from_secs(5));
    let ceiling = backoff::ceiling(base, cap, 3);
    assert_eq!(ceiling, Duration::from_millis(1600));
    let draws: Vec<Duration> = (0..200)
        .map(|_| backoff::delay(&mut rng, base, cap, 3))
        .collect();
    assert!(draws.iter().all(|d| *d <= ceiling));
    assert!(draws.iter().any(|d| *d < ceiling / 4));
    assert!(draws.iter().any(|d| *d > ceiling * 3 / 4));
    assert_eq!(backoff::ceiling(base, cap, 5), cap);
    assert_eq!(backoff::ceiling(base, cap, u32::MAX), cap);
}

proptest! {
    #[test]
    fn backoff_delays_stay_in_the_capped_window_and_reset_when_online(
        seed in any::<u64>(),
        failures in 1usize..12,
    ) {
        let mut cfg = ClientConfig::new(USER, "alice", "pw", seed);
        cfg.heartbeat_interval = Duration::from_secs(3600);
        let (b, cap) = (cfg.backoff_base, cfg.backoff_cap);
        let mut h = Harness::new(cfg);
        let mut now = 0u64;
        let mut attempt_no = 1;
        h.step(now, In::Start);
        for round in 0..2 {
            for n in 0..failures {
                let (_, evs) = h.step(
                    now,
                    In::Answer(attempt_no, Err(LoginFailure::Transport("refused".into()))),
                );
                let [ClientEvent::Reconnecting { attempt, delay, .. }] = evs.as_slice() else {
                    panic!("expected one Reconnecting, got {evs:?}");
                };
                // Round 1 begins after the loss that followed `Online` (attempt 0).
                let n = n + round;
                prop_assert_eq!(*attempt as usize, n);
                let ceiling = b.saturating_mul(1 << n.min(31)).min(cap);
                prop_assert!(*delay <= ceiling, "retry {n}: {delay:?} > {ceiling:?}");
                let (at, reason) = h.s.poll_timeout().expect("backoff armed");
                prop_assert_eq!(reason, TimerReason::Backoff);
                prop_assert_eq!(at, h.at(now) + *delay);
                now = (at - h.t0).as_millis() as u64 + 1;
                let (cmds, _) = h.step(now, In::Timeout);
                attempt_no += 1;
                prop_assert_eq!(cmds.len(), 1);
            }
            // Online resets the count: the next loss draws from [0, base] again.
            h.step(now, In::Answer(attempt_no, Ok(answer(5, 1))));
            h.step(now, In::Connected);
            h.step(now, In::Frame(login_ok(5)));
            prop_assert!(h.s.is_online());
            let (_, evs) = h.step(now, In::Disconnected);
            let [ClientEvent::Reconnecting { attempt: 0, delay, .. }] = evs.as_slice() else {
                panic!("expected Reconnecting attempt 0, got {evs:?}");
            };
            prop_assert!(*delay <= b);
            let (at, _) = h.s.poll_timeout().expect("backoff armed");
            now = (at - h.t0).as_millis() as u64 + 1;
            h.step(now, In::Timeout);
            attempt_no += 1;
        }
    }
}

#[test]
fn outbox_waits_offline_and_resends_in_order_with_the_same_ids() {
    let mut h = Harness::new(quiet_config());
    h.step(0, In::Start);
    let a = h.s.send(h.at(1), conv("all"), Bytes::from_static(b"a"));
    let b = h.s.send(h.at(2), conv("g:x"), Bytes::from_static(b"b"));
    let c = h.s.send(h.at(3), conv("all"), Bytes::from_static(b"c"));
    assert_eq!(
        h.drain(),
        (vec![], vec![]),
        "nothing goes out while offline"
    );
    assert!(a != b && b != c && a != c);
    h.table(vec![
        (
            10,
            In::Answer(1, Ok(answer(5, 0xA))),
            vec![ClientCommand::Connect {
                endpoint: ServerEndpoint {
                    host: "10.0.0.1".into(),
                    port: 11211,
                    tls: false,
                },
            }],
            vec![ClientEvent::Connecting {
                server: ServerId::new("s1"),
            }],
        ),
        (
            20,
            In::Connected,
            vec![tx(Kind::Login(proto::Login {
                ticket: Some(ticket(5)),
            }))],
            vec![],
        ),
        (
            30,
            In::Frame(login_ok(5)),
            vec![
                sync_req(),
                send_frame(a, "all", "a", (1, 0)),
                send_frame(b, "g:x", "b", (2, 0)),
                send_frame(c, "all", "c", (3, 1)),
            ],
            vec![online_ev(5)],
        ),
        (
            40,
            In::Frame(send_ack(a, "all", 17)),
            vec![],
            vec![ClientEvent::Acked {
                msg_id: a,
                conv: conv("all"),
                log_epoch: E1,
                seq: 17,
            }],
        ),
        (
            50,
            In::Disconnected,
            vec![],
            vec![reconnecting(0, LinkLoss::Disconnected)],
        ),
        (
            50,
            In::Timeout,
            vec![login_cmd(2, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            60,
            In::Answer(2, Ok(answer(6, 0xB))),
            vec![ClientCommand::Connect {
                endpoint: ServerEndpoint {
                    host: "10.0.0.1".into(),
                    port: 11211,
                    tls: false,
                },
            }],
            vec![ClientEvent::Connecting {
                server: ServerId::new("s1"),
            }],
        ),
        (
            70,
            In::Connected,
            vec![tx(Kind::Login(proto::Login {
                ticket: Some(ticket(6)),
            }))],
            vec![],
        ),
        (
            80,
            In::Frame(login_ok(6)),
            vec![
                sync_req(),
                send_frame(b, "g:x", "b", (2, 0)),
                send_frame(c, "all", "c", (3, 0)),
            ],
            vec![online_ev(6)],
        ),
        // A second ack of `a` (the resend's) is not reported twice.
        (90, In::Frame(send_ack(a, "all", 17)), vec![], vec![]),
    ]);
    assert_eq!(h.s.outbox_len(), 2);
}

#[test]
fn a_send_refused_as_out_of_order_waits_for_the_one_it_follows() {
    let mut h = Harness::new(quiet_config());
    h.online();
    let a = h.s.send(h.at(100), conv("all"), Bytes::from_static(b"a"));
    let b = h.s.send(h.at(100), conv("all"), Bytes::from_static(b"b"));
    let _ = h.drain();
    h.table(vec![
        // b overtook a at the store: held, no retry timer.
        (
            110,
            In::Frame(send_nack(b, ErrorCode::OutOfOrder, true)),
            vec![],
            vec![],
        ),
    ]);
    assert_ne!(
        h.s.poll_timeout().map(|(_, reason)| reason),
        Some(TimerReason::SendRetry)
    );
    // A new message to `all` waits behind b; one to another conversation goes at once.
    let c = h.s.send(h.at(120), conv("all"), Bytes::from_static(b"c"));
    let g = h.s.send(h.at(120), conv("g:x"), Bytes::from_static(b"g"));
    assert_eq!(h.drain().0, vec![send_frame(g, "g:x", "g", (4, 0))]);
    h.table(vec![
        // a's ack releases b, which now follows nothing unsettled.
        (
            130,
            In::Frame(send_ack(a, "all", 1)),
            vec![send_frame(b, "all", "b", (2, 0))],
            vec![ClientEvent::Acked {
                msg_id: a,
                conv: conv("all"),
                log_epoch: E1,
                seq: 1,
            }],
        ),
        // b's ack releases c.
        (
            140,
            In::Frame(send_ack(b, "all", 2)),
            vec![send_frame(c, "all", "c", (3, 0))],
            vec![ClientEvent::Acked {
                msg_id: b,
                conv: conv("all"),
                log_epoch: E1,
                seq: 2,
            }],
        ),
        // A refusal that arrives after the one it waited for was acked: sent again at once.
        (
            150,
            In::Frame(send_nack(c, ErrorCode::OutOfOrder, true)),
            vec![send_frame(c, "all", "c", (3, 0))],
            vec![],
        ),
    ]);
}

#[test]
fn acks_nacks_retries_and_unknown() {
    let mut cfg = quiet_config();
    cfg.outbox_max_age = Duration::from_secs(60);
    let mut h = Harness::new(cfg);
    h.online();
    let a = h.s.send(h.at(100), conv("all"), Bytes::from_static(b"a"));
    let b = h.s.send(h.at(100), conv("all"), Bytes::from_static(b"b"));
    let c = h.s.send(h.at(100), conv("all"), Bytes::from_static(b"c"));
    assert_eq!(
        h.drain().0,
        vec![
            send_frame(a, "all", "a", (1, 0)),
            send_frame(b, "all", "b", (2, 1)),
            send_frame(c, "all", "c", (3, 2))
        ]
    );
    h.table(vec![
        (
            200,
            In::Frame(send_ack(b, "all", 4)),
            vec![],
            vec![ClientEvent::Acked {
                msg_id: b,
                conv: conv("all"),
                log_epoch: E1,
                seq: 4,
            }],
        ),
        (200, In::Frame(send_ack(b, "all", 4)), vec![], vec![]),
        (
            210,
            In::Frame(send_nack(a, ErrorCode::NotMember, false)),
            vec![],
            vec![ClientEvent::Rejected {
                msg_id: a,
                code: ErrorCode::NotMember,
                reason: "because".into(),
            }],
        ),
    ]);
    // A retryable nack for a message no longer in the outbox schedules nothing.
    h.table(vec![(
        215,
        In::Frame(send_nack(b, ErrorCode::RateLimited, true)),
        vec![],
        vec![],
    )]);
    assert_ne!(
        h.s.poll_timeout().map(|(_, reason)| reason),
        Some(TimerReason::SendRetry)
    );
    h.table(vec![(
        220,
        In::Frame(send_nack(c, ErrorCode::RateLimited, true)),
        vec![],
        vec![],
    )]);
    assert_eq!(
        h.s.poll_timeout(),
        Some((h.at(1_220), TimerReason::SendRetry))
    );
    // Held behind the retry, to keep the order.
    let d = h.s.send(h.at(300), conv("all"), Bytes::from_static(b"d"));
    assert_eq!(h.drain(), (vec![], vec![]));
    h.table(vec![
        (1_219, In::Timeout, vec![], vec![]),
        (
            1_220,
            In::Timeout,
            vec![
                send_frame(c, "all", "c", (3, 0)),
                send_frame(d, "all", "d", (4, 3)),
            ],
            vec![],
        ),
        (60_099, In::Timeout, vec![], vec![]),
        (
            60_100,
            In::Timeout,
            vec![],
            vec![ClientEvent::Unknown { msg_id: c }],
        ),
        // A late ack of an expired message is not reported.
        (60_200, In::Frame(send_ack(c, "all", 9)), vec![], vec![]),
        (
            60_300,
            In::Timeout,
            vec![],
            vec![ClientEvent::Unknown { msg_id: d }],
        ),
    ]);
    assert_eq!(h.s.outbox_len(), 0);
}

#[test]
fn a_gap_waits_then_fetches_and_duplicates_are_dropped() {
    let mut h = Harness::new(quiet_config());
    assert_eq!(h.online_with(vec![phead("g:x", E1, 0, 1, 0)]), vec![]);
    h.table(vec![
        (
            100,
            In::Frame(deliver("g:x", E1, 1)),
            vec![],
            vec![msg_ev("g:x", E1, 1)],
        ),
        (101, In::Frame(deliver("g:x", E1, 1)), vec![], vec![]),
        (110, In::Frame(deliver("g:x", E1, 3)), vec![], vec![]),
        (111, In::Frame(deliver("g:x", E1, 3)), vec![], vec![]),
        (
            300,
            In::Timeout,
            vec![tx(Kind::DeliverAck(proto::DeliverAck {
                cursors: vec![proto::Cursor {
                    conv: "g:x".into(),
                    log_epoch: E1.0,
                    seq: 1,
                }],
            }))],
            vec![],
        ),
        (409, In::Timeout, vec![], vec![]),
        (410, In::Timeout, vec![fetch_req("g:x", E1, 1)], vec![]),
        (
            420,
            In::Frame(fetch_answer(phead("g:x", E1, 3, 1, 1), &[2, 3])),
            vec![],
            vec![msg_ev("g:x", E1, 2), msg_ev("g:x", E1, 3)],
        ),
        (430, In::Frame(deliver("g:x", E1, 2)), vec![], vec![]),
        // A gap filled before its timer needs no fetch.
        (500, In::Frame(deliver("g:x", E1, 5)), vec![], vec![]),
        (
            510,
            In::Frame(deliver("g:x", E1, 4)),
            vec![],
            vec![msg_ev("g:x", E1, 4), msg_ev("g:x", E1, 5)],
        ),
    ]);
    assert_eq!(
        h.s.poll_timeout(),
        Some((h.at(620), TimerReason::DeliverAck))
    );
    h.table(vec![(
        900,
        In::Timeout,
        vec![tx(Kind::DeliverAck(proto::DeliverAck {
            cursors: vec![proto::Cursor {
                conv: "g:x".into(),
                log_epoch: E1.0,
                seq: 5,
            }],
        }))],
        vec![],
    )]);
    assert_eq!(h.s.poll_timeout().map(|t| t.1), Some(TimerReason::Ping));
    assert_eq!(h.s.stats().gap_fetches, 1, "one gap waited out and fetched");
}

/// The seed pinned in `proptest-regressions/client/tests.txt`, as a table. A push that
/// arrives while the buffer is full is dropped, which is safe only if the gap sync fetches
/// it later. Here the gap fetch's store read came before that message was appended, so its
/// answer fills the buffered range, names an older head and leaves the buffer empty: the
/// client must still fetch what the dropped push proved exists, not wait for the next head
/// check.
#[test]
fn a_push_dropped_from_a_full_buffer_is_fetched_after_a_stale_answer() {
    let mut cfg = quiet_config();
    cfg.max_buffered = 2;
    let mut h = Harness::new(cfg);
    assert_eq!(h.online_with(vec![phead("g:x", E1, 0, 1, 0)]), vec![]);
    h.table(vec![
        (100, In::Frame(deliver("g:x", E1, 2)), vec![], vec![]),
        (110, In::Frame(deliver("g:x", E1, 3)), vec![], vec![]),
        (400, In::Timeout, vec![fetch_req("g:x", E1, 0)], vec![]),
        // Appended after the fetch's read; the buffer is full, so it is dropped.
        (410, In::Frame(deliver("g:x", E1, 4)), vec![], vec![]),
        (
            420,
            In::Frame(fetch_answer(phead("g:x", E1, 3, 1, 0), &[1, 2, 3])),
            vec![fetch_req("g:x", E1, 3)],
            vec![
                msg_ev("g:x", E1, 1),
                msg_ev("g:x", E1, 2),
                msg_ev("g:x", E1, 3),
            ],
        ),
        (
            430,
            In::Frame(fetch_answer(phead("g:x", E1, 4, 1, 0), &[4])),
            vec![],
            vec![msg_ev("g:x", E1, 4)],
        ),
    ]);
}

#[test]
fn delivery_acks_are_batched_across_conversations() {
    let mut h = Harness::new(quiet_config());
    h.online_with(vec![phead("g:x", E1, 0, 1, 0), phead("all", E2, 0, 1, 0)]);
    h.step(100, In::Frame(deliver("g:x", E1, 1)));
    h.step(150, In::Frame(deliver("all", E2, 1)));
    h.step(160, In::Frame(deliver("all", E2, 2)));
    h.table(vec![
        (299, In::Timeout, vec![], vec![]),
        (
            300,
            In::Timeout,
            vec![tx(Kind::DeliverAck(proto::DeliverAck {
                cursors: vec![
                    proto::Cursor {
                        conv: "all".into(),
                        log_epoch: E2.0,
                        seq: 2,
                    },
                    proto::Cursor {
                        conv: "g:x".into(),
                        log_epoch: E1.0,
                        seq: 1,
                    },
                ],
            }))],
            vec![],
        ),
    ]);
}

#[test]
fn trimmed_range_is_reported_unavailable_not_stalled() {
    let mut h = Harness::new(quiet_config());
    h.online_with(vec![phead("g:x", E1, 0, 1, 0)]);
    h.table(vec![
        (
            100,
            In::Frame(deliver("g:x", E1, 1)),
            vec![],
            vec![msg_ev("g:x", E1, 1)],
        ),
        (110, In::Frame(deliver("g:x", E1, 9)), vec![], vec![]),
        (
            300,
            In::Timeout,
            vec![tx(Kind::DeliverAck(proto::DeliverAck {
                cursors: vec![proto::Cursor {
                    conv: "g:x".into(),
                    log_epoch: E1.0,
                    seq: 1,
                }],
            }))],
            vec![],
        ),
        (410, In::Timeout, vec![fetch_req("g:x", E1, 1)], vec![]),
        (
            420,
            In::Frame(fetch_answer(phead("g:x", E1, 10, 8, 1), &[8, 9, 10])),
            vec![],
            vec![
                ClientEvent::Unavailable {
                    conv: conv("g:x"),
                    from_seq: 2,
                    count: 6,
                },
                msg_ev("g:x", E1, 8),
                msg_ev("g:x", E1, 9),
                msg_ev("g:x", E1, 10),
            ],
        ),
    ]);
}

#[test]
fn a_new_log_epoch_resets_the_conversation_and_never_dedups_against_the_old() {
    let mut h = Harness::new(quiet_config());
    h.online_with(vec![phead("g:x", E1, 0, 1, 0)]);
    h.table(vec![
        (
            100,
            In::Frame(deliver("g:x", E1, 1)),
            vec![],
            vec![msg_ev("g:x", E1, 1)],
        ),
        (
            101,
            In::Frame(deliver("g:x", E1, 2)),
            vec![],
            vec![msg_ev("g:x", E1, 2)],
        ),
        // A push in another epoch is a hint: ask the store which epoch is current.
        (
            110,
            In::Frame(deliver("g:x", E2, 1)),
            vec![fetch_req("g:x", E1, 2)],
            vec![],
        ),
        (
            120,
            In::Frame(fetch_answer(phead("g:x", E2, 2, 1, 0), &[])),
            vec![fetch_req("g:x", E2, 0)],
            vec![ClientEvent::LogReset {
                conv: conv("g:x"),
                old_epoch: E1,
                new_epoch: E2,
            }],
        ),
        // Seqs 1 and 2 again, but of the new log: new messages.
        (
            130,
            In::Frame(fetch_answer(phead("g:x", E2, 2, 1, 0), &[1, 2])),
            vec![],
            vec![msg_ev("g:x", E2, 1), msg_ev("g:x", E2, 2)],
        ),
        // A late push of the retired epoch costs a fetch and changes nothing.
        (
            140,
            In::Frame(deliver("g:x", E1, 3)),
            vec![fetch_req("g:x", E2, 2)],
            vec![],
        ),
        (
            150,
            In::Frame(fetch_answer(phead("g:x", E2, 2, 1, 0), &[])),
            vec![],
            vec![],
        ),
        (
            160,
            In::Frame(deliver("g:x", E2, 3)),
            vec![],
            vec![msg_ev("g:x", E2, 3)],
        ),
        // A sync head in yet another epoch resets too.
        (
            170,
            In::Frame(sync_answer(vec![phead("g:x", E1, 4, 3, 0)])),
            vec![fetch_req("g:x", E1, 2)],
            vec![
                ClientEvent::LogReset {
                    conv: conv("g:x"),
                    old_epoch: E2,
                    new_epoch: E1,
                },
                ClientEvent::Unavailable {
                    conv: conv("g:x"),
                    from_seq: 1,
                    count: 2,
                },
            ],
        ),
    ]);
}

#[test]
fn an_unknown_conversation_starts_at_the_server_cursor() {
    let mut h = Harness::new(quiet_config());
    h.online();
    h.table(vec![
        // Pushed before the initial sync answer: held until the sync says where to start.
        (40, In::Frame(deliver("g:y", E1, 6)), vec![], vec![]),
        (
            50,
            In::Frame(sync_answer(vec![phead("g:y", E1, 6, 1, 4)])),
            vec![fetch_req("g:y", E1, 4)],
            vec![],
        ),
        (
            60,
            In::Frame(fetch_answer(phead("g:y", E1, 6, 1, 4), &[5, 6])),
            vec![],
            vec![msg_ev("g:y", E1, 5), msg_ev("g:y", E1, 6)],
        ),
        // A conversation the answer does not list, pushed after the sync left: ask again;
        // still not listed by a sync sent after the push: it starts at its beginning.
        (
            70,
            In::Frame(deliver("p:1:7", E2, 1)),
            vec![sync_req()],
            vec![],
        ),
        (
            80,
            In::Frame(sync_answer(vec![])),
            vec![],
            vec![msg_ev("p:1:7", E2, 1)],
        ),
    ]);
    // And one pushed while a sync is outstanding that was sent before it.
    let mut h = Harness::new(quiet_config());
    h.online();
    h.table(vec![
        (40, In::Frame(deliver("p:1:7", E2, 1)), vec![], vec![]),
        (50, In::Frame(sync_answer(vec![])), vec![sync_req()], vec![]),
        (
            60,
            In::Frame(sync_answer(vec![])),
            vec![],
            vec![msg_ev("p:1:7", E2, 1)],
        ),
    ]);
    // A cursor behind the trimmed range shows the unread trimmed messages as unavailable.
    let mut h = Harness::new(quiet_config());
    h.online();
    h.table(vec![(
        40,
        In::Frame(sync_answer(vec![phead("g:z", E1, 20, 11, 3)])),
        vec![fetch_req("g:z", E1, 10)],
        vec![ClientEvent::Unavailable {
            conv: conv("g:z"),
            from_seq: 4,
            count: 7,
        }],
    )]);
}

#[test]
fn malformed_frames_are_ignored_with_an_error() {
    let mut h = Harness::new(quiet_config());
    assert_eq!(
        h.s.handle_frame(
            h.at(0),
            proto::Frame {
                kind: Some(deliver("all", E1, 1))
            }
        ),
        Err(FrameError::NotConnected)
    );
    h.online_with(vec![]);
    let now = h.at(100);
    assert_eq!(
        h.s.handle_frame(now, proto::Frame { kind: None }),
        Err(FrameError::Empty)
    );
    assert_eq!(
        h.s.handle_frame(
            now,
            proto::Frame {
                kind: Some(deliver("nope", E1, 1))
            }
        ),
        Err(FrameError::BadConversation("nope".into()))
    );
    assert_eq!(
        h.s.handle_frame(
            now,
            proto::Frame {
                kind: Some(deliver("all", E1, 0))
            }
        ),
        Err(FrameError::ZeroSeq)
    );
    assert_eq!(
        h.s.handle_frame(
            now,
            proto::Frame {
                kind: Some(Kind::Deliver(proto::Deliver { message: None }))
            }
        ),
        Err(FrameError::MissingField)
    );
    assert_eq!(
        h.s.handle_frame(
            now,
            proto::Frame {
                kind: Some(Kind::Ping(proto::Ping { nonce: 1 }))
            }
        ),
        Err(FrameError::Unexpected("ping"))
    );
    assert_eq!(h.drain(), (vec![], vec![]));
    assert!(h.s.is_online());
}

#[test]
fn snapshot_and_restore_keep_the_token_outbox_and_positions() {
    let mut cfg = quiet_config();
    cfg.outbox_max_age = Duration::from_secs(60);
    let mut h = Harness::new(cfg.clone());
    h.online_with(vec![phead("g:x", E1, 0, 1, 0)]);
    for seq in 1..=3 {
        h.step(100, In::Frame(deliver("g:x", E1, seq)));
    }
    let old = h.s.send(h.at(100), conv("all"), Bytes::from_static(b"old"));
    let young =
        h.s.send(h.at(50_000), conv("g:x"), Bytes::from_static(b"young"));
    h.drain();
    let state = h.s.snapshot(h.at(60_000), UnixMillis(1_000_000));
    assert_eq!(
        state,
        ClientState {
            resume_token: Some(token(0xA)),
            outbox: vec![
                SavedMessage {
                    id: old,
                    conv: conv("all"),
                    body: Bytes::from_static(b"old"),
                    created_at: UnixMillis(1_000_000 - 59_900),
                },
                SavedMessage {
                    id: young,
                    conv: conv("g:x"),
                    body: Bytes::from_static(b"young"),
                    created_at: UnixMillis(1_000_000 - 10_000),
                },
            ],
            convs: vec![SavedConv {
                conv: conv("g:x"),
                log_epoch: E1,
                delivered: 3,
            }],
        }
    );

    // Five seconds later by the wall clock, in a new process.
    let t0 = base();
    let mut h = Harness {
        s: ClientSession::restore(cfg, state, t0, UnixMillis(1_005_000)),
        t0,
    };
    assert_eq!(
        h.drain(),
        (vec![], vec![ClientEvent::Unknown { msg_id: old }])
    );
    // The young message's resend follows LoginOk; checked in the next test.
    h.s.start(h.at(0));
    let attempt = LoginAttempt(1);
    h.s.handle_login_answer(h.at(10), attempt, Ok(answer(5, 0xB)));
    h.s.handle_connected(h.at(20));
    let _ = h.s.handle_frame(
        h.at(30),
        proto::Frame {
            kind: Some(login_ok(5)),
        },
    );
    let (cmds, _) = h.drain();
    assert_eq!(
        cmds.last(),
        Some(&send_frame(young, "g:x", "young", (1, 0)))
    );
    h.table(vec![
        (31, In::Frame(deliver("g:x", E1, 3)), vec![], vec![]),
        (
            32,
            In::Frame(deliver("g:x", E1, 4)),
            vec![],
            vec![msg_ev("g:x", E1, 4)],
        ),
    ]);
}

#[test]
fn restored_outbox_is_resent_with_its_ids() {
    let cfg = quiet_config();
    let id = ClientMsgId(0xfeed);
    let state = ClientState {
        resume_token: Some(token(0xA)),
        outbox: vec![SavedMessage {
            id,
            conv: conv("all"),
            body: Bytes::from_static(b"hi"),
            created_at: UnixMillis(1_000),
        }],
        convs: vec![],
    };
    let t0 = base();
    let mut h = Harness {
        s: ClientSession::restore(cfg, state, t0, UnixMillis(2_000)),
        t0,
    };
    h.table(vec![
        (
            0,
            In::Start,
            vec![login_cmd(1, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            10,
            In::Answer(1, Ok(answer(5, 0xB))),
            vec![ClientCommand::Connect {
                endpoint: ServerEndpoint {
                    host: "10.0.0.1".into(),
                    port: 11211,
                    tls: false,
                },
            }],
            vec![ClientEvent::Connecting {
                server: ServerId::new("s1"),
            }],
        ),
        (
            20,
            In::Connected,
            vec![tx(Kind::Login(proto::Login {
                ticket: Some(ticket(5)),
            }))],
            vec![],
        ),
        (
            30,
            In::Frame(login_ok(5)),
            vec![sync_req(), send_frame(id, "all", "hi", (1, 0))],
            vec![online_ev(5)],
        ),
    ]);
    // Expires by its wall-clock age: created 1 s before the restore.
    assert_eq!(
        h.s.poll_timeout(),
        Some((t0 + Duration::from_secs(299), TimerReason::OutboxExpiry))
    );
}

// --- The delivery property -------------------------------------------------------------

const CONVS: [&str; 3] = ["all", "g:x", "p:3:7"];

#[derive(Debug, Clone)]
enum Op {
    /// The next message of conversation `i` is appended to the server's log.
    Append(usize),
    /// One more push of an appended message (picked by index); at most 3 per message.
    Deliver(usize),
    /// The server's oldest pending answer (sync/fetch) reaches the client.
    Answer,
    /// Time passes; timers fire.
    Tick(u64),
    /// The server drops the connection; in-flight answers are lost; the client reconnects.
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..CONVS.len()).prop_map(Op::Append),
        6 => any::<usize>().prop_map(Op::Deliver),
        3 => Just(Op::Answer),
        2 => (1..700u64).prop_map(Op::Tick),
        1 => Just(Op::Reconnect),
    ]
}

/// The server side, answering from the log as the store would.
struct Sim {
    h: Harness,
    now: Instant,
    logs: BTreeMap<ConvId, Vec<proto::Message>>,
    appended: Vec<(ConvId, u64)>,
    pushes: BTreeMap<(ConvId, u64), u8>,
    cursors: BTreeMap<ConvId, u64>,
    /// Answers in flight, in order.
    pending: VecDeque<Kind>,
    /// The highest seq pushed to the client, per conversation.
    pushed: BTreeMap<ConvId, u64>,
    received: BTreeMap<ConvId, Vec<StoredMessage>>,
    next_login: u64,
}

impl Sim {
    fn new() -> Self {
        let mut cfg = ClientConfig::new(USER, "alice", "pw", 3);
        // The periodic head check must not paper over a broken gap sync before phase 2.
        cfg.head_check_interval = Duration::from_secs(600);
        cfg.fetch_limit = 3;
        cfg.max_buffered = 4;
        let h = Harness::new(cfg);
        let now = h.t0;
        Self {
            h,
            now,
            logs: BTreeMap::new(),
            appended: Vec::new(),
            pushes: BTreeMap::new(),
            cursors: BTreeMap::new(),
            pending: VecDeque::new(),
            pushed: BTreeMap::new(),
            received: BTreeMap::new(),
            next_login: 0,
        }
    }

    fn head(&self, conv: &ConvId) -> proto::ConvHead {
        proto::ConvHead {
            conv: conv.to_string(),
            log_epoch: E1.0,
            head_seq: self.logs.get(conv).map_or(0, |l| l.len() as u64),
            first_available_seq: 1,
            cursor_seq: self.cursors.get(conv).copied().unwrap_or(0),
        }
    }

    fn feed(&mut self, kind: Kind) {
        let _ = self
            .h
            .s
            .handle_frame(self.now, proto::Frame { kind: Some(kind) });
        self.pump();
    }

    /// Drains the client, playing route, connection and server for every command.
    fn pump(&mut self) {
        loop {
            let mut immediate = Vec::new();
            while let Some(cmd) = self.h.s.poll_command() {
                match cmd {
                    ClientCommand::Login { attempt, .. } => {
                        self.next_login += 1;
                        self.h.s.handle_login_answer(
                            self.now,
                            attempt,
                            Ok(answer(self.next_login, 1)),
                        );
                    }
                    ClientCommand::Connect { .. } => self.h.s.handle_connected(self.now),
                    ClientCommand::Disconnect => self.pending.clear(),
                    ClientCommand::Transmit(frame) => match frame.kind {
                        Some(Kind::Login(_)) => immediate.push(login_ok(self.next_login)),
                        Some(Kind::Ping(p)) => {
                            immediate.push(Kind::Pong(proto::Pong { nonce: p.nonce }));
                        }
                        Some(Kind::SyncRequest(_)) => {
                            let heads = self.logs.keys().map(|c| self.head(c)).collect();
                            self.pending.push_back(sync_answer(heads));
                        }
                        Some(Kind::FetchRequest(f)) => {
                            let conv = conv(&f.conv);
                            assert_eq!(f.log_epoch, E1.0, "one epoch in this property");
                            let log = self.logs.get(&conv).cloned().unwrap_or_default();
                            let messages = log
                                .into_iter()
                                .filter(|m| m.seq > f.after_seq)
                                .take(f.limit as usize)
                                .collect();
                            self.pending
                                .push_back(Kind::FetchAnswer(proto::FetchAnswer {
                                    head: Some(self.head(&conv)),
                                    messages,
                                }));
                        }
                        Some(Kind::DeliverAck(ack)) => {
                            for c in ack.cursors {
                                let cur = self.cursors.entry(conv(&c.conv)).or_default();
                                *cur = (*cur).max(c.seq);
                            }
                        }
                        other => panic!("unexpected frame from the client: {other:?}"),
                    },
                }
            }
            while let Some(ev) = self.h.s.poll_event() {
                match ev {
                    ClientEvent::Message(m) => {
                        let got = self.received.entry(m.conv.clone()).or_default();
                        let expected_seq = got.len() as u64 + 1;
                        assert_eq!(m.seq, expected_seq, "out of order or duplicate: {m:?}");
                        let want = message_from_proto(
                            self.logs[&m.conv][expected_seq as usize - 1].clone(),
                        )
                        .expect("log messages are valid");
                        assert_eq!(m, want);
                        got.push(m);
                    }
                    ClientEvent::Unavailable { .. } | ClientEvent::LogReset { .. } => {
                        panic!("nothing is trimmed or reset here: {ev:?}")
                    }
                    ClientEvent::Stopped(_) | ClientEvent::Kicked(_) => panic!("{ev:?}"),
                    _ => {}
                }
            }
            if immediate.is_empty() {
                break;
            }
            for kind in immediate {
                let _ = self
                    .h
                    .s
                    .handle_frame(self.now, proto::Frame { kind: Some(kind) });
            }
        }
    }

    /// Moves time to `until`, firing every deadline on the way at its own time.
    fn advance(&mut self, until: Instant) {
        for _ in 0..10_000 {
            match self.h.s.poll_timeout() {
                Some((at, _)) if at <= until => {
                    self.now = self.now.max(at);
                    self.h.s.handle_timeout(self.now);
                    self.pump();
                }
                _ => break,
            }
        }
        self.now = self.now.max(until);
    }

    fn answer_all(&mut self) {
        for _ in 0..10_000 {
            let Some(kind) = self.pending.pop_front() else {
                return;
            };
            self.feed(kind);
        }
        panic!("answers never settle");
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Append(i) => {
                let c = conv(CONVS[i]);
                let log = self.logs.entry(c.clone()).or_default();
                let seq = log.len() as u64 + 1;
                log.push(pmsg(CONVS[i], E1, seq));
                self.appended.push((c, seq));
            }
            Op::Deliver(pick) => {
                if self.appended.is_empty() {
                    return;
                }
                let (c, seq) = self.appended[pick % self.appended.len()].clone();
                let count = self.pushes.entry((c.clone(), seq)).or_default();
                if *count >= 3 {
                    return;
                }
                *count += 1;
                let pushed = self.pushed.entry(c.clone()).or_default();
                *pushed = (*pushed).max(seq);
                let msg = self.logs[&c][seq as usize - 1].clone();
                self.feed(Kind::Deliver(proto::Deliver { message: Some(msg) }));
            }
            Op::Answer => {
                if let Some(kind) = self.pending.pop_front() {
                    self.feed(kind);
                }
            }
            Op::Tick(ms) => self.advance(self.now + Duration::from_millis(ms)),
            Op::Reconnect => {
                self.pending.clear();
                self.h.s.handle_disconnected(self.now);
                self.pump();
                // Backoff, then the whole login runs at once in `pump`.
                let (at, reason) = self.h.s.poll_timeout().expect("backoff armed");
                assert_eq!(reason, TimerReason::Backoff);
                self.advance(at);
                assert!(self.h.s.is_online());
            }
        }
    }

    fn received_len(&self, c: &ConvId) -> u64 {
        self.received.get(c).map_or(0, |v| v.len() as u64)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        // PROPTEST_CASES still wins, for a long run.
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512)
    ))]

    /// Whatever the pushes do (late, repeated, reordered, lost), the application gets every
    /// message exactly once, in seq order per conversation: what was pushed once the gap
    /// timer has run, and the rest (lost last pushes) after one head check.
    #[test]
    fn every_message_exactly_once_in_order(ops in prop::collection::vec(op(), 0..160)) {
        let mut sim = Sim::new();
        sim.h.s.start(sim.now);
        sim.pump();
        prop_assert!(sim.h.s.is_online());
        for op in ops {
            sim.apply(op);
        }

        // Phase 1: answers flow and timers run, for a few gap delays but no head check.
        for _ in 0..20 {
            sim.answer_all();
            sim.advance(sim.now + Duration::from_millis(100));
        }
        sim.answer_all();
        for (c, pushed) in sim.pushed.clone() {
            prop_assert!(
                sim.received_len(&c) >= pushed,
                "{c}: pushed up to {pushed}, delivered only {}",
                sim.received_len(&c)
            );
        }

        // Phase 2: one head check later, everything is there.
        let until = sim.now + Duration::from_secs(601);
        while sim.now < until {
            sim.answer_all();
            let next = sim.h.s.poll_timeout().map_or(until, |(at, _)| at.min(until));
            sim.advance(next);
        }
        sim.answer_all();
        for (c, log) in &sim.logs {
            prop_assert_eq!(sim.received_len(c), log.len() as u64, "{}", c);
        }
        prop_assert_eq!(sim.received.keys().collect::<Vec<_>>(), sim.logs.keys().collect::<Vec<_>>());
    }
}

/// A first login whose answer never comes is retried with the same self-made token, so the
/// route can tell the retry from a second device (see `route_login`).
#[test]
fn a_first_login_is_retried_with_the_same_own_token() {
    let mut h = Harness::new(config());
    h.table(vec![(
        0,
        In::Start,
        vec![login_cmd(1, None)],
        vec![ClientEvent::LoggingIn],
    )]);
    let mut retries = Vec::new();
    for ms in [5_000, 5_001, 5_002] {
        let (cmds, _) = h.step(ms, In::Timeout);
        retries.extend(cmds);
    }
    assert_eq!(retries, vec![login_cmd(2, None)]);
    // The token is persisted with the rest, so a restart retries with it too.
    assert_eq!(
        h.s.snapshot(h.at(5_002), UnixMillis(0)).resume_token,
        Some(own_token())
    );
}

/// A SyncAnswer in pages (`more` on all but the last) is taken as one answer: nothing
/// happens on the first pages, so a pushed conversation listed only on a later page is not
/// judged "not listed" (which would ask again, or start it from its beginning).
#[test]
fn a_paged_sync_answer_is_taken_whole() {
    let mut h = Harness::new(quiet_config());
    h.online();
    let page = |heads, more| Kind::SyncAnswer(proto::SyncAnswer { heads, more });
    h.table(vec![
        (40, In::Frame(deliver("g:y", E1, 6)), vec![], vec![]),
        (
            50,
            In::Frame(page(vec![phead("g:x", E1, 3, 1, 1)], true)),
            vec![],
            vec![],
        ),
        (
            51,
            In::Frame(page(vec![phead("g:y", E1, 6, 1, 4)], false)),
            vec![fetch_req("g:x", E1, 1), fetch_req("g:y", E1, 4)],
            vec![],
        ),
    ]);
    // A link lost mid-answer drops its pages: the next answer starts afresh.
    let mut h = Harness::new(quiet_config());
    h.online();
    h.table(vec![(
        50,
        In::Frame(page(vec![phead("g:x", E1, 3, 1, 1)], true)),
        vec![],
        vec![],
    )]);
    h.s.handle_disconnected(h.at(60));
    assert!(h.s.inbound.sync_pages.is_empty());
}
