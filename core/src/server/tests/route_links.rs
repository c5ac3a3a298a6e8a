use super::*;

fn nack_unavailable(conn: u64) -> Out {
    Out::Nack {
        conn,
        code: ErrorCode::Unavailable,
        retryable: true,
    }
}

fn route(user: u64, epoch: u64) -> Out {
    Out::Route {
        user,
        epoch,
        conv: "all".into(),
    }
}

fn answer(h: &mut Harness, ms: u64, i: usize) -> Vec<Out> {
    let send = h.route_sends[i].clone();
    h.node.handle_route_result(
        h.at(ms),
        proto::RouteSendResult {
            request_id: send.request_id,
            user_id: send.user_id,
            ack: Some(proto::SendAck {
                seq: i as u64 + 1,
                ..Default::default()
            }),
            nack: None,
        },
    );
    h.drain()
}

#[test]
fn with_no_link_up_a_send_fails_at_once_and_retryable() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.node.handle_route_link_down(h.at(5), RouteLinkId(1));
    assert_eq!(h.drain(), vec![]);
    assert_eq!(
        h.frame(10, 1, send_frame("all", 5, 1)),
        vec![nack_unavailable(1)]
    );
    assert_eq!(h.node.stats().route_sends_unrouted, 1);
}

#[test]
fn a_users_unanswered_sends_share_one_link() {
    let mut h = Harness::new();
    h.login(0, 1, 3, 1); // user 3: link 2 of links 1 and 2, link 3 of 1, 2 and 3
    h.node
        .handle_route_link_up(h.at(1), RouteLinkId(2))
        .unwrap();
    assert_eq!(h.frame(10, 1, send_frame("all", 5, 1)), vec![route(3, 1)]);
    // A third link changes the hash (user 3 → link 3), not the link of sends in flight.
    h.node
        .handle_route_link_up(h.at(11), RouteLinkId(3))
        .unwrap();
    assert_eq!(h.frame(12, 1, send_frame("all", 5, 2)), vec![route(3, 1)]);
    answer(&mut h, 20, 0);
    assert_eq!(h.frame(21, 1, send_frame("all", 5, 3)), vec![route(3, 1)]);
    assert_eq!(
        h.route_links,
        vec![RouteLinkId(2), RouteLinkId(2), RouteLinkId(2)],
        "one send still unanswered each time"
    );
    answer(&mut h, 30, 1);
    answer(&mut h, 31, 2);
    // All answered: the next send picks afresh.
    h.frame(40, 1, send_frame("all", 5, 4));
    assert_eq!(h.route_links[3], RouteLinkId(3));
}

#[test]
fn users_spread_over_the_links() {
    let mut h = Harness::new();
    h.node
        .handle_route_link_up(h.at(0), RouteLinkId(2))
        .unwrap();
    for (conn, user) in [(1, 1), (2, 2), (3, 3), (4, 4)] {
        h.login(0, conn, user, 1);
        h.frame(10, conn, send_frame("all", 5, user));
    }
    let links: Vec<u64> = h.route_links.iter().map(|l| l.0).collect();
    assert_eq!(links, vec![2, 1, 2, 1]);
}

#[test]
fn a_link_going_down_fails_its_sends_and_frees_their_users() {
    let mut h = Harness::new();
    h.node
        .handle_route_link_up(h.at(0), RouteLinkId(2))
        .unwrap();
    h.login(0, 1, 1, 1); // user 1: link 2
    h.login(0, 2, 2, 1); // user 2: link 1
    h.frame(10, 1, send_frame("all", 5, 1));
    h.frame(11, 2, send_frame("all", 5, 2));
    h.frame(12, 1, send_frame("all", 5, 3));
    assert_eq!(h.node.route_link_in_flight(RouteLinkId(2)), 2);
    h.node.handle_route_link_down(h.at(20), RouteLinkId(2));
    assert_eq!(h.drain(), vec![nack_unavailable(1), nack_unavailable(1)]);
    assert_eq!(h.node.route_links(), 1);
    // User 1 goes over the link left; user 2's send there is untouched.
    assert_eq!(h.frame(30, 1, send_frame("all", 5, 4)), vec![route(1, 1)]);
    assert_eq!(h.route_links[3], RouteLinkId(1));
    assert_eq!(answer(&mut h, 40, 1), vec![Out::Ack { conn: 2, seq: 2 }]);
    // An answer for a send already failed is dropped.
    assert_eq!(answer(&mut h, 41, 0), vec![]);
}

#[test]
fn a_full_link_queue_fails_the_send_without_moving_the_user() {
    let mut h = Harness::new();
    h.node
        .handle_route_link_up(h.at(0), RouteLinkId(2))
        .unwrap();
    h.login(0, 1, 1, 1); // user 1: link 2
    h.frame(10, 1, send_frame("all", 5, 1));
    h.frame(11, 1, send_frame("all", 5, 2));
    let second = h.route_sends[1].request_id;
    h.node.handle_route_failed(h.at(12), second);
    assert_eq!(h.drain(), vec![nack_unavailable(1)]);
    assert_eq!(h.node.stats().route_sends_unrouted, 1);
    // The first is still on link 2, so the user stays there.
    h.frame(13, 1, send_frame("all", 5, 3));
    assert_eq!(h.route_links[2], RouteLinkId(2));
}

#[test]
fn a_send_whose_link_is_already_gone_is_routed_afresh() {
    let mut h = Harness::new();
    h.node
        .handle_route_link_up(h.at(0), RouteLinkId(2))
        .unwrap();
    h.login(0, 1, 1, 1); // user 1: link 2
    h.login(0, 2, 3, 1); // user 3: link 2
    h.frame(10, 2, send_frame("all", 5, 1));
    h.frame(11, 1, send_frame("all", 5, 2));
    // The shell finds link 2's writer gone when it queues user 1's send: user 3's send
    // on it fails, user 1's goes over link 1.
    let (link, send) = (h.route_links[1], h.route_sends[1].clone());
    h.node.handle_route_link_gone(h.at(12), link, send);
    assert_eq!(h.drain(), vec![nack_unavailable(2), route(1, 1)]);
    assert_eq!(h.route_links[2], RouteLinkId(1));
    assert_eq!(h.route_sends[2].request_id, h.route_sends[1].request_id);
    // With no link left, it fails like any send with no link.
    let send = h.route_sends[2].clone();
    h.node
        .handle_route_link_gone(h.at(13), RouteLinkId(1), send);
    assert_eq!(h.drain(), vec![nack_unavailable(1)]);
    assert_eq!(h.node.stats().route_sends_unrouted, 1);
}

#[test]
fn a_draining_server_drops_its_links_and_takes_no_new_ones() {
    let mut h = Harness::new();
    h.node.begin_drain(h.at(0));
    assert_eq!(h.node.route_links(), 0);
    assert_eq!(
        h.node.handle_route_link_up(h.at(1), RouteLinkId(2)),
        Err(Refused::Draining)
    );
}
