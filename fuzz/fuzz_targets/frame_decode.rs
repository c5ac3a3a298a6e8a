//! Arbitrary bytes into the frame decoder. The check, its invariants and its
//! documentation live in `cim_fuzz_checks::frame_decode` (testkit/fuzz-checks), which
//! `cargo test -p cim-fuzz-checks` also runs on the committed corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cim_fuzz_checks::frame_decode::check(data);
});
