//! The key layout (see the module docs of `crate::store`): one hash tag per user, per name
//! table and per conversation, so every multi-key step stays in one Redis Cluster slot.

use cim_core::ids::{ClientMsgId, ConvId, LogEpoch, UserId};
use cim_core::slots::{conv_tag, user_tag};

pub(in crate::store) const NEXT_USER: &str = "cim:{names}:next_user";

pub(super) fn name_key(name: &str) -> String {
    format!("cim:{{names}}:name:{name}")
}

pub(super) fn acct_key(user: UserId) -> String {
    format!("cim:acct:{{{}}}", user_tag(user))
}

pub(super) fn claim_key(user: UserId) -> String {
    format!("cim:claim:{{{}}}", user_tag(user))
}

pub(super) fn failures_key(user: UserId) -> String {
    format!("cim:fail:{{{}}}", user_tag(user))
}

pub(super) fn route_key(user: UserId) -> String {
    format!("cim:route:{{{}}}", user_tag(user))
}

/// Keys SCAN asks for per round trip: enough to make progress, small enough not to stall
/// Redis.
pub(super) const SCAN_COUNT: u64 = 200;

/// The user of a `cim:route:{u:<id>}` key; `None` for anything else the pattern matched.
pub(super) fn user_of_route_key(key: &str) -> Option<UserId> {
    let id = key.strip_prefix("cim:route:{u:")?.strip_suffix('}')?;
    id.parse().ok().map(UserId)
}

pub(super) fn convs_key(user: UserId) -> String {
    format!("cim:convs:{{{}}}", user_tag(user))
}

pub(super) fn cursors_key(user: UserId) -> String {
    format!("cim:cursors:{{{}}}", user_tag(user))
}

/// `part` is `meta`, `log` or `members`. Group names are restricted by `ConvId::group` to
/// characters that cannot end the hash tag early.
pub(super) fn conv_key(conv: &ConvId, part: &str) -> String {
    format!("cim:conv:{{{}}}:{part}", conv_tag(conv))
}

pub(super) fn idem_key(conv: &ConvId, sender: UserId, msg_id: ClientMsgId) -> String {
    format!(
        "cim:conv:{{{}}}:idem:{}:{:032x}",
        conv_tag(conv),
        sender.0,
        msg_id.0
    )
}

pub(super) fn order_key(conv: &ConvId, sender: UserId, stream: u64) -> String {
    format!(
        "cim:conv:{{{}}}:order:{}:{stream:016x}",
        conv_tag(conv),
        sender.0
    )
}

/// Keys and arguments of one `read.lua` call.
pub(super) fn read_call(
    user: UserId,
    conv: &ConvId,
    log_epoch: LogEpoch,
    after_seq: u64,
    limit: u32,
    may_read: bool,
    fresh_epoch: LogEpoch,
) -> (Vec<String>, Vec<String>) {
    let keys = vec![
        conv_key(conv, "meta"),
        conv_key(conv, "members"),
        conv_key(conv, "log"),
    ];
    let is_group = matches!(conv, ConvId::Group(_));
    let args = vec![
        user.0.to_string(),
        if is_group { "1" } else { "0" }.to_string(),
        log_epoch.0.to_string(),
        after_seq.to_string(),
        limit.to_string(),
        if may_read { "1" } else { "0" }.to_string(),
        // Taken only if the log moves (the lost-tail rule in `lua/incarnation.lua`).
        fresh_epoch.0.to_string(),
    ];
    (keys, args)
}
