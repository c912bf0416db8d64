//! Connection outcome counters, by direction, close reason and refusal
//! kind (`nodeward_connections_closed_total`): the handle the proxies count
//! into, recording in the agent's [`Metrics`].

#![forbid(unsafe_code)]

use std::sync::Arc;

use crate::metrics::{ClosedLabels, Metrics};
use crate::outcome::{Counted, Direction, Refusal};

/// Counters of ended connections, backed by the agent's metrics.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    metrics: Arc<Metrics>,
}

impl Counters {
    /// Counters recording into `metrics`.
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Counters { metrics }
    }

    /// The metrics the counters record into, for the other families.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Counts one connection; every label comes from `crate::outcome`.
    pub(crate) fn count(&self, direction: Direction, reason: Counted, refusal: Option<Refusal>) {
        self.metrics
            .closed
            .get_or_create(&ClosedLabels {
                direction: direction.as_str(),
                reason: reason.as_str(),
                refusal: refusal.map_or("", Refusal::as_str),
            })
            .inc();
    }
}
