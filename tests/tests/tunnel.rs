//! HBONE between agents on real namespaces: no plaintext on the wire
//! between enrolled pods, pooled tunnel connections, a 1 GiB transfer,
//! impersonation refused both ways, and hostile input on 15008 rejected
//! without harming other tunnels.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use nodeward::identity::Identity;
use nodeward_testbed::hbone::{h2_client, interleaved_resets, request, tls_to, trust, workload_cert};
use nodeward_testbed::sniff::{Sniffer, contains};
use nodeward_testbed::traffic::{self, checksum_sink, info_echo, round_trip, serve};
use nodeward_testbed::{Topology, TopologySpec, privileged_or_skip, shared};

const WAIT: Duration = Duration::from_secs(10);
const MARKER: &[u8] = b"NODEWARD-PLAINTEXT-MARKER-7c1e";

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

/// Sends the marker from `from` to `dst` while capturing on `iface` of
/// `netns`; returns whether the marker was seen on the wire.
fn marker_on_wire(t: &Topology, from: &str, dst: SocketAddr, netns: &str, iface: &str) -> bool {
    let sniffer = Sniffer::start(netns, iface);
    let mut msg = MARKER.repeat(20);
    msg.extend_from_slice(b"\n");
    round_trip(&t.pod(from).netns, dst, &msg).unwrap();
    contains(&sniffer.finish(), MARKER)
}

#[test]
fn no_plaintext_between_enrolled_pods_on_the_wire_but_plaintext_to_others() {
    let _g = shared();
    let Some(t) = cluster(
        "no_plaintext_between_enrolled_pods_on_the_wire_but_plaintext_to_others",
        &[],
    ) else {
        return;
    };
    let (b, c, d) = (t.pod("b"), t.pod("c"), t.pod("d"));
    let _s = [
        serve(&c.netns, c.v4(8080), info_echo),
        serve(&c.netns, c.v6(8086), info_echo),
        serve(&b.netns, b.v4(8080), info_echo),
        serve(&d.netns, d.v4(8080), info_echo),
    ];
    let (n1, up) = (t.nodes[0].netns.clone(), t.nodes[0].uplink.clone());
    assert!(
        !marker_on_wire(&t, "a", c.v4(8080), &n1, &up),
        "cross-node IPv4 leaked plaintext"
    );
    assert!(
        !marker_on_wire(&t, "a", c.v6(8086), &n1, &up),
        "cross-node IPv6 leaked plaintext"
    );
    assert!(
        !marker_on_wire(&t, "a", b.v4(8080), &n1, "br0"),
        "same-node leaked plaintext"
    );
    // The capture itself works: to a pod outside the mesh the marker is there.
    assert!(
        marker_on_wire(&t, "a", d.v4(8080), &n1, &up),
        "passthrough to plain/d is plaintext"
    );
    let l = t
        .agent(0)
        .wait_connection("outbound", &d.v4(8080).to_string(), WAIT)
        .unwrap();
    assert_eq!(l["transport"], "passthrough");
}

#[test]
fn short_and_long_connections_reuse_few_tunnel_connections() {
    let _g = shared();
    let Some(t) = cluster(
        "short_and_long_connections_reuse_few_tunnel_connections",
        &["--tunnel-connections", "2"],
    ) else {
        return;
    };
    let (a, c) = (t.pod("a"), t.pod("c"));
    let _s = serve(&c.netns, c.v4(7000), info_echo);
    let opened = || {
        t.agent(0)
            .lines()
            .iter()
            .filter(|l| l["message"] == "tunnel connection opened" && l["dst"] == c.v4(15008).to_string().as_str())
            .count()
    };
    for i in 0..1000 {
        let mut s = traffic::connect(&a.netns, c.v4(7000)).unwrap();
        traffic::read_greeting(&s).unwrap();
        write!(s, "{i}").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = String::new();
        s.read_to_string(&mut back).unwrap();
        assert_eq!(back, i.to_string());
    }
    // One stream at a time needs one connection; a client that opens its
    // next connection while the agent is still closing the previous stream
    // may be given the second connection of the spread.
    let after_short = opened();
    assert!(
        (1..=2).contains(&after_short),
        "1,000 short connections share the pooled tunnel connections, got {after_short}"
    );

    let long: Vec<_> = (0..100)
        .map(|_| traffic::connect(&a.netns, c.v4(7000)).unwrap())
        .collect();
    for (i, mut s) in long.into_iter().enumerate() {
        traffic::read_greeting(&s).unwrap();
        write!(s, "long {i}").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut back = String::new();
        s.read_to_string(&mut back).unwrap();
        assert_eq!(back, format!("long {i}"));
    }
    // Concurrent streams are spread over exactly the two connections
    // allowed, and 100 streams fit on them.
    let total = opened();
    assert_eq!(
        total, 2,
        "100 concurrent connections are spread over the 2 tunnel connections allowed"
    );
}

