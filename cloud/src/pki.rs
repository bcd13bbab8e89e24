//! A local certificate authority and tokens for development and tests:
//! `kappa-cloud pki init`, `kappa-cloud pki issue`, `kappa-cloud auth token`.
//!
//! The CA is an ECDSA P-256 key and a self-signed certificate in a directory
//! (`ca.pem`, `ca.key`, the key readable by its owner only). `issue` signs
//! server certificates (serverAuth, with DNS names and IP addresses) and
//! client certificates for gateways and devices (clientAuth, the name as the
//! common name). Production deployments use their own PKI; this one exists
//! so that TLS is as easy to try as plain text.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// The common name of every CA this module creates: the issuer of a leaf is
/// rebuilt from it and the CA key, so `issue` needs no certificate parser.
const CA_NAME: &str = "Kappa IoT development CA";
const CA_DAYS: u64 = 3650;
const LEAF_DAYS: u64 = 825;

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// A TLS server (the cloud ingest and API, an MQTT broker).
    Server,
    /// A gateway authenticating to the cloud.
    Gateway,
    /// A device authenticating to an MQTT broker.
    Device,
}

/// Why a PKI command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Cert(String),
    #[error("{0} exists already; remove it to create a new CA")]
    Exists(PathBuf),
}

fn cert_err(e: rcgen::Error) -> PkiError {
    PkiError::Cert(e.to_string())
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.to_path_buf(), source })
}

fn validity(params: &mut CertificateParams, days: u64) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let at = |d: Duration| {
        time::OffsetDateTime::from_unix_timestamp(d.as_secs() as i64).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    params.not_before = at(now.saturating_sub(Duration::from_secs(3600)));
    params.not_after = at(now + Duration::from_secs(days * 86_400));
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// Creates `dir/ca.pem` and `dir/ca.key`; refuses to overwrite a CA.
pub fn init(dir: &Path) -> Result<PathBuf, PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io { path: dir.to_path_buf(), source })?;
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if key_path.exists() {
        return Err(PkiError::Exists(key_path));
    }
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut params = ca_params();
    validity(&mut params, CA_DAYS);
    let cert = params.self_signed(&key).map_err(cert_err)?;
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok(cert_path)
}

/// Issues `dir/NAME.pem` and `dir/NAME.key` signed by the CA in `dir`.
/// Server certificates carry `names` (DNS names or IP addresses; the name
/// itself when empty); client certificates carry the name as the common
/// name and as a DNS name.
pub fn issue(dir: &Path, kind: Kind, name: &str, names: &[String]) -> Result<(PathBuf, PathBuf), PkiError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(PkiError::Cert(format!("{name:?}: a name is letters, digits, '-', '_' and '.'")));
    }
    let ca_key = KeyPair::from_pem(&read(&dir.join("ca.key"))?).map_err(cert_err)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let sans: Vec<String> = if names.is_empty() { vec![name.to_string()] } else { names.to_vec() };
    let mut params = CertificateParams::new(sans).map_err(cert_err)?;
    if kind != Kind::Server {
        params.subject_alt_names = vec![SanType::DnsName(name.try_into().map_err(cert_err)?)];
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match kind {
        Kind::Server => ExtendedKeyUsagePurpose::ServerAuth,
        Kind::Gateway | Kind::Device => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    validity(&mut params, LEAF_DAYS);
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    write(&key_path, &key.serialize_pem(), true)?;
    write(&cert_path, &cert.pem(), false)?;
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_certificate_from_the_ca_is_accepted_by_rustls() {
        let dir = tempfile::tempdir().unwrap();
        let ca = init(dir.path()).unwrap();
        assert!(matches!(init(dir.path()), Err(PkiError::Exists(_))), "a second init must not replace the CA");
        let (cert, key) = issue(dir.path(), Kind::Server, "cloud", &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
        assert_eq!(mode & 0o077, 0, "the key is readable by its owner only");
        // The server side loads it ...
        let server = crate::tls::server_config(&cert, &key).unwrap();
        assert_eq!(server.alpn_protocols, vec![b"http/1.1".to_vec()]);
        // ... and a client that trusts only this CA verifies it for both names.
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from_pem_file(&ca).unwrap()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider).build().unwrap();
        let chain = rustls::pki_types::CertificateDer::from_pem_file(&cert).unwrap();
        let now = rustls::pki_types::UnixTime::now();
        for name in ["localhost", "127.0.0.1"] {
            let server_name = rustls::pki_types::ServerName::try_from(name).unwrap();
            rustls::client::danger::ServerCertVerifier::verify_server_cert(
                verifier.as_ref(),
                &chain,
                &[],
                &server_name,
                &[],
                now,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let other = rustls::pki_types::ServerName::try_from("example.org").unwrap();
        assert!(
            rustls::client::danger::ServerCertVerifier::verify_server_cert(
                verifier.as_ref(),
                &chain,
                &[],
                &other,
                &[],
                now
            )
            .is_err()
        );
        assert!(issue(dir.path(), Kind::Device, "../evil", &[]).is_err(), "names cannot leave the directory");
    }
}
