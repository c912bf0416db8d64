//! Connection outcome counters, by direction, close reason and refusal
//! kind: a small fixed label set, shown on the admin endpoint (`/stats`)
//! until the metrics work exports them.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use crate::outcome::{Counted, Direction, Refusal};

/// Counters of ended connections.
#[derive(Debug, Default)]
pub struct Counters {
    map: Mutex<BTreeMap<(&'static str, &'static str, &'static str), u64>>,
}

impl Counters {
    /// Counts one connection; every label comes from `crate::outcome`.
    pub fn count(&self, direction: Direction, reason: Counted, refusal: Option<Refusal>) {
        let key = (direction.as_str(), reason.as_str(), refusal.map_or("", Refusal::as_str));
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(key).or_default() += 1;
    }

    /// Prometheus text exposition of the counters.
    pub fn render(&self) -> String {
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::from("# TYPE nodeward_connections_closed_total counter\n");
        for ((dir, reason, refusal), n) in m.iter() {
            let _ = writeln!(
                out,
                "nodeward_connections_closed_total{{direction=\"{dir}\",reason=\"{reason}\",refusal=\"{refusal}\"}} {n}"
            );
        }
        out
    }
}
