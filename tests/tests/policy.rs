//! mTLS modes and L4 authorization on the two-node topology, from the same
//! PeerAuthentication and AuthorizationPolicy YAML operators write for Istio.

use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nodeward_testbed::traffic::{self, info_echo, read_greeting, round_trip, serve};
use nodeward_testbed::{PodSpec, Topology, TopologySpec, privileged_or_skip, shared};

const WAIT: Duration = Duration::from_secs(10);

/// node 1: frontend, other; node 2: api, frontend2 (sa frontend), other2
/// (sa other); namespace `plain` (not enrolled): outsider on node 2.
fn cluster(test: &str) -> Option<Topology> {
    if !privileged_or_skip(test) {
        return None;
    }
    let sa = |name: &str, sa: &str| {
        let mut p = PodSpec::new(name, "mesh").label("app", name);
        p.service_account = sa.into();
        p
    };
    let spec = TopologySpec {
        nodes: vec![
            vec![sa("frontend", "frontend"), sa("other", "other")],
            vec![
                sa("api", "api"),
                sa("frontend2", "frontend"),
                sa("other2", "other"),
                PodSpec::new("outsider", "plain"),
            ],
        ],
        namespaces: vec![("mesh".into(), true), ("plain".into(), false)],
    };
    let mut t = Topology::build(spec);
    t.start_agents();
    Some(t)
}

/// Whether a connection gets through to the app (its greeting arrives).
fn reaches(t: &Topology, from: &str, dst: SocketAddr) -> bool {
    traffic::connect_timeout(&t.pod(from).netns, dst, Duration::from_secs(3))
        .and_then(|s| read_greeting(&s))
        .is_ok()
}

/// Waits until `from -> dst` reaches (or stops reaching) the app: policy
/// applies within one config poll of the file changing.
fn eventually(t: &Topology, from: &str, dst: SocketAddr, want: bool) {
    // Under emulation (the VM runs) the agent applies a change many times slower.
    let deadline = Instant::now() + nodeward_testbed::patience(Duration::from_secs(2));
    while reaches(t, from, dst) != want {
        assert!(Instant::now() < deadline, "{from} -> {dst}: expected reach={want}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The first refusal may be a connection accepted just before the change
    // and then closed by it; one more is decided by the new policy alone,
    // so its refusal is the one logged.
    if !want {
        assert!(!reaches(t, from, dst), "{from} -> {dst}: reached again");
    }
}

const ONLY_FRONTEND: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-from-frontend, namespace: mesh}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/mesh/sa/frontend]}
";

#[test]
fn only_frontend_may_call_api_on_the_same_node_and_across() {
    let _g = shared();
    let Some(t) = cluster("only_frontend_may_call_api_on_the_same_node_and_across") else {
        return;
    };
    let api = t.pod("api").clone();
    let _s = serve(&api.netns, api.v4(8080), info_echo);
    assert!(reaches(&t, "other", api.v4(8080)), "no policy yet: allowed");
    t.apply("authz", ONLY_FRONTEND);
    eventually(&t, "other", api.v4(8080), false);
    assert!(reaches(&t, "frontend", api.v4(8080)), "frontend across nodes");
    assert!(reaches(&t, "frontend2", api.v4(8080)), "frontend on the same node");
    assert!(!reaches(&t, "other2", api.v4(8080)), "another service on the same node");
    assert!(!reaches(&t, "outsider", api.v4(8080)), "plaintext has no principal");
    let l = t
        .agent(1)
        .wait_log(WAIT, |l| {
            l["reason"] == "policy_denied" && l["peer_identity"] == "spiffe://cluster.local/ns/mesh/sa/other"
        })
        .unwrap_or_else(|| panic!("no denial logged:\n{}", t.agent(1).dump()));
    assert_eq!(l["refusal"], "no_allow_match");
}

fn pa(name: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: mesh}}\nspec:\n{body}"
    )
}

