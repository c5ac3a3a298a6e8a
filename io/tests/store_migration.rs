//! Item 18b: a Redis store written by the code before this layout (schema 1: no version key,
//! name records keyed as typed from before names ignored case, accounts without an `all`
//! start) is migrated in place, conflicts decided as `cim_io::store` documents: the older
//! account keeps a name two accounts held in different case.
//!
//! The "old" store is written key by key exactly as the earlier code wrote it (its
//! `register.lua` before and after names became case-insensitive).

use std::time::Duration;

use cim_core::ids::{ClientMsgId, ConvId, UnixMillis, UserId};
use cim_core::store::{NameTaken, StoreCommand, StoreReply};
use cim_io::store::{
    MigrateError, NameConflict, RedisOptions, RedisStore, SCHEMA_KEY, SCHEMA_VERSION, Store,
};
use cim_testkit::RedisServer;

const NOW: UnixMillis = UnixMillis(1_700_000_000_000);

async fn connect(server: &RedisServer) -> RedisStore {
    let options = RedisOptions {
        command_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        seed: Some(3),
        ..RedisOptions::default()
    };
    RedisStore::connect(&server.url(), options)
        .await
        .expect("connect to the test redis-server")
}

async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// An account as the code before case-insensitive names registered it: the reservation
/// keyed by the name as typed, with `user` and `password_hash` only.
async fn old_register(conn: &mut impl redis::aio::ConnectionLike, name: &str) -> u64 {
    let user: u64 = redis::cmd("INCR")
        .arg("cim:{names}:next_user")
        .query_async(conn)
        .await
        .unwrap();
    let hash = format!("phc-{name}");
    let () = redis::cmd("HSET")
        .arg(format!("cim:{{names}}:name:{name}"))
        .arg("user")
        .arg(user)
        .arg("password_hash")
        .arg(&hash)
        .query_async(conn)
        .await
        .unwrap();
    let () = redis::cmd("HSET")
        .arg(format!("cim:acct:{{u:{user}}}"))
        .arg("name")
        .arg(name)
        .arg("password_hash")
        .arg(&hash)
        .query_async(conn)
        .await
        .unwrap();
    user
}

/// An account as the code just before this layout registered it: the reservation under
/// the lowercase name (with `name` as typed), the account hash without an `all` start.
/// (That code checked the lowercase key and the key as typed, so a legacy `Bob` did not
/// stop a new `bob`: the conflict this migration resolves.)
async fn today_register(conn: &mut impl redis::aio::ConnectionLike, name: &str) -> u64 {
    let user: u64 = redis::cmd("INCR")
        .arg("cim:{names}:next_user")
        .query_async(conn)
        .await
        .unwrap();
    let hash = format!("phc-{name}");
    let () = redis::cmd("HSET")
        .arg(format!("cim:{{names}}:name:{}", name.to_ascii_lowercase()))
        .arg("user")
        .arg(user)
        .arg("password_hash")
        .arg(&hash)
        .arg("name")
        .arg(name)
        .query_async(conn)
        .await
        .unwrap();
    let () = redis::cmd("HSET")
        .arg(format!("cim:acct:{{u:{user}}}"))
        .arg("name")
        .arg(name)
        .arg("password_hash")
        .arg(&hash)
        .query_async(conn)
        .await
        .unwrap();
    user
}

async fn by_name(store: &RedisStore, name: &str) -> Option<UserId> {
    match store
        .execute(NOW, StoreCommand::LoadAccountByName { name: name.into() })
        .await
        .unwrap()
    {
        StoreReply::Account(a) => a.map(|a| a.user),
        other => panic!("{other:?}"),
    }
}

