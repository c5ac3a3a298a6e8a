//! The driver task: owns the [`ClientSession`] and executes what it asks for.

use std::collections::BTreeMap;
use std::time::Duration;

use cim_core::client::{
    ClientCommand, ClientConfig, ClientEvent, ClientOutput, ClientSession, LoginAttempt,
    LoginFailure,
};
use cim_core::ids::{ClientMsgId, Epoch, ServerId, UserId};
use cim_core::registry::{LiveServer, ServerEndpoint};
use cim_core::route::login::{LoginAnswer, LoginError, LoginRequest};
use cim_proto::Frame;
use cim_proto::codec::FrameCodec;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::route_api::{ApiError, RouteApi};
use super::{Acked, AppCommand, SdkOptions, SendError, ServerTransport, ws_conn};
use crate::api::{
    self, decode_resume_secret, decode_resume_token, decode_ticket, encode_resume_secret,
    encode_resume_token,
};
use crate::clock::Clock;
use crate::http_client::HttpError;
use crate::net::{self, Network, framed};
use crate::tls::{ClientTls, MaybeTls};

/// Frames queued for one connection's writer. The session resends its whole outbox in one
/// go when it comes online, so this must hold a large outbox; tokio allocates channel slots
/// lazily, so the bound costs nothing until used. A full queue means the link cannot keep
/// up: it is dropped like a lost connection.
const WRITE_QUEUE: usize = 1 << 18;
/// Frames written per syscall batch.
const WRITE_BATCH: usize = 256;
/// Inputs from login and connection tasks waiting for the driver; a full queue slows the
/// socket readers down (TCP backpressure) rather than growing memory.
const INPUT_QUEUE: usize = 1024;
/// Frames one read brought that go to the driver as one input: one queue push and one
/// driver turn for a burst (a fan-out's pushes arrive dozens per read), not one per frame.
const READ_BATCH: usize = 64;
/// Inputs the driver takes in one turn before it looks at commands and timers again.
const INPUT_BATCH: usize = 64;

#[derive(Debug)]
enum Input {
    LoginAnswer {
        attempt: LoginAttempt,
        /// Boxed: rare, and the largest input by far.
        result: Box<Result<LoginAnswer, LoginFailure>>,
    },
    Connected {
        generation: u64,
    },
    ConnectFailed {
        generation: u64,
    },
    /// TLS to the server cannot work (its certificate did not verify, or it does not speak
    /// TLS): the session stops rather than retry.
    TlsFailed {
        generation: u64,
        host: String,
        reason: String,
    },
    /// Frames from the connection, in the order they arrived.
    Frames {
        generation: u64,
        frames: Vec<Frame>,
    },
    Closed {
        generation: u64,
    },
}

/// The current connection (or connection attempt).
#[derive(Debug)]
struct Conn {
    generation: u64,
    frames: mpsc::Sender<Frame>,
    connected: bool,
    task: JoinHandle<()>,
}

#[derive(Debug)]
pub(crate) struct Driver<N: Network> {
    net: N,
    clock: Clock,
    session: ClientSession,
    config: ClientConfig,
    codec: FrameCodec,
    route: RouteApi<N>,
    commands: mpsc::Receiver<AppCommand>,
    inputs_tx: mpsc::Sender<Input>,
    inputs: mpsc::Receiver<Input>,
    events: mpsc::UnboundedSender<ClientEvent>,
    token: watch::Sender<Option<String>>,
    pending: BTreeMap<ClientMsgId, oneshot::Sender<Result<Acked, SendError>>>,
    generation: u64,
    conn: Option<Conn>,
    last_login: Option<LoginAttempt>,
    /// Connections given up gracefully, still writing what was queued before the close.
    closing: Vec<JoinHandle<()>>,
    transport: Transport,
}

/// How connections to servers are secured.
#[derive(Debug, Clone)]
struct Transport {
    /// The route is reached over HTTPS: a plaintext server endpoint is refused.
    route_tls: bool,
    /// Trust roots for TLS servers; `None` cannot reach one.
    tls: Option<ClientTls>,
    /// Which of the server's gateways to connect to.
    server: ServerTransport,
}

