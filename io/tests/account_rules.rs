//! Account hygiene over HTTP, against a running route: a minimum password length (8 by
//! default, configurable), names unique regardless of case and shown as typed, reserved
//! names, and bad bodies refused with 400 + 3000 in the API's words, never the parser's.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cim_core::accounts::PasswordParams;
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::tickets::TicketKeys;
use cim_io::clock::Clock;
use cim_io::http_client::HttpClient;
use cim_io::net::{Network, TokioNet};
use cim_io::registry::MemoryRegistry;
use cim_io::route::{self, RouteHandle, RouteOptions};
use cim_io::store::MemoryBackend;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

struct Route {
    handle: RouteHandle,
    http: HttpClient<TokioNet>,
    _registry: MemoryRegistry,
}

async fn start(configure: impl FnOnce(&mut RouteOptions)) -> Route {
    let keys = TicketKeys::new(1, b"ticket-secret-acct".to_vec());
    let mut o = RouteOptions::new(
        "r1",
        keys,
        b"bearer-secret-acct".to_vec(),
        b"link-secret-acct".to_vec(),
    );
    o.http_listen = "127.0.0.1:0".parse().unwrap();
    o.login.password = PasswordParams::for_tests();
    // Every request of these tests comes from 127.0.0.1: the per-address limits (tested in
    // route_limits.rs) would refuse the registrations this file is about.
    o.login_per_address = route::RateLimit::OFF;
    o.register_per_address = route::RateLimit::OFF;
    configure(&mut o);
    let store = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
    let registry = MemoryRegistry::new();
    let handle = route::start(TokioNet, Clock::System, o, store, &registry)
        .await
        .expect("route starts");
    let http = HttpClient::new(TokioNet, "127.0.0.1", handle.http_addr().port(), WAIT);
    Route {
        handle,
        http,
        _registry: registry,
    }
}

impl Route {
    async fn post_raw(&self, path: &str, raw: &str) -> (StatusCode, Value) {
        let (status, body) = self
            .http
            .request(Method::POST, path, None, Some(Bytes::from(raw.to_owned())))
            .await
            .expect("answered");
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body:?}"));
        (status, value)
    }

    async fn register(&self, name: &str, password: &str) -> Value {
        let body = json!({"userName": name, "password": password}).to_string();
        let (status, v) = self.post_raw("/registerAccount", &body).await;
        // Success is 200; a name or password breaking the rules is a 400, a taken name a
        // 409 (both code 3000: never 200 with 3000).
        let want = match (v["code"].as_str(), v["message"].as_str()) {
            (Some("9000"), _) => StatusCode::OK,
            (Some("3000"), Some(m)) if m.contains("taken") => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        };
        assert_eq!(status, want, "{name:?}: {v}");
        v
    }
}

fn refused(v: &Value, message: &str) {
    assert_eq!(v["code"], "3000", "{v}");
    assert_eq!(v["message"], message, "{v}");
}

#[tokio::test]
async fn passwords_have_a_minimum_length_of_8_by_default() {
    let route = start(|_| {}).await;
    for short in ["p", "1234567", "ééééééé"] {
        let v = route.register("ann", short).await;
        refused(&v, "password must be at least 8 characters");
    }
    refused(
        &route.register("ann", "").await,
        "password must not be empty",
    );
    let v = route.register("ann", "12345678").await;
    assert_eq!(v["code"], "9000", "{v}");
    route.handle.abort();

    let lenient = start(|o| o.login.min_password_len = 2).await;
    assert_eq!(lenient.register("ann", "pw").await["code"], "9000");
    refused(
        &lenient.register("bob", "p").await,
        "password must be at least 2 characters",
    );
    lenient.handle.abort();
}

