use super::*;

fn head(conv: ConvId, head_seq: u64) -> ConvHead {
    ConvHead {
        conv,
        log_epoch: LogEpoch(5),
        head_seq,
        first_available_seq: 1,
        cursor_seq: 2,
        carried_from: LogEpoch(0),
        carried_up_to: 0,
    }
}

#[test]
fn sync_request_loads_heads_and_answers() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    assert_eq!(
        h.frame(10, 1, Kind::SyncRequest(proto::SyncRequest {})),
        vec![Out::Store(StoreCommand::LoadHeads { user: UserId(7) })]
    );
    let heads = vec![
        head(ConvId::All, 9),
        head(ConvId::group("rust").unwrap(), 4),
    ];
    let want = vec![Out::Sync {
        conn: 1,
        heads: vec![
            proto::ConvHead {
                conv: "all".into(),
                log_epoch: 5,
                head_seq: 9,
                first_available_seq: 1,
                cursor_seq: 2,
                carried_from_epoch: 0,
                carried_up_to: 0,
            },
            proto::ConvHead {
                conv: "g:rust".into(),
                log_epoch: 5,
                head_seq: 4,
                first_available_seq: 1,
                cursor_seq: 2,
                carried_from_epoch: 0,
                carried_up_to: 0,
            },
        ],
        more: false,
        incomplete: false,
    }];
    assert_eq!(h.reply(20, Ok(StoreReply::Heads(heads.clone()))), want);
    // A shard down: what could be read is answered, marked incomplete.
    h.frame(25, 1, Kind::SyncRequest(proto::SyncRequest {}));
    let mut partial = want.clone();
    if let Some(Out::Sync { incomplete, .. }) = partial.first_mut() {
        *incomplete = true;
    }
    assert_eq!(
        h.reply(
            26,
            Ok(StoreReply::PartialHeads {
                heads,
                unavailable: vec![ConvId::group("elsewhere").unwrap()],
            })
        ),
        partial
    );
    // Store down: the client is told to retry, the connection stays.
    h.frame(30, 1, Kind::SyncRequest(proto::SyncRequest {}));
    assert_eq!(
        h.reply(40, Err(StoreUnavailable("down".into()))),
        vec![Out::Error {
            conn: 1,
            code: ErrorCode::Unavailable
        }]
    );
    assert_eq!(h.node.sessions(), 1);
}

/// Heads that do not fit in one frame go out as several SyncAnswers from the one store
/// read, back to back, each within `max_answer_bytes`, all but the last marked `more`.
#[test]
fn a_sync_answer_too_big_for_a_frame_is_paged() {
    let mut h = Harness::with(|c| c.max_answer_bytes = 200);
    h.login(0, 1, 7, 3);
    h.frame(10, 1, Kind::SyncRequest(proto::SyncRequest {}));
    let heads: Vec<ConvHead> = (0..20)
        .map(|n| head(ConvId::group(&format!("g{n:02}")).unwrap(), n + 1))
        .collect();
    let out = h.reply(20, Ok(StoreReply::Heads(heads.clone())));
    let pages: Vec<(Vec<proto::ConvHead>, bool)> = out
        .into_iter()
        .map(|o| match o {
            Out::Sync {
                conn: 1,
                heads,
                more,
                incomplete: false,
            } => (heads, more),
            other => panic!("expected only sync answers, got {other:?}"),
        })
        .collect();
    assert!(pages.len() > 2, "{} pages", pages.len());
    let mores: Vec<bool> = pages.iter().map(|(_, more)| *more).collect();
    let mut expected = vec![true; pages.len() - 1];
    expected.push(false);
    assert_eq!(mores, expected);
    for (page, _) in &pages {
        use prost::Message as _;
        let size: usize = page.iter().map(|h| h.encoded_len() + 11).sum();
        assert!(size <= 200, "page of {size} bytes");
    }
    let all: Vec<proto::ConvHead> = pages.into_iter().flat_map(|(page, _)| page).collect();
    assert_eq!(all, heads.iter().map(head_to_proto).collect::<Vec<_>>());
    // None at all is still one (empty, final) answer.
    h.frame(30, 1, Kind::SyncRequest(proto::SyncRequest {}));
    assert_eq!(
        h.reply(40, Ok(StoreReply::Heads(Vec::new()))),
        vec![Out::Sync {
            conn: 1,
            heads: Vec::new(),
            more: false,
            incomplete: false,
        }]
    );
}

