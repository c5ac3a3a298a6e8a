//! The registry task: owns the server's [`Registration`], republishes its connection count,
//! tells the driver when the registry session is lost (so it fences itself), and leaves the
//! registry when the server drains.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::ServerError;
use super::input::Input;
use crate::registry::{Registration, RegistryError, SessionHealth};

pub(super) enum RegistryCtl {
    /// Leave the registry (entry first, then the session) and stop.
    Deregister {
        ack: oneshot::Sender<Result<(), RegistryError>>,
    },
    /// Take the entry out (`false`) or put it back (`true`), keeping the session. The
    /// registration keeps the wish and applies it when it can.
    SetListed(bool),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    pub update_interval: Duration,
    pub io_timeout: Duration,
}

/// Notices a lost session from the health watch: a new `Expired`, or a registration that
/// replaced its session (it counts those) in case the `Expired` in between was never seen;
/// and the first `Connected` after a loss (the entry is back under a new session).
struct LossDetector {
    was_expired: bool,
    sessions_lost: u64,
    /// A loss was reported and no recovery yet.
    fenced: bool,
}

/// What a health change means for the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    Lost,
    /// Lost, and already back under a new session (both coalesced into one change).
    LostAndBack,
    Back,
}

impl LossDetector {
    fn new(reg: &Registration) -> Self {
        Self {
            was_expired: reg.current_health() == SessionHealth::Expired,
            sessions_lost: reg.sessions_lost(),
            fenced: false,
        }
    }

    fn lost(&mut self, health: SessionHealth, sessions_lost: u64) -> bool {
        let expired = health == SessionHealth::Expired;
        let newly_expired = expired && !self.was_expired;
        self.was_expired = expired;
        let replaced = sessions_lost > self.sessions_lost;
        self.sessions_lost = sessions_lost;
        newly_expired || replaced
    }

    fn change(&mut self, health: SessionHealth, sessions_lost: u64) -> Option<Change> {
        let lost = self.lost(health, sessions_lost);
        let connected = health.is_connected();
        let change = match (lost, connected) {
            (true, true) => Some(Change::LostAndBack),
            (true, false) => Some(Change::Lost),
            (false, true) if self.fenced => Some(Change::Back),
            (false, _) => None,
        };
        self.fenced = (self.fenced || lost) && !connected;
        change
    }
}

pub(super) async fn run<S>(
    reg: Registration,
    settings: Settings,
    inputs: mpsc::Sender<Input<S>>,
    mut ctl: mpsc::Receiver<RegistryCtl>,
    connections: Arc<AtomicU64>,
    cancel: CancellationToken,
) -> Result<(), ServerError> {
    let mut health = reg.health();
    let mut health_open = true;
    let mut detector = LossDetector::new(&reg);
    // `register` published 0.
    let mut published: u64 = 0;
    let start = tokio::time::Instant::now() + settings.update_interval;
    let mut ticker = tokio::time::interval_at(start, settings.update_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            changed = health.changed(), if health_open => {
                health_open = changed.is_ok();
                check_health(&reg, &mut health, &mut detector, &inputs).await;
            }
            command = ctl.recv() => {
                let ack = match command {
                    Some(RegistryCtl::Deregister { ack }) => ack,
                    Some(RegistryCtl::SetListed(listed)) => {
                        match tokio::time::timeout(settings.io_timeout, reg.set_listed(listed)).await {
                            Ok(Ok(())) => tracing::info!(server = %reg.server_id(), listed, "registry entry updated"),
                            Ok(Err(error)) => tracing::warn!(server = %reg.server_id(), listed, %error, "registry entry not updated yet; kept as a wish"),
                            Err(_) => tracing::warn!(server = %reg.server_id(), listed, "registry entry update timed out; kept as a wish"),
                        }
                        continue;
                    }
                    // The handle is gone; dropping it cancels everything.
                    None => return Ok(()),
                };
                let left = match tokio::time::timeout(settings.io_timeout, reg.deregister()).await {
                    Ok(result) => result,
                    Err(_) => Err(RegistryError::Timeout {
                        op: "deregister",
                        after: settings.io_timeout,
                    }),
                };
                let _ = ack.send(left);
                // Leaving is the end of this task's job; it waits for the server to stop
                // so that `stopped()` does not take its end for a failure.
                cancel.cancelled().await;
                return Ok(());
            }
            _ = ticker.tick() => {
                let count = connections.load(Ordering::Relaxed);
                if count == published {
                    continue;
                }
                let n = u32::try_from(count).unwrap_or(u32::MAX);
                let update = tokio::time::timeout(settings.io_timeout, reg.update(n));
                tokio::pin!(update);
                // A slow registry must not delay fencing: keep watching health meanwhile.
                let result = loop {
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return Ok(()),
                        changed = health.changed(), if health_open => {
                            health_open = changed.is_ok();
                            check_health(&reg, &mut health, &mut detector, &inputs).await;
                        }
                        result = &mut update => break result,
                    }
                };
                match result {
                    Ok(Ok(())) => published = count,
                    // Kept by the registration and published when its session is back.
                    Ok(Err(error)) => tracing::debug!(%error, "connection count not published yet"),
                    Err(_) => tracing::warn!(after = ?settings.io_timeout, "registry update timed out"),
                }
            }
        }
    }
}

