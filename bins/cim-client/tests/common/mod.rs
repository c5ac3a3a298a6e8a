//! Shared by the client's tests: an in-process cluster (one route, one server, memory
//! store and registry, real sockets on port 0) and a `cim-client` child process driven
//! through pipes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::Duration;

use cim_core::ids::{ConvId, LogEpoch, ServerId, UnixMillis, UserId};
use cim_core::memstore::MemoryStoreConfig;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_core::store::{StoreCommand, StoreReply, StoredMessage};
use cim_io::clock::Clock;
use cim_io::net::TokioNet;
use cim_io::registry::MemoryRegistry;
use cim_io::route::{self, RouteHandle, RouteOptions};
use cim_io::server::{self, ServerHandle, ServerOptions};
use cim_io::store::{MemoryBackend, Store};
use serde_json::Value;

const TICKET_SECRET: &[u8] = b"console-ticket-secret";
const LINK_SECRET: &[u8] = b"console-link-secret!";
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const WAIT: Duration = Duration::from_secs(20);

pub struct Cluster {
    pub route_port: u16,
    _route: RouteHandle,
    server: Option<ServerHandle>,
    pub store: Arc<dyn Store>,
    registry: MemoryRegistry,
    servers_started: u32,
    /// The running server's id and (client, link, http) ports, to restart it in place.
    current: Option<(ServerId, [u16; 3])>,
}

pub async fn cluster() -> Cluster {
    cluster_with(None, 0).await
}

/// A cluster whose store draws its log epochs from `seed`: two stores with different seeds
/// are two different stores to a client (a reset one looks like this).
pub async fn cluster_seeded(seed: u64) -> Cluster {
    cluster_with(None, seed).await
}

/// A cluster whose route serves its API over HTTPS with this certificate and key.
pub async fn https_cluster(cert: PathBuf, key: PathBuf) -> Cluster {
    let tls = cim_io::tls::ServerTls::load(cim_io::tls::ServerTlsSettings::new("api", cert, key))
        .expect("route certificate loads");
    cluster_with(Some(tls), 0).await
}

async fn cluster_with(https: Option<cim_io::tls::ServerTls>, seed: u64) -> Cluster {
    let store: Arc<dyn Store> = Arc::new(MemoryBackend::new(MemoryStoreConfig {
        seed,
        ..MemoryStoreConfig::default()
    }));
    let registry = MemoryRegistry::new();
    let mut options = RouteOptions::new(
        "r1",
        TicketKeys::new(1, TICKET_SECRET),
        b"console-bearer-secret".to_vec(),
        LINK_SECRET.to_vec(),
    );
    options.http_listen = SocketAddr::new(LOCAL, 0);
    options.https = https;
    let route = route::start(TokioNet, Clock::System, options, store.clone(), &registry)
        .await
        .expect("route starts");
    let mut cluster = Cluster {
        route_port: route.http_addr().port(),
        _route: route,
        server: None,
        store,
        registry,
        servers_started: 0,
        current: None,
    };
    cluster.start_server().await;
    cluster
}

impl Cluster {
    /// Starts a server (`s1`, then `s2`, ...) on fresh ports.
    pub async fn start_server(&mut self) {
        self.servers_started += 1;
        let id = ServerId::new(format!("s{}", self.servers_started));
        self.start_server_as(id, [0, 0, 0]).await;
    }

    /// Stops the server gracefully (what SIGTERM or `systemctl stop` does). Returns its id
    /// and ports for [`Cluster::start_again`].
    pub async fn stop_server(&mut self) -> (ServerId, [u16; 3]) {
        let server = self.server.take().expect("a server is running");
        let current = self.current.take().expect("a server is running");
        server.drain().await.expect("drained");
        current
    }

    /// Starts the stopped server again: the same id on the same ports, as a restart does.
    pub async fn start_again(&mut self, stopped: (ServerId, [u16; 3])) {
        self.start_server_as(stopped.0, stopped.1).await;
    }

    async fn start_server_as(&mut self, id: ServerId, [client, link, http]: [u16; 3]) {
        let node = ServerConfig::new(id.clone(), TicketKeys::new(1, TICKET_SECRET));
        let mut options = ServerOptions::new(node, LINK_SECRET.to_vec());
        options.listen_ip = LOCAL;
        options.advertise_host = "127.0.0.1".into();
        options.client_port = client;
        options.link_port = link;
        options.http_port = http;
        let server = server::start(
            TokioNet,
            Clock::System,
            options,
            self.store.clone(),
            &self.registry,
        )
        .await
        .expect("server starts");
        self.current = Some((
            id,
            [
                server.client_addr().port(),
                server.link_addr().port(),
                server.http_addr().port(),
            ],
        ));
        self.server = Some(server);
    }

