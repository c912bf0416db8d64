//! Nodes and pods as network namespaces.
//!
//! Topology `T` (1..=250, leased through a lock file so concurrent and
//! crashed runs never collide) uses:
//! * a fabric namespace with a bridge joining the nodes: node k is
//!   10.T.0.k/24 and fd00:T:0::k/64 on it;
//! * per node, a bridge `br0` for its pods: gateway 10.T.k.1, fd00:T:k::1;
//! * per pod, `eth0` with 10.T.k.(10+i) and fd00:T:k::(10+i), default
//!   routes via the node, like a routed CNI.
//!
//! Nodes route each other's pod subnets over the fabric, so pod-to-pod
//! traffic across nodes really crosses a link (`up0` in each node).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::Agent;
use crate::cluster::{PlacedPod, PodSpec, Workloads};
use crate::netns::{run_in, sh, sh_out};

const LEASE_DIR: &str = "/run/nodeward-testbed";

/// What to build.
#[derive(Clone, Debug, Default)]
pub struct TopologySpec {
    /// Nodes, each with its pods.
    pub nodes: Vec<Vec<PodSpec>>,
    /// Namespaces and whether they carry the ambient label.
    pub namespaces: Vec<(String, bool)>,
}

impl TopologySpec {
    /// The standard two-node cluster: namespace `mesh` (enrolled) with pods
    /// `a`, `b` on node 1 and `c` on node 2; namespace `plain` (not
    /// enrolled) with pod `d` on node 2.
    pub fn two_nodes() -> Self {
        TopologySpec {
            nodes: vec![
                vec![PodSpec::new("a", "mesh"), PodSpec::new("b", "mesh")],
                vec![PodSpec::new("c", "mesh"), PodSpec::new("d", "plain")],
            ],
            namespaces: vec![("mesh".into(), true), ("plain".into(), false)],
        }
    }
}

/// A node: a namespace running one agent.
pub struct Node {
    /// Kubernetes node name (unique per topology).
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// Address on its pod bridge (the pods' gateway; what NodePort traffic is masqueraded to).
    pub gateway4: Ipv4Addr,
    /// IPv6 gateway.
    pub gateway6: Ipv6Addr,
    /// Interface towards the other nodes.
    pub uplink: String,
    /// Its address on the uplink: the Node's `InternalIP`.
    pub address4: Ipv4Addr,
    /// Its IPv6 address on the uplink, also an `InternalIP`.
    pub address6: Ipv6Addr,
    /// The running agent, if any.
    pub agent: Option<Agent>,
}

/// A pod: a namespace behind a node's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Index of its node in `Topology::nodes`.
    pub node: usize,
    /// Network namespace name.
    pub netns: String,
    /// IPv4 address.
    pub ip4: Ipv4Addr,
    /// IPv6 address.
    pub ip6: Ipv6Addr,
}

impl Pod {
    /// `ip4:port`.
    pub fn v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip4), port)
    }

    /// `[ip6]:port`.
    pub fn v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ip6), port)
    }

    /// Runs `f` inside the pod's namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(&self.netns, f)
    }

    /// `namespace/name`, as the agent logs it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A built topology; dropping it tears everything down.
pub struct Topology {
    /// Lease number, also the second octet of every address.
    pub id: u32,
    /// Nodes.
    pub nodes: Vec<Node>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// The cluster's config directory, read by every agent.
    pub config_dir: PathBuf,
    /// The cluster's CA directory (made with `nodeward ca init`), used by every agent.
    pub ca_dir: PathBuf,
    /// The objects written there.
    pub workloads: Workloads,
    fabric: String,
    extra_netns: Vec<String>,
}

