//! Table-driven policy tests. Where a case comes from an example in Istio's
//! security documentation, the test says which.

#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::sync::Arc;

use super::model::{Cidr, Mode, parse_authorization_policy, parse_peer_authentication};
use super::*;

const ROOT: &str = "istio-system";

fn pod(ns: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        namespace: ns.into(),
        name: "p".into(),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ips: vec!["10.0.0.5".parse().unwrap()],
        ..Default::default()
    }
}

fn yaml(s: &str) -> serde_norway::Value {
    serde_norway::from_str(s).unwrap()
}

fn pa(ns: &str, name: &str, created: &str, spec: &str) -> Arc<PeerAuthentication> {
    let created = if created.is_empty() {
        String::new()
    } else {
        format!(", creationTimestamp: '{created}'")
    };
    let meta = yaml(&format!("{{name: {name}, namespace: {ns}{created}}}"));
    Arc::new(parse_peer_authentication(&meta, &yaml(spec)))
}

fn ap(ns: &str, name: &str, spec: &str) -> Arc<AuthorizationPolicy> {
    let meta = yaml(&format!("{{name: {name}, namespace: {ns}}}"));
    Arc::new(parse_authorization_policy(&meta, &yaml(spec)))
}

fn conn(src: &str, id: Option<(&str, &str)>, port: u16) -> ConnInfo {
    ConnInfo {
        src_ip: src.parse::<IpAddr>().unwrap(),
        src_identity: id.map(|(ns, sa)| Identity::new("cluster.local", ns, sa)),
        dst_ip: "10.0.0.5".parse().unwrap(),
        dst_port: port,
    }
}

