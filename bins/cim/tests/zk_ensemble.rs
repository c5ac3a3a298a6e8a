//! A route and two servers (processes) registered on a three-member ZooKeeper ensemble,
//! clients chatting under a steady load, and the ensemble losing members:
//!
//! - one member dies (the leader, then a follower holding client connections): nothing
//!   notices — no fence, no unlisting, no refused login, no lost message, no client drops;
//! - a second one dies (no quorum): servers fence their clients, the route refuses logins
//!   with 7100 (no server available) and reports the registry on `/health`; nothing
//!   acknowledged is lost;
//! - one comes back (quorum again): servers register again, logins succeed, clients come
//!   back and catch up, every acknowledged message exactly once and in order.
//!
//! One ensemble for the whole binary (three JVMs take seconds to start), so one test. It
//! prints what it measured; run it with `--nocapture` to see the figures.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cim_core::client::{ConnectionLoss, LoginFailure};
use cim_core::ids::{ConvId, UserId};
use cim_core::route::login::LoginError;
use cim_io::api;
use cim_io::net::TokioNet;
use cim_io::registry::SessionHealth;
use cim_io::sdk::{ApiError, RouteApi};
use cim_proto::KickReason;
use cim_testkit::{ZkEnsemble, ZkMode};
use hyper::Method;
use tokio::time::Instant;

use support::{AckedByConv, Cluster, PASSWORD, Recorder, ZkSetup, take_recorder, wait_until};

/// The production default: servers call their session lost after half of it (3 s) without
/// the ensemble, which an election and a reconnect must stay well within.
const SESSION_TIMEOUT: &str = "6s";
const USERS: usize = 6;
/// Each sender's pause between messages: about 60 messages a second in all.
const SEND_EVERY: Duration = Duration::from_millis(100);
/// How long the load runs after one member's death to show that nothing noticed: longer
/// than the session timeout.
const WATCH: Duration = Duration::from_secs(8);

/// One login attempt of the prober, and when it was answered.
#[derive(Debug, Clone)]
struct Probe {
    at: Instant,
    took: Duration,
    /// `"9000"`, a CIM code, or `"transport: ..."` for no answer in time.
    outcome: String,
}

/// Logs a dedicated account in (and out again) through the route every 200 ms, recording
/// every answer: a hang shows as a transport error after the API timeout (5 s).
fn spawn_prober(
    api: RouteApi<TokioNet>,
    user: UserId,
    stop: Arc<AtomicBool>,
) -> Arc<Mutex<Vec<Probe>>> {
    let probes: Arc<Mutex<Vec<Probe>>> = Arc::default();
    let out = probes.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let request = api::LoginRequest {
                resume_secret: None,
                user_id: user.0,
                user_name: "prober".into(),
                password: PASSWORD.into(),
                resume_token: None,
            };
            let outcome = match api.login(&request).await {
                Ok(answer) => {
                    // Out again at once, so the next login is a fresh one, not a repeat.
                    let _ = api.offline(&answer.token, user).await;
                    api::CODE_OK.to_owned()
                }
                Err(ApiError::Status { code, .. }) => code,
                Err(other) => format!("transport: {other}"),
            };
            // Not `unwrap`: a failed assertion holding the lock would bury itself under a
            // second panic here.
            out.lock().unwrap_or_else(|e| e.into_inner()).push(Probe {
                at: Instant::now(),
                took: started.elapsed(),
                outcome,
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    probes
}

/// The value of the first `/metrics` line starting with `name` (a full series, labels
/// included) on `port`; 0 when absent.
async fn metric(port: u16, name: &str) -> f64 {
    let http =
        cim_io::http_client::HttpClient::new(TokioNet, "127.0.0.1", port, Duration::from_secs(5));
    let (_, body) = http
        .request(Method::GET, "/metrics", None, None)
        .await
        .unwrap_or_else(|e| panic!("/metrics on {port}: {e}"));
    String::from_utf8_lossy(&body)
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0)
}

/// What the servers and the route have counted that a member's death must not move.
#[derive(Debug, Clone, PartialEq)]
struct Disturbance {
    /// Per server: registry sessions lost, sessions fenced, connections refused.
    servers: Vec<(f64, f64, f64)>,
    /// The route: servers in its view, links up, 7100 answers. (Not its count of view
    /// changes: servers publish their connection counts through the registry.)
    route: (f64, f64, f64),
}

async fn disturbance(cluster: &Cluster) -> Disturbance {
    let mut servers = Vec::new();
    for s in &cluster.servers {
        servers.push((
            metric(s.http_port, "cim_server_registry_sessions_lost_total").await,
            metric(s.http_port, "cim_server_fenced_total").await,
            metric(s.http_port, "cim_server_refused_connections_total").await,
        ));
    }
    let route = cluster.routes[0].port;
    Disturbance {
        servers,
        route: (
            metric(route, "cim_route_servers_live").await,
            metric(route, "cim_route_links_up").await,
            metric(route, "cim_route_logins_total{result=\"7100\"}").await,
        ),
    }
}

/// Whether the server's client port closes a new connection at once (a withdrawn server
/// refuses clients) rather than wait for its login (10 s by default).
async fn refuses_clients(port: u16) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return true;
    };
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Runs a blocking ensemble call (it polls with `std::thread::sleep`) off the runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

