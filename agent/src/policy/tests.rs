//! Table-driven policy tests. Where a case comes from an example in Istio's
//! security documentation, the test says which.

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

fn yaml(s: &str) -> serde_yaml::Value {
    serde_yaml::from_str(s).unwrap()
}

fn pa(ns: &str, name: &str, created: &str, spec: &str) -> Arc<PeerAuthentication> {
    let meta = yaml(&format!(
        "{{name: {name}, namespace: {ns}, creationTimestamp: '{created}'}}"
    ));
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
