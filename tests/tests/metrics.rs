//! What operators see: Istio's TCP metrics and Nodeward's own on
//! `:15020/metrics` after known traffic, readiness on `:15021` naming what
//! is not ready, and the admin API on the node's loopback only.

use std::time::Duration;

use nodeward_testbed::admin::{self, config_dump, http, sample, wait_ready, wait_sample};
use nodeward_testbed::traffic::{self, info_echo, read_greeting, round_trip, serve};
use nodeward_testbed::{Topology, shared, two_node_cluster};

const WAIT: Duration = Duration::from_secs(10);

/// Istio's labels of a connection from pod `a` to pod `c` (namespace `mesh`).
fn a_to_c(reporter: &str, security: &str, flags: &str) -> String {
    format!(
        "{{reporter=\"{reporter}\",source_workload=\"a\",source_workload_namespace=\"mesh\",\
         source_principal=\"spiffe://cluster.local/ns/mesh/sa/a\",destination_workload=\"c\",\
         destination_workload_namespace=\"mesh\",destination_principal=\"spiffe://cluster.local/ns/mesh/sa/c\",\
         destination_service_name=\"unknown\",destination_service_namespace=\"unknown\",\
         connection_security_policy=\"{security}\",response_flags=\"{flags}\"}}"
    )
}

/// Whether a connection from `from` reaches the app (its greeting arrives).
fn reaches(t: &Topology, from: &str, dst: std::net::SocketAddr) -> bool {
    traffic::connect_timeout(&t.pod(from).netns, dst, Duration::from_secs(3))
        .and_then(|s| read_greeting(&s))
        .is_ok()
}

/// Polls node `k`'s `/config_dump` until `pred` holds for pod `key`.
fn wait_dump(t: &Topology, k: usize, key: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let dump = config_dump(&t.nodes[k].netns);
        let w = dump["workloads"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["pod"] == key).cloned())
            .unwrap_or_default();
        if pred(&w) {
            return w;
        }
        assert!(std::time::Instant::now() < deadline, "{key} on node {k}: {dump:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn mtls_connections_strict_refusals_and_denials_are_counted_exactly() {
    let _g = shared();
    let name = "mtls_connections_strict_refusals_and_denials_are_counted_exactly";
    let Some(t) = two_node_cluster(name, &[]) else {
        return;
    };
    let c = t.pod("c").clone();
    let _s: Vec<_> = [7000, 7001]
        .iter()
        .map(|p| serve(&c.netns, c.v4(*p), info_echo))
        .collect();
    let (n1, n2) = (t.nodes[0].netns.clone(), t.nodes[1].netns.clone());

    // Three mTLS connections a -> c, five bytes each way from the client.
    for _ in 0..3 {
        round_trip(&t.pod("a").netns, c.v4(7000), b"hello").unwrap();
    }
    for (netns, reporter) in [(&n1, "source"), (&n2, "destination")] {
        let labels = a_to_c(reporter, "mutual_tls", "-");
        let m = wait_sample(netns, &format!("istio_tcp_connections_closed_total{labels}"), 3.0, WAIT);
        assert_eq!(
            sample(&m, &format!("istio_tcp_connections_opened_total{labels}")),
            Some(3.0),
            "{m}"
        );
        assert_eq!(
            sample(&m, &format!("istio_tcp_connections_closed_total{labels}")),
            Some(3.0),
            "{m}"
        );
        assert_eq!(
            sample(&m, &format!("istio_tcp_sent_bytes_total{labels}")),
            Some(15.0),
            "{m}"
        );
    }
    let m = admin::metrics(&n1);
    let out = "nodeward_connections_total{direction=\"outbound\",security=\"mutual_tls\",namespace=\"mesh\"}";
    assert_eq!(sample(&m, out), Some(3.0), "{m}");
    let m = admin::metrics(&n2);
    let inb = "nodeward_connections_total{direction=\"inbound\",security=\"mutual_tls\",namespace=\"mesh\"}";
    assert_eq!(sample(&m, inb), Some(3.0), "{m}");
    assert!(
        !m.contains("security=\"plaintext\""),
        "no plaintext connection was made:\n{m}"
    );

    // STRICT for the namespace: /config_dump shows the mode and the policy
    // that set it, and one plaintext attempt counts exactly one refusal.
    t.apply(
        "strict",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: mesh}\nspec:\n  mtls: {mode: STRICT}\n",
    );
    let w = wait_dump(&t, 1, "mesh/c", |w| w["mtls"]["default"]["mode"] == "STRICT");
    assert_eq!(w["mtls"]["default"]["policy"], "mesh/strict", "{w:#}");
    assert_eq!(w["identity"], "spiffe://cluster.local/ns/mesh/sa/c", "{w:#}");
    assert_eq!(w["ebpf"]["captured"], true, "{w:#}");
    let refused = "nodeward_plaintext_refused_total{namespace=\"mesh\",workload=\"c\"}";
    assert_eq!(sample(&admin::metrics(&n2), refused), None);
    assert!(!reaches(&t, "d", c.v4(7000)), "STRICT refuses plaintext from d");
    let m = wait_sample(&n2, refused, 1.0, WAIT);
    assert_eq!(sample(&m, refused), Some(1.0), "{m}");

    // A DENY policy: one denied connection counts under that policy.
    t.apply(
        "deny",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-7001, namespace: mesh}\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation: {ports: [\"7001\"]}\n",
    );
    wait_dump(&t, 1, "mesh/c", |w| {
        w["authorization_policies"].as_array().is_some_and(|ps| {
            ps.iter()
                .any(|p| p["policy"] == "mesh/deny-7001" && p["action"] == "DENY")
        })
    });
    assert!(!reaches(&t, "a", c.v4(7001)), "the DENY policy refuses a -> c:7001");
    let denied = "nodeward_authorization_denials_total{namespace=\"mesh\",workload=\"c\",policy=\"mesh/deny-7001\",reason=\"denied\"}";
    let m = wait_sample(&n2, denied, 1.0, WAIT);
    assert_eq!(sample(&m, denied), Some(1.0), "{m}");
    // The refusal and the denial are Istio-labelled too, with their flags.
    assert_eq!(
        sample(
            &m,
            &format!(
                "istio_tcp_connections_closed_total{}",
                a_to_c("destination", "mutual_tls", "denied")
            )
        ),
        Some(1.0),
        "{m}"
    );
    // The three allowed connections are still the only unflagged ones.
    assert_eq!(
        sample(
            &m,
            &format!(
                "istio_tcp_connections_closed_total{}",
                a_to_c("destination", "mutual_tls", "-")
            )
        ),
        Some(3.0),
        "{m}"
    );
    // Certificate expiry is exported per identity held on the node, with
    // the serial of the certificate (what `audit --issuance-log` reads).
    assert!(
        m.contains(
            "nodeward_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/mesh/sa/c\",serial=\""
        ),
        "{m}"
    );
    assert!(
        m.contains("nodeward_ebpf_attached{namespace=\"mesh\",pod=\"c\"} 1"),
        "{m}"
    );
}

