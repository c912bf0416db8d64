//! The chaos soak (`cargo xtask soak`): the test bed with eight pods on two
//! nodes under continuous mixed traffic, while faults are injected at
//! random (seeded, so a run can be repeated), checking the mesh's promises
//! throughout and stopping at the first one broken, with its evidence.
//!
//! Flags: `--minutes=M` (default 3), `--seed=S` (default: the clock).
//! The agent binary comes from `NODEWARD_BIN`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use nodeward_testbed::admin::wait_ready;
use nodeward_testbed::ca::CaService;
use nodeward_testbed::sniff::{Sniffer, contains};
use nodeward_testbed::traffic::{self, info_echo, read_greeting, serve};
use nodeward_testbed::{EndpointSpec, Pod, PodSpec, ServiceSpec, Topology, TopologySpec};

/// What only enrolled pods send each other: never on the wire in clear.
const MESH_MARKER: &[u8] = b"NWSOAK-MESH-PAYLOAD-7c1f";
/// What non-enrolled pods send (in clear by right).
const PLAIN_MARKER: &[u8] = b"NWSOAK-PLAIN-PAYLOAD";
const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10));
const VIP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x5e, 0, 0, 0, 0, 0, 0x10));
/// A policy change counts as in force this long after it is written: the
/// agent polls its config directory every 200 ms.
const SETTLE: Duration = Duration::from_secs(2);
/// A revoked identity's open connections are cut within this, everywhere.
const REVOCATION_BOUND: Duration = Duration::from_secs(5);
/// After an agent restarts, every pod on its node is captured within this.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);
/// A removed pod's pins are gone within this.
const RELEASE_BOUND: Duration = Duration::from_secs(5);
/// Bounds on each agent (debug build).
const RSS_BOUND_KIB: u64 = 256 * 1024;
const FD_BOUND: usize = 2048;
/// Every fault the soak injects (one at random at each step).
const FAULTS: [&str; 8] = [
    "kill-agent",
    "add-pod",
    "remove-pod",
    "flip-strict",
    "flip-authz",
    "revoke",
    "restart-ca",
    "broken-config",
];
const VICTIM: &str = "spiffe://cluster.local/ns/mesh/sa/victim";

fn strict_mesh(on: bool) -> String {
    let mode = if on { "STRICT" } else { "PERMISSIVE" };
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: mesh-mtls, namespace: mesh}}\nspec:\n  mtls: {{mode: {mode}}}\n"
    )
}

const STRICT_SHOP: &str = "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: shop-mtls, namespace: shop}\nspec:\n  mtls: {mode: STRICT}\n";
const DENY_B: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-b, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/mesh/sa/b\"]\n";

/// A small seeded generator (xorshift64*): the run repeats from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// When each policy last changed, and to what: the invariant checks a
/// connection against the policy in force for its whole life.
#[derive(Default)]
struct Timeline {
    strict_mesh: Vec<(Instant, bool)>,
    deny_b: Vec<(Instant, bool)>,
}

impl Timeline {
    /// The value `changes` held, settled, throughout `[start, end]`, if
    /// it did not change in `[start - SETTLE, end]`.
    fn settled(changes: &[(Instant, bool)], start: Instant, end: Instant) -> Option<bool> {
        let from = start.checked_sub(SETTLE)?;
        let last = changes.iter().rev().find(|(t, _)| *t <= from)?;
        let changed = changes.iter().any(|(t, _)| *t > from && *t <= end);
        (!changed).then_some(last.1)
    }
}

/// Everything the traffic threads and the fault loop share.
struct Shared {
    t0: Instant,
    stop: AtomicBool,
    timeline: Mutex<Timeline>,
    /// Enrolled pods the traffic may use (added pods once captured).
    enrolled: RwLock<Vec<Pod>>,
    plain: Vec<Pod>,
    /// The pod `b` (its principal is the one `deny-b` names).
    b: String,
    shop: Vec<String>,
    outcomes: Mutex<BTreeMap<String, u64>>,
    checks: Mutex<BTreeMap<&'static str, u64>>,
    violation: Mutex<Option<String>>,
}

