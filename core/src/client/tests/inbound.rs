//! What arrives: gaps and fetches, duplicates, batched delivery acks, trimmed ranges, log epochs, bad frames.

use super::*;

#[test]
fn a_gap_waits_then_fetches_and_duplicates_are_dropped() {
    let mut h = Harness::new(quiet_config());
    assert_eq!(h.online_with(vec![phead("g:x", E1, 0, 1, 0)]), vec![]);
    h.table(vec![
        (
            100,
            In::Frame(deliver("g:x", E1, 1)),
            vec![],
            vec![msg_ev("g:x", E1, 1)],
        ),
        (101, In::Frame(deliver("g:x", E1, 1)), vec![], vec![]),
        (110, In::Frame(deliver("g:x", E1, 3)), vec![], vec![]),
        (111, In::Frame(deliver("g:x", E1, 3)), vec![], vec![]),
        (
            300,
            In::Timeout,
            vec![tx(Kind::DeliverAck(proto::DeliverAck {
                cursors: vec![proto::Cursor {
                    conv: "g:x".into(),
                    log_epoch: E1.0,
                    seq: 1,
                }],
            }))],
            vec![],
        ),
        (409, In::Timeout, vec![], vec![]),
        (410, In::Timeout, vec![fetch_req("g:x", E1, 1)], vec![]),
        (
            420,
            In::Frame(fetch_answer(phead("g:x", E1, 3, 1, 1), &[2, 3])),
            vec![],
            vec![msg_ev("g:x", E1, 2), msg_ev("g:x", E1, 3)],
        ),
        (430, In::Frame(deliver("g:x", E1, 2)), vec![], vec![]),
        // A gap filled before its timer needs no fetch.
        (500, In::Frame(deliver("g:x", E1, 5)), vec![], vec![]),
        (
            510,
            In::Frame(deliver("g:x", E1, 4)),
            vec![],
            vec![msg_ev("g:x", E1, 4), msg_ev("g:x", E1, 5)],
        ),
    ]);
    assert_eq!(
        h.s.poll_timeout(),
        Some((h.at(620), TimerReason::DeliverAck))
    );
    h.table(vec![(
        900,
        In::Timeout,
        vec![tx(Kind::DeliverAck(proto::DeliverAck {
            cursors: vec![proto::Cursor {
                conv: "g:x".into(),
                log_epoch: E1.0,
                seq: 5,
            }],
        }))],
        vec![],
    )]);
    assert_eq!(h.s.poll_timeout().map(|t| t.1), Some(TimerReason::Ping));
    assert_eq!(h.s.stats().gap_fetches, 1, "one gap waited out and fetched");
}

/// The seed pinned in `proptest-regressions/client/tests.txt`, as a table. A push that
/// arrives while the buffer is full is dropped, which is safe only if the gap sync fetches
/// it later. Here the gap fetch's store read came before that message was appended, so its
/// answer fills the buffered range, names an older head and leaves the buffer empty: the
/// client must still fetch what the dropped push proved exists, not wait for the next head
/// check.
#[test]
fn a_push_dropped_from_a_full_buffer_is_fetched_after_a_stale_answer() {
    let mut cfg = quiet_config();
    cfg.max_buffered = 2;
    let mut h = Harness::new(cfg);
    assert_eq!(h.online_with(vec![phead("g:x", E1, 0, 1, 0)]), vec![]);
    h.table(vec![
        (100, In::Frame(deliver("g:x", E1, 2)), vec![], vec![]),
        (110, In::Frame(deliver("g:x", E1, 3)), vec![], vec![]),
        (400, In::Timeout, vec![fetch_req("g:x", E1, 0)], vec![]),
        // Appended after the fetch's read; the buffer is full, so it is dropped.
        (410, In::Frame(deliver("g:x", E1, 4)), vec![], vec![]),
        (
            420,
            In::Frame(fetch_answer(phead("g:x", E1, 3, 1, 0), &[1, 2, 3])),
            vec![fetch_req("g:x", E1, 3)],
            vec![
                msg_ev("g:x", E1, 1),
                msg_ev("g:x", E1, 2),
                msg_ev("g:x", E1, 3),
            ],
        ),
        (
            430,
            In::Frame(fetch_answer(phead("g:x", E1, 4, 1, 0), &[4])),
            vec![],
            vec![msg_ev("g:x", E1, 4)],
        ),
    ]);
}