#[test]
fn strict_refuses_plaintext_permissive_accepts_it_and_port_levels_apply_each_to_their_port() {
    let _g = shared();
    let Some(t) = cluster("strict_refuses_plaintext_permissive_accepts_it_and_port_levels_apply_each_to_their_port")
    else {
        return;
    };
    let api = t.pod("api").clone();
    let _s: Vec<_> = [8080, 9090, 9091]
        .iter()
        .map(|p| serve(&api.netns, api.v4(*p), info_echo))
        .collect();
    // PERMISSIVE (the default): a client outside the mesh gets through.
    assert!(reaches(&t, "outsider", api.v4(8080)));
    t.apply("pa", &pa("default", "  mtls: {mode: STRICT}\n"));
    eventually(&t, "outsider", api.v4(8080), false);
    assert!(
        reaches(&t, "frontend", api.v4(8080)),
        "HBONE is still accepted under STRICT"
    );
    t.agent(1)
        .wait_log(WAIT, |l| l["reason"] == "mtls_strict")
        .unwrap_or_else(|| panic!("STRICT refusal not logged:\n{}", t.agent(1).dump()));

    // Port-level PERMISSIVE on two ports of api, under the STRICT namespace.
    let ports = format!(
        "{}---\n{}",
        pa("default", "  mtls: {mode: STRICT}\n"),
        pa(
            "api-ports",
            "  selector: {matchLabels: {app: api}}\n  portLevelMtls:\n    9090: {mode: PERMISSIVE}\n    9091: {mode: PERMISSIVE}\n"
        )
    );
    t.apply("pa", &ports);
    eventually(&t, "outsider", api.v4(9090), true);
    assert!(
        reaches(&t, "outsider", api.v4(9091)),
        "the second port-level entry applies to its own port"
    );
    assert!(!reaches(&t, "outsider", api.v4(8080)), "other ports stay STRICT");

    t.apply("pa", &pa("default", "  mtls: {mode: PERMISSIVE}\n"));
    eventually(&t, "outsider", api.v4(8080), true);
}

#[test]
fn strict_still_refuses_plaintext_with_the_agent_killed() {
    let _g = shared();
    let Some(mut t) = cluster("strict_still_refuses_plaintext_with_the_agent_killed") else {
        return;
    };
    let api = t.pod("api").clone();
    let _s = serve(&api.netns, api.v4(8080), info_echo);
    t.apply("pa", &pa("default", "  mtls: {mode: STRICT}\n"));
    eventually(&t, "outsider", api.v4(8080), false);
    t.agent_mut(1).kill();
    assert!(!reaches(&t, "outsider", api.v4(8080)));
}

/// `--ebpf-log`: the programs record the fail-closed drops they make while
/// the agent is down, and the agent logs them when it is back; without the
/// flag they record nothing.
#[test]
fn with_ebpf_log_the_drops_made_while_the_agent_was_down_are_logged_when_it_is_back() {
    let _g = shared();
    let Some(mut t) = cluster("with_ebpf_log_the_drops_made_while_the_agent_was_down_are_logged_when_it_is_back")
    else {
        return;
    };
    let api = t.pod("api").clone();
    let outsider = t.pod("outsider").clone();
    let _s = serve(&api.netns, api.v4(8080), info_echo);
    let dropped = |line: &serde_json::Value| {
        line["target"] == "nodeward::ebpf"
            && line["program"] == "nodeward_ebpf::sk_lookup"
            && line["message"].as_str().is_some_and(|m| {
                m.starts_with("fail closed: dropped a TCP connection")
                    && m.contains(&format!("from {} to port 8080", outsider.ip4))
            })
    };
    // Off (whatever the environment says): the pod's steering is loaded
    // with logging off, so its drops while the agent is down leave nothing.
    t.agent_mut(1).kill();
    t.start_agent_env(1, &[], &[("NODEWARD_EBPF_LOG", "false")]);
    t.wait_captured(1);
    t.agent_mut(1).kill();
    assert!(!reaches(&t, "outsider", api.v4(8080)), "no agent: dropped");
    t.start_agent(1, &["--ebpf-log"]);
    t.wait_captured(1);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !t.agent(1).lines().iter().any(dropped),
        "recorded with --ebpf-log off:\n{}",
        t.agent(1).dump()
    );
    // On: the agent that just started reloaded the steering with logging
    // on; killed, its drops are recorded and read by the next agent.
    t.agent_mut(1).kill();
    assert!(!reaches(&t, "outsider", api.v4(8080)), "no agent: dropped");
    t.start_agent(1, &["--ebpf-log"]);
    let line = t.agent(1).wait_log(WAIT, dropped).unwrap_or_else(|| {
        panic!(
            "the drop while the agent was down is not logged:\n{}",
            t.agent(1).dump()
        )
    });
    assert_eq!(line["level"], "WARN", "{line}");
    t.wait_captured(1);
    assert!(reaches(&t, "outsider", api.v4(8080)), "the agent is back");
}

