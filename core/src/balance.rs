//! Balancing: which live server a logging-in user is sent to.
//!
//! (Skeleton with the final signature; the strategies land with the balancing work.)

use std::collections::BTreeMap;

use crate::ids::{ServerId, UserId};
use crate::registry::LiveServer;

/// How the route picks a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    RoundRobin,
    Random,
    ConsistentHash,
    LeastConnections,
}

#[derive(Debug)]
pub struct Balancer {
    strategy: Strategy,
    next: usize,
}

impl Balancer {
    /// `seed` feeds the random strategy (and nothing else).
    pub fn new(strategy: Strategy, seed: u64) -> Self {
        let _ = seed;
        Self { strategy, next: 0 }
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// A live server for `user`, or `None` when none is live.
    pub fn pick(
        &mut self,
        user: UserId,
        live: &BTreeMap<ServerId, LiveServer>,
    ) -> Option<ServerId> {
        let _ = user;
        if live.is_empty() {
            return None;
        }
        let i = self.next % live.len();
        self.next = self.next.wrapping_add(1);
        live.keys().nth(i).cloned()
    }
}
