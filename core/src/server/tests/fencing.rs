use super::*;

fn is_refresh(c: &StoreCommand) -> bool {
    matches!(c, StoreCommand::RefreshLeases { .. })
}

fn refreshed(user: u64) -> StoreResult {
    Ok(StoreReply::LeasesRefreshed(vec![(
        UserId(user),
        LeaseRefresh::Refreshed,
    )]))
}

/// Keeps the client's heartbeat going so only the fence can end the session.
fn ping_every_10s(h: &mut Harness, from: u64, to: u64) {
    for ms in (from..=to).step_by(10_000) {
        h.frame(ms, 1, ping(ms));
    }
}

#[test]
fn proven_window_is_ttl_times_one_minus_epsilon() {
    let h = Harness::new();
    assert_eq!(h.node.config().proven_window(), Duration::from_secs(24));
}

#[test]
fn unanswered_refreshes_fence_at_bind_sent_at_plus_window() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3); // bind sent at 0 ms
    h.forget_unanswered();
    ping_every_10s(&mut h, 5_000, 25_000);
    let refresh = |ms: u64| {
        vec![Out::Store(StoreCommand::RefreshLeases {
            server: ServerId::new(S1),
            lease_until: wall(ms + 30_000),
            sessions: vec![(UserId(7), Epoch(3))],
        })]
    };
    let steps: Vec<(u64, Vec<Out>)> = vec![
        (10_000, refresh(10_000)), // never answered
        (20_000, refresh(20_000)), // never answered
        (23_999, vec![]),          // still proven by the bind
        (
            24_000,
            [kick(1, KickReason::Fenced).as_slice(), &[release(7, 3)]].concat(),
        ),
    ];
    for (ms, want) in steps {
        if ms == 23_999 {
            assert_eq!(h.next_timer(), Some((24_000, TimerReason::Fence)));
        }
        assert_eq!(h.timeout(ms), want, "at {ms} ms");
    }
    assert_eq!(h.node.stats().fenced, 1);
    assert_eq!(h.node.sessions(), 0);
}

#[test]
fn a_confirmed_refresh_proves_from_when_it_was_sent() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.forget_unanswered();
    ping_every_10s(&mut h, 5_000, 45_000);
    h.timeout(10_000);
    // Answered late: the proof still counts from 10 s (sent), not 15 s (answered).
    assert_eq!(h.reply_to(15_000, is_refresh, refreshed(7)), vec![]);
    assert_eq!(h.timeout(20_000).len(), 1); // refresh, unanswered
    assert_eq!(h.timeout(24_000), vec![]); // the bind's proof is superseded
    assert_eq!(h.timeout(30_000).len(), 1); // refresh, unanswered
    assert_eq!(h.next_timer(), Some((34_000, TimerReason::Fence)));
    assert_eq!(h.timeout(33_999), vec![]);
    assert_eq!(
        h.timeout(34_000),
        [kick(1, KickReason::Fenced).as_slice(), &[release(7, 3)]].concat()
    );
}

#[test]
fn a_failed_refresh_proves_nothing() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.forget_unanswered();
    ping_every_10s(&mut h, 5_000, 15_000);
    h.timeout(10_000);
    assert_eq!(
        h.reply_to(10_500, is_refresh, Err(StoreUnavailable("down".into()))),
        vec![]
    );
    h.timeout(20_000);
    assert_eq!(
        h.timeout(24_000)[0],
        Out::Kick {
            conn: 1,
            reason: KickReason::Fenced
        }
    );
}

#[test]
fn refreshes_go_out_in_batches() {
    let mut h = Harness::with(|c| c.refresh_batch = 2);
    for user in 1..=5 {
        h.login(0, user, user, 1);
    }
    h.forget_unanswered();
    let sizes: Vec<usize> = h
        .timeout(10_000)
        .into_iter()
        .map(|o| match o {
            Out::Store(StoreCommand::RefreshLeases { sessions, .. }) => sessions.len(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(sizes, vec![2, 2, 1]);
    // Left unanswered, the refreshes time out (proving nothing, kicking no one).
    assert_eq!(h.next_timer(), Some((15_000, TimerReason::StoreTimeout)));
    assert_eq!(h.timeout(15_000), vec![]);
    assert_eq!(h.node.stats().store_timeouts, 3);
    assert_eq!(h.next_timer(), Some((20_000, TimerReason::LeaseRefresh)));
}

/// One shard of a Redis Cluster down: the refresh answers per user, and only the user whose
/// outcome is unknown is fenced at its deadline; the other's lease is proven and its session
/// lives on.
#[test]
fn an_unknown_outcome_fences_only_that_user() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.login(0, 2, 8, 1);
    h.forget_unanswered();
    for ms in (5_000..=45_000).step_by(10_000) {
        h.frame(ms, 1, ping(ms));
        h.frame(ms, 2, ping(ms));
    }
    let mut out = h.timeout(10_000);
    assert!(
        out.iter()
            .any(|o| matches!(o, Out::Store(c) if is_refresh(c)))
    );
    out = h.reply_to(
        10_050,
        is_refresh,
        Ok(StoreReply::LeasesRefreshed(vec![
            (UserId(7), LeaseRefresh::Unknown),
            (UserId(8), LeaseRefresh::Refreshed),
        ])),
    );
    assert_eq!(out, vec![]);
    // Later refreshes go unanswered: user 7 is proven by its bind (0 + 24 s) only, user 8
    // by the refresh sent at 10 s (until 34 s).
    assert_eq!(h.timeout(20_000).len(), 1);
    assert_eq!(h.next_timer(), Some((24_000, TimerReason::Fence)));
    assert_eq!(
        h.timeout(24_000),
        [kick(1, KickReason::Fenced).as_slice(), &[release(7, 3)]].concat()
    );
    assert_eq!(h.node.session_of(UserId(8)), Some((ConnId(2), Epoch(1))));
    assert_eq!(h.node.stats().fenced, 1);
}
