//! The closed vocabulary of how connections end: every close reason,
//! refusal kind, transport, direction and tunnel end the agent logs or
//! counts is a variant here with a fixed [`as_str`](CloseReason::as_str)
//! label, so a log field or metric label cannot appear without the
//! compiler seeing it. README.md's list of close reasons is checked against
//! [`CloseReason::ALL`] by a unit test.

#![forbid(unsafe_code)]

/// Which listener a connection arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Captured from an app in the pod.
    Outbound,
    /// Plaintext to the pod.
    Inbound,
    /// HBONE to the pod.
    Tunnel,
}

impl Direction {
    /// The name used in logs and counters.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Tunnel => "inbound_tunnel",
        }
    }
}

/// Why a proxied connection ended: a small fixed set, used in logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// Both sides finished normally.
    Done,
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// A side reset the connection or vanished.
    PeerReset,
    /// Another I/O error.
    IoError,
    /// The pod stopped being managed.
    PodRemoved,
    /// The agent's drain deadline passed.
    Shutdown,
    /// The upstream refused the connection.
    ConnectRefused,
    /// The upstream did not answer in time.
    ConnectTimeout,
    /// The upstream could not be reached (no route, unreachable).
    ConnectFailed,
    /// No original destination was recorded for a captured connection.
    NoOriginalDestination,
    /// A meshed destination, but this pod has no identity to tunnel with.
    NoIdentity,
    /// The tunnel could not be set up or the destination refused the stream.
    TunnelRefused,
    /// The peer did not finish the TLS/HTTP/2 handshake in time.
    HandshakeTimeout,
    /// The TLS handshake failed (see the refusal kind).
    TlsRefused,
    /// A tunnel request was invalid (method, authority, target).
    BadRequest,
    /// The peer's certificate was revoked or its identity denied meanwhile.
    PeerRevoked,
    /// Plaintext to a port whose mTLS mode is STRICT.
    MtlsStrict,
    /// Authorization policy denied it.
    PolicyDenied,
    /// A policy change no longer allows it.
    PolicyChanged,
    /// It was addressed to the agent itself (a pod's loopback listener or
    /// an agent port), which would make the agent dial its own listeners.
    LoopRefused,
    /// Addressed to a Service none of whose endpoints may take it (none
    /// ready, or none on the node under `internalTrafficPolicy: Local`).
    NoEndpoint,
    /// Plaintext (or nothing) to a destination outside the mesh under
    /// egress `tls-only`, and not allow-listed.
    EgressPlaintext,
    /// A tunnel connection closed because its peer's last streams were all
    /// refused (denied or invalid): it held a place for nothing.
    StreamsRefused,
}

impl CloseReason {
    /// Every close reason, in the order README.md lists them.
    #[cfg(test)]
    pub(crate) const ALL: [CloseReason; 23] = [
        CloseReason::Done,
        CloseReason::IdleTimeout,
        CloseReason::PeerReset,
        CloseReason::IoError,
        CloseReason::PodRemoved,
        CloseReason::Shutdown,
        CloseReason::ConnectRefused,
        CloseReason::ConnectTimeout,
        CloseReason::ConnectFailed,
        CloseReason::NoOriginalDestination,
        CloseReason::NoIdentity,
        CloseReason::TunnelRefused,
        CloseReason::HandshakeTimeout,
        CloseReason::TlsRefused,
        CloseReason::BadRequest,
        CloseReason::PeerRevoked,
        CloseReason::MtlsStrict,
        CloseReason::PolicyDenied,
        CloseReason::PolicyChanged,
        CloseReason::LoopRefused,
        CloseReason::NoEndpoint,
        CloseReason::EgressPlaintext,
        CloseReason::StreamsRefused,
    ];

