//! Every TCP connection of an enrolled pod reaches its agent, with the
//! original destination, over real namespaces, real eBPF and real sockets.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use nodeward_testbed::traffic::{self, Fnv, checksum_sink, info_echo, round_trip, serve};
use nodeward_testbed::{Topology, shared};

const WAIT: Duration = Duration::from_secs(10);

fn cluster(test: &str) -> Option<Topology> {
    nodeward_testbed::two_node_cluster(test, &[])
}

#[test]
fn cross_node_connections_are_captured_on_both_ends_ipv4_ipv6_and_mapped() {
    let _g = shared();
    let Some(t) = cluster("cross_node_connections_are_captured_on_both_ends_ipv4_ipv6_and_mapped") else {
        return;
    };
    let (a, c) = (t.pod("a"), t.pod("c"));
    let _s4 = serve(&c.netns, c.v4(8080), info_echo);
    let _s6 = serve(&c.netns, c.v6(8086), info_echo);
    let mapped: SocketAddr = format!("[::ffff:{}]:8080", c.ip4).parse().unwrap();

    for (dst, want_peer) in [(c.v4(8080), a.v4(0)), (c.v6(8086), a.v6(0)), (mapped, a.v4(0))] {
        let (seen, client_peer, client_local) = round_trip(&a.netns, dst, b"hello through the mesh").unwrap();
        // The app sees the destination it asked for as its peer, and its own
        // pod address as its local one (in the socket's family), though its
        // connection really went to the agent on loopback.
        assert_eq!(client_peer, dst, "client's getpeername");
        assert_eq!(client_local.ip(), want_local(dst, want_peer), "client's getsockname");
        assert_ne!(client_local.port(), 0, "client's getsockname port");
        // The server sees the real client pod, not the agent's hop.
        assert_eq!(seen.peer.ip().to_canonical(), want_peer.ip(), "server's accept() peer");
        let d = traffic::unmapped(dst).to_string();
        let out = t
            .agent(0)
            .wait_connection("outbound", &d, WAIT)
            .unwrap_or_else(|| panic!("no outbound log for {d}:\n{}", t.agent(0).dump()));
        assert_eq!(out["pod"], "mesh/a");
        assert_eq!(out["reason"], "done");
        assert_eq!(out["sent"], 22);
        // The connection's line names the app's own end, the pod's address
        // and port, as the server's side does; never the loopback leg to
        // the agent (earlier connections to `d` have lines of their own).
        let app_end = SocketAddr::new(want_peer.ip(), client_local.port()).to_string();
        assert!(
            t.agent(0)
                .wait_log(WAIT, |l| l["direction"] == "outbound"
                    && l["dst"] == d.as_str()
                    && l["src"] == app_end.as_str())
                .is_some(),
            "no outbound line with src={app_end}:\n{}",
            t.agent(0).dump()
        );
        // Both ends are enrolled: the connection crossed as an HBONE tunnel
        // that proved c's identity to a and a's to c.
        assert_eq!(out["transport"], "hbone");
        assert_eq!(out["peer_identity"], "spiffe://cluster.local/ns/mesh/sa/c");
        let inb = t
            .agent(1)
            .wait_connection("inbound_tunnel", &d, WAIT)
            .unwrap_or_else(|| panic!("no inbound log for {d}:\n{}", t.agent(1).dump()));
        assert_eq!(inb["pod"], "mesh/c");
        assert_eq!(inb["peer_identity"], "spiffe://cluster.local/ns/mesh/sa/a");
        assert_eq!(
            inb["src"].as_str().unwrap().parse::<SocketAddr>().unwrap().ip(),
            want_peer.ip()
        );
    }
}

/// The local address a client socket to `dst` should show: the pod's own
/// address of `dst`'s family, IPv4-mapped for a mapped destination.
fn want_local(dst: SocketAddr, pod: SocketAddr) -> std::net::IpAddr {
    match (dst, pod.ip()) {
        (SocketAddr::V6(d), std::net::IpAddr::V4(p)) if d.ip().to_ipv4_mapped().is_some() => p.to_ipv6_mapped().into(),
        _ => pod.ip(),
    }
}

