//! The per-account login throttle: a growing delay after repeated failed logins, never a
//! lock.
//!
//! The store keeps one [`LoginFailures`] record per account (shared by every route); the
//! route's login machine (`route_login`) decides with [`LoginThrottle::wait`] whether an
//! attempt may go ahead now. The first `free_failures` failures cost nothing; after that each
//! further attempt must wait `base_delay × 2^(n − free_failures)` after the last failure,
//! capped at `max_delay`. So an attacker gets at most one guess per `max_delay` at an
//! account, while its owner can always log in again within `max_delay` (and at once with a
//! valid resume token, which skips the throttle). A record is forgotten
//! [`LoginThrottle::forget_after`] after its last failure; a success clears it.

use std::time::Duration;

use crate::ids::UnixMillis;
use crate::store::LoginFailures;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginThrottle {
    /// Failures that cost no delay.
    pub free_failures: u32,
    /// Delay after the first failure past the free ones; doubles with each further one.
    pub base_delay: Duration,
    /// The delay never grows past this.
    pub max_delay: Duration,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        Self {
            free_failures: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
        }
    }
}

/// How long a record is kept at least, whatever the delays.
const FORGET_AFTER_MIN: Duration = Duration::from_secs(15 * 60);

impl LoginThrottle {
    /// How long after its last failure a record is forgotten: 15 minutes, or four times
    /// `max_delay` if that is longer (a record must outlive the delay it imposes).
    pub fn forget_after(&self) -> Duration {
        FORGET_AFTER_MIN.max(self.max_delay.saturating_mul(4))
    }

    /// The delay an attempt must wait after the last of `count` failures.
    pub fn delay(&self, count: u32) -> Duration {
        let Some(over) = count.checked_sub(self.free_failures) else {
            return Duration::ZERO;
        };
        // 2^over, saturating: past 2^31 the cap has long been reached.
        let factor = 1u32.checked_shl(over).unwrap_or(u32::MAX);
        self.base_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// `None` if an attempt may go ahead at `now`; otherwise how long until it may.
    pub fn wait(&self, failures: &LoginFailures, now: UnixMillis) -> Option<Duration> {
        let allowed_at = failures.last_at.plus(self.delay(failures.count));
        (allowed_at > now).then(|| Duration::from_millis(allowed_at.0 - now.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_table() {
        let t = LoginThrottle {
            free_failures: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
        };
        let cases = [
            (0, 0),
            (2, 0),
            (3, 1),
            (4, 2),
            (5, 4),
            (6, 8),
            (7, 10),
            (40, 10),
            (u32::MAX, 10),
        ];
        for (count, secs) in cases {
            assert_eq!(t.delay(count), Duration::from_secs(secs), "count {count}");
        }
        assert_eq!(t.forget_after(), Duration::from_secs(900));
        let long = LoginThrottle {
            max_delay: Duration::from_secs(3600),
            ..t
        };
        assert_eq!(long.forget_after(), Duration::from_secs(4 * 3600));
    }

    #[test]
    fn wait_table() {
        let t = LoginThrottle::default();
        let at = |count, last| LoginFailures {
            count,
            last_at: UnixMillis(last),
        };
        // (record, now, expected wait in ms)
        let cases = [
            (at(0, 0), 1_000, None),
            (at(4, 1_000), 1_000, None),
            (at(5, 1_000), 1_000, Some(1_000)),
            (at(5, 1_000), 1_999, Some(1)),
            (at(5, 1_000), 2_000, None),
            (at(7, 1_000), 1_000, Some(4_000)),
            (at(50, 1_000), 1_000, Some(60_000)),
            (at(50, 1_000), 61_000, None),
        ];
        for (i, (record, now, want)) in cases.into_iter().enumerate() {
            assert_eq!(
                t.wait(&record, UnixMillis(now)),
                want.map(Duration::from_millis),
                "case {i}"
            );
        }
    }
}
