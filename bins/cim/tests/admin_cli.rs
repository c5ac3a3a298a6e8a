//! `cim admin …` against a route's admin listener: one route and one server in this process
//! (in-memory store and registry), the `cim` binary run as the operator would.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;

use cim_core::accounts::PasswordParams;
use cim_core::ids::ServerId;
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_core::store::{StoreCommand, StoreReply};
use cim_io::clock::Clock;
use cim_io::net::TokioNet;
use cim_io::registry::MemoryRegistry;
use cim_io::route::{self, AdminOptions, RouteOptions};
use cim_io::server::{self, ServerOptions};
use cim_io::store::{MemoryBackend, Store};

const TOKEN: &str = "cli-admin-token-0123456789";

/// Runs `cim admin <args>` with the token in the environment; (exit ok, stdout, stderr).
fn cim_admin(port: u16, token: &str, args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cim"))
        .arg("admin")
        .arg("--url")
        .arg(format!("127.0.0.1:{port}"))
        .args(args)
        .env("CIM_ADMIN_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run cim");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("cim ends");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cim_admin_lists_shows_resets_and_deletes() {
    let store = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
    let registry = MemoryRegistry::new();
    let node = ServerConfig::new(ServerId::new("s1"), TicketKeys::new(1, b"t".repeat(16)));
    let mut options = ServerOptions::new(node, b"l".repeat(16));
    options.listen_ip = [127, 0, 0, 1].into();
    (options.client_port, options.link_port, options.http_port) = (0, 0, 0);
    let _server = server::start(TokioNet, Clock::System, options, store.clone(), &registry)
        .await
        .expect("server");
    let mut o = RouteOptions::new(
        "r1",
        TicketKeys::new(1, b"t".repeat(16)),
        b"b".repeat(16),
        b"l".repeat(16),
    );
    o.http_listen = "127.0.0.1:0".parse().unwrap();
    o.login.password = PasswordParams::for_tests();
    o.admin = Some(AdminOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: TOKEN.as_bytes().to_vec(),
    });
    let route = route::start(TokioNet, Clock::System, o, store.clone(), &registry)
        .await
        .expect("route");
    let port = route.admin_addr().unwrap().port();
    for name in ["Alice", "bob"] {
        let reply = store
            .execute(
                Clock::System.wall(),
                StoreCommand::RegisterAccount {
                    name: name.into(),
                    password_hash: "phc".into(),
                },
            )
            .await
            .unwrap();
        assert!(matches!(reply, StoreReply::AccountRegistered(Ok(_))));
    }

    let run = |token: &'static str, args: &'static [&'static str], stdin: &'static str| {
        tokio::task::spawn_blocking(move || cim_admin(port, token, args, stdin))
    };
    let (ok, out, err) = run(TOKEN, &["users"], "").await.unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("1  Alice") && out.contains("2  bob"), "{out}");
    let (ok, out, err) = run(TOKEN, &["show", "ALICE"], "").await.unwrap();
    assert!(
        ok && out.contains("user 1 Alice") && out.contains("no session"),
        "{out}{err}"
    );
    let (ok, out, err) = run(TOKEN, &["reset-password", "alice"], "new-password-1\n")
        .await
        .unwrap();
    assert!(ok && out.contains("password reset"), "{out}{err}");
    let (ok, _, err) = run(TOKEN, &["reset-password", "alice"], "short\n")
        .await
        .unwrap();
    assert!(!ok && err.contains("at least 8"), "{err}");
    // No terminal to confirm at: refused without --yes.
    let (ok, _, err) = run(TOKEN, &["delete", "bob"], "").await.unwrap();
    assert!(!ok && err.contains("--yes"), "{err}");
    let (ok, out, err) = run(TOKEN, &["delete", "bob", "--yes"], "").await.unwrap();
    assert!(ok && out.contains("user 2 (bob) deleted"), "{out}{err}");
    let (ok, out, _) = run(TOKEN, &["users"], "").await.unwrap();
    assert!(ok && out.contains("2  bob  (deleted)"), "{out}");
    let (ok, out, err) = run(TOKEN, &["kick", "1"], "").await.unwrap();
    assert!(ok && out.contains("no session"), "{out}{err}");
    let (ok, _, err) = run(TOKEN, &["show", "nobody"], "").await.unwrap();
    assert!(!ok && err.contains("no user named"), "{err}");
    // A wrong token: a failure exit, in words.
    let (ok, _, err) = run("wrong-token-0123456789", &["users"], "").await.unwrap();
    assert!(
        !ok && err.contains("401") && err.contains("admin token"),
        "{err}"
    );
    route.abort();
}
