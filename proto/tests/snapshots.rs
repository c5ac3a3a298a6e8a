//! Pins the wire bytes of one canonical frame per kind. A diff here means the encoding
//! changed: old peers and stored data may no longer read it, so it must be deliberate.

mod common;

use cim_proto::codec::FrameCodec;
use common::{KIND_COUNT, canonical_frames, encode, frame_name, hex};

#[test]
fn canonical_frame_bytes() {
    let codec = FrameCodec::default();
    let frames = canonical_frames();
    assert_eq!(frames.len(), KIND_COUNT, "one canonical frame per kind");

    let mut lines = Vec::new();
    for frame in &frames {
        let bytes = encode(&codec, frame);
        let body_len = prost::Message::encoded_len(frame);
        let (prefix, body) = bytes.split_at(bytes.len() - body_len);
        lines.push(format!(
            "{:<17} {} {}",
            frame_name(frame),
            hex(prefix),
            hex(body)
        ));
    }
    insta::assert_snapshot!(lines.join("\n"));
}