async fn register(store: &RedisStore, name: &str) -> Result<UserId, NameTaken> {
    match store
        .execute(
            NOW,
            StoreCommand::RegisterAccount {
                name: name.into(),
                password_hash: "phc-new".into(),
            },
        )
        .await
        .unwrap()
    {
        StoreReply::AccountRegistered(r) => r,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_store_written_by_the_previous_code_is_migrated_in_place() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let mut conn = raw(&server).await;
    // Before names ignored case: Bob (1), Carol (2), zed (3) then Zed (4), Frank (5).
    let bob_old = old_register(&mut conn, "Bob").await;
    let carol_old = old_register(&mut conn, "Carol").await;
    let zed_lower = old_register(&mut conn, "zed").await;
    let zed_upper = old_register(&mut conn, "Zed").await;
    let frank = old_register(&mut conn, "Frank").await;
    // Then the code that ignored case for new names: bob (6), carol (7), Dave (8).
    let bob_new = today_register(&mut conn, "bob").await;
    let carol_new = today_register(&mut conn, "carol").await;
    let dave = today_register(&mut conn, "Dave").await;

    let store = connect(&server).await;
    // Some traffic in `all` from the old accounts before the upgrade.
    for (i, sender) in [bob_old, dave].into_iter().enumerate() {
        let reply = store
            .execute(
                NOW,
                StoreCommand::Append {
                    conv: ConvId::All,
                    sender: UserId(sender),
                    msg_id: ClientMsgId(i as u128 + 1),
                    body: bytes::Bytes::from_static(b"before"),
                    now: NOW,
                    order: None,
                    members_known: None,
                },
            )
            .await
            .unwrap();
        assert!(matches!(reply, StoreReply::Appended(Ok(_))), "{reply:?}");
    }
    assert_eq!(store.schema_version().await.unwrap(), 1);

    let report = store.migrate().await.expect("migrate");
    assert_eq!((report.from, report.to), (1, SCHEMA_VERSION));
    assert_eq!(report.moved, 1, "Frank moved to frank: {report:?}");
    assert_eq!(
        report.conflicts,
        vec![
            // The older account keeps the name in every conflict, whichever record was
            // keyed as typed.
            NameConflict {
                name: "zed".into(),
                kept: UserId(zed_lower),
                unreserved: UserId(zed_upper),
            },
            NameConflict {
                name: "bob".into(),
                kept: UserId(bob_old),
                unreserved: UserId(bob_new),
            },
            NameConflict {
                name: "carol".into(),
                kept: UserId(carol_old),
                unreserved: UserId(carol_new),
            },
        ]
    );
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    let version: String = redis::cmd("GET")
        .arg(SCHEMA_KEY)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION.to_string());
    // No record keyed as typed is left.
    let mut left: Vec<String> = redis::cmd("KEYS")
        .arg("cim:{names}:name:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    left.sort();
    assert_eq!(
        left,
        ["bob", "carol", "dave", "frank", "zed"]
            .map(|n| format!("cim:{{names}}:name:{n}"))
            .to_vec()
    );
    let conflicts: std::collections::BTreeMap<u64, String> = redis::cmd("HGETALL")
        .arg("cim:{names}:conflicts")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        conflicts,
        [(zed_upper, "Zed"), (bob_new, "bob"), (carol_new, "carol")]
            .map(|(u, n)| (u, n.to_string()))
            .into()
    );

    // By name, in any case, the older account; every name is taken in every case.
    for (name, want) in [
        ("BOB", bob_old),
        ("bob", bob_old),
        ("carol", carol_old),
        ("ZED", zed_lower),
        ("frank", frank),
        ("Dave", dave),
    ] {
        assert_eq!(by_name(&store, name).await, Some(UserId(want)), "{name}");
    }
    for name in ["bob", "Carol", "FRANK", "zed", "dave"] {
        assert_eq!(register(&store, name).await, Err(NameTaken), "{name}");
    }
    // The unreserved accounts keep their id, name, password and history: they log in by id.
    match store
        .execute(
            NOW,
            StoreCommand::LoadAccount {
                user: UserId(bob_new),
            },
        )
        .await
        .unwrap()
    {
        StoreReply::Account(Some(a)) => {
            assert_eq!((&*a.name, &*a.password_hash), ("bob", "phc-bob"));
        }
        other => panic!("{other:?}"),
    }
    // Accounts from before owe all of `all`, as they did; a new one starts at its
    // registration.
    let cursor_of = |user| {
        let store = &store;
        async move {
            match store
                .execute(NOW, StoreCommand::LoadHeads { user })
                .await
                .unwrap()
            {
                StoreReply::Heads(heads) => heads[0].cursor_seq,
                other => panic!("{other:?}"),
            }
        }
    };
    assert_eq!(cursor_of(UserId(carol_old)).await, 0);
    let newcomer = register(&store, "newcomer").await.expect("register");
    assert_eq!(newcomer, UserId(9), "ids continue after the old ones");
    assert_eq!(cursor_of(newcomer).await, 2);

    // Running it again changes nothing.
    let again = store.migrate().await.expect("migrate again");
    assert_eq!(
        (
            again.from,
            again.moved,
            again.duplicates,
            again.conflicts.len()
        ),
        (SCHEMA_VERSION, 0, 0, 0)
    );
}

