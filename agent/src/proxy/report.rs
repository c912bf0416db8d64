//! The end of a proxied connection: what it was ([`Outcome`]), its one
//! `connection closed` log line and its count on `/stats`, all labelled
//! from `crate::outcome`.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Instant;

use super::relay::RelayStats;
use super::{PodContext, unmap};
use crate::identity::Identity;
use crate::outcome::{CloseReason, Counted, Direction, Refusal, Transport};

/// The result of handling one connection, for its log line.
#[derive(Debug)]
pub struct Outcome {
    /// The destination the client asked for, when known.
    pub dst: Option<SocketAddr>,
    /// Byte counts and reason.
    pub stats: RelayStats,
    /// How it was carried.
    pub transport: Transport,
    /// The authenticated peer, for tunnels.
    pub peer_identity: Option<Identity>,
    /// The policy that refused it, if one did.
    pub policy: Option<String>,
    /// What refused it (certificate, bound, policy, request), if something did.
    pub refusal: Option<Refusal>,
    /// The Service (`namespace/name`) it was addressed to; `dst` is then
    /// the endpoint chosen.
    pub service: Option<String>,
}

impl Outcome {
    /// An outcome for a connection refused before relaying.
    pub fn refused(dst: Option<SocketAddr>, reason: CloseReason) -> Self {
        Outcome {
            dst,
            stats: RelayStats {
                sent: 0,
                received: 0,
                reason: Some(reason),
            },
            transport: Transport::Plaintext,
            peer_identity: None,
            refusal: None,
            policy: None,
            service: None,
        }
    }

    /// An outcome of a relay.
    pub fn relayed(dst: SocketAddr, stats: RelayStats, transport: Transport) -> Self {
        Outcome {
            dst: Some(dst),
            stats,
            transport,
            peer_identity: None,
            refusal: None,
            policy: None,
            service: None,
        }
    }

    /// The same, carried (or to be carried) by `transport`.
    pub fn via(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// The same, refused by `refusal`.
    pub fn refusal(mut self, refusal: Option<Refusal>) -> Self {
        self.refusal = refusal;
        self
    }

    /// The same, addressed to `service`.
    pub fn service(mut self, service: Option<String>) -> Self {
        self.service = service;
        self
    }

    /// The same, with the authenticated peer.
    pub fn peer(mut self, identity: Identity) -> Self {
        self.peer_identity = Some(identity);
        self
    }
}

/// Logs the end of one proxied connection.
pub fn log_connection(ctx: &PodContext, dir: Direction, src: SocketAddr, o: &Outcome, started: Instant) {
    let reason = final_reason(ctx, o.stats.reason);
    ctx.mesh.counters.count(dir, Counted::Closed(reason), o.refusal);
    let dst = o.dst.map(|d| d.to_string()).unwrap_or_default();
    tracing::info!(
        target: "nodeward::conn",
        direction = dir.as_str(),
        pod = %ctx.pod.key,
        src = %unmap(src),
        dst = %dst,
        service = o.service.as_deref(),
        transport = o.transport.as_str(),
        peer_identity = o.peer_identity.as_ref().map(|i| i.to_string()),
        refusal = o.refusal.map(Refusal::as_str),
        policy = o.policy.as_deref(),
        sent = o.stats.sent,
        received = o.stats.received,
        duration_ms = started.elapsed().as_millis() as u64,
        reason = reason.as_str(),
        "connection closed"
    );
}

/// Logs the AUDIT policies a connection matched and what its dry-run
/// policies would have decided.
pub fn log_audits(ctx: &PodContext, info: &crate::policy::ConnInfo, d: &crate::policy::Decision) {
    for policy in &d.audited {
        tracing::info!(
            target: "nodeward::audit",
            policy = %policy,
            pod = %ctx.pod.key,
            src = %info.src_ip,
            principal = info.src_identity.as_ref().map(|i| i.principal()),
            dst_port = info.dst_port,
            allowed = d.allowed,
            "audit"
        );
    }
    for dry in &d.dry_run {
        tracing::info!(
            target: "nodeward::audit",
            policy = %dry.policy,
            pod = %ctx.pod.key,
            src = %info.src_ip,
            principal = info.src_identity.as_ref().map(|i| i.principal()),
            dst_port = info.dst_port,
            would = dry.would(),
            allowed = d.allowed,
            "dry-run"
        );
    }
}

/// A cancelled relay ended because of the pod or the agent; say which.
pub fn final_reason(ctx: &PodContext, reason: Option<CloseReason>) -> CloseReason {
    reason.unwrap_or(if ctx.lifecycle.hard_stop.is_cancelled() {
        CloseReason::Shutdown
    } else {
        CloseReason::PodRemoved
    })
}
