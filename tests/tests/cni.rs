//! New pods handed over by the container runtime: the real reference
//! plugins chained with `nodeward-cni`, exec'd as a runtime does. A pod is
//! closed before ADD returns and captured in the namespace the runtime
//! gave, a pod outside the mesh passes untouched, ADD fails while the
//! agent is down, and a DEL of the pod's own sandbox releases it (a DEL of
//! any other, or one the agent cannot match, changes nothing).

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nodeward_testbed::cni::{CniNetwork, CniPod, PLUGIN_DIR, plugin_bin};
use nodeward_testbed::traffic::{self, info_echo, read_greeting, round_trip, serve};
use nodeward_testbed::{PodSpec, Topology, TopologySpec, privileged_or_skip, shared};

const WAIT: Duration = Duration::from_secs(10);
const QUICK: Duration = Duration::from_secs(2);

/// One node with pod `d` (namespace `plain`, outside the mesh) as a client,
/// its agent listening for the plugin; and that node's CNI network.
fn cni_node(test: &str) -> Option<(Topology, CniNetwork, PathBuf)> {
    if !privileged_or_skip(test) {
        return None;
    }
    assert!(
        Path::new(PLUGIN_DIR).join("bridge").exists(),
        "{PLUGIN_DIR}/bridge missing: install containernetworking-plugins (cargo xtask installs it)"
    );
    assert!(
        plugin_bin().exists(),
        "{} missing: cargo build -p nodeward",
        plugin_bin().display()
    );
    let mut t = Topology::build(TopologySpec {
        nodes: vec![vec![PodSpec::new("d", "plain")]],
        namespaces: vec![("mesh".into(), true), ("plain".into(), false)],
    });
    // Hidden, so the directory source ignores it; removed with the topology.
    let socket = t.config_dir.join(".cni.sock");
    t.start_agent(0, &["--cni-socket", socket.to_str().unwrap()]);
    let agent = t.agent(0);
    agent
        .wait_log(WAIT, |l| l["message"] == "CNI hand-off listening")
        .unwrap_or_else(|| panic!("no CNI socket; log:\n{}", agent.dump()));
    let net = CniNetwork::bridge(
        &t.nodes[0].netns,
        &format!("10.{}.99", t.id),
        &socket,
        PathBuf::from(format!("/run/nodeward-testbed/{}.ipam", t.id)),
    );
    Some((t, net, socket))
}

fn pod_yaml(t: &Topology, pod: &CniPod, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\nspec:\n  nodeName: {}\n  serviceAccountName: default\nstatus:\n  phase: Running\n  podIP: \"{ip}\"\n  podIPs:\n  - ip: \"{ip}\"\n",
        pod.name, pod.namespace, pod.uid, t.nodes[0].name
    )
}

/// The first address of the ADD result.
fn address(result: &serde_json::Value) -> String {
    let a = result["ips"][0]["address"].as_str().expect("an address in the result");
    a.split('/').next().unwrap().to_string()
}

#[track_caller]
fn assert_blocked(netns: &str, dst: SocketAddr) {
    match traffic::connect_timeout(netns, dst, QUICK) {
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::TimedOut | ErrorKind::ConnectionReset
            ),
            "{dst}: unexpected error {e}"
        ),
        Ok(s) => {
            let r = read_greeting(&s);
            assert!(r.is_err(), "{dst}: plaintext reached the app: {r:?}");
        }
    }
}

/// The cookie the agent logged capturing `key` in `netns`.
fn captured_cookie(t: &Topology, key: &str, netns: &str) -> u64 {
    let agent = t.agent(0);
    let line = agent
        .wait_log(QUICK, |l| {
            l["message"] == "pod captured" && l["pod"] == key && l["netns"] == netns
        })
        .unwrap_or_else(|| panic!("{key} not captured in {netns}; log:\n{}", agent.dump()));
    line["cookie"].as_u64().expect("cookie")
}

