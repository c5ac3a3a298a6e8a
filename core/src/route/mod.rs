//! The route as one machine for its shells: [`RouteNode`] owns the login machine
//! ([`RouteLogin`]) and the delivery machine ([`RouteDelivery`]), takes every input the
//! route has, and gives every output through one [`RouteNode::poll_output`] and one
//! [`RouteNode::poll_timeout`], so the production driver, the multi-node harness and the
//! fuzz checks cannot drain them in different orders.

pub mod balance;
pub mod bearer;
pub mod claims;
pub mod delivery;
pub mod login;
pub mod resumption;
pub mod tickets;

use std::collections::BTreeMap;

use cim_proto::{PushBatch, RouteSend, RouteSendResult};

use crate::ids::{ApiRequestId, Epoch, ServerId, UnixMillis, UserId};
use crate::registry::LiveServer;
use crate::store::{RequestId, StoreRequest, StoreResult};
use crate::time::Instant;
use delivery::{DeliveryOutput, RouteDelivery, SendOrigin};
use login::{LoginOutput, LoginRequest, PasswordJob, PasswordOutcome, RouteEvent, RouteLogin};

/// Which of the route's machines a store request is from: each numbers its requests on its
/// own, so the shell hands the reply back with this tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteMachine {
    Login,
    Delivery,
}

/// Everything the route asks of its shell.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteOutput {
    /// Argon2 work: run it off the driver task (or inline in a simulation), then feed the
    /// outcome to [`RouteNode::handle_password`].
    Password(PasswordJob),
    /// Execute, then feed the result to [`RouteNode::handle_store_reply`] with `machine`.
    Store {
        machine: RouteMachine,
        request: StoreRequest,
    },
    /// An API request's answer (`Registered`, `LoggedIn`, `LoggedOut`), or a kick to send
    /// on a server's link (`KickOld`).
    Event(RouteEvent),
    /// A send's answer: on the server's link (`RouteSendResult` as is) or to the HTTP
    /// caller (`request_id` then carries the [`ApiRequestId`]).
    SendResult {
        origin: SendOrigin,
        result: RouteSendResult,
    },
    /// Everything queued for one server since the last drain, as one batch, for its link.
    Push { server: ServerId, batch: PushBatch },
}

/// Why [`RouteNode::poll_timeout`] wants to be woken: which machine, and its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteTimer {
    Login(login::TimerReason),
    Delivery(delivery::TimerReason),
}

/// The route's machines behind one set of inputs and one output queue.
///
/// **Drain rule:** after every `handle_*`, drain [`poll_output`](Self::poll_output) until it
/// returns `None`, then re-arm the timer from [`poll_timeout`](Self::poll_timeout). The order
/// is the login machine's outputs (password jobs, store requests, events), then delivery's
/// (store requests, send results, pushes). That is the order the route's shell drained the
/// six queues in before they were one; the simulation's recorded histories pin it. A shell
/// that runs a password job inline feeds the outcome back before polling on, and the job's
/// next steps come out of the same drain, ahead of anything delivery queued.
#[derive(Debug)]
pub struct RouteNode {
    login: RouteLogin,
    delivery: RouteDelivery,
}

impl RouteNode {
    pub fn new(login: RouteLogin, delivery: RouteDelivery) -> Self {
        Self { login, delivery }
    }

    /// The login machine, for its getters (`verify_bearer`, ...).
    pub fn login(&self) -> &RouteLogin {
        &self.login
    }

    /// The delivery machine, for its getters (`stats`, `in_flight`, ...).
    pub fn delivery(&self) -> &RouteDelivery {
        &self.delivery
    }

    /// See [`RouteLogin::accept_previous_bearer_secret`].
    pub fn accept_previous_bearer_secret(&mut self, previous: Option<Vec<u8>>) {
        self.login.accept_previous_bearer_secret(previous);
    }

    // ---- inputs ------------------------------------------------------------------------

    /// The registry's live servers (replaces the previous view), for both machines.
    pub fn handle_registry(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        live: BTreeMap<ServerId, LiveServer>,
    ) {
        self.login.handle_registry(now, wall, live.clone());
        self.delivery.handle_registry(live);
    }

    /// See [`RouteLogin::handle_registry_lost`].
    pub fn handle_registry_lost(&mut self, now: Instant) {
        self.login.handle_registry_lost(now);
    }

