//! turmoil's simulated sockets behind the shell's network seam ([`cim_io::net::Network`]).

use std::io;
use std::net::SocketAddr;

use cim_io::net::{Listener, Network};

/// turmoil's simulated sockets; only usable inside a turmoil host.
#[derive(Debug, Clone, Copy, Default)]
pub struct TurmoilNet;

impl Network for TurmoilNet {
    type Stream = turmoil::net::TcpStream;
    type Listener = TurmoilListener;

    async fn bind(&self, addr: SocketAddr) -> io::Result<Self::Listener> {
        turmoil::net::TcpListener::bind(addr)
            .await
            .map(TurmoilListener)
    }

    async fn dial(&self, host: String, port: u16) -> io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect((host, port)).await
    }
}

/// A bound turmoil listener (a wrapper: the seam's trait and turmoil's type are both foreign
/// here).
pub struct TurmoilListener(pub turmoil::net::TcpListener);

impl std::fmt::Debug for TurmoilListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("TurmoilListener")
            .field(&self.0.local_addr().ok())
            .finish()
    }
}

impl Listener for TurmoilListener {
    type Stream = turmoil::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Stream, SocketAddr)> {
        self.0.accept().await
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}