#[test]
fn a_gibibyte_crosses_the_tunnel_intact() {
    let _g = shared();
    let Some(t) = cluster("a_gibibyte_crosses_the_tunnel_intact", &[]) else {
        return;
    };
    let (a, c) = (t.pod("a"), t.pod("c"));
    let _s = serve(&c.netns, c.v4(7100), checksum_sink);
    let sent = traffic::checked_transfer(&a.netns, c.v4(7100), 256, 4 << 20).unwrap();
    assert_eq!(sent, 1 << 30);
    let l = t
        .agent(1)
        .wait_connection("inbound_tunnel", &c.v4(7100).to_string(), WAIT)
        .unwrap();
    assert_eq!(l["sent"], 1u64 << 30);
}

#[test]
fn a_listener_with_another_identity_is_refused_by_the_client() {
    let _g = shared();
    if !privileged_or_skip("a_listener_with_another_identity_is_refused_by_the_client") {
        return;
    }
    // Node 2 runs no agent: an impostor owns c's port 15008 with a valid
    // certificate of the mesh, but for another identity.
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agent(0, &[]);
    t.wait_captured(0);
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let cert = workload_cert(&t.ca_dir, &id("mesh", "impostor"));
    let trust = trust(&t.ca_dir);
    let config = nodeward::identity::tls::server_config(
        std::sync::Arc::new(nodeward::identity::tls::FixedCert(cert)),
        id("mesh", "impostor"),
        trust,
    );
    let addr = c.v4(15008);
    let listener = nodeward_testbed::netns::run_in(&c.netns, move || std::net::TcpListener::bind(addr)).unwrap();
    let accepted = std::thread::spawn(move || {
        let rt = rt();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            let (tcp, _) = l.accept().await.unwrap();
            tokio_rustls::TlsAcceptor::from(config).accept(tcp).await.is_ok()
        })
    });
    let r = traffic::connect(&a.netns, c.v4(8080)).and_then(|s| traffic::read_greeting(&s));
    assert!(r.is_err(), "the client must not reach the impostor: {r:?}");
    let l = t
        .agent(0)
        .wait_connection("outbound", &c.v4(8080).to_string(), WAIT)
        .unwrap_or_else(|| panic!("no log:\n{}", t.agent(0).dump()));
    assert_eq!(l["refusal"], "wrong_identity", "{l}");
    assert!(!accepted.join().unwrap(), "the impostor's handshake failed too");
}

#[test]
fn a_client_from_another_trust_root_is_refused_by_the_server() {
    let _g = shared();
    let Some(t) = cluster("a_client_from_another_trust_root_is_refused_by_the_server", &[]) else {
        return;
    };
    let (c, d) = (t.pod("c").clone(), t.pod("d").clone());
    let other = t.ca_dir.with_extension("other");
    let _ = std::fs::remove_dir_all(&other);
    nodeward::identity::ca_cli::init(&other).unwrap();
    let forged = workload_cert(&other, &id("mesh", "a"));
    let r = rt().block_on(tls_to(
        &d.netns,
        c.v4(15008),
        Some(forged),
        id("mesh", "a"),
        id("mesh", "c"),
        trust(&t.ca_dir),
    ));
    // TLS 1.3: the client may finish before the server's verdict arrives.
    if let Ok(mut s) = r {
        let _ = rt().block_on(async {
            use tokio::io::AsyncReadExt;
            let mut b = [0u8; 1];
            s.read(&mut b).await
        });
    }
    let l = t
        .agent(1)
        .wait_log(WAIT, |l| {
            l["direction"] == "inbound_tunnel" && l["refusal"] == "unknown_root"
        })
        .unwrap_or_else(|| panic!("no refusal:\n{}", t.agent(1).dump()));
    assert_eq!(
        l["src"].as_str().unwrap().parse::<SocketAddr>().unwrap().ip(),
        d.v4(0).ip()
    );
    let _ = std::fs::remove_dir_all(&other);
}

