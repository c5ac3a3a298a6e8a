//! Session resumption: a login that presents its claim's resume token and the
//! **resumption secret** handed out with that claim needs no password.
//!
//! Why: a password check is argon2, tens of milliseconds of CPU with production
//! parameters, so a server crash that re-homes thousands of users at once queues them
//! behind a few hashing threads (about 75 logins/s on 2 cores), and every client would have
//! to keep its user's password to re-home at all. A resumption is one SHA-256 and a
//! constant-time compare.
//!
//! The rule:
//! - every successful login (by password or by resumption) issues a new secret: 256 bits
//!   from the route's RNG, returned once in the answer and stored only as its hash, with an
//!   expiry, in the new claim ([`crate::store::Claim::resume_secret`]) beside the resume
//!   token's hash. So the secret is bound to the user and to the resume token it was issued
//!   with: both must be presented, and both must be the claim's current ones;
//! - a resumption writes its new claim with `ResumeClaim`, which succeeds only while the
//!   stored claim still holds the secret presented: the secret is used once (rotated), so a
//!   copy taken before that use fails afterwards, and its failure is counted against the
//!   account like a wrong password (the per-account throttle);
//! - it is revoked by whatever ends or replaces the claim's secret: `/offLine` and an
//!   account deletion (they release the claim), a password change and an explicit
//!   `RevokeResumption` (they drop the secret, keeping the session), and any later login
//!   (which issues the next one).
//!
//! The hash is a plain SHA-256 over a domain tag, the user id and the secret, not an HMAC
//! under a route key: the secret is 256 uniformly random bits, so its hash cannot be
//! inverted or searched without a key (a key protects low-entropy inputs such as passwords),
//! and with no key nothing has to be shared or rotated — a bearer-secret rotation does not
//! revoke every user's secret, and any route checks any other's. The store never holds a
//! secret, only what cannot be turned back into one.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ids::{UnixMillis, UserId};
use crate::store::Claim;

/// 32 random bytes the client keeps (in private storage) and presents, with its resume
/// token, instead of the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ResumptionSecret(pub [u8; 32]);

impl std::fmt::Debug for ResumptionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a credential.
        f.write_str("ResumptionSecret(..)")
    }
}

impl ResumptionSecret {
    /// A new secret from `rng` (the route's own; production seeds it from the OS).
    pub fn random(rng: &mut impl RngCore) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self(secret)
    }
}

/// What the store keeps of `secret` for `user`.
pub fn secret_hash(user: UserId, secret: &ResumptionSecret) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(b"cim-resume-secret-v1");
    hash.update(user.0.to_be_bytes());
    hash.update(secret.0);
    hash.finalize().into()
}

/// Why a resumption was refused. Never told to the client (it only learns "refused: log in
/// with the password"); for logs, metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No claim: never logged in, logged out (`/offLine`), or the account was deleted.
    #[error("no claim to resume")]
    NoClaim,
    /// The resume token is not the claim's: a later login replaced it.
    #[error("the resume token is not the claim's")]
    OtherToken,
    /// The claim holds no secret: revoked (password change, explicit revoke) or issued by
    /// a route that did not issue secrets.
    #[error("no resumption secret on the claim")]
    Revoked,
    #[error("the resumption secret has expired")]
    Expired,
    /// Another secret: this one was used already (or never issued).
    #[error("the resumption secret does not match")]
    Mismatch,
}

/// Checks a resumption against the claim as read from the store: the claim's resume token
/// hash must be `token_hash`, and its secret `secret_hash`, unexpired at `now` (wall clock).
/// Both compares are constant-time.
pub fn check(
    claim: Option<&Claim>,
    token_hash: &[u8; 32],
    secret_hash: &[u8; 32],
    now: UnixMillis,
) -> Result<(), Refused> {
    let claim = claim.ok_or(Refused::NoClaim)?;
    if !bool::from(claim.resume_token_hash.ct_eq(token_hash)) {
        return Err(Refused::OtherToken);
    }
    let stored = claim.resume_secret.as_ref().ok_or(Refused::Revoked)?;
    if !bool::from(stored.hash.ct_eq(secret_hash)) {
        return Err(Refused::Mismatch);
    }
    if stored.expires_at <= now {
        return Err(Refused::Expired);
    }
    Ok(())
}
