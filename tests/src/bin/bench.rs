//! `cargo xtask bench` (this binary, run by xtask with the release agent in
//! `NODEWARD_BIN`): the mesh against no mesh, on the same two-node
//! namespace topology, in the same run, alternating A/B over rounds.
//!
//! *direct*: agents stopped and their pins removed, pods not enrolled.
//! *mesh*: agents running, namespace enrolled and STRICT, so pod `a` (node 1)
//! reaches pod `c` (node 2) over HBONE. *ztunnel*, when its binary is
//! present: as direct, plus one ztunnel per pod (dedicated mode, in-pod
//! redirect), so the same load crosses Istio's node proxy. Medians per
//! scenario and mode, the ratios mesh/direct and mesh/ztunnel, the machine,
//! and a JSON copy in target/bench/latest.json.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nodeward_testbed::loadgen;
use nodeward_testbed::netns::nsenter;
use nodeward_testbed::ztunnel::{self, Ztunnel};
use nodeward_testbed::{EndpointSpec, PodSpec, ServiceSpec, Topology, TopologySpec};
use serde_json::json;

/// Bench settings.
#[derive(clap::Parser)]
#[command(
    name = "nodeward-bench",
    about = "Nodeward against no mesh on the namespace topology"
)]
struct Options {
    /// Smoke mode: one short round (proves the harness, measures nothing).
    #[arg(long)]
    quick: bool,
    /// Rounds of A/B (medians are taken over them).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Run only these scenario groups (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Group>,
    /// An extra flag for the mesh column's agents, repeatable: an A/B of
    /// one agent setting is two runs that differ only here, e.g.
    /// `--agent-arg=--local-redirect`.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
}

/// Scenario groups, selectable with `--only` when working on one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Group {
    /// Bulk throughput (iperf3) and proxy CPU per GB.
    Throughput,
    /// Request/response latency, one-connection ping-pong and saturation.
    Latency,
    /// New connections per second.
    ConnRate,
    /// Idle connections, new pods, config size, policy evaluation.
    Scale,
    /// TLS 1.3 record throughput in memory, per crypto provider and suite.
    Crypto,
}

impl Options {
    fn runs(&self, g: Group) -> bool {
        self.only.is_empty() || self.only.contains(&g)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    /// Pod to pod, nothing in between.
    Direct,
    /// Through two plain userspace relays, one in each pod (no TLS, no
    /// HTTP/2, no policy): what any two-proxy design costs on this path.
    Floor,
    /// Through Nodeward.
    Mesh,
    /// Through Istio's ztunnel, one per pod (dedicated mode).
    Ztunnel,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Floor => "floor",
            Mode::Mesh => "mesh",
            Mode::Ztunnel => "ztunnel",
        }
    }
}

/// Ports of the floor's relays: in pod `a` (where its client connects), and
/// in pod `c`, in front of the real server port.
const FLOOR_CLIENT_SIDE: u16 = 20_000;
const FLOOR_SERVER_SIDE: u16 = 21_000;

type Samples = BTreeMap<(&'static str, Mode), Vec<f64>>;

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

const PA_STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: mesh}
spec:
  mtls: {mode: STRICT}
";

/// ClusterIP of the Service in front of `c:7070` (mesh rows `*_service`).
const SERVICE_VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 20));

/// Service `echo` (`SERVICE_VIP:7070`) whose one endpoint is `c:7070`: the
/// same path as to the pod IP, plus the agent's resolution.
fn echo_service(t: &Topology) -> String {
    let c = t.pod("c");
    ServiceSpec {
        name: "echo".into(),
        namespace: "mesh".into(),
        cluster_ips: vec![SERVICE_VIP],
        ports: vec![(String::new(), 7070, "7070".into(), 7070)],
        endpoints: vec![EndpointSpec::pod("c", &[c.ip4.into()], &t.nodes[c.node].name)],
        ..Default::default()
    }
    .to_yaml()
}

