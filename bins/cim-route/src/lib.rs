//! `cim-route`: the stateless HTTP API. Any number run side by side; each keeps one link to
//! every live server. Needs Redis, ZooKeeper and the ticket, bearer and link secrets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use serde::Deserialize;

use cim_core::client::ClientConfig;
use cim_core::ids::UserId;
use cim_core::route::balance::Strategy;
use cim_core::route::tickets::TicketKeys;
use cim_io::clock::Clock;
use cim_io::launch;
use cim_io::net::TokioNet;
use cim_io::route::{self, RateLimit, RouteOptions};
use cim_io::store::RedisOptions;
use cim_io::tls;
use tokio_util::sync::CancellationToken;

/// Every setting is a flag, a `CIM_*` environment variable, or a key of the TOML file named
/// by `--config` (kebab-case, e.g. `listen = "0.0.0.0:8083"`); flags beat the environment,
/// which beats the file. Durations read like `500ms`, `30s`, `5m`.
#[derive(Parser, Debug, Default, Deserialize)]
#[command(name = "cim-route", version, about, long_about = None, after_help = AFTER_HELP)]
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
    /// This route's id, in logs, metrics and link handshakes [default: route-<port>].
    #[arg(long, env = "CIM_ROUTE_ID")]
    route_id: Option<String>,
    /// HTTP API address; port 0 picks a free one [default: 0.0.0.0:8083].
    #[arg(long, env = "CIM_LISTEN")]
    listen: Option<SocketAddr>,
    #[command(flatten, next_help_heading = "Redis and ZooKeeper")]
    #[serde(skip)]
    backends: launch::BackendFlags,
    /// Secret tickets are signed with (>= 16 bytes; required). Prefer the environment.
    #[arg(long, env = "CIM_TICKET_SECRET", hide_env_values = true)]
    ticket_secret: Option<String>,
    /// Key id of the ticket secret; bump it when rotating [default: 1].
    #[arg(long, env = "CIM_TICKET_KEY_ID")]
    ticket_key_id: Option<u32>,
    /// Secret of the HTTP bearer tokens (>= 16 bytes; required).
    #[arg(long, env = "CIM_BEARER_SECRET", hide_env_values = true)]
    bearer_secret: Option<String>,
    /// During a rotation, the previous bearer secret: tokens signed with it are still
    /// accepted (new ones are signed with --bearer-secret).
    #[arg(long, env = "CIM_BEARER_SECRET_PREVIOUS", hide_env_values = true)]
    bearer_secret_previous: Option<String>,
    /// Secret of the server links' challenge-response (>= 16 bytes; required).
    #[arg(long, env = "CIM_LINK_SECRET", hide_env_values = true)]
    link_secret: Option<String>,
    /// During a rotation, the previous link secret: a server that refuses the new one is
    /// dialled again with this one.
    #[arg(long, env = "CIM_LINK_SECRET_PREVIOUS", hide_env_values = true)]
    link_secret_previous: Option<String>,
    /// How users are spread over servers: consistent-hash, round-robin, random,
    /// least-connections [default: consistent-hash].
    #[arg(long, env = "CIM_BALANCE")]
    balance: Option<String>,
    /// Lease of a new login claim, until its server binds it [default: 30s].
    #[arg(long, env = "CIM_CLAIM_TTL")]
    claim_ttl: Option<String>,
    /// How long a bearer token is valid [default: 24h].
    #[arg(long, env = "CIM_TOKEN_TTL")]
    token_ttl: Option<String>,
    /// How long a login ticket is valid: the client must reach its server within it
    /// [default: 30s].
    #[arg(long, env = "CIM_TICKET_TTL")]
    ticket_ttl: Option<String>,
    /// How long a message's idempotency record lives, so a resent message lands once; at
    /// least the clients' 5-minute outbox age [default: 10m].
    #[arg(long, env = "CIM_IDEMPOTENCY_TTL")]
    idempotency_ttl: Option<String>,
    /// Bound on connecting, each write and each handshake step of a server link
    /// [default: 5s].
    #[arg(long, env = "CIM_IO_TIMEOUT")]
    io_timeout: Option<String>,
    /// Keepalive ping on each server link; a link silent for 3x this is dead [default: 5s].
    #[arg(long, env = "CIM_LINK_PING_INTERVAL")]
    link_ping_interval: Option<String>,
    /// Wait before redialling a live server whose link failed [default: 500ms].
    #[arg(long, env = "CIM_LINK_RETRY_DELAY")]
    link_retry_delay: Option<String>,
    /// Largest message body in bytes [default: 4096].
    #[arg(long, env = "CIM_MAX_BODY")]
    max_body: Option<usize>,
    /// Messages kept per conversation [default: 10000].
    #[arg(long, env = "CIM_MAX_LOG_LEN")]
    max_log_len: Option<usize>,
    /// Replicas of the conversation's Redis master that must confirm an append (WAIT) before
    /// it is acknowledged (0: acknowledge once the master has it); fewer within half
    /// --redis-timeout make the send's outcome unknown to the client, which resends it
    /// [default: 0].
    #[arg(long, env = "CIM_STORE_WAIT_REPLICAS")]
    store_wait_replicas: Option<u32>,
    /// Threads that hash and verify passwords (argon2), off the routing task; 0 runs them
    /// on the routing task, stalling message routing during login bursts [default: one per
    /// core].
    #[arg(long, env = "CIM_PASSWORD_WORKERS")]
    password_workers: Option<usize>,
    /// How long an unused resumption secret stays good: a client that logged in within it
    /// logs in again without the password (each login issues the next secret). 0 issues
    /// none: every login checks the password [default: 30d].
    #[arg(long, env = "CIM_RESUME_SECRET_TTL")]
    resume_secret_ttl: Option<String>,
    /// Shortest password a registration may choose, in characters [default: 8].
    #[arg(long, env = "CIM_MIN_PASSWORD_LEN")]
    min_password_len: Option<usize>,
    /// HTTP connections held at once; more are answered 503 and closed at once. Lowered at
    /// start to what the open-file limit allows [default: 10000].
    #[arg(long, env = "CIM_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Time a client has to send a complete request head, from connecting or from the first
    /// byte of its next request; slower connections are closed [default: 10s].
    #[arg(long, env = "CIM_HTTP_HEADER_TIMEOUT")]
    http_header_timeout: Option<String>,
    /// A kept-alive HTTP connection with no request (or not reading its answer) this long is
    /// closed [default: 60s].
    #[arg(long, env = "CIM_HTTP_IDLE_TIMEOUT")]
    http_idle_timeout: Option<String>,
    /// Logins and registrations in their password check at once (queued or running); past
    /// it they are answered 503 "busy" at once [default: 8 per password worker].
    #[arg(long, env = "CIM_PASSWORD_QUEUE")]
    password_queue: Option<usize>,
    /// Failed logins at one account that cost no delay [default: 5].
    #[arg(long, env = "CIM_LOGIN_FREE_FAILURES")]
    login_free_failures: Option<u32>,
    /// Delay after the first failed login past the free ones; doubles with each further
    /// one [default: 1s].
    #[arg(long, env = "CIM_LOGIN_DELAY_BASE")]
    login_delay_base: Option<String>,
    /// Longest delay between failed logins at one account [default: 60s].
    #[arg(long, env = "CIM_LOGIN_DELAY_MAX")]
    login_delay_max: Option<String>,
    /// /login requests per second per client address (IPv6: per /64); 0 = no limit
    /// [default: 5].
    #[arg(long, env = "CIM_LOGIN_RATE_PER_ADDRESS")]
    login_rate_per_address: Option<u32>,
    /// Burst of /login requests per client address [default: 20].
    #[arg(long, env = "CIM_LOGIN_BURST_PER_ADDRESS")]
    login_burst_per_address: Option<u32>,
    /// /registerAccount requests per second per client address; 0 = no limit [default: 1].
    #[arg(long, env = "CIM_REGISTER_RATE_PER_ADDRESS")]
    register_rate_per_address: Option<u32>,
    /// Burst of /registerAccount requests per client address [default: 5].
    #[arg(long, env = "CIM_REGISTER_BURST_PER_ADDRESS")]
    register_burst_per_address: Option<u32>,
    /// Per-user sends per second over HTTP (/groupRoute, /p2pRoute); 0 = no limit
    /// [default: 20].
    #[arg(long, env = "CIM_SEND_RATE")]
    send_rate: Option<u32>,
    /// Per-user burst of HTTP sends [default: 50].
    #[arg(long, env = "CIM_SEND_BURST")]
    send_burst: Option<u32>,
    /// Load balancers whose X-Forwarded-For names the client, as addresses or blocks
    /// (10.0.0.0/8,192.168.1.7); from any other peer the header is ignored [default: none].
    #[arg(long, env = "CIM_TRUSTED_PROXIES")]
    trusted_proxies: Option<String>,
    /// On SIGTERM, first answer /health/ready 503 for this long while still serving, so the
    /// load balancer takes this route out before it stops (a second signal stops at once)
    /// [default: 0s].
    #[arg(long, env = "CIM_SHUTDOWN_DELAY")]
    shutdown_delay: Option<String>,
    /// PEM certificate (chain) of this route: HTTPS on the API listener, and the identity
    /// it presents on the links it dials (mutual TLS). Carrying the route role (a URI SAN
    /// urn:cim:role:route). Needs --tls-key and --tls-ca. Reloaded on SIGHUP or change.
    #[arg(long, env = "CIM_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (keep it readable by this process only).
    #[arg(long, env = "CIM_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// PEM CA that signs the servers' certificates (the links accept only those, and only
    /// with the server role).
    #[arg(long, env = "CIM_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Migration to TLS: the API listener also takes plain HTTP.
    #[arg(long, env = "CIM_TLS_ACCEPT_PLAINTEXT", num_args = 0..=1, default_missing_value = "true")]
    tls_accept_plaintext: Option<bool>,
    /// Address of the admin listener (docs/admin.md); needs an admin token [default: off].
    #[arg(long, env = "CIM_ADMIN_ADDR")]
    admin_addr: Option<SocketAddr>,
    /// The admin listener on 127.0.0.1 at this port (instead of --admin-addr).
    #[arg(long, env = "CIM_ADMIN_PORT")]
    admin_port: Option<u16>,
    /// File whose first line is the admin token (>= 16 bytes).
    #[arg(long, env = "CIM_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// The admin token itself (>= 16 bytes). Prefer the environment or --admin-token-file.
    #[arg(long, env = "CIM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

