//! The HTTP API's credentials, both HMACs under the route's bearer secret: bearer tokens
//! ([`BearerKey`]: `<user>.<epoch>.<expires_at_ms>.<mac>`, bound to one session) and the
//! resume tokens handed out with each login ([`ResumeToken`], derived so a retried login
//! can prove it is the same client). Login tickets, signed with another key for the
//! servers, are in [`crate::route::tickets`].

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ids::{Epoch, UnixMillis, UserId};

type HmacSha256 = Hmac<Sha256>;

/// 32 random bytes handed to the client with each login; presenting it lets the same client
/// take over its own live claim at once (failover) instead of waiting out the lease.
#[derive(Clone, PartialEq, Eq)]
pub struct ResumeToken(pub [u8; 32]);

impl std::fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeToken(..)")
    }
}

/// Signs and checks the HTTP API's bearer tokens: `<user>.<epoch>.<expires_at_ms>.<mac>`,
/// decimal numbers and a hex HMAC-SHA256 over them. Bound to (user, epoch), so a token
/// only ever acts for the session it was issued with.
///
/// During a rotation it also holds the previous secret: tokens are minted with the current
/// one and accepted under either, so tokens issued before the switch keep working.
#[derive(Clone)]
pub struct BearerKey {
    secret: Vec<u8>,
    previous: Option<Vec<u8>>,
}

impl std::fmt::Debug for BearerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerKey(..)")
    }
}

/// What a valid bearer token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BearerClaims {
    pub user: UserId,
    pub epoch: Epoch,
    pub expires_at: UnixMillis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not match")]
    BadMac,
    #[error("token expired")]
    Expired,
}

impl BearerKey {
    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        Self {
            secret: secret.into(),
            previous: None,
        }
    }

    /// Also accept tokens signed with `previous` (a rotation's old secret); never mint with it.
    pub fn with_previous(mut self, previous: Option<Vec<u8>>) -> Self {
        self.previous = previous;
        self
    }

    pub fn mint(&self, claims: &BearerClaims) -> String {
        let mac = self.mac(claims).finalize().into_bytes();
        format!(
            "{}.{}.{}.{}",
            claims.user.0,
            claims.epoch.0,
            claims.expires_at.0,
            hex_encode(&mac)
        )
    }

    /// Checks format, signature (constant time) and expiry against the wall clock `now`.
    pub fn verify(&self, token: &str, now: UnixMillis) -> Result<BearerClaims, TokenError> {
        let mut parts = token.split('.');
        let (Some(user), Some(epoch), Some(expires), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        let claims = BearerClaims {
            user: UserId(parse_decimal(user)?),
            epoch: Epoch(parse_decimal(epoch)?),
            expires_at: UnixMillis(parse_decimal(expires)?),
        };
        let mac = hex_decode(mac).ok_or(TokenError::Malformed)?;
        let signed_by = |secret: &[u8]| mac_of(secret, &claims).verify_slice(&mac).is_ok();
        if !signed_by(&self.secret) && !self.previous.as_deref().is_some_and(signed_by) {
            return Err(TokenError::BadMac);
        }
        if claims.expires_at <= now {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// The resume token a login presenting `parent` is given with the claim of `epoch`.
    /// Keyed, so only routes can compute it: a route that meets a claim whose token hash is
    /// this derivation of the token presented knows the request is a retry of the login
    /// that made the claim (its answer was lost: a route crashed while holding it), while
    /// a client cannot step from an old token to a newer one by itself.
    pub fn derive_resume(&self, parent: &ResumeToken, user: UserId, epoch: Epoch) -> ResumeToken {
        derive_resume_with(&self.secret, parent, user, epoch)
    }

    /// Whether `hash` is the hash of `parent`'s derivation for `epoch`, under the current
    /// secret or, during a rotation, the previous one (the claim may be another route's).
    pub fn derives_to(
        &self,
        parent: &ResumeToken,
        user: UserId,
        epoch: Epoch,
        hash: &[u8; 32],
    ) -> bool {
        std::iter::once(&self.secret)
            .chain(self.previous.as_ref())
            .any(|secret| {
                let derived = derive_resume_with(secret, parent, user, epoch);
                bool::from(resume_token_hash(&derived).ct_eq(hash))
            })
    }

    fn mac(&self, claims: &BearerClaims) -> HmacSha256 {
        mac_of(&self.secret, claims)
    }
}

fn mac_of(secret: &[u8], claims: &BearerClaims) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(b"cim-bearer-v1");
    mac.update(&claims.user.0.to_be_bytes());
    mac.update(&claims.epoch.0.to_be_bytes());
    mac.update(&claims.expires_at.0.to_be_bytes());
    mac
}

fn derive_resume_with(
    secret: &[u8],
    parent: &ResumeToken,
    user: UserId,
    epoch: Epoch,
) -> ResumeToken {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(b"cim-resume-v1");
    mac.update(&parent.0);
    mac.update(&user.0.to_be_bytes());
    mac.update(&epoch.0.to_be_bytes());
    ResumeToken(mac.finalize().into_bytes().into())
}

/// Canonical decimal only (no sign, no leading zero), so a token has one spelling.
fn parse_decimal(s: &str) -> Result<u64, TokenError> {
    let canonical =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    if !canonical {
        return Err(TokenError::Malformed);
    }
    s.parse().map_err(|_| TokenError::Malformed)
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex of exactly a SHA-256 MAC.
fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    if s.len() != 64 {
        return None;
    }
    s.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// SHA-256 of a resume token, as claims store it.
pub fn resume_token_hash(token: &ResumeToken) -> [u8; 32] {
    Sha256::digest(token.0).into()
}
