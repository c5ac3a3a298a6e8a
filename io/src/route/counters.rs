//! The route's counters, shared by the driver, the link tasks and the HTTP handlers (plain
//! atomics: no global recorder, so several routes in one process keep their own).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use super::latency::Latency;
use super::link_states::LinkStates;

/// Counters shared with the link tasks and HTTP handlers (plain atomics: no global
/// recorder, so several routes in one process keep their own).
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub link_dials: AtomicU64,
    pub link_connects: AtomicU64,
    pub link_failures: AtomicU64,
    pub http_requests: AtomicU64,
    pub http_client_errors: AtomicU64,
    pub http_server_errors: AtomicU64,
    pub http_unauthorized: AtomicU64,
    /// The HTTP listener's connections, timeouts and refusals.
    pub http: Arc<crate::http_server::HttpStats>,
    /// Handshakes and certificate expiry of the HTTPS listener and the link dialer.
    pub tls: Vec<(&'static str, Arc<crate::tls::TlsStats>)>,
    /// Requests refused by the shell's limits (429).
    pub limited_login_address: AtomicU64,
    pub limited_register_address: AtomicU64,
    pub limited_send_user: AtomicU64,
    /// Bearer tokens refused because their session ended.
    pub stale_tokens: AtomicU64,
    /// Each link's state as its task last saw it, for `/health/ready`.
    pub link_states: LinkStates,
    /// Login and send latency histograms.
    pub latency: Latency,
    /// Set by `RouteHandle::begin_drain`: `/health/ready` answers 503 from then on.
    pub draining: std::sync::atomic::AtomicBool,
}
