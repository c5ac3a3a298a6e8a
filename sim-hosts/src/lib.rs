//! What only simulations and tests run, kept out of `cim-io` so that no production binary
//! depends on turmoil or carries a simulated backend:
//!
//! - [`net::TurmoilNet`] — turmoil's sockets behind the shell's network seam;
//! - [`store`] — the store as a host of its own ([`serve_store`] over a `MemoryBackend`) and
//!   [`RemoteStore`], the `Store` that talks to it;
//! - [`registry`] — the registry as a host modelling ZooKeeper sessions ([`serve_registry`]
//!   over a [`RegistryHost`]) and [`RemoteRegistry`], whose registrations run the same
//!   `RegistryKeeper` driver plumbing (`cim_io::registry::keeper`) as `ZkRegistry`.
//!
//! Both hosts are generic over the network, so they also run over real sockets in tests
//! (`tests/remote_backends.rs`, and `cim-io`'s conformance suites).

pub mod net;
pub mod registry;
pub mod store;

pub use net::TurmoilNet;
pub use registry::{
    RegistryHost, RegistryHostConfig, RemoteRegistry, RemoteRegistryOptions, serve_registry,
    serve_registry_on,
};
pub use store::{RemoteOptions, RemoteStore, serve_store, serve_store_on};
