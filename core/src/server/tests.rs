//! `ServerNode` behaviour, one module per group. Every step names its time in milliseconds
//! from the test's start; outputs are compared in full, in order, after a summary that drops
//! only human-readable texts.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cim_proto::frame::Kind;
use cim_proto::{self as proto, ErrorCode, Frame, KickReason};

use super::*;
use crate::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};
use crate::store::{
    ConvHead, LeaseRefresh, StoreCommand, StoreReply, StoreUnavailable, StoredMessage,
};
use crate::tickets::{Grant, TicketKeys};

const WALL0: u64 = 1_700_000_000_000;
const S1: &str = "s1";

/// An output with texts dropped, so tables stay short.
#[derive(Debug, Clone, PartialEq)]
enum Out {
    LoginOk {
        conn: u64,
        user: u64,
        epoch: u64,
    },
    Pong {
        conn: u64,
        nonce: u64,
    },
    Error {
        conn: u64,
        code: ErrorCode,
    },
    Kick {
        conn: u64,
        reason: KickReason,
    },
    Ack {
        conn: u64,
        seq: u64,
    },
    Nack {
        conn: u64,
        code: ErrorCode,
        retryable: bool,
    },
    Deliver {
        conn: u64,
        seq: u64,
    },
    Sync {
        conn: u64,
        heads: Vec<proto::ConvHead>,
        more: bool,
    },
    Fetch {
        conn: u64,
        answer: proto::FetchAnswer,
    },
    Close(u64),
    Store(StoreCommand),
    Route {
        user: u64,
        epoch: u64,
        conv: String,
    },
}

fn summarize(outputs: &[ServerOutput]) -> Vec<Out> {
    outputs
        .iter()
        .flat_map(|o| match o {
            ServerOutput::TransmitToMany { conns, frame } => conns
                .iter()
                .map(|conn| frame_out(conn.0, frame))
                .collect::<Vec<_>>(),
            other => vec![summarize_one(other)],
        })
        .collect()
}

fn summarize_one(output: &ServerOutput) -> Out {
    match output {
        ServerOutput::Transmit { conn, frame } => frame_out(conn.0, frame),
        ServerOutput::TransmitToMany { .. } => unreachable!("expanded by summarize"),
        ServerOutput::Close { conn } => Out::Close(conn.0),
        ServerOutput::Store(req) => Out::Store(req.command.clone()),
        ServerOutput::ToRoute { send, .. } => Out::Route {
            user: send.user_id,
            epoch: send.epoch,
            conv: send
                .send
                .as_ref()
                .map(|s| s.conv.clone())
                .unwrap_or_default(),
        },
    }
}

fn frame_out(conn: u64, frame: &Frame) -> Out {
    match frame
        .kind
        .clone()
        .expect("the node never sends empty frames")
    {
        Kind::LoginOk(ok) => Out::LoginOk {
            conn,
            user: ok.user_id,
            epoch: ok.epoch,
        },
        Kind::Pong(p) => Out::Pong {
            conn,
            nonce: p.nonce,
        },
        Kind::Error(e) => Out::Error {
            conn,
            code: ErrorCode::try_from(e.code).unwrap(),
        },
        Kind::Kick(k) => Out::Kick {
            conn,
            reason: KickReason::try_from(k.reason).unwrap(),
        },
        Kind::SendAck(a) => Out::Ack { conn, seq: a.seq },
        Kind::SendNack(n) => Out::Nack {
            conn,
            code: ErrorCode::try_from(n.code).unwrap(),
            retryable: n.retryable,
        },
        Kind::Deliver(d) => Out::Deliver {
            conn,
            seq: d.message.unwrap().seq,
        },
        Kind::SyncAnswer(s) => Out::Sync {
            conn,
            heads: s.heads,
            more: s.more,
        },
        Kind::FetchAnswer(answer) => Out::Fetch { conn, answer },
        other => panic!("unexpected frame to a client: {other:?}"),
    }
}

fn kick(conn: u64, reason: KickReason) -> [Out; 2] {
    [Out::Kick { conn, reason }, Out::Close(conn)]
}

fn error(conn: u64, code: ErrorCode) -> [Out; 2] {
    [Out::Error { conn, code }, Out::Close(conn)]
}

fn release(user: u64, epoch: u64) -> Out {
    Out::Store(StoreCommand::ReleaseClaim {
        user: UserId(user),
        epoch: Epoch(epoch),
    })
}

fn wall(ms: u64) -> UnixMillis {
    UnixMillis(WALL0 + ms)
}

fn ping(nonce: u64) -> Kind {
    Kind::Ping(proto::Ping { nonce })
}

fn send_frame(conv: &str, body_len: usize, msg: u64) -> Kind {
    Kind::Send(proto::Send {
        msg_id_hi: 0,
        msg_id_lo: msg,
        conv: conv.into(),
        body: vec![b'x'; body_len].into(),
        sent_at_ms: 0,
        ..Default::default()
    })
}

/// A node with a virtual clock, a ticket minter, and helpers that answer store requests.
struct Harness {
    node: ServerNode,
    t0: Instant,
    keys: TicketKeys,
    /// Store requests seen and not yet answered, oldest first.
    unanswered: Vec<StoreRequest>,
    /// Route sends seen, for their request ids.
    route_sends: Vec<RouteSend>,
    /// The link each of `route_sends` went out on.
    route_links: Vec<RouteLinkId>,
}

impl Harness {
    fn new() -> Self {
        Self::with(|_| {})
    }

