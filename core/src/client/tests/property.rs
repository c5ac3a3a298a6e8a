//! The delivery property: under any interleaving of pushes, losses, reconnects and
//! log epochs, the application gets every message once, in order, or is told it is unavailable.

use super::*;

const CONVS: [&str; 3] = ["all", "g:x", "p:3:7"];

#[derive(Debug, Clone)]
enum Op {
    /// The next message of conversation `i` is appended to the server's log.
    Append(usize),
    /// One more push of an appended message (picked by index); at most 3 per message.
    Deliver(usize),
    /// The server's oldest pending answer (sync/fetch) reaches the client.
    Answer,
    /// Time passes; timers fire.
    Tick(u64),
    /// The server drops the connection; in-flight answers are lost; the client reconnects.
    Reconnect,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..CONVS.len()).prop_map(Op::Append),
        6 => any::<usize>().prop_map(Op::Deliver),
        3 => Just(Op::Answer),
        2 => (1..700u64).prop_map(Op::Tick),
        1 => Just(Op::Reconnect),
    ]
}

/// The server side, answering from the log as the store would.
struct Sim {
    h: Harness,
    now: Instant,
    logs: BTreeMap<ConvId, Vec<proto::Message>>,
    appended: Vec<(ConvId, u64)>,
    pushes: BTreeMap<(ConvId, u64), u8>,
    cursors: BTreeMap<ConvId, u64>,
    /// Answers in flight, in order.
    pending: VecDeque<Kind>,
    /// The highest seq pushed to the client, per conversation.
    pushed: BTreeMap<ConvId, u64>,
    received: BTreeMap<ConvId, Vec<StoredMessage>>,
    next_login: u64,
}

impl Sim {
    fn new() -> Self {
        let mut cfg = ClientConfig::new(USER, "alice", "pw", 3);
        // The periodic head check must not paper over a broken gap sync before phase 2.
        cfg.head_check_interval = Duration::from_secs(600);
        cfg.fetch_limit = 3;
        cfg.max_buffered = 4;
        let h = Harness::new(cfg);
        let now = h.t0;
        Self {
            h,
            now,
            logs: BTreeMap::new(),
            appended: Vec::new(),
            pushes: BTreeMap::new(),
            cursors: BTreeMap::new(),
            pending: VecDeque::new(),
            pushed: BTreeMap::new(),
            received: BTreeMap::new(),
            next_login: 0,
        }
    }

    fn head(&self, conv: &ConvId) -> proto::ConvHead {
        proto::ConvHead {
            conv: conv.to_string(),
            log_epoch: E1.0,
            head_seq: self.logs.get(conv).map_or(0, |l| l.len() as u64),
            first_available_seq: 1,
            cursor_seq: self.cursors.get(conv).copied().unwrap_or(0),
            carried_from_epoch: 0,
            carried_up_to: 0,
        }
    }

    fn feed(&mut self, kind: Kind) {
        let _ = self
            .h
            .s
            .handle_frame(self.now, proto::Frame { kind: Some(kind) });
        self.pump();
    }

    /// Drains the client, playing route, connection and server for every command.
    fn pump(&mut self) {
        loop {
            let mut immediate = Vec::new();
            while let Some(cmd) = self.h.s.poll_command() {
                match cmd {
                    ClientCommand::Login { attempt, .. } => {
                        self.next_login += 1;
                        self.h.s.handle_login_answer(
                            self.now,
                            attempt,
                            Ok(answer(self.next_login, 1)),
                        );
                    }
                    ClientCommand::Connect { .. } => self.h.s.handle_connected(self.now),
                    ClientCommand::Disconnect => self.pending.clear(),
                    ClientCommand::Transmit(frame) => match frame.kind {
                        Some(Kind::Login(_)) => immediate.push(login_ok(self.next_login)),
                        Some(Kind::Ping(p)) => {
                            immediate.push(Kind::Pong(proto::Pong { nonce: p.nonce }));
                        }
                        Some(Kind::SyncRequest(_)) => {
                            let heads = self.logs.keys().map(|c| self.head(c)).collect();
                            self.pending.push_back(sync_answer(heads));
                        }
                        Some(Kind::FetchRequest(f)) => {
                            let conv = conv(&f.conv);
                            assert_eq!(f.log_epoch, E1.0, "one epoch in this property");
                            let log = self.logs.get(&conv).cloned().unwrap_or_default();
                            let messages = log
                                .into_iter()
                                .filter(|m| m.seq > f.after_seq)
                                .take(f.limit as usize)
                                .collect();
                            self.pending
                                .push_back(Kind::FetchAnswer(proto::FetchAnswer {
                                    head: Some(self.head(&conv)),
                                    messages,
                                }));
                        }
                        Some(Kind::DeliverAck(ack)) => {
                            for c in ack.cursors {
                                let cur = self.cursors.entry(conv(&c.conv)).or_default();
                                *cur = (*cur).max(c.seq);
                            }
                        }
                        other => panic!("unexpected frame from the client: {other:?}"),
                    },
                }
            }
            while let Some(ev) = self.h.s.poll_event() {
                match ev {
                    ClientEvent::Message(m) => {
                        let got = self.received.entry(m.conv.clone()).or_default();
                        let expected_seq = got.len() as u64 + 1;
                        assert_eq!(m.seq, expected_seq, "out of order or duplicate: {m:?}");
                        let want = message_from_proto(
                            self.logs[&m.conv][expected_seq as usize - 1].clone(),
                        )
                        .expect("log messages are valid");
                        assert_eq!(m, want);
                        got.push(m);
                    }
                    ClientEvent::Unavailable { .. } | ClientEvent::LogReset { .. } => {
                        panic!("nothing is trimmed or reset here: {ev:?}")
                    }
                    ClientEvent::Stopped(_) | ClientEvent::Kicked(_) => panic!("{ev:?}"),
                    _ => {}
                }
            }
            if immediate.is_empty() {
                break;
            }
            for kind in immediate {
                let _ = self
                    .h
                    .s
                    .handle_frame(self.now, proto::Frame { kind: Some(kind) });
            }
        }
    }

