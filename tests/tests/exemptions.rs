//! The one inbound exemption for the node: connections the node itself
//! opens to its pods (kubelet probes) come from the probe source and reach
//! the app; traffic the node merely forwards from its own addresses
//! (NodePort / LoadBalancer SNAT) is plaintext like any other.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use nodeward_testbed::netns::sh;
use nodeward_testbed::traffic::{self, info_echo, read_greeting, round_trip, serve};
use nodeward_testbed::{PodSpec, Topology, TopologySpec, privileged_or_skip, shared};

const WAIT: Duration = Duration::from_secs(10);
const PROBE_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
const PROBE_V6: Ipv6Addr = Ipv6Addr::new(0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff);
const NODE_PORT: u16 = 30080;

/// node 1: `a` (mesh), `e` (not enrolled); node 2: `c` (mesh), `d` (not enrolled).
fn cluster(test: &str) -> Option<Topology> {
    if !privileged_or_skip(test) {
        return None;
    }
    let spec = TopologySpec {
        nodes: vec![
            vec![PodSpec::new("a", "mesh"), PodSpec::new("e", "plain")],
            vec![PodSpec::new("c", "mesh"), PodSpec::new("d", "plain")],
        ],
        namespaces: vec![("mesh".into(), true), ("plain".into(), false)],
    };
    let mut t = Topology::build(spec);
    t.start_agents();
    Some(t)
}

/// Node `k`'s address towards the other nodes.
fn node_address(t: &Topology, k: usize) -> Ipv4Addr {
    format!("10.{}.0.{}", t.id, k + 1).parse().unwrap()
}

/// What kube-proxy does for a NodePort with `externalTrafficPolicy:
/// Cluster`: node 2's `NODE_PORT` is DNATed to `c:8080`, and the DNATed
/// connections are masqueraded, so `c` sees node 2's bridge address.
fn node_port_to_c(t: &Topology) {
    let node = &t.nodes[1].netns;
    let node_port = SocketAddr::new(node_address(t, 1).into(), NODE_PORT);
    nodeward_testbed::kube_proxy::dnat(node, node_port, t.pod("c").v4(8080), &["PREROUTING"]);
    nodeward_testbed::kube_proxy::masquerade_dnat(node);
}

/// Whether a connection from `netns` gets through to the app (its greeting arrives).
fn reaches(netns: &str, dst: SocketAddr) -> Result<traffic::Seen, String> {
    traffic::connect_timeout(netns, dst, Duration::from_secs(3))
        .and_then(|s| read_greeting(&s))
        .map_err(|e| e.to_string())
}

/// Waits until `netns -> dst` reaches (or stops reaching) the app: policy
/// applies within one config poll of the file changing.
fn eventually(netns: &str, dst: SocketAddr, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while reaches(netns, dst).is_ok() != want {
        assert!(Instant::now() < deadline, "{netns} -> {dst}: expected reach={want}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The first refusal may be a connection accepted just before the change
    // and then closed by it; one more is decided by the new policy alone,
    // so its refusal is the one logged.
    if !want {
        assert!(reaches(netns, dst).is_err(), "{netns} -> {dst}: reached again");
    }
}

fn strict_mesh_wide() -> &'static str {
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec:\n  mtls: {mode: STRICT}\n"
}

#[test]
fn node_port_traffic_masqueraded_to_the_node_address_is_plaintext_like_any_other() {
    let _g = shared();
    let Some(t) = cluster("node_port_traffic_masqueraded_to_the_node_address_is_plaintext_like_any_other") else {
        return;
    };
    let c = t.pod("c").clone();
    let e = t.pod("e").netns.clone();
    let _s = serve(&c.netns, c.v4(8080), info_echo);
    node_port_to_c(&t);
    let node_port = SocketAddr::new(IpAddr::V4(node_address(&t, 1)), NODE_PORT);
    let masqueraded = IpAddr::V4(t.nodes[1].gateway4);

    // PERMISSIVE (the default): the forwarded connection reaches the app
    // through the agent, which logs it and can authorize it.
    let seen = reaches(&e, node_port).expect("PERMISSIVE accepts NodePort plaintext");
    assert_eq!(seen.peer.ip(), masqueraded, "the app sees the masqueraded source");
    let l = t
        .agent(1)
        .wait_connection("inbound", &c.v4(8080).to_string(), WAIT)
        .unwrap_or_else(|| panic!("the NodePort connection is not captured:\n{}", t.agent(1).dump()));
    assert_eq!(l["pod"], "mesh/c");

    // ... so a DENY naming the node's address applies to it.
    t.apply(
        "deny-node",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-node, namespace: mesh}}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {{ipBlocks: ['{masqueraded}/32']}}\n"
        ),
    );
    eventually(&e, node_port, false);
    t.agent(1)
        .wait_log(WAIT, |l| l["reason"] == "policy_denied")
        .unwrap_or_else(|| panic!("the denial is not logged:\n{}", t.agent(1).dump()));
    t.unapply("deny-node");
    eventually(&e, node_port, true);

    // STRICT: the node's address is no probe source, so plaintext forwarded
    // from it is refused ...
    t.apply("strict", strict_mesh_wide());
    eventually(&e, node_port, false);
    t.agent(1)
        .wait_log(WAIT, |l| l["reason"] == "mtls_strict")
        .unwrap_or_else(|| panic!("the STRICT refusal is not logged:\n{}", t.agent(1).dump()));
    // ... while the node's own probe still gets through, from the probe source.
    let (seen, _, _) = round_trip(&t.nodes[1].netns, c.v4(8080), b"GET /healthz").expect("probe under STRICT");
    assert_eq!(seen.peer.ip(), IpAddr::V4(PROBE_V4));
}

