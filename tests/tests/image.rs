//! The agent run from its own image (`cargo xtask image`), by a real
//! container runtime, with what `deploy/daemonset.yaml` gives it: the
//! init container's `nodeward-cni install`, then the agent container's
//! arguments, environment, capabilities, security settings and host mounts,
//! all read from the manifest (not copied), so a change there is tested.
//! The pods containerd's CRI then creates are captured by that agent, with
//! identities from the CA service.
//!
//! What `ctr` (or this test bed) cannot express of the manifest is listed
//! in [`NOT_EXPRESSED`] and printed by the test.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec as K8sPodSpec};
use nodeward_testbed::ca::CaService;
use nodeward_testbed::cri::{Runtime, Sandbox, SandboxSpec};
use nodeward_testbed::fake_api::{FakeApi, NAMESPACES, PODS, namespace_json};
use nodeward_testbed::traffic::{self, info_echo, round_trip, serve};
use nodeward_testbed::{Agent, PodSpec, Topology, TopologySpec, privileged_or_skip, shared};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// What of the manifest this run does not carry out as Kubernetes would.
const NOT_EXPRESSED: &[&str] = &[
    "scheduling: serviceAccountName, priorityClassName, tolerations, updateStrategy (no kubelet or scheduler)",
    "dnsPolicy: ClusterFirstWithHostNet (no cluster DNS: /etc/hosts names the CA Service's address instead)",
    "resources: requests and limits (ctr sets no cgroup limits from a manifest)",
    "allowPrivilegeEscalation: false (ctr 1.6 has no no_new_privileges flag)",
    "capabilities.drop ALL: ctr has no ALL; every capability of its default set is dropped by name, and the test checks the agent's effective set",
    "readinessProbe: polled by the test itself, at the probe's host, port and path",
    "terminationGracePeriodSeconds (no kubelet to send SIGTERM)",
    "the ConfigMap nodeward-ca-root: a bind mount of a directory holding the test CA's root-cert.pem",
    "the projected ServiceAccount token: a bind mount of a token the test's issuer signed, bound to the agent's pod",
    "in-cluster API access: NODEWARD_KUBECONFIG names a kubeconfig of the test's API server (plain HTTP, no service account)",
    "hostPath /sys/fs/cgroup: this machine's cgroup2 is mounted elsewhere (from /proc/mounts)",
    "hostPath /opt/cni/bin and /etc/cni/net.d: the test runtime's own CNI directories",
];

fn daemonset() -> DaemonSet {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn pod_spec(ds: &DaemonSet) -> &K8sPodSpec {
    ds.spec.template.spec.as_ref().unwrap()
}

/// The image archive `cargo xtask image --dev` writes, built (again) if
/// missing or older than the binaries under test.
fn image_archive() -> PathBuf {
    // `cargo xtask test` builds it before the tests and names it.
    if let Ok(archive) = std::env::var("NODEWARD_IMAGE") {
        return PathBuf::from(archive);
    }
    let bin = nodeward_testbed::nodeward_bin();
    let target = bin.parent().and_then(Path::parent).expect("target dir").to_path_buf();
    let version = env!("CARGO_PKG_VERSION");
    let archive = target.join(format!("image/nodeward-{version}-dev.tar"));
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let stale = match (modified(&archive), modified(&bin)) {
        (Some(a), Some(b)) => a < b,
        _ => true,
    };
    if stale {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "run",
                "--locked",
                "--quiet",
                "--package",
                "xtask",
                "--",
                "image",
                "--dev",
            ])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .status()
            .expect("cargo xtask image --dev");
        assert!(status.success(), "cargo xtask image --dev failed");
    }
    assert!(archive.exists(), "{} not written", archive.display());
    archive
}

