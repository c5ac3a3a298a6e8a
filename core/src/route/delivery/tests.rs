use super::*;
use crate::ids::{Epoch, LogEpoch};
use crate::store::{Appended, MembersVersion, StoreUnavailable};

#[allow(clippy::disallowed_methods)]
fn base() -> Instant {
    Instant::from_nanos(0)
}

const EPOCH: LogEpoch = LogEpoch(0xE90C);

fn sid(s: &str) -> ServerId {
    ServerId::new(s)
}

fn live(ids: &[&str]) -> BTreeMap<ServerId, LiveServer> {
    ids.iter()
        .map(|id| {
            let server = LiveServer {
                id: sid(id),
                host: "10.0.0.1".into(),
                client_port: 11211,
                link_port: 11311,
                http_port: 8081,
                connections: 0,
                client_tls: false,
                ws_port: None,
            };
            (sid(id), server)
        })
        .collect()
}

fn config() -> DeliveryConfig {
    DeliveryConfig {
        broadcast_threshold: 3,
        ..DeliveryConfig::default()
    }
}

fn machine(servers: &[&str]) -> RouteDelivery {
    let mut d = RouteDelivery::new(config());
    d.handle_registry(live(servers));
    d
}

fn send(id: u128, conv: &str, body: &str) -> cim_proto::Send {
    let id = ClientMsgId(id);
    cim_proto::Send {
        msg_id_hi: id.hi(),
        msg_id_lo: id.lo(),
        conv: conv.into(),
        body: body.as_bytes().to_vec().into(),
        sent_at_ms: 1,
        ..Default::default()
    }
}

fn link(server: &str, request_id: u64) -> SendOrigin {
    SendOrigin::Link {
        server: sid(server),
        request_id,
    }
}

fn stored(conv: &str, seq: u64, sender: u64, id: u128, body: &str) -> StoredMessage {
    StoredMessage {
        conv: conv.parse().unwrap(),
        log_epoch: EPOCH,
        seq,
        sender: UserId(sender),
        msg_id: ClientMsgId(id),
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        appended_at: UnixMillis(1000),
    }
}

fn appended(message: StoredMessage, duplicate: bool) -> StoreResult {
    Ok(StoreReply::Appended(Ok(Appended {
        message,
        duplicate,
        recipients: None,
    })))
}

fn route(user: u64, server: Option<&str>) -> (UserId, Option<RouteRecord>) {
    let record = server.map(|s| RouteRecord {
        server: sid(s),
        epoch: Epoch(1),
    });
    (UserId(user), record)
}

#[derive(Debug, Default)]
struct Out {
    store: Vec<StoreRequest>,
    replies: Vec<(SendOrigin, RouteSendResult)>,
    pushes: Vec<(ServerId, PushBatch)>,
}

fn drain(d: &mut RouteDelivery) -> Out {
    let mut out = Out::default();
    while let Some(output) = d.poll_output() {
        match output {
            DeliveryOutput::Store(r) => out.store.push(r),
            DeliveryOutput::Reply { origin, result } => out.replies.push((origin, result)),
            DeliveryOutput::Push { server, batch } => out.pushes.push((server, batch)),
        }
    }
    out
}

fn ack_of(result: &RouteSendResult) -> (u64, u64) {
    let ack = result.ack.as_ref().expect("an ack");
    assert!(result.nack.is_none());
    (ack.log_epoch, ack.seq)
}

fn nack_of(result: &RouteSendResult) -> (ErrorCode, bool) {
    assert!(result.ack.is_none());
    let nack = result.nack.as_ref().expect("a nack");
    (ErrorCode::try_from(nack.code).unwrap(), nack.retryable)
}

/// Server -> (seq, recipients, all_sessions) for every push, batches flattened.
fn summary(pushes: &[(ServerId, PushBatch)]) -> Vec<(String, u64, Vec<u64>, bool)> {
    pushes
        .iter()
        .flat_map(|(server, batch)| {
            batch.pushes.iter().map(move |p| {
                let seq = p.message.as_ref().unwrap().seq;
                (server.0.clone(), seq, p.recipients.clone(), p.all_sessions)
            })
        })
        .collect()
}

/// Sends, checks the Append it causes, answers it, and returns what followed.
fn send_and_append(
    d: &mut RouteDelivery,
    now: Instant,
    origin: SendOrigin,
    sender: u64,
    message: StoredMessage,
    duplicate: bool,
) -> Out {
    let conv = message.conv.to_string();
    let body = String::from_utf8(message.body.to_vec()).unwrap();
    d.handle_send(
        now,
        UnixMillis(1000),
        origin,
        UserId(sender),
        send(message.msg_id.0, &conv, &body),
    );
    let out = drain(d);
    assert_eq!(out.store.len(), 1);
    assert!(out.replies.is_empty() && out.pushes.is_empty());
    let StoreCommand::Append {
        conv: c,
        sender: s,
        msg_id,
        body: b,
        now: wall,
        order: None,
        members_known: _,
    } = &out.store[0].command
    else {
        panic!("expected an append, got {:?}", out.store[0]);
    };
    assert_eq!(
        (c, *s, *msg_id, b, *wall),
        (
            &message.conv,
            UserId(sender),
            message.msg_id,
            &message.body,
            UnixMillis(1000)
        )
    );
    let id = out.store[0].id;
    d.handle_store_reply(now, id, appended(message, duplicate));
    drain(d)
}

