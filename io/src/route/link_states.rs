//! Each live server's link as its task last saw it, for `/health/ready` and the log.

use cim_core::ids::ServerId;

/// What a link's failures most likely mean, for `/health/ready` and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FailureCause {
    /// The challenge-response failed: the link secrets differ.
    Secret,
    /// The TLS handshake failed: a certificate (or CA) does not match.
    Certificate,
    /// Nothing answered at the server's link port.
    Unreachable,
    Other,
}

impl FailureCause {
    /// What an operator should check, in words.
    pub(super) fn hint(self) -> &'static str {
        match self {
            Self::Secret => {
                "the server refused this route's link authentication: the link secret \
                 (CIM_LINK_SECRET / --link-secret) most likely differs between this route and \
                 the server"
            }
            Self::Certificate => {
                "the TLS handshake on the link failed: check --tls-cert / --tls-ca on this \
                 route and the server (each must trust the other's CA and carry its role)"
            }
            Self::Unreachable => {
                "nothing answers at the server's link port (--link-port, advertised host): \
                 the server is down or a firewall is in the way"
            }
            Self::Other => "see the route's log for the link error",
        }
    }
}

/// Each live server's link as its task last saw it: up, or failing (and why). Kept by the
/// link tasks; read by `/health/ready`.
#[derive(Debug, Default)]
pub(super) struct LinkStates(
    std::sync::Mutex<std::collections::BTreeMap<ServerId, (u64, LinkState)>>,
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum LinkState {
    /// Dialling for the first time (or again after a link that was up went down).
    Dialling,
    Up,
    /// The latest attempt failed.
    Failing(FailureCause),
}

impl LinkStates {
    /// `generation`: the link task's, so a replaced task ending late cannot touch the entry
    /// of the task that replaced it.
    pub(super) fn set(&self, server: &ServerId, generation: u64, state: LinkState) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(server.clone(), (generation, state));
    }

    pub(super) fn remove(&self, server: &ServerId, generation: u64) {
        let mut states = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if states.get(server).is_some_and(|(g, _)| *g == generation) {
            states.remove(server);
        }
    }

    /// The state of every link whose task runs.
    pub(super) fn snapshot(&self) -> Vec<(ServerId, LinkState)> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(id, (_, state))| (id.clone(), *state))
            .collect()
    }
}
