//! The backends over TLS and with access control, against real processes: a `redis-server`
//! serving TLS only (`rediss://`), with and without client certificates; Redis ACL users with
//! exactly the rules `deploy/README.md` gives each role; ZooKeeper with digest auth and the
//! ACLs the registry puts on the servers' nodes.
//!
//! Without `redis-server` or ZooKeeper the tests skip with a message (fail under `CI=true`).

use std::time::Duration;

use cim_core::ids::{ClientMsgId, ConvId, Epoch, LogEpoch, ServerId, UnixMillis, UserId};
use cim_core::registry::LiveServer;
use cim_core::store::{Claim, StoreCommand, StoreReply};
use cim_io::registry::{Registry, ZkAuth, ZkConfig, ZkRegistry, ZkTls};
use cim_io::store::{ConnectError, RedisOptions, RedisStore, RedisTls, Store};
use cim_testkit::{RedisServer, RedisSetup, RedisTlsSetup, TestCa};
use tokio::time::Instant;
use zookeeper_client as zk;

const T0: u64 = 1_700_000_000_000;
/// A connect that fails must say so within this (the store's budget is four connect
/// timeouts; the margin is for a loaded machine).
const PROMPT: Duration = Duration::from_secs(15);
const DEPLOY_DOC: &str = include_str!("../../deploy/README.md");

fn options(tls: RedisTls) -> RedisOptions {
    RedisOptions {
        command_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        seed: Some(7),
        tls,
        ..RedisOptions::default()
    }
}

fn trust(ca: &TestCa) -> RedisTls {
    RedisTls::default()
        .with_ca_pem(ca.cert_pem.as_bytes())
        .expect("the test CA is PEM")
}

/// Redis serving TLS only, with `cert` (from `ca`), optionally requiring client certificates
/// signed by `ca`.
fn tls_redis(ca: &TestCa, server_cert: &str, require_client_cert: bool) -> Option<RedisServer> {
    let cert = if server_cert == "loopback" {
        ca.server_cert("redis")
    } else {
        ca.server_cert_for("redis", &[server_cert])
    };
    RedisServer::start_with(RedisSetup {
        tls: Some(RedisTlsSetup {
            cert: cert.cert_path,
            key: cert.key_path,
            client_ca: ca.cert_path.clone(),
            require_client_cert,
        }),
        ..RedisSetup::default()
    })
}

async fn connect_err(url: &str, options: RedisOptions) -> ConnectError {
    let started = Instant::now();
    let result = RedisStore::connect(url, options).await;
    assert!(
        started.elapsed() < PROMPT,
        "a refused connect took {:?}",
        started.elapsed()
    );
    match result {
        Ok(store) => panic!("connected, but should have been refused: {store:?}"),
        Err(e) => e,
    }
}

