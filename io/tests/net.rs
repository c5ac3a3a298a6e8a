//! The network seam carries frames the same way over real and simulated sockets, and turns
//! bad input and silence into typed errors.

use std::net::SocketAddr;
use std::time::Duration;

use cim_io::net::{self, Listener, Network, ReadError, TokioNet, TurmoilNet, framed};
use cim_proto::codec::{DecodeError, FrameCodec};
use cim_proto::frame::Kind;
use cim_proto::{Frame, Ping};
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
