//! Resource bounds on real namespaces: a hostile client flooding a pod's
//! 15008 with connections that never send a ClientHello, and a pod opening
//! more connections than its bound, are refused past their bounds while
//! other pods' traffic keeps flowing and the agent's memory stays bounded;
//! an idle agent gives back the memory its program loads used.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use nodeward_testbed::traffic::{self, info_echo, read_greeting, round_trip, serve};
use nodeward_testbed::{Topology, netns::run_in, shared};

/// Handshakes in progress one remote IP may hold (flag below).
const HANDSHAKES_PER_PEER: usize = 4;
/// Proxied connections per pod and direction (flag below).
const CONNECTIONS_PER_POD: usize = 5;
/// Raw connections the hostile client opens, in rounds.
const HOSTILE_ROUNDS: usize = 10;
const HOSTILE_PER_ROUND: usize = 100;
/// What the agent may grow by while refusing them, KiB. At rest it holds
/// about 30 MiB; a thousand handshakes in progress would hold their TLS
/// state and tasks on top.
const RSS_GROWTH_BOUND_KIB: u64 = 16 << 10;

fn flags() -> Vec<String> {
    [
        "--max-handshakes-per-peer",
        &HANDSHAKES_PER_PEER.to_string(),
        "--max-handshakes",
        "8",
        "--max-connections-per-pod",
        &CONNECTIONS_PER_POD.to_string(),
        // The silent clients must still be in their handshakes at the end.
        "--handshake-timeout",
        "120s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn cluster(test: &str) -> Option<Topology> {
    let flags = flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    nodeward_testbed::two_node_cluster(test, &flags)
}

/// Whether the agent has closed `s` (EOF or reset), without waiting.
fn closed_by_agent(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    }
}

/// Node `k`'s agent's metrics.
fn stats(t: &Topology, k: usize) -> String {
    nodeward_testbed::admin::metrics(&t.nodes[k].netns)
}

/// The agent's refusal warnings for `reason`, once the first has arrived:
/// the agent counts a refusal before it logs it, and its log reaches the
/// test through a reader thread, so a scrape can run ahead of the log.
fn warnings(t: &Topology, k: usize, reason: &str) -> Vec<serde_json::Value> {
    let is_warning = |l: &serde_json::Value| l["level"] == "WARN" && l["reason"] == reason;
    t.agent(k).wait_log(Duration::from_secs(5), is_warning);
    t.agent(k).lines().into_iter().filter(is_warning).collect()
}

