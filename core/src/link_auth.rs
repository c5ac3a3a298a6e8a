//! Route <-> server internal link authentication: mutual challenge-response over a shared
//! secret.
//!
//! ```text
//! server -> route  LinkHello  { server_id, server_nonce }
//! route  -> server LinkAuth   { route_id, mac_r, route_nonce }   mac_r = HMAC(secret, "route->server" | transcript)
//! server -> route  LinkAuthOk { mac_s }                          mac_s = HMAC(secret, "server->route" | transcript)
//! ```
//!
//! The transcript is both ids and both nonces, each length-prefixed. Each side's fresh nonce
//! makes an old `LinkAuth` useless against a new hello (no replay); the direction label
//! makes one side's MAC useless as the other's (no reflection). MACs are compared in
//! constant time.
//!
//! The MAC proves only that the peer knows the secret, which every route and server shares;
//! the route must still check that `LinkHello::server_id` names the server it dialled.

use cim_proto::{LinkAuth, LinkAuthOk, LinkHello};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::ServerId;

type HmacSha256 = Hmac<Sha256>;

/// Shortest nonce accepted: 128 bits.
pub const MIN_NONCE_LEN: usize = 16;
/// Longest nonce accepted, so a peer cannot make us MAC arbitrary amounts.
pub const MAX_NONCE_LEN: usize = 64;

const ROUTE_TO_SERVER: &[u8] = b"cim-link-v1 route->server";
const SERVER_TO_ROUTE: &[u8] = b"cim-link-v1 server->route";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkAuthError {
    #[error("nonce must be 16 to 64 bytes")]
    BadNonce,
    #[error("both sides used the same nonce")]
    NonceReused,
    #[error("link authentication failed")]
    BadMac,
}

/// The server's challenge. `nonce` should be 16 fresh random bytes or more.
pub fn server_hello(server_id: &ServerId, nonce: &[u8]) -> LinkHello {
    LinkHello {
        server_id: server_id.0.clone(),
        nonce: nonce.to_vec(),
    }
}

/// The route's answer to `hello`: its proof and its own challenge. Fails on a hello whose
/// nonce is too short or too long (network input) or a `route_nonce` of the wrong size.
pub fn route_answer(
    secret: &[u8],
    hello: &LinkHello,
    route_id: &str,
    route_nonce: &[u8],
) -> Result<LinkAuth, LinkAuthError> {
    check_nonce(&hello.nonce)?;
    check_nonce(route_nonce)?;
    if hello.nonce == route_nonce {
        return Err(LinkAuthError::NonceReused);
    }
    let mac = transcript_mac(secret, ROUTE_TO_SERVER, hello, route_id, route_nonce)
        .finalize()
        .into_bytes()
        .to_vec();
    Ok(LinkAuth {
        route_id: route_id.to_owned(),
        mac,
        nonce: route_nonce.to_vec(),
    })
}

/// The server checks the route's proof against the hello it sent, and answers with its own.
pub fn server_check(
    secret: &[u8],
    hello: &LinkHello,
    auth: &LinkAuth,
) -> Result<LinkAuthOk, LinkAuthError> {
    check_nonce(&auth.nonce)?;
    if auth.nonce == hello.nonce {
        return Err(LinkAuthError::NonceReused);
    }
    transcript_mac(secret, ROUTE_TO_SERVER, hello, &auth.route_id, &auth.nonce)
        .verify_slice(&auth.mac)
        .map_err(|_| LinkAuthError::BadMac)?;
    let mac = transcript_mac(secret, SERVER_TO_ROUTE, hello, &auth.route_id, &auth.nonce)
        .finalize()
        .into_bytes()
        .to_vec();
    Ok(LinkAuthOk { mac })
}

