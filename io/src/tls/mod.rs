//! TLS for every listener and every dialer, with rustls (ring provider; no OpenSSL).
//!
//! - [`ServerTls`] is one listener's side: its certificate and key, optionally a CA whose
//!   certificates its clients must present (the internal links' mutual TLS) and the role
//!   those certificates must carry, and whether plaintext is still accepted (a migration).
//!   The handshake runs in the connection's own task ([`ServerTls::accept`]), bounded by a
//!   timeout, so a client that never finishes it holds nothing else up.
//! - [`ClientTls`] is a dialer's side: the roots it trusts (a CA file, or the system's) and
//!   optionally the certificate it presents (a route dialing a server's link port).
//! - [`MaybeTls`] is the stream the shell frames: plaintext or either side of TLS, so the
//!   gateway, the links, the HTTP server and the SDK handle one type whatever the wire is.
//!
//! **Roles.** One internal CA signs routes and servers; what tells them apart is a URI
//! subject alternative name in the certificate, [`Role::Route`]'s `urn:cim:role:route` or
//! [`Role::Server`]'s `urn:cim:role:server`. A server's link listener accepts only route
//! certificates, so a compromised server's key cannot pose as a route; a route accepts only
//! server certificates on the links it dials.
//!
//! **Reload.** [`ServerTls::reload`] and [`ClientTls::reload`] read the files again and, if
//! they make a valid configuration, use it for every new handshake; connections already
//! open keep theirs. A bad file is refused with the reason and the old configuration stays.
//! [`reload::spawn_reloader`] calls them on SIGHUP and when a file's modification time
//! changes.

pub mod dev;
pub mod reload;
pub mod setup;
mod stream;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};

pub use self::stream::{MaybeTls, Rewind};
use crate::metrics::{Exposition, Kind};
use crate::net::Stream;

/// How long a new connection has to complete its TLS handshake (default of every listener).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate expiring sooner than this is warned about at every load and once a day.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(21 * 24 * 3600);

/// How long a listener that also accepts plaintext, and whose plaintext peers wait for the
/// server to speak first (the link port), waits for a TLS ClientHello before it takes the
/// connection for plaintext. A TLS client sends its hello as soon as it is connected.
const PLAINTEXT_SILENCE: Duration = Duration::from_secs(1);

/// Which side of an internal link a certificate speaks for: a URI subject alternative name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Route,
    Server,
}

impl Role {
    /// The URI SAN that grants this role.
    pub const fn uri(self) -> &'static str {
        match self {
            Role::Route => "urn:cim:role:route",
            Role::Server => "urn:cim:role:server",
        }
    }

    fn from_uri(uri: &str) -> Option<Role> {
        [Role::Route, Role::Server]
            .into_iter()
            .find(|role| role.uri() == uri)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Route => "route",
            Role::Server => "server",
        })
    }
}

/// Why a certificate, key or CA file could not be used. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: no PEM certificate in the file", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: no usable PEM private key in the file ({reason})", path.display())]
    NoKey { path: PathBuf, reason: String },
    #[error("{}: the certificate does not parse: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("{}: the certificate expired at {} (unix time)", path.display(), not_after)]
    Expired { path: PathBuf, not_after: i64 },
    #[error("{}: the certificate does not carry the {role} role (a URI SAN {})", path.display(), role.uri())]
    MissingRole { path: PathBuf, role: Role },
    #[error("{}: the certificate is not valid for {host:?}, the name clients and routes check ({reason})", path.display())]
    WrongHost {
        path: PathBuf,
        host: String,
        reason: String,
    },
    #[error("{}: no CA certificate usable as a trust root: {reason}", path.display())]
    BadCa { path: PathBuf, reason: String },
    #[error("the system's trusted roots: {0}")]
    SystemRoots(String),
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
}

