//! What every binary does before it serves: logging, secrets, seeds, the optional TOML file,
//! opening the store and registry the flags name, and waiting for a stop signal. Shared by
//! `cim-route`, `cim-server` and `cim up` so they behave alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cim_core::memstore::MemoryStoreConfig;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::de::DeserializeOwned;

use crate::registry::{AnyRegistry, MemoryRegistry, ZkAuth, ZkConfig, ZkRegistry, ZkTls};
use crate::store::{MemoryBackend, RedisOptions, RedisStore, RedisTls, Store};

/// Shortest secret accepted: 128 bits of a random string's worth.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(
        "{0} is required (set it in the environment or with its flag; it has no default outside `cim up`)"
    )]
    MissingSecret(&'static str),
    #[error("{0} must be at least {MIN_SECRET_LEN} bytes")]
    ShortSecret(&'static str),
    #[error("config file {path}: {reason}")]
    ConfigFile { path: String, reason: String },
    #[error("redis: {0}")]
    Redis(String),
    #[error("zookeeper: {0}")]
    ZooKeeper(String),
    #[error("{0}")]
    Usage(String),
    /// Every missing or invalid setting found before starting, each naming its setting.
    #[error("{} setting{} missing or invalid:\n  - {}", .0.len(), if .0.len() == 1 { " is" } else { "s are" }, .0.join("\n  - "))]
    Settings(Vec<String>),
}

/// The Redis and ZooKeeper settings `cim-route` and `cim-server` share: flattened into each
/// one's `Args`, so they are flags, `CIM_*` variables and TOML keys alike in both (the file's
/// keys are split off by [`load_toml_with_backends`]).
#[derive(clap::Args, Debug, Default, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct BackendFlags {
    /// Redis URL, e.g. redis://127.0.0.1:6379, or rediss:// for TLS (this or
    /// --redis-cluster is required).
    #[arg(long, env = "CIM_REDIS")]
    redis: Option<String>,
    /// A Redis Cluster instead of one Redis: URLs of some of its nodes, comma-separated, e.g.
    /// redis://10.0.0.2:6379,redis://10.0.0.3:6379 (rediss:// for TLS; the rest of the nodes
    /// are learnt from them). Not together with --redis.
    #[arg(long, env = "CIM_REDIS_CLUSTER")]
    redis_cluster: Option<String>,
    /// Bound on one Redis command; a slower one counts as Redis unreachable [default: 2s].
    #[arg(long, env = "CIM_REDIS_TIMEOUT")]
    redis_timeout: Option<String>,
    /// Run even if Redis may evict keys (maxmemory-policy other than noeviction).
    #[arg(long, env = "CIM_ALLOW_EVICTION", num_args = 0..=1, default_missing_value = "true")]
    allow_eviction: Option<bool>,
    /// CA certificate(s) (PEM) that a rediss:// Redis's certificate must chain to
    /// [default: the system's roots].
    #[arg(long, env = "CIM_REDIS_CA")]
    redis_ca: Option<PathBuf>,
    /// Client certificate (PEM) shown to a rediss:// Redis that requires one
    /// (tls-auth-clients); needs --redis-client-key.
    #[arg(long, env = "CIM_REDIS_CLIENT_CERT")]
    redis_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --redis-client-cert.
    #[arg(long, env = "CIM_REDIS_CLIENT_KEY")]
    redis_client_key: Option<PathBuf>,
    /// ZooKeeper ensemble, host:port[,host:port] (required).
    #[arg(long, env = "CIM_ZK")]
    zk: Option<String>,
    /// ZooKeeper node the servers register under [default: /cim/servers].
    #[arg(long, env = "CIM_ZK_ROOT")]
    zk_root: Option<String>,
    /// ZooKeeper session timeout [default: 6s].
    #[arg(long, env = "CIM_ZK_SESSION_TIMEOUT")]
    zk_session_timeout: Option<String>,
    /// ZooKeeper digest identity, as <user>:<password>: every session authenticates with it
    /// and the registry nodes it creates are writable by that identity only (readable by
    /// anyone). Prefer the environment.
    #[arg(long, env = "CIM_ZK_AUTH", hide_env_values = true)]
    zk_auth: Option<String>,
    /// CA (PEM) of ZooKeeper's secureClientPort certificates: with it, ZooKeeper is reached
    /// over TLS (each --zk host must be a name of its certificate).
    #[arg(long, env = "CIM_ZK_CA")]
    zk_ca: Option<PathBuf>,
    /// Client certificate (PEM) shown to a ZooKeeper with ssl.clientAuth=need; needs
    /// --zk-client-key and --zk-ca.
    #[arg(long, env = "CIM_ZK_CLIENT_CERT")]
    zk_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --zk-client-cert.
    #[arg(long, env = "CIM_ZK_CLIENT_KEY")]
    zk_client_key: Option<PathBuf>,
}

