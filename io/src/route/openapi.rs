//! The OpenAPI 3 document served at `/openapi.json`, written by hand from `crate::api`'s
//! types (a generator would be another dependency for one static document).
//!
//! The document and the server must agree exactly: whatever the document forbids, the
//! route refuses with 400 + 3000, and whatever it allows, the route does not refuse as
//! invalid. The patterns below are stated once and checked by the route with functions of
//! the same meaning ([`conv_well_formed`], core's id and name parsers); this module's tests
//! hold each pattern against its function, `io/tests/api_contract.rs` holds the served
//! document against the route, and CI runs schemathesis against `cim up`.
//!
//! Lengths are in characters, as JSON Schema's `maxLength` counts them: a password has at
//! most 128 characters, and a message sent over HTTP at most a quarter of `--max-body`
//! characters, so that any such text fits the store's limit in bytes (UTF-8 takes up to 4
//! bytes a character). A limit in bytes could not be stated, so the document and the
//! route would disagree on texts that are short in characters but long in bytes.

use cim_core::accounts::{
    DEFAULT_MIN_PASSWORD_LEN, MAX_NAME_LEN, MAX_PASSWORD_LEN, RESERVED_NAMES,
};
use cim_core::history::{DEFAULT_LIMIT as DEFAULT_HISTORY, MAX_LIMIT as MAX_HISTORY};
use cim_core::ids::MAX_GROUP_NAME;
use cim_core::route::delivery::DeliveryConfig;
use serde_json::{Value, json};

use super::RouteOptions;
use crate::api::{MAX_ID, MAX_USER_NAMES};

/// A client message id: UUID text, hex digits of either case, dashes at 8-4-4-4-12
/// (`ClientMsgId::from_str`).
pub(crate) const CLIENT_MSG_ID_PATTERN: &str =
    "^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$";
/// A group name (`ConvId::group`), besides not being `all`.
pub(crate) const GROUP_NAME_PATTERN: &str = "^[A-Za-z0-9._-]{1,64}$";
/// A user name at registration (`accounts::validate_registration`), besides its length and
/// the reserved names.
pub(crate) const USER_NAME_PATTERN: &str = "^[A-Za-z0-9_.-]+$";
/// A resume token: 32 bytes as unpadded URL-safe base64, 43 characters whose last one
/// carries 4 bits (its 2 spare bits zero), so every token has one spelling.
pub(crate) const RESUME_TOKEN_PATTERN: &str = "^[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]$";
/// `conv` of `/history` as text: `all`, `g:<group name>` (not `g:all`), or `p:<a>:<b>` with
/// ids in canonical decimal (no sign, no leading zero, at most 19 digits). Which `p:` pairs
/// name a conversation (a < b) is the route's to say (404), not the pattern's.
pub(crate) const CONV_PATTERN: &str =
    "^(all|g:[A-Za-z0-9._-]{1,64}|p:(0|[1-9][0-9]{0,18}):(0|[1-9][0-9]{0,18}))$";

/// Whether `text` matches [`CONV_PATTERN`] and is not `g:all`: the route answers 400
/// otherwise.
pub(crate) fn conv_well_formed(text: &str) -> bool {
    fn canonical_id(x: &str) -> bool {
        (1..=19).contains(&x.len())
            && x.bytes().all(|b| b.is_ascii_digit())
            && (x == "0" || !x.starts_with('0'))
    }
    if text == "all" {
        return true;
    }
    if let Some(name) = text.strip_prefix("g:") {
        return cim_core::ids::ConvId::group(name).is_ok();
    }
    text.strip_prefix("p:")
        .and_then(|pair| pair.split_once(':'))
        .is_some_and(|(a, b)| canonical_id(a) && canonical_id(b))
}

/// What the document says that a route's options set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DocSettings {
    /// `--min-password-len`.
    pub min_password_len: usize,
    /// `--max-body`: the longest message body, in bytes.
    pub max_body: usize,
}