impl<N: Network> Driver<N> {
    pub(crate) fn new(
        net: N,
        clock: Clock,
        options: SdkOptions,
        route: RouteApi<N>,
        commands: mpsc::Receiver<AppCommand>,
        events: mpsc::UnboundedSender<ClientEvent>,
        token: watch::Sender<Option<String>>,
    ) -> Self {
        let config = options.session.clone();
        let transport = Transport {
            route_tls: options.tls.as_ref().is_some_and(|tls| tls.route_https),
            tls: options.tls.as_ref().map(|tls| tls.client.clone()),
            server: options.server_transport,
        };
        let (now, wall) = (clock.now(), clock.wall());
        let session = match (options.state, options.entropy) {
            (Some(state), Some(seed)) => {
                ClientSession::restore_with_entropy(options.session, seed, state, now, wall)
            }
            (Some(state), None) => ClientSession::restore(options.session, state, now, wall),
            (None, Some(seed)) => ClientSession::with_entropy(options.session, seed),
            (None, None) => ClientSession::new(options.session),
        };
        let (inputs_tx, inputs) = mpsc::channel(INPUT_QUEUE);
        Self {
            net,
            clock,
            session,
            config,
            codec: FrameCodec::new(options.max_frame),
            route,
            commands,
            inputs_tx,
            inputs,
            events,
            token,
            pending: BTreeMap::new(),
            generation: 0,
            conn: None,
            last_login: None,
            closing: Vec::new(),
            transport,
        }
    }