async fn run(store: &RedisStore, now: u64, command: StoreCommand) -> StoreReply {
    let what = format!("{command:?}");
    store
        .execute(UnixMillis(now), command)
        .await
        .unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

/// Every command a route issues, with the replies a fresh store gives; returns the two
/// users it registered (alice holds a claim on server `s1` with epoch 1).
async fn exercise_route_commands(store: &RedisStore) -> (UserId, UserId) {
    let mut users = Vec::new();
    for name in ["alice", "bob"] {
        let reply = run(
            store,
            T0,
            StoreCommand::RegisterAccount {
                name: name.into(),
                password_hash: format!("hash-of-{name}"),
            },
        )
        .await;
        let StoreReply::AccountRegistered(Ok(user)) = reply else {
            panic!("register {name}: {reply:?}");
        };
        users.push(user);
    }
    let (a, b) = (users[0], users[1]);
    let reply = run(store, T0, StoreCommand::LoadAccount { user: a }).await;
    assert!(
        matches!(&reply, StoreReply::Account(Some(acct)) if acct.name == "alice"),
        "{reply:?}"
    );
    let reply = run(store, T0, StoreCommand::LoadNames { users: vec![a, b] }).await;
    assert!(
        matches!(&reply, StoreReply::Names(n) if n.len() == 2),
        "{reply:?}"
    );
    let reply = run(
        store,
        T0,
        StoreCommand::CountLoginFailure {
            user: a,
            expected: 0,
            forget_after: Duration::from_secs(60),
        },
    )
    .await;
    assert!(
        matches!(&reply, StoreReply::LoginFailureCounted(Ok(f)) if f.count == 1),
        "{reply:?}"
    );
    let reply = run(store, T0, StoreCommand::ClearLoginFailures { user: a }).await;
    assert_eq!(reply, StoreReply::LoginFailuresCleared);
    let reply = run(store, T0, StoreCommand::LoadClaim { user: a }).await;
    assert!(
        matches!(&reply, StoreReply::Claim(c) if c.claim.is_none()),
        "{reply:?}"
    );
    let reply = run(
        store,
        T0,
        StoreCommand::ReplaceClaim {
            user: a,
            expected: Epoch(0),
            claim: Claim {
                resume_secret: None,
                epoch: Epoch(1),
                server: ServerId::new("s1"),
                lease_until: UnixMillis(T0 + 30_000),
                resume_token_hash: [1; 32],
            },
        },
    )
    .await;
    assert_eq!(reply, StoreReply::ClaimReplaced(Ok(None)));
    let group = ConvId::group("rust").expect("group name");
    let reply = run(
        store,
        T0,
        StoreCommand::CreateGroup {
            conv: group.clone(),
            owner: a,
        },
    )
    .await;
    assert_eq!(reply, StoreReply::GroupCreated { created: true });
    let reply = run(
        store,
        T0,
        StoreCommand::JoinGroup {
            conv: group.clone(),
            user: b,
        },
    )
    .await;
    assert!(
        matches!(reply, StoreReply::GroupJoined(Some(_))),
        "{reply:?}"
    );
    let reply = run(
        store,
        T0,
        StoreCommand::LoadMembers {
            conv: group.clone(),
        },
    )
    .await;
    assert!(
        matches!(&reply, StoreReply::Members(m) if m.len() == 2),
        "{reply:?}"
    );
    let private = ConvId::private(a, b).expect("two users");
    for (i, conv) in [ConvId::All, private, group.clone()]
        .into_iter()
        .enumerate()
    {
        let reply = run(
            store,
            T0 + 1,
            StoreCommand::Append {
                conv,
                sender: a,
                msg_id: ClientMsgId(i as u128 + 1),
                body: bytes::Bytes::from_static(b"hello"),
                now: UnixMillis(T0 + 1),
                order: None,
                members_known: None,
            },
        )
        .await;
        assert!(
            matches!(&reply, StoreReply::Appended(Ok(m)) if m.message.seq == 1),
            "{reply:?}"
        );
    }
    let reply = run(store, T0, StoreCommand::LoadRoutes { users: vec![a, b] }).await;
    assert!(
        matches!(&reply, StoreReply::Routes(r) if r.len() == 2),
        "{reply:?}"
    );
    let reply = run(store, T0, StoreCommand::ListOnline { limit: 10 }).await;
    assert!(matches!(reply, StoreReply::Online(_)), "{reply:?}");
    let reply = run(store, T0, StoreCommand::LoadHeads { user: b }).await;
    assert!(
        matches!(&reply, StoreReply::Heads(h) if h.len() == 3),
        "{reply:?}"
    );
    let reply = run(
        store,
        T0,
        StoreCommand::Fetch {
            user: b,
            conv: ConvId::All,
            log_epoch: LogEpoch(0),
            after_seq: 0,
            limit: 10,
        },
    )
    .await;
    assert!(matches!(reply, StoreReply::Fetched { .. }), "{reply:?}");
    let reply = run(
        store,
        T0,
        StoreCommand::LeaveGroup {
            conv: group,
            user: b,
        },
    )
    .await;
    assert_eq!(reply, StoreReply::GroupLeft { was_member: true });
    (a, b)
}

/// Every command a server issues, for `user`'s claim (epoch 1 on `s1`).
async fn exercise_server_commands(store: &RedisStore, user: UserId) {
    let s1 = ServerId::new("s1");
    let reply = run(
        store,
        T0 + 2,
        StoreCommand::BindSession {
            user,
            epoch: Epoch(1),
            server: s1.clone(),
            lease_until: UnixMillis(T0 + 40_000),
        },
    )
    .await;
    assert_eq!(reply, StoreReply::SessionBound(Ok(())));
    let reply = run(
        store,
        T0 + 3,
        StoreCommand::RefreshLeases {
            server: s1,
            lease_until: UnixMillis(T0 + 50_000),
            sessions: vec![(user, Epoch(1))],
        },
    )
    .await;
    assert!(
        matches!(&reply, StoreReply::LeasesRefreshed(r) if r.len() == 1),
        "{reply:?}"
    );
    let reply = run(store, T0 + 3, StoreCommand::LoadHeads { user }).await;
    let StoreReply::Heads(heads) = reply else {
        panic!("heads: {reply:?}");
    };
    let all = heads
        .iter()
        .find(|h| h.conv == ConvId::All)
        .expect("`all` has a head");
    let reply = run(
        store,
        T0 + 3,
        StoreCommand::Fetch {
            user,
            conv: ConvId::All,
            log_epoch: all.log_epoch,
            after_seq: 0,
            limit: 10,
        },
    )
    .await;
    assert!(
        matches!(&reply, StoreReply::Fetched { messages, .. } if messages.len() == 1),
        "{reply:?}"
    );
    let reply = run(
        store,
        T0 + 3,
        StoreCommand::AdvanceCursors {
            user,
            cursors: vec![(ConvId::All, all.log_epoch, 1)],
        },
    )
    .await;
    assert_eq!(reply, StoreReply::CursorsAdvanced);
    let reply = run(
        store,
        T0 + 4,
        StoreCommand::ReleaseClaim {
            user,
            epoch: Epoch(1),
        },
    )
    .await;
    assert_eq!(reply, StoreReply::ClaimReleased { released: true });
}

// --- Redis over TLS ---------------------------------------------------------------------

#[tokio::test]
async fn the_store_works_over_rediss_with_the_configured_ca() {
    let ca = TestCa::new("redis");
    let Some(redis) = tls_redis(&ca, "loopback", false) else {
        return;
    };
    assert!(redis.url().starts_with("rediss://"));
    let store = RedisStore::connect(&redis.url(), options(trust(&ca)))
        .await
        .expect("rediss:// with the test CA connects");
    let (alice, _) = exercise_route_commands(&store).await;
    exercise_server_commands(&store, alice).await;
    store.health().await.expect("healthy over TLS");
}

#[tokio::test]
async fn a_certificate_the_ca_did_not_sign_is_refused_with_the_host_and_reason() {
    let ca = TestCa::new("redis");
    let other = TestCa::new("other");
    let Some(redis) = tls_redis(&ca, "loopback", false) else {
        return;
    };
    let error = connect_err(&redis.url(), options(trust(&other))).await;
    let text = error.to_string();
    assert!(
        matches!(error, ConnectError::Unreachable { .. }),
        "{error:?}"
    );
    assert!(
        text.contains(&format!("127.0.0.1:{}", redis.port)),
        "names the host: {text}"
    );
    assert!(
        text.contains("certificate did not verify") && text.contains("UnknownIssuer"),
        "says why: {text}"
    );
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    let ca = TestCa::new("redis");
    let Some(redis) = tls_redis(&ca, "redis.example.com", false) else {
        return;
    };
    let error = connect_err(&redis.url(), options(trust(&ca))).await;
    let text = error.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{}", redis.port)),
        "{text}"
    );
    assert!(
        text.contains("certificate did not verify") && text.contains("not valid for name"),
        "says why: {text}"
    );
}