/// Which Redis a process uses: one node (`--redis`) or a cluster (`--redis-cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Node(String),
    /// Seed nodes' URLs.
    Cluster(Vec<String>),
}

/// Redis and ZooKeeper as checked [`BackendFlags`] name them, ready to open.
#[derive(Debug)]
pub struct Backends {
    pub redis: RedisTarget,
    pub redis_options: RedisOptions,
    pub zk: String,
    pub zk_root: String,
    pub zk_session_timeout: Duration,
    pub zk_auth: Option<ZkAuth>,
    pub zk_tls: Option<ZkTls>,
}

impl BackendFlags {
    /// These settings, each one not given taken from `file` (flags and the environment beat
    /// the file).
    pub fn or(self, file: Self) -> Self {
        macro_rules! each {
            ($($field:ident),* $(,)?) => {
                Self { $($field: self.$field.or(file.$field)),* }
            };
        }
        each!(
            redis,
            redis_cluster,
            redis_timeout,
            allow_eviction,
            redis_ca,
            redis_client_cert,
            redis_client_key,
            zk,
            zk_root,
            zk_session_timeout,
            zk_auth,
            zk_ca,
            zk_client_cert,
            zk_client_key,
        )
    }

    /// The TOML keys of these settings (kebab-case, like the flags).
    fn toml_keys() -> Vec<String> {
        <Self as clap::Args>::augment_args(clap::Command::new("backends"))
            .get_arguments()
            .map(|arg| arg.get_id().as_str().replace('_', "-"))
            .collect()
    }

    /// Checks every setting, noting each problem (naming its flag) in `p`; `None` when any
    /// was found. Options both binaries set alike are filled in; the caller adds its own.
    pub fn check(self, p: &mut Problems) -> Option<Backends> {
        let redis = redis_target(p, self.redis, self.redis_cluster);
        let zk = p.required("--zk", "CIM_ZK", self.zk);
        let defaults = RedisOptions::default();
        let redis_tls = p.check(redis_tls(
            self.redis_ca.as_deref(),
            self.redis_client_cert.as_deref(),
            self.redis_client_key.as_deref(),
        ));
        let command_timeout = p.check(nonzero_duration_or(
            "--redis-timeout",
            self.redis_timeout.as_deref(),
            defaults.command_timeout,
        ));
        let zk_session_timeout = p.check(duration_or(
            "--zk-session-timeout",
            self.zk_session_timeout.as_deref(),
            Duration::from_secs(6),
        ));
        let zk_auth = p.check(zk_auth(self.zk_auth.as_deref()));
        let zk_tls = p.check(zk_tls(
            self.zk_ca.as_deref(),
            self.zk_client_cert.as_deref(),
            self.zk_client_key.as_deref(),
        ));
        Some(Backends {
            redis: redis?,
            redis_options: RedisOptions {
                allow_eviction: self.allow_eviction.unwrap_or(false),
                tls: redis_tls?,
                command_timeout: command_timeout?,
                ..defaults
            },
            zk: zk?,
            zk_root: self.zk_root.unwrap_or_else(|| "/cim/servers".to_owned()),
            zk_session_timeout: zk_session_timeout?,
            zk_auth: zk_auth?,
            zk_tls: zk_tls?,
        })
    }
}

