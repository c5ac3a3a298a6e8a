//! Two real `cim-client` processes in non-interactive mode against an in-process cluster.

mod common;

use std::time::Duration;

use cim_core::ids::{ClientMsgId, UserId};
use cim_io::api::LoginRequest;
use cim_io::net::TokioNet;
use cim_io::sdk::RouteApi;
use common::{cluster, spawn, spawn_as, state_json, temp_dir, user_id};

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
        // The mistyped line is the run's failure: exit code 9 (a bad input line).
        let (code, alice_seen) = alice.exit();
        assert_eq!(code, Some(9), "{alice_seen:?}");
        (alice_id, bob_id, alice_seen)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_crash_shows_reconnecting_and_delivers_what_was_typed_meanwhile() {
    let mut cluster = cluster().await;
    let dir = temp_dir("crash");
    let port = cluster.route_port;
    let (alice_state, bob_state) = (dir.join("alice.json"), dir.join("bob.json"));
    let (alice, bob) = tokio::task::spawn_blocking(move || {
        let mut alice = spawn(port, "alice", &alice_state, &[]);
        let mut bob = spawn(port, "bob", &bob_state, &[]);
        alice.status("online as alice");
        bob.status("online as bob");
        (alice, bob)
    })
    .await
    .expect("clients");

    cluster.crash_server();
    let (alice, bob) = tokio::task::spawn_blocking(move || {
        let (mut alice, bob) = (alice, bob);
        alice.status("reconnecting");
        alice.type_line("typed during the outage");
        alice.status("sending to all");
        (alice, bob)
    })
    .await
    .expect("outage");

    cluster.start_server().await;
    let (alice, bob) = tokio::task::spawn_blocking(move || {
        let (mut alice, mut bob) = (alice, bob);
        alice.status("* reconnected");
        let got = bob.json(|v| v["text"] == "typed during the outage");
        assert_eq!(got["senderName"], "alice");
        alice.status("acknowledged all");
        (alice, bob)
    })
    .await
    .expect("recovery");
    tokio::task::spawn_blocking(move || {
        alice.finish();
        bob.finish();
    })
    .await
    .expect("exit");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_the_route_forgot_is_registered_again() {
    let dir = temp_dir("forgot");
    let alice_state = dir.join("alice.json");
    let old = cluster().await;
    let port = old.route_port;
    let state = alice_state.clone();
    let old_id = tokio::task::spawn_blocking(move || {
        let mut alice = spawn(port, "alice", &state, &[]);
        alice.status("online as alice");
        alice.finish();
        user_id(&state)
    })
    .await
    .expect("first run");
    drop(old);

    // A new cluster with an empty store, where the old id belongs to someone else.
    let fresh = cluster().await;
    let port = fresh.route_port;
    tokio::task::spawn_blocking(move || {
        let mut carol = spawn(port, "carol", &dir.join("carol.json"), &[]);
        carol.status("online as carol");
        assert_eq!(user_id(&dir.join("carol.json")), old_id);
        let mut alice = spawn(port, "alice", &alice_state, &[]);
        alice.status("registered again");
        alice.status("online as alice");
        alice.type_line("still me");
        carol.json(|v| v["text"] == "still me" && v["senderName"] == "alice");
        alice.finish();
        carol.finish();
        assert_ne!(user_id(&alice_state), old_id);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("second run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_survives_a_kill_and_a_quit() {
    let cluster = cluster().await;
    let dir = temp_dir("delay");
    let port = cluster.route_port;
    tokio::task::spawn_blocking(move || {
        let (alice_state, bob_state) = (dir.join("alice.json"), dir.join("bob.json"));
        let mut bob = spawn(port, "bob", &bob_state, &[]);
        bob.status("online as bob");
        let mut alice = spawn(port, "alice", &alice_state, &[]);
        alice.status("online as alice");

        // Killed before the delay fires: it is on disk with its due time.
        alice.type_line(":delay 2 survives a kill");
        alice.status("will send in 2s");
        alice.kill();
        let delayed = state_json(&alice_state)["delayed"].clone();
        assert_eq!(delayed.as_array().map(Vec::len), Some(1), "{delayed}");
        assert_eq!(delayed[0]["line"], ":g all survives a kill");

        // The next run sends it at its time, and a delay set then survives `:q!`.
        let mut alice = spawn(port, "alice", &alice_state, &[]);
        alice.status("1 delayed message(s) from the last run");
        let got = bob.json(|v| v["text"] == "survives a kill");
        assert_eq!(got["senderName"], "alice");
        assert_eq!(got["conv"], "all");
        alice.status("acknowledged all");
        alice.type_line(":delay 1 @bob survives a quit");
        alice.status("will send in 1s");
        // `:info` counts it.
        alice.type_line(":info");
        let info = alice.json(|v| v["command"] == "info");
        assert_eq!(
            info["result"]["delayed"][0]["line"], "@bob survives a quit",
            "{info}"
        );
        alice.type_line(":q!");
        alice.finish();
        let delayed = state_json(&alice_state)["delayed"].clone();
        assert_eq!(delayed.as_array().map(Vec::len), Some(1), "{delayed}");
        assert_eq!(delayed[0]["line"], "@bob survives a quit");

        // A run with no input of its own waits for it (it is due within --drain-secs).
        let seen = spawn(port, "alice", &alice_state, &["--batch"]).finish();
        assert!(
            seen.iter().any(|l| l.contains("acknowledged @bob")),
            "{seen:?}"
        );
        let got = bob.json(|v| v["text"] == "survives a quit");
        assert!(got["conv"].as_str().is_some_and(|c| c.starts_with("p:")));
        assert!(
            state_json(&alice_state).get("delayed").is_none(),
            "sent delays leave the file"
        );
        bob.finish();
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("clients");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_never_seen_online_is_shown_by_name() {
    let cluster = cluster().await;
    let dir = temp_dir("names");
    let port = cluster.route_port;
    let alice_state = dir.join("alice.json");
    let state = alice_state.clone();
    let alice_id = tokio::task::spawn_blocking(move || {
        let mut alice = spawn(port, "alice", &state, &[]);
        alice.status("online as alice");
        alice.finish();
        user_id(&state)
    })
    .await
    .expect("first run");

    // Bob only ever talks over HTTP: he never holds a session, so no online list has him,
    // and he writes while alice is away.
    let api = RouteApi::new(TokioNet, "127.0.0.1", port, Duration::from_secs(20));
    let bob = api
        .register("bob", "bob-password")
        .await
        .expect("register bob");
    let login = api
        .login(&LoginRequest {
            resume_secret: None,
            user_id: bob.user_id,
            user_name: "bob".into(),
            password: "bob-password".into(),
            resume_token: None,
        })
        .await
        .expect("bob logs in");
    let bob_id = UserId(bob.user_id);
    api.group_route(
        &login.token,
        bob_id,
        None,
        "to all from bob",
        ClientMsgId(1),
    )
    .await
    .expect("bob says to all");
    api.p2p_route(
        &login.token,
        bob_id,
        UserId(alice_id),
        "to alice from bob",
        ClientMsgId(2),
    )
    .await
    .expect("bob whispers to alice");

    tokio::task::spawn_blocking(move || {
        let mut alice = spawn(port, "alice", &alice_state, &[]);
        // Both synced, in either order.
        let mut texts = Vec::new();
        for _ in 0..2 {
            let got = alice.json(|v| v["sender"] == bob.user_id);
            assert_eq!(got["senderName"], "bob", "{got}");
            texts.push(got["text"].as_str().expect("text").to_owned());
        }
        texts.sort();
        assert_eq!(texts, ["to alice from bob", "to all from bob"]);
        alice.type_line(":his");
        let his = alice.json(|v| v["command"] == "his");
        let from_bob: Vec<&serde_json::Value> = his["result"]
            .as_array()
            .expect("list")
            .iter()
            .filter(|m| m["sender"] == bob.user_id)
            .collect();
        assert_eq!(from_bob.len(), 1, "{his}");
        assert_eq!(from_bob[0]["senderName"], "bob", "{his}");
        alice.finish();
        // The name is kept for the next run.
        assert_eq!(
            state_json(&alice_state)["users"][bob.user_id.to_string()],
            "bob"
        );
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("second run");
}

/// Item 5: after the store was reset, an id the client knew by one name may belong to
/// someone else. The client must not show the old name for the new person.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_from_before_a_store_reset_are_not_reused() {
    let dir = temp_dir("reset-names");
    let alice_state = dir.join("alice.json");
    let old = common::cluster_seeded(1).await;
    let port = old.route_port;
    let (state, d) = (alice_state.clone(), dir.clone());
    let bob_id = tokio::task::spawn_blocking(move || {
        let mut alice = spawn(port, "alice", &state, &[]);
        alice.status("online as alice");
        let mut bob = spawn(port, "bob", &d.join("bob.json"), &["--send", "bob here"]);
        bob.json(|v| v["text"] == "bob here");
        bob.finish();
        alice.json(|v| v["text"] == "bob here" && v["senderName"] == "bob");
        alice.finish();
        user_id(&d.join("bob.json"))
    })
    .await
    .expect("first store");
    drop(old);

    // A fresh store: alice registers again first (same id as before), then mallory gets
    // bob's old id.
    let fresh = common::cluster_seeded(2).await;
    let port = fresh.route_port;
    tokio::task::spawn_blocking(move || {
        let mut again = spawn(port, "alice", &dir.join("alice-new.json"), &[]);
        again.status("online as alice");
        again.finish();
        assert_eq!(user_id(&dir.join("alice-new.json")), user_id(&alice_state));
        let mut mallory = spawn(
            port,
            "mallory",
            &dir.join("mallory.json"),
            &["--send", "mallory here"],
        );
        mallory.json(|v| v["text"] == "mallory here");
        mallory.finish();
        assert_eq!(user_id(&dir.join("mallory.json")), bob_id);

        // Alice's old state file still maps that id to bob.
        let mut alice = spawn(port, "alice", &alice_state, &[]);
        let got = alice.json(|v| v["text"] == "mallory here");
        assert_eq!(got["senderName"], "mallory", "{got}");
        alice.finish();
        assert_eq!(
            state_json(&alice_state)["users"][bob_id.to_string()],
            "mallory"
        );
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("second store");
}

/// Item 6: one state file for every spelling of one route; "name is taken" says how to
/// log in as that user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_is_keyed_by_a_normalized_route_and_a_taken_name_shows_the_way_out() {
    let cluster = cluster().await;
    let port = cluster.route_port;
    let dir = temp_dir("route-key");
    tokio::task::spawn_blocking(move || {
        let data = dir.join("data");
        let run = |route: &str, user: &str, extra: &[&str]| {
            common::spawn_env(
                route,
                user,
                // One account regardless of the name's case: one password.
                &format!("{}-password", user.to_lowercase()),
                None,
                extra,
                &[("XDG_DATA_HOME", data.to_str().expect("utf-8"))],
            )
        };
        let seen = run(&format!("127.0.0.1:{port}"), "alice", &["--send", "one"]).finish();
        assert!(
            seen.iter().any(|l| l.contains("registered alice")),
            "{seen:?}"
        );
        for route in [
            format!("http://localhost:{port}"),
            format!("http://LOCALHOST:{port}/"),
            format!("http://[::1]:{port}"),
        ] {
            // (::1 may not reach a route bound to 127.0.0.1: only the key matters here,
            // so that one only needs to not register.)
            let mut client = run(&route, "Alice", &["--send", "again", "--drain-secs", "2"]);
            if !route.contains("::1") {
                client.json(|v| v["text"] == "again");
            }
            let (_, seen) = client.exit();
            assert!(
                !seen
                    .iter()
                    .any(|l| l.contains("registered") || l.contains("taken")),
                "{route}: {seen:?}"
            );
        }
        let files: Vec<_> = std::fs::read_dir(data.join("cim"))
            .expect("data dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");

        // Another machine (another data dir) has no state for alice: the name is taken.
        let (code, seen) = common::spawn_env(
            &format!("127.0.0.1:{port}"),
            "alice",
            "alice-password",
            Some(&dir.join("elsewhere.json")),
            &["--send", "x"],
            &[],
        )
        .exit();
        assert_eq!(code, Some(4), "{seen:?}");
        assert!(seen.iter().any(|l| l.contains("--user-id")), "{seen:?}");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("clients");
}

/// Item 7: a script logging in as a user whose session is held by a client without this
/// machine's state file stops at once with code 11, instead of retrying "repeat login"
/// until the drain deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_blocked_by_another_session_exits_11_at_once() {
    let cluster = cluster().await;
    let port = cluster.route_port;
    let dir = temp_dir("repeat");
    tokio::task::spawn_blocking(move || {
        let mut alice = spawn(port, "alice", &dir.join("alice.json"), &[]);
        alice.status("online as alice");
        let id = user_id(&dir.join("alice.json")).to_string();
        let started = common::now();
        let (code, seen) = common::spawn_as(
            &format!("http://localhost:{port}"),
            "alice",
            "alice-password",
            &dir.join("other-machine.json"),
            &["--user-id", &id, "--send", "hi", "--drain-secs", "30"],
        )
        .exit();
        assert_eq!(code, Some(11), "{seen:?}");
        assert!(
            seen.iter()
                .any(|l| l.contains("alice is logged in elsewhere")),
            "{seen:?}"
        );
        assert!(seen.iter().any(|l| l.contains("not sent")), "{seen:?}");
        // Retrying would last the whole --drain-secs 30.
        let took = common::now() - started;
        assert!(took < Duration::from_secs(15), "{took:?}");
        alice.finish();
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("clients");
}

/// A later run logs in with the resumption secret its last run saved: no password needed
/// (a wrong one given anyway changes nothing). Once the secret is revoked, the password is
/// the only way in: the wrong one is then a rejected login (exit code 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_run_logs_in_by_its_resumption_secret_until_revoked() {
    let cluster = cluster().await;
    let dir = temp_dir("resume");
    let port = cluster.route_port;
    let state = dir.join("alice.json");
    let route = format!("http://127.0.0.1:{port}");
    let (first_state, first_route) = (state.clone(), route.clone());
    let alice_id = tokio::task::spawn_blocking(move || {
        let mut alice = spawn(port, "alice", &first_state, &[]);
        alice.status("online as alice");
        alice.finish();
        let session = state_json(&first_state)["session"].clone();
        assert!(session["resumeSecret"].is_string(), "{session}");
        let mut again = spawn_as(&first_route, "alice", "not-her-password", &first_state, &[]);
        again.status("online as alice");
        again.finish();
        user_id(&first_state)
    })
    .await
    .expect("clients");
    let revoked = cluster
        .store
        .execute(
            cim_io::clock::Clock::System.wall(),
            cim_core::store::StoreCommand::RevokeResumption {
                user: UserId(alice_id),
            },
        )
        .await
        .expect("store");
    assert_eq!(
        revoked,
        cim_core::store::StoreReply::ResumptionRevoked { revoked: true }
    );
    let (code, seen) = tokio::task::spawn_blocking(move || {
        let mut alice = spawn_as(&route, "alice", "not-her-password", &state, &[]);
        alice.status("login rejected: wrong password");
        alice.exit()
    })
    .await
    .expect("client");
    assert_eq!(code, Some(3), "{}", seen.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
