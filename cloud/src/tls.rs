//! TLS for the HTTP listener (rustls with the aws-lc-rs provider).

use std::path::Path;

use kappa_runtime::tls::ClientAuth;

/// A server configuration from a PEM certificate chain (leaf first) and a
/// PEM private key; HTTP/1.1 only, TLS 1.2 and 1.3.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<rustls::ServerConfig, String> {
    let mut config = kappa_runtime::tls::server_config("http.tls", cert_file, key_file, ClientAuth::None)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
