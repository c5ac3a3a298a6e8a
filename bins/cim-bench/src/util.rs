//! What every scenario shares: the bench's clock, latency histograms, users, SDK clients,
//! process figures from /proc, and the result table.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use cim_core::client::{ClientConfig, ClientEvent};
use cim_core::ids::UserId;
use cim_io::clock::Clock;
use cim_io::net::{Network, TokioNet};
use cim_io::sdk::{Client, Events, RouteApi, SdkOptions, SdkTls, ServerTransport};
use cim_io::tls::{ClientTls, ClientTlsSettings};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};

pub const PASSWORD: &str = "bench-password";

/// The bench measures real time: this is the one place it reads the clock. Latencies are
/// nanoseconds since the bench started, put into message bodies by the sender and read back
/// by the receiver in this same process, so one monotonic clock serves both ends.
#[allow(clippy::disallowed_methods)] // a benchmark measures wall time by definition
pub fn now() -> Instant {
    Instant::now()
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the bench's first call, for send timestamps in bodies.
pub fn stamp() -> u64 {
    let epoch = *EPOCH.get_or_init(now);
    now().duration_since(epoch).as_nanos() as u64
}

/// A body of `size` bytes (at least 8) starting with the send time `at` (from [`stamp`]).
pub fn stamped_body(at: u64, size: usize) -> bytes::Bytes {
    let mut body = vec![b'.'; size.max(8)];
    body[..8].copy_from_slice(&at.to_be_bytes());
    body.into()
}

/// Microseconds since the stamp at the start of `body`, or `None` for a foreign body.
pub fn latency_us(body: &[u8]) -> Option<u64> {
    let sent = u64::from_be_bytes(body.get(..8)?.try_into().ok()?);
    Some(stamp().saturating_sub(sent) / 1_000)
}

/// Latencies in microseconds, 1 µs .. 60 s at 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// p50, p99, p999 in milliseconds.
pub fn percentiles_ms(h: &Histogram<u64>) -> [f64; 3] {
    [0.5, 0.99, 0.999].map(|q| h.value_at_quantile(q) as f64 / 1_000.0)
}

pub fn bar(total: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    bar.set_prefix(what.to_owned());
    bar
}

/// Where the route is, and the TLS the bench's clients speak to it and to the servers
/// (`None`: plaintext).
#[derive(Debug, Clone)]
pub struct Route {
    pub host: String,
    pub port: u16,
    pub tls: Option<ClientTls>,
    /// Which gateway of the servers the bench's clients connect to.
    pub transport: ServerTransport,
}

impl Route {
    /// `host:port` (for a plain TCP connection, e.g. `/metrics`).
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The same route over HTTPS, its certificates (and the servers') checked against `ca`.
    pub fn with_ca(mut self, ca: &std::path::Path) -> anyhow::Result<Self> {
        let tls = ClientTls::load(ClientTlsSettings {
            ca: Some(ca.to_owned()),
            ..ClientTlsSettings::default()
        })
        .with_context(|| format!("loading the CA {}", ca.display()))?;
        self.tls = Some(tls);
        Ok(self)
    }
}

/// `--route`: `host:port`, `http://host:port`, or `https://host:port` (then `ca` is the CA
/// file to trust; the system's roots without it).
pub fn parse_route_url(route: &str, ca: Option<&std::path::Path>) -> anyhow::Result<Route> {
    let addr = cim_io::sdk::RouteAddr::parse(route).map_err(anyhow::Error::msg)?;
    let plain = Route {
        host: addr.host,
        port: addr.port,
        tls: None,
        transport: ServerTransport::Tcp,
    };
    match (addr.https, ca) {
        (false, None) => Ok(plain),
        (false, Some(_)) => bail!("--ca is for an https:// --route"),
        (true, Some(ca)) => plain.with_ca(ca),
        (true, None) => Ok(Route {
            tls: Some(
                ClientTls::load(ClientTlsSettings::default())
                    .context("the system's trusted roots (or give --ca)")?,
            ),
            ..plain
        }),
    }
}

pub fn route_api(route: &Route) -> RouteApi<TokioNet> {
    let api = RouteApi::new(
        TokioNet,
        route.host.clone(),
        route.port,
        Duration::from_secs(30),
    );
    match &route.tls {
        Some(tls) => api.with_tls(tls.clone()),
        None => api,
    }
}

/// Registers `n` users named `<prefix>-<i>`, `concurrency` at a time.
pub async fn register_users(
    route: &Route,
    prefix: &str,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<(UserId, String)>> {
    let api = route_api(route);
    let bar = bar(n as u64, "register");
    let users: Vec<anyhow::Result<(UserId, String)>> = futures::stream::iter((0..n).map(|i| {
        let api = api.clone();
        let bar = bar.clone();
        let name = format!("{prefix}-{i}");
        async move {
            let r = api
                .register(&name, PASSWORD)
                .await
                .with_context(|| format!("registering {name}"))?;
            bar.inc(1);
            Ok((UserId(r.user_id), name))
        }
    }))
    .buffered(concurrency)
    .collect()
    .await;
    bar.finish_and_clear();
    users.into_iter().collect()
}

/// A unique-enough tag for user and group names, so runs against one cluster do not clash.
pub fn run_tag() -> String {
    format!("{:x}", cim_io::launch::os_seed() % 0xff_ffff)
}

/// One SDK client, started; call [`wait_online`] on its events.
pub fn start_client<N: Network>(
    net: N,
    route: &Route,
    user: UserId,
    name: &str,
) -> (Client<N>, Events) {
    let session = ClientConfig::new(user, name, PASSWORD, cim_io::launch::os_seed());
    let mut options = SdkOptions::new(route.host.clone(), route.port, session);
    options.tls = route.tls.clone().map(|client| SdkTls {
        client,
        route_https: true,
    });
    options.server_transport = route.transport;
    Client::start(net, Clock::System, options)
}

/// Waits for `Online`; the server's id.
pub async fn wait_online(events: &mut Events, within: Duration) -> anyhow::Result<String> {
    let wait = async {
        while let Some(event) = events.next().await {
            match event {
                ClientEvent::Online { server, .. } => return Ok(server.to_string()),
                ClientEvent::LoginRejected(e) => bail!("login rejected: {e}"),
                ClientEvent::Stopped(reason) => bail!("client stopped: {reason:?}"),
                _ => {}
            }
        }
        bail!("client ended before going online")
    };
    tokio::time::timeout(within, wait)
        .await
        .map_err(|_| anyhow::anyhow!("not online within {within:?}"))?
}

/// Starts a client per user, `concurrency` logins at a time, each online before it counts.
pub async fn start_clients(
    route: &Route,
    users: &[(UserId, String)],
    concurrency: usize,
) -> anyhow::Result<Vec<(Client<TokioNet>, Events)>> {
    let clients = start_clients_on(TokioNet, route, users, concurrency).await?;
    Ok(clients.into_iter().map(|(c, e, _)| (c, e)).collect())
}

/// [`start_clients`] over any network (e.g. one that spreads source addresses).
pub async fn start_clients_on<N: Network>(
    net: N,
    route: &Route,
    users: &[(UserId, String)],
    concurrency: usize,
) -> anyhow::Result<Vec<(Client<N>, Events, String)>> {
    let bar = bar(users.len() as u64, "online");
    let clients: Vec<anyhow::Result<(Client<N>, Events, String)>> =
        futures::stream::iter(users.iter().map(|(user, name)| {
            let bar = bar.clone();
            let net = net.clone();
            async move {
                let (client, mut events) = start_client(net, route, *user, name);
                let server = wait_online(&mut events, Duration::from_secs(120))
                    .await
                    .with_context(|| format!("{name} going online"))?;
                bar.inc(1);
                Ok((client, events, server))
            }
        }))
        .buffered(concurrency)
        .collect()
        .await;
    bar.finish_and_clear();
    clients.into_iter().collect()
}

/// `used_cpu_sys + used_cpu_user` of the Redis server at `port`.
pub fn redis_cpu_seconds(port: u16) -> anyhow::Result<f64> {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "INFO", "cpu"])
        .output()
        .context("redis-cli")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> anyhow::Result<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .with_context(|| format!("INFO cpu on {port} has no {name}: {text}"))?
            .trim()
            .parse::<f64>()
            .with_context(|| format!("{name} on {port}"))
    };
    Ok(field("used_cpu_sys")? + field("used_cpu_user")?)
}

/// CPU time (user + system) of a process so far, from /proc/<pid>/stat.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after ')'.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Resident memory of a process in bytes, from /proc/<pid>/status.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A shared counter with a name, for progress across tasks.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) -> u64 {
        self.0.fetch_add(n, Ordering::Relaxed) + n
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A printed result table: a title, column names, rows of cells.
#[derive(Debug, Clone)]
pub struct Table {
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: impl Into<String>, columns: &[&str]) -> Self {
        Self {
            title: title.into(),
            columns: columns.iter().map(|c| (*c).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Markdown, so the output pastes into BENCHMARKS.md as it is.
    pub fn render(&self) -> String {
        let mut out = format!("\n### {}\n\n", self.title);
        out += &format!("| {} |\n", self.columns.join(" | "));
        out += &format!("|{}\n", "---|".repeat(self.columns.len()));
        for row in &self.rows {
            out += &format!("| {} |\n", row.join(" | "));
        }
        out
    }
}

pub fn f1(x: f64) -> String {
    format!("{x:.1}")
}

pub fn f2(x: f64) -> String {
    format!("{x:.2}")
}

pub fn int(x: f64) -> String {
    let n = x.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
