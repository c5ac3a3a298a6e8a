//! Takeovers: the held answer, retries of a lost answer, placement on linked servers.

use super::*;

/// The ticket's expiry, as the server would read it.
fn ticket_expiry(answer: &LoginAnswer) -> UnixMillis {
    UnixMillis(answer.ticket.expires_at_ms)
}

/// Alice logged in at 0 (epoch 1 on s1, lease to 30 s, never bound), and a takeover
/// with her resume token started at 1 s and got its claim: the answer is held.
fn held_takeover(live: &[&str]) -> (Harness, LoginAnswer, ApiRequestId) {
    let mut h = Harness::with_alice(live);
    let first = login_ok(&h.login(0, 1, None)).clone();
    assert_eq!(first.server.id.as_str(), "s1");
    let api = h.start_login(1_000, 1, "alice", "pw", Some(&first.resume_token));
    assert_eq!(
        h.run(1_000),
        vec![kick_old("s1", 1, 2)],
        "answer must be held"
    );
    let claim = h.store.claims.load(UserId(1)).claim.unwrap();
    assert_eq!(claim.epoch, Epoch(2), "the claim is taken before the hold");
    // The new claim outlives the old lease (30 s) by a whole claim_ttl.
    assert_eq!(claim.lease_until, UnixMillis(WALL0.0 + 60_000));
    assert_eq!(
        h.m.poll_timeout(),
        Some((h.t0 + Duration::from_secs(30), TimerReason::TakeoverHold))
    );
    (h, first, api)
}

#[test]
fn takeover_is_held_until_the_old_server_confirms_the_kick() {
    let (mut h, first, api) = held_takeover(&["s1"]);
    // Reports that do not cover the old session change nothing.
    for (server, user, below) in [("s2", 1, 2), ("s1", 2, 2), ("s1", 1, 1)] {
        assert_eq!(
            h.kick_done(5_000, server, user, below),
            vec![],
            "{server} {user} {below}"
        );
    }
    let events = h.kick_done(6_000, "s1", 1, 2);
    let second = login_ok(&events).clone();
    assert!(matches!(events[..], [RouteEvent::LoggedIn { api: a, .. }] if a == api));
    assert_eq!((second.epoch, second.server.id.as_str()), (Epoch(2), "s1"));
    // Minted on release, so the ticket's life counts from then.
    assert_eq!(ticket_expiry(&second), UnixMillis(WALL0.0 + 36_000));
    let bearer = h.m.verify_bearer(&second.token, h.at(6_000).1).unwrap();
    assert_eq!((bearer.user, bearer.epoch), (UserId(1), Epoch(2)));
    assert_ne!(second.resume_token, first.resume_token);
    assert_eq!(
        h.store
            .claims
            .load(UserId(1))
            .claim
            .unwrap()
            .resume_token_hash,
        resume_token_hash(&second.resume_token)
    );
    assert_eq!(h.m.poll_timeout(), None);
    // Answered once: a repeated report and the old deadline do nothing.
    assert_eq!(h.kick_done(7_000, "s1", 1, 2), vec![]);
    assert_eq!(h.timeout(30_000), vec![]);
    // A retry with the token the takeover was asked with (its client gave up before
    // the release) gets the same answer again: same claim, no new takeover or kick.
    let events = h.login(8_000, 1, Some(&first.resume_token));
    let again = login_ok(&events);
    assert_eq!(
        (again.epoch, &again.resume_token),
        (Epoch(2), &second.resume_token)
    );
    assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(2));
    // Past claim_ttl after the release, the route has forgotten the answer, but the
    // claim's token is still the first one's derivation: a retry of that login (its
    // answer lost with a crashed route) takes the claim over again, asking every live
    // server, since the session it waited for may be anywhere.
    assert_eq!(
        h.login(36_001, 1, Some(&first.resume_token)),
        vec![kick_old("s1", 1, 3)]
    );
    assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(3));
    // A token the claim does not derive from is refused.
    assert_eq!(
        login_err(&h.login(36_002, 1, Some(&ResumeToken([7; 32])))),
        LoginError::RepeatLogin
    );
}

