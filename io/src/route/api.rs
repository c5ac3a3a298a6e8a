//! The route's HTTP API (axum): DESIGN.md's list plus `POST /userNames` (names by id, for
//! showing senders), with the bodies of [`crate::api`].
//!
//! Every API answer is an [`Envelope`]. Statuses: 400 + 3000 for every request the OpenAPI
//! document forbids (a body or query that does not parse, a value out of its range, a
//! string not matching its pattern, a missing or unknown field, `null` where the document
//! does not say `nullable`); 401 for a missing or bad bearer token, 403 for acting as another user or reading a
//! conversation one is not a member of, 404 for a conversation that cannot exist, 409 for
//! a taken user name, 413 past the body limit, 503 when the driver is gone; 200 for every
//! other answer with a CIM code (success, or 4000 / 5000 / 7100 / 9100 as CIM does). Code
//! 3000 is never sent with 200 ([`ApiError::code`] makes sure). Never a 500 for bad input:
//! rejections are mapped by the [`ApiJson`] and [`ApiQuery`] extractors.
//!
//! Limits (see `limits`): 429 + `Retry-After` + code 4290 for a throttled request (failed
//! logins at the account, logins or registrations per client address, sends per user),
//! 503 + `Retry-After` + code 4500 when the password checks are all taken. A bearer token
//! whose session ended (logout, takeover, newer login) is 401.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cim_core::groups::{self, GroupAction};
use cim_core::history::{self, PageRequest, Plan};
use cim_core::ids::{ClientMsgId, ConvId, UserId};
use cim_core::route::login::{
    BearerClaims, BearerKey, LoginError, LoginRequest, RegisterFailure, secs_up,
};
use cim_core::store::{StoreCommand, StoreReply, StoreUnavailable};
use cim_proto::ErrorCode;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot, watch};

use super::RouteOptions;
use super::counters::Counters;
use super::input::{ApiCall, Input};
use super::limits::{self, IpNet, KeyedBuckets, SessionCache};
use crate::api::{
    self as body, CODE_BUSY, CODE_FAIL, CODE_OK, CODE_THROTTLED, CODE_VALIDATION, Envelope,
    GroupList, History, HistoryMessage, LoginResponse, MAX_USER_NAMES, OnlineUser,
    RegisterResponse, SendResponse, UserName, UserNames,
};
use crate::clock::Clock;
use crate::registry::{RegistryView, ServerMap, SessionHealth};
use crate::store::Store;

mod health;
mod web;

/// Largest request body accepted.
pub(super) const MAX_BODY: usize = 64 * 1024;
/// Most users `GET /onlineUser` lists.
const MAX_ONLINE: u32 = 1000;
/// `/health` waits this long for the store.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

/// What every handler shares.
pub(super) struct ApiShared {
    driver: mpsc::Sender<Input>,
    store: Arc<dyn Store>,
    clock: Clock,
    bearer: BearerKey,
    store_timeout: Duration,
    live: watch::Receiver<ServerMap>,
    registry_health: watch::Receiver<SessionHealth>,
    counters: Arc<Counters>,
    trusted_proxies: Vec<IpNet>,
    login_limits: KeyedBuckets<IpAddr>,
    register_limits: KeyedBuckets<IpAddr>,
    send_limits: KeyedBuckets<UserId>,
    /// Each user's current claim epoch, which a bearer token must carry.
    sessions: SessionCache,
    /// `/openapi.json`, with this route's limits in it.
    openapi: Arc<serde_json::Value>,
    /// `--min-password-len`, to refuse a registration that breaks the rules before it
    /// counts against the address's limit.
    min_password_len: usize,
    /// `--max-body`: the longest message text, in bytes.
    max_body: usize,
    /// The servers' WebSocket origins seen since start, for the web page's CSP (`api/web`).
    ws_origins: web::SeenOrigins,
}