impl Backends {
    /// Connects to Redis (checking its eviction policy and the key layout's version).
    pub async fn open_store(&self) -> Result<Arc<dyn Store>, LaunchError> {
        match &self.redis {
            RedisTarget::Node(url) => open_store(Some(url), self.redis_options.clone()).await,
            RedisTarget::Cluster(urls) => {
                let store = RedisStore::connect_cluster(urls, self.redis_options.clone())
                    .await
                    .map_err(|e| LaunchError::Redis(e.to_string()))?;
                Ok(Arc::new(store))
            }
        }
    }

    /// The ZooKeeper registry (its session is established in the background).
    pub fn open_registry(&self) -> Result<AnyRegistry, LaunchError> {
        open_secured_registry(
            Some(&self.zk),
            &self.zk_root,
            self.zk_session_timeout,
            self.zk_auth.clone(),
            self.zk_tls.clone(),
        )
    }
}

/// [`load_toml`] for a binary whose `Args` flatten [`BackendFlags`]: the file's backend keys
/// go to the second value, the rest to the first (which still refuses unknown keys).
pub fn load_toml_with_backends<T: DeserializeOwned + Default>(
    path: Option<&Path>,
) -> Result<(T, BackendFlags), LaunchError> {
    let Some(path) = path else {
        return Ok(Default::default());
    };
    let error = |reason: String| LaunchError::ConfigFile {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    let mut rest: toml::Table = toml::from_str(&text).map_err(|e| error(e.to_string()))?;
    let keys = BackendFlags::toml_keys();
    let mut backends = toml::Table::new();
    for key in keys {
        if let Some(value) = rest.remove(&key) {
            backends.insert(key, value);
        }
    }
    Ok((
        from_table(rest).map_err(error)?,
        from_table(backends).map_err(error)?,
    ))
}

/// A parsed table as `T`; a wrong value is named by its key (the table has no lines left).
fn from_table<T: DeserializeOwned>(table: toml::Table) -> Result<T, String> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        let message = e.inner().message().to_owned();
        if key == "." {
            message
        } else {
            format!("{key}: {message}")
        }
    })
}

/// Collects the problems of a process's settings, so that an operator sees all of them at
/// once (each naming its flag or variable), not one per attempt to start.
#[derive(Debug, Default)]
pub struct Problems(Vec<String>);

