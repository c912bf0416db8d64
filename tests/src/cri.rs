//! A node's container runtime, for tests: a private containerd (1.6, with
//! its CRI plugin, runc underneath) per test node, started inside the
//! node's network namespace, driven over CRI exactly as the kubelet drives
//! it. The runtime, not the test, creates each sandbox's network namespace
//! and runs the CNI chain — the chain `nodeward-cni install` writes, the
//! code the DaemonSet's init container runs, applied to a bridge +
//! host-local + portmap conflist like a real node's.
//!
//! Everything lives under one directory of the test bed (config, root,
//! state, sockets, CNI dirs, pod logs); nothing of the system's containerd
//! is used. The images (a sandbox image and a busybox one) are built here
//! from Debian's static busybox with buildah and imported: nothing is
//! pulled.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StopPodSandboxRequest, VersionRequest,
};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::netns::path;

/// The sandbox ("pause") image: busybox's `sleep`, as the kubelet's pause
/// does nothing but hold the namespaces.
pub const PAUSE_IMAGE: &str = "nodeward.test/pause:1";
/// An application image with busybox's applets (`nc`, `sh`).
pub const BUSYBOX_IMAGE: &str = "nodeward.test/busybox:1";
/// Debian's `busybox-static`.
const BUSYBOX: &str = "/bin/busybox";
/// Where the images are built and kept between test binaries of one run.
const IMAGE_DIR: &str = "/run/nodeward-testbed/images";

/// A pod as the kubelet asks for it: metadata, labels, annotations.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod uid.
    pub uid: String,
    /// The kubelet's attempt number (a new sandbox of the same pod counts up).
    pub attempt: u32,
    /// Pod labels.
    pub labels: Vec<(String, String)>,
    /// Pod annotations.
    pub annotations: Vec<(String, String)>,
}

impl SandboxSpec {
    /// Pod `name` in `namespace`, uid `uid`, first attempt.
    pub fn new(name: &str, namespace: &str, uid: &str) -> SandboxSpec {
        SandboxSpec {
            name: name.into(),
            namespace: namespace.into(),
            uid: uid.into(),
            attempt: 0,
            labels: Vec::new(),
            annotations: Vec::new(),
        }
    }

    /// The next attempt of the same pod.
    pub fn next_attempt(&self) -> SandboxSpec {
        SandboxSpec {
            attempt: self.attempt + 1,
            ..self.clone()
        }
    }

    /// `namespace/name`, as the agent names pods.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A sandbox the runtime runs: its id, address and network namespace.
#[derive(Clone, Debug)]
pub struct Sandbox {
    /// The runtime's sandbox id (`CNI_CONTAINERID`).
    pub id: String,
    /// The pod address the runtime's CNI chain assigned.
    pub ip: String,
    /// The network namespace's name under `/var/run/netns` (where
    /// containerd 1.6 bind-mounts it).
    pub netns: String,
}

impl Sandbox {
    /// The namespace file, as the runtime passed it to CNI.
    pub fn netns_path(&self) -> String {
        path(&self.netns)
    }
}

/// One node's containerd.
pub struct Runtime {
    /// Its directory: config, root, state, sockets, CNI dirs, logs.
    pub dir: PathBuf,
    node_netns: String,
    child: Option<Child>,
    rt: tokio::runtime::Runtime,
    client: Option<RuntimeServiceClient<Channel>>,
}

impl Runtime {
    /// Starts containerd for the node in namespace `node_netns`, its CNI
    /// config the node's bridge network (pods get `{subnet}.100`–`.199`
    /// on bridge `bridge`, which holds `{subnet}.1`) chained by
    /// `nodeward-cni install` to the agent at `agent_socket`.
    pub fn start(dir: PathBuf, node_netns: &str, bridge: &str, subnet: &str, agent_socket: &Path) -> Runtime {
        prepare(&dir, bridge, subnet);
        install_cni(&dir, agent_socket);
        Runtime::spawn_on(dir, node_netns)
    }

    /// [`Runtime::start`] with the node's network alone in its CNI
    /// config: something else (the image's init container) chains
    /// `nodeward-cni` into it, which containerd picks up as it would.
    pub fn start_uninstalled(dir: PathBuf, node_netns: &str, bridge: &str, subnet: &str) -> Runtime {
        prepare(&dir, bridge, subnet);
        Runtime::spawn_on(dir, node_netns)
    }