/// The proxies of the mode being measured: the agents (mesh) or the
/// ztunnels (ztunnel column), for their CPU time and memory.
struct Proxies {
    /// Extra flags of the mesh column's agents (`--agent-arg`).
    agent_args: Vec<String>,
    /// ztunnel's binary, when present.
    ztunnel_bin: Option<PathBuf>,
    /// The running ztunnels (ztunnel mode only).
    ztunnels: Vec<Ztunnel>,
}

impl Proxies {
    /// Process ids of the proxies carrying `mode`'s traffic.
    fn pids(&self, t: &Topology, mode: Mode) -> Vec<u32> {
        match mode {
            Mode::Mesh => t
                .nodes
                .iter()
                .filter_map(|n| n.agent.as_ref())
                .map(|a| a.pid())
                .collect(),
            Mode::Ztunnel => self.ztunnels.iter().map(|z| z.pid()).collect(),
            Mode::Direct | Mode::Floor => Vec::new(),
        }
    }

    /// CPU seconds the proxies of `mode` have used so far (the floor's
    /// relays are threads of this process).
    fn cpu(&self, t: &Topology, mode: Mode) -> f64 {
        if mode == Mode::Floor {
            return loadgen::relay_cpu_seconds();
        }
        self.pids(t, mode).into_iter().map(ztunnel::proc_cpu_seconds).sum()
    }

    /// Resident memory of the proxies of `mode`, summed, MiB.
    fn rss_mib(&self, t: &Topology, mode: Mode) -> f64 {
        self.pids(t, mode).into_iter().map(ztunnel::proc_rss_kib).sum::<u64>() as f64 / 1024.0
    }
}

/// Switches the topology to `mode`: stops whatever proxies run, removes
/// the agents' pins and the ztunnels' redirects, then starts `mode`'s.
fn set_mode(t: &mut Topology, mode: Mode, p: &mut Proxies) -> Result<()> {
    p.ztunnels.clear();
    for k in 0..t.nodes.len() {
        if let Some(mut a) = t.nodes[k].agent.take() {
            a.kill();
        }
        let _ = std::fs::remove_dir_all(t.pin_dir(k).parent().expect("node pin dir"));
    }
    t.workloads.namespaces = vec![("mesh".into(), mode == Mode::Mesh)];
    t.write_config();
    if mode == Mode::Mesh {
        let extra: Vec<&str> = p.agent_args.iter().map(String::as_str).collect();
        for k in 0..t.nodes.len() {
            t.start_agent(k, &extra);
        }
        for k in 0..t.nodes.len() {
            t.wait_captured(k);
        }
    }
    if mode == Mode::Ztunnel {
        let bin = p.ztunnel_bin.clone().context("ztunnel mode without a ztunnel binary")?;
        let workloads = ztunnel::workloads_yaml(t, &["a", "c"]);
        let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
        let mut client = Ztunnel::start(&bin, t, &a, &workloads);
        client.redirect_outbound(&format!("{}/32", c.ip4));
        p.ztunnels.push(client);
        p.ztunnels.push(Ztunnel::start(&bin, t, &c, &workloads));
    }
    Ok(())
}