#[test]
fn a_pod_the_config_does_not_know_yet_is_closed_when_add_returns_then_captured_then_released_by_del() {
    let _g = shared();
    let test = "a_pod_the_config_does_not_know_yet_is_closed_when_add_returns_then_captured_then_released_by_del";
    let Some((t, net, _socket)) = cni_node(test) else {
        return;
    };
    let d = t.pod("d").clone();
    let p = CniPod::new(t.id, "p", "mesh");

    let result = net.add(&p).unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    let ip = address(&result);
    let dst: SocketAddr = format!("{ip}:7000").parse().unwrap();
    let _server = serve(&p.netns, dst, info_echo);
    // The config has not caught up with the runtime: the pod is held closed.
    assert_blocked(&d.netns, dst);
    let pinned = t.pin_dir(0).join("pods");
    assert_eq!(
        std::fs::read_dir(&pinned).map(|r| r.count()).unwrap_or(0),
        1,
        "one held namespace"
    );

    // Its config arrives: captured in the namespace the runtime gave, and
    // plaintext from outside the mesh (PERMISSIVE) goes through the agent.
    t.apply("cni-pod", &pod_yaml(&t, &p, &ip));
    let key = format!("mesh/{}", p.name);
    let agent = t.agent(0);
    agent
        .wait_log(WAIT, |l| l["message"] == "pod captured" && l["pod"] == key.as_str())
        .unwrap_or_else(|| panic!("not captured; log:\n{}", agent.dump()));
    let cookie = captured_cookie(&t, &key, &p.netns_path());
    round_trip(&d.netns, dst, b"hello").expect("captured pod reachable through the agent");
    assert!(
        agent.wait_connection("inbound", &dst.to_string(), WAIT).is_some(),
        "the agent did not proxy the connection; log:\n{}",
        agent.dump()
    );

    // DEL (nodeward-cni first, then bridge) releases it at once, though the
    // config still lists the pod.
    net.del(&p, Some(&result))
        .unwrap_or_else(|e| panic!("DEL failed: {e:?}"));
    assert!(
        !pinned.join(cookie.to_string()).exists(),
        "pins of the deleted pod remain; log:\n{}",
        agent.dump()
    );
    assert!(
        agent
            .wait_log(QUICK, |l| l["message"] == "pod released" && l["pod"] == key.as_str())
            .is_some()
    );
    // And the scan does not take it back while the config lags.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!pinned.join(cookie.to_string()).exists(), "re-captured after DEL");
}

