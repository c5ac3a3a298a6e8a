//! Health and metrics over HTTP, for probes and monitoring:
//!
//! - `GET /health/live` (liveness): 200 while the server's driver answers; 503 when it is
//!   stuck (restart the process).
//! - `GET /health/ready` and `GET /health` (readiness): 200 when the store answers, the
//!   registry session is up and the server is neither draining nor withdrawn; else 503 with
//!   the reasons in words. A draining server turns unready before it stops.
//! - `GET /metrics`: Prometheus text, rendered by hand from the node's counters (no global
//!   recorder, since `cim up` runs two servers in one process).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use cim_core::ids::ServerId;
use cim_proto::KickReason;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::ServerError;
use super::input::{Input, Snapshot};
use crate::http_server::{HttpLimits, HttpStats};
use crate::metrics::{Exposition, Kind};
use crate::net::{Listener, Stream};
use crate::registry::SessionHealth;
use crate::store::Store;
use crate::tls::TlsStats;

use super::ws::WsStats;
use crate::warn_gate::WarnGate;

/// How long a health check waits for the store (and for the driver's snapshot).
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

pub(super) struct HttpState<S> {
    pub server_id: ServerId,
    pub inputs: mpsc::Sender<Input<S>>,
    pub store: Arc<dyn Store>,
    pub registry_health: watch::Receiver<SessionHealth>,
    /// The server's rate-limited warnings (link port, accept errors).
    pub warnings: Arc<WarnGate>,
    /// The client gateway's cap in force (after clamping to the open-file limit).
    pub max_connections: usize,
    /// This HTTP listener's own connections and timeouts.
    pub http: Arc<HttpStats>,
    /// Handshake counters and certificate expiry of each TLS listener, by listener name.
    pub tls: Vec<(&'static str, Arc<TlsStats>)>,
    /// The WebSocket listener's upgrade counters, when it is on.
    pub ws: Option<Arc<WsStats>>,
}

impl<S> Clone for HttpState<S> {
    fn clone(&self) -> Self {
        Self {
            server_id: self.server_id.clone(),
            inputs: self.inputs.clone(),
            store: self.store.clone(),
            registry_health: self.registry_health.clone(),
            warnings: self.warnings.clone(),
            max_connections: self.max_connections,
            http: self.http.clone(),
            tls: self.tls.clone(),
            ws: self.ws.clone(),
        }
    }
}

pub(super) async fn serve<L: Listener, S: Stream>(
    listener: L,
    state: HttpState<S>,
    cancel: CancellationToken,
) -> Result<(), ServerError> {
    let stats = state.http.clone();
    let app = Router::new()
        .route("/health", get(health::<S>))
        .route("/health/ready", get(health::<S>))
        .route("/health/live", get(live::<S>))
        .route("/metrics", get(metrics::<S>))
        .with_state(state);
    // Graceful: on cancellation the listener closes, idle keep-alive connections are closed
    // and a request in progress is answered first. The operators' port has small limits of
    // its own, so slow clients there cannot take the process's descriptors either.
    crate::http_server::serve(listener, None, app, HttpLimits::operator(), stats, cancel).await;
    Ok(())
}

impl<S> HttpState<S> {
    /// The driver's snapshot; `None` if it does not answer in time (stuck or stopping).
    async fn snapshot(&self) -> Option<Snapshot> {
        let (reply, answer) = oneshot::channel();
        let ask = async {
            self.inputs.send(Input::Snapshot { reply }).await.ok()?;
            answer.await.ok()
        };
        tokio::time::timeout(CHECK_TIMEOUT, ask)
            .await
            .ok()
            .flatten()
    }
}

/// Liveness: the driver answers. Nothing else (a Redis or ZooKeeper outage is not cured by
/// restarting this process).
async fn live<S: Stream>(State(state): State<HttpState<S>>) -> Response {
    match state.snapshot().await {
        Some(_) => axum::Json(serde_json::json!({
            "status": "live",
            "serverId": state.server_id.as_str(),
        }))
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({
                "status": "stuck",
                "serverId": state.server_id.as_str(),
                "reasons": [format!("driver: no answer within {CHECK_TIMEOUT:?}")],
            })),
        )
            .into_response(),
    }
}

