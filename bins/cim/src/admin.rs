//! `cim admin …`: the operator's command for a route's admin listener (`docs/admin.md`), and
//! `cim admin migrate`, which brings a Redis store's layout to this build's version.

use std::io::{BufRead as _, IsTerminal as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use cim_io::http_client::HttpClient;
use cim_io::net::TokioNet;
use cim_io::sdk::RouteAddr;
use cim_io::store::{RedisOptions, RedisStore};
use cim_io::tls::{ClientTls, ClientTlsSettings};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// The route's admin listener (its --admin-addr): host:port, http://host:port or
    /// https://host:port.
    #[arg(long, env = "CIM_ADMIN_URL", default_value = "127.0.0.1:8084")]
    url: String,
    /// File whose first line is the admin token (or set CIM_ADMIN_TOKEN).
    #[arg(long, env = "CIM_ADMIN_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA to trust for an https:// admin listener (default: the system's roots).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Print the answers as JSON, as the listener sent them.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand, Debug)]
enum Action {
    /// List accounts by id (deleted ones marked).
    Users {
        /// Start after this user id.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many (1-1000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Show a user and its session. <USER> is an id, or a name (any case).
    Show { user: String },
    /// End a user's session: its server closes it, its tokens stop working. The user may
    /// log in again.
    Kick { user: String },
    /// Set a new password: read from --password-file, or asked for (twice, without echo) at
    /// a terminal, or the first line of standard input.
    ResetPassword {
        user: String,
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
    /// Delete an account: a tombstone. It is kicked and can never log in again, its id is
    /// never reused and its name stays taken. Asks for confirmation unless --yes.
    Delete {
        user: String,
        #[arg(long)]
        yes: bool,
    },
    /// Migrate a Redis store written by an older CIM to this build's layout (routes also do
    /// this by themselves at start). Safe to run again; prints what it did.
    Migrate {
        /// Redis URL, e.g. redis://127.0.0.1:6379.
        #[arg(long, env = "CIM_REDIS")]
        redis: String,
    },
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    if let Action::Migrate { redis } = &args.action {
        return migrate(redis).await;
    }
    let admin = Admin::new(&args)?;
    match &args.action {
        Action::Users { after, limit } => {
            let v = admin
                .call(
                    Method::GET,
                    &format!("/users?after={after}&limit={limit}"),
                    None,
                )
                .await?;
            if args.json {
                println!("{v}");
            } else {
                for user in v["users"].as_array().into_iter().flatten() {
                    println!(
                        "{:>8}  {}{}",
                        user["userId"],
                        user["userName"].as_str().unwrap_or_default(),
                        if user["deleted"] == json!(true) {
                            "  (deleted)"
                        } else {
                            ""
                        }
                    );
                }
                if let Some(next) = v["next"].as_u64() {
                    println!("more: cim admin users --after {next}");
                }
            }
        }
        Action::Show { user } => {
            let id = admin.resolve(user).await?;
            let v = admin
                .call(Method::GET, &format!("/users/{id}"), None)
                .await?;
            if args.json {
                println!("{v}");
            } else {
                println!(
                    "user {} {}{}",
                    v["userId"],
                    v["userName"].as_str().unwrap_or_default(),
                    if v["deleted"] == json!(true) {
                        " (deleted)"
                    } else {
                        ""
                    }
                );
                let sessions = v["sessions"].as_array().cloned().unwrap_or_default();
                if sessions.is_empty() {
                    println!("no session");
                }
                for s in sessions {
                    println!(
                        "session on server {} (epoch {}): {}",
                        s["serverId"].as_str().unwrap_or_default(),
                        s["epoch"],
                        if s["connected"] == json!(true) {
                            "connected"
                        } else if s["serverLive"] == json!(false) {
                            "its server is gone (the claim lapses with its lease)"
                        } else {
                            "logging in, or its lease lapsed"
                        }
                    );
                }
            }
        }
        Action::Kick { user } => {
            let id = admin.resolve(user).await?;
            let v = admin
                .call(Method::POST, &format!("/users/{id}/kick"), None)
                .await?;
            if args.json {
                println!("{v}");
            } else if v["kicked"] == json!(true) {
                println!(
                    "user {id}: session on {} ended",
                    v["serverId"].as_str().unwrap_or("?")
                );
            } else {
                println!("user {id}: no session to end");
            }
        }
        Action::ResetPassword {
            user,
            password_file,
        } => {
            let id = admin.resolve(user).await?;
            let password = read_password(password_file.as_deref())?;
            let body = json!({ "password": password });
            let v = admin
                .call(Method::POST, &format!("/users/{id}/password"), Some(body))
                .await?;
            if args.json {
                println!("{v}");
            } else {
                println!(
                    "user {id}: password reset (an open session stays open: `cim admin kick {id}` \
                     to end it)"
                );
            }
        }
        Action::Delete { user, yes } => {
            let id = admin.resolve(user).await?;
            if !yes {
                confirm(
                    &format!(
                        "Delete user {id} ({user})? It cannot be undone: the name stays taken. \
                     Type the user id to confirm: "
                    ),
                    &id.to_string(),
                )?;
            }
            let v = admin
                .call(Method::DELETE, &format!("/users/{id}"), None)
                .await?;
            if args.json {
                println!("{v}");
            } else if v["already"] == json!(true) {
                println!("user {id} was already deleted");
            } else {
                println!(
                    "user {id} ({}) deleted{}",
                    v["userName"].as_str().unwrap_or_default(),
                    v["kickedFrom"]
                        .as_str()
                        .map(|s| format!("; its session on {s} was ended"))
                        .unwrap_or_default()
                );
            }
        }
        Action::Migrate { .. } => unreachable!("handled above"),
    }
    Ok(())
}

struct Admin {
    http: HttpClient<TokioNet>,
    token: String,
}

impl Admin {
    fn new(args: &AdminArgs) -> anyhow::Result<Self> {
        let addr = RouteAddr::parse(&args.url).map_err(anyhow::Error::msg)?;
        let token = match (&args.token_file, std::env::var("CIM_ADMIN_TOKEN")) {
            (Some(path), _) => std::fs::read_to_string(path)
                .with_context(|| format!("reading --token-file {}", path.display()))?
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
            (None, Ok(token)) => token.trim().to_owned(),
            (None, Err(_)) => bail!(
                "no admin token: give --token-file FILE or set CIM_ADMIN_TOKEN (the route's \
                 admin token)"
            ),
        };
        let mut http = HttpClient::new(
            TokioNet,
            addr.host.clone(),
            addr.port,
            Duration::from_secs(15),
        );
        if addr.https {
            let tls = ClientTls::load(ClientTlsSettings {
                ca: args.ca.clone(),
                ..ClientTlsSettings::default()
            })
            .context("loading the trusted certificates")?;
            http = http.with_tls(tls);
        }
        Ok(Self { http, token })
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let body = body.map(|b| Bytes::from(b.to_string()));
        let (status, bytes) = self
            .http
            .request(method, path, Some(&self.token), body)
            .await
            .with_context(|| {
                format!(
                    "the admin listener at {}:{} (is the route started with --admin-addr?)",
                    self.http.host(),
                    self.http.port()
                )
            })?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status != StatusCode::OK {
            let why = value["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            bail!("{status}: {why}");
        }
        Ok(value)
    }

    /// A user id from an id or a name.
    async fn resolve(&self, user: &str) -> anyhow::Result<u64> {
        if let Ok(id) = user.parse::<u64>() {
            return Ok(id);
        }
        let v = self
            .call(Method::GET, &format!("/users?name={}", encode(user)), None)
            .await?;
        v["users"][0]["userId"]
            .as_u64()
            .with_context(|| format!("no user named {user:?}"))
    }
}

/// Names are ASCII letters, digits, `_`, `-`, `.`: percent-encode anything else so a typo
/// reaches the listener as the name it is, not as another query.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn read_password(file: Option<&Path>) -> anyhow::Result<String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --password-file {}", path.display()))?;
        return Ok(text.lines().next().unwrap_or_default().to_owned());
    }
    if std::io::stdin().is_terminal() {
        let first = rpassword_prompt("New password: ")?;
        let second = rpassword_prompt("Again: ")?;
        if first != second {
            bail!("the two passwords differ");
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

/// A line from the terminal without echo (`stty -echo` around the read).
fn rpassword_prompt(prompt: &str) -> anyhow::Result<String> {
    use std::io::Write as _;
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
    };
    let hidden = stty("-echo").is_ok_and(|s| s.success());
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if hidden {
        let _ = stty("echo");
        eprintln!();
    }
    read?;
    Ok(line.trim_end_matches(['\r', '\n']).to_owned())
}

fn confirm(prompt: &str, expected: &str) -> anyhow::Result<()> {
    if !std::io::stdin().is_terminal() {
        bail!("not confirmed: pass --yes to delete without a terminal");
    }
    eprint!("{prompt}");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if line.trim() != expected {
        bail!("not confirmed: nothing was deleted");
    }
    Ok(())
}

async fn migrate(url: &str) -> anyhow::Result<()> {
    let store = RedisStore::connect(url, RedisOptions::default())
        .await
        .context("connecting to Redis")?;
    let report = store.migrate().await?;
    if report.from == report.to {
        println!(
            "the store is already at schema {}: nothing to do",
            report.to
        );
        return Ok(());
    }
    println!(
        "migrated the store from schema {} to {}: {} name records moved to their lowercase \
         key, {} duplicates removed",
        report.from, report.to, report.moved, report.duplicates
    );
    for c in &report.conflicts {
        println!(
            "name {:?}: kept by user {} (the older account); user {} keeps its id, password \
             and history and logs in with its id, but no longer holds the name",
            c.name, c.kept.0, c.unreserved.0
        );
    }
    if !report.conflicts.is_empty() {
        println!("(these are also listed in the Redis hash cim:{{names}}:conflicts)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_reach_the_listener_as_typed() {
        assert_eq!(encode("Bob.smith-2_x"), "Bob.smith-2_x");
        assert_eq!(encode("a&limit=1"), "a%26limit%3D1");
        assert_eq!(encode("a b"), "a%20b");
    }
}
