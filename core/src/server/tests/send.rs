use super::*;

#[test]
fn send_is_forwarded_and_its_ack_relayed() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    assert_eq!(
        h.frame(10, 1, send_frame("p:7:9", 5, 42)),
        vec![Out::Route {
            user: 7,
            epoch: 3,
            conv: "p:7:9".into()
        }]
    );
    let sent = h.route_sends[0].clone();
    assert_eq!(sent.send.as_ref().unwrap().msg_id_lo, 42);
    let ack = proto::SendAck {
        msg_id_hi: 0,
        msg_id_lo: 42,
        conv: "p:7:9".into(),
        log_epoch: 1,
        seq: 17,
    };
    h.node.handle_route_result(
        h.at(20),
        proto::RouteSendResult {
            request_id: sent.request_id,
            user_id: 7,
            ack: Some(ack),
            nack: None,
        },
    );
    assert_eq!(h.drain(), vec![Out::Ack { conn: 1, seq: 17 }]);
    // A duplicate result for the same request is dropped.
    h.node.handle_route_result(
        h.at(21),
        proto::RouteSendResult {
            request_id: sent.request_id,
            ..Default::default()
        },
    );
    assert_eq!(h.drain(), vec![]);
}

#[test]
fn route_nack_is_relayed_and_a_dead_link_nacks_retryable() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.frame(10, 1, send_frame("g:rust", 5, 1));
    h.frame(11, 1, send_frame("g:rust", 5, 2));
    let (first, second) = (h.route_sends[0].request_id, h.route_sends[1].request_id);
    h.node.handle_route_result(
        h.at(20),
        proto::RouteSendResult {
            request_id: first,
            user_id: 7,
            ack: None,
            nack: Some(proto::SendNack {
                msg_id_lo: 1,
                code: ErrorCode::NotMember as i32,
                retryable: false,
                ..Default::default()
            }),
        },
    );
    h.node.handle_route_failed(h.at(21), second);
    assert_eq!(
        h.drain(),
        vec![
            Out::Nack {
                conn: 1,
                code: ErrorCode::NotMember,
                retryable: false
            },
            Out::Nack {
                conn: 1,
                code: ErrorCode::Unavailable,
                retryable: true
            },
        ]
    );
}

#[test]
fn result_for_a_session_that_ended_is_dropped() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.frame(10, 1, send_frame("all", 5, 1));
    let request_id = h.route_sends[0].request_id;
    h.node.handle_connection_closed(h.at(15), ConnId(1));
    assert_eq!(h.drain(), vec![release(7, 3)]);
    // The user is back on another connection: the old send's ack is not theirs to get.
    h.login(16, 2, 7, 4);
    h.node.handle_route_result(
        h.at(20),
        proto::RouteSendResult {
            request_id,
            user_id: 7,
            ack: Some(proto::SendAck::default()),
            nack: None,
        },
    );
    assert_eq!(h.drain(), vec![]);
}

#[test]
fn refused_sends_table() {
    let nack = |code, retryable| {
        vec![Out::Nack {
            conn: 1,
            code,
            retryable,
        }]
    };
    let route = |conv: &str| {
        vec![Out::Route {
            user: 7,
            epoch: 3,
            conv: conv.into(),
        }]
    };
    let cases: Vec<(&str, Kind, Vec<Out>)> = vec![
        (
            "bad conversation",
            send_frame("p:9:7", 5, 1),
            nack(ErrorCode::BadConversation, false),
        ),
        (
            "garbage conversation",
            send_frame("", 5, 1),
            nack(ErrorCode::BadConversation, false),
        ),
        (
            "body at the limit",
            send_frame("all", 4096, 1),
            route("all"),
        ),
        (
            "body over the limit",
            send_frame("all", 4097, 1),
            nack(ErrorCode::BodyTooLarge, false),
        ),
    ];
    for (name, frame, want) in cases {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        assert_eq!(h.frame(10, 1, frame), want, "{name}");
        assert_eq!(h.node.connections(), 1, "{name}: the connection stays");
    }
}

#[test]
fn token_bucket_limits_sends_per_user() {
    let mut h = Harness::with(|c| {
        c.send_rate_per_sec = 1;
        c.send_burst = 2;
    });
    h.login(0, 1, 7, 3);
    let route = vec![Out::Route {
        user: 7,
        epoch: 3,
        conv: "all".into(),
    }];
    let limited = vec![Out::Nack {
        conn: 1,
        code: ErrorCode::RateLimited,
        retryable: true,
    }];
    let steps: Vec<(u64, Vec<Out>)> = vec![
        (100, route.clone()),
        (100, route.clone()),
        (100, limited.clone()),
        (999, limited.clone()), // 0.9 tokens refilled since 100 ms
        (1_100, route.clone()),
        (1_100, limited),
    ];
    for (i, (ms, want)) in steps.into_iter().enumerate() {
        assert_eq!(
            h.frame(ms, 1, send_frame("all", 1, i as u64)),
            want,
            "step {i}"
        );
    }
    assert_eq!(h.node.stats().rate_limited_sends, 3);
}
