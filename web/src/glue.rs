//! The JSON on both sides of [`crate::WebClient`]: the route's login answer in, the
//! session's commands and events out, and the saved state both ways. Plain functions, so
//! the host's tests check them without a browser.
//!
//! 64-bit numbers the shell only passes along (log epochs, the user id in the login body)
//! stay exact because the shell never parses them into JavaScript numbers: log epochs are
//! decimal strings, and the login body is a string the shell sends as it is.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use cim_core::client::{
    ClientCommand, ClientEvent, ClientOutput, ClientState, ConnectionLoss, LoginFailure, SavedConv,
    SavedMessage,
};
use cim_core::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};
use cim_core::registry::LiveServer;
use cim_core::route::login::{LoginAnswer, LoginError, ResumeToken};
use cim_core::route::resumption::ResumptionSecret;
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Saved state that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum GlueError {
    #[error("saved state is not valid JSON: {0}")]
    Json(String),
    #[error("saved state has a bad {0}")]
    Field(&'static str),
}

/// The route's envelope (`{code, message, dataBody}`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    data_body: Option<LoginBody>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoginBody {
    user_id: u64,
    epoch: u64,
    server_id: String,
    endpoint: Option<Endpoint>,
    ip: String,
    cim_server_port: u16,
    http_port: u16,
    ticket: String,
    token: String,
    resume_token: String,
    /// The next resumption secret (absent from an older route, or with resumption off).
    #[serde(default)]
    resume_secret: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Endpoint {
    host: String,
    port: u16,
    tls: bool,
    ws_url: Option<String>,
}

/// The port of a `ws://host:port/` URL as the route writes it (see
/// `LiveServer::client_endpoint`), which rebuilds the same URL from host, port and TLS.
fn ws_port(url: &str) -> Option<u16> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))?;
    let authority = rest.split('/').next()?;
    authority.rsplit_once(':')?.1.parse().ok()
}

/// `POST /login`'s HTTP answer in the session's terms (as the SDK's driver maps it).
pub(crate) fn login_answer(
    user: UserId,
    status: u16,
    body: &str,
) -> Result<LoginAnswer, LoginFailure> {
    let transport = |what: String| LoginFailure::Transport(what);
    let envelope: Envelope = serde_json::from_str(body)
        .map_err(|e| transport(format!("login answer (HTTP {status}) is no envelope: {e}")))?;
    let rejected = |e| Err(LoginFailure::Rejected(e));
    match envelope.code.as_str() {
        "9000" => {}
        "5000" => return rejected(LoginError::RepeatLogin),
        "9100" => return rejected(LoginError::AccountMismatch),
        // The secret was refused: the session drops it and logs in with the password, or,
        // with none (a reloaded page), stops with `PasswordNeeded` and the page asks.
        "9110" => return rejected(LoginError::ResumeRefused),
        "7100" => return rejected(LoginError::NoServerAvailable),
        "4000" => return rejected(LoginError::Unavailable),
        code => {
            return Err(transport(format!(
                "login: code {code}: {}",
                envelope.message
            )));
        }
    }
    let r = envelope
        .data_body
        .ok_or_else(|| transport("login answer without its body".into()))?;
    if r.user_id != user.0 {
        return Err(transport(format!(
            "login answer for user {} instead of {}",
            r.user_id, user.0
        )));
    }
    let bad = |what: &str| transport(format!("login answer: bad {what}"));
    let ticket = URL_SAFE_NO_PAD
        .decode(&r.ticket)
        .ok()
        .and_then(|b| cim_proto::Ticket::decode(b.as_slice()).ok())
        .ok_or_else(|| bad("ticket"))?;
    let resume_token = URL_SAFE_NO_PAD
        .decode(&r.resume_token)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(ResumeToken)
        .ok_or_else(|| bad("resumeToken"))?;
    let endpoint = r.endpoint.unwrap_or(Endpoint {
        host: r.ip,
        port: r.cim_server_port,
        tls: false,
        ws_url: None,
    });
    Ok(LoginAnswer {
        user,
        epoch: Epoch(r.epoch),
        server: LiveServer {
            id: ServerId::new(r.server_id),
            host: endpoint.host,
            client_port: endpoint.port,
            http_port: r.http_port,
            link_port: 0,
            connections: 0,
            client_tls: endpoint.tls,
            ws_port: endpoint.ws_url.as_deref().and_then(ws_port),
        },
        ticket,
        token: r.token,
        resume_token,
        resume_secret: match r.resume_secret.as_deref() {
            None => None,
            Some(text) => Some(decode_secret(text).ok_or_else(|| bad("resumeSecret"))?),
        },
    })
}

