//! The simulation's store host and registry host under turmoil faults: what the conformance
//! suites (which run them over real sockets) cannot do — partitions in simulated time, host
//! bounces, the lossy restart, and a registry session expiring because of a partition.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cim_core::ids::{ClientMsgId, ConvId, LogEpoch, ServerId, UnixMillis, UserId};
use cim_core::memstore::MemoryStoreConfig;
use cim_core::registry::LiveServer;
use cim_core::store::{StoreCommand, StoreReply, StoreResult};
use cim_io::registry::{Registry, SessionHealth};
use cim_io::store::{MemoryBackend, Store};
use cim_sim_hosts::TurmoilNet;
use cim_sim_hosts::registry::{
    RegistryHost, RegistryHostConfig, RemoteRegistry, RemoteRegistryOptions, serve_registry,
};
use cim_sim_hosts::store::{RemoteOptions, RemoteStore, serve_store};
use tokio::time::Instant;

const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
const STORE_PORT: u16 = 6379;
const REGISTRY_PORT: u16 = 2181;
const NOW: UnixMillis = UnixMillis(1_800_000_000_000);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
const SESSION: Duration = Duration::from_secs(6);

fn seed() -> u64 {
    let seed = std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    println!("SIM_SEED={seed}");
    seed
}

fn sim(seed: u64) -> turmoil::Sim<'static> {
    turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(300))
        .rng_seed(seed)
        .build()
}

/// Asks the test's step loop for a fault and waits until it was applied. The client cannot
/// bounce a host itself (turmoil has no free function for it).
#[derive(Clone, Default)]
struct FaultRequest(Arc<AtomicU8>);

const NONE: u8 = 0;
const BOUNCE: u8 = 1;
const LOSSY_RESTART: u8 = 2;