/// [`server_check`] against each of `secrets` in turn (the current one first, then one kept
/// during a rotation), answering with the first that verifies, so a route still on the
/// previous secret checks the answer with the secret it used. Nothing is learnt from which
/// one failed: the error is the same.
pub fn server_check_any(
    secrets: &[&[u8]],
    hello: &LinkHello,
    auth: &LinkAuth,
) -> Result<LinkAuthOk, LinkAuthError> {
    let mut result = Err(LinkAuthError::BadMac);
    for secret in secrets {
        result = server_check(secret, hello, auth);
        if !matches!(result, Err(LinkAuthError::BadMac)) {
            return result;
        }
    }
    result
}

/// The route checks the server's proof over the transcript it took part in.
pub fn route_check(
    secret: &[u8],
    hello: &LinkHello,
    auth: &LinkAuth,
    ok: &LinkAuthOk,
) -> Result<(), LinkAuthError> {
    transcript_mac(secret, SERVER_TO_ROUTE, hello, &auth.route_id, &auth.nonce)
        .verify_slice(&ok.mac)
        .map_err(|_| LinkAuthError::BadMac)
}

fn check_nonce(nonce: &[u8]) -> Result<(), LinkAuthError> {
    if (MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&nonce.len()) {
        Ok(())
    } else {
        Err(LinkAuthError::BadNonce)
    }
}

