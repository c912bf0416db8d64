//! Pods made by a real container runtime: containerd's CRI plugin, driven
//! as the kubelet drives it, creates each sandbox and its network
//! namespace and runs the CNI chain `nodeward-cni install` wrote. The
//! runtime, not the test, chooses the namespace paths, the `CNI_ARGS`, and
//! when ADD and DEL are sent, repeated, or sent for sandboxes that are
//! gone. These tests hold the agent to what a real node does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nodeward_testbed::cri::{Runtime, Sandbox, SandboxSpec};
use nodeward_testbed::netns::sh_out;
use nodeward_testbed::sniff::{self, Sniffer};
use nodeward_testbed::traffic::{self, info_echo, read_greeting, round_trip, serve};
use nodeward_testbed::{PodSpec, Topology, TopologySpec, exclusive, patience, privileged_or_skip, shared};

const WAIT: Duration = Duration::from_secs(10);

/// Nodes with their agents (listening for the CNI plugin) and runtimes.
/// Runtimes are dropped first: their sandboxes go before the nodes' namespaces.
struct Bed {
    runtimes: Vec<Runtime>,
    /// A server in `d`, outside the mesh: what a captured pod's
    /// connections are probed against.
    probe: SocketAddr,
    _probe_server: traffic::Server,
    t: Topology,
}

impl Bed {
    /// `nodes` nodes, node 1 with pod `d` (namespace `plain`, outside the
    /// mesh) as a plaintext client; namespace `mesh` is enrolled.
    fn new(test: &str, nodes: usize) -> Option<Bed> {
        if !privileged_or_skip(test) {
            return None;
        }
        let mut spec = vec![vec![PodSpec::new("d", "plain")]];
        spec.resize(nodes, Vec::new());
        let mut t = Topology::build(TopologySpec {
            nodes: spec,
            namespaces: vec![("mesh".into(), true), ("plain".into(), false)],
        });
        let mut runtimes = Vec::new();
        for k in 0..nodes {
            start_agent(&mut t, k);
            let subnet = format!("10.{}.{}", t.id, k + 1);
            runtimes.push(Runtime::start(
                t.scratch_dir(&format!("cri-n{}", k + 1)),
                &t.nodes[k].netns.clone(),
                "br0",
                &subnet,
                &cni_socket(&t, k),
            ));
        }
        let d = t.pod("d").clone();
        let probe = d.v4(7070);
        let _probe_server = serve(&d.netns, probe, info_echo);
        Some(Bed {
            runtimes,
            probe,
            _probe_server,
            t,
        })
    }

    /// The pod as the API server has it once scheduled to node `k`, before
    /// the runtime gave it an address (the kubelet runs sandboxes only for
    /// pods it read from the API).
    fn schedule(&self, k: usize, spec: &SandboxSpec) {
        let yaml = pod_yaml(&self.t, k, spec, None);
        // A new sandbox of a pod the API server has already: nothing to announce.
        if self.t.config_dir.join(format!("{}.yaml", file(spec))).exists() {
            return;
        }
        self.change_config(k, || self.t.apply(&file(spec), &yaml));
    }

