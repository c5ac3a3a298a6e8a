//! Login tickets: the route's signed word to one server that one user may open a session
//! there under one epoch, until an expiry.
//!
//! A ticket is HMAC-SHA256, keyed by a numbered secret shared by routes and servers, over
//! the key id, user, server, epoch and expiry. Key ids let operators rotate: mint with the
//! new key while servers still accept the old one. The server checks the MAC, the server id
//! and the expiry (with a small skew allowance, since route and server clocks differ); the
//! epoch is checked against the store by `BindSession`, so a stale ticket never binds.

use std::collections::BTreeMap;
use std::time::Duration;

use cim_proto::Ticket;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::{Epoch, ServerId, UnixMillis, UserId};

type HmacSha256 = Hmac<Sha256>;

/// The numbered secrets a node knows, and which one it mints with.
#[derive(Clone)]
pub struct TicketKeys {
    active: u32,
    keys: BTreeMap<u32, Vec<u8>>,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("TicketKeys")
            .field("active", &self.active)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What a valid ticket grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub user: UserId,
    pub server: ServerId,
    pub epoch: Epoch,
    pub expires_at: UnixMillis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket signed with an unknown key")]
    UnknownKey,
    #[error("ticket signature does not match")]
    BadMac,
    #[error("ticket expired")]
    Expired,
    #[error("ticket is for another server")]
    WrongServer,
}

impl TicketKeys {
    /// A key ring with one key, which is also the one minted with.
    pub fn new(key_id: u32, secret: impl Into<Vec<u8>>) -> Self {
        Self {
            active: key_id,
            keys: BTreeMap::from([(key_id, secret.into())]),
        }
    }

    /// Also accept tickets signed with `key_id` (an older or newer key during rotation).
    pub fn accept(mut self, key_id: u32, secret: impl Into<Vec<u8>>) -> Self {
        self.keys.insert(key_id, secret.into());
        self
    }

    pub fn mint(&self, grant: &Grant) -> Ticket {
        let mut ticket = Ticket {
            key_id: self.active,
            user_id: grant.user.0,
            server_id: grant.server.0.clone(),
            epoch: grant.epoch.0,
            expires_at_ms: grant.expires_at.0,
            mac: Vec::new(),
        };
        // The active key is always in the ring (constructor invariant).
        let mac = self.mac(&ticket).expect("active key is in the ring");
        ticket.mac = mac.finalize().into_bytes().to_vec();
        ticket
    }

    /// Checks the signature, the server and the expiry (`now` may be up to `skew` behind the
    /// route's clock).
    pub fn verify(
        &self,
        ticket: &Ticket,
        this_server: &ServerId,
        now: UnixMillis,
        skew: Duration,
    ) -> Result<Grant, TicketError> {
        let mac = self.mac(ticket).ok_or(TicketError::UnknownKey)?;
        // Constant-time comparison.
        mac.verify_slice(&ticket.mac)
            .map_err(|_| TicketError::BadMac)?;
        if ticket.server_id != this_server.0 {
            return Err(TicketError::WrongServer);
        }
        if UnixMillis(ticket.expires_at_ms).plus(skew) <= now {
            return Err(TicketError::Expired);
        }
        Ok(Grant {
            user: UserId(ticket.user_id),
            server: ServerId(ticket.server_id.clone()),
            epoch: Epoch(ticket.epoch),
            expires_at: UnixMillis(ticket.expires_at_ms),
        })
    }

    fn mac(&self, ticket: &Ticket) -> Option<HmacSha256> {
        let secret = self.keys.get(&ticket.key_id)?;
        // HMAC accepts keys of any length.
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"cim-ticket-v1");
        mac.update(&ticket.key_id.to_be_bytes());
        mac.update(&ticket.user_id.to_be_bytes());
        // Length-prefixed so no two (server, epoch) pairs share an encoding.
        mac.update(&(ticket.server_id.len() as u64).to_be_bytes());
        mac.update(ticket.server_id.as_bytes());
        mac.update(&ticket.epoch.to_be_bytes());
        mac.update(&ticket.expires_at_ms.to_be_bytes());
        Some(mac)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SKEW: Duration = Duration::from_secs(2);

    fn grant() -> Grant {
        Grant {
            user: UserId(7),
            server: ServerId::new("s1"),
            epoch: Epoch(3),
            expires_at: UnixMillis(10_000),
        }
    }

    #[test]
    fn debug_names_key_ids_but_never_secrets() {
        let keys = TicketKeys::new(1, b"secret-one".to_vec()).accept(2, b"secret-two".to_vec());
        let shown = format!("{keys:?}");
        assert!(shown.contains("key_ids: [1, 2]"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn ticket_checks_table() {
        let keys = TicketKeys::new(1, b"secret-one".to_vec());
        let good = keys.mint(&grant());
        let forged_user = Ticket {
            user_id: 8,
            ..good.clone()
        };
        let forged_epoch = Ticket {
            epoch: 4,
            ..good.clone()
        };
        let other_key = TicketKeys::new(1, b"secret-two".to_vec()).mint(&grant());
        let unknown_key = Ticket {
            key_id: 9,
            ..good.clone()
        };
        let mut truncated_mac = good.clone();
        truncated_mac.mac.truncate(16);

        type Case<'a> = (
            &'a str,
            &'a Ticket,
            &'a str,
            u64,
            Result<Grant, TicketError>,
        );
        let cases: Vec<Case> = vec![
            ("valid", &good, "s1", 9_000, Ok(grant())),
            ("valid within skew", &good, "s1", 11_999, Ok(grant())),
            (
                "expired past skew",
                &good,
                "s1",
                12_000,
                Err(TicketError::Expired),
            ),
            (
                "wrong server",
                &good,
                "s2",
                9_000,
                Err(TicketError::WrongServer),
            ),
            (
                "forged user",
                &forged_user,
                "s1",
                9_000,
                Err(TicketError::BadMac),
            ),
            (
                "forged epoch",
                &forged_epoch,
                "s1",
                9_000,
                Err(TicketError::BadMac),
            ),
            (
                "other secret",
                &other_key,
                "s1",
                9_000,
                Err(TicketError::BadMac),
            ),
            (
                "unknown key id",
                &unknown_key,
                "s1",
                9_000,
                Err(TicketError::UnknownKey),
            ),
            (
                "truncated mac",
                &truncated_mac,
                "s1",
                9_000,
                Err(TicketError::BadMac),
            ),
        ];
        for (name, ticket, server, now, want) in cases {
            let got = keys.verify(ticket, &ServerId::new(server), UnixMillis(now), SKEW);
            assert_eq!(got, want, "{name}");
        }
        // Sanity: the server id matters to the MAC too, not just to the comparison.
        let moved = Ticket {
            server_id: "s2".into(),
            ..good
        };
        assert_eq!(
            keys.verify(&moved, &ServerId::new("s2"), UnixMillis(0), SKEW),
            Err(TicketError::BadMac)
        );
    }

    #[test]
    fn rotation_accepts_old_key_and_mints_with_new() {
        let old = TicketKeys::new(1, b"old".to_vec());
        let rotated = TicketKeys::new(2, b"new".to_vec()).accept(1, b"old".to_vec());
        let s1 = ServerId::new("s1");
        let from_old = old.mint(&grant());
        assert_eq!(
            rotated.verify(&from_old, &s1, UnixMillis(0), SKEW),
            Ok(grant())
        );
        let from_new = rotated.mint(&grant());
        assert_eq!(from_new.key_id, 2);
        assert_eq!(
            old.verify(&from_new, &s1, UnixMillis(0), SKEW),
            Err(TicketError::UnknownKey)
        );
    }
}
