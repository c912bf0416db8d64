//! A strict walk over `PeerAuthentication` and `AuthorizationPolicy` YAML
//! that rejects what Istio's validation rejects (unknown fields anywhere,
//! lists that are not lists, empty sources and operations, conditions
//! without values, `mtls` that is not a mapping, a selector without
//! `matchLabels`) and names the field path of every problem. It never
//! fails: an invalid object is returned with its errors so that it fails
//! safe where it is evaluated.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde_norway::{Mapping, Value};

use super::model::{
    Action, AuthorizationPolicy, Cidr, Condition, DRY_RUN_ANNOTATION, Mode, Operation, PeerAuthentication, PolicyMeta,
    Principal, Rule, ServiceAccount, Source, StrMatch,
};

/// One problem in a policy, with the path of the field (`spec.rules[0]…`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FieldError {
    /// A field Istio does not define at this place (a typo such as `port`
    /// for `ports` would otherwise silently widen a rule).
    #[error("{0}: unknown field")]
    Unknown(String),
    /// A field of the wrong YAML type.
    #[error("{0}: must be {1}")]
    Type(String, &'static str),
    /// A list, source, operation or condition that must not be empty.
    #[error("{0}: must not be empty")]
    Empty(String),
    /// A required field is missing.
    #[error("{0}: is required")]
    Missing(String),
    /// A value that is not valid for its field.
    #[error("{0}: {1}")]
    Value(String, String),
}

/// Errors and warnings collected during one walk.
#[derive(Default)]
struct Walk {
    errors: Vec<FieldError>,
    warnings: Vec<String>,
}

impl Walk {
    /// The mapping at `at`, its keys not checked (labels, port numbers);
    /// `None` when absent (null) or not a mapping (reported).
    fn any_mapping<'a>(&mut self, v: Option<&'a Value>, at: &str) -> Option<&'a Mapping> {
        match v {
            None | Some(Value::Null) => None,
            Some(Value::Mapping(m)) => Some(m),
            Some(_) => {
                self.errors.push(FieldError::Type(at.to_string(), "a mapping"));
                None
            }
        }
    }

    /// The mapping at `at`, with its keys checked against `known`.
    fn mapping<'a>(&mut self, v: Option<&'a Value>, at: &str, known: &[&str]) -> Option<&'a Mapping> {
        let m = self.any_mapping(v, at)?;
        for k in m.keys() {
            match k.as_str() {
                Some(k) if known.contains(&k) => {}
                Some(k) => self.errors.push(FieldError::Unknown(format!("{at}.{k}"))),
                None => self.errors.push(FieldError::Unknown(format!("{at}.{k:?}"))),
            }
        }
        Some(m)
    }

    /// The list at `at`; `None` when absent (null) or not a list (reported).
    fn list<'a>(&mut self, v: Option<&'a Value>, at: &str) -> Option<&'a [Value]> {
        match v {
            None | Some(Value::Null) => None,
            Some(Value::Sequence(s)) => Some(s),
            Some(_) => {
                self.errors.push(FieldError::Type(at.to_string(), "a list"));
                None
            }
        }
    }

    /// A scalar as text (numbers are accepted for strings, as YAML writes
    /// `ports: [8080]`).
    fn string(&mut self, v: &Value, at: &str) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => {
                self.errors.push(FieldError::Type(at.to_string(), "a string"));
                None
            }
        }
    }

    /// A list of strings (absent: empty).
    fn strings(&mut self, m: &Mapping, field: &str, at: &str) -> Vec<String> {
        let at = format!("{at}.{field}");
        let Some(list) = self.list(m.get(field), &at) else {
            return Vec::new();
        };
        list.iter()
            .enumerate()
            .filter_map(|(i, v)| self.string(v, &format!("{at}[{i}]")))
            .collect()
    }

    fn value(&mut self, at: &str, message: String) {
        self.errors.push(FieldError::Value(at.to_string(), message));
    }

    fn cidrs(&mut self, values: &[String], at: &str) -> Vec<Cidr> {
        let mut out = Vec::new();
        for v in values {
            match Cidr::parse(v) {
                Some(c) => out.push(c),
                None => self.value(at, format!("{v:?} is not an IP address or CIDR")),
            }
        }
        out
    }

    /// Ports compare as numbers: `"080"` is port 80.
    fn ports(&mut self, values: &[String], at: &str) -> Vec<u16> {
        let mut out = Vec::new();
        for v in values {
            match v.parse::<u16>() {
                Ok(p) if p != 0 => out.push(p),
                _ => self.value(at, format!("{v:?} is not a port number")),
            }
        }
        out
    }

    fn principals(&mut self, values: &[String], at: &str) -> Vec<Principal> {
        for p in values {
            if p.starts_with("spiffe://") || p.is_empty() {
                self.value(at, format!("{p:?} is malformed (write principals without spiffe://)"));
            }
        }
        values.iter().map(|p| Principal::parse(p)).collect()
    }

    fn service_accounts(&mut self, values: &[String], at: &str) -> Vec<ServiceAccount> {
        let mut out = Vec::new();
        for v in values {
            match v.split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') && !v.contains('*') => {
                    out.push(ServiceAccount {
                        namespace: ns.to_string(),
                        name: sa.to_string(),
                    });
                }
                _ => self.value(at, format!("{v:?} is not of the form <namespace>/<service-account>")),
            }
        }
        out
    }
}

