//! Hostile workloads: a pod that points the agent at its own listeners, a
//! namespace that claims a neighbour's IP, a pod that forges the agent's
//! socket mark, a pod holding the node's readiness port. Each is refused or
//! captured and reported; none makes the agent loop, leaves a pod open or
//! fails the node's readiness probe.

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use nodeward_testbed::bpf::{links, netns_ino};
use nodeward_testbed::netns::nsenter;
use nodeward_testbed::sniff::{self, Sniffer};
use nodeward_testbed::traffic::{self, info_echo, read_greeting, round_trip, serve};
use nodeward_testbed::{PodSpec, Topology, TopologySpec, privileged_or_skip, shared};

const WAIT: Duration = Duration::from_secs(10);
const QUICK: Duration = Duration::from_secs(2);

fn cluster(test: &str) -> Option<Topology> {
    nodeward_testbed::two_node_cluster(test, &[])
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn sk_lookup_links(netns: &str) -> usize {
    let ino = netns_ino(netns);
    links()
        .iter()
        .filter(|l| l.attach_type == "sk_lookup" && l.netns_ino == Some(ino))
        .count()
}

/// Whether a plaintext client in `netns` gets the app's greeting from `dst`.
fn reaches(netns: &str, dst: SocketAddr) -> bool {
    traffic::connect_timeout(netns, dst, QUICK).is_ok_and(|s| read_greeting(&s).is_ok())
}

/// Refused at connect, or accepted and then closed or reset without a
/// byte, within `QUICK`: not left hanging.
#[track_caller]
fn assert_refused_quickly(netns: &str, dst: SocketAddr) {
    match traffic::connect_timeout(netns, dst, QUICK) {
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset),
            "{dst}: unexpected error {e}"
        ),
        Ok(mut s) => {
            s.set_read_timeout(Some(QUICK)).unwrap();
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(0) => {}
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted) => {}
                other => panic!("{dst}: not refused within {QUICK:?}: {other:?}"),
            }
        }
    }
}

fn strict(t: &Topology) {
    t.apply(
        "pa",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: mesh}\nspec:\n  mtls: {mode: STRICT}\n",
    );
}

#[test]
fn a_pod_dialling_the_agents_own_listeners_is_refused_at_once_without_a_loop() {
    let _g = shared();
    let Some(t) = cluster("a_pod_dialling_the_agents_own_listeners_is_refused_at_once_without_a_loop") else {
        return;
    };
    let (a, c, d) = (t.pod("a").clone(), t.pod("c").clone(), t.pod("d").clone());
    let _sa = serve(&a.netns, a.v4(7000), info_echo);
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    let _sd = serve(&d.netns, d.v4(15008), info_echo);
    round_trip(&a.netns, c.v4(7000), b"warm up").unwrap();
    let agent = t.agent(0);
    let before = open_fds(agent.pid());

    // The agent's listeners on the pod's loopback, every family and port.
    for dst in [
        "127.0.0.1:15006",
        "127.0.0.1:15008",
        "127.0.0.1:15001",
        "[::1]:15006",
        "[::1]:15008",
        "[::1]:15001",
    ] {
        assert_refused_quickly(&a.netns, dst.parse().unwrap());
    }
    // Another enrolled pod's agent ports, across the mesh.
    assert_refused_quickly(&a.netns, c.v4(15006));
    assert_refused_quickly(&a.netns, c.v4(15008));

    std::thread::sleep(Duration::from_millis(300));
    let after = open_fds(agent.pid());
    assert!(
        after <= before + 8,
        "the agent's descriptors grew from {before} to {after}"
    );
    for (direction, dst) in [
        ("inbound", "127.0.0.1:15006".to_string()),
        ("inbound", "[::1]:15006".to_string()),
        ("outbound", c.v4(15008).to_string()),
    ] {
        let l = agent
            .wait_connection(direction, &dst, QUICK)
            .unwrap_or_else(|| panic!("{direction} {dst} not logged:\n{}", agent.dump()));
        assert_eq!(l["reason"], "loop_refused", "{l}");
    }
    agent
        .wait_log(QUICK, |l| {
            l["direction"] == "inbound_tunnel" && l["reason"] == "loop_refused"
        })
        .unwrap_or_else(|| panic!("tunnel loop refusal not logged:\n{}", agent.dump()));

    // The pod's other traffic is untouched: mesh both ways, and passthrough
    // to an agent port of a pod outside the mesh.
    round_trip(&a.netns, c.v4(7000), b"meshed").unwrap();
    assert!(traffic::captured(&a.netns, c.v4(7000)).unwrap(), "still captured");
    round_trip(&c.netns, a.v4(7000), b"inbound").unwrap();
    round_trip(&a.netns, d.v4(15008), b"not mesh").unwrap();
}

