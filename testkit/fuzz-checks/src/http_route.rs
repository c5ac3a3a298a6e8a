//! HTTP requests, written byte by byte, to a running route (`cim_io::route::start` on
//! loopback, with the in-memory store and registry, started once per process on a tokio
//! runtime of its own): methods, paths, query strings, `Authorization` headers (minted,
//! expired, mutated, forged tokens), content types, extra headers and bodies (JSON objects
//! built from the API's field names with values of every type, or raw bytes).
//!
//! Invariants: every request is answered (within 10 s) with a status line; never a 5xx;
//! every answer of an API path that has a body is a JSON envelope with a code; an
//! authenticated endpoint never answers 9000 unless the request carried a token the route's
//! key minted and that has not expired, and answers a missing or bad token with 401.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use cim_core::accounts::PasswordParams;
use cim_core::ids::{Epoch, ServerId, UnixMillis, UserId};
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::login::{BearerClaims, BearerKey};
use cim_core::route::tickets::TicketKeys;
use cim_core::store::{Claim, StoreCommand};
use cim_io::clock::Clock;
use cim_io::net::TokioNet;
use cim_io::registry::MemoryRegistry;
use cim_io::route::{self, RouteOptions};
use cim_io::store::{MemoryBackend, Store};

use crate::Reached;

const BEARER_SECRET: &[u8] = b"fuzz-bearer-secret";
/// 2100-01-01: tokens minted to expire then are valid for the whole run.
const FAR_FUTURE: UnixMillis = UnixMillis(4_102_444_800_000);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// The store is emptied every so many requests, so a long run's registrations and groups
/// do not grow without bound.
const RESET_EVERY: u64 = 20_000;

pub const FEATURES: &[&str] = &[
    "ok",
    "fail_code",
    "validation",
    "unauthorized",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "authenticated_ok",
];

#[derive(Debug)]
struct Fixture {
    addr: SocketAddr,
    store: Arc<MemoryBackend>,
    bearer: BearerKey,
    requests: AtomicU64,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let store = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
        let for_route = store.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime");
            runtime.block_on(async move {
                let registry = MemoryRegistry::new();
                let keys = TicketKeys::new(1, b"fuzz-ticket-secret".to_vec());
                let mut options = RouteOptions::new(
                    "r1",
                    keys,
                    BEARER_SECRET.to_vec(),
                    b"fuzz-link-secret".to_vec(),
                );
                options.http_listen = SocketAddr::from(([127, 0, 0, 1], 0));
                options.login.password = PasswordParams::for_tests();
                options.password_workers = 1;
                let route = route::start(TokioNet, Clock::System, options, for_route, &registry)
                    .await
                    .expect("the route starts");
                tx.send(route.http_addr())
                    .expect("the fuzzer waits for the address");
                let _keep = (route, registry);
                std::future::pending::<()>().await;
            });
        });
        let addr = rx.recv().expect("the route's address");
        Fixture {
            addr,
            store,
            bearer: BearerKey::new(BEARER_SECRET),
            requests: AtomicU64::new(0),
        }
    })
}

#[derive(Debug, Arbitrary)]
struct Request {
    method: Method,
    path: Path,
    query: Query,
    auth: Auth,
    content_type: ContentType,
    extra_headers: Vec<(String, String)>,
    body: Body,
}

#[derive(Debug, Arbitrary)]
enum Method {
    Get,
    Post,
    Put,
    Delete,
    Raw(String),
}

#[derive(Debug, Arbitrary, Clone, Copy, PartialEq, Eq)]
enum Path {
    Register,
    Login,
    Offline,
    OnlineUser,
    UserNames,
    GroupRoute,
    P2pRoute,
    GroupCreate,
    GroupJoin,
    GroupLeave,
    GroupList,
    History,
    OpenApi,
    Health,
    Metrics,
    Unknown,
}

