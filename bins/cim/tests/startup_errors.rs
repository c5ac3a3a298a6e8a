//! What an operator reads when a process does not start: every missing or invalid setting at
//! once, each by name; the Redis URL (without its password) or the ZooKeeper ensemble that
//! did not answer; the flag that overrides the eviction check; a taken port with the flag
//! that sets it and the way out. Each case runs the real binary and reads its error.

use std::net::TcpListener;
use std::process::{Command, Output};
use std::time::Duration;

use cim_testkit::RedisServer;

const SECRET: &str = "startup-test-secret-0123456789";

/// `cim <args>` with no `CIM_*` variables from the caller's environment, bounded in time.
fn run(args: &[&str], env: &[(&str, &str)]) -> (Output, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cim"));
    command.args(args).env("RUST_LOG", "error");
    for (key, _) in std::env::vars() {
        if key.starts_with("CIM_") {
            command.env_remove(key);
        }
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn cim");
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let out = outcome
        .recv_timeout(Duration::from_secs(60))
        .expect("cim should give up within 60 s")
        .expect("cim ran");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn secrets() -> Vec<(&'static str, &'static str)> {
    vec![
        ("CIM_TICKET_SECRET", SECRET),
        ("CIM_BEARER_SECRET", SECRET),
        ("CIM_LINK_SECRET", SECRET),
    ]
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a port")
        .port()
}

#[test]
fn every_missing_or_invalid_setting_is_reported_at_once_by_name() {
    let (out, text) = run(
        &[
            "route",
            "--io-timeout",
            "soon",
            "--balance",
            "nearest",
            "--log-format",
            "xml",
        ],
        &[("CIM_BEARER_SECRET", "short")],
    );
    assert!(!out.status.success(), "{text}");
    for name in [
        "--redis or --redis-cluster (CIM_REDIS or CIM_REDIS_CLUSTER) is required",
        "--zk (CIM_ZK) is required",
        "CIM_TICKET_SECRET is required",
        "CIM_BEARER_SECRET must be at least 16 bytes",
        "CIM_LINK_SECRET is required",
        "--io-timeout",
        "--balance \"nearest\"",
        "--log-format (CIM_LOG_FORMAT) \"xml\"",
    ] {
        assert!(text.contains(name), "missing {name:?} in:\n{text}");
    }
    assert!(text.contains("8 settings are missing or invalid"), "{text}");

    let (out, text) = run(
        &[
            "server",
            "--lease-ttl",
            "forever",
            "--ws-allowed-origin",
            "https://fine.example,chat.example",
        ],
        &[],
    );
    assert!(!out.status.success(), "{text}");
    for name in [
        "--redis or --redis-cluster (CIM_REDIS or CIM_REDIS_CLUSTER)",
        "--zk (CIM_ZK)",
        "CIM_TICKET_SECRET",
        "CIM_LINK_SECRET",
        "--lease-ttl",
        "--ws-allowed-origin (CIM_WS_ALLOWED_ORIGIN): WebSocket allowed origin \"chat.example\"",
    ] {
        assert!(text.contains(name), "missing {name:?} in:\n{text}");
    }
}

#[test]
fn one_redis_or_one_redis_cluster_never_both() {
    let (out, text) = run(
        &[
            "route",
            "--redis",
            "redis://127.0.0.1:1/",
            "--redis-cluster",
            "redis://127.0.0.1:2/",
            "--zk",
            "127.0.0.1:2181",
        ],
        &secrets(),
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(
            "--redis (CIM_REDIS) and --redis-cluster (CIM_REDIS_CLUSTER) are alternatives"
        ),
        "{text}"
    );
    // A cluster nobody serves: named (without password) and refused, not a hang.
    let (out, text) = run(
        &[
            "route",
            "--redis-cluster",
            "redis://cim:secret-pw@127.0.0.1:1/,redis://cim:secret-pw@127.0.0.1:2/",
            "--zk",
            "127.0.0.1:2181",
        ],
        &secrets(),
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("127.0.0.1:1") && !text.contains("secret-pw"),
        "{text}"
    );
}

#[test]
fn redis_errors_name_the_url_without_its_password() {
    // No scheme: said in words, not as the client library's "InvalidClientConfig".
    let (out, text) = run(
        &[
            "route",
            "--redis",
            "127.0.0.1:6379",
            "--zk",
            "127.0.0.1:2181",
        ],
        &secrets(),
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("\"127.0.0.1:6379\"") && text.contains("starts with redis://"),
        "{text}"
    );

    // Refused: the URL is named, its password is not.
    let port = closed_port();
    let url = format!("redis://cim:hunter2-secret@127.0.0.1:{port}/0");
    let (out, text) = run(
        &["route", "--redis", &url, "--zk", "127.0.0.1:2181"],
        &secrets(),
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!("redis://cim:***@127.0.0.1:{port}/0")),
        "the URL should be named:\n{text}"
    );
    assert!(!text.contains("hunter2"), "password leaked:\n{text}");
}

#[test]
fn an_evicting_redis_names_the_override_flag() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    assert_eq!(redis.raw("CONFIG SET maxmemory-policy allkeys-lru"), "+OK");
    let (out, text) = run(
        &["route", "--redis", &redis.url(), "--zk", "127.0.0.1:2181"],
        &secrets(),
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("allkeys-lru") && text.contains("--allow-eviction"),
        "{text}"
    );
}

#[test]
fn a_zookeeper_that_does_not_answer_is_named() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let zk = format!("127.0.0.1:{}", closed_port());
    let (out, text) = run(
        &[
            "route",
            "--redis",
            &redis.url(),
            "--zk",
            &zk,
            "--zk-session-timeout",
            "1s",
        ],
        &secrets(),
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!("ZooKeeper at {zk} (--zk)"))
            && text.contains("no ZooKeeper answered there"),
        "{text}"
    );
}

#[test]
fn a_taken_port_is_named_with_its_flag_and_the_way_out() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let port = taken.local_addr().expect("port").port();
    let (out, text) = run(
        &["up", "--any-ports", "--health-port", &port.to_string()],
        &[],
    );
    assert!(!out.status.success(), "{text}");
    for part in [
        format!("port {port} is already in use"),
        "server s1 health/metrics port".to_owned(),
        "--health-port".to_owned(),
        "--any-ports".to_owned(),
    ] {
        assert!(text.contains(&part), "missing {part:?} in:\n{text}");
    }

    let (out, text) = run(
        &["up", "--any-ports", "--route-port", &port.to_string()],
        &[],
    );
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains(&format!("port {port} is already in use")) && text.contains("--route-port"),
        "{text}"
    );
    drop(taken);
}

#[test]
fn log_format_json_writes_one_json_object_a_line() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cim"))
        .args(["up", "--any-ports", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn cim up");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let started = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("no `route started` log line ({e}):\n{}", seen.join("\n")));
        let value: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        seen.push(line);
        if value["fields"]["message"] == "route started" {
            break value;
        }
    };
    assert_eq!(started["level"], "INFO", "{started}");
    assert!(started["timestamp"].is_string(), "{started}");
    assert!(started["fields"]["http_addr"].is_string(), "{started}");
    let _ = child.kill();
    let _ = child.wait();
}
