use super::*;

/// Long leases so these tests see only the idle timer.
fn harness() -> Harness {
    Harness::with(|c| {
        c.lease_ttl = Duration::from_secs(3_600);
        c.refresh_interval = Duration::from_secs(1_200);
    })
}

#[test]
fn ping_gets_pong_with_the_same_nonce() {
    let mut h = harness();
    h.login(0, 1, 7, 3);
    assert_eq!(
        h.frame(10, 1, ping(0xdead_beef)),
        vec![Out::Pong {
            conn: 1,
            nonce: 0xdead_beef
        }]
    );
}

#[test]
fn pings_keep_a_session_then_silence_reaps_it() {
    let mut h = harness();
    h.login(0, 1, 7, 3);
    h.frame(10_000, 1, ping(1));
    h.frame(20_000, 1, ping(2));
    assert_eq!(h.next_timer(), Some((50_000, TimerReason::Idle)));
    let steps: Vec<(u64, Vec<Out>)> = vec![
        (30_000, vec![]), // would have been reaped without the pings
        (49_999, vec![]),
        (
            50_000,
            [kick(1, KickReason::Idle).as_slice(), &[release(7, 3)]].concat(),
        ),
    ];
    for (ms, want) in steps {
        assert_eq!(h.timeout(ms), want, "at {ms} ms");
    }
    assert_eq!(h.node.stats().kicks(KickReason::Idle), 1);
}

#[test]
fn a_session_that_never_pings_is_reaped() {
    let mut h = harness();
    h.login(0, 1, 7, 3);
    assert_eq!(h.timeout(29_999), vec![]);
    assert_eq!(
        h.timeout(30_000),
        [kick(1, KickReason::Idle).as_slice(), &[release(7, 3)]].concat()
    );
}