#[test]
fn an_enrolled_pod_is_captured_before_add_returns_one_outside_passes_and_add_fails_while_the_agent_is_down() {
    let _g = shared();
    let test =
        "an_enrolled_pod_is_captured_before_add_returns_one_outside_passes_and_add_fails_while_the_agent_is_down";
    let Some((mut t, net, _socket)) = cni_node(test) else {
        return;
    };
    let d = t.pod("d").clone();
    let q = CniPod::new(t.id, "q", "mesh");
    // The config knows the pod (with the address host-local will give) first.
    let ip = format!("10.{}.99.10", t.id);
    t.apply("cni-pod", &pod_yaml(&t, &q, &ip));
    std::thread::sleep(Duration::from_millis(500));

    let result = net.add(&q).unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    assert_eq!(address(&result), ip);
    // Captured by the time ADD returned: no waiting.
    let key = format!("mesh/{}", q.name);
    let cookie = captured_cookie(&t, &key, &q.netns_path());
    assert!(t.pin_dir(0).join("pods").join(cookie.to_string()).exists());
    let dst: SocketAddr = format!("{ip}:7000").parse().unwrap();
    let _server = serve(&q.netns, dst, info_echo);
    round_trip(&d.netns, dst, b"hello").expect("captured pod reachable through the agent");

    // A pod outside the mesh passes at once, untouched.
    let o = CniPod::new(t.id, "o", "plain");
    t.apply("cni-plain", &pod_yaml(&t, &o, &format!("10.{}.99.11", t.id)));
    std::thread::sleep(Duration::from_millis(500));
    let pins = || {
        std::fs::read_dir(t.pin_dir(0).join("pods"))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    let before = pins();
    let plain = net.add(&o).unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    assert_eq!(pins(), before, "a pod outside the mesh got steering");
    let odst: SocketAddr = format!("{}:7000", address(&plain)).parse().unwrap();
    let _oserver = serve(&o.netns, odst, info_echo);
    round_trip(&d.netns, odst, b"plain").expect("pod outside the mesh reachable directly");
    assert!(
        t.agent(0)
            .wait_connection("inbound", &odst.to_string(), QUICK)
            .is_none(),
        "the agent proxied a pod outside the mesh"
    );
    net.del(&o, Some(&plain))
        .unwrap_or_else(|e| panic!("DEL failed: {e:?}"));

    // The agent down: ADD of the next pod fails (the runtime retries), with
    // the spec's "try again later".
    t.agent_mut(0).kill();
    let r = CniPod::new(t.id, "r", "mesh");
    let err = net.add(&r).expect_err("ADD must fail while the agent is down");
    assert_eq!(err.plugin, "nodeward-cni");
    assert_eq!(err.error["code"], 11, "{err:?}");
    assert!(
        err.error["msg"]
            .as_str()
            .unwrap_or_default()
            .contains("must not start uncaptured"),
        "{err:?}"
    );
    // The runtime then tears the sandbox down; DEL succeeds without the agent.
    net.del(&r, None).unwrap_or_else(|e| panic!("DEL failed: {e:?}"));
    net.del(&q, Some(&result))
        .unwrap_or_else(|e| panic!("DEL failed: {e:?}"));
}

/// Mesh-wide STRICT: plaintext from outside the mesh never reaches a captured pod.
const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec:\n  mtls: {mode: STRICT}\n";

/// A DEL the runtime sends for `pod` as the sandbox `container_id` in the
/// namespace `netns` (one that may exist or not): the pod's name and uid,
/// another sandbox. Its namespace is not deleted when dropped.
fn sandbox_of(pod: &CniPod, container_id: &str, netns: &str) -> std::mem::ManuallyDrop<CniPod> {
    std::mem::ManuallyDrop::new(CniPod {
        netns: netns.into(),
        container_id: container_id.into(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        uid: pod.uid.clone(),
    })
}

#[test]
fn a_del_of_another_sandbox_or_one_the_agent_cannot_match_leaves_the_pod_strict_and_a_del_of_its_own_releases_it() {
    let _g = shared();
    let test =
        "a_del_of_another_sandbox_or_one_the_agent_cannot_match_leaves_the_pod_strict_and_a_del_of_its_own_releases_it";
    let Some((mut t, net, socket)) = cni_node(test) else {
        return;
    };
    let d = t.pod("d").clone();
    t.apply("strict", STRICT);
    let (q, r) = (CniPod::new(t.id, "q", "mesh"), CniPod::new(t.id, "r", "mesh"));
    let (ipq, ipr) = (format!("10.{}.99.10", t.id), format!("10.{}.99.11", t.id));
    t.apply("cni-q", &pod_yaml(&t, &q, &ipq));
    t.apply("cni-r", &pod_yaml(&t, &r, &ipr));
    let agent = t.agent(0);
    agent
        .wait_log(WAIT, |l| {
            l["message"] == "config applied" && l["pods"].as_u64().is_some_and(|n| n >= 3)
        })
        .unwrap_or_else(|| panic!("config not applied; log:\n{}", agent.dump()));
    let added_q = net.add(&q).unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    let added_r = net.add(&r).unwrap_or_else(|e| panic!("ADD failed: {e:?}"));
    assert_eq!((address(&added_q), address(&added_r)), (ipq.clone(), ipr.clone()));
    let (keyq, keyr) = ("mesh/q".to_string(), "mesh/r".to_string());
    let cookie_q = captured_cookie(&t, &keyq, &q.netns_path());
    let cookie_r = captured_cookie(&t, &keyr, &r.netns_path());
    let dst: SocketAddr = format!("{ipq}:7000").parse().unwrap();
    let _server = serve(&q.netns, dst, info_echo);
    let pins = t.pin_dir(0).join("pods");
    let strict_holds = |t: &Topology, after: &str| {
        assert!(
            pins.join(cookie_q.to_string()).exists(),
            "{after}: the live pod lost its capture; log:\n{}",
            t.agent(0).dump()
        );
        assert_blocked(&d.netns, dst);
    };
    strict_holds(&t, "ADD");

    // DELs of sandboxes of the pod that are not the one it runs in: an
    // older one whose namespace is gone, a failed one whose namespace is
    // still there, each sent twice (runtimes repeat DELs).
    let gone = sandbox_of(&q, "sandbox-q-older", &format!("nwt{}-cni-q-gone", t.id));
    let failed_ns = CniPod::new(t.id, "q-failed", "mesh");
    let failed = sandbox_of(&q, "sandbox-q-failed", &failed_ns.netns);
    for round in ["", " again"] {
        net.del(&gone, None).unwrap_or_else(|e| panic!("DEL failed: {e:?}"));
        strict_holds(&t, &format!("DEL of an older sandbox{round}"));
        net.del(&failed, None).unwrap_or_else(|e| panic!("DEL failed: {e:?}"));
        strict_holds(&t, &format!("DEL of a failed sandbox{round}"));
    }

    // The agent restarts: it holds no ADD record any more, only the pins.
    t.agent_mut(0).kill();
    t.start_agent(0, &["--cni-socket", socket.to_str().unwrap()]);
    for key in [&keyq, &keyr] {
        let agent = t.agent(0);
        agent
            .wait_log(WAIT, |l| l["message"] == "pod captured" && l["pod"] == key.as_str())
            .unwrap_or_else(|| panic!("{key} not re-adopted; log:\n{}", agent.dump()));
    }
    strict_holds(&t, "the restart");
    for round in ["", " again"] {
        net.del(&gone, None).unwrap_or_else(|e| panic!("DEL failed: {e:?}"));
        strict_holds(&t, &format!("DEL of an older sandbox after the restart{round}"));
        net.del(&failed, None).unwrap_or_else(|e| panic!("DEL failed: {e:?}"));
        strict_holds(&t, &format!("DEL of a failed sandbox after the restart{round}"));
    }

    // The runtime removed r's namespace file before its DEL: the sandbox id
    // the pins recorded still names it, and it is released.
    nodeward_testbed::netns::sh(&["ip", "netns", "del", &r.netns]);
    net.del(&r, Some(&added_r))
        .unwrap_or_else(|e| panic!("DEL failed: {e:?}"));
    assert!(
        !pins.join(cookie_r.to_string()).exists(),
        "a DEL of r's own sandbox did not release it; log:\n{}",
        t.agent(0).dump()
    );
    strict_holds(&t, "r's DEL");

    // A DEL of q's own sandbox releases it at once, though the config
    // still lists q, and the scan does not take that namespace back.
    net.del(&q, Some(&added_q))
        .unwrap_or_else(|e| panic!("DEL failed: {e:?}"));
    assert!(
        !pins.join(cookie_q.to_string()).exists(),
        "a DEL of q's own sandbox did not release it; log:\n{}",
        t.agent(0).dump()
    );
    // q lives on in the config, but its address is free: IPAM may give it
    // to another pod whose ADD is still on its way. A namespace holding it
    // is not q's for that: no scan takes it for q ...
    let other = t.add_decoy("q-ip-reused", &[ipq.parse().unwrap()]);
    nodeward_testbed::netns::sh(&["ip", "-n", &other, "link", "set", "lo", "up"]);
    let other_path = nodeward_testbed::netns::path(&other);
    // (several namespace scans, 500 ms apart, would have run by now)
    std::thread::sleep(nodeward_testbed::patience(Duration::from_secs(3)));
    let agent = t.agent(0);
    assert!(
        !agent
            .lines()
            .iter()
            .any(|l| l["message"] == "pod captured" && l["netns"] == other_path.as_str()),
        "after q's DEL, a namespace holding its freed address was captured as q; log:\n{}",
        agent.dump()
    );
    // ... until the runtime's ADD of q's next sandbox names one.
    let next_ns = CniPod::new(t.id, "q-next", "mesh");
    let next = sandbox_of(&q, "sandbox-q-next", &next_ns.netns);
    net.add(&next)
        .unwrap_or_else(|e| panic!("ADD of q's next sandbox failed: {e:?}"));
    let next_path = next.netns_path();
    agent
        .wait_log(WAIT, |l| {
            l["message"] == "pod captured" && l["pod"] == keyq.as_str() && l["netns"] == next_path.as_str()
        })
        .unwrap_or_else(|| panic!("q's next sandbox not captured; log:\n{}", agent.dump()));
    let in_deleted = agent
        .lines()
        .iter()
        .filter(|l| l["message"] == "pod captured" && l["cookie"] == cookie_q)
        .count();
    assert_eq!(
        in_deleted,
        1,
        "q's deleted namespace was captured again after its re-adoption; log:\n{}",
        agent.dump()
    );
}
