//! The registry's vocabulary: the set of live servers (ZooKeeper ephemeral nodes in
//! production) as the route sees it.

use crate::ids::ServerId;

/// One live server and where to reach it, as it registered itself.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct LiveServer {
    pub id: ServerId,
    /// Host (IP or name) clients connect to.
    pub host: String,
    /// Client TCP gateway port (CIM's default 11211).
    pub client_port: u16,
    /// Internal link port for routes (default 11311).
    pub link_port: u16,
    /// Health and metrics HTTP port (default 8081).
    pub http_port: u16,
    /// Sessions it holds, as last reported; used by least-connections balancing.
    pub connections: u32,
    /// Whether its client gateway expects TLS (it may still take plaintext while an
    /// operator migrates; clients that can should use TLS then).
    #[serde(default)]
    pub client_tls: bool,
    /// Its WebSocket gateway's port (the same `ServerNode` behind it; TLS as `client_tls`
    /// says), absent when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws_port: Option<u16>,
}

impl LiveServer {
    /// Where a client reaches this server's gateway.
    pub fn client_endpoint(&self) -> ServerEndpoint {
        ServerEndpoint {
            host: self.host.clone(),
            port: self.client_port,
            tls: self.client_tls,
            ws_url: self.ws_port.map(|port| self.ws_url(port)),
        }
    }

    /// `ws://host:port/`, or `wss://` when the gateway speaks TLS (one certificate and one
    /// TLS setting for both gateways). An IPv6 address is bracketed, as a URL needs.
    fn ws_url(&self, port: u16) -> String {
        let scheme = if self.client_tls { "wss" } else { "ws" };
        if self.host.contains(':') && !self.host.starts_with('[') {
            format!("{scheme}://[{}]:{port}/", self.host)
        } else {
            format!("{scheme}://{}:{port}/", self.host)
        }
    }
}

/// Where a client reaches a server, as the route's login answer names it: a host the
/// server's certificate is valid for (a name or an IP), a port, and whether to speak TLS.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ServerEndpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// The same server's WebSocket gateway (`ws://host:port/` or `wss://…`), for browsers;
    /// absent when it has none (and in an older route's answer).
    #[serde(default, rename = "wsUrl", skip_serializing_if = "Option::is_none")]
    pub ws_url: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(host: &str, tls: bool, ws_port: Option<u16>) -> LiveServer {
        LiveServer {
            id: ServerId::new("s1"),
            host: host.into(),
            client_port: 11211,
            link_port: 11311,
            http_port: 8081,
            connections: 0,
            client_tls: tls,
            ws_port,
        }
    }

    #[test]
    fn the_endpoint_names_the_websocket_gateway_only_when_there_is_one() {
        let url = |host, tls, port| server(host, tls, port).client_endpoint().ws_url;
        assert_eq!(url("10.0.0.1", false, None), None);
        assert_eq!(
            url("10.0.0.1", false, Some(11411)).as_deref(),
            Some("ws://10.0.0.1:11411/")
        );
        assert_eq!(
            url("s1.example", true, Some(443)).as_deref(),
            Some("wss://s1.example:443/")
        );
        assert_eq!(
            url("::1", false, Some(11411)).as_deref(),
            Some("ws://[::1]:11411/")
        );
    }
}