const AFTER_HELP: &str = "\
Example:
  CIM_TICKET_SECRET=... CIM_BEARER_SECRET=... CIM_LINK_SECRET=... cim-route \\
      --redis redis://127.0.0.1:6379 --zk 127.0.0.1:2181 --listen 0.0.0.0:8083

Refuses to start when Redis's maxmemory-policy is not noeviction (see --allow-eviction).";

macro_rules! overlay {
    ($top:expr, $bottom:expr, $backends:expr; $($field:ident),* $(,)?) => {
        Args {
            config: $top.config,
            backends: $top.backends.or($backends),
            $($field: $top.$field.or($bottom.$field)),*
        }
    };
}

fn strategy(name: Option<&str>) -> anyhow::Result<Strategy> {
    let name = name.unwrap_or(Strategy::ConsistentHash.name());
    Strategy::from_name(name).ok_or_else(|| {
        let names = Strategy::ALL.map(Strategy::name).join(", ");
        anyhow::anyhow!("--balance {name:?}: use one of {names}")
    })
}

/// `--idempotency-ttl`: a record that expires before the client gives up resending would
/// let a resend be stored twice, so anything shorter than the outbox's age is refused.
fn idempotency_ttl(value: Option<&str>) -> anyhow::Result<Duration> {
    let ttl = launch::duration_or(
        "--idempotency-ttl",
        value,
        RedisOptions::default().idempotency_ttl,
    )?;
    let outbox_age = ClientConfig::new(UserId(0), String::new(), String::new(), 0).outbox_max_age;
    if ttl < outbox_age {
        anyhow::bail!(
            "--idempotency-ttl {ttl:?} is shorter than the clients' outbox age {outbox_age:?}: \
             a resent message could be stored twice"
        );
    }
    Ok(ttl)
}

