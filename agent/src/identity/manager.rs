//! Workload certificates for the identities on this node.
//!
//! A certificate is issued when the first pod of an identity is captured,
//! shared by every pod of that identity, renewed at a jittered point around
//! half its lifetime, re-issued at once when the CA changes, and dropped when
//! the last pod of the identity goes. The CA directory and trust files are
//! polled; a CA that turns invalid at runtime is ignored (the previous one
//! keeps signing), logged once and reported through readiness.
//!
//! Certificates come from an [`Issuer`]: the local CA directory signs
//! inline when a pod arrives; a CA service is called by housekeeping, so a
//! new identity has no certificate (its pods' mesh traffic is refused)
//! until the service answers. Failures are retried with jittered
//! exponential backoff, counted, and shown on readiness; a held
//! certificate keeps serving until it expires.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use super::Identity;
use super::authority::Authority;
use super::ca::{CA_CERT, CA_KEY, CERT_CHAIN, CaError, ROOT_CERT};
use super::ca_client::{CaClient, CaClientConfig};
use super::issuer::{IssueError, Issuer};
use super::tls::certified_key;
use super::trust::{TrustSnapshot, TrustSources, TrustStore, UnknownStatus, WatchedFile};

/// Where certificates come from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// A CA directory on this node (Istio plug-in CA layout): the node
    /// holds the signing key.
    Dir(PathBuf),
    /// A CA service speaking Istio's CA protocol: only CSRs leave the node.
    Service(CaClientConfig),
}

/// Identity settings, from flags.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// Trust domain of every workload on this node.
    pub trust_domain: String,
    /// Where certificates come from.
    pub ca: CaSource,
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
    pub(crate) identity: Identity,
    /// Serial, hex.
    pub(crate) serial: String,
    /// Expiry.
    pub not_after: SystemTime,
    /// Planned renewal.
    pub(crate) renew_at: SystemTime,
    /// Pods using it.
    pub(crate) pods: usize,
}

struct Held {
    pods: usize,
    /// `None` until the first certificate arrives, or after it expired.
    key: Option<Arc<CertifiedKey>>,
    info: Option<CertInfo>,
    /// Consecutive failed requests.
    failures: u32,
    /// No request before this.
    retry_at: Option<Instant>,
    last_error: Option<String>,
}

impl Held {
    fn pending(pods: usize) -> Held {
        Held {
            pods,
            key: None,
            info: None,
            failures: 0,
            retry_at: None,
            last_error: None,
        }
    }
}

/// Issues, caches and renews workload certificates; owns the trust store.
pub struct CertManager {
    config: IdentityConfig,
    issuer: RwLock<Arc<dyn Issuer>>,
    held: Mutex<HashMap<Identity, Held>>,
    trust: Arc<TrustStore>,
    sources: Mutex<TrustSources>,
    ca_files: Mutex<Vec<WatchedFile>>,
    ca_problem: Mutex<Option<String>>,
    chain_seen: Mutex<Vec<CertificateDer<'static>>>,
    requests: Mutex<BTreeMap<&'static str, u64>>,
    failures_total: AtomicU64,
    wake: tokio::sync::Notify,
    /// Told whenever a certificate is stored, for [`CertManager::wait_for`].
    issued: tokio::sync::Notify,
    /// Where signings are counted, once the agent wires its metrics in.
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("ca", &self.config.ca)
            .finish_non_exhaustive()
    }
}

/// The issuer a source describes: the CA directory loaded and checked, or
/// a client of the CA service (its roots read).
fn load_issuer(source: &CaSource) -> Result<Arc<dyn Issuer>, CaError> {
    match source {
        CaSource::Dir(dir) => Ok(Arc::new(Authority::load(dir)?)),
        CaSource::Service(c) => {
            let runtime = tokio::runtime::Handle::try_current().map_err(|e| CaError::Sign(e.to_string()))?;
            Ok(Arc::new(CaClient::new(c.clone(), runtime)?))
        }
    }
}

/// The files whose change reloads the issuer.
fn watched(source: &CaSource) -> Vec<PathBuf> {
    match source {
        CaSource::Dir(dir) => [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN]
            .iter()
            .map(|f| dir.join(f))
            .collect(),
        CaSource::Service(c) => vec![c.root_file.clone()],
    }
}