impl FaultRequest {
    async fn ask(&self, fault: u8) {
        self.0.store(fault, Ordering::SeqCst);
        while self.0.load(Ordering::SeqCst) != NONE {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn take(&self) -> u8 {
        self.0.swap(NONE, Ordering::SeqCst)
    }
}

/// Retries `command` until the store answers, for at most `within` (simulated).
async fn until_ok(
    store: &RemoteStore<TurmoilNet>,
    command: StoreCommand,
    within: Duration,
) -> StoreReply {
    let give_up = Instant::now() + within;
    loop {
        match store.execute(NOW, command.clone()).await {
            Ok(reply) => return reply,
            Err(e) if Instant::now() < give_up => {
                tracing::debug!(%e, "store not back yet");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("store never answered {command:?} within {within:?}: {e}"),
        }
    }
}

fn register(name: &str) -> StoreCommand {
    StoreCommand::RegisterAccount {
        name: name.into(),
        password_hash: "phc".into(),
    }
}

fn append(user: UserId, n: u128) -> StoreCommand {
    StoreCommand::Append {
        conv: ConvId::All,
        sender: user,
        msg_id: ClientMsgId(n),
        body: Bytes::from_static(b"hi"),
        now: NOW,
        order: None,
        members_known: None,
    }
}

fn appended_epoch(reply: StoreReply) -> (LogEpoch, u64) {
    match reply {
        StoreReply::Appended(Ok(a)) => (a.message.log_epoch, a.message.seq),
        other => panic!("expected an append, got {other:?}"),
    }
}

/// Partition → every request fails with `StoreUnavailable` within its timeout; repair →
/// it reconnects; bounce → the data is still there; lossy restart → the data is gone and a
/// recreated log has a new log epoch.
#[test]
fn store_host_partition_bounce_and_lossy_restart() {
    let seed = seed();
    let mut sim = sim(seed);
    let backend = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
    {
        let backend = backend.clone();
        sim.host("store", move || {
            let backend = backend.clone();
            async move {
                serve_store(TurmoilNet, SocketAddr::new(ANY, STORE_PORT), backend).await?;
                Ok(())
            }
        });
    }
    let faults = FaultRequest::default();
    {
        let faults = faults.clone();
        sim.client("node", async move {
            let options = RemoteOptions {
                request_timeout: REQUEST_TIMEOUT,
                connect_timeout: Duration::from_millis(500),
                ..RemoteOptions::default()
            };
            let store = RemoteStore::new(TurmoilNet, "store", STORE_PORT, options);
            let StoreReply::AccountRegistered(Ok(ann)) =
                until_ok(&store, register("ann"), Duration::from_secs(5)).await
            else {
                panic!("ann not registered");
            };
            let (epoch, seq) = appended_epoch(store.execute(NOW, append(ann, 1)).await?);
            assert_eq!(seq, 1);
            store.health().await?;

            // Partitioned: the open connection goes quiet, so this is the request timeout.
            turmoil::partition("node", "store");
            let started = Instant::now();
            let lost: StoreResult = store.execute(NOW, append(ann, 2)).await;
            assert!(lost.is_err(), "a partitioned store answered: {lost:?}");
            assert!(
                started.elapsed() <= REQUEST_TIMEOUT + Duration::from_millis(50),
                "took {:?}",
                started.elapsed()
            );
            // A new connection cannot be made either; still bounded.
            let started = Instant::now();
            assert!(store.health().await.is_err());
            assert!(started.elapsed() <= Duration::from_secs(2));

            // Repaired: the next request reconnects. The timed-out append may or may not
            // have run (here it did not: the partition dropped it), and retrying it is safe.
            turmoil::repair("node", "store");
            let retried = until_ok(&store, append(ann, 2), Duration::from_secs(5)).await;
            assert_eq!(appended_epoch(retried), (epoch, 2));

            // Bounced: connections are cut, the data survives.
            faults.ask(BOUNCE).await;
            let account = until_ok(
                &store,
                StoreCommand::LoadAccount { user: ann },
                Duration::from_secs(5),
            )
            .await;
            assert!(
                matches!(account, StoreReply::Account(Some(ref a)) if a.name == "ann"),
                "{account:?}"
            );
            let (same_epoch, seq) = appended_epoch(store.execute(NOW, append(ann, 3)).await?);
            assert_eq!((same_epoch, seq), (epoch, 3));

            // Lossy restart: everything is gone; the log is recreated under a new epoch.
            faults.ask(LOSSY_RESTART).await;
            let account = until_ok(
                &store,
                StoreCommand::LoadAccount { user: ann },
                Duration::from_secs(5),
            )
            .await;
            assert_eq!(account, StoreReply::Account(None));
            let StoreReply::AccountRegistered(Ok(ann_again)) =
                store.execute(NOW, register("ann")).await?
            else {
                panic!("ann not registered again");
            };
            let (new_epoch, seq) = appended_epoch(store.execute(NOW, append(ann_again, 1)).await?);
            assert_eq!(seq, 1);
            assert_ne!(new_epoch, epoch, "a lost log came back under its old epoch");
            Ok(())
        });
    }
    loop {
        match faults.take() {
            BOUNCE => sim.bounce("store"),
            LOSSY_RESTART => {
                backend.reset(MemoryStoreConfig {
                    seed: seed ^ 0x5eed,
                    ..MemoryStoreConfig::default()
                });
                sim.bounce("store");
            }
            _ => {}
        }
        match sim.step() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => panic!("SIM_SEED={seed} failed: {e}"),
        }
    }
}

fn live_server(id: &str) -> LiveServer {
    LiveServer {
        id: ServerId::new(id),
        host: id.into(),
        client_port: 11211,
        link_port: 11311,
        http_port: 8081,
        connections: 0,
        client_tls: false,
        ws_port: None,
    }
}

fn registry() -> RemoteRegistry<TurmoilNet> {
    RemoteRegistry::new(
        TurmoilNet,
        "registry",
        REGISTRY_PORT,
        RemoteRegistryOptions::default(),
    )
}

/// A server partitioned from the registry host for longer than the session timeout: it
/// reports `Disconnected`, then `Expired` before the route's view drops it; the route's view
/// drops it; after the repair the entry is back in a new session and health is `Connected`.
/// A short partition (under the session timeout) loses nothing.
#[test]
fn registry_partition_expires_the_session_like_zookeeper() {
    let seed = seed();
    let mut sim = sim(seed);
    let host = Arc::new(RegistryHost::new(RegistryHostConfig {
        session_timeout: SESSION,
    }));
    {
        let host = host.clone();
        sim.host("registry", move || {
            let host = host.clone();
            async move {
                serve_registry(TurmoilNet, SocketAddr::new(ANY, REGISTRY_PORT), host).await?;
                Ok(())
            }
        });
    }
    let id = ServerId::new("s1");
    let (server_done_tx, server_done_rx) = tokio::sync::watch::channel(false);
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(0u8);
    // Set by the server once it knows its session is lost: the route must not drop it first.
    let server_fenced = Arc::new(AtomicBool::new(false));
    {
        let id = id.clone();
        let server_fenced = server_fenced.clone();
        sim.client("s1", async move {
            let reg = registry().register(live_server("s1")).await?;
            let mut health = reg.health();
            reg.update(3).await?;
            let mut phase = phase_rx;

            // Short partition: Disconnected, back to Connected, no session lost.
            phase.wait_for(|p| *p == 1).await?;
            turmoil::partition("s1", "registry");
            health
                .wait_for(|h| matches!(h, SessionHealth::Disconnected { .. }))
                .await?;
            turmoil::repair("s1", "registry");
            tokio::time::timeout(SESSION, health.wait_for(|h| h.is_connected())).await??;
            assert_eq!(reg.sessions_lost(), 0);

            // Long partition.
            phase.wait_for(|p| *p == 2).await?;
            let cut_at = Instant::now();
            turmoil::partition("s1", "registry");
            health.wait_for(|h| *h == SessionHealth::Expired).await?;
            server_fenced.store(true, Ordering::SeqCst);
            let expired_after = cut_at.elapsed();
            assert!(
                expired_after < SESSION,
                "declared Expired only after {expired_after:?}"
            );
            assert_eq!(reg.sessions_lost(), 1);
            // Kept and published with the recreated entry.
            assert!(reg.update(9).await.is_err());
            // Stay cut off past the host's expiry, so the route sees the entry go.
            tokio::time::sleep(SESSION * 2).await;
            turmoil::repair("s1", "registry");
            tokio::time::timeout(SESSION * 2, health.wait_for(|h| h.is_connected())).await??;
            assert_eq!(reg.sessions_lost(), 1);
            let _ = id;
            // Keep the registration alive until the route has checked the recreated entry.
            server_done_rx.clone().wait_for(|d| *d).await?;
            Ok(())
        });
    }
    sim.client("route", async move {
        let view = registry().watch().await?;
        let first = view
            .wait_until(Duration::from_secs(5), |m| {
                m.get(&id).is_some_and(|s| s.connections == 3)
            })
            .await?;
        assert_eq!(first[&id].host, "s1");

        // The short partition: the entry never leaves.
        let mut servers = view.servers();
        phase_tx.send_replace(1);
        let left = tokio::time::timeout(SESSION * 2, servers.wait_for(|m| !m.contains_key(&id)));
        assert!(left.await.is_err(), "entry left during a short partition");

        // The long partition: the entry goes once the host expires the session...
        let cut_at = Instant::now();
        phase_tx.send_replace(2);
        view.wait_until(SESSION * 2, |m| !m.contains_key(&id))
            .await?;
        let gone_after = cut_at.elapsed();
        assert!(
            server_fenced.load(Ordering::SeqCst),
            "the route dropped the server before it knew its session was lost"
        );
        // The host last heard a ping at most T/4 before the cut, and checks every T/20.
        assert!(
            gone_after >= SESSION * 3 / 4 && gone_after <= SESSION + SESSION / 10,
            "entry dropped {gone_after:?} after the cut (session timeout {SESSION:?})"
        );
        // ...and comes back after the repair, with the count published while cut off.
        let back = view
            .wait_until(SESSION * 5, |m| {
                m.get(&id).is_some_and(|s| s.connections == 9)
            })
            .await?;
        assert_eq!(back[&id].client_port, 11211);
        server_done_tx.send_replace(true);
        Ok(())
    });
    sim.run()
        .unwrap_or_else(|e| panic!("SIM_SEED={seed} failed: {e}"));
    assert!(host.has_node(&ServerId::new("s1")));
}