/// Name, namespace, creation time and annotations; other metadata is the
/// API server's and is not looked at.
fn meta_of(metadata: &Value, w: &mut Walk) -> (PolicyMeta, BTreeMap<String, String>) {
    let text = |w: &mut Walk, field: &str| match metadata.get(field) {
        None | Some(Value::Null) => None,
        Some(v) => w.string(v, &format!("metadata.{field}")),
    };
    let name = text(w, "name").unwrap_or_default();
    let namespace = text(w, "namespace").unwrap_or_default();
    let created = text(w, "creationTimestamp").filter(|c| !c.is_empty());
    let mut annotations = BTreeMap::new();
    if let Some(m) = metadata.get("annotations").and_then(Value::as_mapping) {
        for (k, v) in m {
            if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                annotations.insert(k.to_string(), v.to_string());
            }
        }
    }
    let meta = PolicyMeta {
        namespace,
        name,
        created,
        selector: None,
        error: None,
    };
    (meta, annotations)
}

/// `spec.selector`: `matchLabels` is required; empty `matchLabels` means
/// the whole namespace, as in Istio. An invalid selector selects every
/// workload of the namespace, so the policy fails safe at workload level.
fn selector(spec: &Mapping, w: &mut Walk) -> Option<BTreeMap<String, String>> {
    let before = w.errors.len();
    let sel = w.mapping(spec.get("selector"), "spec.selector", &["matchLabels"]);
    if sel.is_none() && w.errors.len() == before {
        return None;
    }
    let mut labels = BTreeMap::new();
    match sel.map(|s| s.get("matchLabels")) {
        Some(None | Some(Value::Null)) => w.errors.push(FieldError::Missing("spec.selector.matchLabels".into())),
        Some(m) => {
            for (k, v) in w.any_mapping(m, "spec.selector.matchLabels").into_iter().flatten() {
                match (k.as_str(), v.as_str()) {
                    (Some(k), Some(v)) if !k.is_empty() => {
                        labels.insert(k.to_string(), v.to_string());
                    }
                    _ => w.value(
                        "spec.selector.matchLabels",
                        format!("{k:?}: {v:?} is not a label (strings)"),
                    ),
                }
            }
        }
        None => {}
    }
    if w.errors.len() > before {
        return Some(BTreeMap::new());
    }
    (!labels.is_empty()).then_some(labels)
}

fn finish(meta: &mut PolicyMeta, w: &Walk) {
    if !w.errors.is_empty() {
        let all: Vec<String> = w.errors.iter().map(ToString::to_string).collect();
        meta.error = Some(all.join("; "));
    }
}

fn spec_mapping<'a>(spec: &'a Value, w: &mut Walk, known: &[&str]) -> Option<&'a Mapping> {
    match spec {
        Value::Null => None,
        v => w.mapping(Some(v), "spec", known),
    }
}

fn mode(w: &mut Walk, v: Option<&Value>, at: &str) -> Mode {
    let Some(m) = w.mapping(v, at, &["mode"]) else {
        if matches!(v, None | Some(Value::Null)) {
            return Mode::Unset;
        }
        // `mtls: STRICT` instead of `mtls: {mode: STRICT}`.
        return Mode::Strict;
    };
    let at = format!("{at}.mode");
    let s = match m.get("mode") {
        None | Some(Value::Null) => return Mode::Unset,
        Some(v) => w.string(v, &at).unwrap_or_default(),
    };
    Mode::parse(&s).unwrap_or_else(|| {
        w.value(
            &at,
            format!("unknown mode {s:?} (STRICT, PERMISSIVE, DISABLE or UNSET)"),
        );
        Mode::Strict
    })
}

