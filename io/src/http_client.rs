//! A small HTTP/1.1 client over the [`Network`] seam: hyper on a connection from
//! [`net::connect`], one connection per request (logins and API calls are rare next to
//! chat traffic, and a fresh connection never carries a stale half-dead socket).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;

use crate::net::{self, Network};
use crate::tls::{self, ClientTls, MaybeTls};

/// Largest response body read; an API answer is a few hundred bytes, history at most 100
/// messages of 4 KiB.
const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::ConnectError),
    #[error("request did not complete within {0:?}")]
    Timeout(Duration),
    #[error("http: {0}")]
    Http(String),
}

/// Where the route's HTTP API is, whether it speaks HTTPS, and how long a request may take.
#[derive(Debug, Clone)]
pub struct HttpClient<N> {
    net: N,
    host: String,
    port: u16,
    timeout: Duration,
    tls: Option<ClientTls>,
}

impl<N: Network> HttpClient<N> {
    pub fn new(net: N, host: impl Into<String>, port: u16, timeout: Duration) -> Self {
        Self {
            net,
            host: host.into(),
            port,
            timeout,
            tls: None,
        }
    }

    /// Speaks HTTPS, verifying the route's certificate for its host with `tls`.
    pub fn with_tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    pub fn is_https(&self) -> bool {
        self.tls.is_some()
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one request (a JSON body if given, a bearer token if given) and returns the
    /// status and body, all within the client's timeout.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        bearer: Option<&str>,
        json_body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        match tokio::time::timeout(
            self.timeout,
            self.request_inner(method, path_and_query, bearer, json_body),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(HttpError::Timeout(self.timeout)),
        }
    }

    async fn request_inner(
        &self,
        method: Method,
        path_and_query: &str,
        bearer: Option<&str>,
        json_body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), HttpError> {
        let stream = net::connect(&self.net, &self.host, self.port, self.timeout)
            .await
            .map_err(HttpError::Connect)?;
        let stream = match &self.tls {
            Some(tls) => tls.connect(stream, &self.host).await?,
            None => MaybeTls::plain(stream),
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| HttpError::Http(e.to_string()))?;
        // The connection task ends when the request is done and `sender` dropped.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, format!("{}:{}", self.host, self.port));
        if let Some(token) = bearer {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match json_body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                body
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(body))
            .map_err(|e| HttpError::Http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| HttpError::Http(e.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| HttpError::Http(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }
}
