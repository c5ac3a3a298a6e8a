//! The route's admin listener: authenticated endpoints to list users, see a user's session,
//! kick a user, reset a password and delete an account (`docs/admin.md`).
//!
//! Off unless configured ([`AdminOptions`]): its own listener (never the public API's) and
//! its own token, compared in constant time; a route given an admin address without a
//! token does not start. Every request, allowed or refused, is written to the audit log:
//! tracing target `cim::audit` at INFO, one event per request with `action`, `user`,
//! `peer`, `outcome` (route the target to its own file with `RUST_LOG` / the log
//! collector). The document is served at `/openapi.json` (no token needed: it holds no
//! data).
//!
//! Deletion is a tombstone (`StoreCommand::DeleteAccount`): the user's session is kicked,
//! its bearer tokens die with its claim, its id is never reissued and its name stays taken.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cim_core::accounts::{self, PasswordParams};
use cim_core::ids::{Epoch, ServerId, UserId};
use cim_core::store::{AccountSummary, Claim, StoreCommand, StoreReply};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use super::SESSION_CACHE_TTL;
use super::input::{ApiCall, Input};
use crate::clock::Clock;
use crate::registry::ServerMap;
use crate::store::Store;

/// The admin listener's settings (`--admin-addr`, `--admin-token-file` / `CIM_ADMIN_TOKEN`).
#[derive(Clone)]
pub struct AdminOptions {
    pub listen: SocketAddr,
    /// The bearer token the admin endpoints require; at least [`MIN_ADMIN_TOKEN_LEN`] bytes.
    pub token: Vec<u8>,
}

impl std::fmt::Debug for AdminOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminOptions")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// The admin listener from the route's settings: off (`None`) unless an address is given
/// (`--admin-addr`, or `--admin-port` for 127.0.0.1), and then only with a token of at
/// least [`MIN_ADMIN_TOKEN_LEN`] bytes, from `--admin-token-file` (its first line) or
/// `CIM_ADMIN_TOKEN`. Every problem is reported at once, by flag name.
pub fn admin_options(
    addr: Option<SocketAddr>,
    port: Option<u16>,
    token: Option<&str>,
    token_file: Option<&std::path::Path>,
) -> Result<Option<AdminOptions>, String> {
    let listen = match (addr, port) {
        (Some(_), Some(_)) => {
            return Err("give --admin-addr or --admin-port, not both".into());
        }
        (Some(addr), None) => Some(addr),
        (None, Some(port)) => Some(SocketAddr::from(([127, 0, 0, 1], port))),
        (None, None) => None,
    };
    let token = match (token, token_file) {
        (Some(_), Some(_)) => {
            return Err("give --admin-token-file or CIM_ADMIN_TOKEN, not both".into());
        }
        (Some(token), None) => Some(token.trim().to_owned()),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--admin-token-file {}: {e}", path.display()))?;
            Some(text.lines().next().unwrap_or_default().trim().to_owned())
        }
        (None, None) => None,
    };
    match (listen, token) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(
            "an admin token is given but no admin listener: add --admin-addr or --admin-port \
             (or drop the token)"
                .into(),
        ),
        (Some(_), None) => Err(
            "the admin listener needs a token: --admin-token-file FILE or CIM_ADMIN_TOKEN \
             (at least 16 bytes)"
                .into(),
        ),
        (Some(_), Some(token)) if token.len() < MIN_ADMIN_TOKEN_LEN => Err(format!(
            "the admin token must be at least {MIN_ADMIN_TOKEN_LEN} bytes (it has {})",
            token.len()
        )),
        (Some(listen), Some(token)) => Ok(Some(AdminOptions {
            listen,
            token: token.into_bytes(),
        })),
    }
}

/// Shortest admin token accepted: guessing it must be hopeless.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Most rows one `GET /users` answers.
pub const MAX_LIST: u32 = 1000;

/// The tracing target of the audit log.
pub const AUDIT_TARGET: &str = "cim::audit";

pub(super) struct AdminShared {
    pub(super) store: Arc<dyn Store>,
    pub(super) driver: mpsc::Sender<Input>,
    pub(super) clock: Clock,
    pub(super) live: watch::Receiver<ServerMap>,
    /// SHA-256 of the token: compared digest to digest, so the comparison's time says
    /// nothing about the token.
    pub(super) token_digest: [u8; 32],
    pub(super) password: PasswordParams,
    pub(super) min_password_len: usize,
    pub(super) store_timeout: Duration,
}

type Shared = Arc<AdminShared>;