#[test]
fn hostile_input_on_15008_is_rejected_and_other_tunnels_keep_working() {
    let _g = shared();
    let Some(t) = cluster(
        "hostile_input_on_15008_is_rejected_and_other_tunnels_keep_working",
        &["--handshake-timeout", "1s", "--tunnel-max-streams", "10"],
    ) else {
        return;
    };
    let (a, c, d) = (t.pod("a").clone(), t.pod("c").clone(), t.pod("d").clone());
    let _s = serve(&c.netns, c.v4(7000), info_echo);
    // A long-lived tunnelled connection that must survive everything below.
    let mut survivor = traffic::connect(&a.netns, c.v4(7000)).unwrap();
    traffic::read_greeting(&survivor).unwrap();
    let refusal = |what: &str, pred: &dyn Fn(&serde_json::Value) -> bool| {
        t.agent(1)
            .wait_log(WAIT, |l| l["direction"] == "inbound_tunnel" && pred(l))
            .unwrap_or_else(|| panic!("{what}: not logged:\n{}", t.agent(1).dump()))
    };
    let rt = rt();
    let me = workload_cert(&t.ca_dir, &id("mesh", "d"));
    let tr = trust(&t.ca_dir);
    // An HTTP/2 connection to c's tunnel port as the workload mesh/d.
    let as_d = || async {
        let tls = tls_to(
            &d.netns,
            c.v4(15008),
            Some(me.clone()),
            id("mesh", "d"),
            id("mesh", "c"),
            tr.clone(),
        )
        .await
        .unwrap();
        h2_client(tls, 1 << 20).await.unwrap()
    };

    // Non-TLS bytes.
    let mut s = traffic::connect(&d.netns, c.v4(15008)).unwrap();
    let _ = s.write_all(b"\x00\x01garbage\r\n\r\n");
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
    refusal("non-TLS bytes", &|l| {
        l["reason"] == "tls_refused" && l["refusal"] == "tls_error"
    });

    // TLS without a client certificate.
    let r = rt.block_on(async {
        let s = tls_to(
            &d.netns,
            c.v4(15008),
            None,
            id("mesh", "d"),
            id("mesh", "c"),
            tr.clone(),
        )
        .await?;
        h2_client(s, 16 << 10).await.map_err(std::io::Error::other).map(|_| ())
    });
    let _ = r;
    refusal("no client certificate", &|l| l["refusal"] == "no_client_certificate");

    // A slow client that never finishes its handshake.
    let slow = traffic::connect(&d.netns, c.v4(15008)).unwrap();
    refusal("slow handshake", &|l| l["reason"] == "handshake_timeout");
    drop(slow);

    rt.block_on(async {
        let mut h2 = as_d().await;
        // Methods other than CONNECT.
        let st = request(&mut h2, http::Method::GET, &c.v4(7000).to_string(), None)
            .await
            .unwrap();
        assert_eq!(st, http::StatusCode::METHOD_NOT_ALLOWED);
        // CONNECT to an address that is not this pod's.
        let st = request(&mut h2, http::Method::CONNECT, &a.v4(7000).to_string(), None)
            .await
            .unwrap();
        assert_eq!(st, http::StatusCode::FORBIDDEN);
        // A malformed authority.
        let st = request(&mut h2, http::Method::CONNECT, "example.com:7000", None)
            .await
            .unwrap();
        assert_eq!(st, http::StatusCode::BAD_REQUEST);
        // Oversized headers: refused by the HTTP/2 layer, never reaching a handler.
        let big = "x".repeat(64 << 10);
        let r = request(
            &mut h2,
            http::Method::CONNECT,
            &c.v4(7000).to_string(),
            Some(("x-big", big)),
        )
        .await;
        assert!(
            r.is_err() || r.as_ref().is_ok_and(|s| !s.is_success()),
            "oversized headers accepted: {r:?}"
        );
    });
    refusal("GET", &|l| l["refusal"] == "method_not_allowed");
    refusal("foreign target", &|l| l["refusal"] == "not_this_pod");
    refusal("malformed authority", &|l| l["refusal"] == "malformed_authority");

    // A flood of streams beyond the limit: at most 10 are served at once,
    // the rest are refused by the HTTP/2 layer.
    let served = rt.block_on(async {
        let h2 = as_d().await;
        let mut pending = Vec::new();
        for _ in 0..50 {
            let req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(c.v4(7000).to_string())
                .body(())
                .unwrap();
            let Ok(Ok(mut ready)) = tokio::time::timeout(Duration::from_millis(500), h2.clone().ready()).await else {
                break;
            };
            match ready.send_request(req, false) {
                Ok(pair) => pending.push(pair),
                Err(_) => break,
            }
        }
        let mut served = 0;
        let mut held = Vec::new();
        for (resp, body) in pending {
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(500), resp).await
                && r.status() == http::StatusCode::OK
            {
                served += 1;
                held.push((r, body));
            }
        }
        served
    });
    assert!(
        served > 0 && served <= 10,
        "the server served {served} concurrent streams (limit 10)"
    );

    // Rapid reset: open and cancel streams as fast as possible.
    let reset_result = rt.block_on(async {
        let h2 = as_d().await;
        for i in 0..5000 {
            let req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(c.v4(7000).to_string())
                .body(())
                .unwrap();
            let mut ready = match h2.clone().ready().await {
                Ok(r) => r,
                Err(e) => return Err(format!("after {i} resets: {e}")),
            };
            match ready.send_request(req, false) {
                Ok((_resp, mut body)) => body.send_reset(h2::Reason::CANCEL),
                Err(e) => return Err(format!("after {i} resets: {e}")),
            }
            // Let the connection task put the frames on the wire.
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        match h2.clone().ready().await {
            Err(e) => Err(format!("after the flood: {e}")),
            Ok(_) => Ok(()),
        }
    });
    assert!(reset_result.is_err(), "the server must cut off a rapid-reset client");
    let mut cut_off: Vec<String> = t
        .agent(1)
        .lines()
        .iter()
        .filter(|l| {
            let m = l["message"].as_str().unwrap_or("");
            l["target"].as_str().is_some_and(|t| t.starts_with("nodeward"))
                && (m.contains("rapid stream resets") || m.contains("excessive load"))
        })
        .map(|l| l["peer"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(
        !cut_off.is_empty(),
        "the abuser's cut-off is logged:\n{}",
        t.agent(1).dump()
    );
    let n = cut_off.len();
    cut_off.sort();
    cut_off.dedup();
    assert_eq!(cut_off.len(), n, "each abusive connection is logged once: {cut_off:?}");

    // Every refusal was counted.
    let stats = nodeward_testbed::admin::metrics(&t.nodes[1].netns);
    for label in [
        "method_not_allowed",
        "not_this_pod",
        "malformed_authority",
        "no_client_certificate",
        "handshake_timeout",
    ] {
        assert!(stats.contains(label), "{label} not counted:\n{stats}");
    }

    // The long-lived tunnel and new ones still work.
    survivor.write_all(b"still alive").unwrap();
    let mut buf = [0u8; 11];
    survivor.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still alive");
    round_trip(&a.netns, c.v4(7000), b"fresh").unwrap();
}

#[test]
fn pods_expose_no_agent_port_but_the_three_and_admin_stays_on_the_node() {
    let _g = shared();
    let Some(t) = cluster(
        "pods_expose_no_agent_port_but_the_three_and_admin_stays_on_the_node",
        &[],
    ) else {
        return;
    };
    let listening = |netns: &str| -> Vec<u16> {
        let out =
            nodeward_testbed::netns::sh_out(&["nsenter", &format!("--net=/var/run/netns/{netns}"), "ss", "-Hltn"]);
        let mut ports: Vec<u16> = out
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3)?.rsplit(':').next()?.parse().ok())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    };
    assert_eq!(listening(&t.pod("a").netns), vec![15001, 15006, 15008]);
    assert!(listening(&t.nodes[0].netns).contains(&15021), "admin on the node");
    assert!(
        traffic::connect_timeout(
            &t.pod("a").netns,
            "127.0.0.1:15021".parse().unwrap(),
            Duration::from_secs(1)
        )
        .is_err()
    );
}

