//! The rules of a history page (the route's `GET /history`): which pages may be asked for,
//! who may read a conversation, and which seqs a page holds. The handler only maps these
//! answers to HTTP and runs the store reads they name.
//!
//! A page is the `limit` messages just below `beforeSeq` (default: the newest). Who may read:
//! everyone `all`; the two users of a private conversation (told before any store read);
//! the members of a group, which the user's heads say (every group has a log from its
//! creation, so no head means not a member). A conversation with no log yet is an empty
//! page.

use crate::ids::{ConvId, UserId};
use crate::store::{ConvHead, StoredMessage};

/// The longest page.
pub const MAX_LIMIT: u32 = 100;
/// The page length when none is asked for.
pub const DEFAULT_LIMIT: u32 = 20;

/// A page request out of its bounds. Nothing was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    #[error("query parameter limit must be 1 to {MAX_LIMIT}")]
    Limit,
    /// Past the largest seq the API can say (its `MAX_ID`).
    #[error("query parameter beforeSeq must be a whole number from 0 to {0}")]
    BeforeSeq(u64),
}

/// A page request within its bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    /// 1 to [`MAX_LIMIT`].
    pub limit: u32,
    /// Only seqs below this; `None`: up to the head.
    pub before_seq: Option<u64>,
}

impl PageRequest {
    /// Checks the limit (default [`DEFAULT_LIMIT`]) first, then `before_seq` against
    /// `max_seq`, the largest the API can carry.
    pub fn new(
        limit: Option<u64>,
        before_seq: Option<u64>,
        max_seq: u64,
    ) -> Result<Self, PageError> {
        let limit = match u32::try_from(limit.unwrap_or(u64::from(DEFAULT_LIMIT))) {
            Ok(limit @ 1..=MAX_LIMIT) => limit,
            _ => return Err(PageError::Limit),
        };
        if before_seq.is_some_and(|seq| seq > max_seq) {
            return Err(PageError::BeforeSeq(max_seq));
        }
        Ok(Self { limit, before_seq })
    }
}

/// Whether `user` may ask for `conv`'s history at all, before any store read: a private
/// conversation is its two users' only. (Group membership needs the user's heads: see
/// [`plan`].)
pub fn may_ask(user: UserId, conv: &ConvId) -> bool {
    match *conv {
        ConvId::Private { low, high } => user == low || user == high,
        ConvId::All | ConvId::Group(_) => true,
    }
}

/// What to answer, given the user's head of the conversation (`None`: the user's heads
/// hold none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Not a member of this group: told nothing, not even its head.
    NotMember,
    /// No log yet, nothing was ever said: an empty page of log epoch 0, head 0, first
    /// available seq 1.
    NoLog,
    /// A page of the head's log: fetch `limit` messages after `after_seq` (nothing to
    /// fetch when `limit` is 0), then keep those below `before` (see [`keep`]).
    Page {
        head: ConvHead,
        after_seq: u64,
        limit: u32,
        before: u64,
    },
}

pub fn plan(conv: &ConvId, head: Option<ConvHead>, request: PageRequest) -> Plan {
    let Some(head) = head else {
        return match conv {
            ConvId::Group(_) => Plan::NotMember,
            ConvId::All | ConvId::Private { .. } => Plan::NoLog,
        };
    };
    let before = request
        .before_seq
        .unwrap_or(u64::MAX)
        .min(head.head_seq.saturating_add(1));
    let after_seq = before.saturating_sub(u64::from(request.limit) + 1);
    let span = before.saturating_sub(1).saturating_sub(after_seq);
    Plan::Page {
        head,
        after_seq,
        limit: u32::try_from(span).unwrap_or(request.limit),
        before,
    }
}

