//! Monotonic time the machines can be given anywhere.
//!
//! The machines schedule with an [`Instant`]: nanoseconds on one monotonic clock, counted
//! from an origin the shell chose. It is not `std::time::Instant`, which has no constructor but
//! `now()` and panics on `wasm32-unknown-unknown`: every shell — tokio, a turmoil simulation,
//! a browser (`performance.now()`), a table test — can make one from a number.
//!
//! Only differences between instants of one shell mean anything; the origin is the shell's
//! business (`cim_io::clock` converts tokio's instants to and from these). The count is signed
//! so that an origin taken late (a simulated host's clock may start before the process's
//! origin) still gives every instant a value: ±292 years around the origin.

use std::fmt;
use std::ops::{Add, AddAssign, Sub, SubAssign};
use std::time::Duration;

/// A point on a shell's monotonic clock: nanoseconds since the shell's origin.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Instant {
    nanos: i64,
}

impl Instant {
    /// The instant `nanos` nanoseconds after the shell's origin (before it if negative).
    pub const fn from_nanos(nanos: i64) -> Self {
        Self { nanos }
    }

    /// The instant `millis` milliseconds after the shell's origin, for shells whose clock
    /// counts milliseconds (a browser's `performance.now()`).
    pub const fn from_millis(millis: i64) -> Self {
        Self {
            nanos: millis.saturating_mul(1_000_000),
        }
    }

    /// Nanoseconds since the shell's origin.
    pub const fn as_nanos(self) -> i64 {
        self.nanos
    }

    /// The time from `earlier` to `self`, or `None` when `earlier` is later.
    pub fn checked_duration_since(self, earlier: Instant) -> Option<Duration> {
        // In i128: the span between the ends of the range does not fit an i64, but does a u64.
        let nanos = i128::from(self.nanos) - i128::from(earlier.nanos);
        u64::try_from(nanos).ok().map(Duration::from_nanos)
    }

    /// The time from `earlier` to `self`, zero when `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        self.checked_duration_since(earlier).unwrap_or_default()
    }

    /// The time from `earlier` to `self`, zero when `earlier` is later (as `std`'s does).
    pub fn duration_since(self, earlier: Instant) -> Duration {
        self.saturating_duration_since(earlier)
    }

    /// `self + duration`, or `None` past the representable range.
    pub fn checked_add(self, duration: Duration) -> Option<Instant> {
        let nanos = i64::try_from(duration.as_nanos()).ok()?;
        self.nanos.checked_add(nanos).map(Self::from_nanos)
    }

    /// `self - duration`, or `None` past the representable range.
    pub fn checked_sub(self, duration: Duration) -> Option<Instant> {
        let nanos = i64::try_from(duration.as_nanos()).ok()?;
        self.nanos.checked_sub(nanos).map(Self::from_nanos)
    }
}

impl fmt::Debug for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Seconds with the nanoseconds, as a reader compares them: `+12.000250000s`.
        let sign = if self.nanos < 0 { '-' } else { '+' };
        let abs = self.nanos.unsigned_abs();
        write!(
            f,
            "{sign}{}.{:09}s",
            abs / 1_000_000_000,
            abs % 1_000_000_000
        )
    }
}

impl Add<Duration> for Instant {
    type Output = Instant;

    /// Panics past the representable range (±292 years), as `std::time::Instant` does.
    fn add(self, duration: Duration) -> Instant {
        self.checked_add(duration)
            .expect("overflow when adding a duration to an instant")
    }
}

impl AddAssign<Duration> for Instant {
    fn add_assign(&mut self, duration: Duration) {
        *self = *self + duration;
    }
}

impl Sub<Duration> for Instant {
    type Output = Instant;

    /// Panics past the representable range (±292 years), as `std::time::Instant` does.
    fn sub(self, duration: Duration) -> Instant {
        self.checked_sub(duration)
            .expect("overflow when subtracting a duration from an instant")
    }
}

impl SubAssign<Duration> for Instant {
    fn sub_assign(&mut self, duration: Duration) {
        *self = *self - duration;
    }
}

impl Sub<Instant> for Instant {
    type Output = Duration;

    /// Zero when `earlier` is later, as `std::time::Instant` does.
    fn sub(self, earlier: Instant) -> Duration {
        self.saturating_duration_since(earlier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_matches_std_semantics() {
        let t0 = Instant::from_millis(1_000);
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(t1.as_nanos(), 1_250_000_000);
        assert_eq!(t1 - t0, Duration::from_millis(250));
        assert_eq!(
            t1.checked_duration_since(t0),
            Some(Duration::from_millis(250))
        );
        // Backwards: none, zero, zero (std's `duration_since` saturates too).
        assert_eq!(t0.checked_duration_since(t1), None);
        assert_eq!(t0.saturating_duration_since(t1), Duration::ZERO);
        assert_eq!(t0 - t1, Duration::ZERO);
        assert_eq!(t1 - Duration::from_millis(250), t0);
        let mut t = t0;
        t += Duration::from_secs(1);
        t -= Duration::from_millis(500);
        assert_eq!(t, Instant::from_millis(1_500));
    }

    #[test]
    fn instants_before_the_origin_compare_and_subtract() {
        let before = Instant::from_nanos(-5);
        let after = Instant::from_nanos(7);
        assert!(before < after);
        assert_eq!(after - before, Duration::from_nanos(12));
        assert_eq!(
            Instant::from_nanos(0).checked_sub(Duration::from_nanos(5)),
            Some(before)
        );
    }

    #[test]
    fn the_ends_of_the_range_are_checked_not_wrapped() {
        let last = Instant::from_nanos(i64::MAX);
        assert_eq!(last.checked_add(Duration::from_nanos(1)), None);
        assert_eq!(
            Instant::from_nanos(i64::MIN).checked_sub(Duration::from_nanos(1)),
            None
        );
        assert_eq!(Instant::from_nanos(0).checked_add(Duration::MAX), None);
        assert_eq!(
            last.checked_duration_since(Instant::from_nanos(i64::MIN)),
            Some(Duration::from_nanos(u64::MAX))
        );
    }

    #[test]
    fn debug_reads_as_seconds_from_the_origin() {
        assert_eq!(
            format!("{:?}", Instant::from_millis(12_250)),
            "+12.250000000s"
        );
        assert_eq!(format!("{:?}", Instant::from_nanos(-1)), "-0.000000001s");
    }
}