#[test]
fn peer_authentication_scopes_precedence_and_inheritance() {
    let web = pod("foo", &[("app", "web")]);
    type Case = (&'static str, Vec<Arc<PeerAuthentication>>, Mode, Vec<(u16, Mode)>);
    let cases: Vec<Case> = vec![
        ("no policy at all is PERMISSIVE", vec![], Mode::Permissive, vec![]),
        (
            // PeerAuthentication reference: "mesh-wide policy in the root namespace".
            "mesh-wide STRICT from the root namespace",
            vec![pa(ROOT, "default", "", "mtls: {mode: STRICT}")],
            Mode::Strict,
            vec![],
        ),
        (
            // PeerAuthentication reference: namespace "foo" PERMISSIVE overriding the mesh.
            "namespace-wide overrides mesh-wide",
            vec![
                pa(ROOT, "default", "", "mtls: {mode: STRICT}"),
                pa("foo", "default", "", "mtls: {mode: PERMISSIVE}"),
            ],
            Mode::Permissive,
            vec![],
        ),
        (
            "workload selector overrides namespace",
            vec![
                pa("foo", "default", "", "mtls: {mode: PERMISSIVE}"),
                pa(
                    "foo",
                    "web",
                    "",
                    "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}",
                ),
            ],
            Mode::Strict,
            vec![],
        ),
        (
            "a selector that does not match is ignored",
            vec![pa(
                "foo",
                "api",
                "",
                "selector: {matchLabels: {app: api}}\nmtls: {mode: DISABLE}",
            )],
            Mode::Permissive,
            vec![],
        ),
        (
            "a namespace policy of another namespace is ignored",
            vec![pa("bar", "default", "", "mtls: {mode: DISABLE}")],
            Mode::Permissive,
            vec![],
        ),
        (
            "UNSET at workload level inherits the namespace",
            vec![
                pa("foo", "default", "", "mtls: {mode: STRICT}"),
                pa(
                    "foo",
                    "web",
                    "",
                    "selector: {matchLabels: {app: web}}\nmtls: {mode: UNSET}",
                ),
            ],
            Mode::Strict,
            vec![],
        ),
        (
            "UNSET at namespace level inherits the mesh",
            vec![
                pa(ROOT, "default", "", "mtls: {mode: STRICT}"),
                pa("foo", "default", "", "mtls: {}"),
            ],
            Mode::Strict,
            vec![],
        ),
        (
            "the oldest of two namespace policies wins",
            vec![
                pa("foo", "newer", "2024-02-01T00:00:00Z", "mtls: {mode: DISABLE}"),
                pa("foo", "older", "2024-01-01T00:00:00Z", "mtls: {mode: STRICT}"),
            ],
            Mode::Strict,
            vec![],
        ),
        (
            "same age: the name decides",
            vec![
                pa("foo", "b", "2024-01-01T00:00:00Z", "mtls: {mode: DISABLE}"),
                pa("foo", "a", "2024-01-01T00:00:00Z", "mtls: {mode: STRICT}"),
            ],
            Mode::Strict,
            vec![],
        ),
        (
            // PeerAuthentication reference: the "finance" example, port 8080 DISABLE under STRICT.
            "port-level mode under a STRICT workload",
            vec![pa(
                "foo",
                "finance",
                "",
                "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}\nportLevelMtls: {8080: {mode: DISABLE}}",
            )],
            Mode::Strict,
            vec![(8080, Mode::Disable), (9090, Mode::Strict)],
        ),
        (
            // Istio once merged several portLevelMtls entries and left all ports permissive.
            "several port-level entries each apply to their own port",
            vec![
                pa("foo", "default", "", "mtls: {mode: STRICT}"),
                pa(
                    "foo",
                    "web",
                    "",
                    "selector: {matchLabels: {app: web}}\nportLevelMtls: {8080: {mode: PERMISSIVE}, 8443: {mode: DISABLE}, 9000: {mode: UNSET}}",
                ),
            ],
            Mode::Strict,
            vec![
                (8080, Mode::Permissive),
                (8443, Mode::Disable),
                (9000, Mode::Strict),
                (7000, Mode::Strict),
            ],
        ),
        (
            "an unknown mode is reported and fails closed as STRICT",
            vec![pa("foo", "default", "", "mtls: {mode: SOMETIMES}")],
            Mode::Strict,
            vec![],
        ),
    ];
    for (name, policies, default, ports) in cases {
        let m = mtls_mode(&policies, ROOT, &web);
        assert_eq!(m.default, default, "{name}");
        for (port, want) in ports {
            assert_eq!(m.mode(port), want, "{name}: port {port}");
        }
    }
    let bad = pa("foo", "default", "", "mtls: {mode: SOMETIMES}");
    assert!(
        bad.meta.error.as_deref().unwrap().contains("spec.mtls.mode"),
        "{:?}",
        bad.meta.error
    );
}

#[test]
fn authorization_actions_fields_and_edge_cases() {
    let api = pod("shop", &[("app", "api")]);
    let frontend = conn("10.0.1.1", Some(("shop", "frontend")), 8080);
    let other = conn("10.0.1.2", Some(("shop", "other")), 8080);
    let plain = conn("10.0.9.9", None, 8080);
    let foreign_ns = conn("10.0.1.3", Some(("test", "tester")), 8080);
    type Case = (&'static str, Vec<Arc<AuthorizationPolicy>>, ConnInfo, bool);
    let only_frontend = || {
        ap(
            "shop",
            "api-from-frontend",
            "selector: {matchLabels: {app: api}}\naction: ALLOW\nrules:\n- from:\n  - source: {principals: [cluster.local/ns/shop/sa/frontend]}",
        )
    };
    let cases: Vec<Case> = vec![
        ("no policy allows", vec![], other.clone(), true),
        // Authorization Policy reference, "allow-nothing": `spec: {}`.
        (
            "allow-nothing: spec {} allows nothing",
            vec![ap("shop", "allow-nothing", "{}")],
            frontend.clone(),
            false,
        ),
        // Authorization Policy reference, "allow-all": one empty rule.
        (
            "allow-all: rule {} matches everything",
            vec![ap("shop", "allow-all", "rules: [{}]")],
            plain.clone(),
            true,
        ),
        // Authorization Policy reference, "deny-all": DENY with one empty rule.
        (
            "deny-all",
            vec![ap("shop", "deny-all", "action: DENY\nrules: [{}]")],
            frontend.clone(),
            false,
        ),
        (
            "ALLOW by principal: match",
            vec![only_frontend()],
            frontend.clone(),
            true,
        ),
        (
            "ALLOW by principal: other identity",
            vec![only_frontend()],
            other.clone(),
            false,
        ),
        (
            "ALLOW by principal: plaintext has no principal",
            vec![only_frontend()],
            plain.clone(),
            false,
        ),
        (
            "selector narrows to workloads",
            vec![ap("shop", "web-only", "selector: {matchLabels: {app: web}}\nrules: []")],
            other.clone(),
            true,
        ),
        (
            "root-namespace policy applies mesh-wide",
            vec![ap(
                ROOT,
                "global-deny",
                "action: DENY\nrules:\n- from:\n  - source: {namespaces: [test]}",
            )],
            foreign_ns.clone(),
            false,
        ),
        (
            "another namespace's policy does not apply",
            vec![ap("elsewhere", "deny", "action: DENY\nrules: [{}]")],
            other.clone(),
            true,
        ),
        (
            "any matching DENY wins over ALLOW",
            vec![
                only_frontend(),
                ap(
                    "shop",
                    "deny-frontend",
                    "action: DENY\nrules:\n- from:\n  - source: {principals: ['*/sa/frontend']}",
                ),
            ],
            frontend.clone(),
            false,
        ),
        (
            "notPrincipals",
            vec![ap(
                "shop",
                "deny-not-frontend",
                "action: DENY\nrules:\n- from:\n  - source: {notPrincipals: [cluster.local/ns/shop/sa/frontend]}",
            )],
            other.clone(),
            false,
        ),
        (
            "notPrincipals holds for plaintext (no principal)",
            vec![ap(
                "shop",
                "deny-not-frontend",
                "action: DENY\nrules:\n- from:\n  - source: {notPrincipals: [cluster.local/ns/shop/sa/frontend]}",
            )],
            plain.clone(),
            false,
        ),
        (
            "prefix principal",
            vec![ap(
                "shop",
                "p",
                "rules:\n- from:\n  - source: {principals: ['cluster.local/ns/shop/*']}",
            )],
            other.clone(),
            true,
        ),
        (
            "suffix principal",
            vec![ap(
                "shop",
                "p",
                "rules:\n- from:\n  - source: {principals: ['*/sa/tester']}",
            )],
            foreign_ns.clone(),
            true,
        ),
        (
            "'*' principal requires some principal",
            vec![ap("shop", "p", "rules:\n- from:\n  - source: {principals: ['*']}")],
            plain.clone(),
            false,
        ),
        (
            // Authorization Policy reference, "allow-read" (namespaces: [test]) without its L7 part.
            "namespaces",
            vec![ap("shop", "p", "rules:\n- from:\n  - source: {namespaces: [test]}")],
            foreign_ns.clone(),
            true,
        ),
        (
            "notNamespaces",
            vec![ap("shop", "p", "rules:\n- from:\n  - source: {notNamespaces: [test]}")],
            foreign_ns.clone(),
            false,
        ),
        (
            "namespaces cannot match plaintext",
            vec![ap("shop", "p", "rules:\n- from:\n  - source: {namespaces: ['*']}")],
            plain.clone(),
            false,
        ),
        (
            "ipBlocks",
            vec![ap(
                "shop",
                "p",
                "rules:\n- from:\n  - source: {ipBlocks: [10.0.9.0/24]}",
            )],
            plain.clone(),
            true,
        ),
        (
            "notIpBlocks",
            vec![ap(
                "shop",
                "p",
                "rules:\n- from:\n  - source: {notIpBlocks: [10.0.9.0/24]}",
            )],
            plain.clone(),
            false,
        ),
        (
            "remoteIpBlocks is the source at L4",
            vec![ap(
                "shop",
                "p",
                "rules:\n- from:\n  - source: {remoteIpBlocks: [10.0.1.1]}",
            )],
            frontend.clone(),
            true,
        ),
        (
            "notRemoteIpBlocks",
            vec![ap(
                "shop",
                "p",
                "action: DENY\nrules:\n- from:\n  - source: {notRemoteIpBlocks: [10.0.1.0/24]}",
            )],
            plain.clone(),
            false,
        ),
        (
            // "Authorization for TCP traffic" task: allow ports 9000 and 9001.
            "ports",
            vec![ap(
                "shop",
                "tcp-policy",
                "rules:\n- to:\n  - operation: {ports: ['9000', '9001']}",
            )],
            frontend.clone(),
            false,
        ),
        (
            "notPorts",
            vec![ap(
                "shop",
                "p",
                "action: DENY\nrules:\n- to:\n  - operation: {notPorts: ['9000']}",
            )],
            frontend.clone(),
            false,
        ),
        (
            "when source.ip",
            vec![ap(
                "shop",
                "p",
                "rules:\n- when:\n  - {key: source.ip, values: [10.0.1.0/24]}",
            )],
            frontend.clone(),
            true,
        ),
        (
            "when source.namespace notValues",
            vec![ap(
                "shop",
                "p",
                "rules:\n- when:\n  - {key: source.namespace, notValues: [shop]}",
            )],
            other.clone(),
            false,
        ),
        (
            "when source.principal",
            vec![ap(
                "shop",
                "p",
                "rules:\n- when:\n  - {key: source.principal, values: ['*/sa/frontend']}",
            )],
            frontend.clone(),
            true,
        ),
        (
            "when destination.ip",
            vec![ap(
                "shop",
                "p",
                "rules:\n- when:\n  - {key: destination.ip, values: [10.0.0.5]}",
            )],
            other.clone(),
            true,
        ),
        (
            "when destination.port",
            vec![ap(
                "shop",
                "p",
                "action: DENY\nrules:\n- when:\n  - {key: destination.port, values: ['8080']}",
            )],
            other.clone(),
            false,
        ),
        (
            "all parts of a rule must match",
            vec![ap(
                "shop",
                "p",
                "rules:\n- from:\n  - source: {principals: [cluster.local/ns/shop/sa/frontend]}\n  to:\n  - operation: {ports: ['9000']}",
            )],
            frontend.clone(),
            false,
        ),
        (
            "L7 fields make an ALLOW rule match nothing",
            vec![ap("shop", "p", "rules:\n- to:\n  - operation: {methods: [GET]}")],
            frontend.clone(),
            false,
        ),
        (
            "L7 fields are dropped from a DENY rule, which then denies more",
            vec![ap(
                "shop",
                "p",
                "action: DENY\nrules:\n- from:\n  - source: {namespaces: [shop]}\n  to:\n  - operation: {paths: [/admin]}",
            )],
            other.clone(),
            false,
        ),
        (
            "AUDIT never changes the decision",
            vec![ap("shop", "audit", "action: AUDIT\nrules: [{}]")],
            other.clone(),
            true,
        ),
        (
            "CUSTOM is unsupported and fails closed",
            vec![ap(
                "shop",
                "ext",
                "action: CUSTOM\nprovider: {name: ext-authz}\nrules: [{}]",
            )],
            frontend.clone(),
            false,
        ),
        (
            "a broken DENY fails closed for what it selects",
            vec![ap(
                "shop",
                "bad-deny",
                "action: DENY\nrules:\n- from:\n  - source: {ipBlocks: [not-a-cidr]}",
            )],
            frontend.clone(),
            false,
        ),
        (
            "a broken ALLOW matches nothing",
            vec![ap(
                "shop",
                "bad-allow",
                "rules:\n- from:\n  - source: {principals: ['spiffe://cluster.local/ns/shop/sa/frontend']}",
            )],
            frontend.clone(),
            false,
        ),
        (
            "a broken ALLOW leaves other ALLOWs working",
            vec![
                ap(
                    "shop",
                    "bad-allow",
                    "rules:\n- from:\n  - source: {ipBlocks: [999.1.1.1]}",
                ),
                only_frontend(),
            ],
            frontend.clone(),
            true,
        ),
    ];
    for (name, policies, c, want) in cases {
        let d = authorize(&policies, ROOT, &TrustDomains::default(), &api, &c);
        assert_eq!(d.allowed, want, "{name}: {d:?}");
    }
}

#[test]
fn audits_are_reported_and_l7_fields_warned() {
    let api = pod("shop", &[]);
    let d = authorize(
        &[ap("shop", "audit", "action: AUDIT\nrules: [{}]")],
        ROOT,
        &TrustDomains::default(),
        &api,
        &conn("10.0.0.1", None, 80),
    );
    assert_eq!(d.audited, vec!["shop/audit".to_string()]);
    let p = ap(
        "shop",
        "p",
        "rules:\n- to:\n  - operation: {methods: [GET], hosts: [x]}\n  when:\n  - {key: 'request.headers[x]', values: [y]}",
    );
    assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings);
    assert!(p.meta.error.is_none());
}

#[test]
fn invalid_policies_name_the_field() {
    for (spec, field) in [
        ("action: MAYBE", "spec.action"),
        (
            "rules:\n- from:\n  - source: {ipBlocks: [10.0.0.0/33]}",
            "spec.rules[0].from[0].source.ipBlocks",
        ),
        (
            "rules:\n- from:\n  - source: {principals: ['spiffe://x/ns/a/sa/b']}",
            "spec.rules[0].from[0].source.principals",
        ),
        (
            "rules:\n- to:\n  - operation: {ports: [http]}",
            "spec.rules[0].to[0].operation.ports",
        ),
        (
            "rules:\n- when:\n  - {key: source.color, values: [red]}",
            "spec.rules[0].when[0].key",
        ),
        (
            "rules:\n- from:\n  - source: {principal: [x]}",
            "spec.rules[0].from[0].source.principal",
        ),
    ] {
        let p = ap("shop", "bad", spec);
        let e = p.meta.error.clone().unwrap_or_default();
        assert!(e.contains(field), "{spec}: {e}");
    }
}

#[test]
fn string_and_cidr_matching() {
    assert!(StrMatch::parse("abc*").matches("abcdef"));
    assert!(!StrMatch::parse("abc*").matches("xabc"));
    assert!(StrMatch::parse("*def").matches("abcdef"));
    assert!(StrMatch::parse("*").matches(""));
    assert!(StrMatch::parse("exact").matches("exact") && !StrMatch::parse("exact").matches("exactly"));
    let c = Cidr::parse("10.1.0.0/16").unwrap();
    assert!(c.contains("10.1.200.3".parse().unwrap()));
    assert!(!c.contains("10.2.0.1".parse().unwrap()));
    assert!(
        c.contains("::ffff:10.1.0.1".parse().unwrap()),
        "IPv4-mapped sources match IPv4 blocks"
    );
    assert!(Cidr::parse("fd00::/8").unwrap().contains("fd12::1".parse().unwrap()));
    assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("1.2.3.4".parse().unwrap()));
    assert_eq!(Cidr::parse("1.2.3.4/40"), None);
}

