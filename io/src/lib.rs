//! `cim-io`: the tokio shell that drives the `cim-core` machines over real (or simulated)
//! sockets: the network seam, clocks, the store and registry backends, and (as they land)
//! the server, the route and the client SDK.

pub use cim_core as core;
pub use cim_proto as proto;

pub mod api;
pub mod clock;
pub mod fd_limit;
pub mod http_client;
pub mod http_server;
pub mod launch;
pub mod metrics;
pub mod net;
pub mod nonces;
pub mod ops_metrics;
pub mod private_file;
pub mod registry;
pub mod route;
pub mod sdk;
pub mod server;
pub mod store;
pub mod tls;
pub mod warn_gate;
