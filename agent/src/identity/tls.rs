//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, mutual
//! authentication with X.509-SVIDs, and no session resumption, so every
//! connection is verified against the current roots, CRLs and deny list
//! (the CVE-2022-21654 class).

#![forbid(unsafe_code)]

use std::sync::{Arc, OnceLock};

use rustls::client::{ClientConfig, ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use rustls::{SignatureScheme, version::TLS13};

use super::Identity;
use super::manager::CertManager;
use super::trust::TrustStore;
use super::verify::SvidVerifier;

/// ALPN protocol of HBONE.
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// The process-wide crypto provider: aws-lc-rs, TLS 1.3 suites in the
/// order AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305, key exchange X25519
/// first. Chosen by measurement on the bench machine (`nodeward-bench
/// --only crypto`, figures in ARCHITECTURE.md): aws-lc-rs carries
/// AES-128-GCM records fastest and steadiest; ring's best suite is 0.8× of
/// it. Both ends of a tunnel pick from the client's order, so two agents
/// use AES-128-GCM; ztunnel, offering the same three, interoperates.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        use rustls::crypto::aws_lc_rs::{self, cipher_suite};
        let mut p = aws_lc_rs::default_provider();
        p.cipher_suites = vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ];
        Arc::new(p)
    })
    .clone()
}

/// Where a handshake gets the certificate of the identity it presents. Each
/// handshake asks anew, so a renewed certificate is used from the next
/// handshake on while established connections are untouched.
pub trait CertSource: Send + Sync + std::fmt::Debug {
    /// The current certificate and key of `id`, if any.
    fn current(&self, id: &Identity) -> Option<Arc<CertifiedKey>>;
}

impl CertSource for CertManager {
    fn current(&self, id: &Identity) -> Option<Arc<CertifiedKey>> {
        CertManager::current(self, id)
    }
}

/// A fixed certificate, for tests and tools.
#[derive(Debug)]
pub struct FixedCert(pub Arc<CertifiedKey>);

impl CertSource for FixedCert {
    fn current(&self, _: &Identity) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[derive(Debug)]
struct Resolver {
    source: Arc<dyn CertSource>,
    id: Identity,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.source.current(&self.id)
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.source.current(&self.id)
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Server side: presents `id`, requires a client SVID.
pub fn server_config(source: Arc<dyn CertSource>, id: Identity, trust: Arc<TrustStore>) -> Arc<ServerConfig> {
    let p = provider();
    let mut cfg = ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&TLS13])
        .expect("ring supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(SvidVerifier::for_clients(trust, p)))
        .with_cert_resolver(Arc::new(Resolver { source, id }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.max_early_data_size = 0;
    Arc::new(cfg)
}

/// Client side: presents `id`, requires the server to be `expected`.
pub fn client_config(
    source: Arc<dyn CertSource>,
    id: Identity,
    trust: Arc<TrustStore>,
    expected: Identity,
) -> Arc<ClientConfig> {
    let p = provider();
    let mut cfg = ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&TLS13])
        .expect("ring supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SvidVerifier::for_server(trust, p, expected)))
        .with_client_cert_resolver(Arc::new(Resolver { source, id }));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.resumption = Resumption::disabled();
    cfg.enable_sni = false;
    cfg.enable_early_data = false;
    Arc::new(cfg)
}

/// A certified key from an issued chain and its in-memory PKCS#8 key.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: rustls::pki_types::PrivatePkcs8KeyDer<'static>,
) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let signing = provider().key_provider.load_private_key(key.into())?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// The SPIFFE identity of a verified peer, from its leaf certificate.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let leaf = certs?.first()?;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Identity::parse(u).ok(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_offers_the_measured_tls13_suites_in_their_measured_order() {
        let p = provider();
        let names: Vec<String> = p.cipher_suites.iter().map(|s| format!("{:?}", s.suite())).collect();
        assert_eq!(
            names,
            [
                "TLS13_AES_128_GCM_SHA256",
                "TLS13_AES_256_GCM_SHA384",
                "TLS13_CHACHA20_POLY1305_SHA256"
            ]
        );
        assert!(p.cipher_suites.iter().all(|s| s.version() == &TLS13), "TLS 1.3 only");
        assert_eq!(
            format!("{:?}", p.kx_groups.first().map(|g| g.name())),
            "Some(X25519)",
            "X25519 first: one round trip, no post-quantum share by default"
        );
    }
}
