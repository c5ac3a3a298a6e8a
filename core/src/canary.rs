//! Canaries: switches that each disable one safety mechanism, so the simulation can prove
//! that its checker notices when that mechanism is missing. A checker that never fires
//! proves nothing.
//!
//! They exist only in a build made with `CIM_CANARIES=1` (the build script then sets
//! `--cfg cim_canaries`). A run's choice is a [`Canaries`] value carried by the
//! configuration of every machine that has a switch ([`ServerConfig`], [`ClientConfig`],
//! [`MemoryStoreConfig`]), set by whoever builds them (the simulation's cluster spec): no
//! process-wide state, so two runs in one process cannot see each other's canary. In every
//! other build [`Canaries`] is a zero-sized type and [`Canaries::disabled`] a constant
//! `false` the compiler folds away: the production path carries neither a field nor a
//! branch, and a canary cannot be switched on (construction refuses).
//!
//! [`ServerConfig`]: crate::server::ServerConfig
//! [`ClientConfig`]: crate::client::ClientConfig
//! [`MemoryStoreConfig`]: crate::memstore::MemoryStoreConfig

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
    /// The store's lost-tail rule: a log last written by another store incarnation keeps
    /// its log epoch, so a store restarted from older data numbers new messages with seqs
    /// clients already received under that epoch.
    LostTailDetection,
    /// The client's continuation across a log move: a client whose position the move
    /// carried over resets to the new log's beginning instead (`LogReset`), handing every
    /// surviving message over again.
    MoveContinuation,
    /// Acknowledge after replication (`WAIT`, `--store-wait-replicas`), as the simulation's
    /// store client does it (`cim_sim_hosts::store::RemoteStore`; the Redis store's `WAIT`
    /// runs only against a real Redis): an append is acknowledged whatever its `WAIT`
    /// answered, so a failover to a replica that lagged loses acknowledged messages.
    WaitReplicas,
    /// Store health and lease refreshes per master, as a cluster client has them (the
    /// simulation's sharded store, `cim_sim_hosts::sharded::ShardedStore`, over the split
    /// the Redis store runs, `cim_io::store::split`): one master's outage answers "unknown"
    /// for its own users only. Off: health needs every master, and a lease refresh or route
    /// load fails whole when any master fails, so one master's outage fences and unlists
    /// every server.
    ShardHealth,
}

impl Canary {
    pub const ALL: [Canary; 10] = [
        Canary::IdempotentAppend,
        Canary::EpochFencing,
        Canary::SelfFencing,
        Canary::GapSync,
        Canary::Dedup,
        Canary::SendOrder,
        Canary::LostTailDetection,
        Canary::MoveContinuation,
        Canary::WaitReplicas,
        Canary::ShardHealth,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::IdempotentAppend => "idempotent-append",
            Self::EpochFencing => "epoch-fencing",
            Self::SelfFencing => "self-fencing",
            Self::GapSync => "gap-sync",
            Self::Dedup => "dedup",
            Self::SendOrder => "send-order",
            Self::LostTailDetection => "lost-tail",
            Self::MoveContinuation => "move-continuation",
            Self::WaitReplicas => "wait-replicas",
            Self::ShardHealth => "shard-health",
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

/// The canary a run switches off, if any: [`Canaries::NONE`] (the default) keeps every
/// mechanism on. Zero-sized outside canary builds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Canaries {
    #[cfg(cim_canaries)]
    off: Option<Canary>,
}

impl Canaries {
    /// Every mechanism on.
    pub const NONE: Self = Self {
        #[cfg(cim_canaries)]
        off: None,
    };

    /// Switches `canary` off (`None`: every mechanism on). Refused for `Some` in a build
    /// without canaries.
    pub fn switch_off(canary: Option<Canary>) -> Result<Self, NotCompiled> {
        #[cfg(cim_canaries)]
        {
            Ok(Self { off: canary })
        }
        #[cfg(not(cim_canaries))]
        {
            match canary {
                None => Ok(Self::NONE),
                Some(_) => Err(NotCompiled),
            }
        }
    }

    /// The mechanism switched off, if any (always `None` outside canary builds).
    pub fn off(self) -> Option<Canary> {
        #[cfg(cim_canaries)]
        {
            self.off
        }
        #[cfg(not(cim_canaries))]
        {
            None
        }
    }

    /// Whether `mechanism` is switched off. A constant `false` outside canary builds.
    #[inline(always)]
    pub fn disabled(self, mechanism: Canary) -> bool {
        #[cfg(cim_canaries)]
        {
            self.off == Some(mechanism)
        }
        #[cfg(not(cim_canaries))]
        {
            let _ = mechanism;
            false
        }
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
        // Nothing to carry: the configurations that hold one grow by nothing.
        assert_eq!(std::mem::size_of::<Canaries>(), 0);
        assert_eq!(Canaries::switch_off(Some(Canary::Dedup)), Err(NotCompiled));
        assert_eq!(Canaries::switch_off(None), Ok(Canaries::NONE));
        assert_eq!(Canaries::default(), Canaries::NONE);
        assert_eq!(Canaries::NONE.off(), None);
        assert!(Canary::ALL.into_iter().all(|c| !Canaries::NONE.disabled(c)));
    }

    #[cfg(cim_canaries)]
    #[test]
    fn a_canary_switches_off_exactly_its_mechanism() {
        assert!(Canary::ALL.into_iter().all(|c| !Canaries::NONE.disabled(c)));
        for off in Canary::ALL {
            let canaries = Canaries::switch_off(Some(off)).unwrap();
            assert_eq!(canaries.off(), Some(off));
            for c in Canary::ALL {
                assert_eq!(canaries.disabled(c), c == off, "{off} vs {c}");
            }
        }
    }
}
