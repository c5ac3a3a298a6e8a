//! The client's outbox: messages the application sent that the server has not acknowledged.
//!
//! It also keeps the session's place in its sender's order (`SendOrder` in the store): every
//! entry gets the next number of the session's stream when it is queued, and each `Send`
//! names the entry before it to the same conversation that is still in the outbox
//! (`order_after`), so the store appends an entry only after that one. An entry the store
//! refused as out of order is **held** until the entry it follows leaves the outbox (acked,
//! rejected or expired), then sent again at once together with every held entry queued
//! behind it, in order: a reordered burst costs one round trip, not a retry timer, and not
//! one round trip per message (releasing one entry per answer turned a steady sender into
//! stop-and-wait for as long as its outbox never emptied: ~100 messages/s instead of
//! thousands, in the fan-out benchmark with Redis).

use std::collections::VecDeque;
use std::time::Duration;

use crate::time::Instant;

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
    /// Its number in the session's order stream (from 1, across conversations).
    pub order_seq: u64,
}

#[derive(Debug)]
struct Slot {
    entry: OutboxEntry,
    /// Refused as out of order: not sent again until the entry it follows leaves.
    held: bool,
}

/// Entries in the order the application sent them.
#[derive(Debug)]
pub(crate) struct Outbox {
    slots: VecDeque<Slot>,
    stream: u64,
    last_order_seq: u64,
}

impl Outbox {
    /// An empty outbox numbering its entries in order stream `stream` (random per session,
    /// so no two sessions share a counter).
    pub(crate) fn new(stream: u64) -> Self {
        Self {
            slots: VecDeque::new(),
            stream,
            last_order_seq: 0,
        }
    }

    /// Queues a message under the stream's next number. Returns whether to send it now:
    /// not while an earlier entry of its conversation is held (it would be refused too).
    pub(crate) fn push(
        &mut self,
        id: ClientMsgId,
        conv: ConvId,
        body: Bytes,
        created_at: Instant,
    ) -> bool {
        self.last_order_seq += 1;
        let held = self.slots.iter().any(|s| s.held && s.entry.conv == conv);
        self.slots.push_back(Slot {
            entry: OutboxEntry {
                id,
                conv,
                body,
                created_at,
                order_seq: self.last_order_seq,
            },
            held,
        });
        !held
    }

    /// The `Send` frame of entry `id` as it stands now (its `order_after` is whatever it
    /// follows today).
    pub(crate) fn frame(&self, id: ClientMsgId) -> Option<proto::Frame> {
        let index = self.position(id)?;
        Some(self.frame_at(index))
    }

    fn frame_at(&self, index: usize) -> proto::Frame {
        let entry = &self.slots[index].entry;
        let after = self
            .previous_in_conv(index)
            .map_or(0, |i| self.slots[i].entry.order_seq);
        proto::Frame {
            kind: Some(proto::frame::Kind::Send(proto::Send {
                msg_id_hi: entry.id.hi(),
                msg_id_lo: entry.id.lo(),
                conv: entry.conv.to_string(),
                body: entry.body.clone(),
                // Informational only and the machine has no wall clock; the store stamps
                // `appended_at`.
                sent_at_ms: 0,
                order_stream: self.stream,
                order_seq: entry.order_seq,
                order_after: after,
            })),
        }
    }

    /// Every entry's frame, in order, holds cleared: a resend of everything (reconnect,
    /// retry timer) goes in submission order, so the store sees each after its predecessor.
    pub(crate) fn resend_all(&mut self) -> Vec<proto::Frame> {
        for slot in &mut self.slots {
            slot.held = false;
        }
        (0..self.slots.len()).map(|i| self.frame_at(i)).collect()
    }

    /// The store refused `id` as out of order. Holds it while the entry it follows is still
    /// here; returns its frame to send again at once if that one has left meanwhile (its
    /// answer overtook this refusal), `None` otherwise (held, or no such entry).
    pub(crate) fn refused_out_of_order(&mut self, id: ClientMsgId) -> Option<proto::Frame> {
        let index = self.position(id)?;
        if self.previous_in_conv(index).is_some() {
            self.slots[index].held = true;
            None
        } else {
            Some(self.frame_at(index))
        }
    }