/// iperf3 from pod `a` to pod `c`; returns Gbit/s received.
fn iperf(t: &Topology, dst: SocketAddr, streams: u32, secs: u64) -> Result<f64> {
    let (a, c) = (t.pod("a"), t.pod("c"));
    let mut server = nsenter(&c.netns, &["iperf3", "-s", "-1", "-p", "5201"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 server (installed by `cargo xtask prereqs`)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = nsenter(
        &a.netns,
        &[
            "iperf3",
            "-c",
            &dst.ip().to_string(),
            "-p",
            &dst.port().to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )
    .output()?;
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("iperf3 gave no result: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(bps / 1e9)
}

/// Where the client connects to reach the server at `dst` in pod `c`, and
/// the relays that carry it in the floor mode.
fn path(t: &Topology, mode: Mode, dst: SocketAddr) -> (SocketAddr, Vec<loadgen::PodService>) {
    if mode != Mode::Floor {
        return (dst, Vec::new());
    }
    let (a, c) = (t.pod("a"), t.pod("c"));
    // On the client pod's loopback, as the agent's outbound listener is
    // (and clear of the client's ephemeral ports on the pod's IP).
    let near = SocketAddr::from(([127, 0, 0, 1], FLOOR_CLIENT_SIDE + dst.port() % 1000));
    let far = c.v4(FLOOR_SERVER_SIDE + dst.port() % 1000);
    let relays = vec![loadgen::relay(&c.netns, far, dst), loadgen::relay(&a.netns, near, far)];
    (near, relays)
}

fn round(t: &Topology, mode: Mode, o: &Options, p: &Proxies, s: &mut Samples) -> Result<()> {
    let secs = if o.quick { 1 } else { 5 };
    let dur = Duration::from_secs(secs);
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let mut put = |k: &'static str, v: f64| s.entry((k, mode)).or_default().push(v);
    if matches!(mode, Mode::Mesh | Mode::Ztunnel) {
        // Started and ready, before any load.
        put("proxy_rss_at_rest_mib", p.rss_mib(t, mode));
    }

    if o.runs(Group::Throughput) {
        let (dst, _relays) = path(t, mode, c.v4(5201));
        let cpu0 = p.cpu(t, mode);
        let g1 = iperf(t, dst, 1, secs)?;
        let cpu1 = p.cpu(t, mode);
        put("throughput_1_stream_gbps", g1);
        if mode != Mode::Direct {
            // Both proxies of the path; GB = 10^9 bytes, as iperf3 counts.
            let gb = g1 * secs as f64 / 8.0;
            put("proxy_cpu_s_per_gb", (cpu1 - cpu0) / gb.max(1e-9));
        }
        put("throughput_4_streams_gbps", iperf(t, dst, 4, secs)?);
    }

    let _echo = loadgen::echo_server(&c.netns, c.v4(7070), 1024);
    let (dst, _relays) = path(t, mode, c.v4(7070));
    if o.runs(Group::Latency) {
        let fixed = loadgen::request_response(&a.netns, dst, 8, 1024, Some(2000.0), dur);
        put("rr_fixed_2k_rps_p50_us", fixed.p50_us);
        put("rr_fixed_2k_rps_p99_us", fixed.p99_us);
        put("rr_fixed_2k_rps_p999_us", fixed.p999_us);
        let sat = loadgen::request_response(&a.netns, dst, 16, 1024, None, dur);
        put("rr_saturation_rps", sat.rps);
        put("rr_saturation_p99_us", sat.p99_us);
        // One connection, one byte each way, back to back: the latency of
        // the path itself, without queueing behind other connections.
        let pp = loadgen::request_response(&a.netns, dst, 1, 1, None, dur);
        put("pingpong_1_conn_p50_us", pp.p50_us);
        put("pingpong_1_conn_p99_us", pp.p99_us);
        if mode == Mode::Mesh {
            // The same through the Service's ClusterIP, resolved by the agent.
            let pp = loadgen::request_response(&a.netns, SocketAddr::new(SERVICE_VIP, 7070), 1, 1, None, dur);
            put("pingpong_1_conn_p50_us_service", pp.p50_us);
        }
        // 16 connections, 100-byte requests, 1 KiB responses, saturated.
        let _sized = loadgen::sized_server(&c.netns, c.v4(7072), 100, 1024);
        let (dst, _relays) = path(t, mode, c.v4(7072));
        let rr = loadgen::request_response_sized(&a.netns, dst, 16, (100, 1024), None, dur);
        put("rr_16_conn_100b_1k_rps", rr.rps);
    }
    if o.runs(Group::ConnRate) {
        let busy0 = cpu_busy();
        let cr = loadgen::connection_rate(&a.netns, dst, 16, 64, dur);
        let busy1 = cpu_busy();
        put("conn_rate_cps", cr.cps);
        put("conn_rate_host_cpu_busy_pct", busy_pct(busy0, busy1));
        put("conn_setup_p99_us", cr.p99_us);
        // Four loops: connect, one byte each way, close.
        let cr = loadgen::connection_rate(&a.netns, dst, 4, 1, dur);
        put("conn_rate_4_loops_1b_cps", cr.cps);
        put("conn_rate_4_loops_1b_p50_us", cr.p50_us);
        if mode == Mode::Mesh {
            let cr = loadgen::connection_rate(&a.netns, SocketAddr::new(SERVICE_VIP, 7070), 4, 1, dur);
            put("conn_rate_4_loops_1b_cps_service", cr.cps);
            put("conn_rate_4_loops_1b_p50_us_service", cr.p50_us);
        }
    }
    if matches!(mode, Mode::Mesh | Mode::Ztunnel) {
        put("proxy_rss_after_run_mib", p.rss_mib(t, mode));
    }
    Ok(())
}

/// Issue 18's targets, Nodeward against ztunnel in the same run: which
/// value is compared, how, and the bound.
const TARGETS: &[(&str, Target, f64)] = &[
    ("throughput_1_stream_gbps", Target::AtLeast, 1.3),
    ("proxy_cpu_s_per_gb", Target::AtMost, 0.8),
    ("pingpong_1_conn_p50_us", Target::AddedAtMost, 0.7),
    ("pingpong_1_conn_p99_us", Target::AddedAtMost, 0.7),
    ("rr_16_conn_100b_1k_rps", Target::AtLeast, 1.5),
    ("conn_rate_4_loops_1b_cps", Target::AtLeast, 1.5),
    ("proxy_rss_at_rest_mib", Target::AtMost, 1.0),
    ("proxy_rss_after_run_mib", Target::AtMost, 1.0),
];

/// Mesh against the floor (two plain relays), same run: what only a path
/// that skips the loopback TCP stack or userspace TLS can reach.
const FLOOR_TARGETS: &[(&str, f64)] = &[("throughput_1_stream_gbps", 1.0)];

/// How a target compares Nodeward (mesh) with ztunnel.
#[derive(Clone, Copy)]
enum Target {
    /// mesh / ztunnel at least the bound.
    AtLeast,
    /// mesh / ztunnel at most the bound.
    AtMost,
    /// (mesh − direct) / (ztunnel − direct) at most the bound: what each
    /// proxy adds to the path.
    AddedAtMost,
}

/// Prints each target with its measured ratio and whether it was met, and
/// the same ratio for the floor: what two do-nothing relays reach on this
/// path, so a target beyond it asks for more than any two-proxy design gets.
fn targets(s: &Samples) -> Vec<serde_json::Value> {
    println!("\ntargets (mesh against ztunnel, same run; floor: the same ratio for two plain relays)");
    let mut out = Vec::new();
    for &(k, how, bound) in TARGETS {
        let get = |m: Mode| s.get(&(k, m)).map(|v| median(v));
        let (d, z) = (get(Mode::Direct), get(Mode::Ztunnel));
        let ratio_of = |m: Option<f64>| match how {
            Target::AtLeast | Target::AtMost => m.zip(z).map(|(m, z)| m / z),
            Target::AddedAtMost => m.zip(z).zip(d).map(|((m, z), d)| (m - d) / (z - d)),
        };
        let (ratio, floor) = (ratio_of(get(Mode::Mesh)), ratio_of(get(Mode::Floor)));
        let op = match how {
            Target::AtLeast => ">=",
            Target::AtMost => "<=",
            Target::AddedAtMost => "<= (added over direct)",
        };
        let met = ratio.filter(|r| r.is_finite()).map(|r| match how {
            Target::AtLeast => r >= bound,
            Target::AtMost | Target::AddedAtMost => r <= bound,
        });
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        let f = |r: Option<f64>| r.map_or_else(|| "-".into(), |r| format!("{r:.2}"));
        println!(
            "  {k:<32} {:>6}  target {op} {bound}  {verdict:<12} floor {}",
            f(ratio),
            f(floor)
        );
        out.push(json!({"scenario": k, "ratio": ratio, "floor_ratio": floor, "bound": bound, "met": met}));
    }
    for &(k, bound) in FLOOR_TARGETS {
        let get = |m: Mode| s.get(&(k, m)).map(|v| median(v));
        let ratio = get(Mode::Mesh).zip(get(Mode::Floor)).map(|(m, f)| m / f);
        let met = ratio.filter(|r| r.is_finite()).map(|r| r >= bound);
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        let r = ratio.map_or_else(|| "-".into(), |r| format!("{r:.2}"));
        println!("  {k:<32} {r:>6}  target >= {bound} against the floor  {verdict}");
        out.push(json!({"scenario": k, "against": "floor", "ratio": ratio, "bound": bound, "met": met}));
    }
    out
}

/// (busy, total) jiffies of all CPUs, from /proc/stat.
fn cpu_busy() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Share of the host's CPU time that was busy between two samples.
fn busy_pct(a: (u64, u64), b: (u64, u64)) -> f64 {
    let total = b.1.saturating_sub(a.1).max(1) as f64;
    100.0 * b.0.saturating_sub(a.0) as f64 / total
}

/// Scale measurements, mesh only.
fn scale(t: &mut Topology, o: &Options, p: &mut Proxies, s: &mut Samples) -> Result<()> {
    let mut put = |k: &'static str, v: f64| s.entry((k, Mode::Mesh)).or_default().push(v);
    let (a, c) = (t.pod("a").clone(), t.pod("c").clone());
    let _echo = loadgen::echo_server(&c.netns, c.v4(7071), 16);

    // The agent at rest (two pods captured, tunnels not yet open), then
    // idle connections through it: memory per connection.
    let n = if o.quick { 50 } else { 1000 };
    std::thread::sleep(Duration::from_millis(300));
    let before = t.agent(0).rss_kib();
    put("agent_rss_at_rest_mib", before as f64 / 1024.0);
    let conns: Vec<_> = (0..n)
        .map(|_| nodeward_testbed::traffic::connect(&a.netns, c.v4(7071)))
        .collect::<std::io::Result<_>>()?;
    std::thread::sleep(Duration::from_millis(500));
    let after = t.agent(0).rss_kib();
    put("idle_conn_kib_each", (after.saturating_sub(before)) as f64 / n as f64);
    drop(conns);

    // A new pod: from its file appearing to its traffic being captured.
    put("new_pod_captured_ms", new_pod_captured_ms(t, "e")?);

    // 10,000 workloads and 1,000 policies in the config directory, in fresh
    // agents: the heap of one that just held 1,000 connections keeps that
    // memory, which would be counted against the config.
    set_mode(t, Mode::Mesh, p)?;
    let (pods, policies) = if o.quick { (1000, 100) } else { (10_000, 1000) };
    let base = t.agent(0).rss_kib();
    t.apply("scale", &scale_yaml(pods, policies));
    t.agent(0)
        .wait_log(Duration::from_secs(30), |l| {
            l["message"] == "config applied" && l["pods"].as_u64().is_some_and(|p| p as usize >= pods)
        })
        .context("scale config not applied")?;
    std::thread::sleep(Duration::from_millis(500));
    put("scale_config_rss_mib", t.agent(0).rss_kib() as f64 / 1024.0);
    put(
        "scale_config_rss_delta_mib",
        t.agent(0).rss_kib().saturating_sub(base) as f64 / 1024.0,
    );
    t.unapply("scale");

    // 200 pods captured on one node (fresh agents again): agent RSS, and how
    // soon one more pod is captured among them.
    let on_node: usize = if o.quick { 10 } else { 200 };
    let present = t.pods.iter().filter(|p| p.node == 0).count();
    for i in present..on_node {
        t.add_pod(0, PodSpec::new(&format!("m{i}"), "mesh"));
    }
    set_mode(t, Mode::Mesh, p)?;
    std::thread::sleep(Duration::from_millis(500));
    put("pods_on_node", on_node.max(present) as f64);
    put("node_pods_rss_mib", t.agent(0).rss_kib() as f64 / 1024.0);
    put("new_pod_captured_full_node_ms", new_pod_captured_ms(t, "last")?);

    // Policy evaluation cost per connection with that many policies.
    // Measured in this process, built like the agent (release, except in
    // quick mode, where the figure means nothing).
    put("policy_eval_ns", policy_eval_ns(policies));
    Ok(())
}

/// Adds pod `name` on node 1 and times from its file being written to its
/// agent logging it captured.
fn new_pod_captured_ms(t: &mut Topology, name: &str) -> Result<f64> {
    t.add_pod(0, PodSpec::new(name, "mesh"));
    let written = Instant::now();
    t.write_config();
    let key = format!("mesh/{name}");
    t.agent(0)
        .wait_log(Duration::from_secs(10), |l| {
            l["message"] == "pod captured" && l["pod"] == key.as_str()
        })
        .with_context(|| format!("new pod {key} not captured"))?;
    Ok(written.elapsed().as_secs_f64() * 1000.0)
}

fn scale_yaml(pods: usize, policies: usize) -> String {
    let mut y = String::with_capacity(pods * 300);
    for i in 0..pods {
        y.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: w{i}, namespace: scale{}, uid: s{i}, labels: {{app: w{}}}}}\nspec: {{nodeName: elsewhere, serviceAccountName: sa{}}}\nstatus: {{podIP: 10.250.{}.{}}}\n---\n",
            i % 100,
            i % 500,
            i % 50,
            (i / 250) % 250,
            i % 250 + 1
        ));
    }
    for i in 0..policies {
        y.push_str(&format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: scale{}}}\nspec:\n  selector: {{matchLabels: {{app: w{}}}}}\n  rules:\n  - from:\n    - source: {{principals: [cluster.local/ns/scale{}/sa/sa{}]}}\n    to:\n    - operation: {{ports: ['8080']}}\n---\n",
            i % 100,
            i % 500,
            i % 100,
            i % 50
        ));
    }
    y
}

