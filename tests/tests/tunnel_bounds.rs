//! Tunnel connections that hold a place and do nothing: peers holding idle
//! authenticated tunnels up to the inbound bound stop neither the node's
//! pods calling out (a bound of its own) nor, once the idle timeout has
//! sent them GOAWAY, calls into the node; a peer whose streams are all
//! refused is closed; the addresses of one IPv6 /64 are one peer; and a
//! client slow at every step of its handshake gets one deadline in all.

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use nodeward::identity::Identity;
use nodeward_testbed::hbone::{h2_client, request, tcp_from, tls_over, tls_to, trust, workload_cert};
use nodeward_testbed::netns::sh;
use nodeward_testbed::traffic::{connect_bound, info_echo, round_trip, serve};
use nodeward_testbed::{Topology, patience, shared};

/// Inbound tunnels of the node, and per peer (flags below).
const INBOUND_TUNNELS: usize = 4;
/// Refused streams in a row that close a tunnel connection (the agent's
/// `REFUSED_IN_A_ROW`).
const REFUSED_IN_A_ROW: usize = 8;

fn cluster(test: &str, extra: &[&str]) -> Option<Topology> {
    nodeward_testbed::two_node_cluster(test, extra)
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

fn secs(s: u64) -> String {
    format!("{}s", patience(Duration::from_secs(s)).as_secs())
}

/// An authenticated tunnel connection from `netns` to `dst`'s 15008 as
/// the workload `plain/hostile`, which has had one stream accepted and
/// then holds the connection open without another.
async fn idle_tunnel(t: &Topology, netns: &str, dst: SocketAddr) -> std::io::Result<h2::client::SendRequest<Bytes>> {
    let me = workload_cert(&t.ca_dir, &id("plain", "hostile"));
    let hbone = SocketAddr::new(dst.ip(), 15008);
    let tls = tls_to(
        netns,
        hbone,
        Some(me),
        id("plain", "hostile"),
        id("mesh", "c"),
        trust(&t.ca_dir),
    )
    .await?;
    let mut h2 = h2_client(tls, 1 << 20).await.map_err(std::io::Error::other)?;
    let status = request(&mut h2, http::Method::CONNECT, &dst.to_string(), None)
        .await
        .map_err(std::io::Error::other)?;
    assert_eq!(status, http::StatusCode::OK, "the hostile peer's first stream");
    Ok(h2)
}

/// Waits until the tunnel connection `h2` is closed by the server (GOAWAY
/// or EOF); false if it is still open after `timeout`.
async fn closed_within(h2: &h2::client::SendRequest<Bytes>, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, h2.clone().ready()).await {
            Err(_) => return false,
            Ok(Err(_)) => return true,
            // Still taking streams: look again shortly.
            Ok(Ok(_)) => {
                if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(100)))
                    .await
                    .is_err()
                {
                    return false;
                }
            }
        }
    }
}