#[test]
fn fetch_is_capped_and_converted() {
    let cases = [(1_000u32, 100u32), (0, 100), (30, 30)];
    for (asked, served) in cases {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        let out = h.frame(
            10,
            1,
            Kind::FetchRequest(proto::FetchRequest {
                conv: "p:7:9".into(),
                log_epoch: 5,
                after_seq: 3,
                limit: asked,
            }),
        );
        assert_eq!(
            out,
            vec![Out::Store(StoreCommand::Fetch {
                user: UserId(7),
                conv: ConvId::private(UserId(7), UserId(9)).unwrap(),
                log_epoch: LogEpoch(5),
                after_seq: 3,
                limit: served,
            })],
            "limit {asked}"
        );
    }

    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.frame(
        10,
        1,
        Kind::FetchRequest(proto::FetchRequest {
            conv: "p:7:9".into(),
            log_epoch: 5,
            after_seq: 3,
            limit: 10,
        }),
    );
    let conv = ConvId::private(UserId(7), UserId(9)).unwrap();
    let message = StoredMessage {
        conv: conv.clone(),
        log_epoch: LogEpoch(5),
        seq: 4,
        sender: UserId(9),
        msg_id: ClientMsgId::from_halves(1, 2),
        body: Bytes::from_static(b"hi"),
        appended_at: UnixMillis(123),
    };
    let out = h.reply(
        20,
        Ok(StoreReply::Fetched {
            head: head(conv, 4),
            messages: vec![message],
        }),
    );
    let want = proto::FetchAnswer {
        head: Some(proto::ConvHead {
            conv: "p:7:9".into(),
            log_epoch: 5,
            head_seq: 4,
            first_available_seq: 1,
            cursor_seq: 2,
            carried_from_epoch: 0,
            carried_up_to: 0,
        }),
        messages: vec![proto::Message {
            conv: "p:7:9".into(),
            log_epoch: 5,
            seq: 4,
            sender: 9,
            msg_id_hi: 1,
            msg_id_lo: 2,
            body: b"hi".to_vec().into(),
            appended_at_ms: 123,
        }],
    };
    assert_eq!(
        out,
        vec![Out::Fetch {
            conn: 1,
            answer: want
        }]
    );
}

#[test]
fn fetch_answers_stay_under_the_byte_budget() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.frame(
        10,
        1,
        Kind::FetchRequest(proto::FetchRequest {
            conv: "p:7:9".into(),
            log_epoch: 5,
            after_seq: 0,
            limit: 100,
        }),
    );
    let conv = ConvId::private(UserId(7), UserId(9)).unwrap();
    let messages: Vec<StoredMessage> = (1..=100)
        .map(|seq| StoredMessage {
            conv: conv.clone(),
            log_epoch: LogEpoch(5),
            seq,
            sender: UserId(9),
            msg_id: ClientMsgId::from_halves(1, seq),
            body: Bytes::from(vec![b'x'; 4096]),
            appended_at: UnixMillis(123),
        })
        .collect();
    let out = h.reply(
        20,
        Ok(StoreReply::Fetched {
            head: head(conv, 100),
            messages,
        }),
    );
    let [Out::Fetch { answer, .. }] = out.as_slice() else {
        panic!("{out:?}");
    };
    let seqs: Vec<u64> = answer.messages.iter().map(|m| m.seq).collect();
    // The oldest ones, contiguous, as many as fit.
    assert_eq!(seqs, (1..=13).collect::<Vec<_>>());
    let frame = Frame {
        kind: Some(Kind::FetchAnswer(answer.clone())),
    };
    assert!(
        prost::Message::encoded_len(&frame)
            <= ServerConfig::new(ServerId::new("s"), TicketKeys::new(1, b"k".to_vec()))
                .max_answer_bytes
                + 64
    );
}

