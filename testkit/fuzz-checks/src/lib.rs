//! The bodies of the cargo-fuzz targets in `fuzz/`, in the workspace so that one function
//! serves both: `fuzz/fuzz_targets/<name>.rs` calls `<name>::check` on what libFuzzer
//! generates, and `tests/corpus.rs` calls it on every committed seed in
//! `fuzz/corpus/<name>/`. A check panics when an invariant breaks, and returns the names of
//! the behaviours the input reached, so the replay test can insist that the corpus as a
//! whole still reaches the deep states (a logged-in session, an acknowledged send, ...).
//!
//! The structured targets read their input with [`arbitrary`]: the bytes become a sequence
//! of small operations (enums of this crate, never core types, so the core can change
//! without breaking the corpus format more than necessary), which a harness feeds to a
//! machine with explicit time while a model beside it checks every output.

use cim_core::time::Instant;
use std::collections::BTreeSet;

pub mod frame_decode;
pub mod http_bodies;
pub mod http_route;
pub mod route_link;
pub mod server_session;
pub mod state_file;
pub mod tokens;

/// Names of the behaviours one input reached.
pub type Reached = BTreeSet<&'static str>;

/// One fuzz target: its name (also its corpus folder and cargo-fuzz binary), its check, and
/// the behaviours its committed corpus must reach between all seeds.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub name: &'static str,
    pub check: fn(&[u8]) -> Reached,
    pub features: &'static [&'static str],
}

/// Every target, in the order `.ci/run` smokes them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "frame_decode",
        check: frame_decode::check,
        features: frame_decode::FEATURES,
    },
    Target {
        name: "server_session",
        check: server_session::check,
        features: server_session::FEATURES,
    },
    Target {
        name: "route_link",
        check: route_link::check,
        features: route_link::FEATURES,
    },
    Target {
        name: "tokens",
        check: tokens::check,
        features: tokens::FEATURES,
    },
    Target {
        name: "http_bodies",
        check: http_bodies::check,
        features: http_bodies::FEATURES,
    },
    Target {
        name: "http_route",
        check: http_route::check,
        features: http_route::FEATURES,
    },
    Target {
        name: "state_file",
        check: state_file::check,
        features: state_file::FEATURES,
    },
];

/// The time origin of one input. The machines only ever see it plus explicit offsets, so a
/// run does not depend on when it happens.
pub(crate) fn origin() -> Instant {
    Instant::from_nanos(0)
}
