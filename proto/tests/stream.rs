//! A stream of several records, however TCP happens to cut it, decodes to the same frames
//! in the same order.

mod common;

use bytes::BytesMut;
use cim_proto::Frame;
use cim_proto::codec::FrameCodec;
use common::{arb_frame, canonical_frames, encode_all};
use proptest::prelude::*;

/// Feeds `chunks` one at a time into a growing buffer, decoding all it can after each,
/// as a shell's read loop would.
fn decode_chunks(codec: &FrameCodec, chunks: &[&[u8]]) -> (Vec<Frame>, BytesMut) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let Some(frame) = codec
            .decode_buf(&mut buf)
            .unwrap_or_else(|e| panic!("valid stream rejected: {e}"))
        {
            frames.push(frame);
        }
    }
    (frames, buf)
}

/// Cuts `bytes` at the given (unsorted, possibly repeated or out-of-range) points.
fn cut<'a>(bytes: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = points.iter().map(|p| p % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for p in points.into_iter().chain([bytes.len()]) {
        chunks.push(&bytes[start..p]);
        start = p;
    }
    chunks
}

#[test]
fn split_at_every_byte_boundary() {
    let codec = FrameCodec::default();
    let frames = canonical_frames();
    let bytes = encode_all(&codec, &frames);
    for split in 0..=bytes.len() {
        let (decoded, rest) = decode_chunks(&codec, &[&bytes[..split], &bytes[split..]]);
        assert_eq!(decoded, frames, "split at {split}");
        assert!(
            rest.is_empty(),
            "split at {split} left {} bytes",
            rest.len()
        );
    }
}

#[test]
fn one_byte_at_a_time() {
    let codec = FrameCodec::default();
    let frames = canonical_frames();
    let bytes = encode_all(&codec, &frames);
    let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
    let (decoded, rest) = decode_chunks(&codec, &chunks);
    assert_eq!(decoded, frames);
    assert!(rest.is_empty());
}

/// Slices work as well as `BytesMut`: walking `consumed` through one buffer.
#[test]
fn slice_decoding_walks_the_stream() {
    let codec = FrameCodec::default();
    let frames = canonical_frames();
    let bytes = encode_all(&codec, &frames);
    let mut at = 0;
    let mut decoded = Vec::new();
    while at < bytes.len() {
        match codec.decode(&bytes[at..]).unwrap() {
            cim_proto::codec::Decoded::Frame { frame, consumed } => {
                decoded.push(frame);
                at += consumed;
            }
            cim_proto::codec::Decoded::NeedMore => panic!("stuck at {at}"),
        }
    }
    assert_eq!(at, bytes.len());
    assert_eq!(decoded, frames);
}

proptest! {
    #[test]
    fn random_chunkings_of_random_frames(
        frames in proptest::collection::vec(arb_frame(), 1..8),
        points in proptest::collection::vec(any::<usize>(), 0..16),
    ) {
        let codec = FrameCodec::default();
        let bytes = encode_all(&codec, &frames);
        let chunks = cut(&bytes, &points);
        let (decoded, rest) = decode_chunks(&codec, &chunks);
        prop_assert_eq!(decoded, frames);
        prop_assert!(rest.is_empty());
    }
}
