//! The ZooKeeper registry.
//!
//! Layout: a persistent root (created like `mkdir -p` if absent); under it one EPHEMERAL node
//! per live server, named by its id, holding the `LiveServer` fields as JSON.
//!
//! Each [`Registration`] owns one session, served by a *keeper* task that drives core's
//! `RegistryKeeper` (the same machine the simulated registry runs; every decision below is
//! its, the task only feeds it the client's session states and runs its operations):
//! - the session's state drives [`SessionHealth`]: `Disconnected{since}` when the connection
//!   drops, back to `Connected` if it comes back within the session; `Expired` when ZooKeeper
//!   says so, or — since a partitioned client cannot hear that — once it has been
//!   disconnected for half a session timeout (with the client's 2/5 connection timeout before
//!   it noticed, about 0.9 session timeouts of silence: just before the ensemble expires the
//!   session and routes drop the node, so the server fences first);
//! - after a lost session the keeper opens a new session (retrying with capped backoff) and
//!   creates the node again with the latest data. A node still held by one of this
//!   registration's *previous* sessions (declared lost locally while the ensemble still had
//!   it) is deleted and replaced; a node held by anyone else is waited out for a session
//!   timeout, then reported as `AlreadyRegistered`;
//! - the listing wish (`Registration::set_listed`) is a shared flag the keeper reads when it
//!   serves `set_listed`; the node is reconciled with the registration on `set_listed`, after
//!   every reconnect, at the start of a new session when something changed while it was set
//!   up, and on a retry timer (capped backoff) after a failed operation while connected.
//!   Listed: the node must exist in the current session with the latest data (created
//!   through `create_node`, so stale nodes are handled as above). Unlisted: no node of this
//!   registration's sessions may exist (one found is deleted; a node held by someone else is
//!   left alone); the session itself is kept and health is unaffected;
//! - dropping the `Registration` closes the command channel; the keeper drops the client,
//!   which closes the session, which deletes the node.
//!
//! Each [`RegistryView`] owns one more session, served by a *viewer* task: a child watch on
//! the root and a data watch per server node, each re-armed when it fires; after a reconnect
//! or a new session everything is listed again. It stops when every receiver is dropped.
//!
//! Every ZooKeeper call is bounded by `op_timeout`, every connect by the session timeout plus
//! `op_timeout`.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cim_core::ids::ServerId;
use cim_core::registry::LiveServer;
use cim_core::registry_keeper::{KeeperConfig, OpError as KeeperOpError, Session, SessionId};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use zookeeper_client as zk;

use crate::tls::{ClientTls, ClientTlsSettings};

use super::keeper::{Cmd, Effect, Shell, now};
use super::{
    DEFAULT_ROOT, Registration, Registry, RegistryError, RegistryView, ServerMap, SessionHealth,
    decode_node, encode_node, validate_server_id,
};

/// Where the ensemble is and how to talk to it.
#[derive(Debug, Clone)]
pub struct ZkConfig {
    /// `host:port[,host:port...]`, the ensemble.
    pub connect: String,
    /// Persistent node the server nodes live under.
    pub root: String,
    /// Requested session timeout (the ensemble may clamp it to its min/max).
    pub session_timeout: Duration,
    /// Bound on every single ZooKeeper call.
    pub op_timeout: Duration,
    /// Digest identity every session authenticates as. With it, the nodes this registry
    /// creates (the root path and the servers' nodes) are writable by that identity only and
    /// readable by anyone; without it, by anyone (ZooKeeper's `world:anyone`).
    pub auth: Option<ZkAuth>,
    /// TLS to the ensemble's `secureClientPort` (`--zk-ca`). With it every endpoint of
    /// `connect` without a scheme speaks TLS (`tcp://host:port` still forces plaintext).
    pub tls: Option<ZkTls>,
}

/// TLS settings for ZooKeeper: the CA its certificates must chain to and, for an ensemble
/// with `ssl.clientAuth=need`, a client certificate. Host names are checked: each endpoint's
/// host must be a name (or IP address) of its certificate. Its `Debug` hides the key.
#[derive(Clone)]
pub struct ZkTls {
    /// Boxed: it is large, and every `ZkConfig` carries the option.
    options: Box<zk::TlsOptions>,
    /// The same trust and identity in CIM's own dialer, to name the reason when a connect
    /// fails (see [`ZkTls::diagnose`]).
    probe: ClientTls,
    ca_path: String,
    with_client_cert: bool,
}

