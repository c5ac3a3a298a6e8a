//! Two real `cim-client` processes in non-interactive mode against an in-process cluster.

mod common;

use common::{cluster, spawn, temp_dir, user_id};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_chat_in_all_and_privately() {
    let cluster = cluster().await;
    let dir = temp_dir("chat");
    let (alice_state, bob_state) = (dir.join("alice.json"), dir.join("bob.json"));
    let port = cluster.route_port;

    let (alice_id, bob_id, alice_seen) = tokio::task::spawn_blocking(move || {
        let mut alice = spawn(port, "alice", &alice_state, &[]);
        let mut bob = spawn(port, "bob", &bob_state, &[]);
        alice.status("registered alice");
        alice.status("online as alice");
        bob.status("online as bob");
        let (alice_id, bob_id) = (user_id(&alice_state), user_id(&bob_state));
        assert_ne!(alice_id, bob_id);

        // `:olu` lists both.
        alice.type_line(":olu");
        let olu = alice.json(|v| v["command"] == "olu");
        let mut names: Vec<&str> = olu["result"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|u| u["userName"].as_str())
            .collect();
        names.sort();
        assert_eq!(names, ["alice", "bob"]);

        // Plain text goes to `all`; a mistyped command is never sent.
        alice.type_line(":nope secret words");
        alice.type_line("hello everyone");
        let got = bob.json(|v| v["text"] == "hello everyone");
        assert_eq!(got["conv"], "all");
        assert_eq!(got["sender"], alice_id);
        assert_eq!(got["senderName"], "alice");
        assert!(got["seq"].as_u64().is_some_and(|s| s >= 1));
        assert!(got["at"].as_u64().is_some_and(|at| at > 0));
        alice.status("acknowledged all");

        // Private, by name and by id.
        let private = format!("p:{}:{}", alice_id.min(bob_id), alice_id.max(bob_id));
        bob.type_line("@alice just you and me");
        let got = alice.json(|v| v["text"] == "just you and me");
        assert_eq!(got["conv"], private.as_str());
        assert_eq!(got["senderName"], "bob");
        alice.type_line(&format!("@{bob_id} by id"));
        let got = bob.json(|v| v["text"] == "by id");
        assert_eq!(got["conv"], private.as_str());

        // Server history and the local search.
        bob.type_line(":his alice");
        let his = bob.json(|v| v["command"] == "his");
        let texts: Vec<&str> = his["result"]
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|m| m["text"].as_str())
            .collect();
        assert_eq!(texts, ["just you and me", "by id"]);
        bob.type_line(":q everyone");
        let found = bob.json(|v| v["command"] == "q");
        assert_eq!(found["result"][0]["text"], "hello everyone");

        let bob_seen = bob.finish();
        assert!(
            !bob_seen.iter().any(|l| l.contains("secret")),
            "an unknown command was sent: {bob_seen:?}"
        );
        (alice_id, bob_id, alice.finish())
    })
    .await
    .expect("clients");
    assert!(
        alice_seen
            .iter()
            .any(|l| l.contains("unknown command :nope")),
        "{alice_seen:?}"
    );

    // A restart keeps the account (no second registration) and sends what is given.
    let alice_state = dir.join("alice.json");
    tokio::task::spawn_blocking(move || {
        let mut alice = spawn(port, "alice", &alice_state, &["--send", "back again"]);
        let echo = alice.json(|v| v["text"] == "back again");
        assert_eq!(echo["sender"], alice_id);
        let seen = alice.finish();
        assert!(!seen.iter().any(|l| l.contains("registered")), "{seen:?}");
        assert_eq!(user_id(&alice_state), alice_id);
        let _ = bob_id;
    })
    .await
    .expect("restart");
    let _ = std::fs::remove_dir_all(&dir);
}