impl ApiShared {
    pub(super) fn new(
        options: &RouteOptions,
        driver: mpsc::Sender<Input>,
        store: Arc<dyn Store>,
        clock: Clock,
        view: RegistryView,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            driver,
            store,
            clock,
            // The same key the login machine verifies with (`RouteLogin::verify_bearer`),
            // held here so checking a token needs no trip through the driver.
            bearer: BearerKey::new(options.bearer_secret.clone())
                .with_previous(options.bearer_secret_previous.clone()),
            store_timeout: options.login.store_timeout,
            live: view.servers(),
            registry_health: view.health(),
            counters,
            trusted_proxies: options.trusted_proxies.clone(),
            login_limits: KeyedBuckets::new(options.login_per_address),
            register_limits: KeyedBuckets::new(options.register_per_address),
            send_limits: KeyedBuckets::new(options.send_per_user),
            sessions: SessionCache::default(),
            openapi: Arc::new(super::openapi::openapi_document_for(options)),
            min_password_len: options.login.min_password_len,
            max_body: options.delivery.max_body,
            ws_origins: web::SeenOrigins::default(),
        }
    }
}

type Shared = Arc<ApiShared>;

pub(super) fn router(shared: Shared) -> Router {
    Router::new()
        .route("/registerAccount", post(register))
        .route("/login", post(login))
        .route("/offLine", post(offline))
        .route("/onlineUser", get(online_users))
        .route("/userNames", post(user_names))
        .route("/groupRoute", post(group_route))
        .route("/p2pRoute", post(p2p_route))
        .route("/group/create", post(group_create))
        .route("/group/join", post(group_join))
        .route("/group/leave", post(group_leave))
        .route("/group/list", get(group_list))
        .route("/history", get(history))
        .route("/openapi.json", get(openapi))
        .route("/health", get(health::ready))
        .route("/health/ready", get(health::ready))
        .route("/health/live", get(health::live))
        .route("/metrics", get(metrics))
        // The web client (web/), same origin as the API: no CORS needed.
        .route("/", get(web::index))
        .route("/index.html", get(web::index))
        .route("/app.js", get(web::app_js))
        .route("/style.css", get(web::style))
        .route("/cim_web_bg.wasm", get(web::wasm))
        .route("/favicon.ico", get(web::no_icon))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(shared.clone(), count))
        .with_state(shared)
}

// --- answers ----------------------------------------------------------------------------

/// An error answer: a status and the envelope's code and message.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Sent as `Retry-After` (whole seconds, rounded up).
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 429 + `Retry-After` + 4290: `what` is over its limit for `wait`.
    fn throttled(what: &str, wait: Duration) -> Self {
        Self {
            retry_after: Some(wait),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                CODE_THROTTLED,
                format!("{what}: retry in {} s", secs_up(wait)),
            )
        }
    }

    /// 503 + `Retry-After: 1` + 4500: the password checks are all taken.
    fn busy(message: String) -> Self {
        Self {
            retry_after: Some(Duration::from_secs(1)),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, CODE_BUSY, message)
        }
    }

    fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, CODE_VALIDATION, message)
    }

    /// A CIM failure code in a 200 answer (CIM's convention), except validation (3000),
    /// which is always a 400: a client tells an invalid request by its status alone.
    fn code(code: &'static str, message: impl Into<String>) -> Self {
        if code == CODE_VALIDATION {
            return Self::invalid(message);
        }
        Self::new(StatusCode::OK, code, message)
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, CODE_VALIDATION, message)
    }

    fn unavailable(message: impl Into<String>) -> Self {
        Self::code(CODE_FAIL, message)
    }

    fn stopping() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            CODE_FAIL,
            "the route is shutting down",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let envelope: Envelope<()> = Envelope::error(self.code, self.message);
        let mut response = (self.status, axum::Json(envelope)).into_response();
        if let Some(wait) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs_up(wait).max(1)));
        }
        response
    }
}

impl From<LoginError> for ApiError {
    fn from(e: LoginError) -> Self {
        match e {
            LoginError::Throttled(wait) => {
                Self::throttled("too many failed logins for this account", wait)
            }
            LoginError::Busy => Self::busy(e.to_string()),
            other => Self::code(other.code(), other.to_string()),
        }
    }
}

