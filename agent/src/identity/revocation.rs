//! Cutting off established connections when their peer stops being
//! trusted. Every mutually authenticated tunnel connection, accepted or
//! pooled, files its peer's verified chain in the register of open
//! connections (`proxy/open.rs`). A registration is checked against the
//! trust in force *after* it is filed, so a change published during the
//! handshake is not missed; each trust change re-verifies every filed chain
//! (deny list, CRLs, roots, expiry) and cancels the connections it no longer
//! admits, within one poll; and each connection is cancelled when the
//! earliest certificate of its peer's chain expires.

#![forbid(unsafe_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, UnixTime};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Identity;
use super::trust::{TrustSnapshot, TrustStore};
use super::verify::{Refusal, Role, SvidError, verify_peer};
use crate::proxy::open::{OpenConns, PeerFacts, PeerRegistration};

/// Whether `trust` still admits the peer at `now` (same checks as the
/// handshake, and the same identity).
fn admits(
    identity: &Identity,
    chain: &[CertificateDer<'_>],
    role: Role,
    trust: &TrustSnapshot,
) -> Result<(), SvidError> {
    let now = UnixTime::now();
    let id = verify_peer(chain, trust, role, now, &super::tls::provider())?;
    if id != *identity {
        return Err(SvidError {
            refusal: Refusal::WrongIdentity,
            detail: format!("registered as {identity}, chain proves {id}"),
        });
    }
    Ok(())
}

impl OpenConns {
    /// Registers a connection to `identity`, whose `chain` was verified in
    /// the handshake for `role` (the role the peer plays); `cancel` fires
    /// when the peer is revoked, denied or its chain expires. The chain is
    /// checked again against the trust in force once registered, so a change
    /// published during the handshake either finds the entry in its sweep
    /// or is seen here; an error means the connection must be dropped.
    pub fn register(
        self: &Arc<Self>,
        identity: Identity,
        chain: &[CertificateDer<'_>],
        role: Role,
        cancel: CancellationToken,
        trust: &TrustStore,
    ) -> Result<PeerRegistration, SvidError> {
        let chain: Vec<CertificateDer<'static>> = chain.iter().map(|c| c.clone().into_owned()).collect();
        let not_after = earliest_not_after(&chain)?;
        let peer = PeerFacts {
            identity,
            chain: Arc::new(chain),
            role,
            not_after,
        };
        let registration = self.register_peer(peer.clone(), cancel);
        admits(&peer.identity, &peer.chain, role, &trust.current())?;
        Ok(registration)
    }

    /// Cancels every connection `trust` no longer admits; returns how many.
    /// Chains are verified outside the lock, so registrations go on meanwhile.
    pub(crate) fn sweep(&self, trust: &TrustSnapshot) -> usize {
        let mut cut = 0;
        for (peer, handle) in self.peers() {
            if let Err(e) = admits(&peer.identity, &peer.chain, peer.role, trust) {
                tracing::warn!(peer = %peer.identity, refusal = e.refusal.as_str(), "closing connection: peer no longer trusted: {}", e.detail);
                handle.cut();
                cut += 1;
            }
        }
        cut
    }

    /// Sweeps on every trust change and expires connections on time, until
    /// `stop` fires.
    pub async fn run(self: Arc<Self>, trust: Arc<TrustStore>, stop: CancellationToken) {
        let mut rx = trust.subscribe();
        // A change made before the subscription is caught here.
        self.sweep(&trust.current());
        loop {
            let next = self.next_deadline();
            let expiry = async {
                match next {
                    Some(t) => tokio::time::sleep(t.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.changed() => {
                    if r.is_err() {
                        return;
                    }
                    self.sweep(&trust.current());
                }
                _ = self.earlier() => {}
                _ = expiry => {
                    self.expire(SystemTime::now());
                }
            }
        }
    }
}

/// The earliest notAfter of a chain.
fn earliest_not_after(chain: &[CertificateDer<'_>]) -> Result<SystemTime, SvidError> {
    let mut earliest: Option<SystemTime> = None;
    for (i, c) in chain.iter().enumerate() {
        let (_, cert) = X509Certificate::from_der(c.as_ref()).map_err(|e| SvidError {
            refusal: Refusal::BadCertificate,
            detail: format!("certificate {i} of the chain: {e}"),
        })?;
        let secs = cert.validity().not_after.timestamp();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0));
        earliest = Some(earliest.map_or(t, |e| e.min(t)));
    }
    earliest.ok_or_else(|| SvidError {
        refusal: Refusal::NoClientCertificate,
        detail: "empty chain".into(),
    })
}
