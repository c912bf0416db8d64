//! Identities on real agents: certificates issued per identity for the pods
//! a node captures, dropped with the last pod, CA trouble at runtime shown
//! in readiness, and bad CA material refused at startup by file name.

use std::io::{Read, Write};
use std::time::Duration;

use nodeward_testbed::{PodSpec, Topology, TopologySpec, nodeward_bin, privileged_or_skip, shared, traffic};

const WAIT: Duration = Duration::from_secs(10);

/// GET `path` from the agent's admin port inside node `k`'s namespace.
fn admin_get(t: &Topology, k: usize, path: &str) -> String {
    let mut s =
        traffic::connect(&t.nodes[k].netns, "127.0.0.1:15021".parse().unwrap()).expect("admin port on the node");
    write!(s, "GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn each_identity_on_a_node_gets_one_certificate_dropped_with_its_last_pod() {
    let _g = shared();
    if !privileged_or_skip("each_identity_on_a_node_gets_one_certificate_dropped_with_its_last_pod") {
        return;
    }
    let mut spec = TopologySpec::two_nodes();
    // a and b share a service account on node 1.
    spec.nodes[0] = vec![PodSpec::new("a", "mesh"), PodSpec::new("b", "mesh")];
    for p in &mut spec.nodes[0] {
        p.service_account = "shared".into();
    }
    let mut t = Topology::build(spec);
    t.start_agents();
    let issued = |k: usize| {
        t.agent(k)
            .lines()
            .into_iter()
            .filter(|l| l["message"] == "workload certificate issued")
            .map(|l| l["identity"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        issued(0),
        vec!["spiffe://cluster.local/ns/mesh/sa/shared"],
        "one certificate for two pods"
    );
    assert_eq!(
        issued(1),
        vec!["spiffe://cluster.local/ns/mesh/sa/c"],
        "plain/d is not enrolled"
    );
    assert!(admin_get(&t, 0, "/healthz/ready").starts_with("HTTP/1.1 200"));

    t.edit_pod("a", |_| false);
    t.agent(0)
        .wait_log(WAIT, |l| l["message"] == "pod released" && l["pod"] == "mesh/a")
        .unwrap();
    assert!(
        !t.agent(0)
            .lines()
            .iter()
            .any(|l| l["message"].as_str().unwrap_or("").starts_with("certificate dropped")),
        "b still uses it"
    );
    t.edit_pod("b", |_| false);
    t.agent(0)
        .wait_log(WAIT, |l| {
            l["message"] == "certificate dropped: no pod uses it"
                && l["identity"] == "spiffe://cluster.local/ns/mesh/sa/shared"
        })
        .unwrap_or_else(|| panic!("certificate not dropped:\n{}", t.agent(0).dump()));
}

#[test]
fn a_ca_broken_at_runtime_is_reported_in_readiness_and_the_old_one_keeps_signing() {
    let _g = shared();
    if !privileged_or_skip("a_ca_broken_at_runtime_is_reported_in_readiness_and_the_old_one_keeps_signing") {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents();
    std::fs::write(t.ca_dir.join("ca-key.pem"), "not a key").unwrap();
    let err = t
        .agent(0)
        .wait_log(WAIT, |l| {
            l["level"] == "ERROR" && l["message"].as_str().unwrap_or("").contains("CA directory rejected")
        })
        .unwrap_or_else(|| panic!("no error:\n{}", t.agent(0).dump()));
    assert!(err["message"].as_str().unwrap().contains("ca-key.pem"), "{err}");
    let ready = admin_get(&t, 0, "/healthz/ready");
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("ca-key.pem"),
        "{ready}"
    );
    // A pod added now still gets a certificate, from the previous CA.
    t.add_pod(0, PodSpec::new("e", "mesh"));
    t.write_config();
    t.agent(0)
        .wait_log(WAIT, |l| {
            l["message"] == "workload certificate issued" && l["identity"] == "spiffe://cluster.local/ns/mesh/sa/e"
        })
        .unwrap_or_else(|| panic!("no certificate for e:\n{}", t.agent(0).dump()));
    std::thread::sleep(Duration::from_millis(500));
    let errors = t
        .agent(0)
        .lines()
        .iter()
        .filter(|l| l["message"].as_str().unwrap_or("").contains("CA directory rejected"))
        .count();
    assert_eq!(errors, 1, "the error is logged once");
}

#[test]
fn bad_ca_material_at_startup_is_refused_naming_the_file() {
    let dir = std::env::temp_dir().join(format!("nodeward-badca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let bin = nodeward_bin();
    let init = std::process::Command::new(&bin)
        .args(["ca", "init", "--out"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(init.status.success());
    let printed = String::from_utf8_lossy(&init.stdout);
    for f in [
        "root-cert.pem",
        "root-key.pem",
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
    ] {
        assert!(printed.contains(f), "ca init prints {f}: {printed}");
    }
    assert!(printed.contains("sha256:"), "ca init prints fingerprints: {printed}");
    // Key of another CA.
    let other = dir.with_extension("other");
    let _ = std::fs::remove_dir_all(&other);
    std::process::Command::new(&bin)
        .args(["ca", "init", "--out"])
        .arg(&other)
        .output()
        .unwrap();
    std::fs::copy(other.join("ca-key.pem"), dir.join("ca-key.pem")).unwrap();
    let cfg = std::env::temp_dir();
    let out = std::process::Command::new(&bin)
        .args(["run", "--node-name", "badca", "--config-dir"])
        .arg(&cfg)
        .arg("--ca-dir")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ca-key.pem") && err.contains("does not match"), "{err}");
    // Unreadable.
    let out = std::process::Command::new(&bin)
        .args(["run", "--node-name", "badca", "--config-dir"])
        .arg(&cfg)
        .args(["--ca-dir", "/nonexistent/ca"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/ca/ca-cert.pem"), "{err}");
    let _ = (std::fs::remove_dir_all(&dir), std::fs::remove_dir_all(&other));
}