    #[allow(clippy::disallowed_methods)] // the one clock read: the test's time origin
    fn with(adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        let keys = TicketKeys::new(1, b"test-secret".to_vec());
        let mut config = ServerConfig::new(ServerId::new(S1), keys.clone());
        adjust(&mut config);
        let t0 = Instant::now();
        let mut node = ServerNode::new(config).unwrap();
        // One route link up, as a server that has just started and been dialled.
        node.handle_route_link_up(t0, RouteLinkId(1)).unwrap();
        Self {
            node,
            t0,
            keys,
            unanswered: Vec::new(),
            route_sends: Vec::new(),
            route_links: Vec::new(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn ticket(&self, user: u64, epoch: u64) -> proto::Ticket {
        self.keys.mint(&Grant {
            user: UserId(user),
            server: ServerId::new(S1),
            epoch: Epoch(epoch),
            expires_at: wall(60_000),
        })
    }

    fn drain(&mut self) -> Vec<Out> {
        self.node.check_invariants();
        let mut raw = Vec::new();
        while let Some(o) = self.node.poll_output() {
            raw.push(o);
        }
        for o in &raw {
            match o {
                ServerOutput::Store(req) => self.unanswered.push(req.clone()),
                ServerOutput::ToRoute { link, send } => {
                    self.route_sends.push(send.clone());
                    self.route_links.push(*link);
                }
                _ => {}
            }
        }
        summarize(&raw)
    }

    fn open(&mut self, ms: u64, conn: u64) {
        self.node
            .handle_connection_opened(self.at(ms), ConnId(conn))
            .unwrap();
        assert_eq!(self.drain(), vec![]);
    }

    fn frame(&mut self, ms: u64, conn: u64, kind: Kind) -> Vec<Out> {
        self.node.handle_frame(
            self.at(ms),
            wall(ms),
            ConnId(conn),
            Frame { kind: Some(kind) },
        );
        self.drain()
    }

    fn login_frame(&mut self, ms: u64, conn: u64, ticket: proto::Ticket) -> Vec<Out> {
        self.frame(
            ms,
            conn,
            Kind::Login(proto::Login {
                ticket: Some(ticket),
            }),
        )
    }

    /// Answers the oldest unanswered store request.
    fn reply(&mut self, ms: u64, result: StoreResult) -> Vec<Out> {
        let req = self.unanswered.remove(0);
        self.node.handle_store_reply(self.at(ms), req.id, result);
        self.drain()
    }

    /// Answers the newest unanswered store request matching `pick`.
    fn reply_to(
        &mut self,
        ms: u64,
        pick: impl Fn(&StoreCommand) -> bool,
        result: StoreResult,
    ) -> Vec<Out> {
        let i = self
            .unanswered
            .iter()
            .rposition(|r| pick(&r.command))
            .expect("no such store request");
        let req = self.unanswered.remove(i);
        self.node.handle_store_reply(self.at(ms), req.id, result);
        self.drain()
    }

    /// Fire-and-forget requests (cursors, releases) need no answer for these tests.
    fn forget_unanswered(&mut self) {
        self.unanswered.clear();
    }

    fn timeout(&mut self, ms: u64) -> Vec<Out> {
        self.node.handle_timeout(self.at(ms), wall(ms));
        self.drain()
    }

    /// Opens `conn`, logs `user` in at `epoch` and lets the store bind it, all at `ms`.
    fn login(&mut self, ms: u64, conn: u64, user: u64, epoch: u64) {
        self.open(ms, conn);
        let ticket = self.ticket(user, epoch);
        let out = self.login_frame(ms, conn, ticket);
        assert!(matches!(
            out.as_slice(),
            [Out::Store(StoreCommand::BindSession { .. })]
        ));
        let out = self.reply_to(
            ms,
            |c| {
                matches!(c, StoreCommand::BindSession { user: u, epoch: e, .. }
                    if *u == UserId(user) && *e == Epoch(epoch))
            },
            Ok(StoreReply::SessionBound(Ok(()))),
        );
        assert_eq!(out, vec![Out::LoginOk { conn, user, epoch }]);
    }

    fn next_timer(&self) -> Option<(u64, TimerReason)> {
        self.node
            .poll_timeout()
            .map(|(at, reason)| (at.duration_since(self.t0).as_millis() as u64, reason))
    }
}

mod login {
    use super::*;

    #[test]
    fn good_ticket_binds_then_login_ok() {
        let mut h = Harness::new();
        h.open(0, 1);
        assert_eq!(h.next_timer(), Some((10_000, TimerReason::LoginDeadline)));
        let ticket = h.ticket(7, 3);
        // The store step comes first; no LoginOk until it confirms.
        assert_eq!(
            h.login_frame(100, 1, ticket),
            vec![Out::Store(StoreCommand::BindSession {
                user: UserId(7),
                epoch: Epoch(3),
                server: ServerId::new(S1),
                lease_until: wall(100 + 30_000),
            })]
        );
        assert_eq!(h.node.sessions(), 0);
        assert_eq!(
            h.reply(150, Ok(StoreReply::SessionBound(Ok(())))),
            vec![Out::LoginOk {
                conn: 1,
                user: 7,
                epoch: 3
            }]
        );
        assert_eq!(h.node.session_of(UserId(7)), Some((ConnId(1), Epoch(3))));
        assert_eq!(h.node.stats().logins_ok, 1);
        // Next deadline: the first lease refresh, a refresh interval after going live.
        assert_eq!(h.next_timer(), Some((10_150, TimerReason::LeaseRefresh)));
    }

    #[test]
    fn bad_tickets_are_refused_with_their_error() {
        let h = Harness::new();
        let good = h.ticket(7, 3);
        let forged = proto::Ticket {
            epoch: 4,
            ..good.clone()
        };
        let other_key = TicketKeys::new(1, b"other".to_vec()).mint(&Grant {
            user: UserId(7),
            server: ServerId::new(S1),
            epoch: Epoch(3),
            expires_at: wall(60_000),
        });
        let expired = h.keys.mint(&Grant {
            user: UserId(7),
            server: ServerId::new(S1),
            epoch: Epoch(3),
            // Login at wall(5_000); skew 2 s: expired 3 s ago is past the allowance.
            expires_at: wall(2_000),
        });
        let within_skew = h.keys.mint(&Grant {
            user: UserId(7),
            server: ServerId::new(S1),
            epoch: Epoch(3),
            expires_at: wall(3_001),
        });
        let wrong_server = h.keys.mint(&Grant {
            user: UserId(7),
            server: ServerId::new("s2"),
            epoch: Epoch(3),
            expires_at: wall(60_000),
        });
        let cases: Vec<(&str, Option<proto::Ticket>, Option<ErrorCode>)> = vec![
            ("forged epoch", Some(forged), Some(ErrorCode::BadTicket)),
            ("other secret", Some(other_key), Some(ErrorCode::BadTicket)),
            ("no ticket", None, Some(ErrorCode::BadTicket)),
            ("expired", Some(expired), Some(ErrorCode::TicketExpired)),
            (
                "wrong server",
                Some(wrong_server),
                Some(ErrorCode::WrongServer),
            ),
            ("expired but within skew", Some(within_skew), None),
        ];
        for (name, ticket, want) in cases {
            let mut h = Harness::new();
            h.open(0, 1);
            let out = h.frame(5_000, 1, Kind::Login(proto::Login { ticket }));
            match want {
                Some(code) => {
                    assert_eq!(out, error(1, code).to_vec(), "{name}");
                    assert_eq!(h.node.connections(), 0, "{name}");
                    assert_eq!(h.node.stats().logins_failed, 1, "{name}");
                }
                None => assert!(
                    matches!(
                        out.as_slice(),
                        [Out::Store(StoreCommand::BindSession { .. })]
                    ),
                    "{name}: {out:?}"
                ),
            }
        }
    }

    #[test]
    fn stale_epoch_at_bind_is_refused_without_release() {
        let mut h = Harness::new();
        h.open(0, 1);
        let ticket = h.ticket(7, 3);
        h.login_frame(0, 1, ticket);
        // No release: the claim belongs to the newer epoch.
        assert_eq!(
            h.reply(10, Ok(StoreReply::SessionBound(Err(Epoch(4))))),
            error(1, ErrorCode::StaleEpoch).to_vec()
        );
        assert_eq!(h.node.sessions(), 0);
        assert_eq!(h.node.stats().logins_failed, 1);
    }

    #[test]
    fn store_unavailable_at_bind_refuses_and_releases() {
        let mut h = Harness::new();
        h.open(0, 1);
        let ticket = h.ticket(7, 3);
        h.login_frame(0, 1, ticket);
        let mut want = error(1, ErrorCode::Unavailable).to_vec();
        // The bind may have landed: give the claim back.
        want.push(release(7, 3));
        assert_eq!(h.reply(10, Err(StoreUnavailable("timeout".into()))), want);
    }

    #[test]
    fn bind_slower_than_the_proven_window_is_refused() {
        let mut h = Harness::with(|c| c.login_timeout = Duration::from_secs(60));
        h.open(0, 1);
        let ticket = h.ticket(7, 3);
        h.login_frame(0, 1, ticket);
        let mut want = error(1, ErrorCode::Unavailable).to_vec();
        want.push(release(7, 3));
        assert_eq!(h.reply(24_000, Ok(StoreReply::SessionBound(Ok(())))), want);
    }

    #[test]
    fn requests_before_login_ok_close_the_connection() {
        let requests = [
            send_frame("all", 1, 1),
            Kind::DeliverAck(proto::DeliverAck::default()),
            Kind::SyncRequest(proto::SyncRequest {}),
            Kind::FetchRequest(proto::FetchRequest::default()),
        ];
        for request in requests {
            let mut h = Harness::new();
            h.open(0, 1);
            // A ping is fine before login.
            assert_eq!(
                h.frame(1, 1, ping(5)),
                vec![Out::Pong { conn: 1, nonce: 5 }]
            );
            assert_eq!(
                h.frame(2, 1, request.clone()),
                error(1, ErrorCode::NotLoggedIn).to_vec(),
                "{request:?}"
            );
        }
        // Also while the bind is in flight.
        let mut h = Harness::new();
        h.open(0, 1);
        let ticket = h.ticket(7, 3);
        h.login_frame(0, 1, ticket);
        assert_eq!(
            h.frame(1, 1, Kind::SyncRequest(proto::SyncRequest {})),
            error(1, ErrorCode::NotLoggedIn).to_vec()
        );
    }

    #[test]
    fn server_frames_from_a_client_and_second_logins_are_protocol_errors() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        let ticket = h.ticket(7, 3);
        let mut want = error(1, ErrorCode::UnexpectedFrame).to_vec();
        want.push(release(7, 3));
        assert_eq!(h.login_frame(10, 1, ticket), want);

        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        let mut want = error(1, ErrorCode::UnexpectedFrame).to_vec();
        want.push(release(7, 3));
        assert_eq!(h.frame(10, 1, Kind::Pong(proto::Pong { nonce: 1 })), want);

        let mut h = Harness::new();
        h.open(0, 1);
        h.node
            .handle_frame(h.at(1), wall(1), ConnId(1), Frame { kind: None });
        assert_eq!(h.drain(), error(1, ErrorCode::MalformedFrame).to_vec());
        assert_eq!(h.node.stats().protocol_errors, 1);
    }

    #[test]
    fn login_timeout() {
        let mut h = Harness::new();
        h.open(0, 1);
        // Pings do not stand in for a login.
        h.frame(5_000, 1, ping(1));
        assert_eq!(h.next_timer(), Some((10_000, TimerReason::LoginDeadline)));
        assert_eq!(h.timeout(9_999), vec![]);
        assert_eq!(
            h.timeout(10_000),
            kick(1, KickReason::LoginTimeout).to_vec()
        );
        assert_eq!(h.next_timer(), None);
    }

    #[test]
    fn login_timeout_while_binding_releases_when_the_bind_lands() {
        let mut h = Harness::new();
        h.open(0, 1);
        let ticket = h.ticket(7, 3);
        h.login_frame(9_000, 1, ticket);
        assert_eq!(
            h.timeout(10_000),
            kick(1, KickReason::LoginTimeout).to_vec()
        );
        assert_eq!(
            h.reply(11_000, Ok(StoreReply::SessionBound(Ok(())))),
            vec![release(7, 3)]
        );
        assert_eq!(h.node.sessions(), 0);
    }

    #[test]
    fn connection_limit() {
        let mut h = Harness::with(|c| c.max_connections = 2);
        h.open(0, 1);
        h.open(0, 2);
        assert_eq!(
            h.node.handle_connection_opened(h.at(0), ConnId(3)),
            Err(Refused::TooManyConnections)
        );
        h.node.handle_connection_closed(h.at(1), ConnId(1));
        assert_eq!(h.node.handle_connection_opened(h.at(1), ConnId(3)), Ok(()));
        assert_eq!(h.node.stats().refused_connections, 1);
    }
}

mod heartbeat {
    use super::*;

    /// Long leases so these tests see only the idle timer.
    fn harness() -> Harness {
        Harness::with(|c| {
            c.lease_ttl = Duration::from_secs(3_600);
            c.refresh_interval = Duration::from_secs(1_200);
        })
    }

    #[test]
    fn ping_gets_pong_with_the_same_nonce() {
        let mut h = harness();
        h.login(0, 1, 7, 3);
        assert_eq!(
            h.frame(10, 1, ping(0xdead_beef)),
            vec![Out::Pong {
                conn: 1,
                nonce: 0xdead_beef
            }]
        );
    }

    #[test]
    fn pings_keep_a_session_then_silence_reaps_it() {
        let mut h = harness();
        h.login(0, 1, 7, 3);
        h.frame(10_000, 1, ping(1));
        h.frame(20_000, 1, ping(2));
        assert_eq!(h.next_timer(), Some((50_000, TimerReason::Idle)));
        let steps: Vec<(u64, Vec<Out>)> = vec![
            (30_000, vec![]), // would have been reaped without the pings
            (49_999, vec![]),
            (
                50_000,
                [kick(1, KickReason::Idle).as_slice(), &[release(7, 3)]].concat(),
            ),
        ];
        for (ms, want) in steps {
            assert_eq!(h.timeout(ms), want, "at {ms} ms");
        }
        assert_eq!(h.node.stats().kicks(KickReason::Idle), 1);
    }

    #[test]
    fn a_session_that_never_pings_is_reaped() {
        let mut h = harness();
        h.login(0, 1, 7, 3);
        assert_eq!(h.timeout(29_999), vec![]);
        assert_eq!(
            h.timeout(30_000),
            [kick(1, KickReason::Idle).as_slice(), &[release(7, 3)]].concat()
        );
    }
}

mod send {
    use super::*;

    #[test]
    fn send_is_forwarded_and_its_ack_relayed() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        assert_eq!(
            h.frame(10, 1, send_frame("p:7:9", 5, 42)),
            vec![Out::Route {
                user: 7,
                epoch: 3,
                conv: "p:7:9".into()
            }]
        );
        let sent = h.route_sends[0].clone();
        assert_eq!(sent.send.as_ref().unwrap().msg_id_lo, 42);
        let ack = proto::SendAck {
            msg_id_hi: 0,
            msg_id_lo: 42,
            conv: "p:7:9".into(),
            log_epoch: 1,
            seq: 17,
        };
        h.node.handle_route_result(
            h.at(20),
            proto::RouteSendResult {
                request_id: sent.request_id,
                user_id: 7,
                ack: Some(ack),
                nack: None,
            },
        );
        assert_eq!(h.drain(), vec![Out::Ack { conn: 1, seq: 17 }]);
        // A duplicate result for the same request is dropped.
        h.node.handle_route_result(
            h.at(21),
            proto::RouteSendResult {
                request_id: sent.request_id,
                ..Default::default()
            },
        );
        assert_eq!(h.drain(), vec![]);
    }

    #[test]
    fn route_nack_is_relayed_and_a_dead_link_nacks_retryable() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.frame(10, 1, send_frame("g:rust", 5, 1));
        h.frame(11, 1, send_frame("g:rust", 5, 2));
        let (first, second) = (h.route_sends[0].request_id, h.route_sends[1].request_id);
        h.node.handle_route_result(
            h.at(20),
            proto::RouteSendResult {
                request_id: first,
                user_id: 7,
                ack: None,
                nack: Some(proto::SendNack {
                    msg_id_lo: 1,
                    code: ErrorCode::NotMember as i32,
                    retryable: false,
                    ..Default::default()
                }),
            },
        );
        h.node.handle_route_failed(h.at(21), second);
        assert_eq!(
            h.drain(),
            vec![
                Out::Nack {
                    conn: 1,
                    code: ErrorCode::NotMember,
                    retryable: false
                },
                Out::Nack {
                    conn: 1,
                    code: ErrorCode::Unavailable,
                    retryable: true
                },
            ]
        );
    }

