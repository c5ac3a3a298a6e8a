//! The driver task: owns the route's machines (`RouteNode`: `RouteLogin` and
//! `RouteDelivery`), feeds them every input (API calls, store replies, link frames, registry
//! changes, deadlines) and carries out every `RouteOutput`, never awaiting a store call
//! itself.
//!
//! Store calls go through one **store lane** task, which starts them in the order the
//! machines asked for them and awaits them concurrently (a `FuturesUnordered`): a spawned
//! task per call would let the runtime start them in any order (tokio's LIFO slot runs the
//! newest first), and one sender's burst of appends would reach the store reordered. The
//! store refuses an out-of-order append anyway (`SendOrder`), so this keeps the common case
//! free of refusals and resends; it is not what makes the order safe.
//!
//! Argon2 (tens of milliseconds per login with production parameters) runs on a small pool
//! of blocking threads, one per core: a burst of logins queues there while messages keep
//! flowing through the driver. The queue is served round-robin by client address
//! (`password_queue`), so one client's burst waits behind itself, not in front of others.
//! The simulation runs them inline instead (`PasswordRunner::Inline`), so it stays
//! deterministic (a real thread would finish at a real, not simulated, time).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use cim_core::ids::{ApiRequestId, Epoch, ServerId, UnixMillis, UserId};
use cim_core::registry::LiveServer;
use cim_core::route::balance::Balancer;
use cim_core::route::delivery::{RouteDelivery, SendOrigin};
use cim_core::route::login::{
    CODE_BUSY, CODE_THROTTLED, LoggedOut, LoginAnswer, LoginError, LogoutError, PasswordJob,
    RegisterFailure, Registered, RouteEvent, RouteLogin,
};
use cim_core::route::{RouteMachine, RouteNode, RouteOutput};
use cim_core::store::{StoreRequest, StoreUnavailable};
use cim_proto::frame::Kind;
use cim_proto::{Frame, KickReason, KickUser, RouteSendResult};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::counters::Counters;
use super::input::{ApiCall, Input, LinkInbound};
use super::links::{self, LinkConfig};
use super::password_queue::FairQueue;
use super::{PasswordRunner, RouteOptions};
use crate::clock::Clock;
use crate::metrics::{Exposition, Kind as MetricKind};
use crate::net::Network;
use crate::registry::{RegistryView, ServerMap, SessionHealth};
use crate::store::Store;

/// Inputs waiting for the driver. Senders wait when it is full (backpressure on the HTTP
/// handlers and link readers), never drop.
pub(super) const INPUT_QUEUE: usize = 4096;

/// Where an API request's answer goes.
#[derive(Debug)]
enum Waiter {
    Register(oneshot::Sender<Result<Registered, RegisterFailure>>),
    Login {
        reply: oneshot::Sender<Result<LoginAnswer, LoginError>>,
        /// The request presented a resumption secret (no argon2 check if it is good).
        by_secret: bool,
    },
    Logout(oneshot::Sender<Result<LoggedOut, LogoutError>>),
    Send(oneshot::Sender<RouteSendResult>),
}

/// One live server's link task.
#[derive(Debug)]
struct Link {
    server: LiveServer,
    generation: u64,
    task: AbortHandle,
    /// The authenticated connection's queue, while it is up.
    tx: Option<mpsc::Sender<Frame>>,
}

/// Counters only the driver touches.
#[derive(Debug, Default)]
struct Stats {
    registrations: BTreeMap<&'static str, u64>,
    logins: BTreeMap<&'static str, u64>,
    /// Of the logins answered ok, those a resumption secret proved.
    resumed_logins: u64,
    logouts: BTreeMap<&'static str, u64>,
    kicks_sent: u64,
    frames_dropped: BTreeMap<&'static str, u64>,
    link_sends: u64,
    store_errors: u64,
    registry_changes: u64,
}

