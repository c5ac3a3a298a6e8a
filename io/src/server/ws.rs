//! The WebSocket gateway: the same client protocol as the TCP gateway, for browsers. One
//! binary WebSocket message carries one `cim.v1.Frame` (the body the TCP gateway prefixes
//! with its length), and behind the upgrade everything is the TCP gateway's: the driver, the
//! [`ServerNode`](cim_core::server::ServerNode), the queues and the reader and writer tasks
//! (`gateway::spawn_framed`).
//!
//! The upgrade is answered here rather than by a general HTTP server, so that every limit is
//! this module's to state:
//!
//! - the request head must arrive complete within `header_timeout` (after the TLS handshake,
//!   which has its own deadline) and within [`MAX_HEAD`] bytes and [`MAX_HEADERS`] headers,
//!   as the HTTP listeners bound theirs: a slow or endless head costs one task and one
//!   descriptor until the deadline, and upgrades in progress count against the connection
//!   cap, like TLS handshakes on the TCP gateway;
//! - an `Origin` header must be one of the allowed origins ([`OriginPolicy`]), or the answer
//!   is `403` before any upgrade; a request with no `Origin` is a non-browser client (a
//!   browser always sends one on a WebSocket handshake, and a page cannot remove it) and is
//!   accepted: it holds no ambient credential a page could borrow, only its own ticket;
//! - only `GET /` (with any query) upgrades; other paths get `404`, a request that is no
//!   WebSocket upgrade `426`, a malformed one `400`.
//!
//! After the upgrade, what the TCP gateway cannot be sent arrives as WebSocket-level faults,
//! each answered with the protocol's `Error` frame and then a close frame whose code says the
//! same (see [`close_code`]): a text message (1003), a message over the frame limit (1009), a
//! binary message that is no frame (1007). Pings are answered by the WebSocket layer; a close
//! from the client ends the session as a TCP EOF does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::{Buf, Bytes};
use cim_proto::codec::{DecodeError, FrameCodec};
use cim_proto::frame::Kind;
use cim_proto::{ErrorCode, Frame, KickReason};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_util::sync::CancellationToken;

use super::ServerError;
use super::gateway::{Admission, FrameSink, FrameSource};
use super::input::{ClientConn, Input};
use crate::net::{Listener, ReadError, Stream, WriteError};
use crate::tls::{MaybeTls, ServerTls};
use crate::warn_gate::WarnGate;

/// The largest upgrade request head (request line and headers). A browser's is well under
/// 2 KiB; cookies for the server's name are the only thing that could make it large.
pub const MAX_HEAD: usize = 16 * 1024;

/// Headers in an upgrade request at most.
pub const MAX_HEADERS: usize = 64;

/// What a connection's WebSocket layer buffers for reading: frames are small, and most
/// connections are idle (tungstenite's default of 128 KiB would be allocated for each).
const WS_READ_BUFFER: usize = 4096;

/// Written out once this much is queued (the library's default, 128 KiB, is per
/// connection too).
const WS_WRITE_BUFFER: usize = 4096;

/// The longest WebSocket frame header (2 + 8 length bytes + 4 mask bytes).
const WS_FRAME_HEADER_MAX: usize = 14;

/// The answer to a plaintext request on a `wss://` port (unless it still takes plaintext):
/// a browser shows it, where a frame port would have nothing a plaintext peer could read.
const WSS_REQUIRED: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
content-type: text/plain; charset=utf-8\r\ncontent-length: 29\r\n\r\n\
this port speaks wss:// only\n";

/// Back-off after a failed accept (out of descriptors and the like), instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Which browser origins may open a WebSocket here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum OriginPolicy {
    /// No browser page may (the default): only clients that send no `Origin`.
    #[default]
    NoBrowsers,
    /// Pages of these origins (`scheme://host[:port]`, compared without case), and clients
    /// that send no `Origin`.
    Only(Vec<String>),
    /// Any page (`*`): for development only.
    Any,
}

