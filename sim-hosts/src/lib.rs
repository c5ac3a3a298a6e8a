//! What only simulations and tests run, kept out of `cim-io` so that no production binary
//! depends on turmoil or carries a simulated backend:
//!
//! - [`net::TurmoilNet`] — turmoil's sockets behind the shell's network seam;
//! - [`store`] — the store as a host of its own ([`serve_store`] over a `MemoryBackend`) and
//!   [`RemoteStore`], the `Store` that talks to it;
//! - [`sharded`] — [`ShardedStore`], a Redis Cluster's client over several store hosts
//!   (one per master): commands placed by hash slot, multi-user ones split per master;
//! - [`registry`] — the registry as a host modelling ZooKeeper sessions ([`serve_registry`]
//!   over a [`RegistryHost`]) and [`RemoteRegistry`], whose registrations run the same
//!   `RegistryKeeper` driver plumbing (`cim_io::registry::keeper`) as `ZkRegistry`.
//!
//! Both hosts are generic over the network, so they also run over real sockets in tests
//! (`tests/remote_backends.rs`, and `cim-io`'s conformance suites).

pub mod net;
pub mod registry;
pub mod sharded;
pub mod store;

pub use net::TurmoilNet;
pub use registry::{
    RegistryHost, RegistryHostConfig, RemoteRegistry, RemoteRegistryOptions, serve_registry,
    serve_registry_on,
};
pub use sharded::ShardedStore;
pub use store::{
    RemoteOptions, RemoteStore, Replica, serve_store, serve_store_on, serve_store_with_replica,
};
