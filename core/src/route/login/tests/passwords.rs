//! Password jobs: run outside the machine, their outcomes, their deadline.

use super::*;

#[test]
fn login_verifies_the_password_outside_the_machine() {
    let mut h = Harness::with_alice(&["s1"]);
    let (now, wall) = h.at(0);
    h.start_login(0, 1, "alice", "pw", None);
    let load = h.m.poll_store().unwrap();
    let reply = h.store.answer(wall, &load.command);
    h.m.handle_store_reply(now, wall, load.id, Ok(reply));
    // The attempt is counted against the account's throttle first.
    assert_eq!(
        h.store_step(0),
        StoreCommand::CountLoginFailure {
            user: UserId(1),
            expected: 0,
            forget_after: Duration::from_secs(900)
        }
    );
    // Nothing moves until the verification's outcome comes back.
    assert_eq!((h.m.poll_store(), h.m.poll_event()), (None, None));
    let job = h.m.poll_password().unwrap();
    let stored = h.store.accounts[&UserId(1)].password_hash.clone();
    assert_eq!(
        job.work,
        PasswordWork::Verify {
            password: "pw".into(),
            phc: stored
        }
    );
    assert_eq!(job.deadline, h.t0 + Duration::from_secs(5));
    assert_eq!(
        h.m.poll_timeout(),
        Some((job.deadline, TimerReason::StoreDeadline))
    );
    assert_eq!(
        format!("{:?}", job.work),
        "Verify(..)",
        "never prints a password"
    );
    // The outcome comes 40 ms later (argon2 on a worker thread).
    let later = h.at(40).0;
    h.m.handle_password(later, job.id, PasswordOutcome::Verified(true));
    assert_eq!(
        h.m.poll_store().unwrap().command,
        StoreCommand::LoadClaim { user: UserId(1) }
    );
    // ...and a success clears the count.
    assert_eq!(
        h.m.poll_store().unwrap().command,
        StoreCommand::ClearLoginFailures { user: UserId(1) }
    );
    assert_eq!(
        h.m.poll_timeout(),
        Some((later + Duration::from_secs(2), TimerReason::StoreDeadline))
    );
}

#[test]
fn password_outcome_table() {
    // (label, user id, name, outcome fed back, expected result: None = goes on to LoadClaim)
    let cases: Vec<(&str, u64, &str, PasswordOutcome, Option<LoginError>)> = vec![
        (
            "right password",
            1,
            "alice",
            PasswordOutcome::Verified(true),
            None,
        ),
        (
            "wrong password",
            1,
            "alice",
            PasswordOutcome::Verified(false),
            Some(LoginError::AccountMismatch),
        ),
        (
            "wrong name, password matches",
            1,
            "bob",
            PasswordOutcome::Verified(true),
            Some(LoginError::AccountMismatch),
        ),
        (
            "unknown id, even if the dummy matched",
            9,
            "alice",
            PasswordOutcome::Verified(true),
            Some(LoginError::AccountMismatch),
        ),
        (
            "outcome of the wrong kind",
            1,
            "alice",
            PasswordOutcome::Hashed(Ok("x".into())),
            Some(LoginError::Busy),
        ),
    ];
    for (label, user, name, outcome, want) in cases {
        let mut h = Harness::with_alice(&["s1"]);
        let (now, wall) = h.at(0);
        h.start_login(0, user, name, "pw", None);
        let load = h.m.poll_store().unwrap();
        let reply = h.store.answer(wall, &load.command);
        h.m.handle_store_reply(now, wall, load.id, Ok(reply));
        if user == 1 {
            h.store_step(0); // counts the attempt
        }
        let job = h.m.poll_password().unwrap();
        h.m.handle_password(now, job.id, outcome);
        match want {
            None => {
                let next = h.m.poll_store().map(|r| r.command);
                assert_eq!(
                    next,
                    Some(StoreCommand::LoadClaim { user: UserId(1) }),
                    "{label}"
                );
            }
            Some(e) => {
                assert_eq!(login_err(&[h.m.poll_event().unwrap()]), e, "{label}");
                assert!(h.m.poll_store().is_none(), "{label}");
            }
        }
    }
}

#[test]
fn unknown_ids_verify_against_the_dummy_hash() {
    let mut h = Harness::with_alice(&["s1"]);
    let (now, wall) = h.at(0);
    let mut dummies = Vec::new();
    for user in [7, 8] {
        h.start_login(0, user, "alice", "pw", None);
        let load = h.m.poll_store().unwrap();
        let reply = h.store.answer(wall, &load.command);
        h.m.handle_store_reply(now, wall, load.id, Ok(reply));
        match h.m.poll_password().unwrap().work {
            PasswordWork::Verify { phc, .. } => dummies.push(phc),
            other => panic!("{other:?}"),
        }
    }
    // A real argon2id hash with the configured parameters (same cost as a real check),
    // the same one for every unknown id, and not alice's.
    assert!(
        dummies[0].starts_with("$argon2id$v=19$m=64,t=1,p=1$"),
        "{}",
        dummies[0]
    );
    assert_eq!(dummies[0], dummies[1]);
    assert_ne!(dummies[0], h.store.accounts[&UserId(1)].password_hash);
}