    pub(crate) async fn run(mut self) {
        tracing::info!(user = self.config.user.0, "client starting");
        self.session.start(self.clock.now());
        self.drain();
        loop {
            let next = self.session.poll_timeout();
            let deadline = next.map(|(at, _)| at);
            // Checked before waiting, so a steady stream of inputs cannot starve the timers
            // (the select below prefers inputs).
            if let Some((at, reason)) = next
                && at <= self.clock.now()
            {
                // Which timer is due, for tracing a stall or a busy loop.
                tracing::trace!(?reason, "client timer (overdue)");
                self.session.handle_timeout(self.clock.now());
                self.drain();
                continue;
            }
            let clock = self.clock;
            let timer = async move {
                match deadline {
                    Some(at) => clock.sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            // Inputs first: a pong or an ack queued behind a flood of application sends
            // must not wait so long that the heartbeat declares a live link dead. The
            // network paces inputs, so commands still get their turn.
            tokio::select! {
                biased;
                Some(input) = self.inputs.recv() => {
                    self.on_input(input);
                    // Whatever else is already queued, in the same turn: one drain and one
                    // timer for a burst. Bounded, so commands and timers keep their turn.
                    for _ in 1..INPUT_BATCH {
                        match self.inputs.try_recv() {
                            Ok(input) => self.on_input(input),
                            Err(_) => break,
                        }
                    }
                }
                command = self.commands.recv() => match command {
                    Some(AppCommand::Shutdown { reply }) => {
                        self.shutdown().await;
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) => self.on_command(command),
                    // Every handle is gone: nobody can use this session any more.
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                () = timer => {
                    if let Some((_, reason)) = next {
                        tracing::trace!(?reason, "client timer");
                    }
                    self.session.handle_timeout(self.clock.now());
                }
            }
            self.drain();
        }
    }

    async fn shutdown(&mut self) {
        tracing::info!(user = self.config.user.0, "client shutting down");
        self.session.shutdown(self.clock.now());
        self.drain();
        // Normally the Stopped event failed them already; a session that was stopped before
        // has nothing pending either, but make sure no caller waits forever.
        for (_, reply) in std::mem::take(&mut self.pending) {
            let _ = reply.send(Err(SendError::Stopped));
        }
        if let Some(conn) = self.conn.take() {
            conn.task.abort();
        }
        // Let closed connections write their last frames (the final DeliverAck). Each is
        // bounded by its write timeouts; the overall bound also covers a task stuck handing
        // its last report to this (no longer reading) driver.
        let closing = futures::future::join_all(std::mem::take(&mut self.closing));
        let bound = self.config.heartbeat_timeout * 2;
        if tokio::time::timeout(bound, closing).await.is_err() {
            tracing::debug!("connections still closing after {bound:?}: left behind");
        }
    }

    fn on_command(&mut self, command: AppCommand) {
        let now = self.clock.now();
        match command {
            AppCommand::Send { conv, body, reply } => {
                if self.session.is_stopped() {
                    let _ = reply.send(Err(SendError::Stopped));
                    return;
                }
                let id = self.session.send(now, conv, body);
                self.pending.insert(id, reply);
            }
            AppCommand::Submit { conv, body, reply } => {
                if self.session.is_stopped() {
                    let _ = reply.send(Err(SendError::Stopped));
                    return;
                }
                let id = self.session.send(now, conv, body);
                let _ = reply.send(Ok(id));
            }
            AppCommand::Snapshot { reply } => {
                let _ = reply.send(self.session.snapshot(now, self.clock.wall()));
            }
            AppCommand::Stats { reply } => {
                let _ = reply.send(self.session.stats());
            }
            // Handled by the loop, which must end after it.
            AppCommand::Shutdown { .. } => {}
        }
    }

    fn is_current(&self, generation: u64) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.generation == generation)
    }

    fn on_input(&mut self, input: Input) {
        let now = self.clock.now();
        match input {
            Input::LoginAnswer { attempt, result } => {
                if let Ok(answer) = &*result
                    && self.last_login == Some(attempt)
                {
                    self.token.send_replace(Some(answer.token.clone()));
                }
                self.session.handle_login_answer(now, attempt, *result);
            }
            Input::Connected { generation } => {
                if let Some(conn) = self.conn.as_mut().filter(|c| c.generation == generation) {
                    conn.connected = true;
                    self.session.handle_connected(now);
                }
            }
            Input::ConnectFailed { generation } => {
                if self.is_current(generation) {
                    self.conn = None;
                    self.session.handle_connect_failed(now);
                }
            }
            Input::TlsFailed {
                generation,
                host,
                reason,
            } => {
                if self.is_current(generation) {
                    self.conn = None;
                    self.session.handle_tls_failed(now, host, reason);
                }
            }
            Input::Frames { generation, frames } => {
                if self.is_current(generation) {
                    for frame in frames {
                        tracing::trace!(?frame, "frame from server");
                        if let Err(error) = self.session.handle_frame(now, frame) {
                            tracing::debug!(%error, "frame ignored");
                        }
                    }
                }
            }
            Input::Closed { generation } => {
                if self.is_current(generation) {
                    self.conn = None;
                    self.session.handle_disconnected(now);
                }
            }
        }
    }

    /// Drains the session's outputs until it has nothing more to say. Executing a command
    /// can feed the session another input (a full write queue is a lost connection); what
    /// that input causes comes out of this same drain.
    fn drain(&mut self) {
        while let Some(output) = self.session.poll_output() {
            match output {
                ClientOutput::Command(command) => self.execute(command),
                ClientOutput::Event(event) => self.dispatch(event),
            }
        }
    }

    fn execute(&mut self, command: ClientCommand) {
        match command {
            ClientCommand::Login { attempt, request } => {
                self.last_login = Some(attempt);
                let route = self.route.clone();
                let inputs = self.inputs_tx.clone();
                tokio::spawn(async move {
                    let result = login(&route, request).await;
                    let _ = inputs
                        .send(Input::LoginAnswer {
                            attempt,
                            result: Box::new(result),
                        })
                        .await;
                });
            }
            ClientCommand::Connect { endpoint } => {
                // The session always disconnects first; a leftover would be a second live
                // connection, so make sure.
                self.close_conn();
                self.generation += 1;
                let generation = self.generation;
                tracing::debug!(?endpoint, generation, "connecting");
                let (frames, frames_rx) = mpsc::channel(WRITE_QUEUE);
                let task = tokio::spawn(connection(
                    self.net.clone(),
                    endpoint,
                    self.transport.clone(),
                    ConnTimeouts {
                        connect: self.config.connect_timeout,
                        write: self.config.heartbeat_timeout,
                    },
                    self.codec,
                    generation,
                    self.inputs_tx.clone(),
                    frames_rx,
                ));
                self.conn = Some(Conn {
                    generation,
                    frames,
                    connected: false,
                    task,
                });
            }
            ClientCommand::Transmit(frame) => {
                let Some(conn) = &self.conn else {
                    tracing::debug!(?frame, "no connection: frame dropped");
                    return;
                };
                match conn.frames.try_send(frame) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        tracing::warn!("write queue full: dropping the connection");
                        if let Some(conn) = self.conn.take() {
                            conn.task.abort();
                        }
                        self.session.handle_disconnected(self.clock.now());
                    }
                    // The connection task ended; its `Closed` is on the way.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
            }
            ClientCommand::Disconnect => self.close_conn(),
        }
    }

