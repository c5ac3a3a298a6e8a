//! Canaries: switches that each disable one safety mechanism, so the simulation can prove
//! that its checker notices when that mechanism is missing. A checker that never fires
//! proves nothing.
//!
//! They exist only in a build made with `CIM_CANARIES=1` (the build script then sets
//! `--cfg cim_canaries`); in every other build [`disabled`] is a constant `false` that the
//! compiler folds away, and [`set`] refuses. The simulation runs one seed per process, so
//! one process-wide switch is enough: a canary applies to every machine of the run.

use std::fmt;

/// A safety mechanism a canary can switch off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Canary {
    /// The conversation log's `(sender, msg id)` records: a retried send is appended again.
    IdempotentAppend,
    /// The claim table's compare-epoch checks (`ReplaceClaim`, `BindSession`,
    /// `RefreshLeases`): any operation on a user's live claim succeeds, whatever its epoch
    /// and server.
    EpochFencing,
    /// A server's self-fencing: it keeps its sessions after losing its registry session or
    /// the store, and past the end of their proven lease.
    SelfFencing,
    /// The client's gap sync: when a gap's timer fires it hands over what it buffered,
    /// skipping the missing seqs, instead of fetching them.
    GapSync,
    /// The client's dedup: a message already handed over is handed over again.
    Dedup,
    /// The conversation log's per-sender order check (`SendOrder`): a message is appended
    /// whatever its stream's previous message to the conversation did.
    SendOrder,
}

impl Canary {
    pub const ALL: [Canary; 6] = [
        Canary::IdempotentAppend,
        Canary::EpochFencing,
        Canary::SelfFencing,
        Canary::GapSync,
        Canary::Dedup,
        Canary::SendOrder,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::IdempotentAppend => "idempotent-append",
            Self::EpochFencing => "epoch-fencing",
            Self::SelfFencing => "self-fencing",
            Self::GapSync => "gap-sync",
            Self::Dedup => "dedup",
            Self::SendOrder => "send-order",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Canary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether this build has the canaries compiled in.
pub const COMPILED: bool = cfg!(cim_canaries);

/// The build has no canaries (it was not made with `CIM_CANARIES=1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("this build has no canaries: build it with CIM_CANARIES=1")]
pub struct NotCompiled;

#[cfg(cim_canaries)]
static ACTIVE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

#[cfg(cim_canaries)]
fn code(canary: Option<Canary>) -> u8 {
    canary.map_or(0, |c| c as u8 + 1)
}

/// Switches `canary` on for the whole process (`None`: every mechanism on again).
pub fn set(canary: Option<Canary>) -> Result<(), NotCompiled> {
    #[cfg(cim_canaries)]
    {
        ACTIVE.store(code(canary), std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
    #[cfg(not(cim_canaries))]
    {
        match canary {
            None => Ok(()),
            Some(_) => Err(NotCompiled),
        }
    }
}

/// Whether `mechanism` is switched off in this run. Always `false` outside canary builds.
#[inline]
pub fn disabled(mechanism: Canary) -> bool {
    #[cfg(cim_canaries)]
    {
        ACTIVE.load(std::sync::atomic::Ordering::Relaxed) == code(Some(mechanism))
    }
    #[cfg(not(cim_canaries))]
    {
        let _ = mechanism;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for c in Canary::ALL {
            assert_eq!(Canary::from_name(c.name()), Some(c));
        }
        assert_eq!(Canary::from_name("nothing"), None);
    }

    #[cfg(not(cim_canaries))]
    #[test]
    fn an_ordinary_build_has_no_canaries() {
        const { assert!(!COMPILED) };
        assert_eq!(set(Some(Canary::Dedup)), Err(NotCompiled));
        assert_eq!(set(None), Ok(()));
        assert!(Canary::ALL.into_iter().all(|c| !disabled(c)));
    }
}