#[tokio::test]
async fn plaintext_and_tls_mixed_up_fail_promptly_and_say_so() {
    let ca = TestCa::new("redis");
    let Some(tls) = tls_redis(&ca, "loopback", false) else {
        return;
    };
    // redis:// at a TLS-only port.
    let plain_url = format!("redis://127.0.0.1:{}/", tls.port);
    let error = connect_err(&plain_url, options(RedisTls::default())).await;
    let text = error.to_string();
    assert!(text.contains(&format!("127.0.0.1:{}", tls.port)), "{text}");
    assert!(text.contains("rediss://"), "suggests TLS: {text}");
    // rediss:// at a plaintext port: a handshake that cannot complete.
    let Some(plain) = RedisServer::start() else {
        return;
    };
    let tls_url = format!("rediss://127.0.0.1:{}/", plain.port);
    let error = connect_err(&tls_url, options(trust(&ca))).await;
    let text = error.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{}", plain.port)),
        "{text}"
    );
    assert!(text.contains("TLS"), "says TLS failed: {text}");
    // A CA given with a redis:// URL is refused, not silently ignored.
    let error = connect_err(&plain.url(), options(trust(&ca))).await;
    assert!(
        matches!(&error, ConnectError::Url { reason, .. } if reason.contains("rediss://")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_required_client_certificate_is_shown_when_configured() {
    let ca = TestCa::new("redis");
    let Some(redis) = tls_redis(&ca, "loopback", true) else {
        return;
    };
    // Without one, Redis (tls-auth-clients yes) drops the handshake.
    let error = connect_err(&redis.url(), options(trust(&ca))).await;
    let text = error.to_string();
    assert!(
        text.contains(&format!("127.0.0.1:{}", redis.port)),
        "{text}"
    );
    assert!(
        text.contains("requires a client certificate"),
        "says why: {text}"
    );
    // One another CA signed is refused by Redis, and the error says so.
    let other = TestCa::new("other");
    let stranger = other.client_cert("stranger", "cim-route");
    let tls = trust(&ca)
        .with_client_pem(stranger.cert_pem.as_bytes(), stranger.key_pem.as_bytes())
        .expect("PEM");
    let error = connect_err(&redis.url(), options(tls)).await;
    assert!(
        error
            .to_string()
            .contains("refused this client certificate"),
        "{error}"
    );
    // With a client certificate the CA signed, it works.
    let client = ca.client_cert("route", "cim-route");
    let tls = RedisTls::from_files(
        Some(&ca.cert_path),
        Some(&client.cert_path),
        Some(&client.key_path),
    )
    .expect("PEM files");
    let store = RedisStore::connect(&redis.url(), options(tls))
        .await
        .expect("connects with a client certificate");
    store.health().await.expect("healthy");
}

// --- Redis ACL users ------------------------------------------------------------------

/// The `ACL SETUSER <role> ...` line of `deploy/README.md`, as an ACL file line with
/// `password`: the tests run the documented rules, so the documentation cannot drift.
fn documented_acl(role: &str, password: &str) -> String {
    let prefix = format!("ACL SETUSER {role} ");
    let line = DEPLOY_DOC
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("deploy/README.md has no `{prefix}...` line"));
    let placeholder = format!(
        ">{}-PASSWORD",
        role.trim_start_matches("cim-").to_uppercase()
    );
    assert!(
        line.contains(&placeholder),
        "the {role} line sets its password as {placeholder}: {line}"
    );
    line.replace("ACL SETUSER ", "user ")
        .replace(&placeholder, &format!(">{password}"))
}

const ROUTE_PASSWORD: &str = "route-pw-9f8e7d6c5b4a";
const SERVER_PASSWORD: &str = "server-pw-0a1b2c3d4e5f";

fn acl_redis(tls: Option<RedisTlsSetup>) -> Option<RedisServer> {
    RedisServer::start_with(RedisSetup {
        tls,
        acl: vec![
            // What deploy/README.md tells operators to do with the default user.
            "user default off".into(),
            documented_acl("cim-route", ROUTE_PASSWORD),
            documented_acl("cim-server", SERVER_PASSWORD),
        ],
        ..RedisSetup::default()
    })
}

#[tokio::test]
async fn each_role_runs_with_its_documented_acl_user_and_nothing_more() {
    let Some(redis) = acl_redis(None) else {
        return;
    };
    let route = RedisStore::connect(
        &redis.url_as("cim-route", ROUTE_PASSWORD),
        options(RedisTls::default()),
    )
    .await
    .expect("the route's ACL user connects");
    let server = RedisStore::connect(
        &redis.url_as("cim-server", SERVER_PASSWORD),
        options(RedisTls::default()),
    )
    .await
    .expect("the server's ACL user connects");
    let (alice, _) = exercise_route_commands(&route).await;
    exercise_server_commands(&server, alice).await;
    route.health().await.expect("route healthy");
    server.health().await.expect("server healthy");

    // The server's user cannot do the route's work: it cannot touch accounts' names (the
    // password hashes) or append to a log.
    let refused = server
        .execute(
            UnixMillis(T0),
            StoreCommand::RegisterAccount {
                name: "mallory".into(),
                password_hash: "x".into(),
            },
        )
        .await;
    let error = refused.expect_err("the server's ACL user may not register accounts");
    assert!(
        error.to_string().to_lowercase().contains("noperm"),
        "{error}"
    );
    let refused = server
        .execute(
            UnixMillis(T0),
            StoreCommand::Append {
                conv: ConvId::All,
                sender: alice,
                msg_id: ClientMsgId(99),
                body: bytes::Bytes::from_static(b"forged"),
                now: UnixMillis(T0),
                order: None,
                members_known: None,
            },
        )
        .await;
    assert!(
        refused.is_err(),
        "the server's ACL user appended: {refused:?}"
    );
}

/// Every `ACL SETUSER <role> ...` line of `deploy/README.md` for `role` (the one-node rules,
/// then the cluster's additions), as `ACL SETUSER` arguments with `password`.
fn documented_acl_commands(role: &str, password: &str) -> Vec<Vec<String>> {
    let prefix = format!("ACL SETUSER {role} ");
    let placeholder = format!(
        ">{}-PASSWORD",
        role.trim_start_matches("cim-").to_uppercase()
    );
    let lines: Vec<Vec<String>> = DEPLOY_DOC
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(&prefix))
        .map(|l| {
            l.replace(&placeholder, &format!(">{password}"))
                .split_whitespace()
                .map(str::to_owned)
                .collect()
        })
        .collect();
    assert!(
        lines.len() >= 2,
        "deploy/README.md has the one-node and the cluster lines for {role}"
    );
    lines
}