    /// Moves time to `until`, firing every deadline on the way at its own time.
    fn advance(&mut self, until: Instant) {
        for _ in 0..10_000 {
            match self.h.s.poll_timeout() {
                Some((at, _)) if at <= until => {
                    self.now = self.now.max(at);
                    self.h.s.handle_timeout(self.now);
                    self.pump();
                }
                _ => break,
            }
        }
        self.now = self.now.max(until);
    }

    fn answer_all(&mut self) {
        for _ in 0..10_000 {
            let Some(kind) = self.pending.pop_front() else {
                return;
            };
            self.feed(kind);
        }
        panic!("answers never settle");
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Append(i) => {
                let c = conv(CONVS[i]);
                let log = self.logs.entry(c.clone()).or_default();
                let seq = log.len() as u64 + 1;
                log.push(pmsg(CONVS[i], E1, seq));
                self.appended.push((c, seq));
            }
            Op::Deliver(pick) => {
                if self.appended.is_empty() {
                    return;
                }
                let (c, seq) = self.appended[pick % self.appended.len()].clone();
                let count = self.pushes.entry((c.clone(), seq)).or_default();
                if *count >= 3 {
                    return;
                }
                *count += 1;
                let pushed = self.pushed.entry(c.clone()).or_default();
                *pushed = (*pushed).max(seq);
                let msg = self.logs[&c][seq as usize - 1].clone();
                self.feed(Kind::Deliver(proto::Deliver { message: Some(msg) }));
            }
            Op::Answer => {
                if let Some(kind) = self.pending.pop_front() {
                    self.feed(kind);
                }
            }
            Op::Tick(ms) => self.advance(self.now + Duration::from_millis(ms)),
            Op::Reconnect => {
                self.pending.clear();
                self.h.s.handle_disconnected(self.now);
                self.pump();
                // Backoff, then the whole login runs at once in `pump`.
                let (at, reason) = self.h.s.poll_timeout().expect("backoff armed");
                assert_eq!(reason, TimerReason::Backoff);
                self.advance(at);
                assert!(self.h.s.is_online());
            }
        }
    }

    fn received_len(&self, c: &ConvId) -> u64 {
        self.received.get(c).map_or(0, |v| v.len() as u64)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        // PROPTEST_CASES still wins, for a long run.
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(512)
    ))]

    /// Whatever the pushes do (late, repeated, reordered, lost), the application gets every
    /// message exactly once, in seq order per conversation: what was pushed once the gap
    /// timer has run, and the rest (lost last pushes) after one head check.
    #[test]
    fn every_message_exactly_once_in_order(ops in prop::collection::vec(op(), 0..160)) {
        let mut sim = Sim::new();
        sim.h.s.start(sim.now);
        sim.pump();
        prop_assert!(sim.h.s.is_online());
        for op in ops {
            sim.apply(op);
        }

        // Phase 1: answers flow and timers run, for a few gap delays but no head check.
        for _ in 0..20 {
            sim.answer_all();
            sim.advance(sim.now + Duration::from_millis(100));
        }
        sim.answer_all();
        for (c, pushed) in sim.pushed.clone() {
            prop_assert!(
                sim.received_len(&c) >= pushed,
                "{c}: pushed up to {pushed}, delivered only {}",
                sim.received_len(&c)
            );
        }

        // Phase 2: one head check later, everything is there.
        let until = sim.now + Duration::from_secs(601);
        while sim.now < until {
            sim.answer_all();
            let next = sim.h.s.poll_timeout().map_or(until, |(at, _)| at.min(until));
            sim.advance(next);
        }
        sim.answer_all();
        for (c, log) in &sim.logs {
            prop_assert_eq!(sim.received_len(c), log.len() as u64, "{}", c);
        }
        prop_assert_eq!(sim.received.keys().collect::<Vec<_>>(), sim.logs.keys().collect::<Vec<_>>());
    }
}