#[test]
fn delivery_acks_are_batched_across_conversations() {
    let mut h = Harness::new(quiet_config());
    h.online_with(vec![phead("g:x", E1, 0, 1, 0), phead("all", E2, 0, 1, 0)]);
    h.step(100, In::Frame(deliver("g:x", E1, 1)));
    h.step(150, In::Frame(deliver("all", E2, 1)));
    h.step(160, In::Frame(deliver("all", E2, 2)));
    h.table(vec![
        (299, In::Timeout, vec![], vec![]),
        (
            300,
            In::Timeout,
            vec![tx(Kind::DeliverAck(proto::DeliverAck {
                cursors: vec![
                    proto::Cursor {
                        conv: "all".into(),
                        log_epoch: E2.0,
                        seq: 2,
                    },
                    proto::Cursor {
                        conv: "g:x".into(),
                        log_epoch: E1.0,
                        seq: 1,
                    },
                ],
            }))],
            vec![],
        ),
    ]);
}

#[test]
fn trimmed_range_is_reported_unavailable_not_stalled() {
    let mut h = Harness::new(quiet_config());
    h.online_with(vec![phead("g:x", E1, 0, 1, 0)]);
    h.table(vec![
        (
            100,
            In::Frame(deliver("g:x", E1, 1)),
            vec![],
            vec![msg_ev("g:x", E1, 1)],
        ),
        (110, In::Frame(deliver("g:x", E1, 9)), vec![], vec![]),
        (
            300,
            In::Timeout,
            vec![tx(Kind::DeliverAck(proto::DeliverAck {
                cursors: vec![proto::Cursor {
                    conv: "g:x".into(),
                    log_epoch: E1.0,
                    seq: 1,
                }],
            }))],
            vec![],
        ),
        (410, In::Timeout, vec![fetch_req("g:x", E1, 1)], vec![]),
        (
            420,
            In::Frame(fetch_answer(phead("g:x", E1, 10, 8, 1), &[8, 9, 10])),
            vec![],
            vec![
                ClientEvent::Unavailable {
                    conv: conv("g:x"),
                    from_seq: 2,
                    count: 6,
                },
                msg_ev("g:x", E1, 8),
                msg_ev("g:x", E1, 9),
                msg_ev("g:x", E1, 10),
            ],
        ),
    ]);
}

#[test]
fn a_new_log_epoch_resets_the_conversation_and_never_dedups_against_the_old() {
    let mut h = Harness::new(quiet_config());
    h.online_with(vec![phead("g:x", E1, 0, 1, 0)]);
    h.table(vec![
        (
            100,
            In::Frame(deliver("g:x", E1, 1)),
            vec![],
            vec![msg_ev("g:x", E1, 1)],
        ),
        (
            101,
            In::Frame(deliver("g:x", E1, 2)),
            vec![],
            vec![msg_ev("g:x", E1, 2)],
        ),
        // A push in another epoch is a hint: ask the store which epoch is current.
        (
            110,
            In::Frame(deliver("g:x", E2, 1)),
            vec![fetch_req("g:x", E1, 2)],
            vec![],
        ),
        (
            120,
            In::Frame(fetch_answer(phead("g:x", E2, 2, 1, 0), &[])),
            vec![fetch_req("g:x", E2, 0)],
            vec![ClientEvent::LogReset {
                conv: conv("g:x"),
                old_epoch: E1,
                new_epoch: E2,
            }],
        ),
        // Seqs 1 and 2 again, but of the new log: new messages.
        (
            130,
            In::Frame(fetch_answer(phead("g:x", E2, 2, 1, 0), &[1, 2])),
            vec![],
            vec![msg_ev("g:x", E2, 1), msg_ev("g:x", E2, 2)],
        ),
        // A late push of the retired epoch costs a fetch and changes nothing.
        (
            140,
            In::Frame(deliver("g:x", E1, 3)),
            vec![fetch_req("g:x", E2, 2)],
            vec![],
        ),
        (
            150,
            In::Frame(fetch_answer(phead("g:x", E2, 2, 1, 0), &[])),
            vec![],
            vec![],
        ),
        (
            160,
            In::Frame(deliver("g:x", E2, 3)),
            vec![],
            vec![msg_ev("g:x", E2, 3)],
        ),
        // A sync head in yet another epoch resets too.
        (
            170,
            In::Frame(sync_answer(vec![phead("g:x", E1, 4, 3, 0)])),
            vec![fetch_req("g:x", E1, 2)],
            vec![
                ClientEvent::LogReset {
                    conv: conv("g:x"),
                    old_epoch: E2,
                    new_epoch: E1,
                },
                ClientEvent::Unavailable {
                    conv: conv("g:x"),
                    from_seq: 1,
                    count: 2,
                },
            ],
        ),
    ]);
}

