//! The agent's life and the pods': fail-closed on SIGKILL, re-adoption
//! without duplicate attachments, pod removal within a second, SIGTERM
//! drain, `nodeward cleanup`, late namespaces and bad config.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nodeward_testbed::bpf::{self, links, netns_ino};
use nodeward_testbed::netns::{sh, sh_out};
use nodeward_testbed::traffic::{self, info_echo, read_greeting, round_trip, serve};
use nodeward_testbed::{PodSpec, Topology, TopologySpec, exclusive, nodeward_bin, privileged_or_skip, shared};

const WAIT: Duration = Duration::from_secs(10);
const QUICK: Duration = Duration::from_secs(2);

fn cluster(test: &str) -> Option<Topology> {
    nodeward_testbed::two_node_cluster(test, &[])
}

/// A plaintext connection attempt that must not get through: refused or
/// reset, never an app's greeting.
/// Two nodes, node 1's agent with `--drain-timeout drain`, both capturing.
fn draining_cluster(drain: &str) -> Topology {
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agent(0, &["--drain-timeout", drain]);
    t.start_agent(1, &[]);
    t.wait_captured(0);
    t.wait_captured(1);
    t
}

#[track_caller]
fn assert_blocked(netns: &str, dst: SocketAddr) {
    match traffic::connect_timeout(netns, dst, QUICK) {
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::TimedOut | ErrorKind::ConnectionReset
            ),
            "{dst}: unexpected error {e}"
        ),
        Ok(s) => {
            // Connected to a proxy that then resets: the app was not reached.
            let r = read_greeting(&s);
            assert!(r.is_err(), "{dst}: plaintext reached the app: {r:?}");
        }
    }
}

fn count_links(prog: &str) -> usize {
    links().iter().filter(|l| l.prog_name == prog).count()
}

fn sk_lookup_links(netns: &str) -> usize {
    let ino = netns_ino(netns);
    links()
        .iter()
        .filter(|l| l.attach_type == "sk_lookup" && l.netns_ino == Some(ino))
        .count()
}

#[test]
fn sigkill_fails_closed_and_a_restarted_agent_readopts_without_duplicates() {
    let _g = exclusive();
    let Some(mut t) = cluster("sigkill_fails_closed_and_a_restarted_agent_readopts_without_duplicates") else {
        return;
    };
    let (a, c, d) = (t.pod("a").clone(), t.pod("c").clone(), t.pod("d").clone());
    let _sa = serve(&a.netns, a.v4(7000), info_echo);
    let _sa6 = serve(&a.netns, a.v6(7006), info_echo);
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    round_trip(&a.netns, c.v4(7000), b"before").unwrap();
    let connect4_links = count_links("nw_connect4");
    let old_prog = bpf::pinned_link_prog(&format!("{}/links/nw_connect4", t.pin_dir(0).display()));
    assert_eq!(sk_lookup_links(&a.netns), 1);

    t.agent_mut(0).kill();

    // Outbound from a managed pod: no plaintext, v4 or v6.
    assert_blocked(&a.netns, c.v4(7000));
    assert_blocked(&a.netns, c.v6(7000));
    // Inbound to a managed pod, from a pod with no mesh at all and from a
    // meshed pod on a node whose agent is up.
    assert_blocked(&d.netns, a.v4(7000));
    assert_blocked(&d.netns, a.v6(7006));
    assert_blocked(&c.netns, a.v4(7000));

    // The same pods, never restarted, are re-adopted by a new agent.
    t.start_agent(0, &[]);
    t.wait_captured(0);
    let (seen, _, _) = round_trip(&a.netns, c.v4(7000), b"after").unwrap();
    assert!(traffic::captured(&a.netns, c.v4(7000)).unwrap(), "captured again");
    assert_eq!(seen.peer.ip(), a.v4(0).ip());
    round_trip(&d.netns, a.v4(7000), b"inbound again").unwrap();

    // One attachment each, as before: nothing leaked, nothing doubled.
    assert_eq!(count_links("nw_connect4"), connect4_links);
    assert_eq!(sk_lookup_links(&a.netns), 1);
    assert_eq!(sk_lookup_links(&t.pod("b").netns), 1);
    let new_prog = bpf::pinned_link_prog(&format!("{}/links/nw_connect4", t.pin_dir(0).display()));
    assert_ne!(old_prog, new_prog, "the restarted agent attached its own programs");
}

