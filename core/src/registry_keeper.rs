//! `RegistryKeeper`: a server's registry entry kept alive across connections and sessions,
//! sans I/O. One machine for every backend: the ZooKeeper registry runs it in production, the
//! simulation's registry host client in the sims, so the logic that decides when a server
//! calls its registry session lost (and fences) is the code both run.
//!
//! The keeper holds what the registry should show (the server's latest data and the listing
//! wish), the session's phase, the sessions this registration gave up on, and two timers. The
//! backend owns the transport: it opens sessions, notices a dropped connection and resumes the
//! session on a new one (ZooKeeper's client does that by itself), and runs the operations the
//! keeper asks for.
//!
//! # Phases
//!
//! - **Connected**: a session holds (or, unlisted, does not hold) the entry. Commands are
//!   applied at once through an operation (`Publish`, `Reconcile`, `Leave`).
//! - **Disconnected** at `since`: the session may still be alive on the ensemble. The keeper
//!   calls it lost at `since + session_timeout / 2`: the backend notices a silent link only
//!   after its connection timeout (2/5 of the session timeout), so that is about 0.9 session
//!   timeouts after the ensemble last heard from us — just before it expires the session and
//!   routes drop the entry. The server fences first, never after. A reconnect before then
//!   reconciles (a change may have been cut off midway, or an operator may have touched the
//!   node) and reports `Connected` again.
//! - **Establishing**: the session is lost (`SessionLost`, health `Expired`). The keeper asks
//!   for new sessions, set up as the listing wish says, with a capped exponential backoff
//!   between failed attempts, and reports `Connected` once one is up and matches.
//!
//! Commands that cannot be applied now (no connection) are answered `NotConnected` and marked
//! dirty: the next connected phase applies them.
//!
//! # Driving it
//!
//! After every `handle_*` call, drain [`RegistryKeeper::poll_output`] until `None`, carrying
//! out each output in order. An operation output (`Publish`, `Reconcile`, `Leave`) is
//! reported with [`RegistryKeeper::handle_op_done`] before any other input is fed (one
//! operation at a time); `Establish` is reported with
//! [`RegistryKeeper::handle_established`], and commands may be fed while it runs.
//! [`RegistryKeeper::poll_timeout`] names the one deadline; call `handle_timeout` when it
//! passes. After `Stop` the keeper takes no more inputs.

use std::collections::VecDeque;
use std::time::Duration;

use crate::time::Instant;

use crate::registry::LiveServer;

/// A backend's session id (ZooKeeper's session id, the simulated host's).
pub type SessionId = u64;

/// One session as the backend opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub id: SessionId,
    /// The negotiated session timeout: silent this long, the ensemble expires the session.
    pub timeout: Duration,
}

/// A capped exponential backoff: the first pause, doubled per failure up to the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    fn next(self, current: Duration) -> Duration {
        (current * 2).min(self.max)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeeperConfig {
    /// Pauses between failed attempts at a new session.
    pub establish: Backoff,
    /// Pauses before reconciling again after an operation failed while connected.
    pub repair: Backoff,
}

impl Default for KeeperConfig {
    fn default() -> Self {
        Self {
            establish: Backoff {
                first: Duration::from_millis(100),
                max: Duration::from_secs(2),
            },
            repair: Backoff {
                first: Duration::from_millis(200),
                max: Duration::from_secs(2),
            },
        }
    }
}

/// Names a command so its answer can find its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RequestId(pub u64);

/// Health of the registration's session, as the server fences on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeeperHealth {
    /// A session is up and the registry matches the registration (as far as it could be
    /// made to).
    Connected,
    /// The connection dropped at `since`; the session may still be alive.
    Disconnected { since: Instant },
    /// The session is gone; a new one is being set up.
    Expired,
}

/// How an operation failed, as the backend can tell.
#[derive(Debug)]
pub enum OpError<E> {
    /// The operation failed but the connection may be fine (a timeout, a refusal, the node
    /// held by another session): reconciled again on the repair timer.
    Failed(E),
    /// The connection broke; the session may live on.
    Disconnected(E),
    /// The session is gone.
    Expired,
}