#[test]
fn getsockname_shows_the_pod_address_and_the_socket_port_but_loopback_stays_loopback() {
    let _g = shared();
    let Some(t) = cluster("getsockname_shows_the_pod_address_and_the_socket_port_but_loopback_stays_loopback") else {
        return;
    };
    let (a, c) = (t.pod("a"), t.pod("c"));
    let _s4 = serve(&c.netns, c.v4(8080), info_echo);
    let _s6 = serve(&c.netns, c.v6(8086), info_echo);
    let _l4 = serve(&a.netns, "127.0.0.1:8087".parse().unwrap(), info_echo);
    let _l6 = serve(&a.netns, "[::1]:8088".parse().unwrap(), info_echo);
    let mapped: SocketAddr = format!("[::ffff:{}]:8080", c.ip4).parse().unwrap();

    // An app that binds its own port keeps it: only the address changes.
    for (src, dst, want) in [
        ("0.0.0.0:47311", c.v4(8080), a.v4(47311)),
        ("[::]:47312", c.v6(8086), a.v6(47312)),
        (
            "[::]:47313",
            mapped,
            format!("[::ffff:{}]:47313", a.ip4).parse().unwrap(),
        ),
    ] {
        let s = traffic::connect_bound(&a.netns, src.parse().unwrap(), dst, WAIT).unwrap();
        traffic::read_greeting(&s).unwrap();
        assert_eq!(
            s.local_addr().unwrap(),
            want,
            "getsockname of a captured socket to {dst}"
        );
        assert_eq!(s.peer_addr().unwrap(), dst, "getpeername of a captured socket to {dst}");
    }
    // The pod's own loopback connections are not captured and keep showing
    // loopback, with a captured connection open beside them.
    let open = traffic::connect(&a.netns, c.v4(8080)).unwrap();
    for dst in ["127.0.0.1:8087", "[::1]:8088"] {
        let dst: SocketAddr = dst.parse().unwrap();
        let s = traffic::connect(&a.netns, dst).unwrap();
        let seen = traffic::read_greeting(&s).unwrap();
        let local = s.local_addr().unwrap();
        assert!(local.ip().is_loopback(), "loopback connection's getsockname: {local}");
        assert_eq!(seen.peer, local, "the loopback server sees the same endpoint");
    }
    assert_eq!(open.local_addr().unwrap().ip(), std::net::IpAddr::V4(a.ip4));
    // The kernel's own table still shows the captured connection on loopback.
    assert!(traffic::captured(&a.netns, c.v4(8080)).unwrap(), "captured");
}

#[test]
fn same_node_traffic_is_captured_once_each_way_without_loops() {
    let _g = shared();
    let Some(t) = cluster("same_node_traffic_is_captured_once_each_way_without_loops") else {
        return;
    };
    let (a, b) = (t.pod("a"), t.pod("b"));
    let _s = serve(&b.netns, b.v4(9000), info_echo);
    let (seen, _, _) = round_trip(&a.netns, b.v4(9000), b"same node").unwrap();
    assert_eq!(seen.peer.ip(), a.v4(0).ip());
    let dst = b.v4(9000).to_string();
    t.agent(0)
        .wait_connection("outbound", &dst, WAIT)
        .expect("outbound log");
    t.agent(0)
        .wait_connection("inbound_tunnel", &dst, WAIT)
        .expect("inbound log");
    // One connection, one capture per direction: the agent's own sockets
    // inside the pods were not captured again.
    std::thread::sleep(Duration::from_millis(300));
    let logs = t.agent(0).connections();
    let count = |dir: &str| {
        logs.iter()
            .filter(|l| l["direction"] == dir && l["dst"] == dst.as_str())
            .count()
    };
    assert_eq!(
        (count("outbound"), count("inbound_tunnel"), count("inbound")),
        (1, 1, 0),
        "{logs:#?}"
    );
}