#[test]
fn fetch_of_a_conversation_the_user_is_not_in_tells_nothing() {
    // The store says the user may not read it: the answer is NOT_MEMBER, with no head
    // (no log epoch, head seq or first available seq), as HTTP `/history` answers 403.
    for conv in ["p:8:9", "g:secret", "all"] {
        let mut h = Harness::new();
        h.login(0, 1, 7, 3);
        h.frame(
            10,
            1,
            Kind::FetchRequest(proto::FetchRequest {
                conv: conv.into(),
                log_epoch: 0,
                after_seq: 0,
                limit: 10,
            }),
        );
        let out = h.reply(20, Ok(StoreReply::NotMember));
        assert_eq!(
            out,
            vec![Out::Error {
                conn: 1,
                code: ErrorCode::NotMember
            }],
            "{conv}"
        );
        assert_eq!(h.node.sessions(), 1, "{conv}: the session stays");
    }
}

#[test]
fn fetch_of_a_bad_conversation_is_an_error_not_a_close() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    let out = h.frame(
        10,
        1,
        Kind::FetchRequest(proto::FetchRequest {
            conv: "nope".into(),
            ..Default::default()
        }),
    );
    assert_eq!(
        out,
        vec![Out::Error {
            conn: 1,
            code: ErrorCode::BadConversation
        }]
    );
    assert_eq!(h.node.sessions(), 1);
}

#[test]
fn deliver_ack_advances_good_cursors_and_reports_bad_ones() {
    let mut h = Harness::with(|c| c.cursor_flush_delay = Duration::ZERO);
    h.login(0, 1, 7, 3);
    let cursor = |conv: &str, seq| proto::Cursor {
        conv: conv.into(),
        log_epoch: 5,
        seq,
    };
    let out = h.frame(
        10,
        1,
        Kind::DeliverAck(proto::DeliverAck {
            cursors: vec![cursor("all", 9), cursor("bogus", 1), cursor("g:rust", 4)],
        }),
    );
    assert_eq!(
        out,
        vec![
            Out::Error {
                conn: 1,
                code: ErrorCode::BadConversation
            },
            Out::Store(StoreCommand::AdvanceCursors {
                user: UserId(7),
                cursors: vec![
                    (ConvId::All, LogEpoch(5), 9),
                    (ConvId::group("rust").unwrap(), LogEpoch(5), 4),
                ],
            }),
        ]
    );
    assert_eq!(h.node.sessions(), 1);
}

fn cursor(conv: &str, log_epoch: u64, seq: u64) -> proto::Cursor {
    proto::Cursor {
        conv: conv.into(),
        log_epoch,
        seq,
    }
}

fn ack(cursors: Vec<proto::Cursor>) -> Kind {
    Kind::DeliverAck(proto::DeliverAck { cursors })
}

fn advance(user: u64, cursors: &[(&str, u64, u64)]) -> Out {
    Out::Store(StoreCommand::AdvanceCursors {
        user: UserId(user),
        cursors: cursors
            .iter()
            .map(|&(conv, epoch, seq)| (conv.parse().unwrap(), LogEpoch(epoch), seq))
            .collect(),
    })
}

