//! Unit tests of `service.rs`.

use super::*;

fn ep(ip: &str, node: &str, ready: bool, terminating: bool) -> Endpoint {
    Endpoint {
        addresses: vec![ip.parse().unwrap()],
        ready,
        serving: ready || terminating,
        terminating,
        node_name: node.into(),
        pod: None,
    }
}

fn svc(ports: Vec<ServicePort>) -> Service {
    Service {
        namespace: "shop".into(),
        name: "web".into(),
        cluster_ips: vec!["10.96.0.10".parse().unwrap(), "fd00:96::10".parse().unwrap()],
        ports,
        kind: "ClusterIP".into(),
        has_selector: true,
        internal_local: false,
        affinity: None,
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
    }
}

fn port(name: &str, port: u16, target: &str) -> ServicePort {
    ServicePort {
        name: name.into(),
        port,
        target_port: target.into(),
        protocol: "TCP".into(),
        node_port: None,
    }
}

fn slice(family: &str, ports: &[(&str, u16)], endpoints: Vec<Endpoint>) -> EndpointSlice {
    EndpointSlice {
        namespace: "shop".into(),
        name: format!("web-{family}"),
        service: "web".into(),
        address_type: family.into(),
        ports: ports
            .iter()
            .map(|(n, p)| SlicePort {
                name: (*n).into(),
                port: Some(*p),
                protocol: "TCP".into(),
            })
            .collect(),
        endpoints,
    }
}

fn target_of(svc: Service, slices: Vec<EndpointSlice>, vip: &str) -> Arc<ServiceTarget> {
    let slices: Vec<_> = slices.into_iter().map(Arc::new).collect();
    let t = targets(&[Arc::new(svc)], &slices, |_| true, |_| false).by_addr;
    t[&vip.parse::<SocketAddr>().unwrap()].clone()
}

#[test]
fn service_ports_map_to_endpoint_ports_by_name_per_family() {
    let s = svc(vec![port("http", 80, "web-http"), port("admin", 81, "9000")]);
    let slices = vec![
        slice(
            "IPv4",
            &[("http", 8080), ("admin", 9000)],
            vec![ep("10.1.1.1", "n1", true, false)],
        ),
        slice("IPv6", &[("http", 8086)], vec![ep("fd00:1::1", "n1", true, false)]),
    ];
    let all = targets(
        &[Arc::new(s)],
        &slices.into_iter().map(Arc::new).collect::<Vec<_>>(),
        |_| true,
        |_| false,
    )
    .by_addr;
    let addrs = |vip: &str| -> Vec<String> {
        all[&vip.parse::<SocketAddr>().unwrap()]
            .candidates
            .iter()
            .map(|c| c.addr.to_string())
            .collect()
    };
    assert_eq!(addrs("10.96.0.10:80"), ["10.1.1.1:8080"], "named targetPort");
    assert_eq!(addrs("10.96.0.10:81"), ["10.1.1.1:9000"]);
    assert_eq!(
        addrs("[fd00:96::10]:80"),
        ["[fd00:1::1]:8086"],
        "IPv6 ClusterIP, IPv6 slice"
    );
    assert!(addrs("[fd00:96::10]:81").is_empty(), "no IPv6 endpoint port for admin");
}

#[test]
fn headless_external_name_and_selectorless_outside_services_are_not_resolved() {
    let mut headless = svc(vec![port("", 80, "80")]);
    headless.cluster_ips.clear();
    let mut external = svc(vec![port("", 80, "80")]);
    external.kind = "ExternalName".into();
    let mut manual = svc(vec![port("", 80, "80")]);
    manual.has_selector = false;
    let slices = vec![Arc::new(slice(
        "IPv4",
        &[("", 80)],
        vec![ep("192.0.2.1", "", true, false)],
    ))];
    for (name, s) in [
        ("headless", headless),
        ("ExternalName", external),
        ("selector-less", manual),
    ] {
        assert!(
            targets(&[Arc::new(s)], &slices, |_| false, |_| false)
                .by_addr
                .is_empty(),
            "{name}"
        );
    }
    let mut manual_to_pods = svc(vec![port("", 80, "80")]);
    manual_to_pods.has_selector = false;
    assert!(
        !targets(&[Arc::new(manual_to_pods)], &slices, |_| true, |_| false)
            .by_addr
            .is_empty()
    );
}

