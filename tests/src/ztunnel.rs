//! Istio's ztunnel as a test peer, like iperf3: never built, committed or
//! shipped here, only run when its binary is present.
//!
//! One ztunnel per pod in dedicated mode, started inside the pod's network
//! namespace with its workloads read from a local file and certificates
//! from its built-in test CA (`FAKE_CA`). Outbound TCP of the pod reaches
//! it through the in-pod `REDIRECT` Istio ambient uses; inbound to the
//! pod's IP on 15008 reaches it directly. Used by the benchmark's
//! `ztunnel` column and by the interoperability test (`tests/interop.rs`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::netns::{nsenter, run_in};
use crate::topology::{Pod, Topology};

/// Mark ztunnel puts on its own sockets, so the redirect skips them.
pub const PACKET_MARK: u32 = 1337;

/// Where the ztunnel binary is: `$NODEWARD_ZTUNNEL`, else
/// `../shared/peers/ztunnel/ztunnel` beside the workspace root.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NODEWARD_ZTUNNEL") {
        return p.into();
    }
    // tests/ -> workspace root -> its parent, where `shared/` sits.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new("/"));
    root.parent().unwrap_or(root).join("shared/peers/ztunnel/ztunnel")
}

/// The binary when it exists; otherwise prints `SKIPPED <test>: ...` and
/// returns `None`. A missing peer binary is a legitimate skip, in CI too.
pub fn binary_or_skip(test: &str) -> Option<PathBuf> {
    let bin = binary();
    if bin.is_file() {
        Some(bin)
    } else {
        eprintln!("SKIPPED {test}: ztunnel binary not found at {}", bin.display());
        None
    }
}

/// The directory of the public test CA that `FAKE_CA` signs with
/// (`root-cert.pem`, `ca-key.pem`), next to the binary.
pub fn test_ca_dir(bin: &Path) -> PathBuf {
    bin.parent().unwrap_or(Path::new(".")).join("test-ca")
}

/// Fills `ca_dir` as a Nodeward CA directory rooted in ztunnel's test CA:
/// `ca-key.pem` = its key (converted to PKCS#8 if it is not: Nodeward
/// reads only PKCS#8), `ca-cert.pem` = `root-cert.pem` = `cert-chain.pem` =
/// its root. Both sides then verify each other's workload certificates.
pub fn share_test_ca(bin: &Path, ca_dir: &Path) {
    let src = test_ca_dir(bin);
    let read =
        |f: &str| std::fs::read_to_string(src.join(f)).unwrap_or_else(|e| panic!("{}: {e}", src.join(f).display()));
    let (mut key, root) = (read("ca-key.pem"), read("root-cert.pem"));
    if !key.contains("-----BEGIN PRIVATE KEY-----") {
        key = to_pkcs8(&src.join("ca-key.pem"));
    }
    if let Ok(rd) = std::fs::read_dir(ca_dir) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    std::fs::create_dir_all(ca_dir).expect("CA dir");
    std::fs::write(ca_dir.join("ca-key.pem"), key).expect("write ca-key.pem");
    for f in ["ca-cert.pem", "root-cert.pem", "cert-chain.pem"] {
        std::fs::write(ca_dir.join(f), &root).unwrap_or_else(|e| panic!("write {f}: {e}"));
    }
}

