//! The web client at `/`: `web/dist/` (built by `web/build`, committed, checked by `.ci/run`)
//! embedded in the binary, so a route serves it with no Node or wasm toolchain installed.
//!
//! The page runs under a strict Content-Security-Policy: its own scripts, styles and
//! WebAssembly only (`wasm-unsafe-eval` compiles the wasm; no `unsafe-eval`, no inline
//! script), HTTP to this origin only, and WebSockets only to the servers' origins this route
//! has seen live since it started. Not only the live ones: a page loaded while a server
//! restarts (or all are down) must still reach them when they are back, and the policy is
//! fixed for the page's life. A server first seen after the page loaded is reachable after a
//! reload.

use std::sync::Mutex;

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use super::Shared;

/// One embedded file: its bytes and content type.
#[derive(Debug)]
pub(super) struct Asset {
    pub(super) bytes: &'static [u8],
    pub(super) content_type: &'static str,
}

pub(super) const INDEX: Asset = Asset {
    bytes: include_bytes!("../../../../web/dist/index.html"),
    content_type: "text/html; charset=utf-8",
};
pub(super) const APP_JS: Asset = Asset {
    bytes: include_bytes!("../../../../web/dist/app.js"),
    content_type: "text/javascript; charset=utf-8",
};
pub(super) const STYLE: Asset = Asset {
    bytes: include_bytes!("../../../../web/dist/style.css"),
    content_type: "text/css; charset=utf-8",
};
pub(super) const WASM: Asset = Asset {
    bytes: include_bytes!("../../../../web/dist/cim_web_bg.wasm"),
    // `application/wasm` is what lets the browser compile it while it streams in.
    content_type: "application/wasm",
};

/// The most origins [`SeenOrigins`] keeps: enough for any cluster, bounded against servers
/// that come back on new ports forever (the oldest are forgotten first).
const MAX_ORIGINS: usize = 64;

/// WebSocket origins (`ws://host:port`) of the servers seen live, oldest first.
#[derive(Debug, Default)]
pub(super) struct SeenOrigins(Mutex<Vec<String>>);

impl SeenOrigins {
    /// Adds `live` and returns every origin seen, in the order first seen.
    fn update(&self, live: impl IntoIterator<Item = String>) -> Vec<String> {
        // A poisoned lock only means another request panicked mid-push: the list is usable.
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for origin in live {
            if !seen.contains(&origin) {
                seen.push(origin);
            }
        }
        let excess = seen.len().saturating_sub(MAX_ORIGINS);
        seen.drain(..excess);
        seen.clone()
    }
}

/// The policy for the page, allowing WebSockets to `ws_origins`.
pub(super) fn content_security_policy<'a>(ws_origins: impl IntoIterator<Item = &'a str>) -> String {
    let mut connect = String::from("'self'");
    for origin in ws_origins {
        connect.push(' ');
        connect.push_str(origin);
    }
    format!(
        "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; \
         img-src 'self'; connect-src {connect}; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// `ws://host:port` of a `ws://host:port/` URL: what a CSP source names.
fn origin(url: &str) -> &str {
    url.trim_end_matches('/')
}

fn answer(asset: &Asset, csp: Option<String>) -> Response {
    let mut response = asset.bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The files change with the binary, not by themselves: revalidate, never keep stale.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Some(csp) = csp.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert(header::CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    response
}

pub(super) async fn index(State(shared): State<Shared>) -> Response {
    let live: Vec<String> = shared
        .live
        .borrow()
        .values()
        .filter_map(|s| s.client_endpoint().ws_url)
        .map(|url| origin(&url).to_owned())
        .collect();
    let seen = shared.ws_origins.update(live);
    let csp = content_security_policy(seen.iter().map(String::as_str));
    answer(&INDEX, Some(csp))
}

/// Browsers ask for it unprompted; "nothing" beats a 404 in the page's console.
pub(super) async fn no_icon() -> StatusCode {
    StatusCode::NO_CONTENT
}

pub(super) async fn app_js() -> Response {
    answer(&APP_JS, None)
}

pub(super) async fn style() -> Response {
    answer(&STYLE, None)
}

pub(super) async fn wasm() -> Response {
    answer(&WASM, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_only_this_origin_and_the_servers_websockets() {
        let csp = content_security_policy(["ws://10.0.0.1:11411", "wss://s2.example:443"]);
        assert!(csp.contains("connect-src 'self' ws://10.0.0.1:11411 wss://s2.example:443;"));
        assert!(csp.contains("script-src 'self' 'wasm-unsafe-eval';"));
        assert!(!csp.contains("unsafe-inline"));
        assert!(csp.starts_with("default-src 'none';"));
        assert_eq!(origin("ws://[::1]:11411/"), "ws://[::1]:11411");
    }

    #[test]
    fn origins_seen_once_stay_until_many_newer_ones_push_them_out() {
        let seen = SeenOrigins::default();
        let o = |p: usize| format!("ws://h:{p}");
        assert_eq!(seen.update([o(1), o(2)]), [o(1), o(2)]);
        // s1 is down: still allowed, so a page loaded now reaches it when it is back.
        assert_eq!(seen.update([o(2)]), [o(1), o(2)]);
        assert_eq!(seen.update([]), [o(1), o(2)]);
        let all = seen.update((3..=MAX_ORIGINS + 1).map(o));
        assert_eq!(all.len(), MAX_ORIGINS);
        assert_eq!(all[0], o(2), "the oldest went first");
    }

    #[test]
    fn the_embedded_page_loads_only_its_own_files() {
        let page = std::str::from_utf8(INDEX.bytes).unwrap();
        assert!(page.contains(r#"<script type="module" src="app.js">"#));
        // No inline script: the policy would block it.
        assert_eq!(page.matches("<script").count(), 1);
        assert!(WASM.bytes.starts_with(b"\0asm"));
    }
}