impl CertManager {
    /// Loads the CA (failing with the file and problem if it is unusable)
    /// and the trust files. With a CA service, must run inside the runtime
    /// that will carry its calls.
    pub fn start(config: IdentityConfig) -> Result<Arc<CertManager>, CaError> {
        let issuer = load_issuer(&config.ca)?;
        Ok(CertManager::with_issuer(config, issuer))
    }

    /// A manager over a given issuer (tests substitute one); `config.ca`
    /// still names the files whose change reloads it.
    pub(crate) fn with_issuer(config: IdentityConfig, issuer: Arc<dyn Issuer>) -> Arc<CertManager> {
        let mut ca_files: Vec<WatchedFile> = watched(&config.ca).into_iter().map(WatchedFile::new).collect();
        for f in &mut ca_files {
            f.changed();
        }
        let mut sources = TrustSources::new(&config.crl_files, config.deny_file.as_deref())
            .with_unknown_status(config.unknown_status);
        let issuers = issuers(issuer.as_ref());
        sources.refresh(&issuers, true);
        sources.check_stale(super::trust::unix_now());
        let trust = TrustStore::new(sources.apply(base_snapshot(&config, issuer.as_ref()), &issuers));
        if let CaSource::Dir(dir) = &config.ca {
            tracing::warn!(
                ca = %dir.display(),
                "--ca-dir: this node holds the CA signing key, so taking it over mints any identity; use --ca-address with `nodeward ca serve` to keep keys off the nodes"
            );
        }
        tracing::info!(
            issuer = %issuer.describe(),
            roots = issuer.roots().len(),
            trust_domain = %config.trust_domain,
            "certificate authority loaded"
        );
        Arc::new(CertManager {
            config,
            chain_seen: Mutex::new(issuer.chain()),
            issuer: RwLock::new(issuer),
            held: Mutex::new(HashMap::new()),
            trust,
            sources: Mutex::new(sources),
            ca_files: Mutex::new(ca_files),
            ca_problem: Mutex::new(None),
            requests: Mutex::new(BTreeMap::new()),
            failures_total: AtomicU64::new(0),
            wake: tokio::sync::Notify::new(),
            issued: tokio::sync::Notify::new(),
            metrics: std::sync::OnceLock::new(),
        })
    }

    /// The trust store every verifier reads.
    pub fn trust(&self) -> Arc<TrustStore> {
        self.trust.clone()
    }

    /// The identity of a pod.
    pub(crate) fn identity_of(&self, namespace: &str, service_account: &str) -> Identity {
        Identity::new(&self.config.trust_domain, namespace, service_account)
    }

    fn issuer(&self) -> Arc<dyn Issuer> {
        self.issuer.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Counts each issuance and renewal, and its failures, in `metrics`.
    pub(crate) fn count_into(&self, metrics: Arc<crate::metrics::Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    fn count_issuance(&self, kind: &'static str, ok: bool) {
        if let Some(m) = self.metrics.get() {
            let result = if ok { "success" } else { "failure" };
            m.cert_issuances
                .get_or_create(&crate::metrics::IssueLabels { kind, result })
                .inc();
        }
    }

    /// A pod of `id` is now on this node: make sure its certificate exists
    /// (a local CA signs at once; a CA service is asked by housekeeping,
    /// woken now).
    pub fn acquire(&self, id: &Identity) -> Result<(), CaError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get_mut(id) {
            h.pods += 1;
            if let Some(i) = &mut h.info {
                i.pods = h.pods;
            }
            return Ok(());
        }
        let issuer = self.issuer();
        if !issuer.is_local() {
            held.insert(id.clone(), Held::pending(1));
            drop(held);
            self.wake.notify_one();
            return Ok(());
        }
        let issued = self.issue(issuer.as_ref(), id);
        self.count_issuance("issue", issued.is_ok());
        let (key, mut info) = issued.map_err(|e| match e {
            IssueError::Local(e) => e,
            other => CaError::Sign(other.to_string()),
        })?;
        info.pods = 1;
        let mut h = Held::pending(1);
        h.key = Some(key);
        h.info = Some(info);
        held.insert(id.clone(), h);
        self.issued.notify_waiters();
        Ok(())
    }

    /// A pod of `id` left; the certificate goes with the last one.
    pub fn release(&self, id: &Identity) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = held.get_mut(id) {
            h.pods = h.pods.saturating_sub(1);
            if let Some(i) = &mut h.info {
                i.pods = h.pods;
            }
            if h.pods == 0 {
                held.remove(id);
                tracing::info!(identity = %id, "certificate dropped: no pod uses it");
            }
        }
    }

