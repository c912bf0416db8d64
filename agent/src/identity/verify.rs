//! X.509-SVID verification for both ends of a connection.
//!
//! The leaf must hold exactly one URI SAN with a SPIFFE ID of our trust
//! domain (never a SPIFFE string in a DNS SAN or the CN — the Envoy
//! CVE-2022-21656 class), must not be a CA, must carry the extended key
//! usage for its role (CVE-2022-21657 class), must chain to a trusted root
//! through the intermediates it sent, must not be revoked (nor any
//! certificate of its chain), and must not be on the deny list. Every
//! refusal has one [`Refusal`] kind, used in logs, metrics and tests.

#![forbid(unsafe_code)]

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use webpki::{EndEntityCert, KeyUsage, RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Identity;
use super::trust::{TrustSnapshot, TrustStore, UnknownStatus};

/// Why a peer certificate was refused (defined with every other outcome label).
pub use crate::outcome::CertRefusal as Refusal;

/// A refused peer certificate.
#[derive(Debug, thiserror::Error)]
#[error("peer certificate refused ({refusal}): {detail}")]
pub struct SvidError {
    /// The kind.
    pub refusal: Refusal,
    /// Details for the log (certificate contents are public).
    pub(crate) detail: String,
}

fn refuse(refusal: Refusal, detail: impl Into<String>) -> SvidError {
    SvidError {
        refusal,
        detail: detail.into(),
    }
}

/// Which role the peer plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The peer is a client (we are the server).
    Client,
    /// The peer is a server (we are the client).
    Server,
}

/// Verifies a peer's chain (leaf first) and returns its identity.
pub(crate) fn verify_peer(
    chain: &[CertificateDer<'_>],
    trust: &TrustSnapshot,
    role: Role,
    now: UnixTime,
    provider: &CryptoProvider,
) -> Result<Identity, SvidError> {
    let leaf_der = chain
        .first()
        .ok_or_else(|| refuse(Refusal::NoClientCertificate, "empty chain"))?;
    let (_, leaf) =
        X509Certificate::from_der(leaf_der.as_ref()).map_err(|e| refuse(Refusal::BadCertificate, e.to_string()))?;
    if leaf.is_ca() {
        return Err(refuse(
            Refusal::CaCertificate,
            format!("{} is a CA certificate", leaf.subject()),
        ));
    }
    let id = spiffe_id(&leaf)?;
    let eku = leaf.extended_key_usage().ok().flatten().map(|e| e.value.clone());
    match role {
        Role::Client if !eku.as_ref().is_some_and(|e| e.client_auth) => {
            return Err(refuse(
                Refusal::MissingClientAuth,
                format!("{id} lacks the clientAuth extended key usage"),
            ));
        }
        Role::Server if !eku.as_ref().is_some_and(|e| e.server_auth) => {
            return Err(refuse(
                Refusal::MissingServerAuth,
                format!("{id} lacks the serverAuth extended key usage"),
            ));
        }
        _ => {}
    }

    let ee = EndEntityCert::try_from(leaf_der).map_err(|e| refuse(Refusal::BadCertificate, format!("{e:?}")))?;
    // webpki consults only the first CRL of an issuer; it is given the ones
    // that may vouch for a status, and every CRL's serials are checked below.
    let crls = trust.status_crls(now.as_secs() as i64);
    let policy = match trust.unknown_status {
        UnknownStatus::Accept => UnknownStatusPolicy::Allow,
        UnknownStatus::Refuse => UnknownStatusPolicy::Deny,
    };
    let revocation = match RevocationOptionsBuilder::new(&crls) {
        Ok(b) => Some(
            b.with_depth(RevocationCheckDepth::Chain)
                .with_status_policy(policy)
                .build(),
        ),
        Err(_) if trust.unknown_status == UnknownStatus::Refuse => {
            return Err(refuse(
                Refusal::RevocationUnknown,
                "no CRL is loaded and unknown status is refused",
            ));
        }
        Err(_) => None,
    };
    let usage = match role {
        Role::Client => KeyUsage::client_auth(),
        Role::Server => KeyUsage::server_auth(),
    };
    ee.verify_for_usage(
        provider.signature_verification_algorithms.all,
        &trust.anchors,
        &chain[1..],
        now,
        usage,
        revocation,
        None,
    )
    .map_err(|e| classify(e, &leaf, chain, trust, &id, now))?;
    revoked_in_any_crl(chain, trust, &id)?;

    if id.trust_domain != trust.trust_domain {
        return Err(refuse(
            Refusal::WrongTrustDomain,
            format!("{id} is not in trust domain {}", trust.trust_domain),
        ));
    }
    if trust.deny.denies(&id) {
        return Err(refuse(Refusal::DeniedIdentity, format!("{id} is on the deny list")));
    }
    Ok(id)
}

/// The leaf's SPIFFE ID: from its only URI SAN, nowhere else.
fn spiffe_id(leaf: &X509Certificate<'_>) -> Result<Identity, SvidError> {
    let names: Vec<GeneralName<'_>> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| san.value.general_names.clone())
        .unwrap_or_default();
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => Identity::parse(uri).map_err(|e| refuse(Refusal::MalformedSpiffeId, e.to_string())),
        [] => {
            let in_dns = names
                .iter()
                .any(|n| matches!(n, GeneralName::DNSName(d) if d.to_ascii_lowercase().contains("spiffe://")));
            let in_cn = leaf
                .subject()
                .iter_common_name()
                .any(|cn| cn.as_str().is_ok_and(|s| s.to_ascii_lowercase().contains("spiffe://")));
            if in_dns || in_cn {
                Err(refuse(
                    Refusal::SpiffeIdOutsideUriSan,
                    "a SPIFFE ID appears in a DNS SAN or the subject CN, which never count",
                ))
            } else {
                Err(refuse(Refusal::NoUriSan, "the certificate has no URI SAN"))
            }
        }
        _ => Err(refuse(Refusal::MultipleUriSans, format!("{} URI SANs", uris.len()))),
    }
}

