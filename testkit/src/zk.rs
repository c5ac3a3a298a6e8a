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
use crate::{TestCa, TestCert};

pub(crate) const ZK_JAR: &str = "/usr/share/java/zookeeper.jar";
pub(crate) const ZK_CONF_DIR: &str = "/etc/zookeeper/conf";

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

/// A ZooKeeper that also serves TLS (`secureClientPort`, `ssl.clientAuth=need`) with a
/// certificate of [`Self::ca`] for `127.0.0.1` / `localhost`.
#[derive(Debug)]
pub struct ZkTlsServer {
    /// The plaintext port's server (for setup and `ruok`).
    pub plain: ZkServer,
    /// `127.0.0.1:<secure port>`.
    pub tls_addr: String,
    /// The CA of the server's and of [`Self::client`]'s certificates.
    pub ca: TestCa,
    /// A client certificate the ensemble accepts.
    pub client: TestCert,
}

static ZK_TLS: OnceLock<Option<ZkTlsServer>> = OnceLock::new();

/// A ZooKeeper of its own serving TLS, started on first use. `None` means "skip".
pub fn zookeeper_tls() -> Option<&'static ZkTlsServer> {
    ZK_TLS
        .get_or_init(|| {
            zookeeper()?;
            let ca = TestCa::new("zookeeper");
            let server_cert = ca.server_cert("zk-server");
            let client = ca.client_cert("zk-client", "cim");
            let mut last_error = String::new();
            for attempt in 0..3 {
                let tls = TlsSetup {
                    secure_port: free_port(),
                    keystore: format!("{}{}", server_cert.key_pem, server_cert.cert_pem),
                    truststore: ca.cert_pem.clone(),
                };
                match start(attempt + 10, Some(&tls)) {
                    Ok(plain) => {
                        return Some(ZkTlsServer {
                            plain,
                            tls_addr: format!("127.0.0.1:{}", tls.secure_port),
                            ca,
                            client,
                        });
                    }
                    Err(e) => last_error = e,
                }
            }
            panic!("could not start ZooKeeper with TLS: {last_error}");
        })
        .as_ref()
}

/// What a TLS-serving ZooKeeper is started with.
struct TlsSetup {
    secure_port: u16,
    /// Key and certificate, PEM, in one file as ZooKeeper's PEM key store wants them.
    keystore: String,
    truststore: String,
}

/// ZooKeeper's TLS runs on Netty, whose jars Debian's `zookeeper` package pulls in
/// (libnetty-java) but does not put on the class path.
const NETTY_JARS: [&str; 8] = [
    "handler",
    "codec",
    "buffer",
    "common",
    "transport",
    "resolver",
    "transport-native-unix-common",
    "transport-native-epoll",
];

/// Why ZooKeeper cannot run here, if it cannot: no `java`, or no jar.
pub(crate) fn zookeeper_missing() -> Option<&'static str> {
    if Command::new("java")
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
    }
}

/// Whether ZooKeeper can run here; if not, says that `what` is skipped (and fails under
/// `CI=true`, where CI must have installed it).
pub(crate) fn zookeeper_or_skip(what: &str) -> bool {
    let Some(why) = zookeeper_missing() else {
        return true;
    };
    assert!(
        !in_ci(),
        "CI=true and {why}: CI must install ZooKeeper (apt-get install zookeeper)"
    );
    // Written to the real stderr (not `eprintln!`, which the test harness captures), so
    // the skip is visible in a normal `cargo test` run.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPING {what}: {why} (install the Debian `zookeeper` package)"
    );
    false
}

fn start_or_skip() -> Option<ZkServer> {
    if !zookeeper_or_skip("ZooKeeper registry tests") {
        return None;
    }
    // A free port can be taken between probing and ZooKeeper binding it; try a few.
    let mut last_error = String::new();
    for attempt in 0..3 {
        match start(attempt, None) {
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

pub(crate) fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind a probe socket");
    listener.local_addr().expect("probe socket address").port()
}

fn start(attempt: u32, tls: Option<&TlsSetup>) -> Result<ZkServer, String> {
    let dir =
        std::env::temp_dir().join(format!("cim-registry-zk-{}-{attempt}", std::process::id()));
    std::fs::create_dir_all(dir.join("data")).map_err(|e| format!("temp dir: {e}"))?;
    let port = free_port();
    // tickTime 500 ms: the ensemble accepts session timeouts from 1 s (2 ticks) to 10 s
    // (20 ticks), and checks expiry every tick, so expiry tests run fast.
    let mut cfg = format!(
        "tickTime=500\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
         admin.enableServer=false\n4lw.commands.whitelist=ruok,srvr,mntr\n",
        dir.join("data").display()
    );
    let mut classpath = format!("{ZK_CONF_DIR}:{ZK_JAR}");
    let mut java_options = String::new();
    if let Some(tls) = tls {
        let (keystore, truststore) = (dir.join("keystore.pem"), dir.join("truststore.pem"));
        std::fs::write(&keystore, &tls.keystore).map_err(|e| format!("keystore: {e}"))?;
        std::fs::write(&truststore, &tls.truststore).map_err(|e| format!("truststore: {e}"))?;
        cfg.push_str(&format!(
            "secureClientPort={}\nssl.keyStore.location={}\nssl.keyStore.type=PEM\n\
             ssl.trustStore.location={}\nssl.trustStore.type=PEM\nssl.clientAuth=need\n",
            tls.secure_port,
            keystore.display(),
            truststore.display()
        ));
        for jar in NETTY_JARS {
            classpath.push_str(&format!(":/usr/share/java/netty-{jar}.jar"));
        }
        java_options =
            "-Dzookeeper.serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory"
                .into();
    }
    let cfg_path = dir.join("zoo.cfg");
    std::fs::write(&cfg_path, cfg).map_err(|e| format!("zoo.cfg: {e}"))?;
    let log = std::fs::File::create(dir.join("zk.out")).map_err(|e| format!("zk.out: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("zk.out: {e}"))?;
    // The watchdog: java runs as its child; when this test process is gone (or java died),
    // java is killed and the temp dir removed.
    let script = r#"java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 $5 -cp "$1" \
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
        .arg(&java_options)
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
