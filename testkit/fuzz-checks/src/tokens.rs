//! Login tickets (`cim_core::route::tickets`), the HTTP API's bearer tokens and the resume-token
//! derivation (`cim_core::route::login::BearerKey`): genuine ones minted with the current or
//! the previous secret, then forged, mutated (one character or field changed, cut, padded,
//! upper-cased) and arbitrary ones.
//!
//! Invariants: a token verifies if and only if it is, byte for byte, one a key holder
//! minted (current or previous secret), unexpired, for this server (tickets); a verified
//! token's claims are the ones it was minted with; a bearer token has one spelling (what
//! verifies re-mints to the same text); a resume token derives to a stored hash only if it
//! is that hash's parent; nothing panics.

use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use cim_core::ids::{Epoch, ServerId, UnixMillis, UserId};
use cim_core::route::login::{BearerClaims, BearerKey, ResumeToken, resume_token_hash};
use cim_core::route::tickets::{Grant, TicketKeys};
use cim_proto::Ticket;

use crate::Reached;

const CURRENT: &[u8] = b"fuzz-bearer-current";
const PREVIOUS: &[u8] = b"fuzz-bearer-previous";
const TICKET_SECRET: &[u8] = b"fuzz-ticket-secret";
const OLD_TICKET_SECRET: &[u8] = b"fuzz-ticket-old";
const NOW: u64 = 1_700_000_000_000;
const SKEW: Duration = Duration::from_secs(2);
const MAX_OPS: usize = 64;

pub const FEATURES: &[&str] = &[
    "bearer_ok",
    "bearer_previous_ok",
    "bearer_expired",
    "bearer_bad_mac",
    "bearer_malformed",
    "ticket_ok",
    "ticket_rotated_ok",
    "ticket_expired",
    "ticket_wrong_server",
    "ticket_bad_mac",
    "ticket_unknown_key",
    "resume_derived",
];

#[derive(Debug, Arbitrary)]
enum Op {
    Bearer {
        claims: (u64, u64, i32),
        signer: Signer,
        mutation: Mutation,
    },
    BearerText(String),
    Ticket {
        user: u64,
        epoch: u64,
        ttl_ms: i32,
        server: u8,
        signer: Signer,
        field: Option<(u8, u64)>,
    },
    TicketRaw {
        key_id: u32,
        user_id: u64,
        server_id: String,
        epoch: u64,
        expires_at_ms: u64,
        mac: Vec<u8>,
    },
    Resume {
        parent: [u8; 32],
        user: u64,
        epoch: u64,
        /// Ask about another parent, user or epoch, or an arbitrary hash.
        probe: Probe,
    },
}

#[derive(Debug, Arbitrary)]
enum Signer {
    Current,
    Previous,
    Stranger,
}

#[derive(Debug, Arbitrary)]
enum Mutation {
    None,
    Replace { at: u16, with: char },
    Insert { at: u16, ch: char },
    Remove { at: u16 },
    Truncate { at: u16 },
    Append(String),
    Uppercase,
    Whitespace,
}

#[derive(Debug, Arbitrary)]
enum Probe {
    Same,
    OtherParent([u8; 32]),
    OtherUser(u64),
    OtherEpoch(u64),
    Hash([u8; 32]),
}

pub fn check(data: &[u8]) -> Reached {
    let mut u = Unstructured::new(data);
    let mut t = Tokens::new();
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        t.apply(op);
    }
    t.reached
}

#[derive(Debug)]
struct Tokens {
    bearer: BearerKey,
    previous_only: BearerKey,
    current_only: BearerKey,
    tickets: TicketKeys,
    /// Key 1 signs now; key 2 was the previous key, still accepted during a rotation.
    new_key: TicketKeys,
    old_key: TicketKeys,
    /// Bearer tokens minted by a holder of an accepted secret, with their claims.
    minted: Vec<(String, BearerClaims)>,
    /// Tickets minted with an accepted key.
    minted_tickets: Vec<Ticket>,
    reached: Reached,
}

