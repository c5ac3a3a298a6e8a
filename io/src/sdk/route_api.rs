//! The route's HTTP API, typed: [`crate::api`]'s bodies over [`HttpClient`], with the CIM
//! envelope unwrapped. A non-success envelope keeps CIM's code string, so callers can tell
//! "repeat login" (5000) from "validation failed" (3000) without parsing messages.

use std::time::Duration;

use bytes::Bytes;
use cim_core::ids::{ClientMsgId, ConvId, UserId};
use hyper::{Method, StatusCode};
use serde::Serialize;
use serde::de::{DeserializeOwned, IgnoredAny};

use crate::api::{
    self, Envelope, GroupList, GroupRequest, GroupRouteRequest, History, LoginResponse,
    OfflineRequest, OnlineUser, P2pRouteRequest, RegisterRequest, RegisterResponse, SendResponse,
    UserName, UserNames, UserNamesRequest,
};
use crate::http_client::{HttpClient, HttpError};
use crate::net::Network;
use crate::tls::ClientTls;

/// A failed API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No HTTP answer (refused, timed out, broken connection).
    #[error(transparent)]
    Transport(#[from] HttpError),
    /// The route answered with an envelope whose code is not 9000 (`code` is CIM's, e.g.
    /// "3000" validation, "5000" repeat login).
    #[error("route answered {http} / {code}: {message}")]
    Status {
        http: u16,
        code: String,
        message: String,
    },
    /// An answer that is not the expected envelope or body.
    #[error("unexpected answer: {0}")]
    BadBody(String),
}

impl ApiError {
    /// CIM's code, for an answer the route gave.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// The route's HTTP API at one address. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RouteApi<N> {
    http: HttpClient<N>,
}

impl<N: Network> RouteApi<N> {
    /// `timeout` bounds each whole request (connect, send, answer).
    pub fn new(net: N, host: impl Into<String>, port: u16, timeout: Duration) -> Self {
        Self {
            http: HttpClient::new(net, host, port, timeout),
        }
    }

    /// The route's host, as dialed.
    pub fn host(&self) -> &str {
        self.http.host()
    }

    /// Speaks HTTPS to the route, verifying its certificate with `tls`.
    pub fn with_tls(mut self, tls: ClientTls) -> Self {
        self.http = self.http.with_tls(tls);
        self
    }

    /// `POST /registerAccount`: a new account; the route picks the id.
    pub async fn register(&self, name: &str, password: &str) -> Result<RegisterResponse, ApiError> {
        let body = RegisterRequest {
            user_name: name.to_owned(),
            password: password.to_owned(),
        };
        self.call(Method::POST, "/registerAccount", None, Some(&body))
            .await
    }

    /// `POST /login`.
    pub async fn login(&self, req: &api::LoginRequest) -> Result<LoginResponse, ApiError> {
        self.call(Method::POST, "/login", None, Some(req)).await
    }

    /// `POST /offLine`: ends the token's session.
    pub async fn offline(&self, token: &str, user: UserId) -> Result<(), ApiError> {
        let body = OfflineRequest { user_id: user.0 };
        self.call_unit(Method::POST, "/offLine", Some(token), Some(&body))
            .await
    }

    /// `GET /onlineUser`.
    pub async fn online_users(&self, token: &str) -> Result<Vec<OnlineUser>, ApiError> {
        self.call(Method::GET, "/onlineUser", Some(token), None::<&()>)
            .await
    }

    /// `POST /userNames`: the names of these ids (unknown ones left out). Asks in batches of
    /// [`api::MAX_USER_NAMES`], so any number of ids may be passed.
    pub async fn user_names(
        &self,
        token: &str,
        users: &[UserId],
    ) -> Result<Vec<UserName>, ApiError> {
        let mut found = Vec::new();
        for batch in users.chunks(api::MAX_USER_NAMES) {
            let body = UserNamesRequest {
                user_ids: batch.iter().map(|u| u.0).collect(),
            };
            let answer: UserNames = self
                .call(Method::POST, "/userNames", Some(token), Some(&body))
                .await?;
            found.extend(answer.users);
        }
        Ok(found)
    }

    /// `POST /groupRoute`: to the group `group`, or to `all` when `None`.
    pub async fn group_route(
        &self,
        token: &str,
        user: UserId,
        group: Option<&str>,
        msg: &str,
        id: ClientMsgId,
    ) -> Result<SendResponse, ApiError> {
        let body = GroupRouteRequest {
            user_id: user.0,
            msg: msg.to_owned(),
            client_msg_id: id.to_string(),
            group_name: group.map(str::to_owned),
        };
        self.call(Method::POST, "/groupRoute", Some(token), Some(&body))
            .await
    }

    /// `POST /p2pRoute`.
    pub async fn p2p_route(
        &self,
        token: &str,
        user: UserId,
        to: UserId,
        msg: &str,
        id: ClientMsgId,
    ) -> Result<SendResponse, ApiError> {
        let body = P2pRouteRequest {
            user_id: user.0,
            receive_user_id: to.0,
            msg: msg.to_owned(),
            client_msg_id: id.to_string(),
        };
        self.call(Method::POST, "/p2pRoute", Some(token), Some(&body))
            .await
    }

