//! Arbitrary bytes into the frame decoder, as a client or a link peer sends them.
//!
//! Invariants: no panic; a decoded frame has a kind, consumed no more than it was given,
//! re-encodes to bytes that decode to the same frame, and decoding through a `BytesMut` as
//! the shell does gives the same frame and leaves the rest. (`proto/tests/fuzz_corpus.rs`
//! also replays this corpus and checks that every `valid-<kind>` seed decodes to its kind.)

use bytes::BytesMut;
use cim_proto::codec::{DecodeError, Decoded, FrameCodec};

use crate::Reached;

/// Small enough that the fuzzer hits the size check constantly.
const SMALL_MAX_FRAME: usize = 32;

pub const FEATURES: &[&str] = &["frame", "need_more", "too_long", "malformed"];

pub fn check(data: &[u8]) -> Reached {
    let mut reached = Reached::new();
    for codec in [FrameCodec::default(), FrameCodec::new(SMALL_MAX_FRAME)] {
        let (frame, consumed) = match codec.decode(data) {
            Ok(Decoded::Frame { frame, consumed }) => (frame, consumed),
            Ok(Decoded::NeedMore) => {
                reached.insert("need_more");
                continue;
            }
            Err(DecodeError::FrameTooLarge { .. }) => {
                reached.insert("too_long");
                continue;
            }
            Err(_) => {
                reached.insert("malformed");
                continue;
            }
        };
        reached.insert("frame");
        assert!(consumed <= data.len());
        assert!(frame.kind.is_some());

        // The canonical encoding may be longer than what arrived (a negative enum sent as
        // a 5-byte varint comes back as 10 bytes), so re-encode without a limit.
        let unlimited = FrameCodec::new(usize::MAX);
        let mut again = BytesMut::new();
        unlimited
            .encode(&frame, &mut again)
            .expect("a decoded frame encodes");
        match unlimited.decode(&again) {
            Ok(Decoded::Frame {
                frame: back,
                consumed,
            }) => {
                assert_eq!(back, frame);
                assert_eq!(consumed, again.len());
            }
            other => panic!("re-encoded frame does not decode: {other:?}"),
        }

        // The same bytes fed through a BytesMut, as a shell would, give the same frame.
        let mut buf = BytesMut::from(data);
        assert_eq!(codec.decode_buf(&mut buf), Ok(Some(frame)));
        assert_eq!(buf.len(), data.len() - consumed);
    }
    reached
}