#[test]
fn silent_handshakes_past_the_per_peer_bound_are_closed_at_once_and_others_keep_tunnelling() {
    let _g = shared();
    let Some(t) = cluster("silent_handshakes_past_the_per_peer_bound_are_closed_at_once_and_others_keep_tunnelling")
    else {
        return;
    };
    let (a, b, c, d) = (
        t.pod("a").clone(),
        t.pod("b").clone(),
        t.pod("c").clone(),
        t.pod("d").clone(),
    );
    let _s = serve(&c.netns, c.v4(7000), info_echo);
    // A tunnelled connection open before the flood must survive it.
    let mut survivor = traffic::connect(&a.netns, c.v4(7000)).unwrap();
    read_greeting(&survivor).unwrap();
    let rss_before = t.agent(1).rss_kib();
    let started = Instant::now();

    // d (not enrolled) opens raw connections to c's HBONE port and never
    // sends a byte, round after round, keeping the ones left open.
    let mut silent: Vec<TcpStream> = Vec::new();
    let mut refused = 0;
    for _ in 0..HOSTILE_ROUNDS {
        let dst = c.v4(15008);
        let round: Vec<std::io::Result<TcpStream>> = run_in(&d.netns, move || {
            (0..HOSTILE_PER_ROUND)
                .map(|_| TcpStream::connect_timeout(&dst, Duration::from_secs(5)))
                .collect()
        });
        for r in round {
            match r {
                Ok(s) => silent.push(s),
                // Reset so soon that connect() itself saw it.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => refused += 1,
                Err(e) => panic!("connecting to {dst}: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let before = silent.len();
        silent.retain_mut(|s| !closed_by_agent(s));
        refused += before - silent.len();
    }
    assert_eq!(
        silent.len(),
        HANDSHAKES_PER_PEER,
        "only the per-peer handshake bound stays open; log:\n{}",
        t.agent(1).dump()
    );
    assert_eq!(refused, HOSTILE_ROUNDS * HOSTILE_PER_ROUND - HANDSHAKES_PER_PEER);

    // Meanwhile other pods' tunnels, old and new, work.
    survivor.write_all(b"still alive").unwrap();
    let mut buf = [0u8; 11];
    survivor.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still alive");
    round_trip(&a.netns, c.v4(7000), b"fresh from a").unwrap();
    round_trip(&b.netns, c.v4(7000), b"fresh from b").unwrap();
    // The silent ones are still waiting: they were never cut for the others.
    assert!(silent.iter_mut().all(|s| !closed_by_agent(s)));

    // Refusals are counted, and warned about at a bounded rate with counts.
    let st = stats(&t, 1);
    assert!(
        st.contains("reason=\"limit\",refusal=\"limit_handshakes_per_peer\""),
        "refusals not counted:\n{st}"
    );
    let warned = warnings(&t, 1, "limit_handshakes_per_peer");
    let windows = started.elapsed().as_secs() / 5 + 1;
    assert!(
        !warned.is_empty() && warned.len() as u64 <= windows,
        "{} warnings for {refused} refusals in {:?}:\n{warned:?}",
        warned.len(),
        started.elapsed()
    );

    assert_eq!(
        warned[0]["peer"],
        d.ip4.to_string().as_str(),
        "the warning names the client"
    );
    let rss_after = t.agent(1).rss_kib();
    assert!(
        rss_after < rss_before + RSS_GROWTH_BOUND_KIB,
        "agent RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

#[test]
fn a_pod_past_its_connection_bound_is_refused_and_other_pods_keep_connecting() {
    let _g = shared();
    let Some(t) = cluster("a_pod_past_its_connection_bound_is_refused_and_other_pods_keep_connecting") else {
        return;
    };
    let (a, b, c, d) = (
        t.pod("a").clone(),
        t.pod("b").clone(),
        t.pod("c").clone(),
        t.pod("d").clone(),
    );
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    let _sd = serve(&d.netns, d.v4(8080), info_echo);
    let rss_before = t.agent(0).rss_kib();

    // a holds its bound of outbound connections (passthrough to d).
    let held: Vec<TcpStream> = (0..CONNECTIONS_PER_POD)
        .map(|i| {
            let s = traffic::connect(&a.netns, d.v4(8080)).unwrap();
            read_greeting(&s).unwrap_or_else(|e| panic!("connection {i} within the bound: {e}"));
            s
        })
        .collect();
    // Past it, a's connections are reset before reaching anyone, whether
    // to a plain or a meshed destination.
    for dst in [d.v4(8080), c.v4(7000), d.v4(8080)] {
        // connect() itself may already see the reset.
        let served = traffic::connect(&a.netns, dst).and_then(|s| read_greeting(&s));
        assert!(served.is_err(), "a's connection to {dst} past its bound was served");
    }
    // Other pods keep connecting, plain and meshed.
    round_trip(&b.netns, d.v4(8080), b"b to d").unwrap();
    round_trip(&b.netns, c.v4(7000), b"b to c").unwrap();
    let st = stats(&t, 0);
    assert!(
        st.contains("direction=\"outbound\",reason=\"limit\",refusal=\"limit_connections_per_pod\"} 3"),
        "refusals not counted:\n{st}"
    );
    assert_eq!(
        warnings(&t, 0, "limit_connections_per_pod").len(),
        1,
        "one warning for three refusals"
    );

    // Its connections closed, a may connect again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while round_trip(&a.netns, c.v4(7000), b"a again").is_err() {
        assert!(Instant::now() < deadline, "a's bound was not given back");
        std::thread::sleep(Duration::from_millis(100));
    }

    // c's inbound side has its own bound, shared by tunnel streams and
    // plaintext: b fills it, then a's stream and d's plaintext are refused
    // while a's outbound side still works.
    let mut into_c: Vec<TcpStream> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while into_c.len() < CONNECTIONS_PER_POD {
        // a's last stream into c may still be winding down: retry.
        match traffic::connect(&b.netns, c.v4(7000)).and_then(|s| read_greeting(&s).map(|_| s)) {
            Ok(s) => into_c.push(s),
            Err(e) => {
                assert!(Instant::now() < deadline, "b cannot fill c's inbound bound: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    for (from, what) in [(&a, "a's tunnel stream"), (&d, "d's plaintext")] {
        let served = traffic::connect(&from.netns, c.v4(7000)).and_then(|s| read_greeting(&s));
        assert!(served.is_err(), "{what} to c past c's inbound bound was served");
    }
    round_trip(&a.netns, d.v4(8080), b"a to d").unwrap();
    let st = stats(&t, 1);
    for dir in ["inbound_tunnel", "inbound"] {
        let label = format!("direction=\"{dir}\",reason=\"limit\",refusal=\"limit_connections_per_pod\"}}");
        assert!(st.contains(&label), "{label} not counted:\n{st}");
    }
    drop(into_c);

    let rss_after = t.agent(0).rss_kib();
    assert!(
        rss_after < rss_before + RSS_GROWTH_BOUND_KIB,
        "agent RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}

/// What an idle agent may hold in anonymous memory (heaps, stacks) after
/// capturing its pods and three more added later, KiB. Every eBPF object
/// load makes aya read and parse the kernel's BTF (~5 MiB); before the
/// agent gave that back, every thread that had run a load kept ~10 MiB of
/// it: 20 MiB in an idle release agent, 55 MiB in a debug one, against 5
/// MiB now.
const IDLE_ANON_BOUND_KIB: u64 = 8 << 10;

#[test]
fn an_idle_agent_gives_back_what_loading_its_programs_allocated() {
    let _g = shared();
    let name = "an_idle_agent_gives_back_what_loading_its_programs_allocated";
    let Some(mut t) = nodeward_testbed::two_node_cluster(name, &[]) else {
        return;
    };
    // Pods added while the agent runs are loaded on its worker threads,
    // not on the thread that loaded the node's programs.
    for name in ["e", "f", "g"] {
        t.add_pod(0, nodeward_testbed::PodSpec::new(name, "mesh"));
    }
    t.write_config();
    t.wait_captured(0);
    // A pod captured is a pod that answers through the mesh.
    let g = t.pod("g").clone();
    let _s = serve(&g.netns, g.v4(7000), info_echo);
    round_trip(&t.pod("c").netns, g.v4(7000), b"after").expect("c reaches g");
    std::thread::sleep(Duration::from_millis(500));
    let anon = t.agent(0).anon_rss_kib();
    assert!(anon > 0, "no RssAnon for the agent");
    assert!(
        anon < IDLE_ANON_BOUND_KIB,
        "idle agent holds {anon} KiB of anonymous memory (bound {IDLE_ANON_BOUND_KIB} KiB) after {} pods",
        t.enrolled_on(0).len()
    );
}