impl Problems {
    /// `result`'s value, or `None` with its error noted.
    pub fn check<T, E: std::fmt::Display>(&mut self, result: Result<T, E>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.0.push(error.to_string());
                None
            }
        }
    }

    /// `result`'s value, or `fallback` (to keep checking the rest) with its error noted.
    pub fn or<T, E: std::fmt::Display>(&mut self, result: Result<T, E>, fallback: T) -> T {
        self.check(result).unwrap_or(fallback)
    }

    /// A setting every real deployment must give: noted when missing.
    pub fn required<T>(&mut self, flag: &str, env: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.0.push(format!(
                "{flag} ({env}) is required: the embedded store and registry are only for \
                 `cim up`, whose processes share them"
            ));
        }
        value
    }

    /// Notes a problem found some other way.
    pub fn push(&mut self, problem: impl Into<String>) {
        self.0.push(problem.into());
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok` when nothing was noted, else every problem in one error.
    pub fn finish(self) -> Result<(), LaunchError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(LaunchError::Settings(self.0))
        }
    }
}

/// Logs to stderr as text; `RUST_LOG` overrides `default_filter`.
pub fn init_tracing(default_filter: &str) {
    init_logging(default_filter, LogFormat::Text);
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// For people: one line per event, colours on a terminal.
    #[default]
    Text,
    /// For log pipelines: one JSON object per line (`timestamp`, `level`, `target`,
    /// `fields` with `message` and the event's fields, `span`/`spans`), never colours.
    Json,
}

impl LogFormat {
    /// `text` or `json`; `None` is the default. The error names the setting.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.map(str::trim) {
            None | Some("text") => Ok(Self::Text),
            Some("json") => Ok(Self::Json),
            Some(other) => Err(format!(
                "--log-format (CIM_LOG_FORMAT) {other:?}: use text or json"
            )),
        }
    }
}

/// What a binary's `main` does with its failure: the error and its causes on stderr, as
/// Rust prints a `main` that returns an error, then exit code 1 — without the backtrace
/// that `RUST_BACKTRACE=1` (common on developers' machines) would add to an operator's
/// startup error.
pub fn report_failure(error: &(dyn std::error::Error + 'static)) -> std::process::ExitCode {
    let mut text = format!("Error: {error}");
    let causes: Vec<_> = std::iter::successors(error.source(), |e| e.source()).collect();
    match causes[..] {
        [] => {}
        [cause] => text.push_str(&format!("\n\nCaused by:\n    {cause}")),
        _ => {
            text.push_str("\n\nCaused by:");
            for (i, cause) in causes.iter().enumerate() {
                text.push_str(&format!("\n    {i}: {cause}"));
            }
        }
    }
    eprintln!("{text}");
    std::process::ExitCode::FAILURE
}

/// Added to every default filter: the Redis Cluster client logs a line (an ERROR) on every
/// attempt to refresh its slot map, hundreds a second while no node answers; the store's
/// circuit (`store/redis/circuit.rs`) logs the outage and the recovery once each instead.
/// `RUST_LOG` (which replaces the default) brings them back.
const QUIET_BY_DEFAULT: &str = "redis::cluster_handling::async_connection=off";

/// Logs to stderr in `format`; `RUST_LOG` overrides `default_filter`.
pub fn init_logging(default_filter: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("{default_filter},{QUIET_BY_DEFAULT}"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}

/// A seed from the OS's entropy: every process start must draw fresh message ids, resume
/// tokens and salts.
pub fn os_seed() -> u64 {
    ChaCha8Rng::from_os_rng().random()
}

/// 256 bits from the OS's entropy, for generators that make credentials.
pub fn os_entropy() -> [u8; 32] {
    let mut rng = ChaCha8Rng::from_os_rng();
    std::array::from_fn(|_| rng.random::<u8>())
}

/// A fresh random secret (for `cim up`, whose processes share memory and need no config).
pub fn random_secret() -> Vec<u8> {
    let mut rng = ChaCha8Rng::from_os_rng();
    (0..32).map(|_| rng.random::<u8>()).collect()
}

/// The secret `name`, which a real deployment must set.
pub fn require_secret(name: &'static str, value: Option<&str>) -> Result<Vec<u8>, LaunchError> {
    let value = value.ok_or(LaunchError::MissingSecret(name))?;
    if value.len() < MIN_SECRET_LEN {
        return Err(LaunchError::ShortSecret(name));
    }
    Ok(value.as_bytes().to_vec())
}

/// Reads the optional TOML file; no path gives the all-defaults value.
pub fn load_toml<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, LaunchError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let error = |reason: String| LaunchError::ConfigFile {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
    toml::from_str(&text).map_err(|e| error(e.to_string()))
}

/// Parses `250ms`, `30s`, `5m`, `1h` (or bare seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 30s, 5m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
        )),
    }
}

/// `value` (the text of the flag `name`) parsed as a duration, or `default` when the flag was
/// not given.
pub fn duration_or(
    name: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, LaunchError> {
    value.map_or(Ok(default), |text| {
        parse_duration(text).map_err(|e| LaunchError::Usage(format!("{name}: {e}")))
    })
}

/// Like [`duration_or`], for a setting that must be above zero; `name` is its flag, for the
/// error.
pub fn nonzero_duration_or(
    name: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, LaunchError> {
    let duration = duration_or(name, value, default)?;
    if duration.is_zero() {
        return Err(LaunchError::Usage(format!("{name} must be above zero")));
    }
    Ok(duration)
}

/// `--redis` or `--redis-cluster`: exactly one, the cluster's URLs a non-empty list.
fn redis_target(
    p: &mut Problems,
    node: Option<String>,
    cluster: Option<String>,
) -> Option<RedisTarget> {
    match (node, cluster) {
        (Some(_), Some(_)) => {
            p.check::<(), _>(Err(
                "--redis (CIM_REDIS) and --redis-cluster (CIM_REDIS_CLUSTER) are alternatives: \
                 give one Redis or one Redis Cluster, not both",
            ));
            None
        }
        (Some(url), None) => Some(RedisTarget::Node(url)),
        (None, Some(list)) => {
            let urls: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect();
            if urls.is_empty() {
                p.check::<(), _>(Err(
                    "--redis-cluster (CIM_REDIS_CLUSTER) names no node: give one or more \
                     comma-separated URLs, e.g. redis://10.0.0.2:6379,redis://10.0.0.3:6379",
                ));
                return None;
            }
            Some(RedisTarget::Cluster(urls))
        }
        (None, None) => {
            p.required::<()>(
                "--redis or --redis-cluster",
                "CIM_REDIS or CIM_REDIS_CLUSTER",
                None,
            );
            None
        }
    }
}

/// Redis at `url`, or the embedded in-memory store when `None` (only `cim up`, whose
/// processes share it, may pass `None`).
pub async fn open_store(
    redis: Option<&str>,
    options: RedisOptions,
) -> Result<Arc<dyn Store>, LaunchError> {
    match redis {
        Some(url) => {
            let store = RedisStore::connect(url, options)
                .await
                .map_err(|e| LaunchError::Redis(e.to_string()))?;
            Ok(Arc::new(store))
        }
        None => Ok(Arc::new(MemoryBackend::new(MemoryStoreConfig {
            max_log_len: options.max_log_len,
            idempotency_ttl: options.idempotency_ttl,
            seed: options.seed.unwrap_or_else(os_seed),
            canaries: cim_core::canary::Canaries::NONE,
            shards: 1,
        }))),
    }
}

/// The TLS settings for a `rediss://` URL from the files `--redis-ca`, `--redis-client-cert`
/// and `--redis-client-key` name (PEM; each checked now, so a bad file stops the start with
/// its name).
pub fn redis_tls(
    ca: Option<&Path>,
    client_cert: Option<&Path>,
    client_key: Option<&Path>,
) -> Result<RedisTls, LaunchError> {
    RedisTls::from_files(ca, client_cert, client_key).map_err(LaunchError::Redis)
}

/// The `--zk-auth` digest identity (`user:password`), if given.
pub fn zk_auth(value: Option<&str>) -> Result<Option<ZkAuth>, LaunchError> {
    value
        .map(|text| ZkAuth::parse(text).map_err(LaunchError::Usage))
        .transpose()
}

/// TLS to ZooKeeper from `--zk-ca` and, for an ensemble that requires one, the client
/// certificate `--zk-client-cert` / `--zk-client-key` (PEM; read and checked now).
pub fn zk_tls(
    ca: Option<&Path>,
    client_cert: Option<&Path>,
    client_key: Option<&Path>,
) -> Result<Option<ZkTls>, LaunchError> {
    match ca {
        Some(ca) => ZkTls::from_files(ca, client_cert, client_key)
            .map(Some)
            .map_err(LaunchError::ZooKeeper),
        None if client_cert.is_some() || client_key.is_some() => Err(LaunchError::Usage(
            "--zk-client-cert / --zk-client-key need --zk-ca (TLS to ZooKeeper)".into(),
        )),
        None => Ok(None),
    }
}

/// ZooKeeper at `connect` (`host:port[,host:port]`), or the embedded registry when `None`.
pub fn open_registry(
    zk: Option<&str>,
    root: &str,
    session_timeout: Duration,
) -> Result<AnyRegistry, LaunchError> {
    open_secured_registry(zk, root, session_timeout, None, None)
}

/// [`open_registry`], authenticating every ZooKeeper session as `auth` (and creating nodes
/// only that identity may change; see [`ZkConfig::auth`]), over TLS when `tls` is given.
pub fn open_secured_registry(
    zk: Option<&str>,
    root: &str,
    session_timeout: Duration,
    auth: Option<ZkAuth>,
    tls: Option<ZkTls>,
) -> Result<AnyRegistry, LaunchError> {
    match zk {
        Some(connect) => {
            let config = ZkConfig::new(connect)
                .with_root(root)
                .with_session_timeout(session_timeout)
                .with_auth(auth)
                .with_tls(tls);
            let registry =
                ZkRegistry::new(config).map_err(|e| LaunchError::ZooKeeper(e.to_string()))?;
            Ok(registry.into())
        }
        None => Ok(MemoryRegistry::new().into()),
    }
}

/// Why a listener could not bind, for an operator: the address, what it is, the flag that
/// sets it and, when the port is taken, the way out.
pub fn bind_failure(
    listener: &str,
    addr: std::net::SocketAddr,
    flag: &str,
    source: &std::io::Error,
) -> String {
    let port = addr.port();
    match source.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "cannot listen on {addr} ({listener}): port {port} is already in use, by another \
             process or another cluster on this machine (`ss -ltnp 'sport = :{port}'` names \
             it); stop that, or choose another port with {flag}"
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "cannot listen on {addr} ({listener}): permission denied (ports below 1024 need \
             privileges); choose another port with {flag}"
        ),
        std::io::ErrorKind::AddrNotAvailable => format!(
            "cannot listen on {addr} ({listener}): {} is not an address of this machine",
            addr.ip()
        ),
        _ => format!("cannot listen on {addr} ({listener}, set by {flag}): {source}"),
    }
}

