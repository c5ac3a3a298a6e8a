//! What an HTTP client sends the route, below the router: every JSON body type of
//! `cim_io::api` (requests, and the answers the SDK parses), the binary fields carried as
//! base64 (ticket, resume token), and the ids parsed from text (conversation ids, client
//! message ids, group names).
//!
//! The router around them (status codes, tokens, query strings) is `http_route`'s; this
//! target reaches the parsers directly, far faster.
//!
//! Input: `<kind>\n<payload>`, where kind names a body type or a field (`register`,
//! `login`, `ticket`, `conv`, ...; see [`KINDS`]); any other first line sends the whole
//! input to every parser.
//!
//! Invariants: no parser panics; whatever parses serialises and parses back to the same
//! value; ids and binary fields have one spelling (what parses prints back as the input,
//! modulo the case of a UUID's hex digits).

use cim_core::ids::{ClientMsgId, ConvId};
use cim_io::api::{
    self, Envelope, GroupList, GroupRequest, GroupRouteRequest, History, LoginRequest,
    LoginResponse, OfflineRequest, OnlineUser, P2pRouteRequest, RegisterRequest, RegisterResponse,
    SendResponse, UserNames, UserNamesRequest,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Reached;

pub const KINDS: &[&str] = &[
    "register",
    "login",
    "offline",
    "user_names",
    "group_route",
    "p2p_route",
    "group",
    "login_answer",
    "send_answer",
    "history_answer",
    "names_answer",
    "groups_answer",
    "online_answer",
    "register_answer",
    "ticket",
    "resume_token",
    "conv",
    "msg_id",
];

pub const FEATURES: &[&str] = &[
    "register",
    "login",
    "offline",
    "user_names",
    "group_route",
    "p2p_route",
    "group",
    "login_answer",
    "send_answer",
    "history_answer",
    "ticket",
    "resume_token",
    "conv",
    "msg_id",
    "rejected",
];

pub fn check(data: &[u8]) -> Reached {
    let mut reached = Reached::new();
    let (kind, payload) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&data[..0], data),
    };
    let kind = std::str::from_utf8(kind).unwrap_or("");
    if let Some(kind) = KINDS.iter().find(|k| **k == kind) {
        parse(kind, payload, &mut reached);
    } else {
        for kind in KINDS {
            parse(kind, data, &mut reached);
        }
    }
    reached
}

fn parse(kind: &'static str, payload: &[u8], reached: &mut Reached) {
    let ok = match kind {
        "register" => json::<RegisterRequest>(payload),
        "login" => json::<LoginRequest>(payload),
        "offline" => json::<OfflineRequest>(payload),
        "user_names" => json::<UserNamesRequest>(payload),
        "group_route" => json::<GroupRouteRequest>(payload),
        "p2p_route" => json::<P2pRouteRequest>(payload),
        "group" => json::<GroupRequest>(payload),
        "login_answer" => json::<Envelope<LoginResponse>>(payload),
        "send_answer" => json::<Envelope<SendResponse>>(payload),
        "history_answer" => json::<Envelope<History>>(payload),
        "names_answer" => json::<Envelope<UserNames>>(payload),
        "groups_answer" => json::<Envelope<GroupList>>(payload),
        "online_answer" => json::<Envelope<Vec<OnlineUser>>>(payload),
        "register_answer" => json::<Envelope<RegisterResponse>>(payload),
        "ticket" | "resume_token" | "conv" | "msg_id" => match std::str::from_utf8(payload) {
            Ok(text) => field(kind, text),
            Err(_) => false,
        },
        other => unreachable!("unknown kind {other}"),
    };
    reached.insert(if ok { kind } else { "rejected" });
}

/// Parses `T`; what parses must serialise and parse back to itself.
fn json<T>(payload: &[u8]) -> bool
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let Ok(value) = serde_json::from_slice::<T>(payload) else {
        return false;
    };
    let text = serde_json::to_vec(&value).expect("a parsed body serialises");
    let back: T = serde_json::from_slice(&text)
        .unwrap_or_else(|e| panic!("{value:?} does not parse back from its own JSON: {e}"));
    assert_eq!(back, value, "JSON round trip");
    true
}

fn field(kind: &str, text: &str) -> bool {
    match kind {
        "ticket" => {
            let Ok(ticket) = api::decode_ticket(text) else {
                return false;
            };
            let again = api::encode_ticket(&ticket);
            assert_eq!(api::decode_ticket(&again), Ok(ticket), "ticket round trip");
            true
        }
        "resume_token" => {
            let Ok(token) = api::decode_resume_token(text) else {
                return false;
            };
            assert_eq!(
                api::encode_resume_token(&token),
                text,
                "a resume token with two spellings"
            );
            true
        }
        "conv" => {
            if let Some(name) = text.strip_prefix("g:") {
                let group = ConvId::group(name);
                assert_eq!(group.is_ok(), text.parse::<ConvId>().is_ok());
            }
            let Ok(conv) = text.parse::<ConvId>() else {
                return false;
            };
            assert_eq!(
                conv.to_string(),
                text,
                "a conversation id with two spellings"
            );
            true
        }
        "msg_id" => {
            let Ok(id) = text.parse::<ClientMsgId>() else {
                return false;
            };
            assert_eq!(
                id.to_string(),
                text.to_ascii_lowercase(),
                "a message id that is not UUID text"
            );
            true
        }
        other => unreachable!("not a field: {other}"),
    }
}