/// Why the server should take no new clients now, in words; empty when it is ready.
fn unready_reasons(
    store: &Result<(), String>,
    registry: SessionHealth,
    snapshot: Option<&Snapshot>,
) -> Vec<String> {
    let mut reasons = Vec::new();
    if let Err(error) = store {
        reasons.push(format!("store: {error}"));
    }
    match registry {
        SessionHealth::Connected => {}
        SessionHealth::Disconnected { .. } => reasons.push(
            "registry: the ZooKeeper connection is lost (reconnecting; routes stop placing \
             users here if it stays lost)"
                .to_owned(),
        ),
        SessionHealth::Expired => reasons.push(
            "registry: the ZooKeeper session expired (every session was fenced; registering \
             again)"
                .to_owned(),
        ),
    }
    match snapshot {
        None => reasons.push(format!("driver: no answer within {CHECK_TIMEOUT:?}")),
        Some(s) => {
            if s.draining {
                reasons.push("draining: sending every client elsewhere before stopping".into());
            }
            if s.withdrawn {
                reasons.push("withdrawn: out of the registry until the store answers again".into());
            }
        }
    }
    reasons
}

async fn health<S: Stream>(State(state): State<HttpState<S>>) -> Response {
    let store = match tokio::time::timeout(CHECK_TIMEOUT, state.store.health()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
    };
    let registry = *state.registry_health.borrow();
    let snapshot = state.snapshot().await;
    let reasons = unready_reasons(&store, registry, snapshot.as_ref());
    let failing = store.is_err() || !registry.is_connected() || snapshot.is_none();
    let status_text = if reasons.is_empty() {
        "ok"
    } else if failing {
        "degraded"
    } else {
        "draining"
    };
    let registry_text = match registry {
        SessionHealth::Connected => "connected",
        SessionHealth::Disconnected { .. } => "disconnected",
        SessionHealth::Expired => "expired",
    };
    let body = serde_json::json!({
        "status": status_text,
        "ready": reasons.is_empty(),
        "reasons": reasons,
        "serverId": state.server_id.as_str(),
        "sessions": snapshot.as_ref().map(|s| s.sessions),
        "connections": snapshot.as_ref().map(|s| s.connections),
        "links": snapshot.as_ref().map(|s| s.links),
        "draining": snapshot.as_ref().map(|s| s.draining),
        "withdrawn": snapshot.as_ref().map(|s| s.withdrawn),
        "store": match &store {
            Ok(()) => "ok".to_owned(),
            Err(error) => error.clone(),
        },
        "registry": registry_text,
        "driver": if snapshot.is_some() { "ok" } else { "unresponsive" },
    });
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics<S: Stream>(State(state): State<HttpState<S>>) -> Response {
    let Some(snapshot) = state.snapshot().await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "server driver unresponsive\n",
        )
            .into_response();
    };
    let registry_up = state.registry_health.borrow().is_connected();
    let mut page = Exposition::new("server_id", state.server_id.as_str());
    render_metrics(&mut page, &snapshot, registry_up);
    render_shell_metrics(&state, &mut page);
    let text = page.finish();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The node's families, every sample labelled with the server id.
