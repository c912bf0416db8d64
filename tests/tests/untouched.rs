//! What capture must leave alone: loopback inside a pod, UDP, excluded
//! ports, kubelet probes from the node (more in `exemptions.rs`), and pods
//! that are not enrolled.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use nodeward_testbed::netns::run_in;
use nodeward_testbed::traffic::{info_echo, round_trip, serve};
use nodeward_testbed::{PodSpec, Topology, TopologySpec, privileged_or_skip, shared};

const WAIT: Duration = Duration::from_secs(10);

/// Makes one captured connection and waits for its log line, so every
/// connection made before it has been logged too if it was captured.
fn barrier(t: &Topology, from: &str, to: &str, port: u16) {
    let (f, d) = (t.pod(from), t.pod(to));
    let _s = serve(&d.netns, d.v4(port), info_echo);
    round_trip(&f.netns, d.v4(port), b"barrier").unwrap();
    let dst = d.v4(port).to_string();
    t.agent(d.node)
        .wait_log(WAIT, |l| {
            l["message"] == "connection closed"
                && l["dst"] == dst.as_str()
                && l["direction"].as_str().is_some_and(|d| d.starts_with("inbound"))
        })
        .expect("barrier connection logged");
}

fn logged_port(t: &Topology, k: usize, port: u16) -> bool {
    t.agent(k).connections().iter().any(|l| {
        l["dst"]
            .as_str()
            .and_then(|d| d.parse::<SocketAddr>().ok())
            .is_some_and(|d| d.port() == port)
    })
}

