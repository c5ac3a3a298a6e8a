//! A private `redis-server` per test, optionally with AOF, TLS or ACL users, that can be
//! killed and restarted on the same port and directory (what an operator's Redis restart
//! looks like).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::in_ci;

/// A `redis-server` this test started, on a free port, with a temp dir; killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    setup: RedisSetup,
}

/// How to start a [`RedisServer`] beyond the defaults (no persistence, plaintext, the
/// `default` user without a password).
#[derive(Debug, Clone, Default)]
pub struct RedisSetup {
    /// `appendonly yes` with `appendfsync always`.
    pub aof: bool,
    /// Serve TLS only, on the one port (`--port 0 --tls-port <port>`).
    pub tls: Option<RedisTlsSetup>,
    /// ACL file lines, e.g. `user cim-route on >secret ~cim:* +@all`. A `user default ...`
    /// line replaces the passwordless default user.
    pub acl: Vec<String>,
}

/// The certificate Redis serves, and the CA that client certificates must chain to.
#[derive(Debug, Clone)]
pub struct RedisTlsSetup {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `--tls-ca-cert-file`: the CA client certificates are checked against.
    pub client_ca: PathBuf,
    /// `--tls-auth-clients yes` (a client certificate is required) or `no`.
    pub require_client_cert: bool,
}

impl RedisServer {
    /// Starts a server without persistence, or `None` (with a message) if `redis-server` is
    /// not installed. Under `CI=true` a missing `redis-server` fails the test instead.
    pub fn start() -> Option<Self> {
        Self::start_with(RedisSetup::default())
    }

    /// Starts a server with `appendonly yes` and `appendfsync always`, so a restart keeps
    /// every acknowledged write.
    pub fn start_with_aof() -> Option<Self> {
        Self::start_with(RedisSetup {
            aof: true,
            ..RedisSetup::default()
        })
    }

    /// Starts a server as `setup` says, or `None` (with a message) if `redis-server` is not
    /// installed (under `CI=true`: fails).
    pub fn start_with(setup: RedisSetup) -> Option<Self> {
        let installed = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                !in_ci(),
                "redis-server is not installed, and CI=true requires the Redis tests"
            );
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPING the Redis part of this test: redis-server is not installed"
            );
            return None;
        }
        // The port is free when probed and taken a moment later; retry the rare collision.
        let mut last_error = String::new();
        for _ in 0..5 {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "cim-redis-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let port = match TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
                Ok(addr) => addr.port(),
                Err(e) => {
                    last_error = e.to_string();
                    continue;
                }
            };
            let mut server = Self {
                child: None,
                port,
                dir,
                setup: setup.clone(),
            };
            match server.spawn() {
                Ok(()) => return Some(server),
                Err(e) => last_error = e,
            }
        }
        panic!("could not start redis-server: {last_error}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).map_err(|e| e.to_string())?;
        let mut command = Command::new("redis-server");
        let port = self.port.to_string();
        match &self.setup.tls {
            None => command.args(["--port", &port]),
            Some(tls) => command
                .args(["--port", "0", "--tls-port", &port])
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .arg("--tls-ca-cert-file")
                .arg(&tls.client_ca)
                .args([
                    "--tls-auth-clients",
                    if tls.require_client_cert { "yes" } else { "no" },
                ]),
        };
        command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if !self.setup.acl.is_empty() {
            let path = self.dir.join("users.acl");
            std::fs::write(&path, self.setup.acl.join("\n") + "\n").map_err(|e| e.to_string())?;
            command.arg("--aclfile").arg(path);
        }
        if self.setup.aof {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        let child = command.spawn().map_err(|e| e.to_string())?;
        self.child = Some(child);
        for _ in 0..500 {
            let up = if self.setup.tls.is_some() {
                // The TLS port accepts once Redis is ready; speaking TLS is the test's job.
                TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            } else {
                self.answers()
            };
            if up {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!("redis-server exited: {status}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("redis-server did not answer PING within 5 s".into())
    }

    /// Kills the server (SIGKILL: no shutdown save) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (with AOF it reloads its data).
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()
    }

    /// A copy of the data directory as it is now (with AOF: every write acknowledged so far),
    /// taken while the server runs. [`Self::restart_from`] brings the server back with it:
    /// what a machine crash does to the writes of Redis's last second, or a replica that had
    /// not yet received its master's last writes.
    pub fn copy_data(&self) -> Result<PathBuf, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let copy = self.dir.with_file_name(format!(
            "{}-copy{}",
            self.dir
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        copy_dir(&self.dir, &copy).map_err(|e| format!("copy {}: {e}", self.dir.display()))?;
        Ok(copy)
    }

    /// Kills the server (SIGKILL) and starts it again on the same port from `copy` (a
    /// [`Self::copy_data`]): every write after the copy is lost. Removes `copy`.
    pub fn restart_from(&mut self, copy: &std::path::Path) -> Result<(), String> {
        self.kill();
        std::fs::remove_dir_all(&self.dir).map_err(|e| e.to_string())?;
        copy_dir(copy, &self.dir).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(copy);
        self.spawn()
    }

    /// Whether it answers PING at all over plaintext (`+PONG`, or an error such as
    /// `-NOAUTH` when the default user needs a password).
    fn answers(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
            return false;
        }
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).is_ok() && matches!(first[0], b'+' | b'-')
    }

    pub fn ping(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// `redis://127.0.0.1:<port>/`, or `rediss://` when serving TLS.
    pub fn url(&self) -> String {
        let scheme = if self.setup.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// [`Self::url`] logging in as the ACL user `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        self.url()
            .replacen("://", &format!("://{user}:{password}@"), 1)
    }

    /// Sends one inline command and returns the reply's first line (enough for CONFIG SET
    /// and DBSIZE in tests). Plaintext only, as the `default` user.
    pub fn raw(&self, command: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        stream
            .write_all(format!("{command}\r\n").as_bytes())
            .expect("write");
        let mut out = Vec::new();
        let mut byte = [0u8; 1];
        while stream.read_exact(&mut byte).is_ok() && byte[0] != b'\n' {
            out.push(byte[0]);
        }
        String::from_utf8_lossy(&out).trim_end().to_string()
    }
}

/// Copies the directory tree `from` to `to` (files and directories only: Redis's data dir).
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
