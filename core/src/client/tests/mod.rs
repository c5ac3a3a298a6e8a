//! Input -> expected-output tables with explicit time, and the delivery property.

mod inbound;
mod outbox;
mod property;
mod resumption;
mod session;
mod snapshot;

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;

use super::*;

use crate::registry::LiveServer;

const USER: UserId = UserId(7);

const E1: LogEpoch = LogEpoch(111);

const E2: LogEpoch = LogEpoch(222);

#[allow(clippy::disallowed_methods)] // the one clock read: a base every test time is offset from
fn base() -> Instant {
    Instant::from_nanos(0)
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
            ws_port: None,
        },
        ticket: ticket(epoch),
        token: "bearer".into(),
        resume_token: token(tok),
        resume_secret: Some(secret(tok)),
    }
}

/// The resumption secret an answer with token `tok` carries.
pub(super) fn secret(tok: u8) -> ResumptionSecret {
    ResumptionSecret([tok ^ 0x5a; 32])
}

/// The token a session seeded 42 makes for its first login (its RNG's first draw: no
/// message was submitted before).
fn own_token() -> ResumeToken {
    use rand::Rng as _;
    ResumeToken(ChaCha8Rng::seed_from_u64(42).random())
}

/// A login request presenting `tok` and the secret that came with it in an answer (a
/// resumption: no password), or with `None` the session's own first token and the password.
fn request(tok: Option<u8>) -> LoginRequest {
    match tok {
        None => password_request(None),
        Some(tok) => LoginRequest {
            password: String::new(),
            resume_secret: Some(secret(tok)),
            ..password_request(Some(tok))
        },
    }
}

/// A login request with the password, presenting `tok` (or the session's first token).
fn password_request(tok: Option<u8>) -> LoginRequest {
    LoginRequest {
        user: USER,
        name: "alice".into(),
        password: "pw".into(),
        resume_token: Some(tok.map_or_else(own_token, token)),
        resume_secret: None,
    }
}

/// The command and event of an answer naming s1 (at `answer`'s endpoint).
fn connect_s1() -> ClientCommand {
    ClientCommand::Connect {
        endpoint: ServerEndpoint {
            host: "10.0.0.1".into(),
            port: 11211,
            tls: false,
            ws_url: None,
        },
    }
}

fn connecting_s1() -> ClientEvent {
    ClientEvent::Connecting {
        server: ServerId::new("s1"),
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
        carried_from_epoch: 0,
        carried_up_to: 0,
    }
}

fn sync_answer(heads: Vec<proto::ConvHead>) -> Kind {
    Kind::SyncAnswer(proto::SyncAnswer {
        heads,
        more: false,
        incomplete: false,
    })
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

fn reconnecting(attempt: u32, cause: ConnectionLoss) -> ClientEvent {
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
        let (mut cmds, mut evs) = (Vec::new(), Vec::new());
        while let Some(output) = self.s.poll_output() {
            match output {
                ClientOutput::Command(c) => cmds.push(c),
                ClientOutput::Event(e) => evs.push(e),
            }
        }
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
                vec![connect_s1()],
                vec![connecting_s1()],
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

/// The browser's constructor: 256 bits choose the ids (and the session's own resume token),
/// not `ClientConfig::seed`; the same bits give the same ids, other bits other ids.
#[test]
fn a_session_seeded_with_256_bits_draws_from_them_not_from_the_config_seed() {
    let ids = |seed: [u8; 32], config_seed: u64| {
        let mut c = config();
        c.seed = config_seed;
        let mut s = ClientSession::with_entropy(c, seed);
        (0..3)
            .map(|_| s.send(base(), ConvId::All, Bytes::from_static(b"x")))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids([1; 32], 1),
        ids([1; 32], 2),
        "the config's seed is unused"
    );
    assert_ne!(ids([1; 32], 1), ids([2; 32], 1));
    let mut plain = ClientSession::new(config());
    let plain_id = plain.send(base(), ConvId::All, Bytes::from_static(b"x"));
    assert_ne!(ids([1; 32], 42)[0], plain_id);
}