/// DeliverAck cursors are held `cursor_flush_delay` (1 s) from the first, merged per user
/// (the highest seq per conversation and log epoch, a new epoch kept after the old one), then
/// written as one AdvanceCursors per user; a session that ends flushes its user's at once,
/// before its claim is given back.
#[test]
fn deliver_acks_are_held_merged_and_written_once_per_user() {
    let mut h = Harness::new();
    h.login(0, 1, 7, 3);
    h.login(0, 2, 8, 4);
    let steps: Vec<(u64, u64, Vec<proto::Cursor>)> = vec![
        (10, 1, vec![cursor("all", 5, 3), cursor("g:rust", 5, 4)]),
        (20, 1, vec![cursor("all", 5, 2), cursor("g:rust", 6, 1)]),
        (30, 2, vec![cursor("all", 5, 9)]),
        (500, 1, vec![cursor("g:rust", 6, 3)]),
    ];
    for (ms, conn, cursors) in steps {
        assert_eq!(h.frame(ms, conn, ack(cursors)), vec![], "at {ms}");
        assert_eq!(h.next_timer(), Some((1_010, TimerReason::CursorFlush)));
    }
    assert_eq!(h.timeout(1_009), vec![]);
    assert_eq!(
        h.timeout(1_010),
        vec![
            advance(7, &[("all", 5, 3), ("g:rust", 5, 4), ("g:rust", 6, 3)]),
            advance(8, &[("all", 5, 9)]),
        ]
    );
    assert_ne!(h.next_timer().map(|t| t.1), Some(TimerReason::CursorFlush));

    // Held again; the session's end writes them before it expires the claim.
    assert_eq!(h.frame(1_100, 1, ack(vec![cursor("all", 5, 4)])), vec![]);
    h.node.handle_connection_closed(h.at(1_200), ConnId(1));
    assert_eq!(
        h.drain(),
        vec![
            advance(7, &[("all", 5, 4)]),
            Out::Store(StoreCommand::ExpireClaim {
                user: UserId(7),
                epoch: Epoch(3)
            }),
        ]
    );
    assert_ne!(h.next_timer().map(|t| t.1), Some(TimerReason::CursorFlush));
    assert_eq!(h.timeout(2_100), vec![]);

    // More than 256 held for one user are written at once.
    let many: Vec<proto::Cursor> = (0..257).map(|i| cursor(&format!("g:c{i}"), 5, 1)).collect();
    let want: Vec<(String, u64, u64)> = (0..257).map(|i| (format!("g:c{i}"), 5, 1)).collect();
    let want: Vec<(&str, u64, u64)> = want.iter().map(|(c, e, s)| (c.as_str(), *e, *s)).collect();
    assert_eq!(h.frame(2_200, 2, ack(many)), vec![advance(8, &want)]);
    assert_ne!(h.next_timer().map(|t| t.1), Some(TimerReason::CursorFlush));
}

/// Merging held cursors keeps the effect of writing every ack in order.
#[test]
fn merge_cursor_table() {
    let c = |conv: &str, epoch, seq| (conv.parse::<ConvId>().unwrap(), LogEpoch(epoch), seq);
    // (held, added, held after)
    type Held = Vec<(ConvId, LogEpoch, u64)>;
    let cases: Vec<(Held, (ConvId, LogEpoch, u64), Held)> = vec![
        (vec![], c("all", 1, 3), vec![c("all", 1, 3)]),
        (vec![c("all", 1, 3)], c("all", 1, 5), vec![c("all", 1, 5)]),
        (vec![c("all", 1, 5)], c("all", 1, 3), vec![c("all", 1, 5)]),
        (
            vec![c("all", 1, 5)],
            c("all", 2, 1),
            vec![c("all", 1, 5), c("all", 2, 1)],
        ),
        // Only the conversation's last entry is raised: the epoch between stays between.
        (
            vec![c("all", 1, 5), c("all", 2, 1)],
            c("all", 1, 9),
            vec![c("all", 1, 5), c("all", 2, 1), c("all", 1, 9)],
        ),
        (
            vec![c("all", 1, 5), c("g:x", 1, 1)],
            c("all", 1, 6),
            vec![c("all", 1, 6), c("g:x", 1, 1)],
        ),
    ];
    for (mut held, added, want) in cases {
        merge_cursor(&mut held, added.clone());
        assert_eq!(held, want, "adding {added:?}");
    }
}
