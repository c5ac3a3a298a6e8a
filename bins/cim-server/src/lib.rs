//! `cim-server`: one server of the tier. Needs Redis and ZooKeeper (the embedded store and
//! registry exist only inside `cim up`) and the ticket and link secrets.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use serde::Deserialize;

use cim_core::ids::ServerId;
use cim_core::route::tickets::TicketKeys;
use cim_core::server::ServerConfig;
use cim_io::clock::Clock;
use cim_io::launch;
use cim_io::net::TokioNet;
use cim_io::server::{self, ServerOptions};
use cim_io::tls;
use tokio_util::sync::CancellationToken;

/// Every setting is a flag, a `CIM_*` environment variable, or a key of the TOML file named
/// by `--config` (kebab-case, e.g. `client-port = 11211`); flags beat the environment, which
/// beats the file. Durations read like `500ms`, `30s`, `5m`.
#[derive(Parser, Debug, Default, Deserialize)]
#[command(name = "cim-server", version, about, long_about = None, after_help = AFTER_HELP)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Args {
    /// TOML file with any of these settings.
    #[arg(long, env = "CIM_CONFIG")]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Log lines as `text` (for people) or `json` (one object a line, for a log pipeline)
    /// [default: text].
    #[arg(long, env = "CIM_LOG_FORMAT")]
    log_format: Option<String>,
    /// This server's id: unique in the cluster, stable across restarts
    /// [default: <advertise-host>-<client-port>].
    #[arg(long, env = "CIM_SERVER_ID")]
    server_id: Option<String>,
    /// Address the three listeners bind [default: 0.0.0.0].
    #[arg(long, env = "CIM_LISTEN_IP")]
    listen_ip: Option<IpAddr>,
    /// Host clients and routes dial, published in the registry [default: 127.0.0.1].
    #[arg(long, env = "CIM_ADVERTISE_HOST")]
    advertise_host: Option<String>,
    /// Client TCP port; 0 picks a free one [default: 11211].
    #[arg(long, env = "CIM_CLIENT_PORT")]
    client_port: Option<u16>,
    /// Internal link port routes dial [default: 11311].
    #[arg(long, env = "CIM_LINK_PORT")]
    link_port: Option<u16>,
    /// Health and metrics HTTP port (`/health`, `/metrics`) [default: 8081].
    #[arg(long, env = "CIM_HTTP_PORT")]
    http_port: Option<u16>,
    /// WebSocket port for browsers: the same protocol, one binary message per frame, TLS
    /// (`wss://`) as the client port; 0 or absent = off [default: off].
    #[arg(long, env = "CIM_WS_PORT")]
    ws_port: Option<u16>,
    /// Browser origin (`scheme://host[:port]`) allowed to open a WebSocket here; repeat the
    /// flag or give a comma list, `*` for any. Others get 403; a client sending no `Origin`
    /// (not a browser) is always let in [default: none].
    #[arg(long, env = "CIM_WS_ALLOWED_ORIGIN", value_delimiter = ',')]
    ws_allowed_origin: Option<Vec<String>>,
    #[command(flatten, next_help_heading = "Redis and ZooKeeper")]
    #[serde(skip)]
    backends: launch::BackendFlags,
    /// Secret the route signs tickets with (>= 16 bytes; required). Prefer the environment.
    #[arg(long, env = "CIM_TICKET_SECRET", hide_env_values = true)]
    ticket_secret: Option<String>,
    /// Key id of the ticket secret [default: 1].
    #[arg(long, env = "CIM_TICKET_KEY_ID")]
    ticket_key_id: Option<u32>,
    /// Also accept tickets of this older key during a rotation, as `<key id>:<secret>`.
    #[arg(long, env = "CIM_TICKET_PREVIOUS_KEY", hide_env_values = true)]
    ticket_previous_key: Option<String>,
    /// Secret of the route links' challenge-response (>= 16 bytes; required).
    #[arg(long, env = "CIM_LINK_SECRET", hide_env_values = true)]
    link_secret: Option<String>,
    /// During a rotation, the previous link secret, still accepted from routes not yet
    /// switched to the new one.
    #[arg(long, env = "CIM_LINK_SECRET_PREVIOUS", hide_env_values = true)]
    link_secret_previous: Option<String>,
    /// Lease written with every bind and refresh [default: 30s].
    #[arg(long, env = "CIM_LEASE_TTL")]
    lease_ttl: Option<String>,
    /// Ping period announced to clients [default: 10s].
    #[arg(long, env = "CIM_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<String>,
    /// A connection silent this long is closed [default: 30s].
    #[arg(long, env = "CIM_IDLE_TIMEOUT")]
    idle_timeout: Option<String>,
    /// A connection must log in within this [default: 10s].
    #[arg(long, env = "CIM_LOGIN_TIMEOUT")]
    login_timeout: Option<String>,
    /// Connections held at once; more are refused. Lowered at start to what the open-file
    /// limit allows [default: 100000].
    #[arg(long, env = "CIM_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Per-user sends per second [default: 20].
    #[arg(long, env = "CIM_SEND_RATE")]
    send_rate: Option<u32>,
    /// Per-user burst of sends [default: 50].
    #[arg(long, env = "CIM_SEND_BURST")]
    send_burst: Option<u32>,
    /// Largest message body in bytes [default: 4096].
    #[arg(long, env = "CIM_MAX_BODY")]
    max_body: Option<usize>,
    /// Largest frame in bytes [default: 65536].
    #[arg(long, env = "CIM_MAX_FRAME")]
    max_frame: Option<usize>,
    /// Frames queued for one client before it is kicked as a slow consumer [default: 1024].
    #[arg(long, env = "CIM_MAX_OUTBOUND_FRAMES")]
    max_outbound_frames: Option<usize>,
    /// How long Redis may stay unreachable before this server fences its clients and leaves
    /// ZooKeeper until Redis is back, so routes send its users elsewhere [default: 3s].
    #[arg(long, env = "CIM_STORE_LOSS_GRACE")]
    store_loss_grace: Option<String>,
    /// Longest a graceful stop (SIGTERM) takes: leave ZooKeeper, send every client
    /// elsewhere, flush; past it the server stops anyway [default: 5s].
    #[arg(long, env = "CIM_DRAIN_TIMEOUT")]
    drain_timeout: Option<String>,
    /// Bound on each socket write and each route-link handshake step [default: 5s].
    #[arg(long, env = "CIM_IO_TIMEOUT")]
    io_timeout: Option<String>,
    /// How often the connection count is republished in ZooKeeper (what least-connections
    /// balancing reads) [default: 5s].
    #[arg(long, env = "CIM_REGISTRY_UPDATE_INTERVAL")]
    registry_update_interval: Option<String>,
    /// PEM certificate (chain) of this server: TLS on the client gateway and mutual TLS on
    /// the link port. Valid for --advertise-host, carrying the server role (a URI SAN
    /// urn:cim:role:server). Needs --tls-key and --tls-ca. Reloaded on SIGHUP or change.
    #[arg(long, env = "CIM_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (keep it readable by this process only).
    #[arg(long, env = "CIM_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA that signs the routes' certificates (the link port admits only those, and
    /// only with the route role).
    #[arg(long, env = "CIM_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Migration to TLS: the gateway and link port also take plaintext clients and routes.
    #[arg(long, env = "CIM_TLS_ACCEPT_PLAINTEXT", num_args = 0..=1, default_missing_value = "true")]
    tls_accept_plaintext: Option<bool>,
}