impl ZkTls {
    /// Reads and checks the PEM files now, so a bad file stops the start with its name.
    pub fn from_files(
        ca: &std::path::Path,
        client_cert: Option<&std::path::Path>,
        client_key: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
        };
        let identity = match (client_cert, client_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                return Err(
                    "--zk-client-cert and --zk-client-key go together: give both or neither".into(),
                );
            }
        };
        let mut options = zk::TlsOptions::new()
            .with_pem_ca(&read(ca, "--zk-ca")?)
            .map_err(|e| format!("--zk-ca {}: {e}", ca.display()))?;
        if let Some((cert, key)) = identity {
            options = options
                .with_pem_identity(
                    &read(cert, "--zk-client-cert")?,
                    &read(key, "--zk-client-key")?,
                )
                .map_err(|e| {
                    format!(
                        "--zk-client-cert {} / --zk-client-key {}: {e}",
                        cert.display(),
                        key.display()
                    )
                })?;
        }
        let probe = ClientTls::load(ClientTlsSettings {
            ca: Some(ca.to_path_buf()),
            identity: identity.map(|(cert, key)| (cert.to_path_buf(), key.to_path_buf())),
            own_role: None,
            server_role: None,
        })
        .map_err(|e| format!("--zk-ca / --zk-client-cert: {e}"))?;
        Ok(Self {
            options: Box::new(options),
            probe,
            ca_path: ca.display().to_string(),
            with_client_cert: identity.is_some(),
        })
    }

    /// Why TLS to the ensemble `connect` fails, if a handshake with one of its TLS endpoints
    /// fails: zookeeper-client retries a failed handshake until its connect times out and
    /// reports only the timeout, which sends an operator looking at the network instead of
    /// at the certificates.
    async fn diagnose(&self, connect: &str) -> Option<String> {
        const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
        for (host, port) in tls_endpoints(connect) {
            let Ok(Ok(stream)) = tokio::time::timeout(
                PROBE_TIMEOUT,
                tokio::net::TcpStream::connect((host.as_str(), port)),
            )
            .await
            else {
                continue;
            };
            if let Ok(Err(error)) =
                tokio::time::timeout(PROBE_TIMEOUT, self.probe.connect(stream, &host)).await
            {
                return Some(format!(
                    "{error} (port {port}, trusting --zk-ca {})",
                    self.ca_path
                ));
            }
        }
        None
    }
}

/// The `(host, port)` of each endpoint of a ZooKeeper connect string that speaks TLS when
/// TLS is configured: all but those marked `tcp://`; the port defaults to 2181.
fn tls_endpoints(connect: &str) -> Vec<(String, u16)> {
    connect
        .split(',')
        .filter(|endpoint| !endpoint.starts_with("tcp://"))
        .filter_map(|endpoint| {
            let endpoint = endpoint.strip_prefix("tcp+tls://").unwrap_or(endpoint);
            // A chroot path follows the last endpoint.
            let endpoint = endpoint.split('/').next().unwrap_or(endpoint);
            let (host, port) = match endpoint.rsplit_once(':') {
                Some((host, port)) if !host.ends_with(':') => (host, port.parse().ok()?),
                _ => (endpoint, 2181),
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            (!host.is_empty()).then(|| (host.to_owned(), port))
        })
        .collect()
}

impl std::fmt::Debug for ZkTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkTls")
            .field("ca", &self.ca_path)
            .field("with_client_cert", &self.with_client_cert)
            .finish_non_exhaustive()
    }
}

/// A ZooKeeper digest identity, `user:password` (`--zk-auth`). Its `Debug` hides the
/// password.
#[derive(Clone, PartialEq, Eq)]
pub struct ZkAuth {
    user: String,
    password: String,
}

impl ZkAuth {
    /// Parses `user:password`; neither part may be empty.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text.split_once(':') {
            Some((user, password)) if !user.is_empty() && !password.is_empty() => Ok(Self {
                user: user.to_owned(),
                password: password.to_owned(),
            }),
            // The text itself is not repeated: it may be a password.
            _ => Err("--zk-auth must be <user>:<password>, both non-empty".into()),
        }
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    /// The bytes of ZooKeeper's `digest` scheme.
    fn digest(&self) -> Vec<u8> {
        format!("{}:{}", self.user, self.password).into_bytes()
    }
}

impl std::fmt::Debug for ZkAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkAuth")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// The ACL of every node created with `auth`: all rights to the identities of the creating
/// session (`auth` scheme: here the one digest identity every CIM process shares), read to
/// anyone, so a route without credentials can still list the servers but nobody else can
/// create, overwrite or delete a server's node.
static CREATOR_ALL_ANYONE_READ: [zk::Acl; 2] = [
    zk::Acl::new_const(zk::Permission::ALL, "auth", ""),
    zk::Acl::new_const(zk::Permission::READ, "world", "anyone"),
];

