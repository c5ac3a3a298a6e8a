//! A [`ClientState`] on disk, as JSON, so a restarted client keeps its resume token (instant
//! failover) and resumption secret (a login without the password), its unacknowledged messages (resent with their original ids) and its place in
//! each conversation.
//!
//! The core types stay free of serde; the file format is these mirror types, versioned.
//! Binary values are base64 as in the HTTP API; message ids are UUID text.

use std::io;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use cim_core::client::{ClientState, SavedConv, SavedMessage};
use cim_core::ids::{ClientMsgId, ConvId, LogEpoch, UnixMillis};
use serde::{Deserialize, Serialize};

use crate::api::{
    decode_resume_secret, decode_resume_token, encode_resume_secret, encode_resume_token,
};

const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileV1 {
    version: u32,
    #[serde(default)]
    resume_token: Option<String>,
    /// Added after version 1 was first written: optional, so older files still load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resume_secret: Option<String>,
    #[serde(default)]
    outbox: Vec<MessageV1>,
    #[serde(default)]
    convs: Vec<ConvV1>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MessageV1 {
    id: String,
    conv: String,
    body: String,
    created_at_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConvV1 {
    conv: String,
    log_epoch: u64,
    delivered: u64,
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("client state file: {what}"),
    )
}

/// The JSON text of `state`.
pub fn to_json(state: &ClientState) -> String {
    let file = FileV1 {
        version: VERSION,
        resume_token: state.resume_token.as_ref().map(encode_resume_token),
        resume_secret: state.resume_secret.as_ref().map(encode_resume_secret),
        outbox: state
            .outbox
            .iter()
            .map(|m| MessageV1 {
                id: m.id.to_string(),
                conv: m.conv.to_string(),
                body: STANDARD.encode(&m.body),
                created_at_ms: m.created_at.0,
            })
            .collect(),
        convs: state
            .convs
            .iter()
            .map(|c| ConvV1 {
                conv: c.conv.to_string(),
                log_epoch: c.log_epoch.0,
                delivered: c.delivered,
            })
            .collect(),
    };
    // Plain strings and numbers: serialising cannot fail.
    serde_json::to_string_pretty(&file).unwrap_or_default()
}

/// Parses what [`to_json`] wrote. Any malformed part fails the whole file: a half-restored
/// outbox would silently drop messages.
pub fn from_json(text: &str) -> io::Result<ClientState> {
    let file: FileV1 = serde_json::from_str(text).map_err(invalid)?;
    if file.version != VERSION {
        return Err(invalid(format!("unknown version {}", file.version)));
    }
    let resume_token = file
        .resume_token
        .as_deref()
        .map(decode_resume_token)
        .transpose()
        .map_err(invalid)?;
    let resume_secret = file
        .resume_secret
        .as_deref()
        .map(decode_resume_secret)
        .transpose()
        .map_err(invalid)?;
    let outbox = file
        .outbox
        .into_iter()
        .map(|m| {
            Ok(SavedMessage {
                id: m.id.parse::<ClientMsgId>().map_err(invalid)?,
                conv: m.conv.parse::<ConvId>().map_err(invalid)?,
                body: Bytes::from(STANDARD.decode(&m.body).map_err(invalid)?),
                created_at: UnixMillis(m.created_at_ms),
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    let convs = file
        .convs
        .into_iter()
        .map(|c| {
            Ok(SavedConv {
                conv: c.conv.parse::<ConvId>().map_err(invalid)?,
                log_epoch: LogEpoch(c.log_epoch),
                delivered: c.delivered,
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok(ClientState {
        resume_token,
        resume_secret,
        outbox,
        convs,
    })
}

/// The state saved at `path`, or `None` if there is no file yet.
pub fn load(path: impl AsRef<Path>) -> io::Result<Option<ClientState>> {
    match std::fs::read_to_string(path.as_ref()) {
        Ok(text) => from_json(&text).map(Some),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `state` to `path` atomically and owner-only (it holds the resume token and the
/// resumption secret, credentials): see [`crate::private_file::write_atomically`].
pub fn save(path: impl AsRef<Path>, state: &ClientState) -> io::Result<()> {
    crate::private_file::write_atomically(path.as_ref(), to_json(state).as_bytes())
}

#[cfg(test)]
mod tests {
    use cim_core::route::login::ResumeToken;
    use cim_core::route::resumption::ResumptionSecret;

    use super::*;

    fn state() -> ClientState {
        ClientState {
            resume_token: Some(ResumeToken([7; 32])),
            resume_secret: Some(ResumptionSecret([9; 32])),
            outbox: vec![SavedMessage {
                id: ClientMsgId(u128::MAX - 5),
                conv: ConvId::group("rust").unwrap(),
                body: Bytes::from_static(b"\x00\xffhi"),
                created_at: UnixMillis(1_700_000_000_000),
            }],
            convs: vec![SavedConv {
                conv: "p:3:9".parse().unwrap(),
                log_epoch: LogEpoch(u64::MAX),
                delivered: 41,
            }],
        }
    }

    #[test]
    fn json_round_trips_exactly() {
        assert_eq!(from_json(&to_json(&state())).unwrap(), state());
        assert_eq!(
            from_json(&to_json(&ClientState::default())).unwrap(),
            ClientState::default()
        );
    }

    /// A file written before resumption (no `resumeSecret`) loads: the next login uses the
    /// password once and the file gains the secret.
    #[test]
    fn a_file_without_a_secret_still_loads() {
        let old = to_json(&state()).replace(
            &format!(
                "\"resumeSecret\": \"{}\",",
                encode_resume_secret(&ResumptionSecret([9; 32]))
            ),
            "",
        );
        assert!(!old.contains("resumeSecret"), "{old}");
        let loaded = from_json(&old).unwrap();
        assert_eq!(loaded.resume_secret, None);
        assert_eq!(loaded.resume_token, state().resume_token);
    }

    #[test]
    fn malformed_files_are_errors_not_partial_states() {
        let good = to_json(&state());
        for bad in [
            good.replace("\"p:3:9\"", "\"p:9:3\""),
            good.replace("\"version\": 1", "\"version\": 2"),
            "{}".to_owned(),
            "not json".to_owned(),
        ] {
            let err = from_json(&bad).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{bad}");
        }
    }
}
