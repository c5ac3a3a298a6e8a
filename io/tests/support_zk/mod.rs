//! Test support for the ZooKeeper registry: a standalone ZooKeeper this test binary starts
//! and owns, and a TCP proxy that can cut a client off from it (a network partition).
//!
//! One ZooKeeper per test binary (tests share it and use unique roots). It is killed when the
//! test binary exits: a small shell watchdog waits for this process to go away, then kills
//! java and removes the temp dir (a `static` is never dropped, so `Drop` cannot do it).
//!
//! Without java or the ZooKeeper jar the ZooKeeper tests skip with a message, except under
//! `CI=true`, where they fail: CI installs both.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

const ZK_JAR: &str = "/usr/share/java/zookeeper.jar";
const ZK_CONF_DIR: &str = "/etc/zookeeper/conf";

/// A running standalone ZooKeeper.
#[derive(Debug)]
pub struct ZkServer {
    /// `127.0.0.1:<port>`.
    pub addr: String,
    pub dir: PathBuf,
}

static ZK: OnceLock<Option<ZkServer>> = OnceLock::new();

/// The shared ZooKeeper, started on first use. `None` means "skip" (message printed).
pub fn zookeeper() -> Option<&'static ZkServer> {
    ZK.get_or_init(start_or_skip).as_ref()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn start_or_skip() -> Option<ZkServer> {
    let missing = if Command::new("java")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        Some("`java` is not on PATH")
    } else if !Path::new(ZK_JAR).exists() {
        Some("the ZooKeeper jar /usr/share/java/zookeeper.jar is missing")
    } else {
        None
    };
    if let Some(why) = missing {
        assert!(
            !in_ci(),
            "CI=true and {why}: CI must install ZooKeeper (apt-get install zookeeper)"
        );
        // Written to the real stderr (not `eprintln!`, which the test harness captures), so
        // the skip is visible in a normal `cargo test` run.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPING ZooKeeper registry tests: {why} (install the Debian `zookeeper` package)"
        );
        return None;
    }
    // A free port can be taken between probing and ZooKeeper binding it; try a few.
    let mut last_error = String::new();
    for attempt in 0..3 {
        match start(attempt) {
            Ok(server) => return Some(server),
            Err(e) => last_error = e,
        }
    }
    panic!("could not start ZooKeeper: {last_error}");
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique() -> u64 {
    UNIQUE.fetch_add(1, Ordering::SeqCst)
}

fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind a probe socket");
    listener.local_addr().expect("probe socket address").port()
}

fn start(attempt: u32) -> Result<ZkServer, String> {
    let dir =
        std::env::temp_dir().join(format!("cim-registry-zk-{}-{attempt}", std::process::id()));
    std::fs::create_dir_all(dir.join("data")).map_err(|e| format!("temp dir: {e}"))?;
    let port = free_port();
    // tickTime 500 ms: the ensemble accepts session timeouts from 1 s (2 ticks) to 10 s
    // (20 ticks), and checks expiry every tick, so expiry tests run fast.
    let cfg = format!(
        "tickTime=500\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
         admin.enableServer=false\n4lw.commands.whitelist=ruok,srvr,mntr\n",
        dir.join("data").display()
    );
    let cfg_path = dir.join("zoo.cfg");
    std::fs::write(&cfg_path, cfg).map_err(|e| format!("zoo.cfg: {e}"))?;
    let log = std::fs::File::create(dir.join("zk.out")).map_err(|e| format!("zk.out: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("zk.out: {e}"))?;
    let classpath = format!("{ZK_CONF_DIR}:{ZK_JAR}");
    // The watchdog: java runs as its child; when this test process is gone (or java died),
    // java is killed and the temp dir removed.
    let script = r#"java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -cp "$1" \
        org.apache.zookeeper.server.quorum.QuorumPeerMain "$2" &
      j=$!
      while kill -0 "$3" 2>/dev/null && kill -0 "$j" 2>/dev/null; do sleep 0.5; done
      kill "$j" 2>/dev/null; wait "$j" 2>/dev/null; rm -rf "$4""#;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(&classpath)
        .arg(&cfg_path)
        .arg(std::process::id().to_string())
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("spawn java: {e}"))?;
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..600 {
        if ruok(&addr) {
            eprintln!(
                "ZooKeeper for the registry tests: {addr} (dir {})",
                dir.display()
            );
            return Ok(ZkServer { addr, dir });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = std::fs::read_to_string(dir.join("zk.out")).unwrap_or_default();
    Err(format!("no `imok` from {addr} within 60 s; output:\n{out}"))
}

fn ruok(addr: &str) -> bool {
    let Ok(mut stream) = StdStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"ruok").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer == "imok"
}

/// A ZooKeeper root no other test uses.
pub fn unique_root(tag: &str) -> String {
    format!(
        "/cim-test-{}/{tag}-{}/servers",
        std::process::id(),
        unique()
    )
}

/// A TCP proxy in front of ZooKeeper that can be cut. While cut, every connection goes
/// silent (bytes are neither forwarded nor answered, like a partition, not a refusal) and new
/// connections are accepted but never answered; on heal those connections are closed, so the
/// client reconnects through a working path.
#[derive(Debug)]
pub struct Proxy {
    pub addr: String,
    cut: watch::Sender<bool>,
    accept: AbortHandle,
}

impl Proxy {
    pub async fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address").to_string();
        let (cut, _) = watch::channel(false);
        let target = target.to_owned();
        let cut_rx = cut.subscribe();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(pump(client, target.clone(), cut_rx.clone()));
            }
        })
        .abort_handle();
        Proxy { addr, cut, accept }
    }

    pub fn blackhole(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Closes every held connection.
        self.cut.send_replace(false);
    }
}

async fn pump(mut client: TcpStream, target: String, mut cut: watch::Receiver<bool>) {
    if *cut.borrow_and_update() {
        let _ = cut.wait_for(|c| !*c).await;
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(&target).await else {
        return;
    };
    let mut a = vec![0u8; 16 * 1024];
    let mut b = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            biased;
            changed = cut.changed() => {
                if changed.is_err() {
                    return;
                }
                if *cut.borrow_and_update() {
                    // Silent until healed, then closed.
                    let _ = cut.wait_for(|c| !*c).await;
                    return;
                }
            }
            n = client.read(&mut a) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if upstream.write_all(&a[..n]).await.is_err() { return },
            },
            n = upstream.read(&mut b) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => if client.write_all(&b[..n]).await.is_err() { return },
            },
        }
    }
}