#[test]
fn inbound_on_any_port_reaches_the_agent_and_15008_reaches_the_tunnel_listener() {
    let _g = shared();
    let Some(t) = cluster("inbound_on_any_port_reaches_the_agent_and_15008_reaches_the_tunnel_listener") else {
        return;
    };
    let (c, d) = (t.pod("c"), t.pod("d"));
    // d is not enrolled: its connection to c is captured only at c's end.
    for port in [22u16, 443, 31337] {
        let _s = serve(&c.netns, c.v4(port), info_echo);
        let (seen, _, client_local) = round_trip(&d.netns, c.v4(port), b"x").unwrap();
        assert_eq!(client_local.ip(), d.v4(0).ip(), "d itself is not captured");
        assert_eq!(seen.local, c.v4(port), "the app got the original destination port");
        let l = t
            .agent(1)
            .wait_connection("inbound", &c.v4(port).to_string(), WAIT)
            .expect("inbound log");
        assert_eq!(l["pod"], "mesh/c");
    }
    // 15008 belongs to the tunnel listener: plaintext there is refused at
    // the TLS handshake (at most a TLS alert comes back) and reaches no app.
    let r = traffic::connect(&d.netns, c.v4(15008)).and_then(|mut s| {
        s.write_all(b"GET / HTTP/1.1\r\n\r\n")?;
        let mut all = Vec::new();
        s.read_to_end(&mut all).map(|_| all)
    });
    if let Ok(bytes) = &r {
        assert!(
            bytes.is_empty() || bytes[0] == 0x15,
            "only a TLS alert record may come back: {bytes:?}"
        );
    }
    let l = t
        .agent(1)
        .wait_log(WAIT, |l| l["direction"] == "inbound_tunnel")
        .unwrap_or_else(|| panic!("no tunnel log:\n{}", t.agent(1).dump()));
    assert_eq!(l["reason"], "tls_refused");
    assert_eq!(
        l["src"].as_str().unwrap().parse::<SocketAddr>().unwrap().ip(),
        d.v4(0).ip()
    );
}

