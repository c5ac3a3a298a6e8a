//! The route's probes, for a load balancer and monitoring:
//!
//! - `GET /health/live` (liveness): 200 while the route's driver runs; 503 when it stopped
//!   (restart the process). A Redis or ZooKeeper outage does not make a route unlive:
//!   restarting it would not help.
//! - `GET /health/ready` and `GET /health` (readiness): 200 `{"status":"ok"}` when the store
//!   answers, the registry session is up, the driver runs and, when servers are live, a link
//!   to at least one of them is up or still being dialled; else 503
//!   `{"status":"degraded","failing":[...]}`, each reason in words (the likely cause too, e.g.
//!   a link secret that differs from the servers'). A route told to stop turns unready
//!   first (`RouteHandle::begin_drain`) and keeps serving for `--shutdown-delay`.
//!
//! No server live at all is not counted as unready: every route would turn unready at once
//! and the load balancer could send nobody anywhere; `cim_route_servers_live` is the alert.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::super::link_states::{FailureCause, LinkState};
use super::{HEALTH_TIMEOUT, Shared};
use crate::registry::SessionHealth;

pub(in crate::route) async fn live(State(shared): State<Shared>) -> Response {
    if shared.driver.is_closed() {
        let body = serde_json::json!({"status": "stopped", "failing": ["driver: stopped"]});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    }
    axum::Json(serde_json::json!({"status": "live"})).into_response()
}

pub(in crate::route) async fn ready(State(shared): State<Shared>) -> Response {
    let mut failing = Vec::new();
    match tokio::time::timeout(HEALTH_TIMEOUT, shared.store.health()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => failing.push(format!("store: {e}")),
        Err(_) => failing.push(format!("store: no answer within {HEALTH_TIMEOUT:?}")),
    }
    match *shared.registry_health.borrow() {
        SessionHealth::Connected => {
            if shared.live.has_changed().is_err() {
                failing
                    .push("registry: the view is closed (the live-server list is frozen)".into());
            }
        }
        SessionHealth::Disconnected { .. } => failing.push(
            "registry: the ZooKeeper connection is lost (reconnecting; the live-server list \
             may be stale)"
                .into(),
        ),
        SessionHealth::Expired => failing
            .push("registry: the ZooKeeper session expired (reconnecting with a new one)".into()),
    }
    if shared.driver.is_closed() {
        failing.push("driver: stopped".to_owned());
    }
    if shared
        .counters
        .draining
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        failing.push("draining: stopping soon; still answering requests meanwhile".to_owned());
    }
    let links = shared.counters.link_states.snapshot();
    if let Some(reason) = links_reason(&links) {
        failing.push(reason);
    }
    if failing.is_empty() {
        axum::Json(serde_json::json!({"status": "ok"})).into_response()
    } else {
        let body = serde_json::json!({"status": "degraded", "failing": failing});
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
    }
}

/// Why the links make this route unready: servers are live, yet every one of their links
/// failed its latest attempt (none up, none still dialling for the first time). Names the
/// likely cause when all of them fail alike.
pub(in crate::route) fn links_reason(
    links: &[(cim_core::ids::ServerId, LinkState)],
) -> Option<String> {
    let causes: Vec<FailureCause> = links
        .iter()
        .map(|(_, state)| match state {
            LinkState::Failing(cause) => Some(*cause),
            LinkState::Up | LinkState::Dialling => None,
        })
        .collect::<Option<_>>()?;
    let first = *causes.first()?;
    let n = causes.len();
    let hint = if causes.iter().all(|c| *c == first) {
        first.hint()
    } else {
        "the causes differ; see the route's log"
    };
    Some(format!(
        "links: no link to any of the {n} live server{} is up: {hint}",
        if n == 1 { "" } else { "s" }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cim_core::ids::ServerId;

    fn id(name: &str) -> ServerId {
        ServerId::new(name)
    }

    #[test]
    fn a_route_is_unready_only_when_every_live_servers_link_fails() {
        assert_eq!(
            links_reason(&[]),
            None,
            "no server live: not the route's fault"
        );
        let up = [
            (id("s1"), LinkState::Up),
            (id("s2"), LinkState::Failing(FailureCause::Secret)),
        ];
        assert_eq!(links_reason(&up), None);
        let dialling = [(id("s1"), LinkState::Dialling)];
        assert_eq!(links_reason(&dialling), None);
        let secret = [
            (id("s1"), LinkState::Failing(FailureCause::Secret)),
            (id("s2"), LinkState::Failing(FailureCause::Secret)),
        ];
        let reason = links_reason(&secret).expect("unready");
        assert!(reason.contains("2 live servers"), "{reason}");
        assert!(reason.contains("CIM_LINK_SECRET"), "{reason}");
        let mixed = [
            (id("s1"), LinkState::Failing(FailureCause::Secret)),
            (id("s2"), LinkState::Failing(FailureCause::Unreachable)),
        ];
        let reason = links_reason(&mixed).expect("unready");
        assert!(reason.contains("differ"), "{reason}");
    }
}