#[test]
fn two_choices_go_to_the_endpoint_with_fewer_open_connections() {
    let s = svc(vec![port("", 80, "8080")]);
    let client = "10.1.1.100".parse().unwrap();
    let b = Arc::new(Balancer::default());
    // Two endpoints: both are always the two choices, so held
    // connections alternate exactly (random choice would not).
    let eps = (1..=2).map(|i| ep(&format!("10.1.1.{i}"), "n1", true, false)).collect();
    let t = target_of(s.clone(), vec![slice("IPv4", &[("", 8080)], eps)], "10.96.0.10:80");
    let held: Vec<OpenGuard> = (0..20).map(|_| b.pick(&t, "n1", client).unwrap()).collect();
    for c in &t.candidates {
        assert_eq!(b.open_count(c.addr), 10, "{}", c.addr);
    }
    drop(held);
    assert!(
        t.candidates.iter().all(|c| b.open_count(c.addr) == 0),
        "closed connections are uncounted"
    );
    // Three endpoints: every one takes its share.
    let eps = (1..=3).map(|i| ep(&format!("10.1.1.{i}"), "n1", true, false)).collect();
    let t = target_of(s, vec![slice("IPv4", &[("", 8080)], eps)], "10.96.0.10:80");
    let _held: Vec<OpenGuard> = (0..30).map(|_| b.pick(&t, "n1", client).unwrap()).collect();
    for c in &t.candidates {
        let n = b.open_count(c.addr);
        assert!((6..=14).contains(&n), "{} has {n} of 30", c.addr);
    }
}

#[test]
fn not_ready_local_and_terminating_endpoints() {
    let s = svc(vec![port("", 80, "8080")]);
    let eps = vec![
        ep("10.1.1.1", "n1", false, false),
        ep("10.1.1.2", "n2", true, false),
        ep("10.1.1.3", "n1", false, true),
    ];
    let t = target_of(s.clone(), vec![slice("IPv4", &[("", 8080)], eps)], "10.96.0.10:80");
    let b = Arc::new(Balancer::default());
    let client = "10.1.1.100".parse().unwrap();
    for _ in 0..20 {
        assert_eq!(b.pick(&t, "n1", client).unwrap().addr().to_string(), "10.1.1.2:8080");
    }
    let mut local = s;
    local.internal_local = true;
    let eps = vec![
        ep("10.1.1.1", "n1", false, false),
        ep("10.1.1.2", "n2", true, false),
        ep("10.1.1.3", "n1", false, true),
    ];
    let t = target_of(local, vec![slice("IPv4", &[("", 8080)], eps)], "10.96.0.10:80");
    assert_eq!(
        b.pick(&t, "n1", client).unwrap().addr().to_string(),
        "10.1.1.3:8080",
        "Local: the node's serving terminating endpoint when none of its own is ready"
    );
    assert!(b.pick(&t, "n3", client).is_none(), "Local with no endpoint on the node");
}

#[test]
fn client_ip_affinity_sticks_until_its_timeout() {
    let mut s = svc(vec![port("", 80, "8080")]);
    s.affinity = Some(Duration::from_secs(60));
    let eps = (1..=4).map(|i| ep(&format!("10.1.1.{i}"), "n1", true, false)).collect();
    let t = target_of(s, vec![slice("IPv4", &[("", 8080)], eps)], "10.96.0.10:80");
    let b = Arc::new(Balancer::default());
    let client: IpAddr = "10.1.1.100".parse().unwrap();
    let t0 = Instant::now();
    let first = b.pick_at(&t, "n1", client, t0).unwrap().addr();
    // Held open, so two choices alone would move on.
    let held: Vec<_> = (0..20)
        .map(|i| b.pick_at(&t, "n1", client, t0 + Duration::from_secs(i)).unwrap())
        .collect();
    assert!(held.iter().all(|g| g.addr() == first));
    let other: IpAddr = "10.1.1.101".parse().unwrap();
    assert_ne!(
        b.pick_at(&t, "n1", other, t0).unwrap().addr(),
        first,
        "another client is balanced"
    );
    let later = b.pick_at(&t, "n1", client, t0 + Duration::from_secs(19 + 61)).unwrap();
    assert_ne!(later.addr(), first, "after the timeout the loaded endpoint is left");
}

