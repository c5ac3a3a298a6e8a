//! The core machines together: one route, two servers, clients and the memory store under
//! a virtual clock (see `harness`). Each test ends by checking the two invariants that
//! matter most: no overlapping sessions of a user, and every member has every message of
//! its conversations exactly once, in order.

mod harness;

use std::time::Duration;

use cim_core::client::ClientEvent;
use cim_core::ids::ConvId;
use cim_core::proto::KickReason;
use cim_core::route::login::{LoginError, RouteEvent};
use harness::Cluster;

const SECOND: Duration = Duration::from_secs(1);

fn all_online(cluster: &Cluster, clients: &[usize]) -> bool {
    clients.iter().all(|&c| cluster.is_online(c))
}

#[test]
fn login_connect_send_ack_deliver() {
    let mut cluster = Cluster::new(2, 1);
    let alice = cluster.register("alice");
    let bob = cluster.register("bob");
    let a = cluster.add_client(alice, "alice", 11);
    let b = cluster.add_client(bob, "bob", 12);
    assert!(
        cluster.run_until(5 * SECOND, |c| all_online(c, &[a, b])),
        "both log in"
    );
    // Round-robin put them on different servers, so the message crosses the route.
    assert_ne!(cluster.server_of(a), cluster.server_of(b));

    let private = ConvId::private(alice, bob).unwrap();
    let hello = cluster.send(a, private.clone(), "hello bob");
    let everyone = cluster.send(b, ConvId::All, "hi all");
    cluster.run_for(2 * SECOND);

    assert_eq!(
        cluster.clients[a]
            .acked
            .get(&hello)
            .map(|(c, _, s)| (c.clone(), *s)),
        Some((private.clone(), 1))
    );
    assert!(cluster.clients[b].acked.contains_key(&everyone));
    let bob_saw: Vec<&[u8]> = cluster.clients[b]
        .app
        .iter()
        .map(|m| m.body.as_ref())
        .collect();
    assert!(
        bob_saw.contains(&b"hello bob".as_slice()),
        "bob got the private message: {bob_saw:?}"
    );
    let alice_saw: Vec<&[u8]> = cluster.clients[a]
        .app
        .iter()
        .map(|m| m.body.as_ref())
        .collect();
    assert!(
        alice_saw.contains(&b"hi all".as_slice()),
        "alice got the broadcast: {alice_saw:?}"
    );
    cluster.assert_everyone_has_everything(&[a, b]);
    cluster.assert_no_overlapping_sessions();
}

#[test]
fn duplicate_login_gets_5000_and_never_overlaps() {
    let mut cluster = Cluster::new(2, 2);
    let alice = cluster.register("alice");
    let first = cluster.add_client(alice, "alice", 21);
    assert!(cluster.run_until(5 * SECOND, |c| c.is_online(first)));

    // A second client of the same user, with no resume token: the live claim wins.
    let second = cluster.add_client(alice, "alice", 22);
    cluster.run_for(10 * SECOND);
    let rejected = cluster
        .route_events
        .iter()
        .filter(|(_, e)| {
            matches!(
                e,
                RouteEvent::LoggedIn {
                    result: Err(LoginError::RepeatLogin),
                    ..
                }
            )
        })
        .count();
    assert!(rejected >= 1, "the second login got 5000");
    assert!(cluster.is_online(first), "the first session is untouched");
    assert!(!cluster.is_online(second));
    assert_eq!(cluster.sessions.len(), 1, "only one session ever existed");
    cluster.assert_no_overlapping_sessions();
}