/// Mean cost of authorizing one connection through the agent's state with
/// `n` policies spread over 100 namespaces, in-process.
fn policy_eval_ns(n: usize) -> f64 {
    use nodeward::policy::{ConnInfo, model::parse_authorization_policy};
    use std::sync::Arc;
    let mut snap = nodeward::state::Snapshot::default();
    snap.root_namespace = "istio-system".into();
    for i in 0..n {
        let m = serde_norway::from_str(&format!("{{name: p{i}, namespace: scale{}}}", i % 100)).unwrap();
        let spec = serde_norway::from_str(&format!(
            "selector: {{matchLabels: {{app: w{}}}}}\nrules:\n- from:\n  - source: {{principals: [cluster.local/ns/scale{}/sa/sa{}]}}",
            i % 500,
            i % 100,
            i % 50
        ))
        .unwrap();
        snap.authorization_policies
            .push(Arc::new(parse_authorization_policy(&m, &spec)));
    }
    let snap = snap.index();
    let pod = nodeward::state::workload::Pod {
        namespace: "scale7".into(),
        name: "w7".into(),
        labels: [("app".to_string(), "w7".to_string())].into_iter().collect(),
        ..Default::default()
    };
    let conn = ConnInfo {
        src_ip: "10.0.0.1".parse().unwrap(),
        src_identity: Some(nodeward::identity::Identity::new("cluster.local", "scale7", "sa7")),
        dst_ip: "10.0.0.2".parse().unwrap(),
        dst_port: 8080,
    };
    let iters = 20_000;
    let start = Instant::now();
    let mut allowed = 0;
    for _ in 0..iters {
        allowed += usize::from(snap.authorize(&pod, &conn).allowed);
    }
    std::hint::black_box(allowed);
    start.elapsed().as_nanos() as f64 / iters as f64
}

