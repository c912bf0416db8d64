//! Istio's `PeerAuthentication` and `AuthorizationPolicy`
//! (`security.istio.io/v1` and `v1beta1`) as the agent holds them, parsed
//! from the same YAML operators already write.
//!
//! An invalid policy is kept, marked with its error (field named), so it
//! can fail safe: a broken DENY denies everything it selects, a broken
//! ALLOW matches nothing, a broken PeerAuthentication means STRICT. The
//! parsing itself (a strict walk that rejects what Istio's validation
//! rejects) is in `parse.rs`.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::IpAddr;

pub use super::parse::parse_authorization_policy;
pub(crate) use super::parse::parse_peer_authentication;

/// An mTLS mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Mode {
    /// Inherit from the next wider scope.
    Unset,
    /// HBONE only; inbound plaintext is refused.
    Strict,
    /// HBONE and plaintext.
    Permissive,
    /// The agent steps aside: inbound not captured, peers send plaintext.
    Disable,
}

impl Mode {
    /// Istio's spelling.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Mode::Unset => "UNSET",
            Mode::Strict => "STRICT",
            Mode::Permissive => "PERMISSIVE",
            Mode::Disable => "DISABLE",
        }
    }

    pub(super) fn parse(s: &str) -> Option<Mode> {
        Some(match s {
            "" | "UNSET" => Mode::Unset,
            "STRICT" => Mode::Strict,
            "PERMISSIVE" => Mode::Permissive,
            "DISABLE" => Mode::Disable,
            _ => return None,
        })
    }
}

/// Common identification of a policy object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PolicyMeta {
    /// Namespace.
    pub(crate) namespace: String,
    /// Name.
    pub(crate) name: String,
    /// `metadata.creationTimestamp` (RFC 3339; compared as text, which
    /// orders correctly for the UTC form the API server writes). `None`
    /// sorts after every dated policy, so an undated one is never "oldest".
    pub(crate) created: Option<String>,
    /// `selector.matchLabels`; `None` for a namespace-wide policy (no
    /// selector, or empty `matchLabels`). An invalid selector is
    /// `Some(empty)`, which selects every workload of the namespace, so the
    /// policy fails safe at workload level.
    pub(crate) selector: Option<BTreeMap<String, String>>,
    /// Why the object is invalid, naming the field.
    pub(crate) error: Option<String>,
}

impl PolicyMeta {
    /// `namespace/name`.
    pub(crate) fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A `PeerAuthentication`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PeerAuthentication {
    /// Identification, selector, validity.
    pub(crate) meta: PolicyMeta,
    /// `spec.mtls.mode`.
    pub(crate) mode: Mode,
    /// `spec.portLevelMtls`.
    pub(crate) port_modes: BTreeMap<u16, Mode>,
}

/// `ALLOW`, `DENY`, `AUDIT` or `CUSTOM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Allow when a rule matches.
    Allow,
    /// Deny when a rule matches.
    Deny,
    /// Log when a rule matches; never changes the decision.
    Audit,
    /// External authorization: not supported at L4; fails closed.
    Custom,
}

impl Action {
    /// Istio's spelling.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

/// Istio's string match: exact, `prefix*`, `*suffix` or `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StrMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Any present value.
    Any,
}

impl StrMatch {
    /// Parses Istio's forms.
    pub(crate) fn parse(s: &str) -> StrMatch {
        if s == "*" {
            StrMatch::Any
        } else if let Some(p) = s.strip_suffix('*') {
            StrMatch::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            StrMatch::Suffix(p.to_string())
        } else {
            StrMatch::Exact(s.to_string())
        }
    }

    /// Whether `v` matches.
    pub(crate) fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(e) => v == e,
            StrMatch::Prefix(p) => v.starts_with(p.as_str()),
            StrMatch::Suffix(s) => v.ends_with(s.as_str()),
            StrMatch::Any => true,
        }
    }
}

