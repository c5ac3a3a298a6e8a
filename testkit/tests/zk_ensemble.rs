//! The ensemble itself: it starts with a leader, keeps serving when its leader is killed,
//! stops serving without a majority, and serves again when a member comes back.

use std::time::Duration;

use cim_testkit::zk_ensemble::now;
use cim_testkit::{ZkEnsemble, ZkMode};

#[test]
fn an_ensemble_elects_survives_one_death_and_needs_a_majority() {
    let Some(ensemble) = ZkEnsemble::start() else {
        return;
    };
    println!(
        "ensemble {} up in {:?}",
        ensemble.connect_string(),
        ensemble.startup
    );
    assert_eq!(ensemble.connect_string().split(',').count(), 3);
    let leader = ensemble.leader().expect("a leader once started");

    ensemble.kill(leader);
    assert!(!ensemble.is_running(leader));
    assert_eq!(
        ensemble.mode(leader),
        None,
        "a killed member does not answer"
    );
    let killed = now();
    ensemble
        .wait_for_quorum(Duration::from_secs(30), 2)
        .expect("the two others elect a leader");
    let new_leader = ensemble.leader().expect("a new leader");
    assert_ne!(new_leader, leader);
    println!(
        "new leader elected {:?} after the leader's SIGKILL",
        killed.elapsed()
    );

    // Without a majority the last member answers but does not serve.
    ensemble.kill(new_leader);
    let last = (0..3).find(|&m| m != leader && m != new_leader).unwrap();
    let deadline = now() + Duration::from_secs(10);
    while ensemble.mode(last) != Some(ZkMode::NotServing) {
        assert!(now() < deadline, "the last member kept serving alone");
        std::thread::sleep(Duration::from_millis(100));
    }

    ensemble.restart(leader).expect("restart");
    let restarted = now();
    ensemble
        .wait_for_quorum(Duration::from_secs(30), 2)
        .expect("a majority again");
    println!(
        "serving again {:?} after one member's restart",
        restarted.elapsed()
    );
}