#[test]
fn readiness_names_a_rejected_file_and_an_uncaptured_pod_and_the_admin_api_stays_on_the_node() {
    let _g = shared();
    let name = "readiness_names_a_rejected_file_and_an_uncaptured_pod_and_the_admin_api_stays_on_the_node";
    let Some(t) = two_node_cluster(name, &[]) else {
        return;
    };
    let n1 = t.nodes[0].netns.clone();
    let ready = |s: u16, _: &str| s == 200;
    assert_eq!(wait_ready(&n1, WAIT, ready), (200, "ready\n".to_string()));

    // A config file the agent rejects: not ready, and the file is named.
    t.apply("broken", "apiVersion: v1\nkind: Pod\nmetadata: [not, a, mapping]\n");
    let (status, body) = wait_ready(&n1, WAIT, |s, _| s == 503);
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("config: config file") && body.contains("broken.yaml"),
        "{body}"
    );
    t.unapply("broken");
    assert_eq!(wait_ready(&n1, WAIT, ready).0, 200);

    // An enrolled pod of this node that cannot be captured (no network
    // namespace holds its IP): not ready, and the pod is named.
    let ip = match t.pod("a").v4(0).ip() {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            std::net::Ipv4Addr::new(o[0], o[1], o[2], 99)
        }
        other => panic!("{other}"),
    };
    t.apply(
        "ghost",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: ghost, namespace: mesh, uid: ghost-uid}}\nspec: {{nodeName: {}, serviceAccountName: ghost}}\nstatus:\n  phase: Running\n  podIP: \"{ip}\"\n  podIPs:\n  - ip: \"{ip}\"\n",
            t.nodes[0].name
        ),
    );
    let (status, body) = wait_ready(&n1, WAIT, |s, b| s == 503 && b.contains("mesh/ghost"));
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("pods: pod mesh/ghost is enrolled but not captured"),
        "{body}"
    );
    t.unapply("ghost");
    assert_eq!(wait_ready(&n1, WAIT, ready).0, 200);

    // The log level changes at runtime: debug lines appear after it.
    assert_eq!(
        http(&n1, admin::ADMIN, "GET", "/logging").unwrap(),
        (200, "level: info\n".into())
    );
    assert_eq!(
        http(&n1, admin::ADMIN, "POST", "/logging?level=bogus=[").unwrap().0,
        400
    );
    assert_eq!(
        http(&n1, admin::ADMIN, "POST", "/logging?level=debug").unwrap(),
        (200, "level: debug\n".into())
    );
    assert_eq!(
        http(&n1, admin::ADMIN, "GET", "/logging").unwrap(),
        (200, "level: debug\n".into())
    );
    let c = t.pod("c").clone();
    let _s = serve(&c.netns, c.v4(7000), info_echo);
    round_trip(&t.pod("a").netns, c.v4(7000), b"debug me").unwrap();
    t.agent(0)
        .wait_log(WAIT, |l| l["level"] == "DEBUG")
        .unwrap_or_else(|| panic!("no debug line after the change:\n{}", t.agent(0).dump()));

    // From a pod, the node's metrics answer (they are meant for the node's
    // network) but its admin API does not: it listens on loopback only.
    let a = t.pod("a").netns.clone();
    let gw = t.nodes[0].gateway4;
    let (status, body) = http(&a, &format!("{gw}:15020"), "GET", "/metrics").unwrap();
    assert_eq!(status, 200, "{body}");
    let admin_from_pod = http(&a, &format!("{gw}:15000"), "GET", "/config_dump");
    assert!(admin_from_pod.is_err(), "15000 answered a pod: {admin_from_pod:?}");
    // On the node itself it answers.
    assert!(config_dump(&n1)["workloads"].as_array().is_some_and(|w| !w.is_empty()));
}