    /// Removes the entry with this id, with the frames of the held entries that followed it
    /// (now free to go). `None` for an id that was already acked, rejected or expired (a
    /// duplicate answer to a resend).
    pub(crate) fn remove(&mut self, id: ClientMsgId) -> Option<(OutboxEntry, Vec<proto::Frame>)> {
        // Linear: an outbox holds what one user typed during one outage.
        let index = self.position(id)?;
        let slot = self.slots.remove(index)?;
        let released = self.release_after(index, &slot.entry.conv);
        Some((slot.entry, released))
    }

    pub(crate) fn contains(&self, id: ClientMsgId) -> bool {
        self.position(id).is_some()
    }

    /// Whether any entry is waiting for one before it.
    #[cfg(test)]
    pub(crate) fn any_held(&self) -> bool {
        self.slots.iter().any(|s| s.held)
    }

    /// Removes every entry created at or before `now - max_age`, oldest first, with the
    /// frames of the held entries they released.
    pub(crate) fn expire(
        &mut self,
        now: Instant,
        max_age: Duration,
    ) -> (Vec<ClientMsgId>, Vec<proto::Frame>) {
        let mut expired = Vec::new();
        let mut released = Vec::new();
        while let Some(index) = self
            .slots
            .iter()
            .position(|s| s.entry.created_at + max_age <= now)
        {
            let Some(slot) = self.slots.remove(index) else {
                break;
            };
            expired.push(slot.entry.id);
            released.extend(self.release_after(index, &slot.entry.conv));
        }
        (expired, released)
    }

