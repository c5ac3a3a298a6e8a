//! Which route link carries each `RouteSend`.
//!
//! **Ordering guarantee.** A user's sends that are still unanswered all share one link, so
//! they reach the route in the order the client sent them; only once every one of them is
//! answered (or their link is gone) does the user's next send pick a link afresh. With
//! nothing in flight a user's link is picked by a multiplicative hash of the user id among
//! the links up, so users spread over every route.

use std::collections::BTreeMap;

use crate::ids::UserId;

/// A route link, named by the shell (in accept order). Never reused within one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteLinkId(pub u64);

/// The links up, what each carries, and each user's link while they have sends on one.
#[derive(Debug, Default)]
pub(super) struct RouteLinks {
    /// Links up, each with its sends written (or queued) and not yet answered:
    /// request id → user.
    up: BTreeMap<RouteLinkId, BTreeMap<u64, UserId>>,
    /// The link of each unanswered send.
    carried_by: BTreeMap<u64, RouteLinkId>,
    /// The link each user's sends go over while any is unanswered, with how many are.
    users: BTreeMap<UserId, (RouteLinkId, usize)>,
}

impl RouteLinks {
    pub(super) fn len(&self) -> usize {
        self.up.len()
    }

    /// Unanswered sends on `link`.
    pub(super) fn in_flight(&self, link: RouteLinkId) -> usize {
        self.up.get(&link).map_or(0, BTreeMap::len)
    }

    pub(super) fn link_up(&mut self, link: RouteLinkId) {
        self.up.entry(link).or_default();
    }

    /// The link is gone: returns its unanswered sends (by request id) for the caller to
    /// fail; their users pick a live link next time.
    pub(super) fn link_down(&mut self, link: RouteLinkId) -> Vec<u64> {
        let Some(in_flight) = self.up.remove(&link) else {
            return Vec::new();
        };
        self.users.retain(|_, (l, _)| *l != link);
        for request_id in in_flight.keys() {
            self.carried_by.remove(request_id);
        }
        in_flight.into_keys().collect()
    }

    /// Every link is gone (draining); nothing in flight is answered any more.
    pub(super) fn clear(&mut self) {
        *self = Self::default();
    }

    /// The link for `user`'s next send: the one its unanswered sends are on, or else one
    /// picked by user id among the links up. `None` when no link is up.
    pub(super) fn pick(&self, user: UserId) -> Option<RouteLinkId> {
        if let Some(&(link, _)) = self.users.get(&user) {
            return Some(link);
        }
        let n = self.up.len() as u64;
        if n == 0 {
            return None;
        }
        // A multiplicative hash: consecutive user ids land on different links.
        let index = user.0.wrapping_mul(0x9E37_79B9_7F4A_7C15) % n;
        self.up.keys().nth(index as usize).copied()
    }

    /// `request_id` of `user` goes out on `link` (one `pick` returned).
    pub(super) fn carry(&mut self, link: RouteLinkId, request_id: u64, user: UserId) {
        let Some(in_flight) = self.up.get_mut(&link) else {
            return;
        };
        in_flight.insert(request_id, user);
        self.carried_by.insert(request_id, link);
        self.users.entry(user).or_insert((link, 0)).1 += 1;
    }

    /// The send was answered, or never left (its link's queue refused it): it no longer
    /// holds its user to its link. Returns the link it was on.
    pub(super) fn settle(&mut self, request_id: u64) -> Option<RouteLinkId> {
        let link = self.carried_by.remove(&request_id)?;
        let user = self.up.get_mut(&link)?.remove(&request_id)?;
        if let Some((_, in_flight)) = self.users.get_mut(&user) {
            *in_flight = in_flight.saturating_sub(1);
            if *in_flight == 0 {
                self.users.remove(&user);
            }
        }
        Some(link)
    }

