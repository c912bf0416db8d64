//! One row per finding kind: a clean config plus one object (or edit) must
//! produce exactly that finding, and the clean config none.

use std::path::PathBuf;

use super::*;

/// A config without problems: an enrolled production namespace with a
/// mesh-wide STRICT, pods the policies select, and narrow rules.
const CLEAN: &str = "apiVersion: v1
kind: Namespace
metadata: {name: shop-prod, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop-prod, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web}
status: {phase: Running, podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop-prod, labels: {app: api}}
spec: {nodeName: n1, serviceAccountName: api}
status: {phase: Running, podIP: 10.0.0.3}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-from-web, namespace: shop-prod}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop-prod/sa/web]}}]
    to: [{operation: {ports: ['8080']}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-legacy, namespace: shop-prod}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [legacy]}}]
";

/// A fresh directory holding `CLEAN` (unless `clean` is false) and `extra`.
fn dir_with(clean: bool, extra: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("nodeward-audit-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if clean {
        std::fs::write(dir.join("clean.yaml"), CLEAN).unwrap();
    }
    if !extra.is_empty() {
        std::fs::write(dir.join("extra.yaml"), extra).unwrap();
    }
    dir
}

fn audit(clean: bool, extra: &str) -> Vec<Finding> {
    let dir = dir_with(clean, extra);
    let out = audit_dir(&dir, "istio-system", &Production::defaults()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn pa(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

fn ap(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop-prod}}\nspec:\n{spec}"
    )
}

fn pod(name: &str, ns: &str, labels: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}, annotations: {{{annotations}}}}}\nspec: {{nodeName: n1}}\nstatus: {{phase: Running, podIP: 10.0.0.9}}\n"
    )
}

/// An enrolled pod of shop-prod (STRICT mesh-wide) whose containers
/// declare TCP 8080, UDP 53 and SCTP 3868, with `annotations`.
fn datagram_pod(annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: dns, namespace: shop-prod, annotations: {{{annotations}}}}}\nspec:\n  nodeName: n1\n  containers:\n  - name: dns\n    image: dns:1\n    ports:\n    - {{containerPort: 8080}}\n    - {{containerPort: 53, protocol: UDP}}\n    - {{containerPort: 3868, protocol: SCTP}}\nstatus: {{phase: Running, podIP: 10.0.0.8}}\n"
    )
}

#[test]
fn udp_under_strict_is_reported_unless_dropped_and_sctp_always() {
    let whys = |annotations: &str, extra: &str| -> Vec<String> {
        audit(true, &format!("{}{extra}", datagram_pod(annotations)))
            .into_iter()
            .filter(|f| f.kind == Kind::UdpNotCovered)
            .map(|f| f.why)
            .collect()
    };
    // Dropped: only SCTP, which sk_lookup never sees, is left.
    let dropped = whys("nodeward.io/inbound-udp: drop", "");
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert!(
        dropped[0].contains("SCTP ports 3868") && !dropped[0].contains("UDP ports"),
        "{dropped:?}"
    );
    // An excluded port stays open under the drop.
    let excluded = whys(
        "nodeward.io/inbound-udp: drop, traffic.sidecar.istio.io/excludeInboundPorts: '53', nodeward.io/exception-reason: dns",
        "",
    );
    assert!(excluded.iter().any(|w| w.contains("UDP ports 53")), "{excluded:?}");
    // Where the pod's mode is not STRICT, plaintext is accepted on TCP too:
    // nothing STRICT-specific to report.
    let permissive = pa(
        "shop-prod",
        "dns-permissive",
        "  selector: {matchLabels: {}}\n  mtls: {mode: PERMISSIVE}\n",
    );
    let relaxed = whys("", &format!("---\n{permissive}"));
    assert_eq!(relaxed, Vec::<String>::new());
}

#[test]
fn a_clean_config_has_no_findings() {
    assert_eq!(audit(true, ""), vec![]);
}