    /// The stable name used in logs and metric labels.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CloseReason::Done => "done",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::PeerReset => "peer_reset",
            CloseReason::IoError => "io_error",
            CloseReason::PodRemoved => "pod_removed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ConnectRefused => "connect_refused",
            CloseReason::ConnectTimeout => "connect_timeout",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::NoOriginalDestination => "no_original_destination",
            CloseReason::NoIdentity => "no_identity",
            CloseReason::TunnelRefused => "tunnel_refused",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::TlsRefused => "tls_refused",
            CloseReason::BadRequest => "bad_request",
            CloseReason::PeerRevoked => "peer_revoked",
            CloseReason::MtlsStrict => "mtls_strict",
            CloseReason::PolicyDenied => "policy_denied",
            CloseReason::PolicyChanged => "policy_changed",
            CloseReason::LoopRefused => "loop_refused",
            CloseReason::NoEndpoint => "no_endpoint",
            CloseReason::EgressPlaintext => "egress_plaintext",
            CloseReason::StreamsRefused => "streams_refused",
        }
    }

    /// Whether the other side should see a reset rather than a clean close.
    pub(crate) fn resets(self) -> bool {
        !matches!(self, CloseReason::Done)
    }

    /// Classifies an I/O error.
    pub(crate) fn from_io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind::*;
        match e.kind() {
            ConnectionReset | BrokenPipe | ConnectionAborted | UnexpectedEof => CloseReason::PeerReset,
            ConnectionRefused => CloseReason::ConnectRefused,
            TimedOut => CloseReason::ConnectTimeout,
            HostUnreachable | NetworkUnreachable | AddrNotAvailable => CloseReason::ConnectFailed,
            _ => CloseReason::IoError,
        }
    }
}

/// What a connection is counted as (`nodeward_connections_closed_total`): its close reason, or one
/// of the two ends that are counted without a log line each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Counted {
    /// A connection that ended with a log line.
    Closed(CloseReason),
    /// Refused at accept by a resource bound (see the refusal kind).
    Limit,
    /// A tunnel stream the client reset before a byte crossed.
    EarlyReset,
}

impl Counted {
    /// The `reason` label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Counted::Closed(r) => r.as_str(),
            Counted::Limit => "limit",
            Counted::EarlyReset => "early_reset",
        }
    }
}

/// How a connection was carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transport {
    /// An HBONE tunnel stream (mTLS + HTTP/2 CONNECT).
    Hbone,
    /// Outbound to a destination outside the mesh, unchanged.
    Passthrough,
    /// Inbound plaintext, or refused before a transport was chosen.
    Plaintext,
}

impl Transport {
    /// The name used in logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Transport::Hbone => "hbone",
            Transport::Passthrough => "passthrough",
            Transport::Plaintext => "plaintext",
        }
    }
}

/// Why a peer certificate was refused: a small, fixed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CertRefusal {
    /// The client presented no certificate.
    NoClientCertificate,
    /// A certificate of the chain has expired.
    Expired,
    /// A certificate of the chain is not valid yet.
    NotYetValid,
    /// The chain leads to a root we do not trust.
    UnknownRoot,
    /// The chain lacks an intermediate (issued under one we know).
    MissingIntermediate,
    /// The leaf is revoked.
    RevokedLeaf,
    /// An intermediate of the chain is revoked.
    RevokedIntermediate,
    /// No CRL covers the chain and unknown status is refused.
    RevocationUnknown,
    /// The SPIFFE ID is of another trust domain.
    WrongTrustDomain,
    /// The SPIFFE ID is not the one expected for this destination.
    WrongIdentity,
    /// The SPIFFE ID is on the deny list.
    DeniedIdentity,
    /// The leaf has more than one URI SAN.
    MultipleUriSans,
    /// The leaf has no URI SAN.
    NoUriSan,
    /// A SPIFFE ID appears only in a DNS SAN or the subject CN.
    SpiffeIdOutsideUriSan,
    /// The URI SAN is not a Kubernetes SPIFFE ID.
    MalformedSpiffeId,
    /// The leaf is a CA certificate.
    CaCertificate,
    /// A client certificate without the clientAuth extended key usage.
    MissingClientAuth,
    /// A server certificate without the serverAuth extended key usage.
    MissingServerAuth,
    /// A signature in the chain does not verify.
    BadSignature,
    /// The certificate could not be parsed or is otherwise unusable.
    BadCertificate,
}

