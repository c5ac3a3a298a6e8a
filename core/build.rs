//! Compiles the simulation's canaries in when `CIM_CANARIES=1` (see `src/canary.rs`).
//!
//! A `cfg`, not a Cargo feature: feature unification could switch the canaries on in a
//! production build that merely shares a dependency graph with the simulation; an
//! environment variable of one build cannot.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(cim_canaries)");
    println!("cargo::rerun-if-env-changed=CIM_CANARIES");
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var_os("CIM_CANARIES").is_some_and(|v| v == "1") {
        println!("cargo::rustc-cfg=cim_canaries");
    }
}
