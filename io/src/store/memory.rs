//! The embedded store: the reference `MemoryStore` behind a mutex.

use std::sync::Mutex;

use cim_core::ids::UnixMillis;
use cim_core::memstore::{MemoryStore, MemoryStoreConfig};
use cim_core::store::{StoreCommand, StoreResult, StoreUnavailable};

use super::{Store, StoreFuture};

/// [`MemoryStore`] shared between tasks. The lock is taken for one `apply` and never held
/// across an await (the future is ready when returned), so each command is one critical
/// section: the atomic step the vocabulary asks for.
#[derive(Debug)]
pub struct MemoryBackend {
    inner: Mutex<MemoryStore>,
}

impl MemoryBackend {
    pub fn new(config: MemoryStoreConfig) -> Self {
        Self {
            inner: Mutex::new(MemoryStore::new(config)),
        }
    }

    /// Replaces the whole state with a fresh store built from `config`: every account, claim,
    /// log and cursor is gone, and logs created afterwards draw their log epochs from
    /// `config.seed` (give it a new seed so they differ from the lost ones). The simulation's
    /// "lossy restart" of the store: a Redis that restarts without its data.
    pub fn reset(&self, config: MemoryStoreConfig) {
        // A poisoned lock is exactly what a reset may replace.
        let mut store = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *store = MemoryStore::new(config);
        self.inner.clear_poison();
    }

    /// The whole state as it is now, to restart from later ([`Self::restart_from`]).
    pub fn snapshot(&self) -> MemoryStore {
        let store = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        store.snapshot()
    }

    /// Every log move the store made so far (`MemoryStore::moves`).
    pub fn moves(&self) -> Vec<cim_core::memstore::LogMove> {
        let store = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        store.moves().to_vec()
    }

    /// The store restarting from `older` (a [`Self::snapshot`]): every write since is lost,
    /// and a new incarnation serves, so the logs that lost writes move to new log epochs
    /// before they are served again (`MemoryStore::restart_from`). New log epochs come from
    /// `seed`. The simulation's lost-tail fault: a Redis restarted from an AOF that lost its
    /// last second, or a replica promoted before it had its master's last writes.
    pub fn restart_from(&self, older: &MemoryStore, seed: u64) {
        let mut store = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        store.restart_from(older, seed);
        self.inner.clear_poison();
    }

    /// One master of a cluster failing over: the keys of `shard`'s slots come back from
    /// `older` (a [`Self::snapshot`]) in a new incarnation of that master, the others stay
    /// (`MemoryStore::restart_shard_from`). The simulation's per-shard lost-tail fault.
    pub fn restart_shard_from(&self, older: &MemoryStore, shard: usize, seed: u64) {
        let mut store = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        store.restart_shard_from(older, shard, seed);
        self.inner.clear_poison();
    }

    fn apply(&self, now: UnixMillis, command: &StoreCommand) -> StoreResult {
        // A poisoned lock means an `apply` panicked halfway: the state may be inconsistent,
        // so refuse rather than serve it.
        let mut store = self
            .inner
            .lock()
            .map_err(|_| StoreUnavailable("in-memory store poisoned by a panic".into()))?;
        Ok(store.apply(now, command))
    }
}

impl Store for MemoryBackend {
    fn execute(&self, now: UnixMillis, command: StoreCommand) -> StoreFuture<'_, StoreResult> {
        let result = self.apply(now, &command);
        Box::pin(std::future::ready(result))
    }

    fn health(&self) -> StoreFuture<'_, Result<(), StoreUnavailable>> {
        let result = match self.inner.lock() {
            Ok(_) => Ok(()),
            Err(_) => Err(StoreUnavailable(
                "in-memory store poisoned by a panic".into(),
            )),
        };
        Box::pin(std::future::ready(result))
    }
}
