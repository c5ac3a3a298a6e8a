//! `login`: logins per second through the route's `POST /login` (argon2 check, claim read,
//! compare-epoch claim write, ticket), each a different registered user, `concurrency` at
//! once. Registrations (one argon2 hash each) are timed too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cim_core::client::ClientEvent;
use cim_core::ids::ConvId;

use anyhow::{Context as _, bail};
use cim_io::api::LoginRequest;
use futures::StreamExt as _;

use crate::cluster::{Argon2Cost, Setup};
use crate::util::{self, PASSWORD, Table, f1, f2, int};

#[derive(clap::Args, Debug, Clone)]
pub struct LoginArgs {
    /// Users (one login each) with the test argon2 parameters [default: 5000; --quick 100].
    #[arg(long)]
    pub users: Option<usize>,
    /// Users with OWASP's parameters, which cost ~20-50 ms of CPU each [default: 200; --quick 10].
    #[arg(long)]
    pub owasp_users: Option<usize>,
    /// Logins in flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Started clusters only: route threads for argon2 (0 = inline on the driver, the old way).
    #[arg(long)]
    pub password_workers: Option<usize>,
}

pub struct LoginFigures {
    pub registrations_per_sec: f64,
    pub logins_per_sec: f64,
    pub failures: usize,
    /// p50/p99/p999 of a private message sent every 20 ms while the logins run: how much
    /// the login burst delays routing.
    pub probe_ms: [f64; 3],
}

pub async fn run(
    args: &LoginArgs,
    base: &Setup,
    redis_modes: &[bool],
    quick: bool,
) -> anyhow::Result<Table> {
    let route = base.route.clone();
    let mut table = Table::new(
        "login: logins per second through the route",
        &[
            "store",
            "argon2",
            "password workers",
            "users",
            "registrations/s",
            "logins/s",
            "failed",
            "p2p p50 / p99 during logins, ms",
        ],
    );
    let costs: Vec<(Argon2Cost, usize)> = if route.is_some() {
        vec![(
            Argon2Cost::Test,
            args.users.unwrap_or(if quick { 100 } else { 5_000 }),
        )]
    } else {
        vec![
            (
                Argon2Cost::Test,
                args.users.unwrap_or(if quick { 100 } else { 5_000 }),
            ),
            (
                Argon2Cost::Owasp,
                args.owasp_users.unwrap_or(if quick { 10 } else { 200 }),
            ),
        ]
    };
    for &redis in redis_modes {
        for &(cost, users) in &costs {
            let setup = Setup {
                // `redis` is the single node; a cluster comes from the base setup.
                redis: redis && !base.redis_cluster,
                argon2: cost,
                password_workers: args.password_workers,
                servers: 2,
                ..base.clone()
            };
            let target = crate::cluster::start(&setup)?;
            eprintln!("login: {} users against {}", users, target.label);
            let figures = measure(&target.route, users, args.concurrency).await?;
            let store = if route.is_some() {
                "(running cluster)".to_owned()
            } else if base.redis_cluster {
                "Redis Cluster AOF everysec".to_owned()
            } else if redis {
                "Redis AOF everysec".to_owned()
            } else {
                "embedded".to_owned()
            };
            table.row(vec![
                store,
                if route.is_some() {
                    "(the cluster's)".into()
                } else {
                    cost.label().into()
                },
                match args.password_workers {
                    Some(0) => "0 (inline)".into(),
                    Some(n) => n.to_string(),
                    None => "default (1 per core)".into(),
                },
                users.to_string(),
                f1(figures.registrations_per_sec),
                int(figures.logins_per_sec),
                figures.failures.to_string(),
                format!("{} / {}", f2(figures.probe_ms[0]), f2(figures.probe_ms[1])),
            ]);
            if route.is_some() {
                return Ok(table);
            }
        }
    }
    Ok(table)
}

pub async fn measure(
    route: &crate::util::Route,
    users: usize,
    concurrency: usize,
) -> anyhow::Result<LoginFigures> {
    let tag = util::run_tag();
    let started = util::now();
    let registered = util::register_users(route, &format!("lg{tag}"), users, concurrency).await?;
    let registrations_per_sec = users as f64 / started.elapsed().as_secs_f64();
    let probe = Probe::start(route, &tag).await?;
    let api = util::route_api(route);
    let bar = util::bar(users as u64, "login");
    let started = util::now();
    let results: Vec<anyhow::Result<()>> =
        futures::stream::iter(registered.iter().map(|(user, name)| {
            let api = api.clone();
            let bar = bar.clone();
            async move {
                let request = LoginRequest {
                    resume_secret: None,
                    user_id: user.0,
                    user_name: name.clone(),
                    password: PASSWORD.into(),
                    resume_token: None,
                };
                api.login(&request)
                    .await
                    .with_context(|| format!("login of {name}"))?;
                bar.inc(1);
                Ok(())
            }
        }))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = started.elapsed();
    bar.finish_and_clear();
    let probe_ms = probe.stop().await?;
    let failures = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
        eprintln!("login: {failures} failed, first: {e:#}");
    }
    if failures == users {
        bail!("every login failed");
    }
    Ok(LoginFigures {
        registrations_per_sec,
        logins_per_sec: (users - failures) as f64
            / elapsed.max(Duration::from_micros(1)).as_secs_f64(),
        failures,
        probe_ms,
    })
}

/// One pair of clients exchanging a message every 20 ms, to see routing while logins run.
struct Probe {
    stop: Arc<AtomicBool>,
    sender: tokio::task::JoinHandle<anyhow::Result<()>>,
    receiver: tokio::task::JoinHandle<hdrhistogram::Histogram<u64>>,
}

impl Probe {
    async fn start(route: &crate::util::Route, tag: &str) -> anyhow::Result<Self> {
        let users = util::register_users(route, &format!("lp{tag}"), 2, 2).await?;
        let mut clients = util::start_clients(route, &users, 2).await?;
        let (b, mut b_events) = clients.pop().context("two clients")?;
        let (a, mut a_events) = clients.pop().context("two clients")?;
        let conv = ConvId::private(users[0].0, users[1].0).context("pair")?;
        let stop = Arc::new(AtomicBool::new(false));
        let sender = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::spawn(async move { while a_events.next().await.is_some() {} });
                while !stop.load(Ordering::Relaxed) {
                    a.submit(conv.clone(), util::stamped_body(util::stamp(), 16))
                        .await
                        .context("probe send")?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                a.shutdown().await;
                Ok(())
            })
        };
        let receiver = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut hist = util::histogram();
                while !stop.load(Ordering::Relaxed) {
                    let next = tokio::time::timeout(Duration::from_millis(100), b_events.next());
                    if let Ok(Some(ClientEvent::Message(m))) = next.await
                        && let Some(us) = util::latency_us(&m.body)
                    {
                        let _ = hist.record(us.max(1));
                    }
                }
                b.shutdown().await;
                hist
            })
        };
        Ok(Self {
            stop,
            sender,
            receiver,
        })
    }

    async fn stop(self) -> anyhow::Result<[f64; 3]> {
        // A message still in flight arrives within the receiver's last wait.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.stop.store(true, Ordering::Relaxed);
        self.sender.await??;
        let hist = self.receiver.await?;
        Ok(util::percentiles_ms(&hist))
    }
}