impl Default for DocSettings {
    fn default() -> Self {
        Self {
            min_password_len: DEFAULT_MIN_PASSWORD_LEN,
            max_body: DeliveryConfig::default().max_body,
        }
    }
}

/// The most characters of a message sent over HTTP with this `--max-body` (bytes): any
/// text this long fits in the bytes, so the route never refuses what the document allows.
pub(crate) fn max_msg_chars(max_body: usize) -> usize {
    max_body / 4
}

impl DocSettings {
    pub(crate) fn of(options: &RouteOptions) -> Self {
        Self {
            min_password_len: options.login.min_password_len,
            max_body: options.delivery.max_body,
        }
    }
}

fn envelope(data: Value) -> Value {
    json!({
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "description": "9000 success, 4000 fail, 3000 validation fail, 5000 repeat login, 7100 no server available, 9100 account mismatch, 9110 resumption refused (log in with the password), 4290 throttled (HTTP 429), 4500 busy (HTTP 503)"},
            "message": {"type": "string"},
            "dataBody": data
        }
    })
}

fn op(summary: &str, bearer: bool, request: Option<Value>, data: Value, params: Value) -> Value {
    let mut op = json!({
        "summary": summary,
        "responses": {
            "200": {"description": "An envelope; `code` says whether it succeeded",
                    "content": {"application/json": {"schema": envelope(data)}}},
            "400": {"description": "A request this document forbids (code 3000): malformed JSON, a missing, unknown or null field, a wrong type, a number out of its range, a string breaking its pattern or length, a query parameter likewise, or a body not sent as Content-Type: application/json. The message names the JSON field, e.g. \"missing field userName\", \"userId must be a whole number, not a string\". Code 3000 is never answered with 200.",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}},
            "401": {"description": "Missing or bad bearer token, or one whose session ended (logged out, taken over, a newer login)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}},
            "403": {"description": "userId is not the token's user, or not a member",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}},
            "408": {"description": "The request body did not arrive in time (code 3000)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}},
            "413": {"description": "Body over 64 KiB",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}}
        }
    });
    if bearer {
        op["security"] = json!([{"bearer": []}]);
    }
    if let Some(schema) = request {
        op["requestBody"] = json!({
            "required": true,
            "content": {"application/json": {"schema": schema}}
        });
    }
    if params.as_array().is_some_and(|p| !p.is_empty()) {
        op["parameters"] = params;
    }
    op
}

/// The answers of a limited operation: 429 (throttled) and, where passwords are checked,
/// 503 (busy), each with `Retry-After`.
fn limited(mut op: Value, busy: bool) -> Value {
    let retry_after = json!({"Retry-After": {"description": "Seconds to wait before retrying",
                                             "schema": {"type": "integer", "minimum": 1}}});
    op["responses"]["429"] = json!({
        "description": "Throttled (code 4290): failed logins at the account, requests per client address, or sends per user over their limit; nothing was done",
        "headers": retry_after.clone(),
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}
    });
    if busy {
        op["responses"]["503"] = json!({
            "description": "Busy (code 4500): the route's password checks are all taken; nothing was done",
            "headers": retry_after,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}
        });
    }
    op
}

/// One more documented answer (an envelope) of an operation.
fn with_response(mut op: Value, status: &str, description: &str) -> Value {
    op["responses"][status] = json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Envelope"}}}
    });
    op
}

fn object(required: &[&str], properties: Value) -> Value {
    json!({"type": "object", "additionalProperties": false, "required": required, "properties": properties})
}

fn query(name: &str, required: bool, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": required, "schema": schema, "description": description})
}

/// The whole document, for a route with the default options.
pub fn openapi_document() -> Value {
    document(DocSettings::default())
}

/// The document a route with these options serves (its password and message limits).
pub fn openapi_document_for(options: &RouteOptions) -> Value {
    document(DocSettings::of(options))
}

