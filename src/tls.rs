//! TLS server configuration (rustls, ring provider): TLS 1.2 and 1.3, no ALPN, any SNI accepted.
//! Built from PEM files; rebuilt on reload so a renewed certificate needs no restart.

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// Loads a certificate chain and a private key (PKCS#8, PKCS#1 or SEC1, PEM) into a server config.
pub(crate) fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: cannot read certificates: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: bad PEM certificate: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate found (expected the full chain, PEM)", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: cannot read the private key: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("{}: certificate and key do not match or are unusable: {e}", cert.display()))?;
    Ok(Arc::new(config))
}
