//! Route links: routes dial the link port; each link is authenticated with
//! `cim_core::link_auth` (server challenge, route proof and challenge, server proof), then carries
//! pushes, kicks, send results and pings from the route, and sends from the server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cim_core::ids::ServerId;
use cim_core::link_auth::{self, MIN_NONCE_LEN};
use cim_proto::codec::FrameCodec;
use cim_proto::frame::Kind;
use cim_proto::{Frame, LinkAuth};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::input::{Input, LinkId};
use super::{LINK_IDLE_TIMEOUT, ServerError};
use crate::net::{FrameReader, FrameWriter, Listener, ReadError, Stream, framed};
use crate::nonces::{NoEntropy, NonceSource};
use crate::tls::{MaybeTls, ServerTls};
use crate::warn_gate::WarnGate;

const WRITE_BATCH: usize = 256;

/// Link connections not yet authenticated (TLS handshake and challenge-response) at once.
/// A deployment has a handful of routes; past this a new connection is closed at once, so
/// a flood on the link port cannot take the descriptors the gateway and `/health` need.
const MAX_PENDING_LINKS: usize = 256;
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What every link task needs to authenticate its route.
#[derive(Debug, Clone)]
pub(super) struct LinkSettings {
    pub server_id: ServerId,
    pub secret: Arc<[u8]>,
    /// Also accepted during a rotation.
    pub previous_secret: Option<Arc<[u8]>>,
    pub codec: FrameCodec,
    pub io_timeout: Duration,
    /// Rate-limits the warnings a flood of strangers on the link port would write.
    pub warnings: Arc<WarnGate>,
    /// Mutual TLS: the route's certificate must carry the route role (none: plaintext).
    pub tls: Option<ServerTls>,
    /// The handshake's nonces (the OS in production).
    pub nonces: NonceSource,
}