    /// Gives up the current connection. An established one gets to write what is queued
    /// (the last DeliverAck on shutdown) and closes its write side; an attempt still
    /// connecting is abandoned at once.
    fn close_conn(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        tracing::debug!(generation = conn.generation, "closing connection");
        if conn.connected {
            // Dropping the sender ends the writer after the queue is written.
            drop(conn.frames);
            self.closing.retain(|task| !task.is_finished());
            self.closing.push(conn.task);
        } else {
            conn.task.abort();
        }
    }

    fn dispatch(&mut self, event: ClientEvent) {
        match &event {
            ClientEvent::Acked {
                msg_id,
                conv,
                log_epoch,
                seq,
            } => {
                if let Some(reply) = self.pending.remove(msg_id) {
                    let _ = reply.send(Ok(Acked {
                        msg_id: *msg_id,
                        conv: conv.clone(),
                        log_epoch: *log_epoch,
                        seq: *seq,
                    }));
                }
            }
            ClientEvent::Rejected {
                msg_id,
                code,
                reason,
            } => {
                if let Some(reply) = self.pending.remove(msg_id) {
                    let _ = reply.send(Err(SendError::Rejected {
                        msg_id: *msg_id,
                        code: *code,
                        reason: reason.clone(),
                    }));
                }
            }
            ClientEvent::Unknown { msg_id } => {
                if let Some(reply) = self.pending.remove(msg_id) {
                    let _ = reply.send(Err(SendError::Unknown { msg_id: *msg_id }));
                }
            }
            ClientEvent::Stopped(reason) => {
                tracing::info!(?reason, "client session stopped");
                for (_, reply) in std::mem::take(&mut self.pending) {
                    let _ = reply.send(Err(SendError::Stopped));
                }
            }
            ClientEvent::Online { server, epoch } => {
                tracing::info!(%server, epoch = epoch.0, "client online");
            }
            ClientEvent::Reconnecting {
                attempt,
                delay,
                cause,
            } => {
                tracing::info!(attempt, ?delay, ?cause, "client reconnecting");
            }
            ClientEvent::Kicked(reason) => tracing::info!(?reason, "client kicked"),
            ClientEvent::LoginRejected(error) => tracing::warn!(%error, "login rejected"),
            other => tracing::debug!(event = ?other, "client event"),
        }
        // An application that dropped its `Events` still gets its sends resolved.
        let _ = self.events.send(event);
    }
}

/// `POST /login`, answered in the session's terms.
async fn login<N: Network>(
    route: &RouteApi<N>,
    request: LoginRequest,
) -> Result<LoginAnswer, LoginFailure> {
    let user = request.user;
    let body = api::LoginRequest {
        user_id: request.user.0,
        user_name: request.name,
        password: request.password,
        resume_token: request.resume_token.as_ref().map(encode_resume_token),
        resume_secret: request.resume_secret.as_ref().map(encode_resume_secret),
    };
    match route.login(&body).await {
        Ok(response) => answer_from(user, response),
        Err(error) => Err(failure_from(route.host(), error)),
    }
}

fn answer_from(user: UserId, r: api::LoginResponse) -> Result<LoginAnswer, LoginFailure> {
    if r.user_id != user.0 {
        return Err(LoginFailure::Transport(format!(
            "login answer for user {} instead of {}",
            r.user_id, user.0
        )));
    }
    let bad = |what: &str, e: api::BinaryFieldError| {
        LoginFailure::Transport(format!("login answer: bad {what}: {e}"))
    };
    let ticket = decode_ticket(&r.ticket).map_err(|e| bad("ticket", e))?;
    let endpoint = r.endpoint.unwrap_or(ServerEndpoint {
        host: r.ip,
        port: r.cim_server_port,
        tls: false,
        ws_url: None,
    });
    let resume_token = decode_resume_token(&r.resume_token).map_err(|e| bad("resumeToken", e))?;
    // An older route issues none: the next login then needs the password again.
    let resume_secret = match r.resume_secret.as_deref() {
        Some(text) => Some(decode_resume_secret(text).map_err(|e| bad("resumeSecret", e))?),
        None => None,
    };
    Ok(LoginAnswer {
        user,
        epoch: Epoch(r.epoch),
        server: LiveServer {
            id: ServerId::new(r.server_id),
            host: endpoint.host,
            client_port: endpoint.port,
            http_port: r.http_port,
            // Not the client's business: the internal link and the load are the route's.
            link_port: 0,
            connections: 0,
            client_tls: endpoint.tls,
            // The WebSocket gateway's port, for `ServerTransport::WebSocket` (its URL is
            // made from the same host and TLS, as the route made it).
            ws_port: endpoint
                .ws_url
                .as_deref()
                .and_then(|url| ws_conn::WsTarget::parse(url).ok())
                .map(|target| target.port),
        },
        ticket,
        token: r.token,
        resume_token,
        resume_secret,
    })
}