#[test]
fn denying_an_identity_cuts_its_open_tunnels_within_seconds() {
    let _g = shared();
    if !privileged_or_skip("denying_an_identity_cuts_its_open_tunnels_within_seconds") {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    let deny = t.ca_dir.join("deny.txt");
    std::fs::write(&deny, "# nobody yet\n").unwrap();
    let deny_arg = deny.to_string_lossy().into_owned();
    for k in 0..2 {
        t.start_agent(k, &["--deny-identities", &deny_arg]);
        t.wait_captured(k);
    }
    let (a, b, c) = (t.pod("a").clone(), t.pod("b").clone(), t.pod("c").clone());
    let _s = serve(&c.netns, c.v4(7000), info_echo);
    let mut from_a = traffic::connect(&a.netns, c.v4(7000)).unwrap();
    traffic::read_greeting(&from_a).unwrap();
    let mut from_b = traffic::connect(&b.netns, c.v4(7000)).unwrap();
    traffic::read_greeting(&from_b).unwrap();

    let denied_at = std::time::Instant::now();
    std::fs::write(&deny, "spiffe://cluster.local/ns/mesh/sa/a\n").unwrap();
    from_a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    let r = from_a.read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "a's tunnel is cut: {r:?}");
    assert!(
        denied_at.elapsed() < Duration::from_secs(5),
        "cut after {:?}",
        denied_at.elapsed()
    );
    let l = t
        .agent(1)
        .wait_log(WAIT, |l| l["reason"] == "peer_revoked")
        .expect("logged as revoked");
    assert_eq!(l["peer_identity"], "spiffe://cluster.local/ns/mesh/sa/a");
    // b's tunnel, another identity, is untouched; a cannot come back.
    from_b.write_all(b"ok").unwrap();
    let mut two = [0u8; 2];
    from_b.read_exact(&mut two).unwrap();
    assert!(round_trip(&a.netns, c.v4(7000), b"again").is_err());
}

