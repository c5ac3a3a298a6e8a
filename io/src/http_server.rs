//! The HTTP server under the route's API (and the servers' `/health`): hyper's HTTP/1
//! connection driver over any [`Listener`], with the limits `axum::serve` lacks, so slow or
//! idle clients cannot hold the process's descriptors (slowloris):
//!
//! - **header timeout**: a new connection must deliver a complete request head within
//!   `header_timeout` of being accepted, and a kept-alive one within `header_timeout` of the
//!   first byte of its next request;
//! - **idle timeout**: a kept-alive connection with no request for `idle_timeout` is closed,
//!   and so is one whose client stops reading its answer for that long;
//! - **connection cap**: past `max_connections` open connections a new one is answered
//!   `503` at once (one non-blocking write, no task, no wait) and closed;
//! - **accept errors** (out of descriptors and the like): back off, doubling up to a second,
//!   with one warning per interval through a [`WarnGate`] and a counter for each.
//!
//! A request in flight has no deadline here: the handlers bound their own work (a held
//! takeover login may rightly take as long as the old session's lease).
//!
//! Each request carries `axum::extract::ConnectInfo<SocketAddr>` with the peer's address.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use futures::FutureExt as _;
use futures::task::AtomicWaker;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::metrics::{Exposition, Kind};
use crate::net::{Listener, Stream};
use crate::tls::{self, MaybeTls, Opening, Rewind, ServerTls};
use crate::warn_gate::WarnGate;

/// The first back-off after a failed accept; it doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(50);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What a connection past the cap reads before it is closed.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
content-type: application/json\r\ncontent-length: 68\r\n\r\n\
{\"code\":\"4000\",\"message\":\"too many connections, retry in a moment\"}\n";

/// What a TLS client on a plain HTTP listener reads before it is closed. It cannot read it
/// as TLS, which is the point: its handshake fails at once on "not a TLS record" (rustls:
/// `InvalidContentType`, curl: "wrong version number"), which the SDK reports as a
/// plaintext route dialed over `https://` instead of retrying.
const NOT_HTTPS: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
content-type: application/json\r\ncontent-length: 83\r\n\r\n\
{\"code\":\"3000\",\"message\":\"this port speaks plain HTTP: use http://, not https://\"}\n";

/// What a plain HTTP client on an HTTPS-only listener reads before it is closed (code
/// [`crate::api::CODE_HTTPS_REQUIRED`]).
const HTTPS_REQUIRED: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
content-type: application/json\r\ncontent-length: 83\r\n\r\n\
{\"code\":\"4260\",\"message\":\"this port speaks HTTPS only: use https://, not http://\"}\n";

/// The limits of one HTTP listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; more are answered 503 and closed at once.
    pub max_connections: usize,
    /// Time to deliver a complete request head (from accept, or from the first byte of a
    /// kept-alive connection's next request).
    pub header_timeout: Duration,
    /// A kept-alive connection with no request, or not reading its answer, this long is
    /// closed.
    pub idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl HttpLimits {
    /// Small limits for an operators' endpoint (`/health`, `/metrics`).
    pub fn operator() -> Self {
        Self {
            max_connections: 256,
            ..Self::default()
        }
    }

    /// Zero is refused for each limit.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.max_connections == 0 {
            return Err("max_connections must be above zero");
        }
        if self.header_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err("the HTTP header and idle timeouts must be above zero");
        }
        Ok(())
    }
}

/// Counters of one HTTP listener, for `/metrics`.
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// The cap in force (after clamping to the file limit).
    pub max_connections: AtomicU64,
    pub accepted: AtomicU64,
    /// Answered 503 and closed: past the cap.
    pub refused: AtomicU64,
    /// Closed for a request head not delivered within the header timeout.
    pub header_timeouts: AtomicU64,
    /// Closed for staying idle (no request, or not reading the answer) past the idle timeout.
    pub idle_timeouts: AtomicU64,
    /// `accept` failures (e.g. out of file descriptors).
    pub accept_errors: AtomicU64,
    /// TLS clients on this plain HTTP listener (told so and closed).
    pub tls_on_plaintext: AtomicU64,
    /// Warnings left out of the log by the listener's gate.
    pub warnings: WarnGate,
}

