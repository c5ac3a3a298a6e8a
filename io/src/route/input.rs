//! What the route's tasks tell its driver — HTTP handlers, the admin listener, link tasks,
//! store calls and password workers — in one message type, here so that the tasks and the
//! driver depend on it rather than on each other.

use std::net::IpAddr;

use cim_core::ids::{ServerId, UserId};
use cim_core::route::RouteMachine;
use cim_core::route::login::{
    LoggedOut, LoginAnswer, LoginError, LoginRequest, LogoutError, PasswordOutcome,
    RegisterFailure, Registered,
};
use cim_core::store::{RequestId, StoreResult};
use cim_proto::{Frame, KickUserDone, RouteSend, RouteSendResult};
use tokio::sync::{mpsc, oneshot};

/// A request from an HTTP handler, with where its answer goes.
#[derive(Debug)]
pub(super) enum ApiCall {
    Register {
        name: String,
        password: String,
        /// Who asked (the per-address limits' client), for fair password scheduling.
        client: IpAddr,
        reply: oneshot::Sender<Result<Registered, RegisterFailure>>,
    },
    Login {
        request: LoginRequest,
        client: IpAddr,
        reply: oneshot::Sender<Result<LoginAnswer, LoginError>>,
    },
    Logout {
        token: String,
        reply: oneshot::Sender<Result<LoggedOut, LogoutError>>,
    },
    Send {
        user: UserId,
        send: cim_proto::Send,
        reply: oneshot::Sender<RouteSendResult>,
    },
    Metrics {
        reply: oneshot::Sender<String>,
    },
    /// The admin listener ended `user`'s claim: close their sessions below `below_epoch`
    /// on `server` (best effort, like a takeover's kick).
    AdminKick {
        server: ServerId,
        user: UserId,
        below_epoch: cim_core::ids::Epoch,
    },
}

/// What a link forwards to the driver.
#[derive(Debug)]
pub(super) enum LinkInbound {
    Send(RouteSend),
    KickDone(KickUserDone),
}

#[derive(Debug)]
pub(super) enum Input {
    Api(ApiCall),
    Store {
        machine: RouteMachine,
        id: RequestId,
        result: StoreResult,
    },
    /// A password worker is done; `None` if the job was lost (a panic in argon2, a bug:
    /// the machine's deadline answers it).
    Password {
        id: RequestId,
        outcome: Option<PasswordOutcome>,
    },
    LinkUp {
        server: ServerId,
        generation: u64,
        tx: mpsc::Sender<Frame>,
    },
    LinkDown {
        server: ServerId,
        generation: u64,
    },
    LinkFrame {
        server: ServerId,
        generation: u64,
        frame: LinkInbound,
    },
}
