//! The client's outbox: messages the application sent that the server has not acknowledged.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cim_proto as proto;

use crate::ids::{ClientMsgId, ConvId};

/// One unacknowledged message. Its id never changes, so every resend is the same append as
/// far as the store's idempotency record is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub id: ClientMsgId,
    pub conv: ConvId,
    pub body: Bytes,
    pub created_at: Instant,
}

impl OutboxEntry {
    pub(crate) fn to_frame(&self) -> proto::Frame {
        proto::Frame {
            kind: Some(proto::frame::Kind::Send(proto::Send {
                msg_id_hi: self.id.hi(),
                msg_id_lo: self.id.lo(),
                conv: self.conv.to_string(),
                body: self.body.clone(),
                // Informational only and the machine has no wall clock; the store stamps
                // `appended_at`.
                sent_at_ms: 0,
            })),
        }
    }
}

/// Entries in the order the application sent them.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    entries: VecDeque<OutboxEntry>,
}

impl Outbox {
    pub(crate) fn push(&mut self, entry: OutboxEntry) {
        self.entries.push_back(entry);
    }

    /// Removes the entry with this id. `None` for an id that was already acked, rejected or
    /// expired (a duplicate answer to a resend).
    pub(crate) fn remove(&mut self, id: ClientMsgId) -> Option<OutboxEntry> {
        // Linear: an outbox holds what one user typed during one outage.
        let pos = self.entries.iter().position(|e| e.id == id)?;
        self.entries.remove(pos)
    }

    pub(crate) fn contains(&self, id: ClientMsgId) -> bool {
        self.entries.iter().any(|e| e.id == id)
    }

    /// Removes every entry created at or before `now - max_age`, oldest first.
    pub(crate) fn expire(&mut self, now: Instant, max_age: Duration) -> Vec<ClientMsgId> {
        let mut expired = Vec::new();
        self.entries.retain(|e| {
            let keep = e.created_at + max_age > now;
            if !keep {
                expired.push(e.id);
            }
            keep
        });
        expired
    }

    /// When the oldest entry expires.
    pub(crate) fn next_expiry(&self, max_age: Duration) -> Option<Instant> {
        self.entries.iter().map(|e| e.created_at + max_age).min()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &OutboxEntry> {
        self.entries.iter()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}
