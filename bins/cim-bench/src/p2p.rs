//! `p2p`: K sender/receiver pairs in private conversations at a fixed offered rate, stepped
//! through rising rates; p50/p99/p999 per rate, and the highest rate whose p99 stays under
//! 10 ms.
//!
//! Two latencies per message. *From submit*: from the moment the SDK is handed the message
//! to its delivery, what the system costs. *From due*: from when the open-loop schedule
//! said it should be sent, so a sender held back (by backpressure, or a starved bench)
//! cannot hide queueing; it adds the generator's own lateness, up to about one 1 ms timer
//! tick (tokio's timer resolution) on a machine that keeps up. The sustained-rate verdict
//! uses the stricter one, from due.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use cim_core::client::ClientEvent;
use cim_core::ids::ConvId;
use hdrhistogram::Histogram;

use crate::util::{self, Table, f1, f2, int};

#[derive(clap::Args, Debug, Clone)]
pub struct P2pArgs {
    /// Sender/receiver pairs [default: 100; --quick 5].
    #[arg(long)]
    pub pairs: Option<usize>,
    /// Offered rates to step through, messages per second in total
    /// [default: 1000,2000,5000,10000,20000; --quick 100,200].
    #[arg(long, value_delimiter = ',')]
    pub rates: Vec<u64>,
    /// Seconds per rate [default: 5; --quick 1].
    #[arg(long)]
    pub seconds: Option<u64>,
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
}

/// Deliveries and latencies (from submit, from due) of one rate, filled by the receivers.
type PerRate = (u64, Histogram<u64>, Histogram<u64>);

/// Body layout: submit stamp (8 bytes, what `util::latency_us` reads), rate index (1),
/// due stamp (8).
const DUE_AT: std::ops::Range<usize> = 9..17;

/// One rate's figures.
#[derive(Debug)]
pub struct Step {
    pub offered: u64,
    pub sent: u64,
    pub delivered: u64,
    pub secs: f64,
    pub latency_us: Histogram<u64>,
    pub from_due_us: Histogram<u64>,
    /// CPU seconds of the cluster process over the step (sending and the tail's drain).
    pub cluster_cpu: Option<f64>,
    /// CPU seconds of the bench's own Redis over the step (every node of a Redis Cluster),
    /// from `INFO cpu`; `None` without one.
    pub redis_cpu: Option<f64>,
}

/// The CPU seconds all of `ports`' Redis servers have used so far; `None` for none, or if
/// one cannot say.
fn redis_cpu(ports: &[u16]) -> Option<f64> {
    if ports.is_empty() {
        return None;
    }
    ports
        .iter()
        .map(|&port| util::redis_cpu_seconds(port).ok())
        .sum()
}

