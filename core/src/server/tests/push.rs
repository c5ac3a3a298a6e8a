use super::*;

fn pushed(seq: u64, recipients: Vec<u64>, all_sessions: bool) -> proto::Push {
    proto::Push {
        message: Some(proto::Message {
            conv: "all".into(),
            seq,
            ..Default::default()
        }),
        recipients,
        all_sessions,
    }
}

#[test]
fn push_reaches_listed_recipients_with_a_session_here() {
    let mut h = Harness::new();
    h.login(0, 1, 1, 1);
    h.login(0, 2, 2, 1);
    h.login(0, 3, 3, 1);
    // A connection still logging in gets nothing: it syncs after LoginOk.
    h.open(0, 4);
    let ticket = h.ticket(4, 1);
    h.login_frame(0, 4, ticket);
    h.node.handle_push(
        h.at(10),
        proto::PushBatch {
            pushes: vec![
                pushed(5, vec![3, 1, 99, 4], false),
                pushed(6, vec![2, 2], false),
            ],
        },
    );
    assert_eq!(
        h.drain(),
        vec![
            Out::Deliver { conn: 1, seq: 5 },
            Out::Deliver { conn: 3, seq: 5 },
            Out::Deliver { conn: 2, seq: 6 },
        ]
    );
}

/// The recipients of one push share one output, so the shell encodes the Deliver once;
/// a recipient whose backlog is full is kicked instead and left out of it.
#[test]
fn one_push_is_one_output_for_all_its_recipients() {
    let mut h = Harness::with(|c| c.max_outbound_frames = 2);
    h.login(0, 1, 1, 1);
    h.login(0, 2, 2, 1);
    h.login(0, 3, 3, 1);
    // Conn 2 has its LoginOk and a pong unwritten: full.
    h.frame(1, 2, ping(1));
    h.node.handle_written(ConnId(1), 1);
    h.node.handle_written(ConnId(3), 1);
    h.node.handle_push(
        h.at(10),
        proto::PushBatch {
            pushes: vec![pushed(5, vec![1, 2, 3], false)],
        },
    );
    let mut raw = Vec::new();
    while let Some(output) = h.node.poll_output() {
        raw.push(output);
    }
    let many: Vec<_> = raw
        .iter()
        .filter_map(|o| match o {
            ServerOutput::TransmitToMany { conns, frame } => Some((conns, frame)),
            _ => None,
        })
        .collect();
    assert_eq!(many.len(), 1, "{raw:?}");
    assert_eq!(many[0].0, &vec![ConnId(1), ConnId(3)]);
    assert!(matches!(
        frame_out(0, many[0].1),
        Out::Deliver { seq: 5, .. }
    ));
    assert_eq!(h.node.stats().kicks(KickReason::SlowConsumer), 1);
}

#[test]
fn all_sessions_push_reaches_every_session_here() {
    let mut h = Harness::new();
    h.login(0, 1, 1, 1);
    h.login(0, 2, 2, 1);
    h.open(0, 3); // not logged in
    h.node.handle_push(
        h.at(10),
        proto::PushBatch {
            pushes: vec![pushed(8, vec![], true)],
        },
    );
    assert_eq!(
        h.drain(),
        vec![
            Out::Deliver { conn: 1, seq: 8 },
            Out::Deliver { conn: 2, seq: 8 },
        ]
    );
}
