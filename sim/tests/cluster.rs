//! The cluster builder end to end: a client registers, logs in through the route, and chats,
//! with the store and registry as hosts of their own on the simulated network.

use std::time::Duration;

use bytes::Bytes;
use cim_core::client::ClientEvent;
use cim_core::ids::{ConvId, UserId};
use cim_io::sdk::{Client, RouteApi};
use cim_sim::cluster::{Cluster, ClusterSpec};
use cim_sim_hosts::TurmoilNet;

#[test]
fn a_client_chats_through_a_cluster_with_remote_store_and_registry() {
    let seed: u64 = std::env::var("SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    println!("SIM_SEED={seed}");
    let mut cluster = Cluster::build(ClusterSpec::new(seed, 2, 1));
    cluster.add_client("ann", |env| async move {
        let api = RouteApi::new(
            TurmoilNet,
            env.routes[0].clone(),
            env.route_port,
            Duration::from_secs(5),
        );
        // The route may still be starting: its first answers can be refusals.
        let registered = loop {
            match api.register("ann", "ann-password").await {
                Ok(registered) => break registered,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let options = env.sdk_options(UserId(registered.user_id), "ann", "ann-password", 0);
        let (client, mut events) = Client::start(TurmoilNet, env.clock(), options);
        loop {
            match events.next().await.expect("events") {
                ClientEvent::Online { server, .. } => {
                    assert!(server.as_str().starts_with("server-"), "{server}");
                    break;
                }
                ClientEvent::LoginRejected(e) => panic!("login rejected: {e}"),
                _ => {}
            }
        }
        let ack = client
            .send(ConvId::All, Bytes::from_static(b"hello, cluster"))
            .await
            .expect("acked");
        loop {
            if let ClientEvent::Message(m) = events.next().await.expect("events") {
                assert_eq!((m.seq, m.body.as_ref()), (ack.seq, &b"hello, cluster"[..]));
                break;
            }
        }
        client.shutdown().await;
        Ok(())
    });
    cluster
        .sim
        .run()
        .unwrap_or_else(|e| panic!("SIM_SEED={seed} failed: {e}"));
    assert_eq!(
        cluster.registry.snapshot().len(),
        2,
        "both servers registered"
    );
}