    #[test]
    fn result_for_a_session_that_ended_is_dropped() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.frame(10, 1, send_frame("all", 5, 1));
        let request_id = h.route_sends[0].request_id;
        h.node.handle_connection_closed(h.at(15), ConnId(1));
        assert_eq!(h.drain(), vec![release(7, 3)]);
        // The user is back on another connection: the old send's ack is not theirs to get.
        h.login(16, 2, 7, 4);
        h.node.handle_route_result(
            h.at(20),
            proto::RouteSendResult {
                request_id,
                user_id: 7,
                ack: Some(proto::SendAck::default()),
                nack: None,
            },
        );
        assert_eq!(h.drain(), vec![]);
    }

    #[test]
    fn refused_sends_table() {
        let nack = |code, retryable| {
            vec![Out::Nack {
                conn: 1,
                code,
                retryable,
            }]
        };
        let route = |conv: &str| {
            vec![Out::Route {
                user: 7,
                epoch: 3,
                conv: conv.into(),
            }]
        };
        let cases: Vec<(&str, Kind, Vec<Out>)> = vec![
            (
                "bad conversation",
                send_frame("p:9:7", 5, 1),
                nack(ErrorCode::BadConversation, false),
            ),
            (
                "garbage conversation",
                send_frame("", 5, 1),
                nack(ErrorCode::BadConversation, false),
            ),
            (
                "body at the limit",
                send_frame("all", 4096, 1),
                route("all"),
            ),
            (
                "body over the limit",
                send_frame("all", 4097, 1),
                nack(ErrorCode::BodyTooLarge, false),
            ),
        ];
        for (name, frame, want) in cases {
            let mut h = Harness::new();
            h.login(0, 1, 7, 3);
            assert_eq!(h.frame(10, 1, frame), want, "{name}");
            assert_eq!(h.node.connections(), 1, "{name}: the connection stays");
        }
    }

    #[test]
    fn token_bucket_limits_sends_per_user() {
        let mut h = Harness::with(|c| {
            c.send_rate_per_sec = 1;
            c.send_burst = 2;
        });
        h.login(0, 1, 7, 3);
        let route = vec![Out::Route {
            user: 7,
            epoch: 3,
            conv: "all".into(),
        }];
        let limited = vec![Out::Nack {
            conn: 1,
            code: ErrorCode::RateLimited,
            retryable: true,
        }];
        let steps: Vec<(u64, Vec<Out>)> = vec![
            (100, route.clone()),
            (100, route.clone()),
            (100, limited.clone()),
            (999, limited.clone()), // 0.9 tokens refilled since 100 ms
            (1_100, route.clone()),
            (1_100, limited),
        ];
        for (i, (ms, want)) in steps.into_iter().enumerate() {
            assert_eq!(
                h.frame(ms, 1, send_frame("all", 1, i as u64)),
                want,
                "step {i}"
            );
        }
        assert_eq!(h.node.stats().rate_limited_sends, 3);
    }
}