#[test]
fn a_deleted_pod_is_released_within_a_second() {
    let _g = shared();
    let Some(mut t) = cluster("a_deleted_pod_is_released_within_a_second") else {
        return;
    };
    let (b, c) = (t.pod("b").clone(), t.pod("c").clone());
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    let cookie = t
        .agent(0)
        .wait_log(WAIT, |l| l["message"] == "pod captured" && l["pod"] == "mesh/b")
        .unwrap()["cookie"]
        .as_u64()
        .unwrap();
    let pod_pins = t.pin_dir(0).join("pods").join(cookie.to_string());
    assert!(pod_pins.exists());

    let removed = Instant::now();
    t.edit_pod("b", |_| false);
    while pod_pins.exists() || sk_lookup_links(&b.netns) != 0 {
        assert!(
            removed.elapsed() < Duration::from_secs(1),
            "pod state still present after 1 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    t.agent(0)
        .wait_log(Duration::from_secs(1), |l| {
            l["message"] == "pod released" && l["pod"] == "mesh/b"
        })
        .expect("release logged");
    let pods_map = sh_out(&[
        "bpftool",
        "-j",
        "map",
        "dump",
        "pinned",
        &format!("{}/maps/PODS", t.pin_dir(0).display()),
    ]);
    let keys: Vec<u64> = serde_json::from_str::<serde_json::Value>(&pods_map)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let bytes: Vec<u8> = e["key"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
                .collect();
            u64::from_le_bytes(bytes.try_into().unwrap())
        })
        .collect();
    assert!(!keys.contains(&cookie), "PODS still has {cookie}: {keys:?}");
    // Its listeners are gone and its traffic flows without the mesh.
    assert!(traffic::connect_timeout(&b.netns, "127.0.0.1:15001".parse().unwrap(), QUICK).is_err());
    let (seen, _, local) = round_trip(&b.netns, c.v4(7000), b"unmeshed").unwrap();
    assert_eq!(local.ip(), b.v4(0).ip());
    assert_eq!(seen.peer.ip(), b.v4(0).ip());
}

#[test]
fn sigterm_drains_open_connections_then_leaves_capture_attached_until_cleanup() {
    let _g = shared();
    if !privileged_or_skip("sigterm_drains_open_connections_then_leaves_capture_attached_until_cleanup") {
        return;
    }
    let mut t = draining_cluster("20s");
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    let mut open = traffic::connect(&a.netns, c.v4(7000)).unwrap();
    read_greeting(&open).unwrap();

    t.agent(0).terminate();
    t.agent(0)
        .wait_log(WAIT, |l| l["message"] == "SIGTERM: draining")
        .expect("drain started");
    // New connections are refused while draining ...
    assert_blocked(&a.netns, c.v4(7000));
    // ... the open one keeps working ...
    open.write_all(b"still here").unwrap();
    let mut buf = [0u8; 10];
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
    assert!(
        t.agent_mut(0).wait_exit(Duration::from_millis(300)).is_none(),
        "exited before its connection closed"
    );
    // ... and when it ends the agent exits, long before the deadline.
    drop(open);
    let status = t
        .agent_mut(0)
        .wait_exit(Duration::from_secs(5))
        .expect("agent exits after the last connection");
    assert!(status.success(), "{status:?}");

    // Capture stays attached: still no plaintext.
    assert!(t.pin_dir(0).join("links/nw_connect4").exists());
    assert_blocked(&a.netns, c.v4(7000));

    // `nodeward cleanup` removes it all; the pod is then simply unmeshed.
    let bin = nodeward_bin();
    let out = std::process::Command::new(&bin)
        .args(["cleanup", "--node-name", &t.nodes[0].name])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!t.pin_dir(0).exists());
    assert_eq!(sk_lookup_links(&a.netns), 0);
    let (_, _, local) = round_trip(&a.netns, c.v4(7000), b"direct").unwrap();
    assert_eq!(local.ip(), a.v4(0).ip());
}

#[test]
fn sigterm_refuses_new_streams_on_tunnel_connections_already_open() {
    let _g = shared();
    if !privileged_or_skip("sigterm_refuses_new_streams_on_tunnel_connections_already_open") {
        return;
    }
    // One tunnel connection per destination on node 2, so a second
    // connection to `a` would be a new stream on the open one.
    let mut t = Topology::build(TopologySpec::two_nodes());
    t.start_agent(0, &["--drain-timeout", "20s"]);
    t.start_agent(1, &["--tunnel-connections", "1"]);
    t.wait_captured(0);
    t.wait_captured(1);
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let _sa = serve(&a.netns, a.v4(7000), info_echo);
    let mut open = traffic::connect(&c.netns, a.v4(7000)).unwrap();
    read_greeting(&open).unwrap();

    t.agent(0).terminate();
    t.agent(0)
        .wait_log(WAIT, |l| l["message"] == "SIGTERM: draining")
        .expect("drain started");
    assert_blocked(&c.netns, a.v4(7000));
    open.write_all(b"still here").unwrap();
    let mut buf = [0u8; 10];
    open.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
}

