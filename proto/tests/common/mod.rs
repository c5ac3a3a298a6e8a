//! Shared test vocabulary: proptest strategies covering every `frame::Kind`, one canonical
//! frame per kind (for snapshots and the fuzz seed corpus), and small helpers.
//!
//! Each test file compiles this module separately and uses a different part of it.
#![allow(dead_code)]

use bytes::BytesMut;
use cim_proto::codec::{Decoded, FrameCodec};
use cim_proto::frame::Kind;
use cim_proto::*;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::Union;

/// The number of `frame::Kind` variants; a test asserts the strategies reach every one.
pub const KIND_COUNT: usize = 23;

/// A stable, readable name per variant (see `Kind::name`).
pub fn kind_name(kind: &Kind) -> &'static str {
    kind.name()
}

pub fn frame_name(frame: &Frame) -> &'static str {
    frame.kind.as_ref().map_or("<empty>", kind_name)
}

// ---------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------

/// Any Unicode scalar values, including control characters and astral planes.
pub fn arb_string() -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..24).prop_map(String::from_iter)
}

/// Bodies, MACs and nonces: up to a few hundred arbitrary bytes.
pub fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..300)
}

/// A proto3 enum as carried by prost: usually a known value, sometimes any i32 (unknown
/// and negative values must survive a round trip too).
pub fn arb_enum(known_max: i32) -> impl Strategy<Value = i32> {
    prop_oneof![3 => 0..=known_max, 1 => any::<i32>()]
}

pub fn arb_ticket() -> impl Strategy<Value = Ticket> {
    (
        any::<u32>(),
        any::<u64>(),
        arb_string(),
        any::<u64>(),
        any::<u64>(),
        arb_bytes(),
    )
        .prop_map(
            |(key_id, user_id, server_id, epoch, expires_at_ms, mac)| Ticket {
                key_id,
                user_id,
                server_id,
                epoch,
                expires_at_ms,
                mac,
            },
        )
}