/// The fetched messages that belong on the page: a group's join seq can move a fetch's
/// window up, past `before`.
pub fn keep(messages: Vec<StoredMessage>, before: u64) -> impl Iterator<Item = StoredMessage> {
    messages.into_iter().filter(move |m| m.seq < before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{ClientMsgId, LogEpoch, UnixMillis};

    const MAX: u64 = i64::MAX as u64;

    #[test]
    fn page_request_bounds() {
        let ok = |limit, before_seq| Ok(PageRequest { limit, before_seq });
        /// (limit, beforeSeq, request or error)
        type Case = (Option<u64>, Option<u64>, Result<PageRequest, PageError>);
        let cases: &[Case] = &[
            (None, None, ok(DEFAULT_LIMIT, None)),
            (Some(1), None, ok(1, None)),
            (Some(100), Some(0), ok(100, Some(0))),
            (Some(0), None, Err(PageError::Limit)),
            (Some(101), None, Err(PageError::Limit)),
            (Some(u64::from(u32::MAX) + 1), None, Err(PageError::Limit)),
            (None, Some(MAX), ok(DEFAULT_LIMIT, Some(MAX))),
            (None, Some(MAX + 1), Err(PageError::BeforeSeq(MAX))),
            // The limit is checked first.
            (Some(0), Some(MAX + 1), Err(PageError::Limit)),
        ];
        for &(limit, before, want) in cases {
            assert_eq!(
                PageRequest::new(limit, before, MAX),
                want,
                "{limit:?} {before:?}"
            );
        }
        assert_eq!(
            PageError::BeforeSeq(MAX).to_string(),
            format!("query parameter beforeSeq must be a whole number from 0 to {MAX}")
        );
    }

    #[test]
    fn who_may_ask() {
        let private = ConvId::private(UserId(3), UserId(5)).unwrap();
        let cases = [
            (3, &private, true),
            (5, &private, true),
            (4, &private, false),
            (4, &ConvId::All, true),
            // Decided by the heads, in `plan`.
            (4, &ConvId::Group("rust".into()), true),
        ];
        for (user, conv, want) in cases {
            assert_eq!(may_ask(UserId(user), conv), want, "{user} {conv}");
        }
    }

    fn head(conv: &ConvId, head_seq: u64) -> ConvHead {
        ConvHead {
            conv: conv.clone(),
            log_epoch: LogEpoch(7),
            head_seq,
            first_available_seq: 1,
            cursor_seq: 0,
            carried_from: LogEpoch(0),
            carried_up_to: 0,
        }
    }

    #[test]
    fn page_plans() {
        const MAX_SEQ_AFTER: u64 = u64::MAX - 101;
        let group = ConvId::Group("rust".into());
        let request = |limit, before_seq| PageRequest { limit, before_seq };
        // The plan without its head (the head passed in, when there is one).
        #[derive(Debug, Clone, Copy, PartialEq)]
        enum P {
            NotMember,
            NoLog,
            Page(u64, u32, u64),
        }
        let page = P::Page;
        // (conv, head seq or no head, limit, beforeSeq, plan: after_seq, limit, before)
        type Case<'a> = (&'a ConvId, Option<u64>, u32, Option<u64>, P);
        let cases: &[Case] = &[
            (&group, None, 20, None, P::NotMember),
            (&ConvId::All, None, 20, None, P::NoLog),
            // The newest 20 of 50: 31..=50.
            (&ConvId::All, Some(50), 20, None, page(30, 20, 51)),
            // Fewer than a page.
            (&ConvId::All, Some(5), 20, None, page(0, 5, 6)),
            // Below seq 10: 1..=9.
            (&group, Some(50), 20, Some(10), page(0, 9, 10)),
            // Below seq 30: 10..=29.
            (&group, Some(50), 20, Some(30), page(9, 20, 30)),
            // Past the head counts as the head.
            (&group, Some(50), 3, Some(1_000), page(47, 3, 51)),
            // Nothing below seq 1, nor in an empty log.
            (&group, Some(50), 20, Some(1), page(0, 0, 1)),
            (&group, Some(50), 20, Some(0), page(0, 0, 0)),
            (&ConvId::All, Some(0), 20, None, page(0, 0, 1)),
            // The largest seq the API carries.
            (
                &ConvId::All,
                Some(u64::MAX),
                100,
                None,
                page(MAX_SEQ_AFTER, 100, u64::MAX),
            ),
        ];
        for &(conv, head_seq, limit, before, want) in cases {
            let h = head_seq.map(|seq| head(conv, seq));
            let got = match plan(conv, h.clone(), request(limit, before)) {
                Plan::NotMember => P::NotMember,
                Plan::NoLog => P::NoLog,
                Plan::Page {
                    head,
                    after_seq,
                    limit,
                    before,
                } => {
                    assert_eq!(Some(head), h, "the page is of the head passed in");
                    P::Page(after_seq, limit, before)
                }
            };
            assert_eq!(
                got, want,
                "{conv} head {head_seq:?} limit {limit} before {before:?}"
            );
        }
    }

    #[test]
    fn a_page_keeps_only_seqs_below_before() {
        let message = |seq| StoredMessage {
            conv: ConvId::All,
            log_epoch: LogEpoch(7),
            seq,
            sender: UserId(1),
            msg_id: ClientMsgId(u128::from(seq)),
            body: bytes::Bytes::new(),
            appended_at: UnixMillis(0),
        };
        let kept: Vec<u64> = keep((8..13).map(message).collect(), 11)
            .map(|m| m.seq)
            .collect();
        assert_eq!(kept, vec![8, 9, 10]);
    }
}
