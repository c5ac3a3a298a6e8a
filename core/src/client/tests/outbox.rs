//! Sends: the outbox offline and online, ordering, acks, nacks, unknown fates.

use super::*;

#[test]
fn outbox_waits_offline_and_resends_in_order_with_the_same_ids() {
    let mut h = Harness::new(quiet_config());
    h.step(0, In::Start);
    let a = h.s.send(h.at(1), conv("all"), Bytes::from_static(b"a"));
    let b = h.s.send(h.at(2), conv("g:x"), Bytes::from_static(b"b"));
    let c = h.s.send(h.at(3), conv("all"), Bytes::from_static(b"c"));
    assert_eq!(
        h.drain(),
        (vec![], vec![]),
        "nothing goes out while offline"
    );
    assert!(a != b && b != c && a != c);
    h.table(vec![
        (
            10,
            In::Answer(1, Ok(answer(5, 0xA))),
            vec![connect_s1()],
            vec![connecting_s1()],
        ),
        (
            20,
            In::Connected,
            vec![tx(Kind::Login(proto::Login {
                ticket: Some(ticket(5)),
            }))],
            vec![],
        ),
        (
            30,
            In::Frame(login_ok(5)),
            vec![
                sync_req(),
                send_frame(a, "all", "a", (1, 0)),
                send_frame(b, "g:x", "b", (2, 0)),
                send_frame(c, "all", "c", (3, 1)),
            ],
            vec![online_ev(5)],
        ),
        (
            40,
            In::Frame(send_ack(a, "all", 17)),
            vec![],
            vec![ClientEvent::Acked {
                msg_id: a,
                conv: conv("all"),
                log_epoch: E1,
                seq: 17,
            }],
        ),
        (
            50,
            In::Disconnected,
            vec![],
            vec![reconnecting(0, ConnectionLoss::Disconnected)],
        ),
        (
            50,
            In::Timeout,
            vec![login_cmd(2, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            60,
            In::Answer(2, Ok(answer(6, 0xB))),
            vec![connect_s1()],
            vec![connecting_s1()],
        ),
        (
            70,
            In::Connected,
            vec![tx(Kind::Login(proto::Login {
                ticket: Some(ticket(6)),
            }))],
            vec![],
        ),
        (
            80,
            In::Frame(login_ok(6)),
            vec![
                sync_req(),
                send_frame(b, "g:x", "b", (2, 0)),
                send_frame(c, "all", "c", (3, 0)),
            ],
            vec![online_ev(6)],
        ),
        // A second ack of `a` (the resend's) is not reported twice.
        (90, In::Frame(send_ack(a, "all", 17)), vec![], vec![]),
    ]);
    assert_eq!(h.s.outbox_len(), 2);
}

#[test]
fn a_send_refused_as_out_of_order_waits_for_the_one_it_follows() {
    let mut h = Harness::new(quiet_config());
    h.online();
    let a = h.s.send(h.at(100), conv("all"), Bytes::from_static(b"a"));
    let b = h.s.send(h.at(100), conv("all"), Bytes::from_static(b"b"));
    let _ = h.drain();
    h.table(vec![
        // b overtook a at the store: held, no retry timer.
        (
            110,
            In::Frame(send_nack(b, ErrorCode::OutOfOrder, true)),
            vec![],
            vec![],
        ),
    ]);
    assert_ne!(
        h.s.poll_timeout().map(|(_, reason)| reason),
        Some(TimerReason::SendRetry)
    );
    // A new message to `all` waits behind b; one to another conversation goes at once.
    let c = h.s.send(h.at(120), conv("all"), Bytes::from_static(b"c"));
    let g = h.s.send(h.at(120), conv("g:x"), Bytes::from_static(b"g"));
    assert_eq!(h.drain().0, vec![send_frame(g, "g:x", "g", (4, 0))]);
    h.table(vec![
        // a's ack releases b, which now follows nothing unsettled, and c held behind it:
        // both at once, c after b (one round trip for the burst, not one per message).
        (
            130,
            In::Frame(send_ack(a, "all", 1)),
            vec![
                send_frame(b, "all", "b", (2, 0)),
                send_frame(c, "all", "c", (3, 2)),
            ],
            vec![ClientEvent::Acked {
                msg_id: a,
                conv: conv("all"),
                log_epoch: E1,
                seq: 1,
            }],
        ),
        // b's ack releases nothing: c is already on its way.
        (
            140,
            In::Frame(send_ack(b, "all", 2)),
            vec![],
            vec![ClientEvent::Acked {
                msg_id: b,
                conv: conv("all"),
                log_epoch: E1,
                seq: 2,
            }],
        ),
        // A refusal that arrives after the one it waited for was acked: sent again at once.
        (
            150,
            In::Frame(send_nack(c, ErrorCode::OutOfOrder, true)),
            vec![send_frame(c, "all", "c", (3, 0))],
            vec![],
        ),
    ]);
}

#[test]
fn acks_nacks_retries_and_unknown() {
    let mut cfg = quiet_config();
    cfg.outbox_max_age = Duration::from_secs(60);
    let mut h = Harness::new(cfg);
    h.online();
    let a = h.s.send(h.at(100), conv("all"), Bytes::from_static(b"a"));
    let b = h.s.send(h.at(100), conv("all"), Bytes::from_static(b"b"));
    let c = h.s.send(h.at(100), conv("all"), Bytes::from_static(b"c"));
    assert_eq!(
        h.drain().0,
        vec![
            send_frame(a, "all", "a", (1, 0)),
            send_frame(b, "all", "b", (2, 1)),
            send_frame(c, "all", "c", (3, 2))
        ]
    );
    h.table(vec![
        (
            200,
            In::Frame(send_ack(b, "all", 4)),
            vec![],
            vec![ClientEvent::Acked {
                msg_id: b,
                conv: conv("all"),
                log_epoch: E1,
                seq: 4,
            }],
        ),
        (200, In::Frame(send_ack(b, "all", 4)), vec![], vec![]),
        (
            210,
            In::Frame(send_nack(a, ErrorCode::NotMember, false)),
            vec![],
            vec![ClientEvent::Rejected {
                msg_id: a,
                code: ErrorCode::NotMember,
                reason: "because".into(),
            }],
        ),
    ]);
    // A retryable nack for a message no longer in the outbox schedules nothing.
    h.table(vec![(
        215,
        In::Frame(send_nack(b, ErrorCode::RateLimited, true)),
        vec![],
        vec![],
    )]);
    assert_ne!(
        h.s.poll_timeout().map(|(_, reason)| reason),
        Some(TimerReason::SendRetry)
    );
    h.table(vec![(
        220,
        In::Frame(send_nack(c, ErrorCode::RateLimited, true)),
        vec![],
        vec![],
    )]);
    assert_eq!(
        h.s.poll_timeout(),
        Some((h.at(1_220), TimerReason::SendRetry))
    );
    // Held behind the retry, to keep the order.
    let d = h.s.send(h.at(300), conv("all"), Bytes::from_static(b"d"));
    assert_eq!(h.drain(), (vec![], vec![]));
    h.table(vec![
        (1_219, In::Timeout, vec![], vec![]),
        (
            1_220,
            In::Timeout,
            vec![
                send_frame(c, "all", "c", (3, 0)),
                send_frame(d, "all", "d", (4, 3)),
            ],
            vec![],
        ),
        (60_099, In::Timeout, vec![], vec![]),
        (
            60_100,
            In::Timeout,
            vec![],
            vec![ClientEvent::Unknown { msg_id: c }],
        ),
        // A late ack of an expired message is not reported.
        (60_200, In::Frame(send_ack(c, "all", 9)), vec![], vec![]),
        (
            60_300,
            In::Timeout,
            vec![],
            vec![ClientEvent::Unknown { msg_id: d }],
        ),
    ]);
    assert_eq!(h.s.outbox_len(), 0);
}