#[test]
fn an_unknown_conversation_starts_at_the_server_cursor() {
    let mut h = Harness::new(quiet_config());
    h.online();
    h.table(vec![
        // Pushed before the initial sync answer: held until the sync says where to start.
        (40, In::Frame(deliver("g:y", E1, 6)), vec![], vec![]),
        (
            50,
            In::Frame(sync_answer(vec![phead("g:y", E1, 6, 1, 4)])),
            vec![fetch_req("g:y", E1, 4)],
            vec![],
        ),
        (
            60,
            In::Frame(fetch_answer(phead("g:y", E1, 6, 1, 4), &[5, 6])),
            vec![],
            vec![msg_ev("g:y", E1, 5), msg_ev("g:y", E1, 6)],
        ),
        // A conversation the answer does not list, pushed after the sync left: ask again;
        // still not listed by a sync sent after the push: it starts at its beginning.
        (
            70,
            In::Frame(deliver("p:1:7", E2, 1)),
            vec![sync_req()],
            vec![],
        ),
        (
            80,
            In::Frame(sync_answer(vec![])),
            vec![],
            vec![msg_ev("p:1:7", E2, 1)],
        ),
    ]);
    // And one pushed while a sync is outstanding that was sent before it.
    let mut h = Harness::new(quiet_config());
    h.online();
    h.table(vec![
        (40, In::Frame(deliver("p:1:7", E2, 1)), vec![], vec![]),
        (50, In::Frame(sync_answer(vec![])), vec![sync_req()], vec![]),
        (
            60,
            In::Frame(sync_answer(vec![])),
            vec![],
            vec![msg_ev("p:1:7", E2, 1)],
        ),
    ]);
    // A cursor behind the trimmed range shows the unread trimmed messages as unavailable.
    let mut h = Harness::new(quiet_config());
    h.online();
    h.table(vec![(
        40,
        In::Frame(sync_answer(vec![phead("g:z", E1, 20, 11, 3)])),
        vec![fetch_req("g:z", E1, 10)],
        vec![ClientEvent::Unavailable {
            conv: conv("g:z"),
            from_seq: 4,
            count: 7,
        }],
    )]);
}

#[test]
fn malformed_frames_are_ignored_with_an_error() {
    let mut h = Harness::new(quiet_config());
    assert_eq!(
        h.s.handle_frame(
            h.at(0),
            proto::Frame {
                kind: Some(deliver("all", E1, 1))
            }
        ),
        Err(FrameError::NotConnected)
    );
    h.online_with(vec![]);
    let now = h.at(100);
    assert_eq!(
        h.s.handle_frame(now, proto::Frame { kind: None }),
        Err(FrameError::Empty)
    );
    assert_eq!(
        h.s.handle_frame(
            now,
            proto::Frame {
                kind: Some(deliver("nope", E1, 1))
            }
        ),
        Err(FrameError::BadConversation("nope".into()))
    );
    assert_eq!(
        h.s.handle_frame(
            now,
            proto::Frame {
                kind: Some(deliver("all", E1, 0))
            }
        ),
        Err(FrameError::ZeroSeq)
    );
    assert_eq!(
        h.s.handle_frame(
            now,
            proto::Frame {
                kind: Some(Kind::Deliver(proto::Deliver { message: None }))
            }
        ),
        Err(FrameError::MissingField)
    );
    assert_eq!(
        h.s.handle_frame(
            now,
            proto::Frame {
                kind: Some(Kind::Ping(proto::Ping { nonce: 1 }))
            }
        ),
        Err(FrameError::Unexpected("ping"))
    );
    assert_eq!(h.drain(), (vec![], vec![]));
    assert!(h.s.is_online());
}