/// A command's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum AnswerError<E> {
    /// No session is connected now; the change is kept and applied once one is.
    NotConnected,
    /// The backend's error of the operation that carried the command.
    Backend(E),
}

/// What the keeper asks of its driver.
#[derive(Debug, PartialEq, Eq)]
pub enum KeeperOutput<E> {
    /// Open a new session, close (or forget) the `previous` ones first (a node one of them
    /// still holds is this registration's), and leave it holding the entry with `server` if
    /// `listed`, holding none of this registration's otherwise. Report with
    /// `handle_established`.
    Establish {
        server: LiveServer,
        listed: bool,
        previous: Vec<SessionId>,
    },
    /// Make the registry match in the current session: listed, the node exists in it with
    /// `server` (`stale`: the node's data may be old, write it); unlisted, no node of this
    /// registration's sessions exists. Report with `handle_op_done`.
    Reconcile {
        server: LiveServer,
        listed: bool,
        stale: bool,
    },
    /// Write `server` to the node of the current session. Report with `handle_op_done`.
    Publish { server: LiveServer },
    /// Delete the node if the current session holds it, then close the session. Report with
    /// `handle_op_done`.
    Leave,
    /// The answer to a command.
    Answer {
        id: RequestId,
        result: Result<(), AnswerError<E>>,
    },
    /// The session's health changed.
    Health(KeeperHealth),
    /// `session` is lost (count it; drop its connection).
    SessionLost { session: SessionId },
    /// Serving ends. `close_session`: a session is connected; close it now rather than let
    /// it expire.
    Stop { close_session: bool },
}

/// Why `poll_timeout` wakes the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeeperTimer {
    /// Disconnected for half a session timeout: the session is lost.
    SessionLost,
    /// Reconcile again after a failed operation.
    Repair,
    /// Try a new session again.
    Establish,
}

#[derive(Debug)]
enum Phase {
    Connected {
        session: Session,
        /// `Connected` was reported for this connection. After a reconnect or a new session
        /// it is reported once the first reconcile is done.
        announced: bool,
    },
    Disconnected {
        session: Session,
        lost_at: Instant,
    },
    Establishing {
        /// The attempt in flight and what it was asked to set up; `None` while pausing.
        attempt: Option<(LiveServer, bool)>,
        retry_at: Option<Instant>,
        backoff: Duration,
    },
    Stopped,
}

/// The operation in flight, and whose command it carries.
#[derive(Debug, Clone, Copy)]
enum Busy {
    Publish(RequestId),
    Reconcile(Option<RequestId>),
    Leave(RequestId),
}

/// One server's registration; see the module docs.
#[derive(Debug)]
pub struct RegistryKeeper<E> {
    config: KeeperConfig,
    /// The latest data, written on every (re)creation of the entry.
    server: LiveServer,
    /// The listing wish.
    listed: bool,
    /// The registry may not reflect `server` or the listing wish: reconcile once connected.
    dirty: bool,
    phase: Phase,
    /// Sessions this registration gave up on and has not yet replaced: a node one of them
    /// still holds is ours.
    previous: Vec<SessionId>,
    busy: Option<Busy>,
    repair_at: Option<Instant>,
    repair_backoff: Duration,
    sessions_lost: u64,
    outputs: VecDeque<KeeperOutput<E>>,
}

impl<E> RegistryKeeper<E> {
    /// A registration whose `session` holds the entry with `server` (the backend registered
    /// it before handing over), listed. Its first output reports the health it starts with,
    /// `Connected`.
    pub fn new(config: KeeperConfig, server: LiveServer, session: Session) -> Self {
        let mut outputs = VecDeque::new();
        outputs.push_back(KeeperOutput::Health(KeeperHealth::Connected));
        Self {
            config,
            server,
            listed: true,
            dirty: false,
            phase: Phase::Connected {
                session,
                announced: true,
            },
            previous: Vec::new(),
            busy: None,
            repair_at: None,
            repair_backoff: config.repair.first,
            sessions_lost: 0,
            outputs,
        }
    }

    pub fn server(&self) -> &LiveServer {
        &self.server
    }

    pub fn is_listed(&self) -> bool {
        self.listed
    }

