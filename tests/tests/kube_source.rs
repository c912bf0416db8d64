//! `--source kube` on real agents: the agent reads a fake API server (in
//! this process, on the node's loopback, the API server's JSON), is not
//! ready until every kind is listed, captures a pod that appears in the
//! watch stream, keeps it through `410 Gone` and failing relists, and
//! releases it when the stream deletes it; and tunnels to an enrolled pod
//! on another node, which it knows only from the cluster-wide pod watch.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nodeward_testbed::fake_api::{FakeApi, NAMESPACES, PEER_AUTHENTICATIONS, PODS, namespace_json, pod_json};
use nodeward_testbed::netns::run_in;
use nodeward_testbed::traffic::{info_echo, round_trip, serve};
use nodeward_testbed::{Agent, PodSpec, Topology, TopologySpec, privileged_or_skip, shared, traffic};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

/// `/healthz/ready` of the agent in node namespace `netns`: (status line, body).
fn readiness(netns: &str) -> (String, String) {
    run_in(netns, || {
        let Ok(mut s) = TcpStream::connect("127.0.0.1:15021") else {
            return (String::new(), String::new());
        };
        let _ = s.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        (head.lines().next().unwrap_or("").to_string(), body.to_string())
    })
}

fn wait_readiness(netns: &str, what: &str, pred: impl Fn(&str, &str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = readiness(netns);
        if pred(&status, &body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what}: readiness is {status:?} {body:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether anything answers on the pod's outbound port (after release: nothing).
fn listening(netns: &str) -> bool {
    traffic::connect_timeout(netns, "127.0.0.1:15001".parse().unwrap(), Duration::from_secs(2)).is_ok()
}

/// The pods node 0's agent has pinned (one directory per netns cookie).
fn pinned_pods(t: &Topology) -> Vec<String> {
    std::fs::read_dir(t.pin_dir(0).join("pods"))
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_pod_from_the_watch_stream_is_captured_kept_through_410_gone_and_released_when_deleted() {
    const NAME: &str = "a_pod_from_the_watch_stream_is_captured_kept_through_410_gone_and_released_when_deleted";
    let _g = shared();
    if !privileged_or_skip(NAME) {
        return;
    }
    let t = Topology::build(TopologySpec {
        nodes: vec![vec![PodSpec::new("a", "mesh")]],
        namespaces: vec![("mesh".into(), true)],
    });
    let node = &t.nodes[0];
    let api = FakeApi::start_in(&node.netns);
    api.list(
        NAMESPACES,
        "NamespaceList",
        "5",
        vec![namespace_json("mesh", true, "4")],
    );
    // PeerAuthentications cannot be listed yet (an API server in trouble).
    api.fail_list(PEER_AUTHENTICATIONS);
    let kubeconfig = api.kubeconfig(&t.config_dir);
    let ca = t.ca_dir.display().to_string();
    let agent = Agent::start_with(
        node,
        &[
            "--source",
            "kube",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--ca-dir",
            &ca,
        ],
    );

    // The other kinds list at once; readiness then names only the missing one.
    let body = wait_readiness(
        &node.netns,
        "not ready, naming only the missing kind",
        |status, body| {
            status.contains("503")
                && body.contains("PeerAuthentications not synced yet (last error: ")
                && body.contains("etcdserver: request timed out")
                && ![
                    "Pods",
                    "Namespaces",
                    "Services",
                    "EndpointSlices",
                    "AuthorizationPolicies",
                ]
                .iter()
                .any(|k| body.contains(&format!("{k} not synced")))
        },
    );
    assert!(
        body.contains("etcdserver: request timed out"),
        "the last error is shown: {body}"
    );
    assert!(
        agent.lines().iter().all(|l| l["message"] != "config applied"),
        "nothing is applied before every kind is listed"
    );

    api.list(PEER_AUTHENTICATIONS, "PeerAuthenticationList", "7", vec![]);
    wait_readiness(&node.netns, "ready once every kind is listed", |status, _| {
        status.contains("200")
    });
    agent
        .wait_log(WAIT, |l| l["message"] == "config applied")
        .unwrap_or_else(|| panic!("no config applied; log:\n{}", agent.dump()));
    let a = t.pod("a").clone();
    assert!(pinned_pods(&t).is_empty(), "a pod the API has not sent is not captured");

    let placed = t.workloads.pods.iter().find(|p| p.spec.name == "a").unwrap().clone();
    api.send(PODS, &json!({"type": "ADDED", "object": pod_json(&placed, "10")}));
    let cookie = agent
        .wait_log(WAIT, |l| l["message"] == "pod captured" && l["pod"] == "mesh/a")
        .unwrap_or_else(|| panic!("mesh/a not captured; log:\n{}", agent.dump()))["cookie"]
        .as_u64()
        .unwrap();
    assert_eq!(pinned_pods(&t), vec![cookie.to_string()], "the pod's capture is pinned");

    // The API server loses its history (410 Gone) and cannot list for a
    // while: the pod stays captured on the last synced state.
    api.fail_list(PODS);
    api.send(
        PODS,
        &json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "too old resource version: 10 (12)", "reason": "Expired", "code": 410}}),
    );
    agent
        .wait_log(WAIT, |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("watch failed") && m.contains("etcdserver"))
        })
        .unwrap_or_else(|| panic!("no failed relist; log:\n{}", agent.dump()));
    assert_eq!(
        pinned_pods(&t),
        vec![cookie.to_string()],
        "still captured during the outage"
    );
    assert!(
        agent.lines().iter().all(|l| l["message"] != "pod released"),
        "nothing released during the outage"
    );
    api.list(PODS, "PodList", "12", vec![pod_json(&placed, "10")]);
    let relists = api.count(PODS);
    let deadline = Instant::now() + Duration::from_secs(40);
    while api.count(&format!("{PODS}?watch")) < 2 {
        assert!(Instant::now() < deadline, "no watch after the relist ({relists} lists)");
        std::thread::sleep(Duration::from_millis(20));
    }

    api.send(PODS, &json!({"type": "DELETED", "object": pod_json(&placed, "13")}));
    agent
        .wait_log(WAIT, |l| l["message"] == "pod released" && l["pod"] == "mesh/a")
        .unwrap_or_else(|| panic!("mesh/a not released; log:\n{}", agent.dump()));
    let deadline = Instant::now() + WAIT;
    while !pinned_pods(&t).is_empty() {
        assert!(Instant::now() < deadline, "pins left: {:?}", pinned_pods(&t));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!listening(&a.netns), "the pod's listeners are gone");
}

