use super::*;

#[test]
fn good_ticket_binds_then_login_ok() {
    let mut h = Harness::new();
    h.open(0, 1);
    assert_eq!(h.next_timer(), Some((10_000, TimerReason::LoginDeadline)));
    let ticket = h.ticket(7, 3);
    // The store step comes first; no LoginOk until it confirms.
    assert_eq!(
        h.login_frame(100, 1, ticket),
        vec![Out::Store(StoreCommand::BindSession {
            user: UserId(7),
            epoch: Epoch(3),
            server: ServerId::new(S1),
            lease_until: wall(100 + 30_000),
        })]
    );
    assert_eq!(h.node.sessions(), 0);
    assert_eq!(
        h.reply(150, Ok(StoreReply::SessionBound(Ok(())))),
        vec![Out::LoginOk {
            conn: 1,
            user: 7,
            epoch: 3
        }]
    );
    assert_eq!(h.node.session_of(UserId(7)), Some((ConnId(1), Epoch(3))));
    assert_eq!(h.node.stats().logins_ok, 1);
    // Next deadline: the first lease refresh, a refresh interval after going live.
    assert_eq!(h.next_timer(), Some((10_150, TimerReason::LeaseRefresh)));
}

#[test]
fn bad_tickets_are_refused_with_their_error() {
    let h = Harness::new();
    let good = h.ticket(7, 3);
    let forged = proto::Ticket {
        epoch: 4,
        ..good.clone()
    };
    let other_key = TicketKeys::new(1, b"other".to_vec()).mint(&Grant {
        user: UserId(7),
        server: ServerId::new(S1),
        epoch: Epoch(3),
        expires_at: wall(60_000),
    });
    let expired = h.keys.mint(&Grant {
        user: UserId(7),
        server: ServerId::new(S1),
        epoch: Epoch(3),
        // Login at wall(5_000); skew 2 s: expired 3 s ago is past the allowance.
        expires_at: wall(2_000),
    });
    let within_skew = h.keys.mint(&Grant {
        user: UserId(7),
        server: ServerId::new(S1),
        epoch: Epoch(3),
        expires_at: wall(3_001),
    });
    let wrong_server = h.keys.mint(&Grant {
        user: UserId(7),
        server: ServerId::new("s2"),
        epoch: Epoch(3),
        expires_at: wall(60_000),
    });
    let cases: Vec<(&str, Option<proto::Ticket>, Option<ErrorCode>)> = vec![
        ("forged epoch", Some(forged), Some(ErrorCode::BadTicket)),
        ("other secret", Some(other_key), Some(ErrorCode::BadTicket)),
        ("no ticket", None, Some(ErrorCode::BadTicket)),
        ("expired", Some(expired), Some(ErrorCode::TicketExpired)),
        (
            "wrong server",
            Some(wrong_server),
            Some(ErrorCode::WrongServer),
        ),
        ("expired but within skew", Some(within_skew), None),
    ];
    for (name, ticket, want) in cases {
        let mut h = Harness::new();
        h.open(0, 1);
        let out = h.frame(5_000, 1, Kind::Login(proto::Login { ticket }));
        match want {
            Some(code) => {
                assert_eq!(out, error(1, code).to_vec(), "{name}");
                assert_eq!(h.node.connections(), 0, "{name}");
                assert_eq!(h.node.stats().logins_failed, 1, "{name}");
            }
            None => assert!(
                matches!(
                    out.as_slice(),
                    [Out::Store(StoreCommand::BindSession { .. })]
                ),
                "{name}: {out:?}"
            ),
        }
    }
}

#[test]
fn stale_epoch_at_bind_is_refused_without_release() {
    let mut h = Harness::new();
    h.open(0, 1);
    let ticket = h.ticket(7, 3);
    h.login_frame(0, 1, ticket);
    // No release: the claim belongs to the newer epoch.
    assert_eq!(
        h.reply(10, Ok(StoreReply::SessionBound(Err(Epoch(4))))),
        error(1, ErrorCode::StaleEpoch).to_vec()
    );
    assert_eq!(h.node.sessions(), 0);
    assert_eq!(h.node.stats().logins_failed, 1);
}

