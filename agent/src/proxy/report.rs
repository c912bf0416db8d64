//! The end of a proxied connection: what it was ([`Outcome`]), its one
//! `connection closed` access-log line and its metrics (Istio's
//! `istio_tcp_*` and Nodeward's own), all labelled from `crate::outcome`
//! and from names the cluster bounds.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use super::relay::RelayStats;
use super::{PodContext, unmap};
use crate::identity::Identity;
use crate::metrics::{DenialLabels, HandshakeLabels, Metrics, SecurityLabels, TcpLabels, WorkloadLabels};
use crate::outcome::{CloseReason, Counted, Direction, Refusal, Transport};
use crate::state::Snapshot;
use crate::state::workload::Pod;

/// The result of handling one connection, for its log line.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The destination the client asked for, when known.
    pub(crate) dst: Option<SocketAddr>,
    /// Byte counts and reason.
    pub(crate) stats: RelayStats,
    /// How it was carried.
    pub(crate) transport: Transport,
    /// The authenticated peer, for tunnels.
    pub(crate) peer_identity: Option<Identity>,
    /// The policy that refused it, if one did.
    pub(crate) policy: Option<String>,
    /// What refused it (certificate, bound, policy, request), if something did.
    pub(crate) refusal: Option<Refusal>,
    /// The Service (`namespace/name`) it was addressed to; `dst` is then
    /// the endpoint chosen.
    pub(crate) service: Option<String>,
    /// Its Istio labels, when it was counted opened as its ends were
    /// joined; a refused connection is counted opened when it ends.
    opened: Option<TcpLabels>,
}

impl Outcome {
    /// An outcome for a connection refused before relaying.
    pub(crate) fn refused(dst: Option<SocketAddr>, reason: CloseReason) -> Self {
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
            opened: None,
        }
    }

    /// The outcome of the relay of a connection counted opened.
    pub(crate) fn relayed(mut opened: Opened, stats: RelayStats) -> Self {
        Outcome {
            dst: Some(opened.dst),
            stats,
            transport: opened.transport,
            peer_identity: opened.peer_identity.take(),
            refusal: None,
            policy: opened.policy.take(),
            service: opened.service.take(),
            opened: opened.labels.take(),
        }
    }

    /// The same, carried (or to be carried) by `transport`.
    pub(crate) fn via(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// The same, refused by `refusal`.
    pub(crate) fn refusal(mut self, refusal: Option<Refusal>) -> Self {
        self.refusal = refusal;
        self
    }

    /// The same, addressed to `service`.
    pub(crate) fn service(mut self, service: Option<String>) -> Self {
        self.service = service;
        self
    }

    /// The same, with the authenticated peer.
    pub(crate) fn peer(mut self, identity: Identity) -> Self {
        self.peer_identity = Some(identity);
        self
    }
}

/// One side of a connection as logs and metrics name it.
#[derive(Debug)]
struct Party {
    workload: String,
    namespace: String,
    principal: String,
}

const UNKNOWN: &str = "unknown";

impl Party {
    fn unknown() -> Self {
        Party {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
        }
    }

    fn of(pod: Option<&Pod>, identity: Option<&Identity>) -> Self {
        let mut p = Party::unknown();
        if let Some(pod) = pod {
            p.workload = workload_name(pod).to_string();
            p.namespace = pod.namespace.clone();
        }
        if let Some(id) = identity {
            p.principal = id.to_string();
        }
        p
    }
}

/// The local pod and the remote end of a connection, as logs and metrics
/// name them: `src` is the client, `dst` the destination it asked for.
fn parties(
    ctx: &PodContext,
    snap: &Snapshot,
    dir: Direction,
    src: SocketAddr,
    dst: Option<SocketAddr>,
    peer: Option<&Identity>,
) -> (Party, Party) {
    let local = Party::of(snap.pods.get(&ctx.pod.key).map(|p| p.as_ref()), ctx.identity.as_ref());
    let remote_ip = match dir {
        Direction::Outbound => dst.map(|d| d.ip()),
        Direction::Inbound | Direction::Tunnel => Some(src.ip()),
    };
    let remote_pod = remote_ip.and_then(|ip| snap.enrolled_workload(unmap(SocketAddr::new(ip, 0)).ip()));
    (local, Party::of(remote_pod.as_deref(), peer))
}

