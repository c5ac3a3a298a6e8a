//! The operator documentation checked against the code, so it cannot drift:
//! `docs/configuration.md` lists exactly the flags of `cim-server` and `cim-route` (with
//! their `CIM_*` variables, TOML keys and defaults), and `docs/metrics.md` lists exactly the
//! metric families a running server and route expose on `/metrics`.
//!
//! Each check is a function returning the problems it found, and the `*_can_fail` tests
//! feed it a doctored document, so a check that silently passes everything is caught too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use cim_core::ids::ServerId;
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_io::clock::Clock;
use cim_io::http_client::HttpClient;
use cim_io::net::TokioNet;
use cim_io::registry::MemoryRegistry;
use cim_io::route::{self, RouteOptions};
use cim_io::server::{self, ServerOptions};
use cim_io::store::{MemoryBackend, Store};
use cim_io::tls::dev::DevPki;
use cim_io::tls::setup::{RouteSide, ServerSide, TlsFlags};
use cim_io::tls::{ClientTls, ClientTlsSettings};
use clap::CommandFactory;
use hyper::{Method, StatusCode};

const CONFIG_DOC: &str = include_str!("../../../docs/configuration.md");
const METRICS_DOC: &str = include_str!("../../../docs/metrics.md");

/// The lines of `doc` under the heading `## {title}`, up to the next `## ` heading.
fn section<'a>(doc: &'a str, title: &str) -> &'a str {
    let heading = format!("## {title}\n");
    let start = doc
        .find(&heading)
        .unwrap_or_else(|| panic!("no `{heading}` heading"))
        + heading.len();
    let rest = &doc[start..];
    let end = rest.find("\n## ").map_or(rest.len(), |i| i + 1);
    &rest[..end]
}

/// The body rows of every Markdown table in `text`, cells trimmed and without backticks.
/// Header rows (followed by a `|---` line) and separator lines are left out.
fn table_rows(text: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut rows = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let is_row = line.starts_with('|') && !line.starts_with("|---");
        let is_header = lines
            .get(i + 1)
            .is_some_and(|next| next.starts_with("|---"));
        if is_row && !is_header {
            let inner = line.trim_start_matches('|').trim_end_matches('|');
            rows.push(
                inner
                    .split('|')
                    .map(|cell| cell.trim().replace('`', ""))
                    .collect(),
            );
        }
    }
    rows
}

/// The TOML keys `T` accepts, read from serde's own "unknown field, expected one of" error
/// (the same derive serves the TOML file, so this is the list the file parser knows).
fn serde_keys(error: &str) -> BTreeSet<String> {
    let list = error
        .split_once("expected one of ")
        .unwrap_or_else(|| panic!("unexpected serde error: {error}"))
        .1;
    list.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// One documented (or expected) setting.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    env: String,
    toml: String,
    default: String,
}

/// What the code says about every long flag of `command`; `default` is what its help text
/// promises (`[default: X]` → `X`, "required" → `required`) or empty when it says nothing.
fn settings_of(command: &clap::Command, toml_keys: &BTreeSet<String>) -> BTreeMap<String, Setting> {
    let mut out = BTreeMap::new();
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(long, "help" | "version") {
            continue;
        }
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let default = if let Some((_, rest)) = help.split_once("[default: ") {
            rest.split_once(']').map_or(rest, |(d, _)| d).to_owned()
        } else if help.contains("required") {
            "required".to_owned()
        } else {
            String::new()
        };
        let env = arg
            .get_env()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        let toml = if toml_keys.contains(long) {
            long.to_owned()
        } else {
            "—".to_owned()
        };
        out.insert(format!("--{long}"), Setting { env, toml, default });
    }
    out
}

/// Differences between the code's settings and the doc section's table.
fn config_problems(section_text: &str, expected: &BTreeMap<String, Setting>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut documented = BTreeMap::new();
    for row in table_rows(section_text) {
        let [flag, env, toml, default, _meaning] = row.as_slice() else {
            problems.push(format!("row without 5 cells: {row:?}"));
            continue;
        };
        let setting = Setting {
            env: env.clone(),
            toml: toml.clone(),
            default: default.clone(),
        };
        if documented.insert(flag.clone(), setting).is_some() {
            problems.push(format!("{flag} documented twice"));
        }
    }
    for (flag, want) in expected {
        let Some(got) = documented.get(flag) else {
            problems.push(format!("{flag} is not documented"));
            continue;
        };
        if got.env != want.env {
            problems.push(format!(
                "{flag}: variable {:?}, code says {:?}",
                got.env, want.env
            ));
        }
        if got.toml != want.toml {
            problems.push(format!(
                "{flag}: TOML key {:?}, code says {:?}",
                got.toml, want.toml
            ));
        }
        if !want.default.is_empty() && got.default != want.default {
            problems.push(format!(
                "{flag}: default {:?}, --help says {:?}",
                got.default, want.default
            ));
        }
    }
    for flag in documented.keys() {
        if !expected.contains_key(flag) {
            problems.push(format!("{flag} is documented but no such flag exists"));
        }
    }
    problems
}