#[test]
fn a_client_interleaving_good_streams_with_resets_is_cut_off_but_a_few_resets_are_not() {
    let _g = shared();
    let Some(t) = cluster(
        "a_client_interleaving_good_streams_with_resets_is_cut_off_but_a_few_resets_are_not",
        &[],
    ) else {
        return;
    };
    let (c, d) = (t.pod("c").clone(), t.pod("d").clone());
    let _s = serve(&c.netns, c.v4(7000), info_echo);
    let rt = rt();
    let me = workload_cert(&t.ca_dir, &id("mesh", "d"));
    let tr = trust(&t.ca_dir);
    let as_d = || async {
        let tls = tls_to(
            &d.netns,
            c.v4(15008),
            Some(me.clone()),
            id("mesh", "d"),
            id("mesh", "c"),
            tr.clone(),
        )
        .await
        .unwrap();
        h2_client(tls, 1 << 20).await.unwrap()
    };
    let authority = c.v4(7000).to_string();
    rt.block_on(async {
        // A normal client: a few cancelled streams among many good ones.
        let h2 = as_d().await;
        let r = interleaved_resets(&h2, &authority, 5, 10).await;
        assert_eq!(r, Ok(5), "a client resetting a few streams keeps its connection");
        assert_eq!(
            request(&mut h2.clone(), http::Method::CONNECT, &authority, None)
                .await
                .ok(),
            Some(http::StatusCode::OK)
        );
        // One good stream per reset keeps resets at half of all streams.
        let h2 = as_d().await;
        let r = interleaved_resets(&h2, &authority, 2000, 1).await;
        assert!(r.is_err(), "the interleaving client must be cut off: {r:?}");
    });
    let cut = t
        .agent(1)
        .wait_log(WAIT, |l| {
            l["message"] == "closing tunnel connection: rapid stream resets"
                && l["peer_identity"] == "spiffe://cluster.local/ns/mesh/sa/d"
        })
        .unwrap_or_else(|| panic!("the cut-off is not logged:\n{}", t.agent(1).dump()));
    let n = t
        .agent(1)
        .lines()
        .iter()
        .filter(|l| l["message"] == "closing tunnel connection: rapid stream resets")
        .count();
    assert_eq!(n, 1, "only the abuser is cut off: {cut}");
}
