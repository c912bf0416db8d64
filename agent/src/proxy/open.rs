//! The one register of open connections on the node. Every proxied inbound
//! connection (plaintext or tunnel stream) is filed with what policy saw of
//! it, and every mutually authenticated tunnel connection (accepted or
//! pooled) with its peer's verified chain. Both kinds of change sweep the
//! same register: a policy change ([`OpenConns::revalidate`]) closes what
//! policy no longer allows, a trust change or a chain's expiry (the sweeper
//! in `identity/revocation.rs`) closes what trust no longer admits. The
//! entry records which sweep cut it, so the connection's log line can say.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::pki_types::CertificateDer;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::identity::Identity;
use crate::identity::verify::Role;
use crate::outcome::CloseReason;
use crate::policy::ConnInfo;
use crate::policy::model::Mode;
use crate::state::Snapshot;

/// What policy saw of a connection to a pod.
struct PolicyFacts {
    /// The pod's key in the snapshot.
    pod: String,
    info: ConnInfo,
}

/// An authenticated peer, as the trust sweep needs it.
#[derive(Clone)]
pub(crate) struct PeerFacts {
    /// The identity the handshake proved.
    pub(crate) identity: Identity,
    /// The chain the handshake verified, leaf first.
    pub(crate) chain: Arc<Vec<CertificateDer<'static>>>,
    /// The role the peer plays.
    pub(crate) role: Role,
    /// The earliest notAfter of the chain: the connection's maximum age.
    pub(crate) not_after: SystemTime,
}

/// Which sweep cut an entry (0: none yet).
#[derive(Debug, Default)]
struct CutBy(AtomicU8);

impl CutBy {
    const POLICY: u8 = 1;
    const TRUST: u8 = 2;

    fn set(&self, by: u8) {
        let _ = self.0.compare_exchange(0, by, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn reason(&self) -> Option<CloseReason> {
        match self.0.load(Ordering::Relaxed) {
            Self::POLICY => Some(CloseReason::PolicyChanged),
            Self::TRUST => Some(CloseReason::PeerRevoked),
            _ => None,
        }
    }
}

struct Entry {
    cancel: CancellationToken,
    cut_by: Arc<CutBy>,
    policy: Option<PolicyFacts>,
    peer: Option<PeerFacts>,
}

/// Every open connection that a policy or trust change may have to close.
#[derive(Default)]
pub struct OpenConns {
    entries: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
    /// When the trust sweeper next wakes to expire connections.
    deadline: Mutex<Option<SystemTime>>,
    /// Wakes the sweeper for a registration that expires before `deadline`.
    earlier: Notify,
}

impl std::fmt::Debug for OpenConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenConns").field("connections", &self.len()).finish()
    }
}

/// A filed connection; removed from the register when dropped.
pub(crate) struct Registration {
    open: Arc<OpenConns>,
    id: u64,
    /// Fires when a sweep (or the parent token) ends the connection.
    pub(crate) cancel: CancellationToken,
    cut_by: Arc<CutBy>,
}

/// A filed authenticated tunnel connection; removed when dropped.
pub struct PeerRegistration {
    _registration: Registration,
    not_after: SystemTime,
}

impl PeerRegistration {
    /// When the peer's chain expires and the connection is cancelled.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
}

impl Registration {
    /// The close reason of the sweep that cut the connection, if one did:
    /// `policy_changed` or `peer_revoked`.
    pub(crate) fn cut_by(&self) -> Option<CloseReason> {
        self.cut_by.reason()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.open.lock().remove(&self.id);
    }
}