/// The crypto table: GB/s of application data through rustls's records,
/// in memory on one core, per provider and TLS 1.3 suite (median of three).
fn crypto(quick: bool) -> serde_json::Value {
    use nodeward_testbed::tls_records::{Provider, SUITES, throughput_gbps};
    let total = if quick { 16 << 20 } else { 1 << 30 };
    println!("\nTLS 1.3 records, in memory, one core (GB/s of application data, both ends)");
    println!("{:<32} {:>10} {:>10} {:>8}", "suite", "ring", "aws-lc-rs", "ratio");
    let mut rows = Vec::new();
    for suite in SUITES {
        let gbps = |p: Provider| {
            let v: Vec<f64> = (0..3).map(|_| throughput_gbps(p, suite, total)).collect();
            median(&v)
        };
        let (ring, aws) = (gbps(Provider::Ring), gbps(Provider::AwsLcRs));
        println!("{suite:<32} {ring:>10.2} {aws:>10.2} {:>8.2}", aws / ring);
        rows.push(json!({"suite": suite, "ring_gbps": ring, "aws_lc_rs_gbps": aws}));
    }
    json!(rows)
}

fn main() -> Result<()> {
    let o = <Options as clap::Parser>::parse();
    if o.runs(Group::Crypto) {
        let table = crypto(o.quick);
        if o.only == [Group::Crypto] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("crypto.json"), serde_json::to_vec_pretty(&table)?)?;
            return Ok(());
        }
    }
    if !nodeward_testbed::privileged_or_skip("bench") {
        bail!("run as root: the benchmark creates network namespaces and loads eBPF");
    }
    let spec = TopologySpec {
        nodes: vec![vec![PodSpec::new("a", "mesh")], vec![PodSpec::new("c", "mesh")]],
        namespaces: vec![("mesh".into(), false)],
    };
    let mut t = Topology::build(spec);
    t.apply("strict", PA_STRICT);
    t.apply("service", &echo_service(&t));
    // The connection-rate client (pod a) and the floor's far relay (pod c)
    // open tens of thousands of connections to one address: let them reuse
    // TIME_WAIT ports, as load generators and proxies are set up to do (the
    // agent's own hop needs neither: it comes from loopback).
    // Ranges stay above the agent's ports (150xx) and the floor's relays (2xxxx).
    for (pod, range) in [("a", "32768 65535"), ("c", "32768 60999")] {
        let _ = nsenter(
            &t.pod(pod).netns,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.tcp_tw_reuse=1",
                &format!("net.ipv4.ip_local_port_range={range}"),
            ],
        )
        .status();
    }
    let zt = ztunnel::binary();
    let mut proxies = Proxies {
        agent_args: o.agent_args.clone(),
        ztunnel_bin: zt.is_file().then(|| zt.clone()),
        ztunnels: Vec::new(),
    };
    if proxies.ztunnel_bin.is_none() {
        eprintln!("ztunnel column absent: binary not found at {}", zt.display());
    }
    let mut modes = vec![Mode::Direct, Mode::Mesh];
    if proxies.ztunnel_bin.is_some() {
        modes.push(Mode::Ztunnel);
    }
    let mut samples = Samples::new();
    let rounds = if o.quick { 1 } else { o.rounds.max(1) };
    let ab_rounds = [Group::Throughput, Group::Latency, Group::ConnRate]
        .into_iter()
        .any(|g| o.runs(g));
    for r in (0..rounds).filter(|_| ab_rounds) {
        // Alternate the order so drift does not favour one side.
        let mut order = modes.clone();
        if r % 2 == 1 {
            order.reverse();
        }
        for mode in order {
            eprintln!("round {}/{rounds}: {}", r + 1, mode.name());
            set_mode(&mut t, mode, &mut proxies)?;
            round(&t, mode, &o, &proxies, &mut samples)?;
            if mode == Mode::Direct {
                // Agents are stopped: the relays carry plain traffic.
                eprintln!("round {}/{rounds}: {}", r + 1, Mode::Floor.name());
                round(&t, Mode::Floor, &o, &proxies, &mut samples)?;
            }
        }
    }
    // Leave the ztunnel mode (processes and redirect rules) before scale.
    proxies.ztunnels.clear();
    if o.runs(Group::Scale) {
        set_mode(&mut t, Mode::Mesh, &mut proxies)?;
        scale(&mut t, &o, &mut proxies, &mut samples)?;
    }
    let absent = proxies.ztunnel_bin.is_none().then_some(zt.as_path());
    report(&samples, &o, rounds, absent)
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%dT%H:%M:%SZ")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{date}, {cores} cores ({cpu}), Linux {}", kernel.trim())
}

