//! Redis Cluster: connecting, and what a step does differently when its keys span slots.
//!
//! Every script touches the keys of one hash tag (see the key layout in [`crate::store`]), so
//! each runs unchanged on the slot's master. What spans tags is split here:
//!
//! - a batch of single-key reads or writes of several users or conversations (a pipeline on
//!   one node) becomes one pipeline per slot, sent at once ([`RedisStore::query_each`]);
//! - a multi-user script (`RefreshLeases`, `LoadRoutes`) becomes one call per slot, also sent
//!   at once ([`RedisStore::per_slot`]), and its outcomes are put back in the caller's order;
//! - `SCAN` (`ListOnline`, the migration's name scan) runs on every master, or on the master
//!   of the `{names}` slot ([`RedisStore::scan_page`]).
//!
//! On one node all of these stay one round trip, as before.

use std::future::Future;

use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use ::redis::{Cmd, FromRedisValue};

use super::circuit::Circuit;
use super::conn::{Backend, Conn};
use super::*;

/// Calls of one split step in flight at once (each is one slot's pipeline or script).
const SPLIT_CONCURRENCY: usize = 64;

/// The hash slot of `key` (Redis's rule, shared with the simulation's sharded store).
pub(super) use cim_core::slots::key_slot;

impl RedisStore {
    /// Connects to a Redis Cluster through any of `urls` (the crate learns the rest of the
    /// nodes from them), over TLS for `rediss://` URLs as `options.tls` says, and checks that
    /// no master will evict keys, as [`Self::connect`] does for one node. All URLs must use
    /// one scheme and the same credentials.
    pub async fn connect_cluster(
        urls: &[String],
        options: RedisOptions,
    ) -> Result<Self, ConnectError> {
        let Some(first) = urls.first() else {
            return Err(ConnectError::Url {
                url: String::new(),
                reason: "a Redis Cluster needs at least one node's URL".into(),
            });
        };
        let shown = urls
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(",");
        let mut infos = Vec::with_capacity(urls.len());
        let mut tls = None;
        for url in urls {
            let (info, is_tls) = parse_url(url, &options)?;
            if tls.is_some_and(|t| t != is_tls) {
                return Err(ConnectError::Url {
                    url: shown,
                    reason: "the cluster's URLs mix redis:// and rediss://: use one scheme".into(),
                });
            }
            tls = Some(is_tls);
            infos.push(info);
        }
        let tls = tls.unwrap_or(false);
        let mut builder = ClusterClientBuilder::new(infos)
            .connection_timeout(options.connect_timeout)
            .response_timeout(options.command_timeout);
        if tls {
            builder = builder.certs(options.tls.certificates());
        }
        let client = builder.build().map_err(|e| ConnectError::Url {
            url: redact_url(first),
            reason: e.to_string(),
        })?;
        let unreachable = |reason: String| ConnectError::Unreachable {
            url: shown.clone(),
            reason,
        };
        let budget = options.connect_timeout.saturating_mul(4);
        let conn = tokio::time::timeout(budget, client.get_async_connection())
            .await
            .map_err(|_| unreachable(format!("no cluster connection within {budget:?}")))?
            .map_err(|e| unreachable(explain_connect_failure(tls, &e)))?;
        let backend = Backend::Cluster(Circuit::new(client, conn, budget));
        let mut conn = backend.conn().await.map_err(|e| unreachable(e.0))?;
        // `INFO` goes to every master; the crate answers with one reply per node.
        let infos: Value = tokio::time::timeout(
            budget,
            ::redis::cmd("INFO").arg("memory").query_async(&mut conn),
        )
        .await
        .map_err(|_| unreachable(format!("no answer to INFO within {budget:?}")))?
        .map_err(|e| unreachable(explain_connect_failure(tls, &e)))?;
        for (node, info) in per_node_text(&infos) {
            let policy = info
                .lines()
                .find_map(|line| line.trim().strip_prefix("maxmemory_policy:"))
                .unwrap_or_default()
                .to_owned();
            if policy != "noeviction" && !options.allow_eviction {
                return Err(ConnectError::EvictionPolicy {
                    url: format!("{shown} (node {node})"),
                    policy,
                });
            }
        }
        Ok(Self::with_backend(backend, options))
    }

    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// Indices of `keys` grouped by slot, in slot order: one group holding everything on a
    /// single node.
    fn slot_groups(&self, keys: &[String]) -> Vec<Vec<usize>> {
        if !self.is_cluster() {
            return vec![(0..keys.len()).collect()];
        }
        crate::store::split::group_by(keys, |key| key_slot(key))
    }

    /// Runs `step` on `items` split per slot of their `keys` (one key per item; all items at
    /// once on a single node), the slots' calls concurrently; `step` returns one output per
    /// item it was given, and the outputs come back in `items`' order. Atomic per call only:
    /// on a cluster, items of different slots are separate steps. Any failed call fails the
    /// whole step.
    pub(super) async fn per_slot<'i, I, O, Fut>(
        &self,
        items: &'i [I],
        keys: Vec<String>,
        step: impl Fn(Vec<&'i I>) -> Fut,
    ) -> R<Vec<O>>
    where
        Fut: Future<Output = R<Vec<O>>>,
    {
        self.split(items, keys, step, None::<fn(&I) -> O>).await
    }

    /// As [`Self::per_slot`], but the items of a slot whose call failed get `unknown(item)`
    /// rather than failing the step, so that one dead master does not fail the users of the
    /// others. Fails only if every call failed (on one node: if its one call did).
    pub(super) async fn per_slot_or<'i, I, O, Fut>(
        &self,
        items: &'i [I],
        keys: Vec<String>,
        step: impl Fn(Vec<&'i I>) -> Fut,
        unknown: impl Fn(&I) -> O,
    ) -> R<Vec<O>>
    where
        Fut: Future<Output = R<Vec<O>>>,
    {
        self.split(items, keys, step, Some(unknown)).await
    }