/// A server's RouteSend: one with a send takes the send's path (an Append, answered on
/// that server's link); one without is nacked at once, non-retryable, with no store
/// request and nothing counted as a nacked message.
#[test]
fn route_send_from_a_link_table() {
    let t0 = base();
    /// (name, send carried, appends, nack: code and retryable)
    type Case = (
        &'static str,
        Option<cim_proto::Send>,
        usize,
        Option<(ErrorCode, bool)>,
    );
    let cases: Vec<Case> = vec![
        ("with a send", Some(send(9, "all", "hi")), 1, None),
        (
            "without a send",
            None,
            0,
            Some((ErrorCode::MalformedFrame, false)),
        ),
        (
            "with a bad send",
            Some(send(9, "p:2:1", "hi")),
            0,
            Some((ErrorCode::BadConversation, false)),
        ),
    ];
    for (name, message, appends, nack) in cases {
        let mut d = machine(&["a"]);
        let route_send = RouteSend {
            request_id: 7,
            user_id: 1,
            epoch: 3,
            send: message,
        };
        d.handle_route_send(t0, UnixMillis(1000), sid("a"), route_send);
        let out = drain(&mut d);
        assert_eq!(out.store.len(), appends, "{name}");
        assert_eq!(out.replies.len(), usize::from(nack.is_some()), "{name}");
        if let Some(want) = nack {
            let (origin, result) = &out.replies[0];
            assert_eq!(*origin, link("a", 7), "{name}");
            assert_eq!((result.request_id, result.user_id), (7, 1), "{name}");
            assert_eq!(nack_of(result), want, "{name}");
        }
        let counted = u64::from(nack.is_some() && name != "without a send");
        assert_eq!(d.stats().nacked, counted, "{name}");
    }
}

#[test]
fn private_send_acks_then_pushes_to_both_participants_servers() {
    let t0 = base();
    let mut d = machine(&["a", "b"]);
    let msg = stored("p:1:2", 1, 1, 0xAB, "hi");
    let out = send_and_append(&mut d, t0, link("a", 7), 1, msg.clone(), false);

    // Acked (appended) before any route is read; no push yet.
    assert_eq!(out.replies.len(), 1);
    assert_eq!(out.replies[0].0, link("a", 7));
    assert_eq!(out.replies[0].1.request_id, 7);
    assert_eq!(out.replies[0].1.user_id, 1);
    assert_eq!(ack_of(&out.replies[0].1), (EPOCH.0, 1));
    assert!(out.pushes.is_empty());
    assert_eq!(out.store.len(), 1);
    assert_eq!(
        out.store[0].command,
        StoreCommand::LoadRoutes {
            users: vec![UserId(1), UserId(2)]
        }
    );

    let routes = vec![route(1, Some("a")), route(2, Some("b"))];
    d.handle_store_reply(t0, out.store[0].id, Ok(StoreReply::Routes(routes)));
    let out = drain(&mut d);
    assert!(out.store.is_empty() && out.replies.is_empty());
    assert_eq!(
        summary(&out.pushes),
        [
            ("a".into(), 1, vec![1], false),
            ("b".into(), 1, vec![2], false)
        ]
    );
    let wire = out.pushes[0].1.pushes[0].message.clone().unwrap();
    assert_eq!(wire, message_to_proto(&msg));
    assert_eq!(
        (wire.conv.as_str(), wire.msg_id_hi, wire.msg_id_lo),
        ("p:1:2", 0, 0xAB)
    );
    assert_eq!(d.in_flight(), 0);
    assert_eq!(d.poll_timeout(), None);
}

#[test]
fn offline_recipient_is_acked_but_not_pushed() {
    let t0 = base();
    let mut d = machine(&["a", "b"]);
    let origin = SendOrigin::Http(ApiRequestId(42));
    let out = send_and_append(
        &mut d,
        t0,
        origin.clone(),
        2,
        stored("p:1:2", 3, 2, 5, "x"),
        false,
    );
    assert_eq!(out.replies[0].0, origin);
    assert_eq!(out.replies[0].1.request_id, 42);
    assert_eq!(ack_of(&out.replies[0].1), (EPOCH.0, 3));
    let routes = vec![route(1, None), route(2, Some("b"))];
    d.handle_store_reply(t0, out.store[0].id, Ok(StoreReply::Routes(routes)));
    let out = drain(&mut d);
    assert_eq!(summary(&out.pushes), [("b".into(), 3, vec![2], false)]);
    assert_eq!(d.stats().recipients_unreachable, 1);
}

#[test]
fn all_is_one_frame_per_live_server_without_store_reads() {
    let t0 = base();
    let mut d = machine(&["a", "b", "c"]);
    let out = send_and_append(
        &mut d,
        t0,
        link("b", 1),
        9,
        stored("all", 10, 9, 1, "hey"),
        false,
    );
    assert_eq!(ack_of(&out.replies[0].1), (EPOCH.0, 10));
    assert!(out.store.is_empty());
    assert_eq!(
        summary(&out.pushes),
        [
            ("a".into(), 10, vec![], true),
            ("b".into(), 10, vec![], true),
            ("c".into(), 10, vec![], true),
        ]
    );
}