    /// `POST /group/create` (the creator joins it).
    pub async fn create_group(
        &self,
        token: &str,
        user: UserId,
        name: &str,
    ) -> Result<(), ApiError> {
        self.group_call("/group/create", token, user, name).await
    }

    /// `POST /group/join`.
    pub async fn join_group(&self, token: &str, user: UserId, name: &str) -> Result<(), ApiError> {
        self.group_call("/group/join", token, user, name).await
    }

    /// `POST /group/leave`.
    pub async fn leave_group(&self, token: &str, user: UserId, name: &str) -> Result<(), ApiError> {
        self.group_call("/group/leave", token, user, name).await
    }

    /// `GET /group/list`: the token user's groups.
    pub async fn list_groups(&self, token: &str) -> Result<Vec<String>, ApiError> {
        let list: GroupList = self
            .call(Method::GET, "/group/list", Some(token), None::<&()>)
            .await?;
        Ok(list.groups)
    }

    /// `GET /history`: up to `limit` messages below `before_seq` (the newest when `None`),
    /// oldest first.
    pub async fn history(
        &self,
        token: &str,
        conv: &ConvId,
        before_seq: Option<u64>,
        limit: u32,
    ) -> Result<History, ApiError> {
        // A canonical conversation id is made of [A-Za-z0-9._:-] only (see `ConvId`), all
        // of which are legal in a query string as they are.
        let mut path = format!("/history?conv={conv}&limit={limit}");
        if let Some(seq) = before_seq {
            path.push_str(&format!("&beforeSeq={seq}"));
        }
        self.call(Method::GET, &path, Some(token), None::<&()>)
            .await
    }

    async fn group_call(
        &self,
        path: &str,
        token: &str,
        user: UserId,
        name: &str,
    ) -> Result<(), ApiError> {
        let body = GroupRequest {
            user_id: user.0,
            group_name: name.to_owned(),
        };
        self.call_unit(Method::POST, path, Some(token), Some(&body))
            .await
    }

    /// A call whose success carries data.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<&impl Serialize>,
    ) -> Result<T, ApiError> {
        let envelope: Envelope<T> = self.exchange(method, path, bearer, body).await?;
        envelope
            .data_body
            .ok_or_else(|| ApiError::BadBody("success without dataBody".to_owned()))
    }

    /// A call whose success carries nothing the caller needs.
    async fn call_unit(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<&impl Serialize>,
    ) -> Result<(), ApiError> {
        let _: Envelope<IgnoredAny> = self.exchange(method, path, bearer, body).await?;
        Ok(())
    }

    /// Sends the request and unwraps the envelope: `Ok` only for code 9000.
    async fn exchange<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        bearer: Option<&str>,
        body: Option<&impl Serialize>,
    ) -> Result<Envelope<T>, ApiError> {
        let json = match body {
            Some(body) => Some(Bytes::from(
                serde_json::to_vec(body).map_err(|e| ApiError::BadBody(e.to_string()))?,
            )),
            None => None,
        };
        let (status, answer) = self.http.request(method, path, bearer, json).await?;
        parse_envelope(status, &answer)
    }
}

fn parse_envelope<T: DeserializeOwned>(
    status: StatusCode,
    answer: &[u8],
) -> Result<Envelope<T>, ApiError> {
    // Read the code first, so an error envelope is reported as such even when its body would
    // not fit the success type.
    let head: Envelope<IgnoredAny> = serde_json::from_slice(answer).map_err(|e| {
        ApiError::BadBody(format!(
            "HTTP {}: not an envelope ({e}): {}",
            status.as_u16(),
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        ))
    })?;
    if !head.is_ok() {
        return Err(ApiError::Status {
            http: status.as_u16(),
            code: head.code,
            message: head.message,
        });
    }
    serde_json::from_slice(answer).map_err(|e| ApiError::BadBody(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_envelopes_keep_cims_code() {
        let err = parse_envelope::<RegisterResponse>(
            StatusCode::BAD_REQUEST,
            br#"{"code":"3000","message":"userName: missing"}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&err, ApiError::Status { http: 400, code, message }
                if code == "3000" && message == "userName: missing"),
            "{err:?}"
        );
        let ok = parse_envelope::<RegisterResponse>(
            StatusCode::OK,
            br#"{"code":"9000","message":"success","dataBody":{"userId":3,"userName":"a"}}"#,
        )
        .unwrap();
        assert_eq!(ok.data_body.map(|r| r.user_id), Some(3));
        assert!(matches!(
            parse_envelope::<RegisterResponse>(StatusCode::BAD_GATEWAY, b"<html>"),
            Err(ApiError::BadBody(_))
        ));
        assert!(matches!(
            parse_envelope::<RegisterResponse>(
                StatusCode::OK,
                br#"{"code":"9000","message":"success","dataBody":{"userId":"x"}}"#
            ),
            Err(ApiError::BadBody(_))
        ));
    }
}
