//! Reading Redis replies into the store's vocabulary; a reply of the wrong shape is the
//! store being unavailable (a bug or a foreign writer), never a panic.

use ::redis::{RedisError, Value};
use cim_core::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};
use cim_core::store::{
    AllFrom, Claim, ConvHead, ResumeSecret, StoreUnavailable, StoredMessage, position_in,
};
use prost::Message as _;

use super::R;

pub(super) fn unavailable(e: RedisError) -> StoreUnavailable {
    StoreUnavailable(format!("redis: {e}"))
}

pub(super) fn bad_reply(what: &str, v: &Value) -> StoreUnavailable {
    StoreUnavailable(format!("redis: unexpected reply to {what}: {v:?}"))
}

/// A number sent as an integer or a decimal string (scripts return both).
pub(super) fn num(v: &Value) -> R<u64> {
    opt_num(v)?.ok_or_else(|| bad_reply("a number", v))
}

pub(super) fn opt_num(v: &Value) -> R<Option<u64>> {
    match v {
        Value::Nil => Ok(None),
        Value::Int(i) => u64::try_from(*i)
            .map(Some)
            .map_err(|_| bad_reply("a number", v)),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| bad_reply("a number", v)),
        Value::SimpleString(s) => s.parse().map(Some).map_err(|_| bad_reply("a number", v)),
        _ => Err(bad_reply("a number", v)),
    }
}

pub(super) fn bytes(v: &Value) -> R<Option<Vec<u8>>> {
    match v {
        Value::Nil => Ok(None),
        Value::BulkString(b) => Ok(Some(b.clone())),
        Value::SimpleString(s) => Ok(Some(s.clone().into_bytes())),
        _ => Err(bad_reply("a string", v)),
    }
}

pub(super) fn string(v: &Value) -> R<Option<String>> {
    bytes(v)?
        .map(|b| String::from_utf8(b).map_err(|_| bad_reply("utf-8", v)))
        .transpose()
}

/// `[c_epoch, server, lease, token, secret, secret_exp]`, all nil when there is no claim;
/// `secret` nil when the claim holds no resumption secret.
pub(super) fn parse_claim(fields: &[Value]) -> R<Option<Claim>> {
    let [epoch, server, lease, token, secret, secret_exp] = fields else {
        return Err(bad_reply("claim", &Value::Array(fields.to_vec())));
    };
    let Some(epoch) = opt_num(epoch)? else {
        return Ok(None);
    };
    let token = bytes(token)?.unwrap_or_default();
    let resume_token_hash: [u8; 32] = token
        .try_into()
        .map_err(|_| bad_reply("claim token", &Value::Array(fields.to_vec())))?;
    let resume_secret = match bytes(secret)? {
        None => None,
        Some(hash) => Some(ResumeSecret {
            hash: hash
                .try_into()
                .map_err(|_| bad_reply("claim secret", &Value::Array(fields.to_vec())))?,
            expires_at: UnixMillis(num(secret_exp)?),
        }),
    };
    Ok(Some(Claim {
        epoch: Epoch(epoch),
        server: ServerId(string(server)?.unwrap_or_default()),
        lease_until: UnixMillis(num(lease)?),
        resume_token_hash,
        resume_secret,
    }))
}

pub(super) struct Read {
    pub(super) log_epoch: LogEpoch,
    pub(super) head_seq: u64,
    pub(super) first: u64,
    /// -1: not a member of the group.
    pub(super) joined: i64,
    /// The epoch the log moved from (0: never) and the head seq it carried over.
    pub(super) carried: (LogEpoch, u64),
    pub(super) messages: Vec<(u64, Vec<u8>)>,
}

impl Read {
    /// The head as the reference computes it: history starts after the join seq.
    pub(super) fn head(&self, conv: ConvId, cursor: u64) -> ConvHead {
        let joined = u64::try_from(self.joined).unwrap_or(0);
        ConvHead {
            conv,
            log_epoch: self.log_epoch,
            head_seq: self.head_seq,
            first_available_seq: self.first.max(joined + 1),
            cursor_seq: cursor.max(joined),
            carried_from: self.carried.0,
            carried_up_to: self.carried.1,
        }
    }
}

pub(super) fn parse_read(v: &Value) -> R<Option<Read>> {
    let Value::Array(items) = v else {
        return Err(bad_reply("read", v));
    };
    match items.as_slice() {
        [Value::Nil] => Ok(None),
        [epoch, head, first, joined, cf_epoch, cf_n, rest @ ..] if rest.len() % 2 == 0 => {
            let joined = match joined {
                Value::Int(i) => *i,
                other => return Err(bad_reply("read joined", other)),
            };
            let messages = rest
                .chunks_exact(2)
                .map(|pair| {
                    let body = bytes(&pair[1])?.ok_or_else(|| bad_reply("read message", v))?;
                    Ok((num(&pair[0])?, body))
                })
                .collect::<R<Vec<_>>>()?;
            Ok(Some(Read {
                log_epoch: LogEpoch(num(epoch)?),
                head_seq: num(head)?,
                first: num(first)?,
                joined,
                carried: (LogEpoch(num(cf_epoch)?), num(cf_n)?),
                messages,
            }))
        }
        _ => Err(bad_reply("read", v)),
    }
}

/// An account's `all` start from its `all_epoch` and `all_seq` fields (absent, as in accounts
/// registered before the start was recorded: 0, everything is owed).
pub(super) fn all_from(epoch: Option<&str>, seq: Option<&str>) -> AllFrom {
    AllFrom {
        log_epoch: LogEpoch(epoch.and_then(|e| e.parse().ok()).unwrap_or(0)),
        seq: seq.and_then(|s| s.parse().ok()).unwrap_or(0),
    }
}

/// A stored `<log epoch>:<seq>` cursor, if it is of the current log epoch.
pub(super) fn cursor_in(
    stored: Option<&String>,
    log_epoch: LogEpoch,
    carried: (LogEpoch, u64),
) -> u64 {
    stored
        .and_then(|s| s.split_once(':'))
        .and_then(|(epoch, seq)| Some((LogEpoch(epoch.parse().ok()?), seq.parse().ok()?)))
        .map_or(0, |at| position_in(at, log_epoch, carried))
}

pub(super) fn decode_message(
    conv: &ConvId,
    log_epoch: LogEpoch,
    seq: u64,
    bytes: &[u8],
) -> R<StoredMessage> {
    let m = cim_proto::Message::decode(bytes)
        .map_err(|e| StoreUnavailable(format!("redis: corrupt message {conv} {seq}: {e}")))?;
    Ok(StoredMessage {
        conv: conv.clone(),
        log_epoch,
        seq,
        sender: UserId(m.sender),
        msg_id: ClientMsgId::from_halves(m.msg_id_hi, m.msg_id_lo),
        body: m.body,
        appended_at: UnixMillis(m.appended_at_ms),
    })
}
