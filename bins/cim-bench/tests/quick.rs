//! Every scenario at `--quick` sizes, for correctness only: every delivery arrives, no login
//! fails, nothing acknowledged is lost, the chart is drawn. Speed is printed, never asserted.
//!
//! Scenarios that need Redis and ZooKeeper, or nats-server and mosquitto, skip with a message
//! when those are not installed, except under `CI=true`, where `.ci/run` installs them.

use std::process::Command;

fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cim-bench"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("run cim-bench");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "cim-bench {args:?} failed:\n{text}");
    text
}

fn installed(programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| {
            Command::new("sh")
                .args(["-c", &format!("command -v {p}")])
                .output()
                .map_or(true, |o| !o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        !cim_testkit::in_ci(),
        "CI=true and {missing:?} missing: .ci/run installs them"
    );
    eprintln!("SKIPPING: {missing:?} not installed");
    false
}

/// The cells of the table rows whose first cell is `first`.
fn row<'a>(out: &'a str, first: &str) -> Vec<&'a str> {
    out.lines()
        .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>())
        .find(|cells| cells.get(1) == Some(&first))
        .map(|cells| cells[1..cells.len() - 1].to_vec())
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{out}"))
}

#[test]
fn fanout_delivers_every_message_to_every_member() {
    let out = bench(&["fanout", "--quick"]);
    assert_eq!(row(&out, "cim-rs")[1], "200/200", "{out}");
}

#[test]
fn p2p_delivers_every_message_at_each_rate() {
    let out = bench(&["p2p", "--quick"]);
    assert_eq!(row(&out, "100")[2], "100", "{out}");
    assert_eq!(row(&out, "200")[2], "200", "{out}");
}

/// With the bench's own Redis, each step also says what Redis spent per message (the
/// issue-17 figure); without one, that column is empty.
#[test]
fn p2p_with_redis_reports_redis_cpu_per_message() {
    if !installed(&["redis-server", "redis-cli"]) {
        return;
    }
    let out = bench(&["p2p", "--quick", "--redis"]);
    let step = row(&out, "100");
    assert_eq!(step[2], "100", "{out}");
    let redis_us: f64 = step[8]
        .parse()
        .unwrap_or_else(|_| panic!("no Redis CPU figure: {out}"));
    assert!(redis_us > 0.0, "{out}");
    let out = bench(&["p2p", "--quick"]);
    assert_eq!(row(&out, "100")[8], "-", "{out}");
}

#[test]
fn fanout_and_p2p_over_tls_deliver_everything() {
    let out = bench(&["fanout", "--quick", "--tls"]);
    assert!(out.contains("TLS (route HTTPS"), "not over TLS: {out}");
    assert_eq!(row(&out, "cim-rs")[1], "200/200", "{out}");
    let out = bench(&["p2p", "--quick", "--tls"]);
    assert!(out.contains("TLS (route HTTPS"), "not over TLS: {out}");
    assert_eq!(row(&out, "100")[2], "100", "{out}");
}

#[test]
fn handshakes_are_counted_by_bench_and_server_alike() {
    // The bench fails by itself on a refused handshake, or when none was resumed.
    let out = bench(&["handshakes", "--quick", "--concurrency", "4"]);
    for kind in ["TLS full", "TLS resumed"] {
        let cells = row(&out, kind);
        assert_eq!(cells[4], "0", "errors: {out}");
        assert_ne!(cells[1], "0", "no handshakes: {out}");
        assert_ne!(cells[2], "0", "the server counted none: {out}");
    }
    let baseline = row(&out, "plaintext (no TLS)");
    assert_eq!(baseline[4], "0", "errors: {out}");
    assert_ne!(baseline[1], "0", "no connections: {out}");
}

#[test]
fn login_measures_both_stores_and_costs_without_failures() {
    if !installed(&["redis-server"]) {
        return;
    }
    let out = bench(&["login", "--quick"]);
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("| embedded") || l.starts_with("| Redis"))
        .collect();
    assert_eq!(rows.len(), 4, "{out}");
    for r in rows {
        let cells: Vec<&str> = r.split('|').map(str::trim).collect();
        assert_eq!(cells[7], "0", "a login failed: {r}");
    }
}

#[test]
fn failover_loses_no_acknowledged_message() {
    if !installed(&["redis-server", "java"]) {
        return;
    }
    // The bench itself fails when an acknowledged message is lost or a client stays offline.
    let out = bench(&["failover", "--quick"]);
    let cells = row(&out, "40");
    assert_eq!(cells[5], "0", "{out}");
    assert_ne!(cells[1], "0", "nobody was on the killed server: {out}");
}

#[test]
fn connections_reports_memory_per_connection() {
    if !installed(&["redis-server", "java"]) {
        return;
    }
    let out = bench(&["connections", "--quick"]);
    assert_eq!(row(&out, "100").len(), 6, "{out}");
}

#[test]
fn compare_runs_every_system_and_draws_the_chart() {
    if !installed(&["nats-server", "mosquitto"]) {
        return;
    }
    let chart = std::env::temp_dir().join(format!("cim-bench-test-{}.png", std::process::id()));
    let out = bench(&[
        "compare",
        "--quick",
        "--chart",
        chart.to_str().expect("utf-8 path"),
    ]);
    for system in [
        "cim-rs (embedded)",
        "NATS (core)",
        "Mosquitto QoS 0",
        "Mosquitto QoS 1",
    ] {
        assert_eq!(row(&out, system)[1], "200/200", "{out}");
    }
    let png = std::fs::read(&chart).expect("the chart was written");
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let _ = std::fs::remove_file(&chart);
}

#[test]
fn stores_compares_one_node_and_the_cluster_with_every_delivery() {
    if !installed(&["redis-server", "redis-cli"]) {
        return;
    }
    // The bench fails by itself when a fan-out delivery is missing.
    let out = bench(&["stores", "--quick"]);
    for store in ["one node", "cluster", "cluster, WAIT 1"] {
        let cells = row(&out, store);
        assert_eq!(cells[4], "100/100", "a private message is missing: {out}");
        assert!(cells[5].ends_with("(0)"), "a login failed: {out}");
        assert_ne!(
            cells[6], "0.0",
            "no Redis CPU was read for the fan-out: {out}"
        );
    }
    // Three masters, each named in the spread.
    let spread = &out[out.find("how the work spread").expect("the spread table")..];
    assert_eq!(row(spread, "cluster")[1].split(" / ").count(), 3, "{out}");
}
