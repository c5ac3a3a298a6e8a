//! The store watchdog: a server that cannot reach the store cannot bind or refresh anyone,
//! yet routes keep sending it users for as long as it is in the registry (consistent hashing
//! keeps sending the same ones). So after the store has been unreachable for a grace period
//! the server fences every connection, refuses new ones and takes itself out of the
//! registry; when the store answers again it accepts clients and lists itself again.
//!
//! Fencing comes first: once the server is out of the registry, routes let its users log in
//! elsewhere without waiting for it, so nothing may still be live here by then.
//!
//! On a Redis Cluster "unreachable" means no master answers (`RedisStore`'s health): one
//! dead master is one shard's outage, not the store's. The server then stays listed and
//! keeps every session whose lease its refreshes still prove; the users of the dead shard
//! get `LeaseRefresh::Unknown` and are fenced one by one at their own deadline (the same
//! `lease_ttl × (1 − ε)` bound as ever), and their logins are refused by the store until a
//! replica takes over.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::ServerError;
use super::input::Input;
use super::registration::RegistryCtl;
use crate::clock::Clock;
use crate::store::Store;

/// How often the store is probed, and how long one probe may take.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

pub(super) async fn run<S>(
    store: Arc<dyn Store>,
    clock: Clock,
    grace: Duration,
    inputs: mpsc::Sender<Input<S>>,
    registry: mpsc::Sender<RegistryCtl>,
    cancel: CancellationToken,
) -> Result<(), ServerError> {
    let mut failing_since = None;
    let mut withdrawn = false;
    let mut ticker = tokio::time::interval(PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            _ = ticker.tick() => {}
        }
        let healthy = matches!(
            tokio::time::timeout(PROBE_INTERVAL, store.health()).await,
            Ok(Ok(()))
        );
        let now = clock.now();
        if healthy {
            failing_since = None;
            if withdrawn {
                withdrawn = false;
                if inputs.send(Input::StoreBack).await.is_err()
                    || registry.send(RegistryCtl::SetListed(true)).await.is_err()
                {
                    return Ok(()); // stopping
                }
            }
            continue;
        }
        let since = *failing_since.get_or_insert(now);
        if withdrawn || now.duration_since(since) < grace {
            continue;
        }
        withdrawn = true;
        let (fenced, done) = oneshot::channel();
        if inputs.send(Input::StoreLost { fenced }).await.is_err() || done.await.is_err() {
            return Ok(()); // stopping
        }
        if registry.send(RegistryCtl::SetListed(false)).await.is_err() {
            return Ok(());
        }
    }
}