/// One row of the tables below: the policies in force, and whether a
/// plaintext client and an mTLS client (`shop/frontend`) reach `shop/api`
/// on port 8080, as the inbound path decides (STRICT refuses plaintext,
/// then authorization).
struct Row {
    name: &'static str,
    peer_auth: Vec<Arc<PeerAuthentication>>,
    authz: Vec<Arc<AuthorizationPolicy>>,
    plaintext: bool,
    mtls: bool,
}

fn row(name: &'static str, authz: Vec<Arc<AuthorizationPolicy>>, plaintext: bool, mtls: bool) -> Row {
    Row {
        name,
        peer_auth: vec![],
        authz,
        plaintext,
        mtls,
    }
}

fn pa_row(name: &'static str, peer_auth: Vec<Arc<PeerAuthentication>>, plaintext: bool) -> Row {
    Row {
        name,
        peer_auth,
        authz: vec![],
        plaintext,
        mtls: true,
    }
}

fn ap_meta(ns: &str, name: &str, meta: &str, spec: &str) -> Arc<AuthorizationPolicy> {
    let meta = yaml(&format!("{{name: {name}, namespace: {ns}, {meta}}}"));
    Arc::new(parse_authorization_policy(&meta, &yaml(spec)))
}

/// Runs every row with the client identity in `client_td`; returns the
/// rows that decided otherwise, so one run names every failing row.
fn run_rows(rows: &[Row], trust: &TrustDomains, client_td: &str) -> Vec<String> {
    let api = pod("shop", &[("app", "api")]);
    let plain = conn("10.0.9.9", None, 8080);
    let mut mtls = conn("10.0.1.1", None, 8080);
    mtls.src_identity = Some(Identity::new(client_td, "shop", "frontend"));
    let inbound = |r: &Row, c: &ConnInfo| {
        let mode = mtls_mode(&r.peer_auth, ROOT, &api).mode(c.dst_port);
        (c.src_identity.is_some() || mode != Mode::Strict) && authorize(&r.authz, ROOT, trust, &api, c).allowed
    };
    rows.iter()
        .filter_map(|r| {
            let got = (inbound(r, &plain), inbound(r, &mtls));
            (got != (r.plaintext, r.mtls)).then(|| {
                format!(
                    "{}: plaintext {} mtls {} (want {} {})",
                    r.name, got.0, got.1, r.plaintext, r.mtls
                )
            })
        })
        .collect()
}