    async fn split<'i, I, O, Fut>(
        &self,
        items: &'i [I],
        keys: Vec<String>,
        step: impl Fn(Vec<&'i I>) -> Fut,
        unknown: Option<impl Fn(&I) -> O>,
    ) -> R<Vec<O>>
    where
        Fut: Future<Output = R<Vec<O>>>,
    {
        let groups = self.slot_groups(&keys);
        if unknown.is_none() || !self.is_cluster() {
            return crate::store::split::run_split(items, groups, step, unknown, SPLIT_CONCURRENCY)
                .await;
        }
        // A dead master's calls do not fail fast: the cluster client retries them until the
        // node is back or promoted, past the caller's own deadline (a route gives a push's
        // `LoadRoutes` `--redis-timeout`), which then drops the whole step, healthy users and
        // all. So each slot's call gets half the command timeout, and one that runs out is
        // an unknown like one that failed.
        let slot_budget = self.options.slot_call_timeout();
        let bounded = |part| {
            let call = step(part);
            async move {
                match tokio::time::timeout(slot_budget, call).await {
                    Ok(result) => result,
                    Err(_) => Err(StoreUnavailable(format!(
                        "redis: a slot's master did not answer within {slot_budget:?}"
                    ))),
                }
            }
        };
        crate::store::split::run_split(items, groups, bounded, unknown, SPLIT_CONCURRENCY).await
    }

    /// Single-key commands (each given with its key), one reply each, in order: one pipeline
    /// on a single node, one per slot on a cluster. Not one snapshot in either mode: use it
    /// where each reply stands alone.
    pub(super) async fn query_each<T: FromRedisValue>(
        &self,
        cmds: Vec<(String, Cmd)>,
    ) -> R<Vec<T>> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        let keys = cmds.iter().map(|(key, _)| key.clone()).collect();
        self.per_slot(&cmds, keys, |part| async move {
            let mut pipe = ::redis::pipe();
            for (_, cmd) in part {
                pipe.add_command(cmd.clone());
            }
            self.query_pipe::<Vec<T>>(&pipe).await
        })
        .await
    }

    /// Where [`Self::scan_page`] must look to see every key: the one node, or every master.
    pub(super) async fn scan_nodes(&self) -> R<Vec<Option<RoutingInfo>>> {
        if !self.is_cluster() {
            return Ok(vec![None]);
        }
        let Conn::Cluster(mut conn) = self.backend.conn().await? else {
            return Ok(vec![None]);
        };
        let slots: Value = conn
            .route_command(
                ::redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await
            .map_err(unavailable)?;
        let mut masters: Vec<(String, u16)> = Vec::new();
        // Each range: [start, end, [master ip, port, id, ..], replicas...].
        if let Value::Array(ranges) = &slots {
            for range in ranges {
                let Value::Array(fields) = range else {
                    continue;
                };
                let Some(Value::Array(master)) = fields.get(2) else {
                    continue;
                };
                if let [host, Value::Int(port), ..] = master.as_slice()
                    && let (Some(host), Ok(port)) = (string(host)?, u16::try_from(*port))
                    && !masters.contains(&(host.clone(), port))
                {
                    masters.push((host, port));
                }
            }
        }
        if masters.is_empty() {
            return Err(bad_reply("cluster slots", &slots));
        }
        Ok(masters
            .into_iter()
            .map(|(host, port)| {
                Some(RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host,
                    port,
                }))
            })
            .collect())
    }

    /// Where the keys of `key`'s slot are: the one node, or that slot's master.
    pub(super) fn node_of(&self, key: &str) -> Option<RoutingInfo> {
        self.is_cluster().then(|| {
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::new(
                key_slot(key),
                SlotAddr::Master,
            )))
        })
    }

    /// One `SCAN` page of the `{names}` slot's keys (the whole node's on a single node).
    pub(in crate::store) async fn scan_names_page(
        &self,
        cursor: u64,
        pattern: &str,
        count: u64,
    ) -> R<(u64, Vec<String>)> {
        let node = self.node_of(NEXT_USER);
        self.scan_page(node.as_ref(), cursor, pattern, count).await
    }

    /// One `SCAN` page on `node` (from [`Self::scan_nodes`] or [`Self::node_of`]).
    pub(super) async fn scan_page(
        &self,
        node: Option<&RoutingInfo>,
        cursor: u64,
        pattern: &str,
        count: u64,
    ) -> R<(u64, Vec<String>)> {
        let mut cmd = ::redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        match (self.backend.conn().await?, node) {
            (Conn::Cluster(mut conn), Some(node)) => {
                let value = conn
                    .route_command(cmd, node.clone())
                    .await
                    .map_err(unavailable)?;
                ::redis::from_redis_value(value)
                    .map_err(|e| StoreUnavailable(format!("redis: unexpected reply to SCAN: {e}")))
            }
            _ => self.query(&mut cmd).await,
        }
    }
}

/// `(node, text)` of a reply the crate gathered from several nodes (a map from address to
/// reply), or of a single node's reply.
fn per_node_text(value: &Value) -> Vec<(String, String)> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::VerbatimString { text, .. } => text.clone(),
        Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    };
    match value {
        Value::Map(pairs) => pairs.iter().map(|(k, v)| (text(k), text(v))).collect(),
        other => vec![(String::new(), text(other))],
    }
}

#[cfg(test)]
mod tests {
    use super::key_slot;

    #[test]
    fn slots_follow_redis_rules() {
        // Redis Cluster specification's example, and the crate's own test key.
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("cim:claim:{u:7}"), key_slot("cim:route:{u:7}"));
    }
}
