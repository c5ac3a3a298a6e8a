//! The SDK's side of a server's WebSocket gateway: one binary message per frame, the same
//! frames as the TCP gateway. Browsers are what the gateway is for; the SDK speaks it so the
//! path can be tested and benchmarked with the same client machine as TCP.

use std::future::Future;
use std::time::Duration;

use cim_proto::Frame;
use cim_proto::codec::FrameCodec;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt as _, StreamExt as _};
use prost::Message as _;
use tokio::io::{ReadHalf, WriteHalf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::net::{FrameReader, FrameWriter, Stream};

/// Where a `wsUrl` points: what to connect to, and the URL for the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WsTarget {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub url: String,
}

impl WsTarget {
    /// Parses `ws://host[:port][/path]` or `wss://…` (an IPv6 host in brackets).
    pub fn parse(url: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("wsUrl {url:?}: {why}");
        let (tls, rest) = if let Some(rest) = url.strip_prefix("wss://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("ws://") {
            (false, rest)
        } else {
            return Err(bad("not ws:// or wss://"));
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
                (host, after.strip_prefix(':'))
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(port) => port.parse().map_err(|_| bad("bad port"))?,
            None if tls => 443,
            None => 80,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            tls,
            url: url.to_owned(),
        })
    }
}

/// A connection's reading half, whichever gateway it reached.
pub(super) trait ReadFrames: Send {
    /// The next frame; an error ends the connection (its text is for the log).
    fn next_frame(&mut self) -> impl Future<Output = Result<Frame, String>> + Send;

    /// A frame already received and buffered, if any; never waits. An error ends the
    /// connection like one from [`Self::next_frame`].
    fn buffered_frame(&mut self) -> Result<Option<Frame>, String> {
        Ok(None)
    }
}

/// A connection's writing half, whichever gateway it reached.
pub(super) trait WriteFrames: Send {
    /// Writes the frames, all within `timeout`.
    fn write_frames(
        &mut self,
        frames: &[Frame],
        timeout: Duration,
    ) -> impl Future<Output = Result<(), String>> + Send;

    /// Ends the connection once everything is written (best effort, bounded by `timeout`).
    fn shutdown(&mut self, timeout: Duration) -> impl Future<Output = ()> + Send;
}

impl<S: Stream> ReadFrames for FrameReader<ReadHalf<S>> {
    async fn next_frame(&mut self) -> Result<Frame, String> {
        FrameReader::next_frame(self)
            .await
            .map_err(|e| e.to_string())
    }

    fn buffered_frame(&mut self) -> Result<Option<Frame>, String> {
        FrameReader::buffered_frame(self).map_err(|e| e.to_string())
    }
}

impl<S: Stream> WriteFrames for FrameWriter<WriteHalf<S>> {
    async fn write_frames(&mut self, frames: &[Frame], timeout: Duration) -> Result<(), String> {
        FrameWriter::write_frames(self, frames, timeout)
            .await
            .map_err(|e| e.to_string())
    }

    async fn shutdown(&mut self, timeout: Duration) {
        FrameWriter::shutdown(self, timeout).await;
    }
}

/// Upgrades a connected (and, for `wss://`, TLS) stream to a WebSocket at `url`. The
/// message limit is the frame limit: a larger message ends the connection, as a larger
/// frame does over TCP.
pub(super) async fn upgrade<S: Stream>(
    stream: S,
    url: &str,
    codec: FrameCodec,
) -> Result<(WsFrameReader<S>, WsFrameWriter<S>), String> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(codec.max_frame()))
        .max_frame_size(Some(codec.max_frame()));
    let (ws, _response) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| e.to_string())?;
    let (sink, stream) = ws.split();
    Ok((
        WsFrameReader { stream, codec },
        WsFrameWriter { sink, codec },
    ))
}

pub(super) struct WsFrameReader<S> {
    stream: SplitStream<WebSocketStream<S>>,
    codec: FrameCodec,
}

impl<S: Stream> ReadFrames for WsFrameReader<S> {
    async fn next_frame(&mut self) -> Result<Frame, String> {
        loop {
            match self.stream.next().await {
                None => return Err("the server closed the WebSocket".to_owned()),
                Some(Err(error)) => return Err(error.to_string()),
                Some(Ok(Message::Binary(body))) => {
                    return self.codec.decode_body(&body).map_err(|e| e.to_string());
                }
                // The gateway sends only binary messages; anything else is a broken peer.
                Some(Ok(Message::Text(_))) => {
                    return Err("the server sent a text message".to_owned());
                }
                // The close says why (the gateway's close codes); the session learns it
                // from the Kick or Error frame sent before it.
                Some(Ok(Message::Close(close))) => {
                    return Err(format!("the server closed the WebSocket: {close:?}"));
                }
                // Answered by tungstenite.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
            }
        }
    }
}

pub(super) struct WsFrameWriter<S> {
    sink: SplitSink<WebSocketStream<S>, Message>,
    codec: FrameCodec,
}

impl<S: Stream> WriteFrames for WsFrameWriter<S> {
    async fn write_frames(&mut self, frames: &[Frame], timeout: Duration) -> Result<(), String> {
        let write = async {
            for frame in frames {
                let len = frame.encoded_len();
                if len > self.codec.max_frame() {
                    return Err(format!(
                        "frame of {len} bytes exceeds the limit of {}",
                        self.codec.max_frame()
                    ));
                }
                let body = frame.encode_to_vec();
                self.sink
                    .feed(Message::Binary(body.into()))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            self.sink.flush().await.map_err(|e| e.to_string())
        };
        tokio::time::timeout(timeout, write)
            .await
            .unwrap_or_else(|_| Err(format!("write not done within {timeout:?}")))
    }

    async fn shutdown(&mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.sink.close()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host, port and TLS a `wsUrl` names; `None` for a refused URL.
    type Parsed = Option<(&'static str, u16, bool)>;

    #[test]
    fn ws_urls_parse_into_where_to_connect() {
        let cases: &[(&str, Parsed)] = &[
            ("ws://127.0.0.1:11412/", Some(("127.0.0.1", 11412, false))),
            ("wss://s1.example:8443/", Some(("s1.example", 8443, true))),
            ("wss://s1.example/", Some(("s1.example", 443, true))),
            ("ws://s1.example", Some(("s1.example", 80, false))),
            ("ws://[::1]:9000/", Some(("::1", 9000, false))),
            ("http://s1.example/", None),
            ("ws://:80/", None),
            ("ws://h:notaport/", None),
            ("ws://[::1/", None),
        ];
        for (url, want) in cases {
            let got = WsTarget::parse(url).map(|t| (t.host, t.port, t.tls));
            match (got, want) {
                (Ok(got), Some((host, port, tls))) => {
                    assert_eq!(got, (host.to_string(), *port, *tls), "{url}")
                }
                (Err(_), None) => {}
                (got, want) => panic!("{url}: got {got:?}, want {want:?}"),
            }
        }
    }
}