impl ZkConfig {
    pub fn new(connect: impl Into<String>) -> Self {
        Self {
            connect: connect.into(),
            root: DEFAULT_ROOT.to_owned(),
            session_timeout: Duration::from_secs(6),
            op_timeout: Duration::from_secs(5),
            auth: None,
            tls: None,
        }
    }

    pub fn with_tls(mut self, tls: Option<ZkTls>) -> Self {
        self.tls = tls;
        self
    }

    pub fn with_auth(mut self, auth: Option<ZkAuth>) -> Self {
        self.auth = auth;
        self
    }

    /// The ACL for the nodes this registry creates.
    fn acls(&self) -> zk::Acls<'static> {
        match self.auth {
            Some(_) => zk::Acls::new(&CREATOR_ALL_ANYONE_READ),
            None => zk::Acls::anyone_all(),
        }
    }

    pub fn with_root(mut self, root: impl Into<String>) -> Self {
        self.root = root.into();
        self
    }

    pub fn with_session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    pub fn with_op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    fn node_path(&self, id: &str) -> String {
        format!("{}/{}", self.root, id)
    }
}

/// The ZooKeeper backend. Cheap to clone; it opens a session per registration and per view.
#[derive(Debug, Clone)]
pub struct ZkRegistry {
    config: Arc<ZkConfig>,
}

impl ZkRegistry {
    /// Checks the configuration; connects only when registering or watching.
    pub fn new(config: ZkConfig) -> Result<Self, RegistryError> {
        let root = config.root.as_str();
        let bad = !root.starts_with('/')
            || root.len() < 2
            || root.ends_with('/')
            || root[1..]
                .split('/')
                .any(|seg| seg.is_empty() || seg == "." || seg == "..")
            || root.chars().any(char::is_control);
        if bad {
            return Err(RegistryError::InvalidRoot(config.root));
        }
        Ok(Self {
            config: Arc::new(config),
        })
    }

    pub fn config(&self) -> &ZkConfig {
        &self.config
    }
}

impl Registry for ZkRegistry {
    async fn register(&self, server: LiveServer) -> Result<Registration, RegistryError> {
        validate_server_id(&server.id)?;
        let cfg = self.config.clone();
        let client = establish(&cfg, &server, &[], true).await?;
        let id = server.id.clone();
        tracing::info!(server = %id, session = %client.session_id(), "registered in zookeeper");
        let (shell, parts) = Shell::new(KeeperConfig::default(), server, session_of(&client));
        let keeper = Keeper {
            cfg,
            shell,
            pending: None,
        };
        tokio::spawn(keeper.run(client));
        Ok(Registration::from_keeper(id, parts))
    }

    async fn watch(&self) -> Result<RegistryView, RegistryError> {
        let cfg = self.config.clone();
        let client = connect(&cfg).await?;
        ensure_root(&client, &cfg).await?;
        let (servers_tx, servers_rx) = watch::channel(ServerMap::new());
        let (health_tx, health_rx) = watch::channel(SessionHealth::Connected);
        let mut viewer = Viewer {
            cfg,
            servers: servers_tx,
            health: health_tx,
            children: None,
            data_watches: JoinSet::new(),
            nodes: BTreeMap::new(),
            next_gen: 0,
            complete: false,
        };
        // The first listing happens before returning, so the view is current from the start.
        viewer.resync(&client).await?;
        tokio::spawn(viewer.run(client));
        Ok(RegistryView {
            servers: servers_rx,
            health: health_rx,
        })
    }
}

fn zk_err(op: &'static str) -> impl FnOnce(zk::Error) -> RegistryError {
    move |source| RegistryError::ZooKeeper { op, source }
}

/// Runs one ZooKeeper call under a deadline.
async fn timed<T>(
    op: &'static str,
    after: Duration,
    fut: impl Future<Output = Result<T, zk::Error>>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(after, fut).await {
        Ok(result) => result.map_err(zk_err(op)),
        Err(_) => Err(RegistryError::Timeout { op, after }),
    }
}

fn is_zk(err: &RegistryError, want: &zk::Error) -> bool {
    matches!(err, RegistryError::ZooKeeper { source, .. } if source == want)
}

