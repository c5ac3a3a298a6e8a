//! Throwaway certificates: a CA made at start and leaves it signs, for `cim up --tls`, the
//! tests and the benchmarks. Never for production: the CA's key lives only in memory and
//! its certificate in a temporary directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use super::Role;

/// What a leaf certificate is made for.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// DNS names and IP addresses it is valid for.
    pub hosts: Vec<String>,
    /// The link role it carries, if any.
    pub role: Option<Role>,
    /// Valid from `days_from_now.0` to `days_from_now.1` days from now (negative is past).
    pub days_from_now: (i64, i64),
}

impl LeafSpec {
    pub fn new(hosts: &[&str], role: Option<Role>) -> Self {
        Self {
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            role,
            days_from_now: (-1, 30),
        }
    }
}

/// A certificate and its key, PEM.
#[derive(Debug, Clone)]
pub struct PemPair {
    pub cert: String,
    pub key: String,
}

/// A CA held in memory.
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa").finish_non_exhaustive()
    }
}

fn days(n: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + time::Duration::days(n)
}

impl DevCa {
    /// A new CA named `name`, valid for a year.
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = days(-1);
        params.not_after = days(365);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A leaf for both sides of TLS (server and client authentication).
    pub fn issue(&self, spec: &LeafSpec) -> Result<PemPair, rcgen::Error> {
        let mut params = CertificateParams::new(spec.hosts.clone())?;
        params.distinguished_name.push(
            DnType::CommonName,
            spec.hosts.first().map_or("cim", String::as_str),
        );
        if let Some(role) = spec.role {
            params
                .subject_alt_names
                .push(SanType::URI(role.uri().try_into()?));
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = days(spec.days_from_now.0);
        params.not_after = days(spec.days_from_now.1);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(PemPair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }
}

/// The files of a development deployment: one CA, a route certificate and a server
/// certificate, both for the given hosts.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub ca: PathBuf,
    pub route_cert: PathBuf,
    pub route_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl DevPki {
    /// Writes `ca.pem`, `route.pem`, `route-key.pem`, `server.pem` and `server-key.pem`
    /// into `dir` (keys readable by the owner only).
    pub fn generate(dir: &Path, hosts: &[&str]) -> std::io::Result<Self> {
        let ca = DevCa::new("cim development CA").map_err(std::io::Error::other)?;
        let route = ca
            .issue(&LeafSpec::new(hosts, Some(Role::Route)))
            .map_err(std::io::Error::other)?;
        let server = ca
            .issue(&LeafSpec::new(hosts, Some(Role::Server)))
            .map_err(std::io::Error::other)?;
        std::fs::create_dir_all(dir)?;
        let pki = Self {
            ca: dir.join("ca.pem"),
            route_cert: dir.join("route.pem"),
            route_key: dir.join("route-key.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
        };
        std::fs::write(&pki.ca, ca.cert_pem())?;
        std::fs::write(&pki.route_cert, &route.cert)?;
        write_key(&pki.route_key, &route.key)?;
        std::fs::write(&pki.server_cert, &server.cert)?;
        write_key(&pki.server_key, &server.key)?;
        Ok(pki)
    }
}

/// Writes a private key readable by its owner only.
pub fn write_key(path: &Path, pem: &str) -> std::io::Result<()> {
    // Replace rather than truncate, so a reader never sees half a key.
    crate::private_file::write_atomically(path, pem.as_bytes())
}