mod store_reads {
    use super::*;

    fn head(conv: ConvId, head_seq: u64) -> ConvHead {
        ConvHead {
            conv,
            log_epoch: LogEpoch(5),
            head_seq,
            first_available_seq: 1,
            cursor_seq: 2,
        }
    }

    #[test]
    fn sync_request_loads_heads_and_answers() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        assert_eq!(
            h.frame(10, 1, Kind::SyncRequest(proto::SyncRequest {})),
            vec![Out::Store(StoreCommand::LoadHeads { user: UserId(7) })]
        );
        let heads = vec![
            head(ConvId::All, 9),
            head(ConvId::group("rust").unwrap(), 4),
        ];
        let want = vec![Out::Sync {
            conn: 1,
            heads: vec![
                proto::ConvHead {
                    conv: "all".into(),
                    log_epoch: 5,
                    head_seq: 9,
                    first_available_seq: 1,
                    cursor_seq: 2,
                },
                proto::ConvHead {
                    conv: "g:rust".into(),
                    log_epoch: 5,
                    head_seq: 4,
                    first_available_seq: 1,
                    cursor_seq: 2,
                },
            ],
            more: false,
        }];
        assert_eq!(h.reply(20, Ok(StoreReply::Heads(heads))), want);
        // Store down: the client is told to retry, the connection stays.
        h.frame(30, 1, Kind::SyncRequest(proto::SyncRequest {}));
        assert_eq!(
            h.reply(40, Err(StoreUnavailable("down".into()))),
            vec![Out::Error {
                conn: 1,
                code: ErrorCode::Unavailable
            }]
        );
        assert_eq!(h.node.sessions(), 1);
    }

    /// Heads that do not fit in one frame go out as several SyncAnswers from the one store
    /// read, back to back, each within `max_answer_bytes`, all but the last marked `more`.
    #[test]
    fn a_sync_answer_too_big_for_a_frame_is_paged() {
        let mut h = Harness::with(|c| c.max_answer_bytes = 200);
        h.login(0, 1, 7, 3);
        h.frame(10, 1, Kind::SyncRequest(proto::SyncRequest {}));
        let heads: Vec<ConvHead> = (0..20)
            .map(|n| head(ConvId::group(&format!("g{n:02}")).unwrap(), n + 1))
            .collect();
        let out = h.reply(20, Ok(StoreReply::Heads(heads.clone())));
        let pages: Vec<(Vec<proto::ConvHead>, bool)> = out
            .into_iter()
            .map(|o| match o {
                Out::Sync {
                    conn: 1,
                    heads,
                    more,
                } => (heads, more),
                other => panic!("expected only sync answers, got {other:?}"),
            })
            .collect();
        assert!(pages.len() > 2, "{} pages", pages.len());
        let mores: Vec<bool> = pages.iter().map(|(_, more)| *more).collect();
        let mut expected = vec![true; pages.len() - 1];
        expected.push(false);
        assert_eq!(mores, expected);
        for (page, _) in &pages {
            use prost::Message as _;
            let size: usize = page.iter().map(|h| h.encoded_len() + 11).sum();
            assert!(size <= 200, "page of {size} bytes");
        }
        let all: Vec<proto::ConvHead> = pages.into_iter().flat_map(|(page, _)| page).collect();
        assert_eq!(all, heads.iter().map(head_to_proto).collect::<Vec<_>>());
        // None at all is still one (empty, final) answer.
        h.frame(30, 1, Kind::SyncRequest(proto::SyncRequest {}));
        assert_eq!(
            h.reply(40, Ok(StoreReply::Heads(Vec::new()))),
            vec![Out::Sync {
                conn: 1,
                heads: Vec::new(),
                more: false
            }]
        );
    }

    #[test]
    fn fetch_is_capped_and_converted() {
        let cases = [(1_000u32, 100u32), (0, 100), (30, 30)];
        for (asked, served) in cases {
            let mut h = Harness::new();
            h.login(0, 1, 7, 3);
            let out = h.frame(
                10,
                1,
                Kind::FetchRequest(proto::FetchRequest {
                    conv: "p:7:9".into(),
                    log_epoch: 5,
                    after_seq: 3,
                    limit: asked,
                }),
            );
            assert_eq!(
                out,
                vec![Out::Store(StoreCommand::Fetch {
                    user: UserId(7),
                    conv: ConvId::private(UserId(7), UserId(9)).unwrap(),
                    log_epoch: LogEpoch(5),
                    after_seq: 3,
                    limit: served,
                })],
                "limit {asked}"
            );
        }

        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.frame(
            10,
            1,
            Kind::FetchRequest(proto::FetchRequest {
                conv: "p:7:9".into(),
                log_epoch: 5,
                after_seq: 3,
                limit: 10,
            }),
        );
        let conv = ConvId::private(UserId(7), UserId(9)).unwrap();
        let message = StoredMessage {
            conv: conv.clone(),
            log_epoch: LogEpoch(5),
            seq: 4,
            sender: UserId(9),
            msg_id: ClientMsgId::from_halves(1, 2),
            body: Bytes::from_static(b"hi"),
            appended_at: UnixMillis(123),
        };
        let out = h.reply(
            20,
            Ok(StoreReply::Fetched {
                head: head(conv, 4),
                messages: vec![message],
            }),
        );
        let want = proto::FetchAnswer {
            head: Some(proto::ConvHead {
                conv: "p:7:9".into(),
                log_epoch: 5,
                head_seq: 4,
                first_available_seq: 1,
                cursor_seq: 2,
            }),
            messages: vec![proto::Message {
                conv: "p:7:9".into(),
                log_epoch: 5,
                seq: 4,
                sender: 9,
                msg_id_hi: 1,
                msg_id_lo: 2,
                body: b"hi".to_vec().into(),
                appended_at_ms: 123,
            }],
        };
        assert_eq!(
            out,
            vec![Out::Fetch {
                conn: 1,
                answer: want
            }]
        );
    }

    #[test]
    fn fetch_answers_stay_under_the_byte_budget() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.frame(
            10,
            1,
            Kind::FetchRequest(proto::FetchRequest {
                conv: "p:7:9".into(),
                log_epoch: 5,
                after_seq: 0,
                limit: 100,
            }),
        );
        let conv = ConvId::private(UserId(7), UserId(9)).unwrap();
        let messages: Vec<StoredMessage> = (1..=100)
            .map(|seq| StoredMessage {
                conv: conv.clone(),
                log_epoch: LogEpoch(5),
                seq,
                sender: UserId(9),
                msg_id: ClientMsgId::from_halves(1, seq),
                body: Bytes::from(vec![b'x'; 4096]),
                appended_at: UnixMillis(123),
            })
            .collect();
        let out = h.reply(
            20,
            Ok(StoreReply::Fetched {
                head: head(conv, 100),
                messages,
            }),
        );
        let [Out::Fetch { answer, .. }] = out.as_slice() else {
            panic!("{out:?}");
        };
        let seqs: Vec<u64> = answer.messages.iter().map(|m| m.seq).collect();
        // The oldest ones, contiguous, as many as fit.
        assert_eq!(seqs, (1..=13).collect::<Vec<_>>());
        let frame = Frame {
            kind: Some(Kind::FetchAnswer(answer.clone())),
        };
        assert!(
            prost::Message::encoded_len(&frame)
                <= ServerConfig::new(ServerId::new("s"), TicketKeys::new(1, b"k".to_vec()))
                    .max_answer_bytes
                    + 64
        );
    }

    #[test]
    fn fetch_of_a_conversation_the_user_is_not_in_tells_nothing() {
        // The store says the user may not read it: the answer is NOT_MEMBER, with no head
        // (no log epoch, head seq or first available seq), as HTTP `/history` answers 403.
        for conv in ["p:8:9", "g:secret", "all"] {
            let mut h = Harness::new();
            h.login(0, 1, 7, 3);
            h.frame(
                10,
                1,
                Kind::FetchRequest(proto::FetchRequest {
                    conv: conv.into(),
                    log_epoch: 0,
                    after_seq: 0,
                    limit: 10,
                }),
            );
            let out = h.reply(20, Ok(StoreReply::NotMember));
            assert_eq!(
                out,
                vec![Out::Error {
                    conn: 1,
                    code: ErrorCode::NotMember
                }],
                "{conv}"
            );
            assert_eq!(h.node.sessions(), 1, "{conv}: the session stays");
        }
    }

    #[test]
    fn fetch_of_a_bad_conversation_is_an_error_not_a_close() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        let out = h.frame(
            10,
            1,
            Kind::FetchRequest(proto::FetchRequest {
                conv: "nope".into(),
                ..Default::default()
            }),
        );
        assert_eq!(
            out,
            vec![Out::Error {
                conn: 1,
                code: ErrorCode::BadConversation
            }]
        );
        assert_eq!(h.node.sessions(), 1);
    }

    #[test]
    fn deliver_ack_advances_good_cursors_and_reports_bad_ones() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        let cursor = |conv: &str, seq| proto::Cursor {
            conv: conv.into(),
            log_epoch: 5,
            seq,
        };
        let out = h.frame(
            10,
            1,
            Kind::DeliverAck(proto::DeliverAck {
                cursors: vec![cursor("all", 9), cursor("bogus", 1), cursor("g:rust", 4)],
            }),
        );
        assert_eq!(
            out,
            vec![
                Out::Error {
                    conn: 1,
                    code: ErrorCode::BadConversation
                },
                Out::Store(StoreCommand::AdvanceCursors {
                    user: UserId(7),
                    cursors: vec![
                        (ConvId::All, LogEpoch(5), 9),
                        (ConvId::group("rust").unwrap(), LogEpoch(5), 4),
                    ],
                }),
            ]
        );
        assert_eq!(h.node.sessions(), 1);
    }
}