#[test]
fn disable_accepts_plaintext_through_the_agent_and_peers_send_plaintext() {
    let _g = shared();
    let Some(t) = cluster("disable_accepts_plaintext_through_the_agent_and_peers_send_plaintext") else {
        return;
    };
    let api = t.pod("api").clone();
    let _s = serve(&api.netns, api.v4(8080), info_echo);
    t.apply(
        "pa",
        &pa(
            "api-off",
            "  selector: {matchLabels: {app: api}}\n  mtls: {mode: DISABLE}\n",
        ),
    );
    t.agent(0)
        .wait_log(WAIT, |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("mTLS DISABLE in force"))
        })
        .expect("DISABLE is logged");
    std::thread::sleep(Duration::from_millis(500));
    let (seen, _, _) = round_trip(&t.pod("frontend").netns, api.v4(8080), b"plain").unwrap();
    assert_eq!(seen.peer.ip(), t.pod("frontend").v4(0).ip());
    let l = t
        .agent(0)
        .wait_connection("outbound", &api.v4(8080).to_string(), WAIT)
        .unwrap();
    assert_eq!(
        l["transport"], "passthrough",
        "peers of a DISABLE workload send plaintext"
    );
    // Plaintext from outside the mesh is accepted, through the agent (which
    // authorizes it), and the app sees the real client.
    let outsider = t.pod("outsider").clone();
    let (seen, _, _) = round_trip(&outsider.netns, api.v4(8080), b"x").unwrap();
    assert_eq!(seen.peer.ip(), outsider.v4(0).ip());
    let l = t
        .agent(1)
        .wait_log(WAIT, |l| {
            l["message"] == "connection closed"
                && l["direction"] == "inbound"
                && l["src"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{}:", outsider.ip4)))
        })
        .unwrap_or_else(|| {
            panic!(
                "inbound to a DISABLE workload goes through the agent:\n{}",
                t.agent(1).dump()
            )
        });
    assert_eq!(l["pod"], "mesh/api");
    assert_eq!(l["transport"], "plaintext");
}

#[test]
fn a_mesh_wide_deny_applies_to_a_disable_port_and_the_agent_down_refuses_it() {
    let _g = shared();
    let Some(mut t) = cluster("a_mesh_wide_deny_applies_to_a_disable_port_and_the_agent_down_refuses_it") else {
        return;
    };
    let api = t.pod("api").clone();
    let _s: Vec<_> = [8080, 9090]
        .iter()
        .map(|p| serve(&api.netns, api.v4(*p), info_echo))
        .collect();
    t.apply(
        "pa",
        &pa(
            "api-ports",
            "  selector: {matchLabels: {app: api}}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    9090: {mode: DISABLE}\n",
        ),
    );
    // No policy denies it: the DISABLE port accepts plaintext while the
    // others are STRICT.
    eventually(&t, "outsider", api.v4(8080), false);
    assert!(
        reaches(&t, "outsider", api.v4(9090)),
        "the DISABLE port accepts plaintext"
    );

    // A DENY in the root namespace applies to every workload, DISABLE ports
    // included: DISABLE only lifts the mTLS requirement.
    let outsider = t.pod("outsider").ip4;
    t.apply(
        "deny",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-outsider, namespace: istio-system}}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {{ipBlocks: ['{outsider}/32']}}\n"
        ),
    );
    eventually(&t, "outsider", api.v4(9090), false);
    let l = t
        .agent(1)
        .wait_log(WAIT, |l| {
            l["reason"] == "policy_denied" && l["dst"] == api.v4(9090).to_string().as_str()
        })
        .unwrap_or_else(|| panic!("the denial is not logged:\n{}", t.agent(1).dump()));
    assert_eq!(l["policy"], "istio-system/no-outsider");
    assert!(
        reaches(&t, "frontend", api.v4(9090)),
        "others still reach the DISABLE port"
    );
    t.unapply("deny");
    eventually(&t, "outsider", api.v4(9090), true);

    // With the agent down nothing checks policy, so a DISABLE port is
    // refused like the others: fail closed.
    t.agent_mut(1).kill();
    assert!(!reaches(&t, "outsider", api.v4(9090)));
}

