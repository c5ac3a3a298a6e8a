//! `cim-io`: the tokio shell that drives the `cim-core` machines over real (or simulated)
//! sockets. It is filled in by the distributed-system issue; today it only re-exports the
//! layers below so the workspace layout is in place.

pub use cim_core as core;
pub use cim_proto as proto;
pub mod registry;
pub mod store;