/// A PKCS#1 / SEC1 key file converted to PKCS#8 (what Nodeward reads) with
/// `openssl pkcs8 -topk8 -nocrypt`.
fn to_pkcs8(key: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args(["pkcs8", "-topk8", "-nocrypt", "-in"])
        .arg(key)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: not PKCS#8, and openssl cannot run to convert it: {e}",
                key.display()
            )
        });
    assert!(
        out.status.success(),
        "{}: not PKCS#8, and `openssl pkcs8 -topk8 -nocrypt` failed: {}",
        key.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// ztunnel's local workload file for the topology's pods named `names`,
/// each an HBONE workload in trust domain `cluster.local`.
pub fn workloads_yaml(t: &Topology, names: &[&str]) -> String {
    let mut y = String::from("workloads:\n");
    for p in t
        .workloads
        .pods
        .iter()
        .filter(|p| names.contains(&p.spec.name.as_str()))
    {
        let ips: Vec<String> = p.ips.iter().map(|ip| format!("\"{ip}\"")).collect();
        y.push_str(&format!(
            "- {{uid: \"{uid}\", name: {name}, namespace: {ns}, serviceAccount: {sa}, workloadIps: [{ips}], protocol: HBONE, node: {node}, network: \"\", trustDomain: cluster.local, services: {{}}}}\n",
            uid = p.uid,
            name = p.spec.name,
            ns = p.spec.namespace,
            sa = p.spec.service_account,
            ips = ips.join(", "),
            node = p.node,
        ));
    }
    y.push_str("policies: []\nservices: []\n");
    y
}

/// A ztunnel serving one pod; dropping it removes its redirect rules,
/// stops the process and deletes its workload file.
pub struct Ztunnel {
    child: Child,
    log: Arc<(Mutex<Vec<String>>, Condvar)>,
    netns: String,
    redirects: Vec<Vec<String>>,
    workloads: PathBuf,
    /// The pod it serves, `namespace/name`.
    pub pod: String,
}

impl Ztunnel {
    /// Starts ztunnel for `pod` (dedicated mode, `FAKE_CA`, `RUST_LOG=info`)
    /// with `workloads_yaml` as its workloads, and waits until its
    /// readiness endpoint says ready.
    pub fn start(bin: &Path, t: &Topology, pod: &Pod, workloads_yaml: &str) -> Ztunnel {
        let spec = &t
            .workloads
            .pods
            .iter()
            .find(|p| p.spec.name == pod.name)
            .unwrap_or_else(|| panic!("no pod {} in the topology", pod.name))
            .spec;
        let workloads = PathBuf::from(format!("/run/nodeward-testbed/{}.ztunnel-{}.yaml", t.id, pod.name));
        std::fs::write(&workloads, workloads_yaml).unwrap_or_else(|e| panic!("write {}: {e}", workloads.display()));
        let mut cmd = nsenter(&pod.netns, &[bin.to_str().expect("utf-8 path")]);
        cmd.env("LOCAL_XDS_PATH", &workloads)
            .env("FAKE_CA", "true")
            .env("XDS_ADDRESS", "")
            .env("CA_ADDRESS", "")
            .env("PROXY_MODE", "dedicated")
            .env(
                "PROXY_WORKLOAD_INFO",
                format!("{}/{}/{}", spec.namespace, spec.name, spec.service_account),
            )
            .env("PACKET_MARK", PACKET_MARK.to_string())
            .env("ENABLE_ORIG_SRC", "false")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let log: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let echo = std::env::var("NODEWARD_TEST_ECHO").is_ok();
        let out: Vec<Box<dyn Read + Send>> = vec![
            Box::new(child.stdout.take().expect("stdout")),
            Box::new(child.stderr.take().expect("stderr")),
        ];
        for stream in out {
            let sink = log.clone();
            let name = pod.name.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    if echo {
                        eprintln!("[ztunnel {name}] {line}");
                    }
                    let (m, cv) = &*sink;
                    m.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                    cv.notify_all();
                }
            });
        }
        let mut z = Ztunnel {
            child,
            log,
            netns: pod.netns.clone(),
            redirects: Vec::new(),
            workloads,
            pod: pod.key(),
        };
        z.wait_ready(Duration::from_secs(10));
        z
    }

    /// Polls `/healthz/ready` on 15021 inside the pod until it answers 200.
    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("ztunnel for {} exited ({status}); log:\n{}", self.pod, self.dump());
            }
            if run_in(&self.netns, ready) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ztunnel for {} not ready within {timeout:?}; log:\n{}",
                self.pod,
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends the pod's outbound TCP to `dst` (an address or CIDR) into
    /// ztunnel's 15001, skipping ztunnel's own marked sockets: the in-pod
    /// rule Istio ambient installs (`ip6tables` for an IPv6 `dst`).
    /// Removed when this is dropped.
    pub fn redirect_outbound(&mut self, dst: &str) {
        let rule: Vec<String> = [
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            dst,
            "-m",
            "mark",
            "!",
            "--mark",
            &PACKET_MARK.to_string(),
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Err(e) = iptables(&self.netns, "-A", &rule) {
            panic!("{e}");
        }
        self.redirects.push(rule);
    }

    /// Waits up to `timeout` for a log line matching `pred`.
    pub fn wait_log(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.log;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(l) = g.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Waits for an access-log line (`connection complete`) of `direction`
    /// (`inbound` / `outbound`) whose HBONE target is `dst`.
    pub fn wait_access(&self, direction: &str, dst: SocketAddr, timeout: Duration) -> Option<String> {
        let dir = format!("direction=\"{direction}\"");
        let target = format!("dst.hbone_addr={dst} ");
        self.wait_log(timeout, |l| {
            l.contains("connection complete") && l.contains(&dir) && l.contains(&target)
        })
    }

    /// The whole log, for failure messages.
    pub fn dump(&self) -> String {
        let (m, _) = &*self.log;
        m.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    /// The process id (nsenter execs ztunnel, so this is ztunnel).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_rss_kib(self.pid())
    }

    /// CPU time used so far (user + system), seconds.
    pub fn cpu_seconds(&self) -> f64 {
        proc_cpu_seconds(self.pid())
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        for rule in std::mem::take(&mut self.redirects) {
            // Never panic in drop (a test may be unwinding already).
            if let Err(e) = iptables(&self.netns, "-D", &rule) {
                eprintln!("ztunnel for {}: removing its redirect: {e}", self.pod);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.workloads);
    }
}

/// Whether ztunnel's readiness endpoint, in the current namespace, is 200.
fn ready() -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], 15021));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /healthz/ready HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
    line.split_whitespace().nth(1) == Some("200")
}

/// Runs `iptables` (`ip6tables` for IPv6 rules) on the nat table in `netns`.
fn iptables(netns: &str, op: &str, rule: &[String]) -> Result<(), String> {
    let v6 = rule.iter().any(|a| a.contains(':'));
    let mut args = vec![if v6 { "ip6tables" } else { "iptables" }, "-w", "-t", "nat", op];
    args.extend(rule.iter().map(String::as_str));
    match nsenter(netns, &args).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("{args:?} in {netns}: {}", String::from_utf8_lossy(&o.stderr))),
        Err(e) => Err(format!("{args:?} in {netns}: {e}")),
    }
}

/// Resident memory of process `pid`, KiB (0 when it is gone).
pub fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) of process `pid`, seconds.
pub fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    (ticks(11) + ticks(12)) / hz
}
