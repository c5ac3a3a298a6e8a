//! Replays every committed fuzz seed through the same check its fuzz target runs, so CI
//! checks the corpus without a fuzzer, and insists that each target's corpus still reaches
//! the behaviours the target lists (a harness change that stopped logging anyone in would
//! make every structured seed shallow). Also runs a few hundred deterministic pseudo-random
//! inputs per target, and (ignored) writes the seeds of the structured targets.

use std::fs;
use std::path::{Path, PathBuf};

use cim_fuzz_checks::{Reached, TARGETS, Target};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../fuzz/corpus/{target}"))
}

/// The committed seeds: readable names only (`cargo fuzz run` adds finds under 40-hex-digit
/// names, which git ignores and CI never sees).
fn seeds(target: &str) -> Vec<PathBuf> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| !is_fuzzer_find(path))
        .collect();
    files.sort();
    files
}

fn is_fuzzer_find(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.len() == 40 && n.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[test]
fn replay_every_corpus() {
    for target in TARGETS {
        let files = seeds(target.name);
        assert!(!files.is_empty(), "no seeds for {}", target.name);
        let mut reached = Reached::new();
        for path in &files {
            let data = fs::read(path).expect("readable seed");
            let got = std::panic::catch_unwind(|| (target.check)(&data)).unwrap_or_else(|_| {
                panic!(
                    "{} seed {} breaks an invariant",
                    target.name,
                    path.display()
                )
            });
            reached.extend(got);
        }
        let missing: Vec<&&str> = target
            .features
            .iter()
            .filter(|f| !reached.contains(*f))
            .collect();
        assert!(
            missing.is_empty(),
            "the {} corpus no longer reaches {missing:?} (reached {reached:?})",
            target.name
        );
    }
}

/// A small deterministic generator (an LCG), so these inputs are the same on every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn bytes(&mut self, max_len: u64) -> Vec<u8> {
        let len = self.next() % max_len;
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn pseudo_random_inputs_keep_every_invariant() {
    for target in TARGETS {
        let mut lcg = Lcg(0x5eed ^ target.name.len() as u64);
        for i in 0..300 {
            let data = lcg.bytes(2048);
            let result = std::panic::catch_unwind(|| (target.check)(&data));
            assert!(
                result.is_ok(),
                "{} breaks on pseudo-random input {i} ({} bytes)",
                target.name,
                data.len()
            );
        }
    }
}

/// Searches pseudo-random inputs of each structured target for one per listed behaviour and
/// writes it as `fuzz/corpus/<target>/<behaviour>`. Run after changing a harness's input
/// format: `cargo test -p cim-fuzz-checks --test corpus -- --ignored write_structured_seeds`
#[test]
#[ignore = "writes files into fuzz/corpus; run by hand"]
fn write_structured_seeds() {
    for target in TARGETS.iter().filter(|t| is_structured(t)) {
        let dir = corpus_dir(target.name);
        fs::create_dir_all(&dir).unwrap();
        let mut lcg = Lcg(0xC1A0 ^ target.name.len() as u64);
        let mut missing: Vec<&str> = target.features.to_vec();
        // What a local `cargo fuzz run` found first (smallest first), then pseudo-random.
        let mut finds: Vec<Vec<u8>> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| is_fuzzer_find(p))
            .map(|p| fs::read(p).unwrap())
            .collect();
        finds.sort_by_key(Vec::len);
        let mut finds = finds.into_iter();
        for _ in 0..50_000 {
            if missing.is_empty() {
                break;
            }
            let data = finds.next().unwrap_or_else(|| lcg.bytes(1024));
            let reached = (target.check)(&data);
            if let Some(i) = missing.iter().position(|f| reached.contains(f)) {
                fs::write(dir.join(missing[i]), &data).unwrap();
                missing.remove(i);
            }
        }
        if !missing.is_empty() {
            // Fuzz the target for a while (its finds are read first), then run this again.
            println!("{}: no input reached {missing:?}", target.name);
        }
    }
}

/// The targets whose inputs are operation sequences read with `arbitrary` (their seeds are
/// found by search); the others take text or frames and have hand-written seeds.
fn is_structured(target: &Target) -> bool {
    matches!(
        target.name,
        "server_session" | "route_link" | "tokens" | "http_route"
    )
}
