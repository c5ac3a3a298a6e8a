//! The route's latency histograms: logins and registrations (HTTP, from the request to the
//! answer: the argon2 check and its queue included) and sends, both over HTTP and from the
//! servers' links (from the `RouteSend` read off the link to its `RouteSendResult` written
//! back: the append in Redis and the ordering checks included).

use std::time::Duration;

use crate::metrics::{Exposition, Kind};
use crate::ops_metrics::{Histogram, render_histograms};

#[derive(Debug, Default)]
pub(super) struct Latency {
    pub login: Histogram,
    pub register: Histogram,
    pub send_http: Histogram,
    pub send_link: Histogram,
}

impl Latency {
    /// The histogram a request on `path` is counted in, if any.
    pub(super) fn for_path(&self, path: &str) -> Option<&Histogram> {
        match path {
            "/login" => Some(&self.login),
            "/registerAccount" => Some(&self.register),
            "/groupRoute" | "/p2pRoute" => Some(&self.send_http),
            _ => None,
        }
    }

    pub(super) fn observe_path(&self, path: &str, elapsed: Duration) {
        if let Some(histogram) = self.for_path(path) {
            histogram.observe(elapsed);
        }
    }

    pub(super) fn render(&self, page: &mut Exposition) {
        render_histograms(
            page,
            "cim_route_login_seconds",
            "Time to answer /login and /registerAccount, password check and its queue included.",
            &[
                (&[("op", "login")], &self.login),
                (&[("op", "register")], &self.register),
            ],
        );
        render_histograms(
            page,
            "cim_route_send_seconds",
            "Time from a send reaching the route to its answer (ack or nack): `via` http \
             (/groupRoute, /p2pRoute) or link (a client's send relayed by its server).",
            &[
                (&[("via", "http")], &self.send_http),
                (&[("via", "link")], &self.send_link),
            ],
        );
        // Not a latency, but what the password checks cost in memory: argon2's working
        // memory, kept in a small pool for reuse (`cim_core::accounts`), process-wide.
        let (_, bytes) = cim_core::accounts::pooled_hash_memory();
        page.single(
            "cim_route_password_hash_memory_bytes",
            Kind::Gauge,
            "Argon2 working memory kept for reuse by the password checks \
             (process-wide; one buffer per check that ran at once, at most 8).",
            bytes,
        );
    }
}
