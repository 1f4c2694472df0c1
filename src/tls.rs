//! TLS plumbing. The crypto provider is chosen once, deliberately: `ring`, which builds with the
//! C compiler alone (aws-lc-rs would want cmake). rustls and reqwest both use it.

/// Installs `ring` as the process-wide rustls provider; later calls are no-ops.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another installer is fine: a provider is installed either way.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