/// A SyncAnswer in pages (`more` on all but the last) is taken as one answer: nothing
/// happens on the first pages, so a pushed conversation listed only on a later page is not
/// judged "not listed" (which would ask again, or start it from its beginning).
#[test]
fn a_paged_sync_answer_is_taken_whole() {
    let mut h = Harness::new(quiet_config());
    h.online();
    let page = |heads, more| {
        Kind::SyncAnswer(proto::SyncAnswer {
            heads,
            more,
            incomplete: false,
        })
    };
    h.table(vec![
        (40, In::Frame(deliver("g:y", E1, 6)), vec![], vec![]),
        (
            50,
            In::Frame(page(vec![phead("g:x", E1, 3, 1, 1)], true)),
            vec![],
            vec![],
        ),
        (
            51,
            In::Frame(page(vec![phead("g:y", E1, 6, 1, 4)], false)),
            vec![fetch_req("g:x", E1, 1), fetch_req("g:y", E1, 4)],
            vec![],
        ),
    ]);
    // A link lost mid-answer drops its pages: the next answer starts afresh.
    let mut h = Harness::new(quiet_config());
    h.online();
    h.table(vec![(
        50,
        In::Frame(page(vec![phead("g:x", E1, 3, 1, 1)], true)),
        vec![],
        vec![],
    )]);
    h.s.handle_disconnected(h.at(60));
    assert!(h.s.inbound.sync_pages.is_empty());
}

/// An incomplete sync answer (a store shard down) is taken for what it lists; a pushed
/// conversation it does not list is not judged by that (neither started from its
/// beginning nor asked about at once), and the sync is asked again after the retry delay.
#[test]
fn an_incomplete_sync_answer_judges_nothing_by_absence_and_is_asked_again() {
    let mut h = Harness::new(quiet_config());
    h.online();
    let incomplete = |heads| {
        Kind::SyncAnswer(proto::SyncAnswer {
            heads,
            more: false,
            incomplete: true,
        })
    };
    let retry = quiet_config().send_retry_delay.as_millis() as u64;
    h.table(vec![
        (40, In::Frame(deliver("p:1:7", E2, 1)), vec![], vec![]),
        (
            50,
            In::Frame(incomplete(vec![phead("g:x", E1, 3, 1, 1)])),
            vec![fetch_req("g:x", E1, 1)],
            vec![],
        ),
        (50 + retry - 1, In::Timeout, vec![], vec![]),
        (50 + retry, In::Timeout, vec![sync_req()], vec![]),
        (
            60 + retry,
            In::Frame(sync_answer(vec![])),
            vec![],
            vec![msg_ev("p:1:7", E2, 1)],
        ),
    ]);
    // A complete answer meanwhile cancels the retry.
    let mut h = Harness::new(quiet_config());
    h.online();
    h.table(vec![
        (50, In::Frame(incomplete(vec![])), vec![], vec![]),
        (
            55,
            In::Frame(deliver("p:1:7", E2, 1)),
            vec![sync_req()],
            vec![],
        ),
        (
            60,
            In::Frame(sync_answer(vec![])),
            vec![],
            vec![msg_ev("p:1:7", E2, 1)],
        ),
    ]);
    assert_eq!(h.s.inbound.next_timeout(), None);
    // So does a lost link: the next connection syncs anyway.
    let mut h = Harness::new(quiet_config());
    h.online();
    h.table(vec![(50, In::Frame(incomplete(vec![])), vec![], vec![])]);
    assert!(h.s.inbound.next_timeout().is_some());
    h.s.handle_disconnected(h.at(70));
    assert_eq!(h.s.inbound.next_timeout(), None);
}

/// A head of `epoch` whose log moved from `from`, carrying seqs `1..=up_to` over.
fn moved_head(c: &str, epoch: LogEpoch, head: u64, from: LogEpoch, up_to: u64) -> proto::ConvHead {
    proto::ConvHead {
        carried_from_epoch: from.0,
        carried_up_to: up_to,
        ..phead(c, epoch, head, 1, 0)
    }
}

