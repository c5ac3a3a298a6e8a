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

        // History reads like the live chat: `[@bob]`, not the conversation's key.
        alice.send(":his bob\r").expect("enter");
        alice
            .expect("[@bob] you: psst")
            .expect("own line in history");
        alice
            .expect("[@bob] bob: psst back")
            .expect("history as live");
        // A refused command in words, without HTTP or CIM codes.
        alice.send(":his nosuchgroup\r").expect("enter");
        let refused = alice
            .expect(expectrl::Regex(r"! [^\r\n]+"))
            .expect("the refusal");
        let refused = String::from_utf8_lossy(refused.get(0).expect("match")).into_owned();
        assert!(
            !refused.contains("403") && !refused.contains("4000"),
            "{refused}"
        );

        // `:olu` lists both.
        alice.send(":olu\r").expect("enter");
        alice.expect("online (2): alice (").expect("both online");

        // Someone who came online after alice's list was fetched completes at the first Tab.
        let mut carol = spawn(port, "carol", &dir.join("carol.json"), &[]);
        carol.status("online as carol");
        alice.send("@ca\t").expect("type");
        alice
            .expect("@carol ")
            .expect("a new name completed at once");
        alice.send("hi\r").expect("enter");
        carol.json(|v| v["text"] == "hi");
        carol.finish();

        // Ctrl-C clears the line and says how to quit.
        alice.send("\x03").expect("Ctrl-C");
        alice
            .expect("(Ctrl-C clears the line; :q! or Ctrl-D quits)")
            .expect("quit hint");
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
        let shown = alice.expect("* reconnecting").expect("reconnecting shown");
        // No protocol internals or raw diagnostics between the lines.
        let screen = String::from_utf8_lossy(shown.before()).into_owned();
        for internal in ["WARN", "epoch", "INFO", "\x1b[2m"] {
            assert!(
                !screen.contains(internal),
                "{internal:?} on screen:\n{screen}"
            );
        }
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
        alice.expect("* reconnected").expect("reconnected shown");
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

/// Runs `script` with `sh` under a pty, as a user types it at a shell prompt: stdout and
/// stderr are the terminal, stdin is whatever the script pipes in. `$CIM_CLIENT` is the
/// client. Returns everything printed and the script's `exit=<code>` line's code.
fn shell(script: &str, password: &str) -> (String, i32) {
    let mut command = std::process::Command::new("sh");
    command
        .arg("-c")
        .arg(format!("{script}; echo \"exit=$?\""))
        .env("CIM_CLIENT", env!("CARGO_BIN_EXE_cim-client"))
        .env("CIM_PASSWORD", password)
        .env_remove("CIM_USER_ID")
        .env("TERM", "xterm")
        .env("NO_COLOR", "1");
    let mut session = Session::spawn(command).expect("pty");
    session.set_expect_timeout(Some(Duration::from_secs(30)));
    let found = session
        .expect(expectrl::Regex(r"exit=(\d+)"))
        .unwrap_or_else(|e| panic!("{script}: no exit line: {e}"));
    let output = String::from_utf8_lossy(found.before()).into_owned();
    let code = std::str::from_utf8(found.get(1).expect("code"))
        .expect("digits")
        .parse()
        .expect("a number");
    (output, code)
}

