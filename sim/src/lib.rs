//! `cim-sim`: whole-cluster simulations over turmoil. Built by the simulation issue; the
//! in-memory multi-node harness of the core machines lives in `cim-core`'s tests today.

pub mod checker;