#[test]
fn small_group_goes_through_routes_large_group_through_member_lists() {
    let t0 = base();
    let mut d = machine(&["a", "b", "c"]);

    // 3 members (= threshold): read their routes, push per server.
    let out = send_and_append(
        &mut d,
        t0,
        link("a", 1),
        1,
        stored("g:rust", 1, 1, 1, "s"),
        false,
    );
    assert_eq!(
        out.store[0].command,
        StoreCommand::LoadMembers {
            conv: ConvId::Group("rust".into())
        }
    );
    let members = vec![UserId(1), UserId(2), UserId(3)];
    d.handle_store_reply(
        t0,
        out.store[0].id,
        Ok(StoreReply::Members(members.clone())),
    );
    let out = drain(&mut d);
    assert!(out.pushes.is_empty());
    assert_eq!(
        out.store[0].command,
        StoreCommand::LoadRoutes { users: members }
    );
    let routes = vec![
        route(1, Some("a")),
        route(2, Some("a")),
        route(3, Some("c")),
    ];
    d.handle_store_reply(t0, out.store[0].id, Ok(StoreReply::Routes(routes)));
    assert_eq!(
        summary(&drain(&mut d).pushes),
        [
            ("a".into(), 1, vec![1, 2], false),
            ("c".into(), 1, vec![3], false)
        ]
    );

    // 4 members (> threshold): no route reads, the member list to every live server.
    let out = send_and_append(
        &mut d,
        t0,
        link("a", 2),
        1,
        stored("g:big", 1, 1, 2, "s"),
        false,
    );
    let members = vec![UserId(4), UserId(1), UserId(3), UserId(2)];
    d.handle_store_reply(t0, out.store[0].id, Ok(StoreReply::Members(members)));
    let out = drain(&mut d);
    assert!(out.store.is_empty());
    assert_eq!(
        summary(&out.pushes),
        [
            ("a".into(), 1, vec![1, 2, 3, 4], false),
            ("b".into(), 1, vec![1, 2, 3, 4], false),
            ("c".into(), 1, vec![1, 2, 3, 4], false),
        ]
    );

    // An empty group (everyone left since the append): nothing to read or push.
    let out = send_and_append(
        &mut d,
        t0,
        link("a", 3),
        1,
        stored("g:gone", 1, 1, 3, "s"),
        false,
    );
    d.handle_store_reply(t0, out.store[0].id, Ok(StoreReply::Members(vec![])));
    let out = drain(&mut d);
    assert!(out.store.is_empty() && out.pushes.is_empty());
}