/// Istio's labels of a connection between `local` and `remote`.
fn tcp_labels(
    dir: Direction,
    local: &Party,
    remote: &Party,
    mtls: bool,
    service: Option<&str>,
    response_flags: &'static str,
) -> TcpLabels {
    let (source, destination) = match dir {
        Direction::Outbound => (local, remote),
        Direction::Inbound | Direction::Tunnel => (remote, local),
    };
    let service = service.and_then(|s| s.split_once('/'));
    TcpLabels {
        reporter: if dir == Direction::Outbound {
            "source"
        } else {
            "destination"
        },
        source_workload: source.workload.clone(),
        source_workload_namespace: source.namespace.clone(),
        source_principal: source.principal.clone(),
        destination_workload: destination.workload.clone(),
        destination_workload_namespace: destination.namespace.clone(),
        destination_principal: destination.principal.clone(),
        destination_service_name: service.map_or(UNKNOWN, |(_, name)| name).to_string(),
        destination_service_namespace: service.map_or(UNKNOWN, |(ns, _)| ns).to_string(),
        connection_security_policy: if mtls { "mutual_tls" } else { "none" },
        response_flags,
    }
}

/// A connection whose two ends are joined, counted in
/// `istio_tcp_connections_opened_total` now (flags `-`), so that opened
/// minus closed is what is open. Its close is counted with the same
/// labels: by its log line, or, when it ends without one (reset before a
/// byte, its task dropped at shutdown), when this is dropped.
#[derive(Debug)]
pub(crate) struct Opened {
    dst: SocketAddr,
    transport: Transport,
    peer_identity: Option<Identity>,
    service: Option<String>,
    policy: Option<String>,
    labels: Option<TcpLabels>,
    closed: Family<TcpLabels, Counter>,
}

impl Opened {
    /// Counts a connection from `src` to `dst` opened, carried by
    /// `transport` to `peer` (the authenticated or expected identity of a
    /// tunnel's other end), addressed to `service`.
    pub(crate) fn count(
        ctx: &PodContext,
        dir: Direction,
        src: SocketAddr,
        dst: SocketAddr,
        transport: Transport,
        peer: Option<&Identity>,
        service: Option<&str>,
    ) -> Self {
        let snap = ctx.mesh.store.current();
        let (local, remote) = parties(ctx, &snap, dir, src, Some(dst), peer);
        let mtls = transport == Transport::Hbone;
        let labels = tcp_labels(dir, &local, &remote, mtls, service, NO_FLAGS);
        let m = ctx.mesh.counters.metrics();
        m.tcp_opened.get_or_create(&labels).inc();
        Opened {
            dst,
            transport,
            peer_identity: peer.cloned(),
            service: service.map(str::to_string),
            policy: None,
            labels: Some(labels),
            closed: m.tcp_closed.clone(),
        }
    }

    /// The same, admitted by `policy` (the ALLOW that matched), for its log line.
    pub(crate) fn allowed_by(mut self, policy: Option<String>) -> Self {
        self.policy = policy;
        self
    }

    /// Counts it closed with `reason` as its flags, without a log line.
    pub(crate) fn close(mut self, reason: CloseReason) {
        self.close_as(reason);
    }

    fn close_as(&mut self, reason: CloseReason) {
        if let Some(mut labels) = self.labels.take() {
            labels.response_flags = reason.as_str();
            self.closed.get_or_create(&labels).inc();
        }
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.close_as(CloseReason::Shutdown);
    }
}

/// Istio's `response_flags` of a connection nothing cut short.
const NO_FLAGS: &str = "-";

/// The workload a pod belongs to, as metrics name it: its
/// `app.kubernetes.io/name` or `app` label, else the pod's name (owner
/// references are not read).
pub(crate) fn workload_name(pod: &Pod) -> &str {
    ["app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|k| pod.labels.get(*k))
        .map_or(pod.name.as_str(), String::as_str)
}

/// Whether the connection carried the app's traffic (it was not refused
/// or failed before its two ends were joined).
fn carried(reason: CloseReason) -> bool {
    use CloseReason::*;
    matches!(
        reason,
        Done | IdleTimeout | PeerReset | IoError | PodRemoved | Shutdown | PolicyChanged
    )
}

/// Istio's `response_flags`: what cut the connection short, `-` when nothing.
fn response_flags(reason: CloseReason, refusal: Option<Refusal>) -> &'static str {
    match (reason, refusal) {
        (_, Some(r)) => r.as_str(),
        (CloseReason::Done | CloseReason::IdleTimeout, None) => NO_FLAGS,
        (r, None) => r.as_str(),
    }
}

/// The client as a log line names it. Outbound, the agent meets the app on
/// the pod's loopback (its `connect()` was redirected there), but the app's
/// socket carries the pod's own address (its `getsockname()` shows it) and
/// the server side logs that address: so name the pod's address of the
/// socket's family with the app's port, as ztunnel does, and an operator
/// finds both ends of a connection by one `src`.
fn shown_src(ctx: &PodContext, dir: Direction, src: SocketAddr) -> SocketAddr {
    let src = unmap(src);
    match dir {
        Direction::Outbound => ctx
            .pod
            .ips
            .iter()
            .find(|ip| ip.is_ipv4() == src.is_ipv4())
            .map_or(src, |&ip| SocketAddr::new(ip, src.port())),
        Direction::Inbound | Direction::Tunnel => src,
    }
}

