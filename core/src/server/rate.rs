//! A token bucket in integer micro-tokens, so refills are exact and deterministic.

use std::time::Duration;

use crate::time::Instant;

const MICRO: u128 = 1_000_000;

/// `rate_per_sec` tokens a second, at most `burst` saved up; one token per send.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_per_sec: u32,
    capacity: u128,
    level: u128,
    last: Instant,
}

impl TokenBucket {
    /// Starts full: a client that just logged in may flush its outbox at once.
    pub fn full(now: Instant, rate_per_sec: u32, burst: u32) -> Self {
        let capacity = u128::from(burst) * MICRO;
        Self {
            rate_per_sec,
            capacity,
            level: capacity,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.level >= MICRO {
            self.level -= MICRO;
            true
        } else {
            false
        }
    }

    /// How long until a token is there (zero if one is now). Refills as `try_take` would.
    pub fn retry_after(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.level >= MICRO || self.rate_per_sec == 0 {
            // A zero rate never refills: there is no honest wait to name.
            return Duration::ZERO;
        }
        let missing = MICRO - self.level;
        // missing micro-tokens at rate * 10^6 per 10^9 ns, rounded up.
        let rate = u128::from(self.rate_per_sec);
        let nanos = (missing * 1_000).div_ceil(rate);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Whether the bucket is back at its burst (an idle key's bucket can be dropped and
    /// started full again without changing anything).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.level >= self.capacity
    }

    fn refill(&mut self, now: Instant) {
        // A `now` older than the last refill (inputs fed out of order) adds nothing.
        let Some(elapsed) = now.checked_duration_since(self.last) else {
            return;
        };
        // rate tokens/s = rate * 10^6 micro-tokens per 10^9 ns.
        let added = elapsed.as_nanos() * u128::from(self.rate_per_sec) / 1_000;
        self.level = (self.level + added).min(self.capacity);
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)]
    fn base() -> Instant {
        Instant::from_nanos(0)
    }

    #[test]
    fn burst_then_rate() {
        let t0 = base();
        let mut bucket = TokenBucket::full(t0, 2, 3);
        let ms = |n| t0 + Duration::from_millis(n);
        // (time, expected result of one take)
        let steps = [
            (ms(0), true),
            (ms(0), true),
            (ms(0), true),
            (ms(0), false),
            (ms(499), false),
            (ms(500), true), // 2/s: one token per 500 ms
            (ms(500), false),
            (ms(10_000), true), // long idle refills only up to the burst
            (ms(10_000), true),
            (ms(10_000), true),
            (ms(10_000), false),
        ];
        for (i, (at, want)) in steps.into_iter().enumerate() {
            assert_eq!(bucket.try_take(at), want, "step {i}");
        }
    }

    #[test]
    fn retry_after_names_the_next_token() {
        let t0 = base();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut bucket = TokenBucket::full(t0, 4, 1);
        assert_eq!(bucket.retry_after(ms(0)), Duration::ZERO);
        assert!(bucket.is_full(ms(0)));
        assert!(bucket.try_take(ms(0)));
        assert!(!bucket.is_full(ms(0)));
        assert_eq!(bucket.retry_after(ms(0)), Duration::from_millis(250));
        assert_eq!(bucket.retry_after(ms(100)), Duration::from_millis(150));
        assert!(!bucket.try_take(ms(249)));
        assert!(bucket.try_take(ms(250)));
        assert_eq!(bucket.retry_after(ms(250)), Duration::from_millis(250));
    }
}