    fn spawn_on(dir: PathBuf, node_netns: &str) -> Runtime {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let mut r = Runtime {
            dir,
            node_netns: node_netns.into(),
            child: None,
            rt,
            client: None,
        };
        r.spawn();
        for image in images() {
            r.import(image);
        }
        r
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("containerd.log"))
            .expect("containerd log");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", path(&self.node_netns)))
            .args(["--", "containerd", "--config"])
            .arg(self.dir.join("config.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd (cargo xtask installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + crate::patience(Duration::from_secs(30));
        loop {
            if let Some(c) = self.connect() {
                self.client = Some(c);
                return;
            }
            assert!(Instant::now() < deadline, "containerd did not come up:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn connect(&self) -> Option<RuntimeServiceClient<Channel>> {
        if !self.socket().exists() {
            return None;
        }
        let socket = self.socket();
        let channel = self.rt.block_on(async move {
            Endpoint::try_from("http://[::]:50051")
                .ok()?
                // A wedged runtime fails the call, never hangs the test (or its teardown).
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(60))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let socket = socket.clone();
                    async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(socket).await?)) }
                }))
                .await
                .ok()
        })?;
        let mut client = RuntimeServiceClient::new(channel);
        self.rt
            .block_on(client.version(VersionRequest::default()))
            .ok()
            .map(|_| client)
    }

    /// containerd's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` against this containerd, in the kubelet's `k8s.io` namespace.
    fn ctr(&self, args: &[&str]) {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .expect("ctr");
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Imports an image archive (docker or OCI) into the kubelet's namespace.
    pub fn import(&self, archive: &Path) {
        self.ctr(&["images", "import", archive.to_str().expect("utf-8 path")]);
    }

    /// `ctr run` of `image` as container `id` with `flags` (and `args` after
    /// the image and id), in the foreground; its stderr is piped, so the
    /// returned command can be spawned as an [`crate::Agent`]. The
    /// container's task is killed when the runtime is dropped.
    pub fn ctr_run(&self, flags: &[String], image: &str, id: &str, args: &[String]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io", "run", "--rm"])
            .args(flags)
            .arg(image)
            .arg(id)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    /// Kills and removes the containers `ctr run` started (CRI's
    /// sandboxes are not among them).
    fn kill_ctr_containers(&self) {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io", "containers", "ls", "-q"])
            .output();
        let ids = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let sandboxes: Vec<String> = self.try_list().unwrap_or_default().into_iter().map(|s| s.0).collect();
        for id in ids.lines().filter(|id| !sandboxes.iter().any(|s| s == id)) {
            for args in [
                &["tasks", "kill", "-s", "SIGKILL", id][..],
                &["tasks", "rm", "-f", id],
                &["containers", "rm", id],
            ] {
                let _ = Command::new("ctr")
                    .arg("--address")
                    .arg(self.socket())
                    .args(["--namespace", "k8s.io"])
                    .args(args)
                    .output();
            }
        }
    }

    /// SIGKILLs containerd, as a crash does; sandboxes keep running
    /// under their shims.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.client = None;
    }

    /// Starts containerd again on the same state.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn client(&self) -> RuntimeServiceClient<Channel> {
        self.client.clone().expect("containerd is running")
    }

    /// `RunPodSandbox`, as the kubelet sends it for a pod network pod.
    pub fn run_sandbox(&self, spec: &SandboxSpec) -> Result<Sandbox, tonic::Status> {
        let config = self.sandbox_config(spec);
        let mut c = self.client();
        let id = self
            .rt
            .block_on(c.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))?
            .into_inner()
            .pod_sandbox_id;
        Ok(self.sandbox(&id))
    }

    fn sandbox_config(&self, spec: &SandboxSpec) -> PodSandboxConfig {
        let log_directory = self
            .dir
            .join("logs")
            .join(format!("{}_{}_{}", spec.namespace, spec.name, spec.uid));
        let mut labels: HashMap<String, String> = spec.labels.iter().cloned().collect();
        labels.insert("io.kubernetes.pod.name".into(), spec.name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), spec.namespace.clone());
        labels.insert("io.kubernetes.pod.uid".into(), spec.uid.clone());
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: spec.name.clone(),
                uid: spec.uid.clone(),
                namespace: spec.namespace.clone(),
                attempt: spec.attempt,
            }),
            hostname: spec.name.clone(),
            log_directory: log_directory.to_string_lossy().into_owned(),
            labels,
            annotations: spec.annotations.iter().cloned().collect(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A sandbox's id, address and namespace, from `PodSandboxStatus`.
    pub fn sandbox(&self, id: &str) -> Sandbox {
        let (ip, info) = self.status(id).expect("PodSandboxStatus");
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .unwrap_or_else(|| panic!("sandbox {id}: no network namespace in its status: {info}"));
        let name = netns
            .strip_prefix("/var/run/netns/")
            .unwrap_or_else(|| panic!("sandbox {id}: namespace {netns} not under /var/run/netns"));
        Sandbox {
            id: id.into(),
            ip,
            netns: name.into(),
        }
    }

    /// `PodSandboxStatus` (verbose): the address, and containerd's info.
    pub fn status(&self, id: &str) -> Result<(String, Value), tonic::Status> {
        let mut c = self.client();
        let r = self
            .rt
            .block_on(c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            }))?
            .into_inner();
        let ip = r.status.and_then(|s| s.network).map(|n| n.ip).unwrap_or_default();
        let info = r
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or(Value::Null);
        Ok((ip, info))
    }

    /// `StopPodSandbox`: the runtime kills the sandbox and tears down its network.
    pub fn stop(&self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.client();
        self.rt.block_on(c.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        }))?;
        Ok(())
    }

    /// `RemovePodSandbox`.
    pub fn remove(&self, id: &str) -> Result<(), tonic::Status> {
        let mut c = self.client();
        self.rt.block_on(c.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        }))?;
        Ok(())
    }

    /// Every sandbox the runtime knows: (id, pod name, ready).
    pub fn list(&self) -> Vec<(String, String, bool)> {
        self.try_list().expect("ListPodSandbox")
    }

    fn try_list(&self) -> Result<Vec<(String, String, bool)>, tonic::Status> {
        let mut c = self.client();
        let r = self
            .rt
            .block_on(c.list_pod_sandbox(ListPodSandboxRequest { filter: None }))?
            .into_inner();
        Ok(r.items
            .into_iter()
            .map(|s| {
                (
                    s.id,
                    s.metadata.map(|m| m.name).unwrap_or_default(),
                    s.state == k8s_cri::v1::PodSandboxState::SandboxReady as i32,
                )
            })
            .collect())
    }

    /// Creates and starts a container running `command` in the sandbox,
    /// from the busybox image; its output goes to the sandbox's log dir.
    pub fn run_container(&self, spec: &SandboxSpec, sandbox: &Sandbox, name: &str, command: &[&str]) -> String {
        let mut c = self.client();
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: BUSYBOX_IMAGE.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            ..Default::default()
        };
        let id = self
            .rt
            .block_on(c.create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.id.clone(),
                config: Some(config),
                sandbox_config: Some(self.sandbox_config(spec)),
            }))
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        self.rt
            .block_on(c.start_container(StartContainerRequest {
                container_id: id.clone(),
            }))
            .expect("StartContainer");
        id
    }

    /// What the container `name` of pod `spec` wrote (CRI log format:
    /// timestamp, stream, tag, text per line; the text only).
    pub fn container_output(&self, spec: &SandboxSpec, name: &str) -> String {
        let file = self
            .dir
            .join("logs")
            .join(format!("{}_{}_{}", spec.namespace, spec.name, spec.uid))
            .join(format!("{name}.log"));
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(|l| l.splitn(4, ' ').nth(3).unwrap_or_default().to_string() + "\n")
            .collect()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "containerd's log ({}), last lines:\n{}",
                self.dir.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        // As the kubelet does for every pod when a node is drained.
        if self.client.is_some() {
            self.kill_ctr_containers();
            for (id, _, _) in self.try_list().unwrap_or_default() {
                let _ = self.stop(&id);
                let _ = self.remove(&id);
            }
        }
        self.kill();
        reclaim(&self.dir);
    }
}

