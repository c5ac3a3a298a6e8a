use super::*;

fn is_bind(c: &StoreCommand) -> bool {
    matches!(c, StoreCommand::BindSession { .. })
}

#[test]
fn an_unanswered_bind_fails_unavailable_at_the_store_timeout() {
    let mut h = Harness::new();
    h.open(0, 1);
    let ticket = h.ticket(7, 3);
    h.login_frame(100, 1, ticket);
    assert_eq!(h.next_timer(), Some((5_100, TimerReason::StoreTimeout)));
    assert_eq!(h.timeout(5_099), vec![]);
    assert_eq!(
        h.timeout(5_100),
        [
            error(1, ErrorCode::Unavailable).as_slice(),
            &[release(7, 3)]
        ]
        .concat()
    );
    assert_eq!(h.node.stats().store_timeouts, 1);
    // The reply arriving after all changes nothing.
    assert_eq!(
        h.reply_to(5_200, is_bind, Ok(StoreReply::SessionBound(Ok(())))),
        vec![]
    );
    assert_eq!(h.node.sessions(), 0);
}

#[test]
fn an_unanswered_sync_is_an_error_frame_not_a_close() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.frame(1_000, 1, Kind::SyncRequest(proto::SyncRequest {}));
    assert_eq!(h.next_timer(), Some((6_000, TimerReason::StoreTimeout)));
    assert_eq!(
        h.timeout(6_000),
        vec![Out::Error {
            conn: 1,
            code: ErrorCode::Unavailable
        }]
    );
    assert_eq!(h.node.session_of(UserId(7)), Some((ConnId(1), Epoch(3))));
}

#[test]
fn an_answered_request_leaves_no_timer() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    // Only the lease refresh is due; the bind's timeout went with its reply.
    assert_eq!(h.next_timer(), Some((10_000, TimerReason::LeaseRefresh)));
}
