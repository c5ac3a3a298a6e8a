//! The store behind a network: a host serving a [`MemoryBackend`] over TCP, and
//! [`RemoteStore`], the [`Store`] that talks to it.
//!
//! Built for the simulation: the store is a turmoil host reached over the simulated network,
//! so partitions between a node and the store, store crashes and bounces happen for real. It
//! is generic over [`Network`], so it also runs over real sockets in plain tests.
//!
//! # Semantics (those of Redis through `ConnectionManager`)
//!
//! - One connection per [`RemoteStore`], requests pipelined on it, each tagged with an id the
//!   reply carries. The host runs them one at a time, in arrival order.
//! - Every request has a deadline ([`RemoteOptions::request_timeout`]); past it the caller gets
//!   [`StoreUnavailable`] and the outcome is unknown (the command may have run). The
//!   connection is then dropped too: a link that went quiet for that long is not trusted to
//!   carry the next reply, and a fresh one costs one connect.
//! - A lost connection fails every request in flight with `StoreUnavailable`; the next request
//!   dials again (bounded by [`RemoteOptions::connect_timeout`]).
//! - `health()` is a ping on the same connection.
//!
//! # Surviving a bounce, and the lossy restart
//!
//! The host's state is the `Arc<MemoryBackend>` given to [`serve_store`], which lives outside
//! the turmoil host closure: a bounce (crash and restart of the host) cuts every connection
//! but keeps the data, like a Redis with its data on disk. The lossy restart is
//! [`MemoryBackend::reset`] plus a bounce: everything is gone and new logs get new log epochs.
//!
//! # Wire format
//!
//! Each frame is a 4-byte big-endian length, then one JSON value ([`ToStore`] or
//! [`FromStore`]). JSON, not speed: this is for simulation and tests.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cim_core::canary::{Canaries, Canary};
use cim_core::ids::UnixMillis;
use cim_core::store::{StoreCommand, StoreResult, StoreUnavailable};
use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use cim_io::net::{self, Listener, Network};
use cim_io::store::{MemoryBackend, Store, StoreFuture};

/// Largest frame either side accepts: far above any store reply the simulation produces, and
/// a garbage length prefix above it is an error before any allocation.
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// How long the host waits to write one reply before dropping the connection.
const HOST_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a framed JSON connection failed. Each ends the connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("peer closed the connection")]
    Closed,
    #[error("no frame within {0:?}")]
    Timeout(Duration),
    #[error("write did not complete within {0:?}")]
    WriteTimeout(Duration),
    #[error("undecodable frame: {0}")]
    Decode(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// The read half of a length-prefixed JSON connection. `recv` is cancel-safe (the codec keeps
/// partial frames buffered), so it can sit in a `select!`.
pub(crate) struct JsonReader<S> {
    inner: FramedRead<ReadHalf<S>, LengthDelimitedCodec>,
}

/// The write half of a length-prefixed JSON connection.
pub(crate) struct JsonWriter<S> {
    inner: FramedWrite<WriteHalf<S>, LengthDelimitedCodec>,
}

impl<S> std::fmt::Debug for JsonReader<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonReader")
    }
}

impl<S> std::fmt::Debug for JsonWriter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JsonWriter")
    }
}

pub(crate) fn json_framed<S: net::Stream>(stream: S) -> (JsonReader<S>, JsonWriter<S>) {
    let codec = || {
        LengthDelimitedCodec::builder()
            .max_frame_length(MAX_FRAME)
            .new_codec()
    };
    let (read, write) = tokio::io::split(stream);
    (
        JsonReader {
            inner: FramedRead::new(read, codec()),
        },
        JsonWriter {
            inner: FramedWrite::new(write, codec()),
        },
    )
}

impl<S: net::Stream> JsonReader<S> {
    /// The next message, with no deadline (the caller has its own timer).
    pub(crate) async fn recv<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        match self.inner.next().await {
            None => Err(FrameError::Closed),
            Some(Err(e)) => Err(FrameError::Io(e)),
            Some(Ok(bytes)) => Ok(serde_json::from_slice(&bytes)?),
        }
    }

    pub(crate) async fn recv_within<T: DeserializeOwned>(
        &mut self,
        timeout: Duration,
    ) -> Result<T, FrameError> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Ok(result) => result,
            Err(_) => Err(FrameError::Timeout(timeout)),
        }
    }
}

impl<S: net::Stream> JsonWriter<S> {
    pub(crate) async fn send<T: Serialize>(
        &mut self,
        message: &T,
        timeout: Duration,
    ) -> Result<(), FrameError> {
        let bytes = Bytes::from(serde_json::to_vec(message)?);
        match tokio::time::timeout(timeout, self.inner.send(bytes)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(FrameError::WriteTimeout(timeout)),
        }
    }
}