/// The keys a settings type reads from a config file, as its refusal of an unknown key
/// lists them.
macro_rules! keys_of {
    ($settings:ty) => {
        serde_keys(
            &serde_json::from_str::<$settings>(r#"{"no-such-key": 0}"#)
                .expect_err("unknown keys are rejected")
                .to_string(),
        )
    };
}

/// A binary's file keys: its own, and the Redis and ZooKeeper ones it shares.
macro_rules! file_keys {
    ($args:ty) => {{
        let mut keys = keys_of!($args);
        keys.extend(keys_of!(cim_io::launch::BackendFlags));
        keys
    }};
}

fn server_settings() -> BTreeMap<String, Setting> {
    settings_of(&cim_server::Args::command(), &file_keys!(cim_server::Args))
}

fn route_settings() -> BTreeMap<String, Setting> {
    settings_of(&cim_route::Args::command(), &file_keys!(cim_route::Args))
}

#[test]
fn configuration_doc_lists_every_server_flag_and_nothing_else() {
    let expected = server_settings();
    assert!(expected.len() > 20, "{expected:?}");
    let problems = config_problems(section(CONFIG_DOC, "cim-server"), &expected);
    assert!(
        problems.is_empty(),
        "docs/configuration.md, cim-server:\n{problems:#?}"
    );
}

#[test]
fn configuration_doc_lists_every_route_flag_and_nothing_else() {
    let expected = route_settings();
    assert!(expected.len() > 10, "{expected:?}");
    let problems = config_problems(section(CONFIG_DOC, "cim-route"), &expected);
    assert!(
        problems.is_empty(),
        "docs/configuration.md, cim-route:\n{problems:#?}"
    );
}

#[test]
fn every_toml_key_is_named_like_its_flag() {
    for (name, settings) in [("server", server_settings()), ("route", route_settings())] {
        for (flag, setting) in &settings {
            assert!(
                setting.env.starts_with("CIM_"),
                "{name} {flag}: {setting:?}"
            );
            if flag != "--config" {
                assert_eq!(format!("--{}", setting.toml), *flag, "{name}: {setting:?}");
            }
        }
    }
}

#[test]
fn configuration_check_can_fail() {
    let expected = server_settings();
    let good = section(CONFIG_DOC, "cim-server");
    let without = |needle: &str| -> String {
        good.lines()
            .filter(|l| !l.contains(needle))
            .collect::<Vec<_>>()
            .join("\n")
    };
    // A flag left out.
    let problems = config_problems(&without("`--lease-ttl`"), &expected);
    assert_eq!(problems, ["--lease-ttl is not documented"]);
    // A flag that no longer exists.
    let extra = format!("{good}| `--gone` | `CIM_GONE` | `gone` | `1` | Removed. |\n");
    let problems = config_problems(&extra, &expected);
    assert_eq!(problems, ["--gone is documented but no such flag exists"]);
    // A wrong variable, TOML key and default.
    let wrong = good
        .replace("`CIM_CLIENT_PORT`", "`CIM_PORT`")
        .replace("`link-port` | `11311`", "`link_port` | `11312`");
    let problems = config_problems(&wrong, &expected);
    assert_eq!(problems.len(), 3, "{problems:#?}");
}

/// The `# TYPE` families of a Prometheus text page: name → type.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| (name.to_owned(), kind.trim().to_owned()))
        .collect()
}

/// Differences between the exposed families and the doc's tables (name and type).
fn metrics_problems(doc: &str, exposed: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut documented = BTreeMap::new();
    for row in table_rows(doc) {
        let (Some(name), Some(kind)) = (row.first(), row.get(1)) else {
            problems.push(format!("short row {row:?}"));
            continue;
        };
        if documented.insert(name.clone(), kind.clone()).is_some() {
            problems.push(format!("{name} documented twice"));
        }
    }
    for (name, kind) in exposed {
        match documented.get(name) {
            None => problems.push(format!("{name} is exposed but not documented")),
            Some(doc_kind) if doc_kind != kind => {
                problems.push(format!(
                    "{name}: documented as {doc_kind}, exposed as {kind}"
                ));
            }
            Some(_) => {}
        }
    }
    for name in documented.keys() {
        if !exposed.contains_key(name) {
            problems.push(format!("{name} is documented but not exposed"));
        }
    }
    problems
}

const TICKET_SECRET: &[u8] = b"docs-test-ticket-secret";
const LINK_SECRET: &[u8] = b"docs-test-link-secret";
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