    /// The current certificate of `id`.
    pub(crate) fn current(&self, id: &Identity) -> Option<Arc<CertifiedKey>> {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .and_then(|h| h.key.clone())
    }

    /// Waits until `id` has a certificate, or `deadline`; whether it has.
    /// A pod is captured as soon as it is found, and a CA service signs
    /// its first certificate a moment later (or, while the service is
    /// down, once it is back): the pod's first connections wait for it
    /// within their own deadline rather than being refused at once.
    pub(crate) async fn wait_for(&self, id: &Identity, deadline: tokio::time::Instant) -> bool {
        loop {
            let issued = self.issued.notified();
            tokio::pin!(issued);
            // Registered before the check, so a signing in between is seen.
            issued.as_mut().enable();
            if self.current(id).is_some() {
                return true;
            }
            if tokio::time::timeout_at(deadline, issued).await.is_err() {
                return self.current(id).is_some();
            }
        }
    }

    /// What is held, for status output.
    pub fn certificates(&self) -> Vec<CertInfo> {
        let mut v: Vec<CertInfo> = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter_map(|h| h.info.clone())
            .collect();
        v.sort_by(|a, b| a.identity.cmp(&b.identity));
        v
    }

    /// Problems for readiness: an unusable CA or trust file, identities
    /// without a certificate, renewals failing.
    pub fn problems(&self) -> Vec<String> {
        let mut p: Vec<String> = self
            .ca_problem
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids: Vec<(&Identity, &Held)> = held.iter().filter(|(_, h)| h.key.is_none() || h.failures > 0).collect();
        ids.sort_by(|a, b| a.0.cmp(b.0));
        for (id, h) in ids {
            let state = if h.key.is_none() {
                "no certificate"
            } else {
                "renewal failing"
            };
            let why = h.last_error.as_deref().unwrap_or("requested");
            p.push(format!("{id}: {state} ({} failed attempts): {why}", h.failures));
        }
        drop(held);
        p.extend(self.sources.lock().unwrap_or_else(|e| e.into_inner()).problems());
        p
    }