/// Why an accepted connection did not become a usable stream. The connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    #[error("a plaintext client on a TLS port (first bytes {:?})", String::from_utf8_lossy(.0))]
    Plaintext(Vec<u8>),
    #[error("closed before the handshake")]
    Closed,
    #[error("TLS handshake failed: {0}")]
    Handshake(io::Error),
    #[error("the client certificate does not carry the {0} role")]
    WrongRole(Role),
}

/// Why a dial did not give a TLS stream.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{host:?} is not a valid TLS server name")]
    BadName { host: String },
    #[error("TLS to {host}: {reason}")]
    Handshake { host: String, reason: String },
    /// The peer's certificate did not verify (unknown issuer, wrong name, expired, ...):
    /// unlike a cut handshake, trying again will not help. `reason` is rustls' text (as in
    /// `Handshake`), `plain` the same in words for a chat user.
    #[error("TLS to {host}: {reason}")]
    Certificate {
        host: String,
        reason: String,
        plain: String,
    },
    #[error("TLS to {host}: the server's certificate does not carry the {role} role")]
    WrongRole { host: String, role: Role },
    /// The peer answered the hello with something that is no TLS record: it speaks
    /// plaintext on that port. Trying again will not help either.
    #[error("TLS to {host}: the peer does not speak TLS on this port (it answered in plaintext)")]
    NotTls { host: String },
}

impl ConnectError {
    /// What stops a client for good, in words for a chat user: the certificate did not
    /// verify, or the peer does not speak TLS. `None` for what may pass (a cut handshake).
    pub fn permanent(&self) -> Option<String> {
        match self {
            ConnectError::Certificate { plain, .. } => {
                Some(format!("its certificate is not trusted: {plain}"))
            }
            ConnectError::NotTls { .. } => Some(
                "it does not speak TLS on that port (it answered in plaintext; \
                 for a route, use http:// instead of https://)"
                    .to_owned(),
            ),
            ConnectError::BadName { .. }
            | ConnectError::Handshake { .. }
            | ConnectError::WrongRole { .. } => None,
        }
    }

    /// The host the dial was for.
    pub fn host(&self) -> &str {
        match self {
            ConnectError::BadName { host }
            | ConnectError::Handshake { host, .. }
            | ConnectError::Certificate { host, .. }
            | ConnectError::WrongRole { host, .. }
            | ConnectError::NotTls { host } => host,
        }
    }
}

/// What the shell needs to know of a loaded certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Expiry, in seconds since the Unix epoch.
    pub not_after: i64,
    pub roles: Vec<Role>,
}

/// Handshake counters of one listener or dialer, and its certificate's expiry.
#[derive(Debug, Default)]
pub struct TlsStats {
    pub handshakes: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    /// Plaintext clients refused on a TLS-only port.
    pub plaintext_refused: AtomicU64,
    /// Plaintext clients taken on a port that accepts both (a migration in progress).
    pub plaintext_accepted: AtomicU64,
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
    /// The certificate in use: its expiry in Unix seconds (0 before one is loaded).
    pub cert_not_after: AtomicI64,
}