async fn get_metrics(port: u16, tls: Option<&ClientTls>) -> String {
    let mut http = HttpClient::new(TokioNet, "127.0.0.1", port, Duration::from_secs(5));
    if let Some(tls) = tls {
        http = http.with_tls(tls.clone());
    }
    let (status, body) = http
        .request(Method::GET, "/metrics", None, None)
        .await
        .expect("GET /metrics");
    assert_eq!(status, StatusCode::OK);
    String::from_utf8(body.to_vec()).expect("metrics are text")
}

/// A server and a route in this process (memory store and registry, free ports, TLS on so
/// the TLS families show), and the families their `/metrics` expose.
async fn exposed_families() -> BTreeMap<String, String> {
    let dir = std::env::temp_dir().join(format!("cim-docs-tls-{}", std::process::id()));
    let pki = DevPki::generate(&dir, &["127.0.0.1"]).expect("throwaway certificates");
    let flags = |cert: &std::path::Path, key: &std::path::Path| TlsFlags {
        cert: Some(cert.to_owned()),
        key: Some(key.to_owned()),
        ca: Some(pki.ca.clone()),
        accept_plaintext: false,
    };
    let server_tls = ServerSide::load(&flags(&pki.server_cert, &pki.server_key), "127.0.0.1")
        .expect("server TLS")
        .expect("TLS on");
    let route_tls = RouteSide::load(&flags(&pki.route_cert, &pki.route_key))
        .expect("route TLS")
        .expect("TLS on");
    let trust = ClientTls::load(ClientTlsSettings {
        ca: Some(pki.ca.clone()),
        ..ClientTlsSettings::default()
    })
    .expect("the CA loads");
    let store: Arc<dyn Store> = Arc::new(MemoryBackend::new(MemoryStoreConfig::default()));
    let registry = MemoryRegistry::new();
    let node = ServerConfig::new(ServerId::new("s1"), TicketKeys::new(1, TICKET_SECRET));
    let mut options = ServerOptions::new(node, LINK_SECRET.to_vec());
    options.listen_ip = LOCALHOST;
    (options.client_port, options.link_port, options.http_port) = (0, 0, 0);
    options.gateway_tls = Some(server_tls.gateway);
    options.link_tls = Some(server_tls.link);
    // The WebSocket port's families are exposed only when it is on.
    options.ws_port = Some(0);
    let server = server::start(TokioNet, Clock::System, options, store.clone(), &registry)
        .await
        .expect("server starts");
    let mut options = RouteOptions::new(
        "r1",
        TicketKeys::new(1, TICKET_SECRET),
        b"docs-test-bearer-secret".to_vec(),
        LINK_SECRET.to_vec(),
    );
    options.http_listen = SocketAddr::new(LOCALHOST, 0);
    options.https = Some(route_tls.https);
    options.link_tls = Some(route_tls.links);
    let route = route::start(TokioNet, Clock::System, options, store, &registry)
        .await
        .expect("route starts");

    // The server's `/metrics` port stays plain HTTP; the route's API listener is HTTPS.
    let server_text = get_metrics(server.http_addr().port(), None).await;
    let route_text = get_metrics(route.http_addr().port(), Some(&trust)).await;
    server.abort();
    route.abort();
    let _ = std::fs::remove_dir_all(&dir);

    let server_families = families(&server_text);
    let route_families = families(&route_text);
    assert!(
        server_families.keys().all(|n| n.starts_with("cim_server_")),
        "{server_text}"
    );
    assert!(
        route_families.keys().all(|n| n.starts_with("cim_route_")),
        "{route_text}"
    );
    assert!(server_families.len() > 10 && route_families.len() > 10);
    server_families.into_iter().chain(route_families).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_doc_lists_every_exposed_family_and_nothing_else() {
    let exposed = exposed_families().await;
    let problems = metrics_problems(METRICS_DOC, &exposed);
    assert!(problems.is_empty(), "docs/metrics.md:\n{problems:#?}");

    // The check can fail: a family dropped from the doc, one exposed no more, a wrong type.
    let dropped: String = METRICS_DOC
        .lines()
        .filter(|l| !l.contains("`cim_route_links_up`"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        metrics_problems(&dropped, &exposed),
        ["cim_route_links_up is exposed but not documented"]
    );
    let mut fewer = exposed.clone();
    fewer.remove("cim_server_sessions");
    assert_eq!(
        metrics_problems(METRICS_DOC, &fewer),
        ["cim_server_sessions is documented but not exposed"]
    );
    let retyped = METRICS_DOC.replace(
        "`cim_server_sessions` | gauge",
        "`cim_server_sessions` | counter",
    );
    assert_eq!(
        metrics_problems(&retyped, &exposed),
        ["cim_server_sessions: documented as counter, exposed as gauge"]
    );
}