mod push {
    use super::*;

    fn pushed(seq: u64, recipients: Vec<u64>, all_sessions: bool) -> proto::Push {
        proto::Push {
            message: Some(proto::Message {
                conv: "all".into(),
                seq,
                ..Default::default()
            }),
            recipients,
            all_sessions,
        }
    }

    #[test]
    fn push_reaches_listed_recipients_with_a_session_here() {
        let mut h = Harness::new();
        h.login(0, 1, 1, 1);
        h.login(0, 2, 2, 1);
        h.login(0, 3, 3, 1);
        // A connection still logging in gets nothing: it syncs after LoginOk.
        h.open(0, 4);
        let ticket = h.ticket(4, 1);
        h.login_frame(0, 4, ticket);
        h.node.handle_push(
            h.at(10),
            proto::PushBatch {
                pushes: vec![
                    pushed(5, vec![3, 1, 99, 4], false),
                    pushed(6, vec![2, 2], false),
                ],
            },
        );
        assert_eq!(
            h.drain(),
            vec![
                Out::Deliver { conn: 1, seq: 5 },
                Out::Deliver { conn: 3, seq: 5 },
                Out::Deliver { conn: 2, seq: 6 },
            ]
        );
    }

    /// The recipients of one push share one output, so the shell encodes the Deliver once;
    /// a recipient whose backlog is full is kicked instead and left out of it.
    #[test]
    fn one_push_is_one_output_for_all_its_recipients() {
        let mut h = Harness::with(|c| c.max_outbound_frames = 2);
        h.login(0, 1, 1, 1);
        h.login(0, 2, 2, 1);
        h.login(0, 3, 3, 1);
        // Conn 2 has its LoginOk and a pong unwritten: full.
        h.frame(1, 2, ping(1));
        h.node.handle_written(ConnId(1), 1);
        h.node.handle_written(ConnId(3), 1);
        h.node.handle_push(
            h.at(10),
            proto::PushBatch {
                pushes: vec![pushed(5, vec![1, 2, 3], false)],
            },
        );
        let mut raw = Vec::new();
        while let Some(output) = h.node.poll_output() {
            raw.push(output);
        }
        let many: Vec<_> = raw
            .iter()
            .filter_map(|o| match o {
                ServerOutput::TransmitToMany { conns, frame } => Some((conns, frame)),
                _ => None,
            })
            .collect();
        assert_eq!(many.len(), 1, "{raw:?}");
        assert_eq!(many[0].0, &vec![ConnId(1), ConnId(3)]);
        assert!(matches!(
            frame_out(0, many[0].1),
            Out::Deliver { seq: 5, .. }
        ));
        assert_eq!(h.node.stats().kicks(KickReason::SlowConsumer), 1);
    }

    #[test]
    fn all_sessions_push_reaches_every_session_here() {
        let mut h = Harness::new();
        h.login(0, 1, 1, 1);
        h.login(0, 2, 2, 1);
        h.open(0, 3); // not logged in
        h.node.handle_push(
            h.at(10),
            proto::PushBatch {
                pushes: vec![pushed(8, vec![], true)],
            },
        );
        assert_eq!(
            h.drain(),
            vec![
                Out::Deliver { conn: 1, seq: 8 },
                Out::Deliver { conn: 2, seq: 8 },
            ]
        );
    }
}

mod kicks {
    use super::*;

    fn kick_user(user: u64, below: u64) -> proto::KickUser {
        proto::KickUser {
            user_id: user,
            below_epoch: below,
            reason: KickReason::TakenOver as i32,
        }
    }

    #[test]
    fn kick_user_closes_only_older_sessions() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        // Same epoch: this is the session the route means to keep.
        let done = h.node.handle_kick_user(h.at(10), kick_user(7, 3));
        assert_eq!(h.drain(), vec![]);
        assert_eq!((done.user_id, done.below_epoch), (7, 3));
        let done = h.node.handle_kick_user(h.at(20), kick_user(7, 4));
        assert_eq!(
            h.drain(),
            [kick(1, KickReason::TakenOver).as_slice(), &[release(7, 3)]].concat()
        );
        assert_eq!((done.user_id, done.below_epoch), (7, 4));
        assert_eq!(h.node.stats().kicks(KickReason::TakenOver), 1);
    }

    #[test]
    fn kick_user_stops_a_login_still_binding() {
        let mut h = Harness::new();
        h.open(0, 1);
        let ticket = h.ticket(7, 3);
        h.login_frame(0, 1, ticket);
        h.node.handle_kick_user(h.at(5), kick_user(7, 4));
        assert_eq!(h.drain(), kick(1, KickReason::TakenOver).to_vec());
        // The bind reached the store before the takeover did: no LoginOk, claim released.
        assert_eq!(
            h.reply(10, Ok(StoreReply::SessionBound(Ok(())))),
            vec![release(7, 3)]
        );
        assert_eq!(h.node.sessions(), 0);
    }

    #[test]
    fn refresh_reply_superseded_or_gone_kicks() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.login(0, 2, 8, 1);
        h.login(0, 3, 9, 1);
        h.forget_unanswered();
        let out = h.timeout(10_000);
        assert_eq!(
            out,
            vec![Out::Store(StoreCommand::RefreshLeases {
                server: ServerId::new(S1),
                lease_until: wall(40_000),
                sessions: vec![
                    (UserId(7), Epoch(3)),
                    (UserId(8), Epoch(1)),
                    (UserId(9), Epoch(1)),
                ],
            })]
        );
        let out = h.reply(
            10_050,
            Ok(StoreReply::LeasesRefreshed(vec![
                (UserId(7), LeaseRefresh::Superseded { current: Epoch(4) }),
                (UserId(8), LeaseRefresh::Gone),
                (UserId(9), LeaseRefresh::Refreshed),
            ])),
        );
        assert_eq!(
            out,
            [
                kick(1, KickReason::TakenOver).as_slice(),
                &[release(7, 3)],
                &kick(2, KickReason::LoggedOut),
                &[release(8, 1)],
            ]
            .concat()
        );
        assert_eq!(h.node.session_of(UserId(9)), Some((ConnId(3), Epoch(1))));
    }

    #[test]
    fn newer_local_login_takes_over_the_older_session() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.open(100, 2);
        let ticket = h.ticket(7, 4);
        h.login_frame(100, 2, ticket);
        // The old session is kicked before the new one's LoginOk: they never overlap.
        assert_eq!(
            h.reply(110, Ok(StoreReply::SessionBound(Ok(())))),
            [
                kick(1, KickReason::TakenOver).as_slice(),
                &[release(7, 3)],
                &[Out::LoginOk {
                    conn: 2,
                    user: 7,
                    epoch: 4
                }],
            ]
            .concat()
        );
        assert_eq!(h.node.session_of(UserId(7)), Some((ConnId(2), Epoch(4))));
    }

    #[test]
    fn older_bind_landing_after_a_newer_session_is_refused() {
        let mut h = Harness::new();
        h.open(0, 1);
        let old = h.ticket(7, 3);
        h.login_frame(0, 1, old);
        h.login(5, 2, 7, 4);
        // The store replies crossed: epoch 3's bind confirmation arrives last.
        assert_eq!(
            h.reply(10, Ok(StoreReply::SessionBound(Ok(())))),
            [error(1, ErrorCode::StaleEpoch).as_slice(), &[release(7, 3)]].concat()
        );
        assert_eq!(h.node.session_of(UserId(7)), Some((ConnId(2), Epoch(4))));
    }
}