    /// When the oldest entry expires.
    pub(crate) fn next_expiry(&self, max_age: Duration) -> Option<Instant> {
        self.slots
            .iter()
            .map(|s| s.entry.created_at + max_age)
            .min()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &OutboxEntry> {
        self.slots.iter().map(|s| &s.entry)
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    fn position(&self, id: ClientMsgId) -> Option<usize> {
        self.slots.iter().position(|s| s.entry.id == id)
    }

    /// The nearest earlier entry of the same conversation.
    fn previous_in_conv(&self, index: usize) -> Option<usize> {
        let conv = &self.slots[index].entry.conv;
        (0..index)
            .rev()
            .find(|&i| self.slots[i].entry.conv == *conv)
    }

    /// After the entry at `index` of `conv` left: if the next entry of `conv` (now at `index`
    /// or later) was held, it is released, and so is each held entry of `conv` right behind
    /// it (up to the first one still in flight, whose answer decides for those after it);
    /// their frames, in order. Sent back to back, each names the one before it, so the
    /// store takes them all unless the way there reorders them again.
    fn release_after(&mut self, index: usize, conv: &ConvId) -> Vec<proto::Frame> {
        let mut released = Vec::new();
        for i in index..self.slots.len() {
            if self.slots[i].entry.conv != *conv {
                continue;
            }
            if !self.slots[i].held {
                break;
            }
            self.slots[i].held = false;
            released.push(self.frame_at(i));
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::frame::Kind;

    #[allow(clippy::disallowed_methods)]
    fn base() -> Instant {
        Instant::from_nanos(0)
    }

    fn conv(name: &str) -> ConvId {
        name.parse().unwrap()
    }

    /// (order seq, order after) of a Send frame.
    fn order(frame: &proto::Frame) -> (u64, u64) {
        match &frame.kind {
            Some(Kind::Send(s)) => {
                assert_eq!(s.order_stream, 7);
                (s.order_seq, s.order_after)
            }
            other => panic!("not a send: {other:?}"),
        }
    }

    fn outbox(convs: &[&str], t: Instant) -> Outbox {
        let mut o = Outbox::new(7);
        for (i, c) in convs.iter().enumerate() {
            assert!(o.push(ClientMsgId(i as u128 + 1), conv(c), Bytes::new(), t));
        }
        o
    }

    #[test]
    fn each_send_follows_the_previous_unsettled_entry_of_its_conversation() {
        let t = base();
        let mut o = outbox(&["all", "g:x", "all", "all"], t);
        let orders: Vec<_> = o.resend_all().iter().map(order).collect();
        assert_eq!(orders, [(1, 0), (2, 0), (3, 1), (4, 3)]);
        // 3 acked: 4 now follows 1.
        let (entry, released) = o.remove(ClientMsgId(3)).unwrap();
        assert_eq!((entry.order_seq, released), (3, vec![]));
        assert_eq!(order(&o.frame(ClientMsgId(4)).unwrap()), (4, 1));
        assert_eq!(o.remove(ClientMsgId(3)), None);
    }

    #[test]
    fn a_refused_entry_waits_for_the_one_it_follows_and_then_goes_at_once() {
        let t = base();
        let mut o = outbox(&["all", "all", "g:x", "all"], t);
        // 2 and 4 overtook 1 at the store; 3 (another conversation) did not wait.
        assert_eq!(o.refused_out_of_order(ClientMsgId(2)), None);
        assert_eq!(o.refused_out_of_order(ClientMsgId(4)), None);
        assert!(o.any_held());
        // New messages to `all` wait behind the held ones; other conversations do not.
        assert!(!o.push(ClientMsgId(5), conv("all"), Bytes::new(), t));
        assert!(o.push(ClientMsgId(6), conv("g:x"), Bytes::new(), t));
        // 3's ack releases nothing.
        assert_eq!(o.remove(ClientMsgId(3)).unwrap().1, vec![]);
        // 1's ack releases 2 (now first of its conversation) and everything of `all` held
        // behind it, in order, each after the one before: one round trip for the burst.
        let released = o.remove(ClientMsgId(1)).unwrap().1;
        let orders: Vec<_> = released.iter().map(order).collect();
        assert_eq!(orders, [(2, 0), (4, 2), (5, 4)]);
        assert!(!o.any_held());
        // Reordered again on the way: 4 overtook 2 and waits for it; 5, still in flight,
        // is refused too and waits for 4. 2's ack releases both.
        assert_eq!(o.refused_out_of_order(ClientMsgId(4)), None);
        assert_eq!(o.refused_out_of_order(ClientMsgId(5)), None);
        let orders: Vec<_> = o
            .remove(ClientMsgId(2))
            .unwrap()
            .1
            .iter()
            .map(order)
            .collect();
        assert_eq!(orders, [(4, 0), (5, 4)]);
        // A refusal whose predecessor already left is answered with a resend at once.
        let again = o.refused_out_of_order(ClientMsgId(4)).unwrap();
        assert_eq!(order(&again), (4, 0));
        // Resending everything clears the holds.
        o.refused_out_of_order(ClientMsgId(5));
        assert!(o.any_held());
        let orders: Vec<_> = o.resend_all().iter().map(order).collect();
        assert_eq!(orders, [(4, 0), (5, 4), (6, 0)]);
        assert!(!o.any_held());
    }

    #[test]
    fn expiry_gives_up_the_oldest_and_releases_what_waited_for_them() {
        let t = base();
        let mut o = outbox(&["all"], t);
        let later = t + Duration::from_secs(10);
        o.push(ClientMsgId(2), conv("all"), Bytes::new(), later);
        o.refused_out_of_order(ClientMsgId(2));
        let max_age = Duration::from_secs(60);
        assert_eq!(o.next_expiry(max_age), Some(t + max_age));
        let (expired, released) = o.expire(t + max_age, max_age);
        assert_eq!(expired, [ClientMsgId(1)]);
        assert_eq!(released.iter().map(order).collect::<Vec<_>>(), [(2, 0)]);
        assert_eq!(o.len(), 1);
    }
}
