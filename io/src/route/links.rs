//! One route→server link: dial, authenticate, carry frames, keep alive, redial.
//!
//! The task runs for as long as its server is in the registry view; the driver aborts it
//! when the server leaves (dropping the socket closes the link). Each authenticated
//! connection gets a fresh bounded outbound queue, announced to the driver with
//! [`Input::LinkUp`]; when the connection ends the queue is dropped with it, so frames
//! meant for a dead connection are never written to the next one, and the driver counts
//! what it could not queue.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cim_core::ids::ServerId;
use cim_core::link_auth::{self, LinkAuthError};
use cim_core::registry::LiveServer;
use cim_proto::codec::FrameCodec;
use cim_proto::frame::Kind;
use cim_proto::{ErrorCode, Frame, LinkAuth, LinkHello, Ping, Pong};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::counters::Counters;
use super::input::{Input, LinkInbound};
use super::link_states::{FailureCause, LinkState};
use crate::clock::Clock;
use crate::net::{self, FrameReader, FrameWriter, Network, ReadError, WriteError};
use crate::nonces::{NoEntropy, NonceSource};
use crate::tls::{ClientTls, MaybeTls};

// Frames waiting for one link's writer. Past it the driver drops (and counts) frames: a
// server that cannot keep up recovers through its clients' syncs.
use crate::net::LINK_QUEUE;

/// Frames written in one go when several are queued.
const WRITE_BATCH: usize = 64;

/// Sends awaiting their result whose arrival time a link keeps, for the latency histogram.
const PENDING_SEND_TIMES: usize = 4 * LINK_QUEUE;

/// Route nonce length: above the 16-byte minimum.
const NONCE_LEN: usize = 32;

/// What a link task needs.
#[derive(Clone)]
pub(super) struct LinkConfig {
    pub route_id: String,
    pub link_secret: Vec<u8>,
    /// During a rotation: tried when the server refuses `link_secret`.
    pub link_secret_previous: Option<Vec<u8>>,
    pub max_frame: usize,
    pub io_timeout: Duration,
    pub ping_interval: Duration,
    pub retry_delay: Duration,
    /// Mutual TLS to the servers' link ports (none: plaintext).
    pub tls: Option<ClientTls>,
    /// The handshake's nonces (the OS in production).
    pub nonces: NonceSource,
}

