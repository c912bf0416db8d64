//! UDP is not covered by STRICT, but a pod (or its namespace) can ask with
//! `nodeward.io/inbound-udp: drop` for inbound UDP from outside it to be
//! dropped by its `sk_lookup` program, excluded inbound ports aside. Real
//! agents, real datagrams across nodes.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use nodeward_testbed::netns::run_in;
use nodeward_testbed::{PodSpec, Topology, TopologySpec, patience, privileged_or_skip, shared};

const DROP: &str = "nodeward.io/inbound-udp";
const EXCLUDE_INBOUND: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

/// A UDP socket bound to `addr` inside `netns`, non-blocking.
fn bind(netns: &str, addr: SocketAddr) -> UdpSocket {
    let s = run_in(netns, move || UdpSocket::bind(addr)).unwrap_or_else(|e| panic!("bind {addr} in {netns}: {e}"));
    s.set_nonblocking(true).unwrap();
    s
}

/// An unconnected UDP socket inside `netns`.
fn sender(netns: &str) -> UdpSocket {
    run_in(netns, || UdpSocket::bind("0.0.0.0:0")).unwrap()
}

/// The datagrams waiting on `s`, without waiting.
fn pending(s: &UdpSocket) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut b = [0u8; 256];
    loop {
        match s.recv_from(&mut b) {
            Ok((n, _)) => out.push(b[..n].to_vec()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return out,
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Sends `probe` to `dst` until `s` receives it (datagrams may be lost
/// while routes settle); whatever else `s` held is consumed.
fn deliver(from: &UdpSocket, dst: SocketAddr, s: &UdpSocket, probe: &[u8]) {
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    loop {
        from.send_to(probe, dst).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        if pending(s).iter().any(|d| d == probe) {
            return;
        }
        assert!(Instant::now() < deadline, "{dst} never received {probe:?}");
    }
}

#[test]
fn inbound_udp_drop_drops_datagrams_from_outside_the_pod_but_not_excluded_ports_or_its_own() {
    let _g = shared();
    if !privileged_or_skip("inbound_udp_drop_drops_datagrams_from_outside_the_pod_but_not_excluded_ports_or_its_own") {
        return;
    }
    let mut spec = TopologySpec::two_nodes();
    spec.nodes[0][0] = PodSpec::new("a", "mesh")
        .annotation(DROP, "drop")
        .annotation(EXCLUDE_INBOUND, "9153");
    let mut t = Topology::build(spec);
    t.start_agents();
    let (a, b, c) = (t.pod("a").clone(), t.pod("b").clone(), t.pod("c").clone());
    let a_dns = bind(&a.netns, "0.0.0.0:5353".parse().unwrap());
    let a_excluded = bind(&a.netns, a.v4(9153));
    let b_dns = bind(&b.netns, b.v4(5353));
    let from_c = sender(&c.netns);

    // Without the annotation, b takes datagrams from c (UDP untouched).
    deliver(&from_c, b.v4(5353), &b_dns, b"to b");

    // To a: the datagram for 5353 goes first, then one for the excluded
    // port along the same path; once the second is in, the first would be.
    // IPv6 alike.
    let a_dns6 = bind(&a.netns, a.v6(5354));
    let from_c6 = sender_v6(&c.netns);
    for _ in 0..3 {
        from_c.send_to(b"dropped", a.v4(5353)).unwrap();
        from_c6.send_to(b"dropped6", a.v6(5354)).unwrap();
    }
    deliver(&from_c, a.v4(9153), &a_excluded, b"excluded port");
    let a_excluded6 = bind(&a.netns, a.v6(9153));
    deliver(&from_c6, a.v6(9153), &a_excluded6, b"excluded port v6");
    assert_eq!(
        pending(&a_dns),
        Vec::<Vec<u8>>::new(),
        "a datagram from c reached a's 5353"
    );
    assert_eq!(
        pending(&a_dns6),
        Vec::<Vec<u8>>::new(),
        "an IPv6 datagram from c reached a's 5354"
    );

    // The pod's own datagrams still arrive, over loopback and to its own IP.
    let own = sender(&a.netns);
    deliver(&own, "127.0.0.1:5353".parse().unwrap(), &a_dns, b"loopback");
    deliver(&own, a.v4(5353), &a_dns, b"own address");

    // A connected client socket of a (a DNS lookup) gets its answer: the
    // kernel finds it before sk_lookup runs.
    let c_server = bind(&c.netns, c.v4(53));
    let client = run_in(&a.netns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(c.v4(53)).unwrap();
        s
    });
    client.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    let mut b = [0u8; 64];
    loop {
        client.send(b"query").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        if let Ok((n, from)) = c_server.recv_from(&mut b) {
            c_server.send_to(&b[..n], from).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            if matches!(client.recv(&mut b), Ok(5)) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "a's connected client never got its answer");
    }
}

/// An unconnected IPv6 UDP socket inside `netns`.
fn sender_v6(netns: &str) -> UdpSocket {
    run_in(netns, || UdpSocket::bind("[::]:0")).unwrap()
}
