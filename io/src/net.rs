//! The network seam: everything the shell does with sockets goes through [`Network`], which
//! has one implementation over tokio here ([`TokioNet`], production) and one over turmoil
//! in `cim-sim-hosts` (`TurmoilNet`, simulation and tests), so turmoil is no dependency of
//! the production binaries. The choice is a type parameter, never a Cargo feature: features
//! unify across the workspace and would switch the production binaries too.
//!
//! Every read, write and connect has a timeout here (a partitioned turmoil link, like a
//! blackholed real one, goes quiet instead of failing), and frames are read and written
//! through the sans-IO [`FrameCodec`], so an oversized length prefix is an error before any
//! allocation.

use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use cim_proto::Frame;
use cim_proto::codec::{DecodeError, EncodeError, FrameCodec};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Frames queued toward one route↔server link's writer, on either end: enough for a burst
/// of fan-out pushes, small enough that a peer not reading is noticed (what each end does
/// when it is full is said where it sends).
pub(crate) const LINK_QUEUE: usize = 4096;

/// A byte stream the shell can frame.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Sockets: bind a listener, dial a peer by host and port.
pub trait Network: Clone + Send + Sync + std::fmt::Debug + 'static {
    type Stream: Stream;
    type Listener: Listener<Stream = Self::Stream>;

    fn bind(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Listener>> + Send;

    /// Dials `host:port` with no timeout of its own; use [`connect`] in the shell.
    fn dial(
        &self,
        host: String,
        port: u16,
    ) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// A bound listener.
pub trait Listener: Send + Sync + 'static {
    type Stream: Stream;

    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, SocketAddr)>> + Send;

    fn local_addr(&self) -> io::Result<SocketAddr>;
}

/// Real sockets.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioNet;

impl Network for TokioNet {
    type Stream = tokio::net::TcpStream;
    type Listener = tokio::net::TcpListener;

    async fn bind(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
        tokio::net::TcpListener::bind(addr).await
    }

    async fn dial(&self, host: String, port: u16) -> io::Result<Self::Stream> {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
        // Frames are small and latency matters more than packet count.
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        stream.set_nodelay(true)?;
        Ok((stream, peer))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        tokio::net::TcpListener::local_addr(self)
    }
}

/// Dials with a deadline: a blackholed peer is an error after `timeout`, not a hang.
pub async fn connect<N: Network>(
    net: &N,
    host: &str,
    port: u16,
    timeout: Duration,
) -> io::Result<N::Stream> {
    match tokio::time::timeout(timeout, net.dial(host.to_owned(), port)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect to {host}:{port} timed out after {timeout:?}"),
        )),
    }
}

/// Adapts a [`Listener`] to `axum::serve`, so the HTTP API runs over either network.
#[derive(Debug)]
pub struct AxumListener<L>(pub L);

impl<L: Listener> axum::serve::Listener for AxumListener<L> {
    type Io = L::Stream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.0.accept().await {
                Ok(accepted) => return accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning,
                    // as axum's own listener does.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Why reading a frame failed. Each variant ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("peer closed the connection")]
    Closed,
    #[error("peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("no frame within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The peer's first bytes are a TLS record header: it expects TLS where this side
    /// speaks plaintext (a misconfiguration worth naming, not garbage).
    #[error("the peer began a TLS handshake on this plaintext connection")]
    TlsOnPlaintext,
    /// The peer sent something its transport carries but the protocol has no place for (a
    /// WebSocket text message): answered with an `Error` frame of this code, then closed.
    #[error("{detail}")]
    Refused {
        code: cim_proto::ErrorCode,
        detail: String,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// How every TLS connection starts: a handshake record (0x16) of TLS major version 3. No
/// frame starts so: a 22-byte body starting 0x03 would be protobuf field number 0, which is
/// invalid.
pub(crate) const TLS_RECORD_START: [u8; 2] = [0x16, 0x03];

/// Why writing frames failed. Each variant ends the connection.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("write did not complete within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Encode(#[from] EncodeError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Bytes asked of the socket per read when the buffer has no room left.
const DEFAULT_READ_CHUNK: usize = 4096;

/// The reading half of a framed connection.
#[derive(Debug)]
pub struct FrameReader<R> {
    io: R,
    codec: FrameCodec,
    buf: BytesMut,
    read_chunk: usize,
    /// The first two bytes were checked for a TLS record header.
    checked_for_tls: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, codec: FrameCodec) -> Self {
        Self::with_read_chunk(io, codec, DEFAULT_READ_CHUNK)
    }

    /// Reads at most about `read_chunk` bytes at a time (more when one frame needs it).
    /// The buffer is only allocated at the first read, and a connection waiting for input
    /// holds one chunk: a server with many mostly idle clients keeps this small.
    pub fn with_read_chunk(io: R, codec: FrameCodec, read_chunk: usize) -> Self {
        Self {
            io,
            codec,
            buf: BytesMut::new(),
            read_chunk: read_chunk.max(64),
            checked_for_tls: false,
        }
    }

    /// The next frame, waiting at most `timeout` for it. Cancel-safe: bytes already read
    /// stay buffered, so this can sit in a `select!`.
    pub async fn read_frame(&mut self, timeout: Duration) -> Result<Frame, ReadError> {
        match tokio::time::timeout(timeout, self.next_frame()).await {
            Ok(result) => result,
            Err(_) => Err(ReadError::Timeout(timeout)),
        }
    }

    /// A frame the last read already brought, if a whole one is buffered; never reads. After
    /// [`Self::next_frame`], lets a reader hand on everything one read returned at once.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, ReadError> {
        if !self.checked_for_tls {
            return Ok(None);
        }
        Ok(self.codec.decode_buf(&mut self.buf)?)
    }

    /// The next frame with no deadline (the caller has its own timer).
    pub async fn next_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            if !self.checked_for_tls && self.buf.len() >= TLS_RECORD_START.len() {
                self.checked_for_tls = true;
                if self.buf[..TLS_RECORD_START.len()] == TLS_RECORD_START {
                    return Err(ReadError::TlsOnPlaintext);
                }
            }
            if let Some(frame) = self.codec.decode_buf(&mut self.buf)? {
                return Ok(frame);
            }
            // `decode_buf` has checked the length prefix, so the buffer grows at most to one
            // maximum frame.
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(self.read_chunk);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return Err(if self.buf.is_empty() {
                    ReadError::Closed
                } else {
                    ReadError::Truncated
                });
            }
        }
    }
}

