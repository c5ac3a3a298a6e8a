//! A checker that never fires proves nothing: with each canary on (one safety mechanism
//! switched off), a sweep of the scenario that exercises that mechanism must report a
//! violation within the stated number of seeds.
//!
//! Canaries exist only in a build made with `CIM_CANARIES=1` (`core/build.rs` then sets
//! `--cfg cim_canaries`); `.ci/run` runs this file so:
//!
//! ```text
//! CIM_CANARIES=1 cargo test --release -p cim-sim --test canaries
//! ```
//!
//! In an ordinary build the sweep must refuse `--canary` instead.

use std::process::Command;

use cim_core::canary::{self, Canary};

/// (canary, the sweep that exercises it, seeds within which it must be caught). Measured
/// (first failing seed from 1): idempotent append 3, epoch fencing 14, self-fencing 1, gap
/// sync 7, dedup 1, send order 5, lost-tail detection 2, move continuation 1; in
/// `shard-failover`, lost-tail detection 1, wait replicas 3, shard health 1.
///
/// Idempotent append: since the per-sender order check, a resend of an SDK message that is
/// already stored is refused as superseded even without its idempotency record, so the
/// canary shows as "refused but stored" (invariant 8) rather than as a duplicate.
///
/// Epoch fencing needs a balancer that spreads one user's racing logins over servers: with
/// consistent hashing they all reach one server, which serializes them by itself.
///
/// Lost-tail detection: with it off, a store restarted from older data numbers new messages
/// with seqs clients already hold under the same log epoch (consistency, invariant 6).
///
/// Move continuation: with it off, every client resets each conversation a restart moved,
/// and hands its carried messages over again (`ResetAcrossMove`, invariant 9).
///
/// Lost-tail detection is also caught by `shard-failover`, where one master of a sharded
/// store fails over to a replica that lagged (the rule per master's incarnation).
///
/// Wait replicas: with it off, an append is acknowledged whatever its `WAIT` answered, so
/// in the `shard-failover` runs with `WAIT` and a lagging replica a failover loses acked
/// messages (`AckedLost`, invariant 10).
///
/// Shard health: with it off, one master's outage fails every server's store health and
/// lease refresh, so servers fence users whose masters are fine, and their messages to
/// conversations on those masters wait out the outage (`StalledByOtherShard`, invariant 11).
const CAUGHT_WITHIN: [(Canary, &[&str], u64); 11] = [
    (Canary::IdempotentAppend, &["--scenario", "failover"], 30),
    (
        Canary::EpochFencing,
        &["--scenario", "duplicate-login", "--balancer", "random"],
        30,
    ),
    (Canary::SelfFencing, &["--scenario", "everything"], 30),
    (Canary::GapSync, &["--scenario", "broadcast"], 30),
    (Canary::Dedup, &["--scenario", "failover"], 30),
    (Canary::SendOrder, &["--scenario", "broadcast"], 30),
    (Canary::LostTailDetection, &["--scenario", "lost-tail"], 30),
    (Canary::MoveContinuation, &["--scenario", "lost-tail"], 30),
    (
        Canary::LostTailDetection,
        &["--scenario", "shard-failover"],
        30,
    ),
    (Canary::WaitReplicas, &["--scenario", "shard-failover"], 30),
    (Canary::ShardHealth, &["--scenario", "shard-failover"], 30),
];

fn cim_sim() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cim-sim"));
    cmd.env_remove("SIM_SEED").env_remove("SIM_SEEDS");
    cmd
}

#[test]
fn an_ordinary_build_refuses_canaries() {
    if canary::COMPILED {
        println!("a canary build: see each_canary_is_caught");
        return;
    }
    let out = cim_sim()
        .args(["--scenario", "failover", "--seed", "1", "--canary", "dedup"])
        .output()
        .expect("run cim-sim");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("CIM_CANARIES=1"), "{stderr}");
}

#[test]
fn each_canary_is_caught() {
    if !canary::COMPILED {
        println!("not a canary build (CIM_CANARIES=1): nothing to switch off");
        return;
    }
    let mut escaped = Vec::new();
    for (canary, sweep, within) in CAUGHT_WITHIN {
        let scenario = sweep.join(" ");
        let out = cim_sim()
            .args(sweep)
            .args(["--canary", canary.name()])
            .args(["--first-seed", "1", "--seeds", &within.to_string()])
            .arg("--until-violation")
            .output()
            .expect("run cim-sim");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let caught_at = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("failing seeds: ["))
            .and_then(|rest| rest.split([',', ']']).next())
            .and_then(|seed| seed.trim().parse::<u64>().ok());
        match caught_at {
            Some(seed) if out.status.code() == Some(1) => {
                println!("{canary}: caught by {scenario} at SIM_SEED={seed} (bound {within})");
                // The failing run's report starts with its full replay command and plan.
                let replay = format!(
                    "replay: CIM_CANARIES=1 SIM_SEED={seed} cargo run -p cim-sim --release -- {scenario} --canary {canary}\nfault plan:\n"
                );
                if !stdout.contains(&replay) {
                    escaped.push(format!("{canary}: no {replay:?} in\n{stdout}"));
                }
                let first = stdout
                    .lines()
                    .find(|l| l.contains("SIM_SEED="))
                    .unwrap_or("");
                println!("    {first}");
            }
            _ => escaped.push(format!(
                "{canary}: no violation in {within} seeds of {scenario}\n{stdout}"
            )),
        }
    }
    assert!(escaped.is_empty(), "{}", escaped.join("\n"));
}