/// A failed login in the session's terms. TLS that cannot work with this route (its
/// certificate is not trusted, it speaks plaintext to an https:// client or HTTPS only to an
/// http:// one) is [`LoginFailure::Tls`]: the session stops instead of retrying forever.
fn failure_from(route_host: &str, error: ApiError) -> LoginFailure {
    let rejected = |e: LoginError| LoginFailure::Rejected(e);
    match error {
        ApiError::Status { code, message, .. } => match code.as_str() {
            api::CODE_REPEAT_LOGIN => rejected(LoginError::RepeatLogin),
            api::CODE_ACCOUNT_MISMATCH => rejected(LoginError::AccountMismatch),
            // The session drops the secret and logs in with the password (or stops).
            api::CODE_RESUME_REFUSED => rejected(LoginError::ResumeRefused),
            api::CODE_NO_SERVER => rejected(LoginError::NoServerAvailable),
            api::CODE_FAIL => rejected(LoginError::Unavailable),
            api::CODE_HTTPS_REQUIRED => LoginFailure::Tls {
                host: route_host.to_owned(),
                reason: message,
            },
            _ => LoginFailure::Transport(format!("login: code {code}: {message}")),
        },
        ApiError::Transport(HttpError::Tls(error)) => match error.permanent() {
            Some(reason) => LoginFailure::Tls {
                host: error.host().to_owned(),
                reason,
            },
            None => LoginFailure::Transport(error.to_string()),
        },
        other => LoginFailure::Transport(other.to_string()),
    }
}

#[derive(Debug, Clone, Copy)]
struct ConnTimeouts {
    connect: Duration,
    /// One batch write; a link stuck longer is dead (the heartbeat would say so too).
    write: Duration,
}