/// Everyone chats; one server crashes; its clients take their claims over with their
/// resume tokens and re-home to the other server long before the lease TTL (30 s) could
/// have expired; nothing acknowledged is lost, including messages sent during the failover.
#[test]
fn crashed_server_clients_rehome_at_once_and_nothing_acked_is_lost() {
    let mut cluster = Cluster::new(2, 3);
    let mut clients = Vec::new();
    let mut users = Vec::new();
    for i in 0..4 {
        let name = format!("user{i}");
        let user = cluster.register(&name);
        users.push(user);
        clients.push(cluster.add_client(user, &name, 30 + i));
    }
    assert!(cluster.run_until(5 * SECOND, |c| all_online(c, &clients)));
    let on_s1: Vec<usize> = clients
        .iter()
        .copied()
        .filter(|&c| cluster.server_of(c) == Some(0))
        .collect();
    assert_eq!(on_s1.len(), 2, "round-robin spread the clients");

    for round in 0..3 {
        for (i, &c) in clients.iter().enumerate() {
            cluster.send(c, ConvId::All, &format!("before {round} from {i}"));
            let peer = users[(i + 1) % users.len()];
            cluster.send(
                c,
                ConvId::private(users[i], peer).unwrap(),
                &format!("p {round} {i}"),
            );
        }
        cluster.run_for(Duration::from_millis(50));
    }

    let crash_at = cluster.now;
    cluster.crash(0);
    // Keep sending through the failover: the outbox must carry these over.
    for (i, &c) in clients.iter().enumerate() {
        cluster.send(c, ConvId::All, &format!("during from {i}"));
    }
    // Re-homed = every client of s1 holds a session on s2 and sees itself online again.
    let rehomed =
        |c: &Cluster| all_online(c, &clients) && on_s1.iter().all(|&x| c.server_of(x) == Some(1));
    assert!(cluster.run_until(30 * SECOND, rehomed), "everyone re-homes");
    let rehome = cluster.now - crash_at;
    println!("re-home after crash: {rehome:?}");
    assert!(
        rehome < Duration::from_secs(10),
        "re-home took {rehome:?}, not well before the 30 s lease"
    );

    for (i, &c) in clients.iter().enumerate() {
        cluster.send(c, ConvId::All, &format!("after from {i}"));
    }
    cluster.run_for(5 * SECOND);
    for &c in &clients {
        let host = &cluster.clients[c];
        assert_eq!(
            host.acked.len(),
            host.sent.len(),
            "client {c}: every message sent was acked"
        );
    }
    cluster.assert_everyone_has_everything(&clients);
    cluster.assert_no_overlapping_sessions();
}

/// A server that silently vanishes (no connection resets, the route sees nothing) is only
/// noticed by heartbeats and the registry's session timeout; the takeover waits for the
/// registry to drop it, and still re-homes well before the lease TTL.
#[test]
fn vanished_server_clients_rehome_after_registry_timeout() {
    let mut cluster = Cluster::new(2, 4);
    let alice = cluster.register("alice");
    let bob = cluster.register("bob");
    let a = cluster.add_client(alice, "alice", 41);
    let b = cluster.add_client(bob, "bob", 42);
    assert!(cluster.run_until(5 * SECOND, |c| all_online(c, &[a, b])));
    let victim = cluster.server_of(a).unwrap();
    let vanish_at = cluster.now;
    cluster.vanish(victim);
    cluster.send(a, ConvId::All, "while gone");
    assert!(cluster.run_until(30 * SECOND, |c| all_online(c, &[a, b])
        && c.server_of(a).is_some_and(|s| s != victim)));
    let rehome = cluster.now - vanish_at;
    println!("re-home after a silent server loss: {rehome:?}");
    assert!(rehome < Duration::from_secs(25), "re-home took {rehome:?}");
    cluster.run_for(3 * SECOND);
    cluster.assert_everyone_has_everything(&[a, b]);
    cluster.assert_no_overlapping_sessions();
}

/// A server cut off from the store cannot refresh its leases: it fences itself (kicks its
/// sessions) before the other server accepts the same user, who then re-homes.
#[test]
fn server_cut_off_from_store_fences_before_the_other_accepts() {
    let mut cluster = Cluster::new(2, 5);
    let alice = cluster.register("alice");
    let a = cluster.add_client(alice, "alice", 51);
    assert!(cluster.run_until(5 * SECOND, |c| c.is_online(a)));
    // Let the first sync finish: a store request the server cannot answer gets the client
    // an error frame, and it would leave on its own instead of being fenced.
    cluster.run_for(SECOND);
    let home = cluster.server_of(a).unwrap();
    cluster.cut_from_store(home, true);
    assert!(
        cluster.run_until(60 * SECOND, |c| c.server_of(a).is_some_and(|s| s != home)),
        "alice re-homes"
    );

    let fenced_at = cluster.clients[a]
        .events
        .iter()
        .find_map(|(t, e)| matches!(e, ClientEvent::Kicked(KickReason::Fenced)).then_some(*t))
        .expect("the cut-off server fenced the session");
    let old = cluster.sessions.iter().find(|s| s.server == home).unwrap();
    let new = cluster.sessions.iter().find(|s| s.server != home).unwrap();
    assert!(
        old.end.unwrap() <= new.start,
        "fenced before the other server accepted"
    );
    assert!(fenced_at <= new.start + harness::LATENCY);
    cluster.assert_no_overlapping_sessions();
    cluster.cut_from_store(home, false);
}

