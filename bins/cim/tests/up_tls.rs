//! `cim up --tls` end to end, as a user meets it: the real binary makes its throwaway CA,
//! prints the client command that trusts it, and serves everything over TLS. `cim smoke`
//! given that CA chats through it; a client without the CA (the system's roots, or another
//! CA) and a plaintext client are refused, the error naming the host and the certificate
//! problem; servers the `cim up` terminal restarts speak TLS again; Ctrl-C deletes the
//! temporary directory.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long `cim up` may take to print a line the test waits for.
const LINE_LIMIT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("probe a free port")
        .port()
}

/// A running `cim up`: its terminal (stdin) and what it printed, line by line.
struct Up {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Up {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cim"))
            .arg("up")
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("CIM_TEST_LOG").unwrap_or_else(|_| "error".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn cim up");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits for the first line (from now on) containing `needle`.
    fn wait_line(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(LINE_LIMIT) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(error) => panic!(
                    "cim up printed no line with {needle:?} ({error}); it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Types a command into `cim up`'s terminal.
    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to cim up");
        stdin.flush().expect("flush");
    }

    /// Ctrl-C; the exit must be clean.
    fn interrupt(&mut self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-INT", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -INT {pid}");
        let status = self.child.wait().expect("wait for cim up");
        assert!(status.success(), "cim up exited with {status}");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn smoke(route: &str, ca: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cim"));
    cmd.args(["smoke", "--route", route, "--timeout", "60s"])
        .env("RUST_LOG", "error");
    if let Some(ca) = ca {
        cmd.arg("--ca").arg(ca);
    }
    cmd.output().expect("run cim smoke")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn smoke_passes(route: &str, ca: &Path) -> String {
    let out = smoke(route, Some(ca));
    let all = text(&out);
    assert!(
        out.status.success() && all.contains("smoke check passed"),
        "cim smoke --route {route} --ca {} failed:\n{all}",
        ca.display()
    );
    all
}

/// A refused smoke: it fails, and its error names the host and why the certificate was not
/// trusted (rustls' "invalid peer certificate: <reason>").
fn assert_refused_untrusted(route: &str, ca: Option<&Path>, reason: &str) {
    let out = smoke(route, ca);
    let all = text(&out);
    assert!(!out.status.success(), "trusted without its CA:\n{all}");
    let named = format!("TLS to 127.0.0.1: invalid peer certificate: {reason}");
    assert!(
        all.contains(&named),
        "the error should name the host and the certificate problem ({named:?}):\n{all}"
    );
    assert!(!all.contains("smoke check passed"), "{all}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn up_tls_chats_over_https_refuses_untrusted_clients_and_restarts_with_tls() {
    let port = free_port();
    let mut up = Up::start(&["--tls", "--any-ports", "--route-port", &port.to_string()]);
    let route_line = up.wait_line("  route ");
    let route = format!("https://127.0.0.1:{port}");
    assert!(route_line.contains(&route), "{route_line}");

    // The printed client command is the one to run: https route, the CA, a user.
    let command = up.wait_line("--user alice");
    let (before, after) = command
        .split_once(" --ca ")
        .unwrap_or_else(|| panic!("no --ca in {command:?}"));
    assert!(
        before.ends_with(&format!("cim-client --route {route}")),
        "{command}"
    );
    let ca = PathBuf::from(
        after
            .strip_suffix(" --user alice")
            .unwrap_or_else(|| panic!("{command:?}")),
    );
    // The printed admin command too: its token file is the owner's only.
    let admin = up.wait_line(" admin --url ");
    let admin_args: Vec<String> = admin
        .split_whitespace()
        .skip_while(|word| *word != "admin")
        .map(str::to_owned)
        .collect();
    let token_file = admin_args
        .windows(2)
        .find(|pair| pair[0] == "--token-file")
        .map(|pair| PathBuf::from(&pair[1]))
        .unwrap_or_else(|| panic!("no --token-file in {admin:?}"));
    assert_eq!(mode(&token_file), 0o600, "{}", token_file.display());
    up.wait_line("Ctrl-C stops");
    let dir = ca.parent().expect("the CA is in a directory").to_owned();
    assert!(ca.is_absolute() && ca.is_file(), "{}", ca.display());
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    for key in ["route-key.pem", "server-key.pem"] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
    }

    // Trusting the CA: two users chat (group and private, both ways).
    smoke_passes(&route, &ca);

    // The admin listener answers the printed command over HTTPS, and lists the smoke users.
    let out = Command::new(env!("CARGO_BIN_EXE_cim"))
        .args(&admin_args)
        .output()
        .expect("run cim admin");
    assert!(
        out.status.success() && text(&out).contains("cim-smoke-"),
        "{admin_args:?}:\n{}",
        text(&out)
    );

    // Without it: refused, naming the host and the reason. The system's roots (no --ca) do
    // not know the CA, where the machine has any; another CA of the same name (another run's)
    // is found as the issuer, but its key did not sign the certificate.
    let other = tempfile::tempdir().expect("temp dir");
    let other =
        cim_io::tls::dev::DevPki::generate(other.path(), &["127.0.0.1"]).expect("another CA");
    assert_refused_untrusted(&route, Some(&other.ca), "BadSignature");
    let system_roots = cim_io::tls::ClientTls::load(Default::default()).is_ok();
    if system_roots {
        assert_refused_untrusted(&route, None, "UnknownIssuer");
    } else {
        let out = smoke(&route, None);
        assert!(!out.status.success(), "{}", text(&out));
        eprintln!("no system roots on this machine: the no --ca case is the CA-less refusal");
    }
    // A plaintext client on the TLS route port gets no answer it could take for one.
    let out = smoke(&format!("http://127.0.0.1:{port}"), None);
    assert!(!out.status.success(), "plaintext accepted:\n{}", text(&out));

    // Servers the terminal restarts keep TLS: with s2 stopped everyone is on the restarted
    // s1, and an https client refuses a server that does not speak TLS.
    up.type_line("restart s1");
    up.wait_line("s1 started again");
    up.type_line("stop s2");
    up.wait_line("s2 stopped");
    let out = smoke_passes(&route, &ca);
    eprintln!("{out}");
    assert_eq!(
        out.matches("is online on server s1").count(),
        2,
        "both users on the restarted s1:\n{out}"
    );

    up.interrupt();
    up.wait_line("deleted the TLS directory");
    assert!(
        !token_file.exists(),
        "{} is left behind",
        token_file.display()
    );
    assert!(!dir.exists(), "{} is left behind", dir.display());
}
