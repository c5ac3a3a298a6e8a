//! `fanout`: one sender, a group of M members spread over the servers; deliveries per
//! second and end-to-end latency (the send time is the first 8 bytes of the body). The
//! sender keeps at most `window` messages' worth of deliveries outstanding (closed loop), so
//! nobody is pushed past their queues: the figure is what the system sustains, not what it
//! drops.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use cim_core::client::ClientEvent;
use cim_core::ids::ConvId;
use hdrhistogram::Histogram;
use tokio::sync::Notify;

use crate::util::{self, Counter};

#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Group members receiving [default: 1000; --quick 20].
    #[arg(long)]
    pub members: Option<usize>,
    /// Messages the sender sends [default: 200; --quick 10].
    #[arg(long)]
    pub messages: Option<usize>,
    /// Messages outstanding (not yet delivered to every member) at most.
    #[arg(long, default_value_t = 16)]
    pub window: usize,
    /// Body size in bytes (at least 8: the send time).
    #[arg(long, default_value_t = 64)]
    pub payload: usize,
}

impl FanoutArgs {
    pub fn members(&self, quick: bool) -> usize {
        self.members.unwrap_or(if quick { 20 } else { 1000 })
    }
    pub fn messages(&self, quick: bool) -> usize {
        self.messages.unwrap_or(if quick { 10 } else { 200 })
    }
}

/// What one fan-out run measured, for any system.
#[derive(Debug)]
pub struct FanoutResult {
    pub system: String,
    pub delivered: u64,
    pub expected: u64,
    pub secs: f64,
    pub latency_us: Histogram<u64>,
    /// CPU seconds of the broker process(es) during the run.
    pub broker_cpu: Option<f64>,
}

impl FanoutResult {
    pub fn per_sec(&self) -> f64 {
        self.delivered as f64 / self.secs.max(1e-9)
    }
    pub fn cpu_per_million(&self) -> Option<f64> {
        self.broker_cpu
            .filter(|_| self.delivered > 0)
            .map(|cpu| cpu / self.delivered as f64 * 1e6)
    }
}

/// Shared by the receivers and the sender: deliveries so far, and a wake-up per delivery.
#[derive(Debug, Default)]
pub struct Flow {
    pub delivered: Counter,
    pub notify: Notify,
}

impl Flow {
    pub fn delivered_one(&self) {
        self.delivered.add(1);
        self.notify.notify_one();
    }

    /// Waits until at most `window` messages (of `members` deliveries each) are outstanding
    /// after `sent` sends, or `deadline` passes.
    pub async fn wait_window(
        &self,
        sent: u64,
        members: u64,
        window: u64,
        deadline: tokio::time::Instant,
    ) {
        while sent
            .saturating_mul(members)
            .saturating_sub(self.delivered.get())
            > window * members
        {
            if tokio::time::timeout_at(deadline, self.notify.notified())
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Waits until `total` deliveries or `deadline`.
    pub async fn wait_all(&self, total: u64, deadline: tokio::time::Instant) {
        while self.delivered.get() < total {
            if tokio::time::timeout_at(deadline, self.notify.notified())
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Runs the fan-out against our cluster at `route`; `broker_pid` is the cluster process.
pub async fn run_ours(
    route: &crate::util::Route,
    args: &FanoutArgs,
    quick: bool,
    broker_pid: Option<u32>,
    system: &str,
) -> anyhow::Result<FanoutResult> {
    let members = args.members(quick);
    let messages = args.messages(quick);
    let tag = util::run_tag();
    let users = util::register_users(route, &format!("fo{tag}"), members + 1, 32).await?;
    let mut clients = util::start_clients(route, &users, 64).await?;
    let group = format!("fan{tag}");
    let conv = ConvId::group(&group).context("group name")?;
    let api = util::route_api(route);
    let (sender, mut sender_events) = clients.remove(0);
    let token = |c: &cim_io::sdk::Client<cim_io::net::TokioNet>| c.token().context("no token");
    api.create_group(&token(&sender)?, users[0].0, &group)
        .await?;
    {
        let bar = util::bar(members as u64, "join");
        for (i, (client, _)) in clients.iter().enumerate() {
            api.join_group(&token(client)?, users[i + 1].0, &group)
                .await?;
            bar.inc(1);
        }
        bar.finish_and_clear();
    }

    let flow = Arc::new(Flow::default());
    let total = (members * messages) as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120 + total / 1_000);
    let mut receivers = Vec::new();
    for (client, mut events) in clients {
        let flow = flow.clone();
        let conv = conv.clone();
        receivers.push(tokio::spawn(async move {
            let mut hist = util::histogram();
            let mut got = 0;
            while got < messages {
                match tokio::time::timeout_at(deadline, events.next()).await {
                    Ok(Some(ClientEvent::Message(m))) if m.conv == conv => {
                        if let Some(us) = util::latency_us(&m.body) {
                            let _ = hist.record(us.max(1));
                        }
                        got += 1;
                        flow.delivered_one();
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            (client, hist)
        }));
    }
    // The sender's own events (its acks, its copy of each message): drained, counted.
    let acked = Arc::new(Counter::default());
    let acks = {
        let acked = acked.clone();
        tokio::spawn(async move {
            while let Some(event) = sender_events.next().await {
                if matches!(event, ClientEvent::Acked { .. }) {
                    acked.add(1);
                }
            }
        })
    };

    let bar = util::bar(total, "deliveries");
    let cpu0 = broker_pid.and_then(util::cpu_seconds);
    let started = util::now();
    let progress = {
        let flow = flow.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(flow.delivered.get());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    for sent in 0..messages as u64 {
        flow.wait_window(sent, members as u64, args.window as u64, deadline)
            .await;
        let body = util::stamped_body(util::stamp(), args.payload);
        sender.submit(conv.clone(), body).await.context("submit")?;
    }
    flow.wait_all(total, deadline).await;
    let secs = started.elapsed().as_secs_f64();
    let cpu1 = broker_pid.and_then(util::cpu_seconds);
    progress.abort();
    bar.finish_and_clear();

    let mut latency_us = util::histogram();
    for r in receivers {
        let (client, hist) = r.await?;
        latency_us.add(&hist).context("merge histograms")?;
        client.shutdown().await;
    }
    sender.shutdown().await;
    acks.abort();
    Ok(FanoutResult {
        system: system.to_owned(),
        delivered: flow.delivered.get(),
        expected: total,
        secs,
        latency_us,
        broker_cpu: cpu0.zip(cpu1).map(|(a, b)| b - a),
    })
}

/// Only used to build a body on the sender side of other systems.
pub fn body(payload: usize) -> Bytes {
    util::stamped_body(util::stamp(), payload)
}