impl OriginPolicy {
    /// From the flag's values: each may be a comma-separated list; `*` allows any origin.
    /// Empty entries are ignored; a trailing `/` is dropped (an `Origin` header has none).
    pub fn from_list<S: AsRef<str>>(values: &[S]) -> Result<Self, String> {
        let mut origins = Vec::new();
        for entry in values.iter().flat_map(|v| v.as_ref().split(',')) {
            let entry = entry.trim().trim_end_matches('/');
            if entry.is_empty() {
                continue;
            }
            if entry == "*" {
                return Ok(Self::Any);
            }
            let Some((scheme, rest)) = entry.split_once("://") else {
                return Err(format!(
                    "WebSocket allowed origin {entry:?} is not scheme://host[:port]"
                ));
            };
            if scheme.is_empty() || rest.is_empty() || rest.contains('/') {
                return Err(format!(
                    "WebSocket allowed origin {entry:?} is not scheme://host[:port]"
                ));
            }
            origins.push(entry.to_ascii_lowercase());
        }
        Ok(if origins.is_empty() {
            Self::NoBrowsers
        } else {
            Self::Only(origins)
        })
    }

    /// Whether a request with this `Origin` header (or none) may upgrade.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        match self {
            Self::Any => true,
            Self::NoBrowsers => false,
            Self::Only(origins) => {
                let origin = origin.trim().trim_end_matches('/');
                origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
            }
        }
    }
}

/// What the WebSocket listener counts, for `/metrics`.
#[derive(Debug, Default)]
pub struct WsStats {
    /// Connections upgraded and handed to the node.
    pub upgrades: AtomicU64,
    /// Refused at the upgrade for their `Origin` (403).
    pub origin_refusals: AtomicU64,
    /// Refused at the upgrade for a malformed, oversized or non-WebSocket request.
    pub bad_requests: AtomicU64,
    /// Closed for no complete request head within the header timeout.
    pub header_timeouts: AtomicU64,
    /// Closed because too many upgrades were already in progress.
    pub upgrades_refused_busy: AtomicU64,
}

/// The WebSocket listener's settings.
#[derive(Debug, Clone)]
pub(super) struct WsSettings {
    pub origins: OriginPolicy,
    pub header_timeout: Duration,
    pub io_timeout: Duration,
    pub codec: FrameCodec,
    pub tls: Option<ServerTls>,
    /// Shared with the TCP gateway's TLS handshakes.
    pub admission: Admission,
    pub stats: Arc<WsStats>,
    pub warnings: Arc<WarnGate>,
}

/// An upgraded connection, as the driver receives it.
pub(super) struct WsConn<S> {
    ws: WebSocketStream<S>,
}

/// Accepts WebSocket connections: each one's TLS handshake (when configured) and upgrade run
/// in a task of their own, under the caps and deadlines above, and only an upgraded
/// connection reaches the driver.
pub(super) async fn accept_loop<L: Listener>(
    mut listener: L,
    settings: WsSettings,
    inputs: mpsc::Sender<Input<MaybeTls<L::Stream>>>,
    cancel: CancellationToken,
) -> Result<(), ServerError> {
    let settings = Arc::new(settings);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                crate::warn_limited!(settings.warnings, "websocket accept", %error, "websocket accept failed");
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
                continue;
            }
        };
        let Some(permit) = settings.admission.try_admit() else {
            settings
                .stats
                .upgrades_refused_busy
                .fetch_add(1, Ordering::Relaxed);
            crate::warn_limited!(settings.warnings, "websocket busy", %peer, "too many WebSocket upgrades in progress; closing");
            continue;
        };
        let (settings, inputs, cancel) = (settings.clone(), inputs.clone(), cancel.clone());
        tokio::spawn(async move {
            let upgraded = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                upgraded = open(stream, &settings) => upgraded,
            };
            drop(permit);
            match upgraded {
                Ok(ws) => {
                    settings.stats.upgrades.fetch_add(1, Ordering::Relaxed);
                    let stream = ClientConn::Ws(Box::new(WsConn { ws }));
                    let _ = inputs.send(Input::Accepted { stream, peer }).await;
                }
                Err(error) => {
                    tracing::debug!(%peer, %error, "websocket upgrade refused");
                }
            }
        });
    }
}

