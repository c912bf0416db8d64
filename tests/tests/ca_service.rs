//! Certificates from a CA service on real namespaces: agents that hold no
//! signing key get their certificates over Istio's CA protocol (real gRPC,
//! TLS and tokens signed by a test issuer) and tunnel to each other; the
//! service refuses another node's pods and bad tokens; with the service
//! down tunnels keep working, a new pod is refused rather than sent in
//! plaintext, and renewal resumes when the service returns.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nodeward::ca_service::jwt::{TokenSigner, k8s_claims};
use nodeward::identity::Identity;
use nodeward::identity::ca_client::{CaClient, CaClientConfig};
use nodeward::identity::issuer::{IssueError, Issuer};
use nodeward_testbed::ca::{CaService, ISSUER, NODE_AGENT, now};
use nodeward_testbed::netns::run_in;
use nodeward_testbed::traffic::{info_echo, round_trip, serve};
use nodeward_testbed::{PodSpec, Topology, TopologySpec, privileged_or_skip, shared};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "mesh", sa)
}

/// A topology whose agents use a CA service in node 1's namespace.
fn cluster(test: &str, extra: &[&str]) -> Option<(Topology, CaService)> {
    if !privileged_or_skip(test) {
        return None;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    let mut ca = CaService::new(&t);
    ca.start(&t);
    for k in 0..t.nodes.len() {
        let mut flags = ca.agent_flags(&t.nodes[k].name);
        flags.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        t.start_agent(k, &refs);
    }
    for k in 0..t.nodes.len() {
        t.wait_captured(k);
    }
    Some((t, ca))
}

fn issued(l: &Value, who: &Identity) -> bool {
    l["message"] == "workload certificate issued" && l["identity"] == who.to_string().as_str()
}

fn count_issued(t: &Topology, k: usize, who: &Identity) -> usize {
    t.agent(k).lines().iter().filter(|l| issued(l, who)).count()
}

/// Waits until node `k`'s agent holds a certificate for `who`.
fn wait_issued(t: &Topology, k: usize, who: &Identity, timeout: Duration) {
    t.agent(k)
        .wait_log(timeout, |l| issued(l, who))
        .unwrap_or_else(|| panic!("node {k} got no certificate for {who}; log:\n{}", t.agent(k).dump()));
}

#[test]
fn two_agents_without_the_signing_key_get_certificates_from_one_ca_service_and_tunnel() {
    let _g = shared();
    let test = "two_agents_without_the_signing_key_get_certificates_from_one_ca_service_and_tunnel";
    let Some((t, ca)) = cluster(test, &[]) else { return };
    wait_issued(&t, 0, &id("a"), WAIT);
    wait_issued(&t, 1, &id("c"), WAIT);
    // The agents were given the root and a token, nothing else.
    assert!(!ca.dir.join("ca-key.pem").exists());
    for k in 0..2 {
        let loaded = t
            .agent(k)
            .wait_log(WAIT, |l| l["message"] == "certificate authority loaded")
            .unwrap();
        assert_eq!(loaded["issuer"], format!("CA service {}", ca.address).as_str());
    }
    let (a, c) = (t.pod("a"), t.pod("c"));
    let _s = serve(&c.netns, c.v4(8080), info_echo);
    round_trip(&a.netns, c.v4(8080), b"hello\n").expect("a reaches c through the tunnel");
    let l = t
        .agent(0)
        .wait_connection("outbound", &c.v4(8080).to_string(), WAIT)
        .unwrap();
    assert_eq!(l["transport"], "hbone", "{l}");
    assert_eq!(l["reason"], "done", "{l}");
    // The service issued them on the node agent's token, for pods of its node.
    ca.server
        .as_ref()
        .unwrap()
        .wait_log(WAIT, |l| {
            l["raw"]
                .as_str()
                .is_some_and(|r| r.contains("certificate issued") && r.contains("spiffe://cluster.local/ns/mesh/sa/c"))
        })
        .unwrap_or_else(|| panic!("the service logged no issuance for c:\n{}", ca.dump()));
}

/// Asks the service, from node 1's namespace, for `who` with `token`.
fn ask(t: &Topology, ca: &CaService, token: &str, who: Identity) -> Result<(), IssueError> {
    let file = ca.dir.join(format!("ask-{}.token", rand_suffix()));
    std::fs::write(&file, token).unwrap();
    let config = CaClientConfig {
        address: ca.address.clone(),
        root_file: ca.root_file(),
        token_file: file,
        cluster_id: "Kubernetes".into(),
        trust_domain: "cluster.local".into(),
        socket_mark: 0x4e57,
    };
    run_in(&t.nodes[0].netns, move || {
        // Multi-threaded: `Handle::block_on` cannot drive a current-thread runtime's IO.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let client = CaClient::new(config, rt.handle().clone()).unwrap();
        client.issue(&who, Duration::from_secs(3600)).map(|_| ())
    })
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn refused(r: Result<(), IssueError>, code: u32, says: &str) {
    match r {
        Err(IssueError::Refused { code: c, message }) if c == code && message.contains(says) => {}
        other => panic!("expected grpc-status {code} saying {says:?}, got {other:?}"),
    }
}

#[test]
fn the_ca_service_refuses_another_nodes_pods_and_bad_tokens() {
    let _g = shared();
    let test = "the_ca_service_refuses_another_nodes_pods_and_bad_tokens";
    if !privileged_or_skip(test) {
        return;
    }
    let t = Topology::build(TopologySpec::two_nodes());
    let mut ca = CaService::new(&t);
    ca.start(&t);
    let node1 = t.nodes[0].name.clone();
    let agent_token = |aud: &str, exp_offset: i64, signer: &TokenSigner| {
        let mut c = k8s_claims(
            ISSUER,
            aud,
            NODE_AGENT.0,
            NODE_AGENT.1,
            "nodeward-x",
            &node1,
            now() - 10,
        );
        c["exp"] = (now() + exp_offset).into();
        signer.sign(&c)
    };
    // The control: node 1's agent obtains its own pod's identity.
    let good = agent_token("istio-ca", 3600, &ca.signer);
    ask(&t, &ca, &good, id("a")).expect("the node agent obtains a pod of its node");

    // Node 1's agent asking for pod c of node 2.
    refused(ask(&t, &ca, &good, id("c")), 7, "is scheduled on node");
    refused(
        ask(&t, &ca, &agent_token("other", 3600, &ca.signer), id("a")),
        16,
        "audience",
    );
    refused(
        ask(&t, &ca, &agent_token("istio-ca", -600, &ca.signer), id("a")),
        16,
        "expired",
    );
    let stranger = TokenSigner::generate("test-issuer-1");
    refused(
        ask(&t, &ca, &agent_token("istio-ca", 3600, &stranger), id("a")),
        16,
        "signature",
    );
    let body = URL_SAFE_NO_PAD
        .encode(k8s_claims(ISSUER, "istio-ca", NODE_AGENT.0, NODE_AGENT.1, "x", &node1, now()).to_string());
    let none = format!("{}.{body}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#));
    refused(ask(&t, &ca, &none, id("a")), 16, "algorithm");
    // A workload's own token gets its own identity only.
    let own = ca
        .signer
        .sign(&k8s_claims(ISSUER, "istio-ca", "mesh", "b", "b", &node1, now()));
    ask(&t, &ca, &own, id("b")).expect("own identity");
    refused(ask(&t, &ca, &own, id("a")), 7, "may not obtain");

    // Each refusal is logged with its reason (lines are flushed in batches).
    let server = ca.server.as_ref().unwrap();
    for reason in [
        "not_on_node",
        "wrong_audience",
        "expired",
        "bad_signature",
        "algorithm",
        "not_own_identity",
    ] {
        let said = format!("reason=\"{reason}\"");
        server
            .wait_log(WAIT, |l| l["raw"].as_str().is_some_and(|r| r.contains(&said)))
            .unwrap_or_else(|| panic!("{reason} not logged:\n{}", ca.dump()));
    }
    ca.kill();
}

#[test]
fn with_the_ca_service_down_tunnels_keep_working_a_new_pod_is_refused_and_renewal_resumes() {
    let _g = shared();
    let test = "with_the_ca_service_down_tunnels_keep_working_a_new_pod_is_refused_and_renewal_resumes";
    let Some((mut t, mut ca)) = cluster(test, &["--cert-lifetime", "20s"]) else {
        return;
    };
    wait_issued(&t, 0, &id("a"), WAIT);
    wait_issued(&t, 1, &id("c"), WAIT);
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let _s = [
        serve(&c.netns, c.v4(8080), info_echo),
        serve(&a.netns, a.v4(8081), info_echo),
    ];
    round_trip(&a.netns, c.v4(8080), b"before\n").expect("a reaches c");

    ca.kill();
    round_trip(&a.netns, c.v4(8080), b"during\n").expect("tunnels keep working on current certificates");

    // A new pod on node 2 gets no identity: its mesh traffic is refused.
    let e = t.add_pod(1, PodSpec::new("e", "mesh"));
    t.write_config();
    t.agent(1)
        .wait_log(WAIT, |l| l["message"] == "pod captured" && l["pod"] == "mesh/e")
        .unwrap_or_else(|| panic!("e not captured:\n{}", t.agent(1).dump()));
    assert!(
        round_trip(&e.netns, a.v4(8081), b"plaintext?\n").is_err(),
        "e reached a without an identity"
    );
    let l = t
        .agent(1)
        .wait_connection("outbound", &a.v4(8081).to_string(), WAIT)
        .unwrap();
    assert_eq!(l["reason"], "no_identity", "{l}");
    assert!(
        t.agent(0)
            .connections()
            .iter()
            .all(|l| l["dst"] != a.v4(8081).to_string().as_str()),
        "something reached a's port 8081"
    );

    // Renewal (at about half of 20 s) fails, is retried, and said so.
    let failed = t
        .agent(0)
        .wait_log(Duration::from_secs(20), |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("certificate request failed"))
                && l["has_certificate"] == true
        })
        .unwrap_or_else(|| panic!("no failed renewal logged:\n{}", t.agent(0).dump()));
    assert_eq!(failed["kind"], "unavailable");

    let before = count_issued(&t, 0, &id("a"));
    ca.start(&t);
    wait_issued(&t, 1, &id("e"), Duration::from_secs(40));
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while count_issued(&t, 0, &id("a")) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "a's certificate was not renewed after the service returned:\n{}",
            t.agent(0).dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    round_trip(&e.netns, a.v4(8081), b"now\n").expect("e reaches a once it has an identity");
}
