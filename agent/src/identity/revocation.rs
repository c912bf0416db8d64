//! Cutting off established connections when their peer becomes revoked or
//! denied. Every mutually authenticated connection registers its peer's
//! chain; each trust change sweeps the registry and cancels the connections
//! it no longer admits, well within the 5 s the issue allows.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Identity;
use super::trust::{TrustSnapshot, TrustStore};

struct Entry {
    identity: Identity,
    /// (raw issuer, serial) of every certificate of the peer's chain.
    chain: Vec<(Vec<u8>, Vec<u8>)>,
    cancel: CancellationToken,
}

/// Live authenticated connections by peer.
#[derive(Default)]
pub struct PeerRegistry {
    entries: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
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

impl PeerRegistry {
    /// An empty registry.
    pub fn new() -> Arc<PeerRegistry> {
        Arc::new(PeerRegistry::default())
    }

    /// Registers a connection with `identity` and its verified `chain`;
    /// `cancel` fires if the peer is revoked or denied later.
    pub fn register(
        self: &Arc<Self>,
        identity: Identity,
        chain: &[CertificateDer<'_>],
        cancel: CancellationToken,
    ) -> Registration {
        let chain = chain
            .iter()
            .filter_map(|c| {
                let (_, p) = X509Certificate::from_der(c.as_ref()).ok()?;
                Some((p.issuer().as_raw().to_vec(), p.raw_serial().to_vec()))
            })
            .collect();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Entry {
                identity,
                chain,
                cancel,
            },
        );
        Registration {
            registry: self.clone(),
            id,
        }
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
    pub fn sweep(&self, trust: &TrustSnapshot) -> usize {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut cut = 0;
        for e in entries.values() {
            let revoked = e.chain.iter().any(|(issuer, serial)| trust.is_revoked(issuer, serial));
            let denied = trust.deny.denies(&e.identity);
            if (revoked || denied) && !e.cancel.is_cancelled() {
                tracing::warn!(peer = %e.identity, revoked, denied, "closing connection: peer no longer trusted");
                e.cancel.cancel();
                cut += 1;
            }
        }
        cut
    }

    /// Sweeps on every trust change until `stop` fires.
    pub async fn run(self: Arc<Self>, trust: Arc<TrustStore>, stop: CancellationToken) {
        let mut rx = trust.subscribe();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            self.sweep(&trust.current());
        }
    }
}
