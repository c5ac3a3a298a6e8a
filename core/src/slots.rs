//! Where a key lives on a Redis Cluster: the hash tags of the key layout, Redis's hash-slot
//! rule, and which shard (master) owns a slot. Pure, so that the Redis store
//! (`cim-io`'s `redis/cluster.rs` and `redis/keys.rs`) and the simulation's sharded store
//! split and place keys by one rule.
//!
//! Every key of one user carries the tag `{u:<id>}`, every key of one conversation the tag
//! `{c:<conv>}`, and the names table and user counter the tag `{names}` (the key layout in
//! `cim-io`'s `store` module docs).

use crate::ids::{ConvId, UserId};

/// Redis Cluster's slot count.
pub const SLOTS: u16 = 16_384;

/// The hash tag of every key of `user`.
pub fn user_tag(user: UserId) -> String {
    format!("u:{}", user.0)
}

/// The hash tag of every key of `conv` (its canonical text form after `c:`). Group names
/// are restricted by `ConvId::group` to characters that cannot end the tag early.
pub fn conv_tag(conv: &ConvId) -> String {
    format!("c:{conv}")
}

/// The hash tag of the names table and the user counter.
pub const NAMES_TAG: &str = "names";

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag (the text between the first `{`
/// and the next `}`, if not empty), else of the whole key, modulo 16384 — Redis's rule.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tag = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16_xmodem(tag.unwrap_or(bytes)) % SLOTS
}

/// The slot of every key carrying hash tag `tag` (not empty).
pub fn tag_slot(tag: &str) -> u16 {
    crc16_xmodem(tag.as_bytes()) % SLOTS
}

pub fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The masters of a cluster and the life each one is in. Slots are spread over `count`
/// masters in contiguous, nearly equal ranges, as `redis-cli --cluster create` assigns them (up to rounding).
/// Each master has its own incarnation (its `run_id`: a restarted or promoted master has a
/// new one), which is what the lost-tail rule compares a log's or a claim's record against.
/// One master holding every slot is a single node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shards {
    incarnations: Vec<u64>,
}

impl Default for Shards {
    fn default() -> Self {
        Self::single(0)
    }
}

impl Shards {
    /// `count` masters (at least one), each in incarnation `incarnation`.
    pub fn new(count: usize, incarnation: u64) -> Self {
        Self {
            incarnations: vec![incarnation; count.max(1)],
        }
    }

    /// One node holding every slot.
    pub fn single(incarnation: u64) -> Self {
        Self::new(1, incarnation)
    }

    pub fn count(&self) -> usize {
        self.incarnations.len()
    }

    /// The master owning `slot`.
    pub fn of_slot(&self, slot: u16) -> usize {
        usize::from(slot) * self.count() / usize::from(SLOTS)
    }

    /// The master owning the keys tagged `tag`.
    pub fn of_tag(&self, tag: &str) -> usize {
        self.of_slot(tag_slot(tag))
    }

    pub fn of_user(&self, user: UserId) -> usize {
        self.of_tag(&user_tag(user))
    }

    pub fn of_conv(&self, conv: &ConvId) -> usize {
        self.of_tag(&conv_tag(conv))
    }

    pub fn of_names(&self) -> usize {
        self.of_tag(NAMES_TAG)
    }

    /// The incarnation of master `shard`.
    pub fn incarnation(&self, shard: usize) -> u64 {
        self.incarnations[shard % self.count()]
    }

    pub fn set_incarnation(&mut self, shard: usize, incarnation: u64) {
        let count = self.count();
        self.incarnations[shard % count] = incarnation;
    }

    /// Every master in `incarnation`.
    pub fn set_all(&mut self, incarnation: u64) {
        self.incarnations.iter_mut().for_each(|i| *i = incarnation);
    }

    /// The incarnation of the master holding `user`'s keys.
    pub fn incarnation_of_user(&self, user: UserId) -> u64 {
        self.incarnation(self.of_user(user))
    }

    /// The incarnation of the master holding `conv`'s keys.
    pub fn incarnation_of_conv(&self, conv: &ConvId) -> u64 {
        self.incarnation(self.of_conv(conv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_redis_rules() {
        // Redis Cluster specification's example, and the redis crate's own test key.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(key_slot("foo"), 12182);
        // The hash tag alone decides; an empty tag does not count.
        assert_eq!(key_slot("cim:claim:{u:7}"), key_slot("cim:route:{u:7}"));
        assert_eq!(key_slot("{u:7}"), key_slot("u:7"));
        assert_eq!(key_slot("cim:claim:{u:7}"), tag_slot(&user_tag(UserId(7))));
        assert_eq!(key_slot("a{}b"), crc16_xmodem(b"a{}b") % 16_384);
    }

    #[test]
    fn shards_split_the_slots_in_ranges() {
        let shards = Shards::new(3, 1);
        assert_eq!(shards.of_slot(0), 0);
        assert_eq!(shards.of_slot(5461), 0);
        assert_eq!(shards.of_slot(5462), 1);
        assert_eq!(shards.of_slot(SLOTS - 1), 2);
        assert_eq!(Shards::single(1).of_slot(SLOTS - 1), 0);
    }
}