fn document(settings: DocSettings) -> Value {
    let s = || json!({"type": "string"});
    // Ids and sequence numbers: JSON int64 from 0 (see `api::MAX_ID`).
    let u = || json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": MAX_ID});
    let port = || json!({"type": "integer", "minimum": 0, "maximum": 65535});
    let none = || json!([]);
    let client_msg_id = || {
        json!({"type": "string", "format": "uuid", "pattern": CLIENT_MSG_ID_PATTERN,
               "description": "UUID text (hex digits of either case, dashes at 8-4-4-4-12); a resend with the same id is stored once"})
    };
    let msg = || {
        json!({"type": "string", "maxLength": max_msg_chars(settings.max_body),
               "description": format!("The message text: at most {} characters, a quarter of the route's --max-body ({} bytes), so that any text of that length fits in UTF-8", max_msg_chars(settings.max_body), settings.max_body)})
    };
    let group_name = || {
        json!({"type": "string", "pattern": GROUP_NAME_PATTERN, "maxLength": MAX_GROUP_NAME,
               "not": {"enum": ["all"]},
               "description": "1 to 64 of A-Z a-z 0-9 . _ -; `all` is the built-in group, never a group's name"})
    };
    // The same, optional: `null` is taken as left out (older SDKs sent it so).
    let mut optional_group_name = group_name();
    optional_group_name["nullable"] = json!(true);
    optional_group_name["description"] = json!(
        "The group; left out or null for `all`. 1 to 64 of A-Z a-z 0-9 . _ -, never `all` itself"
    );
    let reserved: Vec<Value> = RESERVED_NAMES
        .iter()
        .map(|name| {
            let any_case: String = name
                .chars()
                .map(|c| format!("[{}{}]", c.to_ascii_uppercase(), c.to_ascii_lowercase()))
                .collect();
            json!({"pattern": format!("^{any_case}$")})
        })
        .collect();
    let send_response = object(
        &["conv", "logEpoch", "seq"],
        json!({"conv": s(), "logEpoch": s(), "seq": u(), "online": {"type": "boolean"}}),
    );
    let group_request = object(
        &["userId", "groupName"],
        json!({"userId": u(), "groupName": group_name()}),
    );
    let health = json!({"type": "object", "required": ["status"], "properties": {
        "status": {"type": "string"}, "failing": {"type": "array", "items": s()}}});
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "CIM route API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Register, log in, route messages. Every answer is the envelope {code, message, dataBody}. Binary fields are unpadded URL-safe base64; clientMsgId is a UUID. A connection past the route's connection cap is answered 503 and closed; one that does not send a complete request head within the header timeout (10 s by default), or stays idle past the idle timeout (60 s), is closed; a request body that does not arrive in full within the header timeout after its head is answered 408 (code 3000)."
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Envelope": envelope(json!({}))}
        },
        "paths": {
            "/registerAccount": {"post": limited(with_response(op("Create an account (a name or password breaking the rules below is a 400; a taken name is a 409; both code 3000)", false,
                Some(object(&["userName", "password"], json!({
                    "userName": {"type": "string", "minLength": 1, "maxLength": MAX_NAME_LEN,
                        "pattern": USER_NAME_PATTERN,
                        "not": {"anyOf": reserved},
                        "description": "Unique regardless of case (Bob and bob are one name), shown as typed. `all` is reserved, in any case."},
                    "password": {"type": "string", "minLength": settings.min_password_len.max(1), "maxLength": MAX_PASSWORD_LEN,
                        "description": format!("At least {} characters (the route's --min-password-len), at most {MAX_PASSWORD_LEN} characters", settings.min_password_len.max(1))}}))),
                object(&["userId", "userName"], json!({"userId": u(), "userName": s()})), none()),
                "409", "The name is taken, regardless of case (code 3000)"), true)},
            "/login": {"post": limited(op("Log in: a server, a ticket for it, a bearer token, a resume token and a resumption secret. With the password, or by resumption: the resumeToken and resumeSecret of the last login, checked instead of the password (code 9110 when refused: log in with the password)", false,
                Some(object(&["userId", "userName"],
                    json!({"userId": u(), "userName": s(),
                           "password": {"type": "string", "description": "Required for a login by password; a resumption may leave it out. A login with neither is code 9100"},
                           "resumeToken": {"type": "string", "nullable": true, "pattern": RESUME_TOKEN_PATTERN,
                               "description": "The resumeToken of an earlier login (32 bytes, unpadded URL-safe base64); left out or null for none"},
                           "resumeSecret": {"type": "string", "nullable": true, "pattern": RESUME_TOKEN_PATTERN,
                               "description": "The resumeSecret of the login whose resumeToken is presented (32 bytes, unpadded URL-safe base64): a resumption, no password checked. Good once; refused (code 9110) when used, revoked (logout, password change, account deletion, admin revoke) or expired. Left out or null for a login by password"}}))),
                object(&["userId", "epoch", "serverId", "ip", "cimServerPort", "httpPort", "ticket", "token", "resumeToken", "resumeSecret"],
                    json!({"userId": u(), "epoch": u(), "serverId": s(),
                           "endpoint": object(&["host", "port", "tls"], json!({"host": s(), "port": port(), "tls": {"type": "boolean"},
                               "wsUrl": {"type": "string", "pattern": "^wss?://",
                                   "description": "The same server's WebSocket gateway (one binary message per cim.v1.Frame; wss:// when tls); absent when it has none"}})),
                           "ip": s(), "cimServerPort": port(), "httpPort": port(),
                           "ticket": s(), "token": s(), "resumeToken": s(),
                           "resumeSecret": {"type": "string", "description": "The next resumption secret: with resumeToken, the next login needs no password. Keep it private; it is shown once"}})), none()), true)},
            "/offLine": {"post": op("End the token's session", true,
                Some(object(&["userId"], json!({"userId": u()}))), json!({}), none())},
            "/onlineUser": {"get": op("Users online now", true, None,
                json!({"type": "array", "items": object(&["userId", "userName", "serverId"],
                    json!({"userId": u(), "userName": s(), "serverId": s()}))}), none())},
            "/userNames": {"post": op("Names of user ids (at most 100; unknown ids left out)", true,
                Some(object(&["userIds"], json!({"userIds": {"type": "array", "maxItems": MAX_USER_NAMES, "items": u()}}))),
                object(&["users"], json!({"users": {"type": "array", "items": object(&["userId", "userName"],
                    json!({"userId": u(), "userName": s()}))}})), none())},
            "/groupRoute": {"post": limited(op("Send to a group (`all` when groupName is left out)", true,
                Some(object(&["userId", "msg", "clientMsgId"],
                    json!({"userId": u(), "msg": msg(), "clientMsgId": client_msg_id(), "groupName": optional_group_name}))),
                send_response.clone(), none()), false)},
            "/p2pRoute": {"post": limited(with_response(op("Send to one user; online says whether they have a session. An id without an account is code 4000", true,
                Some(object(&["userId", "receiveUserId", "msg", "clientMsgId"],
                    json!({"userId": u(), "receiveUserId": u(), "msg": msg(), "clientMsgId": client_msg_id()}))),
                send_response, none()), "404", "receiveUserId is the sender: there is no private conversation with oneself (code 4000)"), false)},
            "/group/create": {"post": op("Create a group (the caller is its first member)", true, Some(group_request.clone()), json!({}), none())},
            "/group/join": {"post": op("Join a group (history visible from now)", true, Some(group_request.clone()), json!({}), none())},
            "/group/leave": {"post": op("Leave a group", true, Some(group_request), json!({}), none())},
            "/group/list": {"get": op("The caller's groups", true, None,
                object(&["groups"], json!({"groups": {"type": "array", "items": s()}})), none())},
            "/history": {"get": with_response(op("Messages below beforeSeq, oldest first (members only: 403 otherwise)", true, None,
                object(&["conv", "logEpoch", "headSeq", "firstAvailableSeq", "messages"],
                    json!({"conv": s(), "logEpoch": s(), "headSeq": u(), "firstAvailableSeq": u(),
                           "messages": {"type": "array", "items": object(
                               &["seq", "senderId", "clientMsgId", "msg", "sentAtMs"],
                               json!({"seq": u(), "senderId": u(), "clientMsgId": s(), "msg": s(), "sentAtMs": u()}))}})),
                json!([
                    query("conv", true, json!({"type": "string", "pattern": CONV_PATTERN, "not": {"enum": ["g:all"]}}),
                        "all, g:<group name> or p:<low id>:<high id> (ids in decimal, the lower first)"),
                    query("beforeSeq", false, u(), "only messages below this seq (default: the newest)"),
                    query("limit", false, json!({"type": "integer", "minimum": 1, "maximum": MAX_HISTORY}),
                        &format!("at most {MAX_HISTORY} (default {DEFAULT_HISTORY})"))
                ])), "404", "conv is p:<a>:<b> with a not below b: there is no such conversation (code 4000)")},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3 document"}}}},
            "/health": {"get": {"summary": "Store and registry health", "responses": {
                "200": {"description": "{\"status\":\"ok\"}", "content": {"application/json": {"schema": health.clone()}}},
                "503": {"description": "{\"status\":\"degraded\",\"failing\":[...]}", "content": {"application/json": {"schema": health}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (cim_route_*)", "responses": {
                "200": {"description": "Prometheus text format", "content": {"text/plain": {}}}}}}
        }
    })
}

