//! Time for the shell: the monotonic `Instant` the machines schedule with and the wall clock
//! (`UnixMillis`) that tickets, leases and message timestamps use.
//!
//! Both come from tokio's clock so a turmoil simulation (which drives tokio's paused clock)
//! controls them: in a simulation the wall clock is a fixed origin plus the simulated time
//! elapsed, in production it is the system clock.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cim_core::ids::UnixMillis;

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
        tokio::time::Instant::now().into_std()
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

    /// Sleeps until a machine deadline (a `std` instant taken from [`Clock::now`]).
    pub async fn sleep_until(&self, deadline: Instant) {
        tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)).await;
    }
}