/// The runtime's directories, its reference plugins, the node's conflist.
fn prepare(dir: &Path, bridge: &str, subnet: &str) {
    reclaim(dir);
    for d in ["cni-bin", "cni-conf", "logs", "ipam"] {
        std::fs::create_dir_all(dir.join(d)).expect("runtime dir");
    }
    for plugin in ["bridge", "host-local", "loopback", "portmap"] {
        let to = dir.join("cni-bin").join(plugin);
        let _ = std::fs::remove_file(&to);
        std::os::unix::fs::symlink(Path::new(crate::cni::PLUGIN_DIR).join(plugin), &to).expect("plugin link");
    }
    std::fs::write(
        dir.join("cni-conf/10-bridge.conflist"),
        serde_json::to_vec_pretty(&node_conflist(bridge, subnet, &dir.join("ipam"))).unwrap(),
    )
    .expect("node conflist");
    std::fs::write(dir.join("config.toml"), config_toml(dir)).expect("containerd config");
}

/// Removes what a runtime under `dir` left: its shims (with their
/// sandboxes), its mounts, the directory.
pub fn reclaim(dir: &Path) {
    let dir_s = dir.to_string_lossy().into_owned();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("containerd") && cmdline.contains(&dir_s) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut under: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| m.starts_with(&dir_s))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in under {
        let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A node's primary network, as a real node's CNI config names it:
/// bridge with host-local addresses, then portmap.
fn node_conflist(bridge: &str, subnet: &str, ipam_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": "nodeward-test-pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{
                        "subnet": format!("{subnet}.0/24"),
                        "rangeStart": format!("{subnet}.100"),
                        "rangeEnd": format!("{subnet}.199"),
                        "gateway": format!("{subnet}.1"),
                    }]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}}
        ]
    })
}