#[cfg(test)]
mod tests {
    //! Each pattern of the document against the function the route checks with: every
    //! string the pattern generates passes the check, and over strings from a nearby
    //! alphabet the two agree exactly (so neither admits what the other refuses).

    use std::str::FromStr;

    use cim_core::accounts::validate_registration;
    use cim_core::ids::{ClientMsgId, ConvId};
    use proptest::prelude::*;
    use regex::Regex;

    use super::*;
    use crate::api::decode_resume_token;

    /// A pattern's strings, for proptest (which takes no anchors; the patterns are all
    /// anchored at both ends).
    fn strings_of(pattern: &str) -> proptest::string::RegexGeneratorStrategy<String> {
        let inner = pattern.strip_prefix('^').and_then(|p| p.strip_suffix('$'));
        proptest::string::string_regex(inner.expect("anchored at both ends")).unwrap()
    }

    fn matches(pattern: &str, text: &str) -> bool {
        Regex::new(pattern).unwrap().is_match(text)
    }

    fn user_name_ok(name: &str) -> bool {
        validate_registration(name, "a-long-enough-password", DEFAULT_MIN_PASSWORD_LEN).is_ok()
    }

    fn user_name_documented(name: &str) -> bool {
        let reserved = RESERVED_NAMES
            .iter()
            .any(|reserved| reserved.eq_ignore_ascii_case(name));
        matches(USER_NAME_PATTERN, name) && name.chars().count() <= MAX_NAME_LEN && !reserved
    }