/// Why a link did not authenticate. The link is closed; nothing else changed.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error(transparent)]
    Entropy(#[from] NoEntropy),
    #[error("sending the hello: {0}")]
    Hello(crate::net::WriteError),
    #[error("reading the route's answer: {0}")]
    Read(ReadError),
    #[error("expected LinkAuth, got another frame")]
    Unexpected,
    #[error(transparent)]
    Auth(#[from] link_auth::LinkAuthError),
    #[error("sending LinkAuthOk: {0}")]
    Ok(crate::net::WriteError),
}

pub(super) async fn accept_loop<L: Listener>(
    mut listener: L,
    settings: LinkSettings,
    inputs: mpsc::Sender<Input<MaybeTls<L::Stream>>>,
    cancel: CancellationToken,
) -> Result<(), ServerError> {
    let mut next_link: LinkId = 1;
    let pending = Arc::new(Semaphore::new(MAX_PENDING_LINKS));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(permit) = pending.clone().try_acquire_owned() else {
                    crate::warn_limited!(settings.warnings, "link flood", %peer, "too many link connections authenticating; closing");
                    let _ = inputs.send(Input::LinkAuthFailed).await;
                    continue;
                };
                let link = next_link;
                next_link += 1;
                tokio::spawn(serve_link(
                    link,
                    stream,
                    peer,
                    permit,
                    settings.clone(),
                    inputs.clone(),
                    cancel.child_token(),
                ));
            }
            Err(error) => {
                crate::warn_limited!(settings.warnings, "link accept", %error, "link accept failed");
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

/// Authenticates the link, hands its write half to the driver, then reads until it fails,
/// goes silent for [`LINK_IDLE_TIMEOUT`], or the driver drops it (`token`).
async fn serve_link<S: Stream>(
    link: LinkId,
    stream: S,
    peer: SocketAddr,
    authenticating: OwnedSemaphorePermit,
    settings: LinkSettings,
    inputs: mpsc::Sender<Input<MaybeTls<S>>>,
    token: CancellationToken,
) {
    let stream = match &settings.tls {
        None => MaybeTls::plain(stream),
        Some(tls) => {
            let accepted = tokio::select! {
                biased;
                _ = token.cancelled() => return,
                accepted = tls.accept(stream) => accepted,
            };
            match accepted {
                Ok(stream) => stream,
                // Gone before the handshake (a killed or restarting route): nothing refused.
                Err(crate::tls::AcceptError::Closed) => return,
                Err(error) => {
                    crate::warn_limited!(
                        settings.warnings,
                        "link tls",
                        link,
                        %peer,
                        %error,
                        "route link refused at the TLS handshake; closing"
                    );
                    let _ = inputs.send(Input::LinkAuthFailed).await;
                    return;
                }
            }
        }
    };
    let (mut reader, mut writer) = framed(stream, settings.codec);
    let handshake = tokio::select! {
        biased;
        _ = token.cancelled() => return,
        handshake = handshake(&settings, &mut reader, &mut writer) => handshake,
    };
    drop(authenticating);
    let route_id = match handshake {
        Ok(route_id) => route_id,
        // The route went away before answering (it was killed or restarted, or it dropped a
        // dial it no longer needs): nothing was refused, so it is no authentication failure.
        Err(HandshakeError::Read(ReadError::Closed | ReadError::Io(_))) => {
            tracing::debug!(link, %peer, "route link closed before authenticating");
            return;
        }
        Err(error) => {
            let likely_cause = match error {
                HandshakeError::Auth(_) => {
                    "the route's link secret (CIM_LINK_SECRET) differs from this server's"
                }
                _ => "not a CIM route, or a route of another version",
            };
            crate::warn_limited!(
                settings.warnings,
                "link auth",
                link,
                %peer,
                %error,
                likely_cause,
                "route link failed to authenticate; closing"
            );
            let _ = inputs.send(Input::LinkAuthFailed).await;
            writer.shutdown(settings.io_timeout).await;
            return;
        }
    };
    let up = Input::LinkUp {
        link,
        route_id,
        peer,
        writer,
        token: token.clone(),
    };
    if inputs.send(up).await.is_err() {
        return;
    }
    let reason = read_loop(link, &mut reader, &inputs, &token).await;
    if let Some(reason) = reason {
        let _ = inputs.send(Input::LinkDown { link, reason }).await;
    }
    // Stops the writer too, if it is still running.
    token.cancel();
}

/// Server side of the handshake; returns the route's id.
async fn handshake<S: Stream>(
    settings: &LinkSettings,
    reader: &mut FrameReader<ReadHalf<S>>,
    writer: &mut FrameWriter<WriteHalf<S>>,
) -> Result<String, HandshakeError> {
    let mut nonce = [0u8; 2 * MIN_NONCE_LEN];
    settings.nonces.fill(&mut nonce)?;
    let hello = link_auth::server_hello(&settings.server_id, &nonce);
    let frame = Frame {
        kind: Some(Kind::LinkHello(hello.clone())),
    };
    writer
        .write_frame(&frame, settings.io_timeout)
        .await
        .map_err(HandshakeError::Hello)?;
    let auth: LinkAuth = match reader.read_frame(settings.io_timeout).await {
        Ok(Frame {
            kind: Some(Kind::LinkAuth(auth)),
        }) => auth,
        Ok(_) => return Err(HandshakeError::Unexpected),
        Err(error) => return Err(HandshakeError::Read(error)),
    };
    let ok = match &settings.previous_secret {
        None => link_auth::server_check(&settings.secret, &hello, &auth)?,
        Some(previous) => {
            link_auth::server_check_any(&[&settings.secret, previous], &hello, &auth)?
        }
    };
    let frame = Frame {
        kind: Some(Kind::LinkAuthOk(ok)),
    };
    writer
        .write_frame(&frame, settings.io_timeout)
        .await
        .map_err(HandshakeError::Ok)?;
    Ok(auth.route_id)
}

/// Forwards the route's frames; returns why the link ended (`None` when the driver dropped
/// it or the server is stopping).
async fn read_loop<S: Stream>(
    link: LinkId,
    reader: &mut FrameReader<ReadHalf<S>>,
    inputs: &mpsc::Sender<Input<S>>,
    token: &CancellationToken,
) -> Option<String> {
    loop {
        let read = tokio::select! {
            biased;
            _ = token.cancelled() => return None,
            read = reader.read_frame(LINK_IDLE_TIMEOUT) => read,
        };
        let frame = match read {
            Ok(frame) => frame,
            Err(error) => return Some(error.to_string()),
        };
        match &frame.kind {
            Some(
                Kind::PushBatch(_) | Kind::KickUser(_) | Kind::RouteSendResult(_) | Kind::Ping(_),
            ) => {
                tracing::trace!(link, ?frame, "route frame");
                if inputs.send(Input::LinkFrame { link, frame }).await.is_err() {
                    return None;
                }
            }
            _ => return Some(format!("unexpected frame from the route: {frame:?}")),
        }
    }
}

/// Starts the writer of an authenticated link. It ends when the driver drops the queue
/// (after flushing it), when a write fails (reported as `LinkDown`), or on `token`.
pub(super) fn spawn_writer<S: Stream>(
    link: LinkId,
    writer: FrameWriter<WriteHalf<S>>,
    queue: mpsc::Receiver<Frame>,
    inputs: mpsc::Sender<Input<S>>,
    io_timeout: Duration,
    token: CancellationToken,
) {
    tokio::spawn(write_loop(link, writer, queue, inputs, io_timeout, token));
}

async fn write_loop<S: Stream>(
    link: LinkId,
    mut writer: FrameWriter<WriteHalf<S>>,
    mut queue: mpsc::Receiver<Frame>,
    inputs: mpsc::Sender<Input<S>>,
    io_timeout: Duration,
    token: CancellationToken,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut flushed = false;
    loop {
        let first = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            first = queue.recv() => first,
        };
        let Some(first) = first else {
            flushed = true;
            break;
        };
        super::fill_batch(&mut batch, first, &mut queue, WRITE_BATCH);
        let written = tokio::select! {
            biased;
            _ = token.cancelled() => break,
            written = writer.write_frames(&batch, io_timeout) => written,
        };
        if let Err(error) = written {
            let reason = format!("write failed: {error}");
            let _ = inputs.send(Input::LinkDown { link, reason }).await;
            break;
        }
    }
    if flushed {
        writer.shutdown(io_timeout).await;
    }
    // Stops the reader too (a drained link is closed both ways).
    token.cancel();
    let _ = inputs.send(Input::WriterDone).await;
}