/// Appends the Prometheus families of several TLS listeners or dialers, each one's lines
/// labelled with its `labels` (e.g. `listener="link"`); a family's lines stay together.
/// Makes ring rustls' process-wide default provider unless one is installed already. CIM's
/// own configurations name ring explicitly; this is for libraries that call
/// `ClientConfig::builder()` (the `redis` crate, zookeeper-client), which panics when the
/// dependency tree enables more than one provider (zookeeper-client's `tls` feature brings
/// aws-lc-rs) and none is installed.
pub fn install_default_crypto_provider() {
    // Err only means a provider is installed already, which is all this wants.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn render_stats(page: &mut Exposition, prefix: &str, each: &[(&str, Arc<TlsStats>)]) {
    type Read = fn(&TlsStats) -> i64;
    let families: [(&str, Kind, &str, Read); 8] = [
        (
            "tls_handshakes_total",
            Kind::Counter,
            "TLS handshakes completed.",
            |s| s.handshakes.load(Ordering::Relaxed) as i64,
        ),
        (
            "tls_handshake_failures_total",
            Kind::Counter,
            "TLS handshakes that failed (bad certificate, wrong role, protocol error).",
            |s| s.handshake_failures.load(Ordering::Relaxed) as i64,
        ),
        (
            "tls_handshake_timeouts_total",
            Kind::Counter,
            "Connections closed for not completing the TLS handshake in time.",
            |s| s.handshake_timeouts.load(Ordering::Relaxed) as i64,
        ),
        (
            "tls_plaintext_refused_total",
            Kind::Counter,
            "Plaintext clients refused on a TLS-only port.",
            |s| s.plaintext_refused.load(Ordering::Relaxed) as i64,
        ),
        (
            "tls_plaintext_accepted_total",
            Kind::Counter,
            "Plaintext clients taken on a port that accepts both (a migration).",
            |s| s.plaintext_accepted.load(Ordering::Relaxed) as i64,
        ),
        (
            "tls_reloads_total",
            Kind::Counter,
            "Certificate reloads that took effect.",
            |s| s.reloads.load(Ordering::Relaxed) as i64,
        ),
        (
            "tls_reload_failures_total",
            Kind::Counter,
            "Certificate reloads refused (the previous certificate stays).",
            |s| s.reload_failures.load(Ordering::Relaxed) as i64,
        ),
        (
            "tls_cert_expiry_timestamp_seconds",
            Kind::Gauge,
            "When the certificate in use expires (Unix seconds).",
            |s| s.cert_not_after.load(Ordering::Relaxed),
        ),
    ];
    if each.is_empty() {
        return;
    }
    for (name, kind, help, read) in families {
        let mut family = page.family(&format!("{prefix}_{name}"), kind, help);
        for (listener, stats) in each {
            family.sample(&[("listener", listener)], read(stats));
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// Certificate validity is wall-clock time by definition (this shell module, not the core).
#[allow(clippy::disallowed_methods)]
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Reads every certificate of a PEM file, the leaf first.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Parse {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file. A key others can
/// read is used, with a warning: refusing it would turn a permissions slip into an outage.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                key = %path.display(),
                mode = format!("{mode:o}"),
                "TLS private key readable by others: chmod 600 it"
            );
        }
    }
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::NoKey {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Expiry and roles of a DER certificate.
pub fn cert_info(cert: &CertificateDer<'_>) -> Result<CertInfo, String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| e.to_string())?;
    let not_after = parsed.validity().not_after.timestamp();
    let mut roles = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && let Some(role) = Role::from_uri(uri)
            {
                roles.push(role);
            }
        }
    }
    Ok(CertInfo { not_after, roles })
}

/// Loads a certificate chain and checks its leaf: it parses, has not expired, and carries
/// `role` if one is required.
fn load_leaf(
    path: &Path,
    role: Option<Role>,
) -> Result<(Vec<CertificateDer<'static>>, CertInfo), TlsError> {
    let certs = load_certs(path)?;
    let info = cert_info(&certs[0]).map_err(|reason| TlsError::Parse {
        path: path.to_owned(),
        reason,
    })?;
    if info.not_after <= unix_now() {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            not_after: info.not_after,
        });
    }
    if let Some(role) = role
        && !info.roles.contains(&role)
    {
        return Err(TlsError::MissingRole {
            path: path.to_owned(),
            role,
        });
    }
    Ok((certs, info))
}

/// Whether a leaf is valid for `host` (a DNS name or an IP address), as a peer would check.
fn check_host(path: &Path, leaf: &CertificateDer<'_>, host: &str) -> Result<(), TlsError> {
    let wrong = |reason: String| TlsError::WrongHost {
        path: path.to_owned(),
        host: host.to_owned(),
        reason,
    };
    let name = ServerName::try_from(host).map_err(|e| wrong(e.to_string()))?;
    let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| wrong(e.to_string()))?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|e| wrong(e.to_string()))
}

