//! What the agent shows operators, on three listeners of the node (never
//! inside a pod, so apps cannot reach them):
//!
//! * `:15021/healthz/ready` — 200 when every readiness check
//!   ([`readiness`]) is ready, else 503 listing each problem;
//! * `:15020/metrics` and `/stats/prometheus` — [`crate::metrics`];
//! * `127.0.0.1:15000` — `/config_dump` ([`config_dump`]), `/certs`
//!   ([`certs`]) and `/logging?level=` (POST): configuration, certificates
//!   and the log level, loopback only.
//!
//! All three are served by [`server`] on a thread and runtime of their
//! own, so a scrape never takes time from the proxies.

#![forbid(unsafe_code)]

pub(crate) mod certs;
pub(crate) mod config_dump;
pub(crate) mod readiness;
pub(crate) mod server;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::identity::manager::CertManager;
use crate::metrics::{CertLabels, Metrics, PodLabels, ResultLabels, unix_seconds};
use crate::state::Store;
use readiness::{Check, Readiness};

/// A managed pod's capture, as the pod manager last saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodCapture {
    /// Pod UID.
    pub(crate) uid: String,
    /// The network namespace its capture is attached to; `None`: not captured.
    pub(crate) netns_cookie: Option<u64>,
    /// Why it is not captured (yet).
    pub(crate) problem: Option<String>,
}

/// Capture state of every enrolled pod of the node, by `namespace/name`:
/// reported by the pod manager each round, read by readiness, metrics and
/// `/config_dump`.
#[derive(Debug, Default)]
pub(crate) struct Captures {
    pods: Mutex<BTreeMap<String, PodCapture>>,
    reported: AtomicBool,
}

impl Captures {
    /// Replaces the state with this round's.
    pub(crate) fn report(&self, pods: BTreeMap<String, PodCapture>) {
        *self.pods.lock().unwrap_or_else(|e| e.into_inner()) = pods;
        self.reported.store(true, Ordering::Release);
    }

    /// The state of every enrolled pod.
    pub(crate) fn pods(&self) -> BTreeMap<String, PodCapture> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Readiness problems: pods enrolled but not captured.
    pub(crate) fn problems(&self) -> Vec<String> {
        if !self.reported.load(Ordering::Acquire) {
            return vec!["pods not reconciled yet".into()];
        }
        self.pods()
            .into_iter()
            .filter(|(_, c)| c.netns_cookie.is_none())
            .map(|(key, c)| {
                format!(
                    "pod {key} is enrolled but not captured: {}",
                    c.problem.as_deref().unwrap_or("pending")
                )
            })
            .collect()
    }
}

/// The config directory's health: files rejected at the last poll, counted
/// reloads, and the readiness check they decide.
#[derive(Debug)]
pub(crate) struct ConfigStatus {
    check: Check,
    metrics: Arc<Metrics>,
    rejected: Mutex<Vec<(PathBuf, String)>>,
}

impl ConfigStatus {
    /// Status reporting into `check` and `metrics`.
    pub(crate) fn new(check: Check, metrics: Arc<Metrics>) -> Self {
        ConfigStatus {
            check,
            metrics,
            rejected: Mutex::new(Vec::new()),
        }
    }

    /// Reports one poll: the files now rejected, and whether a new
    /// configuration was applied.
    pub(crate) fn report(&self, rejected: Vec<(PathBuf, String)>, applied: bool) {
        let mut last = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        let new_failures = rejected.iter().filter(|r| !last.contains(r)).count();
        if new_failures > 0 {
            self.metrics
                .config_reloads
                .get_or_create(&ResultLabels { result: "failure" })
                .inc_by(new_failures as u64);
        }
        if applied {
            self.metrics
                .config_reloads
                .get_or_create(&ResultLabels { result: "success" })
                .inc();
        }
        self.check.set(
            rejected
                .iter()
                .map(|(file, e)| format!("config file {} rejected: {e}", file.display()))
                .collect(),
        );
        *last = rejected;
    }

    /// Files rejected at the last poll, with why.
    pub(crate) fn rejected(&self) -> Vec<(PathBuf, String)> {
        self.rejected.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the three listeners read.
#[derive(Debug)]
pub(crate) struct AdminState {
    /// This node.
    pub(crate) node: String,
    /// Readiness checks.
    pub(crate) readiness: Arc<Readiness>,
    /// Metric families.
    pub(crate) metrics: Arc<Metrics>,
    /// Cluster state.
    pub(crate) store: Store,
    /// Certificates, when the agent has a CA.
    pub(crate) certs: Option<Arc<CertManager>>,
    /// Pods' capture.
    pub(crate) captures: Arc<Captures>,
    /// The config directory's health.
    pub(crate) config: Arc<ConfigStatus>,
}

impl AdminState {
    /// The metrics text, with the gauges read from their sources first.
    pub(crate) fn render_metrics(&self) -> String {
        let m = &self.metrics;
        m.cert_expiry.clear();
        for c in self.certs.iter().flat_map(|c| c.certificates()) {
            m.cert_expiry
                .get_or_create(&CertLabels {
                    identity: c.identity.to_string(),
                    serial: c.serial.clone(),
                })
                .set(unix_seconds(c.not_after));
        }
        m.ebpf_attached.clear();
        for (key, c) in self.captures.pods() {
            let (namespace, pod) = key.split_once('/').unwrap_or(("", &key));
            m.ebpf_attached
                .get_or_create(&PodLabels {
                    namespace: namespace.into(),
                    pod: pod.into(),
                })
                .set(i64::from(c.netns_cookie.is_some()));
        }
        let mut text = m.render();
        // Requests to a CA service, kept by the certificate manager.
        if let Some(extra) = self.certs.as_ref().map(|c| c.stats()) {
            let at = text.rfind("# EOF").unwrap_or(text.len());
            text.insert_str(at, &extra);
        }
        text
    }
}
