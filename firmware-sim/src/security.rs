//! How simulated devices prove who they are to a locked-down broker: TLS
//! with the broker's CA, a certificate per device, or a password per device
//! (docs/security.md, "Devices").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Credentials and trust for the whole fleet (none: plain text, anonymous).
#[derive(Debug, Clone, Default)]
pub struct DeviceSecurity {
    /// TLS: the broker's certificate must chain to these roots.
    roots: Option<Arc<RootCertStore>>,
    /// With TLS, device `id` presents `{dir}/{id}.pem` and `{dir}/{id}.key`.
    cert_dir: Option<PathBuf>,
    /// Login = device id, password from here.
    passwords: Option<Arc<HashMap<String, String>>>,
}

impl DeviceSecurity {
    /// Reads the CA (PEM) and the `login,password` CSV written by
    /// `kappa-edge mosquitto credentials`.
    pub fn load(ca_file: Option<&Path>, cert_dir: Option<&Path>, credentials: Option<&Path>) -> Result<Self, String> {
        if cert_dir.is_some() && ca_file.is_none() {
            return Err("--cert-dir needs --tls-ca (certificates are presented over TLS)".into());
        }
        let roots = match ca_file {
            None => None,
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in
                    CertificateDer::pem_file_iter(path).map_err(|e| format!("--tls-ca {}: {e}", path.display()))?
                {
                    let cert = cert.map_err(|e| format!("--tls-ca {}: {e}", path.display()))?;
                    roots.add(cert).map_err(|e| format!("--tls-ca {}: {e}", path.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("--tls-ca {}: no certificate in it", path.display()));
                }
                Some(Arc::new(roots))
            }
        };
        let passwords = match credentials {
            None => None,
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| format!("--credentials {}: {e}", path.display()))?;
                let logins: HashMap<String, String> = text
                    .lines()
                    .skip_while(|l| l.starts_with("login,"))
                    .filter_map(|l| l.split_once(','))
                    .map(|(u, p)| (u.trim().to_string(), p.trim().to_string()))
                    .collect();
                Some(Arc::new(logins))
            }
        };
        Ok(Self { roots, cert_dir: cert_dir.map(Path::to_path_buf), passwords })
    }

    /// Sets device `id`'s transport and login on `opts`.
    pub fn apply(&self, id: &str, opts: &mut MqttOptions) -> Result<(), String> {
        if let Some(passwords) = &self.passwords {
            let password = passwords.get(id).ok_or_else(|| format!("no password for {id} in --credentials"))?;
            opts.set_credentials(id, password.as_str());
        }
        if let Some(config) = self.tls_config(id)? {
            opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(config))));
        }
        Ok(())
    }

    /// Device `id`'s TLS client configuration (`None`: plain text), for any
    /// MQTT client built on rustls.
    pub fn tls_config(&self, id: &str) -> Result<Option<rustls::ClientConfig>, String> {
        let Some(roots) = &self.roots else { return Ok(None) };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots.clone());
        let config = match &self.cert_dir {
            None => builder.with_no_client_auth(),
            Some(dir) => {
                let (cert, key) = (dir.join(format!("{id}.pem")), dir.join(format!("{id}.key")));
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
                    .and_then(|c| c.collect::<Result<_, _>>())
                    .map_err(|e| format!("{}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("{}: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, key).map_err(|e| format!("{id}'s certificate: {e}"))?
            }
        };
        Ok(Some(config))
    }
}
