//! Frames as JSON, for the tests of the browser shell (web/test/): Node's fake server reads
//! what the session sends and answers with frames, without a protobuf library of its own.
//! Part of the shipped build on purpose, so those tests run the very wasm the route serves;
//! it is a few kilobytes. Message ids are UUID text, 64-bit numbers decimal strings.

use cim_core::ids::ClientMsgId;
use cim_proto as proto;
use prost::Message;
use proto::frame::Kind;
use serde_json::{Value, json};
use wasm_bindgen::prelude::*;

fn id(hi: u64, lo: u64) -> String {
    ClientMsgId::from_halves(hi, lo).to_string()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A client's frame as JSON (`{"t": "send", ...}`); the kinds a client sends.
#[wasm_bindgen]
pub fn frame_to_json(bytes: &[u8]) -> Result<String, JsError> {
    let frame = proto::Frame::decode(bytes).map_err(|e| JsError::new(&e.to_string()))?;
    let v = match frame.kind {
        Some(Kind::Login(l)) => {
            let t = l.ticket.unwrap_or_default();
            json!({"t": "login", "user": t.user_id.to_string(), "epoch": t.epoch.to_string(),
                   "server": t.server_id})
        }
        Some(Kind::Ping(p)) => json!({"t": "ping", "nonce": p.nonce}),
        Some(Kind::Send(s)) => json!({"t": "send", "msgId": id(s.msg_id_hi, s.msg_id_lo),
            "conv": s.conv, "text": text(&s.body), "orderSeq": s.order_seq,
            "orderAfter": s.order_after}),
        Some(Kind::DeliverAck(a)) => json!({"t": "deliverAck", "cursors": a.cursors.iter()
            .map(|c| json!({"conv": c.conv, "logEpoch": c.log_epoch.to_string(), "seq": c.seq}))
            .collect::<Vec<_>>()}),
        Some(Kind::SyncRequest(_)) => json!({"t": "syncRequest"}),
        Some(Kind::FetchRequest(f)) => json!({"t": "fetchRequest", "conv": f.conv,
            "logEpoch": f.log_epoch.to_string(), "afterSeq": f.after_seq, "limit": f.limit}),
        _ => json!({"t": "other"}),
    };
    Ok(v.to_string())
}

fn num(v: &Value, key: &str) -> u64 {
    match &v[key] {
        Value::String(s) => s.parse().unwrap_or(0),
        other => other.as_u64().unwrap_or(0),
    }
}

fn string(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

fn halves(v: &Value) -> (u64, u64) {
    let id: ClientMsgId = v["msgId"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .unwrap_or_default();
    (id.hi(), id.lo())
}

fn message_from(v: &Value) -> proto::Message {
    let (hi, lo) = halves(v);
    proto::Message {
        conv: string(v, "conv"),
        log_epoch: num(v, "logEpoch"),
        seq: num(v, "seq"),
        sender: num(v, "sender"),
        msg_id_hi: hi,
        msg_id_lo: lo,
        body: string(v, "text").into_bytes().into(),
        appended_at_ms: num(v, "appendedAtMs"),
    }
}

fn head_from(v: &Value) -> proto::ConvHead {
    proto::ConvHead {
        conv: string(v, "conv"),
        log_epoch: num(v, "logEpoch"),
        head_seq: num(v, "headSeq"),
        first_available_seq: num(v, "firstAvailableSeq"),
        cursor_seq: num(v, "cursorSeq"),
        carried_from_epoch: num(v, "carriedFromEpoch"),
        carried_up_to: num(v, "carriedUpTo"),
    }
}

/// A server's frame from JSON: `loginOk`, `pong`, `sendAck`, `sendNack`, `deliver`,
/// `syncAnswer`, `fetchAnswer`, `kick`.
#[wasm_bindgen]
pub fn frame_from_json(json: &str) -> Result<Vec<u8>, JsError> {
    let v: Value = serde_json::from_str(json).map_err(|e| JsError::new(&e.to_string()))?;
    let kind = match v["t"].as_str().unwrap_or_default() {
        "loginOk" => Kind::LoginOk(proto::LoginOk {
            user_id: num(&v, "user"),
            epoch: num(&v, "epoch"),
            server_id: string(&v, "server"),
            heartbeat_interval_ms: num(&v, "heartbeatMs"),
        }),
        "pong" => Kind::Pong(proto::Pong {
            nonce: num(&v, "nonce"),
        }),
        "sendAck" => {
            let (hi, lo) = halves(&v);
            Kind::SendAck(proto::SendAck {
                msg_id_hi: hi,
                msg_id_lo: lo,
                conv: string(&v, "conv"),
                log_epoch: num(&v, "logEpoch"),
                seq: num(&v, "seq"),
            })
        }
        "sendNack" => {
            let (hi, lo) = halves(&v);
            Kind::SendNack(proto::SendNack {
                msg_id_hi: hi,
                msg_id_lo: lo,
                code: num(&v, "code") as i32,
                reason: string(&v, "reason"),
                retryable: v["retryable"].as_bool().unwrap_or(false),
            })
        }
        "deliver" => Kind::Deliver(proto::Deliver {
            message: Some(message_from(&v)),
        }),
        "syncAnswer" => Kind::SyncAnswer(proto::SyncAnswer {
            heads: v["heads"]
                .as_array()
                .map(|a| a.iter().map(head_from).collect())
                .unwrap_or_default(),
            more: false,
            incomplete: v["incomplete"].as_bool().unwrap_or(false),
        }),
        "fetchAnswer" => Kind::FetchAnswer(proto::FetchAnswer {
            head: Some(head_from(&v["head"])),
            messages: v["messages"]
                .as_array()
                .map(|a| a.iter().map(message_from).collect())
                .unwrap_or_default(),
        }),
        "kick" => Kind::Kick(proto::Kick {
            reason: num(&v, "reason") as i32,
            message: string(&v, "message"),
        }),
        other => return Err(JsError::new(&format!("no such server frame: {other:?}"))),
    };
    Ok(proto::Frame { kind: Some(kind) }.encode_to_vec())
}