const AFTER_HELP: &str = "\
Example:
  CIM_TICKET_SECRET=... CIM_LINK_SECRET=... cim-server --server-id s1 \\
      --redis redis://127.0.0.1:6379 --zk 127.0.0.1:2181 --advertise-host 10.0.0.5

Stops gracefully on SIGTERM or Ctrl-C: leaves the registry, tells its clients to reconnect
elsewhere, then closes.";

macro_rules! overlay {
    ($top:expr, $bottom:expr, $backends:expr; $($field:ident),* $(,)?) => {
        Args {
            config: $top.config,
            backends: $top.backends.or($backends),
            $($field: $top.$field.or($bottom.$field)),*
        }
    };
}

/// Runs the process with these flags (overlaid on the `--config` file) until a stop signal.
pub fn run_blocking(flags: Args) -> anyhow::Result<()> {
    let (file, file_backends): (Args, _) =
        launch::load_toml_with_backends(flags.config.as_deref())?;
    let args = overlay!(flags, file, file_backends; log_format, server_id, listen_ip,
        advertise_host, client_port, link_port, http_port, ws_port, ws_allowed_origin, ticket_secret,
        ticket_key_id, ticket_previous_key, link_secret, link_secret_previous, lease_ttl, heartbeat_interval,
        idle_timeout, login_timeout, max_connections, send_rate, send_burst, max_body,
        max_frame, max_outbound_frames, store_loss_grace, drain_timeout, io_timeout,
        registry_update_interval,
        tls_cert, tls_key, tls_ca, tls_accept_plaintext);
    let log_format = launch::LogFormat::parse(args.log_format.as_deref());
    launch::init_logging("info", log_format.clone().unwrap_or_default());
    cim_io::fd_limit::raise_file_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args, log_format.err()))
}