/// On a Redis Cluster the name records all live in the `{names}` slot: the migration scans
/// that slot's master (a scan of any other node would find nothing) and resolves the same
/// conflicts as on one node.
#[tokio::test]
async fn a_cluster_store_is_migrated_on_the_names_master() {
    let Some(cluster) = cim_testkit::RedisCluster::start() else {
        return;
    };
    let mut conn = redis::cluster::ClusterClient::new(cluster.urls())
        .expect("urls")
        .get_async_connection()
        .await
        .expect("connect");
    let bob_old = old_register(&mut conn, "Bob").await;
    old_register(&mut conn, "Frank").await;
    let bob_new = today_register(&mut conn, "bob").await;
    let names_master = cluster
        .master_of_key(SCHEMA_KEY)
        .expect("the {names} slot's master");
    assert!(
        cluster.masters().iter().any(|m| *m != names_master),
        "other masters exist, holding none of the names"
    );
    let options = RedisOptions {
        command_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        seed: Some(3),
        ..RedisOptions::default()
    };
    let store = RedisStore::connect_cluster(&cluster.urls(), options)
        .await
        .expect("connect to the cluster");
    assert_eq!(store.schema_version().await.unwrap(), 1);
    let report = store.migrate().await.expect("migrate");
    assert_eq!((report.from, report.to), (1, SCHEMA_VERSION));
    assert_eq!(report.moved, 1, "Frank moved to frank: {report:?}");
    assert_eq!(
        report.conflicts,
        vec![NameConflict {
            name: "bob".into(),
            kept: UserId(bob_old),
            unreserved: UserId(bob_new),
        }]
    );
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(
        by_name(&store, "frank").await,
        by_name(&store, "Frank").await
    );
    assert!(by_name(&store, "frank").await.is_some());
}

#[tokio::test]
async fn the_route_migrates_at_start_once_and_refuses_a_newer_layout() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = connect(&server).await;
    // An empty store is stamped with this version: nothing to migrate.
    Store::ensure_schema(&store).await.expect("fresh store");
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(server.raw(&format!("GET {SCHEMA_KEY}")), "$1");

    // An old store (data, no version) is migrated by the start-up step.
    server.raw(&format!("DEL {SCHEMA_KEY}"));
    let mut conn = raw(&server).await;
    old_register(&mut conn, "Erin").await;
    assert_eq!(store.schema_version().await.unwrap(), 1);
    Store::ensure_schema(&store).await.expect("migrates");
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(by_name(&store, "erin").await, Some(UserId(1)));

    // A migration already running elsewhere holds the lock.
    server.raw(&format!("DEL {SCHEMA_KEY}"));
    server.raw("SET cim:{names}:migration_lock someone-else PX 60000");
    assert!(matches!(store.migrate().await, Err(MigrateError::Locked)));
    server.raw("DEL cim:{names}:migration_lock");

    // A layout from a newer build is refused, with words.
    server.raw(&format!("SET {SCHEMA_KEY} 99"));
    let err = Store::ensure_schema(&store).await.unwrap_err();
    assert!(err.contains("schema 99") && err.contains("newer"), "{err}");
}

const DEPLOY_DOC: &str = include_str!("../../deploy/README.md");
const ROUTE_PASSWORD: &str = "route-pw-migrate-0123";

/// The documented `cim-route` ACL line (deploy/README.md) as an ACL file line.
fn documented_route_acl() -> String {
    let line = DEPLOY_DOC
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("ACL SETUSER cim-route "))
        .expect("deploy/README.md has the cim-route ACL line");
    line.replace("ACL SETUSER ", "user ")
        .replace(">ROUTE-PASSWORD", &format!(">{ROUTE_PASSWORD}"))
}

/// A route logged in as the documented `cim-route` ACL user can migrate, and run every new
/// account command (a tombstone, a reset, the listing, a look-up by name).
#[tokio::test]
async fn the_documented_route_acl_allows_the_migration_and_the_account_commands() {
    let Some(server) = RedisServer::start_with(cim_testkit::RedisSetup {
        acl: vec![
            "user default on nopass ~* &* +@all".into(),
            documented_route_acl(),
        ],
        ..cim_testkit::RedisSetup::default()
    }) else {
        return;
    };
    let mut conn = raw(&server).await;
    old_register(&mut conn, "Old").await;
    let store = RedisStore::connect(
        &server.url_as("cim-route", ROUTE_PASSWORD),
        RedisOptions::default(),
    )
    .await
    .expect("connect as cim-route");
    Store::ensure_schema(&store)
        .await
        .expect("migrates as cim-route");
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(by_name(&store, "old").await, Some(UserId(1)));
    let new = register(&store, "New")
        .await
        .expect("registers as cim-route");
    for command in [
        StoreCommand::SetPassword {
            user: new,
            password_hash: "phc-reset".into(),
        },
        StoreCommand::ListAccounts {
            after: UserId(0),
            limit: 10,
        },
        StoreCommand::DeleteAccount { user: new },
    ] {
        store
            .execute(NOW, command.clone())
            .await
            .unwrap_or_else(|e| panic!("{command:?} as cim-route: {e}"));
    }
    assert_eq!(register(&store, "NEW").await, Err(NameTaken));
}
