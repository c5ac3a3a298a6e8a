//! Capped exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;

/// The ceiling for retry number `attempt` (0-based): `min(cap, base * 2^attempt)`.
pub(crate) fn ceiling(base: Duration, cap: Duration, attempt: u32) -> Duration {
    // 2^31 times any sane base already exceeds any sane cap; the clamp keeps the shift defined.
    let factor = 1u32 << attempt.min(31);
    base.saturating_mul(factor).min(cap)
}

/// A delay drawn uniformly from `[0, ceiling]`. Full jitter: clients that lost the same server
/// at the same moment spread their re-logins over the whole window instead of arriving in
/// waves.
pub(crate) fn delay(rng: &mut impl Rng, base: Duration, cap: Duration, attempt: u32) -> Duration {
    let max = ceiling(base, cap, attempt);
    // A cap beyond u64 nanoseconds (584 years) is not a real configuration; saturate.
    let max_nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.random_range(0..=max_nanos))
}