/// Why a connection did not become a WebSocket.
#[derive(Debug, thiserror::Error)]
pub(super) enum UpgradeError {
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("no complete request head within {0:?}")]
    HeaderTimeout(Duration),
    #[error("closed before the request head was complete")]
    Closed,
    #[error("answered {status}: {reason}")]
    Refused { status: u16, reason: &'static str },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// TLS (when configured), then the upgrade. The TLS handshake and the request head share
/// one deadline, the header timeout from the accept (as on the HTTP listeners), so a slow
/// client cannot spend a handshake timeout and then a header timeout.
async fn open<S: Stream>(
    stream: S,
    settings: &WsSettings,
) -> Result<WebSocketStream<MaybeTls<S>>, UpgradeError> {
    let head_by = tokio::time::Instant::now() + settings.header_timeout;
    let stream = match &settings.tls {
        // `accept` has its own handshake deadline too; whichever ends first.
        Some(tls) => {
            let accepted = tokio::time::timeout_at(
                head_by,
                tls.accept_telling_plaintext(stream, Some(WSS_REQUIRED)),
            )
            .await;
            match accepted {
                Err(_) => return Err(header_timeout(settings)),
                Ok(accepted) => accepted.map_err(|e| UpgradeError::Tls(e.to_string()))?,
            }
        }
        None => MaybeTls::plain(stream),
    };
    upgrade(stream, head_by, settings).await
}

fn header_timeout(settings: &WsSettings) -> UpgradeError {
    settings
        .stats
        .header_timeouts
        .fetch_add(1, Ordering::Relaxed);
    UpgradeError::HeaderTimeout(settings.header_timeout)
}

/// Reads the request head by `head_by`, checks it, and answers `101` or an HTTP error (then
/// closes).
async fn upgrade<S: Stream>(
    mut stream: S,
    head_by: tokio::time::Instant,
    settings: &WsSettings,
) -> Result<WebSocketStream<S>, UpgradeError> {
    let read = tokio::time::timeout_at(head_by, read_head(&mut stream)).await;
    let (head, rest) = match read {
        Err(_) => return Err(header_timeout(settings)),
        Ok(Err(HeadError::Closed)) => return Err(UpgradeError::Closed),
        Ok(Err(HeadError::Io(error))) => return Err(error.into()),
        Ok(Err(HeadError::TooLarge)) => {
            let refusal = Refusal::new(431, "request head too large");
            return Err(refuse(stream, refusal, settings).await);
        }
        Ok(Ok(read)) => read,
    };
    let accept_key = match check_request(&head, &settings.origins) {
        Ok(key) => key,
        Err(refusal) => return Err(refuse(stream, refusal, settings).await),
    };
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-accept: {accept_key}\r\n\r\n"
    );
    let write = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.flush().await
    };
    match tokio::time::timeout(settings.io_timeout, write).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "writing the upgrade answer timed out",
            )
            .into());
        }
    }
    let config = ws_config(settings.codec.max_frame());
    // Bytes after the head belong to the WebSocket (a client may send its first message
    // without waiting for the 101).
    Ok(WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(config)).await)
}

