//! `RegistryKeeper` tables. Every step names its time in milliseconds from the test's start,
//! the input, the outputs it caused (in full, in order) and the deadline after it.

use std::time::Duration;

use crate::time::Instant;

use super::*;
use crate::ids::ServerId;

/// Session timeout of every session in these tables: lost at `since + 3 s`.
const T: u64 = 6_000;

type Keeper = RegistryKeeper<&'static str>;

/// One input.
#[derive(Debug, Clone)]
enum In {
    Update(u64, u32),
    SetListed(u64, bool),
    Deregister(u64),
    Closed,
    Disconnected,
    Reconnected,
    Expired,
    Done(Result<(), Op>),
    /// A new session with this id, or a failed attempt.
    Established(Result<u64, &'static str>),
    Timeout,
}

/// `OpError` without its error type, so rows stay short.
#[derive(Debug, Clone, Copy)]
enum Op {
    Failed,
    Disconnected,
    Expired,
}

/// An output with the server reduced to its connection count and times in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Out {
    Establish {
        conns: u32,
        listed: bool,
        previous: Vec<u64>,
    },
    Reconcile {
        conns: u32,
        listed: bool,
        stale: bool,
    },
    Publish(u32),
    Leave,
    Acked(u64),
    NotConnected(u64),
    Backend(u64, &'static str),
    Connected,
    Disconnected(u64),
    Lapsed,
    Lost(u64),
    Stop {
        close: bool,
    },
}

use Out::*;

/// One table row: at `ms`, this input causes these outputs and leaves this deadline.
type Row<'a> = (u64, In, &'a [Out], Option<(u64, KeeperTimer)>);

struct Harness {
    keeper: Keeper,
    t0: Instant,
}

impl Harness {
    /// Registered at 0 in session 1, listed, 5 connections.
    #[allow(clippy::disallowed_methods)] // the one clock read: the test's time origin
    fn new() -> Self {
        let server = LiveServer {
            id: ServerId::new("s1"),
            host: "10.0.0.1".into(),
            client_port: 11211,
            link_port: 11311,
            http_port: 8081,
            connections: 5,
            client_tls: false,
            ws_port: None,
        };
        let mut h = Self {
            keeper: RegistryKeeper::new(KeeperConfig::default(), server, session(1)),
            t0: Instant::from_nanos(0),
        };
        assert_eq!(h.drain(), [Connected], "the health it starts with");
        h
    }

    fn at(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    fn ms(&self, at: Instant) -> u64 {
        at.duration_since(self.t0).as_millis() as u64
    }

    fn step(&mut self, ms: u64, input: In) -> Vec<Out> {
        let now = self.at(ms);
        let k = &mut self.keeper;
        match input {
            In::Update(id, c) => k.handle_update(now, RequestId(id), c),
            In::SetListed(id, l) => k.handle_set_listed(now, RequestId(id), l),
            In::Deregister(id) => k.handle_deregister(now, RequestId(id)),
            In::Closed => k.handle_closed(now),
            In::Disconnected => k.handle_disconnected(now),
            In::Reconnected => k.handle_reconnected(now),
            In::Expired => k.handle_session_expired(now),
            In::Done(result) => k.handle_op_done(
                now,
                result.map_err(|op| match op {
                    Op::Failed => OpError::Failed("failed"),
                    Op::Disconnected => OpError::Disconnected("broken"),
                    Op::Expired => OpError::Expired,
                }),
            ),
            In::Established(result) => k.handle_established(now, result.map(session)),
            In::Timeout => k.handle_timeout(now),
        }
        self.drain()
    }

    fn drain(&mut self) -> Vec<Out> {
        let mut outs = Vec::new();
        while let Some(o) = self.keeper.poll_output() {
            outs.push(self.summarize(o));
        }
        outs
    }

    fn summarize(&self, output: KeeperOutput<&'static str>) -> Out {
        match output {
            KeeperOutput::Establish {
                server,
                listed,
                previous,
            } => Establish {
                conns: server.connections,
                listed,
                previous,
            },
            KeeperOutput::Reconcile {
                server,
                listed,
                stale,
            } => Reconcile {
                conns: server.connections,
                listed,
                stale,
            },
            KeeperOutput::Publish { server } => Publish(server.connections),
            KeeperOutput::Leave => Leave,
            KeeperOutput::Answer { id, result } => match result {
                Ok(()) => Acked(id.0),
                Err(AnswerError::NotConnected) => NotConnected(id.0),
                Err(AnswerError::Backend(e)) => Backend(id.0, e),
            },
            KeeperOutput::Health(KeeperHealth::Connected) => Connected,
            KeeperOutput::Health(KeeperHealth::Disconnected { since }) => {
                Disconnected(self.ms(since))
            }
            KeeperOutput::Health(KeeperHealth::Expired) => Lapsed,
            KeeperOutput::SessionLost { session } => Lost(session),
            KeeperOutput::Stop { close_session } => Stop {
                close: close_session,
            },
        }
    }

    fn timer(&self) -> Option<(u64, KeeperTimer)> {
        self.keeper
            .poll_timeout()
            .map(|(at, why)| (self.ms(at), why))
    }

    /// Runs a table: each row is (ms, input, outputs, deadline after it).
    #[track_caller]
    fn table(&mut self, rows: &[Row]) {
        for (i, (ms, input, outs, timer)) in rows.iter().enumerate() {
            let got = self.step(*ms, input.clone());
            assert_eq!(got, outs.to_vec(), "row {i} at {ms} ms: {input:?} outputs");
            assert_eq!(
                self.timer(),
                *timer,
                "row {i} at {ms} ms: {input:?} deadline"
            );
        }
    }
}

fn session(id: u64) -> Session {
    Session {
        id,
        timeout: Duration::from_millis(T),
    }
}

use KeeperTimer::{Establish as Retry, Repair, SessionLost as LostAt};

mod connected {
    use super::*;

