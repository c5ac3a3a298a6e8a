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
//!
//! A cluster connection comes from the store's [`Circuit`] for each call, and tells it how
//! every command went (see `circuit` for why).

use std::sync::Arc;

use ::redis::aio::{ConnectionLike, ConnectionManager};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{Arg, Cmd, Pipeline, RedisFuture, RedisResult, Value};
use cim_core::store::StoreUnavailable;

use super::circuit::Circuit;
use super::cluster::key_slot;

/// What a [`super::RedisStore`] holds: one node's connection manager, or a cluster's
/// connection behind its circuit.
pub(in crate::store) enum Backend {
    Single(ConnectionManager),
    Cluster(Arc<Circuit>),
}

impl Backend {
    /// The connection for one call; on a cluster, `StoreUnavailable` at once while the
    /// circuit is open.
    pub(super) async fn conn(&self) -> Result<Conn, StoreUnavailable> {
        Ok(match self {
            Self::Single(c) => Conn::Single(c.clone()),
            Self::Cluster(circuit) => Conn::Cluster(Sticky {
                conn: circuit.connection().await?,
                last: None,
                circuit: circuit.clone(),
            }),
        })
    }
}

/// One call's connection.
pub(in crate::store) enum Conn {
    Single(ConnectionManager),
    Cluster(Sticky),
}

/// A cluster connection that sends a keyless command where the previous keyed one went, and
/// reports each outcome to its circuit.
pub(in crate::store) struct Sticky {
    conn: ClusterConnection,
    last: Option<RoutingInfo>,
    circuit: Arc<Circuit>,
}

impl Sticky {
    /// `cmd` on the node `routing` names (reported to the circuit like every command).
    pub(super) async fn route_command(
        &mut self,
        cmd: Cmd,
        routing: RoutingInfo,
    ) -> RedisResult<Value> {
        let result = self.conn.route_command(cmd, routing).await;
        self.circuit.report(&result);
        result
    }

    fn reported<'a, T: Send + 'a>(
        circuit: Arc<Circuit>,
        call: RedisFuture<'a, T>,
    ) -> RedisFuture<'a, T> {
        Box::pin(async move {
            let result = call.await;
            circuit.report(&result);
            result
        })
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
        let circuit = self.circuit.clone();
        if let Some(node) = script_node(cmd) {
            self.last = Some(node);
            return Self::reported(circuit, self.conn.req_packed_command(cmd));
        }
        match &self.last {
            // Within one call, a command after a script call is that script's `SCRIPT LOAD`.
            Some(node) => {
                let (cmd, node) = (cmd.clone(), node.clone());
                Self::reported(
                    circuit,
                    Box::pin(async move { self.conn.route_command(cmd, node).await }),
                )
            }
            None => Self::reported(circuit, self.conn.req_packed_command(cmd)),
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
        let circuit = self.circuit.clone();
        Self::reported(
            circuit,
            self.conn.req_packed_commands(pipeline, offset, count),
        )
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