impl Topology {
    /// Creates the namespaces, links and config. Agents are not started.
    pub fn build(spec: TopologySpec) -> Topology {
        let id = lease();
        let fabric = format!("nwt{id}-fabric");
        sh(&["ip", "netns", "add", &fabric]);
        let mut topo = Topology {
            id,
            nodes: Vec::new(),
            pods: Vec::new(),
            config_dir: PathBuf::from(format!("{LEASE_DIR}/{id}.config")),
            ca_dir: PathBuf::from(format!("{LEASE_DIR}/{id}.ca")),
            workloads: Workloads {
                namespaces: spec.namespaces.clone(),
                pods: Vec::new(),
                nodes: Vec::new(),
            },
            fabric: fabric.clone(),
            extra_netns: Vec::new(),
        };
        ip(&fabric, &["link", "set", "lo", "up"]);
        ip(&fabric, &["link", "add", "br0", "type", "bridge"]);
        ip(&fabric, &["link", "set", "br0", "up"]);
        for (k0, pods) in spec.nodes.iter().enumerate() {
            let k = k0 + 1;
            let netns = format!("nwt{id}-n{k}");
            sh(&["ip", "netns", "add", &netns]);
            ip(&netns, &["link", "set", "lo", "up"]);
            sh(&[
                "ip",
                "netns",
                "exec",
                &netns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ]);
            let f = format!("f{k}");
            sh(&[
                "ip", "link", "add", &f, "netns", &fabric, "type", "veth", "peer", "name", "up0", "netns", &netns,
            ]);
            ip(&fabric, &["link", "set", &f, "master", "br0", "up"]);
            ip(&netns, &["link", "set", "up0", "up"]);
            ip(&netns, &["addr", "add", &format!("10.{id}.0.{k}/24"), "dev", "up0"]);
            ip(
                &netns,
                &["addr", "add", &format!("fd00:{id:x}:0::{k}/64"), "dev", "up0", "nodad"],
            );
            ip(&netns, &["link", "add", "br0", "type", "bridge"]);
            ip(&netns, &["link", "set", "br0", "up"]);
            ip(&netns, &["addr", "add", &format!("10.{id}.{k}.1/24"), "dev", "br0"]);
            ip(
                &netns,
                &["addr", "add", &format!("fd00:{id:x}:{k}::1/64"), "dev", "br0", "nodad"],
            );
            let node_name = format!("t{id}n{k}");
            let address4: Ipv4Addr = format!("10.{id}.0.{k}").parse().unwrap();
            let address6: Ipv6Addr = format!("fd00:{id:x}:0::{k}").parse().unwrap();
            topo.workloads
                .nodes
                .push((node_name.clone(), vec![address4.into(), address6.into()]));
            topo.nodes.push(Node {
                address4,
                address6,
                name: node_name.clone(),
                netns: netns.clone(),
                gateway4: format!("10.{id}.{k}.1").parse().unwrap(),
                gateway6: format!("fd00:{id:x}:{k}::1").parse().unwrap(),
                uplink: "up0".into(),
                agent: None,
            });
            for (i, spec) in pods.iter().enumerate() {
                let pod = topo.add_pod_netns(k0, i, spec);
                topo.workloads.pods.push(PlacedPod {
                    spec: spec.clone(),
                    node: node_name.clone(),
                    ips: vec![IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)],
                    uid: format!("uid-{id}-{}", spec.name),
                });
                topo.pods.push(pod);
            }
        }
        let n = topo.nodes.len();
        for k in 1..=n {
            for j in (1..=n).filter(|j| *j != k) {
                let ns = &topo.nodes[k - 1].netns;
                ip(
                    ns,
                    &[
                        "route",
                        "add",
                        &format!("10.{id}.{j}.0/24"),
                        "via",
                        &format!("10.{id}.0.{j}"),
                    ],
                );
                ip(
                    ns,
                    &[
                        "-6",
                        "route",
                        "add",
                        &format!("fd00:{id:x}:{j}::/64"),
                        "via",
                        &format!("fd00:{id:x}:0::{j}"),
                    ],
                );
            }
        }
        std::fs::create_dir_all(&topo.config_dir).expect("config dir");
        topo.write_config();
        let out = std::process::Command::new(crate::nodeward_bin())
            .args(["ca", "init", "--out"])
            .arg(&topo.ca_dir)
            .output()
            .expect("run nodeward ca init");
        assert!(
            out.status.success(),
            "ca init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        topo
    }