/// Parses a PeerAuthentication; never fails, invalid content is recorded
/// and the policy then counts as STRICT for every port it selects.
pub(crate) fn parse_peer_authentication(metadata: &Value, spec: &Value) -> PeerAuthentication {
    let mut w = Walk::default();
    let (mut meta, _) = meta_of(metadata, &mut w);
    let mut mode_of_spec = Mode::Unset;
    let mut port_modes = BTreeMap::new();
    if let Some(spec) = spec_mapping(spec, &mut w, &["selector", "mtls", "portLevelMtls"]) {
        meta.selector = selector(spec, &mut w);
        mode_of_spec = mode(&mut w, spec.get("mtls"), "spec.mtls");
        if let Some(map) = w.any_mapping(spec.get("portLevelMtls"), "spec.portLevelMtls") {
            for (k, v) in map {
                let port = k
                    .as_u64()
                    .or_else(|| k.as_str().and_then(|s| s.parse().ok()))
                    .and_then(|p| u16::try_from(p).ok())
                    .filter(|p| *p != 0);
                match port {
                    Some(p) => {
                        let at = format!("spec.portLevelMtls.{p}");
                        if v.is_null() {
                            w.errors.push(FieldError::Type(at.clone(), "a mapping"));
                        }
                        port_modes.insert(p, mode(&mut w, Some(v), &at));
                    }
                    None => w.value("spec.portLevelMtls", format!("{k:?} is not a port number")),
                }
            }
        }
    }
    finish(&mut meta, &w);
    if meta.error.is_some() {
        mode_of_spec = Mode::Strict;
        port_modes.clear();
    }
    PeerAuthentication {
        meta,
        mode: mode_of_spec,
        port_modes,
    }
}

const SOURCE_FIELDS: &[&str] = &[
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
    "serviceAccounts",
    "notServiceAccounts",
];
const L7_SOURCE_FIELDS: &[&str] = &["requestPrincipals", "notRequestPrincipals"];
const OPERATION_FIELDS: &[&str] = &[
    "hosts",
    "notHosts",
    "ports",
    "notPorts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];
const L7_OPERATION_FIELDS: &[&str] = &["hosts", "notHosts", "methods", "notMethods", "paths", "notPaths"];

/// Parses an AuthorizationPolicy; never fails, invalid content is recorded.
pub fn parse_authorization_policy(metadata: &Value, spec: &Value) -> AuthorizationPolicy {
    let mut w = Walk::default();
    let (mut meta, annotations) = meta_of(metadata, &mut w);
    let dry_run = match annotations.get(DRY_RUN_ANNOTATION).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            w.value(
                &format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
                format!("{other:?} is neither \"true\" nor \"false\""),
            );
            false
        }
    };
    let mut action = Action::Allow;
    let mut rules = Vec::new();
    let mut target_ref = false;
    let known = ["selector", "action", "rules", "provider", "targetRef", "targetRefs"];
    if let Some(spec) = spec_mapping(spec, &mut w, &known) {
        target_ref = ["targetRef", "targetRefs"]
            .iter()
            .any(|f| spec.get(*f).is_some_and(|v| !v.is_null()));
        meta.selector = selector(spec, &mut w);
        action = match spec.get("action") {
            None | Some(Value::Null) => Action::Allow,
            Some(v) => match w.string(v, "spec.action").as_deref() {
                Some("ALLOW") => Action::Allow,
                Some("DENY") => Action::Deny,
                Some("AUDIT") => Action::Audit,
                Some("CUSTOM") => Action::Custom,
                other => {
                    if let Some(other) = other {
                        w.value("spec.action", format!("unknown action {other:?}"));
                    }
                    // An action we cannot read is treated as the one that fails closed.
                    Action::Deny
                }
            },
        };
        if w.mapping(spec.get("provider"), "spec.provider", &["name"]).is_some() && action != Action::Custom {
            w.value("spec.provider", "is only allowed with action CUSTOM".into());
        }
        if let Some(list) = w.list(spec.get("rules"), "spec.rules") {
            for (i, r) in list.iter().enumerate() {
                rules.push(parse_rule(r, &format!("spec.rules[{i}]"), &mut w));
            }
        }
    }
    finish(&mut meta, &w);
    AuthorizationPolicy {
        meta,
        action,
        rules,
        warnings: w.warnings,
        dry_run,
        target_ref,
    }
}