impl OpenConns {
    /// An empty register.
    pub fn new() -> Arc<OpenConns> {
        Arc::new(OpenConns::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file(
        self: &Arc<Self>,
        cancel: CancellationToken,
        policy: Option<PolicyFacts>,
        peer: Option<PeerFacts>,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cut_by = Arc::new(CutBy::default());
        let not_after = peer.as_ref().map(|p| p.not_after);
        let wake = {
            let mut entries = self.lock();
            entries.insert(
                id,
                Entry {
                    cancel: cancel.clone(),
                    cut_by: cut_by.clone(),
                    policy,
                    peer,
                },
            );
            // Under the entries lock, as the sweeper sets its deadline.
            not_after.is_some_and(|t| {
                let deadline = self.deadline.lock().unwrap_or_else(|e| e.into_inner());
                deadline.is_none_or(|d| t < d)
            })
        };
        if wake {
            self.earlier.notify_one();
        }
        Registration {
            open: self.clone(),
            id,
            cancel,
            cut_by,
        }
    }

    /// Files a connection to pod `pod` with what policy saw of it; its
    /// token is a child of `parent`.
    pub(crate) fn register_conn(
        self: &Arc<Self>,
        pod: &str,
        info: ConnInfo,
        parent: &CancellationToken,
    ) -> Registration {
        let policy = PolicyFacts {
            pod: pod.to_owned(),
            info,
        };
        self.file(parent.child_token(), Some(policy), None)
    }

    /// Files an authenticated tunnel connection to `peer`; `cancel` fires
    /// when the trust sweeper cuts it. Use `identity::revocation`'s
    /// `register`, which checks the chain once filed.
    pub(crate) fn register_peer(self: &Arc<Self>, peer: PeerFacts, cancel: CancellationToken) -> PeerRegistration {
        let not_after = peer.not_after;
        PeerRegistration {
            _registration: self.file(cancel, None, Some(peer)),
            not_after,
        }
    }

    /// Number of open connections filed.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no connection is filed.
    #[cfg(any(test, feature = "testing"))]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes the connections `snap` no longer allows: plaintext on a port
    /// that became STRICT, or any connection authorization now denies.
    /// Returns how many.
    pub(crate) fn revalidate(&self, snap: &Snapshot) -> usize {
        let entries = self.lock();
        let mut closed = 0;
        for e in entries.values().filter(|e| !e.cancel.is_cancelled()) {
            let Some(facts) = &e.policy else { continue };
            let Some(pod) = snap.pods.get(&facts.pod) else { continue };
            let info = &facts.info;
            let strict_plaintext = info.src_identity.is_none() && snap.mtls(pod).mode(info.dst_port) == Mode::Strict;
            let decision = snap.authorize(pod, info);
            if strict_plaintext || !decision.allowed {
                tracing::info!(
                    pod = %pod.key(),
                    src = %info.src_ip,
                    port = info.dst_port,
                    reason = if strict_plaintext { CloseReason::MtlsStrict.as_str() } else { decision.reason.as_str() },
                    policy = decision.policy,
                    "closing connection: policy changed"
                );
                e.cut_by.set(CutBy::POLICY);
                e.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// The authenticated peers of open connections not cut yet, with their
    /// tokens, so the trust sweep can verify them outside the lock.
    pub(crate) fn peers(&self) -> Vec<(PeerFacts, PeerCut)> {
        self.lock()
            .values()
            .filter(|e| !e.cancel.is_cancelled())
            .filter_map(|e| {
                let peer = e.peer.clone()?;
                let cut = PeerCut {
                    cancel: e.cancel.clone(),
                    cut_by: e.cut_by.clone(),
                };
                Some((peer, cut))
            })
            .collect()
    }

    /// Cancels the connections whose peer chain has expired at `now`;
    /// returns how many.
    pub(crate) fn expire(&self, now: SystemTime) -> usize {
        let entries = self.lock();
        let mut cut = 0;
        for e in entries.values() {
            let Some(peer) = &e.peer else { continue };
            if peer.not_after <= now && !e.cancel.is_cancelled() {
                tracing::info!(peer = %peer.identity, "closing connection: peer certificate expired");
                e.cut_by.set(CutBy::TRUST);
                e.cancel.cancel();
                cut += 1;
            }
        }
        cut
    }

    /// The earliest expiry among open authenticated connections,
    /// remembered as the trust sweeper's deadline.
    pub(crate) fn next_deadline(&self) -> Option<SystemTime> {
        let entries = self.lock();
        let next = entries
            .values()
            .filter(|e| !e.cancel.is_cancelled())
            .filter_map(|e| e.peer.as_ref().map(|p| p.not_after))
            .min();
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = next;
        next
    }

    /// Resolves when a registration expires before the remembered deadline.
    pub(crate) async fn earlier(&self) {
        self.earlier.notified().await
    }
}

/// The handle the trust sweep cuts a connection by.
pub(crate) struct PeerCut {
    cancel: CancellationToken,
    cut_by: Arc<CutBy>,
}

impl PeerCut {
    /// Ends the connection because its peer is no longer trusted.
    pub(crate) fn cut(&self) {
        self.cut_by.set(CutBy::TRUST);
        self.cancel.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn peer(not_after: SystemTime) -> PeerFacts {
        PeerFacts {
            identity: Identity::parse("spiffe://cluster.local/ns/a/sa/b").unwrap(),
            chain: Arc::new(Vec::new()),
            role: Role::Client,
            not_after,
        }
    }

    #[test]
    fn trust_cuts_only_authenticated_connections_and_says_so() {
        let open = OpenConns::new();
        let info = ConnInfo {
            src_ip: "10.0.0.1".parse().unwrap(),
            src_identity: None,
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: 80,
        };
        let plain = open.register_conn("ns/pod", info, &CancellationToken::new());
        let now = SystemTime::now();
        let (old, fresh) = (CancellationToken::new(), CancellationToken::new());
        let _old = open.register_peer(peer(now), old.clone());
        let _fresh = open.register_peer(peer(now + Duration::from_secs(3600)), fresh.clone());
        assert_eq!(open.len(), 3);
        assert_eq!(open.next_deadline(), Some(now), "only peers have a deadline");

        assert_eq!(open.expire(now), 1);
        assert!(old.is_cancelled() && !fresh.is_cancelled() && !plain.cancel.is_cancelled());
        let peers = open.peers();
        assert_eq!(peers.len(), 1, "a cut or plaintext connection is not swept again");
        peers[0].1.cut();
        assert!(fresh.is_cancelled() && !plain.cancel.is_cancelled());
        assert_eq!(plain.cut_by(), None);

        drop(plain);
        assert_eq!(open.len(), 2, "a dropped registration leaves the register");
    }
}
