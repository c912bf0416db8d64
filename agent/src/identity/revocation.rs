//! Cutting off established connections when their peer stops being
//! trusted. Every mutually authenticated tunnel connection, accepted or
//! pooled, registers its peer's verified chain. A registration is checked
//! against the trust in force *after* it is filed, so a change published
//! during the handshake is not missed; each trust change re-verifies every
//! registered chain (deny list, CRLs, roots, expiry) and cancels the
//! connections it no longer admits, within one poll; and each connection is
//! cancelled when the earliest certificate of its peer's chain expires.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::{CertificateDer, UnixTime};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Identity;
use super::trust::{TrustSnapshot, TrustStore};
use super::verify::{Refusal, Role, SvidError, verify_peer};

struct Entry {
    identity: Identity,
    chain: Arc<Vec<CertificateDer<'static>>>,
    role: Role,
    /// The earliest notAfter of the chain: the connection's maximum age.
    not_after: SystemTime,
    cancel: CancellationToken,
}

/// Live authenticated connections by peer.
#[derive(Default)]
pub struct PeerRegistry {
    entries: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
    /// When the sweeper next wakes to expire connections.
    deadline: Mutex<Option<SystemTime>>,
    /// Wakes the sweeper for a registration that expires before `deadline`.
    earlier: Notify,
}

impl std::fmt::Debug for PeerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerRegistry")
            .field("connections", &self.len())
            .finish()
    }
}

/// Removes its connection from the registry when dropped.
pub struct Registration {
    registry: Arc<PeerRegistry>,
    id: u64,
    not_after: SystemTime,
}

impl Registration {
    /// When the peer's chain expires and the connection is cancelled.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

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

impl PeerRegistry {
    /// An empty registry.
    pub fn new() -> Arc<PeerRegistry> {
        Arc::new(PeerRegistry::default())
    }

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
    ) -> Result<Registration, SvidError> {
        let chain: Vec<CertificateDer<'static>> = chain.iter().map(|c| c.clone().into_owned()).collect();
        let not_after = earliest_not_after(&chain)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let wake = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.insert(
                id,
                Entry {
                    identity: identity.clone(),
                    chain: Arc::new(chain.clone()),
                    role,
                    not_after,
                    cancel,
                },
            );
            // Under the entries lock, as the sweeper sets its deadline.
            let deadline = self.deadline.lock().unwrap_or_else(|e| e.into_inner());
            deadline.is_none_or(|d| not_after < d)
        };
        if wake {
            self.earlier.notify_one();
        }
        let registration = Registration {
            registry: self.clone(),
            id,
            not_after,
        };
        admits(&identity, &chain, role, &trust.current())?;
        Ok(registration)
    }

    /// Number of registered connections.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Cancels every connection `trust` no longer admits; returns how many.
    /// Chains are verified outside the lock, so registrations go on meanwhile.
    pub fn sweep(&self, trust: &TrustSnapshot) -> usize {
        type Live = (Identity, Arc<Vec<CertificateDer<'static>>>, Role, CancellationToken);
        let live: Vec<Live> = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| !e.cancel.is_cancelled())
            .map(|e| (e.identity.clone(), e.chain.clone(), e.role, e.cancel.clone()))
            .collect();
        let mut cut = 0;
        for (identity, chain, role, cancel) in live {
            if let Err(e) = admits(&identity, &chain, role, trust) {
                tracing::warn!(peer = %identity, refusal = e.refusal.as_str(), "closing connection: peer no longer trusted: {}", e.detail);
                cancel.cancel();
                cut += 1;
            }
        }
        cut
    }

    /// Cancels the connections whose peer chain has expired at `now`;
    /// returns how many.
    pub fn expire(&self, now: SystemTime) -> usize {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut cut = 0;
        for e in entries.values() {
            if e.not_after <= now && !e.cancel.is_cancelled() {
                tracing::info!(peer = %e.identity, "closing connection: peer certificate expired");
                e.cancel.cancel();
                cut += 1;
            }
        }
        cut
    }

    /// The earliest expiry among live connections, remembered as the
    /// sweeper's deadline.
    fn next_deadline(&self) -> Option<SystemTime> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let next = entries
            .values()
            .filter(|e| !e.cancel.is_cancelled())
            .map(|e| e.not_after)
            .min();
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = next;
        next
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
                _ = self.earlier.notified() => {}
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