#[test]
fn each_problem_is_found_with_its_kind_severity_and_object() {
    let allow = |rules: &str| {
        ap(
            "p",
            &format!("  selector: {{matchLabels: {{app: web}}}}\n  action: ALLOW\n  rules:\n{rules}"),
        )
    };
    let rows: Vec<(&str, String, Kind, Severity, &str, &str)> = vec![
        (
            "DISABLE on one port",
            pa(
                "shop-prod",
                "legacy",
                "  selector: {matchLabels: {app: web}}\n  portLevelMtls: {9000: {mode: DISABLE}}\n",
            ),
            Kind::MtlsDisable,
            Severity::High,
            "PeerAuthentication shop-prod/legacy",
            "DISABLE on port 9000",
        ),
        (
            "PERMISSIVE in a namespace named like production",
            pa(
                "shop-prod",
                "relaxed",
                "  selector: {matchLabels: {app: web}}\n  mtls: {mode: PERMISSIVE}\n",
            ),
            Kind::PermissiveInProduction,
            Severity::Medium,
            "PeerAuthentication shop-prod/relaxed",
            "production",
        ),
        (
            "PERMISSIVE in a namespace labelled env=production",
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: billing, labels: {{env: production}}}}\n---\n{}",
                pa("billing", "relaxed", "  mtls: {mode: PERMISSIVE}\n")
            ),
            Kind::PermissiveInProduction,
            Severity::Medium,
            "PeerAuthentication billing/relaxed",
            "production",
        ),
        (
            "an enrolled namespace with no STRICT",
            format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: dev, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\n{}",
                pa("dev", "relaxed", "  mtls: {mode: PERMISSIVE}\n")
            ),
            Kind::NoStrict,
            Severity::Medium,
            "Namespace dev",
            "no STRICT",
        ),
        (
            "an ALLOW rule without a source",
            allow("  - to: [{operation: {ports: ['8080']}}]\n"),
            Kind::AllowAnySource,
            Severity::Medium,
            "AuthorizationPolicy shop-prod/p",
            "rule 0 has no source constraint",
        ),
        (
            "an ALLOW rule with * principals",
            allow("  - from: [{source: {principals: ['*']}}]\n"),
            Kind::AllowAnySource,
            Severity::Medium,
            "AuthorizationPolicy shop-prod/p",
            "principals [\"*\"]",
        ),
        (
            "a DENY that selects no workload",
            ap(
                "ghost",
                "  selector: {matchLabels: {app: gone}}\n  action: DENY\n  rules:\n  - from: [{source: {namespaces: [x]}}]\n",
            ),
            Kind::SelectsNothing,
            Severity::Low,
            "AuthorizationPolicy shop-prod/ghost",
            "selects no workload",
        ),
        (
            "an ALLOW rule inside a broader one of the same policy",
            allow(
                "  - from: [{source: {namespaces: [shop-*]}}]\n  - from: [{source: {namespaces: [shop-prod]}}]\n    to: [{operation: {ports: ['8080']}}]\n",
            ),
            Kind::ShadowedRule,
            Severity::Low,
            "AuthorizationPolicy shop-prod/p",
            "rule 1 is shadowed by its rule 0",
        ),
        (
            "a DENY covered by a broader DENY of another policy",
            ap(
                "narrow-deny",
                "  action: DENY\n  rules:\n  - from: [{source: {namespaces: [legacy]}}]\n    to: [{operation: {ports: ['8080', '9090']}}]\n",
            ),
            Kind::ShadowedRule,
            Severity::Low,
            "AuthorizationPolicy shop-prod/narrow-deny",
            "rule 0 of shop-prod/no-legacy",
        ),
        (
            "a policy with L7 fields",
            ap(
                "l7",
                "  selector: {matchLabels: {app: api}}\n  action: DENY\n  rules:\n  - from: [{source: {namespaces: [legacy2]}}]\n    to: [{operation: {methods: [POST]}}]\n",
            ),
            Kind::L7Fields,
            Severity::Medium,
            "AuthorizationPolicy shop-prod/l7",
            "methods needs an L7 proxy",
        ),
        (
            "an invalid AuthorizationPolicy",
            ap(
                "typo",
                "  selector: {matchLabels: {app: api}}\n  action: DENY\n  rules:\n  - to: [{operation: {port: ['80']}}]\n",
            ),
            Kind::InvalidPolicy,
            Severity::High,
            "AuthorizationPolicy shop-prod/typo",
            "denies everything it selects",
        ),
        (
            "an invalid PeerAuthentication",
            pa("shop-prod", "scalar", "  mtls: STRICT\n"),
            Kind::InvalidPolicy,
            Severity::High,
            "PeerAuthentication shop-prod/scalar",
            "counts as STRICT",
        ),
        (
            "a file the agent rejects",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec: {clusterIP: nope}\n".into(),
            Kind::RejectedFile,
            Severity::High,
            "extra.yaml",
            "spec.clusterIPs",
        ),
        (
            "an opted-out pod without a reason",
            pod("batch", "shop-prod", "istio.io/dataplane-mode: none", ""),
            Kind::UndocumentedException,
            Severity::Medium,
            "Pod shop-prod/batch",
            "opted out",
        ),
        (
            "excluded ports without a reason",
            pod(
                "db",
                "shop-prod",
                "",
                "traffic.sidecar.istio.io/excludeInboundPorts: '5432'",
            ),
            Kind::UndocumentedException,
            Severity::Medium,
            "Pod shop-prod/db",
            "inbound ports 5432 not captured",
        ),
        (
            "excluded ports with a reason",
            pod(
                "db",
                "shop-prod",
                "",
                "traffic.sidecar.istio.io/excludeOutboundPorts: '53', nodeward.io/exception-reason: 'DNS over TCP to kube-dns'",
            ),
            Kind::DocumentedException,
            Severity::Info,
            "Pod shop-prod/db",
            "reason: DNS over TCP to kube-dns",
        ),
        (
            "a STRICT pod declaring UDP and SCTP container ports",
            datagram_pod(""),
            Kind::UdpNotCovered,
            Severity::Medium,
            "Pod shop-prod/dns",
            "UDP ports 53 and SCTP ports 3868 declared by its containers take plaintext from anyone",
        ),
    ];
    for (what, yaml, kind, severity, object, why) in rows {
        let found = audit(true, &yaml);
        assert_eq!(found.len(), 1, "{what}: expected one finding, got {found:#?}");
        let f = &found[0];
        assert_eq!(f.kind, kind, "{what}: {f:?}");
        assert_eq!(f.severity, severity, "{what}: {f:?}");
        assert!(
            f.object.ends_with(object),
            "{what}: object {:?}, want {object:?}",
            f.object
        );
        assert!(f.why.contains(why), "{what}: why {:?} lacks {why:?}", f.why);
    }
}

