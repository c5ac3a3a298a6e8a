//! One sender's burst keeps its order in the log (README: "one sender's messages keep
//! their order"): lines piped into a `cim-client --batch` before it is online, queued in
//! its outbox and sent together once it is, are stored in the order they were typed.
//!
//! The cluster runs on a multi-threaded runtime, where a store call spawned per append was
//! started newest-first (tokio's LIFO slot) and a burst came back as `10 1 2 .. 9`.

mod common;

use cim_core::ids::{ConvId, UserId};
use common::{cluster, spawn, temp_dir, user_id};

const LINES: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_typed_before_login_is_stored_in_typing_order() {
    let cluster = cluster().await;
    let dir = temp_dir("order");
    let state = dir.join("ord.json");
    let port = cluster.route_port;
    let sender = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let mut client = spawn(port, "ord", &state, &["--batch"]);
            for i in 1..=LINES {
                client.type_line(&format!("line {i}"));
            }
            // Closing stdin waits for every line's acknowledgement, then exits 0.
            client.finish();
            UserId(user_id(&state))
        })
        .await
        .expect("the client ran")
    };
    let texts: Vec<String> = cluster
        .log(sender, ConvId::All)
        .await
        .into_iter()
        .filter(|m| m.sender == sender)
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    let typed: Vec<String> = (1..=LINES).map(|i| format!("line {i}")).collect();
    assert_eq!(texts, typed, "the sender's lines sorted by seq");
}