#[test]
fn a_decoy_namespace_holding_a_pods_ip_does_not_strip_its_capture_when_the_agent_restarts() {
    let _g = shared();
    let Some(mut t) = cluster("a_decoy_namespace_holding_a_pods_ip_does_not_strip_its_capture_when_the_agent_restarts")
    else {
        return;
    };
    let (a, c, d) = (t.pod("a").clone(), t.pod("c").clone(), t.pod("d").clone());
    let _sa = serve(&a.netns, a.v4(7000), info_echo);
    strict(&t);
    let since = Instant::now();
    while reaches(&d.netns, a.v4(7000)) {
        assert!(since.elapsed() < WAIT, "STRICT never applied");
        std::thread::sleep(Duration::from_millis(100));
    }

    let decoy = t.add_decoy("decoy", &[IpAddr::V4(a.ip4), IpAddr::V6(a.ip6)]);
    t.agent_mut(0).kill();
    t.start_agent(0, &[]);
    t.wait_captured(0);

    assert!(!reaches(&d.netns, a.v4(7000)), "plaintext reached a STRICT pod");
    assert!(!reaches(&d.netns, a.v6(7000)), "plaintext reached a STRICT pod");
    round_trip(&c.netns, a.v4(7000), b"meshed").unwrap();
    assert_eq!(sk_lookup_links(&a.netns), 1, "the pod keeps its steering");
    assert_eq!(sk_lookup_links(&decoy), 0, "the decoy is left alone");
}

#[test]
fn a_new_pod_whose_ip_a_decoy_already_holds_is_quarantined_until_the_decoy_goes() {
    let _g = shared();
    let Some(mut t) = cluster("a_new_pod_whose_ip_a_decoy_already_holds_is_quarantined_until_the_decoy_goes") else {
        return;
    };
    let (c, d) = (t.pod("c").clone(), t.pod("d").clone());
    let e = t.add_pod(0, PodSpec::new("e", "mesh"));
    let decoy = t.add_decoy("decoy", &[IpAddr::V4(e.ip4)]);
    let _se = serve(&e.netns, e.v4(7000), info_echo);
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    t.write_config();

    let warning = t
        .agent(0)
        .wait_log(WAIT, |l| {
            l["pod"] == "mesh/e" && l["level"] == "WARN" && l.to_string().contains(&format!("netns/{}", e.netns))
        })
        .unwrap_or_else(|| panic!("no warning for mesh/e:\n{}", t.agent(0).dump()));
    let text = warning.to_string();
    assert!(text.contains(&format!("netns/{decoy}")), "the decoy is named: {text}");

    // Not left open meanwhile: nothing in, nothing out.
    assert!(!reaches(&d.netns, e.v4(7000)), "plaintext reached an ambiguous pod");
    assert!(!reaches(&e.netns, c.v4(7000)), "an ambiguous pod's connection went out");

    // The decoy goes: the pod is captured and its quarantine released.
    t.remove_decoy(&decoy);
    t.agent(0)
        .wait_log(WAIT, |l| l["message"] == "pod captured" && l["pod"] == "mesh/e")
        .unwrap_or_else(|| panic!("not captured:\n{}", t.agent(0).dump()));
    round_trip(&e.netns, c.v4(7000), b"captured").unwrap();
    assert!(traffic::captured(&e.netns, c.v4(7000)).unwrap(), "captured");
    round_trip(&d.netns, e.v4(7000), b"permissive").unwrap();
}

/// The agent's default `--socket-mark`, as the README prints it.
const AGENT_MARK: &str = "0x4e57";

