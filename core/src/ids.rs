//! Identifiers and the two kinds of time the machines are given.

use std::fmt;
use std::str::FromStr;

/// A registered user. Assigned by the store at registration, never reused.
#[derive(
    serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
pub struct UserId(pub u64);

/// A server, by the name it registers under (unique among live servers).
#[derive(
    serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
pub struct ServerId(pub String);

impl ServerId {
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A user's login epoch. Per user, it only grows: every successful login or takeover takes
/// the next one, and every claim/route change compares it first (fencing).
#[derive(
    serde::Serialize,
    serde::Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

/// A random number chosen when a conversation's log is created. A (log epoch, seq) pair
/// names one message forever; a log that was lost and recreated gets a new epoch, so a
/// client never dedups a new message against an old one.
#[derive(
    serde::Serialize,
    serde::Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
)]
pub struct LogEpoch(pub u64);

/// 128 random bits chosen by the sending client; with the sender it makes an append
/// idempotent.
#[derive(
    serde::Serialize,
    serde::Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
)]
pub struct ClientMsgId(pub u128);

impl ClientMsgId {
    pub fn from_halves(hi: u64, lo: u64) -> Self {
        Self((u128::from(hi) << 64) | u128::from(lo))
    }
    pub fn hi(self) -> u64 {
        (self.0 >> 64) as u64
    }
    pub fn lo(self) -> u64 {
        self.0 as u64
    }
}

impl fmt::Display for ClientMsgId {
    /// UUID text form (8-4-4-4-12 hex), as the HTTP API carries it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

impl FromStr for ClientMsgId {
    type Err = IdError;
    /// Only UUID text: hex digits (either case) with dashes exactly at 8-4-4-4-12, so an id
    /// has one spelling up to case.
    fn from_str(s: &str) -> Result<Self, IdError> {
        let well_formed = s.len() == 36
            && s.bytes().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => b == b'-',
                _ => b.is_ascii_hexdigit(),
            });
        if !well_formed {
            return Err(IdError::BadMsgId);
        }
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        u128::from_str_radix(&hex, 16)
            .map(Self)
            .map_err(|_| IdError::BadMsgId)
    }
}

/// One request of the route's HTTP API, assigned by the shell, so an answer finds its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiRequestId(pub u64);

/// Wall-clock time in unix milliseconds: ticket expiry, lease deadlines in the store,
/// message timestamps. Monotonic deadlines use [`crate::time::Instant`] instead; both are always
/// passed in by the caller.
#[derive(
    serde::Serialize,
    serde::Deserialize,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    pub fn plus(self, d: std::time::Duration) -> Self {
        Self(self.0.saturating_add(d.as_millis() as u64))
    }
}

/// Longest group name accepted.
pub const MAX_GROUP_NAME: usize = 64;

/// A conversation. Canonical text form: `all`, `g:<name>`, `p:<low>:<high>`.
#[derive(
    serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
pub enum ConvId {
    /// The built-in group every user belongs to.
    All,
    /// A named group; membership lives in the store.
    Group(String),
    /// Two users; `low < high` always (built by [`ConvId::private`]).
    Private { low: UserId, high: UserId },
}

impl ConvId {
    /// The private conversation of two users, in canonical order. `None` for a user with
    /// themself.
    pub fn private(a: UserId, b: UserId) -> Option<Self> {
        match a.cmp(&b) {
            std::cmp::Ordering::Less => Some(Self::Private { low: a, high: b }),
            std::cmp::Ordering::Greater => Some(Self::Private { low: b, high: a }),
            std::cmp::Ordering::Equal => None,
        }
    }

    pub fn group(name: &str) -> Result<Self, IdError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_GROUP_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
        if ok && name != "all" {
            Ok(Self::Group(name.to_owned()))
        } else {
            Err(IdError::BadGroupName)
        }
    }

    /// For a private conversation, the participant that is not `me`.
    pub fn peer_of(&self, me: UserId) -> Option<UserId> {
        match self {
            Self::Private { low, high } if *low == me => Some(*high),
            Self::Private { low, high } if *high == me => Some(*low),
            _ => None,
        }
    }
}

impl fmt::Display for ConvId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::Group(name) => write!(f, "g:{name}"),
            Self::Private { low, high } => write!(f, "p:{}:{}", low.0, high.0),
        }
    }
}

impl FromStr for ConvId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        if s == "all" {
            return Ok(Self::All);
        }
        if let Some(name) = s.strip_prefix("g:") {
            return Self::group(name);
        }
        if let Some(pair) = s.strip_prefix("p:") {
            let (a, b) = pair.split_once(':').ok_or(IdError::BadConversation)?;
            let parse = |x: &str| -> Result<u64, IdError> {
                // Only canonical decimal: no sign, no leading zeros, so one conversation has
                // one name.
                // (`u64::from_str` alone would also take a leading `+`.)
                let digits = !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
                if !digits || (x.len() > 1 && x.starts_with('0')) {
                    return Err(IdError::BadConversation);
                }
                x.parse().map_err(|_| IdError::BadConversation)
            };
            let (low, high) = (UserId(parse(a)?), UserId(parse(b)?));
            return if low < high {
                Ok(Self::Private { low, high })
            } else {
                Err(IdError::BadConversation)
            };
        }
        Err(IdError::BadConversation)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("not a conversation id (expected all, g:<name> or p:<low>:<high>)")]
    BadConversation,
    #[error("group names are 1 to 64 of A-Z a-z 0-9 - _ . and not \"all\"")]
    BadGroupName,
    #[error("not a message id (expected a UUID)")]
    BadMsgId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_ids_round_trip_in_canonical_form() {
        for text in ["all", "g:rust", "g:a.b-c_d", "p:1:2", "p:7:12"] {
            let conv: ConvId = text.parse().unwrap();
            assert_eq!(conv.to_string(), text);
        }
        for bad in [
            "", "g:", "g:all", "p:2:1", "p:1:1", "p:01:2", "p:1", "x", "g:a b", "p:-1:2", "p:+1:2",
            "p:1:+2",
        ] {
            assert!(bad.parse::<ConvId>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            ConvId::private(UserId(9), UserId(3)),
            Some(ConvId::Private {
                low: UserId(3),
                high: UserId(9)
            })
        );
        assert_eq!(ConvId::private(UserId(3), UserId(3)), None);
    }

    #[test]
    fn msg_ids_split_and_print_as_uuids() {
        let id = ClientMsgId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(ClientMsgId::from_halves(id.hi(), id.lo()), id);
        assert_eq!(id.to_string(), "01234567-89ab-cdef-fedc-ba9876543210");
        assert_eq!(id.to_string().parse::<ClientMsgId>(), Ok(id));
        assert_eq!(
            "01234567-89AB-CDEF-fedc-ba9876543210".parse::<ClientMsgId>(),
            Ok(id)
        );
        for bad in [
            "0123456789abcdeffedcba9876543210",
            // Four dashes and 32 digits, but not at 8-4-4-4-12 (found by the http_bodies
            // fuzz target's one-spelling check).
            "0123456789ab-cdef-fedc-ba98765432-10",
            "--0123456789abcdeffedcba9876543210",
            "+1234567-89ab-cdef-fedc-ba9876543210",
        ] {
            assert!(bad.parse::<ClientMsgId>().is_err(), "{bad:?} parsed");
        }
    }
}
