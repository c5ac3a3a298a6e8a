//! `cim-proto`: the CIM wire protocol. `cim.proto` compiled by prost (through protox, so no
//! system `protoc`), and [`codec`], a sans-IO framing layer.

#[allow(clippy::all, missing_docs, missing_debug_implementations)]
mod v1 {
    include!(concat!(env!("OUT_DIR"), "/cim.v1.rs"));
}

pub use v1::*;

pub mod codec;
