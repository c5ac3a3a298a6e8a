//! The client gateways: the TCP accept loop, and per connection one reader task (decoded
//! frames to the driver) and one writer task (a bounded queue of frames to the socket).
//!
//! Both tasks are generic over how frames are carried ([`FrameSource`], [`FrameSink`]): a
//! length prefix on TCP, one binary message each on a WebSocket (`super::ws`). Everything
//! after framing (the driver, the node, the queues, the linger) is one code path.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cim_core::server::ConnId;
use cim_proto::Frame;
use cim_proto::codec::FrameCodec;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::ServerError;
use super::input::Input;
use crate::net::{FrameReader, FrameWriter, Listener, ReadError, Stream, WriteError};
use crate::tls::{MaybeTls, ServerTls};
use crate::warn_gate::WarnGate;

/// Frames written to the socket in one go (and reported in one `Written`): tokio's limit on
/// slices per vectored write.
const WRITE_BATCH: usize = 64;

/// Clients send small frames (sends, acks, pings), and most connections are idle most of
/// the time, waiting in a read with this much buffer.
const CLIENT_READ_CHUNK: usize = 1024;

/// The write batch's capacity kept across writes; a burst's larger batch is given back once
/// the queue is empty, so an idle connection holds next to nothing.
const IDLE_BATCH: usize = 4;

/// Back-off after a failed accept (out of descriptors and the like), instead of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The one budget of sockets not yet handed to the node: TLS handshakes on the TCP gateway
/// and WebSocket upgrades (with their TLS) share it, and a socket is admitted only while the
/// node's connections plus those in progress stay under `max_connections`. So slow clients
/// on both ports together hold at most `max_connections` descriptors, as plaintext clients
/// waiting to log in do (separate budgets let them hold several times that, past the
/// open-file limit the cap was clamped to).
#[derive(Debug, Clone)]
pub(super) struct Admission {
    in_progress: Arc<Semaphore>,
    /// The node's connection count, as the driver last published it.
    established: Arc<AtomicU64>,
}

impl Admission {
    pub(super) fn new(max_connections: usize, established: Arc<AtomicU64>) -> Self {
        Self {
            in_progress: Arc::new(Semaphore::new(max_connections.max(1))),
            established,
        }
    }

    /// A place for one more socket in progress, or `None` when the budget is spent. The
    /// place is held until the permit is dropped (the socket reached the node or failed).
    pub(super) fn try_admit(&self) -> Option<OwnedSemaphorePermit> {
        // established + in progress < max  ⇔  established < available places.
        let available = self.in_progress.available_permits() as u64;
        if self.established.load(Ordering::Relaxed) >= available {
            return None;
        }
        self.in_progress.clone().try_acquire_owned().ok()
    }
}

/// Hands every accepted socket to the driver, which decides whether to keep it. With TLS,
/// each socket first completes its handshake in a task of its own (within the handshake
/// timeout), so a slow one holds up no other.
///
/// Handshakes in progress count against the connection cap (`max_connections`, already
/// clamped to the open-file limit) through the [`Admission`] the WebSocket listener shares,
/// as a plaintext connection waiting to log in does: a flood of silent sockets costs what it
/// cost before TLS, and each is closed by the handshake timeout.
pub(super) async fn accept_loop<L: Listener>(
    mut listener: L,
    tls: Option<ServerTls>,
    admission: Admission,
    inputs: mpsc::Sender<Input<MaybeTls<L::Stream>>>,
    warnings: Arc<WarnGate>,
    cancel: CancellationToken,
) -> Result<(), ServerError> {
    use super::input::ClientConn;
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(tls) = &tls else {
                    let stream = ClientConn::Tcp(MaybeTls::plain(stream));
                    if inputs.send(Input::Accepted { stream, peer }).await.is_err() {
                        return Ok(()); // the driver is gone: the server is stopping
                    }
                    continue;
                };
                let Some(permit) = admission.try_admit() else {
                    tls.stats()
                        .handshake_failures
                        .fetch_add(1, Ordering::Relaxed);
                    crate::warn_limited!(warnings, "client tls", %peer, "too many TLS handshakes in progress; closing");
                    continue;
                };
                let (tls, inputs, warnings, cancel) = (
                    tls.clone(),
                    inputs.clone(),
                    warnings.clone(),
                    cancel.clone(),
                );
                tokio::spawn(async move {
                    let accepted = tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return,
                        accepted = tls.accept(stream) => accepted,
                    };
                    drop(permit);
                    match accepted {
                        Ok(stream) => {
                            let stream = ClientConn::Tcp(stream);
                            let _ = inputs.send(Input::Accepted { stream, peer }).await;
                        }
                        Err(error) => {
                            crate::warn_limited!(warnings, "client tls", %peer, %error, "client refused at the TLS handshake; closing");
                        }
                    }
                });
            }
            Err(error) => {
                crate::warn_limited!(warnings, "client accept", %error, "client accept failed");
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

/// Where a connection's reader task takes frames from.
pub(super) trait FrameSource: Send + 'static {
    /// The next frame with no deadline (the node has its own idle timer). Cancel-safe.
    fn next_frame(&mut self) -> impl Future<Output = Result<Frame, ReadError>> + Send;
}

/// Where a connection's writer task puts frames the driver encoded (length-prefixed).
pub(super) trait FrameSink: Send + 'static {
    /// Writes the frames, all within `timeout`; each is empty afterwards.
    fn write_encoded(
        &mut self,
        frames: &mut [Bytes],
        timeout: Duration,
    ) -> impl Future<Output = Result<(), WriteError>> + Send;

    /// Ends the connection from this side once everything queued is written (best effort,
    /// bounded by `timeout`).
    fn shutdown(&mut self, timeout: Duration) -> impl Future<Output = ()> + Send;
}

