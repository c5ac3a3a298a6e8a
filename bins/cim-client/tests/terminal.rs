//! The interactive mode under a real terminal (a pty): the hidden password prompt, tab
//! completion, a message printed above the prompt without losing the line being typed, and a
//! server restart: the client shows it is reconnecting, then reconnected, and what was typed
//! meanwhile is delivered.

mod common;

use std::time::Duration;

use common::{cluster, spawn, temp_dir};
use expectrl::{Eof, Expect, Session};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_chat_under_a_pty() {
    let mut cluster = cluster().await;
    let port = cluster.route_port;
    let dir = temp_dir("pty");
    let state_dir = dir.clone();
    let (mut alice, bob) = tokio::task::spawn_blocking(move || {
        let dir = state_dir;
        let mut bob = spawn(port, "bob", &dir.join("bob.json"), &[]);
        bob.status("online as bob");

        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_cim-client"));
        command
            .args(["--route", &format!("127.0.0.1:{port}"), "--user", "alice"])
            .arg("--state")
            .arg(dir.join("alice.json"))
            .env_remove("CIM_PASSWORD")
            .env_remove("CIM_USER_ID")
            .env("TERM", "xterm")
            .env("NO_COLOR", "1");
        let mut alice = Session::spawn(command).expect("pty");
        alice.set_expect_timeout(Some(Duration::from_secs(20)));

        // The password is asked for and not echoed.
        alice
            .expect("password for alice: ")
            .expect("password prompt");
        alice.send("alice-password\r").expect("type");
        let online = alice.expect("online as alice").expect("online");
        assert!(
            !String::from_utf8_lossy(online.before()).contains("alice-password"),
            "password echoed"
        );
        alice.expect("alice> ").expect("prompt");

        // `:he<Tab>` completes to `:help`.
        alice.send(":he\t").expect("type");
        alice.expect(":help ").expect("completed");
        alice.send("\r").expect("enter");
        alice.expect("online users").expect("help printed");

        // A message arriving while a line is half typed prints above it, and the line is
        // still there to finish.
        alice.send("half typed").expect("type");
        std::thread::sleep(Duration::from_millis(200));
        bob.type_line("hello alice");
        alice.expect("bob: hello alice").expect("message shown");
        alice.expect("alice> half typed").expect("line redrawn");
        alice.send(" and done\r").expect("enter");
        bob.json(|v| v["text"] == "half typed and done");

        // `@b<Tab>` completes an online user's name.
        alice.send("@b\t").expect("type");
        alice.expect("@bob ").expect("name completed");
        alice.send("psst\r").expect("enter");
        let got = bob.json(|v| v["text"] == "psst");
        assert!(got["conv"].as_str().is_some_and(|c| c.starts_with("p:")));
        bob.type_line("@alice psst back");
        alice
            .expect("[@bob] bob: psst back")
            .expect("private answer shown");

        // `:olu` lists both.
        alice.send(":olu\r").expect("enter");
        alice.expect("online (2): alice (").expect("both online");
        (alice, bob)
    })
    .await
    .expect("terminal session");

    // The server both are on stops (as `systemctl restart` stops it first).
    let stopped = cluster.stop_server().await;
    let (mut alice, mut bob) = tokio::task::spawn_blocking(move || {
        // In words, not `Draining`.
        alice
            .expect("* kicked: the server is shutting down")
            .expect("kick shown");
        alice.expect("* reconnecting").expect("reconnecting shown");
        alice
            .send("typed while the server was down\r")
            .expect("enter");
        alice.expect("· sending to all").expect("queued");
        (alice, bob)
    })
    .await
    .expect("outage");

    // ... and starts again on the same ports.
    cluster.start_again(stopped).await;
    tokio::task::spawn_blocking(move || {
        alice
            .expect("* reconnected to s1")
            .expect("reconnected shown");
        let got = bob.json(|v| v["text"] == "typed while the server was down");
        assert_eq!(got["senderName"], "alice");
        assert_eq!(got["conv"], "all");
        alice.expect("✓ acknowledged all").expect("acknowledged");

        alice.send(":q!\r").expect("quit");
        alice.expect(Eof).expect("exits");
        bob.finish();
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("recovery");
}
