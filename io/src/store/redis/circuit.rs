//! The cluster connection behind a circuit breaker.
//!
//! Why: the `redis` crate's cluster client (1.8) busy-loops once no node answers. A request
//! that fails on a dead node starts a slot refresh; when the refresh fails too, the client's
//! background task starts another one at once and wakes itself, forever, logging an ERROR
//! line each time (`cluster_handling/async_connection/mod.rs`, `poll_recover` and
//! `poll_flush`). Measured: about 1.9 s of CPU in 5 s, and ~100 ms of CPU per failed
//! request. Only dropping the connection (every clone of it: that aborts its task) stops it.
//!
//! So the store keeps its cluster connection here. When nothing has succeeded for
//! [`TRIP_AFTER`] and a call fails as if the cluster were unreachable (I/O error, refused or
//! dropped connection, timeout, no connection found), the circuit checks (in a task of its
//! own, calls still going through) whether a fresh connection to the cluster's URLs can be
//! made. If it cannot, the circuit **opens**: the connection is dropped, one warning is
//! logged, and every call fails at once (counted in
//! [`CircuitStats::refused`], which the processes export as `cim_*_store_refused_total`)
//! without reaching the crate. After a backoff (doubling from [`FIRST_BACKOFF`] to
//! [`MAX_BACKOFF`]) one call reconnects from the cluster's URLs; if that works, the circuit
//! closes and one line says so. The others keep failing fast meanwhile.
//!
//! One master's death does not open it: calls to the other masters keep succeeding, so
//! "nothing succeeded for [`TRIP_AFTER`]" stays false; and should a process only have
//! talked to the dead master's slots lately, the check's fresh connection succeeds through
//! the live nodes. (So list several nodes in `--redis-cluster`: the check connects through
//! those URLs only.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{ErrorKind, RedisError};
use cim_core::store::StoreUnavailable;
use tokio::time::Instant;

/// How long nothing must have succeeded before an unreachable-looking failure opens the
/// circuit. Short, because the crate spins from the first failed refresh on; long enough
/// that a busy process with one dead master (whose other calls succeed) never opens it.
pub(super) const TRIP_AFTER: Duration = Duration::from_millis(200);
/// The first wait before a reconnect, doubled after each failed one.
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between reconnects: how late, at most, a process notices that the
/// cluster is back.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// What the circuit has done since the process started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CircuitStats {
    /// Whether calls are refused at once now.
    pub open: bool,
    /// Times the circuit opened (the cluster looked unreachable).
    pub opened: u64,
    /// Calls refused at once while it was open: they never reached Redis.
    pub refused: u64,
    /// Calls handed to the cluster client (each may be several round trips).
    pub calls: u64,
    /// Connection attempts to the cluster, the first one at start included.
    pub connects: u64,
}

enum State {
    /// Calls go through `conn`.
    Closed {
        conn: ClusterConnection,
        last_ok: Instant,
        /// A check of whether the cluster is reachable at all is running.
        checking: bool,
    },
    /// Calls are refused until `retry_at`; then one reconnects.
    Open {
        retry_at: Instant,
        backoff: Duration,
    },
    /// One call is reconnecting; the others are refused.
    Probing,
}

pub(super) struct Circuit {
    client: ClusterClient,
    /// Bound on one reconnect.
    connect_budget: Duration,
    state: Mutex<State>,
    opened: AtomicU64,
    refused: AtomicU64,
    calls: AtomicU64,
    connects: AtomicU64,
}

/// Whether `e` says a node could not be reached (as opposed to an answer from a live node,
/// such as `NOSCRIPT`, `MOVED` or a script error).
pub(super) fn looks_unreachable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || e.is_timeout()
        || matches!(e.kind(), ErrorKind::ClusterConnectionNotFound)
}

impl Circuit {
    /// A closed circuit around `conn`, which `client` made (one connect counted).
    pub(super) fn new(
        client: ClusterClient,
        conn: ClusterConnection,
        connect_budget: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            client,
            connect_budget,
            state: Mutex::new(State::Closed {
                conn,
                last_ok: Instant::now(),
                checking: false,
            }),
            opened: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            connects: AtomicU64::new(1),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a thread panicked between two assignments of a whole
        // state: the state itself is still one of the three.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn stats(&self) -> CircuitStats {
        CircuitStats {
            open: !matches!(*self.state(), State::Closed { .. }),
            opened: self.opened.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            calls: self.calls.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
        }
    }