pub(super) struct Driver<N: Network> {
    net: N,
    clock: Clock,
    route_id: String,
    node: RouteNode,
    store: Arc<dyn Store>,
    view: RegistryView,
    counters: Arc<Counters>,
    to_self: mpsc::Sender<Input>,
    cancel: CancellationToken,
    link_config: Arc<LinkConfig>,
    /// Where store calls go, in order: the store lane task (see the module docs).
    store_lane: mpsc::UnboundedSender<LaneCall>,
    /// The lane's end, until `run` starts the lane.
    store_lane_rx: Option<mpsc::UnboundedReceiver<LaneCall>>,
    /// Bounds a store call, so a hung backend cannot pile up calls forever (the machines
    /// time the request out earlier on their own).
    store_task_timeout: std::time::Duration,
    /// Password jobs run at once (one blocking thread each); 0 runs them inline.
    password_workers: usize,
    password_running: usize,
    password_queue: FairQueue<PasswordJob>,
    /// The client address of each register/login request still in the machine.
    api_clients: BTreeMap<ApiRequestId, IpAddr>,
    links: BTreeMap<ServerId, Link>,
    link_tasks: JoinSet<()>,
    next_generation: u64,
    next_api: u64,
    waiters: BTreeMap<ApiRequestId, Waiter>,
    stats: Stats,
}