/// Runs the process with these flags (overlaid on the `--config` file) until a stop signal.
pub fn run_blocking(flags: Args) -> anyhow::Result<()> {
    let (file, file_backends): (Args, _) =
        launch::load_toml_with_backends(flags.config.as_deref())?;
    let args = overlay!(flags, file, file_backends; log_format, route_id, listen, ticket_secret, ticket_key_id, bearer_secret, bearer_secret_previous, link_secret,
        link_secret_previous,
        balance, claim_ttl,
        token_ttl, ticket_ttl, idempotency_ttl, io_timeout, link_ping_interval,
        link_retry_delay, max_body, max_log_len, store_wait_replicas, password_workers,
        resume_secret_ttl, min_password_len, max_connections, http_header_timeout,
        http_idle_timeout,
        password_queue, login_free_failures, login_delay_base, login_delay_max,
        login_rate_per_address, login_burst_per_address, register_rate_per_address,
        register_burst_per_address, send_rate, send_burst, trusted_proxies,
        shutdown_delay,
        tls_cert, tls_key, tls_ca, tls_accept_plaintext,
        admin_addr, admin_port, admin_token_file, admin_token);
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
    let bearer_secret = p.check(launch::require_secret(
        "CIM_BEARER_SECRET",
        args.bearer_secret.as_deref(),
    ));
    let link_secret = p.check(launch::require_secret(
        "CIM_LINK_SECRET",
        args.link_secret.as_deref(),
    ));
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8083)));
    let route_id = args
        .route_id
        .unwrap_or_else(|| format!("route-{}", listen.port()));

    let keys = TicketKeys::new(
        args.ticket_key_id.unwrap_or(1),
        ticket_secret.clone().unwrap_or_default(),
    );
    let mut options = RouteOptions::new(
        route_id,
        keys,
        bearer_secret.clone().unwrap_or_default(),
        link_secret.clone().unwrap_or_default(),
    );
    options.http_listen = listen;
    options.admin = p
        .check(route::admin_options(
            args.admin_addr,
            args.admin_port,
            args.admin_token.as_deref(),
            args.admin_token_file.as_deref(),
        ))
        .flatten();
    options.bearer_secret_previous = p
        .check(
            args.bearer_secret_previous
                .as_deref()
                .map(|s| launch::require_secret("CIM_BEARER_SECRET_PREVIOUS", Some(s)))
                .transpose(),
        )
        .flatten();
    options.link_secret_previous = p
        .check(
            args.link_secret_previous
                .as_deref()
                .map(|s| launch::require_secret("CIM_LINK_SECRET_PREVIOUS", Some(s)))
                .transpose(),
        )
        .flatten();
    options.strategy = p.or(strategy(args.balance.as_deref()), options.strategy);
    options.seed = launch::os_seed();
    options.login_entropy = Some(launch::os_entropy());
    options.login.claim_ttl = p.or(
        launch::duration_or(
            "--claim-ttl",
            args.claim_ttl.as_deref(),
            Duration::from_secs(30),
        ),
        options.login.claim_ttl,
    );
    options.login.resume_secret_ttl = p.or(
        launch::duration_or(
            "--resume-secret-ttl",
            args.resume_secret_ttl.as_deref(),
            cim_core::route::login::DEFAULT_RESUME_SECRET_TTL,
        ),
        options.login.resume_secret_ttl,
    );
    options.login.token_ttl = p.or(
        launch::duration_or(
            "--token-ttl",
            args.token_ttl.as_deref(),
            Duration::from_secs(86400),
        ),
        options.login.token_ttl,
    );
    options.login.ticket_ttl = p.or(
        launch::nonzero_duration_or(
            "--ticket-ttl",
            args.ticket_ttl.as_deref(),
            Duration::from_secs(30),
        ),
        options.login.ticket_ttl,
    );
    options.io_timeout = p.or(
        launch::nonzero_duration_or(
            "--io-timeout",
            args.io_timeout.as_deref(),
            options.io_timeout,
        ),
        options.io_timeout,
    );
    options.link_ping_interval = p.or(
        launch::nonzero_duration_or(
            "--link-ping-interval",
            args.link_ping_interval.as_deref(),
            options.link_ping_interval,
        ),
        options.link_ping_interval,
    );
    options.link_retry_delay = p.or(
        launch::nonzero_duration_or(
            "--link-retry-delay",
            args.link_retry_delay.as_deref(),
            options.link_retry_delay,
        ),
        options.link_retry_delay,
    );
    let idempotency_ttl = p.or(
        idempotency_ttl(args.idempotency_ttl.as_deref()),
        RedisOptions::default().idempotency_ttl,
    );
    if let Some(n) = args.max_body {
        options.delivery.max_body = n;
    }
    if let Some(n) = args.password_workers {
        options.password_workers = n;
    }
    if let Some(n) = args.min_password_len {
        options.login.min_password_len = n;
    }
    if let Some(n) = args.max_connections {
        if n == 0 {
            p.push("--max-connections must be above zero");
        } else {
            options.http.max_connections = n;
        }
    }
    options.http.header_timeout = p.or(
        launch::nonzero_duration_or(
            "--http-header-timeout",
            args.http_header_timeout.as_deref(),
            options.http.header_timeout,
        ),
        options.http.header_timeout,
    );
    options.http.idle_timeout = p.or(
        launch::nonzero_duration_or(
            "--http-idle-timeout",
            args.http_idle_timeout.as_deref(),
            options.http.idle_timeout,
        ),
        options.http.idle_timeout,
    );
    options.login.max_password_jobs = args
        .password_queue
        .unwrap_or(route::PASSWORD_JOBS_PER_WORKER * options.password_workers.max(1));
    if options.login.max_password_jobs == 0 {
        p.push("--password-queue 0 would refuse every login");
    }
    let throttle = &mut options.login.throttle;
    throttle.free_failures = args.login_free_failures.unwrap_or(throttle.free_failures);
    throttle.base_delay = p.or(
        launch::duration_or(
            "--login-delay-base",
            args.login_delay_base.as_deref(),
            throttle.base_delay,
        ),
        throttle.base_delay,
    );
    throttle.max_delay = p.or(
        launch::duration_or(
            "--login-delay-max",
            args.login_delay_max.as_deref(),
            throttle.max_delay,
        ),
        throttle.max_delay,
    );
    if throttle.base_delay > throttle.max_delay {
        p.push("--login-delay-base is longer than --login-delay-max");
    }
    let limit = |rate: Option<u32>, burst: Option<u32>, default: RateLimit| {
        RateLimit::new(
            rate.unwrap_or(default.rate_per_sec),
            burst.unwrap_or(default.burst),
        )
    };
    options.login_per_address = limit(
        args.login_rate_per_address,
        args.login_burst_per_address,
        options.login_per_address,
    );
    options.register_per_address = limit(
        args.register_rate_per_address,
        args.register_burst_per_address,
        options.register_per_address,
    );
    options.send_per_user = limit(args.send_rate, args.send_burst, options.send_per_user);
    if let Some(list) = args.trusted_proxies.as_deref() {
        options.trusted_proxies = p.or(
            route::parse_trusted_proxies(list).map_err(|e| format!("--trusted-proxies: {e}")),
            Vec::new(),
        );
    }

    let shutdown_delay = p.or(
        launch::duration_or(
            "--shutdown-delay",
            args.shutdown_delay.as_deref(),
            Duration::ZERO,
        ),
        Duration::ZERO,
    );
    let tls = p
        .check(
            tls::setup::RouteSide::load(&tls::setup::TlsFlags {
                cert: args.tls_cert,
                key: args.tls_key,
                ca: args.tls_ca,
                accept_plaintext: args.tls_accept_plaintext.unwrap_or(false),
            })
            .map_err(|e| format!("TLS: {e:#}")),
        )
        .flatten();
    p.finish()?;
    let mut backends = backends.context("the Redis and ZooKeeper settings were checked")?;
    backends.redis_options.idempotency_ttl = idempotency_ttl;
    if let Some(n) = args.max_log_len {
        backends.redis_options.max_log_len = n;
    }
    backends.redis_options.wait_replicas = args.store_wait_replicas.unwrap_or(0);

    let store = backends.open_store().await?;
    let registry = backends.open_registry()?;
    let zk = &backends.zk;
    if let Some(tls) = &tls {
        options.https = Some(tls.https.clone());
        options.link_tls = Some(tls.links.clone());
        tls::reload::spawn_reloader(
            tls.reloadables(),
            tls::reload::DEFAULT_POLL,
            CancellationToken::new(),
        );
    }
    let mut handle = route::start(TokioNet, Clock::System, options, store, &registry)
        .await
        .map_err(|error| match error {
            route::StartError::Bind { addr, source } => anyhow::anyhow!(
                "{}",
                launch::bind_failure("the HTTP API", addr, "--listen", &source)
            ),
            route::StartError::Registry(error) => {
                anyhow::anyhow!("{}", launch::zk_failure(zk, &error))
            }
            other => anyhow::Error::new(other).context("starting the route"),
        })?;
    tracing::info!(http = %handle.http_addr(), "cim-route up");
    let mut stop = launch::StopSignals::listen();
    let signalled = tokio::select! {
        () = stop.recv() => true,
        result = handle.stopped() => {
            result?;
            false
        }
    };
    if signalled {
        if !shutdown_delay.is_zero() {
            tracing::info!(
                ?shutdown_delay,
                "stop signal: unready for the load balancer, still serving until the delay ends"
            );
            handle.begin_drain();
            tokio::select! {
                () = tokio::time::sleep(shutdown_delay) => {}
                () = stop.recv() => tracing::info!("second stop signal"),
            }
        }
        tracing::info!("stop signal: shutting down");
        handle.shutdown().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_idempotency_window_cannot_be_shorter_than_the_outbox_age() {
        assert_eq!(idempotency_ttl(None).unwrap(), Duration::from_secs(600));
        assert_eq!(
            idempotency_ttl(Some("5m")).unwrap(),
            Duration::from_secs(300)
        );
        let error = idempotency_ttl(Some("4m")).unwrap_err().to_string();
        assert!(error.contains("stored twice"), "{error}");
        assert!(idempotency_ttl(Some("ten")).is_err());
    }
}
