//! Whatever a peer sends, the decoder answers without panicking, and its answers are
//! consistent: a frame survives re-encoding, and more bytes never change a decided answer.

mod common;

use cim_proto::codec::{Decoded, FrameCodec};
use common::{arb_frame, check_decode, encode};
use proptest::collection::vec;
use proptest::prelude::*;

/// Raw garbage, and garbage behind a small valid-looking prefix so bodies get exercised.
fn arb_input() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..300),
        (0u8..0x80, vec(any::<u8>(), 0..200)).prop_map(|(len, mut rest)| {
            rest.insert(0, len);
            rest
        }),
        // A valid record with some bytes flipped.
        (arb_frame(), vec((any::<usize>(), any::<u8>()), 1..4)).prop_map(|(frame, flips)| {
            let mut bytes = encode(&FrameCodec::default(), &frame);
            for (at, xor) in flips {
                let at = at % bytes.len();
                bytes[at] ^= xor;
            }
            bytes
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        // PROPTEST_CASES still wins, for a long run.
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(1024)
    ))]

    #[test]
    fn arbitrary_bytes_decode_consistently(
        data in arb_input(),
        extra in vec(any::<u8>(), 0..8),
        small in 0usize..64,
    ) {
        for codec in [FrameCodec::default(), FrameCodec::new(small)] {
            let first = codec.decode(&data);
            check_decode(&codec, &data);

            // A decided answer (frame or error) does not depend on what follows it.
            if first != Ok(Decoded::NeedMore) {
                let mut longer = data.clone();
                longer.extend_from_slice(&extra);
                prop_assert_eq!(codec.decode(&longer), first.clone());
            }

            // Fewer bytes than a frame used is always "need more", never an error.
            if let Ok(Decoded::Frame { consumed, .. }) = &first {
                for end in 0..*consumed {
                    prop_assert_eq!(codec.decode(&data[..end]), Ok(Decoded::NeedMore));
                }
                prop_assert_eq!(codec.decode(&data[..*consumed]), first.clone());
            }
        }
    }
}