/// Logs the end of one proxied connection and records its metrics.
pub(crate) fn log_connection(ctx: &PodContext, dir: Direction, src: SocketAddr, mut o: Outcome, started: Instant) {
    let reason = final_reason(ctx, o.stats.reason);
    ctx.mesh.counters.count(dir, Counted::Closed(reason), o.refusal);
    let m = ctx.mesh.counters.metrics();
    let mtls = o.transport == Transport::Hbone;
    let opened = o.opened.take().unwrap_or_else(|| {
        // Refused or failed before its ends were joined: it opens and
        // closes now.
        let snap = ctx.mesh.store.current();
        let (local, remote) = parties(ctx, &snap, dir, src, o.dst, o.peer_identity.as_ref());
        let labels = tcp_labels(dir, &local, &remote, mtls, o.service.as_deref(), NO_FLAGS);
        m.tcp_opened.get_or_create(&labels).inc();
        labels
    });
    let tcp = TcpLabels {
        response_flags: response_flags(reason, o.refusal),
        ..opened
    };
    record(m, dir, &tcp, mtls, reason, &o);
    let denied = matches!(o.refusal, Some(Refusal::Policy(_))) || reason == CloseReason::MtlsStrict;
    let dst = o.dst.map(|d| d.to_string()).unwrap_or_default();
    tracing::info!(
        target: "nodeward::conn",
        direction = dir.as_str(),
        pod = %ctx.pod.key,
        src = %shown_src(ctx, dir, src),
        dst = %dst,
        src_workload = %format_args!("{}/{}", tcp.source_workload_namespace, tcp.source_workload),
        src_identity = %tcp.source_principal,
        dst_workload = %format_args!("{}/{}", tcp.destination_workload_namespace, tcp.destination_workload),
        dst_identity = %tcp.destination_principal,
        service = o.service.as_deref(),
        transport = o.transport.as_str(),
        mode = if mtls { "mutual_tls" } else { "plaintext" },
        decision = if denied { "deny" } else { "allow" },
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

/// Records one ended connection, labelled `tcp`, in Istio's and
/// Nodeward's families.
fn record(m: &Metrics, dir: Direction, tcp: &TcpLabels, mtls: bool, reason: CloseReason, o: &Outcome) {
    m.tcp_closed.get_or_create(tcp).inc();
    m.tcp_sent.get_or_create(tcp).inc_by(o.stats.sent);
    m.tcp_received.get_or_create(tcp).inc_by(o.stats.received);
    // The local pod is the source of an outbound connection, the
    // destination of any other.
    let (local_namespace, local_workload) = match dir {
        Direction::Outbound => (&tcp.source_workload_namespace, &tcp.source_workload),
        Direction::Inbound | Direction::Tunnel => (&tcp.destination_workload_namespace, &tcp.destination_workload),
    };
    let direction = if dir == Direction::Outbound {
        "outbound"
    } else {
        "inbound"
    };
    if carried(reason) && o.refusal.is_none() {
        m.connections
            .get_or_create(&SecurityLabels {
                direction,
                security: if mtls { "mutual_tls" } else { "plaintext" },
                namespace: local_namespace.clone(),
            })
            .inc();
    }
    let workload = || WorkloadLabels {
        namespace: local_namespace.clone(),
        workload: local_workload.clone(),
    };
    if reason == CloseReason::MtlsStrict {
        m.plaintext_refused.get_or_create(&workload()).inc();
    }
    let handshake = match (o.refusal, reason) {
        (Some(Refusal::Cert(c)), _) => Some(c.as_str()),
        (Some(Refusal::TlsError), _) => Some("protocol"),
        (Some(Refusal::Http2Handshake), _) => Some("http2"),
        (None, CloseReason::HandshakeTimeout) => Some("timeout"),
        _ => None,
    };
    if let Some(reason) = handshake {
        m.handshake_failures
            .get_or_create(&HandshakeLabels { direction, reason })
            .inc();
    }
    if let Some(Refusal::Policy(r)) = o.refusal {
        let w = workload();
        m.denials
            .get_or_create(&DenialLabels {
                namespace: w.namespace,
                workload: w.workload,
                policy: o.policy.clone().unwrap_or_else(|| "-".into()),
                reason: r.as_str(),
            })
            .inc();
    }
}

/// Logs the AUDIT policies a connection matched and what its dry-run
/// policies would have decided.
pub(crate) fn log_audits(ctx: &PodContext, info: &crate::policy::ConnInfo, d: &crate::policy::Decision) {
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
pub(crate) fn final_reason(ctx: &PodContext, reason: Option<CloseReason>) -> CloseReason {
    reason.unwrap_or(if ctx.lifecycle.hard_stop.is_cancelled() {
        CloseReason::Shutdown
    } else {
        CloseReason::PodRemoved
    })
}