#[test]
fn idle_tunnels_up_to_the_inbound_bound_stop_neither_outbound_nor_inbound_calls() {
    let _g = shared();
    let n = INBOUND_TUNNELS.to_string();
    let idle = secs(3);
    let flags = [
        "--max-inbound-tunnels",
        &n,
        "--max-tunnels-per-peer",
        &n,
        "--max-handshakes",
        &n,
        "--max-handshakes-per-peer",
        &n,
        "--max-outbound-tunnels",
        &n,
        "--max-tunnels-per-pod",
        &n,
        "--tunnel-idle-timeout",
        &idle,
    ];
    let Some(t) = cluster(
        "idle_tunnels_up_to_the_inbound_bound_stop_neither_outbound_nor_inbound_calls",
        &flags,
    ) else {
        return;
    };
    let (a, c, d) = (t.pod("a").clone(), t.pod("c").clone(), t.pod("d").clone());
    let _sa = serve(&a.netns, a.v4(7000), info_echo);
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    let rt = rt();

    // d holds every inbound tunnel place of c's node, idle.
    let held: Vec<_> = rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..INBOUND_TUNNELS {
            let h2 = idle_tunnel(&t, &d.netns, c.v4(7000))
                .await
                .unwrap_or_else(|e| panic!("idle tunnel {i} within the bound: {e}"));
            held.push(h2);
        }
        held
    });
    let past = rt.block_on(idle_tunnel(&t, &d.netns, c.v4(7000)));
    assert!(past.is_err(), "a tunnel past the inbound bound was served");

    // c still calls out through a tunnel of its own: outbound has its own bound.
    round_trip(&c.netns, a.v4(7000), b"c calls out").unwrap_or_else(|e| {
        panic!(
            "c's outbound mesh call while peers hold the inbound tunnels: {e}\n{}",
            t.agent(1).dump()
        )
    });

    // The idle tunnels are sent GOAWAY after the idle timeout...
    for (i, h2) in held.iter().enumerate() {
        assert!(
            rt.block_on(closed_within(h2, patience(Duration::from_secs(20)))),
            "idle tunnel {i} still open:\n{}",
            t.agent(1).dump()
        );
    }
    // ...and their places serve calls into the node again.
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    while let Err(e) = round_trip(&a.netns, c.v4(7000), b"a calls in") {
        assert!(
            Instant::now() < deadline,
            "a's inbound mesh call after the idle tunnels closed: {e}\n{}",
            t.agent(1).dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_peer_whose_streams_are_all_refused_is_closed_after_a_few() {
    let _g = shared();
    let Some(t) = cluster("a_peer_whose_streams_are_all_refused_is_closed_after_a_few", &[]) else {
        return;
    };
    let (c, d) = (t.pod("c").clone(), t.pod("d").clone());
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    t.apply(
        "deny-hostile",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-hostile, namespace: mesh}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source: {principals: [cluster.local/ns/plain/sa/hostile]}\n",
    );
    let me = workload_cert(&t.ca_dir, &id("plain", "hostile"));
    let tr = trust(&t.ca_dir);
    let (denied, ended) = rt().block_on(async {
        let deadline = Instant::now() + patience(Duration::from_secs(10));
        loop {
            let tls = tls_to(
                &d.netns,
                c.v4(15008),
                Some(me.clone()),
                id("plain", "hostile"),
                id("mesh", "c"),
                tr.clone(),
            )
            .await
            .unwrap();
            let mut h2 = h2_client(tls, 1 << 20).await.unwrap();
            let mut denied = 0;
            // Every policy denies the peer: it keeps asking.
            let ended = loop {
                match request(&mut h2, http::Method::CONNECT, &c.v4(7000).to_string(), None).await {
                    Ok(http::StatusCode::FORBIDDEN) if denied < 3 * REFUSED_IN_A_ROW => denied += 1,
                    Ok(http::StatusCode::FORBIDDEN) => break None,
                    Ok(other) => break Some(Ok(other)),
                    Err(e) => break Some(Err(e)),
                }
            };
            match ended {
                // The policy is not in force yet (or its arrival cut the
                // connection): try again on a new connection.
                Some(_) if denied == 0 && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                ended => return (denied, ended),
            }
        }
    });
    assert!(
        matches!(ended, Some(Err(_))),
        "after {denied} denied streams the connection still serves: {ended:?}"
    );
    assert_eq!(
        denied,
        REFUSED_IN_A_ROW,
        "closed after its refusals: {ended:?}\n{}",
        t.agent(1).dump()
    );
    t.agent(1)
        .wait_log(patience(Duration::from_secs(5)), |l| {
            l["direction"] == "inbound_tunnel" && l["reason"] == "streams_refused"
        })
        .unwrap_or_else(|| panic!("the close is not logged:\n{}", t.agent(1).dump()));
}

/// Whether the agent has closed `s` (EOF or reset), without waiting.
fn closed_by_agent(s: &mut std::net::TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

#[test]
fn unknown_ipv6_addresses_of_one_64_share_a_per_peer_bound_and_a_known_pod_has_its_own() {
    let _g = shared();
    let long = secs(120);
    let flags = ["--max-handshakes-per-peer", "2", "--handshake-timeout", &long];
    let Some(t) = cluster(
        "unknown_ipv6_addresses_of_one_64_share_a_per_peer_bound_and_a_known_pod_has_its_own",
        &flags,
    ) else {
        return;
    };
    let (c, d) = (t.pod("c").clone(), t.pod("d").clone());
    // d takes two more addresses of its /64, as a pod that answers
    // neighbour discovery for them can; no pod owns them.
    let extra = |last: u16| {
        let mut seg = d.ip6.segments();
        seg[7] = last;
        let a = Ipv6Addr::from(seg);
        sh(&[
            "ip",
            "-n",
            &d.netns,
            "addr",
            "add",
            &format!("{a}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        a
    };
    let (first, second) = (extra(0x98), extra(0x99));
    let from = |ip: IpAddr| {
        connect_bound(
            &d.netns,
            SocketAddr::new(ip, 0),
            c.v6(15008),
            patience(Duration::from_secs(5)),
        )
    };

    // Two silent handshakes from the first unknown address fill the bound
    // all unknown addresses of the /64 share.
    let mut held: Vec<_> = (0..2).map(|_| from(IpAddr::V6(first)).unwrap()).collect();
    // Other peers have their own: d's IPv4 address, and d's own IPv6
    // address, a known pod's (pods of a node share its /64).
    let mut v4 = connect_bound(
        &d.netns,
        SocketAddr::new(IpAddr::V4(d.ip4), 0),
        c.v4(15008),
        patience(Duration::from_secs(5)),
    )
    .unwrap();
    let mut own = from(IpAddr::V6(d.ip6)).unwrap();
    // The second unknown address of the same /64 is refused at once.
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    match from(IpAddr::V6(second)) {
        // Reset so soon that connect() itself saw it.
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("connecting from {second}: {e}"),
        Ok(mut s) => {
            while !closed_by_agent(&mut s) {
                assert!(
                    Instant::now() < deadline,
                    "{second} was given a handshake of its own beside {first}:\n{}",
                    t.agent(1).dump()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert!(
        held.iter_mut().all(|s| !closed_by_agent(s)),
        "the first address's handshakes stay"
    );
    assert!(!closed_by_agent(&mut v4), "another peer's handshake stays");
    assert!(
        !closed_by_agent(&mut own),
        "the known pod's own address shares no bound with unknown ones"
    );
    let st = nodeward_testbed::admin::metrics(&t.nodes[1].netns);
    assert!(
        st.contains("reason=\"limit\",refusal=\"limit_handshakes_per_peer\""),
        "refusal not counted:\n{st}"
    );
}

#[test]
fn a_client_slow_at_each_handshake_step_is_cut_at_one_deadline() {
    let _g = shared();
    // Each step alone within the deadline, together past it.
    let (deadline, step) = (patience(Duration::from_secs(4)), patience(Duration::from_secs(3)));
    let timeout = format!("{}s", deadline.as_secs());
    let Some(t) = cluster(
        "a_client_slow_at_each_handshake_step_is_cut_at_one_deadline",
        &["--handshake-timeout", &timeout],
    ) else {
        return;
    };
    let (c, d) = (t.pod("c").clone(), t.pod("d").clone());
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    let me = workload_cert(&t.ca_dir, &id("mesh", "d"));
    let tr = trust(&t.ca_dir);
    let (dst, app) = (c.v4(15008), c.v4(7000).to_string());
    // The client waits `before_tls` after connecting, `before_h2` after
    // TLS, `before_stream` after HTTP/2; the status of its CONNECT.
    let client = |before_tls: Duration, before_h2: Duration, before_stream: Duration| {
        let (d, me, tr, app) = (d.netns.clone(), me.clone(), tr.clone(), app.clone());
        rt().block_on(async move {
            let tcp = tcp_from(&d, dst)?;
            tokio::time::sleep(before_tls).await;
            let tls = tls_over(tcp, dst, Some(me), id("mesh", "d"), id("mesh", "c"), tr).await?;
            tokio::time::sleep(before_h2).await;
            let mut h2 = h2_client(tls, 1 << 20).await.map_err(std::io::Error::other)?;
            tokio::time::sleep(before_stream).await;
            request(&mut h2, http::Method::CONNECT, &app, None)
                .await
                .map_err(std::io::Error::other)
        })
    };
    let zero = Duration::ZERO;
    assert_eq!(
        client(zero, zero, zero).unwrap(),
        http::StatusCode::OK,
        "a prompt client is served"
    );
    let slow_tls_then_h2 = client(step, step, zero);
    assert!(
        slow_tls_then_h2.is_err(),
        "slow TLS then slow HTTP/2 was served: {slow_tls_then_h2:?}"
    );
    let slow_first_stream = client(zero, zero, deadline + Duration::from_secs(1));
    assert!(
        slow_first_stream.is_err(),
        "a first stream past the deadline was served: {slow_first_stream:?}"
    );
    let cut = || {
        t.agent(1)
            .lines()
            .into_iter()
            .filter(|l| l["direction"] == "inbound_tunnel" && l["reason"] == "handshake_timeout")
            .count()
    };
    let logged = Instant::now() + patience(Duration::from_secs(5));
    while cut() < 2 && Instant::now() < logged {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cut(), 2, "both cuts logged:\n{}", t.agent(1).dump());
}