/// The library's limits for one connection. Its write buffer is unbounded by default, and
/// it queues a pong for every ping it reads even while the socket does not take them: a
/// client that pings without reading would grow the server's memory at its own line rate
/// until the login timeout. Bounded at one batch plus one whole frame, extra pongs collapse
/// into the library's one pending pong and a data write waits (then the slow-consumer rule).
fn ws_config(max_frame: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(max_write_buffer(max_frame))
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// One batch, one whole frame and its header: more than `WS_WRITE_BUFFER` (the library
/// panics otherwise) and bounded by the frame limit, never by what a client sends.
fn max_write_buffer(max_frame: usize) -> usize {
    WS_WRITE_BUFFER + max_frame + WS_FRAME_HEADER_MAX
}

enum HeadError {
    Closed,
    TooLarge,
    Io(std::io::Error),
}

/// The request head (through its blank line) and whatever followed it.
async fn read_head<S: Stream>(stream: &mut S) -> Result<(Vec<u8>, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.map_err(HeadError::Io)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        // Search from a little before the new bytes: the blank line may straddle reads.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find_blank_line(&buf[from..]) {
            let end = from + end;
            if end > MAX_HEAD {
                return Err(HeadError::TooLarge);
            }
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

/// The end of the first `\r\n\r\n` (the byte after it), if any.
fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

/// An HTTP answer that refuses the upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Refusal {
    status: u16,
    reason: &'static str,
}

impl Refusal {
    fn new(status: u16, reason: &'static str) -> Self {
        Self { status, reason }
    }

    fn answer(&self) -> String {
        let phrase = match self.status {
            400 => "Bad Request",
            403 => "Forbidden",
            404 => "Not Found",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            _ => "Error",
        };
        let body = format!("{}\n", self.reason);
        // 426 names the one version spoken, as RFC 6455 asks.
        let version = if self.status == 426 {
            "sec-websocket-version: 13\r\n"
        } else {
            ""
        };
        format!(
            "HTTP/1.1 {} {phrase}\r\nconnection: close\r\n{version}content-type: text/plain; \
             charset=utf-8\r\ncontent-length: {}\r\n\r\n{body}",
            self.status,
            body.len()
        )
    }
}

/// Sends the refusal (bounded by the I/O timeout) and closes.
async fn refuse<S: Stream>(mut stream: S, refusal: Refusal, settings: &WsSettings) -> UpgradeError {
    let counter = if refusal.status == 403 {
        &settings.stats.origin_refusals
    } else {
        &settings.stats.bad_requests
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let write = async {
        stream.write_all(refusal.answer().as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(settings.io_timeout, write).await;
    UpgradeError::Refused {
        status: refusal.status,
        reason: refusal.reason,
    }
}

/// Checks an upgrade request head; on success, the `Sec-WebSocket-Accept` value.
pub(super) fn check_request(head: &[u8], origins: &OriginPolicy) -> Result<String, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(Refusal::new(400, "incomplete request")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(431, "too many request headers"));
        }
        Err(_) => return Err(Refusal::new(400, "malformed request")),
    }
    let header = |name: &str| {
        request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let has_token = |name: &str, token: &str| {
        request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    // The Origin first: a page of a refused origin learns nothing else about this port.
    if !origins.allows(header("origin")) {
        return Err(Refusal::new(403, "origin not allowed"));
    }
    if request.method != Some("GET") {
        return Err(Refusal::new(400, "only GET upgrades to a WebSocket"));
    }
    let path = request.path.unwrap_or_default();
    if path != "/" && !path.starts_with("/?") {
        return Err(Refusal::new(404, "the WebSocket gateway is at /"));
    }
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(Refusal::new(426, "this port speaks WebSocket only"));
    }
    if header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(Refusal::new(426, "WebSocket version 13 only"));
    }
    let Some(key) = header("sec-websocket-key").map(str::trim) else {
        return Err(Refusal::new(400, "no sec-websocket-key"));
    };
    Ok(tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// Splits an upgraded connection into the gateway's reader and writer. The reader leaves
/// the close it wants in `close`, for the writer to send after the node's `Error` frame.
pub(super) fn split<S: Stream>(conn: WsConn<S>, codec: FrameCodec) -> (WsReader<S>, WsWriter<S>) {
    let (sink, stream) = conn.ws.split();
    let close = Arc::new(OnceLock::new());
    (
        WsReader {
            stream,
            codec,
            close: close.clone(),
        },
        WsWriter {
            sink,
            close,
            last: None,
        },
    )
}

/// Closes an upgraded connection the node refused (connection limit, draining, store or
/// registry lost) with 1013, "try again later", and the refusal's words: the client goes
/// back to the route, which places it on a server that can take it.
pub(super) async fn close_refused<S: Stream>(conn: WsConn<S>, reason: String, timeout: Duration) {
    let mut ws = conn.ws;
    let frame = CloseFrame {
        code: CloseCode::Again,
        reason: Utf8Bytes::from(truncate_reason(&reason)),
    };
    let _ = tokio::time::timeout(timeout, ws.close(Some(frame))).await;
}

/// Why a text message is refused (and the close reason after one).
const TEXT_REFUSED: &str =
    "text messages are not part of the protocol: send each frame as one binary message";

/// The reading half: one binary message is one frame.
pub(super) struct WsReader<S> {
    stream: SplitStream<WebSocketStream<S>>,
    codec: FrameCodec,
    close: Arc<OnceLock<(CloseCode, String)>>,
}

impl<S: Stream> FrameSource for WsReader<S> {
    async fn next_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            let message = match self.stream.next().await {
                None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                    return Err(ReadError::Closed);
                }
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                    let error = DecodeError::FrameTooLarge {
                        len: size as u64,
                        max: max_size,
                    };
                    let _ = self.close.set((CloseCode::Size, error.to_string()));
                    return Err(ReadError::Decode(error));
                }
                Some(Err(WsError::Io(error))) => return Err(ReadError::Io(error)),
                Some(Err(error)) => {
                    // A broken WebSocket (bad masking, bad opcode, …) or a text message that
                    // is not even UTF-8: the close says which, where tungstenite can still
                    // send one (otherwise the close code of the last frame written would).
                    let close = match &error {
                        WsError::Utf8(_) => (CloseCode::Unsupported, TEXT_REFUSED.to_owned()),
                        _ => (CloseCode::Protocol, error.to_string()),
                    };
                    let _ = self.close.set(close);
                    return Err(ReadError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        error.to_string(),
                    )));
                }
                Some(Ok(message)) => message,
            };
            match message {
                Message::Binary(body) => {
                    return self.codec.decode_body(&body).map_err(|error| {
                        let code = match error {
                            DecodeError::FrameTooLarge { .. } => CloseCode::Size,
                            _ => CloseCode::Invalid,
                        };
                        let _ = self.close.set((code, error.to_string()));
                        ReadError::Decode(error)
                    });
                }
                Message::Text(_) => {
                    let _ = self
                        .close
                        .set((CloseCode::Unsupported, TEXT_REFUSED.to_owned()));
                    return Err(ReadError::Refused {
                        code: ErrorCode::MalformedFrame,
                        detail: TEXT_REFUSED.to_owned(),
                    });
                }
                // Answered by tungstenite (queued, sent with the next read or write).
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                // Ends the session as a TCP EOF does; tungstenite answers the close.
                Message::Close(_) => return Err(ReadError::Closed),
            }
        }
    }
}