#[test]
fn rules_that_are_not_covered_are_not_reported_as_shadowed() {
    // Different ports, a narrower pattern, a negative the broad rule lacks,
    // an extra `when` on the broad rule: none covers the other.
    for rules in [
        "  - from: [{source: {namespaces: [legacy]}}]\n    to: [{operation: {ports: ['8080']}}]\n  - from: [{source: {namespaces: [legacy]}}]\n    to: [{operation: {ports: ['9090']}}]\n",
        "  - from: [{source: {namespaces: [shop-prod]}}]\n  - from: [{source: {namespaces: [shop-*]}}]\n    to: [{operation: {notPorts: ['22']}}]\n",
        "  - from: [{source: {namespaces: ['*'], notNamespaces: [kube-system]}}]\n  - from: [{source: {namespaces: [kube-system]}}]\n",
        "  - from: [{source: {ipBlocks: [10.0.0.0/8]}}]\n    when: [{key: destination.port, values: ['80']}]\n  - from: [{source: {ipBlocks: [10.1.0.0/16]}}]\n",
    ] {
        let found = audit(
            true,
            &ap(
                "p",
                &format!("  selector: {{matchLabels: {{app: web}}}}\n  action: DENY\n  rules:\n{rules}"),
            ),
        );
        assert_eq!(found, vec![], "{rules}");
    }
}

#[test]
fn fail_on_compares_at_or_above() {
    let f = |s| Finding::new(s, Kind::ShadowedRule, "x".into(), "y".into());
    let medium = [f(Severity::Info), f(Severity::Medium)];
    assert!(!fails(&medium, Severity::High));
    assert!(fails(&medium, Severity::Medium));
    assert!(fails(&medium, Severity::Low));
    assert!(!fails(&[f(Severity::Info)], Severity::Low), "info never fails");
}

#[test]
fn an_unreadable_directory_is_an_error_naming_it() {
    let e = audit_dir(
        std::path::Path::new("/nonexistent/nodeward"),
        "istio-system",
        &Production::defaults(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/nodeward"), "{e}");
}

#[test]
fn production_labels_must_be_key_value() {
    assert!(Production::new(&[], &["env".into()]).is_err());
    let p = Production::new(&["prod*".into()], &["tier=gold".into()]).unwrap();
    assert!(p.matches("prod-eu", None));
    let ns = Namespace {
        name: "x".into(),
        labels: [("tier".to_string(), "gold".to_string())].into(),
        ..Default::default()
    };
    assert!(p.matches("x", Some(&ns)));
    assert!(!p.matches("x", None));
}
