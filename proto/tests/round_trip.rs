//! Every frame the encoder writes decodes back to itself, using exactly the bytes written.

mod common;

use std::collections::BTreeSet;

use bytes::BytesMut;
use cim_proto::Frame;
use cim_proto::codec::{DEFAULT_MAX_FRAME, Decoded, EncodeError, FrameCodec};
use common::{KIND_COUNT, arb_frame, encode, frame_name};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRng, TestRunner};

proptest! {
    #[test]
    fn encode_then_decode_is_identity(frame in arb_frame()) {
        let codec = FrameCodec::default();
        let bytes = encode(&codec, &frame);
        prop_assert_eq!(
            codec.decode(&bytes),
            Ok(Decoded::Frame { frame, consumed: bytes.len() })
        );
    }

    /// Every strict prefix of a record is "need more", never an error or a frame: a shell
    /// that reads byte by byte must never close a healthy connection.
    #[test]
    fn every_strict_prefix_needs_more(frame in arb_frame()) {
        let codec = FrameCodec::default();
        let bytes = encode(&codec, &frame);
        for end in 0..bytes.len() {
            prop_assert_eq!(codec.decode(&bytes[..end]), Ok(Decoded::NeedMore), "prefix {}", end);
        }
    }

    /// The limit is on the body, inclusive, and the encoder and decoder agree on it.
    #[test]
    fn limit_is_exact_and_shared(frame in arb_frame()) {
        let body_len = prost::Message::encoded_len(&frame);

        let exact = FrameCodec::new(body_len);
        let bytes = encode(&exact, &frame);
        prop_assert_eq!(bytes.len(), prost::length_delimiter_len(body_len) + body_len);
        let decoded = exact.decode(&bytes);
        prop_assert!(matches!(decoded, Ok(Decoded::Frame { .. })), "{:?}", decoded);

        if body_len > 0 {
            let tight = FrameCodec::new(body_len - 1);
            let mut dst = BytesMut::from(&b"keep"[..]);
            prop_assert_eq!(
                tight.encode(&frame, &mut dst),
                Err(EncodeError::FrameTooLarge { len: body_len, max: body_len - 1 })
            );
            prop_assert_eq!(&dst[..], b"keep", "a refused frame writes nothing");
            prop_assert!(tight.decode(&bytes).is_err());
        }
    }
}

#[test]
fn encode_appends_after_existing_bytes() {
    let codec = FrameCodec::default();
    let frame = common::canonical_frames().remove(1);
    let mut dst = BytesMut::from(&b"xy"[..]);
    codec.encode(&frame, &mut dst).unwrap();
    assert_eq!(&dst[..2], b"xy");
    assert_eq!(&dst[2..], &encode(&codec, &frame)[..]);
}

#[test]
fn empty_frame_is_not_encoded() {
    let codec = FrameCodec::default();
    let mut dst = BytesMut::new();
    assert_eq!(
        codec.encode(&Frame { kind: None }, &mut dst),
        Err(EncodeError::EmptyFrame)
    );
    assert!(dst.is_empty());
}

#[test]
fn default_codec_uses_64_kib() {
    assert_eq!(DEFAULT_MAX_FRAME, 65_536);
    assert_eq!(FrameCodec::default().max_frame(), DEFAULT_MAX_FRAME);
    assert_eq!(FrameCodec::new(10).max_frame(), 10);
}

/// The round-trip properties are only as good as the strategy: it must reach every kind.
#[test]
fn strategy_generates_every_kind() {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let strategy = arb_frame();
    let mut seen = BTreeSet::new();
    for _ in 0..2_000 {
        let frame = strategy.new_tree(&mut runner).unwrap().current();
        seen.insert(frame_name(&frame));
    }
    assert_eq!(seen.len(), KIND_COUNT, "kinds seen: {seen:?}");
}
