//! Registration, plain logins and logouts: codes, credentials, names.

use super::*;

#[test]
fn register_table() {
    let mut h = Harness::new(&["s1"]);
    assert_eq!(
        h.register(0, "alice", "pw"),
        vec![RouteEvent::Registered {
            api: ApiRequestId(1),
            result: Ok(Registered {
                user: UserId(1),
                name: "alice".into()
            })
        }]
    );
    let stored = &h.store.accounts[&UserId(1)];
    assert!(accounts::verify_password("pw", &stored.password_hash));
    assert!(!accounts::verify_password("pw2", &stored.password_hash));

    let cases: &[(&str, &str, RegisterFailure, &str)] = &[
        ("alice", "other", RegisterFailure::NameTaken, "3000"),
        (
            "",
            "pw",
            RegisterFailure::Invalid(RegisterError::EmptyName),
            "3000",
        ),
        (
            "bob",
            "",
            RegisterFailure::Invalid(RegisterError::EmptyPassword),
            "3000",
        ),
        (
            "b b",
            "pw",
            RegisterFailure::Invalid(RegisterError::BadNameCharacter),
            "3000",
        ),
    ];
    for (name, pw, want, code) in cases {
        let events = h.register(0, name, pw);
        match &events[..] {
            [RouteEvent::Registered { result: Err(e), .. }] => {
                assert_eq!(e, want, "{name:?}");
                assert_eq!(e.code(), *code);
            }
            other => panic!("{name:?}: {other:?}"),
        }
    }
    assert_eq!(h.store.accounts.len(), 1);
    // Validation failures never reach the store.
    assert!(h.m.poll_store().is_none());
}

#[test]
fn fresh_login_claims_epoch_one_and_mints_credentials() {
    let mut h = Harness::with_alice(&["s1"]);
    let events = h.login(1_000, 1, None);
    assert_eq!(events.len(), 1, "{events:?}");
    let a = login_ok(&events).clone();
    let wall = h.at(1_000).1;
    assert_eq!(
        (a.user, a.epoch, a.server.id.as_str()),
        (UserId(1), Epoch(1), "s1")
    );

    let grant = TicketKeys::new(1, TICKET_SECRET.to_vec())
        .verify(&a.ticket, &ServerId::new("s1"), wall, Duration::ZERO)
        .unwrap();
    assert_eq!(grant.epoch, Epoch(1));
    assert_eq!(grant.expires_at, wall.plus(Duration::from_secs(30)));

    let bearer = h.m.verify_bearer(&a.token, wall).unwrap();
    assert_eq!((bearer.user, bearer.epoch), (UserId(1), Epoch(1)));

    let state = h.store.claims.load(UserId(1));
    let claim = state.claim.unwrap();
    assert_eq!(state.epoch, Epoch(1));
    assert_eq!(claim.server, ServerId::new("s1"));
    assert_eq!(claim.lease_until, wall.plus(Duration::from_secs(30)));
    assert_eq!(claim.resume_token_hash, resume_token_hash(&a.resume_token));
    assert!(h.m.poll_timeout().is_none(), "nothing pending");
}

#[test]
fn account_mismatches_are_9100_and_claim_nothing() {
    let mut h = Harness::with_alice(&["s1"]);
    let cases: &[(&str, u64, &str, &str)] = &[
        ("wrong password", 1, "alice", "nope"),
        ("unknown user", 9, "alice", "pw"),
        ("name of another id", 1, "mallory", "pw"),
        ("overlong password", 1, "alice", &"p".repeat(129)),
    ];
    for (label, user, name, pw) in cases {
        h.start_login(0, *user, name, pw, None);
        let e = login_err(&h.run(0));
        assert_eq!(e, LoginError::AccountMismatch, "{label}");
        assert_eq!(e.code(), "9100");
    }
    assert_eq!(h.store.claims.load(UserId(1)), ClaimState::default());
}

#[test]
fn names_ignore_case_and_id_zero_logs_in_by_name() {
    let cases: &[(&str, u64, &str, &str, Option<u64>)] = &[
        ("as registered", 1, "alice", "pw", Some(1)),
        ("other case", 1, "ALICE", "pw", Some(1)),
        ("mixed case", 1, "aLiCe", "pw", Some(1)),
        ("by name, id 0", 0, "Alice", "pw", Some(1)),
        ("by name, wrong password", 0, "alice", "nope", None),
        ("by unknown name", 0, "mallory", "pw", None),
        ("other case, wrong id", 2, "ALICE", "pw", None),
    ];
    for (label, user, name, pw, want) in cases {
        let mut h = Harness::with_alice(&["s1"]);
        h.start_login(0, *user, name, pw, None);
        let events = h.run(0);
        match want {
            Some(id) => assert_eq!(login_ok(&events).user, UserId(*id), "{label}"),
            None => assert_eq!(login_err(&events), LoginError::AccountMismatch, "{label}"),
        }
    }
}