    /// Panics unless the three tables agree.
    pub(super) fn check_invariants(&self) {
        let mut counts: BTreeMap<UserId, (RouteLinkId, usize)> = BTreeMap::new();
        for (&link, in_flight) in &self.up {
            for (request_id, &user) in in_flight {
                assert_eq!(self.carried_by.get(request_id), Some(&link));
                let entry = counts.entry(user).or_insert((link, 0));
                assert_eq!(entry.0, link, "user {user} has sends on two links");
                entry.1 += 1;
            }
        }
        assert_eq!(
            self.carried_by.len(),
            self.up.values().map(BTreeMap::len).sum::<usize>()
        );
        assert_eq!(counts, self.users);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: RouteLinkId = RouteLinkId(1);
    const B: RouteLinkId = RouteLinkId(2);
    const C: RouteLinkId = RouteLinkId(3);

    fn links(up: &[RouteLinkId]) -> RouteLinks {
        let mut l = RouteLinks::default();
        for &link in up {
            l.link_up(link);
        }
        l
    }

    #[test]
    fn no_link_up_picks_none() {
        assert_eq!(links(&[]).pick(UserId(7)), None);
    }

    #[test]
    fn users_spread_by_hash_over_the_links_up() {
        // (links up, user, link picked): the index is user × φ·2⁶⁴ mod the link count,
        // over the links in id order.
        let cases: &[(&[RouteLinkId], u64, RouteLinkId)] = &[
            (&[A], 1, A),
            (&[A], 2, A),
            (&[A, B], 1, B),
            (&[A, B], 2, A),
            (&[A, B], 3, B),
            (&[A, B, C], 1, B),
            (&[A, B, C], 2, B),
            (&[A, B, C], 3, C),
            (&[A, B, C], 4, C),
            (&[A, C], 2, A),
            (&[B, C], 2, B),
        ];
        for &(up, user, want) in cases {
            let index = user.wrapping_mul(0x9E37_79B9_7F4A_7C15) % up.len() as u64;
            assert_eq!(
                up[index as usize], want,
                "table entry for user {user} on {up:?}"
            );
            assert_eq!(
                links(up).pick(UserId(user)),
                Some(want),
                "user {user} on {up:?}"
            );
        }
    }

    #[test]
    fn unanswered_sends_hold_their_user_to_their_link() {
        let mut l = links(&[A, B]);
        let user = UserId(3); // hashes to B of two, C of three
        assert_eq!(l.pick(user), Some(B));
        l.carry(B, 10, user);
        l.carry(B, 11, user);
        // A link that comes up meanwhile changes the hash, not the user's link.
        l.link_up(C);
        assert_eq!(l.pick(user), Some(B));
        assert_eq!(l.settle(10), Some(B));
        assert_eq!(l.pick(user), Some(B), "one send still unanswered");
        assert_eq!(l.settle(11), Some(B));
        // All answered: picked afresh over A, B, C.
        assert_eq!(l.pick(user), Some(C));
        assert_eq!(l.settle(11), None, "a second answer changes nothing");
        l.check_invariants();
    }

    #[test]
    fn a_link_going_down_fails_its_sends_and_frees_its_users() {
        let mut l = links(&[A, B]);
        l.carry(A, 12, UserId(1));
        l.carry(B, 11, UserId(2));
        l.carry(A, 10, UserId(3));
        assert_eq!((l.in_flight(A), l.in_flight(B)), (2, 1));
        assert_eq!(l.link_down(A), vec![10, 12], "in request order");
        l.check_invariants();
        assert_eq!(l.in_flight(A), 0);
        assert_eq!(l.pick(UserId(1)), Some(B));
        assert_eq!(l.pick(UserId(2)), Some(B));
        assert_eq!(
            l.settle(12),
            None,
            "an answer on a dead link counts for nothing"
        );
        assert_eq!(l.link_down(A), Vec::<u64>::new(), "down once");
        l.clear();
        assert_eq!((l.len(), l.pick(UserId(2))), (0, None));
    }

    #[test]
    fn a_send_that_never_left_does_not_hold_its_user() {
        let mut l = links(&[A, B]);
        l.carry(B, 1, UserId(2));
        assert_eq!(l.settle(1), Some(B));
        assert_eq!(l.in_flight(B), 0);
        l.check_invariants();
        // A send on a link that is not up is not recorded.
        l.carry(C, 2, UserId(2));
        assert_eq!(l.settle(2), None);
        l.check_invariants();
    }
}
