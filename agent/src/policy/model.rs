//! Istio's `PeerAuthentication` and `AuthorizationPolicy`
//! (`security.istio.io/v1` and `v1beta1`) as the agent holds them, parsed
//! from the same YAML operators already write.
//!
//! An invalid policy is kept, marked with its error (field named), so it
//! can fail safe: a broken DENY denies everything it selects, a broken
//! ALLOW matches nothing, a broken PeerAuthentication means STRICT.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

/// An mTLS mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
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
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Unset => "UNSET",
            Mode::Strict => "STRICT",
            Mode::Permissive => "PERMISSIVE",
            Mode::Disable => "DISABLE",
        }
    }

    fn parse(s: &str) -> Option<Mode> {
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
pub struct PolicyMeta {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.creationTimestamp` (RFC 3339; compared as text, which
    /// orders correctly for the UTC form the API server writes).
    pub created: String,
    /// `selector.matchLabels`, `None` when absent.
    pub selector: Option<BTreeMap<String, String>>,
    /// Why the object is invalid, naming the field.
    pub error: Option<String>,
}

impl PolicyMeta {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A `PeerAuthentication`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAuthentication {
    /// Identification, selector, validity.
    pub meta: PolicyMeta,
    /// `spec.mtls.mode`.
    pub mode: Mode,
    /// `spec.portLevelMtls`.
    pub port_modes: BTreeMap<u16, Mode>,
}

/// `ALLOW`, `DENY`, `AUDIT` or `CUSTOM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
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
    pub fn as_str(self) -> &'static str {
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
pub enum StrMatch {
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
    pub fn parse(s: &str) -> StrMatch {
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
    pub fn matches(&self, v: &str) -> bool {
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
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl Cidr {
    /// Parses `a.b.c.d`, `a.b.c.d/n`, IPv6 likewise.
    pub fn parse(s: &str) -> Option<Cidr> {
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
    pub fn contains(&self, ip: IpAddr) -> bool {
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

/// `from.source`, `to.operation` and `when` of one rule, L4 parts only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Sources: the rule's `from` matches when any of them does. `None`:
    /// no `from`, any source.
    pub from: Option<Vec<Source>>,
    /// Operations: any of them. `None`: no `to`.
    pub to: Option<Vec<Operation>>,
    /// Conditions: all must hold.
    pub when: Vec<Condition>,
    /// The rule uses fields only an L7 proxy can evaluate.
    pub has_l7: bool,
}

/// One `from.source`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    /// `principals`.
    pub principals: Vec<StrMatch>,
    /// `notPrincipals`.
    pub not_principals: Vec<StrMatch>,
    /// `namespaces`.
    pub namespaces: Vec<StrMatch>,
    /// `notNamespaces`.
    pub not_namespaces: Vec<StrMatch>,
    /// `ipBlocks` and `remoteIpBlocks` (the same at L4).
    pub ip_blocks: Vec<Cidr>,
    /// `notIpBlocks` and `notRemoteIpBlocks`.
    pub not_ip_blocks: Vec<Cidr>,
}

/// One `to.operation`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Operation {
    /// `ports`.
    pub ports: Vec<u16>,
    /// `notPorts`.
    pub not_ports: Vec<u16>,
}

/// One `when` condition on an L4 attribute.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// The attribute.
    pub key: Key,
    /// `values`.
    pub values: Vec<String>,
    /// `notValues`.
    pub not_values: Vec<String>,
}

/// The `when` keys an L4 proxy can evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// `source.ip`.
    SourceIp,
    /// `source.namespace`.
    SourceNamespace,
    /// `source.principal`.
    SourcePrincipal,
    /// `destination.ip`.
    DestinationIp,
    /// `destination.port`.
    DestinationPort,
}

/// An `AuthorizationPolicy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    /// Identification, selector, validity.
    pub meta: PolicyMeta,
    /// Action.
    pub action: Action,
    /// Rules (`None`: the `rules` field is absent).
    pub rules: Vec<Rule>,
    /// Warnings (L7 fields) to report once.
    pub warnings: Vec<String>,
}

// === parsing ===

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct MetaDoc {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    creation_timestamp: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct SelectorDoc {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

fn meta_of(metadata: &serde_yaml::Value, spec: &serde_yaml::Value) -> (PolicyMeta, Vec<String>) {
    let m: MetaDoc = serde_yaml::from_value(metadata.clone()).unwrap_or_default();
    let mut errors = Vec::new();
    let selector = match spec.get("selector") {
        None | Some(serde_yaml::Value::Null) => None,
        Some(v) => match serde_yaml::from_value::<SelectorDoc>(v.clone()) {
            Ok(s) => Some(s.match_labels),
            Err(e) => {
                errors.push(format!("spec.selector: {e}"));
                Some(BTreeMap::new())
            }
        },
    };
    (
        PolicyMeta {
            namespace: m.namespace,
            name: m.name,
            created: m.creation_timestamp.unwrap_or_default(),
            selector,
            error: None,
        },
        errors,
    )
}

/// Parses a PeerAuthentication; never fails, invalid content is recorded.
pub fn parse_peer_authentication(metadata: &serde_yaml::Value, spec: &serde_yaml::Value) -> PeerAuthentication {
    let (mut meta, mut errors) = meta_of(metadata, spec);
    let mode_str = spec
        .get("mtls")
        .and_then(|m| m.get("mode"))
        .and_then(|m| m.as_str())
        .unwrap_or("");
    let mode = Mode::parse(mode_str).unwrap_or_else(|| {
        errors.push(format!(
            "spec.mtls.mode: unknown mode {mode_str:?} (STRICT, PERMISSIVE, DISABLE or UNSET)"
        ));
        Mode::Strict
    });
    let mut port_modes = BTreeMap::new();
    if let Some(map) = spec.get("portLevelMtls").and_then(|p| p.as_mapping()) {
        for (k, v) in map {
            let port = k
                .as_u64()
                .or_else(|| k.as_str().and_then(|s| s.parse().ok()))
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0);
            let m = v.get("mode").and_then(|m| m.as_str()).unwrap_or("");
            match (port, Mode::parse(m)) {
                (Some(p), Some(m)) => {
                    port_modes.insert(p, m);
                }
                (None, _) => errors.push(format!("spec.portLevelMtls: {k:?} is not a port number")),
                (Some(p), None) => {
                    errors.push(format!("spec.portLevelMtls.{p}.mode: unknown mode {m:?}"));
                    port_modes.insert(p, Mode::Strict);
                }
            }
        }
    }
    if !errors.is_empty() {
        meta.error = Some(errors.join("; "));
    }
    PeerAuthentication { meta, mode, port_modes }
}

const L7_SOURCE_FIELDS: &[&str] = &["requestPrincipals", "notRequestPrincipals"];
const L7_OPERATION_FIELDS: &[&str] = &["hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"];
const SOURCE_FIELDS: &[&str] = &[
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];

/// Parses an AuthorizationPolicy; never fails, invalid content is recorded.
pub fn parse_authorization_policy(metadata: &serde_yaml::Value, spec: &serde_yaml::Value) -> AuthorizationPolicy {
    let (mut meta, mut errors) = meta_of(metadata, spec);
    let mut warnings = Vec::new();
    let action_str = spec.get("action").and_then(|a| a.as_str()).unwrap_or("ALLOW");
    let action = match action_str {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        "CUSTOM" => Action::Custom,
        other => {
            errors.push(format!("spec.action: unknown action {other:?}"));
            // An action we cannot read is treated as the one that fails closed.
            Action::Deny
        }
    };
    if spec.get("targetRef").is_some() || spec.get("targetRefs").is_some() {
        errors.push("spec.targetRef(s): policies attached to gateways or services are not supported at L4".into());
    }
    let mut rules = Vec::new();
    if let Some(list) = spec.get("rules").and_then(|r| r.as_sequence()) {
        for (i, r) in list.iter().enumerate() {
            rules.push(parse_rule(r, &format!("spec.rules[{i}]"), &mut errors, &mut warnings));
        }
    } else if !matches!(spec.get("rules"), None | Some(serde_yaml::Value::Null)) {
        errors.push("spec.rules: not a list".into());
    }
    if !errors.is_empty() {
        meta.error = Some(errors.join("; "));
    }
    AuthorizationPolicy {
        meta,
        action,
        rules,
        warnings,
    }
}

fn strings(v: &serde_yaml::Value, field: &str, errors: &mut Vec<String>) -> Vec<String> {
    match v {
        serde_yaml::Value::Null => Vec::new(),
        serde_yaml::Value::Sequence(s) => s
            .iter()
            .filter_map(|x| match x {
                serde_yaml::Value::String(s) => Some(s.clone()),
                serde_yaml::Value::Number(n) => Some(n.to_string()),
                other => {
                    errors.push(format!("{field}: {other:?} is not a string"));
                    None
                }
            })
            .collect(),
        _ => {
            errors.push(format!("{field}: not a list"));
            Vec::new()
        }
    }
}

fn parse_rule(r: &serde_yaml::Value, at: &str, errors: &mut Vec<String>, warnings: &mut Vec<String>) -> Rule {
    let mut rule = Rule::default();
    if let Some(from) = r.get("from").and_then(|f| f.as_sequence()) {
        let mut sources = Vec::new();
        for (j, f) in from.iter().enumerate() {
            let s = f.get("source").cloned().unwrap_or(serde_yaml::Value::Null);
            let at = format!("{at}.from[{j}].source");
            let mut src = Source::default();
            for l7 in L7_SOURCE_FIELDS {
                if s.get(*l7).is_some() {
                    rule.has_l7 = true;
                    warnings.push(format!("{at}.{l7} needs an L7 proxy"));
                }
            }
            if let Some(map) = s.as_mapping() {
                for k in map.keys().filter_map(|k| k.as_str()) {
                    if !SOURCE_FIELDS.contains(&k) && !L7_SOURCE_FIELDS.contains(&k) {
                        errors.push(format!("{at}.{k}: unknown field"));
                    }
                }
            }
            let get = |name: &str, errors: &mut Vec<String>| {
                strings(
                    s.get(name).unwrap_or(&serde_yaml::Value::Null),
                    &format!("{at}.{name}"),
                    errors,
                )
            };
            for (field, out) in [
                ("principals", &mut src.principals),
                ("notPrincipals", &mut src.not_principals),
            ] {
                for p in get(field, errors) {
                    if p.starts_with("spiffe://") || p.is_empty() {
                        errors.push(format!(
                            "{at}.{field}: {p:?} is malformed (write principals without spiffe://)"
                        ));
                    }
                    out.push(StrMatch::parse(&p));
                }
            }
            for (field, out) in [
                ("namespaces", &mut src.namespaces),
                ("notNamespaces", &mut src.not_namespaces),
            ] {
                out.extend(get(field, errors).iter().map(|n| StrMatch::parse(n)));
            }
            for (field, negated) in [
                ("ipBlocks", false),
                ("remoteIpBlocks", false),
                ("notIpBlocks", true),
                ("notRemoteIpBlocks", true),
            ] {
                for c in get(field, errors) {
                    match Cidr::parse(&c) {
                        Some(c) if negated => src.not_ip_blocks.push(c),
                        Some(c) => src.ip_blocks.push(c),
                        None => errors.push(format!("{at}.{field}: {c:?} is not an IP address or CIDR")),
                    }
                }
            }
            sources.push(src);
        }
        rule.from = Some(sources);
    }
    if let Some(to) = r.get("to").and_then(|t| t.as_sequence()) {
        let mut ops = Vec::new();
        for (j, t) in to.iter().enumerate() {
            let o = t.get("operation").cloned().unwrap_or(serde_yaml::Value::Null);
            let at = format!("{at}.to[{j}].operation");
            for l7 in L7_OPERATION_FIELDS {
                if o.get(*l7).is_some() {
                    rule.has_l7 = true;
                    warnings.push(format!("{at}.{l7} needs an L7 proxy"));
                }
            }
            let mut op = Operation::default();
            for (field, out) in [("ports", &mut op.ports), ("notPorts", &mut op.not_ports)] {
                for p in strings(
                    o.get(field).unwrap_or(&serde_yaml::Value::Null),
                    &format!("{at}.{field}"),
                    errors,
                ) {
                    match p.parse::<u16>() {
                        Ok(p) if p != 0 => out.push(p),
                        _ => errors.push(format!("{at}.{field}: {p:?} is not a port number")),
                    }
                }
            }
            ops.push(op);
        }
        rule.to = Some(ops);
    }
    if let Some(when) = r.get("when").and_then(|w| w.as_sequence()) {
        for (j, c) in when.iter().enumerate() {
            let at = format!("{at}.when[{j}]");
            let key = c.get("key").and_then(|k| k.as_str()).unwrap_or("");
            let values = strings(
                c.get("values").unwrap_or(&serde_yaml::Value::Null),
                &format!("{at}.values"),
                errors,
            );
            let not_values = strings(
                c.get("notValues").unwrap_or(&serde_yaml::Value::Null),
                &format!("{at}.notValues"),
                errors,
            );
            let key = match key {
                "source.ip" | "remote.ip" => Key::SourceIp,
                "source.namespace" => Key::SourceNamespace,
                "source.principal" => Key::SourcePrincipal,
                "destination.ip" => Key::DestinationIp,
                "destination.port" => Key::DestinationPort,
                k if k.starts_with("request.") || k.starts_with("experimental.") || k == "connection.sni" => {
                    rule.has_l7 = true;
                    warnings.push(format!("{at}: key {k:?} needs an L7 proxy"));
                    continue;
                }
                k => {
                    errors.push(format!("{at}.key: unknown key {k:?}"));
                    continue;
                }
            };
            if matches!(key, Key::SourceIp | Key::DestinationIp) {
                for v in values.iter().chain(&not_values) {
                    if Cidr::parse(v).is_none() {
                        errors.push(format!("{at}: {v:?} is not an IP address or CIDR"));
                    }
                }
            }
            if key == Key::DestinationPort {
                for v in values.iter().chain(&not_values) {
                    if v.parse::<u16>().is_err() {
                        errors.push(format!("{at}: {v:?} is not a port number"));
                    }
                }
            }
            rule.when.push(Condition {
                key,
                values,
                not_values,
            });
        }
    }
    rule
}
