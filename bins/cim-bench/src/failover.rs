//! `failover`: N clients on two server processes (Redis with AOF everysec, ZooKeeper, a route
//! process), some of them sending private messages all along; SIGKILL one server; time until
//! every client is online again, and acknowledged messages lost (must be 0: every message
//! whose send was acknowledged reaches its receiver, through pushes or the sync after the
//! reconnect).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use cim_core::client::ClientEvent;
use cim_core::ids::ConvId;

use crate::procs;
use crate::util::{self, Table, f2, int};

#[derive(clap::Args, Debug, Clone)]
pub struct FailoverArgs {
    /// Clients [default: 10000; --quick 40].
    #[arg(long)]
    pub clients: Option<usize>,
    /// Pairs of them that keep sending to each other through the failover [default: 100; --quick 5].
    #[arg(long)]
    pub pairs: Option<usize>,
    /// The servers' ZooKeeper session timeout (how long a dead server stays listed).
    #[arg(long, default_value = "6s")]
    pub zk_session_timeout: String,
    /// The route's argon2 cost: `owasp` is production's, where every password check costs
    /// tens of milliseconds of route CPU [default: test].
    #[arg(long, value_enum)]
    pub argon2: Option<crate::cluster::Argon2Cost>,
    /// Issue no resumption secrets, so every re-home checks the password (the behaviour
    /// before resumption, for comparison).
    #[arg(long)]
    pub no_resumption: bool,
    /// Print how many clients are online (and still on the killed server) every second.
    #[arg(long)]
    pub timeline: bool,
}

/// One client as the scenario watches it.
#[derive(Debug, Default)]
struct Watch {
    online: AtomicBool,
    /// 1-based index of its server, or 0.
    server: AtomicU64,
    /// [`util::stamp`] of its latest `Online`.
    online_at: AtomicU64,
}