/// An append whose reply carries its recipients (read in the append's step) is pushed at
/// once, with no further store read; one without them (`all`, or a backend that could not
/// read them) takes the reads. The ack still leaves before the pushes.
#[test]
fn an_append_that_carries_its_recipients_pushes_without_another_read() {
    let t0 = base();
    let members = |ids: &[u64]| {
        Some(Recipients::Members {
            version: MembersVersion {
                log_epoch: EPOCH,
                changes: 1,
            },
            members: ids.iter().map(|&u| UserId(u)).collect(),
        })
    };
    /// (name, conv, recipients in the append's reply, duplicate, store reads that follow,
    /// pushes: server, recipients)
    type Case = (
        &'static str,
        &'static str,
        Option<Recipients>,
        bool,
        Vec<StoreCommand>,
        Vec<(&'static str, Vec<u64>)>,
    );
    let cases: Vec<Case> = vec![
        (
            "private with routes",
            "p:1:2",
            Some(Recipients::Routes(vec![
                route(1, Some("a")),
                route(2, Some("b")),
            ])),
            false,
            vec![],
            vec![("a", vec![1]), ("b", vec![2])],
        ),
        (
            "private duplicate with routes pushes again",
            "p:1:2",
            Some(Recipients::Routes(vec![
                route(1, Some("b")),
                route(2, None),
            ])),
            true,
            vec![],
            vec![("b", vec![1])],
        ),
        (
            "private without routes reads them",
            "p:1:2",
            None,
            false,
            vec![StoreCommand::LoadRoutes {
                users: vec![UserId(1), UserId(2)],
            }],
            vec![],
        ),
        (
            "large group with members: member lists at once",
            "g:big",
            members(&[4, 1, 3, 2]),
            false,
            vec![],
            vec![("a", vec![1, 2, 3, 4]), ("b", vec![1, 2, 3, 4])],
        ),
        (
            "small group with members: their routes next",
            "g:small",
            members(&[1, 2]),
            false,
            vec![StoreCommand::LoadRoutes {
                users: vec![UserId(1), UserId(2)],
            }],
            vec![],
        ),
        (
            "group that everyone left: nothing",
            "g:gone",
            members(&[]),
            false,
            vec![],
            vec![],
        ),
        (
            "group without members reads them",
            "g:big",
            None,
            false,
            vec![StoreCommand::LoadMembers {
                conv: ConvId::Group("big".into()),
            }],
            vec![],
        ),
    ];
    for (name, conv, recipients, duplicate, reads, pushes) in cases {
        let mut d = machine(&["a", "b"]);
        let msg = stored(conv, 5, 1, 9, "x");
        d.handle_send(
            t0,
            UnixMillis(1000),
            link("a", 1),
            UserId(1),
            send(9, conv, "x"),
        );
        let out = drain(&mut d);
        assert_eq!(out.store.len(), 1, "{name}");
        let reply = Appended {
            message: msg,
            duplicate,
            recipients,
        };
        d.handle_store_reply(t0, out.store[0].id, Ok(StoreReply::Appended(Ok(reply))));
        let out = drain(&mut d);
        assert_eq!(out.replies.len(), 1, "{name}");
        assert_eq!(ack_of(&out.replies[0].1), (EPOCH.0, 5), "{name}");
        let commands: Vec<StoreCommand> = out.store.into_iter().map(|r| r.command).collect();
        assert_eq!(commands, reads, "{name}");
        let want: Vec<(String, u64, Vec<u64>, bool)> = pushes
            .into_iter()
            .map(|(server, users)| (server.to_owned(), 5, users, false))
            .collect();
        assert_eq!(summary(&out.pushes), want, "{name}");
        assert_eq!(d.in_flight(), usize::from(!commands.is_empty()), "{name}");
    }
}

#[test]
fn duplicate_append_acks_the_original_seq_and_pushes_again() {
    let t0 = base();
    let mut d = machine(&["a"]);
    let msg = stored("p:1:2", 4, 1, 77, "again");
    for duplicate in [false, true] {
        let out = send_and_append(&mut d, t0, link("a", 1), 1, msg.clone(), duplicate);
        assert_eq!(ack_of(&out.replies[0].1), (EPOCH.0, 4));
        let routes = vec![route(1, Some("a")), route(2, Some("a"))];
        d.handle_store_reply(t0, out.store[0].id, Ok(StoreReply::Routes(routes)));
        assert_eq!(
            summary(&drain(&mut d).pushes),
            [("a".into(), 4, vec![1, 2], false)]
        );
    }
    assert_eq!((d.stats().acked, d.stats().duplicates), (2, 1));
}

#[test]
fn a_sends_order_reaches_the_append_and_order_numbers_past_2_pow_53_are_refused() {
    let t0 = base();
    let ordered = |seq, after| cim_proto::Send {
        order_stream: 7,
        order_seq: seq,
        order_after: after,
        ..send(9, "g:x", "b")
    };
    let mut d = machine(&["a"]);
    d.handle_send(t0, UnixMillis(1), link("a", 1), UserId(1), ordered(3, 2));
    let out = drain(&mut d);
    let StoreCommand::Append { order, .. } = &out.store[0].command else {
        panic!("expected an append, got {:?}", out.store);
    };
    let want = SendOrder {
        stream: 7,
        seq: 3,
        after: 2,
    };
    assert_eq!(*order, Some(want));
    for (seq, after) in [
        (MAX_ORDER_SEQ + 1, 0),
        (5, MAX_ORDER_SEQ + 1),
        (u64::MAX, 1),
    ] {
        let mut d = machine(&["a"]);
        d.handle_send(
            t0,
            UnixMillis(1),
            link("a", 2),
            UserId(1),
            ordered(seq, after),
        );
        let out = drain(&mut d);
        assert!(out.store.is_empty(), "{seq} after {after}");
        assert_eq!(
            nack_of(&out.replies[0].1),
            (ErrorCode::MalformedFrame, false)
        );
    }
    // The largest allowed still goes to the store.
    let mut d = machine(&["a"]);
    d.handle_send(
        t0,
        UnixMillis(1),
        link("a", 3),
        UserId(1),
        ordered(MAX_ORDER_SEQ, 0),
    );
    assert_eq!(drain(&mut d).store.len(), 1);
}

#[test]
fn refused_sends_are_nacked_with_the_right_code() {
    let t0 = base();
    let long = "x".repeat(config().max_body + 1);
    // (conv, body, sender) -> code; none reaches the store.
    let cases: &[(&str, &str, u64, ErrorCode)] = &[
        ("nope", "b", 1, ErrorCode::BadConversation),
        ("p:2:1", "b", 1, ErrorCode::BadConversation),
        ("g:", "b", 1, ErrorCode::BadConversation),
        ("p:1:2", &long, 1, ErrorCode::BodyTooLarge),
        ("p:2:3", "b", 1, ErrorCode::NotMember),
    ];
    for (conv, body, sender, code) in cases {
        let mut d = machine(&["a"]);
        d.handle_send(
            t0,
            UnixMillis(1),
            link("a", 5),
            UserId(*sender),
            send(9, conv, body),
        );
        let out = drain(&mut d);
        assert!(out.store.is_empty(), "{conv}");
        assert_eq!(out.replies.len(), 1);
        assert_eq!(nack_of(&out.replies[0].1), (*code, false), "{conv}");
        let nack = out.replies[0].1.nack.as_ref().unwrap();
        assert_eq!((nack.msg_id_hi, nack.msg_id_lo), (0, 9));
    }
    // Exactly the limit is fine.
    let mut d = machine(&["a"]);
    let body = "x".repeat(config().max_body);
    d.handle_send(
        t0,
        UnixMillis(1),
        link("a", 5),
        UserId(1),
        send(9, "p:1:2", &body),
    );
    assert_eq!(drain(&mut d).store.len(), 1);
}

#[test]
fn store_answers_map_to_nacks() {
    let t0 = base();
    let cases: Vec<(StoreResult, ErrorCode, bool)> = vec![
        (
            Ok(StoreReply::Appended(Err(AppendError::NotMember))),
            ErrorCode::NotMember,
            false,
        ),
        (
            Ok(StoreReply::Appended(Err(AppendError::ConflictingRetry))),
            ErrorCode::ConflictingRetry,
            false,
        ),
        (
            Ok(StoreReply::Appended(Err(AppendError::UnknownConversation))),
            ErrorCode::BadConversation,
            false,
        ),
        (
            Ok(StoreReply::Appended(Err(AppendError::OutOfOrder))),
            ErrorCode::OutOfOrder,
            true,
        ),
        (
            Ok(StoreReply::Appended(Err(AppendError::Superseded))),
            ErrorCode::Superseded,
            false,
        ),
        (
            Err(StoreUnavailable("connection reset".into())),
            ErrorCode::Unavailable,
            true,
        ),
        (
            Ok(StoreReply::CursorsAdvanced),
            ErrorCode::Unavailable,
            true,
        ),
    ];
    for (result, code, retryable) in cases {
        let mut d = machine(&["a"]);
        d.handle_send(
            t0,
            UnixMillis(1),
            link("a", 3),
            UserId(1),
            send(9, "g:x", "b"),
        );
        let id = drain(&mut d).store[0].id;
        d.handle_store_reply(t0, id, result);
        let out = drain(&mut d);
        assert_eq!(nack_of(&out.replies[0].1), (code, retryable));
        assert!(out.store.is_empty() && out.pushes.is_empty());
    }
}

#[test]
fn store_timeout_nacks_unavailable_and_late_replies_are_ignored() {
    let t0 = base();
    let timeout = config().store_timeout;
    let mut d = machine(&["a"]);
    d.handle_send(
        t0,
        UnixMillis(1),
        link("a", 1),
        UserId(1),
        send(1, "p:1:2", "b"),
    );
    let first = drain(&mut d).store[0].id;
    let t1 = t0 + Duration::from_millis(500);
    d.handle_send(
        t1,
        UnixMillis(2),
        link("a", 2),
        UserId(1),
        send(2, "p:1:2", "b"),
    );
    let second = drain(&mut d).store[0].id;
    assert_eq!(
        d.poll_timeout(),
        Some((t0 + timeout, TimerReason::StoreDeadline))
    );

    // Just before the deadline: nothing.
    d.handle_timeout(t0 + timeout - Duration::from_millis(1));
    assert!(drain(&mut d).replies.is_empty());
    // At it: the first send fails as retryable, the second still waits.
    d.handle_timeout(t0 + timeout);
    let out = drain(&mut d);
    assert_eq!(out.replies.len(), 1);
    assert_eq!(out.replies[0].1.request_id, 1);
    assert_eq!(nack_of(&out.replies[0].1), (ErrorCode::Unavailable, true));
    assert_eq!(
        d.poll_timeout(),
        Some((t1 + timeout, TimerReason::StoreDeadline))
    );

    // The late answer to the first changes nothing; the second's still works.
    let msg = stored("p:1:2", 1, 1, 1, "b");
    d.handle_store_reply(t0 + timeout, first, appended(msg, false));
    let out = drain(&mut d);
    assert!(out.replies.is_empty() && out.store.is_empty());
    d.handle_store_reply(
        t0 + timeout,
        second,
        appended(stored("p:1:2", 2, 1, 2, "b"), false),
    );
    assert_eq!(ack_of(&drain(&mut d).replies[0].1), (EPOCH.0, 2));

    // A route read that times out abandons the push, with no reply to anyone.
    let t2 = t0 + timeout;
    assert_eq!(
        d.poll_timeout(),
        Some((t2 + timeout, TimerReason::StoreDeadline))
    );
    d.handle_timeout(t2 + timeout);
    let out = drain(&mut d);
    assert!(out.replies.is_empty() && out.pushes.is_empty());
    assert_eq!(d.stats().pushes_abandoned, 1);
    assert_eq!(d.poll_timeout(), None);
}

#[test]
fn overload_is_refused_as_retryable() {
    let t0 = base();
    let mut d = RouteDelivery::new(DeliveryConfig {
        max_in_flight: 1,
        ..config()
    });
    d.handle_send(
        t0,
        UnixMillis(1),
        link("a", 1),
        UserId(1),
        send(1, "all", "b"),
    );
    d.handle_send(
        t0,
        UnixMillis(1),
        link("a", 2),
        UserId(1),
        send(2, "all", "b"),
    );
    let out = drain(&mut d);
    assert_eq!(out.store.len(), 1);
    assert_eq!(out.replies[0].1.request_id, 2);
    assert_eq!(nack_of(&out.replies[0].1), (ErrorCode::Unavailable, true));
}

#[test]
fn pushes_to_one_server_coalesce_into_one_batch() {
    let t0 = base();
    let mut d = machine(&["a", "b"]);
    let o1 = send_and_append(
        &mut d,
        t0,
        link("a", 1),
        1,
        stored("p:1:2", 1, 1, 1, "m1"),
        false,
    );
    let o2 = send_and_append(
        &mut d,
        t0,
        link("a", 2),
        3,
        stored("p:3:4", 1, 3, 2, "m2"),
        false,
    );
    d.handle_store_reply(
        t0,
        o1.store[0].id,
        Ok(StoreReply::Routes(vec![
            route(1, Some("a")),
            route(2, Some("a")),
        ])),
    );
    d.handle_store_reply(
        t0,
        o2.store[0].id,
        Ok(StoreReply::Routes(vec![
            route(3, Some("b")),
            route(4, Some("a")),
        ])),
    );
    let out = drain(&mut d);
    assert_eq!(out.pushes.len(), 2, "one batch per server");
    assert_eq!(out.pushes[0].0, sid("a"));
    let bodies: Vec<&[u8]> = out.pushes[0]
        .1
        .pushes
        .iter()
        .map(|p| &p.message.as_ref().unwrap().body[..])
        .collect();
    assert_eq!(bodies, [b"m1" as &[u8], b"m2"]);
    assert_eq!(summary(&out.pushes[1..]), [("b".into(), 1, vec![3], false)]);
}

#[test]
fn batches_and_member_lists_stay_bounded() {
    let t0 = base();
    let mut d = RouteDelivery::new(DeliveryConfig {
        max_recipients_per_push: 2,
        // A 2-recipient push of this message is bounded at 5 + 1 + 80 + 20 + 32 = 138
        // bytes: room for exactly two.
        max_batch_bytes: 2 * 138,
        ..config()
    });
    d.handle_registry(live(&["a"]));
    let out = send_and_append(
        &mut d,
        t0,
        link("a", 1),
        1,
        stored("g:big", 1, 1, 1, "s"),
        false,
    );
    let members = (1..=5).map(UserId).collect();
    d.handle_store_reply(t0, out.store[0].id, Ok(StoreReply::Members(members)));
    let out = drain(&mut d);
    // 5 members in chunks of 2 -> 3 pushes; 2 fit a batch -> 2 batches, in order.
    let sizes: Vec<usize> = out.pushes.iter().map(|(_, b)| b.pushes.len()).collect();
    assert_eq!(sizes, [2, 1]);
    assert_eq!(
        summary(&out.pushes),
        [
            ("a".into(), 1, vec![1, 2], false),
            ("a".into(), 1, vec![3, 4], false),
            ("a".into(), 1, vec![5], false),
        ]
    );
}

#[test]
fn a_server_that_left_gets_no_push() {
    let t0 = base();
    let mut d = machine(&["a", "b"]);
    let out = send_and_append(
        &mut d,
        t0,
        link("a", 1),
        1,
        stored("p:1:2", 1, 1, 1, "m"),
        false,
    );
    // "b" leaves between the append and the route read.
    d.handle_registry(live(&["a"]));
    d.handle_store_reply(
        t0,
        out.store[0].id,
        Ok(StoreReply::Routes(vec![
            route(1, Some("a")),
            route(2, Some("b")),
        ])),
    );
    assert_eq!(
        summary(&drain(&mut d).pushes),
        [("a".into(), 1, vec![1], false)]
    );

    // Pushes already queued (not yet drained) for a leaver are dropped too.
    let mut d = machine(&["a", "b"]);
    let out = send_and_append(
        &mut d,
        t0,
        link("a", 1),
        1,
        stored("all", 1, 1, 1, "m"),
        false,
    );
    assert_eq!(out.pushes.len(), 2);
    d.handle_send(
        t0,
        UnixMillis(1),
        link("a", 2),
        UserId(1),
        send(2, "all", "m"),
    );
    let id = drain(&mut d).store[0].id;
    d.handle_store_reply(t0, id, appended(stored("all", 2, 1, 2, "m"), false));
    d.handle_registry(live(&["b"]));
    assert_eq!(
        summary(&drain(&mut d).pushes),
        [("b".into(), 2, vec![], true)]
    );
}

#[test]
fn planners_are_pure_and_skip_the_unreachable() {
    let msg = stored("g:x", 7, 1, 1, "m");
    let set = live(&["a", "b"]);
    let routes = vec![
        route(3, Some("b")),
        route(1, Some("a")),
        route(3, Some("b")),  // listed twice: pushed once
        route(4, Some("zz")), // not live
        route(5, None),
    ];
    let planned = plan_pushes(&msg, &routes, &set);
    let got: Vec<(String, Vec<u64>)> = planned
        .iter()
        .map(|(s, p)| (s.0.clone(), p.recipients.clone()))
        .collect();
    assert_eq!(got, [("a".into(), vec![1]), ("b".into(), vec![3])]);
    assert!(plan_pushes(&msg, &routes, &BTreeMap::new()).is_empty());
    assert!(plan_broadcast(&msg, &BTreeMap::new()).is_empty());
    let members = plan_member_broadcast(&msg, &[UserId(2), UserId(2), UserId(1)], &set, 10);
    assert_eq!(members[&sid("a")][0].recipients, [1, 2]);
    assert_eq!(members.len(), 2);
}

/// `poll_output` is the one drain, and its order is the contract the shells rely on: store
/// requests, then the sender's answer, then pushes, so the sender hears its ack no later
/// than the recipients' servers get the message. Two sends answered in one drain: both
/// replies come before the one batch per server that carries both messages.
#[test]
fn poll_output_gives_stores_then_replies_then_pushes() {
    let t0 = base();
    let mut d = machine(&["a", "b"]);
    d.handle_send(
        t0,
        UnixMillis(1000),
        link("a", 1),
        UserId(1),
        send(1, "all", "x"),
    );
    d.handle_send(
        t0,
        UnixMillis(1000),
        link("a", 2),
        UserId(1),
        send(2, "all", "y"),
    );
    let appends: Vec<RequestId> = std::iter::from_fn(|| d.poll_output())
        .map(|o| match o {
            DeliveryOutput::Store(r) => r.id,
            other => panic!("only appends before a reply, got {other:?}"),
        })
        .collect();
    assert_eq!(appends.len(), 2);
    d.handle_store_reply(t0, appends[0], appended(stored("all", 1, 1, 1, "x"), false));
    d.handle_store_reply(t0, appends[1], appended(stored("all", 2, 1, 2, "y"), false));
    // A bad send after them: its nack is a reply too, still ahead of the pushes.
    d.handle_send(
        t0,
        UnixMillis(1000),
        link("b", 3),
        UserId(1),
        send(3, "p:2:3", "z"),
    );
    let kinds: Vec<String> = std::iter::from_fn(|| d.poll_output())
        .map(|o| match o {
            DeliveryOutput::Store(r) => format!("store {:?}", r.command),
            DeliveryOutput::Reply { result, .. } => format!("reply {}", result.request_id),
            DeliveryOutput::Push { server, batch } => {
                format!("push {} x{}", server.0, batch.pushes.len())
            }
        })
        .collect();
    assert_eq!(
        kinds,
        ["reply 1", "reply 2", "reply 3", "push a x2", "push b x2"]
    );
    assert_eq!(d.poll_output(), None);
}

/// A group's member list is kept with its version: the next append names it, and a reply
/// that confirms it pushes to the kept list without a store read; a new version replaces
/// it; a confirmation of a version the append did not name is not trusted (the members
/// are read); and an append answers with the list it named, whatever the cache holds by
/// the time its reply arrives.
#[test]
fn a_kept_member_list_is_used_only_when_the_append_confirms_it() {
    let t0 = base();
    let mut d = machine(&["a"]);
    let version = |changes| MembersVersion {
        log_epoch: EPOCH,
        changes,
    };
    let listed = |changes, ids: &[u64]| Recipients::Members {
        version: version(changes),
        members: ids.iter().map(|&u| UserId(u)).collect(),
    };
    let mut id = 0;
    // Sends one message to g:big; returns its request and the version it named.
    let mut send_one = |d: &mut RouteDelivery| {
        id += 1;
        d.handle_send(
            t0,
            UnixMillis(1000),
            link("a", id as u64),
            UserId(1),
            send(id, "g:big", "x"),
        );
        let out = drain(d);
        let [request] = out.store.as_slice() else {
            panic!("one append expected: {out:?}");
        };
        let StoreCommand::Append { members_known, .. } = request.command else {
            panic!("not an append: {request:?}");
        };
        (request.id, members_known, id)
    };
    let answer = |d: &mut RouteDelivery, request, id, seq, recipients| {
        let reply = Appended {
            message: stored("g:big", seq, 1, id, "x"),
            duplicate: false,
            recipients: Some(recipients),
        };
        d.handle_store_reply(t0, request, Ok(StoreReply::Appended(Ok(reply))));
        let out = drain(d);
        let reads: Vec<StoreCommand> = out.store.into_iter().map(|r| r.command).collect();
        (reads, summary(&out.pushes))
    };
    let pushed = |seq, ids: &[u64]| vec![("a".to_owned(), seq, ids.to_vec(), false)];

    // (name, what the append names, the store's answer, reads that follow, pushed to)
    type Case = (
        &'static str,
        Option<MembersVersion>,
        Recipients,
        Vec<StoreCommand>,
        Vec<u64>,
    );
    let read_members = || StoreCommand::LoadMembers {
        conv: "g:big".parse().unwrap(),
    };
    let cases: Vec<Case> = vec![
        (
            "first: nothing kept",
            None,
            listed(1, &[1, 2, 3, 4, 5]),
            vec![],
            vec![1, 2, 3, 4, 5],
        ),
        (
            "confirmed: the kept list",
            Some(version(1)),
            Recipients::MembersUnchanged(version(1)),
            vec![],
            vec![1, 2, 3, 4, 5],
        ),
        (
            "someone left: the new list",
            Some(version(1)),
            listed(2, &[1, 2, 4, 5]),
            vec![],
            vec![1, 2, 4, 5],
        ),
        (
            "the new version is named",
            Some(version(2)),
            Recipients::MembersUnchanged(version(2)),
            vec![],
            vec![1, 2, 4, 5],
        ),
        (
            "a confirmation of another version is not trusted",
            Some(version(2)),
            Recipients::MembersUnchanged(version(3)),
            vec![read_members()],
            vec![],
        ),
    ];
    for (seq, (name, named, recipients, reads, to)) in (1..).zip(cases) {
        let (request, members_known, id) = send_one(&mut d);
        assert_eq!(members_known, named, "{name}");
        let (got_reads, got_pushes) = answer(&mut d, request, id, seq, recipients);
        assert_eq!(got_reads, reads, "{name}");
        let want = if to.is_empty() {
            vec![]
        } else {
            pushed(seq, &to)
        };
        assert_eq!(got_pushes, want, "{name}");
    }

    // Two appends name version 2; the first's reply brings version 3, the second's
    // confirms version 2: it goes to version 2's members.
    let (first, named_first, first_id) = send_one(&mut d);
    let (second, named_second, second_id) = send_one(&mut d);
    assert_eq!(
        (named_first, named_second),
        (Some(version(2)), Some(version(2)))
    );
    let (_, pushes) = answer(&mut d, first, first_id, 10, listed(3, &[1, 4, 5, 6]));
    assert_eq!(pushes, pushed(10, &[1, 4, 5, 6]));
    let (_, pushes) = answer(
        &mut d,
        second,
        second_id,
        11,
        Recipients::MembersUnchanged(version(2)),
    );
    assert_eq!(pushes, pushed(11, &[1, 2, 4, 5]));
    assert_eq!(send_one(&mut d).1, Some(version(3)));
}

/// One step of [`deliveries_go_to_the_members_at_each_append`]'s interleavings.
#[derive(Debug, Clone)]
enum GroupOp {
    /// A user sends a message to the group (refused if not a member).
    Send(u64),
    Join(u64),
    Leave(u64),
    DeleteAccount(u64),
    /// The store executes the oldest request still waiting but `skip` (the newest if there
    /// are fewer); its reply waits for [`GroupOp::Reply`].
    Execute {
        skip: usize,
    },
    /// The oldest reply still on its way but `skip` (or the newest) reaches the route. So
    /// requests run and answer in other orders than they were made, with membership changes
    /// between a send, its append and its reply.
    Reply {
        skip: usize,
    },
}

fn group_op() -> impl proptest::strategy::Strategy<Value = GroupOp> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (1..=5u64).prop_map(GroupOp::Send),
        1 => (1..=5u64).prop_map(GroupOp::Join),
        1 => (1..=5u64).prop_map(GroupOp::Leave),
        1 => (2..=5u64).prop_map(GroupOp::DeleteAccount),
        3 => (0..3usize).prop_map(|skip| GroupOp::Execute { skip }),
        3 => (0..3usize).prop_map(|skip| GroupOp::Reply { skip }),
    ]
}

