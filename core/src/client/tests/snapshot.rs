//! Snapshot and restore: the token, the outbox and the positions survive a restart.

use super::*;

#[test]
fn snapshot_and_restore_keep_the_token_outbox_and_positions() {
    let mut cfg = quiet_config();
    cfg.outbox_max_age = Duration::from_secs(60);
    let mut h = Harness::new(cfg.clone());
    h.online_with(vec![phead("g:x", E1, 0, 1, 0)]);
    for seq in 1..=3 {
        h.step(100, In::Frame(deliver("g:x", E1, seq)));
    }
    let old = h.s.send(h.at(100), conv("all"), Bytes::from_static(b"old"));
    let young =
        h.s.send(h.at(50_000), conv("g:x"), Bytes::from_static(b"young"));
    h.drain();
    let state = h.s.snapshot(h.at(60_000), UnixMillis(1_000_000));
    assert_eq!(
        state,
        ClientState {
            resume_token: Some(token(0xA)),
            resume_secret: Some(secret(0xA)),
            outbox: vec![
                SavedMessage {
                    id: old,
                    conv: conv("all"),
                    body: Bytes::from_static(b"old"),
                    created_at: UnixMillis(1_000_000 - 59_900),
                },
                SavedMessage {
                    id: young,
                    conv: conv("g:x"),
                    body: Bytes::from_static(b"young"),
                    created_at: UnixMillis(1_000_000 - 10_000),
                },
            ],
            convs: vec![SavedConv {
                conv: conv("g:x"),
                log_epoch: E1,
                delivered: 3,
            }],
        }
    );

    // Five seconds later by the wall clock, in a new process.
    let t0 = base();
    let mut h = Harness {
        s: ClientSession::restore(cfg, state, t0, UnixMillis(1_005_000)),
        t0,
    };
    assert_eq!(
        h.drain(),
        (vec![], vec![ClientEvent::Unknown { msg_id: old }])
    );
    // The young message's resend follows LoginOk; checked in the next test.
    h.s.start(h.at(0));
    let attempt = LoginAttempt(1);
    h.s.handle_login_answer(h.at(10), attempt, Ok(answer(5, 0xB)));
    h.s.handle_connected(h.at(20));
    let _ = h.s.handle_frame(
        h.at(30),
        proto::Frame {
            kind: Some(login_ok(5)),
        },
    );
    let (cmds, _) = h.drain();
    assert_eq!(
        cmds.last(),
        Some(&send_frame(young, "g:x", "young", (1, 0)))
    );
    h.table(vec![
        (31, In::Frame(deliver("g:x", E1, 3)), vec![], vec![]),
        (
            32,
            In::Frame(deliver("g:x", E1, 4)),
            vec![],
            vec![msg_ev("g:x", E1, 4)],
        ),
    ]);
}

#[test]
fn restored_outbox_is_resent_with_its_ids() {
    let cfg = quiet_config();
    let id = ClientMsgId(0xfeed);
    let state = ClientState {
        resume_token: Some(token(0xA)),
        // The restored session resumes: its first login presents the secret, no password.
        resume_secret: Some(secret(0xA)),
        outbox: vec![SavedMessage {
            id,
            conv: conv("all"),
            body: Bytes::from_static(b"hi"),
            created_at: UnixMillis(1_000),
        }],
        convs: vec![],
    };
    let t0 = base();
    let mut h = Harness {
        s: ClientSession::restore(cfg, state, t0, UnixMillis(2_000)),
        t0,
    };
    h.table(vec![
        (
            0,
            In::Start,
            vec![login_cmd(1, Some(0xA))],
            vec![ClientEvent::LoggingIn],
        ),
        (
            10,
            In::Answer(1, Ok(answer(5, 0xB))),
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
            vec![sync_req(), send_frame(id, "all", "hi", (1, 0))],
            vec![online_ev(5)],
        ),
    ]);
    // Expires by its wall-clock age: created 1 s before the restore.
    assert_eq!(
        h.s.poll_timeout(),
        Some((t0 + Duration::from_secs(299), TimerReason::OutboxExpiry))
    );
}

// --- The delivery property -------------------------------------------------------------