impl From<RegisterFailure> for ApiError {
    fn from(e: RegisterFailure) -> Self {
        match e {
            RegisterFailure::Busy => Self::busy(e.to_string()),
            // A well-formed request that conflicts with an account: not invalid, so not 400
            // (CIM's code stays 3000 for its clients).
            RegisterFailure::NameTaken => {
                Self::new(StatusCode::CONFLICT, CODE_VALIDATION, e.to_string())
            }
            other => Self::code(other.code(), other.to_string()),
        }
    }
}

/// A success answer.
fn ok<T: serde::Serialize>(data: T) -> Response {
    axum::Json(Envelope::ok(data)).into_response()
}

/// Success without data (`dataBody` omitted).
fn ok_empty(message: &str) -> Response {
    let envelope: Envelope<()> = Envelope {
        code: CODE_OK.to_owned(),
        message: message.to_owned(),
        data_body: None,
    };
    axum::Json(envelope).into_response()
}

type ApiResult = Result<Response, ApiError>;

// --- extractors -------------------------------------------------------------------------

/// `axum::Json` whose rejections are envelopes: 400 + 3000, or 413 past the body limit.
pub(super) struct ApiJson<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| {
                let mime = mime.trim();
                mime.eq_ignore_ascii_case("application/json")
                    || (mime.starts_with("application/") && mime.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::invalid(
                "send the body as JSON, with Content-Type: application/json",
            ));
        }
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(bytes) => bytes,
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    CODE_VALIDATION,
                    format!("request body over {MAX_BODY} bytes"),
                ));
            }
            Err(rejection) if rejection.body_text().contains("did not arrive in time") => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    CODE_VALIDATION,
                    "the request body did not arrive in time",
                ));
            }
            Err(_) => return Err(ApiError::invalid("the body could not be read")),
        };
        if let Some(message) = super::body_errors::list_for_object(&bytes) {
            return Err(ApiError::invalid(message));
        }
        // The field path goes into the message: the client's words, not the parser's.
        let mut json = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut json)
            .map_err(|error| ApiError::invalid(super::body_errors::json_error(&error)))?;
        json.end()
            .map_err(|_| ApiError::invalid("the body has more after its JSON value"))?;
        Ok(Self(value))
    }
}

/// `axum::extract::Query` whose rejections are 400 + 3000 envelopes.
pub(super) struct ApiQuery<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(query_rejection(&rejection)),
        }
    }
}

fn query_rejection(rejection: &QueryRejection) -> ApiError {
    ApiError::invalid(super::body_errors::query_error(&rejection.body_text()))
}

/// A verified bearer token: the user it acts for, and the token itself (logout needs it).
pub(super) struct Bearer {
    claims: BearerClaims,
    token: String,
}

impl Bearer {
    /// The body's `userId` must be the token's user: a token acts only for its own user.
    fn acting_as(&self, user_id: u64) -> Result<UserId, ApiError> {
        if self.claims.user.0 == user_id {
            Ok(self.claims.user)
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                CODE_VALIDATION,
                "userId is not the bearer token's user",
            ))
        }
    }
}

impl FromRequestParts<Shared> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, shared: &Shared) -> Result<Self, ApiError> {
        let unauthorized = |message: &str| ApiError::unauthorized(message);
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| unauthorized("missing Authorization: Bearer <token>"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| unauthorized("Authorization must be Bearer <token>"))?;
        let claims = shared
            .bearer
            .verify(token, shared.clock.wall())
            .map_err(|e| unauthorized(&format!("bad bearer token: {e}")))?;
        if current_epoch(shared, claims.user).await? != Some(claims.epoch) {
            shared.counters.stale_tokens.fetch_add(1, Ordering::Relaxed);
            return Err(unauthorized(
                "bearer token of an ended session (logged out, or replaced by a newer login): \
                 log in again",
            ));
        }
        Ok(Self {
            claims,
            token: token.to_owned(),
        })
    }
}

