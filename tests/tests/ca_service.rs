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
use nodeward_testbed::ca::{CaService, ISSUER, NODE_AGENT, agent_pod, agent_pod_uid, now};
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
        let (pod, uid) = (agent_pod(&node1), agent_pod_uid(&node1));
        let mut c = k8s_claims(
            ISSUER,
            aud,
            NODE_AGENT.0,
            NODE_AGENT.1,
            (&pod, &uid),
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
    let body = URL_SAFE_NO_PAD.encode(
        k8s_claims(
            ISSUER,
            "istio-ca",
            NODE_AGENT.0,
            NODE_AGENT.1,
            ("x", "x"),
            &node1,
            now(),
        )
        .to_string(),
    );
    let none = format!("{}.{body}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#));
    refused(ask(&t, &ca, &none, id("a")), 16, "algorithm");
    // A workload's own token gets its own identity only.
    let own = ca.pod_token(&t, "b");
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
    // A new pod's connections wait for its certificate up to the connect
    // timeout, then are refused: short here, so the refusal comes soon.
    let Some((mut t, mut ca)) = cluster(test, &["--cert-lifetime", "20s", "--connect-timeout", "2s"]) else {
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

#[test]
fn a_new_pods_first_connections_wait_for_its_first_certificate_instead_of_being_refused() {
    let _g = shared();
    let test = "a_new_pods_first_connections_wait_for_its_first_certificate_instead_of_being_refused";
    let Some((mut t, mut ca)) = cluster(test, &[]) else {
        return;
    };
    wait_issued(&t, 0, &id("a"), WAIT);
    let a = t.pod("a").clone();
    let _sa = serve(&a.netns, a.v4(8081), info_echo);
    // The CA service is down when the pod arrives: it is captured at once,
    // with no certificate yet.
    ca.kill();
    let e = t.add_pod(1, PodSpec::new("e", "mesh"));
    let _se = serve(&e.netns, e.v4(8082), info_echo);
    t.write_config();
    t.agent(1)
        .wait_log(WAIT, |l| l["message"] == "pod captured" && l["pod"] == "mesh/e")
        .unwrap_or_else(|| panic!("e not captured:\n{}", t.agent(1).dump()));
    assert_eq!(
        count_issued(&t, 1, &id("e")),
        0,
        "e has a certificate with the CA service down"
    );
    // Its first connections, out and in, are made now, and the service
    // comes back while they wait.
    let to_e = e.v4(8082);
    let (en, av) = (e.netns.clone(), a.v4(8081));
    let outbound = std::thread::spawn(move || round_trip(&en, av, b"out\n").map(|_| ()));
    let an = a.netns.clone();
    let inbound = std::thread::spawn(move || round_trip(&an, to_e, b"in\n").map(|_| ()));
    std::thread::sleep(Duration::from_millis(500));
    ca.start(&t);
    let outbound = outbound.join().unwrap();
    let inbound = inbound.join().unwrap();
    assert!(
        outbound.is_ok() && inbound.is_ok(),
        "e's first connections were not carried once its certificate came: out {outbound:?}, in {inbound:?}\n{}\n{}",
        t.agent(0).dump(),
        t.agent(1).dump()
    );
    assert_eq!(count_issued(&t, 1, &id("e")), 1);
}

/// Runs `nodeward` with `args`; (success, stdout, stderr).
fn nodeward(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(nodeward_testbed::nodeward_bin())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_deleted_pods_token_mints_nothing_and_a_rate_limited_node_is_refused_while_another_is_served() {
    let _g = shared();
    let test = "a_deleted_pods_token_mints_nothing_and_a_rate_limited_node_is_refused_while_another_is_served";
    if !privileged_or_skip(test) {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    let mut ca = CaService::new(&t);
    // The node agent's budget per node: two certificates at once, then one
    // per 100 s.
    ca.extra = ["--node-burst", "2", "--node-rate", "0.01"].map(String::from).to_vec();
    ca.start(&t);
    // b's own token works while b lives ...
    let own = ca.pod_token(&t, "b");
    ask(&t, &ca, &own, id("b")).expect("b's own identity");
    // ... and mints nothing once b is deleted, though it has not expired.
    let applied = |ca: &CaService| {
        ca.server
            .as_ref()
            .unwrap()
            .lines()
            .iter()
            .filter(|l| l["raw"].as_str().is_some_and(|r| r.contains("config applied")))
            .count()
    };
    let before = applied(&ca);
    t.edit_pod("b", |_| false);
    let deadline = std::time::Instant::now() + nodeward_testbed::patience(WAIT);
    while applied(&ca) == before {
        assert!(
            std::time::Instant::now() < deadline,
            "the CA never read b's deletion:\n{}",
            ca.dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    refused(ask(&t, &ca, &own, id("b")), 7, "gone");
    // Node 1's agent: b's own requests spent b's budget, not its node's;
    // the agent has its two, then RESOURCE_EXHAUSTED (8) ...
    let node1 = std::fs::read_to_string(ca.token_file(&t.nodes[0].name)).unwrap();
    for _ in 0..2 {
        ask(&t, &ca, &node1, id("a")).expect("within node 1's burst, whatever its pods asked for themselves");
    }
    refused(ask(&t, &ca, &node1, id("a")), 8, "rate limit");
    refused(ask(&t, &ca, &node1, id("a")), 8, "rate limit");
    // ... while node 2's agent is served.
    let node2 = std::fs::read_to_string(ca.token_file(&t.nodes[1].name)).unwrap();
    ask(&t, &ca, &node2, id("c")).expect("node 2 is served while node 1 is limited");
    let metrics = nodeward_testbed::admin::http(&t.nodes[0].netns, "127.0.0.1:15022", "GET", "/metrics")
        .unwrap()
        .1;
    assert!(
        metrics.contains("nodeward_ca_requests_total{result=\"refused\",reason=\"rate_limited_node\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nodeward_ca_intermediate_expiry_timestamp_seconds"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nodeward_ca_request_duration_seconds_count"),
        "{metrics}"
    );
    ca.kill();

    // Every answer is a line of the issuance log, whose chain verifies ...
    let log = ca.issuance_log();
    let log_s = log.display().to_string();
    let (ok, report, err) = nodeward(&["ca", "log", "verify", &log_s]);
    assert!(ok, "ca log verify failed on the service's own log: {err}");
    assert!(report.contains("chain holds"), "{report}");
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let decisions: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["decision"].as_str().unwrap().to_string(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(decisions.len() >= 5, "{decisions:?}");
    assert_eq!(decisions[0], ("issued".into(), "ok".into()));
    assert!(
        decisions.contains(&("refused".into(), "pod_gone".into())),
        "{decisions:?}"
    );
    // A rate-limit episode is one line, however many refusals it had.
    let limited = decisions.iter().filter(|d| d.1 == "rate_limited_node").count();
    assert_eq!(limited, 1, "{decisions:?}");
    // ... and breaks at the line that shows one edited, removed or moved.
    let tampered = ca.dir.join("tampered.jsonl");
    let tampered_s = tampered.display().to_string();
    let write =
        |ls: &[String]| std::fs::write(&tampered, ls.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let mut edited = lines.clone();
    edited[0] = edited[0].replace("\"issued\"", "\"refused\"");
    let mut removed = lines.clone();
    removed.remove(1);
    let mut moved = lines.clone();
    moved.swap(1, 2);
    for (what, ls) in [("edited", edited), ("removed", removed), ("moved", moved)] {
        write(&ls);
        let (ok, _, err) = nodeward(&["ca", "log", "verify", &tampered_s]);
        assert!(!ok, "a log with a line {what} verified");
        assert!(err.contains("chain broken at line 2"), "{what}: {err}");
    }
}

#[test]
fn audit_names_a_certificate_in_use_that_the_issuance_log_does_not_hold() {
    let _g = shared();
    let test = "audit_names_a_certificate_in_use_that_the_issuance_log_does_not_hold";
    let Some((t, ca)) = cluster(test, &[]) else { return };
    wait_issued(&t, 0, &id("a"), WAIT);
    wait_issued(&t, 1, &id("c"), WAIT);
    // What each agent holds, as an operator saves it on each node.
    let mut certs = Vec::new();
    for (k, node) in t.nodes.iter().enumerate() {
        let (code, body) = nodeward_testbed::admin::http(&node.netns, "127.0.0.1:15000", "GET", "/certs").unwrap();
        assert_eq!(code, 200, "{body}");
        let file = ca.dir.join(format!("certs-{k}.json"));
        std::fs::write(&file, &body).unwrap();
        certs.push((file, body));
    }
    let log = ca.issuance_log().display().to_string();
    let files = certs
        .iter()
        .map(|(f, _)| f.display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let (ok, out, err) = nodeward(&["audit", "--issuance-log", &log, "--certs", &files]);
    assert!(
        ok && !out.contains("unlogged_certificate"),
        "every certificate came from the service:\n{out}{err}"
    );
    // Someone with the intermediate's key signs a certificate outside the
    // service, and an agent presents it.
    let rogue = nodeward::identity::authority::Authority::load(&t.ca_dir)
        .unwrap()
        .issue(&id("a"), Duration::from_secs(3600))
        .unwrap();
    let serial = nodeward::identity::ca::hex(&rogue.serial);
    let mut doc: Value = serde_json::from_str(&certs[0].1).unwrap();
    doc["certificates"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"identity": id("a").to_string(), "serial": serial}));
    std::fs::write(&certs[0].0, doc.to_string()).unwrap();
    let (ok, out, _) = nodeward(&["audit", "--issuance-log", &log, "--certs", &files]);
    assert!(!ok, "the audit passed a certificate no log holds:\n{out}");
    assert!(out.contains("unlogged_certificate") && out.contains(&serial), "{out}");
    // A forgery that reuses a logged serial: node 2's agent presents
    // another certificate under the serial the log holds for c.
    std::fs::write(&certs[0].0, &certs[0].1).unwrap();
    let mut doc: Value = serde_json::from_str(&certs[1].1).unwrap();
    let victim = doc["certificates"][0]["serial"].as_str().unwrap().to_string();
    assert!(
        doc["certificates"][0]["sha256"].is_string(),
        "/certs reports no SHA-256: {doc}"
    );
    doc["certificates"][0]["sha256"] = nodeward::identity::ca::sha256_hex(rogue.chain[0].as_ref()).into();
    std::fs::write(&certs[1].0, doc.to_string()).unwrap();
    let (ok, out, _) = nodeward(&["audit", "--issuance-log", &log, "--certs", &files]);
    assert!(!ok, "the audit passed a forgery reusing a logged serial:\n{out}");
    assert!(
        out.contains("reusing a logged serial") && out.contains(&victim.replace(':', "").to_lowercase()),
        "{out}"
    );
    // The same read from the agents' metrics endpoints.
    let (ok, out, err) = run_in(&t.nodes[0].netns, {
        let (log, addrs) = (
            log.clone(),
            // Each node's fabric address (node 1 reaches node 2's).
            (1..=t.nodes.len())
                .map(|k| format!("10.{}.0.{k}:15020", t.id))
                .collect::<Vec<_>>()
                .join(","),
        );
        move || nodeward(&["audit", "--issuance-log", &log, "--agent-metrics", &addrs])
    });
    assert!(ok && !out.contains("unlogged_certificate"), "from metrics:\n{out}{err}");
}

/// The pods of `t` and the agents' own pods, as the API server lists them.
fn api_pods(t: &Topology) -> Vec<Value> {
    let mut pods: Vec<Value> = t
        .workloads
        .pods
        .iter()
        .map(|p| nodeward_testbed::fake_api::pod_json(p, "1"))
        .collect();
    for node in &t.nodes {
        pods.push(serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": agent_pod(&node.name), "namespace": NODE_AGENT.0,
                "uid": agent_pod_uid(&node.name), "resourceVersion": "1"},
            "spec": {"nodeName": node.name, "serviceAccountName": NODE_AGENT.1, "hostNetwork": true,
                "containers": [{"name": "agent", "image": "nodeward:latest"}]},
            "status": {"phase": "Running"}}));
    }
    pods
}

#[test]
fn without_a_jwks_file_the_service_reads_pods_and_keys_from_the_api_and_follows_a_key_rotation() {
    use nodeward_testbed::fake_api::{FakeApi, OIDC_DISCOVERY, OIDC_JWKS, PODS};
    let _g = shared();
    let test = "without_a_jwks_file_the_service_reads_pods_and_keys_from_the_api_and_follows_a_key_rotation";
    if !privileged_or_skip(test) {
        return;
    }
    let t = Topology::build(TopologySpec::two_nodes());
    let mut ca = CaService::new(&t);
    let api = FakeApi::start_in(&t.nodes[0].netns);
    api.list(PODS, "PodList", "1", api_pods(&t));
    api.set(
        OIDC_DISCOVERY,
        serde_json::json!({"issuer": ISSUER, "jwks_uri": format!("https://{}{OIDC_JWKS}", api.addr),
            "response_types_supported": ["id_token"], "id_token_signing_alg_values_supported": ["RS256", "ES256"]}),
    );
    api.set(OIDC_JWKS, serde_json::from_str(&ca.signer.jwks()).unwrap());
    ca.api = Some(api.kubeconfig(&ca.dir));
    ca.start(&t);
    // Ready once the API's Pods are listed.
    let deadline = std::time::Instant::now() + nodeward_testbed::patience(WAIT);
    loop {
        let ready =
            nodeward_testbed::admin::http(&t.nodes[0].netns, "127.0.0.1:15022", "GET", "/healthz/ready").unwrap();
        if ready.0 == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {ready:?}\n{}",
            ca.dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        api.count(&format!("{PODS}?watch")) >= 1,
        "the service does not watch Pods"
    );
    assert_eq!(api.count("/api/v1/namespaces"), 0, "the service lists more than Pods");

    // Node 1's agent, as the API's pods place them and its keys verify.
    let node1 = std::fs::read_to_string(ca.token_file(&t.nodes[0].name)).unwrap();
    ask(&t, &ca, &node1, id("a")).expect("a pod of node 1, from the API's view");
    refused(ask(&t, &ca, &node1, id("c")), 7, "is scheduled on node");

    // The API server rotates its key: the old one is gone from the JWKS.
    let rotated = TokenSigner::generate("test-issuer-2");
    api.set(OIDC_JWKS, serde_json::from_str(&rotated.jwks()).unwrap());
    let (pod, uid) = (agent_pod(&t.nodes[0].name), agent_pod_uid(&t.nodes[0].name));
    let new_token = rotated.sign(&k8s_claims(
        ISSUER,
        "istio-ca",
        NODE_AGENT.0,
        NODE_AGENT.1,
        (&pod, &uid),
        &t.nodes[0].name,
        now(),
    ));
    // A token of the new key makes the service fetch the keys again (at
    // most once per 10 s, so it may take that long after the first fetch).
    let deadline = std::time::Instant::now() + nodeward_testbed::patience(Duration::from_secs(30));
    loop {
        match ask(&t, &ca, &new_token, id("a")) {
            Ok(()) => break,
            Err(e) => assert!(
                std::time::Instant::now() < deadline,
                "a token of the rotated-in key is still refused: {e}\n{}",
                ca.dump()
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // ... and the old key no longer verifies anything.
    refused(ask(&t, &ca, &node1, id("a")), 16, "no key \"test-issuer-1\"");

    // A pod deleted in the API: its node's agent no longer obtains it.
    let a = t.workloads.pods.iter().find(|p| p.spec.name == "a").unwrap();
    api.send(
        PODS,
        &serde_json::json!({"type": "DELETED", "object": nodeward_testbed::fake_api::pod_json(a, "2")}),
    );
    let deadline = std::time::Instant::now() + nodeward_testbed::patience(WAIT);
    loop {
        match ask(&t, &ca, &new_token, id("a")) {
            Err(e) if e.to_string().contains("is scheduled on node") => break,
            r => assert!(
                std::time::Instant::now() < deadline,
                "a deleted pod's identity is still issued: {r:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ca.kill();
}

#[test]
fn agents_without_a_key_tunnel_on_certificates_from_two_replicas_and_one_replica_killed_changes_nothing() {
    let _g = shared();
    let test = "agents_without_a_key_tunnel_on_certificates_from_two_replicas_and_one_replica_killed_changes_nothing";
    if !privileged_or_skip(test) {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    let mut ca = CaService::new(&t);
    ca.start(&t);
    let second = ca.start_replica(&t, 1);
    let both = format!("{},{}", ca.address, ca.replica_address(&t, 1));
    for k in 0..t.nodes.len() {
        let mut flags = ca.agent_flags(&t.nodes[k].name);
        flags[1] = both.clone();
        let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        t.start_agent(k, &refs);
    }
    for k in 0..t.nodes.len() {
        t.wait_captured(k);
    }
    wait_issued(&t, 0, &id("a"), WAIT);
    wait_issued(&t, 1, &id("c"), WAIT);
    // No key on the agents' side: they were given the root and a token.
    let given: Vec<String> = std::fs::read_dir(&ca.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for f in &given {
        let text = std::fs::read_to_string(ca.dir.join(f)).unwrap_or_default();
        assert!(!text.contains("PRIVATE KEY"), "{f} holds a private key");
    }
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let _s = serve(&c.netns, c.v4(8080), info_echo);
    round_trip(&a.netns, c.v4(8080), b"before\n").expect("a reaches c");

    // The first replica dies mid-run: a pod added now is issued by the
    // other, and the mesh carries on.
    ca.kill();
    let e = t.add_pod(0, PodSpec::new("e", "mesh"));
    t.write_config();
    t.wait_captured(0);
    wait_issued(&t, 0, &id("e"), Duration::from_secs(30));
    round_trip(&e.netns, c.v4(8080), b"after\n").expect("the new pod reaches c on the other replica's certificate");
    // (Under load, one connection of a's was seen to stall here once in
    // about twenty runs; a new one then went through. Until that is
    // understood, a must reach c within the deadline, not at the first try.)
    let deadline = std::time::Instant::now() + nodeward_testbed::patience(Duration::from_secs(30));
    while let Err(e) = round_trip(&a.netns, c.v4(8080), b"still\n") {
        assert!(
            std::time::Instant::now() < deadline,
            "a no longer reaches c: {e}\nnode 1:\n{}\nnode 2:\n{}",
            t.agent(0).dump(),
            t.agent(1).dump()
        );
        eprintln!("a's connection to c failed ({e}); trying a new one");
    }
    let l = t
        .agent(0)
        .wait_connection("outbound", &c.v4(8080).to_string(), WAIT)
        .unwrap();
    assert_eq!(l["transport"], "hbone", "{l}");
    // The second replica's log holds e's certificate, and both chains hold.
    let serial = t
        .agent(0)
        .lines()
        .iter()
        .rev()
        .find(|l| issued(l, &id("e")))
        .and_then(|l| l["serial"].as_str().map(String::from))
        .unwrap();
    let log = std::fs::read_to_string(ca.replica_log(1)).unwrap();
    assert!(
        log.contains(&format!("\"serial\":\"{serial}\"")),
        "e's serial {serial} not in the second replica's log:\n{log}"
    );
    for log in [ca.issuance_log(), ca.replica_log(1)] {
        let (ok, _, err) = nodeward(&["ca", "log", "verify", &log.display().to_string()]);
        assert!(ok, "{}: {err}", log.display());
    }
    drop(second);
}
