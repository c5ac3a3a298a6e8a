//! The route's HTTP API as data: every request and answer body, the envelope and the codes.
//! The route serves these types and the SDK sends them, so the two cannot drift apart.
//!
//! CIM's envelope is `{"code": "9000", "message": "...", "dataBody": ...}`; field names are
//! CIM's camelCase. Binary values travel as unpadded URL-safe base64: the login `ticket` is
//! the protobuf-encoded `cim.v1.Ticket`, the `resumeToken` its 32 bytes. Client message ids
//! are UUID text (the same 128 bits as on the wire).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use cim_core::registry::ServerEndpoint;
use cim_core::route::login::ResumeToken;
use cim_core::route::resumption::ResumptionSecret;

/// Success.
pub const CODE_OK: &str = "9000";
/// Failure (store unavailable, unknown receiver, not a member, ...).
pub const CODE_FAIL: &str = "4000";
/// Validation failure: malformed JSON, missing fields, wrong types, bad values.
pub const CODE_VALIDATION: &str = "3000";
/// The user is online elsewhere.
pub const CODE_REPEAT_LOGIN: &str = "5000";
/// No live server to send the user to.
pub const CODE_NO_SERVER: &str = "7100";
/// Unknown user, wrong name for the id or wrong password.
pub const CODE_ACCOUNT_MISMATCH: &str = "9100";
/// A resumption (`resumeToken` + `resumeSecret`) was refused: the secret was used, revoked
/// or has expired. Log in with the password.
pub use cim_core::route::login::CODE_RESUME_REFUSED;
/// A plain HTTP request on a listener that speaks HTTPS only (HTTP 400): use `https://`.
/// The listener answers it before any route handler, and closes the connection.
pub const CODE_HTTPS_REQUIRED: &str = "4260";
/// "4290", throttled (HTTP 429 with `Retry-After`): too many failed logins at the account,
/// too many logins or registrations from the client's address, or a user sending faster
/// than the per-user rate. "4500", busy (HTTP 503 with `Retry-After`): the route's
/// password checks are all taken (a burst of logins or registrations). Both change nothing:
/// retry after the delay.
pub use cim_core::route::login::{CODE_BUSY, CODE_THROTTLED};

/// Largest id the API takes (`userId`, `receiveUserId`, `userIds[]`, `beforeSeq`): ids are
/// JSON `int64` from 0, as the OpenAPI document says, so every client language holds them
/// in a signed 64-bit integer. The store hands out user ids from 1 upwards, so no account
/// ever has a larger one; a larger id in a request is refused (400), not looked up.
pub const MAX_ID: u64 = i64::MAX as u64;

/// Deserializes an id of the API: a whole number from 0 to [`MAX_ID`]. (A plain `u64`
/// would also take 2^63 .. 2^64-1, which the document forbids.)
pub fn id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let value = u64::deserialize(d)?;
    if value > MAX_ID {
        return Err(serde::de::Error::invalid_value(
            serde::de::Unexpected::Unsigned(value),
            &ID_RANGE,
        ));
    }
    Ok(value)
}

/// What an id must be, in the API's words (the 400's message names it).
const ID_RANGE: &str = "a whole number from 0 to 9223372036854775807";

/// A list of [`id`]s (the path of a bad item, `userIds[3]`, reaches the message).
pub fn ids<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    #[derive(Deserialize)]
    struct Id(#[serde(deserialize_with = "id")] u64);
    Ok(Vec::<Id>::deserialize(d)?
        .into_iter()
        .map(|Id(value)| value)
        .collect())
}

/// Every answer, success or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<T> {
    pub code: String,
    pub message: String,
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub data_body: Option<T>,
}

fn none<T>() -> Option<T> {
    None
}

impl<T> Envelope<T> {
    pub fn ok(data: T) -> Self {
        Self {
            code: CODE_OK.to_owned(),
            message: "success".to_owned(),
            data_body: Some(data),
        }
    }

    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            data_body: None,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.code == CODE_OK
    }
}

/// `POST /registerAccount`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegisterRequest {
    pub user_name: String,
    pub password: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegisterResponse {
    pub user_id: u64,
    pub user_name: String,
}

/// `POST /login`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoginRequest {
    #[serde(deserialize_with = "id")]
    pub user_id: u64,
    pub user_name: String,
    /// Required for a login by password; may be left out (or empty) by a resumption, which
    /// does not look at it. A login with neither is an account mismatch (9100).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
    /// Absent (or `null`, as this SDK sent it before, and the document says `nullable`)
    /// for a login without one; left out when sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<String>,
    /// The `resumeSecret` of the login whose `resumeToken` this request presents: a
    /// **resumption**, checked instead of the password (32 bytes, unpadded URL-safe
    /// base64). Absent or `null` for a login by password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_secret: Option<String>,
}

/// Where to connect and with what. `epoch` is the claim's epoch the ticket names.
/// `endpoint` is where to connect: the host the server's certificate is valid for, the
/// port, and whether to speak TLS; `ip` and `cimServerPort` repeat its host and port for
/// CIM's clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoginResponse {
    pub user_id: u64,
    pub epoch: u64,
    pub server_id: String,
    /// Absent from an older route's answer: then `ip` and `cimServerPort`, plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<ServerEndpoint>,
    pub ip: String,
    pub cim_server_port: u16,
    pub http_port: u16,
    pub ticket: String,
    pub token: String,
    pub resume_token: String,
    /// The next resumption secret, good once with `resumeToken` instead of the password.
    /// Absent from an older route's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_secret: Option<String>,
}

/// `POST /offLine` (bearer): ends the token's session. `userId` must be the token's user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OfflineRequest {
    #[serde(deserialize_with = "id")]
    pub user_id: u64,
}

