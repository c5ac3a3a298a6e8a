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
    }];
    assert_eq!(h.reply(20, Ok(StoreReply::Heads(heads))), want);
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
            more: false
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
    let mut h = Harness::new();
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
