//! Scenarios whose servers run in processes of their own (so one can be SIGKILLed, or its
//! memory read apart): Redis (AOF everysec) and ZooKeeper the bench starts, a route-only
//! cluster process, and `cim-server` processes.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use cim_testkit::RedisServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::cluster::{self, ChildProc};

/// Redis, ZooKeeper, the route process and the server processes.
#[derive(Debug)]
pub struct Deployment {
    pub route: crate::util::Route,
    /// Kept running for the deployment's lifetime.
    pub _route_proc: ChildProc,
    pub servers: Vec<ChildProc>,
    pub _redis: RedisServer,
}

/// Starts everything with `servers` server processes named s1.., and waits until the route
/// has a link up to each.
pub async fn deploy(servers: usize, zk_session_timeout: &str) -> anyhow::Result<Deployment> {
    deploy_with(servers, zk_session_timeout, &RouteSetup::default()).await
}

/// How [`deploy_with`] runs the route process.
#[derive(Debug, Clone, Default)]
pub struct RouteSetup {
    /// `None`: the test parameters (`cim-bench cluster`'s default).
    pub argon2: Option<cluster::Argon2Cost>,
    /// `--no-resumption`: every login checks the password.
    pub no_resumption: bool,
}

/// [`deploy`], with the route's argon2 cost and resumption chosen.
pub async fn deploy_with(
    servers: usize,
    zk_session_timeout: &str,
    setup: &RouteSetup,
) -> anyhow::Result<Deployment> {
    let redis = cluster::start_redis()?;
    let Some(zk) = cim_testkit::zookeeper() else {
        bail!("ZooKeeper is needed (Debian: apt-get install zookeeper)");
    };
    let root = format!("/cim-bench-{}/servers", std::process::id());
    let mut route_cmd = std::process::Command::new(std::env::current_exe()?);
    route_cmd
        .arg("cluster")
        .args([
            "--servers",
            "0",
            "--redis-url",
            &redis.url(),
            "--zk",
            &zk.addr,
        ])
        .args(["--zk-root", &root]);
    if let Some(cost) = setup.argon2 {
        route_cmd.args(["--argon2", cluster::argon2_arg(cost)]);
    }
    if setup.no_resumption {
        route_cmd.arg("--no-resumption");
    }
    cluster::child_env(&mut route_cmd);
    let (route, _, route_proc) = cluster::spawn_cluster(route_cmd, "route")?;
    let mut procs = Vec::new();
    for i in 1..=servers {
        procs.push(cluster::spawn_server(
            &format!("s{i}"),
            &redis.url(),
            &zk.addr,
            &root,
            zk_session_timeout,
        )?);
    }
    let addr: SocketAddr = route.addr().parse()?;
    for _ in 0..300 {
        let metrics = http_get(addr, "/metrics").await.unwrap_or_default();
        let up = metrics
            .lines()
            .find(|l| l.starts_with("cim_route_links_up"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<usize>().ok());
        if up == Some(servers) {
            return Ok(Deployment {
                route,
                _route_proc: route_proc,
                servers: procs,
                _redis: redis,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the route did not link to {servers} server(s) within 30 s")
}

/// A bare HTTP/1.0 GET (the body only).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut out))
        .await
        .context("GET timed out")??;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}
