//! `cim-proto`: the CIM wire protocol. `cim.proto` compiled by prost (through protox, so no
//! system `protoc`), and [`codec`], a sans-IO framing layer.

#[allow(clippy::all, missing_docs, missing_debug_implementations)]
mod v1 {
    include!(concat!(env!("OUT_DIR"), "/cim.v1.rs"));
}

pub use v1::*;

pub mod codec;

impl frame::Kind {
    /// The variant's field name in `cim.proto`, for logs, metrics and errors. The exhaustive
    /// match is deliberate: a new variant breaks the build here until it is named.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Login(_) => "login",
            Self::Ping(_) => "ping",
            Self::Send(_) => "send",
            Self::DeliverAck(_) => "deliver_ack",
            Self::SyncRequest(_) => "sync_request",
            Self::FetchRequest(_) => "fetch_request",
            Self::LoginOk(_) => "login_ok",
            Self::Pong(_) => "pong",
            Self::SendAck(_) => "send_ack",
            Self::SendNack(_) => "send_nack",
            Self::Deliver(_) => "deliver",
            Self::SyncAnswer(_) => "sync_answer",
            Self::FetchAnswer(_) => "fetch_answer",
            Self::Kick(_) => "kick",
            Self::Error(_) => "error",
            Self::LinkHello(_) => "link_hello",
            Self::LinkAuth(_) => "link_auth",
            Self::LinkAuthOk(_) => "link_auth_ok",
            Self::PushBatch(_) => "push_batch",
            Self::KickUser(_) => "kick_user",
            Self::RouteSend(_) => "route_send",
            Self::RouteSendResult(_) => "route_send_result",
            Self::KickUserDone(_) => "kick_user_done",
        }
    }
}
