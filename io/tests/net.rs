//! The network seam carries frames the same way over real and simulated sockets, and turns
//! bad input and silence into typed errors.

use std::net::SocketAddr;
use std::time::Duration;

use cim_io::net::{self, Listener, Network, ReadError, TokioNet, framed};
use cim_proto::codec::{DecodeError, FrameCodec};
use cim_proto::frame::Kind;
use cim_proto::{Frame, Ping};
use cim_sim_hosts::TurmoilNet;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(5);

fn ping(nonce: u64) -> Frame {
    Frame {
        kind: Some(Kind::Ping(Ping { nonce })),
    }
}

/// Accepts one connection and echoes frames until the peer closes.
async fn echo_one<L: Listener>(mut listener: L) {
    let (stream, _) = listener.accept().await.unwrap();
    let (mut reader, mut writer) = framed(stream, FrameCodec::default());
    while let Ok(frame) = reader.read_frame(T).await {
        writer.write_frame(&frame, T).await.unwrap();
    }
}

async fn round_trip<N: Network>(net: N, host: &str, port: u16) {
    let stream = net::connect(&net, host, port, T).await.unwrap();
    let (mut reader, mut writer) = framed(stream, FrameCodec::default());
    let frames: Vec<Frame> = (1..=50).map(ping).collect();
    writer.write_frames(&frames, T).await.unwrap();
    for expected in &frames {
        assert_eq!(&reader.read_frame(T).await.unwrap(), expected);
    }
}

#[tokio::test]
async fn frames_round_trip_over_tokio() {
    let listener = TokioNet.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(echo_one(listener));
    round_trip(TokioNet, "127.0.0.1", port).await;
}

#[test]
fn frames_round_trip_over_turmoil() {
    let mut sim = turmoil::Builder::new().build();
    sim.host("echo", || async {
        let listener = TurmoilNet
            .bind(SocketAddr::from(([0, 0, 0, 0], 7000)))
            .await?;
        echo_one(listener).await;
        Ok(())
    });
    sim.client("client", async {
        round_trip(TurmoilNet, "echo", 7000).await;
        Ok(())
    });
    sim.run().unwrap();
}

#[tokio::test]
async fn oversized_prefix_truncation_and_silence_are_typed_errors() {
    let listener = TokioNet.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for _ in 0..3 {
            let (stream, _) = listener.accept().await.unwrap();
            let (mut reader, _writer) = framed(stream, FrameCodec::new(1024));
            tx.send(reader.read_frame(Duration::from_millis(300)).await)
                .await
                .unwrap();
        }
    });

    // A length prefix far over the maximum: refused from the prefix alone.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 0x0f]).await.unwrap();
    assert!(matches!(
        rx.recv().await.unwrap(),
        Err(ReadError::Decode(DecodeError::FrameTooLarge { .. }))
    ));

    // Half a frame, then close.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&[10, 1, 2]).await.unwrap();
    drop(s);
    assert!(matches!(
        rx.recv().await.unwrap(),
        Err(ReadError::Truncated)
    ));

    // Nothing at all: the read times out instead of hanging.
    let _s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    assert!(matches!(
        rx.recv().await.unwrap(),
        Err(ReadError::Timeout(_))
    ));
}

/// A sink that takes at most `limit` bytes per write call, vectored or not, like a socket
/// whose buffer is nearly full.
struct Trickle {
    written: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    limit: usize,
    vectored: bool,
}

