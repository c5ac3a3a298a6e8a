//! The route's login machine. (Public request/answer types are fixed here; the machine
//! lands with the route-login work.)

use cim_proto::Ticket;

use crate::ids::{Epoch, UserId};
use crate::registry::LiveServer;

/// 32 random bytes handed to the client with each login; presenting it lets the same client
/// take over its own live claim at once (failover) instead of waiting out the lease.
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeToken(pub [u8; 32]);

impl std::fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeToken(..)")
    }
}

/// `POST /login`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub user: UserId,
    pub name: String,
    pub password: String,
    pub resume_token: Option<ResumeToken>,
}

/// A successful login: where to connect and with what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginAnswer {
    pub user: UserId,
    pub epoch: Epoch,
    pub server: LiveServer,
    pub ticket: Ticket,
    /// Bearer token for the HTTP API, bound to (user, epoch).
    pub token: String,
    pub resume_token: ResumeToken,
}

/// Why a login failed, with CIM's status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// 5000: a live claim exists and the request proved no right to take it over.
    #[error("repeat login: the user is online elsewhere")]
    RepeatLogin,
    /// 9100: unknown user, wrong name for the id, or wrong password (not told apart, so the
    /// API does not reveal which ids exist).
    #[error("account mismatch")]
    AccountMismatch,
    /// 7100: no live server to send the user to.
    #[error("no server available")]
    NoServerAvailable,
    /// 4000: the store did not answer; nothing was changed that a retry cannot fix.
    #[error("login failed: store unavailable")]
    Unavailable,
}

impl LoginError {
    /// CIM's status code for the HTTP envelope.
    pub fn code(self) -> &'static str {
        match self {
            Self::RepeatLogin => "5000",
            Self::AccountMismatch => "9100",
            Self::NoServerAvailable => "7100",
            Self::Unavailable => "4000",
        }
    }
}
