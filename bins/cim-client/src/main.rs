//! `cim-client`: chat at the console.
//!
//! `cim-client --route http://127.0.0.1:8083 --user alice` registers `alice` on first use,
//! remembers her id, resume token and unsent messages in the state file, and chats: in a
//! line editor on a terminal, or reading lines from stdin and printing JSON lines for
//! scripts. See `--help`.

mod app;
mod args;
mod batch;
mod client_file;
mod command;
mod exit;
mod interactive;
mod render;

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use cim_core::client::ClientConfig;
use cim_core::ids::UserId;
use cim_io::clock::Clock;
use cim_io::http_client::HttpError;
use cim_io::net::TokioNet;
use cim_io::sdk::{self, ApiError, Client, RouteApi, SdkOptions, SdkTls};
use cim_io::tls::{ClientTls, ClientTlsSettings};
use clap::Parser;
use tokio::sync::mpsc;

use crate::app::{App, AppParts};
use crate::args::Args;
use crate::client_file::ClientFile;
use crate::exit::{Failure, fatal};
use crate::render::Sink;

/// Registration's HTTP call.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// The diagnostics log beside the state file is started afresh past this size.
const LOG_CAP: u64 = 1 << 20;

#[tokio::main]
async fn main() -> ExitCode {
    match chat(Args::parse()).await {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(failure)) => failure.exit_code(),
        Err(error) => {
            eprintln!("cim-client: {error:#}");
            exit::failure_of(&error).exit_code()
        }
    }
}

/// Diagnostics (tracing) go to stderr with `--verbose`, otherwise to `<user>.log` beside
/// the state file: never in the middle of the chat or of a script's stderr.
fn start_tracing(verbose: bool, state: &std::path::Path) {
    let filter = |default: &str| {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into())
    };
    if verbose {
        tracing_subscriber::fmt()
            .with_env_filter(filter("info"))
            .with_writer(std::io::stderr)
            .init();
        return;
    }
    let path = client_file::sibling(state, "log");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let too_big = std::fs::metadata(&path).is_ok_and(|m| m.len() > LOG_CAP);
    let mut options = std::fs::OpenOptions::new();
    options.create(true);
    if too_big {
        options.write(true).truncate(true);
    } else {
        options.append(true);
    }
    let Ok(file) = cim_io::private_file::owner_only(&mut options).open(&path) else {
        return;
    };
    cim_io::private_file::make_owner_only(&path);
    tracing_subscriber::fmt()
        .with_env_filter(filter("warn"))
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .init();
}

async fn chat(args: Args) -> anyhow::Result<Option<Failure>> {
    let addr = cim_io::sdk::RouteAddr::parse(&args.route).map_err(|e| anyhow!(e))?;
    let route = addr.key();
    let cim_io::sdk::RouteAddr { host, port, https } = addr;
    let interactive = !args.batch && args.send.is_empty() && std::io::stdin().is_terminal();
    let path = args.state.clone().unwrap_or_else(|| {
        let path = client_file::default_path(&route, &args.user);
        let legacy = client_file::legacy_path(&host, port, &args.user);
        if !path.exists() && legacy.exists() {
            legacy
        } else {
            path
        }
    });
    start_tracing(args.verbose, &path);
    let tls = client_tls(args.ca.clone(), https)?;
    // A file that does not parse is not overwritten: it may hold unsent messages.
    let loaded = client_file::load(&path).with_context(|| {
        format!(
            "reading {} (move it away to start without it)",
            path.display()
        )
    })?;
    if let Some(file) = &loaded
        && !file.user_name.eq_ignore_ascii_case(&args.user)
    {
        bail!(
            "{} belongs to user {:?}, not {:?}",
            path.display(),
            file.user_name,
            args.user
        );
    }

    // A session saved with a resumption secret logs in without the password: it is asked
    // for only when the route refuses the secret (used elsewhere, revoked, expired), and then
    // by the next run (this one stops with "password needed" and keeps the file).
    let resumable = loaded
        .as_ref()
        .and_then(|f| f.session_state().ok().flatten())
        .is_some_and(|s| s.resume_token.is_some() && s.resume_secret.is_some());
    let password = match (
        &args.password,
        loaded.as_ref().and_then(|f| f.password.clone()),
    ) {
        (Some(password), _) => password.clone(),
        (None, Some(saved)) => saved,
        (None, None) if resumable => String::new(),
        (None, None) if interactive => {
            let user = args.user.clone();
            tokio::task::spawn_blocking(move || {
                interactive::read_password(&format!("password for {user}: "))
            })
            .await??
        }
        (None, None) => {
            // Scripts: the first line of stdin.
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            if line.is_empty() {
                bail!(
                    "no password: pass --password, set CIM_PASSWORD, or give it on stdin's first line"
                );
            }
            line
        }
    };

    let may_reregister = loaded.is_some();
    let mut file = match loaded {
        Some(file) => file,
        None => {
            let id = match args.user_id {
                Some(id) => id,
                None => register(&host, port, tls.as_ref(), &args.user, &password, &path).await?,
            };
            ClientFile::new(&route, id, &args.user)
        }
    };
    if args.save_password {
        file.password = Some(password.clone());
    }
    // The id is on disk before anything else can go wrong.
    client_file::save(&path, &file).with_context(|| format!("writing {}", path.display()))?;
    let state = file.session_state().with_context(|| {
        format!(
            "reading the session in {} (move it away to start without it)",
            path.display()
        )
    })?;

    let me = UserId(file.user_id);
    // Message ids must never repeat across runs: seed from the OS's entropy every start.
    // The name as registered (the state file's): `--user Bob` for account `bob` logs in as `bob`.
    let config = ClientConfig::new(me, file.user_name.clone(), password.clone(), sdk::os_seed());
    let mut options = SdkOptions::new(host.clone(), port, config);
    options.state = state;
    options.tls = tls.clone();
    let (client, events) = Client::start(TokioNet, Clock::System, options);
    let completions = Arc::default();
    let (delayed_tx, delayed_rx) = mpsc::unbounded_channel();
    let color =
        !args.no_color && std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal();

    let mut parts = AppParts {
        client,
        host,
        port,
        tls,
        password,
        may_reregister,
        me,
        route,
        path: path.clone(),
        file,
        sink: Sink::Json,
        completions: Arc::clone(&completions),
        delayed: delayed_tx,
        verbose: args.verbose,
    };
    if interactive {
        let (terminal, printer) = interactive::start_editor(
            format!("{}> ", args.user),
            client_file::sibling(&path, "lines"),
            completions,
        )?;
        parts.sink = Sink::Terminal { printer, color };
        let mut app = App::new(parts);
        app.restore_delays(Duration::ZERO);
        Ok(interactive::run(app, events, delayed_rx, terminal).await)
    } else {
        let read_stdin = args.send.is_empty();
        let drain = Duration::from_secs(args.drain_secs);
        let mut app = App::new(parts);
        // Delays due within the drain window are waited for; later ones stay saved.
        app.restore_delays(drain);
        Ok(batch::run(
            app,
            events,
            delayed_rx,
            args.send.clone(),
            read_stdin,
            drain,
        )
        .await)
    }
}

