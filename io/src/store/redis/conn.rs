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
//! any one is down. So a cluster [`Conn`] is cloned fresh for each call and remembers the
//! slot of its last script call (alone or in a pipeline); a command after it (which, within
//! one call, is only that `SCRIPT LOAD`) goes to that slot's master: the node that said
//! `NOSCRIPT`, or the one a redirection since made the slot's.

use ::redis::aio::{ConnectionLike, ConnectionManager};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{Arg, Cmd, Pipeline, RedisFuture, Value};
use futures::FutureExt as _;

use super::cluster::key_slot;

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

/// The slot's master a script call (`EVALSHA` or `EVAL` with keys) goes to: where a
/// `NOSCRIPT` from it must be answered by loading the script. Every other command is routed
/// by the crate alone.
fn script_node(cmd: &Cmd) -> Option<RoutingInfo> {
    let mut args = cmd.args_iter().map(|a| match a {
        Arg::Simple(bytes) => Some(bytes),
        _ => None,
    });
    let name = args.next()??;
    if !name.eq_ignore_ascii_case(b"EVALSHA") && !name.eq_ignore_ascii_case(b"EVAL") {
        return None;
    }
    let _script = args.next()??;
    let keys: usize = std::str::from_utf8(args.next()??).ok()?.parse().ok()?;
    if keys == 0 {
        return None;
    }
    let key = std::str::from_utf8(args.next()??).ok()?;
    Some(RoutingInfo::SingleNode(
        SingleNodeRoutingInfo::SpecificNode(Route::new(key_slot(key), SlotAddr::Master)),
    ))
}

impl ConnectionLike for Sticky {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        if let Some(node) = script_node(cmd) {
            self.last = Some(node);
            return self.conn.req_packed_command(cmd);
        }
        match &self.last {
            // Within one call, a command after a script call is that script's `SCRIPT LOAD`.
            Some(node) => self.conn.route_command(cmd.clone(), node.clone()).boxed(),
            None => self.conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        if let Some(node) = pipeline.cmd_iter().find_map(script_node) {
            self.last = Some(node);
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
