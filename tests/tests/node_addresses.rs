//! Node addresses in the mesh (issue 24, items 3 and 4).
//!
//! hostNetwork pods (kube-proxy, CNI daemons, static control-plane pods)
//! all report their node's IP: that IP is node traffic, reached in
//! plaintext like any destination outside the mesh, directly or as a
//! Service's endpoint, never refused as "claimed by several pods".
//!
//! A Service's other addresses (external IPs, a node address on a
//! nodePort) are resolved by the agent as its ClusterIP is: the same
//! endpoint, the same tunnel. Without that the connection passes through,
//! kube-proxy DNATs it to the enrolled pod, and it arrives in plaintext
//! (refused by STRICT). kube-proxy's DNAT is present on both nodes here.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use nodeward_testbed::kube_proxy::{dnat, masquerade_dnat};
use nodeward_testbed::sniff::{Sniffer, contains};
use nodeward_testbed::traffic::{self, info_echo, read_greeting, round_trip, serve};
use nodeward_testbed::{
    EndpointSpec, PodSpec, ServiceSpec, Topology, TopologySpec, patience, privileged_or_skip, shared,
};

const WAIT: Duration = Duration::from_secs(10);
const MARKER: &[u8] = b"NODEWARD-NODE-ADDRESS-PLAINTEXT-MARKER-7c1e";
/// Where node 1's own server listens (its node IP, as kube-apiserver would).
const NODE_PORT_LISTENER: u16 = 9443;
/// ClusterIP of a Service (with a selector) whose endpoint is node 1's IP.
const API_VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 40));
/// ClusterIP of a selector-less Service like `kubernetes.default`.
const KUBERNETES_VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 41));
/// ClusterIP, external IP and nodePort of `mesh/web`.
const WEB_VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 50));
const EXTERNAL_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10));
const NODE_PORT: u16 = 30080;

/// node 1: `a` (mesh), `p` (not enrolled); node 2: `c` (mesh); agents not
/// started: a test writes its config (which names the topology's nodes
/// and addresses) first, so the agents' first snapshot holds all of it.
fn build(test: &str) -> Option<Topology> {
    if !privileged_or_skip(test) {
        return None;
    }
    Some(Topology::build(TopologySpec {
        nodes: vec![
            vec![PodSpec::new("a", "mesh"), PodSpec::new("p", "plain")],
            vec![PodSpec::new("c", "mesh")],
        ],
        namespaces: vec![("mesh".into(), true), ("plain".into(), false)],
    }))
}

/// Connects and reads the greeting.
fn reach(netns: &str, dst: SocketAddr) -> std::io::Result<traffic::Seen> {
    traffic::connect_timeout(netns, dst, Duration::from_secs(3)).and_then(|s| read_greeting(&s))
}

