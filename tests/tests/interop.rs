//! Interoperability with a real ztunnel: Nodeward on node 1 for pod `a`,
//! Istio's ztunnel in pod `c` on node 2 (dedicated mode, its in-pod
//! redirect), both rooted in ztunnel's test CA shared as Nodeward's plug-in
//! CA. HBONE both ways, payload and identities checked on both sides.
//!
//! Skipped with a `SKIPPED` line when the ztunnel binary is absent (it is a
//! peer binary that may legitimately not be there, in CI too).

use std::time::Duration;

use nodeward_testbed::traffic::{info_echo, pattern, round_trip, serve};
use nodeward_testbed::ztunnel::{self, Ztunnel};
use nodeward_testbed::{PodSpec, Topology, TopologySpec, privileged_or_skip, shared};

const WAIT: Duration = Duration::from_secs(10);

/// Node 1 runs Nodeward with pod `a`; node 2 has pod `c` and no Nodeward.
/// Both pods are in the enrolled namespace `mesh`, so node 1's agent
/// tunnels to `c` and expects its identity.
fn spec() -> TopologySpec {
    TopologySpec {
        nodes: vec![vec![PodSpec::new("a", "mesh")], vec![PodSpec::new("c", "mesh")]],
        namespaces: vec![("mesh".into(), true)],
    }
}

/// A payload of `n` pseudo-random bytes ending in a newline.
fn payload(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    pattern(seed, &mut v);
    v.push(b'\n');
    v
}