impl<N: Network> Driver<N> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        net: N,
        clock: Clock,
        options: &RouteOptions,
        store: Arc<dyn Store>,
        view: RegistryView,
        counters: Arc<Counters>,
        to_self: mpsc::Sender<Input>,
        cancel: CancellationToken,
    ) -> Self {
        // Distinct streams for the balancer and the login machine from one seed.
        let balancer = Balancer::new(options.strategy, options.seed ^ 0xba1a_5ce5_ba1a_5ce5);
        let mut login = match options.login_entropy {
            Some(entropy) => RouteLogin::with_entropy(
                options.login.clone(),
                options.ticket_keys.clone(),
                options.bearer_secret.clone(),
                balancer,
                entropy,
            ),
            None => RouteLogin::new(
                options.login.clone(),
                options.ticket_keys.clone(),
                options.bearer_secret.clone(),
                balancer,
                options.seed,
            ),
        };
        login.accept_previous_bearer_secret(options.bearer_secret_previous.clone());
        let store_task_timeout = options
            .login
            .store_timeout
            .max(options.delivery.store_timeout)
            * 2;
        let password_workers = match options.password_runner {
            PasswordRunner::BlockingPool => options.password_workers,
            PasswordRunner::Inline => 0,
        };
        let (store_lane, store_lane_rx) = mpsc::unbounded_channel();
        Self {
            net,
            clock,
            route_id: options.route_id.clone(),
            node: RouteNode::new(login, RouteDelivery::new(options.delivery.clone())),
            store,
            view,
            counters,
            to_self,
            cancel,
            link_config: Arc::new(LinkConfig {
                route_id: options.route_id.clone(),
                link_secret: options.link_secret.clone(),
                link_secret_previous: options.link_secret_previous.clone(),
                max_frame: options.max_frame,
                io_timeout: options.io_timeout,
                ping_interval: options.link_ping_interval,
                retry_delay: options.link_retry_delay,
                tls: options.link_tls.clone(),
                nonces: options.link_nonces.clone(),
            }),
            store_lane,
            store_lane_rx: Some(store_lane_rx),
            store_task_timeout,
            password_workers,
            password_running: 0,
            password_queue: FairQueue::default(),
            api_clients: BTreeMap::new(),
            links: BTreeMap::new(),
            link_tasks: JoinSet::new(),
            next_generation: 0,
            next_api: 0,
            waiters: BTreeMap::new(),
            stats: Stats::default(),
        }
    }

    /// The loop: one input at a time, then drain every output, then re-arm the timer.
    pub(super) async fn run(mut self, mut inputs: mpsc::Receiver<Input>) {
        if let Some(calls) = self.store_lane_rx.take() {
            tokio::spawn(run_store_lane(
                self.store.clone(),
                calls,
                self.to_self.clone(),
                self.store_task_timeout,
            ));
        }
        let mut servers = self.view.servers();
        let initial = servers.borrow_and_update().clone();
        self.registry_changed(initial);
        let mut registry_open = true;
        // The view's own session: a view cut off from the ensemble (see
        // `RouteLogin::handle_registry_lost`) stops login placement until it is back.
        let mut view_health = self.view.health();
        let health = *view_health.borrow_and_update();
        self.view_health_changed(health);
        let mut health_open = true;
        loop {
            self.drain();
            let deadline = self.node.poll_timeout();
            let clock = self.clock;
            let timer = async move {
                match deadline {
                    Some((at, _)) => clock.sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = self.cancel.cancelled() => break,
                input = inputs.recv() => match input {
                    Some(input) => self.handle(input),
                    // Unreachable while we hold `to_self`; stop rather than spin.
                    None => break,
                },
                changed = servers.changed(), if registry_open => match changed {
                    Ok(()) => {
                        let map = servers.borrow_and_update().clone();
                        self.registry_changed(map);
                    }
                    Err(_) => {
                        // The view's source is gone: keep routing with the last view;
                        // /health reports the registry as failing.
                        tracing::error!("registry view closed; the live-server view is frozen");
                        registry_open = false;
                    }
                },
                changed = view_health.changed(), if health_open => match changed {
                    Ok(()) => {
                        let health = *view_health.borrow_and_update();
                        self.view_health_changed(health);
                    }
                    // Gone with the view's source, reported above.
                    Err(_) => health_open = false,
                },
                () = timer => {
                    // Which machine's deadline woke the route, for tracing a stall or a
                    // busy loop (the node serves every deadline that passed either way).
                    if let Some((_, reason)) = deadline {
                        tracing::trace!(?reason, "route timer");
                    }
                    self.node.handle_timeout(self.clock.now());
                }
            }
        }
        tracing::info!(route_id = %self.route_id, "route driver stopping; closing links");
        self.links.clear();
        self.link_tasks.shutdown().await;
    }

    fn handle(&mut self, input: Input) {
        let now = self.clock.now();
        let wall = self.clock.wall();
        match input {
            Input::Api(call) => self.api(call),
            Input::Store {
                machine,
                id,
                result,
            } => {
                if result.is_err() {
                    self.stats.store_errors += 1;
                }
                self.node.handle_store_reply(now, wall, machine, id, result);
            }
            Input::Password { id, outcome } => {
                self.password_running = self.password_running.saturating_sub(1);
                if let Some(outcome) = outcome {
                    self.node.handle_password(now, id, outcome);
                }
                self.dispatch_passwords();
            }
            Input::LinkUp {
                server,
                generation,
                tx,
            } => {
                if let Some(link) = self.links.get_mut(&server)
                    && link.generation == generation
                {
                    link.tx = Some(tx);
                    // Kicks sent while the link was down were dropped; a held takeover
                    // waiting on this server asks again (a restarted server answers at once).
                    self.node.handle_server_reachable(&server);
                }
            }
            Input::LinkDown { server, generation } => {
                if let Some(link) = self.links.get_mut(&server)
                    && link.generation == generation
                {
                    link.tx = None;
                    // New logins go elsewhere while it is down: after a crash the server
                    // stays listed until its registry session expires.
                    self.node.handle_server_unreachable(&server);
                }
            }
            Input::LinkFrame {
                server,
                generation,
                frame,
            } => {
                // A frame from a link task we already replaced is from a server we no
                // longer talk to: its sessions are being moved, ignore it.
                if self
                    .links
                    .get(&server)
                    .is_none_or(|l| l.generation != generation)
                {
                    return;
                }
                match frame {
                    LinkInbound::Send(route_send) => {
                        self.node
                            .handle_route_send(now, wall, server.clone(), route_send)
                    }
                    LinkInbound::KickDone(done) => self.node.handle_kick_done(
                        now,
                        wall,
                        &server,
                        UserId(done.user_id),
                        Epoch(done.below_epoch),
                    ),
                }
            }
        }
    }

    fn api(&mut self, call: ApiCall) {
        let now = self.clock.now();
        let wall = self.clock.wall();
        self.next_api += 1;
        let api = ApiRequestId(self.next_api);
        match call {
            ApiCall::Register {
                name,
                password,
                client,
                reply,
            } => {
                self.waiters.insert(api, Waiter::Register(reply));
                self.api_clients.insert(api, client);
                self.node.handle_register(now, api, &name, &password);
            }
            ApiCall::Login {
                request,
                client,
                reply,
            } => {
                let by_secret = request.resume_secret.is_some();
                self.waiters.insert(api, Waiter::Login { reply, by_secret });
                self.api_clients.insert(api, client);
                self.node.handle_login(now, api, request);
            }
            ApiCall::Logout { token, reply } => {
                self.waiters.insert(api, Waiter::Logout(reply));
                self.node.handle_logout(now, wall, api, &token);
            }
            ApiCall::Send { user, send, reply } => {
                self.waiters.insert(api, Waiter::Send(reply));
                self.node
                    .handle_send(now, wall, SendOrigin::Http(api), user, send);
            }
            ApiCall::Metrics { reply } => {
                let _ = reply.send(self.render_metrics());
            }
            ApiCall::AdminKick {
                server,
                user,
                below_epoch,
            } => {
                let kick = KickUser {
                    user_id: user.0,
                    below_epoch: below_epoch.0,
                    reason: KickReason::LoggedOut as i32,
                };
                self.send_on_link(&server, Kind::KickUser(kick), "kick_user");
            }
        }
    }

    /// `Expired` (the view's session lost, or cut off long enough to count as lost) stops
    /// login placement; `Connected` resumes it. `Disconnected` changes nothing: a reconnect
    /// to another ensemble member is expected within it.
    fn view_health_changed(&mut self, health: SessionHealth) {
        let now = self.clock.now();
        match health {
            SessionHealth::Expired if !self.node.login().is_registry_lost() => {
                tracing::warn!("registry view lost: logins are refused (7100) until it is back");
                self.node.handle_registry_lost(now);
            }
            SessionHealth::Connected if self.node.login().is_registry_lost() => {
                tracing::info!("registry view back: logins are placed again");
                self.node.handle_registry_back(now);
            }
            _ => {}
        }
    }

    fn registry_changed(&mut self, live: ServerMap) {
        self.stats.registry_changes += 1;
        tracing::debug!(servers = ?live.values().map(|s| (s.id.as_str(), s.connections)).collect::<Vec<_>>(),
            "registry view changed");
        let now = self.clock.now();
        let wall = self.clock.wall();
        self.node.handle_registry(now, wall, live.clone());
        // Links of servers that left (or moved to another address) close now.
        let gone: Vec<ServerId> = self
            .links
            .iter()
            .filter(|(id, link)| {
                live.get(*id).is_none_or(|s| {
                    s.host != link.server.host || s.link_port != link.server.link_port
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(link) = self.links.remove(&id) {
                tracing::info!(server = %id, "server left the registry; closing its link");
                link.task.abort();
            }
        }
        while self.link_tasks.try_join_next().is_some() {}
        for (id, server) in live {
            if let Some(link) = self.links.get_mut(&id) {
                link.server = server;
                continue;
            }
            self.next_generation += 1;
            let generation = self.next_generation;
            let task = self.link_tasks.spawn(links::run_link(
                self.net.clone(),
                self.clock,
                server.clone(),
                generation,
                self.link_config.clone(),
                self.to_self.clone(),
                self.counters.clone(),
            ));
            self.links.insert(
                id,
                Link {
                    server,
                    generation,
                    task,
                    tx: None,
                },
            );
        }
    }

    /// Carries out every output the node has (the drain rule on `RouteNode`). A password
    /// job run inline feeds its outcome back at once; what it causes comes out of this same
    /// drain.
    fn drain(&mut self) {
        while let Some(output) = self.node.poll_output() {
            match output {
                RouteOutput::Password(job) => self.run_password(job),
                RouteOutput::Store { machine, request } => self.spawn_store(machine, request),
                RouteOutput::Event(event) => self.route_event(event),
                RouteOutput::SendResult { origin, result } => match origin {
                    SendOrigin::Link { server, .. } => {
                        self.send_on_link(&server, Kind::RouteSendResult(result), "send_result");
                    }
                    SendOrigin::Http(api) => match self.waiters.remove(&api) {
                        Some(Waiter::Send(reply)) => {
                            let _ = reply.send(result);
                        }
                        other => self.stray(api, other),
                    },
                },
                RouteOutput::Push { server, batch } => {
                    self.send_on_link(&server, Kind::PushBatch(batch), "push_batch");
                }
            }
        }
    }

    fn route_event(&mut self, event: RouteEvent) {
        match event {
            RouteEvent::Registered { api, result } => {
                self.api_clients.remove(&api);
                let label = match &result {
                    Ok(_) => "ok",
                    Err(e) => e.code(),
                };
                *self.stats.registrations.entry(label).or_default() += 1;
                match self.waiters.remove(&api) {
                    Some(Waiter::Register(reply)) => {
                        let _ = reply.send(result);
                    }
                    other => self.stray(api, other),
                }
            }
            RouteEvent::LoggedIn { api, result } => {
                self.api_clients.remove(&api);
                let label = match &result {
                    Ok(_) => "ok",
                    Err(e) => e.code(),
                };
                *self.stats.logins.entry(label).or_default() += 1;
                match self.waiters.remove(&api) {
                    Some(Waiter::Login { reply, by_secret }) => {
                        if by_secret && result.is_ok() {
                            self.stats.resumed_logins += 1;
                        }
                        let _ = reply.send(result);
                    }
                    other => self.stray(api, other),
                }
            }
            RouteEvent::LoggedOut { api, result } => {
                let label = match &result {
                    Ok(LoggedOut { released: true, .. }) => "released",
                    Ok(LoggedOut {
                        released: false, ..
                    }) => "not_current",
                    Err(LogoutError::BadToken(_)) => "bad_token",
                    Err(LogoutError::Unavailable) => "4000",
                };
                *self.stats.logouts.entry(label).or_default() += 1;
                match self.waiters.remove(&api) {
                    Some(Waiter::Logout(reply)) => {
                        let _ = reply.send(result);
                    }
                    other => self.stray(api, other),
                }
            }
            RouteEvent::KickOld {
                server,
                user,
                below_epoch,
            } => {
                self.stats.kicks_sent += 1;
                let kick = KickUser {
                    user_id: user.0,
                    below_epoch: below_epoch.0,
                    reason: KickReason::TakenOver as i32,
                };
                // Best effort without a link: the held answer is released when the server
                // leaves the registry or the old lease runs out.
                self.send_on_link(&server, Kind::KickUser(kick), "kick_user");
            }
        }
    }

    /// An answer for a request nobody waits for (or of the wrong kind): a machine bug. Log
    /// it rather than panic; a waiter of the wrong kind is dropped, so its caller gets 503.
    fn stray(&self, api: ApiRequestId, waiter: Option<Waiter>) {
        tracing::error!(
            ?api,
            ?waiter,
            "machine answered a request with no matching waiter"
        );
    }

    /// Queues a frame on `server`'s link; without a link up (or with its queue full) the
    /// frame is dropped and counted.
    fn send_on_link(&mut self, server: &ServerId, kind: Kind, what: &'static str) {
        let queued = self
            .links
            .get(server)
            .and_then(|l| l.tx.as_ref())
            .is_some_and(|tx| tx.try_send(Frame { kind: Some(kind) }).is_ok());
        if queued {
            self.stats.link_sends += 1;
        } else {
            tracing::debug!(%server, frame = what, "no link up (or its queue is full); frame dropped");
            *self.stats.frames_dropped.entry(what).or_default() += 1;
        }
    }

    /// Queues a password job for the pool (fair by client address), or runs it inline
    /// without one.
    fn run_password(&mut self, job: PasswordJob) {
        if self.password_workers == 0 {
            let outcome = job.work.run();
            self.node.handle_password(self.clock.now(), job.id, outcome);
            return;
        }
        let client = self
            .api_clients
            .get(&job.api)
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        self.password_queue.push(client, job);
        self.dispatch_passwords();
    }

    /// Starts queued password jobs while a worker is free.
    fn dispatch_passwords(&mut self) {
        while self.password_running < self.password_workers {
            let Some(job) = self.password_queue.pop() else {
                return;
            };
            // The machine has already failed this request: under a burst, skipping it
            // sheds work nobody waits for.
            if self.clock.now() >= job.deadline {
                continue;
            }
            self.password_running += 1;
            let to_self = self.to_self.clone();
            let PasswordJob { id, work, .. } = job;
            tokio::spawn(async move {
                let outcome = tokio::task::spawn_blocking(move || work.run()).await.ok();
                // The driver may be gone (shutdown): nobody waits for the outcome then.
                let _ = to_self.send(Input::Password { id, outcome }).await;
            });
        }
    }

    /// Hands a store call to the lane, which starts calls in the order they come.
    fn spawn_store(&self, machine: RouteMachine, request: StoreRequest) {
        // The lane ends only when the driver's channel does: nobody waits for answers then.
        let _ = self.store_lane.send(LaneCall {
            machine,
            request,
            wall: self.clock.wall(),
        });
    }

    fn render_metrics(&self) -> String {
        let mut page = Exposition::new("route_id", &self.route_id);
        let labelled = |page: &mut Exposition,
                        name: &str,
                        kind: MetricKind,
                        help: &str,
                        key: &str,
                        map: &BTreeMap<&'static str, u64>| {
            let mut family = page.family(name, kind, help);
            for (value, n) in map {
                family.sample(&[(key, value)], n);
            }
        };
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let d = self.node.delivery().stats();
        let links_up = self.links.values().filter(|l| l.tx.is_some()).count() as u64;
        page.single(
            "cim_route_servers_live",
            MetricKind::Gauge,
            "Servers in the registry view.",
            self.links.len() as u64,
        );
        page.single(
            "cim_route_links_up",
            MetricKind::Gauge,
            "Authenticated links to servers.",
            links_up,
        );
        page.single(
            "cim_route_link_dials_total",
            MetricKind::Counter,
            "Link dial attempts.",
            load(&c.link_dials),
        );
        page.single(
            "cim_route_link_connects_total",
            MetricKind::Counter,
            "Links authenticated.",
            load(&c.link_connects),
        );
        page.single(
            "cim_route_link_failures_total",
            MetricKind::Counter,
            "Link attempts or links that failed.",
            load(&c.link_failures),
        );
        page.single(
            "cim_route_link_frames_sent_total",
            MetricKind::Counter,
            "Frames queued on links.",
            self.stats.link_sends,
        );
        labelled(
            &mut page,
            "cim_route_link_frames_dropped_total",
            MetricKind::Counter,
            "Frames dropped: no link up to the server, or its queue full.",
            "frame",
            &self.stats.frames_dropped,
        );
        labelled(
            &mut page,
            "cim_route_registrations_total",
            MetricKind::Counter,
            "Registrations by result code.",
            "result",
            &self.stats.registrations,
        );
        labelled(
            &mut page,
            "cim_route_logins_total",
            MetricKind::Counter,
            "Logins by result code.",
            "result",
            &self.stats.logins,
        );
        page.single(
            "cim_route_logins_resumed_total",
            MetricKind::Counter,
            "Logins answered ok that a resumption secret proved (no argon2 check).",
            self.stats.resumed_logins,
        );
        labelled(
            &mut page,
            "cim_route_logouts_total",
            MetricKind::Counter,
            "Logouts by result.",
            "result",
            &self.stats.logouts,
        );
        page.single(
            "cim_route_takeover_kicks_total",
            MetricKind::Counter,
            "KickUser sent for takeovers.",
            self.stats.kicks_sent,
        );
        page.single(
            "cim_route_messages_acked_total",
            MetricKind::Counter,
            "Sends appended and acked.",
            d.acked,
        );
        page.single(
            "cim_route_messages_duplicate_total",
            MetricKind::Counter,
            "Acked sends that were retries of an appended message.",
            d.duplicates,
        );
        page.single(
            "cim_route_messages_nacked_total",
            MetricKind::Counter,
            "Sends refused.",
            d.nacked,
        );
        page.single(
            "cim_route_pushes_total",
            MetricKind::Counter,
            "Pushes planned (one per server per message).",
            d.pushes,
        );
        page.single(
            "cim_route_recipients_unreachable_total",
            MetricKind::Counter,
            "Recipients skipped: offline or on a server not live.",
            d.recipients_unreachable,
        );
        page.single(
            "cim_route_pushes_abandoned_total",
            MetricKind::Counter,
            "Appended messages whose push was given up (route/member read failed).",
            d.pushes_abandoned,
        );
        page.single(
            "cim_route_store_in_flight",
            MetricKind::Gauge,
            "Delivery store requests awaiting a reply.",
            self.node.delivery().in_flight() as u64,
        );
        page.single(
            "cim_route_member_ids_kept",
            MetricKind::Gauge,
            "Member ids in the groups' member lists the route keeps between membership changes.",
            self.node.delivery().member_ids_kept() as u64,
        );
        page.single(
            "cim_route_store_errors_total",
            MetricKind::Counter,
            "Machine store requests that failed.",
            self.stats.store_errors,
        );
        let circuit = self.store.circuit();
        page.single(
            "cim_route_store_circuit_open",
            MetricKind::Gauge,
            "1 while store calls fail at once because the Redis Cluster is unreachable.",
            u64::from(circuit.open),
        );
        page.single(
            "cim_route_store_refused_total",
            MetricKind::Counter,
            "Store calls failed at once, without reaching Redis, while the cluster was unreachable.",
            circuit.refused,
        );
        page.single(
            "cim_route_api_waiting",
            MetricKind::Gauge,
            "HTTP requests waiting for the machines.",
            self.waiters.len() as u64,
        );
        page.single(
            "cim_route_registry_changes_total",
            MetricKind::Counter,
            "Registry view changes applied.",
            self.stats.registry_changes,
        );
        page.single(
            "cim_route_http_requests_total",
            MetricKind::Counter,
            "HTTP requests answered.",
            load(&c.http_requests),
        );
        page.single(
            "cim_route_http_client_errors_total",
            MetricKind::Counter,
            "HTTP answers with a 4xx status.",
            load(&c.http_client_errors),
        );
        page.single(
            "cim_route_http_unauthorized_total",
            MetricKind::Counter,
            "HTTP answers 401 (missing or bad bearer token).",
            load(&c.http_unauthorized),
        );
        page.single(
            "cim_route_http_server_errors_total",
            MetricKind::Counter,
            "HTTP answers with a 5xx status.",
            load(&c.http_server_errors),
        );
        let code = |map: &BTreeMap<&'static str, u64>, code| map.get(code).copied().unwrap_or(0);
        let busy = code(&self.stats.logins, CODE_BUSY) + code(&self.stats.registrations, CODE_BUSY);
        let limited = [
            ("login_account", code(&self.stats.logins, CODE_THROTTLED)),
            ("login_address", load(&c.limited_login_address)),
            ("register_address", load(&c.limited_register_address)),
            ("send_user", load(&c.limited_send_user)),
            ("password_busy", busy),
        ];
        let mut family = page.family(
            "cim_route_requests_limited_total",
            MetricKind::Counter,
            "Requests refused by a limit (429, or 503 when the password checks are full).",
        );
        for (limit, n) in limited {
            family.sample(&[("limit", limit)], n);
        }
        page.single(
            "cim_route_password_jobs",
            MetricKind::Gauge,
            "Password checks queued or running (bounded by --password-queue).",
            (self.password_queue.len() + self.password_running) as u64,
        );
        page.single(
            "cim_route_stale_tokens_total",
            MetricKind::Counter,
            "Bearer tokens refused (401) because their session ended.",
            load(&c.stale_tokens),
        );
        c.http.render("cim_route", &mut page);
        let tls: Vec<_> = c
            .tls
            .iter()
            .map(|(side, stats)| (*side, stats.clone()))
            .collect();
        crate::tls::render_stats(&mut page, "cim_route", &tls);
        c.latency.render(&mut page);
        crate::ops_metrics::render_process(&mut page, "cim_route");
        page.finish()
    }
}

/// One store call for the lane: which machine asked, what, at which wall-clock time.
pub(super) struct LaneCall {
    machine: RouteMachine,
    request: StoreRequest,
    wall: UnixMillis,
}

/// The store lane: starts each call in arrival order (a `FuturesUnordered` polls what was
/// pushed first first, so each call reaches its first await, for Redis the write into the
/// connection's pipeline, in that order) and sends each answer to the driver as it comes.
/// Ends when the driver drops its sender.
async fn run_store_lane(
    store: Arc<dyn Store>,
    mut calls: mpsc::UnboundedReceiver<LaneCall>,
    to_driver: mpsc::Sender<Input>,
    limit: std::time::Duration,
) {
    let mut running = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some((machine, id, result)) = running.next(), if !running.is_empty() => {
                // The driver may be gone (shutdown): nobody waits for the answer then.
                let _ = to_driver.send(Input::Store { machine, id, result }).await;
            }
            call = calls.recv() => {
                let Some(LaneCall { machine, request, wall }) = call else { break };
                let StoreRequest { id, command } = request;
                let call = store.execute(wall, command);
                running.push(async move {
                    let result = match tokio::time::timeout(limit, call).await {
                        Ok(result) => result,
                        Err(_) => Err(StoreUnavailable(format!("no answer within {limit:?}"))),
                    };
                    (machine, id, result)
                });
            }
        }
    }
}