#[test]
fn a_deny_on_a_port_and_a_policy_edit_closes_live_connections() {
    let _g = shared();
    let Some(t) = cluster("a_deny_on_a_port_and_a_policy_edit_closes_live_connections") else {
        return;
    };
    let api = t.pod("api").clone();
    let _s: Vec<_> = [8080, 9090]
        .iter()
        .map(|p| serve(&api.netns, api.v4(*p), info_echo))
        .collect();
    let mut live = traffic::connect(&t.pod("frontend").netns, api.v4(8080)).unwrap();
    read_greeting(&live).unwrap();
    let applied = Instant::now();
    t.apply(
        "deny",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-8080, namespace: mesh}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules:
  - to:
    - operation: {ports: ['8080']}
",
    );
    live.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut b = [0u8; 1];
    let r = live.read(&mut b);
    assert!(matches!(r, Ok(0) | Err(_)), "the live connection is closed: {r:?}");
    assert!(
        applied.elapsed() < Duration::from_millis(1500),
        "closed after {:?}",
        applied.elapsed()
    );
    assert!(
        !reaches(&t, "frontend", api.v4(8080)),
        "new connections to 8080 are denied"
    );
    assert!(reaches(&t, "frontend", api.v4(9090)), "other ports are unaffected");
    t.agent(1)
        .wait_log(WAIT, |l| l["reason"] == "policy_changed")
        .expect("logged as a policy change");
}

#[test]
fn invalid_policies_are_reported_by_name_and_field_and_fail_safe() {
    let _g = shared();
    let Some(t) = cluster("invalid_policies_are_reported_by_name_and_field_and_fail_safe") else {
        return;
    };
    let api = t.pod("api").clone();
    let _s = serve(&api.netns, api.v4(8080), info_echo);
    // A broken DENY selecting api fails closed for api only.
    t.apply(
        "broken",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: broken-deny, namespace: mesh}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/99]}
",
    );
    let l = t
        .agent(1)
        .wait_log(WAIT, |l| l["policy"] == "mesh/broken-deny" && l["level"] == "ERROR")
        .unwrap_or_else(|| panic!("not reported:\n{}", t.agent(1).dump()));
    assert!(
        l["message"]
            .as_str()
            .unwrap()
            .contains("spec.rules[0].from[0].source.ipBlocks"),
        "{l}"
    );
    eventually(&t, "frontend", api.v4(8080), false);
    let other = t.pod("other2").clone();
    let _s2 = serve(&other.netns, other.v4(8080), info_echo);
    assert!(
        reaches(&t, "frontend", other.v4(8080)),
        "the rest of the configuration keeps working"
    );
}

/// Waits for agent `k`'s ERROR naming `policy`, and checks that its message
/// names the field path of the problem.
fn invalid_policy_reported(t: &Topology, k: usize, policy: &str, field: &str) {
    let l = t
        .agent(k)
        .wait_log(WAIT, |l| l["policy"] == policy && l["level"] == "ERROR")
        .unwrap_or_else(|| panic!("{policy} not reported as invalid:\n{}", t.agent(k).dump()));
    let m = l["message"].as_str().unwrap_or("");
    assert!(m.contains(policy) && m.contains(field), "{l}");
}