pub async fn run(args: &FailoverArgs, quick: bool) -> anyhow::Result<Table> {
    let n = args.clients.unwrap_or(if quick { 40 } else { 10_000 });
    let pairs = args.pairs.unwrap_or(if quick { 5 } else { 100 }).min(n / 2);
    let setup = procs::RouteSetup {
        argon2: args.argon2,
        no_resumption: args.no_resumption,
    };
    let deployment = procs::deploy_with(2, &args.zk_session_timeout, &setup).await?;
    let route = deployment.route.clone();
    let tag = util::run_tag();
    let users = util::register_users(&route, &format!("fv{tag}"), n, 64).await?;
    let clients = util::start_clients_on(cim_io::net::TokioNet, &route, &users, 64).await?;

    let watches: Arc<Vec<Watch>> = Arc::new((0..n).map(|_| Watch::default()).collect());
    let received: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for (i, (client, mut events, server)) in clients.into_iter().enumerate() {
        let watches = watches.clone();
        let received = received.clone();
        watches[i].online.store(true, Ordering::Relaxed);
        watches[i]
            .server
            .store(server_index(&server), Ordering::Relaxed);
        tasks.push(tokio::spawn(async move {
            while let Some(event) = events.next().await {
                let w = &watches[i];
                match event {
                    ClientEvent::Online { server, .. } => {
                        w.server
                            .store(server_index(server.as_str()), Ordering::Relaxed);
                        w.online_at.store(util::stamp(), Ordering::Relaxed);
                        w.online.store(true, Ordering::Relaxed);
                    }
                    ClientEvent::Reconnecting { .. }
                    | ClientEvent::Connecting { .. }
                    | ClientEvent::LoggingIn => {
                        w.online.store(false, Ordering::Relaxed);
                    }
                    ClientEvent::Message(m) => {
                        if let Some(id) = m.body.get(8..16) {
                            let id = u64::from_be_bytes(id.try_into().expect("8 bytes"));
                            received.lock().expect("held briefly").insert(id);
                        }
                    }
                    _ => {}
                }
            }
        }));
        handles.push(client);
    }
    let on_killed = watches
        .iter()
        .filter(|w| w.server.load(Ordering::Relaxed) == 2)
        .count();
    // Senders: pair p = clients (2p, 2p+1); 2p sends to 2p+1 every 50 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let next_id = Arc::new(AtomicU64::new(1));
    let mut senders = Vec::new();
    for p in 0..pairs {
        let client = handles[2 * p].clone();
        let conv = ConvId::private(users[2 * p].0, users[2 * p + 1].0).context("pair")?;
        let (stop, acked, next_id) = (stop.clone(), acked.clone(), next_id.clone());
        senders.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let mut body = util::stamped_body(util::stamp(), 16).to_vec();
                body[8..16].copy_from_slice(&id.to_be_bytes());
                if client.send(conv.clone(), body.into()).await.is_ok() {
                    acked.lock().expect("held briefly").insert(id);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(if quick { 1 } else { 3 })).await;

    // SIGKILL s2.
    let mut deployment = deployment;
    let killed_at = util::stamp();
    let kill_started = util::now();
    deployment.servers[1].kill();
    eprintln!("failover: SIGKILLed server s2 with {n} clients on two servers");
    let limit = Duration::from_secs(if quick { 60 } else { 180 });
    let bar = util::bar(n as u64, "online again");
    // Everyone online, none of them on s2 any more (a client on s2 counts as there until
    // its next Online elsewhere).
    let mut rehomed;
    let mut last_tick = u128::MAX;
    let recovered = loop {
        let online = watches
            .iter()
            .filter(|w| w.online.load(Ordering::Relaxed))
            .count();
        rehomed = watches
            .iter()
            .filter(|w| w.online_at.load(Ordering::Relaxed) > killed_at)
            .count();
        bar.set_position(online as u64);
        let on_s2 = watches
            .iter()
            .filter(|w| w.online.load(Ordering::Relaxed) && w.server.load(Ordering::Relaxed) == 2)
            .count();
        let tick = kill_started.elapsed().as_millis();
        if args.timeline && tick / 1000 != last_tick {
            last_tick = tick / 1000;
            eprintln!(
                "t={last_tick:>3}s online {online:>6} still on s2 {on_s2:>6} re-homed {rehomed:>6}"
            );
        }
        if online == n && on_s2 == 0 {
            break Some(kill_started.elapsed());
        }
        if kill_started.elapsed() > limit {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    bar.finish_and_clear();
    if args.timeline {
        // The route's login outcomes by code: a slow tail shows up here (5000 = repeat login).
        let addr = route.addr().parse()?;
        let metrics = procs::http_get(addr, "/metrics").await.unwrap_or_default();
        for line in metrics.lines().filter(|l| {
            l.starts_with("cim_route_logins_total") || l.starts_with("cim_route_takeover")
        }) {
            eprintln!("{line}");
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        let _ = tokio::time::timeout(Duration::from_secs(10), s).await;
    }
    // Every acknowledged message must arrive (pushes, or the sync after a reconnect).
    let deadline = util::now() + Duration::from_secs(15);
    let lost = loop {
        let acked = acked.lock().expect("held briefly").clone();
        let got = received.lock().expect("held briefly").clone();
        let lost = acked.difference(&got).count();
        if lost == 0 || util::now() > deadline {
            break (lost, acked.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for c in handles {
        c.shutdown().await;
    }
    for t in tasks {
        t.abort();
    }
    let mut table = Table::new(
        format!(
            "failover: {n} clients on two server processes, SIGKILL one (Redis AOF everysec, ZooKeeper session timeout {}; {}; re-homes by {})",
            args.zk_session_timeout,
            args.argon2
                .unwrap_or(crate::cluster::Argon2Cost::Test)
                .label(),
            if args.no_resumption {
                "password"
            } else {
                "resumption secret"
            },
        ),
        &[
            "clients",
            "on the killed server",
            "re-homed",
            "all online again after s",
            "acked messages",
            "acked lost",
        ],
    );
    table.row(vec![
        int(n as f64),
        int(on_killed as f64),
        int(rehomed as f64),
        recovered.map_or(format!("not within {limit:?}"), |d| f2(d.as_secs_f64())),
        int(lost.1 as f64),
        lost.0.to_string(),
    ]);
    if lost.0 > 0 || recovered.is_none() {
        println!("{}", table.render());
    }
    if lost.0 > 0 {
        bail!("{} acknowledged messages were lost", lost.0);
    }
    if recovered.is_none() {
        bail!("not every client was online again within {limit:?}");
    }
    Ok(table)
}

fn server_index(id: &str) -> u64 {
    id.trim_start_matches('s').parse().unwrap_or(0)
}
