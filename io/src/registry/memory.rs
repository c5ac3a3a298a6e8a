//! The in-process registry: `cim up` and tests. It behaves like the ZooKeeper one as seen
//! through the API (an entry lives as long as its [`Registration`]; a view sees every change
//! at once), and has test hooks for what only a network can do: disconnect, expire, heal.
//!
//! Listing: an unlisted registration stays in `State::regs` (its session lives on) and is
//! left out of the published map. Unlike ZooKeeper, where an unlisted server holds no node,
//! it keeps its id reserved: a second live server with the same id is a misconfiguration
//! either way, and reserving it keeps one entry per id here. While a session is merely
//! disconnected (test hook) `set_listed` applies at once, as `update` does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cim_core::ids::ServerId;
use cim_core::registry::LiveServer;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    Registration, RegistrationBackend, Registry, RegistryError, RegistryView, ServerMap,
    SessionHealth, decode_node, validate_server_id,
};

/// In-process registry. Clones share one registry.
#[derive(Debug, Clone)]
pub struct MemoryRegistry {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    view: watch::Sender<ServerMap>,
    /// Views' session health: always `Connected` (held so receivers never see a closed channel).
    view_health: watch::Sender<SessionHealth>,
}

#[derive(Debug, Default)]
struct State {
    /// Registrations by token (one per `register` call), live or expired.
    regs: BTreeMap<u64, Reg>,
    next_token: u64,
    /// Nodes written around the API (test hook), decoded like ZooKeeper node data.
    raw: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug)]
struct Reg {
    server: LiveServer,
    /// False between a simulated expiry and the heal that recreates the entry.
    live: bool,
    /// The registration's listing wish (shared with it); the entry is shown only when set.
    listed: Arc<AtomicBool>,
    health: watch::Sender<SessionHealth>,
    sessions_lost: Arc<AtomicU64>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                view: watch::channel(ServerMap::new()).0,
                view_health: watch::channel(SessionHealth::Connected).0,
            }),
        }
    }

    /// Test hook: the registration of `id` loses its connection (health `Disconnected`); its
    /// entry stays, as a ZooKeeper node does until the session times out. False if `id` has
    /// no live registration.
    pub fn disconnect_session(&self, id: &ServerId) -> bool {
        let state = self.shared.lock();
        match state.live_token(id) {
            Some(token) => {
                state.regs[&token]
                    .health
                    .send_replace(SessionHealth::Disconnected {
                        since: Instant::now(),
                    });
                true
            }
            None => false,
        }
    }

    /// Test hook: the session of `id` expires. Its entry leaves every view and its health is
    /// `Expired` until [`heal_session`](Self::heal_session). False if `id` has no live
    /// registration.
    pub fn expire_session(&self, id: &ServerId) -> bool {
        let mut state = self.shared.lock();
        let Some(token) = state.live_token(id) else {
            return false;
        };
        let Some(reg) = state.regs.get_mut(&token) else {
            return false;
        };
        reg.live = false;
        reg.sessions_lost.fetch_add(1, Ordering::SeqCst);
        reg.health.send_replace(SessionHealth::Expired);
        self.shared.publish(&state);
        true
    }

    /// Test hook: the network heals. An expired registration of `id` recreates its entry with
    /// its latest data; a disconnected one reconnects. False if there was nothing to heal or
    /// another live registration took the id meanwhile.
    pub fn heal_session(&self, id: &ServerId) -> bool {
        let mut state = self.shared.lock();
        if let Some(token) = state.live_token(id) {
            let health = &state.regs[&token].health;
            let was_disconnected = !health.borrow().is_connected();
            health.send_replace(SessionHealth::Connected);
            return was_disconnected;
        }
        let expired = state
            .regs
            .iter()
            .find(|(_, r)| !r.live && &r.server.id == id)
            .map(|(t, _)| *t);
        let Some(reg) = expired.and_then(|t| state.regs.get_mut(&t)) else {
            return false;
        };
        reg.live = true;
        reg.health.send_replace(SessionHealth::Connected);
        self.shared.publish(&state);
        true
    }

    /// Test hook: writes a node under the root bypassing the API, as another client (or a
    /// bug) could in ZooKeeper. Views decode it like ZooKeeper node data and skip it if bad.
    pub fn insert_raw_node(&self, name: &str, data: &[u8]) {
        let mut state = self.shared.lock();
        state.raw.insert(name.to_owned(), data.to_vec());
        self.shared.publish(&state);
    }
}