impl HttpStats {
    /// Writes this listener's families: `{prefix}_http_connections`, ...
    pub fn render(&self, prefix: &str, page: &mut Exposition) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let families: [(&str, Kind, &str, u64); 8] = [
            (
                "http_connections",
                Kind::Gauge,
                "HTTP connections open.",
                load(&self.open),
            ),
            (
                "http_max_connections",
                Kind::Gauge,
                "Cap on HTTP connections in force (after clamping to the open-file limit).",
                load(&self.max_connections),
            ),
            (
                "http_connections_refused_total",
                Kind::Counter,
                "HTTP connections answered 503 and closed because the cap was reached.",
                load(&self.refused),
            ),
            (
                "http_header_timeouts_total",
                Kind::Counter,
                "HTTP connections closed for not delivering a request head in time.",
                load(&self.header_timeouts),
            ),
            (
                "http_idle_timeouts_total",
                Kind::Counter,
                "HTTP connections closed for staying idle past the idle timeout.",
                load(&self.idle_timeouts),
            ),
            (
                "http_accept_errors_total",
                Kind::Counter,
                "Failed accepts of HTTP connections (e.g. out of file descriptors).",
                load(&self.accept_errors),
            ),
            (
                "http_tls_on_plaintext_total",
                Kind::Counter,
                "TLS clients on this plain HTTP listener (an https:// URL for an http:// one), answered in plaintext and closed.",
                load(&self.tls_on_plaintext),
            ),
            (
                "http_warnings_suppressed_total",
                Kind::Counter,
                "Repeated warnings of the HTTP listener left out of the log.",
                self.warnings.suppressed_total(),
            ),
        ];
        for (name, kind, help, value) in families {
            page.single(&format!("{prefix}_{name}"), kind, help, value);
        }
    }
}

/// Serves `router` on `listener` under `limits` until `cancel`, then lets the requests in
/// flight finish (idle connections close at once) and returns.
pub async fn serve<L: Listener>(
    mut listener: L,
    tls: Option<ServerTls>,
    router: Router,
    limits: HttpLimits,
    stats: Arc<HttpStats>,
    cancel: CancellationToken,
) {
    stats
        .max_connections
        .store(limits.max_connections as u64, Ordering::Relaxed);
    let mut connections = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        // Reap finished connection tasks so the set stays the size of the open ones.
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (mut stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            Err(error) => {
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                crate::warn_limited!(
                    stats.warnings,
                    "http accept",
                    %error,
                    backoff_ms = backoff.as_millis() as u64,
                    "HTTP accept failed; backing off"
                );
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        if stats.open.load(Ordering::Relaxed) >= limits.max_connections as u64 {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            // One try, never a wait: a fresh socket's send buffer is empty, so this writes
            // unless the peer is already gone. Then the descriptor is closed. An HTTPS
            // listener just closes: plaintext bytes would read as tampering to a TLS client.
            if tls.is_none() {
                let _ = stream.write(REFUSAL).now_or_never();
            }
            drop(stream);
            continue;
        }
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        let open = OpenGuard(stats.clone());
        connections.spawn(serve_connection(
            stream,
            tls.clone(),
            peer,
            router.clone(),
            limits,
            open,
            cancel.clone(),
        ));
    }
    // Stopping: every connection task sees `cancel` too; wait for them to finish.
    while connections.join_next().await.is_some() {}
}

/// Decrements the open-connection gauge when the connection's task ends, however it ends.
struct OpenGuard(Arc<HttpStats>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection<S: Stream>(
    stream: S,
    tls: Option<ServerTls>,
    peer: SocketAddr,
    router: Router,
    limits: HttpLimits,
    open: OpenGuard,
    cancel: CancellationToken,
) {
    let requests = Arc::new(RequestCount::default());
    let mut io = GuardedIo::new(stream, requests.clone(), open.0.clone(), limits);
    // The handshake reads through the guard, so the header timeout bounds it too.
    let io = match tls {
        None => {
            // The first bytes tell an HTTP request from a TLS hello (an https:// URL for
            // this http:// listener): that client is told in plaintext, which its TLS stack
            // reports at once, and the operator sees it in the log and the metrics.
            let opening = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                opening = tls::read_opening(&mut io, None) => opening,
            };
            // Closed, or no byte within the header timeout (the guard counted it).
            let Ok(Opening::Seen(opening)) = opening else {
                return;
            };
            if opening.is_tls_hello() {
                open.0.tls_on_plaintext.fetch_add(1, Ordering::Relaxed);
                crate::warn_limited!(
                    open.0.warnings,
                    "tls on plaintext http",
                    %peer,
                    "a TLS client on this plain HTTP port (an https:// URL for an http:// \
                     listener); told so and closed"
                );
                let _ = io.write_all(NOT_HTTPS).await;
                let _ = io.shutdown().await;
                return;
            }
            MaybeTls::Plain(Rewind::new(opening.bytes(), io))
        }
        Some(tls) => {
            let accepted = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                accepted = tls.accept_telling_plaintext(io, Some(HTTPS_REQUIRED)) => accepted,
            };
            match accepted {
                Ok(io) => io,
                Err(error) => {
                    crate::warn_limited!(
                        open.0.warnings,
                        "https handshake",
                        %peer,
                        %error,
                        "HTTPS client refused at the TLS handshake; closing"
                    );
                    return;
                }
            }
        }
    };
    let body_timeout = limits.header_timeout;
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let in_flight = InFlight::enter(requests.clone());
        // The body has as long as the head had: a slow body holds a place no longer than a
        // slow head does.
        let request = request.map(|body| TimedBody::new(body, body_timeout));
        let answer = router.clone().oneshot(request);
        async move {
            let response = answer.await;
            drop(in_flight);
            response
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        biased;
        result = connection.as_mut() => result,
        _ = cancel.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.as_mut().await
        }
    };
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "HTTP connection ended with an error");
    }
    drop(open);
}