    #[test]
    fn update_is_published_then_answered() {
        Harness::new().table(&[
            (0, In::Update(1, 7), &[Publish(7)], None),
            (10, In::Done(Ok(())), &[Acked(1)], None),
        ]);
    }

    #[test]
    fn update_while_unlisted_is_kept_and_created_with_the_entry() {
        Harness::new().table(&[
            (
                0,
                In::SetListed(1, false),
                &[Reconcile {
                    conns: 5,
                    listed: false,
                    stale: true,
                }],
                None,
            ),
            (10, In::Done(Ok(())), &[Acked(1)], None),
            // No node to write: answered at once, no operation.
            (20, In::Update(2, 9), &[Acked(2)], None),
            (
                30,
                In::SetListed(3, true),
                &[Reconcile {
                    conns: 9,
                    listed: true,
                    stale: true,
                }],
                None,
            ),
            (40, In::Done(Ok(())), &[Acked(3)], None),
        ]);
    }

    #[test]
    fn a_failed_operation_is_repaired_with_a_capped_backoff() {
        Harness::new().table(&[
            (0, In::Update(1, 7), &[Publish(7)], None),
            (
                10,
                In::Done(Err(Op::Failed)),
                &[Backend(1, "failed")],
                Some((210, Repair)),
            ),
            (
                210,
                In::Timeout,
                &[Reconcile {
                    conns: 7,
                    listed: true,
                    stale: true,
                }],
                None,
            ),
            (220, In::Done(Err(Op::Failed)), &[], Some((620, Repair))),
            (
                620,
                In::Timeout,
                &[Reconcile {
                    conns: 7,
                    listed: true,
                    stale: true,
                }],
                None,
            ),
            (630, In::Done(Err(Op::Failed)), &[], Some((1_430, Repair))),
            (
                1_430,
                In::Timeout,
                &[Reconcile {
                    conns: 7,
                    listed: true,
                    stale: true,
                }],
                None,
            ),
            (1_440, In::Done(Err(Op::Failed)), &[], Some((3_040, Repair))),
            (
                3_040,
                In::Timeout,
                &[Reconcile {
                    conns: 7,
                    listed: true,
                    stale: true,
                }],
                None,
            ),
            // Capped at 2 s.
            (3_050, In::Done(Err(Op::Failed)), &[], Some((5_050, Repair))),
            (
                5_050,
                In::Timeout,
                &[Reconcile {
                    conns: 7,
                    listed: true,
                    stale: true,
                }],
                None,
            ),
            // A reconcile that succeeds clears the timer and the backoff.
            (5_060, In::Done(Ok(())), &[], None),
            (6_000, In::Update(2, 8), &[Publish(8)], None),
            (
                6_010,
                In::Done(Err(Op::Failed)),
                &[Backend(2, "failed")],
                Some((6_210, Repair)),
            ),
        ]);
    }