impl Path {
    fn text(self) -> &'static str {
        match self {
            Self::Register => "/registerAccount",
            Self::Login => "/login",
            Self::Offline => "/offLine",
            Self::OnlineUser => "/onlineUser",
            Self::UserNames => "/userNames",
            Self::GroupRoute => "/groupRoute",
            Self::P2pRoute => "/p2pRoute",
            Self::GroupCreate => "/group/create",
            Self::GroupJoin => "/group/join",
            Self::GroupLeave => "/group/leave",
            Self::GroupList => "/group/list",
            Self::History => "/history",
            Self::OpenApi => "/openapi.json",
            Self::Health => "/health",
            Self::Metrics => "/metrics",
            Self::Unknown => "/nothing/here",
        }
    }

    /// The method it is served with, and whether it needs a bearer token.
    fn route(self) -> Option<(&'static str, bool)> {
        match self {
            Self::Register | Self::Login => Some(("POST", false)),
            Self::Offline
            | Self::UserNames
            | Self::GroupRoute
            | Self::P2pRoute
            | Self::GroupCreate
            | Self::GroupJoin
            | Self::GroupLeave => Some(("POST", true)),
            Self::OnlineUser | Self::GroupList | Self::History => Some(("GET", true)),
            Self::OpenApi | Self::Health | Self::Metrics => Some(("GET", false)),
            Self::Unknown => None,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Query {
    None,
    History {
        conv: Conv,
        before_seq: Option<Number>,
        limit: Option<Number>,
    },
    Raw(String),
}

#[derive(Debug, Arbitrary)]
enum Conv {
    All,
    Group(u8),
    Private(u8, u8),
    Raw(String),
}

impl Conv {
    fn text(&self) -> String {
        match self {
            Self::All => "all".into(),
            Self::Group(g) => format!("g:g{}", g % 4),
            Self::Private(a, b) => format!("p:{}:{}", a % 6, b % 6),
            Self::Raw(s) => s.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Number {
    Small(u8),
    Any(u64),
    Negative(i64),
    Text(String),
}

impl Number {
    fn text(&self) -> String {
        match self {
            Self::Small(n) => n.to_string(),
            Self::Any(n) => n.to_string(),
            Self::Negative(n) => (-(n.unsigned_abs() as i128)).to_string(),
            Self::Text(s) => s.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Auth {
    None,
    Valid { user: u8 },
    Expired { user: u8 },
    Mutated { user: u8, at: u8, with: u8 },
    Forged { user: u8 },
    Raw(String),
}

#[derive(Debug, Arbitrary)]
enum ContentType {
    Json,
    None,
    Text,
    Raw(String),
}

#[derive(Debug, Arbitrary)]
enum Body {
    Empty,
    Object(Vec<(Key, Value)>),
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Key {
    UserId,
    UserName,
    Password,
    ResumeToken,
    ReceiveUserId,
    Msg,
    ClientMsgId,
    GroupName,
    UserIds,
    Raw(String),
}

impl Key {
    fn text(&self) -> String {
        match self {
            Self::UserId => "userId".into(),
            Self::UserName => "userName".into(),
            Self::Password => "password".into(),
            Self::ResumeToken => "resumeToken".into(),
            Self::ReceiveUserId => "receiveUserId".into(),
            Self::Msg => "msg".into(),
            Self::ClientMsgId => "clientMsgId".into(),
            Self::GroupName => "groupName".into(),
            Self::UserIds => "userIds".into(),
            Self::Raw(s) => s.clone(),
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Value {
    SmallUser(u8),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(String),
    Name(u8),
    Uuid(u128),
    Bool(bool),
    Null,
    Users(Vec<u8>),
    Object(Vec<(String, u8)>),
}

impl Value {
    fn json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Self::SmallUser(u) => json!(u % 6),
            Self::U64(n) => json!(n),
            Self::I64(n) => json!(n),
            Self::F64(f) => serde_json::Number::from_f64(*f).map_or(json!(null), Into::into),
            Self::Str(s) => json!(s),
            Self::Name(n) => json!(format!("user{}", n % 6)),
            Self::Uuid(n) => json!(cim_core::ids::ClientMsgId(*n).to_string()),
            Self::Bool(b) => json!(b),
            Self::Null => json!(null),
            Self::Users(us) => json!(us.iter().map(|u| u % 6).collect::<Vec<_>>()),
            Self::Object(fields) => serde_json::Value::Object(
                fields.iter().map(|(k, v)| (k.clone(), json!(v))).collect(),
            ),
        }
    }
}

/// Request-line and header text: no CR, LF or (in the request line) spaces, which would
/// only make a request hyper waits on forever instead of one it parses.
fn clean(text: &str, space: bool) -> String {
    text.chars()
        .filter(|c| *c != '\r' && *c != '\n' && (space || *c != ' '))
        .collect()
}

/// Writes `user` a claim of epoch 1 lasting the whole run, if its epoch counter is still 0.
fn live_claim(fixture: &Fixture, user: UserId) {
    let claim = StoreCommand::ReplaceClaim {
        user,
        expected: Epoch(0),
        claim: Claim {
            resume_secret: None,
            epoch: Epoch(1),
            server: ServerId::new("s1"),
            lease_until: FAR_FUTURE,
            resume_token_hash: [0; 32],
        },
    };
    // The in-memory store answers at once; the answer (replaced, or a newer claim won) does
    // not matter here.
    let mut call = std::pin::pin!(fixture.store.execute(UnixMillis(1), claim));
    let _ = call
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
}

pub fn check(data: &[u8]) -> Reached {
    let mut reached = Reached::new();
    let Ok(request) = Request::arbitrary_take_rest(Unstructured::new(data)) else {
        return reached;
    };
    let fixture = fixture();
    if fixture.requests.fetch_add(1, Ordering::Relaxed) % RESET_EVERY == RESET_EVERY - 1 {
        fixture.store.reset(MemoryStoreConfig::default());
    }

    let method = match &request.method {
        Method::Get => "GET".to_owned(),
        Method::Post => "POST".to_owned(),
        Method::Put => "PUT".to_owned(),
        Method::Delete => "DELETE".to_owned(),
        Method::Raw(m) => clean(m, false),
    };
    let query = match &request.query {
        Query::None => String::new(),
        Query::History {
            conv,
            before_seq,
            limit,
        } => {
            let mut q = format!("?conv={}", conv.text());
            if let Some(n) = before_seq {
                q.push_str(&format!("&beforeSeq={}", n.text()));
            }
            if let Some(n) = limit {
                q.push_str(&format!("&limit={}", n.text()));
            }
            clean(&q, false)
        }
        Query::Raw(q) => format!("?{}", clean(q, false)),
    };
    let claims = |user: u8, expires_at| BearerClaims {
        user: UserId(u64::from(user % 6)),
        epoch: Epoch(1),
        expires_at,
    };
    // Tokens are bound to their session (issue 12 part 4): give the user a live claim of the
    // minted epoch, unless it has one already (a login the fuzzer made moves it on, and then
    // the minted token is rightly refused).
    if let Auth::Valid { user } | Auth::Mutated { user, .. } = &request.auth {
        live_claim(fixture, UserId(u64::from(user % 6)));
    }
    let (authorization, token_valid) = match &request.auth {
        Auth::None => (None, false),
        Auth::Valid { user } => {
            let token = fixture.bearer.mint(&claims(*user, FAR_FUTURE));
            (Some(format!("Bearer {token}")), true)
        }
        Auth::Expired { user } => {
            let token = fixture.bearer.mint(&claims(*user, UnixMillis(1)));
            (Some(format!("Bearer {token}")), false)
        }
        Auth::Mutated { user, at, with } => {
            let mut token = fixture.bearer.mint(&claims(*user, FAR_FUTURE)).into_bytes();
            let i = usize::from(*at) % token.len();
            let valid = token[i] == *with;
            token[i] = *with;
            let text = String::from_utf8_lossy(&token).into_owned();
            (Some(format!("Bearer {}", clean(&text, true))), valid)
        }
        Auth::Forged { user } => {
            let token = BearerKey::new(b"not-the-secret".to_vec()).mint(&claims(*user, FAR_FUTURE));
            (Some(format!("Bearer {token}")), false)
        }
        Auth::Raw(text) => {
            let text = clean(text, true);
            // A raw header that happens to be a valid token (it can be: the corpus may hold
            // one) counts as one.
            let valid = text
                .strip_prefix("Bearer ")
                .map(str::trim)
                .is_some_and(|t| fixture.bearer.verify(t, wall_now()).is_ok());
            (Some(text), valid)
        }
    };
    let body: Vec<u8> = match &request.body {
        Body::Empty => Vec::new(),
        Body::Object(fields) => {
            let object: serde_json::Map<String, serde_json::Value> =
                fields.iter().map(|(k, v)| (k.text(), v.json())).collect();
            serde_json::to_vec(&object).expect("a JSON object serialises")
        }
        Body::Raw(bytes) => bytes.clone(),
    };

    let mut head = format!(
        "{method} {}{query} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\nContent-Length: {}\r\n",
        request.path.text(),
        body.len()
    );
    if let Some(authorization) = &authorization {
        head.push_str(&format!("Authorization: {authorization}\r\n"));
    }
    match &request.content_type {
        ContentType::Json => head.push_str("Content-Type: application/json\r\n"),
        ContentType::None => {}
        ContentType::Text => head.push_str("Content-Type: text/plain\r\n"),
        ContentType::Raw(t) => head.push_str(&format!("Content-Type: {}\r\n", clean(t, true))),
    }
    for (name, value) in request.extra_headers.iter().take(8) {
        let name = clean(name, false).replace(':', "");
        let lower = name.to_ascii_lowercase();
        // Framing headers stay ours: a second length or a chunked body would only make the
        // server wait for bytes that never come.
        if name.is_empty()
            || [
                "content-length",
                "transfer-encoding",
                "connection",
                "host",
                "expect",
            ]
            .contains(&lower.as_str())
        {
            continue;
        }
        head.push_str(&format!("{name}: {}\r\n", clean(value, true)));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&body);

    let answer = exchange(fixture.addr, &bytes);
    if answer.is_empty() {
        // Closed or reset without an answer: only for requests hyper cannot parse.
        reached.insert("closed");
        return reached;
    }
    let (status, answer_body) = parse_answer(&answer);
    assert!(
        !(500..600).contains(&status),
        "a {status} answer to {}: {}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(300)]),
        String::from_utf8_lossy(&answer)
    );
    reached.insert(match status {
        200 => "ok",
        400 => "validation",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        _ => "other_status",
    });

    let api = !matches!(request.path, Path::OpenApi | Path::Health | Path::Metrics);
    let envelope = (api && !answer_body.is_empty()).then(|| {
        serde_json::from_slice::<serde_json::Value>(answer_body)
            .ok()
            .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_owned))
            .unwrap_or_else(|| {
                panic!(
                    "not an envelope ({status}): {}",
                    String::from_utf8_lossy(answer_body)
                )
            })
    });
    if envelope.as_deref().is_some_and(|c| c != "9000") && status == 200 {
        reached.insert("fail_code");
    }
    if let Some((served_method, authenticated)) = request.path.route()
        && authenticated
        && served_method == method
    {
        if envelope.as_deref() == Some("9000") {
            assert!(token_valid, "9000 without a valid token: {authorization:?}");
            reached.insert("authenticated_ok");
        }
        // (Without an envelope, hyper refused the request before the router saw it.)
        if !token_valid && envelope.is_some() {
            assert_eq!(
                status, 401,
                "a bad token answered {status}: {authorization:?}"
            );
        }
    }
    reached
}

/// The route checks tokens against the system's wall clock.
#[allow(clippy::disallowed_methods)] // the shell's clock, as the route reads it
fn wall_now() -> UnixMillis {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    UnixMillis(since.as_millis() as u64)
}

/// One request on a fresh connection; the whole answer (the route closes after it).
fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).expect("the route accepts");
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .expect("a read timeout");
    // The server may answer (and close) before reading everything, e.g. on a bad request
    // line: a failed write is then no error of the server's.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "no answer within {ANSWER_TIMEOUT:?} ({e}) to {}",
            String::from_utf8_lossy(&request[..request.len().min(300)])
        ),
    }
    answer
}

/// The status and the body (empty if the answer was chunked or had none).
fn parse_answer(answer: &[u8]) -> (u16, &[u8]) {
    let text = String::from_utf8_lossy(&answer[..answer.len().min(64)]);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {:?}", String::from_utf8_lossy(answer)));
    let Some(split) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (status, &[]);
    };
    let head = String::from_utf8_lossy(&answer[..split]).to_ascii_lowercase();
    if head.contains("transfer-encoding: chunked") {
        return (status, &[]);
    }
    (status, &answer[split + 4..])
}