#[test]
fn a_pod_on_another_node_known_from_the_api_is_reached_through_the_tunnel() {
    const NAME: &str = "a_pod_on_another_node_known_from_the_api_is_reached_through_the_tunnel";
    let _g = shared();
    if !privileged_or_skip(NAME) {
        return;
    }
    // mesh/a, mesh/b on node 0; mesh/c, plain/d on node 1. Each node's
    // agent reads its own fake API server, which serves every node's pods
    // (as the real one does to a watch without a field selector).
    let t = Topology::build(TopologySpec::two_nodes());
    let pods: Vec<_> = t.workloads.pods.iter().map(|p| pod_json(p, "3")).collect();
    let ca = t.ca_dir.display().to_string();
    let mut agents = Vec::new();
    let mut apis = Vec::new();
    for (k, node) in t.nodes.iter().enumerate() {
        let api = FakeApi::start_in(&node.netns);
        api.list(PODS, "PodList", "5", pods.clone());
        api.list(
            NAMESPACES,
            "NamespaceList",
            "5",
            vec![namespace_json("mesh", true, "4"), namespace_json("plain", false, "4")],
        );
        let dir = t.config_dir.join(format!("kube-{k}"));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = api.kubeconfig(&dir);
        agents.push(Agent::start_with(
            node,
            &[
                "--source",
                "kube",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "--ca-dir",
                &ca,
            ],
        ));
        apis.push(api);
    }
    for (agent, pod) in agents.iter().zip(["mesh/a", "mesh/c"]) {
        agent
            .wait_log(WAIT, |l| l["message"] == "pod captured" && l["pod"] == pod)
            .unwrap_or_else(|| panic!("{pod} not captured; log:\n{}", agent.dump()));
    }

    let c = t.pod("c");
    let _server = serve(&c.netns, c.v4(8080), info_echo);
    round_trip(&t.pod("a").netns, c.v4(8080), b"hello\n")
        .unwrap_or_else(|e| panic!("a -> c: {e}; log:\n{}", agents[0].dump()));
    let l = agents[0]
        .wait_connection("outbound", &c.v4(8080).to_string(), WAIT)
        .unwrap_or_else(|| panic!("no outbound log line for a -> c; log:\n{}", agents[0].dump()));
    assert_eq!(
        l["transport"], "hbone",
        "a -> c (another node) went through the tunnel, not in plaintext: {l}"
    );
    assert_eq!(l["peer_identity"], "spiffe://cluster.local/ns/mesh/sa/c", "{l}");
}

