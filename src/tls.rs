//! TLS plumbing on rustls. The crypto provider is chosen once, deliberately: `ring`, which
//! builds with the C compiler alone (aws-lc-rs would want cmake). The listener, the upstream
//! client and reqwest all use it.
//!
//! Every error names the file it is about, so a bad certificate is fixed without guessing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::TlsConfig;

/// Installs `ring` as the process-wide rustls provider; later calls are no-ops.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: a provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A TLS file that could not be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("TLS {what} {path}: {why}")]
pub struct TlsError {
    pub what: &'static str,
    pub path: PathBuf,
    pub why: String,
}

fn fail(what: &'static str, path: &Path, why: impl ToString) -> TlsError {
    TlsError {
        what,
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(what, path, e))?;
    if certs.is_empty() {
        return Err(fail(what, path, "no PEM certificate found"));
    }
    Ok(certs)
}

fn load_roots(what: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(what, path)? {
        roots.add(cert).map_err(|e| fail(what, path, e))?;
    }
    Ok(roots)
}

/// The listener's rustls config: TLS 1.2 and 1.3 only, ALPN `h2` then `http/1.1`, client
/// certificates required when `client_ca` is set.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    install_crypto_provider();
    let certs = load_certs("certificate", &cfg.cert)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| fail("key", &cfg.key, e))?;
    let builder = ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ]);
    let builder = match &cfg.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = load_roots("client CA", ca)?;
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| fail("client CA", ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        fail(
            "certificate",
            &cfg.cert,
            format!("does not go with key {}: {e}", cfg.key.display()),
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A client config for an `https://` upstream: the system's roots plus `extra_ca`.
pub fn client_config(extra_ca: Option<&Path>) -> Result<ClientConfig, TlsError> {
    install_crypto_provider();
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        for cert in load_certs("CA", path)? {
            roots.add(cert).map_err(|e| fail("CA", path, e))?;
        }
    }
    Ok(ClientConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ])
    .with_root_certificates(roots)
    .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn bad_files_are_named_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let key_pair = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key_pair)
            .unwrap();
        let good_cert = write(dir.path(), "cert.pem", &cert.pem());
        let good_key = write(dir.path(), "key.pem", &key_pair.serialize_pem());
        let other_key = write(
            dir.path(),
            "other.pem",
            &rcgen::KeyPair::generate().unwrap().serialize_pem(),
        );
        let empty = write(dir.path(), "empty.pem", "");
        let cfg = |cert: &Path, key: &Path| TlsConfig {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            client_ca: None,
            handshake_timeout: Duration::from_secs(1),
        };
        assert!(server_config(&cfg(&good_cert, &good_key)).is_ok());
        for (c, k, needle) in [
            (&empty, &good_key, "empty.pem: no PEM certificate"),
            (&dir.path().join("missing.pem"), &good_key, "missing.pem"),
            (&good_cert, &empty, "TLS key"),
            (&good_cert, &other_key, "does not go with key"),
        ] {
            let err = server_config(&cfg(c, k)).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let mut with_ca = cfg(&good_cert, &good_key);
        with_ca.client_ca = Some(empty.clone());
        assert!(server_config(&with_ca)
            .unwrap_err()
            .to_string()
            .contains("client CA"));
    }
}
