//! The client's state file (`cim_io::sdk::state_file`): what a restarted client reads
//! back from disk, possibly torn, edited by hand or from another version.
//!
//! Invariants: the parser never panics; a file that parses writes back to a file that
//! parses to the same state; the client machine restores from it, starts, takes a login
//! answer and a snapshot without panicking, and its snapshot keeps the restored positions
//! and every outbox entry that was not too old (same ids, conversations and bodies, in
//! order).

use std::time::Duration;

use bytes::Bytes;
use cim_core::client::{ClientConfig, ClientSession, ClientState};
use cim_core::ids::{UnixMillis, UserId};
use cim_io::sdk::state_file;

use crate::Reached;

const WALL: u64 = 1_700_000_000_000;

pub const FEATURES: &[&str] = &["parsed", "outbox", "positions", "resume_token", "rejected"];

pub fn check(data: &[u8]) -> Reached {
    let mut reached = Reached::new();
    // The loader reads the file as UTF-8 text; other bytes are an I/O error before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        reached.insert("rejected");
        return reached;
    };
    let state = match state_file::from_json(text) {
        Ok(state) => state,
        Err(e) => {
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
            reached.insert("rejected");
            return reached;
        }
    };
    reached.insert("parsed");
    if !state.outbox.is_empty() {
        reached.insert("outbox");
    }
    if !state.convs.is_empty() {
        reached.insert("positions");
    }
    if state.resume_token.is_some() {
        reached.insert("resume_token");
    }
    let again = state_file::to_json(&state);
    let back = state_file::from_json(&again)
        .unwrap_or_else(|e| panic!("a state written back does not parse: {e}\n{again}"));
    assert_eq!(back, state, "state file round trip");

    restore(state);
    reached
}

fn restore(state: ClientState) {
    let config = ClientConfig::new(UserId(7), "fuzz", "password", 1);
    let max_age = config.outbox_max_age;
    let now = crate::origin() + Duration::from_secs(3600);
    let wall = UnixMillis(WALL);
    let fresh: Vec<(_, _, Bytes)> = state
        .outbox
        .iter()
        .filter(|m| Duration::from_millis(WALL.saturating_sub(m.created_at.0)) < max_age)
        .map(|m| (m.id, m.conv.clone(), m.body.clone()))
        .collect();
    // Positions: the last one restored for a conversation wins.
    let mut positions = std::collections::BTreeMap::new();
    for c in &state.convs {
        positions.insert(c.conv.clone(), (c.log_epoch, c.delivered));
    }
    let mut session = ClientSession::restore(config, state, now, wall);
    let snapshot = session.snapshot(now, wall);
    let kept: Vec<(_, _, Bytes)> = snapshot
        .outbox
        .iter()
        .map(|m| (m.id, m.conv.clone(), m.body.clone()))
        .collect();
    assert_eq!(kept, fresh, "the outbox after a restore");
    let restored: std::collections::BTreeMap<_, _> = snapshot
        .convs
        .iter()
        .map(|c| (c.conv.clone(), (c.log_epoch, c.delivered)))
        .collect();
    assert_eq!(restored, positions, "positions after a restore");
    session.start(now);
    while session.poll_output().is_some() {}
    let _ = session.snapshot(now, wall);
}
