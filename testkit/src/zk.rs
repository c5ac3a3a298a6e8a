//! Test support for the ZooKeeper registry: a standalone ZooKeeper this test binary starts
//! and owns, and a TCP proxy that can cut a client off from it (a network partition).
//!
//! One ZooKeeper per test binary (tests share it and use unique roots). It is killed when the
//! test binary exits: a small shell watchdog waits for this process to go away, then kills
//! java and removes the temp dir (a `static` is never dropped, so `Drop` cannot do it).
//!
//! Without java or the ZooKeeper jar the ZooKeeper tests skip with a message, except under
//! `CI=true`, where they fail: CI installs both.

use std::io::{Read, Write};
use std::net::{TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::in_ci;

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
