//! `compare`: the fan-out shape (one publisher, M subscribers, same payload, same closed-loop
//! window) against our cluster, `nats-server` (core NATS, no JetStream) and `mosquitto`
//! (QoS 0 and QoS 1), each broker started by the bench on a loopback port from Debian's
//! packages, driven with established client crates (async-nats, rumqttc). Prints each
//! system's figures, our ratio to each, and draws the chart.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::cluster::{ChildProc, Setup};
use crate::fanout::{FanoutArgs, FanoutResult, Flow};
use crate::util::{self, Table, f2};

#[derive(clap::Args, Debug, Clone)]
pub struct CompareArgs {
    #[command(flatten)]
    pub fanout: FanoutArgs,
    /// Where to draw the chart.
    #[arg(long, default_value = "bench-fanout.png")]
    pub chart: PathBuf,
    /// Skip a system (cim-rs, nats, mqtt0, mqtt1); repeatable.
    #[arg(long)]
    pub skip: Vec<String>,
}

pub async fn run(args: &CompareArgs, setup: &Setup, quick: bool) -> anyhow::Result<Vec<Table>> {
    let mut results = Vec::new();
    let skip = |s: &str| args.skip.iter().any(|x| x == s);
    if !skip("cim-rs") {
        let target = crate::cluster::start(setup)?;
        eprintln!("compare: cim-rs ({})", target.label);
        let pid = target.cluster.as_ref().map(ChildProc::pid);
        let name = if setup.redis {
            "cim-rs (Redis)"
        } else {
            "cim-rs (embedded)"
        };
        results.push(crate::fanout::run_ours(&target.route, &args.fanout, quick, pid, name).await?);
    }
    if !skip("nats") {
        eprintln!("compare: nats-server");
        results.push(run_nats(&args.fanout, quick).await?);
    }
    for (label, qos) in [("mqtt0", QoS::AtMostOnce), ("mqtt1", QoS::AtLeastOnce)] {
        if !skip(label) {
            eprintln!("compare: mosquitto {qos:?}");
            results.push(run_mqtt(&args.fanout, quick, qos).await?);
        }
    }
    let members = args.fanout.members(quick);
    let label = format!(
        "one publisher, {members} subscribers, {} messages of {} B, window {}; measured on a shared 2-core machine",
        args.fanout.messages(quick),
        args.fanout.payload,
        args.fanout.window
    );
    let mut tables = vec![crate::fanout_table(&label, &results)?];
    if let Some(ours) = results.iter().find(|r| r.system.starts_with("cim-rs")) {
        let mut ratios = Table::new(
            "cim-rs / other (deliveries per second; latency p99; CPU per delivery)",
            &["vs", "throughput ratio", "p99 ratio", "CPU ratio"],
        );
        for other in results.iter().filter(|r| !r.system.starts_with("cim-rs")) {
            let p99 = |r: &FanoutResult| util::percentiles_ms(&r.latency_us)[1];
            ratios.row(vec![
                other.system.clone(),
                f2(ours.per_sec() / other.per_sec()),
                f2(p99(ours) / p99(other).max(1e-6)),
                match (ours.cpu_per_million(), other.cpu_per_million()) {
                    (Some(a), Some(b)) if b > 0.0 => f2(a / b),
                    _ => "-".into(),
                },
            ]);
        }
        tables.push(ratios);
    }
    crate::chart::draw(&args.chart, &label, &results)?;
    eprintln!("chart written to {}", args.chart.display());
    Ok(tables)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} did not listen on {port} within 10 s")
}

fn spawn(mut cmd: Command, what: &str) -> anyhow::Result<ChildProc> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {what} (Debian: apt-get install {what})"))?;
    Ok(ChildProc { child })
}

async fn run_nats(args: &FanoutArgs, quick: bool) -> anyhow::Result<FanoutResult> {
    let port = free_port()?;
    let mut cmd = Command::new("nats-server");
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string()]);
    let broker = spawn(cmd, "nats-server")?;
    wait_port(port, "nats-server").await?;
    let url = format!("nats://127.0.0.1:{port}");
    let members = args.members(quick);
    let messages = args.messages(quick);
    let subject = "bench.fanout";
    let flow = Arc::new(Flow::default());
    let total = (members * messages) as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120 + total / 1_000);
    let mut receivers = Vec::new();
    for _ in 0..members {
        let client = async_nats::connect(&url).await.context("NATS connect")?;
        let mut sub = client.subscribe(subject).await.context("NATS subscribe")?;
        client.flush().await?;
        let flow = flow.clone();
        receivers.push(tokio::spawn(async move {
            let _client = client;
            let mut hist = util::histogram();
            let mut got = 0;
            while got < messages {
                match tokio::time::timeout_at(deadline, sub.next()).await {
                    Ok(Some(m)) => {
                        if let Some(us) = util::latency_us(&m.payload) {
                            let _ = hist.record(us.max(1));
                        }
                        got += 1;
                        flow.delivered_one();
                    }
                    _ => break,
                }
            }
            hist
        }));
    }
    let publisher = async_nats::connect(&url).await?;
    let result = drive(
        args,
        quick,
        &flow,
        deadline,
        broker.pid(),
        "NATS (core)",
        |body| {
            let publisher = publisher.clone();
            async move {
                publisher.publish(subject, body).await?;
                publisher.flush().await?;
                Ok(())
            }
        },
    )
    .await?;
    finish(result, receivers).await
}

