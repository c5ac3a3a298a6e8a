//! A three-member ZooKeeper ensemble of this test's own, on free ports, whose members can be
//! killed (SIGKILL) and restarted one by one: what an operator's ensemble looks like when a
//! machine dies.
//!
//! Each member is a `QuorumPeerMain` with its own data directory and `myid`, the same
//! `server.1..3` lines (quorum and election ports on 127.0.0.1) and `tickTime=500`, so
//! elections and session expiry take seconds, not minutes. They start in parallel and
//! [`ZkEnsemble::start`] returns once one of them leads and the others follow (the `srvr`
//! four-letter word; Debian's ZooKeeper writes no log to watch). Starting one takes a few
//! seconds on two busy cores (the JVMs): keep it to one ensemble per test binary.
//!
//! Cleanup: dropping the ensemble kills its members and removes its directory; if the test
//! process dies first (a panic that aborts, a SIGKILL), a shell watchdog started with the
//! ensemble notices this process is gone, kills every member whose pid file it finds and
//! removes the directory.
//!
//! Without java or the ZooKeeper jar [`ZkEnsemble::start`] returns `None` with a message,
//! except under `CI=true`, where it fails the test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::zk::{ZK_CONF_DIR, ZK_JAR, free_port, zookeeper_or_skip};

static SHARED: std::sync::OnceLock<Option<ZkEnsemble>> = std::sync::OnceLock::new();

/// An ensemble shared by the tests of this binary, started on first use, for tests that do
/// not kill its members (they use unique roots). `None` means "skip" (message printed). A
/// `static` is never dropped: the watchdog cleans up when the test binary exits.
pub fn zk_ensemble() -> Option<&'static ZkEnsemble> {
    SHARED.get_or_init(ZkEnsemble::start).as_ref()
}

/// Members of every ensemble this module starts.
pub const MEMBERS: usize = 3;

/// What a member says it is, by `srvr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Leader,
    Follower,
    /// Running but not serving: no quorum, or an election under way.
    NotServing,
}

/// One member: its client address and, while it runs, its process.
#[derive(Debug)]
struct Member {
    /// 1-based, as in `myid` and the `server.N` lines.
    myid: usize,
    addr: String,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

/// A running ensemble (see the module doc).
#[derive(Debug)]
pub struct ZkEnsemble {
    members: Vec<Member>,
    dir: PathBuf,
    /// When `start` began and when the ensemble first had a leader and two followers.
    pub startup: Duration,
}

impl ZkEnsemble {
    /// Starts three members and waits (60 s at most) until one leads and two follow. `None`
    /// (with a message) when java or the jar is missing, outside CI.
    pub fn start() -> Option<Self> {
        if !zookeeper_or_skip("the ZooKeeper ensemble test") {
            return None;
        }
        // Nine free ports are probed before any member binds them; another process can take
        // one meanwhile, so a failed start is tried again on new ports.
        let mut last_error = String::new();
        for attempt in 0..3 {
            match Self::start_once(attempt) {
                Ok(ensemble) => return Some(ensemble),
                Err(e) => last_error = e,
            }
        }
        panic!("could not start a ZooKeeper ensemble: {last_error}");
    }

