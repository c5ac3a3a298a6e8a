//! A multi-node harness for the core machines: one route (login + delivery), servers,
//! clients and the memory store, wired by in-memory "links" with a fixed latency, under a
//! virtual clock that jumps to the next deadline (quinn's `Pair`, grown to a cluster).
//!
//! Faults: a server can **crash** (its process dies: connections reset, the route's link
//! closes at once), **vanish** (dead and silent: peers only notice by timeouts, the registry
//! after its session timeout), or be **cut off from the store** (its store requests get no
//! answer). Every session (LoginOk sent → connection closed) is recorded so tests can check
//! that two sessions of one user never overlap.

#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use cim_core::time::Instant;

use bytes::Bytes;
use cim_core::accounts::PasswordParams;
use cim_core::client::{
    ClientCommand, ClientConfig, ClientEvent, ClientOutput, ClientSession, LoginAttempt,
    LoginFailure,
};
use cim_core::ids::{
    ApiRequestId, ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId,
};
use cim_core::memstore::{MemoryStore, MemoryStoreConfig};
use cim_core::proto::{Frame, frame::Kind};
use cim_core::registry::LiveServer;
use cim_core::route::balance::{Balancer, Strategy};
use cim_core::route::delivery::{DeliveryConfig, RouteDelivery, SendOrigin};
use cim_core::route::login::{
    LoginAnswer, LoginError, LoginRequest, RouteEvent, RouteLogin, RouteLoginConfig,
};
use cim_core::route::tickets::TicketKeys;
use cim_core::route::{RouteMachine, RouteNode, RouteOutput};
use cim_core::server::{ConnId, RouteLinkId, ServerConfig, ServerNode, ServerOutput};
use cim_core::store::{StoreCommand, StoreReply, StoreRequest, StoredMessage};

pub const LATENCY: Duration = Duration::from_millis(1);
/// How long the registry keeps a silent server's entry (ZooKeeper's session timeout).
pub const REGISTRY_SESSION_TIMEOUT: Duration = Duration::from_secs(6);
const WALL0: u64 = 1_800_000_000_000;
/// The one route's link to each server, as the servers name it.
const ROUTE_LINK: RouteLinkId = RouteLinkId(1);