/// Why a link (attempt) ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum LinkError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error(transparent)]
    Tls(#[from] crate::tls::ConnectError),
    #[error("read: {0}")]
    Read(#[from] ReadError),
    #[error("write: {0}")]
    Write(#[from] WriteError),
    #[error("handshake: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("handshake: dialled {dialled} but the hello names {named:?}")]
    WrongServer { dialled: ServerId, named: String },
    #[error("handshake: {0}")]
    Auth(#[from] LinkAuthError),
    /// The server closed the link after our proof: most likely it has another secret.
    #[error("handshake: the server refused our proof ({0})")]
    Refused(ReadError),
    #[error("server sent an error frame: {0}")]
    Peer(String),
    #[error("no frame for {0:?}: link dead")]
    Silent(Duration),
    #[error("handshake: {0}")]
    Entropy(#[from] NoEntropy),
    #[error("the driver is gone")]
    DriverGone,
}

fn kind_name(frame: &Frame) -> String {
    frame
        .kind
        .as_ref()
        .map_or("an empty frame", Kind::name)
        .to_owned()
}

/// What a link's failure most likely means (see [`FailureCause`]).
fn failure_cause(error: &LinkError) -> FailureCause {
    match error {
        LinkError::Refused(_) | LinkError::Auth(_) => FailureCause::Secret,
        LinkError::Tls(_) => FailureCause::Certificate,
        LinkError::Connect(_) => FailureCause::Unreachable,
        _ => FailureCause::Other,
    }
}

/// Removes its server's entry when the link task ends (aborted when the server leaves).
struct StateGuard {
    counters: Arc<Counters>,
    server: ServerId,
    generation: u64,
}

impl Drop for StateGuard {
    fn drop(&mut self) {
        self.counters
            .link_states
            .remove(&self.server, self.generation);
    }
}

/// Dials and serves `server` until aborted.
pub(super) async fn run_link<N: Network>(
    net: N,
    clock: Clock,
    server: LiveServer,
    generation: u64,
    config: Arc<LinkConfig>,
    to_driver: mpsc::Sender<Input>,
    counters: Arc<Counters>,
) {
    // During a rotation a server may still be on the previous secret: after a refusal the
    // next dial uses the other one, and keeps it while it works.
    let mut use_previous = false;
    let mut quiet = QuietFailures::default();
    counters
        .link_states
        .set(&server.id, generation, LinkState::Dialling);
    let _state = StateGuard {
        counters: counters.clone(),
        server: server.id.clone(),
        generation,
    };
    loop {
        counters.link_dials.fetch_add(1, Ordering::Relaxed);
        let secret = match (&config.link_secret_previous, use_previous) {
            (Some(previous), true) => previous.as_slice(),
            _ => config.link_secret.as_slice(),
        };
        let (ended, was_up) = match connect(&net, &server, &config, secret).await {
            Ok((reader, writer)) => {
                counters.link_connects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(server = %server.id, "link up");
                counters
                    .link_states
                    .set(&server.id, generation, LinkState::Up);
                quiet = QuietFailures::default();
                let (tx, rx) = mpsc::channel(LINK_QUEUE);
                let up = Input::LinkUp {
                    server: server.id.clone(),
                    generation,
                    tx,
                };
                if to_driver.send(up).await.is_err() {
                    return;
                }
                let error = serve(
                    &clock,
                    &server.id,
                    generation,
                    &config,
                    reader,
                    writer,
                    rx,
                    &to_driver,
                    &counters.latency,
                )
                .await;
                let down = Input::LinkDown {
                    server: server.id.clone(),
                    generation,
                };
                if matches!(error, LinkError::DriverGone) || to_driver.send(down).await.is_err() {
                    return;
                }
                // A link that was up and went down (a server restart, a network blip) is not
                // a failing link until the next dial says so.
                counters
                    .link_states
                    .set(&server.id, generation, LinkState::Dialling);
                (error, true)
            }
            Err(error) => (error, false),
        };
        counters.link_failures.fetch_add(1, Ordering::Relaxed);
        if !was_up {
            let cause = failure_cause(&ended);
            counters
                .link_states
                .set(&server.id, generation, LinkState::Failing(cause));
        }
        if matches!(ended, LinkError::Refused(_)) && config.link_secret_previous.is_some() {
            use_previous = !use_previous;
        }
        quiet.report(&server.id, &ended);
        tokio::time::sleep(config.retry_delay).await;
    }
}

/// How often a link that keeps failing (a server with a certificate this route refuses,
/// the wrong secret, a dead host) is logged: the first failure at once, then one line per
/// interval with the number left out, instead of one per redial.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct QuietFailures {
    last_logged: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl QuietFailures {
    fn report(&mut self, server: &ServerId, error: &LinkError) {
        let now = tokio::time::Instant::now();
        if self
            .last_logged
            .is_some_and(|at| now.duration_since(at) < FAILURE_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        let cause = failure_cause(error);
        if cause == FailureCause::Other {
            tracing::warn!(server = %server, %error, suppressed = self.suppressed, "link failed; redialling");
        } else {
            tracing::warn!(server = %server, %error, suppressed = self.suppressed, likely_cause = cause.hint(), "link failed; redialling");
        }
        self.last_logged = Some(now);
        self.suppressed = 0;
    }
}

type Reader<N> = FrameReader<tokio::io::ReadHalf<MaybeTls<<N as Network>::Stream>>>;
type Writer<N> = FrameWriter<tokio::io::WriteHalf<MaybeTls<<N as Network>::Stream>>>;

/// Dial, then the route's side of the challenge-response (see `cim_core::link_auth`).
async fn connect<N: Network>(
    net: &N,
    server: &LiveServer,
    config: &LinkConfig,
    secret: &[u8],
) -> Result<(Reader<N>, Writer<N>), LinkError> {
    let stream = net::connect(net, &server.host, server.link_port, config.io_timeout)
        .await
        .map_err(LinkError::Connect)?;
    let stream = match &config.tls {
        Some(tls) => {
            let handshake = tls.connect(stream, &server.host);
            match tokio::time::timeout(config.io_timeout, handshake).await {
                Ok(stream) => stream?,
                Err(_) => return Err(LinkError::Connect(std::io::ErrorKind::TimedOut.into())),
            }
        }
        None => MaybeTls::plain(stream),
    };
    let (mut reader, mut writer) = net::framed(stream, FrameCodec::new(config.max_frame));
    let frame = reader.read_frame(config.io_timeout).await?;
    let hello: LinkHello = match frame.kind {
        Some(Kind::LinkHello(hello)) => hello,
        Some(Kind::Error(e)) => return Err(LinkError::Peer(e.message)),
        _ => {
            return Err(LinkError::Unexpected {
                expected: "link_hello",
                got: kind_name(&frame),
            });
        }
    };
    // The MAC proves only that the peer knows the shared secret; the id must be the one we
    // meant to reach, or a misconfigured registry entry would get another server's pushes.
    if hello.server_id != server.id.as_str() {
        return Err(LinkError::WrongServer {
            dialled: server.id.clone(),
            named: hello.server_id,
        });
    }
    let mut nonce = [0u8; NONCE_LEN];
    config.nonces.fill(&mut nonce)?;
    let auth: LinkAuth = link_auth::route_answer(secret, &hello, &config.route_id, &nonce)?;
    let frame = Frame {
        kind: Some(Kind::LinkAuth(auth.clone())),
    };
    writer.write_frame(&frame, config.io_timeout).await?;
    let frame = match reader.read_frame(config.io_timeout).await {
        Ok(frame) => frame,
        Err(error @ (ReadError::Closed | ReadError::Io(_))) => {
            return Err(LinkError::Refused(error));
        }
        Err(error) => return Err(error.into()),
    };
    match frame.kind {
        Some(Kind::LinkAuthOk(ok)) => link_auth::route_check(secret, &hello, &auth, &ok)?,
        Some(Kind::Error(e)) => return Err(LinkError::Peer(e.message)),
        _ => {
            return Err(LinkError::Unexpected {
                expected: "link_auth_ok",
                got: kind_name(&frame),
            });
        }
    }
    Ok((reader, writer))
}

/// Carries frames until the connection fails. Reads are forwarded to the driver (Ping and
/// Pong are answered or absorbed here); queued frames are written in batches; a Ping goes
/// out every `ping_interval`, and 3 intervals without any frame from the server is death.
#[allow(clippy::too_many_arguments)]
async fn serve<R, W>(
    clock: &Clock,
    server: &ServerId,
    generation: u64,
    config: &LinkConfig,
    mut reader: FrameReader<R>,
    mut writer: FrameWriter<W>,
    mut rx: mpsc::Receiver<Frame>,
    to_driver: &mpsc::Sender<Input>,
    latency: &super::latency::Latency,
) -> LinkError
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let silence = config.ping_interval * 3;
    let mut last_heard = clock.now();
    let mut next_ping = clock.now() + config.ping_interval;
    let mut ping_nonce = 0u64;
    let mut batch: Vec<Frame> = Vec::with_capacity(WRITE_BATCH);
    // When each send read off this link arrived, by request id, until its result goes back
    // (for `cim_route_send_seconds`). Bounded: a result that never comes ages out.
    let mut sends_started: std::collections::BTreeMap<u64, tokio::time::Instant> =
        std::collections::BTreeMap::new();
    loop {
        let dead_at = last_heard + silence;
        tokio::select! {
            biased;
            frame = reader.next_frame() => {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => return e.into(),
                };
                last_heard = clock.now();
                let inbound = match frame.kind {
                    Some(Kind::RouteSend(send)) => {
                        if sends_started.len() >= PENDING_SEND_TIMES {
                            sends_started.pop_first();
                        }
                        sends_started.insert(send.request_id, tokio::time::Instant::now());
                        LinkInbound::Send(send)
                    }
                    Some(Kind::KickUserDone(done)) => LinkInbound::KickDone(done),
                    Some(Kind::Pong(_)) => continue,
                    Some(Kind::Ping(Ping { nonce })) => {
                        let pong = Frame { kind: Some(Kind::Pong(Pong { nonce })) };
                        if let Err(e) = writer.write_frame(&pong, config.io_timeout).await {
                            return e.into();
                        }
                        continue;
                    }
                    Some(Kind::Error(e)) => return LinkError::Peer(e.message),
                    _ => {
                        let got = kind_name(&frame);
                        tracing::warn!(%server, frame = %got, "unexpected frame on a link; closing it");
                        let error = Frame {
                            kind: Some(Kind::Error(cim_proto::Error {
                                code: ErrorCode::UnexpectedFrame as i32,
                                message: format!("a route does not take {got} on a link"),
                            })),
                        };
                        let _ = writer.write_frame(&error, config.io_timeout).await;
                        writer.shutdown(config.io_timeout).await;
                        return LinkError::Unexpected { expected: "route_send or kick_user_done", got };
                    }
                };
                let input = Input::LinkFrame { server: server.clone(), generation, frame: inbound };
                if to_driver.send(input).await.is_err() {
                    return LinkError::DriverGone;
                }
            }
            n = rx.recv_many(&mut batch, WRITE_BATCH) => {
                if n == 0 {
                    // The driver dropped our queue: it is shutting down or replaced us.
                    writer.shutdown(config.io_timeout).await;
                    return LinkError::DriverGone;
                }
                tracing::debug!(%server, frames = n, "link write");
                for frame in &batch {
                    if let Some(Kind::RouteSendResult(result)) = &frame.kind
                        && let Some(started) = sends_started.remove(&result.request_id)
                    {
                        latency.send_link.observe(started.elapsed());
                    }
                }
                let written = writer.write_frames(batch.iter(), config.io_timeout).await;
                batch.clear();
                if let Err(e) = written {
                    return e.into();
                }
            }
            () = clock.sleep_until(next_ping) => {
                ping_nonce += 1;
                let ping = Frame { kind: Some(Kind::Ping(Ping { nonce: ping_nonce })) };
                if let Err(e) = writer.write_frame(&ping, config.io_timeout).await {
                    return e.into();
                }
                next_ping = clock.now() + config.ping_interval;
            }
            () = clock.sleep_until(dead_at) => {
                return LinkError::Silent(silence);
            }
        }
    }
}