#[tokio::test]
async fn names_are_unique_regardless_of_case_shown_as_typed_and_all_is_reserved() {
    let route = start(|_| {}).await;
    let v = route.register("Bob", "bobs-password").await;
    assert_eq!(v["code"], "9000", "{v}");
    assert_eq!(v["dataBody"]["userName"], "Bob");
    let bob = v["dataBody"]["userId"].as_u64().unwrap();
    for other in ["bob", "BOB", "bOB"] {
        let v = route.register(other, "another-password").await;
        assert_eq!(v["code"], "3000", "{other}: {v}");
        assert!(v.get("dataBody").is_none_or(Value::is_null), "{v}");
    }
    // Bob still logs in as typed; his name is shown as he typed it.
    let login = json!({"userId": bob, "userName": "Bob", "password": "bobs-password"});
    let (status, v) = route.post_raw("/login", &login.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    // No server is live in this test: the password was right, the placement failed.
    assert_eq!(v["code"], "7100", "{v}");
    // Login ignores the name's case too, and id 0 logs in by name alone (a client that
    // lost its state). 7100: the account and password were right; 9100: they were not.
    for (user, name, password, code) in [
        (bob, "bob", "bobs-password", "7100"),
        (bob, "BOB", "bobs-password", "7100"),
        (0, "bOb", "bobs-password", "7100"),
        (0, "bob", "wrong-password", "9100"),
        (0, "nobody", "bobs-password", "9100"),
        (bob + 1, "bob", "bobs-password", "9100"),
    ] {
        let login = json!({"userId": user, "userName": name, "password": password});
        let (_, v) = route.post_raw("/login", &login.to_string()).await;
        assert_eq!(v["code"], code, "{user} {name} {password}: {v}");
    }

    for reserved in ["all", "ALL", "All", "aLl"] {
        refused(
            &route.register(reserved, "a-long-password").await,
            "user name \"all\" is reserved",
        );
    }
    for odd in [
        " bob", "bob ", "b\u{0}b", "g:rust", "p:1:2", "@bob", "bob\n", "Ｂob",
    ] {
        refused(
            &route.register(odd, "a-long-password").await,
            "user names may only contain A-Z a-z 0-9 _ - .",
        );
    }
    assert_eq!(
        route.register("all-hands", "a-long-password").await["code"],
        "9000"
    );
    route.handle.abort();
}

#[tokio::test]
async fn bad_bodies_are_400_3000_in_the_apis_words() {
    let route = start(|_| {}).await;
    let cases: &[(&str, &str, &str)] = &[
        (
            "/registerAccount",
            r#"{"userName": "ann"}"#,
            "missing field password",
        ),
        (
            "/registerAccount",
            r#"{"userName": 5, "password": "a-long-password"}"#,
            "userName must be a string, not 5",
        ),
        (
            "/registerAccount",
            r#"{"userName": "ann", "password": "a-long-password", "admin": true}"#,
            "unknown field admin (the fields are userName, password)",
        ),
        (
            "/registerAccount",
            "[]",
            "the body must be a JSON object, not a list",
        ),
        (
            "/registerAccount",
            r#"["ann", "a-long-password"]"#,
            "the body must be a JSON object, not a list",
        ),
        (
            "/registerAccount",
            "{not json",
            "the body is not valid JSON (line 1, column 2)",
        ),
        (
            "/registerAccount",
            "",
            "the body is not valid JSON: it ends too early",
        ),
        (
            "/registerAccount",
            r#"{"userName": "ann", "password": "a-long-password"} trailing"#,
            "the body has more after its JSON value",
        ),
        (
            "/login",
            r#"{"userId": "one", "userName": "a", "password": "b"}"#,
            "userId must be a whole number, not a string",
        ),
        (
            "/login",
            r#"{"userId": -1}"#,
            "userId must be a whole number, not -1",
        ),
    ];
    for (path, raw, message) in cases {
        let (status, v) = route.post_raw(path, raw).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{raw}: {v}");
        refused(&v, message);
    }
    // Not JSON at all.
    let mut stream = TokioNet
        .dial("127.0.0.1".into(), route.handle.http_addr().port())
        .await
        .unwrap();
    let body = r#"{"userName": "ann", "password": "a-long-password"}"#;
    let request = format!(
        "POST /registerAccount HTTP/1.1\r\nhost: r\r\ncontent-type: text/plain\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer
            .contains(r#""message":"send the body as JSON, with Content-Type: application/json""#),
        "{answer}"
    );
    route.handle.abort();
}

#[test]
fn the_openapi_document_states_the_same_rules() {
    let doc = cim_io::route::openapi_document();
    let schema = &doc["paths"]["/registerAccount"]["post"]["requestBody"]["content"]["application/json"]
        ["schema"]["properties"];
    assert_eq!(
        schema["password"]["minLength"],
        cim_core::accounts::DEFAULT_MIN_PASSWORD_LEN
    );
    assert_eq!(
        schema["userName"]["maxLength"],
        cim_core::accounts::MAX_NAME_LEN
    );
    assert_eq!(schema["userName"]["pattern"], "^[A-Za-z0-9_.-]+$");
    let says = schema["userName"]["description"].as_str().unwrap();
    assert!(says.contains("regardless of case") && says.contains("`all` is reserved"));
}
