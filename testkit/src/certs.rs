//! Throwaway certificates for tests: a CA of the test's own, and leaves it signs for
//! `127.0.0.1` / `localhost` (servers) or a name (clients), written as PEM files into a temp
//! dir that goes away on drop. Deliberately small; not for production use.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// A test CA and the dir its files live in.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// Where [`Self::cert_pem`] is written.
    pub cert_path: PathBuf,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// A certificate signed by a [`TestCa`], with its key; both PEM, both written to files.
#[derive(Debug, Clone)]
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl TestCa {
    /// A fresh CA named `name` (two CAs never trust each other's leaves).
    pub fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "cim-certs-{}-{}-{name}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("cert dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name = dn(&format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("CA certificate");
        let cert_pem = issuer.pem();
        let cert_path = dir.join("ca.pem");
        std::fs::write(&cert_path, &cert_pem).expect("write ca.pem");
        Self {
            issuer,
            dir,
            cert_pem,
            cert_path,
        }
    }

    /// A server certificate for `127.0.0.1` and `localhost`.
    pub fn server_cert(&self, file_stem: &str) -> TestCert {
        self.leaf(
            file_stem,
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A server certificate for other names only (a wrong-host certificate for loopback).
    pub fn server_cert_for(&self, file_stem: &str, names: &[&str]) -> TestCert {
        let names = names.iter().map(|n| (*n).to_string()).collect();
        self.leaf(file_stem, names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate whose subject is `name`.
    pub fn client_cert(&self, file_stem: &str, name: &str) -> TestCert {
        self.leaf(
            file_stem,
            vec![name.to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    fn leaf(
        &self,
        file_stem: &str,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> TestCert {
        let common_name = names.first().cloned().unwrap_or_default();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params.distinguished_name = dn(&common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        let cert_path = self.dir.join(format!("{file_stem}.pem"));
        let key_path = self.dir.join(format!("{file_stem}.key"));
        std::fs::write(&cert_path, &cert_pem).expect("write cert");
        std::fs::write(&key_path, &key_pem).expect("write key");
        TestCert {
            cert_pem,
            key_pem,
            cert_path,
            key_path,
        }
    }

    /// The dir the files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