#[test]
fn external_load_balancer_and_node_port_addresses_resolve_like_the_cluster_ip_without_internal_local() {
    let mut s = svc(vec![ServicePort {
        node_port: Some(30080),
        ..port("http", 80, "8080")
    }]);
    s.internal_local = true;
    s.external_ips = vec!["192.0.2.10".parse().unwrap()];
    s.load_balancer_ips = vec!["203.0.113.7".parse().unwrap(), "2001:db8::7".parse().unwrap()];
    let slices: Vec<_> = [
        slice("IPv4", &[("http", 8080)], vec![ep("10.1.1.1", "n1", true, false)]),
        slice("IPv6", &[("http", 8080)], vec![ep("fd00:1::1", "n1", true, false)]),
    ]
    .into_iter()
    .map(Arc::new)
    .collect();
    let all = targets(&[Arc::new(s)], &slices, |ip| ip.to_string() == "10.1.1.1", |_| false);
    let at = |a: &str| all.by_addr.get(&a.parse::<SocketAddr>().unwrap()).cloned();
    let vip = at("10.96.0.10:80").unwrap();
    assert!(vip.internal_local, "the ClusterIP keeps internalTrafficPolicy");
    let node_port = |v4| all.by_node_port.get(&(30080, v4)).cloned();
    let external = ["192.0.2.10:80", "203.0.113.7:80"].map(|a| (a, at(a)));
    for (a, t) in external.into_iter().chain([("nodePort, IPv4", node_port(true))]) {
        let t = t.unwrap_or_else(|| panic!("{a} not resolved"));
        assert_eq!(t.candidates, vip.candidates, "{a}: the ClusterIP's endpoints");
        assert!(!t.internal_local, "{a}: every endpoint, as kube-proxy for pods");
    }
    let v6 = node_port(false).unwrap();
    assert_eq!(
        v6.candidates[0].addr.to_string(),
        "[fd00:1::1]:8080",
        "the address's family"
    );
    assert!(at("[2001:db8::7]:80").is_some());
    assert!(
        at("192.0.2.10:30080").is_none(),
        "an external IP only on the Service port"
    );
}

#[test]
fn an_external_address_never_takes_a_cluster_ip_a_pod_ip_or_another_services_address() {
    let mk = |name: &str, vip: &str, external: &[&str]| {
        let mut s = svc(vec![port("", 80, "8080")]);
        s.name = name.into();
        s.cluster_ips = vec![vip.parse().unwrap()];
        s.external_ips = external.iter().map(|a| a.parse().unwrap()).collect();
        Arc::new(s)
    };
    let first = mk("first", "10.96.0.1", &["192.0.2.1"]);
    // Claims the first's ClusterIP, a pod's IP, and the first's external IP.
    let thief = mk("thief", "10.96.0.2", &["10.96.0.1", "10.1.1.9", "192.0.2.1"]);
    let all = targets(&[first, thief], &[], |ip| ip.to_string() == "10.1.1.9", |_| false).by_addr;
    let holder = |a: &str| all.get(&a.parse::<SocketAddr>().unwrap()).map(|t| t.service.clone());
    assert_eq!(holder("10.96.0.1:80").as_deref(), Some("shop/first"));
    assert_eq!(holder("192.0.2.1:80").as_deref(), Some("shop/first"));
    assert_eq!(holder("10.1.1.9:80"), None, "the pod keeps its IP");
    assert_eq!(holder("10.96.0.2:80").as_deref(), Some("shop/thief"));
}

#[test]
fn a_load_balancers_address_outranks_external_ips_and_a_node_address_is_never_taken() {
    let mk = |name: &str, vip: &str, external: &[&str], lb: &[&str]| {
        let mut s = svc(vec![port("", 80, "8080")]);
        s.name = name.into();
        s.cluster_ips = vec![vip.parse().unwrap()];
        s.external_ips = external.iter().map(|a| a.parse().unwrap()).collect();
        s.load_balancer_ips = lb.iter().map(|a| a.parse().unwrap()).collect();
        Arc::new(s)
    };
    // `a-thief` sorts first, and names prod's load balancer address and
    // a node's address in its externalIPs.
    let thief = mk("a-thief", "10.96.0.2", &["203.0.113.7", "10.0.0.5"], &[]);
    let prod = mk("prod", "10.96.0.1", &[], &["203.0.113.7"]);
    let all = targets(&[thief, prod], &[], |_| false, |ip| ip.to_string() == "10.0.0.5").by_addr;
    let holder = |a: &str| all.get(&a.parse::<SocketAddr>().unwrap()).map(|t| t.service.clone());
    assert_eq!(holder("203.0.113.7:80").as_deref(), Some("shop/prod"));
    assert_eq!(holder("10.0.0.5:80"), None, "the node keeps its address");
}
