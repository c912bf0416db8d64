//! Services: a connection to a ClusterIP is resolved by the agent to one of
//! the Service's endpoints and carried like a connection to that endpoint:
//! HBONE to an enrolled pod, plaintext to anything else, refused when no
//! endpoint may take it. There is no kube-proxy in the test bed, so a
//! ClusterIP reaches nothing unless the agent resolves it.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use nodeward_testbed::netns::nsenter;
use nodeward_testbed::sniff::{Sniffer, contains};
use nodeward_testbed::traffic::{self, info_echo, read_greeting, round_trip, serve};
use nodeward_testbed::{EndpointSpec, PodSpec, ServiceSpec, Topology, TopologySpec, privileged_or_skip, shared};

const WAIT: Duration = Duration::from_secs(10);
const VIP4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10));
const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x5e, 0, 0, 0, 0, 0, 0x10));
const MARKER: &[u8] = b"NODEWARD-SERVICE-PLAINTEXT-MARKER-41d2";

/// node 1: `a`, `b` (mesh), `p` (not enrolled); node 2: `c`, `e` (mesh), `d` (not enrolled).
fn cluster(test: &str) -> Option<Topology> {
    if !privileged_or_skip(test) {
        return None;
    }
    let spec = TopologySpec {
        nodes: vec![
            vec![
                PodSpec::new("a", "mesh"),
                PodSpec::new("b", "mesh"),
                PodSpec::new("p", "plain"),
            ],
            vec![
                PodSpec::new("c", "mesh"),
                PodSpec::new("e", "mesh"),
                PodSpec::new("d", "plain"),
            ],
        ],
        namespaces: vec![("mesh".into(), true), ("plain".into(), false)],
    };
    let mut t = Topology::build(spec);
    t.start_agents();
    Some(t)
}

/// Pod `name` as a ready endpoint.
fn endpoint(t: &Topology, name: &str) -> EndpointSpec {
    let p = t.pod(name);
    EndpointSpec::pod(name, &[p.ip4.into(), p.ip6.into()], &t.nodes[p.node].name)
}

/// Service `web` in `mesh`, dual-stack, port 80 to the named port `http`
/// (8080 on the endpoints), with the given endpoints.
fn web(t: &Topology, endpoints: &[&str]) -> ServiceSpec {
    ServiceSpec {
        name: "web".into(),
        namespace: "mesh".into(),
        cluster_ips: vec![VIP4, VIP6],
        ports: vec![("http".into(), 80, "http".into(), 8080)],
        endpoints: endpoints.iter().map(|e| endpoint(t, e)).collect(),
        ..Default::default()
    }
}

/// Applies the Service and waits until a connection through it gets an
/// answer (the agent has read it).
fn apply_and_wait(t: &Topology, svc: &ServiceSpec, from: &str, vip: SocketAddr) {
    t.apply(&format!("svc-{}", svc.name), &svc.to_yaml());
    wait_reach(t, from, vip);
}