#[test]
fn an_allow_with_a_typo_in_a_field_name_refuses_every_client_of_the_pods_it_selects() {
    let _g = shared();
    let Some(t) = cluster("an_allow_with_a_typo_in_a_field_name_refuses_every_client_of_the_pods_it_selects") else {
        return;
    };
    let api = t.pod("api").clone();
    let _s = serve(&api.netns, api.v4(8080), info_echo);
    assert!(
        reaches(&t, "frontend", api.v4(8080)),
        "no policy yet: mesh client allowed"
    );
    assert!(
        reaches(&t, "outsider", api.v4(8080)),
        "no policy yet: plaintext allowed"
    );
    // `port` for `ports`: read leniently, the operation would have no port
    // condition and the ALLOW would match every connection.
    t.apply(
        "typo",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-typo, namespace: mesh}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - to: [{operation: {port: ['8080']}}]
",
    );
    eventually(&t, "frontend", api.v4(8080), false);
    assert!(!reaches(&t, "outsider", api.v4(8080)), "plaintext client refused too");
    invalid_policy_reported(&t, 1, "mesh/api-typo", "spec.rules[0].to[0].operation.port");
    let l = t
        .agent(1)
        .wait_log(WAIT, |l| {
            l["reason"] == "policy_denied" && l["peer_identity"] == "spiffe://cluster.local/ns/mesh/sa/frontend"
        })
        .unwrap_or_else(|| panic!("the mesh client's refusal is not logged:\n{}", t.agent(1).dump()));
    assert_eq!(l["refusal"], "no_allow_match");
}

#[test]
fn a_deny_whose_from_is_not_a_list_denies_everything_it_selects() {
    let _g = shared();
    let Some(t) = cluster("a_deny_whose_from_is_not_a_list_denies_everything_it_selects") else {
        return;
    };
    let api = t.pod("api").clone();
    let _s = serve(&api.netns, api.v4(8080), info_echo);
    let other = t.pod("other2").clone();
    let _s2 = serve(&other.netns, other.v4(8080), info_echo);
    assert!(reaches(&t, "frontend", api.v4(8080)), "no policy yet: allowed");
    // Meant for `other` alone; `from` is a mapping where a list belongs.
    t.apply(
        "deny",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-other, namespace: mesh}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules:
  - from: {source: {principals: [cluster.local/ns/mesh/sa/other]}}
",
    );
    eventually(&t, "frontend", api.v4(8080), false);
    assert!(!reaches(&t, "outsider", api.v4(8080)), "plaintext is denied too");
    invalid_policy_reported(&t, 1, "mesh/no-other", "spec.rules[0].from");
    let l = t
        .agent(1)
        .wait_log(WAIT, |l| {
            l["reason"] == "policy_denied" && l["peer_identity"] == "spiffe://cluster.local/ns/mesh/sa/frontend"
        })
        .unwrap_or_else(|| panic!("the denial is not logged:\n{}", t.agent(1).dump()));
    assert_eq!(l["refusal"], "invalid_deny_policy");
    assert_eq!(l["policy"], "mesh/no-other");
    assert!(
        reaches(&t, "frontend", other.v4(8080)),
        "workloads it does not select are unaffected"
    );
}

#[test]
fn a_peer_authentication_with_mtls_strict_as_a_scalar_counts_as_strict() {
    let _g = shared();
    let Some(t) = cluster("a_peer_authentication_with_mtls_strict_as_a_scalar_counts_as_strict") else {
        return;
    };
    let api = t.pod("api").clone();
    let _s = serve(&api.netns, api.v4(8080), info_echo);
    assert!(reaches(&t, "outsider", api.v4(8080)), "PERMISSIVE by default");
    // `mtls: STRICT` where Istio wants `mtls: {mode: STRICT}`.
    t.apply("pa", &pa("default", "  mtls: STRICT\n"));
    eventually(&t, "outsider", api.v4(8080), false);
    assert!(reaches(&t, "frontend", api.v4(8080)), "mesh traffic is still accepted");
    invalid_policy_reported(&t, 1, "mesh/default", "spec.mtls");
    t.agent(1)
        .wait_log(WAIT, |l| l["reason"] == "mtls_strict")
        .unwrap_or_else(|| panic!("STRICT refusal not logged:\n{}", t.agent(1).dump()));
}