/// Warns when the chain would not verify under `ca` for `host`, as a peer trusting only
/// that CA would find at its first handshake.
fn warn_unless_chains(path: &Path, certs: &[CertificateDer<'static>], ca: &Path, host: &str) {
    let verdict = (|| {
        let roots = load_roots(ca).map_err(|e| e.to_string())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(
                &certs[0],
                &certs[1..],
                &name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    })();
    if let Err(reason) = verdict {
        tracing::warn!(
            certificate = %path.display(),
            ca = %ca.display(),
            %reason,
            "the certificate does not verify under --tls-ca: peers that trust only that CA will refuse it (fine if routes and servers use different CAs)"
        );
    }
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(TlsError::SystemRoots(format!(
            "none found ({}); name a CA file instead",
            errors.join("; ")
        )));
    }
    Ok(Arc::new(roots))
}

/// Whether a peer's certificate chain (leaf first) grants `role`.
fn leaf_has_role(chain: Option<&[CertificateDer<'_>]>, role: Role) -> bool {
    chain
        .and_then(|chain| chain.first())
        .and_then(|leaf| cert_info(leaf).ok())
        .is_some_and(|info| info.roles.contains(&role))
}

/// Seconds left before `not_after` when that is within [`EXPIRY_WARNING`] (or past).
fn expiring_within_warning(not_after: i64, now: i64) -> Option<i64> {
    let left = not_after - now;
    (left < EXPIRY_WARNING.as_secs() as i64).then_some(left)
}

fn warn_if_expiring(what: &str, path: &Path, not_after: i64) {
    if let Some(left) = expiring_within_warning(not_after, unix_now()) {
        tracing::warn!(
            certificate = %path.display(),
            what,
            days_left = left / 86_400,
            not_after,
            "TLS certificate expires soon: renew it and reload (SIGHUP)"
        );
    }
}

/// One listener's TLS settings.
#[derive(Debug, Clone)]
pub struct ServerTlsSettings {
    /// Names the listener in logs and metrics ("https", "gateway", "link").
    pub listener: &'static str,
    /// PEM certificate chain, the leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf.
    pub key: PathBuf,
    /// Require a client certificate signed by this CA and carrying this role (mutual TLS).
    pub client_auth: Option<(PathBuf, Role)>,
    /// The leaf must carry this role (a server's link certificate).
    pub own_role: Option<Role>,
    /// The leaf must be valid for this host name (a server's `--advertise-host`), so a
    /// certificate no client would accept is refused at load, not after.
    pub own_host: Option<String>,
    /// The CA peers are expected to trust: a leaf that does not chain to it is loaded with a
    /// warning (a deployment may use one CA for routes and another for servers, so this is
    /// not a refusal).
    pub peers_trust: Option<PathBuf>,
    /// Also take plaintext clients (a migration to TLS in progress; off by default).
    pub accept_plaintext: bool,
    /// Whether plaintext clients wait for the server to speak first (the link protocol):
    /// then a connection silent for a moment is taken for plaintext.
    pub server_speaks_first: bool,
    pub handshake_timeout: Duration,
}

impl ServerTlsSettings {
    pub fn new(listener: &'static str, cert: PathBuf, key: PathBuf) -> Self {
        Self {
            listener,
            cert,
            key,
            client_auth: None,
            own_role: None,
            own_host: None,
            peers_trust: None,
            accept_plaintext: false,
            server_speaks_first: false,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.cert.clone(), self.key.clone()];
        files.extend(self.client_auth.as_ref().map(|(ca, _)| ca.clone()));
        files
    }

    fn build(&self) -> Result<(Arc<rustls::ServerConfig>, CertInfo), TlsError> {
        let (certs, info) = load_leaf(&self.cert, self.own_role)?;
        if let Some(host) = &self.own_host {
            check_host(&self.cert, &certs[0], host)?;
        }
        if let (Some(ca), Some(host)) = (&self.peers_trust, &self.own_host) {
            warn_unless_chains(&self.cert, &certs, ca, host);
        }
        let key = load_key(&self.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| self.config_error(e))?;
        let builder = match &self.client_auth {
            Some((ca, _)) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(load_roots(ca)?, provider())
                        .build()
                        .map_err(|e| TlsError::BadCa {
                            path: ca.clone(),
                            reason: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Config {
                path: self.key.clone(),
                reason: format!(
                    "the key does not fit the certificate {}: {e}",
                    self.cert.display()
                ),
            })?;
        Ok((Arc::new(config), info))
    }

    fn config_error(&self, error: rustls::Error) -> TlsError {
        TlsError::Config {
            path: self.cert.clone(),
            reason: error.to_string(),
        }
    }
}

/// One listener's TLS: cheap to clone, shared by its connection tasks and the reloader.
#[derive(Debug, Clone)]
pub struct ServerTls {
    inner: Arc<ServerInner>,
}

#[derive(Debug)]
struct ServerInner {
    settings: ServerTlsSettings,
    config: RwLock<Arc<rustls::ServerConfig>>,
    stats: Arc<TlsStats>,
}

impl ServerTls {
    /// Loads the files; any problem is an error naming the file.
    pub fn load(settings: ServerTlsSettings) -> Result<Self, TlsError> {
        let (config, info) = settings.build()?;
        let stats = Arc::new(TlsStats::default());
        stats
            .cert_not_after
            .store(info.not_after, Ordering::Relaxed);
        warn_if_expiring(settings.listener, &settings.cert, info.not_after);
        Ok(Self {
            inner: Arc::new(ServerInner {
                settings,
                config: RwLock::new(config),
                stats,
            }),
        })
    }

    pub fn settings(&self) -> &ServerTlsSettings {
        &self.inner.settings
    }

    pub fn stats(&self) -> &Arc<TlsStats> {
        &self.inner.stats
    }

    /// Reads the files again; new handshakes use them if they are good. A bad file is logged
    /// and returned, and the configuration in use stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let settings = &self.inner.settings;
        match settings.build() {
            Ok((config, info)) => {
                *self.inner.config.write().unwrap_or_else(|e| e.into_inner()) = config;
                self.inner.stats.reloads.fetch_add(1, Ordering::Relaxed);
                self.inner
                    .stats
                    .cert_not_after
                    .store(info.not_after, Ordering::Relaxed);
                tracing::info!(
                    listener = settings.listener,
                    certificate = %settings.cert.display(),
                    not_after = info.not_after,
                    "TLS certificate reloaded; new handshakes use it"
                );
                warn_if_expiring(settings.listener, &settings.cert, info.not_after);
                Ok(())
            }
            Err(error) => {
                self.inner
                    .stats
                    .reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    listener = settings.listener,
                    %error,
                    "TLS reload refused; still using the previous certificate"
                );
                Err(error)
            }
        }
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.inner
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Turns an accepted socket into a stream: sniffs whether the client opens with a TLS
    /// handshake, completes it (checking the client's role where one is required), or takes
    /// plaintext if this listener still accepts it. All within the handshake timeout.
    pub async fn accept<S: Stream>(&self, stream: S) -> Result<MaybeTls<S>, AcceptError> {
        self.accept_telling_plaintext(stream, None).await
    }

    /// [`accept`](Self::accept), and a refused plaintext client is told `answer` before the
    /// close: the HTTPS listener answers an HTTP 400 naming `https://` (a frame port has
    /// nothing a plaintext peer would read).
    pub async fn accept_telling_plaintext<S: Stream>(
        &self,
        stream: S,
        answer: Option<&'static [u8]>,
    ) -> Result<MaybeTls<S>, AcceptError> {
        let settings = &self.inner.settings;
        let stats = &self.inner.stats;
        let outcome = match tokio::time::timeout(
            settings.handshake_timeout,
            self.accept_inner(stream, answer),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(AcceptError::Timeout(settings.handshake_timeout)),
        };
        let counter = match &outcome {
            Ok(MaybeTls::Plain(_)) => &stats.plaintext_accepted,
            Ok(_) => &stats.handshakes,
            Err(AcceptError::Timeout(_)) => &stats.handshake_timeouts,
            // A deadline of the layer below (the HTTP server's header timeout) ran out first.
            Err(AcceptError::Handshake(e)) if e.kind() == io::ErrorKind::TimedOut => {
                &stats.handshake_timeouts
            }
            Err(AcceptError::Plaintext(_)) => &stats.plaintext_refused,
            Err(_) => &stats.handshake_failures,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        outcome
    }

    async fn accept_inner<S: Stream>(
        &self,
        mut stream: S,
        plaintext_answer: Option<&'static [u8]>,
    ) -> Result<MaybeTls<S>, AcceptError> {
        let settings = &self.inner.settings;
        let silence = (settings.accept_plaintext && settings.server_speaks_first)
            .then_some(PLAINTEXT_SILENCE);
        let opening = match read_opening(&mut stream, silence)
            .await
            .map_err(AcceptError::Handshake)?
        {
            // Silent: a plaintext peer waiting for our hello.
            Opening::Silent => return Ok(MaybeTls::Plain(Rewind::new(&[], stream))),
            Opening::Closed => return Err(AcceptError::Closed),
            Opening::Seen(opening) => opening,
        };
        let seen = opening.bytes();
        if !opening.is_tls_hello() {
            if settings.accept_plaintext {
                return Ok(MaybeTls::Plain(Rewind::new(seen, stream)));
            }
            if let Some(answer) = plaintext_answer {
                let _ = stream.write_all(answer).await;
                let _ = stream.shutdown().await;
            }
            return Err(AcceptError::Plaintext(seen.to_vec()));
        }
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current());
        let tls = acceptor
            .accept(Rewind::new(seen, stream))
            .await
            .map_err(AcceptError::Handshake)?;
        if let Some((_, role)) = &settings.client_auth
            && !leaf_has_role(tls.get_ref().1.peer_certificates(), *role)
        {
            return Err(AcceptError::WrongRole(*role));
        }
        Ok(MaybeTls::Server(Box::new(tls)))
    }
}

/// How a connection opened: the bytes that tell a TLS client from a plaintext one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Nothing within the silence allowed: a plaintext peer waiting for the server to speak.
    Silent,
    /// Closed before sending anything.
    Closed,
    Seen(OpeningBytes),
}

/// The first one or two bytes a peer sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpeningBytes {
    bytes: [u8; 2],
    len: usize,
}

impl OpeningBytes {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Whether these bytes open a TLS handshake record: 0x16 (handshake), then 0x03 (the
    /// major version). A plaintext frame could start 0x16 (a 22-byte frame) but never
    /// continues 0x03 (no protobuf field is 0); an HTTP request starts with a letter.
    pub fn is_tls_hello(&self) -> bool {
        self.bytes() == crate::net::TLS_RECORD_START
    }
}

/// Reads a new connection's first bytes, as few as tell a TLS hello from anything else:
/// one that is not 0x16, or two. With `silence`, a peer that sends nothing for that long
/// is [`Opening::Silent`]. Put the bytes back in front with [`Rewind::new`].
pub async fn read_opening<S: AsyncRead + Unpin>(
    stream: &mut S,
    silence: Option<Duration>,
) -> io::Result<Opening> {
    let mut bytes = [0u8; 2];
    let mut len = 0;
    while len < bytes.len() {
        let read = stream.read(&mut bytes[len..]);
        let n = match silence {
            Some(silence) if len == 0 => match tokio::time::timeout(silence, read).await {
                Ok(n) => n?,
                Err(_) => return Ok(Opening::Silent),
            },
            _ => read.await?,
        };
        if n == 0 {
            return Ok(Opening::Closed);
        }
        len += n;
        if bytes[0] != 0x16 {
            break;
        }
    }
    Ok(Opening::Seen(OpeningBytes { bytes, len }))
}

/// One dialer's TLS settings.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsSettings {
    /// The CA that signs the servers' certificates; `None` trusts the system's roots.
    pub ca: Option<PathBuf>,
    /// A certificate and key to present (mutual TLS on the internal links).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The role the identity must carry.
    pub own_role: Option<Role>,
    /// The role the server's certificate must carry.
    pub server_role: Option<Role>,
}

impl ClientTlsSettings {
    fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self.ca.iter().cloned().collect();
        if let Some((cert, key)) = &self.identity {
            files.push(cert.clone());
            files.push(key.clone());
        }
        files
    }

    fn build(&self) -> Result<(Arc<rustls::ClientConfig>, Option<CertInfo>), TlsError> {
        let roots = match &self.ca {
            Some(ca) => load_roots(ca)?,
            None => system_roots()?,
        };
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::BadCa {
                path: self.ca.clone().unwrap_or_default(),
                reason: e.to_string(),
            })?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config {
                path: PathBuf::new(),
                reason: e.to_string(),
            })?
            .with_webpki_verifier(verifier);
        let (config, info) = match &self.identity {
            Some((cert, key)) => {
                let (certs, info) = load_leaf(cert, self.own_role)?;
                let key_der = load_key(key)?;
                let config = builder.with_client_auth_cert(certs, key_der).map_err(|e| {
                    TlsError::Config {
                        path: key.clone(),
                        reason: format!(
                            "the key does not fit the certificate {}: {e}",
                            cert.display()
                        ),
                    }
                })?;
                (config, Some(info))
            }
            None => (builder.with_no_client_auth(), None),
        };
        Ok((Arc::new(config), info))
    }
}

