//! eBPF runs once per connection, never per packet: an established flow
//! moving tens of megabytes does not run Nodeward's programs at all.

use std::io::{Read, Write};
use std::net::Shutdown;

use nodeward_testbed::bpf::{StatsGuard, links, run_count};
use nodeward_testbed::traffic::{self, checksum_sink, serve};
use nodeward_testbed::{Topology, TopologySpec, exclusive, privileged_or_skip};

/// Total runs of every Nodeward program attached on the host.
fn nodeward_runs() -> u64 {
    links()
        .iter()
        .filter(|l| l.prog_name.starts_with("nw_"))
        .map(|l| run_count(l.prog_id))
        .sum()
}

/// Packets received on the node-to-node link, from the node's namespace.
fn uplink_rx_packets(t: &Topology, k: usize) -> u64 {
    let out = nodeward_testbed::netns::sh_out(&[
        "ip",
        "-n",
        &t.nodes[k].netns,
        "-s",
        "-j",
        "link",
        "show",
        &t.nodes[k].uplink,
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v[0]["stats64"]["rx"]["packets"].as_u64().unwrap_or(0)
}

#[test]
fn established_flows_run_no_ebpf() {
    let _g = exclusive();
    if !privileged_or_skip("established_flows_run_no_ebpf") {
        return;
    }
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agents();
    let _stats = StatsGuard::enable();
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let _s = serve(&c.netns, c.v4(7000), checksum_sink);

    // The programs do run for a new connection (the measurement works) ...
    let before_connect = nodeward_runs();
    let mut s = traffic::connect(&a.netns, c.v4(7000)).unwrap();
    s.write_all(b"x").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let per_connection = nodeward_runs() - before_connect;
    assert!(
        per_connection > 0,
        "no program ran for a new connection: stats not working"
    );

    // ... but not for the 64 MiB that then flow over it.
    let before = nodeward_runs();
    let rx_before = uplink_rx_packets(&t, 1);
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..64 {
        s.write_all(&chunk).unwrap();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with(&format!("{} ", (64u64 << 20) + 1)), "{reply}");
    let packets = uplink_rx_packets(&t, 1) - rx_before;
    let during = nodeward_runs() - before;
    assert!(
        packets > 1000,
        "the transfer crossed the node link in {packets} packets"
    );
    // A handful of runs may come from other connections on the host; a
    // per-packet program would have run once per packet at least.
    assert!(
        during < 20,
        "Nodeward programs ran {during} times while {packets} packets of an established flow crossed the link \
         (a new connection costs {per_connection} runs)"
    );
}