#[test]
fn a_dry_run_deny_does_not_deny_and_logs_what_it_would_have_done() {
    let _g = shared();
    let Some(t) = cluster("a_dry_run_deny_does_not_deny_and_logs_what_it_would_have_done") else {
        return;
    };
    let api = t.pod("api").clone();
    let _s = serve(&api.netns, api.v4(8080), info_echo);
    // A dry-run DENY of frontend, and an enforced DENY of other that shows
    // when the file is in force.
    t.apply(
        "dry",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: dry-deny
  namespace: mesh
  annotations: {istio.io/dry-run: 'true'}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules:
  - from:
    - source: {principals: [cluster.local/ns/mesh/sa/frontend]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-other, namespace: mesh}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules:
  - from:
    - source: {principals: [cluster.local/ns/mesh/sa/other]}
",
    );
    eventually(&t, "other", api.v4(8080), false);
    assert!(reaches(&t, "frontend", api.v4(8080)), "a dry-run DENY does not deny");
    let l = t
        .agent(1)
        .wait_log(WAIT, |l| {
            l["message"] == "dry-run" && l["principal"] == "cluster.local/ns/mesh/sa/frontend"
        })
        .unwrap_or_else(|| panic!("no audit line:\n{}", t.agent(1).dump()));
    assert_eq!(l["target"], "nodeward::audit");
    assert_eq!(l["policy"], "mesh/dry-deny");
    assert_eq!(l["would"], "deny", "what enforcing it would have done");
    assert_eq!(l["allowed"], true, "what was done");
    let l = t
        .agent(1)
        .wait_log(WAIT, |l| {
            l["message"] == "dry-run" && l["principal"] == "cluster.local/ns/mesh/sa/other"
        })
        .unwrap_or_else(|| panic!("no audit line for other:\n{}", t.agent(1).dump()));
    assert_eq!(l["would"], "no_match");
    assert_eq!(l["allowed"], false, "other was denied by the enforced policy");
}

/// Mesh-wide STRICT (the root namespace) in the same file as a Pod the
/// agent rejects (its IP is no address), there from the agent's start.
const STRICT_BESIDE_AN_INVALID_POD: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
---
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: mesh, uid: broken-uid}
spec: {nodeName: elsewhere}
status: {phase: Running, podIP: 10.0.0.300}
";

#[test]
fn a_mesh_wide_strict_beside_an_invalid_pod_in_the_same_file_is_enforced_from_the_start() {
    let _g = shared();
    let test = "a_mesh_wide_strict_beside_an_invalid_pod_in_the_same_file_is_enforced_from_the_start";
    if !privileged_or_skip(test) {
        return;
    }
    let mut t = Topology::build(TopologySpec {
        nodes: vec![vec![
            PodSpec::new("a", "mesh"),
            PodSpec::new("c", "mesh"),
            PodSpec::new("d", "plain"),
        ]],
        namespaces: vec![("mesh".into(), true), ("plain".into(), false)],
    });
    t.apply("mesh-policy", STRICT_BESIDE_AN_INVALID_POD);
    t.start_agents();
    let agent = t.agent(0);
    let a = t.pod("a").clone();
    let _s = serve(&a.netns, a.v4(7000), info_echo);
    round_trip(&t.pod("c").netns, a.v4(7000), b"meshed").expect("mTLS from a mesh pod");
    assert!(
        !reaches(&t, "d", a.v4(7000)),
        "plaintext from outside the mesh reached a pod under mesh-wide STRICT; log:\n{}",
        agent.dump()
    );
    assert!(
        !reaches(&t, "d", a.v6(7000)),
        "plaintext reached a STRICT pod over IPv6"
    );
    // The invalid document is reported, by file and object.
    agent
        .wait_log(WAIT, |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("mesh-policy.yaml: document 2") && m.contains("mesh/broken"))
        })
        .unwrap_or_else(|| panic!("the invalid pod is not reported; log:\n{}", agent.dump()));
}