/// A resumption secret as the route writes it: 32 bytes, unpadded URL-safe base64.
fn decode_secret(text: &str) -> Option<ResumptionSecret> {
    let bytes = URL_SAFE_NO_PAD.decode(text).ok()?;
    Some(ResumptionSecret(<[u8; 32]>::try_from(bytes).ok()?))
}

fn cause(loss: &ConnectionLoss) -> String {
    match loss {
        ConnectionLoss::LoginFailed(f) => format!("login failed: {f}"),
        ConnectionLoss::LoginTimeout => "the route did not answer".into(),
        ConnectionLoss::ConnectFailed => "could not connect".into(),
        ConnectionLoss::ConnectTimeout => "connecting timed out".into(),
        ConnectionLoss::LoginOkTimeout => "the server did not answer the login".into(),
        ConnectionLoss::Disconnected => "disconnected".into(),
        ConnectionLoss::HeartbeatTimeout => "the server stopped answering".into(),
        ConnectionLoss::Kicked(r) => format!("kicked: {}", r.as_str_name()),
        ConnectionLoss::ServerError { code, message } => {
            format!("server error {}: {message}", code.as_str_name())
        }
    }
}

/// One output as `(kind, json, frame bytes)`.
pub(crate) fn output(output: ClientOutput) -> (&'static str, String, Vec<u8>) {
    match output {
        ClientOutput::Command(command) => {
            let (json, bytes) = match command {
                ClientCommand::Login { attempt, request } => {
                    // The body of `POST /login`, as `cim_io::api::LoginRequest` spells it.
                    let mut body = json!({
                        "userId": request.user.0,
                        "userName": request.name,
                        "password": request.password,
                    });
                    if let Some(token) = &request.resume_token {
                        body["resumeToken"] = json!(URL_SAFE_NO_PAD.encode(token.0));
                    }
                    if let Some(secret) = &request.resume_secret {
                        body["resumeSecret"] = json!(URL_SAFE_NO_PAD.encode(secret.0));
                    }
                    // A resumption needs no password (a reloaded page has none).
                    if request.password.is_empty()
                        && let Some(fields) = body.as_object_mut()
                    {
                        fields.remove("password");
                    }
                    (
                        json!({"t": "login", "attempt": attempt.0, "body": body.to_string()}),
                        Vec::new(),
                    )
                }
                ClientCommand::Connect { endpoint } => {
                    (json!({"t": "connect", "url": endpoint.ws_url}), Vec::new())
                }
                ClientCommand::Transmit(frame) => (json!({"t": "transmit"}), frame.encode_to_vec()),
                ClientCommand::Disconnect => (json!({"t": "disconnect"}), Vec::new()),
            };
            ("command", json.to_string(), bytes)
        }
        ClientOutput::Event(event) => ("event", event_json(event).to_string(), Vec::new()),
    }
}

fn event_json(event: ClientEvent) -> Value {
    match event {
        ClientEvent::LoggingIn => json!({"t": "loggingIn"}),
        ClientEvent::Connecting { server } => {
            json!({"t": "connecting", "server": server.to_string()})
        }
        ClientEvent::Online { server, epoch } => {
            json!({"t": "online", "server": server.to_string(), "epoch": epoch.0.to_string()})
        }
        ClientEvent::Reconnecting {
            attempt,
            delay,
            cause: loss,
        } => json!({
            "t": "reconnecting", "attempt": attempt,
            "delayMs": delay.as_millis() as u64, "cause": cause(&loss),
        }),
        ClientEvent::Stopped(reason) => json!({"t": "stopped", "reason": format!("{reason:?}")}),
        ClientEvent::Message(m) => json!({
            "t": "message",
            "conv": m.conv.to_string(),
            "logEpoch": m.log_epoch.0.to_string(),
            "seq": m.seq,
            "sender": m.sender.0.to_string(),
            "msgId": m.msg_id.to_string(),
            "text": String::from_utf8_lossy(&m.body),
            "sentAtMs": m.appended_at.0,
        }),
        ClientEvent::Acked {
            msg_id,
            conv,
            log_epoch,
            seq,
        } => json!({
            "t": "acked", "msgId": msg_id.to_string(), "conv": conv.to_string(),
            "logEpoch": log_epoch.0.to_string(), "seq": seq,
        }),
        ClientEvent::Rejected {
            msg_id,
            code,
            reason,
        } => json!({
            "t": "rejected", "msgId": msg_id.to_string(),
            "code": code.as_str_name(), "reason": reason,
        }),
        ClientEvent::Unknown { msg_id } => json!({"t": "unknown", "msgId": msg_id.to_string()}),
        ClientEvent::Unavailable {
            conv,
            from_seq,
            count,
        } => json!({
            "t": "unavailable", "conv": conv.to_string(), "fromSeq": from_seq, "count": count,
        }),
        ClientEvent::LogReset { conv, .. } => json!({"t": "logReset", "conv": conv.to_string()}),
        ClientEvent::LogMoved {
            conv,
            continues_after,
            lost,
            ..
        } => json!({
            "t": "logMoved", "conv": conv.to_string(),
            "continuesAfter": continues_after, "lost": lost,
        }),
        ClientEvent::Kicked(reason) => json!({"t": "kicked", "reason": reason.as_str_name()}),
        ClientEvent::LoginRejected(error) => {
            json!({"t": "loginRejected", "reason": error.to_string()})
        }
        ClientEvent::TlsFailed { host, reason } => {
            json!({"t": "tlsFailed", "host": host, "reason": reason})
        }
    }
}