pub(super) fn router(shared: Shared) -> Router {
    let authed = Router::new()
        .route("/users", get(list_users))
        .route("/users/{user}", get(show_user).delete(delete_user))
        .route("/users/{user}/kick", post(kick_user))
        .route("/users/{user}/password", post(reset_password))
        .route("/users/{user}/revoke-resumption", post(revoke_resumption))
        .layer(middleware::from_fn_with_state(shared.clone(), authenticate));
    Router::new()
        .merge(authed)
        .route("/openapi.json", get(openapi))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such path") })
        .with_state(shared)
}

// --- answers and audit ------------------------------------------------------------------

/// An error answer: `{"error": "<in words>"}` with its status.
#[derive(Debug)]
struct AdminError {
    status: StatusCode,
    message: String,
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(json!({ "error": self.message }))).into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> AdminError {
    AdminError {
        status,
        message: message.into(),
    }
}

/// One audit event. `user` is the path's user (0 when none).
fn audit(peer: SocketAddr, action: &str, user: u64, status: StatusCode, detail: &str) {
    tracing::info!(
        target: AUDIT_TARGET,
        %peer,
        action,
        user,
        status = status.as_u16(),
        outcome = if status.is_success() { "ok" } else { "refused" },
        detail,
        "admin request"
    );
}

async fn authenticate(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|token| -> [u8; 32] { Sha256::digest(token.trim().as_bytes()).into() });
    if presented != Some(shared.token_digest) {
        let action = format!("{} {}", request.method(), request.uri().path());
        audit(
            peer,
            &action,
            0,
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token",
        );
        return error(StatusCode::UNAUTHORIZED, "missing or wrong admin token").into_response();
    }
    next.run(request).await
}

/// The store's answer within the store timeout, or a 503 (the outcome is unknown: every
/// admin action is safe to repeat).
async fn store(shared: &AdminShared, command: StoreCommand) -> Result<StoreReply, AdminError> {
    let now = shared.clock.wall();
    // A delete on Redis waits out the account cache's TTL before answering.
    let budget = shared.store_timeout * 3 + Duration::from_secs(2);
    match tokio::time::timeout(budget, shared.store.execute(now, command)).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => Err(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        Err(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the store did not answer in time",
        )),
    }
}

fn odd(reply: &StoreReply) -> AdminError {
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("unexpected store reply {reply:?}"),
    )
}

/// A path's user id: a whole number above 0.
fn user_id(text: &str) -> Result<UserId, AdminError> {
    match text.parse::<u64>() {
        Ok(id) if id > 0 && id <= i64::MAX as u64 => Ok(UserId(id)),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            format!("user must be a user id (a whole number from 1), not {text:?}"),
        )),
    }
}

/// Sends `server` a kick of `user`'s sessions below `below` (best effort: without a link
/// the session still ends at its server's next lease refresh, which finds no claim).
async fn kick_on_server(shared: &AdminShared, server: ServerId, user: UserId, below: Epoch) {
    let _ = shared
        .driver
        .send(Input::Api(ApiCall::AdminKick {
            server,
            user,
            below_epoch: below,
        }))
        .await;
}

/// Every route caches a user's session epoch for [`SESSION_CACHE_TTL`]: waiting it out
/// before answering means "kicked" or "deleted" holds for every bearer token on every
/// route by the time the operator reads it.
async fn tokens_expired() {
    tokio::time::sleep(SESSION_CACHE_TTL).await;
}

fn session_json(shared: &AdminShared, claim: &Claim, bound: Option<&ServerId>) -> Value {
    let live = shared.live.borrow().contains_key(&claim.server);
    let now = shared.clock.wall();
    json!({
        "serverId": claim.server.0,
        "epoch": claim.epoch.0,
        "leaseUntilMs": claim.lease_until.0,
        "leaseLive": now < claim.lease_until,
        "serverLive": live,
        "connected": bound == Some(&claim.server) && live && now < claim.lease_until,
    })
}

// --- endpoints --------------------------------------------------------------------------

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after: Option<u64>,
    limit: Option<u32>,
    name: Option<String>,
}