mod fencing {
    use super::*;

    fn is_refresh(c: &StoreCommand) -> bool {
        matches!(c, StoreCommand::RefreshLeases { .. })
    }

    fn refreshed(user: u64) -> StoreResult {
        Ok(StoreReply::LeasesRefreshed(vec![(
            UserId(user),
            LeaseRefresh::Refreshed,
        )]))
    }

    /// Keeps the client's heartbeat going so only the fence can end the session.
    fn ping_every_10s(h: &mut Harness, from: u64, to: u64) {
        for ms in (from..=to).step_by(10_000) {
            h.frame(ms, 1, ping(ms));
        }
    }

    #[test]
    fn proven_window_is_ttl_times_one_minus_epsilon() {
        let h = Harness::new();
        assert_eq!(h.node.config().proven_window(), Duration::from_secs(24));
    }

    #[test]
    fn unanswered_refreshes_fence_at_bind_sent_at_plus_window() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3); // bind sent at 0 ms
        h.forget_unanswered();
        ping_every_10s(&mut h, 5_000, 25_000);
        let refresh = |ms: u64| {
            vec![Out::Store(StoreCommand::RefreshLeases {
                server: ServerId::new(S1),
                lease_until: wall(ms + 30_000),
                sessions: vec![(UserId(7), Epoch(3))],
            })]
        };
        let steps: Vec<(u64, Vec<Out>)> = vec![
            (10_000, refresh(10_000)), // never answered
            (20_000, refresh(20_000)), // never answered
            (23_999, vec![]),          // still proven by the bind
            (
                24_000,
                [kick(1, KickReason::Fenced).as_slice(), &[release(7, 3)]].concat(),
            ),
        ];
        for (ms, want) in steps {
            if ms == 23_999 {
                assert_eq!(h.next_timer(), Some((24_000, TimerReason::Fence)));
            }
            assert_eq!(h.timeout(ms), want, "at {ms} ms");
        }
        assert_eq!(h.node.stats().fenced, 1);
        assert_eq!(h.node.sessions(), 0);
    }

    #[test]
    fn a_confirmed_refresh_proves_from_when_it_was_sent() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.forget_unanswered();
        ping_every_10s(&mut h, 5_000, 45_000);
        h.timeout(10_000);
        // Answered late: the proof still counts from 10 s (sent), not 15 s (answered).
        assert_eq!(h.reply_to(15_000, is_refresh, refreshed(7)), vec![]);
        assert_eq!(h.timeout(20_000).len(), 1); // refresh, unanswered
        assert_eq!(h.timeout(24_000), vec![]); // the bind's proof is superseded
        assert_eq!(h.timeout(30_000).len(), 1); // refresh, unanswered
        assert_eq!(h.next_timer(), Some((34_000, TimerReason::Fence)));
        assert_eq!(h.timeout(33_999), vec![]);
        assert_eq!(
            h.timeout(34_000),
            [kick(1, KickReason::Fenced).as_slice(), &[release(7, 3)]].concat()
        );
    }

    #[test]
    fn a_failed_refresh_proves_nothing() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.forget_unanswered();
        ping_every_10s(&mut h, 5_000, 15_000);
        h.timeout(10_000);
        assert_eq!(
            h.reply_to(10_500, is_refresh, Err(StoreUnavailable("down".into()))),
            vec![]
        );
        h.timeout(20_000);
        assert_eq!(
            h.timeout(24_000)[0],
            Out::Kick {
                conn: 1,
                reason: KickReason::Fenced
            }
        );
    }

    #[test]
    fn refreshes_go_out_in_batches() {
        let mut h = Harness::with(|c| c.refresh_batch = 2);
        for user in 1..=5 {
            h.login(0, user, user, 1);
        }
        h.forget_unanswered();
        let sizes: Vec<usize> = h
            .timeout(10_000)
            .into_iter()
            .map(|o| match o {
                Out::Store(StoreCommand::RefreshLeases { sessions, .. }) => sessions.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(sizes, vec![2, 2, 1]);
        // Left unanswered, the refreshes time out (proving nothing, kicking no one).
        assert_eq!(h.next_timer(), Some((15_000, TimerReason::StoreTimeout)));
        assert_eq!(h.timeout(15_000), vec![]);
        assert_eq!(h.node.stats().store_timeouts, 3);
        assert_eq!(h.next_timer(), Some((20_000, TimerReason::LeaseRefresh)));
    }
}

mod backpressure {
    use super::*;

    #[test]
    fn unwritten_frames_over_the_limit_kick_a_slow_consumer() {
        let mut h = Harness::with(|c| c.max_outbound_frames = 3);
        h.login(0, 1, 7, 3); // LoginOk: 1 unwritten
        assert_eq!(h.frame(1, 1, ping(1)).len(), 1); // 2
        assert_eq!(h.frame(2, 1, ping(2)).len(), 1); // 3
        assert_eq!(
            h.frame(3, 1, ping(3)),
            [
                kick(1, KickReason::SlowConsumer).as_slice(),
                &[release(7, 3)]
            ]
            .concat()
        );
        assert_eq!(h.node.stats().slow_consumers, 1);
        assert_eq!(h.node.stats().kicks(KickReason::SlowConsumer), 1);
    }

    #[test]
    fn written_frames_make_room() {
        let mut h = Harness::with(|c| c.max_outbound_frames = 3);
        h.login(0, 1, 7, 3);
        for nonce in 1..100 {
            assert_eq!(
                h.frame(nonce, 1, ping(nonce)),
                vec![Out::Pong { conn: 1, nonce }]
            );
            h.node.handle_written(ConnId(1), 1);
        }
    }
}

mod lifecycle {
    use super::*;

    #[test]
    fn closing_a_session_releases_its_claim() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.node.handle_connection_closed(h.at(10), ConnId(1));
        assert_eq!(h.drain(), vec![release(7, 3)]);
        // Closing before login has nothing to release.
        h.open(20, 2);
        h.node.handle_connection_closed(h.at(30), ConnId(2));
        assert_eq!(h.drain(), vec![]);
        assert_eq!(h.node.connections(), 0);
        // Nothing left to refresh or reap.
        assert_eq!(h.timeout(10_000), vec![]);
        assert_eq!(h.next_timer(), None);
    }

    #[test]
    fn codec_errors_send_an_error_then_close() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.node
            .handle_protocol_error(h.at(10), ConnId(1), ErrorCode::FrameTooLarge, "too big");
        assert_eq!(
            h.drain(),
            [
                error(1, ErrorCode::FrameTooLarge).as_slice(),
                &[release(7, 3)]
            ]
            .concat()
        );
    }

    #[test]
    fn drain_kicks_everyone_and_refuses_newcomers() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.login(0, 2, 8, 1);
        h.open(0, 3);
        h.node.begin_drain(h.at(100));
        assert_eq!(
            h.drain(),
            [
                kick(1, KickReason::Draining).as_slice(),
                &[release(7, 3)],
                &kick(2, KickReason::Draining),
                &[release(8, 1)],
                &kick(3, KickReason::Draining),
            ]
            .concat()
        );
        assert_eq!(
            h.node.handle_connection_opened(h.at(200), ConnId(4)),
            Err(Refused::Draining)
        );
        assert_eq!(h.next_timer(), None);
        assert_eq!(h.node.stats().kicks(KickReason::Draining), 3);
    }

    #[test]
    fn config_is_validated() {
        let keys = TicketKeys::new(1, b"k".to_vec());
        let base = ServerConfig::new(ServerId::new(S1), keys);
        assert_eq!(base.validate(), Ok(()));
        type Adjust = fn(&mut ServerConfig);
        let cases: Vec<(&str, Adjust, ConfigError)> = vec![
            (
                "refresh slower than the proof",
                |c| c.refresh_interval = Duration::from_secs(24),
                ConfigError::RefreshInterval,
            ),
            (
                "epsilon one",
                |c| c.fence_margin = 1.0,
                ConfigError::FenceMargin,
            ),
            (
                "heartbeat slower than idle",
                |c| c.heartbeat_interval = Duration::from_secs(30),
                ConfigError::Heartbeat,
            ),
            (
                "zero burst",
                |c| c.send_burst = 0,
                ConfigError::Zero("send_burst"),
            ),
        ];
        for (name, adjust, want) in cases {
            let mut config = base.clone();
            adjust(&mut config);
            assert_eq!(config.validate(), Err(want), "{name}");
            assert!(ServerNode::new(config).is_err(), "{name}");
        }
    }
}

