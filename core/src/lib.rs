//! `cim-core`: CIM's protocol machines, sans I/O.
//!
//! Deterministic: no networking, no threads, no clock reads, no global randomness. Every
//! machine has one shape:
//!
//! - `handle_*(&mut self, now, input)` feeds one input (a frame, a store reply, a registry
//!   change, an expired timer, an application command);
//! - `poll_output()` drains the outputs that input caused (frames to send, store commands,
//!   application events, answers), one enum per machine, in the order the shell must carry
//!   them out; **after every `handle_*` the caller drains `poll_output` until it returns
//!   `None`**. Every answer is an output, never a return value. The route's two machines
//!   drain through one facade, [`route_node::RouteNode`];
//! - `poll_timeout()` names the next deadline and why (which timer); the caller calls
//!   `handle_timeout(now)` when it passes.
//! - A machine that asked the store for something takes the answer in
//!   `handle_store_reply`.
//!
//! Time comes in as [`time::Instant`] (monotonic deadlines, from a number any shell can give) and [`ids::UnixMillis`]
//! (wall clock, for tickets and leases in the store). Randomness comes from a seeded RNG the
//! machine owns. Maps whose order can reach an output are `BTreeMap`s. Network input never
//! panics.

pub mod accounts;
pub mod canary;
pub mod client;
pub mod conv_log;
pub mod groups;
pub mod history;
pub mod ids;
pub mod link_auth;
pub mod login_throttle;
pub mod memstore;
pub mod registry;
pub mod registry_keeper;
pub mod route;
pub mod server;
pub mod slots;
pub mod store;
pub mod time;

pub use cim_proto as proto;
