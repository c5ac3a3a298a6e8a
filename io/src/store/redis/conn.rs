//! The one connection type every store step runs over: one node's `ConnectionManager`, or a
//! Redis Cluster connection. Both implement the crate's `aio::ConnectionLike`, so a step's
//! commands, scripts and pipelines are the same code in both modes.
//!
//! On a cluster the crate routes each command by its first key, and a pipeline by the first
//! keyed command in it (every command of a pipeline must be of one slot: see `cluster`), and
//! follows `MOVED` / `ASK` / `TRYAGAIN` itself, for pipelines too (the whole pipeline is sent
//! again, which is why every pipeline here is idempotent up to its script).
//!
//! What the crate does not do well on a cluster is reloading a script: `Script` answers
//! `NOSCRIPT` with a keyless `SCRIPT LOAD`, which the crate sends to *every* node and fails if
//! any one is down. So a cluster [`Conn`] is cloned fresh for each call and remembers where
//! its last keyed command (or pipeline) went; a keyless command after it (which, within one
//! call, is only that `SCRIPT LOAD`) goes to the same node: the one that said `NOSCRIPT`.

use ::redis::aio::{ConnectionLike, ConnectionManager};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use ::redis::{Cmd, Pipeline, RedisFuture, Value};
use futures::FutureExt as _;

#[derive(Clone)]
pub(in crate::store) enum Conn {
    Single(ConnectionManager),
    Cluster(Sticky),
}

/// A cluster connection that sends a keyless command where the previous keyed one went.
#[derive(Clone)]
pub(in crate::store) struct Sticky {
    pub(super) conn: ClusterConnection,
    last: Option<RoutingInfo>,
}

impl Sticky {
    pub(super) fn new(conn: ClusterConnection) -> Self {
        Self { conn, last: None }
    }
}

/// The node a command is for, when it names one by its key.
fn keyed(cmd: &Cmd) -> Option<RoutingInfo> {
    match RoutingInfo::for_routable(cmd)? {
        r @ RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(_)) => Some(r),
        _ => None,
    }
}

impl ConnectionLike for Sticky {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let routing = match keyed(cmd) {
            Some(route) => {
                self.last = Some(route.clone());
                Some(route)
            }
            None => self.last.clone(),
        };
        match routing {
            Some(routing) => self.conn.route_command(cmd.clone(), routing).boxed(),
            // Keyless and first (PING, INFO, SCAN by address are routed by their callers):
            // as the crate routes it.
            None => self.conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        if let Some(route) = pipeline.cmd_iter().find_map(keyed) {
            self.last = Some(route);
        }
        self.conn.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        0
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}
