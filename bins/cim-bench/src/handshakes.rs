//! `handshakes`: the TLS handshake rate of one server's client gateway, and what it costs the
//! server per handshake. The bench starts a cluster with one server over TLS (a throwaway
//! CA), then for a few seconds keeps `concurrency` connections in flight against that
//! server's gateway: TCP connect, TLS handshake (the server's certificate verified against
//! the CA, as the SDK does), close_notify, wait for the server to close. Counted twice: by
//! the bench, and by the server's own `cim_server_tls_handshakes_total{listener="gateway"}`.
//! The cluster process's CPU time over the same seconds gives handshakes per CPU-second of
//! the server (the process also holds an idle route).
//!
//! Two kinds: **full** (no session resumption: every handshake signs with the server's key
//! and the client verifies the chain: a reconnect storm of clients the server has never
//! seen, e.g. after a failover) and **resumed** (the client offers a TLS 1.3 ticket from an
//! earlier handshake with this server; rustls' defaults on both sides). Then the baseline:
//! the same loop without TLS against a plaintext cluster (connect, close, wait for the
//! server's close), so what a connection costs the server apart from TLS is visible.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use rustls::client::Resumption;
use rustls_pki_types::ServerName;
use rustls_pki_types::pem::PemObject as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::TlsConnector;

use crate::cluster::{self, Argon2Cost, Setup};
use crate::util::{self, Counter, Table, f1, int};

#[derive(clap::Args, Debug, Clone)]
pub struct HandshakeArgs {
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Seconds each kind runs [default: 5; --quick 1].
    #[arg(long)]
    pub seconds: Option<f64>,
}

/// What one kind measured.
#[derive(Debug)]
struct Figures {
    /// Handshakes the bench completed.
    client: u64,
    /// Of those, resumed ones.
    resumed: u64,
    /// Handshakes the server counted complete (TLS only).
    server: Option<u64>,
    errors: u64,
    secs: f64,
    server_cpu: f64,
    bench_cpu: f64,
}

pub async fn run(args: &HandshakeArgs, quick: bool) -> anyhow::Result<Table> {
    let seconds = args.seconds.unwrap_or(if quick { 1.0 } else { 5.0 });
    let mut table = Table::new(
        format!(
            "handshakes: connections with a TLS 1.3 handshake to one server's client gateway, {} in flight, {seconds} s each (embedded store, the server and an idle route in one process)",
            args.concurrency
        ),
        &[
            "kind",
            "connections/s (bench)",
            "handshakes/s (server)",
            "resumed",
            "errors",
            "server CPU s",
            "per server CPU-second",
            "server CPU µs / connection",
            "bench CPU s",
        ],
    );
    for tls in [true, false] {
        let target = cluster::start(&Setup {
            route: None,
            ca: None,
            redis: false,
            redis_cluster: false,
            wait_replicas: 0,
            argon2: Argon2Cost::Test,
            password_workers: None,
            servers: 1,
            tls,
        })?;
        let server = target.servers.first().context("the cluster has a server")?;
        let pid = target
            .cluster
            .as_ref()
            .map(cluster::ChildProc::pid)
            .context("a started cluster")?;
        let kinds: Vec<(&str, Option<TlsConnector>)> = match &target.tls {
            Some(pki) => vec![
                ("TLS full", Some(connector(&pki.pki.ca, false)?)),
                ("TLS resumed", Some(connector(&pki.pki.ca, true)?)),
            ],
            None => vec![("plaintext (no TLS)", None)],
        };
        for (kind, tls) in kinds {
            eprintln!(
                "handshakes: {kind}, {} in flight against server {}'s gateway {} for {seconds} s",
                args.concurrency, server.id, server.client
            );
            let resume = kind == "TLS resumed";
            let f = measure(server, pid, tls.clone(), args.concurrency, seconds).await?;
            if f.client == 0 || f.errors > 0 {
                bail!(
                    "{kind}: {} connections, {} errors: the gateway refused clients",
                    f.client,
                    f.errors
                );
            }
            if resume && f.resumed == 0 {
                bail!("{kind}: no handshake was resumed");
            }
            // The server's own count where it has one (TLS), else the bench's.
            let counted = f.server.unwrap_or(f.client);
            table.row(vec![
                kind.to_owned(),
                int(f.client as f64 / f.secs),
                f.server.map_or("-".into(), |n| int(n as f64 / f.secs)),
                if tls.is_some() {
                    int(f.resumed as f64)
                } else {
                    "-".into()
                },
                f.errors.to_string(),
                format!("{:.2}", f.server_cpu),
                int(counted as f64 / f.server_cpu.max(1e-9)),
                f1(1e6 * f.server_cpu / (counted.max(1) as f64)),
                format!("{:.2}", f.bench_cpu),
            ]);
        }
    }
    Ok(table)
}