    #[test]
    fn a_successful_publish_leaves_a_pending_repair() {
        Harness::new().table(&[
            (0, In::Update(1, 7), &[Publish(7)], None),
            (
                10,
                In::Done(Err(Op::Failed)),
                &[Backend(1, "failed")],
                Some((210, Repair)),
            ),
            (20, In::Update(2, 8), &[Publish(8)], None),
            // Only a reconcile checks the listing too; the repair still runs.
            (30, In::Done(Ok(())), &[Acked(2)], Some((210, Repair))),
            (
                210,
                In::Timeout,
                &[Reconcile {
                    conns: 8,
                    listed: true,
                    stale: false,
                }],
                None,
            ),
        ]);
    }

    #[test]
    fn an_operation_that_finds_the_connection_broken_disconnects() {
        Harness::new().table(&[
            (0, In::Update(1, 7), &[Publish(7)], None),
            (
                10,
                In::Done(Err(Op::Disconnected)),
                &[Backend(1, "broken"), Disconnected(10)],
                Some((3_010, LostAt)),
            ),
        ]);
    }

    #[test]
    fn an_operation_that_finds_the_session_gone_loses_it() {
        let mut h = Harness::new();
        h.table(&[
            (
                0,
                In::SetListed(1, false),
                &[Reconcile {
                    conns: 5,
                    listed: false,
                    stale: true,
                }],
                None,
            ),
            (
                10,
                In::Done(Err(Op::Expired)),
                &[
                    NotConnected(1),
                    Lost(1),
                    Lapsed,
                    Establish {
                        conns: 5,
                        listed: false,
                        previous: vec![1],
                    },
                ],
                None,
            ),
        ]);
        assert_eq!(h.keeper.sessions_lost(), 1);
    }

    #[test]
    fn the_backend_reporting_expiry_loses_the_session() {
        Harness::new().table(&[(
            50,
            In::Expired,
            &[
                Lost(1),
                Lapsed,
                Establish {
                    conns: 5,
                    listed: true,
                    previous: vec![1],
                },
            ],
            None,
        )]);
    }
}

mod disconnected {
    use super::*;

    #[test]
    fn lost_at_half_a_session_timeout_then_new_sessions_with_backoff() {
        let mut h = Harness::new();
        h.table(&[
            (
                1_000,
                In::Disconnected,
                &[Disconnected(1_000)],
                Some((4_000, LostAt)),
            ),
            (3_999, In::Timeout, &[], Some((4_000, LostAt))),
            (
                4_000,
                In::Timeout,
                &[
                    Lost(1),
                    Lapsed,
                    Establish {
                        conns: 5,
                        listed: true,
                        previous: vec![1],
                    },
                ],
                None,
            ),
            (
                4_500,
                In::Established(Err("refused")),
                &[],
                Some((4_600, Retry)),
            ),
            (
                4_600,
                In::Timeout,
                &[Establish {
                    conns: 5,
                    listed: true,
                    previous: vec![1],
                }],
                None,
            ),
            (
                4_700,
                In::Established(Err("refused")),
                &[],
                Some((4_900, Retry)),
            ),
            (
                4_900,
                In::Timeout,
                &[Establish {
                    conns: 5,
                    listed: true,
                    previous: vec![1],
                }],
                None,
            ),
            (
                4_910,
                In::Established(Err("refused")),
                &[],
                Some((5_310, Retry)),
            ),
            (
                5_310,
                In::Timeout,
                &[Establish {
                    conns: 5,
                    listed: true,
                    previous: vec![1],
                }],
                None,
            ),
            (
                5_320,
                In::Established(Err("refused")),
                &[],
                Some((6_120, Retry)),
            ),
            (
                6_120,
                In::Timeout,
                &[Establish {
                    conns: 5,
                    listed: true,
                    previous: vec![1],
                }],
                None,
            ),
            (
                6_130,
                In::Established(Err("refused")),
                &[],
                Some((7_730, Retry)),
            ),
            (
                7_730,
                In::Timeout,
                &[Establish {
                    conns: 5,
                    listed: true,
                    previous: vec![1],
                }],
                None,
            ),
            // Capped at 2 s.
            (
                7_740,
                In::Established(Err("refused")),
                &[],
                Some((9_740, Retry)),
            ),
            (
                9_740,
                In::Timeout,
                &[Establish {
                    conns: 5,
                    listed: true,
                    previous: vec![1],
                }],
                None,
            ),
            // Set up as asked and nothing changed meanwhile: Connected at once.
            (9_800, In::Established(Ok(2)), &[Connected], None),
        ]);
        assert_eq!(h.keeper.sessions_lost(), 1);
        assert_eq!(h.keeper.session(), Some(session(2)));
        assert_eq!(h.keeper.previous_sessions(), &[] as &[u64], "replaced");
    }

