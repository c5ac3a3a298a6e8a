//! `cim-client`: chat at the console.
//!
//! `cim-client --route http://127.0.0.1:8083 --user alice` registers `alice` on first use,
//! remembers her id, resume token and unsent messages in the state file, and chats: in a
//! line editor on a terminal, or reading lines from stdin and printing JSON lines for
//! scripts. See `--help`.

mod app;
mod args;
mod batch;
mod command;
mod interactive;
mod render;
mod store;

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use cim_core::client::ClientConfig;
use cim_core::ids::UserId;
use cim_io::clock::Clock;
use cim_io::net::TokioNet;
use cim_io::sdk::{self, Client, RouteApi, SdkOptions, SdkTls};
use cim_io::tls::{ClientTls, ClientTlsSettings};
use clap::Parser;
use tokio::sync::mpsc;

use crate::app::{App, AppParts};
use crate::args::Args;
use crate::render::Sink;
use crate::store::ClientFile;

/// Registration's HTTP call.
const API_TIMEOUT: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> ExitCode {
    match chat(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("cim-client: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn chat(args: Args) -> anyhow::Result<bool> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cim_io::sdk::RouteAddr { host, port, https } =
        cim_io::sdk::RouteAddr::parse(&args.route).map_err(|e| anyhow!(e))?;
    let route = format!("{host}:{port}");
    let tls = client_tls(args.ca.clone(), https)?;
    let interactive = !args.batch && args.send.is_empty() && std::io::stdin().is_terminal();
    let path = args
        .state
        .clone()
        .unwrap_or_else(|| store::default_path(&host, port, &args.user));
    // A file that does not parse is not overwritten: it may hold unsent messages.
    let loaded = store::load(&path).with_context(|| {
        format!(
            "reading {} (move it away to start without it)",
            path.display()
        )
    })?;
    if let Some(file) = &loaded
        && file.user_name != args.user
    {
        bail!(
            "{} belongs to user {:?}, not {:?}",
            path.display(),
            file.user_name,
            args.user
        );
    }

    let password = match (
        &args.password,
        loaded.as_ref().and_then(|f| f.password.clone()),
    ) {
        (Some(password), _) => password.clone(),
        (None, Some(saved)) => saved,
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
                None => register(&host, port, tls.as_ref(), &args.user, &password).await?,
            };
            ClientFile::new(&route, id, &args.user)
        }
    };
    if args.save_password {
        file.password = Some(password.clone());
    }
    // The id is on disk before anything else can go wrong.
    store::save(&path, &file).with_context(|| format!("writing {}", path.display()))?;
    let state = file.session_state().with_context(|| {
        format!(
            "reading the session in {} (move it away to start without it)",
            path.display()
        )
    })?;

    let me = UserId(file.user_id);
    // Message ids must never repeat across runs: seed from the OS's entropy every start.
    let config = ClientConfig::new(me, args.user.clone(), password.clone(), sdk::os_seed());
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
    };
    if interactive {
        let (terminal, printer) = interactive::start_editor(
            format!("{}> ", args.user),
            store::sibling(&path, "lines"),
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

/// Registers `name`, returning its new id.
async fn register(
    host: &str,
    port: u16,
    tls: Option<&SdkTls>,
    name: &str,
    password: &str,
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
        Err(error) => Err(anyhow!(error)).with_context(|| {
            format!(
                "registering {name} (if the account exists but this machine has no state \
                 file for it, pass --user-id <id>)"
            )
        }),
    }
}
