//! Hostile and broken input: oversized prefixes are refused before anything is buffered,
//! bad varints and bad bodies are typed errors, and "incomplete" is never confused with
//! "invalid".

mod common;

use bytes::BytesMut;
use cim_proto::ErrorCode;
use cim_proto::codec::{DEFAULT_MAX_FRAME, DecodeError, Decoded, EncodeError, FrameCodec};

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn too_large(len: u64) -> Result<Decoded, DecodeError> {
    Err(DecodeError::FrameTooLarge {
        len,
        max: DEFAULT_MAX_FRAME,
    })
}

/// Input -> outcome, with the default 64 KiB limit.
#[test]
fn prefix_table() {
    let max = DEFAULT_MAX_FRAME as u64;
    let mut nine_ff_then_2 = vec![0xff; 9];
    nine_ff_then_2.push(0x02);
    let mut padded_zero = vec![0x80; 9];
    padded_zero.push(0x00);

    let cases: Vec<(&str, Vec<u8>, Result<Decoded, DecodeError>)> = vec![
        ("nothing yet", vec![], Ok(Decoded::NeedMore)),
        ("one continuation byte", vec![0x80], Ok(Decoded::NeedMore)),
        (
            "nine continuation bytes",
            vec![0x80; 9],
            Ok(Decoded::NeedMore),
        ),
        (
            "ten continuation bytes: no u64 needs an 11th",
            vec![0x80; 10],
            Err(DecodeError::BadLengthPrefix),
        ),
        (
            "eleven continuation bytes",
            vec![0x80; 11],
            Err(DecodeError::BadLengthPrefix),
        ),
        (
            "tenth byte overflows u64",
            nine_ff_then_2,
            Err(DecodeError::BadLengthPrefix),
        ),
        (
            "u64::MAX in ten bytes",
            varint(u64::MAX),
            too_large(u64::MAX),
        ),
        ("2^40 with no body", varint(1 << 40), too_large(1 << 40)),
        ("max + 1 with no body", varint(max + 1), too_large(max + 1)),
        ("max with no body yet", varint(max), Ok(Decoded::NeedMore)),
        ("zero length", vec![0x00], Err(DecodeError::EmptyFrame)),
        (
            "zero length, padded to ten bytes",
            padded_zero,
            Err(DecodeError::EmptyFrame),
        ),
        (
            "3-byte body, 2 present",
            vec![0x03, 0x10, 0x01],
            Ok(Decoded::NeedMore),
        ),
    ];
    let codec = FrameCodec::default();
    for (name, input, expected) in cases {
        assert_eq!(codec.decode(&input), expected, "{name}: {input:02x?}");
    }
}

/// The declared length alone decides: the decoder neither waits for nor reserves room for
/// a body it is going to refuse.
#[test]
fn oversized_prefix_is_refused_without_reserving() {
    let codec = FrameCodec::default();
    let mut buf = BytesMut::with_capacity(16);
    buf.extend_from_slice(&varint(1 << 40));
    let (len, cap) = (buf.len(), buf.capacity());
    assert_eq!(
        codec.decode_buf(&mut buf),
        Err(DecodeError::FrameTooLarge {
            len: 1 << 40,
            max: DEFAULT_MAX_FRAME
        })
    );
    assert_eq!((buf.len(), buf.capacity()), (len, cap), "buffer untouched");
}

/// Once the prefix is known and allowed, `decode_buf` reserves the whole record once.
#[test]
fn accepted_prefix_reserves_the_record() {
    let codec = FrameCodec::new(1000);
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&varint(1000));
    assert_eq!(codec.decode_buf(&mut buf), Ok(None));
    assert!(buf.capacity() >= 2 + 1000, "capacity {}", buf.capacity());
    assert_eq!(buf.len(), 2, "nothing consumed");

    let mut partial = BytesMut::new();
    partial.extend_from_slice(&[0x80]);
    assert_eq!(codec.decode_buf(&mut partial), Ok(None));
    assert_eq!(&partial[..], &[0x80]);
}

#[test]
fn small_limit_applies_to_the_body() {
    let codec = FrameCodec::new(3);
    assert_eq!(codec.decode(&[0x03]), Ok(Decoded::NeedMore));
    assert_eq!(
        codec.decode(&[0x04]),
        Err(DecodeError::FrameTooLarge { len: 4, max: 3 })
    );
    // Ping { nonce: 1 } is 4 bytes of body: 0x12 0x02 0x08 0x01.
    assert_eq!(
        codec.decode(&[0x04, 0x12, 0x02, 0x08, 0x01]),
        Err(DecodeError::FrameTooLarge { len: 4, max: 3 })
    );
    assert!(matches!(
        FrameCodec::new(4).decode(&[0x04, 0x12, 0x02, 0x08, 0x01]),
        Ok(Decoded::Frame { consumed: 5, .. })
    ));
}

