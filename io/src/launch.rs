//! What every binary does before it serves: logging, secrets, seeds, the optional TOML file,
//! opening the store and registry the flags name, and waiting for a stop signal. Shared by
//! `cim-route`, `cim-server` and `cim up` so they behave alike.

use std::path::Path;
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
        "{0} is required (set it with its flag or environment variable; it has no default outside `cim up`)"
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
}

/// Logs to stderr; `RUST_LOG` overrides `default_filter`.
pub fn init_tracing(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

/// A seed from the OS's entropy: every process start must draw fresh message ids, resume
/// tokens and salts.
pub fn os_seed() -> u64 {
    ChaCha8Rng::from_os_rng().random()
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

/// `value` (a flag's text) parsed as a duration, or `default` when the flag was not given.
pub fn duration_or(value: Option<&str>, default: Duration) -> Result<Duration, LaunchError> {
    value.map_or(Ok(default), |text| {
        parse_duration(text).map_err(LaunchError::Usage)
    })
}

/// Like [`duration_or`], for a setting that must be above zero; `name` is its flag, for the
/// error.
pub fn nonzero_duration_or(
    name: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, LaunchError> {
    let duration = duration_or(value, default)?;
    if duration.is_zero() {
        return Err(LaunchError::Usage(format!("{name} must be above zero")));
    }
    Ok(duration)
}

/// The Redis and ZooKeeper addresses a real deployment's process must be given.
pub fn require_backends(
    redis: Option<String>,
    zk: Option<String>,
) -> Result<(String, String), LaunchError> {
    let why = "the embedded store and registry are only for `cim up`, whose processes share them";
    let redis = redis.ok_or_else(|| LaunchError::Usage(format!("--redis is required ({why})")))?;
    let zk = zk.ok_or_else(|| LaunchError::Usage(format!("--zk is required ({why})")))?;
    Ok((redis, zk))
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

/// Resolves on Ctrl-C or SIGTERM, whichever comes first.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
