//! A model run: trimmed logs, pushes duplicated, reordered and dropped at random, filtered
//! through a correct client (contiguous hand-over, gap sync, trim markers). The checker must
//! accept every such history, and catch the removal of any one delivered message.

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;

const USERS: u64 = 3;

#[derive(Debug, Clone)]
enum Op {
    /// `sender` (a user index) appends to conversation `conv`; pushes go to every member.
    Append { conv: usize, sender: u64 },
    /// One pending push reaches its client.
    Push { client: usize, pick: usize },
    /// One pending push reaches its client and stays pending (it will arrive again).
    Dup { client: usize, pick: usize },
    /// One pending push is lost.
    Lose { client: usize, pick: usize },
    /// The client syncs every conversation (after a gap timer, a reconnect, a head check).
    Sync { client: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let client = 0..USERS as usize;
    prop_oneof![
        3 => (0..2usize, 1..=USERS).prop_map(|(conv, sender)| Op::Append { conv, sender }),
        3 => (client.clone(), any::<usize>()).prop_map(|(client, pick)| Op::Push { client, pick }),
        1 => (client.clone(), any::<usize>()).prop_map(|(client, pick)| Op::Dup { client, pick }),
        1 => (client.clone(), any::<usize>()).prop_map(|(client, pick)| Op::Lose { client, pick }),
        1 => client.prop_map(|client| Op::Sync { client }),
    ]
}

struct Log {
    conv: ConvId,
    messages: Vec<StoredMessage>,
    max_len: u64,
}

impl Log {
    fn head(&self) -> u64 {
        self.messages.len() as u64
    }
    fn first_available(&self) -> u64 {
        self.head().saturating_sub(self.max_len) + 1
    }
}

/// A correct client's position in one conversation.
#[derive(Default)]
struct Pos {
    /// `None` until a sync anchored it; pushes before that are ignored (the sync fetches).
    delivered: Option<u64>,
    buffer: BTreeMap<u64, StoredMessage>,
}

struct Client {
    user: UserId,
    inbox: Vec<StoredMessage>,
    convs: BTreeMap<ConvId, Pos>,
    events: Vec<(SimTime, Seen)>,
}

impl Client {
    fn drain(&mut self, conv: &ConvId, at: SimTime) {
        let pos = self.convs.entry(conv.clone()).or_default();
        let Some(delivered) = pos.delivered.as_mut() else {
            return;
        };
        while let Some(m) = pos.buffer.remove(&(*delivered + 1)) {
            *delivered = m.seq;
            self.events.push((at, Seen::Message(m)));
        }
    }

    fn deliver(&mut self, m: StoredMessage, at: SimTime) {
        let pos = self.convs.entry(m.conv.clone()).or_default();
        if pos.delivered.is_some_and(|d| m.seq > d) {
            let conv = m.conv.clone();
            pos.buffer.insert(m.seq, m);
            self.drain(&conv, at);
        }
    }