    /// Creates a pod's namespace on node `k0` (0-based) at slot `i`.
    fn add_pod_netns(&mut self, k0: usize, i: usize, spec: &PodSpec) -> Pod {
        let (id, k) = (self.id, k0 + 1);
        let netns = format!("nwt{id}-{}", spec.name);
        sh(&["ip", "netns", "add", &netns]);
        self.extra_netns.push(netns.clone());
        let node = &self.nodes[k0].netns;
        let host_if = format!("p{}", 10 + i);
        sh(&[
            "ip", "link", "add", &host_if, "netns", node, "type", "veth", "peer", "name", "eth0", "netns", &netns,
        ]);
        ip(node, &["link", "set", &host_if, "master", "br0", "up"]);
        let ip4: Ipv4Addr = format!("10.{id}.{k}.{}", 10 + i).parse().unwrap();
        let ip6: Ipv6Addr = format!("fd00:{id:x}:{k}::{:x}", 10 + i).parse().unwrap();
        ip(&netns, &["link", "set", "lo", "up"]);
        ip(&netns, &["link", "set", "eth0", "up"]);
        ip(&netns, &["addr", "add", &format!("{ip4}/24"), "dev", "eth0"]);
        ip(&netns, &["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"]);
        ip(&netns, &["route", "add", "default", "via", &format!("10.{id}.{k}.1")]);
        ip(
            &netns,
            &["-6", "route", "add", "default", "via", &format!("fd00:{id:x}:{k}::1")],
        );
        Pod {
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            node: k0,
            netns,
            ip4,
            ip6,
        }
    }

    /// Adds a pod's namespace to node `k0` after the topology was built,
    /// without listing it in the config (tests that the agent waits for it).
    pub fn add_pod(&mut self, k0: usize, spec: PodSpec) -> Pod {
        let i = self.pods.iter().filter(|p| p.node == k0).count();
        let pod = self.add_pod_netns(k0, i, &spec);
        self.workloads.pods.push(PlacedPod {
            node: self.nodes[k0].name.clone(),
            ips: vec![IpAddr::V4(pod.ip4), IpAddr::V6(pod.ip6)],
            uid: format!("uid-{}-{}", self.id, spec.name),
            spec,
        });
        self.pods.push(pod.clone());
        pod
    }

    /// Creates a namespace `nwt<id>-<name>` that is no pod, holding `ips` on
    /// a veth of its own: what any workload able to create a network
    /// namespace can do. Removed with the topology.
    pub fn add_decoy(&mut self, name: &str, ips: &[IpAddr]) -> String {
        let netns = format!("nwt{}-{name}", self.id);
        sh(&["ip", "netns", "add", &netns]);
        self.extra_netns.push(netns.clone());
        ip(&netns, &["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"]);
        ip(&netns, &["link", "set", "eth0", "up"]);
        for addr in ips {
            match addr {
                IpAddr::V4(v4) => ip(&netns, &["addr", "add", &format!("{v4}/32"), "dev", "eth0"]),
                IpAddr::V6(v6) => ip(&netns, &["addr", "add", &format!("{v6}/128"), "dev", "eth0", "nodad"]),
            }
        }
        netns
    }

    /// Deletes a namespace made by [`Topology::add_decoy`] before teardown.
    pub fn remove_decoy(&mut self, netns: &str) {
        sh(&["ip", "netns", "del", netns]);
        self.extra_netns.retain(|n| n != netns);
    }

    /// Writes the config file atomically (hidden temp file, then rename).
    pub fn write_config(&self) {
        let tmp = self.config_dir.join(".cluster.yaml.tmp");
        std::fs::write(&tmp, self.workloads.to_yaml()).expect("write config");
        std::fs::rename(&tmp, self.config_dir.join("cluster.yaml")).expect("rename config");
    }

    /// Writes (or replaces) an extra config file `name.yaml`, atomically.
    pub fn apply(&self, name: &str, yaml: &str) {
        let tmp = self.config_dir.join(format!(".{name}.yaml.tmp"));
        std::fs::write(&tmp, yaml).expect("write config");
        std::fs::rename(&tmp, self.config_dir.join(format!("{name}.yaml"))).expect("rename config");
    }

    /// Removes an extra config file.
    pub fn unapply(&self, name: &str) {
        let _ = std::fs::remove_file(self.config_dir.join(format!("{name}.yaml")));
    }

