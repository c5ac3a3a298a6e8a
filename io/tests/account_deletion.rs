//! Item 16: deleting an account breaks the old rule "accounts are never deleted", on which
//! the Redis store's account cache relied (an append checked the accounts once and then
//! trusted its memory for good). Two stores on one Redis stand for two routes: the one that
//! cached the account must learn of the deletion the other made, and refuse, storing
//! nothing.

use std::time::Duration;

use bytes::Bytes;
use cim_core::ids::{ClientMsgId, ConvId, UnixMillis, UserId};
use cim_core::store::{AppendError, StoreCommand, StoreReply};
use cim_io::store::{RedisOptions, RedisStore, Store};
use cim_testkit::RedisServer;

const NOW: UnixMillis = UnixMillis(1_700_000_000_000);

async fn connect(server: &RedisServer, seed: u64) -> RedisStore {
    let options = RedisOptions {
        seed: Some(seed),
        ..RedisOptions::default()
    };
    RedisStore::connect(&server.url(), options)
        .await
        .expect("connect to the test redis-server")
}

async fn run(store: &RedisStore, command: StoreCommand) -> StoreReply {
    store.execute(NOW, command).await.expect("store answers")
}

fn append(conv: &ConvId, sender: UserId, id: u128) -> StoreCommand {
    StoreCommand::Append {
        conv: conv.clone(),
        sender,
        msg_id: ClientMsgId(id),
        body: Bytes::from_static(b"x"),
        now: NOW,
        order: None,
        members_known: None,
    }
}

async fn register(store: &RedisStore, name: &str) -> UserId {
    match run(
        store,
        StoreCommand::RegisterAccount {
            name: name.into(),
            password_hash: "phc".into(),
        },
    )
    .await
    {
        StoreReply::AccountRegistered(Ok(user)) => user,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_route_that_cached_an_account_learns_of_its_deletion() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let route_a = connect(&server, 1).await;
    let route_b = connect(&server, 2).await;
    let alice = register(&route_a, "alice").await;
    let bob = register(&route_a, "bob").await;
    let private = ConvId::private(alice, bob).unwrap();
    // Route A appends: both accounts are now in its cache, and bob's in `all` too.
    assert!(matches!(
        run(&route_a, append(&private, alice, 1)).await,
        StoreReply::Appended(Ok(_))
    ));
    assert!(matches!(
        run(&route_a, append(&ConvId::All, bob, 2)).await,
        StoreReply::Appended(Ok(_))
    ));
    let head = |store| async move {
        match run(store, StoreCommand::LoadHeads { user: alice }).await {
            StoreReply::Heads(heads) => heads,
            other => panic!("{other:?}"),
        }
    };
    let before = head(&route_a).await;

    // Route B deletes bob; its answer comes once every route's cache has forgotten him.
    let asked = tokio::time::Instant::now();
    match run(&route_b, StoreCommand::DeleteAccount { user: bob }).await {
        StoreReply::AccountDeleted(Some(d)) => assert!(!d.already),
        other => panic!("{other:?}"),
    }
    assert!(asked.elapsed() >= cim_io::store::ACCOUNT_CACHE_TTL);

    // Route A refuses at once, in every conversation, and stores nothing.
    assert_eq!(
        run(&route_a, append(&private, alice, 3)).await,
        StoreReply::Appended(Err(AppendError::UnknownConversation))
    );
    assert_eq!(
        run(&route_a, append(&ConvId::All, bob, 4)).await,
        StoreReply::Appended(Err(AppendError::NotMember))
    );
    assert_eq!(head(&route_a).await, before, "nothing was stored");
    // And the conversation's other user keeps its history.
    assert_eq!(
        run(&route_a, StoreCommand::LoadNames { users: vec![bob] }).await,
        StoreReply::Names(vec![(bob, Some("bob".into()))])
    );
}

#[tokio::test]
async fn the_cache_is_bounded_in_time_without_any_deletion() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let store = connect(&server, 1).await;
    let alice = register(&store, "alice").await;
    assert!(matches!(
        run(&store, append(&ConvId::All, alice, 1)).await,
        StoreReply::Appended(Ok(_))
    ));
    // Someone removes the account behind the store's back (an operator by hand, or a
    // tombstone written by a route of an older build): within the TTL the store notices.
    server.raw(&format!("HSET cim:acct:{{u:{}}} deleted 1", alice.0));
    tokio::time::sleep(cim_io::store::ACCOUNT_CACHE_TTL + Duration::from_millis(50)).await;
    assert_eq!(
        run(&store, append(&ConvId::All, alice, 2)).await,
        StoreReply::Appended(Err(AppendError::NotMember))
    );
}
