//! The OpenAPI 3 document served at `/openapi.json`, written by hand from `crate::api`'s
//! types (a generator would be another dependency for one static document).

use serde_json::{Value, json};

fn envelope(data: Value) -> Value {
    json!({
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "description": "9000 success, 4000 fail, 3000 validation fail, 5000 repeat login, 7100 no server available, 9100 account mismatch, 4290 throttled (HTTP 429), 4500 busy (HTTP 503)"},
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
            "400": {"description": "Malformed JSON, missing fields, wrong types, unknown fields, or a body not sent as Content-Type: application/json (code 3000); the message names the JSON field, e.g. \"missing field userName\", \"userId must be a whole number, not a string\"",
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

fn object(required: &[&str], properties: Value) -> Value {
    json!({"type": "object", "additionalProperties": false, "required": required, "properties": properties})
}

fn query(name: &str, required: bool, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "required": required, "schema": schema, "description": description})
}

/// The whole document.
pub fn openapi_document() -> Value {
    let s = || json!({"type": "string"});
    let u = || json!({"type": "integer", "format": "int64", "minimum": 0});
    let none = || json!([]);
    let send_response = object(
        &["conv", "logEpoch", "seq"],
        json!({"conv": s(), "logEpoch": s(), "seq": u(), "online": {"type": "boolean"}}),
    );
    let group_request = object(
        &["userId", "groupName"],
        json!({"userId": u(), "groupName": s()}),
    );
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
            "/registerAccount": {"post": limited(op("Create an account (a taken name is an error, code 3000, and so is a name or password breaking the rules below)", false,
                Some(object(&["userName", "password"], json!({
                    "userName": {"type": "string", "minLength": 1, "maxLength": 32,
                        "pattern": "^[A-Za-z0-9_.-]+$",
                        "description": "Unique regardless of case (Bob and bob are one name), shown as typed. `all` is reserved, in any case."},
                    "password": {"type": "string", "minLength": 8,
                        "description": "At least 8 characters by default (the route's --min-password-len), at most 128 bytes."}}))),
                object(&["userId", "userName"], json!({"userId": u(), "userName": s()})), none()), true)},
            "/login": {"post": limited(op("Log in: a server, a ticket for it, a bearer token, a resume token", false,
                Some(object(&["userId", "userName", "password"],
                    json!({"userId": u(), "userName": s(), "password": s(), "resumeToken": s()}))),
                object(&["userId", "epoch", "serverId", "ip", "cimServerPort", "httpPort", "ticket", "token", "resumeToken"],
                    json!({"userId": u(), "epoch": u(), "serverId": s(), "ip": s(),
                           "cimServerPort": {"type": "integer"}, "httpPort": {"type": "integer"},
                           "ticket": s(), "token": s(), "resumeToken": s()})), none()), true)},
            "/offLine": {"post": op("End the token's session", true,
                Some(object(&["userId"], json!({"userId": u()}))), json!({}), none())},
            "/onlineUser": {"get": op("Users online now", true, None,
                json!({"type": "array", "items": object(&["userId", "userName", "serverId"],
                    json!({"userId": u(), "userName": s(), "serverId": s()}))}), none())},
            "/userNames": {"post": op("Names of user ids (at most 100; unknown ids left out)", true,
                Some(object(&["userIds"], json!({"userIds": {"type": "array", "maxItems": 100, "items": u()}}))),
                object(&["users"], json!({"users": {"type": "array", "items": object(&["userId", "userName"],
                    json!({"userId": u(), "userName": s()}))}})), none())},
            "/groupRoute": {"post": limited(op("Send to a group (`all` without groupName)", true,
                Some(object(&["userId", "msg", "clientMsgId"],
                    json!({"userId": u(), "msg": s(), "clientMsgId": {"type": "string", "format": "uuid"}, "groupName": s()}))),
                send_response.clone(), none()), false)},
            "/p2pRoute": {"post": limited(op("Send to one user; online says whether they have a session", true,
                Some(object(&["userId", "receiveUserId", "msg", "clientMsgId"],
                    json!({"userId": u(), "receiveUserId": u(), "msg": s(), "clientMsgId": {"type": "string", "format": "uuid"}}))),
                send_response, none()), false)},
            "/group/create": {"post": op("Create a group (the caller is its first member)", true, Some(group_request.clone()), json!({}), none())},
            "/group/join": {"post": op("Join a group (history visible from now)", true, Some(group_request.clone()), json!({}), none())},
            "/group/leave": {"post": op("Leave a group", true, Some(group_request), json!({}), none())},
            "/group/list": {"get": op("The caller's groups", true, None,
                object(&["groups"], json!({"groups": {"type": "array", "items": s()}})), none())},
            "/history": {"get": op("Messages below beforeSeq, oldest first (members only)", true, None,
                object(&["conv", "logEpoch", "headSeq", "firstAvailableSeq", "messages"],
                    json!({"conv": s(), "logEpoch": s(), "headSeq": u(), "firstAvailableSeq": u(),
                           "messages": {"type": "array", "items": object(
                               &["seq", "senderId", "clientMsgId", "msg", "sentAtMs"],
                               json!({"seq": u(), "senderId": u(), "clientMsgId": s(), "msg": s(), "sentAtMs": u()}))}})),
                json!([
                    query("conv", true, s(), "all, g:<name> or p:<low>:<high>"),
                    query("beforeSeq", false, u(), "only messages below this seq (default: the newest)"),
                    query("limit", false, json!({"type": "integer", "minimum": 1, "maximum": 100}), "at most 100 (default 20)")
                ]))},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3 document"}}}},
            "/health": {"get": {"summary": "Store and registry health", "responses": {
                "200": {"description": "{\"status\":\"ok\"}"},
                "503": {"description": "{\"status\":\"degraded\",\"failing\":[...]}"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (cim_route_*)", "responses": {
                "200": {"description": "Prometheus text format", "content": {"text/plain": {}}}}}}
        }
    })
}