/// The epoch of `user`'s claim (live or lapsed; `None` once released), at most
/// `SESSION_CACHE_TTL` old: a token is good while it carries this epoch.
async fn current_epoch(
    shared: &ApiShared,
    user: UserId,
) -> Result<Option<cim_core::ids::Epoch>, ApiError> {
    let now = shared.clock.now();
    if let Some(epoch) = shared.sessions.get(user, now) {
        return Ok(epoch);
    }
    match store(shared, StoreCommand::LoadClaim { user }).await? {
        StoreReply::Claim(state) => {
            let epoch = state.claim.map(|c| c.epoch);
            shared.sessions.learn(user, epoch, now);
            Ok(epoch)
        }
        other => Err(odd_reply(&other)),
    }
}

/// The client a request comes from (see `limits::client_ip`), as the per-address limits
/// count it.
pub(super) struct ClientAddr(IpAddr);

impl FromRequestParts<Shared> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, shared: &Shared) -> Result<Self, ApiError> {
        // Always there behind the route's own listener; a router served without it (none
        // today) counts every request as one unknown client.
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        let client = limits::client_ip(peer, &parts.headers, &shared.trusted_proxies);
        Ok(Self(limits::address_key(client)))
    }
}

// --- plumbing ---------------------------------------------------------------------------

/// Counts answers by status class for /metrics.
async fn count(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    let (path, started) = (request.uri().path().to_owned(), tokio::time::Instant::now());
    let response = next.run(request).await;
    let c = &shared.counters;
    c.latency.observe_path(&path, started.elapsed());
    c.http_requests.fetch_add(1, Ordering::Relaxed);
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED {
        c.http_unauthorized.fetch_add(1, Ordering::Relaxed);
    }
    if status.is_client_error() {
        c.http_client_errors.fetch_add(1, Ordering::Relaxed);
    } else if status.is_server_error() {
        c.http_server_errors.fetch_add(1, Ordering::Relaxed);
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, CODE_FAIL, "no such path")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        CODE_FAIL,
        "method not allowed on this path",
    )
}

/// Hands a call to the driver and waits for its answer. The machines answer every request
/// exactly once (with their own store deadlines), so no timeout here: a held takeover may
/// rightly take up to the old lease.
async fn call<T>(
    shared: &ApiShared,
    make: impl FnOnce(oneshot::Sender<T>) -> ApiCall,
) -> Result<T, ApiError> {
    let (tx, rx) = oneshot::channel();
    shared
        .driver
        .send(Input::Api(make(tx)))
        .await
        .map_err(|_| ApiError::stopping())?;
    rx.await.map_err(|_| ApiError::stopping())
}

/// A store command the machines are not involved in, bounded by the store timeout.
async fn store(shared: &ApiShared, command: StoreCommand) -> Result<StoreReply, ApiError> {
    let wall = shared.clock.wall();
    match tokio::time::timeout(shared.store_timeout, shared.store.execute(wall, command)).await {
        Ok(Ok(reply)) => Ok(reply),
        Ok(Err(e)) => Err(store_failed(&e)),
        Err(_) => Err(ApiError::unavailable("store timed out")),
    }
}

/// A failed store command, as a caller sees it: 4000 "store unavailable, retry". The store's
/// own words (node addresses, the client library's error kinds) go to the log, not to
/// whoever called the API.
fn store_failed(e: &StoreUnavailable) -> ApiError {
    tracing::warn!(error = %e, "a store command of the HTTP API failed");
    ApiError::unavailable("store unavailable, retry")
}

fn odd_reply(reply: &StoreReply) -> ApiError {
    tracing::error!(?reply, "store answered with a reply of the wrong kind");
    ApiError::unavailable("store answered oddly")
}

// --- accounts ---------------------------------------------------------------------------

async fn register(
    State(shared): State<Shared>,
    ClientAddr(client): ClientAddr,
    ApiJson(req): ApiJson<body::RegisterRequest>,
) -> ApiResult {
    // An invalid request is a 400 whatever the limits say (the login machine checks the
    // same rules again).
    cim_core::accounts::validate_registration(
        &req.user_name,
        &req.password,
        shared.min_password_len,
    )
    .map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Err(wait) = shared.register_limits.check(client, shared.clock.now()) {
        let c = &shared.counters;
        c.limited_register_address.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::throttled(
            "too many registrations from this address",
            wait,
        ));
    }
    let result = call(&shared, |reply| ApiCall::Register {
        name: req.user_name,
        password: req.password,
        client,
        reply,
    })
    .await?;
    match result {
        Ok(registered) => Ok(ok(RegisterResponse {
            user_id: registered.user.0,
            user_name: registered.name,
        })),
        Err(e) => Err(e.into()),
    }
}

