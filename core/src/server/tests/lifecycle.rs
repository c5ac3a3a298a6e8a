use super::*;

#[test]
fn closing_a_session_releases_its_claim() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.node.handle_connection_closed(h.at(10), ConnId(1));
    assert_eq!(h.drain(), vec![release(7, 3)]);
    // Closing before login has nothing to release.
    h.open(20, 2);
    h.node.handle_connection_closed(h.at(30), ConnId(2));
    assert_eq!(h.drain(), vec![]);
    assert_eq!(h.node.connections(), 0);
    // Nothing left to refresh or reap.
    assert_eq!(h.timeout(10_000), vec![]);
    assert_eq!(h.next_timer(), None);
}

#[test]
fn codec_errors_send_an_error_then_close() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.node
        .handle_protocol_error(h.at(10), ConnId(1), ErrorCode::FrameTooLarge, "too big");
    assert_eq!(
        h.drain(),
        [
            error(1, ErrorCode::FrameTooLarge).as_slice(),
            &[release(7, 3)]
        ]
        .concat()
    );
}

#[test]
fn drain_kicks_everyone_and_refuses_newcomers() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.login(0, 2, 8, 1);
    h.open(0, 3);
    h.node.begin_drain(h.at(100));
    assert_eq!(
        h.drain(),
        [
            kick(1, KickReason::Draining).as_slice(),
            &[release(7, 3)],
            &kick(2, KickReason::Draining),
            &[release(8, 1)],
            &kick(3, KickReason::Draining),
        ]
        .concat()
    );
    assert_eq!(
        h.node.handle_connection_opened(h.at(200), ConnId(4)),
        Err(Refused::Draining)
    );
    assert_eq!(h.next_timer(), None);
    assert_eq!(h.node.stats().kicks(KickReason::Draining), 3);
}

#[test]
fn config_is_validated() {
    let keys = TicketKeys::new(1, b"k".to_vec());
    let base = ServerConfig::new(ServerId::new(S1), keys);
    assert_eq!(base.validate(), Ok(()));
    type Adjust = fn(&mut ServerConfig);
    let cases: Vec<(&str, Adjust, ConfigError)> = vec![
        (
            "refresh slower than the proof",
            |c| c.refresh_interval = Duration::from_secs(24),
            ConfigError::RefreshInterval,
        ),
        (
            "epsilon one",
            |c| c.fence_margin = 1.0,
            ConfigError::FenceMargin,
        ),
        (
            "heartbeat slower than idle",
            |c| c.heartbeat_interval = Duration::from_secs(30),
            ConfigError::Heartbeat,
        ),
        (
            "zero burst",
            |c| c.send_burst = 0,
            ConfigError::Zero("send_burst"),
        ),
    ];
    for (name, adjust, want) in cases {
        let mut config = base.clone();
        adjust(&mut config);
        assert_eq!(config.validate(), Err(want), "{name}");
        assert!(ServerNode::new(config).is_err(), "{name}");
    }
}