/// The saved state's JSON: what [`ClientState`] holds, with 64-bit numbers as strings.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SavedState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resume_token: Option<String>,
    /// The resumption secret that goes with `resume_token`: a credential, which lets a
    /// reloaded page log in without the password (never stored). Revocable by the user
    /// (`/offLine`), a password change or an admin, and it dies on its first use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resume_secret: Option<String>,
    outbox: Vec<SavedEntry>,
    convs: Vec<SavedPosition>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct SavedEntry {
    id: String,
    conv: String,
    /// The body as typed: the web client only sends text.
    text: String,
    created_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct SavedPosition {
    conv: String,
    log_epoch: String,
    delivered: u64,
}

pub(crate) fn state_json(state: &ClientState) -> String {
    let saved = SavedState {
        resume_token: state
            .resume_token
            .as_ref()
            .map(|t| URL_SAFE_NO_PAD.encode(t.0)),
        resume_secret: state
            .resume_secret
            .as_ref()
            .map(|secret| URL_SAFE_NO_PAD.encode(secret.0)),
        outbox: state
            .outbox
            .iter()
            .map(|m| SavedEntry {
                id: m.id.to_string(),
                conv: m.conv.to_string(),
                text: String::from_utf8_lossy(&m.body).into_owned(),
                created_at_ms: m.created_at.0,
            })
            .collect(),
        convs: state
            .convs
            .iter()
            .map(|c| SavedPosition {
                conv: c.conv.to_string(),
                log_epoch: c.log_epoch.0.to_string(),
                delivered: c.delivered,
            })
            .collect(),
    };
    // A struct of strings and numbers always serializes.
    serde_json::to_string(&saved).unwrap_or_default()
}

pub(crate) fn parse_state(json: &str) -> Result<ClientState, GlueError> {
    let saved: SavedState =
        serde_json::from_str(json).map_err(|e| GlueError::Json(e.to_string()))?;
    let conv = |s: &str| {
        s.parse::<ConvId>()
            .map_err(|_| GlueError::Field("conversation"))
    };
    let resume_token = match saved.resume_token {
        None => None,
        Some(text) => Some(ResumeToken(
            URL_SAFE_NO_PAD
                .decode(text)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or(GlueError::Field("resume token"))?,
        )),
    };
    let outbox = saved
        .outbox
        .into_iter()
        .map(|e| {
            Ok(SavedMessage {
                id: e
                    .id
                    .parse::<ClientMsgId>()
                    .map_err(|_| GlueError::Field("message id"))?,
                conv: conv(&e.conv)?,
                body: Bytes::from(e.text.into_bytes()),
                created_at: UnixMillis(e.created_at_ms),
            })
        })
        .collect::<Result<_, GlueError>>()?;
    let convs = saved
        .convs
        .into_iter()
        .map(|c| {
            Ok(SavedConv {
                conv: conv(&c.conv)?,
                log_epoch: LogEpoch(
                    c.log_epoch
                        .parse()
                        .map_err(|_| GlueError::Field("log epoch"))?,
                ),
                delivered: c.delivered,
            })
        })
        .collect::<Result<_, GlueError>>()?;
    let resume_secret = match saved.resume_secret {
        None => None,
        Some(text) => Some(decode_secret(&text).ok_or(GlueError::Field("resume secret"))?),
    };
    Ok(ClientState {
        resume_token,
        resume_secret,
        outbox,
        convs,
    })
}

#[cfg(test)]
mod tests;
