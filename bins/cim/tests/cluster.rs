//! The deployment for real: two routes and two servers as processes on a private Redis and
//! ZooKeeper, driven by SDK clients. Each test prints what it measured (run with
//! `--nocapture` to see it).

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cim_core::client::StopReason;
use cim_core::ids::{ClientMsgId, ConvId, UserId};
use cim_io::api;
use cim_io::sdk::ApiError;
use hyper::Method;
use tokio::time::Instant;

use support::{AckedByConv, Cluster, PASSWORD, Recorder, User, take_recorder, wait_until};

fn status_code(result: Result<impl std::fmt::Debug, ApiError>) -> String {
    match result {
        Err(ApiError::Status { code, .. }) => code,
        other => panic!("expected an error envelope, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_logins_takeover_and_spoofing() {
    let Some(cluster) = Cluster::start("accounts").await else {
        return;
    };
    let api = cluster.api(0);
    assert_eq!(
        status_code(api.register("ann smith", PASSWORD).await),
        api::CODE_VALIDATION
    );
    assert_eq!(
        status_code(api.register("ann", "").await),
        api::CODE_VALIDATION
    );
    let mut ann = cluster.user("ann", 0).await;
    assert_eq!(
        status_code(api.register("ann", PASSWORD).await),
        api::CODE_VALIDATION,
        "a taken name is an error"
    );
    let bob = cluster.user("bob", 1).await;

    let ann_id = ann.id;
    let login = |password: &str, resume: Option<String>| api::LoginRequest {
        resume_secret: None,
        user_id: ann_id.0,
        user_name: "ann".into(),
        password: password.into(),
        resume_token: resume,
    };
    assert_eq!(
        status_code(api.login(&login("wrong-password", None)).await),
        api::CODE_ACCOUNT_MISMATCH
    );
    // Ann is online: a second login without her resume token is a repeat login, on either
    // route.
    assert_eq!(
        status_code(cluster.api(1).login(&login(PASSWORD, None)).await),
        api::CODE_REPEAT_LOGIN
    );

    // Spoofing: Bob's token, Ann's id in the body.
    let bob_token = bob.client().token().expect("bob logged in");
    let spoof = serde_json::json!({
        "userId": ann.id.0, "msg": "hi", "clientMsgId": ClientMsgId(7).to_string()
    });
    let (status, body) = cluster
        .http(0)
        .request(
            Method::POST,
            "/groupRoute",
            Some(&bob_token),
            Some(Bytes::from(spoof.to_string())),
        )
        .await
        .unwrap();
    let envelope: api::Envelope<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!((status.as_u16(), envelope.code.as_str()), (403, "3000"));

    // Garbage bodies and missing tokens: typed answers, never a 500.
    for (path, bearer, body, want) in [
        ("/login", None, "{not json", 400),
        ("/login", None, r#"{"userId":"one"}"#, 400),
        ("/registerAccount", None, "[]", 400),
        (
            "/groupRoute",
            None,
            r#"{"userId":1,"msg":"x","clientMsgId":"y"}"#,
            401,
        ),
        ("/groupRoute", Some("forged.token"), "{}", 401),
    ] {
        let (status, body) = cluster
            .http(1)
            .request(Method::POST, path, bearer, Some(Bytes::from(body)))
            .await
            .unwrap();
        assert_eq!(status.as_u16(), want, "{path} {body:?}");
        let envelope: api::Envelope<serde_json::Value> = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{path}: not an envelope ({e}): {body:?}"));
        assert_ne!(envelope.code, api::CODE_OK);
    }

    // Takeover: the resume token from Ann's saved state lets a new login in at once, and the
    // old session is told.
    let state = ann.client().snapshot().await.unwrap();
    let resume = state.resume_token.map(|t| api::encode_resume_token(&t));
    let old = take_recorder(&mut ann);
    let started = Instant::now();
    let answer = cluster
        .api(1)
        .login(&login(PASSWORD, resume))
        .await
        .expect("takeover with the resume token");
    println!("takeover answered in {:?}", started.elapsed());
    assert_eq!(answer.user_id, ann_id.0);
    // The answer was held until the old session was closed, so it already knows.
    old.wait_for(
        Duration::from_secs(10),
        "the old session is taken over",
        |seen| seen.stopped == Some(StopReason::TakenOver),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_stale_tickets_are_refused_on_the_gateway() {
    use cim_core::ids::{Epoch, ServerId, UnixMillis};
    use cim_core::route::tickets::{Grant, TicketKeys};
    use cim_io::net::{self, TokioNet, framed};
    use cim_proto::codec::FrameCodec;
    use cim_proto::frame::Kind;
    use cim_proto::{Frame, Login};

    let Some(cluster) = Cluster::start("tickets").await else {
        return;
    };
    let ann = cluster.user("ann", 0).await;
    let state = ann.client().snapshot().await.unwrap();
    let _ = state;
    let keys = TicketKeys::new(1, support::TICKET_SECRET.as_bytes().to_vec());
    let now = cim_io::clock::Clock::System.wall();
    let server = &cluster.servers[0];
    let grant = |epoch: u64, expires_at: UnixMillis| Grant {
        user: ann.id,
        server: ServerId::new(server.id.as_str()),
        epoch: Epoch(epoch),
        expires_at,
    };
    let mut forged = keys.mint(&grant(99, now.plus(Duration::from_secs(30))));
    forged.mac[0] ^= 1;
    let expired = keys.mint(&grant(99, UnixMillis(now.0 - 60_000)));
    // Ann's claim is at epoch 1 or more: epoch 0 is always stale.
    let stale = keys.mint(&grant(0, now.plus(Duration::from_secs(30))));
    let wrong_server =
        TicketKeys::new(1, support::TICKET_SECRET.as_bytes().to_vec()).mint(&Grant {
            server: ServerId::new("elsewhere"),
            ..grant(99, now.plus(Duration::from_secs(30)))
        });
    for (what, ticket) in [
        ("forged", forged),
        ("expired", expired),
        ("stale epoch", stale),
        ("wrong server", wrong_server),
    ] {
        let stream = net::connect(
            &TokioNet,
            "127.0.0.1",
            server.client_port,
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        let (mut reader, mut writer) = framed(stream, FrameCodec::default());
        let login = Frame {
            kind: Some(Kind::Login(Login {
                ticket: Some(ticket),
            })),
        };
        writer
            .write_frame(&login, Duration::from_secs(2))
            .await
            .unwrap();
        let mut refused = false;
        loop {
            match reader.read_frame(Duration::from_secs(10)).await {
                Ok(Frame {
                    kind: Some(Kind::Error(_) | Kind::Kick(_)),
                }) => refused = true,
                Ok(Frame {
                    kind: Some(Kind::LoginOk(_)),
                }) => panic!("{what} ticket was accepted"),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        assert!(refused, "{what}: closed without an error frame");
    }
    // Ann was never disturbed.
    let acked = ann
        .client()
        .send(ConvId::All, Bytes::from_static(b"still here"))
        .await
        .unwrap();
    assert!(acked.seq >= 1);
}

/// Everyone sends while a server is SIGKILLed; every acknowledged message reaches every
/// member exactly once, in seq order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_senders_keep_chatting_through_a_server_sigkill() {
    const SENDERS: usize = 4;
    const PER_SENDER: usize = 500;
    let Some(mut cluster) = Cluster::start("sigkill").await else {
        return;
    };
    let mut users = Vec::new();
    for i in 0..SENDERS {
        users.push(cluster.user(&format!("u{i}"), i % 2).await);
    }
    let group = ConvId::group("load").unwrap();
    let api = cluster.api(0);
    let token = |u: &User| u.client().token().expect("logged in");
    api.create_group(&token(&users[0]), users[0].id, "load")
        .await
        .unwrap();
    for u in &users[1..] {
        api.join_group(&token(u), u.id, "load").await.unwrap();
    }
    let recorders: Vec<Recorder> = users.iter_mut().map(take_recorder).collect();
    let ids: Vec<UserId> = users.iter().map(|u| u.id).collect();

    // Kill the server u0 is on (so at least one client must re-home).
    let victim = users[0].server.clone().expect("online");
    let victim_index = cluster.server_index(&victim);
    let acked: Arc<Mutex<AckedByConv>> = Arc::default();
    let mut senders = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let client = user.client().clone();
        let acked = acked.clone();
        let private = ConvId::private(ids[i], ids[(i + 1) % SENDERS]).unwrap();
        let group = group.clone();
        senders.push(tokio::spawn(async move {
            for k in 0..PER_SENDER {
                let conv = if k % 2 == 0 {
                    group.clone()
                } else {
                    private.clone()
                };
                let body = Bytes::from(format!("u{i} #{k}"));
                let ack = client.send(conv.clone(), body).await.expect("send acked");
                acked
                    .lock()
                    .unwrap()
                    .entry(conv)
                    .or_default()
                    .insert((ack.seq, ack.msg_id));
            }
        }));
    }
    // Kill once a fifth of the traffic is through.
    let total = SENDERS * PER_SENDER;
    loop {
        let n: usize = acked.lock().unwrap().values().map(BTreeSet::len).sum();
        if n >= total / 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let online_before: Vec<usize> = recorders
        .iter()
        .map(|r| r.seen.lock().unwrap().online_at.len())
        .collect();
    let killed_at = Instant::now();
    cluster.servers[victim_index].proc.kill();
    println!("SIGKILLed {victim} after {} acks", total / 5);

    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(acked.values().map(BTreeSet::len).sum::<usize>(), total);

    // Every member of each conversation gets exactly the acked messages, in seq order.
    support::assert_each_member_has_exactly_the_acked(
        &acked,
        &ids,
        &recorders,
        Duration::from_secs(60),
    )
    .await;
    let mut rehomed = Vec::new();
    for (i, r) in recorders.iter().enumerate() {
        let seen = r.seen.lock().unwrap();
        if let Some(at) = seen.online_at.get(online_before[i]) {
            rehomed.push(at.duration_since(killed_at));
        }
    }
    println!(
        "{total} messages acked and delivered to every member exactly once; {} clients re-homed after the SIGKILL, slowest in {:?}",
        rehomed.len(),
        rehomed.iter().max()
    );
    assert!(!rehomed.is_empty(), "someone was on the killed server");

    // Both routes appended: servers spread their users' sends over every route link.
    let mut per_route = Vec::new();
    for route in 0..2 {
        let (_, body) = cluster
            .http(route)
            .request(Method::GET, "/metrics", None, None)
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&body).into_owned();
        let acked: u64 = text
            .lines()
            .find(|l| l.starts_with("cim_route_messages_acked_total{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no acked counter in:\n{text}"));
        per_route.push(acked);
    }
    println!("appended per route: {per_route:?}");
    assert!(per_route.iter().all(|n| *n > 0), "{per_route:?}");
    cluster.assert_all_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_users_catch_up_and_restarted_clients_resume() {
    let Some(cluster) = Cluster::start("offline").await else {
        return;
    };
    let ann = cluster.user("ann", 0).await;
    let mut bob = cluster.user("bob", 1).await;
    let private = ConvId::private(ann.id, bob.id).unwrap();

    // Bob goes offline (his saved state kept), Ann writes to him meanwhile.
    let saved = bob.client().snapshot().await.unwrap();
    bob.client.take().unwrap().shutdown().await;
    bob.events = None;
    let mut sent = Vec::new();
    for k in 0..3 {
        let ack = ann
            .client()
            .send(
                private.clone(),
                Bytes::from(format!("while you were out #{k}")),
            )
            .await
            .unwrap();
        sent.push((ack.seq, ack.msg_id));
    }

    // Back with his saved state: exactly the three he missed.
    bob.start(Some(saved)).await;
    let recorder = take_recorder(&mut bob);
    let conv = private.clone();
    recorder
        .wait_for(
            Duration::from_secs(20),
            "bob gets the missed messages",
            move |seen| seen.messages.get(&conv).is_some_and(|m| m.len() >= 3),
        )
        .await;
    let got: Vec<(u64, ClientMsgId)> = recorder.seen.lock().unwrap().messages[&private]
        .iter()
        .map(|(_, seq, id)| (*seq, *id))
        .collect();
    assert_eq!(got, sent);

    // Restarted with no saved state at all, he resumes from his cursor in the store (his
    // client acknowledged those three), so only what is new arrives.
    let state = bob.client().snapshot().await.unwrap();
    let acked_up_to = state
        .convs
        .iter()
        .find(|c| c.conv == private)
        .map(|c| c.delivered);
    assert_eq!(acked_up_to, Some(sent[2].0));
    // Shutting down flushes the batched DeliverAcks before the connection closes.
    bob.client.take().unwrap().shutdown().await;
    let ack = ann
        .client()
        .send(private.clone(), Bytes::from_static(b"one more"))
        .await
        .unwrap();
    bob.start(None).await;
    let recorder = take_recorder(&mut bob);
    let conv = private.clone();
    recorder
        .wait_for(
            Duration::from_secs(20),
            "bob gets the new message",
            move |seen| seen.messages.get(&conv).is_some_and(|m| !m.is_empty()),
        )
        .await;
    let got: Vec<u64> = recorder.seen.lock().unwrap().messages[&private]
        .iter()
        .map(|(_, seq, _)| *seq)
        .collect();
    assert_eq!(got, vec![ack.seq], "resumed from the server-side cursor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_degrades_then_recovers_without_losing_acked_messages() {
    let Some(mut cluster) = Cluster::start("redis-restart").await else {
        return;
    };
    let ann = cluster.user("ann", 0).await;
    let mut bob = cluster.user("bob", 1).await;
    let recorder = take_recorder(&mut bob);
    let private = ConvId::private(ann.id, bob.id).unwrap();
    let mut acked = Vec::new();
    for k in 0..20 {
        let ack = ann
            .client()
            .send(private.clone(), Bytes::from(format!("before #{k}")))
            .await
            .unwrap();
        acked.push((ack.seq, ack.msg_id));
    }

    cluster.redis().kill();
    let killed_at = Instant::now();
    let route_port = cluster.routes[0].port;
    let server_port = cluster.servers[0].http_port;
    wait_until(
        Duration::from_secs(20),
        "route and server degraded",
        || async {
            support::health(route_port).await == Some(503)
                && support::health(server_port).await == Some(503)
        },
    )
    .await;
    println!(
        "/health degraded {:?} after the Redis kill",
        killed_at.elapsed()
    );
    cluster.redis().restart().expect("redis restarts");
    let restarted_at = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "route and server healthy again",
        || async {
            support::health(route_port).await == Some(200)
                && support::health(server_port).await == Some(200)
        },
    )
    .await;
    // A brand-new user can register and log in.
    let carol = cluster.user("carol", 0).await;
    println!(
        "after the Redis restart: /health ok and a new login online within {:?}",
        restarted_at.elapsed()
    );
    cluster.assert_all_running();

    // Every message acked before the kill is still there (AOF), and Ann can keep sending.
    for k in 0..5 {
        let ack = ann
            .client()
            .send(private.clone(), Bytes::from(format!("after #{k}")))
            .await
            .unwrap();
        acked.push((ack.seq, ack.msg_id));
    }
    let want = acked.len();
    let conv = private.clone();
    recorder
        .wait_for(
            Duration::from_secs(30),
            "bob has every acked message",
            move |seen| seen.messages.get(&conv).is_some_and(|m| m.len() >= want),
        )
        .await;
    let got: Vec<(u64, ClientMsgId)> = recorder.seen.lock().unwrap().messages[&private]
        .iter()
        .map(|(_, seq, id)| (*seq, *id))
        .collect();
    assert_eq!(got, acked);
    drop(carol);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_zookeeper_session_expires_is_not_picked_until_it_is_back() {
    let Some(mut cluster) = Cluster::start("zk-expiry").await else {
        return;
    };
    // Watch the registry as the routes do.
    let view = cluster.registry_view().await;
    let isolated = cluster.servers[0].id.clone();
    let listed = |view: &cim_io::registry::RegistryView| support::listed(view, &isolated);
    assert!(listed(&view));

    cluster.servers[0].zk_proxy.as_ref().unwrap().blackhole();
    let cut_at = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "node removed after session expiry",
        || async { !listed(&view) },
    )
    .await;
    println!(
        "{isolated} left the registry {:?} after its ZooKeeper link was cut",
        cut_at.elapsed()
    );

    // While it is absent, no route sends anyone to it.
    for i in 0..6 {
        let user = cluster.user(&format!("z{i}"), i % 2).await;
        assert_ne!(
            user.server.as_ref().map(|s| s.as_str().to_owned()),
            Some(isolated.clone()),
            "a route picked a server absent from the registry"
        );
    }

    cluster.servers[0].zk_proxy.as_ref().unwrap().heal();
    let healed_at = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "node back after the heal",
        || async { listed(&view) },
    )
    .await;
    println!(
        "{isolated} re-registered {:?} after the heal",
        healed_at.elapsed()
    );
    cluster.assert_all_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_close_only_their_connection() {
    use cim_io::net::{self, TokioNet, framed};
    use cim_proto::codec::FrameCodec;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let Some(cluster) = Cluster::start("malformed").await else {
        return;
    };
    let ann = cluster.user("ann", 0).await;
    let mut bob = cluster.user("bob", 1).await;
    let recorder = take_recorder(&mut bob);
    let private = ConvId::private(ann.id, bob.id).unwrap();

    for server in &cluster.servers {
        for garbage in [
            &[0x05, 0xff, 0xff, 0xff, 0xff, 0xff][..], // a frame that is not protobuf
            &[0xff, 0xff, 0xff, 0xff, 0x0f][..],       // a length prefix over the maximum
            &[0xff; 11][..],                           // not a varint at all
        ] {
            let mut stream = net::connect(
                &TokioNet,
                "127.0.0.1",
                server.client_port,
                Duration::from_secs(2),
            )
            .await
            .unwrap();
            stream.write_all(garbage).await.unwrap();
            // The server answers with an Error frame (or nothing) and closes.
            let mut rest = Vec::new();
            let closed =
                tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
                    .await
                    .expect("the server closes a connection that sent garbage");
            let _ = closed;
            let (mut reader, _) = framed(std::io::Cursor::new(rest), FrameCodec::default());
            if let Ok(frame) = reader.read_frame(Duration::from_secs(1)).await {
                assert!(
                    matches!(frame.kind, Some(cim_proto::frame::Kind::Error(_))),
                    "only an Error frame may precede the close: {frame:?}"
                );
            }
        }
    }
    // Everyone else kept chatting.
    let ack = ann
        .client()
        .send(private.clone(), Bytes::from_static(b"still fine"))
        .await
        .unwrap();
    let conv = private.clone();
    recorder
        .wait_for(
            Duration::from_secs(10),
            "bob gets the message",
            move |seen| {
                seen.messages
                    .get(&conv)
                    .is_some_and(|m| m.iter().any(|(_, s, _)| *s == ack.seq))
            },
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cut_off_from_redis_fences_its_sessions_and_recovers() {
    let Some(mut cluster) = Cluster::start("redis-cut").await else {
        return;
    };
    // Users on both servers.
    let mut users = Vec::new();
    for i in 0..8 {
        users.push(cluster.user(&format!("c{i}"), i % 2).await);
    }
    let on = |server: usize| {
        let id = cluster.servers[server].id.as_str();
        users
            .iter()
            .position(|u| u.server.as_ref().is_some_and(|s| s.as_str() == id))
    };
    let (Some(cut_user), Some(other_user)) = (on(0), on(1)) else {
        panic!("eight users all landed on one server");
    };
    let private = ConvId::private(users[cut_user].id, users[other_user].id).unwrap();
    let cut = take_recorder(&mut users[cut_user]);
    let other = take_recorder(&mut users[other_user]);

    cluster.servers[0]
        .redis_proxy
        .as_ref()
        .expect("single-node Redis")
        .blackhole();
    let cut_at = Instant::now();
    // Past the grace period it fences its sessions and leaves the registry...
    cut.wait_for(
        Duration::from_secs(15),
        "the cut server fences its session",
        |seen| seen.kicked_fenced,
    )
    .await;
    println!(
        "{} fenced its session {:?} after losing Redis",
        cluster.servers[0].id,
        cut_at.elapsed()
    );
    // ... so its users re-home to the server that can still serve them.
    let healthy = cluster.servers[1].id.clone();
    cut.wait_for(
        Duration::from_secs(20),
        "the fenced user re-homes",
        move |seen| seen.online_on.last() == Some(&healthy),
    )
    .await;
    println!(
        "the fenced user was online elsewhere {:?} after the cut",
        cut_at.elapsed()
    );
    let ack = users[cut_user]
        .client()
        .send(private.clone(), Bytes::from_static(b"moved"))
        .await
        .unwrap();
    let conv = private.clone();
    other
        .wait_for(
            Duration::from_secs(10),
            "the message from the re-homed user arrives",
            move |seen| {
                seen.messages
                    .get(&conv)
                    .is_some_and(|m| m.iter().any(|(_, s, _)| *s == ack.seq))
            },
        )
        .await;

    // Healed, the server lists itself again and takes logins.
    let view = cluster.registry_view().await;
    assert!(
        !support::listed(&view, &cluster.servers[0].id),
        "still listed while cut off"
    );
    cluster.servers[0]
        .redis_proxy
        .as_ref()
        .expect("single-node Redis")
        .heal();
    let healed_at = Instant::now();
    let id = cluster.servers[0].id.clone();
    wait_until(
        Duration::from_secs(20),
        "the healed server lists itself again",
        || async { support::listed(&view, &id) },
    )
    .await;
    let mut landed = BTreeSet::new();
    for i in 0..8 {
        let user = cluster.user(&format!("d{i}"), i % 2).await;
        landed.insert(user.server.unwrap().as_str().to_owned());
    }
    println!(
        "{} back in rotation {:?} after the heal",
        cluster.servers[0].id,
        healed_at.elapsed()
    );
    assert!(
        landed.contains(&cluster.servers[0].id),
        "no login landed on the healed server: {landed:?}"
    );
    cluster.assert_all_running();
}

/// The real binaries on a Redis Cluster (`--redis-cluster`, three masters with a replica
/// each): two routes and two servers start against it, two users whose records live on
/// different masters log in through different routes and exchange private and `all`
/// messages, each delivered once, with the seq its sender was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_over_a_redis_cluster() {
    let Some(mut cluster) = Cluster::start_on_redis_cluster("redis-cluster").await else {
        return;
    };
    let mut ann = cluster.user("ann", 0).await;
    let mut bob = cluster.user("bob", 1).await;
    let redis = cluster.redis_cluster.as_ref().expect("a Redis Cluster");
    let master_of = |user: UserId| {
        redis
            .master_of_key(&format!("cim:claim:{{u:{}}}", user.0))
            .expect("an owner")
    };
    assert_ne!(
        master_of(ann.id),
        master_of(bob.id),
        "ann and bob are meant to live on different masters"
    );
    let private = ConvId::private(ann.id, bob.id).expect("two users");
    let ann_seen = take_recorder(&mut ann);
    let bob_seen = take_recorder(&mut bob);

    let to_bob = ann
        .client()
        .send(
            private.clone(),
            Bytes::from_static(b"hello over the cluster"),
        )
        .await
        .expect("acknowledged");
    let to_all = ann
        .client()
        .send(ConvId::All, Bytes::from_static(b"hello everyone"))
        .await
        .expect("acknowledged");
    let to_ann = bob
        .client()
        .send(private.clone(), Bytes::from_static(b"hello back"))
        .await
        .expect("acknowledged");
    assert_eq!(to_ann.seq, to_bob.seq + 1, "one log per conversation");

    let conv = private.clone();
    bob_seen
        .wait_for(
            Duration::from_secs(20),
            "bob gets ann's messages",
            move |s| {
                s.messages.get(&conv).is_some_and(|m| !m.is_empty())
                    && s.messages.get(&ConvId::All).is_some_and(|m| !m.is_empty())
            },
        )
        .await;
    let conv = private.clone();
    let answer = to_ann.seq;
    ann_seen
        .wait_for(Duration::from_secs(20), "ann gets bob's answer", move |s| {
            s.messages
                .get(&conv)
                .is_some_and(|m| m.iter().any(|(_, seq, _)| *seq == answer))
        })
        .await;
    let seqs = |seen: &Recorder, conv: &ConvId| -> Vec<(u64, ClientMsgId)> {
        seen.seen.lock().unwrap().messages[conv]
            .iter()
            .map(|(_, seq, id)| (*seq, *id))
            .collect()
    };
    // Whether a sender is handed its own message too is not this test's business: each
    // user saw the other's message under its acknowledged seq, once, in order.
    let bob_got = seqs(&bob_seen, &private);
    assert_eq!(bob_got[0], (to_bob.seq, to_bob.msg_id));
    assert_eq!(
        seqs(&bob_seen, &ConvId::All),
        vec![(to_all.seq, to_all.msg_id)]
    );
    let ann_got = seqs(&ann_seen, &private);
    assert!(
        ann_got.contains(&(to_ann.seq, to_ann.msg_id)),
        "{ann_got:?}"
    );
    for got in [&bob_got, &ann_got] {
        assert!(
            got.windows(2).all(|w| w[0].0 < w[1].0),
            "once, in order: {got:?}"
        );
    }
    cluster.assert_all_running();
}
