//! Records a run into a [`History`] for the checker, plus the counters of what it exercised.
//!
//! One [`Recorder`] per run, shared by every host of the simulation (turmoil runs them all on
//! one thread, in a seeded order, so the recording order is deterministic too):
//!
//! - servers report session spans through [`Recorder::session_observer`] (the shell's
//!   `ServerOptions::observer`), and the harness closes a crashed server's open spans with
//!   [`Recorder::server_died`] (an aborted server reports nothing);
//! - clients report every [`ClientEvent`] with [`Recorder::client_event`] (acks become
//!   [`AckedSend`]s);
//! - the harness reports faults with [`Recorder::fault`].
//!
//! [`trace_hash`] fingerprints a history, for the determinism check.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use cim_core::client::{ClientEvent, ConnectionLoss, KickReason, LoginFailure, StopReason};
use cim_core::ids::{ClientMsgId, ConvId, ServerId, UserId};
use cim_core::route::login::LoginError;
use cim_io::server::{SessionEvent, SessionObserver};

use crate::checker::{
    AckedSend, ClientHistory, ClientId, Fault, History, Rejection, SessionSpan, SimTime, Submission,
};

/// Named counts of what a run exercised ("server crashed", "takeover", ...). Summed over a
/// sweep.
pub type Counters = BTreeMap<&'static str, u64>;

/// Adds `from` into `into` (counters named "max ..." keep the largest instead).
pub fn add_counters(into: &mut Counters, from: &Counters) {
    for (name, n) in from {
        add_count(into, *name, *n);
    }
}

/// Adds `n` to counter `name` of a sweep's totals ("max ..." keeps the largest instead).
pub fn add_count<K: Ord + AsRef<str>>(into: &mut BTreeMap<K, u64>, name: K, n: u64) {
    let is_max = name.as_ref().starts_with("max ");
    let total = into.entry(name).or_default();
    if is_max {
        *total = (*total).max(n);
    } else {
        *total += n;
    }
}

#[derive(Debug, Default)]
struct Recording {
    history: History,
    /// (server, conn) -> index of its open span in `history.sessions`.
    open: BTreeMap<(ServerId, u64), usize>,
    counters: Counters,
    per_client: BTreeMap<ClientId, Counters>,
    /// Events after this time are not recorded (the run's end).
    end: Option<SimTime>,
    /// Clients whose events are printed to stderr as they happen (`SIM_TRACE=0,3`).
    trace_clients: Option<Vec<u32>>,
}

/// The shared recording of one run. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    inner: Arc<Mutex<Recording>>,
}

/// Simulated time now, from inside a host (zero outside the simulation).
pub fn sim_now() -> SimTime {
    turmoil::sim_elapsed().unwrap_or_default()
}