/// Runs `ops` through a route's delivery machine over the reference store and checks that
/// every push of a group message goes to exactly the members the group had at that
/// message's append (its atomic step). `lying_store` makes the store confirm whatever member
/// version an append names (the canary: the check must catch it). Err names the first push
/// that went wrong.
fn run_group_interleaving(ops: &[GroupOp], lying_store: bool) -> Result<(), String> {
    use crate::memstore::{MemoryStore, MemoryStoreConfig};
    const NOW: UnixMillis = UnixMillis(1000);
    let t0 = base();
    let group: ConvId = "g:g".parse().unwrap();
    let mut store = MemoryStore::new(MemoryStoreConfig::default());
    for name in ["u1", "u2", "u3", "u4", "u5"] {
        let command = StoreCommand::RegisterAccount {
            name: name.into(),
            password_hash: "phc".into(),
        };
        assert!(matches!(
            store.apply(NOW, &command),
            StoreReply::AccountRegistered(Ok(_))
        ));
    }
    let create = StoreCommand::CreateGroup {
        conv: group.clone(),
        owner: UserId(1),
    };
    store.apply(NOW, &create);
    // Every group message as a member-list push: the push lists exactly the members.
    let mut d = RouteDelivery::new(DeliveryConfig {
        broadcast_threshold: 0,
        ..DeliveryConfig::default()
    });
    d.handle_registry(live(&["a", "b"]));
    let mut waiting: Vec<StoreRequest> = Vec::new();
    let mut on_the_way: Vec<(RequestId, StoreReply)> = Vec::new();
    // Seq -> the members at its append.
    let mut members_at: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut pushed: Vec<(String, u64, Vec<u64>)> = Vec::new();
    let mut id: u128 = 0;
    let mut drain_into = |d: &mut RouteDelivery, waiting: &mut Vec<StoreRequest>| {
        let out = drain(d);
        waiting.extend(out.store);
        pushed.extend(
            summary(&out.pushes)
                .into_iter()
                .map(|(server, seq, to, _)| (server, seq, to)),
        );
    };
    for op in ops {
        match op {
            GroupOp::Send(user) => {
                id += 1;
                let send = send(id, "g:g", "x");
                d.handle_send(t0, NOW, link("a", id as u64), UserId(*user), send);
            }
            GroupOp::Join(user) => {
                let user = UserId(*user);
                let conv = group.clone();
                store.apply(NOW, &StoreCommand::JoinGroup { conv, user });
            }
            GroupOp::Leave(user) => {
                let user = UserId(*user);
                let conv = group.clone();
                store.apply(NOW, &StoreCommand::LeaveGroup { conv, user });
            }
            GroupOp::DeleteAccount(user) => {
                let user = UserId(*user);
                store.apply(NOW, &StoreCommand::DeleteAccount { user });
            }
            GroupOp::Execute { skip } if !waiting.is_empty() => {
                let request = waiting.remove((*skip).min(waiting.len() - 1));
                let mut reply = store.apply(NOW, &request.command);
                if let StoreReply::Appended(Ok(appended)) = &mut reply {
                    let load = StoreCommand::LoadMembers {
                        conv: group.clone(),
                    };
                    let StoreReply::Members(members) = store.apply(NOW, &load) else {
                        unreachable!("the reference store lists members");
                    };
                    let members = members.iter().map(|u| u.0).collect();
                    members_at.insert(appended.message.seq, members);
                    if let (true, StoreCommand::Append { members_known, .. }) =
                        (lying_store, &request.command)
                        && let Some(version) = members_known
                    {
                        appended.recipients = Some(Recipients::MembersUnchanged(*version));
                    }
                }
                on_the_way.push((request.id, reply));
            }
            GroupOp::Reply { skip } if !on_the_way.is_empty() => {
                let (request, reply) = on_the_way.remove((*skip).min(on_the_way.len() - 1));
                d.handle_store_reply(t0, request, Ok(reply));
            }
            GroupOp::Execute { .. } | GroupOp::Reply { .. } => {}
        }
        drain_into(&mut d, &mut waiting);
    }
    for (server, seq, to) in &pushed {
        if members_at.get(seq) != Some(to) {
            return Err(format!(
                "seq {seq} pushed to {server} for {to:?}; members at its append: {:?}",
                members_at.get(seq)
            ));
        }
    }
    Ok(())
}

