//! TLS server configurations (rustls with the aws-lc-rs provider), the same
//! for every listener of the project, and client configurations that trust
//! one CA file.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Whether clients present certificates, and signed by which CA.
#[derive(Debug, Clone, Copy)]
pub enum ClientAuth<'a> {
    /// No client certificates (server authentication only).
    None,
    /// A client may present a certificate signed by the CA in this PEM file;
    /// one without a certificate still connects (and must identify itself
    /// some other way).
    Optional(&'a Path),
    /// Every client presents a certificate signed by the CA in this PEM file.
    Required(&'a Path),
}

/// A server configuration from a PEM certificate chain (leaf first) and a
/// PEM private key; TLS 1.2 and 1.3. `keys` names the config section in
/// errors (e.g. `http.tls`).
pub fn server_config(
    keys: &str,
    cert_file: &Path,
    key_file: &Path,
    clients: ClientAuth<'_>,
) -> Result<rustls::ServerConfig, String> {
    let chain = certificates(cert_file).map_err(|e| format!("{keys}.cert_file {e}"))?;
    let key =
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| format!("{keys}.key_file {}: {e}", key_file.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match clients {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Optional(ca) | ClientAuth::Required(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca).map_err(|e| format!("{keys}.client_ca_file {e}"))? {
                roots.add(cert).map_err(|e| format!("{keys}.client_ca_file {}: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier =
                if matches!(clients, ClientAuth::Optional(_)) { verifier.allow_unauthenticated() } else { verifier };
            let verifier = verifier.build().map_err(|e| format!("{keys}.client_ca_file {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("{keys}: the certificate and key do not make a usable pair: {e}"))
}

/// A client configuration that trusts the certificates in the PEM file
/// `ca_file` and nothing else; TLS 1.2 and 1.3, no client certificate.
/// `key` names the config key in errors (e.g. `cluster.postgres_ca`).
pub fn client_config(key: &str, ca_file: &Path) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_file).map_err(|e| format!("{key} {e}"))? {
        roots.add(cert).map_err(|e| format!("{key} {}: {e}", ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Every certificate in a PEM file; none is an error.
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

/// The subject common name of a DER certificate, if it has one (the first,
/// when there are several). Only reads: call it on a certificate the TLS
/// stack has verified.
pub fn common_name(der: &[u8]) -> Option<String> {
    // Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL,
    //   serialNumber, signature, issuer, validity, subject, ... }, ... }
    let (cert, _) = der::expect(der, der::SEQUENCE)?;
    let (mut tbs, _) = der::expect(cert, der::SEQUENCE)?;
    if tbs.first() == Some(&0xA0) {
        tbs = der::element(tbs)?.2;
    }
    for _ in 0..4 {
        tbs = der::element(tbs)?.2; // serial, signature, issuer, validity
    }
    let (mut subject, _) = der::expect(tbs, der::SEQUENCE)?;
    // Name ::= SEQUENCE OF SET OF SEQUENCE { type OID, value ANY }
    while !subject.is_empty() {
        let (mut set, rest) = der::expect(subject, der::SET)?;
        subject = rest;
        while !set.is_empty() {
            let (attr, rest) = der::expect(set, der::SEQUENCE)?;
            set = rest;
            let (oid, value) = der::expect(attr, der::OID)?;
            if oid == [0x55, 0x04, 0x03] {
                let (tag, body, _) = der::element(value)?;
                // UTF8String, PrintableString, IA5String
                if matches!(tag, 0x0C | 0x13 | 0x16) {
                    return String::from_utf8(body.to_vec()).ok();
                }
                return None;
            }
        }
    }
    None
}

/// The few DER reading steps [`common_name`] needs; every step checks bounds.
mod der {
    pub const SEQUENCE: u8 = 0x30;
    pub const SET: u8 = 0x31;
    pub const OID: u8 = 0x06;

    /// The first element: (tag, contents, what follows it).
    pub fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7F);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            rest = &rest[n..];
            len
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }

    /// The first element if its tag is `tag`: (contents, what follows it).
    pub fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (t, body, rest) = element(input)?;
        (t == tag).then_some((body, rest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(dn: &[(rcgen::DnType, &str)]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (t, v) in dn {
            params.distinguished_name.push(t.clone(), *v);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_common_name_is_read_from_the_subject() {
        let der = cert_with(&[(rcgen::DnType::OrganizationName, "fleet"), (rcgen::DnType::CommonName, "dev-007")]);
        assert_eq!(common_name(&der).as_deref(), Some("dev-007"));
        assert_eq!(common_name(&cert_with(&[(rcgen::DnType::OrganizationName, "fleet")])), None);
    }

    #[test]
    fn damaged_certificates_give_none_not_a_panic() {
        let der = cert_with(&[(rcgen::DnType::CommonName, "dev-007")]);
        for cut in 0..der.len() {
            assert_eq!(common_name(&der[..cut]), None, "cut at {cut}");
        }
        let mut flipped = der.clone();
        for i in 0..flipped.len() {
            flipped[i] ^= 0xFF;
            let _ = common_name(&flipped);
            flipped[i] ^= 0xFF;
        }
    }
}