/// One connection: connect, then read frames into the driver's inputs and write what the
/// driver queues, until either side fails or the driver drops the queue (a graceful close:
/// everything queued is written first). Reads need no timeout of their own: the session's
/// heartbeat and login deadlines notice a silent server and disconnect.
#[allow(clippy::too_many_arguments)]
async fn connection<N: Network>(
    net: N,
    endpoint: ServerEndpoint,
    transport: Transport,
    timeouts: ConnTimeouts,
    codec: FrameCodec,
    generation: u64,
    inputs: mpsc::Sender<Input>,
    frames: mpsc::Receiver<Frame>,
) {
    let failed = || async {
        let _ = inputs.send(Input::ConnectFailed { generation }).await;
    };
    // Where to connect: the TCP gateway, or the WebSocket one (its own host, port and scheme).
    let (host, port, tls, ws_url) = match transport.server {
        ServerTransport::Tcp => (endpoint.host, endpoint.port, endpoint.tls, None),
        ServerTransport::WebSocket => {
            match endpoint.ws_url.as_deref().map(ws_conn::WsTarget::parse) {
                Some(Ok(target)) => (target.host, target.port, target.tls, Some(target.url)),
                Some(Err(error)) => {
                    tracing::warn!(%error, "the server's wsUrl is unusable");
                    return failed().await;
                }
                None => {
                    tracing::warn!(
                        host = %endpoint.host,
                        "the server names no WebSocket gateway; this client uses only WebSocket"
                    );
                    return failed().await;
                }
            }
        }
    };
    // What the login answer asks cannot work with this client's TLS: no retry changes that
    // (every server of a route is set up alike), so the session stops and says why.
    let tls_cannot_work = |reason: &str| {
        tracing::warn!(%host, port, reason, "not connecting to the server");
        Input::TlsFailed {
            generation,
            host: host.clone(),
            reason: reason.to_owned(),
        }
    };
    // Never a silent downgrade: a client that reached the route over TLS does not chat in
    // plaintext because an answer said so.
    if !tls && transport.route_tls {
        let stop = tls_cannot_work(
            "the route, reached over HTTPS, sent this client to a server without TLS: \
             refusing to chat in plaintext (its operator must give the servers --tls-cert)",
        );
        let _ = inputs.send(stop).await;
        return;
    }
    let tls = match (tls, &transport.tls) {
        (false, _) => None,
        (true, Some(client)) => Some(client),
        (true, None) => {
            let stop = tls_cannot_work(
                "the server speaks TLS but this client has no trusted certificates \
                 (configure the CA that signs it: --ca for cim-client)",
            );
            let _ = inputs.send(stop).await;
            return;
        }
    };
    // The TLS handshake shares the connect deadline.
    let connected = tokio::time::timeout(timeouts.connect, async {
        let stream = net::connect(&net, &host, port, timeouts.connect)
            .await
            .map_err(|error| (error.to_string(), None))?;
        match tls {
            None => Ok(MaybeTls::plain(stream)),
            Some(client) => client.connect(stream, &host).await.map_err(|error| {
                tracing::warn!(%error, "TLS to the server failed");
                let permanent = error.permanent();
                (error.to_string(), permanent)
            }),
        }
    })
    .await
    .unwrap_or_else(|_| Err((format!("no connection within {:?}", timeouts.connect), None)));
    let stream = match connected {
        Ok(stream) => stream,
        // The one failure retrying will not fix: the session stops and says why.
        Err((_, Some(reason))) => {
            let _ = inputs
                .send(Input::TlsFailed {
                    generation,
                    host: host.clone(),
                    reason,
                })
                .await;
            return;
        }
        Err((error, None)) => {
            tracing::debug!(%host, port, %error, "connect failed");
            return failed().await;
        }
    };
    match ws_url {
        None => {
            let (reader, writer) = framed(stream, codec);
            pump(reader, writer, timeouts, generation, inputs, frames).await;
        }
        Some(url) => {
            let upgraded =
                tokio::time::timeout(timeouts.connect, ws_conn::upgrade(stream, &url, codec))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "no WebSocket upgrade within {:?}",
                            timeouts.connect
                        ))
                    });
            match upgraded {
                Ok((reader, writer)) => {
                    pump(reader, writer, timeouts, generation, inputs, frames).await;
                }
                Err(error) => {
                    tracing::debug!(%url, %error, "WebSocket upgrade failed");
                    failed().await;
                }
            }
        }
    }
}