/// The image's entrypoint, from the archive's config.
fn entrypoint(archive: &Path) -> Vec<String> {
    let tar = |member: &str| -> Vec<u8> {
        let out = Command::new("tar")
            .arg("-xOf")
            .arg(archive)
            .arg(member)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tar {member}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let manifest: serde_json::Value = serde_json::from_slice(&tar("manifest.json")).unwrap();
    let config: serde_json::Value = serde_json::from_slice(&tar(manifest[0]["Config"].as_str().unwrap())).unwrap();
    config["config"]["Entrypoint"]
        .as_array()
        .expect("an entrypoint")
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// containerd's default capability set, which `ctr run` starts from.
const CTR_DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// Where this node keeps what the manifest's host paths name.
struct HostPaths {
    cgroup2: PathBuf,
    cni_bin: PathBuf,
    cni_conf: PathBuf,
}

impl HostPaths {
    fn map(&self, host_path: &str) -> PathBuf {
        match host_path {
            "/sys/fs/cgroup" => self.cgroup2.clone(),
            "/opt/cni/bin" => self.cni_bin.clone(),
            "/etc/cni/net.d" => self.cni_conf.clone(),
            other => PathBuf::from(other),
        }
    }
}

/// `ctr run` flags and the process's arguments for container `c` of the
/// DaemonSet, `files` standing in for its non-hostPath volumes.
fn translate(
    ds: &DaemonSet,
    c: &Container,
    node: &str,
    node_netns: &str,
    image_entrypoint: &[String],
    hosts: &HostPaths,
    files: &HashMap<&str, PathBuf>,
) -> (Vec<String>, Vec<String>) {
    let spec = pod_spec(ds);
    let mut flags = Vec::new();
    assert_eq!(
        spec.host_network,
        Some(true),
        "the agent runs in the node's network namespace"
    );
    // The node's network namespace is the test node's, which containerd
    // runs in; joined by path (`--net-host` would also bind the machine's
    // own /etc/hosts over the container's).
    flags.push(format!(
        "--with-ns=network:{}",
        nodeward_testbed::netns::path(node_netns)
    ));
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                let field = from.field_ref.as_ref().map(|f| f.field_path.as_str());
                assert_eq!(
                    field,
                    Some("spec.nodeName"),
                    "{}: no other downward API field is expressible",
                    e.name
                );
                node.to_string()
            }
            (None, None) => String::new(),
        };
        flags.push(format!("--env={}={value}", e.name));
    }
    let sc = c.security_context.as_ref().expect("a security context");
    assert_eq!(sc.run_as_user, Some(0), "ctr runs the image's user, root");
    if sc.read_only_root_filesystem == Some(true) {
        flags.push("--read-only".into());
    }
    if sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) == Some("RuntimeDefault") {
        flags.push("--seccomp".into());
    }
    let caps = sc.capabilities.as_ref();
    let drop: Vec<&String> = caps.and_then(|c| c.drop.as_ref()).into_iter().flatten().collect();
    if drop.iter().any(|d| *d == "ALL") {
        flags.extend(CTR_DEFAULT_CAPS.iter().map(|c| format!("--cap-drop=CAP_{c}")));
    } else {
        flags.extend(drop.iter().map(|c| format!("--cap-drop=CAP_{c}")));
    }
    for add in caps.and_then(|c| c.add.as_ref()).into_iter().flatten() {
        flags.push(format!("--cap-add=CAP_{add}"));
    }
    for m in c.volume_mounts.iter().flatten() {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .unwrap_or_else(|| panic!("mount {}: no such volume", m.name));
        let src = match &volume.host_path {
            Some(h) => hosts.map(&h.path),
            None => files
                .get(m.name.as_str())
                .unwrap_or_else(|| panic!("volume {}: the test provides no stand-in", m.name))
                .clone(),
        };
        std::fs::create_dir_all(&src).ok();
        let mut options = vec!["rbind", if m.read_only == Some(true) { "ro" } else { "rw" }];
        if m.mount_propagation.as_deref() == Some("HostToContainer") {
            options.push("rslave");
        }
        flags.push(format!(
            "--mount=type=bind,src={},dst={},options={}",
            src.display(),
            m.mount_path,
            options.join(":")
        ));
    }
    let mut argv: Vec<String> = match &c.command {
        Some(command) => command.clone(),
        None => image_entrypoint.to_vec(),
    };
    argv.extend(c.args.iter().flatten().cloned());
    (flags, argv)
}

/// The cgroup v2 mount of this machine.
fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .expect("a cgroup2 mount")
}