/// One dialer's TLS: cheap to clone.
#[derive(Debug, Clone)]
pub struct ClientTls {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    settings: ClientTlsSettings,
    config: RwLock<Arc<rustls::ClientConfig>>,
    stats: Arc<TlsStats>,
}

impl ClientTls {
    pub fn load(settings: ClientTlsSettings) -> Result<Self, TlsError> {
        let (config, info) = settings.build()?;
        let stats = Arc::new(TlsStats::default());
        if let (Some(info), Some((cert, _))) = (&info, &settings.identity) {
            stats
                .cert_not_after
                .store(info.not_after, Ordering::Relaxed);
            warn_if_expiring("client identity", cert, info.not_after);
        }
        Ok(Self {
            inner: Arc::new(ClientInner {
                settings,
                config: RwLock::new(config),
                stats,
            }),
        })
    }

    pub fn stats(&self) -> &Arc<TlsStats> {
        &self.inner.stats
    }

    /// Reads the files again; new dials use them if they are good, else the old stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        match self.inner.settings.build() {
            Ok((config, info)) => {
                *self.inner.config.write().unwrap_or_else(|e| e.into_inner()) = config;
                self.inner.stats.reloads.fetch_add(1, Ordering::Relaxed);
                if let (Some(info), Some((cert, _))) = (&info, &self.inner.settings.identity) {
                    self.inner
                        .stats
                        .cert_not_after
                        .store(info.not_after, Ordering::Relaxed);
                    warn_if_expiring("client identity", cert, info.not_after);
                }
                tracing::info!("TLS client configuration reloaded; new connections use it");
                Ok(())
            }
            Err(error) => {
                self.inner
                    .stats
                    .reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "TLS reload refused; still using the previous configuration");
                Err(error)
            }
        }
    }

    /// Runs the client handshake over a connected stream, verifying the server's
    /// certificate for `host` (a DNS name or an IP address) and its role if one is required.
    pub async fn connect<S: Stream>(
        &self,
        stream: S,
        host: &str,
    ) -> Result<MaybeTls<S>, ConnectError> {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| ConnectError::BadName {
            host: host.to_owned(),
        })?;
        let config = self
            .inner
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let connector = tokio_rustls::TlsConnector::from(config);
        let stats = &self.inner.stats;
        let tls = match connector.connect(name, stream).await {
            Ok(tls) => tls,
            Err(error) => {
                stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
                let host = host.to_owned();
                let reason = error.to_string();
                return Err(if answered_in_plaintext(&error) {
                    ConnectError::NotTls { host }
                } else if let Some(plain) = certificate_problem(&error) {
                    ConnectError::Certificate {
                        host,
                        reason,
                        plain,
                    }
                } else {
                    ConnectError::Handshake { host, reason }
                });
            }
        };
        if let Some(role) = self.inner.settings.server_role
            && !leaf_has_role(tls.get_ref().1.peer_certificates(), role)
        {
            stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
            return Err(ConnectError::WrongRole {
                host: host.to_owned(),
                role,
            });
        }
        stats.handshakes.fetch_add(1, Ordering::Relaxed);
        Ok(MaybeTls::Client(Box::new(tls)))
    }
}