#[test]
fn an_open_connection_is_counted_opened_until_it_closes_and_its_log_names_the_allow_policy() {
    let _g = shared();
    let name = "an_open_connection_is_counted_opened_until_it_closes_and_its_log_names_the_allow_policy";
    let Some(t) = two_node_cluster(name, &[]) else {
        return;
    };
    let c = t.pod("c").clone();
    let _s = serve(&c.netns, c.v4(7000), info_echo);
    let (n1, n2) = (t.nodes[0].netns.clone(), t.nodes[1].netns.clone());
    t.apply(
        "allow",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-a, namespace: mesh}\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/mesh/sa/a]}\n",
    );
    wait_dump(&t, 1, "mesh/c", |w| {
        w["authorization_policies"]
            .as_array()
            .is_some_and(|ps| ps.iter().any(|p| p["policy"] == "mesh/allow-a"))
    });

    // While the connection is open, both nodes count it opened and not
    // closed: opened − closed is the number of open connections.
    let held = traffic::connect_timeout(&t.pod("a").netns, c.v4(7000), Duration::from_secs(3)).unwrap();
    read_greeting(&held).expect("a reaches c under the ALLOW");
    for (netns, reporter) in [(&n1, "source"), (&n2, "destination")] {
        let labels = a_to_c(reporter, "mutual_tls", "-");
        let opened = format!("istio_tcp_connections_opened_total{labels}");
        let m = wait_sample(netns, &opened, 1.0, WAIT);
        assert_eq!(sample(&m, &opened), Some(1.0), "{reporter}: {m}");
        assert!(
            !m.contains("istio_tcp_connections_closed_total{"),
            "{reporter}: nothing has closed yet:\n{m}"
        );
    }

    drop(held);
    for (netns, reporter) in [(&n1, "source"), (&n2, "destination")] {
        let labels = a_to_c(reporter, "mutual_tls", "-");
        let closed = format!("istio_tcp_connections_closed_total{labels}");
        let m = wait_sample(netns, &closed, 1.0, WAIT);
        assert_eq!(sample(&m, &closed), Some(1.0), "{reporter}: {m}");
        assert_eq!(
            sample(&m, &format!("istio_tcp_connections_opened_total{labels}")),
            Some(1.0),
            "{reporter}: {m}"
        );
    }

    // The server's access-log line names the ALLOW policy that admitted it.
    let l = t
        .agent(1)
        .wait_log(WAIT, |l| {
            l["message"] == "connection closed" && l["dst"] == c.v4(7000).to_string().as_str()
        })
        .unwrap_or_else(|| panic!("no access-log line:\n{}", t.agent(1).dump()));
    assert_eq!(l["decision"], "allow", "{l}");
    assert_eq!(l["policy"], "mesh/allow-a", "{l}");
    assert_eq!(l["src_identity"], "spiffe://cluster.local/ns/mesh/sa/a", "{l}");
    assert_eq!(l["mode"], "mutual_tls", "{l}");
}