async fn connect(cfg: &ZkConfig) -> Result<zk::Client, RegistryError> {
    let after = cfg.session_timeout + cfg.op_timeout;
    let mut connector = zk::Client::connector().with_session_timeout(cfg.session_timeout);
    if let Some(auth) = &cfg.auth {
        // Sent at every (re)connect of the session. Digest auth never fails by itself: a
        // wrong password is just another identity, refused by the nodes' ACLs (`NoAuth`).
        connector = connector.with_auth("digest", &auth.digest());
    }
    match &cfg.tls {
        Some(tls) => {
            // The `tls` feature of zookeeper-client brings rustls' aws-lc provider next to
            // the ring one the rest of CIM uses; with two, its `ClientConfig::builder()` needs
            // a process default.
            crate::tls::install_default_crypto_provider();
            connector = connector.with_tls((*tls.options).clone());
            match timed("connect", after, connector.secure_connect(&cfg.connect)).await {
                Err(error) => match tls.diagnose(&cfg.connect).await {
                    Some(reason) => Err(RegistryError::Tls(reason)),
                    None => Err(error),
                },
                connected => connected,
            }
        }
        None => timed("connect", after, connector.connect(&cfg.connect)).await,
    }
}

/// Creates the root like `mkdir -p`, with [`ZkConfig::acls`] on every node it creates. With
/// `auth`, warns when an existing root is writable by anyone (created before auth was on, or
/// by a process without it), since then anyone could list a fake server.
async fn ensure_root(client: &zk::Client, cfg: &ZkConfig) -> Result<(), RegistryError> {
    // Only when missing: creating a node that exists needs CREATE on its parent before
    // ZooKeeper says it exists, which a reader without `--zk-auth` lacks under the
    // restricted ACL.
    if timed("stat root", cfg.op_timeout, client.check_stat(&cfg.root))
        .await?
        .is_none()
    {
        let options = zk::CreateMode::Persistent.with_acls(cfg.acls());
        timed(
            "mkdir root",
            cfg.op_timeout,
            client.mkdir(&cfg.root, &options),
        )
        .await?;
    }
    if cfg.auth.is_some() {
        let (acls, _) = timed("get root acl", cfg.op_timeout, client.get_acl(&cfg.root)).await?;
        let open = zk::Permission::CREATE | zk::Permission::WRITE | zk::Permission::DELETE;
        let world_writable = acls.iter().any(|acl| {
            acl.scheme() == "world" && (acl.permission() & open) != zk::Permission::NONE
        });
        if world_writable {
            tracing::warn!(root = %cfg.root,
                "--zk-auth is set but the registry root is writable by anyone (it was created \
                 without auth): anyone can add or delete server nodes under it; restrict it \
                 with zkCli `setAcl` (see deploy/README.md)");
        }
    }
    Ok(())
}

/// A new session with the server's node in place if `listed`, and without a node of this
/// registration's previous sessions otherwise.
async fn establish(
    cfg: &ZkConfig,
    server: &LiveServer,
    previous_sessions: &[i64],
    listed: bool,
) -> Result<zk::Client, RegistryError> {
    let client = connect(cfg).await?;
    ensure_root(&client, cfg).await?;
    if listed {
        create_node(&client, cfg, server, previous_sessions).await?;
    } else {
        let path = cfg.node_path(server.id.as_str());
        delete_own_node(&client, cfg, &path, previous_sessions).await?;
    }
    Ok(client)
}

/// Deletes the node at `path` if `client`'s session or one of `previous_sessions` holds it.
/// A node held by anyone else (another server given the same id) is not ours to delete.
async fn delete_own_node(
    client: &zk::Client,
    cfg: &ZkConfig,
    path: &str,
    previous_sessions: &[i64],
) -> Result<(), RegistryError> {
    let stat = timed("stat node", cfg.op_timeout, client.check_stat(path)).await?;
    let Some(stat) = stat else { return Ok(()) };
    let owner = stat.ephemeral_owner;
    if owner != client.session_id().0 && !previous_sessions.contains(&owner) {
        tracing::warn!(node = %path, "leaving a registry node held by another session");
        return Ok(());
    }
    let deleted = timed(
        "delete node",
        cfg.op_timeout,
        client.delete(path, Some(stat.version)),
    )
    .await;
    match deleted {
        Err(e) if is_zk(&e, &zk::Error::NoNode) => Ok(()),
        other => other,
    }
}