    fn msg_id_ok(text: &str) -> bool {
        ClientMsgId::from_str(text).is_ok()
    }

    fn group_ok(name: &str) -> bool {
        ConvId::group(name).is_ok()
    }

    fn group_documented(name: &str) -> bool {
        matches(GROUP_NAME_PATTERN, name) && name != "all"
    }

    fn conv_documented(text: &str) -> bool {
        matches(CONV_PATTERN, text) && text != "g:all"
    }

    fn resume_ok(text: &str) -> bool {
        decode_resume_token(text).is_ok()
    }

    /// Strings near the patterns: their characters, a few that break them, and a newline
    /// (`$` in some regex dialects also matches before a final one).
    fn near(alphabet: &'static str, len: usize) -> impl Strategy<Value = String> {
        let chars: Vec<char> = alphabet.chars().collect();
        proptest::collection::vec(proptest::sample::select(chars), 0..len)
            .prop_map(|v| v.into_iter().collect())
    }

    /// A string the pattern generates with one character replaced, dropped or added.
    fn mutated(pattern: &'static str, alphabet: &'static str) -> impl Strategy<Value = String> {
        let chars: Vec<char> = alphabet.chars().collect();
        (
            strings_of(pattern),
            any::<proptest::sample::Index>(),
            proptest::sample::select(chars),
            0..3u8,
        )
            .prop_map(|(valid, at, c, how)| {
                let mut v: Vec<char> = valid.chars().collect();
                let i = at.index(v.len() + 1);
                match how {
                    0 if i < v.len() => v[i] = c,
                    1 if i < v.len() => {
                        v.remove(i);
                    }
                    _ => v.insert(i, c),
                }
                v.into_iter().collect()
            })
    }