#[test]
fn zero_limit_refuses_every_nonempty_length() {
    let codec = FrameCodec::new(0);
    assert_eq!(codec.decode(&[0x00]), Err(DecodeError::EmptyFrame));
    assert_eq!(
        codec.decode(&[0x01]),
        Err(DecodeError::FrameTooLarge { len: 1, max: 0 })
    );
}

#[test]
fn unknown_fields_only_is_an_empty_frame() {
    // Field 31, varint 0: a kind from a future version this build does not know.
    let codec = FrameCodec::default();
    assert_eq!(
        codec.decode(&[0x03, 0xf8, 0x01, 0x00]),
        Err(DecodeError::EmptyFrame)
    );
}

#[test]
fn broken_bodies_are_malformed_with_prost_text() {
    let codec = FrameCodec::default();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Login (field 1) claims 5 bytes, the record holds none.
        ("truncated submessage", vec![0x02, 0x0a, 0x05]),
        // Field 1 with wire type 7, which does not exist.
        ("invalid wire type", vec![0x01, 0x0f]),
        // Kick (field 17) whose message string is the byte 0xff.
        (
            "invalid utf-8",
            vec![0x06, 0x8a, 0x01, 0x03, 0x12, 0x01, 0xff],
        ),
        // Ping whose nonce varint runs to the end of the record.
        ("truncated varint in body", vec![0x03, 0x12, 0x01, 0x08]),
    ];
    for (name, input) in cases {
        let err = match codec.decode(&input) {
            Err(err @ DecodeError::Malformed(_)) => err,
            other => panic!("{name}: expected Malformed, got {other:?}"),
        };
        let text = err.to_string();
        assert!(
            text.starts_with("malformed frame: ") && text.len() > "malformed frame: ".len() + 5,
            "{name}: {text}"
        );
        assert_eq!(err.code(), ErrorCode::MalformedFrame, "{name}");
    }
}

#[test]
fn bytes_after_a_record_are_not_consumed() {
    let codec = FrameCodec::default();
    // Ping { nonce: 1 } then garbage that starts an invalid prefix.
    let input = [0x04, 0x12, 0x02, 0x08, 0x01, 0xff, 0xff];
    let Ok(Decoded::Frame { consumed, .. }) = codec.decode(&input) else {
        panic!("expected a frame");
    };
    assert_eq!(consumed, 5);

    let mut buf = BytesMut::from(&input[..]);
    assert!(codec.decode_buf(&mut buf).unwrap().is_some());
    assert_eq!(&buf[..], &[0xff, 0xff]);
    assert_eq!(codec.decode_buf(&mut buf), Ok(None));
}

#[test]
fn error_codes() {
    let cases = [
        (DecodeError::BadLengthPrefix, ErrorCode::MalformedFrame),
        (DecodeError::EmptyFrame, ErrorCode::MalformedFrame),
        (
            DecodeError::FrameTooLarge { len: 9, max: 8 },
            ErrorCode::FrameTooLarge,
        ),
    ];
    for (err, code) in cases {
        assert_eq!(err.code(), code, "{err}");
    }
    assert_eq!(
        EncodeError::FrameTooLarge { len: 9, max: 8 }.code(),
        ErrorCode::FrameTooLarge
    );
    assert_eq!(EncodeError::EmptyFrame.code(), ErrorCode::MalformedFrame);
    assert_eq!(
        DecodeError::FrameTooLarge {
            len: 70_000,
            max: 65_536
        }
        .to_string(),
        "frame of 70000 bytes exceeds the maximum of 65536"
    );
}

/// Even a codec with no practical limit answers a huge prefix without panicking: the
/// record size does not fit in a usize, so there is nothing sensible to reserve.
#[test]
fn unlimited_codec_survives_a_u64_max_prefix() {
    let codec = FrameCodec::new(usize::MAX);
    let mut buf = BytesMut::from(&varint(u64::MAX)[..]);
    assert_eq!(codec.decode_buf(&mut buf), Ok(None));
    assert_eq!(buf.len(), 10, "nothing consumed");
}

/// Both directions reserve room for one record, not a multiple of it: `max_frame` bounds
/// what a peer can make us allocate.
#[test]
fn reservations_fit_the_record() {
    let codec = FrameCodec::default();
    let frame = cim_proto::Frame {
        kind: Some(cim_proto::frame::Kind::LinkAuthOk(cim_proto::LinkAuthOk {
            mac: vec![0x44; 20_000],
        })),
    };
    let mut dst = BytesMut::new();
    codec.encode(&frame, &mut dst).unwrap();
    assert!(
        dst.capacity() < 2 * dst.len(),
        "capacity {} for {}",
        dst.capacity(),
        dst.len()
    );

    // A 3-byte prefix declaring 20_000 bytes: room for 20_003, not for 3 × 20_000.
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&varint(20_000));
    assert_eq!(buf.len(), 3);
    assert_eq!(codec.decode_buf(&mut buf), Ok(None));
    assert!(
        (20_003..40_000).contains(&buf.capacity()),
        "capacity {}",
        buf.capacity()
    );
}