pub fn arb_send() -> impl Strategy<Value = Send> {
    (
        any::<u64>(),
        any::<u64>(),
        arb_string(),
        arb_bytes(),
        any::<u64>(),
        (any::<u64>(), any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(msg_id_hi, msg_id_lo, conv, body, sent_at_ms, (stream, seq, after))| Send {
                msg_id_hi,
                msg_id_lo,
                conv,
                body: body.into(),
                sent_at_ms,
                order_stream: stream,
                order_seq: seq,
                order_after: after,
            },
        )
}

pub fn arb_send_ack() -> impl Strategy<Value = SendAck> {
    (
        any::<u64>(),
        any::<u64>(),
        arb_string(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(msg_id_hi, msg_id_lo, conv, log_epoch, seq)| SendAck {
            msg_id_hi,
            msg_id_lo,
            conv,
            log_epoch,
            seq,
        })
}

pub fn arb_send_nack() -> impl Strategy<Value = SendNack> {
    (
        any::<u64>(),
        any::<u64>(),
        arb_enum(15),
        arb_string(),
        any::<bool>(),
    )
        .prop_map(|(msg_id_hi, msg_id_lo, code, reason, retryable)| SendNack {
            msg_id_hi,
            msg_id_lo,
            code,
            reason,
            retryable,
        })
}

pub fn arb_message() -> impl Strategy<Value = Message> {
    (
        arb_string(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        arb_bytes(),
        any::<u64>(),
    )
        .prop_map(
            |(conv, log_epoch, seq, sender, msg_id_hi, msg_id_lo, body, appended_at_ms)| Message {
                conv,
                log_epoch,
                seq,
                sender,
                msg_id_hi,
                msg_id_lo,
                body: body.into(),
                appended_at_ms,
            },
        )
}

pub fn arb_cursor() -> impl Strategy<Value = Cursor> {
    (arb_string(), any::<u64>(), any::<u64>()).prop_map(|(conv, log_epoch, seq)| Cursor {
        conv,
        log_epoch,
        seq,
    })
}

pub fn arb_conv_head() -> impl Strategy<Value = ConvHead> {
    (
        arb_string(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        (any::<u64>(), any::<u64>()),
    )
        .prop_map(
            |(conv, log_epoch, head_seq, first_available_seq, cursor_seq, carried)| ConvHead {
                conv,
                log_epoch,
                head_seq,
                first_available_seq,
                cursor_seq,
                carried_from_epoch: carried.0,
                carried_up_to: carried.1,
            },
        )
}

pub fn arb_push() -> impl Strategy<Value = Push> {
    (
        proptest::option::of(arb_message()),
        vec(any::<u64>(), 0..8),
        any::<bool>(),
    )
        .prop_map(|(message, recipients, all_sessions)| Push {
            message,
            recipients,
            all_sessions,
        })
}

/// Every `frame::Kind` variant, with equal weight, and arbitrary contents.
pub fn arb_kind() -> impl Strategy<Value = Kind> {
    let kinds: Vec<BoxedStrategy<Kind>> = vec![
        proptest::option::of(arb_ticket())
            .prop_map(|ticket| Kind::Login(Login { ticket }))
            .boxed(),
        any::<u64>()
            .prop_map(|nonce| Kind::Ping(Ping { nonce }))
            .boxed(),
        arb_send().prop_map(Kind::Send).boxed(),
        vec(arb_cursor(), 0..5)
            .prop_map(|cursors| Kind::DeliverAck(DeliverAck { cursors }))
            .boxed(),
        Just(Kind::SyncRequest(SyncRequest {})).boxed(),
        (arb_string(), any::<u64>(), any::<u64>(), any::<u32>())
            .prop_map(|(conv, log_epoch, after_seq, limit)| {
                Kind::FetchRequest(FetchRequest {
                    conv,
                    log_epoch,
                    after_seq,
                    limit,
                })
            })
            .boxed(),
        (any::<u64>(), any::<u64>(), arb_string(), any::<u64>())
            .prop_map(|(user_id, epoch, server_id, heartbeat_interval_ms)| {
                Kind::LoginOk(LoginOk {
                    user_id,
                    epoch,
                    server_id,
                    heartbeat_interval_ms,
                })
            })
            .boxed(),
        any::<u64>()
            .prop_map(|nonce| Kind::Pong(Pong { nonce }))
            .boxed(),
        arb_send_ack().prop_map(Kind::SendAck).boxed(),
        arb_send_nack().prop_map(Kind::SendNack).boxed(),
        proptest::option::of(arb_message())
            .prop_map(|message| Kind::Deliver(Deliver { message }))
            .boxed(),
        (vec(arb_conv_head(), 0..5), any::<bool>(), any::<bool>())
            .prop_map(|(heads, more, incomplete)| {
                Kind::SyncAnswer(SyncAnswer {
                    heads,
                    more,
                    incomplete,
                })
            })
            .boxed(),
        (
            proptest::option::of(arb_conv_head()),
            vec(arb_message(), 0..4),
        )
            .prop_map(|(head, messages)| Kind::FetchAnswer(FetchAnswer { head, messages }))
            .boxed(),
        (arb_enum(8), arb_string())
            .prop_map(|(reason, message)| Kind::Kick(Kick { reason, message }))
            .boxed(),
        (arb_enum(15), arb_string())
            .prop_map(|(code, message)| Kind::Error(Error { code, message }))
            .boxed(),
        (arb_string(), arb_bytes())
            .prop_map(|(server_id, nonce)| Kind::LinkHello(LinkHello { server_id, nonce }))
            .boxed(),
        (arb_string(), arb_bytes(), arb_bytes())
            .prop_map(|(route_id, mac, nonce)| {
                Kind::LinkAuth(LinkAuth {
                    route_id,
                    mac,
                    nonce,
                })
            })
            .boxed(),
        arb_bytes()
            .prop_map(|mac| Kind::LinkAuthOk(LinkAuthOk { mac }))
            .boxed(),
        vec(arb_push(), 0..4)
            .prop_map(|pushes| Kind::PushBatch(PushBatch { pushes }))
            .boxed(),
        (any::<u64>(), any::<u64>(), arb_enum(8))
            .prop_map(|(user_id, below_epoch, reason)| {
                Kind::KickUser(KickUser {
                    user_id,
                    below_epoch,
                    reason,
                })
            })
            .boxed(),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(arb_send()),
        )
            .prop_map(|(request_id, user_id, epoch, send)| {
                Kind::RouteSend(RouteSend {
                    request_id,
                    user_id,
                    epoch,
                    send,
                })
            })
            .boxed(),
        (
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(arb_send_ack()),
            proptest::option::of(arb_send_nack()),
        )
            .prop_map(|(request_id, user_id, ack, nack)| {
                Kind::RouteSendResult(RouteSendResult {
                    request_id,
                    user_id,
                    ack,
                    nack,
                })
            })
            .boxed(),
        (any::<u64>(), any::<u64>())
            .prop_map(|(user_id, below_epoch)| {
                Kind::KickUserDone(KickUserDone {
                    user_id,
                    below_epoch,
                })
            })
            .boxed(),
    ];
    assert_eq!(kinds.len(), KIND_COUNT, "one strategy per frame kind");
    Union::new(kinds)
}

pub fn arb_frame() -> impl Strategy<Value = Frame> {
    arb_kind().prop_map(|kind| Frame { kind: Some(kind) })
}

// ---------------------------------------------------------------------------------------
// Canonical frames: fixed, readable values, one per kind, in tag order.
// ---------------------------------------------------------------------------------------

fn message(seq: u64) -> Message {
    Message {
        conv: "g:rust".into(),
        log_epoch: 7,
        seq,
        sender: 42,
        msg_id_hi: 0x0123_4567_89ab_cdef,
        msg_id_lo: 0xfedc_ba98_7654_3210,
        body: b"hello".to_vec().into(),
        appended_at_ms: 1_700_000_000_000,
    }
}

fn send() -> Send {
    Send {
        msg_id_hi: 0x0123_4567_89ab_cdef,
        msg_id_lo: 0xfedc_ba98_7654_3210,
        conv: "p:1:42".into(),
        body: b"hi".to_vec().into(),
        sent_at_ms: 1_700_000_000_000,
        order_stream: 0x5eed_5eed_5eed_5eed,
        order_seq: 3,
        order_after: 2,
    }
}

fn send_ack() -> SendAck {
    SendAck {
        msg_id_hi: 0x0123_4567_89ab_cdef,
        msg_id_lo: 0xfedc_ba98_7654_3210,
        conv: "p:1:42".into(),
        log_epoch: 7,
        seq: 3,
    }
}

fn send_nack() -> SendNack {
    SendNack {
        msg_id_hi: 0x0123_4567_89ab_cdef,
        msg_id_lo: 0xfedc_ba98_7654_3210,
        code: ErrorCode::RateLimited as i32,
        reason: "slow down".into(),
        retryable: true,
    }
}

fn head() -> ConvHead {
    ConvHead {
        conv: "all".into(),
        log_epoch: 7,
        head_seq: 10,
        first_available_seq: 1,
        cursor_seq: 9,
        carried_from_epoch: 0,
        carried_up_to: 0,
    }
}

pub fn canonical_kinds() -> Vec<Kind> {
    vec![
        Kind::Login(Login {
            ticket: Some(Ticket {
                key_id: 1,
                user_id: 42,
                server_id: "s1".into(),
                epoch: 5,
                expires_at_ms: 1_700_000_060_000,
                mac: vec![0xaa; 4],
            }),
        }),
        Kind::Ping(Ping { nonce: 1 }),
        Kind::Send(send()),
        Kind::DeliverAck(DeliverAck {
            cursors: vec![
                Cursor {
                    conv: "all".into(),
                    log_epoch: 7,
                    seq: 10,
                },
                Cursor {
                    conv: "g:rust".into(),
                    log_epoch: 8,
                    seq: 2,
                },
            ],
        }),
        Kind::SyncRequest(SyncRequest {}),
        Kind::FetchRequest(FetchRequest {
            conv: "g:rust".into(),
            log_epoch: 7,
            after_seq: 2,
            limit: 50,
        }),
        Kind::LoginOk(LoginOk {
            user_id: 42,
            epoch: 5,
            server_id: "s1".into(),
            heartbeat_interval_ms: 30_000,
        }),
        Kind::Pong(Pong { nonce: 1 }),
        Kind::SendAck(send_ack()),
        Kind::SendNack(send_nack()),
        Kind::Deliver(Deliver {
            message: Some(message(3)),
        }),
        Kind::SyncAnswer(SyncAnswer {
            heads: vec![head()],
            more: false,
            incomplete: false,
        }),
        Kind::FetchAnswer(FetchAnswer {
            head: Some(head()),
            messages: vec![message(3), message(4)],
        }),
        Kind::Kick(Kick {
            reason: KickReason::TakenOver as i32,
            message: "logged in elsewhere".into(),
        }),
        Kind::Error(Error {
            code: ErrorCode::FrameTooLarge as i32,
            message: "frame of 70000 bytes exceeds the maximum of 65536".into(),
        }),
        Kind::LinkHello(LinkHello {
            server_id: "s1".into(),
            nonce: vec![0x11; 8],
        }),
        Kind::LinkAuth(LinkAuth {
            route_id: "r1".into(),
            mac: vec![0x22; 8],
            nonce: vec![0x33; 8],
        }),
        Kind::LinkAuthOk(LinkAuthOk { mac: vec![0x44; 8] }),
        Kind::PushBatch(PushBatch {
            pushes: vec![
                Push {
                    message: Some(message(4)),
                    recipients: vec![42, 43],
                    all_sessions: false,
                },
                Push {
                    message: Some(message(5)),
                    recipients: vec![],
                    all_sessions: true,
                },
            ],
        }),
        Kind::KickUser(KickUser {
            user_id: 42,
            below_epoch: 6,
            reason: KickReason::TakenOver as i32,
        }),
        Kind::RouteSend(RouteSend {
            request_id: 9,
            user_id: 42,
            epoch: 5,
            send: Some(send()),
        }),
        Kind::RouteSendResult(RouteSendResult {
            request_id: 9,
            user_id: 42,
            ack: Some(send_ack()),
            nack: None,
        }),
        Kind::KickUserDone(KickUserDone {
            user_id: 42,
            below_epoch: 6,
        }),
    ]
}

pub fn canonical_frames() -> Vec<Frame> {
    canonical_kinds()
        .into_iter()
        .map(|kind| Frame { kind: Some(kind) })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

pub fn encode(codec: &FrameCodec, frame: &Frame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    codec
        .encode(frame, &mut buf)
        .unwrap_or_else(|e| panic!("encoding {}: {e}", frame_name(frame)));
    buf.to_vec()
}

pub fn encode_all(codec: &FrameCodec, frames: &[Frame]) -> Vec<u8> {
    frames.iter().flat_map(|f| encode(codec, f)).collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The checks the fuzz target makes, for replaying inputs without a fuzzer: decoding never
/// panics, a decoded frame used no more bytes than it had and survives re-encoding.
/// Returns the frame it decoded, if any.
///
/// Re-encoding uses no limit: the canonical encoding can be longer than what was received
/// (an int32 enum sent as a 5-byte varint comes back as 10 bytes when negative), so a frame
/// accepted under `max_frame` need not be re-encodable under it.
pub fn check_decode(codec: &FrameCodec, data: &[u8]) -> Option<Frame> {
    match codec.decode(data) {
        Ok(Decoded::Frame { frame, consumed }) => {
            assert!(
                consumed <= data.len(),
                "consumed {consumed} of {}",
                data.len()
            );
            assert!(frame.kind.is_some(), "decoder returned an empty frame");
            let unlimited = FrameCodec::new(usize::MAX);
            let again = encode(&unlimited, &frame);
            match unlimited.decode(&again) {
                Ok(Decoded::Frame {
                    frame: back,
                    consumed,
                }) => {
                    assert_eq!(back, frame, "re-encoded frame decodes differently");
                    assert_eq!(consumed, again.len());
                }
                other => panic!("re-encoded frame does not decode: {other:?}"),
            }
            Some(frame)
        }
        Ok(Decoded::NeedMore) | Err(_) => None,
    }
}
