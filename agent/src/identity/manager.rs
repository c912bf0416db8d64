//! Workload certificates for the identities on this node.
//!
//! A certificate is issued when the first pod of an identity is captured,
//! shared by every pod of that identity, renewed at a jittered point around
//! half its lifetime, re-issued at once when the CA changes, and dropped when
//! the last pod of the identity goes. The CA directory and trust files are
//! polled; a CA that turns invalid at runtime is ignored (the previous one
//! keeps signing), logged once and reported through readiness.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use super::Identity;
use super::authority::Authority;
use super::ca::{CA_CERT, CA_KEY, CERT_CHAIN, CaError, ROOT_CERT};
use super::tls::certified_key;
use super::trust::{TrustSnapshot, TrustSources, TrustStore, UnknownStatus, WatchedFile};

/// Identity settings, from flags.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// Trust domain of every workload on this node.
    pub trust_domain: String,
    /// CA directory (Istio plug-in CA layout).
    pub ca_dir: PathBuf,
    /// Workload certificate lifetime.
    pub cert_lifetime: Duration,
    /// CRL files.
    pub crl_files: Vec<PathBuf>,
    /// Deny-list file.
    pub deny_file: Option<PathBuf>,
    /// Policy when no CRL covers a chain.
    pub unknown_status: UnknownStatus,
}

/// Public facts about a held certificate (never the key).
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// Whose.
    pub identity: Identity,
    /// Serial, hex.
    pub serial: String,
    /// Expiry.
    pub not_after: SystemTime,
    /// Planned renewal.
    pub renew_at: SystemTime,
    /// Pods using it.
    pub pods: usize,
}

struct Held {
    pods: usize,
    key: Arc<CertifiedKey>,
    info: CertInfo,
}

/// Issues, caches and renews workload certificates; owns the trust store.
pub struct CertManager {
    config: IdentityConfig,
    authority: RwLock<Arc<Authority>>,
    held: Mutex<HashMap<Identity, Held>>,
    trust: Arc<TrustStore>,
    sources: Mutex<TrustSources>,
    ca_files: Mutex<Vec<WatchedFile>>,
    ca_problem: Mutex<Option<String>>,
    /// Where signings are counted, once the agent wires its metrics in.
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("ca_dir", &self.config.ca_dir)
            .finish_non_exhaustive()
    }
}

impl CertManager {
    /// Loads the CA (failing with the file and problem if it is unusable)
    /// and the trust files.
    pub fn start(config: IdentityConfig) -> Result<Arc<CertManager>, CaError> {
        let authority = Arc::new(Authority::load(&config.ca_dir)?);
        let mut ca_files: Vec<WatchedFile> = [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN]
            .iter()
            .map(|f| WatchedFile::new(config.ca_dir.join(f)))
            .collect();
        for f in &mut ca_files {
            f.changed();
        }
        let mut sources = TrustSources::new(&config.crl_files, config.deny_file.as_deref())
            .with_unknown_status(config.unknown_status);
        let issuers = issuers(&authority);
        sources.refresh(&issuers, true);
        sources.check_stale(super::trust::unix_now());
        let trust = TrustStore::new(sources.apply(base_snapshot(&config, &authority), &issuers));
        tracing::info!(
            ca = %config.ca_dir.display(),
            fingerprint = authority.fingerprint(),
            roots = authority.roots().len(),
            trust_domain = %config.trust_domain,
            "certificate authority loaded"
        );
        Ok(Arc::new(CertManager {
            config,
            authority: RwLock::new(authority),
            held: Mutex::new(HashMap::new()),
            trust,
            sources: Mutex::new(sources),
            ca_files: Mutex::new(ca_files),
            ca_problem: Mutex::new(None),
            metrics: std::sync::OnceLock::new(),
        }))
    }

    /// The trust store every verifier reads.
    pub fn trust(&self) -> Arc<TrustStore> {
        self.trust.clone()
    }

    /// The identity of a pod.
    pub fn identity_of(&self, namespace: &str, service_account: &str) -> Identity {
        Identity::new(&self.config.trust_domain, namespace, service_account)
    }

    /// Counts each issuance and renewal, and its failures, in `metrics`.
    pub fn count_into(&self, metrics: Arc<crate::metrics::Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    fn count(&self, kind: &'static str, ok: bool) {
        if let Some(m) = self.metrics.get() {
            let result = if ok { "success" } else { "failure" };
            m.cert_issuances
                .get_or_create(&crate::metrics::IssueLabels { kind, result })
                .inc();
        }
    }

    /// A pod of `id` is now on this node: make sure its certificate exists.
    pub fn acquire(&self, id: &Identity) -> Result<(), CaError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get_mut(id) {
            h.pods += 1;
            h.info.pods = h.pods;
            return Ok(());
        }
        let issued = self.issue(id);
        self.count("issue", issued.is_ok());
        let mut h = issued?;
        h.pods = 1;
        h.info.pods = 1;
        held.insert(id.clone(), h);
        Ok(())
    }

