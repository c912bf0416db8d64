//! The demo (`cargo xtask demo`): a two-node cluster in network namespaces
//! on the built-in defaults, traffic through the agents, and what they
//! captured. The agent binary comes from `NODEWARD_BIN`.

use std::time::Duration;

use anyhow::{Result, ensure};
use nodeward_testbed::traffic::{self, info_echo, round_trip, serve};
use nodeward_testbed::{Topology, TopologySpec, bpf};

fn main() -> Result<()> {
    ensure!(
        nodeward_testbed::privileged_or_skip("demo"),
        "run as root: the demo creates network namespaces and loads eBPF"
    );
    println!("Building a cluster: 2 nodes, pods mesh/a + mesh/b on node 1, mesh/c + plain/d on node 2");
    println!("(namespace `mesh` carries istio.io/dataplane-mode=ambient; `plain` does not)\n");
    let mut t = Topology::build(TopologySpec::two_nodes());
    println!("config directory {}\n", t.config_dir.display());
    t.start_agents();
    for n in &t.nodes {
        println!("agent for node {} running in namespace {}", n.name, n.netns);
    }
    let (a, b, c, d) = (
        t.pod("a").clone(),
        t.pod("b").clone(),
        t.pod("c").clone(),
        t.pod("d").clone(),
    );
    let _servers = [
        serve(&b.netns, b.v4(8080), info_echo),
        serve(&c.netns, c.v4(8080), info_echo),
        serve(&c.netns, c.v6(8443), info_echo),
    ];
    println!("\nTraffic:");
    let flows = [
        ("mesh/a -> mesh/c, across nodes, IPv4", &a, c.v4(8080)),
        ("mesh/a -> mesh/c, across nodes, IPv6", &a, c.v6(8443)),
        ("mesh/a -> mesh/b, same node", &a, b.v4(8080)),
        ("plain/d -> mesh/c, client not in the mesh", &d, c.v4(8080)),
    ];
    for (what, from, dst) in flows {
        let (seen, peer, local) = round_trip(&from.netns, dst, b"hello from the demo")?;
        println!(
            "  {what}\n      client: connected to {peer} (its socket is really {local})\n      server: accepted from {}",
            seen.peer
        );
    }
    let node = &t.nodes[1];
    let (seen, _, _) = round_trip(&node.netns, c.v4(8080), b"GET /healthz")?;
    println!(
        "  kubelet-style probe from node 2 -> mesh/c\n      server: accepted from {} (the probe source; not captured)",
        seen.peer
    );

    std::thread::sleep(Duration::from_millis(300));
    println!("\nWhat the agents captured (transport: hbone = mTLS tunnel, plaintext = inbound from outside the mesh):");
    println!(
        "  {:<7} {:<15} {:<7} {:<23} {:<22} {:<10} {:<38} {:>5} {:>5}  reason",
        "node", "direction", "pod", "source", "original destination", "transport", "peer identity", "sent", "recv"
    );
    for (k, n) in t.nodes.iter().enumerate() {
        for l in t.agent(k).connections() {
            let s = |f: &str| l[f].as_str().unwrap_or("-").to_string();
            println!(
                "  {:<7} {:<15} {:<7} {:<23} {:<22} {:<10} {:<38} {:>5} {:>5}  {}",
                n.name,
                s("direction"),
                s("pod"),
                s("src"),
                s("dst"),
                s("transport"),
                s("peer_identity"),
                l["sent"].as_u64().unwrap_or(0),
                l["received"].as_u64().unwrap_or(0),
                s("reason")
            );
        }
    }

    println!("\neBPF attachments (as the kernel reports them):");
    let netns_names: Vec<(u64, String)> = t.pods.iter().map(|p| (bpf::netns_ino(&p.netns), p.key())).collect();
    for (node, l) in t.attached_links() {
        let target = match l.netns_ino {
            Some(ino) => netns_names
                .iter()
                .find(|(i, _)| *i == ino)
                .map(|(_, k)| format!("pod {k}"))
                .unwrap_or_default(),
            None => "cgroup v2 root (acts on this node's pods only)".to_string(),
        };
        println!(
            "  {node:<8} link {:>5}  {:<14} {:<26} {target}",
            l.id, l.prog_name, l.attach_type
        );
    }

    println!("\nFail closed: killing node 1's agent with SIGKILL");
    t.agent_mut(0).kill();
    let r = traffic::connect_timeout(&a.netns, c.v4(8080), Duration::from_secs(2))
        .and_then(|s| traffic::read_greeting(&s).map(|_| ()));
    println!("  mesh/a -> mesh/c while the agent is down: {}", describe(&r));
    ensure!(r.is_err(), "plaintext got through with the agent down");
    let r = traffic::connect_timeout(&d.netns, b.v4(8080), Duration::from_secs(2))
        .and_then(|s| traffic::read_greeting(&s).map(|_| ()));
    println!("  plain/d -> mesh/b while the agent is down: {}", describe(&r));
    ensure!(r.is_err(), "plaintext got through with the agent down");
    t.start_agent(0, &[]);
    t.wait_captured(0);
    let (_, _, local) = round_trip(&a.netns, c.v4(8080), b"back")?;
    println!("  agent restarted, pods re-adopted without restarting them: mesh/a -> mesh/c works again (via {local})");
    println!("\nTearing down.");
    Ok(())
}

fn describe(r: &std::io::Result<()>) -> String {
    match r {
        Ok(()) => "CONNECTED (bad)".into(),
        Err(e) => format!("refused ({e})"),
    }
}