#[test]
fn loopback_inside_a_pod_is_not_captured() {
    let _g = shared();
    if !privileged_or_skip("loopback_inside_a_pod_is_not_captured") {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents();
    let a = t.pod("a");
    for addr in ["127.0.0.1:6000", "[::1]:6001"] {
        let addr: SocketAddr = addr.parse().unwrap();
        let _s = serve(&a.netns, addr, info_echo);
        let (seen, peer, local) = round_trip(&a.netns, addr, b"local").unwrap();
        assert_eq!(peer, addr);
        assert_eq!(seen.peer, local, "server and client agree: no proxy in between");
    }
    // The pod's own IP is inside the pod too.
    let _s = serve(&a.netns, a.v4(6002), info_echo);
    let (seen, _, local) = round_trip(&a.netns, a.v4(6002), b"self").unwrap();
    assert_eq!(seen.peer, local);
    barrier(&t, "a", "b", 6100);
    assert!(
        !logged_port(&t, 0, 6000) && !logged_port(&t, 0, 6001) && !logged_port(&t, 0, 6002),
        "{}",
        t.agent(0).dump()
    );
}

#[test]
fn udp_and_dns_style_traffic_is_untouched() {
    let _g = shared();
    if !privileged_or_skip("udp_and_dns_style_traffic_is_untouched") {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents();
    let (a, c) = (t.pod("a"), t.pod("c"));
    let server_addr = c.v4(53);
    let server = run_in(&c.netns, move || UdpSocket::bind(server_addr)).unwrap();
    let echo = std::thread::spawn(move || {
        let mut b = [0u8; 512];
        server.set_read_timeout(Some(WAIT)).unwrap();
        let (n, from) = server.recv_from(&mut b).unwrap();
        server.send_to(&b[..n], from).unwrap();
        from
    });
    let client = run_in(&a.netns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        // connect() on UDP also runs the connect4 hook: it must not redirect.
        s.connect(server_addr).unwrap();
        s
    });
    client.set_read_timeout(Some(WAIT)).unwrap();
    client.send(b"query").unwrap();
    let mut b = [0u8; 16];
    let n = client.recv(&mut b).unwrap();
    assert_eq!(&b[..n], b"query");
    assert_eq!(
        echo.join().unwrap().ip(),
        a.v4(0).ip(),
        "the datagram came straight from the pod"
    );
    assert_eq!(client.peer_addr().unwrap(), server_addr);
}

#[test]
fn annotated_ports_are_excluded_in_both_directions() {
    let _g = shared();
    if !privileged_or_skip("annotated_ports_are_excluded_in_both_directions") {
        return;
    }
    let mut spec = TopologySpec::two_nodes();
    spec.nodes[0][0] = PodSpec::new("a", "mesh").annotation("traffic.sidecar.istio.io/excludeOutboundPorts", "5432");
    spec.nodes[1][0] =
        PodSpec::new("c", "mesh").annotation("traffic.sidecar.istio.io/excludeInboundPorts", "9100, 9101");
    let mut t = Topology::build(spec);
    t.start_agents();
    let (a, c, d) = (t.pod("a"), t.pod("c"), t.pod("d"));
    let _db = serve(&c.netns, c.v4(5432), info_echo);
    let _metrics = serve(&c.netns, c.v4(9100), info_echo);

    // a -> c:5432: excluded outbound at a, but still captured inbound at c.
    let (_, _, local) = round_trip(&a.netns, c.v4(5432), b"q").unwrap();
    assert_eq!(local.ip(), a.v4(0).ip(), "not redirected to the agent");
    t.agent(1)
        .wait_connection("inbound", &c.v4(5432).to_string(), WAIT)
        .expect("c still captures its inbound 5432");

    // d (no mesh) -> c:9100: plaintext to an excluded inbound port reaches
    // the app directly; the app sees d itself.
    let (seen, _, local) = round_trip(&d.netns, c.v4(9100), b"scrape").unwrap();
    assert_eq!(seen.peer, local);

    barrier(&t, "b", "c", 8001);
    assert!(!logged_port(&t, 0, 5432), "outbound 5432 must not be captured at a");
    assert!(
        !t.agent(1)
            .connections()
            .iter()
            .any(|l| l["direction"] == "inbound" && l["dst"] == c.v4(9100).to_string().as_str()),
        "inbound 9100 must not be captured at c:\n{}",
        t.agent(1).dump()
    );
}

#[test]
fn kubelet_probes_from_the_node_are_not_captured() {
    let _g = shared();
    if !privileged_or_skip("kubelet_probes_from_the_node_are_not_captured") {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents();
    let c = t.pod("c");
    let _s = serve(&c.netns, c.v4(8080), info_echo);
    let node = &t.nodes[1];
    let (seen, _, _) = round_trip(&node.netns, c.v4(8080), b"GET /healthz").unwrap();
    assert_eq!(
        seen.peer.ip(),
        std::net::IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 7, 127)),
        "probe came from the node, bound to the probe source"
    );
    barrier(&t, "a", "c", 8081);
    assert!(
        !t.agent(1)
            .connections()
            .iter()
            .any(|l| l["dst"] == c.v4(8080).to_string().as_str()),
        "the probe must not be captured:\n{}",
        t.agent(1).dump()
    );
}

#[test]
fn pods_not_enrolled_or_opted_out_are_not_captured() {
    let _g = shared();
    if !privileged_or_skip("pods_not_enrolled_or_opted_out_are_not_captured") {
        return;
    }
    let mut spec = TopologySpec::two_nodes();
    spec.nodes[0][1] = PodSpec::new("b", "mesh").label("istio.io/dataplane-mode", "none");
    let mut t = Topology::build(spec);
    t.start_agents();
    let (b, d) = (t.pod("b"), t.pod("d"));
    let _s = serve(&d.netns, d.v4(7000), info_echo);
    // b opted out, d's namespace is not enrolled: b -> d is mesh-free.
    let (seen, _, local) = round_trip(&b.netns, d.v4(7000), b"plain").unwrap();
    assert_eq!(local.ip(), b.v4(0).ip());
    assert_eq!(seen.peer, local);
    barrier(&t, "a", "c", 7001);
    assert!(!logged_port(&t, 0, 7000) && !logged_port(&t, 1, 7000));
}