async fn login(
    State(shared): State<Shared>,
    ClientAddr(client): ClientAddr,
    ApiJson(req): ApiJson<body::LoginRequest>,
) -> ApiResult {
    // An invalid request is a 400 whatever the limits say.
    let resume_token = req
        .resume_token
        .as_deref()
        .map(body::decode_resume_token)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("resumeToken: {e}")))?;
    let resume_secret = req
        .resume_secret
        .as_deref()
        .map(body::decode_resume_secret)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("resumeSecret: {e}")))?;
    if let Err(wait) = shared.login_limits.check(client, shared.clock.now()) {
        let c = &shared.counters;
        c.limited_login_address.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::throttled(
            "too many logins from this address",
            wait,
        ));
    }
    let request = LoginRequest {
        user: UserId(req.user_id),
        name: req.user_name,
        password: req.password,
        resume_token,
        resume_secret,
    };
    let answer = call(&shared, |reply| ApiCall::Login {
        request,
        client,
        reply,
    })
    .await??;
    // Tokens of the user's older sessions stop working here at once.
    shared
        .sessions
        .set(answer.user, Some(answer.epoch), shared.clock.now());
    Ok(ok(LoginResponse {
        user_id: answer.user.0,
        epoch: answer.epoch.0,
        server_id: answer.server.id.0.clone(),
        endpoint: Some(answer.server.client_endpoint()),
        ip: answer.server.host.clone(),
        cim_server_port: answer.server.client_port,
        http_port: answer.server.http_port,
        ticket: body::encode_ticket(&answer.ticket),
        token: answer.token,
        resume_token: body::encode_resume_token(&answer.resume_token),
        resume_secret: answer
            .resume_secret
            .as_ref()
            .map(body::encode_resume_secret),
    }))
}

async fn offline(
    State(shared): State<Shared>,
    bearer: Bearer,
    ApiJson(req): ApiJson<body::OfflineRequest>,
) -> ApiResult {
    bearer.acting_as(req.user_id)?;
    let token = bearer.token;
    let result = call(&shared, |reply| ApiCall::Logout { token, reply }).await?;
    match result {
        Ok(out) if out.released => {
            // The token (and any other of this session) stops working here at once.
            shared.sessions.set(out.user, None, shared.clock.now());
            Ok(ok_empty("logged out"))
        }
        Ok(_) => Ok(ok_empty("no current session for this token")),
        Err(cim_core::route::login::LogoutError::BadToken(e)) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            CODE_VALIDATION,
            e.to_string(),
        )),
        Err(e) => Err(ApiError::unavailable(e.to_string())),
    }
}

async fn online_users(State(shared): State<Shared>, _bearer: Bearer) -> ApiResult {
    match store(&shared, StoreCommand::ListOnline { limit: MAX_ONLINE }).await? {
        // Presence must not outlive the server: a session on a server that left the
        // registry (crashed, partitioned) is not online, whatever its lease says (the same
        // test the push planning and `/p2pRoute`'s `online` apply).
        StoreReply::Online(entries) => Ok(ok(entries
            .into_iter()
            .filter(|e| shared.live.borrow().contains_key(&e.server))
            .map(|e| OnlineUser {
                user_id: e.user.0,
                user_name: e.name,
                server_id: e.server.0,
            })
            .collect::<Vec<_>>())),
        other => Err(odd_reply(&other)),
    }
}