async fn run(args: Args, log_format_problem: Option<String>) -> anyhow::Result<()> {
    // Every setting is checked before anything connects, and every problem is reported at
    // once, each naming its flag or variable.
    let mut p = launch::Problems::default();
    if let Some(problem) = log_format_problem {
        p.push(problem);
    }
    let backends = args.backends.check(&mut p);
    let ticket_secret = p.check(launch::require_secret(
        "CIM_TICKET_SECRET",
        args.ticket_secret.as_deref(),
    ));
    let link_secret = p.check(launch::require_secret(
        "CIM_LINK_SECRET",
        args.link_secret.as_deref(),
    ));
    let mut keys = TicketKeys::new(
        args.ticket_key_id.unwrap_or(1),
        ticket_secret.unwrap_or_default(),
    );
    if let Some(previous) = args.ticket_previous_key.as_deref() {
        match previous.split_once(':') {
            None => p.push("--ticket-previous-key (CIM_TICKET_PREVIOUS_KEY) is <key id>:<secret>"),
            Some((id, secret)) => {
                let id = p.check(id.parse::<u32>().map_err(|_| {
                    format!("--ticket-previous-key (CIM_TICKET_PREVIOUS_KEY): bad key id {id:?}")
                }));
                let secret = p.check(launch::require_secret(
                    "CIM_TICKET_PREVIOUS_KEY",
                    Some(secret),
                ));
                if let (Some(id), Some(secret)) = (id, secret) {
                    keys = keys.accept(id, secret);
                }
            }
        }
    }

    let advertise_host = args.advertise_host.unwrap_or_else(|| "127.0.0.1".into());
    let client_port = args.client_port.unwrap_or(11211);
    let server_id = args.server_id.unwrap_or_else(|| {
        format!("{advertise_host}-{client_port}")
            .replace(|c: char| !c.is_ascii_alphanumeric() && c != '-', "-")
    });
    let mut node = ServerConfig::new(ServerId::new(server_id.as_str()), keys);
    node.lease_ttl = p.or(
        launch::duration_or(
            "--lease-ttl",
            args.lease_ttl.as_deref(),
            Duration::from_secs(30),
        ),
        node.lease_ttl,
    );
    node.refresh_interval = node.lease_ttl / 3;
    node.heartbeat_interval = p.or(
        launch::duration_or(
            "--heartbeat-interval",
            args.heartbeat_interval.as_deref(),
            Duration::from_secs(10),
        ),
        node.heartbeat_interval,
    );
    node.idle_timeout = p.or(
        launch::duration_or(
            "--idle-timeout",
            args.idle_timeout.as_deref(),
            Duration::from_secs(30),
        ),
        node.idle_timeout,
    );
    node.login_timeout = p.or(
        launch::duration_or(
            "--login-timeout",
            args.login_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        node.login_timeout,
    );
    if let Some(n) = args.max_connections {
        node.max_connections = n;
    }
    if let Some(n) = args.send_rate {
        node.send_rate_per_sec = n;
    }
    if let Some(n) = args.send_burst {
        node.send_burst = n;
    }
    if let Some(n) = args.max_body {
        node.max_body = n;
    }
    if let Some(n) = args.max_outbound_frames {
        node.max_outbound_frames = n;
    }

    let mut options = ServerOptions::new(node, link_secret.unwrap_or_default());
    options.link_secret_previous = p
        .check(
            args.link_secret_previous
                .as_deref()
                .map(|s| launch::require_secret("CIM_LINK_SECRET_PREVIOUS", Some(s)))
                .transpose(),
        )
        .flatten();
    options.advertise_host = advertise_host;
    options.client_port = client_port;
    if let Some(ip) = args.listen_ip {
        options.listen_ip = ip;
    }
    if let Some(port) = args.link_port {
        options.link_port = port;
    }
    if let Some(port) = args.http_port {
        options.http_port = port;
    }
    // 0 is off here (unlike the other ports): a deployment opts in to a browser-facing port.
    options.ws_port = args.ws_port.filter(|&port| port != 0);
    if let Some(origins) = p.check(
        server::ws::OriginPolicy::from_list(args.ws_allowed_origin.as_deref().unwrap_or(&[]))
            .map_err(|e| format!("--ws-allowed-origin (CIM_WS_ALLOWED_ORIGIN): {e}")),
    ) {
        options.ws_origins = origins;
    }
    if let Some(n) = args.max_frame {
        options.max_frame = n;
    }
    options.store_loss_grace = p.or(
        launch::duration_or(
            "--store-loss-grace",
            args.store_loss_grace.as_deref(),
            Duration::from_secs(3),
        ),
        options.store_loss_grace,
    );
    options.drain_timeout = p.or(
        launch::nonzero_duration_or(
            "--drain-timeout",
            args.drain_timeout.as_deref(),
            options.drain_timeout,
        ),
        options.drain_timeout,
    );
    options.io_timeout = p.or(
        launch::nonzero_duration_or(
            "--io-timeout",
            args.io_timeout.as_deref(),
            options.io_timeout,
        ),
        options.io_timeout,
    );
    options.registry_update_interval = p.or(
        launch::nonzero_duration_or(
            "--registry-update-interval",
            args.registry_update_interval.as_deref(),
            options.registry_update_interval,
        ),
        options.registry_update_interval,
    );

    let tls = p
        .check(
            tls::setup::ServerSide::load(
                &tls::setup::TlsFlags {
                    cert: args.tls_cert,
                    key: args.tls_key,
                    ca: args.tls_ca,
                    accept_plaintext: args.tls_accept_plaintext.unwrap_or(false),
                },
                &options.advertise_host,
            )
            .map_err(|e| format!("TLS: {e:#}")),
        )
        .flatten();
    p.finish()?;
    let backends = backends.context("the Redis and ZooKeeper settings were checked")?;

    let store = backends.open_store().await?;
    let registry = backends.open_registry()?;
    let zk = &backends.zk;
    if let Some(tls) = &tls {
        options.gateway_tls = Some(tls.gateway.clone());
        options.link_tls = Some(tls.link.clone());
        tls::reload::spawn_reloader(
            tls.reloadables(),
            tls::reload::DEFAULT_POLL,
            CancellationToken::new(),
        );
    }

    let mut handle = server::start(TokioNet, Clock::System, options, store, &registry)
        .await
        .map_err(|error| match error {
            server::StartError::Bind {
                listener,
                addr,
                source,
            } => {
                let (what, flag) = match listener {
                    "client" => ("the client gateway", "--client-port"),
                    "link" => ("the route link port", "--link-port"),
                    _ => ("the health/metrics port", "--http-port"),
                };
                anyhow::anyhow!("{}", launch::bind_failure(what, addr, flag, &source))
            }
            server::StartError::Registry(error) => {
                anyhow::anyhow!("{}", launch::zk_failure(zk, &error))
            }
            other => anyhow::Error::new(other).context("starting the server"),
        })?;
    tracing::info!(
        server_id = %handle.server_id(),
        client = %handle.client_addr(),
        link = %handle.link_addr(),
        http = %handle.http_addr(),
        "cim-server up"
    );
    let mut stop = launch::StopSignals::listen();
    let signalled = tokio::select! {
        () = stop.recv() => true,
        result = handle.stopped() => {
            result?;
            false
        }
    };
    if signalled {
        tracing::info!("stop signal: draining");
        handle.drain().await?;
    }
    Ok(())
}