/// A request to the store host.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToStore {
    Execute {
        id: u64,
        now: UnixMillis,
        command: StoreCommand,
    },
    Ping {
        id: u64,
    },
    /// Redis's `WAIT`: answers once the host's replica holds every write the host did
    /// before it, or after `timeout` with what it has (see [`Replica`]).
    Wait {
        id: u64,
        timeout: Duration,
    },
}

/// The store host's answer to the request with the same id.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromStore {
    Executed {
        id: u64,
        result: StoreResult,
    },
    Pong {
        id: u64,
    },
    /// How many replicas confirmed (a [`ToStore::Wait`]).
    Waited {
        id: u64,
        replicas: u32,
    },
}

/// A store host's replica, as `WAIT` sees it: following its master (every write is copied
/// at once: `WAIT` answers 1 at once), or lagging (cut off, or behind: `WAIT` answers 0 at its
/// timeout). The simulation's failover restores the master's keys from the copy the replica
/// had when it started lagging, so an append acknowledged only after `WAIT` saw the replica
/// follow is in every copy a failover restores.
#[derive(Debug, Default)]
pub struct Replica {
    lagging: std::sync::atomic::AtomicBool,
}

impl Replica {
    /// The replica stops following (what it has is what a failover restores).
    pub fn lag(&self) {
        self.lagging.store(true, Ordering::SeqCst);
    }

    /// The replica follows again (after a failover: the new master's new replica).
    pub fn follow(&self) {
        self.lagging.store(false, Ordering::SeqCst);
    }

    pub fn is_lagging(&self) -> bool {
        self.lagging.load(Ordering::SeqCst)
    }
}

/// Serves `backend` on `listen` until the listener fails (in a turmoil host: until the host
/// is crashed or bounced). Each connection's requests run in arrival order.
pub async fn serve_store<N: Network>(
    net: N,
    listen: SocketAddr,
    backend: Arc<MemoryBackend>,
) -> io::Result<()> {
    serve_store_with_replica(net, listen, backend, Arc::default()).await
}

/// [`serve_store`] with the host's [`Replica`] (one master of a sharded store: every master
/// of the simulation serves the one backend, which keeps the keys of every slot).
pub async fn serve_store_with_replica<N: Network>(
    net: N,
    listen: SocketAddr,
    backend: Arc<MemoryBackend>,
    replica: Arc<Replica>,
) -> io::Result<()> {
    let listener = net.bind(listen).await?;
    accept_loop(listener, backend, replica).await
}

/// [`serve_store`] on a listener bound already (tests bind port 0 and read the port).
pub async fn serve_store_on<L: Listener>(
    listener: L,
    backend: Arc<MemoryBackend>,
) -> io::Result<()> {
    accept_loop(listener, backend, Arc::default()).await
}

/// Serves each connection `listener` accepts on a task of its own, until accepting fails.
async fn accept_loop<L: Listener>(
    mut listener: L,
    backend: Arc<MemoryBackend>,
    replica: Arc<Replica>,
) -> io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "store host listening");
    loop {
        let (stream, peer) = listener.accept().await?;
        let (backend, replica) = (backend.clone(), replica.clone());
        tokio::spawn(async move {
            if let Err(error) = serve_store_connection(stream, &backend, &replica).await {
                tracing::debug!(%peer, %error, "store connection ended");
            }
        });
    }
}

async fn serve_store_connection<S: net::Stream>(
    stream: S,
    backend: &MemoryBackend,
    replica: &Replica,
) -> Result<(), FrameError> {
    let (mut reader, mut writer) = json_framed(stream);
    loop {
        // No read deadline: an idle client is fine, and a client that vanished costs one task
        // until the host is bounced (a simulation's hosts are few).
        let request: ToStore = match reader.recv().await {
            Err(FrameError::Closed) => return Ok(()),
            other => other?,
        };
        let reply = match request {
            ToStore::Execute { id, now, command } => FromStore::Executed {
                id,
                result: backend.execute(now, command).await,
            },
            // An unhealthy backend answers a ping with an error, so `health()` reports it.
            ToStore::Ping { id } => match backend.health().await {
                Ok(()) => FromStore::Pong { id },
                Err(e) => FromStore::Executed { id, result: Err(e) },
            },
            // Blocks this connection, as `WAIT` blocks a Redis client's.
            ToStore::Wait { id, timeout } => {
                if replica.is_lagging() {
                    tokio::time::sleep(timeout).await;
                }
                let replicas = u32::from(!replica.is_lagging());
                FromStore::Waited { id, replicas }
            }
        };
        writer.send(&reply, HOST_WRITE_TIMEOUT).await?;
    }
}