/// An IP network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cidr {
    /// Network address.
    pub(crate) addr: IpAddr,
    /// Prefix length.
    pub(crate) len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d`, `a.b.c.d/n`, IPv6 likewise.
    pub(crate) fn parse(s: &str) -> Option<Cidr> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip.parse::<IpAddr>().ok()?, len.parse::<u8>().ok()?),
            None => {
                let ip = s.parse::<IpAddr>().ok()?;
                (ip, if ip.is_ipv4() { 32 } else { 128 })
            }
        };
        let max = if ip.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Cidr { addr: ip, len })
    }

    /// Whether `ip` is inside.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A principal pattern (`<trust-domain>/ns/<ns>/sa/<sa>`, exact, prefix,
/// suffix or `*`). When its trust domain is a concrete name that means
/// "local" (`cluster.local`, `--trust-domain` or an alias), it matches a
/// peer of any local trust domain with the same rest, as Istio does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Principal {
    /// The whole pattern, for trust domains that are not local.
    pub(crate) pattern: StrMatch,
    /// The trust domain and the pattern of the rest (after its `/`), when
    /// the pattern starts with a concrete trust domain.
    pub(crate) domain: Option<(String, StrMatch)>,
}

impl Principal {
    /// Parses an Istio principal pattern.
    pub(crate) fn parse(s: &str) -> Principal {
        let domain = s
            .split_once('/')
            .filter(|(td, _)| !td.is_empty() && !td.contains('*'))
            .map(|(td, rest)| (td.to_string(), StrMatch::parse(rest)));
        Principal {
            pattern: StrMatch::parse(s),
            domain,
        }
    }
}

/// A `namespace/service-account` pair of `serviceAccounts` or the
/// `source.serviceAccount` condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServiceAccount {
    /// Namespace.
    pub(crate) namespace: String,
    /// Service account.
    pub(crate) name: String,
}

/// `from.source`, `to.operation` and `when` of one rule, L4 parts only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Rule {
    /// Sources: the rule's `from` matches when any of them does. `None`:
    /// no `from`, any source.
    pub(crate) from: Option<Vec<Source>>,
    /// Operations: any of them. `None`: no `to`.
    pub(crate) to: Option<Vec<Operation>>,
    /// Conditions: all must hold. Each is kept as the source or operation
    /// it is equivalent to.
    pub(crate) when: Vec<Condition>,
    /// The rule uses fields only an L7 proxy can evaluate.
    pub(crate) has_l7: bool,
}

/// One `from.source`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Source {
    /// `principals`.
    pub(crate) principals: Vec<Principal>,
    /// `notPrincipals`.
    pub(crate) not_principals: Vec<Principal>,
    /// `serviceAccounts` (`ns/sa`).
    pub(crate) service_accounts: Vec<ServiceAccount>,
    /// `notServiceAccounts`.
    pub(crate) not_service_accounts: Vec<ServiceAccount>,
    /// `namespaces`.
    pub(crate) namespaces: Vec<StrMatch>,
    /// `notNamespaces`.
    pub(crate) not_namespaces: Vec<StrMatch>,
    /// `ipBlocks` and `remoteIpBlocks` (the same at L4).
    pub(crate) ip_blocks: Vec<Cidr>,
    /// `notIpBlocks` and `notRemoteIpBlocks`.
    pub(crate) not_ip_blocks: Vec<Cidr>,
}

/// One `to.operation`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Operation {
    /// `ports`.
    pub(crate) ports: Vec<u16>,
    /// `notPorts`.
    pub(crate) not_ports: Vec<u16>,
}

/// One `when` condition on an L4 attribute, as the source or operation it
/// is equivalent to (`source.ip` is `ipBlocks`, `destination.port` is
/// `ports`, and so on), so that it matches exactly as those do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Condition {
    /// `source.ip`, `remote.ip`, `source.namespace`, `source.principal`,
    /// `source.serviceAccount`.
    Source(Source),
    /// `destination.port`.
    Operation(Operation),
    /// `destination.ip`: `values`, `notValues`.
    DestinationIp(Vec<Cidr>, Vec<Cidr>),
}

/// An `AuthorizationPolicy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    /// Identification, selector, validity.
    pub(crate) meta: PolicyMeta,
    /// Action.
    pub(crate) action: Action,
    /// Rules (`None`: the `rules` field is absent).
    pub(crate) rules: Vec<Rule>,
    /// Warnings (L7 fields) to report once.
    pub(crate) warnings: Vec<String>,
    /// `istio.io/dry-run: "true"`: evaluated and logged, never enforced.
    pub(crate) dry_run: bool,
    /// `targetRef`/`targetRefs`: the policy belongs to a waypoint or a
    /// gateway; the node ignores it.
    pub(crate) target_ref: bool,
}

/// Annotation that makes an AuthorizationPolicy audit-only.
pub(crate) const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