/// One entry of `GET /onlineUser` (bearer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OnlineUser {
    pub user_id: u64,
    pub user_name: String,
    pub server_id: String,
}

/// Most ids one `POST /userNames` may ask for.
pub const MAX_USER_NAMES: usize = 100;

/// `POST /userNames` (bearer): the names of these user ids, for showing who sent a message.
/// At most [`MAX_USER_NAMES`] ids per request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UserNamesRequest {
    #[serde(deserialize_with = "ids")]
    pub user_ids: Vec<u64>,
}

/// The answer to `POST /userNames`: one entry per known id asked for, in the order asked
/// (duplicates once); ids without an account are left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserNames {
    pub users: Vec<UserName>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserName {
    pub user_id: u64,
    pub user_name: String,
}

/// `POST /groupRoute` (bearer): a message to the group `groupName`, or to `all` when
/// `groupName` is absent (CIM's group chat).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupRouteRequest {
    #[serde(deserialize_with = "id")]
    pub user_id: u64,
    pub msg: String,
    pub client_msg_id: String,
    /// Absent (or `null`, as this SDK sent it before, and the document says `nullable`)
    /// for `all`; left out when sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_name: Option<String>,
}

/// `POST /p2pRoute` (bearer)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct P2pRouteRequest {
    #[serde(deserialize_with = "id")]
    pub user_id: u64,
    #[serde(deserialize_with = "id")]
    pub receive_user_id: u64,
    pub msg: String,
    pub client_msg_id: String,
}

/// The answer to `groupRoute` / `p2pRoute`: where the message was stored. `online` (p2p
/// only) says whether the receiver has a session now; an offline receiver gets the message
/// at its next login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendResponse {
    pub conv: String,
    pub log_epoch: String,
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub online: Option<bool>,
}

/// `POST /group/create`, `/group/join`, `/group/leave` (bearer)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupRequest {
    #[serde(deserialize_with = "id")]
    pub user_id: u64,
    pub group_name: String,
}

/// `GET /group/list` (bearer): the token user's groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupList {
    pub groups: Vec<String>,
}

/// One message of `GET /history?conv=..&beforeSeq=..&limit=..` (bearer, members only;
/// `limit` ≤ 100; oldest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryMessage {
    pub seq: u64,
    pub sender_id: u64,
    pub client_msg_id: String,
    pub msg: String,
    pub sent_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct History {
    pub conv: String,
    pub log_epoch: String,
    pub head_seq: u64,
    pub first_available_seq: u64,
    pub messages: Vec<HistoryMessage>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BinaryFieldError {
    #[error("not unpadded URL-safe base64")]
    Base64,
    #[error("not a protobuf ticket")]
    Ticket,
    #[error("a resume token is 32 bytes")]
    ResumeTokenLength,
    #[error("a resumption secret is 32 bytes")]
    ResumeSecretLength,
}

pub fn encode_ticket(ticket: &cim_proto::Ticket) -> String {
    URL_SAFE_NO_PAD.encode(ticket.encode_to_vec())
}

pub fn decode_ticket(text: &str) -> Result<cim_proto::Ticket, BinaryFieldError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| BinaryFieldError::Base64)?;
    cim_proto::Ticket::decode(bytes.as_slice()).map_err(|_| BinaryFieldError::Ticket)
}

pub fn encode_resume_token(token: &ResumeToken) -> String {
    URL_SAFE_NO_PAD.encode(token.0)
}

pub fn decode_resume_token(text: &str) -> Result<ResumeToken, BinaryFieldError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| BinaryFieldError::Base64)?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| BinaryFieldError::ResumeTokenLength)?;
    Ok(ResumeToken(bytes))
}

pub fn encode_resume_secret(secret: &ResumptionSecret) -> String {
    URL_SAFE_NO_PAD.encode(secret.0)
}

pub fn decode_resume_secret(text: &str) -> Result<ResumptionSecret, BinaryFieldError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| BinaryFieldError::Base64)?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| BinaryFieldError::ResumeSecretLength)?;
    Ok(ResumptionSecret(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_uses_cims_field_names() {
        let ok = serde_json::to_value(Envelope::ok(RegisterResponse {
            user_id: 7,
            user_name: "ann".into(),
        }))
        .unwrap();
        assert_eq!(
            ok,
            serde_json::json!({"code": "9000", "message": "success",
                               "dataBody": {"userId": 7, "userName": "ann"}})
        );
        let err: Envelope<RegisterResponse> =
            serde_json::from_str(r#"{"code":"3000","message":"bad"}"#).unwrap();
        assert_eq!(err.data_body, None);
        assert!(!err.is_ok());
    }

    #[test]
    fn binary_fields_round_trip_and_reject_garbage() {
        let ticket = cim_proto::Ticket {
            key_id: 1,
            user_id: 2,
            server_id: "s1".into(),
            epoch: 3,
            expires_at_ms: 4,
            mac: vec![5; 32],
        };
        assert_eq!(decode_ticket(&encode_ticket(&ticket)).unwrap(), ticket);
        assert_eq!(decode_ticket("!!"), Err(BinaryFieldError::Base64));
        let token = ResumeToken([9; 32]);
        assert_eq!(
            decode_resume_token(&encode_resume_token(&token)).unwrap(),
            token
        );
        assert_eq!(
            decode_resume_token("AAAA"),
            Err(BinaryFieldError::ResumeTokenLength)
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: Result<RegisterRequest, _> =
            serde_json::from_str(r#"{"userName":"a","password":"b","admin":true}"#);
        assert!(r.is_err());
    }
}