fn connector(ca: &std::path::Path, resume: bool) -> anyhow::Result<TlsConnector> {
    Ok(TlsConnector::from(client_config(ca, resume)?))
}

/// The bench's TLS client: trusts `ca`, checks the name, TLS 1.3 and 1.2 as the SDK offers;
/// `resume` keeps rustls' session cache, else every handshake is a full one.
fn client_config(ca: &std::path::Path, resume: bool) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading {}", ca.display()))?
    {
        roots.add(cert.context("a CA certificate")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        config.resumption = Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// The gateway's completed handshakes, from the server's `/metrics` (`None` without TLS).
async fn server_handshakes(http: SocketAddr) -> anyhow::Result<Option<u64>> {
    let metrics = crate::procs::http_get(http, "/metrics").await?;
    metrics
        .lines()
        .find(|l| {
            l.starts_with("cim_server_tls_handshakes_total{") && l.contains("listener=\"gateway\"")
        })
        .map(|l| l.rsplit(' ').next()?.parse().ok())
        .map(|n| n.context("a bad cim_server_tls_handshakes_total line"))
        .transpose()
}

async fn measure(
    server: &cluster::ServerAddrs,
    pid: u32,
    connector: Option<TlsConnector>,
    concurrency: usize,
    seconds: f64,
) -> anyhow::Result<Figures> {
    let done = Arc::new(Counter::default());
    let resumed = Arc::new(Counter::default());
    let errors = Arc::new(Counter::default());
    let stop = Arc::new(AtomicBool::new(false));
    let bar = util::bar(0, "handshakes");
    let server_before = server_handshakes(server.http).await?;
    let cpu0 = util::cpu_seconds(pid).context("the cluster's CPU time")?;
    let bench0 = util::cpu_seconds(std::process::id()).context("the bench's CPU time")?;
    let started = util::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (connector, done, resumed, errors, stop) = (
            connector.clone(),
            done.clone(),
            resumed.clone(),
            errors.clone(),
            stop.clone(),
        );
        let addr = server.client;
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match one(connector.as_ref(), addr).await {
                    Ok(was_resumed) => {
                        done.add(1);
                        if was_resumed {
                            resumed.add(1);
                        }
                    }
                    Err(error) => {
                        if errors.add(1) <= 3 {
                            eprintln!("handshake failed: {error:#}");
                        }
                    }
                }
            }
        }));
    }
    let run_for = Duration::from_secs_f64(seconds);
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(100)).await;
        bar.set_position(done.get());
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu1 = util::cpu_seconds(pid).context("the cluster's CPU time")?;
    let bench1 = util::cpu_seconds(std::process::id()).context("the bench's CPU time")?;
    bar.finish_and_clear();
    let server_after = server_handshakes(server.http).await?;
    Ok(Figures {
        client: done.get(),
        resumed: resumed.get(),
        server: server_after.zip(server_before).map(|(a, b)| a - b),
        errors: errors.get(),
        secs,
        server_cpu: cpu1 - cpu0,
        bench_cpu: bench1 - bench0,
    })
}

/// One connection: handshake, close_notify, then read until the server closes (so the
/// server has finished with it before the next one counts). Whether it was resumed.
/// Without TLS (the baseline): connect, close, read until the server closes.
async fn one(connector: Option<&TlsConnector>, addr: SocketAddr) -> anyhow::Result<bool> {
    const LIMIT: Duration = Duration::from_secs(10);
    let work = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let Some(connector) = connector else {
            tcp.shutdown().await?;
            let mut sink = [0u8; 64];
            while tcp.read(&mut sink).await? > 0 {}
            return anyhow::Ok(false);
        };
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = connector.connect(name, tcp).await?;
        let was_resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        tls.shutdown().await?;
        let mut sink = [0u8; 512];
        // The server's session tickets, then its close (with or without a close_notify: the
        // handshake is what is measured).
        loop {
            match tls.read(&mut sink).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        anyhow::Ok(was_resumed)
    };
    tokio::time::timeout(LIMIT, work)
        .await
        .context("a handshake and close took over 10 s")?
}