#[test]
fn invalid_policies_fail_safe_instead_of_matching_anything() {
    let allow = |spec: &str| ap("shop", "bad-allow", spec);
    let deny = |spec: &str| ap("shop", "bad-deny", &format!("action: DENY\n{spec}"));
    let rows = vec![
        row(
            "ALLOW: operation.port (for ports) is an unknown field",
            vec![allow("rules:\n- to:\n  - operation: {port: ['9000']}")],
            false,
            false,
        ),
        row(
            "DENY: operation.port is an unknown field, so the DENY denies what it selects",
            vec![deny(
                "rules:\n- from:\n  - source: {namespaces: [elsewhere]}\n  to:\n  - operation: {port: ['8080']}",
            )],
            false,
            false,
        ),
        row(
            "ALLOW: from is not a list",
            vec![allow(
                "rules:\n- from:\n    source: {principals: [cluster.local/ns/shop/sa/admin]}",
            )],
            false,
            false,
        ),
        row(
            "ALLOW: to is not a list",
            vec![allow("rules:\n- to:\n    operation: {ports: ['9000']}")],
            false,
            false,
        ),
        row(
            "ALLOW: when is not a list",
            vec![allow("rules:\n- when: {key: source.ip, values: [10.9.9.9]}")],
            false,
            false,
        ),
        row(
            "ALLOW: rules is not a list",
            vec![allow("rules: {from: [{source: {namespaces: [shop]}}]}")],
            false,
            false,
        ),
        row(
            "ALLOW: from is an empty list",
            vec![allow("rules:\n- from: []")],
            false,
            false,
        ),
        row(
            "ALLOW: an empty source",
            vec![allow("rules:\n- from:\n  - source: {}")],
            false,
            false,
        ),
        row(
            "ALLOW: a from entry without source",
            vec![allow("rules:\n- from:\n  - {}")],
            false,
            false,
        ),
        row(
            "ALLOW: an empty operation",
            vec![allow("rules:\n- to:\n  - operation: {}")],
            false,
            false,
        ),
        row(
            "ALLOW: a when without values or notValues",
            vec![allow("rules:\n- when:\n  - {key: source.principal}")],
            false,
            false,
        ),
        row(
            "ALLOW: a when with an unknown field (value for values)",
            vec![allow("rules:\n- when:\n  - {key: source.ip, value: [10.9.9.9]}")],
            false,
            false,
        ),
        row(
            "ALLOW: a rule with an unknown field (form for from)",
            vec![allow(
                "rules:\n- form:\n  - source: {principals: [cluster.local/ns/shop/sa/admin]}",
            )],
            false,
            false,
        ),
        row(
            "DENY: spec with an unknown field (rule for rules)",
            vec![deny("rule: [{}]")],
            false,
            false,
        ),
        row(
            "ALLOW: selector without matchLabels",
            vec![allow("selector: {app: web}\nrules: [{}]")],
            false,
            false,
        ),
        row(
            "DENY: destination.port compares as a number ('08080' is 8080)",
            vec![deny("rules:\n- when:\n  - {key: destination.port, values: ['08080']}")],
            false,
            false,
        ),
        row(
            "DENY: destination.port that is not a number",
            vec![deny("rules:\n- when:\n  - {key: destination.port, values: [http]}")],
            false,
            false,
        ),
        row(
            "ALLOW: provider without CUSTOM",
            vec![allow("provider: {name: ext}\nrules: [{}]")],
            false,
            false,
        ),
        row(
            "ALLOW: serviceAccounts together with principals",
            vec![allow(
                "rules:\n- from:\n  - source: {serviceAccounts: [shop/frontend], principals: ['*']}",
            )],
            false,
            false,
        ),
        row(
            "ALLOW: a serviceAccounts value that is not ns/sa",
            vec![allow("rules:\n- from:\n  - source: {serviceAccounts: [frontend]}")],
            false,
            false,
        ),
        row(
            "ALLOW: a bad dry-run annotation makes the policy invalid, hence enforced and matching nothing",
            vec![ap_meta(
                "shop",
                "p",
                "annotations: {istio.io/dry-run: 'yes'}",
                "rules: [{}]",
            )],
            false,
            false,
        ),
        pa_row(
            "PeerAuthentication: mtls: STRICT as a scalar counts as STRICT",
            vec![pa("shop", "default", "", "mtls: STRICT")],
            false,
        ),
        pa_row(
            "PeerAuthentication: mtls with an unknown field (mod for mode)",
            vec![pa("shop", "default", "", "mtls: {mod: STRICT}")],
            false,
        ),
        pa_row(
            "PeerAuthentication: a workload policy without matchLabels cannot loosen the namespace",
            vec![
                pa("shop", "default", "", "mtls: {mode: STRICT}"),
                pa("shop", "api", "", "selector: {app: api}\nmtls: {mode: PERMISSIVE}"),
            ],
            false,
        ),
        pa_row(
            "PeerAuthentication: an unknown spec field",
            vec![pa(
                "shop",
                "default",
                "",
                "mtls: {mode: PERMISSIVE}\nportLevelMTLS: {8080: {mode: PERMISSIVE}}",
            )],
            false,
        ),
    ];
    let failed = run_rows(&rows, &TrustDomains::default(), "cluster.local");
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn policies_follow_istio_where_it_differs_from_a_plain_reading() {
    let admin_only = "rules:\n- from:\n  - source: {principals: [cluster.local/ns/shop/sa/admin]}";
    let target_refs = "targetRefs: [{kind: Service, group: '', name: api}]\n";
    let rows = vec![
        pa_row(
            "matchLabels {} is namespace-wide: the older namespace policy wins",
            vec![
                pa("shop", "strict", "2024-01-01T00:00:00Z", "mtls: {mode: STRICT}"),
                pa(
                    "shop",
                    "loose",
                    "2024-02-01T00:00:00Z",
                    "selector: {matchLabels: {}}\nmtls: {mode: PERMISSIVE}",
                ),
            ],
            false,
        ),
        pa_row(
            "a policy without creationTimestamp is not the oldest",
            vec![
                pa("shop", "b-dated", "2024-01-01T00:00:00Z", "mtls: {mode: STRICT}"),
                pa("shop", "a-undated", "", "mtls: {mode: PERMISSIVE}"),
            ],
            false,
        ),
        pa_row(
            "two undated policies: the name decides",
            vec![
                pa("shop", "b", "", "mtls: {mode: PERMISSIVE}"),
                pa("shop", "a", "", "mtls: {mode: STRICT}"),
            ],
            false,
        ),
        row(
            "an ALLOW with targetRefs is the waypoint's: the node ignores it",
            vec![ap("shop", "waypoint-allow", &format!("{target_refs}{admin_only}"))],
            true,
            true,
        ),
        row(
            "a DENY with targetRef is ignored, never applied to the namespace",
            vec![ap(
                "shop",
                "gw-deny",
                "targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: gw}\naction: DENY\nrules: [{}]",
            )],
            true,
            true,
        ),
        row(
            "a dry-run DENY is not enforced",
            vec![ap_meta(
                "shop",
                "dry-deny",
                "annotations: {istio.io/dry-run: 'true'}",
                "action: DENY\nrules: [{}]",
            )],
            true,
            true,
        ),
        row(
            "a dry-run ALLOW does not make other callers need a match",
            vec![ap_meta(
                "shop",
                "dry-allow",
                "annotations: {istio.io/dry-run: 'true'}",
                admin_only,
            )],
            true,
            true,
        ),
        row(
            "dry-run 'false' is enforced",
            vec![ap_meta(
                "shop",
                "p",
                "annotations: {istio.io/dry-run: 'false'}",
                "action: DENY\nrules: [{}]",
            )],
            false,
            false,
        ),
        row(
            "serviceAccounts ns/sa matches the peer's namespace and service account",
            vec![ap(
                "shop",
                "p",
                "rules:\n- from:\n  - source: {serviceAccounts: [shop/frontend]}",
            )],
            false,
            true,
        ),
        row(
            "serviceAccounts of another account",
            vec![ap(
                "shop",
                "p",
                "rules:\n- from:\n  - source: {serviceAccounts: [other/frontend]}",
            )],
            false,
            false,
        ),
        row(
            "notServiceAccounts: plaintext has no service account",
            vec![ap(
                "shop",
                "p",
                "action: DENY\nrules:\n- from:\n  - source: {notServiceAccounts: [shop/frontend]}",
            )],
            false,
            true,
        ),
        row(
            "when source.serviceAccount",
            vec![ap(
                "shop",
                "p",
                "rules:\n- when:\n  - {key: source.serviceAccount, values: [shop/frontend]}",
            )],
            false,
            true,
        ),
        row(
            "when destination.port notValues compares numerically",
            vec![ap(
                "shop",
                "p",
                "rules:\n- when:\n  - {key: destination.port, notValues: ['08080']}",
            )],
            false,
            false,
        ),
        row(
            "operation ports compare numerically",
            vec![ap("shop", "p", "rules:\n- to:\n  - operation: {ports: ['08080']}")],
            true,
            true,
        ),
    ];
    let failed = run_rows(&rows, &TrustDomains::default(), "cluster.local");
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn cluster_local_and_aliases_mean_the_local_trust_domain() {
    let trust = TrustDomains {
        local: "example.org".into(),
        aliases: vec!["old.example.org".into()],
    };
    let allow = |principal: &str| {
        ap(
            "shop",
            "p",
            &format!("rules:\n- from:\n  - source: {{principals: ['{principal}']}}"),
        )
    };
    // (row, trust domain of the mTLS client)
    let rows: Vec<(Row, &str)> = vec![
        (
            row(
                "cluster.local in a principal is the local trust domain",
                vec![allow("cluster.local/ns/shop/sa/frontend")],
                false,
                true,
            ),
            "example.org",
        ),
        (
            row(
                "an alias in a principal is the local trust domain",
                vec![allow("old.example.org/ns/shop/sa/frontend")],
                false,
                true,
            ),
            "example.org",
        ),
        (
            row(
                "a peer of an alias trust domain is local",
                vec![allow("example.org/ns/shop/sa/frontend")],
                false,
                true,
            ),
            "old.example.org",
        ),
        (
            row(
                "a namespace-free pattern with cluster.local",
                vec![allow("cluster.local/*")],
                false,
                true,
            ),
            "example.org",
        ),
        (
            row(
                "a prefix pattern with cluster.local",
                vec![allow("cluster.local/ns/shop/*")],
                false,
                true,
            ),
            "example.org",
        ),
        (
            row(
                "a foreign trust domain is not local",
                vec![allow("other.org/ns/shop/sa/frontend")],
                false,
                false,
            ),
            "example.org",
        ),
        (
            row(
                "a peer literally in cluster.local is foreign when the local domain is another",
                vec![allow("cluster.local/ns/shop/sa/frontend")],
                false,
                false,
            ),
            "cluster.local",
        ),
        (
            row(
                "a suffix pattern matches any trust domain",
                vec![allow("*/ns/shop/sa/frontend")],
                false,
                true,
            ),
            "other.org",
        ),
        (
            row(
                "when source.principal with cluster.local",
                vec![ap(
                    "shop",
                    "p",
                    "rules:\n- when:\n  - {key: source.principal, values: [cluster.local/ns/shop/sa/frontend]}",
                )],
                false,
                true,
            ),
            "example.org",
        ),
        (
            row(
                "notPrincipals with cluster.local exempts the local peer",
                vec![ap(
                    "shop",
                    "p",
                    "action: DENY\nrules:\n- from:\n  - source: {notPrincipals: [cluster.local/ns/shop/sa/frontend]}",
                )],
                false,
                true,
            ),
            "example.org",
        ),
    ];
    let mut failed = Vec::new();
    for (r, td) in &rows {
        failed.extend(run_rows(std::slice::from_ref(r), &trust, td));
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn dry_run_policies_report_what_they_would_decide() {
    let api = pod("shop", &[("app", "api")]);
    let dry = |name: &str, spec: &str| ap_meta("shop", name, "annotations: {istio.io/dry-run: 'true'}", spec);
    let policies = vec![
        dry("would-deny", "action: DENY\nrules: [{}]"),
        dry(
            "would-not-allow",
            "rules:\n- from:\n  - source: {principals: [cluster.local/ns/shop/sa/admin]}",
        ),
    ];
    let d = authorize(
        &policies,
        ROOT,
        &TrustDomains::default(),
        &api,
        &conn("10.0.1.1", Some(("shop", "frontend")), 8080),
    );
    assert!(d.allowed, "{d:?}");
    let would: Vec<(&str, &str)> = d.dry_run.iter().map(|r| (r.policy.as_str(), r.would())).collect();
    assert_eq!(
        would,
        vec![("shop/would-deny", "deny"), ("shop/would-not-allow", "no_match")]
    );
}

#[test]
fn errors_name_the_field_path() {
    for (spec, field) in [
        (
            "rules:\n- to:\n  - operation: {port: ['9000']}",
            "spec.rules[0].to[0].operation.port: unknown field",
        ),
        (
            "rules:\n- from:\n  - source: {}",
            "spec.rules[0].from[0].source: must not be empty",
        ),
        ("rules:\n- from: {source: {}}", "spec.rules[0].from: must be a list"),
        (
            "rules:\n- when:\n  - {key: source.ip}",
            "spec.rules[0].when[0]: key \"source.ip\" needs values or notValues",
        ),
        (
            "rules:\n- when:\n  - {key: destination.port, values: [http]}",
            "spec.rules[0].when[0].values",
        ),
        ("selector: {app: web}", "spec.selector.app: unknown field"),
        ("selector: {app: web}", "spec.selector.matchLabels: is required"),
    ] {
        let p = ap("shop", "bad", spec);
        let e = p.meta.error.clone().unwrap_or_default();
        assert!(e.contains(field), "{spec}: {e}");
    }
    let p = pa("shop", "bad", "", "mtls: STRICT");
    assert!(
        p.meta
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("spec.mtls: must be a mapping"),
        "{:?}",
        p.meta.error
    );
    assert_eq!(p.mode, Mode::Strict);
    let ok = ap(
        "shop",
        "ok",
        "selector: {matchLabels: {}}\nrules:\n- from:\n  - source: {serviceAccounts: [shop/a]}",
    );
    assert_eq!(ok.meta.error, None);
    assert_eq!(ok.meta.selector, None, "empty matchLabels is namespace-wide");
}
