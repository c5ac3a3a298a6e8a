//! `connections`: N idle clients on one server process (heartbeats running), their
//! connections spread over several 127.0.0.x source addresses (one source address has only
//! ~28,000 ephemeral ports towards one server port); the server's resident memory per
//! connection (RSS after minus before, over N) and its CPU while idle.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use cim_io::net::{Network, TokioNet};

use crate::procs;
use crate::util::{self, Table, f1, f2, int};

#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionsArgs {
    /// Idle clients [default: 50000; --quick 100].
    #[arg(long)]
    pub clients: Option<usize>,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N).
    #[arg(long, default_value_t = 4)]
    pub sources: u8,
    /// Seconds of idle CPU measurement [default: 30; --quick 3].
    #[arg(long)]
    pub idle_seconds: Option<u64>,
}

/// Dials from 127.0.0.2, 127.0.0.3, ... in turn (for the clients' server connections and
/// their HTTP calls alike); listens like [`TokioNet`].
#[derive(Debug, Clone)]
pub struct SpreadNet {
    sources: u8,
    next: Arc<AtomicUsize>,
}

impl Network for SpreadNet {
    type Stream = tokio::net::TcpStream;
    type Listener = tokio::net::TcpListener;

    async fn bind(&self, addr: std::net::SocketAddr) -> io::Result<Self::Listener> {
        TokioNet.bind(addr).await
    }

    async fn dial(&self, host: String, port: u16) -> io::Result<Self::Stream> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.sources.max(1) as usize;
        let source = std::net::SocketAddr::from(([127, 0, 0, 2 + n as u8], 0));
        let target = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .find(std::net::SocketAddr::is_ipv4)
            .ok_or_else(|| io::Error::other("no IPv4 address"))?;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(source)?;
        let stream = socket.connect(target).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Raises the open-file limit (soft and, as root, hard) so N sockets fit; children started
/// afterwards inherit it.
fn raise_nofile(want: u64) -> u64 {
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    if want > hard && rlimit::Resource::NOFILE.set(want, want).is_ok() {
        return want;
    }
    if want > soft {
        let _ = rlimit::Resource::NOFILE.set(want.min(hard), hard);
    }
    rlimit::Resource::NOFILE.get().map_or(soft, |(s, _)| s)
}

pub async fn run(args: &ConnectionsArgs, quick: bool) -> anyhow::Result<Table> {
    let n = args.clients.unwrap_or(if quick { 100 } else { 50_000 });
    let idle = Duration::from_secs(args.idle_seconds.unwrap_or(if quick { 3 } else { 30 }));
    let limit = raise_nofile(n as u64 + 10_000);
    eprintln!("connections: open-file limit {limit}");
    // The bench holds one socket per client and the server one per connection, each in
    // its own process; both inherit this limit.
    if (n as u64) + 2_000 > limit {
        anyhow::bail!(
            "{n} clients need an open-file limit above {}, and it is {limit} (raising the hard \
             limit needs root with CAP_SYS_RESOURCE); try --clients {}",
            n + 2_000,
            limit.saturating_sub(2_000)
        );
    }
    let deployment = procs::deploy(1, "6s").await?;
    let route = deployment.route.clone();
    let server_pid = deployment.servers[0].pid();
    let tag = util::run_tag();
    let users = util::register_users(&route, &format!("cn{tag}"), n, 64).await?;
    // Let the server settle before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = util::rss_bytes(server_pid).context("server RSS")?;
    let net = SpreadNet {
        sources: args.sources,
        next: Arc::default(),
    };
    let started = util::now();
    let clients = util::start_clients_on(net, &route, &users, 256).await?;
    let connect_secs = started.elapsed().as_secs_f64();
    // Events must be drained (pongs and such are not events, but be safe).
    let mut handles = Vec::new();
    let mut drains = Vec::new();
    for (client, mut events, _) in clients {
        handles.push(client);
        drains.push(tokio::spawn(async move {
            while events.next().await.is_some() {}
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss1 = util::rss_bytes(server_pid).context("server RSS")?;
    let cpu0 = util::cpu_seconds(server_pid).context("server CPU")?;
    let bar = util::bar(idle.as_secs(), "idle");
    for _ in 0..idle.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let cpu1 = util::cpu_seconds(server_pid).context("server CPU")?;
    let rss2 = util::rss_bytes(server_pid).context("server RSS")?;
    for c in handles {
        drop(c);
    }
    for d in drains {
        d.abort();
    }
    let per_conn = rss2.saturating_sub(rss0) as f64 / n as f64;
    let mut table = Table::new(
        format!(
            "connections: {n} idle clients on one server process ({} source addresses, heartbeat 10 s)",
            args.sources
        ),
        &[
            "clients",
            "online after s",
            "server RSS before MiB",
            "after MiB",
            "KiB per connection",
            "idle CPU %",
        ],
    );
    table.row(vec![
        int(n as f64),
        f1(connect_secs),
        f1(rss0 as f64 / 1_048_576.0),
        f1(rss2.max(rss1) as f64 / 1_048_576.0),
        f2(per_conn / 1024.0),
        f2((cpu1 - cpu0) / idle.as_secs_f64() * 100.0),
    ]);
    Ok(table)
}
