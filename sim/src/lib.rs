//! `cim-sim`: whole-cluster simulations over turmoil. The real shell (`cim-io`) runs in
//! turmoil hosts: routes, servers, SDK clients, and — through [`cluster`] — the store and the
//! registry as hosts of their own, reached over the simulated network (the store as one
//! host, or as a Redis Cluster of one host per master). [`record`] turns a
//! run into a history, [`checker`] judges what the clients saw against what was
//! acknowledged, and [`scenarios`] are the seeded runs (`cargo run -p cim-sim -- --help`).

pub mod checker;
pub mod cluster;
pub mod record;
pub mod scenarios;