proptest::proptest! {
    // The narrowest interleaving that matters (two appends naming one list, a change
    // between their steps, their replies in the other order) needs about a thousand cases
    // to come up; a case costs microseconds.
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]

    /// Every push of a group message goes to the members at its append, whatever the
    /// interleaving of sends, membership changes, appends and replies: a kept member list
    /// never outlives the membership it was confirmed for.
    #[test]
    fn deliveries_go_to_the_members_at_each_append(
        ops in proptest::collection::vec(group_op(), 1..80)
    ) {
        proptest::prop_assert_eq!(run_group_interleaving(&ops, false), Ok(()));
    }
}

/// The canary of the property above: a store that confirms whatever member list an append
/// names (as one would that forgot to raise the version on a change) is caught.
#[test]
fn a_store_that_confirms_a_stale_member_list_is_caught() {
    use GroupOp::*;
    let ops = [
        Send(1),
        Execute { skip: 0 },
        Reply { skip: 0 },
        Join(2),
        Send(1),
        Execute { skip: 0 },
        Reply { skip: 0 },
    ];
    assert_eq!(run_group_interleaving(&ops, false), Ok(()));
    let caught = run_group_interleaving(&ops, true).expect_err("a stale list pushed");
    assert!(caught.contains("seq 2"), "{caught}");
}