fn parse_rule(r: &Value, at: &str, w: &mut Walk) -> Rule {
    let mut rule = Rule::default();
    let Some(r) = w.mapping(Some(r), at, &["from", "to", "when"]) else {
        if r.is_null() {
            w.errors.push(FieldError::Type(at.to_string(), "a mapping"));
        }
        return rule;
    };
    if let Some(from) = w.list(r.get("from"), &format!("{at}.from")) {
        if from.is_empty() {
            w.errors.push(FieldError::Empty(format!("{at}.from")));
        }
        let mut sources = Vec::new();
        for (j, f) in from.iter().enumerate() {
            let at = format!("{at}.from[{j}]");
            let Some(f) = w.mapping(Some(f), &at, &["source"]) else {
                if f.is_null() {
                    w.errors.push(FieldError::Missing(format!("{at}.source")));
                }
                continue;
            };
            let at = format!("{at}.source");
            let Some(s) = w.mapping(f.get("source"), &at, SOURCE_FIELDS) else {
                if f.get("source").is_none_or(Value::is_null) {
                    w.errors.push(FieldError::Missing(at));
                }
                continue;
            };
            sources.push(parse_source(s, &at, w, &mut rule.has_l7));
        }
        rule.from = Some(sources);
    }
    if let Some(to) = w.list(r.get("to"), &format!("{at}.to")) {
        if to.is_empty() {
            w.errors.push(FieldError::Empty(format!("{at}.to")));
        }
        let mut ops = Vec::new();
        for (j, t) in to.iter().enumerate() {
            let at = format!("{at}.to[{j}]");
            let Some(t) = w.mapping(Some(t), &at, &["operation"]) else {
                if t.is_null() {
                    w.errors.push(FieldError::Missing(format!("{at}.operation")));
                }
                continue;
            };
            let at = format!("{at}.operation");
            let Some(o) = w.mapping(t.get("operation"), &at, OPERATION_FIELDS) else {
                if t.get("operation").is_none_or(Value::is_null) {
                    w.errors.push(FieldError::Missing(at));
                }
                continue;
            };
            ops.push(parse_operation(o, &at, w, &mut rule.has_l7));
        }
        rule.to = Some(ops);
    }
    if let Some(when) = w.list(r.get("when"), &format!("{at}.when")) {
        for (j, c) in when.iter().enumerate() {
            let at = format!("{at}.when[{j}]");
            if let Some(c) = parse_condition(c, &at, w, &mut rule.has_l7) {
                rule.when.push(c);
            }
        }
    }
    rule
}

fn non_empty(m: &Mapping, w: &mut Walk, at: &str) {
    let empty = m.values().all(|v| match v {
        Value::Null => true,
        Value::Sequence(s) => s.is_empty(),
        _ => false,
    });
    if empty {
        w.errors.push(FieldError::Empty(at.to_string()));
    }
}

fn parse_source(s: &Mapping, at: &str, w: &mut Walk, has_l7: &mut bool) -> Source {
    non_empty(s, w, at);
    for l7 in L7_SOURCE_FIELDS {
        if s.get(*l7).is_some() {
            *has_l7 = true;
            w.warnings.push(format!("{at}.{l7} needs an L7 proxy"));
            w.strings(s, l7, at);
        }
    }
    let field = |f: &str| format!("{at}.{f}");
    let principals = w.strings(s, "principals", at);
    let not_principals = w.strings(s, "notPrincipals", at);
    let namespaces = w.strings(s, "namespaces", at);
    let not_namespaces = w.strings(s, "notNamespaces", at);
    let service_accounts = w.strings(s, "serviceAccounts", at);
    let not_service_accounts = w.strings(s, "notServiceAccounts", at);
    if !service_accounts.is_empty() && (!principals.is_empty() || !namespaces.is_empty()) {
        w.value(
            &field("serviceAccounts"),
            "cannot be set with principals or namespaces".into(),
        );
    }
    if !not_service_accounts.is_empty() && (!not_principals.is_empty() || !not_namespaces.is_empty()) {
        w.value(
            &field("notServiceAccounts"),
            "cannot be set with notPrincipals or notNamespaces".into(),
        );
    }
    let mut ip_blocks = Vec::new();
    let mut not_ip_blocks = Vec::new();
    for (name, negated) in [
        ("ipBlocks", false),
        ("remoteIpBlocks", false),
        ("notIpBlocks", true),
        ("notRemoteIpBlocks", true),
    ] {
        let values = w.strings(s, name, at);
        let cidrs = w.cidrs(&values, &field(name));
        if negated { &mut not_ip_blocks } else { &mut ip_blocks }.extend(cidrs);
    }
    Source {
        principals: w.principals(&principals, &field("principals")),
        not_principals: w.principals(&not_principals, &field("notPrincipals")),
        service_accounts: w.service_accounts(&service_accounts, &field("serviceAccounts")),
        not_service_accounts: w.service_accounts(&not_service_accounts, &field("notServiceAccounts")),
        namespaces: namespaces.iter().map(|n| StrMatch::parse(n)).collect(),
        not_namespaces: not_namespaces.iter().map(|n| StrMatch::parse(n)).collect(),
        ip_blocks,
        not_ip_blocks,
    }
}