/// The writing half: each length-prefixed frame the driver encoded goes out as one binary
/// message (its body, no copy), and the connection ends with a close frame saying why.
pub(super) struct WsWriter<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    close: Arc<OnceLock<(CloseCode, String)>>,
    /// The last frame written, if it is small enough to be a `Kick` or `Error` (which names
    /// the close code): a copy, so an idle connection does not pin the driver's encode
    /// buffer or a large answer it shares.
    last: Option<Bytes>,
}

/// `Kick` and `Error` frames are a code and a short text; a larger last frame is neither.
const LAST_FRAME_KEPT: usize = 1024;

impl<S: Stream> FrameSink for WsWriter<S> {
    async fn write_encoded(
        &mut self,
        frames: &mut [Bytes],
        timeout: Duration,
    ) -> Result<(), WriteError> {
        let write = async {
            let count = frames.len();
            for (i, frame) in frames.iter_mut().enumerate() {
                let mut record = std::mem::take(frame);
                // The driver's encoding carries a length prefix: a WebSocket message has
                // its own length, so the body alone is sent.
                let body = match prost::decode_length_delimiter(record.as_ref()) {
                    Ok(len) => {
                        record.advance(prost::length_delimiter_len(len));
                        record
                    }
                    Err(error) => return Err(std::io::Error::other(error)),
                };
                if i + 1 == count {
                    // Only the batch's last frame can be the one the connection ends on.
                    self.last =
                        (body.len() <= LAST_FRAME_KEPT).then(|| Bytes::copy_from_slice(&body));
                }
                self.sink.feed(Message::Binary(body)).await.map_err(ws_io)?;
            }
            self.sink.flush().await.map_err(ws_io)
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(WriteError::Timeout(timeout)),
        }
    }