/// Creates the server's ephemeral node in `client`'s session.
async fn create_node(
    client: &zk::Client,
    cfg: &ZkConfig,
    server: &LiveServer,
    previous_sessions: &[i64],
) -> Result<(), RegistryError> {
    let path = cfg.node_path(server.id.as_str());
    let data = encode_node(server)?;
    let options = zk::CreateMode::Ephemeral.with_acls(cfg.acls());
    // A node left by a crashed predecessor lives until the ensemble expires its session.
    let give_up = Instant::now() + client.session_timeout() + cfg.op_timeout;
    loop {
        let created = timed(
            "create node",
            cfg.op_timeout,
            client.create(&path, &data, &options),
        )
        .await;
        match created {
            Ok(_) => return Ok(()),
            Err(e) if is_zk(&e, &zk::Error::NodeExists) => {}
            Err(e) => return Err(e),
        }
        let stat = timed("stat node", cfg.op_timeout, client.check_stat(&path)).await?;
        let Some(stat) = stat else { continue };
        if stat.ephemeral_owner == client.session_id().0 {
            // Ours already (a create retried across a connection loss): make the data current.
            timed(
                "set node data",
                cfg.op_timeout,
                client.set_data(&path, &data, None),
            )
            .await?;
            return Ok(());
        }
        if previous_sessions.contains(&stat.ephemeral_owner) {
            tracing::info!(node = %path, "replacing the node of this server's previous session");
            match timed(
                "delete stale node",
                cfg.op_timeout,
                client.delete(&path, Some(stat.version)),
            )
            .await
            {
                Ok(()) => {}
                Err(e) if is_zk(&e, &zk::Error::NoNode) || is_zk(&e, &zk::Error::BadVersion) => {}
                Err(e) => return Err(e),
            }
            continue;
        }
        if Instant::now() >= give_up {
            return Err(RegistryError::AlreadyRegistered(server.id.clone()));
        }
        tracing::debug!(node = %path, "node held by another session; waiting for it to expire");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Serves one registration across sessions: ZooKeeper's transport for a
/// [`cim_core::registry_keeper::RegistryKeeper`] (in [`Shell`]), which decides everything
/// else. The client library resumes a session on new connections by itself and reports its
/// state; this feeds those reports to the machine and runs the operations it asks for.
struct Keeper {
    cfg: Arc<ZkConfig>,
    shell: Shell,
    /// An effect taken from the machine while waiting, for the run loop to carry out.
    pending: Option<Effect>,
}

fn session_of(client: &zk::Client) -> Session {
    Session {
        // ZooKeeper's session ids are 64 bits; the machine only compares them.
        id: client.session_id().0 as u64,
        timeout: client.session_timeout(),
    }
}

fn zk_sessions(ids: &[SessionId]) -> Vec<i64> {
    ids.iter().map(|&id| id as i64).collect()
}

fn warn_failed(server: &ServerId, result: &Result<(), RegistryError>, what: &'static str) {
    if let Err(error) = result {
        tracing::warn!(server = %server, %error, "{what}");
    }
}

impl Keeper {
    async fn run(mut self, client: zk::Client) {
        let mut states = client.state_watcher();
        let mut client = Some(client);
        loop {
            let mut establish = None;
            while let Some(effect) = self.pending.take().or_else(|| self.shell.next_effect()) {
                let id = self.shell.machine.server().id.clone();
                let previous = zk_sessions(self.shell.machine.previous_sessions());
                let result = match (effect, client.as_ref()) {
                    (
                        Effect::Establish {
                            server,
                            listed,
                            previous,
                        },
                        _,
                    ) => {
                        establish = Some((server, listed, previous));
                        continue;
                    }
                    (Effect::SessionLost { session }, _) => {
                        // Dropping the old client closes that session if it is somehow still
                        // alive.
                        tracing::debug!(server = %id, session, "dropping the lost registry session");
                        client = None;
                        continue;
                    }
                    (Effect::Stop { .. }, _) => return,
                    (
                        Effect::Reconcile {
                            server,
                            listed,
                            stale,
                        },
                        Some(c),
                    ) => {
                        let result =
                            reconcile(c, &self.cfg, &server, listed, stale, &previous).await;
                        warn_failed(&id, &result, "could not bring the registry node up to date");
                        result
                    }
                    (Effect::Publish { server }, Some(c)) => publish(c, &self.cfg, &server).await,
                    (Effect::Leave, Some(c)) => {
                        let path = self.cfg.node_path(id.as_str());
                        delete_own_node(c, &self.cfg, &path, &previous).await
                    }
                    (_, None) => {
                        debug_assert!(false, "a registry operation without a session");
                        Err(RegistryError::NotConnected)
                    }
                };
                self.shell
                    .machine
                    .handle_op_done(now(), result.map_err(KeeperOpError::Failed));
            }
            if let Some(attempt) = establish {
                if let Some(c) = self.reestablish(attempt).await {
                    states = c.state_watcher();
                    client = Some(c);
                }
                continue;
            }
            let reason = self.shell.machine.poll_timeout().map(|(_, why)| why);
            let timer = self.shell.machine.poll_timeout().map(|(at, _)| at);
            let timer = async move {
                match timer {
                    Some(at) => tokio::time::sleep_until(crate::clock::tokio_instant(at)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                state = states.changed() => match state {
                    zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                        self.shell.machine.handle_reconnected(now());
                    }
                    zk::SessionState::Disconnected => self.shell.machine.handle_disconnected(now()),
                    zk::SessionState::Expired
                    | zk::SessionState::Closed
                    | zk::SessionState::AuthFailed => {
                        tracing::warn!(server = %self.shell.machine.server().id, %state, "registry session ended");
                        self.shell.machine.handle_session_expired(now());
                    }
                },
                // Disconnected too long: the ensemble has expired the session by now, we just
                // cannot hear it. Or: time to repair the node after a failed operation.
                () = timer => {
                    tracing::trace!(server = %self.shell.machine.server().id, ?reason, "registry timer");
                    self.shell.machine.handle_timeout(now());
                }
                cmd = self.shell.cmds.recv() => self.shell.feed(cmd),
            }
        }
    }

    /// Feeds a command; `true` if the machine now wants something of the transport (the run
    /// loop carries it out).
    fn command(&mut self, cmd: Option<Cmd>) -> bool {
        self.shell.feed(cmd);
        self.pending = self.shell.next_effect();
        self.pending.is_some()
    }

    /// Runs the machine's attempts at a new session until one is set up (`Some`) or the
    /// machine wants something else (`None`: the run loop carries it out).
    async fn reestablish(
        &mut self,
        (mut server, mut listed, mut previous): (LiveServer, bool, Vec<SessionId>),
    ) -> Option<zk::Client> {
        loop {
            let outcome = {
                let previous = zk_sessions(&previous);
                let cfg = self.cfg.clone();
                let attempt = establish(&cfg, &server, &previous, listed);
                tokio::pin!(attempt);
                loop {
                    tokio::select! {
                        biased;
                        cmd = self.shell.cmds.recv() => {
                            if self.command(cmd) {
                                return None;
                            }
                        }
                        result = &mut attempt => break result,
                    }
                }
            };
            let (retry_at, _) = match outcome {
                Ok(client) => {
                    self.shell
                        .machine
                        .handle_established(now(), Ok(session_of(&client)));
                    tracing::info!(server = %server.id, session = %client.session_id(),
                        listed = self.shell.machine.is_listed(), "registry session re-established");
                    return Some(client);
                }
                Err(error) => {
                    tracing::warn!(server = %server.id, %error,
                        "could not set up a new registry session");
                    self.shell.machine.handle_established(now(), Err(error));
                    self.shell.machine.poll_timeout()?
                }
            };
            let pause = tokio::time::sleep_until(crate::clock::tokio_instant(retry_at));
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    biased;
                    cmd = self.shell.cmds.recv() => {
                        if self.command(cmd) {
                            return None;
                        }
                    }
                    () = &mut pause => break,
                }
            }
            self.shell.machine.handle_timeout(now());
            match self.shell.next_effect() {
                Some(Effect::Establish {
                    server: s,
                    listed: l,
                    previous: p,
                }) => (server, listed, previous) = (s, l, p),
                other => {
                    self.pending = other;
                    return None;
                }
            }
        }
    }
}

/// Writes the latest data to the node.
async fn publish(
    client: &zk::Client,
    cfg: &ZkConfig,
    server: &LiveServer,
) -> Result<(), RegistryError> {
    let data = encode_node(server)?;
    timed(
        "set node data",
        cfg.op_timeout,
        client.set_data(&cfg.node_path(server.id.as_str()), &data, None),
    )
    .await?;
    Ok(())
}

/// Makes the registry match the registration in this session. Listed: the node exists in
/// this session with the latest data (`stale`: rewrite it). Unlisted: no node of this
/// registration's sessions.
async fn reconcile(
    client: &zk::Client,
    cfg: &ZkConfig,
    server: &LiveServer,
    listed: bool,
    stale: bool,
    previous_sessions: &[i64],
) -> Result<(), RegistryError> {
    let path = cfg.node_path(server.id.as_str());
    if !listed {
        return delete_own_node(client, cfg, &path, previous_sessions).await;
    }
    let stat = timed("stat node", cfg.op_timeout, client.check_stat(&path)).await?;
    match stat {
        Some(stat) if stat.ephemeral_owner == client.session_id().0 => {
            if stale {
                publish(client, cfg, server).await?;
            }
        }
        stat => {
            if stat.is_none() && !stale {
                tracing::warn!(node = %path,
                    "registry node vanished within the session; recreating");
            }
            // Also when another session holds it: `create_node` replaces a node of our
            // previous sessions and waits out anyone else's.
            create_node(client, cfg, server, previous_sessions).await?;
        }
    }
    Ok(())
}

type WatchFuture = Pin<Box<dyn Future<Output = zk::WatchedEvent> + Send>>;

struct NodeEntry {
    /// Tells this node's current data watch from older ones still in the join set.
    generation: u64,
    watch: AbortHandle,
    /// `None` when the node's data did not decode (kept so a later fix is seen).
    server: Option<LiveServer>,
}

/// Keeps one view current across sessions.
struct Viewer {
    cfg: Arc<ZkConfig>,
    servers: watch::Sender<ServerMap>,
    health: watch::Sender<SessionHealth>,
    children: Option<WatchFuture>,
    data_watches: JoinSet<(String, u64, zk::WatchedEvent)>,
    nodes: BTreeMap<String, NodeEntry>,
    next_gen: u64,
    /// Whether `nodes` holds a whole listing. Cleared when everything is listed again
    /// (after a reconnect or a failed step), set when a listing succeeds: until then the
    /// view keeps showing the last whole listing. Publishing the half-built one would tell
    /// the route that servers left when only a call failed (an election closes connections
    /// while a view lists again), and the route would act on it: close links, release held
    /// takeovers.
    complete: bool,
}

impl Viewer {
    async fn run(mut self, mut client: zk::Client) {
        let mut states = client.state_watcher();
        let mut was_disconnected = false;
        // When a disconnection that has not ended counts as the session lost (see below).
        let mut lost_at: Option<Instant> = None;
        // Set when a call failed: the view may have missed something, so list everything again.
        let mut retry_at: Option<Instant> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let retry_timer = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let lost_timer = async {
                match lost_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let children_fired = async {
                match self.children.as_mut() {
                    Some(fut) => fut.await,
                    None => std::future::pending().await,
                }
            };
            let step: Result<(), RegistryError> = tokio::select! {
                biased;
                () = self.servers.closed() => return,
                state = states.changed() => match state {
                    zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                        lost_at = None;
                        // Listed first, then `Connected`: a route that stopped placing logins
                        // while the view was lost starts again on the current listing.
                        let listed = if std::mem::take(&mut was_disconnected) {
                            self.resync(&client).await
                        } else {
                            Ok(())
                        };
                        self.health.send_replace(SessionHealth::Connected);
                        listed
                    }
                    zk::SessionState::Disconnected => {
                        was_disconnected = true;
                        let since = Instant::now();
                        // The registrations' keepers call their sessions lost after half a
                        // session timeout without the ensemble (and their servers fence): a
                        // view cut off as long is as blind, and says so, so that its route
                        // stops placing logins on servers that have fenced themselves (a
                        // lost quorum cuts everyone off at once). One member's death costs
                        // a reconnect to another, well within that.
                        lost_at = Some(since + client.session_timeout() / 2);
                        self.health.send_replace(SessionHealth::Disconnected { since });
                        Ok(())
                    }
                    zk::SessionState::Expired
                    | zk::SessionState::Closed
                    | zk::SessionState::AuthFailed => {
                        lost_at = None;
                        self.health.send_replace(SessionHealth::Expired);
                        tracing::warn!(%state, "registry view session lost; opening a new one");
                        match self.new_session().await {
                            Some(c) => {
                                client = c;
                                states = client.state_watcher();
                                was_disconnected = false;
                                retry_at = None;
                                self.health.send_replace(SessionHealth::Connected);
                                Ok(())
                            }
                            None => return,
                        }
                    }
                },
                () = lost_timer => {
                    // The client library keeps trying the session (and reports `Expired`
                    // itself at 7/5 of its timeout); a reconnect brings `Connected` back and
                    // lists everything again.
                    lost_at = None;
                    tracing::warn!(after = ?client.session_timeout() / 2,
                        "registry view disconnected for half a session timeout; calling it lost");
                    self.health.send_replace(SessionHealth::Expired);
                    Ok(())
                }
                () = retry_timer => {
                    retry_at = None;
                    self.resync(&client).await
                }
                event = children_fired => {
                    self.children = None;
                    if event.event_type == zk::EventType::Session {
                        // Session trouble; the state watcher drives recovery.
                        Ok(())
                    } else {
                        self.relist(&client).await
                    }
                }
                Some(joined) = self.data_watches.join_next(), if !self.data_watches.is_empty() => {
                    match joined {
                        Ok((name, generation, event)) => self.data_event(&client, name, generation, event).await,
                        // Aborted watches of removed nodes.
                        Err(_) => Ok(()),
                    }
                }
            };
            match step {
                Ok(()) => {
                    if retry_at.is_none() {
                        backoff = Duration::from_millis(100);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "registry view update failed; will list again");
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            self.publish();
        }
    }

    /// New sessions until one lists the root. `None` when nobody watches any more.
    async fn new_session(&mut self) -> Option<zk::Client> {
        self.clear();
        let watchers = self.servers.clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = async {
                let client = connect(&self.cfg).await?;
                ensure_root(&client, &self.cfg).await?;
                self.resync(&client).await?;
                Ok::<_, RegistryError>(client)
            };
            let outcome = tokio::select! {
                biased;
                () = watchers.closed() => return None,
                outcome = attempt => outcome,
            };
            match outcome {
                Ok(client) => return Some(client),
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?backoff, "registry view cannot reconnect");
                }
            }
            tokio::select! {
                biased;
                () = self.servers.closed() => return None,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn clear(&mut self) {
        self.complete = false;
        self.children = None;
        self.data_watches.abort_all();
        self.nodes.clear();
    }

    /// Forgets every watch and lists the root again. Published only once the listing is
    /// whole (see `complete`).
    async fn resync(&mut self, client: &zk::Client) -> Result<(), RegistryError> {
        self.clear();
        let result = self.relist(client).await;
        self.publish();
        result
    }

    /// Re-arms the child watch and reconciles the node set with the listing.
    async fn relist(&mut self, client: &zk::Client) -> Result<(), RegistryError> {
        let (children, watcher) = timed(
            "list servers",
            self.cfg.op_timeout,
            client.list_and_watch_children(&self.cfg.root),
        )
        .await?;
        self.children = Some(Box::pin(watcher.changed()));
        let listed: BTreeSet<String> = children.into_iter().collect();
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|n| !listed.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            self.remove(&name);
        }
        for name in listed {
            if !self.nodes.contains_key(&name) {
                self.fetch(client, name).await?;
            }
        }
        self.complete = true;
        Ok(())
    }

    /// Reads a node's data and arms (replaces) its data watch.
    async fn fetch(&mut self, client: &zk::Client, name: String) -> Result<(), RegistryError> {
        let path = self.cfg.node_path(&name);
        let read = timed(
            "read server",
            self.cfg.op_timeout,
            client.get_and_watch_data(&path),
        )
        .await;
        let (data, watcher) = match read {
            Ok((data, _stat, watcher)) => (data, watcher),
            Err(e) if is_zk(&e, &zk::Error::NoNode) => {
                // Gone between listing and reading; the child watch reports it too.
                self.remove(&name);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let generation = self.next_gen;
        self.next_gen += 1;
        let watched = name.clone();
        let watch = self
            .data_watches
            .spawn(async move { (watched, generation, watcher.changed().await) });
        let server = decode_node(&name, &data);
        if let Some(old) = self.nodes.insert(
            name,
            NodeEntry {
                generation,
                watch,
                server,
            },
        ) {
            old.watch.abort();
        }
        Ok(())
    }

    fn remove(&mut self, name: &str) {
        if let Some(entry) = self.nodes.remove(name) {
            entry.watch.abort();
        }
    }

    async fn data_event(
        &mut self,
        client: &zk::Client,
        name: String,
        generation: u64,
        event: zk::WatchedEvent,
    ) -> Result<(), RegistryError> {
        let current = self.nodes.get(&name).map(|e| e.generation);
        if current != Some(generation) {
            return Ok(());
        }
        match event.event_type {
            // Read again rather than dropped: the name may be back already. A server that
            // replaces its previous session's node deletes and recreates it at once, and a
            // child-watch listing in between sees the name still there (so fetches nothing)
            // while this event, handled after it, would drop the new node from the view
            // until the next change under the root; its route would close the server's
            // link and place nobody there. `fetch` removes it if it is really gone.
            zk::EventType::NodeDeleted
            | zk::EventType::NodeDataChanged
            | zk::EventType::NodeCreated => self.fetch(client, name).await,
            // Session events: the state watcher drives recovery and re-lists.
            zk::EventType::Session | zk::EventType::NodeChildrenChanged => Ok(()),
        }
    }

    fn publish(&self) {
        if !self.complete {
            return;
        }
        let map: ServerMap = self
            .nodes
            .values()
            .filter_map(|e| e.server.clone())
            .map(|s| (s.id.clone(), s))
            .collect::<BTreeMap<ServerId, LiveServer>>();
        self.servers.send_if_modified(|current| {
            if *current == map {
                false
            } else {
                *current = map;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tls_endpoints_of_a_connect_string() {
        assert_eq!(
            tls_endpoints("zk1:2281,tcp://zk2:2181,tcp+tls://zk3,[::1]:2282/cim"),
            [
                ("zk1".to_owned(), 2281),
                ("zk3".to_owned(), 2181),
                ("::1".to_owned(), 2282)
            ]
        );
    }
}