/// Waits (generously) until `netns -> dst` gets the greeting, and returns it.
fn wait_reach(netns: &str, dst: SocketAddr) -> traffic::Seen {
    let deadline = Instant::now() + patience(WAIT);
    loop {
        match reach(netns, dst) {
            Ok(seen) => return seen,
            Err(e) => assert!(Instant::now() < deadline, "{netns} -> {dst} never reached: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two hostNetwork pods on `node`, both reporting its addresses as pod IPs.
fn host_network_pods(node: &str, ips: &[IpAddr]) -> String {
    let mut y = String::new();
    for name in ["kube-proxy", "kube-apiserver"] {
        y.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}-{node}\n  namespace: kube-system\n  uid: uid-{name}-{node}\nspec:\n  nodeName: {node}\n  hostNetwork: true\n  serviceAccountName: {name}\nstatus:\n  phase: Running\n  podIP: \"{}\"\n  podIPs:\n",
            ips[0]
        ));
        for ip in ips {
            y.push_str(&format!("  - ip: \"{ip}\"\n"));
        }
        y.push_str("---\n");
    }
    y
}

#[test]
fn an_enrolled_pod_reaches_the_node_ip_of_host_network_pods_directly_and_through_services() {
    let _g = shared();
    let Some(mut t) = build("an_enrolled_pod_reaches_the_node_ip_of_host_network_pods_directly_and_through_services")
    else {
        return;
    };
    let node = &t.nodes[0];
    let ips = [IpAddr::from(node.address4), IpAddr::from(node.address6)];
    t.apply("host-pods", &host_network_pods(&node.name, &ips));
    let endpoint = EndpointSpec {
        ips: ips.to_vec(),
        node: node.name.clone(),
        pod: None,
        ready: true,
        terminating: false,
    };
    let port = vec![(
        "https".to_string(),
        443,
        NODE_PORT_LISTENER.to_string(),
        NODE_PORT_LISTENER,
    )];
    let api = ServiceSpec {
        name: "apiserver".into(),
        namespace: "mesh".into(),
        cluster_ips: vec![API_VIP],
        ports: port.clone(),
        endpoints: vec![endpoint.clone()],
        ..Default::default()
    };
    let kubernetes = ServiceSpec {
        name: "kubernetes".into(),
        namespace: "default".into(),
        cluster_ips: vec![KUBERNETES_VIP],
        ports: port,
        endpoints: vec![endpoint],
        selectorless: true,
        ..Default::default()
    };
    t.apply("svc-apiserver", &api.to_yaml());
    t.apply("svc-kubernetes", &kubernetes.to_yaml());
    t.start_agents();

    let node = &t.nodes[0];
    let a = t.pod("a").clone();
    let direct4 = SocketAddr::new(node.address4.into(), NODE_PORT_LISTENER);
    let direct6 = SocketAddr::new(node.address6.into(), NODE_PORT_LISTENER);
    let _s4 = serve(&node.netns, direct4, info_echo);
    let _s6 = serve(&node.netns, direct6, info_echo);
    // kube-proxy for the selector-less `kubernetes` Service.
    dnat(
        &node.netns,
        SocketAddr::new(KUBERNETES_VIP, 443),
        direct4,
        &["PREROUTING", "OUTPUT"],
    );

    for direct in [direct4, direct6] {
        let seen = wait_reach(&a.netns, direct);
        let own: IpAddr = if direct.is_ipv4() { a.ip4.into() } else { a.ip6.into() };
        assert_eq!(seen.local, direct);
        assert_eq!(seen.peer.ip(), own, "plaintext from the pod's own IP");
        let l = t
            .agent(0)
            .wait_connection("outbound", &direct.to_string(), WAIT)
            .unwrap_or_else(|| panic!("{direct}: not logged:\n{}", t.agent(0).dump()));
        assert_eq!(l["transport"], "passthrough", "node traffic is outside the mesh");
    }

    // A Service whose endpoint is the node IP: resolved by the agent and
    // reached as an endpoint outside the mesh.
    let seen = wait_reach(&a.netns, SocketAddr::new(API_VIP, 443));
    assert_eq!(seen.local, direct4, "the Service's endpoint, the node IP");
    let l = t
        .agent(0)
        .wait_log(WAIT, |l| {
            l["message"] == "connection closed" && l["service"] == "mesh/apiserver"
        })
        .unwrap_or_else(|| panic!("no line naming the Service:\n{}", t.agent(0).dump()));
    assert_eq!(l["transport"], "passthrough");
    // `kubernetes.default`: selector-less with no pod endpoint, so left to
    // kube-proxy, which DNATs it to the node IP.
    let seen = wait_reach(&a.netns, SocketAddr::new(KUBERNETES_VIP, 443));
    assert_eq!(seen.local, direct4, "kube-proxy's endpoint, the node IP");
}

#[test]
fn external_ip_and_node_port_calls_reach_a_strict_pod_over_hbone_despite_kube_proxy_dnat() {
    let _g = shared();
    let Some(mut t) = build("external_ip_and_node_port_calls_reach_a_strict_pod_over_hbone_despite_kube_proxy_dnat")
    else {
        return;
    };
    let c = t.pod("c").clone();
    let web = ServiceSpec {
        name: "web".into(),
        namespace: "mesh".into(),
        cluster_ips: vec![WEB_VIP],
        ports: vec![("http".into(), 80, "8080".into(), 8080)],
        kind: "NodePort".into(),
        node_ports: vec![NODE_PORT],
        external_ips: vec![EXTERNAL_IP],
        endpoints: vec![EndpointSpec::pod("c", &[c.ip4.into()], &t.nodes[1].name)],
        ..Default::default()
    };
    t.apply("svc-web", &web.to_yaml());
    t.apply(
        "strict",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec:\n  mtls: {mode: STRICT}\n",
    );
    // kube-proxy on both nodes: the external IP everywhere, each node's
    // nodePort on its own address, DNATed connections masqueraded.
    let external = SocketAddr::new(EXTERNAL_IP, 80);
    for node in &t.nodes {
        dnat(&node.netns, external, c.v4(8080), &["PREROUTING", "OUTPUT"]);
        dnat(
            &node.netns,
            SocketAddr::new(node.address4.into(), NODE_PORT),
            c.v4(8080),
            &["PREROUTING", "OUTPUT"],
        );
        masquerade_dnat(&node.netns);
    }
    t.start_agents();
    let _s = serve(&c.netns, c.v4(8080), info_echo);
    let on_node2 = SocketAddr::new(t.nodes[1].address4.into(), NODE_PORT);

    // The DNAT is live: from a pod outside the mesh, the nodePort carries
    // plaintext to `c`, which STRICT refuses.
    let p = t.pod("p").netns.clone();
    assert!(reach(&p, on_node2).is_err(), "plaintext reached a STRICT pod");
    t.agent(1)
        .wait_log(WAIT, |l| {
            l["reason"] == "mtls_strict" && l["dst"] == c.v4(8080).to_string()
        })
        .unwrap_or_else(|| panic!("the DNATed plaintext did not reach c:\n{}", t.agent(1).dump()));

    let a = t.pod("a").clone();
    let n1 = &t.nodes[0];
    let sniffer = Sniffer::start(&n1.netns, &n1.uplink);
    let mut msg = MARKER.repeat(10);
    msg.push(b'\n');
    // Both calls first, so a failure names each one that failed.
    let calls: Vec<_> = [external, on_node2]
        .into_iter()
        .map(|dst| (dst, round_trip(&a.netns, dst, &msg)))
        .collect();
    let failed: Vec<String> = calls
        .iter()
        .filter_map(|(dst, r)| r.as_ref().err().map(|e| format!("{dst}: {e}")))
        .collect();
    assert!(failed.is_empty(), "calls from an enrolled pod failed: {failed:?}");
    for (dst, r) in calls {
        let (seen, client_peer, _) = r.unwrap();
        assert_eq!(client_peer, dst, "the app sees the address it called");
        assert_eq!(seen.local, c.v4(8080), "{dst}: the Service's endpoint");
        assert_eq!(
            seen.peer.ip(),
            IpAddr::from(a.ip4),
            "{dst}: the client pod's IP, not masqueraded"
        );
    }
    assert!(!contains(&sniffer.finish(), MARKER), "plaintext on the node link");
    // Both calls were tunnelled and name the Service (their lines come
    // when each connection's relay ends).
    let tunnelled = || {
        t.agent(0)
            .connections()
            .iter()
            .filter(|l| l["service"] == "mesh/web" && l["transport"] == "hbone")
            .count()
    };
    let deadline = Instant::now() + patience(WAIT);
    while tunnelled() < 2 {
        assert!(
            Instant::now() < deadline,
            "both calls not tunnelled:\n{}",
            t.agent(0).dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