async fn list_users(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let answer = async {
        let Query(query) = query.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
        if let Some(name) = query.name {
            return match store(&shared, StoreCommand::LoadAccountByName { name }).await? {
                StoreReply::Account(found) => Ok(json!({
                    "users": found.into_iter().map(|a| json!({
                        "userId": a.user.0, "userName": a.name, "deleted": false,
                    })).collect::<Vec<_>>(),
                    "next": null,
                })),
                other => Err(odd(&other)),
            };
        }
        let limit = query.limit.unwrap_or(100);
        if limit == 0 || limit > MAX_LIST {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("limit must be 1 to {MAX_LIST}"),
            ));
        }
        let after = UserId(query.after.unwrap_or(0));
        match store(&shared, StoreCommand::ListAccounts { after, limit }).await? {
            StoreReply::Accounts(rows) => {
                let next = (rows.len() == limit as usize)
                    .then(|| rows.last().map(|r| r.user.0))
                    .flatten();
                Ok(json!({
                    "users": rows.iter().map(summary_json).collect::<Vec<_>>(),
                    "next": next,
                }))
            }
            other => Err(odd(&other)),
        }
    }
    .await;
    finish(peer, "list_users", 0, answer)
}

fn summary_json(row: &AccountSummary) -> Value {
    json!({ "userId": row.user.0, "userName": row.name, "deleted": row.deleted })
}