    #[test]
    fn the_tables_of_known_cases() {
        for (text, want) in [
            ("all", true),
            ("g:rust", true),
            ("g:all", false),
            ("g:All", true),
            ("g:", false),
            ("p:1:2", true),
            ("p:0:9223372036854775807", true),
            ("p:2:1", true), // well-formed; names no conversation (404)
            ("p:01:2", false),
            ("p:+1:2", false),
            ("p:1:22222222222222222222", false),
            ("all\n", false),
            ("p:1", false),
            ("x", false),
        ] {
            assert_eq!(conv_well_formed(text), want, "{text:?}");
            assert_eq!(conv_documented(text), want, "{text:?}");
        }
        // A token's last character carries 4 bits: exactly these 16 of the 64 decode.
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for last in alphabet.chars() {
            let token = format!("{}{last}", "A".repeat(42));
            assert_eq!(
                resume_ok(&token),
                matches(RESUME_TOKEN_PATTERN, &token),
                "{token}"
            );
        }
        for name in [
            "all",
            "ALL",
            "aLl",
            "a",
            "bob.smith-2_x",
            "",
            "bob smith",
            "é",
        ] {
            assert_eq!(user_name_ok(name), user_name_documented(name), "{name:?}");
        }
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert!(!user_name_ok(&long) && !user_name_documented(&long));
    }

    proptest! {
        #[test]
        fn generated_by_the_pattern_means_accepted_by_the_route(
            conv in strings_of(CONV_PATTERN),
            group in strings_of(GROUP_NAME_PATTERN),
            id in strings_of(CLIENT_MSG_ID_PATTERN),
            token in strings_of(RESUME_TOKEN_PATTERN),
            name in strings_of("^[A-Za-z0-9_.-]{1,32}$"),
        ) {
            prop_assert_eq!(conv_well_formed(&conv), conv != "g:all", "{:?}", conv);
            prop_assert_eq!(group_ok(&group), group != "all", "{:?}", group);
            prop_assert!(msg_id_ok(&id), "{:?}", id);
            prop_assert!(resume_ok(&token), "{:?}", token);
            prop_assert_eq!(user_name_ok(&name), user_name_documented(&name), "{:?}", name);
        }

        #[test]
        fn near_misses_are_judged_alike(
            conv in near("alg:p0123456789x-_.\n+", 14),
            group in near("alAL09._- \n/", 8),
            id in mutated(CLIENT_MSG_ID_PATTERN, "0aFg-\n "),
            token in mutated(RESUME_TOKEN_PATTERN, "AEIMBaz09-_=+/\n"),
            conv2 in mutated(CONV_PATTERN, "alg:p019-_.\n+ "),
            name in near("alAL09_.- \n@é", 6),
        ) {
            prop_assert_eq!(conv_well_formed(&conv), conv_documented(&conv), "{:?}", conv);
            prop_assert_eq!(conv_well_formed(&conv2), conv_documented(&conv2), "{:?}", conv2);
            prop_assert_eq!(group_ok(&group), group_documented(&group), "{:?}", group);
            prop_assert_eq!(msg_id_ok(&id), matches(CLIENT_MSG_ID_PATTERN, &id), "{:?}", id);
            prop_assert_eq!(resume_ok(&token), matches(RESUME_TOKEN_PATTERN, &token), "{:?}", token);
            prop_assert_eq!(user_name_ok(&name), user_name_documented(&name), "{:?}", name);
        }
    }
}