    #[test]
    fn a_reconnect_in_time_reconciles_then_reports_connected() {
        let mut h = Harness::new();
        h.table(&[
            (
                1_000,
                In::Disconnected,
                &[Disconnected(1_000)],
                Some((4_000, LostAt)),
            ),
            // Marked dirty: the data is rewritten.
            (
                2_000,
                In::Reconnected,
                &[Reconcile {
                    conns: 5,
                    listed: true,
                    stale: true,
                }],
                None,
            ),
            (2_010, In::Done(Ok(())), &[Connected], None),
        ]);
        assert_eq!(h.keeper.sessions_lost(), 0);
    }

    #[test]
    fn a_failed_reconcile_after_a_reconnect_still_reports_connected_and_repairs() {
        Harness::new().table(&[
            (
                1_000,
                In::Disconnected,
                &[Disconnected(1_000)],
                Some((4_000, LostAt)),
            ),
            (
                2_000,
                In::Reconnected,
                &[Reconcile {
                    conns: 5,
                    listed: true,
                    stale: true,
                }],
                None,
            ),
            (
                2_010,
                In::Done(Err(Op::Failed)),
                &[Connected],
                Some((2_210, Repair)),
            ),
            // Disconnected again: the reconnect reconciles, the repair is cancelled.
            (
                2_100,
                In::Disconnected,
                &[Disconnected(2_100)],
                Some((5_100, LostAt)),
            ),
        ]);
    }

    #[test]
    fn a_second_disconnection_report_never_moves_lost_at() {
        Harness::new().table(&[
            (
                1_000,
                In::Disconnected,
                &[Disconnected(1_000)],
                Some((4_000, LostAt)),
            ),
            (2_000, In::Disconnected, &[], Some((4_000, LostAt))),
        ]);
    }

    #[test]
    fn commands_are_answered_not_connected_and_applied_on_reconnect() {
        Harness::new().table(&[
            (
                1_000,
                In::Disconnected,
                &[Disconnected(1_000)],
                Some((4_000, LostAt)),
            ),
            (
                1_100,
                In::Update(1, 8),
                &[NotConnected(1)],
                Some((4_000, LostAt)),
            ),
            (
                1_200,
                In::SetListed(2, false),
                &[NotConnected(2)],
                Some((4_000, LostAt)),
            ),
            (
                2_000,
                In::Reconnected,
                &[Reconcile {
                    conns: 8,
                    listed: false,
                    stale: true,
                }],
                None,
            ),
            (2_010, In::Done(Ok(())), &[Connected], None),
        ]);
    }

    #[test]
    fn a_reconcile_cut_off_by_the_connection_keeps_the_registration_dirty() {
        Harness::new().table(&[
            (
                1_000,
                In::Disconnected,
                &[Disconnected(1_000)],
                Some((4_000, LostAt)),
            ),
            (
                2_000,
                In::Reconnected,
                &[Reconcile {
                    conns: 5,
                    listed: true,
                    stale: true,
                }],
                None,
            ),
            // No `Connected` in between: straight back to disconnected, a new `since`.
            (
                2_010,
                In::Done(Err(Op::Disconnected)),
                &[Disconnected(2_010)],
                Some((5_010, LostAt)),
            ),
            (
                5_010,
                In::Timeout,
                &[
                    Lost(1),
                    Lapsed,
                    Establish {
                        conns: 5,
                        listed: true,
                        previous: vec![1],
                    },
                ],
                None,
            ),
            // Still dirty: the new session reconciles before it is reported.
            (
                5_100,
                In::Established(Ok(2)),
                &[Reconcile {
                    conns: 5,
                    listed: true,
                    stale: true,
                }],
                None,
            ),
            (5_110, In::Done(Ok(())), &[Connected], None),
        ]);
    }
}

mod establishing {
    use super::*;

    fn lost() -> Harness {
        let mut h = Harness::new();
        h.table(&[(
            0,
            In::Expired,
            &[
                Lost(1),
                Lapsed,
                Establish {
                    conns: 5,
                    listed: true,
                    previous: vec![1],
                },
            ],
            None,
        )]);
        h
    }

    #[test]
    fn changes_during_an_attempt_are_reconciled_before_connected() {
        lost().table(&[
            (10, In::Update(1, 9), &[NotConnected(1)], None),
            (
                20,
                In::Established(Ok(2)),
                &[Reconcile {
                    conns: 9,
                    listed: true,
                    stale: true,
                }],
                None,
            ),
            (30, In::Done(Ok(())), &[Connected], None),
        ]);
    }

