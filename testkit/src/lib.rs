//! Test support shared by the crates' integration tests: real backends on free ports, owned
//! by the test process, and a fault proxy to put in front of them.
//!
//! A missing `redis-server`, `java` or ZooKeeper jar skips the tests that need them with a
//! message, except under `CI=true`, where it fails them: CI installs both.

pub mod certs;
pub mod proxy;
pub mod redis;
pub mod redis_cluster;
pub mod zk;
pub mod zk_ensemble;

pub use certs::{TestCa, TestCert};
pub use proxy::Proxy;
pub use redis::{RedisServer, RedisSetup, RedisTlsSetup};
pub use redis_cluster::{ClusterSetup, ClusterTls, RedisCluster, redis_cluster, redis_cluster_tls};
pub use zk::{ZkServer, ZkTlsServer, unique_root, zookeeper, zookeeper_tls};
pub use zk_ensemble::{Mode as ZkMode, ZkEnsemble, zk_ensemble};

/// Whether this run is CI's, which must not skip anything.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
