//! Connection caps never exceed what the process's open-file limit allows.
//!
//! Every accepted connection is a file descriptor. A cap above the limit does not refuse the
//! excess: `accept` fails with "too many open files" instead, and then so does everything
//! else that needs a descriptor (the store, the registry, links, `/health`). So each listener
//! with a `max-connections` is clamped to the limit less a reserve, and says so at start.

/// Descriptors kept back from the connection caps for everything else: store and registry
/// connections, route-server links, listeners, log files.
pub const FD_RESERVE: u64 = 128;

/// The process's soft limit on open files, if the platform has one.
pub fn file_limit() -> Option<u64> {
    rlimit::Resource::NOFILE.get().ok().map(|(soft, _)| soft)
}

/// Raises the soft open-file limit to the hard limit (what the administrator allows) and
/// returns the soft limit in force afterwards. The binaries call it once at start.
pub fn raise_file_limit() -> Option<u64> {
    let (soft, hard) = rlimit::Resource::NOFILE.get().ok()?;
    if hard > soft && rlimit::Resource::NOFILE.set(hard, hard).is_err() {
        return Some(soft);
    }
    file_limit()
}

/// How many connections all the capped listeners of a process may hold together under the
/// soft limit `limit`: the limit less [`FD_RESERVE`], or half of it when the limit is small.
pub fn connection_budget(limit: u64) -> usize {
    let budget = if limit > 2 * FD_RESERVE {
        limit - FD_RESERVE
    } else {
        limit / 2
    };
    usize::try_from(budget.max(1)).unwrap_or(usize::MAX)
}

/// A cap after [`clamp_connections`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clamped {
    /// The cap to use.
    pub max_connections: usize,
    /// `Some(requested)` when the request was lowered.
    pub lowered_from: Option<usize>,
}

/// `requested`, lowered to the [`connection_budget`] of the open-file limit `limit` (`None`:
/// no limit known, nothing to clamp to).
pub fn clamp_connections(requested: usize, limit: Option<u64>) -> Clamped {
    match limit.map(connection_budget) {
        Some(budget) if requested > budget => Clamped {
            max_connections: budget,
            lowered_from: Some(requested),
        },
        _ => Clamped {
            max_connections: requested,
            lowered_from: None,
        },
    }
}

/// [`clamp_connections`] against this process's limit, logging a warning when it lowers
/// the cap (`what` names the listener, e.g. "route HTTP").
pub fn clamp_to_process_limit(what: &str, requested: usize) -> usize {
    let limit = file_limit();
    let clamped = clamp_connections(requested, limit);
    if let Some(requested) = clamped.lowered_from {
        tracing::warn!(
            listener = what,
            requested,
            max_connections = clamped.max_connections,
            open_file_limit = limit,
            reserve = FD_RESERVE,
            "max-connections lowered to what the open-file limit allows (raise `ulimit -n` / \
             systemd LimitNOFILE for more)"
        );
    }
    clamped.max_connections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_never_exceeds_the_file_limit_less_the_reserve() {
        let cases: &[(usize, Option<u64>, usize, bool)] = &[
            // (requested, soft limit, cap, lowered)
            (100_000, Some(1024), 1024 - 128, true),
            (500, Some(1024), 500, false),
            (896, Some(1024), 896, false),
            (897, Some(1024), 896, true),
            (100_000, Some(1_048_576), 100_000, false),
            // A small limit keeps half for everything else.
            (100_000, Some(200), 100, true),
            (100_000, Some(1), 1, true),
            (100_000, Some(0), 1, true),
            // No limit known: nothing to clamp to.
            (100_000, None, 100_000, false),
        ];
        for &(requested, limit, cap, lowered) in cases {
            let got = clamp_connections(requested, limit);
            assert_eq!(got.max_connections, cap, "{requested} under {limit:?}");
            assert_eq!(
                got.lowered_from.is_some(),
                lowered,
                "{requested} under {limit:?}"
            );
            if let Some(limit) = limit.filter(|l| *l > 0) {
                assert!(got.max_connections as u64 <= limit);
            }
        }
    }

    #[test]
    fn this_process_has_a_limit_and_raising_never_lowers_it() {
        let before = file_limit().expect("unix processes have an open-file limit");
        let after = raise_file_limit().expect("still one after raising");
        assert!(after >= before, "{before} -> {after}");
        let capped = clamp_to_process_limit("test", usize::MAX);
        assert!((capped as u64) < after, "{capped} under {after}");
    }
}