/// Prints the table of medians and writes the JSON; `ztunnel_absent` is
/// where its binary was looked for when the column could not be measured.
fn report(s: &Samples, o: &Options, rounds: usize, ztunnel_absent: Option<&Path>) -> Result<()> {
    let machine = machine();
    println!("\nNodeward benchmark — {machine}");
    println!(
        "{} round(s){}; medians; mesh/direct and mesh/ztunnel are ratios; floor = two plain userspace relays on the same path",
        rounds,
        if o.quick {
            " (QUICK smoke mode: not a measurement)"
        } else {
            ""
        }
    );
    match ztunnel_absent {
        Some(path) => println!("ztunnel: absent (binary not found at {})\n", path.display()),
        None => println!("ztunnel: one per pod, dedicated mode, in-pod redirect\n"),
    }
    if !o.agent_args.is_empty() {
        println!("mesh agents' extra flags: {}\n", o.agent_args.join(" "));
    }
    println!(
        "{:<32} {:>11} {:>11} {:>11} {:>11} {:>11} {:>12} {:>11}",
        "scenario", "direct", "floor", "mesh", "ztunnel", "mesh/direct", "mesh/ztunnel", "mesh-floor"
    );
    let mut keys: Vec<&'static str> = s.keys().map(|(k, _)| *k).collect();
    keys.dedup();
    let mut rows = Vec::new();
    for k in keys {
        let get = |m: Mode| s.get(&(k, m)).map(|v| median(v));
        let (d, fl, m, z) = (get(Mode::Direct), get(Mode::Floor), get(Mode::Mesh), get(Mode::Ztunnel));
        let ratio = |num: Option<f64>, den: Option<f64>| match (num, den) {
            (Some(n), Some(d)) if d > 0.0 => Some(n / d),
            _ => None,
        };
        let (vs_direct, vs_ztunnel) = (ratio(m, d), ratio(m, z));
        let over_floor = fl.zip(m).map(|(fl, m)| m - fl);
        let f = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        let zt = if ztunnel_absent.is_some() {
            "absent".into()
        } else {
            f(z)
        };
        println!(
            "{k:<32} {:>11} {:>11} {:>11} {:>11} {:>11} {:>12} {:>11}",
            f(d),
            f(fl),
            f(m),
            zt,
            f(vs_direct),
            f(vs_ztunnel),
            f(over_floor)
        );
        rows.push(json!({
            "scenario": k, "direct": d, "floor": fl, "mesh": m, "ztunnel": z,
            "ratio": vs_direct, "ratio_ztunnel": vs_ztunnel,
        }));
    }
    let checks = if ztunnel_absent.is_none() {
        targets(s)
    } else {
        Vec::new()
    };
    let out = json!({
        "machine": machine, "rounds": rounds, "quick": o.quick, "agent_args": o.agent_args,
        "ztunnel": if ztunnel_absent.is_some() { "absent" } else { "present" },
        "results": rows,
        "targets": checks,
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("root")
        .join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("latest.json"), serde_json::to_string_pretty(&out)?)?;
    println!("\nwritten to {}", dir.join("latest.json").display());
    if s.is_empty() {
        bail!("no samples");
    }
    Ok(())
}