impl Tokens {
    fn new() -> Self {
        Self {
            bearer: BearerKey::new(CURRENT).with_previous(Some(PREVIOUS.to_vec())),
            previous_only: BearerKey::new(PREVIOUS),
            current_only: BearerKey::new(CURRENT),
            tickets: TicketKeys::new(1, TICKET_SECRET).accept(2, OLD_TICKET_SECRET),
            new_key: TicketKeys::new(1, TICKET_SECRET),
            old_key: TicketKeys::new(2, OLD_TICKET_SECRET),
            minted: Vec::new(),
            minted_tickets: Vec::new(),
            reached: Reached::new(),
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Bearer {
                claims: (user, epoch, ttl_ms),
                signer,
                mutation,
            } => {
                let claims = BearerClaims {
                    user: UserId(user),
                    epoch: Epoch(epoch),
                    expires_at: UnixMillis((NOW as i64 + i64::from(ttl_ms)) as u64),
                };
                let token = match signer {
                    Signer::Current => self.bearer.mint(&claims),
                    Signer::Previous => self.previous_only.mint(&claims),
                    Signer::Stranger => BearerKey::new(b"stranger".to_vec()).mint(&claims),
                };
                if !matches!(signer, Signer::Stranger) {
                    self.minted.push((token.clone(), claims));
                }
                if matches!(signer, Signer::Previous) && claims.expires_at.0 > NOW {
                    // Verified under the previous secret; counted when it verifies below.
                    if self.bearer.verify(&token, UnixMillis(NOW)).is_ok() {
                        self.reached.insert("bearer_previous_ok");
                    }
                }
                self.verify_bearer(&mutate(&token, &mutation));
            }
            Op::BearerText(text) => self.verify_bearer(&text),
            Op::Ticket {
                user,
                epoch,
                ttl_ms,
                server,
                signer,
                field,
            } => {
                let grant = Grant {
                    user: UserId(user),
                    server: ServerId::new(format!("s{}", server % 3)),
                    epoch: Epoch(epoch),
                    expires_at: UnixMillis((NOW as i64 + i64::from(ttl_ms)) as u64),
                };
                let mut ticket = match signer {
                    Signer::Current => self.new_key.mint(&grant),
                    Signer::Previous => self.old_key.mint(&grant),
                    Signer::Stranger => TicketKeys::new(1, b"stranger".to_vec()).mint(&grant),
                };
                if !matches!(signer, Signer::Stranger) {
                    self.minted_tickets.push(ticket.clone());
                }
                if let Some((which, value)) = field {
                    match which % 6 {
                        0 => ticket.key_id = value as u32,
                        1 => ticket.user_id = value,
                        2 => ticket.server_id = format!("s{}", value % 4),
                        3 => ticket.epoch = value,
                        4 => ticket.expires_at_ms = value,
                        _ => {
                            let i = (value as usize) % ticket.mac.len().max(1);
                            if let Some(b) = ticket.mac.get_mut(i) {
                                *b ^= (value >> 8) as u8 | 1;
                            }
                        }
                    }
                }
                self.verify_ticket(&ticket);
            }
            Op::TicketRaw {
                key_id,
                user_id,
                server_id,
                epoch,
                expires_at_ms,
                mac,
            } => self.verify_ticket(&Ticket {
                key_id,
                user_id,
                server_id,
                epoch,
                expires_at_ms,
                mac,
            }),
            Op::Resume {
                parent,
                user,
                epoch,
                probe,
            } => {
                let parent = ResumeToken(parent);
                let derived = self
                    .bearer
                    .derive_resume(&parent, UserId(user), Epoch(epoch));
                let hash = resume_token_hash(&derived);
                let (p, u, e, h) = match probe {
                    Probe::Same => (parent.clone(), user, epoch, hash),
                    Probe::OtherParent(other) => (ResumeToken(other), user, epoch, hash),
                    Probe::OtherUser(other) => (parent.clone(), other, epoch, hash),
                    Probe::OtherEpoch(other) => (parent.clone(), user, other, hash),
                    Probe::Hash(other) => (parent.clone(), user, epoch, other),
                };
                let claimed = self.bearer.derives_to(&p, UserId(u), Epoch(e), &h);
                // Recomputed independently: the current or the previous secret's derivation.
                let cur =
                    resume_token_hash(&self.current_only.derive_resume(&p, UserId(u), Epoch(e)));
                let prev = resume_token_hash(&self.previous_derive(&p, UserId(u), Epoch(e)));
                let truly = h == cur || h == prev;
                assert_eq!(claimed, truly, "derives_to");
                assert!(
                    self.bearer
                        .derives_to(&parent, UserId(user), Epoch(epoch), &hash)
                );
                assert_ne!(derived, parent, "a derived token equals its parent");
                self.reached.insert("resume_derived");
            }
        }
    }