mod store_timeout {
    use super::*;

    fn is_bind(c: &StoreCommand) -> bool {
        matches!(c, StoreCommand::BindSession { .. })
    }

    #[test]
    fn an_unanswered_bind_fails_unavailable_at_the_store_timeout() {
        let mut h = Harness::new();
        h.open(0, 1);
        let ticket = h.ticket(7, 3);
        h.login_frame(100, 1, ticket);
        assert_eq!(h.next_timer(), Some((5_100, TimerReason::StoreTimeout)));
        assert_eq!(h.timeout(5_099), vec![]);
        assert_eq!(
            h.timeout(5_100),
            [
                error(1, ErrorCode::Unavailable).as_slice(),
                &[release(7, 3)]
            ]
            .concat()
        );
        assert_eq!(h.node.stats().store_timeouts, 1);
        // The reply arriving after all changes nothing.
        assert_eq!(
            h.reply_to(5_200, is_bind, Ok(StoreReply::SessionBound(Ok(())))),
            vec![]
        );
        assert_eq!(h.node.sessions(), 0);
    }

    #[test]
    fn an_unanswered_sync_is_an_error_frame_not_a_close() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.frame(1_000, 1, Kind::SyncRequest(proto::SyncRequest {}));
        assert_eq!(h.next_timer(), Some((6_000, TimerReason::StoreTimeout)));
        assert_eq!(
            h.timeout(6_000),
            vec![Out::Error {
                conn: 1,
                code: ErrorCode::Unavailable
            }]
        );
        assert_eq!(h.node.session_of(UserId(7)), Some((ConnId(1), Epoch(3))));
    }

    #[test]
    fn an_answered_request_leaves_no_timer() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        // Only the lease refresh is due; the bind's timeout went with its reply.
        assert_eq!(h.next_timer(), Some((10_000, TimerReason::LeaseRefresh)));
    }
}

mod registry {
    use super::*;

    #[test]
    fn losing_the_registry_session_fences_every_connection() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.login(0, 2, 8, 1);
        h.open(0, 3);
        h.open(0, 4);
        let ticket = h.ticket(9, 2);
        h.login_frame(0, 4, ticket);
        assert_eq!(
            h.node.session_list(),
            vec![
                (UserId(7), Epoch(3), ConnId(1)),
                (UserId(8), Epoch(1), ConnId(2))
            ]
        );
        h.node.handle_registry_session_lost(h.at(50));
        assert_eq!(
            h.drain(),
            [
                kick(1, KickReason::Fenced).as_slice(),
                &[release(7, 3)],
                &kick(2, KickReason::Fenced),
                &[release(8, 1)],
                &kick(3, KickReason::Fenced),
                &kick(4, KickReason::Fenced),
            ]
            .concat()
        );
        assert_eq!(h.node.stats().fenced, 2);
        assert_eq!(h.node.connections(), 0);
        // The bind that was in flight lands: nobody gets a LoginOk, the claim goes back.
        assert_eq!(
            h.reply_to(
                60,
                |c| matches!(c, StoreCommand::BindSession { .. }),
                Ok(StoreReply::SessionBound(Ok(())))
            ),
            vec![release(9, 2)]
        );
        // No client is accepted until the server is registered again.
        assert_eq!(
            h.node.handle_connection_opened(h.at(100), ConnId(5)),
            Err(Refused::Unregistered)
        );
        h.node.handle_registered(h.at(200));
        h.open(200, 5);
    }

    /// The kick message of every Kick output (the summary drops texts).
    fn kick_messages(h: &mut Harness) -> Vec<String> {
        let mut messages = Vec::new();
        while let Some(o) = h.node.poll_output() {
            if let ServerOutput::Transmit {
                frame: Frame {
                    kind: Some(Kind::Kick(k)),
                },
                ..
            } = o
            {
                messages.push(k.message);
            }
        }
        messages
    }

    #[test]
    fn a_fence_says_which_of_store_and_registry_was_lost() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.node.handle_store_lost(h.at(10));
        assert_eq!(kick_messages(&mut h), vec!["server lost the store"]);
        h.node.handle_store_back(h.at(20));
        h.login(30, 2, 7, 4);
        h.node.handle_registry_session_lost(h.at(40));
        assert_eq!(
            kick_messages(&mut h),
            vec!["server lost its registry session"]
        );
        assert_eq!(h.node.stats().fenced, 2);
        assert_eq!(h.node.stats().kicks(KickReason::Fenced), 2);
    }

    #[test]
    fn losing_the_store_fences_every_connection_like_a_registry_loss() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.open(0, 2);
        h.node.handle_store_lost(h.at(50));
        assert_eq!(
            h.drain(),
            [
                kick(1, KickReason::Fenced).as_slice(),
                &[release(7, 3)],
                &kick(2, KickReason::Fenced),
            ]
            .concat()
        );
        assert!(h.node.is_withdrawn());
    }

    /// Inputs in order at the given milliseconds, then whether a connection opened after
    /// them is accepted (and with which refusal if not). The store and the registry are
    /// separate reasons: each must be back before clients are accepted.
    #[test]
    fn clients_are_refused_while_store_or_registry_is_lost() {
        #[derive(Debug, Clone, Copy)]
        enum In {
            StoreLost,
            StoreBack,
            RegistryLost,
            Registered,
            Drain,
        }
        use In::*;
        let cases: &[(&str, &[In], Result<(), Refused>)] = &[
            ("nothing lost", &[], Ok(())),
            ("store lost", &[StoreLost], Err(Refused::StoreUnreachable)),
            ("store back", &[StoreLost, StoreBack], Ok(())),
            ("registry lost", &[RegistryLost], Err(Refused::Unregistered)),
            ("registered again", &[RegistryLost, Registered], Ok(())),
            (
                "store back, registry still lost",
                &[StoreLost, RegistryLost, StoreBack],
                Err(Refused::Unregistered),
            ),
            (
                "registered again, store still lost",
                &[RegistryLost, StoreLost, Registered],
                Err(Refused::StoreUnreachable),
            ),
            (
                "both back",
                &[StoreLost, RegistryLost, Registered, StoreBack],
                Ok(()),
            ),
            (
                "a back without a loss changes nothing",
                &[StoreBack, Registered],
                Ok(()),
            ),
            ("draining", &[Drain], Err(Refused::Draining)),
            (
                "withdrawn and draining: the withdrawal is said",
                &[Drain, StoreLost],
                Err(Refused::StoreUnreachable),
            ),
        ];
        for &(name, inputs, want) in cases {
            let mut h = Harness::new();
            for (i, input) in inputs.iter().enumerate() {
                let now = h.at(10 * i as u64);
                match input {
                    StoreLost => h.node.handle_store_lost(now),
                    StoreBack => h.node.handle_store_back(now),
                    RegistryLost => h.node.handle_registry_session_lost(now),
                    Registered => h.node.handle_registered(now),
                    Drain => h.node.begin_drain(now),
                }
            }
            assert_eq!(
                h.node.is_withdrawn(),
                matches!(want, Err(Refused::StoreUnreachable | Refused::Unregistered)),
                "{name}"
            );
            assert_eq!(
                h.node.handle_connection_opened(h.at(100), ConnId(9)),
                want,
                "{name}"
            );
            let refused = u64::from(want.is_err());
            assert_eq!(h.node.stats().refused_connections, refused, "{name}");
            assert_eq!(h.node.connections(), usize::from(want.is_ok()), "{name}");
        }
    }
}

