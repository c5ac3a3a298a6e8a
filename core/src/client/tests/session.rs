//! Logging in, staying online and coming back: heartbeats, timeouts, kicks, backoff, TLS failures.

use super::*;

#[test]
fn login_connect_login_ok_goes_online_and_syncs() {
    let mut h = Harness::new(config());
    h.online();
    assert_eq!(
        h.s.poll_timeout(),
        Some((h.at(30 + 10_000), TimerReason::Ping))
    );
    assert!(h.s.is_online());
}

#[test]
fn heartbeat_pings_on_schedule_and_a_missing_pong_reconnects() {
    let mut h = Harness::new(config());
    h.online();
    let ping = |n| tx(Kind::Ping(proto::Ping { nonce: n }));
    let pong = |n| In::Frame(Kind::Pong(proto::Pong { nonce: n }));
    h.table(vec![
        (10_029, In::Timeout, vec![], vec![]),
        (10_030, In::Timeout, vec![ping(1)], vec![]),
        (10_040, pong(1), vec![], vec![]),
        (20_030, In::Timeout, vec![ping(2)], vec![]),
        // Any frame counts as an answer, not only the pong.
        (20_100, In::Frame(sync_answer(vec![])), vec![], vec![]),
        (25_030, In::Timeout, vec![], vec![]),
        (30_030, In::Timeout, vec![ping(3), sync_req()], vec![]),
        (35_029, In::Timeout, vec![], vec![]),
        (
            35_030,
            In::Timeout,
            vec![ClientCommand::Disconnect],
            vec![reconnecting(0, ConnectionLoss::HeartbeatTimeout)],
        ),
        (
            35_030,
            In::Timeout,
            vec![login_cmd(2, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
    ]);
}

#[test]
fn relogin_carries_the_latest_resume_token_and_ignores_stale_answers() {
    let mut h = Harness::new(config());
    h.online();
    h.table(vec![
        (
            100,
            In::Disconnected,
            vec![],
            vec![reconnecting(0, ConnectionLoss::Disconnected)],
        ),
        (
            100,
            In::Timeout,
            vec![login_cmd(2, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            110,
            In::Answer(2, Ok(answer(6, 0xB))),
            vec![connect_s1()],
            vec![connecting_s1()],
        ),
        (
            120,
            In::ConnectFailed,
            vec![],
            vec![reconnecting(1, ConnectionLoss::ConnectFailed)],
        ),
        (
            120,
            In::Timeout,
            vec![login_cmd(3, Some(0xB))],
            vec![ClientEvent::LoggingIn],
        ),
        // The answer to attempt 2 again (late duplicate): not this attempt's.
        (130, In::Answer(2, Ok(answer(7, 0xC))), vec![], vec![]),
        (5_119, In::Timeout, vec![], vec![]),
        (
            5_120,
            In::Timeout,
            vec![],
            vec![reconnecting(2, ConnectionLoss::LoginTimeout)],
        ),
        (
            5_120,
            In::Timeout,
            vec![login_cmd(4, Some(0xB))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            5_130,
            In::Answer(4, Err(LoginFailure::Rejected(LoginError::RepeatLogin))),
            vec![],
            vec![reconnecting(
                3,
                ConnectionLoss::LoginFailed(LoginFailure::Rejected(LoginError::RepeatLogin)),
            )],
        ),
        (
            5_130,
            In::Timeout,
            vec![login_cmd(5, Some(0xB))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            5_140,
            In::Answer(5, Err(LoginFailure::Rejected(LoginError::AccountMismatch))),
            vec![],
            vec![
                ClientEvent::LoginRejected(LoginError::AccountMismatch),
                ClientEvent::Stopped(StopReason::AccountMismatch),
            ],
        ),
    ]);
    assert_eq!(h.s.poll_timeout(), None);
}

/// A certificate that does not verify stops the session (no backoff, no retry), whether it
/// is the route's (the login answer) or the server's (the connect); a plain connect failure
/// still retries.
#[test]
fn a_certificate_that_does_not_verify_stops_instead_of_retrying() {
    let rejected = |host: &str| {
        vec![
            ClientEvent::TlsFailed {
                host: host.into(),
                reason: "unknown issuer".into(),
            },
            ClientEvent::Stopped(StopReason::TlsFailed),
        ]
    };
    let mut h = Harness::new(quiet_config());
    h.table(vec![
        (
            0,
            In::Start,
            vec![login_cmd(1, None)],
            vec![ClientEvent::LoggingIn],
        ),
        (
            10,
            In::Answer(
                1,
                Err(LoginFailure::Tls {
                    host: "route.example".into(),
                    reason: "unknown issuer".into(),
                }),
            ),
            vec![],
            rejected("route.example"),
        ),
    ]);
    assert_eq!(h.s.poll_timeout(), None);
    assert!(h.s.is_stopped());

    let mut h = Harness::new(quiet_config());
    h.step(0, In::Start);
    h.step(10, In::Answer(1, Ok(answer(5, 0xA))));
    let (cmds, evs) = h.step(20, In::TlsFailed);
    assert_eq!(cmds, vec![]);
    assert_eq!(evs, rejected("s1.example"));
    assert_eq!(h.s.poll_timeout(), None);
    // Not connecting (stopped already): nothing more happens.
    assert_eq!(h.step(30, In::TlsFailed), (vec![], vec![]));

    let mut h = Harness::new(quiet_config());
    h.step(0, In::Start);
    h.step(10, In::Answer(1, Ok(answer(5, 0xA))));
    let (_, evs) = h.step(20, In::ConnectFailed);
    assert!(
        matches!(
            evs.as_slice(),
            [ClientEvent::Reconnecting {
                cause: ConnectionLoss::ConnectFailed,
                ..
            }]
        ),
        "{evs:?}"
    );
}

#[test]
fn connect_and_login_ok_timeouts_disconnect_and_retry() {
    let mut h = Harness::new(config());
    h.table(vec![
        (
            0,
            In::Start,
            vec![login_cmd(1, None)],
            vec![ClientEvent::LoggingIn],
        ),
        (
            10,
            In::Answer(1, Ok(answer(5, 0xA))),
            vec![connect_s1()],
            vec![connecting_s1()],
        ),
        (
            5_010,
            In::Timeout,
            vec![ClientCommand::Disconnect],
            vec![reconnecting(0, ConnectionLoss::ConnectTimeout)],
        ),
        (
            5_010,
            In::Timeout,
            vec![login_cmd(2, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            5_020,
            In::Answer(2, Ok(answer(6, 0xB))),
            vec![connect_s1()],
            vec![connecting_s1()],
        ),
        (
            5_030,
            In::Connected,
            vec![tx(Kind::Login(proto::Login {
                ticket: Some(ticket(6)),
            }))],
            vec![],
        ),
        (
            10_030,
            In::Timeout,
            vec![ClientCommand::Disconnect],
            vec![reconnecting(1, ConnectionLoss::LoginOkTimeout)],
        ),
    ]);
}

#[test]
fn kicks_reconnect_except_taken_over_which_stops() {
    let mut h = Harness::new(config());
    h.online();
    h.table(vec![
        (
            100,
            In::Frame(kick(KickReason::Draining)),
            vec![ClientCommand::Disconnect],
            vec![
                ClientEvent::Kicked(KickReason::Draining),
                reconnecting(0, ConnectionLoss::Kicked(KickReason::Draining)),
            ],
        ),
        (
            100,
            In::Timeout,
            vec![login_cmd(2, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            110,
            In::Answer(2, Ok(answer(6, 0xB))),
            vec![connect_s1()],
            vec![connecting_s1()],
        ),
        (
            120,
            In::Connected,
            vec![tx(Kind::Login(proto::Login {
                ticket: Some(ticket(6)),
            }))],
            vec![],
        ),
        (
            130,
            In::Frame(login_ok(6)),
            vec![sync_req()],
            vec![online_ev(6)],
        ),
        (
            200,
            In::Frame(kick(KickReason::TakenOver)),
            vec![ClientCommand::Disconnect],
            vec![
                ClientEvent::Kicked(KickReason::TakenOver),
                ClientEvent::Stopped(StopReason::TakenOver),
            ],
        ),
        (60_000, In::Timeout, vec![], vec![]),
        // A late report about the connection it gave up changes nothing.
        (60_000, In::Disconnected, vec![], vec![]),
    ]);
    assert_eq!(h.s.poll_timeout(), None);
    assert!(h.s.is_stopped());
    // The user may decide to take the session back.
    assert_eq!(
        h.step(70_000, In::Start),
        (vec![login_cmd(3, Some(0xB))], vec![ClientEvent::LoggingIn])
    );
}

#[test]
fn backoff_jitter_covers_the_window() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (base, cap) = (Duration::from_millis(200), Duration::from_secs(5));
    let ceiling = backoff::ceiling(base, cap, 3);
    assert_eq!(ceiling, Duration::from_millis(1600));
    let draws: Vec<Duration> = (0..200)
        .map(|_| backoff::delay(&mut rng, base, cap, 3))
        .collect();
    assert!(draws.iter().all(|d| *d <= ceiling));
    assert!(draws.iter().any(|d| *d < ceiling / 4));
    assert!(draws.iter().any(|d| *d > ceiling * 3 / 4));
    assert_eq!(backoff::ceiling(base, cap, 5), cap);
    assert_eq!(backoff::ceiling(base, cap, u32::MAX), cap);
}

proptest! {
    #[test]
    fn backoff_delays_stay_in_the_capped_window_and_reset_when_online(
        seed in any::<u64>(),
        failures in 1usize..12,
    ) {
        let mut cfg = ClientConfig::new(USER, "alice", "pw", seed);
        cfg.heartbeat_interval = Duration::from_secs(3600);
        let (b, cap) = (cfg.backoff_base, cfg.backoff_cap);
        let mut h = Harness::new(cfg);
        let mut now = 0u64;
        let mut attempt_no = 1;
        h.step(now, In::Start);
        for round in 0..2 {
            for n in 0..failures {
                let (_, evs) = h.step(
                    now,
                    In::Answer(attempt_no, Err(LoginFailure::Transport("refused".into()))),
                );
                let [ClientEvent::Reconnecting { attempt, delay, .. }] = evs.as_slice() else {
                    panic!("expected one Reconnecting, got {evs:?}");
                };
                // Round 1 begins after the loss that followed `Online` (attempt 0).
                let n = n + round;
                prop_assert_eq!(*attempt as usize, n);
                let ceiling = b.saturating_mul(1 << n.min(31)).min(cap);
                prop_assert!(*delay <= ceiling, "retry {n}: {delay:?} > {ceiling:?}");
                let (at, reason) = h.s.poll_timeout().expect("backoff armed");
                prop_assert_eq!(reason, TimerReason::Backoff);
                prop_assert_eq!(at, h.at(now) + *delay);
                now = (at - h.t0).as_millis() as u64 + 1;
                let (cmds, _) = h.step(now, In::Timeout);
                attempt_no += 1;
                prop_assert_eq!(cmds.len(), 1);
            }
            // Online resets the count: the next loss draws from [0, base] again.
            h.step(now, In::Answer(attempt_no, Ok(answer(5, 1))));
            h.step(now, In::Connected);
            h.step(now, In::Frame(login_ok(5)));
            prop_assert!(h.s.is_online());
            let (_, evs) = h.step(now, In::Disconnected);
            let [ClientEvent::Reconnecting { attempt: 0, delay, .. }] = evs.as_slice() else {
                panic!("expected Reconnecting attempt 0, got {evs:?}");
            };
            prop_assert!(*delay <= b);
            let (at, _) = h.s.poll_timeout().expect("backoff armed");
            now = (at - h.t0).as_millis() as u64 + 1;
            h.step(now, In::Timeout);
            attempt_no += 1;
        }
    }
}

/// A first login whose answer never comes is retried with the same self-made token, so the
/// route can tell the retry from a second device (see `route_login`).
#[test]
fn a_first_login_is_retried_with_the_same_own_token() {
    let mut h = Harness::new(config());
    h.table(vec![(
        0,
        In::Start,
        vec![login_cmd(1, None)],
        vec![ClientEvent::LoggingIn],
    )]);
    let mut retries = Vec::new();
    for ms in [5_000, 5_001, 5_002] {
        let (cmds, _) = h.step(ms, In::Timeout);
        retries.extend(cmds);
    }
    assert_eq!(retries, vec![login_cmd(2, None)]);
    // The token is persisted with the rest, so a restart retries with it too.
    assert_eq!(
        h.s.snapshot(h.at(5_002), UnixMillis(0)).resume_token,
        Some(own_token())
    );
}

/// `poll_output` is the one drain: commands before events, whatever order they were
/// queued in. A kick queues the `Kicked` event before the `Disconnect`; the shell still
/// closes the connection before the application hears why.
#[test]
fn poll_output_gives_commands_before_events() {
    let mut h = Harness::new(config());
    h.online();
    h.s.handle_frame(
        h.at(100),
        proto::Frame {
            kind: Some(kick(KickReason::Draining)),
        },
    )
    .unwrap();
    let outputs: Vec<ClientOutput> = std::iter::from_fn(|| h.s.poll_output()).collect();
    assert_eq!(
        outputs,
        vec![
            ClientOutput::Command(ClientCommand::Disconnect),
            ClientOutput::Event(ClientEvent::Kicked(KickReason::Draining)),
            ClientOutput::Event(reconnecting(
                0,
                ConnectionLoss::Kicked(KickReason::Draining)
            )),
        ]
    );
}