/// Kept member lists stay within `max_member_ids_kept` ids in all: past it the first
/// groups by name are forgotten (their next append names no version), and a list longer
/// than the whole budget is not kept.
#[test]
fn kept_member_lists_stay_within_their_id_budget() {
    let t0 = base();
    let mut d = RouteDelivery::new(DeliveryConfig {
        broadcast_threshold: 0,
        max_member_ids_kept: 5,
        ..DeliveryConfig::default()
    });
    d.handle_registry(live(&["a"]));
    let mut id = 0;
    // One message to `conv` whose append lists `size` members; returns the version the
    // append named.
    let mut send_listing = |d: &mut RouteDelivery, conv: &str, size: u64| {
        id += 1;
        d.handle_send(
            t0,
            UnixMillis(1000),
            link("a", 1),
            UserId(1),
            send(id, conv, "x"),
        );
        let out = drain(d);
        let StoreCommand::Append { members_known, .. } = out.store[0].command else {
            panic!("not an append: {:?}", out.store[0]);
        };
        let reply = Appended {
            message: stored(conv, 1, 1, id, "x"),
            duplicate: false,
            recipients: Some(Recipients::Members {
                version: MembersVersion {
                    log_epoch: EPOCH,
                    changes: size,
                },
                members: (1..=size).map(UserId).collect(),
            }),
        };
        d.handle_store_reply(t0, out.store[0].id, Ok(StoreReply::Appended(Ok(reply))));
        drain(d);
        members_known.map(|v| v.changes)
    };
    // (name, group, members listed, the version its append named, ids kept after)
    let cases = [
        ("a kept", "g:a", 3, None, 3),
        ("b kept beside a", "g:b", 2, None, 5),
        ("c: a forgotten", "g:c", 3, None, 5),
        ("a again: named nothing; b forgotten", "g:a", 1, None, 4),
        ("c named, replaced by a shorter list", "g:c", 2, Some(3), 3),
        ("d longer than the budget: not kept", "g:d", 6, None, 3),
        ("d still unknown", "g:d", 6, None, 3),
        ("a still kept", "g:a", 1, Some(1), 3),
    ];
    for (name, conv, size, named, kept) in cases {
        assert_eq!(send_listing(&mut d, conv, size), named, "{name}");
        assert_eq!(d.member_ids_kept(), kept, "{name}");
    }
}