/// Runs the hostile client inside `netns` as nobody with `CAP_NET_RAW`
/// alone (what container runtimes grant by default): it marks its socket
/// with the agent's mark, connects to `dst` and sends `payload`. Returns
/// its exit code and what it printed.
fn forged_mark_client(netns: &str, dst: std::net::SocketAddr, payload: &str) -> (i32, String) {
    let out = nsenter(
        netns,
        &[
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--inh-caps=-all,+net_raw",
            "--ambient-caps=-all,+net_raw",
            "--bounding-set=-all,+net_raw",
            env!("CARGO_BIN_EXE_nodeward-marked-client"),
            AGENT_MARK,
            &dst.to_string(),
            payload,
        ],
    )
    .output()
    .expect("run setpriv (util-linux) and the marked client");
    let code = out.status.code().unwrap_or(-1);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_ne!(
        code,
        2,
        "the client could not set the mark with CAP_NET_RAW: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code, text)
}

#[test]
fn a_pod_forging_the_agents_socket_mark_with_cap_net_raw_is_still_captured() {
    let _g = shared();
    let test = "a_pod_forging_the_agents_socket_mark_with_cap_net_raw_is_still_captured";
    if !privileged_or_skip(test) {
        return;
    }
    let mut spec = TopologySpec::two_nodes();
    spec.nodes[0][0] = PodSpec::new("a", "mesh").annotation("nodeward.io/egress", "tls-only");
    let mut t = Topology::build(spec);
    t.start_agents();
    let (a, c, d) = (t.pod("a").clone(), t.pod("c").clone(), t.pod("d").clone());
    let _sc = serve(&c.netns, c.v4(7100), info_echo);
    let _sd = serve(&d.netns, d.v4(7200), info_echo);

    // To an enrolled pod on the other node: tunnelled, so the payload never
    // crosses the node link in the clear, and c's agent sees a's identity.
    let secret = "forged-mark-secret-payload";
    let wire = Sniffer::start(&t.nodes[0].netns, &t.nodes[0].uplink);
    let (code, back) = forged_mark_client(&a.netns, c.v4(7100), secret);
    let packets = wire.finish();
    assert_eq!(code, 0, "the connection to c failed: {back}");
    assert!(
        back.contains(&format!("peer={}", a.ip4)),
        "c's app did not see a: {back:?}"
    );
    assert!(back.ends_with(secret), "not echoed: {back:?}");
    assert!(
        !sniff::contains(&packets, secret.as_bytes()),
        "the marked connection crossed the node link in plaintext"
    );
    let out = t
        .agent(0)
        .wait_connection("outbound", &c.v4(7100).to_string(), WAIT)
        .unwrap_or_else(|| panic!("a's marked connection not logged:\n{}", t.agent(0).dump()));
    assert_eq!(
        (out["pod"].as_str(), out["transport"].as_str()),
        (Some("mesh/a"), Some("hbone")),
        "{out}"
    );
    let inb = t
        .agent(1)
        .wait_connection("inbound_tunnel", &c.v4(7100).to_string(), WAIT)
        .unwrap_or_else(|| panic!("no tunnel at c:\n{}", t.agent(1).dump()));
    assert_eq!(inb["peer_identity"], "spiffe://cluster.local/ns/mesh/sa/a");

    // Under tls-only egress, plaintext to a destination outside the mesh is
    // refused, logged and named, mark or no mark.
    let (_, back) = forged_mark_client(&a.netns, d.v4(7200), "GET / HTTP/1.1\r\n\r\n");
    assert!(
        !back.contains("peer="),
        "plaintext reached the outside server: {back:?}"
    );
    let out = t
        .agent(0)
        .wait_connection("outbound", &d.v4(7200).to_string(), WAIT)
        .unwrap_or_else(|| panic!("the refusal is not logged:\n{}", t.agent(0).dump()));
    assert_eq!(
        (out["pod"].as_str(), out["reason"].as_str()),
        (Some("mesh/a"), Some("egress_plaintext")),
        "{out}"
    );
}

/// One `GET /healthz/ready` from inside `netns` to `addr`, read within
/// `within`: the status code.
fn ready_within(netns: &str, addr: SocketAddr, within: Duration) -> std::io::Result<u16> {
    use std::io::Write;
    let mut s = traffic::connect_timeout(netns, addr, within)?;
    s.set_read_timeout(Some(within))?;
    s.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: nodeward\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {out:?}")))
}

#[test]
fn two_hundred_slow_connections_from_a_pod_do_not_starve_the_nodes_readiness_probe() {
    let _g = shared();
    let Some(t) = cluster("two_hundred_slow_connections_from_a_pod_do_not_starve_the_nodes_readiness_probe") else {
        return;
    };
    let (node, d) = (&t.nodes[1], t.pod("d").clone());
    // The kubelet probes the agent on the node's address, from the node.
    let probe = SocketAddr::new(IpAddr::V4(node.gateway4), 15021);
    let within = nodeward_testbed::patience(Duration::from_secs(1));
    assert!(
        ready_within(&node.netns, probe, within).is_ok(),
        "readiness answers at rest"
    );

    // A pod opens 200 connections to the node's readiness port and never
    // sends a request; the ones the agent does not close at once stay open.
    let slow: Vec<std::net::TcpStream> = (0..200)
        .filter_map(|_| traffic::connect_timeout(&d.netns, probe, QUICK).ok())
        .collect();
    assert!(!slow.is_empty(), "the pod reaches the node's readiness port");
    for i in 0..5 {
        let answer = ready_within(&node.netns, probe, within);
        assert!(
            answer.is_ok(),
            "the node's readiness request {i} beside {} slow connections from a pod: {answer:?}",
            slow.len()
        );
    }
    drop(slow);
}