    fn sync(&mut self, log: &Log, join: u64, at: SimTime) {
        let pos = self.convs.entry(log.conv.clone()).or_default();
        let trimmed_to = log.first_available() - 1;
        let delivered = *pos.delivered.get_or_insert(join.max(trimmed_to));
        if trimmed_to > delivered {
            self.events.push((
                at,
                Seen::Unavailable {
                    conv: log.conv.clone(),
                    from_seq: delivered + 1,
                    count: trimmed_to - delivered,
                },
            ));
            pos.delivered = Some(trimmed_to);
            pos.buffer = pos.buffer.split_off(&(trimmed_to + 1));
        }
        for m in &log.messages[trimmed_to as usize..] {
            if m.seq > pos.delivered.unwrap_or(0) {
                pos.buffer.insert(m.seq, m.clone());
            }
        }
        self.drain(&log.conv, at);
    }
}

/// Runs the model; returns the history and each user's loss floor per conversation.
fn run(ops: &[Op], max_len: u64, join: u64) -> (History, BTreeMap<(UserId, ConvId), u64>) {
    let membership = Membership {
        all_from: BTreeMap::new(),
        groups: BTreeMap::from([(
            "g".to_owned(),
            BTreeMap::from([(UserId(1), 0), (UserId(2), join)]),
        )]),
    };
    let mut logs = [ConvId::All, ConvId::group("g").unwrap()].map(|conv| Log {
        conv,
        messages: Vec::new(),
        max_len,
    });
    let mut clients: Vec<Client> = (1..=USERS)
        .map(|u| Client {
            user: UserId(u),
            inbox: Vec::new(),
            convs: BTreeMap::new(),
            events: vec![(
                Duration::ZERO,
                Seen::Online {
                    server: ServerId::new("s1"),
                    epoch: Epoch(1),
                },
            )],
        })
        .collect();
    let mut acks = Vec::new();
    let mut now = Duration::ZERO;
    let take = |inbox: &mut Vec<StoredMessage>, pick: usize, keep: bool| {
        if inbox.is_empty() {
            return None;
        }
        let i = pick % inbox.len();
        Some(if keep {
            inbox[i].clone()
        } else {
            inbox.remove(i)
        })
    };
    for op in ops {
        now += Duration::from_millis(1);
        match *op {
            Op::Append { conv, sender } => {
                let log = &mut logs[conv];
                let sender = UserId(sender);
                if membership.join_seq(sender, &log.conv).is_none() {
                    continue;
                }
                let seq = log.head() + 1;
                let m = StoredMessage {
                    conv: log.conv.clone(),
                    log_epoch: E,
                    seq,
                    sender,
                    msg_id: ClientMsgId((u128::from(sender.0) << 64) | u128::from(seq)),
                    body: Bytes::from(format!("{}#{seq}", log.conv)),
                    appended_at: cim_core::ids::UnixMillis(now.as_millis() as u64),
                };
                log.messages.push(m.clone());
                acks.push(AckedSend {
                    sender,
                    conv: m.conv.clone(),
                    msg_id: m.msg_id,
                    log_epoch: E,
                    seq,
                    acked_at: now,
                });
                for c in &mut clients {
                    if membership.join_seq(c.user, &m.conv).is_some() {
                        c.inbox.push(m.clone());
                    }
                }
            }
            Op::Push { client, pick } | Op::Dup { client, pick } => {
                let keep = matches!(op, Op::Dup { .. });
                let c = &mut clients[client];
                if let Some(m) = take(&mut c.inbox, pick, keep) {
                    c.deliver(m, now);
                }
            }
            Op::Lose { client, pick } => {
                take(&mut clients[client].inbox, pick, false);
            }
            Op::Sync { client } => {
                let c = &mut clients[client];
                for log in &logs {
                    if let Some(join) = membership.join_seq(c.user, &log.conv) {
                        c.sync(log, join, now);
                    }
                }
            }
        }
    }
    // The healed phase ends with every client synced.
    now += Duration::from_millis(1);
    let mut floors = BTreeMap::new();
    for c in &mut clients {
        for log in &logs {
            if let Some(join) = membership.join_seq(c.user, &log.conv) {
                c.sync(log, join, now);
                floors.insert(
                    (c.user, log.conv.clone()),
                    join.max(log.first_available() - 1),
                );
            }
        }
    }
    let history = History {
        sessions: (1..=USERS)
            .map(|u| SessionSpan {
                user: UserId(u),
                server: ServerId::new("s1"),
                epoch: Epoch(1),
                opened_at: Duration::ZERO,
                closed_at: None,
            })
            .collect(),
        acks,
        // The model submits nothing of its own: the sender-order check is tested by hand.
        submissions: Vec::new(),
        rejections: Vec::new(),
        clients: clients
            .into_iter()
            .map(|c| ClientHistory {
                client: ClientId(c.user.0 as u32),
                user: c.user,
                events: c.events,
            })
            .collect(),
        membership,
        final_logs: logs
            .iter()
            .map(|log| {
                (
                    log.conv.clone(),
                    FinalLog {
                        log_epoch: E,
                        head_seq: log.head(),
                        first_available_seq: log.first_available(),
                    },
                )
            })
            .collect(),
        moves: Vec::new(),
        faults: Vec::new(),
        bounds: Bounds {
            healed_at: Duration::ZERO,
            end: now,
            rehome_after_death: Duration::from_secs(10),
            rehome_after_isolation: Duration::from_secs(20),
        },
        acked_after_replication: false,
        shard_outage: None,
    };
    (history, floors)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        // PROPTEST_CASES still wins, for a long run.
        std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(128)
    ))]

    #[test]
    fn correct_histories_pass_and_any_dropped_delivery_is_caught(
        ops in vec(op(), 0..80),
        max_len in 1..10u64,
        join in 0..5u64,
    ) {
        let (history, floors) = run(&ops, max_len, join);
        let report = check(&history);
        prop_assert!(report.is_clean(), "{}", report);
        prop_assert_eq!(report.stats.deliveries_required, floors
            .iter()
            .map(|((_, conv), floor)| history.acks.iter().filter(|a| a.conv == *conv && a.seq > *floor).count() as u64)
            .sum::<u64>());

        for (ci, c) in history.clients.iter().enumerate() {
            for (ei, (_, seen)) in c.events.iter().enumerate() {
                let Seen::Message(m) = seen else { continue };
                let mut broken = history.clone();
                broken.clients[ci].events.remove(ei);
                let report = check(&broken);
                let lost = report.violations.iter().any(|v| matches!(v,
                    Violation::Lost { client, conv, seq, .. }
                        if *client == c.client && *conv == m.conv && *seq == m.seq));
                if m.seq > floors[&(c.user, m.conv.clone())] {
                    prop_assert!(lost, "dropping {} seq {} of {}: {}", m.conv, m.seq, c.client, report);
                }
                // Inside a stream (not its free start), the hole is also a silent gap.
                let same_conv = |(_, s): &(SimTime, Seen)| match s {
                    Seen::Message(n) => n.conv == m.conv,
                    Seen::Unavailable { conv, .. } => *conv == m.conv,
                    _ => false,
                };
                if c.events[..ei].iter().any(same_conv) && c.events[ei + 1..].iter().any(same_conv) {
                    prop_assert!(
                        report.violations.iter().any(|v| matches!(v, Violation::SilentGap { .. })),
                        "dropping {} seq {} of {}: {}", m.conv, m.seq, c.client, report
                    );
                }
            }
        }
    }
}