    /// A pod of `id` left; the certificate goes with the last one.
    pub fn release(&self, id: &Identity) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get_mut(id) {
            h.pods = h.pods.saturating_sub(1);
            h.info.pods = h.pods;
            if h.pods == 0 {
                held.remove(id);
                tracing::info!(identity = %id, "certificate dropped: no pod uses it");
            }
        }
    }

    /// The current certificate of `id`.
    pub fn current(&self, id: &Identity) -> Option<Arc<CertifiedKey>> {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .map(|h| h.key.clone())
    }

    /// What is held, for status output.
    pub fn certificates(&self) -> Vec<CertInfo> {
        let mut v: Vec<CertInfo> = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|h| h.info.clone())
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    /// Problems for readiness: an unusable CA or trust file.
    pub fn problems(&self) -> Vec<String> {
        let mut p: Vec<String> = self
            .ca_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        p.extend(self.sources.lock().unwrap_or_else(|e| e.into_inner()).problems());
        p
    }

    fn issue(&self, id: &Identity) -> Result<Held, CaError> {
        let authority = self.authority.read().unwrap_or_else(|e| e.into_inner()).clone();
        let lifetime = self.config.cert_lifetime;
        let issued = authority.issue(id, lifetime)?;
        let key = certified_key(issued.chain, issued.key).map_err(|e| CaError::Sign(e.to_string()))?;
        let issued_at = SystemTime::now();
        let renew_at = issued_at + lifetime.mul_f64(jitter());
        let info = CertInfo {
            identity: id.clone(),
            serial: super::ca::hex(&issued.serial),
            not_after: issued.not_after,
            renew_at,
            pods: 0,
        };
        tracing::info!(identity = %id, serial = %info.serial, lifetime_s = lifetime.as_secs(), "workload certificate issued");
        Ok(Held { pods: 0, key, info })
    }

    /// One round of housekeeping: CA and trust-file changes, renewals.
    pub fn tick(&self) {
        let ca_changed = {
            let mut files = self.ca_files.lock().unwrap_or_else(|e| e.into_inner());
            files.iter_mut().fold(false, |acc, f| f.changed() | acc)
        };
        let mut reissue_all = false;
        if ca_changed {
            match Authority::load(&self.config.ca_dir) {
                Ok(a) => {
                    tracing::info!(
                        fingerprint = a.fingerprint(),
                        "certificate authority changed; re-issuing workload certificates"
                    );
                    *self.authority.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(a);
                    *self.ca_problem.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    reissue_all = true;
                }
                Err(e) => {
                    let msg = format!("CA directory rejected, still signing with the previous CA: {e}");
                    let mut p = self.ca_problem.lock().unwrap_or_else(|e| e.into_inner());
                    if p.as_deref() != Some(msg.as_str()) {
                        tracing::error!("{msg}");
                        *p = Some(msg);
                    }
                }
            }
        }
        let authority = self.authority.read().unwrap_or_else(|e| e.into_inner()).clone();
        let issuers = issuers(&authority);
        let trust_changed = {
            let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
            let refreshed = sources.refresh(&issuers, reissue_all);
            // A CRL going stale changes what is admitted when unknown status
            // is refused: rebuild, so live connections are swept.
            sources.check_stale(super::trust::unix_now()) | refreshed
        };
        if trust_changed || reissue_all {
            let snap = self
                .sources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .apply(base_snapshot(&self.config, &authority), &issuers);
            self.trust.replace(snap);
        }
        self.renew(reissue_all);
    }

    fn renew(&self, all: bool) {
        let now = SystemTime::now();
        let due: Vec<Identity> = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, h)| all || h.info.renew_at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let issued = self.issue(&id);
            self.count("renew", issued.is_ok());
            match issued {
                Ok(mut fresh) => {
                    let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(h) = held.get_mut(&id) {
                        fresh.pods = h.pods;
                        fresh.info.pods = h.pods;
                        *h = fresh;
                    }
                }
                Err(e) => {
                    tracing::error!(identity = %id, "renewing certificate failed, will retry: {e}")
                }
            }
        }
    }

    /// Runs housekeeping every `interval` until cancelled.
    pub async fn run(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        loop {
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.tick()).await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

/// Certificates that may sign CRLs: the roots and our CA chain.
fn issuers(a: &Authority) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    a.roots().iter().chain(a.chain().iter()).cloned().collect()
}

fn base_snapshot(config: &IdentityConfig, a: &Authority) -> TrustSnapshot {
    let mut s = TrustSnapshot::new(&config.trust_domain, a.roots().to_vec(), a.chain());
    s.unknown_status = config.unknown_status;
    s
}

/// A renewal point between 45% and 55% of the lifetime, so the certificates
/// of many identities (and nodes) do not all renew at once.
fn jitter() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 2];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    0.45 + 0.10 * f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX)
}