#[test]
fn a_hundred_concurrent_connections_through_one_agent() {
    let _g = shared();
    let Some(t) = cluster("a_hundred_concurrent_connections_through_one_agent") else {
        return;
    };
    let (a, c) = (t.pod("a"), t.pod("c"));
    let _s = serve(&c.netns, c.v4(7000), info_echo);
    // Open all first, so they are really concurrent, then use them.
    let mut conns: Vec<_> = (0..100)
        .map(|_| traffic::connect(&a.netns, c.v4(7000)).expect("connect"))
        .collect();
    for (i, s) in conns.iter_mut().enumerate() {
        traffic::read_greeting(s).unwrap();
        write!(s, "message {i}").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
    }
    for (i, s) in conns.iter_mut().enumerate() {
        let mut back = String::new();
        s.read_to_string(&mut back).unwrap();
        assert_eq!(back, format!("message {i}"));
    }
    let dst = c.v4(7000).to_string();
    let deadline = std::time::Instant::now() + WAIT;
    while t
        .agent(0)
        .connections()
        .iter()
        .filter(|l| l["dst"] == dst.as_str())
        .count()
        < 100
    {
        assert!(
            std::time::Instant::now() < deadline,
            "agent logged fewer than 100 connections"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_256_mib_transfer_arrives_intact() {
    let _g = shared();
    let Some(t) = cluster("a_256_mib_transfer_arrives_intact") else {
        return;
    };
    let (a, c) = (t.pod("a"), t.pod("c"));
    let _s = serve(&c.netns, c.v4(7100), checksum_sink);
    let sent = traffic::checked_transfer(&a.netns, c.v4(7100), 256, 1 << 20).unwrap();
    assert_eq!(sent, 256 << 20);
    let l = t
        .agent(0)
        .wait_connection("outbound", &c.v4(7100).to_string(), WAIT)
        .expect("outbound log");
    assert_eq!(l["sent"], 256u64 << 20);
}

#[test]
fn half_close_is_propagated_both_ways() {
    let _g = shared();
    let Some(t) = cluster("half_close_is_propagated_both_ways") else {
        return;
    };
    let (a, c) = (t.pod("a"), t.pod("c"));
    // The server reads to EOF (the client's FIN, passed on by both agents),
    // and only then answers: the answer must still reach the client.
    let _s = serve(&c.netns, c.v4(7200), checksum_sink);
    let mut s = traffic::connect(&a.netns, c.v4(7200)).unwrap();
    s.write_all(b"abc").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let mut sum = Fnv::default();
    sum.update(b"abc");
    assert_eq!(reply.trim(), format!("3 {:016x}", sum.0));
}

#[test]
fn a_closed_app_port_resets_the_client_instead_of_hanging() {
    let _g = shared();
    let Some(t) = cluster("a_closed_app_port_resets_the_client_instead_of_hanging") else {
        return;
    };
    let (a, c) = (t.pod("a"), t.pod("c"));
    // The agent completes the handshake, so the reset may already be there
    // when connect() returns, or arrive on the first read: either way a
    // reset, never a hang.
    let r = traffic::connect(&a.netns, c.v4(7300)).and_then(|mut s| {
        let mut b = [0u8; 1];
        s.read(&mut b)
    });
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{r:?}"
    );
    let l = t
        .agent(1)
        .wait_connection("inbound_tunnel", &c.v4(7300).to_string(), WAIT)
        .expect("inbound log");
    assert_eq!(l["reason"], "connect_refused");
}

/// The agent's hop into a pod always goes to the same app endpoint, so it
/// can only differ by source port; hops end in TIME_WAIT (the agent passes
/// the client's FIN on first). With the pod's ephemeral ports cut to 50,
/// 200 short connections in a few seconds must still all arrive, each with
/// its real client: the hop's ports are reused once their TIME_WAIT is a
/// second old instead of running out.
#[test]
fn many_short_connections_to_one_app_port_do_not_run_out_of_hop_ports() {
    let _g = shared();
    let Some(t) = cluster("many_short_connections_to_one_app_port_do_not_run_out_of_hop_ports") else {
        return;
    };
    let (a, c, d) = (t.pod("a"), t.pod("c"), t.pod("d"));
    set_ephemeral_ports(&c.netns, "40000 40049");
    let _s = serve(&c.netns, c.v4(7400), info_echo);
    let start = std::time::Instant::now();
    for i in 0..200u32 {
        // Tunnelled from a meshed pod, and plaintext from one outside the mesh.
        let from = if i % 4 == 3 { d } else { a };
        let (seen, _, _) = round_trip(&from.netns, c.v4(7400), format!("{i}").as_bytes())
            .unwrap_or_else(|e| panic!("connection {i} from {} after {:?}: {e}", from.key(), start.elapsed()));
        assert_eq!(
            seen.peer.ip().to_canonical(),
            from.ip4,
            "connection {i}: the app sees the client"
        );
        // 40 a second: the 50 ports cycle every 1.25 s, just past the
        // one-second age at which a TIME_WAIT port may be reused.
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// With the pod's ephemeral ports cut to one, two simultaneous hops to
/// different app ports share the hop's local port (only their 4-tuples
/// differ). Each app must go on seeing its own client while the other hop
/// opens and after it closes.
#[test]
fn hops_sharing_a_local_port_keep_their_own_clients() {
    let _g = shared();
    let Some(t) = cluster("hops_sharing_a_local_port_keep_their_own_clients") else {
        return;
    };
    let (a, c, d) = (t.pod("a"), t.pod("c"), t.pod("d"));
    set_ephemeral_ports(&c.netns, "40000 40000");
    let _s1 = serve(&c.netns, c.v4(7401), traffic::peer_on_request);
    let _s2 = serve(&c.netns, c.v4(7402), traffic::peer_on_request);
    let (a_ip, d_ip) = (a.ip4.to_string(), d.ip4.to_string());

    // Tunnelled from a meshed pod to one port ...
    let mut x = traffic::connect(&a.netns, c.v4(7401)).unwrap();
    assert_eq!(traffic::ask_peer(&mut x).unwrap(), a_ip, "first hop, on its own");
    // ... and plaintext from outside the mesh to the other, at the same time.
    let mut y = traffic::connect(&d.netns, c.v4(7402)).unwrap();
    assert_eq!(traffic::ask_peer(&mut y).unwrap(), d_ip, "second hop");
    assert_eq!(
        traffic::ask_peer(&mut x).unwrap(),
        a_ip,
        "first hop, with the second open"
    );
    drop(y);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        traffic::ask_peer(&mut x).unwrap(),
        a_ip,
        "first hop, after the second closed"
    );
}

/// Narrows the ephemeral port range of a pod's namespace (the range the
/// agent's hops into it draw from).
fn set_ephemeral_ports(netns: &str, range: &str) {
    let ok = nodeward_testbed::netns::nsenter(
        netns,
        &["sysctl", "-qw", &format!("net.ipv4.ip_local_port_range={range}")],
    )
    .status()
    .unwrap();
    assert!(ok.success(), "sysctl in the pod");
}