#[test]
fn a_retry_whose_answer_was_lost_takes_over_waiting_on_every_server() {
    // A takeover is held on s1; the route then crashes: a new route (same secrets, no
    // memory) meets the retry presenting the token the takeover was asked with.
    let (h, first, _) = held_takeover(&["s1", "s2", "s3"]);
    let mut h2 = Harness::new(&["s1", "s2", "s3"]);
    h2.store = h.store.clone();
    let events = h2.login(2_000, 1, Some(&first.resume_token));
    assert_eq!(
        events,
        vec![
            kick_old("s1", 1, 3),
            kick_old("s2", 1, 3),
            kick_old("s3", 1, 3)
        ],
        "every live server is asked"
    );
    assert_eq!(h2.store.claims.load(UserId(1)).epoch, Epoch(3));
    assert_eq!(h2.kick_done(2_100, "s1", 1, 3), vec![]);
    assert_eq!(h2.kick_done(2_200, "s3", 1, 3), vec![]);
    // The last one to confirm releases the answer.
    let events = h2.kick_done(2_300, "s2", 1, 3);
    let answer = login_ok(&events);
    assert_eq!(answer.epoch, Epoch(3));
    assert_eq!(
        h2.store
            .claims
            .load(UserId(1))
            .claim
            .unwrap()
            .resume_token_hash,
        resume_token_hash(&answer.resume_token)
    );
    // Another route (the same secret) derives the same token: the claim is this one's.
    assert_eq!(
        h2.m.bearer
            .derive_resume(&first.resume_token, UserId(1), Epoch(3)),
        answer.resume_token
    );
}

/// A client's first login presents a token of its own making. If the answer is lost,
/// its retry (same token) takes the claim over instead of being refused as a repeat
/// login until the claim's lease runs out; a login with any other token still is.
#[test]
fn a_first_login_retried_with_its_own_token_takes_its_claim_over() {
    let mut h = Harness::with_alice(&["s1", "s2"]);
    let own = ResumeToken([0x5e; 32]);
    // The answer is lost: the client never learns this claim's token.
    let lost = login_ok(&h.login(0, 1, Some(&own))).clone();
    assert_eq!(lost.epoch, Epoch(1));
    assert_eq!(
        login_err(&h.login(100, 1, Some(&ResumeToken([0x77; 32])))),
        LoginError::RepeatLogin,
        "someone else's token is a repeat login"
    );
    assert_eq!(
        login_err(&h.login(100, 1, None)),
        LoginError::RepeatLogin,
        "no token is a repeat login"
    );
    let events = h.login(200, 1, Some(&own));
    assert_eq!(
        events,
        vec![kick_old("s1", 1, 2), kick_old("s2", 1, 2)],
        "the retry takes over, waiting on every live server"
    );
    h.kick_done(300, "s1", 1, 2);
    let answer = login_ok(&h.kick_done(300, "s2", 1, 2)).clone();
    assert_eq!(answer.epoch, Epoch(2));
}

#[test]
fn logins_are_not_placed_on_a_server_whose_link_is_down() {
    let mut h = Harness::with_alice(&["s1", "s2"]);
    for name in ["bob", "carol", "dave"] {
        assert!(matches!(
            h.register(0, name, "pw")[..],
            [RouteEvent::Registered { result: Ok(_), .. }]
        ));
    }
    let server_of = |h: &mut Harness, user: u64, name: &str| {
        h.start_login(100, user, name, "pw", None);
        login_ok(&h.run(100)).server.id.as_str().to_owned()
    };
    // Only s2's link is up; s1's never came up (a wrong link secret, say). Round robin
    // would start with s1; it has no link, so both go to s2.
    h.m.handle_server_reachable(&ServerId::new("s2"));
    assert_eq!(server_of(&mut h, 1, "alice"), "s2");
    assert_eq!(server_of(&mut h, 2, "bob"), "s2");
    // Back up: placement uses it again.
    h.m.handle_server_reachable(&ServerId::new("s1"));
    assert_eq!(server_of(&mut h, 3, "carol"), "s1");
    // With every link down, logins are placed on any live server rather than refused.
    h.m.handle_server_unreachable(&ServerId::new("s1"));
    h.m.handle_server_unreachable(&ServerId::new("s2"));
    assert_eq!(server_of(&mut h, 4, "dave"), "s2");
}

