//! From the binaries' TLS flags to the listeners' and dialers' configurations, the same way
//! for `cim-server`, `cim-route` and `cim up`.
//!
//! One rule for both binaries: giving a certificate turns TLS on for everything the process
//! serves and dials, and then the internal links are mutual TLS against `ca`. A server's
//! certificate must carry the server role, a route's the route role (see [`Role`]).

use std::path::PathBuf;

use super::{ClientTls, ClientTlsSettings, Role, ServerTls, ServerTlsSettings, TlsError};

/// The TLS flags of a route or a server.
#[derive(Debug, Clone, Default)]
pub struct TlsFlags {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    /// Migration: listeners also take plaintext clients (off by default).
    pub accept_plaintext: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{0}")]
    Usage(&'static str),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl TlsFlags {
    /// The certificate, key and CA when TLS is on; `None` when no flag is given.
    fn files(&self) -> Result<Option<(PathBuf, PathBuf, PathBuf)>, TlsSetupError> {
        match (&self.cert, &self.key, &self.ca) {
            (None, None, None) if !self.accept_plaintext => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some((cert.clone(), key.clone(), ca.clone()))),
            (None, None, None) => Err(TlsSetupError::Usage(
                "--tls-accept-plaintext needs --tls-cert, --tls-key and --tls-ca",
            )),
            _ => Err(TlsSetupError::Usage(
                "TLS needs all of --tls-cert, --tls-key and --tls-ca (the CA signs the internal links' certificates)",
            )),
        }
    }
}

/// A server's TLS: the client gateway's and the link port's.
#[derive(Debug, Clone)]
pub struct ServerSide {
    pub gateway: ServerTls,
    pub link: ServerTls,
}

impl ServerSide {
    /// `advertise_host` is the name clients and routes dial: the certificate must be valid
    /// for it. Both listeners check the same files alike, so a reload takes on both or
    /// neither.
    pub fn load(flags: &TlsFlags, advertise_host: &str) -> Result<Option<Self>, TlsSetupError> {
        let Some((cert, key, ca)) = flags.files()? else {
            return Ok(None);
        };
        let mut gateway = ServerTlsSettings::new("gateway", cert.clone(), key.clone());
        gateway.accept_plaintext = flags.accept_plaintext;
        gateway.own_role = Some(Role::Server);
        gateway.own_host = Some(advertise_host.to_owned());
        let mut link = ServerTlsSettings::new("link", cert, key);
        link.own_role = Some(Role::Server);
        link.own_host = Some(advertise_host.to_owned());
        gateway.peers_trust = Some(ca.clone());
        link.client_auth = Some((ca, Role::Route));
        link.accept_plaintext = flags.accept_plaintext;
        link.server_speaks_first = true;
        Ok(Some(Self {
            gateway: ServerTls::load(gateway)?,
            link: ServerTls::load(link)?,
        }))
    }

    pub fn reloadables(&self) -> Vec<super::reload::Reloadable> {
        vec![
            super::reload::Reloadable::Server(self.gateway.clone()),
            super::reload::Reloadable::Server(self.link.clone()),
        ]
    }
}

/// A route's TLS: its HTTPS listener and the links it dials.
#[derive(Debug, Clone)]
pub struct RouteSide {
    pub https: ServerTls,
    pub links: ClientTls,
}

impl RouteSide {
    pub fn load(flags: &TlsFlags) -> Result<Option<Self>, TlsSetupError> {
        let Some((cert, key, ca)) = flags.files()? else {
            return Ok(None);
        };
        let mut https = ServerTlsSettings::new("https", cert.clone(), key.clone());
        https.accept_plaintext = flags.accept_plaintext;
        // The same files are the link identity: a reload must suit both or neither.
        https.own_role = Some(Role::Route);
        let links = ClientTlsSettings {
            ca: Some(ca),
            identity: Some((cert, key)),
            own_role: Some(Role::Route),
            server_role: Some(Role::Server),
        };
        Ok(Some(Self {
            https: ServerTls::load(https)?,
            links: ClientTls::load(links)?,
        }))
    }

    pub fn reloadables(&self) -> Vec<super::reload::Reloadable> {
        vec![
            super::reload::Reloadable::Server(self.https.clone()),
            super::reload::Reloadable::Client(self.links.clone()),
        ]
    }
}
