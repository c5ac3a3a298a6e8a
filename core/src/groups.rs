//! The rules of groups on the route's API (`/group/create`, `/group/join`, `/group/leave`,
//! `/group/list`): what each action asks of the store for the acting user, and what the
//! store's answer means. The handlers only map these to HTTP.
//!
//! Anyone may create a group of a free name (they become its owner and first member), join
//! any group that exists (again: still a member, at their first join seq), and leave a group
//! they are in. A user acts only as themselves (the bearer token's user, checked by the
//! handler like every other request). The store makes each step atomic.

use crate::ids::{ConvId, UserId};
use crate::store::{ConvHead, StoreCommand, StoreReply};

/// What a user does to a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupAction {
    Create,
    Join,
    Leave,
}

/// Why an action did not happen. Nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GroupRefusal {
    #[error("a group of this name exists")]
    Exists,
    #[error("no such group")]
    NoSuchGroup,
    #[error("not a member of this group")]
    NotMember,
}

impl GroupAction {
    /// The store step for `user` doing this to `group`.
    pub fn command(self, group: ConvId, user: UserId) -> StoreCommand {
        match self {
            Self::Create => StoreCommand::CreateGroup {
                conv: group,
                owner: user,
            },
            Self::Join => StoreCommand::JoinGroup { conv: group, user },
            Self::Leave => StoreCommand::LeaveGroup { conv: group, user },
        }
    }

    /// What the store's answer to [`GroupAction::command`] means: done (with the words to
    /// say so) or refused; `None` for an answer of another kind (a shell bug).
    pub fn outcome(self, reply: &StoreReply) -> Option<Result<&'static str, GroupRefusal>> {
        Some(match (self, reply) {
            (Self::Create, StoreReply::GroupCreated { created: true }) => Ok("group created"),
            (Self::Create, StoreReply::GroupCreated { created: false }) => {
                Err(GroupRefusal::Exists)
            }
            (Self::Join, StoreReply::GroupJoined(Some(_))) => Ok("joined"),
            (Self::Join, StoreReply::GroupJoined(None)) => Err(GroupRefusal::NoSuchGroup),
            (Self::Leave, StoreReply::GroupLeft { was_member: true }) => Ok("left"),
            (Self::Leave, StoreReply::GroupLeft { was_member: false }) => {
                Err(GroupRefusal::NotMember)
            }
            _ => return None,
        })
    }
}

/// The groups a user is in, from their heads (`all` and private conversations are not
/// groups), in the heads' order.
pub fn groups_of(heads: Vec<ConvHead>) -> Vec<String> {
    heads
        .into_iter()
        .filter_map(|h| match h.conv {
            ConvId::Group(name) => Some(name),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{LogEpoch, UnixMillis};
    use crate::memstore::{MemoryStore, MemoryStoreConfig};

    /// Steps against the reference store, in order: (user, action, group, outcome).
    #[test]
    fn who_may_do_what_to_a_group() {
        use GroupAction::*;
        use GroupRefusal::*;
        let mut store = MemoryStore::new(MemoryStoreConfig::default());
        let rust = || ConvId::group("rust").unwrap();
        let steps: &[(u64, GroupAction, Result<&str, GroupRefusal>)] = &[
            (1, Join, Err(NoSuchGroup)),
            (1, Leave, Err(NotMember)),
            (1, Create, Ok("group created")),
            (2, Create, Err(Exists)),
            (1, Create, Err(Exists)),
            (2, Leave, Err(NotMember)),
            (2, Join, Ok("joined")),
            (2, Join, Ok("joined")),
            (2, Leave, Ok("left")),
            (2, Leave, Err(NotMember)),
            // The owner may leave too; the group stays, and they may come back.
            (1, Leave, Ok("left")),
            (1, Join, Ok("joined")),
        ];
        for (i, &(user, action, want)) in steps.iter().enumerate() {
            let command = action.command(rust(), UserId(user));
            let reply = store.apply(UnixMillis(0), &command);
            assert_eq!(
                action.outcome(&reply),
                Some(want),
                "step {i}: {user} {action:?}"
            );
        }
        assert_eq!(
            Join.outcome(&StoreReply::GroupLeft { was_member: true }),
            None
        );
    }

    #[test]
    fn the_groups_of_a_user_are_their_group_heads() {
        let head = |conv: ConvId| ConvHead {
            conv,
            log_epoch: LogEpoch(1),
            head_seq: 0,
            first_available_seq: 1,
            cursor_seq: 0,
            carried_from: LogEpoch(0),
            carried_up_to: 0,
        };
        let heads = vec![
            head(ConvId::All),
            head(ConvId::group("b").unwrap()),
            head(ConvId::private(UserId(1), UserId(2)).unwrap()),
            head(ConvId::group("a").unwrap()),
        ];
        assert_eq!(groups_of(heads), vec!["b".to_owned(), "a".to_owned()]);
    }
}