/// The one base instant of a harness run; everything else is an offset from it.
fn base_instant() -> Instant {
    Instant::from_nanos(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Requester {
    Route(RouteMachine),
    Server(usize),
}

#[derive(Debug)]
enum Event {
    StoreRequest {
        from: Requester,
        request: StoreRequest,
    },
    StoreReply {
        to: Requester,
        id: cim_core::store::RequestId,
        reply: StoreReply,
    },
    RouteLogin {
        api: ApiRequestId,
        request: LoginRequest,
    },
    LoginAnswer {
        client: usize,
        attempt: LoginAttempt,
        result: Result<LoginAnswer, LoginError>,
    },
    Connect {
        client: usize,
        server: usize,
        attempt: u64,
    },
    ToServer {
        server: usize,
        conn: ConnId,
        frame: Frame,
    },
    ToClient {
        client: usize,
        attempt: u64,
        frame: Frame,
    },
    ClosedToClient {
        client: usize,
        attempt: u64,
    },
    ClosedToServer {
        server: usize,
        conn: ConnId,
    },
    ServerToRoute {
        server: usize,
        frame: Frame,
    },
    RouteToServer {
        server: usize,
        frame: Frame,
    },
    RegistryDrop {
        server: usize,
    },
}

pub struct ServerHost {
    pub id: ServerId,
    pub node: ServerNode,
    pub alive: bool,
    pub store_cut: bool,
    /// Open connections: conn → (client, that client's connection attempt).
    conns: BTreeMap<ConnId, (usize, u64)>,
}

pub struct ClientHost {
    pub user: UserId,
    pub session: ClientSession,
    /// The client's current connection: (server, attempt number, server-side conn id).
    conn: Option<(usize, u64, Option<ConnId>)>,
    attempts: u64,
    pub events: Vec<(Instant, ClientEvent)>,
    /// What the application was handed, in order.
    pub app: Vec<StoredMessage>,
    pub acked: BTreeMap<ClientMsgId, (ConvId, LogEpoch, u64)>,
    pub sent: Vec<ClientMsgId>,
}

/// One server-side session: LoginOk sent → connection closed.
#[derive(Debug, Clone)]
pub struct SessionSpan {
    pub user: UserId,
    pub epoch: Epoch,
    pub server: usize,
    pub start: Instant,
    pub end: Option<Instant>,
    conn: ConnId,
}

pub struct Cluster {
    pub t0: Instant,
    pub now: Instant,
    pub store: MemoryStore,
    /// What the registry (ZooKeeper) lists.
    registered: BTreeSet<usize>,
    /// Servers whose link to the route broke with an error (known dead).
    link_down: BTreeSet<usize>,
    /// (client, server) pairs whose network path silently drops everything.
    cut_paths: BTreeSet<(usize, usize)>,
    /// Extra latency on a server's link with the route (both ways).
    slow_links: BTreeMap<usize, Duration>,
    pub route: RouteNode,
    pub servers: Vec<ServerHost>,
    pub clients: Vec<ClientHost>,
    queue: BTreeMap<(Instant, u64), Event>,
    queue_seq: u64,
    next_api: u64,
    next_conn: u64,
    api_clients: BTreeMap<ApiRequestId, (usize, LoginAttempt)>,
    pub route_events: Vec<(Instant, RouteEvent)>,
    pub sessions: Vec<SessionSpan>,
    keys: TicketKeys,
}

impl Cluster {
    /// A route, `servers` servers named s1, s2, ... and no clients yet.
    pub fn new(servers: usize, seed: u64) -> Self {
        let t0 = base_instant();
        let keys = TicketKeys::new(1, b"harness-ticket-secret".to_vec());
        let route_config = RouteLoginConfig {
            password: PasswordParams::for_tests(),
            // Every client here registers with "pw".
            min_password_len: 1,
            ..Default::default()
        };
        let route = RouteLogin::new(
            route_config,
            keys.clone(),
            b"harness-bearer-secret".to_vec(),
            Balancer::new(Strategy::RoundRobin, seed),
            seed,
        );
        let mut cluster = Self {
            t0,
            now: t0,
            store: MemoryStore::new(MemoryStoreConfig {
                seed,
                ..Default::default()
            }),
            registered: BTreeSet::new(),
            link_down: BTreeSet::new(),
            cut_paths: BTreeSet::new(),
            slow_links: BTreeMap::new(),
            route: RouteNode::new(route, RouteDelivery::new(DeliveryConfig::default())),
            servers: Vec::new(),
            clients: Vec::new(),
            queue: BTreeMap::new(),
            queue_seq: 0,
            next_api: 0,
            next_conn: 0,
            api_clients: BTreeMap::new(),
            route_events: Vec::new(),
            sessions: Vec::new(),
            keys,
        };
        for i in 0..servers {
            let id = ServerId(format!("s{}", i + 1));
            let config = ServerConfig::new(id.clone(), cluster.keys.clone());
            let mut node = ServerNode::new(config).expect("default server config is valid");
            // The route's one link to it.
            node.handle_route_link_up(t0, ROUTE_LINK)
                .expect("a new server takes links");
            cluster.servers.push(ServerHost {
                id,
                node,
                alive: true,
                store_cut: false,
                conns: BTreeMap::new(),
            });
            cluster.registered.insert(i);
        }
        cluster.publish_registry();
        cluster
    }

    pub fn wall(&self) -> UnixMillis {
        UnixMillis(WALL0 + (self.now - self.t0).as_millis() as u64)
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.t0
    }

    /// Registers `name` through the route and returns its id.
    pub fn register(&mut self, name: &str) -> UserId {
        let api = self.api_id();
        self.route.handle_register(self.now, api, name, "pw");
        self.pump();
        let deadline = self.now + Duration::from_secs(5);
        loop {
            if let Some(user) = self.route_events.iter().find_map(|(_, e)| match e {
                RouteEvent::Registered {
                    api: a,
                    result: Ok(r),
                } if *a == api => Some(r.user),
                _ => None,
            }) {
                return user;
            }
            assert!(self.step(deadline), "registration of {name} never finished");
        }
    }

    /// Adds a client for `user` (password "pw"), started at once. Returns its index.
    pub fn add_client(&mut self, user: UserId, name: &str, seed: u64) -> usize {
        let config = ClientConfig::new(user, name, "pw", seed);
        let mut session = ClientSession::new(config);
        session.start(self.now);
        self.clients.push(ClientHost {
            user,
            session,
            conn: None,
            attempts: 0,
            events: Vec::new(),
            app: Vec::new(),
            acked: BTreeMap::new(),
            sent: Vec::new(),
        });
        self.pump();
        self.clients.len() - 1
    }

    pub fn send(&mut self, client: usize, conv: ConvId, body: &str) -> ClientMsgId {
        let now = self.now;
        let host = &mut self.clients[client];
        let id = host
            .session
            .send(now, conv, Bytes::copy_from_slice(body.as_bytes()));
        host.sent.push(id);
        self.pump();
        id
    }

    pub fn is_online(&self, client: usize) -> bool {
        self.clients[client].session.is_online()
    }

    /// Which server (index) holds `client`'s open session, if any.
    pub fn server_of(&self, client: usize) -> Option<usize> {
        let user = self.clients[client].user;
        self.sessions
            .iter()
            .rev()
            .find(|s| s.user == user && s.end.is_none())
            .map(|s| s.server)
    }

    // ---- faults ----

    /// The server's process dies: its connections reset (clients notice at once), the
    /// route's link to it closes (the route stops treating it as live), and the registry
    /// drops it after its session timeout.
    pub fn crash(&mut self, server: usize) {
        self.kill(server);
        for (client, attempt) in std::mem::take(&mut self.servers[server].conns).into_values() {
            self.schedule(LATENCY, Event::ClosedToClient { client, attempt });
        }
        self.link_down.insert(server);
        self.schedule(REGISTRY_SESSION_TIMEOUT, Event::RegistryDrop { server });
        self.publish_registry();
        self.pump();
    }

    /// The server's machine goes dark without a word: nobody is told anything.
    pub fn vanish(&mut self, server: usize) {
        self.kill(server);
        self.servers[server].conns.clear();
        self.schedule(REGISTRY_SESSION_TIMEOUT, Event::RegistryDrop { server });
        self.pump();
    }

    fn kill(&mut self, server: usize) {
        self.servers[server].alive = false;
        let now = self.now;
        for span in self
            .sessions
            .iter_mut()
            .filter(|s| s.server == server && s.end.is_none())
        {
            span.end = Some(now);
        }
    }

    /// The path between a client and a server silently drops everything (both ways), or
    /// works again. Neither side is told.
    pub fn cut_path(&mut self, client: usize, server: usize, cut: bool) {
        if cut {
            self.cut_paths.insert((client, server));
        } else {
            self.cut_paths.remove(&(client, server));
        }
    }

    /// Every frame between the route and `server` takes `latency` (0 restores the default).
    pub fn slow_route_link(&mut self, server: usize, latency: Duration) {
        self.slow_links.insert(server, latency);
    }

    fn link_latency(&self, server: usize) -> Duration {
        self.slow_links
            .get(&server)
            .copied()
            .unwrap_or(LATENCY)
            .max(LATENCY)
    }

    /// The server's registry session expires (it is told; the routes' view of the registry
    /// is left as it was, as in the moments before ZooKeeper's watches fire): it fences every
    /// connection and refuses clients until [`Cluster::register_again`].
    pub fn lose_registry_session(&mut self, server: usize) {
        let now = self.now;
        self.servers[server].node.handle_registry_session_lost(now);
        self.pump();
    }

    /// The server is registered again under a new session.
    pub fn register_again(&mut self, server: usize) {
        let now = self.now;
        self.servers[server].node.handle_registered(now);
        self.pump();
    }

    /// What the server's store watchdog does once the store has been unreachable past its
    /// grace period (`lost`), or answers again: the node fences everyone and refuses
    /// clients, then the server leaves the registry; back, it lists itself again. (The
    /// store itself is not cut: see [`Cluster::cut_from_store`].)
    pub fn store_lost(&mut self, server: usize, lost: bool) {
        let now = self.now;
        if lost {
            self.servers[server].node.handle_store_lost(now);
            self.pump();
            self.registered.remove(&server);
        } else {
            self.servers[server].node.handle_store_back(now);
            self.registered.insert(server);
        }
        self.publish_registry();
        self.pump();
    }

    /// The server can no longer reach the store (requests and replies are lost).
    pub fn cut_from_store(&mut self, server: usize, cut: bool) {
        self.servers[server].store_cut = cut;
    }

    fn publish_registry(&mut self) {
        let live: BTreeMap<ServerId, LiveServer> = self
            .registered
            .iter()
            .filter(|i| !self.link_down.contains(i))
            .map(|&i| {
                let id = self.servers[i].id.clone();
                let info = LiveServer {
                    id: id.clone(),
                    host: id.0.clone(),
                    client_port: 11211,
                    link_port: 11311,
                    http_port: 8081,
                    connections: self.servers[i].conns.len() as u32,
                    client_tls: false,
                    ws_port: None,
                };
                (id, info)
            })
            .collect();
        let (now, wall) = (self.now, self.wall());
        self.route.handle_registry(now, wall, live);
    }

    // ---- running ----

    /// Runs until `until` (simulated time), or until nothing is scheduled.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        while self.step(until) {}
        self.now = self.now.max(until);
    }

    /// Runs until `done` holds, at most `limit` of simulated time; returns whether it held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Cluster) -> bool) -> bool {
        let until = self.now + limit;
        loop {
            if done(self) {
                return true;
            }
            if !self.step(until) {
                return done(self);
            }
        }
    }

    /// Advances to the next event or deadline at or before `until` and processes it.
    /// Returns false when there is none.
    pub fn step(&mut self, until: Instant) -> bool {
        self.pump();
        let Some(next) = self.next_deadline() else {
            return false;
        };
        if next > until {
            return false;
        }
        self.now = self.now.max(next);
        let now = self.now;
        // Due events first, in order, then due timers.
        while let Some(entry) = self.queue.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let event = entry.remove();
            self.process(event);
            self.pump();
        }
        let wall = self.wall();
        if self.route.poll_timeout().is_some_and(|(t, _)| t <= now) {
            self.route.handle_timeout(now);
        }
        for host in self.servers.iter_mut().filter(|h| h.alive) {
            if host.node.poll_timeout().is_some_and(|(t, _)| t <= now) {
                host.node.handle_timeout(now, wall);
            }
        }
        for host in &mut self.clients {
            if host.session.poll_timeout().is_some_and(|(t, _)| t <= now) {
                host.session.handle_timeout(now);
            }
        }
        self.pump();
        true
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut next = self.queue.keys().next().map(|k| k.0);
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        consider(self.route.poll_timeout().map(|(t, _)| t));
        for host in self.servers.iter().filter(|h| h.alive) {
            consider(host.node.poll_timeout().map(|(t, _)| t));
        }
        for host in &self.clients {
            consider(host.session.poll_timeout().map(|(t, _)| t));
        }
        next
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.queue_seq += 1;
        self.queue.insert((self.now + after, self.queue_seq), event);
    }

    fn api_id(&mut self) -> ApiRequestId {
        self.next_api += 1;
        ApiRequestId(self.next_api)
    }

    /// Drains every machine's outputs into scheduled events until all are quiet.
    fn pump(&mut self) {
        let now = self.now;
        loop {
            let mut moved = false;
            while let Some(output) = self.route.poll_output() {
                moved = true;
                self.route_output(now, output);
            }
            for s in 0..self.servers.len() {
                while let Some(output) = self.servers[s].node.poll_output() {
                    moved = true;
                    if self.servers[s].alive {
                        self.server_output(s, output);
                    }
                }
            }
            for c in 0..self.clients.len() {
                while let Some(output) = self.clients[c].session.poll_output() {
                    moved = true;
                    match output {
                        ClientOutput::Command(command) => self.client_command(c, command),
                        ClientOutput::Event(event) => self.client_event(c, now, event),
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    fn server_index(&self, id: &ServerId) -> usize {
        self.servers
            .iter()
            .position(|h| h.id == *id)
            .expect("the route only names known servers")
    }

    fn route_to_server(&mut self, server: usize, frame: Frame) {
        if !self.link_down.contains(&server) {
            self.schedule(
                self.link_latency(server),
                Event::RouteToServer { server, frame },
            );
        }
    }

    fn route_output(&mut self, now: Instant, output: RouteOutput) {
        match output {
            RouteOutput::Store { machine, request } => self.schedule(
                LATENCY,
                Event::StoreRequest {
                    from: Requester::Route(machine),
                    request,
                },
            ),
            // Password work runs at once (it takes no virtual time here).
            RouteOutput::Password(job) => {
                self.route.handle_password(now, job.id, job.work.run());
            }
            RouteOutput::Event(event) => self.route_event(event),
            RouteOutput::SendResult { origin, result } => {
                if let SendOrigin::Link { server, .. } = origin {
                    let server = self.server_index(&server);
                    let frame = Frame {
                        kind: Some(Kind::RouteSendResult(result)),
                    };
                    self.route_to_server(server, frame);
                }
            }
            RouteOutput::Push { server, batch } => {
                let server = self.server_index(&server);
                self.route_to_server(
                    server,
                    Frame {
                        kind: Some(Kind::PushBatch(batch)),
                    },
                );
            }
        }
    }

    fn route_event(&mut self, event: RouteEvent) {
        self.route_events.push((self.now, event.clone()));
        match event {
            RouteEvent::LoggedIn { api, result } => {
                if let Some((client, attempt)) = self.api_clients.remove(&api) {
                    self.schedule(
                        LATENCY,
                        Event::LoginAnswer {
                            client,
                            attempt,
                            result,
                        },
                    );
                }
            }
            RouteEvent::KickOld {
                server,
                user,
                below_epoch,
            } => {
                let server = self.server_index(&server);
                let kick = cim_core::proto::KickUser {
                    user_id: user.0,
                    below_epoch: below_epoch.0,
                    reason: cim_core::proto::KickReason::TakenOver as i32,
                };
                self.route_to_server(
                    server,
                    Frame {
                        kind: Some(Kind::KickUser(kick)),
                    },
                );
            }
            RouteEvent::Registered { .. } | RouteEvent::LoggedOut { .. } => {}
        }
    }

    fn server_output(&mut self, s: usize, output: ServerOutput) {
        match output {
            ServerOutput::TransmitToMany { conns, frame } => {
                for conn in conns {
                    self.server_output(
                        s,
                        ServerOutput::Transmit {
                            conn,
                            frame: frame.clone(),
                        },
                    );
                }
            }
            ServerOutput::Transmit { conn, frame } => {
                // The socket takes every frame at once in the harness.
                self.servers[s].node.handle_written(conn, 1);
                let Some(&(client, attempt)) = self.servers[s].conns.get(&conn) else {
                    return;
                };
                if let Some(Kind::LoginOk(ok)) = &frame.kind {
                    self.sessions.push(SessionSpan {
                        user: UserId(ok.user_id),
                        epoch: Epoch(ok.epoch),
                        server: s,
                        start: self.now,
                        end: None,
                        conn,
                    });
                }
                self.schedule(
                    LATENCY,
                    Event::ToClient {
                        client,
                        attempt,
                        frame,
                    },
                );
            }
            ServerOutput::Close { conn } => {
                self.end_session(s, conn);
                if let Some((client, attempt)) = self.servers[s].conns.remove(&conn) {
                    self.schedule(LATENCY, Event::ClosedToClient { client, attempt });
                }
            }
            ServerOutput::Store(request) => {
                if !self.servers[s].store_cut {
                    self.schedule(
                        LATENCY,
                        Event::StoreRequest {
                            from: Requester::Server(s),
                            request,
                        },
                    );
                }
            }
            ServerOutput::ToRoute { link, send } => {
                assert_eq!(link, ROUTE_LINK, "the only link up");
                let frame = Frame {
                    kind: Some(Kind::RouteSend(send)),
                };
                if !self.link_down.contains(&s) {
                    self.schedule(
                        self.link_latency(s),
                        Event::ServerToRoute { server: s, frame },
                    );
                }
            }
            ServerOutput::KickUserDone { link, done } => {
                assert_eq!(link, ROUTE_LINK, "the only link up");
                let frame = Frame {
                    kind: Some(Kind::KickUserDone(done)),
                };
                if !self.link_down.contains(&s) {
                    self.schedule(
                        self.link_latency(s),
                        Event::ServerToRoute { server: s, frame },
                    );
                }
            }
        }
    }

    fn end_session(&mut self, server: usize, conn: ConnId) {
        let now = self.now;
        for span in self.sessions.iter_mut() {
            if span.server == server && span.conn == conn && span.end.is_none() {
                span.end = Some(now);
            }
        }
    }

    fn client_command(&mut self, c: usize, command: ClientCommand) {
        match command {
            ClientCommand::Login { attempt, request } => {
                let api = self.api_id();
                self.api_clients.insert(api, (c, attempt));
                self.schedule(LATENCY, Event::RouteLogin { api, request });
            }
            ClientCommand::Connect { endpoint } => {
                let server = self.servers.iter().position(|h| h.id.0 == endpoint.host);
                let host_state = &mut self.clients[c];
                host_state.attempts += 1;
                let attempt = host_state.attempts;
                match server {
                    Some(server) => {
                        host_state.conn = Some((server, attempt, None));
                        self.schedule(
                            LATENCY,
                            Event::Connect {
                                client: c,
                                server,
                                attempt,
                            },
                        );
                    }
                    None => {
                        host_state.conn = None;
                        let now = self.now;
                        host_state.session.handle_connect_failed(now);
                    }
                }
            }
            ClientCommand::Transmit(frame) => {
                if let Some((server, _, Some(conn))) = self.clients[c].conn {
                    self.schedule(
                        LATENCY,
                        Event::ToServer {
                            server,
                            conn,
                            frame,
                        },
                    );
                }
            }
            ClientCommand::Disconnect => {
                if let Some((server, _, Some(conn))) = self.clients[c].conn.take() {
                    self.schedule(LATENCY, Event::ClosedToServer { server, conn });
                }
            }
        }
    }

    fn client_event(&mut self, c: usize, now: Instant, event: ClientEvent) {
        let host = &mut self.clients[c];
        match &event {
            ClientEvent::Message(message) => host.app.push(message.clone()),
            ClientEvent::Acked {
                msg_id,
                conv,
                log_epoch,
                seq,
            } => {
                host.acked.insert(*msg_id, (conv.clone(), *log_epoch, *seq));
            }
            _ => {}
        }
        host.events.push((now, event));
    }

    fn process(&mut self, event: Event) {
        let (now, wall) = (self.now, self.wall());
        match event {
            Event::StoreRequest { from, request } => {
                if let Requester::Server(s) = from
                    && (self.servers[s].store_cut || !self.servers[s].alive)
                {
                    return;
                }
                let reply = self.store.apply(wall, &request.command);
                self.schedule(
                    LATENCY,
                    Event::StoreReply {
                        to: from,
                        id: request.id,
                        reply,
                    },
                );
            }
            Event::StoreReply { to, id, reply } => match to {
                Requester::Route(machine) => {
                    self.route
                        .handle_store_reply(now, wall, machine, id, Ok(reply))
                }
                Requester::Server(s) => {
                    let host = &mut self.servers[s];
                    if host.alive && !host.store_cut {
                        host.node.handle_store_reply(now, id, Ok(reply));
                    }
                }
            },
            Event::RouteLogin { api, request } => self.route.handle_login(now, api, request),
            Event::LoginAnswer {
                client,
                attempt,
                result,
            } => {
                let result = result.map_err(LoginFailure::Rejected);
                self.clients[client]
                    .session
                    .handle_login_answer(now, attempt, result);
            }
            Event::Connect {
                client,
                server,
                attempt,
            } if self.cut_paths.contains(&(client, server)) => {
                let _ = attempt; // lost on the way: the client's connect timeout tells it
            }
            Event::Connect {
                client,
                server,
                attempt,
            } => {
                let current = self.clients[client]
                    .conn
                    .is_some_and(|(s, a, _)| s == server && a == attempt);
                if !current {
                    return; // the client gave up on this attempt meanwhile
                }
                if !self.servers[server].alive {
                    // Refused (crashed) or silent (vanished): both end as a failed connect;
                    // a silent one only after the client's own connect timeout.
                    if self.link_down.contains(&server) {
                        self.clients[client].conn = None;
                        self.clients[client].session.handle_connect_failed(now);
                    }
                    return;
                }
                self.next_conn += 1;
                let conn = ConnId(self.next_conn);
                if self.servers[server]
                    .node
                    .handle_connection_opened(now, conn)
                    .is_err()
                {
                    self.clients[client].conn = None;
                    self.clients[client].session.handle_connect_failed(now);
                    return;
                }
                self.servers[server].conns.insert(conn, (client, attempt));
                self.clients[client].conn = Some((server, attempt, Some(conn)));
                self.clients[client].session.handle_connected(now);
            }
            Event::ToServer {
                server,
                conn,
                frame,
            } => {
                let host = &mut self.servers[server];
                let cut = host
                    .conns
                    .get(&conn)
                    .is_some_and(|(c, _)| self.cut_paths.contains(&(*c, server)));
                if host.alive && host.conns.contains_key(&conn) && !cut {
                    host.node.handle_frame(now, wall, conn, frame);
                }
            }
            Event::ToClient {
                client,
                attempt,
                frame,
            } => {
                let on_path = |(s, a, _): (usize, u64, Option<ConnId>)| {
                    a == attempt && !self.cut_paths.contains(&(client, s))
                };
                if self.clients[client].conn.is_some_and(on_path) {
                    // A frame the client cannot use is its own business (it says so).
                    let _ = self.clients[client].session.handle_frame(now, frame);
                }
            }
            Event::ClosedToClient { client, attempt } => {
                let on_path = |(s, a, _): (usize, u64, Option<ConnId>)| {
                    a == attempt && !self.cut_paths.contains(&(client, s))
                };
                if self.clients[client].conn.is_some_and(on_path) {
                    self.clients[client].conn = None;
                    self.clients[client].session.handle_disconnected(now);
                }
            }
            Event::ClosedToServer { server, conn } => {
                let host = &mut self.servers[server];
                let cut = host
                    .conns
                    .get(&conn)
                    .is_some_and(|(c, _)| self.cut_paths.contains(&(*c, server)));
                if host.alive && !cut && host.conns.remove(&conn).is_some() {
                    host.node.handle_connection_closed(now, conn);
                    self.end_session(server, conn);
                }
            }
            Event::ServerToRoute { server, frame } => match frame.kind {
                Some(Kind::RouteSend(send)) => {
                    let id = self.servers[server].id.clone();
                    self.route.handle_route_send(now, wall, id, send);
                }
                Some(Kind::KickUserDone(done)) => {
                    let id = self.servers[server].id.clone();
                    self.route.handle_kick_done(
                        now,
                        wall,
                        &id,
                        UserId(done.user_id),
                        Epoch(done.below_epoch),
                    );
                }
                other => panic!("unexpected frame from a server to the route: {other:?}"),
            },
            Event::RouteToServer { server, frame } => {
                let host = &mut self.servers[server];
                if !host.alive {
                    return;
                }
                match frame.kind {
                    Some(Kind::PushBatch(batch)) => host.node.handle_push(now, batch),
                    // The answer is an output, scheduled when the node's outputs are pumped.
                    Some(Kind::KickUser(kick)) => host.node.handle_kick_user(now, ROUTE_LINK, kick),
                    Some(Kind::RouteSendResult(result)) => {
                        host.node.handle_route_result(now, result)
                    }
                    other => panic!("unexpected frame from the route to a server: {other:?}"),
                }
            }
            Event::RegistryDrop { server } => {
                if !self.servers[server].alive {
                    self.registered.remove(&server);
                    self.publish_registry();
                }
            }
        }
    }

    // ---- invariants ----

    /// No two sessions of one user overlap in (simulated) time.
    pub fn assert_no_overlapping_sessions(&self) {
        let mut by_user: BTreeMap<UserId, Vec<&SessionSpan>> = BTreeMap::new();
        for span in &self.sessions {
            by_user.entry(span.user).or_default().push(span);
        }
        for (user, mut spans) in by_user {
            spans.sort_by_key(|s| s.start);
            for pair in spans.windows(2) {
                let end = pair[0].end.unwrap_or(self.now);
                assert!(
                    end <= pair[1].start,
                    "user {user}: session epoch {} on s{} ({:?}..{:?}) overlaps epoch {} on s{} from {:?}",
                    pair[0].epoch.0,
                    pair[0].server + 1,
                    pair[0].start - self.t0,
                    end - self.t0,
                    pair[1].epoch.0,
                    pair[1].server + 1,
                    pair[1].start - self.t0,
                );
            }
        }
    }

    /// Every listed client got every message of every conversation it belongs to exactly
    /// once, in seq order (nothing is trimmed in these runs), and every message a client
    /// was told was acked is in its log.
    pub fn assert_everyone_has_everything(&mut self, clients: &[usize]) {
        let wall = self.wall();
        for &c in clients {
            let user = self.clients[c].user;
            let StoreReply::Heads(heads) =
                self.store.apply(wall, &StoreCommand::LoadHeads { user })
            else {
                unreachable!("LoadHeads answers Heads")
            };
            for head in heads {
                let StoreReply::Fetched { messages, .. } = self.store.apply(
                    wall,
                    &StoreCommand::Fetch {
                        user,
                        conv: head.conv.clone(),
                        log_epoch: head.log_epoch,
                        after_seq: 0,
                        limit: u32::MAX,
                    },
                ) else {
                    unreachable!("Fetch answers Fetched")
                };
                let got: Vec<(u64, ClientMsgId)> = self.clients[c]
                    .app
                    .iter()
                    .filter(|m| m.conv == head.conv)
                    .map(|m| (m.seq, m.msg_id))
                    .collect();
                let want: Vec<(u64, ClientMsgId)> =
                    messages.iter().map(|m| (m.seq, m.msg_id)).collect();
                assert_eq!(got, want, "client {c} (user {user}) in {}", head.conv);
            }
            for (id, (conv, _, seq)) in &self.clients[c].acked {
                let StoreReply::Heads(heads) =
                    self.store.apply(wall, &StoreCommand::LoadHeads { user })
                else {
                    unreachable!()
                };
                let head = heads
                    .iter()
                    .find(|h| h.conv == *conv)
                    .expect("an acked message's conversation exists");
                assert!(
                    *seq <= head.head_seq,
                    "acked {id} at seq {seq} beyond the head of {conv}"
                );
            }
        }
    }
}