fn finish(
    peer: SocketAddr,
    action: &str,
    user: u64,
    answer: Result<Value, AdminError>,
) -> Response {
    match answer {
        Ok(body) => {
            audit(peer, action, user, StatusCode::OK, "");
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Err(e) => {
            audit(peer, action, user, e.status, &e.message);
            e.into_response()
        }
    }
}

async fn show_user(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(user): Path<String>,
) -> Response {
    let id = user.parse().unwrap_or(0);
    let answer = async {
        let user = user_id(&user)?;
        let StoreReply::Names(names) =
            store(&shared, StoreCommand::LoadNames { users: vec![user] }).await?
        else {
            return Err(error(StatusCode::INTERNAL_SERVER_ERROR, "odd names reply"));
        };
        let Some(name) = names.into_iter().next().and_then(|(_, n)| n) else {
            return Err(error(StatusCode::NOT_FOUND, "no such user"));
        };
        let deleted = !matches!(
            store(&shared, StoreCommand::LoadAccount { user }).await?,
            StoreReply::Account(Some(_))
        );
        let claim = match store(&shared, StoreCommand::LoadClaim { user }).await? {
            StoreReply::Claim(state) => state.claim,
            other => return Err(odd(&other)),
        };
        let bound = match store(&shared, StoreCommand::LoadRoutes { users: vec![user] }).await? {
            StoreReply::Routes(routes) => routes.into_iter().find_map(|(_, r)| r),
            other => return Err(odd(&other)),
        };
        let sessions: Vec<Value> = claim
            .iter()
            .map(|c| session_json(&shared, c, bound.as_ref().map(|r| &r.server)))
            .collect();
        Ok(json!({
            "userId": user.0,
            "userName": name,
            "deleted": deleted,
            // One claim per user, so at most one session.
            "sessions": sessions,
        }))
    }
    .await;
    finish(peer, "show_user", id, answer)
}

async fn kick_user(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(user): Path<String>,
) -> Response {
    let id = user.parse().unwrap_or(0);
    let answer = async {
        let user = user_id(&user)?;
        let claim = match store(&shared, StoreCommand::LoadClaim { user }).await? {
            StoreReply::Claim(state) => state.claim,
            other => return Err(odd(&other)),
        };
        let Some(claim) = claim else {
            return Ok(json!({ "kicked": false, "message": "no session" }));
        };
        // Compare-epoch: a newer login since the read is left alone (it is another
        // session; kick again to end it).
        let released = match store(
            &shared,
            StoreCommand::ReleaseClaim {
                user,
                epoch: claim.epoch,
            },
        )
        .await?
        {
            StoreReply::ClaimReleased { released } => released,
            other => return Err(odd(&other)),
        };
        kick_on_server(
            &shared,
            claim.server.clone(),
            user,
            Epoch(claim.epoch.0 + 1),
        )
        .await;
        tokens_expired().await;
        Ok(json!({
            "kicked": released,
            "serverId": claim.server.0,
            "epoch": claim.epoch.0,
        }))
    }
    .await;
    finish(peer, "kick_user", id, answer)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordBody {
    password: String,
}

async fn reset_password(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(user): Path<String>,
    body: Result<axum::Json<PasswordBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let id = user.parse().unwrap_or(0);
    let answer = async {
        let user = user_id(&user)?;
        let axum::Json(body) = body.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
        // The registration rules, with a name that passes them.
        accounts::validate_registration("x", &body.password, shared.min_password_len)
            .map_err(|e| error(StatusCode::BAD_REQUEST, e.to_string()))?;
        let params = shared.password.clone();
        let hash = tokio::task::spawn_blocking(move || {
            let mut rng = ChaCha8Rng::from_os_rng();
            accounts::hash_password(&body.password, &params, &mut rng)
        })
        .await
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        match store(
            &shared,
            StoreCommand::SetPassword {
                user,
                password_hash: hash,
            },
        )
        .await?
        {
            StoreReply::PasswordSet { found: true } => {}
            StoreReply::PasswordSet { found: false } => {
                return Err(error(StatusCode::NOT_FOUND, "no such user (or deleted)"));
            }
            other => return Err(odd(&other)),
        }
        // A locked-out user gets in with the new password at once.
        store(&shared, StoreCommand::ClearLoginFailures { user }).await?;
        Ok(json!({ "reset": true }))
    }
    .await;
    finish(peer, "reset_password", id, answer)
}

/// Ends the user's resumption secret: the next login needs the password (a stolen state
/// file, a lost device). The session already open stays open: kick it too to end it.
async fn revoke_resumption(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(user): Path<String>,
) -> Response {
    let id = user.parse().unwrap_or(0);
    let answer = async {
        let user = user_id(&user)?;
        match store(&shared, StoreCommand::RevokeResumption { user }).await? {
            StoreReply::ResumptionRevoked { revoked } => Ok(json!({ "revoked": revoked })),
            other => Err(odd(&other)),
        }
    }
    .await;
    finish(peer, "revoke_resumption", id, answer)
}

async fn delete_user(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(user): Path<String>,
) -> Response {
    let id = user.parse().unwrap_or(0);
    let answer = async {
        let user = user_id(&user)?;
        let deleted = match store(&shared, StoreCommand::DeleteAccount { user }).await? {
            StoreReply::AccountDeleted(Some(deleted)) => deleted,
            StoreReply::AccountDeleted(None) => {
                return Err(error(StatusCode::NOT_FOUND, "no such user"));
            }
            other => return Err(odd(&other)),
        };
        if let Some(claim) = &deleted.claim {
            kick_on_server(
                &shared,
                claim.server.clone(),
                user,
                Epoch(claim.epoch.0 + 1),
            )
            .await;
        }
        tokens_expired().await;
        Ok(json!({
            "deleted": true,
            "already": deleted.already,
            "userName": deleted.name,
            "kickedFrom": deleted.claim.map(|c| c.server.0),
        }))
    }
    .await;
    finish(peer, "delete_user", id, answer)
}

async fn openapi() -> Response {
    axum::Json(openapi_document()).into_response()
}

/// The admin listener's OpenAPI 3 document.
pub fn openapi_document() -> Value {
    let user_param = json!({
        "name": "user", "in": "path", "required": true,
        "description": "The user id",
        "schema": {"type": "integer", "format": "int64", "minimum": 1, "maximum": i64::MAX}
    });
    let err = json!({"description": "The error, in words",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let common = |ok: Value| {
        json!({
            "200": {"description": "Done", "content": {"application/json": {"schema": ok}}},
            "400": err, "401": err, "404": err, "503": err
        })
    };
    let summary = json!({
        "type": "object", "required": ["userId", "userName", "deleted"],
        "properties": {
            "userId": {"type": "integer", "format": "int64"},
            "userName": {"type": "string"},
            "deleted": {"type": "boolean", "description": "Tombstoned: cannot log in, send or receive; name stays taken"}
        }
    });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "CIM-rs route admin API",
            "version": "1",
            "description": "The route's admin listener (off unless --admin-addr and an admin token are given). Every request is written to the audit log (tracing target cim::audit). See docs/admin.md."
        },
        "components": {
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "UserSummary": summary
            }
        },
        "security": [{"admin": []}],
        "paths": {
            "/users": {"get": {
                "summary": "List accounts by id (tombstones included), or find one by name (any case)",
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "integer", "format": "int64", "minimum": 0}, "description": "Ids above this one (paging: pass the previous answer's next)"},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST, "default": 100}},
                    {"name": "name", "in": "query", "schema": {"type": "string"}, "description": "The live account of this name, ignoring case (after and limit are then ignored)"}
                ],
                "responses": common(json!({
                    "type": "object", "required": ["users", "next"],
                    "properties": {
                        "users": {"type": "array", "items": {"$ref": "#/components/schemas/UserSummary"}},
                        "next": {"type": "integer", "format": "int64", "nullable": true, "description": "after= for the next page; null at the end"}
                    }
                }))
            }},
            "/users/{user}": {
                "get": {
                    "summary": "A user and its session (at most one)",
                    "parameters": [user_param],
                    "responses": common(json!({
                        "type": "object", "required": ["userId", "userName", "deleted", "sessions"],
                        "properties": {
                            "userId": {"type": "integer", "format": "int64"},
                            "userName": {"type": "string"},
                            "deleted": {"type": "boolean"},
                            "sessions": {"type": "array", "items": {
                                "type": "object",
                                "required": ["serverId", "epoch", "leaseUntilMs", "leaseLive", "serverLive", "connected"],
                                "properties": {
                                    "serverId": {"type": "string"},
                                    "epoch": {"type": "integer", "format": "int64"},
                                    "leaseUntilMs": {"type": "integer", "format": "int64"},
                                    "leaseLive": {"type": "boolean"},
                                    "serverLive": {"type": "boolean", "description": "The server is in the registry now"},
                                    "connected": {"type": "boolean", "description": "Bound on a live server with a live lease"}
                                }
                            }}
                        }
                    }))
                },
                "delete": {
                    "summary": "Delete the account (a tombstone): kick it, end its tokens, never reuse its id; its name stays taken. Answers once every route has dropped the account from its caches.",
                    "parameters": [user_param],
                    "responses": common(json!({
                        "type": "object", "required": ["deleted", "already", "userName", "kickedFrom"],
                        "properties": {
                            "deleted": {"type": "boolean"},
                            "already": {"type": "boolean", "description": "It was deleted before: nothing changed"},
                            "userName": {"type": "string"},
                            "kickedFrom": {"type": "string", "nullable": true}
                        }
                    }))
                }
            },
            "/users/{user}/kick": {"post": {
                "summary": "End the user's session: its claim is released, its server told to close it, its bearer tokens refused on every route by the time this answers. The user may log in again.",
                "parameters": [user_param],
                "responses": common(json!({
                    "type": "object", "required": ["kicked"],
                    "properties": {
                        "kicked": {"type": "boolean"},
                        "serverId": {"type": "string"},
                        "epoch": {"type": "integer", "format": "int64"},
                        "message": {"type": "string"}
                    }
                }))
            }},
            "/users/{user}/password": {"post": {
                "summary": "Set a new password (the registration rules apply) and clear the failed-login throttle. A session already open stays open: kick it too to force a new login.",
                "parameters": [user_param],
                "requestBody": {"required": true, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["password"], "additionalProperties": false,
                    "properties": {"password": {"type": "string", "minLength": 1, "maxLength": 128}}
                }}}},
                "responses": common(json!({
                    "type": "object", "required": ["reset"], "properties": {"reset": {"type": "boolean"}}
                }))
            }},
            "/users/{user}/revoke-resumption": {"post": {
                "summary": "End the user's resumption secret: the next login needs the password. A password reset and a deletion do this too. A session already open stays open: kick it too to end it.",
                "parameters": [user_param],
                "responses": common(json!({
                    "type": "object", "required": ["revoked"], "properties": {"revoked": {"type": "boolean", "description": "false: there was none"}}
                }))
            }},
            "/openapi.json": {"get": {
                "summary": "This document (no token needed)",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3", "content": {"application/json": {}}}}
            }}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_settings_table() {
        let dir = std::env::temp_dir().join(format!("cim-admin-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "from-a-file-0123456789\nignored\n").unwrap();
        let addr: SocketAddr = "10.0.0.1:9000".parse().unwrap();
        let long = "an-admin-token-0123";
        let ok = |o: Result<Option<AdminOptions>, String>| {
            o.unwrap()
                .map(|o| (o.listen.to_string(), String::from_utf8(o.token).unwrap()))
        };
        assert_eq!(ok(admin_options(None, None, None, None)), None);
        assert_eq!(
            ok(admin_options(Some(addr), None, Some(long), None)),
            Some(("10.0.0.1:9000".into(), long.into()))
        );
        assert_eq!(
            ok(admin_options(None, Some(8084), None, Some(&file))),
            Some(("127.0.0.1:8084".into(), "from-a-file-0123456789".into()))
        );
        let errors = [
            (
                admin_options(Some(addr), Some(1), Some(long), None),
                "not both",
            ),
            (admin_options(Some(addr), None, None, None), "needs a token"),
            (
                admin_options(None, None, Some(long), None),
                "no admin listener",
            ),
            (
                admin_options(Some(addr), None, Some("short"), None),
                "at least 16",
            ),
            (
                admin_options(Some(addr), None, Some(long), Some(&file)),
                "not both",
            ),
            (
                admin_options(Some(addr), None, None, Some(&dir.join("missing"))),
                "--admin-token-file",
            ),
        ];
        for (result, want) in errors {
            let e = result.unwrap_err();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