#[test]
fn the_drain_deadline_closes_connections_that_stay_open() {
    let _g = shared();
    if !privileged_or_skip("the_drain_deadline_closes_connections_that_stay_open") {
        return;
    }
    let mut t = draining_cluster("1s");
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    let mut open = traffic::connect(&a.netns, c.v4(7000)).unwrap();
    read_greeting(&open).unwrap();
    t.agent(0).terminate();
    let status = t
        .agent_mut(0)
        .wait_exit(Duration::from_secs(8))
        .expect("agent exits after the deadline");
    assert!(status.success());
    let mut buf = [0u8; 1];
    let r = open.read(&mut buf);
    assert!(matches!(r, Ok(0) | Err(_)), "connection closed: {r:?}");
    let l = t
        .agent(0)
        .wait_connection("outbound", &c.v4(7000).to_string(), QUICK)
        .expect("logged");
    assert_eq!(l["reason"], "shutdown");
}

#[test]
fn a_pod_whose_namespace_appears_late_is_warned_about_then_captured() {
    let _g = shared();
    let Some(mut t) = cluster("a_pod_whose_namespace_appears_late_is_warned_about_then_captured") else {
        return;
    };
    let e = t.add_pod(0, PodSpec::new("e", "mesh"));
    // Its addresses are not configured yet: no namespace holds its IP.
    sh(&["ip", "-n", &e.netns, "addr", "flush", "dev", "eth0"]);
    t.write_config();
    t.agent(0)
        .wait_log(WAIT, |l| {
            l["pod"] == "mesh/e" && l["message"].as_str().unwrap_or("").contains("will retry")
        })
        .unwrap_or_else(|| panic!("no warning:\n{}", t.agent(0).dump()));
    sh(&[
        "ip",
        "-n",
        &e.netns,
        "addr",
        "add",
        &format!("{}/24", e.ip4),
        "dev",
        "eth0",
    ]);
    sh(&[
        "ip",
        "-n",
        &e.netns,
        "addr",
        "add",
        &format!("{}/64", e.ip6),
        "dev",
        "eth0",
        "nodad",
    ]);
    sh(&[
        "ip",
        "-n",
        &e.netns,
        "route",
        "add",
        "default",
        "via",
        &t.nodes[0].gateway4.to_string(),
    ]);
    t.agent(0)
        .wait_log(WAIT, |l| l["message"] == "pod captured" && l["pod"] == "mesh/e")
        .unwrap_or_else(|| panic!("not captured:\n{}", t.agent(0).dump()));
    let c = t.pod("c").clone();
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    round_trip(&e.netns, c.v4(7000), b"late").unwrap();
    assert!(traffic::captured(&e.netns, c.v4(7000)).unwrap(), "captured");
}

#[test]
fn bad_config_is_reported_by_file_and_the_last_good_config_keeps_running() {
    let _g = shared();
    let Some(t) = cluster("bad_config_is_reported_by_file_and_the_last_good_config_keeps_running") else {
        return;
    };
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let _sc = serve(&c.netns, c.v4(7000), info_echo);
    let dir = t.config_dir.clone();
    std::fs::write(dir.join("broken.yaml"), "apiVersion: v1\nkind: Pod\nmetadata: [oops\n").unwrap();
    // A kind the agent does not use is skipped; a bad Service is not.
    std::fs::write(dir.join("deploy.yaml"), "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: x}\nspec: {clusterIP: nope}\n").unwrap();
    // The main file turns bad too: its last good version must stay in force.
    let good = std::fs::read_to_string(dir.join("cluster.yaml")).unwrap();
    std::fs::write(dir.join("cluster.yaml"), format!("{good}\nthis is: [not yaml\n")).unwrap();
    for (file, needle) in [
        ("broken.yaml", "line 3"),
        ("deploy.yaml", "spec.clusterIPs"),
        ("cluster.yaml", "line"),
    ] {
        let l = t
            .agent(0)
            .wait_log(WAIT, |l| {
                l["level"] == "ERROR" && l["file"].as_str().is_some_and(|f| f.ends_with(file))
            })
            .unwrap_or_else(|| panic!("no error for {file}:\n{}", t.agent(0).dump()));
        let text = l.to_string();
        assert!(text.contains(file) && text.contains(needle), "{file}: {text}");
    }
    std::thread::sleep(Duration::from_millis(500));
    round_trip(&a.netns, c.v4(7000), b"still meshed").unwrap();
    assert!(
        traffic::captured(&a.netns, c.v4(7000)).unwrap(),
        "pods stay captured under the last good config"
    );
    assert!(
        !t.agent(0).lines().iter().any(|l| l["message"] == "pod released"),
        "no pod was dropped because of bad files"
    );
}