/// The documented ACL users, with the cluster's two additions, run every command of their
/// roles on a Redis Cluster (set on every node).
#[tokio::test]
async fn each_role_runs_with_its_documented_acl_user_on_a_cluster() {
    let Some(cluster) = cim_testkit::RedisCluster::start() else {
        return;
    };
    for port in cluster.ports() {
        for (role, password) in [
            ("cim-route", ROUTE_PASSWORD),
            ("cim-server", SERVER_PASSWORD),
        ] {
            for command in documented_acl_commands(role, password) {
                let args: Vec<&str> = command.iter().map(String::as_str).collect();
                assert_eq!(cluster.cli(port, &args).as_deref(), Ok("OK"), "{command:?}");
            }
        }
    }
    let as_user = |user: &str, password: &str| -> Vec<String> {
        cluster
            .urls()
            .iter()
            .map(|u| u.replacen("://", &format!("://{user}:{password}@"), 1))
            .collect()
    };
    let route = RedisStore::connect_cluster(
        &as_user("cim-route", ROUTE_PASSWORD),
        options(RedisTls::default()),
    )
    .await
    .expect("the route's ACL user connects to the cluster");
    let server = RedisStore::connect_cluster(
        &as_user("cim-server", SERVER_PASSWORD),
        options(RedisTls::default()),
    )
    .await
    .expect("the server's ACL user connects to the cluster");
    let (alice, _) = exercise_route_commands(&route).await;
    exercise_server_commands(&server, alice).await;
    route.health().await.expect("route healthy");
    server.health().await.expect("server healthy");
}

