//! Issuance rate limits: a token bucket per caller (the pod its token is
//! bound to, else its ServiceAccount) and one per node (the token's node),
//! so one caller, or everything on one node, cannot make the service sign
//! without bound, while other nodes are served. A request takes a token
//! from both; a refusal is gRPC `RESOURCE_EXHAUSTED`, counted and logged.
//!
//! The tables are bounded: past [`MAX_KEYS`] keys, full buckets (callers
//! that have been quiet) are forgotten first; a table full of busy keys
//! refuses new keys rather than grow (fail closed).

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Keys tracked per table at most.
pub(crate) const MAX_KEYS: usize = 16 * 1024;

/// A rate and a burst: `burst` certificates at once, refilled at `per_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Rate {
    /// Tokens added per second.
    pub(crate) per_second: f64,
    /// Bucket size.
    pub(crate) burst: f64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Refused since the last token taken: only the first refusal of an
    /// episode is worth a line of the issuance log.
    refused: bool,
}

/// One table of buckets.
#[derive(Debug)]
struct Table {
    rate: Rate,
    buckets: HashMap<String, Bucket>,
}

impl Table {
    fn refill(&self, b: &Bucket, now: Instant) -> f64 {
        let dt = now.saturating_duration_since(b.at).as_secs_f64();
        (b.tokens + dt * self.rate.per_second).min(self.rate.burst)
    }

    /// Whether `key` has a token now (without taking it).
    fn has(&mut self, key: &str, now: Instant) -> bool {
        match self.buckets.get(key) {
            Some(b) => self.refill(b, now) >= 1.0,
            None => self.rate.burst >= 1.0 && (self.buckets.len() < MAX_KEYS || self.forget_quiet(now)),
        }
    }

    fn take(&mut self, key: &str, now: Instant) {
        let tokens = self.buckets.get(key).map_or(self.rate.burst, |b| self.refill(b, now));
        self.buckets.insert(
            key.to_string(),
            Bucket {
                tokens: tokens - 1.0,
                at: now,
                refused: false,
            },
        );
    }

    /// Marks `key` refused; true if it was not already (a new episode).
    fn refuse(&mut self, key: &str) -> bool {
        match self.buckets.get_mut(key) {
            Some(b) => !std::mem::replace(&mut b.refused, true),
            None => true,
        }
    }

    /// Drops the buckets that are full again (no recent requests); true
    /// when room was made.
    fn forget_quiet(&mut self, now: Instant) -> bool {
        let burst = self.rate.burst;
        let rate = self.rate;
        self.buckets.retain(|_, b| {
            let dt = now.saturating_duration_since(b.at).as_secs_f64();
            (b.tokens + dt * rate.per_second).min(burst) < burst
        });
        self.buckets.len() < MAX_KEYS
    }
}

/// Which limit refused, and whether the refusal opens an episode (the
/// key was served since its last refusal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Limited {
    /// The caller's own bucket is empty.
    Caller {
        /// The first refusal since the caller was last served.
        first: bool,
    },
    /// The node's bucket is empty.
    Node {
        /// The first refusal since the node was last served.
        first: bool,
    },
}

impl Limited {
    /// The refusal's reason label.
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Limited::Caller { .. } => "rate_limited_caller",
            Limited::Node { .. } => "rate_limited_node",
        }
    }

    /// Whether this refusal opens an episode.
    pub(crate) fn first(self) -> bool {
        match self {
            Limited::Caller { first } | Limited::Node { first } => first,
        }
    }
}

/// The service's two tables.
#[derive(Debug)]
pub(crate) struct Limiter {
    tables: Mutex<(Table, Table)>,
}

impl Limiter {
    /// Limits per caller and per node.
    pub(crate) fn new(caller: Rate, node: Rate) -> Self {
        let table = |rate| Table {
            rate,
            buckets: HashMap::new(),
        };
        Limiter {
            tables: Mutex::new((table(caller), table(node))),
        }
    }

    /// Takes a token for `caller` (and for `node`, when the token names
    /// one), or says which limit is reached; nothing is taken on refusal.
    pub(crate) fn admit(&self, caller: &str, node: Option<&str>, now: Instant) -> Result<(), Limited> {
        let mut t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        let (callers, nodes) = &mut *t;
        if !callers.has(caller, now) {
            let first = callers.refuse(caller);
            return Err(Limited::Caller { first });
        }
        if let Some(n) = node
            && !nodes.has(n, now)
        {
            let first = nodes.refuse(n);
            return Err(Limited::Node { first });
        }
        callers.take(caller, now);
        if let Some(n) = node {
            nodes.take(n, now);
        }
        Ok(())
    }

    /// Keys tracked (callers, nodes), for the metrics.
    pub(crate) fn tracked(&self) -> (usize, usize) {
        let t = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        (t.0.buckets.len(), t.1.buckets.len())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_caller_and_per_node_and_others_are_unaffected() {
        let rate = |per_second, burst| Rate { per_second, burst };
        let l = Limiter::new(rate(1.0, 3.0), rate(2.0, 5.0));
        let t0 = Instant::now();
        for _ in 0..3 {
            l.admit("a", Some("n1"), t0).unwrap();
        }
        assert_eq!(l.admit("a", Some("n1"), t0), Err(Limited::Caller { first: true }));
        assert_eq!(l.admit("a", Some("n1"), t0), Err(Limited::Caller { first: false }));
        // Another caller on the same node: the node has two left.
        l.admit("b", Some("n1"), t0).unwrap();
        l.admit("b", Some("n1"), t0).unwrap();
        assert_eq!(l.admit("c", Some("n1"), t0), Err(Limited::Node { first: true }));
        // Another node is served.
        l.admit("c", Some("n2"), t0).unwrap();
        // A refusal takes nothing: one second refills one of a's.
        let t1 = t0 + Duration::from_secs(1);
        l.admit("a", Some("n2"), t1).unwrap();
        // Served since: a new episode.
        assert_eq!(l.admit("a", Some("n2"), t1), Err(Limited::Caller { first: true }));
    }

    #[test]
    fn the_tables_stay_bounded_forgetting_quiet_callers_first() {
        let l = Limiter::new(
            Rate {
                per_second: 1.0,
                burst: 2.0,
            },
            Rate {
                per_second: 1.0,
                burst: 2.0,
            },
        );
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            l.admit(&format!("c{i}"), None, t0).unwrap();
        }
        // All busy: a new caller is refused rather than grow the table.
        assert_eq!(l.admit("new", None, t0), Err(Limited::Caller { first: true }));
        // Once they are quiet (full again), they make room.
        l.admit("new", None, t0 + Duration::from_secs(2)).unwrap();
        assert!(l.tracked().0 <= MAX_KEYS);
    }
}