    async fn shutdown(&mut self, timeout: Duration) {
        let (code, reason) = match self.close.get() {
            Some((code, reason)) => (*code, reason.clone()),
            None => self
                .last
                .as_deref()
                .map_or_else(|| (CloseCode::Normal, String::new()), close_code),
        };
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from(truncate_reason(&reason)),
        };
        let _ = tokio::time::timeout(timeout, self.sink.send(Message::Close(Some(frame)))).await;
    }
}

fn ws_io(error: WsError) -> std::io::Error {
    match error {
        WsError::Io(error) => error,
        other => std::io::Error::other(other),
    }
}

/// The close code and reason after the connection's last frame: a `Kick` or `Error` the
/// node sent before closing says why it closed.
///
/// - `Kick`: DRAINING is 1001 (going away: reconnect through the route); any other kick
///   (taken over, slow consumer, idle, fenced, …) is 4000 + its `KickReason` number.
/// - `Error`: a frame too large is 1009, a malformed frame 1007; any other error (a bad
///   ticket, not logged in, …) is 4100 + its `ErrorCode` number.
/// - Anything else: 1000, a normal close.
///
/// The reason is the frame's own text, cut to the 123 bytes a close frame can carry.
pub fn close_code(last: &[u8]) -> (CloseCode, String) {
    match Frame::decode(last).ok().and_then(|f| f.kind) {
        Some(Kind::Kick(kick)) => {
            let code = match kick.reason() {
                KickReason::Draining => CloseCode::Away,
                _ => CloseCode::from(4000 + kick.reason as u16),
            };
            (code, kick.message)
        }
        Some(Kind::Error(error)) => {
            let code = match error.code() {
                ErrorCode::FrameTooLarge => CloseCode::Size,
                ErrorCode::MalformedFrame => CloseCode::Invalid,
                _ => CloseCode::from(4100 + error.code as u16),
            };
            (code, error.message)
        }
        _ => (CloseCode::Normal, String::new()),
    }
}

