//! Arbitrary bytes into the frame decoder. Replayed without a fuzzer by
//! `proto/tests/fuzz_corpus.rs`, which makes the same checks.
#![no_main]

use bytes::BytesMut;
use cim_proto::codec::{Decoded, FrameCodec};
use libfuzzer_sys::fuzz_target;

/// Small enough that the fuzzer hits the size check constantly.
const SMALL_MAX_FRAME: usize = 32;

fuzz_target!(|data: &[u8]| {
    for codec in [FrameCodec::default(), FrameCodec::new(SMALL_MAX_FRAME)] {
        let Ok(Decoded::Frame { frame, consumed }) = codec.decode(data) else {
            continue;
        };
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
});