#[test]
fn probes_from_the_node_reach_a_strict_pod_from_the_probe_source() {
    let _g = shared();
    let Some(t) = cluster("probes_from_the_node_reach_a_strict_pod_from_the_probe_source") else {
        return;
    };
    let c = t.pod("c").clone();
    let node = t.nodes[1].netns.clone();
    let _s4 = serve(&c.netns, c.v4(8080), info_echo);
    let _s6 = serve(&c.netns, c.v6(8086), info_echo);
    t.apply("strict", strict_mesh_wide());
    eventually(&t.pod("d").netns, c.v4(8080), false);

    let mapped: SocketAddr = format!("[::ffff:{}]:8080", c.ip4).parse().unwrap();
    for (dst, source) in [
        (c.v4(8080), IpAddr::V4(PROBE_V4)),
        (c.v6(8086), IpAddr::V6(PROBE_V6)),
        (mapped, IpAddr::V4(PROBE_V4)),
    ] {
        let (seen, _, local) =
            round_trip(&node, dst, b"GET /healthz").unwrap_or_else(|e| panic!("probe to {dst}: {e}"));
        assert_eq!(
            seen.peer.ip().to_canonical(),
            source,
            "the app sees the probe source ({dst})"
        );
        assert_eq!(
            local.ip().to_canonical(),
            source,
            "the node's socket was bound to it ({dst})"
        );
    }
    let from_probe_source = |l: &serde_json::Value| {
        l["src"]
            .as_str()
            .and_then(|s| s.parse::<SocketAddr>().ok())
            .is_some_and(|s| [IpAddr::V4(PROBE_V4), IpAddr::V6(PROBE_V6)].contains(&s.ip().to_canonical()))
    };
    assert!(
        !t.agent(1).connections().iter().any(from_probe_source),
        "probes are not captured:\n{}",
        t.agent(1).dump()
    );

    // A node socket its app bound to the node's address keeps that source,
    // and is then plaintext like any other: STRICT refuses it.
    let gateway = SocketAddr::new(IpAddr::V4(t.nodes[1].gateway4), 0);
    let bound =
        traffic::connect_bound(&node, gateway, c.v4(8080), Duration::from_secs(3)).and_then(|s| read_greeting(&s));
    assert!(bound.is_err(), "STRICT must refuse the node's own address: {bound:?}");

    // The node's connections to pods it does not manage keep their source.
    let e = t.pod("e").clone();
    let _se = serve(&e.netns, e.v4(7000), info_echo);
    let (seen, _, _) = round_trip(&node, e.v4(7000), b"x").expect("to a pod of another node");
    assert_eq!(seen.peer.ip(), IpAddr::V4(node_address(&t, 1)));
}

#[test]
fn a_pod_claiming_the_probe_source_cannot_complete_a_handshake() {
    let _g = shared();
    let Some(t) = cluster("a_pod_claiming_the_probe_source_cannot_complete_a_handshake") else {
        return;
    };
    let (c, d) = (t.pod("c").clone(), t.pod("d").clone());
    let _s = serve(&c.netns, c.v4(8080), info_echo);
    t.apply("strict", strict_mesh_wide());
    eventually(&d.netns, c.v4(8080), false);
    // d, on c's bridge, puts the probe source on itself and sends from it:
    // c's SYN-ACK goes to the node, where the address is local, and the node
    // resets; d never hears back.
    sh(&["ip", "-n", &d.netns, "addr", "add", "169.254.7.127/32", "dev", "lo"]);
    let spoofed = traffic::connect_bound(
        &d.netns,
        SocketAddr::new(IpAddr::V4(PROBE_V4), 0),
        c.v4(8080),
        Duration::from_secs(2),
    );
    assert!(spoofed.is_err(), "a spoofed probe source must not connect: {spoofed:?}");
}
