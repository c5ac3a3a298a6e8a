//! Bearer tokens: the format, expiry, rotation.

use super::*;

#[test]
fn bearer_rotation_mints_with_the_current_secret_and_accepts_the_previous() {
    let claims = BearerClaims {
        user: UserId(7),
        epoch: Epoch(3),
        expires_at: UnixMillis(10_000),
    };
    let now = UnixMillis(9_999);
    let old = BearerKey::new(b"old".to_vec());
    let rotating = BearerKey::new(b"new".to_vec()).with_previous(Some(b"old".to_vec()));
    let new_only = BearerKey::new(b"new".to_vec());
    let before = old.mint(&claims);
    let after = rotating.mint(&claims);
    assert_eq!(rotating.verify(&before, now), Ok(claims));
    assert_eq!(
        new_only.verify(&after, now),
        Ok(claims),
        "minted with the new one"
    );
    assert_eq!(old.verify(&after, now), Err(TokenError::BadMac));
    assert_eq!(new_only.verify(&before, now), Err(TokenError::BadMac));
    assert_eq!(
        rotating.verify(&before, UnixMillis(10_000)),
        Err(TokenError::Expired)
    );
}

#[test]
fn bearer_token_table() {
    let key = BearerKey::new(b"k".to_vec());
    let claims = BearerClaims {
        user: UserId(7),
        epoch: Epoch(3),
        expires_at: UnixMillis(10_000),
    };
    let good = key.mint(&claims);
    let mac = good.rsplit('.').next().unwrap().to_owned();
    let now = UnixMillis(9_999);
    let cases: Vec<(&str, String, UnixMillis, Result<BearerClaims, TokenError>)> = vec![
        ("valid", good.clone(), now, Ok(claims)),
        (
            "expired",
            good.clone(),
            UnixMillis(10_000),
            Err(TokenError::Expired),
        ),
        (
            "other user",
            format!("8.3.10000.{mac}"),
            now,
            Err(TokenError::BadMac),
        ),
        (
            "newer epoch",
            format!("7.4.10000.{mac}"),
            now,
            Err(TokenError::BadMac),
        ),
        (
            "longer life",
            format!("7.3.20000.{mac}"),
            now,
            Err(TokenError::BadMac),
        ),
        (
            "other key",
            BearerKey::new(b"j".to_vec()).mint(&claims),
            now,
            Err(TokenError::BadMac),
        ),
        (
            "leading zero",
            format!("07.3.10000.{mac}"),
            now,
            Err(TokenError::Malformed),
        ),
        (
            "plus sign",
            format!("+7.3.10000.{mac}"),
            now,
            Err(TokenError::Malformed),
        ),
        (
            "uppercase mac",
            format!("7.3.10000.{}", mac.to_uppercase()),
            now,
            Err(TokenError::Malformed),
        ),
        (
            "short mac",
            format!("7.3.10000.{}", &mac[..62]),
            now,
            Err(TokenError::Malformed),
        ),
        (
            "extra part",
            format!("{good}.x"),
            now,
            Err(TokenError::Malformed),
        ),
        (
            "missing part",
            format!("7.3.{mac}"),
            now,
            Err(TokenError::Malformed),
        ),
        ("empty", String::new(), now, Err(TokenError::Malformed)),
        (
            "overflow",
            format!("99999999999999999999.3.10000.{mac}"),
            now,
            Err(TokenError::Malformed),
        ),
        (
            "non-ascii",
            format!("7.3.10000.{}é", &mac[..62]),
            now,
            Err(TokenError::Malformed),
        ),
    ];
    for (label, token, now, want) in cases {
        assert_eq!(key.verify(&token, now), want, "{label}");
    }
}