/// `nodeward-cni install` with the DaemonSet's init container's flags,
/// its host paths mapped to this runtime's directories.
fn install_cni(dir: &Path, agent_socket: &Path) {
    let out = Command::new(crate::cni::plugin_bin())
        .arg("install")
        .arg("--bin-dir")
        .arg(dir.join("cni-bin"))
        .arg("--conf-dir")
        .arg(dir.join("cni-conf"))
        .arg("--socket")
        .arg(agent_socket)
        .output()
        .expect("nodeward-cni install");
    assert!(
        out.status.success(),
        "nodeward-cni install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// containerd's configuration: everything under `dir`, the CRI plugin
/// with the test images, runc with its own root, CNI from `dir`.
fn config_toml(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # This machine's own init may not lower its children's OOM score (the
  # sandbox's -998 is refused): keep the runtime's at or above its own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/cni-conf"
    max_conf_num = 1
"#
    )
}

/// The test images' archives, built once per machine boot (they live on
/// /run) and shared by every test binary.
fn images() -> &'static [PathBuf] {
    static IMAGES: OnceLock<Vec<PathBuf>> = OnceLock::new();
    IMAGES.get_or_init(|| {
        std::fs::create_dir_all(IMAGE_DIR).expect("image dir");
        // One builder at a time across test binaries.
        let lock = std::fs::File::create(Path::new(IMAGE_DIR).join(".lock")).expect("image lock");
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map(|guard| {
                let images = vec![
                    build_image(PAUSE_IMAGE, "pause", &[BUSYBOX, "sleep", "2147483647"]),
                    build_image(BUSYBOX_IMAGE, "busybox", &[BUSYBOX, "sh"]),
                ];
                drop(guard);
                images
            })
            .unwrap_or_else(|(_, e)| panic!("locking {IMAGE_DIR}: {e}"))
    })
}

/// `buildah from scratch`, busybox at /bin, the entrypoint, pushed to a
/// docker archive `IMAGE_DIR/<file>.tar` (kept if already there).
fn build_image(reference: &str, file: &str, entrypoint: &[&str]) -> PathBuf {
    let archive = Path::new(IMAGE_DIR).join(format!("{file}.tar"));
    if archive.exists() {
        return archive;
    }
    let storage = Path::new(IMAGE_DIR).join("buildah");
    let buildah = |args: &[&str]| -> String {
        let out = Command::new("buildah")
            .arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("buildah (cargo xtask installs it)");
        assert!(
            out.status.success(),
            "buildah {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let c = buildah(&["from", "scratch"]);
    let root = PathBuf::from(buildah(&["mount", &c]));
    std::fs::create_dir_all(root.join("bin")).expect("image /bin");
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).expect("copy busybox (busybox-static)");
    for applet in ["sh", "nc", "sleep", "cat", "echo"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("applet link");
    }
    buildah(&[
        "config",
        "--entrypoint",
        &serde_json::to_string(entrypoint).unwrap(),
        &c,
    ]);
    buildah(&["commit", "--quiet", &c, reference]);
    let tmp = archive.with_extension("tar.tmp");
    let _ = std::fs::remove_file(&tmp);
    buildah(&[
        "push",
        "--quiet",
        reference,
        &format!("docker-archive:{}:{reference}", tmp.display()),
    ]);
    buildah(&["rm", &c]);
    std::fs::rename(&tmp, &archive).expect("image archive");
    archive
}