/// Why the registry could not be reached or used at start, for an operator: the ensemble
/// (`--zk`), what failed and, for a connect that got no answer, what to check.
pub fn zk_failure(connect: &str, error: &crate::registry::RegistryError) -> String {
    use crate::registry::RegistryError;
    let hint = match error {
        RegistryError::Timeout { op: "connect", .. }
        | RegistryError::ZooKeeper { op: "connect", .. } => {
            ": no ZooKeeper answered there; is it running and reachable from this host, and \
             is --zk (CIM_ZK, host:port[,host:port]) right?"
        }
        _ => "",
    };
    format!("ZooKeeper at {connect} (--zk): {error}{hint}")
}

/// Ctrl-C and SIGTERM, listened for from the moment this is made.
///
/// One listener lives as long as the process's main loop: a stop signal that arrives while
/// the loop is busy elsewhere (answering a terminal command, between two `select!`s) waits
/// here instead of being lost, as it would be if the loop made a new listener on each turn.
#[derive(Debug)]
pub struct StopSignals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    /// Starts listening now. A signal kind that cannot be listened for (no signal driver)
    /// never resolves, which leaves the other one working.
    #[must_use]
    pub fn listen() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
        }
    }

    /// Resolves on the next Ctrl-C or SIGTERM, including one that arrived since
    /// [`StopSignals::listen`] or the previous `recv`.
    pub async fn recv(&mut self) {
        async fn next(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            () = next(&mut self.interrupt) => {}
            () = next(&mut self.terminate) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary's own settings, beside the shared backend ones.
    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
    struct OwnSettings {
        listen: Option<String>,
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn a_config_file_splits_into_the_binarys_settings_and_the_backends() {
        let file = toml_file(
            "listen = \"0.0.0.0:1\"\nredis = \"redis://r:6379\"\nzk-root = \"/x\"\n\
             allow-eviction = true\n",
        );
        let (own, backends): (OwnSettings, BackendFlags) =
            load_toml_with_backends(Some(file.path())).unwrap();
        assert_eq!(own.listen.as_deref(), Some("0.0.0.0:1"));
        assert_eq!(backends.redis.as_deref(), Some("redis://r:6379"));
        assert_eq!(backends.zk_root.as_deref(), Some("/x"));
        assert_eq!(backends.allow_eviction, Some(true));
        // Every backend flag is a key: the split knows all fourteen.
        assert_eq!(BackendFlags::toml_keys().len(), 14);
        assert!(BackendFlags::toml_keys().contains(&"zk-client-key".to_owned()));
        assert!(BackendFlags::toml_keys().contains(&"redis-cluster".to_owned()));

        // An unknown key is still refused, and a wrong value is named by its key.
        for (text, says) in [
            ("redis-url = \"x\"\n", "unknown field `redis-url`"),
            ("zk-session-timeout = 5\n", "zk-session-timeout"),
            ("listen = 5\n", "listen"),
        ] {
            let file = toml_file(text);
            let error = load_toml_with_backends::<OwnSettings>(Some(file.path()))
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{text}: {error}");
        }
    }

    #[test]
    fn flags_beat_the_file_and_every_backend_problem_is_named_at_once() {
        let flags = BackendFlags {
            zk: Some("flag:2181".into()),
            ..BackendFlags::default()
        };
        let file = BackendFlags {
            zk: Some("file:2181".into()),
            redis: Some("redis://file".into()),
            ..BackendFlags::default()
        };
        let merged = flags.or(file);
        assert_eq!(merged.zk.as_deref(), Some("flag:2181"));
        assert_eq!(merged.redis.as_deref(), Some("redis://file"));
        let backends = merged.check(&mut Problems::default()).expect("valid");
        assert_eq!(backends.zk_root, "/cim/servers");
        assert_eq!(backends.zk_session_timeout, Duration::from_secs(6));

        let broken = BackendFlags {
            zk_session_timeout: Some("soon".into()),
            redis_timeout: Some("0s".into()),
            zk_client_cert: Some("c.pem".into()),
            ..BackendFlags::default()
        };
        let mut p = Problems::default();
        assert!(broken.check(&mut p).is_none());
        let LaunchError::Settings(problems) = p.finish().unwrap_err() else {
            panic!("not a settings error");
        };
        for flag in [
            "--redis",
            "--zk ",
            "--zk-session-timeout",
            "--redis-timeout",
            "--zk-ca",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(flag)),
                "{flag} not named: {problems:?}"
            );
        }
    }

    #[test]
    fn redis_is_one_node_or_one_cluster_never_both() {
        let with = |redis: Option<&str>, cluster: Option<&str>| BackendFlags {
            redis: redis.map(str::to_owned),
            redis_cluster: cluster.map(str::to_owned),
            zk: Some("127.0.0.1:2181".into()),
            ..BackendFlags::default()
        };
        let backends = with(None, Some(" redis://a:1, redis://b:2 ,"))
            .check(&mut Problems::default())
            .expect("a cluster alone is valid");
        assert_eq!(
            backends.redis,
            RedisTarget::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        let backends = with(Some("redis://a:1"), None)
            .check(&mut Problems::default())
            .expect("a node alone is valid");
        assert_eq!(backends.redis, RedisTarget::Node("redis://a:1".into()));
        for (redis, cluster, named) in [
            (Some("redis://a:1"), Some("redis://b:2"), "alternatives"),
            (None, Some(" , "), "names no node"),
            (None, None, "--redis or --redis-cluster"),
        ] {
            let mut p = Problems::default();
            assert!(with(redis, cluster).check(&mut p).is_none());
            let LaunchError::Settings(problems) = p.finish().unwrap_err() else {
                panic!("not a settings error");
            };
            assert!(
                problems.iter().any(|p| p.contains(named)),
                "{named:?} not said: {problems:?}"
            );
        }
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn zero_is_refused_where_it_makes_no_sense() {
        let default = Duration::from_secs(5);
        assert_eq!(nonzero_duration_or("--x", None, default).unwrap(), default);
        assert_eq!(
            nonzero_duration_or("--x", Some("2s"), default).unwrap(),
            Duration::from_secs(2)
        );
        assert!(matches!(
            nonzero_duration_or("--x", Some("0s"), default),
            Err(LaunchError::Usage(m)) if m.contains("--x")
        ));
        assert!(nonzero_duration_or("--x", Some("soon"), default).is_err());
    }

    #[test]
    fn secrets_are_required_and_long_enough() {
        assert!(matches!(
            require_secret("CIM_LINK_SECRET", None),
            Err(LaunchError::MissingSecret(_))
        ));
        assert!(matches!(
            require_secret("CIM_LINK_SECRET", Some("short")),
            Err(LaunchError::ShortSecret(_))
        ));
        assert_eq!(
            require_secret("CIM_LINK_SECRET", Some("0123456789abcdef")).unwrap(),
            b"0123456789abcdef"
        );
    }
}
