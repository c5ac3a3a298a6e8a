//! The per-account throttle and the bound on the password phase.

use super::*;

fn throttled_config() -> RouteLoginConfig {
    RouteLoginConfig {
        throttle: LoginThrottle {
            free_failures: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(4),
        },
        ..config()
    }
}

/// One login of alice (user 1) at `ms` with `password`, to its end.
fn attempt(
    h: &mut Harness,
    ms: u64,
    password: &str,
    resume: Option<&ResumeToken>,
) -> Vec<RouteEvent> {
    h.start_login(ms, 1, "alice", password, resume);
    h.run(ms)
}

fn failures(h: &Harness) -> LoginFailures {
    h.store
        .failures
        .get(&UserId(1))
        .copied()
        .unwrap_or_default()
}

#[test]
fn failed_logins_grow_a_capped_delay_never_a_lock() {
    let mut h = Harness::with_alice_and(&["s1"], throttled_config());
    let wrong = |h: &mut Harness, ms| login_err(&attempt(h, ms, "guess", None));
    let throttled = |s: u64| LoginError::Throttled(Duration::from_millis(s));
    // (time ms, password, expected result)
    let steps: &[(u64, &str, LoginError)] = &[
        // Three free failures.
        (0, "guess", LoginError::AccountMismatch),
        (0, "guess", LoginError::AccountMismatch),
        (0, "guess", LoginError::AccountMismatch),
        // Then 1 s after the last one: even the right password is not checked.
        (0, "guess", throttled(1_000)),
        (0, "pw", throttled(1_000)),
        (999, "guess", throttled(1)),
        (1_000, "guess", LoginError::AccountMismatch),
        // 2 s, then 4 s, then capped at 4 s.
        (1_000, "guess", throttled(2_000)),
        (3_000, "guess", LoginError::AccountMismatch),
        (3_000, "guess", throttled(4_000)),
        (7_000, "guess", LoginError::AccountMismatch),
        (7_000, "guess", throttled(4_000)),
        (11_000, "guess", LoginError::AccountMismatch),
        (11_000, "guess", throttled(4_000)),
    ];
    for (i, (ms, password, want)) in steps.iter().enumerate() {
        let got = if *password == "guess" {
            wrong(&mut h, *ms)
        } else {
            login_err(&attempt(&mut h, *ms, password, None))
        };
        assert_eq!(got, *want, "step {i} at {ms} ms");
        // A throttled attempt checks no password.
        assert!(h.m.poll_password().is_none());
    }
    assert_eq!(throttled(1_500).code(), "4290");
    assert_eq!(
        throttled(1_500).to_string(),
        "too many failed logins for this account: retry in 2 s"
    );
    // The owner gets in once the delay has passed, which clears the record: the next
    // mistakes are free again.
    let events = attempt(&mut h, 15_000, "pw", None);
    assert_eq!(login_ok(&events).epoch, Epoch(1));
    assert_eq!(failures(&h).count, 0);
    assert_eq!(wrong(&mut h, 15_000), LoginError::AccountMismatch);
}

#[test]
fn concurrent_guesses_cannot_all_pass_on_one_read() {
    let mut h = Harness::with_alice_and(&["s1"], throttled_config());
    // Ten guesses in flight at once: all read "no failures", but each is counted by a
    // compare-and-count before its check, so only the free three are checked.
    for _ in 0..10 {
        h.start_login(0, 1, "alice", "guess", None);
    }
    let events = h.run(0);
    let mut results: BTreeMap<&str, usize> = BTreeMap::new();
    for e in &events {
        let RouteEvent::LoggedIn { result: Err(e), .. } = e else {
            panic!("{e:?}");
        };
        *results.entry(e.code()).or_default() += 1;
    }
    assert_eq!(results, BTreeMap::from([("9100", 3), ("4290", 7)]));
    assert_eq!(failures(&h).count, 3);
}

#[test]
fn a_resume_token_of_the_users_claim_skips_the_throttle() {
    let mut h = Harness::with_alice_and(&["s1"], throttled_config());
    let first = login_ok(&attempt(&mut h, 0, "pw", None)).clone();
    // An attacker spends the free failures and throttles the account.
    for _ in 0..3 {
        attempt(&mut h, 100, "guess", None);
    }
    assert_eq!(
        login_err(&attempt(&mut h, 100, "pw", None)),
        LoginError::Throttled(Duration::from_secs(1))
    );
    // A made-up resume token does not help.
    let forged = ResumeToken([7; 32]);
    assert_eq!(
        login_err(&attempt(&mut h, 100, "pw", Some(&forged))),
        LoginError::Throttled(Duration::from_secs(1))
    );
    // The owner's client, whose server crashed (gone from the registry), re-homes at
    // once with the resume token of its claim: a takeover, not slowed.
    h.set_registry(200, &["s2"]);
    let events = attempt(&mut h, 200, "pw", Some(&first.resume_token));
    let again = login_ok(&events);
    assert_eq!(again.epoch, Epoch(2));
    // Its success leaves the attacker's record alone...
    assert_eq!(failures(&h).count, 3);
    assert_eq!(
        login_err(&attempt(&mut h, 200, "guess", None)),
        LoginError::Throttled(Duration::from_millis(900))
    );
    // ...and a wrong password with a valid token is still counted.
    assert_eq!(
        login_err(&attempt(&mut h, 200, "guess", Some(&again.resume_token))),
        LoginError::AccountMismatch
    );
    assert_eq!(failures(&h).count, 4);
}

#[test]
fn a_full_password_phase_answers_busy_at_once() {
    let mut h = Harness::with_alice_and(
        &["s1"],
        RouteLoginConfig {
            max_password_jobs: 2,
            ..config()
        },
    );
    let (now, wall) = h.at(0);
    // Two logins reach their password checks; the jobs have not come back yet. (Unknown
    // ids: checked against the dummy hash, nothing for the throttle to count.)
    let mut apis = Vec::new();
    for user in 7..10 {
        apis.push(h.start_login(0, user, "alice", "pw", None));
    }
    // Answer the three LoadAccounts (the third finds both places taken).
    for _ in 0..3 {
        let req = h.m.poll_store().unwrap();
        let reply = h.store.answer(wall, &req.command);
        h.m.handle_store_reply(now, wall, req.id, Ok(reply));
    }
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::LoggedIn {
            api: apis[2],
            result: Err(LoginError::Busy)
        })
    );
    assert_eq!(LoginError::Busy.code(), "4500");
    // A registration meanwhile is refused the same way, before any hashing.
    let api = h.api();
    h.m.handle_register(now, api, "bob", "pw-bob");
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::Registered {
            api,
            result: Err(RegisterFailure::Busy)
        })
    );
    assert_eq!(RegisterFailure::Busy.code(), "4500");
    // Once the two are through, there is room again.
    let events = h.run(0);
    let mismatches = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                RouteEvent::LoggedIn {
                    result: Err(LoginError::AccountMismatch),
                    ..
                }
            )
        })
        .count();
    assert_eq!(mismatches, 2, "{events:?}");
    let events = h.register(0, "bob", "pw-bob");
    assert!(matches!(
        events[..],
        [RouteEvent::Registered { result: Ok(_), .. }]
    ));
}