/// A server whose store watchdog gives up fences its sessions, then leaves the registry:
/// its user re-homes at once (no lease has to run out), and the server takes nobody until
/// the store is back.
#[test]
fn server_that_lost_the_store_fences_unlists_and_refuses() {
    let mut cluster = Cluster::new(2, 7);
    let alice = cluster.register("alice");
    let a = cluster.add_client(alice, "alice", 71);
    assert!(cluster.run_until(5 * SECOND, |c| c.is_online(a)));
    cluster.run_for(SECOND);
    let home = cluster.server_of(a).unwrap();
    let lost_at = cluster.now;
    cluster.store_lost(home, true);
    assert!(cluster.servers[home].node.is_withdrawn());
    assert!(
        cluster.run_until(10 * SECOND, |c| c.server_of(a).is_some_and(|s| s != home)),
        "alice re-homes"
    );
    assert!(
        cluster.now - lost_at < 10 * SECOND,
        "well before a lease runs out"
    );
    assert!(
        cluster.clients[a]
            .events
            .iter()
            .any(|(t, e)| *t >= lost_at && matches!(e, ClientEvent::Kicked(KickReason::Fenced))),
        "fenced"
    );
    cluster.store_lost(home, false);
    assert!(!cluster.servers[home].node.is_withdrawn());
    cluster.assert_no_overlapping_sessions();
}

/// A server loses its registry session while the route still lists it: it fences its
/// sessions and refuses every client (the route keeps sending them there) until it is
/// registered again; then the user is back on it.
#[test]
fn server_without_registry_session_refuses_until_registered_again() {
    let mut cluster = Cluster::new(1, 9);
    let alice = cluster.register("alice");
    let a = cluster.add_client(alice, "alice", 91);
    assert!(cluster.run_until(5 * SECOND, |c| c.is_online(a)));
    cluster.run_for(SECOND);
    cluster.lose_registry_session(0);
    let lost_at = cluster.now;
    cluster.run_for(20 * SECOND);
    assert!(!cluster.is_online(a), "refused while unregistered");
    assert!(cluster.servers[0].node.stats().refused_connections > 0);
    assert!(
        cluster.clients[a]
            .events
            .iter()
            .any(|(t, e)| *t >= lost_at && matches!(e, ClientEvent::Kicked(KickReason::Fenced))),
        "fenced at the loss"
    );
    assert!(
        cluster.sessions.iter().all(|s| s.start < lost_at),
        "no session started while unregistered"
    );
    cluster.register_again(0);
    assert!(
        cluster.run_until(30 * SECOND, |c| c.is_online(a)),
        "back once registered"
    );
    cluster.assert_no_overlapping_sessions();
}

/// The client's path to its server goes silent while the server stays up and still holds
/// the session. The client notices by heartbeat and logs in again with its resume token:
/// a takeover. The route holds the answer until the old server confirms it closed the old
/// session, so the two sessions never overlap, and the client is back long before the old
/// server would have reaped the silent connection (idle timeout, 30 s). The old server's
/// link with the route is slow, so an answer that did not wait would let the new session
/// start before the kick lands.
#[test]
fn takeover_waits_for_the_old_session_to_close() {
    let mut cluster = Cluster::new(2, 6);
    let alice = cluster.register("alice");
    let bob = cluster.register("bob");
    let carol = cluster.register("carol");
    let a = cluster.add_client(alice, "alice", 61);
    let b = cluster.add_client(bob, "bob", 62);
    // A third client, so that round-robin sends alice's next login to the other server.
    let c3 = cluster.add_client(carol, "carol", 63);
    assert!(cluster.run_until(5 * SECOND, |c| all_online(c, &[a, b, c3])));
    let home = cluster.server_of(a).unwrap();
    let cut_at = cluster.now;
    cluster.cut_path(a, home, true);
    cluster.slow_route_link(home, Duration::from_millis(500));
    cluster.send(b, ConvId::private(alice, bob).unwrap(), "are you there?");
    let moved =
        |c: &Cluster| c.is_online(a) && c.sessions.iter().filter(|s| s.user == alice).count() == 2;
    assert!(cluster.run_until(30 * SECOND, moved), "alice came back");
    cluster.assert_no_overlapping_sessions();
    let back = cluster.now - cut_at;
    println!("re-home after a cut path: {back:?}");
    assert!(back < Duration::from_secs(25), "took {back:?}");
    // The old session ended by the takeover's kick, not by the idle reaper.
    let old = &cluster
        .sessions
        .iter()
        .filter(|s| s.user == alice)
        .collect::<Vec<_>>()[..];
    assert!(old[0].end.is_some() && old[0].end.unwrap() - cut_at < Duration::from_secs(25));
    // At least one takeover (more if the balancer first sends alice back over the cut path).
    let takeovers = cluster
        .route_events
        .iter()
        .filter(|(_, e)| matches!(e, RouteEvent::KickOld { .. }))
        .count();
    assert!(takeovers >= 1, "alice took her claim over");
    cluster.cut_path(a, home, false);
    cluster.run_for(3 * SECOND);
    cluster.assert_everyone_has_everything(&[a, b]);
    cluster.assert_no_overlapping_sessions();
}
