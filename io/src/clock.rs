//! Time for the shell: the monotonic `Instant` the machines schedule with and the wall clock
//! (`UnixMillis`) that tickets, leases and message timestamps use.
//!
//! Both come from tokio's clock so a turmoil simulation (which drives tokio's paused clock)
//! controls them: in a simulation the wall clock is a fixed origin plus the simulated time
//! elapsed, in production it is the system clock.
//!
//! The machines' [`Instant`] counts nanoseconds from an origin the shell picks: here one per
//! process, the real monotonic clock when it is first asked. A paused or simulated tokio clock
//! can read earlier than that (a turmoil host restarted later starts its clock at the real
//! time of its restart, behind the simulated time of the others), which the signed count
//! absorbs; [`core_instant`] and [`tokio_instant`] convert both ways without loss.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use cim_core::ids::UnixMillis;
use cim_core::time::Instant;

#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The host's clocks.
    System,
    /// Wall time is `origin` plus the tokio time elapsed since `start`.
    Simulated {
        start: tokio::time::Instant,
        origin: UnixMillis,
    },
}

impl Clock {
    /// A simulated clock starting now at `origin`.
    pub fn simulated(origin: UnixMillis) -> Self {
        Self::Simulated {
            start: tokio::time::Instant::now(),
            origin,
        }
    }

    /// Monotonic time for the machines. tokio's clock, so a paused or simulated clock moves it.
    pub fn now(&self) -> Instant {
        core_instant(tokio::time::Instant::now())
    }

    pub fn wall(&self) -> UnixMillis {
        match self {
            Self::System => {
                // The one place the shell reads the system clock.
                #[allow(clippy::disallowed_methods)]
                let since_epoch = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                UnixMillis(since_epoch.as_millis() as u64)
            }
            Self::Simulated { start, origin } => {
                UnixMillis(origin.0 + start.elapsed().as_millis() as u64)
            }
        }
    }

    /// Sleeps until a machine deadline (an instant of [`Clock::now`]'s).
    pub async fn sleep_until(&self, deadline: Instant) {
        tokio::time::sleep_until(tokio_instant(deadline)).await;
    }
}

/// The process's origin of the machines' instants.
fn origin() -> std::time::Instant {
    static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
    // The one read of the real clock here; every later instant is measured against it.
    #[allow(clippy::disallowed_methods)]
    *ORIGIN.get_or_init(std::time::Instant::now)
}

/// A tokio instant as the machines count it.
pub fn core_instant(at: tokio::time::Instant) -> Instant {
    let (at, origin) = (at.into_std(), origin());
    match at.checked_duration_since(origin) {
        Some(after) => Instant::from_nanos(saturating_nanos(after)),
        None => Instant::from_nanos(-saturating_nanos(origin.duration_since(at))),
    }
}

/// A machine's instant as tokio's, to sleep until it. Instants the machines computed beyond
/// what the platform's clock can hold (a deadline centuries away) become a year from now:
/// nobody waits that long, and the machine is asked again before then.
pub fn tokio_instant(at: Instant) -> tokio::time::Instant {
    let nanos = at.as_nanos();
    let delta = std::time::Duration::from_nanos(nanos.unsigned_abs());
    let std_at = if nanos >= 0 {
        origin().checked_add(delta)
    } else {
        origin().checked_sub(delta)
    };
    std_at.map_or_else(
        || tokio::time::Instant::now() + std::time::Duration::from_secs(365 * 24 * 3600),
        tokio::time::Instant::from_std,
    )
}

fn saturating_nanos(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn instants_convert_both_ways_without_loss() {
        #[allow(clippy::disallowed_methods)]
        let now = tokio::time::Instant::from_std(std::time::Instant::now());
        for at in [
            now,
            now + Duration::from_nanos(1),
            now + Duration::from_secs(86_400),
            // Before the origin: a paused clock that started earlier.
            origin_as_tokio() - Duration::from_millis(1500),
        ] {
            assert_eq!(tokio_instant(core_instant(at)), at);
        }
        let a = core_instant(now);
        let b = core_instant(now + Duration::from_millis(7));
        assert_eq!(b - a, Duration::from_millis(7));
    }

    #[test]
    fn an_instant_before_the_origin_is_negative_not_clamped() {
        let before = origin_as_tokio() - Duration::from_millis(2);
        assert_eq!(core_instant(before).as_nanos(), -2_000_000);
    }

    fn origin_as_tokio() -> tokio::time::Instant {
        tokio::time::Instant::from_std(origin())
    }
}