/// A handshake whose answer was no TLS record (e.g. `HTTP/1.1 400`: an http:// server).
fn answered_in_plaintext(error: &io::Error) -> bool {
    matches!(
        error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType
        ))
    )
}

/// A handshake that failed on the peer's certificate, in words for a chat user (`None` for
/// anything else).
fn certificate_problem(error: &io::Error) -> Option<String> {
    use rustls::CertificateError as C;
    let rustls::Error::InvalidCertificate(problem) =
        error.get_ref()?.downcast_ref::<rustls::Error>()?
    else {
        return None;
    };
    Some(match problem {
        C::UnknownIssuer => {
            "it is not signed by a trusted CA (unknown issuer; pass the CA with --ca)".to_owned()
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "it is not valid for this host name".to_owned()
        }
        C::Expired | C::ExpiredContext { .. } => "it has expired".to_owned(),
        C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet".to_owned(),
        C::Revoked => "it has been revoked".to_owned(),
        C::BadSignature => {
            "its signature does not verify (signed by another CA of the same name?)".to_owned()
        }
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "it is not a server certificate".to_owned()
        }
        other => format!("{other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_warning_starts_21_days_before() {
        let day = 86_400;
        let now = 1_000 * day;
        for (not_after, warned) in [
            (now + 60 * day, false),
            (now + 21 * day, false),
            (now + 21 * day - 1, true),
            (now + day, true),
            (now - day, true),
        ] {
            assert_eq!(
                expiring_within_warning(not_after, now).is_some(),
                warned,
                "{} days left",
                (not_after - now) / day
            );
        }
    }

    #[test]
    fn roles_are_read_from_the_leaf_only() {
        let ca = dev::DevCa::new("role test").unwrap();
        let der = |role| {
            let pem = ca.issue(&dev::LeafSpec::new(&["h"], role)).unwrap().cert;
            CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
        };
        let route = der(Some(Role::Route));
        let bare = der(None);
        assert!(leaf_has_role(
            Some(std::slice::from_ref(&route)),
            Role::Route
        ));
        assert!(!leaf_has_role(
            Some(std::slice::from_ref(&route)),
            Role::Server
        ));
        // A route certificate further down the chain grants nothing.
        assert!(!leaf_has_role(Some(&[bare.clone(), route]), Role::Route));
        assert!(!leaf_has_role(Some(&[bare]), Role::Route));
        assert!(!leaf_has_role(None, Role::Route));
    }
}