pub async fn run(
    route: &crate::util::Route,
    args: &P2pArgs,
    quick: bool,
    label: &str,
    cluster_pid: Option<u32>,
    redis_ports: &[u16],
) -> anyhow::Result<(Table, Vec<Step>)> {
    let pairs = args.pairs.unwrap_or(if quick { 5 } else { 100 });
    let rates = if args.rates.is_empty() {
        if quick {
            vec![100, 200]
        } else {
            vec![1_000, 2_000, 5_000, 10_000, 20_000]
        }
    } else {
        args.rates.clone()
    };
    let seconds = args.seconds.unwrap_or(if quick { 1 } else { 5 });
    let tag = util::run_tag();
    let users = util::register_users(route, &format!("pp{tag}"), pairs * 2, 32).await?;
    let clients = util::start_clients(route, &users, 64).await?;
    let hists: Arc<Mutex<Vec<PerRate>>> = Arc::new(Mutex::new(
        (0..rates.len())
            .map(|_| (0, util::histogram(), util::histogram()))
            .collect(),
    ));
    let mut senders = Vec::new();
    let mut tasks = Vec::new();
    for (i, (client, mut events)) in clients.into_iter().enumerate() {
        if i % 2 == 0 {
            let conv = ConvId::private(users[i].0, users[i + 1].0).context("pair")?;
            senders.push((client, conv));
            // Acks: drained.
            tasks.push(tokio::spawn(async move {
                while events.next().await.is_some() {}
            }));
        } else {
            let hists = hists.clone();
            tasks.push(tokio::spawn(async move {
                let _client = client;
                while let Some(event) = events.next().await {
                    if let ClientEvent::Message(m) = event
                        && let (Some(us), Some(&step), Some(due)) = (
                            util::latency_us(&m.body),
                            m.body.get(8),
                            m.body.get(DUE_AT).and_then(util::latency_us),
                        )
                    {
                        let mut h = hists.lock().expect("no panics while held");
                        if let Some((n, from_submit, from_due)) = h.get_mut(step as usize) {
                            *n += 1;
                            let _ = from_submit.record(us.max(1));
                            let _ = from_due.record(due.max(1));
                        }
                    }
                }
            }));
        }
    }

    let mut steps = Vec::new();
    for (index, &rate) in rates.iter().enumerate() {
        let total = rate * seconds;
        let bar = util::bar(total, &format!("{rate}/s"));
        let cpu0 = cluster_pid.and_then(util::cpu_seconds);
        let redis0 = redis_cpu(redis_ports);
        let start_stamp = util::stamp();
        let started = util::now();
        // The schedule runs on a thread of its own, sleeping with the OS timer (tens of
        // microseconds) rather than tokio's 1 ms timer wheel, so sends leave close to when
        // they are due; the latency "from due" still counts any lateness.
        let handle = tokio::runtime::Handle::current();
        let payload = args.payload.max(DUE_AT.end);
        let generator_bar = bar.clone();
        let (returned, sent) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut sent = 0u64;
            while sent < total {
                // Message n is due n / rate after the start: those due by now are n <= t * rate.
                let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64 + 1).min(total);
                while sent < due {
                    let due_at = start_stamp + sent * 1_000_000_000 / rate;
                    let mut body = util::stamped_body(util::stamp(), payload).to_vec();
                    body[8] = index as u8;
                    body[DUE_AT].copy_from_slice(&due_at.to_be_bytes());
                    let (client, conv) = &senders[(sent as usize) % senders.len()];
                    handle
                        .block_on(client.submit(conv.clone(), body.into()))
                        .context("submit")?;
                    sent += 1;
                }
                generator_bar.set_position(sent);
                let next = started + Duration::from_nanos(sent * 1_000_000_000 / rate);
                if let Some(wait) = next.checked_duration_since(util::now()) {
                    std::thread::sleep(wait);
                }
            }
            Ok((senders, sent))
        })
        .await
        .context("the generator thread")??;
        senders = returned;
        let send_secs = started.elapsed().as_secs_f64();
        // Let the tail arrive (bounded).
        let drain_until = util::now() + Duration::from_secs(5);
        while util::now() < drain_until && hists.lock().expect("held briefly")[index].0 < sent {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cpu1 = cluster_pid.and_then(util::cpu_seconds);
        let redis1 = redis_cpu(redis_ports);
        bar.finish_and_clear();
        let (delivered, latency_us, from_due_us) = {
            let h = hists.lock().expect("held briefly");
            (h[index].0, h[index].1.clone(), h[index].2.clone())
        };
        steps.push(Step {
            offered: rate,
            sent,
            delivered,
            secs: send_secs,
            latency_us,
            from_due_us,
            cluster_cpu: cpu0.zip(cpu1).map(|(a, b)| b - a),
            redis_cpu: redis0.zip(redis1).map(|(a, b)| b - a),
        });
    }
    for (client, _) in senders {
        client.shutdown().await;
    }
    for t in tasks {
        t.abort();
    }

    let mut table = Table::new(
        format!("p2p: {pairs} pairs, {seconds} s per rate ({label})"),
        &[
            "offered msg/s",
            "achieved msg/s",
            "delivered",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "from due: p50 / p99 ms",
            "cluster CPU µs / msg",
            "Redis CPU µs / msg",
        ],
    );
    for s in &steps {
        let [p50, p99, p999] = util::percentiles_ms(&s.latency_us);
        let [due50, due99, _] = util::percentiles_ms(&s.from_due_us);
        table.row(vec![
            int(s.offered as f64),
            int(s.sent as f64 / s.secs.max(1e-9)),
            int(s.delivered as f64),
            f2(p50),
            f2(p99),
            f2(p999),
            format!("{} / {}", f2(due50), f2(due99)),
            s.cluster_cpu.map_or(
                "-".into(),
                |cpu| f1(1e6 * cpu / (s.delivered.max(1) as f64)),
            ),
            s.redis_cpu.map_or(
                "-".into(),
                |cpu| f1(1e6 * cpu / (s.delivered.max(1) as f64)),
            ),
        ]);
    }
    let best = steps
        .iter()
        .filter(|s| s.delivered == s.sent && util::percentiles_ms(&s.from_due_us)[1] < 10.0)
        .map(|s| s.offered)
        .max();
    table.row(vec![
        "highest rate with p99 (from due) < 10 ms".into(),
        best.map_or("none of those tried".into(), |r| int(r as f64)),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    ]);
    Ok((table, steps))
}