    /// The connected or disconnected session, `None` while establishing.
    pub fn session(&self) -> Option<Session> {
        match self.phase {
            Phase::Connected { session, .. } | Phase::Disconnected { session, .. } => Some(session),
            Phase::Establishing { .. } | Phase::Stopped => None,
        }
    }

    /// Whether a session is connected (operations can run).
    pub fn is_connected(&self) -> bool {
        matches!(self.phase, Phase::Connected { .. })
    }

    pub fn is_establishing(&self) -> bool {
        matches!(self.phase, Phase::Establishing { .. })
    }

    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    /// Sessions given up on and not yet replaced by a new one.
    pub fn previous_sessions(&self) -> &[SessionId] {
        &self.previous
    }

    /// How many sessions this registration has lost. It only grows.
    pub fn sessions_lost(&self) -> u64 {
        self.sessions_lost
    }

    pub fn poll_output(&mut self) -> Option<KeeperOutput<E>> {
        self.outputs.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<(Instant, KeeperTimer)> {
        match &self.phase {
            Phase::Connected { .. } if self.busy.is_none() => {
                self.repair_at.map(|at| (at, KeeperTimer::Repair))
            }
            Phase::Disconnected { lost_at, .. } => Some((*lost_at, KeeperTimer::SessionLost)),
            Phase::Establishing { retry_at, .. } => retry_at.map(|at| (at, KeeperTimer::Establish)),
            Phase::Connected { .. } | Phase::Stopped => None,
        }
    }

    /// The server now holds `connections` sessions (least-connections balancing reads it).
    pub fn handle_update(&mut self, _now: Instant, id: RequestId, connections: u32) {
        self.debug_idle();
        self.server.connections = connections;
        self.dirty = true;
        match self.phase {
            Phase::Connected { .. } if self.listed => {
                self.busy = Some(Busy::Publish(id));
                self.outputs.push_back(KeeperOutput::Publish {
                    server: self.server.clone(),
                });
            }
            // No node to write; it is created with this count when listed.
            Phase::Connected { .. } => self.answer(id, Ok(())),
            _ => self.answer(id, Err(AnswerError::NotConnected)),
        }
    }

    /// The registration's listing wish is now `listed` (the latest one stored: racing calls
    /// converge on it).
    pub fn handle_set_listed(&mut self, _now: Instant, id: RequestId, listed: bool) {
        self.debug_idle();
        self.listed = listed;
        // Dirty in every phase, also while establishing (ZooKeeper's keeper did not mark it
        // there, the simulated one did). A wish that arrives while an attempt runs may or may
        // not have been seen by it (the wish is stored by the caller before the command
        // reaches us), so the session reconciles once it is up; it costs one operation, and
        // a server that must not be listed (it lost its store) is never left listed on a
        // guess. The same rule as every other command that cannot be applied now.
        self.dirty = true;
        match self.phase {
            Phase::Connected { .. } => self.reconcile(Some(id)),
            _ => self.answer(id, Err(AnswerError::NotConnected)),
        }
    }

    /// Leave the registry: delete the entry, then close the session.
    pub fn handle_deregister(&mut self, _now: Instant, id: RequestId) {
        self.debug_idle();
        match self.phase {
            Phase::Connected { .. } => {
                self.busy = Some(Busy::Leave(id));
                self.outputs.push_back(KeeperOutput::Leave);
            }
            Phase::Disconnected { .. } => {
                // The two keepers differed here: ZooKeeper's tried the delete on a connection
                // known to be down (waiting up to an operation timeout for it to come back),
                // the simulated one answered `NotConnected`. The truth is `NotConnected`: the
                // session may still hold the entry, which lingers until the ensemble expires
                // it (at most a session timeout). Say so at once instead of stalling a
                // shutdown on a dead link.
                self.answer(id, Err(AnswerError::NotConnected));
                self.stop(false);
            }
            Phase::Establishing { .. } => {
                // Nothing to delete: the entry went with the lost session.
                self.answer(id, Ok(()));
                self.stop(false);
            }
            Phase::Stopped => {}
        }
    }

    /// The registration was dropped: stop serving (the session closes, its entry goes).
    pub fn handle_closed(&mut self, _now: Instant) {
        let close_session = self.is_connected();
        self.stop(close_session);
    }

    /// The connection dropped; the session may still be alive.
    pub fn handle_disconnected(&mut self, now: Instant) {
        self.debug_idle();
        if let Phase::Connected { session, .. } = self.phase {
            self.disconnect(now, session);
        }
    }

    /// The session is connected again (the same session, on a new connection).
    pub fn handle_reconnected(&mut self, _now: Instant) {
        self.debug_idle();
        let session = match self.phase {
            Phase::Connected { session, .. } | Phase::Disconnected { session, .. } => session,
            Phase::Establishing { .. } | Phase::Stopped => return,
        };
        self.phase = Phase::Connected {
            session,
            announced: false,
        };
        // We do not know what the registry holds now: a change may have been cut off midway,
        // an operator may have touched the node. The simulated keeper marked the registration
        // dirty here, ZooKeeper's reconciled without (rewriting the data only if a change was
        // pending). Dirty: the data is rewritten once per reconnect, and if this reconcile
        // fails the registration stays dirty until one succeeds.
        self.dirty = true;
        self.reconcile(None);
    }

    /// The backend says the session is gone (expired, closed, refused).
    pub fn handle_session_expired(&mut self, _now: Instant) {
        self.debug_idle();
        if let Phase::Connected { session, .. } | Phase::Disconnected { session, .. } = self.phase {
            self.lose(session);
        }
    }

    /// The result of the operation asked for last.
    pub fn handle_op_done(&mut self, now: Instant, result: Result<(), OpError<E>>) {
        let Some(busy) = self.busy.take() else {
            debug_assert!(false, "an operation result without an operation");
            return;
        };
        let session = match self.phase {
            Phase::Connected { session, .. } => session,
            _ => {
                debug_assert!(false, "an operation finished outside the connected phase");
                return;
            }
        };
        if let Busy::Leave(id) = busy {
            let result = result.map_err(|e| match e {
                OpError::Failed(e) | OpError::Disconnected(e) => AnswerError::Backend(e),
                OpError::Expired => AnswerError::NotConnected,
            });
            self.answer(id, result);
            // `Leave` closed the session already.
            self.stop(false);
            return;
        }
        let answer_to = match busy {
            Busy::Publish(id) => Some(id),
            Busy::Reconcile(id) => id,
            Busy::Leave(_) => unreachable!("handled above"),
        };
        let (answer, next) = match result {
            Ok(()) => {
                self.dirty = false;
                if matches!(busy, Busy::Reconcile(_)) {
                    // The registry matches: nothing left to repair. (The simulated keeper
                    // left a pending repair armed here, for one more redundant write.)
                    self.repair_at = None;
                    self.repair_backoff = self.config.repair.first;
                }
                (Ok(()), None)
            }
            Err(OpError::Failed(e)) => {
                // A capped doubling, as ZooKeeper's keeper did; the simulated one retried
                // every 200 ms for as long as the failure lasted (a node held by another
                // session: up to a session timeout of needless writes).
                self.repair_at = Some(now + self.repair_backoff);
                self.repair_backoff = self.config.repair.next(self.repair_backoff);
                (Err(AnswerError::Backend(e)), None)
            }
            Err(OpError::Disconnected(e)) => (Err(AnswerError::Backend(e)), Some(false)),
            Err(OpError::Expired) => (Err(AnswerError::NotConnected), Some(true)),
        };
        if let Some(id) = answer_to {
            self.answer(id, answer);
        }
        match next {
            None => self.announce(),
            Some(false) => self.disconnect(now, session),
            Some(true) => self.lose(session),
        }
    }

    /// The result of the last `Establish`.
    pub fn handle_established(&mut self, now: Instant, result: Result<Session, E>) {
        let Phase::Establishing {
            attempt,
            backoff,
            retry_at,
        } = &mut self.phase
        else {
            debug_assert!(
                false,
                "a session established outside the establishing phase"
            );
            return;
        };
        let Some((server, listed)) = attempt.take() else {
            debug_assert!(false, "a session established without an attempt");
            return;
        };
        match result {
            Ok(session) => {
                // The lost sessions are closed (or hold nothing and can create nothing: their
                // clients are gone) now that this one is set up, so stop carrying them.
                // ZooKeeper's keeper kept them for the registration's lifetime.
                self.previous.clear();
                // A change that arrived during the attempt is applied now.
                self.dirty = self.dirty || server != self.server || listed != self.listed;
                self.phase = Phase::Connected {
                    session,
                    announced: false,
                };
                if self.dirty {
                    self.reconcile(None);
                } else {
                    self.announce();
                }
            }
            Err(_) => {
                *retry_at = Some(now + *backoff);
                *backoff = self.config.establish.next(*backoff);
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Disconnected { session, lost_at } if *lost_at <= now => {
                // The ensemble has expired the session by now; we just cannot hear it.
                let session = *session;
                self.lose(session);
            }
            Phase::Connected { .. }
                if self.busy.is_none() && self.repair_at.is_some_and(|at| at <= now) =>
            {
                self.repair_at = None;
                self.reconcile(None);
            }
            Phase::Establishing {
                attempt, retry_at, ..
            } if attempt.is_none() && retry_at.is_some_and(|at| at <= now) => {
                *retry_at = None;
                self.attempt();
            }
            _ => {}
        }
    }

    fn reconcile(&mut self, id: Option<RequestId>) {
        self.busy = Some(Busy::Reconcile(id));
        self.outputs.push_back(KeeperOutput::Reconcile {
            server: self.server.clone(),
            listed: self.listed,
            stale: self.dirty,
        });
    }

    /// Reports `Connected` once per connection, after the first reconcile (if any).
    ///
    /// After a reconnect both keepers reported it after reconciling; for a new session
    /// ZooKeeper's reported it before, the simulated one after. After: `Connected` says the
    /// registry holds what the registration says (as far as it could be made to), and a
    /// server that fenced on the loss takes clients again only then.
    fn announce(&mut self) {
        if let Phase::Connected { announced, .. } = &mut self.phase
            && !*announced
        {
            *announced = true;
            self.outputs
                .push_back(KeeperOutput::Health(KeeperHealth::Connected));
        }
    }

    fn disconnect(&mut self, since: Instant, session: Session) {
        // The reconnect reconciles; retrying meanwhile would only time out.
        self.repair_at = None;
        self.repair_backoff = self.config.repair.first;
        self.phase = Phase::Disconnected {
            session,
            lost_at: since + session.timeout / 2,
        };
        self.outputs
            .push_back(KeeperOutput::Health(KeeperHealth::Disconnected { since }));
    }

    fn lose(&mut self, session: Session) {
        self.sessions_lost += 1;
        self.previous.push(session.id);
        self.repair_at = None;
        self.repair_backoff = self.config.repair.first;
        self.outputs.push_back(KeeperOutput::SessionLost {
            session: session.id,
        });
        self.outputs
            .push_back(KeeperOutput::Health(KeeperHealth::Expired));
        self.phase = Phase::Establishing {
            attempt: None,
            retry_at: None,
            backoff: self.config.establish.first,
        };
        self.attempt();
    }

    fn attempt(&mut self) {
        if let Phase::Establishing { attempt, .. } = &mut self.phase {
            *attempt = Some((self.server.clone(), self.listed));
            self.outputs.push_back(KeeperOutput::Establish {
                server: self.server.clone(),
                listed: self.listed,
                previous: self.previous.clone(),
            });
        }
    }

    fn answer(&mut self, id: RequestId, result: Result<(), AnswerError<E>>) {
        self.outputs.push_back(KeeperOutput::Answer { id, result });
    }

    fn stop(&mut self, close_session: bool) {
        if self.is_stopped() {
            return;
        }
        self.phase = Phase::Stopped;
        self.busy = None;
        self.outputs.push_back(KeeperOutput::Stop { close_session });
    }

    /// Inputs other than an operation's result wait until it is reported.
    fn debug_idle(&self) {
        debug_assert!(
            self.busy.is_none(),
            "an input fed while an operation is in flight"
        );
    }
}

#[cfg(test)]
mod tests;
