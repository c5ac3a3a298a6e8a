use super::*;

fn kick_done(link: u64, user: u64, below: u64) -> Out {
    Out::KickDone { link, user, below }
}

fn kick_user(user: u64, below: u64) -> proto::KickUser {
    proto::KickUser {
        user_id: user,
        below_epoch: below,
        reason: KickReason::TakenOver as i32,
    }
}

#[test]
fn kick_user_closes_only_older_sessions() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    // Same epoch: this is the session the route means to keep. Answered all the same, on
    // the link the kick came on.
    h.node
        .handle_kick_user(h.at(10), RouteLinkId(2), kick_user(7, 3));
    assert_eq!(h.drain(), vec![kick_done(2, 7, 3)]);
    // The answer comes last: after the kick and the release it caused.
    h.node
        .handle_kick_user(h.at(20), RouteLinkId(1), kick_user(7, 4));
    assert_eq!(
        h.drain(),
        [
            kick(1, KickReason::TakenOver).as_slice(),
            &[release(7, 3), kick_done(1, 7, 4)]
        ]
        .concat()
    );
    assert_eq!(h.node.stats().kicks(KickReason::TakenOver), 1);
}

#[test]
fn kick_user_stops_a_login_still_binding() {
    let mut h = Harness::new();
    h.open(0, 1);
    let ticket = h.ticket(7, 3);
    h.login_frame(0, 1, ticket);
    h.node
        .handle_kick_user(h.at(5), RouteLinkId(1), kick_user(7, 4));
    assert_eq!(
        h.drain(),
        [
            kick(1, KickReason::TakenOver).as_slice(),
            &[kick_done(1, 7, 4)]
        ]
        .concat()
    );
    // The bind reached the store before the takeover did: no LoginOk, claim released.
    assert_eq!(
        h.reply(10, Ok(StoreReply::SessionBound(Ok(())))),
        vec![release(7, 3)]
    );
    assert_eq!(h.node.sessions(), 0);
}

#[test]
fn refresh_reply_superseded_or_gone_kicks() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.login(0, 2, 8, 1);
    h.login(0, 3, 9, 1);
    h.forget_unanswered();
    let out = h.timeout(10_000);
    assert_eq!(
        out,
        vec![Out::Store(StoreCommand::RefreshLeases {
            server: ServerId::new(S1),
            lease_until: wall(40_000),
            sessions: vec![
                (UserId(7), Epoch(3)),
                (UserId(8), Epoch(1)),
                (UserId(9), Epoch(1)),
            ],
        })]
    );
    let out = h.reply(
        10_050,
        Ok(StoreReply::LeasesRefreshed(vec![
            (UserId(7), LeaseRefresh::Superseded { current: Epoch(4) }),
            (UserId(8), LeaseRefresh::Gone),
            (UserId(9), LeaseRefresh::Refreshed),
        ])),
    );
    assert_eq!(
        out,
        [
            kick(1, KickReason::TakenOver).as_slice(),
            &[release(7, 3)],
            &kick(2, KickReason::LoggedOut),
            &[release(8, 1)],
        ]
        .concat()
    );
    assert_eq!(h.node.session_of(UserId(9)), Some((ConnId(3), Epoch(1))));
}

#[test]
fn newer_local_login_takes_over_the_older_session() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.open(100, 2);
    let ticket = h.ticket(7, 4);
    h.login_frame(100, 2, ticket);
    // The old session is kicked before the new one's LoginOk: they never overlap.
    assert_eq!(
        h.reply(110, Ok(StoreReply::SessionBound(Ok(())))),
        [
            kick(1, KickReason::TakenOver).as_slice(),
            &[release(7, 3)],
            &[Out::LoginOk {
                conn: 2,
                user: 7,
                epoch: 4
            }],
        ]
        .concat()
    );
    assert_eq!(h.node.session_of(UserId(7)), Some((ConnId(2), Epoch(4))));
}

#[test]
fn older_bind_landing_after_a_newer_session_is_refused() {
    let mut h = Harness::new();
    h.open(0, 1);
    let old = h.ticket(7, 3);
    h.login_frame(0, 1, old);
    h.login(5, 2, 7, 4);
    // The store replies crossed: epoch 3's bind confirmation arrives last.
    assert_eq!(
        h.reply(10, Ok(StoreReply::SessionBound(Ok(())))),
        [error(1, ErrorCode::StaleEpoch).as_slice(), &[release(7, 3)]].concat()
    );
    assert_eq!(h.node.session_of(UserId(7)), Some((ConnId(2), Epoch(4))));
}