#[test]
fn registration_hashes_outside_the_machine() {
    let mut h = Harness::new(&["s1"]);
    let now = h.at(0).0;
    let (a, b) = (h.api(), h.api());
    h.m.handle_register(now, a, "alice", "pw");
    h.m.handle_register(now, b, "bob", "pw");
    assert!(h.m.poll_store().is_none(), "nothing stored before the hash");
    let (ja, jb) = (h.m.poll_password().unwrap(), h.m.poll_password().unwrap());
    let salt = |job: &PasswordJob| match &job.work {
        PasswordWork::Hash {
            params,
            salt,
            password,
        } => {
            assert_eq!((params, password.as_str()), (&config().password, "pw"));
            *salt
        }
        other => panic!("{other:?}"),
    };
    assert_ne!(salt(&ja), salt(&jb), "a fresh salt per account");
    // alice's hash fails (only bad parameters can): 4000, nothing stored.
    h.m.handle_password(
        now,
        ja.id,
        PasswordOutcome::Hashed(Err(HashError("bad params".into()))),
    );
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::Registered {
            api: a,
            result: Err(RegisterFailure::Unavailable)
        })
    );
    assert!(h.m.poll_store().is_none());
    // bob's hash is stored as computed.
    let outcome = jb.work.run();
    let PasswordOutcome::Hashed(Ok(phc)) = &outcome else {
        panic!("{outcome:?}");
    };
    let phc = phc.clone();
    h.m.handle_password(now, jb.id, outcome);
    assert_eq!(
        h.m.poll_store().unwrap().command,
        StoreCommand::RegisterAccount {
            name: "bob".into(),
            password_hash: phc
        }
    );
}

#[test]
fn password_job_timeout_is_busy_and_late_outcomes_are_ignored() {
    let mut h = Harness::with_alice(&["s1"]);
    let (now, wall) = h.at(0);
    let api = h.start_login(0, 1, "alice", "pw", None);
    let load = h.m.poll_store().unwrap();
    let reply = h.store.answer(wall, &load.command);
    h.m.handle_store_reply(now, wall, load.id, Ok(reply));
    h.store_step(0); // counts the attempt
    let job = h.m.poll_password().unwrap();
    h.m.handle_timeout(h.at(4_999).0);
    assert_eq!(h.m.poll_event(), None);
    // A password check that did not come back in time is the route's queue, not the
    // store: "busy", never "store unavailable".
    h.m.handle_timeout(h.at(5_000).0);
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::LoggedIn {
            api,
            result: Err(LoginError::Busy)
        })
    );
    assert_eq!(h.m.poll_timeout(), None);
    // The pool got to it after all: nothing happens.
    h.m.handle_password(h.at(6_000).0, job.id, job.work.run());
    assert_eq!((h.m.poll_store(), h.m.poll_event()), (None, None));
    // Registration too: the hash's deadline fails it with "busy".
    let api = h.api();
    h.m.handle_register(h.at(7_000).0, api, "bob", "pw");
    assert!(h.m.poll_password().is_some());
    h.m.handle_timeout(h.at(12_000).0);
    assert_eq!(
        h.m.poll_event(),
        Some(RouteEvent::Registered {
            api,
            result: Err(RegisterFailure::Busy)
        })
    );
}

/// `poll_output` is the one drain: password jobs first, then store requests, then events,
/// whatever order the inputs queued them in. (The route's shell runs jobs inline in the
/// simulation, and a job's outcome queues its next store request: jobs first keeps that
/// request in the same drain.)
#[test]
fn poll_output_gives_jobs_then_store_requests_then_events() {
    let mut h = Harness::new(&["s1"]);
    let (now, wall) = h.at(0);
    let logout = h.api();
    h.m.handle_logout(now, wall, logout, "not-a-token");
    h.start_login(0, 1, "alice", "pw", None);
    let register = h.api();
    h.m.handle_register(now, register, "bob", "pw");
    let kinds: Vec<&str> = std::iter::from_fn(|| h.m.poll_output())
        .map(|o| match o {
            LoginOutput::Password(job) => {
                assert_eq!(job.api, register);
                "password"
            }
            LoginOutput::Store(req) => {
                assert!(matches!(req.command, StoreCommand::LoadAccount { .. }));
                "store"
            }
            LoginOutput::Event(event) => {
                assert!(
                    matches!(event, RouteEvent::LoggedOut { api, result: Err(_) } if api == logout)
                );
                "event"
            }
        })
        .collect();
    assert_eq!(kinds, ["password", "store", "event"]);
}