async fn run_mqtt(args: &FanoutArgs, quick: bool, qos: QoS) -> anyhow::Result<FanoutResult> {
    let port = free_port()?;
    let dir =
        std::env::temp_dir().join(format!("cim-bench-mosquitto-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("mosquitto.conf");
    // Queues big enough for the closed-loop window: nothing is dropped for want of space.
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_queued_messages 100000\nmax_inflight_messages 0\nlog_dest none\n\
             set_tcp_nodelay true\n"
        ),
    )?;
    let mut cmd = Command::new("mosquitto");
    cmd.arg("-c").arg(&conf);
    let broker = spawn(cmd, "mosquitto")?;
    wait_port(port, "mosquitto").await?;
    let members = args.members(quick);
    let messages = args.messages(quick);
    let topic = "bench/fanout";
    let flow = Arc::new(Flow::default());
    let total = (members * messages) as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120 + total / 1_000);
    let mut receivers = Vec::new();
    for i in 0..members {
        let mut options = MqttOptions::new(format!("sub-{i}"), "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(1000);
        let (client, mut eventloop) = mqtt_client(options, 1000);
        client.subscribe(topic, qos).await?;
        // Wait for the SUBACK, so no message is published before the subscription exists.
        loop {
            match eventloop.poll().await.context("MQTT subscribe")? {
                Event::Incoming(Packet::SubAck(_)) => break,
                _ => continue,
            }
        }
        let flow = flow.clone();
        receivers.push(tokio::spawn(async move {
            let _client = client;
            let mut hist = util::histogram();
            let mut got = 0;
            while got < messages {
                match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                    Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        if let Some(us) = util::latency_us(&p.payload) {
                            let _ = hist.record(us.max(1));
                        }
                        got += 1;
                        flow.delivered_one();
                    }
                    Ok(Ok(_)) => {}
                    _ => break,
                }
            }
            // Keep acking (QoS 1) until the end of the run.
            let until = tokio::time::Instant::now() + Duration::from_millis(200);
            while tokio::time::timeout_at(until, eventloop.poll())
                .await
                .is_ok()
            {}
            hist
        }));
    }
    let mut options = MqttOptions::new("publisher", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(1000);
    let (publisher, mut eventloop) = mqtt_client(options, 10_000);
    let pump = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let name = match qos {
        QoS::AtMostOnce => "Mosquitto QoS 0",
        _ => "Mosquitto QoS 1",
    };
    let result = drive(args, quick, &flow, deadline, broker.pid(), name, |body| {
        let publisher = publisher.clone();
        async move {
            publisher.publish_bytes(topic, qos, false, body).await?;
            Ok(())
        }
    })
    .await?;
    pump.abort();
    let _ = std::fs::remove_dir_all(&dir);
    finish(result, receivers).await
}

/// The publisher's side, shared by the brokers: the same window and timing as ours.
#[allow(clippy::too_many_arguments)]
async fn drive<F, Fut>(
    args: &FanoutArgs,
    quick: bool,
    flow: &Flow,
    deadline: tokio::time::Instant,
    broker_pid: u32,
    system: &str,
    publish: F,
) -> anyhow::Result<FanoutResult>
where
    F: Fn(bytes::Bytes) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let members = args.members(quick) as u64;
    let messages = args.messages(quick) as u64;
    let total = members * messages;
    let bar = util::bar(total, "deliveries");
    let cpu0 = util::cpu_seconds(broker_pid);
    let started = util::now();
    for sent in 0..messages {
        flow.wait_window(sent, members, args.window as u64, deadline)
            .await;
        bar.set_position(flow.delivered.get());
        publish(crate::fanout::body(args.payload)).await?;
    }
    flow.wait_all(total, deadline).await;
    let secs = started.elapsed().as_secs_f64();
    let cpu1 = util::cpu_seconds(broker_pid);
    bar.finish_and_clear();
    Ok(FanoutResult {
        system: system.into(),
        delivered: flow.delivered.get(),
        expected: total,
        secs,
        latency_us: util::histogram(),
        broker_cpu: cpu0.zip(cpu1).map(|(a, b)| b - a),
    })
}

async fn finish(
    mut result: FanoutResult,
    receivers: Vec<tokio::task::JoinHandle<hdrhistogram::Histogram<u64>>>,
) -> anyhow::Result<FanoutResult> {
    for r in receivers {
        result
            .latency_us
            .add(&r.await?)
            .context("merge histograms")?;
    }
    Ok(result)
}

/// An MQTT client with Nagle off, like ours and NATS's: small messages, latency measured.
fn mqtt_client(options: MqttOptions, cap: usize) -> (AsyncClient, rumqttc::EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options, cap);
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}
