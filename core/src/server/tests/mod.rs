//! `ServerNode` behaviour, one module per group. Every step names its time in milliseconds
//! from the test's start; outputs are compared in full, in order, after a summary that drops
//! only human-readable texts.

use std::time::Duration;

use crate::time::Instant;

use bytes::Bytes;
use cim_proto::frame::Kind;
use cim_proto::{self as proto, ErrorCode, Frame, KickReason};

use super::*;
use crate::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};
use crate::route::tickets::{Grant, TicketKeys};
use crate::store::{
    ConvHead, LeaseRefresh, StoreCommand, StoreReply, StoreUnavailable, StoredMessage,
};

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
        incomplete: bool,
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
    KickDone {
        link: u64,
        user: u64,
        below: u64,
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
        ServerOutput::KickUserDone { link, done } => Out::KickDone {
            link: link.0,
            user: done.user_id,
            below: done.below_epoch,
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
            incomplete: s.incomplete,
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
    Out::Store(StoreCommand::ExpireClaim {
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
        let t0 = Instant::from_nanos(0);
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

mod login;

mod heartbeat;

mod send;

mod store_reads;

mod push;

mod kicks;

mod fencing;

mod backpressure;

mod lifecycle;

mod store_timeout;

mod registry;

mod route_links;