/// `GET path` on the agent's `port` in node namespace `netns`: the body.
fn get(netns: &str, port: u16, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    run_in(netns, move || {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return String::new();
        };
        let _ = s.write_all(request.as_bytes());
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    })
}

#[test]
fn a_watch_failing_longer_than_source_stale_after_fails_readiness_naming_its_kind_and_is_counted() {
    const NAME: &str = "a_watch_failing_longer_than_source_stale_after_fails_readiness_naming_its_kind_and_is_counted";
    let _g = shared();
    if !privileged_or_skip(NAME) {
        return;
    }
    let t = Topology::build(TopologySpec {
        nodes: vec![vec![PodSpec::new("a", "mesh")]],
        namespaces: vec![("mesh".into(), true)],
    });
    let node = &t.nodes[0];
    let api = FakeApi::start_in(&node.netns);
    let kubeconfig = api.kubeconfig(&t.config_dir);
    let ca = t.ca_dir.display().to_string();
    let agent = Agent::start_with(
        node,
        &[
            "--source",
            "kube",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--ca-dir",
            &ca,
            "--source-stale-after",
            "3s",
        ],
    );
    wait_readiness(&node.netns, "ready once every kind is listed", |status, _| {
        status.contains("200")
    });

    // The PeerAuthentication watch breaks and every retry fails: the last
    // synced policies keep serving, but readiness fails naming the kind.
    api.fail_watch(PEER_AUTHENTICATIONS);
    let body = wait_readiness(&node.netns, "not ready while the watch fails", |status, body| {
        status.contains("503") && body.contains("PeerAuthentications watch failing")
    });
    assert!(
        body.contains("etcdserver: leader changed"),
        "the last error is shown: {body}"
    );
    assert!(
        ![
            "Pods",
            "Namespaces",
            "Services",
            "EndpointSlices",
            "AuthorizationPolicies"
        ]
        .iter()
        .any(|k| body.contains(k)),
        "only the failing kind is named: {body}"
    );
    // Logged and counted once, as it goes stale.
    agent
        .wait_log(WAIT, |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("watch failing too long"))
                && l["kind"] == "PeerAuthentications"
        })
        .unwrap_or_else(|| panic!("the stale kind is not logged; log:\n{}", agent.dump()));
    let metrics = get(&node.netns, 15020, "/metrics");
    assert!(
        metrics.contains("nodeward_source_stale_total{kind=\"peerauthentications\"} 1"),
        "{metrics}"
    );
    let failures = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nodeward_source_watch_failures_total{kind=\"peerauthentications\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(failures >= 2, "failures counted: {metrics}");

    // The watch works again and delivers: ready again.
    api.heal_watch(PEER_AUTHENTICATIONS);
    let policy = json!({"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system", "resourceVersion": "20"},
        "spec": {"mtls": {"mode": "STRICT"}}});
    api.send(PEER_AUTHENTICATIONS, &json!({"type": "ADDED", "object": policy}));
    wait_readiness(&node.netns, "ready once the watch delivers again", |status, _| {
        status.contains("200")
    });
}