#[tokio::test]
async fn a_wrong_password_is_refused_clearly_and_never_printed() {
    let Some(redis) = acl_redis(None) else {
        return;
    };
    let wrong = "wrong-pw-must-not-leak";
    let error = connect_err(
        &redis.url_as("cim-route", wrong),
        options(RedisTls::default()),
    )
    .await;
    let (text, debug) = (error.to_string(), format!("{error:?}"));
    assert!(text.contains("authentication refused"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{}", redis.port)),
        "{text}"
    );
    assert!(
        !text.contains(wrong) && !debug.contains(wrong),
        "leaked: {debug}"
    );
    // No password at all: the default user is off.
    let error = connect_err(&redis.url(), options(RedisTls::default())).await;
    assert!(error.to_string().contains("requires a password"), "{error}");
    // A URL that does not parse is shown without its password.
    let error = connect_err(
        &format!("redis://cim-route:{wrong}@127.0.0.1:notaport/"),
        options(RedisTls::default()),
    )
    .await;
    let (text, debug) = (error.to_string(), format!("{error:?}"));
    assert!(matches!(error, ConnectError::Url { .. }), "{debug}");
    assert!(
        !text.contains(wrong) && !debug.contains(wrong),
        "leaked: {debug}"
    );
}

#[tokio::test]
async fn acl_users_work_over_tls_too() {
    let ca = TestCa::new("redis");
    let cert = ca.server_cert("redis");
    let Some(redis) = acl_redis(Some(RedisTlsSetup {
        cert: cert.cert_path,
        key: cert.key_path,
        client_ca: ca.cert_path.clone(),
        require_client_cert: false,
    })) else {
        return;
    };
    let url = redis.url_as("cim-route", ROUTE_PASSWORD);
    assert!(url.starts_with("rediss://cim-route:"));
    let store = RedisStore::connect(&url, options(trust(&ca)))
        .await
        .expect("ACL user over rediss://");
    // `store`'s Debug (what a log line might show) holds no password.
    assert!(!format!("{store:?}").contains(ROUTE_PASSWORD));
    store.health().await.expect("healthy");
}

// --- ZooKeeper digest auth and ACLs -------------------------------------------------------

fn live(id: &str) -> LiveServer {
    LiveServer {
        id: ServerId::new(id),
        host: "10.0.0.11".into(),
        client_port: 11211,
        link_port: 11311,
        http_port: 8081,
        connections: 0,
        client_tls: false,
        ws_port: None,
    }
}

async fn raw_client(addr: &str, digest: Option<&str>) -> zk::Client {
    let mut connector = zk::Client::connector().with_session_timeout(Duration::from_secs(2));
    if let Some(digest) = digest {
        connector = connector.with_auth("digest", digest.as_bytes());
    }
    tokio::time::timeout(Duration::from_secs(10), connector.connect(addr))
        .await
        .expect("connect in time")
        .expect("connect to the test ZooKeeper")
}

#[tokio::test]
async fn zookeeper_nodes_are_writable_only_by_the_cim_identity() {
    let Some(zookeeper) = cim_testkit::zookeeper() else {
        return;
    };
    let root = cim_testkit::unique_root("acl");
    let config = ZkConfig::new(zookeeper.addr.clone())
        .with_root(root.clone())
        .with_session_timeout(Duration::from_secs(2))
        .with_op_timeout(Duration::from_secs(2))
        .with_auth(Some(
            ZkAuth::parse("cim:zk-secret-1234").expect("user:password"),
        ));
    assert!(
        !format!("{config:?}").contains("zk-secret-1234"),
        "Debug shows the password: {config:?}"
    );
    let servers = ZkRegistry::new(config.clone()).expect("config");
    let s1 = servers.register(live("s1")).await.expect("s1 registers");
    // Another server with the same identity shares the root.
    let s2 = servers.register(live("s2")).await.expect("s2 registers");

    // A route without credentials still reads the list.
    let reader = ZkRegistry::new(config.clone().with_auth(None)).expect("config");
    let view = reader.watch().await.expect("an anonymous reader watches");
    let listed: Vec<String> = view
        .snapshot()
        .keys()
        .map(|id| id.as_str().to_owned())
        .collect();
    assert_eq!(listed, ["s1", "s2"]);

    let node = format!("{root}/s1");
    for (who, digest) in [
        ("anonymous", None),
        ("a wrong password", Some("cim:not-the-password")),
    ] {
        let intruder = raw_client(&zookeeper.addr, digest).await;
        let (data, _) = intruder
            .get_data(&node)
            .await
            .unwrap_or_else(|e| panic!("{who} cannot read the node: {e}"));
        assert!(!data.is_empty());
        assert_eq!(
            intruder.delete(&node, None).await,
            Err(zk::Error::NoAuth),
            "{who} deleted a server's node"
        );
        assert_eq!(
            intruder.set_data(&node, b"{}", None).await.map(|_| ()),
            Err(zk::Error::NoAuth),
            "{who} overwrote a server's node"
        );
        let fake = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        assert_eq!(
            intruder
                .create(&format!("{root}/fake"), b"{}", &fake)
                .await
                .map(|_| ()),
            Err(zk::Error::NoAuth),
            "{who} listed a fake server"
        );
        let parent = root.rsplit_once('/').expect("nested root").0;
        assert_eq!(
            intruder.delete(&root, None).await,
            Err(zk::Error::NoAuth),
            "{who} could delete the root under {parent}"
        );
    }
    assert_eq!(
        view.snapshot().len(),
        2,
        "the list is intact after the attempts"
    );

    // The node's ACL, as an operator would check it with `getAcl`.
    let anyone = raw_client(&zookeeper.addr, None).await;
    let (acls, _) = anyone.get_acl(&node).await.expect("getAcl");
    let digest = acls
        .iter()
        .find(|a| a.scheme() == "digest")
        .expect("a digest entry");
    assert!(digest.id().starts_with("cim:"), "{acls:?}");
    assert_eq!(digest.permission(), zk::Permission::ALL);
    let world = acls
        .iter()
        .find(|a| a.scheme() == "world")
        .expect("a world entry");
    assert_eq!(world.permission(), zk::Permission::READ);

    drop((s1, s2));
}

/// Timeouts with room for a JVM's TLS handshake on a loaded machine (2 s flaked while a
/// fuzz build shared the cores); a refusal still comes well within `PROMPT`.
fn zk_tls_config(addr: &str, tls: ZkTls) -> ZkConfig {
    ZkConfig::new(addr)
        .with_root(cim_testkit::unique_root("tls"))
        .with_session_timeout(Duration::from_secs(5))
        .with_op_timeout(Duration::from_secs(5))
        .with_tls(Some(tls))
}

#[tokio::test]
async fn zookeeper_over_tls_with_a_client_certificate() {
    let Some(zookeeper) = cim_testkit::zookeeper_tls() else {
        return;
    };
    let tls = ZkTls::from_files(
        &zookeeper.ca.cert_path,
        Some(&zookeeper.client.cert_path),
        Some(&zookeeper.client.key_path),
    )
    .expect("the test files load");
    assert!(
        !format!("{tls:?}").contains("PRIVATE KEY"),
        "Debug shows the key: {tls:?}"
    );
    let registry =
        ZkRegistry::new(zk_tls_config(&zookeeper.tls_addr, tls.clone())).expect("config");
    let registration = registry
        .register(live("s1"))
        .await
        .expect("registers over TLS");
    let view = registry.watch().await.expect("watches over TLS");
    assert_eq!(view.snapshot().len(), 1, "{:?}", view.snapshot());
    drop(registration);

    // `localhost` is a name of the server's certificate too.
    let port = zookeeper.tls_addr.rsplit_once(':').expect("host:port").1;
    let by_name =
        ZkRegistry::new(zk_tls_config(&format!("localhost:{port}"), tls)).expect("config");
    by_name
        .watch()
        .await
        .expect("watches over TLS by host name");
}

#[tokio::test]
async fn zookeeper_over_tls_refuses_what_does_not_verify() {
    let Some(zookeeper) = cim_testkit::zookeeper_tls() else {
        return;
    };
    let other_ca = TestCa::new("not-zookeepers");
    let cases = [
        (
            "a CA that did not sign the server's certificate",
            "UnknownIssuer",
            ZkTls::from_files(
                &other_ca.cert_path,
                Some(&zookeeper.client.cert_path),
                Some(&zookeeper.client.key_path),
            ),
        ),
        (
            "no client certificate (the ensemble requires one)",
            "alert",
            ZkTls::from_files(&zookeeper.ca.cert_path, None, None),
        ),
    ];
    for (what, reason, tls) in cases {
        let tls = tls.expect("the files load");
        let registry = ZkRegistry::new(zk_tls_config(&zookeeper.tls_addr, tls)).expect("config");
        let started = Instant::now();
        let error = match registry.register(live("s1")).await {
            Ok(_) => panic!("{what}: registered"),
            Err(error) => error.to_string(),
        };
        eprintln!("{what}: {error}");
        assert!(
            error.contains("TLS") && error.contains(reason),
            "{what}: the error does not name the reason {reason:?}: {error}"
        );
        assert!(
            started.elapsed() < PROMPT,
            "{what}: took {:?}",
            started.elapsed()
        );
    }
    // The plaintext client against the TLS port fails too (no silent fallback).
    let plain = ZkConfig::new(zookeeper.tls_addr.clone())
        .with_root(cim_testkit::unique_root("tls"))
        .with_session_timeout(Duration::from_secs(2))
        .with_op_timeout(Duration::from_secs(2));
    let registry = ZkRegistry::new(plain).expect("config");
    assert!(registry.register(live("s1")).await.is_err());
}

#[test]
fn zookeeper_tls_files_are_checked_at_start_with_their_names() {
    let ca = TestCa::new("zk-files");
    let client = ca.client_cert("client", "cim");
    let missing = ca.dir().join("missing.pem");
    let error = ZkTls::from_files(&missing, None, None).expect_err("a missing CA file");
    assert!(
        error.contains("--zk-ca") && error.contains("missing.pem"),
        "{error}"
    );
    let error = ZkTls::from_files(&ca.cert_path, Some(&client.cert_path), None)
        .expect_err("a certificate without its key");
    assert!(error.contains("--zk-client-key"), "{error}");
    let error = ZkTls::from_files(&client.key_path, None, None).expect_err("a key as the CA");
    assert!(error.contains("--zk-ca"), "{error}");
}