    /// See [`RouteLogin::handle_registry_back`].
    pub fn handle_registry_back(&mut self, now: Instant) {
        self.login.handle_registry_back(now);
    }

    /// See [`RouteLogin::handle_server_reachable`].
    pub fn handle_server_reachable(&mut self, server: &ServerId) {
        self.login.handle_server_reachable(server);
    }

    /// See [`RouteLogin::handle_server_unreachable`].
    pub fn handle_server_unreachable(&mut self, server: &ServerId) {
        self.login.handle_server_unreachable(server);
    }

    pub fn handle_register(&mut self, now: Instant, api: ApiRequestId, name: &str, password: &str) {
        self.login.handle_register(now, api, name, password);
    }

    pub fn handle_login(&mut self, now: Instant, api: ApiRequestId, request: LoginRequest) {
        self.login.handle_login(now, api, request);
    }

    pub fn handle_logout(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        api: ApiRequestId,
        token: &str,
    ) {
        self.login.handle_logout(now, wall, api, token);
    }

    /// The outcome of a [`RouteOutput::Password`] job.
    pub fn handle_password(&mut self, now: Instant, id: RequestId, outcome: PasswordOutcome) {
        self.login.handle_password(now, id, outcome);
    }

    /// `server`'s answer to a `KickOld` (see [`RouteLogin::handle_kick_done`]).
    pub fn handle_kick_done(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        server: &ServerId,
        user: UserId,
        below_epoch: Epoch,
    ) {
        self.login
            .handle_kick_done(now, wall, server, user, below_epoch);
    }

    /// A send from the route's own HTTP API (see [`RouteDelivery::handle_send`]).
    pub fn handle_send(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        origin: SendOrigin,
        sender: UserId,
        send: cim_proto::Send,
    ) {
        self.delivery.handle_send(now, wall, origin, sender, send);
    }

    /// A server's `RouteSend` from its link (see [`RouteDelivery::handle_route_send`]).
    pub fn handle_route_send(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        server: ServerId,
        route_send: RouteSend,
    ) {
        self.delivery
            .handle_route_send(now, wall, server, route_send);
    }

    /// The store's answer to a [`RouteOutput::Store`] request of `machine`.
    pub fn handle_store_reply(
        &mut self,
        now: Instant,
        wall: UnixMillis,
        machine: RouteMachine,
        id: RequestId,
        result: StoreResult,
    ) {
        match machine {
            RouteMachine::Login => self.login.handle_store_reply(now, wall, id, result),
            RouteMachine::Delivery => self.delivery.handle_store_reply(now, id, result),
        }
    }

    /// Both machines' deadlines at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.login.handle_timeout(now);
        self.delivery.handle_timeout(now);
    }

    // ---- outputs -----------------------------------------------------------------------

    /// The next output (see the drain rule on the type).
    pub fn poll_output(&mut self) -> Option<RouteOutput> {
        if let Some(output) = self.login.poll_output() {
            return Some(match output {
                LoginOutput::Password(job) => RouteOutput::Password(job),
                LoginOutput::Store(request) => RouteOutput::Store {
                    machine: RouteMachine::Login,
                    request,
                },
                LoginOutput::Event(event) => RouteOutput::Event(event),
            });
        }
        self.delivery.poll_output().map(|output| match output {
            DeliveryOutput::Store(request) => RouteOutput::Store {
                machine: RouteMachine::Delivery,
                request,
            },
            DeliveryOutput::Reply { origin, result } => RouteOutput::SendResult { origin, result },
            DeliveryOutput::Push { server, batch } => RouteOutput::Push { server, batch },
        })
    }

    /// The earliest deadline of either machine, and whose it is (the login machine's on a
    /// tie; `handle_timeout` serves both anyway).
    pub fn poll_timeout(&self) -> Option<(Instant, RouteTimer)> {
        let login = self
            .login
            .poll_timeout()
            .map(|(at, why)| (at, RouteTimer::Login(why)));
        let delivery = self
            .delivery
            .poll_timeout()
            .map(|(at, why)| (at, RouteTimer::Delivery(why)));
        [login, delivery]
            .into_iter()
            .flatten()
            .min_by_key(|&(at, _)| at)
    }
}

#[cfg(test)]
mod tests;