    fn previous_derive(&self, parent: &ResumeToken, user: UserId, epoch: Epoch) -> ResumeToken {
        self.previous_only.derive_resume(parent, user, epoch)
    }

    fn verify_bearer(&mut self, token: &str) {
        let now = UnixMillis(NOW);
        let result = self.bearer.verify(token, now);
        let genuine = self.minted.iter().find(|(t, _)| t == token);
        match (&result, genuine) {
            (Ok(claims), Some((_, minted))) => {
                assert_eq!(claims, minted, "claims changed in transit");
                assert!(claims.expires_at > now);
                // One spelling: the current secret re-mints it, or the previous one does.
                let again = self.current_only.mint(claims);
                let old = self.previous_only.mint(claims);
                assert!(again == token || old == token);
                self.reached.insert("bearer_ok");
            }
            (Ok(claims), None) => {
                panic!("a bearer token nobody minted verifies: {token:?} {claims:?}")
            }
            (Err(e), Some((_, minted))) => {
                assert!(
                    minted.expires_at <= now,
                    "a genuine unexpired token is refused: {e}"
                );
                self.reached.insert("bearer_expired");
            }
            (Err(e), None) => {
                use cim_core::route::login::TokenError;
                self.reached.insert(match e {
                    TokenError::Malformed => "bearer_malformed",
                    TokenError::BadMac => "bearer_bad_mac",
                    TokenError::Expired => "bearer_expired",
                });
            }
        }
    }

    fn verify_ticket(&mut self, ticket: &Ticket) {
        let now = UnixMillis(NOW);
        let this = ServerId::new("s1");
        let result = self.tickets.verify(ticket, &this, now, SKEW);
        let genuine = self.minted_tickets.contains(ticket);
        let unexpired = UnixMillis(ticket.expires_at_ms).plus(SKEW) > now;
        let ours = ticket.server_id == "s1";
        match &result {
            Ok(grant) => {
                assert!(genuine, "a ticket nobody minted verifies: {ticket:?}");
                assert!(unexpired && ours, "{ticket:?} should not verify");
                assert_eq!(
                    (
                        grant.user.0,
                        grant.epoch.0,
                        grant.expires_at.0,
                        grant.server.as_str()
                    ),
                    (ticket.user_id, ticket.epoch, ticket.expires_at_ms, "s1")
                );
                self.reached.insert(if ticket.key_id == 2 {
                    "ticket_rotated_ok"
                } else {
                    "ticket_ok"
                });
            }
            Err(e) => {
                assert!(
                    !(genuine && unexpired && ours),
                    "a genuine ticket is refused: {e}"
                );
                use cim_core::route::tickets::TicketError;
                self.reached.insert(match e {
                    TicketError::UnknownKey => "ticket_unknown_key",
                    TicketError::BadMac => "ticket_bad_mac",
                    TicketError::Expired => "ticket_expired",
                    TicketError::WrongServer => "ticket_wrong_server",
                });
            }
        }
    }
}

fn mutate(token: &str, mutation: &Mutation) -> String {
    let mut chars: Vec<char> = token.chars().collect();
    let at = |i: u16, len: usize| usize::from(i) % len.max(1);
    match mutation {
        Mutation::None => {}
        Mutation::Replace { at: i, with } => {
            let i = at(*i, chars.len());
            if let Some(c) = chars.get_mut(i) {
                *c = *with;
            }
        }
        Mutation::Insert { at: i, ch } => {
            let i = at(*i, chars.len() + 1);
            chars.insert(i.min(chars.len()), *ch);
        }
        Mutation::Remove { at: i } => {
            let i = at(*i, chars.len());
            if i < chars.len() {
                chars.remove(i);
            }
        }
        Mutation::Truncate { at: i } => chars.truncate(at(*i, chars.len())),
        Mutation::Append(s) => chars.extend(s.chars()),
        Mutation::Uppercase => return token.to_uppercase(),
        Mutation::Whitespace => return format!(" {token}\n"),
    }
    chars.into_iter().collect()
}