/// Any user's name by id (any authenticated user may ask: names are what `/onlineUser` and
/// every chat line show anyway). Unknown ids are left out; duplicates are answered once.
async fn user_names(
    State(shared): State<Shared>,
    _bearer: Bearer,
    ApiJson(req): ApiJson<body::UserNamesRequest>,
) -> ApiResult {
    if req.user_ids.len() > MAX_USER_NAMES {
        return Err(ApiError::invalid(format!(
            "at most {MAX_USER_NAMES} userIds per request"
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    let users: Vec<UserId> = req
        .user_ids
        .into_iter()
        .filter(|id| seen.insert(*id))
        .map(UserId)
        .collect();
    if users.is_empty() {
        return Ok(ok(UserNames { users: Vec::new() }));
    }
    match store(&shared, StoreCommand::LoadNames { users }).await? {
        StoreReply::Names(names) => Ok(ok(UserNames {
            users: names
                .into_iter()
                .filter_map(|(user, name)| {
                    Some(UserName {
                        user_id: user.0,
                        user_name: name?,
                    })
                })
                .collect(),
        })),
        other => Err(odd_reply(&other)),
    }
}

// --- sends ------------------------------------------------------------------------------

/// Appends through the delivery machine; the answer carries where the message was stored.
/// The per-user send limit (the servers' TCP rule, on this route's HTTP send paths).
fn send_allowed(shared: &ApiShared, user: UserId) -> Result<(), ApiError> {
    shared
        .send_limits
        .check(user, shared.clock.now())
        .map_err(|wait| {
            let c = &shared.counters;
            c.limited_send_user.fetch_add(1, Ordering::Relaxed);
            ApiError::throttled("sending too fast", wait)
        })
}

/// A message's id and text, checked as the document states them: the text in characters
/// (see `openapi::max_msg_chars`), before the send counts against the user's limit.
fn outgoing(shared: &ApiShared, msg: &str, client_msg_id: &str) -> Result<ClientMsgId, ApiError> {
    let most = super::openapi::max_msg_chars(shared.max_body);
    // Bytes first: counting the characters of a long text is work too.
    if msg.len() > 4 * most || msg.chars().count() > most {
        return Err(ApiError::invalid(format!(
            "msg must be at most {most} characters"
        )));
    }
    ClientMsgId::from_str(client_msg_id).map_err(|e| ApiError::invalid(format!("clientMsgId: {e}")))
}

async fn send(
    shared: &ApiShared,
    user: UserId,
    conv: &ConvId,
    msg: String,
    msg_id: ClientMsgId,
) -> Result<(String, u64), ApiError> {
    let send = cim_proto::Send {
        msg_id_hi: msg_id.hi(),
        msg_id_lo: msg_id.lo(),
        conv: conv.to_string(),
        body: msg.into_bytes().into(),
        sent_at_ms: shared.clock.wall().0,
        // Unordered: each HTTP send is answered before the caller's next one.
        ..Default::default()
    };
    let result = call(shared, |reply| ApiCall::Send { user, send, reply }).await?;
    if let Some(ack) = result.ack {
        return Ok((ack.log_epoch.to_string(), ack.seq));
    }
    let nack = result.nack.unwrap_or_default();
    // The request was checked above, so these two cannot happen; a group that does not
    // exist (BadConversation from the store) is a failure like `/group/join`'s.
    let code = match ErrorCode::try_from(nack.code) {
        Ok(ErrorCode::BodyTooLarge | ErrorCode::MalformedFrame) => CODE_VALIDATION,
        _ => CODE_FAIL,
    };
    Err(ApiError::code(code, nack.reason))
}

async fn group_route(
    State(shared): State<Shared>,
    bearer: Bearer,
    ApiJson(req): ApiJson<body::GroupRouteRequest>,
) -> ApiResult {
    let msg_id = outgoing(&shared, &req.msg, &req.client_msg_id)?;
    let conv = match req.group_name.as_deref() {
        None => ConvId::All,
        Some(name) => group_conv(name)?,
    };
    let user = bearer.acting_as(req.user_id)?;
    send_allowed(&shared, user)?;
    let (log_epoch, seq) = send(&shared, user, &conv, req.msg, msg_id).await?;
    Ok(ok(SendResponse {
        conv: conv.to_string(),
        log_epoch,
        seq,
        online: None,
    }))
}

async fn p2p_route(
    State(shared): State<Shared>,
    bearer: Bearer,
    ApiJson(req): ApiJson<body::P2pRouteRequest>,
) -> ApiResult {
    let msg_id = outgoing(&shared, &req.msg, &req.client_msg_id)?;
    let user = bearer.acting_as(req.user_id)?;
    let receiver = UserId(req.receive_user_id);
    // Well-formed (the document cannot say the two ids differ), but there is no such
    // conversation: like `/history?conv=p:1:1`, a 404.
    let conv = ConvId::private(user, receiver).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            CODE_FAIL,
            "no private conversation with oneself: receiveUserId must be another user",
        )
    })?;
    send_allowed(&shared, user)?;
    match store(&shared, StoreCommand::LoadAccount { user: receiver }).await? {
        StoreReply::Account(Some(_)) => {}
        StoreReply::Account(None) => {
            return Err(ApiError::code(CODE_FAIL, "no such receiver"));
        }
        other => return Err(odd_reply(&other)),
    }
    let (log_epoch, seq) = send(&shared, user, &conv, req.msg, msg_id).await?;
    // Online = a route record of the receiver's live claim, on a server that is live: the
    // same test the push planning applies, read after the append.
    let online = match store(
        &shared,
        StoreCommand::LoadRoutes {
            users: vec![receiver],
        },
    )
    .await
    {
        Ok(StoreReply::Routes(routes)) => routes.iter().any(|(u, record)| {
            *u == receiver
                && record
                    .as_ref()
                    .is_some_and(|r| shared.live.borrow().contains_key(&r.server))
        }),
        // The message is stored and acked; only the presence hint is unknown.
        _ => false,
    };
    Ok(ok(SendResponse {
        conv: conv.to_string(),
        log_epoch,
        seq,
        online: Some(online),
    }))
}

// --- groups -----------------------------------------------------------------------------

fn group_conv(name: &str) -> Result<ConvId, ApiError> {
    ConvId::group(name).map_err(|e| ApiError::invalid(format!("groupName: {e}")))
}

async fn group_create(
    State(shared): State<Shared>,
    bearer: Bearer,
    ApiJson(req): ApiJson<body::GroupRequest>,
) -> ApiResult {
    group_action(&shared, &bearer, req, GroupAction::Create).await
}

async fn group_join(
    State(shared): State<Shared>,
    bearer: Bearer,
    ApiJson(req): ApiJson<body::GroupRequest>,
) -> ApiResult {
    group_action(&shared, &bearer, req, GroupAction::Join).await
}

async fn group_leave(
    State(shared): State<Shared>,
    bearer: Bearer,
    ApiJson(req): ApiJson<body::GroupRequest>,
) -> ApiResult {
    group_action(&shared, &bearer, req, GroupAction::Leave).await
}

/// One group action (the rules are `cim_core::groups`'): a refusal is a 200 + 4000.
async fn group_action(
    shared: &ApiShared,
    bearer: &Bearer,
    req: body::GroupRequest,
    action: GroupAction,
) -> ApiResult {
    let conv = group_conv(&req.group_name)?;
    let user = bearer.acting_as(req.user_id)?;
    let reply = store(shared, action.command(conv, user)).await?;
    match action.outcome(&reply) {
        Some(Ok(done)) => Ok(ok_empty(done)),
        Some(Err(refused)) => Err(ApiError::code(CODE_FAIL, refused.to_string())),
        None => Err(odd_reply(&reply)),
    }
}

async fn group_list(State(shared): State<Shared>, bearer: Bearer) -> ApiResult {
    let user = bearer.claims.user;
    match store(&shared, StoreCommand::LoadHeads { user }).await? {
        StoreReply::Heads(heads) => Ok(ok(GroupList {
            groups: groups::groups_of(heads),
        })),
        // A list missing the groups on a dead shard would be a wrong answer, not a short one.
        StoreReply::PartialHeads { .. } => Err(ApiError::unavailable(
            "some of your conversations cannot be read now (a store shard is down), retry",
        )),
        other => Err(odd_reply(&other)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HistoryQuery {
    conv: String,
    #[serde(default)]
    before_seq: Option<u64>,
    /// Wider than the 1..=100 it may be, so a number out of range is said as such.
    #[serde(default)]
    limit: Option<u64>,
}

/// The `conv` of `/history`: 400 for a text the document's pattern refuses, 404 for one it
/// admits that names no conversation (`p:<a>:<b>` needs a < b; a pattern cannot say so).
fn history_conv(text: &str) -> Result<ConvId, ApiError> {
    if !super::openapi::conv_well_formed(text) {
        return Err(ApiError::invalid(
            "query parameter conv must be all, g:<group name> or p:<low id>:<high id>",
        ));
    }
    text.parse().map_err(|_| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            CODE_FAIL,
            "no such conversation: p:<low>:<high> names two users, the lower id first",
        )
    })
}

/// The rules (bounds, who may read, which seqs) are `cim_core::history`'s; this maps them
/// to HTTP and runs the reads they name.
async fn history(
    State(shared): State<Shared>,
    bearer: Bearer,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> ApiResult {
    let user = bearer.claims.user;
    let request = PageRequest::new(query.limit, query.before_seq, body::MAX_ID)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let conv = history_conv(&query.conv)?;
    let not_member = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            CODE_FAIL,
            "not a member of this conversation",
        )
    };
    if !history::may_ask(user, &conv) {
        return Err(not_member());
    }
    // The user's heads say which groups they are in (with the join seq) and each log's
    // epoch, which a fetch must name.
    let heads = match store(&shared, StoreCommand::LoadHeads { user }).await? {
        StoreReply::Heads(heads) => heads,
        // Only this conversation's head matters: whether its own shard answered.
        StoreReply::PartialHeads { unavailable, .. } if unavailable.contains(&conv) => {
            return Err(ApiError::unavailable(
                "this conversation cannot be read now (a store shard is down), retry",
            ));
        }
        StoreReply::PartialHeads { heads, .. } => heads,
        other => return Err(odd_reply(&other)),
    };
    let head = heads.into_iter().find(|h| h.conv == conv);
    let (head, after_seq, limit, before) = match history::plan(&conv, head, request) {
        Plan::NotMember => return Err(not_member()),
        Plan::NoLog => {
            return Ok(ok(History {
                conv: conv.to_string(),
                log_epoch: "0".into(),
                head_seq: 0,
                first_available_seq: 1,
                messages: Vec::new(),
            }));
        }
        Plan::Page {
            head,
            after_seq,
            limit,
            before,
        } => (head, after_seq, limit, before),
    };
    let messages = if limit == 0 {
        Vec::new()
    } else {
        let fetch = StoreCommand::Fetch {
            user,
            conv: conv.clone(),
            log_epoch: head.log_epoch,
            after_seq,
            limit,
        };
        match store(&shared, fetch).await? {
            StoreReply::Fetched { messages, .. } => messages,
            // Left the group since its heads were read.
            StoreReply::NotMember => return Err(not_member()),
            other => return Err(odd_reply(&other)),
        }
    };
    Ok(ok(History {
        conv: conv.to_string(),
        log_epoch: head.log_epoch.0.to_string(),
        head_seq: head.head_seq,
        first_available_seq: head.first_available_seq,
        messages: history::keep(messages, before)
            .map(|m| HistoryMessage {
                seq: m.seq,
                sender_id: m.sender.0,
                client_msg_id: m.msg_id.to_string(),
                msg: String::from_utf8_lossy(&m.body).into_owned(),
                sent_at_ms: m.appended_at.0,
            })
            .collect(),
    }))
}

// --- operations -------------------------------------------------------------------------

async fn openapi(State(shared): State<Shared>) -> Response {
    axum::Json(&*shared.openapi).into_response()
}

async fn metrics(State(shared): State<Shared>) -> Response {
    match call(&shared, |reply| ApiCall::Metrics { reply }).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_failure_tells_the_caller_nothing_of_the_store() {
        let e = StoreUnavailable(
            "redis: Requested connection not found - ClusterConnectionNotFound: 127.0.0.1:27002"
                .into(),
        );
        let answer = store_failed(&e);
        assert_eq!(
            (answer.status, answer.code, answer.message.as_str()),
            (StatusCode::OK, CODE_FAIL, "store unavailable, retry")
        );
    }
}