#[test]
fn store_unavailable_at_bind_refuses_and_releases() {
    let mut h = Harness::new();
    h.open(0, 1);
    let ticket = h.ticket(7, 3);
    h.login_frame(0, 1, ticket);
    let mut want = error(1, ErrorCode::Unavailable).to_vec();
    // The bind may have landed: give the claim back.
    want.push(release(7, 3));
    assert_eq!(h.reply(10, Err(StoreUnavailable("timeout".into()))), want);
}

#[test]
fn bind_slower_than_the_proven_window_is_refused() {
    let mut h = Harness::with(|c| c.login_timeout = Duration::from_secs(60));
    h.open(0, 1);
    let ticket = h.ticket(7, 3);
    h.login_frame(0, 1, ticket);
    let mut want = error(1, ErrorCode::Unavailable).to_vec();
    want.push(release(7, 3));
    assert_eq!(h.reply(24_000, Ok(StoreReply::SessionBound(Ok(())))), want);
}

#[test]
fn requests_before_login_ok_close_the_connection() {
    let requests = [
        send_frame("all", 1, 1),
        Kind::DeliverAck(proto::DeliverAck::default()),
        Kind::SyncRequest(proto::SyncRequest {}),
        Kind::FetchRequest(proto::FetchRequest::default()),
    ];
    for request in requests {
        let mut h = Harness::new();
        h.open(0, 1);
        // A ping is fine before login.
        assert_eq!(
            h.frame(1, 1, ping(5)),
            vec![Out::Pong { conn: 1, nonce: 5 }]
        );
        assert_eq!(
            h.frame(2, 1, request.clone()),
            error(1, ErrorCode::NotLoggedIn).to_vec(),
            "{request:?}"
        );
    }
    // Also while the bind is in flight.
    let mut h = Harness::new();
    h.open(0, 1);
    let ticket = h.ticket(7, 3);
    h.login_frame(0, 1, ticket);
    assert_eq!(
        h.frame(1, 1, Kind::SyncRequest(proto::SyncRequest {})),
        error(1, ErrorCode::NotLoggedIn).to_vec()
    );
}

#[test]
fn server_frames_from_a_client_and_second_logins_are_protocol_errors() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    let ticket = h.ticket(7, 3);
    let mut want = error(1, ErrorCode::UnexpectedFrame).to_vec();
    want.push(release(7, 3));
    assert_eq!(h.login_frame(10, 1, ticket), want);

    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    let mut want = error(1, ErrorCode::UnexpectedFrame).to_vec();
    want.push(release(7, 3));
    assert_eq!(h.frame(10, 1, Kind::Pong(proto::Pong { nonce: 1 })), want);

    let mut h = Harness::new();
    h.open(0, 1);
    h.node
        .handle_frame(h.at(1), wall(1), ConnId(1), Frame { kind: None });
    assert_eq!(h.drain(), error(1, ErrorCode::MalformedFrame).to_vec());
    assert_eq!(h.node.stats().protocol_errors, 1);
}

#[test]
fn login_timeout() {
    let mut h = Harness::new();
    h.open(0, 1);
    // Pings do not stand in for a login.
    h.frame(5_000, 1, ping(1));
    assert_eq!(h.next_timer(), Some((10_000, TimerReason::LoginDeadline)));
    assert_eq!(h.timeout(9_999), vec![]);
    assert_eq!(
        h.timeout(10_000),
        kick(1, KickReason::LoginTimeout).to_vec()
    );
    assert_eq!(h.next_timer(), None);
}

#[test]
fn login_timeout_while_binding_releases_when_the_bind_lands() {
    let mut h = Harness::new();
    h.open(0, 1);
    let ticket = h.ticket(7, 3);
    h.login_frame(9_000, 1, ticket);
    assert_eq!(
        h.timeout(10_000),
        kick(1, KickReason::LoginTimeout).to_vec()
    );
    assert_eq!(
        h.reply(11_000, Ok(StoreReply::SessionBound(Ok(())))),
        vec![release(7, 3)]
    );
    assert_eq!(h.node.sessions(), 0);
}

#[test]
fn connection_limit() {
    let mut h = Harness::with(|c| c.max_connections = 2);
    h.open(0, 1);
    h.open(0, 2);
    assert_eq!(
        h.node.handle_connection_opened(h.at(0), ConnId(3)),
        Err(Refused::TooManyConnections)
    );
    h.node.handle_connection_closed(h.at(1), ConnId(1));
    assert_eq!(h.node.handle_connection_opened(h.at(1), ConnId(3)), Ok(()));
    assert_eq!(h.node.stats().refused_connections, 1);
}
