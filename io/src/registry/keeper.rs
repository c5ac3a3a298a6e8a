//! What the ZooKeeper and the simulated registry's drivers share around
//! [`RegistryKeeper`]: the registration's command channel, the replies, the health watch
//! and the lost-session counter. Each driver owns its transport and runs the operations the
//! machine asks for; everything it decides is the machine's. Public so that a driver outside
//! this crate (the simulated registry in `cim-sim-hosts`) runs the same plumbing: it builds
//! a [`Shell`], hands [`Parts`] to [`Registration::from_keeper`](super::Registration::from_keeper),
//! and carries out each [`Effect`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cim_core::registry::LiveServer;
use cim_core::registry_keeper::{
    AnswerError, KeeperConfig, KeeperHealth, KeeperOutput, RegistryKeeper, RequestId, Session,
    SessionId,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::{RegistryError, SessionHealth};

type Reply = oneshot::Sender<Result<(), RegistryError>>;

#[derive(Debug)]
pub enum Cmd {
    Update(u32, Reply),
    /// Apply the registration's current listing wish (read from the shared flag when the
    /// command is served, so racing calls converge on the last wish stored).
    SetListed(Reply),
    Deregister(Reply),
}

/// The driver's side of a [`super::Registration`]: the keeper's command channel.
pub struct KeeperHandle {
    cmds: mpsc::Sender<Cmd>,
}

impl std::fmt::Debug for KeeperHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeeperHandle").finish_non_exhaustive()
    }
}

impl KeeperHandle {
    async fn ask(&self, make: impl FnOnce(Reply) -> Cmd) -> Result<(), RegistryError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(make(tx))
            .await
            .map_err(|_| RegistryError::Closed)?;
        rx.await.map_err(|_| RegistryError::Closed)?
    }

    pub async fn update(&self, connections: u32) -> Result<(), RegistryError> {
        self.ask(|tx| Cmd::Update(connections, tx)).await
    }

    pub async fn set_listed(&self) -> Result<(), RegistryError> {
        self.ask(Cmd::SetListed).await
    }

    pub async fn deregister(self) -> Result<(), RegistryError> {
        self.ask(Cmd::Deregister).await
    }
}

/// What the driver must do for the machine (everything else [`Shell::next_effect`] does
/// itself).
#[derive(Debug)]
pub enum Effect {
    Establish {
        server: LiveServer,
        listed: bool,
        previous: Vec<SessionId>,
    },
    Reconcile {
        server: LiveServer,
        listed: bool,
        stale: bool,
    },
    Publish {
        server: LiveServer,
    },
    Leave,
    /// A session was lost: drop its connection (the count and the health are done).
    SessionLost {
        session: SessionId,
    },
    Stop {
        close_session: bool,
    },
}

/// The machine and the registration's shared state.
pub struct Shell {
    pub machine: RegistryKeeper<RegistryError>,
    pub cmds: mpsc::Receiver<Cmd>,
    health: watch::Sender<SessionHealth>,
    sessions_lost: Arc<AtomicU64>,
    /// The registration's listing wish, stored by `Registration::set_listed` before it sends
    /// `Cmd::SetListed`.
    listed: Arc<AtomicBool>,
    replies: BTreeMap<RequestId, Reply>,
    next_request: u64,
}

/// The registration's ends of what a [`Shell`] serves.
#[derive(Debug)]
pub struct Parts {
    pub health: watch::Receiver<SessionHealth>,
    pub sessions_lost: Arc<AtomicU64>,
    pub listed: Arc<AtomicBool>,
    pub handle: KeeperHandle,
}

impl std::fmt::Debug for Shell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shell")
            .field("server", &self.machine.server().id)
            .finish_non_exhaustive()
    }
}

impl Shell {
    /// A keeper for `server`, registered (listed) in `session`.
    pub fn new(config: KeeperConfig, server: LiveServer, session: Session) -> (Self, Parts) {
        let (health_tx, health_rx) = watch::channel(SessionHealth::Connected);
        let (cmd_tx, cmd_rx) = mpsc::channel(16);
        let sessions_lost = Arc::new(AtomicU64::new(0));
        let listed = Arc::new(AtomicBool::new(true));
        let shell = Self {
            machine: RegistryKeeper::new(config, server, session),
            cmds: cmd_rx,
            health: health_tx,
            sessions_lost: sessions_lost.clone(),
            listed: listed.clone(),
            replies: BTreeMap::new(),
            next_request: 0,
        };
        let parts = Parts {
            health: health_rx,
            sessions_lost,
            listed,
            handle: KeeperHandle { cmds: cmd_tx },
        };
        (shell, parts)
    }

    /// Feeds a command (`None`: the registration is gone) to the machine.
    pub fn feed(&mut self, cmd: Option<Cmd>) {
        let now = now();
        let mut request = |reply: Reply| {
            self.next_request += 1;
            let id = RequestId(self.next_request);
            self.replies.insert(id, reply);
            id
        };
        match cmd {
            None => self.machine.handle_closed(now),
            Some(Cmd::Update(connections, reply)) => {
                let id = request(reply);
                self.machine.handle_update(now, id, connections);
            }
            Some(Cmd::SetListed(reply)) => {
                let id = request(reply);
                let listed = self.listed.load(Ordering::SeqCst);
                self.machine.handle_set_listed(now, id, listed);
            }
            Some(Cmd::Deregister(reply)) => {
                let id = request(reply);
                self.machine.handle_deregister(now, id);
            }
        }
    }

    /// Carries out the machine's outputs that need no transport (answers, health, the lost
    /// count) until one does, and returns that one.
    pub fn next_effect(&mut self) -> Option<Effect> {
        loop {
            let effect = match self.machine.poll_output()? {
                KeeperOutput::Answer { id, result } => {
                    let result = result.map_err(|e| match e {
                        AnswerError::NotConnected => RegistryError::NotConnected,
                        AnswerError::Backend(e) => e,
                    });
                    if let Some(reply) = self.replies.remove(&id) {
                        reply.send(result).ok();
                    }
                    continue;
                }
                KeeperOutput::Health(health) => {
                    let server = &self.machine.server().id;
                    let health = match health {
                        KeeperHealth::Connected => SessionHealth::Connected,
                        KeeperHealth::Disconnected { since } => {
                            tracing::warn!(server = %server, "registry connection lost");
                            SessionHealth::Disconnected {
                                since: crate::clock::tokio_instant(since),
                            }
                        }
                        KeeperHealth::Expired => SessionHealth::Expired,
                    };
                    self.health.send_replace(health);
                    continue;
                }
                KeeperOutput::SessionLost { session } => {
                    self.sessions_lost.fetch_add(1, Ordering::SeqCst);
                    tracing::warn!(server = %self.machine.server().id, session,
                        "registry session lost; opening a new one");
                    Effect::SessionLost { session }
                }
                KeeperOutput::Establish {
                    server,
                    listed,
                    previous,
                } => Effect::Establish {
                    server,
                    listed,
                    previous,
                },
                KeeperOutput::Reconcile {
                    server,
                    listed,
                    stale,
                } => Effect::Reconcile {
                    server,
                    listed,
                    stale,
                },
                KeeperOutput::Publish { server } => Effect::Publish { server },
                KeeperOutput::Leave => Effect::Leave,
                KeeperOutput::Stop { close_session } => Effect::Stop { close_session },
            };
            return Some(effect);
        }
    }
}

/// The machine's time: tokio's clock, so a simulation controls it.
pub fn now() -> cim_core::time::Instant {
    crate::clock::core_instant(tokio::time::Instant::now())
}