/// At most 123 bytes (a close frame's payload is 125, two of them the code), whole
/// characters only.
fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_write_buffer_is_bounded_by_the_frame_limit_not_by_the_client() {
        for max_frame in [1024, 64 * 1024, 1 << 20] {
            let config = ws_config(max_frame);
            // Unbounded (the library's default) let pongs pile up for a client that pings
            // without reading.
            assert_ne!(config.max_write_buffer_size, usize::MAX);
            assert!(config.max_write_buffer_size <= WS_WRITE_BUFFER + max_frame + 64);
            // Room for one whole frame, and above the batch size (the library panics below).
            assert!(config.max_write_buffer_size >= max_frame + WS_FRAME_HEADER_MAX);
            assert!(config.max_write_buffer_size > config.write_buffer_size);
        }
    }

    #[test]
    fn tls_handshakes_and_upgrades_share_one_budget_with_the_established_connections() {
        let established = Arc::new(AtomicU64::new(0));
        let admission = Admission::new(3, established.clone());
        let tls_handshake = admission.try_admit().expect("a place");
        let upgrade = admission.clone().try_admit().expect("a place");
        let third = admission.try_admit().expect("a place");
        assert!(admission.try_admit().is_none(), "3 in progress of 3");
        drop(third);
        // One place left in the semaphore, but the node already holds one connection.
        established.store(1, Ordering::Relaxed);
        assert!(
            admission.try_admit().is_none(),
            "1 established + 2 in progress of 3"
        );
        established.store(0, Ordering::Relaxed);
        assert!(admission.try_admit().is_some());
        drop((tls_handshake, upgrade));
    }

    fn request(extra: &str) -> Vec<u8> {
        format!(
            "GET / HTTP/1.1\r\nhost: s1\r\nupgrade: websocket\r\nconnection: keep-alive, Upgrade\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn the_wss_refusal_is_one_well_formed_answer() {
        let text = std::str::from_utf8(WSS_REQUIRED).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.ends_with(&format!("content-length: {}", body.len())),
            "{text}"
        );
    }

    #[test]
    fn a_valid_upgrade_gets_the_rfc_accept_key() {
        let key = check_request(&request(""), &OriginPolicy::NoBrowsers).unwrap();
        // RFC 6455, section 1.3.
        assert_eq!(key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn origins_are_checked_before_anything_else() {
        let page = request("origin: https://chat.example\r\n");
        let refused = check_request(&page, &OriginPolicy::NoBrowsers).unwrap_err();
        assert_eq!(refused.status, 403);
        let allowed = OriginPolicy::from_list(&["https://CHAT.example/, http://x:1"]).unwrap();
        assert!(check_request(&page, &allowed).is_ok());
        let other = OriginPolicy::from_list(&["https://other.example"]).unwrap();
        assert_eq!(check_request(&page, &other).unwrap_err().status, 403);
        assert!(check_request(&page, &OriginPolicy::from_list(&["*"]).unwrap()).is_ok());
        // No Origin: a non-browser client, allowed under every policy.
        assert!(check_request(&request(""), &other).is_ok());
    }

    #[test]
    fn bad_origin_lists_are_refused() {
        assert!(OriginPolicy::from_list(&["chat.example"]).is_err());
        assert!(OriginPolicy::from_list(&["https://chat.example/path"]).is_err());
        assert_eq!(
            OriginPolicy::from_list::<&str>(&[]).unwrap(),
            OriginPolicy::NoBrowsers
        );
    }

    #[test]
    fn requests_that_are_no_upgrade_are_refused_with_their_status() {
        let plain = b"GET / HTTP/1.1\r\nhost: s1\r\n\r\n";
        assert_eq!(
            check_request(plain, &OriginPolicy::Any).unwrap_err().status,
            426
        );
        let path = String::from_utf8(request(""))
            .unwrap()
            .replace("GET / ", "GET /x ");
        assert_eq!(
            check_request(path.as_bytes(), &OriginPolicy::Any)
                .unwrap_err()
                .status,
            404
        );
        let old = String::from_utf8(request(""))
            .unwrap()
            .replace("version: 13", "version: 8");
        assert_eq!(
            check_request(old.as_bytes(), &OriginPolicy::Any)
                .unwrap_err()
                .status,
            426
        );
        assert_eq!(
            check_request(b"\x16\x03\x01garbage\r\n\r\n", &OriginPolicy::Any)
                .unwrap_err()
                .status,
            400
        );
        let many: String = (0..MAX_HEADERS).map(|i| format!("x-{i}: y\r\n")).collect();
        assert_eq!(
            check_request(&request(&many), &OriginPolicy::Any)
                .unwrap_err()
                .status,
            431
        );
    }

    #[test]
    fn close_codes_follow_the_final_frame() {
        let kick = |reason: KickReason| {
            Frame {
                kind: Some(Kind::Kick(cim_proto::Kick {
                    reason: reason as i32,
                    message: "m".into(),
                })),
            }
            .encode_to_vec()
        };
        assert_eq!(close_code(&kick(KickReason::Draining)).0, CloseCode::Away);
        assert_eq!(
            u16::from(close_code(&kick(KickReason::SlowConsumer)).0),
            4000 + KickReason::SlowConsumer as u16
        );
        let error = |code: ErrorCode| {
            Frame {
                kind: Some(Kind::Error(cim_proto::Error {
                    code: code as i32,
                    message: "e".into(),
                })),
            }
            .encode_to_vec()
        };
        assert_eq!(
            close_code(&error(ErrorCode::FrameTooLarge)).0,
            CloseCode::Size
        );
        assert_eq!(
            close_code(&error(ErrorCode::MalformedFrame)).0,
            CloseCode::Invalid
        );
        assert_eq!(
            u16::from(close_code(&error(ErrorCode::BadTicket)).0),
            4100 + ErrorCode::BadTicket as u16
        );
        assert_eq!(close_code(b"").0, CloseCode::Normal);
        assert_eq!(truncate_reason(&"é".repeat(100)).len(), 122);
    }
}