impl CertRefusal {
    /// Stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CertRefusal::NoClientCertificate => "no_client_certificate",
            CertRefusal::Expired => "expired",
            CertRefusal::NotYetValid => "not_yet_valid",
            CertRefusal::UnknownRoot => "unknown_root",
            CertRefusal::MissingIntermediate => "missing_intermediate",
            CertRefusal::RevokedLeaf => "revoked_leaf",
            CertRefusal::RevokedIntermediate => "revoked_intermediate",
            CertRefusal::RevocationUnknown => "revocation_unknown",
            CertRefusal::WrongTrustDomain => "wrong_trust_domain",
            CertRefusal::WrongIdentity => "wrong_identity",
            CertRefusal::DeniedIdentity => "denied_identity",
            CertRefusal::MultipleUriSans => "multiple_uri_sans",
            CertRefusal::NoUriSan => "no_uri_san",
            CertRefusal::SpiffeIdOutsideUriSan => "spiffe_id_outside_uri_san",
            CertRefusal::MalformedSpiffeId => "malformed_spiffe_id",
            CertRefusal::CaCertificate => "ca_certificate",
            CertRefusal::MissingClientAuth => "missing_client_auth",
            CertRefusal::MissingServerAuth => "missing_server_auth",
            CertRefusal::BadSignature => "bad_signature",
            CertRefusal::BadCertificate => "bad_certificate",
        }
    }
}

impl std::fmt::Display for CertRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a connection was refused by a resource bound: which bound it hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[repr(usize)]
pub(crate) enum LimitRefusal {
    /// The node's proxied connections are at their bound.
    #[error("too many proxied connections on the node")]
    Connections,
    /// The pod's proxied connections in this direction are at their bound.
    #[error("too many proxied connections for the pod")]
    ConnectionsPerPod,
    /// The node's inbound tunnel connections are at their bound.
    #[error("too many inbound tunnel connections on the node")]
    InboundTunnels,
    /// The node's outbound tunnel connections are at their bound.
    #[error("too many outbound tunnel connections on the node")]
    OutboundTunnels,
    /// The remote peer's tunnel connections are at their bound.
    #[error("too many tunnel connections from the peer")]
    TunnelsPerPeer,
    /// The source pod's outbound tunnel connections are at their bound.
    #[error("too many tunnel connections from the pod")]
    TunnelsPerPod,
    /// The node's unauthenticated handshakes are at their bound.
    #[error("too many tunnel handshakes in progress on the node")]
    Handshakes,
    /// The remote peer's unauthenticated handshakes are at their bound.
    #[error("too many tunnel handshakes in progress from the peer")]
    HandshakesPerPeer,
}

impl LimitRefusal {
    /// How many bounds there are (the variants index arrays by `as usize`).
    pub(crate) const COUNT: usize = 8;

    /// The label used in counters and logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LimitRefusal::Connections => "limit_connections",
            LimitRefusal::ConnectionsPerPod => "limit_connections_per_pod",
            LimitRefusal::InboundTunnels => "limit_inbound_tunnels",
            LimitRefusal::OutboundTunnels => "limit_outbound_tunnels",
            LimitRefusal::TunnelsPerPeer => "limit_tunnels_per_peer",
            LimitRefusal::TunnelsPerPod => "limit_tunnels_per_pod",
            LimitRefusal::Handshakes => "limit_handshakes",
            LimitRefusal::HandshakesPerPeer => "limit_handshakes_per_peer",
        }
    }
}