    /// Makes a change to the config directory and waits until node `k`'s
    /// agent has applied it (as the kubelet's watch has seen a pod before
    /// it runs the sandbox).
    fn change_config(&self, k: usize, change: impl FnOnce()) {
        let agent = self.t.agent(k);
        let applied = || {
            agent
                .lines()
                .iter()
                .filter(|l| l["message"] == "config applied")
                .count()
        };
        let before = applied();
        change();
        let deadline = Instant::now() + patience(WAIT);
        while applied() <= before {
            assert!(
                Instant::now() < deadline,
                "the agent did not apply a change:\n{}",
                agent.dump()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pod's status once the kubelet reported the runtime's address.
    fn report(&self, k: usize, spec: &SandboxSpec, sandbox: &Sandbox) {
        self.t
            .apply(&file(spec), &pod_yaml(&self.t, k, spec, Some(&sandbox.ip)));
    }

    /// Schedules `spec` to node `k` and runs its sandbox; waits for the agent's capture.
    fn run_pod(&self, k: usize, spec: &SandboxSpec) -> Sandbox {
        self.schedule(k, spec);
        let s = self.runtimes[k]
            .run_sandbox(spec)
            .unwrap_or_else(|e| panic!("RunPodSandbox {}: {e}\n{}", spec.key(), self.t.agent(k).dump()));
        // The runtime's ADD was answered: captured, before the sandbox ran.
        let agent = self.t.agent(k);
        let add = agent
            .wait_log(WAIT, |l| {
                l["message"] == "CNI request" && l["command"] == "Add" && l["container"] == s.id.as_str()
            })
            .unwrap_or_else(|| panic!("no ADD for {}:\n{}", spec.key(), agent.dump()));
        assert_eq!(add["answer"], "Captured", "{}: {add}", spec.key());
        self.report(k, spec, &s);
        s
    }
}

fn file(spec: &SandboxSpec) -> String {
    format!("cri-{}-{}", spec.namespace, spec.name)
}

fn cni_socket(t: &Topology, k: usize) -> PathBuf {
    // Hidden, so the directory source ignores it.
    t.config_dir.join(format!(".cni-n{}.sock", k + 1))
}

fn start_agent(t: &mut Topology, k: usize) {
    let socket = cni_socket(t, k).to_string_lossy().into_owned();
    t.start_agent(k, &["--cni-socket", &socket]);
    let agent = t.agent(k);
    agent
        .wait_log(WAIT, |l| l["message"] == "CNI hand-off listening")
        .unwrap_or_else(|| panic!("no CNI socket; log:\n{}", agent.dump()));
}

fn pod_yaml(t: &Topology, k: usize, spec: &SandboxSpec, ip: Option<&str>) -> String {
    let status = match ip {
        Some(ip) => format!("  phase: Running\n  podIP: \"{ip}\"\n  podIPs:\n  - ip: \"{ip}\"\n"),
        None => "  phase: Pending\n".into(),
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\nspec:\n  nodeName: {}\n  serviceAccountName: {}\nstatus:\n{status}",
        spec.name, spec.namespace, spec.uid, t.nodes[k].name, spec.name
    )
}

/// The pins of captured pods on node `k`.
fn pinned_pods(t: &Topology, k: usize) -> usize {
    std::fs::read_dir(t.pin_dir(k).join("pods"))
        .map(|r| r.count())
        .unwrap_or(0)
}

/// The agent's "CNI request" lines for sandbox `id`: (command, netns, answer).
fn cni_requests(t: &Topology, k: usize, id: &str) -> Vec<(String, String, String)> {
    t.agent(k)
        .lines()
        .into_iter()
        .filter(|l| l["message"] == "CNI request" && l["container"] == id)
        .map(|l| {
            let s = |f: &str| l[f].as_str().unwrap_or_default().to_string();
            (s("command"), s("netns"), s("answer"))
        })
        .collect()
}

/// Whether `s`'s connections to `dst` reach node `k`'s agent (the kernel's
/// socket table shows them connected to its outbound listener).
#[track_caller]
fn assert_captured(s: &Sandbox, dst: SocketAddr, what: &str) {
    match traffic::captured(&s.netns, dst) {
        Ok(true) => {}
        Ok(false) => panic!("{what}: a connection of sandbox {} to {dst} was not captured", s.id),
        Err(e) => panic!("{what}: connecting from sandbox {} to {dst}: {e}", s.id),
    }
}

#[test]
fn a_cri_pod_is_captured_before_its_first_packet_and_crosses_to_another_nodes_pod_as_hbone() {
    let _g = shared();
    let test = "a_cri_pod_is_captured_before_its_first_packet_and_crosses_to_another_nodes_pod_as_hbone";
    let Some(bed) = Bed::new(test, 2) else {
        return;
    };
    let t = &bed.t;
    let server_spec = SandboxSpec::new("server", "mesh", &format!("uid-{}-server", t.id));
    let server = bed.run_pod(1, &server_spec);
    let dst: SocketAddr = format!("{}:7000", server.ip).parse().unwrap();
    let _srv = serve(&server.netns, dst, info_echo);

    // The runtime chose the namespace and sent the pod's identity in
    // CNI_ARGS; the agent captured the namespace the runtime gave.
    let requests = cni_requests(t, 1, &server.id);
    assert_eq!(
        requests.first().map(|r| (r.0.as_str(), r.1.as_str())),
        Some(("Add", server.netns_path().as_str())),
        "the runtime's ADD names the sandbox's namespace: {requests:?}"
    );
    let add = t
        .agent(1)
        .lines()
        .into_iter()
        .find(|l| l["message"] == "CNI request" && l["container"] == server.id.as_str())
        .unwrap();
    assert_eq!(add["uid"], server_spec.uid.as_str(), "K8S_POD_UID from the runtime");

    // The client pod's only container connects the moment it starts,
    // sending a marker: that very first connection is captured and
    // tunnelled, so the marker never crosses the node link in the clear.
    let sniffer = Sniffer::start(&t.nodes[0].netns, &t.nodes[0].uplink);
    let client_spec = SandboxSpec::new("client", "mesh", &format!("uid-{}-client", t.id));
    let client = bed.run_pod(0, &client_spec);
    const MARKER: &str = "cri-first-packet-marker";
    let command = format!("echo {MARKER} | nc -w 5 {} {}", dst.ip(), dst.port());
    bed.runtimes[0].run_container(&client_spec, &client, "first", &["/bin/sh", "-c", &command]);
    let deadline = Instant::now() + patience(WAIT);
    let output = loop {
        let out = bed.runtimes[0].container_output(&client_spec, "first");
        if out.contains(MARKER) || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        output.contains(MARKER),
        "the container's first connection was not answered: {output:?}\n{}",
        t.agent(0).dump()
    );
    // The server saw the client pod's own address, not a hop's.
    assert!(
        output.contains(&format!("peer={}:", client.ip)),
        "the server saw another peer: {output:?}"
    );
    let out = t
        .agent(0)
        .wait_connection("outbound", &dst.to_string(), WAIT)
        .unwrap_or_else(|| {
            panic!(
                "node 1's agent did not carry the first connection:\n{}",
                t.agent(0).dump()
            )
        });
    assert_eq!(out["pod"], "mesh/client");
    assert_eq!(out["transport"], "hbone");
    assert_eq!(out["peer_identity"], "spiffe://cluster.local/ns/mesh/sa/server");
    let inb = t
        .agent(1)
        .wait_connection("inbound_tunnel", &dst.to_string(), WAIT)
        .unwrap_or_else(|| panic!("node 2's agent saw no tunnel:\n{}", t.agent(1).dump()));
    assert_eq!(inb["peer_identity"], "spiffe://cluster.local/ns/mesh/sa/client");
    let pcap = sniffer.finish();
    assert!(
        !sniff::contains(&pcap, MARKER.as_bytes()),
        "the marker crossed the node link in plaintext"
    );
    assert!(
        sniff::contains(&pcap, &15008u16.to_be_bytes()),
        "no HBONE packet on the link"
    );
}

#[test]
fn stopping_a_sandbox_releases_it_and_repeated_or_stale_dels_leave_the_live_sandbox_captured() {
    let _g = shared();
    let test = "stopping_a_sandbox_releases_it_and_repeated_or_stale_dels_leave_the_live_sandbox_captured";
    let Some(bed) = Bed::new(test, 1) else {
        return;
    };
    let (t, rt) = (&bed.t, &bed.runtimes[0]);
    let d = t.pod("d").clone();
    let probe = bed.probe;
    let spec = SandboxSpec::new("p", "mesh", &format!("uid-{}-p", t.id));

    // Sandbox 1 of pod p, stopped: released by the runtime's DEL.
    let first = bed.run_pod(0, &spec);
    assert_captured(&first, probe, "first sandbox");
    assert_eq!(pinned_pods(t, 0), 1);
    rt.stop(&first.id).expect("StopPodSandbox");
    let agent = t.agent(0);
    agent
        .wait_log(WAIT, |l| l["message"] == "pod released" && l["pod"] == "mesh/p")
        .unwrap_or_else(|| panic!("stopping the sandbox did not release it:\n{}", agent.dump()));
    assert_eq!(pinned_pods(t, 0), 0, "pins left after the sandbox stopped");

    // The kubelet makes sandbox 2 of the same pod (attempt 1).
    let second = bed.run_pod(0, &spec.next_attempt());
    assert_ne!(second.netns, first.netns);
    assert_captured(&second, probe, "second sandbox");
    // Until the kubelet reports it, the source names the first sandbox's
    // address. The runtime's result is the pod's from the ADD on, so the
    // report (run_pod's last step) re-captures nothing: a re-capture
    // releases the pod first, a window in which it is not captured.
    let after_add = |l: &serde_json::Value| l["message"] == "CNI request" && l["container"] == second.id.as_str();
    let deadline = Instant::now() + patience(WAIT);
    loop {
        let lines = t.agent(0).lines();
        let add = lines.iter().position(after_add).expect("the ADD was logged");
        if lines[add..].iter().any(|l| l["message"] == "config applied") {
            let released: Vec<_> = lines[add..]
                .iter()
                .filter(|l| l["message"] == "pod released" && l["pod"] == "mesh/p")
                .collect();
            assert!(
                released.is_empty(),
                "the source's report of the second sandbox's address re-captured the pod: {released:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the report was not applied:\n{}",
            t.agent(0).dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let dst: SocketAddr = format!("{}:7000", second.ip).parse().unwrap();
    let _srv = serve(&second.netns, dst, info_echo);
    round_trip(&d.netns, dst, b"before").expect("the live sandbox serves through the agent");

    // The runtime's repeated and stale DELs: the old sandbox stopped again
    // and removed (its namespace long gone), then the old one's removal
    // repeated. None of them touches the live sandbox.
    let before = cni_requests(t, 0, &first.id).len();
    rt.stop(&first.id).expect("second StopPodSandbox of the old sandbox");
    rt.remove(&first.id).expect("RemovePodSandbox of the old sandbox");
    let _ = rt.remove(&first.id);
    // containerd 1.6 sends a DEL for each stop, the repeat with an empty
    // CNI_NETNS (it removed the namespace at the first).
    let deadline = Instant::now() + patience(WAIT);
    while cni_requests(t, 0, &first.id).len() <= before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stale = cni_requests(t, 0, &first.id);
    assert!(
        stale.len() > before
            && stale
                .last()
                .is_some_and(|(command, netns, _)| command == "Del" && netns.is_empty()),
        "the runtime sent no stale DEL for the old sandbox: {stale:?}"
    );
    assert_captured(&second, probe, "live sandbox after stale DELs");
    assert_eq!(pinned_pods(t, 0), 1, "the live sandbox lost its pins");
    let inbound = || {
        agent
            .connections()
            .iter()
            .filter(|l| l["direction"] == "inbound" && l["dst"] == dst.to_string().as_str())
            .count()
    };
    let carried = inbound();
    let (seen, _, _) = round_trip(&d.netns, dst, b"after").expect("the live sandbox still serves");
    assert_eq!(seen.peer.ip(), d.v4(0).ip());
    let deadline = Instant::now() + patience(WAIT);
    while inbound() <= carried {
        assert!(
            Instant::now() < deadline,
            "the agent did not carry the call after the stale DELs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Stopping the live sandbox twice: one release, the second a no-op.
    rt.stop(&second.id).expect("StopPodSandbox");
    rt.stop(&second.id).expect("repeated StopPodSandbox");
    rt.remove(&second.id).expect("RemovePodSandbox");
    assert_eq!(pinned_pods(t, 0), 0, "pins left after the live sandbox stopped");
    assert!(
        !sh_out(&["ip", "netns", "list"]).contains(&second.netns),
        "the runtime left the namespace"
    );
}

#[test]
fn a_sandbox_whose_add_failed_while_the_agent_was_down_is_torn_down_and_its_retry_is_captured() {
    // Alone: it diffs the machine's namespaces.
    let _g = exclusive();
    let test = "a_sandbox_whose_add_failed_while_the_agent_was_down_is_torn_down_and_its_retry_is_captured";
    let Some(mut bed) = Bed::new(test, 1) else {
        return;
    };
    let probe = bed.probe;
    let spec = SandboxSpec::new("q", "mesh", &format!("uid-{}-q", bed.t.id));
    bed.schedule(0, &spec);
    bed.t.agent_mut(0).kill();
    let namespaces_before = sh_out(&["ip", "netns", "list"]);

    let failed = bed.runtimes[0].run_sandbox(&spec);
    let e = failed.expect_err("RunPodSandbox succeeded with the agent down");
    assert!(
        e.message().contains("nodeward"),
        "the runtime's error does not name the agent: {e}"
    );
    // The runtime tore the sandbox down: nothing of it runs, uncaptured or not.
    assert!(
        bed.runtimes[0]
            .list()
            .iter()
            .all(|(_, name, ready)| name != "q" || !ready),
        "a sandbox of q runs: {:?}",
        bed.runtimes[0].list()
    );
    let namespaces_after = sh_out(&["ip", "netns", "list"]);
    let new: Vec<&str> = namespaces_after
        .lines()
        .filter(|l| !namespaces_before.contains(l.split_whitespace().next().unwrap_or("-")))
        .collect();
    assert!(new.is_empty(), "the failed sandbox's namespace remains: {new:?}");

    // The agent is back; the kubelet's retry (the next attempt) is captured.
    start_agent(&mut bed.t, 0);
    let retry = bed.run_pod(0, &spec.next_attempt());
    assert_captured(&retry, probe, "the retried sandbox");
}

#[test]
fn the_agent_restarting_while_the_runtime_creates_pods_leaves_every_running_sandbox_captured() {
    let _g = shared();
    let test = "the_agent_restarting_while_the_runtime_creates_pods_leaves_every_running_sandbox_captured";
    let Some(mut bed) = Bed::new(test, 1) else {
        return;
    };
    let probe = bed.probe;
    let specs: Vec<SandboxSpec> = (0..8)
        .map(|i| SandboxSpec::new(&format!("r{i}"), "mesh", &format!("uid-{}-r{i}", bed.t.id)))
        .collect();
    for s in &specs {
        bed.schedule(0, s);
    }
    std::thread::sleep(Duration::from_millis(300));

    // The runtime creates pods one after another (as the kubelet's pod
    // workers do) while the agent is killed and started again.
    let mut running: Vec<Sandbox> = Vec::new();
    let mut failed: Vec<SandboxSpec> = Vec::new();
    for (i, s) in specs.iter().enumerate() {
        if i == 3 {
            bed.t.agent_mut(0).kill();
        }
        if i == 5 {
            start_agent(&mut bed.t, 0);
        }
        match bed.runtimes[0].run_sandbox(s) {
            Ok(sb) => {
                bed.report(0, s, &sb);
                running.push(sb);
            }
            Err(_) => failed.push(s.next_attempt()),
        }
    }
    assert!(!failed.is_empty(), "no ADD failed while the agent was down");
    // The kubelet retries the failed ones.
    for s in &failed {
        running.push(bed.run_pod(0, s));
    }
    assert_eq!(running.len(), specs.len());
    // Every sandbox that runs is captured, those made before the restart
    // included (re-adopted from their pins).
    for sb in &running {
        assert_captured(sb, probe, "after the agent's restart");
    }
    let ready = bed.runtimes[0].list().iter().filter(|(_, _, r)| *r).count();
    assert_eq!(ready, specs.len(), "sandboxes ready: {:?}", bed.runtimes[0].list());
}

#[test]
fn containerd_restarting_leaves_live_pods_captured_and_its_later_stop_releases_them() {
    let _g = shared();
    let test = "containerd_restarting_leaves_live_pods_captured_and_its_later_stop_releases_them";
    let Some(mut bed) = Bed::new(test, 1) else {
        return;
    };
    let probe = bed.probe;
    let d = bed.t.pod("d").clone();
    let spec = SandboxSpec::new("s", "mesh", &format!("uid-{}-s", bed.t.id));
    let sb = bed.run_pod(0, &spec);
    let dst: SocketAddr = format!("{}:7000", sb.ip).parse().unwrap();
    let _srv = serve(&sb.netns, dst, info_echo);
    let long = traffic::connect(&d.netns, dst).unwrap();
    read_greeting(&long).unwrap();

    bed.runtimes[0].kill();
    assert_captured(&sb, probe, "while containerd is down");
    round_trip(&d.netns, dst, b"while down").expect("the pod serves while containerd is down");
    bed.runtimes[0].restart();
    assert_captured(&sb, probe, "after containerd restarted");
    assert!(
        bed.runtimes[0]
            .list()
            .iter()
            .any(|(id, _, ready)| *id == sb.id && *ready),
        "the restarted runtime lost the sandbox"
    );
    let mut long = long;
    std::io::Write::write_all(&mut long, b"still").unwrap();
    let mut buf = [0u8; 5];
    std::io::Read::read_exact(&mut long, &mut buf).expect("the open connection survived containerd's restart");

    bed.runtimes[0].stop(&sb.id).expect("StopPodSandbox after the restart");
    bed.t
        .agent(0)
        .wait_log(WAIT, |l| l["message"] == "pod released" && l["pod"] == "mesh/s")
        .unwrap_or_else(|| panic!("not released:\n{}", bed.t.agent(0).dump()));
    assert_eq!(pinned_pods(&bed.t, 0), 0);
}

/// Entries of every map pinned under node `k`'s agent.
fn map_entries(t: &Topology, k: usize) -> Vec<(String, usize)> {
    let maps = t.pin_dir(k).join("maps");
    let mut out: Vec<(String, usize)> = std::fs::read_dir(&maps)
        .map(|rd| {
            rd.flatten()
                .map(|e| {
                    let dump = sh_out(&["bpftool", "-j", "map", "dump", "pinned", e.path().to_str().unwrap()]);
                    let n = serde_json::from_str::<serde_json::Value>(&dump)
                        .ok()
                        .and_then(|v| v.as_array().map(|a| a.len()))
                        .unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), n)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|r| r.count())
        .unwrap_or(0)
}

#[test]
fn fifty_sandboxes_created_and_removed_leave_no_pin_map_entry_listener_or_fd_behind() {
    let _g = shared();
    let test = "fifty_sandboxes_created_and_removed_leave_no_pin_map_entry_listener_or_fd_behind";
    let Some(bed) = Bed::new(test, 1) else {
        return;
    };
    let (t, rt) = (&bed.t, &bed.runtimes[0]);
    let probe = bed.probe;
    // One pod first, so the baseline holds whatever the first capture
    // allocates once (the sockets of the agent's first netns, say).
    let warm = SandboxSpec::new("warm", "mesh", &format!("uid-{}-warm", t.id));
    let w = bed.run_pod(0, &warm);
    rt.stop(&w.id).unwrap();
    rt.remove(&w.id).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (maps_before, fds_before) = (map_entries(t, 0), open_fds(t.agent(0).pid()));

    let mut made = Vec::new();
    for i in 0..50 {
        let spec = SandboxSpec::new(&format!("l{i}"), "mesh", &format!("uid-{}-l{i}", t.id));
        let sb = bed.run_pod(0, &spec);
        made.push(sb.netns.clone());
        assert_captured(&sb, probe, &format!("sandbox {i}"));
        rt.stop(&sb.id).unwrap();
        rt.remove(&sb.id).unwrap();
        bed.change_config(0, || t.unapply(&file(&spec)));
    }
    let deadline = Instant::now() + patience(WAIT);
    loop {
        let (maps, fds) = (map_entries(t, 0), open_fds(t.agent(0).pid()));
        let no_more = |(name, n): &(String, usize)| {
            maps_before
                .iter()
                .find(|(b, _)| b == name)
                .is_some_and(|(_, before)| n <= before)
        };
        let clean = pinned_pods(t, 0) == 0 && maps.iter().all(no_more) && fds <= fds_before;
        if clean {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after 50 sandboxes: {} pod pins, map entries {maps:?} (before {maps_before:?}), {fds} fds (before {fds_before})",
            pinned_pods(t, 0)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // No listener outlived its pod: a listener the agent kept open would
    // hold an fd (and its namespace) past the loop, counted above; and
    // the runtime removed every namespace it made.
    assert!(rt.list().is_empty(), "sandboxes left: {:?}", rt.list());
    let namespaces = sh_out(&["ip", "netns", "list"]);
    let left: Vec<&String> = made.iter().filter(|n| namespaces.contains(n.as_str())).collect();
    assert!(left.is_empty(), "namespaces of removed sandboxes remain: {left:?}");
}