    /// The connection for one call, or at once `StoreUnavailable` while the circuit is open
    /// (the call that finds the backoff over reconnects first).
    pub(super) async fn connection(
        self: &Arc<Self>,
    ) -> Result<ClusterConnection, StoreUnavailable> {
        let now = Instant::now();
        let backoff = {
            let mut state = self.state();
            match &*state {
                State::Closed { conn, .. } => {
                    self.calls.fetch_add(1, Ordering::Relaxed);
                    return Ok(conn.clone());
                }
                State::Open { retry_at, backoff } if now >= *retry_at => {
                    let backoff = *backoff;
                    *state = State::Probing;
                    backoff
                }
                State::Open { retry_at, .. } => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(StoreUnavailable(format!(
                        "redis cluster unreachable: next reconnect in {} ms",
                        retry_at.duration_since(now).as_millis()
                    )));
                }
                State::Probing => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(StoreUnavailable(
                        "redis cluster unreachable: reconnecting".into(),
                    ));
                }
            }
        };
        // If this call is dropped mid-reconnect, the guard opens the circuit again so that a
        // later call retries (rather than staying `Probing` forever).
        let mut guard = ProbeGuard {
            circuit: self,
            backoff,
            done: false,
        };
        self.connects.fetch_add(1, Ordering::Relaxed);
        let attempt =
            tokio::time::timeout(self.connect_budget, self.client.get_async_connection()).await;
        guard.done = true;
        match attempt {
            Ok(Ok(conn)) => {
                *self.state() = State::Closed {
                    conn: conn.clone(),
                    last_ok: Instant::now(),
                    checking: false,
                };
                tracing::info!("redis cluster reachable again: store calls go through");
                self.calls.fetch_add(1, Ordering::Relaxed);
                Ok(conn)
            }
            Ok(Err(e)) => {
                self.reopen(backoff);
                Err(StoreUnavailable(format!(
                    "redis cluster still unreachable: {e}"
                )))
            }
            Err(_) => {
                self.reopen(backoff);
                Err(StoreUnavailable(format!(
                    "redis cluster still unreachable: no connection within {:?}",
                    self.connect_budget
                )))
            }
        }
    }

    fn reopen(&self, backoff: Duration) {
        let next = (backoff * 2).min(MAX_BACKOFF);
        *self.state() = State::Open {
            retry_at: Instant::now() + next,
            backoff: next,
        };
    }

    /// What one call through the connection came to: a success keeps the circuit closed; an
    /// unreachable-looking failure with nothing succeeding for [`TRIP_AFTER`] starts a check
    /// that opens it if no fresh connection can be made.
    pub(super) fn report<T>(self: &Arc<Self>, result: &Result<T, RedisError>) {
        let now = Instant::now();
        let mut state = self.state();
        let State::Closed {
            last_ok, checking, ..
        } = &mut *state
        else {
            return;
        };
        match result {
            Ok(_) => *last_ok = now,
            Err(e)
                if !*checking
                    && looks_unreachable(e)
                    && now.duration_since(*last_ok) >= TRIP_AFTER =>
            {
                *checking = true;
                let reason = e.to_string();
                drop(state);
                let circuit = self.clone();
                tokio::spawn(async move { circuit.check(reason).await });
            }
            Err(_) => {}
        }
    }

    /// Whether a fresh connection to the cluster can be made; opens the circuit if not.
    async fn check(self: Arc<Self>, reason: String) {
        self.connects.fetch_add(1, Ordering::Relaxed);
        let fresh =
            tokio::time::timeout(self.connect_budget, self.client.get_async_connection()).await;
        let mut state = self.state();
        let State::Closed {
            last_ok, checking, ..
        } = &mut *state
        else {
            return;
        };
        *checking = false;
        if matches!(fresh, Ok(Ok(_))) {
            // Some node answers: the failures were one part of the cluster (the calls to it
            // keep failing on their own); the connection in use stays.
            *last_ok = Instant::now();
            return;
        }
        let quiet = last_ok.elapsed();
        // Dropping the connection here (and the clones of calls in flight as they end)
        // aborts the crate's task, which is what stops its spinning.
        *state = State::Open {
            retry_at: Instant::now() + FIRST_BACKOFF,
            backoff: FIRST_BACKOFF,
        };
        drop(state);
        self.opened.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            error = %reason,
            "redis cluster unreachable (no store call succeeded for {} ms, and no new \
             connection could be made): store calls fail at once until a reconnect works \
             (tried every {} ms at most; refusals are counted in the store_refused_total \
             metric, not logged)",
            quiet.as_millis(),
            MAX_BACKOFF.as_millis()
        );
    }
}

/// Puts a reconnect that was dropped half way back to `Open`, due at once.
struct ProbeGuard<'a> {
    circuit: &'a Circuit,
    backoff: Duration,
    done: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            *self.circuit.state() = State::Open {
                retry_at: Instant::now(),
                backoff: self.backoff,
            };
        }
    }
}