#[test]
fn nodeward_and_ztunnel_carry_traffic_both_ways_and_each_logs_the_others_identity() {
    let test = "nodeward_and_ztunnel_carry_traffic_both_ways_and_each_logs_the_others_identity";
    let Some(bin) = ztunnel::binary_or_skip(test) else {
        return;
    };
    if !privileged_or_skip(test) {
        return;
    }
    let _g = shared();
    let mut t = Topology::build(spec());
    ztunnel::share_test_ca(&bin, &t.ca_dir);
    t.start_agent(0, &[]);
    t.wait_captured(0);
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let mut z = Ztunnel::start(&bin, &t, &c, &ztunnel::workloads_yaml(&t, &["a", "c"]));
    z.redirect_outbound(&format!("{}/32", a.ip4));
    z.redirect_outbound(&format!("{}/128", a.ip6));
    let _servers = [
        serve(&c.netns, c.v4(8080), info_echo),
        serve(&a.netns, a.v4(8080), info_echo),
        serve(&c.netns, c.v6(8086), info_echo),
        serve(&a.netns, a.v6(8086), info_echo),
    ];
    let id_a = "spiffe://cluster.local/ns/mesh/sa/a";
    let id_c = "spiffe://cluster.local/ns/mesh/sa/c";
    let agent = t.agent(0);
    let fail = |what: &str| -> String {
        format!(
            "{what}\n--- nodeward log:\n{}\n--- ztunnel log:\n{}",
            agent.dump(),
            z.dump()
        )
    };

    // a -> c: Nodeward is the HBONE client, ztunnel the server.
    let msg = payload(1, 48 * 1024);
    let (seen, client_peer, _) =
        round_trip(&a.netns, c.v4(8080), &msg).unwrap_or_else(|e| panic!("{}", fail(&format!("a -> c: {e}"))));
    assert_eq!(client_peer, c.v4(8080), "a's app sees the peer it asked for");
    assert_eq!(seen.local, c.v4(8080), "c's app was reached on the address a dialled");
    let l = agent
        .wait_connection("outbound", &c.v4(8080).to_string(), WAIT)
        .unwrap_or_else(|| panic!("{}", fail("no Nodeward outbound log line for a -> c")));
    assert_eq!(l["transport"], "hbone", "a -> c went through the tunnel: {l}");
    assert_eq!(
        l["peer_identity"], id_c,
        "Nodeward verified ztunnel's identity for c: {l}"
    );
    assert_eq!(l["reason"], "done", "{l}");
    assert_eq!(l["sent"].as_u64(), Some(msg.len() as u64), "{l}");
    let zl = z
        .wait_access("inbound", c.v4(8080), WAIT)
        .unwrap_or_else(|| panic!("{}", fail("no ztunnel inbound access line for a -> c")));
    assert!(
        zl.contains(&format!("src.identity=\"{id_a}\"")),
        "ztunnel verified Nodeward's identity for a: {zl}"
    );
    assert!(zl.contains(&format!("dst.identity=\"{id_c}\"")), "{zl}");

    // c -> a: ztunnel is the HBONE client, Nodeward the server.
    let msg = payload(2, 48 * 1024);
    let (seen, client_peer, client_local) =
        round_trip(&c.netns, a.v4(8080), &msg).unwrap_or_else(|e| panic!("{}", fail(&format!("c -> a: {e}"))));
    assert_eq!(client_peer, a.v4(8080));
    assert_eq!(seen.local, a.v4(8080), "a's app was reached on the address c dialled");
    // ztunnel's `forwarded` header carries the client's port; Nodeward
    // takes the IP from the authenticated TCP peer.
    assert_eq!(seen.peer, client_local, "a's app sees c's app as its client");
    let l = agent
        .wait_connection("inbound_tunnel", &a.v4(8080).to_string(), WAIT)
        .unwrap_or_else(|| panic!("{}", fail("no Nodeward inbound tunnel log line for c -> a")));
    assert_eq!(
        l["peer_identity"], id_c,
        "Nodeward verified ztunnel's client identity: {l}"
    );
    assert_eq!(l["reason"], "done", "{l}");
    assert_eq!(l["sent"].as_u64(), Some(msg.len() as u64), "{l}");
    let zl = z
        .wait_access("outbound", a.v4(8080), WAIT)
        .unwrap_or_else(|| panic!("{}", fail("no ztunnel outbound access line for c -> a")));
    assert!(zl.contains(&format!("src.identity=\"{id_c}\"")), "{zl}");
    assert!(
        zl.contains(&format!("dst.identity=\"{id_a}\"")),
        "ztunnel verified Nodeward's server identity for a: {zl}"
    );

    // The same over IPv6 (`:authority` = `[ip]:port`), both ways.
    for (from, to, dst) in [(&a, &c, c.v6(8086)), (&c, &a, a.v6(8086))] {
        let msg = payload(3, 4096);
        let (seen, _, _) = round_trip(&from.netns, dst, &msg)
            .unwrap_or_else(|e| panic!("{}", fail(&format!("{} -> {} over IPv6: {e}", from.name, to.name))));
        assert_eq!(seen.local, dst, "{} was reached on the address dialled", to.name);
    }
    let l = agent
        .wait_connection("outbound", &c.v6(8086).to_string(), WAIT)
        .unwrap_or_else(|| panic!("{}", fail("no Nodeward outbound log line for a -> c over IPv6")));
    assert_eq!(l["peer_identity"], id_c, "{l}");
    let l = agent
        .wait_connection("inbound_tunnel", &a.v6(8086).to_string(), WAIT)
        .unwrap_or_else(|| panic!("{}", fail("no Nodeward inbound tunnel log line for c -> a over IPv6")));
    assert_eq!(l["peer_identity"], id_c, "{l}");
    assert!(
        z.wait_access("inbound", c.v6(8086), WAIT).is_some(),
        "{}",
        fail("ztunnel: no IPv6 inbound")
    );
    assert!(
        z.wait_access("outbound", a.v6(8086), WAIT).is_some(),
        "{}",
        fail("ztunnel: no IPv6 outbound")
    );

    // Stopping ztunnel removes its redirect: c's traffic to a goes out in
    // plaintext again (accepted: a's port is PERMISSIVE), not into a dead 15001.
    drop(z);
    round_trip(&c.netns, a.v4(8080), b"after ztunnel\n").expect("c -> a after ztunnel stopped");
    let l = agent
        .wait_log(WAIT, |l| {
            l["message"] == "connection closed" && l["direction"] == "inbound" && l["dst"] == a.v4(8080).to_string()
        })
        .unwrap_or_else(|| panic!("no plaintext inbound line after ztunnel stopped:\n{}", agent.dump()));
    assert!(l["peer_identity"].is_null(), "{l}");
}
