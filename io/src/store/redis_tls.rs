//! TLS to Redis (`rediss://` URLs): which CA to trust and which client certificate to show.
//!
//! One struct, [`RedisTls`], holds everything a TLS connection to Redis needs, already read
//! from its PEM files and checked, so a single-node client and a later cluster client take the
//! same value ([`RedisTls::certificates`] is what the `redis` crate's `build_with_tls`
//! functions want). The URL says whether TLS is used (`rediss://`); these settings only say
//! how, and giving them with a `redis://` URL is refused rather than silently ignored.

use std::path::Path;

use ::redis::{ClientTlsConfig, TlsCertificates};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The CA and optional client certificate for `rediss://`. The default trusts the system's
/// roots and shows no client certificate.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// PEM certificates to trust instead of the system's roots.
    ca_pem: Option<Vec<u8>>,
    /// PEM certificate chain and PEM private key, for Redis's `tls-auth-clients`.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret; the rest says only whether it is set.
        f.debug_struct("RedisTls")
            .field("ca", &self.ca_pem.as_ref().map(|_| "<set>"))
            .field("client_cert", &self.client.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl RedisTls {
    /// Whether anything differs from the default (system roots, no client certificate).
    pub fn is_configured(&self) -> bool {
        self.ca_pem.is_some() || self.client.is_some()
    }

    /// Trust the certificates of `pem` (one or more) instead of the system's roots.
    pub fn with_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Result<Self, String> {
        let pem = pem.into();
        let count = CertificateDer::pem_slice_iter(&pem)
            .try_fold(0usize, |n, cert| cert.map(|_| n + 1))
            .map_err(|e| format!("not a PEM certificate: {e}"))?;
        if count == 0 {
            return Err("no PEM certificate in it".into());
        }
        self.ca_pem = Some(pem);
        Ok(self)
    }

    /// Show this client certificate (PEM chain) with its private key (PEM).
    pub fn with_client_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Result<Self, String> {
        let (cert, key) = (cert.into(), key.into());
        let count = CertificateDer::pem_slice_iter(&cert)
            .try_fold(0usize, |n, c| c.map(|_| n + 1))
            .map_err(|e| format!("client certificate: not PEM: {e}"))?;
        if count == 0 {
            return Err("client certificate: no PEM certificate in it".into());
        }
        // The parse error names the PEM section, never the key's bytes.
        PrivateKeyDer::from_pem_slice(&key)
            .map_err(|e| format!("client key: not a PEM private key: {e}"))?;
        self.client = Some((cert, key));
        Ok(self)
    }

    /// Reads the files the operator named (`--redis-ca`, `--redis-client-cert`,
    /// `--redis-client-key`); each error names its file and flag.
    pub fn from_files(
        ca: Option<&Path>,
        client_cert: Option<&Path>,
        client_key: Option<&Path>,
    ) -> Result<Self, String> {
        let read = |flag: &str, path: &Path| {
            std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
        };
        let mut tls = Self::default();
        if let Some(path) = ca {
            tls = tls
                .with_ca_pem(read("--redis-ca", path)?)
                .map_err(|e| format!("--redis-ca {}: {e}", path.display()))?;
        }
        match (client_cert, client_key) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                let (cert_pem, key_pem) = (
                    read("--redis-client-cert", cert)?,
                    read("--redis-client-key", key)?,
                );
                tls = tls
                    .with_client_pem(cert_pem, key_pem)
                    .map_err(|e| format!("{} / {}: {e}", cert.display(), key.display()))?;
            }
            (Some(_), None) => {
                return Err("--redis-client-cert needs --redis-client-key".into());
            }
            (None, Some(_)) => {
                return Err("--redis-client-key needs --redis-client-cert".into());
            }
        }
        Ok(tls)
    }

    /// What the `redis` crate's `Client::build_with_tls` (and the cluster builder's
    /// `certs`) take.
    pub fn certificates(&self) -> TlsCertificates {
        TlsCertificates {
            client_tls: self.client.as_ref().map(|(cert, key)| ClientTlsConfig {
                client_cert: cert.clone(),
                client_key: key.clone(),
            }),
            root_cert: self.ca_pem.clone(),
        }
    }
}

/// The `redis` crate builds its TLS settings with `ClientConfig::builder()`, which needs a
/// process default provider.
pub(crate) fn install_crypto_provider() {
    crate::tls::install_default_crypto_provider();
}

/// `url` with any password replaced by `***`, for logs and errors. Something that does not
/// parse as a URL is not shown at all (it might be a password pasted in the wrong place).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<unparsable url>".into();
    };
    // Userinfo is whatever precedes the last '@' (a Redis URL's path and query never hold
    // one), so even a password with an unencoded '/' or '@' in it is cut out whole.
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:***"),
                // `redis://secret@host`: the crate reads a lone userinfo as the password.
                None => "***".to_string(),
            };
            format!("{scheme}://{user}@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_from_urls() {
        assert_eq!(
            redact_url("redis://cim-route:s3cret@10.0.0.2:6379/0"),
            "redis://cim-route:***@10.0.0.2:6379/0"
        );
        assert_eq!(
            redact_url("rediss://:s3cret@redis.internal:6380"),
            "rediss://:***@redis.internal:6380"
        );
        assert_eq!(redact_url("redis://s3cret@host:1"), "redis://***@host:1");
        // Percent-encoded is the correct form, but an unencoded '/' or '@' goes too.
        assert!(!redact_url("redis://u:pa%40ss@h:1/").contains("pa%40ss"));
        assert_eq!(redact_url("redis://u:p/a@ss@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/"),
            "redis://127.0.0.1:6379/"
        );
        assert_eq!(redact_url("s3cret"), "<unparsable url>");
    }

    #[test]
    fn pem_files_are_checked_before_connecting() {
        assert!(RedisTls::default().with_ca_pem("not pem").is_err());
        assert!(RedisTls::default().with_ca_pem(Vec::new()).is_err());
        let e =
            RedisTls::from_files(None, Some(Path::new("/nonexistent/cert.pem")), None).unwrap_err();
        assert!(e.contains("--redis-client-key"), "{e}");
        let e =
            RedisTls::from_files(Some(Path::new("/nonexistent/ca.pem")), None, None).unwrap_err();
        assert!(e.contains("--redis-ca /nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn debug_never_shows_the_key() {
        let tls = RedisTls {
            ca_pem: None,
            client: Some((b"CERT".to_vec(), b"SECRET-KEY".to_vec())),
        };
        let shown = format!("{tls:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(!format!("{:?}", tls.certificates()).contains("SECRET"));
    }
}