/// The client's TLS: `--ca` or the system's roots. An https route (or a `--ca`) needs it;
/// a plain route uses it only if a server expects TLS, so missing system roots are no
/// error there.
fn client_tls(ca: Option<PathBuf>, route_https: bool) -> anyhow::Result<Option<SdkTls>> {
    let required = route_https || ca.is_some();
    let settings = ClientTlsSettings {
        ca: ca.clone(),
        ..ClientTlsSettings::default()
    };
    match ClientTls::load(settings) {
        Ok(client) => Ok(Some(SdkTls {
            client,
            route_https,
        })),
        Err(error) if required => Err(anyhow!(error).context("loading the trusted certificates")),
        Err(error) => {
            tracing::debug!(%error, "no TLS roots: plaintext servers only");
            Ok(None)
        }
    }
}

/// Registers `name`, returning its new id. A refusal says what to do instead.
async fn register(
    host: &str,
    port: u16,
    tls: Option<&SdkTls>,
    name: &str,
    password: &str,
    state: &std::path::Path,
) -> anyhow::Result<u64> {
    let mut api = RouteApi::new(TokioNet, host, port, API_TIMEOUT);
    if let Some(tls) = tls.filter(|tls| tls.route_https) {
        api = api.with_tls(tls.client.clone());
    }
    match api.register(name, password).await {
        Ok(registered) => {
            eprintln!(
                "* registered {} as user {}",
                registered.user_name, registered.user_id
            );
            Ok(registered.user_id)
        }
        Err(error) => Err(registration_error(error, host, port, name, state)),
    }
}

/// Why registering failed, as the exit code and a sentence that offers the way out.
fn registration_error(
    error: ApiError,
    host: &str,
    port: u16,
    name: &str,
    state: &std::path::Path,
) -> anyhow::Error {
    match error {
        ApiError::Status { message, .. } if message.contains("taken") => {
            let mut text = format!(
                "the name {name} is taken. If it is your account, log in with its id: \
                 cim-client --user {name} --user-id <id> (the id is in the state file where \
                 you registered, and `:info` shows it). Otherwise pick another --user."
            );
            for (path, id) in client_file::same_user_elsewhere(port, name) {
                if path != state {
                    text.push_str(&format!(
                        "\n  this machine has {name}'s state for another spelling of the route: \
                         id {id} in {} (add --user-id {id}, or --state {})",
                        path.display(),
                        path.display()
                    ));
                }
            }
            fatal(Failure::RegistrationRefused, text)
        }
        ApiError::Status { message, code, .. } if code == cim_io::api::CODE_VALIDATION => fatal(
            Failure::RegistrationRefused,
            format!("registering {name}: {message}"),
        ),
        ApiError::Status { message, code, .. } if code == cim_io::api::CODE_HTTPS_REQUIRED => {
            fatal(
                Failure::Tls,
                format!("TLS with {host} cannot work: {message}"),
            )
        }
        ApiError::Transport(HttpError::Tls(error)) if error.permanent().is_some() => {
            let reason = error.permanent().unwrap_or_default();
            fatal(
                Failure::Tls,
                format!("TLS with {} cannot work: {reason}", error.host()),
            )
        }
        ApiError::Transport(error) => fatal(
            Failure::Unreachable,
            format!("cannot reach the route at {host}:{port} to register {name}: {error}"),
        ),
        other => fatal(Failure::Other, format!("registering {name}: {other}")),
    }
}
