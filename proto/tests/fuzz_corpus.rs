//! Replays the committed fuzz seed corpus through the decoder, so CI checks it without a
//! fuzzer, and (ignored) writes that corpus.
//!
//! Files named `valid-<kind>` must decode to a frame of that kind; every other file only
//! has to be handled without a panic (locally, `cargo fuzz run` adds its finds here too).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use cim_proto::codec::FrameCodec;
use common::{KIND_COUNT, canonical_frames, check_decode, encode, frame_name};

/// The same two limits as `fuzz/fuzz_targets/frame_decode.rs`.
const SMALL_MAX_FRAME: usize = 32;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/frame_decode")
}

#[test]
fn replay_seed_corpus() {
    let dir = corpus_dir();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());

    let codecs = [FrameCodec::default(), FrameCodec::new(SMALL_MAX_FRAME)];
    let mut valid_kinds = BTreeSet::new();
    let mut invalid = 0;
    for path in &files {
        let data = fs::read(path).expect("readable corpus file");
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let decoded = check_decode(&codecs[0], &data);
        check_decode(&codecs[1], &data);
        match name.strip_prefix("valid-") {
            Some(kind) => {
                let frame = decoded.unwrap_or_else(|| panic!("{name} does not decode"));
                assert_eq!(frame_name(&frame), kind, "{name}");
                valid_kinds.insert(kind.to_owned());
            }
            None => invalid += usize::from(decoded.is_none()),
        }
    }
    assert_eq!(
        valid_kinds.len(),
        KIND_COUNT,
        "valid seeds: {valid_kinds:?}"
    );
    assert!(invalid >= 5, "only {invalid} seeds exercise error paths");
}

/// Writes the seed corpus. Run once after changing cim.proto or the seeds:
/// `cargo test -p cim-proto --test fuzz_corpus -- --ignored write_seed_corpus`
#[test]
#[ignore = "writes files into fuzz/corpus; run by hand"]
fn write_seed_corpus() {
    let codec = FrameCodec::default();
    let dir = corpus_dir();
    fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, bytes: &[u8]| fs::write(dir.join(name), bytes).unwrap();

    let frames = canonical_frames();
    for frame in &frames {
        write(
            &format!("valid-{}", frame_name(frame)),
            &encode(&codec, frame),
        );
    }

    let fetch_answer = encode(&codec, &frames[12]);
    write("truncated", &fetch_answer[..fetch_answer.len() - 3]);
    // Varint 2^40, then a few body bytes that must never be waited for.
    write(
        "oversized-prefix",
        &[0x80, 0x80, 0x80, 0x80, 0x80, 0x20, 0x12, 0x02],
    );
    write("overlong-varint", &[0x80; 11]);
    write("empty-frame", &[0x00]);
    write("unknown-field-only", &[0x03, 0xf8, 0x01, 0x00]);
    write("invalid-utf8", &[0x06, 0x8a, 0x01, 0x03, 0x12, 0x01, 0xff]);
    // Kick { reason: -1 } with the enum as a 5-byte varint: valid, but its canonical
    // re-encoding is 5 bytes longer than what was received.
    write(
        "short-negative-enum",
        &[0x09, 0x8a, 0x01, 0x06, 0x08, 0xff, 0xff, 0xff, 0xff, 0x0f],
    );
    let mut two = encode(&codec, &frames[1]);
    two.extend(encode(&codec, &frames[7]));
    write("two-frames", &two);
    // Deterministic garbage (an LCG), starting with a plausible length.
    let mut x: u32 = 0x2545_f491;
    let garbage: Vec<u8> = std::iter::once(0x20)
        .chain((0..40).map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        }))
        .collect();
    write("garbage", &garbage);
}