    /// `conv`'s stored messages as `reader` (a member) may read them, oldest first.
    pub async fn log(&self, reader: UserId, conv: ConvId) -> Vec<StoredMessage> {
        let fetch = StoreCommand::Fetch {
            user: reader,
            conv,
            log_epoch: LogEpoch(0),
            after_seq: 0,
            limit: 0,
        };
        // The head names the log epoch; then the messages under it.
        let Ok(StoreReply::Fetched { head, .. }) = self.store.execute(wall(), fetch).await else {
            panic!("fetch of the head failed");
        };
        let fetch = StoreCommand::Fetch {
            user: reader,
            conv: head.conv,
            log_epoch: head.log_epoch,
            after_seq: 0,
            limit: 10_000,
        };
        match self.store.execute(wall(), fetch).await {
            Ok(StoreReply::Fetched { messages, .. }) => messages,
            other => panic!("fetch failed: {other:?}"),
        }
    }

    /// Kills the server at once, as a crash would.
    pub fn crash_server(&mut self) {
        self.current = None;
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// One `cim-client` process: its stdin, and its stdout / stderr lines as they come.
pub struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    /// Everything read so far, for failure messages.
    seen: Vec<String>,
}

fn lines_of(read: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(read).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

pub fn spawn(port: u16, user: &str, state: &Path, extra: &[&str]) -> Proc {
    spawn_as(
        &format!("http://127.0.0.1:{port}"),
        user,
        &format!("{user}-password"),
        state,
        extra,
    )
}

/// A client with this `--route` text and password.
pub fn spawn_as(route: &str, user: &str, password: &str, state: &Path, extra: &[&str]) -> Proc {
    spawn_env(route, user, password, Some(state), extra, &[])
}

/// A client with this `--route` text, password, state file (or the default one) and
/// environment.
pub fn spawn_env(
    route: &str,
    user: &str,
    password: &str,
    state: Option<&Path>,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cim-client"));
    command.args(["--route", route, "--user", user]);
    if let Some(state) = state {
        command.arg("--state").arg(state);
    }
    command.envs(env.iter().copied());
    let mut child = command
        .args(extra)
        .env("CIM_PASSWORD", password)
        .env_remove("CIM_USER_ID")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cim-client starts");
    let stdout = lines_of(child.stdout.take().expect("stdout"));
    let stderr = lines_of(child.stderr.take().expect("stderr"));
    Proc {
        stdin: child.stdin.take(),
        child,
        stdout,
        stderr,
        seen: Vec::new(),
    }
}

impl Proc {
    pub fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to cim-client");
        stdin.flush().expect("flush");
    }

    /// The first stderr line containing `text` (waiting at most `WAIT`).
    pub fn status(&mut self, text: &str) -> String {
        self.next_matching(false, |line| line.contains(text).then(|| line.to_owned()))
            .unwrap_or_else(|| panic!("no status {text:?}; seen:\n{}", self.seen.join("\n")))
    }

    /// The first stdout JSON line for which `want` says yes.
    pub fn json(&mut self, want: impl Fn(&Value) -> bool) -> Value {
        self.next_matching(true, |line| {
            serde_json::from_str::<Value>(line).ok().filter(|v| want(v))
        })
        .unwrap_or_else(|| panic!("no such JSON line; seen:\n{}", self.seen.join("\n")))
    }

    fn next_matching<T>(&mut self, stdout: bool, want: impl Fn(&str) -> Option<T>) -> Option<T> {
        let deadline = now() + WAIT;
        loop {
            // Stderr is drained meanwhile too, so the failure message shows both.
            while let Ok(line) = self.stderr.try_recv() {
                self.seen.push(format!("err: {line}"));
                if !stdout && let Some(found) = want(&line) {
                    return Some(found);
                }
            }
            let left = deadline.checked_duration_since(now())?;
            let rx = if stdout { &self.stdout } else { &self.stderr };
            match rx.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok(line) => {
                    self.seen
                        .push(format!("{}: {line}", if stdout { "out" } else { "err" }));
                    if let Some(found) = want(&line) {
                        return Some(found);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    if now() >= deadline {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// Kills the process at once (SIGKILL: nothing is saved on the way out).
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        let _ = self.child.wait();
    }

    /// Closes stdin and waits for a clean exit.
    pub fn finish(self) -> Vec<String> {
        let (code, seen) = self.exit();
        assert_eq!(code, Some(0), "exit code:\n{}", seen.join("\n"));
        seen
    }

    /// Closes stdin and waits for the exit: its code and every line seen.
    pub fn exit(mut self) -> (Option<i32>, Vec<String>) {
        drop(self.stdin.take());
        let deadline = now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                while let Ok(line) = self.stdout.recv_timeout(Duration::from_millis(100)) {
                    self.seen.push(format!("out: {line}"));
                }
                while let Ok(line) = self.stderr.try_recv() {
                    self.seen.push(format!("err: {line}"));
                }
                return (status.code(), self.seen);
            }
            if now() >= deadline {
                let _ = self.child.kill();
                panic!("cim-client did not exit:\n{}", self.seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The wall clock, for store calls made by the test itself.
fn wall() -> UnixMillis {
    Clock::System.wall()
}

pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cim-console-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

pub fn user_id(state: &Path) -> u64 {
    state_json(state)["userId"].as_u64().expect("userId")
}

pub fn state_json(state: &Path) -> Value {
    let text = std::fs::read_to_string(state).expect("state file");
    serde_json::from_str(&text).expect("state JSON")
}

/// Test-side deadlines read the same clock the code does.
pub fn now() -> cim_core::time::Instant {
    Clock::System.now()
}