fn moved(c: &str, continues_after: u64, lost: u64) -> ClientEvent {
    ClientEvent::LogMoved {
        conv: conv(c),
        old_epoch: E1,
        new_epoch: E2,
        continues_after,
        lost,
    }
}

#[test]
fn a_log_moved_without_loss_continues_where_the_client_was() {
    let mut h = Harness::new(quiet_config());
    h.online_with(vec![phead("g:x", E1, 0, 1, 0)]);
    h.table(vec![
        (
            100,
            In::Frame(deliver("g:x", E1, 1)),
            vec![],
            vec![msg_ev("g:x", E1, 1)],
        ),
        (
            101,
            In::Frame(deliver("g:x", E1, 2)),
            vec![],
            vec![msg_ev("g:x", E1, 2)],
        ),
        // The store restarted (nothing lost): the next message is pushed under the new epoch.
        (
            110,
            In::Frame(deliver("g:x", E2, 3)),
            vec![fetch_req("g:x", E1, 2)],
            vec![],
        ),
        // The head says the log moved from E1 carrying 1..=2: nothing is handed over again.
        (
            120,
            In::Frame(fetch_answer(moved_head("g:x", E2, 3, E1, 2), &[])),
            vec![fetch_req("g:x", E2, 2)],
            vec![moved("g:x", 2, 0)],
        ),
        (
            130,
            In::Frame(fetch_answer(moved_head("g:x", E2, 3, E1, 2), &[3])),
            vec![],
            vec![msg_ev("g:x", E2, 3)],
        ),
        (
            140,
            In::Frame(deliver("g:x", E2, 4)),
            vec![],
            vec![msg_ev("g:x", E2, 4)],
        ),
    ]);
    // The position persisted is the new epoch's, and it is acknowledged under it.
    let state = h.s.snapshot(h.at(150), UnixMillis(0));
    assert_eq!(
        state
            .convs
            .iter()
            .map(|c| (c.conv.clone(), c.log_epoch, c.delivered))
            .collect::<Vec<_>>(),
        vec![(conv("g:x"), E2, 4)]
    );
    assert_eq!(
        h.s.inbound.take_cursors(),
        vec![proto::Cursor {
            conv: "g:x".into(),
            log_epoch: E2.0,
            seq: 4
        }]
    );
}

#[test]
fn a_log_moved_behind_what_the_client_received_reports_the_loss() {
    let mut h = Harness::new(quiet_config());
    h.online_with(vec![phead("g:x", E1, 0, 1, 0)]);
    for seq in 1..=5 {
        let (_, evs) = h.step(100 + seq, In::Frame(deliver("g:x", E1, seq)));
        assert_eq!(evs, vec![msg_ev("g:x", E1, seq)]);
    }
    h.table(vec![
        // The store came back without 4 and 5 (and a new 4 under the new epoch): a sync says
        // so. The loss is reported, and delivery continues after 3.
        (
            120,
            In::Frame(sync_answer(vec![moved_head("g:x", E2, 4, E1, 3)])),
            vec![fetch_req("g:x", E2, 3)],
            vec![moved("g:x", 3, 2)],
        ),
        (
            130,
            In::Frame(fetch_answer(moved_head("g:x", E2, 4, E1, 3), &[4])),
            vec![],
            vec![msg_ev("g:x", E2, 4)],
        ),
    ]);
}

#[test]
fn a_log_moved_from_an_epoch_the_client_was_not_in_resets() {
    let e0 = LogEpoch(99);
    let mut h = Harness::new(quiet_config());
    h.online_with(vec![phead("g:x", E1, 0, 1, 0)]);
    h.table(vec![
        (
            100,
            In::Frame(deliver("g:x", E1, 1)),
            vec![],
            vec![msg_ev("g:x", E1, 1)],
        ),
        // Two moves slept through: E1 -> e0 -> E2. The head only knows the last one.
        (
            120,
            In::Frame(sync_answer(vec![moved_head("g:x", E2, 2, e0, 2)])),
            vec![fetch_req("g:x", E2, 0)],
            vec![ClientEvent::LogReset {
                conv: conv("g:x"),
                old_epoch: E1,
                new_epoch: E2,
            }],
        ),
    ]);
}