mod route_links {
    use super::*;

    fn nack_unavailable(conn: u64) -> Out {
        Out::Nack {
            conn,
            code: ErrorCode::Unavailable,
            retryable: true,
        }
    }

    fn route(user: u64, epoch: u64) -> Out {
        Out::Route {
            user,
            epoch,
            conv: "all".into(),
        }
    }

    fn answer(h: &mut Harness, ms: u64, i: usize) -> Vec<Out> {
        let send = h.route_sends[i].clone();
        h.node.handle_route_result(
            h.at(ms),
            proto::RouteSendResult {
                request_id: send.request_id,
                user_id: send.user_id,
                ack: Some(proto::SendAck {
                    seq: i as u64 + 1,
                    ..Default::default()
                }),
                nack: None,
            },
        );
        h.drain()
    }

    #[test]
    fn with_no_link_up_a_send_fails_at_once_and_retryable() {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.node.handle_route_link_down(h.at(5), RouteLinkId(1));
        assert_eq!(h.drain(), vec![]);
        assert_eq!(
            h.frame(10, 1, send_frame("all", 5, 1)),
            vec![nack_unavailable(1)]
        );
        assert_eq!(h.node.stats().route_sends_unrouted, 1);
    }

    #[test]
    fn a_users_unanswered_sends_share_one_link() {
        let mut h = Harness::new();
        h.login(0, 1, 3, 1); // user 3: link 2 of links 1 and 2, link 3 of 1, 2 and 3
        h.node
            .handle_route_link_up(h.at(1), RouteLinkId(2))
            .unwrap();
        assert_eq!(h.frame(10, 1, send_frame("all", 5, 1)), vec![route(3, 1)]);
        // A third link changes the hash (user 3 → link 3), not the link of sends in flight.
        h.node
            .handle_route_link_up(h.at(11), RouteLinkId(3))
            .unwrap();
        assert_eq!(h.frame(12, 1, send_frame("all", 5, 2)), vec![route(3, 1)]);
        answer(&mut h, 20, 0);
        assert_eq!(h.frame(21, 1, send_frame("all", 5, 3)), vec![route(3, 1)]);
        assert_eq!(
            h.route_links,
            vec![RouteLinkId(2), RouteLinkId(2), RouteLinkId(2)],
            "one send still unanswered each time"
        );
        answer(&mut h, 30, 1);
        answer(&mut h, 31, 2);
        // All answered: the next send picks afresh.
        h.frame(40, 1, send_frame("all", 5, 4));
        assert_eq!(h.route_links[3], RouteLinkId(3));
    }

    #[test]
    fn users_spread_over_the_links() {
        let mut h = Harness::new();
        h.node
            .handle_route_link_up(h.at(0), RouteLinkId(2))
            .unwrap();
        for (conn, user) in [(1, 1), (2, 2), (3, 3), (4, 4)] {
            h.login(0, conn, user, 1);
            h.frame(10, conn, send_frame("all", 5, user));
        }
        let links: Vec<u64> = h.route_links.iter().map(|l| l.0).collect();
        assert_eq!(links, vec![2, 1, 2, 1]);
    }

    #[test]
    fn a_link_going_down_fails_its_sends_and_frees_their_users() {
        let mut h = Harness::new();
        h.node
            .handle_route_link_up(h.at(0), RouteLinkId(2))
            .unwrap();
        h.login(0, 1, 1, 1); // user 1: link 2
        h.login(0, 2, 2, 1); // user 2: link 1
        h.frame(10, 1, send_frame("all", 5, 1));
        h.frame(11, 2, send_frame("all", 5, 2));
        h.frame(12, 1, send_frame("all", 5, 3));
        assert_eq!(h.node.route_link_in_flight(RouteLinkId(2)), 2);
        h.node.handle_route_link_down(h.at(20), RouteLinkId(2));
        assert_eq!(h.drain(), vec![nack_unavailable(1), nack_unavailable(1)]);
        assert_eq!(h.node.route_links(), 1);
        // User 1 goes over the link left; user 2's send there is untouched.
        assert_eq!(h.frame(30, 1, send_frame("all", 5, 4)), vec![route(1, 1)]);
        assert_eq!(h.route_links[3], RouteLinkId(1));
        assert_eq!(answer(&mut h, 40, 1), vec![Out::Ack { conn: 2, seq: 2 }]);
        // An answer for a send already failed is dropped.
        assert_eq!(answer(&mut h, 41, 0), vec![]);
    }

    #[test]
    fn a_full_link_queue_fails_the_send_without_moving_the_user() {
        let mut h = Harness::new();
        h.node
            .handle_route_link_up(h.at(0), RouteLinkId(2))
            .unwrap();
        h.login(0, 1, 1, 1); // user 1: link 2
        h.frame(10, 1, send_frame("all", 5, 1));
        h.frame(11, 1, send_frame("all", 5, 2));
        let second = h.route_sends[1].request_id;
        h.node.handle_route_failed(h.at(12), second);
        assert_eq!(h.drain(), vec![nack_unavailable(1)]);
        assert_eq!(h.node.stats().route_sends_unrouted, 1);
        // The first is still on link 2, so the user stays there.
        h.frame(13, 1, send_frame("all", 5, 3));
        assert_eq!(h.route_links[2], RouteLinkId(2));
    }

    #[test]
    fn a_send_whose_link_is_already_gone_is_routed_afresh() {
        let mut h = Harness::new();
        h.node
            .handle_route_link_up(h.at(0), RouteLinkId(2))
            .unwrap();
        h.login(0, 1, 1, 1); // user 1: link 2
        h.login(0, 2, 3, 1); // user 3: link 2
        h.frame(10, 2, send_frame("all", 5, 1));
        h.frame(11, 1, send_frame("all", 5, 2));
        // The shell finds link 2's writer gone when it queues user 1's send: user 3's send
        // on it fails, user 1's goes over link 1.
        let (link, send) = (h.route_links[1], h.route_sends[1].clone());
        h.node.handle_route_link_gone(h.at(12), link, send);
        assert_eq!(h.drain(), vec![nack_unavailable(2), route(1, 1)]);
        assert_eq!(h.route_links[2], RouteLinkId(1));
        assert_eq!(h.route_sends[2].request_id, h.route_sends[1].request_id);
        // With no link left, it fails like any send with no link.
        let send = h.route_sends[2].clone();
        h.node
            .handle_route_link_gone(h.at(13), RouteLinkId(1), send);
        assert_eq!(h.drain(), vec![nack_unavailable(1)]);
        assert_eq!(h.node.stats().route_sends_unrouted, 1);
    }

    #[test]
    fn a_draining_server_drops_its_links_and_takes_no_new_ones() {
        let mut h = Harness::new();
        h.node.begin_drain(h.at(0));
        assert_eq!(h.node.route_links(), 0);
        assert_eq!(
            h.node.handle_route_link_up(h.at(1), RouteLinkId(2)),
            Err(Refused::Draining)
        );
    }
}
