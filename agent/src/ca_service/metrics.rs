//! The CA service's own `/metrics`: requests by result and reason (rate
//! limit refusals among them), how long each took, the rate limiter's
//! tables, and when the signing intermediate expires, in one registry.

#![forbid(unsafe_code)]

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A request's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// `issued` or `refused`.
    pub(crate) result: &'static str,
    /// `ok`, or the refusal's reason.
    pub(crate) reason: &'static str,
}

/// One rate-limit table.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TableLabels {
    /// `caller` or `node`.
    pub(crate) table: &'static str,
}

/// The families.
pub(crate) struct CaMetrics {
    registry: Registry,
    /// `nodeward_ca_requests_total`.
    pub(crate) requests: Family<RequestLabels, Counter>,
    /// `nodeward_ca_request_duration_seconds`.
    pub(crate) duration: Histogram,
    /// `nodeward_ca_rate_limit_keys`, set at each scrape.
    pub(crate) limiter_keys: Family<TableLabels, Gauge>,
    /// `nodeward_ca_intermediate_expiry_timestamp_seconds`.
    pub(crate) intermediate_expiry: Gauge,
}

impl CaMetrics {
    pub(crate) fn new() -> Self {
        // 1 ms to about 8 s: signing takes milliseconds, a synced log
        // line adds a disk flush.
        let duration = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.001, 2.0, 14,
        ));
        let mut m = CaMetrics {
            registry: Registry::default(),
            requests: Family::default(),
            duration,
            limiter_keys: Family::default(),
            intermediate_expiry: Gauge::default(),
        };
        m.registry.register(
            "nodeward_ca_requests",
            "Certificate requests by result and reason",
            m.requests.clone(),
        );
        m.registry.register(
            "nodeward_ca_request_duration_seconds",
            "Time from a whole request to its answer",
            m.duration.clone(),
        );
        m.registry.register(
            "nodeward_ca_rate_limit_keys",
            "Callers and nodes the issuance rate limiter tracks",
            m.limiter_keys.clone(),
        );
        m.registry.register(
            "nodeward_ca_intermediate_expiry_timestamp_seconds",
            "Unix time at which the signing intermediate expires",
            m.intermediate_expiry.clone(),
        );
        m
    }

    /// The text exposition.
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