    fn start_once(attempt: u32) -> Result<Self, String> {
        let started = now();
        let dir =
            std::env::temp_dir().join(format!("cim-zk-ensemble-{}-{attempt}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("temp dir: {e}"))?;
        spawn_watchdog(&dir)?;
        let ports: Vec<(u16, u16, u16)> = (0..MEMBERS)
            .map(|_| (free_port(), free_port(), free_port()))
            .collect();
        let servers: String = ports
            .iter()
            .enumerate()
            .map(|(i, (_, quorum, election))| {
                format!("server.{}=127.0.0.1:{quorum}:{election}\n", i + 1)
            })
            .collect();
        let mut members = Vec::new();
        for (i, (client, _, _)) in ports.iter().enumerate() {
            let myid = i + 1;
            let member_dir = dir.join(format!("m{myid}"));
            let data = member_dir.join("data");
            std::fs::create_dir_all(&data).map_err(|e| format!("data dir: {e}"))?;
            std::fs::write(data.join("myid"), format!("{myid}\n"))
                .map_err(|e| format!("myid: {e}"))?;
            // tickTime 500 ms: sessions of 1 to 10 s, elections and syncs within a few ticks
            // (initLimit/syncLimit are in ticks). `cons` and `mntr` let a test see which
            // member holds how many client connections.
            let cfg = format!(
                "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={client}\n\
                 clientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
                 4lw.commands.whitelist=ruok,srvr,mntr,cons\n{servers}",
                data.display()
            );
            std::fs::write(member_dir.join("zoo.cfg"), cfg).map_err(|e| format!("zoo.cfg: {e}"))?;
            members.push(Member {
                myid,
                addr: format!("127.0.0.1:{client}"),
                dir: member_dir,
                child: Mutex::new(None),
            });
        }
        let ensemble = Self {
            members,
            dir,
            startup: Duration::ZERO,
        };
        for member in 0..MEMBERS {
            ensemble.spawn(member)?;
        }
        // Dropped on failure: the members started so far are killed.
        let mut ensemble = ensemble;
        ensemble.wait_for_quorum(Duration::from_secs(60), MEMBERS)?;
        ensemble.startup = started.elapsed();
        eprintln!(
            "ZooKeeper ensemble {} up in {:?} (dir {})",
            ensemble.connect_string(),
            ensemble.startup,
            ensemble.dir.display()
        );
        Ok(ensemble)
    }

    /// `127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`, as `--zk` takes it.
    pub fn connect_string(&self) -> String {
        self.members
            .iter()
            .map(|m| m.addr.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client address of member `member` (0-based).
    pub fn addr(&self, member: usize) -> &str {
        &self.members[member].addr
    }

    /// SIGKILL to member `member` (0-based): no goodbye to its peers or clients. Its data
    /// directory stays, so [`Self::restart`] brings the same member back.
    pub fn kill(&self, member: usize) {
        let m = &self.members[member];
        let mut child = m.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(m.dir.join("java.pid"));
    }

    /// Starts member `member` again (after [`Self::kill`]) with its data; returns at once.
    /// Wait for it with [`Self::wait_for_quorum`] or [`Self::mode`].
    pub fn restart(&self, member: usize) -> Result<(), String> {
        self.kill(member);
        self.spawn(member)
    }

    /// Whether member `member`'s process runs (it was not killed).
    pub fn is_running(&self, member: usize) -> bool {
        let m = &self.members[member];
        let mut child = m.child.lock().unwrap_or_else(|e| e.into_inner());
        child
            .as_mut()
            .is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_none()))
    }

    /// What member `member` says it is (`srvr`), or `None` if it does not answer.
    pub fn mode(&self, member: usize) -> Option<Mode> {
        let answer = four_letter_word(&self.members[member].addr, "srvr")?;
        Some(parse_mode(&answer))
    }

    /// The member that leads now, if any.
    pub fn leader(&self) -> Option<usize> {
        (0..MEMBERS).find(|&m| self.mode(m) == Some(Mode::Leader))
    }

    /// Client connections member `member` holds now (`mntr`'s `zk_num_alive_connections`,
    /// which counts this probe's own connection too: subtracted).
    pub fn connections(&self, member: usize) -> Option<u64> {
        let answer = four_letter_word(&self.members[member].addr, "mntr")?;
        answer
            .lines()
            .find_map(|l| l.strip_prefix("zk_num_alive_connections"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .map(|n| n.saturating_sub(1))
    }

    /// Waits until one member leads and `serving - 1` others follow (`serving` counts the
    /// leader), polling `srvr` every 100 ms; `Err` with each member's state after `limit`.
    pub fn wait_for_quorum(&self, limit: Duration, serving: usize) -> Result<(), String> {
        let deadline = now() + limit;
        loop {
            let modes: Vec<Option<Mode>> = (0..MEMBERS).map(|m| self.mode(m)).collect();
            let leaders = modes.iter().filter(|m| **m == Some(Mode::Leader)).count();
            let followers = modes.iter().filter(|m| **m == Some(Mode::Follower)).count();
            if leaders == 1 && leaders + followers >= serving {
                return Ok(());
            }
            if now() >= deadline {
                let outputs: Vec<String> = self
                    .members
                    .iter()
                    .map(|m| std::fs::read_to_string(m.dir.join("zk.out")).unwrap_or_default())
                    .collect();
                return Err(format!(
                    "no leader with {serving} serving members within {limit:?}: {modes:?}; \
                     output:\n{}",
                    outputs.join("\n---\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn(&self, member: usize) -> Result<(), String> {
        let m = &self.members[member];
        let log =
            std::fs::File::create(m.dir.join("zk.out")).map_err(|e| format!("zk.out: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("zk.out: {e}"))?;
        let child = Command::new("java")
            .args([
                "-Xmx128m",
                "-XX:+UseSerialGC",
                "-XX:TieredStopAtLevel=1",
                "-cp",
                &format!("{ZK_CONF_DIR}:{ZK_JAR}"),
                "org.apache.zookeeper.server.quorum.QuorumPeerMain",
            ])
            .arg(m.dir.join("zoo.cfg"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("spawn java for member {}: {e}", m.myid))?;
        // For the watchdog, should this process die without dropping the ensemble.
        std::fs::write(m.dir.join("java.pid"), child.id().to_string())
            .map_err(|e| format!("java.pid: {e}"))?;
        *m.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        Ok(())
    }
}

impl Drop for ZkEnsemble {
    fn drop(&mut self) {
        for member in 0..MEMBERS {
            self.kill(member);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills the members whose pid files it finds in `dir` and removes `dir` once this process
/// is gone: a `Drop` that does not depend on this process ending well.
fn spawn_watchdog(dir: &std::path::Path) -> Result<(), String> {
    let script = r#"while kill -0 "$1" 2>/dev/null && [ -d "$2" ]; do sleep 0.5; done
      for f in "$2"/m*/java.pid; do [ -f "$f" ] && kill -9 "$(cat "$f")" 2>/dev/null; done
      rm -rf "$2""#;
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(std::process::id().to_string())
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(|_| ())
        .map_err(|e| format!("spawn the ensemble's watchdog: {e}"))
}

/// The real clock: what the ensemble's start-up and elections take is real time (the ban in
/// `clippy.toml` is for the core, which is given its time).
#[allow(clippy::disallowed_methods)]
pub fn now() -> Instant {
    Instant::now()
}

fn four_letter_word(addr: &str, word: &str) -> Option<String> {
    let mut stream =
        TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(word.as_bytes()).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    (!answer.is_empty()).then_some(answer)
}

fn parse_mode(srvr: &str) -> Mode {
    match srvr
        .lines()
        .find_map(|l| l.strip_prefix("Mode:"))
        .map(str::trim)
    {
        Some("leader") => Mode::Leader,
        Some("follower") => Mode::Follower,
        // "This ZooKeeper instance is not currently serving requests", or a standalone.
        _ => Mode::NotServing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_from_srvr() {
        assert_eq!(
            parse_mode("Zookeeper version: 3.8.0\nLatency min/avg/max: 0/0.0/0\nMode: leader\n"),
            Mode::Leader
        );
        assert_eq!(
            parse_mode("Mode: follower\nNode count: 5\n"),
            Mode::Follower
        );
        assert_eq!(
            parse_mode("This ZooKeeper instance is not currently serving requests\n"),
            Mode::NotServing
        );
    }
}