/// Item 1: commands piped in before the login completes wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piped_commands_wait_for_the_session() {
    let cluster = cluster().await;
    let port = cluster.route_port;
    let dir = temp_dir("piped");
    tokio::task::spawn_blocking(move || {
        let mut bob = spawn(port, "bob", &dir.join("bob.json"), &[]);
        bob.status("online as bob");
        bob.type_line("hello from bob");
        bob.status("acknowledged all");
        // A new user, so the pipe is read while registering and logging in.
        let (out, code) = shell(
            &format!(
                "printf ':olu\\n:groups\\n:his bob\\n:his all 5\\n' | \"$CIM_CLIENT\" --route http://127.0.0.1:{port} --user carol --state {}",
                dir.join("carol.json").display()
            ),
            "carol-password",
        );
        assert_eq!(code, 0, "{out}");
        for command in ["olu", "groups", "his"] {
            assert!(
                out.contains(&format!("\"command\":\"{command}\"")),
                "no {command} result:\n{out}"
            );
        }
        assert!(out.contains("\"userName\":\"bob\""), "bob online:\n{out}");
        assert!(!out.contains("not online yet"), "{out}");
        assert!(!out.contains("not logged in"), "{out}");
        bob.finish();
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("script");
}

/// Items 2 and 3: each failure has its own exit code, and a refused login keeps nothing
/// for a later run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_with_distinct_codes_and_a_refused_login_keeps_nothing() {
    let cluster = cluster().await;
    let port = cluster.route_port;
    let dir = temp_dir("codes");
    let state = dir.join("alice.json");
    let state2 = state.clone();
    let no_secret = dir.join("alice-no-secret.json");
    let client = move |args: &str, password: &str| {
        shell(
            &format!(
                "\"$CIM_CLIENT\" --route http://127.0.0.1:{port} --user alice --state {} {args}",
                state.display()
            ),
            password,
        )
    };
    let alice_id = tokio::task::spawn_blocking(move || {
        let (out, code) = client("--send first", "alice-password");
        assert_eq!(code, 0, "{out}");
        let alice_id = common::user_id(&state2);

        // A wrong password: the login is rejected (3), and the message is not kept. The run
        // gets a copy of the state without its resumption secret: with it, the client
        // would resume and never look at the password (`console.rs` covers that).
        let mut copy = common::state_json(&state2);
        copy["session"]
            .as_object_mut()
            .expect("the SDK's state")
            .remove("resumeSecret")
            .expect("the first run saved a resumption secret");
        std::fs::write(&no_secret, copy.to_string()).expect("state copy");
        std::fs::set_permissions(&no_secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("owner-only");
        let (out, code) = shell(
            &format!(
                "\"$CIM_CLIENT\" --route http://127.0.0.1:{port} --user alice --state {} --send never-sent",
                no_secret.display()
            ),
            "wrong-password",
        );
        assert_eq!(code, 3, "{out}");
        assert!(out.contains("login rejected: wrong password for alice"), "{out}");
        assert!(!out.contains("sending"), "{out}");
        assert!(out.contains("not sent"), "{out}");

        // Unknown recipients (7), by name and by id.
        let (out, code) = client("--send '@nobody hi'", "alice-password");
        assert_eq!(code, 7, "{out}");
        assert!(out.contains("no user nobody"), "{out}");
        let (out, code) = client("--send '@999 hi'", "alice-password");
        assert_eq!(code, 7, "{out}");
        assert!(out.contains("there is no user 999"), "{out}");
        assert!(!out.contains("conversation"), "{out}");

        // Over the server's body limit (8).
        let (out, code) = client(&format!("--send {}", "x".repeat(5000)), "alice-password");
        assert_eq!(code, 8, "{out}");

        // A bad line in a script (9); the good ones still go.
        let (out, code) = shell(
            &format!(
                "printf ':nope\\nafter the typo\\n' | \"$CIM_CLIENT\" --route http://127.0.0.1:{port} --user alice --state {} --batch",
                state2.display()
            ),
            "alice-password",
        );
        assert_eq!(code, 9, "{out}");
        assert!(out.contains("after the typo"), "{out}");

        // A route that does not answer (6): the message is saved for the next run.
        let (out, code) = shell(
            &format!(
                "\"$CIM_CLIENT\" --route http://127.0.0.1:1 --user alice --state {} --send later --drain-secs 1",
                state2.display()
            ),
            "alice-password",
        );
        assert_eq!(code, 6, "{out}");
        assert!(out.contains("saved"), "{out}");

        // The next good run sends what was saved, and never the message of the refused login.
        let (out, code) = client("--send last", "alice-password");
        assert_eq!(code, 0, "{out}");

        // Input after `:q!` is not run, even when it was queued behind the login.
        let (out, code) = shell(
            &format!(
                "printf 'before quit\\n:q!\\nafter quit\\n' | \"$CIM_CLIENT\" --route http://127.0.0.1:{port} --user alice --state {}",
                state2.display()
            ),
            "alice-password",
        );
        assert_eq!(code, 0, "{out}");
        alice_id
    })
    .await
    .expect("clients");
    let texts: Vec<String> = cluster
        .log(cim_core::ids::UserId(alice_id), cim_core::ids::ConvId::All)
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert_eq!(
        texts,
        ["first", "after the typo", "later", "last", "before quit"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A certificate that does not verify ends the run with code 5, naming the host and the
/// reason, for registration and for a login alike, without retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_exits_5_naming_host_and_reason() {
    let ca = cim_testkit::certs::TestCa::new("route");
    let other = cim_testkit::certs::TestCa::new("other");
    let cert = ca.server_cert("route");
    let cluster = common::https_cluster(cert.cert_path.clone(), cert.key_path.clone()).await;
    let port = cluster.route_port;
    let dir = temp_dir("untrusted");
    let wrong_ca = other.cert_path.clone();
    tokio::task::spawn_blocking(move || {
        let run = |extra: &str| {
            shell(
                &format!(
                    "\"$CIM_CLIENT\" --route https://127.0.0.1:{port} --ca {} --user dora --state {} --send hi {extra}",
                    wrong_ca.display(),
                    dir.join("dora.json").display()
                ),
                "dora-password",
            )
        };
        let started = common::now();
        // Registration.
        let (out, code) = run("");
        assert_eq!(code, 5, "{out}");
        assert!(out.contains("127.0.0.1") && out.contains("not signed by a trusted CA"), "{out}");
        // A login (the id given, so no registration): the session stops, no reconnecting.
        let (out, code) = run("--user-id 1");
        assert_eq!(code, 5, "{out}");
        assert!(out.contains("127.0.0.1") && out.contains("not signed by a trusted CA"), "{out}");
        assert!(!out.contains("reconnecting"), "{out}");
        assert!(out.contains("not sent"), "{out}");
        assert!((common::now() - started) < Duration::from_secs(15), "{:?}", (common::now() - started));
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("clients");
}

/// A scheme mistake ends the run with code 5 too, naming the host and what to use, for
/// registration and a login alike, without retrying: `https://` to a plaintext route and
/// `http://` to an HTTPS-only one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheme_mistake_exits_5_saying_which_scheme() {
    let ca = cim_testkit::certs::TestCa::new("route");
    let cert = ca.server_cert("route");
    let https = common::https_cluster(cert.cert_path.clone(), cert.key_path.clone()).await;
    let plain = common::cluster().await;
    let dir = temp_dir("scheme");
    let ca_path = ca.cert_path.clone();
    let (https_port, plain_port) = (https.route_port, plain.route_port);
    tokio::task::spawn_blocking(move || {
        let run = |url: &str, user: &str, extra: &str| {
            shell(
                &format!(
                    "\"$CIM_CLIENT\" --route {url} --ca {} --user {user} --state {} --send hi {extra}",
                    ca_path.display(),
                    dir.join(format!("{user}.json")).display()
                ),
                "dora-password",
            )
        };
        let started = common::now();
        for (url, says) in [
            (format!("https://127.0.0.1:{plain_port}"), "use http://"),
            (format!("http://127.0.0.1:{https_port}"), "use https://"),
        ] {
            // Registration, then a login (the id given, so no registration).
            for (user, extra) in [("dora", ""), ("erin", "--user-id 1")] {
                let (out, code) = run(&url, user, extra);
                assert_eq!(code, 5, "{url} {extra}: {out}");
                assert!(out.contains("127.0.0.1") && out.contains(says), "{out}");
                assert!(!out.contains("reconnecting"), "{out}");
            }
        }
        assert!((common::now() - started) < Duration::from_secs(15), "{:?}", (common::now() - started));
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("clients");
}

/// Item 7: a second login of the same user (here a `--send` sharing the state file) takes
/// the session over; the terminal says what happened and Enter takes it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_taken_over_by_a_send_can_be_taken_back() {
    let cluster = cluster().await;
    let port = cluster.route_port;
    let dir = temp_dir("takeover");
    tokio::task::spawn_blocking(move || {
        let mut bob = spawn(port, "bob", &dir.join("bob.json"), &[]);
        bob.status("online as bob");
        let state = dir.join("alice.json");
        let mut alice = pty_client(port, "alice", &state);
        alice.expect("online as alice").expect("online");

        // The same user sends from a script through another spelling of the route, with
        // the same state file.
        let mut send = common::spawn_as(
            &format!("http://localhost:{port}/"),
            "alice",
            "alice-password",
            &state,
            &["--send", "from the script"],
        );
        send.json(|v| v["text"] == "from the script");
        let seen = send.finish();
        assert!(!seen.iter().any(|l| l.contains("elsewhere")), "{seen:?}");
        bob.json(|v| v["text"] == "from the script");

        alice
            .expect("alice logged in elsewhere")
            .expect("takeover explained");
        alice
            .expect("press Enter to take the session back")
            .expect("offer");
        alice.send("\r").expect("enter");
        alice.expect("* reconnected").expect("taken back");
        alice.send("back in the chair\r").expect("enter");
        bob.json(|v| v["text"] == "back in the chair");
        alice.send(":q!\r").expect("quit");
        alice.expect(Eof).expect("exits");
        bob.finish();
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
    .expect("takeover");
}

/// `:q!` while the server is gone quits at once; what was typed is saved and sent by the
/// next run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitting_while_disconnected_is_prompt_and_keeps_the_message() {
    let mut cluster = cluster().await;
    let port = cluster.route_port;
    let dir = temp_dir("quit-offline");
    let state = dir.join("alice.json");
    let state2 = state.clone();
    let mut alice = tokio::task::spawn_blocking(move || {
        let mut alice = pty_client(port, "alice", &state2);
        alice.expect("online as alice").expect("online");
        alice
    })
    .await
    .expect("online");
    cluster.crash_server();
    let state2 = state.clone();
    tokio::task::spawn_blocking(move || {
        alice.expect("* reconnecting").expect("reconnecting");
        alice.send("typed offline\r").expect("enter");
        alice.expect("· sending to all").expect("queued");
        let started = common::now();
        alice.send(":q!\r").expect("quit");
        alice.expect(Eof).expect("exits");
        // It used to wait out 3 s for acknowledgements that could not come.
        assert!(
            (common::now() - started) < Duration::from_millis(2500),
            "quitting took {:?}",
            (common::now() - started)
        );
        let outbox = &common::state_json(&state2)["session"]["outbox"];
        assert_eq!(outbox.as_array().map(Vec::len), Some(1), "{outbox}");
    })
    .await
    .expect("quit");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An interactive client under a pty whose password comes from the environment.
fn pty_client(port: u16, user: &str, state: &std::path::Path) -> expectrl::session::OsSession {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_cim-client"));
    command
        .args(["--route", &format!("127.0.0.1:{port}"), "--user", user])
        .arg("--state")
        .arg(state)
        .env("CIM_PASSWORD", format!("{user}-password"))
        .env_remove("CIM_USER_ID")
        .env("TERM", "xterm")
        .env("NO_COLOR", "1");
    let mut session = Session::spawn(command).expect("pty");
    session.set_expect_timeout(Some(Duration::from_secs(20)));
    session
}