impl<S: Stream> FrameSource for FrameReader<ReadHalf<S>> {
    async fn next_frame(&mut self) -> Result<Frame, ReadError> {
        FrameReader::next_frame(self).await
    }
}

impl<S: Stream> FrameSink for FrameWriter<WriteHalf<S>> {
    async fn write_encoded(
        &mut self,
        frames: &mut [Bytes],
        timeout: Duration,
    ) -> Result<(), WriteError> {
        FrameWriter::write_encoded(self, frames, timeout).await
    }

    async fn shutdown(&mut self, timeout: Duration) {
        FrameWriter::shutdown(self, timeout).await;
    }
}

/// Starts the reader and writer tasks of an accepted TCP connection. The connection closes
/// when the driver drops the queue's sender (after the writer has flushed it), when a write
/// fails, or when the peer closes.
pub(super) fn spawn_connection<S: Stream>(
    conn: ConnId,
    stream: S,
    codec: FrameCodec,
    queue: mpsc::Receiver<Bytes>,
    inputs: mpsc::Sender<Input<S>>,
    io_timeout: Duration,
    cancel: CancellationToken,
) {
    let (read, write) = tokio::io::split(stream);
    let reader = FrameReader::with_read_chunk(read, codec, CLIENT_READ_CHUNK);
    let writer = FrameWriter::new(write, codec);
    spawn_framed(conn, reader, writer, queue, inputs, io_timeout, cancel);
}

/// Starts the reader and writer tasks of a connection, whatever carries its frames.
pub(super) fn spawn_framed<S: Stream>(
    conn: ConnId,
    reader: impl FrameSource,
    writer: impl FrameSink,
    queue: mpsc::Receiver<Bytes>,
    inputs: mpsc::Sender<Input<S>>,
    io_timeout: Duration,
    cancel: CancellationToken,
) {
    let (writer_ended, linger) = oneshot::channel();
    tokio::spawn(read_loop(
        conn,
        reader,
        inputs.clone(),
        linger,
        io_timeout,
        cancel.clone(),
    ));
    tokio::spawn(write_loop(
        conn,
        writer,
        queue,
        inputs,
        writer_ended,
        io_timeout,
        cancel,
    ));
}

/// Forwards decoded frames until the peer closes or the bytes stop decoding. Once the writer
/// has closed its side, it keeps reading (and the driver ignores) for up to `io_timeout`: a
/// socket closed with unread input is reset, which could destroy the final Kick or Error
/// before the peer reads it.
async fn read_loop<S: Stream>(
    conn: ConnId,
    mut reader: impl FrameSource,
    inputs: mpsc::Sender<Input<S>>,
    writer_ended: oneshot::Receiver<()>,
    io_timeout: Duration,
    cancel: CancellationToken,
) {
    let linger = async {
        // Sent or dropped: either way the writer is done.
        let _ = writer_ended.await;
        tokio::time::sleep(io_timeout).await;
    };
    tokio::pin!(linger);
    loop {
        let read = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = &mut linger => return,
            read = reader.next_frame() => read,
        };
        let input = match read {
            Ok(frame) => Input::Frame { conn, frame },
            Err(ReadError::TlsOnPlaintext) => Input::TlsOnPlaintext { conn },
            Err(ReadError::Decode(error)) => Input::ProtocolError {
                conn,
                code: error.code(),
                detail: error.to_string(),
            },
            Err(ReadError::Refused { code, detail }) => Input::ProtocolError { conn, code, detail },
            Err(error) => Input::ConnClosed {
                conn,
                reason: error.to_string(),
            },
        };
        let last = !matches!(input, Input::Frame { .. });
        if inputs.send(input).await.is_err() || last {
            return;
        }
    }
}

/// Writes queued frames (encoded by the driver) in batches, reporting each batch once the
/// socket took it. Ends when the queue's sender is dropped (after flushing everything
/// queued), or on a write error.
async fn write_loop<S: Stream>(
    conn: ConnId,
    mut writer: impl FrameSink,
    mut queue: mpsc::Receiver<Bytes>,
    inputs: mpsc::Sender<Input<S>>,
    writer_ended: oneshot::Sender<()>,
    io_timeout: Duration,
    cancel: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        let first = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            first = queue.recv() => first,
        };
        let Some(first) = first else {
            break; // closed by the driver: everything queued has been written
        };
        super::fill_batch(&mut batch, first, &mut queue, WRITE_BATCH);
        let written = tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            written = writer.write_encoded(&mut batch, io_timeout) => written,
        };
        let frames = batch.len();
        batch.clear();
        if queue.is_empty() {
            batch.shrink_to(IDLE_BATCH);
        }
        let input = match written {
            Ok(()) => Input::Written { conn, frames },
            Err(error) => Input::WriteFailed {
                conn,
                reason: error.to_string(),
            },
        };
        let failed = matches!(input, Input::WriteFailed { .. });
        if inputs.send(input).await.is_err() {
            return;
        }
        if failed {
            break;
        }
    }
    tokio::select! {
        biased;
        _ = cancel.cancelled() => return,
        _ = writer.shutdown(io_timeout) => {}
    }
    let _ = writer_ended.send(());
    let _ = inputs.send(Input::WriterDone).await;
}