/// Asserts that the window since `from` left every client, the servers and the route
/// untouched: the same counters, no client event of a lost link, every probe a success.
fn assert_unnoticed(
    what: &str,
    view_sets: &[(Instant, usize)],
    recorders: &[Recorder],
    probes: &[Probe],
    from: Instant,
    before: &Disturbance,
    after: &Disturbance,
) {
    assert_eq!(before, after, "{what}: a server or the route noticed");
    for (at, n) in view_sets.iter().filter(|(at, _)| *at >= from) {
        assert_eq!(
            *n,
            2,
            "{what}: a server left the registry view at {:?}",
            *at - from
        );
    }
    for (i, r) in recorders.iter().enumerate() {
        let seen = r.seen.lock().unwrap();
        // `User::start` took the first `Online`: any recorded one is a new session.
        assert!(seen.online_at.is_empty(), "{what}: u{i} came online again");
        assert!(
            seen.kicks.is_empty(),
            "{what}: u{i} was kicked: {:?}",
            seen.kicks
        );
        assert!(
            seen.reconnecting.is_empty(),
            "{what}: u{i} lost its link: {:?}",
            seen.reconnecting
        );
    }
    let window: Vec<&Probe> = probes.iter().filter(|p| p.at >= from).collect();
    assert!(
        window.len() >= 5,
        "{what}: too few logins probed: {window:?}"
    );
    for p in &window {
        assert_eq!(
            p.outcome,
            api::CODE_OK,
            "{what}: a login was refused: {p:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ensemble_member_dies_unnoticed_a_lost_quorum_fences_and_all_recovers() {
    let Some(ensemble) = blocking(ZkEnsemble::start).await else {
        return;
    };
    let ensemble = Arc::new(ensemble);
    println!(
        "ensemble {} up in {:?}",
        ensemble.connect_string(),
        ensemble.startup
    );
    let setup = ZkSetup {
        connect: ensemble.connect_string(),
        session_timeout: SESSION_TIMEOUT,
        proxied: false,
    };
    let Some(mut cluster) = Cluster::start_on("ensemble", setup, 1).await else {
        return;
    };
    let route_port = cluster.routes[0].port;
    let api = cluster.api(0);

    // Users on both servers, all in one group; each also writes to the next one privately.
    let mut users = Vec::new();
    for i in 0..USERS {
        users.push(cluster.user(&format!("u{i}"), 0).await);
    }
    let on: BTreeSet<String> = users
        .iter()
        .map(|u| u.server.as_ref().unwrap().as_str().to_owned())
        .collect();
    assert_eq!(on.len(), 2, "users on both servers: {on:?}");
    let group = ConvId::group("load").unwrap();
    let token = |u: &support::User| u.client().token().expect("logged in");
    api.create_group(&token(&users[0]), users[0].id, "load")
        .await
        .unwrap();
    for u in &users[1..] {
        api.join_group(&token(u), u.id, "load").await.unwrap();
    }
    let prober = api.register("prober", PASSWORD).await.unwrap();
    let recorders: Vec<Recorder> = users.iter_mut().map(take_recorder).collect();
    let ids: Vec<UserId> = users.iter().map(|u| u.id).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<AckedByConv>> = Arc::default();
    let mut senders = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let client = user.client().clone();
        let acked = acked.clone();
        let private = ConvId::private(ids[i], ids[(i + 1) % USERS]).unwrap();
        let group = group.clone();
        let stop = stop.clone();
        senders.push(tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let conv = if k.is_multiple_of(2) {
                    group.clone()
                } else {
                    private.clone()
                };
                let body = Bytes::from(format!("u{i} #{k}"));
                // Waits through a reconnect: the outbox resends with the same id.
                let ack = client.send(conv.clone(), body).await.expect("send acked");
                acked
                    .lock()
                    .unwrap()
                    .entry(conv)
                    .or_default()
                    .insert((ack.seq, ack.msg_id));
                k += 1;
                tokio::time::sleep(SEND_EVERY).await;
            }
        }));
    }
    let acked_count = || {
        acked
            .lock()
            .unwrap()
            .values()
            .map(BTreeSet::len)
            .sum::<usize>()
    };
    let probes = spawn_prober(cluster.api(0), UserId(prober.user_id), stop.clone());
    wait_until(Duration::from_secs(20), "the load is flowing", || async {
        acked_count() >= 30
    })
    .await;
    // A view of the registry as a route has one (the same code, its own session), recording
    // every server set it shows: no server may leave it while one member is down.
    let view = cluster.registry_view().await;
    let view_sets: Arc<Mutex<Vec<(Instant, usize)>>> = Arc::default();
    {
        let mut servers = view.servers();
        let sets = view_sets.clone();
        tokio::spawn(async move {
            while servers.changed().await.is_ok() {
                let n = servers.borrow_and_update().len();
                sets.lock().unwrap().push((Instant::now(), n));
            }
        });
    }
    assert_eq!(view.snapshot().len(), 2);
    // And how long its session goes without the ensemble, each time.
    let outages: Arc<Mutex<Vec<Duration>>> = Arc::default();
    {
        let mut health = view.health();
        let outages = outages.clone();
        tokio::spawn(async move {
            let mut since = None;
            while health.changed().await.is_ok() {
                let now = *health.borrow_and_update();
                match now {
                    SessionHealth::Connected => {
                        if let Some(at) = since.take() {
                            outages.lock().unwrap().push(Instant::now() - at);
                        }
                    }
                    _ => {
                        since.get_or_insert(Instant::now());
                    }
                }
            }
        });
    }
    let calm = disturbance(&cluster).await;
    assert_eq!(calm.route.0, 2.0, "both servers in the route's view");

    // (a1) The leader dies.
    let leader = ensemble.leader().expect("a leader");
    let a1 = Instant::now();
    ensemble.kill(leader);
    let e = ensemble.clone();
    blocking(move || e.wait_for_quorum(Duration::from_secs(30), 2))
        .await
        .expect("the two others elect a leader");
    let elected = a1.elapsed();
    tokio::time::sleep(WATCH.saturating_sub(a1.elapsed())).await;
    let after = disturbance(&cluster).await;
    assert_unnoticed(
        "leader killed",
        &view_sets.lock().unwrap(),
        &recorders,
        &probes.lock().unwrap(),
        a1,
        &calm,
        &after,
    );
    println!(
        "(a1) leader (member {}) SIGKILLed: new leader in {elected:?}, the test's own ZooKeeper session cut off for {:?} (None: it was not on that member); nothing noticed in {WATCH:?} ({} acks so far)",
        leader + 1,
        outages.lock().unwrap().drain(..).max(),
        acked_count()
    );
    ensemble.restart(leader).expect("restart the old leader");
    let e = ensemble.clone();
    blocking(move || e.wait_for_quorum(Duration::from_secs(30), 3))
        .await
        .expect("all three serve again");

    // (a2) A member holding client connections dies: the busiest follower if a follower
    // holds any (the leader's death was (a1)), else the leader again.
    let leader = ensemble.leader().expect("a leader");
    let loads: Vec<(usize, u64)> = (0..3)
        .map(|m| (m, ensemble.connections(m).unwrap_or(0)))
        .collect();
    let (busiest, connections) = *loads
        .iter()
        .max_by_key(|&&(m, n)| (n > 0 && m != leader, n))
        .unwrap();
    assert!(
        connections > 0,
        "no member holds a client connection: {loads:?}"
    );
    let role = if busiest == leader {
        "leader"
    } else {
        "follower"
    };
    let a2 = Instant::now();
    ensemble.kill(busiest);
    tokio::time::sleep(WATCH).await;
    let after = disturbance(&cluster).await;
    assert_unnoticed(
        "the busiest member killed",
        &view_sets.lock().unwrap(),
        &recorders,
        &probes.lock().unwrap(),
        a2,
        &calm,
        &after,
    );
    println!(
        "(a2) member {} ({role}) with {connections} of {} client connections SIGKILLed: the test's own ZooKeeper session cut off for {:?} (None: it was not on that member); nothing noticed in {WATCH:?} ({} acks so far)",
        busiest + 1,
        loads.iter().map(|(_, n)| n).sum::<u64>(),
        outages.lock().unwrap().drain(..).max(),
        acked_count()
    );

    // (b) A second member dies: no quorum.
    let second = (0..3)
        .find(|&m| m != busiest && ensemble.is_running(m))
        .expect("two members run");
    let acked_before_b = acked.lock().unwrap().clone();
    let b = Instant::now();
    ensemble.kill(second);
    let last = (0..3).find(|&m| ensemble.is_running(m)).unwrap();
    // Every client is fenced by its server...
    for (i, r) in recorders.iter().enumerate() {
        r.wait_for(
            Duration::from_secs(30),
            &format!("u{i} fenced after the quorum loss"),
            |seen| seen.kicks.iter().any(|(_, k)| *k == KickReason::Fenced),
        )
        .await;
    }
    let mut fenced_after: BTreeMap<String, Duration> = BTreeMap::new();
    for (r, user) in recorders.iter().zip(&users) {
        let seen = r.seen.lock().unwrap();
        let at = seen
            .kicks
            .iter()
            .find(|(_, k)| *k == KickReason::Fenced)
            .unwrap()
            .0;
        // Where it has been since its start: phase (a) showed it never moved.
        let server = user.server.as_ref().unwrap().as_str().to_owned();
        let entry = fenced_after.entry(server).or_insert(at - b);
        *entry = (*entry).min(at - b);
    }
    // ... and the route refuses logins with 7100, answering at once, not hanging.
    wait_until(
        Duration::from_secs(20),
        "the route answers logins 7100",
        || async {
            probes
                .lock()
                .unwrap()
                .last()
                .is_some_and(|p| p.at > b && p.outcome == api::CODE_NO_SERVER)
        },
    )
    .await;
    let refusing_after = probes
        .lock()
        .unwrap()
        .iter()
        .find(|p| p.at > b && p.outcome == api::CODE_NO_SERVER)
        .unwrap()
        .at
        - b;
    assert_eq!(
        support::health(route_port).await,
        Some(503),
        "/health says degraded"
    );
    for s in &cluster.servers {
        assert_eq!(
            support::health(s.http_port).await,
            Some(503),
            "server /health"
        );
        assert!(
            refuses_clients(s.client_port).await,
            "{} accepts clients",
            s.id
        );
    }
    // Hold the outage a little: it stays honest.
    let hold_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        ensemble.mode(last),
        Some(ZkMode::NotServing),
        "still no quorum"
    );
    {
        let probes = probes.lock().unwrap();
        let outage: Vec<&Probe> = probes.iter().filter(|p| p.at >= hold_from).collect();
        assert!(outage.len() >= 5, "{outage:?}");
        for p in outage {
            assert_eq!(p.outcome, api::CODE_NO_SERVER, "during the outage: {p:?}");
            assert!(
                p.took < Duration::from_secs(1),
                "a refusal took {:?}",
                p.took
            );
        }
        for p in probes.iter().filter(|p| p.at > b) {
            assert!(
                p.outcome == api::CODE_OK || p.outcome == api::CODE_NO_SERVER,
                "after the quorum loss a login ended {p:?}"
            );
        }
    }
    // The fenced clients' own logins meet the same refusal.
    let refused_clients = recorders
        .iter()
        .filter(|r| {
            r.seen
                .lock()
                .unwrap()
                .reconnecting
                .iter()
                .any(|(_, cause)| {
                    matches!(
                        cause,
                        ConnectionLoss::LoginFailed(LoginFailure::Rejected(
                            LoginError::NoServerAvailable
                        ))
                    )
                })
        })
        .count();
    assert!(refused_clients > 0, "no client's login met 7100");
    let out = disturbance(&cluster).await;
    for (i, (lost, _, _)) in out.servers.iter().enumerate() {
        assert_eq!(
            *lost,
            calm.servers[i].0 + 1.0,
            "server {i} lost its session once"
        );
    }
    println!(
        "(b) second member {} SIGKILLed (no quorum): servers fenced after {fenced_after:?}, \
         the route answered 7100 after {refusing_after:?} ({refused_clients} clients refused too)",
        second + 1
    );

    // (c) One member comes back: quorum again.
    ensemble.restart(second).expect("restart a member");
    let c = Instant::now();
    let e = ensemble.clone();
    blocking(move || e.wait_for_quorum(Duration::from_secs(30), 2))
        .await
        .expect("a quorum again");
    let quorum_after = c.elapsed();
    wait_until(
        Duration::from_secs(30),
        "a probed login succeeds",
        || async {
            probes
                .lock()
                .unwrap()
                .last()
                .is_some_and(|p| p.at > c && p.outcome == api::CODE_OK)
        },
    )
    .await;
    let logins_after = c.elapsed();
    for (i, r) in recorders.iter().enumerate() {
        r.wait_for(
            Duration::from_secs(30),
            &format!("u{i} back online"),
            |seen| seen.online_at.last().is_some_and(|at| *at > c),
        )
        .await;
    }
    let clients_after = c.elapsed();
    wait_until(
        Duration::from_secs(30),
        "route and servers healthy",
        || async {
            let mut ok = support::health(route_port).await == Some(200);
            for s in &cluster.servers {
                ok &= support::health(s.http_port).await == Some(200);
            }
            ok
        },
    )
    .await;
    let healthy_after = c.elapsed();
    for s in &cluster.servers {
        assert!(
            !refuses_clients(s.client_port).await,
            "{} refuses clients",
            s.id
        );
    }
    // Messages flow again, then the load stops and every send settles.
    let resumed = acked_count();
    wait_until(Duration::from_secs(30), "the load flows again", || async {
        acked_count() >= resumed + 30
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for (i, s) in senders.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .unwrap_or_else(|_| panic!("u{i}'s last send not acked within 30 s"))
            .unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    for (conv, before) in &acked_before_b {
        assert!(
            before.is_subset(&acked[conv]),
            "{conv}: an ack was taken back"
        );
    }
    // Every member of each conversation has exactly the acknowledged messages, in order.
    let total: usize = acked.values().map(BTreeSet::len).sum();
    support::assert_each_member_has_exactly_the_acked(
        &acked,
        &ids,
        &recorders,
        Duration::from_secs(30),
    )
    .await;
    let end = disturbance(&cluster).await;
    assert_eq!(end.route.0, 2.0, "both servers back in the route's view");
    println!(
        "(c) member {} restarted: quorum in {quorum_after:?}, logins succeed after {logins_after:?}, \
         every client online after {clients_after:?}, /health ok after {healthy_after:?}; \
         {total} messages acked, each delivered to every member exactly once in order",
        second + 1
    );
    cluster.assert_all_running();
}
