//! Rate-limited warnings: a flood of the same failure (accept errors at the file limit,
//! strangers knocking on the link port) writes one line per [`WarnGate`] interval and kind,
//! saying how many were suppressed since the last line, instead of one line per event.
//!
//! Every suppressed warning is counted, so the flood is still visible in `/metrics`
//! (`*_warnings_suppressed_total`) while the log stays readable.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// One warning line per kind per this long, by default.
pub const DEFAULT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Decides which warnings of each kind are written. Shared by the tasks of one process part
/// (a route, a server); cheap enough to call for every event.
#[derive(Debug)]
pub struct WarnGate {
    interval: Duration,
    kinds: Mutex<BTreeMap<&'static str, KindState>>,
    suppressed: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct KindState {
    /// The last line of this kind was written then.
    logged_at: Instant,
    /// Events of this kind not written since.
    suppressed: u64,
}

impl Default for WarnGate {
    fn default() -> Self {
        Self::new(DEFAULT_WARN_INTERVAL)
    }
}

impl WarnGate {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            kinds: Mutex::new(BTreeMap::new()),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether to write a warning of `kind` now: `Some(k)` says write it, with `k` the
    /// number of warnings of that kind suppressed since the previous line; `None` says
    /// suppress it (and counts it).
    pub fn admit(&self, kind: &'static str) -> Option<u64> {
        self.admit_at(kind, Instant::now())
    }

    /// [`admit`](Self::admit) at an explicit time.
    pub fn admit_at(&self, kind: &'static str, now: Instant) -> Option<u64> {
        // A poisoned lock only means another thread panicked while logging: keep going.
        let mut kinds = self
            .kinds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match kinds.get_mut(kind) {
            Some(state) if now.saturating_duration_since(state.logged_at) < self.interval => {
                state.suppressed += 1;
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            Some(state) => {
                let suppressed = state.suppressed;
                *state = KindState {
                    logged_at: now,
                    suppressed: 0,
                };
                Some(suppressed)
            }
            None => {
                kinds.insert(
                    kind,
                    KindState {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }

    /// Warnings suppressed so far, all kinds together.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

/// `tracing::warn!` through a [`WarnGate`]: written at most once per interval per kind, with
/// a `suppressed` field counting the lines left out since the previous one.
///
/// `warn_limited!(gate, "kind", %error, "message")`
#[macro_export]
macro_rules! warn_limited {
    ($gate:expr, $kind:expr, $($rest:tt)+) => {
        if let Some(suppressed) = $gate.admit($kind) {
            tracing::warn!(suppressed, $($rest)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_kind_with_the_count_left_out() {
        let gate = WarnGate::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // The first of a kind is written.
        assert_eq!(gate.admit_at("accept", at(0)), Some(0));
        // A flood within the interval is not, and is counted.
        for ms in 1..=500 {
            assert_eq!(gate.admit_at("accept", at(ms * 10)), None, "{ms}");
        }
        assert_eq!(gate.suppressed_total(), 500);
        // Another kind has its own budget.
        assert_eq!(gate.admit_at("link auth", at(5_000)), Some(0));
        assert_eq!(gate.admit_at("link auth", at(5_001)), None);
        // Just before the interval ends: still suppressed.
        assert_eq!(gate.admit_at("accept", at(9_999)), None);
        // At the interval: one line, saying how many were left out since the last.
        assert_eq!(gate.admit_at("accept", at(10_000)), Some(501));
        assert_eq!(gate.admit_at("accept", at(10_001)), None);
        assert_eq!(gate.admit_at("accept", at(25_000)), Some(1));
        // A quiet kind logs again at once, with nothing suppressed.
        assert_eq!(gate.admit_at("link auth", at(60_000)), Some(1));
        assert_eq!(gate.admit_at("link auth", at(120_000)), Some(0));
        assert_eq!(gate.suppressed_total(), 503);
    }

    #[test]
    fn the_default_is_one_line_per_10_seconds_as_the_docs_say() {
        let gate = WarnGate::default();
        let t0 = Instant::now();
        assert_eq!(gate.admit_at("k", t0), Some(0));
        assert_eq!(gate.admit_at("k", t0 + Duration::from_millis(9_999)), None);
        assert_eq!(gate.admit_at("k", t0 + Duration::from_secs(10)), Some(1));
    }

    #[test]
    fn time_going_backwards_does_not_open_the_gate() {
        let gate = WarnGate::new(Duration::from_secs(1));
        let t0 = Instant::now() + Duration::from_secs(5);
        assert_eq!(gate.admit_at("k", t0), Some(0));
        assert_eq!(gate.admit_at("k", t0 - Duration::from_secs(3)), None);
    }
}
