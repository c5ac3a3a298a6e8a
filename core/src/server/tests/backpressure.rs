use super::*;

#[test]
fn unwritten_frames_over_the_limit_kick_a_slow_consumer() {
    let mut h = Harness::with(|c| c.max_outbound_frames = 3);
    h.login(0, 1, 7, 3); // LoginOk: 1 unwritten
    assert_eq!(h.frame(1, 1, ping(1)).len(), 1); // 2
    assert_eq!(h.frame(2, 1, ping(2)).len(), 1); // 3
    assert_eq!(
        h.frame(3, 1, ping(3)),
        [
            kick(1, KickReason::SlowConsumer).as_slice(),
            &[release(7, 3)]
        ]
        .concat()
    );
    assert_eq!(h.node.stats().slow_consumers, 1);
    assert_eq!(h.node.stats().kicks(KickReason::SlowConsumer), 1);
}

#[test]
fn written_frames_make_room() {
    let mut h = Harness::with(|c| c.max_outbound_frames = 3);
    h.login(0, 1, 7, 3);
    for nonce in 1..100 {
        assert_eq!(
            h.frame(nonce, 1, ping(nonce)),
            vec![Out::Pong { conn: 1, nonce }]
        );
        h.node.handle_written(ConnId(1), 1);
    }
}