#[test]
fn duplicate_login_is_5000() {
    let mut h = Harness::with_alice(&["s1"]);
    let first = login_ok(&h.login(0, 1, None)).clone();
    let before = h.store.claims.load(UserId(1));
    let e = login_err(&h.login(29_999, 1, None));
    assert_eq!((e, e.code()), (LoginError::RepeatLogin, "5000"));
    // A wrong resume token is no better than none.
    let wrong = ResumeToken([0x55; 32]);
    assert_eq!(
        login_err(&h.login(1_000, 1, Some(&wrong))),
        LoginError::RepeatLogin
    );
    assert_eq!(h.store.claims.load(UserId(1)), before);
    assert_ne!(first.resume_token, wrong);
}

#[test]
fn expired_claim_gives_a_fresh_login() {
    let mut h = Harness::with_alice(&["s1"]);
    login_ok(&h.login(0, 1, None));
    // claim_ttl is 30 s: live at 29.999 s, expired at 30 s.
    assert_eq!(
        login_err(&h.login(29_999, 1, None)),
        LoginError::RepeatLogin
    );
    let events = h.login(30_000, 1, None);
    assert_eq!(events.len(), 1, "no kick for an expired claim: {events:?}");
    assert_eq!(login_ok(&events).epoch, Epoch(2));
}

#[test]
fn no_live_server_is_7100() {
    let mut h = Harness::with_alice(&[]);
    let e = login_err(&h.login(0, 1, None));
    assert_eq!((e, e.code()), (LoginError::NoServerAvailable, "7100"));
    assert_eq!(h.store.claims.load(UserId(1)), ClaimState::default());
}

#[test]
fn an_old_token_cannot_log_out_a_newer_session() {
    let mut h = Harness::with_alice(&["s1"]);
    let first = login_ok(&h.login(0, 1, None)).clone();
    assert_eq!(
        h.login(1_000, 1, Some(&first.resume_token)),
        vec![kick_old("s1", 1, 2)]
    );
    let second = login_ok(&h.kick_done(1_500, "s1", 1, 2)).clone();
    let events = h.logout(2_000, &first.token);
    assert!(
        matches!(
            events[..],
            [RouteEvent::LoggedOut {
                result: Ok(LoggedOut {
                    user: UserId(1),
                    released: false
                }),
                ..
            }]
        ),
        "{events:?}"
    );
    assert_eq!(
        h.store.claims.load(UserId(1)).claim.unwrap().epoch,
        Epoch(2)
    );
    let events = h.logout(3_000, &second.token);
    assert!(
        matches!(
            events[..],
            [RouteEvent::LoggedOut {
                result: Ok(LoggedOut {
                    user: UserId(1),
                    released: true
                }),
                ..
            }]
        ),
        "{events:?}"
    );
    assert_eq!(
        h.store.claims.load(UserId(1)),
        ClaimState {
            epoch: Epoch(2),
            claim: None,
            foreign: false,
        }
    );
    // A forged token never reaches the store.
    let events = h.logout(3_000, "1.2.99999999999999.00");
    assert!(matches!(
        events[..],
        [RouteEvent::LoggedOut {
            result: Err(LogoutError::BadToken(TokenError::Malformed)),
            ..
        }]
    ));
    assert!(h.m.poll_store().is_none());
}

/// A lost registry view refuses every login with 7100 before its password is checked (the
/// servers cut off with the view have fenced themselves), a login already past its check
/// too; registration goes on; the view back, logins are placed again.
#[test]
fn a_lost_registry_view_refuses_logins_until_it_is_back() {
    let mut h = Harness::with_alice(&["s1", "s2"]);
    h.m.handle_registry_lost(h.at(1_000).0);
    assert!(h.m.is_registry_lost());
    let api = h.start_login(1_000, 1, "alice", "pw", None);
    assert!(h.m.poll_password().is_none(), "no password checked");
    assert!(h.m.poll_store().is_none(), "nothing read or written");
    let events = h.run(1_000);
    assert_eq!(
        events,
        vec![RouteEvent::LoggedIn {
            api,
            result: Err(LoginError::NoServerAvailable)
        }]
    );
    assert_eq!(LoginError::NoServerAvailable.code(), "7100");
    // A wrong password learns nothing more while the view is lost.
    h.start_login(1_000, 1, "alice", "wrong", None);
    assert_eq!(login_err(&h.run(1_000)), LoginError::NoServerAvailable);
    assert!(matches!(
        h.register(1_000, "bob", "pw")[..],
        [RouteEvent::Registered { result: Ok(_), .. }]
    ));

    h.m.handle_registry_back(h.at(2_000).0);
    let events = h.login(2_000, 1, None);
    assert_eq!(login_ok(&events).epoch, Epoch(1));

    // Lost between the password check and the placement: refused, and no claim written.
    let mut h = Harness::with_alice(&["s1"]);
    h.start_login(3_000, 1, "alice", "pw", None);
    assert!(matches!(
        h.store_step(3_000),
        StoreCommand::LoadAccount { .. }
    ));
    assert!(matches!(
        h.store_step(3_000),
        StoreCommand::CountLoginFailure { .. }
    ));
    h.password(3_000);
    h.m.handle_registry_lost(h.at(3_000).0);
    let events = h.run(3_000);
    assert_eq!(login_err(&events), LoginError::NoServerAvailable);
    assert!(
        h.store.claims.load(UserId(1)).claim.is_none(),
        "no claim made"
    );
}
