//! The testkit's Redis Cluster: it starts, every slot is served, owners are found by key, a
//! killed master's replica takes over.

use std::time::Duration;

use cim_testkit::{ClusterSetup, RedisCluster};

#[test]
fn starts_serves_every_slot_and_fails_over_a_killed_master() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "three masters: {masters:?}");
    // Keys of one hash tag share a slot and so a master.
    let key = "cim:claim:{u:1}";
    assert_eq!(cluster.slot_of(key), cluster.slot_of("cim:route:{u:1}"));
    let owner = cluster.master_of_key(key).expect("an owner");
    assert!(masters.contains(&owner));
    cluster
        .cli(owner, &["SET", key, "v"])
        .expect("the owner takes the write");
    let killed = cluster
        .kill_master_of_slot(cluster.slot_of(key))
        .expect("a master to kill");
    assert_eq!(killed, owner);
    let took = cluster
        .wait_for_failover(killed, Duration::from_secs(30))
        .expect("a replica takes over");
    eprintln!("failover took {took:?}");
    let new_owner = cluster.master_of_key(key).expect("a new owner");
    assert_ne!(new_owner, owner);
    cluster
        .restart_node(owner)
        .expect("the old master restarts");
    cluster
        .wait_until_ok(Duration::from_secs(30))
        .expect("the cluster is whole again");
}

#[test]
fn a_tls_cluster_starts() {
    let Some(cluster) = RedisCluster::start_with(ClusterSetup {
        tls: true,
        require_client_cert: true,
        ..ClusterSetup::default()
    }) else {
        return;
    };
    assert_eq!(cluster.masters().len(), 3);
    assert!(cluster.urls().iter().all(|u| u.starts_with("rediss://")));
}
