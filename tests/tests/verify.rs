//! `nodeward verify` on a node of the two-node test bed, against real
//! agents: it passes when STRICT is enforced on every port a pod listens
//! on, and fails naming the pod and the port when one port is left
//! PERMISSIVE; it lists UDP listeners, which STRICT does not cover.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use nodeward_testbed::netns::{nsenter, run_in};
use nodeward_testbed::traffic::{info_echo, round_trip, serve};
use nodeward_testbed::{PodSpec, Topology, TopologySpec, nodeward_bin, patience, privileged_or_skip, shared};
use serde_json::Value;

/// node 1: a; node 2: c (app: c), which the tests verify.
fn cluster(test: &str) -> Option<Topology> {
    if !privileged_or_skip(test) {
        return None;
    }
    let mut t = Topology::build(TopologySpec {
        nodes: vec![
            vec![PodSpec::new("a", "mesh").label("app", "a")],
            vec![PodSpec::new("c", "mesh").label("app", "c")],
        ],
        namespaces: vec![("mesh".into(), true)],
    });
    t.start_agents();
    Some(t)
}

/// Runs `nodeward verify` for pod `c` in node 2's namespace: exit code,
/// the JSON report, and the table.
fn verify(t: &Topology) -> (i32, Value, String) {
    let node = &t.nodes[1];
    let run = |output: &str| {
        let bin = nodeward_bin();
        let out = nsenter(&node.netns, &[bin.to_str().unwrap()])
            .args(["verify", "--node-name", &node.name, "--pod", "c", "--output", output])
            .arg("--config-dir")
            .arg(&t.config_dir)
            .arg("--ca-dir")
            .arg(&t.ca_dir)
            // Each probe's wait, stretched where everything is slower (TCG).
            .arg("--timeout")
            .arg(format!("{}ms", patience(Duration::from_secs(1)).as_millis()))
            .output()
            .expect("run nodeward verify");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, json, err) = run("json");
    let report: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}\n{err}"));
    let (_, table, _) = run("table");
    (code, report, table)
}

/// Verifies until the exit code is `want` (the agents apply a config
/// change within one poll; verify reads the directory at once).
fn verify_until(t: &Topology, want: i32) -> (Value, String) {
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    loop {
        let (code, report, table) = verify(t);
        if code == want {
            return (report, table);
        }
        assert!(
            Instant::now() < deadline,
            "verify kept exiting {code}, want {want}:\n{table}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The status and detail of the `outbound_mtls` check of pod `c`.
fn outbound(report: &Value) -> (String, String) {
    let c = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "outbound_mtls" && c["pod"] == "mesh/c")
        .unwrap_or_else(|| panic!("no outbound_mtls check: {report:#}"));
    (
        c["status"].as_str().unwrap().to_string(),
        c["detail"].as_str().unwrap().to_string(),
    )
}

/// The status and detail of `check` on `port`.
fn result(report: &Value, check: &str, port: u16) -> (String, String) {
    let c = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == check && c["port"] == port)
        .unwrap_or_else(|| panic!("no {check} check on port {port}: {report:#}"));
    assert_eq!(c["pod"], "mesh/c");
    (
        c["status"].as_str().unwrap().to_string(),
        c["detail"].as_str().unwrap().to_string(),
    )
}

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec: {mtls: {mode: STRICT}}
";

const PORT_9090_PERMISSIVE: &str = "---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: c-9090, namespace: mesh}
spec:
  selector: {matchLabels: {app: c}}
  portLevelMtls: {9090: {mode: PERMISSIVE}}
";

const DENY_FOREIGN: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-verify, namespace: mesh}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: [nodeward-verify]}}]}]
";

#[test]
fn verify_passes_under_strict_and_names_the_pod_and_port_left_permissive() {
    let _g = shared();
    let Some(t) = cluster("verify_passes_under_strict_and_names_the_pod_and_port_left_permissive") else {
        return;
    };
    let c = t.pod("c").clone();
    let _s: Vec<_> = [8080, 9090]
        .iter()
        .map(|p| serve(&c.netns, c.v4(*p), info_echo))
        .collect();

    // PERMISSIVE (no policy): every port accepts plaintext, verify fails.
    let (report, _) = verify_until(&t, 1);
    assert_eq!(result(&report, "plaintext", 8080).0, "fail");

    t.apply("pa", STRICT);
    t.apply("authz", DENY_FOREIGN);
    let (report, table) = verify_until(&t, 0);
    for port in [8080, 9090] {
        let (status, detail) = result(&report, "plaintext", port);
        assert_eq!(status, "pass", "{port}: {detail}\n{table}");
        assert!(detail.contains("mode STRICT"), "{detail}");
        let (status, detail) = result(&report, "foreign_identity", port);
        assert_eq!(status, "pass", "{port}: {detail}\n{table}");
        assert!(detail.contains("mesh/deny-verify"), "{detail}");
    }
    assert_eq!(report["ok"], true);

    t.apply("pa", &format!("{STRICT}{PORT_9090_PERMISSIVE}"));
    let (report, table) = verify_until(&t, 1);
    let (status, detail) = result(&report, "plaintext", 9090);
    assert_eq!(status, "fail", "{detail}");
    assert!(detail.contains("port-level mode PERMISSIVE"), "{detail}");
    assert_eq!(result(&report, "plaintext", 8080).0, "pass", "8080 stays STRICT");
    let line = table
        .lines()
        .find(|l| l.contains("FAIL"))
        .unwrap_or_else(|| panic!("no FAIL line:\n{table}"));
    assert!(
        line.starts_with("mesh/c") && line.contains("plaintext") && line.contains("9090"),
        "{line}"
    );
}