#[test]
fn a_reconnected_old_server_is_asked_again() {
    let (mut h, _, api) = held_takeover(&["s1", "s2"]);
    // The first kick went nowhere (the link was down); a link to s1 comes up again.
    h.m.handle_server_reachable(&ServerId::new("s2"));
    assert_eq!(h.run(2_000), vec![], "only the old server is asked");
    h.m.handle_server_reachable(&ServerId::new("s1"));
    assert_eq!(h.run(2_000), vec![kick_old("s1", 1, 2)]);
    let events = h.kick_done(2_100, "s1", 1, 2);
    assert!(matches!(events[..], [RouteEvent::LoggedIn { api: a, result: Ok(_) }] if a == api));
}

#[test]
fn a_retry_during_the_hold_joins_the_held_answer() {
    let (mut h, first, api) = held_takeover(&["s1"]);
    // The client timed out and retries with the token it has: no second takeover.
    let retry = h.start_login(6_000, 1, "alice", "pw", Some(&first.resume_token));
    assert_eq!(h.run(6_000), vec![], "joins the hold, no new kick");
    assert_eq!(h.store.claims.load(UserId(1)).epoch, Epoch(2));
    // Without the token a login is still refused.
    assert_eq!(login_err(&h.login(6_500, 1, None)), LoginError::RepeatLogin);
    let events = h.kick_done(7_000, "s1", 1, 2);
    let answered: Vec<ApiRequestId> = events
        .iter()
        .map(|e| match e {
            RouteEvent::LoggedIn { api, result: Ok(a) } => {
                assert_eq!(a.epoch, Epoch(2));
                *api
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(answered.len(), 2);
    assert!(answered.contains(&api) && answered.contains(&retry));
}

#[test]
fn held_takeover_is_released_when_the_old_lease_runs_out() {
    let (mut h, _, api) = held_takeover(&["s1"]);
    assert_eq!(h.timeout(29_999), vec![]);
    let events = h.timeout(30_000);
    assert!(matches!(events[..], [RouteEvent::LoggedIn { api: a, result: Ok(_) }] if a == api));
    // The wall clock at release is derived from the monotonic time elapsed since the hold.
    assert_eq!(
        ticket_expiry(login_ok(&events)),
        UnixMillis(WALL0.0 + 60_000)
    );
    assert_eq!(h.m.poll_timeout(), None);
}

#[test]
fn held_takeover_is_released_when_the_old_server_leaves_the_registry() {
    let (mut h, _, api) = held_takeover(&["s1", "s2"]);
    // A change that keeps s1 releases nothing.
    assert_eq!(h.set_registry(2_000, &["s1", "s2", "s3"]), vec![]);
    let events = h.set_registry(3_000, &["s2", "s3"]);
    assert!(matches!(events[..], [RouteEvent::LoggedIn { api: a, result: Ok(_) }] if a == api));
    let a = login_ok(&events);
    assert_eq!((a.epoch, a.server.id.as_str()), (Epoch(2), "s2"));
    assert_eq!(ticket_expiry(a), UnixMillis(WALL0.0 + 33_000));
    assert_eq!(h.m.poll_timeout(), None);
}

#[test]
fn takeover_when_the_old_server_left_the_registry() {
    let mut h = Harness::with_alice(&["s1"]);
    login_ok(&h.login(0, 1, None));
    assert_eq!(h.set_registry(500, &["s2"]), vec![]);
    // Answered at once (no one to wait for); the kick is still sent, best effort.
    let events = h.login(1_000, 1, None);
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0], kick_old("s1", 1, 2));
    let a = login_ok(&events);
    assert_eq!((a.epoch, a.server.id.as_str()), (Epoch(2), "s2"));
    assert_eq!(ticket_expiry(a), UnixMillis(WALL0.0 + 31_000));
    assert_eq!(h.m.poll_timeout(), None, "nothing held");
}
