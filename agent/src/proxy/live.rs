//! The inbound connections a pod has open, with what policy saw of them,
//! so a policy change can close those it no longer allows (within one
//! config poll) while new connections see the new policy at once.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::policy::ConnInfo;
use crate::policy::model::Mode;
use crate::state::Snapshot;
use crate::state::workload::Pod;

struct Live {
    info: ConnInfo,
    cancel: CancellationToken,
    by_policy: Arc<AtomicBool>,
}

/// Open inbound connections of one pod.
#[derive(Default)]
pub struct LiveConns {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Live>>,
}

impl std::fmt::Debug for LiveConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveConns").finish_non_exhaustive()
    }
}

/// A registered connection; unregisters when dropped.
pub struct LiveGuard<'a> {
    conns: &'a LiveConns,
    id: u64,
    /// Fires when policy (or the parent token) ends the connection.
    pub cancel: CancellationToken,
    by_policy: Arc<AtomicBool>,
}

impl LiveGuard<'_> {
    /// Whether a policy change ended the connection.
    pub fn closed_by_policy(&self) -> bool {
        self.by_policy.load(Ordering::Relaxed)
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.conns
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl LiveConns {
    /// Registers a connection; its token is a child of `parent`.
    pub fn register(&self, info: ConnInfo, parent: &CancellationToken) -> LiveGuard<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = parent.child_token();
        let by_policy = Arc::new(AtomicBool::new(false));
        self.map.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Live {
                info,
                cancel: cancel.clone(),
                by_policy: by_policy.clone(),
            },
        );
        LiveGuard {
            conns: self,
            id,
            cancel,
            by_policy,
        }
    }

    /// Closes the connections `snap` no longer allows: plaintext on a port
    /// that became STRICT, or any connection authorization now denies.
    /// Returns how many.
    pub fn revalidate(&self, snap: &Snapshot, pod: &Pod) -> usize {
        let mtls = snap.mtls(pod);
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0;
        for live in map.values() {
            let strict_plaintext = live.info.src_identity.is_none() && mtls.mode(live.info.dst_port) == Mode::Strict;
            let decision = snap.authorize(pod, &live.info);
            if (strict_plaintext || !decision.allowed) && !live.cancel.is_cancelled() {
                tracing::info!(
                    pod = %pod.key(),
                    src = %live.info.src_ip,
                    port = live.info.dst_port,
                    reason = if strict_plaintext { "mtls_strict" } else { decision.reason },
                    policy = decision.policy,
                    "closing connection: policy changed"
                );
                live.by_policy.store(true, Ordering::Relaxed);
                live.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}