impl Shared {
    fn count(&self, what: &str) {
        *self.outcomes.lock().unwrap().entry(what.into()).or_default() += 1;
    }
    fn violate(&self, what: String) {
        let mut v = self.violation.lock().unwrap();
        if v.is_none() {
            eprintln!("INVARIANT BROKEN: {what}");
            *v = Some(what);
        }
        self.stop.store(true, Ordering::SeqCst);
    }
    /// One check of the invariant `what` made.
    fn check(&self, what: &'static str) {
        *self.checks.lock().unwrap().entry(what).or_default() += 1;
    }
}

/// One connection: greeting, then `payload` echoed; `Ok` when the
/// server's app answered (the connection completed).
fn exchange(netns: &str, dst: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
    traffic::round_trip_within(netns, dst, payload, Duration::from_secs(3)).map(|_| ())
}

fn kind(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "refused",
        ConnectionReset | BrokenPipe | UnexpectedEof => "reset",
        TimedOut | WouldBlock => "timeout",
        _ => "other",
    }
}

/// Short connections between enrolled pods, direct and through the
/// Service; a completed one the policy in force denied is a violation.
fn mesh_traffic(s: Arc<Shared>, seed: u64) {
    let mut rng = Rng(seed | 1);
    while !s.stop.load(Ordering::SeqCst) {
        let pods = s.enrolled.read().unwrap().clone();
        let from = &pods[rng.below(pods.len())];
        let via_service = rng.below(4) == 0;
        let (dst, to) = if via_service {
            let vip = if rng.below(2) == 0 { VIP } else { VIP6 };
            (SocketAddr::new(vip, 80), "shop/web".to_string())
        } else {
            let to = &pods[rng.below(pods.len())];
            (to.v4(7000), to.key())
        };
        let start = Instant::now();
        let r = exchange(&from.netns, dst, MESH_MARKER);
        let end = Instant::now();
        let class = if via_service { "service" } else { "mesh" };
        match &r {
            Ok(()) => s.count(&format!("{class} ok")),
            Err(e) => s.count(&format!("{class} {}", kind(e))),
        }
        let to_shop = via_service || s.shop.contains(&to);
        if from.key() == s.b && to_shop {
            let denied = Timeline::settled(&s.timeline.lock().unwrap().deny_b, start, end);
            if denied == Some(true) {
                s.check("policy: no denied connection completes");
                if r.is_ok() {
                    s.violate(format!(
                        "{} reached {to} ({dst}) while AuthorizationPolicy shop/deny-b denied it",
                        from.key()
                    ));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Plaintext from non-enrolled pods to enrolled ones: a STRICT pod never
/// answers it, whether its agent is up or not.
fn plaintext_traffic(s: Arc<Shared>, seed: u64) {
    let mut rng = Rng(seed | 1);
    while !s.stop.load(Ordering::SeqCst) {
        let pods = s.enrolled.read().unwrap().clone();
        let from = &s.plain[rng.below(s.plain.len())];
        let to = &pods[rng.below(pods.len())];
        let start = Instant::now();
        let r = exchange(&from.netns, to.v4(7000), PLAIN_MARKER);
        let end = Instant::now();
        match &r {
            Ok(()) => s.count("plaintext answered"),
            Err(e) => s.count(&format!("plaintext {}", kind(e))),
        }
        let strict = if to.namespace == "shop" {
            Some(true)
        } else {
            Timeline::settled(&s.timeline.lock().unwrap().strict_mesh, start, end)
        };
        if strict == Some(true) {
            s.check("STRICT: no plaintext answered");
            if r.is_ok() {
                s.violate(format!(
                    "plaintext from {} reached STRICT pod {} ({})",
                    from.key(),
                    to.key(),
                    to.v4(7000)
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// A long stream that echoes the marker every 100 ms; reopened when cut.
fn long_stream(s: Arc<Shared>, from: Pod, to: SocketAddr, name: &'static str) {
    while !s.stop.load(Ordering::SeqCst) {
        let Ok(mut c) = traffic::connect_timeout(&from.netns, to, Duration::from_secs(2)) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(3)));
        if read_greeting(&c).is_err() {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        s.count(&format!("{name} opened"));
        let mut buf = vec![0u8; MESH_MARKER.len()];
        while !s.stop.load(Ordering::SeqCst) {
            let r = c.write_all(MESH_MARKER).and_then(|()| c.read_exact(&mut buf));
            if r.is_err() || buf != MESH_MARKER {
                s.count(&format!("{name} cut"));
                println!("  {:>6.1}s  ({name} cut: {r:?})", s.t0.elapsed().as_secs_f64());
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The agents' flags, the same for every start.
fn agent_flags(ca: &CaService, node: &str, deny: &std::path::Path) -> Vec<String> {
    let mut f = ca.agent_flags(node);
    f.extend(
        [
            "--cert-lifetime",
            "40s",
            "--deny-identities",
            &deny.display().to_string(),
            "--drain-timeout",
            "5s",
            // Idle pooled tunnels close soon after the load, so the
            // descriptors can be compared with the start's.
            "--tunnel-idle-timeout",
            "4s",
        ]
        .map(String::from),
    );
    f
}

fn start_agent(t: &mut Topology, k: usize, flags: &[String]) {
    let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    t.start_agent(k, &refs);
}

/// Readiness of node `k`: every enrolled pod captured. Time it took, or
/// `None` past `bound`.
fn ready_within(t: &Topology, k: usize, bound: Duration) -> Option<Duration> {
    let since = Instant::now();
    let (status, _) = wait_ready(&t.nodes[k].netns, bound, |s, _| s == 200);
    (status == 200).then(|| since.elapsed())
}

/// Pod namespaces pinned on node `k`.
fn pinned_pods(t: &Topology, k: usize) -> usize {
    std::fs::read_dir(t.pin_dir(k).join("pods"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Entries of the pinned map `name` of node `k` (`bpftool`); `None` if
/// it cannot be dumped.
fn map_entries(t: &Topology, k: usize, name: &str) -> Option<usize> {
    let path = t.pin_dir(k).join("maps").join(name);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&path)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array().map(Vec::len)
}

/// What node `k` holds for its pods, against what it should hold for the
/// pods enrolled there: pin directories, `PODS` and `POD_ADDRS` entries
/// (two addresses a pod). `Err` names what is off.
fn capture_matches(t: &Topology, k: usize) -> Result<(), String> {
    let want = t.enrolled_on(k).len();
    let got = [
        ("pinned pod directories", Some(pinned_pods(t, k)), want),
        ("PODS entries", map_entries(t, k, "PODS"), want),
        ("POD_ADDRS entries", map_entries(t, k, "POD_ADDRS"), 2 * want),
    ];
    let off: Vec<String> = got
        .iter()
        .filter(|(_, n, w)| *n != Some(*w))
        .map(|(what, n, w)| format!("{what}: {n:?}, want {w}"))
        .collect();
    if off.is_empty() { Ok(()) } else { Err(off.join("; ")) }
}

/// Polls [`capture_matches`] for up to `bound`; the time it took.
fn capture_matches_within(t: &Topology, k: usize, bound: Duration) -> Result<Duration, String> {
    let since = Instant::now();
    loop {
        match capture_matches(t, k) {
            Ok(()) => return Ok(since.elapsed()),
            Err(e) if since.elapsed() >= bound => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[derive(Default)]
struct Maxima {
    rss_kib: u64,
    fds: usize,
}

fn check_resources(t: &mut Topology, s: &Shared, max: &mut Maxima) {
    for k in 0..t.nodes.len() {
        // A dead agent reads as no memory and no descriptors: say so.
        s.check("agents stay up");
        if t.agent_mut(k).wait_exit(Duration::ZERO).is_some() {
            s.violate(format!("node {k}'s agent exited:\n{}", t.agent(k).dump()));
            return;
        }
        let a = t.agent(k);
        let (rss, n) = (a.rss_kib(), fds(a.pid()));
        max.rss_kib = max.rss_kib.max(rss);
        max.fds = max.fds.max(n);
        s.check("bounded RSS and fds");
        if rss > RSS_BOUND_KIB || n > FD_BOUND {
            s.violate(format!(
                "node {k}'s agent holds {rss} KiB RSS and {n} fds (bounds {RSS_BOUND_KIB} KiB, {FD_BOUND})"
            ));
        }
    }
}

fn main() -> Result<()> {
    let mut minutes = 3.0f64;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    for a in std::env::args().skip(1) {
        if let Some(v) = a.strip_prefix("--minutes=") {
            minutes = v.parse().map_err(|e| anyhow::anyhow!("--minutes={v}: {e}"))?;
            ensure!(
                minutes > 0.0 && minutes <= 24.0 * 60.0,
                "--minutes={v}: from above 0 to 1440"
            );
        } else if let Some(v) = a.strip_prefix("--seed=") {
            seed = v.parse().map_err(|e| anyhow::anyhow!("--seed={v}: {e}"))?;
        } else {
            bail!("unknown argument {a:?} (flags: --minutes=M, --seed=S)");
        }
    }
    ensure!(
        nodeward_testbed::privileged_or_skip("soak"),
        "run as root: the soak creates network namespaces and loads eBPF"
    );
    println!("soak: seed {seed}, {minutes} min (repeat with `cargo xtask soak --seed {seed} --minutes {minutes}`)");
    let mut rng = Rng(seed | 1);
    let spec = TopologySpec {
        nodes: vec![
            vec![
                PodSpec::new("a", "mesh"),
                PodSpec::new("b", "mesh"),
                PodSpec::new("e", "plain"),
                PodSpec::new("w1", "shop"),
            ],
            vec![
                PodSpec::new("c", "mesh"),
                PodSpec {
                    service_account: "victim".into(),
                    ..PodSpec::new("v", "mesh")
                },
                PodSpec::new("d", "plain"),
                PodSpec::new("w2", "shop"),
            ],
        ],
        namespaces: vec![("mesh".into(), true), ("shop".into(), true), ("plain".into(), false)],
    };
    let mut t = Topology::build(spec);
    let mut ca = CaService::new(&t);
    ca.start(&t);
    let deny: Vec<PathBuf> = (0..2).map(|k| t.ca_dir.join(format!("soak-deny-{k}.txt"))).collect();
    for d in &deny {
        std::fs::write(d, "# nobody\n")?;
    }
    let flags: Vec<Vec<String>> = (0..2)
        .map(|k| agent_flags(&ca, &t.nodes[k].name.clone(), &deny[k]))
        .collect();
    for (k, f) in flags.iter().enumerate() {
        start_agent(&mut t, k, f);
    }
    for k in 0..2 {
        t.wait_captured(k);
    }
    let mut servers = Vec::new();
    for p in &t.pods {
        servers.push(serve(&p.netns, p.v4(7000), info_echo));
        if p.namespace == "shop" {
            servers.push(serve(&p.netns, p.v4(8080), info_echo));
            servers.push(serve(&p.netns, p.v6(8080), info_echo));
        }
    }
    let endpoint = |n: &str| {
        let p = t.pod(n);
        EndpointSpec::pod(n, &[p.ip4.into(), p.ip6.into()], &t.nodes[p.node].name)
    };
    let web = ServiceSpec {
        name: "web".into(),
        namespace: "shop".into(),
        cluster_ips: vec![VIP, VIP6],
        ports: vec![("http".into(), 80, "http".into(), 8080)],
        endpoints: vec![endpoint("w1"), endpoint("w2")],
        ..Default::default()
    };
    t.apply("svc-web", &web.to_yaml());
    t.apply("strict-shop", STRICT_SHOP);
    t.apply("strict-mesh", &strict_mesh(true));
    let t0 = Instant::now();
    let mut timeline = Timeline::default();
    timeline.strict_mesh.push((t0, true));
    timeline.deny_b.push((t0, false));
    let pods = |ns: &[&str]| -> Vec<Pod> {
        t.pods
            .iter()
            .filter(|p| ns.contains(&p.namespace.as_str()))
            .cloned()
            .collect()
    };
    let shared = Arc::new(Shared {
        t0,
        stop: AtomicBool::new(false),
        timeline: Mutex::new(timeline),
        enrolled: RwLock::new(pods(&["mesh", "shop"])),
        plain: pods(&["plain"]),
        b: "mesh/b".into(),
        shop: vec!["shop/w1".into(), "shop/w2".into()],
        outcomes: Mutex::new(BTreeMap::new()),
        checks: Mutex::new(BTreeMap::new()),
        violation: Mutex::new(None),
    });
    // Wait for the policies and the Service to be read.
    std::thread::sleep(SETTLE);
    // Each node's agent's descriptors at the start, idle, and the node's
    // enrolled pods then: a restarted agent is held to the same.
    let baseline: Vec<(usize, usize)> = (0..2)
        .map(|k| (fds(t.agent(k).pid()), t.enrolled_on(k).len()))
        .collect();
    let mut threads = Vec::new();
    for i in 0..2 {
        let s = shared.clone();
        let seed = rng.next();
        threads.push(std::thread::spawn(move || mesh_traffic(s, seed.wrapping_add(i))));
    }
    {
        let s = shared.clone();
        let seed = rng.next();
        threads.push(std::thread::spawn(move || plaintext_traffic(s, seed)));
    }
    for (from, to, name) in [("a", "c", "stream a->c"), ("c", "w1", "stream c->w1")] {
        let s = shared.clone();
        let (from, to) = (t.pod(from).clone(), t.pod(to).v4(7000));
        threads.push(std::thread::spawn(move || long_stream(s, from, to, name)));
    }

    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let mut recoveries: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    let mut max = Maxima::default();
    let mut extra: Vec<(String, usize)> = Vec::new();
    let mut added = 0usize;
    let deadline = t0 + Duration::from_secs_f64(minutes * 60.0);
    let mut sniffers: Vec<Sniffer> = t.nodes.iter().map(|n| Sniffer::start(&n.netns, &n.uplink)).collect();
    let (mut strict_on, mut deny_on) = (true, false);
    while Instant::now() < deadline && !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(1500 + rng.below(3000) as u64));
        check_resources(&mut t, &shared, &mut max);
        for (k, sn) in std::mem::take(&mut sniffers).into_iter().enumerate() {
            let pcap = sn.finish();
            shared.check("no enrolled payload in clear on the wire");
            // Tunnels cross the link all the time: an empty capture means
            // tcpdump saw nothing, and the check would be blind.
            if pcap.len() < 4096 {
                shared.violate(format!(
                    "the capture on node {k}'s link holds {} bytes: tcpdump saw no traffic",
                    pcap.len()
                ));
            }
            if contains(&pcap, MESH_MARKER) {
                let keep = std::env::temp_dir().join(format!("nodeward-soak-{seed}-node{k}.pcap"));
                let _ = std::fs::write(&keep, &pcap);
                shared.violate(format!(
                    "an enrolled pods' payload crossed node {k}'s link in clear (capture kept at {})",
                    keep.display()
                ));
            }
        }
        sniffers = t.nodes.iter().map(|n| Sniffer::start(&n.netns, &n.uplink)).collect();
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let mut fault = FAULTS[rng.below(FAULTS.len())];
        if fault == "remove-pod" && extra.is_empty() {
            fault = "add-pod";
        }
        *faults.entry(fault).or_default() += 1;
        println!("  {:>6.1}s  {fault}", t0.elapsed().as_secs_f64());
        match fault {
            "kill-agent" => {
                let k = rng.below(2);
                t.agent_mut(k).kill();
                std::thread::sleep(Duration::from_millis(500 + rng.below(1500) as u64));
                start_agent(&mut t, k, &flags[k]);
                shared.check("capture complete after a restart");
                match ready_within(&t, k, RECOVERY_BOUND) {
                    Some(d) => recoveries.entry(fault).or_default().push(d),
                    None => shared.violate(format!(
                        "node {k}'s agent had not captured every pod {RECOVERY_BOUND:?} after a restart:\n{}",
                        t.agent(k).dump()
                    )),
                }
                // Nothing the killed agent held for a pod outlives it
                // unclaimed, and nothing is missing.
                shared.check("no pin or map entry outlives its pod");
                if let Err(e) = capture_matches_within(&t, k, RELEASE_BOUND) {
                    shared.violate(format!(
                        "after node {k}'s agent restarted, its capture state is off: {e}"
                    ));
                }
            }
            "add-pod" => {
                let k = rng.below(2);
                added += 1;
                let name = format!("x{added}");
                let pod = t.add_pod(k, PodSpec::new(&name, "mesh"));
                t.write_config();
                servers.push(serve(&pod.netns, pod.v4(7000), info_echo));
                let since = Instant::now();
                shared.check("a new pod is captured");
                match t.agent(k).wait_log(RECOVERY_BOUND, |l| {
                    l["message"] == "pod captured" && l["pod"] == pod.key().as_str()
                }) {
                    Some(_) => {
                        recoveries.entry(fault).or_default().push(since.elapsed());
                        shared.enrolled.write().unwrap().push(pod);
                        extra.push((name, k));
                    }
                    None => shared.violate(format!("node {k}'s agent did not capture new pod {name}")),
                }
            }
            "remove-pod" => {
                let (name, k) = extra.remove(rng.below(extra.len()));
                shared.enrolled.write().unwrap().retain(|p| p.name != name);
                std::thread::sleep(Duration::from_millis(300));
                t.edit_pod(&name, |_| false);
                shared.check("no pin or map entry outlives its pod");
                match capture_matches_within(&t, k, RELEASE_BOUND) {
                    Ok(d) => recoveries.entry(fault).or_default().push(d),
                    Err(e) => shared.violate(format!(
                        "node {k} still holds capture state {RELEASE_BOUND:?} after {name} was removed: {e}"
                    )),
                }
            }
            "flip-strict" => {
                // As for deny-b below: the window counted as STRICT is
                // never wider than the file's.
                strict_on = !strict_on;
                if strict_on {
                    t.apply("strict-mesh", &strict_mesh(true));
                    shared.timeline.lock().unwrap().strict_mesh.push((Instant::now(), true));
                } else {
                    shared
                        .timeline
                        .lock()
                        .unwrap()
                        .strict_mesh
                        .push((Instant::now(), false));
                    t.apply("strict-mesh", &strict_mesh(false));
                }
            }
            "flip-authz" => {
                deny_on = !deny_on;
                // Recorded before the write when it turns off and after
                // when it turns on: the window counted as "denied" is never
                // wider than the file's.
                if deny_on {
                    t.apply("deny-b", DENY_B);
                    shared.timeline.lock().unwrap().deny_b.push((Instant::now(), true));
                } else {
                    shared.timeline.lock().unwrap().deny_b.push((Instant::now(), false));
                    t.unapply("deny-b");
                }
            }
            "revoke" => {
                let (a, v) = (t.pod("a").clone(), t.pod("v").clone());
                let held = [
                    (
                        traffic::connect_timeout(&a.netns, v.v4(7000), Duration::from_secs(2)),
                        "a->v",
                    ),
                    (
                        traffic::connect_timeout(&v.netns, a.v4(7000), Duration::from_secs(2)),
                        "v->a",
                    ),
                ];
                let held: Vec<(TcpStream, &str)> = held
                    .into_iter()
                    .filter_map(|(c, n)| c.ok().filter(|c| read_greeting(c).is_ok()).map(|c| (c, n)))
                    .collect();
                // Nothing held is nothing checked: the victim's pods are up
                // (no fault is running), so the connections open.
                if held.is_empty() {
                    shared.violate(format!(
                        "no connection with {VICTIM} could be held to check its revocation"
                    ));
                }
                for d in &deny {
                    std::fs::write(d, format!("{VICTIM}\n"))?;
                }
                let since = Instant::now();
                for (mut c, n) in held {
                    shared.check("a revoked identity is cut within 5 s");
                    let _ = c.set_read_timeout(Some(Duration::from_millis(200)));
                    let mut cut = false;
                    while since.elapsed() < REVOCATION_BOUND + Duration::from_millis(500) {
                        let mut b = [0u8; 64];
                        let _ = c.write_all(b"x");
                        match c.read(&mut b) {
                            Ok(0) => cut = true,
                            Ok(_) => {}
                            Err(e)
                                if matches!(
                                    e.kind(),
                                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                ) => {}
                            Err(_) => cut = true,
                        }
                        if cut {
                            break;
                        }
                    }
                    if !cut || since.elapsed() > REVOCATION_BOUND + Duration::from_millis(500) {
                        shared.violate(format!(
                            "{n}, a connection of revoked {VICTIM}, still open after {:?}",
                            since.elapsed()
                        ));
                    } else {
                        recoveries.entry("revoke (cut)").or_default().push(since.elapsed());
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
                for d in &deny {
                    std::fs::write(d, "# nobody\n")?;
                }
            }
            "restart-ca" => {
                ca.kill();
                std::thread::sleep(Duration::from_millis(500 + rng.below(2000) as u64));
                ca.start(&t);
            }
            "broken-config" => {
                t.apply("broken", "apiVersion: v1\nkind: Pod\nmetadata: {name: [unclosed\n");
                std::thread::sleep(Duration::from_millis(800 + rng.below(1000) as u64));
                t.unapply("broken");
                for k in 0..2 {
                    shared.check("bad input crashes nothing");
                    if t.agent_mut(k).wait_exit(Duration::ZERO).is_some() {
                        shared.violate(format!(
                            "node {k}'s agent exited on a broken config file:\n{}",
                            t.agent(k).dump()
                        ));
                    }
                }
            }
            _ => unreachable!(),
        }
    }
    shared.stop.store(true, Ordering::SeqCst);
    for th in threads {
        let _ = th.join();
    }
    for (k, sn) in sniffers.into_iter().enumerate() {
        shared.check("no enrolled payload in clear on the wire");
        let pcap = sn.finish();
        if pcap.len() < 4096 {
            shared.violate(format!(
                "the last capture on node {k}'s link holds {} bytes: tcpdump saw no traffic",
                pcap.len()
            ));
        }
        if contains(&pcap, MESH_MARKER) {
            shared.violate(format!("an enrolled pods' payload crossed node {k}'s link in clear"));
        }
    }
    // After the load, and the pooled tunnels' idle timeout: each node's
    // agent's descriptors come back to what the first one held at the
    // start, give or take the pods added since (listeners and namespace).
    std::thread::sleep(Duration::from_secs(8));
    if shared.violation.lock().unwrap().is_none() {
        for (k, (base, pods_then)) in baseline.iter().enumerate() {
            let pods_now = t.enrolled_on(k).len();
            let allowed = base + 8 * pods_now.saturating_sub(*pods_then) + 16;
            let n = fds(t.agent(k).pid());
            shared.check("fds back to baseline after the load");
            if n > allowed {
                shared.violate(format!(
                    "node {k}'s agent holds {n} fds after the load ended; {base} at its start with {pods_then} pods, {pods_now} now (allowed {allowed})"
                ));
            }
        }
    }
    println!("\nsoak summary (seed {seed}, {:.0} s)", t0.elapsed().as_secs_f64());
    println!("  connections by outcome:");
    for (k, v) in shared.outcomes.lock().unwrap().iter() {
        println!("    {k:<24} {v}");
    }
    println!("  faults injected:");
    for (k, v) in &faults {
        println!("    {k:<24} {v}");
    }
    println!("  recovery after each fault (max):");
    for (k, v) in &recoveries {
        let worst = v.iter().max().copied().unwrap_or_default();
        println!("    {k:<24} {} times, max {:.2} s", v.len(), worst.as_secs_f64());
    }
    let issued: usize = (0..2)
        .map(|k| {
            t.agent(k)
                .lines()
                .iter()
                .filter(|l| l["message"] == "workload certificate issued")
                .count()
        })
        .sum();
    println!("  certificates issued (current agents, 40 s lifetime): {issued}");
    println!("  invariant checks made:");
    for (k, v) in shared.checks.lock().unwrap().iter() {
        println!("    {k:<44} {v}");
    }
    println!("  agents' maxima: RSS {} KiB, {} fds", max.rss_kib, max.fds);
    drop(servers);
    // The evidence: each agent's log (the current one; a killed one's
    // went with it) and the CA service's.
    for k in 0..2 {
        let f = std::env::temp_dir().join(format!("nodeward-soak-{seed}-node{k}.log"));
        if std::fs::write(&f, t.agent(k).dump()).is_ok() {
            println!("  node {k}'s agent log: {}", f.display());
        }
    }
    if let Some(v) = shared.violation.lock().unwrap().take() {
        bail!("the soak broke an invariant (seed {seed}): {v}");
    }
    println!("every invariant held");
    Ok(())
}
