//! Unit tests of `server.rs`.

use super::*;
use crate::identity::Identity;
use crate::identity::ca_proto::impersonating;
use crate::state::workload::Pod;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

fn service(tag: &str) -> (CaService, super::super::jwt::TokenSigner, PathBuf) {
    service_with(tag, |_| {})
}

fn service_with(tag: &str, edit: impl FnOnce(&mut ServeArgs)) -> (CaService, super::super::jwt::TokenSigner, PathBuf) {
    let d = std::env::temp_dir().join(format!("nodeward-ca-svc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    crate::identity::ca_cli::init(&d).unwrap();
    let signer = super::super::jwt::TokenSigner::generate("k1");
    std::fs::write(d.join("jwks.json"), signer.jwks()).unwrap();
    let args = ServeArgs {
        ca_dir: d.clone(),
        listen: "127.0.0.1:0".parse().unwrap(),
        jwks: Some(d.join("jwks.json")),
        issuer: "https://kubernetes.default.svc".into(),
        audience: "istio-ca".into(),
        node_agent_sa: "nodeward-system/nodeward".into(),
        source: None,
        config_dir: Some(d.clone()),
        kubeconfig: None,
        trust_domain: "cluster.local".into(),
        max_cert_lifetime: Duration::from_secs(3600),
        server_name: vec!["ca.test".into()],
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        issuance_log: d.join("issuance.jsonl"),
        caller_rate: 5.0,
        caller_burst: 200.0,
        node_rate: 10.0,
        node_burst: 400.0,
    };
    let mut args = args;
    edit(&mut args);
    let s = CaService::load(&args).unwrap();
    let mut snap = crate::state::Snapshot::default();
    // web-1 runs on node-1; `p` is each caller's own pod, which its
    // token is bound to.
    for (ns, name, sa, node) in [
        ("shop", "web-1", "web", "node-1"),
        ("shop", "p", "web", "node-9"),
        ("nodeward-system", "p", "nodeward", "node-1"),
    ] {
        let pod = Pod {
            namespace: ns.into(),
            name: name.into(),
            uid: "uid-p".into(),
            node_name: node.into(),
            service_account: sa.into(),
            phase: "Running".into(),
            ..Pod::default()
        };
        snap.pods.insert(format!("{ns}/{name}"), Arc::new(pod));
    }
    s.store.publish(snap);
    (s, signer, d)
}

use std::path::PathBuf;

fn token(signer: &super::super::jwt::TokenSigner, ns: &str, sa: &str, node: &str) -> String {
    let now = crate::identity::trust::unix_now();
    signer.sign(&super::super::jwt::k8s_claims(
        "https://kubernetes.default.svc",
        "istio-ca",
        ns,
        sa,
        ("p", "uid-p"),
        node,
        now,
    ))
}

const PEER: &str = "10.0.0.9:40000";

/// A PEM CSR with no subject or extensions, over a fresh key of `alg`.
fn new_csr(alg: &'static rcgen::SignatureAlgorithm) -> String {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

fn request(csr: String, impersonate: &str, validity: i64) -> Bytes {
    frame(&IstioCertificateRequest {
        csr,
        validity_duration: validity,
        metadata: Some(impersonating(impersonate)),
    })
}

#[test]
fn a_csr_with_extra_sans_and_extensions_yields_only_the_spiffe_uri() {
    let (s, signer, d) = service("sans");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    p.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin".try_into().unwrap(),
    ));
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let csr = p.serialize_request(&key).unwrap().pem().unwrap();
    let t = token(&signer, "nodeward-system", "nodeward", "node-1");
    let resp = s
        .create(
            Some(&t),
            request(csr, "spiffe://cluster.local/ns/shop/sa/web", 999_999),
            PEER.parse().unwrap(),
        )
        .unwrap();
    let der = pem::parse(&resp.cert_chain[0]).unwrap();
    let (_, leaf) = X509Certificate::from_der(der.contents()).unwrap();
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(sans, vec!["spiffe://cluster.local/ns/shop/sa/web"]);
    assert!(!leaf.is_ca(), "the CSR's CA request was copied");
    assert_eq!(*leaf.public_key().subject_public_key.data, *key.public_key_raw());
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(
        lifetime <= 3600 + 60,
        "lifetime {lifetime}s is over --max-cert-lifetime"
    );
    assert_eq!(resp.cert_chain.len(), 3, "leaf, intermediate, root");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn refusals_name_their_reason() {
    let (s, signer, d) = service("refuse");
    let csr = new_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let node2 = token(&signer, "nodeward-system", "nodeward", "node-2");
    let e = s
        .create(Some(&node2), request(csr.clone(), web, 0), PEER.parse().unwrap())
        .unwrap_err();
    assert_eq!((e.0, e.1), (Code::PermissionDenied, "not_on_node"), "{}", e.2);
    let e = s
        .create(None, request(csr.clone(), web, 0), PEER.parse().unwrap())
        .unwrap_err();
    assert_eq!((e.0, e.1), (Code::Unauthenticated, "no_token"));
    let e = s
        .create(Some("a.b.c"), request(csr.clone(), web, 0), PEER.parse().unwrap())
        .unwrap_err();
    assert_eq!(e.0, Code::Unauthenticated);
    let node1 = token(&signer, "nodeward-system", "nodeward", "node-1");
    let e = s
        .create(Some(&node1), request("garbage".into(), web, 0), PEER.parse().unwrap())
        .unwrap_err();
    assert_eq!((e.0, e.1), (Code::InvalidArgument, "bad_csr"));
    let p384 = new_csr(&rcgen::PKCS_ECDSA_P384_SHA384);
    let e = s
        .create(Some(&node1), request(p384, web, 0), PEER.parse().unwrap())
        .unwrap_err();
    assert_eq!((e.0, e.1), (Code::InvalidArgument, "bad_csr"), "{}", e.2);
    let own = token(&signer, "shop", "web", "node-9");
    let ok = s.create(Some(&own), request(csr, web, 0), PEER.parse().unwrap());
    assert!(ok.is_ok(), "a workload gets its own identity");
    let stats = s.stats();
    assert!(stats.contains("reason=\"not_on_node\"} 1"), "{stats}");
    assert_eq!(Identity::parse(web).unwrap().namespace, "shop");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn every_answer_is_logged_and_a_rate_limited_node_is_refused_while_another_is_served() {
    let (s, signer, d) = service_with("limits", |a| {
        a.node_burst = 2.0;
        a.node_rate = 0.001;
    });
    let csr = new_csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let peer: SocketAddr = PEER.parse().unwrap();
    let node1 = token(&signer, "nodeward-system", "nodeward", "node-1");
    for _ in 0..2 {
        s.create(Some(&node1), request(csr.clone(), web, 0), peer).unwrap();
    }
    let e = s.create(Some(&node1), request(csr.clone(), web, 0), peer).unwrap_err();
    assert_eq!((e.0, e.1), (Code::ResourceExhausted, "rate_limited_node"), "{}", e.2);
    // A caller on another node is served.
    let own = token(&signer, "shop", "web", "node-9");
    s.create(Some(&own), request(csr.clone(), web, 0), peer).unwrap();
    assert!(s.stats().contains("reason=\"rate_limited_node\"} 1"), "{}", s.stats());
    // Every answer is a line of the chain, issued ones with their serial.
    let v = super::super::ledger::verify(std::fs::File::open(d.join("issuance.jsonl")).unwrap()).unwrap();
    let got: Vec<(Decision, &str, bool)> = v
        .entries
        .iter()
        .map(|e| (e.decision, e.reason.as_str(), e.serial.is_some()))
        .collect();
    assert_eq!(
        got,
        vec![
            (Decision::Issued, "ok", true),
            (Decision::Issued, "ok", true),
            (Decision::Refused, "rate_limited_node", false),
            (Decision::Issued, "ok", true),
        ]
    );
    assert_eq!(v.entries[0].caller.node.as_deref(), Some("node-1"));
    assert_eq!(v.entries[0].caller.pod.as_deref(), Some("nodeward-system/p"));
    assert_eq!(v.entries[0].requested, web);
    assert_eq!(v.entries[3].caller.service_account, "shop/web");
    let _ = std::fs::remove_dir_all(&d);
}