impl Recorder {
    /// A recorder; `SIM_TRACE=<client ids, comma-separated>` prints those clients' events
    /// to stderr while the run goes (for reading a failing seed's story).
    pub fn new() -> Self {
        let recorder = Self::default();
        recorder.lock().trace_clients = std::env::var("SIM_TRACE")
            .ok()
            .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect());
        recorder
    }

    fn lock(&self) -> MutexGuard<'_, Recording> {
        // A panic while recording is already a failed run; keep what is there.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops recording client events after `end`.
    pub fn set_end(&self, end: SimTime) {
        self.lock().end = Some(end);
    }

    pub fn count(&self, name: &'static str) {
        *self.lock().counters.entry(name).or_default() += 1;
    }

    pub fn count_n(&self, name: &'static str, n: u64) {
        *self.lock().counters.entry(name).or_default() += n;
    }

    /// Registers a client instance (so a client that saw nothing still has a history).
    pub fn add_client(&self, client: ClientId, user: UserId) {
        let mut r = self.lock();
        if !r.history.clients.iter().any(|c| c.client == client) {
            r.history.clients.push(ClientHistory::new(client, user));
        }
    }

    /// The observer for server `server`'s shell: spans from LoginOk to close.
    pub fn session_observer(&self, server: &ServerId) -> SessionObserver {
        let recorder = self.clone();
        let server = server.clone();
        SessionObserver(Arc::new(move |event| {
            recorder.session_event(&server, sim_now(), event)
        }))
    }

    fn session_event(&self, server: &ServerId, at: SimTime, event: SessionEvent) {
        let mut r = self.lock();
        match event {
            SessionEvent::Opened { user, epoch, conn } => {
                let index = r.history.sessions.len();
                r.history.sessions.push(SessionSpan {
                    user,
                    server: server.clone(),
                    epoch,
                    opened_at: at,
                    closed_at: None,
                });
                r.open.insert((server.clone(), conn.0), index);
                *r.counters.entry("sessions opened").or_default() += 1;
            }
            SessionEvent::Closed { conn, .. } => {
                if let Some(index) = r.open.remove(&(server.clone(), conn.0)) {
                    r.history.sessions[index].closed_at = Some(at);
                }
            }
        }
    }

    /// The open session of `user`, if any: (server, epoch).
    pub fn open_session_of(&self, user: UserId) -> Option<ServerId> {
        let r = self.lock();
        r.open
            .values()
            .map(|&i| &r.history.sessions[i])
            .find(|s| s.user == user)
            .map(|s| s.server.clone())
    }

    /// A server's process died at `at`: its sessions end with it.
    pub fn server_died(&self, server: &ServerId, at: SimTime) {
        let mut r = self.lock();
        let gone: Vec<(ServerId, u64)> = r
            .open
            .keys()
            .filter(|(s, _)| s == server)
            .cloned()
            .collect();
        for key in gone {
            if let Some(index) = r.open.remove(&key) {
                r.history.sessions[index].closed_at = Some(at);
            }
        }
        r.history
            .faults
            .push((at, Fault::ServerDied(server.clone())));
    }

    pub fn fault(&self, at: SimTime, fault: Fault) {
        self.lock().history.faults.push((at, fault));
    }

    /// One event a client's application saw, at `at`.
    pub fn client_event(&self, client: ClientId, user: UserId, at: SimTime, event: &ClientEvent) {
        let mut r = self.lock();
        if r.trace_clients
            .as_ref()
            .is_some_and(|t| t.contains(&client.0))
        {
            eprintln!("{} {client} (user {user}): {event:?}", secs(at));
        }
        if r.end.is_some_and(|end| at > end) {
            return;
        }
        if let Some(name) = counter_of(event) {
            *r.counters.entry(name).or_default() += 1;
            *r.per_client
                .entry(client)
                .or_default()
                .entry(name)
                .or_default() += 1;
        }
        if let ClientEvent::Acked {
            msg_id,
            conv,
            log_epoch,
            seq,
        } = event
        {
            r.history.acks.push(AckedSend {
                sender: user,
                conv: conv.clone(),
                msg_id: *msg_id,
                log_epoch: *log_epoch,
                seq: *seq,
                acked_at: at,
            });
        }
        if let ClientEvent::Rejected { msg_id, .. } = event {
            r.history.rejections.push(Rejection {
                client,
                sender: user,
                msg_id: *msg_id,
                at,
            });
        }
        let index = match r.history.clients.iter().position(|c| c.client == client) {
            Some(i) => i,
            None => {
                r.history.clients.push(ClientHistory::new(client, user));
                r.history.clients.len() - 1
            }
        };
        r.history.clients[index].record(at, event);
    }

    /// A message `client`'s application submitted (call in submission order).
    pub fn submitted(&self, client: ClientId, sender: UserId, conv: ConvId, msg_id: ClientMsgId) {
        let at = sim_now();
        let mut r = self.lock();
        if r.end.is_some_and(|end| at > end) {
            return;
        }
        *r.counters.entry("messages submitted").or_default() += 1;
        r.history.submissions.push(Submission {
            client,
            sender,
            conv,
            msg_id,
            at,
        });
    }

    /// The recording so far (the harness completes membership, final logs and bounds).
    pub fn history(&self) -> History {
        self.lock().history.clone()
    }

    pub fn counters(&self) -> Counters {
        self.lock().counters.clone()
    }

    /// What one client's events counted.
    pub fn client_counters(&self, client: ClientId) -> Counters {
        self.lock()
            .per_client
            .get(&client)
            .cloned()
            .unwrap_or_default()
    }

    /// The events one client saw, for scenario-specific checks.
    pub fn client(&self, client: ClientId) -> Option<ClientHistory> {
        self.lock()
            .history
            .clients
            .iter()
            .find(|c| c.client == client)
            .cloned()
    }
}

/// The counter a client event adds to, if any.
fn counter_of(event: &ClientEvent) -> Option<&'static str> {
    Some(match event {
        ClientEvent::Online { .. } => "client logins",
        ClientEvent::Kicked(KickReason::TakenOver) => "kicked: taken over",
        ClientEvent::Kicked(KickReason::Fenced) => "kicked: fenced",
        ClientEvent::Kicked(KickReason::Idle) => "kicked: idle",
        ClientEvent::Kicked(_) => "kicked: other",
        ClientEvent::Stopped(StopReason::TakenOver) => "stopped: taken over",
        ClientEvent::Stopped(_) => "stopped: other",
        ClientEvent::Reconnecting { cause, .. } => match cause {
            ConnectionLoss::LoginFailed(LoginFailure::Rejected(LoginError::RepeatLogin)) => {
                "login 5000 (repeat)"
            }
            ConnectionLoss::LoginFailed(_) | ConnectionLoss::LoginTimeout => {
                "login failed/timed out"
            }
            ConnectionLoss::HeartbeatTimeout => "heartbeat timeouts",
            ConnectionLoss::Disconnected => "disconnects",
            ConnectionLoss::ConnectFailed | ConnectionLoss::ConnectTimeout => "connect failed",
            _ => "reconnects: other",
        },
        ClientEvent::Unavailable { .. } => "unavailable ranges",
        ClientEvent::LogReset { .. } => "log resets",
        ClientEvent::LogMoved { lost: 0, .. } => "log moves continued",
        ClientEvent::LogMoved { .. } => "log moves that lost messages",
        _ => return None,
    })
}

/// FNV-1a over the history's debug form: equal for equal histories, stable across runs and
/// platforms.
pub fn trace_hash(history: &History) -> u64 {
    let text = format!("{history:?}");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `d` as seconds with milliseconds.
pub fn secs(d: Duration) -> String {
    format!("{}.{:03}s", d.as_secs(), d.subsec_millis())
}