    /// Certificate request counters, Prometheus text.
    pub(crate) fn stats(&self) -> String {
        let mut out = String::from("# TYPE nodeward_certificate_requests counter\n");
        for (result, n) in self.requests.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            out.push_str(&format!(
                "nodeward_certificate_requests_total{{result=\"{result}\"}} {n}\n"
            ));
        }
        out
    }

    /// Failed certificate requests since start.
    #[cfg(test)]
    pub(crate) fn failures(&self) -> u64 {
        self.failures_total.load(Ordering::Relaxed)
    }

    fn count(&self, result: &'static str) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(result)
            .or_default() += 1;
    }

    fn issue(&self, issuer: &dyn Issuer, id: &Identity) -> Result<(Arc<CertifiedKey>, CertInfo), IssueError> {
        let lifetime = self.config.cert_lifetime;
        let issued = match issuer.issue(id, lifetime) {
            Ok(i) => i,
            Err(e) => {
                self.count(e.kind());
                self.failures_total.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.count("ok");
        let key = certified_key(issued.chain, issued.key).map_err(|e| CaError::Sign(e.to_string()))?;
        let issued_at = SystemTime::now();
        // Renew around half of what was granted (a CA may cap the lifetime).
        let granted = issued
            .not_after
            .duration_since(issued_at)
            .unwrap_or_default()
            .min(lifetime);
        let renew_at = issued_at + granted.mul_f64(jitter());
        let info = CertInfo {
            identity: id.clone(),
            serial: super::ca::hex(&issued.serial),
            not_after: issued.not_after,
            renew_at,
            pods: 0,
        };
        tracing::info!(identity = %id, serial = %info.serial, lifetime_s = granted.as_secs(), "workload certificate issued");
        Ok((key, info))
    }

    /// One round of housekeeping: CA and trust-file changes, renewals.
    pub fn tick(&self) {
        let ca_changed = {
            let mut files = self.ca_files.lock().unwrap_or_else(|e| e.into_inner());
            files.iter_mut().fold(false, |acc, f| f.changed() | acc)
        };
        let mut reissue_all = false;
        if ca_changed {
            match load_issuer(&self.config.ca) {
                Ok(a) => {
                    tracing::info!(
                        issuer = %a.describe(),
                        "certificate authority changed; re-issuing workload certificates"
                    );
                    *self.issuer.write().unwrap_or_else(|e| e.into_inner()) = a;
                    *self.ca_problem.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    reissue_all = true;
                }
                Err(e) => {
                    let msg = match &self.config.ca {
                        CaSource::Dir(_) => format!("CA directory rejected, still signing with the previous CA: {e}"),
                        CaSource::Service(_) => format!("CA root file rejected, still using the previous roots: {e}"),
                    };
                    let mut p = self.ca_problem.lock().unwrap_or_else(|e| e.into_inner());
                    if p.as_deref() != Some(msg.as_str()) {
                        tracing::error!("{msg}");
                        *p = Some(msg);
                    }
                }
            }
        }
        self.renew(reissue_all);
        let issuer = self.issuer();
        // A CA service's intermediates are learnt from its answers.
        let chain_changed = {
            let chain = issuer.chain();
            let mut seen = self.chain_seen.lock().unwrap_or_else(|e| e.into_inner());
            let changed = *seen != chain;
            *seen = chain;
            changed
        };
        let issuers = issuers(issuer.as_ref());
        let trust_changed = {
            let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
            let refreshed = sources.refresh(&issuers, reissue_all || chain_changed);
            // A CRL going stale changes what is admitted when unknown status
            // is refused: rebuild, so live connections are swept.
            sources.check_stale(super::trust::unix_now()) | refreshed
        };
        if trust_changed || reissue_all || chain_changed {
            let snap = self
                .sources
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .apply(base_snapshot(&self.config, issuer.as_ref()), &issuers);
            self.trust.replace(snap);
        }
    }

    fn renew(&self, all: bool) {
        let now = SystemTime::now();
        let instant = Instant::now();
        let due: Vec<Identity> = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            for (id, h) in held.iter_mut() {
                // An expired certificate proves nothing: drop it, so its
                // pods are refused rather than presenting it.
                if h.info.as_ref().is_some_and(|i| i.not_after <= now) && h.key.is_some() {
                    tracing::error!(identity = %id, "workload certificate expired without renewal");
                    h.key = None;
                }
            }
            held.iter()
                .filter(|(_, h)| {
                    let waited = h.retry_at.is_none_or(|t| t <= instant);
                    let wanted = all || h.key.is_none() || h.info.as_ref().is_none_or(|i| i.renew_at <= now);
                    wanted && (waited || all)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        let issuer = self.issuer();
        for id in due {
            let result = self.issue(issuer.as_ref(), &id);
            let renewal = self
                .held
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .is_some_and(|h| h.info.is_some());
            self.count_issuance(if renewal { "renew" } else { "issue" }, result.is_ok());
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let Some(h) = held.get_mut(&id) else { continue };
            match result {
                Ok((key, mut info)) => {
                    info.pods = h.pods;
                    h.key = Some(key);
                    h.info = Some(info);
                    h.failures = 0;
                    h.retry_at = None;
                    h.last_error = None;
                    self.issued.notify_waiters();
                }
                Err(e) => {
                    h.failures = h.failures.saturating_add(1);
                    let wait = backoff(h.failures);
                    h.retry_at = Some(Instant::now() + wait);
                    h.last_error = Some(e.to_string());
                    tracing::error!(
                        identity = %id,
                        kind = e.kind(),
                        attempt = h.failures,
                        retry_in_ms = wait.as_millis() as u64,
                        has_certificate = h.key.is_some(),
                        "certificate request failed, will retry: {e}"
                    );
                }
            }
        }
    }

    /// Runs housekeeping every `interval` (and when a new identity waits
    /// for a CA service) until cancelled.
    pub async fn run(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        loop {
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.tick()).await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

/// Wait before retry `attempt` (1-based): 0.5 s doubling up to 30 s, times
/// a random 0.5–1.0 so nodes that lost the CA together do not return together.
fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1u32 << attempt.saturating_sub(1).min(6));
    base.min(Duration::from_secs(30)).mul_f64(0.5 + 0.5 * unit_random())
}

/// Certificates that may sign CRLs: the roots and our CA chain.
fn issuers(a: &dyn Issuer) -> Vec<CertificateDer<'static>> {
    a.roots().into_iter().chain(a.chain()).collect()
}

fn base_snapshot(config: &IdentityConfig, a: &dyn Issuer) -> TrustSnapshot {
    let mut s = TrustSnapshot::new(&config.trust_domain, a.roots(), &a.chain());
    s.unknown_status = config.unknown_status;
    s
}

/// A renewal point between 45% and 55% of the lifetime, so the certificates
/// of many identities (and nodes) do not all renew at once.
fn jitter() -> f64 {
    0.45 + 0.10 * unit_random()
}

/// A random number in 0.0..=1.0.
fn unit_random() -> f64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 2];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::identity::authority::IssuedCert;

    /// A CA service stand-in: the local CA behind a switch.
    #[derive(Debug)]
    struct Flaky {
        ca: Authority,
        down: AtomicBool,
    }

    impl Issuer for Flaky {
        fn issue(&self, id: &Identity, lifetime: Duration) -> Result<IssuedCert, IssueError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(IssueError::Unavailable("connection refused".into()));
            }
            Ok(self.ca.issue(id, lifetime)?)
        }
        fn roots(&self) -> Vec<CertificateDer<'static>> {
            self.ca.roots().to_vec()
        }
        fn chain(&self) -> Vec<CertificateDer<'static>> {
            self.ca.chain().to_vec()
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
        fn is_local(&self) -> bool {
            false
        }
    }

    #[test]
    fn a_ca_service_outage_keeps_current_certificates_retries_with_backoff_and_says_so() {
        let d = std::env::temp_dir().join(format!("nodeward-manager-flaky-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        super::super::ca_cli::init(&d).unwrap();
        let flaky = Arc::new(Flaky {
            ca: Authority::load(&d).unwrap(),
            down: AtomicBool::new(false),
        });
        let config = IdentityConfig {
            trust_domain: "cluster.local".into(),
            ca: CaSource::Dir(d.clone()),
            cert_lifetime: Duration::from_secs(2),
            crl_files: Vec::new(),
            deny_file: None,
            unknown_status: UnknownStatus::Accept,
        };
        let m = CertManager::with_issuer(config, flaky.clone());
        let web = Identity::new("cluster.local", "shop", "web");
        m.acquire(&web).unwrap();
        assert!(
            m.current(&web).is_none(),
            "a CA service is asked by housekeeping, not inline"
        );
        m.tick();
        let first = m.current(&web).expect("issued on the next tick");

        // The service goes away past the renewal point.
        flaky.down.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(1200));
        m.tick();
        assert_eq!(m.failures(), 1);
        assert!(
            Arc::ptr_eq(&m.current(&web).unwrap(), &first),
            "the current certificate keeps serving"
        );
        m.tick();
        assert_eq!(m.failures(), 1, "no retry before the backoff");
        let problems = m.problems().join("\n");
        assert!(
            problems.contains("renewal failing") && problems.contains("connection refused"),
            "{problems}"
        );
        assert!(m.stats().contains("result=\"unavailable\"} 1"), "{}", m.stats());

        // A new identity meanwhile gets nothing, and readiness says so.
        let db = Identity::new("cluster.local", "shop", "db");
        m.acquire(&db).unwrap();
        m.tick();
        assert!(m.current(&db).is_none());
        assert!(m.problems().iter().any(|p| p.contains("shop/sa/db: no certificate")));

        // Back: renewal resumes once the backoff has passed.
        flaky.down.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(600));
        m.tick();
        assert!(!Arc::ptr_eq(&m.current(&web).unwrap(), &first), "renewed");
        assert!(m.current(&db).is_some());
        assert!(m.problems().is_empty(), "{:?}", m.problems());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_thirty_seconds() {
        for attempt in 1..40 {
            let b = backoff(attempt);
            let full = Duration::from_millis(500 * (1u64 << (attempt - 1).min(6))).min(Duration::from_secs(30));
            assert!(b >= full / 2 && b <= full, "attempt {attempt}: {b:?}");
        }
    }
}