async fn check_health<S>(
    reg: &Registration,
    health: &mut watch::Receiver<SessionHealth>,
    detector: &mut LossDetector,
    inputs: &mpsc::Sender<Input<S>>,
) {
    let now = *health.borrow_and_update();
    tracing::info!(server = %reg.server_id(), health = ?now, "registry session health");
    match detector.change(now, reg.sessions_lost()) {
        Some(Change::Lost) => {
            let _ = inputs.send(Input::RegistryLost).await;
        }
        Some(Change::LostAndBack) => {
            let _ = inputs.send(Input::RegistryLost).await;
            let _ = inputs.send(Input::RegistryBack).await;
        }
        Some(Change::Back) => {
            let _ = inputs.send(Input::RegistryBack).await;
        }
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_loss_is_reported_once() {
        let mut d = LossDetector {
            was_expired: false,
            sessions_lost: 0,
            fenced: false,
        };
        let disconnected = SessionHealth::Disconnected {
            since: tokio::time::Instant::now(),
        };
        assert!(!d.lost(disconnected, 0), "a disconnection is not a loss");
        assert!(d.lost(SessionHealth::Expired, 1));
        assert!(!d.lost(SessionHealth::Expired, 1), "same loss seen twice");
        assert!(
            !d.lost(SessionHealth::Connected, 1),
            "recreated: nothing new"
        );
        // An expiry and its recovery coalesced into one change of the watch.
        assert!(d.lost(SessionHealth::Connected, 2));
    }

    #[test]
    fn a_loss_is_followed_by_one_recovery() {
        let mut d = LossDetector {
            was_expired: false,
            sessions_lost: 0,
            fenced: false,
        };
        let disconnected = SessionHealth::Disconnected {
            since: tokio::time::Instant::now(),
        };
        assert_eq!(d.change(SessionHealth::Connected, 0), None);
        assert_eq!(
            d.change(disconnected, 0),
            None,
            "a disconnection is not a loss"
        );
        assert_eq!(
            d.change(SessionHealth::Connected, 0),
            None,
            "nothing was lost"
        );
        assert_eq!(d.change(SessionHealth::Expired, 1), Some(Change::Lost));
        assert_eq!(d.change(disconnected, 1), None, "still fenced");
        assert_eq!(d.change(SessionHealth::Connected, 1), Some(Change::Back));
        assert_eq!(d.change(SessionHealth::Connected, 1), None, "back once");
        assert_eq!(
            d.change(SessionHealth::Connected, 2),
            Some(Change::LostAndBack),
            "an expiry and its recovery coalesced"
        );
        assert_eq!(d.change(SessionHealth::Connected, 2), None);
    }
}