/// The writing half of a framed connection.
#[derive(Debug)]
pub struct FrameWriter<W> {
    io: W,
    codec: FrameCodec,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W, codec: FrameCodec) -> Self {
        Self {
            io,
            codec,
            // Grown by the first encode; unused by `write_encoded`.
            buf: BytesMut::new(),
        }
    }

    /// Writes frames encoded beforehand (each `Bytes` one whole frame), all within
    /// `timeout`. Where the stream takes vectored writes (TCP does) the frames go out in
    /// one `writev` per up to 64 of them, without being copied together. The frames are
    /// consumed: each is empty afterwards.
    pub async fn write_encoded(
        &mut self,
        frames: &mut [Bytes],
        timeout: Duration,
    ) -> Result<(), WriteError> {
        let mut gather = Gather::new(frames);
        let write = async {
            self.io.write_all_buf(&mut gather).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(WriteError::Timeout(timeout)),
        }
    }

    /// Encodes `frames` into one buffer and writes it, all within `timeout`. A frame that
    /// does not encode (over the maximum) fails the whole write before anything is sent.
    pub async fn write_frames<'a>(
        &mut self,
        frames: impl IntoIterator<Item = &'a Frame>,
        timeout: Duration,
    ) -> Result<(), WriteError> {
        self.buf.clear();
        for frame in frames {
            self.codec.encode(frame, &mut self.buf)?;
        }
        let write = async {
            self.io.write_all(&self.buf).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(WriteError::Timeout(timeout)),
        }
    }

    pub async fn write_frame(
        &mut self,
        frame: &Frame,
        timeout: Duration,
    ) -> Result<(), WriteError> {
        self.write_frames([frame], timeout).await
    }

    /// Flushes and shuts the write side down (best effort, bounded by `timeout`).
    pub async fn shutdown(&mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.io.shutdown()).await;
    }
}

/// Several encoded frames as one [`Buf`], whose `chunks_vectored` lets `write_all_buf`
/// hand them all to one vectored write.
struct Gather<'a> {
    frames: &'a mut [Bytes],
    /// The first frame with bytes left to write.
    next: usize,
}

impl<'a> Gather<'a> {
    fn new(frames: &'a mut [Bytes]) -> Self {
        let mut gather = Self { frames, next: 0 };
        gather.skip_written();
        gather
    }

    fn skip_written(&mut self) {
        while self.frames.get(self.next).is_some_and(Bytes::is_empty) {
            self.next += 1;
        }
    }
}

impl Buf for Gather<'_> {
    fn remaining(&self) -> usize {
        self.frames[self.next..].iter().map(Bytes::len).sum()
    }

    fn chunk(&self) -> &[u8] {
        self.frames
            .get(self.next)
            .map_or(&[], |frame| frame.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let frame = &mut self.frames[self.next];
            let n = cnt.min(frame.len());
            frame.advance(n);
            cnt -= n;
            self.skip_written();
        }
    }

    fn chunks_vectored<'b>(&'b self, dst: &mut [IoSlice<'b>]) -> usize {
        let rest = self.frames[self.next..].iter().filter(|f| !f.is_empty());
        let mut filled = 0;
        for (slot, frame) in dst.iter_mut().zip(rest) {
            *slot = IoSlice::new(frame);
            filled += 1;
        }
        filled
    }
}

/// Splits a stream into framed halves sharing one codec configuration.
pub fn framed<S: Stream>(
    stream: S,
    codec: FrameCodec,
) -> (
    FrameReader<tokio::io::ReadHalf<S>>,
    FrameWriter<tokio::io::WriteHalf<S>>,
) {
    let (read, write) = tokio::io::split(stream);
    (
        FrameReader::new(read, codec),
        FrameWriter::new(write, codec),
    )
}