/// A pod as the API server streams it: Pending on `node`, then Running
/// with `ip` once the kubelet reports it.
fn pod_event(kind: &str, spec: &SandboxSpec, node: &str, ip: Option<&str>, rv: u32) -> serde_json::Value {
    let status = match ip {
        Some(ip) => json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}),
        None => json!({"phase": "Pending"}),
    };
    json!({"type": kind, "object": {"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "uid": spec.uid,
            "resourceVersion": rv.to_string()},
        "spec": {"nodeName": node, "serviceAccountName": spec.name,
            "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        "status": status}})
}

/// The agent container's effective capabilities, by name.
fn effective_caps(pid: u32) -> BTreeSet<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .expect("CapEff")
        .trim();
    let bits = u64::from_str_radix(hex, 16).unwrap();
    let names = [
        (21, "SYS_ADMIN"),
        (12, "NET_ADMIN"),
        (39, "BPF"),
        (13, "NET_RAW"),
        (0, "CHOWN"),
    ];
    let mut out: BTreeSet<String> = names
        .iter()
        .filter(|(b, _)| bits & (1u64 << b) != 0)
        .map(|(_, n)| n.to_string())
        .collect();
    let known: u64 = names.iter().map(|(b, _)| 1u64 << b).sum();
    if bits & !known != 0 {
        out.insert(format!("others {:#x}", bits & !known));
    }
    out
}

/// The pid of the process in the container `id` (its task's init).
fn task_pid(runtime: &Runtime, id: &str) -> Option<u32> {
    let out = Command::new("ctr")
        .arg("--address")
        .arg(runtime.dir.join("containerd.sock"))
        .args(["--namespace", "k8s.io", "tasks", "ls"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().next() == Some(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
}

#[test]
fn the_agent_from_its_image_with_the_daemonsets_settings_captures_cri_pods_with_the_ca_services_identities() {
    let _g = shared();
    let test =
        "the_agent_from_its_image_with_the_daemonsets_settings_captures_cri_pods_with_the_ca_services_identities";
    if !privileged_or_skip(test) {
        return;
    }
    eprintln!(
        "not expressed of deploy/daemonset.yaml:\n  {}",
        NOT_EXPRESSED.join("\n  ")
    );
    let archive = image_archive();
    let ds = daemonset();
    let spec = pod_spec(&ds);
    let agent_c = spec
        .containers
        .iter()
        .find(|c| c.name == "agent")
        .expect("agent container");
    let install_c = spec
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "install-cni")
        .expect("install-cni init container");
    let env: HashMap<String, String> = agent_c
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    let ca_url: http::Uri = env["NODEWARD_CA_ADDRESS"].parse().unwrap();
    let socket = PathBuf::from(&env["NODEWARD_CNI_SOCKET"]);

    let t = Topology::build(TopologySpec {
        nodes: vec![vec![PodSpec::new("d", "plain")]],
        namespaces: vec![("mesh".into(), true), ("plain".into(), false)],
    });
    let node = t.nodes[0].name.clone();
    let d = t.pod("d").clone();
    let probe = d.v4(7070);
    let _probe = serve(&d.netns, probe, info_echo);

    // The CA service, under the name the manifest's address gives it.
    let mut ca = CaService::new(&t);
    ca.server_name = Some(ca_url.host().unwrap().to_string());
    ca.start(&t);
    let stand_ins = t.scratch_dir("cri-stand-ins");
    std::fs::create_dir_all(stand_ins.join("ca-root")).unwrap();
    std::fs::create_dir_all(stand_ins.join("ca-token")).unwrap();
    std::fs::create_dir_all(stand_ins.join("kube")).unwrap();
    std::fs::copy(ca.root_file(), stand_ins.join("ca-root/root-cert.pem")).unwrap();
    std::fs::copy(ca.token_file(&node), stand_ins.join("ca-token/ca-token")).unwrap();
    std::fs::write(
        stand_ins.join("hosts"),
        format!("127.0.0.1 localhost\n10.{}.0.1 {}\n", t.id, ca_url.host().unwrap()),
    )
    .unwrap();

    // The API server the agent watches.
    let api = FakeApi::start_in(&t.nodes[0].netns);
    api.list(
        NAMESPACES,
        "NamespaceList",
        "5",
        vec![namespace_json("mesh", true, "4"), namespace_json("plain", false, "4")],
    );
    // In a cluster the service account's ca.crt is the client's one
    // root; the image has no system roots to fall back on (kube's client
    // builds its TLS settings even for this plain-HTTP server), so the
    // kubeconfig names a root as the in-cluster settings would.
    std::fs::copy(ca.root_file(), stand_ins.join("kube/ca.crt")).unwrap();
    let kubeconfig = std::fs::read_to_string(api.kubeconfig(&stand_ins.join("kube"))).unwrap();
    std::fs::write(
        stand_ins.join("kube/kubeconfig"),
        kubeconfig.replace(
            "    server:",
            "    certificate-authority: /var/run/nodeward-test/kube/ca.crt\n    server:",
        ),
    )
    .unwrap();

    // The node's runtime; its CNI config gets the chain from the image's
    // own init container, below.
    let runtime = Runtime::start_uninstalled(
        t.scratch_dir("cri-n1"),
        &t.nodes[0].netns,
        "br0",
        &format!("10.{}.1", t.id),
    );
    runtime.import(&archive);
    let image = "docker.io/library/nodeward:latest";
    let entry = entrypoint(&archive);
    let hosts = HostPaths {
        cgroup2: cgroup2_mount(),
        cni_bin: runtime.dir.join("cni-bin"),
        cni_conf: runtime.dir.join("cni-conf"),
    };
    let files: HashMap<&str, PathBuf> = [
        ("ca-root", stand_ins.join("ca-root")),
        ("ca-token", stand_ins.join("ca-token")),
    ]
    .into();

    let (flags, argv) = translate(&ds, install_c, &node, &t.nodes[0].netns, &entry, &hosts, &files);
    let out = runtime
        .ctr_run(&flags, image, "install-cni", &argv)
        .output()
        .expect("ctr run install-cni");
    assert!(
        out.status.success(),
        "the init container failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conflist = std::fs::read_to_string(runtime.dir.join("cni-conf/10-bridge.conflist")).unwrap();
    assert!(
        conflist.contains("nodeward-cni") && conflist.contains(socket.to_str().unwrap()),
        "the init container did not chain nodeward-cni: {conflist}"
    );
    assert!(runtime.dir.join("cni-bin/nodeward-cni").exists());

    let (mut flags, argv) = translate(&ds, agent_c, &node, &t.nodes[0].netns, &entry, &hosts, &files);
    flags.push(format!(
        "--mount=type=bind,src={}/hosts,dst=/etc/hosts,options=rbind:ro",
        stand_ins.display()
    ));
    flags.push(format!(
        "--mount=type=bind,src={},dst=/var/run/nodeward-test/kube,options=rbind:ro",
        stand_ins.join("kube").display()
    ));
    flags.push("--env=NODEWARD_KUBECONFIG=/var/run/nodeward-test/kube/kubeconfig".into());
    let _ = std::fs::remove_file(&socket);
    let agent = Agent::spawn(runtime.ctr_run(&flags, image, "agent", &argv), &node);
    agent
        .wait_log(WAIT, |l| l["message"] == "CNI hand-off listening")
        .unwrap_or_else(|| panic!("the agent from the image did not start:\n{}", agent.dump()));

    // Its readiness probe, as the manifest states it.
    let probe_get = agent_c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .expect("an HTTP readiness probe");
    let port = match &probe_get.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => *p,
        other => panic!("probe port {other:?}"),
    };
    let probe_addr = format!("{}:{port}", probe_get.host.as_deref().unwrap_or("127.0.0.1"));
    let path = probe_get.path.clone().unwrap_or_else(|| "/".into());
    let deadline = Instant::now() + nodeward_testbed::patience(WAIT);
    while nodeward_testbed::admin::http(&t.nodes[0].netns, &probe_addr, "GET", &path)
        .map(|(status, _)| status)
        .unwrap_or(0)
        != 200
    {
        assert!(Instant::now() < deadline, "never ready:\n{}", agent.dump());
        std::thread::sleep(Duration::from_millis(200));
    }

    // The agent holds what the manifest grants, nothing more.
    let pid = task_pid(&runtime, "agent").expect("the agent's task");
    let want: BTreeSet<String> = agent_c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert_eq!(effective_caps(pid), want, "the agent's effective capabilities");

    // CRI pods, as the kubelet makes them: Pending in the API, the
    // sandbox, then Running with the runtime's address.
    let mut rv = 10;
    let mut run_pod = |name: &str| -> Sandbox {
        let s = SandboxSpec::new(name, "mesh", &format!("uid-{}-{name}", t.id));
        rv += 1;
        api.send(PODS, &pod_event("ADDED", &s, &node, None, rv));
        std::thread::sleep(Duration::from_millis(300));
        let sb = runtime
            .run_sandbox(&s)
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\n{}", agent.dump()));
        rv += 1;
        api.send(PODS, &pod_event("MODIFIED", &s, &node, Some(&sb.ip), rv));
        // The CA service's own view of the cluster.
        t.apply(
            &format!("cri-{name}"),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: mesh, uid: {}}}\nspec: {{nodeName: {node}, serviceAccountName: {name}}}\nstatus: {{phase: Running, podIP: \"{}\"}}\n",
                s.uid, sb.ip
            ),
        );
        sb
    };
    let server = run_pod("server");
    let client = run_pod("client");
    match traffic::captured(&client.netns, probe) {
        Ok(true) => {}
        other => panic!("the client's connection was not captured: {other:?}\n{}", agent.dump()),
    }
    let dst: SocketAddr = format!("{}:7000", server.ip).parse().unwrap();
    let _srv = serve(&server.netns, dst, info_echo);
    // Certificates come from the CA service: retry while they are issued.
    let deadline = Instant::now() + nodeward_testbed::patience(WAIT);
    loop {
        let done = round_trip(&client.netns, dst, b"from the image").is_ok();
        std::thread::sleep(Duration::from_millis(200));
        let tunnelled = agent.connections().iter().any(|l| {
            l["direction"] == "outbound"
                && l["dst"] == dst.to_string().as_str()
                && l["peer_identity"] == "spiffe://cluster.local/ns/mesh/sa/server"
        });
        if done && tunnelled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no mTLS connection between the CRI pods:\n{}\nCA:\n{}",
            agent.dump(),
            ca.dump()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let log = std::fs::read_to_string(ca.issuance_log()).unwrap_or_default();
    for sa in ["server", "client"] {
        assert!(
            log.contains(&format!("spiffe://cluster.local/ns/mesh/sa/{sa}")),
            "the CA service logged no certificate for {sa}: {log}"
        );
    }
    drop(agent);
    drop(runtime);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_dir_all(&stand_ins);
}