fn parse_operation(o: &Mapping, at: &str, w: &mut Walk, has_l7: &mut bool) -> Operation {
    non_empty(o, w, at);
    for l7 in L7_OPERATION_FIELDS {
        if o.get(*l7).is_some() {
            *has_l7 = true;
            w.warnings.push(format!("{at}.{l7} needs an L7 proxy"));
            w.strings(o, l7, at);
        }
    }
    let ports = w.strings(o, "ports", at);
    let not_ports = w.strings(o, "notPorts", at);
    Operation {
        ports: w.ports(&ports, &format!("{at}.ports")),
        not_ports: w.ports(&not_ports, &format!("{at}.notPorts")),
    }
}

fn parse_condition(c: &Value, at: &str, w: &mut Walk, has_l7: &mut bool) -> Option<Condition> {
    let c = match w.mapping(Some(c), at, &["key", "values", "notValues"]) {
        Some(c) => c,
        None => {
            if c.is_null() {
                w.errors.push(FieldError::Type(at.to_string(), "a mapping"));
            }
            return None;
        }
    };
    let key = match c.get("key") {
        None | Some(Value::Null) => None,
        Some(k) => w.string(k, &format!("{at}.key")),
    };
    let values = w.strings(c, "values", at);
    let not_values = w.strings(c, "notValues", at);
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        w.errors.push(FieldError::Missing(format!("{at}.key")));
        return None;
    };
    if values.is_empty() && not_values.is_empty() {
        w.value(at, format!("key {key:?} needs values or notValues"));
        return None;
    }
    let (v_at, n_at) = (format!("{at}.values"), format!("{at}.notValues"));
    let source = |s: Source| Some(Condition::Source(s));
    match key.as_str() {
        "source.ip" | "remote.ip" => source(Source {
            ip_blocks: w.cidrs(&values, &v_at),
            not_ip_blocks: w.cidrs(&not_values, &n_at),
            ..Source::default()
        }),
        "source.namespace" => source(Source {
            namespaces: values.iter().map(|v| StrMatch::parse(v)).collect(),
            not_namespaces: not_values.iter().map(|v| StrMatch::parse(v)).collect(),
            ..Source::default()
        }),
        "source.principal" => source(Source {
            principals: w.principals(&values, &v_at),
            not_principals: w.principals(&not_values, &n_at),
            ..Source::default()
        }),
        "source.serviceAccount" => source(Source {
            service_accounts: w.service_accounts(&values, &v_at),
            not_service_accounts: w.service_accounts(&not_values, &n_at),
            ..Source::default()
        }),
        "destination.ip" => Some(Condition::DestinationIp(
            w.cidrs(&values, &v_at),
            w.cidrs(&not_values, &n_at),
        )),
        "destination.port" => Some(Condition::Operation(Operation {
            ports: w.ports(&values, &v_at),
            not_ports: w.ports(&not_values, &n_at),
        })),
        k if k.starts_with("request.") || k.starts_with("experimental.") || k == "connection.sni" => {
            *has_l7 = true;
            w.warnings.push(format!("{at}: key {k:?} needs an L7 proxy"));
            None
        }
        k => {
            w.value(&format!("{at}.key"), format!("unknown key {k:?}"));
            None
        }
    }
}