impl FromStore {
    fn id(&self) -> u64 {
        match self {
            FromStore::Executed { id, .. }
            | FromStore::Pong { id }
            | FromStore::Waited { id, .. } => *id,
        }
    }
}

/// Timeouts of a [`RemoteStore`].
#[derive(Debug, Clone, Copy)]
pub struct RemoteOptions {
    /// From sending a request to its reply; past it the outcome is unknown.
    pub request_timeout: Duration,
    /// One dial of the host.
    pub connect_timeout: Duration,
    /// Replicas that must confirm an append before it is acknowledged (`WAIT` after it on
    /// the same connection, as `--store-wait-replicas` does on Redis; 0: no `WAIT`). Fewer
    /// within half the request timeout make the append's outcome unknown
    /// (`StoreUnavailable`): it may be stored, and the sender's resend settles it.
    pub wait_replicas: u32,
    /// The run's canaries (`WaitReplicas` off: the append is acknowledged whatever `WAIT`
    /// answered).
    pub canaries: Canaries,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            wait_replicas: 0,
            canaries: Canaries::NONE,
        }
    }
}

type Pending = Arc<Mutex<BTreeMap<u64, oneshot::Sender<FromStore>>>>;

/// One live connection: where to queue frames and whom to answer.
#[derive(Debug, Clone)]
struct Conn {
    generation: u64,
    frames: mpsc::UnboundedSender<ToStore>,
    pending: Pending,
}

/// A [`Store`] served by a store host over the network; see the module docs.
#[derive(Debug)]
pub struct RemoteStore<N: Network> {
    net: N,
    host: String,
    port: u16,
    options: RemoteOptions,
    /// The current connection, if any. Async so concurrent requests share one dial.
    conn: tokio::sync::Mutex<Option<Conn>>,
    next_id: AtomicU64,
    next_generation: AtomicU64,
}

impl<N: Network> RemoteStore<N> {
    /// Connects lazily, on the first request.
    pub fn new(net: N, host: impl Into<String>, port: u16, options: RemoteOptions) -> Self {
        Self {
            net,
            host: host.into(),
            port,
            options,
            conn: tokio::sync::Mutex::new(None),
            next_id: AtomicU64::new(1),
            next_generation: AtomicU64::new(1),
        }
    }