impl tokio::io::AsyncWrite for Trickle {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = buf.len().min(self.limit);
        self.written.lock().unwrap().extend_from_slice(&buf[..n]);
        std::task::Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut left = self.limit;
        for buf in bufs {
            let n = buf.len().min(left);
            self.written.lock().unwrap().extend_from_slice(&buf[..n]);
            left -= n;
        }
        std::task::Poll::Ready(Ok(self.limit - left))
    }

    fn is_write_vectored(&self) -> bool {
        self.vectored
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Pre-encoded frames written through partial (vectored or plain) writes arrive whole and
/// in order: the gather resumes mid-frame wherever a write stopped.
#[tokio::test]
async fn encoded_frames_survive_partial_writes() {
    let codec = FrameCodec::default();
    let frames: Vec<Frame> = (0..70).map(|n| ping(n * 1_000_003)).collect();
    let encoded: Vec<bytes::Bytes> = frames
        .iter()
        .map(|f| {
            let mut buf = bytes::BytesMut::new();
            codec.encode(f, &mut buf).unwrap();
            buf.freeze()
        })
        .collect();
    for limit in [1, 2, 3, 7, 64, 100_000] {
        for vectored in [false, true] {
            let written = std::sync::Arc::default();
            let mut writer = net::FrameWriter::new(
                Trickle {
                    written: std::sync::Arc::clone(&written),
                    limit,
                    vectored,
                },
                codec,
            );
            let mut batch = encoded.clone();
            // One empty entry in the middle must be skipped, not stall the gather.
            batch.insert(10, bytes::Bytes::new());
            writer.write_encoded(&mut batch, T).await.unwrap();
            assert!(batch.iter().all(|b| b.is_empty()), "every frame consumed");
            let (mut reader, _) =
                framed(std::io::Cursor::new(written.lock().unwrap().clone()), codec);
            for expected in &frames {
                assert_eq!(
                    &reader.read_frame(T).await.unwrap(),
                    expected,
                    "limit {limit}, vectored {vectored}"
                );
            }
        }
    }
}

/// A source that hands out one prepared chunk per read call and counts the calls.
struct Chunks {
    chunks: std::collections::VecDeque<Vec<u8>>,
    reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl tokio::io::AsyncRead for Chunks {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(mut chunk) = self.chunks.pop_front() {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                self.chunks.push_front(chunk.split_off(n));
            }
        }
        std::task::Poll::Ready(Ok(()))
    }
}

/// `buffered_frame` hands on exactly the whole frames a read already brought, in order,
/// without reading again; half a frame waits for the next read, and a bad length prefix
/// behind good frames is an error only once those frames are out.
#[tokio::test]
async fn buffered_frames_are_what_the_last_read_brought() {
    use std::sync::atomic::Ordering;
    let codec = FrameCodec::new(1024);
    let mut bytes = Vec::new();
    let mut ends = Vec::new();
    for nonce in 1..=5 {
        let mut buf = bytes::BytesMut::new();
        codec.encode(&ping(nonce), &mut buf).unwrap();
        bytes.extend_from_slice(&buf);
        ends.push(bytes.len());
    }
    // Read 1: frames 1-3 and half of frame 4. Read 2: the rest of 4, frame 5, a prefix far
    // over the maximum.
    let cut = ends[2] + (ends[3] - ends[2]) / 2;
    let mut second = bytes[cut..].to_vec();
    second.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]);
    let reads = std::sync::Arc::default();
    let mut reader = net::FrameReader::new(
        Chunks {
            chunks: [bytes[..cut].to_vec(), second].into(),
            reads: std::sync::Arc::clone(&reads),
        },
        codec,
    );
    // Nothing read yet: nothing buffered (and the TLS check has not run).
    assert_eq!(reader.buffered_frame().unwrap(), None);
    assert_eq!(reads.load(Ordering::SeqCst), 0);

    assert_eq!(reader.next_frame().await.unwrap(), ping(1));
    assert_eq!(reader.buffered_frame().unwrap(), Some(ping(2)));
    assert_eq!(reader.buffered_frame().unwrap(), Some(ping(3)));
    assert_eq!(reader.buffered_frame().unwrap(), None, "half of frame 4");
    assert_eq!(
        reads.load(Ordering::SeqCst),
        1,
        "buffered_frame never reads"
    );

    assert_eq!(reader.next_frame().await.unwrap(), ping(4));
    assert_eq!(reads.load(Ordering::SeqCst), 2);
    assert_eq!(reader.buffered_frame().unwrap(), Some(ping(5)));
    assert!(matches!(
        reader.buffered_frame(),
        Err(ReadError::Decode(DecodeError::FrameTooLarge { .. }))
    ));
    assert_eq!(reads.load(Ordering::SeqCst), 2);
}