fn render_metrics(page: &mut Exposition, s: &Snapshot, registry_up: bool) {
    let mut family =
        |name: &str, kind: Kind, help: &str, samples: &[(Option<(&str, &str)>, u64)]| {
            let mut family = page.family(name, kind, help);
            for (label, value) in samples {
                family.sample(label.as_slice(), value);
            }
        };
    let st = &s.stats;
    family(
        "cim_server_logins_total",
        Kind::Counter,
        "Client logins, by result.",
        &[
            (Some(("result", "ok")), st.logins_ok),
            (Some(("result", "failed")), st.logins_failed),
        ],
    );
    let kicks: Vec<(Option<(&str, &str)>, u64)> = KICK_REASONS
        .iter()
        .map(|&(reason, label)| (Some(("reason", label)), st.kicks(reason)))
        .collect();
    family(
        "cim_server_kicks_total",
        Kind::Counter,
        "Connections kicked, by reason.",
        &kicks,
    );
    let counters: [(&str, &str, u64); 11] = [
        (
            "cim_server_slow_consumers_total",
            "Clients kicked because their outbound queue was full.",
            st.slow_consumers,
        ),
        (
            "cim_server_rate_limited_sends_total",
            "Sends refused by the per-user rate limit.",
            st.rate_limited_sends,
        ),
        (
            "cim_server_fenced_total",
            "Sessions closed because their lease or registry session was no longer proven.",
            st.fenced,
        ),
        (
            "cim_server_protocol_errors_total",
            "Client connections closed for protocol errors.",
            st.protocol_errors,
        ),
        (
            "cim_server_refused_connections_total",
            "Connections refused (connection limit, draining, or out of the registry: store or registry session lost).",
            st.refused_connections,
        ),
        (
            "cim_server_store_timeouts_total",
            "Store requests with no reply within the store timeout.",
            st.store_timeouts,
        ),
        (
            "cim_server_link_auth_failures_total",
            "Route links that failed to authenticate.",
            s.shell.link_auth_failures,
        ),
        (
            "cim_server_links_lost_total",
            "Authenticated route links that went down.",
            s.shell.links_lost,
        ),
        (
            "cim_server_route_sends_unrouted_total",
            "Sends failed at once: no route link up, or its queue full.",
            st.route_sends_unrouted,
        ),
        (
            "cim_server_registry_sessions_lost_total",
            "Registry sessions lost (every connection fenced).",
            s.shell.registry_sessions_lost,
        ),
        (
            "cim_server_store_losses_total",
            "Times the store stayed unreachable past the grace period (every connection fenced).",
            s.shell.store_losses,
        ),
    ];
    for (name, help, value) in counters {
        family(name, Kind::Counter, help, &[(None, value)]);
    }
    family(
        "cim_server_client_tls_on_plaintext_total",
        Kind::Counter,
        "Clients that began a TLS handshake on this plaintext client port (closed; one side's TLS setting is wrong).",
        &[(None, s.shell.tls_on_plaintext)],
    );
    family(
        "cim_server_write_failures_total",
        Kind::Counter,
        "Client connections closed because a write failed or timed out.",
        &[(None, s.shell.write_failures)],
    );
    let gauges: [(&str, &str, u64); 6] = [
        (
            "cim_server_connections",
            "Client connections held, logged in or not.",
            s.connections as u64,
        ),
        (
            "cim_server_sessions",
            "Live sessions (LoginOk sent).",
            s.sessions as u64,
        ),
        (
            "cim_server_route_links",
            "Authenticated route links.",
            s.links as u64,
        ),
        (
            "cim_server_draining",
            "1 while the server drains.",
            u64::from(s.draining),
        ),
        (
            "cim_server_withdrawn",
            "1 while out of the registry because the store is unreachable.",
            u64::from(s.withdrawn),
        ),
        (
            "cim_server_registry_connected",
            "1 while the registry session is connected.",
            u64::from(registry_up),
        ),
    ];
    for (name, help, value) in gauges {
        family(name, Kind::Gauge, help, &[(None, value)]);
    }
    let ws = s.ws_connections as u64;
    family(
        "cim_server_connections_by_transport",
        Kind::Gauge,
        "Client connections held, by gateway: tcp or websocket.",
        &[
            (
                Some(("transport", "tcp")),
                (s.connections as u64).saturating_sub(ws),
            ),
            (Some(("transport", "websocket")), ws),
        ],
    );
}

/// The families the shell keeps outside the driver: the gateway's cap, the warnings left out
/// of the log, the HTTP listener's own counters.
fn render_shell_metrics<S>(state: &HttpState<S>, page: &mut Exposition) {
    let families = [
        (
            "cim_server_max_connections",
            Kind::Gauge,
            "Cap on client connections in force (after clamping to the open-file limit).",
            state.max_connections as u64,
        ),
        (
            "cim_server_warnings_suppressed_total",
            Kind::Counter,
            "Repeated warnings left out of the log (link port floods, accept errors).",
            state.warnings.suppressed_total(),
        ),
    ];
    for (name, kind, help, value) in families {
        page.single(name, kind, help, value);
    }
    let circuit = state.store.circuit();
    page.single(
        "cim_server_store_circuit_open",
        Kind::Gauge,
        "1 while store calls fail at once because the Redis Cluster is unreachable.",
        u64::from(circuit.open),
    );
    page.single(
        "cim_server_store_refused_total",
        Kind::Counter,
        "Store calls failed at once, without reaching Redis, while the cluster was unreachable.",
        circuit.refused,
    );
    state.http.render("cim_server", page);
    if let Some(ws) = &state.ws {
        let load = |counter: &std::sync::atomic::AtomicU64| {
            counter.load(std::sync::atomic::Ordering::Relaxed)
        };
        page.single(
            "cim_server_ws_upgrades_total",
            Kind::Counter,
            "Connections upgraded to a WebSocket on the WebSocket port.",
            load(&ws.upgrades),
        );
        let mut family = page.family(
            "cim_server_ws_refusals_total",
            Kind::Counter,
            "Connections on the WebSocket port closed before the upgrade, by reason.",
        );
        for (reason, counter) in [
            ("origin", &ws.origin_refusals),
            ("bad_request", &ws.bad_requests),
            ("header_timeout", &ws.header_timeouts),
            ("busy", &ws.upgrades_refused_busy),
        ] {
            family.sample(&[("reason", reason)], load(counter));
        }
    }
    let tls: Vec<_> = state
        .tls
        .iter()
        .map(|(listener, stats)| (*listener, stats.clone()))
        .collect();
    crate::tls::render_stats(page, "cim_server", &tls);
    crate::ops_metrics::render_process(page, "cim_server");
}