/// Requests started on one connection, and how many are in flight.
#[derive(Debug, Default)]
struct RequestCount {
    started: AtomicU64,
    in_flight: AtomicU64,
    /// The connection's task, waiting in a read while a request was in flight.
    reader: AtomicWaker,
}

/// One request in flight, from its complete head to its answer.
struct InFlight(Arc<RequestCount>);

impl InFlight {
    fn enter(count: Arc<RequestCount>) -> Self {
        count.started.fetch_add(1, Ordering::Relaxed);
        count.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.reader.wake();
    }
}

/// Which deadline closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Expired {
    #[error("no complete request head within the header timeout")]
    Header,
    #[error("idle past the idle timeout")]
    Idle,
}

/// The socket as hyper sees it, with the header and idle deadlines: while no request is in
/// flight, a read that would wait past the deadline fails instead, and so does a write that
/// makes no progress for the idle timeout. hyper then closes the connection.
struct GuardedIo<S> {
    inner: S,
    requests: Arc<RequestCount>,
    stats: Arc<HttpStats>,
    limits: HttpLimits,
    /// `requests.started` when the current phase began.
    seen_started: u64,
    /// Bytes of the next request head have arrived in this phase.
    head_started: bool,
    /// What the deadline is for.
    phase: Expired,
    deadline: Pin<Box<Sleep>>,
    write_stall: Option<Pin<Box<Sleep>>>,
}

impl<S> GuardedIo<S> {
    fn new(
        inner: S,
        requests: Arc<RequestCount>,
        stats: Arc<HttpStats>,
        limits: HttpLimits,
    ) -> Self {
        Self {
            inner,
            requests,
            stats,
            limits,
            seen_started: 0,
            head_started: false,
            // A new connection owes its first head at once.
            phase: Expired::Header,
            deadline: Box::pin(tokio::time::sleep(limits.header_timeout)),
            write_stall: None,
        }
    }

    /// Counts a connection closed by `phase`'s deadline.
    fn expired(&self, phase: Expired) {
        let counter = match phase {
            Expired::Header => &self.stats.header_timeouts,
            Expired::Idle => &self.stats.idle_timeouts,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn expire(&mut self, phase: Expired, after: Duration) {
        self.phase = phase;
        self.deadline.as_mut().reset(Instant::now() + after);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for GuardedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let started = this.requests.started.load(Ordering::Relaxed);
        let in_flight = this.requests.in_flight.load(Ordering::Relaxed) > 0;
        if !in_flight && started != this.seen_started {
            // The previous request was answered: the connection is idle until the next.
            this.seen_started = started;
            this.head_started = false;
            this.expire(Expired::Idle, this.limits.idle_timeout);
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if !in_flight && !this.head_started && buf.filled().len() > before {
                    this.head_started = true;
                    if this.seen_started > 0 {
                        this.expire(Expired::Header, this.limits.header_timeout);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if in_flight {
                    // hyper may not read again once the answer is written: be woken when
                    // the request ends, to start the idle deadline.
                    this.requests.reader.register(cx.waker());
                } else if this.deadline.as_mut().poll(cx).is_ready() {
                    this.expired(this.phase);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, this.phase)));
                }
                Poll::Pending
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for GuardedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => {
                let idle = this.limits.idle_timeout;
                let stall = this
                    .write_stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(stall.as_mut().poll(cx));
                this.expired(Expired::Idle);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, Expired::Idle)))
            }
            done => {
                this.write_stall = None;
                done
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => {
                let idle = this.limits.idle_timeout;
                let stall = this
                    .write_stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                ready!(stall.as_mut().poll(cx));
                this.expired(Expired::Idle);
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, Expired::Idle)))
            }
            done => {
                this.write_stall = None;
                done
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A request body that must arrive in full within a deadline; past it, reading it fails
/// (the handler answers 400 and the connection is closed).
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
}

impl TimedBody {
    fn new(inner: Incoming, within: Duration) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(within)),
        }
    }
}

/// The request body did not arrive within the deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyTimeout;

impl hyper::body::Body for TimedBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                ready!(this.deadline.as_mut().poll(cx));
                Poll::Ready(Some(Err(Box::new(BodyTimeout))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listeners_own_answers_are_whole_responses_with_an_envelope() {
        for (answer, status, code) in [
            (REFUSAL, "503", "4000"),
            (NOT_HTTPS, "400", "3000"),
            (HTTPS_REQUIRED, "400", crate::api::CODE_HTTPS_REQUIRED),
        ] {
            let text = std::str::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
            assert!(head.contains("\r\nconnection: close"), "{head}");
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(length, body.len(), "{head}");
            let envelope: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(envelope["code"], code);
        }
    }
}