fn transcript_mac(
    secret: &[u8],
    direction: &[u8],
    hello: &LinkHello,
    route_id: &str,
    route_nonce: &[u8],
) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(direction);
    for field in [
        hello.server_id.as_bytes(),
        &hello.nonce,
        route_id.as_bytes(),
        route_nonce,
    ] {
        // Length-prefixed so no two transcripts share an encoding.
        mac.update(&(field.len() as u64).to_be_bytes());
        mac.update(field);
    }
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"link-secret";
    const SERVER_NONCE: [u8; 16] = [1; 16];
    const ROUTE_NONCE: [u8; 16] = [2; 16];

    fn hello() -> LinkHello {
        server_hello(&ServerId::new("s1"), &SERVER_NONCE)
    }

    #[test]
    fn good_handshake_authenticates_both_ways() {
        let hello = hello();
        let auth = route_answer(SECRET, &hello, "r1", &ROUTE_NONCE).unwrap();
        assert_eq!(auth.route_id, "r1");
        assert_eq!(auth.nonce, ROUTE_NONCE);
        let ok = server_check(SECRET, &hello, &auth).unwrap();
        assert_eq!(route_check(SECRET, &hello, &auth, &ok), Ok(()));
    }

    #[test]
    fn wrong_secret_fails_both_ways() {
        let hello = hello();
        // A route without the secret is refused by the server.
        let forged = route_answer(b"other", &hello, "r1", &ROUTE_NONCE).unwrap();
        assert_eq!(
            server_check(SECRET, &hello, &forged),
            Err(LinkAuthError::BadMac)
        );
        // A server without the secret is refused by the route.
        let auth = route_answer(SECRET, &hello, "r1", &ROUTE_NONCE).unwrap();
        let fake_ok = server_check(b"other", &hello, &forged).unwrap();
        assert_eq!(
            route_check(SECRET, &hello, &auth, &fake_ok),
            Err(LinkAuthError::BadMac)
        );
    }

    #[test]
    fn a_server_rotating_its_secret_accepts_either_and_answers_in_kind() {
        let hello = hello();
        let secrets: [&[u8]; 2] = [b"new-link-secret", SECRET];
        for secret in secrets {
            let auth = route_answer(secret, &hello, "r1", &ROUTE_NONCE).unwrap();
            let ok = server_check_any(&secrets, &hello, &auth).unwrap();
            assert_eq!(route_check(secret, &hello, &auth, &ok), Ok(()));
        }
        let stranger = route_answer(b"other", &hello, "r1", &ROUTE_NONCE).unwrap();
        assert_eq!(
            server_check_any(&secrets, &hello, &stranger),
            Err(LinkAuthError::BadMac)
        );
        assert_eq!(
            server_check_any(&[], &hello, &stranger),
            Err(LinkAuthError::BadMac)
        );
    }

    #[test]
    fn replayed_auth_fails_against_a_new_hello() {
        let old_hello = hello();
        let old_auth = route_answer(SECRET, &old_hello, "r1", &ROUTE_NONCE).unwrap();
        let new_hello = server_hello(&ServerId::new("s1"), &[3; 16]);
        assert_eq!(
            server_check(SECRET, &new_hello, &old_auth),
            Err(LinkAuthError::BadMac)
        );
        // A replayed LinkAuthOk fails against the route's new nonce too.
        let old_ok = server_check(SECRET, &old_hello, &old_auth).unwrap();
        let new_auth = route_answer(SECRET, &old_hello, "r1", &[4; 16]).unwrap();
        assert_eq!(
            route_check(SECRET, &old_hello, &new_auth, &old_ok),
            Err(LinkAuthError::BadMac)
        );
    }

    #[test]
    fn reflected_mac_fails() {
        let hello = hello();
        let auth = route_answer(SECRET, &hello, "r1", &ROUTE_NONCE).unwrap();
        // A fake server echoes the route's own MAC back as its proof.
        let reflected = LinkAuthOk {
            mac: auth.mac.clone(),
        };
        assert_eq!(
            route_check(SECRET, &hello, &auth, &reflected),
            Err(LinkAuthError::BadMac)
        );
        // A fake route answers a server's hello with that server's own nonce, hoping for a
        // symmetric transcript.
        let echo = LinkAuth {
            route_id: "r1".into(),
            mac: auth.mac.clone(),
            nonce: hello.nonce.clone(),
        };
        assert_eq!(
            server_check(SECRET, &hello, &echo),
            Err(LinkAuthError::NonceReused)
        );
    }

    #[test]
    fn tampered_fields_fail() {
        let hello = hello();
        let auth = route_answer(SECRET, &hello, "r1", &ROUTE_NONCE).unwrap();
        let renamed = LinkAuth {
            route_id: "r2".into(),
            ..auth.clone()
        };
        assert_eq!(
            server_check(SECRET, &hello, &renamed),
            Err(LinkAuthError::BadMac)
        );
        let mut truncated = auth.clone();
        truncated.mac.truncate(16);
        assert_eq!(
            server_check(SECRET, &hello, &truncated),
            Err(LinkAuthError::BadMac)
        );
        let other_server = server_hello(&ServerId::new("s2"), &SERVER_NONCE);
        assert_eq!(
            server_check(SECRET, &other_server, &auth),
            Err(LinkAuthError::BadMac)
        );
    }

    #[test]
    fn nonce_sizes_are_checked() {
        let short = server_hello(&ServerId::new("s1"), &[1; 15]);
        assert_eq!(
            route_answer(SECRET, &short, "r1", &ROUTE_NONCE),
            Err(LinkAuthError::BadNonce)
        );
        let long = server_hello(&ServerId::new("s1"), &[1; 65]);
        assert_eq!(
            route_answer(SECRET, &long, "r1", &ROUTE_NONCE),
            Err(LinkAuthError::BadNonce)
        );
        assert_eq!(
            route_answer(SECRET, &hello(), "r1", &[2; 15]),
            Err(LinkAuthError::BadNonce)
        );
        // The server refuses a short route nonce even with a valid MAC over it.
        let short_nonce = [2u8; 8];
        let auth = LinkAuth {
            route_id: "r1".into(),
            mac: transcript_mac(SECRET, ROUTE_TO_SERVER, &hello(), "r1", &short_nonce)
                .finalize()
                .into_bytes()
                .to_vec(),
            nonce: short_nonce.to_vec(),
        };
        assert_eq!(
            server_check(SECRET, &hello(), &auth),
            Err(LinkAuthError::BadNonce)
        );
        let max = server_hello(&ServerId::new("s1"), &[1; 64]);
        assert!(route_answer(SECRET, &max, "r1", &ROUTE_NONCE).is_ok());
    }
}