const KICK_REASONS: [(KickReason, &str); 8] = [
    (KickReason::TakenOver, "taken_over"),
    (KickReason::SlowConsumer, "slow_consumer"),
    (KickReason::Idle, "idle"),
    (KickReason::LoginTimeout, "login_timeout"),
    (KickReason::Fenced, "fenced"),
    (KickReason::Draining, "draining"),
    (KickReason::ProtocolError, "protocol_error"),
    (KickReason::LoggedOut, "logged_out"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::input::ShellStats;
    use cim_core::server::ServerStats;

    #[test]
    fn readiness_says_why_in_words_and_a_draining_server_is_unready() {
        let snapshot = |draining, withdrawn| Snapshot {
            stats: ServerStats::default(),
            connections: 0,
            ws_connections: 0,
            sessions: 0,
            links: 1,
            draining,
            withdrawn,
            shell: ShellStats::default(),
        };
        let ok = Ok(());
        let ready = unready_reasons(&ok, SessionHealth::Connected, Some(&snapshot(false, false)));
        assert!(ready.is_empty(), "{ready:?}");
        let draining = unready_reasons(&ok, SessionHealth::Connected, Some(&snapshot(true, false)));
        assert_eq!(draining.len(), 1);
        assert!(draining[0].starts_with("draining:"), "{draining:?}");
        let lost = unready_reasons(
            &Err("connection refused".into()),
            SessionHealth::Disconnected {
                since: tokio::time::Instant::now(),
            },
            None,
        );
        let text = lost.join("\n");
        assert!(text.contains("store: connection refused"), "{text}");
        assert!(text.contains("ZooKeeper connection is lost"), "{text}");
        assert!(text.contains("driver: no answer"), "{text}");
        assert!(
            !text.contains("Instant") && !text.contains('{'),
            "debug output: {text}"
        );
    }

    #[test]
    fn metrics_render_every_family_with_the_server_label() {
        let mut stats = ServerStats {
            logins_ok: 3,
            logins_failed: 1,
            ..Default::default()
        };
        stats.kicks.insert(KickReason::Draining, 2);
        let snapshot = Snapshot {
            stats,
            connections: 4,
            ws_connections: 1,
            sessions: 3,
            links: 1,
            draining: false,
            withdrawn: false,
            shell: ShellStats::default(),
        };
        let mut page = Exposition::new("server_id", "s\"1");
        render_metrics(&mut page, &snapshot, true);
        let text = page.finish();
        assert!(text.contains("cim_server_logins_total{server_id=\"s\\\"1\",result=\"ok\"} 3\n"));
        assert!(
            text.contains("cim_server_kicks_total{server_id=\"s\\\"1\",reason=\"draining\"} 2\n")
        );
        assert!(text.contains("cim_server_sessions{server_id=\"s\\\"1\"} 3\n"));
        assert!(text.contains("# TYPE cim_server_connections gauge\n"));
        assert!(text.contains(
            "cim_server_connections_by_transport{server_id=\"s\\\"1\",transport=\"websocket\"} 1\n"
        ));
        assert!(text.contains(
            "cim_server_connections_by_transport{server_id=\"s\\\"1\",transport=\"tcp\"} 3\n"
        ));
        // Every sample line has a HELP and TYPE before it, and a numeric value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
        }
    }
}