impl Registry for MemoryRegistry {
    async fn register(&self, server: LiveServer) -> Result<Registration, RegistryError> {
        validate_server_id(&server.id)?;
        let mut state = self.shared.lock();
        if state.live_token(&server.id).is_some() {
            return Err(RegistryError::AlreadyRegistered(server.id));
        }
        let token = state.next_token;
        state.next_token += 1;
        let (health_tx, health_rx) = watch::channel(SessionHealth::Connected);
        let sessions_lost = Arc::new(AtomicU64::new(0));
        let listed = Arc::new(AtomicBool::new(true));
        let id = server.id.clone();
        state.regs.insert(
            token,
            Reg {
                server,
                live: true,
                listed: listed.clone(),
                health: health_tx,
                sessions_lost: sessions_lost.clone(),
            },
        );
        self.shared.publish(&state);
        Ok(Registration {
            id,
            health: health_rx,
            sessions_lost,
            listed,
            backend: RegistrationBackend::Memory(MemoryHandle {
                shared: self.shared.clone(),
                token,
            }),
        })
    }

    async fn watch(&self) -> Result<RegistryView, RegistryError> {
        // An in-process view never loses its session.
        Ok(RegistryView {
            servers: self.shared.view.subscribe(),
            health: self.shared.view_health.subscribe(),
        })
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the maps consistent (every mutation is one
        // insert/remove/assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called with the lock held, so views see changes in the order they happened.
    fn publish(&self, state: &State) {
        let mut map = ServerMap::new();
        for (name, data) in &state.raw {
            if let Some(server) = decode_node(name, data) {
                map.insert(server.id.clone(), server);
            }
        }
        let shown = state
            .regs
            .values()
            .filter(|r| r.live && r.listed.load(Ordering::SeqCst));
        for reg in shown {
            map.insert(reg.server.id.clone(), reg.server.clone());
        }
        self.view.send_if_modified(|current| {
            if *current == map {
                false
            } else {
                *current = map;
                true
            }
        });
    }
}

impl State {
    fn live_token(&self, id: &ServerId) -> Option<u64> {
        self.regs
            .iter()
            .find(|(_, r)| r.live && &r.server.id == id)
            .map(|(t, _)| *t)
    }
}

/// The memory registration's side of a [`Registration`]; dropping it removes the entry.
#[derive(Debug)]
pub(super) struct MemoryHandle {
    shared: Arc<Shared>,
    token: u64,
}

impl MemoryHandle {
    pub(super) fn update(&self, connections: u32) -> Result<(), RegistryError> {
        let mut state = self.shared.lock();
        let Some(reg) = state.regs.get_mut(&self.token) else {
            return Err(RegistryError::Closed);
        };
        reg.server.connections = connections;
        if !reg.live {
            return Err(RegistryError::NotConnected);
        }
        self.shared.publish(&state);
        Ok(())
    }

    /// Stores the wish under the lock, so concurrent calls leave the wish and the views
    /// agreeing on the last one.
    pub(super) fn set_listed(&self, wish: &AtomicBool, listed: bool) -> Result<(), RegistryError> {
        let state = self.shared.lock();
        let Some(reg) = state.regs.get(&self.token) else {
            return Err(RegistryError::Closed);
        };
        wish.store(listed, Ordering::SeqCst);
        if !reg.live {
            // `heal_session` brings the entry back only if the wish says so.
            return Err(RegistryError::NotConnected);
        }
        self.shared.publish(&state);
        Ok(())
    }

    pub(super) fn deregister(self) {
        // Drop does the work.
    }
}

impl Drop for MemoryHandle {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        // Health is left as it was: a draining server keeps serving its sessions while they
        // move, so leaving the registry must not look like a lost session.
        if state.regs.remove(&self.token).is_some() {
            self.shared.publish(&state);
        }
    }
}