/// Refuses a chain any certificate of which is listed in any loaded CRL of
/// its issuer (webpki alone would consult one CRL per issuer).
fn revoked_in_any_crl(chain: &[CertificateDer<'_>], trust: &TrustSnapshot, id: &Identity) -> Result<(), SvidError> {
    for (i, der) in chain.iter().enumerate() {
        let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| {
            refuse(
                Refusal::BadCertificate,
                format!("{id}: certificate {i} of the chain: {e}"),
            )
        })?;
        if !trust.is_revoked(cert.issuer().as_raw(), cert.raw_serial()) {
            continue;
        }
        return Err(if i == 0 {
            refuse(
                Refusal::RevokedLeaf,
                format!("{id}: serial {} is revoked", cert.raw_serial_as_string()),
            )
        } else {
            refuse(
                Refusal::RevokedIntermediate,
                format!("{id}: an intermediate of its chain is revoked"),
            )
        });
    }
    Ok(())
}

fn classify(
    e: webpki::Error,
    leaf: &X509Certificate<'_>,
    chain: &[CertificateDer<'_>],
    trust: &TrustSnapshot,
    id: &Identity,
    now: UnixTime,
) -> SvidError {
    use webpki::Error as W;
    match e {
        W::CertExpired { .. } => refuse(
            Refusal::Expired,
            format!("{id}: a certificate of the chain has expired"),
        ),
        W::CertNotValidYet { .. } => refuse(
            Refusal::NotYetValid,
            format!("{id}: a certificate of the chain is not valid yet"),
        ),
        W::CertRevoked => {
            if trust.is_revoked(leaf.issuer().as_raw(), leaf.raw_serial()) {
                refuse(
                    Refusal::RevokedLeaf,
                    format!("{id}: serial {} is revoked", leaf.raw_serial_as_string()),
                )
            } else {
                refuse(
                    Refusal::RevokedIntermediate,
                    format!("{id}: an intermediate of its chain is revoked"),
                )
            }
        }
        W::UnknownRevocationStatus if trust.has_stale_crl(leaf.issuer().as_raw(), now.as_secs() as i64) => refuse(
            Refusal::RevocationUnknown,
            format!("{id}: the CRL of its issuer is past its nextUpdate"),
        ),
        W::UnknownRevocationStatus => refuse(Refusal::RevocationUnknown, format!("{id}: no CRL covers its chain")),
        W::RequiredEkuNotFoundContext(_) => refuse(
            Refusal::MissingClientAuth,
            format!("{id}: extended key usage does not allow this role"),
        ),
        W::UnknownIssuer => {
            if issuer_is_known_intermediate(chain, trust) {
                refuse(
                    Refusal::MissingIntermediate,
                    format!("{id}: the chain lacks an intermediate between it and the root"),
                )
            } else {
                refuse(
                    Refusal::UnknownRoot,
                    format!("{id}: the chain does not lead to a trusted root"),
                )
            }
        }
        W::InvalidSignatureForPublicKey => refuse(
            Refusal::BadSignature,
            format!("{id}: a signature in the chain does not verify"),
        ),
        other => refuse(Refusal::BadCertificate, format!("{id}: {other:?}")),
    }
}

/// Walks the presented chain up by issuer name; true when its top was
/// issued by an intermediate this node knows but the peer did not send.
fn issuer_is_known_intermediate(chain: &[CertificateDer<'_>], trust: &TrustSnapshot) -> bool {
    let parsed: Vec<X509Certificate<'_>> = chain
        .iter()
        .filter_map(|c| X509Certificate::from_der(c.as_ref()).ok().map(|(_, p)| p))
        .collect();
    let Some(mut top) = parsed.first() else {
        return false;
    };
    for _ in 0..parsed.len() {
        match parsed
            .iter()
            .find(|p| p.subject().as_raw() == top.issuer().as_raw() && p.subject() != top.subject())
        {
            Some(next) => top = next,
            None => break,
        }
    }
    trust
        .known_intermediates
        .iter()
        .any(|k| k.as_slice() == top.issuer().as_raw())
}

/// rustls verifier for both roles, reading the current trust snapshot per
/// handshake so root, CRL and deny-list changes apply to the next one.
#[derive(Debug)]
pub struct SvidVerifier {
    trust: Arc<TrustStore>,
    provider: Arc<CryptoProvider>,
    expected: Option<Identity>,
}

impl SvidVerifier {
    /// Verifies clients (server side).
    pub(crate) fn for_clients(trust: Arc<TrustStore>, provider: Arc<CryptoProvider>) -> Self {
        SvidVerifier {
            trust,
            provider,
            expected: None,
        }
    }

    /// Verifies a server that must be `expected` (client side).
    pub fn for_server(trust: Arc<TrustStore>, provider: Arc<CryptoProvider>, expected: Identity) -> Self {
        SvidVerifier {
            trust,
            provider,
            expected: Some(expected),
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        role: Role,
        now: UnixTime,
    ) -> Result<Identity, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        let id = verify_peer(&chain, &self.trust.current(), role, now, &self.provider).map_err(into_rustls)?;
        if let Some(expected) = &self.expected
            && *expected != id
        {
            return Err(into_rustls(refuse(
                Refusal::WrongIdentity,
                format!("expected {expected}, got {id}"),
            )));
        }
        Ok(id)
    }
}

fn into_rustls(e: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl ClientCertVerifier for SvidVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, Role::Client, now)
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for SvidVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, Role::Server, now)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The refusal behind a handshake error, when it was ours.
pub(crate) fn refusal_of(e: &rustls::Error) -> Option<Refusal> {
    match e {
        rustls::Error::NoCertificatesPresented => Some(Refusal::NoClientCertificate),
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<SvidError>().map(|s| s.refusal)
        }
        _ => None,
    }
}

/// [`refusal_of`] for the `io::Error` tokio-rustls returns, or one that
/// wraps an [`SvidError`] directly (a registration refused after the handshake).
pub fn refusal_of_io(e: &std::io::Error) -> Option<Refusal> {
    let inner = e.get_ref()?;
    if let Some(s) = inner.downcast_ref::<SvidError>() {
        return Some(s.refusal);
    }
    inner.downcast_ref::<rustls::Error>().and_then(refusal_of)
}