    /// The current connection, dialling a new one if there is none.
    async fn connection(&self) -> Result<Conn, StoreUnavailable> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.frames.is_closed()) {
            return Ok(conn.clone());
        }
        let stream = net::connect(
            &self.net,
            &self.host,
            self.port,
            self.options.connect_timeout,
        )
        .await
        .map_err(|e| {
            StoreUnavailable(format!(
                "cannot reach the store at {}:{}: {e}",
                self.host, self.port
            ))
        })?;
        let (frames, outgoing) = mpsc::unbounded_channel();
        let conn = Conn {
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            frames,
            pending: Pending::default(),
        };
        tokio::spawn(run_connection(
            stream,
            outgoing,
            conn.pending.clone(),
            self.options.request_timeout,
        ));
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Drops `conn` if it is still the current one: its task ends and fails what is in flight.
    async fn discard(&self, conn: &Conn) {
        let mut slot = self.conn.lock().await;
        if slot
            .as_ref()
            .is_some_and(|c| c.generation == conn.generation)
        {
            *slot = None;
        }
    }

    async fn call(
        &self,
        make: impl FnOnce(u64) -> ToStore + Send,
    ) -> Result<FromStore, StoreUnavailable> {
        let mut replies = self.call_all(vec![Box::new(make)]).await?;
        replies
            .pop()
            .ok_or_else(|| StoreUnavailable("store: no reply".into()))
    }

    /// Two requests sent back to back on one connection (a pipeline: the host runs them in
    /// that order), and both replies.
    async fn call_pair(
        &self,
        first: impl FnOnce(u64) -> ToStore + Send + 'static,
        second: impl FnOnce(u64) -> ToStore + Send + 'static,
    ) -> Result<(FromStore, FromStore), StoreUnavailable> {
        let mut replies = self
            .call_all(vec![Box::new(first), Box::new(second)])
            .await?;
        match (replies.pop(), replies.pop()) {
            (Some(second), Some(first)) => Ok((first, second)),
            _ => Err(StoreUnavailable("store: a pipeline lost a reply".into())),
        }
    }

    /// Sends every request at once on the current connection and waits for all the replies
    /// within one request timeout.
    async fn call_all<'a>(
        &self,
        makes: Vec<Box<dyn FnOnce(u64) -> ToStore + Send + 'a>>,
    ) -> Result<Vec<FromStore>, StoreUnavailable> {
        // The deadline covers waiting behind another request's dial, too.
        let timeout = self.options.connect_timeout;
        let conn = match tokio::time::timeout(timeout, self.connection()).await {
            Ok(conn) => conn?,
            Err(_) => {
                return Err(StoreUnavailable(format!(
                    "no connection to the store within {timeout:?}"
                )));
            }
        };
        let mut waits = Vec::with_capacity(makes.len());
        for make in makes {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            lock(&conn.pending).insert(id, tx);
            if conn.frames.send(make(id)).is_err() {
                lock(&conn.pending).remove(&id);
                for (id, _) in waits {
                    lock(&conn.pending).remove(&id);
                }
                self.discard(&conn).await;
                return Err(StoreUnavailable("connection to the store lost".into()));
            }
            waits.push((id, rx));
        }
        let ids: Vec<u64> = waits.iter().map(|(id, _)| *id).collect();
        let all = futures::future::join_all(waits.into_iter().map(|(_, rx)| rx));
        match tokio::time::timeout(self.options.request_timeout, all).await {
            Ok(replies) => {
                let mut out = Vec::with_capacity(replies.len());
                for reply in replies {
                    match reply {
                        Ok(reply) => out.push(reply),
                        Err(_) => {
                            self.discard(&conn).await;
                            return Err(StoreUnavailable(
                                "connection to the store lost with the request in flight".into(),
                            ));
                        }
                    }
                }
                Ok(out)
            }
            Err(_) => {
                for id in ids {
                    lock(&conn.pending).remove(&id);
                }
                self.discard(&conn).await;
                Err(StoreUnavailable(format!(
                    "no reply from the store within {:?}",
                    self.options.request_timeout
                )))
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is one map operation, so a poisoned map is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Owns one connection: writes queued frames, hands replies to their callers. Ends on any
/// error or when the store drops the connection (every sender gone), failing what is pending.
async fn run_connection<S: net::Stream>(
    stream: S,
    mut outgoing: mpsc::UnboundedReceiver<ToStore>,
    pending: Pending,
    write_timeout: Duration,
) {
    let (mut reader, mut writer) = json_framed(stream);
    let end: Result<(), FrameError> = async {
        loop {
            tokio::select! {
                biased;
                reply = reader.recv::<FromStore>() => {
                    let reply = reply?;
                    // A reply nobody waits for any more (timed out) is dropped.
                    if let Some(tx) = lock(&pending).remove(&reply.id()) {
                        tx.send(reply).ok();
                    }
                }
                frame = outgoing.recv() => match frame {
                    Some(frame) => writer.send(&frame, write_timeout).await?,
                    None => return Ok(()),
                },
            }
        }
    }
    .await;
    if let Err(error) = end {
        tracing::debug!(%error, "store connection lost");
    }
    // Close first, then fail the pending: a request racing this either finds the channel
    // closed or has its sender dropped here.
    outgoing.close();
    lock(&pending).clear();
}

impl<N: Network> Store for RemoteStore<N> {
    fn execute(&self, now: UnixMillis, command: StoreCommand) -> StoreFuture<'_, StoreResult> {
        Box::pin(async move {
            let wait =
                self.options.wait_replicas > 0 && matches!(command, StoreCommand::Append { .. });
            let execute = move |id| ToStore::Execute { id, now, command };
            let result = if wait {
                let timeout = self.options.request_timeout / 2;
                let (reply, waited) = self
                    .call_pair(execute, move |id| ToStore::Wait { id, timeout })
                    .await?;
                let replicas = match waited {
                    FromStore::Waited { replicas, .. } => replicas,
                    _ => 0,
                };
                if replicas < self.options.wait_replicas
                    && !self.options.canaries.disabled(Canary::WaitReplicas)
                {
                    return Err(StoreUnavailable(format!(
                        "WAIT: {replicas} of {} replicas confirmed the append",
                        self.options.wait_replicas
                    )));
                }
                reply
            } else {
                self.call(execute).await?
            };
            match result {
                FromStore::Executed { result, .. } => result,
                FromStore::Pong { .. } | FromStore::Waited { .. } => Err(StoreUnavailable(
                    "store host answered a command with a pong".into(),
                )),
            }
        })
    }

    fn health(&self) -> StoreFuture<'_, Result<(), StoreUnavailable>> {
        Box::pin(async move {
            match self.call(|id| ToStore::Ping { id }).await? {
                FromStore::Pong { .. } | FromStore::Waited { .. } => Ok(()),
                FromStore::Executed { result, .. } => result.map(|_| ()),
            }
        })
    }
}