    #[test]
    fn a_listing_wish_during_an_attempt_is_reconciled_even_if_the_attempt_saw_it() {
        let mut h = lost();
        h.table(&[
            (10, In::Established(Err("refused")), &[], Some((110, Retry))),
            (
                50,
                In::SetListed(1, false),
                &[NotConnected(1)],
                Some((110, Retry)),
            ),
            // The next attempt is set up unlisted ...
            (
                110,
                In::Timeout,
                &[Establish {
                    conns: 5,
                    listed: false,
                    previous: vec![1],
                }],
                None,
            ),
            // ... and still reconciled once up: the wish marked the registration dirty.
            (
                150,
                In::Established(Ok(2)),
                &[Reconcile {
                    conns: 5,
                    listed: false,
                    stale: true,
                }],
                None,
            ),
            (160, In::Done(Ok(())), &[Connected], None),
        ]);
        assert!(!h.keeper.is_listed());
    }

    #[test]
    fn two_losses_carry_both_sessions_until_one_is_replaced() {
        let mut h = lost();
        h.table(&[
            (10, In::Established(Ok(2)), &[Connected], None),
            (
                20,
                In::Expired,
                &[
                    Lost(2),
                    Lapsed,
                    Establish {
                        conns: 5,
                        listed: true,
                        previous: vec![2],
                    },
                ],
                None,
            ),
        ]);
        assert_eq!(h.keeper.sessions_lost(), 2);
    }

    #[test]
    fn session_events_while_establishing_are_ignored() {
        lost().table(&[
            (10, In::Disconnected, &[], None),
            (20, In::Reconnected, &[], None),
            (30, In::Expired, &[], None),
            (40, In::Timeout, &[], None),
        ]);
    }
}

/// Deregister and drop, in every phase.
mod leaving {
    use super::*;

    #[test]
    fn deregister_while_connected_deletes_then_answers_then_stops() {
        Harness::new().table(&[
            (0, In::Deregister(1), &[Leave], None),
            (
                10,
                In::Done(Ok(())),
                &[Acked(1), Stop { close: false }],
                None,
            ),
        ]);
    }

    #[test]
    fn deregister_failing_is_answered_with_the_failure() {
        Harness::new().table(&[
            (0, In::Deregister(1), &[Leave], None),
            (
                10,
                In::Done(Err(Op::Failed)),
                &[Backend(1, "failed"), Stop { close: false }],
                None,
            ),
        ]);
        Harness::new().table(&[
            (0, In::Deregister(1), &[Leave], None),
            (
                10,
                In::Done(Err(Op::Expired)),
                &[NotConnected(1), Stop { close: false }],
                None,
            ),
        ]);
    }

    #[test]
    fn deregister_while_disconnected_is_not_connected_at_once() {
        Harness::new().table(&[
            (
                1_000,
                In::Disconnected,
                &[Disconnected(1_000)],
                Some((4_000, LostAt)),
            ),
            (
                1_100,
                In::Deregister(1),
                &[NotConnected(1), Stop { close: false }],
                None,
            ),
        ]);
    }

    #[test]
    fn deregister_without_a_session_is_ok() {
        Harness::new().table(&[
            (
                0,
                In::Expired,
                &[
                    Lost(1),
                    Lapsed,
                    Establish {
                        conns: 5,
                        listed: true,
                        previous: vec![1],
                    },
                ],
                None,
            ),
            (
                10,
                In::Deregister(1),
                &[Acked(1), Stop { close: false }],
                None,
            ),
        ]);
    }

    #[test]
    fn dropping_the_registration_closes_a_connected_session_only() {
        Harness::new().table(&[(0, In::Closed, &[Stop { close: true }], None)]);
        Harness::new().table(&[
            (
                1_000,
                In::Disconnected,
                &[Disconnected(1_000)],
                Some((4_000, LostAt)),
            ),
            (1_100, In::Closed, &[Stop { close: false }], None),
        ]);
        let mut h = Harness::new();
        h.table(&[
            (
                0,
                In::Expired,
                &[
                    Lost(1),
                    Lapsed,
                    Establish {
                        conns: 5,
                        listed: true,
                        previous: vec![1],
                    },
                ],
                None,
            ),
            (10, In::Closed, &[Stop { close: false }], None),
            (20, In::Closed, &[], None),
        ]);
        assert!(h.keeper.is_stopped());
    }
}