/// Waits until a connection from `from` to `vip` gets an answer.
fn wait_reach(t: &Topology, from: &str, vip: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while reach(&t.pod(from).netns, vip).is_err() {
        assert!(Instant::now() < deadline, "{vip} never reached from {from}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Connects and reads the greeting: what the endpoint's server saw.
fn reach(netns: &str, dst: SocketAddr) -> std::io::Result<traffic::Seen> {
    traffic::connect_timeout(netns, dst, Duration::from_secs(3)).and_then(|s| read_greeting(&s))
}

/// Servers answering `info_echo` on port 8080 of `pods`, both families.
fn servers(t: &Topology, pods: &[&str]) -> Vec<traffic::Server> {
    pods.iter()
        .flat_map(|n| {
            let p = t.pod(n);
            [
                serve(&p.netns, p.v4(8080), info_echo),
                serve(&p.netns, p.v6(8080), info_echo),
            ]
        })
        .collect()
}

#[test]
fn a_service_spreads_connections_over_all_its_endpoints_over_hbone_only() {
    let _g = shared();
    let Some(t) = cluster("a_service_spreads_connections_over_all_its_endpoints_over_hbone_only") else {
        return;
    };
    let _s = servers(&t, &["b", "c", "e"]);
    let a = t.pod("a").clone();
    for (vip, own) in [
        (SocketAddr::new(VIP4, 80), IpAddr::from(a.ip4)),
        (SocketAddr::new(VIP6, 80), a.ip6.into()),
    ] {
        apply_and_wait(&t, &web(&t, &["b", "c", "e"]), "a", vip);
        let n1 = &t.nodes[0].netns;
        let (uplink, bridge) = (Sniffer::start(n1, &t.nodes[0].uplink), Sniffer::start(n1, "br0"));
        let mut reached = BTreeSet::new();
        let mut msg = MARKER.repeat(10);
        msg.push(b'\n');
        for _ in 0..60 {
            let (seen, client_peer, _) = round_trip(&a.netns, vip, &msg).unwrap();
            assert_eq!(client_peer, vip, "the app's getpeername shows the ClusterIP");
            assert_eq!(seen.peer.ip(), own, "the endpoint sees the client pod's IP");
            assert_eq!(seen.local.port(), 8080, "named targetPort: the endpoint's port");
            reached.insert(seen.local.ip());
        }
        let want: BTreeSet<IpAddr> = ["b", "c", "e"]
            .iter()
            .map(|n| {
                let p = t.pod(n);
                if vip.is_ipv4() { p.ip4.into() } else { p.ip6.into() }
            })
            .collect();
        assert_eq!(
            reached, want,
            "{vip}: every endpoint, of the ClusterIP's family, takes connections"
        );
        assert!(!contains(&uplink.finish(), MARKER), "{vip}: plaintext between nodes");
        assert!(
            !contains(&bridge.finish(), MARKER),
            "{vip}: plaintext on the node's bridge"
        );
        let line = t
            .agent(0)
            .wait_log(WAIT, |l| {
                l["message"] == "connection closed" && l["service"] == "mesh/web" && l["transport"] == "hbone"
            })
            .unwrap_or_else(|| panic!("no hbone line naming the Service:\n{}", t.agent(0).dump()));
        assert_eq!(line["direction"], "outbound");
    }
    // The counters carry the Service too.
    let m = nodeward_testbed::admin::metrics(&t.nodes[0].netns);
    assert!(
        m.contains("destination_service_name=\"web\",destination_service_namespace=\"mesh\""),
        "no series naming the Service:\n{m}"
    );
}

#[test]
fn not_ready_endpoints_stop_taking_connections_and_none_ready_is_refused_at_once() {
    let _g = shared();
    let Some(t) = cluster("not_ready_endpoints_stop_taking_connections_and_none_ready_is_refused_at_once") else {
        return;
    };
    let _s = servers(&t, &["c", "e"]);
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let vip = SocketAddr::new(VIP4, 80);
    let mut svc = web(&t, &["c", "e"]);
    apply_and_wait(&t, &svc, "a", vip);
    // An established connection to each endpoint, kept across the changes.
    let held: Vec<_> = (0..8)
        .map(|_| {
            let s = traffic::connect(&a.netns, vip).unwrap();
            let seen = read_greeting(&s).unwrap();
            (s, seen)
        })
        .collect();
    assert!(
        held.iter().any(|(_, s)| s.local.ip() != IpAddr::from(c.ip4)),
        "e took some"
    );

    svc.endpoints[1].ready = false;
    t.apply("svc-web", &svc.to_yaml());
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..20 {
        let seen = reach(&a.netns, vip).unwrap();
        assert_eq!(
            seen.local.ip(),
            IpAddr::from(c.ip4),
            "a not-ready endpoint takes no new connection"
        );
    }
    for (mut s, seen) in held {
        s.write_all(b"still").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        assert_eq!(
            back, b"still",
            "the established connection to {} was not cut",
            seen.local
        );
    }

    svc.endpoints[0].ready = false;
    t.apply("svc-web", &svc.to_yaml());
    std::thread::sleep(Duration::from_secs(1));
    let started = Instant::now();
    let r = reach(&a.netns, vip);
    assert!(r.is_err(), "no ready endpoint, yet reached: {r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once, not left to time out"
    );
    t.agent(0)
        .wait_log(WAIT, |l| l["reason"] == "no_endpoint" && l["service"] == "mesh/web")
        .unwrap_or_else(|| panic!("no_endpoint not logged:\n{}", t.agent(0).dump()));
    let stats = nodeward_testbed::admin::metrics(&t.nodes[0].netns);
    assert!(
        stats.contains("reason=\"no_endpoint\""),
        "refusals are counted:\n{stats}"
    );
}

#[test]
fn internal_traffic_policy_local_keeps_connections_on_the_node() {
    let _g = shared();
    let Some(t) = cluster("internal_traffic_policy_local_keeps_connections_on_the_node") else {
        return;
    };
    let _s = servers(&t, &["b", "c", "e"]);
    let vip = SocketAddr::new(VIP4, 80);
    let mut svc = web(&t, &["b", "c", "e"]);
    svc.local = true;
    apply_and_wait(&t, &svc, "a", vip);
    wait_reach(&t, "c", vip);
    for _ in 0..20 {
        assert_eq!(
            reach(&t.pod("a").netns, vip).unwrap().local.ip(),
            IpAddr::from(t.pod("b").ip4)
        );
        // Node 2's endpoints, the client itself among them.
        let from_c = reach(&t.pod("c").netns, vip).unwrap().local.ip();
        assert!(from_c == IpAddr::from(t.pod("c").ip4) || from_c == IpAddr::from(t.pod("e").ip4));
    }
    // A Service of its own (a fresh ClusterIP, so no earlier state answers).
    let mut own = svc.clone();
    own.name = "self".into();
    own.cluster_ips = vec![IpAddr::V4(Ipv4Addr::new(198, 18, 0, 11))];
    own.endpoints.retain(|e| e.pod.as_deref() == Some("c"));
    let own_vip = SocketAddr::new(own.cluster_ips[0], 80);
    apply_and_wait(&t, &own, "c", own_vip);
    let seen = reach(&t.pod("c").netns, own_vip).unwrap();
    assert_eq!(
        seen.local,
        t.pod("c").v4(8080),
        "a pod calling its own Service reaches itself"
    );
}

#[test]
fn a_service_whose_endpoint_is_outside_the_mesh_is_reached_in_plaintext_at_the_endpoint() {
    let _g = shared();
    let Some(t) = cluster("a_service_whose_endpoint_is_outside_the_mesh_is_reached_in_plaintext_at_the_endpoint")
    else {
        return;
    };
    let _s = servers(&t, &["d"]);
    let d = t.pod("d").clone();
    let vip = SocketAddr::new(VIP4, 80);
    let mut svc = web(&t, &["d"]);
    svc.namespace = "plain".into();
    apply_and_wait(&t, &svc, "a", vip);
    let sniffer = Sniffer::start(&t.nodes[0].netns, &t.nodes[0].uplink);
    let mut msg = MARKER.repeat(10);
    msg.push(b'\n');
    let (seen, client_peer, _) = round_trip(&t.pod("a").netns, vip, &msg).unwrap();
    assert!(contains(&sniffer.finish(), MARKER), "plaintext, as to the pod itself");
    assert_eq!(seen.local, d.v4(8080), "to the endpoint's address, not the ClusterIP");
    assert_eq!(seen.peer.ip(), IpAddr::from(t.pod("a").ip4));
    assert_eq!(client_peer, vip);
    let l = t
        .agent(0)
        .wait_connection("outbound", &d.v4(8080).to_string(), WAIT)
        .unwrap();
    assert_eq!(l["transport"], "passthrough");
    assert_eq!(l["service"], "plain/web");
}

/// What kube-proxy does in a pod's view: `vip` is DNATed to `to` in the
/// pod's namespace, so an uncaptured client reaches the endpoint itself.
fn kube_proxy_dnat(netns: &str, vip: SocketAddr, to: SocketAddr) {
    let out = nsenter(
        netns,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            &vip.ip().to_string(),
            "--dport",
            &vip.port().to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &to.to_string(),
        ],
    )
    .output()
    .expect("run iptables");
    assert!(
        out.status.success(),
        "iptables: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn strict_endpoints_take_service_calls_from_enrolled_clients_only() {
    let _g = shared();
    let Some(t) = cluster("strict_endpoints_take_service_calls_from_enrolled_clients_only") else {
        return;
    };
    let _s = servers(&t, &["c"]);
    let vip = SocketAddr::new(VIP4, 80);
    t.apply(
        "pa",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: mesh}\nspec:\n  mtls: {mode: STRICT}\n",
    );
    apply_and_wait(&t, &web(&t, &["c"]), "a", vip);
    let seen = reach(&t.pod("a").netns, vip).unwrap();
    assert_eq!(seen.local, t.pod("c").v4(8080), "an enrolled client's call is mTLS");
    let p = t.pod("p").clone();
    kube_proxy_dnat(&p.netns, vip, t.pod("c").v4(8080));
    // Each agent applies the policy within its own poll: node 2's may
    // still be a poll behind node 1's.
    let deadline = Instant::now() + Duration::from_secs(3);
    let r = loop {
        let r = reach(&p.netns, vip);
        if r.is_err() || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        r.is_err(),
        "plaintext from a client outside the mesh reached a STRICT endpoint: {r:?}"
    );
    t.agent(1)
        .wait_log(WAIT, |l| l["reason"] == "mtls_strict")
        .unwrap_or_else(|| panic!("STRICT refusal not logged:\n{}", t.agent(1).dump()));
}

#[test]
fn with_the_agent_down_a_service_call_is_refused() {
    let _g = shared();
    let Some(mut t) = cluster("with_the_agent_down_a_service_call_is_refused") else {
        return;
    };
    let _s = servers(&t, &["c"]);
    let vip = SocketAddr::new(VIP4, 80);
    let a = t.pod("a").clone();
    apply_and_wait(&t, &web(&t, &["c"]), "a", vip);
    // Were the connection not captured, kube-proxy would carry it in plaintext.
    kube_proxy_dnat(&a.netns, vip, t.pod("c").v4(8080));
    assert_eq!(reach(&a.netns, vip).unwrap().local, t.pod("c").v4(8080));
    t.agent_mut(0).kill();
    let r = reach(&a.netns, vip);
    assert!(r.is_err(), "with the agent down a ClusterIP was reached: {r:?}");
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_endpoint() {
    let _g = shared();
    let Some(t) = cluster("client_ip_affinity_keeps_a_client_on_one_endpoint") else {
        return;
    };
    let _s = servers(&t, &["c", "e"]);
    let vip = SocketAddr::new(VIP4, 80);
    let mut svc = web(&t, &["c", "e"]);
    svc.affinity = true;
    apply_and_wait(&t, &svc, "a", vip);
    let first = reach(&t.pod("a").netns, vip).unwrap().local;
    for _ in 0..20 {
        // Without affinity, idle endpoints would be chosen at random.
        assert_eq!(reach(&t.pod("a").netns, vip).unwrap().local, first);
    }
}