    /// Changes a pod's spec (or removes it with `None`) and rewrites the config.
    pub fn edit_pod(&mut self, name: &str, edit: impl FnOnce(&mut PodSpec) -> bool) {
        let idx = self
            .workloads
            .pods
            .iter()
            .position(|p| p.spec.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"));
        if !edit(&mut self.workloads.pods[idx].spec) {
            self.workloads.pods.remove(idx);
        }
        self.write_config();
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Starts every node's agent and waits until each has captured its
    /// enrolled pods.
    pub fn start_agents(&mut self) {
        self.start_agents_with(&[]);
    }

    /// [`Topology::start_agents`] with extra agent flags.
    pub fn start_agents_with(&mut self, extra: &[&str]) {
        for k in 0..self.nodes.len() {
            self.start_agent(k, extra);
        }
        for k in 0..self.nodes.len() {
            self.wait_captured(k);
        }
    }

    /// Starts node `k`'s agent with extra flags (and `--ca-dir`, unless
    /// they name a CA service).
    pub fn start_agent(&mut self, k: usize, extra: &[&str]) {
        self.start_agent_env(k, extra, &[]);
    }

    /// [`Topology::start_agent`] with environment variables for the agent.
    pub fn start_agent_env(&mut self, k: usize, extra: &[&str], env: &[(&str, &str)]) {
        let ca = self.ca_dir.to_string_lossy().into_owned();
        let mut args: Vec<&str> = if extra.contains(&"--ca-address") {
            Vec::new()
        } else {
            vec!["--ca-dir", &ca]
        };
        args.extend_from_slice(extra);
        let agent = Agent::start_env(&self.nodes[k], &self.config_dir, &args, env);
        self.nodes[k].agent = Some(agent);
    }

    /// Starts a second agent on node `k` beside the running one, from
    /// `bin`, with the running one's CA and `extra`, as a rolling update
    /// does; returns the running one, which becomes the node's previous
    /// agent (the new one is [`Topology::agent`] from then on).
    pub fn start_successor(&mut self, k: usize, bin: &Path, extra: &[&str]) -> Agent {
        let ca = self.ca_dir.to_string_lossy().into_owned();
        let dir = self.config_dir.to_string_lossy().into_owned();
        let mut args: Vec<&str> = vec!["--config-dir", &dir, "--ca-dir", &ca];
        args.extend_from_slice(extra);
        let new = Agent::start_bin(bin, &self.nodes[k], &args, &[]);
        self.nodes[k].agent.replace(new).expect("a running agent to succeed")
    }

    /// The enrolled pods the config places on node `k`.
    pub fn enrolled_on(&self, k: usize) -> Vec<String> {
        let node = &self.nodes[k].name;
        self.workloads
            .pods
            .iter()
            .filter(|p| &p.node == node && !p.spec.unlisted)
            .filter(|p| {
                let ns_ambient = self
                    .workloads
                    .namespaces
                    .iter()
                    .any(|(n, a)| *a && *n == p.spec.namespace);
                let label = p
                    .spec
                    .labels
                    .iter()
                    .find(|(k, _)| k == "istio.io/dataplane-mode")
                    .map(|(_, v)| v.as_str());
                label != Some("none") && (ns_ambient || label == Some("ambient"))
            })
            .map(|p| format!("{}/{}", p.spec.namespace, p.spec.name))
            .collect()
    }

    /// Waits until node `k`'s agent logged "pod captured" for all its enrolled pods.
    pub fn wait_captured(&self, k: usize) {
        let agent = self.agent(k);
        for key in self.enrolled_on(k) {
            agent
                .wait_log(Duration::from_secs(10), |l| {
                    l["message"] == "pod captured" && l["pod"] == key.as_str()
                })
                .unwrap_or_else(|| panic!("agent of node {k} did not capture {key}; log:\n{}", agent.dump()));
        }
    }

    /// A scratch directory of this topology's lease, `name` its suffix;
    /// one named `cri-*` is reclaimed as a container runtime's
    /// ([`crate::cri::reclaim`]) if a run dies.
    pub fn scratch_dir(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{LEASE_DIR}/{}.{name}", self.id))
    }

    /// Node `k`'s running agent.
    pub fn agent(&self, k: usize) -> &Agent {
        self.nodes[k].agent.as_ref().expect("agent running")
    }

    /// Node `k`'s agent, mutably.
    pub fn agent_mut(&mut self, k: usize) -> &mut Agent {
        self.nodes[k].agent.as_mut().expect("agent running")
    }

    /// The kernel's links that belong to this topology's agents: those
    /// behind the links pinned in its nodes' pin directories.
    /// Each comes with the name of the node whose agent attached it.
    pub fn attached_links(&self) -> Vec<(String, crate::bpf::Link)> {
        let mut progs: Vec<(u64, String)> = Vec::new();
        for k in 0..self.nodes.len() {
            let dir = self.pin_dir(k);
            let mut pins: Vec<PathBuf> = std::fs::read_dir(dir.join("links"))
                .map(|rd| rd.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            if let Ok(rd) = std::fs::read_dir(dir.join("pods")) {
                pins.extend(rd.flatten().map(|e| e.path().join("sk_lookup")));
            }
            let node = &self.nodes[k].name;
            progs.extend(
                pins.iter()
                    .filter_map(|p| crate::bpf::pinned_link_prog(&p.to_string_lossy()))
                    .map(|id| (id, node.clone())),
            );
        }
        crate::bpf::links()
            .into_iter()
            .filter_map(|l| {
                progs
                    .iter()
                    .find(|(id, _)| *id == l.prog_id)
                    .map(|(_, n)| (n.clone(), l))
            })
            .collect()
    }

    /// Pin directory of node `k`.
    pub fn pin_dir(&self, k: usize) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/nodeward/{}/v1", self.nodes[k].name))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut a) = node.agent.take() {
                a.kill();
            }
            cleanup_node(&node.name);
        }
        for ns in self.extra_netns.iter().chain(self.nodes.iter().map(|n| &n.netns)) {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.fabric])
            .status();
        let _ = std::fs::remove_dir_all(&self.config_dir);
        let _ = std::fs::remove_dir_all(&self.ca_dir);
        let _ = std::fs::remove_dir_all(nodeward::identity::ca_cli::default_root_dir(&self.ca_dir));
        let _ = std::fs::remove_file(lease_file(self.id));
    }
}

