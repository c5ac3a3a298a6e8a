//! Store answers the machine must survive: lost claim races, timeouts, errors.

use super::*;

#[test]
fn lost_claim_race_redecides_to_5000() {
    let mut h = Harness::with_alice(&["s1"]);
    let (now, wall) = h.at(0);
    // Login A reads the account and the (empty) claim state...
    h.start_login(0, 1, "alice", "pw", None);
    let load_account = h.m.poll_store().unwrap();
    let reply = h.store.answer(wall, &load_account.command);
    h.m.handle_store_reply(now, wall, load_account.id, Ok(reply));
    h.store_step(0); // counts the attempt
    h.password(0);
    let load_claim = h.m.poll_store().unwrap();
    assert_eq!(
        load_claim.command,
        StoreCommand::LoadClaim { user: UserId(1) }
    );
    let stale = h.store.answer(wall, &load_claim.command);
    // ...then login B wins the claim before A's ReplaceClaim lands.
    let b = h.login(0, 1, None);
    assert_eq!(login_ok(&b).epoch, Epoch(1));
    h.m.handle_store_reply(now, wall, load_claim.id, Ok(stale));
    let replace = h.m.poll_store().unwrap();
    assert!(matches!(
        replace.command,
        StoreCommand::ReplaceClaim {
            expected: Epoch(0),
            ..
        }
    ));
    let lost = h.store.answer(wall, &replace.command);
    assert!(matches!(lost, StoreReply::ClaimReplaced(Err(_))));
    h.m.handle_store_reply(now, wall, replace.id, Ok(lost));
    // A re-decides against the winner's live claim, without another store round trip.
    assert!(h.m.poll_store().is_none());
    assert_eq!(login_err(&h.run(0)), LoginError::RepeatLogin);
    assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(1));
}

#[test]
fn endless_races_give_up_with_4000() {
    let mut h = Harness::with_alice(&["s1"]);
    let (now, wall) = h.at(0);
    h.start_login(0, 1, "alice", "pw", None);
    let req = h.m.poll_store().unwrap();
    let reply = h.store.answer(wall, &req.command);
    h.m.handle_store_reply(now, wall, req.id, Ok(reply));
    h.store_step(0); // counts the attempt
    h.password(0);
    let mut req = h.m.poll_store().unwrap();
    h.m.handle_store_reply(
        now,
        wall,
        req.id,
        Ok(StoreReply::Claim(ClaimState::default())),
    );
    assert_eq!(
        h.store_step(0),
        StoreCommand::ClearLoginFailures { user: UserId(1) }
    );
    // Every ReplaceClaim loses to a released claim with a higher counter: each retry is
    // a fresh decision, until the bound (3 retries) is spent.
    for round in 1..=4u64 {
        req = h.m.poll_store().unwrap();
        let StoreCommand::ReplaceClaim {
            expected, claim, ..
        } = &req.command
        else {
            panic!("{req:?}");
        };
        assert_eq!(*expected, Epoch(round - 1));
        assert_eq!(claim.epoch, Epoch(round));
        let winner = ClaimState {
            epoch: Epoch(round),
            claim: None,
            foreign: false,
        };
        h.m.handle_store_reply(
            now,
            wall,
            req.id,
            Ok(StoreReply::ClaimReplaced(Err(winner))),
        );
    }
    assert!(h.m.poll_store().is_none());
    assert_eq!(login_err(&h.run(0)), LoginError::Unavailable);
}

#[test]
fn store_timeout_is_4000_and_late_replies_are_ignored() {
    let mut h = Harness::with_alice(&["s1"]);
    let api = h.start_login(0, 1, "alice", "pw", None);
    let req = h.m.poll_store().unwrap();
    assert_eq!(
        h.m.poll_timeout(),
        Some((h.t0 + Duration::from_secs(2), TimerReason::StoreDeadline))
    );
    h.m.handle_timeout(h.t0 + Duration::from_millis(1_999));
    assert_eq!(h.m.poll_event(), None);
    h.m.handle_timeout(h.t0 + Duration::from_secs(2));
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::LoggedIn {
            api,
            result: Err(LoginError::Unavailable)
        })
    );
    assert_eq!(h.m.poll_timeout(), None);
    // The reply arrives after all: nothing happens.
    let (now, wall) = h.at(2_500);
    let reply = h.store.answer(wall, &req.command);
    h.m.handle_store_reply(now, wall, req.id, Ok(reply));
    assert_eq!((h.m.poll_store(), h.m.poll_event()), (None, None));
}

#[test]
fn store_errors_are_4000() {
    let mut h = Harness::new(&["s1"]);
    let api = h.api();
    let (now, wall) = h.at(0);
    h.m.handle_register(now, api, "alice", "pw");
    h.password(0);
    let req = h.m.poll_store().unwrap();
    h.m.handle_store_reply(now, wall, req.id, Err(StoreUnavailable("down".into())));
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::Registered {
            api,
            result: Err(RegisterFailure::Unavailable)
        })
    );
    // A reply of the wrong kind is treated the same, not trusted.
    h.m.handle_register(now, api, "alice", "pw");
    h.password(0);
    let req = h.m.poll_store().unwrap();
    h.m.handle_store_reply(now, wall, req.id, Ok(StoreReply::CursorsAdvanced));
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::Registered {
            api,
            result: Err(RegisterFailure::Unavailable)
        })
    );
}

#[test]
fn timed_out_claim_write_is_released() {
    let mut h = Harness::with_alice(&["s1"]);
    let (now, wall) = h.at(0);
    h.start_login(0, 1, "alice", "pw", None);
    let replace = loop {
        let req = h.m.poll_store().unwrap();
        if matches!(req.command, StoreCommand::ReplaceClaim { .. }) {
            break req;
        }
        let reply = h.store.answer(wall, &req.command);
        h.m.handle_store_reply(now, wall, req.id, Ok(reply));
        // After the attempt is counted: the password check.
        if let Some(job) = h.m.poll_password() {
            h.m.handle_password(now, job.id, job.work.run());
        }
    };
    // The store applies the ReplaceClaim but its reply is lost.
    h.store.answer(wall, &replace.command);
    assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(1));
    h.m.handle_timeout(now + Duration::from_secs(2));
    assert_eq!(
        login_err(&[h.m.poll_event().unwrap()]),
        LoginError::Unavailable
    );
    let cleanup = h.m.poll_store().unwrap();
    assert_eq!(
        cleanup.command,
        StoreCommand::ReleaseClaim {
            user: UserId(1),
            epoch: Epoch(1)
        }
    );
    let reply = h.store.answer(wall, &cleanup.command);
    h.m.handle_store_reply(now, wall, cleanup.id, Ok(reply));
    assert_eq!(h.m.poll_event(), None, "the cleanup answers nobody");
    // So the retry is not locked out by a claim whose resume token nobody has.
    assert_eq!(login_ok(&h.login(3_000, 1, None)).epoch, Epoch(2));
}