/// Why authorization decided as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PolicyReason {
    /// No ALLOW policy selects the workload, or one matched.
    Allowed,
    /// A DENY policy matched.
    Denied,
    /// ALLOW policies select the workload and none matched.
    NoAllowMatch,
    /// An invalid DENY policy selects the workload: it denies everything.
    InvalidDenyPolicy,
    /// A CUSTOM policy selects the workload, which the node cannot enforce.
    CustomUnsupported,
}

impl PolicyReason {
    /// The label used in logs and counters.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            PolicyReason::Allowed => "allowed",
            PolicyReason::Denied => "denied",
            PolicyReason::NoAllowMatch => "no_allow_match",
            PolicyReason::InvalidDenyPolicy => "invalid_deny_policy",
            PolicyReason::CustomUnsupported => "custom_unsupported",
        }
    }
}

/// What refused a connection or a tunnel stream, next to its close reason:
/// a certificate, a bound, a policy, or a malformed tunnel request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The peer's certificate.
    Cert(CertRefusal),
    /// A resource bound.
    Limit(LimitRefusal),
    /// Authorization policy.
    Policy(PolicyReason),
    /// The TLS handshake failed for a reason other than the certificate.
    TlsError,
    /// The HTTP/2 handshake failed after TLS.
    Http2Handshake,
    /// A tunnel request that was not a `CONNECT`.
    MethodNotAllowed,
    /// A `CONNECT` whose authority is not `ip:port`.
    MalformedAuthority,
    /// A `CONNECT` to an address that is not this pod's.
    NotThisPod,
}

impl Refusal {
    /// The `refusal` label of logs and counters.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::Cert(r) => r.as_str(),
            Refusal::Limit(r) => r.as_str(),
            Refusal::Policy(r) => r.as_str(),
            Refusal::TlsError => "tls_error",
            Refusal::Http2Handshake => "http2_handshake",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::MalformedAuthority => "malformed_authority",
            Refusal::NotThisPod => "not_this_pod",
        }
    }
}

/// How a tunnel connection (not a stream) ended, for its debug line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TunnelEnd {
    /// The peer closed it.
    Closed,
    /// The pod went, the agent stopped, or the peer stopped being trusted.
    Cancelled,
    /// The client reset streams faster than the guard allows.
    RapidReset,
    /// An HTTP/2 protocol error (including h2's own flood limits).
    ProtocolError,
    /// No stream was open for the idle timeout: GOAWAY sent.
    Idle,
    /// The peer stopped answering PING.
    DeadPeer,
    /// No first stream before the handshake deadline.
    NoStream,
    /// The peer's last streams were all refused.
    StreamsRefused,
}

impl TunnelEnd {
    /// The `end` field of the log line.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TunnelEnd::Closed => "closed",
            TunnelEnd::Cancelled => "cancelled",
            TunnelEnd::RapidReset => "rapid_reset",
            TunnelEnd::ProtocolError => "protocol_error",
            TunnelEnd::Idle => "idle",
            TunnelEnd::DeadPeer => "dead_peer",
            TunnelEnd::NoStream => "no_stream",
            TunnelEnd::StreamsRefused => "streams_refused",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The backquoted names after `close reason from a fixed set (` in
    /// README.md, up to the first `;` or `)`.
    fn readme_close_reasons() -> BTreeSet<String> {
        let readme = include_str!("../../README.md").replace('\n', " ");
        let marker = "close reason from a fixed set (";
        let start = readme.find(marker).expect("README.md lists the close reasons") + marker.len();
        let list = &readme[start..];
        let list = &list[..list.find([';', ')']).unwrap_or(list.len())];
        list.split('`').skip(1).step_by(2).map(str::to_owned).collect()
    }

    #[test]
    fn the_readme_lists_exactly_the_close_reasons_the_agent_logs() {
        let logged: BTreeSet<String> = CloseReason::ALL.iter().map(|r| r.as_str().to_owned()).collect();
        assert_eq!(logged.len(), CloseReason::ALL.len(), "labels are distinct");
        assert_eq!(readme_close_reasons(), logged);
    }
}