const A_8080_DISABLE: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a-8080, namespace: mesh}
spec:
  selector: {matchLabels: {app: a}}
  mtls: {mode: PERMISSIVE}
  portLevelMtls: {8080: {mode: DISABLE}}
";

#[test]
fn verify_reads_the_agents_counters_and_fails_once_the_pod_called_an_enrolled_peer_in_plaintext() {
    let _g = shared();
    let name = "verify_reads_the_agents_counters_and_fails_once_the_pod_called_an_enrolled_peer_in_plaintext";
    let Some(t) = cluster(name) else {
        return;
    };
    let a = t.pod("a").clone();
    let _s = serve(&a.netns, a.v4(8080), info_echo);
    let c_netns = t.pod("c").netns.clone();

    // Nothing called yet: the check cannot say anything.
    let (_, report, _) = verify(&t);
    let (status, detail) = outbound(&report);
    assert_eq!(status, "not_tested", "{detail}");

    // c -> a over the tunnel: the counters c's agent exports say mTLS.
    round_trip(&c_netns, a.v4(8080), b"over mtls").unwrap();
    let (_, report, table) = verify(&t);
    let (status, detail) = outbound(&report);
    assert_eq!(status, "pass", "{detail}\n{table}");
    assert!(detail.contains("all 1 outbound connections"), "{detail}");

    // a's port 8080 in DISABLE: c's agent now calls it in plaintext, and
    // verify on c's node names the plaintext calls to an enrolled peer.
    t.apply("pa", A_8080_DISABLE);
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    loop {
        round_trip(&c_netns, a.v4(8080), b"in plaintext?").unwrap();
        let (code, report, table) = verify(&t);
        let (status, detail) = outbound(&report);
        if status == "fail" {
            assert!(
                detail.contains("outbound connections to enrolled peers were plaintext"),
                "{detail}"
            );
            assert_ne!(code, 0, "a failed check fails the command:\n{table}");
            let line = table
                .lines()
                .find(|l| l.contains("outbound_mtls"))
                .unwrap_or_else(|| panic!("no outbound_mtls line:\n{table}"));
            assert!(line.starts_with("mesh/c") && line.contains("FAIL"), "{line}");
            break;
        }
        assert_eq!(status, "pass", "{detail}");
        assert!(Instant::now() < deadline, "verify still passes after DISABLE:\n{table}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn verify_lists_each_udp_listener_of_a_strict_pod_as_not_covered_without_failing() {
    let _g = shared();
    let Some(mut t) = cluster("verify_lists_each_udp_listener_of_a_strict_pod_as_not_covered_without_failing") else {
        return;
    };
    let c = t.pod("c").clone();
    let _tcp = serve(&c.netns, c.v4(8080), info_echo);
    let udp_addr: std::net::SocketAddr = "0.0.0.0:5353".parse().unwrap();
    let _udp = run_in(&c.netns, move || UdpSocket::bind(udp_addr)).unwrap();
    let local: std::net::SocketAddr = "127.0.0.1:5400".parse().unwrap();
    let _loopback = run_in(&c.netns, move || UdpSocket::bind(local)).unwrap();
    t.apply("pa", STRICT);
    t.apply("authz", DENY_FOREIGN);

    // Listed, and not a failure: STRICT is what it should be on TCP.
    let (report, table) = verify_until(&t, 0);
    let (status, detail) = result(&report, "udp", 5353);
    assert_eq!(status, "not_covered", "{detail}\n{table}");
    assert!(detail.contains("not covered by STRICT"), "{detail}");
    let line = table
        .lines()
        .find(|l| l.contains(" udp "))
        .unwrap_or_else(|| panic!("no udp line:\n{table}"));
    assert!(
        line.starts_with("mesh/c") && line.contains("5353") && line.contains("not covered"),
        "{line}"
    );
    assert!(table.contains("1 not covered"), "{table}");
    let udp_rows = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["check"] == "udp")
        .count();
    assert_eq!(udp_rows, 1, "the loopback-only socket is not listed: {report:#}");

    // With inbound UDP dropped, the port is closed to the outside, which
    // verify cannot observe: not tested, never a pass.
    t.edit_pod("c", |p| {
        p.annotations.push(("nodeward.io/inbound-udp".into(), "drop".into()));
        true
    });
    let (_, report, table) = verify(&t);
    let (status, detail) = result(&report, "udp", 5353);
    assert_eq!(status, "not_tested", "{detail}\n{table}");
    assert!(detail.contains("dropped"), "{detail}");
}
