//! `cim up` under a real terminal (a pty), as a person runs it: Ctrl-C stops it at once,
//! without waiting for Enter, and it exits cleanly.

use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use expectrl::{ControlCode, Eof, Expect, Session};

/// The whole check, bounded: a hang fails the test instead of blocking it.
const LIMIT: Duration = Duration::from_secs(90);

#[test]
fn up_stops_on_ctrl_c_under_a_terminal_without_enter() {
    let (done, outcome) = mpsc::channel();
    std::thread::spawn(move || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cim"));
        command
            .args(["up", "--any-ports"])
            .env("RUST_LOG", "warn")
            .env("TERM", "xterm")
            .env("NO_COLOR", "1");
        let mut up = Session::spawn(command).expect("spawn cim up on a pty");
        up.set_expect_timeout(Some(Duration::from_secs(60)));
        up.expect("Ctrl-C stops").expect("cim up serving");
        // The control terminal answers a command, then waits for the next line...
        up.send("status\r").expect("type");
        up.expect("s2 running").expect("status answered");
        // A line typed but not finished: nothing may wait for its Enter.
        up.send("stat").expect("type");
        up.send(ControlCode::EndOfText).expect("Ctrl-C");
        up.expect("stopping").expect("cim up noticed Ctrl-C");
        up.expect(Eof).expect("cim up exits without Enter");
        let status = up.get_process().wait().expect("wait for cim up");
        let _ = done.send(format!("{status:?}"));
    });
    let status = outcome
        .recv_timeout(LIMIT)
        .unwrap_or_else(|_| panic!("cim up did not stop within {LIMIT:?} of Ctrl-C"));
    assert!(
        status.starts_with("Exited(") && status.ends_with(", 0)"),
        "cim up should exit 0 after Ctrl-C, got {status}"
    );
}