/// Reads and writes one connection's frames until either side fails or the driver drops
/// the queue; the same for both gateways.
async fn pump(
    mut reader: impl ws_conn::ReadFrames,
    mut writer: impl ws_conn::WriteFrames,
    timeouts: ConnTimeouts,
    generation: u64,
    inputs: mpsc::Sender<Input>,
    mut frames: mpsc::Receiver<Frame>,
) {
    if inputs.send(Input::Connected { generation }).await.is_err() {
        return;
    }
    let read = async {
        loop {
            let mut frames = match reader.next_frame().await {
                Ok(frame) => vec![frame],
                Err(error) => {
                    tracing::debug!(%error, generation, "connection read ended");
                    return true;
                }
            };
            // What the same read brought goes along; a bad frame among it ends the
            // connection only after the good ones before it are handed on.
            let mut ended = None;
            while frames.len() < READ_BATCH {
                match reader.buffered_frame() {
                    Ok(Some(frame)) => frames.push(frame),
                    Ok(None) => break,
                    Err(error) => {
                        ended = Some(error);
                        break;
                    }
                }
            }
            if inputs
                .send(Input::Frames { generation, frames })
                .await
                .is_err()
            {
                return false;
            }
            if let Some(error) = ended {
                tracing::debug!(%error, generation, "connection read ended");
                return true;
            }
        }
    };
    let write = async {
        let mut batch = Vec::with_capacity(WRITE_BATCH);
        while frames.recv_many(&mut batch, WRITE_BATCH).await > 0 {
            if let Err(error) = writer.write_frames(&batch, timeouts.write).await {
                tracing::debug!(%error, generation, "connection write failed");
                return true;
            }
            batch.clear();
        }
        // The driver gave this connection up and everything queued is written.
        writer.shutdown(timeouts.write).await;
        false
    };
    let lost = tokio::select! {
        biased;
        lost = write => lost,
        lost = read => lost,
    };
    if lost {
        let _ = inputs.send(Input::Closed { generation }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls;

    #[test]
    fn login_codes_map_to_the_sessions_errors() {
        let status = |code: &str| ApiError::Status {
            http: 200,
            code: code.to_owned(),
            message: "m".to_owned(),
        };
        let failure = |error| failure_from("route.example", error);
        for (code, error) in [
            ("5000", LoginError::RepeatLogin),
            ("9100", LoginError::AccountMismatch),
            ("7100", LoginError::NoServerAvailable),
            ("4000", LoginError::Unavailable),
        ] {
            assert_eq!(
                failure(status(code)),
                LoginFailure::Rejected(error),
                "{code}"
            );
        }
        assert!(matches!(
            failure(status("3000")),
            LoginFailure::Transport(_)
        ));
        assert!(matches!(
            failure(ApiError::Transport(HttpError::Timeout(
                Duration::from_secs(1)
            ))),
            LoginFailure::Transport(_)
        ));
        // A cut handshake may pass.
        let cut = tls::ConnectError::Handshake {
            host: "route.example".into(),
            reason: "unexpected end of file".into(),
        };
        assert!(matches!(
            failure(ApiError::Transport(HttpError::Tls(cut))),
            LoginFailure::Transport(_)
        ));
        // TLS that cannot work is permanent, and says whose and why: a route certificate
        // that does not verify, a plaintext route dialed over https://, an HTTPS-only one
        // dialed over http://.
        let untrusted = tls::ConnectError::Certificate {
            host: "route.example".into(),
            reason: "invalid peer certificate: Expired".into(),
            plain: "it has expired".into(),
        };
        let plaintext = tls::ConnectError::NotTls {
            host: "route.example".into(),
        };
        for (error, says) in [
            (
                ApiError::Transport(HttpError::Tls(untrusted)),
                "it has expired",
            ),
            (ApiError::Transport(HttpError::Tls(plaintext)), "http://"),
            (status(api::CODE_HTTPS_REQUIRED), "m"),
        ] {
            match failure(error) {
                LoginFailure::Tls { host, reason } => {
                    assert_eq!(host, "route.example");
                    assert!(reason.contains(says), "{reason}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn login_answers_are_checked() {
        let ticket = cim_proto::Ticket {
            key_id: 1,
            user_id: 4,
            server_id: "s1".into(),
            epoch: 2,
            expires_at_ms: 9,
            mac: vec![1; 32],
        };
        let response = api::LoginResponse {
            resume_secret: None,
            user_id: 4,
            epoch: 2,
            server_id: "s1".into(),
            // An older route's answer: no endpoint, so `ip` and `cimServerPort`, plaintext.
            endpoint: None,
            ip: "10.0.0.1".into(),
            cim_server_port: 11211,
            http_port: 8081,
            ticket: api::encode_ticket(&ticket),
            token: "tok".into(),
            resume_token: encode_resume_token(&cim_core::route::login::ResumeToken([3; 32])),
        };
        let answer = answer_from(UserId(4), response.clone()).unwrap();
        assert_eq!(answer.ticket, ticket);
        assert_eq!(answer.server.host, "10.0.0.1");
        assert_eq!(answer.server.client_port, 11211);
        assert!(!answer.server.client_tls);
        assert_eq!(answer.epoch, Epoch(2));
        let with_endpoint = api::LoginResponse {
            endpoint: Some(ServerEndpoint {
                host: "s1.example".into(),
                port: 11212,
                tls: true,
                ws_url: Some("wss://s1.example:11412/".into()),
            }),
            ..response.clone()
        };
        let answer = answer_from(UserId(4), with_endpoint).unwrap();
        assert_eq!(
            answer.server.client_endpoint(),
            ServerEndpoint {
                host: "s1.example".into(),
                port: 11212,
                tls: true,
                // Kept, for a client that connects over WebSocket.
                ws_url: Some("wss://s1.example:11412/".into()),
            }
        );
        assert!(answer_from(UserId(5), response.clone()).is_err());
        let garbled = api::LoginResponse {
            ticket: "!!".into(),
            ..response
        };
        assert!(matches!(
            answer_from(UserId(4), garbled),
            Err(LoginFailure::Transport(_))
        ));
    }
}
