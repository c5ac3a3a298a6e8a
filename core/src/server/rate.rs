//! A token bucket in integer micro-tokens, so refills are exact and deterministic.

use std::time::Instant;

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
    use std::time::Duration;

    #[allow(clippy::disallowed_methods)]
    fn base() -> Instant {
        Instant::now()
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
}