fn ip(netns: &str, args: &[&str]) {
    let mut v = vec!["ip", "-n", netns];
    v.extend_from_slice(args);
    sh(&v);
}

/// Removes a node's pins directly: what `nodeward cleanup` does, without
/// depending on the binary under test in teardown.
fn cleanup_node(node: &str) {
    let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/nodeward/{node}"));
}

fn lease_file(id: u32) -> PathBuf {
    PathBuf::from(format!("{LEASE_DIR}/{id}.lease"))
}

/// Leases a topology number, reclaiming those of dead processes. The lease
/// file appears atomically with the owner's pid in it (hard link of a
/// private temp file), so a reader never sees an empty one.
fn lease() -> u32 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    std::fs::create_dir_all(LEASE_DIR).expect("lease dir");
    let me = std::process::id();
    let tmp = PathBuf::from(format!(
        "{LEASE_DIR}/.{me}.{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&tmp, me.to_string()).expect("lease temp file");
    let claim = |f: &PathBuf| std::fs::hard_link(&tmp, f).is_ok();
    let mut got = None;
    for id in 20..=250u32 {
        let f = lease_file(id);
        if claim(&f) {
            got = Some(id);
            break;
        }
        let owner: Option<i32> = std::fs::read_to_string(&f).ok().and_then(|s| s.trim().parse().ok());
        let dead = owner.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists());
        if dead && std::fs::remove_file(&f).is_ok() && claim(&f) {
            got = Some(id);
            break;
        }
    }
    let _ = std::fs::remove_file(&tmp);
    let id = got.unwrap_or_else(|| panic!("no free topology number in {LEASE_DIR}"));
    reclaim(id);
    id
}

/// Removes whatever a dead run left under topology number `id`.
fn reclaim(id: u32) {
    let prefix = format!("nwt{id}-");
    for line in sh_out(&["ip", "netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(&prefix) {
            let _ = std::process::Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf/nodeward") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&format!("t{id}n")) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(LEASE_DIR) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(&format!("{id}.cri-")) {
                crate::cri::reclaim(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(format!("{LEASE_DIR}/{id}.config"));
    let _ = std::fs::remove_dir_all(format!("{LEASE_DIR}/{id}.ca"));
    let _ = std::fs::remove_dir_all(format!("{LEASE_DIR}/{id}.ca-root"));
}
